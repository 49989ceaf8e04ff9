//! In-process tests of the L7 routing core against a fake upstream.
//!
//! Timing tests run on tokio's paused clock: sleeps and timeouts advance virtual time
//! only, so elapsed-time assertions are exact and never flaky.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use ambit_api::config::v1 as pb;
use ambit_waypoint::{
    ProxyBody,
    fault::FaultAborted,
    retry::{RetryStats, Tries},
    rng::SharedRng,
    router::{Destination, NoRoute, RouteHandle, Router, RouterOptions},
    routes::RouteTable,
    timeout::TimedOut,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

// ---------------------------------------------------------------- fake upstream

/// What the fake upstream does with a call (`n` counts calls from 0).
#[derive(Clone)]
enum Behaviour {
    Ok,
    /// 503 for a share of calls, drawn from a seeded generator.
    FailPercent(SharedRng, f64),
    /// 503 for every second call (a fixed 50 % programme: calls 0, 2, 4, … fail).
    FailEveryOther,
    /// Answer after this long.
    Delay(Duration),
    /// gRPC `unavailable` (14) for the first `k` calls, in headers (trailers-only).
    GrpcUnavailableFirst(usize),
    /// Same, with the status in trailers after a message.
    GrpcUnavailableTrailersFirst(usize),
}

#[derive(Clone)]
struct Fake {
    behaviour: Behaviour,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[derive(Clone, Debug)]
struct Seen {
    destination: Option<Destination>,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Fake {
    fn new(behaviour: Behaviour) -> Self {
        Self {
            behaviour,
            calls: Arc::default(),
            seen: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Service<Request<ProxyBody>> for Fake {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ProxyBody>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let this = self.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            this.seen.lock().unwrap().push(Seen {
                destination: parts.extensions.get::<Destination>().cloned(),
                path: parts
                    .uri
                    .path_and_query()
                    .map_or("/".into(), |p| p.to_string()),
                headers: parts.headers.clone(),
                body,
            });
            let ok = || {
                let mut r = Response::new(ProxyBody::full("ok"));
                r.headers_mut()
                    .insert("x-upstream", HeaderValue::from_static("yes"));
                r
            };
            let grpc = |status: &'static str| {
                let mut r = Response::new(ProxyBody::default());
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                r.headers_mut()
                    .insert("grpc-status", HeaderValue::from_static(status));
                r
            };
            Ok(match &this.behaviour {
                Behaviour::Ok => ok(),
                Behaviour::FailPercent(rng, pct) => {
                    if rng.chance(*pct) {
                        let mut r = Response::new(ProxyBody::full("boom"));
                        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        r
                    } else {
                        ok()
                    }
                }
                Behaviour::FailEveryOther if n.is_multiple_of(2) => {
                    let mut r = Response::new(ProxyBody::full("boom"));
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }
                Behaviour::FailEveryOther => ok(),
                Behaviour::Delay(d) => {
                    tokio::time::sleep(*d).await;
                    ok()
                }
                Behaviour::GrpcUnavailableFirst(k) => grpc(if n < *k { "14" } else { "0" }),
                Behaviour::GrpcUnavailableTrailersFirst(k) => {
                    let status = if n < *k { "14" } else { "0" };
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from_static(status));
                    let body = Full::new(Bytes::from_static(b"\0\0\0\0\0"))
                        .with_trailers(async move { Some(Ok(trailers)) });
                    let mut r = Response::new(ProxyBody::new(body));
                    r.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/grpc"));
                    r
                }
            })
        })
    }
}

// ---------------------------------------------------------------- proto builders

fn svc(name: &str) -> pb::NamespacedName {
    pb::NamespacedName {
        namespace: "shop".into(),
        name: name.into(),
    }
}

fn dest(subset: &str, weight: u32) -> pb::RouteDestination {
    pb::RouteDestination {
        service: Some(svc("payment")),
        subset: subset.into(),
        weight,
        ..Default::default()
    }
}

fn forward(destinations: Vec<pb::RouteDestination>) -> pb::Forward {
    pb::Forward {
        destinations,
        ..Default::default()
    }
}

fn route(name: &str, matches: Vec<pb::RouteMatch>, forward: pb::Forward) -> pb::Route {
    pb::Route {
        name: name.into(),
        matches,
        action: Some(pb::route::Action::Forward(forward)),
        ..Default::default()
    }
}

fn path(kind: pb::path_match::Kind) -> pb::RouteMatch {
    pb::RouteMatch {
        path: Some(pb::PathMatch {
            kind: Some(kind),
            ignore_case: false,
        }),
        ..Default::default()
    }
}

fn exact(v: &str) -> pb::StringMatch {
    pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(v.into())),
        ignore_case: false,
    }
}

fn secs(s: f64) -> prost_types::Duration {
    prost_types::Duration::try_from(Duration::from_secs_f64(s)).unwrap()
}

fn retry(attempts: u32, on: &[pb::RetryOn]) -> pb::RetryPolicy {
    pb::RetryPolicy {
        attempts,
        retry_on: on.iter().map(|o| *o as i32).collect(),
        ..Default::default()
    }
}

fn route_set(routes: Vec<pb::Route>) -> pb::RouteSet {
    pb::RouteSet {
        service: Some(svc("payment")),
        routes,
    }
}

struct Harness {
    router: Router<ambit_waypoint::router::Stack<Fake>>,
    fake: Fake,
    stats: RetryStats,
}

fn harness(routes: Vec<pb::Route>, behaviour: Behaviour, seed: u64) -> Harness {
    harness_with_limit(
        routes,
        behaviour,
        seed,
        ambit_waypoint::retry::DEFAULT_BODY_LIMIT,
    )
}

fn harness_with_limit(
    routes: Vec<pb::Route>,
    behaviour: Behaviour,
    seed: u64,
    body_limit: usize,
) -> Harness {
    let table = RouteTable::try_from_proto(&route_set(routes)).unwrap();
    let fake = Fake::new(behaviour);
    let stats = RetryStats::default();
    let router = Router::new(
        RouteHandle::new(table),
        fake.clone(),
        RouterOptions {
            rng: SharedRng::seeded(seed),
            retry_stats: stats.clone(),
            body_limit,
            ..RouterOptions::default()
        },
    );
    Harness {
        router,
        fake,
        stats,
    }
}

impl Harness {
    async fn send(&self, request: Request<Full<Bytes>>) -> Response<ProxyBody> {
        self.router.clone().oneshot(request).await.unwrap()
    }

    async fn get(&self, uri: &str) -> Response<ProxyBody> {
        self.send(Request::get(uri).body(Full::default()).unwrap())
            .await
    }
}

async fn body_text(response: Response<ProxyBody>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn subset_of(seen: &Seen) -> String {
    seen.destination
        .as_ref()
        .and_then(|d| d.subset.clone())
        .unwrap_or_default()
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn weighted_split_90_10_over_1000_requests_within_5_percent() {
    let h = harness(
        vec![route(
            "VirtualService/shop/payment#0",
            vec![],
            forward(vec![dest("v1", 90), dest("v2", 10)]),
        )],
        Behaviour::Ok,
        7,
    );
    for _ in 0..1000 {
        assert_eq!(h.get("http://payment/pay").await.status(), StatusCode::OK);
    }
    let seen = h.fake.seen();
    let v1 = seen.iter().filter(|s| subset_of(s) == "v1").count();
    let v2 = seen.iter().filter(|s| subset_of(s) == "v2").count();
    assert_eq!(v1 + v2, 1000);
    assert!((850..=950).contains(&v1), "v1 got {v1} of 1000");
}

#[tokio::test]
async fn zero_weight_never_chosen_and_all_zero_is_500() {
    let h = harness(
        vec![route(
            "r",
            vec![],
            forward(vec![dest("v1", 0), dest("v2", 3)]),
        )],
        Behaviour::Ok,
        1,
    );
    for _ in 0..50 {
        h.get("http://payment/").await;
    }
    assert!(h.fake.seen().iter().all(|s| subset_of(s) == "v2"));

    let h = harness(
        vec![route("r", vec![], forward(vec![dest("v1", 0)]))],
        Behaviour::Ok,
        1,
    );
    assert_eq!(
        h.get("http://payment/").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(h.fake.calls(), 0);
}

#[tokio::test]
async fn header_match_x_canary_true_goes_to_v2_only() {
    let canary = pb::RouteMatch {
        headers: vec![pb::HeaderMatcher {
            name: "x-canary".into(),
            value: Some(exact("true")),
            invert: false,
        }],
        ..Default::default()
    };
    let h = harness(
        vec![
            route(
                "HTTPRoute/shop/payment#0",
                vec![canary],
                forward(vec![dest("v2", 1)]),
            ),
            route(
                "HTTPRoute/shop/payment#1",
                vec![],
                forward(vec![dest("v1", 1)]),
            ),
        ],
        Behaviour::Ok,
        3,
    );
    for _ in 0..100 {
        let r = Request::get("http://payment/")
            .header("x-canary", "true")
            .body(Full::default())
            .unwrap();
        h.send(r).await;
    }
    assert!(h.fake.seen().iter().all(|s| subset_of(s) == "v2"));
    for value in ["false", "TRUE"] {
        let r = Request::get("http://payment/")
            .header("x-canary", value)
            .body(Full::default())
            .unwrap();
        h.send(r).await;
    }
    h.get("http://payment/").await;
    let seen = h.fake.seen();
    assert_eq!(seen.len(), 103);
    assert!(seen[100..].iter().all(|s| subset_of(s) == "v1"));
}

/// 1000 POSTs with a body through a route retrying `attempts` times on 5xx; returns
/// (successes, retries counted, upstream calls).
async fn run_retry_load(attempts: u32, behaviour: Behaviour) -> (usize, u64, usize) {
    let mut fwd = forward(vec![dest("v1", 1)]);
    fwd.retry = Some(retry(attempts, &[pb::RetryOn::RetryOn5xx]));
    let h = harness(vec![route("r", vec![], fwd)], behaviour, 5);
    let mut ok = 0;
    for _ in 0..1000 {
        let r = h
            .send(
                Request::post("http://payment/pay")
                    .body(Full::new(Bytes::from_static(b"amount=5")))
                    .unwrap(),
            )
            .await;
        if r.status() == StatusCode::OK {
            ok += 1;
        }
    }
    // The body was replayed on every try.
    assert!(
        h.fake
            .seen()
            .iter()
            .all(|s| s.body == Bytes::from_static(b"amount=5"))
    );
    (ok, h.stats.retries(), h.fake.calls())
}

#[tokio::test(start_paused = true)]
async fn retries_on_5xx_mask_a_backend_failing_half_the_requests() {
    // A backend failing every second request: 3 retries on 5xx recover all of them.
    let (ok, retries, calls) = run_retry_load(3, Behaviour::FailEveryOther).await;
    assert!(ok >= 990, "only {ok} of 1000 succeeded");
    assert!(retries >= 300, "retries: {retries}");
    // Every call beyond the first per request is a retry, and the counter shows them.
    assert_eq!(calls as u64, 1000 + retries);
}

#[tokio::test(start_paused = true)]
async fn retries_against_independent_50_percent_failures_follow_the_odds() {
    // Independent coin flips: 4 tries fail together with p = 1/16, so ~937 of 1000
    // succeed; 99 % needs 7 tries (1 - 1/128).
    let (ok, retries, calls) =
        run_retry_load(3, Behaviour::FailPercent(SharedRng::seeded(42), 50.0)).await;
    assert!((910..=965).contains(&ok), "{ok} of 1000 succeeded");
    assert_eq!(calls as u64, 1000 + retries);
    let (ok, _, _) = run_retry_load(6, Behaviour::FailPercent(SharedRng::seeded(43), 50.0)).await;
    assert!(ok >= 990, "only {ok} of 1000 succeeded");
}

#[tokio::test(start_paused = true)]
async fn a_body_over_the_replay_limit_gets_one_intact_try() {
    let mut fwd = forward(vec![dest("v1", 1)]);
    fwd.retry = Some(retry(3, &[pb::RetryOn::RetryOn5xx]));
    let h = harness_with_limit(
        vec![route("r", vec![], fwd)],
        Behaviour::FailEveryOther,
        5,
        4,
    );
    let big = Bytes::from_static(b"0123456789");
    let r = h
        .send(
            Request::post("http://payment/")
                .body(Full::new(big.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(h.fake.calls(), 1);
    assert_eq!(h.fake.seen()[0].body, big);
    // A body within the limit is replayed.
    let small = Bytes::from_static(b"0123");
    let r = h
        .send(
            Request::post("http://payment/")
                .body(Full::new(small.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h.stats.retries(), 0);
    let r = h
        .send(
            Request::post("http://payment/")
                .body(Full::new(small.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(h.stats.retries(), 1);
    assert!(h.fake.seen()[1..].iter().all(|s| s.body == small));
}

#[tokio::test(start_paused = true)]
async fn no_retry_without_a_matching_condition() {
    let mut fwd = forward(vec![dest("v1", 1)]);
    fwd.retry = Some(retry(3, &[pb::RetryOn::Retriable4xx]));
    let h = harness(
        vec![route("r", vec![], fwd)],
        Behaviour::FailPercent(SharedRng::seeded(1), 100.0),
        5,
    );
    let r = h.get("http://payment/").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.extensions().get::<Tries>(), Some(&Tries(1)));
    assert_eq!(h.fake.calls(), 1);
    assert_eq!(h.stats.retries(), 0);
}

#[tokio::test(start_paused = true)]
async fn per_try_timeout_bounds_each_try_then_504() {
    let mut fwd = forward(vec![dest("v1", 1)]);
    let mut policy = retry(2, &[pb::RetryOn::RetryOn5xx]);
    policy.per_try_timeout = Some(secs(0.1));
    policy.backoff_base = Some(secs(0.01));
    fwd.retry = Some(policy);
    fwd.timeout = Some(secs(2.0));
    let h = harness(
        vec![route("r", vec![], fwd)],
        Behaviour::Delay(Duration::from_secs(10)),
        5,
    );
    let start = Instant::now();
    let r = h.get("http://payment/").await;
    let elapsed = start.elapsed();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.extensions().get::<Tries>(), Some(&Tries(3)));
    assert_eq!(body_text(r).await, "upstream request timeout");
    assert_eq!(h.fake.calls(), 3);
    // Three tries of 100 ms plus two backoffs of at most 10 ms and 20 ms.
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed <= Duration::from_millis(330), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn overall_timeout_cuts_retries_short_with_504() {
    let mut fwd = forward(vec![dest("v1", 1)]);
    let mut policy = retry(10, &[pb::RetryOn::RetryOn5xx]);
    policy.per_try_timeout = Some(secs(0.4));
    fwd.retry = Some(policy);
    fwd.timeout = Some(secs(1.0));
    let h = harness(
        vec![route("r", vec![], fwd)],
        Behaviour::Delay(Duration::from_secs(10)),
        5,
    );
    let start = Instant::now();
    let r = h.get("http://payment/").await;
    let elapsed = start.elapsed();
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(r.extensions().get::<TimedOut>().is_some());
    assert_eq!(body_text(r).await, "upstream request timeout");
    assert_eq!(elapsed, Duration::from_secs(1));
    assert!(h.fake.calls() <= 3, "calls: {}", h.fake.calls());
}

#[tokio::test(start_paused = true)]
async fn fault_abort_100_percent_never_reaches_upstream() {
    let mut fwd = forward(vec![dest("v1", 1)]);
    fwd.fault = Some(pb::FaultInjection {
        delay: None,
        abort: Some(pb::FaultAbort {
            error: Some(pb::fault_abort::Error::HttpStatus(418)),
            percent: 100.0,
        }),
    });
    let h = harness(vec![route("r", vec![], fwd)], Behaviour::Ok, 5);
    for _ in 0..20 {
        let r = h.get("http://payment/").await;
        assert_eq!(r.status(), StatusCode::IM_A_TEAPOT);
        assert!(r.extensions().get::<FaultAborted>().is_some());
    }
    assert_eq!(h.fake.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn fault_abort_percentage_is_respected() {
    let mut fwd = forward(vec![dest("v1", 1)]);
    fwd.fault = Some(pb::FaultInjection {
        delay: None,
        abort: Some(pb::FaultAbort {
            error: Some(pb::fault_abort::Error::HttpStatus(503)),
            percent: 25.0,
        }),
    });
    let h = harness(vec![route("r", vec![], fwd)], Behaviour::Ok, 11);
    let mut aborted = 0;
    for _ in 0..1000 {
        if h.get("http://payment/").await.status() == StatusCode::SERVICE_UNAVAILABLE {
            aborted += 1;
        }
    }
    assert!((200..=300).contains(&aborted), "aborted {aborted}");
    assert_eq!(h.fake.calls(), 1000 - aborted);
}

#[tokio::test(start_paused = true)]
async fn fault_delay_adds_the_configured_latency() {
    let mut fwd = forward(vec![dest("v1", 1)]);
    fwd.fault = Some(pb::FaultInjection {
        delay: Some(pb::FaultDelay {
            fixed_delay: Some(secs(2.0)),
            percent: 100.0,
        }),
        abort: None,
    });
    let h = harness(
        vec![route("r", vec![], fwd)],
        Behaviour::Delay(Duration::from_millis(50)),
        5,
    );
    let start = Instant::now();
    let r = h.get("http://payment/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), Duration::from_millis(2050));
    assert_eq!(h.fake.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn fault_grpc_abort_is_trailers_only() {
    let mut fwd = forward(vec![dest("v1", 1)]);
    fwd.fault = Some(pb::FaultInjection {
        delay: None,
        abort: Some(pb::FaultAbort {
            error: Some(pb::fault_abort::Error::GrpcStatus(14)),
            percent: 100.0,
        }),
    });
    let h = harness(vec![route("r", vec![], fwd)], Behaviour::Ok, 5);
    let r = h.get("http://payment/").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["grpc-status"], "14");
    assert_eq!(h.fake.calls(), 0);
}

fn grpc_request(path: &str) -> Request<Full<Bytes>> {
    Request::post(format!("http://payment{path}"))
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .unwrap()
}

fn grpc_route(service: &str, method: &str, subset: &str) -> pb::Route {
    let mut fwd = forward(vec![dest(subset, 1)]);
    fwd.retry = Some(retry(3, &[pb::RetryOn::GrpcUnavailable]));
    route(
        &format!("GRPCRoute/shop/payment#{subset}"),
        vec![pb::RouteMatch {
            grpc: Some(pb::GrpcMethodMatch {
                service: service.into(),
                method: method.into(),
            }),
            ..Default::default()
        }],
        fwd,
    )
}

#[tokio::test(start_paused = true)]
async fn grpc_routed_by_method_and_retried_on_unavailable() {
    let h = harness(
        vec![
            grpc_route("shop.Payment", "Charge", "charge"),
            grpc_route("shop.Payment", "", "other"),
        ],
        Behaviour::GrpcUnavailableFirst(2),
        5,
    );
    let r = h.send(grpc_request("/shop.Payment/Charge")).await;
    assert_eq!(r.headers()["grpc-status"], "0");
    assert_eq!(r.extensions().get::<Tries>(), Some(&Tries(3)));
    assert_eq!(h.stats.retries(), 2);
    h.send(grpc_request("/shop.Payment/Refund")).await;
    let subsets: Vec<String> = h.fake.seen().iter().map(subset_of).collect();
    assert_eq!(subsets, ["charge", "charge", "charge", "other"]);
    // Not gRPC (no content type): no gRPC route matches.
    let r = h.get("http://payment/shop.Payment/Charge").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.extensions().get::<NoRoute>().is_some());
}

#[tokio::test(start_paused = true)]
async fn grpc_status_in_trailers_is_retried() {
    let h = harness(
        vec![grpc_route("", "", "any")],
        Behaviour::GrpcUnavailableTrailersFirst(1),
        5,
    );
    let r = h.send(grpc_request("/shop.Payment/Charge")).await;
    assert_eq!(r.extensions().get::<Tries>(), Some(&Tries(2)));
    let collected = r.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(h.fake.calls(), 2);
}

fn named(name: &str, m: pb::RouteMatch) -> pb::Route {
    let mut d = dest(name, 1);
    d.subset = name.into();
    route(name, vec![m], forward(vec![d]))
}

async fn routed_to(h: &Harness, uri: &str) -> String {
    let before = h.fake.seen().len();
    let r = h.get(uri).await;
    if r.status() == StatusCode::NOT_FOUND {
        return "404".into();
    }
    subset_of(&h.fake.seen()[before])
}

#[tokio::test]
async fn exact_prefix_regex_take_the_route_order() {
    use pb::path_match::Kind;
    let h = harness(
        vec![
            named("exact", path(Kind::Exact("/api/v1/orders".into()))),
            named("segment", path(Kind::SegmentPrefix("/api/v1/".into()))),
            named("prefix", path(Kind::Prefix("/api".into()))),
            named("regex", path(Kind::Regex("/[a-z]+/[0-9]+".into()))),
        ],
        Behaviour::Ok,
        1,
    );
    assert_eq!(routed_to(&h, "http://p/api/v1/orders").await, "exact");
    assert_eq!(routed_to(&h, "http://p/api/v1/orders?x=1").await, "exact");
    assert_eq!(routed_to(&h, "http://p/api/v1/orders/7").await, "segment");
    assert_eq!(routed_to(&h, "http://p/api/v1").await, "segment");
    assert_eq!(routed_to(&h, "http://p/api/v10").await, "prefix");
    assert_eq!(routed_to(&h, "http://p/apix").await, "prefix");
    assert_eq!(routed_to(&h, "http://p/orders/42").await, "regex");
    // Regex is anchored: it must match the whole path.
    assert_eq!(routed_to(&h, "http://p/orders/42/x").await, "404");

    // The same matchers in the opposite order: the first match wins, whatever its kind.
    let h = harness(
        vec![
            named("regex", path(Kind::Regex("/api/.*".into()))),
            named("prefix", path(Kind::Prefix("/api".into()))),
            named("exact", path(Kind::Exact("/api/v1/orders".into()))),
        ],
        Behaviour::Ok,
        1,
    );
    assert_eq!(routed_to(&h, "http://p/api/v1/orders").await, "regex");
    assert_eq!(routed_to(&h, "http://p/api").await, "prefix");
}

#[tokio::test]
async fn method_query_and_inverted_header_matches() {
    let m = pb::RouteMatch {
        method: "POST".into(),
        query_params: vec![pb::QueryParamMatcher {
            name: "debug".into(),
            value: Some(exact("1")),
        }],
        headers: vec![pb::HeaderMatcher {
            name: "x-block".into(),
            value: None,
            invert: true,
        }],
        ..Default::default()
    };
    let h = harness(
        vec![
            named("special", m),
            named("default", pb::RouteMatch::default()),
        ],
        Behaviour::Ok,
        1,
    );
    let send = |method: &str, uri: &str, block: bool| {
        let mut b = Request::builder().method(method).uri(uri);
        if block {
            b = b.header("x-block", "1");
        }
        b.body(Full::default()).unwrap()
    };
    h.send(send("POST", "http://p/x?a=2&debug=1", false)).await;
    h.send(send("GET", "http://p/x?debug=1", false)).await;
    h.send(send("POST", "http://p/x?debug=2", false)).await;
    h.send(send("POST", "http://p/x?debug=1", true)).await;
    let subsets: Vec<String> = h.fake.seen().iter().map(subset_of).collect();
    assert_eq!(subsets, ["special", "default", "default", "default"]);
}

#[test]
fn bad_regex_is_a_conversion_error_naming_the_field() {
    use pb::path_match::Kind;
    let set = route_set(vec![
        named("ok", path(Kind::Prefix("/".into()))),
        named("bad", path(Kind::Regex("/orders/(".into()))),
    ]);
    let err = RouteTable::try_from_proto(&set).unwrap_err();
    assert_eq!(err.field, "routes[1].matches[0].path.regex");
    assert!(
        err.to_string().contains("routes[1].matches[0].path.regex"),
        "{err}"
    );

    let mut m = pb::RouteMatch::default();
    m.headers.push(pb::HeaderMatcher {
        name: "x".into(),
        value: Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Regex("[".into())),
            ignore_case: false,
        }),
        invert: false,
    });
    let err = RouteTable::try_from_proto(&route_set(vec![named("h", m)])).unwrap_err();
    assert_eq!(err.field, "routes[0].matches[0].headers[0].value.regex");

    let mut fwd = forward(vec![dest("v1", 1)]);
    fwd.retry = Some(pb::RetryPolicy {
        per_try_timeout: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..Default::default()
    });
    let err = RouteTable::try_from_proto(&route_set(vec![route("r", vec![], fwd)])).unwrap_err();
    assert_eq!(err.field, "routes[0].forward.retry.per_try_timeout");
}

#[tokio::test]
async fn rewrite_and_header_modifiers_apply_in_order() {
    let mut fwd = forward(vec![pb::RouteDestination {
        request_headers: Some(pb::HeaderModifier {
            set: vec![pb::HeaderValue {
                name: "x-who".into(),
                value: "destination".into(),
            }],
            ..Default::default()
        }),
        response_headers: Some(pb::HeaderModifier {
            remove: vec!["x-upstream".into()],
            ..Default::default()
        }),
        ..dest("v1", 1)
    }]);
    fwd.rewrite = Some(pb::HttpRewrite {
        path: Some(pb::http_rewrite::Path::Prefix("/v2".into())),
        authority: "payment.internal".into(),
    });
    fwd.request_headers = Some(pb::HeaderModifier {
        set: vec![pb::HeaderValue {
            name: "x-who".into(),
            value: "route".into(),
        }],
        add: vec![pb::HeaderValue {
            name: "x-added".into(),
            value: "1".into(),
        }],
        remove: vec!["x-secret".into()],
    });
    fwd.response_headers = Some(pb::HeaderModifier {
        add: vec![pb::HeaderValue {
            name: "x-route".into(),
            value: "r".into(),
        }],
        ..Default::default()
    });
    let h = harness(
        vec![route(
            "r",
            vec![path(pb::path_match::Kind::SegmentPrefix("/api".into()))],
            fwd,
        )],
        Behaviour::Ok,
        1,
    );
    let r = h
        .send(
            Request::get("http://payment/api/orders?id=3")
                .header("x-secret", "s")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(r.headers()["x-route"], "r");
    assert!(r.headers().get("x-upstream").is_none());
    let seen = &h.fake.seen()[0];
    assert_eq!(seen.path, "/v2/orders?id=3");
    assert_eq!(seen.headers["x-who"], "destination");
    assert_eq!(seen.headers["x-added"], "1");
    assert_eq!(seen.headers["host"], "payment.internal");
    assert!(seen.headers.get("x-secret").is_none());
}

#[tokio::test]
async fn redirect_direct_response_unset_action_and_no_route() {
    let redirect = pb::Route {
        name: "redirect".into(),
        matches: vec![path(pb::path_match::Kind::Prefix("/old".into()))],
        action: Some(pb::route::Action::Redirect(pb::Redirect {
            scheme: "https".into(),
            path: Some(pb::redirect::Path::Prefix("/new".into())),
            status_code: 308,
            ..Default::default()
        })),
        ..Default::default()
    };
    let direct = pb::Route {
        name: "direct".into(),
        matches: vec![path(pb::path_match::Kind::Exact("/health".into()))],
        action: Some(pb::route::Action::DirectResponse(pb::DirectResponse {
            status: 200,
            body: b"fine".to_vec(),
        })),
        ..Default::default()
    };
    let unset = pb::Route {
        name: "unset".into(),
        matches: vec![path(pb::path_match::Kind::Exact("/broken".into()))],
        ..Default::default()
    };
    let h = harness(vec![redirect, direct, unset], Behaviour::Ok, 1);

    let r = h.get("http://payment:8080/old/a?b=1").await;
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers()["location"], "https://payment/new/a?b=1");
    let r = h.get("http://payment/health").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body_text(r).await, "fine");
    assert_eq!(
        h.get("http://payment/broken").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        h.get("http://payment/elsewhere").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.fake.calls(), 0);
}

#[tokio::test]
async fn route_ports_restrict_by_service_port() {
    let mut only_9090 = named("grpc-port", pb::RouteMatch::default());
    only_9090.ports = vec![9090];
    let h = harness(
        vec![only_9090, named("any", pb::RouteMatch::default())],
        Behaviour::Ok,
        1,
    );
    let mut r = Request::get("http://p/").body(Full::default()).unwrap();
    r.extensions_mut()
        .insert(ambit_waypoint::routes::ServicePort(8080));
    h.send(r).await;
    let mut r = Request::get("http://p/").body(Full::default()).unwrap();
    r.extensions_mut()
        .insert(ambit_waypoint::routes::ServicePort(9090));
    h.send(r).await;
    let subsets: Vec<String> = h.fake.seen().iter().map(subset_of).collect();
    assert_eq!(subsets, ["any", "grpc-port"]);
}

#[test]
fn route_table_can_be_replaced_live() {
    let handle = RouteHandle::new(RouteTable::try_from_proto(&route_set(vec![])).unwrap());
    assert!(handle.current().routes().is_empty());
    handle.replace(
        RouteTable::try_from_proto(&route_set(vec![named("a", pb::RouteMatch::default())]))
            .unwrap(),
    );
    assert_eq!(handle.current().routes().len(), 1);
}
