//! One client session, one task: the handshake, the greeting (parameters, key), then
//! the loop: read a complete request, check out a server, reconcile the session's
//! parameters on it, relay until the transaction ends (transaction mode) or the client
//! leaves (session mode), and hand the server back.
//!
//! Errors a client may see are turned into ErrorResponses here; nothing else is.

mod account;
mod auth_query;
mod carry;
mod detached;
mod fail;
pub mod handover;
mod lost;
mod pids;
pub mod prepared;
pub mod relay;
mod route;
mod scan;
mod server_side;
mod settle;
pub mod state;
pub mod statement;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpStream, UnixStream};

use crate::auth::hba::Peer;
use crate::auth::{self, AuthError, ClientLogin, Handshake};
use crate::cancel::CancelHandle;
use crate::cluster::NodeStats;
use crate::config::{Config, Endpoint, EndpointTarget, PoolMode};
use crate::error::{ClientError, ErrorKind, Side};
use crate::pool::params::ParamSet;
use crate::pool::{Pool, ServerGuard, Waiter};
use crate::protocol::{backend, ProtocolError};
use crate::registry::{self, ClientHandle, DbStats};
use crate::stream::{Conn, Stream};
use crate::tls::accept::TlsSession;
use crate::Shared;
use fail::{pool_error, say_goodbye, server_error};
use prepared::Prepared;
use relay::{Policy, RelayEnd, Wire};
use route::{RouteMode, Routing};
use settle::Pin;
use state::{Attachment, Farewell};
use watch::{Expired, Timeouts, Watch};

/// A client that logged in and is registered, for the listener to hand to a session
/// ([`serve`]) or, when it asked for the admin database, to the console.
pub struct LoggedIn {
    pub client: Conn<Stream>,
    pub login: ClientLogin,
    pub handle: ClientHandle,
    /// It asked for the admin console's database.
    pub admin: bool,
    /// The endpoint its listener ties it to (none: its database's).
    pub endpoint: Option<Endpoint>,
    config: Arc<Config>,
}

/// Runs the startup handshake of an accepted client connection and registers the
/// client; `None` when it ended there (a cancel request, a refused login).
pub async fn log_in(tcp: TcpStream, shared: &Shared, too_many_clients: bool) -> Option<LoggedIn> {
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().ok();
    let local = tcp.local_addr().ok();
    let config = shared.config.load_full();
    // One deadline for the TLS negotiation and the login after it.
    let deadline = tokio::time::Instant::now() + config.pool.client_login_timeout;
    let client_tls = shared.client_tls.load_full();
    let opened = tokio::time::timeout_at(deadline, auth::opening::open(tcp, &client_tls)).await;
    let (client, opening) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(err)) => {
            refused_opening(shared, peer, err);
            return None;
        }
        Err(_) => {
            tracing::info!(
                ?peer,
                "client_login_timeout expired during the TLS negotiation"
            );
            shared.metrics.error(ErrorKind::Protocol);
            return None;
        }
    };
    let opened = Opened {
        client,
        opening,
        peer,
        local,
        unix: None,
        deadline,
    };
    log_in_opened(opened, config, shared, too_many_clients).await
}

/// [`log_in`] over a transport with no TLS negotiation and its `(peer, local)`
/// addresses if it has any: an in-memory client of a benchmark has none.
pub async fn log_in_over(
    stream: Stream,
    (peer, local): (Option<SocketAddr>, Option<SocketAddr>),
    shared: &Shared,
    too_many_clients: bool,
) -> Option<LoggedIn> {
    let config = shared.config.load_full();
    let hba_peer = peer.map_or(Peer::Unknown, |addr| Peer::Ip(addr.ip()));
    let opened = Opened {
        client: Conn::new(stream),
        opening: auth::opening::Opening::plain(config.tls.client_mode, hba_peer),
        peer,
        local,
        unix: None,
        deadline: tokio::time::Instant::now() + config.pool.client_login_timeout,
    };
    log_in_opened(opened, config, shared, too_many_clients).await
}

/// [`log_in`] for a client of a Unix-socket listener whose socket file's name carries
/// `port` (0: none): no TLS (an SSLRequest is answered `N`, and `tls.client_mode`
/// does not require it there, as PostgreSQL does not), `local` hba rules.
pub async fn log_in_unix(
    socket: UnixStream,
    port: u16,
    shared: &Shared,
    too_many_clients: bool,
) -> Option<LoggedIn> {
    let config = shared.config.load_full();
    let opened = Opened {
        client: Conn::new(Stream::Unix(socket)),
        opening: auth::opening::Opening::unix(),
        peer: None,
        local: None,
        unix: Some(port),
        deadline: tokio::time::Instant::now() + config.pool.client_login_timeout,
    };
    log_in_opened(opened, config, shared, too_many_clients).await
}

/// A client connection whose TLS negotiation is over, and when its login must be.
struct Opened {
    client: Conn<Stream>,
    opening: auth::opening::Opening,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    /// On a Unix socket: the port its file's name carries, for `SHOW CLIENTS`.
    unix: Option<u16>,
    deadline: tokio::time::Instant,
}

/// The startup handshake after the opening, and the client's registration.
async fn log_in_opened(
    opened: Opened,
    config: Arc<Config>,
    shared: &Shared,
    too_many_clients: bool,
) -> Option<LoggedIn> {
    let Opened {
        mut client,
        opening,
        peer,
        local,
        unix,
        deadline,
    } = opened;
    let tls_label = opening.tls.as_ref().map(TlsSession::label);
    let refusal = login_refusal(shared, &config, peer, too_many_clients);
    let handshake = tokio::time::timeout_at(
        deadline,
        auth::handshake_with(
            &mut client,
            &config,
            &shared.credentials,
            (refusal, opening),
            &auth_query::AuthQuery {
                shared,
                config: &config,
            },
        ),
    )
    .await;
    let login = match handshake {
        Ok(Ok(Handshake::Login(login))) => login,
        Ok(Ok(Handshake::Cancel {
            pid,
            secret,
            forwarded,
        })) => {
            let config = shared.config.load_full();
            let cancel = &shared.cancel;
            cancel
                .cancel_request(pid, &secret, forwarded, &config)
                .await;
            return None;
        }
        Ok(Err(AuthError::Client(err))) => {
            tracing::info!(?peer, code = %err.code, message = %err.message, "client login refused");
            shared.metrics.error(err.kind);
            if err.kind == ErrorKind::Auth {
                login_failed(shared, &config, peer).await;
            }
            say_goodbye(&mut client, &err).await;
            return None;
        }
        Ok(Err(AuthError::Stream(err))) => {
            tracing::debug!(?peer, %err, "client left during login");
            return None;
        }
        Ok(Err(AuthError::Tls(err))) => {
            tracing::info!(?peer, %err, "client TLS failed");
            return None;
        }
        Err(_) => {
            say_goodbye(&mut client, &ClientError::login_timeout()).await;
            return None;
        }
    };
    let application_name = login
        .gucs
        .iter()
        .find(|(name, _)| name == "application_name")
        .map_or("", |(_, value)| value.as_str());
    let admin = crate::config::is_admin_database(&login.database);
    let new_client = registry::NewClient {
        user: &login.user,
        database: &login.database,
        application_name,
        addr: peer,
        local,
        unix,
        admin,
        tls: tls_label.as_deref().unwrap_or_default(),
    };
    let handle = match register(shared, &config, new_client) {
        Ok(handle) => handle,
        Err(err) => {
            tracing::info!(?peer, user = %login.user, database = %login.database, message = %err.message, "client login refused");
            shared.metrics.error(err.kind);
            say_goodbye(&mut client, &err).await;
            return None;
        }
    };
    Some(LoggedIn {
        client,
        login,
        handle,
        admin,
        endpoint: None,
        config,
    })
}

/// Registers a logged-in client, within `max_user_client_connections` and
/// `max_db_client_connections`. Counted once the client has proved who it is: an
/// unauthenticated client can neither use up a user's slots nor learn they are taken.
fn register(
    shared: &Shared,
    config: &Config,
    client: registry::NewClient<'_>,
) -> Result<registry::ClientHandle, ClientError> {
    let (user, database) = (client.user, client.database);
    let limits = registry::ClientLimits {
        per_user: config.max_user_client_connections_for(user) as usize,
        per_db: config.max_db_client_connections_for(database) as usize,
    };
    shared
        .registry
        .register_within(client, limits)
        .map_err(|over| match over {
            registry::ClientOver::User => {
                ClientError::too_many_clients_of("user", user, "max_user_client_connections")
            }
            registry::ClientOver::Database => {
                ClientError::too_many_clients_of("database", database, "max_db_client_connections")
            }
        })
}

/// Why a login is refused before its credentials are looked at: too many clients, or
/// too many failed logins from its address (`limits.auth_failure_limit`). One lock
/// and lookup per login when the limit is on; nothing per transaction.
fn login_refusal(
    shared: &Shared,
    config: &Config,
    peer: Option<SocketAddr>,
    too_many_clients: bool,
) -> Option<ClientError> {
    if too_many_clients {
        return Some(ClientError::too_many_clients());
    }
    let limits = &config.limits;
    let ip = peer?.ip().to_canonical();
    let now = std::time::Instant::now();
    shared
        .auth_throttle
        .blocked(
            ip,
            now,
            limits.auth_failure_limit,
            limits.auth_failure_window,
        )
        .then(ClientError::too_many_auth_failures)
}

/// A login failed its authentication: its address's failure is counted, and the
/// client waits `limits.auth_failure_delay` before it is told (and can try again).
async fn login_failed(shared: &Shared, config: &Config, peer: Option<SocketAddr>) {
    let limits = &config.limits;
    if let Some(ip) = peer.map(|peer| peer.ip().to_canonical()) {
        let now = std::time::Instant::now();
        let (limit, window) = (limits.auth_failure_limit, limits.auth_failure_window);
        if !shared.auth_throttle.failed(ip, now, limit, window) {
            tracing::warn!(%ip, "failed logins from too many addresses: this one is not counted (limits.auth_failure_limit)");
        }
    }
    if !limits.auth_failure_delay.is_zero() {
        tokio::time::sleep(limits.auth_failure_delay).await;
    }
}

/// Logs why a connection's TLS negotiation ended it; what the client could be told
/// was told by the opening itself.
fn refused_opening(shared: &Shared, peer: Option<std::net::SocketAddr>, err: AuthError) {
    match err {
        AuthError::Client(err) => {
            tracing::info!(?peer, code = %err.code, message = %err.message, "client refused before TLS");
            shared.metrics.error(err.kind);
        }
        AuthError::Tls(err) => {
            tracing::info!(?peer, %err, "client TLS handshake refused");
            shared.metrics.error(ErrorKind::Protocol);
        }
        AuthError::Stream(err) => {
            tracing::debug!(?peer, %err, "client left during TLS negotiation")
        }
    }
}

/// Serves a logged-in client's session to its end. The client comes boxed: an async
/// fn's arguments stay in its future for as long as it runs.
pub async fn serve(shared: Arc<Shared>, logged_in: Box<LoggedIn>) {
    let LoggedIn {
        client,
        login,
        handle,
        config,
        endpoint,
        ..
    } = *logged_in;
    // Each client's task is as large as its largest future, idle or not: what runs
    // once (the greeting, the goodbyes) is boxed, so that the task holds only the
    // session and its request loop.
    let mut session = {
        // In a block of its own, so that the task keeps no room for the result.
        let started = Box::pin(Session::start(
            shared.clone(),
            client,
            (login, endpoint),
            &config,
            handle,
        ));
        match started.await {
            Ok(session) => session,
            Err((mut client, err)) => {
                shared.metrics.error(err.kind);
                return Box::pin(say_goodbye(&mut client, &err)).await;
            }
        }
    };
    let exit = session.run().await;
    Box::pin(session.end(exit)).await
}

/// A logged-in client.
struct Session {
    shared: Arc<Shared>,
    client: Conn<Stream>,
    login: ClientLogin,
    mode: PoolMode,
    /// The pool on the primary this session started with (its defaults greet clients).
    pool: Arc<Pool>,
    /// Pools by node, looked up once per session.
    pools: Vec<Option<Arc<Pool>>>,
    /// Session mode with routing: the servers this client keeps, one per node.
    held: Vec<Option<ServerGuard>>,
    wire: Wire,
    routing: Routing,
    /// What this client has been told and asked for; servers are made to match it.
    params: ParamSet,
    cancel: CancelHandle,
    attachment: Attachment,
    /// This client's place in its pool's queue, reused for every wait; made at its
    /// first checkout (a client that never sends a request needs none).
    waiter: Option<Arc<Waiter>>,
    /// Transaction mode: session state keeps the client on its server.
    pin: Option<Pin>,
    /// Its entry in the registry (`SHOW CLIENTS`, `KILL`, `PAUSE`).
    handle: ClientHandle,
    /// Its database's counters (`SHOW STATS`).
    db_stats: Arc<DbStats>,
    /// Per-node counters, resolved on first use.
    node_stats: Vec<Option<Arc<NodeStats>>>,
    /// The request being served: when it was complete, how long it waited for a
    /// server, and whether it was routed as a write.
    request: Option<Request>,
    /// The session's timeouts; none when all are off.
    watch: Option<Box<Watch>>,
    /// Its pool's latency histograms.
    latency: Arc<registry::PoolLatency>,
    /// Where its requests go (the database's or listener's `target`), and whether a
    /// `replica` endpoint may fall back to the primary.
    target: Endpoint,
}

/// How a session's request loop ended.
enum Exit {
    /// The client left, or its connection failed.
    Done,
    /// The client is told this error and closed.
    Failed(ClientError),
    /// `KILL` or `pg_terminate_backend`: the session ends where it is.
    Killed,
    /// A timeout expired: the session ends where it is.
    TimedOut(Expired),
    /// A takeover runs: the session goes on in the process taking over.
    HandOver,
}

/// How long a killed client's last words may take to write.
const GOODBYE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Timing of the request a session serves.
#[derive(Debug, Clone, Copy)]
struct Request {
    at: std::time::Instant,
    wait: std::time::Duration,
    node: usize,
    write: bool,
}

/// What a session is made of, from a login or from a handover.
struct Parts {
    login: ClientLogin,
    endpoint: Endpoint,
    mode: PoolMode,
    /// The pool on the primary (or the node its endpoint gave it).
    pool: Arc<Pool>,
    params: ParamSet,
    cancel: CancelHandle,
    handle: ClientHandle,
}

impl Session {
    async fn start(
        shared: Arc<Shared>,
        client: Conn<Stream>,
        (login, endpoint): (ClientLogin, Option<Endpoint>),
        config: &Config,
        handle: ClientHandle,
    ) -> Result<Box<Session>, (Conn<Stream>, ClientError)> {
        let mode = config.pool_mode_for(&login.database, &login.user);
        let deadline = tokio::time::Instant::now() + config.failover.hold_timeout;
        let target = endpoint.unwrap_or_else(|| config.target_for(&login.database));
        let greeting = route::greeting_pool(&shared, config, &login, (mode, target), deadline);
        let pool = match greeting.await {
            Ok(pool) => pool,
            Err(err) => return Err((client, err)),
        };
        let mut params = ParamSet::default();
        for (name, value) in &login.gucs {
            params.set_unreported(name, value);
        }
        if target.0 == EndpointTarget::Replica {
            // Whichever node serves it, the primary included, a write fails as it
            // would on a replica (25006), and the client is told it is read-only.
            params.set_unreported("default_transaction_read_only", "on");
        }
        let cancel = shared
            .cancel
            .register_random(backend::secret_len(login.minor));
        if *shared.shutting_down.borrow() {
            // Shutdown began before the client was registered: it told only the others.
            handle.entry.shut_down();
        }
        let parts = Parts {
            login,
            endpoint: target,
            mode,
            pool,
            params,
            cancel,
            handle,
        };
        let mut session = Session::assemble(shared, client, parts, config);
        match session.greet(deadline).await {
            // On the heap: the task's future then holds a pointer to it, not a
            // second copy beside the room its start needed.
            Ok(()) => Ok(Box::new(session)),
            Err(err) => Err((session.client, err)),
        }
    }

    /// A session of `parts` on `client`, before its greeting.
    fn assemble(
        shared: Arc<Shared>,
        client: Conn<Stream>,
        parts: Parts,
        config: &Config,
    ) -> Session {
        let (login, target, mode) = (parts.login, parts.endpoint, parts.mode);
        let (cancel, handle) = (parts.cancel, parts.handle);
        let nodes = shared.cluster.load().nodes.len();
        let route_mode = RouteMode::of(target, config, nodes, mode);
        let routes = route_mode == RouteMode::PerRequest;
        let transaction_mode = mode == PoolMode::Transaction;
        let capacity = config.pool.max_prepared_statements as usize;
        let prepared = (transaction_mode && capacity > 0)
            .then(|| Box::new(Prepared::new(capacity, shared.parsed.clone())));
        let carries_statements = prepared.is_some();
        let db_stats = shared.registry.db_stats(&login.database);
        let latency = shared.metrics.latency(&login.database, &login.user);
        let policy = Policy {
            // Session mode with routing stops at each transaction's end to route the next.
            transaction_pooling: transaction_mode || routes,
            // Carried statements run on any node; otherwise they are followed to theirs.
            track_statements: routes && !carries_statements,
            track_effects: transaction_mode,
            own_pid: transaction_mode.then(|| cancel.pid()),
            hold_at_boundary: false,
            max_request: usize::try_from(config.limits.max_request_buffer).unwrap_or(usize::MAX),
        };
        let session = Session {
            shared,
            client,
            login,
            mode,
            pool: parts.pool,
            pools: vec![None; nodes],
            held: std::iter::repeat_with(|| None).take(nodes).collect(),
            wire: Wire::new(policy, prepared).timing_queries(latency.query.clone()),
            routing: Routing::new(route_mode),
            target,
            params: parts.params,
            cancel,
            attachment: Attachment::Detached,
            waiter: None,
            pin: None,
            db_stats,
            handle,
            node_stats: Vec::new(),
            request: None,
            watch: Timeouts::from_config(&config.pool).map(|t| Box::new(Watch::new(t))),
            latency,
        };
        if let Some(pid) = policy.own_pid {
            session.handle.entry.set_issued_pid(pid);
        }
        session
    }

    /// Settles the client's parameters (on a server unless the pool's defaults already
    /// match them), then sends AuthenticationOk, ParameterStatus, BackendKeyData and
    /// ReadyForQuery.
    async fn greet(&mut self, deadline: tokio::time::Instant) -> Result<(), ClientError> {
        let defaults = self
            .pool
            .defaults()
            .filter(|d| self.params.satisfied_by(d))
            .cloned();
        match (self.mode, defaults) {
            (PoolMode::Transaction, Some(defaults)) => self.params.adopt_reported(&defaults),
            (PoolMode::Transaction, None) => {
                let mut guard = self.greeting_server(deadline).await?;
                self.params.adopt_reported(&guard.server().params);
                guard.release();
            }
            (PoolMode::Session, _) => self.attach_for_session(deadline).await?,
        }
        if self.params.get("in_hot_standby") == Some("on") {
            // Greeted from a replica while there is no primary: pgrelay itself takes
            // writes (they wait for the next primary), so it is no hot standby.
            self.params.set_reported("in_hot_standby", "off");
        }
        let buf = self.client.wbuf();
        auth::auth_ok(buf);
        for (name, value) in self.params.reported() {
            backend::parameter_status_msg(buf, name, value);
        }
        backend::backend_key_data(buf, self.cancel.pid(), self.cancel.secret());
        backend::ready_for_query(buf, backend::TxStatus::Idle);
        self.client
            .flush()
            .await
            .map_err(|_| ClientError::client_gone())?;
        // Most clients are never sent another message pgrelay composes.
        self.client.free_wbuf();
        Ok(())
    }

    /// Session mode: the server is the client's for good, and so is its real pid (its
    /// secret too for a protocol 3.0 client; a 3.2 client is given a longer one). A
    /// server that sent no key leaves the client its issued one. With routing, the
    /// primary server is kept for the client's requests that need it.
    async fn attach_for_session(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<(), ClientError> {
        let mut guard = self.greeting_server(deadline).await?;
        let node = guard.pool().key.node;
        let server = guard.server();
        self.params.adopt_reported(&server.params);
        if let Some(target) = server.cancel_target() {
            let secret: Box<[u8]> = if self.login.minor < 2 {
                Box::new(target.secret.to_be_bytes())
            } else {
                self.shared
                    .cancel
                    .random_secret(backend::secret_len(self.login.minor))
            };
            if let Some(handle) = self.shared.cancel.register(target.pid, secret) {
                self.cancel = handle;
            }
        }
        if self.routing.mode != RouteMode::Off {
            self.held[node] = Some(guard);
        } else {
            self.cancel.set(server.cancel_target()).await;
            self.handle.active(node, server.pid);
            self.wire.node = node;
            self.attachment = Attachment::Attached(guard);
        }
        Ok(())
    }

    async fn checkout_reconciled(&mut self, pool: &Arc<Pool>) -> Result<ServerGuard, ClientError> {
        let waiter = self.waiter.get_or_insert_with(Arc::default);
        let mut guard = match pool.checkout(waiter).await {
            Ok(guard) => guard,
            Err(err) => {
                // The client sees its own error; operators need to see the server side.
                tracing::warn!(pool = ?pool.key, %err, "no server for a client");
                return Err(pool_error(err));
            }
        };
        if let Err(err) = guard.server().reconcile(&self.params).await {
            tracing::warn!(pool = ?pool.key, %err, "could not settle a client's parameters on a server");
            let side = err.side();
            let client_error = server_error(err);
            if side == Side::Client {
                guard.release();
            }
            return Err(client_error);
        }
        Ok(guard)
    }

    /// Serves requests until the session must end, or is killed.
    async fn run(&mut self) -> Exit {
        let entry = self.handle.entry.clone();
        tokio::select! {
            biased;
            () = entry.killed() => Exit::Killed,
            exit = self.serve_requests() => exit,
        }
    }

    /// Ends the session the way its request loop ended.
    async fn end(self: Box<Self>, exit: Exit) {
        let session = *self;
        match exit {
            Exit::Done => session.finish().await,
            Exit::Failed(err) => session.fail(err).await,
            Exit::Killed => {
                tracing::info!(user = %session.login.user, database = %session.login.database, "client terminated by an administrator command");
                session.cut_off(ClientError::terminated()).await
            }
            Exit::TimedOut(expired) => {
                tracing::info!(user = %session.login.user, database = %session.login.database, timeout = expired.key(), "client closed by a timeout");
                session.shared.metrics.error(ErrorKind::Timeout);
                session.cut_off(expired.error()).await
            }
            Exit::HandOver => session.hand_over().await,
        }
    }

    /// Serves the client's requests until the session must end.
    async fn serve_requests(&mut self) -> Exit {
        loop {
            if matches!(self.attachment, Attachment::Detached) {
                if self.may_hand_over() && self.handle.entry.is_shutting_down() {
                    return Exit::HandOver;
                }
                match self.next_request().await {
                    Ok(true) => {}
                    Ok(false) => return Exit::Done,
                    Err(err) => return Exit::Failed(err),
                }
            }
            let Attachment::Attached(guard) = &mut self.attachment else {
                continue;
            };
            let end = self
                .wire
                .relay(
                    &mut self.client,
                    guard.server(),
                    &mut self.params,
                    self.watch.as_deref_mut(),
                )
                .await;
            match end {
                RelayEnd::TransactionDone => self.detach().await,
                RelayEnd::ClientGone => return Exit::Done,
                RelayEnd::ClientProtocol(ProtocolError::TooLarge { max }) => {
                    return Exit::Failed(ClientError::request_too_large(max))
                }
                RelayEnd::ClientProtocol(err) => {
                    return Exit::Failed(ClientError::protocol(err.to_string()))
                }
                RelayEnd::ClientIo(err) => {
                    tracing::debug!(%err, "client connection failed");
                    return Exit::Done;
                }
                RelayEnd::ServerGone(err) => {
                    if !self.server_lost(err).await {
                        return Exit::Done;
                    }
                }
                RelayEnd::Intercepted => match self.intercepted().await {
                    Ok(true) => {}
                    Ok(false) => return Exit::Done,
                    Err(err) => return Exit::Failed(err),
                },
                RelayEnd::TimedOut(expired) => return Exit::TimedOut(expired),
            }
        }
    }

    /// `KILL`, `pg_terminate_backend` or a timeout ended the session wherever it was:
    /// the query it ran is cancelled and its server discarded (a clean server goes
    /// back), and the client is told `err` (FATAL 57P01 for a terminated session, as
    /// PostgreSQL tells it) once what it was sent before ends a message.
    async fn cut_off(mut self, err: ClientError) {
        let mut aligned = true;
        if let Attachment::Attached(mut guard) =
            std::mem::replace(&mut self.attachment, Attachment::Detached)
        {
            let server = guard.server();
            let clean = self.wire.server_clean(&mut server.conn);
            if !clean {
                self.cancel.cancel().await;
            }
            // What the server sent before stays the client's; the FATAL must start a
            // message of its own.
            let delivered = self
                .wire
                .deliver_scanned(&mut self.client, &mut server.conn);
            aligned = tokio::time::timeout(GOODBYE_TIMEOUT, delivered)
                .await
                .unwrap_or(false);
            if clean {
                // Between transactions: it goes back (or is reset) as the client leaves.
                self.attachment = Attachment::Attached(guard);
            }
        }
        if aligned {
            err.encode(self.client.wbuf());
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, self.client.flush()).await;
        }
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, self.client.shutdown()).await;
        self.finish().await;
    }

    /// Transaction mode: waits for a complete request and attaches a server for it.
    /// `Ok(false)` when the client is done.
    async fn next_request(&mut self) -> Result<bool, ClientError> {
        // The client may stay idle from here for long: it keeps no large buffer.
        self.client.shrink_idle();
        // A request that will be routed is understood as it is read.
        let classifier = self
            .routes_request()
            .then(|| self.shared.router.classifier_full());
        // During a takeover a client that cannot move yet (part of its next request
        // is read) is served once more, and moves at its next boundary.
        let mut moving = false;
        let read = loop {
            tokio::select! {
                biased;
                () = self.handle.entry.shutting_down(), if !moving => {
                    if !self.handing_over() || !self.movable() {
                        // Between transactions: nothing is lost by leaving now.
                        return Err(ClientError::shutting_down());
                    }
                    if self.may_hand_over() {
                        // The request loop hands the session over.
                        return Ok(true);
                    }
                    moving = true;
                }
                read = self.wire.read_request(&mut self.client, classifier.as_deref()) => break read,
                () = Watch::client_idle(self.watch.as_deref_mut()) => {
                    tracing::info!(user = %self.login.user, database = %self.login.database, timeout = "client_idle_timeout", "client closed by a timeout");
                    return Err(ClientError::client_idle_timeout());
                }
            }
        };
        if !self.request_read(read)? {
            return Ok(false);
        }
        if self.wire.answer_locally(&mut self.client, &self.params) {
            return Ok(self.client.flush().await.is_ok());
        }
        if let Some(request) = self.pid_request() {
            return self.answer_pid_request(request).await;
        }
        let at = std::time::Instant::now();
        self.handle.waiting(at);
        if self.shared.registry.is_paused(&self.login.database) {
            tracing::debug!(database = %self.login.database, "paused; the request waits for RESUME");
            self.shared
                .registry
                .wait_resumed(&self.login.database)
                .await;
        }
        // Whether the attach had to wait: pending at least once. Polled in place, so
        // that the session's future holds the attach's state once.
        let (attached, waited) = {
            let mut attach = std::pin::pin!(self.attach_routed(at.into()));
            let mut polls = 0u32;
            let attached = std::future::poll_fn(|cx| {
                polls += 1;
                std::future::Future::poll(attach.as_mut(), cx)
            })
            .await;
            (attached, polls > 1)
        };
        match attached {
            Ok(mut guard) => {
                self.cancel.set(guard.server().cancel_target()).await;
                let node = guard.pool().key.node;
                self.handle.active(node, guard.server_ref().pid);
                // A server at hand costs no clock read: the client did not wait.
                let wait = if waited {
                    at.elapsed()
                } else {
                    std::time::Duration::ZERO
                };
                self.request = Some(Request {
                    at,
                    wait,
                    node,
                    write: self.routing.last_write,
                });
                self.wire.record_request(&mut self.client, node);
                // The request goes out now: its query's time starts where its wait ended.
                self.wire.query_start = Some(at + wait);
                self.wire.hold_at_boundary(
                    self.routing.mode == RouteMode::PerRequest
                        && self.routing.primary != Some(node),
                );
                self.attachment = Attachment::Attached(guard);
            }
            Err(mut err) => {
                self.handle.idle();
                self.shared.metrics.error(err.kind);
                err.fatal = false;
                // The request never ran: answer it like a failed statement.
                let sync_owed = self.wire.discard_request(&mut self.client);
                let owed = usize::from(!sync_owed);
                return Ok(self.fail_request(&err, owed, sync_owed).await);
            }
        }
        Ok(true)
    }

    /// `DROP DATABASE x` and friends fail while any session is connected to `x`,
    /// pgrelay's own idle servers included: the request just read has those closed
    /// before it goes out.
    /// What a read of a whole request came to: `Ok(true)` when a request is buffered,
    /// `Ok(false)` when the client is gone. A database command's idle servers are closed
    /// before it goes out.
    fn request_read(&mut self, read: std::io::Result<()>) -> Result<bool, ClientError> {
        if let Err(err) = read {
            tracing::debug!(%err, "client read failed");
            return Ok(false);
        }
        self.close_idle_for_database_command();
        if let Some(err) = self.wire.take_protocol_error() {
            if let ProtocolError::TooLarge { max } = err {
                return Err(ClientError::request_too_large(max));
            }
            return Err(ClientError::protocol(err.to_string()));
        }
        Ok(self.wire.has_request())
    }

    fn close_idle_for_database_command(&mut self) {
        if let Some(db) = self.wire.take_database_command() {
            let closed = self.shared.pools.close_idle_for_dbname(&db);
            tracing::info!(database = %db, closed, "closed idle server connections before a database command");
        }
    }

    /// The transaction is over: settles what it did to the session, then returns the
    /// server, unless session state pins the client to it.
    async fn detach(&mut self) {
        let Attachment::Attached(mut guard) =
            std::mem::replace(&mut self.attachment, Attachment::Detached)
        else {
            return;
        };
        if self.mode == PoolMode::Session && self.pin.is_some() {
            // Pinned for good: the session goes on with this server as if it were not
            // routed, and is accounted for when it ends.
            self.attachment = Attachment::Attached(guard);
            return;
        }
        let ended = self.account();
        if self.mode == PoolMode::Transaction {
            let effects = self.wire.take_effects();
            self.count_prepared();
            if let Err(err) = self.settle(&mut guard, effects).await {
                tracing::warn!(%err, "could not read session state back from a server; closing it");
                self.unpin();
                self.cancel.set(None).await;
                return drop(guard);
            }
            if self.pin.is_some() {
                self.attachment = Attachment::Attached(guard);
                return;
            }
        }
        self.cancel.set(None).await;
        match (self.mode, ended) {
            (PoolMode::Transaction, Some(ended)) => guard.release_at(ended),
            _ => self.put_back(guard),
        }
        self.handle.idle();
    }

    /// An idle, clean server the client is done with for now: session mode keeps it
    /// for the client's next request on that node, transaction mode returns it.
    fn put_back(&mut self, guard: ServerGuard) {
        match self.mode {
            PoolMode::Transaction => guard.release(),
            PoolMode::Session => {
                let node = guard.pool().key.node;
                self.held[node] = Some(guard);
            }
        }
    }

    /// The client is leaving: return or discard its servers.
    async fn finish(mut self) {
        self.account();
        self.cancel.set(None).await;
        self.count_prepared();
        // A pinned server holds the client's locks, channels or temp tables: it goes
        // (in session mode, server_reset_query clears them).
        let pinned = self.unpin() && self.mode == PoolMode::Transaction;
        if let Attachment::Attached(mut guard) =
            std::mem::replace(&mut self.attachment, Attachment::Detached)
        {
            let clean = self.wire.server_clean(&mut guard.server().conn) && !pinned;
            self.farewell(guard, clean).await;
        }
        for guard in std::mem::take(&mut self.held).into_iter().flatten() {
            self.farewell(guard, true).await;
        }
    }

    /// Returns, resets or discards one server the client is done with.
    async fn farewell(&self, mut guard: ServerGuard, clean: bool) {
        let config = self.shared.config.load_full();
        match Farewell::decide(self.mode, clean, &config.pool.server_reset_query) {
            Farewell::Release => guard.release(),
            Farewell::Discard => drop(guard),
            Farewell::ResetThenRelease => {
                let server = guard.server();
                match server.run(&config.pool.server_reset_query).await {
                    Ok(()) => {
                        server.params.clear_unreported();
                        server.statements.clear();
                        guard.release();
                    }
                    Err(err) => {
                        tracing::warn!(%err, "server_reset_query failed; closing the server")
                    }
                }
            }
        }
    }
}
