//! Pods joining and leaving the mesh after they started, on the simulated cluster: the
//! `legacy` namespace gets `ambit.dev/dataplane-mode: ambient` through the cluster's
//! config directory (what the controller's local mode reads), the node daemon enrols
//! `legacy-client` from the record its CNI ADD left (no new ADD), its calls to payment
//! go over HBONE (accepted under STRICT, mutual TLS in the metrics), and taking the
//! label away un-enrols it again. The records survive a daemon restart.
//!
//! Needs root (eBPF, netns, mounts) and the workspace binaries; fails, never skips,
//! without them.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

mod common;

use std::{net::SocketAddr, time::Duration};

use ambit_simcluster::{Cluster, DaemonInfo, Place, Process};
use anyhow::{Context as _, bail, ensure};
use common::mesh_shop;

const LEGACY: &str = "legacy/legacy-client-0";
const MESH_LABEL: &str = "ambit.dev/dataplane-mode";
const LEGACY_PRINCIPAL: &str = "cluster.local/ns/legacy/sa/default";

const STRICT: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: production}
spec:
  mtls: {mode: STRICT}
"#;

/// Polls `check` for up to 15 s; panics with what was awaited and the last failure.
fn eventually<T>(what: &str, check: impl FnMut() -> anyhow::Result<T>) -> T {
    ambit_test_support::eventually(
        what,
        Duration::from_secs(15),
        Duration::from_millis(100),
        check,
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// `ambit-echo call URL` from `from`: the JSON answer, or why the call failed.
fn call(cluster: &Cluster, from: &str, url: &str) -> anyhow::Result<serde_json::Value> {
    let out = cluster.exec(from, &["ambit-echo", "call", "--timeout", "2s", url])?;
    ensure!(
        out.status.success(),
        "call {url} from {from} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn daemon(cluster: &Cluster, node: &str) -> DaemonInfo {
    let mesh = cluster.status().mesh.unwrap();
    mesh.daemons.into_iter().find(|d| d.node == node).unwrap()
}

/// `GET path` on a daemon's admin (or metrics) server, from its node.
fn daemon_get(cluster: &Cluster, node: &str, metrics: bool, path: &str) -> anyhow::Result<String> {
    let d = daemon(cluster, node);
    let addr = SocketAddr::V4(if metrics {
        d.metrics_addr
    } else {
        d.admin_addr
    });
    let (code, body) = cluster.http_get(&Place::Node(node.to_owned()), addr, path)?;
    ensure!(code == 200, "{path} on {node}: {code} {body}");
    Ok(body)
}

fn config_dump(cluster: &Cluster, node: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&daemon_get(
        cluster,
        node,
        false,
        "/config_dump",
    )?)?)
}

/// The daemon's enrolled pod `name` in `/config_dump`, if enrolled.
fn enrolled(dump: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    dump["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
}

/// The node pod record `name` in `/config_dump` (every pod ADDed on the node).
fn node_pod(dump: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    dump["nodePods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
}

fn peer_ip(answer: &serde_json::Value) -> std::net::Ipv4Addr {
    let peer = answer["peer"].as_str().unwrap();
    peer.rsplit_once(':').unwrap().0.parse().unwrap()
}

/// Waits until legacy-client is enrolled and proxying on node-1, and its call to
/// `url` is accepted (under STRICT: carried over HBONE); the answer.
fn legacy_joins(cluster: &Cluster, url: &str) -> serde_json::Value {
    eventually("legacy-client enrolled with its identity", || {
        let dump = config_dump(cluster, "node-1")?;
        let pod = enrolled(&dump, LEGACY).context("not enrolled")?;
        ensure!(pod["proxying"] == true, "not proxying yet: {pod}");
        ensure!(
            pod["identity"] == format!("spiffe://{LEGACY_PRINCIPAL}"),
            "{pod}"
        );
        Ok(())
    });
    eventually("legacy-client's call accepted over HBONE", || {
        call(cluster, LEGACY, url)
    })
}

/// Node-2's metrics show a mutual-TLS connection from legacy-client's identity.
fn legacy_seen_over_mtls(cluster: &Cluster) {
    eventually("payment's daemon reporting legacy-client over mTLS", || {
        let metrics = daemon_get(cluster, "node-2", true, "/metrics")?;
        let seen = metrics.lines().any(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains(&format!("source_principal=\"{LEGACY_PRINCIPAL}\""))
                && l.contains("connection_security_policy=\"mutual_tls\"")
        });
        ensure!(seen, "no such line in:\n{metrics}");
        Ok(())
    });
}

#[test]
fn a_namespace_labelled_into_the_mesh_later_is_enrolled_and_unenrolled_when_unlabelled() {
    let cluster = mesh_shop();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let payment = cluster.pod("production/payment-v1-1").unwrap().ip;
        let legacy = cluster.pod(LEGACY).unwrap().ip;
        let url = format!("http://{payment}:8080/");

        // Outside the mesh: known to its node's daemon from its ADD, not enrolled.
        let dump = config_dump(&cluster, "node-1").unwrap();
        assert!(enrolled(&dump, LEGACY).is_none(), "{dump:#}");
        let record = node_pod(&dump, LEGACY).unwrap_or_else(|| panic!("{dump:#}"));
        assert_eq!(record["enrolled"], false, "{record}");
        assert_eq!(record["ip"], legacy.to_string(), "{record}");
        call(&cluster, LEGACY, &url).unwrap();

        // STRICT on production refuses the plaintext caller.
        cluster.apply_yaml(STRICT).unwrap();
        eventually("legacy-client refused under STRICT", || {
            match call(&cluster, LEGACY, &url) {
                Ok(answer) => bail!("still accepted: {answer}"),
                Err(_) => Ok(()),
            }
        });

        // The namespace joins the mesh: no new ADD, the daemon enrols the pod.
        cluster
            .label_namespace("legacy", MESH_LABEL, Some("ambient"))
            .unwrap();
        let answer = legacy_joins(&cluster, &url);
        assert!(answer.to_string().contains("payment"), "{answer}");
        // The app still sees the caller's own address.
        assert_eq!(peer_ip(&answer), legacy, "{answer}");
        legacy_seen_over_mtls(&cluster);

        // The label goes: un-enrolled, plaintext again, refused under STRICT.
        cluster.label_namespace("legacy", MESH_LABEL, None).unwrap();
        eventually("legacy-client un-enrolled", || {
            let dump = config_dump(&cluster, "node-1")?;
            ensure!(enrolled(&dump, LEGACY).is_none(), "still enrolled");
            let capture = &dump["capture"]["Ok"]["pods"];
            ensure!(
                capture.get(legacy.to_string()).is_none(),
                "still captured: {capture}"
            );
            let record = node_pod(&dump, LEGACY).context("record gone")?;
            ensure!(record["enrolled"] == false, "{record}");
            Ok(())
        });
        eventually("legacy-client refused again under STRICT", || {
            match call(&cluster, LEGACY, &url) {
                Ok(answer) => bail!("still accepted: {answer}"),
                Err(_) => Ok(()),
            }
        });
        cluster.delete_yaml(STRICT).unwrap();
        let answer = eventually("legacy-client's plaintext call accepted", || {
            call(&cluster, LEGACY, &url)
        });
        assert_eq!(peer_ip(&answer), legacy, "{answer}");

        // And it can join again.
        cluster
            .label_namespace("legacy", MESH_LABEL, Some("ambient"))
            .unwrap();
        legacy_joins(&cluster, &url);
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

#[test]
fn a_restarted_daemon_enrols_a_pod_that_was_added_before_it_started() {
    let cluster = mesh_shop();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let payment = cluster.pod("production/payment-v1-1").unwrap().ip;
        let url = format!("http://{payment}:8080/");
        let old = daemon(&cluster, "node-1");
        let place = Place::Node("node-1".to_owned());
        let ready = SocketAddr::V4(old.readiness_addr);

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(old.pid).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        eventually("the daemon is gone", || {
            match cluster.http_get(&place, ready, "/healthz/ready") {
                Ok(answer) => bail!("still answering: {answer:?}"),
                Err(_) => Ok(()),
            }
        });
        let _restarted = start_daemon(&cluster, &old, "ambit-node-restarted");
        eventually("the restarted daemon is ready", || {
            let (code, body) = cluster.http_get(&place, ready, "/healthz/ready")?;
            ensure!(code == 200, "{code} {body}");
            Ok(())
        });
        let dump = config_dump(&cluster, "node-1").unwrap();
        assert!(node_pod(&dump, LEGACY).is_some(), "{dump:#}");

        cluster.apply_yaml(STRICT).unwrap();
        cluster
            .label_namespace("legacy", MESH_LABEL, Some("ambient"))
            .unwrap();
        legacy_joins(&cluster, &url);
        legacy_seen_over_mtls(&cluster);
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

/// Starts `ambit-node` on `daemon`'s node with the flags the cluster used.
fn start_daemon(cluster: &Cluster, daemon: &DaemonInfo, name: &str) -> Process {
    let mesh = cluster.status().mesh.unwrap();
    let node = cluster.node(&daemon.node).unwrap();
    let mut cmd = std::process::Command::new(ambit_test_support::bin_path("ambit-node").unwrap());
    cmd.arg("--node-name")
        .arg(&daemon.node)
        .arg("--controller-addr")
        .arg(format!("http://{}", mesh.controller.grpc_addr))
        .arg("--token-file")
        .arg(&daemon.token_file)
        .arg("--state-dir")
        .arg(&daemon.state_dir)
        .arg("--pods-cgroup")
        .arg(&node.pods_cgroup)
        .arg("--cni-socket")
        .arg(&daemon.cni_socket)
        .arg("--readiness-addr")
        .arg(format!("0.0.0.0:{}", daemon.readiness_addr.port()))
        .arg("--admin-addr")
        .arg(daemon.admin_addr.to_string())
        .arg("--metrics-addr")
        .arg(format!("0.0.0.0:{}", daemon.metrics_addr.port()));
    cluster.spawn_in_node(&daemon.node, name, cmd).unwrap()
}
