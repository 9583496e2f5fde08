//! What a served request adds to the statistics the console shows (`SHOW STATS`,
//! Pgpool-II's per-node counters) and to the metrics.

use std::time::Instant;

use super::Session;
use crate::cluster::NodeStats;
use crate::registry;

impl Session {
    /// Adds what the request just served did to the statistics and metrics. Returns
    /// the time it ended, when a request was timed (the one clock read it costs).
    pub(super) fn account(&mut self) -> Option<Instant> {
        let counts = self.wire.take_counts();
        self.shared.metrics.bytes_received.inc_by(counts.received);
        self.shared.metrics.bytes_sent.inc_by(counts.sent);
        let request = self.request.take();
        if counts.errors != [0; 3] {
            let node = request.map_or(self.wire.node, |r| r.node);
            if let Some(stats) = self.node_stats(node) {
                stats.add_errors(counts.errors);
            }
        }
        let Some(request) = request else {
            // Session mode without routing: one relay for the whole session, so its
            // queries and bytes are added when it ends, with no transactions counted.
            let work = registry::Work {
                queries: counts.queries,
                received: counts.received,
                sent: counts.sent,
                ..registry::Work::default()
            };
            self.db_stats.add(&work, false);
            return None;
        };
        let now = Instant::now();
        let xact = now.saturating_duration_since(request.at);
        let work = registry::Work {
            queries: counts.queries,
            received: counts.received,
            sent: counts.sent,
            xact,
            wait: request.wait,
        };
        self.db_stats.add(&work, true);
        let latency = &self.latency;
        latency.transaction.observe(xact.as_secs_f64());
        latency.wait.observe(request.wait.as_secs_f64());
        if let Some(start) = self.wire.query_start.take() {
            // The transaction's last request, unless the relay timed it.
            latency
                .query
                .observe(now.saturating_duration_since(start).as_secs_f64());
        }
        if let Some(stats) = self.node_stats(request.node) {
            stats.add_transaction(request.write, counts.queries);
        }
        if let Some(prepared) = self.wire.prepared.as_deref() {
            self.handle
                .entry
                .prepared
                .store(prepared.len() as u32, std::sync::atomic::Ordering::Relaxed);
        }
        Some(now)
    }

    /// The counters of `node`, looked up in the topology on first use.
    fn node_stats(&mut self, node: usize) -> Option<&NodeStats> {
        if self.node_stats.len() <= node {
            self.node_stats.resize(node + 1, None);
        }
        if self.node_stats[node].is_none() {
            let stats = self.shared.cluster.load().nodes.get(node)?.stats.clone();
            self.node_stats[node] = Some(stats);
        }
        self.node_stats[node].as_deref()
    }
}
