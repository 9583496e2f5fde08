//! The only owner of sockets: [`Stream`] is a client's or server's transport (plain TCP,
//! TLS over a [`TlsSocket`], a client's Unix socket, and an in-memory pipe for
//! benchmarks), and [`Conn`] adds the buffered frame reads and batched writes the rest
//! of pgrelay uses.
//!
//! Every async method says whether it is cancel safe, because the session loop selects
//! over a client and a server. The relay itself uses the `poll_*` methods directly.
//!
//! [`FdSocket`] is the takeover socket's transport: a Unix stream whose bytes carry
//! file descriptors (SCM_RIGHTS), for `pgrelay run --takeover`.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::protocol::startup::{self, StartupPacket};
use crate::protocol::{split_frame, Frame, ProtocolError};

/// A connection's read buffer starts this small, and so does what its reads ask for:
/// an idle client holds no more than this.
const SMALL_READ: usize = 256;

/// What reads ask for grows up to this much free buffer space while reads keep filling
/// what they were given, so a large result still moves in large reads.
const READ_CHUNK: usize = 32 * 1024;

/// [`Conn::shrink_idle`] gives back buffers whose allocation grew beyond this. Above
/// the sizes ordinary requests reach, so that a workload of ordinary messages never
/// shrinks and regrows them.
const SHRINK_ABOVE: usize = 16 * 1024;

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
    Tls(Box<tokio_rustls::TlsStream<TlsSocket>>),
    /// A client on a Unix-socket listener (never TLS: PostgreSQL does not offer it there
    /// either).
    Unix(UnixStream),
    /// One end of an in-memory pipe, so that a benchmark drives the real session and
    /// pool without sockets (`benches/request.rs`). Nothing that accepts or dials a
    /// real connection makes one. No larger than a `TcpStream`, so `Stream` is the size
    /// it was.
    Memory(tokio::io::DuplexStream),
}

impl Stream {
    /// The TCP socket underneath; `None` for an in-memory pipe.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(s) => Some(s),
            Stream::Tls(s) => Some(&s.get_ref().0.tcp),
            Stream::Unix(_) | Stream::Memory(_) => None,
        }
    }
}

/// The TCP socket under a TLS session. rustls asks its socket for at most 4 KiB more
/// than it holds, so a peer sending in bulk (COPY FROM a client, a large result from a
/// TLS server) would cost a system call per 4 KiB. Once a read fills all rustls asked
/// for (more was waiting), this reads [`READ_CHUNK`] at a time into a buffer of its own
/// and hands that out; as soon as the socket has less waiting it goes back to reading
/// straight into rustls's buffer and frees its own, so small messages are copied once
/// and an idle connection holds nothing here. Writes pass through (vectored, so the
/// records of one flush leave in one system call).
pub struct TlsSocket {
    tcp: TcpStream,
    /// Bytes read ahead of rustls; unallocated unless a bulk transfer is under way.
    ahead: BytesMut,
    /// Reads go through `ahead`: a read filled all it was given.
    bulk: bool,
}

impl TlsSocket {
    pub fn new(tcp: TcpStream) -> TlsSocket {
        TlsSocket {
            tcp,
            ahead: BytesMut::new(),
            bulk: false,
        }
    }

    /// Reads into `ahead`, as much as [`READ_CHUNK`]; stays in bulk mode while reads
    /// fill it. On `Pending` the buffer is freed: the transfer paused.
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.ahead.reserve(READ_CHUNK);
        let free = self.ahead.capacity() - self.ahead.len();
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.ahead);
        match read {
            Poll::Ready(Ok(n)) => {
                self.bulk = n == free;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                self.ahead = BytesMut::new();
                self.bulk = false;
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for TlsSocket {
    /// Cancel safe: bytes read ahead stay in `ahead`.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead.is_empty() {
            if !this.bulk {
                let asked = buf.remaining();
                let before = buf.filled().len();
                std::task::ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
                this.bulk = asked > 0 && buf.filled().len() - before == asked;
                return Poll::Ready(Ok(()));
            }
            if std::task::ready!(this.poll_read_ahead(cx))? == 0 {
                return Poll::Ready(Ok(()));
            }
        }
        let n = buf.remaining().min(this.ahead.len());
        buf.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
        if this.ahead.is_empty() && !this.bulk {
            this.ahead = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
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
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Memory(s) => Pin::new(s).poll_read(cx, buf),
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
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Memory(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Memory(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Memory(s) => Pin::new(s).poll_shutdown(cx),
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
    /// The free space a read asks for: it starts at [`SMALL_READ`] and doubles, up to
    /// [`READ_CHUNK`], whenever a read fills all it was given (more was waiting).
    read_chunk: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S) -> Self {
        Conn {
            io,
            rbuf: BytesMut::with_capacity(SMALL_READ),
            // Allocated by the first message pgrelay composes for this peer.
            wbuf: BytesMut::new(),
            read_chunk: SMALL_READ,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The same connection over `wrap(io)`, its buffered bytes kept: a client's plain
    /// socket, read during the TLS negotiation, becoming its [`Stream`].
    pub fn map_io<T>(self, wrap: impl FnOnce(S) -> T) -> Conn<T> {
        Conn {
            io: wrap(self.io),
            rbuf: self.rbuf,
            wbuf: self.wbuf,
            read_chunk: self.read_chunk,
        }
    }

    /// The transport, for a TLS handshake on it. Whatever was read but not consumed is
    /// dropped: the caller checks there is none.
    pub fn into_io(self) -> S {
        self.io
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
        if self.rbuf.capacity() - self.rbuf.len() < self.read_chunk / 4 {
            // Moves what is left to the front when it can, allocating only when the
            // buffer holds more than its allocation leaves room for.
            self.rbuf.reserve(self.read_chunk);
        }
        let free = self.rbuf.capacity() - self.rbuf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        if n == free && self.read_chunk < READ_CHUNK {
            self.read_chunk *= 2;
        }
        Poll::Ready(Ok(n))
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

    /// Between requests: a buffer that grew beyond [`SHRINK_ABOVE`] for a large message
    /// and is empty now goes back to its small start, so an idle connection holds
    /// little. A buffer that still holds bytes, or whose bytes are still shared, stays.
    pub fn shrink_idle(&mut self) {
        // try_reclaim moves an empty buffer's start back to its allocation's (never
        // allocating): true when that allocation is larger than SHRINK_ABOVE.
        if self.rbuf.is_empty() && self.rbuf.try_reclaim(SHRINK_ABOVE + 1) {
            self.rbuf = BytesMut::with_capacity(SMALL_READ);
            self.read_chunk = SMALL_READ;
        }
        if self.wbuf.is_empty() && self.wbuf.try_reclaim(SHRINK_ABOVE + 1) {
            self.wbuf = BytesMut::new();
        }
    }

    /// Frees an empty write buffer: for a client after its greeting, when most clients
    /// never get another message composed by pgrelay.
    pub fn free_wbuf(&mut self) {
        if self.wbuf.is_empty() {
            self.wbuf = BytesMut::new();
        }
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

/// The most descriptors one write passes ([`FdSocket::write_all_with_fds`]).
pub const MAX_PASSED_FDS: usize = 64;

/// A Unix stream socket whose bytes may carry file descriptors: the takeover socket.
/// Clones share the socket, so that one task may read while another writes.
#[derive(Clone)]
pub struct FdSocket(std::sync::Arc<UnixStream>);

impl FdSocket {
    pub fn new(socket: UnixStream) -> FdSocket {
        FdSocket(std::sync::Arc::new(socket))
    }

    /// Writes all of `bytes`, `fds` riding on the first one. Not cancel safe: a write
    /// cut short leaves part of `bytes` sent.
    pub async fn write_all_with_fds(
        &self,
        bytes: &[u8],
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<()> {
        use std::os::fd::AsFd;
        let socket = &self.0;
        let mut sent = 0;
        while sent < bytes.len() {
            let with_fds = if sent == 0 { fds } else { &[] };
            let rest = &bytes[sent..];
            sent += socket
                .async_io(tokio::io::Interest::WRITABLE, || {
                    send_some(socket.as_fd(), rest, with_fds)
                })
                .await?;
        }
        Ok(())
    }

    /// Reads what has arrived into `buf` and the descriptors that came with it onto
    /// `fds`; 0 when the other side closed. Cancel safe: nothing is taken from the
    /// socket unless it returns.
    pub async fn read_with_fds(
        &self,
        buf: &mut [u8],
        fds: &mut std::collections::VecDeque<std::os::fd::OwnedFd>,
    ) -> io::Result<usize> {
        use std::os::fd::AsFd;
        let socket = &self.0;
        socket
            .async_io(tokio::io::Interest::READABLE, || {
                recv_some(socket.as_fd(), buf, fds)
            })
            .await
    }
}

fn send_some(
    socket: std::os::fd::BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<usize> {
    let mut space =
        [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_PASSED_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one write"));
    }
    let iov = [IoSlice::new(bytes)];
    Ok(rustix::net::sendmsg(
        socket,
        &iov,
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

fn recv_some(
    socket: std::os::fd::BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut std::collections::VecDeque<std::os::fd::OwnedFd>,
) -> io::Result<usize> {
    let mut space =
        [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_PASSED_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [io::IoSliceMut::new(buf)];
    let received = rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    Ok(received.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// The in-memory and Unix variants take no room: `Stream` stays the size TCP and TLS
    /// made it.
    #[test]
    fn a_memory_pipe_is_no_larger_than_a_socket() {
        let pipe = std::mem::size_of::<tokio::io::DuplexStream>();
        assert!(pipe <= std::mem::size_of::<TcpStream>(), "{pipe} bytes");
        let unix = std::mem::size_of::<UnixStream>();
        assert!(unix <= std::mem::size_of::<TcpStream>(), "{unix} bytes");
    }

    async fn pair() -> (TlsSocket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, peer) = tokio::join!(listener.accept(), peer);
        (TlsSocket::new(accepted.unwrap().0), peer.unwrap())
    }

    /// rustls's 4 KiB reads of a bulk transfer: every byte arrives, in order, and most
    /// come out of the read-ahead buffer.
    #[tokio::test]
    async fn bulk_reads_go_through_the_buffer_and_keep_every_byte() {
        let (mut socket, mut peer) = pair().await;
        let sent: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let sent = sent.clone();
            async move {
                peer.write_all(&sent).await.unwrap();
            }
        });
        let mut got = Vec::new();
        let mut ahead_reads = 0;
        let mut chunk = [0u8; 4096];
        loop {
            let n = socket.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            ahead_reads += usize::from(socket.ahead.capacity() > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, sent);
        assert!(
            ahead_reads > 0,
            "no read went through the read-ahead buffer"
        );
    }

    /// A small message is read straight into the caller's buffer: nothing is held.
    #[tokio::test]
    async fn small_messages_hold_no_buffer() {
        let (mut socket, mut peer) = pair().await;
        for _ in 0..3 {
            peer.write_all(&[7u8; 100]).await.unwrap();
            let mut chunk = [0u8; 4096];
            assert_eq!(socket.read(&mut chunk).await.unwrap(), 100);
            assert!(!socket.bulk);
            assert_eq!(socket.ahead.capacity(), 0);
        }
    }
}
