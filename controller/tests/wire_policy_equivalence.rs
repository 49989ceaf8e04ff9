//! The proxies decide exactly as the controller's model does.
//!
//! For every case — the cases of `policy_table.rs` (shared with it through
//! `common/policy_cases.rs`) plus cases aimed at the corners
//! of the translation (unenforceable fields, L7 attributes at L4, `when` conditions,
//! service accounts, wildcards) — two paths are compared:
//!
//! - **model**: YAML → validation → the model objects in force → `authorize` /
//!   `effective_mtls_mode` (what `policy_table.rs` checks against expectations);
//! - **wire**: the same YAML in a small world (a waypoint in front of `payment`, one
//!   payment pod on `node-1`) → translation → the resources the controller serves to
//!   `node-1` and to the waypoint → `ambit_policy::wire::ProxyPolicies` →
//!   `authorize_l4` / `authorize_targets` / `mtls_mode`, the destination workload taken
//!   from the served `Workload` resource.
//!
//! Every connection of the whole table is evaluated against every case at both
//! enforcement points (not only the case's own checks), and the decisions must be
//! identical: verdict, deciding policy and audit list. Each case's own checks must
//! also give the verdict the table expects.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

#[path = "common/policy_cases.rs"]
mod policy_cases;

use std::{collections::BTreeMap, sync::Arc};

use Verdict::{Allow, Deny};
use ambit_api::config::v1::{Resource, resource::Kind};
use ambit_controller::{
    model::{
        NamespaceName, WorkloadRef,
        authz::{
            AuthzPolicy, ConnectionAttrs, Decision, DecisionReason, PolicyTarget, Verdict,
            authorize, policies_for_workload,
        },
        peer_authn::{PeerAuthn, effective_mtls_mode},
        types::ObjectId,
    },
    resources::parse_documents,
    source::OriginId,
    validate::{ModelObject, ValidationContext, validate_document, validate_file},
    view::{ConfigView, Subscriber},
    world::{Document, World, WorldSettings},
};
use ambit_identity::TrustDomain;
use ambit_policy::wire::{ProxyPolicies, gateway_target, service_target, workload_ref};
use policy_cases::{
    Case,
    Point::{self, Daemon, Waypoint},
    ap, authz_cases, checkout, from, inventory, ip, on_port, pa, pa_created, plaintext,
    with_request,
};

/// The world every case is added to: `payment` behind the `waypoint` Gateway, one
/// payment pod on `node-1` with exactly the labels the model cases use.
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: production
  labels: {ambit.dev/dataplane-mode: ambient}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: production}
spec:
  gatewayClassName: ambit-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
---
apiVersion: v1
kind: Pod
metadata:
  name: payment-0
  namespace: production
  labels: {app: payment}
spec:
  nodeName: node-1
  serviceAccountName: payment
  containers: [{name: payment, image: sim.ambit.dev/ambit-echo}]
status:
  phase: Running
  podIP: 10.244.1.7
  podIPs: [{ip: 10.244.1.7}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata:
  name: payment
  namespace: production
  labels: {ambit.dev/use-waypoint: waypoint}
spec:
  clusterIP: 10.96.0.11
  selector: {app: payment}
  ports:
  - {name: http, port: 8080, targetPort: 8080}
"#;

// ---------------------------------------------------------------------------------
// The model path (as policy_table.rs).

fn enforced(yaml: &str) -> (Vec<AuthzPolicy>, Vec<PeerAuthn>) {
    let mut authz = Vec::new();
    let mut peer = Vec::new();
    for (_, v) in validate_file("case.yaml", yaml, &ValidationContext::default()) {
        match v.enforced() {
            Some(ModelObject::Authz(p)) => authz.push(p.clone()),
            Some(ModelObject::PeerAuthn(p)) => peer.push(p.clone()),
            _ => {}
        }
    }
    (authz, peer)
}

fn payment() -> WorkloadRef {
    WorkloadRef {
        namespace: NamespaceName::new("production"),
        labels: BTreeMap::from([("app".to_owned(), "payment".to_owned())]),
    }
}

fn waypoint_targets() -> Vec<PolicyTarget> {
    vec![
        service_target("production", "payment"),
        gateway_target("production", "waypoint"),
    ]
}

struct Model {
    authz: Vec<AuthzPolicy>,
    peer: Vec<PeerAuthn>,
}

impl Model {
    fn new(yaml: &str) -> Self {
        let (authz, peer) = enforced(yaml);
        Self { authz, peer }
    }

    fn decide(&self, point: Point, conn: &ConnectionAttrs) -> Decision {
        match point {
            Daemon => {
                // The daemon parses no request: it decides on the connection alone.
                let l4 = ConnectionAttrs {
                    request: None,
                    ..conn.clone()
                };
                authorize(policies_for_workload(&self.authz, &payment()), &l4)
            }
            Waypoint => {
                let targets = waypoint_targets();
                authorize(
                    self.authz
                        .iter()
                        .filter(|p| targets.iter().any(|t| p.targets(t))),
                    conn,
                )
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The wire path.

fn world(case_yaml: &str) -> World {
    let settings = WorldSettings {
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        trust_bundle_pem: vec![
            "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n".into(),
        ],
    };
    let ctx = ValidationContext::default();
    let mut docs = Vec::new();
    for (name, text) in [("00-base.yaml", BASE), ("10-case.yaml", case_yaml)] {
        for parsed in parse_documents(name, text) {
            let validated = validate_document(&parsed, &ctx);
            docs.push(Arc::new(Document {
                origin: OriginId(name.to_owned()),
                parsed,
                validated,
            }));
        }
    }
    World::build(1, true, &settings, docs)
}

struct Wire {
    node: ProxyPolicies,
    waypoint: ProxyPolicies,
    /// The destination pod, from the served `Workload` resource.
    payment: WorkloadRef,
}

impl Wire {
    fn new(case_yaml: &str) -> Self {
        let w = world(case_yaml);
        let node = w.resources_for(&Subscriber::Node {
            name: "node-1".into(),
        });
        let waypoint = w.resources_for(&Subscriber::Waypoint {
            namespace: "production".into(),
            name: "waypoint".into(),
        });
        assert!(
            waypoint
                .keys()
                .any(|k| k.starts_with("Service/production/payment")),
            "the waypoint does not front payment: {:?}",
            waypoint.keys()
        );
        let payment = node
            .values()
            .find_map(|r| match &r.kind {
                Some(Kind::Workload(w)) if w.name == "payment-0" => Some(workload_ref(w)),
                _ => None,
            })
            .unwrap();
        Self {
            node: proxy_policies(&node),
            waypoint: proxy_policies(&waypoint),
            payment,
        }
    }

    fn decide(&self, point: Point, conn: &ConnectionAttrs) -> Decision {
        match point {
            Daemon => self.node.authorize_l4(&self.payment, conn),
            Waypoint => self.waypoint.authorize_targets(&waypoint_targets(), conn),
        }
    }
}

fn proxy_policies(resources: &BTreeMap<String, Resource>) -> ProxyPolicies {
    ProxyPolicies::from_resources(resources.values())
        .unwrap_or_else(|e| panic!("a served resource fails conversion: {e}: {:?}", e.problem))
}

/// A decision without what the wire does not carry (kind, creation time).
fn comparable(d: &Decision) -> (Verdict, String, Vec<String>) {
    let name = |id: &ObjectId| format!("{}/{}", id.namespace, id.name);
    let reason = match &d.reason {
        DecisionReason::DeniedBy(id) => format!("denied by {}", name(id)),
        DecisionReason::AllowedBy(id) => format!("allowed by {}", name(id)),
        DecisionReason::NoAllowPolicy => "no allow policy".to_owned(),
        DecisionReason::NoAllowMatched => "no allow matched".to_owned(),
    };
    (d.verdict, reason, d.audited_by.iter().map(name).collect())
}

// ---------------------------------------------------------------------------------
// Connections (beyond those of `common/policy_cases.rs`).

fn with_host(mut c: ConnectionAttrs, host: &str) -> ConnectionAttrs {
    if let Some(r) = c.request.as_mut() {
        r.host = host.into();
    }
    c
}

fn with_remote(mut c: ConnectionAttrs, remote: &str) -> ConnectionAttrs {
    if let Some(r) = c.request.as_mut() {
        r.remote_ip = Some(ip(remote));
    }
    c
}

fn without_headers(mut c: ConnectionAttrs) -> ConnectionAttrs {
    if let Some(r) = c.request.as_mut() {
        r.headers.clear();
    }
    c
}

/// Connections every case is additionally evaluated with, at both points.
fn probes() -> Vec<(&'static str, ConnectionAttrs)> {
    vec![
        ("checkout", checkout()),
        ("inventory", inventory()),
        ("legacy", from("legacy", "app", "10.244.3.3")),
        ("plaintext in cluster", plaintext("10.244.1.5")),
        ("plaintext outside", plaintext("192.168.1.1")),
        ("checkout on 9090", on_port(checkout(), 9090)),
        (
            "checkout GET",
            with_request(checkout(), "GET", "/api/v1/orders"),
        ),
        (
            "checkout POST",
            with_request(checkout(), "POST", "/api/v1/orders"),
        ),
        (
            "inventory GET",
            with_request(inventory(), "GET", "/api/v1/orders"),
        ),
        (
            "plaintext GET",
            with_request(plaintext("10.244.1.5"), "GET", "/"),
        ),
        (
            "checkout GET other path",
            with_request(checkout(), "GET", "/api/v1/orders/1?x=y"),
        ),
        (
            "checkout GET public",
            with_request(checkout(), "GET", "/public/x"),
        ),
        (
            "checkout GET admin",
            with_request(checkout(), "GET", "/admin/users"),
        ),
        (
            "checkout GET upper-case host",
            with_host(
                with_request(checkout(), "GET", "/"),
                "PAYMENT.production.svc.cluster.local",
            ),
        ),
        (
            "checkout GET other host",
            with_host(with_request(checkout(), "GET", "/"), "evil.example.com:80"),
        ),
        (
            "checkout GET via proxy",
            with_remote(with_request(checkout(), "GET", "/"), "203.0.113.9"),
        ),
        (
            "checkout GET no headers",
            without_headers(with_request(checkout(), "GET", "/")),
        ),
        (
            "legacy DELETE on 9090",
            on_port(
                with_request(from("legacy", "app", "10.244.3.3"), "DELETE", "/x"),
                9090,
            ),
        ),
    ]
}

// ---------------------------------------------------------------------------------
// The cases: those of `policy_table.rs` (`authz_cases`, in `common/policy_cases.rs`)
// and these.

/// Cases aimed at the translation's corners.
fn corner_cases() -> Vec<Case> {
    let payment_sel = "  selector:\n    matchLabels: {app: payment}\n";
    let target_payment = "  targetRefs:\n  - {kind: Service, group: \"\", name: payment}\n";
    let target_waypoint =
        "  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n";
    vec![
        Case {
            name: "an unevaluable alternative makes an ALLOW rule fail closed at the waypoint",
            yaml: ap(
                "jwt-or-checkout",
                "production",
                &format!(
                    "{target_payment}  rules:\n  - from:\n    - source: {{requestPrincipals: ['*']}}\n    - source: {{principals: [cluster.local/ns/production/sa/checkout]}}"
                ),
            ),
            checks: vec![(
                "checkout GET",
                with_request(checkout(), "GET", "/"),
                Deny,
                Waypoint,
            )],
        },
        Case {
            name: "an unevaluable field makes a DENY match more",
            yaml: ap(
                "jwt-deny",
                "production",
                &format!(
                    "{payment_sel}  action: DENY\n  rules:\n  - from:\n    - source: {{requestPrincipals: ['*'], namespaces: [legacy]}}"
                ),
            ) + &ap(
                "jwt-deny-waypoint",
                "production",
                &format!(
                    "{target_payment}  action: DENY\n  rules:\n  - from:\n    - source: {{notRequestPrincipals: ['*'], namespaces: [legacy]}}"
                ),
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("legacy", from("legacy", "a", "10.0.0.1"), Deny, Daemon),
                (
                    "legacy at the waypoint",
                    with_request(from("legacy", "a", "10.0.0.1"), "GET", "/"),
                    Deny,
                    Waypoint,
                ),
            ],
        },
        Case {
            name: "unevaluable when conditions",
            yaml: ap(
                "claims-allow",
                "production",
                &format!(
                    "{payment_sel}  rules:\n  - from:\n    - source: {{namespaces: [production]}}\n    when:\n    - {{key: 'request.auth.claims[iss]', values: [x]}}\n  - from:\n    - source: {{namespaces: [legacy]}}"
                ),
            ) + &ap(
                "sni-deny",
                "production",
                &format!(
                    "{payment_sel}  action: DENY\n  rules:\n  - to:\n    - operation: {{ports: ['9090']}}\n    when:\n    - {{key: connection.sni, values: [x]}}"
                ),
            ),
            checks: vec![
                ("checkout", checkout(), Deny, Daemon),
                ("legacy", from("legacy", "a", "10.0.0.1"), Allow, Daemon),
                (
                    "legacy on 9090",
                    on_port(from("legacy", "a", "10.0.0.1"), 9090),
                    Deny,
                    Daemon,
                ),
            ],
        },
        Case {
            name: "serviceAccounts, alone and with principals",
            yaml: ap(
                "sa",
                "production",
                &format!(
                    "{payment_sel}  rules:\n  - from:\n    - source: {{serviceAccounts: [production/checkout]}}\n    - source: {{principals: ['*/sa/inventory'], serviceAccounts: [production/inventory, production/checkout]}}\n    - source: {{namespaces: [legacy], notServiceAccounts: [legacy/app]}}"
                ),
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("inventory", inventory(), Allow, Daemon),
                (
                    "legacy app",
                    from("legacy", "app", "10.0.0.1"),
                    Deny,
                    Daemon,
                ),
                (
                    "legacy other",
                    from("legacy", "b", "10.0.0.1"),
                    Allow,
                    Daemon,
                ),
                ("plaintext", plaintext("10.244.1.5"), Deny, Daemon),
            ],
        },
        Case {
            name: "principal wildcards and when source.principal / source.namespace",
            yaml: ap(
                "wild",
                "production",
                "  rules:\n  - from:\n    - source: {principals: ['cluster.local/ns/production/*']}\n    when:\n    - {key: source.principal, notValues: ['*/sa/inventory']}\n    - {key: source.namespace, values: ['prod*']}",
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("inventory", inventory(), Deny, Daemon),
                ("plaintext", plaintext("10.244.1.5"), Deny, Daemon),
            ],
        },
        Case {
            name: "when destination.ip and notPorts",
            yaml: ap(
                "dst",
                "production",
                &format!(
                    "{payment_sel}  rules:\n  - to:\n    - operation: {{notPorts: ['9090']}}\n    when:\n    - {{key: destination.ip, values: [10.244.1.0/24]}}"
                ),
            ),
            checks: vec![
                ("8080", checkout(), Allow, Daemon),
                ("9090", on_port(checkout(), 9090), Deny, Daemon),
            ],
        },
        Case {
            name: "AUDIT with L7 fields at the daemon, and several matching policies",
            yaml: ap(
                "audit-get",
                "production",
                &format!(
                    "{payment_sel}  action: AUDIT\n  rules:\n  - to:\n    - operation: {{methods: [GET]}}"
                ),
            ) + &ap(
                "audit-all",
                "production",
                "  action: AUDIT\n  rules:\n  - {}",
            ) + &ap(
                "z-deny-legacy",
                "production",
                "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}",
            ) + &ap(
                "a-deny-legacy",
                "production",
                "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: ['leg*']}",
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("legacy", from("legacy", "a", "10.0.0.1"), Deny, Daemon),
            ],
        },
        Case {
            name: "DENY by header at the daemon denies more",
            yaml: ap(
                "tenant-daemon",
                "production",
                &format!(
                    "{payment_sel}  action: DENY\n  rules:\n  - from:\n    - source: {{namespaces: [legacy]}}\n    when:\n    - {{key: 'request.headers[x-tenant]', notValues: [acme]}}"
                ),
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("legacy", from("legacy", "a", "10.0.0.1"), Deny, Daemon),
            ],
        },
        Case {
            name: "hosts, notMethods and remoteIpBlocks at the waypoint",
            yaml: ap(
                "hosts",
                "production",
                &format!(
                    "{target_payment}  rules:\n  - to:\n    - operation: {{hosts: ['payment.production.svc.cluster.local', '*.example.com'], notMethods: [DELETE]}}\n  - from:\n    - source: {{remoteIpBlocks: [203.0.113.0/24]}}"
                ),
            ) + &ap(
                "remote-deny",
                "production",
                &format!(
                    "{target_payment}  action: DENY\n  rules:\n  - from:\n    - source: {{notRemoteIpBlocks: [10.0.0.0/8, 203.0.113.0/24]}}"
                ),
            ),
            checks: vec![
                (
                    "checkout GET",
                    with_request(checkout(), "GET", "/"),
                    Allow,
                    Waypoint,
                ),
                (
                    "upper-case host",
                    with_host(
                        with_request(checkout(), "GET", "/"),
                        "PAYMENT.production.svc.cluster.local",
                    ),
                    Allow,
                    Waypoint,
                ),
                (
                    "DELETE",
                    with_request(checkout(), "DELETE", "/"),
                    Deny,
                    Waypoint,
                ),
                ("TCP", checkout(), Deny, Waypoint),
            ],
        },
        Case {
            name: "hosts are matched with and without their port",
            yaml: ap(
                "host-port",
                "production",
                &format!(
                    "{target_payment}  action: DENY\n  rules:\n  - to:\n    - operation: {{hosts: ['*:8080']}}"
                ),
            ),
            checks: vec![
                (
                    "with port",
                    with_request(checkout(), "GET", "/"),
                    Deny,
                    Waypoint,
                ),
                (
                    "without port",
                    with_host(with_request(checkout(), "GET", "/"), "payment"),
                    Allow,
                    Waypoint,
                ),
            ],
        },
        Case {
            name: "remote.ip and headers in when at the waypoint",
            yaml: ap(
                "remote-when",
                "production",
                &format!(
                    "{target_waypoint}  rules:\n  - when:\n    - {{key: remote.ip, values: [10.244.0.0/16]}}\n    - {{key: 'request.headers[x-tenant]', values: ['ac*']}}"
                ),
            ),
            checks: vec![
                (
                    "checkout GET",
                    with_request(checkout(), "GET", "/"),
                    Allow,
                    Waypoint,
                ),
                (
                    "via proxy",
                    with_remote(with_request(checkout(), "GET", "/"), "203.0.113.9"),
                    Deny,
                    Waypoint,
                ),
                (
                    "no header",
                    without_headers(with_request(checkout(), "GET", "/")),
                    Deny,
                    Waypoint,
                ),
            ],
        },
        Case {
            name: "path wildcards and templates at the waypoint, mesh DENY at the daemon",
            yaml: ap(
                "paths",
                "production",
                &format!(
                    "{target_payment}  rules:\n  - to:\n    - operation: {{paths: ['/public/*', '*/users', '/api/{{*}}/orders/{{**}}']}}"
                ),
            ) + &ap(
                "mesh-deny-9090",
                "istio-system",
                "  action: DENY\n  rules:\n  - to:\n    - operation: {ports: ['9090']}",
            ),
            checks: vec![
                (
                    "public",
                    with_request(checkout(), "GET", "/public/x"),
                    Allow,
                    Waypoint,
                ),
                (
                    "users",
                    with_request(checkout(), "GET", "/admin/users"),
                    Allow,
                    Waypoint,
                ),
                (
                    "template",
                    with_request(checkout(), "GET", "/api/v1/orders/1?x=y"),
                    Allow,
                    Waypoint,
                ),
                (
                    "no match",
                    with_request(checkout(), "GET", "/api/v1/orders"),
                    Deny,
                    Waypoint,
                ),
                (
                    "9090 at the daemon",
                    on_port(checkout(), 9090),
                    Deny,
                    Daemon,
                ),
            ],
        },
    ]
}

#[test]
fn authorization_decisions_are_the_same_on_the_wire() {
    let probes = probes();
    let mut failures = Vec::new();
    let mut compared = 0;
    let cases: Vec<Case> = authz_cases().into_iter().chain(corner_cases()).collect();
    for case in &cases {
        let model = Model::new(&case.yaml);
        let wire = Wire::new(&case.yaml);
        for (what, conn, want, point) in &case.checks {
            let got = wire.decide(*point, conn).verdict;
            if got != *want {
                failures.push(format!(
                    "{}: {what} at {point:?}: wire says {got:?}, the table {want:?}",
                    case.name
                ));
            }
        }
        let own = case.checks.iter().map(|(w, c, _, _)| (*w, c.clone()));
        for (what, conn) in own.chain(probes.iter().cloned()) {
            for point in [Daemon, Waypoint] {
                let m = comparable(&model.decide(point, &conn));
                let w = comparable(&wire.decide(point, &conn));
                compared += 1;
                if m != w {
                    failures.push(format!(
                        "{}: {what} at {point:?}: model {m:?}, wire {w:?}",
                        case.name
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {compared} decisions differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(compared > 1000, "only {compared} decisions compared");
}

#[test]
fn mtls_modes_are_the_same_on_the_wire() {
    let mesh_strict = pa("default", "istio-system", "  mtls: {mode: STRICT}");
    let ns_permissive = pa("default", "production", "  mtls: {mode: PERMISSIVE}");
    let wl = |name: &str, spec: &str| {
        pa(
            name,
            "production",
            &format!("  selector:\n    matchLabels: {{app: payment}}\n{spec}"),
        )
    };
    let cases: Vec<(&str, String)> = vec![
        ("no policy", String::new()),
        ("mesh strict", mesh_strict.clone()),
        (
            "namespace overrides mesh",
            mesh_strict.clone() + &ns_permissive,
        ),
        (
            "workload overrides namespace",
            mesh_strict.clone() + &ns_permissive + &wl("payment", "  mtls: {mode: STRICT}"),
        ),
        (
            "workload UNSET inherits namespace",
            ns_permissive.clone() + &wl("payment", "  mtls: {mode: UNSET}"),
        ),
        (
            "namespace UNSET inherits mesh",
            mesh_strict.clone() + &pa("default", "production", "  mtls: {}"),
        ),
        (
            "port-level override under an inherited STRICT",
            mesh_strict.clone()
                + &wl(
                    "payment",
                    "  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n    9091: {}",
                ),
        ),
        (
            "port-level STRICT under a PERMISSIVE workload",
            wl(
                "payment",
                "  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    '9090': {mode: STRICT}",
            ),
        ),
        ("DISABLE", wl("payment", "  mtls: {mode: DISABLE}")),
        (
            "a selector for another workload does not apply",
            mesh_strict.clone()
                + &pa(
                    "other",
                    "production",
                    "  selector:\n    matchLabels: {app: inventory}\n  mtls: {mode: PERMISSIVE}",
                ),
        ),
        (
            "another namespace's policy does not apply",
            pa("default", "staging", "  mtls: {mode: STRICT}"),
        ),
        (
            "the oldest namespace policy wins",
            pa_created(
                "newer",
                "production",
                "2025-02-01T00:00:00Z",
                "  mtls: {mode: STRICT}",
            ) + &pa_created(
                "older",
                "production",
                "2025-01-01T00:00:00.5Z",
                "  mtls: {mode: PERMISSIVE}",
            ),
        ),
        (
            "the oldest workload policy wins, then the name",
            pa_created(
                "b",
                "production",
                "2025-01-01T00:00:00Z",
                "  selector:\n    matchLabels: {app: payment}\n  mtls: {mode: DISABLE}",
            ) + &pa_created(
                "a",
                "production",
                "2025-01-01T00:00:00Z",
                "  selector:\n    matchLabels: {app: payment}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    9090: {mode: PERMISSIVE}",
            ) + &pa_created(
                "c",
                "production",
                "2024-12-31T23:59:59.999Z",
                "  selector:\n    matchLabels: {app: payment}\n  mtls: {mode: UNSET}",
            ),
        ),
        (
            "a rejected policy is enforced as STRICT",
            pa("typo", "production", "  mtls: {mode: PERMISIVE}"),
        ),
    ];
    let mut failures = Vec::new();
    for (name, yaml) in &cases {
        let model = Model::new(yaml);
        let wire = Wire::new(yaml);
        let pas: Vec<&PeerAuthn> = model.peer.iter().collect();
        for port in [8080, 9090, 9091, 15006] {
            let m = effective_mtls_mode(pas.iter().copied(), &payment(), port);
            let w = wire.node.mtls_mode(&wire.payment, port);
            if m != w {
                failures.push(format!("{name}: port {port}: model {m:?}, wire {w:?}"));
            }
        }
        // Creation times survive the wire in the model's form.
        for p in wire.node.peer_authentications() {
            let original = model
                .peer
                .iter()
                .find(|m| m.id.namespace == p.id.namespace && m.id.name == p.id.name)
                .unwrap();
            if original.id.created != p.id.created {
                failures.push(format!(
                    "{name}: {}: created {:?} became {:?}",
                    p.id, original.id.created, p.id.created
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
