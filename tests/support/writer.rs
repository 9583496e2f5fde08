//! A client inserting keys one by one as fast as it can, recording what it saw: the
//! load failover tests run while they break the cluster.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one writer saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Keys whose INSERT was acknowledged, in order.
    pub acked: Vec<i64>,
    /// When each was acknowledged.
    pub oks: Vec<Instant>,
    /// Failed INSERTs: when, and the SQLSTATE (or the error's text).
    pub errors: Vec<(Instant, String)>,
}

/// Spawns a writer on `client` that inserts `id * 1e6 + n` into `t (k)` (extended
/// protocol, autocommit) until `stop`, pausing `after_error` after a failed insert.
pub fn spawn(
    client: tokio_postgres::Client,
    id: i64,
    stop: Arc<AtomicBool>,
    after_error: Duration,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let kept = seen.clone();
    let task = tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let key = id * 1_000_000 + n;
            let result = client
                .execute("INSERT INTO t (k) VALUES ($1)", &[&key])
                .await;
            let failed = {
                let mut seen = kept.lock().expect("seen");
                match result {
                    Ok(_) => {
                        seen.acked.push(key);
                        seen.oks.push(Instant::now());
                        false
                    }
                    Err(err) => {
                        let code = super::sqlstate(&err).unwrap_or_else(|| err.to_string());
                        seen.errors.push((Instant::now(), code));
                        true
                    }
                }
            };
            if failed && !after_error.is_zero() {
                tokio::time::sleep(after_error).await;
            }
        }
    });
    (seen, task)
}
