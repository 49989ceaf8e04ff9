//! In-pod traffic capture (DESIGN §2): the programs, maps and map entries shared by
//! the capture programs (`cgroup/connect4`, `cgroup/connect6`, `sockops`, `sk_lookup`)
//! and the daemon.
//!
//! # Byte order
//!
//! IPv4 addresses are `u32`s holding the four bytes as on the wire (the kernel's
//! `user_ip4`, `local_ip4`, …): build them with `u32::from_ne_bytes(ip.octets())`, or
//! with the `from_ipv4` helpers here. Ports are in host byte order.
//!
//! # Maps
//!
//! | map | type | key → value | written by |
//! |---|---|---|---|
//! | [`PODS_BY_NETNS_MAP`] | hash | netns cookie `u64` → [`PodEntry`] | daemon (enrol) |
//! | [`PODS_BY_IP_MAP`] | hash | pod IP `u32` → [`PodEntry`] | daemon (enrol) |
//! | [`INBOUND_SOCKETS_MAP`] | sockhash | [`ListenerKey`] → listening socket | daemon (enrol) |
//! | [`ORIG_DST_BY_SOCKET_MAP`] | LRU hash | socket cookie `u64` → [`OrigDstV4`] | connect4/6 |
//! | [`ORIG_DST_MAP`] | LRU hash | [`OrigDstKey`] → [`OrigDstV4`] | sockops (daemon deletes) |
//! | [`SETTINGS_MAP`] | array\[1\] | `0` → [`CaptureSettings`] | daemon (start) |
//! | [`EXCLUDED_PORTS_MAP`] | hash | port `u16` → [`Exclusion`] bits | daemon (start) |
//! | [`EXCLUDED_CIDRS_MAP`] | LPM trie | (prefix, IP `u32`) → [`Exclusion`] bits | daemon (start) |
//!
//! The daemon pins every map, so that programs kept attached by pinned links and a
//! restarted daemon keep sharing them. Changing the layout of any type here changes
//! [`LAYOUT_VERSION`], which names the pin directory.

use core::net::{Ipv4Addr, SocketAddrV4};

/// Version of the map layout below; the daemon pins under a directory named after it,
/// so an incompatible daemon never reuses maps of another layout.
pub const LAYOUT_VERSION: u32 = 1;

/// Port of the daemon's outbound listener, bound to `127.0.0.1` in each enrolled pod:
/// connect4/6 redirect captured connects there.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the daemon's plaintext inbound listener in each enrolled pod: sk_lookup
/// steers new inbound TCP there (any destination port but [`HBONE_PORT`]).
pub const INBOUND_PORT: u16 = 15006;
/// Port of the daemon's HBONE (mTLS) listener in each enrolled pod: sk_lookup steers
/// inbound TCP to this port there.
pub const HBONE_PORT: u16 = 15008;

/// `cgroup/connect4` program: redirects TCP connects of enrolled pods.
pub const CONNECT4_CAPTURE_PROGRAM: &str = "capture_connect4";
/// `cgroup/connect6` program: the same for IPv4-mapped IPv6 destinations; passes
/// native IPv6.
pub const CONNECT6_CAPTURE_PROGRAM: &str = "capture_connect6";
/// `sockops` program: re-keys the original destination by (netns cookie, local port).
pub const SOCKOPS_CAPTURE_PROGRAM: &str = "capture_sockops";
/// `sk_lookup` program: steers inbound TCP of enrolled pods to the daemon's listeners.
pub const SK_LOOKUP_CAPTURE_PROGRAM: &str = "capture_sk_lookup";

/// Enrolled pods by the cookie of their network namespace (read by connect4/6).
pub const PODS_BY_NETNS_MAP: &str = "PODS_BY_NETNS";
/// Enrolled pods by pod IP (read by sk_lookup, which cannot read netns cookies).
pub const PODS_BY_IP_MAP: &str = "PODS_BY_IP";
/// The daemon's inbound listeners (sockhash) by (pod IP, [`INBOUND_PORT`] or
/// [`HBONE_PORT`]).
pub const INBOUND_SOCKETS_MAP: &str = "INBOUND_SOCKS";
/// Original destinations by socket cookie, between connect4/6 and sockops.
pub const ORIG_DST_BY_SOCKET_MAP: &str = "ORIG_DST_SOCK";
/// Original destinations by (netns cookie, local port), read by the daemon on accept.
pub const ORIG_DST_MAP: &str = "ORIG_DST";
/// One [`CaptureSettings`] at index 0.
pub const SETTINGS_MAP: &str = "CAPTURE_CONF";
/// Ports never captured, with the [`Exclusion`] direction bits.
pub const EXCLUDED_PORTS_MAP: &str = "EXCL_PORTS";
/// IPv4 prefixes never captured, with the [`Exclusion`] direction bits.
pub const EXCLUDED_CIDRS_MAP: &str = "EXCL_CIDRS";

/// Every capture map, for pinning.
pub const CAPTURE_MAPS: [&str; 8] = [
    PODS_BY_NETNS_MAP,
    PODS_BY_IP_MAP,
    INBOUND_SOCKETS_MAP,
    ORIG_DST_BY_SOCKET_MAP,
    ORIG_DST_MAP,
    SETTINGS_MAP,
    EXCLUDED_PORTS_MAP,
    EXCLUDED_CIDRS_MAP,
];

/// Capacity of the pod maps (pods per node).
pub const MAX_PODS: u32 = 1024;
/// Capacity of the sockhash: two listeners per pod.
pub const MAX_INBOUND_SOCKETS: u32 = 2 * MAX_PODS;
/// Capacity of the two original-destination maps (LRU: the oldest entries go first,
/// so a burst of connects never fails for lack of room).
pub const MAX_ORIG_DST: u32 = 65_536;
/// Capacity of each exclusion map.
pub const MAX_EXCLUSIONS: u32 = 256;

/// An enrolled pod: the value of [`PODS_BY_NETNS_MAP`] and [`PODS_BY_IP_MAP`].
///
/// 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodEntry {
    /// Cookie of the pod's network namespace.
    pub netns_cookie: u64,
    /// Pod IP, network byte order.
    pub ip: u32,
    /// Reserved; always zero.
    pub _reserved: u32,
}

impl PodEntry {
    /// The entry for the pod at `ip` whose netns has cookie `netns_cookie`.
    pub const fn new(netns_cookie: u64, ip: Ipv4Addr) -> Self {
        Self {
            netns_cookie,
            ip: ipv4_to_wire(ip),
            _reserved: 0,
        }
    }

    /// The pod IP.
    pub const fn ipv4(&self) -> Ipv4Addr {
        ipv4_from_wire(self.ip)
    }
}

/// Key of [`INBOUND_SOCKETS_MAP`]: which listener of which pod.
///
/// 8 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Pod IP, network byte order.
    pub ip: u32,
    /// [`INBOUND_PORT`] or [`HBONE_PORT`], host byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
}

impl ListenerKey {
    /// The key of the listener on `port` of the pod at `ip`.
    pub const fn new(ip: Ipv4Addr, port: u16) -> Self {
        Self::from_wire(ipv4_to_wire(ip), port)
    }

    /// The same from an address already in network byte order (eBPF side).
    pub const fn from_wire(ip: u32, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// Where a captured connect was going: the value of [`ORIG_DST_BY_SOCKET_MAP`] and
/// [`ORIG_DST_MAP`].
///
/// 8 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstV4 {
    /// Destination IP, network byte order.
    pub ip: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
}

impl OrigDstV4 {
    /// The destination as a socket address.
    pub const fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(ipv4_from_wire(self.ip), self.port)
    }
}

impl From<SocketAddrV4> for OrigDstV4 {
    fn from(addr: SocketAddrV4) -> Self {
        Self {
            ip: ipv4_to_wire(*addr.ip()),
            port: addr.port(),
            _pad: 0,
        }
    }
}

/// Key of [`ORIG_DST_MAP`]: the captured socket as the daemon sees it on accept (the
/// accepted socket's netns cookie and peer port).
///
/// 16 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstKey {
    /// Cookie of the pod's network namespace.
    pub netns_cookie: u64,
    /// Local port of the captured socket (the peer port of the accepted one), host
    /// byte order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 6],
}

impl OrigDstKey {
    /// The key for the socket with local `port` in the netns with `netns_cookie`.
    pub const fn new(netns_cookie: u64, port: u16) -> Self {
        Self {
            netns_cookie,
            port,
            _pad: [0; 6],
        }
    }
}

/// Node-wide settings: the value at index 0 of [`SETTINGS_MAP`].
///
/// 16 bytes, no implicit padding. All zero (the map's initial state) means "no
/// bypass mark": every socket of an enrolled pod is captured.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CaptureSettings {
    /// `SO_MARK` of the daemon's sockets: connect4/6 never redirect a socket carrying
    /// it. Zero disables the check (zero is every unmarked socket's mark).
    pub bypass_mark: u32,
    /// `SO_MARK` of the daemon's delivery sockets to pods (source-IP-preserving
    /// connects, routed to `lo` inside the pod); never redirected either. Zero
    /// disables the check.
    pub delivery_mark: u32,
    /// Reserved; always zero.
    pub _reserved: [u32; 2],
}

/// Direction bits of an exclusion (the value of [`EXCLUDED_PORTS_MAP`] and
/// [`EXCLUDED_CIDRS_MAP`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Exclusion;

impl Exclusion {
    /// Outbound: connects to this destination port / into this prefix pass untouched.
    pub const OUTBOUND: u32 = 1;
    /// Inbound: connections to this pod port / from this source prefix pass untouched.
    pub const INBOUND: u32 = 2;
}

/// An IPv4 address as the kernel's `u32` fields hold it (wire byte order).
pub const fn ipv4_to_wire(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`ipv4_to_wire`].
pub const fn ipv4_from_wire(ip: u32) -> Ipv4Addr {
    let [a, b, c, d] = ip.to_ne_bytes();
    Ipv4Addr::new(a, b, c, d)
}

const _: () = {
    assert!(size_of::<PodEntry>() == 16);
    assert!(size_of::<ListenerKey>() == 8);
    assert!(size_of::<OrigDstV4>() == 8);
    assert!(size_of::<OrigDstKey>() == 16);
    assert!(size_of::<CaptureSettings>() == 16);
};

/// Map keys and values are plain integers with every padding byte a named field.
#[cfg(feature = "user")]
mod pod {
    #![expect(
        unsafe_code,
        reason = "aya::Pod is an unsafe marker trait for map keys and values"
    )]

    use super::{CaptureSettings, ListenerKey, OrigDstKey, OrigDstV4, PodEntry};

    // SAFETY: repr(C), integers only, padding spelled out: any bytes are a valid value.
    unsafe impl aya::Pod for PodEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDstV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for OrigDstKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CaptureSettings {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_order_is_the_octets_in_memory_order() {
        let ip = Ipv4Addr::new(10, 244, 1, 3);
        assert_eq!(ipv4_to_wire(ip).to_ne_bytes(), [10, 244, 1, 3]);
        assert_eq!(ipv4_from_wire(ipv4_to_wire(ip)), ip);
        assert_eq!(PodEntry::new(7, ip).ipv4(), ip);
        let dst = SocketAddrV4::new(ip, 9090);
        assert_eq!(OrigDstV4::from(dst).addr(), dst);
        assert_eq!(ListenerKey::new(ip, INBOUND_PORT).ip, ipv4_to_wire(ip));
    }

    #[test]
    fn map_names_fit_the_kernel_object_name_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL; longer map names would be cut.
        for name in CAPTURE_MAPS {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
