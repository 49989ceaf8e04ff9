//! In-pod eBPF capture in the running kernel, on the simulated cluster: one node, two
//! enrolled pods (`mesh/a-0`, `mesh/b-0`) and one that is not (`plain/c-0`), all
//! running `ambit-echo`. The test process plays the daemon: it enrols the pods, accepts
//! on the in-pod listeners and proxies what it accepts.
//!
//! The phases build on each other (capture → fail closed → restart → unenrol), so they
//! run as one test on one cluster.
//!
//! Needs root (eBPF, netns, mounts) and the workspace binaries (`ambit-echo`); fails,
//! never skips, without them.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ambit_node::{
    capture::{
        self, Capture, CaptureConfig, CaptureStatus, EnrolledPod, HBONE_PORT, INBOUND_PORT,
        Ipv4Prefix, OUTBOUND_PORT, PodCapture, PodHandle,
    },
    netns,
};
use ambit_simcluster::{Cluster, NETNS_DIR, Options, PodInfo, Topology};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
    runtime::Runtime,
    task::{JoinHandle, JoinSet},
};

/// Environment variable that turns [`helper_tcp_echo_round_trip`] into a client.
const HELPER_ENV: &str = "AMBIT_CAPTURE_TEST_HELPER";
/// Prefix of the helper's report line on stdout.
const HELPER_REPORT: &str = "HELPER-PEER ";

const TOPOLOGY: &str = r#"
nodes: [{ name: node-1 }]
namespaces:
  - name: mesh
    workloads:
      - { name: a, labels: { app: a }, nodes: [node-1] }
      - { name: b, labels: { app: b }, nodes: [node-1] }
  - name: plain
    workloads:
      - { name: c, labels: { app: c }, nodes: [node-1] }
"#;

const A: &str = "mesh/a-0";
const B: &str = "mesh/b-0";
const C: &str = "plain/c-0";
const HTTP: u16 = 8080;
const ECHO: u16 = 9090;

/// What the fake daemon saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    /// Accepted on a pod's outbound listener, with the original destination read.
    Outbound {
        pod: Ipv4Addr,
        orig_dst: Result<SocketAddrV4, String>,
    },
    /// Accepted on a pod's inbound (15006) listener.
    Inbound {
        pod: Ipv4Addr,
        local: SocketAddr,
        peer: SocketAddr,
    },
    /// Accepted on a pod's HBONE (15008) listener.
    Hbone {
        pod: Ipv4Addr,
        local: SocketAddr,
        peer: SocketAddr,
    },
}

type Events = Arc<Mutex<Vec<Event>>>;

#[test]
fn capture_redirects_steers_fails_closed_and_resumes() {
    assert!(
        is_root(),
        "this test loads eBPF programs, enters network namespaces and mounts bpffs: run it \
         as root"
    );
    let fx = Fixture::up();
    let (a, b, c) = (fx.pod(A), fx.pod(B), fx.pod(C));
    let config = CaptureConfig {
        exclusions: capture::Exclusions {
            // Connects to C pass untouched: exclusions hold.
            outbound_cidrs: BTreeSet::from([Ipv4Prefix::new(c.ip, 32).unwrap()]),
            // Inbound to the echo port passes untouched.
            inbound_ports: BTreeSet::from([ECHO]),
            ..Default::default()
        },
        ..CaptureConfig::new(fx.state.path.clone(), fx.node_pods_cgroup())
    };

    // ---- Start and enrol A and B.
    let capture = Arc::new(Capture::start(config.clone()).expect("starting capture"));
    assert!(
        capture.mounted_bpffs(),
        "bpffs is mounted by the first start"
    );
    let pods_a = capture.enroll(pod_capture(&a)).expect("enrolling A");
    let pods_b = capture.enroll(pod_capture(&b)).expect("enrolling B");
    assert!(!pods_a.handle().resumed() && !pods_b.handle().resumed());
    assert_listeners_marked(&pods_a, &config);
    // Source-IP-preserving delivery sockets (used later): bound to a foreign address
    // in the pod's netns, with the delivery mark.
    let delivery = pods_b
        .handle()
        .delivery_socket(SocketAddrV4::new(c.ip, 0))
        .expect("a transparent socket bound to C's address in B");
    assert_eq!(
        netns::socket_mark(&delivery).unwrap(),
        config.delivery_mark.get()
    );
    assert_eq!(
        netns::netns_cookie(&delivery).unwrap(),
        pods_b.handle().netns_cookie()
    );
    drop(delivery);
    let handle_a = pods_a.handle().clone();
    let handle_b = pods_b.handle().clone();
    let status = capture.status().unwrap();
    assert_enrolled(&status, &[a.ip, b.ip], true);
    let events: Events = Arc::default();
    let daemon = FakeDaemon::serve(&fx.rt, &capture, [pods_a, pods_b], &events);

    // ---- (a) Outbound.
    // A → B:8080: captured in A (original destination B:8080), proxied by the fake
    // daemon from A's netns to B, captured again by B's sk_lookup (local address
    // B:8080, peer A) and delivered to B's app.
    let mark = events_mark(&events);
    let answer = fx.call(A, &format!("http://{}:{HTTP}/", b.ip));
    assert_eq!(answer["pod"], "b-0", "{answer}");
    assert_eq!(
        new_events(&events, mark),
        vec![
            Event::Outbound {
                pod: a.ip,
                orig_dst: Ok(SocketAddrV4::new(b.ip, HTTP)),
            },
            Event::Inbound {
                pod: b.ip,
                local: SocketAddr::from((b.ip, HTTP)),
                peer: SocketAddr::from((a.ip, peer_port(&events, mark + 1))),
            },
        ]
    );

    // A → B:9090 over TCP echo: captured outbound; inbound port 9090 is excluded, so B's
    // app gets it directly. Every byte made the round trip.
    let mark = events_mark(&events);
    let summary = fx.tcp_load(A, SocketAddrV4::new(b.ip, ECHO), 20);
    assert_eq!(summary["ok"], 20, "{summary}");
    let seen = new_events(&events, mark);
    assert!(!seen.is_empty(), "the TCP load was not captured");
    for event in seen {
        assert_eq!(
            event,
            Event::Outbound {
                pod: a.ip,
                orig_dst: Ok(SocketAddrV4::new(b.ip, ECHO)),
            }
        );
    }

    // Not captured: loopback, the pod's own IP, an excluded prefix (C). B's app or C's
    // app answers, the fake daemon sees nothing.
    let mark = events_mark(&events);
    let answer = fx.call(A, &format!("http://127.0.0.1:{HTTP}/"));
    assert_eq!(answer["pod"], "a-0");
    let answer = fx.call(A, &format!("http://{}:{HTTP}/", a.ip));
    assert_eq!(answer["pod"], "a-0");
    assert_eq!(peer_ip(&answer), a.ip);
    let answer = fx.call(A, &format!("http://{}:{HTTP}/", c.ip));
    assert_eq!(answer["pod"], "c-0");
    assert_eq!(
        peer_ip(&answer),
        a.ip,
        "A's connect to C went straight to C"
    );
    assert_eq!(new_events(&events, mark), vec![]);

    // The daemon's mark: the same client in A's cgroup, once without and once with the
    // mark. Unmarked it is redirected (its peer is the outbound listener); marked it
    // reaches B:9090 itself.
    let b_echo = SocketAddrV4::new(b.ip, ECHO);
    let mark = events_mark(&events);
    let peer = fx.helper_round_trip(A, b_echo.into(), None);
    assert_eq!(peer, SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)));
    assert_eq!(
        new_events(&events, mark),
        vec![Event::Outbound {
            pod: a.ip,
            orig_dst: Ok(b_echo),
        }]
    );
    let mark = events_mark(&events);
    let peer = fx.helper_round_trip(A, b_echo.into(), Some(config.bypass_mark.get()));
    assert_eq!(peer, SocketAddr::V4(b_echo));
    assert_eq!(
        new_events(&events, mark),
        vec![],
        "a marked socket was captured"
    );

    // connect6: a dual-stack client connecting to B as an IPv4-mapped address is
    // captured the same way.
    let mark = events_mark(&events);
    let mapped = SocketAddr::new(b.ip.to_ipv6_mapped().into(), ECHO);
    let peer = fx.helper_round_trip(A, mapped, None);
    assert_eq!(
        peer,
        SocketAddr::new(Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(), OUTBOUND_PORT)
    );
    assert_eq!(
        new_events(&events, mark),
        vec![Event::Outbound {
            pod: a.ip,
            orig_dst: Ok(b_echo),
        }]
    );

    // The daemon's own socket in A's netns (marked, and not in the pods' cgroup) reaches
    // A's outbound listener directly: nothing was recorded for it.
    let mark = events_mark(&events);
    fx.rt.block_on(async {
        let socket = handle_a.connect_socket().unwrap().into_tokio();
        let mut stream = socket
            .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))
            .await
            .unwrap();
        // The fake daemon closes it once it has found no original destination.
        let mut buf = [0; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await;
    });
    match new_events(&events, mark).as_slice() {
        [
            Event::Outbound {
                pod,
                orig_dst: Err(e),
            },
        ] if *pod == a.ip => {
            assert!(e.contains("no original destination"), "{e}");
        }
        other => panic!("expected one outbound accept without destination, got {other:?}"),
    }

    // ---- (b) Inbound: C (not enrolled, so its connect is not redirected) → B:8080
    // lands on B's 15006 listener with B:8080 as local address and C as peer; → B:15008
    // lands on the HBONE listener.
    let mark = events_mark(&events);
    let answer = fx.call(C, &format!("http://{}:{HTTP}/", b.ip));
    assert_eq!(answer["pod"], "b-0");
    let port = peer_port(&events, mark);
    assert_eq!(
        new_events(&events, mark),
        vec![Event::Inbound {
            pod: b.ip,
            local: SocketAddr::from((b.ip, HTTP)),
            peer: SocketAddr::from((c.ip, port)),
        }]
    );
    let mark = events_mark(&events);
    let summary = fx.tcp_load(C, SocketAddrV4::new(b.ip, HBONE_PORT), 3);
    assert_eq!(summary["ok"], 3, "{summary}");
    match new_events(&events, mark).as_slice() {
        [Event::Hbone { pod, local, peer }, ..] => {
            assert_eq!((*pod, *local), (b.ip, SocketAddr::from((b.ip, HBONE_PORT))));
            assert_eq!(peer.ip(), c.ip);
        }
        other => panic!("expected an HBONE accept, got {other:?}"),
    }

    // ---- (c) Fail closed: the daemon is gone (listeners closed), links and maps stay.
    daemon.stop(&fx.rt);
    let status = capture.status().unwrap();
    assert_enrolled(&status, &[a.ip, b.ip], false);
    let mark = events_mark(&events);
    let started = Instant::now();
    let summary = fx.tcp_load(A, SocketAddrV4::new(b.ip, ECHO), 1);
    assert_refused(&summary);
    let failed = fx.call_fails(C, &format!("http://{}:{HTTP}/", b.ip));
    assert!(failed.contains("refused"), "C → B:8080: {failed}");
    let failed = fx.call_fails(A, &format!("http://{}:{HTTP}/", b.ip));
    assert!(failed.contains("refused"), "A → B:8080: {failed}");
    assert_refused(&fx.tcp_load(C, SocketAddrV4::new(b.ip, HBONE_PORT), 1));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refusals took {:?}: something timed out instead",
        started.elapsed()
    );
    // Exclusions and loopback still pass.
    assert_eq!(
        fx.call(A, &format!("http://{}:{HTTP}/", c.ip))["pod"],
        "c-0"
    );
    assert_eq!(
        fx.call(A, &format!("http://127.0.0.1:{HTTP}/"))["pod"],
        "a-0"
    );
    assert_eq!(new_events(&events, mark), vec![]);

    // ---- (d) Restart: a new instance adopts the pins; the pods are resumed from the
    // records, keeping their links.
    let capture = Arc::into_inner(capture).expect("the fake daemon let go of the capture");
    drop(capture);
    let capture = Arc::new(Capture::start(config.clone()).expect("restarting capture"));
    assert!(
        !capture.mounted_bpffs(),
        "the restart adopts the mounted bpffs"
    );
    let persisted = capture.persisted_pods().unwrap();
    assert_eq!(persisted, vec![pod_capture(&a), pod_capture(&b)]);
    let resumed: Vec<EnrolledPod> = persisted
        .into_iter()
        .map(|pod| capture.enroll(pod).expect("resuming a pod"))
        .collect();
    assert!(resumed.iter().all(|p| p.handle().resumed()));
    let restarted = capture.status().unwrap();
    assert_eq!(
        restarted.cgroup_links, status.cgroup_links,
        "cgroup links kept"
    );
    for ip in [a.ip, b.ip] {
        assert_eq!(
            restarted.pods[&ip].sk_lookup, status.pods[&ip].sk_lookup,
            "sk_lookup link of {ip} kept"
        );
    }
    assert_enrolled(&restarted, &[a.ip, b.ip], true);
    let daemon = FakeDaemon::serve(&fx.rt, &capture, resumed, &events);
    let mark = events_mark(&events);
    assert_eq!(
        fx.call(A, &format!("http://{}:{HTTP}/", b.ip))["pod"],
        "b-0"
    );
    assert_eq!(
        fx.call(C, &format!("http://{}:{HTTP}/", b.ip))["pod"],
        "b-0"
    );
    let summary = fx.tcp_load(A, SocketAddrV4::new(b.ip, ECHO), 5);
    assert_eq!(summary["ok"], 5, "{summary}");
    let seen = new_events(&events, mark);
    assert!(
        seen.contains(&Event::Outbound {
            pod: a.ip,
            orig_dst: Ok(SocketAddrV4::new(b.ip, HTTP)),
        }) && seen
            .iter()
            .filter(|e| matches!(e, Event::Inbound { .. }))
            .count()
            == 2,
        "capture after the restart: {seen:?}"
    );

    // ---- (e) Unenrol: traffic passes untouched again, B's app sees A itself.
    daemon.stop(&fx.rt);
    capture.unenroll(&handle_a).unwrap();
    capture.unenroll(&handle_b).unwrap();
    assert!(capture.status().unwrap().pods.is_empty());
    let pod_links: Vec<u32> = status
        .pods
        .values()
        .map(|p| p.sk_lookup.unwrap().link_id)
        .collect();
    assert_eq!(
        still_loaded(&pod_links),
        Vec::<u32>::new(),
        "sk_lookup links left attached"
    );
    assert!(capture.persisted_pods().unwrap().is_empty());
    let mark = events_mark(&events);
    let answer = fx.call(A, &format!("http://{}:{HTTP}/", b.ip));
    assert_eq!(
        (answer["pod"].as_str(), peer_ip(&answer)),
        (Some("b-0"), a.ip)
    );
    assert_eq!(new_events(&events, mark), vec![]);

    // ---- Uninstall: links, maps and the bpffs go.
    let capture = Arc::into_inner(capture).unwrap();
    let bpffs = capture.config().bpffs_dir();
    capture.uninstall().unwrap();
    assert!(
        !is_mount_point(&bpffs),
        "bpffs still mounted at {}",
        bpffs.display()
    );
    let cgroup_links: Vec<u32> = status.cgroup_links.values().map(|l| l.link_id).collect();
    assert_eq!(
        still_loaded(&cgroup_links),
        Vec::<u32>::new(),
        "cgroup links left attached"
    );
    // Nothing redirects any more even for a pod whose entries would have been left.
    assert_eq!(
        fx.call(A, &format!("http://{}:{HTTP}/", b.ip))["pod"],
        "b-0"
    );
}

/// Not a test: the body of a client process the capture test starts inside a pod
/// (so that it is in the pod's cgroup), optionally with a socket mark. It does one TCP
/// echo round trip and prints the socket's peer address.
#[test]
#[ignore = "helper process of capture_redirects_steers_fails_closed_and_resumes"]
fn helper_tcp_echo_round_trip() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let (dst, mark) = spec.split_once(';').unwrap();
    let dst: SocketAddr = dst.parse().unwrap();
    let mark: u32 = mark.parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = match (netns::SocketMark::new(mark), dst) {
            (Some(mark), _) => netns::tcp_socket(mark).unwrap().into_tokio(),
            (None, SocketAddr::V4(_)) => tokio::net::TcpSocket::new_v4().unwrap(),
            (None, SocketAddr::V6(_)) => tokio::net::TcpSocket::new_v6().unwrap(),
        };
        let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(dst))
            .await
            .expect("connect timed out")
            .expect("connect");
        let peer = stream.peer_addr().unwrap();
        let ping = b"ambit capture helper\n";
        stream.write_all(ping).await.unwrap();
        let mut echoed = vec![0; ping.len()];
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read_exact(&mut stream, &mut echoed),
        )
        .await
        .expect("echo timed out")
        .expect("reading the echo");
        assert_eq!(echoed, ping);
        println!("{HELPER_REPORT}{peer}");
    });
}

/// The cluster, the capture state directory and the fake daemon's runtime; dropped in
/// the reverse order of need: runtime (daemon tasks), capture state (unpin, unmount),
/// cluster (netns, cgroups).
struct Fixture {
    rt: Runtime,
    state: StateDir,
    cluster: Cluster,
}

impl Fixture {
    fn up() -> Self {
        ambit_test_support::bin_path("ambit-echo").expect("ambit-echo is built");
        let cluster = Cluster::up(
            Options::for_test(ambit_test_support::bin_dir().unwrap()),
            &Topology::from_yaml(TOPOLOGY).unwrap(),
        )
        .expect("bringing the cluster up");
        Self {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            state: StateDir::new(),
            cluster,
        }
    }

    fn pod(&self, pod: &str) -> PodInfo {
        self.cluster.pod(pod).unwrap()
    }

    fn node_pods_cgroup(&self) -> PathBuf {
        self.cluster.node("node-1").unwrap().pods_cgroup
    }

    fn exec(&self, pod: &str, args: &[&str]) -> Output {
        self.cluster
            .exec(pod, args)
            .unwrap_or_else(|e| panic!("running {args:?} in {pod}: {e}"))
    }

    /// `ambit-echo call URL` from `pod`; the JSON answer, which must come.
    fn call(&self, pod: &str, url: &str) -> serde_json::Value {
        let out = self.exec(pod, &["ambit-echo", "call", "--timeout", "5s", url]);
        assert!(
            out.status.success(),
            "call {url} from {pod} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `ambit-echo call URL` from `pod`, which must fail; its stderr.
    fn call_fails(&self, pod: &str, url: &str) -> String {
        let out = self.exec(pod, &["ambit-echo", "call", "--timeout", "3s", url]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "call {url} from {pod} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// `ambit-echo load --tcp DST -n N` from `pod`; the JSON summary.
    fn tcp_load(&self, pod: &str, dst: SocketAddrV4, requests: u32) -> serde_json::Value {
        let out = self.exec(
            pod,
            &[
                "ambit-echo",
                "load",
                "--tcp",
                &dst.to_string(),
                "-n",
                &requests.to_string(),
                "--timeout",
                "3s",
            ],
        );
        assert!(
            out.status.success(),
            "load against {dst} from {pod} could not run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs [`helper_tcp_echo_round_trip`] in `pod`'s netns and cgroup; the peer
    /// address its socket reported.
    fn helper_round_trip(&self, pod: &str, dst: SocketAddr, mark: Option<u32>) -> SocketAddr {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = self.cluster.pod_command(pod, &exe).unwrap();
        cmd.args([
            "--exact",
            "helper_tcp_echo_round_trip",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, format!("{dst};{}", mark.unwrap_or(0)))
        .stdin(Stdio::null());
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "helper in {pod} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            // The harness prints "test … " on the same line first.
            .find_map(|l| l.split_once(HELPER_REPORT).map(|(_, peer)| peer.trim()))
            .unwrap_or_else(|| panic!("no report from the helper:\n{stdout}"))
            .parse()
            .unwrap()
    }
}

/// The capture's state directory, uninstalled (links unpinned, bpffs unmounted) and
/// removed when dropped, also when the test fails.
struct StateDir {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl StateDir {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ambit-capture-test-")
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
        // Idempotent: a test that got to uninstall has nothing left here.
        if let Err(e) = capture::uninstall(&self.path) {
            eprintln!("cleaning up capture state {}: {e}", self.path.display());
        }
    }
}

/// The test's stand-in for the daemon's proxies: accept loops on each enrolled pod's
/// listeners, recording what they accept.
struct FakeDaemon {
    tasks: Vec<JoinHandle<()>>,
}

impl FakeDaemon {
    fn serve(
        rt: &Runtime,
        capture: &Arc<Capture>,
        pods: impl IntoIterator<Item = EnrolledPod>,
        events: &Events,
    ) -> Self {
        let _guard = rt.enter();
        let mut tasks = Vec::new();
        for pod in pods {
            let (handle, listeners) = pod.into_parts();
            let listen = |l: std::net::TcpListener| TcpListener::from_std(l).unwrap();
            tasks.push(rt.spawn(outbound_loop(
                listen(listeners.outbound),
                handle.clone(),
                Arc::clone(capture),
                Arc::clone(events),
            )));
            tasks.push(rt.spawn(inbound_loop(
                listen(listeners.inbound),
                handle.clone(),
                Arc::clone(events),
                false,
            )));
            tasks.push(rt.spawn(inbound_loop(
                listen(listeners.hbone),
                handle,
                Arc::clone(events),
                true,
            )));
        }
        Self { tasks }
    }

    /// Stops every task and waits until they are gone, so that every listener (and
    /// every clone of the capture) is closed when this returns.
    fn stop(self, rt: &Runtime) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = rt.block_on(task);
        }
    }
}

async fn outbound_loop(
    listener: TcpListener,
    pod: PodHandle,
    capture: Arc<Capture>,
    events: Events,
) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let orig_dst = capture.original_dst(&stream).map_err(|e| e.to_string());
        events.lock().unwrap().push(Event::Outbound {
            pod: pod.ip(),
            orig_dst: orig_dst.clone(),
        });
        let Ok(dst) = orig_dst else {
            continue;
        };
        let socket = pod.connect_socket().unwrap().into_tokio();
        conns.spawn(splice(
            stream,
            async move { socket.connect(dst.into()).await },
        ));
    }
}

async fn inbound_loop(listener: TcpListener, pod: PodHandle, events: Events, hbone: bool) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let local = stream.local_addr().unwrap();
        let pod_ip = pod.ip();
        events.lock().unwrap().push(if hbone {
            Event::Hbone {
                pod: pod_ip,
                local,
                peer,
            }
        } else {
            Event::Inbound {
                pod: pod_ip,
                local,
                peer,
            }
        });
        if hbone {
            // Stands in for the HBONE server: echo.
            conns.spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        } else {
            // Deliver to the app from the pod's own netns: the pod connecting to itself
            // passes sk_lookup.
            let socket = pod.connect_socket().unwrap().into_tokio();
            conns.spawn(splice(stream, async move { socket.connect(local).await }));
        }
    }
}

/// Copies both ways between `client` and the connection `upstream` makes.
async fn splice(mut client: TcpStream, upstream: impl Future<Output = std::io::Result<TcpStream>>) {
    let Ok(mut upstream) = upstream.await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

fn pod_capture(pod: &PodInfo) -> PodCapture {
    PodCapture {
        name: format!("{}/{}", pod.namespace, pod.name),
        netns: PathBuf::from(NETNS_DIR).join(&pod.netns),
        ip: pod.ip,
    }
}

fn events_mark(events: &Events) -> usize {
    events.lock().unwrap().len()
}

fn new_events(events: &Events, mark: usize) -> Vec<Event> {
    events.lock().unwrap()[mark..].to_vec()
}

/// The peer port of the inbound event at `index` (ephemeral, so not predictable).
fn peer_port(events: &Events, index: usize) -> u16 {
    match events.lock().unwrap().get(index) {
        Some(Event::Inbound { peer, .. }) => peer.port(),
        other => panic!("expected an inbound event at {index}, got {other:?}"),
    }
}

fn peer_ip(answer: &serde_json::Value) -> Ipv4Addr {
    let peer: SocketAddr = answer["peer"].as_str().unwrap().parse().unwrap();
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(ip) => panic!("unexpected peer {ip}"),
    }
}

fn assert_refused(summary: &serde_json::Value) {
    assert_eq!(summary["ok"], 0, "{summary}");
    let kinds = summary["error_kinds"].as_object().unwrap();
    assert!(
        kinds.keys().any(|k| k.contains("refused")),
        "expected connection refused: {summary}"
    );
}

/// Asserts exactly `ips` are enrolled with outbound capture and sk_lookup links, and
/// whether their listeners are registered.
fn assert_enrolled(status: &CaptureStatus, ips: &[Ipv4Addr], listeners: bool) {
    assert_eq!(
        status.pods.keys().copied().collect::<Vec<_>>(),
        ips,
        "{status:#?}"
    );
    assert_eq!(
        status
            .cgroup_links
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["connect4", "connect6", "sockops"]
    );
    for pod in status.pods.values() {
        assert!(pod.outbound && pod.sk_lookup.is_some(), "{status:#?}");
        assert_eq!(
            (pod.inbound_listener, pod.hbone_listener),
            (listeners, listeners),
            "{status:#?}"
        );
    }
}

fn assert_listeners_marked(pod: &EnrolledPod, config: &CaptureConfig) {
    let l = pod.listeners();
    for (listener, port) in [
        (&l.outbound, OUTBOUND_PORT),
        (&l.inbound, INBOUND_PORT),
        (&l.hbone, HBONE_PORT),
    ] {
        assert_eq!(listener.local_addr().unwrap().port(), port);
        assert_eq!(
            netns::socket_mark(listener).unwrap(),
            config.bypass_mark.get()
        );
        assert_eq!(
            netns::netns_cookie(listener).unwrap(),
            pod.handle().netns_cookie(),
            "listener not in the pod's netns"
        );
    }
}

/// Which of the link ids `ids` the kernel still has.
fn still_loaded(ids: &[u32]) -> Vec<u32> {
    let loaded: BTreeSet<u32> = aya::programs::loaded_links()
        .map(|link| link.unwrap().id())
        .collect();
    ids.iter()
        .copied()
        .filter(|id| loaded.contains(id))
        .collect()
}

fn is_mount_point(path: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == path.to_str())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}
