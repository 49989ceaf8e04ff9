//! Per-destination counters of TCP `connect()` calls seen by the `cgroup/connect4`
//! program.

use core::net::{Ipv4Addr, SocketAddrV4};

/// Name of the `cgroup/connect4` program in the eBPF object.
pub const CONNECT4_PROGRAM: &str = "probe_connect4";

/// Name of the hash map `ConnectKey -> u64` counting TCP connects per destination.
pub const CONNECT_COUNTS_MAP: &str = "CONNECT_COUNTS";

/// Capacity of [`CONNECT_COUNTS_MAP`]; destinations beyond it are not counted.
pub const CONNECT_COUNTS_MAX_ENTRIES: u32 = 4096;

/// Destination of a `connect()`: the key of [`CONNECT_COUNTS_MAP`].
///
/// 8 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectKey {
    /// IPv4 address in network byte order: the four bytes as on the wire, exactly the
    /// kernel's `bpf_sock_addr.user_ip4`.
    pub ip: u32,
    /// Port in host byte order (the kernel's `user_port`, converted).
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
}

impl ConnectKey {
    /// Key for `ip:port` with the address bytes as they appear in `user_ip4`.
    pub const fn new(ip_network_order: u32, port: u16) -> Self {
        Self {
            ip: ip_network_order,
            port,
            _pad: 0,
        }
    }

    /// The destination as a socket address.
    pub const fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from_bits(u32::from_be(self.ip)), self.port)
    }
}

impl From<SocketAddrV4> for ConnectKey {
    fn from(addr: SocketAddrV4) -> Self {
        Self::new(addr.ip().to_bits().to_be(), addr.port())
    }
}

// SAFETY: `ConnectKey` is `repr(C)`, made of integers only, with every padding byte a
// named field, so any 8 bytes are a valid value and it holds no pointers.
#[cfg(feature = "user")]
#[expect(
    unsafe_code,
    reason = "aya::Pod is an unsafe marker trait for map keys"
)]
unsafe impl aya::Pod for ConnectKey {}

const _: () = assert!(size_of::<ConnectKey>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trips_and_keeps_network_order() {
        let addr = SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 8080);
        let key = ConnectKey::from(addr);
        // The first byte in memory is the first octet, as in `user_ip4`.
        assert_eq!(key.ip.to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(key.port, 8080);
        assert_eq!(key._pad, 0);
        assert_eq!(key.addr(), addr);
    }
}
