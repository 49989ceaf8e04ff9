//! What the wire sees between meshed pods: tcpdump on the simulated cluster's
//! underlay bridge (`br0`, between the nodes) and on node-1's pod bridge (`cni0`,
//! between pods of one node) while checkout sends a payload made of a distinctive
//! marker to payment by pod IP (across nodes and on the same node) and by Service VIP.
//! Between meshed pods only TCP to or from port 15008 (HBONE) may appear, and the
//! marker never. The control: legacy-client, outside the mesh, sends the same payload
//! to payment in plaintext, and the same capture and parser do find the marker.
//!
//! Needs root (eBPF, netns), `tcpdump` (`cargo xtask setup`) and the workspace
//! binaries; fails, never skips, without them.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed unwrap is a failed test, with its location"
)]

mod common;

use std::{
    collections::BTreeSet,
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use ambit_simcluster::Cluster;

/// Repeated to make every payload: long enough never to occur by chance in ciphertext.
const MARKER: &[u8] = b"<ambit-underlay-marker: this text must never cross the wire in clear>";
/// Bytes per call by pod IP.
const PAYLOAD: usize = 4 << 20;
/// Bytes per call by Service VIP and for the plaintext control.
const SMALL_PAYLOAD: usize = 1 << 20;
/// Sent in plaintext after everything else.
const SENTINEL: &str = "<ambit-underlay-sentinel: end of the traffic under test>";
/// The HBONE port.
const HBONE: u16 = 15008;

#[test]
fn between_meshed_pods_the_wire_carries_only_hbone_and_no_payload_in_clear() {
    which_tcpdump();
    let cluster = common::mesh_shop();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let dir = tempfile::tempdir().unwrap();
        let big = payload_file(dir.path(), "big", PAYLOAD);
        let small = payload_file(dir.path(), "small", SMALL_PAYLOAD);
        let status = cluster.status();
        let node1 = cluster.node("node-1").unwrap();
        let checkout = cluster.pod("production/checkout-0").unwrap();
        let local = cluster.pod("production/payment-v1-0").unwrap();
        let remote = cluster.pod("production/payment-v1-1").unwrap();
        let legacy = cluster.pod("legacy/legacy-client-0").unwrap();
        assert_eq!(
            (checkout.node.as_str(), local.node.as_str()),
            ("node-1", "node-1")
        );
        assert_eq!(
            (remote.node.as_str(), legacy.node.as_str()),
            ("node-2", "node-1")
        );
        let meshed: BTreeSet<Ipv4Addr> = cluster
            .pods()
            .iter()
            .filter(|p| {
                status.namespaces.iter().any(|ns| {
                    ns.name == p.namespace
                        && ns
                            .labels
                            .get("ambit.dev/dataplane-mode")
                            .map(String::as_str)
                            == Some("ambient")
                })
            })
            .map(|p| p.ip)
            .collect();
        assert!(
            meshed.contains(&checkout.ip) && meshed.contains(&remote.ip),
            "{meshed:?}"
        );
        assert!(!meshed.contains(&legacy.ip), "{meshed:?}");

        let underlay = Capture::start(
            &status.underlay.netns,
            &status.underlay.bridge,
            dir.path().join("underlay.pcap"),
        );
        let node_bridge = Capture::start(&node1.netns, &node1.bridge, dir.path().join("cni0.pcap"));

        // Across nodes and on the same node, by pod IP.
        let from = "production/checkout-0";
        post(
            &cluster,
            from,
            remote.ip,
            8080,
            Body::File(&big),
            Some(&remote.name),
        );
        post(
            &cluster,
            from,
            local.ip,
            8080,
            Body::File(&big),
            Some(&local.name),
        );
        // By Service VIP, until an endpoint on the other node answered (so the VIP's
        // traffic crossed the underlay too).
        let vip = cluster.service("production/payment").unwrap().cluster_ip;
        let mut answered_by: Vec<String> = Vec::new();
        while !answered_by
            .iter()
            .any(|p| cluster.pod(&format!("production/{p}")).unwrap().node == "node-2")
        {
            assert!(
                answered_by.len() < 20,
                "the VIP never picked a node-2 endpoint: {answered_by:?}"
            );
            answered_by.push(post(&cluster, from, vip, 80, Body::File(&small), None));
        }
        // The control: an unmeshed client's plaintext to the same payment pod.
        let from = "legacy/legacy-client-0";
        post(
            &cluster,
            from,
            remote.ip,
            8080,
            Body::File(&small),
            Some(&remote.name),
        );
        // Last, crossing both bridges: once the captures hold it, they hold
        // everything sent before.
        post(
            &cluster,
            from,
            remote.ip,
            8080,
            Body::Text(SENTINEL),
            Some(&remote.name),
        );

        for (capture, pair) in [
            (
                underlay.stop_after(SENTINEL.as_bytes()),
                (checkout.ip, remote.ip),
            ),
            (
                node_bridge.stop_after(SENTINEL.as_bytes()),
                (checkout.ip, local.ip),
            ),
        ] {
            let Summary {
                where_,
                meshed_not_hbone,
                marked_outside_control,
                pair_bytes,
                control_with_marker,
            } = summarize(&capture, &meshed, pair, (legacy.ip, remote.ip));
            eprintln!(
                "{where_}: {} TCP packets, {pair_bytes} bytes of HBONE between {} and {}, \
                 {control_with_marker} plaintext control packets with the marker",
                capture.packets.len(),
                pair.0,
                pair.1
            );
            assert!(
                meshed_not_hbone.is_empty(),
                "{where_}: {} TCP packets between meshed pods not on port {HBONE}, e.g. {:?}",
                meshed_not_hbone.len(),
                &meshed_not_hbone[..meshed_not_hbone.len().min(5)]
            );
            assert!(
                marked_outside_control.is_empty(),
                "{where_}: the payload crossed in clear in {} packets, e.g. {:?}",
                marked_outside_control.len(),
                &marked_outside_control[..marked_outside_control.len().min(5)]
            );
            // TLS only adds to the size: all of the payload must have crossed here.
            assert!(
                pair_bytes >= PAYLOAD,
                "{where_}: only {pair_bytes} bytes of HBONE between {} and {}",
                pair.0,
                pair.1
            );
            assert!(
                control_with_marker > 0,
                "{where_}: the plaintext control's marker was not seen: the check could not fail"
            );
        }
    }));
    let down = cluster.down();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    down.unwrap();
}

fn which_tcpdump() {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("tcpdump").is_file()));
    assert!(found, "tcpdump is not installed: run `cargo xtask setup`");
}

/// A file of `len` bytes made of [`MARKER`] repeated.
fn payload_file(dir: &Path, name: &str, len: usize) -> PathBuf {
    let body: Vec<u8> = MARKER.iter().copied().cycle().take(len).collect();
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

/// A request body.
enum Body<'a> {
    /// The contents of this file.
    File(&'a Path),
    /// This text.
    Text(&'a str),
}

/// POSTs `body` from `from` to `ip:port`; checks the echo server read all of it (and,
/// with `expect_pod`, which pod answered); returns the pod that answered.
fn post(
    cluster: &Cluster,
    from: &str,
    ip: Ipv4Addr,
    port: u16,
    body: Body<'_>,
    expect_pod: Option<&str>,
) -> String {
    let url = format!("http://{ip}:{port}/");
    let (flag, value, len): (&str, &OsStr, u64) = match body {
        Body::File(path) => (
            "--data-file",
            path.as_os_str(),
            std::fs::metadata(path).unwrap().len(),
        ),
        Body::Text(text) => ("--data", text.as_ref(), text.len().try_into().unwrap()),
    };
    let argv: [&OsStr; 9] = [
        "ambit-echo".as_ref(),
        "call".as_ref(),
        "-X".as_ref(),
        "POST".as_ref(),
        "--timeout".as_ref(),
        "20s".as_ref(),
        flag.as_ref(),
        value,
        url.as_ref(),
    ];
    let out = cluster.exec(from, &argv).unwrap();
    assert!(
        out.status.success(),
        "POST {url} from {from} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["body_bytes"], len, "{answer}");
    let pod = answer["pod"].as_str().unwrap().to_owned();
    if let Some(expected) = expect_pod {
        assert_eq!(pod, expected, "{answer}");
    }
    pod
}

/// A running `tcpdump` writing TCP packets to a pcap file; killed on drop.
struct Capture {
    child: Child,
    file: PathBuf,
    what: String,
    /// tcpdump's stderr, line by line.
    stderr: mpsc::Receiver<String>,
}

impl Capture {
    /// Starts tcpdump on `iface` in the network namespace `netns`; returns once it
    /// says it is listening. Immediate mode and packet-buffered output put every
    /// packet in the file as it is seen, a large buffer keeps the kernel from dropping
    /// any (checked at the end).
    fn start(netns: &str, iface: &str, file: PathBuf) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "tcpdump", "-i", iface])
            .args(["-n", "--immediate-mode", "-U", "-B", "32768", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Drains stderr for the whole run (tcpdump reports its counts at exit).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let capture = Self {
            child,
            file,
            what: format!("{iface} in {netns}"),
            stderr: rx,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match capture.stderr.recv_timeout(left) {
                Ok(line) if line.contains("listening on") => return capture,
                Ok(line) => seen.push(line),
                Err(e) => panic!("tcpdump on {}: not listening ({e}): {seen:?}", capture.what),
            }
        }
    }

    /// Waits until a packet carrying `sentinel` is in the file (traffic sent before
    /// it is then in too), stops tcpdump (SIGINT: it flushes and exits), checks the
    /// kernel dropped nothing and parses the file.
    fn stop_after(mut self, sentinel: &[u8]) -> Pcap {
        let deadline = Instant::now() + Duration::from_secs(10);
        // A read may catch a record half written: parse errors mean "not yet".
        while !Pcap::parse(&std::fs::read(&self.file).unwrap())
            .is_ok_and(|pcap| pcap.packets.iter().any(|p| contains(&p.payload, sentinel)))
        {
            assert!(
                Instant::now() < deadline,
                "{}: the sentinel never arrived",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "tcpdump on {} did not stop",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF, now that tcpdump is gone.
        let mut report = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => report.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(e) => panic!("tcpdump on {}: stderr: {e}", self.what),
            }
        }
        assert!(
            status.success(),
            "tcpdump on {}: {status}: {report:?}",
            self.what
        );
        // Only a complete capture proves anything about what crossed.
        assert!(
            report.iter().any(|l| l == "0 packets dropped by kernel"),
            "tcpdump on {}: {report:?}",
            self.what
        );
        let mut pcap = Pcap::parse(&std::fs::read(&self.file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", self.file.display()));
        pcap.origin.clone_from(&self.what);
        pcap
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A TCP/IPv4 packet from the capture.
#[derive(Debug)]
struct Packet {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: Vec<u8>,
}

impl std::fmt::Display for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} → {}:{} ({} bytes)",
            self.src,
            self.sport,
            self.dst,
            self.dport,
            self.payload.len()
        )
    }
}

/// The TCP/IPv4 packets of a pcap file.
struct Pcap {
    origin: String,
    packets: Vec<Packet>,
}

impl Pcap {
    /// Parses a classic pcap file of Ethernet frames (what `tcpdump -w` writes).
    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let header = bytes.get(..24).ok_or("shorter than the pcap file header")?;
        let magic = u32::from_le_bytes(header[..4].try_into().unwrap());
        let little = match magic {
            0xa1b2_c3d4 | 0xa1b2_3c4d => true,
            0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
            other => return Err(format!("not a pcap file (magic {other:#x})")),
        };
        let u32_at = |b: &[u8], at: usize| {
            let v: [u8; 4] = b[at..at + 4].try_into().unwrap();
            if little {
                u32::from_le_bytes(v)
            } else {
                u32::from_be_bytes(v)
            }
        };
        let link_type = u32_at(header, 20);
        if link_type != 1 {
            return Err(format!("link type {link_type}, expected 1 (Ethernet)"));
        }
        let mut packets = Vec::new();
        let mut rest = &bytes[24..];
        while !rest.is_empty() {
            let record = rest.get(..16).ok_or("truncated record header")?;
            let captured = usize::try_from(u32_at(record, 8)).unwrap();
            let original = usize::try_from(u32_at(record, 12)).unwrap();
            let frame = rest.get(16..16 + captured).ok_or("truncated record")?;
            // A frame cut short by the snapshot length could hide the marker.
            if captured != original {
                return Err(format!("a frame of {original} bytes was cut to {captured}"));
            }
            packets.extend(tcp_in_ethernet(frame));
            rest = &rest[16 + captured..];
        }
        Ok(Self {
            origin: String::new(),
            packets,
        })
    }
}

/// The TCP/IPv4 packet in an Ethernet frame, if it holds one.
fn tcp_in_ethernet(frame: &[u8]) -> Option<Packet> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let header_len = usize::from(ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip.get(9)? != &6 || header_len < 20 {
        return None;
    }
    // The total length trims Ethernet padding; offloaded (GSO) frames may leave it 0.
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let ip = if total >= header_len && total <= ip.len() {
        &ip[..total]
    } else {
        ip
    };
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = ip.get(header_len..)?;
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Packet {
        src,
        dst,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        payload: tcp.get(data_offset..)?.to_vec(),
    })
}

/// What one capture shows.
struct Summary {
    where_: String,
    /// TCP packets between two meshed pods with neither port 15008.
    meshed_not_hbone: Vec<String>,
    /// Packets carrying the marker, other than the plaintext control's.
    marked_outside_control: Vec<String>,
    /// TCP payload bytes between the pair, both ways.
    pair_bytes: usize,
    /// The control flow's packets carrying the marker.
    control_with_marker: usize,
}

fn summarize(
    capture: &Pcap,
    meshed: &BTreeSet<Ipv4Addr>,
    pair: (Ipv4Addr, Ipv4Addr),
    control: (Ipv4Addr, Ipv4Addr),
) -> Summary {
    let between = |p: &Packet, (a, b): (Ipv4Addr, Ipv4Addr)| {
        (p.src, p.dst) == (a, b) || (p.src, p.dst) == (b, a)
    };
    let mut summary = Summary {
        where_: capture.origin.clone(),
        meshed_not_hbone: Vec::new(),
        marked_outside_control: Vec::new(),
        pair_bytes: 0,
        control_with_marker: 0,
    };
    for p in &capture.packets {
        let marked = contains(&p.payload, MARKER);
        let meshed_pair = meshed.contains(&p.src) && meshed.contains(&p.dst);
        if meshed_pair && p.sport != HBONE && p.dport != HBONE {
            summary.meshed_not_hbone.push(p.to_string());
        }
        if marked && !between(p, control) {
            summary.marked_outside_control.push(p.to_string());
        }
        if between(p, pair) {
            summary.pair_bytes += p.payload.len();
        }
        if between(p, control) && marked {
            summary.control_with_marker += 1;
        }
    }
    summary
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
