//! The credential sent to the controller: `authorization: Bearer <token>`.
//!
//! In Kubernetes the token is a projected ServiceAccount token, which the kubelet
//! rewrites before it expires; in local mode it is a bootstrap token file. Either way
//! the client reads it again for every connection (config stream) and every call
//! (CA), so a rotated token is picked up without a restart.

use std::path::PathBuf;

use ambit_api::{BearerToken, BearerTokenError};

/// Where the bearer token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    /// A fixed token (tests, or a token that never rotates).
    Static(BearerToken),
    /// A file holding the token (surrounding whitespace ignored), read on every use.
    File(PathBuf),
}

/// The token could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("reading the bearer token file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a usable token (empty, or characters not allowed in a
    /// header).
    #[error("the bearer token file {} does not hold a usable token", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: BearerTokenError,
    },
}

impl TokenSource {
    /// The token to send now.
    pub async fn token(&self) -> Result<BearerToken, TokenError> {
        match self {
            TokenSource::Static(token) => Ok(token.clone()),
            TokenSource::File(path) => {
                let text =
                    tokio::fs::read_to_string(path)
                        .await
                        .map_err(|source| TokenError::Read {
                            path: path.clone(),
                            source,
                        })?;
                BearerToken::new(&text).map_err(|source| TokenError::Invalid {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
}

impl From<BearerToken> for TokenSource {
    fn from(token: BearerToken) -> Self {
        TokenSource::Static(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_tokens_are_reread_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let source = TokenSource::File(path.clone());
        let err = source.token().await.unwrap_err();
        assert!(matches!(err, TokenError::Read { .. }), "{err}");
        assert!(err.to_string().contains("token"), "{err}");

        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(source.token().await.unwrap().secret(), "first");
        std::fs::write(&path, "second").unwrap();
        assert_eq!(source.token().await.unwrap().secret(), "second");
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(
            source.token().await.unwrap_err(),
            TokenError::Invalid { .. }
        ));
    }
}
