//! Sidecar L7 end to end on the simulated cluster: every meshed pod runs
//! `ambit-node --mode sidecar`, and the waypoint's L7 engine (`ambit-waypoint`, the same
//! binary, identity and configuration as a waypoint pod) runs inside each server pod,
//! beside its sidecar, instead of in a waypoint pod of its own. The waypoint's Service
//! selects the server pods and maps the HBONE port 15008 to the engine's 15088.
//!
//! Checked: a call to the Service crosses the engine (a VirtualService fault abort that
//! only the L7 engine can produce), over mutual TLS from the client's sidecar (whose
//! metrics name the waypoint's identity as the peer) and on to the app through the
//! server pod's sidecar (which trusts the engine's `Forwarded`: the app sees the
//! client); the engine counts the requests under the client's identity; the server
//! pods cannot be reached around the engine; and an engine reaching the other server
//! pod is not captured by its own pod's sidecar.
//!
//! Needs root (eBPF, netns, mounts) and the workspace binaries (`ambit-node`,
//! `ambit-controller`, `ambit-echo`, `ambit-waypoint`); fails, never skips, without them.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ambit_simcluster::{
    Cluster, L7_ENGINE_PROCESS, MeshOptions, Options, Place, Topology, WaypointProcessInfo,
};
use anyhow::{bail, ensure};

/// Bound on a configuration change reaching the proxies.
const CONFIG_DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);
const SERVER_HOST: &str = "server.shop.svc.cluster.local";
const CLIENT_PRINCIPAL: &str = "cluster.local/ns/shop/sa/client";
const WAYPOINT_PRINCIPAL: &str = "cluster.local/ns/shop/sa/waypoint";

/// A client on node-1, two server pods (one per node) behind the Service `server`,
/// which uses the waypoint `waypoint`; the waypoint has no pods of its own: its
/// Service selects the server pods, where its engines listen on 15088.
const TOPOLOGY: &str = "
nodes:
  - name: node-1
  - name: node-2
namespaces:
  - name: shop
    labels: { ambit.dev/dataplane-mode: ambient }
    workloads:
      - name: client
        serviceAccount: client
        labels: { app: client }
        nodes: [node-1]
        readyPorts: [8080]
      - name: server
        serviceAccount: server
        labels: { app: server }
        nodes: [node-1, node-2]
        readyPorts: [8080]
    waypoints:
      - name: waypoint
        nodes: []
    services:
      - name: server
        selector: { app: server }
        labels: { ambit.dev/use-waypoint: waypoint }
        ports:
          - { name: http, port: 80, targetPort: 8080 }
      - name: waypoint
        selector: { app: server }
        ports:
          - { name: mesh, port: 15008, targetPort: 15088 }
";

/// Aborts requests carrying `x-teapot: yes` with 418: only the L7 engine applies it
/// (the echo app never answers 418).
const TEAPOT: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: server-teapot, namespace: shop}
spec:
  hosts: [server.shop.svc.cluster.local]
  http:
  - match: [{headers: {x-teapot: {exact: "yes"}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: server.shop.svc.cluster.local}}]
  - route: [{destination: {host: server.shop.svc.cluster.local}}]
"#;

fn sidecar_l7_cluster() -> Cluster {
    for bin in [
        "ambit-echo",
        "ambit-controller",
        "ambit-node",
        "ambit-waypoint",
    ] {
        if let Err(e) = ambit_test_support::bin_path(bin) {
            panic!("{e:#}");
        }
    }
    let bin_dir = ambit_test_support::bin_dir().unwrap();
    let opts = Options::for_test(bin_dir).mesh(MeshOptions::with_l7_sidecars());
    let topology = Topology::from_yaml(TOPOLOGY).unwrap();
    Cluster::up(opts, &topology).unwrap_or_else(|e| panic!("sidecar L7 cluster: {e}"))
}

fn eventually<T>(what: &str, check: impl FnMut() -> anyhow::Result<T>) -> T {
    ambit_test_support::eventually(what, CONFIG_DEADLINE, POLL, check)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `ambit-echo call [-H HEADER] URL` from inside `from`: the response status and
/// body, or why no response arrived.
fn call(
    cluster: &Cluster,
    from: &str,
    url: &str,
    header: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut args = vec!["ambit-echo", "call", "--timeout", "3s"];
    if let Some(h) = header {
        args.extend(["-H", h]);
    }
    args.push(url);
    let out = cluster.exec(from, &args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "call {url} from {from}: {stderr}");
    let status = stderr
        .lines()
        .find_map(|l| l.strip_prefix("HTTP "))
        .and_then(|s| s.trim().parse().ok());
    let Some(status) = status else {
        bail!("call {url} from {from}: no status in {stderr:?}");
    };
    Ok((status, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// `/metrics` of a process of `pod` listening on `addr` in the pod.
fn metrics(cluster: &Cluster, pod: &ambit_simcluster::PodRef, addr: SocketAddr) -> String {
    let (code, body) = cluster
        .http_get(&Place::Pod(pod.clone()), addr, "/metrics")
        .unwrap();
    assert_eq!(code, 200, "/metrics of {addr} in {pod}: {body}");
    body
}

/// Sum of the samples of `metric` whose labels contain every one of `labels`.
fn sum(text: &str, metric: &str, labels: &[String]) -> u64 {
    text.lines()
        .filter(|l| {
            l.starts_with(&format!("{metric}{{")) && labels.iter().all(|x| l.contains(x.as_str()))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn engines(cluster: &Cluster) -> Vec<WaypointProcessInfo> {
    let mesh = cluster.status().mesh.unwrap();
    mesh.waypoints
        .into_iter()
        .filter(|w| w.process == L7_ENGINE_PROCESS)
        .collect()
}

/// `istio_requests_total` of every engine from the client to the server Service with
/// `code`, over mutual TLS.
fn engine_requests(cluster: &Cluster, code: u16) -> u64 {
    let labels = [
        format!("source_principal=\"{CLIENT_PRINCIPAL}\""),
        format!("destination_service=\"{SERVER_HOST}\""),
        format!("response_code=\"{code}\""),
        "connection_security_policy=\"mutual_tls\"".to_owned(),
    ];
    engines(cluster)
        .iter()
        .map(|e| {
            let text = metrics(cluster, &e.pod, SocketAddr::V4(e.metrics_addr));
            sum(&text, "istio_requests_total", &labels)
        })
        .sum()
}

/// Tunnels the client's sidecar opened to the waypoint's identity over mutual TLS.
fn client_tunnels_to_waypoint(cluster: &Cluster) -> u64 {
    let mesh = cluster.status().mesh.unwrap();
    let s = mesh
        .sidecars
        .iter()
        .find(|s| s.pod.to_string() == "shop/client-0")
        .unwrap();
    let text = metrics(cluster, &s.pod, SocketAddr::V4(s.metrics_addr));
    sum(
        &text,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"".to_owned(),
            format!("source_principal=\"{CLIENT_PRINCIPAL}\""),
            format!("destination_principal=\"{WAYPOINT_PRINCIPAL}\""),
            "connection_security_policy=\"mutual_tls\"".to_owned(),
        ],
    )
}

#[test]
fn service_traffic_crosses_the_l7_engine_inside_the_server_pods_over_mtls() {
    let cluster = sidecar_l7_cluster();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Where the proxies run: a sidecar in every pod, an engine in each server pod
        // (no waypoint pod exists), in the pod's own network namespace.
        let st = cluster.status();
        assert!(
            st.pods.iter().all(|p| p.waypoint.is_none()),
            "{:?}",
            st.pods
        );
        let mesh = st.mesh.as_ref().unwrap();
        assert!(mesh.daemons.is_empty());
        assert_eq!(mesh.sidecars.len(), 3);
        let hosts: BTreeSet<String> = engines(&cluster)
            .iter()
            .map(|e| e.pod.to_string())
            .collect();
        assert_eq!(
            hosts,
            BTreeSet::from(["shop/server-0".to_owned(), "shop/server-1".to_owned()])
        );
        for e in engines(&cluster) {
            let pod = cluster.pod(&e.pod.to_string()).unwrap();
            assert_eq!(e.hbone_addr.port(), 15088);
            assert_eq!(*e.hbone_addr.ip(), pod.ip);
            let engine_netns = std::fs::read_link(format!("/proc/{}/ns/net", e.pid)).unwrap();
            let app_netns =
                std::fs::read_link(format!("/proc/{}/ns/net", pod.pid.unwrap())).unwrap();
            assert_eq!(engine_netns, app_netns, "engine of {}", e.pod);
        }

        let client = "shop/client-0";
        let client_ip = cluster.pod(client).unwrap().ip;
        let vip = cluster.service("shop/server").unwrap().cluster_ip;
        let url = format!("http://{vip}:80/");
        cluster.apply_yaml(TEAPOT).unwrap();
        let tunnels_before = client_tunnels_to_waypoint(&cluster);

        // Only the L7 engine answers 418.
        eventually("the engine's fault abort", || {
            let (status, body) = call(&cluster, client, &url, Some("x-teapot: yes"))?;
            ensure!(status == 418, "HTTP {status}: {body}");
            Ok(())
        });
        // Other requests reach the app, which sees the client; both server pods are
        // reached (the engines balance over both: one of them crosses nodes from a
        // socket its own pod's sidecar must not capture).
        let mut answered = BTreeSet::new();
        eventually("answers from both server pods through the engines", || {
            let (status, body) = call(&cluster, client, &url, None)?;
            ensure!(status == 200, "HTTP {status}: {body}");
            let answer: serde_json::Value = serde_json::from_str(&body)?;
            let peer = answer["peer"].as_str().unwrap_or_default();
            let peer_ip: Ipv4Addr = peer.rsplit_once(':').map_or("", |p| p.0).parse()?;
            ensure!(peer_ip == client_ip, "the app saw {peer}, not the client");
            answered.insert(answer["pod"].as_str().unwrap_or_default().to_owned());
            ensure!(answered.len() == 2, "answered by {answered:?}");
            Ok(())
        });

        // The engines counted both kinds under the client's verified identity, and the
        // client's sidecar tunnelled to the waypoint's identity over mutual TLS.
        eventually("the engines' and the client sidecar's metrics", || {
            let (aborted, ok) = (
                engine_requests(&cluster, 418),
                engine_requests(&cluster, 200),
            );
            let tunnels = client_tunnels_to_waypoint(&cluster);
            ensure!(
                aborted >= 1 && ok >= 2 && tunnels > tunnels_before,
                "418: {aborted}, 200: {ok}, tunnels to the waypoint: {tunnels_before} → {tunnels}"
            );
            Ok(())
        });

        // The engines' own connections (to the other server pod, to the controller)
        // carry the bypass mark: the server pods' sidecars captured none of them.
        for pod in ["shop/server-0", "shop/server-1"] {
            let mesh = cluster.status().mesh.unwrap();
            let s = mesh
                .sidecars
                .iter()
                .find(|s| s.pod.to_string() == pod)
                .unwrap();
            let text = metrics(&cluster, &s.pod, SocketAddr::V4(s.metrics_addr));
            let captured = sum(
                &text,
                "istio_tcp_connections_opened_total",
                &["reporter=\"source\"".to_owned()],
            );
            assert_eq!(
                captured, 0,
                "the sidecar of {pod} captured outbound connections"
            );
        }

        // The server pods are fronted: the client cannot reach them around the engine.
        for pod in ["shop/server-0", "shop/server-1"] {
            let ip = cluster.pod(pod).unwrap().ip;
            let direct = format!("http://{ip}:8080/");
            assert!(
                call(&cluster, client, &direct, None).is_err(),
                "{direct} answered around the L7 engine"
            );
        }
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}
