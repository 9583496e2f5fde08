//! The pids pgrelay issues clients in transaction mode, made to act like pids.
//!
//! `SELECT pg_terminate_backend(pid)` or `SELECT pg_cancel_backend(pid)` of a pid
//! pgrelay issued ends that client's session with FATAL 57P01 (the path the admin
//! console's `KILL` takes) or cancels its running query (the path its own
//! CancelRequest takes), and pgrelay answers `true` itself, as PostgreSQL would. Any
//! other pid — a real server's, an unknown one — goes to a server as it is, and so does
//! a call on a client of another user (PostgreSQL lets a role signal only its own
//! sessions unless it is privileged, which pgrelay cannot tell).
//!
//! Only a request that is exactly one such call is recognised: a simple Query
//! `SELECT [pg_catalog.]pg_terminate_backend(N)` (case-insensitive, an optional `;`),
//! or an extended request of that text with `N` written out or bound as `$1` (text, or
//! binary int4/int2): an unnamed Parse, Bind, Describe, Execute, Sync; or a Bind of a
//! statement the client prepared earlier, then Describe, Execute, Sync. With prepared
//! statements carried, pgrelay also answers the named Parse (and Describe) of such a
//! text itself and keeps the statement like any other: asyncpg and tokio-postgres
//! prepare it in a request of its own, after which, ended by a Flush, a server would
//! stay attached until the Bind had run there.
//!
//! Between transactions the session looks at each request before it picks a server
//! ([`Session::pid_request`]). Inside a transaction, or pinned to a server, the relay
//! stops in front of a Query or Parse that opens a request and whose text is a call
//! (and, once the client has prepared a call, a Bind of it), waits until everything
//! before it is answered, and hands it to the session ([`Session::intercepted`]), which
//! answers it or has the relay send it on. The cost on the way: a few byte compares
//! per Query or Parse, whatever its length (about 10 ns each, measured on typical
//! pgbench statements in a release build), and, only for clients that have parsed a
//! call, one statement lookup per named Bind.

use std::sync::Arc;

use bytes::BytesMut;

use super::Session;
use crate::config::PoolMode;
use crate::error::ClientError;
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::{self, frontend};
use crate::registry::ClientEntry;

/// What a call asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Signal {
    Terminate,
    Cancel,
}

impl Signal {
    /// The function's name, which is also its result column's.
    fn function(self) -> &'static str {
        match self {
            Signal::Terminate => "pg_terminate_backend",
            Signal::Cancel => "pg_cancel_backend",
        }
    }
}

/// Where the statement text takes its pid from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    Literal(i32),
    /// `$1`.
    Param,
}

/// What a recognised request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recognised {
    /// One call, to carry out.
    Call(PidCall),
    /// A named statement of a call, prepared (and described); nothing runs. Its `pid`
    /// is 0.
    Prepare(PidCall),
}

/// A request that is one call of `pg_terminate_backend` or `pg_cancel_backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PidCall {
    pub(super) signal: Signal,
    pub(super) pid: i32,
    /// The format of the result column (extended protocol): 0 text, 1 binary.
    format: i16,
    /// The type of `$1`, if the statement has it.
    param_type: Option<u32>,
    /// Execute asked for at most some rows: PostgreSQL then suspends the portal after
    /// the one row rather than completing it.
    limited: bool,
}

/// The call a statement text is, or `None`. The text ends at its end or at a NUL (a
/// message body may be passed as it is): anything else fails at its first bytes, so
/// the common statement costs a few compares, whatever its length.
fn parse_call(text: &[u8]) -> Option<(Signal, Arg)> {
    let rest = keyword(skip_ws(text), b"select")?;
    if !protocol::is_space(*rest.first()?) {
        return None;
    }
    let mut rest = skip_ws(rest);
    if let Some(after) = keyword(rest, b"pg_catalog.") {
        rest = after;
    }
    let (signal, rest) = match keyword(rest, b"pg_terminate_backend") {
        Some(after) => (Signal::Terminate, after),
        None => (Signal::Cancel, keyword(rest, b"pg_cancel_backend")?),
    };
    let rest = skip_ws(skip_ws(rest).strip_prefix(b"(")?);
    let (arg, rest) = match rest.strip_prefix(b"$1") {
        Some(after) => (Arg::Param, after),
        None => {
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            (Arg::Literal(number(&rest[..digits])?), &rest[digits..])
        }
    };
    let mut rest = skip_ws(skip_ws(rest).strip_prefix(b")")?);
    if let Some(after) = rest.strip_prefix(b";") {
        rest = skip_ws(after);
    }
    matches!(rest.first(), None | Some(0)).then_some((signal, arg))
}

/// Whether a Query, Parse or Bind body is that of a call (its pid may be pgrelay's):
/// the relay hands such a request to the session. A few compares for any other
/// statement; a Bind is looked at only if the client has prepared a call before
/// (`pid_statements`), and then costs a lookup of its statement (`carried`).
pub(super) fn may_be_call<'a>(
    tag: u8,
    body: &[u8],
    pid_statements: bool,
    carried: impl FnOnce(&[u8]) -> Option<&'a [u8]>,
) -> bool {
    match tag {
        frontend::QUERY => parse_call(body).is_some(),
        frontend::PARSE => frontend::parse(body).is_ok_and(|p| parse_call(p.after_name).is_some()),
        frontend::BIND if pid_statements => frontend::bind(body)
            .ok()
            .and_then(|b| carried(b.statement))
            .is_some_and(|text| parse_call(text).is_some()),
        _ => false,
    }
}

fn skip_ws(text: &[u8]) -> &[u8] {
    let start = text
        .iter()
        .position(|&b| !protocol::is_space(b))
        .unwrap_or(text.len());
    &text[start..]
}

/// `text` after `word` (ASCII case-insensitive), if it starts with it.
fn keyword<'a>(text: &'a [u8], word: &[u8]) -> Option<&'a [u8]> {
    let head = text.get(..word.len())?;
    head.eq_ignore_ascii_case(word).then(|| &text[word.len()..])
}

/// A pid written in decimal digits.
fn number(digits: &[u8]) -> Option<i32> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The messages of a buffered request: `(tag, body)`.
fn messages(request: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    frontend::messages(request)
        .map_while(Result::ok)
        .map(|m| (m.tag, m.body))
}

/// Recognises a buffered request (complete, nothing after it) that is one call, or
/// (`carry`: statements are carried) the preparation of one. `carried` gives the text
/// of a statement the client prepared earlier, by name.
pub(super) fn recognise<'a>(
    request: &'a [u8],
    carry: bool,
    carried: impl FnOnce(&[u8]) -> Option<&'a [u8]>,
) -> Option<Recognised> {
    let first = frontend::messages(request).next()?.ok()?;
    match first.tag {
        frontend::QUERY if first.bytes.len() == request.len() => {
            let (signal, Arg::Literal(pid)) = parse_call(first.body)? else {
                return None;
            };
            Some(Recognised::Call(PidCall {
                signal,
                pid,
                format: 0,
                param_type: None,
                limited: false,
            }))
        }
        frontend::PARSE | frontend::BIND => extended(request, carry, carried),
        _ => None,
    }
}

/// How far an extended request has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Start,
    Parsed,
    /// A named statement was parsed: only Describe of it, then Flush or Sync, follow.
    NamedParsed,
    Prepared,
    Bound,
    Executed,
    Synced,
}

/// What the messages of an extended call told so far.
struct Extended<'a> {
    stage: Stage,
    call: Option<(Signal, Arg)>,
    /// The type of `$1` a Parse declared (0: unspecified).
    declared: Option<u32>,
    /// The statement a named Parse prepares.
    name: &'a [u8],
    portal: &'a [u8],
    found: Option<PidCall>,
}

fn extended<'a>(
    request: &'a [u8],
    carry: bool,
    carried: impl FnOnce(&[u8]) -> Option<&'a [u8]>,
) -> Option<Recognised> {
    let mut carried = Some(carried);
    let mut seen = Extended {
        stage: Stage::Start,
        call: None,
        declared: None,
        name: b"",
        portal: b"",
        found: None,
    };
    for (tag, body) in messages(request) {
        seen.stage = match (tag, seen.stage) {
            (frontend::PARSE, Stage::Start) => seen.parse(body, carry)?,
            (frontend::DESCRIBE, Stage::NamedParsed) => {
                let name = frontend::describe(body).ok()?.statement()?;
                (name == seen.name).then_some(Stage::NamedParsed)?
            }
            (frontend::FLUSH | frontend::SYNC, Stage::NamedParsed) => Stage::Prepared,
            (frontend::BIND, Stage::Start) => {
                let name = frontend::bind(body).ok()?.statement;
                let text = carried.take().and_then(|c| c(name))?;
                seen.call = Some(parse_call(text)?);
                seen.bind(body)?
            }
            (frontend::BIND, Stage::Parsed) => seen.bind(body)?,
            (frontend::DESCRIBE, Stage::Parsed) if body.first() == Some(&b'S') => Stage::Parsed,
            (frontend::DESCRIBE, Stage::Bound) => Stage::Bound,
            (frontend::EXECUTE, Stage::Bound) => {
                let execute = frontend::execute(body).ok()?;
                let found = seen.found.as_mut()?;
                found.limited = execute.max_rows > 0;
                (execute.portal == seen.portal).then_some(Stage::Executed)?
            }
            (frontend::SYNC, Stage::Executed) => Stage::Synced,
            _ => return None,
        };
    }
    match seen.stage {
        Stage::Synced => Some(Recognised::Call(seen.found?)),
        Stage::Prepared => {
            let (signal, arg) = seen.call?;
            Some(Recognised::Prepare(PidCall {
                signal,
                pid: 0,
                format: 0,
                param_type: seen.param_type(arg),
                limited: false,
            }))
        }
        _ => None,
    }
}

impl<'a> Extended<'a> {
    /// A Parse of a call: unnamed, or named when statements are carried (pgrelay
    /// keeps it then; without that, it would exist on no server).
    fn parse(&mut self, body: &'a [u8], carry: bool) -> Option<Stage> {
        let parse = frontend::parse(body).ok()?;
        let name = parse.name;
        if !name.is_empty() && !carry {
            return None;
        }
        let call = parse_call(parse.after_name)?;
        let types = parse.param_types().ok()?;
        self.name = name;
        self.declared = match (call.1, types) {
            (Arg::Literal(_), [0, 0]) => None,
            (Arg::Param, [0, 0]) => Some(0),
            (Arg::Param, [0, 1, a, b, c, d]) => {
                let oid = u32::from_be_bytes([*a, *b, *c, *d]);
                if ![0, backend::oid::INT2, backend::oid::INT4].contains(&oid) {
                    return None;
                }
                Some(oid)
            }
            _ => return None,
        };
        self.call = Some(call);
        if name.is_empty() {
            Some(Stage::Parsed)
        } else {
            Some(Stage::NamedParsed)
        }
    }

    /// The type of `$1`, if the statement has it.
    fn param_type(&self, arg: Arg) -> Option<u32> {
        let oid = match self.declared {
            Some(backend::oid::INT2) => backend::oid::INT2,
            _ => backend::oid::INT4,
        };
        (arg == Arg::Param).then_some(oid)
    }

    /// A Bind of the unnamed statement just parsed, or of the carried one.
    fn bind(&mut self, body: &'a [u8]) -> Option<Stage> {
        let bind = frontend::bind(body).ok()?;
        if self.stage == Stage::Parsed && !bind.statement.is_empty() {
            return None;
        }
        let (signal, arg) = self.call?;
        let params = bind.params().ok()?;
        let binary = one_format(params.formats())? == 1;
        let pid = match (arg, params.len()) {
            (Arg::Literal(pid), 0) => pid,
            (Arg::Param, 1) => self.param(params.values().next()??, binary)?,
            _ => return None,
        };
        self.portal = bind.portal;
        self.found = Some(PidCall {
            signal,
            pid,
            format: one_format(params.result_formats())?,
            param_type: self.param_type(arg),
            limited: false,
        });
        Some(Stage::Bound)
    }

    /// The pid bound as `$1`: decimal text, or the binary form of its declared type.
    fn param(&self, value: &[u8], binary: bool) -> Option<i32> {
        if !binary {
            return number(value);
        }
        match (self.declared, value) {
            (Some(backend::oid::INT2), [a, b]) => Some(i16::from_be_bytes([*a, *b]).into()),
            (Some(backend::oid::INT2), _) => None,
            (_, [a, b, c, d]) => Some(i32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }
}

/// The one format code of a list of at most one (none: text), if it is text (0) or
/// binary (1).
fn one_format(mut codes: impl Iterator<Item = i16>) -> Option<i16> {
    let code = codes.next().unwrap_or(0);
    (codes.next().is_none() && (0..=1).contains(&code)).then_some(code)
}

/// Answers the recognised `request` as PostgreSQL would have, the call's result being
/// `true`, in transaction `status` (`I` or `T`).
fn answer(call: &PidCall, request: &[u8], status: TxStatus, out: &mut BytesMut) {
    let name = call.signal.function();
    for (tag, body) in messages(request) {
        match tag {
            frontend::QUERY => {
                backend::bool_row_description(out, name, 0);
                backend::bool_data_row(out, true, 0);
                backend::command_complete(out, "SELECT 1");
                backend::ready_for_query(out, status);
            }
            frontend::SYNC => backend::ready_for_query(out, status),
            frontend::PARSE => backend::parse_complete(out),
            frontend::BIND => backend::bind_complete(out),
            frontend::DESCRIBE if body.first() == Some(&b'S') => {
                let types: &[u32] = match &call.param_type {
                    Some(oid) => std::slice::from_ref(oid),
                    None => &[],
                };
                backend::parameter_description(out, types);
                backend::bool_row_description(out, name, 0);
            }
            frontend::DESCRIBE => backend::bool_row_description(out, name, call.format),
            frontend::EXECUTE => {
                backend::bool_data_row(out, true, call.format);
                if call.limited {
                    backend::portal_suspended(out);
                } else {
                    backend::command_complete(out, "SELECT 1");
                }
            }
            _ => {}
        }
    }
}

/// What pgrelay does with a request about the pids it issued.
pub(super) enum PidRequest {
    /// Carries out this call on that client, and answers it.
    Signal(PidCall, Arc<ClientEntry>),
    /// Keeps the statement its named Parse prepares, and answers it.
    Prepare(PidCall),
}

/// The name and the rest (text, parameter types) of the Parse a request opens with.
fn parsed_statement(request: &[u8]) -> Option<(&[u8], &[u8])> {
    match messages(request).next()? {
        (frontend::PARSE, body) => frontend::parse(body).ok().map(|p| (p.name, p.after_name)),
        _ => None,
    }
}

impl Session {
    /// Transaction mode, between transactions: whether the buffered request is one
    /// call on a pid pgrelay issued to a client of the same user, or the preparation
    /// of such a call.
    pub(super) fn pid_request(&mut self) -> Option<PidRequest> {
        // In a failed transaction the server refuses everything; so be it.
        if self.mode != PoolMode::Transaction || self.wire.status() == TxStatus::Failed {
            return None;
        }
        let request = self.wire.request(&mut self.client);
        let prepared = self.wire.prepared.as_deref();
        // Only a client that parsed a call has a statement of one.
        let lookup = prepared.filter(|_| self.wire.client.pid_statements);
        let carried = |name: &[u8]| Some(lookup?.statement(name)?.text());
        let call = match recognise(request, prepared.is_some(), carried)? {
            Recognised::Prepare(call) => {
                // A second Parse of one name is the server's to refuse.
                let (name, _) = parsed_statement(request)?;
                let known = prepared.is_some_and(|p| p.statement(name).is_some());
                return (!known).then_some(PidRequest::Prepare(call));
            }
            Recognised::Call(call) => call,
        };
        if !self.shared.cancel.is_issued(call.pid) {
            return None;
        }
        let target = self.shared.registry.issued_to(call.pid)?;
        (target.user == self.login.user).then_some(PidRequest::Signal(call, target))
    }

    /// Carries out what [`Session::pid_request`] found and answers the request.
    /// `Ok(false)` when the client is gone; the caller's own termination is an error.
    pub(super) async fn answer_pid_request(
        &mut self,
        request: PidRequest,
    ) -> Result<bool, ClientError> {
        let call = match request {
            PidRequest::Prepare(call) => {
                let (rbuf, _) = self.client.buffers();
                let statement = parsed_statement(&rbuf[..self.wire.client.c2s]);
                if let (Some(prepared), Some((name, rest))) =
                    (self.wire.prepared.as_deref_mut(), statement)
                {
                    prepared.adopt(name, rest, self.params.get("search_path"));
                }
                call
            }
            PidRequest::Signal(call, target) => {
                self.signal(call, &target).await?;
                call
            }
        };
        let (rbuf, wbuf) = self.client.buffers();
        answer(
            &call,
            &rbuf[..self.wire.client.c2s],
            self.wire.status(),
            wbuf,
        );
        self.wire.consume_request(&mut self.client);
        Ok(self.client.flush().await.is_ok())
    }

    /// The relay stopped in front of a request that may be a call on a pid pgrelay
    /// issued (in a transaction, or pinned), with everything before it answered: reads
    /// it whole and answers it, or has the relay send it on. `Ok(false)` when the
    /// client is gone.
    pub(super) async fn intercepted(&mut self) -> Result<bool, ClientError> {
        let read = self.wire.read_request(&mut self.client, None).await;
        if !self.request_read(read)? {
            return Ok(false);
        }
        self.wire.resumed = true;
        match self.pid_request() {
            Some(request) => self.answer_pid_request(request).await,
            None => {
                // Sent on as it is: noted as any request routed to this node.
                let node = self.wire.node;
                self.wire.record_request(&mut self.client, node);
                Ok(true)
            }
        }
    }

    async fn signal(&self, call: PidCall, target: &Arc<ClientEntry>) -> Result<(), ClientError> {
        match call.signal {
            Signal::Terminate if Arc::ptr_eq(target, &self.handle.entry) => {
                Err(ClientError::terminated())
            }
            Signal::Terminate => {
                tracing::info!(user = %target.user, database = %target.database, pid = call.pid, "pg_terminate_backend of a client");
                target.kill();
                Ok(())
            }
            Signal::Cancel => {
                tracing::debug!(pid = call.pid, "pg_cancel_backend of a client");
                self.shared.cancel.cancel_issued(call.pid).await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.put_u32(body.len() as u32 + 4);
        out.extend_from_slice(body);
        out
    }

    fn query(sql: &str) -> Vec<u8> {
        message(b'Q', format!("{sql}\0").as_bytes())
    }

    fn parse(sql: &str, types: &[u32]) -> Vec<u8> {
        let mut body = format!("\0{sql}\0").into_bytes();
        body.put_i16(types.len() as i16);
        for t in types {
            body.put_u32(*t);
        }
        message(b'P', &body)
    }

    fn bind(statement: &str, param: Option<(i16, &[u8])>, result_format: i16) -> Vec<u8> {
        let mut body = format!("\0{statement}\0").into_bytes();
        match param {
            Some((format, value)) => {
                body.put_i16(1);
                body.put_i16(format);
                body.put_i16(1);
                body.put_i32(value.len() as i32);
                body.extend_from_slice(value);
            }
            None => body.extend_from_slice(&[0, 0, 0, 0]),
        }
        body.put_i16(1);
        body.put_i16(result_format);
        message(b'B', &body)
    }

    fn tail() -> Vec<u8> {
        [
            message(b'D', b"P\0"),
            message(b'E', b"\0\0\0\0\0"),
            message(b'S', b""),
        ]
        .concat()
    }

    /// The call a request is (statements carried).
    fn call<'a>(
        request: &'a [u8],
        carried: impl FnOnce(&[u8]) -> Option<&'a [u8]>,
    ) -> Option<PidCall> {
        match recognise(request, true, carried)? {
            Recognised::Call(call) => Some(call),
            Recognised::Prepare(_) => None,
        }
    }

    fn simple(sql: &str) -> Option<(Signal, i32)> {
        match recognise(&query(sql), true, |_| None) {
            Some(Recognised::Call(c)) => Some((c.signal, c.pid)),
            _ => None,
        }
    }

    #[test]
    fn whole_simple_calls_only() {
        use Signal::*;
        assert_eq!(
            simple("SELECT pg_terminate_backend(4194305)"),
            Some((Terminate, 4194305))
        );
        assert_eq!(
            simple("  select  PG_CATALOG.pg_cancel_backend ( 77 ) ; "),
            Some((Cancel, 77))
        );
        // The vertical tab is white space to PostgreSQL too.
        assert_eq!(
            simple("\x0bSELECT\x0bpg_cancel_backend(\x0b77\x0b)"),
            Some((Cancel, 77))
        );
        for other in [
            "SELECT pg_terminate_backend(1), 2",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
            "SELECT pg_terminate_backend(-1)",
            "SELECT pg_terminate_backend(99999999999)",
            "SELECT pg_terminate_backend(1, 100)",
            "SELECT pg_terminate_backend($1)",
            "SELECTpg_terminate_backend(1)",
            "SELECT pg_terminate_backend(1); SELECT 1",
            "SELECT 1",
        ] {
            assert_eq!(simple(other), None, "{other}");
        }
        let two = [query("SELECT pg_cancel_backend(1)"), query("SELECT 1")].concat();
        assert_eq!(call(&two, |_| None), None);
    }

    #[test]
    fn extended_calls_bind_the_pid_as_text_or_binary() {
        let text = [
            parse("SELECT pg_terminate_backend($1)", &[]),
            bind("", Some((0, b"4194400")), 0),
            tail(),
        ]
        .concat();
        let found = call(&text, |_| None).expect("a call");
        assert_eq!(
            (found.signal, found.pid, found.format),
            (Signal::Terminate, 4194400, 0)
        );
        let binary = [
            parse("SELECT pg_cancel_backend($1)", &[23]),
            bind("", Some((1, &4194401i32.to_be_bytes())), 1),
            tail(),
        ]
        .concat();
        let found = call(&binary, |_| None).expect("a call");
        assert_eq!(
            (found.signal, found.pid, found.format),
            (Signal::Cancel, 4194401, 1)
        );
        // A statement the client prepared earlier, by name.
        let carried = [bind("s1", Some((1, &5i32.to_be_bytes())), 1), tail()].concat();
        let found = call(&carried, |name| {
            (name == b"s1").then_some(&b"SELECT pg_terminate_backend($1)"[..])
        });
        assert_eq!(found.map(|c| c.pid), Some(5));
        // A named Parse with its Bind, bigint, a row limit: to the server.
        let named = [
            message(b'P', b"s\0SELECT pg_cancel_backend($1)\0\0\0"),
            bind("s", Some((0, b"1")), 0),
            tail(),
        ]
        .concat();
        assert_eq!(recognise(&named, true, |_| None), None);
        let bigint = [
            parse("SELECT pg_cancel_backend($1)", &[20]),
            bind("", Some((0, b"1")), 0),
            tail(),
        ]
        .concat();
        assert_eq!(call(&bigint, |_| None), None);
        // asyncpg's fetchval asks for one row: the portal is suspended after it.
        let limited = [
            parse("SELECT pg_cancel_backend(3)", &[]),
            bind("", None, 0),
            message(b'E', b"\0\0\0\0\x01"),
            message(b'S', b""),
        ]
        .concat();
        let found = call(&limited, |_| None).expect("a call");
        let mut out = BytesMut::new();
        answer(&found, &limited, TxStatus::Idle, &mut out);
        let tags: String = messages(&out).map(|(tag, _)| tag as char).collect();
        assert_eq!(tags, "12DsZ");
    }

    #[test]
    fn answers_match_the_request() {
        let request = [
            parse("SELECT pg_terminate_backend($1)", &[]),
            message(b'D', b"S\0"),
            bind("", Some((0, b"9")), 1),
            tail(),
        ]
        .concat();
        let found = call(&request, |_| None).expect("a call");
        let mut out = BytesMut::new();
        answer(&found, &request, TxStatus::Idle, &mut out);
        let tags: String = messages(&out).map(|(tag, _)| tag as char).collect();
        assert_eq!(tags, "1tT2TDCZ");
        let row = messages(&out)
            .find(|(tag, _)| *tag == b'D')
            .map(|(_, b)| b.to_vec());
        assert_eq!(row, Some(vec![0, 1, 0, 0, 0, 1, 1]), "binary true");
        out.clear();
        let request = query("SELECT pg_cancel_backend(9)");
        let found = call(&request, |_| None).expect("a call");
        answer(&found, &request, TxStatus::Idle, &mut out);
        let tags: String = messages(&out).map(|(tag, _)| tag as char).collect();
        assert_eq!(tags, "TDCZ");
    }

    #[test]
    fn named_preparations_are_kept_only_when_statements_are_carried() {
        let prepare = [
            message(b'P', b"s\0SELECT pg_terminate_backend($1)\0\0\0"),
            message(b'D', b"Ss\0"),
            message(b'H', b""),
        ]
        .concat();
        let Some(Recognised::Prepare(found)) = recognise(&prepare, true, |_| None) else {
            panic!("a preparation");
        };
        assert_eq!(found.param_type, Some(backend::oid::INT4));
        assert_eq!(recognise(&prepare, false, |_| None), None);
        let mut out = BytesMut::new();
        answer(&found, &prepare, TxStatus::Idle, &mut out);
        let tags: String = messages(&out).map(|(tag, _)| tag as char).collect();
        assert_eq!(tags, "1tT", "no ReadyForQuery before the Sync");
        let other_name = [
            message(b'P', b"s\0SELECT pg_terminate_backend($1)\0\0\0"),
            message(b'D', b"St\0"),
            message(b'S', b""),
        ]
        .concat();
        assert_eq!(recognise(&other_name, true, |_| None), None);
    }
}
