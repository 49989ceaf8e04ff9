//! The one internal model behind the YAML kinds operators apply, and the pure
//! evaluation functions that give it meaning.
//!
//! Everything here is plain data plus pure functions over it: no Kubernetes types, no
//! I/O, no controller state. Objects here are already validated; building them from
//! user YAML, with precise rejections, is [`crate::validate`]'s job.
//!
//! The security part — [`authz`], [`peer_authn`] and the value [`types`] — lives in
//! the shared crate `ambit-policy`, because the node daemon and the waypoint evaluate
//! the policies they receive with the same code (`ambit_policy::wire` converts the
//! wire resources back into it); it is re-exported here so that `crate::model::…`
//! paths keep working. Routes, destination policies and waypoints stay here: only the
//! controller uses this form of them (the waypoint receives `RouteSet` and
//! `DestinationPolicy` resources, a different shape, evaluated where they are used).

pub mod destination;
pub mod route;
pub mod waypoint;

pub use ambit_policy::{authz, peer_authn, types};

pub use types::{
    Cidr, CidrError, DurationError, Enforcement, NamespaceName, ObjectId, Percent, PercentError,
    PortError, PortNumber, ServiceHost, StringMatch, WorkloadRef, WorkloadSelector, parse_duration,
};
