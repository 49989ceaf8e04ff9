//! In-pod capture (DESIGN §2): redirect the TCP connects of enrolled pods to the
//! daemon's outbound listener, remember where they were going, and steer inbound TCP
//! of enrolled pods to the daemon's inbound listeners.
//!
//! - `capture_connect4`/`capture_connect6` (cgroup/connect4, cgroup/connect6, on the
//!   node's pods cgroup): a TCP connect from an enrolled pod (its netns cookie is in
//!   `PODS_BY_NETNS`) goes to `127.0.0.1:15001` instead, its original destination
//!   saved under the socket cookie. Untouched: loopback, the pod's own IP, sockets
//!   carrying one of the daemon's marks, excluded ports and prefixes, native IPv6
//!   (IPv4-mapped IPv6 destinations are captured like IPv4).
//! - `capture_sockops` (sockops, same cgroup): at `TCP_CONNECT_CB` (the local port is
//!   known by then) moves the saved destination to (netns cookie, local port), which
//!   the daemon looks up with the accepted socket's netns cookie and peer port.
//! - `capture_sk_lookup` (sk_lookup, one link per enrolled pod netns): new TCP
//!   connections to an enrolled pod IP go to the daemon's `:15006` listener (`:15008`
//!   for port 15008) of that pod, found in the sockhash by (pod IP, port). sk_lookup
//!   cannot read a netns cookie, hence the key by IP. No listener (daemon down) means
//!   `SK_DROP`: the client gets a reset at once, never the app in plaintext.
//!   Untouched: packets that came in on `lo` (the daemon's own delivery later, routed
//!   there by fwmark), the pod connecting to itself, excluded ports and source
//!   prefixes, addresses that are not an enrolled pod's, IPv6.

use core::{ffi::c_void, ptr};

use ambit_ebpf_common::{
    CaptureSettings, Exclusion, HBONE_PORT, INBOUND_PORT, ListenerKey, MAX_EXCLUSIONS,
    MAX_INBOUND_SOCKETS, MAX_ORIG_DST, MAX_PODS, OUTBOUND_PORT, OrigDstKey, OrigDstV4, PodEntry,
    ipv4_to_wire,
};
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_TCP_CONNECT_CB},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_getsockopt},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};

/// cgroup/connect*: let the `connect()` proceed (0 would fail it with EPERM).
const ALLOW: i32 = 1;
/// sk_lookup: carry on with the regular socket lookup, or use the assigned socket.
const SK_PASS: u32 = 1;
/// sk_lookup: refuse the connection (the client gets a reset).
const SK_DROP: u32 = 0;
/// sockops: the return value of callbacks that reply nothing.
const SOCKOPS_OK: u32 = 1;

const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;
/// `lo` is interface 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// `127.0.0.1`, the outbound listener's address, in wire order.
const LOOPBACK_WIRE: u32 = ipv4_to_wire(core::net::Ipv4Addr::LOCALHOST);
/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), in wire
/// order.
const V4_MAPPED_MARKER: u32 = 0x0000_ffff_u32.to_be();

#[map]
static PODS_BY_NETNS: HashMap<u64, PodEntry> = HashMap::with_max_entries(MAX_PODS, 0);

#[map]
static PODS_BY_IP: HashMap<u32, PodEntry> = HashMap::with_max_entries(MAX_PODS, 0);

#[map]
static INBOUND_SOCKS: SockHash<ListenerKey> = SockHash::with_max_entries(MAX_INBOUND_SOCKETS, 0);

#[map]
static ORIG_DST_SOCK: LruHashMap<u64, OrigDstV4> = LruHashMap::with_max_entries(MAX_ORIG_DST, 0);

#[map]
static ORIG_DST: LruHashMap<OrigDstKey, OrigDstV4> = LruHashMap::with_max_entries(MAX_ORIG_DST, 0);

#[map]
static CAPTURE_CONF: Array<CaptureSettings> = Array::with_max_entries(1, 0);

#[map]
static EXCL_PORTS: HashMap<u16, u32> = HashMap::with_max_entries(MAX_EXCLUSIONS, 0);

/// The kernel insists on `BPF_F_NO_PREALLOC` for LPM tries.
#[map]
static EXCL_CIDRS: LpmTrie<u32, u32> = LpmTrie::with_max_entries(MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);

/// Redirects TCP connects of enrolled pods to `127.0.0.1:15001` (see the module docs).
#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid `bpf_sock_addr`; the verifier checks every
    // access. Volatile 4-byte accesses keep the compiler from merging neighbouring
    // fields into 8-byte ones, which the verifier refuses for some of them.
    let (protocol, ip, port) = unsafe {
        (
            ptr::read_volatile(&raw const (*sa).protocol),
            ptr::read_volatile(&raw const (*sa).user_ip4),
            ptr::read_volatile(&raw const (*sa).user_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return ALLOW;
    }
    // `user_port` holds the port in network order in its low 16 bits.
    if capture_outbound(ctx.sock_addr.cast(), ip, u16::from_be(port as u16)) {
        // SAFETY: as above; both fields are writable for connect4.
        unsafe {
            ptr::write_volatile(&raw mut (*sa).user_ip4, LOOPBACK_WIRE);
            ptr::write_volatile(&raw mut (*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
        }
    }
    ALLOW
}

/// The same for IPv6 sockets connecting to IPv4-mapped addresses (dual-stack
/// clients); native IPv6 passes (the pods here have none; see the module docs).
#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `capture_connect4`.
    let (protocol, w0, w1, w2, w3, port) = unsafe {
        (
            ptr::read_volatile(&raw const (*sa).protocol),
            ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            ptr::read_volatile(&raw const (*sa).user_ip6[3]),
            ptr::read_volatile(&raw const (*sa).user_port),
        )
    };
    if protocol != IPPROTO_TCP || w0 != 0 || w1 != 0 || w2 != V4_MAPPED_MARKER {
        return ALLOW;
    }
    if capture_outbound(ctx.sock_addr.cast(), w3, u16::from_be(port as u16)) {
        // SAFETY: as in `capture_connect4`; `::ffff:127.0.0.1` keeps the first three
        // words.
        unsafe {
            ptr::write_volatile(&raw mut (*sa).user_ip6[3], LOOPBACK_WIRE);
            ptr::write_volatile(&raw mut (*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
        }
    }
    ALLOW
}

/// Decides whether the connect described by `ctx` (a `bpf_sock_addr`) to `ip` (wire
/// order) and `port` is captured, and if so saves the destination under the socket
/// cookie.
#[inline(always)]
fn capture_outbound(ctx: *mut c_void, ip: u32, port: u16) -> bool {
    let host_order = u32::from_be(ip);
    if host_order >> 24 == 127 || host_order == 0 {
        return false;
    }
    // SAFETY: `ctx` is the program's context, as the helper expects.
    let netns = unsafe { bpf_get_netns_cookie(ctx) };
    // SAFETY: the value is copied out at once; the daemon replaces entries whole.
    let Some(pod) = (unsafe { PODS_BY_NETNS.get(netns) }).copied() else {
        return false;
    };
    if ip == pod.ip
        || excluded_port(port, Exclusion::OUTBOUND)
        || excluded_ip(ip, Exclusion::OUTBOUND)
        || carries_daemon_mark(ctx)
    {
        return false;
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx) };
    let dst = OrigDstV4 { ip, port, _pad: 0 };
    // An LRU map makes room rather than fail. Should it fail anyway, the connect is
    // still redirected: the daemon then finds no destination and closes it (fail
    // closed), instead of the pod reaching the destination in plaintext.
    let _ = ORIG_DST_SOCK.insert(cookie, dst, u64::from(BPF_ANY));
    true
}

/// Whether the socket carries the daemon's bypass or delivery mark.
#[inline(always)]
fn carries_daemon_mark(ctx: *mut c_void) -> bool {
    let Some(settings) = CAPTURE_CONF.get(0) else {
        return false;
    };
    let (bypass, delivery) = (settings.bypass_mark, settings.delivery_mark);
    if bypass == 0 && delivery == 0 {
        return false;
    }
    let mut mark: u32 = 0;
    // SAFETY: `ctx` is the program's context; `mark` is a 4-byte stack slot.
    let ret = unsafe {
        bpf_getsockopt(
            ctx,
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast(),
            size_of::<u32>() as i32,
        )
    };
    ret == 0 && mark != 0 && (mark == bypass || mark == delivery)
}

#[inline(always)]
fn excluded_port(port: u16, direction: u32) -> bool {
    // SAFETY: the value is copied out at once.
    unsafe { EXCL_PORTS.get(port) }.is_some_and(|bits| *bits & direction != 0)
}

#[inline(always)]
fn excluded_ip(ip: u32, direction: u32) -> bool {
    EXCL_CIDRS
        .get(Key::new(32, ip))
        .is_some_and(|bits| *bits & direction != 0)
}

/// Moves the original destination of a captured connect from its socket cookie to
/// (netns cookie, local port) once the local port is chosen.
///
/// Named differently from its section (`sockops`), which would clash at link time.
#[sock_ops]
pub fn capture_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return SOCKOPS_OK;
    }
    let ops = ctx.ops.cast::<c_void>();
    // SAFETY: `ops` is the program's context, as the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ops) };
    // SAFETY: the value is copied out at once.
    let Some(dst) = (unsafe { ORIG_DST_SOCK.get(cookie) }).copied() else {
        return SOCKOPS_OK;
    };
    // SAFETY: as above.
    let netns = unsafe { bpf_get_netns_cookie(ops) };
    // `local_port` is in host order, unlike `remote_port`.
    let key = OrigDstKey::new(netns, ctx.local_port() as u16);
    let _ = ORIG_DST.insert(key, dst, u64::from(BPF_ANY));
    let _ = ORIG_DST_SOCK.remove(cookie);
    SOCKOPS_OK
}

/// Steers new inbound TCP of an enrolled pod to the daemon's listener in that pod, or
/// refuses it when the listener is missing (see the module docs).
#[sk_lookup]
pub fn capture_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: the kernel passes a valid `bpf_sk_lookup`; the verifier checks every
    // (4-byte, volatile as in connect4) access.
    let (family, protocol, ifindex, local_ip, remote_ip, local_port) = unsafe {
        (
            ptr::read_volatile(&raw const (*l).family),
            ptr::read_volatile(&raw const (*l).protocol),
            ptr::read_volatile(&raw const (*l).ingress_ifindex),
            ptr::read_volatile(&raw const (*l).local_ip4),
            ptr::read_volatile(&raw const (*l).remote_ip4),
            ptr::read_volatile(&raw const (*l).local_port),
        )
    };
    if protocol != IPPROTO_TCP || family != AF_INET || ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    // SAFETY: only presence is checked.
    if unsafe { PODS_BY_IP.get(local_ip) }.is_none() || remote_ip == local_ip {
        return SK_PASS;
    }
    // `local_port` is in host order.
    let port = local_port as u16;
    if excluded_port(port, Exclusion::INBOUND) || excluded_ip(remote_ip, Exclusion::INBOUND) {
        return SK_PASS;
    }
    let listener = if port == HBONE_PORT {
        HBONE_PORT
    } else {
        INBOUND_PORT
    };
    match INBOUND_SOCKS.redirect_sk_lookup(&ctx, ListenerKey::from_wire(local_ip, listener), 0) {
        Ok(()) => SK_PASS,
        // No listener: the daemon is down (its sockets left the sockhash as they
        // closed). Fail closed.
        Err(_) => SK_DROP,
    }
}
