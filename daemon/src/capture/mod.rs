//! In-pod traffic capture (DESIGN §2), user-space side: loads the capture programs,
//! attaches them, enrols pods, and answers "where was this connection going?".
//!
//! # Life cycle
//!
//! - [`Capture::start`] mounts a bpffs under the state directory (unless one is
//!   there), loads the object with every map pinned there (adopting maps pinned by a
//!   previous daemon), and attaches `cgroup/connect4`, `cgroup/connect6` and `sockops`
//!   to the node's pods cgroup, unless links pinned by a previous daemon are still
//!   there: then those stay as they are.
//! - [`Capture::enroll`] creates the daemon's listeners in the pod's netns
//!   (`127.0.0.1:15001`, `0.0.0.0:15006`, `0.0.0.0:15008`, all carrying the bypass
//!   mark), registers them and the pod, attaches `sk_lookup` to the pod's netns and
//!   pins that link. For a pod enrolled by a previous daemon (same IP, same netns) it
//!   only re-creates and registers the listeners ([`PodHandle::resumed`]).
//! - [`Capture::original_dst`] reads the original destination of a connection
//!   accepted on a pod's outbound listener.
//! - [`Capture::unenroll`] returns a pod to plaintext; [`uninstall`] removes
//!   everything (links, maps, bpffs, records).
//!
//! # Fail closed
//!
//! Links and maps are pinned, so when the daemon exits or dies, capture stays in
//! place and only the daemon's listeners go away (the kernel drops them from the
//! sockhash as they close). Outbound connects of enrolled pods are still redirected to
//! `127.0.0.1:15001`, where nothing listens: refused. Inbound connections find no
//! listener in the sockhash and sk_lookup drops them: refused. Nothing reaches a
//! destination in plaintext until a daemon is back.
//!
//! # Blocking
//!
//! Every method makes a few system calls; `enroll` also starts a thread to enter the
//! pod's netns. Call `enroll`/`unenroll` from `spawn_blocking` in async code;
//! `original_dst` is a lookup and a delete in a hash map and fine inline.

mod bpffs;
mod layout;
mod records;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs, io,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::{AsFd, AsRawFd as _},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use ambit_ebpf_common::{
    CAPTURE_MAPS, CONNECT4_CAPTURE_PROGRAM, CONNECT6_CAPTURE_PROGRAM, CaptureSettings,
    EXCLUDED_CIDRS_MAP, EXCLUDED_PORTS_MAP, Exclusion, INBOUND_SOCKETS_MAP, ListenerKey,
    ORIG_DST_MAP, OrigDstKey, OrigDstV4, PODS_BY_IP_MAP, PODS_BY_NETNS_MAP, PodEntry, SETTINGS_MAP,
    SK_LOOKUP_CAPTURE_PROGRAM, SOCKOPS_CAPTURE_PROGRAM, ipv4_from_wire, ipv4_to_wire,
};
pub use ambit_ebpf_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, SockHash, lpm_trie::Key,
    },
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use nix::sys::socket::{self, SockaddrIn};

use self::{
    layout::{BPFFS_DIR, PIN_ROOT, PinLayout, RECORDS_DIR},
    records::PodRecord,
};
use crate::{
    ebpf,
    netns::{self, Netns, NetnsCookie, NetnsError, SocketMark, UnconnectedTcp},
};

/// Default `SO_MARK` of the daemon's sockets (1337, Istio's ztunnel uses the same).
pub const DEFAULT_BYPASS_MARK: SocketMark = match SocketMark::new(0x539) {
    Some(mark) => mark,
    None => panic!("the default bypass mark is not zero"),
};

/// Default `SO_MARK` of the daemon's source-IP-preserving delivery sockets (routed to
/// `lo` inside the pod by fwmark, so it must differ from the bypass mark).
pub const DEFAULT_DELIVERY_MARK: SocketMark = match SocketMark::new(0x53a) {
    Some(mark) => mark,
    None => panic!("the default delivery mark is not zero"),
};

/// What the capture needs to know about the node.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureConfig {
    /// The capture's own directory: a bpffs is mounted at `<state_dir>/bpf` (pins must
    /// stay in that one instance across restarts), pod records go to
    /// `<state_dir>/pods`.
    pub state_dir: PathBuf,
    /// The cgroup v2 directory holding every pod of the node (and nothing else):
    /// connect4/6 and sockops are attached there.
    pub pods_cgroup: PathBuf,
    /// Mark of every daemon socket; the capture programs never redirect a socket
    /// carrying it.
    pub bypass_mark: SocketMark,
    /// Mark of the daemon's delivery sockets to apps (not redirected either).
    pub delivery_mark: SocketMark,
    /// Traffic never captured.
    pub exclusions: Exclusions,
}

/// Ports and prefixes that are never captured.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Exclusions {
    /// Outbound connects to these destination ports pass untouched.
    pub outbound_ports: BTreeSet<u16>,
    /// Inbound connections to these pod ports pass untouched.
    pub inbound_ports: BTreeSet<u16>,
    /// Outbound connects into these prefixes pass untouched.
    pub outbound_cidrs: BTreeSet<Ipv4Prefix>,
    /// Inbound connections from these prefixes pass untouched.
    pub inbound_cidrs: BTreeSet<Ipv4Prefix>,
}

/// An IPv4 prefix such as `10.96.0.0/12`, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Prefix {
    addr: Ipv4Addr,
    len: u8,
}

/// A pod to enrol: where its netns is and which IP it has.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCapture {
    /// `namespace/name`, for logs.
    pub name: String,
    /// Its network namespace handle, e.g. `/run/netns/<name>` or `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
    /// Its IP (on its `eth0`).
    pub ip: Ipv4Addr,
}

/// Capture on one node: the loaded programs, the pinned maps, the enrolled pods.
///
/// `Send + Sync`: share it behind an `Arc`. Dropping it leaves capture in place (fail
/// closed until a new instance enrols the pods again); [`uninstall`] removes it.
#[derive(Debug)]
pub struct Capture {
    config: CaptureConfig,
    layout: PinLayout,
    records_dir: PathBuf,
    /// Whether this instance mounted the bpffs (else it was there already).
    mounted_bpffs: bool,
    enrollment: Mutex<Enrollment>,
    orig_dst: Mutex<BpfHashMap<MapData, OrigDstKey, OrigDstV4>>,
}

/// Everything enrolment changes, behind one lock.
struct Enrollment {
    /// Holds the loaded `sk_lookup` program, attached once per enrolled pod.
    ebpf: Ebpf,
    pods_by_netns: BpfHashMap<MapData, u64, PodEntry>,
    pods_by_ip: BpfHashMap<MapData, u32, PodEntry>,
    inbound_sockets: SockHash<MapData, ListenerKey>,
    excluded_ports: BpfHashMap<MapData, u16, u32>,
    excluded_cidrs: LpmTrie<MapData, u32, u32>,
}

/// An enrolled pod: its handle and the daemon's listeners in its netns. Dropping the
/// listeners (as a daemon that exits does) makes the pod's connections fail closed;
/// [`Capture::unenroll`] is what ends capture for the pod.
#[derive(Debug)]
pub struct EnrolledPod {
    handle: PodHandle,
    listeners: PodListeners,
}

/// The daemon's listeners inside one pod's netns; all non-blocking and ready for
/// `tokio::net::TcpListener::from_std`.
#[derive(Debug)]
pub struct PodListeners {
    /// `127.0.0.1:15001`: captured outbound connects; read their destination with
    /// [`Capture::original_dst`].
    pub outbound: TcpListener,
    /// `0.0.0.0:15006`: inbound plaintext; an accepted socket's local address is the
    /// destination the client asked for.
    pub inbound: TcpListener,
    /// `0.0.0.0:15008`: inbound HBONE.
    pub hbone: TcpListener,
}

/// What the daemon keeps of an enrolled pod: its identity and a way to create sockets
/// in its netns. Cheap to clone.
#[derive(Clone, Debug)]
pub struct PodHandle {
    pod: PodCapture,
    netns: Arc<Netns>,
    netns_cookie: NetnsCookie,
    bypass_mark: SocketMark,
    delivery_mark: SocketMark,
    resumed: bool,
}

/// What is attached and enrolled, for `/config_dump` and tests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureStatus {
    /// The bpffs holding the pins.
    pub bpffs: PathBuf,
    /// The cgroup the cgroup programs are attached to (as configured).
    pub pods_cgroup: PathBuf,
    /// `connect4`, `connect6`, `sockops`: their pinned links.
    pub cgroup_links: BTreeMap<String, LinkStatus>,
    /// Enrolled pods by IP, from the kernel's maps.
    pub pods: BTreeMap<Ipv4Addr, PodStatus>,
}

/// A pinned link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// The kernel's link id.
    pub link_id: u32,
    /// The kernel's id of the attached program.
    pub program_id: u32,
}

/// An enrolled pod as the kernel's maps see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Its netns cookie.
    pub netns_cookie: NetnsCookie,
    /// Whether outbound capture is on (the netns cookie is registered).
    pub outbound: bool,
    /// The pod's sk_lookup link, when pinned.
    pub sk_lookup: Option<LinkStatus>,
    /// Whether the daemon's inbound and HBONE listeners are registered (they leave
    /// the sockhash when they close: both false while the daemon is down).
    pub inbound_listener: bool,
    /// See `inbound_listener`.
    pub hbone_listener: bool,
}

/// Why capture could not be set up, changed or read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The daemon was built without its eBPF programs.
    #[error(
        "the daemon was built without eBPF programs (AYA_BUILD_SKIP was set); rebuild it \
         without AYA_BUILD_SKIP"
    )]
    NotBuilt,
    /// The state directory (or one below it) could not be prepared.
    #[error("preparing capture state directory {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// bpffs could not be mounted.
    #[error("mounting bpffs at {}", path.display())]
    MountBpffs {
        /// The mount point.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// bpffs could not be unmounted.
    #[error("unmounting bpffs at {}", path.display())]
    UnmountBpffs {
        /// The mount point.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// aya could not parse the object, or create or open its pinned maps.
    #[error("loading the eBPF object with its maps pinned under {}", pins.display())]
    Load {
        /// The maps' pin directory.
        pins: PathBuf,
        /// What aya reported (boxed: it is large).
        #[source]
        source: Box<EbpfError>,
    },
    /// The object lacks a program (the two crates disagree).
    #[error("the eBPF object has no program {name}")]
    MissingProgram {
        /// The program's name.
        name: &'static str,
    },
    /// The object lacks a map (the two crates disagree).
    #[error("the eBPF object has no map {name}")]
    MissingMap {
        /// The map's name.
        name: &'static str,
    },
    /// A program is of an unexpected type or the kernel refused it (the source carries
    /// the verifier log).
    #[error("loading eBPF program {name}")]
    Program {
        /// The program's name.
        name: &'static str,
        /// What aya or the kernel reported.
        #[source]
        source: ProgramError,
    },
    /// The pods cgroup could not be opened.
    #[error("opening cgroup {}", path.display())]
    OpenCgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused an attachment.
    #[error("attaching eBPF program {name} to {target}")]
    Attach {
        /// The program's name.
        name: &'static str,
        /// The cgroup or netns.
        target: String,
        /// What the kernel reported.
        #[source]
        source: ProgramError,
    },
    /// A link could not be pinned.
    #[error("pinning the link of {name} at {}", path.display())]
    Pin {
        /// The program's name.
        name: &'static str,
        /// The pin path.
        path: PathBuf,
        /// What the kernel reported.
        #[source]
        source: PinError,
    },
    /// A pinned link could not be opened or read.
    #[error("opening the pinned link {}", path.display())]
    PinnedLink {
        /// The pin path.
        path: PathBuf,
        /// What the kernel reported.
        #[source]
        source: LinkError,
    },
    /// A pin could not be removed.
    #[error("removing the pin {}", path.display())]
    Unpin {
        /// The pin path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A map could not be opened, read or written.
    #[error("eBPF map {name}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// What aya or the kernel reported.
        #[source]
        source: MapError,
    },
    /// The pod's netns could not be entered, or its listeners not created.
    #[error("pod {pod}")]
    PodNetns {
        /// `namespace/name`.
        pod: String,
        /// What failed in the netns.
        #[source]
        source: NetnsError,
    },
    /// A pod record could not be read or written.
    #[error("pod record {}", path.display())]
    Record {
        /// The record's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A pod record is not valid JSON of the expected shape.
    #[error("pod record {} is malformed", path.display())]
    RecordFormat {
        /// The record's path.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The accepted socket's netns cookie or peer could not be read.
    #[error("reading the accepted socket's netns cookie and peer")]
    AcceptedSocket(#[source] io::Error),
    /// No original destination is recorded for the accepted connection.
    #[error(
        "no original destination for peer port {port} in netns {netns_cookie:?} (not a \
         captured connection, or read already)"
    )]
    NoOriginalDst {
        /// The accepted socket's netns.
        netns_cookie: NetnsCookie,
        /// Its peer port.
        port: u16,
    },
}

/// A cgroup program of the capture and its link's pin name.
#[derive(Clone, Copy, Debug)]
enum CgroupProgram {
    Connect4,
    Connect6,
    SockOps,
}

impl CgroupProgram {
    const ALL: [Self; 3] = [Self::Connect4, Self::Connect6, Self::SockOps];

    const fn name(self) -> &'static str {
        match self {
            Self::Connect4 => CONNECT4_CAPTURE_PROGRAM,
            Self::Connect6 => CONNECT6_CAPTURE_PROGRAM,
            Self::SockOps => SOCKOPS_CAPTURE_PROGRAM,
        }
    }

    const fn pin_name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
            Self::SockOps => "sockops",
        }
    }
}

impl CaptureConfig {
    /// Defaults (marks [`DEFAULT_BYPASS_MARK`] and [`DEFAULT_DELIVERY_MARK`], no
    /// exclusions) for the given directories.
    pub fn new(state_dir: impl Into<PathBuf>, pods_cgroup: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            pods_cgroup: pods_cgroup.into(),
            bypass_mark: DEFAULT_BYPASS_MARK,
            delivery_mark: DEFAULT_DELIVERY_MARK,
            exclusions: Exclusions::default(),
        }
    }

    /// Where the bpffs is mounted: `<state_dir>/bpf`.
    pub fn bpffs_dir(&self) -> PathBuf {
        self.state_dir.join(BPFFS_DIR)
    }
}

impl Ipv4Prefix {
    /// `addr/len` with the host bits cleared; `None` when `len > 32`.
    pub const fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        if len > 32 {
            return None;
        }
        let mask = match u32::MAX.checked_shl(32 - len as u32) {
            Some(mask) => mask,
            None => 0,
        };
        Some(Self {
            addr: Ipv4Addr::from_bits(addr.to_bits() & mask),
            len,
        })
    }

    /// The network address.
    pub const fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub const fn len(&self) -> u8 {
        self.len
    }

    /// Whether this is `0.0.0.0/0` (clippy wants an `is_empty` beside `len`).
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Ipv4Prefix {
    type Err = String;

    /// `a.b.c.d/len`, or a bare address for `/32`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|e| format!("invalid prefix {s:?}: {e}"))?;
        let len: u8 = len
            .parse()
            .map_err(|e| format!("invalid prefix length in {s:?}: {e}"))?;
        Self::new(addr, len).ok_or_else(|| format!("invalid prefix {s:?}: length above 32"))
    }
}

impl serde::Serialize for Ipv4Prefix {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl Capture {
    /// Sets capture up on the node, or adopts what a previous daemon left pinned (see
    /// the module docs). Needs root (`CAP_BPF`, `CAP_NET_ADMIN`, `CAP_SYS_ADMIN`).
    pub fn start(config: CaptureConfig) -> Result<Self, CaptureError> {
        let object = ebpf::object();
        if object.is_empty() {
            return Err(CaptureError::NotBuilt);
        }
        let bpffs_dir = config.bpffs_dir();
        let mounted_bpffs = bpffs::ensure_mounted(&bpffs_dir)?;
        let layout = PinLayout::new(&bpffs_dir);
        layout.create().map_err(|source| CaptureError::StateDir {
            path: layout.root().to_path_buf(),
            source,
        })?;

        let map_pins: Vec<(&str, PathBuf)> = CAPTURE_MAPS
            .iter()
            .map(|name| (*name, layout.map(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(object).map_err(|source| CaptureError::Load {
            pins: layout.maps_dir(),
            source: Box::new(source),
        })?;

        let cgroup =
            fs::File::open(&config.pods_cgroup).map_err(|source| CaptureError::OpenCgroup {
                path: config.pods_cgroup.clone(),
                source,
            })?;
        for program in CgroupProgram::ALL {
            attach_cgroup_program(&mut ebpf, program, &cgroup, &config.pods_cgroup, &layout)?;
        }
        let sk_lookup: &mut SkLookup = program_mut(&mut ebpf, SK_LOOKUP_CAPTURE_PROGRAM)?;
        sk_lookup.load().map_err(|source| CaptureError::Program {
            name: SK_LOOKUP_CAPTURE_PROGRAM,
            source,
        })?;

        let mut settings: Array<MapData, CaptureSettings> = take_map(&mut ebpf, SETTINGS_MAP)?;
        settings
            .set(
                0,
                CaptureSettings {
                    bypass_mark: config.bypass_mark.get(),
                    delivery_mark: config.delivery_mark.get(),
                    _reserved: [0; 2],
                },
                0,
            )
            .map_err(|source| CaptureError::Map {
                name: SETTINGS_MAP,
                source,
            })?;

        let mut enrollment = Enrollment {
            pods_by_netns: take_map(&mut ebpf, PODS_BY_NETNS_MAP)?,
            pods_by_ip: take_map(&mut ebpf, PODS_BY_IP_MAP)?,
            inbound_sockets: take_map(&mut ebpf, INBOUND_SOCKETS_MAP)?,
            excluded_ports: take_map(&mut ebpf, EXCLUDED_PORTS_MAP)?,
            excluded_cidrs: take_map(&mut ebpf, EXCLUDED_CIDRS_MAP)?,
            ebpf,
        };
        enrollment.set_exclusions(&config.exclusions)?;
        let orig_dst = take_map(&mut enrollment.ebpf, ORIG_DST_MAP)?;

        tracing::info!(
            bpffs = %bpffs_dir.display(),
            pods_cgroup = %config.pods_cgroup.display(),
            bypass_mark = %config.bypass_mark,
            "eBPF capture ready"
        );
        Ok(Self {
            records_dir: config.state_dir.join(RECORDS_DIR),
            config,
            layout,
            mounted_bpffs,
            enrollment: Mutex::new(enrollment),
            orig_dst: Mutex::new(orig_dst),
        })
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &CaptureConfig {
        &self.config
    }

    /// Whether this instance mounted the bpffs (false: it was mounted already, e.g. by
    /// a previous daemon).
    pub fn mounted_bpffs(&self) -> bool {
        self.mounted_bpffs
    }

    /// Replaces the exclusions (new connections see the change at once).
    pub fn set_exclusions(&self, exclusions: &Exclusions) -> Result<(), CaptureError> {
        self.enrollment().set_exclusions(exclusions)
    }

    /// Enrols `pod`: creates the daemon's listeners in its netns and captures its
    /// traffic from now on. Resumes a pod enrolled by a previous daemon (same IP and
    /// netns) without re-attaching anything; replaces a stale enrolment of the same IP
    /// in another netns. On failure nothing of a new enrolment is left.
    pub fn enroll(&self, pod: PodCapture) -> Result<EnrolledPod, CaptureError> {
        let netns_error = |source| CaptureError::PodNetns {
            pod: pod.name.clone(),
            source,
        };
        let netns = Netns::open(&pod.netns).map_err(netns_error)?;
        let netns_cookie = netns.cookie().map_err(netns_error)?;
        let mark = self.config.bypass_mark;
        let listeners = netns
            .run(|| PodListeners::bind(mark))
            .map_err(netns_error)?;

        let mut state = self.enrollment();
        let entry = PodEntry::new(netns_cookie.0, pod.ip);
        let link_pin = self.layout.pod_link(pod.ip);
        let existing = lookup(&state.pods_by_ip, &ipv4_to_wire(pod.ip), PODS_BY_IP_MAP)?;
        let resumed = existing == Some(entry) && pin_exists(&link_pin)?;
        if existing.is_some() && !resumed {
            tracing::info!(pod = %pod.name, ip = %pod.ip, "replacing a stale enrolment");
            self.forget_locked(&mut state, pod.ip)?;
        }

        let result = self.register(&mut state, &pod, &netns, entry, &listeners, !resumed);
        if let Err(e) = result {
            if !resumed && let Err(cleanup) = self.forget_locked(&mut state, pod.ip) {
                tracing::warn!(pod = %pod.name, error = %cleanup, "cleaning up a failed enrolment");
            }
            return Err(e);
        }
        drop(state);
        tracing::info!(pod = %pod.name, ip = %pod.ip, netns_cookie = netns_cookie.0, resumed, "pod enrolled");
        Ok(EnrolledPod {
            handle: PodHandle {
                pod,
                netns: Arc::new(netns),
                netns_cookie,
                bypass_mark: self.config.bypass_mark,
                delivery_mark: self.config.delivery_mark,
                resumed,
            },
            listeners,
        })
    }

    /// Ends capture for the pod: its traffic passes untouched again. The caller closes
    /// the pod's listeners (they are no longer reachable either way).
    pub fn unenroll(&self, pod: &PodHandle) -> Result<(), CaptureError> {
        self.forget(pod.ip())?;
        tracing::info!(pod = %pod.pod.name, ip = %pod.ip(), "pod unenrolled");
        Ok(())
    }

    /// Removes whatever capture state exists for the pod IP `ip` (map entries, link,
    /// record) without needing its netns: for pods that went away while the daemon
    /// was down.
    pub fn forget(&self, ip: Ipv4Addr) -> Result<(), CaptureError> {
        let mut state = self.enrollment();
        self.forget_locked(&mut state, ip)
    }

    /// The pods enrolled according to the records a daemon left, ordered by IP:
    /// enrol them again to resume them after a restart.
    pub fn persisted_pods(&self) -> Result<Vec<PodCapture>, CaptureError> {
        Ok(records::read_all(&self.records_dir)?
            .into_iter()
            .map(|record| record.pod)
            .collect())
    }

    /// Where the connection accepted on a pod's outbound listener was going. Each
    /// answer is given once (the entry is deleted as it is read).
    pub fn original_dst(&self, accepted: &impl AsFd) -> Result<SocketAddrV4, CaptureError> {
        let netns_cookie = netns::netns_cookie(accepted).map_err(CaptureError::AcceptedSocket)?;
        let peer: SockaddrIn = socket::getpeername(accepted.as_fd().as_raw_fd())
            .map_err(|errno| CaptureError::AcceptedSocket(errno.into()))?;
        let key = OrigDstKey::new(netns_cookie.0, peer.port());
        let mut map = self.orig_dst.lock().unwrap_or_else(PoisonError::into_inner);
        let dst = match map.get(&key, 0) {
            Ok(dst) => dst,
            Err(MapError::KeyNotFound) => {
                return Err(CaptureError::NoOriginalDst {
                    netns_cookie,
                    port: peer.port(),
                });
            }
            Err(source) => {
                return Err(CaptureError::Map {
                    name: ORIG_DST_MAP,
                    source,
                });
            }
        };
        if let Err(e) = map.remove(&key) {
            // Harmless: the map is LRU and the next connect from that port overwrites it.
            tracing::debug!(error = %e, "deleting a read original destination");
        }
        Ok(dst.addr())
    }

    /// What is attached and enrolled.
    pub fn status(&self) -> Result<CaptureStatus, CaptureError> {
        let mut cgroup_links = BTreeMap::new();
        for program in CgroupProgram::ALL {
            if let Some(link) = link_status(&self.layout.link(program.pin_name()))? {
                cgroup_links.insert(program.pin_name().to_owned(), link);
            }
        }
        let state = self.enrollment();
        let mut pods = BTreeMap::new();
        for item in state.pods_by_ip.iter() {
            let (ip, entry) = item.map_err(|source| CaptureError::Map {
                name: PODS_BY_IP_MAP,
                source,
            })?;
            let ip = ipv4_from_wire(ip);
            let outbound =
                lookup(&state.pods_by_netns, &entry.netns_cookie, PODS_BY_NETNS_MAP)?.is_some();
            let listener = |port| -> Result<bool, CaptureError> {
                let key = ListenerKey::new(ip, port);
                for registered in state.inbound_sockets.keys() {
                    let registered = registered.map_err(|source| CaptureError::Map {
                        name: INBOUND_SOCKETS_MAP,
                        source,
                    })?;
                    if registered == key {
                        return Ok(true);
                    }
                }
                Ok(false)
            };
            pods.insert(
                ip,
                PodStatus {
                    netns_cookie: NetnsCookie(entry.netns_cookie),
                    outbound,
                    sk_lookup: link_status(&self.layout.pod_link(ip))?,
                    inbound_listener: listener(INBOUND_PORT)?,
                    hbone_listener: listener(HBONE_PORT)?,
                },
            );
        }
        Ok(CaptureStatus {
            bpffs: self.config.bpffs_dir(),
            pods_cgroup: self.config.pods_cgroup.clone(),
            cgroup_links,
            pods,
        })
    }

    /// Removes capture from the node: [`uninstall`] for this instance's state
    /// directory, after closing its handles.
    pub fn uninstall(self) -> Result<(), CaptureError> {
        let state_dir = self.config.state_dir.clone();
        drop(self);
        uninstall(&state_dir)
    }

    fn enrollment(&self) -> MutexGuard<'_, Enrollment> {
        // The maps live in the kernel; a panic elsewhere leaves nothing half-written
        // here that the next caller could trip over.
        self.enrollment
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the listeners and the pod, in an order that never lets a pod's
    /// traffic reach a missing listener when a live one is coming: sockets first,
    /// then the inbound entry and link, then outbound capture, then the record.
    fn register(
        &self,
        state: &mut Enrollment,
        pod: &PodCapture,
        netns: &Netns,
        entry: PodEntry,
        listeners: &PodListeners,
        attach: bool,
    ) -> Result<(), CaptureError> {
        let sockets_error = |source| CaptureError::Map {
            name: INBOUND_SOCKETS_MAP,
            source,
        };
        state
            .inbound_sockets
            .insert(
                ListenerKey::new(pod.ip, INBOUND_PORT),
                listeners.inbound.as_raw_fd(),
                0,
            )
            .map_err(sockets_error)?;
        state
            .inbound_sockets
            .insert(
                ListenerKey::new(pod.ip, HBONE_PORT),
                listeners.hbone.as_raw_fd(),
                0,
            )
            .map_err(sockets_error)?;
        state
            .pods_by_ip
            .insert(ipv4_to_wire(pod.ip), entry, 0)
            .map_err(|source| CaptureError::Map {
                name: PODS_BY_IP_MAP,
                source,
            })?;
        if attach {
            let link_pin = self.layout.pod_link(pod.ip);
            let program: &mut SkLookup = program_mut(&mut state.ebpf, SK_LOOKUP_CAPTURE_PROGRAM)?;
            let link_id = program
                .attach(netns)
                .map_err(|source| CaptureError::Attach {
                    name: SK_LOOKUP_CAPTURE_PROGRAM,
                    target: format!("netns {} of pod {}", netns.path().display(), pod.name),
                    source,
                })?;
            let link = program
                .take_link(link_id)
                .map_err(|source| CaptureError::Program {
                    name: SK_LOOKUP_CAPTURE_PROGRAM,
                    source,
                })?;
            FdLink::from(link)
                .pin(&link_pin)
                .map_err(|source| CaptureError::Pin {
                    name: SK_LOOKUP_CAPTURE_PROGRAM,
                    path: link_pin.clone(),
                    source,
                })?;
        }
        state
            .pods_by_netns
            .insert(entry.netns_cookie, entry, 0)
            .map_err(|source| CaptureError::Map {
                name: PODS_BY_NETNS_MAP,
                source,
            })?;
        records::write(
            &self.records_dir,
            &PodRecord {
                pod: pod.clone(),
                netns_cookie: NetnsCookie(entry.netns_cookie),
            },
        )
    }

    /// Removes the pod's state in the reverse order of [`Capture::register`]; missing
    /// pieces are fine.
    fn forget_locked(&self, state: &mut Enrollment, ip: Ipv4Addr) -> Result<(), CaptureError> {
        let wire = ipv4_to_wire(ip);
        if let Some(entry) = lookup(&state.pods_by_ip, &wire, PODS_BY_IP_MAP)? {
            ignore_missing(state.pods_by_netns.remove(&entry.netns_cookie)).map_err(|source| {
                CaptureError::Map {
                    name: PODS_BY_NETNS_MAP,
                    source,
                }
            })?;
        }
        unpin(&self.layout.pod_link(ip))?;
        for port in [INBOUND_PORT, HBONE_PORT] {
            ignore_missing(state.inbound_sockets.remove(&ListenerKey::new(ip, port))).map_err(
                |source| CaptureError::Map {
                    name: INBOUND_SOCKETS_MAP,
                    source,
                },
            )?;
        }
        ignore_missing(state.pods_by_ip.remove(&wire)).map_err(|source| CaptureError::Map {
            name: PODS_BY_IP_MAP,
            source,
        })?;
        records::remove(&self.records_dir, ip)
    }
}

impl fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // aya's SockHash has no Debug; the maps are kernel objects anyway.
        f.debug_struct("Enrollment").finish_non_exhaustive()
    }
}

impl Enrollment {
    /// Writes the exclusions: new entries first, then stale ones removed, so that no
    /// exclusion that stays ever lapses.
    fn set_exclusions(&mut self, exclusions: &Exclusions) -> Result<(), CaptureError> {
        let ports_error = |source| CaptureError::Map {
            name: EXCLUDED_PORTS_MAP,
            source,
        };
        let mut ports: BTreeMap<u16, u32> = BTreeMap::new();
        for port in &exclusions.outbound_ports {
            *ports.entry(*port).or_default() |= Exclusion::OUTBOUND;
        }
        for port in &exclusions.inbound_ports {
            *ports.entry(*port).or_default() |= Exclusion::INBOUND;
        }
        for (port, bits) in &ports {
            self.excluded_ports
                .insert(port, bits, 0)
                .map_err(ports_error)?;
        }
        let stale: Vec<u16> = self
            .excluded_ports
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(ports_error)?
            .into_iter()
            .filter(|port| !ports.contains_key(port))
            .collect();
        for port in stale {
            ignore_missing(self.excluded_ports.remove(&port)).map_err(ports_error)?;
        }

        let cidrs_error = |source| CaptureError::Map {
            name: EXCLUDED_CIDRS_MAP,
            source,
        };
        let mut cidrs: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        let key = |p: &Ipv4Prefix| (u32::from(p.len()), ipv4_to_wire(p.addr()));
        for prefix in &exclusions.outbound_cidrs {
            *cidrs.entry(key(prefix)).or_default() |= Exclusion::OUTBOUND;
        }
        for prefix in &exclusions.inbound_cidrs {
            *cidrs.entry(key(prefix)).or_default() |= Exclusion::INBOUND;
        }
        for ((len, ip), bits) in &cidrs {
            self.excluded_cidrs
                .insert(&Key::new(*len, *ip), bits, 0)
                .map_err(cidrs_error)?;
        }
        let stale: Vec<Key<u32>> = self
            .excluded_cidrs
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(cidrs_error)?
            .into_iter()
            .filter(|k| !cidrs.contains_key(&(k.prefix_len(), k.data())))
            .collect();
        for stale in stale {
            ignore_missing(self.excluded_cidrs.remove(&stale)).map_err(cidrs_error)?;
        }
        Ok(())
    }
}

impl EnrolledPod {
    /// The pod's handle.
    pub fn handle(&self) -> &PodHandle {
        &self.handle
    }

    /// The daemon's listeners in the pod.
    pub fn listeners(&self) -> &PodListeners {
        &self.listeners
    }

    /// The handle and the listeners, to move the listeners into accept loops.
    pub fn into_parts(self) -> (PodHandle, PodListeners) {
        (self.handle, self.listeners)
    }
}

impl PodListeners {
    /// Binds the three listeners in the calling thread's netns.
    fn bind(mark: SocketMark) -> io::Result<Self> {
        Ok(Self {
            outbound: netns::tcp_listener(
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, OUTBOUND_PORT),
                mark,
            )?,
            inbound: netns::tcp_listener(
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, INBOUND_PORT),
                mark,
            )?,
            hbone: netns::tcp_listener(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, HBONE_PORT), mark)?,
        })
    }
}

impl PodHandle {
    /// The pod as enrolled.
    pub fn pod(&self) -> &PodCapture {
        &self.pod
    }

    /// The pod's IP.
    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip
    }

    /// The pod's netns cookie.
    pub fn netns_cookie(&self) -> NetnsCookie {
        self.netns_cookie
    }

    /// Whether the enrolment resumed one of a previous daemon (its links and map
    /// entries were kept; only the listeners are new).
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Runs `f` in the pod's netns (see [`Netns::run`]).
    pub fn run_in_netns<T: Send>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send,
    ) -> Result<T, NetnsError> {
        self.netns.run(f)
    }

    /// A TCP socket in the pod's netns carrying the bypass mark: the daemon's
    /// connections on behalf of the pod leave from such sockets.
    pub fn connect_socket(&self) -> Result<UnconnectedTcp, NetnsError> {
        let mark = self.bypass_mark;
        self.netns.run(move || netns::tcp_socket(mark))
    }

    /// A transparent TCP socket in the pod's netns, bound to `source` (the client's
    /// address) and carrying the delivery mark, to connect to the app with the
    /// client's IP preserved (needs the pod's fwmark routing, not set up yet).
    pub fn delivery_socket(&self, source: SocketAddrV4) -> Result<UnconnectedTcp, NetnsError> {
        let mark = self.delivery_mark;
        self.netns
            .run(move || netns::transparent_tcp_socket(source, mark))
    }
}

/// Removes capture from the node whose capture state is under `state_dir`: detaches
/// and unpins every link (pods first), unpins the maps, unmounts the bpffs and removes
/// the pod records. Works without a running [`Capture`] (e.g. after a crash); only
/// call it with no [`Capture`] of that directory alive.
pub fn uninstall(state_dir: &Path) -> Result<(), CaptureError> {
    let bpffs_dir = state_dir.join(BPFFS_DIR);
    let on_bpffs = bpffs::is_bpffs(&bpffs_dir).map_err(|source| CaptureError::StateDir {
        path: bpffs_dir.clone(),
        source,
    })?;
    if on_bpffs {
        let root = bpffs_dir.join(PIN_ROOT);
        let versions = match fs::read_dir(&root) {
            Ok(dirs) => dirs.filter_map(Result::ok).map(|d| d.path()).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(CaptureError::Unpin { path: root, source }),
        };
        // Links first, pods before the cgroup programs, so that capture stops as a
        // whole before its maps go.
        for version in &versions {
            remove_tree(&version.join("pods"))?;
            remove_tree(&version.join("links"))?;
        }
        remove_tree(&root)?;
        bpffs::unmount(&bpffs_dir)?;
    }
    remove_tree(&state_dir.join(RECORDS_DIR))?;
    tracing::info!(state_dir = %state_dir.display(), "eBPF capture uninstalled");
    Ok(())
}

/// Loads (unless a pinned link of a previous daemon is there) and attaches one cgroup
/// program, pinning its link.
fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    program: CgroupProgram,
    cgroup: &fs::File,
    cgroup_path: &Path,
    layout: &PinLayout,
) -> Result<(), CaptureError> {
    let pin = layout.link(program.pin_name());
    if pin_exists(&pin)? {
        tracing::info!(program = program.name(), pin = %pin.display(), "adopting the pinned link");
        return Ok(());
    }
    let name = program.name();
    let program_error = |source| CaptureError::Program { name, source };
    let attach_error = |source| CaptureError::Attach {
        name,
        target: format!("cgroup {}", cgroup_path.display()),
        source,
    };
    // aya attaches cgroup programs through bpf_link (kernel >= 5.7), which takes no
    // mode flags and always runs beside other programs on the cgroup.
    let link: FdLink = match program {
        CgroupProgram::Connect4 | CgroupProgram::Connect6 => {
            let p: &mut CgroupSockAddr = program_mut(ebpf, name)?;
            p.load().map_err(program_error)?;
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            let link = p.take_link(id).map_err(program_error)?;
            FdLink::try_from(link).map_err(|source| CaptureError::PinnedLink {
                path: pin.clone(),
                source,
            })?
        }
        CgroupProgram::SockOps => {
            let p: &mut SockOps = program_mut(ebpf, name)?;
            p.load().map_err(program_error)?;
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            let link = p.take_link(id).map_err(program_error)?;
            FdLink::try_from(link).map_err(|source| CaptureError::PinnedLink {
                path: pin.clone(),
                source,
            })?
        }
    };
    link.pin(&pin).map_err(|source| CaptureError::Pin {
        name,
        path: pin.clone(),
        source,
    })?;
    tracing::info!(program = name, cgroup = %cgroup_path.display(), "attached and pinned");
    Ok(())
}

/// The program `name` of `ebpf` as a `T`.
fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::MissingProgram { name })?
        .try_into()
        .map_err(|source| CaptureError::Program { name, source })
}

/// Takes the map `name` out of `ebpf` as a `T`, checking its type and sizes.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(CaptureError::MissingMap { name })?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

/// `map[key]`, `None` when absent.
fn lookup<K: aya::Pod, V: aya::Pod>(
    map: &BpfHashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<Option<V>, CaptureError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(CaptureError::Map { name, source }),
    }
}

/// A delete of an absent key is fine.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn pin_exists(path: &Path) -> Result<bool, CaptureError> {
    path.try_exists().map_err(|source| CaptureError::StateDir {
        path: path.to_path_buf(),
        source,
    })
}

/// The ids of the link pinned at `path`, `None` when nothing is pinned there.
fn link_status(path: &Path) -> Result<Option<LinkStatus>, CaptureError> {
    if !pin_exists(path)? {
        return Ok(None);
    }
    let link_error = |source| CaptureError::PinnedLink {
        path: path.to_path_buf(),
        source,
    };
    let link = FdLink::from(PinnedLink::from_pin(path).map_err(link_error)?);
    let info = link.info().map_err(link_error)?;
    Ok(Some(LinkStatus {
        link_id: info.id(),
        program_id: info.program_id(),
    }))
}

/// Removes a pin (detaching a link nobody else holds); absent is fine.
fn unpin(path: &Path) -> Result<(), CaptureError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaptureError::Unpin {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Removes a directory tree (of pins or records); absent is fine.
fn remove_tree(path: &Path) -> Result<(), CaptureError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaptureError::Unpin {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_is_shareable_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Capture>();
        send_sync::<PodHandle>();
        send_sync::<EnrolledPod>();
    }

    #[test]
    fn prefixes_parse_and_clear_host_bits() {
        let p: Ipv4Prefix = "10.96.1.7/12".parse().unwrap();
        assert_eq!(p.to_string(), "10.96.0.0/12");
        assert_eq!("1.2.3.4".parse::<Ipv4Prefix>().unwrap().len(), 32);
        assert_eq!(
            "0.0.0.0/0".parse::<Ipv4Prefix>().unwrap().addr(),
            Ipv4Addr::UNSPECIFIED
        );
        assert!("1.2.3.4/33".parse::<Ipv4Prefix>().is_err());
        assert!("1.2.3/8".parse::<Ipv4Prefix>().is_err());
    }

    /// Without privileges: the embedded object names every capture program and map,
    /// so a rename on one side is caught before the root-only tests run.
    #[test]
    fn embedded_object_has_the_capture_programs_and_maps() {
        let strings: Vec<&[u8]> = ebpf::object().split(|b| *b == 0).collect();
        let programs = [
            CONNECT4_CAPTURE_PROGRAM,
            CONNECT6_CAPTURE_PROGRAM,
            SOCKOPS_CAPTURE_PROGRAM,
            SK_LOOKUP_CAPTURE_PROGRAM,
        ];
        for name in programs.iter().chain(&CAPTURE_MAPS) {
            assert!(
                strings.contains(&name.as_bytes()),
                "{name} not in the object's string tables (built with AYA_BUILD_SKIP?)"
            );
        }
    }

    #[test]
    fn default_marks_differ() {
        assert_ne!(DEFAULT_BYPASS_MARK, DEFAULT_DELIVERY_MARK);
    }
}
