//! The index task: events in, generations of the world out.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{sync::Arc, time::Duration};

use ambit_controller::{
    index::{IndexConfig, spawn_index},
    resources::parse_documents,
    source::{OriginId, SourceEvent},
    validate::ValidationContext,
    view::{ConfigView, Subscriber},
    world::World,
};
use ambit_identity::TrustDomain;
use ambit_test_support::eventually_async;
use tokio::sync::{mpsc, watch};

const DEADLINE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

fn config(sources: usize) -> IndexConfig {
    IndexConfig {
        validation: ValidationContext::default(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        trust_bundle_pem: vec!["root".into()],
        sources,
    }
}

fn replace(origin: &str, yaml: &str) -> SourceEvent {
    SourceEvent::Replace {
        origin: OriginId(origin.into()),
        documents: parse_documents(origin, yaml),
    }
}

/// Waits until the published world satisfies `check`.
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
                    "generation {} not there yet",
                    world.generation()
                ))
            }
        }
    })
    .await
    .unwrap()
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a-0, namespace: ns, uid: pod-a}
spec: {nodeName: node-1, containers: [{name: a, image: x}]}
status: {podIP: 10.0.0.1}
"#;

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: ns}
spec: {}
"#;

#[tokio::test]
async fn publishes_a_generation_per_change_and_syncs_when_every_source_has() {
    let (tx, rx_events) = mpsc::channel(16);
    let rx = spawn_index(config(2), rx_events);
    assert_eq!(rx.borrow().generation(), 0);
    assert!(!rx.borrow().synced());

    tx.send(replace("pods.yaml", POD)).await.unwrap();
    tx.send(SourceEvent::Synced).await.unwrap();
    let w = wait_for(&rx, "the pod", |w| w.statuses().len() == 1).await;
    assert!(!w.synced(), "one source of two has synced");
    let node = Subscriber::Node {
        name: "node-1".into(),
    };
    assert!(w.resources_for(&node).contains_key("Workload/pod-a"));

    tx.send(SourceEvent::Synced).await.unwrap();
    let w = wait_for(&rx, "synced", |w| w.synced()).await;
    let synced_at = w.generation();

    // Resending the same content changes nothing; the next real change is one
    // generation later.
    tx.send(replace("pods.yaml", POD)).await.unwrap();
    tx.send(replace("policy.yaml", POLICY)).await.unwrap();
    let w = wait_for(&rx, "the policy", |w| w.statuses().len() == 2).await;
    assert_eq!(w.generation(), synced_at + 1);
    assert!(
        w.resources_for(&node)
            .contains_key("Authorization/ns/deny-all")
    );

    // An origin replaced by nothing is gone.
    tx.send(SourceEvent::Replace {
        origin: OriginId("policy.yaml".into()),
        documents: Vec::new(),
    })
    .await
    .unwrap();
    let w = wait_for(&rx, "the policy removed", |w| w.statuses().len() == 1).await;
    assert!(
        !w.resources_for(&node)
            .contains_key("Authorization/ns/deny-all")
    );
}

#[tokio::test]
async fn validation_happens_in_the_index() {
    let (tx, rx_events) = mpsc::channel(16);
    let rx = spawn_index(config(1), rx_events);
    let bad = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: ns}\nspec: {action: MAYBE}\n";
    tx.send(replace("bad.yaml", bad)).await.unwrap();
    tx.send(SourceEvent::Synced).await.unwrap();
    let w = wait_for(&rx, "synced", |w| w.synced()).await;
    let s = &w.statuses()[0];
    assert_eq!(s.status, "Rejected");
    assert!(s.reason.contains("spec.action"), "{}", s.reason);
}

#[tokio::test]
async fn the_task_ends_when_every_source_is_gone() {
    let (tx, rx_events) = mpsc::channel(16);
    let mut rx = spawn_index(config(1), rx_events);
    drop(tx);
    // The sender side of the watch is dropped with the task.
    eventually_async("index task ended", DEADLINE, POLL, || {
        let done = rx.has_changed().is_err();
        async move {
            if done {
                Ok(())
            } else {
                Err(anyhow::anyhow!("still running"))
            }
        }
    })
    .await
    .unwrap();
    let _ = rx.borrow_and_update();
}
