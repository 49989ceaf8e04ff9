//! Fault injection: delay (a share of requests), then abort (a share of requests).
//! An aborted request never reaches the upstream.
//!
//! The policy comes per request as an `Arc<FaultPolicy>` extension.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use ambit_api::config::v1 as pb;
use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};

use crate::{
    body::{BoxError, ProxyBody, local_response},
    rng::SharedRng,
    routes::{ConvertError, Invalid},
};

/// Compiled [`pb::FaultInjection`].
#[derive(Clone, Debug)]
pub struct FaultPolicy {
    delay: Option<(Duration, f64)>,
    abort: Option<(Abort, f64)>,
}

#[derive(Clone, Copy, Debug)]
enum Abort {
    Http(StatusCode),
    Grpc(u32),
}

/// Response extension on an injected abort (response flag `FI`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultAborted;

/// Response extension on a delayed request (response flag `DI`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultDelayed;

impl FaultPolicy {
    /// Compile; the abort status must be a valid HTTP status (gRPC: 0..=16).
    pub fn try_from_proto(f: &pb::FaultInjection) -> Result<Self, ConvertError> {
        let delay = match &f.delay {
            None => None,
            Some(d) => crate::routes::duration("delay.fixed_delay", d.fixed_delay.as_ref())?
                .map(|fixed| (fixed, d.percent)),
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => match a.error {
                None => None,
                Some(pb::fault_abort::Error::HttpStatus(s)) => {
                    let status = u16::try_from(s)
                        .ok()
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .ok_or_else(|| {
                            ConvertError::new("abort.http_status", Invalid::Status(s))
                        })?;
                    Some((Abort::Http(status), a.percent))
                }
                Some(pb::fault_abort::Error::GrpcStatus(s)) => {
                    if s > 16 {
                        return Err(ConvertError::new("abort.grpc_status", Invalid::Status(s)));
                    }
                    Some((Abort::Grpc(s), a.percent))
                }
            },
        };
        Ok(Self { delay, abort })
    }
}

/// Applies [`FaultPolicy`] with an injectable random source.
#[derive(Clone, Debug)]
pub struct FaultLayer {
    rng: SharedRng,
}

impl FaultLayer {
    /// Percentages are drawn from `rng`.
    pub fn new(rng: SharedRng) -> Self {
        Self { rng }
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = Fault<S>;

    fn layer(&self, inner: S) -> Fault<S> {
        Fault {
            inner,
            rng: self.rng.clone(),
        }
    }
}

/// See [`FaultLayer`].
#[derive(Clone, Debug)]
pub struct Fault<S> {
    inner: S,
    rng: SharedRng,
}

impl<S> Service<Request<ProxyBody>> for Fault<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let inner = self.inner.clone();
        let Some(policy) = request.extensions().get::<Arc<FaultPolicy>>().cloned() else {
            return Box::pin(inner.oneshot(request));
        };
        // Draw both decisions now so the sequence does not depend on timing.
        let delay = policy
            .delay
            .filter(|(_, pct)| self.rng.chance(*pct))
            .map(|(d, _)| d);
        let abort = policy
            .abort
            .filter(|(_, pct)| self.rng.chance(*pct))
            .map(|(a, _)| a);
        Box::pin(async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let mut response = match abort {
                Some(Abort::Http(status)) => {
                    let mut r = local_response(status, "fault filter abort");
                    r.extensions_mut().insert(FaultAborted);
                    r
                }
                Some(Abort::Grpc(code)) => {
                    // Trailers-only gRPC response: HTTP 200 with the status in headers.
                    let mut r = local_response(StatusCode::OK, "");
                    let headers = r.headers_mut();
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    headers.insert("grpc-status", HeaderValue::from(code));
                    headers.insert(
                        "grpc-message",
                        HeaderValue::from_static("fault filter abort"),
                    );
                    r.extensions_mut().insert(FaultAborted);
                    r
                }
                None => inner.oneshot(request).await?,
            };
            if delay.is_some() {
                response.extensions_mut().insert(FaultDelayed);
            }
            Ok(response)
        })
    }
}
