//! Where the capture's pins live inside its bpffs, and its pod records outside it.
//!
//! ```text
//! <state dir>/
//!   bpf/                         a bpffs instance of its own
//!     ambit/v<LAYOUT_VERSION>/
//!       maps/<MAP>               every capture map (ambit_ebpf_common::CAPTURE_MAPS)
//!       links/connect4           cgroup/connect4 on the pods cgroup
//!       links/connect6           cgroup/connect6 on the pods cgroup
//!       links/sockops            sockops on the pods cgroup
//!       pods/<a>_<b>_<c>_<d>     sk_lookup link in the netns of the pod a.b.c.d
//!   pods/<pod ip>.json           what the daemon needs to resume a pod (PodRecord)
//! ```
//!
//! The version in the path is the map layout's: a daemon with another layout never
//! adopts these maps.

use std::{
    io,
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use ambit_ebpf_common::LAYOUT_VERSION;

/// The bpffs mount point inside the state directory.
pub(super) const BPFFS_DIR: &str = "bpf";
/// Pod records inside the state directory.
pub(super) const RECORDS_DIR: &str = "pods";
/// Everything of Ambit's inside the bpffs (all layout versions).
pub(super) const PIN_ROOT: &str = "ambit";

/// The pin paths of one layout version.
#[derive(Clone, Debug)]
pub(super) struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout under the bpffs mounted at `bpffs`.
    pub(super) fn new(bpffs: &Path) -> Self {
        Self {
            root: bpffs.join(PIN_ROOT).join(format!("v{LAYOUT_VERSION}")),
        }
    }

    /// Creates the directories.
    pub(super) fn create(&self) -> io::Result<()> {
        for dir in [self.maps_dir(), self.links_dir(), self.pods_dir()] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Ok(())
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub(super) fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub(super) fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub(super) fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }

    pub(super) fn pods_dir(&self) -> PathBuf {
        self.root.join("pods")
    }

    /// The pin of the sk_lookup link in the netns of the pod at `ip`. Underscores,
    /// not dots: bpffs refuses names with dots (EPERM, "reserved for future use").
    pub(super) fn pod_link(&self, ip: Ipv4Addr) -> PathBuf {
        let [a, b, c, d] = ip.octets();
        self.pods_dir().join(format!("{a}_{b}_{c}_{d}"))
    }
}
