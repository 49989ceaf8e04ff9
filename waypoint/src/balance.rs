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

/// Compiled [`pb::DestinationPolicy`] (subsets and load balancing; connection pool
/// and outlier detection are not applied yet).
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

/// Load-balancer settings of one traffic policy: default and per port.
#[derive(Clone, Debug, Default)]
struct TrafficLb {
    default: Option<LbPolicy>,
    ports: Vec<(u16, LbPolicy)>,
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
        let subset = subset.map(|s| self.subset(s)).transpose()?;
        let from = |lb: &TrafficLb| {
            port.and_then(|p| {
                lb.ports
                    .iter()
                    .find(|(q, _)| *q == p)
                    .map(|(_, l)| l.clone())
            })
            .or_else(|| lb.default.clone())
        };
        Ok(subset
            .and_then(|s| from(&s.policy))
            .or_else(|| from(&self.policy))
            .unwrap_or(LbPolicy::RoundRobin))
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
        let mut ports = Vec::new();
        for (i, p) in t.port_policies.iter().enumerate() {
            let field = format!("port_policies[{i}]");
            let port = u16::try_from(p.port)
                .map_err(|_| ConvertError::new(format!("{field}.port"), Invalid::Port(p.port)))?;
            if let Some(lb) = lb_from_proto(p.load_balancer.as_ref())
                .map_err(|e| e.within(&format!("{field}.load_balancer")))?
            {
                ports.push((port, lb));
            }
        }
        Ok(Self { default, ports })
    }
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
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let index = match &self.policy {
            LbPolicy::RoundRobin => self.round_robin(),
            LbPolicy::Random => self.random(),
            LbPolicy::LeastRequest => {
                let a = self.random();
                let b = self.random();
                let load = |i: usize| self.in_flight[i].load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
            LbPolicy::RingHash { key, .. } => match hash_input(key, ctx) {
                Some(input) => self.ring_lookup(hash(input.as_bytes())),
                None => self.round_robin(),
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

    fn round_robin(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len()
    }

    fn random(&self) -> usize {
        let n = self.endpoints.len();
        usize::try_from(self.rng.below(n as u64)).unwrap_or(0) % n
    }

    fn ring_lookup(&self, h: u64) -> usize {
        let at = self.ring.partition_point(|(k, _)| *k < h);
        self.ring
            .get(at)
            .or_else(|| self.ring.first())
            .map_or(0, |(_, i)| *i)
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
