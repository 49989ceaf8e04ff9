//! The Helm chart `deploy/charts/ambit` against the code: its RBAC grants every API
//! call the controller makes (the watched kinds, status writes, TokenReview, the
//! Lease, the CA Secret, the waypoints' ServiceAccounts, Services and Deployments),
//! and the controller Deployment sets only environment variables the controller reads.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::path::PathBuf;

use ambit_controller::{app::Config, resources::ResourceKind, source::kube::api_resource};
use clap::CommandFactory as _;
use serde::Deserialize as _;
use serde_yaml::Value;

const NAMESPACE: &str = "ambit-system";

fn chart_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/charts/ambit/templates")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .replace("{{ .Release.Namespace }}", NAMESPACE)
}

/// The documents of `rbac.yaml` (plain YAML once the namespace is filled in).
fn rbac() -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&chart_file("rbac.yaml"))
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a role's rules allow `verb` on `group`/`resource` (named `name`, if the
/// request names one).
fn allows(role: &Value, group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    role["rules"].as_sequence().unwrap().iter().any(|r| {
        let has = |field: &str, want: &str| {
            let list = strings(&r[field]);
            list.iter().any(|x| x == want || x == "*")
        };
        let names = strings(&r["resourceNames"]);
        has("apiGroups", group)
            && has("resources", resource)
            && has("verbs", verb)
            && (names.is_empty() || name.is_some_and(|n| names.iter().any(|x| x == n)))
    })
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in rbac.yaml"))
}

#[test]
fn rbac_grants_what_the_controller_does() {
    let docs = rbac();
    let cluster = find(&docs, "ClusterRole");
    let role = find(&docs, "Role");
    let mut missing = Vec::new();
    let mut need = |role: &Value, group: &str, resource: &str, verb: &str, name: Option<&str>| {
        if !allows(role, group, resource, verb, name) {
            missing.push(format!("{verb} {group}/{resource} {name:?}"));
        }
    };
    // The Kubernetes source watches every kind; the status writer reads and applies
    // the status of the Istio and Gateway API kinds.
    for kind in ResourceKind::ALL {
        let ar = api_resource(kind, "v1");
        for verb in ["get", "list", "watch"] {
            need(cluster, &ar.group, &ar.plural, verb, None);
        }
        if !matches!(ar.group.as_str(), "" | "discovery.k8s.io") {
            for verb in ["get", "patch"] {
                need(
                    cluster,
                    &ar.group,
                    &format!("{}/status", ar.plural),
                    verb,
                    None,
                );
            }
        }
    }
    need(
        cluster,
        "authentication.k8s.io",
        "tokenreviews",
        "create",
        None,
    );
    // The waypoint deployer reads, creates and applies these.
    for (group, resource) in [
        ("", "serviceaccounts"),
        ("", "services"),
        ("apps", "deployments"),
    ] {
        for verb in ["get", "create", "patch"] {
            need(cluster, group, resource, verb, None);
        }
    }
    // Leader election and the CA root, in the controller's namespace.
    let lease = "ambit-controller-status";
    need(role, "coordination.k8s.io", "leases", "get", Some(lease));
    need(role, "coordination.k8s.io", "leases", "update", Some(lease));
    need(role, "coordination.k8s.io", "leases", "create", None);
    need(role, "", "secrets", "get", Some("ambit-ca-root"));
    need(role, "", "secrets", "create", None);
    assert!(missing.is_empty(), "not granted: {missing:#?}");
    // Nothing beyond: no Secret of other names, no deletes.
    assert!(!allows(role, "", "secrets", "get", Some("other")));
    assert!(!allows(cluster, "apps", "deployments", "delete", None));

    // Both roles are bound to the controller's ServiceAccount.
    for (binding, role_kind) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let b = find(&docs, binding);
        assert_eq!(b["roleRef"]["kind"], role_kind);
        assert_eq!(
            b["roleRef"]["name"],
            find(&docs, role_kind)["metadata"]["name"]
        );
        assert_eq!(b["subjects"][0]["kind"], "ServiceAccount");
        assert_eq!(b["subjects"][0]["name"], "ambit-controller");
        assert_eq!(b["subjects"][0]["namespace"], NAMESPACE);
    }
    let sa = find(&docs, "ServiceAccount");
    assert_eq!(sa["metadata"]["name"], "ambit-controller");
}

#[test]
fn the_controller_deployment_sets_only_variables_the_controller_reads() {
    let known: Vec<String> = Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    let template = chart_file("controller.yaml");
    let env: Vec<&str> = template
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: "))
        .filter(|n| n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    for wanted in [
        "POD_NAME",
        "POD_NAMESPACE",
        "AMBIT_WAYPOINT_IMAGE",
        "AMBIT_WAYPOINT_CONTROLLER_ADDR",
        "AMBIT_TOKEN_AUDIENCE",
    ] {
        assert!(env.contains(&wanted), "{wanted} not set: {env:?}");
    }
    let unknown: Vec<&&str> = env
        .iter()
        .filter(|e| !known.iter().any(|k| k == *e))
        .collect();
    assert!(
        unknown.is_empty(),
        "not read by the controller: {unknown:?}"
    );
    // The address waypoints are given is the chart's Service, on the gRPC port.
    assert!(
        template.contains(&format!(
            "value: \"http://ambit-controller.{NAMESPACE}.svc:15012\""
        )),
        "{template}"
    );
}
