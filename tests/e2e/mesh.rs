//! The mesh data plane on the simulated cluster: `up` with the mesh and its daemons
//! starts one `ambit-node` per node in the node's namespace, every daemon becomes
//! ready, every pod is handed to the real `ambit-cni` plugin (CNI ADD) before its
//! workload starts, and `down` calls CNI DEL and leaves nothing behind.

use std::net::SocketAddr;

use ambit_simcluster::{Cluster, MeshOptions, Options, Place, Topology};
use nothing_left::{assert_nothing_left, host_network};

mod nothing_left;

#[test]
fn up_with_daemons_enrols_every_pod_and_down_leaves_nothing() {
    for bin in ["ambit-echo", "ambit-controller", "ambit-node", "ambit-cni"] {
        ambit_test_support::bin_path(bin).expect("workspace binaries are built");
    }
    let host_before = host_network();
    let opts =
        Options::for_test(ambit_test_support::bin_dir().unwrap()).mesh(MeshOptions::with_daemons());
    let name = opts.name.clone();
    let cluster = Cluster::up(opts, &Topology::default_shop()).unwrap();
    let status = cluster.status();
    let mesh = status
        .mesh
        .clone()
        .expect("the state file records the mesh");

    // One ready daemon per node, in the node's namespace and system cgroup.
    assert_eq!(mesh.daemons.len(), status.nodes.len(), "{mesh:#?}");
    for (daemon, node) in mesh.daemons.iter().zip(&status.nodes) {
        assert_eq!(daemon.node, node.name);
        let process = status
            .processes
            .iter()
            .find(|p| p.pid == daemon.pid)
            .expect("the daemon is a recorded process");
        assert!(process.running, "{process:?}");
        assert_eq!(process.place, Place::Node(node.name.clone()));
        assert!(
            process.cgroup.starts_with(&node.system_cgroup),
            "{process:?}"
        );
        let (code, body) = cluster
            .http_get(
                &Place::Node(node.name.clone()),
                SocketAddr::V4(daemon.readiness_addr),
                "/healthz/ready",
            )
            .unwrap();
        assert_eq!(code, 200, "{}: {body}", node.name);
        assert!(
            daemon.cni_socket.exists(),
            "{}",
            daemon.cni_socket.display()
        );
    }

    // Every pod went through CNI ADD, pointed at its own node's daemon.
    for pod in &status.pods {
        let cni = pod
            .cni
            .as_ref()
            .unwrap_or_else(|| panic!("pod {} has no CNI record", pod.pod_ref()));
        assert!(
            cni.added,
            "CNI ADD of {} did not succeed: {cni:?}",
            pod.pod_ref()
        );
        let daemon = mesh.daemons.iter().find(|d| d.node == pod.node).unwrap();
        assert_eq!(cni.socket, daemon.cni_socket, "{}", pod.pod_ref());
        assert!(pod.running, "{}", pod.pod_ref());
    }

    cluster.down().unwrap();
    assert_nothing_left(&name, &status, &host_before);
    // The daemons' bpffs mounts (under their state directories) went too.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let state_dir = status.state_dir.display().to_string();
    assert!(!mounts.contains(&state_dir), "mounts left:\n{mounts}");
}

#[test]
fn a_daemon_that_dies_fails_up_with_its_log_and_leaves_nothing() {
    for bin in ["ambit-echo", "ambit-controller", "ambit-node", "ambit-cni"] {
        ambit_test_support::bin_path(bin).expect("workspace binaries are built");
    }
    let mesh = MeshOptions {
        daemon_args: vec!["--no-such-flag".to_owned()],
        ..MeshOptions::with_daemons()
    };
    let opts = Options::for_test(ambit_test_support::bin_dir().unwrap()).mesh(mesh);
    let name = opts.name.clone();
    let state_dir = opts.state_dir();
    let err = Cluster::up(opts, &Topology::default_shop()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ambit_simcluster::Error::Exited { .. }),
        "{text}"
    );
    assert!(text.contains("ambit-node in node node-"), "{text}");
    assert!(
        text.contains("--no-such-flag"),
        "the log tail is shown: {text}"
    );
    // `up` removed what it made.
    assert!(!state_dir.exists(), "{}", state_dir.display());
    let leftovers = ambit_simcluster::list_clusters(state_dir.parent().unwrap()).unwrap();
    assert!(!leftovers.contains(&name), "{leftovers:?}");
}
