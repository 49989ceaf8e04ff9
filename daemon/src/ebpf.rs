//! The eBPF programs embedded in the daemon, and typed handles to load and attach them.
//!
//! `build.rs` builds `ebpf/ambit-ebpf` for the BPF target; the object is embedded here
//! and parsed by aya at load time. Loading needs root (`CAP_BPF` + `CAP_NET_ADMIN`)
//! and a kernel with BTF. The probe here pins nothing; the capture programs in the same
//! object are loaded, attached and pinned by [`crate::capture`].

use std::{
    collections::HashMap,
    fs::File,
    io,
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use ambit_ebpf_common::{CONNECT_COUNTS_MAP, CONNECT4_PROGRAM, ConnectKey};
use aya::{
    Ebpf, EbpfError,
    maps::{HashMap as BpfHashMap, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, cgroup_sock_addr::CgroupSockAddrLinkId,
    },
};

/// The object file holding every Ambit eBPF program, as built by `build.rs`.
///
/// Empty when the daemon was built with `AYA_BUILD_SKIP=1`.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit-ebpf"))
}

/// Why an eBPF program could not be loaded, attached or read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The daemon was built without its eBPF programs.
    #[error(
        "the daemon was built without eBPF programs (AYA_BUILD_SKIP was set); rebuild it \
         without AYA_BUILD_SKIP"
    )]
    NotBuilt,
    /// aya could not parse the object or create its maps.
    #[error("loading the eBPF object (maps and BTF)")]
    Object(#[source] EbpfError),
    /// The object has no program of that name (the two crates disagree).
    #[error("the eBPF object has no program {name}")]
    MissingProgram {
        /// Program name looked up.
        name: &'static str,
    },
    /// The object has no map of that name (the two crates disagree).
    #[error("the eBPF object has no map {name}")]
    MissingMap {
        /// Map name looked up.
        name: &'static str,
    },
    /// The program is not of the expected type, or the kernel refused it (the source
    /// carries the verifier log).
    #[error("loading eBPF program {name} into the kernel")]
    LoadProgram {
        /// Program name.
        name: &'static str,
        /// What aya or the kernel reported.
        #[source]
        source: ProgramError,
    },
    /// The cgroup directory could not be opened.
    #[error("opening cgroup {}", path.display())]
    OpenCgroup {
        /// The cgroup v2 directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused to attach the program to the cgroup.
    #[error("attaching eBPF program {name} to cgroup {}", cgroup.display())]
    Attach {
        /// Program name.
        name: &'static str,
        /// The cgroup v2 directory.
        cgroup: PathBuf,
        /// What the kernel reported.
        #[source]
        source: ProgramError,
    },
    /// The program could not be detached.
    #[error("detaching eBPF program {name}")]
    Detach {
        /// Program name.
        name: &'static str,
        /// What the kernel reported.
        #[source]
        source: ProgramError,
    },
    /// A map could not be read.
    #[error("reading eBPF map {name}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What aya or the kernel reported.
        #[source]
        source: MapError,
    },
}

/// The `cgroup/connect4` probe: counts TCP `connect()` calls made by processes in one
/// cgroup v2 subtree, per destination, and lets every one of them through.
///
/// Attached for as long as the value lives: dropping it (or [`ConnectProbe::detach`])
/// detaches the program and frees its maps.
#[derive(Debug)]
pub struct ConnectProbe {
    ebpf: Ebpf,
    link: Option<CgroupSockAddrLinkId>,
    cgroup: PathBuf,
}

impl ConnectProbe {
    /// Loads the probe into the kernel and attaches it to the cgroup v2 directory
    /// `cgroup_dir` (e.g. `/sys/fs/cgroup/unified/ambit`); it then sees the connects of
    /// every process in that cgroup and its descendants. Other programs attached there
    /// keep running (a bpf_link attachment is always multi-attach).
    pub fn load_and_attach(cgroup_dir: &Path) -> Result<Self, ProbeError> {
        let object = object();
        if object.is_empty() {
            return Err(ProbeError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(object).map_err(ProbeError::Object)?;
        if ebpf.map(CONNECT_COUNTS_MAP).is_none() {
            return Err(ProbeError::MissingMap {
                name: CONNECT_COUNTS_MAP,
            });
        }

        let cgroup = File::open(cgroup_dir).map_err(|source| ProbeError::OpenCgroup {
            path: cgroup_dir.to_path_buf(),
            source,
        })?;
        let program = connect4(&mut ebpf)?;
        program.load().map_err(|source| ProbeError::LoadProgram {
            name: CONNECT4_PROGRAM,
            source,
        })?;
        // aya attaches through a bpf_link (kernel >= 5.7), which takes no mode flags
        // (others get EINVAL) and always runs beside other programs on the cgroup.
        let link = program
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(|source| ProbeError::Attach {
                name: CONNECT4_PROGRAM,
                cgroup: cgroup_dir.to_path_buf(),
                source,
            })?;
        tracing::debug!(cgroup = %cgroup_dir.display(), "attached {CONNECT4_PROGRAM}");
        Ok(Self {
            ebpf,
            link: Some(link),
            cgroup: cgroup_dir.to_path_buf(),
        })
    }

    /// The cgroup the probe is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Number of TCP `connect()` calls seen so far, per destination.
    pub fn counts(&self) -> Result<HashMap<SocketAddrV4, u64>, ProbeError> {
        let map_error = |source| ProbeError::Map {
            name: CONNECT_COUNTS_MAP,
            source,
        };
        let map = self
            .ebpf
            .map(CONNECT_COUNTS_MAP)
            .ok_or(ProbeError::MissingMap {
                name: CONNECT_COUNTS_MAP,
            })?;
        let map = BpfHashMap::<_, ConnectKey, u64>::try_from(map).map_err(map_error)?;
        map.iter()
            .map(|entry| {
                entry
                    .map(|(key, count)| (key.addr(), count))
                    .map_err(map_error)
            })
            .collect()
    }

    /// Detaches the probe now, reporting failure (dropping it detaches silently).
    pub fn detach(mut self) -> Result<(), ProbeError> {
        if let Some(link) = self.link.take() {
            connect4(&mut self.ebpf)?
                .detach(link)
                .map_err(|source| ProbeError::Detach {
                    name: CONNECT4_PROGRAM,
                    source,
                })?;
        }
        Ok(())
    }
}

fn connect4(ebpf: &mut Ebpf) -> Result<&mut CgroupSockAddr, ProbeError> {
    ebpf.program_mut(CONNECT4_PROGRAM)
        .ok_or(ProbeError::MissingProgram {
            name: CONNECT4_PROGRAM,
        })?
        .try_into()
        .map_err(|source| ProbeError::LoadProgram {
            name: CONNECT4_PROGRAM,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks without privileges what the root-only integration test would otherwise be
    /// first to notice: the embedded object is a BPF ELF naming the program and the map.
    #[test]
    fn embedded_object_is_bpf_elf_with_the_shared_names() {
        let object = object();
        assert!(
            object.starts_with(b"\x7fELF"),
            "not an ELF object (built with AYA_BUILD_SKIP?)"
        );
        const EM_BPF: u16 = 247;
        let e_machine = u16::from_le_bytes([object[18], object[19]]);
        assert_eq!(e_machine, EM_BPF);
        let strings: Vec<&[u8]> = object.split(|b| *b == 0).collect();
        for name in [CONNECT4_PROGRAM, CONNECT_COUNTS_MAP] {
            assert!(
                strings.contains(&name.as_bytes()),
                "{name} not in the object's string tables"
            );
        }
    }
}
