//! Enrolment end to end on the simulated cluster: the real `ambit-cni` binary talks to
//! the enrolment server, whose enroller (standing in for the daemon's app) decides
//! membership from the namespace labels and enrols with the real [`Capture`], in the
//! running kernel.
//!
//! Checks that ADD returns only once capture is ready (a connection right after it is
//! steered to the pod's daemon listener), that an unlabelled pod is left alone, and
//! that CHECK and DEL (twice) do what they say.
//!
//! Needs root (eBPF, netns, mounts) and the workspace binaries (`ambit-cni`,
//! `ambit-echo`); fails, never skips, without them.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use ambit_node::{
    capture::{self, Capture, CaptureConfig, PodCapture, PodHandle, PodListeners},
    enroll::{
        AddOutcome, ContainerId, EnrollConfig, EnrollError, EnrollServer, Enroller, PodEnrollment,
        PodRemoval,
    },
};
use ambit_simcluster::{Cluster, NETNS_DIR, Options, PodInfo, Topology};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

const MESH_LABEL: &str = "ambit.dev/dataplane-mode";

const TOPOLOGY: &str = r#"
nodes: [{ name: node-1 }]
namespaces:
  - name: mesh
    labels: { ambit.dev/dataplane-mode: ambient }
    workloads:
      - { name: a, labels: { app: a }, nodes: [node-1] }
  - name: plain
    workloads:
      - { name: c, labels: { app: c }, nodes: [node-1] }
"#;

const A: &str = "mesh/a-0";
const C: &str = "plain/c-0";
const HTTP: u16 = 8080;

/// The daemon app's part, reduced to what enrolment needs: meshed namespaces (from
/// the topology, as the controller would report them) and capture.
struct CaptureEnroller {
    capture: Arc<Capture>,
    meshed_namespaces: BTreeSet<String>,
    /// Enrolled pods by `namespace/name`: sandbox and handle.
    pods: Mutex<BTreeMap<String, (ContainerId, PodHandle)>>,
    /// The daemon listeners of enrolled pods, for the test to accept on.
    listeners: Mutex<BTreeMap<String, PodListeners>>,
}

impl Enroller for CaptureEnroller {
    async fn add(&self, pod: PodEnrollment) -> Result<AddOutcome, EnrollError> {
        if !self.meshed_namespaces.contains(&pod.pod.namespace) {
            return Ok(AddOutcome::NotMeshed {
                reason: format!("namespace {} is not labelled", pod.pod.namespace),
            });
        }
        let ip = pod.ipv4().ok_or_else(|| EnrollError::NoIpv4 {
            pod: pod.pod.clone(),
        })?;
        let capture = Arc::clone(&self.capture);
        let spec = PodCapture {
            name: pod.pod.to_string(),
            netns: pod.netns.clone(),
            ip,
        };
        let enrolled = tokio::task::spawn_blocking(move || capture.enroll(spec))
            .await
            .map_err(|source| EnrollError::Task {
                pod: pod.pod.clone(),
                source,
            })?
            .map_err(|source| EnrollError::Capture {
                pod: pod.pod.clone(),
                source,
            })?;
        let (handle, listeners) = enrolled.into_parts();
        let key = pod.pod.to_string();
        self.pods
            .lock()
            .unwrap()
            .insert(key.clone(), (pod.container_id, handle));
        self.listeners.lock().unwrap().insert(key, listeners);
        Ok(AddOutcome::Enrolled)
    }

    async fn del(&self, pod: PodRemoval) -> Result<(), EnrollError> {
        let key = pod.pod.to_string();
        let handle = {
            let mut pods = self.pods.lock().unwrap();
            match pods.get(&key) {
                Some((id, _)) if *id == pod.container_id => pods.remove(&key).map(|(_, h)| h),
                _ => None,
            }
        };
        let Some(handle) = handle else {
            return Ok(());
        };
        self.listeners.lock().unwrap().remove(&key);
        let capture = Arc::clone(&self.capture);
        tokio::task::spawn_blocking(move || capture.unenroll(&handle))
            .await
            .map_err(|source| EnrollError::Task {
                pod: pod.pod.clone(),
                source,
            })?
            .map_err(|source| EnrollError::Capture {
                pod: pod.pod.clone(),
                source,
            })
    }

    async fn check(&self, pod: PodEnrollment) -> Result<AddOutcome, EnrollError> {
        if !self.meshed_namespaces.contains(&pod.pod.namespace) {
            return Ok(AddOutcome::NotMeshed {
                reason: format!("namespace {} is not labelled", pod.pod.namespace),
            });
        }
        match self.pods.lock().unwrap().get(&pod.pod.to_string()) {
            Some((id, handle)) if *id == pod.container_id && handle.pod().netns == pod.netns => {
                Ok(AddOutcome::Enrolled)
            }
            _ => Err(EnrollError::NotEnrolled {
                pod: pod.pod,
                detail: String::new(),
            }),
        }
    }
}

#[test]
fn the_plugin_enrols_pods_with_real_capture() {
    assert!(
        is_root(),
        "this test loads eBPF programs, enters network namespaces and mounts bpffs: run it \
         as root"
    );
    let fx = Fixture::up();
    let (a, c) = (fx.cluster.pod(A).unwrap(), fx.cluster.pod(C).unwrap());

    // ADD of the meshed pod: when it returns, capture is in place and the daemon's
    // listeners are registered.
    let prev = fx.cni("ADD", &a, "sandbox-a").ok().clone();
    assert_eq!(prev["ips"][0]["address"], format!("{}/24", a.ip));
    let status = fx.capture.status().unwrap();
    assert_eq!(
        status.pods.keys().copied().collect::<Vec<_>>(),
        [a.ip],
        "{status:#?}"
    );
    let entry = &status.pods[&a.ip];
    assert!(entry.outbound && entry.sk_lookup.is_some() && entry.inbound_listener);

    // …so a connection from C to A's app right away lands on the daemon's inbound
    // listener in A.
    let inbound = fx
        .enroller
        .listeners
        .lock()
        .unwrap()
        .get(A)
        .unwrap()
        .inbound
        .try_clone()
        .unwrap();
    let call = {
        let mut cmd = fx
            .cluster
            .pod_command(C, fx.cluster.binary("ambit-echo").unwrap())
            .unwrap();
        cmd.args([
            "call",
            "--timeout",
            "5s",
            &format!("http://{}:{HTTP}/", a.ip),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        cmd.spawn().unwrap()
    };
    let call = KillOnDrop(call);
    let (local, peer) = fx.rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(inbound).unwrap();
        let (stream, peer) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("nothing reached A's inbound listener within 10 s")
            .unwrap();
        (stream.local_addr().unwrap(), peer)
    });
    assert_eq!(local, SocketAddr::from((a.ip, HTTP)));
    assert_eq!(peer.ip(), std::net::IpAddr::V4(c.ip));
    drop(call);

    // The unlabelled pod: ADD succeeds, nothing is captured.
    let run = fx.cni("ADD", &c, "sandbox-c");
    run.ok();
    assert!(run.stderr.contains("not labelled"), "{}", run.stderr);
    assert_eq!(
        fx.capture
            .status()
            .unwrap()
            .pods
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        [a.ip]
    );

    // CHECK: A is enrolled in that sandbox, C needs nothing.
    fx.cni("CHECK", &a, "sandbox-a").ok();
    fx.cni("CHECK", &c, "sandbox-c").ok();

    // DEL, twice: A is no longer captured; CHECK notices.
    for _ in 0..2 {
        fx.cni("DEL", &a, "sandbox-a").ok();
    }
    assert!(fx.capture.status().unwrap().pods.is_empty());
    assert!(fx.capture.persisted_pods().unwrap().is_empty());
    let run = fx.cni("CHECK", &a, "sandbox-a");
    assert!(!run.success);
    assert_eq!(run.stdout["code"], 100, "{}", run.stdout);
}

/// Everything the test creates, dropped in the reverse order of need: the server
/// (stops accepting), the runtime (its tasks), the enroller (listeners, last capture
/// handle), the capture state (unpinned, unmounted), the cluster, the socket
/// directory.
struct Fixture {
    server: Option<EnrollServer>,
    rt: Runtime,
    enroller: Arc<CaptureEnroller>,
    capture: Arc<Capture>,
    _state: StateDir,
    cluster: Cluster,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn up() -> Self {
        ambit_test_support::bin_path("ambit-cni").expect("ambit-cni is built");
        ambit_test_support::bin_path("ambit-echo").expect("ambit-echo is built");
        let dir = tempfile::Builder::new()
            .prefix("ambit-enroll-capture-")
            .tempdir()
            .unwrap();
        let topology = Topology::from_yaml(TOPOLOGY).unwrap();
        let meshed_namespaces = topology
            .namespaces
            .iter()
            .filter(|ns| ns.labels.get(MESH_LABEL).map(String::as_str) == Some("ambient"))
            .map(|ns| ns.name.clone())
            .collect();
        let cluster = Cluster::up(
            Options::for_test(ambit_test_support::bin_dir().unwrap()),
            &topology,
        )
        .expect("bringing the cluster up");
        let state = StateDir::new();
        let pods_cgroup = cluster.node("node-1").unwrap().pods_cgroup;
        let capture = Arc::new(
            Capture::start(CaptureConfig::new(state.path.clone(), pods_cgroup))
                .expect("starting capture"),
        );
        let enroller = Arc::new(CaptureEnroller {
            capture: Arc::clone(&capture),
            meshed_namespaces,
            pods: Mutex::default(),
            listeners: Mutex::default(),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let socket = dir.path().join("cni.sock");
        let server = rt
            .block_on(EnrollServer::bind(
                EnrollConfig::new(&socket),
                Arc::clone(&enroller),
            ))
            .unwrap();
        Self {
            server: Some(server),
            rt,
            enroller,
            capture,
            _state: state,
            cluster,
            socket,
            _dir: dir,
        }
    }

    /// Runs the plugin for `pod` in sandbox `container`, as a runtime would after the
    /// primary plugin set the pod's network up.
    fn cni(&self, command: &str, pod: &PodInfo, container: &str) -> Run {
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": "sim",
            "type": "ambit-cni",
            "ambit": { "socket": &self.socket, "timeout": "20s" },
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{ "name": "eth0", "sandbox": netns_path(pod) }],
                "ips": [{ "address": format!("{}/24", pod.ip), "gateway": pod.gateway.to_string(), "interface": 0 }],
            },
        });
        let mut child = Command::new(ambit_test_support::bin_path("ambit-cni").unwrap())
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", netns_path(pod))
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                    pod.namespace, pod.name
                ),
            )
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        Run {
            success: out.status.success(),
            stdout: if out.stdout.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&out.stdout).unwrap()
            },
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.rt.block_on(server.shutdown());
        }
    }
}

struct Run {
    success: bool,
    stdout: Value,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Value {
        assert!(self.success, "failed: {}\n{}", self.stdout, self.stderr);
        &self.stdout
    }
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The capture's state directory, uninstalled and removed when dropped, also when the
/// test fails.
struct StateDir {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl StateDir {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ambit-enroll-capture-state-")
            .tempdir()
            .unwrap();
        Self {
            path: dir.path().join("capture"),
            _dir: dir,
        }
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Err(e) = capture::uninstall(&self.path) {
            eprintln!("cleaning up capture state {}: {e}", self.path.display());
        }
    }
}

fn netns_path(pod: &PodInfo) -> PathBuf {
    Path::new(NETNS_DIR).join(&pod.netns)
}

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}
