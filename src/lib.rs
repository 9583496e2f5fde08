//! pgrelay: a PostgreSQL connection pooler and read/write router.
//!
//! # Layout
//!
//! Modules stand on floors: a module imports only from its own floor or from floors
//! below, so nothing lower knows anything higher exists (`tests/floors.rs` reads every
//! `crate::` path in `src/` and keeps it so).
//!
//! | floor | module | owns |
//! |------:|--------|------|
//! | 10 | `main.rs` | the CLI, logging, runtime, wiring (with [`shutdown`], [`service`], [`demo`], [`import`]) |
//! |  9 | [`listener`] | accept loops (clients, the metrics/health HTTP listener), `max_client_conn`, a task per client (a session or the console), drain on shutdown; [`listener::Pgrelay`], a running instance |
//! |  9 | [`takeover`] | `pgrelay run --takeover`: the takeover socket, listening sockets and clients passed to a new process with their session state |
//! |  8 | [`control`] | the one place that acts on change: reload, apply, console operations (`PAUSE`, `KILL`, `DETACH`, `PROMOTE`...), the node transitions the cluster loops hand up |
//! |  7 | [`admin`] | the admin console (virtual database `pgrelay`/`pgbouncer`): PgBouncer's and Pgpool-II's SHOW tables |
//! |  7 | [`metrics`] | Prometheus metrics with pre-resolved handles; the answers to `/metrics`, `/healthz`, `/readyz` |
//! |  6 | [`session`] | one client session: login, request loop, routing inside it, the zero-copy relay, what transaction mode carries across servers |
//! |  5 | [`router`] | the SQL classifier and session effects, routing plans, replica choice |
//! |  4 | [`cluster`] | the topology snapshot; health, lag and Patroni loops that report their findings ([`cluster::Monitor`]); the failover state machine; hooks, gated in a fleet by an etcd lease |
//! |  3 | [`pool`] | server connections: pools, checkout, guards, maintenance, one server with its session state (parameters, prepared-statement LRU) |
//! |  3 | [`registry`] | who is connected (clients, per-database counters, pauses), for the console and metrics |
//! |  3 | [`cancel`] | cancel keys: a client's key to the server running its query |
//! |  2 | [`auth`] | the startup handshake, client authentication, server credentials |
//! |  1 | [`stream`] | the only owner of sockets; buffered frame reads, batched writes |
//! |  0 | [`protocol`] | the sans-IO wire codec |
//! |  0 | [`config`] | the TOML config, validation, defaults, the names it reserves (admin databases) |
//! |  0 | [`error`] | error kinds, sides, and what clients may be told |
//!
//! [`Shared`], below, is the context built at start-up and handed to sessions and
//! everything above them (floor 6 and up); lower floors get only the pieces they use
//! (a pool its settings, the cluster loops a [`cluster::Monitor`]). Its acting methods
//! (reload, the console's operations) are written in [`control`].
//!
//! A query flows listener → auth → session → pool (checkout) → relay → pool (release).

#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used, clippy::todo, clippy::dbg_macro)]

pub mod admin;
pub mod auth;
#[doc(hidden)]
pub mod benching;
pub mod cancel;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod import;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod registry;
pub mod router;
pub mod service;
pub mod session;
pub mod shutdown;
pub mod stream;
pub mod takeover;
pub mod tls;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;

use config::Config;
use error::{sqlstate, ClientError, ErrorKind};
use pool::server::ServerTarget;
use pool::{Pool, PoolKey, PoolSettings, Pools};

/// Everything sessions and background tasks share, built once at start-up.
pub struct Shared {
    /// Shared with the cluster loops ([`cluster::Monitor`]), which read it each round.
    pub config: Arc<ArcSwap<Config>>,
    /// Shared with the cluster loops, which publish what they observe in it.
    pub cluster: Arc<cluster::Cluster>,
    pub router: router::Router,
    pub pools: Arc<Pools>,
    pub cancel: Arc<cancel::CancelRegistry>,
    pub credentials: Arc<auth::Credentials>,
    /// Failed logins per source address (`limits.auth_failure_limit`).
    pub auth_throttle: auth::throttle::Throttle,
    /// How server connections (pools, health and lag checks) use TLS: the current
    /// `[tls]` server settings, rebuilt on reload.
    pub server_tls: Arc<tls::connect::Connector>,
    /// Connected clients, for `max_client_conn`.
    pub clients: AtomicUsize,
    pub metrics: metrics::Metrics,
    /// Prepared statements known to parse, by content (transaction mode).
    pub parsed: Arc<session::statement::Parsed>,
    /// Failover hooks: the queue, what ran, what another instance's lease deferred.
    pub hooks: cluster::hooks::Hooks,
    /// The fleet's failover lease (`failover.lease`): whether this instance may run
    /// the hooks. Its campaign loop is started with the other cluster loops.
    pub lease: Arc<cluster::lease::Lease>,
    /// Who is connected, per-database counters, paused databases.
    pub registry: Arc<registry::Registry>,
    /// The file `RELOAD` and SIGHUP read (none: the config came from elsewhere).
    pub config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// Set by the console's `SHUTDOWN`; `main` waits on it with the signals.
    pub shutdown_requested: tokio::sync::Notify,
    /// Set once shutdown began: idle clients are told and closed.
    pub shutting_down: tokio::sync::watch::Sender<bool>,
    /// The client-facing TLS policy and acceptor, loaded from `[tls]` by
    /// [`listener::Pgrelay::start`] and swapped by a reload; read once per login.
    pub client_tls: ArcSwap<tls::accept::ClientTls>,
    /// Set when another process takes over (`pgrelay run --takeover`): where sessions
    /// that can move are handed.
    pub handover: std::sync::OnceLock<session::handover::Outbox>,
}

impl Shared {
    /// Builds the shared state; starts the hook runner, so it needs a Tokio runtime.
    pub fn new(config: Config) -> Shared {
        let topology = cluster::Topology::from_config(&config);
        let client_tls = tls::accept::ClientTls::unavailable(config.tls.client_mode);
        let server_tls = Arc::new(server_tls(&config.tls));
        let instance = cancel::instance_id(&config);
        let router = router::Router::new(&config);
        let config = Arc::new(ArcSwap::from_pointee(config));
        let lease = Arc::new(cluster::lease::Lease::new(config.clone(), instance));
        Shared {
            router,
            config,
            cluster: Arc::new(cluster::Cluster::new(topology)),
            pools: Arc::default(),
            cancel: Arc::new(cancel::CancelRegistry::new(instance)),
            credentials: Arc::default(),
            auth_throttle: auth::throttle::Throttle::default(),
            server_tls,
            clients: AtomicUsize::new(0),
            metrics: metrics::Metrics::new(),
            parsed: Arc::default(),
            hooks: cluster::hooks::Hooks::gated(lease.clone()),
            lease,
            registry: Arc::default(),
            config_path: std::sync::Mutex::new(None),
            shutdown_requested: tokio::sync::Notify::new(),
            shutting_down: tokio::sync::watch::channel(false).0,
            client_tls: ArcSwap::from_pointee(client_tls),
            handover: std::sync::OnceLock::new(),
        }
    }

    /// The pool for a client's database and user on `node`.
    pub fn node_pool(
        &self,
        config: &Config,
        node: usize,
        database: &str,
        user: &str,
    ) -> Result<Arc<Pool>, ClientError> {
        let state = self
            .cluster
            .load()
            .nodes
            .get(node)
            .map(|n| (n.host.clone(), n.port))
            .ok_or_else(|| {
                ClientError::fatal(
                    ErrorKind::ServerConnect,
                    sqlstate::CONNECTION_FAILURE,
                    "no such server",
                )
            })?;
        let user_config = config
            .user(user)
            .cloned()
            .or_else(|| self.credentials.queried_user(user))
            .ok_or_else(|| {
                ClientError::fatal(
                    ErrorKind::Auth,
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("role \"{user}\" is not known to pgrelay"),
                )
            })?;
        let key = PoolKey {
            node,
            database: database.to_owned(),
            user: user.to_owned(),
        };
        let dbname = config
            .database(database)
            .map_or(database, |d| d.server_dbname())
            .to_owned();
        let pool = self.pools.get_or_create(key, |key| {
            let target = ServerTarget {
                host: state.0,
                port: state.1,
                dbname,
                user: user.to_owned(),
                tls: self.server_tls.clone(),
            };
            let settings = pool_settings(config, database, user);
            Pool::new(key, target, settings, user_config, self.credentials.clone())
        });
        Ok(pool)
    }
}

/// The server TLS settings `tls` asks for. A `server_ca` that cannot be loaded is
/// logged, and TLS to servers then fails until a reload loads one
/// ([`listener::Pgrelay::start`] refuses to start with it).
fn server_tls(tls: &config::TlsConfig) -> tls::connect::Connector {
    tls::connect::Connector::new(tls).unwrap_or_else(|err| {
        tracing::error!(%err, "server TLS settings could not be built; TLS connections to servers will fail");
        tls::connect::Connector::failed(tls.server_mode, err)
    })
}

/// The limits of the pool for `database` and `user` under `config`.
pub(crate) fn pool_settings(config: &Config, database: &str, user: &str) -> PoolSettings {
    PoolSettings {
        size: config.pool_size_for(database, user) as usize,
        min_size: config.pool.min_pool_size as usize,
        wait_timeout: config.pool.query_wait_timeout,
        connect_timeout: config.pool.server_connect_timeout,
        idle_timeout: config.pool.server_idle_timeout,
        lifetime: config.pool.server_lifetime,
        max_user_connections: config.max_user_connections_for(user) as usize,
        max_db_connections: config.max_db_connections_for(database) as usize,
    }
}
