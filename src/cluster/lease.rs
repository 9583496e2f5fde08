//! One failover decision in a fleet (`failover.lease = "etcd"`): of the pgrelays
//! watching one cluster, only the holder of a lease in etcd runs the failover hooks
//! ([`super::hooks`] asks [`Lease::permit`] before each). No consensus of our own:
//! etcd's v3 API through its JSON gateway ([`super::etcd`]).
//!
//! [`run`] is the campaign loop. Not holding, it reads `lease_key` every `lease_ttl / 3`
//! and, when the key is gone, grants a lease of `lease_ttl` and puts the key (our
//! [`Identity`]) with it in one transaction that succeeds only if the key still does not
//! exist. Holding, it keeps the lease alive every `lease_ttl / 3`, and believes it holds
//! only until the last keepalive it *sent* plus the TTL etcd gave, less a margin: a
//! holder cut off from etcd stops acting before etcd lets the key go to another. At
//! shutdown the lease is revoked so another instance takes over at once.
//!
//! etcd unreachable: nobody can win the key, so no hook runs anywhere (never two
//! promotions); a warning is logged once per outage. The hooks an instance could not
//! run are kept as deferred; when it acquires the lease it runs those seen within
//! [`deferral_window`] unless a done-record (`<lease_key>/done/<hook>/<node>`, written
//! by whoever ran it) says it ran since ([`verdict`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::etcd::{Claim, Etcd, EtcdError};
use super::hooks::HookKind;
use crate::config::{Config, LeaseKind};

/// Who an instance is, as the lease key's value says it: `instance_id` for the fleet,
/// host name and pid for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub instance: u16,
    pub host: String,
    pub pid: u32,
}

impl Identity {
    pub fn of_this_process(instance: u16) -> Identity {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Identity {
            instance,
            host: host.trim().to_owned(),
            pid: std::process::id(),
        }
    }

    /// How a key's value reads in logs and `SHOW LEASE`: the identity, or the raw
    /// value if another program wrote it.
    pub fn describe_value(value: &[u8]) -> String {
        match serde_json::from_slice::<Identity>(value) {
            Ok(identity) => identity.to_string(),
            Err(_) => String::from_utf8_lossy(value).into_owned(),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, pid {})", self.instance, self.host, self.pid)
    }
}

/// What a hook's run records in etcd: who ran it, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoneRecord {
    pub instance: u16,
    pub at_unix_ms: u64,
}

/// Whether a hook may run now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permit {
    /// `lease = "none"`: every instance runs its hooks.
    Free,
    /// This instance holds the lease: run it, then record it done.
    Held,
    /// Another instance (or nobody that can be known) holds it: keep it deferred.
    Deferred { holder: String },
}

/// What to do with a deferred hook once this instance holds the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Run,
    /// The holder ran it (or a later one for the same node) after it was seen.
    AlreadyDone(DoneRecord),
    /// Seen longer ago than the window: too old to act on.
    Stale,
}

/// The decision for a hook deferred at `seen_ms`, at `now_ms` (Unix milliseconds),
/// given the done-record of its hook and node. A done-record counts if it is newer than
/// `seen - window`: the holder may have seen (and acted on) the same failure up to a
/// detection time before this instance did. Clocks of the fleet are assumed in step
/// within a fraction of the window.
pub fn verdict(seen_ms: u64, now_ms: u64, window: Duration, done: Option<DoneRecord>) -> Verdict {
    let window_ms = window.as_millis() as u64;
    if now_ms.saturating_sub(seen_ms) > window_ms {
        return Verdict::Stale;
    }
    match done {
        Some(record) if record.at_unix_ms > seen_ms.saturating_sub(window_ms) => {
            Verdict::AlreadyDone(record)
        }
        _ => Verdict::Run,
    }
}

/// How long a deferred hook stays worth running: the lease's TTL (a dead holder's
/// lease must lapse first) plus the time the health check takes to call a node down
/// (a probe per `max_retries + 1` periods, the retry delays, and a probe's timeout).
pub fn deferral_window(config: &Config) -> Duration {
    let h = &config.health_check;
    let probes = h.max_retries.saturating_add(1);
    config.failover.lease_ttl + h.period * probes + h.retry_delay * h.max_retries + h.timeout
}

/// Unix milliseconds of `time`.
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where this instance stands.
#[derive(Debug, Clone, PartialEq)]
enum Holding {
    /// `lease = "none"`, or not campaigning (shut down).
    Off,
    /// etcd could not be read: nobody is known to hold it.
    Unknown,
    /// Ours (lease `id`, bound to `key`), believed until `valid_until`.
    Held {
        id: i64,
        key: String,
        valid_until: Instant,
    },
    /// Someone else's (`None`: free at the last look).
    Other { holder: Option<String> },
}

/// The failover lease of this instance, shared by the campaign loop, the hook runner,
/// the console and the metrics.
pub struct Lease {
    /// Read each round: the lease settings follow reloads.
    config: Arc<ArcSwap<Config>>,
    identity: Identity,
    state: Mutex<Holding>,
    /// True while held; the hook runner runs its deferred hooks when it turns true.
    held: watch::Sender<bool>,
    /// Set by [`Lease::release`]: campaign no more.
    closed: AtomicBool,
}

/// What `SHOW LEASE` shows.
#[derive(Debug, Clone)]
pub struct LeaseView {
    pub kind: LeaseKind,
    pub key: String,
    pub holder: String,
    pub this_instance: String,
    pub held: bool,
    pub ttl: Duration,
    /// Until this instance stops believing it holds (holding only).
    pub expires_in: Option<Duration>,
}

impl Lease {
    pub fn new(config: Arc<ArcSwap<Config>>, instance: u16) -> Lease {
        Lease {
            config,
            identity: Identity::of_this_process(instance),
            state: Mutex::new(Holding::Off),
            held: watch::channel(false).0,
            closed: AtomicBool::new(false),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    fn state(&self) -> Holding {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, next: Holding) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let was = match *state {
            Holding::Held { valid_until, .. } => Some(Instant::now() < valid_until),
            _ => None,
        };
        let now = matches!(next, Holding::Held { .. });
        let key = &self.config.load().failover.lease_key;
        if was.is_some() && !now {
            tracing::warn!(%key, "failover lease no longer held; hooks are deferred");
        } else if now && was.is_none() {
            tracing::info!(%key, identity = %self.identity, "failover lease acquired; this instance runs the hooks");
        }
        *state = next;
        drop(state);
        if now && was != Some(true) {
            // Acquired, or renewed after it lapsed (no keepalive answered in time):
            // the hooks deferred meanwhile get their turn.
            self.held.send_replace(true);
        } else if !now {
            self.held
                .send_if_modified(|held| std::mem::replace(held, false));
        }
    }

    /// Whether this instance holds the lease now (and may act).
    pub fn holds(&self) -> bool {
        matches!(self.state(), Holding::Held { valid_until, .. } if Instant::now() < valid_until)
    }

    /// Turns true each time this instance acquires the lease.
    pub fn watch_held(&self) -> watch::Receiver<bool> {
        self.held.subscribe()
    }

    /// Whether a hook may run now.
    pub fn permit(&self) -> Permit {
        if self.config.load().failover.lease == LeaseKind::None {
            return Permit::Free;
        }
        let holder = match self.state() {
            Holding::Held { valid_until, .. } if Instant::now() < valid_until => {
                return Permit::Held
            }
            Holding::Held { .. } => "nobody known (this instance's lease lapsed)".to_owned(),
            Holding::Other { holder: Some(h) } => h,
            Holding::Other { holder: None } => "nobody".to_owned(),
            Holding::Off | Holding::Unknown => "unknown (etcd not reached)".to_owned(),
        };
        Permit::Deferred { holder }
    }

    /// How long a deferred hook stays worth running, under the current config.
    pub fn deferral_window(&self) -> Duration {
        deferral_window(&self.config.load())
    }

    pub fn view(&self) -> LeaseView {
        let config = self.config.load();
        let failover = &config.failover;
        let state = self.state();
        let now = Instant::now();
        let (holder, expires_in) = match &state {
            Holding::Held { valid_until, .. } => (
                self.identity.to_string(),
                Some(valid_until.saturating_duration_since(now)),
            ),
            Holding::Other { holder } => (holder.clone().unwrap_or_default(), None),
            Holding::Off | Holding::Unknown => (String::new(), None),
        };
        LeaseView {
            kind: failover.lease,
            key: failover.lease_key.clone(),
            holder,
            this_instance: self.identity.to_string(),
            held: self.holds(),
            ttl: failover.lease_ttl,
            expires_in,
        }
    }

    /// One round of the campaign: keep the lease if held, else campaign for it.
    async fn round(&self, config: &Config) -> Result<(), EtcdError> {
        let etcd = Etcd::new(&config.failover)?;
        match self.state() {
            Holding::Held {
                id,
                key,
                valid_until,
            } if key == config.failover.lease_key => self.keep(&etcd, id, key, valid_until).await,
            Holding::Held { .. } => {
                // A reload changed the key: the old one is no longer this fleet's.
                self.give_back().await;
                self.campaign(&etcd, config).await
            }
            _ => self.campaign(&etcd, config).await,
        }
    }

    async fn keep(
        &self,
        etcd: &Etcd,
        id: i64,
        key: String,
        valid_until: Instant,
    ) -> Result<(), EtcdError> {
        let sent = Instant::now();
        match etcd.keep_alive(id).await {
            Ok(ttl) if ttl > 0 => {
                self.set(Holding::Held {
                    id,
                    key,
                    valid_until: sent + believed(Duration::from_secs(ttl)),
                });
                Ok(())
            }
            Ok(_) => {
                self.set(Holding::Other { holder: None });
                Ok(())
            }
            Err(err) => {
                if Instant::now() >= valid_until {
                    self.set(Holding::Unknown);
                }
                Err(err)
            }
        }
    }

    async fn campaign(&self, etcd: &Etcd, config: &Config) -> Result<(), EtcdError> {
        let key = &config.failover.lease_key;
        let result = async {
            if let Some(value) = etcd.get(key).await? {
                let holder = Identity::describe_value(&value);
                self.set(Holding::Other {
                    holder: Some(holder),
                });
                return Ok(());
            }
            let sent = Instant::now();
            let (id, ttl) = etcd.grant(config.failover.lease_ttl).await?;
            let value = serde_json::to_vec(&self.identity)?;
            let claim = etcd.claim(key, &value, id).await;
            if !matches!(claim, Ok(Claim::Won)) || self.closed.load(Ordering::SeqCst) {
                // Ours is not bound to the key: give it back rather than let it linger.
                let _ = etcd.revoke(id).await;
            }
            match claim? {
                Claim::Won if !self.closed.load(Ordering::SeqCst) => {
                    let valid_until = sent + believed(ttl);
                    let key = key.clone();
                    self.set(Holding::Held {
                        id,
                        key,
                        valid_until,
                    });
                }
                Claim::Won => {}
                Claim::Taken(value) => self.set(Holding::Other {
                    holder: value.as_deref().map(Identity::describe_value),
                }),
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            self.set(Holding::Unknown);
        }
        result
    }

    /// Gives the lease back (graceful shutdown): another instance can take it at its
    /// next look instead of after the TTL. Campaigns no more.
    pub async fn release(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.give_back().await;
    }

    /// Revokes the lease if held (shutdown, a reload that changed the key or turned the
    /// lease off); this instance then holds nothing.
    async fn give_back(&self) {
        let id = match self.state() {
            Holding::Held { id, .. } => Some(id),
            _ => None,
        };
        self.set(Holding::Off);
        let Some(id) = id else { return };
        let config = self.config.load_full();
        let revoked = match Etcd::new(&config.failover) {
            Ok(etcd) => etcd.revoke(id).await,
            Err(err) => Err(err),
        };
        match revoked {
            Ok(()) => tracing::info!("failover lease released"),
            Err(err) => {
                tracing::warn!(%err, "failover lease not released; it lapses after lease_ttl")
            }
        }
    }

    /// Records that this instance ran `kind` for `node` (`<lease_key>/done/...`).
    pub async fn record_done(&self, kind: HookKind, node: Option<usize>) -> Result<(), EtcdError> {
        let config = self.config.load_full();
        let etcd = Etcd::new(&config.failover)?;
        let record = DoneRecord {
            instance: self.identity.instance,
            at_unix_ms: unix_ms(SystemTime::now()),
        };
        let key = done_key(&config.failover.lease_key, kind, node);
        etcd.put(&key, &serde_json::to_vec(&record)?).await
    }

    /// The last done-record of `kind` for `node`, if any.
    pub async fn done_record(
        &self,
        kind: HookKind,
        node: Option<usize>,
    ) -> Result<Option<DoneRecord>, EtcdError> {
        let config = self.config.load_full();
        let etcd = Etcd::new(&config.failover)?;
        let key = done_key(&config.failover.lease_key, kind, node);
        let value = etcd.get(&key).await?;
        // Someone else's writing there is no record of ours: as if none.
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }
}

/// How long after sending a keepalive (or grant) this instance believes it holds:
/// the TTL etcd gave, less a margin for clock drift and a slow answer, so it stops
/// acting before etcd can give the key to another.
fn believed(ttl: Duration) -> Duration {
    let margin = (ttl / 5).max(Duration::from_millis(300));
    ttl.saturating_sub(margin)
}

/// `<lease_key>/done/<hook>/<node>`.
pub fn done_key(lease_key: &str, kind: HookKind, node: Option<usize>) -> String {
    let node = node.map_or_else(|| "-1".to_owned(), |n| n.to_string());
    format!("{lease_key}/done/{}/{node}", kind.as_str())
}

/// Runs the campaign until shutdown (each round reads the config: `lease = "none"`
/// makes it idle), then releases the lease.
pub async fn run(lease: Arc<Lease>, mut shutdown: watch::Receiver<bool>) {
    let mut outage = false;
    loop {
        if lease.closed.load(Ordering::SeqCst) || *shutdown.borrow() {
            break;
        }
        let config = lease.config.load_full();
        let pause = if config.failover.lease == LeaseKind::Etcd {
            let result = lease.round(&config).await;
            note_outage(&result, &mut outage);
            config.failover.lease_ttl / 3
        } else {
            lease.give_back().await;
            Duration::from_secs(1)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => {}
        }
    }
    lease.release().await;
}

/// Logs an etcd outage once, and its end.
fn note_outage(result: &Result<(), EtcdError>, outage: &mut bool) {
    match result {
        Err(err) if !*outage => {
            tracing::warn!(%err, "etcd unreachable: no instance can hold the failover lease; hooks are deferred until it answers");
            *outage = true;
        }
        Ok(()) if *outage => {
            tracing::info!("etcd answers again; campaigning for the failover lease");
            *outage = false;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn identities_read_back_from_the_key() {
        let me = Identity {
            instance: 3,
            host: "pod-a".into(),
            pid: 42,
        };
        let value = serde_json::to_vec(&me).expect("json");
        assert_eq!(
            serde_json::from_slice::<Value>(&value).expect("json"),
            json!({"instance": 3, "host": "pod-a", "pid": 42})
        );
        assert_eq!(Identity::describe_value(&value), "3 (pod-a, pid 42)");
        assert_eq!(Identity::describe_value(b"someone"), "someone");
    }

    #[test]
    fn done_records_and_their_keys() {
        let record = DoneRecord {
            instance: 2,
            at_unix_ms: 1_700_000_000_123,
        };
        assert_eq!(
            serde_json::to_value(record).expect("json"),
            json!({"instance": 2, "at_unix_ms": 1_700_000_000_123u64})
        );
        assert_eq!(
            done_key("/pgrelay/failover", HookKind::Failover, Some(0)),
            "/pgrelay/failover/done/failover_command/0"
        );
        assert_eq!(
            done_key("/k", HookKind::FollowPrimary, None),
            "/k/done/follow_primary_command/-1"
        );
    }

    #[test]
    fn deferred_hooks_run_unless_done_since_or_stale() {
        let window = Duration::from_secs(8);
        let seen = 1_000_000;
        let done = |at_unix_ms| {
            Some(DoneRecord {
                instance: 1,
                at_unix_ms,
            })
        };
        // Nobody ran it: the new holder does.
        assert_eq!(verdict(seen, seen + 3_000, window, None), Verdict::Run);
        // The holder ran it, before or after this instance saw the failure.
        let before = done(seen - 2_000);
        assert_eq!(
            verdict(seen, seen + 3_000, window, before),
            Verdict::AlreadyDone(DoneRecord {
                instance: 1,
                at_unix_ms: seen - 2_000
            })
        );
        assert!(matches!(
            verdict(seen, seen + 3_000, window, done(seen + 500)),
            Verdict::AlreadyDone(_)
        ));
        // A record of an earlier failover of the same node does not count.
        assert_eq!(
            verdict(seen, seen + 3_000, window, done(seen - 60_000)),
            Verdict::Run
        );
        // Too old to act on, done or not.
        assert_eq!(verdict(seen, seen + 8_001, window, None), Verdict::Stale);
    }

    #[test]
    fn the_window_covers_the_ttl_and_the_detection() {
        let config = Config::from_toml_str(
            "[[backends]]\nhost = \"h\"\n[health_check]\nperiod = \"1s\"\ntimeout = \"500ms\"\n\
             max_retries = 2\nretry_delay = \"200ms\"\n[failover]\nlease_ttl = \"3s\"\n",
        )
        .expect("config");
        // 3s + 3 × 1s + 2 × 200ms + 500ms
        assert_eq!(deferral_window(&config), Duration::from_millis(6_900));
        assert_eq!(believed(Duration::from_secs(10)), Duration::from_secs(8));
        assert_eq!(believed(Duration::from_secs(1)), Duration::from_millis(700));
    }

    /// etcd unreachable: the round fails, nobody is known to hold the lease, and hooks
    /// are deferred (fail safe: never two promotions).
    #[tokio::test]
    async fn unreachable_etcd_holds_nothing() {
        let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = unused.local_addr().expect("addr").port();
        drop(unused);
        let text = format!(
            "[[backends]]\nhost = \"h\"\n[failover]\nlease = \"etcd\"\n\
             lease_endpoints = [\"http://127.0.0.1:{port}\"]\nlease_ttl = \"2s\"\n"
        );
        let config = Config::from_toml_str(&text).expect("config");
        let lease = Lease::new(Arc::new(ArcSwap::from_pointee(config.clone())), 1);
        let err = lease.round(&config).await.expect_err("nothing listens");
        assert!(
            matches!(err, EtcdError::NoneAnswered(ref each) if each.len() == 1),
            "{err}"
        );
        assert!(!lease.holds());
        assert_eq!(
            lease.permit(),
            Permit::Deferred {
                holder: "unknown (etcd not reached)".into()
            }
        );
        let mut outage = false;
        note_outage(&Err(err), &mut outage);
        assert!(outage, "warned once, then quiet until etcd answers");
        note_outage(&Ok(()), &mut outage);
        assert!(!outage);
    }

    /// With `lease = "none"` hooks run everywhere; with etcd, only once held.
    #[tokio::test(start_paused = true)]
    async fn permits_follow_the_holding() {
        let mut config = Config::from_toml_str("[[backends]]\nhost = \"h\"\n").expect("config");
        let shared = Arc::new(ArcSwap::from_pointee(config.clone()));
        let lease = Lease::new(shared.clone(), 7);
        assert_eq!(lease.permit(), Permit::Free);
        config.failover.lease = LeaseKind::Etcd;
        shared.store(Arc::new(config));
        assert!(matches!(lease.permit(), Permit::Deferred { .. }));
        let mut acquired = lease.watch_held();
        let valid_until = Instant::now() + Duration::from_secs(2);
        lease.set(Holding::Held {
            id: 1,
            key: "/k".into(),
            valid_until,
        });
        assert!(acquired.has_changed().expect("open") && *acquired.borrow_and_update());
        assert_eq!(lease.permit(), Permit::Held);
        assert!(lease.view().held);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!lease.holds(), "a lapsed lease is not held");
        assert!(matches!(lease.permit(), Permit::Deferred { .. }));
        let renew = |lease: &Lease| {
            lease.set(Holding::Held {
                id: 1,
                key: "/k".into(),
                valid_until: Instant::now() + Duration::from_secs(2),
            })
        };
        renew(&lease);
        assert!(
            acquired.has_changed().expect("open") && *acquired.borrow_and_update(),
            "renewed after a lapse: acquired again, deferred hooks get their turn"
        );
        renew(&lease);
        assert!(
            !acquired.has_changed().expect("open"),
            "a renewal in time is no news"
        );
        lease.set(Holding::Other {
            holder: Some("2 (pod-b, pid 9)".into()),
        });
        assert_eq!(
            lease.permit(),
            Permit::Deferred {
                holder: "2 (pod-b, pid 9)".into()
            }
        );
    }
}
