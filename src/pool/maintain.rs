//! The pools' background loop: every second, close idle servers past their idle
//! timeout or lifetime (keeping `min_pool_size`), then open servers up to
//! `min_pool_size`. Runs until the shutdown signal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Pools;

const PERIOD: Duration = Duration::from_secs(1);

pub async fn maintain(pools: Arc<Pools>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        for pool in pools.all() {
            let closed = pool.evict(now);
            if closed > 0 {
                tracing::debug!(pool = ?pool.key, closed, "closed idle or expired servers");
            }
            if let Err(err) = pool.fill_to_min().await {
                tracing::warn!(pool = ?pool.key, %err, "could not open min_pool_size servers");
            }
        }
    }
}
