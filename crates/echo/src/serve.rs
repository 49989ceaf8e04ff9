//! The echo server: HTTP/1.1 and h2c on one port, raw TCP echo on another, a TCP
//! discard sink (reads and drops everything, for throughput measurements) on a third,
//! and the gRPC echo service ([`crate::grpc`]) on a fourth.
//!
//! Every HTTP answer says which pod, namespace and version produced it and what the
//! server saw (peer address, method, path, protocol, headers, body size), so mesh tests
//! can check routing, header rewriting and identity from the client side.
//!
//! Status selection, in order: the `x-echo-status` request header if present; otherwise
//! the process-wide failure injection (a `fail_rate` fraction of requests answer
//! `fail_status`); otherwise 200. `/_echo/health`, `/_echo/control` and `/_echo/stats`
//! are never subject to either. `GET /_echo/stats` answers what the process served so
//! far ([`crate::stats::Counts`]).
//!
//! Body selection: with an `x-echo-response-bytes: N` request header the answer's body
//! is exactly `N` bytes (`application/octet-stream`, at most [`MAX_RESPONSE_BYTES`]),
//! for fixed-size request/response benchmarks; otherwise the JSON description.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version,
    header::{ALLOW, CONTENT_TYPE, HOST},
};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use serde::Serialize;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

use crate::{
    CONTROL_PATH, DELAY_HEADER, HEALTH_PATH, POD_HEADER, RESPONSE_BYTES_HEADER, STATS_PATH,
    STATUS_HEADER, VERSION_HEADER, grpc, stats::Stats,
};

/// Longest delay `x-echo-delay-ms` may ask for.
pub const MAX_DELAY_MS: u64 = 3_600_000;
/// Largest body `x-echo-response-bytes` may ask for (16 MiB).
pub const MAX_RESPONSE_BYTES: u64 = 16 << 20;
/// Largest control request body accepted.
const MAX_CONTROL_BODY: usize = 64 * 1024;

/// Who this server says it is, in every answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub pod: String,
    pub namespace: String,
    pub version: String,
}

/// Process-wide failure injection: a `fail_rate` fraction of requests answer
/// `fail_status`. Always valid: build it with [`Faults::new`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Faults {
    fail_rate: f64,
    fail_status: u16,
}

/// A failure-injection setting out of range. [`FaultError::field`] names the setting
/// as the control endpoint spells it.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum FaultError {
    #[error("fail_rate {0} is not between 0.0 and 1.0")]
    FailRate(f64),
    #[error("fail_status {0} is not an HTTP status between 200 and 599")]
    FailStatus(u64),
}

/// Everything the server needs; see [`bind`].
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub identity: Identity,
    pub http_addr: SocketAddr,
    pub tcp_addr: SocketAddr,
    /// TCP discard sink: reads and drops everything, closes after the client's EOF.
    pub discard_addr: SocketAddr,
    /// gRPC echo (h2c).
    pub grpc_addr: SocketAddr,
    pub faults: Faults,
    /// How long in-flight requests and TCP echo connections may take to finish once
    /// shutdown starts; whatever is left after that is dropped.
    pub drain_timeout: Duration,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{field} {value:?} cannot be sent in a response header")]
    Identity {
        field: &'static str,
        value: String,
        #[source]
        source: http::header::InvalidHeaderValue,
    },
    #[error("binding the HTTP listener on {addr}")]
    BindHttp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("binding the TCP echo listener on {addr}")]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("binding the TCP discard listener on {addr}")]
    BindDiscard {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("binding the gRPC listener on {addr}")]
    BindGrpc {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("reading the local address of the {0} listener")]
    LocalAddr(&'static str, #[source] io::Error),
}

/// A server whose listeners are bound (connections queue in the backlog) but not yet
/// served; call [`Bound::run`].
#[derive(Debug)]
pub struct Bound {
    /// Where HTTP/1.1 and h2c are served (the real port when the config asked for 0).
    pub http_addr: SocketAddr,
    /// Where TCP echo is served.
    pub tcp_addr: SocketAddr,
    /// Where the TCP discard sink is served.
    pub discard_addr: SocketAddr,
    /// Where gRPC echo is served.
    pub grpc_addr: SocketAddr,
    http: TcpListener,
    tcp: TcpListener,
    discard: TcpListener,
    grpc: TcpListener,
    state: Arc<State>,
    drain_timeout: Duration,
}

/// Shared by every connection.
#[derive(Debug)]
struct State {
    identity: Identity,
    pod_header: HeaderValue,
    version_header: HeaderValue,
    /// Shared with the gRPC service.
    faults: Arc<Mutex<Faults>>,
    stats: Arc<Stats>,
}

/// The JSON body of every echo answer.
#[derive(Debug, Serialize)]
struct EchoReply<'a> {
    pod: &'a str,
    namespace: &'a str,
    version: &'a str,
    peer: String,
    method: &'a str,
    path: &'a str,
    protocol: &'static str,
    /// `:authority` over HTTP/2, the Host header over HTTP/1.x.
    authority: Option<&'a str>,
    headers: BTreeMap<String, String>,
    body_bytes: u64,
    status: u16,
}

/// The JSON body of a 4xx/5xx the server produced itself (bad request header, bad
/// control request), naming what was wrong.
#[derive(Debug, Serialize)]
struct ErrorReply<'a> {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

/// A control request the server refuses (answered with 400).
#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error("request body is not JSON: {0}")]
    Json(String),
    #[error("request body must be a JSON object")]
    NotObject,
    #[error("{0} must be a number")]
    NotNumber(&'static str),
    #[error("unknown field {0:?} (expected fail_rate and/or fail_status)")]
    UnknownField(String),
    #[error(transparent)]
    Range(#[from] FaultError),
}

/// Binds the four listeners. Port 0 picks a free port; the chosen ones are in the
/// result. The discard and gRPC listeners are bound before the TCP echo listener, so a
/// caller that waits for the echo ports to listen finds them listening too.
pub async fn bind(config: ServeConfig) -> Result<Bound, ServeError> {
    let header = |field: &'static str, value: &str| {
        HeaderValue::from_str(value).map_err(|source| ServeError::Identity {
            field,
            value: value.to_owned(),
            source,
        })
    };
    let pod_header = header("pod", &config.identity.pod)?;
    let version_header = header("version", &config.identity.version)?;

    let http = TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| ServeError::BindHttp {
            addr: config.http_addr,
            source,
        })?;
    let discard = TcpListener::bind(config.discard_addr)
        .await
        .map_err(|source| ServeError::BindDiscard {
            addr: config.discard_addr,
            source,
        })?;
    let grpc = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|source| ServeError::BindGrpc {
            addr: config.grpc_addr,
            source,
        })?;
    let tcp = TcpListener::bind(config.tcp_addr)
        .await
        .map_err(|source| ServeError::BindTcp {
            addr: config.tcp_addr,
            source,
        })?;
    Ok(Bound {
        http_addr: http
            .local_addr()
            .map_err(|e| ServeError::LocalAddr("HTTP", e))?,
        tcp_addr: tcp
            .local_addr()
            .map_err(|e| ServeError::LocalAddr("TCP", e))?,
        discard_addr: discard
            .local_addr()
            .map_err(|e| ServeError::LocalAddr("discard", e))?,
        grpc_addr: grpc
            .local_addr()
            .map_err(|e| ServeError::LocalAddr("gRPC", e))?,
        http,
        tcp,
        discard,
        grpc,
        state: Arc::new(State {
            identity: config.identity,
            pod_header,
            version_header,
            faults: Arc::new(Mutex::new(config.faults)),
            stats: Arc::default(),
        }),
        drain_timeout: config.drain_timeout,
    })
}

impl Faults {
    pub fn new(fail_rate: f64, fail_status: u16) -> Result<Self, FaultError> {
        if !(0.0..=1.0).contains(&fail_rate) {
            return Err(FaultError::FailRate(fail_rate));
        }
        if !(200..=599).contains(&fail_status) {
            return Err(FaultError::FailStatus(fail_status.into()));
        }
        Ok(Self {
            fail_rate,
            fail_status,
        })
    }

    pub fn fail_rate(&self) -> f64 {
        self.fail_rate
    }

    pub fn fail_status(&self) -> u16 {
        self.fail_status
    }

    /// Applies a control request body such as `{"fail_rate": 0.5, "fail_status": 500}`;
    /// either field may be left out. Nothing changes unless the whole update is valid.
    fn update(&self, body: &[u8]) -> Result<Self, ControlError> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| ControlError::Json(e.to_string()))?;
        let serde_json::Value::Object(fields) = value else {
            return Err(ControlError::NotObject);
        };
        let mut rate = self.fail_rate;
        let mut status = u64::from(self.fail_status);
        for (name, value) in &fields {
            match name.as_str() {
                "fail_rate" => {
                    rate = value.as_f64().ok_or(ControlError::NotNumber("fail_rate"))?;
                }
                "fail_status" => {
                    status = value
                        .as_u64()
                        .ok_or(ControlError::NotNumber("fail_status"))?;
                }
                other => return Err(ControlError::UnknownField(other.to_owned())),
            }
        }
        let status = u16::try_from(status).map_err(|_| FaultError::FailStatus(status))?;
        Ok(Self::new(rate, status)?)
    }
}

impl Default for Faults {
    /// No injected failures; 503 once a rate is set.
    fn default() -> Self {
        Self {
            fail_rate: 0.0,
            fail_status: 503,
        }
    }
}

impl FaultError {
    /// The setting at fault, as the control endpoint's JSON spells it.
    pub fn field(&self) -> &'static str {
        match self {
            Self::FailRate(_) => "fail_rate",
            Self::FailStatus(_) => "fail_status",
        }
    }
}

impl ControlError {
    fn field(&self) -> Option<&str> {
        match self {
            Self::Json(_) | Self::NotObject => None,
            Self::NotNumber(f) => Some(f),
            Self::UnknownField(f) => Some(f),
            Self::Range(e) => Some(e.field()),
        }
    }
}

impl Bound {
    /// Serves until `shutdown` resolves, then stops accepting, lets open connections
    /// finish for up to the drain timeout and drops the rest.
    pub async fn run<F: Future>(self, shutdown: F) {
        let Self {
            http_addr,
            tcp_addr,
            discard_addr,
            grpc_addr,
            http,
            tcp,
            discard,
            grpc,
            state,
            drain_timeout,
        } = self;
        let id = &state.identity;
        tracing::info!(
            %http_addr, %tcp_addr, %discard_addr, %grpc_addr, pod = %id.pod, namespace = %id.namespace,
            version = %id.version, faults = ?state.faults(),
            "ambit-echo serving HTTP on {http_addr}, TCP echo on {tcp_addr}, TCP discard on {discard_addr}, gRPC on {grpc_addr}"
        );

        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's HTTP/1 header-read timeout and HTTP/2 keep-alive need a timer.
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let builder = Arc::new(builder);

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        let grpc_service = grpc::EchoService::new(
            state.identity.clone(),
            Arc::clone(&state.faults),
            Arc::clone(&state.stats),
        );
        let mut grpc_stop = stop_rx.clone();
        let grpc_server = tokio::spawn(grpc::serve(grpc, grpc_service, async move {
            // An Err means the sender is gone, which only happens once run() is over.
            let _ = grpc_stop.wait_for(|stop| *stop).await;
        }));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                res = http.accept() => match res {
                    Ok((stream, peer)) => {
                        conns.spawn(serve_http(builder.clone(), stream, peer, state.clone(), stop_rx.clone()));
                    }
                    Err(e) => accept_failed("HTTP", e).await,
                },
                res = tcp.accept() => match res {
                    Ok((stream, peer)) => {
                        conns.spawn(echo_tcp(stream, peer));
                    }
                    Err(e) => accept_failed("TCP", e).await,
                },
                res = discard.accept() => match res {
                    Ok((stream, peer)) => {
                        conns.spawn(discard_tcp(stream, peer));
                    }
                    Err(e) => accept_failed("discard", e).await,
                },
                // Reap finished connections so the set does not grow without bound.
                Some(res) = conns.join_next() => {
                    if let Err(e) = res {
                        tracing::warn!(error = %e, "connection task failed");
                    }
                }
            }
        }

        // Closing the listeners makes new connections fail fast instead of queueing.
        drop(http);
        drop(tcp);
        drop(discard);
        stop_tx.send_replace(true);
        tracing::info!(connections = conns.len(), ?drain_timeout, "draining");
        let grpc_abort = grpc_server.abort_handle();
        ambit_runtime::drain_with_deadline(drain_timeout, async {
            while conns.join_next().await.is_some() {}
            let _ = grpc_server.await;
        })
        .await;
        conns.shutdown().await;
        grpc_abort.abort();
    }
}

impl State {
    fn faults(&self) -> Faults {
        // Faults is Copy and written whole, so a panic elsewhere cannot leave it torn.
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn response(
        &self,
        status: StatusCode,
        content_type: &'static str,
        body: Bytes,
    ) -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(POD_HEADER, self.pod_header.clone());
        headers.insert(VERSION_HEADER, self.version_header.clone());
        resp
    }

    fn json(&self, status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
        match serde_json::to_vec(body) {
            Ok(json) => self.response(status, "application/json", json.into()),
            Err(e) => {
                tracing::error!(error = %e, "serializing a response");
                self.response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    Bytes::from_static(b"serializing the response failed\n"),
                )
            }
        }
    }

    fn error(
        &self,
        status: StatusCode,
        error: String,
        header: Option<&str>,
        field: Option<&str>,
    ) -> Response<Full<Bytes>> {
        self.json(
            status,
            &ErrorReply {
                error,
                header,
                field,
            },
        )
    }
}

async fn accept_failed(listener: &str, e: io::Error) {
    tracing::warn!(listener, error = %e, "accept failed");
    // Out of file descriptors and the like: back off instead of spinning on the error.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn serve_http(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "setting TCP_NODELAY");
    }
    let service = service_fn(move |req| handle(state.clone(), peer, req));
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            return;
        }
        // An Err means the sender is gone, which only happens once run() is over.
        _ = stop.wait_for(|stop| *stop) => {}
    }
    // Finish in-flight requests, then close (HTTP/2 sends GOAWAY; HTTP/1.1 closes
    // after the current response).
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP connection ended while draining");
    }
}

async fn echo_tcp(mut stream: TcpStream, peer: SocketAddr) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "setting TCP_NODELAY");
    }
    let (mut rd, mut wr) = stream.split();
    match tokio::io::copy(&mut rd, &mut wr).await {
        Ok(bytes) => tracing::debug!(%peer, bytes, "TCP echo reached EOF"),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TCP echo failed");
            return;
        }
    }
    if let Err(e) = wr.shutdown().await {
        tracing::debug!(%peer, error = %e, "closing the TCP echo write half");
    }
}

/// Reads until the client's EOF, dropping the bytes, then closes: the client knows
/// everything it sent was consumed when it reads EOF.
async fn discard_tcp(mut stream: TcpStream, peer: SocketAddr) {
    let mut sink = tokio::io::sink();
    match tokio::io::copy(&mut stream, &mut sink).await {
        Ok(bytes) => tracing::debug!(%peer, bytes, "TCP discard reached EOF"),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TCP discard failed");
            return;
        }
    }
    if let Err(e) = stream.shutdown().await {
        tracing::debug!(%peer, error = %e, "closing the TCP discard connection");
    }
}

async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    Ok(if path == HEALTH_PATH {
        state.response(StatusCode::OK, "text/plain", Bytes::from_static(b"ok"))
    } else if path == CONTROL_PATH {
        control(&state, req).await
    } else if path == STATS_PATH {
        state.json(StatusCode::OK, &state.stats.snapshot())
    } else {
        echo(&state, peer, req).await
    })
}

async fn control(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match *req.method() {
        Method::GET => state.json(StatusCode::OK, &state.faults()),
        Method::POST => {
            let body = match Limited::new(req.into_body(), MAX_CONTROL_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let msg =
                        format!("reading the request body (at most {MAX_CONTROL_BODY} bytes): {e}");
                    return state.error(StatusCode::BAD_REQUEST, msg, None, None);
                }
            };
            // Read-modify-write under one lock so concurrent partial updates compose.
            let updated = {
                let mut faults = state.faults.lock().unwrap_or_else(PoisonError::into_inner);
                faults.update(&body).inspect(|new| *faults = *new)
            };
            match updated {
                Ok(new) => {
                    tracing::info!(
                        fail_rate = new.fail_rate,
                        fail_status = new.fail_status,
                        "failure injection changed"
                    );
                    state.json(StatusCode::OK, &new)
                }
                Err(e) => state.error(StatusCode::BAD_REQUEST, e.to_string(), None, e.field()),
            }
        }
        _ => {
            let mut resp = state.error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{CONTROL_PATH} accepts GET and POST"),
                None,
                None,
            );
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, POST"));
            resp
        }
    }
}

async fn echo(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, mut body) = req.into_parts();
    // Count the body without keeping it: load tests may send large bodies.
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(e) => {
                let msg = format!("reading the request body: {e}");
                return state.error(StatusCode::BAD_REQUEST, msg, None, None);
            }
        }
    }

    let requested_status = match header_number(&parts.headers, STATUS_HEADER, 200, 599) {
        Ok(s) => s,
        Err(msg) => return state.error(StatusCode::BAD_REQUEST, msg, Some(STATUS_HEADER), None),
    };
    let delay = match header_number(&parts.headers, DELAY_HEADER, 0, MAX_DELAY_MS) {
        Ok(d) => d,
        Err(msg) => return state.error(StatusCode::BAD_REQUEST, msg, Some(DELAY_HEADER), None),
    };
    let response_bytes =
        match header_number(&parts.headers, RESPONSE_BYTES_HEADER, 0, MAX_RESPONSE_BYTES) {
            Ok(n) => n,
            Err(msg) => {
                return state.error(
                    StatusCode::BAD_REQUEST,
                    msg,
                    Some(RESPONSE_BYTES_HEADER),
                    None,
                );
            }
        };
    let status = match requested_status {
        Some(s) => s,
        None => {
            let faults = state.faults();
            if faults.fail_rate > 0.0 && rand::random::<f64>() < faults.fail_rate {
                u64::from(faults.fail_status)
            } else {
                200
            }
        }
    };
    // Both ranges above were checked against 200..=599, so this cannot fail.
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // Counted on arrival, so a proxy that gives up during the delay still shows here.
    state.stats.record_http(status.as_u16());
    if let Some(ms) = delay.filter(|ms| *ms > 0) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = response_bytes {
        // The range check above bounds n by MAX_RESPONSE_BYTES, which fits in usize.
        let body = Bytes::from(vec![b'x'; usize::try_from(n).unwrap_or(0)]);
        return state.response(status, "application/octet-stream", body);
    }

    let mut headers = BTreeMap::<String, String>::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    let authority = match parts.uri.authority() {
        Some(a) => Some(a.as_str()),
        None => parts.headers.get(HOST).and_then(|h| h.to_str().ok()),
    };
    let id = &state.identity;
    let reply = EchoReply {
        pod: &id.pod,
        namespace: &id.namespace,
        version: &id.version,
        peer: peer.to_string(),
        method: parts.method.as_str(),
        path: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        protocol: protocol_name(parts.version),
        authority,
        headers,
        body_bytes,
        status: status.as_u16(),
    };
    state.json(status, &reply)
}

/// Parses an optional numeric request header within `min..=max`; the error message
/// names the header.
fn header_number(
    headers: &HeaderMap,
    name: &str,
    min: u64,
    max: u64,
) -> Result<Option<u64>, String> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    match text.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "invalid {name} header {text:?}: expected an integer between {min} and {max}"
        )),
    }
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_range_checked() {
        assert!(Faults::new(0.0, 503).is_ok());
        assert!(Faults::new(1.0, 200).is_ok());
        assert_eq!(Faults::new(1.5, 503), Err(FaultError::FailRate(1.5)));
        assert!(Faults::new(f64::NAN, 503).is_err());
        assert_eq!(Faults::new(0.5, 99), Err(FaultError::FailStatus(99)));
        assert_eq!(Faults::new(0.5, 600).unwrap_err().field(), "fail_status");
    }

    #[test]
    fn control_updates_are_partial_and_validated() {
        let f = Faults::default();
        let f = f.update(br#"{"fail_rate": 0.25}"#).unwrap();
        assert_eq!((f.fail_rate(), f.fail_status()), (0.25, 503));
        let f = f.update(br#"{"fail_status": 500}"#).unwrap();
        assert_eq!((f.fail_rate(), f.fail_status()), (0.25, 500));

        let field = |body: &[u8]| f.update(body).unwrap_err().field().map(str::to_owned);
        assert_eq!(field(br#"{"fail_rate": 2}"#).as_deref(), Some("fail_rate"));
        assert_eq!(
            field(br#"{"fail_rate": "x"}"#).as_deref(),
            Some("fail_rate")
        );
        assert_eq!(
            field(br#"{"fail_status": 70000}"#).as_deref(),
            Some("fail_status")
        );
        assert_eq!(
            field(br#"{"fail_status": -1}"#).as_deref(),
            Some("fail_status")
        );
        assert_eq!(field(br#"{"nope": 1}"#).as_deref(), Some("nope"));
        assert_eq!(field(b"{").as_deref(), None);
        assert_eq!(field(b"[]").as_deref(), None);
    }

    #[test]
    fn numeric_headers_are_range_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(header_number(&h, STATUS_HEADER, 200, 599), Ok(None));
        h.insert(STATUS_HEADER, HeaderValue::from_static(" 503 "));
        assert_eq!(header_number(&h, STATUS_HEADER, 200, 599), Ok(Some(503)));
        h.insert(STATUS_HEADER, HeaderValue::from_static("99"));
        let err = header_number(&h, STATUS_HEADER, 200, 599).unwrap_err();
        assert!(err.contains(STATUS_HEADER), "{err}");
        h.insert(STATUS_HEADER, HeaderValue::from_static("abc"));
        assert!(header_number(&h, STATUS_HEADER, 200, 599).is_err());
    }
}
