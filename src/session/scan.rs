//! The client side of the relay: its state ([`ClientSide`]), what each client message
//! means for it (answers owed, extended-protocol state, request boundaries, COPY), and
//! what Query and Parse texts do to the session. [`Wire::scan_client_bytes`] takes
//! bytes, without I/O, and the relay acts on what it learned. Between servers, a
//! request is read whole through the same scan ([`super::detached`]).

use crate::protocol::frontend::{self, KNOWN};
use crate::protocol::{ProtocolError, Scanned, Scanner, Step, MAX_MESSAGE_LEN};
use crate::router::classify::effects::Effects;
use crate::router::classify::{self, session_effects, Classifier};
use crate::router::{Plan, StatementNodes};
use crate::session::carry::{carry, Carry};
use crate::session::pids;
use crate::session::prepared::Prepared;
use crate::session::relay::Wire;

/// The client message the scan stopped in front of, with prepared statements carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Front {
    /// Nothing: client bytes are relayed as they come.
    #[default]
    Relayed,
    /// It names a statement: rewrite it once everything before it is on its way.
    Rewrite,
    /// A `DEALLOCATE` of the client's own statement: answer it once everything before
    /// it is answered.
    Answer,
    /// A request that may be a call on a pid pgrelay issued: once everything before it
    /// is answered, the session reads and handles it ([`super::relay::RelayEnd::Intercepted`]).
    PidCall,
    /// A Query with a database command (`DROP DATABASE` ...): the same, so that the
    /// session closes idle servers of that database before it goes out.
    DatabaseCommand,
}

/// What the relay knows of the client's side of the wire; kept across servers.
#[derive(Debug)]
pub(super) struct ClientSide {
    pub(super) scanner: Scanner,
    /// Scanned client bytes at the front of the client's read buffer, not yet written.
    pub(super) c2s: usize,
    /// The exchange with the current server (or the request read while detached).
    pub(super) exchange: Exchange,
    pub(super) end: ClientEnd,
    /// The message that ended the last request read while detached (Query, Sync,
    /// Flush or FunctionCall): a Flush means the client has not finished it yet.
    pub(super) last_boundary: Option<u8>,
    /// The client parsed a call on a pid (maybe as a named statement): its Binds are
    /// looked at too.
    pub(super) pid_statements: bool,
    /// Bytes went to the client since its socket was last flushed.
    pub(super) needs_flush: bool,
}

impl ClientSide {
    /// `max_inspected`: `limits.max_request_buffer`, the most of one inspected message
    /// (a Query, a Parse) buffered while attached too (0: the protocol's limit).
    pub(super) fn new(carried: bool, max_inspected: usize) -> ClientSide {
        let inspect = if carried {
            &frontend::INSPECT_PREPARED
        } else {
            &frontend::INSPECT
        };
        ClientSide {
            scanner: Scanner::new(inspect, MAX_MESSAGE_LEN).limit_inspected(max_inspected),
            c2s: 0,
            exchange: Exchange::default(),
            end: ClientEnd::Open,
            last_boundary: None,
            pid_statements: false,
            needs_flush: false,
        }
    }

    /// The client can send no more: it left, or broke the protocol.
    pub(super) fn ended(&self) -> bool {
        self.end != ClientEnd::Open
    }
}

/// The client's exchange with its server: what it is owed and where its request
/// stands. Replaced whole when the exchange is abandoned (the server was lost, or
/// pgrelay answered the request itself).
#[derive(Debug, Default)]
pub(super) struct Exchange {
    /// ReadyForQuery messages owed for forwarded Query, Sync and FunctionCall.
    pub(super) pending: usize,
    /// Extended-protocol messages were sent after the last Sync.
    pub(super) extended_open: bool,
    /// The client parsed the unnamed statement and has not executed anything since
    /// (asyncpg with its cache off, `PQprepare` with an empty name): the statement
    /// lives only on this server, so the server stays with the client until it runs.
    pub(super) unnamed_unexecuted: bool,
    /// Syncs sent since the last Execute or Query. If a CopyDone or CopyFail follows,
    /// the server read them in COPY FROM STDIN mode, where it ignores Sync (libpq and
    /// tokio-postgres send Sync right after Execute, before the copy data), so they are
    /// owed no ReadyForQuery.
    pub(super) copy_syncs: usize,
    pub(super) flow: Flow,
    /// What waits first in the client's buffer for pgrelay to handle it.
    pub(super) front: Front,
    /// A request read while detached names statements: rewrite it when attached.
    pub(super) rewrite_buffered: bool,
}

impl Exchange {
    /// The server may not go back to its pool: an extended request is open, or the
    /// unnamed statement it parsed waits to run there.
    pub(super) fn holds_server(&self) -> bool {
        self.extended_open || self.unnamed_unexecuted
    }
}

/// Whether client bytes are scanned as they come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Flow {
    #[default]
    Flowing,
    /// Bytes past a request boundary wait until the server answers it.
    Paused,
    /// The server answered: scan and forward what the client sent meanwhile.
    Resume,
}

/// Whether the client's stream goes on.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ClientEnd {
    Open,
    /// A Terminate is first in the client buffer, or the client closed.
    Done,
    /// The client broke the protocol; the scan stopped in front of it.
    Broken(ProtocolError),
}

impl ClientEnd {
    /// The protocol error, if that is how the stream ended; the stream is then open
    /// again as far as the relay is concerned (the session ends it).
    pub(super) fn take_error(&mut self) -> Option<ProtocolError> {
        match std::mem::replace(self, ClientEnd::Open) {
            ClientEnd::Broken(err) => Some(err),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// One scan of client bytes: the state it updates in place, and what it learned.
struct ClientScan<'a> {
    /// Attached to a server (or reading a request while detached).
    attached: bool,
    /// Stop after each request that the server answers with ReadyForQuery.
    hold: bool,
    exchange: &'a mut Exchange,
    learned: Learned,
    /// Where the client's statements live, and the node they go to now (when tracked).
    statements: Option<(&'a mut StatementNodes, usize)>,
    prepared: Option<&'a mut Prepared>,
    /// What the requests do to the session (when tracked).
    effects: Option<&'a mut Effects>,
    /// A request read for routing: its texts are understood with this classifier, and
    /// their route classes added to the request's plan.
    route: Option<(&'a Classifier, &'a mut Plan)>,
    /// Stop in front of requests that may be calls on pids pgrelay issued.
    intercept_pids: bool,
    pid_statements: &'a mut bool,
}

/// The counts a scan of client bytes leaves for [`Wire::absorb`].
#[derive(Debug, Default)]
struct Learned {
    /// The request-ending message seen last, if any.
    boundary: Option<u8>,
    /// ReadyForQuery messages the messages scanned are owed.
    owed: usize,
    /// Syncs counted in `owed` (or earlier) that the server ignored during COPY FROM
    /// STDIN.
    ignored_syncs: usize,
    terminate: bool,
    bad_tag: Option<u8>,
    /// Query and Execute messages seen.
    queries: u64,
    /// A request read while detached is a database command on this database.
    database_command: Option<String>,
}

impl ClientScan<'_> {
    fn on_message(&mut self, tag: u8, body: Option<&[u8]>) -> Step {
        if let Some(body) = body {
            if let Some(step) = self.intercept(tag, body) {
                return step;
            }
            if let Some(step) = self.database_command(tag, body) {
                return step;
            }
            if let Some((statements, node)) = self.statements.as_mut() {
                if matches!(tag, frontend::PARSE | frontend::CLOSE) {
                    statements.observe(tag, body, *node);
                }
            }
            if let Some(step) = self.carry(tag, body) {
                return step;
            }
        }
        self.note_effects(tag, body);
        let step = self.on_wire(tag, body);
        if self.attached && step != Step::StopBefore {
            if let Some(p) = self.prepared.as_deref_mut() {
                p.forwarded(tag);
            }
        }
        step
    }

    /// Stops in front of a request that may be a call on a pid pgrelay issued.
    fn intercept(&mut self, tag: u8, body: &[u8]) -> Option<Step> {
        if !self.intercept_pids {
            return None;
        }
        let prepared = self.prepared.as_deref();
        let carried = |name: &[u8]| Some(prepared?.statement(name)?.text());
        if !pids::may_be_call(tag, body, *self.pid_statements, carried) {
            return None;
        }
        // Its Binds are worth a look from now on.
        *self.pid_statements |= tag == frontend::PARSE;
        // Only at a request's start: what came before gets all its answers.
        if self.attached && !self.exchange.extended_open {
            self.exchange.front = Front::PidCall;
            return Some(Step::StopBefore);
        }
        None
    }

    /// Stops in front of a database command while attached (the session closes idle
    /// servers of its database first), or notes it in a request read while detached.
    fn database_command(&mut self, tag: u8, body: &[u8]) -> Option<Step> {
        let db = database_command(tag, body)?;
        if self.attached && !self.exchange.extended_open {
            self.exchange.front = Front::DatabaseCommand;
            return Some(Step::StopBefore);
        }
        self.learned.database_command = Some(db);
        None
    }

    /// Stops in front of a message that names a carried statement, or notes that the
    /// request read while detached does.
    fn carry(&mut self, tag: u8, body: &[u8]) -> Option<Step> {
        match carry(self.prepared.as_deref()?, tag, body, self.attached) {
            // Answered in its turn, once everything before it is.
            Carry::Answer => {
                self.exchange.front = Front::Answer;
                Some(Step::StopBefore)
            }
            // Accounted for now, rewritten once what precedes it is on its way.
            Carry::Rewrite => {
                self.exchange.front = Front::Rewrite;
                if let Some(effects) = self.effects.as_deref_mut() {
                    note_effects(true, tag, Some(body), effects);
                }
                self.on_wire(tag, Some(body));
                Some(Step::StopBefore)
            }
            Carry::Later => {
                self.exchange.rewrite_buffered = true;
                None
            }
            Carry::Relay => None,
        }
    }

    /// Notes what a Query or Parse does to the session (and, read for routing, where
    /// it may run), and tells the carried statements when the server's may have gone or
    /// changed.
    fn note_effects(&mut self, tag: u8, body: Option<&[u8]>) {
        if let Some((classifier, plan)) = self.route.as_mut() {
            let Some(text) = text_of(tag, body) else {
                return;
            };
            let meaning = if tag == frontend::QUERY {
                classifier.understand(text)
            } else {
                classifier.understand_prepared(text)
            };
            plan.text(tag == frontend::PARSE, &meaning);
            if let Some(effects) = self.effects.as_deref_mut() {
                let changed_schema = effects.schema_change;
                if !meaning.effects.is_empty() {
                    effects.merge(meaning.effects);
                }
                self.effects_noted(changed_schema);
            }
            return;
        }
        let Some(effects) = self.effects.as_deref_mut() else {
            return;
        };
        let changed_schema = effects.schema_change;
        note_effects(true, tag, body, effects);
        self.effects_noted(changed_schema);
    }

    /// Tells the carried statements when the server's may have gone or changed.
    fn effects_noted(&mut self, changed_schema: bool) {
        let Some(effects) = self.effects.as_deref() else {
            return;
        };
        if let Some(p) = self.prepared.as_deref_mut() {
            if effects.deallocate_all {
                p.distrust_server();
            }
            if effects.schema_change && !changed_schema {
                // Statements the client prepares later in this transaction see the
                // change; the end of the transaction bumps again for everyone else.
                p.schema_changed();
            }
        }
    }

    /// What the message means for the wire: answers owed, extended-protocol state,
    /// request boundaries, COPY.
    fn on_wire(&mut self, tag: u8, body: Option<&[u8]>) -> Step {
        let boundary = self.boundary(tag);
        self.learned.queries += u64::from(matches!(tag, frontend::QUERY | frontend::EXECUTE));
        let exchange = &mut *self.exchange;
        match tag {
            _ if !KNOWN[tag as usize] => {
                self.learned.bad_tag = Some(tag);
                Step::StopBefore
            }
            frontend::TERMINATE => {
                self.learned.terminate = true;
                Step::StopBefore
            }
            frontend::QUERY => {
                self.learned.owed += 1;
                exchange.copy_syncs = 0;
                // A simple query destroys the unnamed statement.
                exchange.unnamed_unexecuted = false;
                boundary
            }
            frontend::SYNC | frontend::FUNCTION_CALL => {
                self.learned.owed += 1;
                exchange.copy_syncs += usize::from(tag == frontend::SYNC);
                exchange.extended_open = false;
                boundary
            }
            frontend::FLUSH => boundary,
            frontend::COPY_DONE | frontend::COPY_FAIL => {
                self.learned.ignored_syncs += std::mem::take(&mut exchange.copy_syncs);
                Step::Forward
            }
            frontend::EXECUTE => {
                exchange.copy_syncs = 0;
                exchange.extended_open = true;
                exchange.unnamed_unexecuted = false;
                Step::Forward
            }
            frontend::PARSE => {
                exchange.extended_open = true;
                if body.is_some_and(|b| frontend::parse(b).is_ok_and(|p| p.name.is_empty())) {
                    exchange.unnamed_unexecuted = true;
                }
                Step::Forward
            }
            frontend::BIND | frontend::DESCRIBE | frontend::CLOSE => {
                exchange.extended_open = true;
                Step::Forward
            }
            _ => Step::Forward,
        }
    }

    /// Where the scan goes after a request-ending message `tag` (if it is one).
    fn boundary(&mut self, tag: u8) -> Step {
        if matches!(
            tag,
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL | frontend::FLUSH
        ) {
            self.learned.boundary = Some(tag);
        }
        let answered = matches!(
            tag,
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL
        );
        if !self.attached {
            Step::StopAfter
        } else if self.hold && answered {
            self.exchange.flow = Flow::Paused;
            Step::StopAfter
        } else {
            Step::Forward
        }
    }
}

impl Wire {
    /// Scans client bytes newly read into `buf` (the client's read buffer past what
    /// was scanned before). Returns true if the scan stopped at a request boundary
    /// (detached), a Terminate, or a protocol error.
    pub(super) fn scan_client_bytes(&mut self, buf: &[u8], attached: bool) -> bool {
        self.scan_client_routed(buf, attached, None)
    }

    /// [`Wire::scan_client_bytes`], understanding the texts of a request read for
    /// routing with `classifier`.
    pub(super) fn scan_client_routed(
        &mut self,
        buf: &[u8],
        attached: bool,
        classifier: Option<&Classifier>,
    ) -> bool {
        if self.client.ended() {
            return true;
        }
        if attached && self.client.exchange.flow == Flow::Paused {
            return false;
        }
        let ClientSide {
            scanner,
            exchange,
            pid_statements,
            ..
        } = &mut self.client;
        let policy = &self.policy;
        let mut scan = ClientScan {
            attached,
            hold: attached && policy.hold_at_boundary,
            exchange,
            learned: Learned::default(),
            statements: (attached && policy.track_statements)
                .then_some((&mut self.statements, self.node)),
            prepared: self.prepared.as_deref_mut(),
            effects: policy.track_effects.then_some(&mut self.effects),
            route: classifier.map(|c| (c, &mut self.texts)),
            intercept_pids: policy.own_pid.is_some(),
            pid_statements,
        };
        let scanned = scanner.scan(buf, |tag, body| scan.on_message(tag, body));
        let learned = scan.learned;
        self.absorb(learned, attached, scanned)
    }

    /// Takes what one scan of client bytes learned; returns whether it stopped.
    fn absorb(
        &mut self,
        learned: Learned,
        attached: bool,
        scanned: Result<Scanned, ProtocolError>,
    ) -> bool {
        if attached && learned.ignored_syncs > 0 {
            if let Some(p) = self.prepared.as_deref_mut() {
                p.syncs_ignored(learned.ignored_syncs);
            }
        }
        self.counts.queries += learned.queries;
        if learned.database_command.is_some() {
            self.database_command = learned.database_command;
        }
        let exchange = &mut self.client.exchange;
        if attached && exchange.pending == 0 && learned.owed > 0 && self.query_start.is_none() {
            // A request relayed with nothing owed before it starts a query's time. (The
            // first of a transaction's requests is timed by the session, for free.)
            if self.query_latency.is_some() {
                self.query_start = Some(std::time::Instant::now());
            }
        }
        exchange.pending = (exchange.pending + learned.owed).saturating_sub(learned.ignored_syncs);
        if learned.boundary.is_some() {
            self.client.last_boundary = learned.boundary;
        }
        match scanned {
            Ok(s) => {
                self.client.c2s += s.forward;
                if learned.terminate {
                    self.client.end = ClientEnd::Done;
                }
                if let Some(tag) = learned.bad_tag {
                    let err = ProtocolError::UnexpectedTag { tag: tag as char };
                    self.client.end = ClientEnd::Broken(err);
                }
                s.stopped
            }
            Err(err) => {
                self.client.end = ClientEnd::Broken(err);
                true
            }
        }
    }
}

/// The text of a Query or a Parse.
fn text_of(tag: u8, body: Option<&[u8]>) -> Option<&[u8]> {
    match (tag, body) {
        (frontend::QUERY, Some(body)) => frontend::query_text(body).ok(),
        (frontend::PARSE, Some(body)) => frontend::parse(body).and_then(|p| p.text()).ok(),
        _ => None,
    }
}

/// Adds what a Query or Parse text does to the session.
pub(super) fn note_effects(track: bool, tag: u8, body: Option<&[u8]>, effects: &mut Effects) {
    if !track {
        return;
    }
    if let Some(text) = text_of(tag, body) {
        let found = session_effects(text);
        if !found.is_empty() {
            effects.merge(found);
        }
    }
}

/// The database a Query needs free of other sessions (`DROP DATABASE x` and friends
/// fail while any session is connected to `x`, pgrelay's own idle servers included):
/// the session closes those before the Query goes out.
pub(super) fn database_command(tag: u8, body: &[u8]) -> Option<String> {
    if tag != frontend::QUERY {
        return None;
    }
    let sql = frontend::query_text(body).ok()?;
    classify::database_needing_exclusive_use(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owed ReadyForQuery messages after scanning messages of `tags` (empty bodies).
    fn owed(tags: &[u8]) -> usize {
        let mut wire = Wire::new(crate::session::relay::Policy::default(), None);
        let mut bytes = bytes::BytesMut::new();
        for &tag in tags {
            frontend::put_message(&mut bytes, tag, b"");
        }
        wire.scan_client_bytes(&bytes, true);
        wire.client.exchange.pending
    }

    #[test]
    fn syncs_inside_copy_in_are_owed_nothing() {
        // tokio-postgres: Bind, Execute, Sync, CopyData.., CopyDone, Sync.
        assert_eq!(owed(b"BESddcS"), 1);
        assert_eq!(owed(b"BESdfS"), 1);
        // Flush instead of Sync before the data: the one Sync is answered.
        assert_eq!(owed(b"BEHdcS"), 1);
        // A simple-protocol COPY after an extended query owes both ReadyForQuerys.
        assert_eq!(owed(b"BESQdc"), 2);
    }

    #[test]
    fn a_protocol_error_is_taken_once() {
        let mut end = ClientEnd::Broken(ProtocolError::UnexpectedTag { tag: 'z' });
        assert!(end.take_error().is_some());
        assert_eq!(end, ClientEnd::Open);
        let mut end = ClientEnd::Done;
        assert!(end.take_error().is_none());
        assert_eq!(end, ClientEnd::Done);
    }
}
