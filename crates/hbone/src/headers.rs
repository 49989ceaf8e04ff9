//! The request headers HBONE carries besides `:authority`: `forwarded` (RFC 7239,
//! the original client's address), `traceparent` (W3C Trace Context) and `baggage`
//! (W3C Baggage).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::HeaderValue;

/// Largest `baggage` value accepted (W3C Baggage: at least 8192 bytes must be
/// supported; more is not required).
const MAX_BAGGAGE_LEN: usize = 8192;

/// A valid W3C `traceparent` value, e.g.
/// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Traceparent(HeaderValue);

/// A W3C `baggage` value (list of `key=value` members), passed on verbatim.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Baggage(HeaderValue);

/// A header value was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    /// Not `version-traceid-parentid-flags` in lower-case hex with non-zero ids.
    #[error("invalid traceparent {value:?}")]
    Traceparent {
        /// The rejected text.
        value: String,
    },
    /// Not a valid header value or too long.
    #[error("invalid baggage header ({len} bytes; visible ASCII up to {MAX_BAGGAGE_LEN})")]
    Baggage {
        /// Its length.
        len: usize,
    },
}

impl Traceparent {
    /// Validates a `traceparent` value.
    pub fn parse(value: &str) -> Result<Self, HeaderError> {
        if !is_valid_traceparent(value) {
            return Err(HeaderError::Traceparent {
                value: value.to_owned(),
            });
        }
        HeaderValue::from_str(value)
            .map(Self)
            .map_err(|_| HeaderError::Traceparent {
                value: value.to_owned(),
            })
    }

    /// Builds the version-00 value from its parts.
    pub fn new(trace_id: u128, parent_id: u64, sampled: bool) -> Result<Self, HeaderError> {
        Self::parse(&format!(
            "00-{trace_id:032x}-{parent_id:016x}-{:02x}",
            u8::from(sampled)
        ))
    }

    /// The header text.
    pub fn as_str(&self) -> &str {
        // Validated as ASCII hex and dashes at construction.
        self.0.to_str().unwrap_or_default()
    }

    /// The header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> &str {
        self.as_str().get(3..35).unwrap_or_default()
    }
}

impl fmt::Debug for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Traceparent({})", self.as_str())
    }
}

impl fmt::Display for Traceparent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Baggage {
    /// Accepts any header value of visible ASCII up to 8192 bytes; member syntax
    /// is the application's business.
    pub fn new(value: &str) -> Result<Self, HeaderError> {
        let err = || HeaderError::Baggage { len: value.len() };
        if value.len() > MAX_BAGGAGE_LEN || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(err());
        }
        HeaderValue::from_str(value).map(Self).map_err(|_| err())
    }

    fn from_header(value: &HeaderValue) -> Option<Self> {
        value.to_str().ok().and_then(|s| Self::new(s).ok())
    }

    /// The header text.
    pub fn as_str(&self) -> &str {
        // Validated as visible ASCII at construction.
        self.0.to_str().unwrap_or_default()
    }

    /// The header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Debug for Baggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Baggage({})", self.as_str())
    }
}

/// The `forwarded` value naming `client` as the original client: `for=10.0.0.1`, or
/// `for="[fd00::1]"` (RFC 7239 §6: IPv6 is bracketed and quoted).
pub fn forwarded_for(client: IpAddr) -> HeaderValue {
    let text = match client {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    };
    // Digits, dots, colons, brackets and quotes only.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("for=unknown"))
}

/// The original client address from a `forwarded` value: the `for` parameter of the
/// FIRST element (the one the originating proxy wrote), quoted or not, with or
/// without brackets and port. `None` when absent, `unknown` or obfuscated.
pub fn parse_forwarded_for(value: &HeaderValue) -> Option<IpAddr> {
    let text = value.to_str().ok()?;
    let first = text.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim().trim_matches('"'))
    })?;
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    node.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse().ok())
}

pub(crate) fn traceparent_from_header(value: &HeaderValue) -> Option<Traceparent> {
    value.to_str().ok().and_then(|s| Traceparent::parse(s).ok())
}

pub(crate) fn baggage_from_header(value: &HeaderValue) -> Option<Baggage> {
    Baggage::from_header(value)
}

fn is_valid_traceparent(value: &str) -> bool {
    let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let not_zero = |s: &str| s.bytes().any(|b| b != b'0');
    let mut parts = value.splitn(5, '-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest = parts.next();
    let shape_ok = version.len() == 2
        && lower_hex(version)
        && version != "ff"
        && trace.len() == 32
        && lower_hex(trace)
        && not_zero(trace)
        && parent.len() == 16
        && lower_hex(parent)
        && not_zero(parent)
        && flags.len() == 2
        && lower_hex(flags);
    // Version 00 has exactly four fields; later versions may append more.
    shape_ok && (version != "00" || rest.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_validation() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = Traceparent::parse(ok).unwrap();
        assert_eq!(tp.as_str(), ok);
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(Traceparent::parse(bad).is_err(), "{bad:?}");
        }
        // A future version may carry more fields.
        assert!(
            Traceparent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_ok()
        );
        let built = Traceparent::new(0xabc, 0x1, true).unwrap();
        assert_eq!(
            built.as_str(),
            "00-00000000000000000000000000000abc-0000000000000001-01"
        );
    }

    #[test]
    fn baggage_validation() {
        assert_eq!(Baggage::new("a=1,b=2").unwrap().as_str(), "a=1,b=2");
        assert!(Baggage::new("a=\n").is_err());
        assert!(Baggage::new(&"x".repeat(MAX_BAGGAGE_LEN + 1)).is_err());
    }

    #[test]
    fn forwarded_round_trips_and_tolerates_variants() {
        let v4: IpAddr = "10.0.0.7".parse().unwrap();
        let v6: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(forwarded_for(v4), "for=10.0.0.7");
        assert_eq!(forwarded_for(v6), "for=\"[fd00::7]\"");
        assert_eq!(parse_forwarded_for(&forwarded_for(v4)), Some(v4));
        assert_eq!(parse_forwarded_for(&forwarded_for(v6)), Some(v6));
        let parse = |s: &'static str| parse_forwarded_for(&HeaderValue::from_static(s));
        assert_eq!(parse("For=\"10.0.0.7:4711\";proto=https"), Some(v4));
        assert_eq!(parse("by=1.1.1.1; for=10.0.0.7, for=10.9.9.9"), Some(v4));
        assert_eq!(parse("for=\"[fd00::7]:80\""), Some(v6));
        assert_eq!(parse("for=fd00::7"), Some(v6));
        assert_eq!(parse("for=unknown"), None);
        assert_eq!(parse("for=_hidden"), None);
        assert_eq!(parse("proto=http"), None);
    }
}
