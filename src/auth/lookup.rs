//! Secrets of users the config does not list (`auth_query`, as PgBouncer's): the
//! [`SecretSource`] that fetches one, and the [`SecretCache`] in front of it.
//!
//! The fetch is a server round trip, which this floor may not make: the session passes
//! a [`SecretSource`] into the handshake. The cache keeps a fetched secret, or the
//! fact that there is none, for `auth_query_cache`; a failed login forgets it, so a
//! password changed with `ALTER ROLE ... PASSWORD` is fetched again at the next login.
//! One fetch per user runs at a time: concurrent logins of that user wait for it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::{AuthError, ClientLogin, Credentials, ServerCredentials};
use crate::config::{AuthType, Config, Secret};
use crate::error::{sqlstate, ClientError, ErrorKind};
use crate::stream::Conn;
use crate::tls::accept::TlsSession;

/// How many users' secrets the cache holds at most; past it, expired entries go
/// first, then whichever come first in the map.
pub const MAX_CACHED: usize = 10_000;

/// Why a secret could not be fetched (no primary, the query failed): the client is
/// told its password could not be looked up (08006), which says nothing about the
/// user; the reason is logged.
#[derive(Debug, thiserror::Error)]
#[error("the auth_query lookup failed: {0}")]
pub struct LookupError(pub String);

/// Fetches the stored secret of a user for a client of a database.
pub trait SecretSource {
    /// `Ok(None)`: no such user, or no password (NULL, or a secret pgrelay cannot read).
    fn fetch(
        &self,
        user: &str,
        database: &str,
    ) -> impl Future<Output = Result<Option<Secret>, LookupError>> + Send;
}

/// No lookup: users the config does not list are unknown, as without `auth_query`.
pub struct NoLookup;

impl SecretSource for NoLookup {
    async fn fetch(&self, _user: &str, _database: &str) -> Result<Option<Secret>, LookupError> {
        Ok(None)
    }
}

/// Authenticates a client the config does not list with the secret `auth_query`
/// finds for it, as PostgreSQL would with that secret in `pg_authid`: SCRAM for a
/// SCRAM secret (even when `auth_type = "md5"`), md5 for an md5 hash under
/// `auth_type = "md5"`, and nothing a SCRAM exchange could use under
/// `"scram-sha-256"`. A user with no secret goes through the same exchange against a
/// fake one, and every failure says `password authentication failed` (28P01).
pub(super) struct Queried<'a, L> {
    /// How the client proves itself: `auth_type` (users not listed have no override).
    pub auth_type: AuthType,
    pub config: &'a Config,
    pub credentials: &'a Credentials,
    pub source: &'a L,
}

impl<L: SecretSource> Queried<'_, L> {
    pub async fn authenticate<S>(
        &self,
        conn: &mut Conn<S>,
        login: &ClientLogin,
        tls: Option<&TlsSession>,
    ) -> Result<(), AuthError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (config, credentials, user) = (self.config, self.credentials, login.user.as_str());
        let served = !crate::config::is_admin_database(&login.database)
            && (config.allows_any_database() || config.database(&login.database).is_some());
        let secret = if served {
            let database = config.auth_dbname.as_deref().unwrap_or(&login.database);
            let fetch = self.source.fetch(user, database);
            match credentials
                .secrets
                .get(user, config.auth_query_cache, fetch)
                .await
            {
                Ok(secret) => secret,
                Err(err) => {
                    tracing::warn!(%user, %err, "could not look up a user's secret");
                    return Err(lookup_failed(user).into());
                }
            }
        } else {
            // A database it may not use (the admin console: listed users only; one
            // pgrelay does not serve): nothing is looked up, and the login fails as a
            // wrong password does.
            None
        };
        let result = self.exchange(conn, user, secret.as_ref(), tls).await;
        match &result {
            Ok(()) => {
                let learned = match &secret {
                    Some(Secret::Md5(hash)) => Some(ServerCredentials::Md5(*hash)),
                    Some(Secret::Plain(p)) => Some(ServerCredentials::Password(p.clone().into())),
                    _ => credentials.learned.get(user).map(|c| c.clone()),
                };
                if let Some(learned) = learned {
                    credentials.queried.insert(user.to_owned(), learned);
                }
            }
            // The secret may be stale (`ALTER ROLE ... PASSWORD`, a role created
            // since): the next login fetches it again.
            Err(AuthError::Client(_)) => credentials.secrets.forget(user),
            Err(_) => {}
        }
        result
    }

    async fn exchange<S>(
        &self,
        conn: &mut Conn<S>,
        user: &str,
        secret: Option<&Secret>,
        tls: Option<&TlsSession>,
    ) -> Result<(), AuthError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let credentials = self.credentials;
        let binding = super::scram::Binding {
            offered: tls.and_then(|tls| tls.end_point.as_deref()),
            selected: false,
        };
        match (self.auth_type, secret) {
            (AuthType::Plain, secret) => super::cleartext(conn, credentials, user, secret).await,
            (AuthType::Md5 | AuthType::ScramSha256, Some(Secret::Scram(secret))) => {
                let secret = Some(secret.clone());
                super::scram_exchange(conn, credentials, user, secret, true, binding).await
            }
            (AuthType::Md5, Some(secret)) => super::md5_exchange(conn, user, Some(secret)).await,
            // PostgreSQL's choice for a role with no secret (password_encryption's
            // default): the fake exchange is SCRAM, as for a SCRAM secret.
            (AuthType::Md5, None) => {
                super::scram_exchange(conn, credentials, user, None, false, binding).await
            }
            (AuthType::ScramSha256, Some(Secret::Plain(password))) => {
                let secret = Some(credentials.derived_secret(user, password));
                super::scram_exchange(conn, credentials, user, secret, false, binding).await
            }
            (AuthType::ScramSha256, Some(Secret::Md5(_)) | None) => {
                super::scram_exchange(conn, credentials, user, None, false, binding).await
            }
            // No password is asked: a user pgrelay does not list is refused as
            // without `auth_query`.
            (AuthType::Trust, _) => Err(ClientError::fatal(
                ErrorKind::Auth,
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                format!("role \"{user}\" is not known to pgrelay"),
            )
            .into()),
            (AuthType::Cert, _) => Err(super::cert_failed(user).into()),
        }
    }
}

/// The lookup itself failed: nothing about the user is known, and the client is told
/// so rather than that its password is wrong.
fn lookup_failed(user: &str) -> ClientError {
    ClientError::fatal(
        ErrorKind::ServerConnect,
        sqlstate::CONNECTION_FAILURE,
        format!("could not look up the password of user \"{user}\""),
    )
}

/// A fetched secret (or its absence) and when it was fetched.
#[derive(Clone)]
struct Fetched {
    secret: Option<Secret>,
    at: Instant,
}

/// One user's entry: its lock is held across the fetch, so one runs at a time.
#[derive(Default)]
struct Slot {
    fetched: tokio::sync::Mutex<Option<Fetched>>,
}

/// Secrets fetched by `auth_query`, per user.
#[derive(Default)]
pub struct SecretCache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl SecretCache {
    /// The secret of `user`: the cached one if younger than `ttl`, else fetched by
    /// `fetch` (which runs once at a time per user). A failed fetch is not cached.
    pub async fn get<F>(
        &self,
        user: &str,
        ttl: Duration,
        fetch: F,
    ) -> Result<Option<Secret>, LookupError>
    where
        F: Future<Output = Result<Option<Secret>, LookupError>>,
    {
        let slot = self.slot(user);
        let mut fetched = slot.fetched.lock().await;
        if let Some(cached) = fetched.as_ref().filter(|f| f.at.elapsed() < ttl) {
            return Ok(cached.secret.clone());
        }
        let secret = fetch.await?;
        *fetched = Some(Fetched {
            secret: secret.clone(),
            at: Instant::now(),
        });
        Ok(secret)
    }

    /// Forgets `user`'s secret after a failed login: the next login fetches it again.
    pub fn forget(&self, user: &str) {
        self.lock().remove(user);
    }

    /// How many users have an entry.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `user`'s slot, made (and room for it) if it has none.
    fn slot(&self, user: &str) -> Arc<Slot> {
        let mut slots = self.lock();
        if let Some(slot) = slots.get(user) {
            return slot.clone();
        }
        if slots.len() >= MAX_CACHED {
            make_room(&mut slots);
        }
        let slot = Arc::new(Slot::default());
        slots.insert(user.to_owned(), slot.clone());
        slot
    }
}

/// Drops entries until there is room for one more: those not in use and empty or
/// older than a minute first (a slot in use is being fetched or read), then any.
fn make_room(slots: &mut HashMap<String, Arc<Slot>>) {
    let stale = |slot: &Arc<Slot>| match slot.fetched.try_lock() {
        Ok(fetched) => fetched
            .as_ref()
            .is_none_or(|f| f.at.elapsed() > Duration::from_secs(60)),
        Err(_) => false,
    };
    slots.retain(|_, slot| !stale(slot));
    while slots.len() >= MAX_CACHED {
        let Some(user) = slots.keys().next().cloned() else {
            break;
        };
        slots.remove(&user);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn md5(byte: u8) -> Secret {
        Secret::Md5([byte; 16])
    }

    async fn fetch_counted(
        count: &AtomicUsize,
        secret: Option<Secret>,
    ) -> Result<Option<Secret>, LookupError> {
        count.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(secret)
    }

    #[tokio::test(start_paused = true)]
    async fn a_secret_is_reused_until_it_expires() {
        let (cache, count) = (SecretCache::default(), AtomicUsize::new(0));
        let first = cache.get("u", TTL, fetch_counted(&count, Some(md5(1))));
        assert!(first.await.expect("fetched") == Some(md5(1)));
        let again = cache.get("u", TTL, fetch_counted(&count, Some(md5(2))));
        assert!(again.await.expect("cached") == Some(md5(1)));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        tokio::time::advance(TTL).await;
        let expired = cache.get("u", TTL, fetch_counted(&count, Some(md5(2))));
        assert!(expired.await.expect("fetched again") == Some(md5(2)));
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_user_is_cached_too_and_forget_refetches() {
        let (cache, count) = (SecretCache::default(), AtomicUsize::new(0));
        for _ in 0..3 {
            let missing = cache.get("ghost", TTL, fetch_counted(&count, None));
            assert!(missing.await.expect("fetched").is_none());
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
        cache.forget("ghost");
        let created = cache.get("ghost", TTL, fetch_counted(&count, Some(md5(3))));
        assert!(created.await.expect("fetched") == Some(md5(3)));
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_ttl_fetches_every_time() {
        let (cache, count) = (SecretCache::default(), AtomicUsize::new(0));
        for _ in 0..3 {
            let got = cache.get("u", Duration::ZERO, fetch_counted(&count, Some(md5(1))));
            assert!(got.await.is_ok());
        }
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_logins_share_one_fetch() {
        let (cache, count) = (SecretCache::default(), AtomicUsize::new(0));
        let logins = (0..5).map(|_| cache.get("u", TTL, fetch_counted(&count, Some(md5(1)))));
        let results = futures_util::future::join_all(logins).await;
        assert!(results.iter().all(|r| matches!(r, Ok(Some(_)))));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_is_not_cached() {
        let (cache, count) = (SecretCache::default(), AtomicUsize::new(0));
        let failed = cache.get("u", TTL, async { Err(LookupError("down".into())) });
        assert!(failed.await.is_err());
        let later = cache.get("u", TTL, fetch_counted(&count, Some(md5(1))));
        assert!(later.await.expect("fetched") == Some(md5(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_stays_bounded() {
        let cache = SecretCache::default();
        for i in 0..MAX_CACHED + 10 {
            let user = format!("u{i}");
            let got = cache.get(&user, TTL, async { Ok(None) });
            assert!(got.await.is_ok());
        }
        assert!(cache.len() <= MAX_CACHED);
        assert!(!cache.is_empty());
    }
}
