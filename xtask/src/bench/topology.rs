//! The benchmark's topology: two nodes, a client pod on node-1 and a server pod on
//! node-2 (so every measured byte crosses the underlay, and in ambient mode the tunnel
//! between the two nodes' daemons), plus idle pods for the memory-against-pods runs.

use ambit_simcluster::Topology;
use anyhow::Context as _;

/// The benchmark's namespace.
pub const NAMESPACE: &str = "bench";
/// Service accounts of the client and the server (their SPIFFE identities).
pub const CLIENT_SA: &str = "bench-client";
pub const SERVER_SA: &str = "bench-server";
/// Nodes of the client and of the server.
pub const CLIENT_NODE: &str = "node-1";
pub const SERVER_NODE: &str = "node-2";
/// The waypoint of the L7 modes (a Gateway; in ambient L7 its pod `waypoint-0` on the
/// server's node, in sidecar L7 its engine inside the server pod), and the label that
/// sends the server Service's traffic through it.
pub const WAYPOINT: &str = "waypoint";
pub const USE_WAYPOINT_LABEL: &str = "ambit.dev/use-waypoint";
/// The server Service's host name (the waypoint's `destination_service`).
pub const SERVER_SERVICE_HOST: &str = "server.bench.svc.cluster.local";
/// Ports of `ambit-echo serve`.
pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 9090;
pub const DISCARD_PORT: u16 = 9091;

/// `bench/client-0`.
pub fn client_pod() -> String {
    format!("{NAMESPACE}/client-0")
}

/// `bench/server-0`.
pub fn server_pod() -> String {
    format!("{NAMESPACE}/server-0")
}

/// Where the L7 modes run the waypoint that the server Service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waypoint {
    /// No waypoint (the L4 modes and the baseline).
    None,
    /// Ambient L7: a waypoint pod on the server's node.
    OwnPod,
    /// Sidecar L7: no pod of its own; its Service selects the server pods, where the
    /// engine listens on [`L7_ENGINE_PORT`] beside the sidecar.
    InServerPods,
}

/// The HBONE port of the waypoint's engine inside a server pod (sidecar L7).
pub const L7_ENGINE_PORT: u16 = 15088;

/// The topology with `pods` workload pods in all (at least the client and the server;
/// the rest are idle echo servers spread over both nodes), plus `waypoint`.
pub fn with_pods(pods: usize, waypoint: Waypoint) -> anyhow::Result<Topology> {
    let idle = pods.saturating_sub(2);
    let idle_workload = if idle == 0 {
        String::new()
    } else {
        let nodes: Vec<&str> = (0..idle)
            .map(|i| if i % 2 == 0 { CLIENT_NODE } else { SERVER_NODE })
            .collect();
        format!(
            "      - name: idle\n        labels: {{ app: idle }}\n        nodes: [{}]\n        readyPorts: [{HTTP_PORT}, {ECHO_PORT}, {DISCARD_PORT}]\n",
            nodes.join(", ")
        )
    };
    let labels = format!("        labels: {{ {USE_WAYPOINT_LABEL}: {WAYPOINT} }}\n");
    let (waypoints, service_labels, waypoint_service) = match waypoint {
        Waypoint::None => (String::new(), String::new(), String::new()),
        Waypoint::OwnPod => (
            format!("    waypoints:\n      - name: {WAYPOINT}\n        nodes: [{SERVER_NODE}]\n"),
            labels,
            String::new(),
        ),
        Waypoint::InServerPods => (
            format!("    waypoints:\n      - name: {WAYPOINT}\n        nodes: []\n"),
            labels,
            format!(
                "      - name: {WAYPOINT}\n        selector: {{ app: server }}\n        ports:\n          - {{ name: mesh, port: 15008, targetPort: {L7_ENGINE_PORT} }}\n"
            ),
        ),
    };
    let yaml = format!(
        "\
nodes:
  - name: {CLIENT_NODE}
  - name: {SERVER_NODE}
namespaces:
  - name: {NAMESPACE}
    labels:
      ambit.dev/dataplane-mode: ambient
    workloads:
      - name: client
        serviceAccount: {CLIENT_SA}
        labels: {{ app: client }}
        nodes: [{CLIENT_NODE}]
        readyPorts: [{HTTP_PORT}, {ECHO_PORT}, {DISCARD_PORT}]
      - name: server
        serviceAccount: {SERVER_SA}
        labels: {{ app: server }}
        nodes: [{SERVER_NODE}]
        readyPorts: [{HTTP_PORT}, {ECHO_PORT}, {DISCARD_PORT}]
{idle_workload}{waypoints}    services:
      - name: server
        selector: {{ app: server }}
{service_labels}        ports:
          - {{ name: http, port: 80, targetPort: {HTTP_PORT} }}
          - {{ name: tcp-echo, port: {ECHO_PORT} }}
          - {{ name: tcp-discard, port: {DISCARD_PORT} }}
{waypoint_service}"
    );
    Topology::from_yaml(&yaml).with_context(|| format!("the benchmark topology:\n{yaml}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topologies_have_the_asked_pod_count_across_both_nodes() {
        for pods in [2, 3, 4, 64] {
            let t = with_pods(pods, Waypoint::None).unwrap().resolve().unwrap();
            assert_eq!(t.pods.len(), pods);
            let on = |node: &str| t.pods.iter().filter(|p| p.node == node).count();
            assert!(on(CLIENT_NODE) >= 1 && on(SERVER_NODE) >= 1);
            assert!(on(CLIENT_NODE).abs_diff(on(SERVER_NODE)) <= 1, "{pods}");
            let client = t.pods.iter().find(|p| p.name == "client-0").unwrap();
            let server = t.pods.iter().find(|p| p.name == "server-0").unwrap();
            assert_eq!(
                (client.node.as_str(), server.node.as_str()),
                (CLIENT_NODE, SERVER_NODE)
            );
        }
    }

    #[test]
    fn the_waypoint_topology_adds_only_the_waypoint() {
        let plain = with_pods(4, Waypoint::None).unwrap();
        let l7 = with_pods(4, Waypoint::OwnPod).unwrap();
        assert_eq!(plain.resolve().unwrap().pods.len(), 4);
        let ns = &l7.namespaces[0];
        assert_eq!(ns.waypoints.len(), 1);
        assert_eq!(ns.waypoints[0].nodes, vec![SERVER_NODE.to_owned()]);
        assert_eq!(ns.services[0].labels[USE_WAYPOINT_LABEL], WAYPOINT);
        assert_eq!(ns.workloads, plain.namespaces[0].workloads);
    }

    #[test]
    fn the_sidecar_l7_topology_puts_the_waypoint_in_the_server_pods() {
        let plain = with_pods(4, Waypoint::None).unwrap();
        let l7 = with_pods(4, Waypoint::InServerPods).unwrap();
        let resolved = l7.resolve().unwrap();
        assert_eq!(resolved.pods.len(), 4, "no waypoint pod");
        let ns = &l7.namespaces[0];
        assert!(ns.waypoints[0].nodes.is_empty());
        assert_eq!(ns.services[0].labels[USE_WAYPOINT_LABEL], WAYPOINT);
        let svc = &ns.services[1];
        assert_eq!(svc.name, WAYPOINT);
        assert_eq!(svc.selector["app"], "server");
        assert_eq!(ns.workloads, plain.namespaces[0].workloads);
    }
}
