//! In-process tests of the gRPC echo service and the `/_echo/stats` counters: a real
//! server on 127.0.0.1:0 driven by the library's own clients.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{net::SocketAddr, num::NonZeroU64, time::Duration};

use ambit_echo::{
    call::{self, CallConfig},
    client::{HeaderArg, Protocol, RequestSpec, Target},
    grpc::{self, GrpcConfig, GrpcSummary, Method},
    serve::{self, Faults, Identity, ServeConfig},
    stats::Counts,
};
use bytes::Bytes;
use tokio::{sync::oneshot, task::JoinHandle};

const POD: &str = "echo-v1-0";

/// A running server; stops when dropped (also when a test fails).
struct Server {
    http: SocketAddr,
    grpc: SocketAddr,
    _stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(faults: Faults) -> Self {
        let any = || "127.0.0.1:0".parse().unwrap();
        let bound = serve::bind(ServeConfig {
            identity: Identity {
                pod: POD.into(),
                namespace: "shop".into(),
                version: "v1".into(),
            },
            http_addr: any(),
            tcp_addr: any(),
            discard_addr: any(),
            grpc_addr: any(),
            faults,
            drain_timeout: Duration::from_secs(1),
        })
        .await
        .unwrap();
        let (http, grpc) = (bound.http_addr, bound.grpc_addr);
        assert_ne!(grpc.port(), 0);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(stopped));
        Self {
            http,
            grpc,
            _stop: stop,
            task,
        }
    }

    async fn http(
        &self,
        method: http::Method,
        path: &str,
        headers: &[&str],
        body: &str,
    ) -> (u16, Bytes) {
        let target: Target = format!("http://{}{path}", self.http).parse().unwrap();
        let headers = headers.iter().map(|h| h.parse::<HeaderArg>().unwrap());
        let spec = RequestSpec::new(
            &target,
            Protocol::Http1,
            method,
            headers,
            Bytes::from(body.to_owned()),
        )
        .unwrap();
        let resp = call::run(CallConfig {
            request: spec,
            timeout: Duration::from_secs(10),
        })
        .await
        .unwrap();
        (resp.status.as_u16(), resp.body)
    }

    async fn stats(&self) -> Counts {
        let (status, body) = self.http(http::Method::GET, "/_echo/stats", &[], "").await;
        assert_eq!(status, 200);
        serde_json::from_slice(&body).unwrap()
    }

    async fn grpc(&self, method: Method, calls: u64, metadata: &[&str]) -> GrpcSummary {
        grpc::run(GrpcConfig {
            target: format!("http://{}", self.grpc).parse().unwrap(),
            method,
            calls: NonZeroU64::new(calls).unwrap(),
            timeout: Duration::from_secs(10),
            metadata: metadata.iter().map(|h| h.parse().unwrap()).collect(),
        })
        .await
        .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_name_the_pod_and_are_counted() {
    let server = Server::start(Faults::default()).await;
    let s = server.grpc(Method::Echo, 3, &[]).await;
    assert_eq!((s.calls, s.ok), (3, 3), "{s:?}");
    assert_eq!(s.by_pod.get(POD), Some(&3), "{s:?}");
    assert_eq!(s.by_version.get("v1"), Some(&3), "{s:?}");
    let s = server
        .grpc(Method::Ping, 2, &["x-echo-grpc-status: 14"])
        .await;
    assert_eq!(s.ok, 0, "{s:?}");
    assert_eq!(s.by_code.get(&14), Some(&2), "{s:?}");
    let s = server
        .grpc(Method::Ping, 1, &["x-echo-grpc-status: 99"])
        .await;
    assert_eq!(s.by_code.get(&3), Some(&1), "INVALID_ARGUMENT: {s:?}");
    assert!(
        s.errors.keys().any(|e| e.contains("x-echo-grpc-status")),
        "{s:?}"
    );

    let counts = server.stats().await;
    assert_eq!(counts.grpc.get(&0), Some(&3), "{counts:?}");
    assert_eq!(counts.grpc.get(&14), Some(&2), "{counts:?}");
    assert_eq!(counts.grpc_total(), 6, "{counts:?}");
    assert_eq!(
        counts.http_total(),
        0,
        "the stats request itself is not counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_injection_fails_grpc_with_unavailable_and_http_with_the_status() {
    let server = Server::start(Faults::new(1.0, 500).unwrap()).await;
    let s = server.grpc(Method::Echo, 4, &[]).await;
    assert_eq!(s.by_code.get(&14), Some(&4), "{s:?}");
    for _ in 0..2 {
        let (status, _) = server.http(http::Method::GET, "/x", &[], "").await;
        assert_eq!(status, 500);
    }
    let (status, _) = server
        .http(http::Method::GET, "/x", &["x-echo-status: 201"], "")
        .await;
    assert_eq!(status, 201);

    // Switched off at run time, for both protocols.
    let (status, _) = server
        .http(
            http::Method::POST,
            "/_echo/control",
            &[],
            r#"{"fail_rate": 0}"#,
        )
        .await;
    assert_eq!(status, 200);
    let s = server.grpc(Method::Echo, 2, &[]).await;
    assert_eq!(s.ok, 2, "{s:?}");
    let (status, _) = server.http(http::Method::GET, "/x", &[], "").await;
    assert_eq!(status, 200);

    let counts = server.stats().await;
    assert_eq!(counts.http.get(&500), Some(&2), "{counts:?}");
    assert_eq!(counts.http.get(&201), Some(&1), "{counts:?}");
    assert_eq!(counts.http.get(&200), Some(&1), "{counts:?}");
    assert_eq!(counts.grpc.get(&14), Some(&4), "{counts:?}");
    assert_eq!(counts.grpc.get(&0), Some(&2), "{counts:?}");
}
