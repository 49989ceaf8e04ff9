//! IPv4 prefixes, the only address arithmetic the simulated cluster needs.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};

/// An IPv4 prefix such as `10.244.1.0/24`, always stored in its canonical form (host
/// bits cleared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why a string is not an IPv4 prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid IPv4 prefix {input:?}: {reason}")]
pub struct CidrParseError {
    input: String,
    reason: &'static str,
}

impl Ipv4Cidr {
    /// The prefix `addr/prefix_len`; host bits of `addr` are cleared.
    ///
    /// # Panics
    /// Never: a `prefix_len` above 32 is clamped to 32.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Self {
        let prefix_len = prefix_len.min(32);
        let network = Ipv4Addr::from(u32::from(addr) & mask(prefix_len));
        Self {
            network,
            prefix_len,
        }
    }

    /// The network address (all host bits zero).
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Number of addresses in the prefix.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    /// The `n`-th address of the prefix (0 is the network address), if it is a usable
    /// host address: neither the network nor the broadcast address.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        if n == 0 || u64::from(n) >= self.size().saturating_sub(1) {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network) + n))
    }

    /// Whether `addr` lies inside the prefix.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix_len) == u32::from(self.network)
    }

    /// Whether the two prefixes share any address.
    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }

    /// `addr/prefix_len` as `ip addr add` wants it for an address inside this prefix.
    pub fn with_host(&self, addr: Ipv4Addr) -> String {
        format!("{addr}/{}", self.prefix_len)
    }
}

fn mask(prefix_len: u8) -> u32 {
    if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| CidrParseError {
            input: s.to_owned(),
            reason,
        };
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| err("expected ADDRESS/LENGTH"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err("bad IPv4 address"))?;
        let len: u8 = len.parse().map_err(|_| err("bad prefix length"))?;
        if len > 32 {
            return Err(err("prefix length above 32"));
        }
        let cidr = Self::new(addr, len);
        if cidr.network != addr {
            return Err(err("host bits set (write the network address)"));
        }
        Ok(cidr)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = CidrParseError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(c: Ipv4Cidr) -> Self {
        c.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let c: Ipv4Cidr = "10.244.1.0/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.244.1.0/24");
        assert_eq!(c.host(1), Some(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(c.host(254), Some(Ipv4Addr::new(10, 244, 1, 254)));
        assert_eq!(c.host(255), None, "broadcast");
        assert_eq!(c.host(0), None, "network");
        assert!(c.contains(Ipv4Addr::new(10, 244, 1, 77)));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 2, 1)));
    }

    #[test]
    fn rejects_bad_prefixes() {
        for bad in [
            "10.244.1.1/24",
            "10.244.1.0",
            "10.244.1.0/33",
            "x/24",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn overlap() {
        let a: Ipv4Cidr = "10.244.0.0/16".parse().unwrap();
        let b: Ipv4Cidr = "10.244.3.0/24".parse().unwrap();
        let c: Ipv4Cidr = "10.245.0.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }
}
