//! What the backends are and how they are doing: a [`Topology`] snapshot behind
//! `ArcSwap`, read once per request and replaced whole by the health loop.
//!
//! The relay core only needs to know which node is the primary; roles come from
//! `pg_is_in_recovery()` on each node, never from the order of `[[backends]]`.

pub mod health;

use std::sync::Arc;

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

#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub host: String,
    pub port: u16,
    pub role: Role,
    pub up: bool,
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
                role: Role::Unknown,
                up: false,
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
}

/// The shared, swappable topology.
pub struct Cluster {
    topology: ArcSwap<Topology>,
}

impl Cluster {
    pub fn new(topology: Topology) -> Self {
        Cluster {
            topology: ArcSwap::from_pointee(topology),
        }
    }

    pub fn snapshot(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    pub fn primary(&self) -> Option<(usize, NodeState)> {
        let topology = self.topology.load();
        topology.primary.map(|i| (i, topology.nodes[i].clone()))
    }

    pub fn store(&self, topology: Topology) {
        if **self.topology.load() != topology {
            tracing::info!(primary = ?topology.primary, nodes = ?topology.nodes, "topology changed");
        }
        self.topology.store(Arc::new(topology));
    }
}
