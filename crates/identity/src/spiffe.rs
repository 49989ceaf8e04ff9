//! SPIFFE identities of Kubernetes service accounts.
//!
//! The only form Ambit issues or accepts is
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`; Istio's
//! AuthorizationPolicy `principals` use the same string without the scheme
//! (`<trust-domain>/ns/<namespace>/sa/<service-account>`).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";

/// A SPIFFE trust domain, e.g. `cluster.local`.
///
/// Invariant: 1..=255 characters from `a-z 0-9 . - _` (the SPIFFE spec's trust
/// domain alphabet; upper case is refused rather than folded).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A string that is not a valid trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustDomainError {
    /// Empty.
    #[error("trust domain is empty")]
    Empty,
    /// Longer than 255 characters.
    #[error("trust domain is {len} characters long, more than 255")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// A character outside `a-z 0-9 . - _`.
    #[error("trust domain {domain:?} contains {ch:?}: only a-z, 0-9, '.', '-', '_' are allowed")]
    InvalidChar {
        /// The trust domain.
        domain: String,
        /// The first offending character.
        ch: char,
    },
}

/// The SPIFFE identity of a Kubernetes service account.
///
/// Invariant: the trust domain is valid, the namespace is a DNS-1123 label and the
/// service account a DNS-1123 subdomain (what Kubernetes accepts for those names),
/// and `uri` is exactly `spiffe://<td>/ns/<ns>/sa/<sa>`.
///
/// Cheap to clone (shared): identities are copied into connection pools, policy
/// decisions and metric labels.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    uri: String,
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

/// Why a Kubernetes name (namespace, service account) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("is empty")]
    Empty,
    /// Too long.
    #[error("is {len} characters long, more than {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A character outside the allowed set.
    #[error("contains {ch:?}: only a-z, 0-9 and '-'{dot} are allowed")]
    InvalidChar {
        /// The first offending character.
        ch: char,
        /// `" and '.'"` where dots are allowed, else empty.
        dot: &'static str,
    },
    /// Starts or ends with something other than a letter or digit (per label).
    #[error("must start and end with a lower-case letter or digit")]
    BadEdge,
}

/// A string that is not a valid [`SpiffeId`]; every variant carries the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// Does not start with `spiffe://`.
    #[error("{input:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    NotSpiffe {
        /// The input.
        input: String,
    },
    /// The trust domain is invalid.
    #[error("{input:?}: invalid trust domain")]
    TrustDomain {
        /// The input.
        input: String,
        /// What is wrong with it.
        #[source]
        source: TrustDomainError,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "{input:?}: the path must be /ns/<namespace>/sa/<service-account> (no query, fragment, port or user info)"
    )]
    Path {
        /// The input.
        input: String,
    },
    /// The namespace is not a DNS-1123 label.
    #[error("{input:?}: invalid namespace {namespace:?}")]
    Namespace {
        /// The input.
        input: String,
        /// The namespace segment.
        namespace: String,
        /// What is wrong with it.
        #[source]
        source: NameError,
    },
    /// The service account is not a DNS-1123 subdomain.
    #[error("{input:?}: invalid service account {service_account:?}")]
    ServiceAccount {
        /// The input.
        input: String,
        /// The service account segment.
        service_account: String,
        /// What is wrong with it.
        #[source]
        source: NameError,
    },
}

impl TrustDomain {
    /// Validates a trust domain.
    pub fn new(domain: &str) -> Result<Self, TrustDomainError> {
        if domain.is_empty() {
            return Err(TrustDomainError::Empty);
        }
        if domain.len() > 255 {
            return Err(TrustDomainError::TooLong { len: domain.len() });
        }
        if let Some(ch) = domain
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(TrustDomainError::InvalidChar {
                domain: domain.to_owned(),
                ch,
            });
        }
        Ok(Self(domain.to_owned()))
    }

    /// The trust domain as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = TrustDomainError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

impl SpiffeId {
    /// Builds `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn new(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        validate_label(namespace).map_err(|source| SpiffeIdError::Namespace {
            input: uri.clone(),
            namespace: namespace.to_owned(),
            source,
        })?;
        validate_subdomain(service_account).map_err(|source| SpiffeIdError::ServiceAccount {
            input: uri.clone(),
            service_account: service_account.to_owned(),
            source,
        })?;
        Ok(Self(Arc::new(Parts {
            uri,
            trust_domain: trust_domain.clone(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })))
    }

    /// Parses `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::NotSpiffe {
                input: input.to_owned(),
            })?;
        Self::parse_after_scheme(input, rest)
    }

    /// Parses Istio's principal form `<trust-domain>/ns/<namespace>/sa/<service-account>`
    /// (an exact principal; patterns with `*` are not identities).
    pub fn from_principal(principal: &str) -> Result<Self, SpiffeIdError> {
        Self::parse_after_scheme(principal, principal)
    }

    fn parse_after_scheme(input: &str, rest: &str) -> Result<Self, SpiffeIdError> {
        let path_err = || SpiffeIdError::Path {
            input: input.to_owned(),
        };
        let (authority, path) = rest.split_once('/').ok_or_else(path_err)?;
        let trust_domain =
            TrustDomain::new(authority).map_err(|source| SpiffeIdError::TrustDomain {
                input: input.to_owned(),
                source,
            })?;
        let mut segments = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(path_err());
        };
        // `?`/`#` would make this a different URI than the one compared byte for byte.
        if [namespace, service_account]
            .iter()
            .any(|s| s.contains(['?', '#']))
        {
            return Err(path_err());
        }
        Self::new(&trust_domain, namespace, service_account).map_err(|e| match e {
            // Report the caller's input, not the re-assembled URI.
            SpiffeIdError::Namespace {
                namespace, source, ..
            } => SpiffeIdError::Namespace {
                input: input.to_owned(),
                namespace,
                source,
            },
            SpiffeIdError::ServiceAccount {
                service_account,
                source,
                ..
            } => SpiffeIdError::ServiceAccount {
                input: input.to_owned(),
                service_account,
                source,
            },
            other => other,
        })
    }

    /// The URI, `spiffe://…`.
    pub fn as_str(&self) -> &str {
        &self.0.uri
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.0.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    /// The Kubernetes service account name.
    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// Istio's principal form, `<trust-domain>/ns/<namespace>/sa/<service-account>`,
    /// which AuthorizationPolicy `principals` match against.
    pub fn principal(&self) -> &str {
        &self.0.uri[SCHEME.len()..]
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.0.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.uri)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// DNS-1123 label: what Kubernetes accepts as a namespace name.
fn validate_label(name: &str) -> Result<(), NameError> {
    check_length(name, 63)?;
    check_label(name, "")
}

/// DNS-1123 subdomain: what Kubernetes accepts as a service account name.
fn validate_subdomain(name: &str) -> Result<(), NameError> {
    check_length(name, 253)?;
    if let Some(ch) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '.'))
    {
        return Err(NameError::InvalidChar {
            ch,
            dot: " and '.'",
        });
    }
    name.split('.')
        .try_for_each(|label| check_label(label, " and '.'"))
}

fn check_length(name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > max {
        return Err(NameError::TooLong {
            len: name.len(),
            max,
        });
    }
    Ok(())
}

fn check_label(label: &str, dot: &'static str) -> Result<(), NameError> {
    if let Some(ch) = label
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-'))
    {
        return Err(NameError::InvalidChar { ch, dot });
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(label.chars().next()) || !alnum(label.chars().last()) {
        return Err(NameError::BadEdge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/production/sa/checkout").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "production");
        assert_eq!(id.service_account(), "checkout");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/production/sa/checkout"
        );
        assert_eq!(id.principal(), "cluster.local/ns/production/sa/checkout");
        assert_eq!(SpiffeId::from_principal(id.principal()).unwrap(), id);
        let built = SpiffeId::new(
            &TrustDomain::new("cluster.local").unwrap(),
            "production",
            "checkout",
        )
        .unwrap();
        assert_eq!(built, id);
        // Service accounts may contain dots (DNS-1123 subdomain).
        assert!(SpiffeId::parse("spiffe://td/ns/a/sa/b.c-d").is_ok());
    }

    #[test]
    fn serde_is_the_uri_string() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/a/sa/b\"");
        let back: SpiffeId = serde_json::from_str(&json).unwrap();
        assert_eq!(back, id);
        let err = serde_json::from_str::<SpiffeId>("\"http://x/ns/a/sa/b\"").unwrap_err();
        assert!(err.to_string().contains("spiffe://"), "{err}");
    }

    #[test]
    fn parse_errors_name_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("cluster.local/ns/a/sa/b", "must start with \"spiffe://\""),
            ("SPIFFE://cluster.local/ns/a/sa/b", "must start with"),
            ("spiffe://", "path must be"),
            ("spiffe://cluster.local", "path must be"),
            ("spiffe:///ns/a/sa/b", "invalid trust domain"),
            ("spiffe://Cluster.local/ns/a/sa/b", "invalid trust domain"),
            ("spiffe://td:8080/ns/a/sa/b", "invalid trust domain"),
            ("spiffe://user@td/ns/a/sa/b", "invalid trust domain"),
            ("spiffe://td/ns/a", "path must be"),
            ("spiffe://td/ns/a/sa/b/extra", "path must be"),
            ("spiffe://td/ns/a/sa/b/", "path must be"),
            ("spiffe://td/namespace/a/sa/b", "path must be"),
            ("spiffe://td/ns/a/sa/b?x=1", "path must be"),
            ("spiffe://td/ns/a/sa/b#frag", "path must be"),
            ("spiffe://td/ns//sa/b", "invalid namespace \"\": is empty"),
            (
                "spiffe://td/ns/Prod/sa/b",
                "namespace \"Prod\": contains 'P'",
            ),
            ("spiffe://td/ns/a.b/sa/b", "namespace \"a.b\": contains '.'"),
            ("spiffe://td/ns/-a/sa/b", "must start and end"),
            ("spiffe://td/ns/a/sa/", "service account \"\": is empty"),
            ("spiffe://td/ns/a/sa/b..c", "must start and end"),
            (
                "spiffe://td/ns/a/sa/B",
                "service account \"B\": contains 'B'",
            ),
            ("spiffe://td/ns/a/sa/..", "must start and end"),
        ];
        for (input, want) in cases {
            let err = SpiffeId::parse(input).unwrap_err();
            let msg = error_chain(&err);
            assert!(msg.contains(want), "{input}: {msg:?} lacks {want:?}");
        }
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(64));
        let msg = error_chain(&SpiffeId::parse(&long).unwrap_err());
        assert!(msg.contains("more than 63"), "{msg}");
    }

    #[test]
    fn trust_domain_validation() {
        assert!(TrustDomain::new("cluster.local").is_ok());
        assert!(TrustDomain::new("my_td-1").is_ok());
        assert_eq!(TrustDomain::new(""), Err(TrustDomainError::Empty));
        assert!(matches!(
            TrustDomain::new("a/b"),
            Err(TrustDomainError::InvalidChar { ch: '/', .. })
        ));
        assert!(matches!(
            TrustDomain::new(&"a".repeat(256)),
            Err(TrustDomainError::TooLong { len: 256 })
        ));
    }

    fn error_chain(err: &dyn std::error::Error) -> String {
        let mut msg = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        msg
    }
}
