//! Helpers on the generated config types: keys, content versions, and the few
//! derived values whose rule the proto documents (so every side computes them alike).

use crate::config::v1::{Endpoint, Resource, ServicePort, WaypointRef, resource::Kind};
use crate::key::{ResourceKey, ResourceKind};

/// HBONE port of a waypoint when `WaypointRef.hbone_port` is zero.
pub const DEFAULT_HBONE_PORT: u16 = 15008;

impl Kind {
    /// The resource's key, derived from its content (see each message's doc).
    pub fn key(&self) -> ResourceKey {
        match self {
            Kind::Workload(w) => ResourceKey::workload(&w.uid),
            Kind::Service(s) => ResourceKey::service(&s.namespace, &s.name),
            Kind::Authorization(a) => ResourceKey::authorization(&a.namespace, &a.name),
            Kind::TrustBundle(t) => ResourceKey::trust_bundle(&t.trust_domain),
            Kind::PeerAuthentication(p) => ResourceKey::peer_authentication(&p.namespace, &p.name),
            Kind::RouteSet(r) => {
                let svc = r.service.clone().unwrap_or_default();
                ResourceKey::route_set(&svc.namespace, &svc.name)
            }
            Kind::DestinationPolicy(d) => {
                let svc = d.service.clone().unwrap_or_default();
                ResourceKey::destination_policy(&svc.namespace, &svc.name)
            }
        }
    }

    /// Which kind this is.
    pub fn resource_kind(&self) -> ResourceKind {
        match self {
            Kind::Workload(_) => ResourceKind::Workload,
            Kind::Service(_) => ResourceKind::Service,
            Kind::Authorization(_) => ResourceKind::Authorization,
            Kind::TrustBundle(_) => ResourceKind::TrustBundle,
            Kind::PeerAuthentication(_) => ResourceKind::PeerAuthentication,
            Kind::RouteSet(_) => ResourceKind::RouteSet,
            Kind::DestinationPolicy(_) => ResourceKind::DestinationPolicy,
        }
    }
}

impl Resource {
    /// Wraps a resource, filling `key` from its content and `version` with
    /// [`Resource::content_version`].
    pub fn new(kind: Kind) -> Self {
        let key = kind.key().into();
        let version = Self::content_version(&kind);
        Self {
            key,
            version,
            kind: Some(kind),
        }
    }

    /// The deterministic content version: 16 hex digits of FNV-1a 64 over the
    /// protobuf encoding. Maps are generated as `BTreeMap` (see `build.rs`), so equal
    /// content always encodes, and therefore hashes, the same in every replica and
    /// across restarts.
    pub fn content_version(kind: &Kind) -> String {
        let mut buf = Vec::with_capacity(kind.encoded_len());
        kind.encode(&mut buf);
        format!("{:016x}", fnv1a64(&buf))
    }

    /// The parsed key, or why `key` is not valid.
    pub fn parsed_key(&self) -> Result<ResourceKey, crate::ResourceKeyError> {
        ResourceKey::parse(&self.key)
    }
}

impl Endpoint {
    /// The target port on this endpoint's workload for `port`: the per-endpoint
    /// resolution if the service names its target port, else the numeric
    /// `target_port`, else the service port itself.
    pub fn target_port(&self, port: &ServicePort) -> u32 {
        if let Some(p) = self.ports.get(&port.port) {
            return *p;
        }
        if port.target_port != 0 {
            return port.target_port;
        }
        port.port
    }
}

impl WaypointRef {
    /// The HBONE port to dial on the waypoint's endpoints
    /// ([`crate::DEFAULT_HBONE_PORT`] when unset or out of range).
    pub fn hbone_port_or_default(&self) -> u16 {
        match u16::try_from(self.hbone_port) {
            Ok(0) | Err(_) => DEFAULT_HBONE_PORT,
            Ok(p) => p,
        }
    }
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
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::v1::{NamespacedName, RouteSet, Service, Workload};

    fn workload(labels: &[(&str, &str)]) -> Kind {
        Kind::Workload(Workload {
            uid: "uid-1".into(),
            name: "checkout-0".into(),
            namespace: "production".into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        })
    }

    #[test]
    fn resource_new_fills_key_and_a_content_version() {
        let r = Resource::new(workload(&[("app", "checkout")]));
        assert_eq!(r.key, "Workload/uid-1");
        assert_eq!(r.version.len(), 16);
        assert_eq!(r.parsed_key().unwrap().kind(), ResourceKind::Workload);

        let rs = Resource::new(Kind::RouteSet(RouteSet {
            service: Some(NamespacedName {
                namespace: "production".into(),
                name: "payment".into(),
            }),
            routes: vec![],
        }));
        assert_eq!(rs.key, "RouteSet/production/payment");
    }

    #[test]
    fn content_version_is_deterministic_and_content_sensitive() {
        // Insertion order of map entries must not matter.
        let a = workload(&[("app", "checkout"), ("version", "v1")]);
        let b = workload(&[("version", "v1"), ("app", "checkout")]);
        assert_eq!(Resource::content_version(&a), Resource::content_version(&b));
        let c = workload(&[("app", "checkout"), ("version", "v2")]);
        assert_ne!(Resource::content_version(&a), Resource::content_version(&c));
        // Same fields, different kind: different version.
        let svc = Kind::Service(Service::default());
        assert_ne!(
            Resource::content_version(&svc),
            Resource::content_version(&Kind::Workload(Workload::default()))
        );
    }

    #[test]
    fn endpoint_target_port_follows_the_documented_precedence() {
        let named = ServicePort {
            port: 80,
            target_port: 0,
            ..Default::default()
        };
        let numeric = ServicePort {
            port: 80,
            target_port: 8080,
            ..Default::default()
        };
        let mut ep = Endpoint::default();
        assert_eq!(ep.target_port(&named), 80);
        assert_eq!(ep.target_port(&numeric), 8080);
        ep.ports.insert(80, 9090);
        assert_eq!(ep.target_port(&named), 9090);
        assert_eq!(ep.target_port(&numeric), 9090);
    }

    #[test]
    fn waypoint_port_defaults_to_15008() {
        assert_eq!(WaypointRef::default().hbone_port_or_default(), 15008);
        let w = WaypointRef {
            hbone_port: 16008,
            ..Default::default()
        };
        assert_eq!(w.hbone_port_or_default(), 16008);
    }
}
