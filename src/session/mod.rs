//! One client session, one task: the handshake, the greeting (parameters, key), then
//! the loop: read a complete request, check out a server, reconcile the session's
//! parameters on it, relay until the transaction ends (transaction mode) or the client
//! leaves (session mode), and hand the server back.
//!
//! Errors a client may see are turned into ErrorResponses here; nothing else is.

pub mod params;
pub mod relay;
pub mod state;

use std::sync::Arc;

use tokio::net::TcpStream;

use crate::auth::{self, AuthError, ClientLogin, Handshake};
use crate::cancel::CancelHandle;
use crate::cluster::NodeStats;
use crate::config::{Config, PoolMode, ReadAfterWrite};
use crate::error::{ClientError, ErrorKind};
use crate::pool::server::ServerError;
use crate::pool::{Pool, PoolError, ServerGuard, Waiter};
use crate::protocol::backend;
use crate::router::classify::{Reason, Target};
use crate::router::{self, Choice, Dice, Router};
use crate::stream::{Conn, Stream};
use crate::Shared;
use params::ParamSet;
use relay::{RelayEnd, Wire};
use state::{Attachment, Farewell};

/// Serves one accepted client connection to its end.
pub async fn serve(tcp: TcpStream, shared: Arc<Shared>, too_many_clients: bool) {
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().ok();
    let mut client = Conn::new(Stream::Plain(tcp));
    let config = shared.config.load_full();
    let handshake = tokio::time::timeout(
        config.pool.client_login_timeout,
        auth::handshake(&mut client, &config, &shared.credentials, too_many_clients),
    )
    .await;
    let login = match handshake {
        Ok(Ok(Handshake::Login(login))) => login,
        Ok(Ok(Handshake::Cancel { pid, secret })) => {
            return shared.cancel.cancel(pid, secret).await
        }
        Ok(Err(AuthError::Client(err))) => {
            tracing::info!(?peer, code = %err.code, message = %err.message, "client login refused");
            return say_goodbye(&mut client, &err).await;
        }
        Ok(Err(AuthError::Stream(err))) => {
            return tracing::debug!(?peer, %err, "client left during login")
        }
        Err(_) => {
            let err = ClientError::fatal(
                ErrorKind::Protocol,
                "08P01",
                "client_login_timeout expired before the client logged in",
            );
            return say_goodbye(&mut client, &err).await;
        }
    };
    match Session::start(shared, client, login, &config).await {
        Ok(session) => session.run().await,
        Err((mut client, err)) => say_goodbye(&mut client, &err).await,
    }
}

async fn say_goodbye(client: &mut Conn<Stream>, err: &ClientError) {
    err.encode(client.wbuf());
    let _ = client.flush().await;
    client.shutdown().await;
}

/// A client's routing state.
struct Routing {
    /// Requests are classified and routed (routing on, and replicas configured).
    enabled: bool,
    /// Session mode: something the client did cannot follow it to another server, so
    /// it stays on the primary server it holds (notifications, temp tables, ...).
    pinned: bool,
    /// The client sent something that may have written.
    wrote: bool,
    /// A write since `fence` was taken: the next replica read needs a new fence.
    fence_pending: bool,
    /// The primary's WAL insert position after the client's last write: replicas must
    /// have replayed this far to serve its reads (`read_after_write = "lsn"`).
    fence: Option<u64>,
    dice: Dice,
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
    /// This client's place in its pool's queue, reused for every wait.
    waiter: Arc<Waiter>,
}

impl Session {
    async fn start(
        shared: Arc<Shared>,
        client: Conn<Stream>,
        login: ClientLogin,
        config: &Config,
    ) -> Result<Session, (Conn<Stream>, ClientError)> {
        let mode = config.pool_mode_for(&login.database, &login.user);
        let pool = match shared.primary_pool(config, &login.database, &login.user) {
            Ok(pool) => pool,
            Err(err) => return Err((client, err)),
        };
        let mut params = ParamSet::default();
        for (name, value) in &login.gucs {
            params.set_unreported(name, value);
        }
        let cancel = shared.cancel.register_random();
        let routes = config.routing.enabled && config.backends.len() > 1;
        let nodes = config.backends.len();
        let mut session = Session {
            shared,
            client,
            login,
            mode,
            pool,
            pools: vec![None; nodes],
            held: std::iter::repeat_with(|| None).take(nodes).collect(),
            // Session mode with routing stops at each transaction's end to route the next.
            wire: Wire::new(mode == PoolMode::Transaction || routes),
            routing: Routing {
                enabled: routes,
                pinned: false,
                wrote: false,
                fence_pending: false,
                fence: None,
                dice: Dice::new(),
            },
            params,
            cancel,
            attachment: Attachment::Detached,
            waiter: Arc::default(),
        };
        match session.greet().await {
            Ok(()) => Ok(session),
            Err(err) => Err((session.client, err)),
        }
    }

    /// Settles the client's parameters (on a server unless the pool's defaults already
    /// match them), then sends AuthenticationOk, ParameterStatus, BackendKeyData and
    /// ReadyForQuery.
    async fn greet(&mut self) -> Result<(), ClientError> {
        let defaults = self
            .pool
            .defaults()
            .filter(|d| self.params.satisfied_by(d))
            .cloned();
        let key = match (self.mode, defaults) {
            (PoolMode::Transaction, Some(defaults)) => {
                self.params.adopt_reported(&defaults);
                self.cancel.key()
            }
            (PoolMode::Transaction, None) => {
                let pool = self.pool.clone();
                let mut guard = self.checkout_reconciled(&pool).await?;
                self.params.adopt_reported(&guard.server().params);
                guard.release();
                self.cancel.key()
            }
            (PoolMode::Session, _) => self.attach_for_session().await?,
        };
        let buf = self.client.wbuf();
        auth::auth_ok(buf);
        for (name, value) in self.params.reported() {
            backend::parameter_status_msg(buf, name, value);
        }
        backend::backend_key_data(buf, key.0, key.1);
        backend::ready_for_query(buf, b'I');
        self.client
            .flush()
            .await
            .map_err(|_| ClientError::fatal(ErrorKind::ClientLost, "08006", "client went away"))
    }

    /// Session mode: the server is the client's for good, and so is its real key.
    /// With routing, the primary server is kept for the client's requests that need it.
    async fn attach_for_session(&mut self) -> Result<(i32, i32), ClientError> {
        let pool = self.pool.clone();
        let mut guard = self.checkout_reconciled(&pool).await?;
        let server = guard.server();
        self.params.adopt_reported(&server.params);
        if let Some(handle) = self.shared.cancel.register((server.pid, server.secret)) {
            self.cancel = handle;
        }
        let node = pool.key.node;
        if self.routing.enabled {
            self.held[node] = Some(guard);
        } else {
            self.cancel.set(Some(server.cancel_target())).await;
            self.wire.node = node;
            self.attachment = Attachment::Attached(guard);
        }
        Ok(self.cancel.key())
    }

    async fn checkout_reconciled(&mut self, pool: &Arc<Pool>) -> Result<ServerGuard, ClientError> {
        let mut guard = match pool.checkout(&self.waiter).await {
            Ok(guard) => guard,
            Err(err) => {
                // The client sees its own error; operators need to see the server side.
                tracing::warn!(pool = ?pool.key, %err, "no server for a client");
                return Err(pool_error(err));
            }
        };
        if let Err(err) = guard.server().reconcile(&self.params).await {
            let server_clean = matches!(err, ServerError::Query(_));
            let client_error = server_error(err);
            if server_clean {
                guard.release();
            }
            return Err(client_error);
        }
        Ok(guard)
    }

    async fn run(mut self) {
        loop {
            if matches!(self.attachment, Attachment::Detached) {
                match self.next_request().await {
                    Ok(true) => {}
                    Ok(false) => return self.finish().await,
                    Err(err) => return self.fail(err).await,
                }
            }
            let Attachment::Attached(guard) = &mut self.attachment else {
                continue;
            };
            let server = guard.server();
            let end = self
                .wire
                .relay(
                    &mut self.client,
                    &mut server.conn,
                    (&mut server.params, &mut self.params),
                    &self.shared.pools,
                )
                .await;
            match end {
                RelayEnd::TransactionDone => self.detach().await,
                RelayEnd::ClientGone => return self.finish().await,
                RelayEnd::ClientProtocol(err) => {
                    return self.fail(ClientError::protocol(err.to_string())).await
                }
                RelayEnd::ClientIo(err) => {
                    tracing::debug!(%err, "client connection failed");
                    return self.finish().await;
                }
                RelayEnd::ServerGone(err) => {
                    tracing::warn!(user = %self.login.user, err = ?err, "server connection lost during a session");
                    self.attachment = Attachment::Detached;
                    self.client.shutdown().await;
                    return;
                }
            }
        }
    }

    /// Transaction mode: waits for a complete request and attaches a server for it.
    /// `Ok(false)` when the client is done.
    async fn next_request(&mut self) -> Result<bool, ClientError> {
        if let Err(err) = self
            .wire
            .read_request(&mut self.client, &self.shared.pools)
            .await
        {
            tracing::debug!(%err, "client read failed");
            return Ok(false);
        }
        if let Some(err) = self.wire.take_protocol_error() {
            return Err(ClientError::protocol(err.to_string()));
        }
        if !self.wire.has_request() {
            return Ok(false);
        }
        match self.attach_routed().await {
            Ok(mut guard) => {
                self.cancel.set(Some(guard.server().cancel_target())).await;
                let node = guard.pool().key.node;
                self.wire.record_request(&mut self.client, node);
                self.wire.hold_at_boundary = self.routing.enabled
                    && !self.routing.pinned
                    && self.shared.cluster.load().primary != Some(node);
                self.attachment = Attachment::Attached(guard);
            }
            Err(mut err) => {
                err.fatal = false;
                // The request never ran: answer it like a failed statement. A request
                // that ended with Flush is not over: the error goes out now, and the
                // ReadyForQuery after the client's Sync, as PostgreSQL would do it.
                let sync_owed = self.wire.discard_request(&mut self.client);
                err.encode(self.client.wbuf());
                if self.client.flush().await.is_err() {
                    return Ok(false);
                }
                if sync_owed && self.wire.skip_until_sync(&mut self.client).await.is_err() {
                    return Ok(false);
                }
                backend::ready_for_query(self.client.wbuf(), b'I');
                if self.client.flush().await.is_err() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Routes the buffered request and returns a server on the chosen node. A replica
    /// that cannot give a server hands the request to the primary instead.
    async fn attach_routed(&mut self) -> Result<ServerGuard, ClientError> {
        let node = self.route().await?;
        match self.server_on(node).await {
            Ok(guard) => Ok(guard),
            Err(err) => {
                let topology = self.shared.cluster.snapshot();
                if let Some(state) = topology.nodes.get(node) {
                    NodeStats::count(&state.stats.errors);
                }
                match topology.primary {
                    Some(primary) if primary != node && err.kind == ErrorKind::ServerConnect => {
                        tracing::warn!(node, code = %err.code, message = %err.message, "replica unavailable; reading from the primary");
                        self.server_on(primary).await
                    }
                    _ => Err(err),
                }
            }
        }
    }

    /// Decides which node runs the buffered request (the start of a transaction).
    async fn route(&mut self) -> Result<usize, ClientError> {
        let no_primary = || {
            ClientError::fatal(
                ErrorKind::ServerConnect,
                "08006",
                "no primary server is available",
            )
        };
        if !self.routing.enabled || self.routing.pinned {
            return self.shared.cluster.load().primary.ok_or_else(no_primary);
        }
        let topology = self.shared.cluster.snapshot();
        let primary = topology.primary.ok_or_else(no_primary)?;
        let (read_after_write, load_balance, prefer_lower_lag) = {
            let config = self.shared.config.load();
            let r = &config.routing;
            (r.read_after_write, r.load_balance, r.prefer_lower_lag)
        };
        let plan = router::plan_request(
            self.wire.request(&mut self.client),
            &self.shared.router.classifier(),
            &self.wire.statements,
        );
        if plan.session_state && self.mode == PoolMode::Session {
            self.pin(primary, plan.reason).await;
        }
        let mut target = plan.target;
        if target == Target::Replica
            && !plan.functions.is_empty()
            && self.any_volatile(&plan.functions, primary).await?
        {
            target = Target::Primary;
        }
        let stats = |node: usize| topology.nodes[node].stats.clone();
        if target == Target::Primary {
            self.routing.wrote = true;
            self.routing.fence_pending = true;
            NodeStats::count(&stats(primary).writes);
            return Ok(primary);
        }
        if let Some(node) = plan
            .node
            .filter(|&n| topology.nodes.get(n).is_some_and(|s| s.up))
        {
            NodeStats::count(&stats(node).selects);
            return Ok(node);
        }
        let mut fence = None;
        match read_after_write {
            ReadAfterWrite::Off | ReadAfterWrite::Transaction => {}
            ReadAfterWrite::Session if self.routing.wrote => {
                NodeStats::count(&stats(primary).selects);
                return Ok(primary);
            }
            ReadAfterWrite::Session => {}
            ReadAfterWrite::Lsn => {
                if self.routing.fence_pending && topology.has_readable_replica() {
                    self.routing.fence = Some(self.primary_wal_position(primary).await?);
                    self.routing.fence_pending = false;
                }
                fence = if self.routing.fence_pending {
                    Some(u64::MAX)
                } else {
                    self.routing.fence
                };
            }
        }
        let pools = &self.pools;
        let busy = |node: usize| {
            pools.get(node).and_then(Option::as_ref).map_or(0, |p| {
                let (idle, total, _) = p.counts();
                total - idle
            })
        };
        let choice = Choice {
            load_balance,
            prefer_lower_lag,
            fence,
            busy: &busy,
        };
        let node = router::pick(
            &topology,
            &choice,
            &self.shared.router,
            &mut self.routing.dice,
        )
        .unwrap_or(primary);
        NodeStats::count(&stats(node).selects);
        Ok(node)
    }

    /// Session mode: keeps the client on its primary server from now on, and lets the
    /// servers it held elsewhere go.
    async fn pin(&mut self, primary: usize, reason: Option<Reason>) {
        tracing::info!(user = %self.login.user, ?reason, "session pinned to the primary");
        self.routing.pinned = true;
        self.wire.transaction_pooling = false;
        for node in 0..self.held.len() {
            if node != primary {
                if let Some(guard) = self.held[node].take() {
                    self.farewell(guard, true).await;
                }
            }
        }
    }

    /// A server on `node`: the one this client holds there (session mode), or one
    /// from the node's pool.
    async fn server_on(&mut self, node: usize) -> Result<ServerGuard, ClientError> {
        if let Some(guard) = self.held.get_mut(node).and_then(Option::take) {
            return Ok(guard);
        }
        let pool = self.pool_on(node)?;
        self.checkout_reconciled(&pool).await
    }

    fn pool_on(&mut self, node: usize) -> Result<Arc<Pool>, ClientError> {
        if let Some(Some(pool)) = self.pools.get(node) {
            return Ok(pool.clone());
        }
        let config = self.shared.config.load();
        let pool = self
            .shared
            .node_pool(&config, node, &self.login.database, &self.login.user)?;
        if let Some(slot) = self.pools.get_mut(node) {
            *slot = Some(pool.clone());
        }
        Ok(pool)
    }

    /// Runs a one-value query on the primary (a held server, or one from the pool).
    async fn primary_value(
        &mut self,
        primary: usize,
        sql: &str,
    ) -> Result<Option<String>, ClientError> {
        let mut guard = self.server_on(primary).await?;
        let result = guard.server().query_value(sql).await;
        let reusable = matches!(&result, Ok(_) | Err(ServerError::Query(_)));
        if reusable {
            match self.mode {
                PoolMode::Session => self.held[primary] = Some(guard),
                PoolMode::Transaction => guard.release(),
            }
        }
        result.map_err(server_error)
    }

    /// The primary's WAL insert position: at or past the end of every commit so far.
    async fn primary_wal_position(&mut self, primary: usize) -> Result<u64, ClientError> {
        let value = self
            .primary_value(
                primary,
                "SELECT pg_catalog.pg_current_wal_insert_lsn()::text",
            )
            .await?;
        value
            .as_deref()
            .and_then(crate::cluster::parse_lsn)
            .ok_or_else(|| {
                ClientError::error(
                    ErrorKind::ServerConnect,
                    "08006",
                    "could not read the primary's WAL position",
                )
            })
    }

    /// Whether any of `functions` is volatile in the client's database (looked up once
    /// per name on the primary; names PostgreSQL does not know count as volatile).
    async fn any_volatile(
        &mut self,
        functions: &[Box<str>],
        primary: usize,
    ) -> Result<bool, ClientError> {
        let database = self.login.database.clone();
        for function in functions {
            let volatile = match self.shared.router.volatility(&database, function) {
                Some(known) => known,
                None => {
                    let answer = self
                        .primary_value(primary, &Router::volatility_query(function))
                        .await?;
                    let volatile = answer.as_deref() != Some("f");
                    self.shared
                        .router
                        .learn_volatility(&database, function, volatile);
                    tracing::debug!(%function, volatile, "learned a function's volatility");
                    volatile
                }
            };
            if volatile {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn detach(&mut self) {
        self.cancel.set(None).await;
        if let Attachment::Attached(guard) =
            std::mem::replace(&mut self.attachment, Attachment::Detached)
        {
            match self.mode {
                PoolMode::Transaction => guard.release(),
                PoolMode::Session => {
                    let node = guard.pool().key.node;
                    self.held[node] = Some(guard);
                }
            }
        }
    }

    /// The client is leaving: return or discard its servers.
    async fn finish(mut self) {
        self.cancel.set(None).await;
        if let Attachment::Attached(mut guard) =
            std::mem::replace(&mut self.attachment, Attachment::Detached)
        {
            let clean = self.wire.server_clean(&mut guard.server().conn);
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
                        guard.release();
                    }
                    Err(err) => {
                        tracing::warn!(%err, "server_reset_query failed; closing the server")
                    }
                }
            }
        }
    }

    async fn fail(mut self, err: ClientError) {
        err.encode(self.client.wbuf());
        let _ = self.client.flush().await;
        self.client.shutdown().await;
        self.finish().await;
    }
}

fn pool_error(err: PoolError) -> ClientError {
    match err {
        PoolError::Timeout(wait) => ClientError::error(
            ErrorKind::PoolTimeout,
            "53400",
            format!("query_wait_timeout: no server connection became available within {wait:?}"),
        ),
        PoolError::Server(err) => server_error(err),
    }
}

/// A server's own refusal is passed on as it is; pgrelay's trouble reaching it is 08006.
fn server_error(err: ServerError) -> ClientError {
    match err {
        ServerError::Rejected(fields) | ServerError::Query(fields) => {
            ClientError::fatal(ErrorKind::ServerAuth, fields.code, fields.message)
        }
        other => ClientError::fatal(ErrorKind::ServerConnect, "08006", other.to_string()),
    }
}
