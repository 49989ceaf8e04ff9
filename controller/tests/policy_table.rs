//! AuthorizationPolicy and PeerAuthentication, from YAML to decisions: each case
//! parses and validates manifests as the controller does, takes the model objects in
//! force (fail-closed stand-ins included), and evaluates them.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{collections::BTreeMap, net::IpAddr};

use ambit_controller::{
    model::{
        NamespaceName, WorkloadRef,
        authz::{
            AuthzPolicy, ConnectionAttrs, DecisionReason, PeerIdentity, PolicyTarget, RequestAttrs,
            TargetKind, Verdict, authorize, policies_for_workload,
        },
        peer_authn::{MtlsMode, PeerAuthn, effective_mtls_mode},
    },
    validate::{ModelObject, ValidationContext, validate_file},
};

fn enforced(yaml: &str, ctx: &ValidationContext) -> (Vec<AuthzPolicy>, Vec<PeerAuthn>) {
    let mut authz = Vec::new();
    let mut peer = Vec::new();
    for (_, v) in validate_file("case.yaml", yaml, ctx) {
        match v.enforced() {
            Some(ModelObject::Authz(p)) => authz.push(p.clone()),
            Some(ModelObject::PeerAuthn(p)) => peer.push(p.clone()),
            _ => {}
        }
    }
    (authz, peer)
}

fn workload(ns: &str, labels: &[(&str, &str)]) -> WorkloadRef {
    WorkloadRef {
        namespace: NamespaceName::new(ns),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn payment() -> WorkloadRef {
    workload("production", &[("app", "payment")])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An mTLS connection from `sa` in `ns`, from `src`, to payment's port 8080.
fn from(ns: &str, sa: &str, src: &str) -> ConnectionAttrs {
    ConnectionAttrs {
        source: Some(PeerIdentity {
            trust_domain: "cluster.local".into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }),
        source_ip: ip(src),
        destination_ip: ip("10.244.1.7"),
        destination_port: 8080,
        request: None,
    }
}

fn checkout() -> ConnectionAttrs {
    from("production", "checkout", "10.244.1.5")
}

fn inventory() -> ConnectionAttrs {
    from("production", "inventory", "10.244.2.9")
}

fn plaintext(src: &str) -> ConnectionAttrs {
    ConnectionAttrs {
        source: None,
        ..from("x", "x", src)
    }
}

fn on_port(mut c: ConnectionAttrs, port: u16) -> ConnectionAttrs {
    c.destination_port = port;
    c
}

fn with_request(mut c: ConnectionAttrs, method: &str, path: &str) -> ConnectionAttrs {
    c.request = Some(RequestAttrs {
        method: method.into(),
        path: path.into(),
        host: "payment.production.svc.cluster.local:8080".into(),
        headers: vec![("x-tenant".into(), "acme".into())],
        remote_ip: None,
    });
    c
}

/// The daemon's decision for payment.
fn at_daemon(policies: &[AuthzPolicy], conn: &ConnectionAttrs) -> Verdict {
    let w = payment();
    authorize(policies_for_workload(policies, &w), conn).verdict
}

/// The waypoint's decision for the payment Service.
fn at_waypoint(policies: &[AuthzPolicy], conn: &ConnectionAttrs) -> Verdict {
    let target = PolicyTarget {
        kind: TargetKind::Service,
        namespace: NamespaceName::new("production"),
        name: "payment".into(),
    };
    authorize(policies.iter().filter(|p| p.targets(&target)), conn).verdict
}

const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

fn ap(name: &str, ns: &str, spec: &str) -> String {
    format!("{HEAD}metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n---\n")
}

struct Case {
    name: &'static str,
    yaml: String,
    checks: Vec<(&'static str, ConnectionAttrs, Verdict, Point)>,
}

#[derive(Clone, Copy)]
enum Point {
    Daemon,
    Waypoint,
}

use Point::{Daemon, Waypoint};
use Verdict::{Allow, Deny};

fn authz_cases() -> Vec<Case> {
    let payment_sel = "  selector:\n    matchLabels: {app: payment}\n";
    let target_payment = "  targetRefs:\n  - {kind: Service, group: \"\", name: payment}\n";
    vec![
        Case {
            name: "no policy allows",
            yaml: String::new(),
            checks: vec![("checkout", checkout(), Allow, Daemon)],
        },
        Case {
            name: "spec: {} allows nothing",
            yaml: ap("deny-all", "production", "  {}"),
            checks: vec![
                ("checkout", checkout(), Deny, Daemon),
                ("plaintext", plaintext("10.244.1.5"), Deny, Daemon),
            ],
        },
        Case {
            name: "rules: [{}] allows all",
            yaml: ap("allow-all", "production", "  rules:\n  - {}"),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("plaintext", plaintext("10.1.1.1"), Allow, Daemon),
            ],
        },
        Case {
            name: "DENY without rules never matches",
            yaml: ap("deny-nothing", "production", "  action: DENY"),
            checks: vec![("checkout", checkout(), Allow, Daemon)],
        },
        Case {
            name: "DENY beats ALLOW",
            yaml: ap("allow-all", "production", "  rules:\n  - {}")
                + &ap(
                    "deny-inventory",
                    "production",
                    "  action: DENY\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/production/sa/inventory]}",
                ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("inventory", inventory(), Deny, Daemon),
            ],
        },
        Case {
            name: "AUDIT does not affect the decision",
            yaml: ap("audit", "production", "  action: AUDIT\n  rules:\n  - {}"),
            checks: vec![("checkout", checkout(), Allow, Daemon)],
        },
        Case {
            name: "AUDIT with spec {} still denies",
            yaml: ap("audit", "production", "  action: AUDIT\n  rules:\n  - {}")
                + &ap("deny-all", "production", "  {}"),
            checks: vec![("checkout", checkout(), Deny, Daemon)],
        },
        Case {
            name: "ALLOW by principal",
            yaml: ap(
                "checkout-only",
                "production",
                &format!(
                    "{payment_sel}  rules:\n  - from:\n    - source: {{principals: [cluster.local/ns/production/sa/checkout]}}"
                ),
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("inventory", inventory(), Deny, Daemon),
                ("plaintext", plaintext("10.244.1.5"), Deny, Daemon),
            ],
        },
        Case {
            name: "principals: [*] requires an identity",
            yaml: ap(
                "any-identity",
                "production",
                "  rules:\n  - from:\n    - source: {principals: ['*']}",
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("plaintext", plaintext("10.244.1.5"), Deny, Daemon),
            ],
        },
        Case {
            name: "notPrincipals in DENY",
            yaml: ap(
                "only-checkout",
                "production",
                "  action: DENY\n  rules:\n  - from:\n    - source: {notPrincipals: [cluster.local/ns/production/sa/checkout]}",
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("inventory", inventory(), Deny, Daemon),
                ("plaintext", plaintext("10.244.1.5"), Deny, Daemon),
            ],
        },
        Case {
            name: "notNamespaces in ALLOW",
            yaml: ap(
                "not-legacy",
                "production",
                "  rules:\n  - from:\n    - source: {notNamespaces: [legacy]}",
            ),
            checks: vec![
                ("production", checkout(), Allow, Daemon),
                ("legacy", from("legacy", "app", "10.244.3.3"), Deny, Daemon),
                // As in Istio: without an identity the namespace is empty, which is not `legacy`.
                ("plaintext", plaintext("10.244.3.3"), Allow, Daemon),
            ],
        },
        Case {
            name: "namespaces with a wildcard",
            yaml: ap(
                "prod-star",
                "production",
                "  rules:\n  - from:\n    - source: {namespaces: ['prod*']}",
            ),
            checks: vec![
                ("production", checkout(), Allow, Daemon),
                ("legacy", from("legacy", "a", "10.0.0.1"), Deny, Daemon),
            ],
        },
        Case {
            name: "ipBlocks and notIpBlocks",
            yaml: ap(
                "cidr",
                "production",
                "  rules:\n  - from:\n    - source: {ipBlocks: [10.244.0.0/16], notIpBlocks: [10.244.2.0/24]}",
            ),
            checks: vec![
                ("in block", checkout(), Allow, Daemon),
                ("excluded", inventory(), Deny, Daemon),
                (
                    "outside",
                    from("production", "checkout", "192.168.1.1"),
                    Deny,
                    Daemon,
                ),
                ("plaintext in block", plaintext("10.244.1.1"), Allow, Daemon),
            ],
        },
        Case {
            name: "ports",
            yaml: ap(
                "ports",
                "production",
                "  rules:\n  - to:\n    - operation: {ports: ['8080']}",
            ),
            checks: vec![
                ("8080", checkout(), Allow, Daemon),
                ("9090", on_port(checkout(), 9090), Deny, Daemon),
            ],
        },
        Case {
            name: "when source.ip and destination.port",
            yaml: ap(
                "when",
                "production",
                "  rules:\n  - when:\n    - {key: source.ip, values: [10.244.1.0/24]}\n    - {key: destination.port, notValues: ['9090']}",
            ),
            checks: vec![
                ("match", checkout(), Allow, Daemon),
                ("wrong ip", inventory(), Deny, Daemon),
                ("wrong port", on_port(checkout(), 9090), Deny, Daemon),
            ],
        },
        Case {
            name: "selector scopes the policy",
            yaml: ap(
                "inventory-lockdown",
                "production",
                "  selector:\n    matchLabels: {app: inventory}",
            ),
            checks: vec![("payment unaffected", checkout(), Allow, Daemon)],
        },
        Case {
            name: "another namespace's policy does not apply",
            yaml: ap("deny-all", "staging", "  {}"),
            checks: vec![("checkout", checkout(), Allow, Daemon)],
        },
        Case {
            name: "mesh-wide DENY from the root namespace",
            yaml: ap(
                "mesh-deny",
                "istio-system",
                "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}",
            ),
            checks: vec![
                ("production", checkout(), Allow, Daemon),
                ("legacy", from("legacy", "a", "10.0.0.1"), Deny, Daemon),
            ],
        },
        Case {
            name: "root-namespace selector applies in every namespace",
            yaml: ap(
                "mesh-payment",
                "istio-system",
                &format!(
                    "{payment_sel}  rules:\n  - from:\n    - source: {{namespaces: [production]}}"
                ),
            ),
            checks: vec![
                ("production", checkout(), Allow, Daemon),
                ("legacy", from("legacy", "a", "10.0.0.1"), Deny, Daemon),
            ],
        },
        Case {
            name: "L7 fields in a selector ALLOW fail closed at the daemon",
            yaml: ap(
                "get-only",
                "production",
                &format!(
                    "{payment_sel}  rules:\n  - from:\n    - source: {{principals: [cluster.local/ns/production/sa/checkout]}}\n    to:\n    - operation: {{methods: [GET]}}"
                ),
            ),
            checks: vec![
                ("checkout", checkout(), Deny, Daemon),
                ("inventory", inventory(), Deny, Daemon),
            ],
        },
        Case {
            name: "L7 rule fails closed but L4 rules of the same policy still allow",
            yaml: ap(
                "mixed",
                "production",
                &format!(
                    "{payment_sel}  rules:\n  - to:\n    - operation: {{paths: [/admin]}}\n  - from:\n    - source: {{principals: [cluster.local/ns/production/sa/checkout]}}"
                ),
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("inventory", inventory(), Deny, Daemon),
            ],
        },
        Case {
            name: "L7 fields in a selector DENY deny more at the daemon",
            yaml: ap(
                "no-post",
                "production",
                &format!(
                    "{payment_sel}  action: DENY\n  rules:\n  - to:\n    - operation: {{methods: [POST], ports: ['8080']}}"
                ),
            ),
            checks: vec![
                ("8080", checkout(), Deny, Daemon),
                ("9090", on_port(checkout(), 9090), Allow, Daemon),
            ],
        },
        Case {
            name: "targetRefs policy: L7 at the waypoint, not at the daemon",
            yaml: ap(
                "l7",
                "production",
                &format!(
                    "{target_payment}  rules:\n  - from:\n    - source: {{principals: [cluster.local/ns/production/sa/checkout]}}\n    to:\n    - operation: {{methods: [GET], paths: ['/api/{{*}}/orders']}}"
                ),
            ),
            checks: vec![
                (
                    "GET from checkout",
                    with_request(checkout(), "GET", "/api/v1/orders"),
                    Allow,
                    Waypoint,
                ),
                (
                    "POST from checkout",
                    with_request(checkout(), "POST", "/api/v1/orders"),
                    Deny,
                    Waypoint,
                ),
                (
                    "GET from inventory",
                    with_request(inventory(), "GET", "/api/v1/orders"),
                    Deny,
                    Waypoint,
                ),
                (
                    "other path",
                    with_request(checkout(), "GET", "/api/v1/orders/1"),
                    Deny,
                    Waypoint,
                ),
                ("TCP through the waypoint", checkout(), Deny, Waypoint),
                ("daemon ignores it", inventory(), Allow, Daemon),
            ],
        },
        Case {
            name: "targetRefs DENY by header and notPaths",
            yaml: ap(
                "tenant",
                "production",
                &format!(
                    "{target_payment}  action: DENY\n  rules:\n  - to:\n    - operation: {{notPaths: ['/public/*']}}\n    when:\n    - {{key: 'request.headers[x-tenant]', values: [acme]}}"
                ),
            ),
            checks: vec![
                (
                    "acme private",
                    with_request(checkout(), "GET", "/private"),
                    Deny,
                    Waypoint,
                ),
                (
                    "acme public",
                    with_request(checkout(), "GET", "/public/x"),
                    Allow,
                    Waypoint,
                ),
            ],
        },
        Case {
            name: "rejected ALLOW denies its scope without widening or blocking other ALLOWs",
            yaml: ap(
                "good",
                "production",
                "  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/production/sa/checkout]}",
            ) + &ap(
                "bad",
                "production",
                "  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/99]}",
            ),
            checks: vec![
                ("checkout", checkout(), Allow, Daemon),
                ("inventory", inventory(), Deny, Daemon),
            ],
        },
        Case {
            name: "rejected ALLOW alone denies",
            yaml: ap(
                "bad",
                "production",
                "  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/99]}",
            ),
            checks: vec![("checkout", checkout(), Deny, Daemon)],
        },
        Case {
            name: "rejected DENY denies everything in its scope",
            yaml: ap(
                "bad-deny",
                "production",
                "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [Legacy]}",
            ),
            checks: vec![("checkout", checkout(), Deny, Daemon)],
        },
        Case {
            name: "unknown action denies everything in its scope",
            yaml: ap(
                "typo",
                "production",
                "  action: DENNY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}",
            ),
            checks: vec![("checkout", checkout(), Deny, Daemon)],
        },
        Case {
            name: "CUSTOM denies what it would have sent to the provider",
            yaml: ap(
                "ext",
                "production",
                "  action: CUSTOM\n  provider: {name: opa}\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}",
            ),
            checks: vec![
                ("production", checkout(), Allow, Daemon),
                ("legacy", from("legacy", "a", "10.0.0.1"), Deny, Daemon),
            ],
        },
        Case {
            name: "requestPrincipals (JWT) never match in ALLOW",
            yaml: ap(
                "jwt",
                "production",
                &format!(
                    "{target_payment}  rules:\n  - from:\n    - source: {{requestPrincipals: ['*']}}"
                ),
            ),
            checks: vec![("GET", with_request(checkout(), "GET", "/"), Deny, Waypoint)],
        },
    ]
}

#[test]
fn authorization_policy_table() {
    let ctx = ValidationContext::default();
    let mut failures = Vec::new();
    for case in authz_cases() {
        let (policies, _) = enforced(&case.yaml, &ctx);
        for (what, conn, want, point) in &case.checks {
            let got = match point {
                Daemon => at_daemon(&policies, conn),
                Waypoint => at_waypoint(&policies, conn),
            };
            if got != *want {
                failures.push(format!("{}: {what}: got {got:?}, want {want:?}", case.name));
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

#[test]
fn decisions_say_which_policy_decided() {
    let ctx = ValidationContext::default();
    let yaml = ap(
        "allow-checkout",
        "production",
        "  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/production/sa/checkout]}",
    ) + &ap("audit", "production", "  action: AUDIT\n  rules:\n  - {}")
        + &ap(
            "deny-legacy",
            "production",
            "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [legacy]}",
        );
    let (policies, _) = enforced(&yaml, &ctx);
    let w = payment();
    let d = authorize(policies_for_workload(&policies, &w), &checkout());
    assert!(
        matches!(&d.reason, DecisionReason::AllowedBy(id) if id.name == "allow-checkout"),
        "{d:?}"
    );
    assert_eq!(d.audited_by.len(), 1);
    let d = authorize(
        policies_for_workload(&policies, &w),
        &from("legacy", "a", "10.0.0.1"),
    );
    assert!(
        matches!(&d.reason, DecisionReason::DeniedBy(id) if id.name == "deny-legacy"),
        "{d:?}"
    );
    let d = authorize(policies_for_workload(&policies, &w), &inventory());
    assert_eq!(d.reason, DecisionReason::NoAllowMatched);
}

#[test]
fn l7_in_selector_policy_is_accepted_with_a_warning() {
    let yaml = ap(
        "get-only",
        "production",
        "  selector:\n    matchLabels: {app: payment}\n  rules:\n  - to:\n    - operation: {methods: [GET]}",
    );
    let results = validate_file("case.yaml", &yaml, &ValidationContext::default());
    let v = &results[0].1;
    assert!(v.is_accepted());
    let w = v
        .warnings()
        .iter()
        .find(|w| w.field.as_str() == "spec.rules[0]")
        .expect("a warning on the rule");
    assert!(w.message.contains("never matches"), "{w}");
    // The rule is kept in the model (the waypoint copy, if the policy is retargeted,
    // and the dump show it), not dropped.
    let Some(ModelObject::Authz(p)) = v.enforced() else {
        panic!("no policy")
    };
    assert_eq!(p.rules.len(), 1);
}

const PA: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n";

fn pa(name: &str, ns: &str, spec: &str) -> String {
    format!("{PA}metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n---\n")
}

fn pa_created(name: &str, ns: &str, created: &str, spec: &str) -> String {
    format!(
        "{PA}metadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{created}\"\nspec:\n{spec}\n---\n"
    )
}

#[test]
fn peer_authentication_table() {
    use MtlsMode::{Disable, Permissive, Strict};
    let mesh_strict = pa("default", "istio-system", "  mtls: {mode: STRICT}");
    let ns_permissive = pa("default", "production", "  mtls: {mode: PERMISSIVE}");
    let wl = |spec: &str| {
        pa(
            "payment",
            "production",
            &format!("  selector:\n    matchLabels: {{app: payment}}\n{spec}"),
        )
    };
    type PaCase = (&'static str, String, Vec<(u16, MtlsMode)>);
    let cases: Vec<PaCase> = vec![
        (
            "no policy: permissive",
            String::new(),
            vec![(8080, Permissive)],
        ),
        ("mesh strict", mesh_strict.clone(), vec![(8080, Strict)]),
        (
            "namespace overrides mesh",
            mesh_strict.clone() + &ns_permissive,
            vec![(8080, Permissive)],
        ),
        (
            "workload overrides namespace",
            mesh_strict.clone() + &ns_permissive + &wl("  mtls: {mode: STRICT}"),
            vec![(8080, Strict)],
        ),
        (
            "workload UNSET inherits namespace",
            ns_permissive.clone() + &wl("  mtls: {mode: UNSET}"),
            vec![(8080, Permissive)],
        ),
        (
            "namespace UNSET inherits mesh",
            mesh_strict.clone() + &pa("default", "production", "  mtls: {}"),
            vec![(8080, Strict)],
        ),
        (
            "port-level override under an inherited STRICT",
            mesh_strict.clone()
                + &wl("  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n    9091: {}"),
            vec![(8080, Permissive), (9090, Strict), (9091, Strict)],
        ),
        (
            "port-level STRICT under a PERMISSIVE workload",
            wl("  mtls: {mode: PERMISSIVE}\n  portLevelMtls:\n    '9090': {mode: STRICT}"),
            vec![(8080, Permissive), (9090, Strict)],
        ),
        (
            "DISABLE",
            wl("  mtls: {mode: DISABLE}"),
            vec![(8080, Disable)],
        ),
        (
            "a selector for another workload does not apply",
            mesh_strict.clone()
                + &pa(
                    "other",
                    "production",
                    "  selector:\n    matchLabels: {app: inventory}\n  mtls: {mode: PERMISSIVE}",
                ),
            vec![(8080, Strict)],
        ),
        (
            "another namespace's policy does not apply",
            pa("default", "staging", "  mtls: {mode: STRICT}"),
            vec![(8080, Permissive)],
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
                "2025-01-01T00:00:00Z",
                "  mtls: {mode: PERMISSIVE}",
            ),
            vec![(8080, Permissive)],
        ),
        (
            "a rejected policy is enforced as STRICT",
            pa("typo", "production", "  mtls: {mode: PERMISIVE}"),
            vec![(8080, Strict)],
        ),
    ];
    let ctx = ValidationContext::default();
    let w = payment();
    let mut failures = Vec::new();
    for (name, yaml, checks) in cases {
        let (_, policies) = enforced(&yaml, &ctx);
        for (port, want) in checks {
            let got = effective_mtls_mode(&policies, &w, port);
            if got != want {
                failures.push(format!("{name}: port {port}: got {got:?}, want {want:?}"));
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

#[test]
fn root_namespace_is_configurable() {
    let ctx = ValidationContext {
        root_namespace: NamespaceName::new("ambit-system"),
    };
    let yaml = pa("default", "ambit-system", "  mtls: {mode: STRICT}")
        + &pa("default", "istio-system", "  mtls: {mode: DISABLE}");
    let (_, policies) = enforced(&yaml, &ctx);
    assert_eq!(
        effective_mtls_mode(&policies, &payment(), 8080),
        MtlsMode::Strict
    );
    let in_istio_system = workload("istio-system", &[]);
    assert_eq!(
        effective_mtls_mode(&policies, &in_istio_system, 8080),
        MtlsMode::Disable
    );
}
