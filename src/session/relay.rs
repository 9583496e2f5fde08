//! The hot path: moves bytes between a client and its server without copying them into
//! new buffers or re-encoding them, watching only message headers, Query text (for the
//! database commands that need idle connections closed), ParameterStatus and
//! ReadyForQuery.
//!
//! [`Wire`] is the per-session relay state. [`Wire::relay`] is one hand-written poll
//! loop over both sockets: it reads and writes in both directions at once, so a client
//! pipelining a large request while the server streams a large result never
//! deadlocks, and it ends at the first point where the session must act (a transaction
//! finished in transaction mode, Terminate, a closed socket).

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};

use bytes::Buf;

use crate::pool::Pools;
use crate::protocol::frontend::{self, KNOWN};
use crate::protocol::{backend, ProtocolError, Scanner, Step, MAX_MESSAGE_LEN};
use crate::router::{classify, StatementNodes};
use crate::session::params::ParamSet;
use crate::stream::{Conn, Stream};

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
}

/// A client's relay state, kept across servers.
pub struct Wire {
    client_scan: Scanner,
    server_scan: Scanner,
    /// Scanned client bytes at the front of the client's read buffer, not yet written.
    c2s: usize,
    /// Scanned server bytes at the front of the server's read buffer, not yet written.
    s2c: usize,
    /// ReadyForQuery messages owed for forwarded Query, Sync and FunctionCall.
    pending: usize,
    /// Extended-protocol messages were sent after the last Sync.
    extended_open: bool,
    /// The client parsed the unnamed statement and has not executed anything since
    /// (asyncpg with its cache off, `PQprepare` with an empty name): the statement
    /// lives only on this server, so the server stays with the client until it runs.
    unnamed_unexecuted: bool,
    /// Syncs sent since the last Execute or Query. If a CopyDone or CopyFail follows,
    /// the server read them in COPY FROM STDIN mode, where it ignores Sync (libpq and
    /// tokio-postgres send Sync right after Execute, before the copy data), so they are
    /// owed no ReadyForQuery.
    copy_syncs: usize,
    /// The last ReadyForQuery status (`I`, `T`, `E`).
    pub status: u8,
    /// A Terminate is first in the client buffer, or the client closed.
    client_done: bool,
    protocol_error: Option<ProtocolError>,
    /// The last server message scanned completes the transaction (transaction mode).
    release_point: bool,
    server_eof: Option<Option<io::Error>>,
    client_needs_flush: bool,
    /// Release servers at transaction end (transaction mode).
    pub transaction_pooling: bool,
    /// The message that ended the last request read while detached (Query, Sync,
    /// Flush or FunctionCall): a Flush means the client has not finished it yet.
    last_boundary: Option<u8>,
    /// Where the client's prepared statements were parsed (kept only when routing).
    pub statements: StatementNodes,
    /// Track `statements` (routing is on for this client).
    pub track_statements: bool,
    /// The node of the server being relayed to.
    pub node: usize,
    /// Routing on a replica: forward one request at a time, so that a request the
    /// client pipelines behind a finished transaction is routed on its own rather than
    /// sent to the replica with it (it may write).
    pub hold_at_boundary: bool,
    /// Client bytes past a request boundary wait until the server answers it.
    client_paused: bool,
    /// The server answered: scan and forward what the client sent meanwhile.
    resume_client: bool,
}

impl Wire {
    pub fn new(transaction_pooling: bool) -> Self {
        Wire {
            client_scan: Scanner::new(&frontend::INSPECT, MAX_MESSAGE_LEN),
            server_scan: Scanner::new(&backend::INSPECT, MAX_MESSAGE_LEN),
            c2s: 0,
            s2c: 0,
            pending: 0,
            extended_open: false,
            unnamed_unexecuted: false,
            copy_syncs: 0,
            status: b'I',
            client_done: false,
            protocol_error: None,
            release_point: false,
            server_eof: None,
            client_needs_flush: false,
            transaction_pooling,
            last_boundary: None,
            statements: StatementNodes::default(),
            track_statements: false,
            node: 0,
            hold_at_boundary: false,
            client_paused: false,
            resume_client: false,
        }
    }

    /// Nothing owed, nothing buffered, between transactions: the server may be released
    /// or reset.
    pub fn server_clean(&self, server: &mut Conn<Stream>) -> bool {
        self.pending == 0
            && !self.extended_open
            && self.status == b'I'
            && self.c2s == 0
            && self.client_scan.at_boundary()
            && self.server_scan.at_boundary()
            && server.rbuf_len() == 0
    }

    /// Bytes of a complete request are buffered and scanned (detached mode).
    pub fn has_request(&self) -> bool {
        self.c2s > 0
    }

    pub fn client_done(&self) -> bool {
        self.client_done
    }

    pub fn take_protocol_error(&mut self) -> Option<ProtocolError> {
        self.protocol_error.take()
    }

    /// The complete request buffered while detached, for routing.
    pub fn request<'a>(&self, client: &'a mut Conn<Stream>) -> &'a [u8] {
        &client.rbuf()[..self.c2s]
    }

    /// Records the statements a just-routed request parses or closes on `node`.
    pub fn record_request(&mut self, client: &mut Conn<Stream>, node: usize) {
        self.node = node;
        if !self.track_statements {
            return;
        }
        let mut request = &client.rbuf()[..self.c2s];
        while let Ok(Some((tag, total))) = crate::protocol::header(request, MAX_MESSAGE_LEN) {
            let Some(body) = request.get(5..total) else {
                break;
            };
            self.statements.observe(tag, body, node);
            request = &request[total..];
        }
    }

    /// Drops a buffered request the session answered itself (e.g. with an error).
    /// Returns true if the client still owes the Sync that ends it (the request ended
    /// with a Flush): PostgreSQL would then skip everything up to that Sync.
    pub fn discard_request(&mut self, client: &mut Conn<Stream>) -> bool {
        client.rbuf().advance(self.c2s);
        self.c2s = 0;
        self.pending = 0;
        self.extended_open = false;
        self.last_boundary == Some(frontend::FLUSH)
    }

    /// After a failed extended request: drops client messages up to and including the
    /// next Sync, as PostgreSQL does after an error. Cancel safe.
    pub async fn skip_until_sync(
        &mut self,
        client: &mut Conn<Stream>,
    ) -> Result<(), crate::stream::StreamError> {
        loop {
            let frame = client.read_frame(MAX_MESSAGE_LEN).await?;
            match frame.tag() {
                frontend::SYNC => return Ok(()),
                frontend::TERMINATE => {
                    self.client_done = true;
                    return Ok(());
                }
                _ => {}
            }
        }
    }

    /// Detached: reads until a complete request (up to Query, Sync, Flush or
    /// FunctionCall) is scanned, or the client leaves. Cancel safe.
    pub async fn read_request(
        &mut self,
        client: &mut Conn<Stream>,
        pools: &Pools,
    ) -> Result<(), io::Error> {
        self.client_paused = false;
        loop {
            let stopped = self.scan_client(client, pools, false);
            if stopped || self.client_done {
                return Ok(());
            }
            if poll_fn(|cx| client.poll_read_more(cx)).await? == 0 {
                self.client_done = true;
                return Ok(());
            }
        }
    }

    /// Scans newly read client bytes. Returns true if the scan stopped at a request
    /// boundary (detached), a Terminate, or a protocol error.
    fn scan_client(&mut self, client: &mut Conn<Stream>, pools: &Pools, attached: bool) -> bool {
        if self.client_done || self.protocol_error.is_some() {
            return true;
        }
        if attached && self.client_paused {
            return false;
        }
        let buf = &client.rbuf()[self.c2s..];
        let mut state = ClientScan {
            hold: attached && self.hold_at_boundary,
            paused: false,
            boundary: None,
            wire_pending: 0,
            ignored_syncs: 0,
            copy_syncs: self.copy_syncs,
            extended_open: self.extended_open,
            unnamed_unexecuted: self.unnamed_unexecuted,
            terminate: false,
            bad_tag: None,
        };
        let (statements, node) = (&mut self.statements, self.node);
        let track = attached && self.track_statements;
        let scanned = self.client_scan.scan(buf, |tag, body| {
            if track {
                if let Some(body) =
                    body.filter(|_| matches!(tag, frontend::PARSE | frontend::CLOSE))
                {
                    statements.observe(tag, body, node);
                }
            }
            state.on_message(tag, body, pools, attached)
        });
        self.pending = (self.pending + state.wire_pending).saturating_sub(state.ignored_syncs);
        self.copy_syncs = state.copy_syncs;
        self.extended_open = state.extended_open;
        self.unnamed_unexecuted = state.unnamed_unexecuted;
        self.client_paused |= state.paused;
        if state.boundary.is_some() {
            self.last_boundary = state.boundary;
        }
        match scanned {
            Ok(s) => {
                self.c2s += s.forward;
                if state.terminate {
                    self.client_done = true;
                }
                if let Some(tag) = state.bad_tag {
                    self.protocol_error = Some(ProtocolError::UnexpectedTag { tag: tag as char });
                }
                s.stopped
            }
            Err(err) => {
                self.protocol_error = Some(err);
                true
            }
        }
    }

    fn scan_server(
        &mut self,
        server: &mut Conn<Stream>,
        server_params: &mut ParamSet,
        client_params: &mut ParamSet,
    ) {
        let buf = &server.rbuf()[self.s2c..];
        let txn_pooling = self.transaction_pooling;
        let (mut pending, mut status, mut release) = (self.pending, self.status, false);
        let extended_open = self.extended_open || self.unnamed_unexecuted;
        let paused = self.client_paused;
        let mut resume = false;
        let scanned = self.server_scan.scan(buf, |tag, body| match (tag, body) {
            (backend::READY_FOR_QUERY, Some(body)) => {
                status = backend::ready_status(body).unwrap_or(b'E');
                pending = pending.saturating_sub(1);
                if txn_pooling && pending == 0 && status == b'I' && !extended_open {
                    release = true;
                    return Step::StopAfter;
                }
                resume |= paused && pending == 0;
                Step::Forward
            }
            // The server waits for the client's COPY data.
            (backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE, _) => {
                resume |= paused;
                Step::Forward
            }
            (backend::PARAMETER_STATUS, Some(body)) => {
                if let Ok((name, value)) = backend::parameter_status(body) {
                    server_params.set_reported(name, value);
                    client_params.set_reported(name, value);
                }
                Step::Forward
            }
            _ => Step::Forward,
        });
        self.pending = pending;
        self.status = status;
        if resume {
            self.client_paused = false;
            self.resume_client = true;
        }
        match scanned {
            Ok(s) => {
                self.s2c += s.forward;
                self.release_point = release;
            }
            Err(err) => {
                self.server_eof = Some(Some(io::Error::new(io::ErrorKind::InvalidData, err)))
            }
        }
    }

    /// Relays until the session must act. Cancel safe only between calls; the session
    /// does not select over it.
    pub async fn relay(
        &mut self,
        client: &mut Conn<Stream>,
        server: &mut Conn<Stream>,
        params: (&mut ParamSet, &mut ParamSet),
        pools: &Pools,
    ) -> RelayEnd {
        let (server_params, client_params) = params;
        self.release_point = false;
        self.server_eof = None;
        // A request read while detached is in flight: with hold_at_boundary, what the
        // client sent after it waits for its answer.
        self.client_paused = self.hold_at_boundary
            && self.c2s > 0
            && matches!(
                self.last_boundary,
                Some(frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL)
            );
        // Bytes already buffered (a request read while detached) are scanned first.
        self.scan_client(client, pools, true);
        poll_fn(|cx| self.poll_relay(cx, client, server, server_params, client_params, pools)).await
    }

    fn poll_relay(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Conn<Stream>,
        server: &mut Conn<Stream>,
        server_params: &mut ParamSet,
        client_params: &mut ParamSet,
        pools: &Pools,
    ) -> Poll<RelayEnd> {
        loop {
            let mut progress = false;
            match self.write_to_client(cx, client, server) {
                Ok(p) => progress |= p,
                Err(err) => return Poll::Ready(RelayEnd::ClientIo(err)),
            }
            if self.s2c == 0 && !self.client_needs_flush {
                if let Some(eof) = self.server_eof.take() {
                    return Poll::Ready(RelayEnd::ServerGone(eof));
                }
                if self.release_point {
                    if self.server_clean(server) {
                        return Poll::Ready(RelayEnd::TransactionDone);
                    }
                    // The client sent more meanwhile: keep the server and go on.
                    self.release_point = false;
                    self.scan_server(server, server_params, client_params);
                    progress = true;
                }
            }
            match self.write_to_server(cx, client, server) {
                Ok(p) => progress |= p,
                Err(err) => self.server_eof = Some(Some(err)),
            }
            if self.c2s == 0 {
                if let Some(err) = self.protocol_error.take() {
                    return Poll::Ready(RelayEnd::ClientProtocol(err));
                }
                if self.client_done {
                    return Poll::Ready(RelayEnd::ClientGone);
                }
            }
            if self.server_eof.is_none() && !self.release_point && self.s2c < HIGH_WATER {
                // Only a completed read is progress: a pending write must not spin us.
                if let Poll::Ready(read) = server.poll_read_more(cx) {
                    match read {
                        Ok(0) => self.server_eof = Some(None),
                        Ok(_) => self.scan_server(server, server_params, client_params),
                        Err(err) => self.server_eof = Some(Some(err)),
                    }
                    progress = true;
                }
            }
            if std::mem::take(&mut self.resume_client) {
                self.scan_client(client, pools, true);
                progress = true;
            }
            if !self.client_done && self.protocol_error.is_none() && self.c2s < HIGH_WATER {
                match client.poll_read_more(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.client_done = true;
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => {
                        self.scan_client(client, pools, true);
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn write_to_client(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Conn<Stream>,
        server: &mut Conn<Stream>,
    ) -> io::Result<bool> {
        let progress = forward(cx, server, client, &mut self.s2c)?;
        self.client_needs_flush |= progress;
        if self.client_needs_flush {
            match client.poll_flush(cx) {
                Poll::Ready(Ok(())) => self.client_needs_flush = false,
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
        let progress = forward(cx, client, server, &mut self.c2s)?;
        if progress {
            // TLS buffers records; plain TCP returns at once.
            if let Poll::Ready(Err(err)) = server.poll_flush(cx) {
                return Err(err);
            }
        }
        Ok(progress)
    }
}

/// Writes the first `*pending` bytes of `from`'s read buffer to `to`, consuming them
/// as they go. Returns whether anything was written.
fn forward(
    cx: &mut Context<'_>,
    from: &mut Conn<Stream>,
    to: &mut Conn<Stream>,
    pending: &mut usize,
) -> io::Result<bool> {
    let mut progress = false;
    while *pending > 0 {
        match to.poll_write(cx, &from.rbuf()[..*pending]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => {
                from.rbuf().advance(n);
                *pending -= n;
                progress = true;
            }
            Poll::Ready(Err(err)) => return Err(err),
            Poll::Pending => break,
        }
    }
    Ok(progress)
}

/// What one scan of client bytes learned.
struct ClientScan {
    /// Stop after each request that the server answers with ReadyForQuery.
    hold: bool,
    /// Stopped so: the rest waits for the answer.
    paused: bool,
    /// The request-ending message seen last, if any.
    boundary: Option<u8>,
    wire_pending: usize,
    /// Syncs counted in `pending` that the server ignored during COPY FROM STDIN.
    ignored_syncs: usize,
    copy_syncs: usize,
    extended_open: bool,
    unnamed_unexecuted: bool,
    terminate: bool,
    bad_tag: Option<u8>,
}

impl ClientScan {
    fn on_message(&mut self, tag: u8, body: Option<&[u8]>, pools: &Pools, attached: bool) -> Step {
        if matches!(
            tag,
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL | frontend::FLUSH
        ) {
            self.boundary = Some(tag);
        }
        let boundary = if !attached {
            Step::StopAfter
        } else if self.hold && tag != frontend::FLUSH {
            self.paused = true;
            Step::StopAfter
        } else {
            Step::Forward
        };
        match tag {
            _ if !KNOWN[tag as usize] => {
                self.bad_tag = Some(tag);
                Step::StopBefore
            }
            frontend::TERMINATE => {
                self.terminate = true;
                Step::StopBefore
            }
            frontend::QUERY => {
                if let Some(sql) = body.and_then(|b| frontend::query_text(b).ok()) {
                    close_idle_before_database_command(sql, pools);
                }
                self.wire_pending += 1;
                self.copy_syncs = 0;
                // A simple query destroys the unnamed statement.
                self.unnamed_unexecuted = false;
                boundary
            }
            frontend::SYNC | frontend::FUNCTION_CALL => {
                self.wire_pending += 1;
                self.copy_syncs += usize::from(tag == frontend::SYNC);
                self.extended_open = false;
                boundary
            }
            frontend::FLUSH => boundary,
            frontend::COPY_DONE | frontend::COPY_FAIL => {
                self.ignored_syncs += std::mem::take(&mut self.copy_syncs);
                Step::Forward
            }
            frontend::EXECUTE => {
                self.copy_syncs = 0;
                self.extended_open = true;
                self.unnamed_unexecuted = false;
                Step::Forward
            }
            frontend::PARSE => {
                self.extended_open = true;
                if body.is_some_and(|b| b.first() == Some(&0)) {
                    self.unnamed_unexecuted = true;
                }
                Step::Forward
            }
            frontend::BIND | frontend::DESCRIBE | frontend::CLOSE => {
                self.extended_open = true;
                Step::Forward
            }
            _ => Step::Forward,
        }
    }
}

/// `DROP DATABASE x` and friends fail while any session is connected to `x`,
/// including pgrelay's own idle servers: close those first.
fn close_idle_before_database_command(sql: &[u8], pools: &Pools) {
    if let Some(db) = classify::database_needing_exclusive_use(sql) {
        let closed = pools.close_idle_for_dbname(&db);
        tracing::info!(database = %db, closed, "closed idle server connections before a database command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(tags: &[u8]) -> ClientScan {
        let pools = Pools::default();
        let mut state = ClientScan {
            hold: false,
            paused: false,
            boundary: None,
            wire_pending: 0,
            ignored_syncs: 0,
            copy_syncs: 0,
            extended_open: false,
            unnamed_unexecuted: false,
            terminate: false,
            bad_tag: None,
        };
        for &tag in tags {
            state.on_message(tag, None, &pools, true);
        }
        state
    }

    #[test]
    fn syncs_inside_copy_in_are_owed_nothing() {
        // tokio-postgres: Bind, Execute, Sync, CopyData.., CopyDone, Sync.
        let state = scan(b"BESddcS");
        assert_eq!(state.wire_pending - state.ignored_syncs, 1);
        let state = scan(b"BESdfS");
        assert_eq!(state.wire_pending - state.ignored_syncs, 1);
        // Flush instead of Sync before the data: the one Sync is answered.
        let state = scan(b"BEHdcS");
        assert_eq!(state.wire_pending - state.ignored_syncs, 1);
        // A simple-protocol COPY after an extended query owes both ReadyForQuerys.
        let state = scan(b"BESQdc");
        assert_eq!(state.wire_pending - state.ignored_syncs, 2);
    }
}
