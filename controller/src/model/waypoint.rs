//! Waypoints: Gateway API `Gateway`s of class `ambit-waypoint`.

use serde::{Deserialize, Serialize};

use super::types::ObjectId;

/// The GatewayClass that declares a waypoint.
pub const WAYPOINT_CLASS: &str = "ambit-waypoint";
/// Istio's waypoint class, accepted as a synonym.
pub const ISTIO_WAYPOINT_CLASS: &str = "istio-waypoint";
/// The HBONE port a waypoint listens on.
pub const HBONE_PORT: u16 = 15008;

/// A declared waypoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Waypoint {
    /// The Gateway it came from (its namespace and name are what
    /// `ambit.dev/use-waypoint` labels refer to).
    pub id: ObjectId,
    /// What traffic it is meant to carry, from the `istio.io/waypoint-for` label
    /// (default: service).
    pub traffic_type: WaypointTrafficType,
}

/// Istio's `istio.io/waypoint-for` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum WaypointTrafficType {
    /// Traffic addressed to services (the default).
    Service,
    /// Traffic addressed to workloads directly.
    Workload,
    /// Both.
    All,
    /// Neither (the waypoint is declared but carries nothing).
    None,
}
