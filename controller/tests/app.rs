//! The assembled controller on 127.0.0.1:0: readiness follows the initial sync,
//! `/config_dump` lists resources and subscribers (with a NACK), `/metrics` counts,
//! shutdown drains open streams within the deadline; the CA root is persisted or
//! operator-supplied.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use ambit_api::{
    BearerToken,
    config::v1::{
        ConfigUpdate, Hello, Nack, NodeSubscriber, Resource, SubscribeRequest, Workload,
        config_discovery_client::ConfigDiscoveryClient, hello, resource, subscribe_request,
    },
};
use ambit_controller::{
    app::{self, Config, Parts, ServedConfig},
    auth::{BootstrapTokens, TokensFile},
    validate::StatusEntry,
    view::{ConfigView, IdentityAuthority, Subscriber},
};
use ambit_identity::{CertificateAuthority, SpiffeId, TrustDomain};
use clap::Parser as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming, transport::Channel};

const STEP: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default, Clone)]
struct TestWorld {
    generation: u64,
    synced: bool,
    statuses: Vec<StatusEntry>,
    workloads: Vec<&'static str>,
}

impl ConfigView for TestWorld {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn resources_for(&self, subscriber: &Subscriber) -> BTreeMap<String, Resource> {
        let Subscriber::Node { name } = subscriber else {
            return BTreeMap::new();
        };
        self.workloads
            .iter()
            .map(|uid| {
                let r = Resource::new(resource::Kind::Workload(Workload {
                    uid: (*uid).into(),
                    node: name.clone(),
                    ..Default::default()
                }));
                (r.key.clone(), r)
            })
            .collect()
    }
}

impl IdentityAuthority for TestWorld {
    fn node_may_hold(&self, _node: &str, _id: &SpiffeId) -> bool {
        false
    }

    fn waypoint_identity(&self, _namespace: &str, _name: &str) -> Option<SpiffeId> {
        None
    }
}

impl ServedConfig for TestWorld {
    fn synced(&self) -> bool {
        self.synced
    }

    fn statuses(&self) -> Vec<StatusEntry> {
        self.statuses.clone()
    }
}

fn config(state_dir: &std::path::Path, extra: &[&str]) -> Config {
    let state = state_dir.display().to_string();
    let mut args = vec![
        "ambit-controller",
        "--grpc-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
        "--state-dir",
        &state,
        "--drain-timeout",
        "5s",
    ];
    args.extend_from_slice(extra);
    Config::try_parse_from(args).unwrap()
}

fn entry(kind: &str, name: &str, status: &'static str, reason: &str) -> StatusEntry {
    StatusEntry {
        kind: Some(kind.into()),
        namespace: Some("shop".into()),
        name: Some(name.into()),
        status,
        reason: reason.into(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> (http::StatusCode, String) {
    let (status, body) = ambit_runtime::admin::get(addr, path).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn dump(addr: SocketAddr) -> serde_json::Value {
    let (status, body) = get(addr, "/config_dump").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn subscribe(
    addr: SocketAddr,
    token: &str,
    node: &str,
) -> (mpsc::Sender<SubscribeRequest>, Streaming<ConfigUpdate>) {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        ConfigDiscoveryClient::with_interceptor(channel, BearerToken::new(token).unwrap());
    let (tx, rx) = mpsc::channel(4);
    tx.send(SubscribeRequest {
        kind: Some(subscribe_request::Kind::Hello(Hello {
            subscriber: Some(hello::Subscriber::Node(NodeSubscriber {
                node_name: node.into(),
            })),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let stream = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

#[tokio::test]
async fn readiness_dump_metrics_and_drain() {
    let state = tempfile::tempdir().unwrap();
    let config = config(state.path(), &["--cert-ttl", "2h"]);
    let ca = CertificateAuthority::load_or_generate(
        state.path(),
        TrustDomain::new("cluster.local").unwrap(),
        ambit_identity::DEFAULT_ROOT_VALIDITY,
    )
    .unwrap();
    let tokens: TokensFile =
        serde_yaml::from_str("tokens: [{token: node-1-token, node: node-1}]").unwrap();
    let (tx, rx) = watch::channel(Arc::new(TestWorld::default()));
    let bound = app::bind(
        &config,
        Parts {
            worlds: rx,
            ca: Arc::new(ca),
            authenticator: Arc::new(BootstrapTokens::from_entries(&tokens).unwrap()),
            keep_alive: Vec::new(),
            tasks: Vec::new(),
            mode: "test",
        },
    )
    .await
    .unwrap();
    let serving = bound.serve();
    let (grpc, ready, admin) = (
        serving.grpc_addr(),
        serving.readiness_addr(),
        serving.admin_addr(),
    );

    // Not ready before the initial sync, and says why.
    let (status, body) = get(ready, "/healthz/ready").await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("initial sync of the config source"), "{body}");
    let d = dump(admin).await;
    assert_eq!(d["synced"], false, "{d}");

    tx.send_replace(Arc::new(TestWorld {
        generation: 1,
        synced: true,
        statuses: vec![
            entry("Pod", "checkout-0", "Accepted", ""),
            entry(
                "AuthorizationPolicy",
                "bad",
                "Rejected",
                "spec.action: unknown action `MAYBE`",
            ),
        ],
        workloads: vec!["w1"],
    }));
    ambit_test_support::eventually_async("ready after the sync", STEP, POLL, || async move {
        let (status, body) = get(ready, "/healthz/ready").await;
        anyhow::ensure!(status == http::StatusCode::OK, "{status}: {body}");
        Ok(())
    })
    .await
    .unwrap();

    // A subscriber that NACKs its snapshot.
    let (tx_req, mut updates) = subscribe(grpc, "node-1-token", "node-1").await;
    let snap = updates.message().await.unwrap().unwrap();
    assert!(snap.is_full_snapshot);
    tx_req
        .send(SubscribeRequest {
            kind: Some(subscribe_request::Kind::Nack(Nack {
                version: snap.version,
                error: "unknown resource kind".into(),
                resource_errors: Vec::new(),
            })),
        })
        .await
        .unwrap();

    let d = ambit_test_support::eventually_async(
        "the NACK in /config_dump",
        STEP,
        POLL,
        || async move {
            let d = dump(admin).await;
            anyhow::ensure!(!d["subscribers"][0]["lastNack"].is_null(), "{d:#}");
            Ok(d)
        },
    )
    .await
    .unwrap();
    let sub = &d["subscribers"][0];
    assert_eq!(sub["subscriber"], "node/node-1", "{d:#}");
    assert_eq!(sub["connected"], true);
    assert_eq!(sub["versionSent"], 1);
    assert_eq!(sub["versionAcked"], 0);
    assert_eq!(sub["lastNack"]["version"], 1);
    assert_eq!(sub["lastNack"]["error"], "unknown resource kind");
    assert_eq!(d["synced"], true);
    assert_eq!(d["mode"], "test");
    assert_eq!(d["config"]["trust_domain"], "cluster.local");
    assert_eq!(d["config"]["cert_ttl"], "7200s");
    assert_eq!(d["listeners"]["grpc"], grpc.to_string());
    assert_eq!(d["ca"]["trustDomain"], "cluster.local");
    let resources = d["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 2);
    assert_eq!(resources[1]["kind"], "AuthorizationPolicy");
    assert_eq!(resources[1]["status"], "Rejected");
    assert_eq!(
        resources[1]["reason"],
        "spec.action: unknown action `MAYBE`"
    );

    let (status, metrics) = get(admin, "/metrics").await;
    assert_eq!(status, http::StatusCode::OK);
    // Also scrapeable on the readiness listener.
    assert_eq!(get(ready, "/metrics").await.0, http::StatusCode::OK);
    assert_eq!(
        get(ready, "/config_dump").await.0,
        http::StatusCode::NOT_FOUND
    );
    for line in [
        "ambit_controller_resources{status=\"Accepted\"} 1",
        "ambit_controller_resources{status=\"Rejected\"} 1",
        "ambit_controller_pushes_total{subscriber_type=\"node\"} 1",
        "ambit_controller_nacks_total{subscriber_type=\"node\"} 1",
        "ambit_controller_subscribers{subscriber_type=\"node\"} 1",
        "ambit_controller_config_generation 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }

    // Drain: the open stream is ended (UNAVAILABLE: reconnect and resume) well within
    // the deadline.
    let started = std::time::Instant::now();
    serving.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let end = tokio::time::timeout(STEP, updates.message()).await.unwrap();
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(None) => {}
        Ok(Some(u)) => panic!("unexpected update {u:?}"),
    }
    assert!(tokio::net::TcpStream::connect(admin).await.is_err());
}

#[test]
fn the_ca_root_is_persisted_or_operator_supplied() {
    let state = tempfile::tempdir().unwrap();
    let first = app::load_ca(&config(state.path(), &[])).unwrap();
    let again = app::load_ca(&config(state.path(), &[])).unwrap();
    assert_eq!(
        first.trust_bundle().roots_pem(),
        again.trust_bundle().roots_pem()
    );

    let cert = state.path().join(ambit_identity::ca::CERT_FILE);
    let key = state.path().join(ambit_identity::ca::KEY_FILE);
    let other_state = tempfile::tempdir().unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let supplied = app::load_ca(&config(
        other_state.path(),
        &["--ca-cert", &cert, "--ca-key", &key],
    ))
    .unwrap();
    assert_eq!(
        first.trust_bundle().roots_pem(),
        supplied.trust_bundle().roots_pem()
    );
    assert!(
        std::fs::read_dir(other_state.path())
            .unwrap()
            .next()
            .is_none(),
        "nothing is generated when the operator supplies the CA"
    );

    // One without the other is a usage error.
    let state_arg = other_state.path().display().to_string();
    let err = Config::try_parse_from([
        "ambit-controller",
        "--state-dir",
        &state_arg,
        "--ca-cert",
        &cert,
    ])
    .unwrap_err();
    assert!(err.to_string().contains("--ca-key"), "{err}");
    // A bad trust domain is refused with the flag named.
    let err = app::load_ca(&config(
        other_state.path(),
        &["--trust-domain", "Not A Domain"],
    ))
    .unwrap_err();
    assert!(err.to_string().contains("--trust-domain"), "{err}");
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {ambit.dev/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: checkout-0, namespace: shop, uid: pod-checkout, labels: {app: checkout}}
spec: {nodeName: node-1, serviceAccountName: checkout, containers: [{name: c, image: x}]}
status: {podIP: 10.244.1.2}
"#;

/// The real assembly in local mode: directory source, index, push, CA and admin.
#[tokio::test]
async fn local_mode_serves_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (config_dir, state_dir) = (dir.path().join("config"), dir.path().join("state"));
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("00-cluster.yaml"), CLUSTER).unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        "tokens:\n- {token: node-1-token, node: node-1}\n- {token: node-2-token, node: node-2}\n",
    )
    .unwrap();
    let (cfg, tok) = (
        config_dir.display().to_string(),
        tokens.display().to_string(),
    );
    let config = config(
        &state_dir,
        &["--config-dir", &cfg, "--bootstrap-tokens", &tok],
    );
    let serving = app::build(&config).await.unwrap().serve();
    let (grpc, admin) = (serving.grpc_addr(), serving.admin_addr());

    let d = ambit_test_support::eventually_async("synced", STEP, POLL, || async move {
        let d = dump(admin).await;
        anyhow::ensure!(d["synced"] == true, "{d:#}");
        Ok(d)
    })
    .await
    .unwrap();
    assert_eq!(d["mode"], "local");
    let resources = d["resources"].as_array().unwrap();
    assert_eq!(resources.len(), 2, "{d:#}");
    assert!(resources.iter().all(|r| r["status"] == "Accepted"), "{d:#}");
    assert!(state_dir.join(ambit_identity::ca::CERT_FILE).is_file());

    // node-1 gets its workload; a policy file added later arrives as a delta.
    let (tx, mut updates) = subscribe(grpc, "node-1-token", "node-1").await;
    let snap = updates.message().await.unwrap().unwrap();
    assert!(snap.is_full_snapshot);
    assert!(
        snap.resources
            .iter()
            .any(|r| r.key == "Workload/pod-checkout"),
        "{snap:?}"
    );
    tx.send(SubscribeRequest {
        kind: Some(subscribe_request::Kind::Ack(ambit_api::config::v1::Ack {
            version: snap.version,
        })),
    })
    .await
    .unwrap();
    std::fs::write(
        config_dir.join("policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: shop}\nspec: {}\n",
    )
    .unwrap();
    let delta = tokio::time::timeout(STEP, updates.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!delta.is_full_snapshot);
    assert!(
        delta
            .resources
            .iter()
            .any(|r| r.key == "Authorization/shop/deny-all"),
        "{delta:?}"
    );

    // The CA signs checkout's identity for node-1, not for node-2.
    let id = "spiffe://cluster.local/ns/shop/sa/checkout";
    let csr = |_: ()| {
        let key = ambit_identity::WorkloadKey::generate().unwrap();
        key.csr_pem(&SpiffeId::parse(id).unwrap()).unwrap()
    };
    let ca_client = |token: &'static str| async move {
        let channel = Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ambit_api::ca::v1::certificate_service_client::CertificateServiceClient::with_interceptor(
            channel,
            BearerToken::new(token).unwrap(),
        )
    };
    let request = |csr_pem: String| ambit_api::ca::v1::CreateCertificateRequest {
        csr_pem,
        identity: id.into(),
        requested_ttl: None,
    };
    let resp = ca_client("node-1-token")
        .await
        .create_certificate(request(csr(())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.trust_domain, "cluster.local");
    let err = ca_client("node-2-token")
        .await
        .create_certificate(request(csr(())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    serving.shutdown().await;
}
