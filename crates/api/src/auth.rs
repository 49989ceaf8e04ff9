//! The credential both services expect: gRPC metadata `authorization: Bearer <token>`.
//!
//! Kubernetes mode: a projected ServiceAccount token (the controller runs a
//! TokenReview). Local mode: a per-node / per-waypoint bootstrap token. Either way it
//! is a secret: [`BearerToken`] never prints it.

use std::fmt;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;

/// The metadata key carrying the credential.
pub const AUTHORIZATION: &str = "authorization";

const SCHEME: &str = "Bearer ";

/// A bearer token, kept as the ready-made metadata value (marked sensitive so that
/// http/tonic debug output does not show it either).
///
/// As a tonic [`Interceptor`] it adds itself to every request:
/// `CertificateServiceClient::with_interceptor(channel, token)`.
#[derive(Clone)]
pub struct BearerToken {
    value: AsciiMetadataValue,
}

/// Why a credential could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum BearerTokenError {
    /// The token is empty.
    #[error("bearer token is empty")]
    Empty,
    /// The token has characters not allowed in a header value.
    #[error("bearer token is not a valid header value")]
    InvalidCharacters(#[source] tonic::metadata::errors::InvalidMetadataValue),
    /// No `authorization` metadata.
    #[error("no `authorization` metadata")]
    Missing,
    /// `authorization` is present but not `Bearer <token>`.
    #[error("`authorization` metadata is not `Bearer <token>`")]
    NotBearer,
}

impl BearerToken {
    /// Wraps a token (surrounding whitespace, e.g. a trailing newline from a token
    /// file, is trimmed).
    pub fn new(token: &str) -> Result<Self, BearerTokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(BearerTokenError::Empty);
        }
        let mut value: AsciiMetadataValue = format!("{SCHEME}{token}")
            .parse()
            .map_err(BearerTokenError::InvalidCharacters)?;
        value.set_sensitive(true);
        Ok(Self { value })
    }

    /// Reads the token a caller sent (server side).
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Self, BearerTokenError> {
        let raw = metadata
            .get(AUTHORIZATION)
            .ok_or(BearerTokenError::Missing)?
            .to_str()
            .map_err(|_| BearerTokenError::NotBearer)?;
        let token = raw
            .strip_prefix(SCHEME)
            .or_else(|| raw.strip_prefix("bearer "))
            .ok_or(BearerTokenError::NotBearer)?;
        Self::new(token)
    }

    /// The token itself, to check against the expected one or send to TokenReview.
    /// Compare it in constant time.
    pub fn secret(&self) -> &str {
        // Infallible in practice: the value was built from a `&str` with the ASCII
        // prefix, so it is valid ASCII and starts with `Bearer `.
        self.value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix(SCHEME))
            .unwrap_or_default()
    }

    /// Adds `authorization: Bearer <token>` to outgoing metadata.
    pub fn apply(&self, metadata: &mut MetadataMap) {
        metadata.insert(AUTHORIZATION, self.value.clone());
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        self.apply(request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_metadata_and_never_prints() {
        let token = BearerToken::new("s3cr3t\n").unwrap();
        let mut md = MetadataMap::new();
        token.apply(&mut md);
        let back = BearerToken::from_metadata(&md).unwrap();
        assert_eq!(back.secret(), "s3cr3t");
        assert!(!format!("{token:?}").contains("s3cr3t"));
        assert!(!format!("{md:?}").contains("s3cr3t"));
    }

    #[test]
    fn missing_or_wrong_scheme_is_refused() {
        let md = MetadataMap::new();
        assert!(matches!(
            BearerToken::from_metadata(&md),
            Err(BearerTokenError::Missing)
        ));
        let mut md = MetadataMap::new();
        md.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(matches!(
            BearerToken::from_metadata(&md),
            Err(BearerTokenError::NotBearer)
        ));
        assert!(matches!(
            BearerToken::new("  "),
            Err(BearerTokenError::Empty)
        ));
    }
}
