//! Where `auth_query` reaches a server: the [`SecretSource`] a session hands to the
//! handshake. Auth (floor 2) may not touch servers and the pool (floor 3) does not know
//! which node is the primary, so the lookup is wired here: the primary from the
//! topology, a server of the `(auth_user, auth_dbname)` pool on it checked out and
//! released like any request's, and the query itself run by [`pool::lookup`].

use std::sync::Arc;

use crate::auth::lookup::{LookupError, SecretSource};
use crate::config::{Config, Secret};
use crate::error::sqlstate;
use crate::pool::server::ServerError;
use crate::pool::{self, PoolError, Waiter};
use crate::Shared;

/// The lookup of one login.
pub(super) struct AuthQuery<'a> {
    pub shared: &'a Shared,
    pub config: &'a Config,
}

impl SecretSource for AuthQuery<'_> {
    async fn fetch(&self, user: &str, database: &str) -> Result<Option<Secret>, LookupError> {
        let config = self.config;
        let auth_user = config
            .auth_query_user()
            .ok_or_else(|| LookupError("auth_query is off".into()))?;
        let primary = self
            .shared
            .cluster
            .load()
            .primary
            .ok_or_else(|| LookupError("no primary".into()))?;
        let pool = self
            .shared
            .node_pool(config, primary, database, auth_user)
            .map_err(|err| LookupError(err.message.to_string()))?;
        let waiter = Arc::new(Waiter::default());
        let guard = match pool.checkout(&waiter).await {
            Ok(guard) => guard,
            Err(err) => {
                if no_such_database(&err) {
                    // The name came from a client not yet authenticated.
                    self.shared.pools.forget_unused(&pool.key);
                }
                return Err(LookupError(err.to_string()));
            }
        };
        let row = pool::lookup::fetch_row(guard, &config.auth_query, user)
            .await
            .map_err(|err| LookupError(err.to_string()))?;
        Ok(secret_of(user, row))
    }
}

/// The server refused the login because the database does not exist.
fn no_such_database(err: &PoolError) -> bool {
    matches!(err, PoolError::Server(ServerError::Rejected(fields))
        if fields.code == sqlstate::INVALID_CATALOG_NAME)
}

/// The secret in a lookup's row (name, secret): none for no row or a NULL.
fn secret_of(user: &str, row: Vec<Option<String>>) -> Option<Secret> {
    let text = row.into_iter().nth(1).flatten()?;
    match Secret::parse(&text) {
        Ok(secret) => Some(secret),
        Err(_) => {
            tracing::warn!(%user, "auth_query returned a secret pgrelay cannot read");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_gives_its_second_column_as_the_secret() {
        let hash = format!("md5{}", "ab".repeat(16));
        let secret = secret_of("u", vec![Some("u".into()), Some(hash)]);
        assert!(matches!(secret, Some(Secret::Md5(_))));
        assert!(secret_of("u", vec![Some("u".into()), None]).is_none());
        assert!(secret_of("u", Vec::new()).is_none());
        assert!(secret_of(
            "u",
            vec![Some("u".into()), Some("SCRAM-SHA-256$bad".into())]
        )
        .is_none());
    }
}
