//! Authorization policies (Istio `AuthorizationPolicy`) and their evaluation.
//!
//! Semantics (DESIGN §4): any matching DENY policy denies; with no ALLOW policy the
//! connection is allowed; a matching ALLOW policy allows; otherwise it is denied. An
//! ALLOW policy without rules (`spec: {}`) matches nothing, so its mere presence denies;
//! an empty rule (`rules: [{}]`) matches everything; a DENY policy without rules never
//! matches. AUDIT policies never change the decision.
//!
//! Some attributes cannot be known where a policy is evaluated: HTTP attributes at the
//! node daemon (no request is parsed there) and request authentication (JWT), which
//! Ambit does not implement, anywhere. Such a condition is *unknown*, and an unknown
//! never widens access: it counts as "no match" for ALLOW and as "match" for DENY (and
//! AUDIT). In addition, and exactly as Istio's ztunnel does, an ALLOW rule that names an
//! attribute that cannot be evaluated where it is enforced never matches, even if an
//! alternative in it could be decided: at L4 any HTTP attribute, anywhere request
//! authentication and the other unevaluable attributes. This is what the wire protocol
//! states for `Rule.unenforceable_fields` (`security.proto`), so a proxy evaluating the
//! translated rules ([`crate::clause`]) decides exactly as this model does.
//!
//! [`authorize`] accepts any [`MatchPolicy`]: the model's [`AuthzPolicy`] or the
//! normalised [`crate::clause::ClausePolicy`] the proxies receive. Which policy a
//! [`Decision`] names does not depend on the order the policies are given in.

use std::{fmt, net::IpAddr};

use ambit_identity::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::{
    tri::{Tri, any_of, field},
    types::{
        Cidr, Enforcement, NamespaceName, ObjectId, PortNumber, StringMatch, WorkloadRef,
        WorkloadSelector,
    },
};

/// What a policy does when one of its rules matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    /// Allow matching traffic (and, by its presence, deny traffic no ALLOW matches).
    Allow,
    /// Deny matching traffic.
    Deny,
    /// Record matching traffic; never affects the decision.
    Audit,
}

/// Which traffic a policy applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthzScope {
    /// Every workload in the mesh (a policy without selector in the root namespace).
    Mesh,
    /// Every workload in one namespace (a policy without selector).
    Namespace(NamespaceName),
    /// Workloads matching a selector, in one namespace or, for a policy in the root
    /// namespace, in every namespace (`namespace: None`).
    Workloads {
        /// Namespace the selector applies in; `None` for all namespaces.
        namespace: Option<NamespaceName>,
        /// The label selector.
        selector: WorkloadSelector,
    },
    /// Services or waypoint Gateways named by `targetRef(s)`: enforced by the waypoint.
    Targets(Vec<PolicyTarget>),
}

/// Where a policy is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EnforcementPoint {
    /// The node daemon, at L4, before connecting to the destination workload.
    NodeDaemon,
    /// The waypoint in front of the destination, at L4 and L7.
    Waypoint,
}

/// A `targetRef` of an authorization policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyTarget {
    /// What is targeted.
    pub kind: TargetKind,
    /// Namespace of the target (always the policy's own namespace).
    pub namespace: NamespaceName,
    /// Name of the target.
    pub name: String,
}

/// Kinds a policy can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetKind {
    /// A core `Service` (enforced by the waypoint that fronts it).
    Service,
    /// A waypoint `Gateway` (all traffic through that waypoint).
    Gateway,
}

/// One authorization policy of the internal model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuthzPolicy {
    /// The object it came from.
    pub id: ObjectId,
    /// What it applies to.
    pub scope: AuthzScope,
    /// What it does.
    pub action: AuthzAction,
    /// Its rules; a policy matches when any rule matches. No rules: never matches.
    pub rules: Vec<AuthzRule>,
    /// As written, or a fail-closed stand-in.
    pub enforcement: Enforcement,
}

/// One rule: every present clause must match (`from` any, `to` any, `when` all).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthzRule {
    /// Alternatives for the source; empty means any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<SourceMatch>,
    /// Alternatives for the operation; empty means any operation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<OperationMatch>,
    /// Conditions that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `from[].source`: all present fields must match; within a field any value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(missing_docs, reason = "fields mirror Istio's Source one to one")]
pub struct SourceMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<Cidr>,
}

/// `from[].source.serviceAccounts` entry: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceAccountMatch {
    /// Namespace of the service account.
    pub namespace: String,
    /// Name of the service account.
    pub name: String,
}

/// `to[].operation`: all present fields must match; within a field any value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(missing_docs, reason = "fields mirror Istio's Operation one to one")]
pub struct OperationMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortNumber>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<PortNumber>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathPattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<PathPattern>,
}

/// A `when` condition: the attribute must equal one of `values` (if any) and none of
/// `not_values`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The attribute tested.
    pub key: ConditionKey,
    /// Accepted values; empty means no constraint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<ConditionValue>,
    /// Refused values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<ConditionValue>,
}

/// Attributes a `when` condition can test.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConditionKey {
    /// `source.ip` (L4).
    SourceIp,
    /// `source.namespace` (L4, from the peer identity).
    SourceNamespace,
    /// `source.principal` (L4, from the peer identity).
    SourcePrincipal,
    /// `destination.ip` (L4).
    DestinationIp,
    /// `destination.port` (L4).
    DestinationPort,
    /// `remote.ip` (L7: the original client address).
    RemoteIp,
    /// `request.headers[name]` (L7); the name is lowercase.
    RequestHeader(String),
    /// An attribute Istio defines that Ambit cannot evaluate (`request.auth.*`,
    /// `connection.sni`, `experimental.*`): always unknown.
    Unevaluable(String),
}

impl ConditionKey {
    /// Whether the node daemon can evaluate this attribute.
    pub fn is_l4(&self) -> bool {
        matches!(
            self,
            Self::SourceIp
                | Self::SourceNamespace
                | Self::SourcePrincipal
                | Self::DestinationIp
                | Self::DestinationPort
        )
    }
}

impl fmt::Display for ConditionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SourceIp => f.write_str("source.ip"),
            Self::SourceNamespace => f.write_str("source.namespace"),
            Self::SourcePrincipal => f.write_str("source.principal"),
            Self::DestinationIp => f.write_str("destination.ip"),
            Self::DestinationPort => f.write_str("destination.port"),
            Self::RemoteIp => f.write_str("remote.ip"),
            Self::RequestHeader(h) => write!(f, "request.headers[{h}]"),
            Self::Unevaluable(k) => f.write_str(k),
        }
    }
}

/// A typed `when` value (the type follows the key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConditionValue {
    /// For IP attributes.
    Ip(Cidr),
    /// For `destination.port`.
    Port(PortNumber),
    /// For string attributes (Istio wildcards allowed).
    String(StringMatch),
}

/// An Istio `paths` entry: exact, `prefix*`, `*suffix`, `*`, or a template with `{*}`
/// (one segment) and `{**}` (the rest of the path, last only).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathPattern {
    /// A wildcard form.
    Match(StringMatch),
    /// A template, one entry per `/`-separated segment after the leading `/`.
    Template(Vec<TemplateSegment>),
}

/// One segment of a path template.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TemplateSegment {
    /// Literal text.
    Literal(String),
    /// `{*}`: exactly one non-empty segment.
    One,
    /// `{**}`: everything after the preceding `/` (zero or more segments; the `/`
    /// itself must be present, so `/a/{**}` matches `/a/` and `/a/b/c`, not `/a`).
    Rest,
}

/// Why a path pattern is invalid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathPatternError {
    /// Neither `/…` nor a wildcard.
    #[error("path `{0}` must start with `/` (or be a `*` wildcard)")]
    NotAbsolute(String),
    /// Misplaced `*`.
    #[error("path `{0}`: `*` is only allowed alone, as a prefix or as a suffix")]
    BadWildcard(String),
    /// Malformed template.
    #[error("path template `{path}`: {problem}")]
    BadTemplate {
        /// The path as written.
        path: String,
        /// What is wrong.
        problem: &'static str,
    },
}

impl PathPattern {
    /// Parses an Istio `paths` value.
    pub fn parse(path: &str) -> Result<Self, PathPatternError> {
        if path.contains('{') || path.contains('}') {
            return Self::parse_template(path);
        }
        let m = StringMatch::parse_wildcard(path)
            .ok_or_else(|| PathPatternError::BadWildcard(path.to_owned()))?;
        let absolute = match &m {
            StringMatch::Exact(p) | StringMatch::Prefix(p) => p.starts_with('/'),
            StringMatch::Suffix(_) | StringMatch::Presence => true,
        };
        if !absolute {
            return Err(PathPatternError::NotAbsolute(path.to_owned()));
        }
        Ok(Self::Match(m))
    }

    /// Parses a path template as the wire protocol's `path_template` carries it:
    /// `/`-separated segments, each literal, `{*}` or (last only) `{**}`.
    pub fn parse_template(path: &str) -> Result<Self, PathPatternError> {
        let bad = |problem| PathPatternError::BadTemplate {
            path: path.to_owned(),
            problem,
        };
        let Some(rest) = path.strip_prefix('/') else {
            return Err(PathPatternError::NotAbsolute(path.to_owned()));
        };
        if path.contains('*') && !path.contains("{*}") && !path.contains("{**}") {
            return Err(bad("`*` wildcards cannot be combined with templates"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = match *part {
                "{*}" => TemplateSegment::One,
                "{**}" if i + 1 == parts.len() => TemplateSegment::Rest,
                "{**}" => return Err(bad("`{**}` must be the last segment")),
                p if p.contains('{') || p.contains('}') || p.contains('*') => {
                    return Err(bad("`{*}` and `{**}` must each be a whole segment"));
                }
                p => TemplateSegment::Literal(p.to_owned()),
            };
            segments.push(seg);
        }
        Ok(Self::Template(segments))
    }

    /// Whether a request path (query string ignored) matches.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        match self {
            Self::Match(m) => m.matches(path),
            Self::Template(segments) => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let parts: Vec<&str> = rest.split('/').collect();
                let mut i = 0;
                for seg in segments {
                    match seg {
                        // Like Envoy's `**` after a literal `/`: the slash must be
                        // there, anything may follow it.
                        TemplateSegment::Rest => return parts.get(i).is_some(),
                        TemplateSegment::One => match parts.get(i) {
                            Some(p) if !p.is_empty() => {}
                            _ => return false,
                        },
                        TemplateSegment::Literal(l) => {
                            if parts.get(i) != Some(&l.as_str()) {
                                return false;
                            }
                        }
                    }
                    i += 1;
                }
                i == parts.len()
            }
        }
    }
}

/// The authenticated identity of a peer (from its certificate's SPIFFE ID).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerIdentity {
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Namespace of the peer's service account.
    pub namespace: String,
    /// The peer's service account.
    pub service_account: String,
}

impl From<&SpiffeId> for PeerIdentity {
    fn from(id: &SpiffeId) -> Self {
        Self {
            trust_domain: id.trust_domain().as_str().to_owned(),
            namespace: id.namespace().to_owned(),
            service_account: id.service_account().to_owned(),
        }
    }
}

impl PeerIdentity {
    /// Istio's principal form: `<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// What is known about a connection (and, at the waypoint, the request on it) when a
/// policy is evaluated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionAttrs {
    /// The peer's authenticated identity; `None` for plaintext.
    pub source: Option<PeerIdentity>,
    /// The peer's address.
    pub source_ip: IpAddr,
    /// The original destination address.
    pub destination_ip: IpAddr,
    /// The original destination port.
    pub destination_port: u16,
    /// The HTTP request, when evaluated at the waypoint on an HTTP stream; `None` at L4.
    pub request: Option<RequestAttrs>,
}

/// HTTP request attributes (waypoint only).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestAttrs {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path with query, e.g. `/api/v1/orders?x=1`.
    pub path: String,
    /// Host (`:authority`), possibly with a port.
    pub host: String,
    /// Headers; names lowercase, a name may repeat.
    pub headers: Vec<(String, String)>,
    /// The original client address (`remote.ip`) when a trusted hop reported one;
    /// otherwise the peer address is used.
    pub remote_ip: Option<IpAddr>,
}

/// The verdict of [`authorize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
}

/// Why [`authorize`] decided as it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DecisionReason {
    /// A DENY policy matched.
    DeniedBy(ObjectId),
    /// An ALLOW policy matched.
    AllowedBy(ObjectId),
    /// No ALLOW policy applies, so everything not denied is allowed.
    NoAllowPolicy,
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
}

/// The outcome of [`authorize`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Which policy decided, if any.
    pub reason: DecisionReason,
    /// AUDIT policies that matched (to be logged; they never change the verdict).
    pub audited_by: Vec<ObjectId>,
}

impl Decision {
    /// Whether the verdict is allow.
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

impl SourceMatch {
    /// Names of the L7-only fields present (for warnings and L4 fail-closed).
    pub fn l7_fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (present, name) in [
            (!self.request_principals.is_empty(), "requestPrincipals"),
            (
                !self.not_request_principals.is_empty(),
                "notRequestPrincipals",
            ),
            (!self.remote_ip_blocks.is_empty(), "remoteIpBlocks"),
            (!self.not_remote_ip_blocks.is_empty(), "notRemoteIpBlocks"),
        ] {
            if present {
                out.push(name);
            }
        }
        out
    }

    fn eval(&self, conn: &ConnectionAttrs) -> Tri {
        let principal = conn
            .source
            .as_ref()
            .map(PeerIdentity::principal)
            .unwrap_or_default();
        let namespace = conn
            .source
            .as_ref()
            .map(|s| s.namespace.as_str())
            .unwrap_or("");
        let sa_test = |m: &ServiceAccountMatch| {
            Tri::from_bool(
                conn.source
                    .as_ref()
                    .is_some_and(|s| s.namespace == m.namespace && s.service_account == m.name),
            )
        };
        let remote_ip = conn
            .request
            .as_ref()
            .map(|r| r.remote_ip.unwrap_or(conn.source_ip));
        field(&self.principals, &self.not_principals, |m| {
            Tri::from_bool(m.matches(&principal))
        })
        .and(field(&self.namespaces, &self.not_namespaces, |m| {
            Tri::from_bool(m.matches(namespace))
        }))
        .and(field(
            &self.service_accounts,
            &self.not_service_accounts,
            sa_test,
        ))
        .and(field(&self.ip_blocks, &self.not_ip_blocks, |c| {
            Tri::from_bool(c.contains(conn.source_ip))
        }))
        .and(field(
            &self.remote_ip_blocks,
            &self.not_remote_ip_blocks,
            |c| remote_ip.map_or(Tri::Unknown, |ip| Tri::from_bool(c.contains(ip))),
        ))
        // Request authentication (JWT) is not implemented: never known.
        .and(field(
            &self.request_principals,
            &self.not_request_principals,
            |_| Tri::Unknown,
        ))
    }
}

impl OperationMatch {
    /// Names of the L7-only fields present.
    pub fn l7_fields(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (present, name) in [
            (!self.hosts.is_empty(), "hosts"),
            (!self.not_hosts.is_empty(), "notHosts"),
            (!self.methods.is_empty(), "methods"),
            (!self.not_methods.is_empty(), "notMethods"),
            (!self.paths.is_empty(), "paths"),
            (!self.not_paths.is_empty(), "notPaths"),
        ] {
            if present {
                out.push(name);
            }
        }
        out
    }

    fn eval(&self, conn: &ConnectionAttrs) -> Tri {
        let req = conn.request.as_ref();
        let host_test = |m: &StringMatch| {
            req.map_or(Tri::Unknown, |r| {
                let bare = strip_port(&r.host);
                Tri::from_bool(m.matches_ignore_case(&r.host) || m.matches_ignore_case(bare))
            })
        };
        field(&self.ports, &self.not_ports, |p| {
            Tri::from_bool(p.get() == conn.destination_port)
        })
        .and(field(&self.hosts, &self.not_hosts, host_test))
        .and(field(&self.methods, &self.not_methods, |m| {
            req.map_or(Tri::Unknown, |r| Tri::from_bool(&r.method == m))
        }))
        .and(field(&self.paths, &self.not_paths, |p| {
            req.map_or(Tri::Unknown, |r| Tri::from_bool(p.matches(&r.path)))
        }))
    }
}

/// `host` without a trailing `:port` (and without the brackets of an IPv6 literal).
pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl Condition {
    fn eval(&self, conn: &ConnectionAttrs) -> Tri {
        let principal = conn.source.as_ref().map(PeerIdentity::principal);
        let test = |v: &ConditionValue| -> Tri {
            match (&self.key, v) {
                (ConditionKey::SourceIp, ConditionValue::Ip(c)) => {
                    Tri::from_bool(c.contains(conn.source_ip))
                }
                (ConditionKey::DestinationIp, ConditionValue::Ip(c)) => {
                    Tri::from_bool(c.contains(conn.destination_ip))
                }
                (ConditionKey::RemoteIp, ConditionValue::Ip(c)) => {
                    conn.request.as_ref().map_or(Tri::Unknown, |r| {
                        Tri::from_bool(c.contains(r.remote_ip.unwrap_or(conn.source_ip)))
                    })
                }
                (ConditionKey::DestinationPort, ConditionValue::Port(p)) => {
                    Tri::from_bool(p.get() == conn.destination_port)
                }
                (ConditionKey::SourceNamespace, ConditionValue::String(m)) => Tri::from_bool(
                    m.matches(conn.source.as_ref().map_or("", |s| s.namespace.as_str())),
                ),
                (ConditionKey::SourcePrincipal, ConditionValue::String(m)) => {
                    Tri::from_bool(m.matches(principal.as_deref().unwrap_or("")))
                }
                (ConditionKey::RequestHeader(name), ConditionValue::String(m)) => {
                    conn.request.as_ref().map_or(Tri::Unknown, |r| {
                        Tri::from_bool(
                            r.headers
                                .iter()
                                .any(|(k, v)| k.eq_ignore_ascii_case(name) && m.matches(v)),
                        )
                    })
                }
                // Unevaluable attributes, and value types that validation never pairs
                // with the key: unknown, which cannot widen access.
                _ => Tri::Unknown,
            }
        };
        field(&self.values, &self.not_values, test)
    }
}

impl AuthzRule {
    /// Names of the L7-only attributes this rule uses (empty: enforceable at L4).
    pub fn l7_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.from {
            out.extend(s.l7_fields().into_iter().map(str::to_owned));
        }
        for o in &self.to {
            out.extend(o.l7_fields().into_iter().map(str::to_owned));
        }
        for c in &self.when {
            if !c.key.is_l4() {
                out.push(c.key.to_string());
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Whether this rule names an attribute that is unknown wherever it is evaluated
    /// (request authentication, `request.auth.*`, `connection.sni`, `experimental.*`).
    pub fn names_unevaluable(&self) -> bool {
        self.from
            .iter()
            .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
            || self
                .when
                .iter()
                .any(|c| matches!(c.key, ConditionKey::Unevaluable(_)))
    }

    fn eval(&self, conn: &ConnectionAttrs) -> Tri {
        let from = any_of(self.from.len(), |i| self.from[i].eval(conn));
        let to = any_of(self.to.len(), |i| self.to[i].eval(conn));
        let when = self
            .when
            .iter()
            .fold(Tri::Yes, |acc, c| acc.and(c.eval(conn)));
        from.and(to).and(when)
    }
}

impl AuthzScope {
    /// Whether a policy with this scope applies to a workload at the node daemon
    /// (selector, namespace or mesh scope). Target scopes never do.
    pub fn selects_workload(&self, workload: &WorkloadRef) -> bool {
        match self {
            Self::Mesh => true,
            Self::Namespace(ns) => *ns == workload.namespace,
            Self::Workloads {
                namespace,
                selector,
            } => {
                namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == workload.namespace)
                    && selector.matches(&workload.labels)
            }
            Self::Targets(_) => false,
        }
    }

    /// Whether a policy with this scope is attached to `target` (waypoint enforcement).
    pub fn targets(&self, target: &PolicyTarget) -> bool {
        matches!(self, Self::Targets(ts) if ts.contains(target))
    }

    /// Who enforces a policy with this scope.
    pub fn enforcement_point(&self) -> EnforcementPoint {
        match self {
            Self::Targets(_) => EnforcementPoint::Waypoint,
            _ => EnforcementPoint::NodeDaemon,
        }
    }
}

impl AuthzPolicy {
    /// Who enforces this policy.
    pub fn enforcement_point(&self) -> EnforcementPoint {
        self.scope.enforcement_point()
    }

    /// Whether this policy applies to a workload at the node daemon (selector,
    /// namespace or mesh scope). Target-scoped policies never do.
    pub fn selects_workload(&self, workload: &WorkloadRef) -> bool {
        self.scope.selects_workload(workload)
    }

    /// Whether this policy is attached to `target` (waypoint enforcement).
    pub fn targets(&self, target: &PolicyTarget) -> bool {
        self.scope.targets(target)
    }

    /// Whether the policy matches the connection, resolving unknown attributes so
    /// access is never widened (see the module docs).
    pub fn matches(&self, conn: &ConnectionAttrs) -> bool {
        let at_l4 = conn.request.is_none();
        self.rules.iter().any(|rule| match self.action {
            AuthzAction::Allow => {
                if rule.names_unevaluable() || (at_l4 && !rule.l7_fields().is_empty()) {
                    return false;
                }
                rule.eval(conn) == Tri::Yes
            }
            AuthzAction::Deny | AuthzAction::Audit => rule.eval(conn) != Tri::No,
        })
    }
}

/// A policy [`authorize`] can decide with: the model's [`AuthzPolicy`], or the
/// normalised [`crate::clause::ClausePolicy`] a proxy builds from the wire.
pub trait MatchPolicy {
    /// The object the policy came from (named in the [`Decision`]).
    fn id(&self) -> &ObjectId;
    /// What it does when it matches.
    fn action(&self) -> AuthzAction;
    /// Whether any of its rules matches, unknowns resolved as the module docs say.
    fn matches(&self, conn: &ConnectionAttrs) -> bool;
}

impl MatchPolicy for AuthzPolicy {
    fn id(&self) -> &ObjectId {
        &self.id
    }

    fn action(&self) -> AuthzAction {
        self.action
    }

    fn matches(&self, conn: &ConnectionAttrs) -> bool {
        AuthzPolicy::matches(self, conn)
    }
}

/// Keeps the policy that sorts first by namespace and name, so that a [`Decision`]
/// names the same policy whatever order the policies came in.
fn keep_first(slot: &mut Option<ObjectId>, id: &ObjectId) {
    let key = |i: &ObjectId| (i.namespace.clone(), i.name.clone());
    if slot.as_ref().is_none_or(|cur| key(id) < key(cur)) {
        *slot = Some(id.clone());
    }
}

/// Decides a connection (or request) against the policies that apply to its
/// destination (select them with [`AuthzPolicy::selects_workload`] at the node daemon,
/// [`AuthzPolicy::targets`] at the waypoint). Order of `policies` does not matter.
pub fn authorize<'a, P: MatchPolicy + 'a>(
    policies: impl IntoIterator<Item = &'a P>,
    conn: &ConnectionAttrs,
) -> Decision {
    let mut audited_by: Vec<ObjectId> = Vec::new();
    let mut denied_by = None;
    let mut allowed_by = None;
    let mut any_allow = false;
    for p in policies {
        match p.action() {
            AuthzAction::Audit => {
                if p.matches(conn) {
                    audited_by.push(p.id().clone());
                }
            }
            AuthzAction::Deny => {
                if p.matches(conn) {
                    keep_first(&mut denied_by, p.id());
                }
            }
            AuthzAction::Allow => {
                any_allow = true;
                if p.matches(conn) {
                    keep_first(&mut allowed_by, p.id());
                }
            }
        }
    }
    audited_by.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let (verdict, reason) = match (denied_by, allowed_by) {
        (Some(id), _) => (Verdict::Deny, DecisionReason::DeniedBy(id)),
        (None, _) if !any_allow => (Verdict::Allow, DecisionReason::NoAllowPolicy),
        (None, Some(id)) => (Verdict::Allow, DecisionReason::AllowedBy(id)),
        (None, None) => (Verdict::Deny, DecisionReason::NoAllowMatched),
    };
    Decision {
        verdict,
        reason,
        audited_by,
    }
}

/// Convenience for the node daemon: the policies that apply to `workload`.
pub fn policies_for_workload<'a>(
    policies: &'a [AuthzPolicy],
    workload: &'a WorkloadRef,
) -> impl Iterator<Item = &'a AuthzPolicy> + 'a {
    policies
        .iter()
        .filter(move |p| p.selects_workload(workload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_templates() {
        let p = PathPattern::parse("/api/{*}/orders/{**}").unwrap();
        assert!(p.matches("/api/v1/orders/42"));
        assert!(p.matches("/api/v1/orders/"));
        assert!(p.matches("/api/v1/orders/1/2?x=y"));
        assert!(!p.matches("/api/v1/orders"));
        assert!(!p.matches("/api//orders/1"));
        let one = PathPattern::parse("/items/{*}").unwrap();
        assert!(one.matches("/items/a"));
        assert!(!one.matches("/items/a/b"));
        assert!(PathPattern::parse("/a/{**}/b").is_err());
        assert!(PathPattern::parse("/a/x{*}").is_err());
        assert!(PathPattern::parse("/a/{*}/*").is_err());
        assert!(PathPattern::parse("admin").is_err());
        assert!(PathPattern::parse("/a*b").is_err());
        assert!(PathPattern::parse("*/admin").is_ok());
        assert!(PathPattern::parse("/admin*").unwrap().matches("/admin/x"));
    }

    fn id(name: &str) -> ObjectId {
        ObjectId {
            kind: "AuthorizationPolicy".into(),
            namespace: NamespaceName::new("ns"),
            name: name.into(),
            created: None,
        }
    }

    fn policy(name: &str, action: AuthzAction, rules: Vec<AuthzRule>) -> AuthzPolicy {
        AuthzPolicy {
            id: id(name),
            scope: AuthzScope::Namespace(NamespaceName::new("ns")),
            action,
            rules,
            enforcement: Enforcement::AsWritten,
        }
    }

    fn get_rule() -> AuthzRule {
        AuthzRule {
            to: vec![OperationMatch {
                methods: vec!["GET".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn conn(request: Option<RequestAttrs>) -> ConnectionAttrs {
        ConnectionAttrs {
            source: Some(PeerIdentity {
                trust_domain: "td".into(),
                namespace: "a".into(),
                service_account: "b".into(),
            }),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "10.0.0.2".parse().unwrap(),
            destination_port: 80,
            request,
        }
    }

    fn get() -> Option<RequestAttrs> {
        Some(RequestAttrs {
            method: "GET".into(),
            path: "/".into(),
            ..Default::default()
        })
    }

    #[test]
    fn unknown_attributes_never_widen_access() {
        let allow = policy("allow-get", AuthzAction::Allow, vec![get_rule()]);
        let deny = policy("deny-get", AuthzAction::Deny, vec![get_rule()]);
        // L4: the method is unknown. ALLOW does not match (fail closed), DENY does.
        assert!(!allow.matches(&conn(None)));
        assert!(deny.matches(&conn(None)));
        assert_eq!(authorize([&allow], &conn(None)).verdict, Verdict::Deny);
        assert_eq!(authorize([&deny], &conn(None)).verdict, Verdict::Deny);
        // L7: known.
        assert_eq!(authorize([&allow], &conn(get())).verdict, Verdict::Allow);
        assert_eq!(authorize([&deny], &conn(get())).verdict, Verdict::Deny);
        let post = Some(RequestAttrs {
            method: "POST".into(),
            ..Default::default()
        });
        assert_eq!(authorize([&deny], &conn(post)).verdict, Verdict::Allow);
    }

    #[test]
    fn an_allow_rule_with_any_l7_field_never_matches_at_l4() {
        // principals OR remoteIpBlocks: the principal alternative would decide the
        // match, but Istio's ztunnel rule (and ours) drops the whole rule at L4.
        let rule = AuthzRule {
            from: vec![
                SourceMatch {
                    principals: vec![StringMatch::Presence],
                    ..Default::default()
                },
                SourceMatch {
                    remote_ip_blocks: vec!["10.0.0.0/8".parse().unwrap()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let allow = policy("p", AuthzAction::Allow, vec![rule.clone()]);
        assert!(!allow.matches(&conn(None)));
        assert!(allow.matches(&conn(get())));
        assert_eq!(rule.l7_fields(), vec!["remoteIpBlocks".to_owned()]);
    }

    #[test]
    fn empty_policies_and_rules() {
        let allow_nothing = policy("spec-empty", AuthzAction::Allow, vec![]);
        let allow_all = policy(
            "rules-empty",
            AuthzAction::Allow,
            vec![AuthzRule::default()],
        );
        let deny_nothing = policy("deny-empty", AuthzAction::Deny, vec![]);
        let audit = policy("audit", AuthzAction::Audit, vec![AuthzRule::default()]);
        let c = conn(None);
        assert_eq!(
            authorize([&allow_nothing], &c).reason,
            DecisionReason::NoAllowMatched
        );
        assert!(authorize([&allow_all], &c).is_allowed());
        assert_eq!(
            authorize([&deny_nothing], &c).reason,
            DecisionReason::NoAllowPolicy
        );
        let d = authorize([&audit], &c);
        assert!(d.is_allowed());
        assert_eq!(d.audited_by, vec![id("audit")]);
        assert!(!authorize([&audit, &allow_nothing], &c).is_allowed());
    }

    #[test]
    fn an_unevaluable_alternative_makes_an_allow_rule_fail_closed_everywhere() {
        // requestPrincipals OR principals: as the wire protocol's
        // `unenforceable_fields`, the rule never matches, even at L7.
        let rule = AuthzRule {
            from: vec![
                SourceMatch {
                    request_principals: vec![StringMatch::Presence],
                    ..Default::default()
                },
                SourceMatch {
                    principals: vec![StringMatch::Presence],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert!(rule.names_unevaluable());
        let allow = policy("p", AuthzAction::Allow, vec![rule.clone()]);
        assert!(!allow.matches(&conn(None)));
        assert!(!allow.matches(&conn(get())));
        // In a DENY the known alternative still decides.
        let deny = policy("d", AuthzAction::Deny, vec![rule]);
        assert!(deny.matches(&conn(get())));
    }

    #[test]
    fn the_deciding_policy_does_not_depend_on_order() {
        let deny_b = policy("b", AuthzAction::Deny, vec![AuthzRule::default()]);
        let deny_a = policy("a", AuthzAction::Deny, vec![AuthzRule::default()]);
        let audit_z = policy("z", AuthzAction::Audit, vec![AuthzRule::default()]);
        let audit_y = policy("y", AuthzAction::Audit, vec![AuthzRule::default()]);
        let c = conn(None);
        let one = authorize([&deny_b, &audit_z, &deny_a, &audit_y], &c);
        let other = authorize([&audit_y, &deny_a, &audit_z, &deny_b], &c);
        assert_eq!(one, other);
        assert_eq!(one.reason, DecisionReason::DeniedBy(id("a")));
        assert_eq!(one.audited_by, vec![id("y"), id("z")]);
    }

    #[test]
    fn host_port_stripping() {
        assert_eq!(strip_port("a.b:8080"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
