//! What the backends are and how they are doing: a [`Topology`] snapshot behind
//! `ArcSwap`, read once per request and replaced whole by the health monitor, the lag
//! loop, the Patroni poller and the admin operations.
//!
//! Roles come from evidence: `pg_is_in_recovery()` and the timeline on each node (and,
//! with `topology = "patroni"`, Patroni's leader), never from the order of
//! `[[backends]]`. Node states follow Pgpool-II: `waiting` until a node first answers,
//! `up` while it serves, `down` once `health_check.max_retries` retries have failed
//! (or an operator detached it). [`failover::Tracker`] owns those decisions; a
//! replica is in the read set while it is up, its lag has been measured, and the lag
//! is within `routing.max_lag_bytes` / `max_lag_seconds`.
//!
//! In a fleet, which instance runs the failover hooks is decided by a lease in etcd
//! ([`lease`], over [`etcd`] and [`http`]); the topology itself stays each instance's
//! own, from its own probes.

pub mod etcd;
pub mod events;
pub mod failover;
pub mod health;
pub mod hooks;
pub mod http;
pub mod lag;
pub mod lease;
pub mod patroni;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use crate::auth::Credentials;
use crate::config::Config;
use crate::tls::connect::Connector;
use events::{Outcome, Transition};
use failover::Tracker;

/// What the health, lag and Patroni loops are given: the cluster they watch, the
/// config they read each round, the credentials they log in with, and where they hand
/// what they find. They reach nothing else: `control` builds it and acts on findings.
#[derive(Clone)]
pub struct Monitor {
    pub cluster: Arc<Cluster>,
    pub config: Arc<ArcSwap<Config>>,
    pub credentials: Arc<Credentials>,
    /// The server TLS settings, the same the pools connect with.
    pub server_tls: Arc<Connector>,
    pub findings: Findings,
}

/// Where the loops hand the node transitions they caused (a node down or up, a
/// primary demoted, a new primary); the one who acts on them (`control`: pools
/// dropped, hooks queued, failovers counted) gives the callback. It runs before the
/// loop goes on, so a node's pools are gone before its next probe.
#[derive(Clone)]
pub struct Findings(Arc<Act>);

/// What `control` does with transitions observed under a config.
type Act = dyn Fn(&Config, &[Transition]) + Send + Sync;

impl Findings {
    pub fn new(act: impl Fn(&Config, &[Transition]) + Send + Sync + 'static) -> Findings {
        Findings(Arc::new(act))
    }

    /// Hands `transitions` (observed under `config`) up; nothing happens for none.
    pub fn report(&self, config: &Config, transitions: &[Transition]) {
        if !transitions.is_empty() {
            (self.0)(config, transitions);
        }
    }
}

/// A node's role as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    /// Never reached.
    Unknown,
}

impl Role {
    /// Pgpool-II's spelling (`SHOW POOL_NODES`): primary, standby, unknown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "standby",
            Role::Unknown => "unknown",
        }
    }
}

/// Whether a node is in service, as Pgpool-II names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Configured, not yet answered a probe: takes nothing.
    Waiting,
    /// In service.
    Up,
    /// Out of service: failed checks, detached by an operator, a false primary, or
    /// not a member Patroni lists.
    Down,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Up => "up",
            Status::Down => "down",
        }
    }
}

/// Counters per node that outlive topology snapshots (each snapshot shares them).
/// The one place per-node counts are kept: `SHOW POOL_NODES`, `SHOW
/// POOL_BACKEND_STATS` and the Prometheus metrics all read them from here.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Read requests routed here (Pgpool-II's `select_cnt`).
    pub selects: AtomicU64,
    /// Requests routed here because they may write (primary only).
    pub writes: AtomicU64,
    /// Requests that could not get a server on this node.
    pub errors: AtomicU64,
    /// Requests by their first statement (`SHOW POOL_BACKEND_STATS`).
    pub inserts: AtomicU64,
    pub updates: AtomicU64,
    pub deletes: AtomicU64,
    pub ddl: AtomicU64,
    pub other: AtomicU64,
    /// ErrorResponses the node sent, by severity.
    pub server_errors: AtomicU64,
    pub fatals: AtomicU64,
    pub panics: AtomicU64,
    /// Transactions relayed here, by route (`pgrelay_transactions_total`).
    pub read_transactions: AtomicU64,
    pub write_transactions: AtomicU64,
    /// Query and Execute messages in them (`pgrelay_queries_total`).
    pub read_queries: AtomicU64,
    pub write_queries: AtomicU64,
    health: Mutex<HealthStats>,
}

/// Pgpool-II's health-check statistics for one node.
#[derive(Debug, Clone, Default)]
pub struct HealthStats {
    pub total: u64,
    pub success: u64,
    pub fail: u64,
    /// Probes that were retries (the one before had failed).
    pub retries: u64,
    /// The longest run of retries.
    pub max_retries: u64,
    pub max_duration: std::time::Duration,
    pub min_duration: Option<std::time::Duration>,
    pub total_duration: std::time::Duration,
    pub last: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
    pub last_failure: Option<SystemTime>,
    streak: u64,
}

impl NodeStats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds the ErrorResponses a node sent, by severity: ERROR, FATAL, PANIC.
    pub fn add_errors(&self, [errors, fatals, panics]: [u64; 3]) {
        self.server_errors.fetch_add(errors, Ordering::Relaxed);
        self.fatals.fetch_add(fatals, Ordering::Relaxed);
        self.panics.fetch_add(panics, Ordering::Relaxed);
    }

    /// Adds one transaction relayed here and the queries it ran.
    pub fn add_transaction(&self, write: bool, queries: u64) {
        let (transactions, counted) = if write {
            (&self.write_transactions, &self.write_queries)
        } else {
            (&self.read_transactions, &self.read_queries)
        };
        transactions.fetch_add(1, Ordering::Relaxed);
        counted.fetch_add(queries, Ordering::Relaxed);
    }

    /// Transactions and queries relayed here: read transactions, write transactions,
    /// read queries, write queries.
    pub fn relayed(&self) -> [u64; 4] {
        [
            &self.read_transactions,
            &self.write_transactions,
            &self.read_queries,
            &self.write_queries,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    pub fn health(&self) -> HealthStats {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records one probe: whether it was answered and how long it took.
    pub fn record_probe(&self, ok: bool, took: std::time::Duration) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        h.total += 1;
        if h.streak > 0 {
            h.retries += 1;
        }
        if ok {
            h.success += 1;
            h.last_success = Some(now);
            h.streak = 0;
        } else {
            h.fail += 1;
            h.last_failure = Some(now);
            h.streak += 1;
            h.max_retries = h.max_retries.max(h.streak - 1);
        }
        h.last = Some(now);
        h.max_duration = h.max_duration.max(took);
        h.min_duration = Some(h.min_duration.map_or(took, |m| m.min(took)));
        h.total_duration += took;
    }
}

/// How far a replica is behind, as last measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Lag {
    /// `pg_last_wal_replay_lsn()` on the replica.
    pub replay_lsn: u64,
    /// The primary's `pg_current_wal_lsn()` minus `replay_lsn`.
    pub bytes: u64,
    /// Seconds since the last replayed transaction, while WAL is waiting to be
    /// replayed; 0 when replay has caught up with what was received.
    pub seconds: f64,
}

#[derive(Debug, Clone)]
pub struct NodeState {
    pub host: String,
    pub port: u16,
    pub weight: f64,
    /// `[[backends]] data_directory`, for the `%D` / `%R` placeholders.
    pub data_directory: String,
    pub role: Role,
    pub status: Status,
    /// The last probe was answered (Pgpool-II's `pg_status`).
    pub pg_up: bool,
    /// The node's timeline: the WAL insert timeline of a primary, the received one
    /// of a replica. `None` when it could not be read.
    pub timeline: Option<u32>,
    /// Where a replica's WAL receiver streams from, while it streams.
    pub upstream: Option<(String, u16)>,
    /// Patroni does not list it as a running member: it takes nothing.
    pub vetoed: bool,
    /// Measured lag (replicas), `None` until the first measurement.
    pub lag: Option<Lag>,
    /// May take reads: the primary when up, a replica when up and fresh enough.
    pub readable: bool,
    /// When `status` last changed.
    pub since: SystemTime,
    pub stats: Arc<NodeStats>,
}

impl NodeState {
    pub fn new(host: String, port: u16, weight: f64, data_directory: String) -> NodeState {
        NodeState {
            host,
            port,
            weight,
            data_directory,
            role: Role::Unknown,
            status: Status::Waiting,
            pg_up: false,
            timeline: None,
            upstream: None,
            vetoed: false,
            lag: None,
            readable: false,
            since: SystemTime::now(),
            stats: Arc::default(),
        }
    }

    /// In service: requests may be routed here.
    pub fn is_up(&self) -> bool {
        self.status == Status::Up
    }
}

impl PartialEq for NodeState {
    /// Counters, lag figures and timestamps are not part of a node's state.
    fn eq(&self, other: &Self) -> bool {
        (
            &self.host,
            self.port,
            self.role,
            self.status,
            self.pg_up,
            self.timeline,
            self.vetoed,
            self.readable,
        ) == (
            &other.host,
            other.port,
            other.role,
            other.status,
            other.pg_up,
            other.timeline,
            other.vetoed,
            other.readable,
        )
    }
}

/// One consistent view of the cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub nodes: Vec<NodeState>,
    pub primary: Option<usize>,
}

impl Topology {
    /// Before any probe: nodes from the config, roles unknown, all waiting.
    pub fn from_config(config: &Config) -> Topology {
        let nodes = config
            .backends
            .iter()
            .map(|b| NodeState::new(b.host.clone(), b.port, b.weight, b.data_directory.clone()))
            .collect();
        Topology {
            nodes,
            primary: None,
        }
    }

    /// The node at `host:port`, if the topology has it.
    pub fn find(&self, host: &str, port: u16) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.port == port && same_host(&n.host, host))
    }

    /// Recomputes which nodes may take reads from roles, health and lag.
    pub fn update_read_set(&mut self, config: &Config) {
        let routing = &config.routing;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.readable = node.is_up()
                && !node.vetoed
                && if Some(i) == self.primary {
                    true
                } else if node.role == Role::Replica {
                    node.lag.is_some_and(|lag| {
                        (routing.max_lag_bytes == 0 || lag.bytes <= routing.max_lag_bytes)
                            && (routing.max_lag_seconds <= 0.0
                                || lag.seconds <= routing.max_lag_seconds)
                    })
                } else {
                    false
                };
        }
    }

    /// Whether any node other than the primary may take reads.
    pub fn has_readable_replica(&self) -> bool {
        self.nodes
            .iter()
            .enumerate()
            .any(|(i, n)| n.readable && Some(i) != self.primary)
    }

    /// Pgpool-II's main node: the primary, else the lowest-numbered node in service.
    pub fn main_node(&self) -> Option<usize> {
        self.primary
            .or_else(|| self.nodes.iter().position(NodeState::is_up))
    }
}

/// Whether two host names denote the same host, counting the loopback spellings as one.
pub fn same_host(a: &str, b: &str) -> bool {
    let loopback = |h: &str| matches!(h, "localhost" | "127.0.0.1" | "::1" | "[::1]");
    a.eq_ignore_ascii_case(b) || (loopback(a) && loopback(b))
}

/// The shared, swappable topology.
pub struct Cluster {
    topology: ArcSwap<Topology>,
    /// The failover state machine; its lock also serializes every writer of
    /// `topology`, so no update is lost.
    tracker: Mutex<Tracker>,
    /// Bumped at every published change: clients holding for a primary wait on it.
    changed: watch::Sender<u64>,
    /// One per node: wakes the node's health check at once.
    kicks: Mutex<Vec<Arc<Notify>>>,
}

impl Cluster {
    pub fn new(topology: Topology) -> Self {
        Cluster {
            tracker: Mutex::new(Tracker::new(topology.nodes.len())),
            topology: ArcSwap::from_pointee(topology),
            changed: watch::channel(0).0,
            kicks: Mutex::new(Vec::new()),
        }
    }

    pub fn snapshot(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// A cheap borrow of the current snapshot, for the hot path.
    pub fn load(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.topology.load()
    }

    /// Applies `change` to a copy of the current topology (with the tracker) and
    /// publishes it; returns what `change` returned.
    fn edit<R>(&self, change: impl FnOnce(&mut Topology, &mut Tracker) -> R) -> R {
        let mut tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.topology.load_full();
        let mut next = (*current).clone();
        let result = change(&mut next, &mut tracker);
        if *current != next {
            let summary: Vec<_> = next
                .nodes
                .iter()
                .map(|n| (n.port, n.role.as_str(), n.status.as_str(), n.readable))
                .collect();
            tracing::info!(primary = ?next.primary, nodes = ?summary, "topology changed");
            self.topology.store(Arc::new(next));
            self.changed.send_modify(|generation| *generation += 1);
        } else {
            self.topology.store(Arc::new(next));
        }
        result
    }

    /// Applies `change` to a copy of the current topology and publishes it.
    pub fn update(&self, change: impl FnOnce(&mut Topology)) {
        self.edit(|topology, _| change(topology));
    }

    /// Takes one probe's outcome for `node` into the state machine.
    pub fn observe(&self, node: usize, outcome: &Outcome, config: &Config) -> Vec<Transition> {
        self.edit(|topology, tracker| tracker.observe(topology, config, node, outcome))
    }

    /// Runs an operator's command (detach, attach, promote) on the state machine.
    pub fn operate(
        &self,
        op: events::Operation,
        config: &Config,
    ) -> Result<Vec<Transition>, events::OperationError> {
        self.edit(|topology, tracker| tracker.operate(topology, config, op))
    }

    /// Takes Patroni's view of the members (`None`: Patroni could not be read).
    pub fn patroni_view(&self, view: patroni::View, config: &Config) -> Vec<Transition> {
        self.edit(|topology, tracker| tracker.patroni(topology, config, view))
    }

    /// Takes a reloaded config's `[[backends]]` (static topology): new ones become
    /// nodes, those no longer listed take nothing (their ids stay), weights and data
    /// directories follow the file.
    pub fn reconfigure(&self, config: &Config) -> events::BackendChanges {
        self.edit(|topology, tracker| tracker.reconfigure(topology, config))
    }

    /// How long `node`'s health check waits before its next probe.
    pub fn next_probe_in(&self, node: usize, config: &Config) -> std::time::Duration {
        let tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        tracker.next_probe_in(&self.topology.load(), config, node)
    }

    /// Whether `node`'s checks are retrying after a failure (kicks wait for them).
    pub fn retrying(&self, node: usize) -> bool {
        let tracker = self.tracker.lock().unwrap_or_else(|p| p.into_inner());
        tracker.retrying(node)
    }

    /// The wake-up for `node`'s health check.
    pub fn kick_handle(&self, node: usize) -> Arc<Notify> {
        let mut kicks = self.kicks.lock().unwrap_or_else(|p| p.into_inner());
        while kicks.len() <= node {
            kicks.push(Arc::default());
        }
        kicks[node].clone()
    }

    /// A server connection to `node` failed under a client: check the node now.
    pub fn suspect(&self, node: usize) {
        tracing::debug!(node, "server connection failed; checking the node now");
        self.kick_handle(node).notify_one();
    }

    /// Waits until a primary is known, or `deadline`. Returns it, if any.
    pub async fn wait_primary(&self, deadline: tokio::time::Instant) -> Option<usize> {
        let mut changes = self.changed.subscribe();
        loop {
            if let Some(primary) = self.topology.load().primary {
                return Some(primary);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.topology.load().primary,
            }
        }
    }

    /// Waits for the next published change, or `deadline`. Returns false at the deadline.
    pub async fn wait_change(&self, deadline: tokio::time::Instant) -> bool {
        let mut changes = self.changed.subscribe();
        changes.borrow_and_update();
        matches!(
            tokio::time::timeout_at(deadline, changes.changed()).await,
            Ok(Ok(()))
        )
    }
}

/// Parses an LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some(hi << 32 | lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_parsing() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/3000060\n"), Some(0x300_0060));
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(parse_lsn("1"), None);
        assert_eq!(parse_lsn("100000000/0"), None);
    }

    fn topology(lags: &[Option<Lag>]) -> (Topology, Config) {
        let config = Config {
            backends: (0..lags.len())
                .map(|i| crate::config::BackendConfig {
                    host: "127.0.0.1".into(),
                    port: 5432 + i as u16,
                    weight: 1.0,
                    data_directory: String::new(),
                    role: None,
                })
                .collect(),
            ..Config::default()
        };
        let mut t = Topology::from_config(&config);
        for (i, lag) in lags.iter().enumerate() {
            t.nodes[i].status = Status::Up;
            t.nodes[i].role = if i == 0 { Role::Primary } else { Role::Replica };
            t.nodes[i].lag = *lag;
        }
        t.primary = Some(0);
        (t, config)
    }

    /// With paused time: a request holding for a primary gets it as soon as one is
    /// published, and gives up at its deadline otherwise.
    #[tokio::test(start_paused = true)]
    async fn holding_for_a_primary_ends_at_a_new_one_or_the_deadline() {
        let (mut t, config) = topology(&[None, None]);
        t.primary = None;
        t.nodes[0].status = Status::Down;
        let cluster = Cluster::new(t);
        let start = tokio::time::Instant::now();
        let deadline = start + std::time::Duration::from_secs(30);
        let waiting = cluster.wait_primary(deadline);
        let promote = async {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            let promoted = Ok(events::Probe {
                in_recovery: false,
                timeline: Some(2),
                upstream: None,
            });
            cluster.observe(1, &promoted, &config)
        };
        let (primary, transitions) = tokio::join!(waiting, promote);
        assert_eq!(primary, Some(1));
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(3));
        assert!(matches!(
            transitions[..],
            [Transition::NewPrimary { node: 1, .. }]
        ));
        let (mut t, _) = topology(&[None]);
        t.primary = None;
        let cluster = Cluster::new(t);
        let start = tokio::time::Instant::now();
        let none = cluster
            .wait_primary(start + std::time::Duration::from_secs(30))
            .await;
        assert_eq!(none, None);
        assert_eq!(start.elapsed(), std::time::Duration::from_secs(30));
    }

    #[test]
    fn read_set_follows_lag_limits() {
        let fresh = Lag {
            replay_lsn: 10,
            bytes: 0,
            seconds: 0.0,
        };
        let far = Lag {
            bytes: 64 << 20,
            ..fresh
        };
        let slow = Lag {
            seconds: 30.0,
            ..fresh
        };
        let (mut t, mut config) = topology(&[None, Some(fresh), Some(far), Some(slow), None]);
        t.update_read_set(&config);
        let readable: Vec<bool> = t.nodes.iter().map(|n| n.readable).collect();
        assert_eq!(readable, [true, true, false, false, false]);
        assert!(t.has_readable_replica());
        config.routing.max_lag_bytes = 0;
        config.routing.max_lag_seconds = 0.0;
        t.update_read_set(&config);
        let readable: Vec<bool> = t.nodes.iter().map(|n| n.readable).collect();
        assert_eq!(readable, [true, true, true, true, false]);
        t.nodes[1].status = Status::Down;
        t.update_read_set(&config);
        assert!(!t.nodes[1].readable);
    }
}
