//! Pgpool-II's node views on the console: `SHOW POOL_NODES`, `SHOW
//! POOL_HEALTH_CHECK_STATS` and `SHOW POOL_BACKEND_STATS`, with its columns in its order
//! and its meanings (text columns, as Pgpool-II sends them); and pgrelay's `SHOW
//! LEASE`, who in a fleet runs the failover hooks (Pgpool-II's `pcp_watchdog_info`
//! plays that part there).

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::show::{format_time, v, Table};
use crate::cluster::Role;
use crate::Shared;

/// `SHOW LEASE`: the failover lease as this instance sees it, and the hooks it keeps
/// deferred because another instance held it.
pub(super) fn lease(shared: &Shared) -> Table {
    let mut t = Table::texts(&[
        "lease",
        "key",
        "holder",
        "this_instance",
        "held",
        "ttl_s",
        "expires_in_ms",
        "deferred_hooks",
    ]);
    let view = shared.lease.view();
    let deferred: Vec<String> = shared
        .hooks
        .deferred()
        .iter()
        .map(|d| {
            let node = d.run.node.map_or(-1, |n| n as i64);
            format!(
                "{} node {node} (deferred: lease held by {})",
                d.run.kind.as_str(),
                d.holder
            )
        })
        .collect();
    let kind = match view.kind {
        crate::config::LeaseKind::None => "none",
        crate::config::LeaseKind::Etcd => "etcd",
        crate::config::LeaseKind::Kubernetes => "kubernetes",
    };
    t.row(vec![
        v(kind),
        v(view.key),
        v(view.holder),
        v(view.this_instance),
        v(view.held),
        v(view.ttl.as_secs()),
        view.expires_in.map(|d| d.as_millis().to_string()),
        v(deferred.join("; ")),
    ]);
    t
}

/// Pgpool-II's `SHOW POOL_NODES`, its 14 columns in its order.
pub(super) fn pool_nodes(shared: &Shared) -> Table {
    let mut t = Table::texts(&[
        "node_id",
        "hostname",
        "port",
        "status",
        "pg_status",
        "lb_weight",
        "role",
        "pg_role",
        "select_cnt",
        "load_balance_node",
        "replication_delay",
        "replication_state",
        "replication_sync_state",
        "last_status_change",
    ]);
    let topology = shared.cluster.snapshot();
    let total_weight: f64 = topology.nodes.iter().map(|n| n.weight).sum();
    for (i, n) in topology.nodes.iter().enumerate() {
        let primary = topology.primary == Some(i);
        let role = if primary {
            "primary"
        } else if n.role == Role::Primary {
            // A claimant that is not the primary (split brain, a false primary).
            "unknown"
        } else {
            Role::Replica.as_str()
        };
        let delay = if primary {
            0
        } else {
            n.lag.map_or(0, |l| l.bytes)
        };
        let state = if n.role == Role::Replica && n.upstream.is_some() {
            "streaming"
        } else {
            ""
        };
        t.row(vec![
            v(i),
            v(&n.host),
            v(n.port),
            v(n.status.as_str()),
            v(if n.pg_up { "up" } else { "down" }),
            v(format!(
                "{:.6}",
                if total_weight > 0.0 {
                    n.weight / total_weight
                } else {
                    0.0
                }
            )),
            v(role),
            v(n.role.as_str()),
            v(n.stats.selects.load(Ordering::Relaxed)),
            v(n.readable),
            v(delay),
            v(state),
            v(""),
            v(format_time(n.since)),
        ]);
    }
    t
}

/// The first five columns of Pgpool-II's per-node statistics.
const NODE_HEAD: [&str; 5] = ["node_id", "hostname", "port", "status", "role"];

/// The values of [`NODE_HEAD`] for node `i`.
fn node_head(topology: &crate::cluster::Topology, i: usize) -> Vec<Option<String>> {
    let n = &topology.nodes[i];
    let role = if topology.primary == Some(i) {
        "primary"
    } else {
        n.role.as_str()
    };
    vec![v(i), v(&n.host), v(n.port), v(n.status.as_str()), v(role)]
}

/// Pgpool-II's `SHOW POOL_HEALTH_CHECK_STATS`.
pub(super) fn health_check_stats(shared: &Shared) -> Table {
    let mut t = Table::texts(
        &[
            NODE_HEAD.as_slice(),
            &[
                "last_status_change",
                "total_count",
                "success_count",
                "fail_count",
                "skip_count",
                "retry_count",
                "average_retry_count",
                "max_retry_count",
                "max_duration",
                "min_duration",
                "average_duration",
                "last_health_check",
                "last_successful_health_check",
                "last_skip_health_check",
                "last_failed_health_check",
            ],
        ]
        .concat(),
    );
    let topology = shared.cluster.snapshot();
    for (i, n) in topology.nodes.iter().enumerate() {
        let h = n.stats.health();
        let time = |t: Option<SystemTime>| v(t.map(format_time).unwrap_or_default());
        let ms = |d: Duration| v(d.as_millis());
        let failures_streaks = h.fail.max(1);
        let mut row = node_head(&topology, i);
        row.extend([
            v(format_time(n.since)),
            v(h.total),
            v(h.success),
            v(h.fail),
            v(0),
            v(h.retries),
            v(format!("{:.6}", h.retries as f64 / failures_streaks as f64)),
            v(h.max_retries),
            ms(h.max_duration),
            ms(h.min_duration.unwrap_or_default()),
            v(format!(
                "{:.6}",
                if h.total > 0 {
                    h.total_duration.as_secs_f64() * 1000.0 / h.total as f64
                } else {
                    0.0
                }
            )),
            time(h.last),
            time(h.last_success),
            v(""),
            time(h.last_failure),
        ]);
        t.row(row);
    }
    t
}

/// Pgpool-II's `SHOW POOL_BACKEND_STATS`.
pub(super) fn backend_stats(shared: &Shared) -> Table {
    let mut t = Table::texts(
        &[
            NODE_HEAD.as_slice(),
            &[
                "select_cnt",
                "insert_cnt",
                "update_cnt",
                "delete_cnt",
                "ddl_cnt",
                "other_cnt",
                "panic_cnt",
                "fatal_cnt",
                "error_cnt",
            ],
        ]
        .concat(),
    );
    let topology = shared.cluster.snapshot();
    for (i, n) in topology.nodes.iter().enumerate() {
        let s = &n.stats;
        let load = |c: &std::sync::atomic::AtomicU64| v(c.load(Ordering::Relaxed));
        let mut row = node_head(&topology, i);
        row.extend([
            load(&s.selects),
            load(&s.inserts),
            load(&s.updates),
            load(&s.deletes),
            load(&s.ddl),
            load(&s.other),
            load(&s.panics),
            load(&s.fatals),
            load(&s.server_errors),
        ]);
        t.row(row);
    }
    t
}
