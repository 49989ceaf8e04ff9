//! What every request through the waypoint carries: who sent it, where it was
//! addressed, and the configuration it is served with.
//!
//! The inbound side puts one `Arc<`[`RequestContext`]`>` into each request's
//! extensions; the layers below the router (authorization, telemetry, the upstream)
//! read it from there. Retries copy extensions, so every try of one request shares the
//! same context — that is how the upstream knows which endpoints earlier tries used.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use ambit_hbone::Traceparent;
use ambit_identity::SpiffeId;

use crate::snapshot::{Snapshot, Target};

/// The client side of one tunnel, verified by the HBONE server.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    /// The source workload's identity, from its verified certificate.
    pub peer: SpiffeId,
    /// The HBONE connection's source address (the source's node or pod).
    pub peer_addr: SocketAddr,
    /// The original client's IP: `Forwarded: for=` of the CONNECT when present,
    /// else the HBONE connection's source.
    pub client_ip: IpAddr,
    /// The original destination (the CONNECT `:authority`).
    pub target: SocketAddr,
    /// W3C trace context of the CONNECT, when present.
    pub traceparent: Option<Traceparent>,
}

/// Per request: the tunnel's client, the resolved target and the configuration in
/// force when the request arrived.
#[derive(Debug)]
pub struct RequestContext {
    /// The configuration this request is served with.
    pub snapshot: Arc<Snapshot>,
    /// The tunnel's client.
    pub client: Arc<ClientInfo>,
    /// What the tunnel was addressed to.
    pub target: Target,
    /// Endpoints earlier tries of this request went to, oldest first.
    attempted: Mutex<Vec<SocketAddr>>,
}

impl RequestContext {
    /// A context for a new request.
    pub fn new(snapshot: Arc<Snapshot>, client: Arc<ClientInfo>, target: Target) -> Self {
        Self {
            snapshot,
            client,
            target,
            attempted: Mutex::new(Vec::new()),
        }
    }

    /// Records that a try went to `endpoint`.
    pub fn record_attempt(&self, endpoint: SocketAddr) {
        self.attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(endpoint);
    }

    /// Whether an earlier try of this request went to `endpoint`.
    pub fn attempted(&self, endpoint: SocketAddr) -> bool {
        self.attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&endpoint)
    }

    /// The endpoints tried so far, oldest first.
    pub fn attempts(&self) -> Vec<SocketAddr> {
        self.attempted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
