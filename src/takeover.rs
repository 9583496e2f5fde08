//! `pgrelay run --takeover`: a new process (an upgraded binary, a changed config)
//! takes over from the running one without dropping a client.
//!
//! The running process waits on `takeover_socket` (a Unix socket only its own user may
//! use). The new one connects and says hello; the old one offers its listening sockets
//! (passed as file descriptors) and the cancel keys its clients hold; the new one
//! starts on those sockets, reserves those keys, and says it is ready. From then on the
//! new process accepts every connection, and the old one stops accepting and hands
//! over each client that can move as it reaches a transaction boundary: its socket and
//! its session ([`SessionState`]). Clients in a transaction finish it first; those that
//! cannot move (TLS, session mode) finish on the old process as in a shutdown. The old
//! process says it is done and exits when it has no client left.
//!
//! Each message is a frame: its JSON length (u32), how many descriptors travel with it
//! (u16), the JSON. Descriptors ride on the frame's first byte (SCM_RIGHTS) and are
//! matched to frames in order.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};

use crate::pool::server::ServerState;
use crate::session::handover::SessionState;
use crate::stream::{FdSocket, MAX_PASSED_FDS};

/// The version of the exchange; both sides must speak the same.
const VERSION: u32 = 1;

/// A frame's header: its JSON length (u32) and how many descriptors ride on it (u16).
const HEADER: usize = 6;

/// A frame's JSON may not be longer: a session's state with its statements fits.
const MAX_FRAME: usize = 64 << 20;

/// How long the new process may take to start on the sockets it was offered.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a takeover did not happen or broke off.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("no pgrelay to take over at {}: {source}", path.display())]
    NoPredecessor { path: PathBuf, source: io::Error },
    #[error("takeover refused: {0}")]
    Refused(String),
    #[error("takeover socket: {0}")]
    Io(#[from] io::Error),
    #[error("takeover message: {0}")]
    Message(#[from] serde_json::Error),
    #[error("takeover frame of {len} bytes and {fds} descriptors is over the limits")]
    TooLarge { len: usize, fds: usize },
    /// The other side sent something else than the exchange expects, or closed.
    #[error("takeover: {0}")]
    Unexpected(&'static str),
    #[error("takeover: {0} in time")]
    TimedOut(&'static str),
}

/// A listening socket handed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Listener {
    /// A `listen` address as the config writes it (port 0 too).
    Tcp(SocketAddr),
    /// A `unix:` listen path.
    Unix(PathBuf),
    /// `metrics_listen`.
    Metrics(SocketAddr),
}

/// A cancel key a client of the old process holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub pid: i32,
    pub secret: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Message {
    Hello {
        version: u32,
        pid: u32,
    },
    /// Its descriptors: one per listener, in order.
    Offer {
        instance_id: u16,
        listeners: Vec<Listener>,
        keys: Vec<Key>,
    },
    Refused {
        reason: String,
    },
    Ready,
    /// Its descriptor: the client's socket.
    Client(Box<SessionState>),
    Done {
        left: usize,
    },
    /// Its descriptor: an idle server's socket.
    Server(Box<ServerState>),
    /// From the successor: a CancelRequest for a client still on the old process.
    Cancel {
        pid: i32,
        secret: Vec<u8>,
    },
}

/// One end of the takeover socket: frames in and out, descriptors with them.
struct Channel {
    /// Shared with a [`Sender`]: one task may read while another writes.
    socket: FdSocket,
    rbuf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

/// The writing side of a [`Channel`], for another task.
struct Sender(FdSocket);

impl Sender {
    async fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), TakeoverError> {
        send_frame(&self.0, message, fds).await
    }
}

/// Writes `message` as a frame, `fds` with it. Not cancel safe: a frame cut short
/// leaves the channel unusable.
async fn send_frame(
    socket: &FdSocket,
    message: &Message,
    fds: &[BorrowedFd<'_>],
) -> Result<(), TakeoverError> {
    let json = serde_json::to_vec(message)?;
    let mut frame = Vec::with_capacity(HEADER + json.len());
    frame.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_be_bytes());
    frame.extend_from_slice(&u16::try_from(fds.len()).unwrap_or(u16::MAX).to_be_bytes());
    frame.extend_from_slice(&json);
    Ok(socket.write_all_with_fds(&frame, fds).await?)
}

impl Channel {
    fn new(stream: UnixStream) -> Channel {
        Channel {
            socket: FdSocket::new(stream),
            rbuf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    fn sender(&self) -> Sender {
        Sender(self.socket.clone())
    }

    async fn send(
        &mut self,
        message: &Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TakeoverError> {
        send_frame(&self.socket, message, fds).await
    }

    /// The next message and its descriptors; `None` when the other side closed.
    /// Cancel safe: what was read stays buffered for the next call.
    async fn recv(&mut self) -> Result<Option<(Message, Vec<OwnedFd>)>, TakeoverError> {
        loop {
            if let Some(header) = self.rbuf.get(..HEADER) {
                let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
                let nfds = usize::from(u16::from_be_bytes([header[4], header[5]]));
                if len > MAX_FRAME || nfds > MAX_PASSED_FDS {
                    return Err(TakeoverError::TooLarge { len, fds: nfds });
                }
                if self.rbuf.len() >= HEADER + len && self.fds.len() >= nfds {
                    let message = serde_json::from_slice(&self.rbuf[HEADER..HEADER + len])?;
                    self.rbuf.drain(..HEADER + len);
                    let fds = self.fds.drain(..nfds).collect();
                    return Ok(Some((message, fds)));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = self.socket.read_with_fds(&mut chunk, &mut self.fds).await?;
            if read == 0 {
                return Ok(None);
            }
            self.rbuf.extend_from_slice(&chunk[..read]);
        }
    }
}

/// What the running process offers a successor.
pub struct Offer {
    pub instance_id: u16,
    /// Each listener and its socket.
    pub listeners: Vec<(Listener, OwnedFd)>,
    pub keys: Vec<Key>,
}

/// Binds `path` for successors: a stale socket file there is replaced, only this
/// user may connect.
pub fn listen(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A successor that took the offer and is serving: the running process hands it
/// its clients.
pub struct Successor {
    channel: Channel,
    pub pid: u32,
}

/// Waits for a process to take over: accepts on `listener`, offers what `offer`
/// gives, and returns once the successor says it is ready. A successor that fails
/// or goes away before that changes nothing here.
pub async fn next_successor(
    listener: &UnixListener,
    offer: impl Fn() -> io::Result<Offer>,
) -> Successor {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!(%err, "takeover socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match negotiate(stream, &offer).await {
            Ok(successor) => return successor,
            Err(err) => tracing::warn!(%err, "takeover did not happen; this process goes on"),
        }
    }
}

async fn negotiate(
    stream: UnixStream,
    offer: &impl Fn() -> io::Result<Offer>,
) -> Result<Successor, TakeoverError> {
    let own = nix::unistd::geteuid().as_raw();
    let peer = stream.peer_cred()?;
    let mut channel = Channel::new(stream);
    if peer.uid() != own {
        let reason = format!("uid {} is not this process's user", peer.uid());
        return Err(refuse(&mut channel, reason).await);
    }
    let pid = match channel.recv().await? {
        Some((Message::Hello { version, pid }, _)) if version == VERSION => pid,
        Some((Message::Hello { version, .. }, _)) => {
            let reason = format!("takeover version {version} is not this process's {VERSION}");
            return Err(refuse(&mut channel, reason).await);
        }
        _ => return Err(TakeoverError::Unexpected("the new process sent no hello")),
    };
    tracing::info!(pid, "a new process asks to take over");
    let Offer {
        instance_id,
        listeners,
        keys,
    } = offer()?;
    let (listeners, fds): (Vec<_>, Vec<_>) = listeners.into_iter().unzip();
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let message = Message::Offer {
        instance_id,
        listeners,
        keys,
    };
    channel.send(&message, &borrowed).await?;
    drop(fds);
    match tokio::time::timeout(READY_TIMEOUT, channel.recv()).await {
        Ok(Ok(Some((Message::Ready, _)))) => Ok(Successor { channel, pid }),
        Ok(Ok(_)) => Err(TakeoverError::Unexpected(
            "the new process went away before it was ready",
        )),
        Ok(Err(err)) => Err(err),
        Err(_) => Err(TakeoverError::TimedOut(
            "the new process did not say it was ready",
        )),
    }
}

/// Tells a would-be successor why it is refused; the error to log here.
async fn refuse(channel: &mut Channel, reason: String) -> TakeoverError {
    let refused = Message::Refused {
        reason: reason.clone(),
    };
    if let Err(err) = channel.send(&refused, &[]).await {
        tracing::debug!(%err, "could not tell a would-be successor why it is refused");
    }
    TakeoverError::Refused(reason)
}

impl Successor {
    /// Hands a client over: its socket and its session.
    pub async fn send_client(
        &mut self,
        fd: OwnedFd,
        state: SessionState,
    ) -> Result<(), TakeoverError> {
        let message = Message::Client(Box::new(state));
        self.channel.send(&message, &[fd.as_fd()]).await
    }

    /// Hands an idle server over: its socket and its state.
    pub async fn send_server(
        &mut self,
        fd: OwnedFd,
        state: ServerState,
    ) -> Result<(), TakeoverError> {
        let message = Message::Server(Box::new(state));
        self.channel.send(&message, &[fd.as_fd()]).await
    }

    /// Says this process is done handing over (`left` clients ended here).
    pub async fn done(mut self, left: usize) -> Result<(), TakeoverError> {
        self.channel.send(&Message::Done { left }, &[]).await
    }

    /// The next cancel the successor sends for a client still here, `(pid, secret)`;
    /// `None` once it has gone away. Cancel safe.
    pub async fn next_cancel(&mut self) -> Option<(i32, Vec<u8>)> {
        loop {
            match self.channel.recv().await {
                Ok(Some((Message::Cancel { pid, secret }, _))) => return Some((pid, secret)),
                Ok(Some((other, _))) => tracing::warn!(?other, "unexpected takeover message"),
                Ok(None) => return None,
                Err(err) => {
                    tracing::warn!(%err, "takeover socket failed");
                    return None;
                }
            }
        }
    }
}

/// The running process, as the successor sees it.
pub struct Predecessor {
    channel: Channel,
    pub instance_id: u16,
    pub listeners: Vec<(Listener, OwnedFd)>,
    pub keys: Vec<Key>,
}

/// What a predecessor sends after the successor said it is ready.
pub enum Handed {
    Client(Box<SessionState>, OwnedFd),
    Server(Box<ServerState>, OwnedFd),
    /// It is done: `left` clients ended there.
    Done {
        left: usize,
    },
}

impl Predecessor {
    /// Connects to the running process at `path` and takes its offer.
    pub async fn connect(path: &Path) -> Result<Predecessor, TakeoverError> {
        let stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| TakeoverError::NoPredecessor {
                    path: path.to_owned(),
                    source,
                })?;
        let mut channel = Channel::new(stream);
        let hello = Message::Hello {
            version: VERSION,
            pid: std::process::id(),
        };
        channel.send(&hello, &[]).await?;
        let offer = tokio::time::timeout(READY_TIMEOUT, channel.recv())
            .await
            .map_err(|_| {
                TakeoverError::TimedOut(
                    "the running pgrelay made no offer (is another takeover under way?)",
                )
            })?;
        match offer? {
            Some((
                Message::Offer {
                    instance_id,
                    listeners,
                    keys,
                },
                fds,
            )) if fds.len() == listeners.len() => Ok(Predecessor {
                channel,
                instance_id,
                listeners: listeners.into_iter().zip(fds).collect(),
                keys,
            }),
            Some((Message::Refused { reason }, _)) => Err(TakeoverError::Refused(reason)),
            _ => Err(TakeoverError::Unexpected(
                "the running pgrelay sent no offer",
            )),
        }
    }

    /// Tells the running process this one serves its sockets now.
    pub async fn ready(&mut self) -> Result<(), TakeoverError> {
        self.channel.send(&Message::Ready, &[]).await
    }

    /// Sends the running process the cancels `cancels` gives (for its clients not
    /// handed over yet), until it or `cancels` ends.
    pub fn forward_cancels(
        &self,
        mut cancels: tokio::sync::mpsc::UnboundedReceiver<(i32, Box<[u8]>)>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let sender = self.channel.sender();
        async move {
            while let Some((pid, secret)) = cancels.recv().await {
                let message = Message::Cancel {
                    pid,
                    secret: secret.into_vec(),
                };
                if let Err(err) = sender.send(&message, &[]).await {
                    tracing::debug!(%err, "the previous process is gone: a cancel for it is dropped");
                    return;
                }
            }
        }
    }

    /// The next client handed over, or the end; `None` when the running process
    /// went away without saying it was done.
    pub async fn next(&mut self) -> Result<Option<Handed>, TakeoverError> {
        loop {
            return Ok(match self.channel.recv().await? {
                None => None,
                Some((Message::Client(state), fds)) => {
                    let Some(fd) = fds.into_iter().next() else {
                        tracing::warn!("a client was handed over without its socket");
                        continue;
                    };
                    Some(Handed::Client(state, fd))
                }
                Some((Message::Server(state), fds)) => {
                    let Some(fd) = fds.into_iter().next() else {
                        tracing::warn!("a server was handed over without its socket");
                        continue;
                    };
                    Some(Handed::Server(state, fd))
                }
                Some((Message::Done { left }, _)) => Some(Handed::Done { left }),
                Some((other, _)) => {
                    tracing::warn!(?other, "unexpected takeover message");
                    continue;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_carry_their_descriptors_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        let file = tempfile::tempfile().unwrap();
        let other = tempfile::tempfile().unwrap();
        a.send(&Message::Ready, &[file.as_fd()]).await.unwrap();
        a.send(&Message::Done { left: 3 }, &[]).await.unwrap();
        a.send(&Message::Ready, &[other.as_fd(), file.as_fd()])
            .await
            .unwrap();
        let (first, fds) = b.recv().await.unwrap().unwrap();
        assert!(matches!(first, Message::Ready));
        assert_eq!(fds.len(), 1);
        let (second, fds) = b.recv().await.unwrap().unwrap();
        assert!(matches!(second, Message::Done { left: 3 }));
        assert!(fds.is_empty());
        let (_, fds) = b.recv().await.unwrap().unwrap();
        assert_eq!(fds.len(), 2);
        // The received descriptors are the same files (their inode).
        use std::os::unix::fs::MetadataExt;
        let ino = |fd: OwnedFd| std::fs::File::from(fd).metadata().unwrap().ino();
        let mut fds = fds.into_iter();
        assert_eq!(ino(fds.next().unwrap()), other.metadata().unwrap().ino());
        assert_eq!(ino(fds.next().unwrap()), file.metadata().unwrap().ino());
        drop(a);
        assert!(b.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_large_frame_arrives_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        let reason = "x".repeat(1 << 20);
        let sending = tokio::spawn(async move {
            a.send(&Message::Refused { reason }, &[]).await.unwrap();
        });
        let (message, _) = b.recv().await.unwrap().unwrap();
        sending.await.unwrap();
        assert!(matches!(message, Message::Refused { reason } if reason.len() == 1 << 20));
    }
}
