//! The pools' background loop: every 100 ms, fail the waits that have lasted
//! `query_wait_timeout`; every second, close idle servers past their idle timeout or
//! lifetime (keeping `min_pool_size`) and open servers up to `min_pool_size`. Runs
//! until the shutdown signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Pools;

/// How often waits are checked against `query_wait_timeout` (PgBouncer checks once a
/// second; a tenth of that keeps timeouts close to what is configured).
const WAIT_CHECK: Duration = Duration::from_millis(100);
/// Eviction and the `min_pool_size` top-up run every this many wait checks (1 s).
const HOUSEKEEPING_EVERY: u32 = 10;

pub async fn maintain(pools: Arc<Pools>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(WAIT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        let all = pools.all();
        for pool in &all {
            pool.expire_waiters(now);
        }
        round = round.wrapping_add(1);
        if !round.is_multiple_of(HOUSEKEEPING_EVERY) {
            continue;
        }
        for pool in all {
            let closed = pool.evict(now);
            if closed > 0 {
                tracing::debug!(pool = ?pool.key, closed, "closed idle or expired servers");
            }
            if pool.counts().1 < pool.settings.load().min_size {
                // Opening servers must not hold up the wait checks.
                tokio::spawn(async move {
                    if let Err(err) = pool.fill_to_min().await {
                        tracing::warn!(pool = ?pool.key, %err, "could not open min_pool_size servers");
                    }
                });
            }
        }
    }
}
