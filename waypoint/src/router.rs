//! The top of the L7 stack: route selection and the route's action.
//!
//! For a forwarded request the router picks the weighted destination, applies rewrite
//! and request header modifiers, and hands the request down the stack with the route's
//! policies as extensions; response header modifiers are applied on the way back.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
};

use ambit_api::config::v1 as pb;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service, ServiceExt};

use crate::{
    balance::pick_weighted,
    body::{BoxError, ProxyBody, boxed, local_response},
    fault::{Fault, FaultLayer},
    mirror::{Mirror, MirrorLayer, MirrorOptions, MirrorPolicy},
    retry::{DEFAULT_BODY_LIMIT, Retry, RetryLayer, RetryStats},
    rng::SharedRng,
    routes::{Action, RouteTable},
    timeout::{RequestTimeout, Timeout, TimeoutLayer},
};

/// Request extension for the upstream: where the router sends the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// Destination service.
    pub service: pb::NamespacedName,
    /// Service port; `None` = the port the request arrived for.
    pub port: Option<u16>,
    /// DestinationPolicy subset; `None` = all endpoints.
    pub subset: Option<String>,
}

/// Request and response extension: the name of the route that matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteName(pub Arc<str>);

/// Response extension: no route matched (response flag `NR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoRoute;

/// Response extension: the upstream failed without a response (`UF`/`UR`-like).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamFailed;

/// The routes in force; cloned handles see updates (a new RouteSet from the controller).
#[derive(Clone, Debug)]
pub struct RouteHandle(Arc<RwLock<Arc<RouteTable>>>);

impl RouteHandle {
    /// Start with `table`.
    pub fn new(table: RouteTable) -> Self {
        Self::from_shared(Arc::new(table))
    }

    /// Start with a table shared with others (e.g. held by a config snapshot).
    pub fn from_shared(table: Arc<RouteTable>) -> Self {
        Self(Arc::new(RwLock::new(table)))
    }

    /// Replace the routes; requests already routed keep the old ones.
    pub fn replace(&self, table: RouteTable) {
        // Replacing an `Arc` cannot leave the table half-written.
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
    }

    /// The routes now in force.
    pub fn current(&self) -> Arc<RouteTable> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Settings shared by the layers [`Router::new`] builds.
#[derive(Clone, Debug)]
pub struct RouterOptions {
    /// Random source for splits, fault percentages and backoff jitter.
    pub rng: SharedRng,
    /// Where retries are counted.
    pub retry_stats: RetryStats,
    /// Request bodies up to this size can be replayed on retry.
    pub body_limit: usize,
    /// Request mirroring: body bound, in-flight bound, timeout, metrics.
    pub mirror: MirrorOptions,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            rng: SharedRng::from_os(),
            retry_stats: RetryStats::default(),
            body_limit: DEFAULT_BODY_LIMIT,
            mirror: MirrorOptions::default(),
        }
    }
}

/// The stack below the router for an upstream `U`.
pub type Stack<U> = Fault<Mirror<Timeout<Retry<Upstream<U>>>, Upstream<U>>>;

/// Routes requests; see the module docs.
#[derive(Clone, Debug)]
pub struct Router<S> {
    routes: RouteHandle,
    stack: S,
    rng: SharedRng,
}

impl<U> Router<Stack<U>> {
    /// The standard stack (fault → mirror → timeout → retry) over `upstream`;
    /// mirrors go to the same `upstream`.
    pub fn new(routes: RouteHandle, upstream: U, options: RouterOptions) -> Self
    where
        U: Clone,
    {
        let upstream = Upstream { inner: upstream };
        let stack = FaultLayer::new(options.rng.clone()).layer(
            MirrorLayer::new(upstream.clone(), options.rng.clone(), options.mirror).layer(
                TimeoutLayer.layer(
                    RetryLayer::new(options.retry_stats, options.body_limit, options.rng.clone())
                        .layer(upstream),
                ),
            ),
        );
        Self::with_stack(routes, stack, options.rng)
    }
}

impl<S> Router<S> {
    /// Route onto a custom stack (it receives the route's policies as extensions).
    pub fn with_stack(routes: RouteHandle, stack: S, rng: SharedRng) -> Self {
        Self { routes, stack, rng }
    }
}

impl<S: Clone> Router<S> {
    /// The same stack and random source with other routes (one router per
    /// destination service, sharing the layers below).
    pub fn with_routes(&self, routes: RouteHandle) -> Self {
        Self {
            routes,
            stack: self.stack.clone(),
            rng: self.rng.clone(),
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<Request<B>> for Router<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let table = self.routes.current();
        let Some((route, consumed)) = table.select_with_match(&request) else {
            let mut response = local_response(StatusCode::NOT_FOUND, Bytes::new());
            response.extensions_mut().insert(NoRoute);
            return Box::pin(async move { Ok(response) });
        };
        let name = RouteName(Arc::from(route.name.as_str()));
        let forward = match &route.action {
            Action::Forward(f) => f.clone(),
            Action::Redirect(r) => return ready(r.respond(&request, consumed), name),
            Action::DirectResponse(d) => return ready(d.respond(), name),
            Action::Unset => {
                return ready(
                    local_response(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
                    name,
                );
            }
        };
        let Some(dest) = pick_weighted(&forward.destinations, &self.rng).cloned() else {
            return ready(
                local_response(StatusCode::INTERNAL_SERVER_ERROR, Bytes::new()),
                name,
            );
        };

        let mut request = request.map(boxed);
        if let Some(rewrite) = &forward.rewrite {
            rewrite.apply(&mut request, consumed);
        }
        forward.request_headers.apply(request.headers_mut());
        dest.request_headers.apply(request.headers_mut());
        let ext = request.extensions_mut();
        ext.insert(Destination {
            service: dest.service.clone(),
            port: dest.port,
            subset: dest.subset.clone(),
        });
        ext.insert(name.clone());
        if let Some(t) = forward.timeout {
            ext.insert(RequestTimeout(t));
        }
        if let Some(retry) = &forward.retry {
            ext.insert(retry.clone());
        }
        if let Some(fault) = &forward.fault {
            ext.insert(fault.clone());
        }
        if !forward.mirrors.is_empty() {
            ext.insert(MirrorPolicy(Arc::clone(&forward)));
        }

        let stack = self.stack.clone();
        Box::pin(async move {
            let mut response = match stack.oneshot(request).await {
                Ok(r) => r,
                Err(error) => {
                    tracing::debug!(%error, route = %name.0, "upstream failed");
                    let mut r = local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers",
                    );
                    r.extensions_mut().insert(UpstreamFailed);
                    r
                }
            };
            forward.response_headers.apply(response.headers_mut());
            dest.response_headers.apply(response.headers_mut());
            response.extensions_mut().insert(name);
            Ok(response)
        })
    }
}

fn ready(
    mut response: Response<ProxyBody>,
    name: RouteName,
) -> BoxFuture<Result<Response<ProxyBody>, Infallible>> {
    response.extensions_mut().insert(name);
    Box::pin(async move { Ok(response) })
}

/// Adapts any HTTP upstream (its own body and error types) to the stack's types.
#[derive(Clone, Debug)]
pub struct Upstream<U> {
    inner: U,
}

impl<U, RB> Service<Request<ProxyBody>> for Upstream<U>
where
    U: Service<Request<ProxyBody>, Response = Response<RB>> + Clone + Send + 'static,
    U::Error: Into<BoxError>,
    U::Future: Send,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<ProxyBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let response = inner.oneshot(request).await.map_err(Into::into)?;
            Ok(response.map(boxed))
        })
    }
}
