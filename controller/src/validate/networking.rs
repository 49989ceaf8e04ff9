//! VirtualService and DestinationRule validation.

use std::collections::{BTreeMap, btree_map::Entry};

use super::{Checker, is_dns_label, is_header_name};
use crate::{
    diagnostics::FieldPath,
    model::{
        NamespaceName, ObjectId, Percent, ServiceHost, WorkloadSelector,
        destination::{
            ConnectionPool, DestinationPolicy, HashKey, HttpPool, LoadBalancer, OutlierDetection,
            Subset, TcpPool, TrafficPolicy,
        },
        route::{
            AbortStatus, Backend, Fault, FaultAbort, FaultDelay, HeaderMatch, HeaderModifier,
            Mirror, PathMatch, PathRewrite, QueryParamMatch, Redirect, RegexPattern, RequestMatch,
            RetryOn, RetryOnError, RetryPolicy, Rewrite, RouteAction, RouteParent, RouteRule,
            RouteTable, ValueMatch, WeightedBackend, grpc_code,
        },
    },
    resources::{
        common::AnyObject,
        networking::{
            ConnectionPoolSettings, Destination, DestinationRuleSpec, HeaderOperations, Headers,
            HttpMatchRequest, HttpRouteSpec, LoadBalancerSettings, OutlierDetectionSpec,
            PercentSpec, SimpleLb, StringMatchSpec, TrafficPolicySpec, VirtualServiceSpec,
        },
    },
};

/// Validates a VirtualService into a route table (`None` when it does not apply to
/// the mesh or is invalid).
pub(super) fn virtual_service(
    id: &ObjectId,
    spec: &VirtualServiceSpec,
    chk: &mut Checker,
) -> Option<RouteTable> {
    let root = FieldPath::parse("spec");
    let mut parents = Vec::new();
    match spec.hosts.as_deref() {
        None | Some([]) => chk.error(
            root.field("hosts"),
            "required: at least one destination host",
        ),
        Some(hosts) => {
            for (i, h) in hosts.iter().enumerate() {
                if h.is_empty() {
                    chk.error(root.field("hosts").index(i), "must not be empty");
                } else if h == "*" {
                    chk.error(
                        root.field("hosts").index(i),
                        "a bare `*` host is not supported for mesh routes: name the service",
                    );
                } else {
                    let parent = RouteParent::Host(ServiceHost::resolve(h, &id.namespace));
                    if !parents.contains(&parent) {
                        parents.push(parent);
                    }
                }
            }
        }
    }
    for (field, what) in [("tcp", &spec.tcp), ("tls", &spec.tls)] {
        if what.is_some() {
            chk.error(
                root.field(field),
                format!("{} routes are not supported by Ambit (HTTP routes only); remove them or use a separate tool", field.to_uppercase()),
            );
        }
    }
    if spec.export_to.is_some() {
        chk.warn(
            root.field("exportTo"),
            "not enforced by Ambit: the routes apply to every client in the mesh",
        );
    }
    let mesh = spec
        .gateways
        .as_ref()
        .is_none_or(|g| g.is_empty() || g.iter().any(|g| g == "mesh"));
    if !mesh {
        chk.warn(
            root.field("gateways"),
            "does not include `mesh`: these routes are for ingress gateways and are not used by Ambit",
        );
    }
    let mut rules = Vec::new();
    let http = spec.http.as_deref().unwrap_or_default();
    if http.is_empty() && spec.tcp.is_none() && spec.tls.is_none() {
        chk.warn(
            root.field("http"),
            "no HTTP routes: this VirtualService has no effect",
        );
    }
    for (i, route) in http.iter().enumerate() {
        if let Some(rule) = http_route(&root.field("http").index(i), route, &id.namespace, chk) {
            rules.push(rule);
        }
    }
    (mesh && chk.error_count() == 0).then(|| RouteTable {
        id: id.clone(),
        parents,
        rules,
    })
}

fn http_route(
    path: &FieldPath,
    r: &HttpRouteSpec,
    ns: &NamespaceName,
    chk: &mut Checker,
) -> Option<RouteRule> {
    let before = chk.error_count();
    if r.delegate.is_some() {
        chk.error(
            path.field("delegate"),
            "delegation is not supported by Ambit: inline the routes",
        );
    }
    if r.cors_policy.is_some() {
        chk.warn(
            path.field("corsPolicy"),
            "not supported by Ambit: no CORS headers are added",
        );
    }
    let mut matches = Vec::new();
    for (j, m) in r.matches.iter().flatten().enumerate() {
        if let Some(m) = http_match(&path.field("match").index(j), m, chk) {
            matches.push(m);
        }
    }
    let set = [
        r.route.is_some(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    let action = match set {
        [true, false, false] => forward(path, r.route.as_deref().unwrap_or_default(), ns, chk),
        [false, true, false] => redirect(&path.field("redirect"), r, chk),
        [false, false, true] => direct_response(&path.field("directResponse"), r, chk),
        [false, false, false] if r.delegate.is_some() => None,
        [false, false, false] => {
            chk.error(
                path.clone(),
                "one of route, redirect or directResponse is required",
            );
            None
        }
        _ => {
            chk.error(
                path.clone(),
                "route, redirect and directResponse are mutually exclusive",
            );
            None
        }
    };
    if r.rewrite.is_some() && r.redirect.is_some() {
        chk.error(path.field("rewrite"), "cannot be combined with redirect");
    }
    let rewrite = r.rewrite.as_ref().and_then(|rw| {
        let p = path.field("rewrite");
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            chk.error(p.field("uriRegexRewrite"), "cannot be combined with uri");
            return None;
        }
        let path_rw = match (&rw.uri, &rw.uri_regex_rewrite) {
            (Some(u), _) => Some(PathRewrite::Prefix(u.clone())),
            (None, Some(rr)) => {
                let rp = p.field("uriRegexRewrite");
                match (&rr.pattern, &rr.rewrite) {
                    (Some(pat), Some(sub)) => {
                        regex(chk, rp.field("match"), pat).map(|pattern| PathRewrite::Regex {
                            pattern,
                            substitution: sub.clone(),
                        })
                    }
                    (None, _) => {
                        chk.error(rp.field("match"), "required field is missing");
                        None
                    }
                    (_, None) => {
                        chk.error(rp.field("rewrite"), "required field is missing");
                        None
                    }
                }
            }
            (None, None) => None,
        };
        Some(Rewrite {
            path: path_rw,
            authority: rw.authority.clone(),
        })
    });
    let timeout = r
        .timeout
        .as_ref()
        .and_then(|t| chk.duration(path.field("timeout"), t))
        .filter(|d| !d.is_zero());
    let retry = r.retries.as_ref().and_then(|rt| {
        let p = path.field("retries");
        let attempts = match rt.attempts {
            Some(a) if a < 0 => {
                chk.error(
                    p.field("attempts"),
                    format!("must not be negative, found {a}"),
                );
                return None;
            }
            Some(a) => a.unsigned_abs(),
            None => 2,
        };
        let per_try_timeout = rt
            .per_try_timeout
            .as_ref()
            .and_then(|t| chk.duration(p.field("perTryTimeout"), t));
        if rt.retry_remote_localities.is_some() {
            chk.warn(
                p.field("retryRemoteLocalities"),
                "ignored: Ambit has no locality-aware load balancing",
            );
        }
        let (retry_on, status_codes) = match &rt.retry_on {
            Some(s) => retry_on(chk, &p.field("retryOn"), s)?,
            None => (RetryPolicy::default_conditions(), Vec::new()),
        };
        Some(RetryPolicy {
            attempts,
            per_try_timeout,
            retry_on,
            status_codes,
            backoff: None,
        })
    });
    let fault = r
        .fault
        .as_ref()
        .and_then(|f| fault(&path.field("fault"), f, chk));
    let mut mirrors = Vec::new();
    if r.mirror.is_some() && r.mirrors.is_some() {
        chk.error(path.field("mirrors"), "cannot be combined with mirror");
    }
    if let Some(m) = &r.mirror {
        let pct = match (&r.mirror_percentage, r.mirror_percent) {
            (Some(p), _) => percent_spec(chk, &path.field("mirrorPercentage"), p),
            (None, Some(p)) => chk.percent(path.field("mirrorPercent"), f64::from(p)),
            (None, None) => Some(Percent::ALL),
        };
        if let (Some(backend), Some(percent)) =
            (destination(&path.field("mirror"), m, ns, chk), pct)
        {
            mirrors.push(Mirror { backend, percent });
        }
    }
    for (k, m) in r.mirrors.iter().flatten().enumerate() {
        let p = path.field("mirrors").index(k);
        let pct = match &m.percentage {
            Some(ps) => percent_spec(chk, &p.field("percentage"), ps),
            None => Some(Percent::ALL),
        };
        if let (Some(backend), Some(percent)) = (
            destination(&p.field("destination"), &m.destination, ns, chk),
            pct,
        ) {
            mirrors.push(Mirror { backend, percent });
        }
    }
    let (request_headers, response_headers) =
        headers(chk, &path.field("headers"), r.headers.as_ref());
    if chk.error_count() != before {
        return None;
    }
    Some(RouteRule {
        name: r.name.clone(),
        matches,
        action: action?,
        request_headers,
        response_headers,
        rewrite,
        timeout,
        backend_timeout: None,
        retry,
        fault,
        mirrors,
    })
}

fn retry_on(chk: &mut Checker, field: &FieldPath, s: &str) -> Option<(Vec<RetryOn>, Vec<u16>)> {
    let mut conds = Vec::new();
    let mut codes = Vec::new();
    let mut ok = true;
    for token in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        if token.bytes().all(|b| b.is_ascii_digit()) {
            match token.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => {
                    codes.push(c);
                    if !conds.contains(&RetryOn::RetriableStatusCodes) {
                        conds.push(RetryOn::RetriableStatusCodes);
                    }
                }
                _ => {
                    chk.error(
                        field.clone(),
                        format!("`{token}` is not an HTTP status code (100-599)"),
                    );
                    ok = false;
                }
            }
            continue;
        }
        match token.parse::<RetryOn>() {
            Ok(c) => {
                if !conds.contains(&c) {
                    conds.push(c);
                }
            }
            Err(e @ RetryOnError::Unsupported(_)) => {
                chk.warn(field.clone(), format!("{e}; ignored"))
            }
            Err(e @ RetryOnError::Unknown(_)) => {
                chk.error(field.clone(), e.to_string());
                ok = false;
            }
        }
    }
    ok.then_some((conds, codes))
}

fn fault(
    path: &FieldPath,
    f: &crate::resources::networking::HttpFaultInjection,
    chk: &mut Checker,
) -> Option<Fault> {
    let mut out = Fault::default();
    if let Some(d) = &f.delay {
        let p = path.field("delay");
        if d.exponential_delay.is_some() {
            chk.error(
                p.field("exponentialDelay"),
                "not supported by Ambit: use fixedDelay",
            );
        }
        let percent = fault_percent(chk, &p, d.percentage.as_ref(), d.percent);
        match &d.fixed_delay {
            Some(fd) => {
                if let (Some(delay), Some(percent)) =
                    (chk.duration(p.field("fixedDelay"), fd), percent)
                {
                    out.delay = Some(FaultDelay { delay, percent });
                }
            }
            None if d.exponential_delay.is_none() => {
                chk.error(p.field("fixedDelay"), "required field is missing")
            }
            None => {}
        }
    }
    if let Some(a) = &f.abort {
        let p = path.field("abort");
        let percent = fault_percent(chk, &p, a.percentage.as_ref(), None);
        let status = match (a.http_status, &a.grpc_status, &a.http2_error) {
            (Some(s), None, None) => {
                if (200..=599).contains(&s) {
                    u16::try_from(s).ok().map(AbortStatus::Http)
                } else {
                    chk.error(
                        p.field("httpStatus"),
                        format!("must be an HTTP status between 200 and 599, found {s}"),
                    );
                    None
                }
            }
            (None, Some(g), None) => match grpc_code(g) {
                Some(c) => Some(AbortStatus::Grpc(c)),
                None => {
                    chk.error(
                        p.field("grpcStatus"),
                        format!("`{g}` is not a gRPC status (e.g. UNAVAILABLE)"),
                    );
                    None
                }
            },
            (None, None, Some(_)) => {
                chk.error(
                    p.field("http2Error"),
                    "not supported by Ambit: use httpStatus or grpcStatus",
                );
                None
            }
            (None, None, None) => {
                chk.error(p.clone(), "one of httpStatus or grpcStatus is required");
                None
            }
            _ => {
                chk.error(
                    p.clone(),
                    "httpStatus, grpcStatus and http2Error are mutually exclusive",
                );
                None
            }
        };
        if let (Some(status), Some(percent)) = (status, percent) {
            out.abort = Some(FaultAbort { status, percent });
        }
    }
    Some(out)
}

/// A fault's share of requests; all requests when unspecified.
fn fault_percent(
    chk: &mut Checker,
    path: &FieldPath,
    pct: Option<&PercentSpec>,
    legacy: Option<i32>,
) -> Option<Percent> {
    match (pct, legacy) {
        (Some(p), _) => percent_spec(chk, &path.field("percentage"), p),
        (None, Some(p)) => chk.percent(path.field("percent"), f64::from(p)),
        (None, None) => Some(Percent::ALL),
    }
}

fn percent_spec(chk: &mut Checker, path: &FieldPath, p: &PercentSpec) -> Option<Percent> {
    chk.percent(path.field("value"), p.value.unwrap_or(0.0))
}

fn forward(
    path: &FieldPath,
    route: &[crate::resources::networking::HttpRouteDestination],
    ns: &NamespaceName,
    chk: &mut Checker,
) -> Option<RouteAction> {
    let field = path.field("route");
    if route.is_empty() {
        chk.error(field, "must not be empty");
        return None;
    }
    let before = chk.error_count();
    let single = route.len() == 1;
    let mut sum: i64 = 0;
    let mut backends = Vec::new();
    for (k, d) in route.iter().enumerate() {
        let p = field.index(k);
        let weight = match d.weight {
            Some(w) if w < 0 => {
                chk.error(
                    p.field("weight"),
                    format!("must not be negative, found {w}"),
                );
                0
            }
            Some(w) => w.unsigned_abs(),
            None => 0,
        };
        sum += i64::from(weight);
        let Some(dest) = &d.destination else {
            chk.error(p.field("destination"), "required field is missing");
            continue;
        };
        let (request_headers, response_headers) =
            headers(chk, &p.field("headers"), d.headers.as_ref());
        if let Some(backend) = destination(&p.field("destination"), dest, ns, chk) {
            backends.push(WeightedBackend {
                backend,
                weight: if single { 100 } else { weight },
                request_headers,
                response_headers,
            });
        }
    }
    if !single && sum != 100 {
        chk.error(
            field,
            format!("weights sum to {sum}; the weights of a route's destinations must sum to 100"),
        );
    }
    (chk.error_count() == before).then_some(RouteAction::Forward(backends))
}

fn destination(
    path: &FieldPath,
    d: &Destination,
    ns: &NamespaceName,
    chk: &mut Checker,
) -> Option<Backend> {
    let before = chk.error_count();
    if d.host.is_empty() {
        chk.error(path.field("host"), "must not be empty");
    }
    if let Some(s) = &d.subset
        && !is_dns_label(s)
    {
        chk.error(
            path.field("subset"),
            format!("`{s}` is not a valid subset name"),
        );
    }
    let port = d.port.as_ref().and_then(|p| match p.number {
        Some(n) => chk.port(path.field("port").field("number"), i64::from(n)),
        None => {
            chk.error(
                path.field("port").field("number"),
                "required field is missing",
            );
            None
        }
    });
    (chk.error_count() == before).then(|| Backend {
        host: ServiceHost::resolve(&d.host, ns),
        port,
        subset: d.subset.clone(),
    })
}

fn redirect(path: &FieldPath, r: &HttpRouteSpec, chk: &mut Checker) -> Option<RouteAction> {
    let rd = r.redirect.as_ref()?;
    let before = chk.error_count();
    if rd.derive_port.is_some() {
        chk.error(
            path.field("derivePort"),
            "not supported by Ambit: set port explicitly",
        );
    }
    let status = match rd.redirect_code {
        None => 301,
        Some(c @ (301 | 302 | 303 | 307 | 308)) => u16::try_from(c).unwrap_or(301),
        Some(c) => {
            chk.error(
                path.field("redirectCode"),
                format!("must be 301, 302, 303, 307 or 308, found {c}"),
            );
            301
        }
    };
    let port = rd
        .port
        .and_then(|p| chk.port(path.field("port"), i64::from(p)));
    if let Some(s) = &rd.scheme
        && !matches!(s.as_str(), "http" | "https")
    {
        chk.error(
            path.field("scheme"),
            format!("must be http or https, found `{s}`"),
        );
    }
    (chk.error_count() == before).then(|| {
        RouteAction::Redirect(Redirect {
            scheme: rd.scheme.clone(),
            host: rd.authority.clone(),
            port,
            path: rd.uri.clone().map(PathRewrite::Full),
            status,
        })
    })
}

fn direct_response(path: &FieldPath, r: &HttpRouteSpec, chk: &mut Checker) -> Option<RouteAction> {
    let dr = r.direct_response.as_ref()?;
    let before = chk.error_count();
    if !(200..=599).contains(&dr.status) {
        chk.error(
            path.field("status"),
            format!(
                "must be an HTTP status between 200 and 599, found {}",
                dr.status
            ),
        );
    }
    let body = match &dr.body {
        Some(b) if b.bytes.is_some() => {
            chk.error(
                path.field("body").field("bytes"),
                "not supported by Ambit: use body.string",
            );
            None
        }
        Some(b) => b.string.clone(),
        None => None,
    };
    let status = u16::try_from(dr.status).unwrap_or(500);
    (chk.error_count() == before).then_some(RouteAction::DirectResponse { status, body })
}

fn headers(
    chk: &mut Checker,
    path: &FieldPath,
    h: Option<&Headers>,
) -> (HeaderModifier, HeaderModifier) {
    let Some(h) = h else {
        return Default::default();
    };
    (
        header_ops(chk, &path.field("request"), h.request.as_ref()),
        header_ops(chk, &path.field("response"), h.response.as_ref()),
    )
}

fn header_ops(
    chk: &mut Checker,
    path: &FieldPath,
    ops: Option<&HeaderOperations>,
) -> HeaderModifier {
    let Some(ops) = ops else {
        return HeaderModifier::default();
    };
    let mut pairs =
        |field: &str, map: Option<&BTreeMap<String, String>>| -> Vec<(String, String)> {
            let mut out = Vec::new();
            for (k, v) in map.into_iter().flatten() {
                if is_header_name(k) {
                    out.push((k.to_ascii_lowercase(), v.clone()));
                } else {
                    chk.error(
                        path.field(field).key(k),
                        format!("`{k}` is not a valid header name"),
                    );
                }
            }
            out
        };
    let set = pairs("set", ops.set.as_ref());
    let add = pairs("add", ops.add.as_ref());
    let mut remove = Vec::new();
    for (i, k) in ops.remove.iter().flatten().enumerate() {
        if is_header_name(k) {
            remove.push(k.to_ascii_lowercase());
        } else {
            chk.error(
                path.field("remove").index(i),
                format!("`{k}` is not a valid header name"),
            );
        }
    }
    HeaderModifier { set, add, remove }
}

fn regex(chk: &mut Checker, field: FieldPath, pattern: &str) -> Option<RegexPattern> {
    match RegexPattern::new(pattern) {
        Ok(r) => Some(r),
        Err(e) => {
            let msg = e.to_string();
            // regex's message spans several lines with a caret diagram; keep the gist.
            let gist = msg
                .lines()
                .rev()
                .find(|l| l.starts_with("error:"))
                .unwrap_or(msg.as_str());
            chk.error(
                field,
                format!("invalid regular expression `{pattern}`: {gist}"),
            );
            None
        }
    }
}

fn string_match(
    chk: &mut Checker,
    field: &FieldPath,
    m: &StringMatchSpec,
    allow_prefix: bool,
) -> Option<ValueMatch> {
    match (&m.exact, &m.prefix, &m.regex) {
        (None, None, None) => Some(ValueMatch::Present),
        (Some(e), None, None) => Some(ValueMatch::Exact(e.clone())),
        (None, Some(p), None) if allow_prefix => Some(ValueMatch::Prefix(p.clone())),
        (None, Some(_), None) => {
            chk.error(
                field.field("prefix"),
                "prefix matching is not supported here: use exact or regex",
            );
            None
        }
        (None, None, Some(r)) => regex(chk, field.field("regex"), r).map(ValueMatch::Regex),
        _ => {
            chk.error(field.clone(), "set only one of exact, prefix or regex");
            None
        }
    }
}

fn http_match(path: &FieldPath, m: &HttpMatchRequest, chk: &mut Checker) -> Option<RequestMatch> {
    let before = chk.error_count();
    let mut out = RequestMatch::default();
    if let Some(uri) = &m.uri {
        let f = path.field("uri");
        out.path = match string_match(chk, &f, uri, true) {
            Some(ValueMatch::Exact(e)) => Some(PathMatch::Exact(e)),
            Some(ValueMatch::Prefix(p)) => Some(PathMatch::Prefix(p)),
            Some(ValueMatch::Regex(r)) => Some(PathMatch::Regex(r)),
            Some(ValueMatch::Present) => {
                chk.error(f, "set one of exact, prefix or regex");
                None
            }
            None => None,
        };
    }
    out.ignore_path_case = m.ignore_uri_case.unwrap_or(false);
    out.scheme = m
        .scheme
        .as_ref()
        .and_then(|s| string_match(chk, &path.field("scheme"), s, true));
    out.method = m
        .method
        .as_ref()
        .and_then(|s| string_match(chk, &path.field("method"), s, true));
    out.authority = m
        .authority
        .as_ref()
        .and_then(|s| string_match(chk, &path.field("authority"), s, true));
    for (field, invert, map) in [
        ("headers", false, &m.headers),
        ("withoutHeaders", true, &m.without_headers),
    ] {
        for (name, sm) in map.iter().flatten() {
            let f = path.field(field).key(name);
            if !is_header_name(name) {
                chk.error(f, format!("`{name}` is not a valid header name"));
                continue;
            }
            if let Some(value) = string_match(chk, &f, sm, true) {
                out.headers.push(HeaderMatch {
                    name: name.to_ascii_lowercase(),
                    value,
                    invert,
                });
            }
        }
    }
    for (name, sm) in m.query_params.iter().flatten() {
        if let Some(value) = string_match(chk, &path.field("queryParams").key(name), sm, false) {
            out.query_params.push(QueryParamMatch {
                name: name.clone(),
                value,
            });
        }
    }
    out.port = m
        .port
        .and_then(|p| chk.port(path.field("port"), i64::from(p)));
    if m.source_labels.is_some() {
        chk.error(
            path.field("sourceLabels"),
            "not supported by Ambit: match on sourceNamespace, or split the route",
        );
    }
    if let Some(gw) = &m.gateways
        && !gw.iter().any(|g| g == "mesh")
    {
        chk.error(
            path.field("gateways"),
            "matches that apply only to ingress gateways are not supported by Ambit",
        );
    }
    if let Some(ns) = &m.source_namespace {
        if is_dns_label(ns) {
            out.source_namespace = Some(NamespaceName::new(ns.as_str()));
        } else {
            chk.error(
                path.field("sourceNamespace"),
                format!("`{ns}` is not a valid namespace name"),
            );
        }
    }
    (chk.error_count() == before).then_some(out)
}

/// Validates a DestinationRule.
pub(super) fn destination_rule(
    id: &ObjectId,
    spec: &DestinationRuleSpec,
    chk: &mut Checker,
) -> Option<DestinationPolicy> {
    let root = FieldPath::parse("spec");
    if spec.host.is_empty() {
        chk.error(root.field("host"), "must not be empty");
    } else if spec.host == "*" {
        chk.error(
            root.field("host"),
            "a bare `*` host is not supported: name the service",
        );
    }
    if spec.export_to.is_some() {
        chk.warn(
            root.field("exportTo"),
            "not enforced by Ambit: the rule applies to every client in the mesh",
        );
    }
    if spec.workload_selector.is_some() {
        chk.warn(
            root.field("workloadSelector"),
            "not supported by Ambit: the rule applies to every client in the mesh",
        );
    }
    let top_policy = spec
        .traffic_policy
        .as_ref()
        .map(|tp| traffic_policy(chk, &root.field("trafficPolicy"), tp, true))
        .unwrap_or_default();
    let mut subsets = Vec::new();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, s) in spec.subsets.iter().flatten().enumerate() {
        let p = root.field("subsets").index(i);
        if !is_dns_label(&s.name) {
            chk.error(
                p.field("name"),
                format!(
                    "`{}` is not a valid subset name (lowercase letters, digits, `-`)",
                    s.name
                ),
            );
        }
        match seen.entry(s.name.as_str()) {
            Entry::Occupied(first) => {
                chk.error(
                    p.field("name"),
                    format!(
                        "duplicate subset name `{}` (first defined at spec.subsets[{}])",
                        s.name,
                        first.get()
                    ),
                );
            }
            Entry::Vacant(v) => {
                v.insert(i);
            }
        }
        let tp = s
            .traffic_policy
            .as_ref()
            .map(|tp| traffic_policy(chk, &p.field("trafficPolicy"), tp, true));
        subsets.push(Subset {
            name: s.name.clone(),
            labels: WorkloadSelector(s.labels.clone().unwrap_or_default()),
            traffic_policy: tp,
        });
    }
    (chk.error_count() == 0).then(|| DestinationPolicy {
        id: id.clone(),
        host: ServiceHost::resolve(&spec.host, &id.namespace),
        traffic_policy: top_policy,
        subsets,
    })
}

fn traffic_policy(
    chk: &mut Checker,
    path: &FieldPath,
    tp: &TrafficPolicySpec,
    allow_ports: bool,
) -> TrafficPolicy {
    let mut out = TrafficPolicy {
        load_balancer: tp
            .load_balancer
            .as_ref()
            .and_then(|lb| load_balancer(chk, &path.field("loadBalancer"), lb)),
        connection_pool: tp
            .connection_pool
            .as_ref()
            .map(|cp| connection_pool(chk, &path.field("connectionPool"), cp)),
        outlier_detection: tp
            .outlier_detection
            .as_ref()
            .and_then(|od| outlier_detection(chk, &path.field("outlierDetection"), od)),
        port_overrides: BTreeMap::new(),
    };
    client_tls(chk, &path.field("tls"), tp.tls.as_ref());
    if tp.tunnel.is_some() {
        chk.error(path.field("tunnel"), "not supported by Ambit");
    }
    if tp.proxy_protocol.is_some() {
        chk.error(path.field("proxyProtocol"), "not supported by Ambit");
    }
    if let Some(pls) = &tp.port_level_settings {
        if !allow_ports {
            chk.error(path.field("portLevelSettings"), "not allowed here");
        }
        for (i, ps) in pls.iter().enumerate() {
            let p = path.field("portLevelSettings").index(i);
            let Some(port) = ps.port.as_ref().and_then(|ps| ps.number) else {
                chk.error(p.field("port").field("number"), "required field is missing");
                continue;
            };
            let Some(port) = chk.port(p.field("port").field("number"), i64::from(port)) else {
                continue;
            };
            let sub = TrafficPolicySpec {
                load_balancer: ps.load_balancer.clone(),
                connection_pool: ps.connection_pool.clone(),
                outlier_detection: ps.outlier_detection.clone(),
                tls: ps.tls.clone(),
                ..Default::default()
            };
            let policy = traffic_policy(chk, &p, &sub, false);
            if out.port_overrides.insert(port, policy).is_some() {
                chk.error(
                    p.field("port").field("number"),
                    format!("port {port} is configured more than once"),
                );
            }
        }
    }
    out
}

fn client_tls(chk: &mut Checker, path: &FieldPath, tls: Option<&AnyObject>) {
    let Some(tls) = tls else { return };
    match tls.0.get("mode").and_then(|m| m.as_str()) {
        None | Some("ISTIO_MUTUAL") => {}
        Some("DISABLE") => chk.warn(
            path.field("mode"),
            "Ambit keeps mTLS (HBONE) to meshed destinations; DISABLE is ignored",
        ),
        Some(m @ ("SIMPLE" | "MUTUAL")) => {
            chk.error(
                path.field("mode"),
                format!("{m}: TLS origination is not supported by Ambit"),
            );
        }
        Some(m) => chk.error(
            path.field("mode"),
            format!("unknown TLS mode `{m}` (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)"),
        ),
    }
}

fn load_balancer(
    chk: &mut Checker,
    path: &FieldPath,
    lb: &LoadBalancerSettings,
) -> Option<LoadBalancer> {
    if lb.locality_lb_setting.is_some() {
        chk.warn(
            path.field("localityLbSetting"),
            "ignored: Ambit has no locality-aware load balancing",
        );
    }
    if lb.warmup_duration_secs.is_some() {
        chk.warn(
            path.field("warmupDurationSecs"),
            "ignored: Ambit has no slow start",
        );
    }
    match (&lb.simple, &lb.consistent_hash) {
        (Some(_), Some(_)) => {
            chk.error(
                path.clone(),
                "set either simple or consistentHash, not both",
            );
            None
        }
        (Some(s), None) => match s {
            SimpleLb::Unspecified | SimpleLb::RoundRobin => Some(LoadBalancer::RoundRobin),
            SimpleLb::LeastConn | SimpleLb::LeastRequest => Some(LoadBalancer::LeastRequest),
            SimpleLb::Random => Some(LoadBalancer::Random),
            SimpleLb::Passthrough => {
                chk.error(
                    path.field("simple"),
                    "PASSTHROUGH is not supported by Ambit",
                );
                None
            }
        },
        (None, Some(ch)) => {
            let p = path.field("consistentHash");
            for (present, f) in [
                (ch.ring_hash.is_some(), "ringHash"),
                (ch.maglev.is_some(), "maglev"),
                (ch.minimum_ring_size.is_some(), "minimumRingSize"),
            ] {
                if present {
                    chk.warn(
                        p.field(f),
                        "ignored: Ambit's consistent hash needs no tuning",
                    );
                }
            }
            let mut keys = Vec::new();
            if let Some(h) = &ch.http_header_name {
                keys.push(("httpHeaderName", HashKey::Header(h.to_ascii_lowercase())));
            }
            if let Some(c) = &ch.http_cookie {
                let ttl = c
                    .ttl
                    .as_ref()
                    .and_then(|t| chk.duration(p.field("httpCookie").field("ttl"), t));
                if c.name.is_empty() {
                    chk.error(p.field("httpCookie").field("name"), "must not be empty");
                }
                keys.push((
                    "httpCookie",
                    HashKey::Cookie {
                        name: c.name.clone(),
                        path: c.path.clone(),
                        ttl,
                    },
                ));
            }
            if ch.use_source_ip == Some(true) {
                keys.push(("useSourceIp", HashKey::SourceIp));
            }
            if let Some(q) = &ch.http_query_parameter_name {
                keys.push(("httpQueryParameterName", HashKey::QueryParameter(q.clone())));
            }
            match keys.len() {
                0 => {
                    chk.error(p, "one hash key is required: httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName");
                    None
                }
                1 => keys.pop().map(|(_, k)| LoadBalancer::ConsistentHash(k)),
                _ => {
                    let names: Vec<&str> = keys.iter().map(|(n, _)| *n).collect();
                    chk.error(
                        p,
                        format!(
                            "exactly one hash key is allowed, found {}",
                            names.join(" and ")
                        ),
                    );
                    None
                }
            }
        }
        (None, None) => None,
    }
}

fn non_negative(chk: &mut Checker, field: FieldPath, v: Option<i32>) -> Option<u32> {
    match v {
        Some(n) if n < 0 => {
            chk.error(field, format!("must not be negative, found {n}"));
            None
        }
        Some(n) => Some(n.unsigned_abs()),
        None => None,
    }
}

fn connection_pool(
    chk: &mut Checker,
    path: &FieldPath,
    cp: &ConnectionPoolSettings,
) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    if let Some(tcp) = &cp.tcp {
        let p = path.field("tcp");
        if let Some(n) = tcp.max_connections
            && n < 1
        {
            chk.error(
                p.field("maxConnections"),
                format!("must be at least 1, found {n}"),
            );
        }
        if tcp.tcp_keepalive.is_some() {
            chk.warn(
                p.field("tcpKeepalive"),
                "ignored: Ambit uses HTTP/2 keepalive on its tunnels",
            );
        }
        out.tcp = TcpPool {
            max_connections: tcp
                .max_connections
                .filter(|n| *n >= 1)
                .map(i32::unsigned_abs),
            connect_timeout: tcp
                .connect_timeout
                .as_ref()
                .and_then(|t| chk.duration(p.field("connectTimeout"), t)),
            idle_timeout: tcp
                .idle_timeout
                .as_ref()
                .and_then(|t| chk.duration(p.field("idleTimeout"), t)),
            max_connection_duration: tcp
                .max_connection_duration
                .as_ref()
                .and_then(|t| chk.duration(p.field("maxConnectionDuration"), t)),
        };
    }
    if let Some(http) = &cp.http {
        let p = path.field("http");
        for (present, f) in [
            (http.h2_upgrade_policy.is_some(), "h2UpgradePolicy"),
            (http.use_client_protocol.is_some(), "useClientProtocol"),
        ] {
            if present {
                chk.warn(p.field(f), "ignored by Ambit");
            }
        }
        out.http = HttpPool {
            max_pending_requests: non_negative(
                chk,
                p.field("http1MaxPendingRequests"),
                http.http1_max_pending_requests,
            ),
            max_requests: non_negative(chk, p.field("http2MaxRequests"), http.http2_max_requests),
            max_requests_per_connection: non_negative(
                chk,
                p.field("maxRequestsPerConnection"),
                http.max_requests_per_connection,
            ),
            max_retries: non_negative(chk, p.field("maxRetries"), http.max_retries),
            idle_timeout: http
                .idle_timeout
                .as_ref()
                .and_then(|t| chk.duration(p.field("idleTimeout"), t)),
            max_concurrent_streams: non_negative(
                chk,
                p.field("maxConcurrentStreams"),
                http.max_concurrent_streams,
            ),
        };
    }
    out
}

fn outlier_detection(
    chk: &mut Checker,
    path: &FieldPath,
    od: &OutlierDetectionSpec,
) -> Option<OutlierDetection> {
    let before = chk.error_count();
    let mut out = OutlierDetection::default();
    if od.consecutive_errors.is_some() {
        chk.error(path.field("consecutiveErrors"), "deprecated and not supported by Ambit: use consecutive5xxErrors or consecutiveGatewayErrors");
    }
    for (present, f) in [
        (
            od.split_external_local_origin_errors.is_some(),
            "splitExternalLocalOriginErrors",
        ),
        (
            od.consecutive_local_origin_failures.is_some(),
            "consecutiveLocalOriginFailures",
        ),
    ] {
        if present {
            chk.warn(
                path.field(f),
                "ignored: Ambit counts connection failures as 5xx",
            );
        }
    }
    if let Some(n) = od.consecutive_5xx_errors {
        out.consecutive_5xx_errors = n;
    }
    if let Some(n) = od.consecutive_gateway_errors {
        out.consecutive_gateway_errors = n;
    }
    if let Some(i) = &od.interval
        && let Some(d) = chk.duration(path.field("interval"), i)
    {
        if d < std::time::Duration::from_millis(1) {
            chk.error(path.field("interval"), "must be at least 1ms");
        }
        out.interval = d;
    }
    if let Some(b) = &od.base_ejection_time
        && let Some(d) = chk.duration(path.field("baseEjectionTime"), b)
    {
        out.base_ejection_time = d;
    }
    for (field, value, slot) in [
        (
            "maxEjectionPercent",
            od.max_ejection_percent,
            &mut out.max_ejection_percent,
        ),
        (
            "minHealthPercent",
            od.min_health_percent,
            &mut out.min_health_percent,
        ),
    ] {
        match value {
            Some(v @ 0..=100) => *slot = v.unsigned_abs(),
            Some(v) => chk.error(
                path.field(field),
                format!("must be between 0 and 100, found {v}"),
            ),
            None => {}
        }
    }
    (chk.error_count() == before).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_tokens() {
        let mut chk = Checker::default();
        let f = FieldPath::parse("x");
        let (conds, codes) = retry_on(
            &mut chk,
            &f,
            "5xx, gateway-error,503,unavailable,retriable-headers",
        )
        .unwrap();
        assert_eq!(codes, vec![503]);
        assert!(conds.contains(&RetryOn::RetriableStatusCodes));
        assert!(conds.contains(&RetryOn::Unavailable));
        assert_eq!(chk.warnings.len(), 1);
        assert!(retry_on(&mut chk, &f, "5xx,sometimes").is_none());
        assert!(retry_on(&mut chk, &f, "700").is_none());
    }
}
