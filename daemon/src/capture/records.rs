//! Pod records: one small JSON file per enrolled pod beside the bpffs, so that a
//! restarted daemon knows which network namespaces to re-create its listeners in.

use std::{
    fs, io,
    net::Ipv4Addr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use super::{CaptureError, PodCapture};
use crate::netns::NetnsCookie;

/// What is kept of an enrolled pod.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodRecord {
    /// The pod as it was enrolled.
    pub(super) pod: PodCapture,
    /// Its netns cookie at enrolment: a netns at the same path with another cookie
    /// is another pod's.
    pub(super) netns_cookie: NetnsCookie,
}

fn path(dir: &Path, ip: Ipv4Addr) -> PathBuf {
    dir.join(format!("{ip}.json"))
}

/// Writes the record atomically (temporary file, then rename).
pub(super) fn write(dir: &Path, record: &PodRecord) -> Result<(), CaptureError> {
    let target = path(dir, record.pod.ip);
    let io_error = |source| CaptureError::Record {
        path: target.clone(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error)?;
    let json = serde_json::to_vec_pretty(record).map_err(|source| CaptureError::RecordFormat {
        path: target.clone(),
        source,
    })?;
    let tmp = target.with_extension("json.tmp");
    fs::write(&tmp, json).map_err(io_error)?;
    fs::rename(&tmp, &target).map_err(io_error)
}

/// Removes the record of the pod at `ip`, if any.
pub(super) fn remove(dir: &Path, ip: Ipv4Addr) -> Result<(), CaptureError> {
    let target = path(dir, ip);
    match fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaptureError::Record {
            path: target,
            source,
        }),
    }
}

/// Every record, ordered by pod IP; none when the directory does not exist.
pub(super) fn read_all(dir: &Path) -> Result<Vec<PodRecord>, CaptureError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CaptureError::Record {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut records = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CaptureError::Record {
            path: dir.to_path_buf(),
            source,
        })?;
        let file = entry.path();
        if file.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let text = fs::read(&file).map_err(|source| CaptureError::Record {
            path: file.clone(),
            source,
        })?;
        let record: PodRecord =
            serde_json::from_slice(&text).map_err(|source| CaptureError::RecordFormat {
                path: file.clone(),
                source,
            })?;
        records.push(record);
    }
    records.sort_by_key(|r| r.pod.ip);
    Ok(records)
}
