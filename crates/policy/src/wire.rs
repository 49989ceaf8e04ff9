//! The proxies' side of the wire protocol's security resources: conversion of
//! `ambit.config.v1.Authorization` and `PeerAuthentication` into the model, and the
//! evaluation entry points the node daemon and the waypoint call.
//!
//! Conversion is strict: a value the proxy cannot interpret (an unknown enum, an
//! invalid IP block or port, a missing scope) is an error naming the resource and the
//! field, and the proxy NACKs the update that carried it, keeping its last good config.
//! The one tolerated unknown is a `StringMatch` without a kind, which the protocol
//! defines as never matching.
//!
//! ```text
//! resources ──ProxyPolicies::from_resources──▶ ProxyPolicies
//!   daemon:   authorize_l4(&dst WorkloadRef, &ConnectionAttrs) → Decision
//!             mtls_mode(&dst WorkloadRef, target port)         → MtlsMode
//!   waypoint: authorize_targets(&[PolicyTarget], &ConnectionAttrs with request) → Decision
//! ```

use ambit_api::{
    ResourceKey,
    config::v1::{
        self as proto, policy_scope, resource::Kind as ResourceKind, string_match::Kind as SmKind,
    },
};

use crate::{
    authz::{
        AuthzAction, AuthzScope, ConnectionAttrs, Decision, PathPattern, PathPatternError,
        PolicyTarget, TargetKind, authorize,
    },
    clause::{
        AttrMatch, Clause, ClausePolicy, ClauseRule, FullRegex, HeaderCondition, PathMatch,
        TextMatch,
    },
    peer_authn::{MtlsMode, PeerAuthn, PeerAuthnScope, effective_mtls_mode},
    types::{
        Cidr, CidrError, Enforcement, NamespaceName, ObjectId, PortError, PortNumber, StringMatch,
        WorkloadRef, WorkloadSelector,
    },
};

/// Kind recorded in the [`ObjectId`] of a converted `Authorization`.
pub const AUTHORIZATION_POLICY_KIND: &str = "AuthorizationPolicy";
/// Kind recorded in the [`ObjectId`] of a converted `PeerAuthentication`.
pub const PEER_AUTHENTICATION_KIND: &str = "PeerAuthentication";

/// A security resource the proxy cannot interpret.
#[derive(Debug, thiserror::Error)]
#[error("{resource}: invalid `{field}`")]
pub struct WireError {
    /// The resource's key, e.g. `Authorization/production/allow-checkout`.
    pub resource: String,
    /// Path of the offending field, e.g. `rules[0].clauses[1].matches[0].source_ips[2]`.
    pub field: String,
    /// What is wrong with it.
    #[source]
    pub problem: WireProblem,
}

/// What is wrong with a field of a security resource.
#[derive(Debug, thiserror::Error)]
pub enum WireProblem {
    /// A required field is absent.
    #[error("missing")]
    Missing,
    /// A required string is empty.
    #[error("must not be empty")]
    Empty,
    /// An enum value this proxy does not know (the protocol says: never guess).
    #[error("unknown enum value {0}")]
    UnknownEnum(i32),
    /// `PolicyScope.mesh` set to `false`.
    #[error("`mesh` must be true when set")]
    MeshFalse,
    /// A scope kind this resource does not allow.
    #[error("`{0}` scope is not allowed for this resource")]
    ScopeNotAllowed(&'static str),
    /// Not an IP block.
    #[error("invalid IP block")]
    IpBlock(#[source] CidrError),
    /// Not a port (1-65535).
    #[error("invalid port")]
    Port(#[source] PortError),
    /// A `path_template` outside `paths` / `not_paths`.
    #[error("path templates are only allowed in `paths` and `not_paths`")]
    TemplateOutsidePaths,
    /// An invalid `path_template`.
    #[error("invalid path template")]
    PathTemplate(#[source] PathPatternError),
    /// An invalid `regex`.
    #[error("invalid regular expression")]
    Regex(#[source] regex::Error),
    /// A creation time outside years 1-9999 or with nanoseconds out of range.
    #[error("timestamp {seconds}s {nanos}ns is out of range")]
    Timestamp {
        /// `seconds` as received.
        seconds: i64,
        /// `nanos` as received.
        nanos: i32,
    },
}

/// A field error before the resource is known to the caller.
struct Bad {
    field: String,
    problem: WireProblem,
}

type Res<T> = Result<T, Bad>;

fn bad(field: impl Into<String>, problem: WireProblem) -> Bad {
    Bad {
        field: field.into(),
        problem,
    }
}

/// The security policies one proxy received, ready to evaluate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyPolicies {
    authz: Vec<ClausePolicy>,
    peer_authn: Vec<PeerAuthn>,
}

impl ProxyPolicies {
    /// Converts every `Authorization` and `PeerAuthentication` among `resources`
    /// (other kinds are skipped). The first resource that fails conversion fails the
    /// whole set: the update carrying it must be NACKed.
    pub fn from_resources<'a>(
        resources: impl IntoIterator<Item = &'a proto::Resource>,
    ) -> Result<Self, WireError> {
        let mut out = Self::default();
        for r in resources {
            match &r.kind {
                Some(ResourceKind::Authorization(a)) => out.authz.push(authorization(a)?),
                Some(ResourceKind::PeerAuthentication(p)) => {
                    out.peer_authn.push(peer_authentication(p)?);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The node daemon's decision for a connection to `workload` (the destination
    /// pod): the policies selecting it by mesh, namespace or label selector. The daemon
    /// parses no request: `conn.request` is ignored and HTTP attributes are unknown.
    pub fn authorize_l4(&self, workload: &WorkloadRef, conn: &ConnectionAttrs) -> Decision {
        let l4;
        let conn = if conn.request.is_some() {
            l4 = ConnectionAttrs {
                request: None,
                ..conn.clone()
            };
            &l4
        } else {
            conn
        };
        authorize(
            self.authz.iter().filter(|p| p.selects_workload(workload)),
            conn,
        )
    }

    /// The waypoint's decision for a connection or request: the policies attached to
    /// any of `targets` (the destination Service and the waypoint's own Gateway).
    pub fn authorize_targets(&self, targets: &[PolicyTarget], conn: &ConnectionAttrs) -> Decision {
        authorize(
            self.authz
                .iter()
                .filter(|p| targets.iter().any(|t| p.targets(t))),
            conn,
        )
    }

    /// The mTLS mode of `workload`'s target `port`.
    pub fn mtls_mode(&self, workload: &WorkloadRef, port: u16) -> MtlsMode {
        effective_mtls_mode(&self.peer_authn, workload, port)
    }

    /// The converted authorization policies.
    pub fn authorizations(&self) -> &[ClausePolicy] {
        &self.authz
    }

    /// The converted peer authentication policies.
    pub fn peer_authentications(&self) -> &[PeerAuthn] {
        &self.peer_authn
    }
}

/// The namespace and labels policies select a workload by.
pub fn workload_ref(w: &proto::Workload) -> WorkloadRef {
    WorkloadRef {
        namespace: NamespaceName::new(w.namespace.clone()),
        labels: w.labels.clone(),
    }
}

/// A policy target for a Service (`targetRefs` kind `Service`).
pub fn service_target(namespace: &str, name: &str) -> PolicyTarget {
    PolicyTarget {
        kind: TargetKind::Service,
        namespace: NamespaceName::new(namespace),
        name: name.to_owned(),
    }
}

/// A policy target for a waypoint Gateway (`targetRefs` kind `Gateway`).
pub fn gateway_target(namespace: &str, name: &str) -> PolicyTarget {
    PolicyTarget {
        kind: TargetKind::Gateway,
        namespace: NamespaceName::new(namespace),
        name: name.to_owned(),
    }
}

/// Converts one `Authorization` resource.
pub fn authorization(a: &proto::Authorization) -> Result<ClausePolicy, WireError> {
    convert_authorization(a).map_err(|b| WireError {
        resource: ResourceKey::authorization(&a.namespace, &a.name).into(),
        field: b.field,
        problem: b.problem,
    })
}

/// Converts one `PeerAuthentication` resource.
pub fn peer_authentication(p: &proto::PeerAuthentication) -> Result<PeerAuthn, WireError> {
    convert_peer_authentication(p).map_err(|b| WireError {
        resource: ResourceKey::peer_authentication(&p.namespace, &p.name).into(),
        field: b.field,
        problem: b.problem,
    })
}

fn object_id(kind: &str, namespace: &str, name: &str, created: Option<String>) -> Res<ObjectId> {
    if namespace.is_empty() {
        return Err(bad("namespace", WireProblem::Empty));
    }
    if name.is_empty() {
        return Err(bad("name", WireProblem::Empty));
    }
    Ok(ObjectId {
        kind: kind.to_owned(),
        namespace: NamespaceName::new(namespace),
        name: name.to_owned(),
        created,
    })
}

fn convert_authorization(a: &proto::Authorization) -> Res<ClausePolicy> {
    let id = object_id(AUTHORIZATION_POLICY_KIND, &a.namespace, &a.name, None)?;
    let action = match proto::Action::try_from(a.action) {
        Ok(proto::Action::Allow) => AuthzAction::Allow,
        Ok(proto::Action::Deny) => AuthzAction::Deny,
        Ok(proto::Action::Audit) => AuthzAction::Audit,
        Ok(proto::Action::Unspecified) | Err(_) => {
            return Err(bad("action", WireProblem::UnknownEnum(a.action)));
        }
    };
    let scope = authz_scope(a.scope.as_ref())?;
    let rules = a
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule(&format!("rules[{i}]"), r))
        .collect::<Res<_>>()?;
    Ok(ClausePolicy {
        id,
        scope,
        action,
        rules,
    })
}

fn authz_scope(scope: Option<&proto::PolicyScope>) -> Res<AuthzScope> {
    let kind = scope
        .and_then(|s| s.kind.as_ref())
        .ok_or_else(|| bad("scope", WireProblem::Missing))?;
    Ok(match kind {
        policy_scope::Kind::Mesh(true) => AuthzScope::Mesh,
        policy_scope::Kind::Mesh(false) => return Err(bad("scope.mesh", WireProblem::MeshFalse)),
        policy_scope::Kind::Namespace(ns) => {
            AuthzScope::Namespace(namespace("scope.namespace", ns)?)
        }
        policy_scope::Kind::Selector(sel) => AuthzScope::Workloads {
            namespace: (!sel.namespace.is_empty()).then(|| NamespaceName::new(&sel.namespace)),
            selector: WorkloadSelector(sel.match_labels.clone()),
        },
        policy_scope::Kind::TargetRefs(refs) => {
            let mut targets = Vec::with_capacity(refs.services.len() + refs.gateways.len());
            for (list, kind, field) in [
                (&refs.services, TargetKind::Service, "services"),
                (&refs.gateways, TargetKind::Gateway, "gateways"),
            ] {
                for (i, t) in list.iter().enumerate() {
                    let at = format!("scope.target_refs.{field}[{i}]");
                    if t.name.is_empty() {
                        return Err(bad(format!("{at}.name"), WireProblem::Empty));
                    }
                    targets.push(PolicyTarget {
                        kind,
                        namespace: namespace(&format!("{at}.namespace"), &t.namespace)?,
                        name: t.name.clone(),
                    });
                }
            }
            AuthzScope::Targets(targets)
        }
    })
}

fn namespace(field: &str, ns: &str) -> Res<NamespaceName> {
    if ns.is_empty() {
        Err(bad(field, WireProblem::Empty))
    } else {
        Ok(NamespaceName::new(ns))
    }
}

fn rule(at: &str, r: &proto::Rule) -> Res<ClauseRule> {
    let clauses = r
        .clauses
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let at = format!("{at}.clauses[{i}]");
            let matches = c
                .matches
                .iter()
                .enumerate()
                .map(|(j, m)| attr_match(&format!("{at}.matches[{j}]"), m))
                .collect::<Res<_>>()?;
            Ok(Clause { matches })
        })
        .collect::<Res<_>>()?;
    Ok(ClauseRule {
        clauses,
        unenforceable_fields: r.unenforceable_fields.clone(),
    })
}

/// Converts each element of a repeated field, naming `<at>.<field>[<i>]` on error.
fn each<S, T>(
    at: &str,
    field: &str,
    items: &[S],
    convert: impl Fn(&S) -> Result<T, WireProblem>,
) -> Res<Vec<T>> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| convert(s).map_err(|p| bad(format!("{at}.{field}[{i}]"), p)))
        .collect()
}

fn attr_match(at: &str, m: &proto::Match) -> Res<AttrMatch> {
    Ok(AttrMatch {
        principals: each(at, "principals", &m.principals, text)?,
        not_principals: each(at, "not_principals", &m.not_principals, text)?,
        namespaces: each(at, "namespaces", &m.namespaces, text)?,
        not_namespaces: each(at, "not_namespaces", &m.not_namespaces, text)?,
        source_ips: each(at, "source_ips", &m.source_ips, ip_block)?,
        not_source_ips: each(at, "not_source_ips", &m.not_source_ips, ip_block)?,
        destination_ips: each(at, "destination_ips", &m.destination_ips, ip_block)?,
        not_destination_ips: each(at, "not_destination_ips", &m.not_destination_ips, ip_block)?,
        destination_ports: each(at, "destination_ports", &m.destination_ports, port)?,
        not_destination_ports: each(at, "not_destination_ports", &m.not_destination_ports, port)?,
        remote_ips: each(at, "remote_ips", &m.remote_ips, ip_block)?,
        not_remote_ips: each(at, "not_remote_ips", &m.not_remote_ips, ip_block)?,
        hosts: each(at, "hosts", &m.hosts, text)?,
        not_hosts: each(at, "not_hosts", &m.not_hosts, text)?,
        methods: each(at, "methods", &m.methods, text)?,
        not_methods: each(at, "not_methods", &m.not_methods, text)?,
        paths: each(at, "paths", &m.paths, path)?,
        not_paths: each(at, "not_paths", &m.not_paths, path)?,
        request_headers: m
            .request_headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let at = format!("{at}.request_headers[{i}]");
                if h.name.is_empty() {
                    return Err(bad(format!("{at}.name"), WireProblem::Empty));
                }
                Ok(HeaderCondition {
                    name: h.name.to_ascii_lowercase(),
                    values: each(&at, "values", &h.values, text)?,
                    not_values: each(&at, "not_values", &h.not_values, text)?,
                })
            })
            .collect::<Res<_>>()?,
    })
}

fn text(m: &proto::StringMatch) -> Result<TextMatch, WireProblem> {
    let pattern = |p: StringMatch| TextMatch::Pattern {
        pattern: p,
        ignore_case: m.ignore_case,
    };
    Ok(match &m.kind {
        None => TextMatch::Never,
        Some(SmKind::Exact(s)) => pattern(StringMatch::Exact(s.clone())),
        Some(SmKind::Prefix(s)) => pattern(StringMatch::Prefix(s.clone())),
        Some(SmKind::Suffix(s)) => pattern(StringMatch::Suffix(s.clone())),
        // `present: false` is not a meaningful matcher; as an unknown it never matches.
        Some(SmKind::Present(true)) => pattern(StringMatch::Presence),
        Some(SmKind::Present(false)) => TextMatch::Never,
        Some(SmKind::Regex(r)) => {
            TextMatch::Regex(FullRegex::new(r, m.ignore_case).map_err(WireProblem::Regex)?)
        }
        Some(SmKind::PathTemplate(_)) => return Err(WireProblem::TemplateOutsidePaths),
    })
}

fn path(m: &proto::StringMatch) -> Result<PathMatch, WireProblem> {
    match &m.kind {
        Some(SmKind::PathTemplate(t)) => PathPattern::parse_template(t)
            .map(PathMatch::Template)
            .map_err(WireProblem::PathTemplate),
        _ => text(m).map(PathMatch::Text),
    }
}

fn ip_block(b: &proto::IpBlock) -> Result<Cidr, WireProblem> {
    format!("{}/{}", b.address, b.prefix_len)
        .parse()
        .map_err(WireProblem::IpBlock)
}

fn port(p: &u32) -> Result<PortNumber, WireProblem> {
    PortNumber::new(i64::from(*p)).map_err(WireProblem::Port)
}

fn mtls_mode(field: &str, value: i32) -> Res<Option<MtlsMode>> {
    match proto::MtlsMode::try_from(value) {
        Ok(proto::MtlsMode::Unset) => Ok(None),
        Ok(proto::MtlsMode::Strict) => Ok(Some(MtlsMode::Strict)),
        Ok(proto::MtlsMode::Permissive) => Ok(Some(MtlsMode::Permissive)),
        Ok(proto::MtlsMode::Disable) => Ok(Some(MtlsMode::Disable)),
        Err(_) => Err(bad(field, WireProblem::UnknownEnum(value))),
    }
}

fn convert_peer_authentication(p: &proto::PeerAuthentication) -> Res<PeerAuthn> {
    let created = p
        .creation_time
        .as_ref()
        .map(|t| rfc3339(t.seconds, t.nanos).map_err(|e| bad("creation_time", e)))
        .transpose()?;
    let id = object_id(PEER_AUTHENTICATION_KIND, &p.namespace, &p.name, created)?;
    let kind = p
        .scope
        .as_ref()
        .and_then(|s| s.kind.as_ref())
        .ok_or_else(|| bad("scope", WireProblem::Missing))?;
    let scope = match kind {
        policy_scope::Kind::Mesh(true) => PeerAuthnScope::Mesh,
        policy_scope::Kind::Mesh(false) => return Err(bad("scope.mesh", WireProblem::MeshFalse)),
        policy_scope::Kind::Namespace(ns) => {
            PeerAuthnScope::Namespace(namespace("scope.namespace", ns)?)
        }
        policy_scope::Kind::Selector(sel) => PeerAuthnScope::Workloads {
            namespace: namespace("scope.selector.namespace", &sel.namespace)?,
            selector: WorkloadSelector(sel.match_labels.clone()),
        },
        policy_scope::Kind::TargetRefs(_) => {
            return Err(bad(
                "scope.target_refs",
                WireProblem::ScopeNotAllowed("target_refs"),
            ));
        }
    };
    let mode = mtls_mode("mode", p.mode)?;
    let mut port_modes = std::collections::BTreeMap::new();
    for (port_number, m) in &p.port_modes {
        let field = format!("port_modes[{port_number}]");
        let key = port(port_number).map_err(|e| bad(field.clone(), e))?;
        port_modes.insert(key, mtls_mode(&field, *m)?);
    }
    Ok(PeerAuthn {
        id,
        scope,
        mode,
        port_modes,
        // The controller already replaced rejected policies by their STRICT stand-ins.
        enforcement: Enforcement::AsWritten,
    })
}

/// A timestamp in the model's form for creation times (`ObjectId::created`): RFC 3339
/// UTC with nine fractional digits, fixed width, so that text order is time order.
fn rfc3339(seconds: i64, nanos: i32) -> Result<String, WireProblem> {
    let out_of_range = || WireProblem::Timestamp { seconds, nanos };
    let nanos_u = u32::try_from(nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(out_of_range)?;
    let days = seconds.div_euclid(86_400);
    let secs_of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    if !(1..=9999).contains(&year) {
        return Err(out_of_range());
    }
    Ok(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos_u:09}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
    ))
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ambit_api::config::v1::{Resource, resource::Kind};

    use super::*;
    use crate::authz::{PeerIdentity, RequestAttrs, Verdict};

    fn exact(s: &str) -> proto::StringMatch {
        proto::StringMatch {
            kind: Some(SmKind::Exact(s.into())),
            ignore_case: false,
        }
    }

    fn selector(ns: &str, labels: &[(&str, &str)]) -> proto::PolicyScope {
        proto::PolicyScope {
            kind: Some(policy_scope::Kind::Selector(proto::WorkloadSelector {
                namespace: ns.into(),
                match_labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            })),
        }
    }

    fn authz(name: &str, action: proto::Action, rules: Vec<proto::Rule>) -> proto::Authorization {
        proto::Authorization {
            name: name.into(),
            namespace: "production".into(),
            scope: Some(selector("production", &[("app", "payment")])),
            action: action as i32,
            rules,
        }
    }

    fn one_clause(m: proto::Match) -> proto::Rule {
        proto::Rule {
            clauses: vec![proto::Clause { matches: vec![m] }],
            unenforceable_fields: vec![],
        }
    }

    fn payment() -> WorkloadRef {
        WorkloadRef {
            namespace: NamespaceName::new("production"),
            labels: BTreeMap::from([("app".to_owned(), "payment".to_owned())]),
        }
    }

    fn conn(sa: Option<&str>) -> ConnectionAttrs {
        ConnectionAttrs {
            source: sa.map(|sa| PeerIdentity {
                trust_domain: "cluster.local".into(),
                namespace: "production".into(),
                service_account: sa.into(),
            }),
            source_ip: "10.244.1.2".parse().unwrap(),
            destination_ip: "10.244.1.3".parse().unwrap(),
            destination_port: 8080,
            request: None,
        }
    }

    fn policies(list: Vec<proto::Authorization>) -> ProxyPolicies {
        let resources: Vec<Resource> = list
            .into_iter()
            .map(|a| Resource::new(Kind::Authorization(a)))
            .collect();
        ProxyPolicies::from_resources(&resources).unwrap()
    }

    #[test]
    fn allow_by_principal_at_the_daemon() {
        let p = policies(vec![authz(
            "checkout-only",
            proto::Action::Allow,
            vec![one_clause(proto::Match {
                principals: vec![exact("cluster.local/ns/production/sa/checkout")],
                ..Default::default()
            })],
        )]);
        let w = payment();
        assert!(p.authorize_l4(&w, &conn(Some("checkout"))).is_allowed());
        assert!(!p.authorize_l4(&w, &conn(Some("inventory"))).is_allowed());
        assert!(!p.authorize_l4(&w, &conn(None)).is_allowed());
        let other = WorkloadRef {
            labels: BTreeMap::new(),
            ..payment()
        };
        assert!(p.authorize_l4(&other, &conn(None)).is_allowed());
    }

    #[test]
    fn unenforceable_fields_fail_closed() {
        let rule = proto::Rule {
            clauses: vec![proto::Clause {
                matches: vec![proto::Match {
                    principals: vec![exact("cluster.local/ns/production/sa/checkout")],
                    ..Default::default()
                }],
            }],
            unenforceable_fields: vec!["to[0].operation.methods".into()],
        };
        let allow = policies(vec![authz("a", proto::Action::Allow, vec![rule.clone()])]);
        let deny = policies(vec![authz("d", proto::Action::Deny, vec![rule])]);
        let w = payment();
        // ALLOW never matches: nobody is allowed.
        assert!(!allow.authorize_l4(&w, &conn(Some("checkout"))).is_allowed());
        // DENY is decided on the remaining clause.
        assert!(!deny.authorize_l4(&w, &conn(Some("checkout"))).is_allowed());
        assert!(deny.authorize_l4(&w, &conn(Some("inventory"))).is_allowed());
    }

    #[test]
    fn l7_fields_at_the_waypoint() {
        let a = proto::Authorization {
            scope: Some(proto::PolicyScope {
                kind: Some(policy_scope::Kind::TargetRefs(proto::TargetRefs {
                    services: vec![proto::NamespacedName {
                        namespace: "production".into(),
                        name: "payment".into(),
                    }],
                    gateways: vec![],
                })),
            }),
            ..authz(
                "get",
                proto::Action::Allow,
                vec![one_clause(proto::Match {
                    methods: vec![exact("GET")],
                    paths: vec![proto::StringMatch {
                        kind: Some(SmKind::PathTemplate("/api/{*}/orders".into())),
                        ignore_case: false,
                    }],
                    request_headers: vec![proto::HeaderCondition {
                        name: "X-Tenant".into(),
                        values: vec![exact("acme")],
                        not_values: vec![],
                    }],
                    ..Default::default()
                })],
            )
        };
        let p = policies(vec![a]);
        let targets = [
            service_target("production", "payment"),
            gateway_target("production", "waypoint"),
        ];
        let req = |method: &str, path: &str| ConnectionAttrs {
            request: Some(RequestAttrs {
                method: method.into(),
                path: path.into(),
                host: "payment".into(),
                headers: vec![("x-tenant".into(), "acme".into())],
                remote_ip: None,
            }),
            ..conn(Some("checkout"))
        };
        let decide = |c: &ConnectionAttrs| p.authorize_targets(&targets, c).verdict;
        assert_eq!(decide(&req("GET", "/api/v1/orders?x=1")), Verdict::Allow);
        assert_eq!(decide(&req("POST", "/api/v1/orders")), Verdict::Deny);
        assert_eq!(decide(&req("GET", "/api/v1/orders/1")), Verdict::Deny);
        // A plain connection through the waypoint: the HTTP attributes are unknown.
        assert_eq!(decide(&conn(Some("checkout"))), Verdict::Deny);
        // Another service is not targeted.
        let other = [service_target("production", "inventory")];
        assert!(p.authorize_targets(&other, &req("POST", "/")).is_allowed());
    }

    #[test]
    fn errors_name_the_resource_and_field() {
        let mut a = authz(
            "bad",
            proto::Action::Allow,
            vec![one_clause(proto::Match {
                source_ips: vec![
                    proto::IpBlock {
                        address: "10.0.0.0".into(),
                        prefix_len: 8,
                    },
                    proto::IpBlock {
                        address: "10.0.0.0".into(),
                        prefix_len: 99,
                    },
                ],
                ..Default::default()
            })],
        );
        let e = authorization(&a).unwrap_err();
        assert_eq!(e.resource, "Authorization/production/bad");
        assert_eq!(e.field, "rules[0].clauses[0].matches[0].source_ips[1]");
        assert!(matches!(e.problem, WireProblem::IpBlock(_)));
        assert_eq!(
            e.to_string(),
            "Authorization/production/bad: invalid `rules[0].clauses[0].matches[0].source_ips[1]`"
        );

        a.rules.clear();
        a.action = 0;
        let e = authorization(&a).unwrap_err();
        assert_eq!(e.field, "action");
        a.action = 42;
        assert!(matches!(
            authorization(&a).unwrap_err().problem,
            WireProblem::UnknownEnum(42)
        ));
        a.action = proto::Action::Deny as i32;
        a.scope = None;
        assert_eq!(authorization(&a).unwrap_err().field, "scope");

        let port_zero = authz(
            "p",
            proto::Action::Allow,
            vec![one_clause(proto::Match {
                not_destination_ports: vec![0],
                ..Default::default()
            })],
        );
        assert_eq!(
            authorization(&port_zero).unwrap_err().field,
            "rules[0].clauses[0].matches[0].not_destination_ports[0]"
        );
        let template_in_hosts = authz(
            "h",
            proto::Action::Allow,
            vec![one_clause(proto::Match {
                hosts: vec![proto::StringMatch {
                    kind: Some(SmKind::PathTemplate("/a/{*}".into())),
                    ignore_case: true,
                }],
                ..Default::default()
            })],
        );
        assert!(matches!(
            authorization(&template_in_hosts).unwrap_err().problem,
            WireProblem::TemplateOutsidePaths
        ));
    }

    #[test]
    fn a_matcher_without_kind_never_matches() {
        let p = policies(vec![authz(
            "never",
            proto::Action::Allow,
            vec![one_clause(proto::Match {
                principals: vec![proto::StringMatch {
                    kind: None,
                    ignore_case: false,
                }],
                ..Default::default()
            })],
        )]);
        assert!(
            !p.authorize_l4(&payment(), &conn(Some("checkout")))
                .is_allowed()
        );
    }

    #[test]
    fn regex_matchers_match_whole_values() {
        let m = text(&proto::StringMatch {
            kind: Some(SmKind::Regex("cluster\\.local/ns/prod[a-z]*/sa/.+".into())),
            ignore_case: false,
        })
        .unwrap();
        assert!(m.matches("cluster.local/ns/production/sa/checkout"));
        assert!(!m.matches("x/cluster.local/ns/production/sa/checkout"));
        assert!(
            text(&proto::StringMatch {
                kind: Some(SmKind::Regex("(".into())),
                ignore_case: false,
            })
            .is_err()
        );
    }

    fn peer(
        name: &str,
        scope: proto::PolicyScope,
        mode: proto::MtlsMode,
        created: Option<i64>,
    ) -> proto::PeerAuthentication {
        proto::PeerAuthentication {
            name: name.into(),
            namespace: "production".into(),
            scope: Some(scope),
            mode: mode as i32,
            port_modes: BTreeMap::new(),
            creation_time: created.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
        }
    }

    #[test]
    fn peer_authentication_precedence() {
        let ns = |n: &str| proto::PolicyScope {
            kind: Some(policy_scope::Kind::Namespace(n.into())),
        };
        let mut wl = peer(
            "wl",
            selector("production", &[("app", "payment")]),
            proto::MtlsMode::Unset,
            None,
        );
        wl.port_modes
            .insert(9090, proto::MtlsMode::Permissive as i32);
        let resources: Vec<Resource> = [
            peer(
                "newer",
                ns("production"),
                proto::MtlsMode::Permissive,
                Some(2_000_000_000),
            ),
            peer(
                "older",
                ns("production"),
                proto::MtlsMode::Strict,
                Some(1_000_000_000),
            ),
            wl,
        ]
        .into_iter()
        .map(|p| Resource::new(Kind::PeerAuthentication(p)))
        .collect();
        let p = ProxyPolicies::from_resources(&resources).unwrap();
        assert_eq!(p.mtls_mode(&payment(), 8080), MtlsMode::Strict);
        assert_eq!(p.mtls_mode(&payment(), 9090), MtlsMode::Permissive);
        assert_eq!(
            p.peer_authentications()[1].id.created.as_deref(),
            Some("2001-09-09T01:46:40.000000000Z")
        );
    }

    #[test]
    fn peer_authentication_errors() {
        let mut p = peer(
            "x",
            selector("", &[("app", "payment")]),
            proto::MtlsMode::Strict,
            None,
        );
        assert_eq!(
            peer_authentication(&p).unwrap_err().field,
            "scope.selector.namespace"
        );
        p.scope = Some(selector("production", &[]));
        p.port_modes.insert(8080, 7);
        let e = peer_authentication(&p).unwrap_err();
        assert_eq!(e.resource, "PeerAuthentication/production/x");
        assert_eq!(e.field, "port_modes[8080]");
        p.port_modes.clear();
        p.creation_time = Some(prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        });
        assert_eq!(peer_authentication(&p).unwrap_err().field, "creation_time");
    }

    #[test]
    fn timestamps_format_like_the_controller() {
        assert_eq!(rfc3339(0, 0).unwrap(), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_714_979_289, 123_456_789).unwrap(),
            "2024-05-06T07:08:09.123456789Z"
        );
        assert_eq!(
            rfc3339(951_782_400, 0).unwrap(),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(
            rfc3339(-86_400, 0).unwrap(),
            "1969-12-31T00:00:00.000000000Z"
        );
        assert!(rfc3339(i64::MAX / 2, 0).is_err());
    }
}
