//! Replica lag, measured every `routing.lag_check_period` over one long-lived
//! connection per node: the primary's `pg_current_wal_lsn()` against each replica's
//! `pg_last_wal_replay_lsn()` (bytes), and the age of the last replayed transaction
//! while WAL waits to be replayed (seconds). The results move replicas in and out of
//! the read set and give read-your-writes the replay positions it compares against.

use tokio::sync::watch;

use super::{health, parse_lsn, Lag, Monitor, Role};
use crate::pool::server::Server;

const PRIMARY_SQL: &str = "SELECT pg_catalog.pg_current_wal_lsn()::text";
/// Replay position and, when replay is behind what was received, the seconds since
/// the last replayed commit (0 when caught up: an idle primary is not lag).
const REPLICA_SQL: &str = "SELECT pg_catalog.pg_last_wal_replay_lsn()::text || ' ' || \
     CASE WHEN pg_catalog.pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_catalog.pg_last_wal_replay_lsn() \
     THEN 0 ELSE COALESCE(EXTRACT(EPOCH FROM pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp()), 0) END::text";

/// Measures lag until shutdown; the first pass runs at once.
pub async fn run(monitor: Monitor, mut shutdown: watch::Receiver<bool>) {
    let mut conns: Vec<Option<Server>> = Vec::new();
    loop {
        measure(&monitor, &mut conns).await;
        let period = monitor.config.load().routing.lag_check_period;
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One pass: the primary's position, then every replica's.
pub async fn measure(monitor: &Monitor, conns: &mut Vec<Option<Server>>) {
    let topology = monitor.cluster.snapshot();
    conns.resize_with(topology.nodes.len(), || None);
    let Some(primary) = topology.primary else {
        return;
    };
    if !topology
        .nodes
        .iter()
        .any(|n| n.is_up() && n.role == Role::Replica)
    {
        return; // nothing to measure: a lone primary costs no query a second
    }
    let Some(primary_lsn) = ask(monitor, conns, primary, PRIMARY_SQL)
        .await
        .and_then(|v| parse_lsn(&v))
    else {
        return;
    };
    let mut lags = Vec::with_capacity(topology.nodes.len());
    for (node, state) in topology.nodes.iter().enumerate() {
        let lag = if state.is_up() && state.role == Role::Replica {
            ask(monitor, conns, node, REPLICA_SQL)
                .await
                .and_then(|v| replica_lag(&v, primary_lsn))
        } else {
            None
        };
        lags.push(lag);
    }
    monitor.cluster.update(|t| {
        if t.primary != Some(primary) || t.nodes.len() != lags.len() {
            return; // the topology moved on while we measured
        }
        for (node, lag) in t.nodes.iter_mut().zip(lags) {
            if node.role == Role::Replica {
                node.lag = lag;
            }
        }
        t.update_read_set(&monitor.config.load());
    });
}

fn replica_lag(value: &str, primary_lsn: u64) -> Option<Lag> {
    let (lsn, seconds) = value.split_once(' ')?;
    let replay_lsn = parse_lsn(lsn)?;
    Some(Lag {
        replay_lsn,
        bytes: primary_lsn.saturating_sub(replay_lsn),
        seconds: seconds.trim().parse::<f64>().ok()?.max(0.0),
    })
}

/// Runs `sql` on `node`'s lag connection, opening it if needed; a failure closes it.
async fn ask(
    monitor: &Monitor,
    conns: &mut [Option<Server>],
    node: usize,
    sql: &str,
) -> Option<String> {
    let config = monitor.config.load_full();
    let attempt = async {
        if conns[node].is_none() {
            conns[node] = Some(health::connect_check(&config, monitor, node).await?);
        }
        match conns[node].as_mut() {
            Some(server) => server.query_value(sql).await,
            None => Ok(None),
        }
    };
    match tokio::time::timeout(config.health_check.timeout, attempt).await {
        Ok(Ok(value)) => value,
        Ok(Err(err)) => {
            tracing::debug!(node, %err, "lag check failed");
            conns[node] = None;
            None
        }
        Err(_) => {
            tracing::debug!(node, "lag check timed out");
            conns[node] = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replica_answers() {
        let lag = replica_lag("0/3000000 1.5", 0x300_0100).expect("lag");
        assert_eq!(lag.replay_lsn, 0x300_0000);
        assert_eq!(lag.bytes, 0x100);
        assert_eq!(lag.seconds, 1.5);
        // A replica ahead of the primary's last reading is not negative lag.
        assert_eq!(
            replica_lag("0/3000100 0", 0x300_0000).map(|l| l.bytes),
            Some(0)
        );
        assert_eq!(replica_lag("garbage", 1), None);
    }
}
