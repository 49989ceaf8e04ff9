//! The bpffs instance holding the capture's pins.
//!
//! Every bpffs mount is a separate instance with its own pins, so the daemon mounts
//! one at a fixed path under its state directory and finds the same instance (and the
//! same pins) again after a restart, as long as the mount stays.

use std::{fs, io, os::unix::fs::DirBuilderExt as _, path::Path};

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags, mount, umount2},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

use super::CaptureError;

/// Mounts a bpffs at `path` unless one is there already; `Ok(true)` when it mounted
/// one.
pub(super) fn ensure_mounted(path: &Path) -> Result<bool, CaptureError> {
    let dir_error = |source| CaptureError::StateDir {
        path: path.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(dir_error)?;
    if is_bpffs(path).map_err(dir_error)? {
        return Ok(false);
    }
    mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|errno| CaptureError::MountBpffs {
        path: path.to_path_buf(),
        source: errno.into(),
    })?;
    tracing::info!(path = %path.display(), "mounted bpffs for the capture pins");
    Ok(true)
}

/// Whether `path` lies on a bpffs; `Ok(false)` when it does not exist.
pub(super) fn is_bpffs(path: &Path) -> io::Result<bool> {
    match statfs(path) {
        Ok(fs) => Ok(fs.filesystem_type() == BPF_FS_MAGIC),
        Err(Errno::ENOENT) => Ok(false),
        Err(errno) => Err(errno.into()),
    }
}

/// Unmounts the bpffs mounted at `path` (dropping every pin in it) and removes the
/// directory. A `path` that is not a mount point of its own (a directory inside a
/// bpffs mounted elsewhere) is left mounted.
pub(super) fn unmount(path: &Path) -> Result<(), CaptureError> {
    let unmount_error = |source: io::Error| CaptureError::UnmountBpffs {
        path: path.to_path_buf(),
        source,
    };
    while is_bpffs(path).map_err(unmount_error)? {
        match umount2(path, MntFlags::empty()) {
            Ok(()) => {}
            // Not a mount point: a directory of a bpffs mounted above it.
            Err(Errno::EINVAL) => break,
            // Someone holds it open (a shell in it): detach it lazily.
            Err(Errno::EBUSY) => {
                umount2(path, MntFlags::MNT_DETACH).map_err(|errno| unmount_error(errno.into()))?
            }
            Err(errno) => return Err(unmount_error(errno.into())),
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(unmount_error(e)),
    }
}
