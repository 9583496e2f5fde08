//! Routing inside a session: which node runs the request that starts a transaction,
//! the read-after-write policy (the LSN fence), session-mode pinning, and getting a
//! server on the chosen node (a held one in session mode, else from the node's pool).

use std::sync::Arc;

use super::settle::Pin;
use super::{server_error, Session};
use crate::auth::ClientLogin;
use crate::cluster::{NodeStats, Role, Topology};
use crate::config::{Config, EndpointTarget, LoadBalance, PoolMode, ReadAfterWrite};
use crate::error::{sqlstate, ClientError, ErrorKind};
use crate::pool::server::ServerError;
use crate::pool::{Pool, ServerGuard};
use crate::router::classify::{Command, Reason, Target};
use crate::router::{self, Choice, Dice, Router};
use crate::Shared;

/// How long a request for a node that gave no server waits before trying again, if
/// the topology does not move first.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// A client's routing state.
pub(super) struct Routing {
    pub(super) mode: RouteMode,
    /// The last request routed went to the primary because it may write.
    pub(super) last_write: bool,
    /// The primary in the topology the last request was routed with.
    pub(super) primary: Option<usize>,
    writes: Writes,
    dice: Dice,
}

/// Whether a client's requests are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RouteMode {
    /// Routing is off, or there is only one backend, or the endpoint is the primary's:
    /// everything goes to the primary. (Session mode on a `replica` or `any` endpoint
    /// too: its server, chosen at login, is the client's for good.)
    Off,
    /// Each request that starts a transaction is classified and routed (unless the
    /// client is pinned: then it stays on the primary server it holds).
    PerRequest,
    /// Transaction mode on a `replica` endpoint: each transaction goes to a replica,
    /// unclassified; with none able to take it, to the primary if `fallback`, else it
    /// waits for one.
    Replica { fallback: bool },
    /// Transaction mode on an `any` endpoint: each transaction goes to any node that
    /// takes reads, unclassified.
    Any,
}

impl RouteMode {
    /// How a session on an endpoint with `target` is routed.
    pub(super) fn of(
        (target, fallback): (EndpointTarget, bool),
        config: &Config,
        nodes: usize,
        mode: PoolMode,
    ) -> RouteMode {
        let transaction_mode = mode == PoolMode::Transaction;
        match target {
            EndpointTarget::Auto if config.routing.enabled && nodes > 1 => RouteMode::PerRequest,
            EndpointTarget::Auto | EndpointTarget::Primary => RouteMode::Off,
            EndpointTarget::Replica if transaction_mode => RouteMode::Replica { fallback },
            EndpointTarget::Any if transaction_mode => RouteMode::Any,
            EndpointTarget::Replica | EndpointTarget::Any => RouteMode::Off,
        }
    }
}

/// What routing reads of the config, copied out of one load when a request starts
/// routing, so no snapshot is held while the request waits for a server.
#[derive(Debug, Clone, Copy)]
struct RoutePolicy {
    hold_timeout: std::time::Duration,
    read_after_write: ReadAfterWrite,
    load_balance: LoadBalance,
    prefer_lower_lag: bool,
}

impl RoutePolicy {
    fn of(config: &Config) -> RoutePolicy {
        RoutePolicy {
            hold_timeout: config.failover.hold_timeout,
            read_after_write: config.routing.read_after_write,
            load_balance: config.routing.load_balance,
            prefer_lower_lag: config.routing.prefer_lower_lag,
        }
    }
}

/// What a client's reads must see of its own writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// It has sent nothing that may write.
    None,
    /// It may have written since the last fence was taken: the next replica read takes
    /// a new one.
    Unfenced,
    /// The primary's WAL insert position after its last write: replicas must have
    /// replayed this far to serve its reads (`read_after_write = "lsn"`).
    Fenced(u64),
}

impl Routing {
    pub(super) fn new(mode: RouteMode) -> Routing {
        Routing {
            mode,
            last_write: true,
            primary: None,
            writes: Writes::None,
            dice: Dice::new(),
        }
    }
}

impl Routing {
    /// What a handover carries of the client's writes: `Some` if it may have
    /// written, with the WAL position its reads wait for if one was taken.
    pub(super) fn writes_state(&self) -> Option<Option<u64>> {
        match self.writes {
            Writes::None => None,
            Writes::Unfenced => Some(None),
            Writes::Fenced(lsn) => Some(Some(lsn)),
        }
    }

    /// Takes what [`Routing::writes_state`] gave in the process handing over.
    pub(super) fn resume_writes(&mut self, state: Option<Option<u64>>) {
        self.writes = match state {
            None => Writes::None,
            Some(None) => Writes::Unfenced,
            Some(Some(lsn)) => Writes::Fenced(lsn),
        };
    }
}

impl Session {
    /// Whether the next request is routed: routing is on and the client is not pinned
    /// (a pinned client stays on its primary server).
    pub(super) fn routes_request(&self) -> bool {
        self.routing.mode == RouteMode::PerRequest && self.pin.is_none()
    }

    /// Routes the buffered request and returns a server on the chosen node.
    ///
    /// A request that needs the primary while there is none waits for one (up to
    /// `failover.hold_timeout`). A node that cannot give a server is checked at once
    /// (`recheck_on_backend_error`); a read moves to the primary, and a request for
    /// the primary waits for the topology to change and tries again, within the same
    /// hold: a switchover costs a client between transactions a pause, not an error.
    /// So does a lookup on the primary that routing needed (its WAL position, a
    /// function's volatility). Nothing of the client's request has been sent yet.
    ///
    /// The config is read once per request, the topology once per attempt (and again
    /// only after waiting for it to change); both are passed down.
    ///
    /// `started` is when the request was complete: the hold counts from there.
    pub(super) async fn attach_routed(
        &mut self,
        started: tokio::time::Instant,
    ) -> Result<ServerGuard, ClientError> {
        let policy = RoutePolicy::of(&self.shared.config.load());
        let deadline = started + policy.hold_timeout;
        loop {
            let mut topology = self.shared.cluster.snapshot();
            let attached = match self.route(&policy, &mut topology, deadline).await {
                Ok(node) => self.attach_on(node, &topology).await?,
                Err(err)
                    if err.kind == ErrorKind::ServerConnect
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!(message = %err.message, "a lookup on the primary failed; waiting for the cluster to settle");
                    if let Some(primary) = topology.primary {
                        self.backend_failed(primary);
                    }
                    None
                }
                Err(err) => return Err(err),
            };
            if let Some(guard) = attached {
                self.routing.primary = topology.primary;
                return Ok(guard);
            }
            // Try again once the topology moves (a node marked down, a new primary),
            // or after a short pause; give up at the hold's end.
            let pause = tokio::time::Instant::now() + RETRY_PAUSE;
            self.shared.cluster.wait_change(pause.min(deadline)).await;
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(user = %self.login.user, "no server within failover.hold_timeout; the request fails");
                if self.routing.mode == (RouteMode::Replica { fallback: false }) {
                    return Err(ClientError::no_replica(started.elapsed()));
                }
                return Err(ClientError::no_primary(started.elapsed()));
            }
        }
    }

    /// A server on `node` for the routed request. `None` when the node (and, for a
    /// read, the primary too) could not give one: the node is checked at once and the
    /// request waits for the cluster to settle.
    async fn attach_on(
        &mut self,
        node: usize,
        topology: &Topology,
    ) -> Result<Option<ServerGuard>, ClientError> {
        let err = match self.server_on(node).await {
            Ok(guard) if !self.demoted(&guard, node, topology) => return Ok(Some(guard)),
            Ok(_) => ClientError::error(
                ErrorKind::ServerConnect,
                sqlstate::CONNECTION_FAILURE,
                "the primary is in recovery now",
            ),
            Err(err) if err.kind == ErrorKind::ServerConnect => err,
            Err(err) => return Err(err),
        };
        self.backend_failed(node);
        let strict = self.routing.mode == RouteMode::Replica { fallback: false };
        match topology.primary {
            Some(primary) if primary != node && !strict => {
                tracing::warn!(node, code = %err.code, message = %err.message, "replica unavailable; reading from the primary");
                match self.server_on(primary).await {
                    Ok(guard) => return Ok(Some(guard)),
                    Err(err) if err.kind == ErrorKind::ServerConnect => {
                        self.backend_failed(primary)
                    }
                    Err(err) => return Err(err),
                }
            }
            _ => {
                tracing::info!(node, message = %err.message, "no server on the primary; waiting for the cluster to settle");
            }
        }
        Ok(None)
    }

    /// A server to greet the client from, on the pool chosen at login. A node that
    /// cannot give one (a primary dying, a switchover) is checked at once, and the
    /// login is held like any request, until `deadline` (the login's
    /// `failover.hold_timeout`), then greeted from whichever node greets clients once
    /// the cluster has moved.
    pub(super) async fn greeting_server(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<ServerGuard, ClientError> {
        let config = self.shared.config.load_full();
        loop {
            let pool = self.pool.clone();
            let node = pool.key.node;
            match self.checkout_reconciled(&pool).await {
                Ok(guard) if !self.demoted(&guard, node, &self.shared.cluster.load()) => {
                    return Ok(guard)
                }
                Ok(_) => {}
                Err(err) if err.kind == ErrorKind::ServerConnect => {}
                Err(err) => return Err(err),
            }
            self.backend_failed(node);
            tracing::info!(node, user = %self.login.user, "no server to greet a client from; holding the login");
            let pause = tokio::time::Instant::now() + RETRY_PAUSE;
            self.shared.cluster.wait_change(pause.min(deadline)).await;
            if tokio::time::Instant::now() >= deadline {
                // At login, an error ends the connection.
                let mut err = ClientError::no_primary(config.failover.hold_timeout);
                err.fatal = true;
                return Err(err);
            }
            let endpoint = (self.mode, self.target);
            self.pool =
                greeting_pool(&self.shared, &config, &self.login, endpoint, deadline).await?;
        }
    }

    /// A server on what pgrelay takes for the primary says it is a hot standby (it was
    /// demoted and came back before its probe told): not for this request. The
    /// server goes, and the node is checked at once.
    fn demoted(&self, guard: &ServerGuard, node: usize, topology: &Topology) -> bool {
        let standby = guard.server_ref().params.hot_standby() && {
            // Its last probe said primary (an operator's PROMOTE NODE of a replica,
            // without a switchover, is taken at its word).
            topology.primary == Some(node)
                && topology
                    .nodes
                    .get(node)
                    .is_some_and(|n| n.role == Role::Primary)
        };
        if standby {
            tracing::warn!(
                node,
                "a server on the primary is a hot standby; checking the node"
            );
        }
        standby
    }

    /// A server connection to `node` failed: count it and have the node checked now.
    pub(super) fn backend_failed(&self, node: usize) {
        let topology = self.shared.cluster.load();
        if let Some(state) = topology.nodes.get(node) {
            NodeStats::count(&state.stats.errors);
        }
        if self
            .shared
            .config
            .load()
            .health_check
            .recheck_on_backend_error
        {
            self.shared.cluster.suspect(node);
        }
    }

    /// The primary, waiting for one until `deadline` if `topology` has none; after a
    /// wait, `topology` is the snapshot that has it.
    async fn primary_by(
        &self,
        topology: &mut Arc<Topology>,
        deadline: tokio::time::Instant,
    ) -> Result<usize, ClientError> {
        if let Some(primary) = topology.primary {
            return Ok(primary);
        }
        let started = tokio::time::Instant::now();
        tracing::info!(user = %self.login.user, "no primary; holding the request until one appears");
        match self.shared.cluster.wait_primary(deadline).await {
            Some(primary) => {
                tracing::info!(primary, waited = ?started.elapsed(), "a primary appeared; the held request goes on");
                *topology = self.shared.cluster.snapshot();
                Ok(primary)
            }
            None => Err(ClientError::no_primary(started.elapsed())),
        }
    }

    /// Decides which node runs the buffered request (the start of a transaction),
    /// under the request's `policy` and `topology`.
    async fn route(
        &mut self,
        policy: &RoutePolicy,
        topology: &mut Arc<Topology>,
        deadline: tokio::time::Instant,
    ) -> Result<usize, ClientError> {
        match self.routing.mode {
            RouteMode::Replica { fallback } => {
                return self
                    .route_to_reader(policy, topology, deadline, Some(fallback))
                    .await
            }
            RouteMode::Any => return self.route_to_reader(policy, topology, deadline, None).await,
            RouteMode::Off | RouteMode::PerRequest => {}
        }
        if !self.routes_request() {
            self.routing.last_write = true;
            return self.primary_by(topology, deadline).await;
        }
        let statements: &dyn router::StatementSource = match self.wire.prepared.as_deref() {
            Some(prepared) => prepared,
            None => &self.wire.statements,
        };
        let plan = router::plan_request(
            self.wire.request(&mut self.client),
            self.wire.texts.clone(),
            &self.shared.router.classifier(),
            statements,
        );
        if plan.session_state && self.mode == PoolMode::Session {
            let primary = self.primary_by(topology, deadline).await?;
            self.pin_to_primary(primary, plan.reason).await;
        }
        let writes = plan.target == Target::Primary || {
            if plan.functions.is_empty() {
                false
            } else {
                let primary = self.primary_by(topology, deadline).await?;
                self.any_volatile(&plan.functions, primary).await?
            }
        };
        self.routing.last_write = writes;
        let command = plan.command;
        if writes {
            self.routing.writes = Writes::Unfenced;
            let primary = self.primary_by(topology, deadline).await?;
            if let Some(state) = topology.nodes.get(primary) {
                NodeStats::count(&state.stats.writes);
                let stats = &state.stats;
                let counter = match command {
                    Some(Command::Insert) => &stats.inserts,
                    Some(Command::Update) => &stats.updates,
                    Some(Command::Delete) => &stats.deletes,
                    Some(Command::Ddl) => &stats.ddl,
                    _ => &stats.other,
                };
                NodeStats::count(counter);
            }
            return Ok(primary);
        }
        let node = match plan
            .node
            .filter(|&n| topology.nodes.get(n).is_some_and(|s| s.is_up()))
        {
            // A statement it uses lives there.
            Some(node) => node,
            None => match self.choose_reader(policy, topology).await? {
                Some(node) => node,
                // Nothing fresh enough: the primary takes it.
                None => self.primary_by(topology, deadline).await?,
            },
        };
        if let Some(state) = topology.nodes.get(node) {
            NodeStats::count(&state.stats.selects);
        }
        Ok(node)
    }

    /// The node for a transaction of a `replica` endpoint (`fallback`: whether the
    /// primary may take it when no replica can) or of an `any` endpoint (`None`),
    /// chosen by the load balancer with no fence. A `replica` endpoint with no
    /// fallback waits for a replica until the request's `deadline`, as a write waits
    /// for a primary.
    async fn route_to_reader(
        &mut self,
        policy: &RoutePolicy,
        topology: &mut Arc<Topology>,
        deadline: tokio::time::Instant,
        fallback: Option<bool>,
    ) -> Result<usize, ClientError> {
        let started = tokio::time::Instant::now();
        self.routing.last_write = false;
        loop {
            let picked = {
                // In a block: a choice (with its `dyn Fn`) must not live across an await.
                let busy = |node: usize| busy_on(&self.pools, node);
                let choice = Choice {
                    load_balance: policy.load_balance,
                    prefer_lower_lag: policy.prefer_lower_lag,
                    fence: None,
                    busy: &busy,
                    replicas_only: fallback.is_some(),
                };
                router::pick(
                    topology,
                    &choice,
                    &self.shared.router,
                    &mut self.routing.dice,
                )
            };
            let node = match (picked, fallback) {
                (Some(node), _) => node,
                (None, None | Some(true)) => self.primary_by(topology, deadline).await?,
                (None, Some(false)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ClientError::no_replica(started.elapsed()));
                    }
                    self.shared.cluster.wait_change(deadline).await;
                    *topology = self.shared.cluster.snapshot();
                    continue;
                }
            };
            if let Some(state) = topology.nodes.get(node) {
                NodeStats::count(&state.stats.selects);
            }
            return Ok(node);
        }
    }

    /// The node for a read, under the read-after-write policy and the load balancer;
    /// `None`: only the primary will do.
    async fn choose_reader(
        &mut self,
        policy: &RoutePolicy,
        topology: &Topology,
    ) -> Result<Option<usize>, ClientError> {
        let fence = match policy.read_after_write {
            ReadAfterWrite::Off | ReadAfterWrite::Transaction => None,
            ReadAfterWrite::Session if self.routing.writes != Writes::None => return Ok(None),
            ReadAfterWrite::Session => None,
            ReadAfterWrite::Lsn => {
                if self.routing.writes == Writes::Unfenced && topology.has_readable_replica() {
                    // Without a primary there is no position to fence at.
                    let Some(primary) = topology.primary else {
                        return Ok(None);
                    };
                    let lsn = self.primary_wal_position(primary).await?;
                    self.routing.writes = Writes::Fenced(lsn);
                }
                match self.routing.writes {
                    Writes::None => None,
                    Writes::Fenced(lsn) => Some(lsn),
                    // No replica to fence against: the primary takes it.
                    Writes::Unfenced => return Ok(None),
                }
            }
        };
        let busy = |node: usize| busy_on(&self.pools, node);
        let choice = Choice {
            load_balance: policy.load_balance,
            prefer_lower_lag: policy.prefer_lower_lag,
            fence,
            busy: &busy,
            replicas_only: false,
        };
        Ok(router::pick(
            topology,
            &choice,
            &self.shared.router,
            &mut self.routing.dice,
        ))
    }

    /// Session mode: something the client did cannot follow it to another server
    /// (notifications, temp tables, ...), so it stays on its primary server from now
    /// on, and the servers it held elsewhere go.
    async fn pin_to_primary(&mut self, primary: usize, reason: Option<Reason>) {
        tracing::info!(user = %self.login.user, ?reason, "session pinned to the primary");
        self.pin_to_server(Pin::for_good("session state"));
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
        if self.pools.len() <= node {
            // A node added since the session began (Patroni, a reload).
            self.pools.resize(node + 1, None);
            self.held.resize_with(node + 1, || None);
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
            self.put_back(guard);
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
                    sqlstate::CONNECTION_FAILURE,
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
        for function in functions {
            let known = self
                .shared
                .router
                .volatility(&self.login.database, function);
            let volatile = match known {
                Some(known) => known,
                None => {
                    let answer = self
                        .primary_value(primary, &Router::volatility_query(function))
                        .await?;
                    let volatile = answer.as_deref() != Some("f");
                    self.shared
                        .router
                        .learn_volatility(&self.login.database, function, volatile);
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
}

/// The pool a client is greeted from: the primary's. With no primary, transaction
/// mode greets from a replica that takes reads (its requests are routed one by one
/// anyway); session mode, and a cluster with nothing readable, wait for a primary
/// until `deadline` (the login's `failover.hold_timeout`). Session mode on a
/// `replica` or `any` endpoint is greeted from the node it keeps.
pub(super) async fn greeting_pool(
    shared: &Shared,
    config: &Config,
    login: &ClientLogin,
    (mode, target): (PoolMode, (EndpointTarget, bool)),
    deadline: tokio::time::Instant,
) -> Result<Arc<Pool>, ClientError> {
    let routed = match target.0 {
        EndpointTarget::Auto => config.routing.enabled,
        EndpointTarget::Primary => false,
        EndpointTarget::Replica | EndpointTarget::Any if mode == PoolMode::Session => {
            let node = session_endpoint_node(shared, config, target, deadline).await?;
            return shared.node_pool(config, node, &login.database, &login.user);
        }
        EndpointTarget::Replica | EndpointTarget::Any => true,
    };
    let (primary, readable) = {
        let topology = shared.cluster.load();
        let readable = topology.nodes.iter().position(|n| n.readable);
        (topology.primary, readable)
    };
    let node = match (primary, readable, mode) {
        (Some(primary), _, _) => primary,
        (None, Some(replica), PoolMode::Transaction) if routed => replica,
        _ => {
            shared.cluster.wait_primary(deadline).await.ok_or_else(|| {
                // At login, an error ends the connection.
                let mut err = ClientError::no_primary(config.failover.hold_timeout);
                err.fatal = true;
                err
            })?
        }
    };
    shared.node_pool(config, node, &login.database, &login.user)
}

/// Server connections in use on `node` by the session's pool there, for
/// `least_connections`.
fn busy_on(pools: &[Option<Arc<Pool>>], node: usize) -> usize {
    pools.get(node).and_then(Option::as_ref).map_or(0, |p| {
        let (idle, total, _) = p.counts();
        total - idle
    })
}

/// The node a session-mode client of a `replica` endpoint (or an `any` one) keeps
/// for its session, chosen by the load balancer; with no replica able to take it, the
/// primary if the endpoint falls back to it, else a replica waited for until
/// `deadline`.
async fn session_endpoint_node(
    shared: &Shared,
    config: &Config,
    (target, fallback): (EndpointTarget, bool),
    deadline: tokio::time::Instant,
) -> Result<usize, ClientError> {
    let started = tokio::time::Instant::now();
    let replicas_only = target == EndpointTarget::Replica;
    let mut dice = router::Dice::new();
    loop {
        let topology = shared.cluster.snapshot();
        let picked = {
            // In a block: a choice (with its `dyn Fn`) must not live across an await.
            let choice = Choice {
                load_balance: config.routing.load_balance,
                prefer_lower_lag: config.routing.prefer_lower_lag,
                fence: None,
                busy: &|_| 0,
                replicas_only,
            };
            router::pick(&topology, &choice, &shared.router, &mut dice)
        };
        if let Some(node) = picked {
            return Ok(node);
        }
        if !replicas_only || fallback {
            if let Some(primary) = topology.primary {
                return Ok(primary);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            let mut err = if replicas_only && !fallback {
                ClientError::no_replica(started.elapsed())
            } else {
                ClientError::no_primary(started.elapsed())
            };
            // At login, an error ends the connection.
            err.fatal = true;
            return Err(err);
        }
        shared.cluster.wait_change(deadline).await;
    }
}

impl router::StatementSource for super::prepared::Prepared {
    fn locate(&self, name: &[u8]) -> router::Located<'_> {
        match self.statement(name) {
            Some(statement) if !name.is_empty() => router::Located::Text(statement.text()),
            _ => router::Located::Unknown,
        }
    }
}
