//! What the backends are and how they are doing: a [`Topology`] snapshot behind
//! `ArcSwap`, read once per request and replaced whole by the health and lag loops.
//!
//! Roles come from `pg_is_in_recovery()` on each node, never from the order of
//! `[[backends]]`. A replica is in the read set while it is up, its lag has been
//! measured, and the lag is within `routing.max_lag_bytes` / `max_lag_seconds`.

pub mod health;
pub mod lag;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::config::{Config, RoleHint};

/// A node's role as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    /// Never reached, or not reachable now.
    Unknown,
}

/// Counters per node that outlive topology snapshots (each snapshot shares them).
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Read requests routed here (Pgpool-II's `select_cnt`).
    pub selects: AtomicU64,
    /// Requests routed here because they may write (primary only).
    pub writes: AtomicU64,
    /// Requests that could not get a server on this node.
    pub errors: AtomicU64,
}

impl NodeStats {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
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
    pub role: Role,
    pub up: bool,
    /// Measured lag (replicas), `None` until the first measurement.
    pub lag: Option<Lag>,
    /// May take reads: the primary when up, a replica when up and fresh enough.
    pub readable: bool,
    pub stats: Arc<NodeStats>,
}

impl PartialEq for NodeState {
    /// Counters are not part of a node's state.
    fn eq(&self, other: &Self) -> bool {
        (&self.host, self.port, self.role, self.up, self.readable)
            == (
                &other.host,
                other.port,
                other.role,
                other.up,
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
    /// Before any probe: nodes from the config, roles unknown.
    pub fn from_config(config: &Config) -> Topology {
        let nodes = config
            .backends
            .iter()
            .map(|b| NodeState {
                host: b.host.clone(),
                port: b.port,
                weight: b.weight,
                role: Role::Unknown,
                up: false,
                lag: None,
                readable: false,
                stats: Arc::default(),
            })
            .collect();
        Topology {
            nodes,
            primary: None,
        }
    }

    /// Picks the primary among nodes that are up and not in recovery. With several
    /// (split brain: the failover issue guards against it properly), a node hinted
    /// `role = "primary"` wins, else the first.
    pub fn choose_primary(&mut self, config: &Config) {
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up && self.nodes[i].role == Role::Primary)
            .collect();
        if candidates.len() > 1 {
            tracing::error!(?candidates, "more than one node claims to be primary");
        }
        let hinted = candidates
            .iter()
            .copied()
            .find(|&i| config.backends.get(i).and_then(|b| b.role) == Some(RoleHint::Primary));
        self.primary = hinted.or(candidates.first().copied());
    }

    /// Recomputes which nodes may take reads from roles, health and lag.
    pub fn update_read_set(&mut self, config: &Config) {
        let routing = &config.routing;
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.readable = node.up
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
}

/// The shared, swappable topology.
pub struct Cluster {
    topology: ArcSwap<Topology>,
    /// Serializes writers (health and lag loops) so neither loses the other's update.
    writer: Mutex<()>,
}

impl Cluster {
    pub fn new(topology: Topology) -> Self {
        Cluster {
            topology: ArcSwap::from_pointee(topology),
            writer: Mutex::new(()),
        }
    }

    pub fn snapshot(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// A cheap borrow of the current snapshot, for the hot path.
    pub fn load(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.topology.load()
    }

    pub fn primary(&self) -> Option<(usize, NodeState)> {
        let topology = self.topology.load();
        topology.primary.map(|i| (i, topology.nodes[i].clone()))
    }

    /// Applies `change` to a copy of the current topology and publishes it.
    pub fn update(&self, change: impl FnOnce(&mut Topology)) {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.topology.load_full();
        let mut next = (*current).clone();
        change(&mut next);
        if *current != next {
            let summary: Vec<_> = next
                .nodes
                .iter()
                .map(|n| (n.port, n.role, n.up, n.readable))
                .collect();
            tracing::info!(primary = ?next.primary, nodes = ?summary, "topology changed");
        }
        self.topology.store(Arc::new(next));
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
            t.nodes[i].up = true;
            t.nodes[i].role = if i == 0 { Role::Primary } else { Role::Replica };
            t.nodes[i].lag = *lag;
        }
        t.choose_primary(&config);
        (t, config)
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
        t.nodes[1].up = false;
        t.update_read_set(&config);
        assert!(!t.nodes[1].readable);
    }
}
