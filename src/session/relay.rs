//! The hot path: moves bytes between a client and its server without copying them into
//! new buffers or re-encoding them, watching only message headers, Query text (for the
//! database commands that need idle connections closed), ParameterStatus and
//! ReadyForQuery.
//!
//! [`Wire`] is the per-session relay state, a state machine in three parts: the
//! client side ([`super::scan`]: what the client sent and is owed), the server side
//! ([`super::server_side`]: what the server sent, its transaction status) and the
//! [`Policy`] fixed when the session starts. Each side is scanned from bytes, without
//! I/O; resetting a side replaces it whole. [`Wire::relay`] is one hand-written poll
//! loop over both sockets: it reads and writes in both directions at once, so a client
//! pipelining a large request while the server streams a large result never
//! deadlocks, and it ends at the first point where the session must act (a transaction
//! finished in transaction mode, Terminate, a closed socket).

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut};

use crate::pool::params::ParamSet;
use crate::pool::server::Server;
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::{self, frontend, ProtocolError, HEADER_LEN};
use crate::router::classify::effects::Effects;
use crate::router::Plan;
use crate::router::StatementNodes;
use crate::session::prepared::Prepared;
use crate::session::scan::{ClientEnd, ClientSide, Flow, Front};
use crate::session::server_side::{ServerEnd, ServerFront, ServerParts, ServerSide};
use crate::session::watch::{Expired, Watch};
use crate::stream::{Conn, Stream};

/// Raw client bytes up to this size join messages pgrelay composed, so that they
/// leave in one write.
const COALESCE: usize = 64 * 1024;

/// Stop reading a side while this much of it waits to be written to the other side.
const HIGH_WATER: usize = 256 * 1024;

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Transaction mode: the server is idle, everything was delivered; it may go back.
    TransactionDone,
    /// The client sent Terminate (left unconsumed at the front of its buffer) or closed.
    ClientGone,
    /// The client broke the protocol.
    ClientProtocol(ProtocolError),
    /// The server closed or failed; everything it sent was delivered.
    ServerGone(Option<io::Error>),
    /// The client's socket failed while writing to it.
    ClientIo(io::Error),
    /// The client's next request may be a call on a pid pgrelay issued; everything
    /// before it is answered. The session handles it, then relays on.
    Intercepted,
    /// One of the session's timeouts expired; the relay stopped where it was.
    TimedOut(Expired),
}

/// What the relay does for one client, decided when the session starts (only
/// [`Policy::hold_at_boundary`] and a session-mode pin change it later).
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Release servers at transaction end (transaction mode, or session mode with
    /// routing, which routes each transaction).
    pub transaction_pooling: bool,
    /// Track where the client's statements were parsed (routing without carried
    /// statements).
    pub track_statements: bool,
    /// Note what requests do to the session (transaction mode).
    pub track_effects: bool,
    /// The pid pgrelay issued this client (transaction mode). A notification sent by
    /// the client's own server reaches the client with it, so that a client sees its
    /// own notifications as its own (asyncpg, psycopg compare pids). And the relay
    /// stops in front of requests that may be calls on pids pgrelay issued: the
    /// session answers those itself, inside transactions too.
    pub own_pid: Option<i32>,
    /// Routing on a replica: forward one request at a time, so that a request the
    /// client pipelines behind a finished transaction is routed on its own rather than
    /// sent to the replica with it (it may write). Set per request.
    pub hold_at_boundary: bool,
    /// `limits.max_request_buffer`: the most bytes of one request read while detached,
    /// and of one inspected message (Query, Parse) while attached (0: none but the
    /// protocol's).
    pub max_request: usize,
}

/// A client's relay state, kept across servers.
pub struct Wire {
    pub(super) client: ClientSide,
    pub(super) server: ServerSide,
    pub(super) policy: Policy,
    /// Where the client's prepared statements were parsed (kept only when routing).
    pub statements: StatementNodes,
    /// The node of the server being relayed to.
    pub node: usize,
    /// Named prepared statements carried across servers (transaction mode).
    pub(super) prepared: Option<Box<Prepared>>,
    /// What the requests relayed since the last [`Wire::take_effects`] do to the session.
    pub(super) effects: Effects,
    /// Since the last [`Wire::take_counts`]: what was relayed.
    pub(super) counts: Counts,
    /// The relay goes on with the server it had after [`RelayEnd::Intercepted`]:
    /// nothing the server owes is forgotten.
    pub(super) resumed: bool,
    /// A request read while detached is a database command on this database: the
    /// session closes its idle servers before relaying it.
    pub(super) database_command: Option<String>,
    /// What the texts of the request read while detached mean for routing, when it was
    /// read for routing: the scan that read it understood each text once, effects and
    /// route class together.
    pub(super) texts: Plan,
    /// When the request being answered was sent (the first of a transaction: when its
    /// server was attached, set by the session); taken when its answer ends.
    pub query_start: Option<std::time::Instant>,
    /// The client's pool's query-duration histogram.
    pub(super) query_latency: Option<prometheus::Histogram>,
}

/// What a relay moved, for statistics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Query and Execute messages from the client.
    pub queries: u64,
    /// Bytes read from the client and written to the server.
    pub received: u64,
    /// Bytes written to the client.
    pub sent: u64,
    /// ErrorResponses from the server, by severity: ERROR, FATAL, PANIC.
    pub errors: [u64; 3],
}

/// What a client was owed by a server that went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    /// ReadyForQuery messages owed (Query, Sync, FunctionCall sent or scanned).
    pub owed: usize,
    /// An extended request was open: the client still sends its Sync.
    pub sync_owed: bool,
}

impl Wire {
    pub fn new(policy: Policy, prepared: Option<Box<Prepared>>) -> Self {
        Wire {
            client: ClientSide::new(prepared.is_some(), policy.max_request),
            server: ServerSide::new(),
            policy,
            statements: StatementNodes::default(),
            node: 0,
            prepared,
            effects: Effects::default(),
            counts: Counts::default(),
            resumed: false,
            database_command: None,
            texts: Plan::default(),
            query_start: None,
            query_latency: None,
        }
    }

    /// Times each request it relays into `latency` (the session times the first of
    /// each transaction).
    pub fn timing_queries(mut self, latency: prometheus::Histogram) -> Self {
        self.query_latency = Some(latency);
        self
    }

    /// What was relayed since the last call.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// The FATAL error the server ended with, if it sent one.
    pub fn take_server_fatal(&mut self) -> Option<backend::ErrorFields> {
        self.server.fatal.take()
    }

    /// Session mode: the client keeps its server from now on.
    pub fn keep_server(&mut self) {
        self.policy.transaction_pooling = false;
    }

    /// Routing: whether the request just routed is answered before the client's next
    /// one is scanned (see [`Policy::hold_at_boundary`]).
    pub fn hold_at_boundary(&mut self, hold: bool) {
        self.policy.hold_at_boundary = hold;
    }

    /// The last ReadyForQuery status.
    pub fn status(&self) -> TxStatus {
        self.server.status
    }

    /// The server went away mid-relay: forgets everything it owed and everything
    /// scanned for it, and says what the client is owed instead. `None` if the client
    /// is in the middle of a message, where its stream cannot be picked up again.
    pub fn server_lost(&mut self, client: &mut Conn<Stream>) -> Option<Loss> {
        let scanned = self.client.c2s;
        let loss = self.forget_server()?;
        // Scanned for the lost server, never run: answered as failed by the session.
        client.rbuf().advance(scanned);
        Some(loss)
    }

    /// [`Wire::server_lost`] without the client's buffer: drops the scanned client
    /// bytes from the count only.
    fn forget_server(&mut self) -> Option<Loss> {
        if !self.client.scanner.at_boundary() {
            return None;
        }
        self.client.c2s = 0;
        let exchange = std::mem::take(&mut self.client.exchange);
        self.server = ServerSide::new();
        if let Some(p) = self.prepared.as_deref_mut() {
            p.server_lost();
        }
        Some(Loss {
            owed: exchange.pending,
            sync_owed: exchange.extended_open,
        })
    }

    /// The client is inside a transaction block on its server: the last ReadyForQuery
    /// said so, or the request in flight began one.
    pub fn in_block(&self) -> bool {
        self.server.status != TxStatus::Idle || self.server.block_opened
    }

    /// What the requests relayed since the last call do to the session.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
    }

    /// Nothing owed, nothing buffered, between transactions: the server may be released
    /// or reset.
    pub fn server_clean(&self, server: &mut Conn<Stream>) -> bool {
        self.between_transactions() && server.rbuf_len() == 0
    }

    /// [`Wire::server_clean`] but for the server's read buffer.
    fn between_transactions(&self) -> bool {
        let exchange = &self.client.exchange;
        exchange.pending == 0
            && !exchange.extended_open
            && self.server.status == TxStatus::Idle
            && self.client.c2s == 0
            && self.client.scanner.at_boundary()
            && self.server.scanner.at_boundary()
    }

    /// Scans newly read client bytes (see [`Wire::scan_client_bytes`]).
    pub(super) fn scan_client(&mut self, client: &mut Conn<Stream>, attached: bool) -> bool {
        let buf = &client.rbuf()[self.client.c2s..];
        self.scan_client_bytes(buf, attached)
    }

    /// The database whose idle servers the request just read needs closed, if any.
    pub fn take_database_command(&mut self) -> Option<String> {
        self.database_command.take()
    }

    fn scan_server(&mut self, server: &mut Server, client_params: &mut ParamSet) {
        loop {
            let Server {
                conn,
                params,
                statements,
                pid,
                ..
            } = &mut *server;
            let from = self.server.s2c;
            let parts = ServerParts {
                pid: *pid,
                params,
                statements,
            };
            let Some(at) = self.scan_server_bytes(&conn.rbuf()[from..], parts, client_params)
            else {
                return;
            };
            // The client's own pid over its server's, in place: no copy, no allocation.
            if let Some(pid) = self.policy.own_pid {
                conn.rbuf()[from + at..from + at + 4].copy_from_slice(&pid.to_be_bytes());
            }
        }
    }

    /// Relays until the session must act, or one of `watch`'s timeouts expires.
    /// Cancel safe only between calls; the session does not select over it.
    pub async fn relay(
        &mut self,
        client: &mut Conn<Stream>,
        server: &mut Server,
        client_params: &mut ParamSet,
        mut watch: Option<&mut Watch>,
    ) -> RelayEnd {
        self.server.release_point = false;
        self.server.end = ServerEnd::Open;
        // A request read while detached is in flight: with hold_at_boundary, what the
        // client sent after it waits for its answer.
        let hold = self.policy.hold_at_boundary
            && self.client.c2s > 0
            && matches!(
                self.client.last_boundary,
                Some(frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL)
            );
        let flow = &mut self.client.exchange.flow;
        if hold {
            *flow = Flow::Paused;
        } else if *flow == Flow::Paused {
            *flow = Flow::Flowing;
        }
        if self.prepared.is_some() {
            self.send_buffered(client, server, client_params);
        }
        self.resumed = false;
        // Bytes already buffered (a request read while detached) are scanned first.
        self.scan_client(client, true);
        if let Some(watch) = watch.as_deref_mut() {
            watch.relay_starts();
        }
        poll_fn(|cx| {
            let polled = self.poll_relay(cx, client, server, client_params);
            match (polled, watch.as_deref_mut()) {
                (Poll::Pending, Some(watch)) => match watch.poll_expired(cx, self) {
                    Some(expired) => Poll::Ready(RelayEnd::TimedOut(expired)),
                    None => Poll::Pending,
                },
                (polled, _) => polled,
            }
        })
        .await
    }

    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Conn<Stream>,
        server: &mut Server,
        client_params: &mut ParamSet,
    ) -> Poll<RelayEnd> {
        loop {
            let mut progress = false;
            match self.write_to_client(cx, client, &mut server.conn) {
                Ok(p) => progress |= p,
                Err(err) => return Poll::Ready(RelayEnd::ClientIo(err)),
            }
            if self.server.s2c == 0 && self.server.front != ServerFront::Relayed {
                self.drop_server_front(client, server, client_params);
                continue;
            }
            if self.server.s2c == 0 && !self.client.needs_flush {
                if let Some(end) = self.server.end.take() {
                    return Poll::Ready(RelayEnd::ServerGone(end));
                }
                if self.server.release_point {
                    if self.server_clean(&mut server.conn) {
                        return Poll::Ready(RelayEnd::TransactionDone);
                    }
                    // The client sent more meanwhile: keep the server and go on.
                    self.server.release_point = false;
                    self.scan_server(server, client_params);
                    progress = true;
                }
            }
            let front = self.client.exchange.front;
            if front != Front::Relayed && self.handle_front(client, server, client_params) {
                self.scan_client(client, true);
                progress = true;
            }
            let intercept = matches!(
                self.client.exchange.front,
                Front::PidCall | Front::DatabaseCommand
            );
            if intercept && self.all_answered(client, server) {
                self.client.exchange.front = Front::Relayed;
                return Poll::Ready(RelayEnd::Intercepted);
            }
            match self.write_to_server(cx, client, &mut server.conn) {
                Ok(p) => progress |= p,
                Err(err) => self.server.end = ServerEnd::Failed(err),
            }
            if let Some(end) = self.client_end() {
                return Poll::Ready(end);
            }
            progress |= self.read_server(cx, server, client_params);
            progress |= self.read_client(cx, client);
            if !progress {
                return Poll::Pending;
            }
        }
    }

    /// The server message first in its buffer answers one of pgrelay's own, and is
    /// whole there (a ParseComplete or CloseComplete, or the error of a stale Parse):
    /// drops it, then scans on.
    fn drop_server_front(
        &mut self,
        client: &mut Conn<Stream>,
        server: &mut Server,
        client_params: &mut ParamSet,
    ) {
        let len = protocol::message_len(server.conn.rbuf()).unwrap_or(HEADER_LEN);
        server.conn.rbuf().advance(len);
        if self.server.front == ServerFront::Replace {
            backend::stale_plan_error(client.wbuf());
        }
        self.server.front = ServerFront::Relayed;
        self.scan_server(server, client_params);
    }

    /// How the relay ends on the client's side, once everything it sent is on its way.
    fn client_end(&mut self) -> Option<RelayEnd> {
        if self.client.c2s > 0 || self.client.exchange.front != Front::Relayed {
            return None;
        }
        if let Some(err) = self.client.end.take_error() {
            return Some(RelayEnd::ClientProtocol(err));
        }
        (self.client.end == ClientEnd::Done).then_some(RelayEnd::ClientGone)
    }

    /// Reads and scans what the server sent. Returns whether a read completed.
    fn read_server(
        &mut self,
        cx: &mut Context<'_>,
        server: &mut Server,
        client_params: &mut ParamSet,
    ) -> bool {
        if !self.server.end.is_open() || self.server.release_point || self.server.s2c >= HIGH_WATER
        {
            return false;
        }
        // Only a completed read is progress: a pending write must not spin us.
        let Poll::Ready(read) = server.conn.poll_read_more(cx) else {
            return false;
        };
        match read {
            Ok(0) => self.server.end = ServerEnd::Closed,
            Ok(_) => self.scan_server(server, client_params),
            Err(err) => self.server.end = ServerEnd::Failed(err),
        }
        true
    }

    /// Scans what the client sent while it was paused, then reads and scans what it
    /// sends. Returns whether either happened.
    fn read_client(&mut self, cx: &mut Context<'_>, client: &mut Conn<Stream>) -> bool {
        let mut progress = false;
        if self.client.exchange.flow == Flow::Resume {
            self.client.exchange.flow = Flow::Flowing;
            self.scan_client(client, true);
            progress = true;
        }
        if self.client.ended() || self.client.c2s >= HIGH_WATER {
            return progress;
        }
        match client.poll_read_more(cx) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => self.client.end = ClientEnd::Done,
            Poll::Ready(Ok(_)) => {
                self.scan_client(client, true);
            }
            Poll::Pending => return progress,
        }
        true
    }

    /// Nothing is on its way to or from the server, nor to the client.
    fn all_answered(&self, client: &mut Conn<Stream>, server: &mut Server) -> bool {
        let exchange = &self.client.exchange;
        self.client.c2s == 0
            && self.server.s2c == 0
            && exchange.pending == 0
            && !exchange.extended_open
            && self.server.front == ServerFront::Relayed
            && !self.client.needs_flush
            && client.wbuf().is_empty()
            && server.conn.wbuf().is_empty()
    }

    /// The relay was abandoned (the session was killed): writes out to the client what
    /// was scanned for it. Returns whether the client then stands between two messages,
    /// where pgrelay may add one of its own. Cancel safe.
    pub async fn deliver_scanned(
        &mut self,
        client: &mut Conn<Stream>,
        server: &mut Conn<Stream>,
    ) -> bool {
        let delivered = poll_fn(|cx| loop {
            match self.write_to_client(cx, client, server) {
                Err(_) => return Poll::Ready(false),
                Ok(_)
                    if self.server.s2c == 0
                        && client.wbuf().is_empty()
                        && !self.client.needs_flush =>
                {
                    return Poll::Ready(true)
                }
                Ok(true) => {}
                Ok(false) => return Poll::Pending,
            }
        })
        .await;
        delivered && self.server.scanner.at_boundary()
    }

    fn write_to_client(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Conn<Stream>,
        server: &mut Conn<Stream>,
    ) -> io::Result<bool> {
        // pgrelay's own answers first: they were composed when nothing was in flight.
        let (own, drained) = drain_wbuf(cx, client)?;
        self.counts.sent += own as u64;
        let mut progress = own > 0;
        if drained {
            let moved = forward(cx, server, client, &mut self.server.s2c)?;
            self.counts.sent += moved as u64;
            progress |= moved > 0;
        }
        self.client.needs_flush |= progress;
        if self.client.needs_flush {
            match client.poll_flush(cx) {
                Poll::Ready(Ok(())) => self.client.needs_flush = false,
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => {}
            }
        }
        Ok(progress)
    }

    fn write_to_server(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Conn<Stream>,
        server: &mut Conn<Stream>,
    ) -> io::Result<bool> {
        let c2s = &mut self.client.c2s;
        if !server.wbuf().is_empty() && *c2s > 0 && *c2s <= COALESCE {
            // Rewritten messages are followed by raw ones: one write for both.
            server.wbuf().put_slice(&client.rbuf()[..*c2s]);
            client.rbuf().advance(*c2s);
            *c2s = 0;
        }
        let (own, drained) = drain_wbuf(cx, server)?;
        let mut progress = own > 0;
        if drained {
            let moved = forward(cx, client, server, &mut self.client.c2s)?;
            self.counts.received += moved as u64;
            progress |= moved > 0;
        }
        if progress {
            // TLS buffers records; plain TCP returns at once.
            if let Poll::Ready(Err(err)) = server.poll_flush(cx) {
                return Err(err);
            }
        }
        Ok(progress)
    }
}

/// Writes out what pgrelay composed in `to`'s write buffer. Returns (bytes written,
/// the buffer is empty).
fn drain_wbuf(cx: &mut Context<'_>, to: &mut Conn<Stream>) -> io::Result<(usize, bool)> {
    let mut written = 0;
    while !to.wbuf().is_empty() {
        match to.poll_write_wbuf(cx) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(err)) => return Err(err),
            Poll::Pending => return Ok((written, false)),
        }
    }
    Ok((written, true))
}

/// Writes the first `*pending` bytes of `from`'s read buffer to `to`, consuming them
/// as they go. Returns how many were written.
fn forward(
    cx: &mut Context<'_>,
    from: &mut Conn<Stream>,
    to: &mut Conn<Stream>,
    pending: &mut usize,
) -> io::Result<usize> {
    let mut written = 0;
    while *pending > 0 {
        match to.poll_write(cx, &from.rbuf()[..*pending]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                from.rbuf().advance(n);
                *pending -= n;
                written += n;
            }
            Poll::Ready(Err(err)) => return Err(err),
            Poll::Pending => break,
        }
    }
    Ok(written)
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
