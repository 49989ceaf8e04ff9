//! Tuning for both ends: HTTP/2 windows and frame sizes, keepalive, pool and server
//! limits. Defaults follow ztunnel's (sized for throughput, not for memory).

use std::time::Duration;

/// HTTP/2 settings shared by the client and the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Http2Config {
    /// Initial per-stream receive window (SETTINGS_INITIAL_WINDOW_SIZE). A single
    /// tunnel's throughput is bounded by roughly window / RTT.
    pub stream_window: u32,
    /// Receive window of the whole connection, shared by its streams.
    pub connection_window: u32,
    /// Largest DATA frame we accept (SETTINGS_MAX_FRAME_SIZE, 16 KiB..16 MiB).
    pub max_frame_size: u32,
    /// How much data a stream may buffer for sending before writes wait for the
    /// socket (bounds memory per stream).
    pub max_send_buffer: usize,
    /// Largest header block we accept; CONNECT heads are small.
    pub max_header_list_size: u32,
}

/// HTTP/2 PING keepalive: a peer that does not answer a PING within `timeout` is
/// considered dead and its connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between PINGs (the first one too).
    pub interval: Duration,
    /// How long to wait for the PING's acknowledgement.
    pub timeout: Duration,
}

/// Client pool settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// HTTP/2 settings.
    pub http2: Http2Config,
    /// Streams per connection at most; the server's SETTINGS_MAX_CONCURRENT_STREAMS
    /// lowers it further. A saturated connection makes the pool open another.
    pub max_streams_per_connection: u32,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on one [`crate::Pool::connect`]: TCP connect, TLS and HTTP/2
    /// handshakes (when a new connection is needed) and the server's answer.
    pub connect_timeout: Duration,
    /// PING keepalive.
    pub keepalive: Keepalive,
}

/// Server settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// HTTP/2 settings.
    pub http2: Http2Config,
    /// SETTINGS_MAX_CONCURRENT_STREAMS announced to clients.
    pub max_concurrent_streams: u32,
    /// Bound on the TLS and HTTP/2 handshakes of an accepted connection.
    pub handshake_timeout: Duration,
    /// PING keepalive.
    pub keepalive: Keepalive,
}

impl Default for Http2Config {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_send_buffer: 4 * 1024 * 1024,
            max_header_list_size: 64 * 1024,
        }
    }
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(20),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            http2: Http2Config::default(),
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            keepalive: Keepalive::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http2: Http2Config::default(),
            max_concurrent_streams: 200,
            handshake_timeout: Duration::from_secs(10),
            keepalive: Keepalive::default(),
        }
    }
}

impl Http2Config {
    pub(crate) fn client_builder(&self, max_streams: u32) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_send_buffer_size(self.max_send_buffer)
            .max_header_list_size(self.max_header_list_size)
            .initial_max_send_streams(max_streams as usize)
            .enable_push(false);
        b
    }

    pub(crate) fn server_builder(&self, max_streams: u32) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_send_buffer_size(self.max_send_buffer)
            .max_header_list_size(self.max_header_list_size)
            .max_concurrent_streams(max_streams);
        b
    }
}
