//! Local mode: a directory of Kubernetes YAML, watched for changes.
//!
//! Every `*.yaml` / `*.yml` file directly in the directory (not starting with `.`,
//! symlinks followed) is one origin: its documents are parsed and sent as one
//! [`SourceEvent::Replace`]; after the first full read, [`SourceEvent::Synced`]. Then
//! the directory is re-checked every [`POLL_INTERVAL`]: a file added or changed
//! (including replaced by an atomic rename) is sent again, a removed file is sent
//! with no documents.
//!
//! **Why polling, not inotify**: the requirement is that a change reaches the proxies
//! well within a second; a 100 ms poll of a config directory (a few `stat` calls,
//! files re-read only when their metadata changed) costs next to nothing and cannot
//! miss an event: inotify watchers lose events on queue overflow, must be re-armed
//! when the directory is replaced, and do not see the `..data` symlink swap Kubernetes
//! uses to update mounted ConfigMaps, all of which polling handles by construction. It
//! also needs no dependency and no runtime.
//!
//! Change detection compares (device, inode, size, mtime, ctime) and, when those
//! differ, a hash of the content, so touching a file without changing it sends
//! nothing. A file modified within the last [`RACY_WINDOW`] is re-read on every poll,
//! since a same-size rewrite within the file system's timestamp granularity leaves the
//! metadata unchanged (git's "racily clean" problem). A file whose metadata just
//! changed is read only once it has been left alone for [`SETTLE`], so a writer that
//! truncates and rewrites in place is not caught half-way (tools that rename a
//! complete file into place, like the simulated cluster, are never caught half-way).
//! Worst case from a write to a new generation: one poll plus the settle time.
//!
//! **Fail closed on read errors**: a file that cannot be read (permissions, not UTF-8)
//! is logged and reported as a rejected document of that file; the documents last
//! read from it stay in force, because dropping them could drop an ALLOW or DENY
//! policy and so widen access. Likewise, if the directory itself becomes unreadable
//! the last state is kept (and the problem logged) rather than everything removed.

use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;

use super::{OriginId, SourceEvent};
use crate::{
    diagnostics::{FieldPath, Origin, Rejection},
    resources::{ParsedDocument, RejectedDocument, parse_documents},
};

/// How often the directory is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Files modified more recently than this are re-read on every poll.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);
/// A file whose metadata changed is read once its last modification is at least this
/// old (else at the next poll), so that a writer that truncates and rewrites in place
/// is not caught half-way.
pub const SETTLE: Duration = Duration::from_millis(50);

/// Why the local source could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalSourceError {
    /// The directory does not exist or cannot be listed.
    #[error("config directory {path} cannot be read")]
    Unreadable {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The path is not a directory.
    #[error("config directory {path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The watcher thread could not be started.
    #[error("starting the config directory watcher")]
    Spawn(#[source] io::Error),
}

/// The running local source; dropping it stops the watcher (within one poll).
#[derive(Debug)]
pub struct LocalSource {
    dir: PathBuf,
    // Dropping the sender wakes the watcher thread, which then exits.
    _stop: std_mpsc::Sender<()>,
    _thread: JoinHandle<()>,
}

impl LocalSource {
    /// The directory watched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Reads every `*.yaml` / `*.yml` in `dir` (multi-document; not subdirectories), sends
/// one `Replace` per file then `Synced`, then reacts to files added, changed
/// (including atomic rename-over) and removed (a `Replace` with no documents).
/// Unreadable files are logged and reported as a rejected document, never a crash.
///
/// Runs on a thread of its own; needs no tokio runtime.
pub fn spawn_local_source(
    dir: PathBuf,
    events: mpsc::Sender<SourceEvent>,
) -> Result<LocalSource, LocalSourceError> {
    let meta = std::fs::metadata(&dir).map_err(|source| LocalSourceError::Unreadable {
        path: dir.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(LocalSourceError::NotADirectory { path: dir });
    }
    std::fs::read_dir(&dir).map_err(|source| LocalSourceError::Unreadable {
        path: dir.clone(),
        source,
    })?;
    let (stop_tx, stop_rx) = std_mpsc::channel();
    let mut watcher = Watcher {
        dir: dir.clone(),
        files: BTreeMap::new(),
        events,
        dir_error: None,
    };
    let thread = std::thread::Builder::new()
        .name("ambit-config-dir".to_owned())
        .spawn(move || {
            tracing::info!(dir = %watcher.dir.display(), "watching config directory");
            let mut synced = false;
            loop {
                // The first read takes every file as it is: `Synced` promises all.
                if watcher.scan(!synced).is_err() {
                    break; // the index is gone
                }
                if !synced {
                    if watcher.events.blocking_send(SourceEvent::Synced).is_err() {
                        break;
                    }
                    synced = true;
                }
                match stop_rx.recv_timeout(POLL_INTERVAL) {
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            tracing::debug!(dir = %watcher.dir.display(), "config directory watcher stopped");
        })
        .map_err(LocalSourceError::Spawn)?;
    Ok(LocalSource {
        dir,
        _stop: stop_tx,
        _thread: thread,
    })
}

/// What identifies a version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// How long ago the file was last modified (zero when in the future).
    fn age(&self, now: SystemTime) -> Duration {
        let (secs, nanos) = self.mtime;
        let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
            return Duration::ZERO;
        };
        let mtime = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos.min(999_999_999));
        now.duration_since(mtime).unwrap_or(Duration::ZERO)
    }

    /// Whether the file changed so recently that an equal stamp proves nothing.
    fn is_racy(&self, now: SystemTime) -> bool {
        self.age(now) < RACY_WINDOW
    }
}

/// What is known about one file.
#[derive(Debug)]
struct FileState {
    stamp: Option<Stamp>,
    hash: Option<u64>,
    /// The documents last read successfully.
    documents: Vec<ParsedDocument>,
    /// The read error last reported, if the file cannot be read now.
    error: Option<String>,
}

/// The index has gone away.
#[derive(Debug)]
struct Closed;

#[derive(Debug)]
struct Watcher {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    events: mpsc::Sender<SourceEvent>,
    dir_error: Option<String>,
}

fn is_config_file(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.starts_with('.') && (lower.ends_with(".yaml") || lower.ends_with(".yml"))
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn origin_of(path: &Path) -> OriginId {
    OriginId(path.display().to_string())
}

impl Watcher {
    fn send(&self, event: SourceEvent) -> Result<(), Closed> {
        self.events.blocking_send(event).map_err(|_| Closed)
    }

    /// The config files now in the directory, or `None` when it cannot be listed.
    fn list(&mut self) -> Option<Vec<(PathBuf, std::fs::Metadata)>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                let msg = e.to_string();
                if self.dir_error.as_ref() != Some(&msg) {
                    tracing::error!(dir = %self.dir.display(), error = %msg, "config directory cannot be read: keeping the last configuration read from it");
                    self.dir_error = Some(msg);
                }
                return None;
            }
        };
        if self.dir_error.take().is_some() {
            tracing::info!(dir = %self.dir.display(), "config directory readable again");
        }
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !is_config_file(name) {
                continue;
            }
            let path = entry.path();
            // Follows symlinks (ConfigMap volumes link every file into `..data`).
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => out.push((path, m)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => {
                    // Reported as a read error below.
                    if let Ok(m) = entry.metadata() {
                        out.push((path, m));
                    }
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Some(out)
    }

    fn scan(&mut self, initial: bool) -> Result<(), Closed> {
        let Some(listing) = self.list() else {
            return Ok(());
        };
        let now = SystemTime::now();
        let present: Vec<&PathBuf> = listing.iter().map(|(p, _)| p).collect();
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for path in removed {
            self.files.remove(&path);
            tracing::info!(file = %path.display(), "config file removed");
            self.send(SourceEvent::Replace {
                origin: origin_of(&path),
                documents: Vec::new(),
            })?;
        }
        for (path, meta) in listing {
            let stamp = Stamp::of(&meta);
            let known = self.files.get(&path);
            let unchanged = known.is_some_and(|s| s.stamp == Some(stamp));
            if unchanged && known.is_some_and(|s| s.error.is_none()) && !stamp.is_racy(now) {
                continue;
            }
            if !initial && !unchanged && stamp.age(now) < SETTLE {
                continue; // possibly still being written: next poll
            }
            self.read(&path, stamp)?;
        }
        Ok(())
    }

    fn read(&mut self, path: &Path, stamp: Stamp) -> Result<(), Closed> {
        let label = path.display().to_string();
        let text = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                let hash = fnv1a64(&bytes);
                String::from_utf8(bytes)
                    .map(|t| (t, hash))
                    .map_err(|e| format!("not UTF-8 text ({e})"))
            });
        match text {
            Ok((text, hash)) => {
                let known = self.files.get(path);
                if let Some(state) = known
                    && state.error.is_none()
                    && state.hash == Some(hash)
                {
                    // Same content (touched, or re-checked while racy).
                    if let Some(state) = self.files.get_mut(path) {
                        state.stamp = Some(stamp);
                    }
                    return Ok(());
                }
                let documents = parse_documents(&label, &text);
                tracing::info!(file = %label, documents = documents.len(), "config file read");
                self.files.insert(
                    path.to_owned(),
                    FileState {
                        stamp: Some(stamp),
                        hash: Some(hash),
                        documents: documents.clone(),
                        error: None,
                    },
                );
                self.send(SourceEvent::Replace {
                    origin: origin_of(path),
                    documents,
                })
            }
            Err(error) => {
                let state = self
                    .files
                    .entry(path.to_owned())
                    .or_insert_with(|| FileState {
                        stamp: None,
                        hash: None,
                        documents: Vec::new(),
                        error: None,
                    });
                if state.error.as_ref() == Some(&error) {
                    return Ok(()); // already reported; retried every poll
                }
                tracing::warn!(file = %label, %error, "config file cannot be read: keeping the documents last read from it");
                state.error = Some(error.clone());
                state.stamp = None;
                state.hash = None;
                let mut documents = state.documents.clone();
                documents.push(ParsedDocument::Rejected(RejectedDocument {
                    rejection: Rejection {
                        api_version: None,
                        kind: None,
                        namespace: None,
                        name: None,
                        field: FieldPath::root(),
                        reason: format!(
                            "the file cannot be read: {error} (the documents last read from it stay in force)"
                        ),
                        origin: Some(Origin {
                            source: label,
                            document: 1,
                            line: 1,
                        }),
                    },
                    raw: None,
                }));
                self.send(SourceEvent::Replace {
                    origin: origin_of(path),
                    documents,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_names() {
        assert!(is_config_file("a.yaml"));
        assert!(is_config_file("b.yml"));
        assert!(is_config_file("C.YAML"));
        assert!(!is_config_file(".a.yaml.123.tmp"));
        assert!(!is_config_file(".hidden.yaml"));
        assert!(!is_config_file("a.json"));
        assert!(!is_config_file("a.yaml~"));
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let (tx, _rx) = mpsc::channel(1);
        let err = spawn_local_source(PathBuf::from("/nonexistent/ambit-config"), tx).unwrap_err();
        assert!(matches!(err, LocalSourceError::Unreadable { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ambit-config"));
    }
}
