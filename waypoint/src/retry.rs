//! Retries: conditions, per-try timeout, jittered exponential backoff, and request
//! bodies buffered (up to a limit) so they can be replayed.
//!
//! The policy comes per request as an `Arc<RetryPolicy>` extension (the router puts
//! the route's there); without one the layer forwards a single try unchanged.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use ambit_api::config::v1 as pb;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};

use crate::{
    body::{BoxError, ProxyBody, local_response},
    rng::SharedRng,
    routes::{ConvertError, Invalid},
};

/// Request bodies up to this size are kept for replay by default (Envoy's
/// per-request buffer limit).
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// Body of the 504 a try (or the whole request) times out with, as Envoy words it.
pub const TIMEOUT_BODY: &str = "upstream request timeout";

/// How an upstream failed before producing a response. Upstream services return it
/// (boxed) so retry conditions can tell the cases apart; any other error counts as a
/// reset.
#[derive(Debug, thiserror::Error)]
#[error("upstream {kind:?}")]
pub struct UpstreamError {
    /// What failed.
    pub kind: FailureKind,
    /// The underlying error.
    #[source]
    pub source: BoxError,
}

/// Kinds of upstream failure the retry conditions distinguish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The connection could not be established.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the request was not processed.
    RefusedStream,
    /// Connection reset or closed before a response.
    Reset,
}

/// Compiled [`pb::RetryPolicy`].
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Deadline of each try.
    pub per_try_timeout: Option<Duration>,
    on: Vec<pb::RetryOn>,
    codes: Vec<u16>,
    backoff_base: Duration,
    backoff_max: Duration,
}

/// What a single try produced, as far as retry conditions are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryOutcome {
    /// A response with this status and (if any) gRPC status.
    Response {
        /// HTTP status.
        status: StatusCode,
        /// `grpc-status` from headers (trailers-only) or trailers.
        grpc: Option<u32>,
    },
    /// No response.
    Failed(FailureKind),
    /// The per-try timeout fired.
    TimedOut,
}

/// Counts retries (tries after the first) across all requests through a layer.
#[derive(Clone, Debug, Default)]
pub struct RetryStats(Arc<AtomicU64>);

impl RetryStats {
    /// Retries so far.
    pub fn retries(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Response extension: how many tries the response took (1 = no retry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tries(pub u32);

/// Response extension set by a layer below the retries: this response is final,
/// whatever the retry policy says (Envoy never retries a connection-pool overflow or a
/// missing healthy upstream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DoNotRetry;

/// Response extension: the response met a retry condition but no attempt was left
/// (response flag `URX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryLimitExceeded;

/// Request extension: counts this request's retries as they happen (telemetry puts
/// one in; the count survives an overall timeout that cancels the retries).
#[derive(Clone, Debug, Default)]
pub struct RetryCounter(Arc<AtomicU64>);

impl RetryCounter {
    /// Retries of the request so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl RetryPolicy {
    /// Compile. Unknown `retry_on` values (a newer controller) are ignored: fewer
    /// retries, never more.
    pub fn try_from_proto(p: &pb::RetryPolicy) -> Result<Self, ConvertError> {
        let per_try_timeout =
            crate::routes::duration("per_try_timeout", p.per_try_timeout.as_ref())?;
        let base = crate::routes::duration("backoff_base", p.backoff_base.as_ref())?
            .unwrap_or(Duration::from_millis(25));
        let max =
            crate::routes::duration("backoff_max", p.backoff_max.as_ref())?.unwrap_or(base * 10);
        let codes = p
            .retriable_status_codes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                u16::try_from(c)
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| {
                        ConvertError::new(
                            format!("retriable_status_codes[{i}]"),
                            Invalid::Status(c),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        let on = p
            .retry_on
            .iter()
            .filter_map(|&v| pb::RetryOn::try_from(v).ok())
            .filter(|v| *v != pb::RetryOn::Unspecified)
            .collect();
        Ok(Self {
            attempts: p.attempts,
            per_try_timeout,
            on,
            codes,
            backoff_base: base,
            backoff_max: max.max(base),
        })
    }

    fn has(&self, on: pb::RetryOn) -> bool {
        self.on.contains(&on)
    }

    fn wants_grpc(&self) -> bool {
        use pb::RetryOn as R;
        self.on.iter().any(|o| {
            matches!(
                o,
                R::GrpcCancelled
                    | R::GrpcDeadlineExceeded
                    | R::GrpcInternal
                    | R::GrpcResourceExhausted
                    | R::GrpcUnavailable
            )
        })
    }

    /// Whether `outcome` meets one of the policy's retry conditions.
    pub fn is_retriable(&self, outcome: TryOutcome) -> bool {
        use pb::RetryOn as R;
        match outcome {
            TryOutcome::TimedOut => {
                self.has(R::RetryOn5xx) || self.has(R::GatewayError) || self.has(R::Reset)
            }
            TryOutcome::Failed(kind) => {
                self.has(R::RetryOn5xx)
                    || self.has(R::GatewayError)
                    || match kind {
                        FailureKind::ConnectFailure => {
                            self.has(R::ConnectFailure) || self.has(R::Reset)
                        }
                        FailureKind::RefusedStream => {
                            self.has(R::RefusedStream) || self.has(R::Reset)
                        }
                        FailureKind::Reset => self.has(R::Reset),
                    }
            }
            TryOutcome::Response { status, grpc } => {
                let code = status.as_u16();
                (self.has(R::RetryOn5xx) && status.is_server_error())
                    || (self.has(R::GatewayError) && matches!(code, 502..=504))
                    || (self.has(R::Retriable4xx) && code == 409)
                    || (self.has(R::RetriableStatusCodes) && self.codes.contains(&code))
                    || grpc.is_some_and(|g| {
                        (g == 1 && self.has(R::GrpcCancelled))
                            || (g == 4 && self.has(R::GrpcDeadlineExceeded))
                            || (g == 13 && self.has(R::GrpcInternal))
                            || (g == 8 && self.has(R::GrpcResourceExhausted))
                            || (g == 14 && self.has(R::GrpcUnavailable))
                    })
            }
        }
    }

    /// Fully jittered exponential backoff before retry number `retry` (1-based):
    /// uniform in `[0, min(base × 2^(retry-1), max)]`.
    pub fn backoff(&self, retry: u32, rng: &SharedRng) -> Duration {
        let factor = 1u32 << retry.saturating_sub(1).min(20);
        let ceiling = self
            .backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.below(nanos.saturating_add(1)))
    }
}

/// Adds retries to an upstream service.
#[derive(Clone, Debug)]
pub struct RetryLayer {
    stats: RetryStats,
    body_limit: usize,
    rng: SharedRng,
}

impl RetryLayer {
    /// `stats` is shared with whoever reports retries; request bodies up to
    /// `body_limit` bytes are replayable (larger ones get a single try).
    pub fn new(stats: RetryStats, body_limit: usize, rng: SharedRng) -> Self {
        Self {
            stats,
            body_limit,
            rng,
        }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`RetryLayer`].
#[derive(Clone, Debug)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<ProxyBody>> for Retry<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<ProxyBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Every try drives its own clone of `inner` to readiness (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            let Some(policy) = request.extensions().get::<Arc<RetryPolicy>>().cloned() else {
                return inner.oneshot(request).await;
            };
            if policy.attempts == 0 {
                // Nothing to replay: no need to buffer the body.
                return run_try(inner, request, policy, layer.body_limit, false)
                    .await
                    .finish(1);
            }
            let (parts, body) = request.into_parts();
            let buffered = buffer(body, layer.body_limit).await?;
            let Buffered::Complete { data, trailers } = buffered else {
                // Too large to replay: one try.
                let request = Request::from_parts(parts, buffered.into_body());
                let policy = Arc::new(RetryPolicy {
                    attempts: 0,
                    ..(*policy).clone()
                });
                return run_try(inner, request, policy, layer.body_limit, false)
                    .await
                    .finish(1);
            };
            let mut retries = 0;
            loop {
                let request = rebuild(&parts, &data, trailers.as_ref());
                let more = retries < policy.attempts;
                let attempt = run_try(
                    inner.clone(),
                    request,
                    policy.clone(),
                    layer.body_limit,
                    more,
                )
                .await;
                if attempt.is_final() || !policy.is_retriable(attempt.outcome()) {
                    return attempt.finish(retries + 1);
                }
                if !more {
                    return attempt.finish(retries + 1).map(|mut r| {
                        r.extensions_mut().insert(RetryLimitExceeded);
                        r
                    });
                }
                drop(attempt);
                retries += 1;
                layer.stats.0.fetch_add(1, Ordering::Relaxed);
                if let Some(counter) = parts.extensions.get::<RetryCounter>() {
                    counter.0.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(policy.backoff(retries, &layer.rng)).await;
            }
        })
    }
}

enum Attempt {
    Response(Response<ProxyBody>, Option<u32>),
    Failed(FailureKind, BoxError),
    TimedOut,
}

impl Attempt {
    fn outcome(&self) -> TryOutcome {
        match self {
            Self::Response(r, grpc) => TryOutcome::Response {
                status: r.status(),
                grpc: *grpc,
            },
            Self::Failed(kind, _) => TryOutcome::Failed(*kind),
            Self::TimedOut => TryOutcome::TimedOut,
        }
    }

    /// A response a lower layer marked [`DoNotRetry`].
    fn is_final(&self) -> bool {
        matches!(self, Self::Response(r, _) if r.extensions().get::<DoNotRetry>().is_some())
    }

    fn finish(self, tries: u32) -> Result<Response<ProxyBody>, BoxError> {
        let mut response = match self {
            Self::Response(r, _) => r,
            Self::Failed(_, e) => return Err(e),
            Self::TimedOut => {
                let mut r = local_response(StatusCode::GATEWAY_TIMEOUT, TIMEOUT_BODY);
                r.extensions_mut().insert(crate::timeout::TimedOut);
                r
            }
        };
        response.extensions_mut().insert(Tries(tries));
        Ok(response)
    }
}

/// One try under the per-try timeout. When gRPC conditions apply and another try is
/// possible, a gRPC response without `grpc-status` in its headers is buffered (up to
/// the limit) to read the status from its trailers.
async fn run_try<S>(
    inner: S,
    request: Request<ProxyBody>,
    policy: Arc<RetryPolicy>,
    limit: usize,
    more: bool,
) -> Attempt
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError> + Clone,
{
    let read_trailers = more && policy.wants_grpc();
    let attempt = async {
        match inner.oneshot(request).await {
            Err(e) => {
                let kind = e
                    .downcast_ref::<UpstreamError>()
                    .map_or(FailureKind::Reset, |u| u.kind);
                Attempt::Failed(kind, e)
            }
            Ok(response) => {
                let grpc = header_grpc_status(response.headers());
                if grpc.is_some() || !read_trailers || !is_grpc(response.headers()) {
                    return Attempt::Response(response, grpc);
                }
                let (parts, body) = response.into_parts();
                match buffer(body, limit).await {
                    Err(e) => Attempt::Failed(FailureKind::Reset, e),
                    Ok(buffered) => {
                        let grpc = match &buffered {
                            Buffered::Complete { trailers, .. } => {
                                trailers.as_ref().and_then(header_grpc_status)
                            }
                            Buffered::Partial { .. } => None,
                        };
                        Attempt::Response(Response::from_parts(parts, buffered.into_body()), grpc)
                    }
                }
            }
        }
    };
    match policy.per_try_timeout {
        Some(limit) => tokio::time::timeout(limit, attempt)
            .await
            .unwrap_or(Attempt::TimedOut),
        None => attempt.await,
    }
}

/// Whether `headers` say the message is gRPC (`content-type: application/grpc…`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// `grpc-status` in `headers` (a trailers-only response, or trailers).
pub(crate) fn header_grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn rebuild(
    parts: &http::request::Parts,
    data: &Bytes,
    trailers: Option<&HeaderMap>,
) -> Request<ProxyBody> {
    let body = Replay {
        data: (!data.is_empty()).then(|| data.clone()),
        trailers: trailers.cloned(),
        rest: None,
    };
    let mut request = Request::new(ProxyBody::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    request
}

/// A body read into memory, completely or up to the limit.
enum Buffered {
    Complete {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    Partial {
        data: Bytes,
        rest: ProxyBody,
    },
}

impl Buffered {
    fn into_body(self) -> ProxyBody {
        let replay = match self {
            Self::Complete { data, trailers } => Replay {
                data: Some(data),
                trailers,
                rest: None,
            },
            Self::Partial { data, rest } => Replay {
                data: Some(data),
                trailers: None,
                rest: Some(rest),
            },
        };
        ProxyBody::new(replay)
    }
}

async fn buffer(mut body: ProxyBody, limit: usize) -> Result<Buffered, BoxError> {
    let mut data = BytesMut::new();
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => {
                data.extend_from_slice(&chunk);
                if data.len() > limit {
                    return Ok(Buffered::Partial {
                        data: data.freeze(),
                        rest: body,
                    });
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(t);
                }
            }
        }
    }
    Ok(Buffered::Complete {
        data: data.freeze(),
        trailers,
    })
}

/// Buffered data, then trailers or the unread rest of the original body.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<ProxyBody>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(data) = self.data.take().filter(|d| !d.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(rest) = self.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx);
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.as_ref().is_none_or(Bytes::is_empty)
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(Body::is_end_stream)
    }
}
