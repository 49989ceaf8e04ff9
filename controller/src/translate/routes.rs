//! VirtualService, HTTPRoute and GRPCRoute into one ordered `RouteSet` per Service.
//!
//! **Order** (as `route.proto` specifies, and as Istio orders them):
//!
//! 1. HTTPRoute and GRPCRoute rules attached to the Service (GAMMA `parentRefs`),
//!    one route per (rule, match), by Gateway API precedence as Istio implements it:
//!    path match type (Exact > RegularExpression > PathPrefix; no path counts as
//!    PathPrefix `/`), then the longer path, then a method match, then more header
//!    matches, then more query parameter matches, then the oldest route, then the
//!    route's namespace/name, then rule and match order.
//! 2. Then VirtualService `http` routes whose `hosts` resolve to the Service, in
//!    written order; several VirtualServices for one Service are concatenated oldest
//!    first (then by namespace/name). When both kinds exist, the VirtualService's
//!    status says its rules come after the HTTPRoute's (they can be shadowed by a
//!    catch-all HTTPRoute rule).
//!
//! Routes are what the waypoint fronting the Service applies; a route from another
//! namespace (a Gateway API *consumer* route) applies only to that namespace's clients
//! and cannot be expressed per client, so it is not used and its status says so.
//! Routing never grants access, so what cannot be expressed is left out rather than
//! widened: a match on `sourceNamespace` (not in the wire protocol yet) is dropped,
//! and a rule left without any match is skipped.
//!
//! Effective values are sent: a route without `retries` gets Istio's default retry
//! policy (2 attempts on connect-failure, refused-stream, unavailable, cancelled,
//! retriable-status-codes); an HTTPRoute `timeouts.backendRequest` becomes the
//! per-try timeout.

use std::collections::BTreeMap;

use ambit_api::{
    config::v1::{
        DirectResponse, FaultAbort, FaultDelay, FaultInjection, Forward, HeaderMatcher,
        HeaderModifier as ProtoHeaderModifier, HeaderValue, HttpRewrite, Mirror as ProtoMirror,
        NamespacedName, PathMatch as ProtoPathMatch, QueryParamMatcher, Redirect as ProtoRedirect,
        RegexRewrite, RetryOn as ProtoRetryOn, RetryPolicy as ProtoRetryPolicy, Route,
        RouteDestination, RouteMatch, RouteSet, StringMatch as ProtoMatch, fault_abort,
        http_rewrite, path_match, redirect, route, string_match,
    },
    time::duration_to_proto,
};

use super::{
    Notes, ObjectKey, Objects,
    cluster::{Mesh, ServiceKey},
};
use crate::model::{
    ServiceHost,
    route::{
        AbortStatus, Backend, HeaderModifier, PathMatch, PathRewrite, RequestMatch, RetryOn,
        RetryPolicy, RouteAction, RouteParent, RouteRule, RouteTable, ValueMatch,
    },
};

fn key_of(table: &RouteTable) -> ObjectKey {
    ObjectKey::new(
        &table.id.kind,
        Some(table.id.namespace.as_str()),
        &table.id.name,
    )
}

fn value(v: &ValueMatch) -> Option<ProtoMatch> {
    let kind = match v {
        ValueMatch::Exact(s) => string_match::Kind::Exact(s.clone()),
        ValueMatch::Prefix(s) => string_match::Kind::Prefix(s.clone()),
        ValueMatch::Regex(r) => string_match::Kind::Regex(r.as_str().to_owned()),
        ValueMatch::Present => return None,
    };
    Some(ProtoMatch {
        kind: Some(kind),
        ignore_case: false,
    })
}

fn pseudo_header(name: &str, v: &ValueMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_owned(),
        value: value(v),
        invert: false,
    }
}

/// A request match on the wire, or `None` when it cannot be expressed.
fn route_match(m: &RequestMatch) -> Option<RouteMatch> {
    if m.source_namespace.is_some() {
        return None;
    }
    let mut out = RouteMatch {
        path: m.path.as_ref().map(|p| ProtoPathMatch {
            kind: Some(match p {
                PathMatch::Exact(s) => path_match::Kind::Exact(s.clone()),
                PathMatch::Prefix(s) => path_match::Kind::Prefix(s.clone()),
                PathMatch::SegmentPrefix(s) => path_match::Kind::SegmentPrefix(s.clone()),
                PathMatch::Regex(r) => path_match::Kind::Regex(r.as_str().to_owned()),
            }),
            ignore_case: m.ignore_path_case,
        }),
        ..RouteMatch::default()
    };
    match &m.method {
        Some(ValueMatch::Exact(method)) => out.method = method.clone(),
        Some(other) => out.headers.push(pseudo_header(":method", other)),
        None => {}
    }
    if let Some(a) = &m.authority {
        out.headers.push(pseudo_header(":authority", a));
    }
    if let Some(s) = &m.scheme {
        out.headers.push(pseudo_header(":scheme", s));
    }
    out.headers.extend(m.headers.iter().map(|h| HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        value: value(&h.value),
        invert: h.invert,
    }));
    out.query_params = m
        .query_params
        .iter()
        .map(|q| QueryParamMatcher {
            name: q.name.clone(),
            value: value(&q.value),
        })
        .collect();
    Some(out)
}

fn header_modifier(h: &HeaderModifier) -> Option<ProtoHeaderModifier> {
    if h.is_empty() {
        return None;
    }
    let values = |list: &[(String, String)]| {
        list.iter()
            .map(|(n, v)| HeaderValue {
                name: n.to_ascii_lowercase(),
                value: v.clone(),
            })
            .collect()
    };
    Some(ProtoHeaderModifier {
        set: values(&h.set),
        add: values(&h.add),
        remove: h.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    })
}

fn retry_on(r: RetryOn) -> ProtoRetryOn {
    match r {
        RetryOn::Http5xx => ProtoRetryOn::RetryOn5xx,
        RetryOn::GatewayError => ProtoRetryOn::GatewayError,
        RetryOn::ConnectFailure => ProtoRetryOn::ConnectFailure,
        RetryOn::RefusedStream => ProtoRetryOn::RefusedStream,
        RetryOn::Reset => ProtoRetryOn::Reset,
        RetryOn::Retriable4xx => ProtoRetryOn::Retriable4xx,
        RetryOn::RetriableStatusCodes => ProtoRetryOn::RetriableStatusCodes,
        RetryOn::Cancelled => ProtoRetryOn::GrpcCancelled,
        RetryOn::DeadlineExceeded => ProtoRetryOn::GrpcDeadlineExceeded,
        RetryOn::Internal => ProtoRetryOn::GrpcInternal,
        RetryOn::ResourceExhausted => ProtoRetryOn::GrpcResourceExhausted,
        RetryOn::Unavailable => ProtoRetryOn::GrpcUnavailable,
    }
}

fn retry(rule: &RouteRule) -> ProtoRetryPolicy {
    let mut p = rule.retry.clone().unwrap_or_else(RetryPolicy::mesh_default);
    if let Some(t) = rule.backend_timeout {
        p.per_try_timeout = Some(t);
    }
    ProtoRetryPolicy {
        attempts: p.attempts,
        per_try_timeout: p.per_try_timeout.map(duration_to_proto),
        retry_on: p.retry_on.iter().map(|r| retry_on(*r) as i32).collect(),
        retriable_status_codes: p.status_codes.iter().map(|c| u32::from(*c)).collect(),
        backoff_base: p.backoff.map(duration_to_proto),
        backoff_max: None,
    }
}

struct Translator<'n, 'm> {
    notes: &'n mut Notes,
    mesh: &'n Mesh<'m>,
}

impl Translator<'_, '_> {
    fn destination(
        &mut self,
        origin: &ObjectKey,
        b: &Backend,
        weight: u32,
    ) -> Option<RouteDestination> {
        match &b.host {
            ServiceHost::Service { namespace, name } => {
                if self
                    .mesh
                    .service(&ServiceKey::new(namespace.as_str(), name))
                    .is_none()
                {
                    self.notes.add(
                        origin.clone(),
                        format!("destination Service {namespace}/{name} does not exist: requests routed there fail"),
                    );
                }
                Some(RouteDestination {
                    service: Some(NamespacedName {
                        namespace: namespace.as_str().to_owned(),
                        name: name.clone(),
                    }),
                    port: b.port.map_or(0, |p| u32::from(p.get())),
                    subset: b.subset.clone().unwrap_or_default(),
                    weight,
                    request_headers: None,
                    response_headers: None,
                })
            }
            ServiceHost::Hostname(h) => {
                self.notes.add(
                    origin.clone(),
                    format!("destination host `{h}` is not a Kubernetes Service: not routed by waypoints"),
                );
                None
            }
        }
    }

    fn action(&mut self, origin: &ObjectKey, rule: &RouteRule) -> route::Action {
        match &rule.action {
            RouteAction::Forward(backends) => {
                let destinations = backends
                    .iter()
                    .filter_map(|wb| {
                        let mut d = self.destination(origin, &wb.backend, wb.weight)?;
                        d.request_headers = header_modifier(&wb.request_headers);
                        d.response_headers = header_modifier(&wb.response_headers);
                        Some(d)
                    })
                    .collect();
                let mirrors = rule
                    .mirrors
                    .iter()
                    .filter_map(|m| {
                        Some(ProtoMirror {
                            destination: Some(self.destination(origin, &m.backend, 0)?),
                            percent: m.percent.get(),
                        })
                    })
                    .collect();
                let rewrite = rule.rewrite.as_ref().and_then(|r| {
                    if r.path.is_none() && r.authority.is_none() {
                        return None;
                    }
                    Some(HttpRewrite {
                        authority: r.authority.clone().unwrap_or_default(),
                        path: r.path.as_ref().map(|p| match p {
                            PathRewrite::Full(s) => http_rewrite::Path::FullPath(s.clone()),
                            PathRewrite::Prefix(s) => http_rewrite::Path::Prefix(s.clone()),
                            PathRewrite::Regex {
                                pattern,
                                substitution,
                            } => http_rewrite::Path::Regex(RegexRewrite {
                                pattern: pattern.as_str().to_owned(),
                                substitution: substitution.clone(),
                            }),
                        }),
                    })
                });
                let fault = rule.fault.as_ref().map(|f| FaultInjection {
                    delay: f.delay.as_ref().map(|d| FaultDelay {
                        fixed_delay: Some(duration_to_proto(d.delay)),
                        percent: d.percent.get(),
                    }),
                    abort: f.abort.as_ref().map(|a| FaultAbort {
                        percent: a.percent.get(),
                        error: Some(match a.status {
                            AbortStatus::Http(s) => fault_abort::Error::HttpStatus(u32::from(s)),
                            AbortStatus::Grpc(s) => fault_abort::Error::GrpcStatus(u32::from(s)),
                        }),
                    }),
                });
                route::Action::Forward(Forward {
                    destinations,
                    rewrite,
                    request_headers: header_modifier(&rule.request_headers),
                    response_headers: header_modifier(&rule.response_headers),
                    mirrors,
                    timeout: rule.timeout.map(duration_to_proto),
                    retry: Some(retry(rule)),
                    fault,
                })
            }
            RouteAction::Redirect(r) => {
                let path = match &r.path {
                    None => None,
                    Some(PathRewrite::Full(s)) => Some(redirect::Path::FullPath(s.clone())),
                    Some(PathRewrite::Prefix(s)) => Some(redirect::Path::Prefix(s.clone())),
                    Some(PathRewrite::Regex { .. }) => {
                        self.notes.add(
                            origin.clone(),
                            "a redirect with a regex path rewrite cannot be sent: the path is kept",
                        );
                        None
                    }
                };
                route::Action::Redirect(ProtoRedirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    host: r.host.clone().unwrap_or_default(),
                    port: r.port.map_or(0, |p| u32::from(p.get())),
                    status_code: u32::from(r.status),
                    path,
                })
            }
            RouteAction::DirectResponse { status, body } => {
                route::Action::DirectResponse(DirectResponse {
                    status: u32::from(*status),
                    body: body.clone().unwrap_or_default().into_bytes(),
                })
            }
        }
    }

    fn route(
        &mut self,
        table: &RouteTable,
        index: usize,
        rule: &RouteRule,
        ports: Vec<u32>,
        matches: Vec<RouteMatch>,
    ) -> Route {
        let origin = key_of(table);
        let mut name = format!(
            "{}/{}/{}#{index}",
            table.id.kind, table.id.namespace, table.id.name
        );
        if let Some(n) = &rule.name {
            name.push('.');
            name.push_str(n);
        }
        Route {
            name,
            ports,
            matches,
            action: Some(self.action(&origin, rule)),
        }
    }

    /// The matches of a rule on the wire, each with its port (VirtualService matches
    /// may name one); `None` when the rule had matches and none can be expressed.
    fn matches(
        &mut self,
        table: &RouteTable,
        rule: &RouteRule,
    ) -> Option<Vec<(RouteMatch, Option<u16>)>> {
        if rule.matches.is_empty() {
            return Some(vec![(RouteMatch::default(), None)]);
        }
        let mut out = Vec::new();
        for m in &rule.matches {
            match route_match(m) {
                Some(rm) => out.push((rm, m.port.map(|p| p.get()))),
                None => self.notes.add(
                    key_of(table),
                    "a match on sourceNamespace cannot be applied by waypoints yet: that match never applies",
                ),
            }
        }
        (!out.is_empty()).then_some(out)
    }
}

/// Gateway API precedence of one (rule, match) route (module docs).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    path_rank: std::cmp::Reverse<u8>,
    path_len: std::cmp::Reverse<usize>,
    no_method: bool,
    headers: std::cmp::Reverse<usize>,
    query_params: std::cmp::Reverse<usize>,
    created: Option<String>,
    namespace: String,
    name: String,
    rule: usize,
    matched: usize,
}

fn path_rank(m: &RouteMatch) -> (u8, usize) {
    match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
        Some(path_match::Kind::Exact(s)) => (3, s.len()),
        Some(path_match::Kind::Regex(s)) => (2, s.len()),
        Some(path_match::Kind::Prefix(s) | path_match::Kind::SegmentPrefix(s)) => (1, s.len()),
        None => (1, 1),
    }
}

/// Every Service's routes.
pub(crate) fn route_sets(
    objects: &Objects<'_>,
    mesh: &Mesh<'_>,
    notes: &mut Notes,
) -> BTreeMap<ServiceKey, RouteSet> {
    let mut gamma: BTreeMap<ServiceKey, Vec<(&RouteTable, Option<u16>)>> = BTreeMap::new();
    let mut virtual_services: BTreeMap<ServiceKey, Vec<&RouteTable>> = BTreeMap::new();
    for table in &objects.routes {
        let me = key_of(table);
        for parent in &table.parents {
            match parent {
                RouteParent::Host(ServiceHost::Service { namespace, name }) => {
                    let key = ServiceKey::new(namespace.as_str(), name);
                    if mesh.service(&key).is_none() {
                        notes.add(
                            me.clone(),
                            format!("host Service {namespace}/{name} does not exist"),
                        );
                    }
                    virtual_services.entry(key).or_default().push(table);
                }
                RouteParent::Host(ServiceHost::Hostname(h)) => notes.add(
                    me.clone(),
                    format!(
                        "host `{h}` is not a Kubernetes Service: waypoints route Services only"
                    ),
                ),
                RouteParent::Service {
                    namespace,
                    name,
                    port,
                } => {
                    if *namespace != table.id.namespace {
                        notes.add(
                            me.clone(),
                            format!("consumer route for Service {namespace}/{name} (from another namespace) is not applied by waypoints"),
                        );
                        continue;
                    }
                    let key = ServiceKey::new(namespace.as_str(), name);
                    if mesh.service(&key).is_none() {
                        notes.add(
                            me.clone(),
                            format!("parent Service {namespace}/{name} does not exist"),
                        );
                    }
                    gamma
                        .entry(key)
                        .or_default()
                        .push((table, port.map(|p| p.get())));
                }
            }
        }
    }

    let mut t = Translator { notes, mesh };
    let mut out = BTreeMap::new();
    let services: std::collections::BTreeSet<ServiceKey> = gamma
        .keys()
        .chain(virtual_services.keys())
        .cloned()
        .collect();
    for svc in services {
        let mut routes = Vec::new();
        let mut ranked: Vec<(Precedence, Route)> = Vec::new();
        for (table, port) in gamma.get(&svc).into_iter().flatten() {
            let ports: Vec<u32> = port.map(u32::from).into_iter().collect();
            for (ri, rule) in table.rules.iter().enumerate() {
                let Some(matches) = t.matches(table, rule) else {
                    continue;
                };
                for (mi, (m, _)) in matches.into_iter().enumerate() {
                    let (rank, len) = path_rank(&m);
                    let precedence = Precedence {
                        path_rank: std::cmp::Reverse(rank),
                        path_len: std::cmp::Reverse(len),
                        no_method: m.method.is_empty(),
                        headers: std::cmp::Reverse(m.headers.len()),
                        query_params: std::cmp::Reverse(m.query_params.len()),
                        created: table.id.created.clone(),
                        namespace: table.id.namespace.as_str().to_owned(),
                        name: table.id.name.clone(),
                        rule: ri,
                        matched: mi,
                    };
                    let route = t.route(table, ri, rule, ports.clone(), vec![m]);
                    ranked.push((precedence, route));
                }
            }
        }
        ranked.sort_by(|a, b| a.0.cmp(&b.0));
        let has_gamma = !ranked.is_empty();
        routes.extend(ranked.into_iter().map(|(_, r)| r));

        let mut vss = virtual_services.get(&svc).cloned().unwrap_or_default();
        vss.sort_by(|a, b| a.id.precedence_key().cmp(&b.id.precedence_key()));
        for table in vss {
            if has_gamma {
                t.notes.add(
                    key_of(table),
                    format!("HTTPRoute/GRPCRoute rules also route Service {}/{} and take precedence: this VirtualService's rules apply only to requests none of them match", svc.namespace, svc.name),
                );
            }
            for (ri, rule) in table.rules.iter().enumerate() {
                let Some(matches) = t.matches(table, rule) else {
                    continue;
                };
                if matches.iter().all(|(_, p)| p.is_none()) {
                    let ms = matches.into_iter().map(|(m, _)| m).collect();
                    routes.push(t.route(table, ri, rule, Vec::new(), ms));
                } else {
                    // Ports are per route on the wire: one route per match, in order,
                    // which first-match semantics make equivalent.
                    for (m, port) in matches {
                        let ports = port.map(u32::from).into_iter().collect();
                        routes.push(t.route(table, ri, rule, ports, vec![m]));
                    }
                }
            }
        }
        out.insert(
            svc.clone(),
            RouteSet {
                service: Some(NamespacedName {
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                }),
                routes,
            },
        );
    }
    out
}

/// The Services a route set forwards or mirrors to.
pub(crate) fn forward_targets(rs: &RouteSet) -> Vec<ServiceKey> {
    let mut out = Vec::new();
    for r in &rs.routes {
        if let Some(route::Action::Forward(f)) = &r.action {
            let dests = f
                .destinations
                .iter()
                .chain(f.mirrors.iter().filter_map(|m| m.destination.as_ref()));
            for d in dests {
                if let Some(s) = &d.service {
                    out.push(ServiceKey::new(&s.namespace, &s.name));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
