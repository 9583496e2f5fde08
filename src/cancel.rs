//! The cancel-key registry: each client's BackendKeyData maps to the server currently
//! running that client's query, if any.
//!
//! A key is a pid and a secret: 4 bytes for clients of protocol 3.0, 32 for clients of
//! 3.2 (as PostgreSQL 18 gives them). Keys are found by pid, and the secret a
//! CancelRequest brings is compared in constant time, as PostgreSQL compares it: how
//! long a wrong guess takes says nothing of the right secret. Servers are spoken to in
//! protocol 3.0, so what is forwarded to them carries their 4-byte secret.
//!
//! A cancel is sent while holding the client's slot, and a session clears its slot
//! (waiting for such a cancel to finish) before its server goes back to the pool, so a
//! cancel can never reach a server that has since moved to another client.
//!
//! The pids pgrelay issues itself (transaction mode) are unique among the clients it
//! serves and lie above any pid Linux hands out (`pid_max` is at most 2^22), so one of
//! them can never be mistaken for a real server's: `pg_cancel_backend` and
//! `pg_terminate_backend` of such a pid are pgrelay's to carry out.
//!
//! In a fleet, the keys an instance issues say which instance it is (`instance_id`):
//! an issued pid carries it in its bits above 2^22 + 2^20, a secret longer than 4 bytes
//! (protocol 3.2) in its first two bytes. A CancelRequest for a key of another instance
//! is forwarded to that `[[peers]]` entry once, marked as forwarded so that it goes no
//! further; a key of no known instance is ignored. A protocol 3.0 key in session mode
//! is the server's own (so that `pg_backend_pid()` agrees) and says nothing of its
//! instance: only the instance that issued it can cancel with it.

use crate::config::Config;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use rand::{Rng, RngCore};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::auth::scram::constant_time_eq;

/// The lowest pid pgrelay issues: above Linux's largest `pid_max` (2^22).
pub const ISSUED_PID_MIN: i32 = 1 << 22;

/// Issued pids per instance: an instance's pids are `ISSUED_PID_MIN + id * 2^20 + n`.
const PIDS_PER_INSTANCE: i32 = 1 << 20;

/// How long forwarding one cancel may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// A server process to cancel, with its protocol 3.0 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// Where a client's cancels go. A session updates it on every checkout and release, so
/// the common case takes a plain uncontended lock; only a release that meets a cancel
/// in flight waits (for `done`).
struct SlotInner {
    /// The secret of the client's key, which a CancelRequest must bring.
    secret: Box<[u8]>,
    /// The key is one pgrelay made up, its pid unique among its clients; the others
    /// are session mode's, a server's pid.
    issued: bool,
    state: std::sync::Mutex<SlotState>,
    done: Notify,
}

#[derive(Default)]
struct SlotState {
    target: Option<CancelTarget>,
    /// Reserved for a client of the process this one is taking over from, not handed
    /// over yet: its cancels go there.
    elsewhere: bool,
    /// A CancelRequest for `target` is being sent right now.
    in_flight: bool,
}

impl SlotInner {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Slot = Arc<SlotInner>;

/// The registered clients, by the pid of their key.
#[derive(Default)]
pub struct CancelRegistry {
    slots: DashMap<i32, Slot>,
    /// This instance's id in its fleet, carried in the keys it issues.
    instance: u16,
    /// During a takeover: where cancels for keys reserved for clients still on the
    /// process handing over go (`pid`, `secret`).
    predecessor: std::sync::OnceLock<PredecessorCancels>,
}

/// Cancels for clients still on the process being taken over: `(pid, secret)`.
pub type PredecessorCancels = tokio::sync::mpsc::UnboundedSender<(i32, Box<[u8]>)>;

/// A client's registration; unregisters on drop.
pub struct CancelHandle {
    registry: Arc<CancelRegistry>,
    pid: i32,
    slot: Slot,
}

/// This instance's id: `instance_id`, else one derived from the host name (a pod's
/// name), the same at every start on the same host.
pub fn instance_id(config: &crate::config::Config) -> u16 {
    config.instance_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        // FNV-1a: stable across builds, unlike std's hasher.
        let hash = host.trim().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (hash % (u64::from(crate::config::MAX_INSTANCE_ID) + 1)) as u16
    })
}

/// The instance a key was issued by, when the key says: its pid if pgrelay issued it,
/// else a secret longer than protocol 3.0's.
pub fn issuer(pid: i32, secret: &[u8]) -> Option<u16> {
    if pid >= ISSUED_PID_MIN {
        return u16::try_from((pid - ISSUED_PID_MIN) / PIDS_PER_INSTANCE).ok();
    }
    match secret {
        [high, low, _, _, _, ..] => Some(u16::from_be_bytes([*high, *low])),
        _ => None,
    }
}

impl CancelRegistry {
    /// A registry for the instance `instance` of a fleet.
    pub fn new(instance: u16) -> CancelRegistry {
        CancelRegistry {
            slots: DashMap::new(),
            instance,
            predecessor: std::sync::OnceLock::new(),
        }
    }

    /// This instance's id in its fleet.
    pub fn instance(&self) -> u16 {
        self.instance
    }

    /// `len` random bytes: the secret of a key pgrelay issues. One longer than 4 bytes
    /// (protocol 3.2) starts with this instance's id.
    pub fn random_secret(&self, len: usize) -> Box<[u8]> {
        let mut secret = vec![0; len].into_boxed_slice();
        rand::thread_rng().fill_bytes(&mut secret);
        if len > 4 {
            secret[..2].copy_from_slice(&self.instance.to_be_bytes());
        }
        secret
    }

    /// Registers a client under a fresh random key (transaction mode, or a server that
    /// gave no key of its own), with a secret of `secret_len` bytes and a pid no other
    /// client of pgrelay has, in this instance's range.
    pub fn register_random(self: &Arc<Self>, secret_len: usize) -> CancelHandle {
        let mut rng = rand::thread_rng();
        let first = ISSUED_PID_MIN + i32::from(self.instance) * PIDS_PER_INSTANCE;
        loop {
            let pid = first + rng.gen_range(0..PIDS_PER_INSTANCE);
            if let Some(handle) = self.insert(pid, self.random_secret(secret_len), true) {
                return handle;
            }
        }
    }

    /// Registers a client under `pid` and `secret` (session mode: its server's pid).
    /// `None` if the pid is taken (servers of two nodes may share one).
    pub fn register(self: &Arc<Self>, pid: i32, secret: Box<[u8]>) -> Option<CancelHandle> {
        self.insert(pid, secret, false)
    }

    /// Registers a client under a key pgrelay issued it before (in the process it was
    /// handed over from). `None` if the pid is taken.
    pub fn register_issued(self: &Arc<Self>, pid: i32, secret: Box<[u8]>) -> Option<CancelHandle> {
        self.insert(pid, secret, true)
    }

    /// Reserves the key of a client the process being taken over still serves: no
    /// other client gets its pid, and its cancels go to `predecessor` (see
    /// [`CancelRegistry::forward_reserved_to`]) until [`CancelHandle::claim`].
    pub fn reserve(self: &Arc<Self>, pid: i32, secret: Box<[u8]>) -> Option<CancelHandle> {
        let handle = self.insert(pid, secret, true)?;
        handle.slot.lock().elsewhere = true;
        Some(handle)
    }

    /// Where cancels for reserved keys go.
    pub fn forward_reserved_to(&self, predecessor: PredecessorCancels) {
        let _ = self.predecessor.set(predecessor);
    }

    /// The key is reserved for a client still on the process being taken over: the
    /// cancel went there. Otherwise `false`.
    fn sent_to_predecessor(&self, pid: i32, slot: &SlotInner) -> bool {
        if !slot.lock().elsewhere {
            return false;
        }
        match self.predecessor.get() {
            Some(predecessor) => {
                let _ = predecessor.send((pid, slot.secret.clone()));
            }
            None => tracing::debug!(pid, "cancel for a client not handed over yet"),
        }
        true
    }

    /// Every key pgrelay issued that a client still holds, to reserve them in the
    /// process taking over.
    pub fn issued_keys(&self) -> Vec<(i32, Box<[u8]>)> {
        self.slots
            .iter()
            .filter(|slot| slot.issued)
            .map(|slot| (*slot.key(), slot.secret.clone()))
            .collect()
    }

    fn insert(self: &Arc<Self>, pid: i32, secret: Box<[u8]>, issued: bool) -> Option<CancelHandle> {
        let dashmap::Entry::Vacant(entry) = self.slots.entry(pid) else {
            return None;
        };
        let slot = Arc::new(SlotInner {
            secret,
            issued,
            state: Default::default(),
            done: Notify::new(),
        });
        entry.insert(slot.clone());
        Some(CancelHandle {
            registry: self.clone(),
            pid,
            slot,
        })
    }

    /// Whether `pid` is one pgrelay issued to a client that is still connected.
    pub fn is_issued(&self, pid: i32) -> bool {
        self.slots.get(&pid).is_some_and(|slot| slot.issued)
    }

    /// Forwards a cancel for the client pgrelay issued `pid` to, as its own
    /// CancelRequest would (`pg_cancel_backend` of that pid). Returns whether there is
    /// such a client.
    pub async fn cancel_issued(&self, pid: i32) -> bool {
        let Some(slot) = self.slots.get(&pid).map(|s| s.clone()) else {
            return false;
        };
        if !slot.issued {
            return false;
        }
        forward(&slot).await;
        true
    }

    /// Forwards a client's CancelRequest to the server running its query, if any.
    /// Unknown keys are ignored, as PostgreSQL does.
    pub async fn cancel(&self, pid: i32, secret: &[u8]) {
        if let Some(slot) = self.matching(pid, secret) {
            if !self.sent_to_predecessor(pid, &slot) {
                forward(&slot).await;
            }
        }
    }

    /// A CancelRequest that arrived at this instance. One for a key of its own clients
    /// goes to their server. One a peer sent (`forwarded`) goes no further: a cancel
    /// crosses the fleet once. Else, a key another instance issued goes to that
    /// `[[peers]]` entry; a key that names no instance (a protocol 3.0 key in session
    /// mode) to every `[[peers]]` entry; and either, when no entry takes it, to every
    /// address of `peers_dns` (this instance's own among them: it ignores it then). Keys
    /// this instance issued to clients now gone are ignored, as PostgreSQL ignores
    /// unknown keys.
    pub async fn cancel_request(&self, pid: i32, secret: &[u8], forwarded: bool, config: &Config) {
        if let Some(slot) = self.matching(pid, secret) {
            if !self.sent_to_predecessor(pid, &slot) {
                forward(&slot).await;
            }
            return;
        }
        let owner = issuer(pid, secret);
        // A derived id may be another instance's too (two host names, one hash): then
        // a key that names it may still be theirs, and goes on to `peers_dns`.
        let own_key = owner == Some(self.instance) && config.instance_id.is_some();
        if forwarded || own_key {
            return;
        }
        let peers: Vec<(String, u16)> = config
            .peers
            .iter()
            .filter(|peer| owner.is_none_or(|id| id == peer.id))
            .map(|peer| (peer.host.clone(), peer.port))
            .collect();
        let sent = match (peers.is_empty(), config.peers_dns.as_deref()) {
            (false, _) => send_to_peers(peers, pid, secret).await,
            (true, Some(dns)) => match tokio::net::lookup_host(dns).await {
                Ok(addrs) => {
                    let addrs = addrs.map(|addr| (addr.ip().to_string(), addr.port()));
                    send_to_peers(addrs.collect(), pid, secret).await
                }
                Err(err) => {
                    tracing::warn!(peers_dns = dns, %err, "could not look up the peers of a cancel");
                    0
                }
            },
            (true, None) => 0,
        };
        if sent == 0 {
            tracing::debug!(pid, instance = ?owner, "cancel request for a key of no known instance");
        }
    }

    /// The slot of the client whose key is `pid` and `secret`.
    fn matching(&self, pid: i32, secret: &[u8]) -> Option<Slot> {
        let Some(slot) = self.slots.get(&pid).map(|s| s.clone()) else {
            tracing::debug!(pid, "cancel request with an unknown pid");
            return None;
        };
        if !constant_time_eq(&slot.secret, secret) {
            tracing::debug!(pid, "cancel request with a wrong key");
            return None;
        }
        Some(slot)
    }
}

/// Sends a cancel to the server `slot` points at, if any, holding the slot meanwhile.
async fn forward(slot: &SlotInner) {
    let target = {
        let mut state = slot.lock();
        let Some(target) = state.target else {
            tracing::debug!(
                "cancel request for a client with no server, or a server without a cancel key"
            );
            return;
        };
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

/// Sends each of `peers` a forwarded CancelRequest for the key `pid` and `secret`, at
/// once, each within [`CANCEL_TIMEOUT`]; the number that took it.
async fn send_to_peers(peers: Vec<(String, u16)>, pid: i32, secret: &[u8]) -> usize {
    let sends = peers.iter().map(|(host, port)| async move {
        let sent = tokio::time::timeout(CANCEL_TIMEOUT, send_to_peer((host, *port), pid, secret));
        match sent.await {
            Ok(Ok(())) => {
                tracing::debug!(pid, %host, port, "forwarded a cancel to a peer");
                true
            }
            Ok(Err(err)) => {
                tracing::warn!(%host, port, %err, "could not forward a cancel to a peer");
                false
            }
            Err(_) => {
                tracing::warn!(%host, port, "timed out forwarding a cancel to a peer");
                false
            }
        }
    });
    futures_util::future::join_all(sends)
        .await
        .into_iter()
        .filter(|&sent| sent)
        .count()
}

/// Sends a peer a forwarded CancelRequest for the key `pid` and `secret`, and waits for
/// it to close the connection (it has then acted on it).
async fn send_to_peer((host, port): (&str, u16), pid: i32, secret: &[u8]) -> std::io::Result<()> {
    let mut stream = TcpStream::connect((host, port)).await?;
    let mut buf = BytesMut::new();
    crate::protocol::startup::forwarded_cancel_request(&mut buf, pid, secret);
    stream.write_all(&buf).await?;
    let mut sink = [0u8; 1];
    let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await;
    Ok(())
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
    /// The pid of the client's key.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The client a reserved key was kept for has arrived: its cancels are this
    /// process's now.
    pub fn claim(&self) {
        self.slot.lock().elsewhere = false;
    }

    /// The secret of the client's key.
    pub fn secret(&self) -> &[u8] {
        &self.slot.secret
    }

    /// Cancels the query the client's server runs, as its own CancelRequest would.
    pub async fn cancel(&self) {
        forward(&self.slot).await;
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
        self.registry.slots.remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_their_instance() {
        for instance in [0, 1, 700, crate::config::MAX_INSTANCE_ID] {
            let registry = Arc::new(CancelRegistry::new(instance));
            for len in [4, 32] {
                let handle = registry.register_random(len);
                assert!(handle.pid() >= ISSUED_PID_MIN);
                assert_eq!(issuer(handle.pid(), handle.secret()), Some(instance));
            }
            // A session-mode 3.2 client keeps its server's pid; its secret says.
            let secret = registry.random_secret(32);
            assert_eq!(issuer(1234, &secret), Some(instance));
        }
        // A 3.0 key with a server's pid says nothing.
        assert_eq!(issuer(1234, &[1, 2, 3, 4]), None);
    }

    #[test]
    fn issued_pids_are_unique_above_linux_pids_and_forgotten_on_drop() {
        let registry = Arc::new(CancelRegistry::default());
        let handles: Vec<_> = (0..1000).map(|_| registry.register_random(4)).collect();
        let pids: std::collections::HashSet<i32> = handles.iter().map(|h| h.pid()).collect();
        assert_eq!(pids.len(), handles.len(), "no two clients share a pid");
        assert!(pids.iter().all(|&pid| pid >= ISSUED_PID_MIN));
        let pid = handles[0].pid();
        assert!(registry.is_issued(pid));
        drop(handles);
        assert!(!registry.is_issued(pid));
        // A server's real key (session mode) is no issued pid.
        let real = registry
            .register(4242, Box::new(7i32.to_be_bytes()))
            .expect("free key");
        assert!(!registry.is_issued(real.pid()));
        assert!(
            registry
                .register(4242, registry.random_secret(32))
                .is_none(),
            "pid taken"
        );
    }

    /// A cancel is matched only with the whole secret: 4 bytes (3.0) or 32 (3.2).
    #[test]
    fn cancels_need_the_whole_secret() {
        let registry = Arc::new(CancelRegistry::default());
        for len in [4, 32] {
            let handle = registry.register_random(len);
            assert_eq!(handle.secret().len(), len);
            let secret = handle.secret().to_vec();
            let mut wrong = secret.clone();
            wrong[len - 1] ^= 1;
            let longer = [secret.clone(), vec![0]].concat();
            for bad in [&wrong[..], &secret[..len - 1], &longer[..], &[][..]] {
                assert!(registry.matching(handle.pid(), bad).is_none(), "{len}");
            }
            assert!(registry.matching(handle.pid() ^ 1, &secret).is_none());
            let found = registry.matching(handle.pid(), &secret).expect("the key");
            assert!(Arc::ptr_eq(&found, &handle.slot));
        }
    }
}
