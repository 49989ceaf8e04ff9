//! DestinationRule into one `DestinationPolicy` per Service.
//!
//! Several DestinationRules for one Service are merged as Istio merges them: the rule
//! in the Service's own namespace first, then the oldest (then by namespace/name)
//! provides the traffic policy; subsets of the others are added when their names are
//! new, and the shadowed parts are reported on those rules.

use std::collections::BTreeMap;

use ambit_api::{
    config::v1::{
        ConnectionPool as ProtoPool, ConsistentHash, DestinationPolicy as ProtoPolicy, HttpCookie,
        LoadBalancer as ProtoLb, NamespacedName, OutlierDetection as ProtoOutlier,
        PortTrafficPolicy, SimpleLb, Subset as ProtoSubset, TrafficPolicy as ProtoTraffic,
        consistent_hash, load_balancer,
    },
    time::duration_to_proto,
};

use super::{
    Notes, ObjectKey, Objects,
    cluster::{Mesh, ServiceKey},
};
use crate::model::{
    ServiceHost,
    destination::{
        ConnectionPool, DestinationPolicy, HashKey, LoadBalancer, OutlierDetection, TrafficPolicy,
    },
};

fn load_balancer(lb: &LoadBalancer) -> ProtoLb {
    let kind = match lb {
        LoadBalancer::RoundRobin => load_balancer::Kind::Simple(SimpleLb::RoundRobin as i32),
        LoadBalancer::LeastRequest => load_balancer::Kind::Simple(SimpleLb::LeastRequest as i32),
        LoadBalancer::Random => load_balancer::Kind::Simple(SimpleLb::Random as i32),
        LoadBalancer::ConsistentHash(key) => {
            let key = match key {
                HashKey::Header(h) => consistent_hash::Key::HttpHeader(h.to_ascii_lowercase()),
                HashKey::Cookie { name, path, ttl } => {
                    consistent_hash::Key::HttpCookie(HttpCookie {
                        name: name.clone(),
                        path: path.clone().unwrap_or_default(),
                        ttl: ttl.map(duration_to_proto),
                    })
                }
                HashKey::SourceIp => consistent_hash::Key::SourceIp(true),
                HashKey::QueryParameter(q) => consistent_hash::Key::HttpQueryParameter(q.clone()),
            };
            load_balancer::Kind::ConsistentHash(ConsistentHash {
                minimum_ring_size: 0,
                key: Some(key),
            })
        }
    };
    ProtoLb { kind: Some(kind) }
}

fn connection_pool(p: &ConnectionPool) -> ProtoPool {
    ProtoPool {
        max_connections: p.tcp.max_connections.unwrap_or(0),
        connect_timeout: p.tcp.connect_timeout.map(duration_to_proto),
        max_pending_requests: p.http.max_pending_requests.unwrap_or(0),
        max_requests: p.http.max_requests.unwrap_or(0),
        max_requests_per_connection: p.http.max_requests_per_connection.unwrap_or(0),
        max_retries: p.http.max_retries.unwrap_or(0),
        idle_timeout: p
            .http
            .idle_timeout
            .or(p.tcp.idle_timeout)
            .map(duration_to_proto),
    }
}

fn outlier(o: &OutlierDetection) -> ProtoOutlier {
    ProtoOutlier {
        consecutive_5xx_errors: o.consecutive_5xx_errors,
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        interval: Some(duration_to_proto(o.interval)),
        base_ejection_time: Some(duration_to_proto(o.base_ejection_time)),
        max_ejection_percent: o.max_ejection_percent,
        min_health_percent: o.min_health_percent,
    }
}

fn traffic_policy(t: &TrafficPolicy) -> ProtoTraffic {
    ProtoTraffic {
        load_balancer: t.load_balancer.as_ref().map(load_balancer),
        connection_pool: t.connection_pool.as_ref().map(connection_pool),
        outlier_detection: t.outlier_detection.as_ref().map(outlier),
        port_policies: t
            .port_overrides
            .iter()
            .map(|(port, p)| PortTrafficPolicy {
                port: u32::from(port.get()),
                load_balancer: p.load_balancer.as_ref().map(load_balancer),
                connection_pool: p.connection_pool.as_ref().map(connection_pool),
                outlier_detection: p.outlier_detection.as_ref().map(outlier),
            })
            .collect(),
    }
}

/// Every Service's destination policy.
pub(crate) fn destination_policies(
    objects: &Objects<'_>,
    mesh: &Mesh<'_>,
    notes: &mut Notes,
) -> BTreeMap<ServiceKey, ProtoPolicy> {
    let mut by_service: BTreeMap<ServiceKey, Vec<&DestinationPolicy>> = BTreeMap::new();
    for d in &objects.destinations {
        let me = ObjectKey::new("DestinationRule", Some(d.id.namespace.as_str()), &d.id.name);
        match &d.host {
            ServiceHost::Service { namespace, name } => {
                let key = ServiceKey::new(namespace.as_str(), name);
                if mesh.service(&key).is_none() {
                    notes.add(
                        me,
                        format!("host Service {namespace}/{name} does not exist"),
                    );
                }
                by_service.entry(key).or_default().push(d);
            }
            ServiceHost::Hostname(h) => notes.add(
                me,
                format!("host `{h}` is not a Kubernetes Service: not used by waypoints"),
            ),
        }
    }
    let mut out = BTreeMap::new();
    for (svc, mut rules) in by_service {
        rules.sort_by(|a, b| {
            let own = |d: &DestinationPolicy| d.id.namespace.as_str() != svc.namespace;
            (own(a), a.id.precedence_key()).cmp(&(own(b), b.id.precedence_key()))
        });
        let Some((first, rest)) = rules.split_first() else {
            continue;
        };
        let mut subsets: Vec<ProtoSubset> = Vec::new();
        let mut add_subsets = |d: &DestinationPolicy, notes: &mut Notes| {
            for s in &d.subsets {
                if subsets.iter().any(|x| x.name == s.name) {
                    notes.add(
                        ObjectKey::new("DestinationRule", Some(d.id.namespace.as_str()), &d.id.name),
                        format!("subset `{}` is also defined by DestinationRule {}/{}, which takes precedence", s.name, first.id.namespace, first.id.name),
                    );
                    continue;
                }
                subsets.push(ProtoSubset {
                    name: s.name.clone(),
                    labels: s.labels.0.clone(),
                    traffic_policy: s.traffic_policy.as_ref().map(traffic_policy),
                });
            }
        };
        add_subsets(first, notes);
        for d in rest {
            add_subsets(d, notes);
            if d.traffic_policy != TrafficPolicy::default() {
                notes.add(
                    ObjectKey::new("DestinationRule", Some(d.id.namespace.as_str()), &d.id.name),
                    format!(
                        "trafficPolicy is shadowed by DestinationRule {}/{} for the same Service",
                        first.id.namespace, first.id.name
                    ),
                );
            }
        }
        let policy = ProtoPolicy {
            service: Some(NamespacedName {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            }),
            origin: format!("{}/{}", first.id.namespace, first.id.name),
            traffic_policy: Some(traffic_policy(&first.traffic_policy)),
            subsets,
        };
        out.insert(svc, policy);
    }
    out
}
