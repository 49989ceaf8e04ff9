//! Resource keys: `<Kind>/<…>`, the identity of a config resource on the wire.
//!
//! Keys are what `ConfigUpdate.removed` lists, what `Hello.resource_versions` is keyed
//! by, and what the proxies store resources under. They are derived from the
//! resource's content ([`crate::config::v1::resource::Kind::key`]), never chosen
//! freely, so the controller and the proxies always agree on them.

use std::fmt;
use std::str::FromStr;

/// The kind of a config resource: the first segment of its [`ResourceKey`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// `Workload/<uid>`.
    Workload,
    /// `Service/<namespace>/<name>`.
    Service,
    /// `Authorization/<namespace>/<name>`.
    Authorization,
    /// `PeerAuthentication/<namespace>/<name>`.
    PeerAuthentication,
    /// `TrustBundle/<trust-domain>`.
    TrustBundle,
    /// `RouteSet/<namespace>/<service>`.
    RouteSet,
    /// `DestinationPolicy/<namespace>/<service>`.
    DestinationPolicy,
}

/// The key of one config resource, e.g. `Service/production/payment`.
///
/// Invariant: the first segment names a [`ResourceKind`], followed by exactly as many
/// non-empty segments as that kind has (one for `Workload` and `TrustBundle`, two for
/// the others), separated by `/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    kind: ResourceKind,
    text: String,
}

/// A string that is not a valid [`ResourceKey`].
#[derive(Debug, thiserror::Error)]
pub enum ResourceKeyError {
    /// The first segment is not a known kind.
    #[error("resource key {key:?}: unknown kind {kind:?}")]
    UnknownKind {
        /// The whole key.
        key: String,
        /// Its first segment.
        kind: String,
    },
    /// Wrong number of segments, or an empty one.
    #[error("resource key {key:?}: a {kind} key has the form {form}")]
    Malformed {
        /// The whole key.
        key: String,
        /// The kind named by the first segment.
        kind: ResourceKind,
        /// The expected form.
        form: &'static str,
    },
}

impl ResourceKind {
    /// Every kind, in key-prefix order.
    pub const ALL: [ResourceKind; 7] = [
        ResourceKind::Workload,
        ResourceKind::Service,
        ResourceKind::Authorization,
        ResourceKind::PeerAuthentication,
        ResourceKind::TrustBundle,
        ResourceKind::RouteSet,
        ResourceKind::DestinationPolicy,
    ];

    /// The key prefix (without the `/`).
    pub const fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Workload => "Workload",
            ResourceKind::Service => "Service",
            ResourceKind::Authorization => "Authorization",
            ResourceKind::PeerAuthentication => "PeerAuthentication",
            ResourceKind::TrustBundle => "TrustBundle",
            ResourceKind::RouteSet => "RouteSet",
            ResourceKind::DestinationPolicy => "DestinationPolicy",
        }
    }

    /// Number of segments after the kind.
    const fn segments(self) -> usize {
        match self {
            ResourceKind::Workload | ResourceKind::TrustBundle => 1,
            _ => 2,
        }
    }

    const fn form(self) -> &'static str {
        match self {
            ResourceKind::Workload => "Workload/<uid>",
            ResourceKind::Service => "Service/<namespace>/<name>",
            ResourceKind::Authorization => "Authorization/<namespace>/<name>",
            ResourceKind::PeerAuthentication => "PeerAuthentication/<namespace>/<name>",
            ResourceKind::TrustBundle => "TrustBundle/<trust-domain>",
            ResourceKind::RouteSet => "RouteSet/<namespace>/<service>",
            ResourceKind::DestinationPolicy => "DestinationPolicy/<namespace>/<service>",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ResourceKey {
    /// `Workload/<uid>`.
    pub fn workload(uid: &str) -> Self {
        Self::build(ResourceKind::Workload, &[uid])
    }

    /// `Service/<namespace>/<name>`.
    pub fn service(namespace: &str, name: &str) -> Self {
        Self::build(ResourceKind::Service, &[namespace, name])
    }

    /// `Authorization/<namespace>/<name>` (the AuthorizationPolicy's name).
    pub fn authorization(namespace: &str, name: &str) -> Self {
        Self::build(ResourceKind::Authorization, &[namespace, name])
    }

    /// `PeerAuthentication/<namespace>/<name>`.
    pub fn peer_authentication(namespace: &str, name: &str) -> Self {
        Self::build(ResourceKind::PeerAuthentication, &[namespace, name])
    }

    /// `TrustBundle/<trust-domain>`.
    pub fn trust_bundle(trust_domain: &str) -> Self {
        Self::build(ResourceKind::TrustBundle, &[trust_domain])
    }

    /// `RouteSet/<namespace>/<service>`.
    pub fn route_set(namespace: &str, service: &str) -> Self {
        Self::build(ResourceKind::RouteSet, &[namespace, service])
    }

    /// `DestinationPolicy/<namespace>/<service>`.
    pub fn destination_policy(namespace: &str, service: &str) -> Self {
        Self::build(ResourceKind::DestinationPolicy, &[namespace, service])
    }

    /// Parses and validates a key received on the wire.
    pub fn parse(key: &str) -> Result<Self, ResourceKeyError> {
        let mut parts = key.split('/');
        let kind_str = parts.next().unwrap_or_default();
        let kind = ResourceKind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind_str)
            .ok_or_else(|| ResourceKeyError::UnknownKind {
                key: key.to_owned(),
                kind: kind_str.to_owned(),
            })?;
        let rest: Vec<&str> = parts.collect();
        if rest.len() != kind.segments() || rest.iter().any(|s| s.is_empty()) {
            return Err(ResourceKeyError::Malformed {
                key: key.to_owned(),
                kind,
                form: kind.form(),
            });
        }
        Ok(Self {
            kind,
            text: key.to_owned(),
        })
    }

    /// The kind named by the first segment.
    pub fn kind(&self) -> ResourceKind {
        self.kind
    }

    /// The key as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The segments after the kind (`["production", "payment"]`).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.text.split('/').skip(1)
    }

    // Callers pass Kubernetes names, uids and trust domains, none of which contain `/`;
    // a value that did would make a key that `parse` rejects, and such resources are
    // rejected by the controller before translation.
    fn build(kind: ResourceKind, segments: &[&str]) -> Self {
        let mut text = String::from(kind.as_str());
        for s in segments {
            text.push('/');
            text.push_str(s);
        }
        Self { kind, text }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for ResourceKey {
    type Err = ResourceKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<ResourceKey> for String {
    fn from(key: ResourceKey) -> Self {
        key.text
    }
}

impl AsRef<str> for ResourceKey {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_round_trip_through_parse() {
        let keys = [
            ResourceKey::workload("3f1c-uid"),
            ResourceKey::service("production", "payment"),
            ResourceKey::authorization("production", "allow-checkout"),
            ResourceKey::peer_authentication("istio-system", "default"),
            ResourceKey::trust_bundle("cluster.local"),
            ResourceKey::route_set("production", "payment"),
            ResourceKey::destination_policy("production", "payment"),
        ];
        for key in keys {
            let parsed = ResourceKey::parse(key.as_str()).unwrap();
            assert_eq!(parsed, key);
            assert_eq!(parsed.kind(), key.kind());
        }
        assert_eq!(
            ResourceKey::service("production", "payment").to_string(),
            "Service/production/payment"
        );
        assert_eq!(
            ResourceKey::service("a", "b")
                .segments()
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn malformed_keys_are_rejected_with_the_expected_form() {
        let err = ResourceKey::parse("Service/production").unwrap_err();
        assert!(
            err.to_string().contains("Service/<namespace>/<name>"),
            "{err}"
        );
        assert!(ResourceKey::parse("Workload/a/b").is_err());
        assert!(ResourceKey::parse("Service//payment").is_err());
        let err = ResourceKey::parse("Pod/x").unwrap_err();
        assert!(matches!(err, ResourceKeyError::UnknownKind { .. }), "{err}");
        assert!(ResourceKey::parse("").is_err());
    }
}
