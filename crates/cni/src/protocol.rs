//! The enrolment protocol between the CNI plugin and the node daemon.
//!
//! # Wire format
//!
//! One request per connection on the daemon's Unix stream socket: the plugin connects,
//! writes one JSON object on one line (terminated by `\n`), and reads one JSON object
//! on one line back; then both sides close. Compact JSON never contains a raw newline,
//! so the newline is an unambiguous frame end. A message is at most
//! [`MAX_MESSAGE_LEN`] bytes, newline included.
//!
//! ```text
//! → {"version":1,"command":"add","pod":{"namespace":"shop","name":"checkout-0",
//!    "uid":"6a0…","containerId":"3f9…","netns":"/run/netns/cni-1234","ips":["10.244.1.2"]}}
//! ← {"version":1,"status":"enrolled"}
//! ```
//!
//! `command` is `add` (pod: [`PodEnrollment`]), `del` (pod: [`PodRemoval`]) or `check`
//! (pod: [`PodEnrollment`]). `status` is `enrolled`, `not-meshed`, `removed` or
//! `error`, with a `message` for people (always set on `error`).
//!
//! # Versioning
//!
//! Both messages carry `version` ([`PROTOCOL_VERSION`]). A daemon receiving another
//! version answers `error` (with its own version and a message naming both), so a
//! plugin and a daemon of different releases fail loudly rather than misread each
//! other; a new version is only needed for changes an old peer would misread (new
//! optional fields are not).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest message either side sends or accepts, newline included.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// A request from the plugin to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// What to do, for which pod.
    #[serde(flatten)]
    pub command: Command,
}

/// What the plugin asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", content = "pod", rename_all = "kebab-case")]
pub enum Command {
    /// CNI ADD: capture this pod (if it is meshed); answer once capture is ready.
    Add(PodEnrollment),
    /// CNI DEL: stop capturing this pod and forget it (idempotent).
    Del(PodRemoval),
    /// CNI CHECK: is this pod captured as it should be?
    Check(PodEnrollment),
}

/// A pod being added (or checked): who it is and where its network is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEnrollment {
    /// The Kubernetes pod.
    #[serde(flatten)]
    pub pod: PodRef,
    /// The sandbox's container id (`CNI_CONTAINERID`).
    pub container_id: ContainerId,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// The pod's addresses, from the primary plugin's result (in-sandbox interfaces).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// A pod being deleted. The netns may already be gone, and the runtime may not have
/// the primary plugin's result any more, so both are optional.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRemoval {
    /// The Kubernetes pod.
    #[serde(flatten)]
    pub pod: PodRef,
    /// The sandbox's container id (`CNI_CONTAINERID`).
    pub container_id: ContainerId,
    /// Path of the pod's network namespace, when the runtime still passes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The pod's addresses, when the runtime passed the cached result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// A Kubernetes pod, from the runtime's `CNI_ARGS`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it (containerd and CRI-O do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// A CNI container id: starts with an ASCII letter or digit, then letters, digits,
/// `_`, `.` and `-` (CNI spec, `CNI_CONTAINERID`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

/// The id is not one the CNI spec allows.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid container id {0:?}: expected an ASCII letter or digit followed by letters, \
     digits, '_', '.' or '-'"
)]
pub struct InvalidContainerId(pub String);

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// [`PROTOCOL_VERSION`] of the daemon.
    pub version: u32,
    /// The outcome.
    pub status: Status,
    /// For people: why, or what failed. Always set with [`Status::Error`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The outcome of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// ADD: the pod is captured, its daemon listeners are up. CHECK: it is captured.
    Enrolled,
    /// ADD or CHECK: the pod is not part of the mesh; nothing to do.
    NotMeshed,
    /// DEL: nothing of the pod is captured any more (also when nothing was).
    Removed,
    /// The request failed; see the message. For ADD the pod must not start.
    Error,
}

/// A message that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_MESSAGE_LEN`].
    #[error("message longer than {MAX_MESSAGE_LEN} bytes")]
    TooLong,
    /// Not JSON at all.
    #[error("message is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// JSON, but without a numeric `version`.
    #[error("message has no numeric \"version\" field")]
    NoVersion,
    /// Another protocol version.
    #[error("protocol version {got} is not supported (this side speaks {PROTOCOL_VERSION})")]
    Version {
        /// The version the peer sent.
        got: u64,
    },
    /// The right version, but not the expected fields.
    #[error("malformed message")]
    Shape(#[source] serde_json::Error),
}

/// A message that could not be written (a path that is not UTF-8).
#[derive(Debug, thiserror::Error)]
#[error("encoding the message as JSON")]
pub struct EncodeError(#[source] serde_json::Error);

impl Request {
    /// A request of this crate's protocol version.
    pub fn new(command: Command) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            command,
        }
    }

    /// One line: compact JSON and `\n`.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode(self)
    }

    /// Reads a request line (with or without its `\n`), checking the version first so
    /// that a peer of another version gets a message saying so.
    pub fn decode(line: &[u8]) -> Result<Self, DecodeError> {
        decode(line)
    }
}

impl Command {
    /// `add`, `del` or `check`, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Add(_) => "add",
            Self::Del(_) => "del",
            Self::Check(_) => "check",
        }
    }

    /// The pod the command is about.
    pub fn pod(&self) -> &PodRef {
        match self {
            Self::Add(p) | Self::Check(p) => &p.pod,
            Self::Del(p) => &p.pod,
        }
    }
}

impl PodEnrollment {
    /// The pod's first IPv4 address (capture is IPv4-only for now).
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        first_ipv4(&self.ips)
    }
}

impl PodRemoval {
    /// The pod's first IPv4 address, when known.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        first_ipv4(&self.ips)
    }
}

impl fmt::Display for PodRef {
    /// `namespace/name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ContainerId {
    /// The id as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ContainerId {
    type Error = InvalidContainerId;

    fn try_from(id: String) -> Result<Self, Self::Error> {
        let mut chars = id.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if valid {
            Ok(Self(id))
        } else {
            Err(InvalidContainerId(id))
        }
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> Self {
        id.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Response {
    /// A response of this crate's protocol version.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            status,
            message: message.into(),
        }
    }

    /// [`Status::Error`] with `message`.
    pub fn error(message: impl Into<String>) -> Self {
        Self::new(Status::Error, message)
    }

    /// One line: compact JSON and `\n`.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        encode(self)
    }

    /// Reads a response line (with or without its `\n`).
    pub fn decode(line: &[u8]) -> Result<Self, DecodeError> {
        decode(line)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enrolled => "enrolled",
            Self::NotMeshed => "not-meshed",
            Self::Removed => "removed",
            Self::Error => "error",
        })
    }
}

fn first_ipv4(ips: &[IpAddr]) -> Option<Ipv4Addr> {
    ips.iter().find_map(|ip| match ip {
        IpAddr::V4(ip) => Some(*ip),
        IpAddr::V6(_) => None,
    })
}

fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, EncodeError> {
    let mut line = serde_json::to_vec(message).map_err(EncodeError)?;
    line.push(b'\n');
    Ok(line)
}

fn decode<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, DecodeError> {
    if line.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong);
    }
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let value: serde_json::Value = serde_json::from_slice(line).map_err(DecodeError::Json)?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        None => return Err(DecodeError::NoVersion),
        Some(v) if v != u64::from(PROTOCOL_VERSION) => {
            return Err(DecodeError::Version { got: v });
        }
        Some(_) => {}
    }
    serde_json::from_value(value).map_err(DecodeError::Shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: "checkout-0".into(),
            uid: Some("6a0b".into()),
        }
    }

    fn cid(id: &str) -> ContainerId {
        ContainerId::try_from(id.to_owned()).unwrap()
    }

    #[test]
    fn add_request_has_the_documented_shape() {
        let request = Request::new(Command::Add(PodEnrollment {
            pod: pod(),
            container_id: cid("3f9"),
            netns: "/run/netns/cni-1".into(),
            ips: vec!["10.244.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        }));
        let line = request.encode().unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "version": 1,
                "command": "add",
                "pod": {
                    "namespace": "shop",
                    "name": "checkout-0",
                    "uid": "6a0b",
                    "containerId": "3f9",
                    "netns": "/run/netns/cni-1",
                    "ips": ["10.244.1.2", "fd00::2"],
                },
            })
        );
        let back = Request::decode(&line).unwrap();
        assert_eq!(back, request);
        let Command::Add(add) = back.command else {
            panic!("not an add")
        };
        assert_eq!(add.ipv4(), Some(Ipv4Addr::new(10, 244, 1, 2)));
    }

    #[test]
    fn del_request_round_trips_without_netns() {
        let request = Request::new(Command::Del(PodRemoval {
            pod: PodRef { uid: None, ..pod() },
            container_id: cid("3f9"),
            netns: None,
            ips: vec![],
        }));
        let line = request.encode().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(json["command"], "del");
        assert!(json["pod"].get("netns").is_none());
        assert_eq!(Request::decode(&line).unwrap(), request);
        assert_eq!(request.command.name(), "del");
        assert_eq!(request.command.pod().to_string(), "shop/checkout-0");
    }

    #[test]
    fn responses_round_trip() {
        for response in [
            Response::new(Status::Enrolled, ""),
            Response::new(Status::NotMeshed, "namespace not labelled"),
            Response::new(Status::Removed, ""),
            Response::error("capture failed"),
        ] {
            let line = response.encode().unwrap();
            assert_eq!(Response::decode(&line).unwrap(), response);
        }
        assert_eq!(
            &Response::new(Status::NotMeshed, "").encode().unwrap(),
            b"{\"version\":1,\"status\":\"not-meshed\"}\n"
        );
    }

    #[test]
    fn decode_names_what_is_wrong() {
        assert!(matches!(
            Request::decode(b"not json"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            Request::decode(b"{\"command\":\"add\"}"),
            Err(DecodeError::NoVersion)
        ));
        assert!(matches!(
            Request::decode(b"{\"version\":2,\"anything\":true}"),
            Err(DecodeError::Version { got: 2 })
        ));
        assert!(matches!(
            Request::decode(b"{\"version\":1,\"command\":\"reboot\",\"pod\":{}}"),
            Err(DecodeError::Shape(_))
        ));
        let bad_id = br#"{"version":1,"command":"del","pod":{"namespace":"a","name":"b","containerId":"-x"}}"#;
        let err = Request::decode(bad_id).unwrap_err();
        let DecodeError::Shape(source) = &err else {
            panic!("{err:?}")
        };
        assert!(
            source.to_string().contains("invalid container id"),
            "{source}"
        );
        let long = vec![b' '; MAX_MESSAGE_LEN + 1];
        assert!(matches!(Request::decode(&long), Err(DecodeError::TooLong)));
        assert!(matches!(
            Response::decode(b"{\"version\":1,\"status\":\"maybe\"}"),
            Err(DecodeError::Shape(_))
        ));
    }

    #[test]
    fn container_ids_follow_the_spec() {
        for ok in ["a", "0", "abc-DEF_1.2", "3f9c0a"] {
            assert!(ContainerId::try_from(ok.to_owned()).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "ä"] {
            assert!(ContainerId::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }
}
