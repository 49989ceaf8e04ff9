//! Small value types shared by the model: names, selectors, CIDRs, ports, percentages,
//! Istio-style wildcard strings and durations.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// A Kubernetes namespace name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NamespaceName(String);

impl NamespaceName {
    /// Wraps a namespace name (not validated: names come from already-parsed objects).
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NamespaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which user object a model object came from: `kind`, `namespace`, `name`, plus the
/// creation timestamp Istio uses to order conflicting policies (oldest wins).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectId {
    /// Kind of the source object, e.g. `AuthorizationPolicy`.
    pub kind: String,
    /// Namespace of the source object.
    pub namespace: NamespaceName,
    /// Name of the source object.
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339, UTC) when known; local files have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

impl ObjectId {
    /// Istio's precedence among conflicting objects: older first, then by name.
    /// Objects without a timestamp (local mode) compare equal on that part.
    pub fn precedence_key(&self) -> (Option<&str>, &NamespaceName, &str) {
        (self.created.as_deref(), &self.namespace, &self.name)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Whether a policy is enforced as its author wrote it, or replaced by a stricter
/// stand-in because it could not be honoured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Enforcement {
    /// The policy as written.
    AsWritten,
    /// The policy was rejected; this object is the fail-closed stand-in.
    FailClosed {
        /// Why (the rejection, for logs and status).
        reason: String,
    },
}

/// `matchLabels`: every listed label must be present with exactly that value.
/// An empty selector matches every workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkloadSelector(pub BTreeMap<String, String>);

impl WorkloadSelector {
    /// Whether `labels` satisfy this selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether the selector has no label at all (selects everything).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The workload a policy is evaluated for: its namespace and pod labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadRef {
    /// Namespace of the pod.
    pub namespace: NamespaceName,
    /// Labels of the pod.
    pub labels: BTreeMap<String, String>,
}

/// A destination host as routes and destination rules name it: a Kubernetes Service
/// (short name `reviews`, resolved in the referring object's namespace, or
/// `reviews.prod.svc[.<cluster-domain>]`), or any other host name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ServiceHost {
    /// A Kubernetes Service.
    Service {
        /// Namespace of the Service.
        namespace: NamespaceName,
        /// Name of the Service.
        name: String,
    },
    /// Any other host name (possibly a `*.` wildcard).
    Hostname(String),
}

impl ServiceHost {
    /// Resolves a host as Istio does: a name without dots is a Service in
    /// `referrer_namespace`; `<name>.<namespace>.svc…` is that Service; anything else is
    /// taken as a host name.
    pub fn resolve(host: &str, referrer_namespace: &NamespaceName) -> Self {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let parts: Vec<&str> = host.split('.').collect();
        match parts.as_slice() {
            [name] if !name.contains('*') => Self::Service {
                namespace: referrer_namespace.clone(),
                name: (*name).to_owned(),
            },
            [name, ns, "svc", ..] if !host.contains('*') => Self::Service {
                namespace: NamespaceName::new(*ns),
                name: (*name).to_owned(),
            },
            _ => Self::Hostname(host),
        }
    }
}

impl fmt::Display for ServiceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Service { namespace, name } => write!(f, "{name}.{namespace}.svc"),
            Self::Hostname(h) => f.write_str(h),
        }
    }
}

/// A TCP port number, 1–65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PortNumber(u16);

/// Why a port could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Not a decimal number.
    #[error("`{0}` is not a port number")]
    NotANumber(String),
    /// Outside 1–65535.
    #[error("port {0} is out of range (1-65535)")]
    OutOfRange(i64),
}

impl PortNumber {
    /// Validates a number as a port.
    pub fn new(value: i64) -> Result<Self, PortError> {
        match u16::try_from(value) {
            Ok(p) if p != 0 => Ok(Self(p)),
            _ => Err(PortError::OutOfRange(value)),
        }
    }

    /// The port as an integer.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl FromStr for PortNumber {
    type Err = PortError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PortError::NotANumber(s.to_owned()));
        }
        // All digits: only overflow can fail, and that is out of range.
        let n: i64 = t.parse().unwrap_or(i64::MAX);
        Self::new(n)
    }
}

impl fmt::Display for PortNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A percentage in 0–100 (fractions allowed).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Percent(f64);

/// A percentage outside 0–100.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("percentage {0} is outside 0-100")]
pub struct PercentError(pub f64);

impl Percent {
    /// 100 %.
    pub const ALL: Percent = Percent(100.0);

    /// Validates a percentage.
    pub fn new(value: f64) -> Result<Self, PercentError> {
        if value.is_finite() && (0.0..=100.0).contains(&value) {
            Ok(Self(value))
        } else {
            Err(PercentError(value))
        }
    }

    /// The value, 0–100.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// An IPv4 or IPv6 network. A bare address is a host network (`/32`, `/128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// Why a CIDR could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IP address.
    #[error("`{0}` is not an IP address or CIDR")]
    BadAddress(String),
    /// The prefix length is not a number or too long for the address family.
    #[error("prefix length `{prefix}` is invalid for `{addr}` (max {max})")]
    BadPrefix {
        /// The address part.
        addr: String,
        /// The prefix part as written.
        prefix: String,
        /// Longest prefix of that address family.
        max: u8,
    },
}

impl Cidr {
    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is inside this network. IPv4-mapped IPv6 addresses match IPv4
    /// networks (dual-stack sockets report peers that way).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix_len) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix_len) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(v: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        v & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask_v6(v: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        v & (u128::MAX << (128 - u32::from(len)))
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr_s, prefix_s) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .parse()
            .map_err(|_| CidrError::BadAddress(s.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix_s {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => {
                    return Err(CidrError::BadPrefix {
                        addr: addr_s.to_owned(),
                        prefix: p.to_owned(),
                        max,
                    });
                }
            },
        };
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(mask_v4(u32::from(a), prefix_len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(mask_v6(u128::from(a), prefix_len))),
        };
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Istio's string match for principals, namespaces and hosts: exact, `prefix*`,
/// `*suffix`, or `*` (present and non-empty).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    /// The whole value.
    Exact(String),
    /// `prefix*`.
    Prefix(String),
    /// `*suffix`.
    Suffix(String),
    /// `*`: any non-empty value.
    Presence,
}

impl StringMatch {
    /// Parses Istio's wildcard syntax; `None` when `*` appears anywhere but alone, at
    /// the start or at the end (or at both ends).
    pub fn parse_wildcard(value: &str) -> Option<Self> {
        if value == "*" {
            return Some(Self::Presence);
        }
        let stars = value.matches('*').count();
        match stars {
            0 => Some(Self::Exact(value.to_owned())),
            1 if value.starts_with('*') => Some(Self::Suffix(value[1..].to_owned())),
            1 if value.ends_with('*') => Some(Self::Prefix(value[..value.len() - 1].to_owned())),
            _ => None,
        }
    }

    /// Whether `value` matches. An absent value is passed as `""`, which only exact
    /// `""` matches (so `*` requires presence, as in Istio).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(e) => e == value,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
            Self::Presence => !value.is_empty(),
        }
    }

    /// Case-insensitive variant of [`StringMatch::matches`] (HTTP hosts).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let value = value.to_ascii_lowercase();
        match self {
            Self::Exact(e) => e.eq_ignore_ascii_case(&value),
            Self::Prefix(p) => value.starts_with(&p.to_ascii_lowercase()),
            Self::Suffix(s) => value.ends_with(&s.to_ascii_lowercase()),
            Self::Presence => !value.is_empty(),
        }
    }
}

/// Why a duration could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Empty string.
    #[error("empty duration")]
    Empty,
    /// A leading `-`.
    #[error("duration `{0}` is negative")]
    Negative(String),
    /// Anything else that is not `<number><unit>` repeated.
    #[error(
        "`{0}` is not a duration (expected e.g. `1.5s`, `250ms`, `1m30s`; units h, m, s, ms, us, ns)"
    )]
    Malformed(String),
    /// Too long to represent.
    #[error("duration `{0}` is too large")]
    Overflow(String),
}

/// Parses a duration as Istio and Gateway API write them: one or more
/// `<decimal><unit>` terms (`h`, `m`, `s`, `ms`, `us`/`µs`, `ns`), e.g. `1.5s`,
/// `1m30s`, `250ms`; `0` alone is zero. Negative durations are rejected.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
    }
    if t.starts_with('-') {
        return Err(DurationError::Negative(s.to_owned()));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let malformed = || DurationError::Malformed(s.to_owned());
    let mut total: u128 = 0; // nanoseconds
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(malformed)?;
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(malformed());
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return Err(malformed()),
        };
        let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| DurationError::Overflow(s.to_owned()))?
        };
        let mut value = int
            .checked_mul(unit_ns)
            .ok_or_else(|| DurationError::Overflow(s.to_owned()))?;
        // Fractional digits beyond nanosecond precision are dropped.
        let mut scale = unit_ns;
        for d in frac_part.bytes().take(18) {
            scale /= 10;
            value += u128::from(d - b'0') * scale;
        }
        total = total
            .checked_add(value)
            .ok_or_else(|| DurationError::Overflow(s.to_owned()))?;
        rest = next;
    }
    let secs =
        u64::try_from(total / 1_000_000_000).map_err(|_| DurationError::Overflow(s.to_owned()))?;
    // The remainder is below 1e9 and fits u32.
    let nanos = u32::try_from(total % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("10us"), Ok(Duration::from_micros(10)));
        assert!(matches!(
            parse_duration("-1s"),
            Err(DurationError::Negative(_))
        ));
        for bad in ["2x", "s", "1", "1..2s", "1.s.", "abc", "1s2", " "] {
            assert!(parse_duration(bad).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.200.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        let host: Cidr = "192.168.0.1".parse().unwrap();
        assert_eq!(host.prefix_len(), 32);
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "nope",
            "10.0.0.0/",
            "::/129",
            "10.0.0.0/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn wildcards() {
        assert_eq!(
            StringMatch::parse_wildcard("*"),
            Some(StringMatch::Presence)
        );
        assert_eq!(
            StringMatch::parse_wildcard("*/sa/x"),
            Some(StringMatch::Suffix("/sa/x".into()))
        );
        assert_eq!(
            StringMatch::parse_wildcard("ns-*"),
            Some(StringMatch::Prefix("ns-".into()))
        );
        assert_eq!(StringMatch::parse_wildcard("a*b"), None);
        assert_eq!(StringMatch::parse_wildcard("*a*"), None);
        assert!(!StringMatch::Presence.matches(""));
    }

    #[test]
    fn ports() {
        assert_eq!("8080".parse::<PortNumber>().map(PortNumber::get), Ok(8080));
        assert!("0".parse::<PortNumber>().is_err());
        assert!("65536".parse::<PortNumber>().is_err());
        assert!("http".parse::<PortNumber>().is_err());
        assert!("-1".parse::<PortNumber>().is_err());
    }
}
