//! cgroup v2 directories: create, kill everything inside, remove bottom-up.

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::Error;

/// The cgroup v2 mount point: the first `cgroup2` entry of `/proc/mounts`
/// (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on unified ones).
pub fn cgroup2_mount() -> Result<PathBuf, Error> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| Error::Io {
        op: "reading",
        path: "/proc/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
        })
        .next()
        .ok_or(Error::NoCgroup2)
}

/// `/proc/mounts` escapes blanks as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Creates the cgroup `path`; an existing one is kept.
pub(crate) fn create(path: &Path) -> Result<(), Error> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(Error::Io {
            op: "creating cgroup",
            path: path.to_owned(),
            source,
        }),
    }
}

/// The path of `path` relative to the cgroup2 root, as `/proc/<pid>/cgroup` shows it
/// (`/ambit-x/node-1/pods/…`).
pub(crate) fn relative(mount: &Path, path: &Path) -> String {
    match path.strip_prefix(mount) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => path.display().to_string(),
    }
}

/// SIGKILLs every process in the subtree (`cgroup.kill`) and waits until it is empty.
pub(crate) fn kill_all(root: &Path, timeout: Duration) -> Result<(), Error> {
    if !root.exists() {
        return Ok(());
    }
    let kill = root.join("cgroup.kill");
    if kill.exists() {
        std::fs::write(&kill, "1").map_err(|source| Error::Io {
            op: "writing",
            path: kill,
            source,
        })?;
    } else {
        // Kernels before 5.14 lack cgroup.kill: signal each member instead.
        for pid in pids_in_tree(root) {
            crate::process::kill(pid);
        }
    }
    let deadline = Instant::now() + timeout;
    while populated(root) {
        if Instant::now() >= deadline {
            return Err(Error::StillPopulated {
                path: root.to_owned(),
                pids: pids_in_tree(root),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Whether any live process is in the subtree (`populated 1` in `cgroup.events`).
fn populated(root: &Path) -> bool {
    match std::fs::read_to_string(root.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l == "populated 1"),
        Err(_) => !pids_in_tree(root).is_empty(),
    }
}

/// Process ids of all members of the subtree.
pub(crate) fn pids_in_tree(root: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        dirs.extend(subdirs(&dir));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    // `control` is removed last: its presence marks a directory as a cluster root
    // for the leftover scan until the very end.
    v.sort_by_key(|p| (p.file_name().is_some_and(|n| n == "control"), p.clone()));
    v
}

/// Removes the cgroup and its descendants, deepest first. The subtree must be empty
/// of processes ([`kill_all`]); a busy directory is retried until `timeout`.
pub(crate) fn remove_tree(root: &Path, timeout: Duration) -> Result<(), Error> {
    if !root.exists() {
        return Ok(());
    }
    for child in subdirs(root) {
        remove_tree(&child, timeout)?;
    }
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::remove_dir(root) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            // EBUSY while the last killed task is still exiting.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(Error::Io {
                    op: "removing cgroup",
                    path: root.to_owned(),
                    source,
                });
            }
        }
    }
}
