//! [`ServerGuard`]: a checked-out server. `release` returns it to its pool; dropping
//! the guard without releasing discards the server, because only the session knows
//! whether it is idle and clean.

use std::sync::Arc;
use std::time::Instant;

use super::server::Server;
use super::Pool;

pub struct ServerGuard {
    server: Option<Box<Server>>,
    pool: Arc<Pool>,
}

impl ServerGuard {
    pub(super) fn new(server: Box<Server>, pool: Arc<Pool>) -> Self {
        ServerGuard {
            server: Some(server),
            pool,
        }
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn server(&mut self) -> &mut Server {
        // `server` is only None after release/discard, which consume the guard.
        self.server.as_mut().unwrap_or_else(|| unreachable!())
    }

    pub fn server_ref(&self) -> &Server {
        self.server.as_ref().unwrap_or_else(|| unreachable!())
    }

    /// Returns the server to its pool. Call only when it is idle (`I`) with nothing
    /// unread.
    pub fn release(self) {
        self.release_at(Instant::now());
    }

    /// [`release`](Self::release), idle since `now`: a caller that has just read the
    /// clock saves the pool another read.
    pub fn release_at(mut self, now: Instant) {
        if let Some(server) = self.server.take() {
            if self.pool.retired(&server) {
                self.pool.forget(Some(server));
            } else {
                self.pool.give_back_at(server, now);
            }
        }
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.pool.forget(Some(server));
        }
    }
}
