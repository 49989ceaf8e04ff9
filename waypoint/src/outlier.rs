//! Outlier detection (DestinationRule `outlierDetection`): passive health checking of
//! the endpoints of one cluster (a service, subset and port: Envoy's unit).
//!
//! The upstream reports the outcome of every try to the endpoint it went to
//! ([`OutlierDetector::record`]); the balancer skips the endpoints currently ejected
//! ([`OutlierDetector::eligible`], [`crate::balance::Balancer::pick_healthy`]).
//!
//! Semantics, following Envoy (which implements Istio's fields):
//! - **Counting.** A 5xx response counts towards `consecutive5xxErrors`; a 502, 503 or
//!   504 also towards `consecutiveGatewayErrors`. A gRPC status in the response
//!   headers (a trailers-only answer, how servers fail calls) counts as the HTTP status
//!   Envoy maps it to ([`grpc_to_http_status`]: UNAVAILABLE is a 503, INTERNAL a 500,
//!   NOT_FOUND a 404); a status in the trailers is not seen, as in Envoy. A failure without a response (connect
//!   failure, reset, refused stream, per-try timeout) counts towards both, as Envoy
//!   does when local-origin errors are not split out. Any other response resets both
//!   counters; a 5xx that is not a gateway error resets the gateway counter.
//! - **Ejection** happens as soon as a counter reaches its threshold (zero disables
//!   that detector), and the counter restarts whether or not the ejection was allowed.
//! - **`maxEjectionPercent`.** An ejection is allowed only if afterwards at most that
//!   share of the cluster's endpoints is ejected: `100 × (ejected + 1) ≤ max × n`
//!   (Envoy since 1.27, without `always_eject_one_host`). So Istio's default of 10 %
//!   never ejects anything in a cluster of fewer than 10 endpoints, and 50 % of 3
//!   endpoints allows one.
//! - **Ejection time** is `baseEjectionTime × m`, where `m` counts ejections: it grows
//!   by one per ejection and shrinks by one for each `interval` the endpoint then spends
//!   back in service; the product is capped at `max(300 s, baseEjectionTime)` (Envoy's
//!   default `max_ejection_time`).
//! - **Return.** Envoy un-ejects on its `interval` timer; here the sweeps are implicit
//!   at `created + k × interval`, and an endpoint returns at the first sweep at or after
//!   its ejection time has passed. Nothing runs in the background: state is brought up
//!   to date when it is read, with `tokio::time` (paused clocks work in tests).
//! - **`minHealthPercent`** is Istio's panic threshold: when fewer than that share of
//!   the endpoints are in service, all endpoints are eligible again. At Istio's default
//!   of 0 there is no panic mode: if every endpoint is ejected (possible only with
//!   `maxEjectionPercent: 100`), nothing is eligible and the request gets `503` with
//!   response flag `UH`, as Envoy answers.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use ambit_api::config::v1 as pb;
use http::StatusCode;
use tokio::time::Instant;

use crate::{
    balance::{ClusterKey, Endpoint},
    retry::TryOutcome,
    routes::ConvertError,
};

/// Envoy's default `max_ejection_time`: no ejection lasts longer (unless the base
/// ejection time itself is longer).
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Compiled [`pb::OutlierDetection`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    /// Consecutive 5xx (and failures without a response) before ejection; 0: off.
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (and failures without a response); 0: off.
    pub consecutive_gateway: u32,
    /// Sweep interval (at least 1 ms).
    pub interval: Duration,
    /// Ejection time per ejection count.
    pub base_ejection_time: Duration,
    /// Largest share of the endpoints ejected at once, 0..=100.
    pub max_ejection_percent: u32,
    /// Panic threshold, 0..=100 (0: no panic mode).
    pub min_health_percent: u32,
}

impl Default for OutlierSettings {
    /// Istio's defaults.
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

impl OutlierSettings {
    /// Compile. The controller sends effective values; absent or zero durations take
    /// Istio's defaults, percentages above 100 are read as 100, an interval below 1 ms
    /// as 1 ms.
    pub fn try_from_proto(p: &pb::OutlierDetection) -> Result<Self, ConvertError> {
        let defaults = Self::default();
        let interval = crate::routes::duration("interval", p.interval.as_ref())?
            .unwrap_or(defaults.interval)
            .max(Duration::from_millis(1));
        let base_ejection_time =
            crate::routes::duration("base_ejection_time", p.base_ejection_time.as_ref())?
                .unwrap_or(defaults.base_ejection_time);
        Ok(Self {
            consecutive_5xx: p.consecutive_5xx_errors,
            consecutive_gateway: p.consecutive_gateway_errors,
            interval,
            base_ejection_time,
            max_ejection_percent: p.max_ejection_percent.min(100),
            min_health_percent: p.min_health_percent.min(100),
        })
    }

    fn ejection_time(&self, multiplier: u32) -> Duration {
        let cap = MAX_EJECTION_TIME.max(self.base_ejection_time);
        self.base_ejection_time.saturating_mul(multiplier).min(cap)
    }
}

/// Why an endpoint was ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EjectionReason {
    /// `consecutive5xxErrors` reached.
    Consecutive5xx,
    /// `consecutiveGatewayErrors` reached.
    ConsecutiveGateway,
}

/// An ejection that just happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// The endpoint.
    pub endpoint: SocketAddr,
    /// Why.
    pub reason: EjectionReason,
    /// How long it is out (before rounding up to the next sweep).
    pub duration: Duration,
    /// When it returns (the first sweep after `duration`).
    pub until: Instant,
}

/// Per-endpoint state (Envoy's host monitor).
#[derive(Clone, Debug, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Set while ejected: when the endpoint returns (a sweep instant).
    ejected_until: Option<Instant>,
    /// Ejection-time multiplier (`eject_time_backoff`).
    multiplier: u32,
    /// When the endpoint last returned; the multiplier decays from there.
    returned_at: Option<Instant>,
}

#[derive(Debug)]
struct State {
    settings: OutlierSettings,
    /// Sweeps happen at `origin + k × interval`.
    origin: Instant,
    hosts: HashMap<SocketAddr, Host>,
}

/// The outlier detector of one cluster. Share it (`Arc`) between the upstream, which
/// records outcomes, and the balancer, which skips ejected endpoints; keep it across
/// configuration updates ([`OutlierRegistry`]) so ejections survive them.
#[derive(Debug)]
pub struct OutlierDetector {
    state: Mutex<State>,
}

impl OutlierDetector {
    /// A detector over `endpoints` with `settings`; the first sweep is one interval
    /// from now.
    pub fn new(settings: OutlierSettings, endpoints: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self {
            state: Mutex::new(State {
                settings,
                origin: Instant::now(),
                hosts: endpoints
                    .into_iter()
                    .map(|a| (a, Host::default()))
                    .collect(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update leaves the state consistent between statements.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The settings in force.
    pub fn settings(&self) -> OutlierSettings {
        self.lock().settings.clone()
    }

    /// New settings (a DestinationRule update); endpoint state is kept.
    pub fn set_settings(&self, settings: OutlierSettings) {
        self.lock().settings = settings;
    }

    /// The cluster's endpoints changed: new ones start healthy, departed ones are
    /// forgotten, the others keep their state.
    pub fn set_endpoints(&self, endpoints: impl IntoIterator<Item = SocketAddr>) {
        let mut state = self.lock();
        let mut hosts = HashMap::new();
        for addr in endpoints {
            let host = state.hosts.remove(&addr).unwrap_or_default();
            hosts.insert(addr, host);
        }
        state.hosts = hosts;
    }

    /// Records the outcome of a try to `endpoint`; returns the ejection it caused, if
    /// any. Outcomes for endpoints the detector does not know are ignored.
    pub fn record(&self, endpoint: SocketAddr, outcome: TryOutcome) -> Option<Ejection> {
        let (is_5xx, is_gateway) = match outcome {
            TryOutcome::Response { status, grpc } => {
                let status = grpc.map_or(status, grpc_to_http_status);
                (
                    status.is_server_error(),
                    matches!(
                        status,
                        StatusCode::BAD_GATEWAY
                            | StatusCode::SERVICE_UNAVAILABLE
                            | StatusCode::GATEWAY_TIMEOUT
                    ),
                )
            }
            TryOutcome::Failed(_) | TryOutcome::TimedOut => (true, true),
        };
        let now = Instant::now();
        let mut state = self.lock();
        let State {
            settings,
            origin,
            hosts,
        } = &mut *state;
        for host in hosts.values_mut() {
            host.refresh(now);
        }
        let ejected = hosts.values().filter(|h| h.ejected_until.is_some()).count();
        let total = hosts.len();
        let host = hosts.get_mut(&endpoint)?;
        if host.ejected_until.is_some() {
            // Requests already in flight when it was ejected: nothing more to learn.
            return None;
        }
        let mut reason = None;
        if is_5xx {
            if is_gateway {
                host.consecutive_gateway += 1;
                if settings.consecutive_gateway > 0
                    && host.consecutive_gateway >= settings.consecutive_gateway
                {
                    host.consecutive_gateway = 0;
                    reason = Some(EjectionReason::ConsecutiveGateway);
                }
            } else {
                host.consecutive_gateway = 0;
            }
            host.consecutive_5xx += 1;
            if settings.consecutive_5xx > 0 && host.consecutive_5xx >= settings.consecutive_5xx {
                host.consecutive_5xx = 0;
                reason.get_or_insert(EjectionReason::Consecutive5xx);
            }
        } else {
            host.consecutive_5xx = 0;
            host.consecutive_gateway = 0;
        }
        let reason = reason?;
        let max = u64::from(settings.max_ejection_percent);
        if 100 * (ejected as u64 + 1) > max * total as u64 {
            tracing::debug!(
                target: "outlier",
                %endpoint, ?reason, ejected, total,
                max_ejection_percent = settings.max_ejection_percent,
                "not ejected: maxEjectionPercent reached"
            );
            return None;
        }
        let decay = host
            .returned_at
            .map_or(0, |r| sweeps_between(*origin, settings.interval, r, now));
        host.multiplier = host.multiplier.saturating_sub(decay).saturating_add(1);
        host.returned_at = None;
        let duration = settings.ejection_time(host.multiplier);
        let until = next_sweep(*origin, settings.interval, now + duration);
        host.ejected_until = Some(until);
        tracing::info!(
            target: "outlier",
            %endpoint, ?reason, ejection_time_ms = duration.as_millis() as u64,
            times = host.multiplier,
            "endpoint ejected"
        );
        Some(Ejection {
            endpoint,
            reason,
            duration,
            until,
        })
    }

    /// Whether `endpoint` is ejected now.
    pub fn is_ejected(&self, endpoint: SocketAddr) -> bool {
        let now = Instant::now();
        self.lock()
            .hosts
            .get_mut(&endpoint)
            .is_some_and(|h| h.refresh(now))
    }

    /// How many endpoints are ejected now.
    pub fn ejected_count(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .hosts
            .values_mut()
            .map(|h| h.refresh(now))
            .filter(|ejected| *ejected)
            .count()
    }

    /// Which of `endpoints` the balancer may choose (same order): those not ejected,
    /// or all of them in panic mode (fewer than `minHealthPercent` in service).
    /// Endpoints the detector does not know are eligible.
    pub fn eligible(&self, endpoints: &[Endpoint]) -> Vec<bool> {
        let now = Instant::now();
        let mut state = self.lock();
        let min_health = u64::from(state.settings.min_health_percent);
        let mask: Vec<bool> = endpoints
            .iter()
            .map(|e| !state.hosts.get_mut(&e.addr).is_some_and(|h| h.refresh(now)))
            .collect();
        let healthy = mask.iter().filter(|ok| **ok).count() as u64;
        if 100 * healthy < min_health * endpoints.len() as u64 {
            return vec![true; endpoints.len()];
        }
        mask
    }
}

impl Host {
    /// Brings the ejection up to date; true while ejected.
    fn refresh(&mut self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if until <= now => {
                self.ejected_until = None;
                self.returned_at = Some(until);
                false
            }
            Some(_) => true,
            None => false,
        }
    }
}

/// The HTTP status a gRPC status code stands for, as Envoy maps it
/// (`Grpc::Utility::grpcToHttpStatus`) when it reports a gRPC answer to outlier
/// detection; unknown codes are 500.
pub fn grpc_to_http_status(code: u32) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        // CANCELLED: 499, "client closed request" (nginx's); no constant for it.
        1 => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        3 | 9 | 11 => StatusCode::BAD_REQUEST,
        4 => StatusCode::GATEWAY_TIMEOUT,
        5 => StatusCode::NOT_FOUND,
        6 | 10 => StatusCode::CONFLICT,
        7 => StatusCode::FORBIDDEN,
        8 => StatusCode::TOO_MANY_REQUESTS,
        12 => StatusCode::NOT_IMPLEMENTED,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        16 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The first sweep instant at or after `t`.
fn next_sweep(origin: Instant, interval: Duration, t: Instant) -> Instant {
    let since = t.saturating_duration_since(origin).as_nanos();
    let step = interval.as_nanos().max(1);
    let k = since.div_ceil(step);
    origin + nanos(k * step)
}

/// Sweeps in `(from, to]`.
fn sweeps_between(origin: Instant, interval: Duration, from: Instant, to: Instant) -> u32 {
    let step = interval.as_nanos().max(1);
    let index = |t: Instant| t.saturating_duration_since(origin).as_nanos() / step;
    u32::try_from(index(to).saturating_sub(index(from))).unwrap_or(u32::MAX)
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

/// The detectors of every cluster, kept across configuration snapshots.
#[derive(Clone, Debug, Default)]
pub struct OutlierRegistry(Arc<Mutex<HashMap<ClusterKey, Arc<OutlierDetector>>>>);

impl OutlierRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The detector of `cluster` with `settings` over `endpoints`, created on first
    /// use; an existing one takes the new settings and endpoint list and keeps its
    /// state. `None` (no `outlierDetection`) forgets the cluster's detector.
    pub fn detector(
        &self,
        cluster: &ClusterKey,
        settings: Option<&OutlierSettings>,
        endpoints: &[Endpoint],
    ) -> Option<Arc<OutlierDetector>> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(settings) = settings else {
            map.remove(cluster);
            return None;
        };
        let addrs = endpoints.iter().map(|e| e.addr);
        let detector = match map.get(cluster) {
            Some(d) => {
                if d.settings() != *settings {
                    d.set_settings(settings.clone());
                }
                d.set_endpoints(addrs);
                d.clone()
            }
            None => {
                let d = Arc::new(OutlierDetector::new(settings.clone(), addrs));
                map.insert(cluster.clone(), d.clone());
                d
            }
        };
        Some(detector)
    }

    /// Forgets clusters `keep` rejects (e.g. services no longer configured).
    pub fn retain(&self, mut keep: impl FnMut(&ClusterKey) -> bool) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::time::advance;

    use super::*;
    use crate::retry::FailureKind;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 244, 1, i], 8080))
    }

    fn endpoints(n: u8) -> Vec<Endpoint> {
        (1..=n)
            .map(|i| Endpoint {
                addr: addr(i),
                labels: BTreeMap::new(),
            })
            .collect()
    }

    fn status(code: u16) -> TryOutcome {
        TryOutcome::Response {
            status: StatusCode::from_u16(code).unwrap(),
            grpc: None,
        }
    }

    fn settings() -> OutlierSettings {
        OutlierSettings {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 100,
            min_health_percent: 0,
        }
    }

    fn detector(s: OutlierSettings, n: u8) -> OutlierDetector {
        OutlierDetector::new(s, endpoints(n).iter().map(|e| e.addr))
    }

    fn fail(d: &OutlierDetector, i: u8, times: u32) -> Option<Ejection> {
        (0..times)
            .filter_map(|_| d.record(addr(i), status(500)))
            .last()
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_ejects_and_returns_after_base_ejection_time() {
        let d = detector(settings(), 2);
        assert!(fail(&d, 1, 2).is_none());
        assert!(!d.is_ejected(addr(1)));
        let e = fail(&d, 1, 1).unwrap();
        assert_eq!(e.reason, EjectionReason::Consecutive5xx);
        assert_eq!(e.duration, Duration::from_secs(30));
        assert!(d.is_ejected(addr(1)));
        assert!(!d.is_ejected(addr(2)));
        assert_eq!(d.eligible(&endpoints(2)), [false, true]);

        advance(Duration::from_millis(29_999)).await;
        assert!(d.is_ejected(addr(1)));
        advance(Duration::from_millis(1)).await;
        assert!(!d.is_ejected(addr(1)));
        assert_eq!(d.eligible(&endpoints(2)), [true, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn grpc_statuses_count_as_envoy_maps_them() {
        let grpc = |code| TryOutcome::Response {
            status: StatusCode::OK,
            grpc: Some(code),
        };
        let s = OutlierSettings {
            consecutive_gateway: 3,
            consecutive_5xx: 0,
            ..settings()
        };
        let d = detector(s, 2);
        // UNAVAILABLE is a 503 (a gateway error) although the HTTP status is 200.
        assert!(d.record(addr(1), grpc(14)).is_none());
        assert!(d.record(addr(1), grpc(14)).is_none());
        let e = d.record(addr(1), grpc(14)).unwrap();
        assert_eq!(e.reason, EjectionReason::ConsecutiveGateway);
        // OK and NOT_FOUND (a 404) reset the count; INTERNAL (a 500) is not a
        // gateway error.
        for reset in [0, 5, 13] {
            assert!(d.record(addr(2), grpc(14)).is_none());
            assert!(d.record(addr(2), grpc(14)).is_none());
            assert!(d.record(addr(2), grpc(reset)).is_none());
        }
        assert!(!d.is_ejected(addr(2)));
        assert_eq!(grpc_to_http_status(1).as_u16(), 499);
        assert_eq!(grpc_to_http_status(16), StatusCode::UNAUTHORIZED);
        assert_eq!(grpc_to_http_status(99), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let d = detector(settings(), 1);
        for _ in 0..5 {
            assert!(fail(&d, 1, 2).is_none());
            assert!(d.record(addr(1), status(200)).is_none());
        }
        // 4xx are not errors either.
        assert!(fail(&d, 1, 2).is_none());
        assert!(d.record(addr(1), status(404)).is_none());
        assert!(fail(&d, 1, 2).is_none());
        assert!(!d.is_ejected(addr(1)));
        // Failures without a response count as 5xx.
        assert!(
            d.record(addr(1), TryOutcome::Failed(FailureKind::ConnectFailure))
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_have_their_own_threshold() {
        let s = OutlierSettings {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            ..settings()
        };
        let d = detector(s, 4);
        // 500 is not a gateway error and resets the gateway count.
        for _ in 0..10 {
            assert!(d.record(addr(1), status(500)).is_none());
        }
        assert!(d.record(addr(1), status(503)).is_none());
        assert!(d.record(addr(1), status(500)).is_none());
        assert!(d.record(addr(1), status(502)).is_none());
        let e = d.record(addr(1), status(504)).unwrap();
        assert_eq!(e.reason, EjectionReason::ConsecutiveGateway);
        assert!(d.record(addr(2), TryOutcome::TimedOut).is_none());
        let e = d
            .record(addr(2), TryOutcome::Failed(FailureKind::ConnectFailure))
            .unwrap();
        assert_eq!(e.reason, EjectionReason::ConsecutiveGateway);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_repeated_ejections_and_decays() {
        let d = detector(settings(), 1);
        let first = fail(&d, 1, 3).unwrap();
        assert_eq!(first.duration, Duration::from_secs(30));
        advance(Duration::from_secs(30)).await;
        assert!(!d.is_ejected(addr(1)));
        let second = fail(&d, 1, 3).unwrap();
        assert_eq!(second.duration, Duration::from_secs(60));
        advance(Duration::from_secs(59)).await;
        assert!(d.is_ejected(addr(1)));
        advance(Duration::from_secs(1)).await;
        assert!(!d.is_ejected(addr(1)));
        let third = fail(&d, 1, 3).unwrap();
        assert_eq!(third.duration, Duration::from_secs(90));
        advance(Duration::from_secs(90)).await;
        // Back in service for 2 intervals: the multiplier drops from 3 to 1, so the
        // next ejection lasts 2 × base.
        advance(Duration::from_secs(2)).await;
        let fourth = fail(&d, 1, 3).unwrap();
        assert_eq!(fourth.duration, Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_is_capped() {
        let d = detector(settings(), 1);
        let mut last = Duration::ZERO;
        for _ in 0..15 {
            let e = fail(&d, 1, 3).unwrap();
            last = e.duration;
            advance(e.duration).await;
        }
        assert_eq!(last, MAX_EJECTION_TIME);
    }

    #[tokio::test(start_paused = true)]
    async fn returns_at_the_sweep_after_the_ejection_time() {
        let s = OutlierSettings {
            interval: Duration::from_secs(10),
            ..settings()
        };
        let d = detector(s, 1);
        advance(Duration::from_secs(3)).await;
        let e = fail(&d, 1, 3).unwrap();
        // Ejected at 3 s for 30 s: back at the sweep at 40 s.
        assert_eq!(e.until, Instant::now() + Duration::from_secs(37));
        advance(Duration::from_secs(36)).await;
        assert!(d.is_ejected(addr(1)), "39 s");
        advance(Duration::from_secs(1)).await;
        assert!(!d.is_ejected(addr(1)), "40 s");
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_max_ejection_percent() {
        // 50 % of 5 endpoints: 2 may be out (3 would be 60 %).
        let s = OutlierSettings {
            max_ejection_percent: 50,
            ..settings()
        };
        let d = detector(s, 5);
        for i in 1..=5 {
            fail(&d, i, 3);
        }
        assert_eq!(d.ejected_count(), 2);
        assert_eq!(d.eligible(&endpoints(5)), [false, false, true, true, true]);
        // Once one returns, the next failing endpoint can go.
        advance(Duration::from_secs(30)).await;
        assert_eq!(d.ejected_count(), 0);
        fail(&d, 3, 3);
        fail(&d, 4, 3);
        fail(&d, 5, 3);
        assert_eq!(d.ejected_count(), 2);
        assert!(d.is_ejected(addr(3)) && d.is_ejected(addr(4)));
        assert!(!d.is_ejected(addr(5)));

        // Istio's default 10 % of fewer than 10 endpoints: nothing is ever ejected.
        let d = detector(
            OutlierSettings {
                max_ejection_percent: 10,
                ..settings()
            },
            9,
        );
        assert!(fail(&d, 1, 10).is_none());
        assert_eq!(d.ejected_count(), 0);
        let d = detector(
            OutlierSettings {
                max_ejection_percent: 10,
                ..settings()
            },
            10,
        );
        assert!(fail(&d, 1, 3).is_some());
        assert!(fail(&d, 2, 3).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn all_ejected_leaves_nothing_unless_in_panic_mode() {
        let d = detector(settings(), 2);
        fail(&d, 1, 3);
        fail(&d, 2, 3);
        assert_eq!(d.eligible(&endpoints(2)), [false, false]);

        let d = detector(
            OutlierSettings {
                min_health_percent: 50,
                ..settings()
            },
            4,
        );
        fail(&d, 1, 3);
        fail(&d, 2, 3);
        // Half in service: not below 50 %.
        assert_eq!(d.eligible(&endpoints(4)), [false, false, true, true]);
        fail(&d, 3, 3);
        // 25 % in service: panic, everything is eligible.
        assert_eq!(d.eligible(&endpoints(4)), [true; 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn membership_changes_keep_state() {
        let d = detector(settings(), 2);
        fail(&d, 1, 3);
        d.set_endpoints([addr(1), addr(3)]);
        assert!(d.is_ejected(addr(1)));
        assert!(d.record(addr(2), status(500)).is_none());
        assert!(!d.is_ejected(addr(2)));
        // Unknown endpoints are eligible.
        assert_eq!(d.eligible(&endpoints(2)), [false, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn registry_keeps_detectors_across_snapshots() {
        let reg = OutlierRegistry::new();
        let key = ClusterKey::new("production", "payment", None, Some(8080));
        let eps = endpoints(2);
        let d = reg.detector(&key, Some(&settings()), &eps).unwrap();
        fail(&d, 1, 3);
        let again = reg.detector(&key, Some(&settings()), &eps).unwrap();
        assert!(Arc::ptr_eq(&d, &again));
        assert!(again.is_ejected(addr(1)));
        let other = reg
            .detector(
                &ClusterKey::new("production", "payment", Some("v1"), Some(8080)),
                Some(&settings()),
                &eps,
            )
            .unwrap();
        assert!(!other.is_ejected(addr(1)));
        assert!(reg.detector(&key, None, &eps).is_none());
        let fresh = reg.detector(&key, Some(&settings()), &eps).unwrap();
        assert!(!fresh.is_ejected(addr(1)));
    }

    #[test]
    fn from_proto() {
        let p = pb::OutlierDetection {
            consecutive_5xx_errors: 7,
            consecutive_gateway_errors: 2,
            interval: Some(prost_types::Duration {
                seconds: 0,
                nanos: 1_000,
            }),
            base_ejection_time: None,
            max_ejection_percent: 250,
            min_health_percent: 30,
        };
        let s = OutlierSettings::try_from_proto(&p).unwrap();
        assert_eq!(s.consecutive_5xx, 7);
        assert_eq!(s.consecutive_gateway, 2);
        assert_eq!(s.interval, Duration::from_millis(1));
        assert_eq!(s.base_ejection_time, Duration::from_secs(30));
        assert_eq!(s.max_ejection_percent, 100);
        assert_eq!(s.min_health_percent, 30);
        let bad = pb::OutlierDetection {
            base_ejection_time: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..p
        };
        let e = OutlierSettings::try_from_proto(&bad).unwrap_err();
        assert_eq!(e.field, "base_ejection_time");
    }
}
