//! When a server goes away under a client (a crash, a shutdown, a failover,
//! `pg_terminate_backend`): what the client is told, and whether its session goes on.
//!
//! The rule is to show the client what it would see talking to PostgreSQL directly,
//! except where pgrelay can do better without lying:
//! - a request in flight outside a transaction block fails with an ERROR (the server's
//!   own code, else 08006) and ReadyForQuery `I`; the session goes on with another
//!   server, as nothing the client relied on was lost;
//! - a client inside a transaction block (in flight or idle in it) has lost its
//!   transaction: it gets the server's FATAL and its connection is closed, so drivers
//!   and pools see the connection break and replace it;
//! - session mode, and a client pinned to the server by session state: FATAL and close.
//!
//! A client between transactions holds no server, so it never notices.

use super::state::Attachment;
use super::Session;
use crate::config::PoolMode;
use crate::error::{ClientError, ErrorKind};
use crate::protocol::backend;

/// What the client is told when its server closed without a FATAL of its own (a
/// crash, an immediate shutdown): libpq's words for it.
const CLOSED_UNEXPECTEDLY: &str = "server closed the connection unexpectedly";

impl Session {
    /// The server went away under the client. Returns whether the session goes on
    /// (see the module doc for what the client is told).
    pub(super) async fn server_lost(&mut self, err: Option<std::io::Error>) -> bool {
        let Attachment::Attached(guard) =
            std::mem::replace(&mut self.attachment, Attachment::Detached)
        else {
            return false;
        };
        let node = guard.pool().key.node;
        drop(guard);
        self.account();
        self.handle.idle();
        self.shared.metrics.error(ErrorKind::ServerLost);
        self.backend_failed(node);
        self.cancel.set(None).await;
        let (code, message) = match self.wire.take_server_fatal() {
            Some(fields) => (fields.code, fields.message),
            None => ("08006".to_owned(), CLOSED_UNEXPECTEDLY.to_owned()),
        };
        let pinned = self.unpin();
        let in_block = self.wire.in_block();
        tracing::warn!(user = %self.login.user, node, %code, %message, in_block, io = ?err, "server connection lost under a client");
        let loss = match self.mode {
            PoolMode::Transaction if !pinned && !in_block => {
                self.wire.server_lost(&mut self.client)
            }
            _ => None,
        };
        let Some(loss) = loss else {
            let err = ClientError::fatal(ErrorKind::ServerLost, code, message);
            err.encode(self.client.wbuf());
            let _ = self.client.flush().await;
            self.client.shutdown().await;
            return false;
        };
        let _ = self.wire.take_effects();
        let err = ClientError::error(ErrorKind::ServerLost, code, message);
        for _ in 0..loss.owed {
            err.encode(self.client.wbuf());
            backend::ready_for_query(self.client.wbuf(), backend::TxStatus::Idle);
        }
        if loss.sync_owed {
            if loss.owed == 0 {
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
