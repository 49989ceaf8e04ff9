//! The objects operators apply, as Rust types, and parsing them from YAML.
//!
//! Core kinds use `k8s-openapi`'s types; the Istio and Gateway API kinds are defined
//! here with kube's `CustomResource` and schemars, so the CRDs Ambit ships for clusters
//! without Istio are generated from the same types ([`crds`]). One Rust type per kind
//! serves every API version of that kind (the versions share one schema).
//!
//! [`parse_documents`] turns a (multi-document) YAML file into one
//! [`ParsedDocument`] per non-empty document: a typed [`Resource`], a document that is
//! not ours ([`IgnoredDocument`]), or a [`Rejection`] naming the offending field. Field
//! *values* are checked later, by [`crate::validate`].

use std::fmt;

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

use crate::diagnostics::{Origin, Rejection};

pub mod common;
pub mod crds;
pub mod gateway;
pub mod networking;
mod parse;
pub mod security;

pub use gateway::{GRPCRoute, Gateway, HTTPRoute};
pub use networking::{DestinationRule, VirtualService};
pub use parse::{parse_documents, parse_value};
pub use security::{AuthorizationPolicy, PeerAuthentication};

/// API group of Istio's security kinds.
pub const ISTIO_SECURITY_GROUP: &str = "security.istio.io";
/// API group of Istio's networking kinds.
pub const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";
/// API group of the Gateway API.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// Every kind Ambit reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum ResourceKind {
    /// `v1` Namespace.
    Namespace,
    /// `v1` Node.
    Node,
    /// `v1` Pod.
    Pod,
    /// `v1` Service.
    Service,
    /// `v1` ServiceAccount.
    ServiceAccount,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication,
    /// `security.istio.io` AuthorizationPolicy.
    AuthorizationPolicy,
    /// `networking.istio.io` VirtualService.
    VirtualService,
    /// `networking.istio.io` DestinationRule.
    DestinationRule,
    /// `gateway.networking.k8s.io` HTTPRoute.
    HttpRoute,
    /// `gateway.networking.k8s.io` GRPCRoute.
    GrpcRoute,
    /// `gateway.networking.k8s.io` Gateway.
    Gateway,
}

impl ResourceKind {
    /// All kinds.
    pub const ALL: [ResourceKind; 13] = [
        Self::Namespace,
        Self::Node,
        Self::Pod,
        Self::Service,
        Self::ServiceAccount,
        Self::EndpointSlice,
        Self::PeerAuthentication,
        Self::AuthorizationPolicy,
        Self::VirtualService,
        Self::DestinationRule,
        Self::HttpRoute,
        Self::GrpcRoute,
        Self::Gateway,
    ];

    /// The `kind` as written in YAML.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Namespace => "Namespace",
            Self::Node => "Node",
            Self::Pod => "Pod",
            Self::Service => "Service",
            Self::ServiceAccount => "ServiceAccount",
            Self::EndpointSlice => "EndpointSlice",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::VirtualService => "VirtualService",
            Self::DestinationRule => "DestinationRule",
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
            Self::Gateway => "Gateway",
        }
    }

    /// The API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            Self::Namespace | Self::Node | Self::Pod | Self::Service | Self::ServiceAccount => "",
            Self::EndpointSlice => "discovery.k8s.io",
            Self::PeerAuthentication | Self::AuthorizationPolicy => ISTIO_SECURITY_GROUP,
            Self::VirtualService | Self::DestinationRule => ISTIO_NETWORKING_GROUP,
            Self::HttpRoute | Self::GrpcRoute | Self::Gateway => GATEWAY_API_GROUP,
        }
    }

    /// The API versions accepted, preferred first.
    pub fn versions(self) -> &'static [&'static str] {
        match self {
            Self::Namespace
            | Self::Node
            | Self::Pod
            | Self::Service
            | Self::ServiceAccount
            | Self::EndpointSlice => &["v1"],
            Self::PeerAuthentication | Self::AuthorizationPolicy => &["v1", "v1beta1"],
            Self::VirtualService | Self::DestinationRule => &["v1", "v1beta1", "v1alpha3"],
            Self::HttpRoute | Self::Gateway => &["v1", "v1beta1"],
            Self::GrpcRoute => &["v1"],
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Namespace | Self::Node)
    }

    /// The kind for `group` and `kind`, if Ambit reads it.
    pub fn lookup(group: &str, kind: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.group() == group && k.kind() == kind)
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// A typed object of a kind Ambit reads.
#[derive(Clone, Debug, PartialEq)]
#[expect(missing_docs, reason = "one variant per ResourceKind, same names")]
pub enum Resource {
    Namespace(Box<Namespace>),
    Node(Box<Node>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    ServiceAccount(Box<ServiceAccount>),
    EndpointSlice(Box<EndpointSlice>),
    PeerAuthentication(Box<PeerAuthentication>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    VirtualService(Box<VirtualService>),
    DestinationRule(Box<DestinationRule>),
    HttpRoute(Box<HTTPRoute>),
    GrpcRoute(Box<GRPCRoute>),
    Gateway(Box<Gateway>),
}

impl Resource {
    /// The object's kind.
    pub fn kind(&self) -> ResourceKind {
        match self {
            Self::Namespace(_) => ResourceKind::Namespace,
            Self::Node(_) => ResourceKind::Node,
            Self::Pod(_) => ResourceKind::Pod,
            Self::Service(_) => ResourceKind::Service,
            Self::ServiceAccount(_) => ResourceKind::ServiceAccount,
            Self::EndpointSlice(_) => ResourceKind::EndpointSlice,
            Self::PeerAuthentication(_) => ResourceKind::PeerAuthentication,
            Self::AuthorizationPolicy(_) => ResourceKind::AuthorizationPolicy,
            Self::VirtualService(_) => ResourceKind::VirtualService,
            Self::DestinationRule(_) => ResourceKind::DestinationRule,
            Self::HttpRoute(_) => ResourceKind::HttpRoute,
            Self::GrpcRoute(_) => ResourceKind::GrpcRoute,
            Self::Gateway(_) => ResourceKind::Gateway,
        }
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Self::Namespace(o) => &o.metadata,
            Self::Node(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::Service(o) => &o.metadata,
            Self::ServiceAccount(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::PeerAuthentication(o) => &o.metadata,
            Self::AuthorizationPolicy(o) => &o.metadata,
            Self::VirtualService(o) => &o.metadata,
            Self::DestinationRule(o) => &o.metadata,
            Self::HttpRoute(o) => &o.metadata,
            Self::GrpcRoute(o) => &o.metadata,
            Self::Gateway(o) => &o.metadata,
        }
    }

    /// `metadata.name` (always present: documents without one are rejected).
    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    /// `metadata.namespace` (defaulted to `default` for namespaced kinds).
    pub fn namespace(&self) -> Option<&str> {
        self.metadata().namespace.as_deref()
    }
}

/// A successfully typed object and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedResource {
    /// Where the document was.
    pub origin: Origin,
    /// The `apiVersion` as written (the kind may be served in several versions).
    pub api_version: String,
    /// The object.
    pub resource: Resource,
}

/// A document of a kind Ambit does not read; reported, not an error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IgnoredDocument {
    /// Where the document was.
    pub origin: Origin,
    /// Its `apiVersion`.
    pub api_version: String,
    /// Its `kind`.
    pub kind: String,
    /// Its namespace, if any.
    pub namespace: Option<String>,
    /// Its name.
    pub name: Option<String>,
    /// Why it is ignored.
    pub note: String,
}

/// A document that could not be typed.
#[derive(Clone, Debug, PartialEq)]
pub struct RejectedDocument {
    /// What is wrong.
    pub rejection: Rejection,
    /// The document as YAML, when it was YAML at all: validation uses it to build the
    /// fail-closed stand-in of a rejected security policy.
    pub raw: Option<serde_yaml::Value>,
}

/// One document of a file, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum ParsedDocument {
    /// A typed object.
    Resource(ParsedResource),
    /// Not ours.
    Ignored(IgnoredDocument),
    /// Ours (or unreadable), and refused.
    Rejected(RejectedDocument),
}
