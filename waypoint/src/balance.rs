//! Choosing where a request goes: the weighted split between a route's destinations,
//! a DestinationPolicy subset's endpoints, and one endpoint by the load balancer.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use ambit_api::config::v1 as pb;
use http::{HeaderMap, HeaderName};

use crate::{
    outlier::OutlierDetector,
    outlier::OutlierSettings,
    pool::PoolLimits,
    rng::SharedRng,
    routes::{ConvertError, Invalid, RouteDestination},
};

/// Pick one destination with probability proportional to its weight. `None` when all
/// weights are zero (or there are none): the route answers 500.
pub fn pick_weighted<'a>(
    destinations: &'a [RouteDestination],
    rng: &SharedRng,
) -> Option<&'a RouteDestination> {
    let total: u64 = destinations.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.below(total);
    destinations.iter().find(|d| {
        let w = u64::from(d.weight);
        if ticket < w {
            true
        } else {
            ticket -= w;
            false
        }
    })
}

/// One endpoint of a service, with its workload's labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Workload labels (subset selection).
    pub labels: BTreeMap<String, String>,
}

/// A subset the route names but the DestinationPolicy does not define.
#[derive(Debug, thiserror::Error)]
#[error("unknown subset {0:?}")]
pub struct UnknownSubset(pub String);

/// How to choose among endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    /// Rotate through the endpoints.
    RoundRobin,
    /// Power of two random choices, fewer outstanding requests wins.
    LeastRequest,
    /// Uniformly random.
    Random,
    /// Ring hash on a request attribute; requests without it are round robin.
    RingHash {
        /// What to hash.
        key: HashKey,
        /// Minimum virtual nodes on the ring.
        min_ring_size: usize,
    },
}

/// The request attribute a consistent hash uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// A request header.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// The client's source IP.
    SourceIp,
    /// A query parameter.
    QueryParameter(String),
}

/// One upstream cluster in Envoy's sense: a service's endpoints on one port, possibly
/// narrowed to a subset. Connection-pool limits and outlier detection apply per
/// cluster ([`crate::pool`], [`crate::outlier`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterKey {
    /// Namespace of the service.
    pub namespace: String,
    /// Name of the service.
    pub service: String,
    /// DestinationPolicy subset; `None`: all endpoints.
    pub subset: Option<String>,
    /// Service port; `None` when not known.
    pub port: Option<u16>,
}

impl ClusterKey {
    /// The cluster of `service`'s `subset` on `port`.
    pub fn new(namespace: &str, service: &str, subset: Option<&str>, port: Option<u16>) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            subset: subset.map(str::to_owned),
            port,
        }
    }
}

/// Compiled [`pb::DestinationPolicy`]: subsets, load balancing, connection-pool limits
/// and outlier detection, each with Istio's precedence (subset port, subset, policy
/// port, policy; a group set at a more specific level replaces the whole group).
#[derive(Clone, Debug, Default)]
pub struct DestinationRules {
    policy: TrafficLb,
    subsets: Vec<SubsetRules>,
}

#[derive(Clone, Debug)]
struct SubsetRules {
    name: String,
    labels: BTreeMap<String, String>,
    policy: TrafficLb,
}

/// Settings of one traffic policy: defaults and per port, group by group.
#[derive(Clone, Debug, Default)]
struct TrafficLb {
    default: Option<LbPolicy>,
    ports: Vec<(u16, LbPolicy)>,
    pool: Option<PoolLimits>,
    pool_ports: Vec<(u16, PoolLimits)>,
    outlier: Option<OutlierSettings>,
    outlier_ports: Vec<(u16, OutlierSettings)>,
}

impl DestinationRules {
    /// Compile; errors name the field.
    pub fn try_from_proto(p: &pb::DestinationPolicy) -> Result<Self, ConvertError> {
        let policy = TrafficLb::try_from_proto(p.traffic_policy.as_ref())
            .map_err(|e| e.within("traffic_policy"))?;
        let subsets = p
            .subsets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Ok(SubsetRules {
                    name: s.name.clone(),
                    labels: s
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    policy: TrafficLb::try_from_proto(s.traffic_policy.as_ref())
                        .map_err(|e| e.within(&format!("subsets[{i}].traffic_policy")))?,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        Ok(Self { policy, subsets })
    }

    /// The endpoints of `subset` (all of them for `None`).
    pub fn endpoints(
        &self,
        subset: Option<&str>,
        all: &[Endpoint],
    ) -> Result<Vec<Endpoint>, UnknownSubset> {
        let Some(name) = subset else {
            return Ok(all.to_vec());
        };
        let rules = self.subset(name)?;
        Ok(all
            .iter()
            .filter(|e| rules.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
            .cloned()
            .collect())
    }

    /// The load balancer for `subset` on `port`: the most specific setting wins
    /// (subset port, subset, policy port, policy), round robin by default.
    pub fn load_balancer(
        &self,
        subset: Option<&str>,
        port: Option<u16>,
    ) -> Result<LbPolicy, UnknownSubset> {
        Ok(self
            .most_specific(subset, port, |t| (&t.default, &t.ports))?
            .unwrap_or(LbPolicy::RoundRobin))
    }

    /// The connection-pool limits for `subset` on `port`; `None`: no limits.
    pub fn connection_pool(
        &self,
        subset: Option<&str>,
        port: Option<u16>,
    ) -> Result<Option<PoolLimits>, UnknownSubset> {
        self.most_specific(subset, port, |t| (&t.pool, &t.pool_ports))
    }

    /// The outlier detection for `subset` on `port`; `None`: no ejection.
    pub fn outlier_detection(
        &self,
        subset: Option<&str>,
        port: Option<u16>,
    ) -> Result<Option<OutlierSettings>, UnknownSubset> {
        self.most_specific(subset, port, |t| (&t.outlier, &t.outlier_ports))
    }

    /// The most specific setting of one group: subset port, subset, policy port,
    /// policy.
    fn most_specific<T: Clone>(
        &self,
        subset: Option<&str>,
        port: Option<u16>,
        group: impl Fn(&TrafficLb) -> (&Option<T>, &Vec<(u16, T)>),
    ) -> Result<Option<T>, UnknownSubset> {
        let subset = subset.map(|s| self.subset(s)).transpose()?;
        let from = |t: &TrafficLb| {
            let (default, ports) = group(t);
            port.and_then(|p| ports.iter().find(|(q, _)| *q == p).map(|(_, v)| v.clone()))
                .or_else(|| default.clone())
        };
        Ok(subset
            .and_then(|s| from(&s.policy))
            .or_else(|| from(&self.policy)))
    }

    fn subset(&self, name: &str) -> Result<&SubsetRules, UnknownSubset> {
        self.subsets
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| UnknownSubset(name.to_owned()))
    }
}

impl TrafficLb {
    fn try_from_proto(t: Option<&pb::TrafficPolicy>) -> Result<Self, ConvertError> {
        let Some(t) = t else {
            return Ok(Self::default());
        };
        let default =
            lb_from_proto(t.load_balancer.as_ref()).map_err(|e| e.within("load_balancer"))?;
        let pool = pool_from_proto(t.connection_pool.as_ref(), "connection_pool")?;
        let outlier = outlier_from_proto(t.outlier_detection.as_ref(), "outlier_detection")?;
        let mut out = Self {
            default,
            pool,
            outlier,
            ..Self::default()
        };
        for (i, p) in t.port_policies.iter().enumerate() {
            let field = format!("port_policies[{i}]");
            let port = u16::try_from(p.port)
                .map_err(|_| ConvertError::new(format!("{field}.port"), Invalid::Port(p.port)))?;
            if let Some(lb) = lb_from_proto(p.load_balancer.as_ref())
                .map_err(|e| e.within(&format!("{field}.load_balancer")))?
            {
                out.ports.push((port, lb));
            }
            if let Some(pool) = pool_from_proto(
                p.connection_pool.as_ref(),
                &format!("{field}.connection_pool"),
            )? {
                out.pool_ports.push((port, pool));
            }
            if let Some(o) = outlier_from_proto(
                p.outlier_detection.as_ref(),
                &format!("{field}.outlier_detection"),
            )? {
                out.outlier_ports.push((port, o));
            }
        }
        Ok(out)
    }
}

fn pool_from_proto(
    p: Option<&pb::ConnectionPool>,
    field: &str,
) -> Result<Option<PoolLimits>, ConvertError> {
    p.map(|p| PoolLimits::try_from_proto(p).map_err(|e| e.within(field)))
        .transpose()
}

fn outlier_from_proto(
    o: Option<&pb::OutlierDetection>,
    field: &str,
) -> Result<Option<OutlierSettings>, ConvertError> {
    o.map(|o| OutlierSettings::try_from_proto(o).map_err(|e| e.within(field)))
        .transpose()
}

fn lb_from_proto(lb: Option<&pb::LoadBalancer>) -> Result<Option<LbPolicy>, ConvertError> {
    use pb::{consistent_hash::Key, load_balancer::Kind};
    let Some(kind) = lb.and_then(|l| l.kind.as_ref()) else {
        return Ok(None);
    };
    Ok(Some(match kind {
        Kind::Simple(s) => match pb::SimpleLb::try_from(*s) {
            Ok(pb::SimpleLb::LeastRequest) => LbPolicy::LeastRequest,
            Ok(pb::SimpleLb::Random) => LbPolicy::Random,
            // Unknown values (a newer controller) fall back to the default.
            _ => LbPolicy::RoundRobin,
        },
        Kind::ConsistentHash(ch) => {
            let key = match &ch.key {
                None => return Ok(Some(LbPolicy::RoundRobin)),
                Some(Key::HttpHeader(h)) => HashKey::Header(
                    HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|e| {
                        ConvertError::new("consistent_hash.http_header", Invalid::HeaderName(e))
                    })?,
                ),
                Some(Key::HttpCookie(c)) => HashKey::Cookie(c.name.clone()),
                Some(Key::SourceIp(_)) => HashKey::SourceIp,
                Some(Key::HttpQueryParameter(q)) => HashKey::QueryParameter(q.clone()),
            };
            let min_ring_size = match ch.minimum_ring_size {
                0 => 1024,
                n => usize::try_from(n.min(1 << 23)).unwrap_or(1 << 23),
            };
            LbPolicy::RingHash { key, min_ring_size }
        }
    }))
}

/// What the load balancer may look at in a request.
#[derive(Clone, Copy, Debug)]
pub struct PickContext<'a> {
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// The client's address.
    pub source_ip: Option<IpAddr>,
}

impl<'a> PickContext<'a> {
    /// From a request and the client's address.
    pub fn from_request<B>(request: &'a http::Request<B>, source_ip: Option<IpAddr>) -> Self {
        Self {
            headers: request.headers(),
            query: request.uri().query(),
            source_ip,
        }
    }
}

/// A load balancer over a fixed endpoint list (rebuilt when endpoints change).
#[derive(Debug)]
pub struct Balancer {
    policy: LbPolicy,
    endpoints: Vec<Endpoint>,
    in_flight: Vec<Arc<AtomicUsize>>,
    next: AtomicUsize,
    ring: Vec<(u64, usize)>,
    rng: SharedRng,
}

/// A chosen endpoint; counts as an outstanding request until dropped.
#[derive(Debug)]
pub struct Picked<'a> {
    /// The endpoint.
    pub endpoint: &'a Endpoint,
    /// Its index in the balancer's list.
    pub index: usize,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Picked<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// Balance over `endpoints` with `policy`.
    pub fn new(policy: LbPolicy, endpoints: Vec<Endpoint>, rng: SharedRng) -> Self {
        let ring = match &policy {
            LbPolicy::RingHash { min_ring_size, .. } if !endpoints.is_empty() => {
                let per = min_ring_size.div_ceil(endpoints.len()).max(1);
                let mut ring: Vec<(u64, usize)> = endpoints
                    .iter()
                    .enumerate()
                    .flat_map(|(i, e)| {
                        (0..per).map(move |v| (hash(format!("{}_{v}", e.addr).as_bytes()), i))
                    })
                    .collect();
                ring.sort_unstable();
                ring
            }
            _ => Vec::new(),
        };
        Self {
            in_flight: endpoints
                .iter()
                .map(|_| Arc::new(AtomicUsize::new(0)))
                .collect(),
            policy,
            endpoints,
            next: AtomicUsize::new(0),
            ring,
            rng,
        }
    }

    /// The endpoints balanced over.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Choose an endpoint; `None` when there are none.
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Picked<'_>> {
        self.pick_from(ctx, None)
    }

    /// Choose among the endpoints `eligible` marks (indexed like
    /// [`Balancer::endpoints`]; missing entries count as eligible); `None` when none
    /// is. Round robin rotates over the eligible endpoints, random and least-request
    /// draw among them, a ring hash walks on from the key's point to the next eligible
    /// endpoint.
    pub fn pick_eligible(&self, ctx: &PickContext<'_>, eligible: &[bool]) -> Option<Picked<'_>> {
        self.pick_from(ctx, Some(eligible))
    }

    /// Choose among the endpoints `detector` has not ejected (all of them in its
    /// panic mode); `None` when every endpoint is ejected: answer `503` with response
    /// flag `UH`.
    pub fn pick_healthy(
        &self,
        ctx: &PickContext<'_>,
        detector: &OutlierDetector,
    ) -> Option<Picked<'_>> {
        let eligible = detector.eligible(&self.endpoints);
        self.pick_from(ctx, Some(&eligible))
    }

    fn pick_from(&self, ctx: &PickContext<'_>, eligible: Option<&[bool]>) -> Option<Picked<'_>> {
        let n = self.endpoints.len();
        // A mask that excludes nothing is no mask: the common case stays O(1).
        let eligible = eligible.filter(|m| m.iter().take(n).any(|ok| !ok));
        let ok = |i: usize| eligible.is_none_or(|m| m.get(i).copied().unwrap_or(true));
        let count = match eligible {
            None => n,
            Some(_) => (0..n).filter(|&i| ok(i)).count(),
        };
        if count == 0 {
            return None;
        }
        // The `k`-th eligible endpoint (`k < count`).
        let nth = |k: usize| match eligible {
            None => k,
            Some(_) => (0..n).filter(|&i| ok(i)).nth(k).unwrap_or(0),
        };
        let index = match &self.policy {
            LbPolicy::RoundRobin => nth(self.round_robin(count)),
            LbPolicy::Random => nth(self.random(count)),
            LbPolicy::LeastRequest => {
                let a = nth(self.random(count));
                let b = nth(self.random(count));
                let load = |i: usize| self.in_flight[i].load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
            LbPolicy::RingHash { key, .. } => match hash_input(key, ctx) {
                Some(input) => self.ring_lookup(hash(input.as_bytes()), ok),
                None => nth(self.round_robin(count)),
            },
        };
        let in_flight = self.in_flight[index].clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            endpoint: &self.endpoints[index],
            index,
            in_flight,
        })
    }

    fn round_robin(&self, count: usize) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % count
    }

    fn random(&self, count: usize) -> usize {
        usize::try_from(self.rng.below(count as u64)).unwrap_or(0) % count
    }

    /// The first eligible endpoint on the ring at or after `h` (wrapping).
    fn ring_lookup(&self, h: u64, ok: impl Fn(usize) -> bool) -> usize {
        let at = self.ring.partition_point(|(k, _)| *k < h);
        self.ring[at..]
            .iter()
            .chain(&self.ring[..at])
            .map(|(_, i)| *i)
            .find(|i| ok(*i))
            .unwrap_or(0)
    }
}

fn hash_input(key: &HashKey, ctx: &PickContext<'_>) -> Option<String> {
    match key {
        HashKey::Header(name) => {
            let v: Vec<&str> = ctx
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!v.is_empty()).then(|| v.join(","))
        }
        HashKey::Cookie(name) => ctx
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_owned()),
        HashKey::SourceIp => ctx.source_ip.map(|ip| ip.to_string()),
        HashKey::QueryParameter(name) => ctx
            .query
            .and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k == name)
            })
            .map(|(_, v)| v.to_owned()),
    }
}

/// FNV-1a with a splitmix64 finalizer: stable across processes and releases, so
/// every waypoint replica hashes a key to the same endpoint.
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, time::Duration};

    use super::*;
    use crate::{outlier::OutlierDetector, retry::TryOutcome};

    fn ep(i: u8, version: &str) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, i], 8080)),
            labels: BTreeMap::from([("version".to_owned(), version.to_owned())]),
        }
    }

    fn endpoints() -> Vec<Endpoint> {
        vec![ep(1, "v1"), ep(2, "v1"), ep(3, "v2"), ep(4, "v1")]
    }

    fn ctx(headers: &HeaderMap) -> PickContext<'_> {
        PickContext {
            headers,
            query: None,
            source_ip: None,
        }
    }

    fn picks(b: &Balancer, eligible: &[bool], n: usize) -> Vec<usize> {
        let h = HeaderMap::new();
        (0..n)
            .map(|_| b.pick_eligible(&ctx(&h), eligible).unwrap().index)
            .collect()
    }

    #[test]
    fn every_policy_skips_ineligible_endpoints() {
        let mask = [true, false, true, false];
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
            LbPolicy::RingHash {
                key: HashKey::Header(HeaderName::from_static("x-user")),
                min_ring_size: 64,
            },
        ] {
            let b = Balancer::new(policy.clone(), endpoints(), SharedRng::seeded(7));
            let chosen: HashSet<usize> = picks(&b, &mask, 200).into_iter().collect();
            assert!(
                chosen.is_subset(&HashSet::from([0, 2])),
                "{policy:?}: {chosen:?}"
            );
            // Keyed ring-hash requests move on to an eligible endpoint too.
            let mut h = HeaderMap::new();
            for user in 0..50 {
                h.insert("x-user", user.to_string().parse().unwrap());
                let i = b.pick_eligible(&ctx(&h), &mask).unwrap().index;
                assert!(mask[i], "{policy:?}");
            }
            assert!(b.pick_eligible(&ctx(&h), &[false; 4]).is_none());
        }
    }

    #[test]
    fn round_robin_rotates_evenly_over_eligible_endpoints() {
        let b = Balancer::new(LbPolicy::RoundRobin, endpoints(), SharedRng::seeded(1));
        assert_eq!(picks(&b, &[true, false, true, true], 6), [0, 2, 3, 0, 2, 3]);
        // Without a mask (or with a short one) everything is eligible.
        let b = Balancer::new(LbPolicy::RoundRobin, endpoints(), SharedRng::seeded(1));
        let h = HeaderMap::new();
        let plain: Vec<usize> = (0..4).map(|_| b.pick(&ctx(&h)).unwrap().index).collect();
        assert_eq!(plain, [0, 1, 2, 3]);
        assert_eq!(picks(&b, &[], 4), [0, 1, 2, 3]);
    }

    #[test]
    fn ring_hash_keeps_keys_of_healthy_endpoints_in_place() {
        let b = Balancer::new(
            LbPolicy::RingHash {
                key: HashKey::Header(HeaderName::from_static("x-user")),
                min_ring_size: 1024,
            },
            endpoints(),
            SharedRng::seeded(1),
        );
        let mut h = HeaderMap::new();
        for user in 0..100 {
            h.insert("x-user", user.to_string().parse().unwrap());
            let all = b.pick(&ctx(&h)).unwrap().index;
            let without_2 = b
                .pick_eligible(&ctx(&h), &[true, true, false, true])
                .unwrap()
                .index;
            if all != 2 {
                assert_eq!(all, without_2, "user {user} moved");
            } else {
                assert_ne!(without_2, 2);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pick_healthy_skips_ejected_endpoints_until_they_return() {
        let eps = endpoints();
        let b = Balancer::new(LbPolicy::RoundRobin, eps.clone(), SharedRng::seeded(1));
        let settings = OutlierSettings {
            consecutive_5xx: 1,
            base_ejection_time: Duration::from_secs(30),
            interval: Duration::from_secs(1),
            max_ejection_percent: 50,
            ..OutlierSettings::default()
        };
        let d = OutlierDetector::new(settings, eps.iter().map(|e| e.addr));
        let fail = TryOutcome::Response {
            status: http::StatusCode::INTERNAL_SERVER_ERROR,
            grpc: None,
        };
        assert!(d.record(eps[1].addr, fail).is_some());
        let h = HeaderMap::new();
        let chosen: HashSet<usize> = (0..12)
            .map(|_| b.pick_healthy(&ctx(&h), &d).unwrap().index)
            .collect();
        assert_eq!(chosen, HashSet::from([0, 2, 3]));
        tokio::time::advance(Duration::from_secs(30)).await;
        let chosen: HashSet<usize> = (0..12)
            .map(|_| b.pick_healthy(&ctx(&h), &d).unwrap().index)
            .collect();
        assert_eq!(chosen, HashSet::from([0, 1, 2, 3]));
    }

    #[test]
    fn pool_and_outlier_settings_follow_istio_precedence() {
        let pool = |n: u32| pb::ConnectionPool {
            max_requests: n,
            ..Default::default()
        };
        let outlier = |n: u32| pb::OutlierDetection {
            consecutive_5xx_errors: n,
            ..Default::default()
        };
        let p = pb::DestinationPolicy {
            service: None,
            origin: "production/payment".into(),
            traffic_policy: Some(pb::TrafficPolicy {
                connection_pool: Some(pool(1)),
                outlier_detection: Some(outlier(1)),
                port_policies: vec![pb::PortTrafficPolicy {
                    port: 9090,
                    connection_pool: Some(pool(2)),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            subsets: vec![
                pb::Subset {
                    name: "v1".into(),
                    labels: BTreeMap::from([("version".into(), "v1".into())]),
                    traffic_policy: None,
                },
                pb::Subset {
                    name: "v2".into(),
                    labels: BTreeMap::from([("version".into(), "v2".into())]),
                    traffic_policy: Some(pb::TrafficPolicy {
                        connection_pool: Some(pool(3)),
                        port_policies: vec![pb::PortTrafficPolicy {
                            port: 8080,
                            outlier_detection: Some(outlier(4)),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                },
            ],
        };
        let rules = DestinationRules::try_from_proto(&p).unwrap();
        let requests = |subset, port| {
            rules
                .connection_pool(subset, port)
                .unwrap()
                .and_then(|l| l.max_requests)
        };
        let consecutive = |subset, port| {
            rules
                .outlier_detection(subset, port)
                .unwrap()
                .map(|o| o.consecutive_5xx)
        };
        assert_eq!(requests(None, Some(8080)), Some(1));
        assert_eq!(requests(None, Some(9090)), Some(2));
        assert_eq!(requests(Some("v1"), Some(9090)), Some(2));
        assert_eq!(requests(Some("v2"), Some(9090)), Some(3));
        assert_eq!(consecutive(None, None), Some(1));
        assert_eq!(consecutive(Some("v2"), Some(8080)), Some(4));
        assert_eq!(consecutive(Some("v2"), Some(9090)), Some(1));
        assert!(rules.connection_pool(Some("v3"), None).is_err());
        assert!(
            DestinationRules::default()
                .outlier_detection(None, Some(8080))
                .unwrap()
                .is_none()
        );

        let mut bad = p.clone();
        bad.subsets[1]
            .traffic_policy
            .as_mut()
            .unwrap()
            .port_policies[0]
            .outlier_detection = Some(pb::OutlierDetection {
            interval: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        });
        let e = DestinationRules::try_from_proto(&bad).unwrap_err();
        assert_eq!(
            e.field,
            "subsets[1].traffic_policy.port_policies[0].outlier_detection.interval"
        );
    }
}
