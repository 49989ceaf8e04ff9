//! AuthorizationPolicy and PeerAuthentication, from YAML to decisions: each case
//! parses and validates manifests as the controller does, takes the model objects in
//! force (fail-closed stand-ins included), and evaluates them.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

#[path = "common/policy_cases.rs"]
mod policy_cases;

use std::collections::BTreeMap;

use ambit_controller::{
    model::{
        NamespaceName, WorkloadRef,
        authz::{
            AuthzPolicy, ConnectionAttrs, DecisionReason, PolicyTarget, TargetKind, Verdict,
            authorize, policies_for_workload,
        },
        peer_authn::{MtlsMode, PeerAuthn, effective_mtls_mode},
    },
    validate::{ModelObject, ValidationContext, validate_file},
};
use policy_cases::{
    Point::{Daemon, Waypoint},
    ap, authz_cases, checkout, from, inventory, pa, pa_created,
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
