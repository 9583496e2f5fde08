//! Transaction mode, at each transaction's end: what the transaction did to its
//! session is made to follow the client. Settings it changed are read back from the
//! server and become the client's (re-applied on whichever server it lands on next);
//! state that cannot move — session advisory locks, `LISTEN`, temporary tables,
//! `WITH HOLD` cursors, SQL `PREPARE` — pins the client to its server until the server
//! says it is gone.

use super::Session;
use crate::config::PoolMode;
use crate::pool::params::literal;
use crate::pool::server::ServerError;
use crate::pool::ServerGuard;
use crate::router::classify::effects::Effects;

/// One row: how much of each kind of state the server session holds, in the order of
/// [`HELD`].
const HELD_SQL: &str = "SELECT \
    (SELECT count(*) FROM pg_catalog.pg_locks \
      WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()), \
    (SELECT count(*) FROM pg_catalog.pg_listening_channels()), \
    (SELECT count(*) FROM pg_catalog.pg_class \
      WHERE relnamespace = pg_catalog.pg_my_temp_schema()), \
    (SELECT count(*) FROM pg_catalog.pg_cursors WHERE is_holdable), \
    (SELECT count(*) FROM pg_catalog.pg_prepared_statements WHERE from_sql)";

const HELD: [&str; 5] = [
    "advisory lock",
    "LISTEN",
    "temporary table",
    "WITH HOLD cursor",
    "SQL prepared statement",
];

/// Why a client stays on its server: the one notion of pinning, in both modes. In
/// transaction mode the server is not returned at the transaction's end; in session
/// mode with routing the client's requests all go to the primary server it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pin {
    pub(super) reason: &'static str,
    /// The server cannot be asked whether it is over (`LOAD`, `set_config`, ...), or
    /// the pin is a session-mode one: it lasts until the client leaves.
    for_good: bool,
}

impl Pin {
    /// A pin that lasts until the client leaves.
    pub(super) fn for_good(reason: &'static str) -> Pin {
        Pin {
            reason,
            for_good: true,
        }
    }
}

impl Session {
    /// Applies a finished transaction's effects. The server is idle.
    pub(super) async fn settle(
        &mut self,
        guard: &mut ServerGuard,
        effects: Effects,
    ) -> Result<(), ServerError> {
        let pinned_for_good = self.pin.is_some_and(|p| p.for_good);
        let check_pins =
            !pinned_for_good && (effects.may_pin || (self.pin.is_some() && effects.may_release));
        if effects.is_empty() && !check_pins {
            return Ok(());
        }
        if effects.schema_change {
            // Committed now: statements prepared from here on see the new schema.
            self.shared.parsed.schema_changed();
        }
        let server = guard.server();
        if effects.deallocate_all {
            server.statements.clear();
            if let Some(prepared) = self.wire.prepared.as_deref_mut() {
                prepared.forget_all();
            }
        }
        if effects.reset_all {
            // Back to the session defaults: the client's startup settings.
            self.params.clear_unreported();
            for (name, value) in &self.login.gucs {
                self.params.set_unreported(name, value);
            }
            server.params.clear_unreported();
        }
        if !effects.settings.is_empty() {
            let reads: Vec<String> = effects
                .settings
                .iter()
                .map(|name| format!("pg_catalog.current_setting({}, true)", literal(name)))
                .collect();
            let values = server
                .query_row(&format!("SELECT {}", reads.join(", ")))
                .await?;
            for (name, value) in effects.settings.iter().zip(values) {
                match value {
                    Some(value) => {
                        self.params.set_unreported(name, &value);
                        server.params.set_unreported(name, &value);
                    }
                    None => {
                        self.params.remove(name);
                        server.params.remove(name);
                    }
                }
            }
        }
        if let Some(reason) = effects.pin {
            self.pin_to_server(Pin::for_good(reason));
        } else if check_pins {
            let counts = server.query_row(HELD_SQL).await?;
            let held = counts
                .iter()
                .position(|c| c.as_deref().is_some_and(|c| c != "0"))
                .map(|i| HELD[i]);
            match held {
                Some(reason) => self.pin_to_server(Pin {
                    reason,
                    for_good: false,
                }),
                None => {
                    if self.unpin() {
                        tracing::info!(user = %self.login.user, "client released its session state; back to transaction pooling");
                    }
                }
            }
        }
        Ok(())
    }

    /// Keeps the client on its server. The metrics count transaction-mode pins (a
    /// session-mode client has its server anyway).
    pub(super) fn pin_to_server(&mut self, pin: Pin) {
        let was = self.pin.replace(pin);
        if was.is_none() && self.mode == PoolMode::Transaction {
            self.shared.metrics.pinned_clients.inc();
            self.shared
                .metrics
                .pins
                .with_label_values(&[pin.reason])
                .inc();
            tracing::info!(
                user = %self.login.user,
                database = %self.login.database,
                reason = pin.reason,
                "client pinned to its server: session state cannot move to another"
            );
        }
    }

    /// Ends a pin; returns whether there was one.
    pub(super) fn unpin(&mut self) -> bool {
        let was = self.pin.take().is_some();
        if was && self.mode == PoolMode::Transaction {
            self.shared.metrics.pinned_clients.dec();
        }
        was
    }

    /// Moves the client's prepared-statement counters to the shared metrics.
    pub(super) fn count_prepared(&mut self) {
        if let Some(prepared) = self.wire.prepared.as_deref_mut() {
            let stats = std::mem::take(&mut prepared.stats);
            if stats.hits > 0 {
                self.shared.metrics.prepared_hits.inc_by(stats.hits);
            }
            if stats.misses > 0 {
                self.shared.metrics.prepared_misses.inc_by(stats.misses);
            }
        }
    }
}
