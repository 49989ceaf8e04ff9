//! A proto [`RouteSet`](pb::RouteSet) compiled into an ordered matcher.
//!
//! Conversion checks everything the waypoint could otherwise only discover per request
//! (regular expressions, header names and values, durations, status codes); an error
//! names the offending field (`routes[2].matches[0].path.regex`) so the proxy can NACK
//! the update with a useful message and keep serving its previous routes.

use std::{sync::Arc, time::Duration};

use ambit_api::config::v1 as pb;
use regex::Regex;

use crate::{
    fault::FaultPolicy,
    modify::{DirectResponse, HeaderOps, Redirect, Rewrite},
    retry::RetryPolicy,
};

/// A RouteSet field the waypoint cannot apply.
#[derive(Debug, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct ConvertError {
    /// Path of the field in the message (`routes[0].matches[1].headers[0].value.regex`).
    pub field: String,
    /// What is wrong with it.
    #[source]
    pub reason: Invalid,
}

/// Why a field was refused.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    /// Not a valid (RE2-style) regular expression.
    #[error("bad regular expression")]
    Regex(#[source] regex::Error),
    /// Negative or out-of-range `google.protobuf.Duration`.
    #[error("bad duration")]
    Duration(#[source] ambit_api::time::InvalidDuration),
    /// Not a valid HTTP header name.
    #[error("bad header name")]
    HeaderName(#[source] http::header::InvalidHeaderName),
    /// Not a valid HTTP header value.
    #[error("bad header value")]
    HeaderValue(#[source] http::header::InvalidHeaderValue),
    /// Not a usable HTTP status code for this field.
    #[error("status code {0} out of range")]
    Status(u32),
    /// Not a TCP port.
    #[error("port {0} out of range")]
    Port(u32),
    /// Not a valid HTTP method token.
    #[error("bad HTTP method {0:?}")]
    Method(String),
}

impl ConvertError {
    pub(crate) fn new(field: impl Into<String>, reason: Invalid) -> Self {
        Self {
            field: field.into(),
            reason,
        }
    }

    /// Prefix the field path with the enclosing field (`routes[3].` + `matches[0]…`).
    pub(crate) fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

/// The service port a request arrived for; set by the listener as a request extension.
/// Without it, routes' `ports` restrictions are not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePort(pub u16);

/// A compiled RouteSet: routes in the controller's order.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
}

/// One compiled route rule.
#[derive(Debug)]
pub struct Route {
    /// `<Kind>/<namespace>/<name>#<rule-index>` for logs and metrics.
    pub name: String,
    ports: Vec<u16>,
    matches: Vec<RouteMatch>,
    /// What to do with a matching request.
    pub action: Action,
}

/// A route's action.
#[derive(Debug)]
pub enum Action {
    /// Forward to a weighted set of destinations.
    Forward(Arc<Forward>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response.
    DirectResponse(DirectResponse),
    /// The controller could not translate the action: answer 500.
    Unset,
}

/// A forwarding action, compiled.
#[derive(Debug)]
pub struct Forward {
    /// The weighted split (weights as sent; zero weights never chosen).
    pub destinations: Vec<RouteDestination>,
    /// Path / authority rewrite.
    pub rewrite: Option<Rewrite>,
    /// Route-level request header changes (applied before per-destination ones).
    pub request_headers: HeaderOps,
    /// Route-level response header changes (applied before per-destination ones).
    pub response_headers: HeaderOps,
    /// Whole-request deadline including retries.
    pub timeout: Option<Duration>,
    /// Retry policy, if any.
    pub retry: Option<Arc<RetryPolicy>>,
    /// Fault injection, if any.
    pub fault: Option<Arc<FaultPolicy>>,
    /// Mirror destinations and the share of requests (percent) copied to each; sent
    /// by [`crate::mirror`].
    pub mirrors: Vec<(RouteDestination, f64)>,
}

/// One backend of a split.
#[derive(Clone, Debug)]
pub struct RouteDestination {
    /// Destination service.
    pub service: pb::NamespacedName,
    /// Service port; `None` = the port the request arrived for.
    pub port: Option<u16>,
    /// DestinationPolicy subset; `None` = all endpoints.
    pub subset: Option<String>,
    /// Relative weight.
    pub weight: u32,
    /// Per-destination request header changes.
    pub request_headers: HeaderOps,
    /// Per-destination response header changes.
    pub response_headers: HeaderOps,
}

/// Which part of the path a match consumed, for prefix rewrites.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consumed {
    /// This many leading bytes (a prefix match).
    Prefix(usize),
    /// The whole path (exact, regex or no path match).
    Whole,
}

#[derive(Debug)]
struct RouteMatch {
    path: Option<PathMatch>,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
    method: Option<http::Method>,
    grpc: Option<GrpcMatch>,
}

#[derive(Debug)]
enum PathMatch {
    Exact { value: String, ignore_case: bool },
    Prefix { value: String, ignore_case: bool },
    Segment { value: String, ignore_case: bool },
    Regex(Regex),
}

#[derive(Debug)]
struct HeaderMatch {
    name: String,
    value: Option<StringMatch>,
    invert: bool,
}

#[derive(Debug)]
struct QueryMatch {
    name: String,
    value: Option<StringMatch>,
}

#[derive(Debug)]
struct GrpcMatch {
    service: String,
    method: String,
}

/// A compiled [`pb::StringMatch`].
#[derive(Debug)]
pub(crate) enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Regex(Regex),
    Present,
    /// No kind, or a kind meaningless here: never matches (fail closed).
    Never,
}

impl RouteTable {
    /// Compile a RouteSet. Errors name the offending field.
    pub fn try_from_proto(set: &pb::RouteSet) -> Result<Self, ConvertError> {
        let routes = set
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Route::try_from_proto(r).map_err(|e| e.within(&format!("routes[{i}]"))))
            .collect::<Result<_, _>>()?;
        Ok(Self { routes })
    }

    /// No routes: every request answers 404.
    pub fn empty() -> Self {
        Self { routes: Vec::new() }
    }

    /// Appends `default` (the route to the service itself), restricted to the
    /// `service_ports` no route of the table admits: a route attached to one port (a
    /// Gateway API `parentRef` with `port`, a VirtualService match on `port`) leaves
    /// the service's other ports routed as without any route, as Istio builds routes
    /// per port, instead of answering them 404. Nothing is added when a route admits
    /// every port.
    pub fn add_default_for_unrouted_ports(
        &mut self,
        default: &pb::Route,
        service_ports: impl IntoIterator<Item = u16>,
    ) -> Result<(), ConvertError> {
        if self.routes.iter().any(|r| r.ports.is_empty()) {
            return Ok(());
        }
        let unrouted: Vec<u16> = service_ports
            .into_iter()
            .filter(|p| !self.routes.iter().any(|r| r.ports.contains(p)))
            .collect();
        if !unrouted.is_empty() {
            let mut route = Route::try_from_proto(default)?;
            route.ports = unrouted;
            self.routes.push(route);
        }
        Ok(())
    }

    /// The routes, in order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The first route admitting the request's port (from [`ServicePort`]) with a
    /// matching `match`.
    pub fn select<B>(&self, request: &http::Request<B>) -> Option<&Route> {
        self.select_with_match(request).map(|(route, _)| route)
    }

    /// Like [`select`](Self::select), also telling how much of the path the match
    /// consumed (for prefix rewrites).
    pub fn select_with_match<B>(&self, request: &http::Request<B>) -> Option<(&Route, Consumed)> {
        let port = request.extensions().get::<ServicePort>().map(|p| p.0);
        self.routes.iter().find_map(|route| {
            if let Some(port) = port
                && !route.ports.is_empty()
                && !route.ports.contains(&port)
            {
                return None;
            }
            route.matches(request).map(|consumed| (route, consumed))
        })
    }
}

impl Route {
    fn try_from_proto(route: &pb::Route) -> Result<Self, ConvertError> {
        let ports = route
            .ports
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                u16::try_from(p)
                    .map_err(|_| ConvertError::new(format!("ports[{i}]"), Invalid::Port(p)))
            })
            .collect::<Result<_, _>>()?;
        let matches = route
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| {
                RouteMatch::try_from_proto(m).map_err(|e| e.within(&format!("matches[{i}]")))
            })
            .collect::<Result<_, _>>()?;
        let action = match &route.action {
            None => Action::Unset,
            Some(pb::route::Action::Forward(f)) => Action::Forward(Arc::new(
                Forward::try_from_proto(f).map_err(|e| e.within("forward"))?,
            )),
            Some(pb::route::Action::Redirect(r)) => {
                Action::Redirect(Redirect::try_from_proto(r).map_err(|e| e.within("redirect"))?)
            }
            Some(pb::route::Action::DirectResponse(d)) => Action::DirectResponse(
                DirectResponse::try_from_proto(d).map_err(|e| e.within("direct_response"))?,
            ),
        };
        Ok(Self {
            name: route.name.clone(),
            ports,
            matches,
            action,
        })
    }

    /// `Some(consumed)` when any match holds (or there are none).
    fn matches<B>(&self, request: &http::Request<B>) -> Option<Consumed> {
        if self.matches.is_empty() {
            return Some(Consumed::Whole);
        }
        self.matches.iter().find_map(|m| m.matches(request))
    }
}

impl Forward {
    fn try_from_proto(f: &pb::Forward) -> Result<Self, ConvertError> {
        let destinations = f
            .destinations
            .iter()
            .enumerate()
            .map(|(i, d)| {
                RouteDestination::try_from_proto(d)
                    .map_err(|e| e.within(&format!("destinations[{i}]")))
            })
            .collect::<Result<_, _>>()?;
        let rewrite = f
            .rewrite
            .as_ref()
            .map(|r| Rewrite::try_from_proto(r).map_err(|e| e.within("rewrite")))
            .transpose()?;
        let request_headers = HeaderOps::try_from_proto(f.request_headers.as_ref())
            .map_err(|e| e.within("request_headers"))?;
        let response_headers = HeaderOps::try_from_proto(f.response_headers.as_ref())
            .map_err(|e| e.within("response_headers"))?;
        let timeout = duration("timeout", f.timeout.as_ref())?;
        let retry = f
            .retry
            .as_ref()
            .map(|r| {
                RetryPolicy::try_from_proto(r)
                    .map(Arc::new)
                    .map_err(|e| e.within("retry"))
            })
            .transpose()?;
        let fault = f
            .fault
            .as_ref()
            .map(|r| {
                FaultPolicy::try_from_proto(r)
                    .map(Arc::new)
                    .map_err(|e| e.within("fault"))
            })
            .transpose()?;
        let mirrors = f
            .mirrors
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                m.destination.as_ref().map(|d| {
                    RouteDestination::try_from_proto(d)
                        .map(|d| (d, m.percent))
                        .map_err(|e| e.within(&format!("mirrors[{i}].destination")))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            destinations,
            rewrite,
            request_headers,
            response_headers,
            timeout,
            retry,
            fault,
            mirrors,
        })
    }
}

impl RouteDestination {
    fn try_from_proto(d: &pb::RouteDestination) -> Result<Self, ConvertError> {
        let port = match d.port {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| ConvertError::new("port", Invalid::Port(p)))?),
        };
        Ok(Self {
            service: d.service.clone().unwrap_or_default(),
            port,
            subset: (!d.subset.is_empty()).then(|| d.subset.clone()),
            weight: d.weight,
            request_headers: HeaderOps::try_from_proto(d.request_headers.as_ref())
                .map_err(|e| e.within("request_headers"))?,
            response_headers: HeaderOps::try_from_proto(d.response_headers.as_ref())
                .map_err(|e| e.within("response_headers"))?,
        })
    }
}

/// Absent or zero: `None`.
pub(crate) fn duration(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, ConvertError> {
    ambit_api::time::optional_duration(d)
        .map_err(|e| ConvertError::new(field, Invalid::Duration(e)))
}

fn anchored_regex(field: &str, pattern: &str, ignore_case: bool) -> Result<Regex, ConvertError> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .case_insensitive(ignore_case)
        .build()
        .map_err(|e| ConvertError::new(field, Invalid::Regex(e)))
}

impl RouteMatch {
    fn try_from_proto(m: &pb::RouteMatch) -> Result<Self, ConvertError> {
        let path = match &m.path {
            None => None,
            Some(p) => {
                let ic = p.ignore_case;
                match &p.kind {
                    None => None,
                    Some(pb::path_match::Kind::Exact(v)) => Some(PathMatch::Exact {
                        value: fold(v, ic),
                        ignore_case: ic,
                    }),
                    Some(pb::path_match::Kind::Prefix(v)) => Some(PathMatch::Prefix {
                        value: fold(v, ic),
                        ignore_case: ic,
                    }),
                    Some(pb::path_match::Kind::SegmentPrefix(v)) => Some(PathMatch::Segment {
                        value: fold(v.trim_end_matches('/'), ic),
                        ignore_case: ic,
                    }),
                    Some(pb::path_match::Kind::Regex(r)) => {
                        Some(PathMatch::Regex(anchored_regex("path.regex", r, ic)?))
                    }
                }
            }
        };
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                Ok(HeaderMatch {
                    name: h.name.to_ascii_lowercase(),
                    value: h
                        .value
                        .as_ref()
                        .map(|v| StringMatch::try_from_proto(&format!("headers[{i}].value"), v))
                        .transpose()?,
                    invert: h.invert,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        let query = m
            .query_params
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Ok(QueryMatch {
                    name: q.name.clone(),
                    value: q
                        .value
                        .as_ref()
                        .map(|v| {
                            StringMatch::try_from_proto(&format!("query_params[{i}].value"), v)
                        })
                        .transpose()?,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                http::Method::from_bytes(m.method.as_bytes())
                    .map_err(|_| ConvertError::new("method", Invalid::Method(m.method.clone())))?,
            )
        };
        let grpc = m.grpc.as_ref().map(|g| GrpcMatch {
            service: g.service.clone(),
            method: g.method.clone(),
        });
        Ok(Self {
            path,
            headers,
            query,
            method,
            grpc,
        })
    }

    fn matches<B>(&self, request: &http::Request<B>) -> Option<Consumed> {
        let path = request.uri().path();
        let consumed = match &self.path {
            None => Consumed::Whole,
            Some(p) => p.matches(path)?,
        };
        if let Some(method) = &self.method
            && request.method() != method
        {
            return None;
        }
        if let Some(grpc) = &self.grpc
            && !grpc.matches(request)
        {
            return None;
        }
        if !self.headers.iter().all(|h| h.matches(request)) {
            return None;
        }
        if !self.query.is_empty() {
            let query = request.uri().query().unwrap_or("");
            if !self.query.iter().all(|q| q.matches(query)) {
                return None;
            }
        }
        Some(consumed)
    }
}

fn fold(s: &str, ignore_case: bool) -> String {
    if ignore_case {
        s.to_ascii_lowercase()
    } else {
        s.to_owned()
    }
}

impl PathMatch {
    fn matches(&self, path: &str) -> Option<Consumed> {
        match self {
            Self::Exact { value, ignore_case } => {
                (fold(path, *ignore_case) == *value).then_some(Consumed::Whole)
            }
            Self::Prefix { value, ignore_case } => fold(path, *ignore_case)
                .starts_with(value.as_str())
                .then_some(Consumed::Prefix(value.len())),
            Self::Segment { value, ignore_case } => {
                let path = fold(path, *ignore_case);
                let rest = path.strip_prefix(value.as_str())?;
                (rest.is_empty() || rest.starts_with('/') || value.is_empty())
                    .then_some(Consumed::Prefix(value.len()))
            }
            Self::Regex(re) => re.is_match(path).then_some(Consumed::Whole),
        }
    }
}

impl HeaderMatch {
    fn matches<B>(&self, request: &http::Request<B>) -> bool {
        let value = header_value(request, &self.name);
        let hit = match (&self.value, value) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(m), Some(v)) => m.matches(&v),
        };
        hit != self.invert
    }
}

/// A request header (pseudo-headers included), multiple values joined with `,` as
/// Envoy does for matching.
fn header_value<B>(request: &http::Request<B>, name: &str) -> Option<String> {
    match name {
        ":authority" | "host" => request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            }),
        ":method" => Some(request.method().as_str().to_owned()),
        ":path" => Some(
            request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        ),
        ":scheme" => request.uri().scheme_str().map(str::to_owned),
        _ => {
            let values: Vec<&str> = request
                .headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        }
    }
}

impl QueryMatch {
    fn matches(&self, query: &str) -> bool {
        query
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .filter(|(k, _)| *k == self.name)
            .any(|(_, v)| self.value.as_ref().is_none_or(|m| m.matches(v)))
    }
}

impl GrpcMatch {
    fn matches<B>(&self, request: &http::Request<B>) -> bool {
        let is_grpc = request.method() == http::Method::POST
            && request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.starts_with("application/grpc"));
        if !is_grpc {
            return false;
        }
        let Some((service, method)) = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
        else {
            return false;
        };
        (self.service.is_empty() || self.service == service)
            && (self.method.is_empty() || self.method == method)
    }
}

impl StringMatch {
    pub(crate) fn try_from_proto(field: &str, m: &pb::StringMatch) -> Result<Self, ConvertError> {
        use pb::string_match::Kind;
        let ic = m.ignore_case;
        Ok(match &m.kind {
            Some(Kind::Exact(v)) => Self::Exact(fold(v, ic), ic),
            Some(Kind::Prefix(v)) => Self::Prefix(fold(v, ic), ic),
            Some(Kind::Suffix(v)) => Self::Suffix(fold(v, ic), ic),
            Some(Kind::Regex(r)) => Self::Regex(anchored_regex(&format!("{field}.regex"), r, ic)?),
            Some(Kind::Present(_)) => Self::Present,
            // Path templates belong to authorization policies only.
            Some(Kind::PathTemplate(_)) | None => Self::Never,
        })
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(v, ic) => fold(value, *ic) == *v,
            Self::Prefix(v, ic) => fold(value, *ic).starts_with(v.as_str()),
            Self::Suffix(v, ic) => fold(value, *ic).ends_with(v.as_str()),
            Self::Regex(re) => re.is_match(value),
            Self::Present => !value.is_empty(),
            Self::Never => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(m: pb::RouteMatch) -> RouteTable {
        let set = pb::RouteSet {
            service: None,
            routes: vec![pb::Route {
                name: "r".into(),
                matches: vec![m],
                ..Default::default()
            }],
        };
        RouteTable::try_from_proto(&set).unwrap()
    }

    fn hits(t: &RouteTable, request: http::Request<()>) -> bool {
        t.select(&request).is_some()
    }

    fn get(uri: &str) -> http::Request<()> {
        http::Request::get(uri).body(()).unwrap()
    }

    fn path(kind: pb::path_match::Kind, ignore_case: bool) -> pb::RouteMatch {
        pb::RouteMatch {
            path: Some(pb::PathMatch {
                kind: Some(kind),
                ignore_case,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ports_no_route_admits_get_the_default_route() {
        let route = |name: &str, ports: Vec<u32>| pb::Route {
            name: name.into(),
            ports,
            ..Default::default()
        };
        let default = route("default", Vec::new());
        let at = |port| {
            let mut r = get("http://h/");
            r.extensions_mut().insert(ServicePort(port));
            r
        };
        let set = |routes| pb::RouteSet {
            service: None,
            routes,
        };

        // A route for 7070 only: 80 and 8080 go to the service as without routes.
        let mut t = RouteTable::try_from_proto(&set(vec![route("grpc", vec![7070])])).unwrap();
        t.add_default_for_unrouted_ports(&default, [80, 7070, 8080])
            .unwrap();
        assert_eq!(t.select(&at(7070)).unwrap().name, "grpc");
        assert_eq!(t.select(&at(80)).unwrap().name, "default");
        assert_eq!(t.select(&at(8080)).unwrap().name, "default");
        assert_eq!(t.routes().len(), 2);

        // A route for every port, or one without a port restriction: nothing added
        // (an unmatched request stays a 404).
        for routes in [
            vec![route("a", vec![80]), route("b", vec![7070])],
            vec![route("a", vec![7070]), route("all", Vec::new())],
        ] {
            let mut t = RouteTable::try_from_proto(&set(routes)).unwrap();
            t.add_default_for_unrouted_ports(&default, [80, 7070])
                .unwrap();
            assert_eq!(t.routes().len(), 2);
        }
    }

    #[test]
    fn segment_prefix_respects_segments_and_ignores_trailing_slash() {
        let t = table(path(
            pb::path_match::Kind::SegmentPrefix("/foo/".into()),
            false,
        ));
        assert!(hits(&t, get("http://h/foo")));
        assert!(hits(&t, get("http://h/foo/")));
        assert!(hits(&t, get("http://h/foo/bar")));
        assert!(!hits(&t, get("http://h/foobar")));
        let root = table(path(pb::path_match::Kind::SegmentPrefix("/".into()), false));
        assert!(hits(&root, get("http://h/anything")));
    }

    #[test]
    fn ignore_case_applies_to_exact_prefix_and_regex() {
        use pb::path_match::Kind;
        assert!(hits(
            &table(path(Kind::Exact("/Api".into()), true)),
            get("http://h/aPI")
        ));
        assert!(hits(
            &table(path(Kind::Prefix("/API".into()), true)),
            get("http://h/api/x")
        ));
        assert!(hits(
            &table(path(Kind::Regex("/api/[a-z]+".into()), true)),
            get("http://h/API/X")
        ));
        assert!(!hits(
            &table(path(Kind::Exact("/Api".into()), false)),
            get("http://h/api")
        ));
    }

    #[test]
    fn headers_cover_pseudo_headers_presence_and_unset_kind() {
        let header = |name: &str, kind: Option<pb::string_match::Kind>| pb::RouteMatch {
            headers: vec![pb::HeaderMatcher {
                name: name.into(),
                value: Some(pb::StringMatch {
                    kind,
                    ignore_case: false,
                }),
                invert: false,
            }],
            ..Default::default()
        };
        use pb::string_match::Kind;
        let t = table(header(":authority", Some(Kind::Suffix(".shop".into()))));
        assert!(hits(&t, get("http://payment.shop/")));
        let host_only = http::Request::get("/")
            .header("host", "payment.shop")
            .body(())
            .unwrap();
        assert!(hits(&t, host_only));
        let t = table(header("x-id", Some(Kind::Present(true))));
        assert!(!hits(&t, get("http://h/")));
        assert!(!hits(
            &t,
            http::Request::get("/").header("x-id", "").body(()).unwrap()
        ));
        assert!(hits(
            &t,
            http::Request::get("/")
                .header("x-id", "7")
                .body(())
                .unwrap()
        ));
        // A matcher the proxy does not understand never matches (fail closed).
        let t = table(header("x-id", None));
        assert!(!hits(
            &t,
            http::Request::get("/")
                .header("x-id", "7")
                .body(())
                .unwrap()
        ));
    }

    #[test]
    fn query_param_presence() {
        let t = table(pb::RouteMatch {
            query_params: vec![pb::QueryParamMatcher {
                name: "debug".into(),
                value: None,
            }],
            ..Default::default()
        });
        assert!(hits(&t, get("http://h/?debug")));
        assert!(hits(&t, get("http://h/?a=1&debug=0")));
        assert!(!hits(&t, get("http://h/?debugger=1")));
    }
}
