//! The local source on a real directory: files written, changed by atomic rename,
//! made unreadable and removed, each observed in the index's world.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{path::Path, sync::Arc, time::Duration};

use ambit_api::config::v1::{Action, resource::Kind};
use ambit_controller::{
    index::{IndexConfig, spawn_index},
    source::local::{LocalSourceError, spawn_local_source},
    validate::ValidationContext,
    view::{ConfigView, Subscriber},
    world::World,
};
use ambit_identity::TrustDomain;
use ambit_test_support::eventually_async;
use tokio::sync::{mpsc, watch};

const DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ns, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a-0, namespace: ns, uid: pod-a, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: a, image: x}]}
status: {podIP: 10.0.0.1}
"#;

fn policy(action: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: ns}}\nspec:\n  action: {action}\n  rules: [{{}}]\n"
    )
}

/// Replaces `path` the way `kubectl`-like tools and the simulated cluster do: write a
/// hidden temporary file, then rename it over the target.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn wait_for(
    rx: &watch::Receiver<Arc<World>>,
    what: &str,
    check: impl Fn(&World) -> bool,
) -> Arc<World> {
    eventually_async(what, DEADLINE, POLL, || {
        let world = rx.borrow().clone();
        let ok = check(&world);
        async move {
            if ok {
                Ok(world)
            } else {
                Err(anyhow::anyhow!(
                    "generation {}: {:?}",
                    world.generation(),
                    world.statuses()
                ))
            }
        }
    })
    .await
    .unwrap()
}

fn action_on_node(w: &World) -> Option<i32> {
    let r = w.resources_for(&Subscriber::Node {
        name: "node-1".into(),
    });
    match &r.get("Authorization/ns/p")?.kind {
        Some(Kind::Authorization(a)) => Some(a.action),
        _ => None,
    }
}

#[tokio::test]
async fn files_added_changed_and_removed_reach_the_world() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("00-cluster.yaml"), CLUSTER).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not config").unwrap();
    let (tx, rx_events) = mpsc::channel(64);
    let rx = spawn_index(
        IndexConfig {
            validation: ValidationContext::default(),
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            trust_bundle_pem: Vec::new(),
            sources: 1,
        },
        rx_events,
    );
    let source = spawn_local_source(dir.path().to_owned(), tx).unwrap();
    assert_eq!(source.dir(), dir.path());

    let w = wait_for(&rx, "initial sync", |w| w.synced()).await;
    assert_eq!(w.statuses().len(), 2, "the namespace and the pod");
    assert_eq!(action_on_node(&w), None);

    // Added.
    let policy_file = dir.path().join("policy.yml");
    write_atomic(&policy_file, &policy("ALLOW"));
    wait_for(&rx, "policy added", |w| {
        action_on_node(w) == Some(Action::Allow as i32)
    })
    .await;

    // Changed, by atomic rename over the file.
    write_atomic(&policy_file, &policy("DENY"));
    wait_for(&rx, "policy changed", |w| {
        action_on_node(w) == Some(Action::Deny as i32)
    })
    .await;

    // Changed in place (truncated and rewritten).
    std::fs::write(&policy_file, policy("AUDIT")).unwrap();
    wait_for(&rx, "policy rewritten in place", |w| {
        action_on_node(w) == Some(Action::Audit as i32)
    })
    .await;

    // Unreadable: reported, and the last documents read stay in force.
    std::fs::write(&policy_file, b"\xff\xfe not utf-8").unwrap();
    let w = wait_for(&rx, "unreadable file reported", |w| {
        w.statuses()
            .iter()
            .any(|s| s.status == "Rejected" && s.reason.contains("cannot be read"))
    })
    .await;
    assert_eq!(action_on_node(&w), Some(Action::Audit as i32));

    // Readable again.
    write_atomic(&policy_file, &policy("DENY"));
    wait_for(&rx, "file readable again", |w| {
        action_on_node(w) == Some(Action::Deny as i32)
            && w.statuses().iter().all(|s| s.status == "Accepted")
    })
    .await;

    // Removed.
    std::fs::remove_file(&policy_file).unwrap();
    wait_for(&rx, "policy removed", |w| {
        action_on_node(w).is_none() && w.statuses().len() == 2
    })
    .await;

    // Hidden temporary files are never read.
    std::fs::write(dir.path().join(".partial.yaml"), policy("DENY")).unwrap();
    std::fs::write(
        dir.path().join("marker.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: marker}\n",
    )
    .unwrap();
    let w = wait_for(&rx, "marker read", |w| w.statuses().len() == 3).await;
    assert_eq!(action_on_node(&w), None);
    drop(source);
}

#[test]
fn a_missing_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let (tx, _rx) = mpsc::channel(1);
    let err = spawn_local_source(missing.clone(), tx).unwrap_err();
    assert!(matches!(err, LocalSourceError::Unreadable { .. }));
    assert!(err.to_string().contains(&missing.display().to_string()));

    let file = dir.path().join("file.yaml");
    std::fs::write(&file, "").unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let err = spawn_local_source(file, tx).unwrap_err();
    assert!(
        matches!(err, LocalSourceError::NotADirectory { .. }),
        "{err}"
    );
}
