//! The one place that acts on change: reloads and applies a config, carries out the
//! console's node operations (`DETACH`, `ATTACH`, `PROMOTE`), and acts on the node
//! transitions the cluster loops hand up ([`Findings`]): it drops the pools of
//! nodes that left service or were demoted, counts failovers and queues hooks.
//!
//! The loops themselves get only a [`Monitor`] built here ([`monitor`]); they
//! never see [`Shared`]. The console reaches reload and the node operations through
//! the methods this module gives [`Shared`].

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::events::{Operation, OperationError, Transition};
use crate::cluster::hooks::{expand, HookKind, HookRun, Subjects};
use crate::cluster::{Findings, Monitor, Topology};
use crate::config::{self, Config};
use crate::tls::accept::ClientTls;
use crate::{pool_settings, Shared};

/// What the health, lag and Patroni loops get: the pieces they read, and findings that
/// come back to [`act`].
pub fn monitor(shared: &Arc<Shared>) -> Monitor {
    let acting = Arc::downgrade(shared);
    Monitor {
        cluster: shared.cluster.clone(),
        config: shared.config.clone(),
        credentials: shared.credentials.clone(),
        server_tls: shared.server_tls.clone(),
        findings: Findings::new(move |config, transitions| {
            if let Some(shared) = acting.upgrade() {
                act(&shared, config, transitions);
            }
        }),
    }
}

impl Shared {
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
        let loaded = Config::load(&path).and_then(|config| {
            // Certificate files are read anew even when their paths are unchanged: a
            // reload is how a renewed certificate is taken into use.
            let client_tls =
                ClientTls::load(&config.tls).map_err(|err| config::ConfigError::Invalid {
                    key: err.key().to_owned(),
                    message: err.to_string(),
                })?;
            Ok((config, client_tls))
        });
        let (config, client_tls) = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                tracing::error!(err = %err.with_reason(), path = %path.display(), "reload rejected; keeping the running configuration");
                return Err(err);
            }
        };
        self.apply(config);
        // New logins use it; sessions on the old one keep their TLS connection.
        self.client_tls.store(Arc::new(client_tls));
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }

    /// Puts a validated config in place: routing, nodes (added, removed, weights),
    /// pool limits and credentials, and everything read per request. Pools of
    /// unchanged nodes keep their servers; transactions in flight are not touched.
    pub fn apply(&self, config: Config) {
        self.router.reconfigure(&config);
        if let Err(err) = self.server_tls.reload(&config.tls) {
            tracing::error!(%err, "server TLS settings not reloaded; new server connections keep the previous ones");
        }
        let transitions = self.cluster.reconfigure(&config);
        for node in &transitions.removed {
            self.pools.retire_node(*node);
        }
        self.credentials.forget_listed(&config);
        for pool in self.pools.all() {
            let user = config
                .user(&pool.key.user)
                .cloned()
                .or_else(|| self.credentials.queried_user(&pool.key.user));
            if let Some(user) = user {
                let settings = pool_settings(&config, &pool.key.database, &pool.key.user);
                pool.reconfigure(settings, user);
            }
        }
        if !transitions.added.is_empty() || !transitions.removed.is_empty() {
            tracing::info!(added = ?transitions.added, removed = ?transitions.removed, "backends changed");
        }
        act(self, &config, &transitions.transitions);
        self.config.store(Arc::new(config));
    }

    /// The node operations the admin console calls (`DETACH NODE`, `ATTACH NODE`,
    /// `PROMOTE NODE [SWITCHOVER]`): the state machine decides, then pools are dropped
    /// and hooks queued as for any other transition.
    pub fn operate(&self, op: Operation) -> Result<(), OperationError> {
        let config = self.config.load_full();
        let transitions = self.cluster.operate(op, &config)?;
        act(self, &config, &transitions);
        Ok(())
    }

    /// `PAUSE [db]`: new transactions wait; returns once no transaction is active.
    pub async fn pause(&self, database: Option<&str>) {
        self.registry.pause(database);
        tracing::warn!(database = ?database, "PAUSE: new transactions wait; waiting for active ones to end");
        let busy = || self.pools.in_use(database) + self.registry.active_in(database);
        while busy() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `RESUME [db]`; false when nothing was paused.
    pub fn resume(&self, database: Option<&str>) -> bool {
        let resumed = self.registry.resume(database);
        if resumed {
            tracing::warn!(database = ?database, "RESUME");
        }
        resumed
    }

    /// `KILL db`: drops its clients and servers; new clients wait for `RESUME`.
    pub fn kill(&self, database: &str) {
        self.registry.pause(Some(database));
        let mut killed = 0;
        for entry in self.registry.clients() {
            if !entry.admin && entry.database == database {
                entry.kill();
                killed += 1;
            }
        }
        let closed = self.pools.retire_database(database);
        tracing::warn!(%database, killed, closed, "KILL: clients dropped; new ones wait for RESUME");
    }

    /// `SHUTDOWN`: asks the process to shut down gracefully (as SIGTERM does).
    pub fn request_shutdown(&self) {
        self.shutdown_requested.notify_one();
    }

    /// `WAIT_CLOSE [db]`: returns once the servers a reload retired have closed.
    pub async fn wait_close(&self, database: Option<&str>) {
        while self.pools.close_needed(database) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Acts on node transitions: drops the pools of nodes that left service or were
/// demoted, counts failovers, and queues the hooks they call for.
pub fn act(shared: &Shared, config: &Config, transitions: &[Transition]) {
    if transitions.is_empty() {
        return;
    }
    let topology = shared.cluster.snapshot();
    let failover = &config.failover;
    let timeout = failover.command_timeout;
    let hook = |kind: HookKind, template: &str, subjects: Subjects| {
        shared.hooks.submit(HookRun {
            kind,
            node: subjects.node,
            command: expand(template, &topology, &subjects),
            timeout,
        });
    };
    for transition in transitions {
        match *transition {
            Transition::Down {
                node,
                old_primary,
                old_main,
                new_main,
                ..
            } => {
                shared.metrics.failovers.inc();
                let closed = shared.pools.retire_node(node);
                tracing::info!(node, closed, "dropped the pools of a node out of service");
                let subjects = Subjects {
                    node: Some(node),
                    new_main,
                    old_main,
                    old_primary,
                };
                hook(HookKind::Failover, &failover.failover_command, subjects);
            }
            Transition::Up { node } => {
                let subjects = Subjects {
                    node: Some(node),
                    new_main: topology.main_node(),
                    old_main: topology.main_node(),
                    old_primary: topology.primary,
                };
                hook(HookKind::Failback, &failover.failback_command, subjects);
            }
            Transition::Demoted { node } => {
                let closed = shared.pools.retire_node(node);
                tracing::info!(node, closed, "dropped the pools of a demoted primary");
            }
            Transition::NewPrimary { node, old, follow } => {
                if !follow {
                    continue;
                }
                for subjects in followers(&topology, node, old) {
                    let command = &failover.follow_primary_command;
                    hook(HookKind::FollowPrimary, command, subjects);
                }
            }
        }
    }
}

/// What `follow_primary_command` runs for: every other node in service, now that
/// `node` is the primary (`old` was).
fn followers(
    topology: &Topology,
    node: usize,
    old: Option<usize>,
) -> impl Iterator<Item = Subjects> + '_ {
    let others = topology.nodes.iter().enumerate();
    others
        .filter(move |(other, state)| *other != node && state.is_up())
        .map(move |(other, _)| Subjects {
            node: Some(other),
            new_main: Some(node),
            old_main: old,
            old_primary: old,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::events::DownReason;
    use crate::cluster::Status;

    fn config(backends: u16) -> Config {
        let text: String = (0..backends)
            .map(|i| format!("[[backends]]\nhost = \"127.0.0.1\"\nport = {}\n", 5432 + i))
            .collect();
        Config::from_toml_str(&text).expect("config")
    }

    #[test]
    fn followers_are_the_other_nodes_in_service() {
        let mut topology = Topology::from_config(&config(3));
        for (i, node) in topology.nodes.iter_mut().enumerate() {
            node.status = if i == 1 { Status::Down } else { Status::Up };
        }
        let subjects: Vec<Subjects> = followers(&topology, 0, Some(1)).collect();
        assert_eq!(
            subjects,
            [Subjects {
                node: Some(2),
                new_main: Some(0),
                old_main: Some(1),
                old_primary: Some(1),
            }]
        );
    }

    /// The cluster loops' findings reach `act` while pgrelay runs, and nothing once
    /// the shared state is gone.
    #[tokio::test]
    async fn findings_come_back_to_act() {
        let config = config(2);
        let shared = Arc::new(Shared::new(config.clone()));
        let monitor = monitor(&shared);
        monitor.findings.report(&config, &[]);
        assert_eq!(shared.metrics.failovers.get(), 0);
        let down = Transition::Down {
            node: 1,
            reason: DownReason::HealthCheck,
            old_primary: Some(0),
            old_main: Some(0),
            new_main: Some(0),
        };
        monitor
            .findings
            .report(&config, std::slice::from_ref(&down));
        assert_eq!(
            shared.metrics.failovers.get(),
            1,
            "a node down is a failover"
        );
        drop(shared);
        monitor.findings.report(&config, &[down]);
    }
}
