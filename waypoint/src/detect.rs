//! Protocol detection on a tunnel's first bytes: the HTTP/2 connection preface, or an
//! HTTP/1.x request line; anything else is TCP. The bytes read are kept and replayed
//! ([`Prefixed`]) to whatever serves the tunnel.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods an HTTP/1.x request line may start with.
const METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// A request line longer than this is still taken for HTTP once method and target
/// look right (very long URLs); no client protocol sends such a prefix by accident.
const MAX_SNIFF: usize = 16 * 1024;

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// HTTP/1.x or HTTP/2 (prior knowledge).
    Http,
    /// Anything else, also a client that sent nothing in time (server-first
    /// protocols) or closed.
    Tcp,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Http,
    Tcp,
    NeedMore,
}

/// Reads from `stream` until the first bytes decide, the client has been silent for
/// `timeout`, or it closed. Returns the decision and every byte read.
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match classify(&buf) {
            Verdict::Http => return Ok((Detected::Http, buf.freeze())),
            Verdict::Tcp => return Ok((Detected::Tcp, buf.freeze())),
            Verdict::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) | Ok(Ok(0)) => return Ok((Detected::Tcp, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) {
        return Verdict::NeedMore;
    }
    if buf.starts_with(H2_PREFACE) {
        return Verdict::Http;
    }
    // `METHOD SP request-target SP HTTP/1.x CRLF`.
    let Some(sp) = buf.iter().position(|&b| b == b' ') else {
        return if METHODS.iter().any(|m| m.starts_with(buf)) {
            Verdict::NeedMore
        } else {
            Verdict::Tcp
        };
    };
    if !METHODS.contains(&&buf[..sp]) {
        return Verdict::Tcp;
    }
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= MAX_SNIFF {
            return Verdict::Http;
        }
        // Controls or a second line break before CRLF: not a request line.
        return if buf[sp..].iter().any(|&b| b == b'\n' || b == 0) {
            Verdict::Tcp
        } else {
            Verdict::NeedMore
        };
    };
    let line = &buf[..eol];
    if line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0") {
        Verdict::Http
    } else {
        Verdict::Tcp
    }
}

/// A stream that first yields `prefix` (bytes already read from it), then reads on.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    /// Replays `prefix` before reading `inner`.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    /// The unread prefix and the stream.
    pub fn into_parts(self) -> (Bytes, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_and_preface_are_http() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a\r\n"), Verdict::Http);
        assert_eq!(classify(b"POST /x?y HTTP/1.0\r\n"), Verdict::Http);
        assert_eq!(classify(H2_PREFACE), Verdict::Http);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), Verdict::NeedMore);
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(b"GET /long/path"), Verdict::NeedMore);
    }

    #[test]
    fn other_bytes_are_tcp() {
        assert_eq!(classify(b"hello\n"), Verdict::Tcp);
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Verdict::Tcp);
        assert_eq!(classify(b"GET / SSH-2.0\r\n"), Verdict::Tcp);
        assert_eq!(classify(b"GET /\nx"), Verdict::Tcp);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Verdict::Tcp);
        assert_eq!(classify(b"PRX"), Verdict::Tcp);
    }

    #[tokio::test]
    async fn silence_is_tcp_and_bytes_are_replayed() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let (d, prefix) = detect(&mut server, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!((d, prefix.len()), (Detected::Tcp, 0));

        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let (d, prefix) = detect(&mut server, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d, Detected::Http);
        let mut replay = Prefixed::new(prefix, server);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"rest")
            .await
            .unwrap();
        drop(client);
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nrest");
    }
}
