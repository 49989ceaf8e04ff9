//! L7 routes: the one model behind VirtualService `http` routes, HTTPRoute and
//! GRPCRoute rules, as the waypoint executes them.
//!
//! A [`RouteTable`] keeps the rule order of its source object (VirtualService: first
//! match wins; Gateway API: the translation step orders rules across routes by the
//! Gateway API precedence). Merging several tables for one service is translation
//! work, not done here.

use std::{fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use super::types::{NamespaceName, ObjectId, Percent, PortNumber, ServiceHost};

/// A regular expression (RE2 syntax as Istio and Envoy use) that is known to compile.
/// Matches are full matches (anchored at both ends).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RegexPattern(String);

impl RegexPattern {
    /// Validates a pattern.
    pub fn new(pattern: &str) -> Result<Self, regex::Error> {
        regex::Regex::new(pattern)?;
        Ok(Self(pattern.to_owned()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compiles for full-string matching (`^(?:…)$`).
    pub fn full_match(&self) -> Result<regex::Regex, regex::Error> {
        regex::Regex::new(&format!("^(?:{})$", self.0))
    }

    /// Compiles unanchored (for rewrites' search and replace).
    pub fn search(&self) -> Result<regex::Regex, regex::Error> {
        regex::Regex::new(&self.0)
    }
}

/// How a string value (header, query parameter, method, authority) is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ValueMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Full regex match.
    Regex(RegexPattern),
    /// Present with any value.
    Present,
}

/// How the request path is matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    /// The whole path (query excluded).
    Exact(String),
    /// A string prefix (VirtualService `uri.prefix`).
    Prefix(String),
    /// A prefix of whole segments (Gateway API `PathPrefix`: `/foo` matches `/foo` and
    /// `/foo/bar`, not `/foobar`).
    SegmentPrefix(String),
    /// Full regex match.
    Regex(RegexPattern),
}

/// A header (or, inverted, the absence of a match on it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, lowercase.
    pub name: String,
    /// How the value is matched.
    pub value: ValueMatch,
    /// Match when the header does *not* match (VirtualService `withoutHeaders`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub invert: bool,
}

/// A query parameter match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryParamMatch {
    /// Parameter name (case-sensitive).
    pub name: String,
    /// How the value is matched.
    pub value: ValueMatch,
}

/// One way a request can match a rule: all present fields must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestMatch {
    /// The path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Compare the path case-insensitively (VirtualService `ignoreUriCase`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_path_case: bool,
    /// The method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<ValueMatch>,
    /// The `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<ValueMatch>,
    /// The scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<ValueMatch>,
    /// Headers, all of which must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// Query parameters, all of which must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<QueryParamMatch>,
    /// The destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortNumber>,
    /// The client's namespace (from its identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<NamespaceName>,
}

/// Where a route's traffic goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// The destination service or host.
    pub host: ServiceHost,
    /// Destination port, when the source names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortNumber>,
    /// A DestinationRule subset (VirtualService only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

/// A backend with its share of traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedBackend {
    /// The backend.
    pub backend: Backend,
    /// Relative weight; a weight of 0 receives no traffic.
    pub weight: u32,
    /// Request header changes for this backend only.
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    pub request_headers: HeaderModifier,
    /// Response header changes for this backend only.
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    pub response_headers: HeaderModifier,
}

/// Header changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Replace (or add) these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<(String, String)>,
    /// Append these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<(String, String)>,
    /// Remove these headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderModifier {
    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// How the path is rewritten (before forwarding, or in a redirect's `Location`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathRewrite {
    /// Replace the whole path.
    Full(String),
    /// Replace the part the rule's prefix match matched (the whole path when the rule
    /// matched otherwise).
    Prefix(String),
    /// Replace every match of a regex.
    Regex {
        /// The pattern searched for.
        pattern: RegexPattern,
        /// Its replacement (`\1`-style groups as in RE2/Envoy).
        substitution: String,
    },
}

/// A rewrite applied before forwarding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// New `:authority`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

/// An HTTP redirect answered by the waypoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// New scheme.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// New host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// New port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortNumber>,
    /// New path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    /// Status code (301, 302, 303, 307 or 308).
    pub status: u16,
}

/// What a rule does with a matching request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteAction {
    /// Forward to backends, split by weight. An empty list answers 500 (Gateway API:
    /// no valid backend).
    Forward(Vec<WeightedBackend>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer directly.
    DirectResponse {
        /// Status code.
        status: u16,
        /// Body.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body: Option<String>,
    },
}

/// Conditions that trigger a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// Any 5xx response, or a connect failure/reset.
    #[serde(rename = "5xx")]
    Http5xx,
    /// 502, 503, 504.
    GatewayError,
    /// Connection failure to the upstream.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// Upstream reset/disconnect/timeout of the response.
    Reset,
    /// 409.
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    /// Statuses listed in [`RetryPolicy::status_codes`].
    RetriableStatusCodes,
    /// gRPC CANCELLED.
    Cancelled,
    /// gRPC DEADLINE_EXCEEDED.
    DeadlineExceeded,
    /// gRPC INTERNAL.
    Internal,
    /// gRPC RESOURCE_EXHAUSTED.
    ResourceExhausted,
    /// gRPC UNAVAILABLE.
    Unavailable,
}

/// A `retryOn` token that is not a supported condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RetryOnError {
    /// An Envoy condition Ambit does not implement.
    #[error("retry condition `{0}` is not supported by Ambit")]
    Unsupported(String),
    /// Not a retry condition at all.
    #[error(
        "`{0}` is not a retry condition (expected e.g. 5xx, gateway-error, connect-failure, refused-stream, reset, retriable-4xx, retriable-status-codes, unavailable, or an HTTP status code)"
    )]
    Unknown(String),
}

impl FromStr for RetryOn {
    type Err = RetryOnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "5xx" => Self::Http5xx,
            "gateway-error" => Self::GatewayError,
            "connect-failure" => Self::ConnectFailure,
            "refused-stream" => Self::RefusedStream,
            "reset" => Self::Reset,
            "retriable-4xx" => Self::Retriable4xx,
            "retriable-status-codes" => Self::RetriableStatusCodes,
            "cancelled" => Self::Cancelled,
            "deadline-exceeded" => Self::DeadlineExceeded,
            "internal" => Self::Internal,
            "resource-exhausted" => Self::ResourceExhausted,
            "unavailable" => Self::Unavailable,
            "envoy-ratelimited"
            | "retriable-headers"
            | "reset-before-request"
            | "http3-post-connect-failure" => return Err(RetryOnError::Unsupported(s.to_owned())),
            _ => return Err(RetryOnError::Unknown(s.to_owned())),
        })
    }
}

/// Retry behaviour of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (0 disables retries).
    pub attempts: u32,
    /// Timeout of each try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// What is retried.
    pub retry_on: Vec<RetryOn>,
    /// Statuses retried under [`RetryOn::RetriableStatusCodes`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_codes: Vec<u16>,
    /// Base back-off between tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
}

impl RetryPolicy {
    /// Istio's default conditions, used when `retryOn` is not given: connect-failure,
    /// refused-stream, unavailable, cancelled, retriable-status-codes.
    pub fn default_conditions() -> Vec<RetryOn> {
        vec![
            RetryOn::ConnectFailure,
            RetryOn::RefusedStream,
            RetryOn::Unavailable,
            RetryOn::Cancelled,
            RetryOn::RetriableStatusCodes,
        ]
    }

    /// The policy of a route that sets none (Istio's mesh default): 2 retries on the
    /// default conditions.
    pub fn mesh_default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            retry_on: Self::default_conditions(),
            status_codes: Vec::new(),
            backoff: None,
        }
    }
}

/// The status a fault abort answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AbortStatus {
    /// An HTTP status.
    Http(u16),
    /// A gRPC status code (numeric).
    Grpc(u8),
}

/// Fault injection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// Delay a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Abort a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// A fixed delay for a share of requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// The delay.
    pub delay: Duration,
    /// Share of requests delayed.
    pub percent: Percent,
}

/// An abort for a share of requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// The answer.
    pub status: AbortStatus,
    /// Share of requests aborted.
    pub percent: Percent,
}

/// Traffic mirroring (responses of the mirror are discarded).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Where copies go.
    pub backend: Backend,
    /// Share of requests mirrored.
    pub percent: Percent,
}

/// One routing rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// The rule's name, when the source gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Alternatives; empty matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RequestMatch>,
    /// What happens to matching requests.
    pub action: RouteAction,
    /// Request header changes.
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    pub request_headers: HeaderModifier,
    /// Response header changes.
    #[serde(default, skip_serializing_if = "HeaderModifier::is_empty")]
    pub response_headers: HeaderModifier,
    /// Rewrite before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    /// Overall request timeout, retries included (`None`: no timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Timeout of each request to a backend (Gateway API `backendRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_timeout: Option<Duration>,
    /// Retries; `None`: the route sets none and the waypoint applies
    /// [`RetryPolicy::mesh_default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Fault injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Mirrors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
}

/// What a route table attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RouteParent {
    /// A VirtualService host.
    Host(ServiceHost),
    /// A Gateway API `parentRef` to a Service (GAMMA), optionally one port of it.
    Service {
        /// Namespace of the Service.
        namespace: NamespaceName,
        /// Name of the Service.
        name: String,
        /// Only this port, if set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<PortNumber>,
    },
}

/// The validated routes of one VirtualService, HTTPRoute or GRPCRoute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTable {
    /// The object it came from.
    pub id: ObjectId,
    /// What the routes apply to.
    pub parents: Vec<RouteParent>,
    /// Rules, in source order.
    pub rules: Vec<RouteRule>,
}

impl fmt::Display for RetryOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Http5xx => "5xx",
            Self::GatewayError => "gateway-error",
            Self::ConnectFailure => "connect-failure",
            Self::RefusedStream => "refused-stream",
            Self::Reset => "reset",
            Self::Retriable4xx => "retriable-4xx",
            Self::RetriableStatusCodes => "retriable-status-codes",
            Self::Cancelled => "cancelled",
            Self::DeadlineExceeded => "deadline-exceeded",
            Self::Internal => "internal",
            Self::ResourceExhausted => "resource-exhausted",
            Self::Unavailable => "unavailable",
        };
        f.write_str(s)
    }
}

/// gRPC status code names (as Istio's `grpcStatus` and `retryOn` spell them) to codes.
pub fn grpc_code(name: &str) -> Option<u8> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let upper = name.to_ascii_uppercase();
    NAMES
        .iter()
        .position(|n| *n == upper)
        .and_then(|i| u8::try_from(i).ok())
        .or_else(|| name.parse::<u8>().ok().filter(|c| *c <= 16))
}
