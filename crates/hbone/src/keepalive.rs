//! HTTP/2 PING keepalive, shared by both ends.

use tokio::time::{sleep, timeout};

use crate::config::Keepalive;

/// Why the keepalive gave up on a peer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeepaliveError {
    /// No PING acknowledgement within the timeout.
    #[error("no PING acknowledgement within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection failed while pinging.
    #[error("sending a PING")]
    Ping(#[source] h2::Error),
}

/// One PING round trip. Frames are processed in order, so once the acknowledgement
/// is back every frame the peer sent before it (its SETTINGS included) has been
/// applied.
pub(crate) async fn ping_once(
    ping_pong: &mut h2::PingPong,
    limit: std::time::Duration,
) -> Result<(), KeepaliveError> {
    match timeout(limit, ping_pong.ping(h2::Ping::opaque())).await {
        Ok(Ok(_pong)) => Ok(()),
        Ok(Err(e)) => Err(KeepaliveError::Ping(e)),
        Err(_) => Err(KeepaliveError::Timeout(limit)),
    }
}

/// PINGs the peer every `interval` and returns once one is not acknowledged within
/// `timeout`. Must be polled together with the connection (the acknowledgement is
/// read by the connection's driver).
pub(crate) async fn run(mut ping_pong: h2::PingPong, config: Keepalive) -> KeepaliveError {
    loop {
        sleep(config.interval).await;
        if let Err(e) = ping_once(&mut ping_pong, config.timeout).await {
            return e;
        }
    }
}
