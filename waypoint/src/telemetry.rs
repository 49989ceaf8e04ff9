//! Request telemetry: Istio's HTTP metrics, an access-log line per request, W3C trace
//! context, and a retry counter.
//!
//! [`TelemetryLayer`] goes outermost, around authorization and the router, so that
//! every request is seen — denied (`403`), unrouted (`404`, `NR`), overflowed (`503`,
//! `UO`) and forwarded ones alike. A request is recorded once, when its response body
//! has been sent (Envoy's duration runs to the last byte) or dropped (then, if the body
//! was not finished, with flag `DC`: the client went away).
//!
//! What the layer cannot see for itself comes as extensions:
//! - request: [`TelemetryContext`] — the source workload and the addressed Service,
//!   resolved by the serving path (without it every source label is `unknown`);
//! - response: [`UpstreamHost`] (or [`UpstreamInfo`], which can also name the routed
//!   Service) — the endpoint that answered and its workload, set by the upstream;
//!   [`Flag`] — any response flag a lower layer wants reported; and the markers the
//!   stack already sets ([`NoHealthyUpstream`], [`NoRoute`], [`UpstreamFailed`],
//!   [`TimedOut`], [`RetryLimitExceeded`], [`FaultAborted`], [`FaultDelayed`],
//!   [`Overflow`], [`AuthzDenied`]).
//!
//! Metrics (Istio's names and labels, `reporter="waypoint"`):
//! `istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes` (histograms with Envoy's default
//! buckets, which Istio's own exports carry), and
//! `ambit_waypoint_retries_total{source_*, destination_service*}`.
//!
//! Tracing: a valid incoming `traceparent` keeps its trace id and flags and the
//! upstream receives a new span id whose parent is the caller's; without one (or with
//! an invalid one) the tunnel's `traceparent` from the HBONE CONNECT is continued, else
//! a new trace starts (sampled with the probability [`TelemetryLayer::with_trace_sampling`]
//! sets, by default never). Each request runs in a `tracing` span carrying the ids.
//! With [`TelemetryLayer::with_otlp`], the span of every request whose trace is sampled
//! (flag `01`, the caller's decision kept as W3C and Istio do) is exported over OTLP
//! ([`crate::otlp`]) when the request completes.
//!
//! Response flags follow Envoy's short codes. An authorization denial has none (Envoy's
//! RBAC filter sets no flag; its `403` carries the response code details
//! `rbac_access_denied_matched_policy[…]`, which the access log shows). Upstream
//! failures without a response are `UF`: the router does not tell a connect failure
//! from a reset.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{SystemTime, UNIX_EPOCH},
};

use ambit_api::config::v1 as pb;
use ambit_hbone::Traceparent;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use crate::{
    authz::AuthzDenied,
    body::{BoxError, ProxyBody},
    fault::{FaultAborted, FaultDelayed},
    otlp::{AttrValue, OtlpExporter, SpanRecord},
    pool::Overflow,
    retry::{RetryCounter, RetryLimitExceeded},
    router::{NoRoute, RouteName, UpstreamFailed},
    timeout::TimedOut,
    upstream::{NoHealthyUpstream, UpstreamHost},
};

/// Bucket bounds of every histogram: Envoy's defaults, as Istio exports them
/// (milliseconds for durations, bytes for sizes).
pub const BUCKETS: [f64; 19] = [
    0.5,
    1.0,
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    30_000.0,
    60_000.0,
    300_000.0,
    600_000.0,
    1_800_000.0,
    3_600_000.0,
];

/// The `reporter` label of everything the waypoint records.
pub const REPORTER: &str = "waypoint";

const UNKNOWN: &str = "unknown";

/// The labels of Istio's request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
#[expect(
    missing_docs,
    reason = "Istio's standard labels, named as Istio names them"
)]
pub struct RequestLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: String,
    pub response_code: String,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

/// The labels of the retry counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
#[expect(missing_docs, reason = "named as the corresponding Istio labels")]
pub struct RetryLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The request metrics; clones share them.
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RequestLabels>,
    request_bytes: HistogramFamily<RequestLabels>,
    response_bytes: HistogramFamily<RequestLabels>,
    retries: Family<RetryLabels, Counter>,
}

impl RequestMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(histogram),
            request_bytes: Family::new_with_constructor(histogram),
            response_bytes: Family::new_with_constructor(histogram),
            retries: Family::default(),
        };
        registry.register(
            "istio_requests",
            "Requests handled by the waypoint",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the request's arrival to its response's last byte, in milliseconds",
            m.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes, in bytes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes, in bytes",
            m.response_bytes.clone(),
        );
        registry.register(
            "ambit_waypoint_retries",
            "Retries the waypoint made (tries after the first)",
            m.retries.clone(),
        );
        m
    }
}

/// A workload's telemetry names (one side of a request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadLabels {
    /// Owning workload (e.g. the Deployment), else the pod name.
    pub workload: String,
    /// Namespace.
    pub namespace: String,
    /// Identity, as [`principal_label`] renders it.
    pub principal: String,
    /// `app` label.
    pub app: String,
    /// `version` label.
    pub version: String,
    /// Canonical service.
    pub canonical_service: String,
    /// Canonical revision.
    pub canonical_revision: String,
}

impl Default for WorkloadLabels {
    fn default() -> Self {
        Self::unknown()
    }
}

impl WorkloadLabels {
    /// Every name `unknown`.
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
        }
    }

    /// From the controller's description of a workload. `app` is the `app` label
    /// (else `app.kubernetes.io/name`), `version` the `version` label (else
    /// `app.kubernetes.io/version`), `unknown` when absent.
    pub fn from_workload(w: &pb::Workload) -> Self {
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| w.labels.get(*k).filter(|v| !v.is_empty()))
                .map_or_else(|| UNKNOWN.to_owned(), Clone::clone)
        };
        let or_unknown = |s: &str| {
            if s.is_empty() {
                UNKNOWN.to_owned()
            } else {
                s.to_owned()
            }
        };
        Self {
            workload: or_unknown(if w.workload_name.is_empty() {
                &w.name
            } else {
                &w.workload_name
            }),
            namespace: or_unknown(&w.namespace),
            principal: principal_label(Some(&w.spiffe_id)),
            app: label(&["app", "app.kubernetes.io/name"]),
            version: label(&["version", "app.kubernetes.io/version"]),
            canonical_service: or_unknown(&w.canonical_name),
            canonical_revision: or_unknown(&w.canonical_revision),
        }
    }
}

/// A principal label value: the identity without `spiffe://` (as the node daemon's
/// TCP metrics write it), or `unknown`.
pub fn principal_label(id: Option<&str>) -> String {
    match id {
        Some(id) if !id.is_empty() => id.strip_prefix("spiffe://").unwrap_or(id).to_owned(),
        _ => UNKNOWN.to_owned(),
    }
}

/// A Service's telemetry names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabels {
    /// Host name, e.g. `payment.production.svc.cluster.local`.
    pub host: String,
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
}

impl Default for ServiceLabels {
    fn default() -> Self {
        Self::unknown()
    }
}

impl ServiceLabels {
    /// Every name `unknown`.
    pub fn unknown() -> Self {
        Self {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
        }
    }

    /// From the controller's description of a Service.
    pub fn from_service(s: &pb::Service) -> Self {
        let or = |v: &str, fallback: String| if v.is_empty() { fallback } else { v.to_owned() };
        Self {
            host: or(
                &s.hostname,
                format!("{}.{}.svc.cluster.local", s.name, s.namespace),
            ),
            name: or(&s.name, UNKNOWN.into()),
            namespace: or(&s.namespace, UNKNOWN.into()),
        }
    }
}

/// Request extension, set by the serving path: the source and the addressed Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TelemetryContext {
    /// The calling workload; its `principal` should be the verified peer identity.
    pub source: WorkloadLabels,
    /// The Service the tunnel addressed (`unknown` for a pod address); the upstream's
    /// [`UpstreamInfo::service`] takes precedence (the route may send elsewhere).
    pub service: ServiceLabels,
    /// Whether the caller came over mutual TLS (HBONE).
    pub mtls: bool,
    /// The HBONE CONNECT's `traceparent`, continued when the request has none.
    pub tunnel_traceparent: Option<Traceparent>,
}

/// Response extension, set by the upstream: where the request went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamInfo {
    /// The endpoint (`ip:port`).
    pub addr: SocketAddr,
    /// Its workload.
    pub workload: WorkloadLabels,
    /// The Service the request was routed to, if known.
    pub service: Option<ServiceLabels>,
}

/// Envoy's response flags that the waypoint reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResponseFlag {
    /// `UH`: no healthy upstream endpoint.
    NoHealthyUpstream,
    /// `UT`: upstream request timeout.
    UpstreamRequestTimeout,
    /// `UF`: upstream connection failure (or reset before a response).
    UpstreamConnectionFailure,
    /// `UO`: upstream overflow (circuit breaking).
    UpstreamOverflow,
    /// `NR`: no route.
    NoRouteFound,
    /// `DI`: delayed by fault injection.
    DelayInjected,
    /// `FI`: aborted by fault injection.
    FaultInjected,
    /// `DC`: the downstream connection ended before the response was sent.
    DownstreamConnectionTermination,
    /// `URX`: retry limit exceeded.
    UpstreamRetryLimitExceeded,
}

impl ResponseFlag {
    /// Envoy's short code.
    pub fn code(self) -> &'static str {
        match self {
            Self::NoHealthyUpstream => "UH",
            Self::UpstreamRequestTimeout => "UT",
            Self::UpstreamConnectionFailure => "UF",
            Self::UpstreamOverflow => "UO",
            Self::NoRouteFound => "NR",
            Self::DelayInjected => "DI",
            Self::FaultInjected => "FI",
            Self::DownstreamConnectionTermination => "DC",
            Self::UpstreamRetryLimitExceeded => "URX",
        }
    }
}

/// Response extension any layer may set to report a flag the markers do not cover
/// (the upstream: `Flag(ResponseFlag::NoHealthyUpstream)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flag(pub ResponseFlag);

/// The flags a response's extensions imply, in Envoy's order.
pub fn response_flags(ext: &http::Extensions) -> Vec<ResponseFlag> {
    let mut flags = Vec::new();
    let mut add = |present: bool, flag| {
        if present {
            flags.push(flag);
        }
    };
    add(
        ext.get::<NoHealthyUpstream>().is_some(),
        ResponseFlag::NoHealthyUpstream,
    );
    add(
        ext.get::<TimedOut>().is_some(),
        ResponseFlag::UpstreamRequestTimeout,
    );
    add(
        ext.get::<UpstreamFailed>().is_some(),
        ResponseFlag::UpstreamConnectionFailure,
    );
    add(
        ext.get::<Overflow>().is_some(),
        ResponseFlag::UpstreamOverflow,
    );
    add(ext.get::<NoRoute>().is_some(), ResponseFlag::NoRouteFound);
    add(
        ext.get::<FaultDelayed>().is_some(),
        ResponseFlag::DelayInjected,
    );
    add(
        ext.get::<FaultAborted>().is_some(),
        ResponseFlag::FaultInjected,
    );
    add(
        ext.get::<RetryLimitExceeded>().is_some(),
        ResponseFlag::UpstreamRetryLimitExceeded,
    );
    if let Some(Flag(f)) = ext.get::<Flag>() {
        flags.push(*f);
    }
    flags.sort_unstable();
    flags.dedup();
    flags
}

/// Where the request went: [`UpstreamInfo`], else the upstream's [`UpstreamHost`].
fn upstream_info(ext: &http::Extensions) -> Option<UpstreamInfo> {
    ext.get::<UpstreamInfo>().cloned().or_else(|| {
        ext.get::<UpstreamHost>().map(|h| UpstreamInfo {
            addr: h.addr,
            workload: WorkloadLabels::from_workload(&h.workload),
            service: None,
        })
    })
}

/// Flags as Envoy prints them: comma-separated short codes, `-` for none.
pub fn flags_text(flags: &[ResponseFlag]) -> String {
    if flags.is_empty() {
        return "-".to_owned();
    }
    flags.iter().map(|f| f.code()).collect::<Vec<_>>().join(",")
}

/// One request as the access log reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLog {
    /// Arrival (RFC 3339, UTC, milliseconds).
    pub start_time: String,
    /// Method.
    pub method: String,
    /// Path and query as received.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, …
    pub protocol: &'static str,
    /// `:authority` / `Host`.
    pub authority: String,
    /// Status sent, `0` when none was.
    pub response_code: u16,
    /// Envoy's flags text.
    pub response_flags: String,
    /// Why the waypoint answered itself, when it did for a policy reason.
    pub response_code_details: Option<String>,
    /// The route that matched.
    pub route_name: Option<String>,
    /// Request body bytes received.
    pub bytes_received: u64,
    /// Response body bytes sent.
    pub bytes_sent: u64,
    /// Arrival to last response byte.
    pub duration_ms: u64,
    /// The endpoint that answered.
    pub upstream_host: Option<SocketAddr>,
    /// Retries made.
    pub retries: u64,
    /// Source principal label.
    pub source_principal: String,
    /// Source workload.
    pub source_workload: String,
    /// Source namespace.
    pub source_namespace: String,
    /// Destination Service host.
    pub destination_service: String,
    /// Destination workload.
    pub destination_workload: String,
    /// Destination principal label.
    pub destination_principal: String,
    /// `grpc-status`, if any.
    pub grpc_status: Option<String>,
    /// W3C trace id.
    pub trace_id: String,
    /// Span id the waypoint sent upstream.
    pub span_id: String,
    /// `x-request-id`, if the client sent one.
    pub request_id: Option<String>,
}

impl AccessLog {
    /// Writes the line: one `tracing` event with target `access`.
    pub fn emit(&self) {
        tracing::info!(
            target: "access",
            start_time = %self.start_time,
            method = %self.method,
            path = %self.path,
            protocol = self.protocol,
            authority = %self.authority,
            response_code = self.response_code,
            response_flags = %self.response_flags,
            response_code_details = self.response_code_details.as_deref().unwrap_or("-"),
            route_name = self.route_name.as_deref().unwrap_or("-"),
            bytes_received = self.bytes_received,
            bytes_sent = self.bytes_sent,
            duration_ms = self.duration_ms,
            upstream_host = %self.upstream_host.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            retries = self.retries,
            source_principal = %self.source_principal,
            source_workload = %self.source_workload,
            source_namespace = %self.source_namespace,
            destination_service = %self.destination_service,
            destination_workload = %self.destination_workload,
            destination_principal = %self.destination_principal,
            grpc_status = self.grpc_status.as_deref().unwrap_or("-"),
            trace_id = %self.trace_id,
            span_id = %self.span_id,
            request_id = self.request_id.as_deref().unwrap_or("-"),
            "request"
        );
    }
}

/// Called with every completed request's log entry (besides the `tracing` line).
pub type AccessLogSink = Arc<dyn Fn(&AccessLog) + Send + Sync>;

/// Records metrics, the access log and trace context around the inner stack.
#[derive(Clone)]
pub struct TelemetryLayer {
    metrics: RequestMetrics,
    sink: Option<AccessLogSink>,
    otlp: Option<OtlpExporter>,
    /// Percentage of new traces started sampled.
    sampling: f64,
}

impl std::fmt::Debug for TelemetryLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryLayer")
            .field("metrics", &self.metrics)
            .field("sink", &self.sink.is_some())
            .field("otlp", &self.otlp.is_some())
            .field("sampling", &self.sampling)
            .finish()
    }
}

impl TelemetryLayer {
    /// Record into `metrics`.
    pub fn new(metrics: RequestMetrics) -> Self {
        Self {
            metrics,
            sink: None,
            otlp: None,
            sampling: 0.0,
        }
    }

    /// Also export the span of every request in a sampled trace to `exporter`.
    pub fn with_otlp(mut self, exporter: OtlpExporter) -> Self {
        self.otlp = Some(exporter);
        self
    }

    /// Start `percent` (0–100, clamped) of new traces — those without an incoming
    /// `traceparent` — sampled; default 0. Continued traces keep their caller's flag.
    pub fn with_trace_sampling(mut self, percent: f64) -> Self {
        self.sampling = if percent.is_nan() {
            0.0
        } else {
            percent.clamp(0.0, 100.0)
        };
        self
    }

    fn sample_new(&self) -> bool {
        self.sampling >= 100.0
            || (self.sampling > 0.0 && rand::random::<f64>() * 100.0 < self.sampling)
    }

    /// Also hand every access-log entry to `sink` (e.g. an admin endpoint's tail).
    pub fn with_sink(mut self, sink: AccessLogSink) -> Self {
        self.sink = Some(sink);
        self
    }
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;

    fn layer(&self, inner: S) -> Telemetry<S> {
        Telemetry {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`TelemetryLayer`].
#[derive(Clone, Debug)]
pub struct Telemetry<S> {
    inner: S,
    layer: TelemetryLayer,
}

/// The trace context of one request at the waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 hex digits.
    pub trace_id: String,
    /// The waypoint's span (what the upstream sees as its parent), 16 hex digits.
    pub span_id: String,
    /// The caller's span, if there was one.
    pub parent_span_id: Option<String>,
    /// The `traceparent` to send upstream.
    pub traceparent: Option<Traceparent>,
    /// Whether the trace is sampled (flag `01`).
    pub sampled: bool,
}

impl TraceContext {
    /// Continues `incoming` (a child span), or starts an unsampled trace.
    pub fn child_of(incoming: Option<&Traceparent>) -> Self {
        Self::child_of_sampling(incoming, false)
    }

    /// Continues `incoming` keeping its sampling decision, or starts a trace that is
    /// sampled if `sample_new`.
    pub fn child_of_sampling(incoming: Option<&Traceparent>, sample_new: bool) -> Self {
        let span = nonzero_u64();
        let (trace, parent, sampled) = match incoming.and_then(parts) {
            Some((trace, parent, sampled)) => (trace, Some(parent), sampled),
            None => (nonzero_u128(), None, sample_new),
        };
        // Both ids are non-zero and rendered as lower-case hex: always valid.
        let traceparent = Traceparent::new(trace, span, sampled).ok();
        Self {
            trace_id: format!("{trace:032x}"),
            span_id: format!("{span:016x}"),
            parent_span_id: parent.map(|p| format!("{p:016x}")),
            traceparent,
            sampled,
        }
    }
}

/// (trace id, parent id, sampled) of a valid `traceparent`.
fn parts(tp: &Traceparent) -> Option<(u128, u64, bool)> {
    let s = tp.as_str();
    let trace = u128::from_str_radix(s.get(3..35)?, 16).ok()?;
    let parent = u64::from_str_radix(s.get(36..52)?, 16).ok()?;
    let flags = u8::from_str_radix(s.get(53..55)?, 16).ok()?;
    Some((trace, parent, flags & 1 == 1))
}

fn nonzero_u64() -> u64 {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

fn nonzero_u128() -> u128 {
    loop {
        let v: u128 = rand::random();
        if v != 0 {
            return v;
        }
    }
}

fn protocol_text(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// What is known when the request arrives.
struct Arrival {
    start: Instant,
    start_system: SystemTime,
    start_time: String,
    method: String,
    path: String,
    protocol: &'static str,
    authority: String,
    grpc: bool,
    request_id: Option<String>,
    context: TelemetryContext,
    trace: TraceContext,
}

/// What the response adds.
#[derive(Default)]
struct Outcome {
    code: u16,
    flags: Vec<ResponseFlag>,
    details: Option<String>,
    route: Option<String>,
    upstream: Option<UpstreamInfo>,
    grpc_status: Option<String>,
}

/// Records the request once: when the response body ends, or when it (or the
/// request's future) is dropped.
struct Completion {
    metrics: RequestMetrics,
    sink: Option<AccessLogSink>,
    otlp: Option<OtlpExporter>,
    arrival: Arrival,
    request_bytes: Arc<AtomicU64>,
    response_bytes: u64,
    retries: RetryCounter,
    outcome: Outcome,
    done: bool,
}

impl Completion {
    fn finish(&mut self, disconnected: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if disconnected {
            self.outcome
                .flags
                .push(ResponseFlag::DownstreamConnectionTermination);
            self.outcome.flags.sort_unstable();
            self.outcome.flags.dedup();
        }
        let a = &self.arrival;
        let o = &self.outcome;
        let elapsed = a.start.elapsed();
        let destination = o
            .upstream
            .as_ref()
            .map_or_else(WorkloadLabels::unknown, |u| u.workload.clone());
        let service = o
            .upstream
            .as_ref()
            .and_then(|u| u.service.clone())
            .unwrap_or_else(|| a.context.service.clone());
        let grpc_status = o.grpc_status.clone();
        let flags = flags_text(&o.flags);
        let source = &a.context.source;
        let labels = RequestLabels {
            reporter: REPORTER.into(),
            source_workload: source.workload.clone(),
            source_workload_namespace: source.namespace.clone(),
            source_principal: source.principal.clone(),
            source_app: source.app.clone(),
            source_version: source.version.clone(),
            source_canonical_service: source.canonical_service.clone(),
            source_canonical_revision: source.canonical_revision.clone(),
            destination_workload: destination.workload.clone(),
            destination_workload_namespace: destination.namespace.clone(),
            destination_principal: destination.principal.clone(),
            destination_app: destination.app.clone(),
            destination_version: destination.version.clone(),
            destination_canonical_service: destination.canonical_service.clone(),
            destination_canonical_revision: destination.canonical_revision.clone(),
            destination_service: service.host.clone(),
            destination_service_name: service.name.clone(),
            destination_service_namespace: service.namespace.clone(),
            request_protocol: if a.grpc { "grpc" } else { "http" }.into(),
            response_code: o.code.to_string(),
            grpc_response_status: grpc_status.clone().unwrap_or_default(),
            response_flags: flags.clone(),
            connection_security_policy: if a.context.mtls { "mutual_tls" } else { "none" }.into(),
        };
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let ms = elapsed.as_secs_f64() * 1_000.0;
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics.duration.get_or_create(&labels).observe(ms);
        self.metrics
            .request_bytes
            .get_or_create(&labels)
            .observe(request_bytes as f64);
        self.metrics
            .response_bytes
            .get_or_create(&labels)
            .observe(self.response_bytes as f64);
        let retries = self.retries.get();
        if retries > 0 {
            self.metrics
                .retries
                .get_or_create(&RetryLabels {
                    reporter: REPORTER.into(),
                    source_workload: labels.source_workload.clone(),
                    source_workload_namespace: labels.source_workload_namespace.clone(),
                    destination_service: labels.destination_service.clone(),
                    destination_service_name: labels.destination_service_name.clone(),
                    destination_service_namespace: labels.destination_service_namespace.clone(),
                })
                .inc_by(retries);
        }
        let log = AccessLog {
            start_time: a.start_time.clone(),
            method: a.method.clone(),
            path: a.path.clone(),
            protocol: a.protocol,
            authority: a.authority.clone(),
            response_code: o.code,
            response_flags: flags,
            response_code_details: o.details.clone(),
            route_name: o.route.clone(),
            bytes_received: request_bytes,
            bytes_sent: self.response_bytes,
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            upstream_host: o.upstream.as_ref().map(|u| u.addr),
            retries,
            source_principal: source.principal.clone(),
            source_workload: source.workload.clone(),
            source_namespace: source.namespace.clone(),
            destination_service: service.host,
            destination_workload: destination.workload,
            destination_principal: destination.principal,
            grpc_status,
            trace_id: a.trace.trace_id.clone(),
            span_id: a.trace.span_id.clone(),
            request_id: a.request_id.clone(),
        };
        log.emit();
        if let Some(otlp) = &self.otlp
            && a.trace.sampled
        {
            otlp.record(span_record(a, elapsed, &log));
        }
        if let Some(sink) = &self.sink {
            sink(&log);
        }
    }
}

/// The request's span for export: named `<method> <route or path>`, with OpenTelemetry's
/// HTTP attributes and the waypoint's own (`ambit.*`); status ERROR for a 5xx or no
/// response.
fn span_record(a: &Arrival, elapsed: std::time::Duration, log: &AccessLog) -> SpanRecord {
    let nanos = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    let (path, query) = log.path.split_once('?').unwrap_or((&log.path, ""));
    let text = |s: &str| AttrValue::Str(s.to_owned());
    let mut attributes = vec![
        ("http.request.method", text(&log.method)),
        ("url.path", text(path)),
    ];
    if !query.is_empty() {
        attributes.push(("url.query", text(query)));
    }
    attributes.extend([
        ("network.protocol.name", text("http")),
        (
            "network.protocol.version",
            text(log.protocol.strip_prefix("HTTP/").unwrap_or(log.protocol)),
        ),
        (
            "http.response.status_code",
            AttrValue::Int(i64::from(log.response_code)),
        ),
        ("server.address", text(&log.destination_service)),
        ("ambit.authority", text(&log.authority)),
        ("ambit.response_flags", text(&log.response_flags)),
        ("ambit.source.principal", text(&log.source_principal)),
        ("ambit.source.workload", text(&log.source_workload)),
        ("ambit.source.namespace", text(&log.source_namespace)),
        (
            "ambit.destination.principal",
            text(&log.destination_principal),
        ),
        (
            "ambit.destination.workload",
            text(&log.destination_workload),
        ),
        (
            "http.request.body.size",
            AttrValue::Int(i64::try_from(log.bytes_received).unwrap_or(i64::MAX)),
        ),
        (
            "http.response.body.size",
            AttrValue::Int(i64::try_from(log.bytes_sent).unwrap_or(i64::MAX)),
        ),
    ]);
    if let Some(host) = log.upstream_host {
        attributes.push(("ambit.upstream.host", text(&host.to_string())));
    }
    if let Some(route) = &log.route_name {
        attributes.push(("ambit.route", text(route)));
    }
    if log.retries > 0 {
        attributes.push((
            "ambit.retries",
            AttrValue::Int(i64::try_from(log.retries).unwrap_or(i64::MAX)),
        ));
    }
    if let Some(status) = &log.grpc_status {
        attributes.push(("rpc.grpc.status_code", text(status)));
    }
    if let Some(id) = &log.request_id {
        attributes.push(("ambit.request_id", text(id)));
    }
    let error = match log.response_code {
        0 => Some("no response sent".to_owned()),
        c if c >= 500 => Some(format!("response code {c}")),
        _ => None,
    };
    SpanRecord {
        trace_id: a.trace.trace_id.clone(),
        span_id: a.trace.span_id.clone(),
        parent_span_id: a.trace.parent_span_id.clone(),
        name: format!(
            "{} {}",
            log.method,
            log.route_name.as_deref().unwrap_or(path)
        ),
        start_unix_nanos: nanos(a.start_system),
        end_unix_nanos: nanos(a.start_system + elapsed),
        attributes,
        error,
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.finish(true);
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<Request<B>> for Telemetry<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<ProxyBody>, S::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Each request drives its own clone of `inner` (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let start = Instant::now();
        let context = request
            .extensions()
            .get::<TelemetryContext>()
            .cloned()
            .unwrap_or_default();
        let incoming = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| Traceparent::parse(s).ok());
        let incoming = incoming.as_ref().or(context.tunnel_traceparent.as_ref());
        let sample_new = incoming.is_none() && self.layer.sample_new();
        let trace = TraceContext::child_of_sampling(incoming, sample_new);
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| header_text(request.headers(), "host"))
            .unwrap_or_default();
        let start_system = SystemTime::now();
        let arrival = Arrival {
            start,
            start_system,
            start_time: rfc3339_millis(start_system),
            method: request.method().as_str().to_owned(),
            path: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            protocol: protocol_text(request.version()),
            authority,
            grpc: is_grpc(request.headers()),
            request_id: header_text(request.headers(), "x-request-id"),
            context,
            trace: trace.clone(),
        };
        let request_bytes = Arc::new(AtomicU64::new(0));
        let retries = RetryCounter::default();
        let mut request = request.map(|body| {
            ProxyBody::new(CountingRequest {
                body: ProxyBody::new(body),
                bytes: request_bytes.clone(),
            })
        });
        match &trace.traceparent {
            Some(tp) => {
                request
                    .headers_mut()
                    .insert("traceparent", HeaderValue::clone(tp.header_value()));
            }
            None => {
                request.headers_mut().remove("traceparent");
            }
        }
        request.extensions_mut().insert(retries.clone());
        request.extensions_mut().insert(trace.clone());
        let span = tracing::info_span!(
            "request",
            trace_id = %trace.trace_id,
            span_id = %trace.span_id,
            parent_span_id = trace.parent_span_id.as_deref().unwrap_or("-"),
            method = %arrival.method,
            path = %arrival.path,
        );
        let mut completion = Completion {
            metrics: self.layer.metrics.clone(),
            sink: self.layer.sink.clone(),
            otlp: self.layer.otlp.clone(),
            arrival,
            request_bytes,
            response_bytes: 0,
            retries,
            outcome: Outcome::default(),
            done: false,
        };
        let inner = self.inner.clone();
        Box::pin(
            async move {
                let response = match inner.oneshot(request).await {
                    Ok(r) => r,
                    Err(e) => {
                        // No response was sent (Envoy's response code 0).
                        completion.finish(false);
                        return Err(e);
                    }
                };
                let ext = response.extensions();
                completion.outcome = Outcome {
                    code: response.status().as_u16(),
                    flags: response_flags(ext),
                    details: ext.get::<AuthzDenied>().map(AuthzDenied::details),
                    route: ext.get::<RouteName>().map(|r| r.0.to_string()),
                    upstream: upstream_info(ext),
                    grpc_status: header_text(response.headers(), "grpc-status"),
                };
                Ok(response.map(|body| {
                    let mut observed = ObservedResponse { body, completion };
                    observed.finish_if_ended();
                    ProxyBody::new(observed)
                }))
            }
            .instrument(span),
        )
    }
}

/// Counts request body bytes as the inner stack reads them.
struct CountingRequest {
    body: ProxyBody,
    bytes: Arc<AtomicU64>,
}

impl Body for CountingRequest {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(data) = f.data_ref()
        {
            self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The response body on its way to the client: counts bytes, reads `grpc-status`
/// from trailers, and completes the record at its end (or drop).
struct ObservedResponse {
    body: ProxyBody,
    completion: Completion,
}

impl ObservedResponse {
    fn finish_if_ended(&mut self) {
        if self.body.is_end_stream() {
            self.completion.finish(false);
        }
    }
}

impl Body for ObservedResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(data) = f.data_ref() {
                    this.completion.response_bytes += data.len() as u64;
                } else if let Some(trailers) = f.trailers_ref()
                    && let Some(status) = header_text(trailers, "grpc-status")
                {
                    this.completion.outcome.grpc_status = Some(status);
                }
                this.finish_if_ended();
            }
            // The end, or the upstream broke off mid-body (the client sees a reset):
            // record what was sent.
            Poll::Ready(None | Some(Err(_))) => this.completion.finish(false),
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ObservedResponse {
    fn drop(&mut self) {
        let ended = self.body.is_end_stream();
        self.completion.finish(!ended);
    }
}

/// `2024-05-06T07:08:09.123Z`.
fn rfc3339_millis(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a proleptic Gregorian date, in 400-year eras shifted
    // to start on 0000-03-01 (so leap days fall at the end of a year).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let m = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * m + 2) / 5 + 1;
    let month = if m < 10 { m + 3 } else { m - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        convert::Infallible,
        sync::{Mutex, atomic::AtomicU32},
        time::Duration,
    };

    use ambit_api::config::v1 as pb;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use tower::service_fn;

    use super::*;
    use crate::{
        body::local_response,
        retry::{RetryLayer, RetryPolicy, RetryStats},
        rng::SharedRng,
    };

    fn workload(name: &str, ns: &str, sa: &str, version: &str) -> pb::Workload {
        pb::Workload {
            name: format!("{name}-7d9f-abcde"),
            namespace: ns.into(),
            workload_name: name.into(),
            spiffe_id: format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            labels: BTreeMap::from([
                ("app".to_owned(), sa.to_owned()),
                ("version".to_owned(), version.to_owned()),
            ]),
            canonical_name: sa.into(),
            canonical_revision: version.into(),
            ..Default::default()
        }
    }

    fn payment_service() -> ServiceLabels {
        ServiceLabels::from_service(&pb::Service {
            name: "payment".into(),
            namespace: "production".into(),
            hostname: "payment.production.svc.cluster.local".into(),
            ..Default::default()
        })
    }

    fn context() -> TelemetryContext {
        TelemetryContext {
            source: WorkloadLabels::from_workload(&workload(
                "checkout",
                "production",
                "checkout",
                "v1",
            )),
            service: payment_service(),
            mtls: true,
            tunnel_traceparent: None,
        }
    }

    fn upstream_info() -> UpstreamInfo {
        UpstreamInfo {
            addr: "10.244.2.7:8080".parse().unwrap(),
            workload: WorkloadLabels::from_workload(&workload(
                "payment-v2",
                "production",
                "payment",
                "v2",
            )),
            service: None,
        }
    }

    /// A registry, the layer, and every access-log entry it produced.
    struct Fixture {
        registry: Registry,
        layer: TelemetryLayer,
        logs: Arc<Mutex<Vec<AccessLog>>>,
    }

    impl Fixture {
        fn new() -> Self {
            let mut registry = Registry::default();
            let metrics = RequestMetrics::register(&mut registry);
            let logs: Arc<Mutex<Vec<AccessLog>>> = Arc::default();
            let sink_logs = logs.clone();
            let layer = TelemetryLayer::new(metrics).with_sink(Arc::new(move |l: &AccessLog| {
                sink_logs.lock().unwrap().push(l.clone())
            }));
            Self {
                registry,
                layer,
                logs,
            }
        }

        fn text(&self) -> String {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &self.registry).unwrap();
            out
        }

        /// The sample line of `name` whose labels contain every `label="value"` given.
        fn sample(&self, name: &str, labels: &[&str]) -> Option<String> {
            self.text()
                .lines()
                .find(|l| {
                    l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x))
                })
                .map(str::to_owned)
        }

        fn value(&self, name: &str, labels: &[&str]) -> f64 {
            let line = self
                .sample(name, labels)
                .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text()));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        }

        fn logs(&self) -> Vec<AccessLog> {
            self.logs.lock().unwrap().clone()
        }
    }

    fn request(body: &'static str) -> Request<Full<Bytes>> {
        let mut r = Request::builder()
            .method("POST")
            .uri("/api/v1/orders?id=7")
            .header("host", "payment.production:8080")
            .header("x-request-id", "req-1")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        r.extensions_mut().insert(context());
        r
    }

    async fn drain(r: Response<ProxyBody>) -> Bytes {
        r.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test(start_paused = true)]
    async fn a_forwarded_request_in_metrics_and_the_access_log() {
        let f = Fixture::new();
        let svc = f
            .layer
            .layer(service_fn(|r: Request<ProxyBody>| async move {
                let body = r.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, "abc");
                tokio::time::sleep(Duration::from_millis(30)).await;
                let mut response = Response::new(ProxyBody::full("hello"));
                response.extensions_mut().insert(upstream_info());
                response
                    .extensions_mut()
                    .insert(RouteName(Arc::from("orders")));
                Ok::<_, Infallible>(response)
            }));
        let response = svc.oneshot(request("abc")).await.unwrap();
        // Nothing is recorded before the body went out.
        assert!(f.logs().is_empty());
        assert_eq!(drain(response).await, "hello");

        let labels = [
            "reporter=\"waypoint\"",
            "source_workload=\"checkout\"",
            "source_workload_namespace=\"production\"",
            "source_principal=\"cluster.local/ns/production/sa/checkout\"",
            "source_app=\"checkout\"",
            "destination_workload=\"payment-v2\"",
            "destination_principal=\"cluster.local/ns/production/sa/payment\"",
            "destination_app=\"payment\"",
            "destination_version=\"v2\"",
            "destination_service=\"payment.production.svc.cluster.local\"",
            "destination_service_name=\"payment\"",
            "destination_service_namespace=\"production\"",
            "request_protocol=\"http\"",
            "response_code=\"200\"",
            "grpc_response_status=\"\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ];
        assert_eq!(f.value("istio_requests_total", &labels), 1.0);
        let bucket = |le: &str| {
            f.value(
                "istio_request_duration_milliseconds_bucket",
                &[&format!("le=\"{le}\""), "response_code=\"200\""],
            )
        };
        assert_eq!(bucket("25.0"), 0.0);
        assert_eq!(bucket("50.0"), 1.0);
        assert_eq!(
            f.value("istio_request_bytes_sum", &["response_code=\"200\""]),
            3.0
        );
        assert_eq!(
            f.value("istio_response_bytes_sum", &["response_code=\"200\""]),
            5.0
        );
        assert!(f.sample("ambit_waypoint_retries_total", &[]).is_none());

        let logs = f.logs();
        assert_eq!(logs.len(), 1);
        let log = &logs[0];
        assert_eq!(log.method, "POST");
        assert_eq!(log.path, "/api/v1/orders?id=7");
        assert_eq!(log.protocol, "HTTP/1.1");
        assert_eq!(log.authority, "payment.production:8080");
        assert_eq!(log.response_code, 200);
        assert_eq!(log.response_flags, "-");
        assert_eq!(log.route_name.as_deref(), Some("orders"));
        assert_eq!(log.bytes_received, 3);
        assert_eq!(log.bytes_sent, 5);
        assert_eq!(log.duration_ms, 30);
        assert_eq!(log.upstream_host, Some("10.244.2.7:8080".parse().unwrap()));
        assert_eq!(log.source_workload, "checkout");
        assert_eq!(log.destination_workload, "payment-v2");
        assert_eq!(log.request_id.as_deref(), Some("req-1"));
        assert_eq!(log.trace_id.len(), 32);
        assert!(
            log.start_time.ends_with('Z') && log.start_time.len() == 24,
            "{}",
            log.start_time
        );
    }

    #[tokio::test]
    async fn traceparent_is_continued_or_started() {
        let f = Fixture::new();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen2 = seen.clone();
        let svc = f.layer.layer(service_fn(move |r: Request<ProxyBody>| {
            seen2
                .lock()
                .unwrap()
                .push(r.headers()["traceparent"].to_str().unwrap().to_owned());
            async { Ok::<_, Infallible>(Response::new(ProxyBody::default())) }
        }));
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

        // Continued: same trace and flags, a new span whose parent is the caller's.
        let mut r = request("");
        r.headers_mut()
            .insert("traceparent", caller.parse().unwrap());
        drain(svc.clone().oneshot(r).await.unwrap()).await;
        // Started: no traceparent, or an invalid one.
        drain(svc.clone().oneshot(request("")).await.unwrap()).await;
        let mut r = request("");
        r.headers_mut()
            .insert("traceparent", "00-zz-00f067aa0ba902b7-01".parse().unwrap());
        drain(svc.clone().oneshot(r).await.unwrap()).await;
        // The tunnel's trace context, when the request has none.
        let tunnel = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut r = request("");
        r.extensions_mut().insert(TelemetryContext {
            tunnel_traceparent: Some(Traceparent::parse(tunnel).unwrap()),
            ..context()
        });
        drain(svc.oneshot(r).await.unwrap()).await;

        let seen = seen.lock().unwrap().clone();
        let logs = f.logs();
        let parse = |s: &str| Traceparent::parse(s).unwrap();
        let sent = parse(&seen[0]);
        assert_eq!(sent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(sent.as_str().ends_with("-01"));
        assert_ne!(&sent.as_str()[36..52], "00f067aa0ba902b7");
        assert_eq!(logs[0].trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(logs[0].span_id, &sent.as_str()[36..52]);
        for i in [1, 2] {
            let started = parse(&seen[i]);
            assert_eq!(started.trace_id(), logs[i].trace_id);
            assert_ne!(started.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(started.as_str().ends_with("-00"));
        }
        assert_ne!(logs[1].trace_id, logs[2].trace_id);
        assert_eq!(
            parse(&seen[3]).trace_id(),
            "0af7651916cd43dd8448eb211c80319c"
        );
    }

    #[tokio::test]
    async fn trace_sampling_applies_to_new_traces_only() {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen2 = seen.clone();
        let inner = service_fn(move |r: Request<ProxyBody>| {
            seen2
                .lock()
                .unwrap()
                .push(r.headers()["traceparent"].to_str().unwrap().to_owned());
            async { Ok::<_, Infallible>(Response::new(ProxyBody::default())) }
        });
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        for (percent, flags) in [(100.0, "-01"), (0.0, "-00"), (f64::NAN, "-00")] {
            let f = Fixture::new();
            let svc = f
                .layer
                .clone()
                .with_trace_sampling(percent)
                .layer(inner.clone());
            drain(svc.clone().oneshot(request("")).await.unwrap()).await;
            let mut r = request("");
            r.headers_mut()
                .insert("traceparent", unsampled.parse().unwrap());
            drain(svc.oneshot(r).await.unwrap()).await;
            let seen = std::mem::take(&mut *seen.lock().unwrap());
            assert!(seen[0].ends_with(flags), "{percent}: {seen:?}");
            // The caller's decision stands.
            assert!(seen[1].ends_with("-00"), "{percent}: {seen:?}");
        }
    }

    type MakeResponse = Box<dyn Fn() -> Response<ProxyBody> + Send + Sync>;

    /// Responses the stack produces, and the flags they must show.
    #[tokio::test]
    async fn response_flags_from_the_stack_markers() {
        let f = Fixture::new();
        let cases: Vec<(MakeResponse, u16, &str)> = vec![
            (
                Box::new(|| {
                    let mut r = local_response(StatusCode::NOT_FOUND, Bytes::new());
                    r.extensions_mut().insert(NoRoute);
                    r
                }),
                404,
                "NR",
            ),
            (Box::new(|| Overflow::Requests.response()), 503, "UO"),
            (
                Box::new(|| {
                    let mut r = local_response(StatusCode::INTERNAL_SERVER_ERROR, "x");
                    r.extensions_mut()
                        .insert(Flag(ResponseFlag::UpstreamConnectionFailure));
                    r
                }),
                500,
                "UF",
            ),
            (
                Box::new(|| {
                    let mut r = local_response(StatusCode::SERVICE_UNAVAILABLE, "x");
                    r.extensions_mut().insert(NoHealthyUpstream);
                    r
                }),
                503,
                "UH",
            ),
            (
                Box::new(|| {
                    let mut r = local_response(StatusCode::SERVICE_UNAVAILABLE, "x");
                    r.extensions_mut().insert(UpstreamFailed);
                    r
                }),
                503,
                "UF",
            ),
            (
                Box::new(|| {
                    let mut r = local_response(StatusCode::GATEWAY_TIMEOUT, "x");
                    r.extensions_mut().insert(TimedOut);
                    r
                }),
                504,
                "UT",
            ),
            (
                Box::new(|| {
                    let mut r = local_response(StatusCode::BAD_GATEWAY, "x");
                    r.extensions_mut().insert(RetryLimitExceeded);
                    r
                }),
                502,
                "URX",
            ),
            (
                Box::new(|| {
                    let mut r = local_response(StatusCode::IM_A_TEAPOT, "x");
                    r.extensions_mut().insert(FaultAborted);
                    r.extensions_mut().insert(FaultDelayed);
                    r
                }),
                418,
                "DI,FI",
            ),
            (
                Box::new(|| AuthzDenied { policy: None }.response()),
                403,
                "-",
            ),
        ];
        for (make, code, flags) in cases {
            let make = Arc::new(make);
            let svc = f.layer.layer(service_fn(move |_r: Request<ProxyBody>| {
                let r = make();
                async move { Ok::<_, Infallible>(r) }
            }));
            drain(svc.oneshot(request("")).await.unwrap()).await;
            let log = f.logs().pop().unwrap();
            assert_eq!(
                (log.response_code, log.response_flags.as_str()),
                (code, flags)
            );
            assert_eq!(
                f.value(
                    "istio_requests_total",
                    &[
                        &format!("response_code=\"{code}\""),
                        &format!("response_flags=\"{flags}\""),
                        "destination_workload=\"unknown\"",
                        "destination_service=\"payment.production.svc.cluster.local\"",
                    ]
                ),
                1.0
            );
        }
        let denied = f.logs().pop().unwrap();
        assert_eq!(
            denied.response_code_details.as_deref(),
            Some("rbac_access_denied_matched_policy[none]")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_counted_per_destination() {
        let f = Fixture::new();
        let calls = Arc::new(AtomicU32::new(0));
        let upstream = {
            let calls = calls.clone();
            service_fn(move |_r: Request<ProxyBody>| {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let status = if n < 2 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    let mut r = local_response(status, "x");
                    r.extensions_mut().insert(upstream_info());
                    Ok::<_, BoxError>(r)
                }
            })
        };
        let stats = RetryStats::default();
        let svc = f
            .layer
            .layer(RetryLayer::new(stats.clone(), 1024, SharedRng::seeded(3)).layer(upstream));
        let policy = RetryPolicy::try_from_proto(&pb::RetryPolicy {
            attempts: 3,
            retry_on: vec![pb::RetryOn::RetryOn5xx as i32],
            ..Default::default()
        })
        .unwrap();
        let mut r = request("body");
        r.extensions_mut().insert(Arc::new(policy));
        let response = svc.oneshot(r).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drain(response).await;
        assert_eq!(stats.retries(), 2);
        assert_eq!(
            f.value(
                "ambit_waypoint_retries_total",
                &[
                    "reporter=\"waypoint\"",
                    "source_workload=\"checkout\"",
                    "destination_service_name=\"payment\"",
                ]
            ),
            2.0
        );
        assert_eq!(f.logs()[0].retries, 2);
    }

    #[tokio::test]
    async fn the_upstreams_host_extension_names_the_destination() {
        let f = Fixture::new();
        let svc = f.layer.layer(service_fn(|_r: Request<ProxyBody>| async {
            let mut r = Response::new(ProxyBody::default());
            r.extensions_mut().insert(UpstreamHost {
                addr: "10.244.2.9:8080".parse().unwrap(),
                workload: Arc::new(workload("payment-v1", "production", "payment", "v1")),
            });
            Ok::<_, Infallible>(r)
        }));
        drain(svc.oneshot(request("")).await.unwrap()).await;
        assert_eq!(
            f.value(
                "istio_requests_total",
                &[
                    "destination_workload=\"payment-v1\"",
                    "destination_version=\"v1\"",
                    "destination_canonical_revision=\"v1\"",
                ]
            ),
            1.0
        );
        let log = f.logs().pop().unwrap();
        assert_eq!(log.upstream_host, Some("10.244.2.9:8080".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_client_that_goes_away_is_recorded_once_with_dc() {
        let f = Fixture::new();
        // The body is dropped before it was read.
        let svc = f.layer.layer(service_fn(|_r: Request<ProxyBody>| async {
            Ok::<_, Infallible>(Response::new(ProxyBody::full("unread")))
        }));
        drop(svc.oneshot(request("")).await.unwrap());
        let logs = f.logs();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].response_code, 200);
        assert_eq!(logs[0].response_flags, "DC");
        assert_eq!(logs[0].bytes_sent, 0);

        // The request is dropped before the response came: code 0.
        let svc = f.layer.layer(service_fn(|_r: Request<ProxyBody>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(ProxyBody::default()))
        }));
        let fut = svc.oneshot(request(""));
        assert!(
            tokio::time::timeout(Duration::from_millis(1), fut)
                .await
                .is_err()
        );
        let logs = f.logs();
        assert_eq!(logs.len(), 2);
        assert_eq!(
            (logs[1].response_code, logs[1].response_flags.as_str()),
            (0, "DC")
        );
        assert_eq!(
            f.value(
                "istio_requests_total",
                &["response_code=\"0\"", "response_flags=\"DC\""]
            ),
            1.0
        );
    }

    #[tokio::test]
    async fn grpc_status_from_trailers() {
        let f = Fixture::new();
        let svc = f.layer.layer(service_fn(|_r: Request<ProxyBody>| async {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("14"));
            let frames = Frames(
                [
                    Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
                    Frame::trailers(trailers),
                ]
                .into(),
            );
            let mut r = Response::new(ProxyBody::new(frames));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            Ok::<_, Infallible>(r)
        }));
        let mut r = request("");
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        *r.version_mut() = Version::HTTP_2;
        let response = svc.oneshot(r).await.unwrap();
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "14");
        let log = f.logs().pop().unwrap();
        assert_eq!(log.grpc_status.as_deref(), Some("14"));
        assert_eq!(log.protocol, "HTTP/2");
        assert_eq!(log.bytes_sent, 5);
        assert_eq!(
            f.value(
                "istio_requests_total",
                &["request_protocol=\"grpc\"", "grpc_response_status=\"14\""]
            ),
            1.0
        );
    }

    /// A body made of the given frames.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
    }

    #[test]
    fn unknown_labels_and_principals() {
        let w = WorkloadLabels::from_workload(&pb::Workload::default());
        assert_eq!(w, WorkloadLabels::unknown());
        assert_eq!(
            principal_label(Some("spiffe://td/ns/a/sa/b")),
            "td/ns/a/sa/b"
        );
        assert_eq!(principal_label(Some("")), "unknown");
        let s = ServiceLabels::from_service(&pb::Service {
            name: "inventory".into(),
            namespace: "shop".into(),
            ..Default::default()
        });
        assert_eq!(s.host, "inventory.shop.svc.cluster.local");
    }

    #[test]
    fn timestamps() {
        let at = |secs: u64, ms: u64| {
            rfc3339_millis(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_714_979_289, 123), "2024-05-06T07:08:09.123Z");
        assert_eq!(at(951_782_400, 999), "2000-02-29T00:00:00.999Z");
        assert_eq!(at(4_107_542_399, 0), "2100-02-28T23:59:59.000Z");
    }
}
