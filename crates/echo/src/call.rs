//! One HTTP request, for scripts and tests (`ambit-echo call URL`).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Version};
use http_body_util::BodyExt as _;

use crate::client::{ClientError, Connection, RequestSpec};

/// What to send and how long to wait for the whole answer.
#[derive(Clone, Debug)]
pub struct CallConfig {
    pub request: RequestSpec,
    /// Covers connecting, sending and reading the whole response body.
    pub timeout: Duration,
}

/// A complete response.
#[derive(Clone, Debug)]
pub struct CallResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends one request on a fresh connection and reads the whole response. Any status is
/// a success here; only a missing or incomplete response is an error.
pub async fn run(config: CallConfig) -> Result<CallResponse, ClientError> {
    let spec = &config.request;
    let exchange = async {
        let mut conn = Connection::connect(spec.connect_addr(), spec.protocol()).await?;
        let resp = conn.send(spec.request()).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(ClientError::Body)?.to_bytes();
        Ok(CallResponse {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(config.timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout(config.timeout))?
}
