//! When a server goes away under a client (a crash, a shutdown, a failover): what the
//! client is told, and how its session goes on without that server.

use super::state::Attachment;
use super::Session;
use crate::config::PoolMode;
use crate::error::{ClientError, ErrorKind};
use crate::protocol::backend;

impl Session {
    /// The server went away under the client (a crash, a shutdown, a failover). In
    /// transaction mode the client is told its request failed (the server's own
    /// FATAL code, e.g. 57P01, or 08006) and goes on with another server; in session
    /// mode, or when session state pinned it to that server, that state is gone, so
    /// the client is told so and closed, as PostgreSQL would. Returns whether the
    /// session goes on.
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
        let fatal = self.wire.take_server_fatal();
        let (code, message) = match &fatal {
            Some(fields) => (fields.code.clone(), fields.message.clone()),
            None => (
                "08006".to_owned(),
                "the server connection was lost; the transaction did not complete".to_owned(),
            ),
        };
        tracing::warn!(user = %self.login.user, node, %code, %message, io = ?err, "server connection lost under a client");
        let pinned = self.unpin();
        let in_transaction = self.wire.status != b'I';
        let loss = match self.mode {
            PoolMode::Transaction if !pinned => self.wire.server_lost(&mut self.client),
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
        if in_transaction && loss.owed == 0 && !loss.sync_owed {
            self.lost_transaction = Some(err);
            return true;
        }
        for _ in 0..loss.owed {
            err.encode(self.client.wbuf());
            backend::ready_for_query(self.client.wbuf(), b'I');
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
            backend::ready_for_query(self.client.wbuf(), b'I');
        }
        self.client.flush().await.is_ok()
    }
}
