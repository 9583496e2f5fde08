//! The console's `SHOW` tables: PgBouncer's columns for the pool views (the columns
//! that apply to pgrelay; those that do not are 0), so `pgbouncer_exporter`-style
//! tools read them as they are. Pgpool-II's node views are in [`super::nodes`].

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use super::nodes;
use crate::config::PoolMode;
use crate::protocol::backend::{self, oid};
use crate::registry::ClientState;
use crate::Shared;

/// Which table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    PoolNodes,
    PoolHealthCheckStats,
    PoolBackendStats,
    Pools,
    Stats,
    Clients,
    Servers,
    Databases,
    Users,
    Latency,
    Config,
    Lease,
    Version,
    Help,
}

impl Show {
    pub fn parse(word: &str) -> Option<Show> {
        Some(match word {
            "pool_nodes" => Show::PoolNodes,
            "pool_health_check_stats" => Show::PoolHealthCheckStats,
            "pool_backend_stats" => Show::PoolBackendStats,
            "pools" => Show::Pools,
            "stats" => Show::Stats,
            "clients" => Show::Clients,
            "servers" => Show::Servers,
            "databases" => Show::Databases,
            "users" => Show::Users,
            "latency" => Show::Latency,
            "config" => Show::Config,
            "lease" => Show::Lease,
            "version" => Show::Version,
            "help" => Show::Help,
            _ => return None,
        })
    }
}

/// A result set.
pub struct Table {
    pub columns: Vec<(&'static str, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub(super) fn new(columns: &[(&'static str, u32)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// A table of text columns (Pgpool-II's tables are all text).
    pub(super) fn texts(names: &[&'static str]) -> Table {
        Table {
            columns: names.iter().map(|&n| (n, oid::TEXT)).collect(),
            rows: Vec::new(),
        }
    }

    pub(super) fn row(&mut self, values: Vec<Option<String>>) {
        debug_assert_eq!(values.len(), self.columns.len());
        self.rows.push(values);
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        backend::row_description(buf, &self.columns);
        for row in &self.rows {
            backend::data_row(buf, row);
        }
    }
}

pub(super) fn v(value: impl ToString) -> Option<String> {
    Some(value.to_string())
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn format_time(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

fn mode_name(mode: PoolMode) -> &'static str {
    match mode {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

pub fn show(shared: &Shared, what: Show) -> Table {
    match what {
        Show::PoolNodes => nodes::pool_nodes(shared),
        Show::PoolHealthCheckStats => nodes::health_check_stats(shared),
        Show::PoolBackendStats => nodes::backend_stats(shared),
        Show::Pools => pools(shared),
        Show::Stats => stats(shared),
        Show::Clients => clients(shared),
        Show::Servers => servers(shared),
        Show::Databases => databases(shared),
        Show::Users => users(shared),
        Show::Latency => latency(shared),
        Show::Config => config(shared),
        Show::Lease => nodes::lease(shared),
        Show::Version => {
            let mut t = Table::new(&[("version", oid::TEXT)]);
            t.row(vec![v(concat!("pgrelay ", env!("CARGO_PKG_VERSION")))]);
            t
        }
        Show::Help => {
            let mut t = Table::new(&[("command", oid::TEXT)]);
            for line in [
                "SHOW POOL_NODES|POOL_HEALTH_CHECK_STATS|POOL_BACKEND_STATS",
                "SHOW POOLS|STATS|LATENCY|CLIENTS|SERVERS|DATABASES|USERS|CONFIG|LEASE|VERSION|HELP",
                "RELOAD",
                "PAUSE [db]",
                "RESUME [db]",
                "KILL db",
                "WAIT_CLOSE [db]",
                "SHUTDOWN",
                "DETACH NODE n",
                "ATTACH NODE n",
                "PROMOTE NODE n [SWITCHOVER]",
            ] {
                t.row(vec![v(line)]);
            }
            t
        }
    }
}

/// PgBouncer's `SHOW POOLS`: one row per database and user (pgrelay's pools per node
/// added up).
fn pools(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", oid::TEXT),
        ("user", oid::TEXT),
        ("cl_active", oid::INT4),
        ("cl_waiting", oid::INT4),
        ("cl_active_cancel_req", oid::INT4),
        ("cl_waiting_cancel_req", oid::INT4),
        ("sv_active", oid::INT4),
        ("sv_active_cancel", oid::INT4),
        ("sv_being_canceled", oid::INT4),
        ("sv_idle", oid::INT4),
        ("sv_used", oid::INT4),
        ("sv_tested", oid::INT4),
        ("sv_login", oid::INT4),
        ("maxwait", oid::INT4),
        ("maxwait_us", oid::INT4),
        ("pool_mode", oid::TEXT),
    ]);
    let config = shared.config.load();
    let all = shared.pools.all();
    let mut keys: Vec<(String, String)> = all
        .iter()
        .map(|p| (p.key.database.clone(), p.key.user.clone()))
        .collect();
    let clients = shared.registry.clients();
    for c in clients.iter().filter(|c| !c.admin) {
        keys.push((c.database.clone(), c.user.clone()));
    }
    keys.sort();
    keys.dedup();
    for (database, user) in keys {
        let (mut idle, mut total) = (0, 0);
        for pool in all
            .iter()
            .filter(|p| p.key.database == database && p.key.user == user)
        {
            let (i, n, _) = pool.counts();
            idle += i;
            total += n;
        }
        let mine = clients
            .iter()
            .filter(|c| !c.admin && c.database == database && c.user == user);
        let (mut active, mut waiting, mut maxwait) = (0, 0, Duration::ZERO);
        for c in mine {
            match c.state() {
                ClientState::Active => active += 1,
                ClientState::Waiting => {
                    waiting += 1;
                    maxwait = maxwait.max(shared.registry.times(c).1.unwrap_or_default());
                }
                ClientState::Idle => {}
            }
        }
        t.row(vec![
            v(&database),
            v(&user),
            v(active),
            v(waiting),
            v(0),
            v(0),
            v(total - idle),
            v(0),
            v(0),
            v(idle),
            v(0),
            v(0),
            v(0),
            v(maxwait.as_secs()),
            v(maxwait.subsec_micros()),
            v(mode_name(config.pool_mode_for(&database, &user))),
        ]);
    }
    t
}

/// PgBouncer's `SHOW STATS`.
fn stats(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", oid::TEXT),
        ("total_xact_count", oid::INT8),
        ("total_query_count", oid::INT8),
        ("total_received", oid::INT8),
        ("total_sent", oid::INT8),
        ("total_xact_time", oid::INT8),
        ("total_query_time", oid::INT8),
        ("total_wait_time", oid::INT8),
        ("avg_xact_count", oid::INT8),
        ("avg_query_count", oid::INT8),
        ("avg_recv", oid::INT8),
        ("avg_sent", oid::INT8),
        ("avg_xact_time", oid::INT8),
        ("avg_query_time", oid::INT8),
        ("avg_wait_time", oid::INT8),
    ]);
    let averages = shared.registry.averages(Duration::from_secs(15));
    let latencies = shared.metrics.latencies();
    for (database, [xacts, queries, received, sent, xact_us, wait_us]) in
        shared.registry.all_stats()
    {
        let avg = averages.get(&database).copied().unwrap_or_default();
        let query_us: f64 = latencies
            .iter()
            .filter(|((db, _), _)| *db == database)
            .map(|(_, latency)| latency.query.get_sample_sum() * 1e6)
            .sum();
        t.row(vec![
            v(&database),
            v(xacts),
            v(queries),
            v(received),
            v(sent),
            v(xact_us),
            v(query_us.round() as u64),
            v(wait_us),
            v(avg[0]),
            v(avg[1]),
            v(avg[2]),
            v(avg[3]),
            v(avg[4]),
            // Averages are kept per transaction only.
            v(avg[4]),
            v(avg[5]),
        ]);
    }
    t
}

/// `SHOW LATENCY`: each pool's (database and user) transaction, query and wait
/// times since start: how many, and the 50th, 95th and 99th percentiles in
/// microseconds, estimated from the Prometheus histograms as `histogram_quantile`
/// does (NULL when there is nothing yet; past the last bucket, its bound).
fn latency(shared: &Shared) -> Table {
    let mut columns = vec![("database", oid::TEXT), ("user", oid::TEXT)];
    for name in [
        "xact_count",
        "xact_p50_us",
        "xact_p95_us",
        "xact_p99_us",
        "query_count",
        "query_p50_us",
        "query_p95_us",
        "query_p99_us",
        "wait_count",
        "wait_p50_us",
        "wait_p95_us",
        "wait_p99_us",
    ] {
        columns.push((name, oid::INT8));
    }
    let mut t = Table::new(&columns);
    for ((database, user), latency) in shared.metrics.latencies() {
        let mut row = vec![v(database), v(user)];
        for histogram in [&latency.transaction, &latency.query, &latency.wait] {
            row.push(v(histogram.get_sample_count()));
            for q in [0.5, 0.95, 0.99] {
                row.push(quantile_us(histogram, q).map(|us| us.to_string()));
            }
        }
        t.row(row);
    }
    t
}

/// The `q` quantile of `histogram` in microseconds, interpolated inside its bucket.
fn quantile_us(histogram: &prometheus::Histogram, q: f64) -> Option<u64> {
    use prometheus::core::Collector;
    let families = histogram.collect();
    let metric = families.first()?.get_metric().first()?;
    let h = metric.get_histogram();
    let total = h.get_sample_count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for bucket in h.get_bucket() {
        let (bound, count) = (bucket.upper_bound(), bucket.cumulative_count());
        if count as f64 >= rank {
            let inside = (count - below) as f64;
            let share = if inside > 0.0 {
                (rank - below as f64) / inside
            } else {
                1.0
            };
            return Some(((lower + (bound - lower) * share) * 1e6).round() as u64);
        }
        (lower, below) = (bound, count);
    }
    Some((lower * 1e6).round() as u64)
}

const CONNECTION_COLUMNS: [(&str, u32); 19] = [
    ("type", oid::TEXT),
    ("user", oid::TEXT),
    ("database", oid::TEXT),
    ("state", oid::TEXT),
    ("addr", oid::TEXT),
    ("port", oid::INT4),
    ("local_addr", oid::TEXT),
    ("local_port", oid::INT4),
    ("connect_time", oid::TEXT),
    ("request_time", oid::TEXT),
    ("wait", oid::INT4),
    ("wait_us", oid::INT4),
    ("close_needed", oid::INT4),
    ("ptr", oid::TEXT),
    ("link", oid::TEXT),
    ("remote_pid", oid::INT4),
    ("tls", oid::TEXT),
    ("application_name", oid::TEXT),
    ("prepared_statements", oid::INT4),
];

/// An address column of `SHOW CLIENTS`: the IP, or `unix` for a Unix-socket client
/// (as PgBouncer shows it).
fn client_ip(addr: Option<std::net::SocketAddr>, unix: Option<u16>) -> String {
    match (addr, unix) {
        (Some(addr), _) => addr.ip().to_string(),
        (None, Some(_)) => "unix".to_owned(),
        (None, None) => String::new(),
    }
}

/// PgBouncer's `SHOW CLIENTS`.
fn clients(shared: &Shared) -> Table {
    let mut t = Table::new(&CONNECTION_COLUMNS);
    for c in shared.registry.clients() {
        let (request, wait) = shared.registry.times(&c);
        let wait = wait.unwrap_or_default();
        let state = c.state();
        t.row(vec![
            v("C"),
            v(&c.user),
            v(&c.database),
            v(state.as_str()),
            v(client_ip(c.addr, c.unix)),
            v(c.addr.map_or(c.unix.unwrap_or(0), |a| a.port())),
            v(client_ip(c.local, c.unix)),
            v(c.local.map_or(c.unix.unwrap_or(0), |a| a.port())),
            v(format_time(c.connected)),
            v(format_time(request)),
            v(wait.as_secs()),
            v(wait.subsec_micros()),
            v(0),
            v(format!("{:x}", c.id)),
            c.link().map(|(_, pid)| format!("{pid:x}")),
            v(0),
            v(&*c.tls),
            v(&c.application_name),
            v(c.prepared.load(Ordering::Relaxed)),
        ]);
    }
    t
}

/// PgBouncer's `SHOW SERVERS`: idle servers from the pools, active ones from the
/// clients holding them.
fn servers(shared: &Shared) -> Table {
    let mut t = Table::new(&CONNECTION_COLUMNS);
    let topology = shared.cluster.snapshot();
    let address = |node: usize| {
        topology
            .nodes
            .get(node)
            .map(|n| (n.host.clone(), n.port))
            .unwrap_or_default()
    };
    let row = |state: &str,
               user: &str,
               database: &str,
               node: usize,
               pid: i32,
               connected: Option<SystemTime>,
               link: Option<String>,
               close_needed: bool,
               prepared: usize| {
        let (host, port) = address(node);
        vec![
            v("S"),
            v(user),
            v(database),
            v(state),
            v(host),
            v(port),
            v(""),
            v(0),
            v(connected.map(format_time).unwrap_or_default()),
            v(""),
            v(0),
            v(0),
            v(u8::from(close_needed)),
            v(format!("{pid:x}")),
            link,
            v(pid),
            v(""),
            v(""),
            v(prepared),
        ]
    };
    for pool in shared.pools.all() {
        for idle in pool.idle_servers() {
            t.row(row(
                "idle",
                &pool.key.user,
                &pool.key.database,
                pool.key.node,
                idle.pid,
                Some(idle.connected),
                None,
                idle.close_needed,
                idle.prepared,
            ));
        }
    }
    for c in shared.registry.clients() {
        if let Some((node, pid)) = c.link() {
            t.row(row(
                "active",
                &c.user,
                &c.database,
                node,
                pid,
                None,
                Some(format!("{:x}", c.id)),
                false,
                0,
            ));
        }
    }
    t
}

/// PgBouncer's `SHOW DATABASES`: the configured databases (or those in use, with an
/// empty `[[databases]]`), on the current primary, and the console itself.
fn databases(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("name", oid::TEXT),
        ("host", oid::TEXT),
        ("port", oid::INT4),
        ("database", oid::TEXT),
        ("force_user", oid::TEXT),
        ("pool_size", oid::INT4),
        ("min_pool_size", oid::INT4),
        ("reserve_pool", oid::INT4),
        ("server_lifetime", oid::INT4),
        ("pool_mode", oid::TEXT),
        ("max_connections", oid::INT4),
        ("current_connections", oid::INT4),
        ("paused", oid::INT4),
        ("disabled", oid::INT4),
    ]);
    let config = shared.config.load();
    let topology = shared.cluster.snapshot();
    let primary = topology.primary.and_then(|p| topology.nodes.get(p));
    let mut names: Vec<(String, String)> = config
        .databases
        .iter()
        .map(|d| (d.name.clone(), d.server_dbname().to_owned()))
        .collect();
    if names.is_empty() {
        let mut seen: Vec<String> = shared
            .pools
            .all()
            .iter()
            .map(|p| p.key.database.clone())
            .collect();
        seen.sort();
        seen.dedup();
        names = seen.into_iter().map(|d| (d.clone(), d)).collect();
    }
    for (name, dbname) in names {
        let current: usize = shared
            .pools
            .all()
            .iter()
            .filter(|p| p.key.database == name)
            .map(|p| p.counts().1)
            .sum();
        let mode = config
            .database(&name)
            .and_then(|d| d.pool_mode)
            .unwrap_or(config.pool.mode);
        t.row(vec![
            v(&name),
            primary.map(|p| p.host.clone()),
            primary.map(|p| p.port.to_string()),
            v(dbname),
            None,
            v(config.pool.default_pool_size),
            v(config.pool.min_pool_size),
            v(0),
            v(config.pool.server_lifetime.as_secs()),
            v(mode_name(mode)),
            v(config.max_db_connections_for(&name)),
            v(current),
            v(u8::from(shared.registry.is_paused(&name))),
            v(0),
        ]);
    }
    let listen_port = config
        .listen
        .iter()
        .find_map(|l| l.tcp())
        .map_or(0, |a| a.port());
    for console in crate::config::ADMIN_DATABASES {
        t.row(vec![
            v(console),
            None,
            v(listen_port),
            v(console),
            None,
            v(2),
            v(0),
            v(0),
            v(0),
            v("statement"),
            v(0),
            v(0),
            v(0),
            v(0),
        ]);
    }
    t
}

/// PgBouncer's `SHOW USERS`.
fn users(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("name", oid::TEXT),
        ("pool_size", oid::INT4),
        ("reserve_pool_size", oid::INT4),
        ("pool_mode", oid::TEXT),
        ("max_user_connections", oid::INT4),
        ("current_connections", oid::INT4),
        ("max_user_client_connections", oid::INT4),
        ("current_client_connections", oid::INT4),
    ]);
    let config = shared.config.load();
    let clients = shared.registry.clients();
    for user in &config.users {
        let servers: usize = shared
            .pools
            .all()
            .iter()
            .filter(|p| p.key.user == user.name)
            .map(|p| p.counts().1)
            .sum();
        let connected = clients.iter().filter(|c| c.user == user.name).count();
        t.row(vec![
            v(&user.name),
            user.pool_size.map(|s| s.to_string()),
            v(0),
            user.pool_mode.map(|m| mode_name(m).to_owned()),
            v(config.max_user_connections_for(&user.name)),
            v(servers),
            v(config.max_user_client_connections_for(&user.name)),
            v(connected),
        ]);
    }
    t
}

/// PgBouncer's `SHOW CONFIG`: every setting, its default, and whether `RELOAD`
/// applies it.
fn config(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("key", oid::TEXT),
        ("value", oid::TEXT),
        ("default", oid::TEXT),
        ("changeable", oid::TEXT),
    ]);
    let config = shared.config.load();
    let defaults = crate::config::Config::default().settings();
    for (key, value) in config.settings() {
        let default = defaults
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, d)| d.clone())
            .unwrap_or_default();
        let changeable = !matches!(
            key,
            "listen" | "metrics_listen" | "worker_threads" | "instance_id"
        );
        t.row(vec![
            v(key),
            v(value),
            v(default),
            v(if changeable { "yes" } else { "no" }),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let opts = prometheus::HistogramOpts::new("t", "t")
            .buckets(crate::metrics::LATENCY_BUCKETS.to_vec());
        let histogram = prometheus::Histogram::with_opts(opts).expect("histogram");
        assert_eq!(quantile_us(&histogram, 0.5), None, "nothing observed");
        // 100 observations between 1 ms and 2.5 ms, one of 40 s.
        for _ in 0..100 {
            histogram.observe(0.002);
        }
        histogram.observe(40.0);
        let p50 = quantile_us(&histogram, 0.5).expect("p50");
        assert!((1_000..=2_500).contains(&p50), "{p50}");
        assert!(quantile_us(&histogram, 0.95).expect("p95") <= 2_500);
        assert_eq!(
            quantile_us(&histogram, 1.0),
            Some(30_000_000),
            "past the last bucket"
        );
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01 00:00:00");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(format_time(t), "2026-11-18 11:06:40");
        let leap = UNIX_EPOCH + Duration::from_secs(951_825_600); // 2000-02-29 12:00
        assert_eq!(format_time(leap), "2000-02-29 12:00:00");
    }

    #[test]
    fn show_names() {
        assert_eq!(Show::parse("pool_nodes"), Some(Show::PoolNodes));
        assert_eq!(Show::parse("servers"), Some(Show::Servers));
        assert_eq!(Show::parse("lease"), Some(Show::Lease));
        assert_eq!(Show::parse("fds"), None);
    }

    #[test]
    fn status_names_are_pgpools() {
        use crate::cluster::Status;
        assert_eq!(
            [Status::Up, Status::Waiting, Status::Down].map(Status::as_str),
            ["up", "waiting", "down"]
        );
    }
}
