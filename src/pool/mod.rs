//! Server connection pools, one per (node, database, user): checkout with a FIFO wait
//! bounded by `query_wait_timeout`, a size limit, concurrent but bounded connection
//! opening, and replacement of broken servers.
//!
//! A [`Pool`] hands out [`ServerGuard`]s; a guard returns its server with `release` or
//! discards it when dropped, so a server in an unknown state never goes back to the
//! idle list. [`maintain`] is the background loop that closes idle and old servers and
//! keeps `min_pool_size` open.

pub mod fleet;
pub mod guard;
pub mod limit;
pub mod lookup;
pub mod maintain;
pub mod params;
pub mod server;
pub mod statements;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{Notify, Semaphore};

use crate::auth::{Credentials, ServerCredentials};
use crate::config::UserConfig;
pub use guard::ServerGuard;
use limit::{LimitMap, Limits};
use params::ParamSet;
use server::{Dial, Server, ServerError, ServerTarget};

/// How many servers one pool may be logging in to at once.
const MAX_CONCURRENT_CONNECTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection available within query_wait_timeout ({0:?})")]
    Timeout(Duration),
    #[error(transparent)]
    Server(#[from] ServerError),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub node: usize,
    pub database: String,
    pub user: String,
}

/// The limits a pool runs with, taken from the config when it is created.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    pub min_size: usize,
    pub wait_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
    /// Servers this pool's user may have open on its node, over all its pools (0: no
    /// limit).
    pub max_user_connections: usize,
    /// Servers this pool's database may have open on its node (0: no limit).
    pub max_db_connections: usize,
}

/// A client's place in a pool's queue. Each session owns one and reuses it for every
/// wait, so waiting allocates nothing: under steady contention every transaction waits.
#[derive(Default)]
pub struct Waiter {
    /// The server (or the error) handed over by whoever served this waiter.
    slot: Mutex<Option<Result<Box<Server>, PoolError>>>,
    notify: Notify,
}

impl Waiter {
    fn take(&self) -> Option<Result<Box<Server>, PoolError>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn hand_over(&self, result: Result<Box<Server>, PoolError>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        self.notify.notify_one();
    }
}

struct Inner {
    /// Servers ready for use; the most recently returned is handed out first.
    /// Boxed so that handing a server between this list, guards and waiters moves a
    /// pointer rather than the whole struct (measurable per transaction).
    #[allow(clippy::vec_box)]
    idle: Vec<Box<Server>>,
    /// Idle + checked out + being opened: what counts against the size.
    total: usize,
    /// Clients waiting for a server, oldest first.
    /// Clients waiting for a server, oldest first, with when they started waiting.
    /// Their `query_wait_timeout` is enforced by [`Pool::expire_waiters`] from the
    /// maintenance loop, so a wait costs no timer of its own.
    waiters: VecDeque<(Instant, Arc<Waiter>)>,
}

pub struct Pool {
    pub key: PoolKey,
    pub target: ServerTarget,
    /// How its servers are reached: TCP, unless its [`Pools`] dial in memory.
    dial: Dial,
    /// The limits it runs with; `RELOAD` replaces them.
    pub settings: arc_swap::ArcSwap<PoolSettings>,
    user: Mutex<UserConfig>,
    credentials: Arc<Credentials>,
    inner: Mutex<Inner>,
    connects: Semaphore,
    /// The parameters a fresh server reports, so clients asking for nothing special
    /// can be greeted without a server round trip.
    defaults: OnceLock<ParamSet>,
    /// Bumped when the node is retired: servers of an older epoch are not reused.
    epoch: std::sync::atomic::AtomicU64,
    /// Servers of an older epoch still in use.
    stale: std::sync::atomic::AtomicUsize,
    /// The user's and the database's server limits on this node, shared with the
    /// other pools of that user or database.
    limits: Limits,
}

/// An idle server, as `SHOW SERVERS` lists it.
#[derive(Debug, Clone)]
pub struct IdleServer {
    pub pid: i32,
    pub connected: std::time::SystemTime,
    pub close_needed: bool,
    pub prepared: usize,
}

/// What a checkout does next. A short-lived stack value: boxing the server to even out
/// the variants would cost an allocation per checkout.
#[allow(clippy::large_enum_variant)]
enum Next {
    Take(Box<Server>),
    Connect,
    Wait,
    /// Wait, the pool having room but its user's or database's limit being reached.
    WaitForLimit,
}

/// Whether a pool may open one more server.
#[derive(Debug, PartialEq, Eq)]
enum Room {
    /// Yes, and it is counted.
    Reserved,
    /// No: the pool is at its size.
    Full,
    /// No: the user's or the database's limit is reached (the pool is blocked on it).
    Limited,
}

impl Pool {
    pub fn new(
        key: PoolKey,
        target: ServerTarget,
        settings: PoolSettings,
        user: UserConfig,
        credentials: Arc<Credentials>,
    ) -> Self {
        Pool {
            key,
            target,
            dial: Dial::Tcp,
            settings: arc_swap::ArcSwap::from_pointee(settings),
            user: Mutex::new(user),
            credentials,
            inner: Mutex::new(Inner {
                idle: Vec::new(),
                total: 0,
                waiters: VecDeque::new(),
            }),
            connects: Semaphore::new(MAX_CONCURRENT_CONNECTS),
            defaults: OnceLock::new(),
            epoch: std::sync::atomic::AtomicU64::new(0),
            stale: std::sync::atomic::AtomicUsize::new(0),
            limits: Limits::default(),
        }
    }

    /// Counts one more server against the pool's size and its limits, if both allow.
    /// Blocked by a limit, the pool is registered to be retried when room is made.
    fn reserve(self: &Arc<Self>, inner: &mut Inner) -> Room {
        let settings = self.settings.load();
        if inner.total >= settings.size {
            return Room::Full;
        }
        let (max_user, max_db) = (settings.max_user_connections, settings.max_db_connections);
        if !self.limits.try_take(max_user, max_db) {
            self.limits.block(self);
            // Room made between the failed take and the registration woke nobody:
            // try once more now that a release will find this pool.
            if !self.limits.try_take(max_user, max_db) {
                return Room::Limited;
            }
        }
        inner.total += 1;
        Room::Reserved
    }

    /// Uncounts one server (one that closed, or a reservation never used).
    fn unreserve(&self, inner: &mut Inner) {
        if inner.total > 0 {
            inner.total -= 1;
            self.limits.put_back();
        }
    }

    /// A limit this pool was blocked on has room: open a server for its waiters.
    fn retry_blocked(self: &Arc<Self>) {
        let mut inner = self.lock();
        if inner.waiters.is_empty() || self.reserve(&mut inner) != Room::Reserved {
            return;
        }
        drop(inner);
        let pool = self.clone();
        tokio::spawn(async move { pool.replace_for_waiters().await });
    }

    /// Closes one idle server to make room under a shared limit; false if none is idle.
    fn close_one_idle(self: &Arc<Self>) -> bool {
        let server = self.lock().idle.pop();
        match server {
            Some(server) => {
                self.forget(Some(server));
                true
            }
            None => false,
        }
    }

    /// New limits and credentials (`RELOAD`): a smaller pool shrinks as servers come
    /// back; servers already open stay.
    pub fn reconfigure(&self, settings: PoolSettings, user: UserConfig) {
        self.settings.store(Arc::new(settings));
        *self.user.lock().unwrap_or_else(|p| p.into_inner()) = user;
    }

    /// The idle servers, for `SHOW SERVERS`.
    pub fn idle_servers(&self) -> Vec<IdleServer> {
        let now = (Instant::now(), std::time::SystemTime::now());
        let epoch = self.epoch.load(std::sync::atomic::Ordering::Relaxed);
        self.lock()
            .idle
            .iter()
            .map(|s| IdleServer {
                pid: s.pid,
                connected: now.1 - now.0.duration_since(s.created),
                close_needed: s.epoch != epoch,
                prepared: s.statements.len(),
            })
            .collect()
    }

    /// Closes the idle servers and marks those in use to be closed when they come
    /// back. Returns how many idle servers closed.
    pub fn retire(self: &Arc<Self>) -> usize {
        let closed = self.close_idle();
        self.epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (idle, total, _) = self.counts();
        self.stale.fetch_add(
            total.saturating_sub(idle),
            std::sync::atomic::Ordering::Relaxed,
        );
        closed
    }

    /// Servers in use that are to be closed when they come back (`WAIT_CLOSE`).
    pub fn close_needed(&self) -> usize {
        self.stale.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `server` was opened before the node was last retired.
    pub(crate) fn retired(&self, server: &Server) -> bool {
        server.epoch != self.epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave Inner half-updated in a way
        // that matters more than stopping the pool would; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn defaults(&self) -> Option<&ParamSet> {
        self.defaults.get()
    }

    /// `(idle, total, waiting)` for the admin console and tests.
    pub fn counts(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.idle.len(), inner.total, inner.waiters.len())
    }

    /// Takes a server, opening one if the pool has room, else waiting in line (as
    /// `waiter`, which must not be waiting in another checkout).
    pub async fn checkout(
        self: &Arc<Self>,
        waiter: &Arc<Waiter>,
    ) -> Result<ServerGuard, PoolError> {
        loop {
            let next = self.next(waiter);
            match next {
                Next::Take(mut server) => {
                    if self.usable(&mut server) {
                        return Ok(ServerGuard::new(server, self.clone()));
                    }
                    self.forget(Some(server));
                }
                Next::Connect => {
                    let reservation = Reservation(self.clone());
                    // Boxed: a connection attempt is rare and its future large, and
                    // every client's task would otherwise carry room for it.
                    let server = Box::pin(self.connect()).await?;
                    std::mem::forget(reservation);
                    return Ok(ServerGuard::new(server, self.clone()));
                }
                Next::Wait | Next::WaitForLimit => {
                    if matches!(next, Next::WaitForLimit) {
                        self.limits.make_room(self);
                    }
                    let server = QueuedGuard { pool: self, waiter }.wait().await?;
                    return Ok(ServerGuard::new(server, self.clone()));
                }
            }
        }
    }

    fn next(self: &Arc<Self>, waiter: &Arc<Waiter>) -> Next {
        let mut inner = self.lock();
        if let Some(server) = inner.idle.pop() {
            return Next::Take(server);
        }
        let room = self.reserve(&mut inner);
        if room == Room::Reserved {
            return Next::Connect;
        }
        inner.waiters.push_back((Instant::now(), waiter.clone()));
        match room {
            Room::Limited => Next::WaitForLimit,
            _ => Next::Wait,
        }
    }

    /// An idle server is usable if it has said nothing since it was returned (a
    /// terminated backend sends FATAL and closes). Age is the maintenance loop's
    /// business (`evict`), so the hot path reads no clock here.
    fn usable(&self, server: &mut Server) -> bool {
        server.conn.is_quiet()
    }

    fn server_credentials(&self) -> ServerCredentials {
        self.credentials
            .for_server(&self.user.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn connect(&self) -> Result<Box<Server>, PoolError> {
        // The semaphore is never closed.
        let _permit = self.connects.acquire().await;
        let server = Server::dial(
            &self.dial,
            &self.target,
            &self.server_credentials(),
            self.settings.load().connect_timeout,
        )
        .await?;
        self.defaults.get_or_init(|| server.params.clone());
        let mut server = Box::new(server);
        server.epoch = self.epoch.load(std::sync::atomic::Ordering::Relaxed);
        Ok(server)
    }

    /// Returns a server that is idle and clean to the first waiter, or the idle list.
    pub(crate) fn give_back(self: &Arc<Self>, server: Box<Server>) {
        self.give_back_at(server, Instant::now());
    }

    /// [`give_back`](Self::give_back) of a server idle since `now`.
    pub(crate) fn give_back_at(self: &Arc<Self>, mut server: Box<Server>, now: Instant) {
        server.idle_since = now;
        let mut inner = self.lock();
        if inner.total > self.settings.load().size {
            // The pool was made smaller (`RELOAD`): this one goes.
            drop(inner);
            self.forget(Some(server));
            return;
        }
        match inner.waiters.pop_front() {
            Some((_, waiter)) => waiter.hand_over(Ok(server)),
            // Another pool of this user or database waits for room under a limit: this
            // idle server closes to make it (PgBouncer does the same).
            None if self.limits.wanted() => {
                drop(inner);
                self.forget(Some(server));
            }
            None => inner.idle.push(server),
        }
    }

    /// Drops one server from the count (closing it, if given) and, if clients are
    /// waiting, opens a replacement for them.
    pub(crate) fn forget(self: &Arc<Self>, server: Option<Box<Server>>) {
        if let Some(server) = server {
            if self.retired(&server) {
                let _ = self.stale.fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |n| n.checked_sub(1),
                );
            }
            close_later(server);
        }
        let mut inner = self.lock();
        self.unreserve(&mut inner);
        if !inner.waiters.is_empty() && self.reserve(&mut inner) == Room::Reserved {
            drop(inner);
            let pool = self.clone();
            tokio::spawn(async move { pool.replace_for_waiters().await });
        } else {
            drop(inner);
            self.limits.wake();
        }
    }

    async fn replace_for_waiters(self: Arc<Self>) {
        match self.connect().await {
            Ok(server) => self.give_back(server),
            Err(err) => {
                if let Some((_, waiter)) = self.lock().waiters.pop_front() {
                    waiter.hand_over(Err(err));
                }
                self.forget(None);
            }
        }
    }

    /// Closes idle servers past `server_idle_timeout` (down to `min_pool_size`) or past
    /// `server_lifetime`, and any that broke while idle. Returns how many were closed.
    pub fn evict(self: &Arc<Self>, now: Instant) -> usize {
        let evicted: Vec<Box<Server>> = {
            let mut inner = self.lock();
            let mut keep = Vec::with_capacity(inner.idle.len());
            let mut out = Vec::new();
            let total = inner.total;
            for mut server in inner.idle.drain(..) {
                let spare = total - out.len() > self.settings.load().min_size;
                let expired = now.duration_since(server.created) >= self.settings.load().lifetime
                    || (spare
                        && now.duration_since(server.idle_since)
                            >= self.settings.load().idle_timeout);
                if expired || !server.conn.is_quiet() {
                    out.push(server);
                } else {
                    keep.push(server);
                }
            }
            inner.idle = keep;
            out
        };
        let count = evicted.len();
        for server in evicted {
            self.forget(Some(server));
        }
        count
    }

    /// Fails the waits that have lasted `query_wait_timeout` (the oldest are first).
    pub fn expire_waiters(&self, now: Instant) {
        let timeout = self.settings.load().wait_timeout;
        let mut inner = self.lock();
        while let Some((since, _)) = inner.waiters.front() {
            if now.saturating_duration_since(*since) < timeout {
                break;
            }
            if let Some((_, waiter)) = inner.waiters.pop_front() {
                waiter.hand_over(Err(PoolError::Timeout(timeout)));
            }
        }
    }

    /// Takes the idle servers out of the pool, uncounted, for a process taking over:
    /// the others close as they come back (the pool is retired).
    pub fn hand_over_idle(self: &Arc<Self>) -> Vec<Box<Server>> {
        let idle = {
            let mut inner = self.lock();
            let idle = std::mem::take(&mut inner.idle);
            for _ in &idle {
                self.unreserve(&mut inner);
            }
            idle
        };
        self.retire();
        idle
    }

    /// Takes an idle server another process handed over, if the pool has room (else
    /// it is closed). Returns whether it was taken.
    pub fn adopt(self: &Arc<Self>, mut server: Box<Server>) -> bool {
        let reserved = self.reserve(&mut self.lock()) == Room::Reserved;
        if !reserved {
            close_later(server);
            return false;
        }
        server.epoch = self.epoch.load(std::sync::atomic::Ordering::Relaxed);
        self.give_back(server);
        true
    }

    /// Closes every idle server (before `DROP DATABASE` of this pool's database).
    pub fn close_idle(self: &Arc<Self>) -> usize {
        let idle: Vec<Box<Server>> = std::mem::take(&mut self.lock().idle);
        let count = idle.len();
        for server in idle {
            self.forget(Some(server));
        }
        count
    }

    /// Opens servers until `min_pool_size` are open (one at a time).
    pub async fn fill_to_min(self: &Arc<Self>) -> Result<(), PoolError> {
        loop {
            {
                let mut inner = self.lock();
                if inner.total >= self.settings.load().min_size
                    || !inner.waiters.is_empty()
                    || self.reserve(&mut inner) != Room::Reserved
                {
                    return Ok(());
                }
            }
            let reservation = Reservation(self.clone());
            let server = self.connect().await?;
            std::mem::forget(reservation);
            self.give_back(server);
        }
    }
}

/// A waiter's time in the queue. Dropped (the checkout timed out or was cancelled), it
/// leaves the queue and passes on a server that was handed over meanwhile.
struct QueuedGuard<'a> {
    pool: &'a Arc<Pool>,
    waiter: &'a Arc<Waiter>,
}

impl QueuedGuard<'_> {
    async fn wait(self) -> Result<Box<Server>, PoolError> {
        loop {
            self.waiter.notify.notified().await;
            if let Some(result) = self.waiter.take() {
                // Served (a server, or the timeout): whoever served it popped it.
                std::mem::forget(self);
                return result;
            }
            // A permit left over from an earlier wait: keep waiting.
        }
    }
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.pool
            .lock()
            .waiters
            .retain(|(_, w)| !Arc::ptr_eq(w, self.waiter));
        // Served between the timeout and the removal: pass the server on.
        if let Some(Ok(server)) = self.waiter.take() {
            self.pool.give_back(server);
        }
    }
}

/// A slot counted in `total` for a server being opened; dropped unused, it frees it.
struct Reservation(Arc<Pool>);

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.forget(None);
    }
}

/// Says goodbye to a server in the background (a Terminate, then close).
fn close_later(server: Box<Server>) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(server.terminate());
    }
}

/// Every pool, by key.
pub struct Pools {
    map: DashMap<PoolKey, Arc<Pool>>,
    /// The server limits per user and per database on each node, shared by their pools.
    limits: LimitMap,
    /// How the pools made here reach their servers (TCP but in benchmarks).
    dial: Dial,
    /// The live instances of this one's fleet, as last counted ([`fleet::watch`]).
    pub fleet_instances: std::sync::atomic::AtomicUsize,
}

impl Default for Pools {
    fn default() -> Self {
        Pools::dialing(Dial::default())
    }
}

impl Pools {
    /// Pools whose servers are reached through `dial` rather than TCP: in-memory
    /// servers for a benchmark.
    pub fn dialing(dial: Dial) -> Pools {
        Pools {
            map: DashMap::new(),
            limits: LimitMap::default(),
            dial,
            fleet_instances: std::sync::atomic::AtomicUsize::new(1),
        }
    }

    pub fn get(&self, key: &PoolKey) -> Option<Arc<Pool>> {
        self.map.get(key).map(|p| p.clone())
    }

    pub fn get_or_create(&self, key: PoolKey, create: impl FnOnce(PoolKey) -> Pool) -> Arc<Pool> {
        if let Some(pool) = self.map.get(&key) {
            return pool.clone();
        }
        self.map
            .entry(key.clone())
            .or_insert_with(|| {
                let mut pool = create(key);
                pool.dial = self.dial.clone();
                pool.limits = self.limits.limits_for(&pool.key);
                let pool = Arc::new(pool);
                pool.limits.join(&pool);
                pool
            })
            .clone()
    }

    /// The shared server limits, for the console and tests.
    pub fn limits(&self) -> &LimitMap {
        &self.limits
    }

    /// Drops the pool of `key` if it has no server and no one waiting: a pool made
    /// for a database the server does not have (a name an unauthenticated client
    /// sent, for `auth_query`) does not stay in the map.
    pub fn forget_unused(&self, key: &PoolKey) {
        self.map.remove_if(key, |_, pool| {
            let (_, total, waiting) = pool.counts();
            total == 0 && waiting == 0
        });
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map.iter().map(|e| e.value().clone()).collect()
    }

    /// A node left service or was demoted: its idle servers close now, and servers
    /// in use close when they come back. Returns how many idle servers closed.
    pub fn retire_node(&self, node: usize) -> usize {
        self.all()
            .iter()
            .filter(|p| p.key.node == node)
            .map(|p| p.retire())
            .sum()
    }

    /// `KILL db`: every pool of the client-facing database `database`, retired.
    pub fn retire_database(&self, database: &str) -> usize {
        self.of_database(Some(database)).map(|p| p.retire()).sum()
    }

    /// Servers in use still to be closed, for `database` or all (`WAIT_CLOSE`).
    pub fn close_needed(&self, database: Option<&str>) -> usize {
        self.of_database(database).map(|p| p.close_needed()).sum()
    }

    /// Servers checked out, for `database` or all (`PAUSE`).
    pub fn in_use(&self, database: Option<&str>) -> usize {
        self.of_database(database)
            .map(|p| {
                let (idle, total, _) = p.counts();
                total - idle
            })
            .sum()
    }

    /// The pools of the client-facing `database`, or all of them.
    fn of_database<'a>(&self, database: Option<&'a str>) -> impl Iterator<Item = Arc<Pool>> + 'a {
        self.all()
            .into_iter()
            .filter(move |p| database.is_none_or(|d| p.key.database == d))
    }

    /// Closes idle servers connected to the server-side database `dbname`.
    pub fn close_idle_for_dbname(&self, dbname: &str) -> usize {
        self.all()
            .iter()
            .filter(|p| p.target.dbname == dbname)
            .map(|p| p.close_idle())
            .sum()
    }
}

pub use maintain::maintain;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    /// A pool that can never open a server (size 0), so every checkout waits.
    fn full_pool(wait_timeout: Duration) -> Arc<Pool> {
        let key = PoolKey {
            node: 0,
            database: "db".into(),
            user: "u".into(),
        };
        let target = ServerTarget {
            host: "127.0.0.1".into(),
            port: 1,
            dbname: "db".into(),
            user: "u".into(),
            tls: Arc::default(),
        };
        let settings = PoolSettings {
            size: 0,
            min_size: 0,
            wait_timeout,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(60),
            max_user_connections: 0,
            max_db_connections: 0,
        };
        let user = UserConfig {
            name: "u".into(),
            password: Secret::Plain("p".into()),
            pool_mode: None,
            pool_size: None,
            auth_type: None,
            max_user_connections: None,
            max_user_client_connections: None,
        };
        Arc::new(Pool::new(key, target, settings, user, Arc::default()))
    }

    #[tokio::test]
    async fn waits_expire_oldest_first_and_leave_the_queue() {
        let pool = full_pool(Duration::from_secs(10));
        let (first, second) = (Arc::new(Waiter::default()), Arc::new(Waiter::default()));
        let a = tokio::spawn({
            let (pool, first) = (pool.clone(), first.clone());
            async move { pool.checkout(&first).await.map(drop) }
        });
        while pool.counts().2 < 1 {
            tokio::task::yield_now().await;
        }
        let b = tokio::spawn({
            let (pool, second) = (pool.clone(), second.clone());
            async move { pool.checkout(&second).await.map(drop) }
        });
        while pool.counts().2 < 2 {
            tokio::task::yield_now().await;
        }
        // Not yet due: nobody leaves.
        pool.expire_waiters(Instant::now());
        assert_eq!(pool.counts().2, 2);
        // Due for both: both fail with the timeout, and the queue is empty.
        pool.expire_waiters(Instant::now() + Duration::from_secs(11));
        assert!(matches!(a.await.expect("task"), Err(PoolError::Timeout(_))));
        assert!(matches!(b.await.expect("task"), Err(PoolError::Timeout(_))));
        assert_eq!(pool.counts(), (0, 0, 0));
    }

    /// Two pools of one user (databases `one` and `two`) under `max_user_connections =
    /// 1`: room taken by one is refused to the other, which is registered as blocked,
    /// until the first gives it back.
    #[tokio::test]
    async fn pools_of_a_user_share_its_limit() {
        let pools = Pools::default();
        let make = |db: &str| {
            let template = full_pool(Duration::from_secs(10));
            let key = PoolKey {
                node: 0,
                database: db.into(),
                user: "u".into(),
            };
            let settings = PoolSettings {
                size: 5,
                max_user_connections: 1,
                ..(**template.settings.load()).clone()
            };
            let user = template.user.lock().expect("user").clone();
            pools.get_or_create(key, |key| {
                Pool::new(key, template.target.clone(), settings, user, Arc::default())
            })
        };
        let (one, two) = (make("one"), make("two"));
        assert_eq!(one.reserve(&mut one.lock()), Room::Reserved);
        assert_eq!(two.reserve(&mut two.lock()), Room::Limited);
        assert!(one.limits.wanted(), "two waits for room");
        assert_eq!(pools.limits().user_open("u", 0), 1);
        assert_eq!(
            pools.limits().db_open("two", 0),
            0,
            "nothing counted for two"
        );
        one.unreserve(&mut one.lock());
        one.limits.wake();
        assert!(!one.limits.wanted());
        assert_eq!(two.reserve(&mut two.lock()), Room::Reserved);
        assert_eq!(pools.limits().user_open("u", 0), 1);
        // Now one is refused: two holds the user's only slot.
        assert_eq!(one.reserve(&mut one.lock()), Room::Limited);
        two.unreserve(&mut two.lock());
        assert_eq!(pools.limits().user_open("u", 0), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_queue() {
        let pool = full_pool(Duration::from_secs(10));
        let waiter = Arc::new(Waiter::default());
        let task = tokio::spawn({
            let (pool, waiter) = (pool.clone(), waiter.clone());
            async move { pool.checkout(&waiter).await.map(drop) }
        });
        while pool.counts().2 < 1 {
            tokio::task::yield_now().await;
        }
        task.abort();
        let _ = task.await;
        assert_eq!(pool.counts().2, 0, "the aborted checkout is still queued");
    }
}
