//! HTTPRoute, GRPCRoute and (waypoint) Gateway validation.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Checker, is_header_name};
use crate::{
    diagnostics::FieldPath,
    model::{
        NamespaceName, ObjectId, Percent, ServiceHost,
        route::{
            Backend, HeaderMatch, HeaderModifier, Mirror, PathMatch, PathRewrite, QueryParamMatch,
            Redirect, RegexPattern, RequestMatch, RetryOn, RetryPolicy, Rewrite, RouteAction,
            RouteParent, RouteRule, RouteTable, ValueMatch, WeightedBackend,
        },
        waypoint::{
            HBONE_PORT, ISTIO_WAYPOINT_CLASS, WAYPOINT_CLASS, Waypoint, WaypointTrafficType,
        },
    },
    resources::{
        GATEWAY_API_GROUP,
        gateway::{
            BackendRef, FilterType, GatewaySpec, GrpcRouteSpec, HeaderModifierSpec, HttpPathMatch,
            HttpRouteMatch, HttpRouteSpec, ParentReference, PathMatchType, PathModifier,
            PathModifierType, RouteFilter, ValueMatchSpec, ValueMatchType,
        },
    },
};

/// Which route kind a filter list belongs to (GRPCRoute allows fewer filters).
#[derive(Clone, Copy, PartialEq, Eq)]
enum RouteKind {
    Http,
    Grpc,
}

/// What the filters of a rule amount to.
#[derive(Default)]
struct Filters {
    request_headers: HeaderModifier,
    response_headers: HeaderModifier,
    redirect: Option<Redirect>,
    rewrite: Option<Rewrite>,
    mirrors: Vec<Mirror>,
}

fn parents(
    chk: &mut Checker,
    refs: Option<&Vec<ParentReference>>,
    ns: &NamespaceName,
) -> Vec<RouteParent> {
    let root = FieldPath::parse("spec").field("parentRefs");
    let refs = match refs {
        Some(r) if !r.is_empty() => r,
        _ => {
            chk.error(
                root,
                "required: attach the route to a Service (Gateway API mesh routes, GAMMA)",
            );
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        let p = root.index(i);
        let group = r.group.as_deref().unwrap_or(GATEWAY_API_GROUP);
        let kind = r.kind.as_deref().unwrap_or("Gateway");
        match (group, kind) {
            ("" | "core", "Service") => {}
            (GATEWAY_API_GROUP, "Gateway") => {
                chk.error(
                    p.field("kind"),
                    "attaching to a Gateway (ingress) is not supported by Ambit: mesh routes attach to a Service (set group: \"\" and kind: Service)",
                );
                continue;
            }
            (_, "Service") => {
                chk.error(
                    p.field("group"),
                    format!("a Service parent has group \"\" (core), not `{group}`"),
                );
                continue;
            }
            _ => {
                chk.error(
                    p.field("kind"),
                    format!("parent kind `{kind}` ({group}) is not supported: use a Service"),
                );
                continue;
            }
        }
        if r.name.is_empty() {
            chk.error(p.field("name"), "must not be empty");
            continue;
        }
        if r.section_name.is_some() {
            chk.warn(
                p.field("sectionName"),
                "ignored for Service parents: use port to select a port",
            );
        }
        let port = r.port.and_then(|n| chk.port(p.field("port"), i64::from(n)));
        let namespace = r
            .namespace
            .as_deref()
            .map_or_else(|| ns.clone(), NamespaceName::new);
        if namespace != *ns {
            chk.warn(
                p.field("namespace"),
                format!("a route in namespace `{ns}` for a Service in `{namespace}` applies only to clients in `{ns}` (consumer route)"),
            );
        }
        out.push(RouteParent::Service {
            namespace,
            name: r.name.clone(),
            port,
        });
    }
    out
}

fn hostnames(chk: &mut Checker, hostnames: Option<&Vec<String>>) {
    if hostnames.is_some_and(|h| !h.is_empty()) {
        chk.warn(
            FieldPath::parse("spec").field("hostnames"),
            "ignored for routes attached to Services",
        );
    }
}

/// Validates an HTTPRoute.
pub(super) fn http_route(
    id: &ObjectId,
    spec: &HttpRouteSpec,
    chk: &mut Checker,
) -> Option<RouteTable> {
    let parents = parents(chk, spec.parent_refs.as_ref(), &id.namespace);
    hostnames(chk, spec.hostnames.as_ref());
    let root = FieldPath::parse("spec").field("rules");
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let p = root.index(i);
        let before = chk.error_count();
        if rule.session_persistence.is_some() {
            chk.warn(
                p.field("sessionPersistence"),
                "not supported by Ambit: requests are load balanced individually",
            );
        }
        let default_match = [HttpRouteMatch::default()];
        let raw_matches = rule
            .matches
            .as_deref()
            .filter(|m| !m.is_empty())
            .unwrap_or(&default_match);
        let mut matches = Vec::new();
        for (j, m) in raw_matches.iter().enumerate() {
            if let Some(m) = http_match(chk, &p.field("matches").index(j), m) {
                matches.push(m);
            }
        }
        let all_prefix = matches
            .iter()
            .all(|m| matches!(m.path, Some(PathMatch::SegmentPrefix(_))));
        let filters = filters(
            chk,
            &p.field("filters"),
            rule.filters.as_ref(),
            RouteKind::Http,
            all_prefix,
            &id.namespace,
        );
        let backends = backend_refs(
            chk,
            &p.field("backendRefs"),
            rule.backend_refs.as_ref(),
            &id.namespace,
        );
        let (timeout, backend_timeout) = match &rule.timeouts {
            None => (None, None),
            Some(t) => {
                let tp = p.field("timeouts");
                let request = t
                    .request
                    .as_ref()
                    .and_then(|v| chk.duration(tp.field("request"), v));
                let backend = t
                    .backend_request
                    .as_ref()
                    .and_then(|v| chk.duration(tp.field("backendRequest"), v));
                if let (Some(r), Some(b)) = (request, backend)
                    && !r.is_zero()
                    && (b.is_zero() || b > r)
                {
                    chk.error(
                        tp.field("backendRequest"),
                        format!("{b:?} exceeds timeouts.request ({r:?})"),
                    );
                }
                (
                    request.filter(|d| !d.is_zero()),
                    backend.filter(|d| !d.is_zero()),
                )
            }
        };
        let retry = rule.retry.as_ref().and_then(|r| {
            let rp = p.field("retry");
            let attempts = match r.attempts {
                Some(a) if a < 0 => {
                    chk.error(
                        rp.field("attempts"),
                        format!("must not be negative, found {a}"),
                    );
                    return None;
                }
                Some(a) => a.unsigned_abs(),
                None => RetryPolicy::mesh_default().attempts,
            };
            let mut status_codes = Vec::new();
            for (k, c) in r.codes.iter().flatten().enumerate() {
                match u16::try_from(*c) {
                    Ok(code @ 400..=599) => status_codes.push(code),
                    _ => chk.error(
                        rp.field("codes").index(k),
                        format!("must be an HTTP status between 400 and 599, found {c}"),
                    ),
                }
            }
            let backoff = r
                .backoff
                .as_ref()
                .and_then(|b| chk.duration(rp.field("backoff"), b));
            let mut retry_on = vec![RetryOn::ConnectFailure, RetryOn::RefusedStream];
            if !status_codes.is_empty() {
                retry_on.push(RetryOn::RetriableStatusCodes);
            }
            Some(RetryPolicy {
                attempts,
                per_try_timeout: None,
                retry_on,
                status_codes,
                backoff,
            })
        });
        if chk.error_count() != before {
            continue;
        }
        rules.push(build_rule(
            rule.name.clone(),
            matches,
            filters,
            backends,
            timeout,
            backend_timeout,
            retry,
            chk,
            &p,
        ));
    }
    (chk.error_count() == 0).then(|| RouteTable {
        id: id.clone(),
        parents,
        rules,
    })
}

#[expect(
    clippy::too_many_arguments,
    reason = "assembles one rule from its validated parts"
)]
fn build_rule(
    name: Option<String>,
    matches: Vec<RequestMatch>,
    filters: Filters,
    backends: Vec<WeightedBackend>,
    timeout: Option<Duration>,
    backend_timeout: Option<Duration>,
    retry: Option<RetryPolicy>,
    chk: &mut Checker,
    path: &FieldPath,
) -> RouteRule {
    let action = match filters.redirect {
        Some(r) => {
            if !backends.is_empty() {
                chk.warn(
                    path.field("backendRefs"),
                    "ignored: the rule answers with a redirect",
                );
            }
            RouteAction::Redirect(r)
        }
        None => RouteAction::Forward(backends),
    };
    RouteRule {
        name,
        matches,
        action,
        request_headers: filters.request_headers,
        response_headers: filters.response_headers,
        rewrite: filters.rewrite,
        timeout,
        backend_timeout,
        retry,
        fault: None,
        mirrors: filters.mirrors,
    }
}

fn regex(chk: &mut Checker, field: FieldPath, pattern: &str) -> Option<RegexPattern> {
    match RegexPattern::new(pattern) {
        Ok(r) => Some(r),
        Err(e) => {
            let msg = e.to_string();
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

fn http_match(chk: &mut Checker, path: &FieldPath, m: &HttpRouteMatch) -> Option<RequestMatch> {
    let before = chk.error_count();
    let default_path = HttpPathMatch::default();
    let pm = m.path.as_ref().unwrap_or(&default_path);
    let value = pm.value.clone().unwrap_or_else(|| "/".to_owned());
    let vp = path.field("path").field("value");
    let path_match = match pm.match_type.unwrap_or(PathMatchType::PathPrefix) {
        t @ (PathMatchType::Exact | PathMatchType::PathPrefix) => {
            if !value.starts_with('/') {
                chk.error(vp, format!("`{value}` must start with `/`"));
                None
            } else if t == PathMatchType::Exact {
                Some(PathMatch::Exact(value))
            } else {
                Some(PathMatch::SegmentPrefix(value))
            }
        }
        PathMatchType::RegularExpression => regex(chk, vp, &value).map(PathMatch::Regex),
    };
    let headers = value_matches(chk, &path.field("headers"), m.headers.as_ref(), true)
        .into_iter()
        .map(|(name, value)| HeaderMatch {
            name,
            value,
            invert: false,
        })
        .collect();
    let query_params = value_matches(
        chk,
        &path.field("queryParams"),
        m.query_params.as_ref(),
        false,
    )
    .into_iter()
    .map(|(name, value)| QueryParamMatch { name, value })
    .collect();
    let method = m.method.map(|x| ValueMatch::Exact(x.as_str().to_owned()));
    (chk.error_count() == before).then_some(RequestMatch {
        path: path_match,
        headers,
        query_params,
        method,
        ..Default::default()
    })
}

/// Header (names case-insensitive) or query parameter matches; later duplicates of a
/// name are ignored, as the Gateway API specifies.
fn value_matches(
    chk: &mut Checker,
    path: &FieldPath,
    list: Option<&Vec<ValueMatchSpec>>,
    headers: bool,
) -> Vec<(String, ValueMatch)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (k, v) in list.into_iter().flatten().enumerate() {
        let p = path.index(k);
        let name = if headers {
            v.name.to_ascii_lowercase()
        } else {
            v.name.clone()
        };
        if name.is_empty() || (headers && !is_header_name(&name)) {
            chk.error(p.field("name"), format!("`{}` is not a valid name", v.name));
            continue;
        }
        if !seen.insert(name.clone()) {
            chk.warn(
                p.field("name"),
                format!(
                    "`{}` is matched by an earlier entry; this one is ignored",
                    v.name
                ),
            );
            continue;
        }
        let value = match v.match_type.unwrap_or(ValueMatchType::Exact) {
            ValueMatchType::Exact => Some(ValueMatch::Exact(v.value.clone())),
            ValueMatchType::RegularExpression => {
                regex(chk, p.field("value"), &v.value).map(ValueMatch::Regex)
            }
        };
        if let Some(value) = value {
            out.push((name, value));
        }
    }
    out
}

fn header_modifier(
    chk: &mut Checker,
    path: &FieldPath,
    spec: &HeaderModifierSpec,
) -> HeaderModifier {
    let mut pairs = |field: &str, list: Option<&Vec<crate::resources::gateway::HeaderValue>>| {
        let mut out = Vec::new();
        for (k, h) in list.into_iter().flatten().enumerate() {
            if is_header_name(&h.name) {
                out.push((h.name.to_ascii_lowercase(), h.value.clone()));
            } else {
                chk.error(
                    path.field(field).index(k).field("name"),
                    format!("`{}` is not a valid header name", h.name),
                );
            }
        }
        out
    };
    let set = pairs("set", spec.set.as_ref());
    let add = pairs("add", spec.add.as_ref());
    let mut remove = Vec::new();
    for (k, h) in spec.remove.iter().flatten().enumerate() {
        if is_header_name(h) {
            remove.push(h.to_ascii_lowercase());
        } else {
            chk.error(
                path.field("remove").index(k),
                format!("`{h}` is not a valid header name"),
            );
        }
    }
    HeaderModifier { set, add, remove }
}

fn path_modifier(
    chk: &mut Checker,
    path: &FieldPath,
    m: &PathModifier,
    all_prefix: bool,
) -> Option<PathRewrite> {
    match m.modifier_type {
        PathModifierType::ReplaceFullPath => match &m.replace_full_path {
            Some(v) if v.starts_with('/') => Some(PathRewrite::Full(v.clone())),
            Some(v) => {
                chk.error(
                    path.field("replaceFullPath"),
                    format!("`{v}` must start with `/`"),
                );
                None
            }
            None => {
                chk.error(
                    path.field("replaceFullPath"),
                    "required when type is ReplaceFullPath",
                );
                None
            }
        },
        PathModifierType::ReplacePrefixMatch => {
            if !all_prefix {
                chk.error(
                    path.field("type"),
                    "ReplacePrefixMatch requires every match of the rule to be a PathPrefix match",
                );
                return None;
            }
            match &m.replace_prefix_match {
                Some(v) if v.starts_with('/') => Some(PathRewrite::Prefix(v.clone())),
                Some(v) => {
                    chk.error(
                        path.field("replacePrefixMatch"),
                        format!("`{v}` must start with `/`"),
                    );
                    None
                }
                None => {
                    chk.error(
                        path.field("replacePrefixMatch"),
                        "required when type is ReplacePrefixMatch",
                    );
                    None
                }
            }
        }
    }
}

fn filters(
    chk: &mut Checker,
    path: &FieldPath,
    list: Option<&Vec<RouteFilter>>,
    kind: RouteKind,
    all_prefix: bool,
    ns: &NamespaceName,
) -> Filters {
    let mut out = Filters::default();
    let mut seen = BTreeSet::new();
    for (k, f) in list.into_iter().flatten().enumerate() {
        let p = path.index(k);
        let t = f.filter_type;
        let allowed = match t {
            FilterType::RequestHeaderModifier
            | FilterType::ResponseHeaderModifier
            | FilterType::RequestMirror => true,
            FilterType::RequestRedirect | FilterType::UrlRewrite => kind == RouteKind::Http,
            FilterType::ExtensionRef | FilterType::Cors | FilterType::ExternalAuth => {
                chk.error(
                    p.field("type"),
                    format!("{t:?} filters are not supported by Ambit"),
                );
                continue;
            }
        };
        if !allowed {
            chk.error(p.field("type"), format!("{t:?} is not a GRPCRoute filter"));
            continue;
        }
        // Each filter's settings field must be the one its type names, and only it.
        let fields = [
            (
                FilterType::RequestHeaderModifier,
                "requestHeaderModifier",
                f.request_header_modifier.is_some(),
            ),
            (
                FilterType::ResponseHeaderModifier,
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            (
                FilterType::RequestMirror,
                "requestMirror",
                f.request_mirror.is_some(),
            ),
            (
                FilterType::RequestRedirect,
                "requestRedirect",
                f.request_redirect.is_some(),
            ),
            (
                FilterType::UrlRewrite,
                "urlRewrite",
                f.url_rewrite.is_some(),
            ),
            (
                FilterType::ExtensionRef,
                "extensionRef",
                f.extension_ref.is_some(),
            ),
            (FilterType::Cors, "cors", f.cors.is_some()),
            (
                FilterType::ExternalAuth,
                "externalAuth",
                f.external_auth.is_some(),
            ),
        ];
        let mut consistent = true;
        for (ft, name, present) in fields {
            if ft == t && !present {
                chk.error(p.field(name), format!("required when type is {t:?}"));
                consistent = false;
            } else if ft != t && present {
                chk.error(p.field(name), format!("not allowed when type is {t:?}"));
                consistent = false;
            }
        }
        if !consistent {
            continue;
        }
        if t != FilterType::RequestMirror && !seen.insert(format!("{t:?}")) {
            chk.error(
                p.field("type"),
                format!("{t:?} may appear only once in a rule"),
            );
            continue;
        }
        match t {
            FilterType::RequestHeaderModifier => {
                if let Some(s) = &f.request_header_modifier {
                    out.request_headers =
                        header_modifier(chk, &p.field("requestHeaderModifier"), s);
                }
            }
            FilterType::ResponseHeaderModifier => {
                if let Some(s) = &f.response_header_modifier {
                    out.response_headers =
                        header_modifier(chk, &p.field("responseHeaderModifier"), s);
                }
            }
            FilterType::RequestMirror => {
                let Some(m) = &f.request_mirror else { continue };
                let mp = p.field("requestMirror");
                let percent = match (m.percent, &m.fraction) {
                    (Some(_), Some(_)) => {
                        chk.error(mp.field("fraction"), "cannot be combined with percent");
                        None
                    }
                    (Some(pc), None) => chk.percent(mp.field("percent"), f64::from(pc)),
                    (None, Some(fr)) => {
                        let den = fr.denominator.unwrap_or(100);
                        if den <= 0 || fr.numerator < 0 || fr.numerator > den {
                            chk.error(
                                mp.field("fraction"),
                                format!("{}/{den} is not a fraction between 0 and 1", fr.numerator),
                            );
                            None
                        } else {
                            chk.percent(
                                mp.field("fraction"),
                                f64::from(fr.numerator) * 100.0 / f64::from(den),
                            )
                        }
                    }
                    (None, None) => Some(Percent::ALL),
                };
                let backend =
                    backend_ref(chk, &mp.field("backendRef"), &m.backend_ref, ns).map(|(b, _)| b);
                if let (Some(backend), Some(percent)) = (backend, percent) {
                    out.mirrors.push(Mirror { backend, percent });
                }
            }
            FilterType::RequestRedirect => {
                let Some(r) = &f.request_redirect else {
                    continue;
                };
                let rp = p.field("requestRedirect");
                if let Some(s) = &r.scheme
                    && !matches!(s.as_str(), "http" | "https")
                {
                    chk.error(
                        rp.field("scheme"),
                        format!("must be http or https, found `{s}`"),
                    );
                }
                let status = match r.status_code {
                    None => 302,
                    Some(c @ (301 | 302 | 303 | 307 | 308)) => u16::try_from(c).unwrap_or(302),
                    Some(c) => {
                        chk.error(
                            rp.field("statusCode"),
                            format!("must be 301, 302, 303, 307 or 308, found {c}"),
                        );
                        302
                    }
                };
                let port = r
                    .port
                    .and_then(|n| chk.port(rp.field("port"), i64::from(n)));
                let new_path = r
                    .path
                    .as_ref()
                    .and_then(|m| path_modifier(chk, &rp.field("path"), m, all_prefix));
                out.redirect = Some(Redirect {
                    scheme: r.scheme.clone(),
                    host: r.hostname.clone(),
                    port,
                    path: new_path,
                    status,
                });
            }
            FilterType::UrlRewrite => {
                let Some(r) = &f.url_rewrite else { continue };
                let new_path = r.path.as_ref().and_then(|m| {
                    path_modifier(chk, &p.field("urlRewrite").field("path"), m, all_prefix)
                });
                out.rewrite = Some(Rewrite {
                    path: new_path,
                    authority: r.hostname.clone(),
                });
            }
            FilterType::ExtensionRef | FilterType::Cors | FilterType::ExternalAuth => {}
        }
    }
    if seen.contains("RequestRedirect") && seen.contains("UrlRewrite") {
        chk.error(
            path.clone(),
            "RequestRedirect and URLRewrite cannot be used in the same rule",
        );
    }
    out
}

/// A Service backend and its weight.
fn backend_ref(
    chk: &mut Checker,
    path: &FieldPath,
    b: &BackendRef,
    ns: &NamespaceName,
) -> Option<(Backend, u32)> {
    let before = chk.error_count();
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !(matches!(group, "" | "core") && kind == "Service") {
        chk.error(
            path.field("kind"),
            format!("backend kind `{kind}` ({group}) is not supported: use a Service"),
        );
    }
    if b.name.is_empty() {
        chk.error(path.field("name"), "must not be empty");
    }
    let port = match b.port {
        Some(n) => chk.port(path.field("port"), i64::from(n)),
        None => {
            chk.error(path.field("port"), "required for a Service backend");
            None
        }
    };
    let weight = match b.weight {
        None => 1,
        Some(w @ 0..=1_000_000) => w.unsigned_abs(),
        Some(w) => {
            chk.error(
                path.field("weight"),
                format!("must be between 0 and 1000000, found {w}"),
            );
            0
        }
    };
    if let Some(bns) = &b.namespace
        && bns != ns.as_str()
    {
        chk.error(
            path.field("namespace"),
            format!("backends in another namespace (`{bns}`) need a ReferenceGrant, which Ambit does not support"),
        );
    }
    (chk.error_count() == before).then(|| {
        let host = ServiceHost::Service {
            namespace: ns.clone(),
            name: b.name.clone(),
        };
        (
            Backend {
                host,
                port,
                subset: None,
            },
            weight,
        )
    })
}

fn backend_refs(
    chk: &mut Checker,
    path: &FieldPath,
    list: Option<&Vec<BackendRef>>,
    ns: &NamespaceName,
) -> Vec<WeightedBackend> {
    let mut out = Vec::new();
    for (k, b) in list.into_iter().flatten().enumerate() {
        let p = path.index(k);
        // Per-backend filters: header modifiers only.
        let mut request_headers = HeaderModifier::default();
        let mut response_headers = HeaderModifier::default();
        for (j, f) in b.filters.iter().flatten().enumerate() {
            let fp = p.field("filters").index(j);
            match (f.filter_type, &f.request_header_modifier, &f.response_header_modifier) {
                (FilterType::RequestHeaderModifier, Some(s), _) => {
                    request_headers = header_modifier(chk, &fp.field("requestHeaderModifier"), s);
                }
                (FilterType::ResponseHeaderModifier, _, Some(s)) => {
                    response_headers = header_modifier(chk, &fp.field("responseHeaderModifier"), s);
                }
                (t, _, _) => chk.error(
                    fp.field("type"),
                    format!("{t:?} is not supported on a backendRef (only header modifiers, with their settings)"),
                ),
            }
        }
        if let Some((backend, weight)) = backend_ref(chk, &p, b, ns) {
            out.push(WeightedBackend {
                backend,
                weight,
                request_headers,
                response_headers,
            });
        }
    }
    out
}

/// Validates a GRPCRoute (gRPC methods become path matches).
pub(super) fn grpc_route(
    id: &ObjectId,
    spec: &GrpcRouteSpec,
    chk: &mut Checker,
) -> Option<RouteTable> {
    let parents = parents(chk, spec.parent_refs.as_ref(), &id.namespace);
    hostnames(chk, spec.hostnames.as_ref());
    let root = FieldPath::parse("spec").field("rules");
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let p = root.index(i);
        let before = chk.error_count();
        if rule.session_persistence.is_some() {
            chk.warn(
                p.field("sessionPersistence"),
                "not supported by Ambit: requests are load balanced individually",
            );
        }
        let mut matches = Vec::new();
        for (j, m) in rule.matches.iter().flatten().enumerate() {
            let mp = p.field("matches").index(j);
            let path_match = m.method.as_ref().and_then(|mm| {
                let f = mp.field("method");
                let t = mm.match_type.unwrap_or(ValueMatchType::Exact);
                match (t, mm.service.as_deref(), mm.method.as_deref()) {
                    (_, None, None) => {
                        chk.error(f, "set service, method or both");
                        None
                    }
                    (ValueMatchType::Exact, svc, meth) => {
                        let bad = |s: &str, dots: bool| {
                            s.is_empty()
                                || !s.bytes().all(|b| {
                                    b.is_ascii_alphanumeric() || b == b'_' || (dots && b == b'.')
                                })
                        };
                        if let Some(s) = svc
                            && bad(s, true)
                        {
                            chk.error(
                                f.field("service"),
                                format!("`{s}` is not a gRPC service name"),
                            );
                            return None;
                        }
                        if let Some(m) = meth
                            && bad(m, false)
                        {
                            chk.error(
                                f.field("method"),
                                format!("`{m}` is not a gRPC method name"),
                            );
                            return None;
                        }
                        match (svc, meth) {
                            (Some(s), Some(m)) => Some(PathMatch::Exact(format!("/{s}/{m}"))),
                            (Some(s), None) => Some(PathMatch::Prefix(format!("/{s}/"))),
                            (None, m) => {
                                let m = regex::escape(m.unwrap_or_default());
                                RegexPattern::new(&format!("/[^/]+/{m}"))
                                    .ok()
                                    .map(PathMatch::Regex)
                            }
                        }
                    }
                    (ValueMatchType::RegularExpression, svc, meth) => {
                        let s = svc.map(|s| regex(chk, f.field("service"), s));
                        let m = meth.map(|m| regex(chk, f.field("method"), m));
                        let s = match s {
                            Some(Some(r)) => r.as_str().to_owned(),
                            Some(None) => return None,
                            None => "[^/]+".to_owned(),
                        };
                        let m = match m {
                            Some(Some(r)) => r.as_str().to_owned(),
                            Some(None) => return None,
                            None => "[^/]+".to_owned(),
                        };
                        RegexPattern::new(&format!("/(?:{s})/(?:{m})"))
                            .ok()
                            .map(PathMatch::Regex)
                    }
                }
            });
            let headers = value_matches(chk, &mp.field("headers"), m.headers.as_ref(), true)
                .into_iter()
                .map(|(name, value)| HeaderMatch {
                    name,
                    value,
                    invert: false,
                })
                .collect();
            matches.push(RequestMatch {
                path: path_match,
                headers,
                ..Default::default()
            });
        }
        let filters = filters(
            chk,
            &p.field("filters"),
            rule.filters.as_ref(),
            RouteKind::Grpc,
            false,
            &id.namespace,
        );
        let backends = backend_refs(
            chk,
            &p.field("backendRefs"),
            rule.backend_refs.as_ref(),
            &id.namespace,
        );
        if chk.error_count() != before {
            continue;
        }
        rules.push(build_rule(
            rule.name.clone(),
            matches,
            filters,
            backends,
            None,
            None,
            None,
            chk,
            &p,
        ));
    }
    (chk.error_count() == 0).then(|| RouteTable {
        id: id.clone(),
        parents,
        rules,
    })
}

/// What a Gateway is to Ambit.
pub(super) enum GatewayOutcome {
    /// Another class: not Ambit's business.
    NotAWaypoint(String),
    /// A waypoint (`None` when invalid; problems are in the checker).
    Waypoint(Option<Waypoint>),
}

/// Validates a Gateway; only the waypoint classes concern Ambit.
pub(super) fn gateway(
    id: &ObjectId,
    meta: &ObjectMeta,
    spec: &GatewaySpec,
    chk: &mut Checker,
) -> GatewayOutcome {
    let class = spec.gateway_class_name.as_str();
    if class != WAYPOINT_CLASS && class != ISTIO_WAYPOINT_CLASS {
        return GatewayOutcome::NotAWaypoint(format!(
            "gatewayClassName `{class}` is not a waypoint class ({WAYPOINT_CLASS}); Ambit does not run ingress gateways"
        ));
    }
    let root = FieldPath::parse("spec");
    let listeners = spec.listeners.as_deref().unwrap_or_default();
    let mut hbone = false;
    for (i, l) in listeners.iter().enumerate() {
        let p = root.field("listeners").index(i);
        let Some(port) = chk.port(p.field("port"), i64::from(l.port)) else {
            continue;
        };
        if port.get() == HBONE_PORT && l.protocol == "HBONE" {
            hbone = true;
        } else {
            chk.warn(
                p.clone(),
                format!("ignored: a waypoint only serves HBONE on port {HBONE_PORT}"),
            );
        }
    }
    if !hbone {
        chk.error(
            root.field("listeners"),
            format!("a waypoint needs a listener with port {HBONE_PORT} and protocol HBONE"),
        );
    }
    if spec.addresses.is_some() {
        chk.warn(root.field("addresses"), "ignored by Ambit");
    }
    let mut traffic_type = WaypointTrafficType::Service;
    for label in ["istio.io/waypoint-for", "ambit.dev/waypoint-for"] {
        if let Some(v) = meta.labels.as_ref().and_then(|l| l.get(label)) {
            traffic_type = match v.as_str() {
                "service" => WaypointTrafficType::Service,
                "workload" => WaypointTrafficType::Workload,
                "all" => WaypointTrafficType::All,
                "none" => WaypointTrafficType::None,
                other => {
                    chk.error(
                        FieldPath::parse("metadata.labels").key(label),
                        format!("`{other}` is not one of service, workload, all, none"),
                    );
                    traffic_type
                }
            };
        }
    }
    GatewayOutcome::Waypoint((chk.error_count() == 0).then(|| Waypoint {
        id: id.clone(),
        traffic_type,
    }))
}
