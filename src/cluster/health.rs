//! The health monitor: one task per node that probes it (log in with the
//! `[health_check]` credentials, read `pg_is_in_recovery()`, the timeline and where a
//! replica streams from), hands the outcome to the failover state machine, and hands
//! what changed up through [`super::Findings`] (`control` queues hooks and drops the
//! pools of a node that went down or was demoted). A node is probed every `period`; retries, confirmations of a node coming
//! back, and every probe while there is no primary come every `retry_delay`; a server
//! connection that fails under a client wakes its node's task at once
//! (`recheck_on_backend_error`).
//!
//! [`probe_all`] runs one round before pgrelay listens, so the first client finds the
//! primary.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;

use super::events::{Outcome, Probe, ProbeError, Transition};
use super::{Cluster, Monitor};
use crate::auth::ServerCredentials;
use crate::config::Config;
use crate::pool::server::{Server, ServerError, ServerTarget};

/// One row: in recovery; the timeline (a primary's WAL insert timeline, a replica's
/// received one); where a streaming replica's WAL comes from.
const PROBE_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery()::text, \
     CASE WHEN pg_catalog.pg_is_in_recovery() \
     THEN (SELECT received_tli::text FROM pg_catalog.pg_stat_wal_receiver) \
     ELSE (('x' || pg_catalog.substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::int)::text END, \
     (SELECT sender_host || ' ' || sender_port FROM pg_catalog.pg_stat_wal_receiver WHERE status = 'streaming')";

/// Something that can probe a node (the real one logs in; tests script answers).
pub trait Prober: Send + Sync {
    fn probe<'a>(&'a self, node: usize) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;
}

/// Probes over a real server connection.
pub struct ServerProber<'s> {
    pub monitor: &'s Monitor,
}

impl Prober for ServerProber<'_> {
    fn probe<'a>(&'a self, node: usize) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
        Box::pin(async move {
            let config = self.monitor.config.load_full();
            let mut server = connect_check(&config, self.monitor, node).await?;
            let row = server.query_row(PROBE_SQL).await;
            server.terminate().await;
            parse_probe(&row?)
        })
    }
}

fn parse_probe(row: &[Option<String>]) -> Outcome {
    let in_recovery = match row.first().and_then(Option::as_deref) {
        Some("true") => true,
        Some("false") => false,
        other => return Err(ProbeError::Answer(other.map(str::to_owned))),
    };
    let timeline = row
        .get(1)
        .and_then(Option::as_deref)
        .and_then(|t| t.parse().ok());
    let upstream = row
        .get(2)
        .and_then(Option::as_deref)
        .and_then(|s| s.rsplit_once(' '))
        .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)));
    Ok(Probe {
        in_recovery,
        timeline,
        upstream,
    })
}

/// Opens a connection to `node` with the health-check credentials.
pub async fn connect_check(
    config: &Config,
    monitor: &Monitor,
    node: usize,
) -> Result<Server, ServerError> {
    let check = &config.health_check;
    let (host, port) = monitor
        .cluster
        .load()
        .nodes
        .get(node)
        .map(|n| (n.host.clone(), n.port))
        .ok_or_else(|| ServerError::Connect {
            addr: format!("node {node}"),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
    let target = ServerTarget {
        host,
        port,
        dbname: check.database.clone(),
        user: check.user.clone(),
        tls: monitor.server_tls.clone(),
    };
    let credentials = if !check.password.is_empty() {
        ServerCredentials::Password(check.password.as_bytes().to_vec())
    } else if let Some(user) = config.user(&check.user) {
        monitor.credentials.for_server(user)
    } else {
        ServerCredentials::Password(Vec::new())
    };
    Server::connect(&target, &credentials, check.timeout).await
}

/// One probe, bounded by `health_check.timeout`, recorded in the node's statistics.
async fn probe_once(
    cluster: &Cluster,
    prober: &dyn Prober,
    node: usize,
    config: &Config,
) -> Outcome {
    let started = tokio::time::Instant::now();
    let outcome = match tokio::time::timeout(config.health_check.timeout, prober.probe(node)).await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(ProbeError::Timeout(config.health_check.timeout)),
    };
    if let Some(state) = cluster.load().nodes.get(node) {
        state.stats.record_probe(outcome.is_ok(), started.elapsed());
    }
    outcome
}

/// Probes every node once, concurrently, and reports the outcome (start-up).
pub async fn probe_all(monitor: &Monitor) {
    let config = monitor.config.load_full();
    let prober = ServerProber { monitor };
    let nodes = monitor.cluster.load().nodes.len();
    let probes = (0..nodes).map(|node| probe_once(&monitor.cluster, &prober, node, &config));
    let outcomes = futures_util::future::join_all(probes).await;
    for (node, outcome) in outcomes.iter().enumerate() {
        let transitions = monitor.cluster.observe(node, outcome, &config);
        monitor.findings.report(&config, &transitions);
    }
}

/// Watches one node until shutdown: probe, observe, act, wait.
pub async fn watch_node(
    cluster: &Cluster,
    prober: &dyn Prober,
    node: usize,
    config: impl Fn() -> Arc<Config>,
    act: impl Fn(&Config, &[Transition]),
    mut shutdown: watch::Receiver<bool>,
) {
    let kick = cluster.kick_handle(node);
    let mut last = tokio::time::Instant::now();
    loop {
        let due = last + cluster.next_probe_in(node, &config());
        if cluster.retrying(node) {
            // Retries keep their `retry_delay`: clients failing meanwhile must not
            // turn a short blip into a failover by probing faster.
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = shutdown.changed() => return,
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = kick.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
        last = tokio::time::Instant::now();
        let current = config();
        let outcome = probe_once(cluster, prober, node, &current).await;
        let transitions = cluster.observe(node, &outcome, &current);
        act(&current, &transitions);
    }
}

/// Runs the monitor until shutdown: a task per node, and more as nodes appear
/// (Patroni members, reloads).
pub async fn run(monitor: Monitor, mut shutdown: watch::Receiver<bool>) {
    let mut watched = 0;
    let mut changes = monitor.cluster.changed.subscribe();
    loop {
        let nodes = monitor.cluster.load().nodes.len();
        while watched < nodes {
            let node = watched;
            let monitor = monitor.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let prober = ServerProber { monitor: &monitor };
                watch_node(
                    &monitor.cluster,
                    &prober,
                    node,
                    || monitor.config.load_full(),
                    |config, transitions| monitor.findings.report(config, transitions),
                    shutdown,
                )
                .await
            });
            watched += 1;
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Status, Topology};
    use crate::config::BackendConfig;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    #[test]
    fn probe_rows_are_read() {
        let row = |a: &str, b: Option<&str>, c: Option<&str>| {
            vec![
                Some(a.to_owned()),
                b.map(str::to_owned),
                c.map(str::to_owned),
            ]
        };
        assert_eq!(
            parse_probe(&row("true", Some("3"), Some("127.0.0.1 5433"))).ok(),
            Some(Probe {
                in_recovery: true,
                timeline: Some(3),
                upstream: Some(("127.0.0.1".into(), 5433)),
            })
        );
        assert_eq!(
            parse_probe(&row("false", Some("1"), None)).ok(),
            Some(Probe {
                in_recovery: false,
                timeline: Some(1),
                upstream: None,
            })
        );
        assert!(parse_probe(&row("maybe", None, None)).is_err());
        assert!(parse_probe(&[]).is_err());
    }

    /// Answers from a script, one per probe, and notes when each probe came.
    struct Scripted {
        answers: Mutex<VecDeque<Outcome>>,
        at: Mutex<Vec<Duration>>,
        start: tokio::time::Instant,
    }

    impl Prober for Scripted {
        fn probe<'a>(&'a self, _node: usize) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>> {
            Box::pin(async move {
                self.at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(self.start.elapsed());
                let next = self
                    .answers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front();
                match next {
                    Some(outcome) => outcome,
                    // Out of script: a probe that hangs past its timeout.
                    None => std::future::pending().await,
                }
            })
        }
    }

    fn scripted(answers: impl IntoIterator<Item = Outcome>) -> Scripted {
        Scripted {
            answers: Mutex::new(answers.into_iter().collect()),
            at: Mutex::default(),
            start: tokio::time::Instant::now(),
        }
    }

    fn primary() -> Outcome {
        Ok(Probe {
            in_recovery: false,
            timeline: Some(1),
            upstream: None,
        })
    }

    /// A cluster of one node, seen up as the primary at start (as `probe_all` does).
    fn up_primary(config: &Config) -> Cluster {
        let cluster = Cluster::new(Topology::from_config(config));
        cluster.observe(0, &primary(), config);
        cluster
    }

    fn probe_times(prober: &Scripted) -> Vec<u64> {
        let at = prober.at.lock().unwrap_or_else(|p| p.into_inner());
        at.iter().map(|d| d.as_millis() as u64).collect()
    }

    fn config() -> Arc<Config> {
        let mut config = Config {
            backends: vec![BackendConfig {
                host: "127.0.0.1".into(),
                port: 5432,
                weight: 1.0,
                data_directory: String::new(),
                role: None,
            }],
            ..Config::default()
        };
        config.health_check.period = Duration::from_secs(5);
        config.health_check.retry_delay = Duration::from_secs(1);
        config.health_check.timeout = Duration::from_secs(2);
        config.health_check.max_retries = 2;
        Arc::new(config)
    }

    /// With paused time: a primary that answers, then fails, is declared down after
    /// its retries, at the times the settings give, and once only.
    #[tokio::test(start_paused = true)]
    async fn a_failing_primary_is_down_after_period_and_retries() {
        let config = config();
        let cluster = up_primary(&config);
        let refused = || Err(ProbeError::Answer(None));
        let prober = scripted([primary(), refused(), refused(), refused(), refused()]);
        let seen = Mutex::new(Vec::new());
        let (stop, shutdown) = watch::channel(false);
        let watcher = watch_node(
            &cluster,
            &prober,
            0,
            || config.clone(),
            |_, transitions: &[Transition]| {
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                seen.extend(
                    transitions
                        .iter()
                        .map(|t| (tokio::time::Instant::now(), t.clone())),
                );
            },
            shutdown,
        );
        let start = tokio::time::Instant::now();
        tokio::select! {
            _ = watcher => unreachable!("the watcher runs until shutdown"),
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        let _ = stop.send(true);
        let at = probe_times(&prober);
        // 5 s: answers. 10 s: fails. Retries at 11 s and 12 s: the third failure in
        // a row takes it down. No primary now: probes every retry_delay (13 s: the
        // script's last failure; 14 s: out of script, hangs for the 2 s timeout).
        assert_eq!(at[..6], [5_000, 10_000, 11_000, 12_000, 13_000, 14_000]);
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(seen.len(), 1, "one transition, once: {seen:?}");
        assert_eq!(seen[0].0 - start, Duration::from_secs(12));
        assert!(matches!(seen[0].1, Transition::Down { node: 0, .. }));
        assert_eq!(cluster.load().nodes[0].status, Status::Down);
        assert_eq!(cluster.load().primary, None);
    }

    /// A kick (a server connection failed under a client) probes at once.
    #[tokio::test(start_paused = true)]
    async fn a_kick_probes_at_once() {
        let config = config();
        let cluster = up_primary(&config);
        let prober = scripted((0..3).map(|_| Err(ProbeError::Answer(None))));
        let (_stop, shutdown) = watch::channel(false);
        let watcher = watch_node(&cluster, &prober, 0, || config.clone(), |_, _| {}, shutdown);
        let kick = async {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            cluster.suspect(0);
            // Clients failing during the retries do not hurry them.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                cluster.suspect(0);
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        tokio::select! {
            _ = watcher => unreachable!(),
            _ = kick => {}
        }
        let at = probe_times(&prober);
        // Kicked at 1.5 s, then retries every second: down at 3.5 s, not 12 s.
        assert_eq!(at[..3], [1_500, 2_500, 3_500]);
        assert_eq!(cluster.load().nodes[0].status, Status::Down);
    }
}
