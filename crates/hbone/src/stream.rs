//! One tunnelled TCP connection: an HTTP/2 CONNECT stream as a byte stream, and the
//! copy between it and a socket.
//!
//! Half-close maps both ways: END_STREAM on the tunnel is a FIN on the socket and a
//! FIN (read EOF) on the socket is END_STREAM on the tunnel. A reset on either side
//! aborts the copy (the other side is then dropped: RST_STREAM CANCEL on the tunnel,
//! close on the socket).

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;

use crate::client::SlotGuard;

/// First read size of a copy from a socket into a tunnel.
const INITIAL_READ: usize = 16 * 1024;
/// Read size ceiling: reads that fill the buffer double it up to this.
const MAX_READ: usize = 256 * 1024;

/// An established HBONE tunnel (the server answered `200`): `AsyncRead` +
/// `AsyncWrite` over the CONNECT stream.
///
/// `shutdown()` sends END_STREAM (the far end's socket sees FIN); reading returns EOF
/// once the peer sent END_STREAM. Dropping the stream before both directions ended
/// resets it (RST_STREAM CANCEL). To relay to a socket use
/// [`copy_bidirectional`], which avoids an extra copy per chunk.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received but not yet read.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    /// Client side: keeps the stream counted on its pooled connection.
    _slot: Option<SlotGuard>,
}

/// Bytes moved by a finished copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// From the socket into the tunnel.
    pub sent: u64,
    /// From the tunnel into the socket.
    pub received: u64,
}

/// A copy between a tunnel and a socket failed; says which of the four halves.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading from the socket failed.
    #[error("reading from the socket")]
    SocketRead(#[source] io::Error),
    /// Writing to the socket (or shutting its write side) failed.
    #[error("writing to the socket")]
    SocketWrite(#[source] io::Error),
    /// The tunnel failed while receiving (reset by the peer, connection lost).
    #[error("receiving from the HBONE stream")]
    TunnelRecv(#[source] io::Error),
    /// The tunnel failed while sending.
    #[error("sending on the HBONE stream")]
    TunnelSend(#[source] io::Error),
}

impl HboneStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<SlotGuard>) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            _slot: slot,
        }
    }

    /// The HTTP/2 stream id (for logs).
    pub fn stream_id(&self) -> u32 {
        self.send.stream_id().as_u32()
    }
}

impl fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &self.stream_id())
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.pending.is_empty() {
                let n = buf.remaining().min(this.pending.len());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(poll_recv(&mut this.recv, cx)) {
                Ok(Some(data)) => this.pending = data,
                Ok(None) => this.read_eof = true,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = ready!(poll_send_capacity(&mut this.send, cx, buf.len()))?;
        let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or(buf));
        this.send.send_data(chunk, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's driver writes buffered frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
            this.write_closed = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// Relays between `stream` and `socket` until both directions ended, propagating
/// half-closes (END_STREAM ↔ FIN). Returns the bytes moved each way.
pub async fn copy_bidirectional(
    stream: HboneStream,
    socket: &mut TcpStream,
) -> Result<Transferred, CopyError> {
    let (reader, writer) = socket.split();
    copy_bidirectional_split(stream, reader, writer).await
}

/// [`copy_bidirectional`] that also reports what was moved when it fails: for
/// byte metrics of connections that end with an error (a reset, a lost peer).
pub async fn copy_bidirectional_counted(
    stream: HboneStream,
    socket: &mut TcpStream,
) -> (Transferred, Result<(), CopyError>) {
    let (reader, writer) = socket.split();
    let mut moved = Transferred::default();
    let result = copy_counted(stream, reader, writer, &mut moved).await;
    (moved, result)
}

/// [`copy_bidirectional`] over any reader/writer pair (e.g. the halves of a Unix
/// stream or of `tokio::io::split`). `writer.shutdown()` is called when the tunnel
/// ends its sending side.
pub async fn copy_bidirectional_split<R, W>(
    stream: HboneStream,
    reader: R,
    writer: W,
) -> Result<Transferred, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut moved = Transferred::default();
    copy_counted(stream, reader, writer, &mut moved).await?;
    Ok(moved)
}

/// The copy of [`copy_bidirectional_split`], counting into `moved` as it goes so
/// that the counts survive an error.
async fn copy_counted<R, W>(
    stream: HboneStream,
    mut reader: R,
    mut writer: W,
    moved: &mut Transferred,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let HboneStream {
        mut send,
        mut recv,
        pending,
        read_eof,
        write_closed,
        _slot,
    } = stream;
    let Transferred { sent, received } = moved;

    let to_tunnel = async {
        if write_closed {
            return Ok(());
        }
        let mut size = INITIAL_READ;
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(size);
            let n = tokio::select! {
                read = reader.read_buf(&mut buf) => read.map_err(CopyError::SocketRead)?,
                reset = poll_fn(|cx| send.poll_reset(cx)) => {
                    return Err(CopyError::TunnelSend(match reset {
                        Ok(reason) => reset_to_io(reason),
                        Err(e) => h2_to_io(e),
                    }));
                }
            };
            if n == 0 {
                send.send_data(Bytes::new(), true)
                    .map_err(|e| CopyError::TunnelSend(h2_to_io(e)))?;
                return Ok(());
            }
            if n == size && size < MAX_READ {
                size *= 2;
            }
            let mut data = buf.split().freeze();
            while !data.is_empty() {
                let cap = poll_fn(|cx| poll_send_capacity(&mut send, cx, data.len()))
                    .await
                    .map_err(CopyError::TunnelSend)?;
                send.send_data(data.split_to(cap), false)
                    .map_err(|e| CopyError::TunnelSend(h2_to_io(e)))?;
                *sent += cap as u64;
            }
        }
    };

    let from_tunnel = async {
        if !pending.is_empty() {
            writer
                .write_all(&pending)
                .await
                .map_err(CopyError::SocketWrite)?;
            *received += pending.len() as u64;
        }
        if !read_eof {
            while let Some(data) = poll_fn(|cx| poll_recv_unreleased(&mut recv, cx))
                .await
                .map_err(CopyError::TunnelRecv)?
            {
                writer
                    .write_all(&data)
                    .await
                    .map_err(CopyError::SocketWrite)?;
                *received += data.len() as u64;
                // Released only once written: a slow socket holds the peer back
                // through flow control instead of buffering here.
                let _ = recv.flow_control().release_capacity(data.len());
            }
        }
        match writer.shutdown().await {
            // The socket's peer may be gone already; there is nothing left to tell it.
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(CopyError::SocketWrite(e)),
            _ => Ok(()),
        }
    };

    tokio::try_join!(to_tunnel, from_tunnel)?;
    Ok(())
}

/// Next DATA chunk with its flow-control capacity already released (the caller
/// keeps it in memory); `None` at END_STREAM.
fn poll_recv(recv: &mut RecvStream, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
    let res = ready!(poll_recv_unreleased(recv, cx));
    if let Ok(Some(data)) = &res {
        let _ = recv.flow_control().release_capacity(data.len());
    }
    Poll::Ready(res)
}

/// Next non-empty DATA chunk; the caller releases its capacity. A reset with
/// NO_ERROR (RFC 9113 §8.1: the peer needs nothing more) reads as EOF.
fn poll_recv_unreleased(
    recv: &mut RecvStream,
    cx: &mut Context<'_>,
) -> Poll<io::Result<Option<Bytes>>> {
    loop {
        match ready!(recv.poll_data(cx)) {
            Some(Ok(data)) if data.is_empty() => {}
            Some(Ok(data)) => return Poll::Ready(Ok(Some(data))),
            None => return Poll::Ready(Ok(None)),
            Some(Err(e)) if e.is_reset() && e.reason() == Some(Reason::NO_ERROR) => {
                return Poll::Ready(Ok(None));
            }
            Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
        }
    }
}

/// Waits until `send` may take data; returns how much (1..=`want`).
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    loop {
        // Check what is assigned first: poll_capacity only reports increases.
        let cap = send.capacity();
        if cap > 0 {
            return Poll::Ready(Ok(cap.min(want)));
        }
        send.reserve_capacity(want);
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            // No longer sending: reset by the peer, or the connection went away.
            None => {
                return Poll::Ready(Err(match send.poll_reset(cx) {
                    Poll::Ready(Ok(reason)) => reset_to_io(reason),
                    Poll::Ready(Err(e)) => h2_to_io(e),
                    Poll::Pending => io::ErrorKind::BrokenPipe.into(),
                }));
            }
        }
    }
}

fn reset_to_io(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("HBONE stream reset by peer ({reason})"),
    )
}

/// h2 errors as I/O errors: transport errors as they were, resets as
/// `ConnectionReset`, GOAWAY as `ConnectionAborted`.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}
