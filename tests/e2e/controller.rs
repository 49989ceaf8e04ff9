//! The mesh control plane on the simulated cluster: `ambit-controller` in local mode in
//! the control namespace reads the generated cluster objects, lists every one of them
//! Accepted in `/config_dump` (read with `ambitctl` inside the control namespace),
//! picks up an applied policy, explains a rejected one, and the node bootstrap tokens
//! are provisioned privately.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{collections::BTreeSet, os::unix::fs::PermissionsExt as _, time::Duration};

use ambit_simcluster::{Cluster, MeshOptions, Options, Place, Topology};

const STEP: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

fn mesh_cluster() -> Cluster {
    for bin in ["ambit-echo", "ambit-controller", "ambitctl"] {
        ambit_test_support::bin_path(bin).expect("workspace binaries are built");
    }
    let opts =
        Options::for_test(ambit_test_support::bin_dir().unwrap()).mesh(MeshOptions::default());
    Cluster::up(opts, &Topology::default_shop()).unwrap()
}

/// `ambitctl config-dump` inside the control namespace.
fn config_dump(cluster: &Cluster) -> anyhow::Result<serde_json::Value> {
    let admin = cluster.mesh().expect("mesh started").controller.admin_addr;
    let out = cluster
        .command(&Place::Control, "ambitctl")?
        .args(["config-dump", "--admin", &admin.to_string()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "ambitctl config-dump failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `(kind, namespace, name)` of every object in a multi-document YAML text.
fn objects(yaml: &str) -> BTreeSet<(String, String, String)> {
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            let kind = v.get("kind")?.as_str()?.to_owned();
            let meta = v.get("metadata")?;
            let name = meta.get("name")?.as_str()?.to_owned();
            let ns = meta
                .get("namespace")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_owned();
            Some((kind, ns, name))
        })
        .collect()
}

/// The dump's entry for `kind namespace/name` (namespace empty for cluster-scoped).
fn entry<'a>(
    dump: &'a serde_json::Value,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Option<&'a serde_json::Value> {
    dump["resources"].as_array()?.iter().find(|r| {
        r["kind"] == kind
            && r["name"] == name
            && (namespace.is_empty() || r["namespace"] == namespace)
    })
}

#[test]
fn controller_serves_every_generated_object_and_follows_the_config_dir() {
    let cluster = mesh_cluster();
    let status = cluster.status();
    let mesh = status
        .mesh
        .clone()
        .expect("the state file records the mesh");

    // Tokens: one per node, readable by the owner only.
    assert_eq!(mesh.node_tokens.len(), status.nodes.len());
    for node in &status.nodes {
        let path = &mesh.node_tokens[&node.name];
        let mode = std::fs::metadata(path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        assert_eq!(std::fs::read_to_string(path).unwrap().trim().len(), 64);
    }
    let tokens = std::fs::read_to_string(&mesh.controller.tokens_file).unwrap();
    assert!(tokens.contains("node-1"), "{tokens}");
    assert!(
        status
            .processes
            .iter()
            .any(|p| p.name == "ambit-controller" && p.place == Place::Control && p.running)
    );

    // Every generated object is Accepted.
    let generated = objects(&std::fs::read_to_string(&status.cluster_config).unwrap());
    assert!(generated.len() > 10, "{generated:?}");
    let dump = config_dump(&cluster).unwrap();
    assert_eq!(dump["synced"], true, "{dump:#}");
    for (kind, ns, name) in &generated {
        let e = entry(&dump, kind, ns, name)
            .unwrap_or_else(|| panic!("{kind} {ns}/{name} missing from /config_dump: {dump:#}"));
        assert_eq!(e["status"], "Accepted", "{kind} {ns}/{name}: {e}");
    }

    // An applied policy appears, Accepted; an invalid one is Rejected with its field.
    cluster
        .apply_yaml(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: payment-from-checkout, namespace: production }
spec:
  selector: { matchLabels: { app: payment } }
  action: ALLOW
  rules:
    - from: [{ source: { principals: ["cluster.local/ns/production/sa/checkout"] } }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: broken, namespace: production }
spec:
  action: MAYBE
"#,
        )
        .unwrap();
    let dump =
        ambit_test_support::eventually("the applied policies in /config_dump", STEP, POLL, || {
            let dump = config_dump(&cluster)?;
            anyhow::ensure!(
                entry(&dump, "AuthorizationPolicy", "production", "broken").is_some()
                    && entry(
                        &dump,
                        "AuthorizationPolicy",
                        "production",
                        "payment-from-checkout"
                    )
                    .is_some(),
                "not yet: {}",
                dump["resources"]
            );
            Ok(dump)
        })
        .unwrap();
    let ok = entry(
        &dump,
        "AuthorizationPolicy",
        "production",
        "payment-from-checkout",
    )
    .unwrap();
    assert_eq!(ok["status"], "Accepted", "{ok}");
    let bad = entry(&dump, "AuthorizationPolicy", "production", "broken").unwrap();
    assert_eq!(bad["status"], "Rejected", "{bad}");
    assert!(
        bad["reason"].as_str().unwrap().contains("spec.action"),
        "{bad}"
    );

    // Metrics from the control namespace.
    let (code, metrics) = cluster
        .http_get(
            &Place::Control,
            mesh.controller.admin_addr.into(),
            "/metrics",
        )
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("ambit_controller_resources{status=\"Rejected\"} 1"),
        "{metrics}"
    );
    cluster.down().unwrap();
}
