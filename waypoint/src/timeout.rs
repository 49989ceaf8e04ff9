//! The whole-request deadline (retries and backoff included): 504 on expiry.
//!
//! The deadline comes per request as a [`RequestTimeout`] extension; without one the
//! request has none.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};

use crate::{
    body::{BoxError, ProxyBody, local_response},
    retry::TIMEOUT_BODY,
};

/// Request extension: the route's overall timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestTimeout(pub Duration);

/// Response extension set on a 504 the timeout produced (response flag `UT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimedOut;

/// Applies [`RequestTimeout`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TimeoutLayer;

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner }
    }
}

/// See [`TimeoutLayer`].
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
}

impl<S> Service<Request<ProxyBody>> for Timeout<S>
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
        let deadline = request.extensions().get::<RequestTimeout>().map(|t| t.0);
        Box::pin(async move {
            let call = inner.oneshot(request);
            match deadline {
                None => call.await,
                Some(d) => match tokio::time::timeout(d, call).await {
                    Ok(result) => result,
                    Err(_) => {
                        let mut response =
                            local_response(StatusCode::GATEWAY_TIMEOUT, TIMEOUT_BODY);
                        response.extensions_mut().insert(TimedOut);
                        Ok(response)
                    }
                },
            }
        })
    }
}
