//! AuthorizationPolicy and PeerAuthentication into `Authorization` and
//! `PeerAuthentication` resources.
//!
//! Rules are normalised as `security.proto` documents: `from` becomes one clause with
//! one match per source, `to` one clause with one match per operation, each `when`
//! condition a clause of its own. Attributes the receiving proxy cannot evaluate are
//! removed from the clauses and listed in `Rule.unenforceable_fields`, which makes an
//! ALLOW rule never match and a DENY rule match more (fail closed):
//!
//! - at a node daemon: every HTTP attribute (hosts, methods, paths, `remoteIpBlocks`,
//!   `request.headers[…]`, `remote.ip`);
//! - everywhere: request authentication (`requestPrincipals`, `request.auth.*`) and
//!   the other attributes Ambit cannot evaluate (`connection.sni`, `experimental.*`).
//!
//! `serviceAccounts` become exact principals in the mesh's trust domain. Where a
//! source sets both `principals` and `serviceAccounts` (both must hold), the match
//! keeps the service-account principals the patterns accept, which is exactly their
//! intersection.
//!
//! **`targetRefs` policies** are waypoint policies. For a target Service assigned to an
//! accepted waypoint, that waypoint receives the policy; for one assigned to a missing
//! waypoint nothing needs enforcing (its traffic is refused). For a Service *without*
//! a waypoint Istio enforces the policy nowhere; Ambit instead enforces it at the node
//! daemons of the Service's endpoints, scoped by the Service's selector, with its L4
//! part only (so an ALLOW with HTTP attributes denies, never opens), with ports mapped
//! to target ports and `destination.ip` treated as unenforceable (the daemon sees pod
//! addresses, not the VIP). The policy's status says so.

use std::collections::BTreeMap;

use ambit_api::config::v1::{
    Action, Authorization, Clause, HeaderCondition, IpBlock, Match, MtlsMode as ProtoMtlsMode,
    NamespacedName, PeerAuthentication, PolicyScope, Resource, Rule, StringMatch as ProtoMatch,
    TargetRefs, WorkloadSelector as ProtoSelector, policy_scope, resource::Kind, string_match,
};
use ambit_identity::TrustDomain;

use super::{
    Applies, GatewayKey, NodePolicy, Notes, ObjectKey, Objects,
    cluster::{Binding, Mesh, ServiceKey},
};
use crate::model::{
    Cidr, NamespaceName, StringMatch, WorkloadSelector,
    authz::{
        AuthzAction, AuthzPolicy, AuthzRule, AuthzScope, Condition, ConditionKey, ConditionValue,
        OperationMatch, PathPattern, SourceMatch, TargetKind, TemplateSegment,
    },
    peer_authn::{MtlsMode, PeerAuthn, PeerAuthnScope},
};

/// Where a translated policy is enforced.
#[derive(Clone, Debug)]
pub enum Point {
    /// A node daemon, for the policy's own scope.
    Node,
    /// A node daemon, standing in for a waypoint that does not exist: service ports are
    /// mapped to target ports; `destination.ip` cannot be honoured.
    NodeForService {
        /// Service port → target port.
        target_ports: BTreeMap<u16, u16>,
    },
    /// A waypoint.
    Waypoint,
}

impl Point {
    fn is_node(&self) -> bool {
        !matches!(self, Self::Waypoint)
    }

    fn port(&self, port: u16) -> u32 {
        match self {
            Self::NodeForService { target_ports } => {
                u32::from(target_ports.get(&port).copied().unwrap_or(port))
            }
            _ => u32::from(port),
        }
    }
}

/// A target Service without a waypoint: its key, selector and port mapping.
type Unbound = (ServiceKey, BTreeMap<String, String>, BTreeMap<u16, u16>);

/// What [`translate`] produces.
#[derive(Debug, Default)]
pub(crate) struct Security {
    /// Daemon-enforced policies.
    pub node_policies: Vec<NodePolicy>,
    /// Waypoint-enforced policies, per waypoint, by key.
    pub waypoint_policies: BTreeMap<GatewayKey, BTreeMap<String, Resource>>,
}

fn string_match(m: &StringMatch) -> ProtoMatch {
    let kind = match m {
        StringMatch::Exact(s) => string_match::Kind::Exact(s.clone()),
        StringMatch::Prefix(s) => string_match::Kind::Prefix(s.clone()),
        StringMatch::Suffix(s) => string_match::Kind::Suffix(s.clone()),
        StringMatch::Presence => string_match::Kind::Present(true),
    };
    ProtoMatch {
        kind: Some(kind),
        ignore_case: false,
    }
}

fn exact(s: impl Into<String>) -> ProtoMatch {
    ProtoMatch {
        kind: Some(string_match::Kind::Exact(s.into())),
        ignore_case: false,
    }
}

/// A matcher that never matches (no kind: proxies treat it as never matching).
fn never() -> ProtoMatch {
    ProtoMatch {
        kind: None,
        ignore_case: false,
    }
}

fn ip_block(c: &Cidr) -> IpBlock {
    IpBlock {
        address: c.addr().to_string(),
        prefix_len: u32::from(c.prefix_len()),
    }
}

fn path_match(p: &PathPattern) -> ProtoMatch {
    match p {
        PathPattern::Match(m) => string_match(m),
        PathPattern::Template(segments) => {
            let mut t = String::new();
            for s in segments {
                t.push('/');
                match s {
                    TemplateSegment::Literal(l) => t.push_str(l),
                    TemplateSegment::One => t.push_str("{*}"),
                    TemplateSegment::Rest => t.push_str("{**}"),
                }
            }
            ProtoMatch {
                kind: Some(string_match::Kind::PathTemplate(t)),
                ignore_case: false,
            }
        }
    }
}

fn host_match(m: &StringMatch) -> ProtoMatch {
    ProtoMatch {
        ignore_case: true,
        ..string_match(m)
    }
}

fn principal(td: &TrustDomain, namespace: &str, sa: &str) -> String {
    format!("{td}/ns/{namespace}/sa/{sa}")
}

struct RuleBuilder<'a> {
    point: &'a Point,
    td: &'a TrustDomain,
    unenforceable: Vec<String>,
}

impl RuleBuilder<'_> {
    /// Whether an L7 field can be kept; records it as unenforceable otherwise.
    fn l7(&mut self, present: bool, path: impl FnOnce() -> String) -> bool {
        if !present {
            return false;
        }
        if self.point.is_node() {
            self.unenforceable.push(path());
            false
        } else {
            true
        }
    }

    fn source(&mut self, j: usize, s: &SourceMatch) -> Match {
        let path = |f: &str| format!("from[{j}].source.{f}");
        let mut m = Match::default();
        let sa_principals: Vec<String> = s
            .service_accounts
            .iter()
            .map(|sa| principal(self.td, &sa.namespace, &sa.name))
            .collect();
        m.principals = if sa_principals.is_empty() {
            s.principals.iter().map(string_match).collect()
        } else if s.principals.is_empty() {
            sa_principals.into_iter().map(exact).collect()
        } else {
            let both: Vec<ProtoMatch> = sa_principals
                .into_iter()
                .filter(|p| s.principals.iter().any(|m| m.matches(p)))
                .map(exact)
                .collect();
            if both.is_empty() { vec![never()] } else { both }
        };
        m.not_principals = s.not_principals.iter().map(string_match).collect();
        m.not_principals.extend(
            s.not_service_accounts
                .iter()
                .map(|sa| exact(principal(self.td, &sa.namespace, &sa.name))),
        );
        m.namespaces = s.namespaces.iter().map(string_match).collect();
        m.not_namespaces = s.not_namespaces.iter().map(string_match).collect();
        m.source_ips = s.ip_blocks.iter().map(ip_block).collect();
        m.not_source_ips = s.not_ip_blocks.iter().map(ip_block).collect();
        if self.l7(!s.remote_ip_blocks.is_empty(), || path("remoteIpBlocks")) {
            m.remote_ips = s.remote_ip_blocks.iter().map(ip_block).collect();
        }
        if self.l7(!s.not_remote_ip_blocks.is_empty(), || {
            path("notRemoteIpBlocks")
        }) {
            m.not_remote_ips = s.not_remote_ip_blocks.iter().map(ip_block).collect();
        }
        // Request authentication (JWT) is implemented nowhere.
        if !s.request_principals.is_empty() {
            self.unenforceable.push(path("requestPrincipals"));
        }
        if !s.not_request_principals.is_empty() {
            self.unenforceable.push(path("notRequestPrincipals"));
        }
        m
    }

    fn operation(&mut self, j: usize, o: &OperationMatch) -> Match {
        let path = |f: &str| format!("to[{j}].operation.{f}");
        let mut m = Match {
            destination_ports: o.ports.iter().map(|p| self.point.port(p.get())).collect(),
            not_destination_ports: o
                .not_ports
                .iter()
                .map(|p| self.point.port(p.get()))
                .collect(),
            ..Match::default()
        };
        if self.l7(!o.hosts.is_empty(), || path("hosts")) {
            m.hosts = o.hosts.iter().map(host_match).collect();
        }
        if self.l7(!o.not_hosts.is_empty(), || path("notHosts")) {
            m.not_hosts = o.not_hosts.iter().map(host_match).collect();
        }
        if self.l7(!o.methods.is_empty(), || path("methods")) {
            m.methods = o.methods.iter().map(|s| exact(s.clone())).collect();
        }
        if self.l7(!o.not_methods.is_empty(), || path("notMethods")) {
            m.not_methods = o.not_methods.iter().map(|s| exact(s.clone())).collect();
        }
        if self.l7(!o.paths.is_empty(), || path("paths")) {
            m.paths = o.paths.iter().map(path_match).collect();
        }
        if self.l7(!o.not_paths.is_empty(), || path("notPaths")) {
            m.not_paths = o.not_paths.iter().map(path_match).collect();
        }
        m
    }

    /// One `when` condition as a clause; `None` when it is unenforceable here.
    fn condition(&mut self, k: usize, c: &Condition) -> Option<Clause> {
        let unenforceable = |b: &mut Self| {
            b.unenforceable.push(format!("when[{k}].key={}", c.key));
            None
        };
        let ips = |vals: &[ConditionValue]| -> Vec<IpBlock> {
            vals.iter()
                .filter_map(|v| match v {
                    ConditionValue::Ip(c) => Some(ip_block(c)),
                    _ => None,
                })
                .collect()
        };
        let strings = |vals: &[ConditionValue]| -> Vec<ProtoMatch> {
            vals.iter()
                .filter_map(|v| match v {
                    ConditionValue::String(m) => Some(string_match(m)),
                    _ => None,
                })
                .collect()
        };
        let ports = |vals: &[ConditionValue], point: &Point| -> Vec<u32> {
            vals.iter()
                .filter_map(|v| match v {
                    ConditionValue::Port(p) => Some(point.port(p.get())),
                    _ => None,
                })
                .collect()
        };
        let mut m = Match::default();
        match &c.key {
            ConditionKey::SourceIp => {
                m.source_ips = ips(&c.values);
                m.not_source_ips = ips(&c.not_values);
            }
            ConditionKey::SourceNamespace => {
                m.namespaces = strings(&c.values);
                m.not_namespaces = strings(&c.not_values);
            }
            ConditionKey::SourcePrincipal => {
                m.principals = strings(&c.values);
                m.not_principals = strings(&c.not_values);
            }
            ConditionKey::DestinationIp => {
                if matches!(self.point, Point::NodeForService { .. }) {
                    return unenforceable(self);
                }
                m.destination_ips = ips(&c.values);
                m.not_destination_ips = ips(&c.not_values);
            }
            ConditionKey::DestinationPort => {
                m.destination_ports = ports(&c.values, self.point);
                m.not_destination_ports = ports(&c.not_values, self.point);
            }
            ConditionKey::RemoteIp => {
                if self.point.is_node() {
                    return unenforceable(self);
                }
                m.remote_ips = ips(&c.values);
                m.not_remote_ips = ips(&c.not_values);
            }
            ConditionKey::RequestHeader(name) => {
                if self.point.is_node() {
                    return unenforceable(self);
                }
                m.request_headers = vec![HeaderCondition {
                    name: name.clone(),
                    values: strings(&c.values),
                    not_values: strings(&c.not_values),
                }];
            }
            ConditionKey::Unevaluable(_) => return unenforceable(self),
        }
        Some(Clause { matches: vec![m] })
    }

    fn rule(mut self, r: &AuthzRule) -> Rule {
        let mut clauses = Vec::new();
        if !r.from.is_empty() {
            let matches = r
                .from
                .iter()
                .enumerate()
                .map(|(j, s)| self.source(j, s))
                .collect();
            clauses.push(Clause { matches });
        }
        if !r.to.is_empty() {
            let matches =
                r.to.iter()
                    .enumerate()
                    .map(|(j, o)| self.operation(j, o))
                    .collect();
            clauses.push(Clause { matches });
        }
        for (k, c) in r.when.iter().enumerate() {
            if let Some(clause) = self.condition(k, c) {
                clauses.push(clause);
            }
        }
        Rule {
            clauses,
            unenforceable_fields: self.unenforceable,
        }
    }
}

fn selector_scope(namespace: Option<&NamespaceName>, selector: &WorkloadSelector) -> PolicyScope {
    PolicyScope {
        kind: Some(policy_scope::Kind::Selector(ProtoSelector {
            namespace: namespace.map(|n| n.as_str().to_owned()).unwrap_or_default(),
            match_labels: selector.0.clone(),
        })),
    }
}

/// The wire scope of a policy enforced at the node daemon.
fn node_scope(scope: &AuthzScope) -> Option<PolicyScope> {
    let kind = match scope {
        AuthzScope::Mesh => policy_scope::Kind::Mesh(true),
        AuthzScope::Namespace(ns) => policy_scope::Kind::Namespace(ns.as_str().to_owned()),
        AuthzScope::Workloads {
            namespace,
            selector,
        } => return Some(selector_scope(namespace.as_ref(), selector)),
        AuthzScope::Targets(_) => return None,
    };
    Some(PolicyScope { kind: Some(kind) })
}

/// An authorization policy for one enforcement point.
pub fn authorization(
    policy: &AuthzPolicy,
    scope: PolicyScope,
    point: &Point,
    trust_domain: &TrustDomain,
) -> Authorization {
    let action = match policy.action {
        AuthzAction::Allow => Action::Allow,
        AuthzAction::Deny => Action::Deny,
        AuthzAction::Audit => Action::Audit,
    };
    Authorization {
        name: policy.id.name.clone(),
        namespace: policy.id.namespace.as_str().to_owned(),
        scope: Some(scope),
        action: action as i32,
        rules: policy
            .rules
            .iter()
            .map(|r| {
                RuleBuilder {
                    point,
                    td: trust_domain,
                    unenforceable: Vec::new(),
                }
                .rule(r)
            })
            .collect(),
    }
}

fn mtls_mode(m: Option<MtlsMode>) -> ProtoMtlsMode {
    match m {
        None => ProtoMtlsMode::Unset,
        Some(MtlsMode::Strict) => ProtoMtlsMode::Strict,
        Some(MtlsMode::Permissive) => ProtoMtlsMode::Permissive,
        Some(MtlsMode::Disable) => ProtoMtlsMode::Disable,
    }
}

/// `ObjectId.created` (fixed-width RFC 3339) back into a time.
fn creation_time(created: Option<&str>) -> Option<std::time::SystemTime> {
    let ts: k8s_openapi::jiff::Timestamp = created?.parse().ok()?;
    let secs = u64::try_from(ts.as_second()).ok()?;
    let nanos = u32::try_from(ts.subsec_nanosecond()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
}

/// A peer authentication policy for the node daemons.
pub fn peer_authentication(policy: &PeerAuthn) -> PeerAuthentication {
    let scope = match &policy.scope {
        PeerAuthnScope::Mesh => PolicyScope {
            kind: Some(policy_scope::Kind::Mesh(true)),
        },
        PeerAuthnScope::Namespace(ns) => PolicyScope {
            kind: Some(policy_scope::Kind::Namespace(ns.as_str().to_owned())),
        },
        PeerAuthnScope::Workloads {
            namespace,
            selector,
        } => selector_scope(Some(namespace), selector),
    };
    PeerAuthentication {
        name: policy.id.name.clone(),
        namespace: policy.id.namespace.as_str().to_owned(),
        scope: Some(scope),
        mode: mtls_mode(policy.mode) as i32,
        port_modes: policy
            .port_modes
            .iter()
            .map(|(p, m)| (u32::from(p.get()), mtls_mode(*m) as i32))
            .collect(),
        creation_time: creation_time(policy.id.created.as_deref())
            .map(ambit_api::time::timestamp_to_proto),
    }
}

fn nn(namespace: &str, name: &str) -> NamespacedName {
    NamespacedName {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

/// Translates every policy in force.
pub(crate) fn translate(
    objects: &Objects<'_>,
    mesh: &Mesh<'_>,
    trust_domain: &TrustDomain,
    notes: &mut Notes,
) -> Security {
    let mut out = Security::default();
    for policy in &objects.authz {
        let me = ObjectKey::new(
            "AuthorizationPolicy",
            Some(policy.id.namespace.as_str()),
            &policy.id.name,
        );
        if let Some(scope) = node_scope(&policy.scope) {
            let a = authorization(policy, scope, &Point::Node, trust_domain);
            out.node_policies.push(NodePolicy {
                resource: Resource::new(Kind::Authorization(a)),
                applies: Applies::Authz(policy.scope.clone()),
            });
            continue;
        }
        let AuthzScope::Targets(targets) = &policy.scope else {
            continue;
        };
        let mut refs = TargetRefs::default();
        let mut waypoints: Vec<GatewayKey> = Vec::new();
        let mut unbound: Vec<Unbound> = Vec::new();
        for t in targets {
            let ns = t.namespace.as_str();
            match t.kind {
                TargetKind::Gateway => {
                    refs.gateways.push(nn(ns, &t.name));
                    let g = GatewayKey {
                        namespace: ns.to_owned(),
                        name: t.name.clone(),
                    };
                    if objects.waypoints.contains_key(&g) {
                        waypoints.push(g);
                    } else {
                        notes.add(
                            me.clone(),
                            format!("target Gateway {g} is not an accepted waypoint: nothing enforces this policy for it"),
                        );
                    }
                }
                TargetKind::Service => {
                    refs.services.push(nn(ns, &t.name));
                    let key = ServiceKey::new(ns, &t.name);
                    match mesh.service(&key).map(|s| (&s.binding, s)) {
                        None => notes.add(
                            me.clone(),
                            format!("target Service {ns}/{} does not exist: nothing to enforce", t.name),
                        ),
                        Some((Binding::Waypoint(g), _)) => waypoints.push(g.clone()),
                        Some((Binding::FailClosed(g), _)) => notes.add(
                            me.clone(),
                            format!("target Service {ns}/{} is assigned to waypoint {g}, which is not available: its traffic is refused", t.name),
                        ),
                        Some((Binding::Direct, info)) => match &info.selector {
                            Some(sel) => unbound.push((key, sel.clone(), info.target_ports.clone())),
                            None => notes.add(
                                me.clone(),
                                format!("target Service {ns}/{} has no waypoint and no selector: this policy is enforced nowhere for it", t.name),
                            ),
                        },
                    }
                }
            }
        }
        if !waypoints.is_empty() {
            let scope = PolicyScope {
                kind: Some(policy_scope::Kind::TargetRefs(refs)),
            };
            let a = authorization(policy, scope, &Point::Waypoint, trust_domain);
            let r = Resource::new(Kind::Authorization(a));
            for g in waypoints {
                out.waypoint_policies
                    .entry(g)
                    .or_default()
                    .insert(r.key.clone(), r.clone());
            }
        }
        if let Some(np) = stand_in_for_unbound(policy, &unbound, trust_domain, &me, notes) {
            out.node_policies.push(np);
        }
    }
    for policy in &objects.peer_authn {
        let p = peer_authentication(policy);
        out.node_policies.push(NodePolicy {
            resource: Resource::new(Kind::PeerAuthentication(p)),
            applies: Applies::PeerAuthn(policy.scope.clone()),
        });
    }
    out
}

/// The node-enforced stand-in of a `targetRefs` policy whose target Services have no
/// waypoint (module docs).
fn stand_in_for_unbound(
    policy: &AuthzPolicy,
    unbound: &[Unbound],
    trust_domain: &TrustDomain,
    me: &ObjectKey,
    notes: &mut Notes,
) -> Option<NodePolicy> {
    let (first, rest) = unbound.split_first()?;
    let names: Vec<String> = unbound
        .iter()
        .map(|(k, _, _)| format!("{}/{}", k.namespace, k.name))
        .collect();
    let same_selector = rest.iter().all(|(_, s, _)| *s == first.1);
    let namespace = NamespaceName::new(first.0.namespace.clone());
    let scope = if same_selector {
        AuthzScope::Workloads {
            namespace: Some(namespace),
            selector: WorkloadSelector(first.1.clone()),
        }
    } else {
        // A union of selectors cannot be expressed: the whole namespace is stricter,
        // never more open.
        AuthzScope::Namespace(namespace)
    };
    let mut target_ports = BTreeMap::new();
    for (_, _, ports) in unbound {
        for (p, t) in ports {
            target_ports.entry(*p).or_insert(*t);
        }
    }
    let wire_scope = node_scope(&scope)?;
    let a = authorization(
        policy,
        wire_scope,
        &Point::NodeForService { target_ports },
        trust_domain,
    );
    let where_ = if same_selector {
        "the node daemons of its endpoints (by the Service's selector)"
    } else {
        "the node daemons for every workload of the namespace (the targets' selectors differ)"
    };
    notes.add(
        me.clone(),
        format!(
            "target Service(s) {} have no waypoint: enforced instead by {where_}, at L4 only — rules using HTTP attributes cannot match there (fail closed)",
            names.join(", ")
        ),
    );
    Some(NodePolicy {
        resource: Resource::new(Kind::Authorization(a)),
        applies: Applies::Authz(scope),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::authz::ServiceAccountMatch;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn build(point: &Point, rule: &AuthzRule) -> Rule {
        RuleBuilder {
            point,
            td: &td(),
            unenforceable: Vec::new(),
        }
        .rule(rule)
    }

    #[test]
    fn principals_and_service_accounts_intersect() {
        let sa = |ns: &str, name: &str| ServiceAccountMatch {
            namespace: ns.into(),
            name: name.into(),
        };
        let rule = AuthzRule {
            from: vec![
                SourceMatch {
                    principals: vec![StringMatch::Suffix("/sa/a".into())],
                    service_accounts: vec![sa("ns", "a"), sa("ns", "b")],
                    ..Default::default()
                },
                SourceMatch {
                    principals: vec![StringMatch::Exact("x".into())],
                    service_accounts: vec![sa("ns", "a")],
                    not_service_accounts: vec![sa("ns", "c")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let r = build(&Point::Node, &rule);
        let m = &r.clauses[0].matches;
        assert_eq!(m[0].principals, [exact("cluster.local/ns/ns/sa/a")]);
        // Nothing is both: a matcher that never matches, not an empty (any) list.
        assert_eq!(m[1].principals, [never()]);
        assert_eq!(m[1].not_principals, [exact("cluster.local/ns/ns/sa/c")]);
    }

    #[test]
    fn l7_is_kept_at_the_waypoint_and_removed_at_the_node() {
        let rule = AuthzRule {
            to: vec![OperationMatch {
                paths: vec![PathPattern::parse("/api/{*}/x/{**}").unwrap()],
                hosts: vec![StringMatch::Exact("Payment".into())],
                ..Default::default()
            }],
            from: vec![SourceMatch {
                request_principals: vec![StringMatch::Presence],
                ..Default::default()
            }],
            ..Default::default()
        };
        let at_node = build(&Point::Node, &rule);
        assert_eq!(
            at_node.unenforceable_fields,
            [
                "from[0].source.requestPrincipals",
                "to[0].operation.hosts",
                "to[0].operation.paths"
            ]
        );
        let at_waypoint = build(&Point::Waypoint, &rule);
        assert_eq!(
            at_waypoint.unenforceable_fields,
            ["from[0].source.requestPrincipals"]
        );
        let to = &at_waypoint.clauses[1].matches[0];
        assert_eq!(
            to.paths[0].kind,
            Some(string_match::Kind::PathTemplate("/api/{*}/x/{**}".into()))
        );
        assert!(to.hosts[0].ignore_case);
    }

    #[test]
    fn creation_times_round_trip() {
        let t = creation_time(Some("2024-05-06T07:08:09.123456789Z")).unwrap();
        let since = t.duration_since(std::time::UNIX_EPOCH).unwrap();
        assert_eq!(since.as_secs(), 1_714_979_289);
        assert_eq!(since.subsec_nanos(), 123_456_789);
        assert_eq!(creation_time(None), None);
        assert_eq!(creation_time(Some("garbage")), None);
    }
}
