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
//! Only a request that is exactly one such call, between transactions, is recognised:
//! a simple Query `SELECT [pg_catalog.]pg_terminate_backend(N)` (case-insensitive, an
//! optional `;`), or an extended request of that text with `N` written out or bound as
//! `$1` (text, or binary int4/int2): an unnamed Parse, Bind, Describe, Execute
//! (no row limit), Sync; or Bind of a statement the client prepared earlier, then
//! Describe, Execute, Sync. Recognising costs a few byte compares per Query or Parse,
//! and one hash lookup of the statement name per request that opens with a named Bind.

use std::sync::Arc;

use bytes::BytesMut;

use super::registry::ClientEntry;
use super::relay::Wire;
use super::Session;
use crate::config::PoolMode;
use crate::error::{ClientError, ErrorKind};
use crate::protocol::{backend, frontend, header, read_cstr, HEADER_LEN, MAX_MESSAGE_LEN};
use crate::stream::{Conn, Stream};

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

/// A request that is one call of `pg_terminate_backend` or `pg_cancel_backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PidCall {
    pub(super) signal: Signal,
    pub(super) pid: i32,
    /// The format of the result column (extended protocol): 0 text, 1 binary.
    format: i16,
    /// The type of `$1`, if the statement has it.
    param_type: Option<u32>,
}

/// The statement text of a call, or `None`.
fn parse_call(text: &[u8]) -> Option<(Signal, Arg)> {
    let rest = keyword(skip_ws(text), b"select")?;
    if !rest.first()?.is_ascii_whitespace() {
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
    rest.is_empty().then_some((signal, arg))
}

fn skip_ws(text: &[u8]) -> &[u8] {
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
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
    let mut rest = request;
    std::iter::from_fn(move || {
        let (tag, total) = header(rest, MAX_MESSAGE_LEN).ok()??;
        let body = rest.get(HEADER_LEN..total)?;
        rest = &rest[total..];
        Some((tag, body))
    })
}

/// Recognises a buffered request (complete, nothing after it) that is one call;
/// `carried` gives the text of a statement the client prepared earlier, by name.
pub(super) fn recognise<'a>(
    request: &'a [u8],
    carried: impl FnOnce(&[u8]) -> Option<&'a [u8]>,
) -> Option<PidCall> {
    let (tag, total) = header(request, MAX_MESSAGE_LEN).ok()??;
    match tag {
        frontend::QUERY if total == request.len() => {
            let text = frontend::query_text(&request[HEADER_LEN..]).ok()?;
            let (signal, Arg::Literal(pid)) = parse_call(text)? else {
                return None;
            };
            Some(PidCall {
                signal,
                pid,
                format: 0,
                param_type: None,
            })
        }
        frontend::PARSE | frontend::BIND => extended(request, carried),
        _ => None,
    }
}

/// How far an extended request has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Start,
    Parsed,
    Bound,
    Executed,
    Synced,
}

/// What the messages of an extended call told so far.
struct Extended<'a> {
    stage: Stage,
    call: Option<(Signal, Arg)>,
    /// The type of `$1` an unnamed Parse declared (0: unspecified).
    declared: Option<u32>,
    portal: &'a [u8],
    found: Option<PidCall>,
}

fn extended<'a>(
    request: &'a [u8],
    carried: impl FnOnce(&[u8]) -> Option<&'a [u8]>,
) -> Option<PidCall> {
    let mut carried = Some(carried);
    let mut seen = Extended {
        stage: Stage::Start,
        call: None,
        declared: None,
        portal: b"",
        found: None,
    };
    for (tag, body) in messages(request) {
        seen.stage = match (tag, seen.stage) {
            (frontend::PARSE, Stage::Start) => seen.parse(body)?,
            (frontend::BIND, Stage::Start) => {
                let (_, rest) = read_cstr(body)?;
                let (name, _) = read_cstr(rest)?;
                let text = carried.take().and_then(|c| c(name))?;
                seen.call = Some(parse_call(text)?);
                seen.bind(body)?
            }
            (frontend::BIND, Stage::Parsed) => seen.bind(body)?,
            (frontend::DESCRIBE, Stage::Parsed) if body.first() == Some(&b'S') => Stage::Parsed,
            (frontend::DESCRIBE, Stage::Bound) => Stage::Bound,
            (frontend::EXECUTE, Stage::Bound) => {
                let (portal, rest) = read_cstr(body)?;
                let no_limit = rest == [0, 0, 0, 0];
                (portal == seen.portal && no_limit).then_some(Stage::Executed)?
            }
            (frontend::SYNC, Stage::Executed) => Stage::Synced,
            _ => return None,
        };
    }
    (seen.stage == Stage::Synced).then_some(seen.found?)
}

impl<'a> Extended<'a> {
    /// An unnamed Parse of a call.
    fn parse(&mut self, body: &[u8]) -> Option<Stage> {
        let (name, rest) = read_cstr(body)?;
        let (text, types) = read_cstr(rest)?;
        if !name.is_empty() {
            // A named statement answered here would exist on no server.
            return None;
        }
        let call = parse_call(text)?;
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
        Some(Stage::Parsed)
    }

    /// A Bind of the unnamed statement just parsed, or of the carried one.
    fn bind(&mut self, body: &'a [u8]) -> Option<Stage> {
        let (portal, rest) = read_cstr(body)?;
        let (statement, mut rest) = read_cstr(rest)?;
        if self.stage == Stage::Parsed && !statement.is_empty() {
            return None;
        }
        let (signal, arg) = self.call?;
        let formats = take_formats(&mut rest)?;
        let params = take_i16(&mut rest)?;
        let pid = match (arg, params) {
            (Arg::Literal(pid), 0) => pid,
            (Arg::Param, 1) => {
                let len = usize::try_from(take_i32(&mut rest)?).ok()?;
                let value = rest.get(..len)?;
                rest = &rest[len..];
                let binary = formats.first() == Some(&1);
                self.param(value, binary)?
            }
            _ => return None,
        };
        let results = take_formats(&mut rest)?;
        if !rest.is_empty() || formats.len() > 1 || results.len() > 1 {
            return None;
        }
        self.portal = portal;
        self.found = Some(PidCall {
            signal,
            pid,
            format: results.first().copied().unwrap_or(0),
            param_type: (arg == Arg::Param).then(|| match self.declared {
                Some(backend::oid::INT2) => backend::oid::INT2,
                _ => backend::oid::INT4,
            }),
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

fn take_i16(rest: &mut &[u8]) -> Option<i16> {
    let (head, tail) = rest.split_first_chunk::<2>()?;
    *rest = tail;
    Some(i16::from_be_bytes(*head))
}

fn take_i32(rest: &mut &[u8]) -> Option<i32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(i32::from_be_bytes(*head))
}

/// A count of format codes and the codes (each 0 or 1); at most one is kept.
fn take_formats(rest: &mut &[u8]) -> Option<Vec<i16>> {
    let count = take_i16(rest)?;
    let mut codes = Vec::new();
    for _ in 0..count {
        let code = take_i16(rest)?;
        if !(0..=1).contains(&code) {
            return None;
        }
        codes.push(code);
    }
    Some(codes)
}

/// Answers the recognised `request` as PostgreSQL would have, with `value` as the
/// call's result.
fn answer(call: &PidCall, request: &[u8], value: bool, out: &mut BytesMut) {
    let name = call.signal.function();
    for (tag, body) in messages(request) {
        match tag {
            frontend::QUERY => {
                backend::bool_row_description(out, name, 0);
                backend::bool_data_row(out, value, 0);
                backend::command_complete(out, "SELECT 1");
            }
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
                backend::bool_data_row(out, value, call.format);
                backend::command_complete(out, "SELECT 1");
            }
            _ => {}
        }
    }
    backend::ready_for_query(out, b'I');
}

/// What the client that calls `pg_terminate_backend` on itself is told.
pub(super) fn terminated() -> ClientError {
    ClientError::fatal(
        ErrorKind::ClientLost,
        "57P01",
        "terminating connection due to administrator command",
    )
}

impl Wire {
    /// Drops the buffered request pgrelay answered itself.
    fn consume_request(&mut self, client: &mut Conn<Stream>) {
        bytes::Buf::advance(client.rbuf(), self.c2s);
        self.c2s = 0;
        self.pending = 0;
        self.extended_open = false;
        self.rewrite_buffered = false;
    }
}

impl Session {
    /// Transaction mode, between transactions: the buffered request is one call on a
    /// pid pgrelay issued to a client of the same user, and that client.
    pub(super) fn issued_pid_call(&mut self) -> Option<(PidCall, Arc<ClientEntry>)> {
        if self.mode != PoolMode::Transaction {
            return None;
        }
        let request = self.wire.request(&mut self.client);
        let prepared = self.wire.prepared.as_deref();
        let call = recognise(request, |name| Some(prepared?.statement(name)?.text()))?;
        if !self.shared.cancel.is_issued(call.pid) {
            return None;
        }
        let target = self.shared.registry.issued_to(call.pid)?;
        (target.user == self.login.user).then_some((call, target))
    }

    /// Carries out a call [`Session::issued_pid_call`] found and answers it. `Ok(false)`
    /// when the client is gone; the caller's own termination is an error.
    pub(super) async fn signal_issued_pid(
        &mut self,
        call: PidCall,
        target: Arc<ClientEntry>,
    ) -> Result<bool, ClientError> {
        match call.signal {
            Signal::Terminate if Arc::ptr_eq(&target, &self.handle.entry) => {
                return Err(terminated())
            }
            Signal::Terminate => {
                tracing::info!(user = %target.user, database = %target.database, pid = call.pid, "pg_terminate_backend of a client");
                target.kill();
            }
            Signal::Cancel => {
                tracing::debug!(pid = call.pid, "pg_cancel_backend of a client");
                self.shared.cancel.cancel_issued(call.pid).await;
            }
        }
        let (rbuf, wbuf) = self.client.buffers();
        answer(&call, &rbuf[..self.wire.c2s], true, wbuf);
        self.wire.consume_request(&mut self.client);
        Ok(self.client.flush().await.is_ok())
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

    fn simple(sql: &str) -> Option<(Signal, i32)> {
        recognise(&query(sql), |_| None).map(|c| (c.signal, c.pid))
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
        assert_eq!(recognise(&two, |_| None), None);
    }

    #[test]
    fn extended_calls_bind_the_pid_as_text_or_binary() {
        let text = [
            parse("SELECT pg_terminate_backend($1)", &[]),
            bind("", Some((0, b"4194400")), 0),
            tail(),
        ]
        .concat();
        let call = recognise(&text, |_| None).expect("a call");
        assert_eq!(
            (call.signal, call.pid, call.format),
            (Signal::Terminate, 4194400, 0)
        );
        let binary = [
            parse("SELECT pg_cancel_backend($1)", &[23]),
            bind("", Some((1, &4194401i32.to_be_bytes())), 1),
            tail(),
        ]
        .concat();
        let call = recognise(&binary, |_| None).expect("a call");
        assert_eq!(
            (call.signal, call.pid, call.format),
            (Signal::Cancel, 4194401, 1)
        );
        // A statement the client prepared earlier, by name.
        let carried = [bind("s1", Some((1, &5i32.to_be_bytes())), 1), tail()].concat();
        let call = recognise(&carried, |name| {
            (name == b"s1").then_some(&b"SELECT pg_terminate_backend($1)"[..])
        });
        assert_eq!(call.map(|c| c.pid), Some(5));
        // Named Parse, bigint, a row limit: to the server.
        let named = [
            message(b'P', b"s\0SELECT pg_cancel_backend($1)\0\0\0"),
            bind("s", Some((0, b"1")), 0),
            tail(),
        ]
        .concat();
        assert_eq!(recognise(&named, |_| None), None);
        let bigint = [
            parse("SELECT pg_cancel_backend($1)", &[20]),
            bind("", Some((0, b"1")), 0),
            tail(),
        ]
        .concat();
        assert_eq!(recognise(&bigint, |_| None), None);
        let limited = [
            parse("SELECT pg_cancel_backend(3)", &[]),
            bind("", None, 0),
            message(b'E', b"\0\0\0\0\x01"),
            message(b'S', b""),
        ]
        .concat();
        assert_eq!(recognise(&limited, |_| None), None);
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
        let call = recognise(&request, |_| None).expect("a call");
        let mut out = BytesMut::new();
        answer(&call, &request, true, &mut out);
        let tags: String = messages(&out).map(|(tag, _)| tag as char).collect();
        assert_eq!(tags, "1tT2TDCZ");
        let row = messages(&out)
            .find(|(tag, _)| *tag == b'D')
            .map(|(_, b)| b.to_vec());
        assert_eq!(row, Some(vec![0, 1, 0, 0, 0, 1, 1]), "binary true");
        out.clear();
        let request = query("SELECT pg_cancel_backend(9)");
        let call = recognise(&request, |_| None).expect("a call");
        answer(&call, &request, true, &mut out);
        let tags: String = messages(&out).map(|(tag, _)| tag as char).collect();
        assert_eq!(tags, "TDCZ");
    }
}
