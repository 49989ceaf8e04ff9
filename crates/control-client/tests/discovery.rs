//! The config subscription against a real gRPC server on 127.0.0.1:0: an in-test
//! `ConfigDiscovery` that hands every stream to the test, which plays the
//! controller's side step by step.
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_api::BearerToken;
use ambit_api::config::v1::config_discovery_server::{ConfigDiscovery, ConfigDiscoveryServer};
use ambit_api::config::v1::{
    ConfigUpdate, Hello, Nack, Resource, Service, SubscribeRequest, Workload, hello, resource,
    subscribe_request,
};
use ambit_api::time::timestamp_to_proto;
use ambit_control_client::discovery::StateFileLoad;
use ambit_control_client::{
    Backoff, ConfigState, ProposedState, Rejection, StateSource, Subscriber, Subscription,
    SubscriptionConfig, TokenSource,
};
use ambit_test_support::eventually_async;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Server, Uri};
use tonic::{Request, Response, Status, Streaming};

const STEP: Duration = Duration::from_secs(10);
const NODE_TOKEN: &str = "node-a-bootstrap-token";

/// One `Subscribe` stream, as the in-test controller sees it.
struct ServerStream {
    hello: Hello,
    token: String,
    updates: mpsc::Sender<Result<ConfigUpdate, Status>>,
    requests: Streaming<SubscribeRequest>,
}

/// Hands each stream (after its `Hello`) to the test.
struct FakeDiscovery {
    streams: mpsc::Sender<ServerStream>,
}

#[tonic::async_trait]
impl ConfigDiscovery for FakeDiscovery {
    type SubscribeStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let token = BearerToken::from_metadata(request.metadata())
            .map_err(|e| Status::unauthenticated(e.to_string()))?
            .secret()
            .to_owned();
        let mut requests = request.into_inner();
        let (updates, rx) = mpsc::channel(8);
        let streams = self.streams.clone();
        tokio::spawn(async move {
            let hello = match requests.message().await {
                Ok(Some(SubscribeRequest {
                    kind: Some(subscribe_request::Kind::Hello(hello)),
                })) => hello,
                other => {
                    let _ = updates
                        .send(Err(Status::invalid_argument(format!(
                            "first message must be Hello, got {other:?}"
                        ))))
                        .await;
                    return;
                }
            };
            let _ = streams
                .send(ServerStream {
                    hello,
                    token,
                    updates,
                    requests,
                })
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The in-test controller.
struct Controller {
    uri: Uri,
    streams: mpsc::Receiver<ServerStream>,
    server: tokio::task::JoinHandle<()>,
}

impl Controller {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, streams) = mpsc::channel(8);
        let service = ConfigDiscoveryServer::new(FakeDiscovery { streams: tx })
            .max_decoding_message_size(ambit_api::MAX_MESSAGE_SIZE);
        let server = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self {
            uri: format!("http://{addr}").parse().unwrap(),
            streams,
            server,
        }
    }

    async fn next_stream(&mut self) -> ServerStream {
        tokio::time::timeout(STEP, self.streams.recv())
            .await
            .expect("no config stream opened in time")
            .expect("server gone")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl ServerStream {
    async fn send(&self, update: ConfigUpdate) {
        self.updates.send(Ok(update)).await.unwrap();
    }

    async fn reply(&mut self) -> subscribe_request::Kind {
        tokio::time::timeout(STEP, self.requests.message())
            .await
            .expect("no reply in time")
            .unwrap()
            .expect("request stream ended")
            .kind
            .unwrap()
    }

    async fn expect_ack(&mut self, version: u64) {
        match self.reply().await {
            subscribe_request::Kind::Ack(ack) => assert_eq!(ack.version, version),
            other => panic!("expected Ack({version}), got {other:?}"),
        }
    }

    async fn expect_nack(&mut self, version: u64) -> Nack {
        match self.reply().await {
            subscribe_request::Kind::Nack(nack) => {
                assert_eq!(nack.version, version);
                nack
            }
            other => panic!("expected Nack({version}), got {other:?}"),
        }
    }
}

/// A port nothing listens on.
async fn unreachable_uri() -> Uri {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}").parse().unwrap()
}

fn config(controller: &Uri, token: TokenSource) -> SubscriptionConfig {
    let mut config = SubscriptionConfig::new(
        controller.clone(),
        token,
        Subscriber::Node {
            node_name: "node-a".into(),
        },
    );
    config.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
    };
    config.connect_timeout = Duration::from_secs(2);
    config
}

fn static_token() -> TokenSource {
    TokenSource::Static(BearerToken::new(NODE_TOKEN).unwrap())
}

fn accept_all(_: &ProposedState) -> Result<(), Rejection> {
    Ok(())
}

fn service(name: &str, vip: &str) -> Resource {
    Resource::new(resource::Kind::Service(Service {
        namespace: "production".into(),
        name: name.into(),
        vips: vec![vip.into()],
        ..Default::default()
    }))
}

fn workload(uid: &str) -> Resource {
    Resource::new(resource::Kind::Workload(Workload {
        uid: uid.into(),
        name: format!("pod-{uid}"),
        namespace: "production".into(),
        node: "node-a".into(),
        ..Default::default()
    }))
}

fn update(version: u64, full: bool, resources: Vec<Resource>, removed: &[&str]) -> ConfigUpdate {
    ConfigUpdate {
        version,
        is_full_snapshot: full,
        resources,
        removed: removed.iter().map(|s| (*s).to_owned()).collect(),
        generated_at: Some(timestamp_to_proto(SystemTime::now())),
        controller_id: "controller-0".into(),
    }
}

fn keys(state: &ConfigState) -> Vec<&str> {
    state.resources.keys().map(String::as_str).collect()
}

async fn wait_for_state(
    rx: &mut watch::Receiver<Arc<ConfigState>>,
    what: &str,
    f: impl FnMut(&Arc<ConfigState>) -> bool,
) -> Arc<ConfigState> {
    tokio::time::timeout(STEP, rx.wait_for(f))
        .await
        .unwrap_or_else(|_| panic!("state never reached: {what}"))
        .unwrap()
        .clone()
}

#[tokio::test]
async fn snapshot_is_acked_and_published_then_deltas_apply() {
    let mut controller = Controller::start().await;
    let readiness = ambit_runtime::readiness::Readiness::new();
    let (sub, mut rx) = Subscription::spawn(config(&controller.uri, static_token()), accept_all);
    sub.unblock_when_ready(readiness.register("config"));

    let mut stream = controller.next_stream().await;
    assert_eq!(stream.token, NODE_TOKEN);
    assert_eq!(
        stream.hello.subscriber,
        Some(hello::Subscriber::Node(
            ambit_api::config::v1::NodeSubscriber {
                node_name: "node-a".into()
            }
        ))
    );
    assert!(stream.hello.resource_versions.is_empty());
    assert_eq!(stream.hello.last_acked_version, 0);
    assert!(!stream.hello.proxy_version.is_empty());
    assert_eq!(rx.borrow().source, StateSource::Initial);
    assert!(!rx.borrow().is_ready());
    assert_eq!(readiness.pending(), ["config"]);

    // Snapshot → ACK → published.
    stream
        .send(update(
            1,
            true,
            vec![service("payment", "10.96.0.10"), workload("w1")],
            &[],
        ))
        .await;
    stream.expect_ack(1).await;
    let state = wait_for_state(&mut rx, "snapshot applied", |s| s.version == 1).await;
    assert_eq!(keys(&state), ["Service/production/payment", "Workload/w1"]);
    assert_eq!(state.source, StateSource::FromController);
    assert!(state.synced && state.is_ready());
    assert_eq!(state.controller_id, "controller-0");
    assert!(state.generated_at.is_some());
    tokio::time::timeout(STEP, sub.wait_ready()).await.unwrap();
    eventually_async("readiness clears", STEP, Duration::from_millis(10), || {
        let ready = readiness.is_ready();
        async move {
            ready
                .then_some(())
                .ok_or_else(|| anyhow::anyhow!("still blocked"))
        }
    })
    .await
    .unwrap();

    // Delta: change payment, add w2, remove w1 (and a key never held).
    stream
        .send(update(
            2,
            false,
            vec![service("payment", "10.96.0.11"), workload("w2")],
            &["Workload/w1", "Workload/never-held"],
        ))
        .await;
    stream.expect_ack(2).await;
    let state = wait_for_state(&mut rx, "delta applied", |s| s.version == 2).await;
    assert_eq!(keys(&state), ["Service/production/payment", "Workload/w2"]);
    let Some(resource::Kind::Service(payment)) =
        &state.get("Service/production/payment").unwrap().kind
    else {
        panic!("not a service");
    };
    assert_eq!(payment.vips, ["10.96.0.11"]);
    assert_eq!(state.generation, 2);
    assert_eq!(
        state
            .of_kind(ambit_api::ResourceKind::Workload)
            .map(|r| r.key.as_str())
            .collect::<Vec<_>>(),
        ["Workload/w2"]
    );

    let status = sub.status();
    assert!(status.connected, "an update arrived, so the stream is open");
    assert_eq!(status.subscriber, "node/node-a");
    assert_eq!(status.controller_id, "controller-0");
    assert_eq!(status.counters.updates_applied, 2);
    assert_eq!(status.counters.nacks, 0);
    assert_eq!(status.counters.streams_opened, 1);
    assert_eq!(status.state_file_load, StateFileLoad::Disabled);
    sub.shutdown().await;
}

#[tokio::test]
async fn rejected_updates_are_nacked_and_leave_the_state_unchanged() {
    let mut controller = Controller::start().await;
    let validator = |proposed: &ProposedState| {
        for key in &proposed.upserted {
            if key == "Service/production/bad" {
                return Err(Rejection::resource(key, "port 0 is not a valid port"));
            }
        }
        Ok(())
    };
    let (sub, mut rx) = Subscription::spawn(config(&controller.uri, static_token()), validator);
    let mut stream = controller.next_stream().await;

    stream
        .send(update(1, true, vec![service("payment", "10.96.0.10")], &[]))
        .await;
    stream.expect_ack(1).await;
    let before = wait_for_state(&mut rx, "snapshot applied", |s| s.version == 1).await;

    // The validator refuses one resource: the whole update is refused.
    stream
        .send(update(
            2,
            false,
            vec![service("bad", "10.96.0.99"), workload("w2")],
            &["Service/production/payment"],
        ))
        .await;
    let nack = stream.expect_nack(2).await;
    assert!(
        nack.error.contains("port 0 is not a valid port"),
        "{nack:?}"
    );
    assert_eq!(nack.resource_errors.len(), 1);
    assert_eq!(nack.resource_errors[0].key, "Service/production/bad");

    // A kind this build does not know (a newer controller's) is refused too.
    let from_the_future = Resource {
        key: "Workload/from-the-future".into(),
        version: "0123456789abcdef".into(),
        kind: None,
    };
    stream
        .send(update(3, false, vec![from_the_future], &[]))
        .await;
    let nack = stream.expect_nack(3).await;
    assert_eq!(nack.resource_errors[0].key, "Workload/from-the-future");
    assert!(nack.error.contains("no resource kind"), "{nack:?}");

    // Nothing changed: same state object, nothing published.
    let held = rx.borrow().clone();
    assert!(Arc::ptr_eq(&held, &before), "state changed after a NACK");
    assert_eq!(keys(&held), ["Service/production/payment"]);

    // The next good update applies on top of the state held, not the rejected one.
    stream
        .send(update(4, false, vec![workload("w4")], &[]))
        .await;
    stream.expect_ack(4).await;
    let state = wait_for_state(&mut rx, "good delta applied", |s| s.version == 4).await;
    assert_eq!(keys(&state), ["Service/production/payment", "Workload/w4"]);

    let status = sub.status();
    assert_eq!(status.counters.nacks, 2);
    assert_eq!(status.counters.updates_applied, 2);
    let last_nack = status.last_nack.unwrap();
    assert_eq!(last_nack.version, 3);
    assert!(
        last_nack
            .resource_errors
            .contains_key("Workload/from-the-future")
    );
    sub.shutdown().await;
}

#[tokio::test]
async fn reconnects_resume_with_the_versions_held_and_a_rotated_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "token-1\n").unwrap();
    let mut controller = Controller::start().await;
    let (sub, mut rx) = Subscription::spawn(
        config(&controller.uri, TokenSource::File(token_file.clone())),
        accept_all,
    );

    let mut first = controller.next_stream().await;
    assert_eq!(first.token, "token-1");
    first
        .send(update(
            1,
            true,
            vec![service("payment", "10.96.0.10"), workload("w1")],
            &[],
        ))
        .await;
    first.expect_ack(1).await;
    let held = wait_for_state(&mut rx, "snapshot applied", |s| s.version == 1).await;

    // The token rotates, then the controller ends the stream.
    std::fs::write(&token_file, "token-2\n").unwrap();
    drop(first);

    let mut second = controller.next_stream().await;
    assert_eq!(
        second.token, "token-2",
        "the token is read again per connect"
    );
    let expected: BTreeMap<String, String> = [service("payment", "10.96.0.10"), workload("w1")]
        .into_iter()
        .map(|r| (r.key, r.version))
        .collect();
    assert_eq!(second.hello.resource_versions, expected);
    assert_eq!(second.hello.resource_versions, held.resource_versions());
    assert_eq!(second.hello.last_acked_version, 1);

    // Versions restart per stream; a resume delta applies on the state held.
    second
        .send(update(1, false, vec![], &["Workload/w1"]))
        .await;
    second.expect_ack(1).await;
    let state = wait_for_state(&mut rx, "resume delta applied", |s| s.resources.len() == 1).await;
    assert_eq!(keys(&state), ["Service/production/payment"]);

    // A failing stream (not only a closed one) is retried too.
    second
        .updates
        .send(Err(Status::unavailable("replica draining")))
        .await
        .unwrap();
    let third = controller.next_stream().await;
    assert_eq!(
        third.hello.resource_versions.keys().collect::<Vec<_>>(),
        ["Service/production/payment"]
    );
    let status = sub.status();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("replica draining")),
        "{status:?}"
    );
    assert!(status.counters.reconnects >= 2, "{status:?}");
    // Counted once the client sees the stream open, which may be just after the
    // server got its Hello.
    eventually_async(
        "third stream counted",
        STEP,
        Duration::from_millis(10),
        || {
            let status = sub.status();
            async move {
                if status.counters.streams_opened == 3 && status.connected {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("{status:?}"))
                }
            }
        },
    )
    .await
    .unwrap();
    sub.shutdown().await;
}

#[tokio::test]
async fn a_restart_serves_the_persisted_state_without_a_controller_and_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("node-state").join("config.state");
    let mut controller = Controller::start().await;

    // First run: sync and persist.
    let mut first_config = config(&controller.uri, static_token());
    first_config.state_file = Some(state_file.clone());
    let (sub, mut rx) = Subscription::spawn(first_config.clone(), accept_all);
    assert_eq!(sub.status().state_file_load, StateFileLoad::Missing);
    let mut stream = controller.next_stream().await;
    stream
        .send(update(
            7,
            true,
            vec![service("payment", "10.96.0.10"), workload("w1")],
            &[],
        ))
        .await;
    stream.expect_ack(7).await;
    let synced = wait_for_state(&mut rx, "snapshot applied", |s| s.version == 7).await;
    wait_persisted(&sub, synced.generation).await;
    sub.shutdown().await;
    drop(stream);
    let mode = std::fs::metadata(&state_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Restart with the controller unreachable: the state is there at once.
    let mut offline = first_config.clone();
    offline.controller = unreachable_uri().await;
    let (sub, rx) = Subscription::spawn(offline, accept_all);
    let state = rx.borrow().clone();
    assert_eq!(state.source, StateSource::FromDisk);
    assert!(state.is_ready() && !state.synced);
    assert_eq!(keys(&state), ["Service/production/payment", "Workload/w1"]);
    assert_eq!(state.version, 7);
    assert_eq!(state.controller_id, "controller-0");
    assert_eq!(state.resource_versions(), synced.resource_versions());
    assert_eq!(
        sub.status().state_file_load,
        StateFileLoad::Loaded {
            resources: 2,
            version: 7
        }
    );
    tokio::time::timeout(STEP, sub.wait_ready()).await.unwrap();
    // It keeps trying (and failing) to reach the controller meanwhile.
    eventually_async(
        "reconnect attempts",
        STEP,
        Duration::from_millis(10),
        || {
            let status = sub.status();
            async move {
                if status.counters.reconnects >= 2
                    && status.last_error.is_some()
                    && !status.connected
                {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("{status:?}"))
                }
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(rx.borrow().source, StateSource::FromDisk);
    sub.shutdown().await;

    // Restart with the controller back: resume from the persisted versions.
    let (sub, mut rx) = Subscription::spawn(first_config, accept_all);
    let mut stream = controller.next_stream().await;
    assert_eq!(stream.hello.resource_versions, synced.resource_versions());
    assert_eq!(stream.hello.last_acked_version, 7);
    stream.send(update(1, false, vec![], &[])).await;
    stream.expect_ack(1).await;
    let state = wait_for_state(&mut rx, "resumed", |s| {
        s.source == StateSource::FromController
    })
    .await;
    assert!(state.synced);
    assert_eq!(keys(&state), ["Service/production/payment", "Workload/w1"]);
    sub.shutdown().await;
}

#[tokio::test]
async fn an_unusable_state_file_is_reported_and_the_proxy_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("config.state");
    let mut controller = Controller::start().await;
    let mut with_file = config(&controller.uri, static_token());
    with_file.state_file = Some(state_file.clone());

    // Garbage: reported, started empty, then overwritten by the first sync.
    std::fs::write(&state_file, b"{\"not\": \"a state file\"}").unwrap();
    let (sub, mut rx) = Subscription::spawn(with_file.clone(), accept_all);
    assert_eq!(rx.borrow().source, StateSource::Initial);
    assert!(rx.borrow().resources.is_empty());
    let error = failed_load(&sub.status().state_file_load);
    assert!(error.contains("not an Ambit config state file"), "{error}");
    assert!(error.contains(state_file.to_str().unwrap()), "{error}");
    let mut stream = controller.next_stream().await;
    assert!(stream.hello.resource_versions.is_empty());
    stream
        .send(update(1, true, vec![service("payment", "10.96.0.10")], &[]))
        .await;
    stream.expect_ack(1).await;
    let synced = wait_for_state(&mut rx, "synced", |s| s.version == 1).await;
    wait_persisted(&sub, synced.generation).await;
    sub.shutdown().await;
    drop(stream);
    let good = std::fs::read(&state_file).unwrap();

    let offline = |c: &SubscriptionConfig, uri: &Uri| {
        let mut c = c.clone();
        c.controller = uri.clone();
        c
    };
    let nowhere = unreachable_uri().await;

    // Truncated (a torn write on a filesystem without atomic rename, a full disk).
    std::fs::write(&state_file, &good[..good.len() - 5]).unwrap();
    let (sub, rx) = Subscription::spawn(offline(&with_file, &nowhere), accept_all);
    assert_eq!(rx.borrow().source, StateSource::Initial);
    let error = failed_load(&sub.status().state_file_load);
    assert!(error.contains("corrupt"), "{error}");
    drop(sub);

    // Another node's file.
    std::fs::write(&state_file, &good).unwrap();
    let mut node_b = offline(&with_file, &nowhere);
    node_b.subscriber = Subscriber::Node {
        node_name: "node-b".into(),
    };
    let (sub, rx) = Subscription::spawn(node_b, accept_all);
    assert_eq!(rx.borrow().source, StateSource::Initial);
    let error = failed_load(&sub.status().state_file_load);
    assert!(error.contains("node/node-a, not of node/node-b"), "{error}");
    drop(sub);

    // A state this build's validator refuses.
    let (sub, rx) = Subscription::spawn(offline(&with_file, &nowhere), |p: &ProposedState| {
        assert_eq!(p.source, StateSource::FromDisk);
        Err(Rejection::new("services are not supported by this build"))
    });
    assert_eq!(rx.borrow().source, StateSource::Initial);
    let error = failed_load(&sub.status().state_file_load);
    assert!(error.contains("not supported by this build"), "{error}");
    drop(sub);

    // And the intact file still loads.
    let (sub, rx) = Subscription::spawn(offline(&with_file, &nowhere), accept_all);
    assert_eq!(rx.borrow().source, StateSource::FromDisk);
    assert_eq!(keys(&rx.borrow()), ["Service/production/payment"]);
    sub.shutdown().await;
    assert_no_temp_files(dir.path());
}

fn failed_load(load: &StateFileLoad) -> String {
    match load {
        StateFileLoad::Failed { error } => error.clone(),
        other => panic!("expected a failed load, got {other:?}"),
    }
}

async fn wait_persisted(sub: &Subscription, generation: u64) {
    eventually_async("state persisted", STEP, Duration::from_millis(10), || {
        let status = sub.status();
        async move {
            if status.persisted_generation >= generation {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{status:?}"))
            }
        }
    })
    .await
    .unwrap();
}

fn assert_no_temp_files(dir: &Path) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["config.state"]);
}
