//! pgrelay: a PostgreSQL connection pooler and read/write router.
//!
//! # Layout
//! - [`protocol`]: the sans-IO wire codec (framing, the relay's scanner, startup
//!   packets, message views and builders).
//! - [`stream`]: the only owner of sockets; buffered frame reads, batched writes.
//! - [`listener`]: accept loop, `max_client_conn`, one task per client, drain on
//!   shutdown; also [`listener::Pgrelay`], a running instance.
//! - [`auth`]: the startup handshake and client authentication; server credentials.
//! - [`session`]: one client session (greeting, request loop), its parameters, the
//!   zero-copy relay, what transaction mode carries across servers (named prepared
//!   statements, session settings, pins), and the registry of clients and per-database
//!   counters the console and metrics read.
//! - [`pool`]: server connection pools, server login, checkout guards, maintenance.
//! - [`router`]: the SQL classifier (and the session-effects pass), routing plans and
//!   replica choice.
//! - [`cluster`]: the topology snapshot, the health monitor and the failover state
//!   machine (node states, primary detection, split brain, hooks), and Patroni.
//! - [`admin`]: the admin console (virtual database `pgrelay`/`pgbouncer`): Pgpool-II's
//!   and PgBouncer's SHOW tables, RELOAD, PAUSE/RESUME/KILL, SHUTDOWN, node operations.
//! - [`cancel`]: the cancel-key registry.
//! - [`metrics`]: Prometheus metrics with pre-resolved handles, and the HTTP listener
//!   for `/metrics`, `/healthz`, `/readyz`.
//! - [`config`]: the TOML config, its validation and defaults.
//! - [`demo`]: throwaway local PostgreSQL clusters for `pgrelay demo` and the tests.
//! - [`error`]: error kinds, sides, and what clients may be told.
//!
//! A query flows listener → auth → session → pool (checkout) → relay → pool (release).

#![forbid(unsafe_code)]
#![warn(clippy::unwrap_used, clippy::todo, clippy::dbg_macro)]

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod router;
pub mod session;
pub mod shutdown;
pub mod stream;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use arc_swap::ArcSwap;

use config::Config;
use error::{sqlstate, ClientError, ErrorKind};
use pool::server::ServerTarget;
use pool::{Pool, PoolKey, PoolSettings, Pools};

/// Everything sessions and background tasks share, built once at start-up.
pub struct Shared {
    pub config: ArcSwap<Config>,
    pub cluster: cluster::Cluster,
    pub router: router::Router,
    pub pools: Arc<Pools>,
    pub cancel: Arc<cancel::CancelRegistry>,
    pub credentials: Arc<auth::Credentials>,
    /// Connected clients, for `max_client_conn`.
    pub clients: AtomicUsize,
    pub metrics: metrics::Metrics,
    /// Prepared statements known to parse, by content (transaction mode).
    pub parsed: Arc<session::prepared::Parsed>,
    /// Failover hooks: the queue and what ran.
    pub hooks: cluster::hooks::Hooks,
    /// Who is connected, per-database counters, paused databases.
    pub registry: Arc<session::registry::Registry>,
    /// The file `RELOAD` and SIGHUP read (none: the config came from elsewhere).
    pub config_path: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// Set by the console's `SHUTDOWN`; `main` waits on it with the signals.
    pub shutdown_requested: tokio::sync::Notify,
    /// Set once shutdown began: idle clients are told and closed.
    pub shutting_down: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// Builds the shared state; starts the hook runner, so it needs a Tokio runtime.
    pub fn new(config: Config) -> Shared {
        let topology = cluster::Topology::from_config(&config);
        Shared {
            router: router::Router::new(&config),
            config: ArcSwap::from_pointee(config),
            cluster: cluster::Cluster::new(topology),
            pools: Arc::default(),
            cancel: Arc::default(),
            credentials: Arc::default(),
            clients: AtomicUsize::new(0),
            metrics: metrics::Metrics::new(),
            parsed: Arc::default(),
            hooks: cluster::hooks::Hooks::start(),
            registry: Arc::default(),
            config_path: std::sync::Mutex::new(None),
            shutdown_requested: tokio::sync::Notify::new(),
            shutting_down: tokio::sync::watch::channel(false).0,
        }
    }

    /// Asks the process to shut down gracefully (as SIGTERM does).
    pub fn request_shutdown(&self) {
        self.shutdown_requested.notify_one();
    }

    /// Re-reads the config file (`RELOAD`, SIGHUP). An invalid file is rejected with
    /// the reason, and the running config stays.
    pub fn reload(&self) -> Result<(), config::ConfigError> {
        let path = self
            .config_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| config::ConfigError::Invalid {
                key: "(file)".to_owned(),
                message: "pgrelay was not started from a config file; nothing to reload".to_owned(),
            })?;
        let config = match Config::load(&path) {
            Ok(config) => config,
            Err(err) => {
                tracing::error!(err = %err.with_reason(), path = %path.display(), "reload rejected; keeping the running configuration");
                return Err(err);
            }
        };
        self.apply(config);
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }

    /// Puts a validated config in place: routing, nodes (added, removed, weights),
    /// pool limits and credentials, and everything read per request. Pools of
    /// unchanged nodes keep their servers; transactions in flight are not touched.
    pub fn apply(&self, config: Config) {
        self.router.reconfigure(&config);
        let transitions = self.cluster.reconfigure(&config);
        for node in &transitions.removed {
            self.pools.retire_node(*node);
        }
        for pool in self.pools.all() {
            let user = config.user(&pool.key.user).cloned();
            if let Some(user) = user {
                let settings = pool_settings(&config, &pool.key.database, &pool.key.user);
                pool.reconfigure(settings, user);
            }
        }
        if !transitions.added.is_empty() || !transitions.removed.is_empty() {
            tracing::info!(added = ?transitions.added, removed = ?transitions.removed, "backends changed");
        }
        cluster::health::act(self, &config, &transitions.transitions);
        self.config.store(Arc::new(config));
    }

    /// The node operations the admin console calls (`DETACH NODE`, `ATTACH NODE`,
    /// `PROMOTE NODE [SWITCHOVER]`): the state machine decides, then pools are dropped
    /// and hooks queued as for any other transition.
    pub fn operate(
        &self,
        op: cluster::failover::Operation,
    ) -> Result<(), cluster::failover::OperationError> {
        let config = self.config.load_full();
        let transitions = self.cluster.operate(op, &config)?;
        cluster::health::act(self, &config, &transitions);
        Ok(())
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
            .ok_or_else(|| {
                ClientError::fatal(
                    ErrorKind::Auth,
                    sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    format!("role \"{user}\" is not known to pgrelay"),
                )
            })?
            .clone();
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
            };
            let settings = pool_settings(config, database, user);
            Pool::new(key, target, settings, user_config, self.credentials.clone())
        });
        Ok(pool)
    }
}

/// The limits of the pool for `database` and `user` under `config`.
fn pool_settings(config: &Config, database: &str, user: &str) -> PoolSettings {
    PoolSettings {
        size: config.pool_size_for(database, user) as usize,
        min_size: config.pool.min_pool_size as usize,
        wait_timeout: config.pool.query_wait_timeout,
        connect_timeout: config.pool.server_connect_timeout,
        idle_timeout: config.pool.server_idle_timeout,
        lifetime: config.pool.server_lifetime,
    }
}
