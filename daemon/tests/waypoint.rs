//! Waypoints end to end on the simulated cluster: the real controller, one
//! `ambit-node` per node, and a real `ambit-waypoint` in its own pod. A Service
//! labelled `ambit.dev/use-waypoint` is reached through the waypoint (its L7 routes
//! apply: a VirtualService fault answers 418; the app still sees the original
//! client), its pods cannot be reached around it (bypass refused by the destination
//! daemon), a missing waypoint refuses the traffic (fail closed), and removing the
//! label restores direct traffic.
//!
//! Needs root (eBPF, netns, mounts) and the workspace binaries (`ambit-node`,
//! `ambit-controller`, `ambit-cni`, `ambit-echo`, `ambit-waypoint`); fails, never
//! skips, without them.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ambit_simcluster::{Cluster, MeshOptions, Options, Place, Topology};
use anyhow::{bail, ensure};

const USE_WAYPOINT: &str = "ambit.dev/use-waypoint";
const PAYMENT_HOST: &str = "payment.production.svc.cluster.local";
/// Bound on a configuration change reaching the proxies.
const CONFIG_DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);

/// The default shop plus the waypoint `production/waypoint` on node-1, with the mesh
/// (controller, daemons, waypoint) running.
fn mesh_shop_with_waypoint() -> Cluster {
    for bin in [
        "ambit-echo",
        "ambit-controller",
        "ambit-node",
        "ambit-cni",
        "ambit-waypoint",
    ] {
        if let Err(e) = ambit_test_support::bin_path(bin) {
            panic!("{e:#}");
        }
    }
    let bin_dir = ambit_test_support::bin_dir().unwrap();
    let opts = Options::for_test(bin_dir).mesh(MeshOptions::with_daemons());
    let topology = Topology::default_shop().with_waypoint("production", "waypoint", &["node-1"]);
    Cluster::up(opts, &topology).unwrap_or_else(|e| panic!("mesh shop with a waypoint: {e}"))
}

/// `ambit-echo call URL` from inside `from`: the JSON answer, or why it failed.
fn call(cluster: &Cluster, from: &str, url: &str) -> anyhow::Result<serde_json::Value> {
    let out = cluster.exec(from, &["ambit-echo", "call", "--timeout", "3s", url])?;
    ensure!(
        out.status.success(),
        "call {url} from {from} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn peer_ip(answer: &serde_json::Value) -> Ipv4Addr {
    let peer = answer["peer"].as_str().unwrap();
    peer.rsplit_once(':').unwrap().0.parse().unwrap()
}

/// `ambit-echo call -H HEADER URL` from inside `from`: the response status and
/// body, or why no response arrived.
fn call_with_header(
    cluster: &Cluster,
    from: &str,
    url: &str,
    header: &str,
) -> anyhow::Result<(u16, String)> {
    let out = cluster.exec(
        from,
        &["ambit-echo", "call", "--timeout", "3s", "-H", header, url],
    )?;
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

/// The waypoint's `/metrics`.
fn waypoint_metrics(cluster: &Cluster) -> String {
    let mesh = cluster.status().mesh.unwrap();
    let w = mesh.waypoints.first().unwrap();
    let (code, body) = cluster
        .http_get(
            &Place::Pod(w.pod.clone()),
            SocketAddr::V4(w.metrics_addr),
            "/metrics",
        )
        .unwrap();
    assert_eq!(code, 200, "waypoint /metrics: {body}");
    body
}

/// `istio_requests_total` the waypoint counted from checkout to the payment Service
/// with `response_code`.
fn waypoint_requests_from_checkout(cluster: &Cluster, response_code: u16) -> u64 {
    waypoint_metrics(cluster)
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(&format!("destination_service=\"{PAYMENT_HOST}\""))
                && l.contains("source_principal=\"cluster.local/ns/production/sa/checkout\"")
                && l.contains(&format!("response_code=\"{response_code}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn daemon_metrics(cluster: &Cluster, node: &str) -> String {
    let mesh = cluster.status().mesh.unwrap();
    let d = mesh.daemons.iter().find(|d| d.node == node).unwrap();
    let (code, body) = cluster
        .http_get(
            &Place::Node(node.to_owned()),
            SocketAddr::V4(d.metrics_addr),
            "/metrics",
        )
        .unwrap();
    assert_eq!(code, 200, "{node} /metrics: {body}");
    body
}

/// `istio_tcp_connections_opened_total` reported by the destination daemons (both
/// nodes) for the payment Service from service account `source_sa`.
fn destination_opened(cluster: &Cluster, source_sa: &str) -> u64 {
    let metrics = daemon_metrics(cluster, "node-1") + &daemon_metrics(cluster, "node-2");
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!(
                    "source_principal=\"cluster.local/ns/production/sa/{source_sa}\""
                ))
                && l.contains(&format!("destination_service=\"{PAYMENT_HOST}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn eventually<T>(what: &str, check: impl FnMut() -> anyhow::Result<T>) -> T {
    ambit_test_support::eventually(what, CONFIG_DEADLINE, POLL, check)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Aborts requests carrying `x-teapot: yes` with 418: only the waypoint applies
/// it, so a 418 proves a request went through the waypoint (the echo app never
/// answers 418).
const TEAPOT: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment-teapot, namespace: production}
spec:
  hosts: [payment.production.svc.cluster.local]
  http:
  - match: [{headers: {x-teapot: {exact: "yes"}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: payment.production.svc.cluster.local}}]
  - route: [{destination: {host: payment.production.svc.cluster.local}}]
"#;
const TEAPOT_HEADER: &str = "x-teapot: yes";

#[test]
fn a_labelled_service_is_reached_through_its_waypoint_and_never_around_it() {
    let cluster = mesh_shop_with_waypoint();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let checkout = cluster.pod("production/checkout-0").unwrap().ip;
        let vip = cluster.service("production/payment").unwrap().cluster_ip;
        let vip_url = format!("http://{vip}:80/");
        // Across nodes from checkout (node-1) and from the waypoint (node-1).
        let pod_ip = cluster.pod("production/payment-v1-1").unwrap().ip;
        let pod_url = format!("http://{pod_ip}:8080/");

        cluster.apply_yaml(TEAPOT).unwrap();
        // Without the label: direct, the waypoint's routes do not apply.
        let (status, _) =
            call_with_header(&cluster, "production/checkout-0", &vip_url, TEAPOT_HEADER).unwrap();
        assert_eq!(status, 200);
        call(&cluster, "production/checkout-0", &pod_url).unwrap();

        let direct_opened = eventually("destination metrics of the direct calls", || {
            let n = destination_opened(&cluster, "checkout");
            ensure!(n >= 2, "{n} connections from checkout");
            Ok(n)
        });

        cluster
            .label_service("production/payment", USE_WAYPOINT, Some("waypoint"))
            .unwrap();
        eventually("the waypoint's fault abort on VIP calls", || {
            let (status, body) =
                call_with_header(&cluster, "production/checkout-0", &vip_url, TEAPOT_HEADER)?;
            ensure!(status == 418, "HTTP {status}: {body}");
            Ok(())
        });
        // Other requests pass the waypoint to the app, which still sees checkout
        // (the destination daemon trusts its waypoint's `Forwarded`).
        let ok_before = waypoint_requests_from_checkout(&cluster, 200);
        let answer = call(&cluster, "production/checkout-0", &vip_url).unwrap();
        assert!(answer.to_string().contains("payment"), "{answer}");
        assert_eq!(peer_ip(&answer), checkout, "{answer}");
        // The waypoint's own telemetry has both, with checkout's identity (recorded
        // as the response ends: polled).
        eventually("the waypoint's request metrics", || {
            let (aborted, ok) = (
                waypoint_requests_from_checkout(&cluster, 418),
                waypoint_requests_from_checkout(&cluster, 200),
            );
            ensure!(
                aborted >= 1 && ok > ok_before,
                "418: {aborted}, 200: {ok_before} → {ok}"
            );
            Ok(())
        });

        // Bypass: the pods behind the waypoint refuse checkout on the Service's
        // target ports, by pod IP on either node.
        eventually("direct calls to payment pods refused", || {
            for pod in ["production/payment-v1-0", "production/payment-v1-1"] {
                let ip = cluster.pod(pod).unwrap().ip;
                let url = format!("http://{ip}:8080/");
                if let Ok(answer) = call(&cluster, "production/checkout-0", &url) {
                    bail!("{url} answered around the waypoint: {answer}");
                }
            }
            Ok(())
        });
        // … and plaintext from outside the mesh too.
        assert!(call(&cluster, "legacy/legacy-client-0", &pod_url).is_err());
        // Traffic through the waypoint keeps working meanwhile.
        for _ in 0..4 {
            call(&cluster, "production/checkout-0", &vip_url).unwrap();
        }

        // The destination daemons count the waypoint's tunnels under the original
        // client it vouches for, with the Service: never under the waypoint.
        eventually("destination metrics of the waypoint's tunnels", || {
            let from_checkout = destination_opened(&cluster, "checkout");
            ensure!(
                from_checkout > direct_opened,
                "opened from checkout: {direct_opened} → {from_checkout}"
            );
            Ok(())
        });
        assert_eq!(destination_opened(&cluster, "waypoint"), 0);
        // The source daemon reports the waypoint as the peer reached.
        let metrics = daemon_metrics(&cluster, "node-1");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                    && l.contains("reporter=\"source\"")
                    && l.contains(
                        "destination_principal=\"cluster.local/ns/production/sa/waypoint\""
                    )
                    && l.contains(&format!("destination_service=\"{PAYMENT_HOST}\""))),
            "{metrics}"
        );

        // A waypoint that does not exist: refused (fail closed), never sent direct.
        cluster
            .label_service("production/payment", USE_WAYPOINT, Some("missing"))
            .unwrap();
        eventually("VIP calls refused for a missing waypoint", || {
            match call(&cluster, "production/checkout-0", &vip_url) {
                Ok(answer) => bail!("answered without its waypoint: {answer}"),
                Err(_) => Ok(()),
            }
        });
        assert!(call(&cluster, "production/checkout-0", &pod_url).is_err());

        // Removing the label restores direct traffic, and the waypoint is left out.
        cluster
            .label_service("production/payment", USE_WAYPOINT, None)
            .unwrap();
        eventually("direct calls to payment pods accepted again", || {
            call(&cluster, "production/checkout-0", &pod_url).map(drop)
        });
        for _ in 0..3 {
            let (status, body) =
                call_with_header(&cluster, "production/checkout-0", &vip_url, TEAPOT_HEADER)
                    .unwrap();
            assert_eq!(status, 200, "{body}");
        }

        for d in cluster.status().mesh.unwrap().daemons {
            let log = std::fs::read_to_string(&d.log).unwrap();
            let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
            assert!(errors.is_empty(), "{}: {}", d.node, errors.join("\n"));
        }
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}
