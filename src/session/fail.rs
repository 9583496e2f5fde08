//! How a session fails: what a client is told, in pgrelay's own words or the
//! server's, and the two ways of telling it: a FATAL error before the connection
//! closes, or a failed request answered as PostgreSQL answers a failed statement.

use super::Session;
use crate::error::{ClientError, ErrorKind};
use crate::pool::server::ServerError;
use crate::pool::PoolError;
use crate::protocol::backend;
use crate::stream::{Conn, Stream};

/// Tells the client a FATAL error, then closes its connection: the one way a session
/// ends with an error.
pub(super) async fn say_goodbye(client: &mut Conn<Stream>, err: &ClientError) {
    err.encode(client.wbuf());
    let _ = client.flush().await;
    client.shutdown().await;
}

impl Session {
    pub(super) async fn fail(mut self, err: ClientError) {
        self.shared.metrics.error(err.kind);
        say_goodbye(&mut self.client, &err).await;
        self.finish().await;
    }

    /// Fails requests the client sent, as PostgreSQL fails a statement outside a
    /// transaction block: `err` and ReadyForQuery `I` for each of the `owed` requests
    /// that ended with Query or Sync. A request that ended with Flush is not over
    /// (`sync_owed`): its error goes out now, everything up to the client's Sync is
    /// skipped, and the ReadyForQuery follows that Sync. Returns whether the client is
    /// still there.
    pub(super) async fn fail_request(
        &mut self,
        err: &ClientError,
        owed: usize,
        sync_owed: bool,
    ) -> bool {
        for _ in 0..owed {
            err.encode(self.client.wbuf());
            backend::ready_for_query(self.client.wbuf(), backend::TxStatus::Idle);
        }
        if sync_owed {
            if owed == 0 {
                err.encode(self.client.wbuf());
            }
            if self.client.flush().await.is_err()
                || self.wire.skip_until_sync(&mut self.client).await.is_err()
            {
                return false;
            }
            backend::ready_for_query(self.client.wbuf(), backend::TxStatus::Idle);
        }
        self.client.flush().await.is_ok()
    }
}

pub(super) fn pool_error(err: PoolError) -> ClientError {
    match err {
        PoolError::Timeout(wait) => ClientError::pool_timeout(wait),
        PoolError::Server(err) => server_error(err),
    }
}

/// A server's own refusal of the login or of pgrelay's settings is passed on as it is
/// (its code and its words, which name no address). Anything else is one of pgrelay's
/// own messages with no detail: the address, the io error or the SCRAM failure is for
/// the log (the caller logs it), not the client.
pub(super) fn server_error(err: ServerError) -> ClientError {
    if err.unreachable() {
        return ClientError::server_unavailable();
    }
    match err {
        ServerError::Rejected(fields) | ServerError::Query(fields) => {
            ClientError::fatal(ErrorKind::ServerAuth, fields.code, fields.message)
        }
        ServerError::AuthMethod(_)
        | ServerError::Scram(_)
        | ServerError::Connect { .. }
        | ServerError::ConnectTimeout { .. }
        | ServerError::Tls { .. }
        | ServerError::Unexpected { .. }
        | ServerError::Stream(_) => ClientError::server_login_failed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::sqlstate;

    /// What a client hears of a server failure names no address and no io error.
    #[test]
    fn server_errors_keep_internals_out() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let failures = [
            ServerError::Connect {
                addr: "10.1.2.3:5433".into(),
                source: refused,
            },
            ServerError::ConnectTimeout {
                addr: "10.1.2.3:5433".into(),
            },
            ServerError::Tls {
                addr: "10.1.2.3:5433".into(),
                source: crate::tls::connect::TlsConnectError::Refused { mode: "require" },
            },
            ServerError::Stream(crate::stream::StreamError::Closed),
            ServerError::AuthMethod("md5 without a password or md5 hash"),
            ServerError::Scram(crate::auth::scram::ScramError::ServerSignature.into()),
        ];
        for failure in failures {
            let logged = failure.to_string();
            let told = server_error(failure);
            assert_eq!(told.code, sqlstate::CONNECTION_FAILURE, "{logged}");
            assert!(told.fatal, "{logged}");
            for internal in ["10.1.2.3", "5433", "md5", "signature", "i/o"] {
                assert!(
                    !told.message.contains(internal),
                    "{logged}: {}",
                    told.message
                );
            }
        }
    }
}
