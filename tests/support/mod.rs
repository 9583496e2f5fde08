//! The integration-test harness: a real PostgreSQL primary (and streaming replicas,
//! `pg_basebackup -R`) in a temp dir on free loopback ports, run as the `postgres` user
//! when the tests run as root, and pgrelay started in-process on `127.0.0.1:0`.
//!
//! Every test builds its own [`TestEnv`]; dropping it stops PostgreSQL and removes the
//! data, so tests can run in parallel.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use pgrelay::config::Config;
use pgrelay::demo::{ClusterOptions, LocalCluster};
use pgrelay::listener::Pgrelay;

/// Generates `<name>::transaction_mode` and `<name>::session_mode` from
/// `async fn <name>(mode: &'static str)`.
#[allow(unused_macros)]
macro_rules! both_modes {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn transaction_mode() {
                super::$name("transaction").await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn session_mode() {
                super::$name("session").await;
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use both_modes;

pub mod certs;
pub mod etcd;
pub mod logs;
pub mod needs;
pub mod process;
pub mod raw;
pub mod writer;

pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";
pub const APP_DB: &str = "app";

/// What to start. `Default` is one primary, no replica, SCRAM on both sides,
/// transaction pooling with 10 servers.
#[derive(Clone)]
pub struct EnvOptions {
    pub replicas: usize,
    /// pg_hba method on the servers for non-superusers.
    pub server_auth: &'static str,
    /// `auth_type` of pgrelay.
    pub client_auth: &'static str,
    pub pool_mode: &'static str,
    pub pool_size: u32,
    /// Server users: (name, password as PostgreSQL stores or receives it).
    pub server_users: Vec<(String, String)>,
    /// `[[users]]` entries: (name, password as written in pgrelay's config).
    pub relay_users: Vec<(String, String)>,
    /// Extra lines for the `[pool]` section. A `query_wait_timeout = ...` line here
    /// replaces the harness's default of 20s (TOML refuses a key written twice).
    pub pool_extra: Vec<String>,
    /// Extra top-level lines (before any section).
    pub top_extra: Vec<String>,
    /// Extra postgresql.conf lines.
    pub server_conf: Vec<String>,
    /// Lines for the `[limits]` section. The harness turns `auth_failure_delay` and
    /// `auth_failure_limit` off unless a line here sets them: tests log in from
    /// 127.0.0.1 with wrong passwords often and quickly.
    pub limits: Vec<String>,
    /// Lines for a `[routing]` section (none: the section is left out).
    pub routing: Vec<String>,
    /// `backends.weight` per node, primary first (missing: the default).
    pub weights: Vec<f64>,
    /// Whole sections appended after the rest (e.g. `"[health_check]\nperiod = \"1h\""`).
    pub sections: Vec<String>,
    /// Write each node's `data_directory` into `[[backends]]` (for `%D` / `%R`).
    pub data_dirs: bool,
    /// Serve `/metrics`, `/healthz`, `/readyz` on a free port (`Pgrelay::metrics_addr`).
    pub metrics: bool,
    /// PostgreSQL with TLS (none: `ssl` stays off, as PostgreSQL's default).
    pub server_ssl: Option<ServerSsl>,
}

/// How the servers take TLS: `ssl = on` with this certificate and key, and pg_hba.conf
/// lines as `hba` says.
#[derive(Clone)]
pub struct ServerSsl {
    pub pem: certs::Pem,
    pub hba: SslHba,
}

/// Which TCP logins the servers' pg_hba.conf takes (the replication line aside, and
/// the superuser's lines included).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SslHba {
    /// The harness's usual `host` lines: TLS and plaintext.
    Any,
    /// `hostssl` lines only: a plaintext login is refused.
    TlsOnly,
    /// `hostnossl` lines only: a login over TLS is refused.
    PlaintextOnly,
}

impl ServerSsl {
    fn conf_lines(&self) -> Vec<String> {
        let quote = |path: &std::path::Path| path.display().to_string().replace('\'', "''");
        vec![
            "ssl = on".to_owned(),
            format!("ssl_cert_file = '{}'", quote(&self.pem.cert)),
            format!("ssl_key_file = '{}'", quote(&self.pem.key)),
        ]
    }
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            replicas: 0,
            server_auth: "scram-sha-256",
            client_auth: "scram-sha-256",
            pool_mode: "transaction",
            pool_size: 10,
            server_users: vec![(APP_USER.into(), APP_PASSWORD.into())],
            relay_users: vec![(APP_USER.into(), APP_PASSWORD.into())],
            pool_extra: Vec::new(),
            top_extra: Vec::new(),
            server_conf: Vec::new(),
            routing: Vec::new(),
            limits: Vec::new(),
            weights: Vec::new(),
            sections: Vec::new(),
            data_dirs: false,
            metrics: false,
            server_ssl: None,
        }
    }
}

impl EnvOptions {
    pub fn session() -> Self {
        EnvOptions {
            pool_mode: "session",
            ..Default::default()
        }
    }

    pub fn mode(mode: &'static str) -> Self {
        EnvOptions {
            pool_mode: mode,
            ..Default::default()
        }
    }
}

pub struct TestEnv {
    pub relay: Pgrelay,
    pub addr: SocketAddr,
    pub options: EnvOptions,
    /// Last, so PostgreSQL stops after pgrelay's handles are gone.
    pub cluster: LocalCluster,
}

/// Starts PostgreSQL and pgrelay for one test.
pub async fn start(options: EnvOptions) -> TestEnv {
    let cluster_options = ClusterOptions {
        replicas: options.replicas,
        host_auth: options.server_auth.into(),
        users: options.server_users.clone(),
        databases: vec![(APP_DB.into(), APP_USER.into())],
        extra_conf: options
            .server_conf
            .iter()
            .cloned()
            .chain(options.server_ssl.iter().flat_map(ServerSsl::conf_lines))
            .collect(),
    };
    let cluster = tokio::task::spawn_blocking(move || {
        LocalCluster::start(&cluster_options).map_err(Box::new)
    })
    .await
    .expect("cluster task")
    .expect("start PostgreSQL");
    if let Some(ssl) = options
        .server_ssl
        .as_ref()
        .filter(|ssl| ssl.hba != SslHba::Any)
    {
        restrict_hba(&cluster, options.server_auth, ssl.hba).await;
    }
    let dirs: Vec<String> = if options.data_dirs {
        cluster
            .ports()
            .iter()
            .map(|&port| {
                let dir = cluster.data_dir(port).expect("data dir");
                dir.to_string_lossy().into_owned()
            })
            .collect()
    } else {
        Vec::new()
    };
    let text = config_text_with_dirs(&options, &cluster.ports(), &dirs);
    let config = Config::from_toml_str(&text).expect("test config");
    let relay = Pgrelay::start(config).await.expect("start pgrelay");
    let addr = relay.addrs[0];
    TestEnv {
        relay,
        addr,
        options,
        cluster,
    }
}

/// A primary and `replicas` streaming replicas with the app user (SCRAM) and its
/// database, for tests that run pgrelay as a process of their own.
pub async fn app_cluster(replicas: usize) -> LocalCluster {
    let options = ClusterOptions {
        replicas,
        host_auth: "scram-sha-256".into(),
        users: vec![(APP_USER.into(), APP_PASSWORD.into())],
        databases: vec![(APP_DB.into(), APP_USER.into())],
        extra_conf: Vec::new(),
    };
    tokio::task::spawn_blocking(move || LocalCluster::start(&options).map_err(Box::new))
        .await
        .expect("cluster task")
        .expect("start PostgreSQL")
}

/// Rewrites every node's pg_hba.conf to take TCP logins only over TLS or only in
/// plaintext, reloads, and waits until the other kind is refused everywhere (checked
/// with psql: `sslmode=disable` or `require`).
async fn restrict_hba(cluster: &LocalCluster, method: &str, hba: SslHba) {
    let (kind, refused_mode) = match hba {
        SslHba::TlsOnly => ("hostssl", "disable"),
        SslHba::PlaintextOnly => ("hostnossl", "require"),
        SslHba::Any => return,
    };
    let text = format!(
        "local all all trust\n\
         {kind} all postgres 127.0.0.1/32 trust\n\
         {kind} all postgres ::1/128 trust\n\
         host replication all 127.0.0.1/32 trust\n\
         {kind} all all 127.0.0.1/32 {method}\n\
         {kind} all all ::1/128 {method}\n"
    );
    for port in cluster.ports() {
        let dir = cluster.data_dir(port).expect("data dir");
        std::fs::write(dir.join("pg_hba.conf"), &text).expect("write pg_hba.conf");
        cluster
            .psql(port, "postgres", "SELECT pg_reload_conf()")
            .expect("reload");
        let refused = eventually(Duration::from_secs(10), || async {
            !std::process::Command::new("psql")
                .env("PGSSLMODE", refused_mode)
                .args(["-X", "-w", "-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-U", "postgres", "-d", "postgres", "-c", "SELECT 1"])
                .output()
                .expect("run psql")
                .status
                .success()
        })
        .await;
        assert!(refused, "node {port} still takes {refused_mode} logins");
    }
}

/// Starts another pgrelay in front of already running servers (`ports`, primary first),
/// e.g. one whose `[[users]]` hold secrets read from a running cluster.
pub async fn start_relay(options: &EnvOptions, ports: &[u16]) -> Pgrelay {
    let config = Config::from_toml_str(&config_text(options, ports)).expect("test config");
    Pgrelay::start(config).await.expect("start pgrelay")
}

/// A libpq connection string for a pgrelay listening on `addr`.
pub fn relay_conn_string(addr: SocketAddr, user: &str, password: &str, db: &str) -> String {
    format!(
        "host={} port={} user={user} password={password} dbname={db} connect_timeout=10",
        addr.ip(),
        addr.port()
    )
}

pub fn config_text(options: &EnvOptions, ports: &[u16]) -> String {
    config_text_with_dirs(options, ports, &[])
}

/// [`config_text`], with a `data_directory` for each backend that has one in `dirs`.
pub fn config_text_with_dirs(options: &EnvOptions, ports: &[u16], dirs: &[String]) -> String {
    let metrics = if options.metrics { "127.0.0.1:0" } else { "" };
    let mut text = format!(
        "listen = [\"127.0.0.1:0\"]\nmetrics_listen = \"{metrics}\"\nauth_type = \"{}\"\n{}\n",
        options.client_auth,
        options.top_extra.join("\n")
    );
    let wait_overridden = options
        .pool_extra
        .iter()
        .any(|line| line.trim_start().starts_with("query_wait_timeout"));
    let default_wait = if wait_overridden {
        ""
    } else {
        "query_wait_timeout = \"20s\"\n"
    };
    text.push_str(&format!(
        "[pool]\nmode = \"{}\"\ndefault_pool_size = {}\n{default_wait}{}\n",
        options.pool_mode,
        options.pool_size,
        options.pool_extra.join("\n")
    ));
    if !options.routing.is_empty() {
        text.push_str(&format!("[routing]\n{}\n", options.routing.join("\n")));
    }
    let mut limits = options.limits.clone();
    for (key, off) in [
        ("auth_failure_delay", "auth_failure_delay = \"0s\""),
        ("auth_failure_limit", "auth_failure_limit = 0"),
    ] {
        if !limits.iter().any(|line| line.trim_start().starts_with(key)) {
            limits.push(off.to_owned());
        }
    }
    text.push_str(&format!("[limits]\n{}\n", limits.join("\n")));
    for (i, port) in ports.iter().enumerate() {
        text.push_str(&format!(
            "[[backends]]\nhost = \"127.0.0.1\"\nport = {port}\n"
        ));
        if let Some(weight) = options.weights.get(i) {
            text.push_str(&format!("weight = {weight:?}\n"));
        }
        if let Some(dir) = dirs.get(i) {
            text.push_str(&format!("data_directory = {dir:?}\n"));
        }
    }
    for (name, password) in &options.relay_users {
        text.push_str(&format!(
            "[[users]]\nname = \"{name}\"\npassword = \"{password}\"\n"
        ));
    }
    for section in &options.sections {
        text.push_str(section);
        text.push('\n');
    }
    text
}

impl TestEnv {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn conn_string(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db} connect_timeout=10",
            self.port()
        )
    }

    /// Connects through pgrelay as the app user.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.connect(APP_USER, APP_PASSWORD, APP_DB)
            .await
            .expect("connect through pgrelay")
    }

    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect_str(&self.conn_string(user, password, db)).await
    }

    /// Connects straight to the primary as the superuser (for checks behind pgrelay's back).
    pub async fn direct_superuser(&self) -> tokio_postgres::Client {
        let s = format!(
            "host=127.0.0.1 port={} user=postgres dbname={APP_DB}",
            self.cluster.primary_port()
        );
        connect_str(&s).await.expect("direct connection")
    }

    /// Runs SQL on a node as the superuser via psql.
    pub fn psql_direct(&self, port: u16, sql: &str) -> String {
        self.cluster.psql(port, APP_DB, sql).expect("psql")
    }

    /// Runs `psql` through pgrelay; returns (success, stdout, stderr).
    pub fn psql(&self, args: &[&str]) -> (bool, String, String) {
        let out = std::process::Command::new("psql")
            .env("PGPASSWORD", APP_PASSWORD)
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port().to_string(),
                "-U",
                APP_USER,
                "-d",
                APP_DB,
            ])
            .args(args)
            .output()
            .expect("run psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

pub async fn connect_str(s: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(s, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The SQLSTATE of a tokio-postgres error, if the server (or pgrelay) sent one.
pub fn sqlstate(err: &tokio_postgres::Error) -> Option<String> {
    err.as_db_error().map(|e| e.code().code().to_owned())
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

impl TestEnv {
    /// A tokio-postgres config for the app user through pgrelay, for tests that add
    /// startup settings (`options`, `application_name`) before connecting.
    pub fn app_config(&self) -> tokio_postgres::Config {
        self.conn_string(APP_USER, APP_PASSWORD, APP_DB)
            .parse()
            .expect("valid connection string")
    }

    /// The first pool pgrelay made for `database` (as any user), once it exists.
    pub fn pool_for(&self, database: &str) -> Option<std::sync::Arc<pgrelay::pool::Pool>> {
        self.relay
            .shared
            .pools
            .all()
            .into_iter()
            .find(|p| p.key.database == database)
    }
}

/// How a watched connection ended: `Err` holds what ended it (e.g. a FATAL the server
/// sent while the client was idle).
pub type ConnectionEnd = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// Connects with `config`; the connection runs in a task whose result is returned.
pub async fn connect_watched(
    config: &tokio_postgres::Config,
) -> Result<(tokio_postgres::Client, ConnectionEnd), tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    Ok((client, tokio::spawn(connection)))
}

/// Connects with `config` and forwards every notice and notification the connection
/// receives to the returned channel (tokio-postgres only hands them to whoever drives
/// the connection with `poll_message`).
pub async fn connect_with_messages(
    config: &tokio_postgres::Config,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
    ),
    tokio_postgres::Error,
> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            let _ = tx.send(message);
        }
    });
    Ok((client, rx))
}

/// Every row of a simple-protocol query (all its statements, in order), as text.
pub async fn simple_rows(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    Ok(messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// The first column of the first row of a simple-protocol query; panics on an error,
/// no rows or NULL.
pub async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let rows = simple_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_else(|| panic!("{sql}: no value"))
}

/// Runs a simple query whose last value is a backend pid: `(other values, pid)`.
pub async fn values_and_pid(client: &tokio_postgres::Client, sql: &str) -> (Vec<String>, String) {
    let mut values: Vec<String> = simple_rows(client, sql)
        .await
        .expect("query")
        .into_iter()
        .flatten()
        .map(Option::unwrap_or_default)
        .collect();
    let pid = values.pop().expect("pid");
    (values, pid)
}

/// The secret PostgreSQL stores for `role` (read through a superuser connection).
pub async fn stored_secret(superuser: &tokio_postgres::Client, role: &str) -> String {
    superuser
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("read pg_authid")
        .get(0)
}

/// The error a failed password login must produce: FATAL 28P01 with PostgreSQL's text
/// for `user`. Returns it, for callers that compare two failures.
pub fn password_failure<'e>(
    err: &'e tokio_postgres::Error,
    user: &str,
) -> &'e tokio_postgres::error::DbError {
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse for {user}, got: {err}"));
    assert_eq!(db.code().code(), "28P01", "{db:?}");
    assert_eq!(
        db.message(),
        format!("password authentication failed for user \"{user}\"")
    );
    db
}

/// One HTTP GET to pgrelay's metrics listener: `(status, body)`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    socket.read_to_string(&mut response).await.expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// The backend pid of the app user's session running `sql`, once PostgreSQL shows it
/// as active (panics after 10 s).
pub async fn running_pid(admin: &tokio_postgres::Client, sql: &str) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let row = admin
            .query_opt(
                "SELECT pid FROM pg_stat_activity \
                 WHERE usename = 'app' AND state = 'active' AND query = $1",
                &[&sql],
            )
            .await
            .expect("pg_stat_activity");
        if let Some(row) = row {
            return row.get(0);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{sql}` never showed up in pg_stat_activity"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the backend `pid` is gone from `pg_stat_activity` within `within`.
pub async fn backend_gone(admin: &tokio_postgres::Client, pid: i32, within: Duration) -> bool {
    eventually(within, || async {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity");
        row.get::<_, i64>(0) == 0
    })
    .await
}
