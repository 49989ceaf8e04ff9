//! Real gRPC over a real socket: both services served by tonic on 127.0.0.1:0 with
//! trivial in-test implementations, driven by the generated clients.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use ambit_api::BearerToken;
use ambit_api::ca::v1::certificate_service_client::CertificateServiceClient;
use ambit_api::ca::v1::certificate_service_server::{CertificateService, CertificateServiceServer};
use ambit_api::ca::v1::{CreateCertificateRequest, CreateCertificateResponse};
use ambit_api::config::v1::config_discovery_client::ConfigDiscoveryClient;
use ambit_api::config::v1::config_discovery_server::{ConfigDiscovery, ConfigDiscoveryServer};
use ambit_api::config::v1::{
    Ack, ConfigUpdate, Hello, NodeSubscriber, Resource, Service, SubscribeRequest, Workload, hello,
    resource, subscribe_request,
};
use ambit_api::time::{duration_to_proto, timestamp_from_proto, timestamp_to_proto};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

const NODE_TOKEN: &str = "node-a-bootstrap-token";
const STEP: Duration = Duration::from_secs(10);

fn authenticate<T>(request: &Request<T>) -> Result<(), Status> {
    let token = BearerToken::from_metadata(request.metadata())
        .map_err(|e| Status::unauthenticated(e.to_string()))?;
    if token.secret() != NODE_TOKEN {
        return Err(Status::unauthenticated("unknown token"));
    }
    Ok(())
}

#[derive(Debug)]
struct FakeCa;

#[tonic::async_trait]
impl CertificateService for FakeCa {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        authenticate(&request)?;
        let req = request.into_inner();
        if !req
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
        {
            return Err(Status::invalid_argument("csr_pem is not a PEM CSR"));
        }
        let now = SystemTime::now();
        Ok(Response::new(CreateCertificateResponse {
            cert_chain_pem: vec![format!("leaf for {}", req.identity)],
            trust_bundle_pem: vec!["root".into()],
            not_before: Some(timestamp_to_proto(now)),
            not_after: Some(timestamp_to_proto(now + Duration::from_secs(86_400))),
            trust_domain: "cluster.local".into(),
        }))
    }
}

fn workload(uid: &str, node: &str) -> resource::Kind {
    resource::Kind::Workload(Workload {
        uid: uid.into(),
        name: format!("pod-{uid}"),
        namespace: "production".into(),
        node: node.into(),
        addresses: vec!["10.0.0.5".into()],
        service_account: "checkout".into(),
        spiffe_id: "spiffe://cluster.local/ns/production/sa/checkout".into(),
        captured: true,
        ..Default::default()
    })
}

/// Snapshot after `Hello`, then — only once that is ACKed — one delta.
#[derive(Debug)]
struct FakeDiscovery;

#[tonic::async_trait]
impl ConfigDiscovery for FakeDiscovery {
    type SubscribeStream = ReceiverStream<Result<ConfigUpdate, Status>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        authenticate(&request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let hello = match inbound.message().await {
                Ok(Some(SubscribeRequest {
                    kind: Some(subscribe_request::Kind::Hello(h)),
                })) => h,
                _ => {
                    let _ = tx
                        .send(Err(Status::invalid_argument("first message must be Hello")))
                        .await;
                    return;
                }
            };
            let Some(hello::Subscriber::Node(node)) = hello.subscriber else {
                let _ = tx.send(Err(Status::invalid_argument("node only"))).await;
                return;
            };
            let snapshot = ConfigUpdate {
                version: 1,
                is_full_snapshot: true,
                resources: vec![
                    Resource::new(workload("w1", &node.node_name)),
                    Resource::new(resource::Kind::Service(Service {
                        name: "payment".into(),
                        namespace: "production".into(),
                        vips: vec!["10.96.0.10".into()],
                        ..Default::default()
                    })),
                ],
                removed: vec![],
                generated_at: Some(timestamp_to_proto(SystemTime::now())),
                controller_id: "test".into(),
            };
            if tx.send(Ok(snapshot)).await.is_err() {
                return;
            }
            // At most one update in flight: wait for the ACK of version 1.
            match inbound.message().await {
                Ok(Some(SubscribeRequest {
                    kind: Some(subscribe_request::Kind::Ack(Ack { version: 1 })),
                })) => {}
                other => {
                    let _ = tx
                        .send(Err(Status::failed_precondition(format!(
                            "expected Ack(1), got {other:?}"
                        ))))
                        .await;
                    return;
                }
            }
            let delta = ConfigUpdate {
                version: 2,
                is_full_snapshot: false,
                resources: vec![Resource::new(workload("w2", &node.node_name))],
                removed: vec!["Service/production/payment".into()],
                generated_at: Some(timestamp_to_proto(SystemTime::now())),
                controller_id: "test".into(),
            };
            if tx.send(Ok(delta)).await.is_err() {
                return;
            }
            // Drain the rest (the final ACK) so the client's send side completes.
            while let Ok(Some(_)) = inbound.message().await {}
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn serve() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_service(CertificateServiceServer::new(FakeCa))
            .add_service(
                ConfigDiscoveryServer::new(FakeDiscovery)
                    .max_decoding_message_size(ambit_api::MAX_MESSAGE_SIZE),
            )
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn channel(addr: SocketAddr) -> Channel {
    tokio::time::timeout(
        STEP,
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test]
async fn create_certificate_requires_a_bearer_token() {
    let addr = serve().await;
    let channel = channel(addr).await;
    let request = CreateCertificateRequest {
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\n...".into(),
        identity: "spiffe://cluster.local/ns/production/sa/checkout".into(),
        requested_ttl: Some(duration_to_proto(Duration::from_secs(3600))),
    };

    let mut anonymous = CertificateServiceClient::new(channel.clone());
    let err = anonymous
        .create_certificate(request.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let token = BearerToken::new(NODE_TOKEN).unwrap();
    let mut client = CertificateServiceClient::with_interceptor(channel, token);
    let resp = client
        .create_certificate(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.cert_chain_pem,
        ["leaf for spiffe://cluster.local/ns/production/sa/checkout"]
    );
    let not_after = timestamp_from_proto(&resp.not_after.unwrap()).unwrap();
    assert!(not_after > SystemTime::now());
}

#[tokio::test]
async fn subscribe_gets_snapshot_then_delta_after_ack() {
    let addr = serve().await;
    let token = BearerToken::new(NODE_TOKEN).unwrap();
    let mut client = ConfigDiscoveryClient::with_interceptor(channel(addr).await, token)
        .max_decoding_message_size(ambit_api::MAX_MESSAGE_SIZE);

    let (tx, rx) = mpsc::channel(4);
    tx.send(SubscribeRequest {
        kind: Some(subscribe_request::Kind::Hello(Hello {
            subscriber: Some(hello::Subscriber::Node(NodeSubscriber {
                node_name: "node-a".into(),
            })),
            proxy_version: "test".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut updates = client
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    let snapshot = tokio::time::timeout(STEP, updates.next())
        .await
        .expect("no snapshot")
        .unwrap()
        .unwrap();
    assert!(snapshot.is_full_snapshot);
    assert_eq!(snapshot.version, 1);
    let keys: Vec<&str> = snapshot.resources.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["Workload/w1", "Service/production/payment"]);
    // The key and version survive the wire and still match the content.
    for r in &snapshot.resources {
        let kind = r.kind.as_ref().unwrap();
        assert_eq!(kind.key().as_str(), r.key);
        assert_eq!(Resource::content_version(kind), r.version);
    }
    let Some(resource::Kind::Workload(w)) = &snapshot.resources[0].kind else {
        panic!(
            "first resource is not a workload: {:?}",
            snapshot.resources[0]
        );
    };
    assert_eq!(w.node, "node-a");

    tx.send(SubscribeRequest {
        kind: Some(subscribe_request::Kind::Ack(Ack { version: 1 })),
    })
    .await
    .unwrap();

    let delta = tokio::time::timeout(STEP, updates.next())
        .await
        .expect("no delta")
        .unwrap()
        .unwrap();
    assert!(!delta.is_full_snapshot);
    assert_eq!(delta.version, 2);
    assert_eq!(delta.resources.len(), 1);
    assert_eq!(delta.resources[0].key, "Workload/w2");
    assert_eq!(delta.removed, ["Service/production/payment"]);

    tx.send(SubscribeRequest {
        kind: Some(subscribe_request::Kind::Ack(Ack { version: 2 })),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn subscribe_without_token_is_unauthenticated() {
    let addr = serve().await;
    let mut client = ConfigDiscoveryClient::new(channel(addr).await);
    let (_tx, rx) = mpsc::channel::<SubscribeRequest>(1);
    let err = client.subscribe(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}
