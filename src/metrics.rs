//! Prometheus metrics and the answers of the HTTP listener (`metrics_listen`, whose
//! accept loop is in [`crate::listener`]) that serves them with the Kubernetes probes:
//! `GET /metrics`, `/healthz` (the process answers, through a shutdown's drain too) and
//! `/readyz` (listening, not shutting down, and a primary is known).
//!
//! One [`Metrics`] lives in [`crate::Shared`]. Counters the hot path touches are
//! resolved once (per error kind) so a transaction only adds to atomics; per-node
//! counts are kept in [`crate::cluster::NodeStats`] and copied into their counters
//! when scraped, like the gauges of state (clients, servers, nodes).

use std::sync::Mutex;

use std::sync::Arc;

use dashmap::DashMap;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::ErrorKind;
use crate::registry::PoolLatency;
use crate::Shared;

pub struct Metrics {
    pub registry: Registry,
    /// Clients pinned to one server in transaction mode (LISTEN, temp tables, ...).
    pub pinned_clients: IntGauge,
    /// Pins taken, by reason.
    pub pins: IntCounterVec,
    /// A Bind or Describe found its statement prepared on the server it landed on.
    pub prepared_hits: IntCounter,
    /// pgrelay prepared the statement there first.
    pub prepared_misses: IntCounter,
    /// Nodes taken out of service (failed checks, false primaries, detached).
    pub failovers: IntCounter,
    /// Errors sent to clients, by kind (indexed as [`ErrorKind::ALL`]).
    errors: Vec<IntCounter>,
    /// By pool (database, user): a request being complete to its transaction's end.
    transaction_duration: HistogramVec,
    /// By pool: a request sent to its last ReadyForQuery.
    query_duration: HistogramVec,
    /// By pool: waiting for a server connection.
    pool_wait: HistogramVec,
    /// The histograms of each pool, resolved once per pool.
    latencies: DashMap<(String, String), Arc<PoolLatency>>,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    /// Failover hooks run, by hook and outcome (ok, failed), brought up to the
    /// runner's counts when scraped.
    hooks: IntCounterVec,
    /// Held while node counts are copied into `transactions` and `queries`, so that
    /// two scrapes at once do not both add the same difference.
    node_sync: Mutex<()>,
    state: StateGauges,
}

/// Gauges of what is connected and how the nodes are, set when scraped.
struct StateGauges {
    clients: IntGaugeVec,
    servers: IntGaugeVec,
    pool_servers: IntGaugeVec,
    pool_size: IntGaugeVec,
    pool_waiting: IntGaugeVec,
    fleet_instances: IntGauge,
    fleet_share: IntGauge,
    lease_held: IntGauge,
    lease_enabled: IntGauge,
    node_up: IntGaugeVec,
    node_primary: IntGaugeVec,
    node_readable: IntGaugeVec,
    node_lag_bytes: IntGaugeVec,
    node_lag_seconds: prometheus::GaugeVec,
}

impl StateGauges {
    fn new() -> StateGauges {
        StateGauges {
            clients: gauge_vec(
                "pgrelay_client_connections",
                "Client connections by state (active, waiting, idle)",
                &["state"],
            ),
            servers: gauge_vec(
                "pgrelay_server_connections",
                "Server connections by node and state (active, idle)",
                &["node", "state"],
            ),
            pool_servers: gauge_vec(
                "pgrelay_pool_server_connections",
                "Server connections of each pool by state (active, idle)",
                &["node", "database", "user", "state"],
            ),
            pool_size: gauge_vec(
                "pgrelay_pool_size",
                "The most server connections each pool may open",
                &["node", "database", "user"],
            ),
            fleet_instances: IntGauge::new(
                "pgrelay_fleet_instances",
                "Live instances of this pgrelay's fleet, itself included, as last counted",
            )
            .expect("valid metric"),
            fleet_share: IntGauge::new(
                "pgrelay_fleet_server_connections_per_node",
                "This instance's share of max_fleet_server_connections on each node (0: no limit)",
            )
            .expect("valid metric"),
            lease_held: IntGauge::new(
                "pgrelay_failover_lease_held",
                "1 while this instance holds the fleet's failover lease and runs the hooks",
            )
            .expect("valid metric"),
            lease_enabled: IntGauge::new(
                "pgrelay_failover_lease_enabled",
                "1 when failover.lease names a lease (etcd): one instance of the fleet runs the hooks",
            )
            .expect("valid metric"),
            pool_waiting: gauge_vec(
                "pgrelay_pool_waiting_clients",
                "Clients waiting in each pool's queue for a server connection",
                &["node", "database", "user"],
            ),
            node_up: gauge_vec(
                "pgrelay_node_up",
                "1 while the node is in service",
                &["node"],
            ),
            node_primary: gauge_vec("pgrelay_node_primary", "1 for the primary", &["node"]),
            node_readable: gauge_vec(
                "pgrelay_node_readable",
                "1 while the node takes reads",
                &["node"],
            ),
            node_lag_bytes: gauge_vec(
                "pgrelay_node_lag_bytes",
                "Replication lag in bytes of WAL, as last measured",
                &["node"],
            ),
            node_lag_seconds: prometheus::GaugeVec::new(
                Opts::new(
                    "pgrelay_node_lag_seconds",
                    "Replay delay in seconds, as last measured",
                ),
                &["node"],
            )
            .expect("valid metric"),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.clients.clone()),
            Box::new(self.servers.clone()),
            Box::new(self.pool_servers.clone()),
            Box::new(self.pool_size.clone()),
            Box::new(self.pool_waiting.clone()),
            Box::new(self.fleet_instances.clone()),
            Box::new(self.fleet_share.clone()),
            Box::new(self.lease_held.clone()),
            Box::new(self.lease_enabled.clone()),
            Box::new(self.node_up.clone()),
            Box::new(self.node_primary.clone()),
            Box::new(self.node_readable.clone()),
            Box::new(self.node_lag_bytes.clone()),
            Box::new(self.node_lag_seconds.clone()),
        ]
    }
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

/// Buckets from 50 µs to 30 s.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let histogram = |name: &str, help: &str| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            HistogramVec::new(opts, &["database", "user"]).expect("valid metric")
        };
        let errors_vec = counter_vec(
            "pgrelay_client_errors_total",
            "Errors sent to clients, by kind",
            &["kind"],
        );
        let errors = ErrorKind::ALL
            .iter()
            .map(|kind| errors_vec.with_label_values(&[kind.as_str()]))
            .collect();
        let bytes = counter_vec(
            "pgrelay_bytes_total",
            "Bytes relayed, by direction (received from clients, sent to clients)",
            &["direction"],
        );
        let metrics = Metrics {
            pinned_clients: IntGauge::new(
                "pgrelay_pinned_clients",
                "Clients kept on one server in transaction mode by session state",
            )
            .expect("valid metric"),
            pins: counter_vec(
                "pgrelay_pins_total",
                "Clients pinned to their server in transaction mode, by reason",
                &["reason"],
            ),
            prepared_hits: counter(
                "pgrelay_prepared_statement_hits_total",
                "Binds and Describes whose statement the server had prepared",
            ),
            prepared_misses: counter(
                "pgrelay_prepared_statement_misses_total",
                "Binds and Describes for which pgrelay prepared the statement on the server first",
            ),
            failovers: counter(
                "pgrelay_failovers_total",
                "Nodes taken out of service: failed health checks, false primaries, detaches",
            ),
            errors,
            transaction_duration: histogram(
                "pgrelay_transaction_duration_seconds",
                "From the request that starts a transaction being complete to the transaction's end, by pool",
            ),
            query_duration: histogram(
                "pgrelay_query_duration_seconds",
                "From a request being sent to its server (or its transaction starting) to its last ReadyForQuery, by pool",
            ),
            pool_wait: histogram(
                "pgrelay_pool_wait_seconds",
                "Time a transaction's first request waited for a server connection, by pool",
            ),
            latencies: DashMap::new(),
            bytes_received: bytes.with_label_values(&["received"]),
            bytes_sent: bytes.with_label_values(&["sent"]),
            transactions: counter_vec(
                "pgrelay_transactions_total",
                "Transactions relayed, by node and route (read, write)",
                &["node", "route"],
            ),
            queries: counter_vec(
                "pgrelay_queries_total",
                "Queries (Query and Execute messages) relayed, by node and route",
                &["node", "route"],
            ),
            hooks: counter_vec(
                "pgrelay_hooks_total",
                "Failover hooks run (failover_command, failback_command, follow_primary_command), by outcome (ok, failed)",
                &["hook", "outcome"],
            ),
            node_sync: Mutex::new(()),
            state: StateGauges::new(),
            registry,
        };
        let mut collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.pinned_clients.clone()),
            Box::new(metrics.pins.clone()),
            Box::new(metrics.prepared_hits.clone()),
            Box::new(metrics.prepared_misses.clone()),
            Box::new(metrics.failovers.clone()),
            Box::new(errors_vec),
            Box::new(metrics.transaction_duration.clone()),
            Box::new(metrics.query_duration.clone()),
            Box::new(metrics.pool_wait.clone()),
            Box::new(bytes),
            Box::new(metrics.transactions.clone()),
            Box::new(metrics.queries.clone()),
            Box::new(metrics.hooks.clone()),
        ];
        collectors.extend(metrics.state.collectors());
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric registered once");
        }
        metrics
    }

    /// The latency histograms of the pool of `database` and `user`.
    pub fn latency(&self, database: &str, user: &str) -> Arc<PoolLatency> {
        let key = (database.to_owned(), user.to_owned());
        if let Some(latency) = self.latencies.get(&key) {
            return latency.clone();
        }
        let labels = [database, user];
        self.latencies
            .entry(key)
            .or_insert_with(|| {
                Arc::new(PoolLatency {
                    transaction: self.transaction_duration.with_label_values(&labels),
                    query: self.query_duration.with_label_values(&labels),
                    wait: self.pool_wait.with_label_values(&labels),
                })
            })
            .clone()
    }

    /// Every pool's latency histograms, sorted by database and user.
    pub fn latencies(&self) -> Vec<((String, String), Arc<PoolLatency>)> {
        let mut all: Vec<_> = self
            .latencies
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Counts an error sent to a client.
    pub fn error(&self, kind: ErrorKind) {
        if let Some(i) = ErrorKind::ALL.iter().position(|&k| k == kind) {
            self.errors[i].inc();
        }
    }

    /// Brings the transaction and query counters up to the nodes' own counts. A node's
    /// series appear once it (or a node after it) relayed a transaction.
    fn sync_node_counts(&self, topology: &crate::cluster::Topology) {
        let _sync = self.node_sync.lock().unwrap_or_else(|p| p.into_inner());
        let counts: Vec<[u64; 4]> = topology.nodes.iter().map(|n| n.stats.relayed()).collect();
        let Some(last) = counts.iter().rposition(|c| *c != [0; 4]) else {
            return;
        };
        for (i, counts) in counts.iter().enumerate().take(last + 1) {
            let label = i.to_string();
            let counters = [
                self.transactions.with_label_values(&[&label, "read"]),
                self.transactions.with_label_values(&[&label, "write"]),
                self.queries.with_label_values(&[&label, "read"]),
                self.queries.with_label_values(&[&label, "write"]),
            ];
            for (counter, &count) in counters.iter().zip(counts) {
                // A counter never goes back (a node replaced by a reload starts anew).
                counter.inc_by(count.saturating_sub(counter.get()));
            }
        }
    }

    /// Brings the hook counters up to the runner's counts.
    fn sync_hook_counts(&self, shared: &Shared) {
        let _sync = self.node_sync.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, failed, count) in shared.hooks.totals() {
            let outcome = if failed { "failed" } else { "ok" };
            let counter = self.hooks.with_label_values(&[kind.as_str(), outcome]);
            counter.inc_by(count.saturating_sub(counter.get()));
        }
    }

    /// Sets the state gauges from what is connected and how the nodes are.
    pub fn refresh(&self, shared: &Shared) {
        use crate::registry::ClientState;
        let gauges = &self.state;
        let mut by_state = [0i64; 3];
        for client in shared.registry.clients() {
            if !client.admin {
                by_state[client.state() as usize] += 1;
            }
        }
        for state in [ClientState::Idle, ClientState::Active, ClientState::Waiting] {
            gauges
                .clients
                .with_label_values(&[state.as_str()])
                .set(by_state[state as usize]);
        }
        let pools = &shared.pools;
        let instances = pools
            .fleet_instances
            .load(std::sync::atomic::Ordering::Relaxed);
        gauges.fleet_instances.set(instances as i64);
        gauges.fleet_share.set(pools.limits().node_max() as i64);
        gauges.lease_held.set(i64::from(shared.lease.holds()));
        let lease = shared.config.load().failover.lease;
        gauges
            .lease_enabled
            .set(i64::from(lease != crate::config::LeaseKind::None));
        gauges.servers.reset();
        gauges.pool_servers.reset();
        gauges.pool_size.reset();
        gauges.pool_waiting.reset();
        for pool in shared.pools.all() {
            let (idle, total, waiting) = pool.counts();
            let node = pool.key.node.to_string();
            let key = [node.as_str(), &pool.key.database, &pool.key.user];
            let size = pool.settings.load().size;
            gauges.pool_size.with_label_values(&key).set(size as i64);
            gauges
                .pool_waiting
                .with_label_values(&key)
                .set(waiting as i64);
            for (state, count) in [("idle", idle), ("active", total - idle)] {
                let labels = [key[0], key[1], key[2], state];
                gauges
                    .pool_servers
                    .with_label_values(&labels)
                    .set(count as i64);
            }
            gauges
                .servers
                .with_label_values(&[&node, "idle"])
                .add(idle as i64);
            gauges
                .servers
                .with_label_values(&[&node, "active"])
                .add((total - idle) as i64);
        }
        let topology = shared.cluster.snapshot();
        self.sync_node_counts(&topology);
        self.sync_hook_counts(shared);
        for (i, n) in topology.nodes.iter().enumerate() {
            let label = i.to_string();
            let label = [label.as_str()];
            gauges
                .node_up
                .with_label_values(&label)
                .set(i64::from(n.is_up()));
            gauges
                .node_primary
                .with_label_values(&label)
                .set(i64::from(topology.primary == Some(i)));
            gauges
                .node_readable
                .with_label_values(&label)
                .set(i64::from(n.readable));
            gauges
                .node_lag_bytes
                .with_label_values(&label)
                .set(n.lag.map_or(0, |l| l.bytes) as i64);
            gauges
                .node_lag_seconds
                .with_label_values(&label)
                .set(n.lag.map_or(0.0, |l| l.seconds));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%err, "could not encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Reads one request of the HTTP listener (its head, at most 8 KiB) and answers it:
/// `/metrics`, `/healthz` or `/readyz`. The accept loop is the listener's.
pub async fn answer(mut socket: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            shared.metrics.refresh(shared);
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                shared.metrics.render(),
            )
        }
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/readyz") if *shared.shutting_down.borrow() => (
            "503 Service Unavailable",
            "text/plain",
            "not ready: shutting down\n".to_owned(),
        ),
        ("GET", "/readyz") => match shared.cluster.load().primary {
            Some(primary) => (
                "200 OK",
                "text/plain",
                format!("ready: primary is node {primary}\n"),
            ),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "not ready: no primary known\n".to_owned(),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}
