//! Traffic mirroring (VirtualService `mirror`/`mirrors` with `mirrorPercentage`,
//! HTTPRoute `RequestMirror`): a copy of a forwarded request goes to the mirror
//! destination, fire-and-forget.
//!
//! The router puts the route's mirrors on the request ([`MirrorPolicy`]); this layer
//! sits below fault injection (an aborted request is not mirrored, as in Envoy,
//! whose fault filter runs before its router) and above the timeout and retries (one
//! copy per request, however many tries it takes). For each mirror it draws the
//! percentage, then:
//!
//! - **Body**: the original's body streams to its upstream unchanged while a copy of
//!   up to [`MirrorOptions::body_limit`] bytes ([`DEFAULT_MIRROR_BODY_LIMIT`], 64 KiB)
//!   is kept; the mirror is sent once that body has ended. A body announced or
//!   found longer than the bound, or one that fails or is abandoned before its end,
//!   skips the mirror (a debug log; `ambit_waypoint_mirror_requests_total` with
//!   `outcome` `body_too_large` / `body_incomplete`). Long-lived streams (gRPC
//!   streaming) are thus mirrored only when they end within the bound.
//! - **Request**: method, URI and headers as forwarded to the original destination
//!   (after the route's rewrite and header changes), the mirror destination's own
//!   header changes, and the `Host` / `:authority` host suffixed `-shadow` (as Envoy
//!   does: `payment.shop:80` → `payment.shop-shadow:80`).
//! - **Transport**: the same upstream as every forwarded request (an endpoint of the
//!   mirror service chosen by its balancer, HBONE presenting the waypoint's identity,
//!   `Forwarded: for=` the original client, connection-pool limits and outlier
//!   detection of the mirror's cluster), with a context of its own so the original's
//!   retries never avoid or count the mirror's endpoint. No retries.
//! - **Isolation**: the mirror's response is read and discarded; neither it nor any
//!   error reaches the client. At most [`MirrorOptions::limiter`] mirrors
//!   ([`DEFAULT_MIRROR_MAX_IN_FLIGHT`]) are outstanding (copying, sending or
//!   draining); beyond that the mirror is skipped (`outcome="overloaded"`), never
//!   queued, so memory stays below `max_in_flight × body_limit` for bodies. Each is
//!   bounded by the route's timeout, and by [`MirrorOptions::timeout`] in any case
//!   (`outcome="timeout"`).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_api::config::v1 as pb;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::body::{BoxError, ProxyBody};
use crate::context::RequestContext;
use crate::rng::SharedRng;
use crate::router::Destination;
use crate::routes::{Forward, RouteDestination};
use crate::timeout::RequestTimeout;
use crate::upstream::UpstreamHost;

/// Request bodies up to this size are copied to mirrors by default (Envoy's
/// per-request buffer limit, as for retries).
pub const DEFAULT_MIRROR_BODY_LIMIT: usize = 64 * 1024;

/// Mirrors outstanding at once by default; with the body limit, at most 8 MiB of
/// copied bodies.
pub const DEFAULT_MIRROR_MAX_IN_FLIGHT: usize = 128;

/// A mirror never takes longer than this by default (Envoy's default route timeout).
pub const DEFAULT_MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

/// What is appended to the mirror's host.
const SHADOW_SUFFIX: &str = "-shadow";

/// Request extension from the router: the matched route's forwarding action, whose
/// [`Forward::mirrors`] this layer sends.
#[derive(Clone, Debug)]
pub struct MirrorPolicy(pub Arc<Forward>);

/// Settings of the mirror layer. Clones share the in-flight bound and the metrics.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// Request bodies up to this many bytes are copied; longer ones skip the mirror.
    pub body_limit: usize,
    /// Upper bound of one mirror (from its decision to its response's end); the
    /// route's timeout, when shorter, applies instead.
    pub timeout: Duration,
    /// How many mirrors may be outstanding.
    pub limiter: MirrorLimiter,
    /// Where outcomes are counted.
    pub metrics: MirrorMetrics,
}

/// Bounds the mirrors outstanding at once. Clones share the bound.
#[derive(Clone, Debug)]
pub struct MirrorLimiter {
    permits: Arc<Semaphore>,
    max: usize,
}

/// What became of a mirror (the `outcome` label: [`MirrorOutcome::as_str`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum MirrorOutcome {
    /// Sent; the mirror endpoint answered (any status).
    Sent,
    /// Sent, but no endpoint answered (none healthy, connection failed, reset,
    /// connection-pool overflow).
    Failed,
    /// Not finished within the bound.
    Timeout,
    /// Not sent: the request body is longer than the bound.
    BodyTooLarge,
    /// Not sent: the request body failed or was abandoned before its end.
    BodyIncomplete,
    /// Not sent: too many mirrors outstanding.
    Overloaded,
}

/// Labels of the mirror counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// The mirror destination's service name.
    pub destination_service_name: String,
    /// Its namespace.
    pub destination_service_namespace: String,
    /// What became of the mirror.
    pub outcome: MirrorOutcome,
}

/// `ambit_waypoint_mirror_requests_total`; clones share it.
#[derive(Clone, Debug, Default)]
pub struct MirrorMetrics {
    requests: Family<MirrorLabels, Counter>,
}

/// Adds mirroring to a stack; `U` is the upstream the copies go to.
#[derive(Clone, Debug)]
pub struct MirrorLayer<U> {
    upstream: U,
    rng: SharedRng,
    options: MirrorOptions,
}

/// See [`MirrorLayer`].
#[derive(Clone, Debug)]
pub struct Mirror<S, U> {
    inner: S,
    layer: MirrorLayer<U>,
}

/// A copied request body.
#[derive(Clone, Debug)]
struct BodyCopy {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

/// Why a copy could not be made.
#[derive(Clone, Copy, Debug)]
enum NoCopy {
    TooLarge,
    Incomplete,
}

/// The original's body, passed through while a copy is kept for the mirrors.
struct Tee {
    inner: ProxyBody,
    copy: Option<Copying>,
}

struct Copying {
    data: BytesMut,
    trailers: Option<HeaderMap>,
    limit: usize,
    done: oneshot::Sender<Result<BodyCopy, NoCopy>>,
}

/// The copied body, replayed: data, then trailers.
struct Copied(VecDeque<Frame<Bytes>>);

/// What every copy of one request shares.
struct Template {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    ctx: Arc<RequestContext>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Default for MirrorOptions {
    fn default() -> Self {
        Self {
            body_limit: DEFAULT_MIRROR_BODY_LIMIT,
            timeout: DEFAULT_MIRROR_TIMEOUT,
            limiter: MirrorLimiter::new(DEFAULT_MIRROR_MAX_IN_FLIGHT),
            metrics: MirrorMetrics::default(),
        }
    }
}

impl MirrorLimiter {
    /// At most `max` mirrors outstanding.
    pub fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Mirrors outstanding now.
    pub fn in_flight(&self) -> usize {
        self.max.saturating_sub(self.permits.available_permits())
    }

    fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }
}

impl MirrorMetrics {
    /// Registers the counter in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ambit_waypoint_mirror_requests",
            "Request copies for mirrors, by what became of them",
            m.requests.clone(),
        );
        m
    }

    /// How many mirrors to `service` ended with `outcome`.
    pub fn count(&self, service: &pb::NamespacedName, outcome: MirrorOutcome) -> u64 {
        self.requests
            .get(&labels(service, outcome))
            .map_or(0, |c| c.get())
    }

    fn record(&self, dest: &RouteDestination, outcome: MirrorOutcome) {
        self.requests
            .get_or_create(&labels(&dest.service, outcome))
            .inc();
    }
}

impl MirrorOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyIncomplete => "body_incomplete",
            Self::Overloaded => "overloaded",
        }
    }
}

impl EncodeLabelValue for MirrorOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

fn labels(service: &pb::NamespacedName, outcome: MirrorOutcome) -> MirrorLabels {
    MirrorLabels {
        destination_service_name: service.name.clone(),
        destination_service_namespace: service.namespace.clone(),
        outcome,
    }
}

impl<U> MirrorLayer<U> {
    /// Copies go to `upstream`; percentages are drawn from `rng`.
    pub fn new(upstream: U, rng: SharedRng, options: MirrorOptions) -> Self {
        Self {
            upstream,
            rng,
            options,
        }
    }
}

impl<S, U: Clone> Layer<S> for MirrorLayer<U> {
    type Service = Mirror<S, U>;

    fn layer(&self, inner: S) -> Mirror<S, U> {
        Mirror {
            inner,
            layer: self.clone(),
        }
    }
}

impl<S, U> Service<Request<ProxyBody>> for Mirror<S, U>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    U: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    U::Future: Send,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<ProxyBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The request drives its own clone of `inner` to readiness (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let inner = self.inner.clone();
        let request = self.layer.start(request);
        Box::pin(inner.oneshot(request))
    }
}

impl<U> MirrorLayer<U>
where
    U: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    U::Future: Send,
{
    /// Decides the request's mirrors and starts them; returns the request to forward
    /// (its body teed when a copy is needed).
    fn start(&self, request: Request<ProxyBody>) -> Request<ProxyBody> {
        let Some(policy) = request.extensions().get::<MirrorPolicy>().cloned() else {
            return request;
        };
        let chosen: Vec<RouteDestination> = policy
            .0
            .mirrors
            .iter()
            .filter(|(_, percent)| self.rng.chance(*percent))
            .map(|(d, _)| d.clone())
            .collect();
        if chosen.is_empty() {
            return request;
        }
        let Some(ctx) = request.extensions().get::<Arc<RequestContext>>().cloned() else {
            tracing::debug!("request without a waypoint context: not mirrored");
            return request;
        };
        let metrics = &self.options.metrics;
        let announced = request.body().size_hint().lower();
        if announced > u64::try_from(self.options.body_limit).unwrap_or(u64::MAX) {
            for dest in &chosen {
                tracing::debug!(mirror = %dest.service.name, bytes = announced, limit = self.options.body_limit, "request body too large to mirror");
                metrics.record(dest, MirrorOutcome::BodyTooLarge);
            }
            return request;
        }
        let mut sends = Vec::with_capacity(chosen.len());
        for dest in chosen {
            match self.options.limiter.try_acquire() {
                Some(permit) => sends.push((dest, permit)),
                None => {
                    tracing::debug!(mirror = %dest.service.name, "too many mirrors outstanding: not mirrored");
                    metrics.record(&dest, MirrorOutcome::Overloaded);
                }
            }
        }
        if sends.is_empty() {
            return request;
        }
        let route_timeout = request.extensions().get::<RequestTimeout>().map(|t| t.0);
        let limit = route_timeout.map_or(self.options.timeout, |t| t.min(self.options.timeout));
        let deadline = Instant::now() + limit;
        let (parts, body) = request.into_parts();
        let template = Template {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            ctx,
        };
        let (done, copied) = oneshot::channel();
        let body = Tee::new(body, self.options.body_limit, done);
        let upstream = self.upstream.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let copy = match tokio::time::timeout_at(deadline, copied).await {
                Ok(Ok(Ok(copy))) => copy,
                outcome => {
                    let (outcome, why) = match outcome {
                        Ok(Ok(Err(NoCopy::TooLarge))) => {
                            (MirrorOutcome::BodyTooLarge, "request body too large")
                        }
                        Err(_) => (MirrorOutcome::Timeout, "request body not ended in time"),
                        _ => (MirrorOutcome::BodyIncomplete, "request body incomplete"),
                    };
                    for (dest, _) in &sends {
                        tracing::debug!(mirror = %dest.service.name, "{why}: not mirrored");
                        metrics.record(dest, outcome);
                    }
                    return;
                }
            };
            let template = Arc::new(template);
            for (dest, permit) in sends {
                let upstream = upstream.clone();
                let metrics = metrics.clone();
                let template = Arc::clone(&template);
                let copy = copy.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let request = template.build(&dest, copy);
                    let outcome = tokio::time::timeout_at(deadline, send(upstream, request))
                        .await
                        .unwrap_or(MirrorOutcome::Timeout);
                    tracing::debug!(mirror = %dest.service.name, ?outcome, "mirror done");
                    metrics.record(&dest, outcome);
                });
            }
        });
        Request::from_parts(parts, ProxyBody::new(body))
    }
}

/// Sends one copy and reads its response to the end, discarding it.
async fn send<U>(upstream: U, request: Request<ProxyBody>) -> MirrorOutcome
where
    U: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>,
{
    match upstream.oneshot(request).await {
        Ok(response) => {
            // Only the upstream marks a response with the endpoint that gave it; the
            // waypoint's own answers (no healthy endpoint, pool overflow) carry none.
            let answered = response.extensions().get::<UpstreamHost>().is_some();
            let mut body = response.into_body();
            while let Some(frame) = body.frame().await {
                if let Err(error) = frame {
                    tracing::debug!(%error, "mirror response body failed");
                    break;
                }
            }
            if answered {
                MirrorOutcome::Sent
            } else {
                MirrorOutcome::Failed
            }
        }
        Err(error) => {
            tracing::debug!(%error, "mirror failed");
            MirrorOutcome::Failed
        }
    }
}

impl Template {
    /// The copy for `dest`: shadow host, the destination's header changes, a context
    /// of its own.
    fn build(&self, dest: &RouteDestination, body: BodyCopy) -> Request<ProxyBody> {
        let mut request = Request::new(ProxyBody::new(Copied::new(body)));
        *request.method_mut() = self.method.clone();
        *request.version_mut() = self.version;
        *request.uri_mut() = shadow_uri(&self.uri);
        let mut headers = self.headers.clone();
        if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok())
            && let Ok(v) = HeaderValue::from_str(&shadow_host(host))
        {
            headers.insert(header::HOST, v);
        }
        dest.request_headers.apply(&mut headers);
        *request.headers_mut() = headers;
        let ext = request.extensions_mut();
        ext.insert(Arc::new(RequestContext::new(
            Arc::clone(&self.ctx.snapshot),
            Arc::clone(&self.ctx.client),
            self.ctx.target.clone(),
        )));
        ext.insert(Destination {
            service: dest.service.clone(),
            port: dest.port,
            subset: dest.subset.clone(),
        });
        request
    }
}

/// `host[:port]` with `-shadow` appended to the host.
pub fn shadow_host(authority: &str) -> String {
    let (host, port) = match authority.rfind(':') {
        // A colon inside an IPv6 literal is not a port separator.
        Some(i) if !authority[i..].contains(']') => authority.split_at(i),
        _ => (authority, ""),
    };
    format!("{host}{SHADOW_SUFFIX}{port}")
}

fn shadow_uri(uri: &Uri) -> Uri {
    let Some(authority) = uri.authority() else {
        return uri.clone();
    };
    let Ok(shadow) = Authority::try_from(shadow_host(authority.as_str())) else {
        return uri.clone();
    };
    let mut parts = uri.clone().into_parts();
    parts.authority = Some(shadow);
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

impl Tee {
    fn new(
        inner: ProxyBody,
        limit: usize,
        done: oneshot::Sender<Result<BodyCopy, NoCopy>>,
    ) -> Self {
        let mut tee = Self {
            inner,
            copy: Some(Copying {
                data: BytesMut::new(),
                trailers: None,
                limit,
                done,
            }),
        };
        // An empty body may never be polled.
        if tee.inner.is_end_stream() {
            tee.finish();
        }
        tee
    }

    fn finish(&mut self) {
        if let Some(c) = self.copy.take() {
            let _ = c.done.send(Ok(BodyCopy {
                data: c.data.freeze(),
                trailers: c.trailers,
            }));
        }
    }

    fn abandon(&mut self, why: NoCopy) {
        if let Some(c) = self.copy.take() {
            let _ = c.done.send(Err(why));
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(copy) = &mut this.copy {
                    if let Some(data) = frame.data_ref() {
                        if copy.data.len() + data.len() > copy.limit {
                            this.abandon(NoCopy::TooLarge);
                        } else {
                            copy.data.extend_from_slice(data);
                        }
                    } else if let Some(t) = frame.trailers_ref() {
                        copy.trailers
                            .get_or_insert_with(HeaderMap::new)
                            .extend(t.clone());
                    }
                }
                // The reader may stop polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => this.abandon(NoCopy::Incomplete),
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl fmt::Debug for Tee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tee")
            .field("copying", &self.copy.is_some())
            .finish_non_exhaustive()
    }
}

impl Copied {
    fn new(copy: BodyCopy) -> Self {
        let mut frames = VecDeque::with_capacity(2);
        if !copy.data.is_empty() {
            frames.push_back(Frame::data(copy.data));
        }
        if let Some(t) = copy.trailers {
            frames.push_back(Frame::trailers(t));
        }
        Self(frames)
    }
}

impl Body for Copied {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let data: usize = self
            .0
            .iter()
            .filter_map(|f| f.data_ref().map(Bytes::len))
            .sum();
        SizeHint::with_exact(data as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn the_shadow_suffix_goes_on_the_host() {
        assert_eq!(shadow_host("payment.shop"), "payment.shop-shadow");
        assert_eq!(shadow_host("payment.shop:80"), "payment.shop-shadow:80");
        assert_eq!(shadow_host("10.0.0.1:8080"), "10.0.0.1-shadow:8080");
        assert_eq!(shadow_host("[fd00::1]"), "[fd00::1]-shadow");
        let uri: Uri = "http://payment.shop:80/a?b=1".parse().unwrap();
        assert_eq!(
            shadow_uri(&uri).to_string(),
            "http://payment.shop-shadow:80/a?b=1"
        );
        let origin: Uri = "/a".parse().unwrap();
        assert_eq!(shadow_uri(&origin), origin);
    }

    /// A body of `chunks` (then trailers), of unknown length until its end.
    fn stream(chunks: &[&'static str], trailers: bool) -> ProxyBody {
        let mut frames: VecDeque<Frame<Bytes>> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            frames.push_back(Frame::trailers(t));
        }
        ProxyBody::new(Chunks(frames))
    }

    struct Chunks(VecDeque<Frame<Bytes>>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    #[tokio::test]
    async fn the_tee_passes_the_body_through_and_copies_it() {
        let (tx, rx) = oneshot::channel();
        let tee = Tee::new(stream(&["ab", "cd"], true), 16, tx);
        let collected = tee.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "abcd");
        let copy = rx.await.unwrap().unwrap();
        assert_eq!(copy.data, "abcd");
        assert_eq!(copy.trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn an_empty_body_is_copied_at_once_and_a_long_one_not_at_all() {
        let (tx, rx) = oneshot::channel();
        let _tee = Tee::new(ProxyBody::default(), 16, tx);
        assert_eq!(rx.await.unwrap().unwrap().data, "");

        let (tx, rx) = oneshot::channel();
        let tee = Tee::new(stream(&["0123456789", "0123456789"], false), 16, tx);
        // The original still gets all of it.
        assert_eq!(tee.collect().await.unwrap().to_bytes().len(), 20);
        assert!(matches!(rx.await.unwrap(), Err(NoCopy::TooLarge)));

        let (tx, rx) = oneshot::channel();
        let tee = Tee::new(stream(&["ab", "cd"], false), 16, tx);
        drop(tee);
        assert!(rx.await.is_err(), "an abandoned body gives no copy");

        let (tx, rx) = oneshot::channel();
        let tee = Tee::new(ProxyBody::new(Full::new(Bytes::from("xyz"))), 16, tx);
        assert_eq!(tee.collect().await.unwrap().to_bytes(), "xyz");
        assert_eq!(rx.await.unwrap().unwrap().data, "xyz");
    }

    #[test]
    fn the_limiter_counts_what_is_outstanding() {
        let limiter = MirrorLimiter::new(2);
        let a = limiter.try_acquire().unwrap();
        let _b = limiter.try_acquire().unwrap();
        assert_eq!(limiter.in_flight(), 2);
        assert!(limiter.try_acquire().is_none());
        drop(a);
        assert_eq!(limiter.in_flight(), 1);
    }
}
