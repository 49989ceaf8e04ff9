//! The last-known-good config on disk.
//!
//! File layout (all integers little-endian):
//!
//! | bytes | content |
//! |---|---|
//! | 8 | magic `AMBITCFG` |
//! | 4 | format version, `u32` (currently 1) |
//! | 8 | payload length `n`, `u64` |
//! | n | payload: a protobuf [`PersistedState`] (below), whose `resources` are the wire `ambit.config.v1.Resource` messages unchanged |
//! | 8 | FNV-1a 64 of the payload, `u64` |
//!
//! `PersistedState` fields: `1 subscriber` (`node/<name>` or
//! `waypoint/<ns>/<name>`: a file written for another subscriber is not used),
//! `2 resources` (repeated), `3 last_acked_version`, `4 controller_id`,
//! `5 generated_at`, `6 saved_at`, `7 proxy_version`. Protobuf keeps the payload
//! readable by later builds (new fields are skipped); an incompatible change bumps
//! the format version. The checksum catches a torn or bit-rotted file that protobuf
//! would otherwise decode into a silently smaller state.
//!
//! Written with [`crate::fsutil::write_atomic`] (temporary file, fsync, rename, mode
//! 0600), so a crash leaves the previous file or the new one.

use std::path::{Path, PathBuf};

use ambit_api::config::v1::Resource;
use prost::Message as _;

use super::state::Rejection;

/// The file's first bytes.
pub(crate) const MAGIC: &[u8; 8] = b"AMBITCFG";
/// The format this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;

const HEADER_LEN: usize = 8 + 4 + 8;
const TRAILER_LEN: usize = 8;
const RESOURCES_TAG: u32 = 2;

/// The payload of a state file.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct PersistedState {
    /// `node/<name>` or `waypoint/<namespace>/<name>`.
    #[prost(string, tag = "1")]
    pub subscriber: String,
    /// Every resource held, as received.
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<Resource>,
    /// `ConfigUpdate.version` the state was ACKed at (informational on resume).
    #[prost(uint64, tag = "3")]
    pub last_acked_version: u64,
    /// The controller replica that sent the last update.
    #[prost(string, tag = "4")]
    pub controller_id: String,
    /// When the controller produced the last update.
    #[prost(message, optional, tag = "5")]
    pub generated_at: Option<prost_types::Timestamp>,
    /// When this file was written.
    #[prost(message, optional, tag = "6")]
    pub saved_at: Option<prost_types::Timestamp>,
    /// The build that wrote it.
    #[prost(string, tag = "7")]
    pub proxy_version: String,
}

/// A state file exists but cannot be used. The proxy logs it and starts empty.
#[derive(Debug, thiserror::Error)]
pub enum LoadStateError {
    /// The file could not be read.
    #[error("reading the config state file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the magic bytes.
    #[error("{} is not an Ambit config state file (no AMBITCFG header)", path.display())]
    NotAStateFile {
        /// The file.
        path: PathBuf,
    },
    /// Written by a build with another format.
    #[error(
        "config state file {} has format version {found}; this build reads version {FORMAT_VERSION}",
        path.display()
    )]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// Shorter or longer than its header says, or the checksum does not match.
    #[error("config state file {} is corrupt: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What does not add up.
        detail: String,
    },
    /// The payload is not a valid `PersistedState`.
    #[error("decoding the config state file {}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// prost's reason.
        #[source]
        source: prost::DecodeError,
    },
    /// The file belongs to another node or waypoint.
    #[error(
        "config state file {} holds the config of {found}, not of {expected}",
        path.display()
    )]
    OtherSubscriber {
        /// The file.
        path: PathBuf,
        /// The subscriber it was written for.
        found: String,
        /// This subscriber.
        expected: String,
    },
    /// The state does not pass this build's checks or the proxy's validator.
    #[error("config state file {} holds a config this proxy rejects", path.display())]
    Rejected {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Rejection,
    },
}

/// Writing the state file failed (the proxy keeps running on the applied state).
#[derive(Debug, thiserror::Error)]
#[error("writing the config state file {}", path.display())]
pub struct SaveStateError {
    /// The file.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

/// Frames `state` with the resources appended as field 2 (encoding them straight
/// from the shared values avoids copying every resource; protobuf concatenates
/// repeated fields in any order).
pub(crate) fn encode<'a>(
    state: &PersistedState,
    resources: impl IntoIterator<Item = &'a Resource>,
) -> Vec<u8> {
    let mut payload = state.encode_to_vec();
    for resource in resources {
        prost::encoding::message::encode(RESOURCES_TAG, resource, &mut payload);
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
    out
}

/// Parses a state file's bytes.
pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<PersistedState, LoadStateError> {
    let corrupt = |detail: String| LoadStateError::Corrupt {
        path: path.to_path_buf(),
        detail,
    };
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(LoadStateError::NotAStateFile {
            path: path.to_path_buf(),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "{} bytes, shorter than the header",
            bytes.len()
        )));
    }
    let found = u32::from_le_bytes(le_bytes(&bytes[8..12]));
    if found != FORMAT_VERSION {
        return Err(LoadStateError::UnsupportedFormat {
            path: path.to_path_buf(),
            found,
        });
    }
    let declared = u64::from_le_bytes(le_bytes(&bytes[12..20]));
    let body = &bytes[HEADER_LEN..];
    let expected_len = usize::try_from(declared)
        .ok()
        .and_then(|n| n.checked_add(TRAILER_LEN));
    if expected_len != Some(body.len()) {
        return Err(corrupt(format!(
            "the header announces a {declared}-byte payload but {} bytes follow (truncated?)",
            body.len().saturating_sub(TRAILER_LEN)
        )));
    }
    let (payload, trailer) = body.split_at(body.len() - TRAILER_LEN);
    let stored = u64::from_le_bytes(le_bytes(trailer));
    let actual = fnv1a64(payload);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:016x}, computed {actual:016x})"
        )));
    }
    PersistedState::decode(payload).map_err(|source| LoadStateError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the state file: `Ok(None)` when there is none.
pub(crate) fn load(path: &Path) -> Result<Option<PersistedState>, LoadStateError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoadStateError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the state file atomically (mode 0600), creating its directory if needed.
pub(crate) fn save(path: &Path, bytes: &[u8]) -> Result<(), SaveStateError> {
    let err = |source| SaveStateError {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    crate::fsutil::write_atomic(path, bytes, 0o600).map_err(err)
}

fn le_bytes<const N: usize>(slice: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&slice[..N]);
    out
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |hash, b| (hash ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use ambit_api::config::v1::{Service, resource::Kind};

    use super::*;

    fn sample() -> (PersistedState, Vec<Resource>) {
        let header = PersistedState {
            subscriber: "node/node-a".into(),
            last_acked_version: 7,
            controller_id: "ctl-0".into(),
            proxy_version: "0.1.0".into(),
            ..Default::default()
        };
        let resources = vec![
            Resource::new(Kind::Service(Service {
                namespace: "production".into(),
                name: "payment".into(),
                ..Default::default()
            })),
            Resource::new(Kind::Service(Service {
                namespace: "production".into(),
                name: "orders".into(),
                ..Default::default()
            })),
        ];
        (header, resources)
    }

    #[test]
    fn round_trips_with_the_resources_appended() {
        let (header, resources) = sample();
        let bytes = encode(&header, &resources);
        assert_eq!(&bytes[..8], MAGIC);
        let back = decode(Path::new("x"), &bytes).unwrap();
        assert_eq!(back.resources, resources);
        assert_eq!(back.subscriber, "node/node-a");
        assert_eq!(back.last_acked_version, 7);
    }

    #[test]
    fn damage_is_detected_and_named() {
        let (header, resources) = sample();
        let bytes = encode(&header, &resources);
        let path = Path::new("/var/lib/ambit/config.state");

        let err = decode(path, b"{\"json\": true}").unwrap_err();
        assert!(matches!(err, LoadStateError::NotAStateFile { .. }), "{err}");

        let err = decode(path, &bytes[..bytes.len() - 20]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");

        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        let err = decode(path, &flipped).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");

        let mut future = bytes.clone();
        future[8] = 9;
        let err = decode(path, &future).unwrap_err();
        assert!(
            matches!(err, LoadStateError::UnsupportedFormat { found: 9, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");

        assert!(matches!(
            decode(path, &bytes[..10]).unwrap_err(),
            LoadStateError::Corrupt { .. }
        ));
    }
}
