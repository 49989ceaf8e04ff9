//! Translation, from YAML to what each subscriber receives: the simulated cluster's
//! generated objects plus policies, and a waypoint scenario (`fixtures/waypoint.yaml`).
//!
//! `fixtures/sim/00-cluster.yaml` is the file the simulated cluster generates for the
//! default topology (`crates/simcluster/topologies/default.yaml`, cluster name
//! `ambit`), committed because ambit-simcluster does not expose its generator; after
//! `cargo xtask cluster up` it can be refreshed from
//! `/run/ambit/clusters/ambit/config/00-cluster.yaml`.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{collections::BTreeMap, sync::Arc};

use ambit_api::config::v1::{
    Action, Authorization, PeerAuthentication, Resource, RouteSet, Service, TunnelProtocol,
    Workload, path_match, policy_scope, resource::Kind, route,
};
use ambit_controller::{
    resources::parse_documents,
    source::OriginId,
    validate::{ValidationContext, validate_document},
    view::{ConfigView, IdentityAuthority, Subscriber},
    world::{Document, World, WorldSettings},
};
use ambit_identity::{SpiffeId, TrustDomain};

const SIM: &str = include_str!("fixtures/sim/00-cluster.yaml");
const WAYPOINT: &str = include_str!("fixtures/waypoint.yaml");

fn settings() -> WorldSettings {
    WorldSettings {
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        trust_bundle_pem: vec![
            "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n".into(),
        ],
    }
}

/// A world from `(file name, YAML)` pairs, as the index would build it.
fn world(files: &[(&str, &str)]) -> World {
    let ctx = ValidationContext::default();
    let mut docs = Vec::new();
    let mut files = files.to_vec();
    files.sort();
    for (name, text) in files {
        for parsed in parse_documents(name, text) {
            let validated = validate_document(&parsed, &ctx);
            docs.push(Arc::new(Document {
                origin: OriginId(name.to_owned()),
                parsed,
                validated,
            }));
        }
    }
    World::build(1, true, &settings(), docs)
}

fn node(w: &World, name: &str) -> BTreeMap<String, Resource> {
    w.resources_for(&Subscriber::Node { name: name.into() })
}

fn waypoint(w: &World, ns: &str, name: &str) -> BTreeMap<String, Resource> {
    w.resources_for(&Subscriber::Waypoint {
        namespace: ns.into(),
        name: name.into(),
    })
}

fn keys(r: &BTreeMap<String, Resource>, prefix: &str) -> Vec<String> {
    r.keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

fn workload<'a>(r: &'a BTreeMap<String, Resource>, name: &str) -> &'a Workload {
    r.values()
        .find_map(|r| match &r.kind {
            Some(Kind::Workload(w)) if w.name == name => Some(w),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no workload {name}"))
}

fn service<'a>(r: &'a BTreeMap<String, Resource>, ns: &str, name: &str) -> &'a Service {
    match &r[&format!("Service/{ns}/{name}")].kind {
        Some(Kind::Service(s)) => s,
        other => panic!("not a service: {other:?}"),
    }
}

fn authorization<'a>(r: &'a BTreeMap<String, Resource>, key: &str) -> &'a Authorization {
    match &r
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", r.keys()))
        .kind
    {
        Some(Kind::Authorization(a)) => a,
        other => panic!("not an authorization: {other:?}"),
    }
}

const PAYMENT_PEERS_ONLY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: inventory-from-checkout, namespace: production}
spec:
  selector: {matchLabels: {app: inventory}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/production/sa/checkout]}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: inventory-strict, namespace: production}
spec:
  selector: {matchLabels: {app: inventory}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: production}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [legacy]}}]
"#;

#[test]
fn node_gets_every_workload_and_service_and_the_bundle() {
    let w = world(&[("00-cluster.yaml", SIM)]);
    let n1 = node(&w, "node-1");
    assert_eq!(keys(&n1, "Workload/").len(), 6, "{:?}", n1.keys());
    assert_eq!(
        keys(&n1, "Service/"),
        [
            "Service/production/checkout",
            "Service/production/inventory",
            "Service/production/payment"
        ]
    );
    assert!(n1.contains_key("TrustBundle/cluster.local"));
    assert!(keys(&n1, "Authorization/").is_empty());

    let checkout = workload(&n1, "checkout-0");
    assert_eq!(checkout.node, "node-1");
    assert_eq!(checkout.addresses, ["10.244.1.2"]);
    assert!(checkout.captured);
    assert_eq!(checkout.protocol, TunnelProtocol::Hbone as i32);
    assert_eq!(
        checkout.spiffe_id,
        "spiffe://cluster.local/ns/production/sa/checkout"
    );
    assert_eq!(checkout.uid, "2214c128-8198-0a1b-5ed0-c39676c1eae2");
    assert_eq!(checkout.workload_name, "checkout");
    assert_eq!(checkout.canonical_name, "checkout");
    assert_eq!(checkout.canonical_revision, "v1");
    let legacy = workload(&n1, "legacy-client-0");
    assert!(!legacy.captured);
    assert_eq!(legacy.protocol, TunnelProtocol::Tcp as i32);
    assert_eq!(
        legacy.spiffe_id,
        "spiffe://cluster.local/ns/legacy/sa/default"
    );
    // node-1 also knows node-2's workloads (to address them).
    assert_eq!(workload(&n1, "inventory-0").node, "node-2");

    let payment = service(&n1, "production", "payment");
    assert_eq!(payment.vips, ["10.96.0.11"]);
    assert_eq!(payment.hostname, "payment.production.svc.cluster.local");
    assert_eq!(payment.ports.len(), 2);
    assert_eq!(
        (payment.ports[0].port, payment.ports[0].target_port),
        (80, 8080)
    );
    assert_eq!(payment.endpoints.len(), 3);
    assert!(payment.waypoint.is_none());
    let uids: Vec<&str> = payment
        .endpoints
        .iter()
        .map(|e| e.workload_uid.as_str())
        .collect();
    assert!(uids.contains(&workload(&n1, "payment-v2-0").uid.as_str()));

    // A node that runs nothing gets nothing.
    assert!(node(&w, "node-9").is_empty());
}

#[test]
fn a_policy_reaches_only_the_nodes_of_the_pods_it_selects() {
    let w = world(&[
        ("00-cluster.yaml", SIM),
        ("policy.yaml", PAYMENT_PEERS_ONLY),
    ]);
    let (n1, n2) = (node(&w, "node-1"), node(&w, "node-2"));
    // inventory-0 runs on node-2 only.
    for key in [
        "Authorization/production/inventory-from-checkout",
        "PeerAuthentication/production/inventory-strict",
    ] {
        assert!(n2.contains_key(key), "{key} missing on node-2");
        assert!(!n1.contains_key(key), "{key} sent to node-1");
    }
    // A namespace-wide policy reaches every node with a pod of the namespace.
    assert!(n1.contains_key("Authorization/production/deny-legacy"));
    assert!(n2.contains_key("Authorization/production/deny-legacy"));

    let a = authorization(&n2, "Authorization/production/inventory-from-checkout");
    assert_eq!(a.action, Action::Allow as i32);
    match a.scope.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(policy_scope::Kind::Selector(s)) => {
            assert_eq!(s.namespace, "production");
            assert_eq!(s.match_labels["app"], "inventory");
        }
        other => panic!("unexpected scope {other:?}"),
    }
    assert_eq!(a.rules.len(), 1);
    assert_eq!(a.rules[0].clauses.len(), 1);
    assert!(a.rules[0].unenforceable_fields.is_empty());
    let pa = match &n2["PeerAuthentication/production/inventory-strict"].kind {
        Some(Kind::PeerAuthentication(p)) => p.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        pa,
        PeerAuthentication {
            mode: ambit_api::config::v1::MtlsMode::Strict as i32,
            ..pa.clone()
        }
    );
}

/// Two pods of one workload on different nodes; the policy follows a label.
fn relabel_cluster(canary_on: &str) -> String {
    let pod = |name: &str, node: &str, track: &str, ip: &str| {
        format!(
            r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: production, labels: {{app: web, track: {track}}}}}
spec: {{nodeName: {node}, serviceAccountName: web, containers: [{{name: web, image: x}}]}}
status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: "True"}}]}}
"#
        )
    };
    let (a, b) = if canary_on == "node-1" {
        ("canary", "stable")
    } else {
        ("stable", "canary")
    };
    format!(
        "{}{}",
        pod("web-0", "node-1", a, "10.244.1.9"),
        pod("web-1", "node-2", b, "10.244.2.9")
    )
}

const CANARY_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: canary-only-checkout, namespace: production}
spec:
  selector: {matchLabels: {track: canary}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/production/sa/checkout]}}]
"#;

#[test]
fn a_changed_label_moves_a_policy_between_nodes() {
    const KEY: &str = "Authorization/production/canary-only-checkout";
    let before = world(&[
        ("00-cluster.yaml", SIM),
        ("web.yaml", &relabel_cluster("node-1")),
        ("policy.yaml", CANARY_POLICY),
    ]);
    assert!(node(&before, "node-1").contains_key(KEY));
    assert!(!node(&before, "node-2").contains_key(KEY));
    let after = world(&[
        ("00-cluster.yaml", SIM),
        ("web.yaml", &relabel_cluster("node-2")),
        ("policy.yaml", CANARY_POLICY),
    ]);
    assert!(!node(&after, "node-1").contains_key(KEY));
    assert!(node(&after, "node-2").contains_key(KEY));
    // The policy itself did not change: same version wherever it is sent.
    assert_eq!(
        node(&before, "node-1")[KEY].version,
        node(&after, "node-2")[KEY].version
    );
}

#[test]
fn versions_are_stable_across_unrelated_changes() {
    let a = world(&[("00-cluster.yaml", SIM)]);
    let b = world(&[
        ("00-cluster.yaml", SIM),
        ("policy.yaml", PAYMENT_PEERS_ONLY),
    ]);
    let again = world(&[("00-cluster.yaml", SIM)]);
    for n in ["node-1", "node-2"] {
        let (ra, rb) = (node(&a, n), node(&b, n));
        for (key, r) in &ra {
            assert_eq!(rb[key].version, r.version, "{key} changed on {n}");
        }
        assert_eq!(
            ra,
            node(&again, n),
            "rebuilding the same input is identical"
        );
    }
    // A label change touches that workload only.
    let relabelled = SIM.replace(
        "    app: checkout\n    version: v1\n  name: checkout-0",
        "    app: checkout\n    version: v9\n  name: checkout-0",
    );
    assert_ne!(relabelled, SIM, "fixture layout changed");
    let c = world(&[("00-cluster.yaml", &relabelled)]);
    let (ra, rc) = (node(&a, "node-1"), node(&c, "node-1"));
    let changed: Vec<&String> = ra
        .iter()
        .filter(|(k, r)| rc[*k].version != r.version)
        .map(|(k, _)| k)
        .collect();
    let checkout_uid = workload(&ra, "checkout-0").uid.clone();
    assert_eq!(changed, [&format!("Workload/{checkout_uid}")]);
}

#[test]
fn node_authorization_follows_pod_placement() {
    let w = world(&[("00-cluster.yaml", SIM), ("waypoint.yaml", GATEWAY_ONLY)]);
    let td = TrustDomain::new("cluster.local").unwrap();
    let id = |ns: &str, sa: &str| SpiffeId::new(&td, ns, sa).unwrap();
    assert!(w.node_may_hold("node-1", &id("production", "checkout")));
    assert!(w.node_may_hold("node-1", &id("production", "payment")));
    assert!(w.node_may_hold("node-2", &id("production", "payment")));
    assert!(w.node_may_hold("node-1", &id("legacy", "default")));
    assert!(!w.node_may_hold("node-1", &id("production", "inventory")));
    assert!(w.node_may_hold("node-2", &id("production", "inventory")));
    assert!(!w.node_may_hold("node-3", &id("production", "checkout")));
    let other_td = TrustDomain::new("other.example").unwrap();
    assert!(!w.node_may_hold(
        "node-1",
        &SpiffeId::new(&other_td, "production", "checkout").unwrap()
    ));
    assert_eq!(
        w.waypoint_identity("production", "waypoint")
            .map(|i| i.to_string()),
        Some("spiffe://cluster.local/ns/production/sa/waypoint".to_owned())
    );
    assert_eq!(w.waypoint_identity("production", "missing"), None);
}

const GATEWAY_ONLY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: production}
spec:
  gatewayClassName: ambit-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

#[test]
fn an_invalid_allow_policy_is_enforced_as_deny_all_and_reported_rejected() {
    let bad = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-allow, namespace: production}
spec:
  selector: {matchLabels: {app: payment}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/*/sa/checkout"]}}]
    to: [{operation: {ports: ["99999"]}}]
"#;
    let w = world(&[("00-cluster.yaml", SIM), ("bad.yaml", bad)]);
    for n in ["node-1", "node-2"] {
        let resources = node(&w, n);
        let a = authorization(&resources, "Authorization/production/payment-allow");
        assert_eq!(a.action, Action::Allow as i32);
        assert!(a.rules.is_empty(), "an ALLOW without rules allows nothing");
    }
    let status = w
        .statuses()
        .into_iter()
        .find(|s| s.name.as_deref() == Some("payment-allow"))
        .unwrap();
    assert_eq!(status.status, "Rejected");
    assert!(status.reason.contains("spec.rules[0]"), "{}", status.reason);
    assert!(status.reason.contains("fail-closed"), "{}", status.reason);
    let report = w
        .status_reports()
        .into_iter()
        .find(|s| s.name == "payment-allow")
        .unwrap();
    assert!(!report.accepted);
    assert_eq!(report.reason, "Invalid");
    assert_eq!(report.api_version, "security.istio.io/v1");
}

#[test]
fn every_generated_sim_object_is_accepted() {
    let w = world(&[("00-cluster.yaml", SIM)]);
    let statuses = w.statuses();
    // 2 Namespaces, 5 ServiceAccounts, 2 Nodes, 3 Services, 3 EndpointSlices, 6 Pods.
    assert_eq!(statuses.len(), 21);
    for s in &statuses {
        assert_eq!(s.status, "Accepted", "{s:?}");
        assert!(s.reason.is_empty(), "{s:?}");
    }
    // Core kinds have no status Ambit writes.
    assert!(w.status_reports().is_empty());
    assert!(w.synced());
}

#[test]
fn l7_fields_of_a_selector_policy_are_unenforceable_at_the_daemon() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: production}
spec:
  selector: {matchLabels: {app: payment}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/production/sa/checkout]}}]
    to: [{operation: {methods: [GET], ports: ["8080"]}}]
  - from: [{source: {serviceAccounts: [production/inventory]}}]
    when: [{key: "request.headers[x-user]", values: [admin]}]
"#;
    let w = world(&[("00-cluster.yaml", SIM), ("p.yaml", yaml)]);
    let n2 = node(&w, "node-2");
    let a = authorization(&n2, "Authorization/production/get-only");
    assert_eq!(a.rules[0].unenforceable_fields, ["to[0].operation.methods"]);
    let to = &a.rules[0].clauses[1].matches[0];
    assert!(to.methods.is_empty());
    assert_eq!(to.destination_ports, [8080]);
    assert_eq!(
        a.rules[1].unenforceable_fields,
        ["when[0].key=request.headers[x-user]"]
    );
    // serviceAccounts become principals in the trust domain.
    let from = &a.rules[1].clauses[0].matches[0];
    assert_eq!(
        from.principals[0].kind,
        Some(ambit_api::config::v1::string_match::Kind::Exact(
            "cluster.local/ns/production/sa/inventory".into()
        ))
    );
}

#[test]
fn waypoint_gets_its_fronted_service_routes_and_policies_only() {
    let w = world(&[("waypoint.yaml", WAYPOINT)]);
    let wp = waypoint(&w, "production", "waypoint");
    assert_eq!(
        wp.keys()
            .filter(|k| !k.starts_with("Workload/"))
            .collect::<Vec<_>>(),
        [
            "Authorization/production/payment-post",
            "DestinationPolicy/production/payment",
            "RouteSet/production/payment",
            "Service/production/payment",
            "Service/production/payment-v2",
            "TrustBundle/cluster.local",
        ]
    );
    let workloads: Vec<&str> = wp
        .values()
        .filter_map(|r| match &r.kind {
            Some(Kind::Workload(w)) => Some(w.name.as_str()),
            _ => None,
        })
        .collect();
    // Its fronted service's workloads, and every captured workload as a possible
    // client (not the waypoint's own pod, which is not captured).
    assert_eq!(
        workloads,
        ["checkout-0", "inventory-0", "payment-v1-0", "payment-v2-0"]
    );

    // HTTPRoute rules first, by precedence (Exact path before a header-only match),
    // then the VirtualService's.
    let rs: &RouteSet = match &wp["RouteSet/production/payment"].kind {
        Some(Kind::RouteSet(rs)) => rs,
        other => panic!("{other:?}"),
    };
    let names: Vec<&str> = rs.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "HTTPRoute/production/payment-canary#1",
            "HTTPRoute/production/payment-canary#0",
            "VirtualService/production/payment#0.split",
        ]
    );
    assert!(matches!(
        rs.routes[0].matches[0].path.as_ref().and_then(|p| p.kind.as_ref()),
        Some(path_match::Kind::Exact(p)) if p == "/health"
    ));
    let Some(route::Action::Forward(split)) = &rs.routes[2].action else {
        panic!("not a forward");
    };
    let weights: Vec<(String, u32)> = split
        .destinations
        .iter()
        .map(|d| (d.subset.clone(), d.weight))
        .collect();
    assert_eq!(weights, [("v1".into(), 90), ("v2".into(), 10)]);
    let retry = split.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 3);
    assert!(split.timeout.is_some());
    // A route without retries gets Istio's default, materialized.
    let Some(route::Action::Forward(health)) = &rs.routes[0].action else {
        panic!("not a forward");
    };
    assert_eq!(health.retry.as_ref().unwrap().attempts, 2);

    // The L7 policy keeps its HTTP attributes at the waypoint.
    let a = authorization(&wp, "Authorization/production/payment-post");
    assert!(a.rules[0].unenforceable_fields.is_empty());
    assert_eq!(a.rules[0].clauses[1].matches[0].methods.len(), 2);
    assert!(matches!(
        a.scope.as_ref().and_then(|s| s.kind.as_ref()),
        Some(policy_scope::Kind::TargetRefs(t)) if t.services.len() == 1
    ));

    // Nodes see payment as waypoint-bound, with the waypoint's identity.
    let n1 = node(&w, "node-1");
    let payment = service(&n1, "production", "payment");
    let wref = payment.waypoint.as_ref().unwrap();
    assert_eq!(
        wref.spiffe_id,
        "spiffe://cluster.local/ns/production/sa/waypoint"
    );
    assert_eq!(wref.service.as_ref().unwrap().name, "waypoint");
    assert!(service(&n1, "production", "inventory").waypoint.is_none());
    // The waypoint's own Service is synthesized over its pod; the pod speaks HBONE
    // but is not captured.
    let wsvc = service(&n1, "production", "waypoint");
    assert_eq!(wsvc.ports[0].port, 15008);
    assert_eq!(wsvc.endpoints.len(), 1);
    let wpod = workload(&n1, "waypoint-0");
    assert!(!wpod.captured);
    assert_eq!(wpod.protocol, TunnelProtocol::Hbone as i32);
    // Waypoint policies never go to nodes as written.
    assert!(!n1.contains_key("Authorization/production/payment-post"));

    // Unknown waypoints get nothing.
    assert!(waypoint(&w, "production", "other").is_empty());
}

/// A namespace outside the mesh and a meshed one other than the waypoint's.
const OTHER_NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy-0, namespace: legacy, labels: {app: legacy}}
spec: {nodeName: node-1, serviceAccountName: legacy}
status: {phase: Running, podIP: 10.244.1.20, podIPs: [{ip: 10.244.1.20}]}
---
apiVersion: v1
kind: Namespace
metadata: {name: frontend, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: frontend, labels: {app: web, version: v3}}
spec: {nodeName: node-2, serviceAccountName: web}
status: {phase: Running, podIP: 10.244.2.20, podIPs: [{ip: 10.244.2.20}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-opted-out-0
  namespace: frontend
  labels: {app: web, ambit.dev/dataplane-mode: none}
spec: {nodeName: node-2, serviceAccountName: web}
status: {phase: Running, podIP: 10.244.2.21, podIPs: [{ip: 10.244.2.21}]}
"#;

#[test]
fn waypoint_gets_every_captured_workload_as_a_possible_client() {
    let w = world(&[
        ("waypoint.yaml", WAYPOINT),
        ("other.yaml", OTHER_NAMESPACES),
    ]);
    let wp = waypoint(&w, "production", "waypoint");
    let mut workloads: Vec<(&str, &str)> = wp
        .values()
        .filter_map(|r| match &r.kind {
            Some(Kind::Workload(w)) => Some((w.namespace.as_str(), w.name.as_str())),
            _ => None,
        })
        .collect();
    workloads.sort_unstable();
    // Captured pods of every meshed namespace; neither pods outside the mesh nor
    // opted-out pods (they hold no mesh identity, so cannot reach a waypoint), nor
    // the waypoint's own pod.
    assert_eq!(
        workloads,
        [
            ("frontend", "web-0"),
            ("production", "checkout-0"),
            ("production", "inventory-0"),
            ("production", "payment-v1-0"),
            ("production", "payment-v2-0"),
        ]
    );
    // As the node sees them: identity, address and the labels the metrics name.
    let web = workload(&wp, "web-0");
    assert_eq!(web, workload(&node(&w, "node-1"), "web-0"));
    assert_eq!(web.spiffe_id, "spiffe://cluster.local/ns/frontend/sa/web");
    assert_eq!(web.addresses, ["10.244.2.20"]);
    assert_eq!(
        (web.canonical_name.as_str(), web.canonical_revision.as_str()),
        ("web", "v3")
    );
    // Only workloads: no services, routes or policies of the clients' namespaces.
    assert!(
        wp.keys()
            .all(|k| !k.contains("/frontend/") && !k.contains("/legacy/"))
    );
    // A client leaving the mesh leaves the waypoint's snapshot.
    let w = world(&[
        ("waypoint.yaml", WAYPOINT),
        (
            "other.yaml",
            &OTHER_NAMESPACES.replace("labels: {ambit.dev/dataplane-mode: ambient}", "labels: {}"),
        ),
    ]);
    let wp = waypoint(&w, "production", "waypoint");
    assert!(
        !wp.values()
            .any(|r| matches!(&r.kind, Some(Kind::Workload(w)) if w.namespace == "frontend")),
        "{:?}",
        wp.keys()
    );
}

#[test]
fn a_target_policy_without_a_waypoint_is_enforced_by_the_daemons_fail_closed() {
    let w = world(&[("waypoint.yaml", WAYPOINT)]);
    let (n1, n2) = (node(&w, "node-1"), node(&w, "node-2"));
    const KEY: &str = "Authorization/production/inventory-get";
    assert!(!n1.contains_key(KEY));
    let a = authorization(&n2, KEY);
    assert_eq!(a.action, Action::Allow as i32);
    // Methods cannot be seen at L4: the rule never matches (fail closed).
    assert_eq!(a.rules[0].unenforceable_fields, ["to[0].operation.methods"]);
    // The service port is mapped to the target port the daemon sees.
    assert_eq!(a.rules[0].clauses[1].matches[0].destination_ports, [8080]);
    match a.scope.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(policy_scope::Kind::Selector(s)) => assert_eq!(s.match_labels["app"], "inventory"),
        other => panic!("unexpected scope {other:?}"),
    }
    let status = w
        .statuses()
        .into_iter()
        .find(|s| s.name.as_deref() == Some("inventory-get"))
        .unwrap();
    assert_eq!(status.status, "Accepted");
    assert!(status.reason.contains("no waypoint"), "{}", status.reason);
    // The inventory route is not sent anywhere (no waypoint fronts inventory).
    assert!(!waypoint(&w, "production", "waypoint").contains_key("RouteSet/production/inventory"));
}

#[test]
fn a_label_naming_a_missing_waypoint_fails_closed() {
    let without_gateway: String = WAYPOINT
        .split("\n---\n")
        .filter(|d| !d.contains("kind: Gateway"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let w = world(&[("waypoint.yaml", &without_gateway)]);
    let n1 = node(&w, "node-1");
    let payment = service(&n1, "production", "payment");
    let wref = payment.waypoint.as_ref().expect("still waypoint-bound");
    assert_eq!(wref.gateway.as_ref().unwrap().name, "waypoint");
    // No such waypoint Service exists, so nothing can carry the traffic.
    assert!(!n1.contains_key("Service/production/waypoint"));
    let status = w
        .statuses()
        .into_iter()
        .find(|s| s.kind.as_deref() == Some("Service") && s.name.as_deref() == Some("payment"))
        .unwrap();
    assert!(status.reason.contains("fail closed"), "{}", status.reason);
    assert_eq!(w.waypoint_identity("production", "waypoint"), None);
    // The waypoint pod is then an ordinary (captured) pod.
    assert!(workload(&n1, "waypoint-0").captured);
}

#[test]
fn duplicates_are_reported_and_the_first_origin_wins() {
    let allow = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  rules: [{}]
"#;
    let deny = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: production}
spec:
  action: DENY
  rules: [{}]
"#;
    let w = world(&[
        ("00-cluster.yaml", SIM),
        ("a.yaml", allow),
        ("b.yaml", deny),
    ]);
    let n1 = node(&w, "node-1");
    let a = authorization(&n1, "Authorization/production/p");
    assert_eq!(a.action, Action::Allow as i32);
    let reports = w.status_reports();
    let dup = reports.iter().find(|r| r.origin.0 == "b.yaml").unwrap();
    assert_eq!(dup.reason, "Duplicate");
    assert!(dup.message.contains("a.yaml"));
}

#[test]
fn gateway_api_rules_are_ordered_by_precedence_and_virtual_service_ports_split() {
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: order, namespace: production}
spec:
  parentRefs: [{group: "", kind: Service, name: payment, port: 80}]
  rules:
  - name: catch-all
    backendRefs: [{name: payment, port: 80}]
  - name: api
    matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: payment, port: 80}]
  - name: api-v1
    matches: [{path: {type: PathPrefix, value: /api/v1}}]
    backendRefs: [{name: payment, port: 80}]
  - name: api-post
    matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: payment, port: 80}]
  - name: regex
    matches: [{path: {type: RegularExpression, value: "/r/[0-9]+"}}]
    backendRefs: [{name: payment, port: 80}]
  - name: exact
    matches: [{path: {type: Exact, value: /a}}]
    backendRefs: [{name: payment, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ports, namespace: production}
spec:
  hosts: [payment.production.svc.cluster.local]
  http:
  - match: [{port: 80}, {port: 9090, uri: {prefix: /x}}]
    route: [{destination: {host: payment}}]
"#;
    let w = world(&[("waypoint.yaml", WAYPOINT), ("routes.yaml", routes)]);
    let wp = waypoint(&w, "production", "waypoint");
    let Some(Kind::RouteSet(rs)) = &wp["RouteSet/production/payment"].kind else {
        panic!("no route set");
    };
    let names: Vec<&str> = rs.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            // Exact paths first (the other HTTPRoute's /health, then /a: longer
            // first), then regex, then prefixes by length, method before none.
            "HTTPRoute/production/payment-canary#1",
            "HTTPRoute/production/order#5.exact",
            "HTTPRoute/production/order#4.regex",
            "HTTPRoute/production/order#2.api-v1",
            "HTTPRoute/production/order#3.api-post",
            "HTTPRoute/production/order#1.api",
            "HTTPRoute/production/payment-canary#0",
            "HTTPRoute/production/order#0.catch-all",
            "VirtualService/production/payment#0.split",
            "VirtualService/production/ports#0",
            "VirtualService/production/ports#0",
        ]
    );
    assert_eq!(rs.routes[1].ports, [80]);
    assert_eq!(rs.routes[9].ports, [80]);
    assert_eq!(rs.routes[10].ports, [9090]);
    let vs_status = w
        .statuses()
        .into_iter()
        .find(|s| s.name.as_deref() == Some("ports"))
        .unwrap();
    assert!(
        vs_status.reason.contains("take precedence"),
        "{}",
        vs_status.reason
    );
}
