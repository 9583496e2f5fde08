//! The server side of the relay: its state ([`ServerSide`]) and what each server
//! message means for it (the transaction status, answers to messages pgrelay injected,
//! FATAL errors, reported parameters, the client's own notifications). No I/O:
//! [`Wire::scan_server_bytes`] takes bytes and the relay acts on what it learned.

use std::io;

use crate::pool::params::ParamSet;
use crate::pool::statements::ServerStatements;
use crate::protocol::backend::{self, ErrorFields, TxStatus};
use crate::protocol::{Scanner, Step, MAX_MESSAGE_LEN};
use crate::session::prepared::{Answer, Prepared};
use crate::session::relay::Wire;
use crate::session::scan::Flow;

/// What the relay knows of the server's side of the wire. Replaced whole when the
/// server goes away.
#[derive(Debug)]
pub(super) struct ServerSide {
    pub(super) scanner: Scanner,
    /// Scanned server bytes at the front of the server's read buffer, not yet written.
    pub(super) s2c: usize,
    /// The last ReadyForQuery status.
    pub(super) status: TxStatus,
    /// The server began a transaction block since its last ReadyForQuery (its
    /// CommandComplete said `BEGIN`): losing it now loses a transaction the client
    /// opened, though `status` still says idle.
    pub(super) block_opened: bool,
    /// The last server message scanned completes the transaction (transaction mode).
    pub(super) release_point: bool,
    pub(super) end: ServerEnd,
    pub(super) front: ServerFront,
    /// The server ended the session with this FATAL error (not forwarded: the
    /// session decides what the client is told).
    pub(super) fatal: Option<ErrorFields>,
    /// ReadyForQuery messages scanned, wrapping: the session's timeouts see each
    /// answered request of a pipeline by it.
    pub(super) readies: u32,
}

impl ServerSide {
    pub(super) fn new() -> ServerSide {
        ServerSide {
            scanner: Scanner::new(&backend::INSPECT, MAX_MESSAGE_LEN),
            s2c: 0,
            status: TxStatus::Idle,
            block_opened: false,
            release_point: false,
            end: ServerEnd::Open,
            front: ServerFront::Relayed,
            fatal: None,
            readies: 0,
        }
    }
}

/// Whether the server's stream goes on.
#[derive(Debug)]
pub(super) enum ServerEnd {
    Open,
    /// It closed, or ended the session with a FATAL error.
    Closed,
    Failed(io::Error),
}

impl ServerEnd {
    pub(super) fn is_open(&self) -> bool {
        matches!(self, ServerEnd::Open)
    }

    /// How it ended (`Some(None)`: closed), leaving it open; `None` if it is open.
    pub(super) fn take(&mut self) -> Option<Option<io::Error>> {
        match std::mem::replace(self, ServerEnd::Open) {
            ServerEnd::Open => None,
            ServerEnd::Closed => Some(None),
            ServerEnd::Failed(err) => Some(Some(err)),
        }
    }
}

/// What the server message first in its buffer is, once the scan stopped in front of
/// it. Ordered: a later scan can only make it more to handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum ServerFront {
    /// Nothing to handle: server bytes are relayed as they come.
    Relayed,
    /// The answer to a message pgrelay injected: drop it.
    Swallow,
    /// ... and tell the client its statement went stale instead (see
    /// [`Answer::Replace`]).
    Replace,
}

/// The server's parts a scan of its bytes reads and updates.
pub(super) struct ServerParts<'a> {
    pub(super) pid: i32,
    pub(super) params: &'a mut ParamSet,
    pub(super) statements: &'a mut ServerStatements,
}

/// One scan of server bytes: the state it updates in place, and what it learned.
struct ServerScan<'a> {
    status: &'a mut TxStatus,
    block_opened: &'a mut bool,
    pending: &'a mut usize,
    flow: &'a mut Flow,
    front: ServerFront,
    /// Release servers at transaction end, unless the client holds this one.
    may_release: bool,
    release: bool,
    prepared: Option<&'a mut Prepared>,
    server_statements: &'a mut ServerStatements,
    server_params: &'a mut ParamSet,
    client_params: &'a mut ParamSet,
    fatal: Option<ErrorFields>,
    /// ReadyForQuery messages seen.
    readies: u32,
    /// A ReadyForQuery answered everything owed, and the relay goes on past it: the
    /// query it ended is timed by the relay (at a release point, by the session).
    answered: bool,
    /// ErrorResponses by severity: ERROR, FATAL, PANIC.
    errors: [u64; 3],
    /// The sender pid of notifications to stop after (the client's own server's).
    own_notifier: Option<[u8; 4]>,
    /// Where in the scanned bytes the last such notification's sender pid is.
    notified_at: Option<usize>,
    base: usize,
}

impl ServerScan<'_> {
    fn on_message(&mut self, tag: u8, body: Option<&[u8]>) -> Step {
        let error = match (tag, body) {
            (backend::ERROR_RESPONSE, Some(body)) => Some(backend::error_fields(body)),
            _ => None,
        };
        if let Some(p) = self.prepared.as_deref_mut().filter(|p| p.watches(tag)) {
            match p.on_server(tag, error.as_ref(), self.server_statements) {
                Answer::Forward => {}
                Answer::Swallow => {
                    self.front = self.front.max(ServerFront::Swallow);
                    return Step::StopBefore;
                }
                Answer::Replace => {
                    self.front = ServerFront::Replace;
                    return Step::StopBefore;
                }
            }
        }
        let Some(body) = body else {
            return self.on_streamed(tag);
        };
        match tag {
            backend::READY_FOR_QUERY => self.on_ready(body),
            backend::ERROR_RESPONSE => match error.and_then(|e| note_error(e, &mut self.errors)) {
                // The server ends the session: the session tells the client.
                Some(fields) => {
                    self.fatal = Some(fields);
                    Step::StopBefore
                }
                None => Step::Forward,
            },
            backend::COMMAND_COMPLETE => {
                *self.block_opened = backend::block_change(body).unwrap_or(*self.block_opened);
                Step::Forward
            }
            backend::PARAMETER_STATUS => {
                if let Ok((name, value)) = backend::parameter_status(body) {
                    self.server_params.set_reported(name, value);
                    self.client_params.set_reported(name, value);
                }
                Step::Forward
            }
            backend::NOTIFICATION_RESPONSE
                if self.own_notifier.is_some_and(|pid| body.starts_with(&pid)) =>
            {
                self.notified_at = Some(body.as_ptr() as usize - self.base);
                Step::StopAfter
            }
            _ => Step::Forward,
        }
    }

    /// A message whose body the scan does not read.
    fn on_streamed(&mut self, tag: u8) -> Step {
        if matches!(tag, backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE) {
            // The server waits for the client's COPY data.
            self.resume_client();
        }
        Step::Forward
    }

    fn on_ready(&mut self, body: &[u8]) -> Step {
        self.readies += 1;
        *self.status = backend::ready_status(body).unwrap_or(TxStatus::Failed);
        *self.block_opened = false;
        *self.pending = self.pending.saturating_sub(1);
        if self.may_release && *self.pending == 0 && *self.status == TxStatus::Idle {
            self.release = true;
            return Step::StopAfter;
        }
        if *self.pending == 0 {
            self.answered = true;
            self.resume_client();
        }
        Step::Forward
    }

    fn resume_client(&mut self) {
        if *self.flow == Flow::Paused {
            *self.flow = Flow::Resume;
        }
    }
}

impl Wire {
    /// Scans server bytes newly read into `buf` (the server's read buffer past what
    /// was scanned before). If it stopped after a notification the client's own server
    /// sent, returns where in `buf` its sender pid is: scan on.
    pub(super) fn scan_server_bytes(
        &mut self,
        buf: &[u8],
        server: ServerParts<'_>,
        client_params: &mut ParamSet,
    ) -> Option<usize> {
        // Only a client with a pid of its own (transaction mode) has them rewritten.
        let own = self.policy.own_pid.is_some_and(|pid| pid != server.pid);
        let ServerSide {
            scanner,
            status,
            block_opened,
            ..
        } = &mut self.server;
        let exchange = &mut self.client.exchange;
        let mut scan = ServerScan {
            status,
            block_opened,
            may_release: self.policy.transaction_pooling && !exchange.holds_server(),
            pending: &mut exchange.pending,
            flow: &mut exchange.flow,
            front: ServerFront::Relayed,
            release: false,
            prepared: self.prepared.as_deref_mut(),
            server_statements: server.statements,
            server_params: server.params,
            client_params,
            fatal: None,
            readies: 0,
            answered: false,
            errors: [0; 3],
            own_notifier: own.then(|| server.pid.to_be_bytes()),
            notified_at: None,
            base: buf.as_ptr() as usize,
        };
        let scanned = scanner.scan(buf, |tag, body| scan.on_message(tag, body));
        let ServerScan {
            front,
            release,
            notified_at,
            errors,
            fatal,
            readies,
            answered,
            ..
        } = scan;
        self.server.readies = self.server.readies.wrapping_add(readies);
        if answered {
            if let (Some(start), Some(latency)) = (self.query_start.take(), &self.query_latency) {
                latency.observe(start.elapsed().as_secs_f64());
            }
        }
        self.server.front = self.server.front.max(front);
        self.note_server_errors(errors, fatal);
        match scanned {
            Ok(s) => {
                self.server.s2c += s.forward;
                self.server.release_point = release;
            }
            Err(err) => {
                let err = io::Error::new(io::ErrorKind::InvalidData, err);
                self.server.end = ServerEnd::Failed(err);
            }
        }
        notified_at
    }

    /// Counts the ErrorResponses a scan saw; a FATAL one ends the relay.
    fn note_server_errors(&mut self, errors: [u64; 3], fatal: Option<ErrorFields>) {
        for (total, new) in self.counts.errors.iter_mut().zip(errors) {
            *total += new;
        }
        if fatal.is_some() {
            self.server.fatal = fatal;
            self.server.end = ServerEnd::Closed;
        }
    }
}

/// Counts a server ErrorResponse by severity (ERROR, FATAL, PANIC); returns its fields
/// if it ends the server's session.
fn note_error(fields: ErrorFields, errors: &mut [u64; 3]) -> Option<ErrorFields> {
    let slot = match fields.severity.as_str() {
        "FATAL" => 1,
        "PANIC" => 2,
        _ => 0,
    };
    errors[slot] += 1;
    (slot > 0).then_some(fields)
}
