//! The cancel-key registry: each client's BackendKeyData maps to the server currently
//! running that client's query, if any.
//!
//! A cancel is sent while holding the client's slot, and a session clears its slot
//! (waiting for such a cancel to finish) before its server goes back to the pool, so a
//! cancel can never reach a server that has since moved to another client.
//!
//! The pids pgrelay issues itself (transaction mode) are unique among the clients it
//! serves and lie above any pid Linux hands out (`pid_max` is at most 2^22), so one of
//! them can never be mistaken for a real server's: `pg_cancel_backend` and
//! `pg_terminate_backend` of such a pid are pgrelay's to carry out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// The lowest pid pgrelay issues: above Linux's largest `pid_max` (2^22).
pub const ISSUED_PID_MIN: i32 = 1 << 22;

/// How long forwarding one cancel may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// A server process to cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// Where a client's cancels go. A session updates it on every checkout and release, so
/// the common case takes a plain uncontended lock; only a release that meets a cancel
/// in flight waits (for `done`).
#[derive(Default)]
struct SlotInner {
    state: std::sync::Mutex<SlotState>,
    done: Notify,
}

#[derive(Default)]
struct SlotState {
    target: Option<CancelTarget>,
    /// A CancelRequest for `target` is being sent right now.
    in_flight: bool,
}

impl SlotInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Slot = Arc<SlotInner>;

#[derive(Default)]
pub struct CancelRegistry {
    slots: DashMap<(i32, i32), Slot>,
    /// The pids pgrelay issued, with their secrets: a pid alone finds its client.
    issued: DashMap<i32, i32>,
}

/// A client's registration; unregisters on drop.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    key: (i32, i32),
    slot: Slot,
    /// The key is one pgrelay made up (listed in `issued`).
    issued: bool,
}

impl CancelRegistry {
    /// Registers a client under a fresh random key (transaction mode), whose pid no
    /// other client of pgrelay has.
    pub fn register_random(self: &Arc<Self>) -> CancelHandle {
        let mut rng = rand::thread_rng();
        loop {
            let key = (rng.gen_range(ISSUED_PID_MIN..i32::MAX), rng.gen());
            let dashmap::Entry::Vacant(pid) = self.issued.entry(key.0) else {
                continue;
            };
            pid.insert(key.1);
            match self.register(key) {
                Some(mut handle) => {
                    handle.issued = true;
                    return handle;
                }
                None => {
                    self.issued.remove(&key.0);
                }
            }
        }
    }

    /// Whether `pid` is one pgrelay issued to a client that is still connected.
    pub fn is_issued(&self, pid: i32) -> bool {
        self.issued.contains_key(&pid)
    }

    /// Forwards a cancel for the client pgrelay issued `pid` to, as its own
    /// CancelRequest would (`pg_cancel_backend` of that pid). Returns whether there is
    /// such a client.
    pub async fn cancel_issued(&self, pid: i32) -> bool {
        let Some(secret) = self.issued.get(&pid).map(|s| *s) else {
            return false;
        };
        self.cancel(pid, secret).await;
        true
    }

    /// Registers a client under `key` (session mode: its server's real key). `None` if
    /// the key is taken.
    pub fn register(self: &Arc<Self>, key: (i32, i32)) -> Option<CancelHandle> {
        let slot: Slot = Arc::default();
        match self.slots.entry(key) {
            dashmap::Entry::Occupied(_) => None,
            dashmap::Entry::Vacant(v) => {
                v.insert(slot.clone());
                Some(CancelHandle {
                    registry: self.clone(),
                    key,
                    slot,
                    issued: false,
                })
            }
        }
    }

    /// Forwards a client's CancelRequest to the server running its query, if any.
    /// Unknown keys are ignored, as PostgreSQL does.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let Some(slot) = self.slots.get(&(pid, secret)).map(|s| s.clone()) else {
            tracing::debug!(pid, "cancel request with an unknown key");
            return;
        };
        let target = {
            let mut state = slot.lock();
            let Some(target) = state.target else { return };
            state.in_flight = true;
            target
        };
        match tokio::time::timeout(CANCEL_TIMEOUT, send_cancel(target)).await {
            Ok(Ok(())) => {
                tracing::debug!(server = %target.addr, pid = target.pid, "forwarded cancel")
            }
            Ok(Err(err)) => tracing::warn!(server = %target.addr, %err, "could not forward cancel"),
            Err(_) => tracing::warn!(server = %target.addr, "timed out forwarding cancel"),
        }
        slot.lock().in_flight = false;
        slot.done.notify_waiters();
    }
}

async fn send_cancel(target: CancelTarget) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(target.addr).await?;
    let mut buf = BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(target.pid, target.secret, &mut buf);
    stream.write_all(&buf).await?;
    stream.flush().await?;
    // PostgreSQL closes the connection once it has read the request; waiting for that
    // keeps the cancel from racing the next query on this server.
    let mut sink = [0u8; 1];
    let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await;
    Ok(())
}

impl CancelHandle {
    pub fn key(&self) -> (i32, i32) {
        self.key
    }

    /// Points the client's key at a server (or at none). Waits for a cancel in flight.
    pub async fn set(&self, target: Option<CancelTarget>) {
        loop {
            // Created before the check, so a cancel finishing in between still wakes it.
            let finished = self.slot.done.notified();
            {
                let mut state = self.slot.lock();
                if !state.in_flight {
                    state.target = target;
                    return;
                }
            }
            finished.await;
        }
    }
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.registry.slots.remove(&self.key);
        if self.issued {
            self.registry.issued.remove(&self.key.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_pids_are_unique_above_linux_pids_and_forgotten_on_drop() {
        let registry = Arc::new(CancelRegistry::default());
        let handles: Vec<_> = (0..1000).map(|_| registry.register_random()).collect();
        let pids: std::collections::HashSet<i32> = handles.iter().map(|h| h.key().0).collect();
        assert_eq!(pids.len(), handles.len(), "no two clients share a pid");
        assert!(pids.iter().all(|&pid| pid >= ISSUED_PID_MIN));
        let pid = handles[0].key().0;
        assert!(registry.is_issued(pid));
        drop(handles);
        assert!(!registry.is_issued(pid));
        // A server's real key (session mode) is no issued pid.
        let real = registry.register((4242, 7)).expect("free key");
        assert!(!registry.is_issued(real.key().0));
    }
}
