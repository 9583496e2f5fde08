//! The hot path: moves bytes between a client and its server without copying them into
//! new buffers or re-encoding them, watching only message headers, Query text (for the
//! database commands that need idle connections closed, which the session does),
//! ParameterStatus and ReadyForQuery.
//!
//! [`Wire`] is the per-session relay state. [`Wire::relay`] is one hand-written poll
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
use crate::protocol::frontend;
use crate::protocol::{
    backend, ProtocolError, Scanned, Scanner, Step, HEADER_LEN, MAX_MESSAGE_LEN,
};
use crate::router::classify::effects::Effects;
use crate::router::StatementNodes;
use crate::session::carry::{carry, Carry};
use crate::session::pids;
use crate::session::prepared::{Answer, Prepared};
use crate::session::scan::{database_command, note_effects, ClientScan};
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
    /// The client's next request may be a call on a pid pgrelay issued, or is a
    /// database command that needs idle servers closed first; everything before it is
    /// answered. The session handles it, then relays on.
    Intercepted,
}

/// The client message the scan stopped in front of, with prepared statements carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Front {
    /// Nothing: client bytes are relayed as they come.
    Relayed,
    /// It names a statement: rewrite it once everything before it is on its way.
    Rewrite,
    /// A `DEALLOCATE` of the client's own statement: answer it once everything before
    /// it is answered.
    Answer,
    /// A request that may be a call on a pid pgrelay issued: once everything before it
    /// is answered, the session reads and handles it ([`RelayEnd::Intercepted`]).
    PidCall,
    /// A Query with a database command (`DROP DATABASE` ...): the same, so that the
    /// session closes idle servers of that database before it goes out.
    DatabaseCommand,
}

/// A client's relay state, kept across servers.
pub struct Wire {
    client_scan: Scanner,
    server_scan: Scanner,
    /// Scanned client bytes at the front of the client's read buffer, not yet written.
    pub(super) c2s: usize,
    /// Scanned server bytes at the front of the server's read buffer, not yet written.
    pub(super) s2c: usize,
    /// ReadyForQuery messages owed for forwarded Query, Sync and FunctionCall.
    pub(super) pending: usize,
    /// Extended-protocol messages were sent after the last Sync.
    pub(super) extended_open: bool,
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
    pub(super) status: u8,
    /// The server began a transaction block since its last ReadyForQuery (its
    /// CommandComplete said `BEGIN`): losing it now loses a transaction the client
    /// opened, though `status` still says idle.
    block_opened: bool,
    /// A Terminate is first in the client buffer, or the client closed.
    client_done: bool,
    protocol_error: Option<ProtocolError>,
    /// The last server message scanned completes the transaction (transaction mode).
    pub(super) release_point: bool,
    server_eof: Option<Option<io::Error>>,
    pub(super) client_needs_flush: bool,
    /// Release servers at transaction end (transaction mode).
    pub(super) transaction_pooling: bool,
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
    /// Named prepared statements carried across servers (transaction mode).
    pub(super) prepared: Option<Box<Prepared>>,
    /// Note what requests do to the session (transaction mode).
    pub(super) track_effects: bool,
    /// What the requests relayed since the last [`Wire::take_effects`] do to the session.
    pub(super) effects: Effects,
    /// What waits first in the client's buffer for pgrelay to handle it.
    pub(super) front: Front,
    /// A request read while detached names statements: rewrite it when attached.
    pub(super) rewrite_buffered: bool,
    /// The server message first in its buffer answers an injected one: drop it.
    swallow_front: bool,
    /// ... and tell the client its statement went stale instead (see
    /// [`Answer::Replace`]).
    replace_front: bool,
    /// The server ended the session with this FATAL error (not forwarded: the
    /// session decides what the client is told).
    server_fatal: Option<backend::ErrorFields>,
    /// Since the last [`Wire::take_counts`]: what was relayed.
    counts: Counts,
    /// The pid pgrelay issued this client (transaction mode). A notification sent by
    /// the client's own server reaches the client with it, so that a client sees its
    /// own notifications as its own (asyncpg, psycopg compare pids).
    pub(super) own_pid: Option<i32>,
    /// Stop in front of requests that may be calls on pids pgrelay issued (transaction
    /// mode): the session answers those itself, inside transactions too.
    pub(super) intercept_pids: bool,
    /// The relay goes on with the server it had after [`RelayEnd::Intercepted`]:
    /// nothing the server owes is forgotten.
    pub(super) resumed: bool,
    /// The client parsed a call on a pid (maybe as a named statement): its Binds are
    /// looked at too.
    pub(super) pid_statements: bool,
    /// A request read while detached is a database command on this database: the
    /// session closes its idle servers before relaying it.
    database_command: Option<String>,
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
    pub fn new(transaction_pooling: bool, prepared: Option<Box<Prepared>>) -> Self {
        let inspect = if prepared.is_some() {
            &frontend::INSPECT_PREPARED
        } else {
            &frontend::INSPECT
        };
        Wire {
            client_scan: Scanner::new(inspect, MAX_MESSAGE_LEN),
            server_scan: Scanner::new(&backend::INSPECT, MAX_MESSAGE_LEN),
            c2s: 0,
            s2c: 0,
            pending: 0,
            extended_open: false,
            unnamed_unexecuted: false,
            copy_syncs: 0,
            status: b'I',
            block_opened: false,
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
            prepared,
            track_effects: false,
            effects: Effects::default(),
            front: Front::Relayed,
            rewrite_buffered: false,
            swallow_front: false,
            replace_front: false,
            server_fatal: None,
            counts: Counts::default(),
            own_pid: None,
            intercept_pids: false,
            resumed: false,
            pid_statements: false,
            database_command: None,
        }
    }

    /// The database whose idle servers the request just read needs closed, if any.
    pub fn take_database_command(&mut self) -> Option<String> {
        self.database_command.take()
    }

    /// What was relayed since the last call.
    pub fn take_counts(&mut self) -> Counts {
        std::mem::take(&mut self.counts)
    }

    /// The FATAL error the server ended with, if it sent one.
    pub fn take_server_fatal(&mut self) -> Option<backend::ErrorFields> {
        self.server_fatal.take()
    }

    /// The server went away mid-relay: forgets everything it owed and everything
    /// scanned for it, and says what the client is owed instead. `None` if the client
    /// is in the middle of a message, where its stream cannot be picked up again.
    pub fn server_lost(&mut self, client: &mut Conn<Stream>) -> Option<Loss> {
        if !self.client_scan.at_boundary() {
            return None;
        }
        // Scanned for the lost server, never run: answered as failed below.
        client.rbuf().advance(self.c2s);
        self.c2s = 0;
        let loss = Loss {
            owed: self.pending,
            sync_owed: self.extended_open,
        };
        self.pending = 0;
        self.extended_open = false;
        self.unnamed_unexecuted = false;
        self.copy_syncs = 0;
        self.status = b'I';
        self.block_opened = false;
        self.release_point = false;
        self.server_eof = None;
        self.client_paused = false;
        self.resume_client = false;
        self.swallow_front = false;
        self.replace_front = false;
        self.front = Front::Relayed;
        self.rewrite_buffered = false;
        self.s2c = 0;
        self.server_scan = Scanner::new(&backend::INSPECT, MAX_MESSAGE_LEN);
        if let Some(p) = self.prepared.as_deref_mut() {
            p.server_lost();
        }
        Some(loss)
    }

    /// The client is inside a transaction block on its server: the last ReadyForQuery
    /// said so, or the request in flight began one.
    pub fn in_block(&self) -> bool {
        self.status != b'I' || self.block_opened
    }

    /// What the requests relayed since the last call do to the session.
    pub fn take_effects(&mut self) -> Effects {
        std::mem::take(&mut self.effects)
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
    pub async fn read_request(&mut self, client: &mut Conn<Stream>) -> Result<(), io::Error> {
        self.client_paused = false;
        // Whatever a scan stopped in front of last time is scanned again from here.
        self.front = Front::Relayed;
        self.rewrite_buffered = false;
        loop {
            let stopped = self.scan_client(client, false);
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
    fn scan_client(&mut self, client: &mut Conn<Stream>, attached: bool) -> bool {
        if self.client_done || self.protocol_error.is_some() {
            return true;
        }
        if attached && self.client_paused {
            return false;
        }
        let buf = &client.rbuf()[self.c2s..];
        let mut state = ClientScan::new(attached && self.hold_at_boundary);
        state.copy_syncs = self.copy_syncs;
        state.extended_open = self.extended_open;
        state.unnamed_unexecuted = self.unnamed_unexecuted;
        let (statements, node) = (&mut self.statements, self.node);
        let track = attached && self.track_statements;
        let (prepared, effects) = (&mut self.prepared, &mut self.effects);
        let track_effects = self.track_effects;
        let (mut front, mut rewrite_buffered) = (Front::Relayed, false);
        let (intercept, mut pid_statements) = (self.intercept_pids, self.pid_statements);
        let mut database = None;
        let scanned = self.client_scan.scan(buf, |tag, body| {
            if let (true, Some(body)) = (intercept, body) {
                let carried = |name: &[u8]| Some(prepared.as_deref()?.statement(name)?.text());
                if pids::may_be_call(tag, body, pid_statements, carried) {
                    // Its Binds are worth a look from now on.
                    pid_statements |= tag == frontend::PARSE;
                    // Only at a request's start: what came before gets all its answers.
                    if attached && !state.extended_open {
                        front = Front::PidCall;
                        return Step::StopBefore;
                    }
                }
            }
            if let Some(db) = database_command(tag, body) {
                if attached && !state.extended_open {
                    front = Front::DatabaseCommand;
                    return Step::StopBefore;
                }
                database = Some(db);
            }
            if track {
                if let Some(body) =
                    body.filter(|_| matches!(tag, frontend::PARSE | frontend::CLOSE))
                {
                    statements.observe(tag, body, node);
                }
            }
            if let (Some(p), Some(body)) = (prepared.as_deref(), body) {
                match carry(p, tag, body, attached) {
                    // Answered in its turn, once everything before it is.
                    Carry::Answer => {
                        front = Front::Answer;
                        return Step::StopBefore;
                    }
                    // Accounted for now, rewritten once what precedes it is on its way.
                    Carry::Rewrite => {
                        front = Front::Rewrite;
                        note_effects(track_effects, tag, Some(body), effects);
                        state.on_message(tag, Some(body), attached);
                        return Step::StopBefore;
                    }
                    Carry::Later => rewrite_buffered = true,
                    Carry::Relay => {}
                }
            }
            let changed_schema = effects.schema_change;
            note_effects(track_effects, tag, body, effects);
            if let Some(p) = prepared.as_deref_mut() {
                if effects.deallocate_all {
                    p.distrust_server();
                }
                if effects.schema_change && !changed_schema {
                    // Statements the client prepares later in this transaction see the
                    // change; the end of the transaction bumps again for everyone else.
                    p.schema_changed();
                }
            }
            let step = state.on_message(tag, body, attached);
            if attached && step != Step::StopBefore {
                if let Some(p) = prepared.as_deref_mut() {
                    p.forwarded(tag);
                }
            }
            step
        });
        if front != Front::Relayed {
            self.front = front;
        }
        self.pid_statements = pid_statements;
        self.rewrite_buffered |= rewrite_buffered;
        if database.is_some() {
            self.database_command = database;
        }
        self.absorb(&state, attached, scanned)
    }

    /// Takes what one scan of client bytes learned; returns whether it stopped.
    fn absorb(
        &mut self,
        state: &ClientScan,
        attached: bool,
        scanned: Result<Scanned, ProtocolError>,
    ) -> bool {
        if attached && state.ignored_syncs > 0 {
            if let Some(p) = self.prepared.as_deref_mut() {
                p.syncs_ignored(state.ignored_syncs);
            }
        }
        self.counts.queries += state.queries;
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

    fn scan_server(&mut self, server: &mut Server, client_params: &mut ParamSet) {
        while let Some(at) = self.scan_server_once(server, client_params) {
            // The client's own pid over its server's, in place: no copy, no allocation.
            if let Some(pid) = self.own_pid {
                server.conn.rbuf()[at..at + 4].copy_from_slice(&pid.to_be_bytes());
            }
        }
    }

    /// Scans newly read server bytes. If it stopped after a notification the client's
    /// own server sent, returns where in the read buffer its sender pid is: scan on.
    fn scan_server_once(
        &mut self,
        server: &mut Server,
        client_params: &mut ParamSet,
    ) -> Option<usize> {
        // Only a client with a pid of its own (transaction mode) has them rewritten.
        let own = self.own_pid.is_some_and(|pid| pid != server.pid);
        let (server_pid, mut notified_at) = (server.pid.to_be_bytes(), None);
        let Server {
            conn,
            params: server_params,
            statements: server_statements,
            ..
        } = server;
        let from = self.s2c;
        let buf = &conn.rbuf()[from..];
        let base = buf.as_ptr() as usize;
        let txn_pooling = self.transaction_pooling;
        let (mut pending, mut status, mut release) = (self.pending, self.status, false);
        let mut block_opened = self.block_opened;
        let extended_open = self.extended_open || self.unnamed_unexecuted;
        let paused = self.client_paused;
        let mut resume = false;
        let prepared = &mut self.prepared;
        let mut swallow = false;
        let mut replace = false;
        let mut fatal = None;
        let mut errors = [0u64; 3];
        let scanned = self.server_scan.scan(buf, |tag, body| {
            let error = match (tag, body) {
                (backend::ERROR_RESPONSE, Some(body)) => Some(backend::error_fields(body)),
                _ => None,
            };
            if let Some(p) = prepared.as_deref_mut().filter(|p| p.watches(tag)) {
                match p.on_server(tag, error.as_ref(), server_statements) {
                    Answer::Forward => {}
                    Answer::Swallow => {
                        swallow = true;
                        return Step::StopBefore;
                    }
                    Answer::Replace => {
                        (swallow, replace) = (true, true);
                        return Step::StopBefore;
                    }
                }
            }
            match (tag, body) {
                (backend::READY_FOR_QUERY, Some(body)) => {
                    status = backend::ready_status(body).unwrap_or(b'E');
                    block_opened = false;
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
                (backend::ERROR_RESPONSE, Some(_)) => {
                    match error.and_then(|e| note_error(e, &mut errors)) {
                        // The server ends the session: the session tells the client.
                        Some(fields) => {
                            fatal = Some(fields);
                            Step::StopBefore
                        }
                        None => Step::Forward,
                    }
                }
                (backend::COMMAND_COMPLETE, Some(body)) => {
                    block_opened = backend::block_change(body).unwrap_or(block_opened);
                    Step::Forward
                }
                (backend::PARAMETER_STATUS, Some(body)) => {
                    if let Ok((name, value)) = backend::parameter_status(body) {
                        server_params.set_reported(name, value);
                        client_params.set_reported(name, value);
                    }
                    Step::Forward
                }
                (backend::NOTIFICATION_RESPONSE, Some(body))
                    if own && body.starts_with(&server_pid) =>
                {
                    notified_at = Some(body.as_ptr() as usize - base);
                    Step::StopAfter
                }
                _ => Step::Forward,
            }
        });
        self.swallow_front |= swallow;
        self.replace_front |= replace;
        self.note_server_errors(errors, fatal);
        self.pending = pending;
        self.status = status;
        self.block_opened = block_opened;
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
        notified_at.map(|at| from + at)
    }

    /// Counts the ErrorResponses a scan saw; a FATAL one ends the relay.
    fn note_server_errors(&mut self, errors: [u64; 3], fatal: Option<backend::ErrorFields>) {
        for (total, new) in self.counts.errors.iter_mut().zip(errors) {
            *total += new;
        }
        if fatal.is_some() {
            self.server_fatal = fatal;
            self.server_eof = Some(None);
        }
    }

    /// Relays until the session must act. Cancel safe only between calls; the session
    /// does not select over it.
    pub async fn relay(
        &mut self,
        client: &mut Conn<Stream>,
        server: &mut Server,
        client_params: &mut ParamSet,
    ) -> RelayEnd {
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
        if self.prepared.is_some() {
            self.send_buffered(client, server, client_params);
        }
        self.resumed = false;
        // Bytes already buffered (a request read while detached) are scanned first.
        self.scan_client(client, true);
        poll_fn(|cx| self.poll_relay(cx, client, server, client_params)).await
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
            if self.s2c == 0 && self.swallow_front {
                // The answer to a message of pgrelay's own, whole in the buffer: a
                // ParseComplete or CloseComplete, or the error of a stale Parse.
                let len = crate::protocol::header(server.conn.rbuf(), MAX_MESSAGE_LEN)
                    .ok()
                    .flatten()
                    .map_or(HEADER_LEN, |(_, total)| total);
                server.conn.rbuf().advance(len);
                if std::mem::take(&mut self.replace_front) {
                    backend::stale_plan_error(client.wbuf());
                }
                self.swallow_front = false;
                self.scan_server(server, client_params);
                continue;
            }
            if self.s2c == 0 && !self.client_needs_flush {
                if let Some(eof) = self.server_eof.take() {
                    return Poll::Ready(RelayEnd::ServerGone(eof));
                }
                if self.release_point {
                    if self.server_clean(&mut server.conn) {
                        return Poll::Ready(RelayEnd::TransactionDone);
                    }
                    // The client sent more meanwhile: keep the server and go on.
                    self.release_point = false;
                    self.scan_server(server, client_params);
                    progress = true;
                }
            }
            if self.front != Front::Relayed && self.handle_front(client, server, client_params) {
                self.scan_client(client, true);
                progress = true;
            }
            let intercept = matches!(self.front, Front::PidCall | Front::DatabaseCommand);
            if intercept && self.all_answered(client, server) {
                self.front = Front::Relayed;
                return Poll::Ready(RelayEnd::Intercepted);
            }
            match self.write_to_server(cx, client, &mut server.conn) {
                Ok(p) => progress |= p,
                Err(err) => self.server_eof = Some(Some(err)),
            }
            if self.c2s == 0 && self.front == Front::Relayed {
                if let Some(err) = self.protocol_error.take() {
                    return Poll::Ready(RelayEnd::ClientProtocol(err));
                }
                if self.client_done {
                    return Poll::Ready(RelayEnd::ClientGone);
                }
            }
            if self.server_eof.is_none() && !self.release_point && self.s2c < HIGH_WATER {
                // Only a completed read is progress: a pending write must not spin us.
                if let Poll::Ready(read) = server.conn.poll_read_more(cx) {
                    match read {
                        Ok(0) => self.server_eof = Some(None),
                        Ok(_) => self.scan_server(server, client_params),
                        Err(err) => self.server_eof = Some(Some(err)),
                    }
                    progress = true;
                }
            }
            if std::mem::take(&mut self.resume_client) {
                self.scan_client(client, true);
                progress = true;
            }
            if !self.client_done && self.protocol_error.is_none() && self.c2s < HIGH_WATER {
                match client.poll_read_more(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.client_done = true;
                        progress = true;
                    }
                    Poll::Ready(Ok(_)) => {
                        self.scan_client(client, true);
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

    /// Nothing is on its way to or from the server, nor to the client.
    fn all_answered(&self, client: &mut Conn<Stream>, server: &mut Server) -> bool {
        self.c2s == 0
            && self.s2c == 0
            && self.pending == 0
            && !self.extended_open
            && !self.swallow_front
            && !self.client_needs_flush
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
                Ok(_) if self.s2c == 0 && client.wbuf().is_empty() && !self.client_needs_flush => {
                    return Poll::Ready(true)
                }
                Ok(true) => {}
                Ok(false) => return Poll::Pending,
            }
        })
        .await;
        delivered && self.server_scan.at_boundary()
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
            let moved = forward(cx, server, client, &mut self.s2c)?;
            self.counts.sent += moved as u64;
            progress |= moved > 0;
        }
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
        if !server.wbuf().is_empty() && self.c2s > 0 && self.c2s <= COALESCE {
            // Rewritten messages are followed by raw ones: one write for both.
            server.wbuf().put_slice(&client.rbuf()[..self.c2s]);
            client.rbuf().advance(self.c2s);
            self.c2s = 0;
        }
        let (own, drained) = drain_wbuf(cx, server)?;
        let mut progress = own > 0;
        if drained {
            let moved = forward(cx, client, server, &mut self.c2s)?;
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

/// Counts a server ErrorResponse by severity (ERROR, FATAL, PANIC); returns its fields
/// if it ends the server's session.
fn note_error(fields: backend::ErrorFields, errors: &mut [u64; 3]) -> Option<backend::ErrorFields> {
    let slot = match fields.severity.as_str() {
        "FATAL" => 1,
        "PANIC" => 2,
        _ => 0,
    };
    errors[slot] += 1;
    (slot > 0).then_some(fields)
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
