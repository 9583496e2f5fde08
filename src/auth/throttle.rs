//! Failed logins per source address (`limits.auth_failure_limit` in
//! `limits.auth_failure_window`): an address that failed that many times within the
//! window is refused at once until the window that began with its first failure
//! passes. Only failed logins are counted, so a login that succeeds costs one lock and
//! one lookup, and nothing at all when the limit is off.
//!
//! Memory is bounded: at most [`MAX_TRACKED`] addresses are tracked. When the map is
//! full, expired entries are dropped; if it is still full, a new address is not tracked
//! (it is only delayed, by `auth_failure_delay`) and a warning says so. Clocks are the
//! caller's: every method takes `now`, so that the limiter is tested without sleeping.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at once (about 40 bytes each).
pub const MAX_TRACKED: usize = 10_000;

/// One address's failures in its current window.
#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

/// The failed-login counts of source addresses.
#[derive(Debug)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, Failures>>,
    cap: usize,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::with_cap(MAX_TRACKED)
    }
}

impl Throttle {
    pub fn with_cap(cap: usize) -> Throttle {
        Throttle {
            failures: Mutex::new(HashMap::new()),
            cap,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `ip` has used up its `limit` failures in the window (0: no limit).
    pub fn blocked(&self, ip: IpAddr, now: Instant, limit: u32, window: Duration) -> bool {
        if limit == 0 {
            return false;
        }
        let mut failures = self.lock();
        match failures.get(&ip) {
            Some(f) if now.saturating_duration_since(f.since) >= window => {
                failures.remove(&ip);
                false
            }
            Some(f) => f.count >= limit,
            None => false,
        }
    }

    /// Counts a failed login of `ip`. Returns false if the map was full of live
    /// entries and `ip` could not be tracked.
    pub fn failed(&self, ip: IpAddr, now: Instant, limit: u32, window: Duration) -> bool {
        if limit == 0 {
            return true;
        }
        let mut failures = self.lock();
        if !failures.contains_key(&ip) && failures.len() >= self.cap {
            failures.retain(|_, f| now.saturating_duration_since(f.since) < window);
            if failures.len() >= self.cap {
                return false;
            }
        }
        let entry = failures.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
        });
        if now.saturating_duration_since(entry.since) >= window {
            *entry = Failures {
                since: now,
                count: 0,
            };
        }
        entry.count = entry.count.saturating_add(1);
        true
    }

    /// Addresses tracked now (expired ones included until they are next looked at).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn blocks_after_the_limit_until_the_window_passes() {
        let t = Throttle::default();
        let start = Instant::now();
        for _ in 0..3 {
            assert!(!t.blocked(ip(1), start, 3, WINDOW));
            assert!(t.failed(ip(1), start, 3, WINDOW));
        }
        assert!(t.blocked(ip(1), start + Duration::from_secs(59), 3, WINDOW));
        // Another address is not blocked; IPv4 and IPv6 loopback are two sources.
        assert!(!t.blocked(ip(2), start, 3, WINDOW));
        assert!(!t.blocked("::1".parse().unwrap(), start, 3, WINDOW));
        // The window passed: the entry expires and the address starts again.
        assert!(!t.blocked(ip(1), start + WINDOW, 3, WINDOW));
        assert_eq!(t.tracked(), 0);
        assert!(t.failed(ip(1), start + WINDOW, 3, WINDOW));
        assert!(!t.blocked(ip(1), start + WINDOW, 3, WINDOW));
    }

    #[test]
    fn a_failure_after_the_window_starts_a_new_one() {
        let t = Throttle::default();
        let start = Instant::now();
        t.failed(ip(1), start, 2, WINDOW);
        t.failed(ip(1), start + WINDOW, 2, WINDOW);
        assert!(!t.blocked(ip(1), start + WINDOW, 2, WINDOW));
        t.failed(ip(1), start + WINDOW, 2, WINDOW);
        assert!(t.blocked(ip(1), start + WINDOW, 2, WINDOW));
    }

    #[test]
    fn limit_zero_tracks_nothing() {
        let t = Throttle::default();
        let now = Instant::now();
        for _ in 0..100 {
            assert!(t.failed(ip(1), now, 0, WINDOW));
        }
        assert!(!t.blocked(ip(1), now, 0, WINDOW));
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn the_map_is_capped_and_expired_entries_make_room() {
        let t = Throttle::with_cap(4);
        let start = Instant::now();
        for i in 0..4 {
            assert!(t.failed(ip(i), start, 1, WINDOW));
        }
        // Full of live entries: a fifth address is not tracked, the others still are.
        assert!(!t.failed(ip(9), start, 1, WINDOW));
        assert!(!t.blocked(ip(9), start, 1, WINDOW));
        assert!(t.blocked(ip(0), start, 1, WINDOW));
        assert_eq!(t.tracked(), 4);
        // Known addresses are still counted when full.
        assert!(t.failed(ip(0), start, 1, WINDOW));
        // Once the window passed, the expired entries make room.
        let later = start + WINDOW;
        assert!(t.failed(ip(9), later, 1, WINDOW));
        assert_eq!(t.tracked(), 1);
        assert!(t.blocked(ip(9), later, 1, WINDOW));
    }
}
