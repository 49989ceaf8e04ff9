//! Subsets and load balancers over a fixed endpoint list.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test helpers")]

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use ambit_api::config::v1 as pb;
use ambit_waypoint::{
    balance::{Balancer, DestinationRules, Endpoint, HashKey, LbPolicy, PickContext},
    rng::SharedRng,
};
use http::{HeaderMap, HeaderValue};

fn ep(i: u8, version: &str) -> Endpoint {
    Endpoint {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)), 8080),
        labels: BTreeMap::from([
            ("app".into(), "payment".into()),
            ("version".into(), version.into()),
        ]),
    }
}

fn endpoints() -> Vec<Endpoint> {
    vec![ep(1, "v1"), ep(2, "v1"), ep(3, "v2"), ep(4, "v1")]
}

fn simple(lb: pb::SimpleLb) -> Option<pb::LoadBalancer> {
    Some(pb::LoadBalancer {
        kind: Some(pb::load_balancer::Kind::Simple(lb as i32)),
    })
}

fn policy() -> pb::DestinationPolicy {
    pb::DestinationPolicy {
        service: None,
        origin: "shop/payment".into(),
        traffic_policy: Some(pb::TrafficPolicy {
            load_balancer: simple(pb::SimpleLb::LeastRequest),
            port_policies: vec![pb::PortTrafficPolicy {
                port: 9090,
                load_balancer: simple(pb::SimpleLb::Random),
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
                    load_balancer: Some(pb::LoadBalancer {
                        kind: Some(pb::load_balancer::Kind::ConsistentHash(
                            pb::ConsistentHash {
                                key: Some(pb::consistent_hash::Key::HttpHeader("x-user".into())),
                                minimum_ring_size: 0,
                            },
                        )),
                    }),
                    ..Default::default()
                }),
            },
        ],
    }
}

fn ctx(headers: &HeaderMap) -> PickContext<'_> {
    PickContext {
        headers,
        query: None,
        source_ip: None,
    }
}

#[test]
fn subsets_select_endpoints_by_labels() {
    let rules = DestinationRules::try_from_proto(&policy()).unwrap();
    let all = endpoints();
    let v1: Vec<u8> = rules
        .endpoints(Some("v1"), &all)
        .unwrap()
        .iter()
        .map(|e| {
            e.addr
                .ip()
                .to_string()
                .rsplit('.')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(v1, [1, 2, 4]);
    assert_eq!(rules.endpoints(Some("v2"), &all).unwrap(), [ep(3, "v2")]);
    assert_eq!(rules.endpoints(None, &all).unwrap().len(), 4);
    assert!(rules.endpoints(Some("v3"), &all).is_err());
}

#[test]
fn most_specific_load_balancer_setting_wins() {
    let rules = DestinationRules::try_from_proto(&policy()).unwrap();
    assert_eq!(
        rules.load_balancer(Some("v1"), Some(8080)).unwrap(),
        LbPolicy::LeastRequest
    );
    assert_eq!(
        rules.load_balancer(Some("v1"), Some(9090)).unwrap(),
        LbPolicy::Random
    );
    assert!(matches!(
        rules.load_balancer(Some("v2"), Some(9090)).unwrap(),
        LbPolicy::RingHash {
            key: HashKey::Header(_),
            min_ring_size: 1024
        }
    ));
    assert_eq!(
        DestinationRules::default()
            .load_balancer(None, None)
            .unwrap(),
        LbPolicy::RoundRobin
    );
}

#[test]
fn bad_hash_header_names_the_field() {
    let mut p = policy();
    p.subsets[1].traffic_policy = Some(pb::TrafficPolicy {
        load_balancer: Some(pb::LoadBalancer {
            kind: Some(pb::load_balancer::Kind::ConsistentHash(
                pb::ConsistentHash {
                    key: Some(pb::consistent_hash::Key::HttpHeader("bad header".into())),
                    minimum_ring_size: 0,
                },
            )),
        }),
        ..Default::default()
    });
    let err = DestinationRules::try_from_proto(&p).unwrap_err();
    assert_eq!(
        err.field,
        "subsets[1].traffic_policy.load_balancer.consistent_hash.http_header"
    );
}

#[test]
fn round_robin_cycles_through_all_endpoints() {
    let b = Balancer::new(LbPolicy::RoundRobin, endpoints(), SharedRng::seeded(1));
    let h = HeaderMap::new();
    let picks: Vec<usize> = (0..8).map(|_| b.pick(&ctx(&h)).unwrap().index).collect();
    assert_eq!(picks, [0, 1, 2, 3, 0, 1, 2, 3]);
    assert!(
        Balancer::new(LbPolicy::RoundRobin, vec![], SharedRng::seeded(1))
            .pick(&ctx(&h))
            .is_none()
    );
}

#[test]
fn random_spreads_roughly_evenly() {
    let b = Balancer::new(LbPolicy::Random, endpoints(), SharedRng::seeded(9));
    let h = HeaderMap::new();
    let mut counts = [0usize; 4];
    for _ in 0..4000 {
        counts[b.pick(&ctx(&h)).unwrap().index] += 1;
    }
    assert!(
        counts.iter().all(|&c| (850..=1150).contains(&c)),
        "{counts:?}"
    );
}

#[test]
fn least_request_avoids_busy_endpoints() {
    let b = Balancer::new(LbPolicy::LeastRequest, endpoints(), SharedRng::seeded(3));
    let h = HeaderMap::new();
    // Load endpoint picks until one endpoint holds many outstanding requests.
    let mut held = Vec::new();
    for _ in 0..40 {
        let p = b.pick(&ctx(&h)).unwrap();
        held.push(p);
    }
    let mut load = [0usize; 4];
    for p in &held {
        load[p.index] += 1;
    }
    // Power of two choices keeps the spread tight (uniform random would not).
    let (min, max) = (load.iter().min().unwrap(), load.iter().max().unwrap());
    assert!(max - min <= 4, "{load:?}");
    drop(held);
    // Dropping the guards returns every endpoint to idle.
    let mut counts = [0usize; 4];
    for _ in 0..400 {
        counts[b.pick(&ctx(&h)).unwrap().index] += 1;
    }
    assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
}

#[test]
fn consistent_hash_is_sticky_per_key_and_spreads_keys() {
    let b = Balancer::new(
        LbPolicy::RingHash {
            key: HashKey::Header(http::HeaderName::from_static("x-user")),
            min_ring_size: 1024,
        },
        endpoints(),
        SharedRng::seeded(1),
    );
    let mut used = HashSet::new();
    for user in 0..200 {
        let mut h = HeaderMap::new();
        h.insert(
            "x-user",
            HeaderValue::from_str(&format!("user-{user}")).unwrap(),
        );
        let first = b.pick(&ctx(&h)).unwrap().index;
        for _ in 0..5 {
            assert_eq!(b.pick(&ctx(&h)).unwrap().index, first);
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 4);
    // Without the header: round robin.
    let h = HeaderMap::new();
    let picks: Vec<usize> = (0..4).map(|_| b.pick(&ctx(&h)).unwrap().index).collect();
    assert_eq!(picks, [0, 1, 2, 3]);
}

#[test]
fn consistent_hash_on_cookie_and_source_ip() {
    let cookie = Balancer::new(
        LbPolicy::RingHash {
            key: HashKey::Cookie("session".into()),
            min_ring_size: 64,
        },
        endpoints(),
        SharedRng::seeded(1),
    );
    let mut h = HeaderMap::new();
    h.insert("cookie", HeaderValue::from_static("a=1; session=abc; b=2"));
    let first = cookie.pick(&ctx(&h)).unwrap().index;
    let mut h2 = HeaderMap::new();
    h2.insert("cookie", HeaderValue::from_static("session=abc"));
    assert_eq!(cookie.pick(&ctx(&h2)).unwrap().index, first);

    let by_ip = Balancer::new(
        LbPolicy::RingHash {
            key: HashKey::SourceIp,
            min_ring_size: 64,
        },
        endpoints(),
        SharedRng::seeded(1),
    );
    let empty = HeaderMap::new();
    let from = |ip: [u8; 4]| PickContext {
        headers: &empty,
        query: None,
        source_ip: Some(IpAddr::from(ip)),
    };
    let a = by_ip.pick(&from([10, 1, 0, 7])).unwrap().index;
    for _ in 0..5 {
        assert_eq!(by_ip.pick(&from([10, 1, 0, 7])).unwrap().index, a);
    }
}
