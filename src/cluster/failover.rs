//! The failover state machine: what each probe, each Patroni reading and each
//! operator command does to the nodes' states and to the choice of primary. Pure: it
//! edits a [`Topology`] and returns [`Transition`]s; the health monitor turns those
//! into hooks and dropped pools.
//!
//! The rules, in Pgpool-II's terms:
//! - A node is `waiting` until it first answers, then `up`. An `up` node goes `down`
//!   when a probe and `health_check.max_retries` retries have failed in a row.
//! - A `down` node comes back (`failback_command`) with `failover.auto_failback` after
//!   `health_check.up_after` answers in a row, if it is clearly part of the cluster:
//!   a replica streaming from a node in service (or on the primary's timeline), or a
//!   primary while there is none and its timeline is not older than the newest one a
//!   primary was seen on. A node an operator detached stays down until attached.
//! - The primary is the one node in service that is not in recovery (and, with
//!   Patroni, is its leader). Two such nodes are a split brain: the one on the newest
//!   timeline wins and the other is detached as a false primary; on a tie, there is
//!   no primary (writes wait) until an operator settles it.
//! - A primary lost (down or detached) makes the next primary a failover's result:
//!   replicas are told to follow it (`follow_primary_command`).

use std::time::{Duration, SystemTime};

use super::events::{BackendChanges, DownReason, Operation, OperationError, Outcome, Transition};
use super::{patroni, same_host, NodeState, Role, Status, Topology};
use crate::config::Config;

/// Why a node is kept out of service regardless of its probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Detached by an operator: only an attach brings it back.
    Operator,
    /// Detached as a false primary: it may come back as a replica.
    FalsePrimary,
}

#[derive(Debug, Clone, Default)]
struct Track {
    /// Failed probes in a row.
    fails: u32,
    /// Answered probes in a row.
    successes: u32,
    hold: Option<Hold>,
}

/// An operator's choice of primary.
#[derive(Debug, Clone, Copy)]
struct Forced {
    node: usize,
    /// A switchover: the node becomes primary once it leaves recovery.
    when_promoted: bool,
}

/// The failover state that outlives topology snapshots.
#[derive(Debug, Default)]
pub struct Tracker {
    nodes: Vec<Track>,
    /// The primary was lost and no new one has appeared yet.
    lost_primary: Option<usize>,
    forced: Option<Forced>,
    /// The newest timeline a primary was seen on: an older one is never taken back.
    newest_timeline: u32,
    /// A split brain is being reported (logged once per episode).
    split_brain: bool,
    /// Patroni's members, with `topology = "patroni"`.
    patroni: Option<patroni::View>,
}

impl Tracker {
    pub fn new(nodes: usize) -> Tracker {
        Tracker {
            nodes: vec![Track::default(); nodes],
            ..Tracker::default()
        }
    }

    fn fit(&mut self, nodes: usize) {
        if self.nodes.len() < nodes {
            self.nodes.resize(nodes, Track::default());
        }
    }

    /// Takes one probe's outcome for `node`.
    pub fn observe(
        &mut self,
        t: &mut Topology,
        config: &Config,
        node: usize,
        outcome: &Outcome,
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        if node >= t.nodes.len() {
            return out;
        }
        self.fit(t.nodes.len());
        match outcome {
            Ok(probe) => {
                let track = &mut self.nodes[node];
                track.fails = 0;
                track.successes = track.successes.saturating_add(1);
                let n = &mut t.nodes[node];
                n.pg_up = true;
                n.role = if probe.in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                };
                n.timeline = probe.timeline;
                n.upstream = probe.upstream.clone();
                if n.role != Role::Replica {
                    n.lag = None;
                }
                if n.status == Status::Waiting {
                    tracing::info!(node, host = %n.host, port = n.port, role = n.role.as_str(), "node answers; in service");
                    set_status(n, Status::Up);
                } else if n.status == Status::Down && self.may_rejoin(t, config, node) {
                    let n = &mut t.nodes[node];
                    tracing::warn!(node, host = %n.host, port = n.port, role = n.role.as_str(), "node is back; failing it back");
                    set_status(n, Status::Up);
                    self.nodes[node].hold = None;
                    out.push(Transition::Up { node });
                }
            }
            Err(err) => {
                let track = &mut self.nodes[node];
                track.successes = 0;
                track.fails = track.fails.saturating_add(1);
                let fails = track.fails;
                let n = &mut t.nodes[node];
                n.pg_up = false;
                let retries = config.health_check.max_retries;
                if n.is_up() && fails > retries {
                    tracing::error!(node, host = %n.host, port = n.port, %err, fails, "health check failed after every retry; node is down");
                    self.take_down(t, node, DownReason::HealthCheck, &mut out);
                } else if n.is_up() {
                    tracing::warn!(node, host = %n.host, port = n.port, %err, retry = fails, of = retries, "health check failed; retrying");
                } else if fails == 1 {
                    tracing::warn!(node, host = %n.host, port = n.port, status = n.status.as_str(), %err, "health check failed");
                }
            }
        }
        self.settle(t, config, &mut out);
        out
    }

    /// Runs an operator's command.
    pub fn operate(
        &mut self,
        t: &mut Topology,
        config: &Config,
        op: Operation,
    ) -> Result<Vec<Transition>, OperationError> {
        self.fit(t.nodes.len());
        let mut out = Vec::new();
        match op {
            Operation::Detach(node) => {
                let n = t.nodes.get(node).ok_or(OperationError::NoSuchNode(node))?;
                tracing::warn!(node, host = %n.host, port = n.port, "node detached by an operator");
                self.nodes[node].hold = Some(Hold::Operator);
                if n.status != Status::Down {
                    self.take_down(t, node, DownReason::Detached, &mut out);
                }
            }
            Operation::Attach(node) => {
                let n = t
                    .nodes
                    .get_mut(node)
                    .ok_or(OperationError::NoSuchNode(node))?;
                if !n.pg_up {
                    return Err(OperationError::Unreachable(node));
                }
                self.nodes[node].hold = None;
                if n.status != Status::Up {
                    tracing::warn!(node, host = %n.host, port = n.port, "node attached by an operator");
                    set_status(n, Status::Up);
                    out.push(Transition::Up { node });
                }
            }
            Operation::Promote { node, switchover } => {
                let n = t.nodes.get(node).ok_or(OperationError::NoSuchNode(node))?;
                if !n.is_up() {
                    return Err(OperationError::NotUp(node));
                }
                tracing::warn!(node, host = %n.host, port = n.port, switchover, "node promoted to primary by an operator");
                self.forced = Some(Forced {
                    node,
                    when_promoted: switchover,
                });
                if let Some(primary) = t.primary.filter(|&p| switchover && p != node) {
                    self.nodes[primary].hold = Some(Hold::Operator);
                    self.take_down(t, primary, DownReason::Detached, &mut out);
                }
            }
        }
        self.settle(t, config, &mut out);
        Ok(out)
    }

    /// Takes Patroni's view: members it does not list as running take nothing, only
    /// its leader may be primary, and members pgrelay did not know become nodes.
    pub fn patroni(
        &mut self,
        t: &mut Topology,
        config: &Config,
        view: patroni::View,
    ) -> Vec<Transition> {
        for member in &view.members {
            if t.find(&member.host, member.port).is_none() {
                let backend = config
                    .backends
                    .iter()
                    .find(|b| b.port == member.port && same_host(&b.host, &member.host));
                tracing::info!(name = %member.name, host = %member.host, port = member.port, "new Patroni member");
                t.nodes.push(NodeState::new(
                    member.host.clone(),
                    member.port,
                    backend.map_or(1.0, |b| b.weight),
                    backend
                        .map(|b| b.data_directory.clone())
                        .unwrap_or_default(),
                ));
            }
        }
        self.fit(t.nodes.len());
        for n in &mut t.nodes {
            n.vetoed = !view
                .member(&n.host, n.port)
                .is_some_and(patroni::Member::serves);
        }
        self.patroni = Some(view);
        let mut out = Vec::new();
        self.settle(t, config, &mut out);
        out
    }

    /// Takes a reloaded config's `[[backends]]` (see [`super::Cluster::reconfigure`]).
    pub fn reconfigure(&mut self, t: &mut Topology, config: &Config) -> BackendChanges {
        let mut changes = BackendChanges::default();
        let patroni = config.failover.topology == crate::config::TopologySource::Patroni;
        for backend in &config.backends {
            match t.find(&backend.host, backend.port) {
                Some(i) => {
                    let n = &mut t.nodes[i];
                    n.weight = backend.weight;
                    n.data_directory = backend.data_directory.clone();
                    if n.vetoed && !patroni {
                        n.vetoed = false;
                        changes.added.push(i);
                    }
                }
                None => {
                    t.nodes.push(NodeState::new(
                        backend.host.clone(),
                        backend.port,
                        backend.weight,
                        backend.data_directory.clone(),
                    ));
                    changes.added.push(t.nodes.len() - 1);
                }
            }
        }
        if !patroni {
            for (i, n) in t.nodes.iter_mut().enumerate() {
                let listed = config
                    .backends
                    .iter()
                    .any(|b| b.port == n.port && same_host(&b.host, &n.host));
                if !listed && !n.vetoed {
                    n.vetoed = true;
                    changes.removed.push(i);
                }
            }
        }
        self.fit(t.nodes.len());
        let mut out = Vec::new();
        self.settle(t, config, &mut out);
        changes.transitions = out;
        changes
    }

    /// How long `node` waits before its next probe: retries and confirmations come
    /// at `retry_delay`, and so does everything while there is no primary (so a
    /// promotion is seen quickly); otherwise `period`.
    pub fn next_probe_in(&self, t: &Topology, config: &Config, node: usize) -> Duration {
        let hc = &config.health_check;
        let fast = hc.retry_delay.min(hc.period);
        let (Some(track), Some(n)) = (self.nodes.get(node), t.nodes.get(node)) else {
            return hc.period;
        };
        let retrying = n.is_up() && track.fails > 0;
        let confirming =
            n.status == Status::Down && track.successes > 0 && track.successes < hc.up_after;
        if retrying || confirming || t.primary.is_none() {
            fast
        } else {
            hc.period
        }
    }

    /// Whether `node`'s last probe failed (its next comes after `retry_delay`).
    pub fn retrying(&self, node: usize) -> bool {
        self.nodes.get(node).is_some_and(|t| t.fails > 0)
    }

    /// Takes `node` out of service.
    fn take_down(
        &mut self,
        t: &mut Topology,
        node: usize,
        reason: DownReason,
        out: &mut Vec<Transition>,
    ) {
        let old_main = t.main_node();
        let was_primary = t.primary == Some(node);
        let n = &mut t.nodes[node];
        set_status(n, Status::Down);
        n.readable = false;
        if was_primary {
            t.primary = None;
            self.lost_primary = Some(node);
        }
        if self.forced.is_some_and(|f| f.node == node) {
            self.forced = None;
        }
        let new_main = if was_primary {
            self.candidate(t)
        } else {
            t.main_node()
        };
        out.push(Transition::Down {
            node,
            reason,
            old_primary: if was_primary { Some(node) } else { t.primary },
            old_main,
            new_main,
        });
    }

    /// The node that should replace a lost primary: the operator's choice, else the
    /// replica in service that has replayed the most WAL (the lowest id on a tie).
    fn candidate(&self, t: &Topology) -> Option<usize> {
        if let Some(forced) = self.forced.filter(|f| t.nodes[f.node].is_up()) {
            return Some(forced.node);
        }
        let replayed = |i: usize| t.nodes[i].lag.map_or(0, |l| l.replay_lsn);
        (0..t.nodes.len())
            .filter(|&i| {
                let n = &t.nodes[i];
                n.is_up() && n.role == Role::Replica && !n.vetoed
            })
            .fold(None, |best: Option<usize>, i| match best {
                Some(b) if replayed(b) >= replayed(i) => Some(b),
                _ => Some(i),
            })
    }

    /// Whether a down node that answers may come back into service.
    fn may_rejoin(&self, t: &Topology, config: &Config, node: usize) -> bool {
        let track = &self.nodes[node];
        let n = &t.nodes[node];
        if track.hold == Some(Hold::Operator)
            || !config.failover.auto_failback
            || track.successes < config.health_check.up_after
            || n.vetoed
        {
            return false;
        }
        match n.role {
            Role::Replica => match &n.upstream {
                Some((host, port)) => t.nodes.iter().enumerate().any(|(i, m)| {
                    i != node && m.is_up() && m.port == *port && same_host(&m.host, host)
                }),
                None => t
                    .primary
                    .and_then(|p| t.nodes[p].timeline)
                    .is_some_and(|tl| n.timeline == Some(tl)),
            },
            Role::Primary => {
                let other_claims = t
                    .nodes
                    .iter()
                    .enumerate()
                    .any(|(i, m)| i != node && m.is_up() && m.role == Role::Primary);
                let current = n.timeline.is_some_and(|tl| tl >= self.newest_timeline);
                if (!current || other_claims) && track.successes == config.health_check.up_after {
                    tracing::error!(node, host = %n.host, port = n.port, timeline = ?n.timeline, newest = self.newest_timeline, "a down node answers as a primary, but it is not the authoritative one; keeping it detached (false primary)");
                }
                track.hold != Some(Hold::FalsePrimary)
                    && t.primary.is_none()
                    && !other_claims
                    && current
            }
            Role::Unknown => false,
        }
    }

    fn patroni_allows_primary(&self, t: &Topology, node: usize) -> bool {
        let n = &t.nodes[node];
        self.patroni
            .as_ref()
            .is_none_or(|view| view.is_leader(&n.host, n.port))
    }

    /// Decides the primary from the nodes' claims after any change.
    fn settle(&mut self, t: &mut Topology, config: &Config, out: &mut Vec<Transition>) {
        let claims: Vec<usize> = (0..t.nodes.len())
            .filter(|&i| {
                let n = &t.nodes[i];
                n.is_up()
                    && n.role == Role::Primary
                    && !n.vetoed
                    && self.patroni_allows_primary(t, i)
            })
            .collect();
        if let Some(forced) = self.forced {
            if !t.nodes[forced.node].is_up() {
                self.forced = None;
            }
        }
        let chosen = match self.forced {
            Some(f) if !f.when_promoted || claims.contains(&f.node) => {
                if claims.iter().any(|&c| c != f.node) && !self.split_brain {
                    tracing::warn!(primary = f.node, ?claims, "other nodes claim to be primary; the operator's choice stands and they take nothing");
                    self.split_brain = true;
                }
                Some(f.node)
            }
            Some(_) => None,
            None => match claims.len() {
                0 => None,
                1 => Some(claims[0]),
                _ => self.resolve_split_brain(t, &claims, out),
            },
        };
        if chosen.is_some() && claims.len() <= 1 {
            self.split_brain = false;
        }
        match (t.primary, chosen) {
            (old, Some(new)) if old != Some(new) => {
                let lost = self.lost_primary.take();
                let follow = lost.is_some_and(|l| l != new);
                let old = old.or(lost);
                if let Some(tl) = t.nodes[new].timeline {
                    self.newest_timeline = self.newest_timeline.max(tl);
                }
                let n = &t.nodes[new];
                if old.is_some() {
                    tracing::warn!(node = new, host = %n.host, port = n.port, timeline = ?n.timeline, ?old, "new primary");
                } else {
                    tracing::info!(node = new, host = %n.host, port = n.port, timeline = ?n.timeline, "primary found");
                }
                t.primary = Some(new);
                out.push(Transition::NewPrimary {
                    node: new,
                    old,
                    follow,
                });
            }
            (Some(old), None) => {
                t.primary = None;
                let n = &t.nodes[old];
                if n.is_up() && n.role == Role::Replica {
                    tracing::warn!(node = old, host = %n.host, port = n.port, "the primary is in recovery now (demoted); writes wait for a new primary");
                    out.push(Transition::Demoted { node: old });
                }
            }
            (_, Some(same)) => {
                if let Some(tl) = t.nodes[same].timeline {
                    self.newest_timeline = self.newest_timeline.max(tl);
                }
            }
            (None, None) => {}
        }
        t.update_read_set(config);
    }

    /// Two or more nodes claim to be primary: the one on the newest timeline wins and
    /// the others are detached as false primaries; on a tie, none is primary.
    fn resolve_split_brain(
        &mut self,
        t: &mut Topology,
        claims: &[usize],
        out: &mut Vec<Transition>,
    ) -> Option<usize> {
        let timelines: Option<Vec<u32>> = claims.iter().map(|&c| t.nodes[c].timeline).collect();
        let winner = timelines.and_then(|tls| {
            let newest = *tls.iter().max()?;
            let mut on_newest = claims.iter().zip(&tls).filter(|(_, &tl)| tl == newest);
            let (first, _) = on_newest.next()?;
            on_newest.next().is_none().then_some(*first)
        });
        let described: Vec<(usize, u16, Option<u32>)> = claims
            .iter()
            .map(|&c| (c, t.nodes[c].port, t.nodes[c].timeline))
            .collect();
        match winner {
            Some(winner) => {
                tracing::error!(nodes = ?described, primary = winner, "SPLIT BRAIN: more than one node claims to be primary; the newest timeline wins and the others are detached as false primaries");
                for &c in claims.iter().filter(|&&c| c != winner) {
                    self.nodes[c].hold = Some(Hold::FalsePrimary);
                    self.take_down(t, c, DownReason::FalsePrimary, out);
                }
                Some(winner)
            }
            None => {
                if !self.split_brain {
                    tracing::error!(nodes = ?described, "SPLIT BRAIN: more than one node claims to be primary and no timeline is newer; writes are held until one is authoritative (PROMOTE NODE, DETACH NODE, or fix the cluster)");
                    self.split_brain = true;
                }
                None
            }
        }
    }
}

fn set_status(node: &mut NodeState, status: Status) {
    if node.status != status {
        node.status = status;
        node.since = SystemTime::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::events::{Probe, ProbeError};
    use crate::cluster::Lag;
    use crate::config::BackendConfig;

    fn config(nodes: usize) -> Config {
        let mut config = Config {
            backends: (0..nodes)
                .map(|i| BackendConfig {
                    host: "127.0.0.1".into(),
                    port: 5432 + i as u16,
                    weight: 1.0,
                    data_directory: format!("/data/{i}"),
                    role: None,
                })
                .collect(),
            ..Config::default()
        };
        config.health_check.max_retries = 2;
        config.health_check.up_after = 2;
        config
    }

    fn primary(timeline: u32) -> Outcome {
        Ok(Probe {
            in_recovery: false,
            timeline: Some(timeline),
            upstream: None,
        })
    }

    fn replica_of(port: u16) -> Outcome {
        Ok(Probe {
            in_recovery: true,
            timeline: Some(1),
            upstream: Some(("127.0.0.1".into(), port)),
        })
    }

    fn new_primary(node: usize, old: Option<usize>, follow: bool) -> Transition {
        Transition::NewPrimary { node, old, follow }
    }

    fn promote(
        tracker: &mut Tracker,
        t: &mut Topology,
        config: &Config,
        node: usize,
        switchover: bool,
    ) -> Vec<Transition> {
        let op = Operation::Promote { node, switchover };
        tracker.operate(t, config, op).expect("promote")
    }

    fn failed() -> Outcome {
        Err(ProbeError::Timeout(Duration::from_secs(2)))
    }

    /// A primary (node 0) and replicas, all up.
    fn cluster(nodes: usize) -> (Tracker, Topology, Config) {
        let config = config(nodes);
        let mut t = Topology::from_config(&config);
        let mut tracker = Tracker::new(nodes);
        tracker.observe(&mut t, &config, 0, &primary(1));
        for i in 1..nodes {
            tracker.observe(&mut t, &config, i, &replica_of(5432));
            t.nodes[i].lag = Some(Lag::default());
        }
        t.update_read_set(&config);
        (tracker, t, config)
    }

    fn statuses(t: &Topology) -> Vec<&'static str> {
        t.nodes.iter().map(|n| n.status.as_str()).collect()
    }

    #[test]
    fn first_answers_bring_nodes_up_and_find_the_primary() {
        let config = config(2);
        let mut t = Topology::from_config(&config);
        let mut tracker = Tracker::new(2);
        assert_eq!(statuses(&t), ["waiting", "waiting"]);
        let out = tracker.observe(&mut t, &config, 1, &replica_of(5432));
        assert!(out.is_empty());
        assert_eq!(t.primary, None);
        let out = tracker.observe(&mut t, &config, 0, &primary(1));
        assert_eq!(out, [new_primary(0, None, false)]);
        assert_eq!(statuses(&t), ["up", "up"]);
        // A node that never answered stays waiting, and runs no hook.
        let mut t = Topology::from_config(&config);
        for _ in 0..5 {
            assert!(tracker.observe(&mut t, &config, 1, &failed()).is_empty());
        }
        assert_eq!(t.nodes[1].status, Status::Waiting);
    }

    #[test]
    fn a_primary_goes_down_after_its_retries_and_the_best_replica_is_named() {
        let (mut tracker, mut t, config) = cluster(3);
        t.nodes[1].lag = Some(Lag {
            replay_lsn: 10,
            ..Lag::default()
        });
        t.nodes[2].lag = Some(Lag {
            replay_lsn: 20,
            ..Lag::default()
        });
        for _ in 0..2 {
            assert!(tracker.observe(&mut t, &config, 0, &failed()).is_empty());
            assert_eq!(t.primary, Some(0), "retries do not take it down");
        }
        let out = tracker.observe(&mut t, &config, 0, &failed());
        assert_eq!(
            out,
            [Transition::Down {
                node: 0,
                reason: DownReason::HealthCheck,
                old_primary: Some(0),
                old_main: Some(0),
                new_main: Some(2),
            }]
        );
        assert_eq!(t.primary, None);
        assert!(t.nodes[1].readable && t.nodes[2].readable, "reads go on");
        // More failures of a down node change nothing.
        assert!(tracker.observe(&mut t, &config, 0, &failed()).is_empty());
        // The script promotes node 2: it is the primary, and node 1 follows it.
        let out = tracker.observe(&mut t, &config, 2, &primary(2));
        assert_eq!(out, [new_primary(2, Some(0), true)]);
        assert_eq!(t.primary, Some(2));
    }

    #[test]
    fn a_replica_fails_back_after_up_after_answers_when_it_follows_the_primary() {
        let (mut tracker, mut t, config) = cluster(2);
        for _ in 0..3 {
            tracker.observe(&mut t, &config, 1, &failed());
        }
        assert_eq!(t.nodes[1].status, Status::Down);
        // Back, but streaming from nowhere known: stays down.
        let stray = Ok(Probe {
            in_recovery: true,
            timeline: Some(1),
            upstream: Some(("10.0.0.9".into(), 5432)),
        });
        for _ in 0..3 {
            assert!(tracker.observe(&mut t, &config, 1, &stray).is_empty());
        }
        assert_eq!(t.nodes[1].status, Status::Down);
        assert!(t.nodes[1].pg_up);
        // Streaming from the primary: one answer is not enough, two are.
        tracker.observe(&mut t, &config, 1, &failed());
        assert!(tracker
            .observe(&mut t, &config, 1, &replica_of(5432))
            .is_empty());
        let out = tracker.observe(&mut t, &config, 1, &replica_of(5432));
        assert_eq!(out, [Transition::Up { node: 1 }]);
        assert_eq!(t.nodes[1].status, Status::Up);
    }

    #[test]
    fn flapping_never_reaches_a_transition() {
        let (mut tracker, mut t, config) = cluster(2);
        for round in 0..50 {
            let outcome = if round % 3 == 2 {
                replica_of(5432)
            } else {
                failed()
            };
            assert!(tracker.observe(&mut t, &config, 1, &outcome).is_empty());
        }
        assert_eq!(t.nodes[1].status, Status::Up);
    }

    #[test]
    fn split_brain_newest_timeline_wins() {
        let (mut tracker, mut t, config) = cluster(3);
        // Node 1 was promoted behind pgrelay's back: a newer timeline.
        let out = tracker.observe(&mut t, &config, 1, &primary(2));
        assert_eq!(
            out,
            [
                Transition::Down {
                    node: 0,
                    reason: DownReason::FalsePrimary,
                    old_primary: Some(0),
                    old_main: Some(0),
                    new_main: Some(2),
                },
                new_primary(1, Some(0), true)
            ]
        );
        assert_eq!(t.primary, Some(1));
        // The false primary answering again as a primary stays detached.
        for _ in 0..4 {
            assert!(tracker.observe(&mut t, &config, 0, &primary(1)).is_empty());
        }
        assert_eq!(t.nodes[0].status, Status::Down);
        // Rebuilt as a replica of the new primary, it comes back (it has answered
        // often enough already).
        let out = tracker.observe(&mut t, &config, 0, &replica_of(5433));
        assert_eq!(out, [Transition::Up { node: 0 }]);
    }

    #[test]
    fn split_brain_on_one_timeline_holds_writes_until_an_operator_settles_it() {
        let (mut tracker, mut t, config) = cluster(2);
        let out = tracker.observe(&mut t, &config, 1, &primary(1));
        assert_eq!(out, []);
        assert_eq!(t.primary, None, "writes go to neither");
        assert!(!t.nodes[0].readable && !t.nodes[1].readable);
        // Still tied at the next probes: nothing more happens.
        assert!(tracker.observe(&mut t, &config, 0, &primary(1)).is_empty());
        let out = tracker
            .operate(&mut t, &config, Operation::Detach(0))
            .expect("detach");
        assert!(matches!(
            out[..],
            [
                Transition::Down {
                    node: 0,
                    reason: DownReason::Detached,
                    ..
                },
                Transition::NewPrimary { node: 1, .. }
            ]
        ));
        assert_eq!(t.primary, Some(1));
        // Detached by an operator: answers do not bring it back, an attach does.
        for _ in 0..4 {
            tracker.observe(&mut t, &config, 0, &replica_of(5433));
        }
        assert_eq!(t.nodes[0].status, Status::Down);
        let out = tracker
            .operate(&mut t, &config, Operation::Attach(0))
            .expect("attach");
        assert_eq!(out, [Transition::Up { node: 0 }]);
    }

    #[test]
    fn a_demoted_primary_leaves_no_primary_until_the_new_one_answers() {
        let (mut tracker, mut t, config) = cluster(2);
        let out = tracker.observe(&mut t, &config, 0, &replica_of(5433));
        assert_eq!(out, [Transition::Demoted { node: 0 }]);
        assert_eq!(t.primary, None);
        assert_eq!(t.nodes[0].status, Status::Up);
        let out = tracker.observe(&mut t, &config, 1, &primary(2));
        assert_eq!(out, [new_primary(1, None, false)]);
    }

    #[test]
    fn a_restarted_primary_comes_back_only_if_nothing_replaced_it() {
        let (mut tracker, mut t, config) = cluster(2);
        for _ in 0..3 {
            tracker.observe(&mut t, &config, 0, &failed());
        }
        assert_eq!(t.primary, None);
        tracker.observe(&mut t, &config, 0, &primary(1));
        let out = tracker.observe(&mut t, &config, 0, &primary(1));
        assert_eq!(
            out,
            [Transition::Up { node: 0 }, new_primary(0, Some(0), false)]
        );
        // Without auto_failback it stays down.
        let (mut tracker, mut t, mut config) = cluster(2);
        config.failover.auto_failback = false;
        for _ in 0..3 {
            tracker.observe(&mut t, &config, 0, &failed());
        }
        for _ in 0..4 {
            assert!(tracker.observe(&mut t, &config, 0, &primary(1)).is_empty());
        }
        assert_eq!(t.primary, None);
    }

    #[test]
    fn switchover_detaches_the_primary_and_waits_for_the_promotion() {
        let (mut tracker, mut t, config) = cluster(3);
        let out = promote(&mut tracker, &mut t, &config, 2, true);
        assert_eq!(
            out,
            [Transition::Down {
                node: 0,
                reason: DownReason::Detached,
                old_primary: Some(0),
                old_main: Some(0),
                new_main: Some(2),
            }]
        );
        assert_eq!(t.primary, None, "writes wait until node 2 leaves recovery");
        let out = tracker.observe(&mut t, &config, 2, &primary(2));
        assert_eq!(out, [new_primary(2, Some(0), true)]);
        // Without the flag, pgrelay's primary moves at once and nothing runs.
        let (mut tracker, mut t, config) = cluster(2);
        let out = promote(&mut tracker, &mut t, &config, 1, false);
        assert_eq!(out, [new_primary(1, Some(0), false)]);
        assert_eq!(
            tracker.operate(&mut t, &config, Operation::Attach(7)),
            Err(OperationError::NoSuchNode(7))
        );
    }

    #[test]
    fn probes_come_faster_while_retrying_confirming_or_without_a_primary() {
        let (mut tracker, mut t, mut config) = cluster(2);
        config.health_check.period = Duration::from_secs(5);
        config.health_check.retry_delay = Duration::from_secs(1);
        let next = |tracker: &Tracker, t: &Topology, node| tracker.next_probe_in(t, &config, node);
        assert_eq!(next(&tracker, &t, 1), Duration::from_secs(5));
        tracker.observe(&mut t, &config, 1, &failed());
        assert_eq!(next(&tracker, &t, 1), Duration::from_secs(1));
        for _ in 0..2 {
            tracker.observe(&mut t, &config, 1, &failed());
        }
        assert_eq!(t.nodes[1].status, Status::Down);
        assert_eq!(next(&tracker, &t, 1), Duration::from_secs(5));
        tracker.observe(&mut t, &config, 1, &replica_of(5432));
        assert_eq!(next(&tracker, &t, 1), Duration::from_secs(1));
        for _ in 0..3 {
            tracker.observe(&mut t, &config, 0, &failed());
        }
        assert_eq!(next(&tracker, &t, 0), Duration::from_secs(1));
    }
}
