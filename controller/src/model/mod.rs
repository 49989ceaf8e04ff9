//! The one internal model behind the YAML kinds operators apply, and the pure
//! evaluation functions that give it meaning.
//!
//! Everything here is plain data plus pure functions over it: no Kubernetes types, no
//! I/O, no controller state, so the module can move to a shared crate unchanged (the
//! node daemon and the waypoint evaluate the copies they receive with the same code).
//! Objects here are already validated; building them from user YAML, with precise
//! rejections, is [`crate::validate`]'s job.

pub mod authz;
pub mod destination;
pub mod peer_authn;
pub mod route;
pub mod types;
pub mod waypoint;

pub use types::{
    Cidr, CidrError, DurationError, Enforcement, NamespaceName, ObjectId, Percent, PercentError,
    PortError, PortNumber, ServiceHost, StringMatch, WorkloadRef, WorkloadSelector, parse_duration,
};
