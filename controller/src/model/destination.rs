//! Destination policies (Istio `DestinationRule`): subsets, load balancing, connection
//! pools and outlier detection, as the waypoint applies them to a destination.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::types::{ObjectId, PortNumber, ServiceHost, WorkloadSelector};

/// How a backend endpoint is chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LoadBalancer {
    /// Round robin (also Istio's `UNSPECIFIED`).
    RoundRobin,
    /// Fewest outstanding requests (power of two choices); also `LEAST_CONN`.
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Consistent hashing on one request property.
    ConsistentHash(HashKey),
}

/// The request property a consistent hash uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HashKey {
    /// A request header (name lowercase).
    Header(String),
    /// A cookie; with a TTL the waypoint sets it when absent.
    Cookie {
        /// Cookie name.
        name: String,
        /// Cookie path.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// Lifetime of a generated cookie.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ttl: Option<Duration>,
    },
    /// The client's IP address.
    SourceIp,
    /// A query parameter.
    QueryParameter(String),
}

/// TCP connection limits towards one destination (per waypoint).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpPool {
    /// Maximum connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Connect timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// Idle timeout of a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// Maximum lifetime of a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<Duration>,
}

/// HTTP request limits towards one destination; overflow is answered with 503.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    /// Maximum requests queued while waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Maximum concurrent requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Maximum requests per connection (1 disables keep-alive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// Maximum concurrent retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Idle timeout of an upstream connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    /// Maximum concurrent streams per HTTP/2 connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
}

/// Connection pool settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// TCP limits.
    pub tcp: TcpPool,
    /// HTTP limits.
    pub http: HttpPool,
}

/// Passive health checking: eject endpoints that keep failing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx (and locally originated failures) before ejection; 0 disables.
    pub consecutive_5xx_errors: u32,
    /// Consecutive 502/503/504 before ejection; 0 disables.
    pub consecutive_gateway_errors: u32,
    /// How often ejections are evaluated.
    pub interval: Duration,
    /// Minimum ejection time, multiplied by the number of times ejected.
    pub base_ejection_time: Duration,
    /// Maximum share of endpoints ejected at once (0–100).
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejection is suspended (0–100).
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    /// Istio's defaults.
    fn default() -> Self {
        Self {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// Settings applying to a destination, a subset, or one port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Endpoint choice (`None`: round robin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Ejection of failing endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Per-port overrides (each replaces the settings it sets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_overrides: BTreeMap<PortNumber, TrafficPolicy>,
}

/// A named subset of a destination's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// The name routes refer to.
    pub name: String,
    /// Endpoint labels that select it.
    pub labels: WorkloadSelector,
    /// Settings overriding the destination's for this subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// The validated content of one DestinationRule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationPolicy {
    /// The object it came from.
    pub id: ObjectId,
    /// The destination it configures.
    pub host: ServiceHost,
    /// Settings for the whole destination.
    pub traffic_policy: TrafficPolicy,
    /// Subsets, names unique.
    pub subsets: Vec<Subset>,
}

impl DestinationPolicy {
    /// The subset called `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }
}
