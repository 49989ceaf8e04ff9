//! Connection-pool limits (DestinationRule `connectionPool`): Envoy's circuit breaking
//! per cluster (a service, subset and port), answered with `503` and response flag
//! `UO` on overflow.
//!
//! Admission happens per try, just above the upstream: a fault delay or a retry
//! backoff holds no slot, and an overflow is final — like Envoy, which never retries a
//! pool overflow, the response carries [`DoNotRetry`]. A slot is held until the
//! response body is finished or dropped.
//!
//! The model (Envoy's, reduced to what a waypoint needs):
//! - `http2MaxRequests` (`max_requests`): requests in flight to the cluster, HTTP/1 and
//!   HTTP/2 alike. One more overflows at once.
//! - `tcp.maxConnections` (`max_connections`): an HTTP/1.1 request occupies an upstream
//!   connection for its whole exchange, so at most that many HTTP/1 requests are in
//!   flight; the next ones wait for a connection to free up, in arrival order, and
//!   `http1MaxPendingRequests` (`max_pending_requests`) bounds how many may wait — one
//!   more overflows. HTTP/2 requests share connections, so `maxConnections` does not
//!   bound them (Envoy's default of unlimited streams per connection).
//! - Zero means unset: Istio's defaults are effectively unlimited.
//! - `maxRequestsPerConnection`, `maxRetries`, `connectTimeout` and `idleTimeout` are
//!   compiled here for the upstream's connection management; this module does not
//!   apply them.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use ambit_api::config::v1 as pb;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service, ServiceExt};

use crate::{
    balance::ClusterKey,
    body::{BoxError, ProxyBody, local_response},
    retry::DoNotRetry,
    routes::ConvertError,
};

/// Body of the overflow `503` (Envoy's wording).
pub const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

/// Compiled [`pb::ConnectionPool`]; `None` fields are unlimited / unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolLimits {
    /// `tcp.maxConnections`.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`.
    pub max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`.
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection` (for the upstream; 1 disables keep-alive).
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries` (for the retry budget; not applied here).
    pub max_retries: Option<u32>,
    /// `tcp.connectTimeout` (for the upstream).
    pub connect_timeout: Option<Duration>,
    /// `http.idleTimeout` / `tcp.idleTimeout` (for the upstream).
    pub idle_timeout: Option<Duration>,
}

fn set(n: u32) -> Option<u32> {
    (n > 0).then_some(n)
}

impl PoolLimits {
    /// Compile; zero counts are unset.
    pub fn try_from_proto(p: &pb::ConnectionPool) -> Result<Self, ConvertError> {
        Ok(Self {
            max_connections: set(p.max_connections),
            max_pending_requests: set(p.max_pending_requests),
            max_requests: set(p.max_requests),
            max_requests_per_connection: set(p.max_requests_per_connection),
            max_retries: set(p.max_retries),
            connect_timeout: crate::routes::duration(
                "connect_timeout",
                p.connect_timeout.as_ref(),
            )?,
            idle_timeout: crate::routes::duration("idle_timeout", p.idle_timeout.as_ref())?,
        })
    }

    /// Whether any limit applies to admission.
    pub fn limits_admission(&self) -> bool {
        self.max_connections.is_some() || self.max_requests.is_some()
    }
}

/// Which limit overflowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    /// `http2MaxRequests` reached.
    #[error("too many requests in flight (http2MaxRequests)")]
    Requests,
    /// Every connection busy and `http1MaxPendingRequests` requests already waiting.
    #[error("too many requests waiting for a connection (http1MaxPendingRequests)")]
    Pending,
}

impl Overflow {
    /// The `503` an overflowed request gets: Envoy's body and
    /// `x-envoy-overloaded: true`, with this value (response flag `UO`) and
    /// [`DoNotRetry`] as extensions.
    pub fn response(self) -> Response<ProxyBody> {
        let mut r = local_response(StatusCode::SERVICE_UNAVAILABLE, OVERFLOW_BODY);
        r.headers_mut()
            .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
        r.extensions_mut().insert(self);
        r.extensions_mut().insert(DoNotRetry);
        r
    }
}

/// The live state of one cluster under one set of limits.
#[derive(Debug)]
struct Gate {
    limits: PoolLimits,
    /// HTTP/1 connection slots (`max_connections`).
    connections: Option<Arc<Semaphore>>,
    /// HTTP/1 requests waiting for a slot.
    pending: AtomicU32,
    /// Requests in flight.
    active: AtomicU32,
}

/// A cluster's admission counters (for tests and the admin endpoint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests admitted and not finished.
    pub active: u32,
    /// HTTP/1 requests waiting for a connection slot.
    pub pending: u32,
}

/// A request's place in its cluster; frees it when dropped.
#[derive(Debug)]
pub struct PoolPermit {
    gate: Option<Arc<Gate>>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for PoolPermit {
    fn drop(&mut self) {
        if let Some(g) = &self.gate {
            g.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Decrements the pending count however the wait ends (admitted, or cancelled).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The clusters' admission state, shared by every request; keep one for the
/// process (limits changes take effect for new requests; requests admitted under the
/// old limits finish under them).
#[derive(Clone, Debug, Default)]
pub struct PoolLimiter {
    gates: Arc<Mutex<HashMap<ClusterKey, Arc<Gate>>>>,
}

impl PoolLimiter {
    /// No clusters yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn gate(&self, cluster: &ClusterKey, limits: &PoolLimits) -> Option<Arc<Gate>> {
        let mut gates = self.gates.lock().unwrap_or_else(PoisonError::into_inner);
        if !limits.limits_admission() {
            gates.remove(cluster);
            return None;
        }
        if let Some(g) = gates.get(cluster)
            && g.limits == *limits
        {
            return Some(g.clone());
        }
        let gate = Arc::new(Gate {
            limits: limits.clone(),
            connections: limits
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            pending: AtomicU32::new(0),
            active: AtomicU32::new(0),
        });
        gates.insert(cluster.clone(), gate.clone());
        Some(gate)
    }

    /// Requests in flight and waiting in `cluster` now (`None`: no limits apply).
    pub fn stats(&self, cluster: &ClusterKey) -> Option<PoolStats> {
        let gates = self.gates.lock().unwrap_or_else(PoisonError::into_inner);
        gates.get(cluster).map(|g| PoolStats {
            active: g.active.load(Ordering::Acquire),
            pending: g.pending.load(Ordering::Acquire),
        })
    }

    /// Admits one try of an `http1` (HTTP/1.x) or HTTP/2 request to `cluster` under
    /// `limits`: at once, after waiting for an HTTP/1 connection slot, or not at all.
    /// Cancel-safe: dropping the future gives up the place in the queue.
    pub async fn admit(
        &self,
        cluster: &ClusterKey,
        limits: &PoolLimits,
        http1: bool,
    ) -> Result<PoolPermit, Overflow> {
        let Some(gate) = self.gate(cluster, limits) else {
            return Ok(PoolPermit {
                gate: None,
                _connection: None,
            });
        };
        let connection = match (&gate.connections, http1) {
            (Some(slots), true) => match slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let waiting = gate.pending.fetch_add(1, Ordering::AcqRel);
                    let _waiting = Waiting(&gate.pending);
                    if gate
                        .limits
                        .max_pending_requests
                        .is_some_and(|max| waiting >= max)
                    {
                        return Err(Overflow::Pending);
                    }
                    // The semaphore is never closed; a closed one would mean no slot.
                    Some(
                        slots
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| Overflow::Pending)?,
                    )
                }
            },
            _ => None,
        };
        let before = gate.active.fetch_add(1, Ordering::AcqRel);
        let permit = PoolPermit {
            gate: Some(gate.clone()),
            _connection: connection,
        };
        if gate.limits.max_requests.is_some_and(|max| before >= max) {
            // Dropping the permit undoes the count.
            drop(permit);
            return Err(Overflow::Requests);
        }
        Ok(permit)
    }
}

/// Finds the cluster and limits of a request (from the router's
/// [`crate::router::Destination`] and the configuration); `None`: no limits.
pub type PoolResolver =
    Arc<dyn Fn(&Request<ProxyBody>) -> Option<(ClusterKey, PoolLimits)> + Send + Sync>;

/// Applies connection-pool limits to each try; wrap the upstream with it.
#[derive(Clone)]
pub struct PoolLayer {
    limiter: PoolLimiter,
    resolve: PoolResolver,
}

impl std::fmt::Debug for PoolLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolLayer")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl PoolLayer {
    /// Admit with `limiter`, finding each request's cluster with `resolve`.
    pub fn new(limiter: PoolLimiter, resolve: PoolResolver) -> Self {
        Self { limiter, resolve }
    }
}

impl<S> Layer<S> for PoolLayer {
    type Service = Pool<S>;

    fn layer(&self, inner: S) -> Pool<S> {
        Pool {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`PoolLayer`].
#[derive(Clone, Debug)]
pub struct Pool<S> {
    inner: S,
    layer: PoolLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<ProxyBody>> for Pool<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<ProxyBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let inner = self.inner.clone();
        let limiter = self.layer.limiter.clone();
        let cluster = (self.layer.resolve)(&request);
        Box::pin(async move {
            let permit = match &cluster {
                None => None,
                Some((key, limits)) => {
                    let http1 = request.version() < Version::HTTP_2;
                    match limiter.admit(key, limits, http1).await {
                        Ok(p) => Some(p),
                        Err(overflow) => {
                            tracing::debug!(
                                service = %key.service, namespace = %key.namespace,
                                subset = ?key.subset, %overflow, "connection pool overflow"
                            );
                            return Ok(overflow.response());
                        }
                    }
                }
            };
            let response = inner.oneshot(request).await.map_err(Into::into)?;
            Ok(match permit {
                None => response,
                Some(permit) => response.map(|body| ProxyBody::new(Holding { body, permit })),
            })
        })
    }
}

/// A response body that keeps its request's pool slot until it is finished or dropped.
struct Holding {
    body: ProxyBody,
    #[expect(dead_code, reason = "held for its Drop")]
    permit: PoolPermit,
}

impl Body for Holding {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tokio::sync::oneshot;
    use tower::service_fn;

    use super::*;
    use crate::{
        retry::{RetryLayer, RetryPolicy},
        rng::SharedRng,
    };

    fn key() -> ClusterKey {
        ClusterKey::new("production", "payment", None, Some(8080))
    }

    fn limits(connections: u32, pending: u32, requests: u32) -> PoolLimits {
        PoolLimits::try_from_proto(&pb::ConnectionPool {
            max_connections: connections,
            max_pending_requests: pending,
            max_requests: requests,
            ..Default::default()
        })
        .unwrap()
    }

    /// An upstream whose requests stay open until released (one release per
    /// request); records the `x-id` of each arrival in order.
    #[derive(Clone)]
    struct Held {
        arrived: Arc<Mutex<Vec<String>>>,
        release: Arc<Semaphore>,
    }

    impl Held {
        fn new() -> Self {
            Self {
                arrived: Arc::default(),
                release: Arc::new(Semaphore::new(0)),
            }
        }

        fn service(
            &self,
        ) -> impl Service<
            Request<ProxyBody>,
            Response = Response<ProxyBody>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + 'static {
            let held = self.clone();
            service_fn(move |r: Request<ProxyBody>| {
                let held = held.clone();
                async move {
                    let id = r
                        .headers()
                        .get("x-id")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    held.arrived.lock().unwrap().push(id);
                    held.release.acquire().await.unwrap().forget();
                    Ok::<_, BoxError>(Response::new(ProxyBody::full("done")))
                }
            })
        }

        fn count(&self) -> usize {
            self.arrived.lock().unwrap().len()
        }

        async fn arrived(&self, n: usize) {
            while self.count() < n {
                tokio::task::yield_now().await;
            }
        }
    }

    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    async fn until(mut f: impl FnMut() -> bool) {
        while !f() {
            tokio::task::yield_now().await;
        }
    }

    fn layer_with(limiter: &PoolLimiter, l: PoolLimits) -> PoolLayer {
        PoolLayer::new(
            limiter.clone(),
            Arc::new(move |_r: &Request<ProxyBody>| Some((key(), l.clone()))),
        )
    }

    fn request(version: Version, id: &str) -> Request<ProxyBody> {
        let mut r = Request::new(ProxyBody::default());
        *r.version_mut() = version;
        r.headers_mut().insert("x-id", id.parse().unwrap());
        r
    }

    fn is_overflow(r: &Response<ProxyBody>) -> bool {
        r.status() == StatusCode::SERVICE_UNAVAILABLE
            && r.extensions().get::<Overflow>().is_some()
            && r.headers()["x-envoy-overloaded"] == "true"
    }

    #[tokio::test]
    async fn http1_waits_for_a_connection_then_overflows() {
        // One connection, one waiting request: the third concurrent request gets 503.
        let held = Held::new();
        let limiter = PoolLimiter::new();
        let svc = layer_with(&limiter, limits(1, 1, 0)).layer(held.service());
        let first = tokio::spawn(svc.clone().oneshot(request(Version::HTTP_11, "1")));
        held.arrived(1).await;
        let second = tokio::spawn(svc.clone().oneshot(request(Version::HTTP_11, "2")));
        until(|| limiter.stats(&key()).unwrap().pending == 1).await;
        assert_eq!(held.count(), 1, "the second waits for the connection");
        let third = svc
            .clone()
            .oneshot(request(Version::HTTP_11, "3"))
            .await
            .unwrap();
        assert!(is_overflow(&third));
        assert_eq!(
            third.extensions().get::<Overflow>(),
            Some(&Overflow::Pending)
        );
        assert!(third.extensions().get::<DoNotRetry>().is_some());
        let body = third.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, OVERFLOW_BODY);

        // The first response is back, but its body still holds the connection.
        held.release.add_permits(1);
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        settle().await;
        assert_eq!(held.count(), 1);
        // Reading it to the end and dropping it lets the second in.
        let body = first.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "done");
        held.arrived(2).await;
        held.release.add_permits(1);
        assert_eq!(second.await.unwrap().unwrap().status(), StatusCode::OK);
        assert_eq!(
            limiter.stats(&key()),
            Some(PoolStats {
                active: 0,
                pending: 0
            })
        );
        assert_eq!(*held.arrived.lock().unwrap(), ["1", "2"]);
    }

    #[tokio::test]
    async fn max_requests_overflows_at_once_for_http2() {
        let held = Held::new();
        let limiter = PoolLimiter::new();
        // maxConnections does not bound HTTP/2; http2MaxRequests does.
        let svc = layer_with(&limiter, limits(1, 0, 2)).layer(held.service());
        let a = tokio::spawn(svc.clone().oneshot(request(Version::HTTP_2, "a")));
        let b = tokio::spawn(svc.clone().oneshot(request(Version::HTTP_2, "b")));
        held.arrived(2).await;
        let c = svc
            .clone()
            .oneshot(request(Version::HTTP_2, "c"))
            .await
            .unwrap();
        assert!(is_overflow(&c));
        assert_eq!(c.extensions().get::<Overflow>(), Some(&Overflow::Requests));
        // HTTP/1 counts against http2MaxRequests too.
        let d = svc
            .clone()
            .oneshot(request(Version::HTTP_11, "d"))
            .await
            .unwrap();
        assert!(is_overflow(&d));
        held.release.add_permits(2);
        for h in [a, b] {
            let r = h.await.unwrap().unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
        let e = tokio::spawn(svc.oneshot(request(Version::HTTP_2, "e")));
        held.arrived(3).await;
        held.release.add_permits(1);
        assert_eq!(e.await.unwrap().unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn waiting_requests_go_in_arrival_order() {
        let held = Held::new();
        let limiter = PoolLimiter::new();
        let svc = layer_with(&limiter, limits(2, 0, 0)).layer(held.service());
        let mut tasks = Vec::new();
        for (i, id) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            tasks.push(tokio::spawn(
                svc.clone().oneshot(request(Version::HTTP_11, id)),
            ));
            // Wait until it is either at the upstream or queued, so the order is known.
            until(|| {
                let pending = limiter.stats(&key()).map_or(0, |s| s.pending);
                held.count() + pending as usize == i + 1
            })
            .await;
        }
        assert_eq!(held.count(), 2);
        assert_eq!(limiter.stats(&key()).unwrap().pending, 3);
        held.release.add_permits(5);
        for t in tasks {
            // Each response body is dropped here, freeing its connection.
            assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
        }
        assert_eq!(*held.arrived.lock().unwrap(), ["a", "b", "c", "d", "e"]);
    }

    #[tokio::test]
    async fn cancelled_waiters_free_their_place() {
        let limiter = PoolLimiter::new();
        let l = limits(1, 1, 0);
        let busy = limiter.admit(&key(), &l, true).await.unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let waiter = {
            let limiter = limiter.clone();
            let l = l.clone();
            tokio::spawn(async move {
                let cluster = key();
                tokio::select! {
                    _ = limiter.admit(&cluster, &l, true) => panic!("no slot is free"),
                    _ = rx => {}
                }
            })
        };
        until(|| limiter.stats(&key()).unwrap().pending == 1).await;
        assert_eq!(
            limiter.admit(&key(), &l, true).await.unwrap_err(),
            Overflow::Pending
        );
        tx.send(()).unwrap();
        waiter.await.unwrap();
        assert_eq!(limiter.stats(&key()).unwrap().pending, 0);
        // The cancelled waiter's place is free: one may wait again.
        let again = {
            let limiter = limiter.clone();
            let l = l.clone();
            tokio::spawn(async move { limiter.admit(&key(), &l, true).await.map(drop) })
        };
        until(|| limiter.stats(&key()).unwrap().pending == 1).await;
        assert!(!again.is_finished());
        drop(busy);
        again.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn clusters_and_settings_are_independent() {
        let limiter = PoolLimiter::new();
        let one = limits(0, 0, 1);
        let _a = limiter.admit(&key(), &one, false).await.unwrap();
        assert!(limiter.admit(&key(), &one, false).await.is_err());
        let v1 = ClusterKey::new("production", "payment", Some("v1"), Some(8080));
        let _b = limiter.admit(&v1, &one, false).await.unwrap();
        // New limits start a fresh gate; the old one drains on its own.
        let two = limits(0, 0, 2);
        let _c = limiter.admit(&key(), &two, false).await.unwrap();
        let _d = limiter.admit(&key(), &two, false).await.unwrap();
        assert!(limiter.admit(&key(), &two, false).await.is_err());
        // No limits: always admitted, nothing tracked.
        let mut many = Vec::new();
        for _ in 0..10 {
            many.push(
                limiter
                    .admit(&key(), &PoolLimits::default(), true)
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(limiter.stats(&key()), None);
    }

    #[tokio::test]
    async fn requests_without_a_cluster_pass() {
        let held = Held::new();
        let svc = PoolLayer::new(PoolLimiter::new(), Arc::new(|_: &Request<ProxyBody>| None))
            .layer(held.service());
        held.release.add_permits(3);
        for _ in 0..3 {
            let r = svc
                .clone()
                .oneshot(request(Version::HTTP_11, "x"))
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn overflow_is_not_retried() {
        let held = Held::new();
        let limiter = PoolLimiter::new();
        let upstream = layer_with(&limiter, limits(0, 0, 1)).layer(held.service());
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = {
            let calls = calls.clone();
            service_fn(move |r: Request<ProxyBody>| {
                calls.fetch_add(1, Ordering::SeqCst);
                upstream.clone().oneshot(r)
            })
        };
        let svc = RetryLayer::new(Default::default(), 1024, SharedRng::seeded(1)).layer(counted);
        let busy = tokio::spawn(svc.clone().oneshot(request(Version::HTTP_2, "busy")));
        held.arrived(1).await;
        let policy = RetryPolicy::try_from_proto(&pb::RetryPolicy {
            attempts: 3,
            retry_on: vec![pb::RetryOn::RetryOn5xx as i32],
            ..Default::default()
        })
        .unwrap();
        let mut r = request(Version::HTTP_2, "retried");
        r.extensions_mut().insert(Arc::new(policy));
        let response = svc.oneshot(r).await.unwrap();
        assert!(is_overflow(&response));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "one try besides the busy one"
        );
        held.release.add_permits(1);
        busy.await.unwrap().unwrap();
    }

    #[test]
    fn from_proto() {
        let l = PoolLimits::try_from_proto(&pb::ConnectionPool {
            max_connections: 10,
            connect_timeout: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            max_pending_requests: 0,
            max_requests: 100,
            max_requests_per_connection: 1,
            max_retries: 3,
            idle_timeout: None,
        })
        .unwrap();
        assert_eq!(l.max_connections, Some(10));
        assert_eq!(l.max_pending_requests, None);
        assert_eq!(l.max_requests, Some(100));
        assert_eq!(l.max_requests_per_connection, Some(1));
        assert_eq!(l.max_retries, Some(3));
        assert_eq!(l.connect_timeout, Some(Duration::from_secs(1)));
        assert!(l.limits_admission());
        assert!(!PoolLimits::default().limits_admission());
        let e = PoolLimits::try_from_proto(&pb::ConnectionPool {
            idle_timeout: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.field, "idle_timeout");
    }
}
