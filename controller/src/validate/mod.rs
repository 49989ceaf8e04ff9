//! Validation: parsed resources into the internal [`model`](crate::model), with a
//! precise [`Rejection`] for every problem and a [`Warning`] for every caveat.
//!
//! Every problem found in an object is reported (not only the first), each naming its
//! field. A rejected object is not served, except where dropping it would widen
//! access; then a stricter stand-in is enforced in its place ([`Validated::enforced`]):
//!
//! | rejected kind | enforced instead |
//! |---|---|
//! | AuthorizationPolicy, ALLOW (or no action) | ALLOW with no rules for its scope: allows nothing, so traffic there is denied unless another ALLOW policy allows it |
//! | AuthorizationPolicy, DENY, or an unreadable/unknown action | DENY everything in its scope |
//! | AuthorizationPolicy, CUSTOM | DENY with its rules when they are valid (what would have gone to the external authorizer is refused), else DENY everything in its scope |
//! | AuthorizationPolicy, AUDIT | nothing (auditing never changes a decision) |
//! | PeerAuthentication | STRICT for its scope |
//! | everything else | nothing (routing and traffic policy do not grant access) |
//!
//! When a rejected policy's scope itself cannot be read, the stand-in covers the whole
//! namespace (the mesh, in the root namespace): wider than intended, never more open.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::{
    diagnostics::{FieldPath, Origin, Rejection, Warning},
    model::{
        NamespaceName, ObjectId, Percent, PortNumber,
        authz::AuthzPolicy,
        destination::DestinationPolicy,
        parse_duration,
        peer_authn::PeerAuthn,
        route::{RouteAction, RouteTable},
        waypoint::Waypoint,
    },
    resources::{ParsedDocument, ParsedResource, Resource},
};

mod gateway;
mod networking;
mod security;

/// Settings validation depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationContext {
    /// Istio's root namespace: policies without selector there apply mesh-wide.
    pub root_namespace: NamespaceName,
}

impl Default for ValidationContext {
    /// Istio's default root namespace, `istio-system`.
    fn default() -> Self {
        Self {
            root_namespace: NamespaceName::new("istio-system"),
        }
    }
}

/// An object of the internal model.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum ModelObject {
    /// From an AuthorizationPolicy.
    Authz(AuthzPolicy),
    /// From a PeerAuthentication.
    PeerAuthn(PeerAuthn),
    /// From a VirtualService, HTTPRoute or GRPCRoute.
    Routes(RouteTable),
    /// From a DestinationRule.
    Destination(Box<DestinationPolicy>),
    /// From a waypoint Gateway.
    Waypoint(Waypoint),
}

/// The verdict on one document.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "status"
)]
pub enum Outcome {
    /// Served. Core kinds carry no model object (the index uses the typed resource).
    Accepted {
        /// The model object, for policy and routing kinds.
        object: Option<ModelObject>,
        /// Caveats.
        warnings: Vec<Warning>,
    },
    /// Refused, with every problem found.
    Rejected {
        /// The problems, each naming its field.
        rejections: Vec<Rejection>,
        /// What is enforced instead, when dropping the object would widen access.
        fail_closed: Option<ModelObject>,
    },
    /// Not a kind Ambit acts on.
    Ignored {
        /// Why.
        note: String,
    },
}

/// The result of validating one document.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Validated {
    /// `kind`, when readable.
    pub kind: Option<String>,
    /// Namespace, when readable (defaulted to `default`).
    pub namespace: Option<String>,
    /// Name, when readable.
    pub name: Option<String>,
    /// Where the document was.
    pub origin: Option<Origin>,
    /// The verdict.
    pub outcome: Outcome,
}

/// One line of `/config_dump`'s `resources` list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusEntry {
    /// `kind`.
    pub kind: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// Name.
    pub name: Option<String>,
    /// `Accepted`, `Rejected` or `Ignored`.
    pub status: &'static str,
    /// Rejections, warnings or the ignore note, joined; empty when clean.
    pub reason: String,
}

impl Validated {
    /// The model object in force for this document: the accepted object, or the
    /// fail-closed stand-in of a rejected one.
    pub fn enforced(&self) -> Option<&ModelObject> {
        match &self.outcome {
            Outcome::Accepted { object, .. } => object.as_ref(),
            Outcome::Rejected { fail_closed, .. } => fail_closed.as_ref(),
            Outcome::Ignored { .. } => None,
        }
    }

    /// Whether the document was accepted.
    pub fn is_accepted(&self) -> bool {
        matches!(self.outcome, Outcome::Accepted { .. })
    }

    /// The rejections (empty unless rejected).
    pub fn rejections(&self) -> &[Rejection] {
        match &self.outcome {
            Outcome::Rejected { rejections, .. } => rejections,
            _ => &[],
        }
    }

    /// The warnings (empty unless accepted with caveats).
    pub fn warnings(&self) -> &[Warning] {
        match &self.outcome {
            Outcome::Accepted { warnings, .. } => warnings,
            _ => &[],
        }
    }

    /// The admin dump / status summary.
    pub fn status_entry(&self) -> StatusEntry {
        let (status, reason) = match &self.outcome {
            Outcome::Accepted { warnings, .. } => (
                "Accepted",
                warnings
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Outcome::Rejected {
                rejections,
                fail_closed,
            } => {
                let mut reason = rejections
                    .iter()
                    .map(|r| format!("{}: {}", r.field, r.reason))
                    .collect::<Vec<_>>()
                    .join("; ");
                if fail_closed.is_some() {
                    reason.push_str(" (enforced fail-closed in the meantime)");
                }
                ("Rejected", reason)
            }
            Outcome::Ignored { note } => ("Ignored", note.clone()),
        };
        StatusEntry {
            kind: self.kind.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            status,
            reason,
        }
    }
}

/// Validates one parsed document.
pub fn validate_document(doc: &ParsedDocument, ctx: &ValidationContext) -> Validated {
    match doc {
        ParsedDocument::Resource(r) => validate_resource(r, ctx),
        ParsedDocument::Ignored(i) => Validated {
            kind: Some(i.kind.clone()),
            namespace: i.namespace.clone(),
            name: i.name.clone(),
            origin: Some(i.origin.clone()),
            outcome: Outcome::Ignored {
                note: i.note.clone(),
            },
        },
        ParsedDocument::Rejected(r) => {
            let rej = &r.rejection;
            let fail_closed = r
                .raw
                .as_ref()
                .and_then(|raw| security::stand_in_for_unparsed(rej, raw, ctx));
            Validated {
                kind: rej.kind.clone(),
                namespace: rej.namespace.clone(),
                name: rej.name.clone(),
                origin: rej.origin.clone(),
                outcome: Outcome::Rejected {
                    rejections: vec![rej.clone()],
                    fail_closed,
                },
            }
        }
    }
}

/// Validates one typed resource.
pub fn validate_resource(parsed: &ParsedResource, ctx: &ValidationContext) -> Validated {
    let res = &parsed.resource;
    let mut chk = Checker::default();
    let id = object_id(res);
    let (object, fail_closed) = match res {
        Resource::Namespace(_)
        | Resource::Node(_)
        | Resource::Pod(_)
        | Resource::Service(_)
        | Resource::ServiceAccount(_)
        | Resource::EndpointSlice(_) => (None, None),
        Resource::AuthorizationPolicy(ap) => {
            let (policy, stand_in) = security::authorization_policy(&id, &ap.spec, ctx, &mut chk);
            (
                policy.map(ModelObject::Authz),
                stand_in.map(ModelObject::Authz),
            )
        }
        Resource::PeerAuthentication(pa) => {
            let (policy, stand_in) = security::peer_authentication(&id, &pa.spec, ctx, &mut chk);
            (
                policy.map(ModelObject::PeerAuthn),
                stand_in.map(ModelObject::PeerAuthn),
            )
        }
        Resource::VirtualService(vs) => (
            networking::virtual_service(&id, &vs.spec, &mut chk).map(ModelObject::Routes),
            None,
        ),
        Resource::DestinationRule(dr) => (
            networking::destination_rule(&id, &dr.spec, &mut chk)
                .map(|d| ModelObject::Destination(Box::new(d))),
            None,
        ),
        Resource::HttpRoute(r) => (
            gateway::http_route(&id, &r.spec, &mut chk).map(ModelObject::Routes),
            None,
        ),
        Resource::GrpcRoute(r) => (
            gateway::grpc_route(&id, &r.spec, &mut chk).map(ModelObject::Routes),
            None,
        ),
        Resource::Gateway(g) => match gateway::gateway(&id, &g.metadata, &g.spec, &mut chk) {
            gateway::GatewayOutcome::NotAWaypoint(note) => {
                return Validated {
                    kind: Some(res.kind().kind().to_owned()),
                    namespace: res.namespace().map(str::to_owned),
                    name: Some(res.name().to_owned()),
                    origin: Some(parsed.origin.clone()),
                    outcome: Outcome::Ignored { note },
                };
            }
            gateway::GatewayOutcome::Waypoint(w) => (w.map(ModelObject::Waypoint), None),
        },
    };
    let outcome = if chk.errors.is_empty() {
        Outcome::Accepted {
            object,
            warnings: chk.warnings,
        }
    } else {
        let rejections = chk
            .errors
            .into_iter()
            .map(|(field, reason)| Rejection {
                api_version: Some(parsed.api_version.clone()),
                kind: Some(res.kind().kind().to_owned()),
                namespace: res.namespace().map(str::to_owned),
                name: Some(res.name().to_owned()),
                field,
                reason,
                origin: Some(parsed.origin.clone()),
            })
            .collect();
        Outcome::Rejected {
            rejections,
            fail_closed,
        }
    };
    Validated {
        kind: Some(res.kind().kind().to_owned()),
        namespace: res.namespace().map(str::to_owned),
        name: Some(res.name().to_owned()),
        origin: Some(parsed.origin.clone()),
        outcome,
    }
}

/// Parses and validates a whole file: the usual entry point of the local source.
pub fn validate_file(
    source: &str,
    text: &str,
    ctx: &ValidationContext,
) -> Vec<(ParsedDocument, Validated)> {
    crate::resources::parse_documents(source, text)
        .into_iter()
        .map(|doc| {
            let v = validate_document(&doc, ctx);
            (doc, v)
        })
        .collect()
}

fn object_id(res: &Resource) -> ObjectId {
    ObjectId {
        kind: res.kind().kind().to_owned(),
        namespace: NamespaceName::new(res.namespace().unwrap_or_default()),
        name: res.name().to_owned(),
        created: creation_key(res.metadata()),
    }
}

/// `creationTimestamp` as fixed-width RFC 3339 (nanoseconds), so that text order is
/// time order.
fn creation_key(meta: &ObjectMeta) -> Option<String> {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%S.%NZ").to_string())
}

/// A problem between objects, reported on the object that refers to a missing thing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CrossReference {
    /// The referring object.
    pub object: ObjectId,
    /// The referring field.
    pub field: FieldPath,
    /// What is missing.
    pub message: String,
}

/// VirtualService routes that name a subset no DestinationRule for that host defines.
///
/// This needs every object at once, so it is not part of per-document validation: the
/// index runs it over the accepted objects after each change (a DestinationRule may
/// arrive after the VirtualService). Istio answers such routes with 503 (no healthy
/// upstream); so should the waypoint. Only route destinations are checked (mirrors
/// are best-effort copies).
pub fn undefined_subsets<'a>(
    routes: impl IntoIterator<Item = &'a RouteTable>,
    destinations: &[&DestinationPolicy],
) -> Vec<CrossReference> {
    let mut out = Vec::new();
    for table in routes {
        if table.id.kind != "VirtualService" {
            continue;
        }
        // An accepted VirtualService keeps every `http` entry, in order.
        for (i, rule) in table.rules.iter().enumerate() {
            let RouteAction::Forward(backends) = &rule.action else {
                continue;
            };
            for (k, b) in backends.iter().enumerate() {
                let Some(subset) = &b.backend.subset else {
                    continue;
                };
                let defined = destinations
                    .iter()
                    .any(|d| d.host == b.backend.host && d.subset(subset).is_some());
                if !defined {
                    out.push(CrossReference {
                        object: table.id.clone(),
                        field: FieldPath::parse("spec.http")
                            .index(i)
                            .field("route")
                            .index(k)
                            .field("destination")
                            .field("subset"),
                        message: format!(
                            "no DestinationRule for {} defines subset `{subset}`: requests routed there get 503",
                            b.backend.host
                        ),
                    });
                }
            }
        }
    }
    out
}

/// Collects problems and caveats while walking an object.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    errors: Vec<(FieldPath, String)>,
    warnings: Vec<Warning>,
}

impl Checker {
    fn error(&mut self, field: FieldPath, reason: impl Into<String>) {
        self.errors.push((field, reason.into()));
    }

    fn warn(&mut self, field: FieldPath, message: impl Into<String>) {
        self.warnings.push(Warning {
            field,
            message: message.into(),
        });
    }

    fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// A list field that, when present, must not be empty (an empty list would read
    /// as "unconstrained" and match more than its author likely meant).
    fn list<'a, T>(&mut self, field: &FieldPath, list: Option<&'a Vec<T>>) -> &'a [T] {
        match list {
            Some(v) if v.is_empty() => {
                self.error(
                    field.clone(),
                    "must not be empty; remove the field to leave it unconstrained",
                );
                &[]
            }
            Some(v) => v,
            None => &[],
        }
    }

    fn duration(&mut self, field: FieldPath, value: &str) -> Option<Duration> {
        match parse_duration(value) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(field, e.to_string());
                None
            }
        }
    }

    fn port(&mut self, field: FieldPath, value: i64) -> Option<PortNumber> {
        match PortNumber::new(value) {
            Ok(p) => Some(p),
            Err(e) => {
                self.error(field, e.to_string());
                None
            }
        }
    }

    fn percent(&mut self, field: FieldPath, value: f64) -> Option<Percent> {
        match Percent::new(value) {
            Ok(p) => Some(p),
            Err(e) => {
                self.error(field, e.to_string());
                None
            }
        }
    }
}

/// Whether `s` is a valid RFC 1123 label (namespace names, subset names).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a valid HTTP header name (RFC 9110 token).
fn is_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_undefined_subsets() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: production}
spec:
  hosts: [payment]
  http:
  - route:
    - destination: {host: payment, subset: v1}
      weight: 50
    - destination: {host: payment.production.svc.cluster.local, subset: v3}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: production}
spec:
  host: payment
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;
        let validated = validate_file("x.yaml", yaml, &ValidationContext::default());
        let mut routes = Vec::new();
        let mut dests = Vec::new();
        for (_, v) in &validated {
            match v.enforced() {
                Some(ModelObject::Routes(r)) => routes.push(r),
                Some(ModelObject::Destination(d)) => dests.push(d.as_ref()),
                other => panic!("unexpected {other:?}"),
            }
        }
        let problems = undefined_subsets(routes, &dests);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].field.as_str(),
            "spec.http[0].route[1].destination.subset"
        );
        assert!(problems[0].message.contains("`v3`"));
    }
}
