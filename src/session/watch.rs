//! The session's timeouts, with PgBouncer's meanings: `query_timeout` (a request its
//! server has not finished answering), `idle_transaction_timeout` (a client silent
//! inside a transaction block), `transaction_timeout` (a block open too long, running
//! or idle) and `client_idle_timeout` (a client silent between transactions).
//!
//! Which one runs depends on where the exchange stands ([`Phase`]), read off the relay's
//! state each time the relay is about to wait: a session without timeouts has no
//! [`Watch`] and pays one branch per wait; one with timeouts reads the clock and moves
//! its timer only when the phase changes or a request of a pipeline is answered.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::config::PoolConfig;
use crate::error::ClientError;
use crate::session::relay::Wire;

/// The timeouts a session runs with, fixed when it starts (a RELOAD applies to new
/// clients). `None` for each that is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub query: Option<Duration>,
    pub idle_transaction: Option<Duration>,
    pub transaction: Option<Duration>,
    pub client_idle: Option<Duration>,
}

impl Timeouts {
    /// The `[pool]` timeouts, or `None` when all are off.
    pub fn from_config(pool: &PoolConfig) -> Option<Timeouts> {
        let on = |d: Duration| (!d.is_zero()).then_some(d);
        let timeouts = Timeouts {
            query: on(pool.query_timeout),
            idle_transaction: on(pool.idle_transaction_timeout),
            transaction: on(pool.transaction_timeout),
            client_idle: on(pool.client_idle_timeout),
        };
        let any = timeouts.query.is_some()
            || timeouts.idle_transaction.is_some()
            || timeouts.transaction.is_some()
            || timeouts.client_idle.is_some();
        any.then_some(timeouts)
    }
}

/// Where a client's exchange with its server stands, as the timeouts see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A request is on its way or being answered, or an answer waits for the client
    /// to read it.
    Running,
    /// Nothing owed, inside a transaction block: the client's turn.
    IdleInBlock,
    /// Nothing owed, between transactions.
    Idle,
}

impl Phase {
    /// The phase of `wire`'s exchange now.
    pub fn of(wire: &Wire) -> Phase {
        let exchange = &wire.client.exchange;
        let busy = exchange.pending > 0
            || exchange.extended_open
            || wire.client.c2s > 0
            || wire.server.s2c > 0
            || !wire.client.scanner.at_boundary()
            || !wire.server.scanner.at_boundary();
        if busy {
            Phase::Running
        } else if wire.in_block() {
            Phase::IdleInBlock
        } else {
            Phase::Idle
        }
    }
}

/// Which timeout ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    Query(Duration),
    IdleTransaction,
    Transaction,
    ClientIdle,
}

impl Expired {
    /// What the client is told.
    pub fn error(self) -> ClientError {
        match self {
            Expired::Query(after) => ClientError::query_timeout(after),
            Expired::IdleTransaction => ClientError::idle_transaction_timeout(),
            Expired::Transaction => ClientError::transaction_timeout(),
            Expired::ClientIdle => ClientError::client_idle_timeout(),
        }
    }

    pub fn key(self) -> &'static str {
        match self {
            Expired::Query(_) => "query_timeout",
            Expired::IdleTransaction => "idle_transaction_timeout",
            Expired::Transaction => "transaction_timeout",
            Expired::ClientIdle => "client_idle_timeout",
        }
    }
}

/// A session's timer and what it last saw of the exchange. Kept across relays, so a
/// transaction block is timed from its start even when the relay stops inside it.
pub struct Watch {
    timeouts: Timeouts,
    /// What the timer was last set from: the phase, the server's count of
    /// ReadyForQuery messages, and whether a block was open. `None`: look again.
    seen: Option<(Phase, u32, bool)>,
    /// When the open transaction block was first seen.
    block_since: Option<Instant>,
    /// The armed deadline's timeout; `None` when none applies now.
    armed: Option<Expired>,
    /// Made at the first deadline.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Watch {
    pub fn new(timeouts: Timeouts) -> Watch {
        Watch {
            timeouts,
            seen: None,
            block_since: None,
            armed: None,
            timer: None,
        }
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// A relay begins: the exchange is looked at afresh at its first wait.
    pub fn relay_starts(&mut self) {
        self.seen = None;
    }

    /// Between transactions with no server: resolves once the client has been idle
    /// for `client_idle_timeout` from now; never when that is off.
    pub async fn client_idle(watch: Option<&mut Watch>) {
        let Some(watch) = watch else {
            return std::future::pending().await;
        };
        watch.seen = None;
        watch.block_since = None;
        watch.arm(Phase::Idle, false, Instant::now());
        match (watch.armed, watch.timer.as_mut()) {
            (Some(_), Some(timer)) => timer.await,
            _ => std::future::pending().await,
        }
    }

    /// Called where the relay is about to wait: re-arms the timer when the exchange
    /// moved on, and says which timeout expired, if one did (the relay then ends).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>, wire: &Wire) -> Option<Expired> {
        let phase = Phase::of(wire);
        let in_block = wire.in_block();
        let now_seen = (phase, wire.server.readies, in_block);
        if self.seen != Some(now_seen) {
            self.seen = Some(now_seen);
            self.arm(phase, in_block, Instant::now());
        }
        self.armed?;
        let timer = self.timer.as_mut()?;
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => self.armed.take(),
            Poll::Pending => None,
        }
    }

    /// Sets the timer for the phase entered at `now`: the sooner of the phase's own
    /// timeout and the open block's `transaction_timeout`.
    fn arm(&mut self, phase: Phase, in_block: bool, now: Instant) {
        if !in_block {
            self.block_since = None;
        } else if self.block_since.is_none() {
            self.block_since = Some(now);
        }
        let own = match phase {
            Phase::Running => self.timeouts.query.map(|d| (now + d, Expired::Query(d))),
            Phase::IdleInBlock => self
                .timeouts
                .idle_transaction
                .map(|d| (now + d, Expired::IdleTransaction)),
            Phase::Idle => self
                .timeouts
                .client_idle
                .map(|d| (now + d, Expired::ClientIdle)),
        };
        let block = self
            .timeouts
            .transaction
            .zip(self.block_since)
            .map(|(d, since)| (since + d, Expired::Transaction));
        let deadline = match (own, block) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        };
        self.armed = deadline.map(|(_, which)| which);
        if let Some((at, _)) = deadline {
            match self.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts(query: u64, idle_tx: u64, tx: u64, idle: u64) -> Timeouts {
        let on = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Timeouts {
            query: on(query),
            idle_transaction: on(idle_tx),
            transaction: on(tx),
            client_idle: on(idle),
        }
    }

    #[test]
    fn all_off_is_no_watch() {
        assert_eq!(Timeouts::from_config(&PoolConfig::default()), None);
        let pool = PoolConfig {
            client_idle_timeout: Duration::from_secs(5),
            ..PoolConfig::default()
        };
        assert_eq!(
            Timeouts::from_config(&pool),
            Some(timeouts(0, 0, 0, 5)),
            "one timeout on makes a watch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_phase_arms_its_own_timeout() {
        let mut watch = Watch::new(timeouts(10, 20, 0, 30));
        let now = Instant::now();
        watch.arm(Phase::Running, false, now);
        assert_eq!(watch.armed, Some(Expired::Query(Duration::from_secs(10))));
        watch.arm(Phase::IdleInBlock, true, now);
        assert_eq!(watch.armed, Some(Expired::IdleTransaction));
        watch.arm(Phase::Idle, false, now);
        assert_eq!(watch.armed, Some(Expired::ClientIdle));
        let mut off = Watch::new(timeouts(0, 0, 0, 30));
        off.arm(Phase::Running, false, now);
        assert_eq!(off.armed, None, "no query_timeout: nothing armed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_is_timed_from_its_start() {
        let mut watch = Watch::new(timeouts(10, 20, 25, 0));
        let start = Instant::now();
        watch.arm(Phase::Running, true, start);
        assert_eq!(watch.armed, Some(Expired::Query(Duration::from_secs(10))));
        // 20 s later the client is idle in the block: 25 s from the block's start
        // comes before 20 s of idleness.
        watch.arm(Phase::IdleInBlock, true, start + Duration::from_secs(20));
        assert_eq!(watch.armed, Some(Expired::Transaction));
        // The block ends: its time is forgotten.
        watch.arm(Phase::Idle, false, start + Duration::from_secs(21));
        assert_eq!(watch.armed, None);
        assert_eq!(watch.block_since, None);
    }
}
