//! The configuration file's schema: one type per table, with its defaults.
//!
//! Only data lives here: the structs and enums serde fills in, their `Default` impls
//! (which are the documented defaults) and a hand-written `Debug` where a password must
//! stay hidden. Loading, validation and warnings are in the parent module; string values
//! that need parsing (durations, addresses, passwords) are in `values`.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::hba::HbaRule;
use super::listen::{Listen, ListenAddr};
use super::values::{self, Secret};

/// PgBouncer's default `auth_query`.
pub const DEFAULT_AUTH_QUERY: &str = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Addresses the client listener binds: IP:port (IPv6 in brackets), or
    /// `unix:<socket file>`. Default `["127.0.0.1:6432"]`.
    pub listen: Vec<Listen>,
    /// Users allowed into the admin console (virtual database `pgrelay`). Default `[]`.
    pub admin_users: Vec<String>,
    /// Users allowed read-only `SHOW` commands in the admin console. Default `[]`.
    pub stats_users: Vec<String>,
    /// HTTP address for `/metrics`, `/healthz` and `/readyz`; `""` in the file gives
    /// `None` (disabled). Default `127.0.0.1:9930`.
    #[serde(deserialize_with = "values::deserialize_optional_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log line format. Default `text`.
    pub log_format: LogFormat,
    /// Threads that run sessions. 1 (the default) runs everything on one thread, as
    /// PgBouncer does: on a small machine shared with PostgreSQL it costs the least CPU
    /// per transaction. Raise it on a dedicated host with cores to spare.
    pub worker_threads: u32,
    /// How clients authenticate to pgrelay. Default `scram-sha-256`.
    pub auth_type: AuthType,
    /// The query that fetches the stored secret (SCRAM or md5) of a user not in
    /// `[[users]]`: two columns (name, secret), the user name as `$1`. It runs with
    /// `search_path = pg_catalog, pg_temp`, so objects elsewhere must be qualified.
    /// `""` turns the lookup off. Default PgBouncer's,
    /// `SELECT usename, passwd FROM pg_shadow WHERE usename=$1`.
    pub auth_query: String,
    /// The `[[users]]` entry whose pool on the primary runs `auth_query`; none (the
    /// default) turns the lookup off.
    pub auth_user: Option<String>,
    /// The database `auth_query` runs in. Default: the client's database.
    pub auth_dbname: Option<String>,
    /// How long a secret fetched by `auth_query` (or its absence) is reused; a failed
    /// login forgets it at once. `"0s"` fetches at every login. Default 60s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub auth_query_cache: Duration,
    /// `[pool]`: pool sizes and timeouts.
    pub pool: PoolConfig,
    /// `[routing]`: read/write splitting.
    pub routing: RoutingConfig,
    /// `[health_check]`: probing the backends.
    pub health_check: HealthCheckConfig,
    /// `[failover]`: reacting to a lost primary.
    pub failover: FailoverConfig,
    /// `[tls]`: TLS towards clients and servers.
    pub tls: TlsConfig,
    /// `[limits]`: bounds on what a hostile or broken client can make pgrelay hold.
    pub limits: LimitsConfig,
    /// `[[backends]]`: the cluster's PostgreSQL nodes. At least one is required.
    pub backends: Vec<BackendConfig>,
    /// `[[databases]]`: database names clients may ask for. Default `[]`, which lets any
    /// name through unchanged (see [`Config::allows_any_database`]).
    pub databases: Vec<DatabaseConfig>,
    /// `[[users]]`: who may log in, with their passwords. Default `[]`.
    pub users: Vec<UserConfig>,
    /// `[[hba]]`: access rules, first match wins; a rule's `method` replaces
    /// `auth_type` (and `users.auth_type`) for the connections it matches. Default `[]`:
    /// no rules, everyone authenticates by `auth_type`.
    pub hba: Vec<HbaRule>,
    /// This instance's id in a fleet of pgrelays (0 to [`MAX_INSTANCE_ID`]), carried in
    /// the cancel keys it issues, so that a CancelRequest another instance receives
    /// finds its way here. Default: derived from the host name at start (a pod's name
    /// in Kubernetes); set it when `[[peers]]` name this instance. Read at start.
    pub instance_id: Option<u16>,
    /// `[[peers]]`: the other pgrelays of the fleet, where CancelRequests for the keys
    /// they issued are forwarded (PgBouncer's `[peers]`). Default `[]`.
    pub peers: Vec<PeerConfig>,
    /// `host:port` whose every address is a pgrelay of the fleet (a Kubernetes headless
    /// Service), looked up when a CancelRequest comes for a key that neither this
    /// instance nor a `[[peers]]` entry issued: each address gets it once, and the one
    /// that issued the key acts on it. Default none.
    pub peers_dns: Option<String>,
    /// A Unix socket where this pgrelay waits for `pgrelay run --takeover` (a new
    /// process, e.g. an upgraded binary): it hands that process its listening sockets
    /// and, between transactions, its clients. Only this user may connect (0600 and a
    /// peer check). `""` in the file gives none. Default none (no takeover).
    #[serde(deserialize_with = "values::deserialize_optional_path")]
    pub takeover_socket: Option<std::path::PathBuf>,
}

/// The largest `instance_id`: issued pids carry it above Linux's pids, in 11 bits.
pub const MAX_INSTANCE_ID: u16 = 2043;

/// One `[[peers]]` entry: another pgrelay of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its `instance_id`. Required.
    pub id: u16,
    /// Where it listens for clients. Required.
    pub host: String,
    /// Default 6432.
    #[serde(default = "default_peer_port")]
    pub port: u16,
}

fn default_peer_port() -> u16 {
    6432
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 6432))).into()],
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9930))),
            log_format: LogFormat::default(),
            worker_threads: 1,
            auth_type: AuthType::default(),
            auth_query: DEFAULT_AUTH_QUERY.to_owned(),
            auth_user: None,
            auth_dbname: None,
            auth_query_cache: Duration::from_secs(60),
            pool: PoolConfig::default(),
            routing: RoutingConfig::default(),
            health_check: HealthCheckConfig::default(),
            failover: FailoverConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            backends: Vec::new(),
            databases: Vec::new(),
            users: Vec::new(),
            hba: Vec::new(),
            instance_id: None,
            peers: Vec::new(),
            peers_dns: None,
            takeover_socket: None,
        }
    }
}

/// `log_format`: how log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `auth_type`: how clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
pub enum AuthType {
    /// No password asked.
    #[serde(rename = "trust")]
    Trust,
    /// Cleartext password over the wire.
    #[serde(rename = "plain")]
    Plain,
    /// MD5 challenge; users stored with a SCRAM secret get SCRAM instead.
    #[serde(rename = "md5")]
    Md5,
    /// SCRAM-SHA-256 (default); SCRAM-SHA-256-PLUS too for TLS clients.
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// A TLS client certificate the `tls.client_ca` verified, whose CN is the user
    /// name; no password is asked (PostgreSQL's and PgBouncer's `cert`).
    #[serde(rename = "cert")]
    Cert,
}

/// Where a database entry's (or a listener's) clients are sent: the endpoints of a
/// PgBouncer `mydb_write` / `mydb_read` pair, or of HAProxy's write and read ports,
/// without SQL parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointTarget {
    /// Each transaction is routed by what its SQL does (`[routing]`).
    #[default]
    Auto,
    /// Everything goes to the primary.
    Primary,
    /// Every transaction goes to a replica within the lag limits, in a read-only
    /// session: a write fails with 25006 as it would on the replica itself.
    Replica,
    /// Every transaction goes to any node that takes reads, the primary included, as
    /// the load balancer picks; nothing is made read-only.
    Any,
}

/// `pool.mode` and the per-database / per-user `pool_mode` overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection is held for the client's whole session.
    Session,
    /// A server connection is held for one transaction (default).
    #[default]
    Transaction,
}

/// `[pool]`: connection pool sizes and timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Default pooling mode. Default `transaction`.
    pub mode: PoolMode,
    /// Server connections per (node, database, user). Default 20.
    pub default_pool_size: u32,
    /// Server connections kept open even when idle, per pool. Default 0.
    pub min_pool_size: u32,
    /// Client connections accepted at once; more are refused. Default 10000.
    pub max_client_conn: u32,
    /// Server connections per user on each node, over all of that user's pools; 0 is
    /// no limit (PgBouncer `max_user_connections`). `[[users]]` may override it.
    /// Default 0.
    pub max_user_connections: u32,
    /// Server connections per database (the name clients ask for) on each node, over
    /// all of its users' pools; 0 is no limit (PgBouncer `max_db_connections`).
    /// `[[databases]]` may override it. Default 0.
    pub max_db_connections: u32,
    /// Clients of one user logged in at once; 0 is no limit (PgBouncer
    /// `max_user_client_connections`). `[[users]]` may override it. Default 0.
    pub max_user_client_connections: u32,
    /// Clients of one database (the name they ask for) logged in at once; 0 is no limit
    /// (PgBouncer `max_db_client_connections`). `[[databases]]` may override it.
    /// Default 0.
    pub max_db_client_connections: u32,
    /// How long a client waits for a server connection before an error. Default 120s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub query_wait_timeout: Duration,
    /// Idle server connections older than this are closed. Default 600s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub server_idle_timeout: Duration,
    /// Server connections older than this are closed when released. Default 3600s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub server_lifetime: Duration,
    /// Time a client has to finish startup and authentication. Default 60s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub client_login_timeout: Duration,
    /// Time allowed to connect and log in to a server. Default 5s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub server_connect_timeout: Duration,
    /// Run on a server connection when a session-mode client releases it; `""` runs
    /// nothing. Default `"DISCARD ALL"`.
    pub server_reset_query: String,
    /// Prepared statements tracked per server connection in transaction mode. Default 200.
    pub max_prepared_statements: u32,
    /// On SIGTERM, how long to let clients finish before closing them. Default 30s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub shutdown_timeout: Duration,
    /// Server connections the whole fleet of pgrelays may open to one node: each
    /// instance takes its share, this divided by the live instances it counts (its
    /// `[[peers]]` or `peers_dns`), over all its pools; 0 is no limit. Default 0.
    pub max_fleet_server_connections: u32,
    /// A request its server has not finished answering after this long (counted from
    /// when it was sent, or from the last ReadyForQuery of a pipeline) is cancelled,
    /// its server closed and its client told FATAL 57014; 0 is off (PgBouncer
    /// `query_timeout`). Default 0.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub query_timeout: Duration,
    /// A client idle inside a transaction block for longer is told FATAL 25P03 and
    /// closed, and its server closed (rolling the transaction back); 0 is off
    /// (PgBouncer `idle_transaction_timeout`). Default 0.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub idle_transaction_timeout: Duration,
    /// A transaction block open for longer, running or idle, is ended the same way
    /// with FATAL 25P04; 0 is off (PgBouncer `transaction_timeout`). Default 0.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub transaction_timeout: Duration,
    /// A client idle outside a transaction for longer is told FATAL 57P05 and closed;
    /// its server, if it holds one, goes back to the pool; 0 is off (PgBouncer
    /// `client_idle_timeout`). Default 0.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub client_idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            default_pool_size: 20,
            min_pool_size: 0,
            max_client_conn: 10_000,
            max_user_connections: 0,
            max_db_connections: 0,
            max_user_client_connections: 0,
            max_db_client_connections: 0,
            query_wait_timeout: Duration::from_secs(120),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            client_login_timeout: Duration::from_secs(60),
            server_connect_timeout: Duration::from_secs(5),
            server_reset_query: "DISCARD ALL".to_owned(),
            max_prepared_statements: 200,
            shutdown_timeout: Duration::from_secs(30),
            max_fleet_server_connections: 0,
            query_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            transaction_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
        }
    }
}

/// `[limits]`: bounds on what one client can make pgrelay hold in memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of one request (a Query, or extended-protocol messages up to Sync) that
    /// pgrelay buffers before it routes the request and checks out a server for it.
    /// A larger request (Bind parameters count) is refused with SQLSTATE 54000 and
    /// the connection closed.
    /// COPY data and requests relayed to a server already attached stream and are
    /// not counted. `0`: no limit but the protocol's (1 GB per message, as
    /// PostgreSQL). Default 16 MiB.
    pub max_request_buffer: u64,
    /// How long a failed login waits before the client is told (PostgreSQL's
    /// `auth_delay.milliseconds`; PgBouncer has none): it slows password guessing on
    /// one connection. Only refused logins wait. `"0s"`: none. Default 500ms.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub auth_failure_delay: Duration,
    /// Failed logins (kind `auth`: a wrong password, an unknown user, an hba reject)
    /// one source IP address may have in `auth_failure_window`; past it, every new
    /// login from that address, even a correct one, is refused at once with 53300
    /// until the window that began with its first failure passes. At most 10,000
    /// addresses are tracked. `0`: no limit. Default 100.
    pub auth_failure_limit: u32,
    /// The window of `auth_failure_limit`. Default 60s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub auth_failure_window: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_request_buffer: 16 << 20,
            auth_failure_delay: Duration::from_millis(500),
            auth_failure_limit: 100,
            auth_failure_window: Duration::from_secs(60),
        }
    }
}

/// `routing.read_after_write`: when a client's reads must go to the primary after it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadAfterWrite {
    /// Reads may go to replicas right after a write.
    Off,
    /// Reads stay on the primary until the writing transaction ends.
    Transaction,
    /// Reads stay on the primary for the rest of the session.
    Session,
    /// Reads go to replicas that have replayed the client's last write LSN (default).
    #[default]
    Lsn,
}

/// `routing.load_balance`: how a replica is picked for a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    /// Random, in proportion to `backends.weight` (default).
    #[default]
    WeightedRandom,
    /// In turn.
    RoundRobin,
    /// The node with the fewest busy server connections.
    LeastConnections,
}

/// `[routing]`: read/write splitting between the primary and the replicas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Send reads to replicas; `false` sends everything to the primary. Default `true`.
    pub enabled: bool,
    /// Read-your-writes policy. Default `lsn`.
    pub read_after_write: ReadAfterWrite,
    /// Replica selection. Default `weighted_random`.
    pub load_balance: LoadBalance,
    /// Extra functions whose call makes a `SELECT` a write. Default `[]`.
    pub write_functions: Vec<String>,
    /// User functions known not to write, so their `SELECT` may go to a replica. Default `[]`.
    pub read_only_functions: Vec<String>,
    /// A replica more than this many bytes behind leaves the read set; 0 = no limit.
    /// Default 16777216 (16 MiB).
    pub max_lag_bytes: u64,
    /// Likewise in seconds of replay delay; 0 = no limit. Default 10.0.
    pub max_lag_seconds: f64,
    /// How often replica lag is measured. Default 1s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub lag_check_period: Duration,
    /// Prefer the replica with the least lag over `load_balance`. Default `false`.
    pub prefer_lower_lag: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            enabled: true,
            read_after_write: ReadAfterWrite::Lsn,
            load_balance: LoadBalance::WeightedRandom,
            write_functions: Vec::new(),
            read_only_functions: Vec::new(),
            max_lag_bytes: 16 * 1024 * 1024,
            max_lag_seconds: 10.0,
            lag_check_period: Duration::from_secs(1),
            prefer_lower_lag: false,
        }
    }
}

/// `[health_check]`: periodic probes of every backend. `Debug` hides the password.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Time between probes of one node. Default 5s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub period: Duration,
    /// A probe not answered within this fails. Default 2s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub timeout: Duration,
    /// Failed probes retried before the node is declared down. Default 2.
    pub max_retries: u32,
    /// Pause between retries. Default 1s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub retry_delay: Duration,
    /// PostgreSQL user the probe logs in as. Default `"postgres"`.
    pub user: String,
    /// That user's plaintext password; never shown by `Debug`. Default `""`.
    #[serde(deserialize_with = "values::deserialize_redacted_string")]
    pub password: String,
    /// Database the probe connects to. Default `"postgres"`.
    pub database: String,
    /// Consecutive successful probes before a down node may serve again. Default 2.
    pub up_after: u32,
    /// A server connection that fails under a client (refused, reset, closed
    /// mid-request) has its node probed at once instead of at the next period
    /// (Pgpool-II's `failover_on_backend_error`, but checked rather than trusted).
    /// Default `true`.
    pub recheck_on_backend_error: bool,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            period: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            max_retries: 2,
            retry_delay: Duration::from_secs(1),
            user: "postgres".to_owned(),
            password: String::new(),
            database: "postgres".to_owned(),
            up_after: 2,
            recheck_on_backend_error: true,
        }
    }
}

impl fmt::Debug for HealthCheckConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = if self.password.is_empty() {
            ""
        } else {
            "<redacted>"
        };
        f.debug_struct("HealthCheckConfig")
            .field("period", &self.period)
            .field("timeout", &self.timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_delay", &self.retry_delay)
            .field("user", &self.user)
            .field("password", &format_args!("{password:?}"))
            .field("database", &self.database)
            .field("up_after", &self.up_after)
            .field("recheck_on_backend_error", &self.recheck_on_backend_error)
            .finish()
    }
}

/// `failover.topology`: where the cluster's shape comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologySource {
    /// `[[backends]]` as listed, roles detected by probing (default).
    #[default]
    Static,
    /// Patroni's REST API at `patroni_urls`.
    Patroni,
}

/// `failover.lease`: how a fleet of pgrelays watching one cluster agrees on which of
/// them runs the failover hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    /// Every instance runs its hooks (one pgrelay per cluster; default).
    #[default]
    None,
    /// Only the holder of a lease in etcd (v3 API, `lease_endpoints`) runs them.
    Etcd,
    /// A Kubernetes Lease: parsed so the message can say so, refused by validation.
    Kubernetes,
}

/// `[failover]`: what happens when the primary is lost or comes back.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Shell command run when a node goes down, with Pgpool-II placeholders. Default `""`.
    pub failover_command: String,
    /// Shell command run when a node comes back. Default `""`.
    pub failback_command: String,
    /// Shell command run for each replica after a new primary appears. Default `""`.
    pub follow_primary_command: String,
    /// How long writes (and logins that need a server) wait for a primary that is
    /// gone or cannot be reached before failing. Default 30s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub hold_timeout: Duration,
    /// Put a recovered node back into service automatically. Default `true`.
    pub auto_failback: bool,
    /// Source of the topology. Default `static`.
    pub topology: TopologySource,
    /// Patroni REST endpoints (`http://`), needed for `patroni`. Default `[]`.
    pub patroni_urls: Vec<String>,
    /// How often Patroni's `/cluster` is read. Default 1s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub patroni_period: Duration,
    /// A failover, failback or follow-primary command still running after this is
    /// killed (and recorded as timed out). Default 60s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub command_timeout: Duration,
    /// Who in a fleet runs the hooks: every instance (`none`) or the holder of an
    /// etcd lease (`etcd`). Default `none`.
    pub lease: LeaseKind,
    /// etcd client URLs (`http://`), tried in order. Default `["http://127.0.0.1:2379"]`.
    pub lease_endpoints: Vec<String>,
    /// The etcd key the fleet's instances compete for: one per cluster; starts with
    /// `/`, does not end with one. Done-records live under `<lease_key>/done/`.
    /// Default `/pgrelay/failover`.
    pub lease_key: String,
    /// The lease's time to live: how long a dead holder keeps the others from acting.
    /// At least 2s. Default 10s.
    #[serde(deserialize_with = "values::deserialize_duration")]
    pub lease_ttl: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            failover_command: String::new(),
            failback_command: String::new(),
            follow_primary_command: String::new(),
            hold_timeout: Duration::from_secs(30),
            auto_failback: true,
            topology: TopologySource::Static,
            patroni_urls: Vec::new(),
            patroni_period: Duration::from_secs(1),
            command_timeout: Duration::from_secs(60),
            lease: LeaseKind::None,
            lease_endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            lease_key: "/pgrelay/failover".to_owned(),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// libpq-style TLS mode, for either side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS if the other side insists.
    Allow,
    /// TLS when available, plaintext otherwise (default).
    #[default]
    Prefer,
    /// TLS mandatory, certificates not checked.
    Require,
    /// TLS mandatory, peer certificate checked against the CA.
    VerifyCa,
    /// As `VerifyCa`, and the host name must match too.
    VerifyFull,
}

impl TlsMode {
    /// The spelling used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Allow => "allow",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }

    /// `require`, `verify-ca` or `verify-full`.
    pub fn is_required(self) -> bool {
        matches!(
            self,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull
        )
    }

    /// `verify-ca` or `verify-full`.
    pub fn verifies_peer(self) -> bool {
        matches!(self, TlsMode::VerifyCa | TlsMode::VerifyFull)
    }
}

/// `[tls]`: TLS towards clients (pgrelay as server) and towards PostgreSQL servers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// TLS policy for client connections. Default `disable`.
    pub client_mode: TlsMode,
    /// PEM certificate chain shown to clients. Default `""`.
    pub client_cert: String,
    /// PEM private key for `client_cert`. Default `""`.
    pub client_key: String,
    /// PEM CA bundle that client certificates are checked against. Default `""`.
    pub client_ca: String,
    /// TLS policy for server connections. Default `prefer`.
    pub server_mode: TlsMode,
    /// PEM CA bundle that server certificates are checked against. Default `""`.
    pub server_ca: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            client_mode: TlsMode::Disable,
            client_cert: String::new(),
            client_key: String::new(),
            client_ca: String::new(),
            server_mode: TlsMode::Prefer,
            server_ca: String::new(),
        }
    }
}

/// `backends.role`: the role an operator expects a node to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleHint {
    /// Expected to be the primary.
    Primary,
    /// Expected to be a streaming replica.
    Replica,
}

/// One `[[backends]]` entry: a PostgreSQL node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Host name or IP address. Required.
    pub host: String,
    /// TCP port. Default 5432.
    #[serde(default = "default_backend_port")]
    pub port: u16,
    /// Share of reads for `weighted_random`; 0 takes no reads. Integer or float. Default 1.
    #[serde(default = "default_backend_weight")]
    pub weight: f64,
    /// The node's data directory, only for `%D` / `%R` in failover commands. Default `""`.
    #[serde(default)]
    pub data_directory: String,
    /// Optional hint; the real role is always detected. Default none.
    #[serde(default)]
    pub role: Option<RoleHint>,
}

fn default_backend_port() -> u16 {
    5432
}

fn default_backend_weight() -> f64 {
    1.0
}

/// One `[[databases]]` entry: a database name clients may ask for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The name clients ask for. Required.
    pub name: String,
    /// The database's name on the servers. Default: same as `name`.
    #[serde(default)]
    pub dbname: Option<String>,
    /// Overrides `pool.mode` for this database. Default none.
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// Overrides `pool.default_pool_size` for this database. Default none.
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// Overrides `pool.max_db_connections` for this database (0: no limit). Default
    /// none.
    #[serde(default)]
    pub max_db_connections: Option<u32>,
    /// Overrides `pool.max_db_client_connections` for this database (0: no limit).
    /// Default none.
    #[serde(default)]
    pub max_db_client_connections: Option<u32>,
    /// Where its clients' requests go. Default `auto`.
    #[serde(default)]
    pub target: EndpointTarget,
    /// `target = "replica"`: with no replica able to take a request, the primary takes
    /// it (in a read-only session) rather than the request waiting for a replica
    /// until `failover.hold_timeout`. Default `true`.
    #[serde(default)]
    pub primary_fallback: Option<bool>,
}

impl DatabaseConfig {
    /// The database name to send to the servers: `dbname`, or else `name`.
    pub fn server_dbname(&self) -> &str {
        self.dbname.as_deref().unwrap_or(&self.name)
    }
}

/// One `[[users]]` entry: a user who may log in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name, as sent by the client and to the servers. Required.
    pub name: String,
    /// Plaintext, `md5<hex>` or a SCRAM-SHA-256 secret. Required.
    pub password: Secret,
    /// Overrides the database's and the global pool mode. Default none.
    #[serde(default)]
    pub pool_mode: Option<PoolMode>,
    /// Overrides the database's and the global pool size. Default none.
    #[serde(default)]
    pub pool_size: Option<u32>,
    /// Overrides `pool.max_user_connections` for this user (0: no limit). Default none.
    #[serde(default)]
    pub max_user_connections: Option<u32>,
    /// Overrides `pool.max_user_client_connections` for this user (0: no limit).
    /// Default none.
    #[serde(default)]
    pub max_user_client_connections: Option<u32>,
    /// Overrides the global `auth_type` for this user: e.g. `"cert"` for one that logs
    /// in with a client certificate while the others give passwords. Default none.
    #[serde(default)]
    pub auth_type: Option<AuthType>,
}

impl UserConfig {
    /// How this user proves itself under the global `auth_type`.
    pub fn auth_type_or(&self, global: AuthType) -> AuthType {
        self.auth_type.unwrap_or(global)
    }
}
