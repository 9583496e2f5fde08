//! The accept loop and a running instance. [`Pgrelay::start`] probes the cluster once,
//! binds every `listen` address, and spawns the accept loops, the health loop and the
//! pool maintenance loop; each client gets its own task, counted against
//! `max_client_conn` (a client over the limit is told 53300 after its startup packet,
//! as PostgreSQL does). Shutdown stops accepting and drains sessions.
//!
//! Client listeners queue up to [`LISTEN_BACKLOG`] connections the kernel has completed,
//! so a storm of clients connecting at once waits to be accepted instead of having
//! SYNs dropped.
//!
//! A `unix:<path>` listen entry is a Unix socket: a stale socket file left at that path
//! is removed first (anything else there is an error), the new one is made
//! world-connectable (0777, PostgreSQL's default `unix_socket_permissions`; the
//! directory's permissions are what restrict it), and it is removed at shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::cancel::CancelHandle;
use crate::cluster::{health, lag, lease, patroni};
use crate::config::{Config, ConfigError, Endpoint, ListenAddr};
use crate::pool::server::ServerState;
use crate::session::handover::{SessionState, Transfer};
use crate::session::LoggedIn;
use crate::stream::Stream;
use crate::takeover::{self, Handed, Listener, Predecessor, Successor};
use crate::{admin, control, pool, session, Shared};

/// Completed connections the kernel holds for a client listener until they are
/// accepted. std's and mio's 128 overflow when thousands of clients connect at once
/// (an application fleet restarting): a dropped SYN costs that client a second before
/// its retry. Linux caps it at `net.core.somaxconn` (4096 by default since 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not listen on unix:{}: {source}", path.display())]
    BindUnix {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A `tls.client_*` file could not be loaded.
    #[error("{}: {source}", source.key())]
    Tls {
        #[from]
        source: crate::tls::accept::CertError,
    },
    /// `tls.server_ca` could not be loaded.
    #[error(transparent)]
    ServerTls(std::sync::Arc<crate::tls::connect::ConnectorError>),
}

/// A running pgrelay.
pub struct Pgrelay {
    /// The bound TCP addresses (port 0 in the config becomes a real port here).
    pub addrs: Vec<SocketAddr>,
    /// The Unix sockets listened on; their files are removed at shutdown.
    pub unix_sockets: Vec<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` answer, if `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    /// Fires once the drain is over: the HTTP listener answers probes until then.
    stopped: watch::Sender<bool>,
    /// Client sessions, for draining.
    sessions: TaskTracker,
    /// Each listening socket (a second descriptor of it), for a takeover.
    offered: Vec<(Listener, OwnedFd)>,
    /// The cancel keys the clients of the process this one took over from hold,
    /// reserved until each client arrives or that process is done.
    reserved: HashMap<i32, CancelHandle>,
}

/// What a process taking over was handed: listening sockets, and the cancel keys the
/// clients it will be handed hold.
#[derive(Default)]
pub struct Inherited {
    listeners: Vec<(Listener, OwnedFd)>,
    keys: Vec<takeover::Key>,
}

impl Inherited {
    /// The sockets and keys `predecessor` offered.
    pub fn from_predecessor(predecessor: &mut Predecessor) -> Inherited {
        Inherited {
            listeners: std::mem::take(&mut predecessor.listeners),
            keys: std::mem::take(&mut predecessor.keys),
        }
    }

    fn take(&mut self, which: &Listener) -> Option<OwnedFd> {
        let at = self.listeners.iter().position(|(l, _)| l == which)?;
        Some(self.listeners.swap_remove(at).1)
    }
}

impl Pgrelay {
    pub async fn start(config: Config) -> Result<Pgrelay, ListenError> {
        Pgrelay::start_with(config, Inherited::default()).await
    }

    /// [`Pgrelay::start`] on the sockets a predecessor handed over, where the config
    /// names them (the others are bound afresh; those it no longer names are closed).
    pub async fn start_with(
        config: Config,
        mut inherited: Inherited,
    ) -> Result<Pgrelay, ListenError> {
        let client_tls = crate::tls::accept::ClientTls::load(&config.tls)?;
        let shared = Arc::new(Shared::new(config.clone()));
        shared.client_tls.store(Arc::new(client_tls));
        if let Some(err) = shared.server_tls.current().error() {
            return Err(ListenError::ServerTls(err.clone()));
        }
        let monitor = control::monitor(&shared);
        if config.failover.topology == crate::config::TopologySource::Patroni {
            if let Err(err) = patroni::poll_once(&monitor).await {
                tracing::warn!(%err, "Patroni could not be read at start-up; health checks decide");
            }
        }
        // Before anything is accepted: no new client may be given a key that one
        // still to be handed over holds.
        let reserved = inherited
            .keys
            .drain(..)
            .filter_map(|key| {
                let handle = shared
                    .cancel
                    .reserve(key.pid, key.secret.into_boxed_slice())?;
                Some((key.pid, handle))
            })
            .collect();
        health::probe_all(&monitor).await;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (stopped, stopped_rx) = watch::channel(false);
        let sessions = TaskTracker::new();
        let accepting = Accepting {
            shared: &shared,
            sessions: &sessions,
            shutdown: &shutdown_rx,
        };
        let Bound {
            addrs,
            unix_sockets,
            mut offered,
        } = bind_clients(&config, &mut inherited, accepting)?;
        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                let listener = bind_metrics(addr, &mut inherited, &mut offered).await?;
                let local = listener
                    .local_addr()
                    .map_err(|source| ListenError::Bind { addr, source })?;
                tracing::info!(addr = %local, "metrics and health endpoints listening");
                // Through the drain too: /healthz keeps answering (a liveness probe
                // must not kill a draining pod) and /readyz says it is shutting down.
                tokio::spawn(serve_http(listener, shared.clone(), stopped_rx));
                Some(local)
            }
            None => None,
        };
        spawn_loops(&shared, monitor, &shutdown_rx);
        Ok(Pgrelay {
            addrs,
            unix_sockets,
            metrics_addr,
            shared,
            shutdown,
            stopped,
            sessions,
            offered,
            reserved,
        })
    }

    /// What a process taking over is offered: this one's listening sockets and the
    /// cancel keys its clients hold.
    pub fn offer(&self) -> std::io::Result<takeover::Offer> {
        let listeners = self
            .offered
            .iter()
            .map(|(which, fd)| Ok((which.clone(), fd.try_clone()?)))
            .collect::<std::io::Result<_>>()?;
        let keys = self
            .shared
            .cancel
            .issued_keys()
            .into_iter()
            .map(|(pid, secret)| takeover::Key {
                pid,
                secret: secret.into_vec(),
            })
            .collect();
        Ok(takeover::Offer {
            instance_id: self.shared.cancel.instance(),
            listeners,
            keys,
        })
    }

    /// Serves the clients `predecessor` hands over, as they come, until it is done.
    pub fn receive(&mut self, mut predecessor: Predecessor) {
        let mut reserved = std::mem::take(&mut self.reserved);
        let (shared, sessions) = (self.shared.clone(), self.sessions.clone());
        // A CancelRequest for a client still there reaches this process (it accepts
        // now): it goes there.
        let (cancels, cancelled) = tokio::sync::mpsc::unbounded_channel();
        self.shared.cancel.forward_reserved_to(cancels);
        let forwarding = tokio::spawn(predecessor.forward_cancels(cancelled));
        tokio::spawn(async move {
            let (mut received, mut servers) = (0u64, 0u64);
            loop {
                match predecessor.next().await {
                    Ok(Some(Handed::Client(state, fd))) => {
                        received += 1;
                        let key = reserved.remove(&state.pid);
                        admit_handed(&shared, &sessions, *state, fd, key);
                    }
                    Ok(Some(Handed::Server(state, fd))) => {
                        if adopt_server(&shared, &state, fd) {
                            servers += 1;
                        }
                    }
                    Ok(Some(Handed::Done { left })) => {
                        tracing::info!(
                            received,
                            servers,
                            left,
                            "the previous process handed over its clients and is done"
                        );
                        break;
                    }
                    Ok(None) => {
                        tracing::warn!(
                            received,
                            "the previous process went away before it was done"
                        );
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(%err, received, "takeover socket failed; no more clients come from the previous process");
                        break;
                    }
                }
            }
            // Keys of clients that ended there are free again.
            drop(reserved);
            forwarding.abort();
        });
    }

    /// Hands this process's clients to `successor`, which already serves its
    /// sockets: stops accepting, hands each client that can move over between
    /// transactions, lets the others finish (up to `drain`) as in a shutdown, and
    /// says it is done. The sockets' files stay: they are the successor's now.
    pub async fn hand_over(self, mut successor: Successor, drain: Duration) {
        tracing::info!(pid = successor.pid, "handing over to a new process");
        self.hand_over_idle_servers(&mut successor).await;
        let (outbox, inbox) = tokio::sync::mpsc::unbounded_channel::<Transfer>();
        let _ = self.shared.handover.set(outbox);
        let (finished, finish) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::spawn(hand_over_clients(
            successor,
            inbox,
            finish,
            self.shared.clone(),
        ));
        // The successor answers probes and metrics from now on.
        let _ = self.stopped.send(true);
        let left = self.drain(drain).await;
        let _ = finished.send(());
        if let Ok((successor, sent)) = writer.await {
            tracing::info!(handed_over = sent, left, "takeover done; exiting");
            if let Err(err) = successor.done(left).await {
                tracing::warn!(%err, "could not tell the new process the takeover is done");
            }
        }
    }

    /// Idle servers go first, so that the successor's pools have them before its
    /// clients need servers; the others close as they come back here, so that the
    /// two processes together stay near one process's pool sizes.
    async fn hand_over_idle_servers(&self, successor: &mut Successor) {
        let mut servers = 0u64;
        for pool in self.shared.pools.all() {
            for server in pool.hand_over_idle() {
                match server.hand_over(&pool.target, &pool.key.database) {
                    Ok(Some((state, fd))) => match successor.send_server(fd, state).await {
                        Ok(()) => servers += 1,
                        Err(err) => tracing::warn!(%err, "an idle server could not be handed over"),
                    },
                    Ok(None) => {}
                    Err(server) => {
                        tokio::spawn(server.terminate());
                    }
                }
            }
        }
        tracing::info!(servers, "idle servers handed over");
    }

    /// Re-reads the config file at `path` (and remembers it for `RELOAD`); an invalid
    /// file leaves the running config in place.
    pub fn reload(&self, path: &Path) -> Result<(), ConfigError> {
        *self
            .shared
            .config_path
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(path.to_owned());
        self.shared.reload()
    }

    /// Stops accepting, tells clients between transactions to go (57P01), lets the
    /// others finish their transaction, and waits up to `drain` for every session to
    /// end; what is left then is dropped.
    pub async fn shutdown(self, drain: Duration) {
        self.drain(drain).await;
        let _ = self.stopped.send(true);
        for path in &self.unix_sockets {
            if let Err(err) = std::fs::remove_file(path) {
                tracing::warn!(%err, path = %path.display(), "could not remove the Unix socket");
            }
        }
        let metrics = &self.shared.metrics;
        let (hits, misses) = (metrics.prepared_hits.get(), metrics.prepared_misses.get());
        if hits + misses > 0 {
            tracing::info!(
                hits,
                misses,
                "prepared statements found on their server / prepared there first"
            );
        }
    }

    /// Stops accepting, tells clients between transactions to go (57P01) or hands
    /// them over, and waits up to `drain` for every session to end; what is left
    /// then is dropped. Returns how many sessions were left.
    async fn drain(&self, drain: Duration) -> usize {
        let _ = self.shutdown.send(true);
        self.shared.shutting_down.send_replace(true);
        // First: another instance (or the process taking over) takes over the
        // failover hooks while this one drains.
        self.shared.lease.release().await;
        // Sessions registered from here on see the flag above when they start.
        for client in self.shared.registry.clients() {
            client.shut_down();
        }
        self.sessions.close();
        if tokio::time::timeout(drain, self.sessions.wait())
            .await
            .is_err()
        {
            let remaining = self.sessions.len();
            tracing::warn!(
                remaining,
                "shutdown_timeout expired with sessions still open"
            );
            return remaining;
        }
        0
    }
}

/// Binds a client listener as `TcpListener::bind` does (SO_REUSEADDR, so a restart
/// need not wait out TIME_WAIT), but with [`LISTEN_BACKLOG`].
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The old process's side of a takeover: sends each client handed to `inbox` to
/// `successor`, and passes on the cancels it sends for clients still here, until
/// `finish` (the drain is over) or the successor is gone (then `inbox` is closed,
/// and the clients still here end as in a shutdown). Returns the successor and how
/// many clients went.
async fn hand_over_clients(
    mut successor: Successor,
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<Transfer>,
    mut finish: tokio::sync::oneshot::Receiver<()>,
    shared: Arc<Shared>,
) -> (Successor, u64) {
    let mut sent = 0u64;
    let mut send = async |successor: &mut Successor, transfer: Transfer| {
        let handed = successor.send_client(transfer.fd, transfer.state).await;
        match &handed {
            Ok(()) => sent += 1,
            Err(err) => {
                tracing::warn!(%err, "a client could not be handed over; it is closed")
            }
        }
        handed.is_ok()
    };
    loop {
        tokio::select! {
            transfer = inbox.recv() => match transfer {
                Some(transfer) => {
                    if !send(&mut successor, transfer).await {
                        // The rest are told to go as in a shutdown.
                        tracing::warn!("the new process is gone: clients still here end as in a shutdown");
                        inbox.close();
                        break;
                    }
                }
                None => break,
            },
            cancel = successor.next_cancel() => match cancel {
                Some((pid, secret)) => {
                    // The client is still here: it is cancelled as if the
                    // request had come to this process.
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let config = shared.config.load_full();
                        shared.cancel.cancel_request(pid, &secret, true, &config).await;
                    });
                }
                None => {
                    // It closed the takeover socket before this process was
                    // done: it is gone.
                    tracing::warn!("the new process is gone: clients still here end as in a shutdown");
                    inbox.close();
                    break;
                }
            },
            _ = &mut finish => {
                while let Ok(transfer) = inbox.try_recv() {
                    if !send(&mut successor, transfer).await {
                        break;
                    }
                }
                break;
            }
        }
    }
    (successor, sent)
}

/// The client listeners bound, and a second descriptor of each for a takeover.
struct Bound {
    addrs: Vec<SocketAddr>,
    unix_sockets: Vec<PathBuf>,
    offered: Vec<(Listener, OwnedFd)>,
}

/// Binds every `listen` entry (or takes the socket a predecessor handed over for
/// it) and spawns its accept loop.
fn bind_clients(
    config: &Config,
    inherited: &mut Inherited,
    accepting: Accepting<'_>,
) -> Result<Bound, ListenError> {
    let mut bound = Bound {
        addrs: Vec::new(),
        unix_sockets: Vec::new(),
        offered: Vec::new(),
    };
    for entry in &config.listen {
        let endpoint = entry.endpoint();
        match &entry.addr {
            ListenAddr::Tcp(addr) => {
                let which = Listener::Tcp(*addr);
                let listener = match inherited.take(&which) {
                    Some(fd) => tcp_listener_from(fd),
                    None => listen(*addr),
                };
                let bind_error = |source| ListenError::Bind {
                    addr: *addr,
                    source,
                };
                let listener = listener.map_err(bind_error)?;
                bound
                    .offered
                    .push((which, dup(&listener).map_err(bind_error)?));
                let local = spawn_tcp(listener, endpoint, accepting).map_err(bind_error)?;
                bound.addrs.push(local);
            }
            ListenAddr::Unix(path) => {
                let which = Listener::Unix(path.clone());
                let listener = match inherited.take(&which) {
                    Some(fd) => unix_listener_from(fd),
                    None => listen_unix(path),
                };
                let bind_error = |source| ListenError::BindUnix {
                    path: path.clone(),
                    source,
                };
                let listener = listener.map_err(bind_error)?;
                bound
                    .offered
                    .push((which, dup(&listener).map_err(bind_error)?));
                spawn_unix(listener, path, endpoint, accepting);
                bound.unix_sockets.push(path.clone());
            }
        }
    }
    Ok(bound)
}

/// The metrics and health listener on `addr` (or the one a predecessor handed over).
async fn bind_metrics(
    addr: SocketAddr,
    inherited: &mut Inherited,
    offered: &mut Vec<(Listener, OwnedFd)>,
) -> Result<TcpListener, ListenError> {
    let which = Listener::Metrics(addr);
    let bind_error = |source| ListenError::Bind { addr, source };
    let listener = match inherited.take(&which) {
        Some(fd) => tcp_listener_from(fd).map_err(bind_error)?,
        None => TcpListener::bind(addr).await.map_err(bind_error)?,
    };
    offered.push((which, dup(&listener).map_err(bind_error)?));
    Ok(listener)
}

/// The instance's background loops: health, Patroni, the failover lease, lag, the
/// fleet's size and pool maintenance, each until shutdown.
fn spawn_loops(
    shared: &Shared,
    monitor: crate::cluster::Monitor,
    shutdown: &watch::Receiver<bool>,
) {
    tokio::spawn(health::run(monitor.clone(), shutdown.clone()));
    tokio::spawn(patroni::run(monitor.clone(), shutdown.clone()));
    tokio::spawn(lease::run(shared.lease.clone(), shutdown.clone()));
    tokio::spawn(lag::run(monitor, shutdown.clone()));
    let fleet = pool::fleet::watch(
        shared.config.clone(),
        shared.pools.clone(),
        shutdown.clone(),
    );
    tokio::spawn(fleet);
    tokio::spawn(pool::maintain(shared.pools.clone(), shutdown.clone()));
}

/// What an accept loop needs of the instance.
#[derive(Clone, Copy)]
struct Accepting<'a> {
    shared: &'a Arc<Shared>,
    sessions: &'a TaskTracker,
    shutdown: &'a watch::Receiver<bool>,
}

/// A second descriptor of a listening socket, to offer a takeover.
fn dup(listener: &impl AsFd) -> std::io::Result<OwnedFd> {
    listener.as_fd().try_clone_to_owned()
}

fn tcp_listener_from(fd: OwnedFd) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

fn unix_listener_from(fd: OwnedFd) -> std::io::Result<UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// Spawns the accept loop of a TCP listener, its clients tied to `endpoint` if it
/// has one; the address it is bound to (a real port for port 0).
fn spawn_tcp(
    listener: TcpListener,
    endpoint: Option<Endpoint>,
    accepting: Accepting<'_>,
) -> std::io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, ?endpoint, "listening");
    let (shared, sessions) = (accepting.shared.clone(), accepting.sessions.clone());
    tokio::spawn(accept_each(
        listener,
        accepting.shutdown.clone(),
        move |tcp| {
            admit(&shared, &sessions, Accepted::Tcp(tcp), endpoint);
        },
    ));
    Ok(local)
}

/// Spawns the accept loop of the Unix socket at `path`.
fn spawn_unix(
    listener: UnixListener,
    path: &Path,
    endpoint: Option<Endpoint>,
    accepting: Accepting<'_>,
) {
    tracing::info!(path = %path.display(), "listening on a Unix socket");
    let port = ListenAddr::socket_port(path).unwrap_or(0);
    let (shared, sessions) = (accepting.shared.clone(), accepting.sessions.clone());
    tokio::spawn(accept_each(
        listener,
        accepting.shutdown.clone(),
        move |socket| {
            admit(&shared, &sessions, Accepted::Unix(socket, port), endpoint);
        },
    ));
}

/// Binds a Unix-socket listener at `path`, replacing a stale socket file there (one a
/// previous run left), never any other kind of file.
fn listen_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// A client connection just accepted, on TCP or on a Unix socket (with the port its
/// socket file's name carries).
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream, u16),
}

/// Decrements the client count when a session ends, however it ends.
struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a new client against `max_client_conn` and starts its task.
fn admit(
    shared: &Arc<Shared>,
    sessions: &TaskTracker,
    accepted: Accepted,
    endpoint: Option<Endpoint>,
) {
    let count = shared.clients.fetch_add(1, Ordering::Relaxed) + 1;
    let slot = ClientSlot(shared.clone());
    let too_many = count > shared.config.load().pool.max_client_conn as usize;
    let login = log_in(accepted, shared.clone(), too_many, endpoint);
    let shared = shared.clone();
    sessions.spawn(async move {
        serve(login, shared).await;
        drop(slot);
    });
}

/// Goes on with a client another process handed over, counted as any other.
fn admit_handed(
    shared: &Arc<Shared>,
    sessions: &TaskTracker,
    state: SessionState,
    fd: OwnedFd,
    key: Option<CancelHandle>,
) {
    let stream = if state.unix.is_some() {
        let socket = std::os::unix::net::UnixStream::from(fd);
        socket
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(socket))
            .map(Stream::Unix)
    } else {
        let tcp = std::net::TcpStream::from(fd);
        tcp.set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(tcp))
            .map(Stream::Plain)
    };
    let stream = match stream {
        Ok(stream) => stream,
        Err(err) => return tracing::warn!(%err, "a client handed over could not be taken"),
    };
    shared.clients.fetch_add(1, Ordering::Relaxed);
    let slot = ClientSlot(shared.clone());
    let shared = shared.clone();
    sessions.spawn(async move {
        session::handover::resume(shared, stream, state, key).await;
        drop(slot);
    });
}

/// Takes an idle server the previous process handed over into the pool of its node,
/// database and user, if this config has them and the pool has room. Returns whether
/// it was taken (else it is closed).
fn adopt_server(shared: &Shared, state: &ServerState, fd: OwnedFd) -> bool {
    let tcp = std::net::TcpStream::from(fd);
    let tcp = match tcp
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(tcp))
    {
        Ok(tcp) => tcp,
        Err(err) => {
            tracing::warn!(%err, "a server handed over could not be taken");
            return false;
        }
    };
    let server = Box::new(pool::server::Server::adopted(state, tcp));
    let node = {
        let topology = shared.cluster.load();
        let same = |n: &crate::cluster::NodeState| n.host == state.host && n.port == state.port;
        topology.nodes.iter().position(same)
    };
    let config = shared.config.load_full();
    let pool = node.and_then(|node| {
        shared
            .node_pool(&config, node, &state.database, &state.user)
            .ok()
    });
    match pool {
        Some(pool) => pool.adopt(server),
        None => {
            tracing::info!(host = %state.host, port = state.port, database = %state.database, user = %state.user, "a server handed over has no pool here; it is closed");
            tokio::spawn(server.terminate());
            false
        }
    }
}

/// A client's login, boxed: its future is large and done with once the client is in,
/// and what the task keeps of it is one pointer, to the client it logged in.
type Login = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Box<LoggedIn>>> + Send>>;

fn log_in(
    accepted: Accepted,
    shared: Arc<Shared>,
    too_many: bool,
    endpoint: Option<Endpoint>,
) -> Login {
    Box::pin(async move {
        let logged_in = match accepted {
            Accepted::Tcp(tcp) => session::log_in(tcp, &shared, too_many).await,
            Accepted::Unix(socket, port) => {
                session::log_in_unix(socket, port, &shared, too_many).await
            }
        };
        logged_in.map(|mut client| {
            client.endpoint = endpoint;
            Box::new(client)
        })
    })
}

/// One client connection to its end: the login, then a session or the admin console.
async fn serve(login: Login, shared: Arc<Shared>) {
    let Some(client) = login.await else {
        return;
    };
    if client.admin {
        let LoggedIn {
            client,
            login,
            handle,
            ..
        } = *client;
        // Boxed: the console's future would otherwise size every client's task.
        Box::pin(admin::serve(shared, client, login, handle)).await
    } else {
        session::serve(shared, client).await
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the drain is over.
async fn serve_http(listener: TcpListener, shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    accept_each(listener, shutdown, |socket| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let answer = crate::metrics::answer(socket, &shared);
            let _ = tokio::time::timeout(Duration::from_secs(10), answer).await;
        });
    })
    .await
}

/// A listener [`accept_each`] takes connections from: TCP, or a Unix socket.
trait Accept {
    type Connection;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Connection>> + Send + '_;
    /// Where it listens, for the log line of a failed accept.
    fn place(&self) -> String;
}

impl Accept for TcpListener {
    type Connection = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Connection> {
        Ok(self.accept().await?.0)
    }
    fn place(&self) -> String {
        format!("{:?}", self.local_addr().ok())
    }
}

impl Accept for UnixListener {
    type Connection = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Connection> {
        Ok(self.accept().await?.0)
    }
    fn place(&self) -> String {
        format!(
            "{:?}",
            self.local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.to_owned()))
        )
    }
}

/// Hands every accepted connection to `serve` until shutdown. A failed accept (out of
/// file descriptors and the like) backs off instead of spinning.
async fn accept_each<L: Accept>(
    listener: L,
    mut shutdown: watch::Receiver<bool>,
    mut serve: impl FnMut(L::Connection),
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept_one() => accepted,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok(connection) => serve(connection),
            Err(err) => {
                tracing::error!(%err, addr = %listener.place(), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 300 clients connect while nothing accepts: with a backlog of 128 the later ones
    /// would wait a second for their SYN's retry.
    #[tokio::test]
    async fn backlog_holds_a_storm_of_connects() {
        let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if somaxconn.is_some_and(|max| max < 300) {
            return; // the kernel caps the backlog below what this needs
        }
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..300).map(|_| {
            tokio::time::timeout(
                Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr),
            )
        });
        let clients = futures_util::future::join_all(connects).await;
        assert!(clients.iter().all(|c| matches!(c, Ok(Ok(_)))));
    }
}
