//! What the push server and the certificate authority need from the controller's
//! state, as traits, so that they can be tested against small in-test views and the
//! index can evolve behind them.

use std::collections::BTreeMap;

use ambit_api::config::v1::Resource;
use ambit_identity::SpiffeId;

/// Who subscribes to config.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Subscriber {
    /// A node daemon, by Kubernetes node name.
    Node { name: String },
    /// A waypoint, by its Gateway's namespace and name.
    Waypoint { namespace: String, name: String },
}

impl std::fmt::Display for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node { name } => write!(f, "node/{name}"),
            Self::Waypoint { namespace, name } => write!(f, "waypoint/{namespace}/{name}"),
        }
    }
}

/// A consistent, immutable view of the translated config (one generation of it).
pub trait ConfigView: Send + Sync + 'static {
    /// Increases with every change of the underlying objects.
    fn generation(&self) -> u64;
    /// Every resource `subscriber` needs, by resource key (`Resource.key`), each with
    /// its content version. Resources that do not concern the subscriber are absent.
    fn resources_for(&self, subscriber: &Subscriber) -> BTreeMap<String, Resource>;
}

/// Who may be issued which identity (node authorization for the CA).
pub trait IdentityAuthority: Send + Sync + 'static {
    /// Whether node `node` runs a pod whose identity is `id` (a node gets
    /// certificates only for service accounts of pods scheduled on it).
    fn node_may_hold(&self, node: &str, id: &SpiffeId) -> bool;
    /// The identity of waypoint `namespace/name`, when that waypoint exists.
    fn waypoint_identity(&self, namespace: &str, name: &str) -> Option<SpiffeId>;
}
