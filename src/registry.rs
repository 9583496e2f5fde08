//! Who is connected, for the admin console (`SHOW CLIENTS`, `SHOW SERVERS`,
//! `SHOW POOLS`), `KILL`, `PAUSE` and the metrics: one [`ClientEntry`] per logged-in
//! client, and per-database counters (`SHOW STATS`). Sessions update their entry with
//! relaxed atomic stores at transaction boundaries only; readers take a consistent
//! enough picture when asked.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use tokio::sync::watch;

/// What a client is doing, as PgBouncer's `SHOW CLIENTS` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClientState {
    /// Between transactions, holding no server.
    Idle = 0,
    /// Holding a server.
    Active = 1,
    /// Waiting for a server (pool full, a paused database, no primary yet).
    Waiting = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Active => "active",
            ClientState::Waiting => "waiting",
        }
    }

    fn from_u8(v: u8) -> ClientState {
        match v {
            1 => ClientState::Active,
            2 => ClientState::Waiting,
            _ => ClientState::Idle,
        }
    }
}

/// One logged-in client.
#[derive(Debug)]
pub struct ClientEntry {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// A client on a Unix socket: the port its socket file's name carries (0: none).
    pub unix: Option<u16>,
    pub connected: SystemTime,
    /// A session of the admin console.
    pub admin: bool,
    /// `SHOW CLIENTS`' `tls` column; empty (no allocation) for a plaintext client.
    pub tls: Box<str>,
    state: AtomicU8,
    /// When the client last sent a request / began waiting: ms since the registry began.
    request_ms: AtomicU64,
    wait_since_ms: AtomicU64,
    /// The server it holds: node (u32::MAX: none) and backend pid.
    link_node: AtomicU32,
    link_pid: AtomicI32,
    /// Named prepared statements it has (transaction mode).
    pub prepared: AtomicU32,
    /// The pid pgrelay issued it (transaction mode; 0: none), so that
    /// `pg_terminate_backend` of that pid finds it.
    issued_pid: AtomicI32,
    /// What the session is told to do: [`KILLED`] by `KILL` and `pg_terminate_backend`
    /// (it ends at once), [`SHUTTING_DOWN`] by a shutdown (it ends between
    /// transactions). Sticky: a session not waiting yet sees it at its next wait.
    signals: AtomicU8,
    /// The session's task, woken when a signal is raised. One task waits per entry, so
    /// waiting costs two atomic operations per poll rather than a lock and a list.
    signal_waker: AtomicWaker,
}

const KILLED: u8 = 1;
const SHUTTING_DOWN: u8 = 2;

impl ClientEntry {
    pub fn state(&self) -> ClientState {
        ClientState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn link(&self) -> Option<(usize, i32)> {
        let node = self.link_node.load(Ordering::Relaxed);
        (node != u32::MAX).then(|| (node as usize, self.link_pid.load(Ordering::Relaxed)))
    }

    /// Ends the session (`KILL`); a session not waiting yet ends at its next wait.
    pub fn kill(&self) {
        self.raise(KILLED);
    }

    /// Tells the session pgrelay is shutting down: it ends between transactions.
    pub fn shut_down(&self) {
        self.raise(SHUTTING_DOWN);
    }

    /// Resolves once the session is killed.
    pub fn killed(&self) -> impl Future<Output = ()> + '_ {
        let mut registered = None;
        poll_fn(move |cx| self.poll_signal(cx, KILLED, &mut registered))
    }

    /// Resolves once pgrelay is shutting down.
    pub fn shutting_down(&self) -> impl Future<Output = ()> + '_ {
        let mut registered = None;
        poll_fn(move |cx| self.poll_signal(cx, SHUTTING_DOWN, &mut registered))
    }

    /// Whether pgrelay is shutting down (or handing its clients over).
    pub fn is_shutting_down(&self) -> bool {
        self.signals.load(Ordering::Acquire) & SHUTTING_DOWN != 0
    }

    fn raise(&self, signal: u8) {
        self.signals.fetch_or(signal, Ordering::Release);
        self.signal_waker.wake();
    }

    /// `registered` is the waker this future last registered: while no signal has been
    /// raised (a raise takes the registered waker away) and the task's waker is the
    /// same, a poll costs one load and no registration.
    fn poll_signal(
        &self,
        cx: &mut Context<'_>,
        signal: u8,
        registered: &mut Option<Waker>,
    ) -> Poll<()> {
        let raised = self.signals.load(Ordering::Acquire);
        if raised & signal != 0 {
            return Poll::Ready(());
        }
        let current = registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if raised == 0 && current {
            return Poll::Pending;
        }
        self.signal_waker.register(cx.waker());
        if !current {
            *registered = Some(cx.waker().clone());
        }
        // Raised between the check and the registration: its wake may have missed.
        if self.signals.load(Ordering::Acquire) & signal != 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Records the pid pgrelay issued the client.
    pub fn set_issued_pid(&self, pid: i32) {
        self.issued_pid.store(pid, Ordering::Relaxed);
    }
}

/// A client's own handle: it updates its entry and leaves the registry on drop.
pub struct ClientHandle {
    pub entry: Arc<ClientEntry>,
    registry: Arc<Registry>,
}

impl ClientHandle {
    /// The client's request, complete at `at`, waits for a server.
    pub fn waiting(&self, at: Instant) {
        let now = at
            .saturating_duration_since(self.registry.start)
            .as_millis() as u64;
        self.entry.request_ms.store(now, Ordering::Relaxed);
        self.entry.wait_since_ms.store(now, Ordering::Relaxed);
        self.entry
            .state
            .store(ClientState::Waiting as u8, Ordering::Relaxed);
    }

    /// The client holds a server on `node` (backend `pid`).
    pub fn active(&self, node: usize, pid: i32) {
        self.entry.wait_since_ms.store(0, Ordering::Relaxed);
        self.entry.link_pid.store(pid, Ordering::Relaxed);
        self.entry.link_node.store(node as u32, Ordering::Relaxed);
        self.entry
            .state
            .store(ClientState::Active as u8, Ordering::Relaxed);
    }

    /// The client holds nothing.
    pub fn idle(&self) {
        self.entry.wait_since_ms.store(0, Ordering::Relaxed);
        self.entry.link_node.store(u32::MAX, Ordering::Relaxed);
        self.entry
            .state
            .store(ClientState::Idle as u8, Ordering::Relaxed);
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.registry.clients.remove(&self.entry.id);
        if !self.entry.admin {
            uncount_in(&self.registry.per_user, &self.entry.user);
            uncount_in(&self.registry.per_db, &self.entry.database);
        }
    }
}

/// Per-database counters (`SHOW STATS`), resolved once per session.
#[derive(Debug, Default)]
pub struct DbStats {
    pub xacts: AtomicU64,
    pub queries: AtomicU64,
    /// Bytes from clients / to clients.
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// Microseconds spent in transactions (a request routed to its transaction's end).
    pub xact_us: AtomicU64,
    /// Microseconds clients waited for a server.
    pub wait_us: AtomicU64,
}

/// One pool's latency histograms (a pool here is a database and a user, as in
/// PgBouncer), made by the metrics when a session starts so that a transaction only
/// adds to them.
pub struct PoolLatency {
    pub transaction: prometheus::Histogram,
    pub query: prometheus::Histogram,
    pub wait: prometheus::Histogram,
}

/// What a session did in one transaction (or relay run), added at its end.
#[derive(Debug, Default, Clone, Copy)]
pub struct Work {
    pub queries: u64,
    pub received: u64,
    pub sent: u64,
    pub xact: Duration,
    pub wait: Duration,
}

impl DbStats {
    pub fn add(&self, work: &Work, transaction: bool) {
        if transaction {
            self.xacts.fetch_add(1, Ordering::Relaxed);
        }
        self.queries.fetch_add(work.queries, Ordering::Relaxed);
        self.received.fetch_add(work.received, Ordering::Relaxed);
        self.sent.fetch_add(work.sent, Ordering::Relaxed);
        self.xact_us
            .fetch_add(work.xact.as_micros() as u64, Ordering::Relaxed);
        self.wait_us
            .fetch_add(work.wait.as_micros() as u64, Ordering::Relaxed);
    }

    /// The counters, in `SHOW STATS` order: xacts, queries, received, sent, xact_us,
    /// wait_us.
    pub fn totals(&self) -> [u64; 6] {
        [
            self.xacts.load(Ordering::Relaxed),
            self.queries.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
            self.xact_us.load(Ordering::Relaxed),
            self.wait_us.load(Ordering::Relaxed),
        ]
    }
}

/// Every client, the per-database counters, and the paused databases.
#[derive(Debug)]
pub struct Registry {
    next_id: AtomicU64,
    clients: DashMap<u64, Arc<ClientEntry>>,
    stats: DashMap<String, Arc<DbStats>>,
    /// The counters at the start of the current averaging period and the previous
    /// one's averages, by database (`SHOW STATS` avg_* columns).
    averages: Mutex<Averages>,
    start: Instant,
    start_wall: SystemTime,
    /// Paused databases (`None` in the set: everything). Sessions wait on `paused_changed`.
    paused: Mutex<Paused>,
    /// Anything paused at all: the per-request check reads only this.
    any_paused: AtomicBool,
    paused_changed: watch::Sender<u64>,
    /// Clients logged in per user and per database (the console's aside), for
    /// `max_user_client_connections` and `max_db_client_connections`: changed at login
    /// and logout only.
    per_user: DashMap<String, usize>,
    per_db: DashMap<String, usize>,
}

/// Which client limit a login would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOver {
    User,
    Database,
}

/// The client limits a login is counted against (0: no limit).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientLimits {
    pub per_user: usize,
    pub per_db: usize,
}

/// Counts one more under `key` in `counts` if that keeps within `max` (0: no limit).
fn count_in(counts: &DashMap<String, usize>, key: &str, max: usize) -> bool {
    let mut count = counts.entry(key.to_owned()).or_insert(0);
    if max != 0 && *count >= max {
        return false;
    }
    *count += 1;
    true
}

/// Counts one fewer under `key`, forgetting keys that reach zero.
fn uncount_in(counts: &DashMap<String, usize>, key: &str) {
    if let Some(mut count) = counts.get_mut(key) {
        *count = count.saturating_sub(1);
    }
    counts.remove_if(key, |_, count| *count == 0);
}

#[derive(Debug, Default)]
struct Paused {
    all: bool,
    databases: Vec<String>,
}

#[derive(Debug, Default)]
struct Averages {
    at: Option<Instant>,
    base: HashMap<String, [u64; 6]>,
    /// Per database: per-second rates of xacts, queries, received, sent; and the mean
    /// microseconds per transaction and of waiting per transaction.
    last: HashMap<String, [u64; 6]>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            next_id: AtomicU64::new(1),
            clients: DashMap::new(),
            stats: DashMap::new(),
            averages: Mutex::default(),
            start: Instant::now(),
            start_wall: SystemTime::now(),
            paused: Mutex::default(),
            any_paused: AtomicBool::new(false),
            paused_changed: watch::channel(0).0,
            per_user: DashMap::new(),
            per_db: DashMap::new(),
        }
    }
}

/// Details of a new client.
pub struct NewClient<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub application_name: &'a str,
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// On a Unix socket: the port its socket file's name carries (0: none).
    pub unix: Option<u16>,
    pub admin: bool,
    /// The TLS version and cipher suite (`TLSv1.3/TLS13_AES_256_GCM_SHA384`); `""`
    /// for a plaintext client.
    pub tls: &'a str,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The wall-clock time of a registry timestamp.
    pub fn wall(&self, ms: u64) -> SystemTime {
        self.start_wall + Duration::from_millis(ms)
    }

    pub fn register(self: &Arc<Self>, client: NewClient<'_>) -> ClientHandle {
        let limits = ClientLimits::default();
        match self.register_within(client, limits) {
            Ok(handle) => handle,
            Err(_) => unreachable!("no limit to exceed"),
        }
    }

    /// Registers a client if its user and database are within `limits` (the admin
    /// console's clients are not counted); else counts nothing and says which is full.
    pub fn register_within(
        self: &Arc<Self>,
        client: NewClient<'_>,
        limits: ClientLimits,
    ) -> Result<ClientHandle, ClientOver> {
        if !client.admin {
            if !count_in(&self.per_user, client.user, limits.per_user) {
                return Err(ClientOver::User);
            }
            if !count_in(&self.per_db, client.database, limits.per_db) {
                uncount_in(&self.per_user, client.user);
                return Err(ClientOver::Database);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ClientEntry {
            id,
            user: client.user.to_owned(),
            database: client.database.to_owned(),
            application_name: client.application_name.to_owned(),
            addr: client.addr,
            local: client.local,
            unix: client.unix,
            connected: SystemTime::now(),
            admin: client.admin,
            tls: client.tls.into(),
            state: AtomicU8::new(ClientState::Idle as u8),
            request_ms: AtomicU64::new(self.now_ms()),
            wait_since_ms: AtomicU64::new(0),
            link_node: AtomicU32::new(u32::MAX),
            link_pid: AtomicI32::new(0),
            prepared: AtomicU32::new(0),
            issued_pid: AtomicI32::new(0),
            signals: AtomicU8::new(0),
            signal_waker: AtomicWaker::new(),
        });
        self.clients.insert(id, entry.clone());
        Ok(ClientHandle {
            entry,
            registry: self.clone(),
        })
    }

    /// Clients of `user` logged in now (the console's aside).
    pub fn clients_of_user(&self, user: &str) -> usize {
        self.per_user.get(user).map_or(0, |c| *c)
    }

    /// Clients of `database` logged in now.
    pub fn clients_of_db(&self, database: &str) -> usize {
        self.per_db.get(database).map_or(0, |c| *c)
    }

    /// The client pgrelay issued `pid` to. A scan of every client: it serves only
    /// `pg_terminate_backend`, which is rare.
    pub fn issued_to(&self, pid: i32) -> Option<Arc<ClientEntry>> {
        if pid == 0 {
            return None;
        }
        self.clients
            .iter()
            .find(|c| c.issued_pid.load(Ordering::Relaxed) == pid)
            .map(|c| c.value().clone())
    }

    /// Every client, oldest first.
    pub fn clients(&self) -> Vec<Arc<ClientEntry>> {
        let mut all: Vec<_> = self.clients.iter().map(|e| e.value().clone()).collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// When `entry` last sent a request, and how long it has waited (if waiting).
    pub fn times(&self, entry: &ClientEntry) -> (SystemTime, Option<Duration>) {
        let request = self.wall(entry.request_ms.load(Ordering::Relaxed));
        let since = entry.wait_since_ms.load(Ordering::Relaxed);
        let wait = (entry.state() == ClientState::Waiting)
            .then(|| Duration::from_millis(self.now_ms().saturating_sub(since)));
        (request, wait)
    }

    pub fn db_stats(&self, database: &str) -> Arc<DbStats> {
        if let Some(stats) = self.stats.get(database) {
            return stats.clone();
        }
        self.stats.entry(database.to_owned()).or_default().clone()
    }

    /// Totals by database, sorted by name.
    pub fn all_stats(&self) -> Vec<(String, [u64; 6])> {
        let mut all: Vec<_> = self
            .stats
            .iter()
            .map(|e| (e.key().clone(), e.value().totals()))
            .collect();
        all.sort();
        all
    }

    /// Per-database averages over the last period of at least `period` (PgBouncer's
    /// avg_* columns): rates per second of transactions, queries, bytes received and
    /// sent; mean microseconds per transaction and waiting per transaction.
    pub fn averages(&self, period: Duration) -> HashMap<String, [u64; 6]> {
        let mut avg = self.averages.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = avg.at.map(|at| now - at);
        if elapsed.is_none_or(|e| e >= period) {
            let secs = elapsed.map_or(0.0, |e| e.as_secs_f64());
            let current: HashMap<String, [u64; 6]> = self.all_stats().into_iter().collect();
            let mut last = HashMap::new();
            for (db, now_totals) in &current {
                let base = avg.base.get(db).copied().unwrap_or_default();
                let d: Vec<u64> = (0..6)
                    .map(|i| now_totals[i].saturating_sub(base[i]))
                    .collect();
                let rate = |v: u64| {
                    if secs > 0.0 {
                        (v as f64 / secs) as u64
                    } else {
                        0
                    }
                };
                let per_xact = |v: u64| v.checked_div(d[0]).unwrap_or(0);
                last.insert(
                    db.clone(),
                    [
                        rate(d[0]),
                        rate(d[1]),
                        rate(d[2]),
                        rate(d[3]),
                        per_xact(d[4]),
                        per_xact(d[5]),
                    ],
                );
            }
            if elapsed.is_some() {
                avg.last = last;
            }
            avg.base = current;
            avg.at = Some(now);
        }
        avg.last.clone()
    }

    /// Whether requests for `database` must wait (`PAUSE`, `KILL`).
    pub fn is_paused(&self, database: &str) -> bool {
        if !self.any_paused.load(Ordering::Relaxed) {
            return false;
        }
        let paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        paused.all || paused.databases.iter().any(|d| d == database)
    }

    /// Pauses `database` (or everything); returns false if it already was.
    pub fn pause(&self, database: Option<&str>) -> bool {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match database {
            None => !std::mem::replace(&mut paused.all, true),
            Some(db) if paused.databases.iter().any(|d| d == db) => false,
            Some(db) => {
                paused.databases.push(db.to_owned());
                true
            }
        };
        self.any_paused.store(true, Ordering::Relaxed);
        drop(paused);
        self.paused_changed.send_modify(|g| *g += 1);
        changed
    }

    /// Resumes `database` (or everything); returns false if it was not paused.
    pub fn resume(&self, database: Option<&str>) -> bool {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match database {
            None => {
                let was = paused.all || !paused.databases.is_empty();
                paused.all = false;
                paused.databases.clear();
                was
            }
            Some(db) => {
                let before = paused.databases.len();
                paused.databases.retain(|d| d != db);
                before != paused.databases.len()
            }
        };
        self.any_paused.store(
            paused.all || !paused.databases.is_empty(),
            Ordering::Relaxed,
        );
        drop(paused);
        self.paused_changed.send_modify(|g| *g += 1);
        changed
    }

    /// Waits while `database` is paused.
    pub async fn wait_resumed(&self, database: &str) {
        let mut changes = self.paused_changed.subscribe();
        while self.is_paused(database) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Clients of `database` (all with `None`) that hold a server.
    pub fn active_in(&self, database: Option<&str>) -> usize {
        self.clients
            .iter()
            .filter(|c| !c.admin && database.is_none_or(|d| c.database == d))
            .filter(|c| c.state() == ClientState::Active)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_come_and_go_with_their_state() {
        let registry = Arc::new(Registry::default());
        let new = |db: &'static str| NewClient {
            user: "app",
            database: db,
            application_name: "",
            addr: None,
            local: None,
            unix: None,
            admin: false,
            tls: "",
        };
        let a = registry.register(new("app"));
        let b = registry.register(new("other"));
        assert_eq!(registry.clients().len(), 2);
        a.waiting(Instant::now());
        assert_eq!(a.entry.state(), ClientState::Waiting);
        assert!(registry.times(&a.entry).1.is_some());
        a.active(1, 4242);
        assert_eq!(a.entry.link(), Some((1, 4242)));
        assert_eq!(registry.active_in(Some("app")), 1);
        assert_eq!(registry.active_in(Some("other")), 0);
        a.idle();
        assert_eq!(a.entry.link(), None);
        drop(b);
        assert_eq!(registry.clients().len(), 1);
    }

    #[test]
    fn client_limits_count_logins_per_user_and_database() {
        let registry = Arc::new(Registry::default());
        let new = |user: &'static str, db: &'static str, admin: bool| NewClient {
            user,
            database: db,
            application_name: "",
            addr: None,
            local: None,
            unix: None,
            admin,
            tls: "",
        };
        let limits = ClientLimits {
            per_user: 2,
            per_db: 3,
        };
        let a = registry.register_within(new("app", "one", false), limits);
        let b = registry.register_within(new("app", "two", false), limits);
        assert!(a.is_ok() && b.is_ok());
        let over = registry.register_within(new("app", "one", false), limits);
        assert_eq!(over.err(), Some(ClientOver::User));
        // The refused login counted nothing.
        assert_eq!(registry.clients_of_db("one"), 1);
        let c = registry.register_within(new("bob", "one", false), limits);
        let d = registry.register_within(new("eve", "one", false), limits);
        assert!(c.is_ok() && d.is_ok());
        let over = registry.register_within(new("max", "one", false), limits);
        assert_eq!(over.err(), Some(ClientOver::Database));
        assert_eq!(
            registry.clients_of_user("max"),
            0,
            "uncounted when the db is full"
        );
        // The console's clients are not counted.
        assert!(registry
            .register_within(new("app", "pgrelay", true), limits)
            .is_ok());
        // A client leaving frees its slots.
        drop(a);
        assert_eq!(registry.clients_of_user("app"), 1);
        assert_eq!(registry.clients_of_db("one"), 2);
        assert!(registry
            .register_within(new("app", "one", false), limits)
            .is_ok());
    }

    #[test]
    fn pause_and_resume_by_database() {
        let registry = Registry::default();
        assert!(registry.pause(Some("app")));
        assert!(!registry.pause(Some("app")));
        assert!(registry.is_paused("app") && !registry.is_paused("other"));
        assert!(registry.pause(None));
        assert!(registry.is_paused("other"));
        assert!(registry.resume(None));
        assert!(!registry.is_paused("app"));
        assert!(!registry.resume(Some("app")));
    }

    #[test]
    fn stats_add_up_and_average() {
        let registry = Registry::default();
        let stats = registry.db_stats("app");
        let work = Work {
            queries: 3,
            received: 100,
            sent: 200,
            xact: Duration::from_micros(500),
            wait: Duration::from_micros(20),
        };
        stats.add(&work, true);
        stats.add(&work, true);
        assert_eq!(
            registry.all_stats(),
            [("app".to_owned(), [2, 6, 200, 400, 1000, 40])]
        );
        assert!(
            registry.averages(Duration::ZERO).is_empty(),
            "the first call starts the first period"
        );
        stats.add(&work, true);
        let avg = registry.averages(Duration::ZERO);
        assert_eq!(avg["app"][4], 500, "mean transaction time");
        assert_eq!(avg["app"][5], 20, "mean wait");
    }
}
