//! Configuration: the TOML file's schema, its defaults, loading and validation.
//!
//! This module owns [`Config`], an immutable snapshot built once by [`Config::load`] (or
//! [`Config::from_toml_str`]) and then shared read-only. It reads the file and nothing
//! else: no sockets, no background tasks, no global state. Reloading is the caller's job:
//! build a new snapshot and keep the old one if the new one fails. Every section is
//! optional and every key has a default, except `[[backends]]` (at least one) and the
//! names and passwords of `[[databases]]` and `[[users]]`. Unknown keys are errors, and
//! every error names the key it is about (`pool.query_wait_timeout`, `backends[1].port`).
//! No error message and no `Debug` output ever contains a password. The types and their
//! defaults are in `schema.rs`; durations, addresses and passwords are parsed in `values.rs`;
//! the checks of values and their combinations are in `validate.rs`.

mod hba;
mod listen;
mod schema;
mod validate;
mod values;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_path_to_error::Segment;

pub use hba::{Cidr, HbaAddress, HbaMethod, HbaRule, HbaType, NameList, NamePattern};
pub use listen::{Listen, ListenAddr};

/// Where a client's requests go, and whether a `replica` endpoint may fall back to
/// the primary: from its listener, else from its database.
pub type Endpoint = (EndpointTarget, bool);
pub use schema::PeerConfig;
pub use schema::{
    AuthType, BackendConfig, Config, DatabaseConfig, EndpointTarget, FailoverConfig,
    HealthCheckConfig, LeaseKind, LoadBalance, LogFormat, PoolConfig, PoolMode, ReadAfterWrite,
    RoleHint, RoutingConfig, TlsConfig, TlsMode, TopologySource, UserConfig, MAX_INSTANCE_ID,
};
pub use values::{PatroniEndpoint, ScramSecret, Secret, ETCD_PORT};

/// The names of the admin console's virtual database (pgrelay's own and PgBouncer's);
/// a client connecting to either reaches the console, so no `[[databases]]` entry may
/// take one.
pub const ADMIN_DATABASES: [&str; 2] = ["pgrelay", "pgbouncer"];

/// Whether a client asking for `name` reaches the admin console.
pub fn is_admin_database(name: &str) -> bool {
    ADMIN_DATABASES.contains(&name)
}

/// Everything that can go wrong while loading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The OS reason is the source, not part of this
    /// message, so a caller printing the chain (`{:#}` of anyhow) shows it once.
    #[error("cannot read {}", path.display())]
    Read {
        /// The path given to [`Config::load`].
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: io::Error,
    },
    /// The text is not valid TOML or does not fit the schema. Only the TOML error's
    /// message is kept: its `Display` quotes the offending line, which may hold a password.
    #[error("{key}: {message}")]
    Parse {
        /// Where: a key path such as `backends[1].port`, or `line N` for a syntax error.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The file parsed but a value or a combination of values is not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// The key path of the offending value, e.g. `databases[2].name`.
        key: String,
        /// What is wrong, never quoting a password.
        message: String,
    },
}

impl ConfigError {
    /// The message followed by its sources (the OS reason of a `Read`), for one log line.
    pub fn with_reason(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(err) = source {
            text.push_str(": ");
            text.push_str(&err.to_string());
            source = err.source();
        }
        text
    }

    /// The key path a `Parse` or `Invalid` error is about.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml_str(&text)
    }

    /// Parses and validates the text of a configuration file.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let config: Config = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|err| parse_error(text, err))?;
        config.validate()?;
        Ok(config)
    }

    /// The `[[users]]` entry called `name`.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|user| user.name == name)
    }

    /// The user `auth_query` runs as, when the lookup of users not in `[[users]]` is on
    /// (`auth_user` set and `auth_query` not empty).
    pub fn auth_query_user(&self) -> Option<&str> {
        self.auth_user
            .as_deref()
            .filter(|_| !self.auth_query.trim().is_empty())
    }

    /// The `[[databases]]` entry called `name`. `None` also when the list is empty, in
    /// which case any name is allowed and passed through: see [`Self::allows_any_database`].
    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|db| db.name == name)
    }

    /// True when no `[[databases]]` is configured: clients' database names pass through.
    pub fn allows_any_database(&self) -> bool {
        self.databases.is_empty()
    }

    /// The pool mode for `user` on `db`: the user's override, else the database's, else
    /// `pool.mode`.
    pub fn pool_mode_for(&self, db: &str, user: &str) -> PoolMode {
        self.user(user)
            .and_then(|u| u.pool_mode)
            .or_else(|| self.database(db).and_then(|d| d.pool_mode))
            .unwrap_or(self.pool.mode)
    }

    /// Where `db`'s clients are sent, and whether a `replica` endpoint falls back to the
    /// primary. A database not listed is `auto`.
    pub fn target_for(&self, db: &str) -> Endpoint {
        self.database(db).map_or((EndpointTarget::Auto, true), |d| {
            (d.target, d.primary_fallback.unwrap_or(true))
        })
    }

    /// The pool size for `user` on `db`: the user's override, else the database's, else
    /// `pool.default_pool_size`.
    pub fn pool_size_for(&self, db: &str, user: &str) -> u32 {
        self.user(user)
            .and_then(|u| u.pool_size)
            .or_else(|| self.database(db).and_then(|d| d.pool_size))
            .unwrap_or(self.pool.default_pool_size)
    }

    /// Server connections `user` may have open on one node (0: no limit): the user's
    /// override, else `pool.max_user_connections`.
    pub fn max_user_connections_for(&self, user: &str) -> u32 {
        self.user(user)
            .and_then(|u| u.max_user_connections)
            .unwrap_or(self.pool.max_user_connections)
    }

    /// Server connections database `db` may have open on one node (0: no limit): the
    /// database's override, else `pool.max_db_connections`.
    pub fn max_db_connections_for(&self, db: &str) -> u32 {
        self.database(db)
            .and_then(|d| d.max_db_connections)
            .unwrap_or(self.pool.max_db_connections)
    }

    /// Clients of `user` that may be logged in at once (0: no limit).
    pub fn max_user_client_connections_for(&self, user: &str) -> u32 {
        self.user(user)
            .and_then(|u| u.max_user_client_connections)
            .unwrap_or(self.pool.max_user_client_connections)
    }

    /// Clients of database `db` that may be logged in at once (0: no limit).
    pub fn max_db_client_connections_for(&self, db: &str) -> u32 {
        self.database(db)
            .and_then(|d| d.max_db_client_connections)
            .unwrap_or(self.pool.max_db_client_connections)
    }
}

/// Turns a deserialization error into [`ConfigError::Parse`] with a readable key path.
fn parse_error(text: &str, err: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    let mut key = path_to_key(err.path());
    let inner = err.into_inner();
    // serde reports a missing field on the enclosing table; name the field itself.
    if let Some(field) = quoted_after(inner.message(), "missing field `") {
        push_key(&mut key, field);
    }
    if key.is_empty() {
        key = match inner.span() {
            Some(span) => format!("line {}", line_of(text, span.start)),
            None => "(file)".to_owned(),
        };
    }
    let message = inner
        .message()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::Parse { key, message }
}

/// `a.b[1].c` from serde_path_to_error's segments; numeric table keys become indexes.
fn path_to_key(path: &serde_path_to_error::Path) -> String {
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
                    key.push_str(&format!("[{name}]"));
                } else {
                    push_key(&mut key, name);
                }
            }
            Segment::Unknown => push_key(&mut key, "?"),
        }
    }
    key
}

fn push_key(key: &mut String, name: &str) {
    if !key.is_empty() {
        key.push('.');
    }
    key.push_str(name);
}

/// The text between `prefix` and the next backtick, e.g. the field in serde's messages.
fn quoted_after<'a>(message: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split_once('`').map(|(name, _)| name)
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// An enum setting as the config file spells it.
fn spelled<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A duration as the config file writes it.
/// A duration as pgrelay writes it (`SHOW CONFIG`, the importers): whole seconds, else
/// milliseconds.
pub fn duration_text(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl Config {
    /// Every scalar setting as `(key, value)`, for `SHOW CONFIG`. Passwords are not
    /// shown; lists are joined with commas.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let (p, r, h, f, t) = (
            &self.pool,
            &self.routing,
            &self.health_check,
            &self.failover,
            &self.tls,
        );
        let list = |items: &[String]| items.join(",");
        let listen: Vec<String> = self.listen.iter().map(|a| a.to_string()).collect();
        vec![
            ("listen", listen.join(",")),
            ("admin_users", list(&self.admin_users)),
            ("stats_users", list(&self.stats_users)),
            (
                "metrics_listen",
                self.metrics_listen
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
            ("log_format", spelled(&self.log_format)),
            ("worker_threads", self.worker_threads.to_string()),
            ("auth_type", spelled(&self.auth_type)),
            ("auth_query", self.auth_query.clone()),
            ("auth_user", self.auth_user.clone().unwrap_or_default()),
            ("auth_dbname", self.auth_dbname.clone().unwrap_or_default()),
            ("auth_query_cache", duration_text(self.auth_query_cache)),
            (
                "instance_id",
                self.instance_id
                    .map_or_else(String::new, |id| id.to_string()),
            ),
            ("peers_dns", self.peers_dns.clone().unwrap_or_default()),
            (
                "takeover_socket",
                self.takeover_socket
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
            (
                "peers",
                list(
                    &self
                        .peers
                        .iter()
                        .map(|p| format!("{}={}:{}", p.id, p.host, p.port))
                        .collect::<Vec<_>>(),
                ),
            ),
            ("pool.mode", spelled(&p.mode)),
            ("pool.default_pool_size", p.default_pool_size.to_string()),
            ("pool.min_pool_size", p.min_pool_size.to_string()),
            ("pool.max_client_conn", p.max_client_conn.to_string()),
            (
                "pool.max_user_connections",
                p.max_user_connections.to_string(),
            ),
            ("pool.max_db_connections", p.max_db_connections.to_string()),
            (
                "pool.max_user_client_connections",
                p.max_user_client_connections.to_string(),
            ),
            (
                "pool.max_db_client_connections",
                p.max_db_client_connections.to_string(),
            ),
            (
                "pool.query_wait_timeout",
                duration_text(p.query_wait_timeout),
            ),
            (
                "pool.server_idle_timeout",
                duration_text(p.server_idle_timeout),
            ),
            ("pool.server_lifetime", duration_text(p.server_lifetime)),
            (
                "pool.client_login_timeout",
                duration_text(p.client_login_timeout),
            ),
            (
                "pool.server_connect_timeout",
                duration_text(p.server_connect_timeout),
            ),
            ("pool.server_reset_query", p.server_reset_query.clone()),
            (
                "pool.max_prepared_statements",
                p.max_prepared_statements.to_string(),
            ),
            ("pool.shutdown_timeout", duration_text(p.shutdown_timeout)),
            (
                "pool.max_fleet_server_connections",
                p.max_fleet_server_connections.to_string(),
            ),
            ("pool.query_timeout", duration_text(p.query_timeout)),
            (
                "pool.idle_transaction_timeout",
                duration_text(p.idle_transaction_timeout),
            ),
            (
                "pool.transaction_timeout",
                duration_text(p.transaction_timeout),
            ),
            (
                "pool.client_idle_timeout",
                duration_text(p.client_idle_timeout),
            ),
            ("routing.enabled", r.enabled.to_string()),
            ("routing.read_after_write", spelled(&r.read_after_write)),
            ("routing.load_balance", spelled(&r.load_balance)),
            ("routing.write_functions", list(&r.write_functions)),
            ("routing.read_only_functions", list(&r.read_only_functions)),
            ("routing.max_lag_bytes", r.max_lag_bytes.to_string()),
            ("routing.max_lag_seconds", r.max_lag_seconds.to_string()),
            (
                "routing.lag_check_period",
                duration_text(r.lag_check_period),
            ),
            ("routing.prefer_lower_lag", r.prefer_lower_lag.to_string()),
            ("health_check.period", duration_text(h.period)),
            ("health_check.timeout", duration_text(h.timeout)),
            ("health_check.max_retries", h.max_retries.to_string()),
            ("health_check.retry_delay", duration_text(h.retry_delay)),
            ("health_check.user", h.user.clone()),
            ("health_check.database", h.database.clone()),
            ("health_check.up_after", h.up_after.to_string()),
            (
                "health_check.recheck_on_backend_error",
                h.recheck_on_backend_error.to_string(),
            ),
            ("failover.failover_command", f.failover_command.clone()),
            ("failover.failback_command", f.failback_command.clone()),
            (
                "failover.follow_primary_command",
                f.follow_primary_command.clone(),
            ),
            ("failover.command_timeout", duration_text(f.command_timeout)),
            ("failover.hold_timeout", duration_text(f.hold_timeout)),
            ("failover.auto_failback", f.auto_failback.to_string()),
            ("failover.topology", spelled(&f.topology)),
            ("failover.patroni_urls", list(&f.patroni_urls)),
            ("failover.patroni_period", duration_text(f.patroni_period)),
            ("failover.lease", spelled(&f.lease)),
            ("failover.lease_endpoints", list(&f.lease_endpoints)),
            ("failover.lease_key", f.lease_key.clone()),
            ("failover.lease_ttl", duration_text(f.lease_ttl)),
            ("tls.client_mode", spelled(&t.client_mode)),
            ("tls.client_cert", t.client_cert.clone()),
            ("tls.client_key", t.client_key.clone()),
            ("tls.client_ca", t.client_ca.clone()),
            ("tls.server_mode", spelled(&t.server_mode)),
            ("tls.server_ca", t.server_ca.clone()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const MINIMAL: &str = "[[backends]]\nhost = \"127.0.0.1\"\n";

    /// The contract file: beside the real crate, or at its fixed place for scratch crates.
    fn contract_path() -> PathBuf {
        let beside = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/contract/pgrelay.toml"
        ));
        if beside.exists() {
            beside.to_owned()
        } else {
            PathBuf::from("/work/shared/contract/pgrelay.toml")
        }
    }

    fn conf_path(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("conf")
            .join(name)
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text)
    }

    /// The error's key for `text` appended to a minimal valid file.
    fn error_key(text: &str) -> String {
        let err = parse(&format!("{text}\n{MINIMAL}")).expect_err(text);
        err.key().unwrap_or_default().to_owned()
    }

    fn parse_err(text: &str) -> ConfigError {
        parse(text).expect_err(text)
    }

    /// The key `validate()` reports after `change` is applied to a minimal valid config.
    fn invalid_key(change: impl FnOnce(&mut Config)) -> String {
        let mut config = parse(MINIMAL).expect("minimal config");
        change(&mut config);
        match config.validate() {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    fn user(name: &str) -> UserConfig {
        UserConfig {
            name: name.to_owned(),
            password: Secret::Plain("pw".to_owned()),
            pool_mode: None,
            pool_size: None,
            auth_type: None,
            max_user_connections: None,
            max_user_client_connections: None,
        }
    }

    fn database(name: &str) -> DatabaseConfig {
        DatabaseConfig {
            name: name.to_owned(),
            dbname: None,
            pool_mode: None,
            pool_size: None,
            max_db_connections: None,
            max_db_client_connections: None,
            target: EndpointTarget::Auto,
            primary_fallback: None,
        }
    }

    fn assert_default_sections(config: &Config) {
        let defaults = Config::default();
        assert_eq!(format!("{:?}", config.pool), format!("{:?}", defaults.pool));
        assert_eq!(
            format!("{:?}", config.routing),
            format!("{:?}", defaults.routing)
        );
        let health = format!("{:?}", config.health_check);
        assert_eq!(health, format!("{:?}", defaults.health_check));
        assert_eq!(
            format!("{:?}", config.failover),
            format!("{:?}", defaults.failover)
        );
        assert_eq!(format!("{:?}", config.tls), format!("{:?}", defaults.tls));
    }

    #[test]
    fn loads_the_contract_file() {
        let config = Config::load(&contract_path()).expect("the contract must load");
        assert_eq!(config.listen, vec!["127.0.0.1:6432".parse().expect("addr")]);
        assert_eq!(config.admin_users, ["admin"]);
        assert_eq!(config.backends.len(), 2);
        assert_eq!(config.backends[1].port, 5433);
        assert_eq!(config.backends[0].weight, 1.0);
        assert_eq!(config.databases[0].server_dbname(), "app");
        assert_eq!(config.users.len(), 2);
        assert_default_sections(&config);
    }

    #[test]
    fn loads_conf_pgrelay_toml() {
        let config = Config::load(&conf_path("pgrelay.toml")).expect("conf/pgrelay.toml");
        assert_eq!(config.listen, vec!["127.0.0.1:6432".parse().expect("addr")]);
        let ports: Vec<u16> = config.backends.iter().map(|b| b.port).collect();
        assert_eq!(ports, [5432, 5433]);
        assert_eq!(config.backends[0].role, Some(RoleHint::Primary));
        assert_eq!(config.backends[1].role, Some(RoleHint::Replica));
        assert_eq!(config.databases.len(), 1);
        assert_eq!(
            config.database("app").map(|d| d.server_dbname()),
            Some("app")
        );
        assert!(config.user("app").is_some() && config.user("admin").is_some());
        assert_eq!(config.admin_users, ["admin"]);
        assert_default_sections(&config);
    }

    #[test]
    fn loads_conf_minimal_toml() {
        let config = Config::load(&conf_path("minimal.toml")).expect("conf/minimal.toml");
        assert_eq!(config.backends.len(), 1);
        assert_eq!(config.users.len(), 1);
        assert!(config.allows_any_database());
        assert_eq!(config.database("anything").map(|d| d.name.as_str()), None);
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Config::load(Path::new("/nonexistent/pgrelay.toml")).expect_err("no file");
        assert!(matches!(err, ConfigError::Read { .. }));
        assert_eq!(err.to_string(), "cannot read /nonexistent/pgrelay.toml");
        assert_eq!(
            err.with_reason(),
            "cannot read /nonexistent/pgrelay.toml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn top_level_defaults() {
        let config = parse(MINIMAL).expect("minimal");
        assert_eq!(
            config.listen,
            vec![ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 6432))).into()]
        );
        assert!(config.hba.is_empty());
        assert!(config.admin_users.is_empty() && config.stats_users.is_empty());
        assert_eq!(
            config.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9930)))
        );
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.auth_type, AuthType::ScramSha256);
        assert!(config.databases.is_empty() && config.users.is_empty());
        let backend = &config.backends[0];
        assert_eq!((backend.port, backend.weight), (5432, 1.0));
        assert_eq!((backend.data_directory.as_str(), backend.role), ("", None));
    }

    #[test]
    fn pool_defaults() {
        let pool = parse(MINIMAL).expect("minimal").pool;
        assert_eq!(pool.mode, PoolMode::Transaction);
        assert_eq!((pool.default_pool_size, pool.min_pool_size), (20, 0));
        assert_eq!(pool.max_client_conn, 10_000);
        assert_eq!(pool.query_wait_timeout, Duration::from_secs(120));
        assert_eq!(pool.server_idle_timeout, Duration::from_secs(600));
        assert_eq!(pool.server_lifetime, Duration::from_secs(3600));
        assert_eq!(pool.client_login_timeout, Duration::from_secs(60));
        assert_eq!(pool.server_connect_timeout, Duration::from_secs(5));
        assert_eq!(pool.server_reset_query, "DISCARD ALL");
        assert_eq!(pool.max_prepared_statements, 200);
        assert_eq!(pool.shutdown_timeout, Duration::from_secs(30));
    }

    #[test]
    fn routing_defaults() {
        let routing = parse(MINIMAL).expect("minimal").routing;
        assert!(routing.enabled);
        assert_eq!(routing.read_after_write, ReadAfterWrite::Lsn);
        assert_eq!(routing.load_balance, LoadBalance::WeightedRandom);
        assert!(routing.write_functions.is_empty() && routing.read_only_functions.is_empty());
        assert_eq!(routing.max_lag_bytes, 16_777_216);
        assert_eq!(routing.max_lag_seconds, 10.0);
        assert_eq!(routing.lag_check_period, Duration::from_secs(1));
        assert!(!routing.prefer_lower_lag);
    }

    #[test]
    fn health_check_failover_and_tls_defaults() {
        let config = parse(MINIMAL).expect("minimal");
        let health = &config.health_check;
        assert_eq!(
            (health.period, health.timeout),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert_eq!(
            (health.max_retries, health.retry_delay),
            (2, Duration::from_secs(1))
        );
        assert_eq!(
            (health.user.as_str(), health.password.as_str()),
            ("postgres", "")
        );
        assert_eq!(health.database, "postgres");
        let failover = &config.failover;
        assert!(failover.failover_command.is_empty() && failover.failback_command.is_empty());
        assert!(failover.follow_primary_command.is_empty() && failover.patroni_urls.is_empty());
        assert_eq!(failover.hold_timeout, Duration::from_secs(30));
        assert!(failover.auto_failback);
        assert_eq!(failover.topology, TopologySource::Static);
        let tls = &config.tls;
        assert_eq!(
            (tls.client_mode, tls.server_mode),
            (TlsMode::Disable, TlsMode::Prefer)
        );
        assert!(tls.client_cert.is_empty() && tls.client_key.is_empty());
        assert!(tls.client_ca.is_empty() && tls.server_ca.is_empty());
    }

    #[test]
    fn parses_every_enum_spelling() {
        let text = format!(
            "log_format = \"json\"\nauth_type = \"md5\"\n[pool]\nmode = \"session\"\n\
             [routing]\nread_after_write = \"off\"\nload_balance = \"least_connections\"\n\
             [failover]\ntopology = \"patroni\"\npatroni_urls = [\"http://p:8008\"]\n\
             [tls]\nserver_mode = \"verify-full\"\nserver_ca = \"ca.pem\"\n{MINIMAL}"
        );
        let config = parse(&text).expect("valid");
        assert_eq!(
            (config.log_format, config.auth_type),
            (LogFormat::Json, AuthType::Md5)
        );
        assert_eq!(config.pool.mode, PoolMode::Session);
        assert_eq!(config.routing.read_after_write, ReadAfterWrite::Off);
        assert_eq!(config.routing.load_balance, LoadBalance::LeastConnections);
        assert_eq!(config.failover.topology, TopologySource::Patroni);
        assert_eq!(config.tls.server_mode, TlsMode::VerifyFull);
    }

    #[test]
    fn parses_addresses() {
        let text = format!(
            "listen = [\"[::1]:6432\", \"0.0.0.0:6433\"]\nmetrics_listen = \"\"\n{MINIMAL}"
        );
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.listen[0],
            ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 6432))).into()
        );
        assert_eq!(config.metrics_listen, None);
        assert_eq!(error_key("listen = [\"localhost:6432\"]"), "listen[0]");
        assert_eq!(error_key("metrics_listen = \"9930\""), "metrics_listen");
    }

    #[test]
    fn weight_may_be_integer_or_float() {
        let text =
            "[[backends]]\nhost = \"a\"\nweight = 2\n[[backends]]\nhost = \"b\"\nweight = 0.5\n";
        let config = parse(text).expect("valid");
        assert_eq!(config.backends[0].weight, 2.0);
        assert_eq!(config.backends[1].weight, 0.5);
    }

    #[test]
    fn parses_md5_and_scram_passwords() {
        let md5 = postgres_protocol::password::md5(b"pw", "a");
        let scram = postgres_protocol::password::scram_sha_256(b"pw");
        let text = format!(
            "auth_type = \"md5\"\n{MINIMAL}[[users]]\nname = \"a\"\npassword = \"{md5}\"\n\
             [[users]]\nname = \"b\"\npassword = \"{scram}\"\n"
        );
        let config = parse(&text).expect("valid");
        assert!(matches!(config.users[0].password, Secret::Md5(_)));
        assert!(matches!(config.users[1].password, Secret::Scram(ref s) if s.iterations == 4096));
    }

    #[test]
    fn bad_durations_name_the_key() {
        assert_eq!(
            error_key("[pool]\nquery_wait_timeout = \"5\""),
            "pool.query_wait_timeout"
        );
        assert_eq!(
            error_key("[pool]\nserver_lifetime = 5"),
            "pool.server_lifetime"
        );
        assert_eq!(
            error_key("[health_check]\nperiod = \"5 days\""),
            "health_check.period"
        );
        assert_eq!(
            error_key("[failover]\nhold_timeout = \"30x\""),
            "failover.hold_timeout"
        );
        let err = parse_err(&format!("[pool]\nshutdown_timeout = 30\n{MINIMAL}"));
        assert!(
            err.to_string()
                .starts_with("pool.shutdown_timeout: a bare number"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_name_the_key() {
        assert_eq!(error_key("colour = 1"), "colour");
        assert_eq!(
            error_key("[pool]\npool_mode = \"session\""),
            "pool.pool_mode"
        );
        assert_eq!(error_key("[replication]\nx = 1"), "replication");
        let text = format!("{MINIMAL}[[backends]]\nhost = \"b\"\nhostname = \"c\"\n");
        assert_eq!(parse_err(&text).key(), Some("backends[1].hostname"));
        let err = parse_err(&format!("[tls]\nclient_sslmode = \"x\"\n{MINIMAL}"));
        assert!(
            err.to_string()
                .starts_with("tls.client_sslmode: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn unknown_enum_values_name_the_key() {
        assert_eq!(error_key("log_format = \"xml\""), "log_format");
        assert_eq!(error_key("auth_type = \"scram\""), "auth_type");
        assert_eq!(error_key("[pool]\nmode = \"statement\""), "pool.mode");
        assert_eq!(
            error_key("[routing]\nload_balance = \"random\""),
            "routing.load_balance"
        );
        assert_eq!(error_key("[tls]\nclient_mode = \"on\""), "tls.client_mode");
        assert_eq!(
            error_key("[failover]\ntopology = \"etcd\""),
            "failover.topology"
        );
        let text = format!("{MINIMAL}role = \"leader\"\n");
        assert_eq!(parse_err(&text).key(), Some("backends[0].role"));
    }

    #[test]
    fn type_errors_name_the_key() {
        let text = format!("{MINIMAL}[[backends]]\nhost = \"b\"\nport = 70000\n");
        assert_eq!(parse_err(&text).key(), Some("backends[1].port"));
        assert_eq!(error_key("[routing]\nenabled = \"yes\""), "routing.enabled");
        let text = format!("{MINIMAL}[[databases]]\npool_mode = \"session\"\n");
        assert_eq!(parse_err(&text).key(), Some("databases[0].name"));
        let text = format!("{MINIMAL}[[users]]\nname = \"a\"\n");
        assert_eq!(parse_err(&text).key(), Some("users[0].password"));
        assert_eq!(parse_err("[pool]\n").key(), Some("backends"));
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let err = parse_err("listen = [\"127.0.0.1:6432\"]\n[pool\nmode = 1\n");
        assert_eq!(err.key(), Some("line 2"), "{err}");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn errors_never_show_passwords() {
        let cases = [
            format!("{MINIMAL}[[users]]\nname = \"a\"\npassword = 8675309\n"),
            format!("{MINIMAL}[[users]]\nname = \"a\"\npassword = \"md58675309\"\n"),
            format!("{MINIMAL}[[users]]\nname = \"a\"\npassword = \"SCRAM-SHA-256$8675309\"\n"),
            format!("[health_check]\npassword = 8675309\n{MINIMAL}"),
            format!("[health_check]\npassword = \"8675309\n{MINIMAL}"),
        ];
        for text in &cases {
            let err = parse_err(text);
            assert!(!err.to_string().contains("8675309"), "{err}");
        }
        assert_eq!(parse_err(&cases[0]).key(), Some("users[0].password"));
        assert_eq!(parse_err(&cases[3]).key(), Some("health_check.password"));
    }

    #[test]
    fn debug_never_shows_passwords() {
        let text = format!(
            "[health_check]\npassword = \"probe-pw\"\n{MINIMAL}\
             [[users]]\nname = \"a\"\npassword = \"user-pw\"\n"
        );
        let shown = format!("{:?}", parse(&text).expect("valid"));
        assert!(
            !shown.contains("probe-pw") && !shown.contains("user-pw"),
            "{shown}"
        );
        assert!(shown.contains("Secret::Plain(<redacted>)"));
        assert!(shown.contains("password: \"<redacted>\""));
    }

    #[test]
    fn listen_tables_and_database_targets() {
        let text = format!(
            "listen = [\"127.0.0.1:6432\", {{ address = \"127.0.0.1:5001\", target = \"replica\", primary_fallback = false }}]\n{MINIMAL}\n\
             [[databases]]\nname = \"mydb_read\"\ndbname = \"mydb\"\ntarget = \"replica\"\n\
             [[databases]]\nname = \"mydb_write\"\ndbname = \"mydb\"\ntarget = \"primary\"\n"
        );
        let config = parse(&text).expect("targets");
        assert_eq!(config.listen[0].endpoint(), None);
        assert_eq!(
            config.listen[1].endpoint(),
            Some((EndpointTarget::Replica, false))
        );
        assert_eq!(
            config.listen[1].to_string(),
            "127.0.0.1:5001 (target = \"replica\")"
        );
        assert_eq!(
            config.target_for("mydb_read"),
            (EndpointTarget::Replica, true)
        );
        assert_eq!(
            config.target_for("mydb_write"),
            (EndpointTarget::Primary, true)
        );
        assert_eq!(config.target_for("other"), (EndpointTarget::Auto, true));
        let bad = format!(
            "listen = [{{ address = \"127.0.0.1:5001\", target = \"standby\" }}]\n{MINIMAL}"
        );
        assert_eq!(parse_err(&bad).key(), Some("listen[0].target"));
        let bad = format!("listen = [{{ addr = \"127.0.0.1:5001\" }}]\n{MINIMAL}");
        assert!(parse(&bad).is_err(), "unknown keys are refused");
    }

    #[test]
    fn validate_listen() {
        assert_eq!(invalid_key(|c| c.listen.clear()), "listen");
        assert_eq!(
            invalid_key(|c| c.listen.push(c.listen[0].clone())),
            "listen[1]"
        );
        assert_eq!(
            invalid_key(|c| c.metrics_listen = c.listen[0].tcp()),
            "metrics_listen"
        );
        let unix = |c: &mut Config| {
            let socket: ListenAddr = "unix:/tmp/.s.PGSQL.6432".parse().expect("unix");
            c.listen.extend([socket.clone().into(), socket.into()]);
        };
        assert_eq!(invalid_key(unix), "listen[2]");
        assert_eq!(error_key("listen = [\"unix:\"]"), "listen[0]");
        let text = format!("listen = [\"unix:/tmp/.s.PGSQL.6432\", \"[::1]:0\"]\n{MINIMAL}");
        assert_eq!(parse(&text).expect("unix and tcp").listen.len(), 2);
    }

    #[test]
    fn validate_backends() {
        assert_eq!(invalid_key(|c| c.backends.clear()), "backends");
        assert_eq!(
            invalid_key(|c| c.backends[0].host.clear()),
            "backends[0].host"
        );
        assert_eq!(invalid_key(|c| c.backends[0].port = 0), "backends[0].port");
        assert_eq!(
            invalid_key(|c| c.backends[0].weight = -1.0),
            "backends[0].weight"
        );
        assert_eq!(
            invalid_key(|c| c.backends[0].weight = f64::NAN),
            "backends[0].weight"
        );
        let duplicate = |c: &mut Config| c.backends.push(c.backends[0].clone());
        assert_eq!(invalid_key(duplicate), "backends[1]");
        let mut config = parse(MINIMAL).expect("minimal");
        config.backends[0].weight = 0.0;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn validate_pool() {
        assert_eq!(
            invalid_key(|c| c.pool.default_pool_size = 0),
            "pool.default_pool_size"
        );
        assert_eq!(
            invalid_key(|c| c.pool.min_pool_size = 21),
            "pool.min_pool_size"
        );
        assert_eq!(
            invalid_key(|c| c.pool.max_client_conn = 0),
            "pool.max_client_conn"
        );
        let zero = Duration::ZERO;
        assert_eq!(
            invalid_key(|c| c.pool.query_wait_timeout = zero),
            "pool.query_wait_timeout"
        );
        assert_eq!(
            invalid_key(|c| c.pool.client_login_timeout = zero),
            "pool.client_login_timeout"
        );
        let key = invalid_key(|c| c.pool.server_connect_timeout = zero);
        assert_eq!(key, "pool.server_connect_timeout");
        let mut config = parse(MINIMAL).expect("minimal");
        config.pool.server_reset_query.clear();
        config.pool.server_idle_timeout = zero;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn validate_pool_size_overrides() {
        let zero_db = |c: &mut Config| {
            c.databases.push(DatabaseConfig {
                pool_size: Some(0),
                ..database("d")
            })
        };
        assert_eq!(invalid_key(zero_db), "databases[0].pool_size");
        let zero_user = |c: &mut Config| {
            c.users.push(UserConfig {
                pool_size: Some(0),
                ..user("u")
            })
        };
        assert_eq!(invalid_key(zero_user), "users[0].pool_size");
        let below_min = |c: &mut Config| {
            c.pool.min_pool_size = 5;
            c.users.push(UserConfig {
                pool_size: Some(4),
                ..user("u")
            });
        };
        assert_eq!(invalid_key(below_min), "users[0].pool_size");
    }

    #[test]
    fn validate_routing_and_health_check() {
        assert_eq!(
            invalid_key(|c| c.routing.max_lag_seconds = -1.0),
            "routing.max_lag_seconds"
        );
        let infinite = |c: &mut Config| c.routing.max_lag_seconds = f64::INFINITY;
        assert_eq!(invalid_key(infinite), "routing.max_lag_seconds");
        let zero = Duration::ZERO;
        assert_eq!(
            invalid_key(|c| c.routing.lag_check_period = zero),
            "routing.lag_check_period"
        );
        assert_eq!(
            invalid_key(|c| c.health_check.period = zero),
            "health_check.period"
        );
        assert_eq!(
            invalid_key(|c| c.health_check.timeout = zero),
            "health_check.timeout"
        );
        assert_eq!(
            invalid_key(|c| c.health_check.user.clear()),
            "health_check.user"
        );
        assert_eq!(
            invalid_key(|c| c.health_check.database.clear()),
            "health_check.database"
        );
    }

    #[test]
    fn validate_databases_and_users() {
        let two = |c: &mut Config| c.databases.extend([database("a"), database("a")]);
        assert_eq!(invalid_key(two), "databases[1].name");
        assert_eq!(
            invalid_key(|c| c.databases.push(database(""))),
            "databases[0].name"
        );
        for console in ADMIN_DATABASES {
            assert_eq!(
                invalid_key(|c| c.databases.push(database(console))),
                "databases[0].name",
                "{console}"
            );
        }
        let empty = |c: &mut Config| {
            c.databases.push(DatabaseConfig {
                dbname: Some(String::new()),
                ..database("a")
            })
        };
        assert_eq!(invalid_key(empty), "databases[0].dbname");
        assert_eq!(
            invalid_key(|c| c.users.extend([user("u"), user("v"), user("u")])),
            "users[2].name"
        );
        assert_eq!(invalid_key(|c| c.users.push(user(""))), "users[0].name");
    }

    #[test]
    fn validate_md5_secret_needs_a_compatible_auth_type() {
        let md5 = Secret::Md5([0; 16]);
        let with_md5 = |c: &mut Config| {
            c.users.push(UserConfig {
                password: md5.clone(),
                ..user("u")
            })
        };
        assert_eq!(invalid_key(with_md5), "users[0].password");
        let mut config = parse(MINIMAL).expect("minimal");
        config.users.push(UserConfig {
            password: md5.clone(),
            ..user("u")
        });
        config.auth_type = AuthType::Md5;
        assert!(config.validate().is_ok());
    }

    /// `MINIMAL` with client TLS (for hostssl and cert rules) and `rules`.
    fn with_hba(rules: &str) -> String {
        format!(
            "[tls]\nclient_mode = \"prefer\"\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"\n\
             {MINIMAL}{rules}"
        )
    }

    #[test]
    fn parses_hba_rules() {
        let text = with_hba(
            "[[hba]]\ntype = \"local\"\ndatabase = \"all\"\nuser = \"all\"\nmethod = \"trust\"\n\
             [[hba]]\ntype = \"hostssl\"\ndatabase = [\"app\", \"pgrelay\"]\nuser = \"app,admin\"\n\
             address = \"::1/128\"\nmethod = \"scram-sha-256\"\n\
             [[hba]]\ntype = \"host\"\ndatabase = \"all\"\nuser = \"all\"\naddress = \"all\"\n\
             method = \"reject\"\n",
        );
        let config = parse(&text).expect("valid rules");
        assert_eq!(config.hba.len(), 3);
        assert_eq!(config.hba[0].kind, HbaType::Local);
        assert_eq!(config.hba[0].address, None);
        assert_eq!(config.hba[1].method, HbaMethod::ScramSha256);
        assert!(config.hba[1].database.matches("pgrelay", "x"));
        assert!(config.hba[1].user.matches("admin", "admin"));
        assert_eq!(config.hba[2].address, Some(HbaAddress::All));
    }

    #[test]
    fn hba_errors_name_the_key() {
        let rule = |fields: &str| {
            with_hba(&format!(
                "[[hba]]\ndatabase = \"all\"\nuser = \"all\"\n{fields}\n"
            ))
        };
        let cases = [
            (
                "type = \"host\"\naddress = \"10.0.0.0/33\"\nmethod = \"md5\"",
                "hba[0].address",
            ),
            (
                "type = \"host\"\naddress = \"db.example\"\nmethod = \"md5\"",
                "hba[0].address",
            ),
            (
                "type = \"hostgssenc\"\naddress = \"all\"\nmethod = \"md5\"",
                "hba[0].type",
            ),
            (
                "type = \"host\"\naddress = \"all\"\nmethod = \"peer\"",
                "hba[0].method",
            ),
            (
                "type = \"local\"\naddress = \"all\"\nmethod = \"trust\"",
                "hba[0].address",
            ),
            ("type = \"host\"\nmethod = \"trust\"", "hba[0].address"),
            (
                "type = \"host\"\naddress = \"all\"\nmethod = \"cert\"",
                "hba[0].method",
            ),
            (
                "type = \"local\"\nmethod = \"trust\"\nport = 1",
                "hba[0].port",
            ),
            ("type = \"local\"", "hba[0].method"),
        ];
        for (fields, key) in cases {
            assert_eq!(parse_err(&rule(fields)).key(), Some(key), "{fields}");
        }
        let replication = with_hba(
            "[[hba]]\ntype = \"local\"\ndatabase = \"replication\"\nuser = \"all\"\nmethod = \"trust\"\n",
        );
        assert_eq!(parse_err(&replication).key(), Some("hba[0].database"));
        let group = with_hba(
            "[[hba]]\ntype = \"local\"\ndatabase = \"all\"\nuser = \"+admins\"\nmethod = \"trust\"\n",
        );
        assert_eq!(parse_err(&group).key(), Some("hba[0].user"));
        // cert needs a CA; hostssl needs client TLS at all.
        let cert = rule("type = \"hostssl\"\naddress = \"all\"\nmethod = \"cert\"");
        let err = parse_err(&cert);
        assert_eq!(err.key(), Some("hba[0].method"), "{err}");
        assert!(err.to_string().contains("client_ca"), "{err}");
        let hostssl = format!(
            "{MINIMAL}[[hba]]\ntype = \"hostssl\"\ndatabase = \"all\"\nuser = \"all\"\n\
             address = \"all\"\nmethod = \"md5\"\n"
        );
        assert_eq!(parse_err(&hostssl).key(), Some("hba[0].type"));
    }

    #[test]
    fn auth_query_is_off_by_default_and_needs_a_listed_auth_user() {
        let config = parse(MINIMAL).expect("minimal");
        assert_eq!(config.auth_query, schema::DEFAULT_AUTH_QUERY);
        assert_eq!(config.auth_query_cache, Duration::from_secs(60));
        assert_eq!(config.auth_query_user(), None);
        let on = parse(&format!(
            "auth_user = \"a\"\nauth_dbname = \"postgres\"\nauth_query_cache = \"5s\"\n\
             {MINIMAL}[[users]]\nname = \"a\"\npassword = \"p\"\n"
        ))
        .expect("auth_query settings");
        assert_eq!(on.auth_query_user(), Some("a"));
        assert_eq!(on.auth_dbname.as_deref(), Some("postgres"));
        assert_eq!(on.auth_query_cache, Duration::from_secs(5));
        let mut off = on.clone();
        off.auth_query = " ".into();
        assert_eq!(off.auth_query_user(), None);
        assert_eq!(error_key("auth_query_cache = 5"), "auth_query_cache");
        assert_eq!(
            invalid_key(|c| c.auth_user = Some("ghost".into())),
            "auth_user"
        );
    }

    #[test]
    fn validate_console_users() {
        let admin = |c: &mut Config| {
            c.users.push(user("admin"));
            c.admin_users = vec!["admin".into(), "ghost".into()];
        };
        assert_eq!(invalid_key(admin), "admin_users[1]");
        assert_eq!(
            invalid_key(|c| c.stats_users = vec!["ghost".into()]),
            "stats_users[0]"
        );
    }

    #[test]
    fn validate_patroni() {
        let patroni = |c: &mut Config| c.failover.topology = TopologySource::Patroni;
        assert_eq!(invalid_key(patroni), "failover.patroni_urls");
        let bad_url = |c: &mut Config| {
            c.failover.topology = TopologySource::Patroni;
            c.failover.patroni_urls = vec!["http://a:8008".into(), "a:8008".into()];
        };
        assert_eq!(invalid_key(bad_url), "failover.patroni_urls[1]");
        let https = |c: &mut Config| {
            c.failover.topology = TopologySource::Patroni;
            c.failover.patroni_urls = vec!["https://a:8008".into()];
        };
        assert_eq!(invalid_key(https), "failover.patroni_urls[0]");
        let mut members_from_patroni = parse(MINIMAL).expect("minimal config");
        members_from_patroni.backends.clear();
        members_from_patroni.failover.topology = TopologySource::Patroni;
        members_from_patroni.failover.patroni_urls = vec!["http://a:8008".into()];
        assert!(members_from_patroni.validate().is_ok());
    }

    #[test]
    fn validate_lease() {
        let defaults = parse(MINIMAL).expect("minimal config").failover;
        assert_eq!(defaults.lease, LeaseKind::None);
        assert_eq!(defaults.lease_endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(defaults.lease_key, "/pgrelay/failover");
        assert_eq!(defaults.lease_ttl, Duration::from_secs(10));
        let etcd = parse(&format!(
            "{MINIMAL}[failover]\nlease = \"etcd\"\nlease_endpoints = [\"http://e1\", \"http://e2:2380\"]\n\
             lease_key = \"/fleet/a\"\nlease_ttl = \"3s\"\n"
        ))
        .expect("etcd lease");
        assert_eq!(etcd.failover.lease, LeaseKind::Etcd);
        assert_eq!(etcd.failover.lease_ttl, Duration::from_secs(3));
        let kubernetes = parse(&format!("{MINIMAL}[failover]\nlease = \"kubernetes\"\n"));
        let err = kubernetes.expect_err("kubernetes is refused").to_string();
        assert!(
            err.starts_with("failover.lease: ") && err.contains("only \"etcd\""),
            "{err}"
        );
        let etcd = |change: fn(&mut FailoverConfig)| {
            move |c: &mut Config| {
                c.failover.lease = LeaseKind::Etcd;
                change(&mut c.failover);
            }
        };
        let no_endpoints = etcd(|f| f.lease_endpoints.clear());
        assert_eq!(invalid_key(no_endpoints), "failover.lease_endpoints");
        let bad_url = etcd(|f| f.lease_endpoints.push("https://e:2379".into()));
        assert_eq!(invalid_key(bad_url), "failover.lease_endpoints[1]");
        let short = etcd(|f| f.lease_ttl = Duration::from_millis(1900));
        assert_eq!(invalid_key(short), "failover.lease_ttl");
        let key = etcd(|f| f.lease_key = "pgrelay".into());
        assert_eq!(invalid_key(key), "failover.lease_key");
    }

    #[test]
    fn validate_tls_files() {
        assert_eq!(
            invalid_key(|c| c.tls.client_mode = TlsMode::Require),
            "tls.client_cert"
        );
        let no_key = |c: &mut Config| {
            c.tls.client_mode = TlsMode::VerifyFull;
            c.tls.client_cert = "cert.pem".into();
        };
        assert_eq!(invalid_key(no_key), "tls.client_key");
        let no_ca = |c: &mut Config| {
            c.tls.client_mode = TlsMode::VerifyCa;
            c.tls.client_cert = "cert.pem".into();
            c.tls.client_key = "key.pem".into();
        };
        assert_eq!(invalid_key(no_ca), "tls.client_ca");
        assert_eq!(
            invalid_key(|c| c.tls.server_mode = TlsMode::VerifyCa),
            "tls.server_ca"
        );
        assert_eq!(
            invalid_key(|c| c.tls.client_mode = TlsMode::Prefer),
            "tls.client_cert"
        );
        let mut config = parse(MINIMAL).expect("minimal");
        config.tls.client_mode = TlsMode::Prefer;
        config.tls.client_cert = "cert.pem".into();
        config.tls.client_key = "key.pem".into();
        config.tls.server_mode = TlsMode::Require;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn validate_cert_auth_needs_client_tls_and_a_ca() {
        assert_eq!(invalid_key(|c| c.auth_type = AuthType::Cert), "auth_type");
        let per_user = |c: &mut Config| {
            c.tls.client_mode = TlsMode::Prefer;
            c.tls.client_cert = "cert.pem".into();
            c.tls.client_key = "key.pem".into();
            c.users.push(user("u"));
            c.users.push(UserConfig {
                auth_type: Some(AuthType::Cert),
                ..user("v")
            });
        };
        assert_eq!(invalid_key(per_user), "users[1].auth_type");
        let text = format!(
            "auth_type = \"cert\"\n[tls]\nclient_mode = \"prefer\"\nclient_cert = \"c.pem\"\n\
             client_key = \"k.pem\"\nclient_ca = \"ca.pem\"\n{MINIMAL}\
             [[users]]\nname = \"a\"\npassword = \"p\"\nauth_type = \"scram-sha-256\"\n"
        );
        let config = parse(&text).expect("cert globally, SCRAM for one user");
        assert_eq!(config.auth_type, AuthType::Cert);
        assert_eq!(
            config.users[0].auth_type_or(config.auth_type),
            AuthType::ScramSha256
        );
    }

    #[test]
    fn invalid_errors_display_key_first() {
        let mut config = parse(MINIMAL).expect("minimal");
        config.backends[0].port = 0;
        let err = config.validate().expect_err("port 0");
        assert_eq!(
            err.to_string(),
            "backends[0].port: must be between 1 and 65535"
        );
    }

    #[test]
    fn overrides_pick_user_then_database_then_global() {
        let mut config = parse(MINIMAL).expect("minimal");
        config.databases.push(DatabaseConfig {
            pool_mode: Some(PoolMode::Session),
            pool_size: Some(7),
            ..database("db")
        });
        config.databases.push(DatabaseConfig {
            dbname: Some("real".into()),
            ..database("alias")
        });
        config.users.push(UserConfig {
            pool_mode: Some(PoolMode::Transaction),
            pool_size: Some(3),
            ..user("u")
        });
        config.users.push(user("plain"));
        assert!(config.validate().is_ok());
        assert_eq!(config.pool_mode_for("db", "u"), PoolMode::Transaction);
        assert_eq!(config.pool_mode_for("db", "plain"), PoolMode::Session);
        assert_eq!(
            config.pool_mode_for("alias", "plain"),
            PoolMode::Transaction
        );
        assert_eq!(config.pool_size_for("db", "u"), 3);
        assert_eq!(config.pool_size_for("db", "plain"), 7);
        assert_eq!(config.pool_size_for("other", "nobody"), 20);
        assert_eq!(
            config.database("alias").map(DatabaseConfig::server_dbname),
            Some("real")
        );
        assert_eq!(
            config.database("db").map(DatabaseConfig::server_dbname),
            Some("db")
        );
        assert!(!config.allows_any_database());
    }

    #[test]
    fn worker_threads_is_bounded() {
        let config = parse(MINIMAL).expect("minimal");
        assert_eq!(config.worker_threads, 1);
        let mut config = config;
        config.worker_threads = 0;
        assert_eq!(config.validate().unwrap_err().key(), Some("worker_threads"));
    }
}
