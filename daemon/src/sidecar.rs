//! Sidecar mode (`ambit-node --mode sidecar`): the same capture and proxies, run by a
//! process inside one pod for that pod only, so that ambient and sidecar differ only
//! in where the proxies run.
//!
//! # What differs from ambient mode
//!
//! - **Which pod.** The pod is given by flags (`--pod-name`, `--pod-namespace`,
//!   `--pod-ip`, optional `--pod-uid`; the Kubernetes downward API's `POD_NAME`,
//!   `POD_NAMESPACE`, `POD_IP`, `POD_UID`), not by the CNI plugin: no enrolment
//!   server runs. [`crate::pods::Pods::add_own_pod`] records it as a CNI ADD would;
//!   it is enrolled once the controller's configuration says its Workload is meshed.
//! - **Where capture attaches.** `connect4/6` and `sockops` attach to the pod's own
//!   cgroup (`--pod-cgroup`, default: this process's cgroup — in Kubernetes pass the
//!   pod-level cgroup, the parent of the containers'), `sk_lookup` to the pod's netns
//!   (`--pod-netns`, default `/proc/self/ns/net`), which must be this process's own:
//!   [`resolve`] refuses to start otherwise.
//! - **The sidecar's own sockets.** The process usually runs in the cgroup it
//!   captures, so every socket it opens carries the bypass mark, including its
//!   connections to the controller (`socket_mark` of the subscription and the CA
//!   client); its readiness and metrics ports are excluded from inbound capture when
//!   they listen beyond loopback (as Istio's sidecar does with 15020/15021), so the
//!   kubelet and Prometheus reach them under STRICT mTLS too.
//! - **State.** A state directory per pod (default
//!   `/var/lib/ambit/sidecar/<namespace>_<pod>`) with its own bpffs, so the pins never
//!   collide with a node daemon's or another sidecar's.
//! - **Control plane.** The sidecar subscribes as its node (`--node-name`) and
//!   authenticates with the node's bootstrap token; it serves (and requests a
//!   certificate for) its one pod only. A real deployment would authenticate with the
//!   pod's projected ServiceAccount token and let the controller scope both the
//!   subscription and the CA to that pod's identity (a `Subscriber::Sidecar` kind).
//! - **Readiness** waits, besides the configuration and certificates, for the pod to
//!   be captured with its proxies serving and its certificate issued (blocker `pod`):
//!   start the app only then.
//!
//! Ports inside the pod's netns are the node daemon's (admin 15000, metrics 15020,
//! readiness 15021, and 15001/15006/15008 for capture): each sidecar has its own
//! netns, and the sample app uses 8080/9090/9091.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambit_cni::protocol::PodRef;
use ambit_control_client::CertManager;
use ambit_runtime::readiness::Blocker;
use tokio::sync::watch;

use crate::capture::Exclusions;
use crate::netns::{self, Netns};
use crate::pods::Pods;

/// Default root of the sidecars' state directories (one per pod below it).
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/ambit/sidecar";

/// Where the proxies run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// One daemon per node, in the node's network namespace, serving every enrolled
    /// pod of the node (pods handed over by the `ambit-cni` plugin).
    #[default]
    Ambient,
    /// One process per pod, inside it, serving that pod only.
    Sidecar,
}

/// The pod a sidecar serves (sidecar mode only; every flag also reads the
/// downward-API environment variable).
#[derive(Clone, Debug, clap::Args, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarArgs {
    /// Sidecar mode: the pod's name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// Sidecar mode: the pod's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// Sidecar mode: the pod's UID (finds its Workload unambiguously).
    #[arg(long, env = "POD_UID")]
    pub pod_uid: Option<String>,
    /// Sidecar mode: the pod's IPv4 address.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// Sidecar mode: the pod's network namespace; must be this process's own.
    #[arg(long, env = "AMBIT_POD_NETNS", default_value = "/proc/self/ns/net")]
    pub pod_netns: PathBuf,
    /// Sidecar mode: the pod's cgroup v2 directory, where the connect programs attach
    /// (default: this process's own cgroup).
    #[arg(long, env = "AMBIT_POD_CGROUP")]
    pub pod_cgroup: Option<PathBuf>,
    /// Sidecar mode: more pod ports inbound capture leaves alone (comma-separated),
    /// for another proxy of the pod that does its own mutual TLS, such as the
    /// waypoint's L7 engine in sidecar L7 (Istio's `excludeInboundPorts`).
    #[arg(long, env = "AMBIT_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
}

/// The pod a sidecar serves, resolved and checked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarPod {
    /// Namespace, name and UID.
    pub pod: PodRef,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its network namespace handle.
    pub netns: PathBuf,
    /// Its cgroup directory.
    pub cgroup: PathBuf,
}

/// Why sidecar mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// A required flag is missing.
    #[error("--mode sidecar needs {flag} (or ${env})")]
    Missing {
        /// The flag.
        flag: &'static str,
        /// Its environment variable.
        env: &'static str,
    },
    /// The pod's address is IPv6 (capture is IPv4-only).
    #[error("--pod-ip {ip} is not an IPv4 address (capture is IPv4-only)")]
    NotIpv4 {
        /// The flag's value.
        ip: IpAddr,
    },
    /// The pod's netns could not be opened or read.
    #[error("reading the pod's network namespace {}", path.display())]
    Netns {
        /// The handle.
        path: PathBuf,
        /// What failed.
        #[source]
        source: crate::netns::NetnsError,
    },
    /// This process's own netns could not be read.
    #[error("reading this process's network namespace")]
    OwnNetns(#[source] io::Error),
    /// The process does not run in the pod's netns.
    #[error(
        "the sidecar must run inside the pod's network namespace: --pod-netns {} is \
         another namespace than this process's"
    , path.display())]
    NotInPod {
        /// The pod's netns handle.
        path: PathBuf,
    },
    /// `--pod-cgroup` was not given and this process's cgroup could not be found.
    #[error("finding this process's cgroup (pass --pod-cgroup)")]
    OwnCgroup(#[source] io::Error),
    /// The cgroup is not a directory.
    #[error("--pod-cgroup {} is not a cgroup directory", path.display())]
    NotCgroup {
        /// The path.
        path: PathBuf,
    },
}

/// Checks the sidecar flags: the pod's name, namespace and IPv4 address are given,
/// this process runs in the pod's netns, and the cgroup exists (default: this
/// process's own). Blocks briefly (a thread enters the netns).
pub fn resolve(args: &SidecarArgs) -> Result<SidecarPod, SidecarError> {
    let name = args.pod_name.clone().ok_or(SidecarError::Missing {
        flag: "--pod-name",
        env: "POD_NAME",
    })?;
    let namespace = args.pod_namespace.clone().ok_or(SidecarError::Missing {
        flag: "--pod-namespace",
        env: "POD_NAMESPACE",
    })?;
    let ip = match args.pod_ip.ok_or(SidecarError::Missing {
        flag: "--pod-ip",
        env: "POD_IP",
    })? {
        IpAddr::V4(ip) => ip,
        ip @ IpAddr::V6(_) => return Err(SidecarError::NotIpv4 { ip }),
    };
    let netns_error = |source| SidecarError::Netns {
        path: args.pod_netns.clone(),
        source,
    };
    let pod_cookie = Netns::open(&args.pod_netns)
        .and_then(|n| n.cookie())
        .map_err(netns_error)?;
    if pod_cookie != own_netns_cookie().map_err(SidecarError::OwnNetns)? {
        return Err(SidecarError::NotInPod {
            path: args.pod_netns.clone(),
        });
    }
    let cgroup = match &args.pod_cgroup {
        Some(path) => path.clone(),
        None => own_cgroup().map_err(SidecarError::OwnCgroup)?,
    };
    if !cgroup.join("cgroup.procs").is_file() {
        return Err(SidecarError::NotCgroup { path: cgroup });
    }
    Ok(SidecarPod {
        pod: PodRef {
            namespace,
            name,
            uid: args.pod_uid.clone().filter(|u| !u.is_empty()),
        },
        ip,
        netns: args.pod_netns.clone(),
        cgroup,
    })
}

impl SidecarPod {
    /// The default state directory, `/var/lib/ambit/sidecar/<namespace>_<pod>`.
    pub fn default_state_dir(&self) -> PathBuf {
        Path::new(DEFAULT_STATE_ROOT).join(format!("{}_{}", self.pod.namespace, self.pod.name))
    }
}

/// The sidecar's own listeners that capture must leave alone: the readiness and
/// metrics ports, unless they listen on loopback only (where capture never applies).
pub fn own_port_exclusions(listeners: &[SocketAddr]) -> Exclusions {
    Exclusions {
        inbound_ports: listeners
            .iter()
            .filter(|a| !a.ip().is_loopback())
            .map(SocketAddr::port)
            .collect(),
        ..Exclusions::default()
    }
}

/// The netns cookie of this thread (a socket created here).
fn own_netns_cookie() -> io::Result<crate::netns::NetnsCookie> {
    let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    netns::netns_cookie(&probe)
}

/// This process's cgroup v2 directory: `/proc/self/cgroup`'s `0::` line under the
/// cgroup2 mount.
fn own_cgroup() -> io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("/proc/self/cgroup has no cgroup v2 entry (0::)"))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let mut fields = l.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
        })
        .ok_or_else(|| io::Error::other("no cgroup2 file system in /proc/self/mounts"))?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// Clears `blocker` once the pod is captured, its proxies started and its identity
/// certified; re-checked after every reconcile and certificate change.
pub(crate) async fn serving_blocker(
    pods: Arc<Pods>,
    certs: CertManager,
    mut reconciled: watch::Receiver<u64>,
    ip: Ipv4Addr,
    blocker: Blocker,
) {
    let mut changes = certs.changes();
    let mut warned = false;
    loop {
        if pods.serving(ip) {
            blocker.unblock();
            tracing::info!(%ip, "the pod is captured and served");
            return;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            r = reconciled.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(10)), if !warned => {
                warned = true;
                tracing::warn!(%ip, "the pod is not served yet: is its Workload meshed (dataplane-mode label)?");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> SidecarArgs {
        SidecarArgs {
            pod_name: Some("checkout-0".into()),
            pod_namespace: Some("production".into()),
            pod_uid: None,
            pod_ip: Some("10.244.1.2".parse().unwrap()),
            pod_netns: "/proc/self/ns/net".into(),
            pod_cgroup: None,
            exclude_inbound_ports: Vec::new(),
        }
    }

    #[test]
    fn own_pod_resolves_with_own_netns_and_cgroup() {
        let pod = resolve(&args()).unwrap();
        assert_eq!(pod.pod.to_string(), "production/checkout-0");
        assert_eq!(pod.ip, Ipv4Addr::new(10, 244, 1, 2));
        assert!(pod.cgroup.join("cgroup.procs").is_file(), "{pod:?}");
        assert_eq!(
            pod.default_state_dir(),
            Path::new("/var/lib/ambit/sidecar/production_checkout-0")
        );
    }

    #[test]
    fn bad_sidecar_flags_are_named() {
        let mut a = args();
        a.pod_ip = None;
        assert_eq!(
            resolve(&a).unwrap_err().to_string(),
            "--mode sidecar needs --pod-ip (or $POD_IP)"
        );
        let mut a = args();
        a.pod_ip = Some("fd00::1".parse().unwrap());
        assert!(resolve(&a).unwrap_err().to_string().contains("not an IPv4"));
        let mut a = args();
        a.pod_cgroup = Some("/nonexistent".into());
        assert!(
            resolve(&a)
                .unwrap_err()
                .to_string()
                .contains("/nonexistent is not a cgroup")
        );
        let mut a = args();
        a.pod_netns = "/nonexistent/netns".into();
        assert!(
            resolve(&a)
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/netns")
        );
    }

    /// Needs root (a new network namespace).
    #[test]
    fn a_netns_other_than_the_own_is_refused() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let tid = nix::unistd::gettid();
            ready_tx
                .send(PathBuf::from(format!("/proc/self/task/{tid}/ns/net")))
                .unwrap();
            let _ = done_rx.recv();
        });
        let other = ready_rx.recv().unwrap();
        let mut a = args();
        a.pod_netns = other;
        let err = resolve(&a).unwrap_err().to_string();
        drop(done_tx);
        thread.join().unwrap();
        assert!(
            err.contains("must run inside the pod's network namespace"),
            "{err}"
        );
    }

    #[test]
    fn only_non_loopback_own_ports_are_excluded() {
        let e = own_port_exclusions(&[
            "0.0.0.0:15021".parse().unwrap(),
            "10.244.1.2:15020".parse().unwrap(),
            "127.0.0.1:15000".parse().unwrap(),
        ]);
        assert_eq!(e.inbound_ports, [15020, 15021].into_iter().collect());
        assert!(e.outbound_ports.is_empty() && e.outbound_cidrs.is_empty());
    }
}
