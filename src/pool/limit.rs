//! Server connection limits shared by several pools: `max_user_connections` (the pools
//! of one user on one node), `max_db_connections` (the pools of one database on one
//! node) and this instance's share of `max_fleet_server_connections` (every pool on one
//! node; the share moves as instances of the fleet come and go, see [`super::fleet`]).
//!
//! A [`ServerLimit`] counts the servers open or being opened by its pools. It is
//! touched only when a pool reserves room to open a server and when a server leaves a
//! pool, never when a server is checked out or released: the per-transaction path does
//! not see it, except for one relaxed load (`wanted`) when a released server would go
//! idle with nobody waiting for it. A pool whose clients wait because a limit is
//! reached registers as blocked; when a server counted by the limit closes, or goes
//! idle in another pool (which then closes it, as PgBouncer does), the blocked pools
//! are retried.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::Pool;

/// Servers counted against one limit, and the pools that wait for room under it.
#[derive(Default)]
pub struct ServerLimit {
    /// Servers open or being opened by the pools sharing this limit.
    open: AtomicUsize,
    /// Pools with clients waiting because this limit was reached.
    blocked: Mutex<Vec<Weak<Pool>>>,
    /// Whether `blocked` is non-empty, read without its lock when a server goes idle.
    wanted: AtomicBool,
    /// Every pool counted here, to find an idle server to close for a blocked pool.
    members: Mutex<Vec<Weak<Pool>>>,
}

impl ServerLimit {
    /// Counts one more server if that keeps within `max` (0: no limit).
    pub fn try_take(&self, max: usize) -> bool {
        if max == 0 {
            self.open.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts one server fewer.
    pub fn put_back(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Servers counted now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn block(&self, pool: &Arc<Pool>) {
        let mut blocked = lock(&self.blocked);
        blocked.retain(|p| p.strong_count() > 0 && !std::ptr::eq(p.as_ptr(), Arc::as_ptr(pool)));
        blocked.push(Arc::downgrade(pool));
        self.wanted.store(true, Ordering::Relaxed);
    }

    fn take_blocked(&self) -> Vec<Weak<Pool>> {
        if !self.wanted.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let mut blocked = lock(&self.blocked);
        self.wanted.store(false, Ordering::Relaxed);
        std::mem::take(&mut *blocked)
    }

    fn join(&self, pool: &Arc<Pool>) {
        let mut members = lock(&self.members);
        members.retain(|p| p.strong_count() > 0);
        members.push(Arc::downgrade(pool));
    }

    fn members(&self) -> Vec<Arc<Pool>> {
        lock(&self.members)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The three limits one pool counts against: its user's, its database's and its
/// node's (this instance's share of the fleet's), on its node.
#[derive(Default, Clone)]
pub struct Limits {
    pub user: Arc<ServerLimit>,
    pub db: Arc<ServerLimit>,
    pub node: Arc<ServerLimit>,
    /// The node limit's max, shared by every node: this instance's share of
    /// `max_fleet_server_connections` (0: no limit).
    pub node_max: Arc<AtomicUsize>,
}

impl Limits {
    /// Counts one more server against every limit, or none.
    pub fn try_take(&self, max_user: usize, max_db: usize) -> bool {
        if !self.user.try_take(max_user) {
            return false;
        }
        if !self.db.try_take(max_db) {
            self.user.put_back();
            return false;
        }
        if !self.node.try_take(self.node_max.load(Ordering::Relaxed)) {
            self.user.put_back();
            self.db.put_back();
            return false;
        }
        true
    }

    pub fn put_back(&self) {
        self.user.put_back();
        self.db.put_back();
        self.node.put_back();
    }

    /// Whether a pool sharing a limit waits for room.
    pub fn wanted(&self) -> bool {
        [&self.user, &self.db, &self.node]
            .iter()
            .any(|limit| limit.wanted.load(Ordering::Relaxed))
    }

    pub(super) fn block(&self, pool: &Arc<Pool>) {
        self.user.block(pool);
        self.db.block(pool);
        self.node.block(pool);
    }

    pub(super) fn join(&self, pool: &Arc<Pool>) {
        self.user.join(pool);
        self.db.join(pool);
        self.node.join(pool);
    }

    /// Room was made under these limits: the blocked pools try again.
    pub(super) fn wake(&self) {
        let mut blocked = self.user.take_blocked();
        blocked.extend(self.db.take_blocked());
        blocked.extend(self.node.take_blocked());
        for pool in blocked.iter().filter_map(Weak::upgrade) {
            pool.retry_blocked();
        }
    }

    /// For `pool`, blocked by a limit: closes an idle server of another pool sharing a
    /// limit that is reached (closing one under a limit with room would not help).
    pub(super) fn make_room(&self, pool: &Arc<Pool>) {
        let settings = pool.settings.load();
        let reached = [
            (&self.user, settings.max_user_connections),
            (&self.db, settings.max_db_connections),
            (&self.node, self.node_max.load(Ordering::Relaxed)),
        ];
        for (limit, max) in reached {
            if max == 0 || limit.open() < max {
                continue;
            }
            for other in limit.members() {
                if !Arc::ptr_eq(&other, pool) && other.close_one_idle() {
                    return;
                }
            }
        }
    }
}

/// The shared limits, one per (user, node), per (database, node) and per node.
#[derive(Default)]
pub struct LimitMap {
    users: dashmap::DashMap<(String, usize), Arc<ServerLimit>>,
    dbs: dashmap::DashMap<(String, usize), Arc<ServerLimit>>,
    nodes: dashmap::DashMap<usize, Arc<ServerLimit>>,
    /// This instance's share of `max_fleet_server_connections` per node (0: none).
    node_max: Arc<AtomicUsize>,
}

impl LimitMap {
    /// The limits of a new pool of `key`'s user and database on its node.
    pub(super) fn limits_for(&self, key: &super::PoolKey) -> Limits {
        Limits {
            user: self
                .users
                .entry((key.user.clone(), key.node))
                .or_default()
                .clone(),
            db: self
                .dbs
                .entry((key.database.clone(), key.node))
                .or_default()
                .clone(),
            node: self.nodes.entry(key.node).or_default().clone(),
            node_max: self.node_max.clone(),
        }
    }

    /// Sets this instance's share of the fleet's server connections per node (0: no
    /// limit); pools that waited for room under a smaller share try again.
    pub fn set_node_max(&self, max: usize) {
        let before = self.node_max.swap(max, Ordering::Relaxed);
        if max == 0 || (before != 0 && max > before) {
            for node in self.nodes.iter() {
                for pool in node.take_blocked().iter().filter_map(Weak::upgrade) {
                    pool.retry_blocked();
                }
            }
        }
    }

    /// This instance's share of the fleet's server connections per node (0: none).
    pub fn node_max(&self) -> usize {
        self.node_max.load(Ordering::Relaxed)
    }

    /// Servers open on `node`, over every pool.
    pub fn node_open(&self, node: usize) -> usize {
        self.nodes.get(&node).map_or(0, |l| l.open())
    }

    /// Servers of `user` open on `node`, for tests and the console.
    pub fn user_open(&self, user: &str, node: usize) -> usize {
        self.users
            .get(&(user.to_owned(), node))
            .map_or(0, |l| l.open())
    }

    /// Servers of `database` open on `node`.
    pub fn db_open(&self, database: &str, node: usize) -> usize {
        self.dbs
            .get(&(database.to_owned(), node))
            .map_or(0, |l| l.open())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_counts_up_to_its_max_and_zero_is_no_limit() {
        let limit = ServerLimit::default();
        assert!(limit.try_take(2));
        assert!(limit.try_take(2));
        assert!(!limit.try_take(2));
        assert_eq!(limit.open(), 2);
        limit.put_back();
        assert!(limit.try_take(2));
        assert!(limit.try_take(0), "0 is no limit, but still counts");
        assert_eq!(limit.open(), 3);
        // A limit lowered by RELOAD below what is open admits nothing until enough close.
        assert!(!limit.try_take(1));
        for _ in 0..5 {
            limit.put_back();
        }
        assert_eq!(limit.open(), 0, "never below zero");
    }

    #[test]
    fn the_node_share_counts_every_pool_and_moves() {
        let map = LimitMap::default();
        let key = |user: &str| super::super::PoolKey {
            node: 0,
            database: "d".into(),
            user: user.into(),
        };
        let (a, b) = (map.limits_for(&key("a")), map.limits_for(&key("b")));
        map.set_node_max(2);
        assert!(a.try_take(0, 0) && b.try_take(0, 0));
        assert!(!a.try_take(0, 0), "two pools of one node share its two");
        assert_eq!((a.user.open(), a.db.open()), (1, 2), "nothing else kept");
        map.set_node_max(3);
        assert!(a.try_take(0, 0));
        assert_eq!(map.node_open(0), 3);
        map.set_node_max(0);
        assert!(b.try_take(0, 0), "0 is no limit");
    }

    #[test]
    fn both_limits_or_neither() {
        let limits = Limits::default();
        assert!(limits.try_take(0, 1));
        // The database is full: the user's count is not kept either.
        assert!(!limits.try_take(0, 1));
        assert_eq!((limits.user.open(), limits.db.open()), (1, 1));
        limits.put_back();
        assert_eq!((limits.user.open(), limits.db.open()), (0, 0));
        assert!(limits.try_take(1, 0));
        assert!(!limits.try_take(1, 0));
        assert_eq!((limits.user.open(), limits.db.open()), (1, 1));
    }
}
