//! Config push over real gRPC on 127.0.0.1:0, against a config view whose generations
//! the test controls: snapshot, ACK, only relevant deltas, one update in flight with
//! coalescing, resume without a full resend, NACK recorded, authentication and
//! authorization of subscribers.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use ambit_api::{
    BearerToken,
    config::v1::{
        Ack, ConfigUpdate, Hello, Nack, NodeSubscriber, Resource, SubscribeRequest,
        WaypointSubscriber, Workload, config_discovery_client::ConfigDiscoveryClient, hello,
        resource, subscribe_request,
    },
};
use ambit_controller::{
    auth::{BootstrapTokens, TokensFile},
    metrics::Metrics,
    push::{PushServer, Subscribers},
    view::{ConfigView, Subscriber},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Streaming, service::interceptor::InterceptedService, transport::Channel};

const STEP: Duration = Duration::from_secs(10);

/// A config view: per node, the workloads (by uid → content tag) it should get.
#[derive(Clone, Debug, Default)]
struct TestView {
    generation: u64,
    nodes: BTreeMap<String, BTreeMap<String, String>>,
}

impl ConfigView for TestView {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn resources_for(&self, subscriber: &Subscriber) -> BTreeMap<String, Resource> {
        let Subscriber::Node { name } = subscriber else {
            return BTreeMap::new();
        };
        self.nodes
            .get(name)
            .into_iter()
            .flatten()
            .map(|(uid, tag)| {
                let r = Resource::new(resource::Kind::Workload(Workload {
                    uid: uid.clone(),
                    name: tag.clone(),
                    namespace: "shop".into(),
                    node: name.clone(),
                    ..Default::default()
                }));
                (r.key.clone(), r)
            })
            .collect()
    }
}

/// The world the test edits: each edit publishes a new generation.
struct World {
    tx: watch::Sender<Option<Arc<TestView>>>,
    view: TestView,
}

impl World {
    fn set(&mut self, node: &str, uid: &str, tag: &str) {
        self.view
            .nodes
            .entry(node.into())
            .or_default()
            .insert(uid.into(), tag.into());
        self.publish();
    }

    fn remove(&mut self, node: &str, uid: &str) {
        if let Some(n) = self.view.nodes.get_mut(node) {
            n.remove(uid);
        }
        self.publish();
    }

    fn publish(&mut self) {
        self.view.generation += 1;
        self.tx.send_replace(Some(Arc::new(self.view.clone())));
    }
}

struct Harness {
    addr: SocketAddr,
    world: World,
    subscribers: Subscribers,
    _server: tokio::task::JoinHandle<()>,
}

const TOKENS: &str = r#"
tokens:
  - { token: node-1-token, node: node-1 }
  - { token: node-2-token, node: node-2 }
  - { token: wp-token, waypoint: shop/wp }
"#;

/// Starts the push server; `synced` says whether the first generation exists yet.
async fn start(synced: bool) -> Harness {
    let view = TestView::default();
    let (tx, rx) = watch::channel(synced.then(|| Arc::new(view.clone())));
    let tokens: TokensFile = serde_yaml::from_str(TOKENS).unwrap();
    let auth = Arc::new(BootstrapTokens::from_entries(&tokens).unwrap());
    let push = PushServer::new(rx, auth, Metrics::default(), "test-controller");
    let subscribers = push.subscribers();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(push.into_service())
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Harness {
        addr,
        world: World { tx, view },
        subscribers,
        _server: server,
    }
}

type Client = ConfigDiscoveryClient<InterceptedService<Channel, BearerToken>>;

/// One open `Subscribe` stream.
struct Stream {
    tx: mpsc::Sender<SubscribeRequest>,
    rx: Streaming<ConfigUpdate>,
}

async fn client(addr: SocketAddr, token: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ConfigDiscoveryClient::with_interceptor(channel, BearerToken::new(token).unwrap())
}

fn node_hello(node: &str, held: BTreeMap<String, String>) -> SubscribeRequest {
    SubscribeRequest {
        kind: Some(subscribe_request::Kind::Hello(Hello {
            subscriber: Some(hello::Subscriber::Node(NodeSubscriber {
                node_name: node.into(),
            })),
            resource_versions: held,
            last_acked_version: 0,
            proxy_version: "test".into(),
        })),
    }
}

async fn open(
    addr: SocketAddr,
    token: &str,
    first: SubscribeRequest,
) -> Result<Stream, tonic::Status> {
    let mut client = client(addr, token).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let rx = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(Stream { tx, rx })
}

impl Stream {
    async fn next(&mut self) -> Result<ConfigUpdate, tonic::Status> {
        match tokio::time::timeout(STEP, self.rx.message()).await {
            Ok(Ok(Some(u))) => Ok(u),
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(status)) => Err(status),
            Err(_) => panic!("no update within {STEP:?}"),
        }
    }

    async fn update(&mut self) -> ConfigUpdate {
        self.next().await.unwrap()
    }

    async fn ack(&self, version: u64) {
        self.send(subscribe_request::Kind::Ack(Ack { version }))
            .await;
    }

    async fn send(&self, kind: subscribe_request::Kind) {
        self.tx
            .send(SubscribeRequest { kind: Some(kind) })
            .await
            .unwrap();
    }
}

fn uids(update: &ConfigUpdate) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = update
        .resources
        .iter()
        .map(|r| match &r.kind {
            Some(resource::Kind::Workload(w)) => (w.uid.clone(), w.name.clone()),
            other => panic!("unexpected resource {other:?}"),
        })
        .collect();
    v.sort();
    v
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn held(update: &ConfigUpdate) -> BTreeMap<String, String> {
    update
        .resources
        .iter()
        .map(|r| (r.key.clone(), r.version.clone()))
        .collect()
}

#[tokio::test]
async fn snapshot_then_ack_then_only_the_deltas_that_concern_the_node() {
    let mut h = start(true).await;
    h.world.set("node-1", "a", "a1");
    h.world.set("node-1", "b", "b1");
    h.world.set("node-2", "x", "x1");

    let mut n1 = open(
        h.addr,
        "node-1-token",
        node_hello("node-1", BTreeMap::new()),
    )
    .await
    .unwrap();
    let snap = n1.update().await;
    assert!(snap.is_full_snapshot);
    assert_eq!(snap.version, 1);
    assert_eq!(snap.controller_id, "test-controller");
    assert!(snap.generated_at.is_some());
    assert_eq!(uids(&snap), pairs(&[("a", "a1"), ("b", "b1")]));
    n1.ack(1).await;

    let mut n2 = open(
        h.addr,
        "node-2-token",
        node_hello("node-2", BTreeMap::new()),
    )
    .await
    .unwrap();
    assert_eq!(uids(&n2.update().await), pairs(&[("x", "x1")]));
    n2.ack(1).await;

    // A change for node-2 only: node-2 gets it...
    h.world.set("node-2", "x", "x2");
    let d = n2.update().await;
    assert!(!d.is_full_snapshot);
    assert_eq!(uids(&d), pairs(&[("x", "x2")]));
    n2.ack(d.version).await;

    // ...and node-1 nothing: its next update is version 2 and carries only its own
    // change.
    h.world.set("node-1", "b", "b2");
    let d = n1.update().await;
    assert_eq!(d.version, 2);
    assert!(!d.is_full_snapshot);
    assert_eq!(uids(&d), pairs(&[("b", "b2")]));
    assert!(d.removed.is_empty());
    n1.ack(2).await;

    // Removal is a delta too.
    h.world.remove("node-1", "a");
    let d = n1.update().await;
    assert_eq!(d.version, 3);
    assert!(d.resources.is_empty());
    assert_eq!(d.removed, vec!["Workload/a".to_owned()]);
    n1.ack(3).await;

    ambit_test_support::eventually_async(
        "the dump shows the ACKed state",
        STEP,
        Duration::from_millis(20),
        || {
            let list = h.subscribers.list();
            async move {
                let s = list
                    .iter()
                    .find(|s| s.subscriber == "node/node-1")
                    .ok_or_else(|| anyhow::anyhow!("no node-1 in {list:?}"))?;
                anyhow::ensure!(
                    s.connected && s.version_sent == 3 && s.version_acked == 3 && s.resources == 1,
                    "{s:?}"
                );
                Ok(())
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn one_update_in_flight_and_changes_meanwhile_are_coalesced() {
    let mut h = start(true).await;
    h.world.set("node-1", "a", "a1");
    let mut n1 = open(
        h.addr,
        "node-1-token",
        node_hello("node-1", BTreeMap::new()),
    )
    .await
    .unwrap();
    let snap = n1.update().await;
    assert_eq!(uids(&snap), pairs(&[("a", "a1")]));

    // Not ACKed yet: these changes wait and travel together.
    h.world.set("node-1", "b", "b1");
    h.world.set("node-1", "a", "a2");
    h.world.set("node-1", "c", "c1");
    h.world.remove("node-1", "c");
    n1.ack(1).await;
    let d = n1.update().await;
    assert_eq!(
        d.version, 2,
        "nothing may be sent while version 1 is unacked"
    );
    assert_eq!(uids(&d), pairs(&[("a", "a2"), ("b", "b1")]));
    assert!(d.removed.is_empty(), "c never reached the proxy: {d:?}");
    n1.ack(2).await;

    h.world.set("node-1", "b", "b2");
    let d = n1.update().await;
    assert_eq!(d.version, 3);
    assert_eq!(uids(&d), pairs(&[("b", "b2")]));
}

#[tokio::test]
async fn reconnecting_with_held_versions_resumes_without_a_full_resend() {
    let mut h = start(true).await;
    for (uid, tag) in [("a", "a1"), ("b", "b1"), ("c", "c1")] {
        h.world.set("node-1", uid, tag);
    }
    let mut n1 = open(
        h.addr,
        "node-1-token",
        node_hello("node-1", BTreeMap::new()),
    )
    .await
    .unwrap();
    let snap = n1.update().await;
    assert_eq!(snap.resources.len(), 3);
    n1.ack(1).await;
    let state = held(&snap);
    drop(n1);

    // While the proxy is away: b changes, c goes, d arrives.
    h.world.set("node-1", "b", "b2");
    h.world.remove("node-1", "c");
    h.world.set("node-1", "d", "d1");

    let mut n1 = open(h.addr, "node-1-token", node_hello("node-1", state))
        .await
        .unwrap();
    let sync = n1.update().await;
    assert!(!sync.is_full_snapshot, "{sync:?}");
    assert_eq!(sync.version, 1);
    assert_eq!(uids(&sync), pairs(&[("b", "b2"), ("d", "d1")]));
    assert_eq!(sync.removed, vec!["Workload/c".to_owned()]);
    n1.ack(1).await;

    // Already up to date: the SYNC update is empty, but it is sent.
    let up_to_date: BTreeMap<String, String> = h
        .world
        .view
        .resources_for(&Subscriber::Node {
            name: "node-1".into(),
        })
        .into_iter()
        .map(|(k, r)| (k, r.version))
        .collect();
    let mut again = open(h.addr, "node-1-token", node_hello("node-1", up_to_date))
        .await
        .unwrap();
    let sync = again.update().await;
    assert!(!sync.is_full_snapshot);
    assert!(
        sync.resources.is_empty() && sync.removed.is_empty(),
        "{sync:?}"
    );
}

#[tokio::test]
async fn a_nack_is_recorded_and_not_resent_unchanged() {
    let mut h = start(true).await;
    h.world.set("node-1", "a", "a1");
    let mut n1 = open(
        h.addr,
        "node-1-token",
        node_hello("node-1", BTreeMap::new()),
    )
    .await
    .unwrap();
    let snap = n1.update().await;
    n1.send(subscribe_request::Kind::Nack(Nack {
        version: snap.version,
        error: "cannot apply Workload/a".into(),
        resource_errors: vec![ambit_api::config::v1::ResourceError {
            key: "Workload/a".into(),
            error: "bad".into(),
        }],
    }))
    .await;
    ambit_test_support::eventually_async(
        "the NACK shows in the dump",
        STEP,
        Duration::from_millis(20),
        || {
            let list = h.subscribers.list();
            async move {
                let nack = list
                    .first()
                    .and_then(|s| s.last_nack.clone())
                    .ok_or_else(|| anyhow::anyhow!("no NACK in {list:?}"))?;
                anyhow::ensure!(nack.version == 1, "{nack:?}");
                anyhow::ensure!(nack.error == "cannot apply Workload/a", "{nack:?}");
                anyhow::ensure!(nack.resource_errors == vec!["Workload/a: bad"], "{nack:?}");
                anyhow::ensure!(list[0].version_acked == 0, "{list:?}");
                Ok(())
            }
        },
    )
    .await
    .unwrap();

    // A change for another node does not resend the rejected update; the next change
    // for this node brings everything the proxy lacks (nothing was ACKed).
    h.world.set("node-2", "x", "x1");
    h.world.set("node-1", "b", "b1");
    let d = n1.update().await;
    assert_eq!(d.version, 2);
    assert!(!d.is_full_snapshot);
    assert_eq!(uids(&d), pairs(&[("a", "a1"), ("b", "b1")]));
}

#[tokio::test]
async fn nothing_is_pushed_before_the_sources_have_synced() {
    let mut h = start(false).await;
    let mut n1 = open(
        h.addr,
        "node-1-token",
        node_hello("node-1", BTreeMap::new()),
    )
    .await
    .unwrap();
    h.world.set("node-1", "a", "a1");
    let snap = n1.update().await;
    assert!(snap.is_full_snapshot);
    assert_eq!(snap.version, 1);
    assert_eq!(uids(&snap), pairs(&[("a", "a1")]));
}

#[tokio::test]
async fn unauthenticated_subscribers_are_refused() {
    let h = start(true).await;
    let err = open(h.addr, "not-a-token", node_hello("node-1", BTreeMap::new()))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // No credential at all.
    let channel = Channel::from_shared(format!("http://{}", h.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut bare = ConfigDiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(1);
    tx.send(node_hello("node-1", BTreeMap::new()))
        .await
        .unwrap();
    let err = bare.subscribe(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(h.subscribers.list().is_empty());
}

#[tokio::test]
async fn a_credential_subscribes_only_as_its_own_subscriber() {
    let h = start(true).await;
    let mut s = open(
        h.addr,
        "node-1-token",
        node_hello("node-2", BTreeMap::new()),
    )
    .await
    .unwrap();
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("node/node-2"), "{err:?}");

    let mut s = open(h.addr, "wp-token", node_hello("node-1", BTreeMap::new()))
        .await
        .unwrap();
    assert_eq!(s.next().await.unwrap_err().code(), Code::PermissionDenied);

    // The waypoint's own subscription is fine (an empty snapshot: the view has none).
    let wp_hello = SubscribeRequest {
        kind: Some(subscribe_request::Kind::Hello(Hello {
            subscriber: Some(hello::Subscriber::Waypoint(WaypointSubscriber {
                namespace: "shop".into(),
                name: "wp".into(),
                spiffe_id: String::new(),
            })),
            ..Default::default()
        })),
    };
    let mut s = open(h.addr, "wp-token", wp_hello).await.unwrap();
    let snap = s.update().await;
    assert!(snap.is_full_snapshot && snap.resources.is_empty());
}

#[tokio::test]
async fn hello_must_come_first_and_only_once() {
    let h = start(true).await;
    let first_ack = SubscribeRequest {
        kind: Some(subscribe_request::Kind::Ack(Ack { version: 1 })),
    };
    let mut s = open(h.addr, "node-1-token", first_ack).await.unwrap();
    assert_eq!(s.next().await.unwrap_err().code(), Code::InvalidArgument);

    let mut s = open(
        h.addr,
        "node-1-token",
        node_hello("node-1", BTreeMap::new()),
    )
    .await
    .unwrap();
    s.update().await;
    s.tx.send(node_hello("node-1", BTreeMap::new()))
        .await
        .unwrap();
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("once"), "{err:?}");
}
