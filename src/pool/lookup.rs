//! The `auth_query` round trip: a user's stored secret, read on a server of the
//! `auth_user`'s pool with the user name as `$1` (extended protocol, never spliced into
//! the SQL).
//!
//! The server is a pooled one, which clients of `auth_user` share: a client's startup
//! `options` or parameters may have left a `search_path` on it (parameter
//! reconciliation applies them on checkout). So the query runs in a transaction of its
//! own that first sets `search_path = pg_catalog, pg_temp` with `SET LOCAL`: an object
//! a client put first on the path (a `pg_shadow` table of its own, PgBouncer's
//! CVE-2025-12819) is never used, and the setting ends with the transaction.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;

use super::server::{columns, ServerError};
use super::ServerGuard;
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::MAX_MESSAGE_LEN;
use crate::stream::StreamError;

/// Where the lookup's statements run: pgrelay's path, whatever a client set.
const FIXED_PATH: &str = "SET LOCAL search_path = pg_catalog, pg_temp";

/// Runs `query` with `user` as `$1` and returns the first row's columns as text (NULL
/// as None; no row, no columns). The server goes back to its pool if the transaction
/// ended cleanly, and is closed otherwise. Not cancel safe.
pub async fn fetch_row(
    mut guard: ServerGuard,
    query: &str,
    user: &str,
) -> Result<Vec<Option<String>>, ServerError> {
    let server = guard.server();
    let buf = server.conn.wbuf();
    for sql in ["BEGIN", FIXED_PATH] {
        statement(sql, None, buf)?;
    }
    statement(query, Some(user), buf)?;
    statement("COMMIT", None, buf)?;
    frontend::sync(buf);
    server.conn.flush().await?;
    let (mut row, mut failure) = (None, None);
    let status = loop {
        let frame = server.conn.read_frame(MAX_MESSAGE_LEN).await?;
        match frame.tag() {
            backend::PARAMETER_STATUS => {
                let (name, value) =
                    backend::parameter_status(frame.body()).map_err(StreamError::from)?;
                server.params.set_reported(name, value);
            }
            b'D' if row.is_none() => row = Some(columns(frame.body())),
            backend::ERROR_RESPONSE if failure.is_none() => {
                failure = Some(backend::error_fields(frame.body()))
            }
            backend::READY_FOR_QUERY => {
                break backend::ready_status(frame.body()).map_err(StreamError::from)?
            }
            _ => {}
        }
    };
    if status == TxStatus::Idle && failure.is_none() {
        guard.release();
    }
    // Otherwise the guard drops: a server left in a (failed) transaction is closed.
    match failure {
        Some(fields) => Err(ServerError::Query(fields)),
        None => Ok(row.unwrap_or_default()),
    }
}

/// Parse, Bind (with `param` as the one text parameter, if any) and Execute of the
/// unnamed statement.
fn statement(sql: &str, param: Option<&str>, buf: &mut BytesMut) -> Result<(), ServerError> {
    let malformed = |_| ServerError::Unexpected { tag: 'P' };
    frontend::parse("", sql, std::iter::empty(), buf).map_err(malformed)?;
    frontend::bind(
        "",
        "",
        std::iter::empty(),
        param,
        |value, buf| {
            buf.extend_from_slice(value.as_bytes());
            Ok(IsNull::No)
        },
        std::iter::empty(),
        buf,
    )
    .map_err(|_| ServerError::Unexpected { tag: 'B' })?;
    frontend::execute("", 0, buf).map_err(malformed)
}
