//! gRPC echo: the `ambit.echo.v1.Echo` service ([`EchoService`], served by
//! `ambit-echo serve` beside HTTP) and a client making a run of calls ([`run`],
//! `ambit-echo grpc`), for routing and retry tests through proxies.
//!
//! Status selection, in order: the `x-echo-grpc-status` request metadata (a code from
//! 0 to 16) if present; otherwise the process-wide failure injection (a `fail_rate`
//! fraction of calls answer UNAVAILABLE, whatever the HTTP `fail_status`); otherwise
//! OK. Every call is counted in the process's [`Stats`].

use std::{
    collections::BTreeMap,
    num::NonZeroU64,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::{
    Code, Request, Response, Status,
    metadata::{KeyAndValueRef, MetadataKey, MetadataValue},
    transport::server::TcpIncoming,
};

use crate::{
    client::{HeaderArg, Target},
    serve::{Faults, Identity},
    stats::Stats,
};

/// Generated from `proto/ambit/echo/v1/echo.proto`.
pub mod proto {
    #![allow(
        missing_debug_implementations,
        rust_2018_idioms,
        clippy::all,
        clippy::pedantic,
        reason = "generated code"
    )]
    include!(concat!(env!("OUT_DIR"), "/ambit.echo.v1.rs"));
}

use proto::{EchoReply, EchoRequest, echo_client::EchoClient, echo_server::EchoServer};

/// Request metadata asking the server to answer with this gRPC status code.
pub const GRPC_STATUS_HEADER: &str = "x-echo-grpc-status";

/// The server side of `ambit.echo.v1.Echo`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EchoService {
    identity: Identity,
    faults: Arc<Mutex<Faults>>,
    stats: Arc<Stats>,
}

impl EchoService {
    /// A service answering as `identity`, failing as `faults` says (shared with the
    /// HTTP server, so `/_echo/control` changes both), counting into `stats`.
    pub fn new(identity: Identity, faults: Arc<Mutex<Faults>>, stats: Arc<Stats>) -> Self {
        Self {
            identity,
            faults,
            stats,
        }
    }

    fn answer(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let code = match requested_code(request.metadata()) {
            Ok(Some(code)) => code,
            Ok(None) => {
                let faults = *self.faults.lock().unwrap_or_else(PoisonError::into_inner);
                if faults.fail_rate() > 0.0 && rand::random::<f64>() < faults.fail_rate() {
                    Code::Unavailable
                } else {
                    Code::Ok
                }
            }
            Err(status) => {
                self.stats.record_grpc(status.code() as u32);
                return Err(status);
            }
        };
        self.stats.record_grpc(code as u32);
        if code != Code::Ok {
            return Err(Status::new(
                code,
                format!("answered {code:?} by {} as asked", self.identity.pod),
            ));
        }
        let metadata = request
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                KeyAndValueRef::Ascii(k, v) => {
                    Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                }
                KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let id = &self.identity;
        Ok(Response::new(EchoReply {
            pod: id.pod.clone(),
            namespace: id.namespace.clone(),
            version: id.version.clone(),
            peer,
            message: request.into_inner().message,
            metadata,
        }))
    }
}

#[tonic::async_trait]
impl proto::echo_server::Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.answer(request)
    }

    async fn ping(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.answer(request)
    }
}

/// The code `x-echo-grpc-status` asks for; an invalid value is answered with
/// INVALID_ARGUMENT naming the header.
fn requested_code(metadata: &tonic::metadata::MetadataMap) -> Result<Option<Code>, Status> {
    let Some(value) = metadata.get(GRPC_STATUS_HEADER) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    match text.parse::<i32>() {
        Ok(n @ 0..=16) => Ok(Some(Code::from_i32(n))),
        _ => Err(Status::invalid_argument(format!(
            "invalid {GRPC_STATUS_HEADER} {text:?}: expected a gRPC status code from 0 to 16"
        ))),
    }
}

/// Serves `service` on `listener` (h2c) until `shutdown` resolves, then lets calls in
/// flight finish.
pub async fn serve(
    listener: TcpListener,
    service: EchoService,
    shutdown: impl Future<Output = ()> + Send,
) {
    // TCP_NODELAY as on the HTTP listener: a response's HEADERS, DATA and trailers
    // may go out in separate writes, which Nagle's algorithm would hold back.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let result = tonic::transport::Server::builder()
        .add_service(EchoServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "gRPC server failed");
    }
}

/// Which method a client run calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// `ambit.echo.v1.Echo/Echo`.
    Echo,
    /// `ambit.echo.v1.Echo/Ping`.
    Ping,
}

/// A client run: `calls` sequential unary calls on one connection.
#[derive(Clone, Debug)]
pub struct GrpcConfig {
    /// `http://host:port` of the server (h2c).
    pub target: Target,
    pub method: Method,
    pub calls: NonZeroU64,
    /// Per call, including connecting when needed.
    pub timeout: Duration,
    /// Request metadata on every call.
    pub metadata: Vec<HeaderArg>,
}

/// The result of a client run, printed as JSON by `ambit-echo grpc` (a contract:
/// tests parse it). `calls = sum(by_code)`; `by_pod` / `by_version` count the OK
/// answers by the server that produced them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcSummary {
    pub calls: u64,
    /// OK answers.
    pub ok: u64,
    /// Every call by gRPC status code (transport failures as the client reports them).
    pub by_code: BTreeMap<u32, u64>,
    pub by_pod: BTreeMap<String, u64>,
    pub by_version: BTreeMap<String, u64>,
    /// Messages of the failed calls, counted.
    pub errors: BTreeMap<String, u64>,
}

/// Why a client run could not start.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("invalid gRPC server address {0:?}")]
    Endpoint(String, #[source] tonic::transport::Error),
    #[error("metadata {name:?} cannot be sent in gRPC")]
    Metadata { name: String },
}

/// Makes the calls; each failed call is counted in the summary, never an error.
pub async fn run(config: GrpcConfig) -> Result<GrpcSummary, GrpcError> {
    let url = format!("http://{}", config.target.authority());
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| GrpcError::Endpoint(url.clone(), e))?
        .connect_timeout(config.timeout)
        .timeout(config.timeout)
        .connect_lazy();
    let mut metadata = Vec::with_capacity(config.metadata.len());
    for h in &config.metadata {
        let name = h.name.as_str();
        let key = MetadataKey::from_bytes(name.as_bytes()).map_err(|_| GrpcError::Metadata {
            name: name.to_owned(),
        })?;
        let value =
            MetadataValue::try_from(h.value.as_bytes()).map_err(|_| GrpcError::Metadata {
                name: name.to_owned(),
            })?;
        metadata.push((key, value));
    }
    let mut client = EchoClient::new(channel);
    let mut summary = GrpcSummary::default();
    for i in 0..config.calls.get() {
        let mut request = Request::new(EchoRequest {
            message: format!("call {i}"),
        });
        for (k, v) in &metadata {
            request.metadata_mut().insert(k.clone(), v.clone());
        }
        let answer = match config.method {
            Method::Echo => client.echo(request).await,
            Method::Ping => client.ping(request).await,
        };
        summary.calls += 1;
        match answer {
            Ok(reply) => {
                let reply = reply.into_inner();
                summary.ok += 1;
                *summary.by_code.entry(0).or_default() += 1;
                *summary.by_pod.entry(reply.pod).or_default() += 1;
                *summary.by_version.entry(reply.version).or_default() += 1;
            }
            Err(status) => {
                *summary.by_code.entry(status.code() as u32).or_default() += 1;
                *summary
                    .errors
                    .entry(format!("{:?}: {}", status.code(), status.message()))
                    .or_default() += 1;
            }
        }
    }
    Ok(summary)
}
