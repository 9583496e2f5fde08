//! Prometheus metrics: one [`Metrics`] in [`crate::Shared`], its handles resolved once,
//! so that the hot path only touches atomics.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

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
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let pinned_clients = IntGauge::new(
            "pgrelay_pinned_clients",
            "Clients kept on one server in transaction mode by session state",
        )
        .expect("valid metric");
        let pins = IntCounterVec::new(
            Opts::new(
                "pgrelay_pins_total",
                "Clients pinned to their server in transaction mode, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let prepared_hits = IntCounter::new(
            "pgrelay_prepared_statement_hits_total",
            "Binds and Describes whose statement the server had prepared",
        )
        .expect("valid metric");
        let prepared_misses = IntCounter::new(
            "pgrelay_prepared_statement_misses_total",
            "Binds and Describes for which pgrelay prepared the statement on the server first",
        )
        .expect("valid metric");
        let failovers = IntCounter::new(
            "pgrelay_failovers_total",
            "Nodes taken out of service: failed health checks, false primaries, detaches",
        )
        .expect("valid metric");
        for collector in [
            Box::new(pinned_clients.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(pins.clone()),
            Box::new(prepared_hits.clone()),
            Box::new(prepared_misses.clone()),
            Box::new(failovers.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric registered once");
        }
        Metrics {
            registry,
            pinned_clients,
            pins,
            prepared_hits,
            prepared_misses,
            failovers,
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
