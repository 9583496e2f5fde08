//! The only owner of sockets: [`Stream`] is a client's or server's transport (plain TCP
//! now, TLS beside it), and [`Conn`] adds the buffered frame reads and batched writes
//! the rest of pgrelay uses.
//!
//! Every async method says whether it is cancel safe, because the session loop selects
//! over a client and a server. The relay itself uses the `poll_*` methods directly.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{split_frame, Frame, ProtocolError};

/// Reads ask for at least this much free buffer space, so a large result moves in
/// large reads.
const READ_CHUNK: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("peer closed the connection")]
    Closed,
}

/// A client's or server's transport.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A transport with a read buffer (frames are split off it without copying) and a
/// write buffer for the messages pgrelay composes itself.
pub struct Conn<S = Stream> {
    io: S,
    /// Bytes read but not yet consumed; the relay forwards straight out of it.
    rbuf: BytesMut,
    /// Messages pgrelay built, written out by [`Conn::flush`].
    wbuf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S) -> Self {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn rbuf(&mut self) -> &mut BytesMut {
        &mut self.rbuf
    }

    pub fn rbuf_len(&self) -> usize {
        self.rbuf.len()
    }

    pub fn wbuf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// The read and write buffers at once: answering what was read, in place.
    pub fn buffers(&mut self) -> (&mut BytesMut, &mut BytesMut) {
        (&mut self.rbuf, &mut self.wbuf)
    }

    /// Polls one read into the read buffer. `Ready(Ok(0))` is end of stream.
    pub fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf)
    }

    /// Reads more bytes into the read buffer. Cancel safe: bytes read stay buffered.
    pub async fn read_more(&mut self) -> Result<usize, StreamError> {
        let n = std::future::poll_fn(|cx| self.poll_read_more(cx)).await?;
        if n == 0 {
            return Err(StreamError::Closed);
        }
        Ok(n)
    }

    /// Reads one complete tagged message. Cancel safe.
    pub async fn read_frame(&mut self, max_len: usize) -> Result<Frame, StreamError> {
        loop {
            if let Some(frame) = split_frame(&mut self.rbuf, max_len)? {
                return Ok(frame);
            }
            self.read_more().await?;
        }
    }

    /// Reads one untagged startup-phase packet. Cancel safe.
    pub async fn read_startup(&mut self) -> Result<StartupPacket, StreamError> {
        loop {
            if let Some(packet) = startup::decode(&mut self.rbuf)? {
                return Ok(packet);
            }
            self.read_more().await?;
        }
    }

    pub fn poll_write(&mut self, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, bytes)
    }

    /// Polls one write of the write buffer's front, consuming what was written.
    pub fn poll_write_wbuf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf))?;
        self.wbuf.advance(n);
        Poll::Ready(Ok(n))
    }

    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Writes `bytes` and flushes. Not cancel safe.
    pub async fn write_all(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Writes out the write buffer. Not cancel safe.
    pub async fn flush(&mut self) -> Result<(), StreamError> {
        while self.wbuf.has_remaining() {
            let n = self.io.write(&self.wbuf).await?;
            if n == 0 {
                return Err(StreamError::Closed);
            }
            self.wbuf.advance(n);
        }
        self.io.flush().await?;
        Ok(())
    }

    /// For a connection that should be silent (an idle pooled server): true when it
    /// has neither sent anything nor closed. Never blocks.
    pub fn is_quiet(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        matches!(self.poll_read_more(&mut cx), Poll::Pending)
    }

    /// Shuts the write side down. Not cancel safe; errors are of no interest here.
    pub async fn shutdown(&mut self) {
        let _ = self.io.shutdown().await;
    }
}
