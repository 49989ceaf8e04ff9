//! Every pod the CNI plugin added on this node, meshed or not: what the daemon needs
//! to enrol a pod that joins the mesh after it started (its namespace gets the
//! ambient label later), also after a daemon restart. One small JSON file per pod,
//! `<state dir>/node-pods/<pod ip>.json`, written atomically; a DEL removes it.

use std::{
    collections::BTreeMap,
    fs, io,
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use ambit_cni::protocol::{ContainerId, PodRef};

use crate::netns::NetnsCookie;

/// Where the records live inside the state directory.
pub(crate) const DIR: &str = "node-pods";

/// A pod running on this node, as its CNI ADD reported it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NodePod {
    /// Namespace, name and (when the runtime passed it) uid.
    pub(crate) pod: PodRef,
    /// The sandbox added (unknown for pods a daemon without these records enrolled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) container_id: Option<ContainerId>,
    /// Its network namespace handle.
    pub(crate) netns: PathBuf,
    /// The cookie of that namespace at ADD: a namespace at the same path with another
    /// cookie is another pod's, never enrolled in this one's name.
    pub(crate) netns_cookie: NetnsCookie,
    /// Its IPv4 address.
    pub(crate) ip: Ipv4Addr,
}

/// The node's pods by IP, mirrored on disk.
#[derive(Debug)]
pub(crate) struct NodePods {
    dir: PathBuf,
    pods: BTreeMap<Ipv4Addr, NodePod>,
}

/// A record could not be written, read or removed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// File-system trouble.
    #[error("node pod record {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Not JSON of the expected shape.
    #[error("node pod record {} is malformed", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
}

impl NodePod {
    /// `namespace/name`.
    pub(crate) fn name(&self) -> String {
        self.pod.to_string()
    }
}

impl NodePods {
    /// No pods; records go to `dir`.
    pub(crate) fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            pods: BTreeMap::new(),
        }
    }

    /// Reads the records in the directory (none when it does not exist). A malformed
    /// record is removed and reported, the others are kept.
    pub(crate) fn load(&mut self) -> Result<Vec<RecordError>, RecordError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(RecordError::Io {
                    path: self.dir.clone(),
                    source,
                });
            }
        };
        let mut problems = Vec::new();
        for entry in entries {
            let file = entry
                .map_err(|source| RecordError::Io {
                    path: self.dir.clone(),
                    source,
                })?
                .path();
            if file.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            let text = fs::read(&file).map_err(|source| RecordError::Io {
                path: file.clone(),
                source,
            })?;
            match serde_json::from_slice::<NodePod>(&text) {
                Ok(pod) => {
                    self.pods.insert(pod.ip, pod);
                }
                Err(source) => {
                    let _ = fs::remove_file(&file);
                    problems.push(RecordError::Format { path: file, source });
                }
            }
        }
        Ok(problems)
    }

    /// The pod at `ip`.
    pub(crate) fn get(&self, ip: Ipv4Addr) -> Option<&NodePod> {
        self.pods.get(&ip)
    }

    /// Every pod, by IP.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &NodePod> {
        self.pods.values()
    }

    /// Adds or replaces the pod at its IP; kept in memory even when the record cannot
    /// be written (then it is lost at a restart), which the error reports.
    pub(crate) fn insert(&mut self, pod: NodePod) -> Result<(), RecordError> {
        let written = write(&self.dir, &pod);
        self.pods.insert(pod.ip, pod);
        written
    }

    /// Removes the pod at `ip` and its record.
    pub(crate) fn remove(&mut self, ip: Ipv4Addr) -> Result<Option<NodePod>, RecordError> {
        let removed = self.pods.remove(&ip);
        let path = path(&self.dir, ip);
        match fs::remove_file(&path) {
            Ok(()) => Ok(removed),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(removed),
            Err(source) => Err(RecordError::Io { path, source }),
        }
    }
}

fn path(dir: &Path, ip: Ipv4Addr) -> PathBuf {
    dir.join(format!("{ip}.json"))
}

/// Writes the record atomically (temporary file, then rename).
fn write(dir: &Path, pod: &NodePod) -> Result<(), RecordError> {
    let target = path(dir, pod.ip);
    let io_error = |source| RecordError::Io {
        path: target.clone(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error)?;
    let json = serde_json::to_vec_pretty(pod).map_err(|source| RecordError::Format {
        path: target.clone(),
        source,
    })?;
    let tmp = target.with_extension("json.tmp");
    fs::write(&tmp, json).map_err(io_error)?;
    fs::rename(&tmp, &target).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ip: &str, name: &str) -> NodePod {
        NodePod {
            pod: PodRef {
                namespace: "legacy".into(),
                name: name.into(),
                uid: Some(format!("uid-{name}")),
            },
            container_id: Some(ContainerId::try_from(format!("c-{name}")).unwrap()),
            netns: format!("/run/netns/{name}").into(),
            netns_cookie: NetnsCookie(7),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn records_survive_a_reload_and_removal_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join(DIR);
        let mut pods = NodePods::new(&records);
        pods.insert(pod("10.244.1.5", "a")).unwrap();
        pods.insert(pod("10.244.1.6", "b")).unwrap();
        pods.remove("10.244.1.5".parse().unwrap()).unwrap();
        // Unknown IPs are fine.
        assert!(
            pods.remove("10.244.1.9".parse().unwrap())
                .unwrap()
                .is_none()
        );

        let mut reloaded = NodePods::new(&records);
        assert!(reloaded.load().unwrap().is_empty());
        let all: Vec<&NodePod> = reloaded.iter().collect();
        assert_eq!(all, [&pod("10.244.1.6", "b")]);
        assert_eq!(all[0].name(), "legacy/b");
    }

    #[test]
    fn a_malformed_record_is_reported_and_dropped_the_others_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut pods = NodePods::new(dir.path());
        pods.insert(pod("10.244.1.6", "b")).unwrap();
        fs::write(dir.path().join("10.244.1.7.json"), "{not json").unwrap();

        let mut reloaded = NodePods::new(dir.path());
        let problems = reloaded.load().unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].to_string().contains("10.244.1.7.json"),
            "{}",
            problems[0]
        );
        assert!(!dir.path().join("10.244.1.7.json").exists());
        assert!(reloaded.get("10.244.1.6".parse().unwrap()).is_some());
    }

    #[test]
    fn a_missing_directory_means_no_pods() {
        let dir = tempfile::tempdir().unwrap();
        let mut pods = NodePods::new(dir.path().join("absent"));
        assert!(pods.load().unwrap().is_empty());
        assert_eq!(pods.iter().count(), 0);
    }
}
