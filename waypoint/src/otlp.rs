//! Optional export of the per-request spans over OTLP/HTTP with the JSON encoding.
//!
//! [`OtlpExporter::spawn`] starts one background task; the telemetry layer hands it a
//! [`SpanRecord`] per completed request whose trace is sampled (W3C `traceparent` flag
//! `01`). The hand-off is a bounded channel: when it is full the span is dropped and
//! counted (`ambit_waypoint_spans_dropped_total`), so a slow or absent collector never
//! holds up a request. The task posts batches of up to `batch_size` spans, or whatever
//! has gathered after `flush_interval`, as an `ExportTraceServiceRequest` in its JSON
//! mapping (`POST <endpoint>`, `content-type: application/json`, usually
//! `…/v1/traces`); a failed export is logged at debug and counted
//! (`ambit_waypoint_span_export_failures_total`, the spans it carried in
//! `ambit_waypoint_spans_failed_total`) and not retried.
//!
//! Only plain `http://` collectors are supported (in-cluster collectors usually are).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::Serialize;
use tokio::sync::mpsc;

/// The `service.name` resource attribute of every exported span.
pub const SERVICE_NAME: &str = "ambit-waypoint";

/// The path the OTLP/HTTP spec appends to a base endpoint for traces.
const TRACES_PATH: &str = "v1/traces";

/// `SPAN_KIND_SERVER`.
const KIND_SERVER: u8 = 2;
/// `STATUS_CODE_ERROR`.
const STATUS_ERROR: u8 = 2;

/// The traces URL per the OpenTelemetry exporter spec: the signal-specific endpoint
/// (`--otlp-endpoint`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) as it is; else the base
/// endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`) with `/v1/traces` appended; else none
/// (no export). Empty values count as unset.
pub fn traces_endpoint(traces: Option<&str>, base: Option<&str>) -> Option<String> {
    fn set(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    if let Some(t) = set(traces) {
        return Some(t.to_owned());
    }
    set(base).map(|b| format!("{}/{TRACES_PATH}", b.trim_end_matches('/')))
}

/// Why the exporter could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is not an absolute `http://` URL.
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The configured value.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Exporter settings.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// The traces URL (see [`traces_endpoint`]).
    pub endpoint: String,
    /// The `k8s.namespace.name` resource attribute.
    pub namespace: String,
    /// The waypoint's name (`ambit.waypoint.name`, also `service.instance.id`).
    pub waypoint: String,
    /// Spans waiting for export at most; more are dropped.
    pub queue: usize,
    /// Spans per export request at most (a full batch is sent at once).
    pub batch_size: usize,
    /// How long a partial batch waits before it is sent.
    pub flush_interval: Duration,
    /// Bound on one export request.
    pub timeout: Duration,
}

impl OtlpConfig {
    /// Defaults for `endpoint`: 2048 queued spans, batches of 512, a flush every
    /// 1 s, 10 s per request.
    pub fn new(endpoint: String, namespace: String, waypoint: String) -> Self {
        Self {
            endpoint,
            namespace,
            waypoint,
            queue: 2048,
            batch_size: 512,
            flush_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The exporter's counters; clones share them.
#[derive(Clone, Debug, Default)]
pub struct OtlpMetrics {
    /// Spans dropped because the queue was full.
    pub dropped: Counter,
    /// Spans accepted by the collector.
    pub exported: Counter,
    /// Spans in failed export requests.
    pub failed: Counter,
    /// Failed export requests.
    pub export_failures: Counter,
}

impl OtlpMetrics {
    /// Registers the counters in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ambit_waypoint_spans_dropped",
            "Request spans dropped because the OTLP export queue was full",
            m.dropped.clone(),
        );
        registry.register(
            "ambit_waypoint_spans_exported",
            "Request spans the OTLP collector accepted",
            m.exported.clone(),
        );
        registry.register(
            "ambit_waypoint_spans_failed",
            "Request spans lost in failed OTLP export requests",
            m.failed.clone(),
        );
        registry.register(
            "ambit_waypoint_span_export_failures",
            "OTLP export requests that failed",
            m.export_failures.clone(),
        );
        m
    }
}

/// A span attribute's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// One request's span, as the telemetry layer completes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRecord {
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits.
    pub span_id: String,
    /// The caller's span, 16 hex digits.
    pub parent_span_id: Option<String>,
    /// `<method> <route or path>`.
    pub name: String,
    /// Arrival, nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    /// Last response byte (or the end of the request), nanoseconds since the epoch.
    pub end_unix_nanos: u64,
    /// Attributes, in order.
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// Set the span's status to ERROR with this message.
    pub error: Option<String>,
}

/// Hands spans to the export task; clones share it. Dropping every clone ends the
/// task after a last export.
#[derive(Clone, Debug)]
pub struct OtlpExporter {
    tx: mpsc::Sender<SpanRecord>,
    metrics: OtlpMetrics,
}

impl OtlpExporter {
    /// Validates the endpoint and starts the export task (needs a Tokio runtime).
    pub fn spawn(config: OtlpConfig, metrics: OtlpMetrics) -> Result<Self, OtlpError> {
        let uri: http::Uri = config.endpoint.parse().map_err(|e| OtlpError::Endpoint {
            endpoint: config.endpoint.clone(),
            reason: format!("{e}"),
        })?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(OtlpError::Endpoint {
                endpoint: config.endpoint,
                reason: "want an absolute http:// URL (https is not supported)".into(),
            });
        }
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        tokio::spawn(export_loop(config, uri, rx, metrics.clone()));
        Ok(Self { tx, metrics })
    }

    /// Queues `span`, or drops and counts it when the queue is full.
    pub fn record(&self, span: SpanRecord) {
        if self.tx.try_send(span).is_err() {
            self.metrics.dropped.inc();
        }
    }
}

async fn export_loop(
    config: OtlpConfig,
    uri: http::Uri,
    mut rx: mpsc::Receiver<SpanRecord>,
    metrics: OtlpMetrics,
) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.timeout));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let batch_size = config.batch_size.max(1);
    let mut batch: Vec<SpanRecord> = Vec::with_capacity(batch_size);
    loop {
        // Wait for a first span, then at most `flush_interval` for the batch to fill.
        match rx.recv().await {
            Some(span) => batch.push(span),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + config.flush_interval;
        let mut closed = false;
        while batch.len() < batch_size {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let spans = std::mem::take(&mut batch);
        let n = spans.len() as u64;
        match export(&client, &uri, &config, spans).await {
            Ok(()) => {
                metrics.exported.inc_by(n);
            }
            Err(e) => {
                metrics.export_failures.inc();
                metrics.failed.inc_by(n);
                tracing::debug!(endpoint = %uri, spans = n, error = %e, "OTLP export failed");
            }
        }
        if closed {
            return;
        }
    }
}

async fn export(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &http::Uri,
    config: &OtlpConfig,
    spans: Vec<SpanRecord>,
) -> Result<(), String> {
    let body = serde_json::to_vec(&request_json(config, spans)).map_err(|e| e.to_string())?;
    let request = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let sent = async {
        let response = client.request(request).await.map_err(|e| format!("{e}"))?;
        let status = response.status();
        // Read the answer so that the connection can be reused.
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("collector answered {status}"))
        }
    };
    tokio::time::timeout(config.timeout, sent)
        .await
        .map_err(|_| format!("no answer within {:?}", config.timeout))?
}

// ------------------------------------------------------------------ JSON mapping

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExportRequest {
    resource_spans: Vec<ResourceSpans>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceSpans {
    resource: Resource,
    scope_spans: Vec<ScopeSpans>,
}

#[derive(Serialize)]
struct Resource {
    attributes: Vec<KeyValue>,
}

#[derive(Serialize)]
struct ScopeSpans {
    scope: Scope,
    spans: Vec<Span>,
}

#[derive(Serialize)]
struct Scope {
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Span {
    trace_id: String,
    span_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_span_id: Option<String>,
    name: String,
    kind: u8,
    start_time_unix_nano: String,
    end_time_unix_nano: String,
    attributes: Vec<KeyValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Status>,
}

#[derive(Serialize)]
struct Status {
    code: u8,
    message: String,
}

#[derive(Serialize)]
struct KeyValue {
    key: &'static str,
    value: AnyValue,
}

#[derive(Serialize)]
enum AnyValue {
    #[serde(rename = "stringValue")]
    Str(String),
    /// int64 is a string in the proto3 JSON mapping.
    #[serde(rename = "intValue")]
    Int(String),
}

fn kv(key: &'static str, value: AttrValue) -> KeyValue {
    let value = match value {
        AttrValue::Str(s) => AnyValue::Str(s),
        AttrValue::Int(i) => AnyValue::Int(i.to_string()),
    };
    KeyValue { key, value }
}

fn request_json(config: &OtlpConfig, spans: Vec<SpanRecord>) -> ExportRequest {
    let text = |s: &str| AttrValue::Str(s.to_owned());
    let resource = Resource {
        attributes: vec![
            kv("service.name", text(SERVICE_NAME)),
            kv("service.instance.id", text(&config.waypoint)),
            kv("k8s.namespace.name", text(&config.namespace)),
            kv("ambit.waypoint.name", text(&config.waypoint)),
        ],
    };
    let spans = spans
        .into_iter()
        .map(|s| Span {
            trace_id: s.trace_id,
            span_id: s.span_id,
            parent_span_id: s.parent_span_id,
            name: s.name,
            kind: KIND_SERVER,
            start_time_unix_nano: s.start_unix_nanos.to_string(),
            end_time_unix_nano: s.end_unix_nanos.to_string(),
            attributes: s.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
            status: s.error.map(|message| Status {
                code: STATUS_ERROR,
                message,
            }),
        })
        .collect();
    ExportRequest {
        resource_spans: vec![ResourceSpans {
            resource,
            scope_spans: vec![ScopeSpans {
                scope: Scope {
                    name: SERVICE_NAME,
                    version: env!("CARGO_PKG_VERSION"),
                },
                spans,
            }],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_resolution_follows_the_spec() {
        assert_eq!(traces_endpoint(None, None), None);
        assert_eq!(traces_endpoint(Some(""), Some(" ")), None);
        assert_eq!(
            traces_endpoint(Some("http://c:4318/custom"), Some("http://b:4318")).as_deref(),
            Some("http://c:4318/custom")
        );
        assert_eq!(
            traces_endpoint(None, Some("http://b:4318")).as_deref(),
            Some("http://b:4318/v1/traces")
        );
        assert_eq!(
            traces_endpoint(Some(""), Some("http://b:4318/otlp/")).as_deref(),
            Some("http://b:4318/otlp/v1/traces")
        );
    }

    #[tokio::test]
    async fn bad_endpoints_are_refused_by_name() {
        for bad in ["not a url", "https://c:4318/v1/traces", "/v1/traces"] {
            let e = OtlpExporter::spawn(
                OtlpConfig::new(bad.into(), "ns".into(), "wp".into()),
                OtlpMetrics::default(),
            )
            .unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn the_json_mapping() {
        let config = OtlpConfig::new("http://c/v1/traces".into(), "shop".into(), "wp".into());
        let span = SpanRecord {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            span_id: "00f067aa0ba902b7".into(),
            parent_span_id: None,
            name: "GET /".into(),
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: vec![
                ("url.path", AttrValue::Str("/".into())),
                ("http.response.status_code", AttrValue::Int(503)),
            ],
            error: Some("503".into()),
        };
        let v = serde_json::to_value(request_json(&config, vec![span])).unwrap();
        let rs = &v["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0],
            serde_json::json!({"key": "service.name", "value": {"stringValue": "ambit-waypoint"}})
        );
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["kind"], 2);
        assert_eq!(s["startTimeUnixNano"], "1");
        assert!(s.get("parentSpanId").is_none());
        assert_eq!(
            s["attributes"][1],
            serde_json::json!({"key": "http.response.status_code", "value": {"intValue": "503"}})
        );
        assert_eq!(
            s["status"],
            serde_json::json!({"code": 2, "message": "503"})
        );
    }
}
