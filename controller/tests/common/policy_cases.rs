//! The AuthorizationPolicy cases and the connection and manifest helpers shared by
//! `policy_table.rs` (the model path) and `wire_policy_equivalence.rs` (the wire
//! path). Included by each test target with `#[path = "common/policy_cases.rs"]`.
#![allow(
    dead_code,
    reason = "shared by several test targets, each using a different subset"
)]

use std::net::IpAddr;

use ambit_controller::model::authz::{ConnectionAttrs, PeerIdentity, RequestAttrs, Verdict};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An mTLS connection from `sa` in `ns`, from `src`, to payment's port 8080.
pub fn from(ns: &str, sa: &str, src: &str) -> ConnectionAttrs {
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

pub fn checkout() -> ConnectionAttrs {
    from("production", "checkout", "10.244.1.5")
}

pub fn inventory() -> ConnectionAttrs {
    from("production", "inventory", "10.244.2.9")
}

pub fn plaintext(src: &str) -> ConnectionAttrs {
    ConnectionAttrs {
        source: None,
        ..from("x", "x", src)
    }
}

pub fn on_port(mut c: ConnectionAttrs, port: u16) -> ConnectionAttrs {
    c.destination_port = port;
    c
}

pub fn with_request(mut c: ConnectionAttrs, method: &str, path: &str) -> ConnectionAttrs {
    c.request = Some(RequestAttrs {
        method: method.into(),
        path: path.into(),
        host: "payment.production.svc.cluster.local:8080".into(),
        headers: vec![("x-tenant".into(), "acme".into())],
        remote_ip: None,
    });
    c
}

pub const HEAD: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n";

pub fn ap(name: &str, ns: &str, spec: &str) -> String {
    format!("{HEAD}metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n---\n")
}

pub const PA: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n";

pub fn pa(name: &str, ns: &str, spec: &str) -> String {
    format!("{PA}metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}\n---\n")
}

pub fn pa_created(name: &str, ns: &str, created: &str, spec: &str) -> String {
    format!(
        "{PA}metadata:\n  name: {name}\n  namespace: {ns}\n  creationTimestamp: \"{created}\"\nspec:\n{spec}\n---\n"
    )
}

/// Where a check is evaluated: the node daemon in front of the payment pod, or the
/// waypoint in front of the payment Service.
#[derive(Clone, Copy, Debug)]
pub enum Point {
    Daemon,
    Waypoint,
}

use Point::{Daemon, Waypoint};
use Verdict::{Allow, Deny};

pub struct Case {
    pub name: &'static str,
    pub yaml: String,
    pub checks: Vec<(&'static str, ConnectionAttrs, Verdict, Point)>,
}

/// The AuthorizationPolicy table: every case with the verdicts it must give.
pub fn authz_cases() -> Vec<Case> {
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
