//! Named prepared statements across pooled servers (transaction mode).
//!
//! A client's named statement lives on whichever server it was parsed on, and in
//! transaction mode the client's next Bind may land on another server. So pgrelay
//! keeps each client's statements (name → text and parameter types) and never shows
//! a client's names to a server: the server-side name is derived from the statement's
//! content (`pgrelay_<128-bit hash>`), so equal statements from many clients share one
//! server-side statement. Each server remembers what it has prepared in a bounded LRU
//! ([`ServerStatements`], `max_prepared_statements`).
//!
//! On the way in, named Parse, Bind, Describe and Close messages are rewritten
//! ([`Prepared::rewrite`]); a Bind or Describe whose statement the server lacks is
//! preceded by an injected Parse. On the way out, the answers to injected messages are
//! swallowed. Every answer the client sees is the server's own, in its place: a client
//! Parse of a statement the server already has is answered by parsing pgrelay's empty
//! "echo" statement, and a client Close by closing a statement that never exists. So a
//! pipeline that fails midway behaves exactly as it would without pgrelay: the server
//! skips what follows the error, answers included.
//!
//! Matching answers to messages needs only ParseComplete and CloseComplete to be
//! counted, plus where each Sync falls: [`Expect`] entries in send order, each tagged
//! with the number of ReadyForQuery-owing messages sent before it. An ErrorResponse
//! ends its segment: entries of that segment get no answer, and what they would have
//! created on the server or for the client is forgotten.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::BytesMut;

use crate::error::sqlstate;
use crate::pool::statements::ServerStatements;
use crate::protocol::backend::{ErrorFields, TxStatus};
use crate::protocol::{self, backend, frontend, ProtocolError};
use crate::router::classify::effects::Effects;
use crate::session::statement::{server_name, Parsed, Statement, PREFIX};

/// An empty statement pgrelay closes and parses again to have the server answer a
/// client's Parse of a statement it already has.
const ECHO: &[u8] = b"pgrelay_echo";
/// Closed to answer a client's Close: it never exists, so closing it is a no-op.
const NONE: &[u8] = b"pgrelay_none";
/// Parsed twice to have the server refuse a client's second Parse of one name
/// (42P05), as it would have refused it without pgrelay.
const DUPLICATE: &[u8] = b"pgrelay_duplicate";
/// A Parse that always fails (42601): sent in place of preparing a statement a server
/// refused as stale, so that the server skips the request to its Sync; its error is
/// replaced by PostgreSQL's own for a stale statement.
const STALE: &[u8] = b"pgrelay_stale";
const STALE_TEXT: &[u8] = b"pgrelay_stale\0\0\0";

/// Statements a request's Binds and Describes are remembered by, at most: a client
/// that pipelines more before a Sync gets no stale-statement bookkeeping past them.
const USED_MAX: usize = 64;

/// An answer the server owes for a Parse or Close that reached it.
#[derive(Debug)]
struct Expect {
    /// ParseComplete or CloseComplete.
    tag: u8,
    /// pgrelay sent the message: the client must not see its answer.
    swallow: bool,
    /// ReadyForQuery-owing messages sent before this one.
    segment: u64,
    /// Skipped or failed: the server does not have this statement.
    forget_server: Option<u128>,
    /// Skipped or failed: the client's statement of this name does not exist.
    forget_client: Option<Box<[u8]>>,
    /// A [`STALE`] Parse: its error is replaced by PostgreSQL's for a stale statement.
    replaces_error: bool,
}

impl Expect {
    /// A Parse of a statement under its server name: answered, it parsed.
    fn parsed(&self) -> Option<u128> {
        self.forget_server
            .filter(|_| self.tag == backend::PARSE_COMPLETE)
    }
}

/// Counters for the cache hit rate.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PreparedStats {
    /// A Bind or Describe found its statement prepared on the server.
    pub hits: u64,
    /// pgrelay had to prepare it there first.
    pub misses: u64,
}

/// A client's prepared statements and the answers its server owes for them.
#[derive(Debug)]
pub struct Prepared {
    statements: HashMap<Box<[u8]>, Arc<Statement>>,
    expect: VecDeque<Expect>,
    /// Query, Sync and FunctionCall messages sent to the current server.
    sent: u64,
    /// ReadyForQuery messages it has answered with.
    answered: u64,
    capacity: usize,
    /// See [`Prepared::distrust_server`].
    distrust: bool,
    /// Statements Binds and Describes used, by segment (as [`Expect::segment`]), until
    /// that segment is answered: a stale-statement error is put down to them.
    used: Vec<(u64, u128)>,
    parsed: Arc<Parsed>,
    pub stats: PreparedStats,
}

/// What the relay does with a server message [`Prepared::on_server`] was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Forward,
    /// The answer to a message pgrelay injected: drop it.
    Swallow,
    /// The error of a [`STALE`] Parse: drop it, and tell the client what PostgreSQL
    /// tells a client whose prepared statement went stale
    /// ([`backend::stale_plan_error`]).
    Replace,
}

impl Prepared {
    pub fn new(capacity: usize, parsed: Arc<Parsed>) -> Prepared {
        Prepared {
            parsed,
            distrust: false,
            used: Vec::new(),
            statements: HashMap::new(),
            expect: VecDeque::new(),
            sent: 0,
            answered: 0,
            capacity,
            stats: PreparedStats::default(),
        }
    }

    /// A new server is attached: nothing is owed yet.
    pub fn attached(&mut self) {
        self.distrust = false;
        self.expect.clear();
        self.used.clear();
        self.sent = 0;
        self.answered = 0;
    }

    /// The server went away: statements it never confirmed were never the client's
    /// (the client is told its request failed), and nothing is owed any more.
    pub fn server_lost(&mut self) {
        for expected in std::mem::take(&mut self.expect) {
            if let Some(name) = expected.forget_client {
                self.statements.remove(&name);
            }
        }
        self.attached();
    }

    pub fn statement(&self, name: &[u8]) -> Option<&Statement> {
        self.statements.get(name).map(|s| &**s)
    }

    /// Takes a statement whose Parse pgrelay answered itself (`rest`: its text and
    /// parameter types). No server has it yet: it is prepared where it is first used.
    pub fn adopt(&mut self, name: &[u8], rest: &[u8], search_path: Option<&str>) {
        let generation = self.parsed.generation();
        let statement = Arc::new(Statement::new(rest, search_path, generation));
        self.statements.insert(name.into(), statement);
    }

    /// The client's statements, name and Parse body after the name, to hand the
    /// session to another process (which prepares them where they are first used).
    pub fn listed(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.statements
            .iter()
            .map(|(name, statement)| (&**name, &statement.rest[..]))
    }

    /// Whether pgrelay must rewrite this client message: it names a statement, or it
    /// parses `DEALLOCATE` of one of the client's statements.
    pub fn needs_rewrite(&self, tag: u8, body: &[u8]) -> bool {
        match tag {
            frontend::PARSE => match body.first() {
                Some(0) => self.own_deallocate_parse(body).is_some(),
                Some(_) => true,
                None => false,
            },
            frontend::BIND => frontend::bind(body).is_ok_and(|b| !b.statement.is_empty()),
            frontend::DESCRIBE => named_statement(frontend::describe(body)).is_some(),
            frontend::CLOSE => named_statement(frontend::close(body)).is_some(),
            _ => false,
        }
    }

    /// The unnamed Parse of `DEALLOCATE name` for one of the client's statements (as
    /// drivers send their maintenance commands): the name.
    fn own_deallocate_parse(&self, body: &[u8]) -> Option<String> {
        if self.statements.is_empty() {
            return None;
        }
        self.own_deallocate(frontend::parse(body).and_then(|p| p.text()).ok()?)
    }

    /// If `text` is `DEALLOCATE name` of one of the client's statements: the name. Other
    /// texts are turned away at their first bytes.
    fn own_deallocate(&self, text: &[u8]) -> Option<String> {
        let start = text.iter().position(|&b| !protocol::is_space(b))?;
        if !text[start..].get(..10)?.eq_ignore_ascii_case(b"deallocate") {
            return None;
        }
        let name = crate::router::classify::effects::deallocate_name(text)?;
        self.statements
            .contains_key(name.as_bytes())
            .then_some(name)
    }

    /// The server may have dropped statements behind pgrelay's back (`DEALLOCATE ALL`
    /// or `DISCARD ALL` in this transaction): prepare everything again until it ends.
    pub fn distrust_server(&mut self) {
        self.distrust = true;
    }

    fn server_has(&self, server: &mut ServerStatements, id: u128) -> bool {
        server.touch(id) && !self.distrust
    }

    /// If a Query body is exactly `DEALLOCATE name` of one of this client's protocol
    /// statements, pgrelay answers it: the server-side statement is shared.
    pub fn is_own_deallocate(&self, body: &[u8]) -> bool {
        if self.statements.is_empty() {
            return false;
        }
        frontend::query_text(body).is_ok_and(|text| self.own_deallocate(text).is_some())
    }

    /// Answers an own `DEALLOCATE` (see [`Prepared::is_own_deallocate`]) into `out`:
    /// CommandComplete, then ReadyForQuery with `status`. In a failed transaction the
    /// server would have refused it, and so does pgrelay.
    pub fn deallocate(&mut self, body: &[u8], status: TxStatus, out: &mut BytesMut) {
        if status == TxStatus::Failed {
            backend::error_response(
                out,
                backend::Severity::Error,
                sqlstate::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block",
            );
        } else {
            let name = frontend::query_text(body)
                .ok()
                .and_then(crate::router::classify::effects::deallocate_name);
            if let Some(name) = name {
                self.statements.remove(name.as_bytes());
            }
            backend::command_complete(out, "DEALLOCATE");
        }
        backend::ready_for_query(out, status);
    }

    /// Answers a request that only prepares statements some server already parsed,
    /// and closes statements (Parse and Close messages, then one Sync), without a
    /// server: ParseComplete, CloseComplete, then ReadyForQuery (idle) into `out`.
    /// Returns false, having changed nothing, for any other request.
    pub fn answer(
        &mut self,
        request: &[u8],
        search_path: Option<&str>,
        out: &mut BytesMut,
    ) -> bool {
        let mut plan: Vec<(u8, &[u8], Option<Statement>)> = Vec::new();
        let mut walk = frontend::messages(request);
        while let Some(Ok(frontend::Message { tag, body, .. })) = walk.next() {
            match tag {
                frontend::PARSE => {
                    let Ok(frontend::Parse { name, after_name }) = frontend::parse(body) else {
                        return false;
                    };
                    let known_name = self.statements.contains_key(name)
                        || plan
                            .iter()
                            .any(|(t, n, _)| *t == frontend::PARSE && *n == name);
                    if name.is_empty() || known_name {
                        return false;
                    }
                    let generation = self.parsed.generation();
                    let statement = Statement::new(after_name, search_path, generation);
                    if !self.parsed.knows(statement.id) {
                        return false;
                    }
                    plan.push((tag, name, Some(statement)));
                }
                frontend::CLOSE => {
                    let Some(name) = named_statement(frontend::close(body)) else {
                        return false;
                    };
                    plan.push((tag, name, None));
                }
                frontend::SYNC if walk.rest().is_empty() && !plan.is_empty() => {
                    for (tag, name, statement) in plan {
                        match statement {
                            Some(statement) => {
                                self.statements.insert(name.into(), Arc::new(statement));
                                backend::parse_complete(out);
                            }
                            None => {
                                debug_assert_eq!(tag, frontend::CLOSE);
                                self.statements.remove(name);
                                backend::close_complete(out);
                            }
                        }
                    }
                    backend::ready_for_query(out, TxStatus::Idle);
                    return true;
                }
                _ => return false,
            }
        }
        false
    }

    /// Notes a client message sent to the server unchanged.
    pub fn forwarded(&mut self, tag: u8) {
        match tag {
            frontend::PARSE => self.expect(frontend_answer(tag), false, None, None),
            frontend::CLOSE => self.expect(frontend_answer(tag), false, None, None),
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL => self.sent += 1,
            _ => {}
        }
    }

    /// Syncs sent during COPY FROM STDIN were ignored by the server.
    pub fn syncs_ignored(&mut self, count: usize) {
        self.sent = self.sent.saturating_sub(count as u64);
    }

    fn expect(
        &mut self,
        tag: u8,
        swallow: bool,
        forget_server: Option<u128>,
        forget_client: Option<Box<[u8]>>,
    ) {
        self.expect.push_back(Expect {
            tag,
            swallow,
            segment: self.sent,
            forget_server,
            forget_client,
            replaces_error: false,
        });
    }

    /// Writes what the server gets instead of the client's message `tag`/`body`
    /// (a whole message that [`Prepared::needs_rewrite`] accepted) to `out`.
    /// Returns the session effects of the statement a Bind executes.
    pub fn rewrite(
        &mut self,
        tag: u8,
        body: &[u8],
        server: &mut ServerStatements,
        search_path: Option<&str>,
        out: &mut BytesMut,
    ) -> Option<&Effects> {
        match tag {
            frontend::PARSE => self.rewrite_parse(body, server, search_path, out),
            frontend::BIND => {
                let Ok(frontend::Bind {
                    portal,
                    statement: name,
                    after_statement: rest,
                }) = frontend::bind(body)
                else {
                    return self.pass(tag, body, out);
                };
                let Some(statement) = self.statements.get(name).cloned() else {
                    // The server says it does not exist, naming it as the client did,
                    // unless the name could be one of pgrelay's own.
                    if name.starts_with(PREFIX) {
                        frontend::put_bind(out, portal, NONE, rest);
                        return None;
                    }
                    return self.pass(tag, body, out);
                };
                self.ensure(&statement, server, out);
                frontend::put_bind(out, portal, &statement.name, rest);
                self.statements.get(name).and_then(|s| s.effects.as_deref())
            }
            frontend::DESCRIBE => {
                let name = named_statement(frontend::describe(body)).unwrap_or_default();
                let Some(statement) = self.statements.get(name).cloned() else {
                    if name.starts_with(PREFIX) {
                        frontend::put_describe_statement(out, NONE);
                        return None;
                    }
                    return self.pass(tag, body, out);
                };
                self.ensure(&statement, server, out);
                frontend::put_describe_statement(out, &statement.name);
                None
            }
            frontend::CLOSE => {
                let name = named_statement(frontend::close(body)).unwrap_or_default();
                // Closing a statement that does not exist is no error in PostgreSQL.
                self.statements.remove(name);
                frontend::put_close_statement(out, NONE);
                self.expect(b'3', false, None, None);
                None
            }
            _ => self.pass(tag, body, out),
        }
    }

    /// A Parse that names a statement, or the unnamed Parse of `DEALLOCATE` of one.
    fn rewrite_parse(
        &mut self,
        body: &[u8],
        server: &mut ServerStatements,
        search_path: Option<&str>,
        out: &mut BytesMut,
    ) -> Option<&Effects> {
        let Ok(parse) = frontend::parse(body) else {
            return self.pass(frontend::PARSE, body, out);
        };
        let (name, rest) = (parse.name, parse.after_name);
        if name.is_empty() {
            // DEALLOCATE of the client's statement: the server-side one is
            // shared, so pgrelay's echo statement is deallocated instead.
            if let Some(own) = self.own_deallocate_parse(body) {
                self.statements.remove(own.as_bytes());
            }
            self.close_then_parse(out, ECHO, b"\0\0\0");
            self.expect(b'1', true, None, None);
            let mut text = b"DEALLOCATE pgrelay_echo\0".to_vec();
            text.extend_from_slice(parse.param_types().unwrap_or_default());
            frontend::put_parse(out, b"", &text);
            self.expect(b'1', false, None, None);
            return None;
        }
        if self.statements.contains_key(name) {
            // PostgreSQL refuses a second Parse of one name; so will it here.
            self.close_then_parse(out, DUPLICATE, b"\0\0\0");
            self.expect(b'1', true, None, None);
            frontend::put_parse(out, DUPLICATE, rest);
            self.expect(b'1', false, None, None);
            return None;
        }
        let generation = self.parsed.generation();
        let statement = Arc::new(Statement::new(rest, search_path, generation));
        let forget = Some(Box::<[u8]>::from(name));
        if self.server_has(server, statement.id) {
            self.close_then_parse(out, ECHO, b"\0\0\0");
            self.expect(b'1', false, None, forget);
        } else {
            self.make_room(statement.id, server, out);
            self.close_then_parse(out, &statement.name, &statement.rest);
            self.expect(b'1', false, Some(statement.id), forget);
        }
        self.statements.insert(name.into(), statement);
        None
    }

    /// Close, then Parse `name` (so the Parse cannot meet an old statement of that
    /// name). The Close's answer is swallowed; the caller says what the Parse's is.
    fn close_then_parse(&mut self, out: &mut BytesMut, name: &[u8], rest: &[u8]) {
        frontend::put_close_statement(out, name);
        self.expect(b'3', true, None, None);
        frontend::put_parse(out, name, rest);
    }

    /// Sends a message unchanged.
    fn pass(&mut self, tag: u8, body: &[u8], out: &mut BytesMut) -> Option<&Effects> {
        frontend::put_message(out, tag, body);
        self.forwarded(tag);
        None
    }

    /// Prepares `statement` on the server unless it has it.
    fn ensure(&mut self, statement: &Statement, server: &mut ServerStatements, out: &mut BytesMut) {
        let entry = (self.sent, statement.id);
        if self.used.len() < USED_MAX && self.used.last() != Some(&entry) {
            self.used.push(entry);
        }
        if self.server_has(server, statement.id) {
            self.stats.hits += 1;
            return;
        }
        self.stats.misses += 1;
        if self.parsed.is_stale(statement.id) {
            frontend::put_parse(out, STALE, STALE_TEXT);
            self.expect(b'1', true, None, None);
            if let Some(e) = self.expect.back_mut() {
                e.replaces_error = true;
            }
            return;
        }
        self.make_room(statement.id, server, out);
        // Closing first makes the Parse safe even if the server still had it.
        self.close_then_parse(out, &statement.name, &statement.rest);
        self.expect(b'1', true, Some(statement.id), None);
    }

    /// Records `id` on the server, closing the statement it pushes out.
    fn make_room(&mut self, id: u128, server: &mut ServerStatements, out: &mut BytesMut) {
        if let Some(evicted) = server.insert(id, self.capacity) {
            frontend::put_close_statement(out, &server_name(evicted));
            self.expect(b'3', true, None, None);
        }
    }

    /// Whether [`Prepared::on_server`] must be shown server messages with this tag.
    pub fn watches(&self, tag: u8) -> bool {
        match tag {
            backend::READY_FOR_QUERY => true,
            backend::PARSE_COMPLETE | backend::CLOSE_COMPLETE => self.expecting(),
            backend::ERROR_RESPONSE => self.expecting() || !self.used.is_empty(),
            _ => false,
        }
    }

    /// Shown the server messages [`Prepared::watches`]; `error` holds an
    /// ErrorResponse's fields.
    pub fn on_server(
        &mut self,
        tag: u8,
        error: Option<&ErrorFields>,
        server: &mut ServerStatements,
    ) -> Answer {
        match tag {
            backend::PARSE_COMPLETE | backend::CLOSE_COMPLETE => match self.expect.front() {
                Some(e) if e.tag == tag => {
                    let swallow = e.swallow;
                    if let Some(id) = e.parsed() {
                        self.parsed.learn(id);
                    }
                    self.expect.pop_front();
                    if swallow {
                        Answer::Swallow
                    } else {
                        Answer::Forward
                    }
                }
                _ => {
                    tracing::warn!(tag = %(tag as char), "an answer pgrelay did not expect; passing it on");
                    Answer::Forward
                }
            },
            backend::ERROR_RESPONSE => {
                let replace = error.is_some_and(|e| e.code == sqlstate::SYNTAX_ERROR)
                    && self
                        .expect
                        .front()
                        .is_some_and(|e| e.replaces_error && e.segment <= self.answered);
                if error.is_some_and(ErrorFields::is_stale_plan) {
                    self.note_stale_plan();
                }
                // The server skips the rest of this segment, up to its Sync.
                while self
                    .expect
                    .front()
                    .is_some_and(|e| e.segment <= self.answered)
                {
                    if let Some(e) = self.expect.pop_front() {
                        if let Some(id) = e.forget_server {
                            server.remove(id);
                        }
                        if let Some(name) = e.forget_client {
                            self.statements.remove(&name);
                        }
                    }
                }
                if replace {
                    Answer::Replace
                } else {
                    Answer::Forward
                }
            }
            backend::READY_FOR_QUERY => {
                self.answered += 1;
                if !self.used.is_empty() {
                    let answered = self.answered;
                    self.used.retain(|(segment, _)| *segment >= answered);
                }
                Answer::Forward
            }
            _ => Answer::Forward,
        }
    }

    /// A server refused a statement of the current segment as stale: the schema
    /// changed under it. The statements the segment used are stale everywhere (a
    /// segment seldom uses more than one), and statements prepared from now on are new.
    fn note_stale_plan(&mut self) {
        self.parsed.schema_changed();
        for (segment, id) in &self.used {
            if *segment <= self.answered {
                self.parsed.mark_stale(*id);
            }
        }
    }

    /// The client's transaction changes the schema (DDL, `DISCARD PLANS`).
    pub fn schema_changed(&self) {
        self.parsed.schema_changed();
    }

    /// Whether server answers need to be looked at.
    pub fn expecting(&self) -> bool {
        !self.expect.is_empty()
    }

    /// `DISCARD ALL` or `DEALLOCATE ALL` ran: the client has no statements left.
    pub fn forget_all(&mut self) {
        self.statements.clear();
    }

    pub fn len(&self) -> usize {
        self.statements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }
}

fn frontend_answer(tag: u8) -> u8 {
    if tag == frontend::PARSE {
        backend::PARSE_COMPLETE
    } else {
        backend::CLOSE_COMPLETE
    }
}

/// The statement a Describe or Close names, if it names one (not the unnamed one).
fn named_statement(target: Result<frontend::Target<'_>, ProtocolError>) -> Option<&[u8]> {
    target
        .ok()
        .and_then(frontend::Target::statement)
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::read_cstr;

    fn parse_body(name: &str, sql: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        body
    }

    fn bind_body(name: &str) -> Vec<u8> {
        let mut body = vec![0];
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        body
    }

    /// The (tag, name) of each message in `out`.
    fn messages(out: &[u8]) -> Vec<(char, String)> {
        let mut seen = Vec::new();
        for message in frontend::messages(out) {
            let frontend::Message { tag, body, .. } = message.unwrap();
            let name = match tag {
                b'C' | b'D' => read_cstr(&body[1..]).map(|(n, _)| n),
                b'B' => frontend::bind(body).ok().map(|b| b.statement),
                _ => read_cstr(body).map(|(n, _)| n),
            };
            seen.push((
                tag as char,
                String::from_utf8_lossy(name.unwrap_or_default()).into_owned(),
            ));
        }
        seen
    }

    fn prepared(capacity: usize) -> Prepared {
        Prepared::new(capacity, Arc::default())
    }

    #[test]
    fn equal_statements_get_equal_server_names() {
        let a = Statement::new(b"SELECT 1\0\0\0", None, 0);
        let b = Statement::new(b"SELECT 1\0\0\0", None, 0);
        let c = Statement::new(b"SELECT 2\0\0\0", None, 0);
        let d = Statement::new(b"SELECT 1\0\0\0", Some("other"), 0);
        assert_eq!(a.name, b.name);
        assert_ne!(a.name, c.name);
        assert_ne!(a.name, d.name, "search_path is part of the identity");
        assert!(a.name.starts_with(PREFIX));
    }

    #[test]
    fn binds_prepare_on_servers_that_lack_the_statement_and_swallow_the_answers() {
        let mut client = prepared(10);
        let (mut first, mut second) = (ServerStatements::default(), ServerStatements::default());
        let mut out = BytesMut::new();
        client.rewrite(
            b'P',
            &parse_body("s1", "SELECT 1"),
            &mut first,
            None,
            &mut out,
        );
        let server_name = messages(&out)[1].1.clone();
        assert_eq!(
            messages(&out),
            [('C', server_name.clone()), ('P', server_name.clone())]
        );
        // Close swallowed, ParseComplete forwarded.
        assert_eq!(client.on_server(b'3', None, &mut first), Answer::Swallow);
        assert_eq!(client.on_server(b'1', None, &mut first), Answer::Forward);

        // The same server has it: the Bind is only renamed.
        out.clear();
        client.rewrite(b'B', &bind_body("s1"), &mut first, None, &mut out);
        assert_eq!(messages(&out), [('B', server_name.clone())]);
        assert_eq!(client.stats, PreparedStats { hits: 1, misses: 0 });

        // Another server: prepared there first, both answers swallowed.
        out.clear();
        client.rewrite(b'B', &bind_body("s1"), &mut second, None, &mut out);
        assert_eq!(
            messages(&out),
            [
                ('C', server_name.clone()),
                ('P', server_name.clone()),
                ('B', server_name.clone())
            ]
        );
        assert_eq!(client.on_server(b'3', None, &mut second), Answer::Swallow);
        assert_eq!(client.on_server(b'1', None, &mut second), Answer::Swallow);
        assert!(!client.expecting());
        assert_eq!(second.len(), 1);
    }

    #[test]
    fn an_error_forgets_what_its_segment_would_have_created() {
        let mut client = prepared(10);
        let mut server = ServerStatements::default();
        let mut out = BytesMut::new();
        // Parse a, Sync | Parse b (fails), Parse c (skipped), Sync
        client.rewrite(
            b'P',
            &parse_body("a", "SELECT 1"),
            &mut server,
            None,
            &mut out,
        );
        client.forwarded(b'S');
        client.rewrite(b'P', &parse_body("b", "SELEC"), &mut server, None, &mut out);
        client.rewrite(
            b'P',
            &parse_body("c", "SELECT 3"),
            &mut server,
            None,
            &mut out,
        );
        client.forwarded(b'S');
        assert_eq!(server.len(), 3);
        for tag in [b'3', b'1', b'Z', b'3', b'E', b'Z'] {
            client.on_server(tag, None, &mut server);
        }
        assert!(!client.expecting());
        assert!(client.statement(b"a").is_some());
        assert!(client.statement(b"b").is_none());
        assert!(client.statement(b"c").is_none());
        assert_eq!(server.len(), 1);
    }

    #[test]
    fn unknown_names_never_reach_pgrelays_own_statements() {
        let mut client = prepared(10);
        let mut server = ServerStatements::default();
        let mut out = BytesMut::new();
        client.rewrite(
            b'B',
            &bind_body("pgrelay_echo"),
            &mut server,
            None,
            &mut out,
        );
        assert_eq!(messages(&out), [('B', "pgrelay_none".into())]);
        out.clear();
        client.rewrite(b'B', &bind_body("mine"), &mut server, None, &mut out);
        assert_eq!(messages(&out), [('B', "mine".into())]);
    }

    fn error(code: &str, routine: &str) -> ErrorFields {
        ErrorFields {
            severity: "ERROR".into(),
            code: code.into(),
            message: String::new(),
            routine: routine.into(),
        }
    }

    #[test]
    fn a_stale_statement_is_refused_everywhere_and_prepared_anew_under_a_new_id() {
        let parsed = Arc::new(Parsed::default());
        let (mut a, mut b) = (
            Prepared::new(10, parsed.clone()),
            Prepared::new(10, parsed.clone()),
        );
        let (mut first, mut second) = (ServerStatements::default(), ServerStatements::default());
        let mut out = BytesMut::new();
        // Both clients prepare the same text: one server-side statement on `first`.
        a.rewrite(
            b'P',
            &parse_body("s", "SELECT * FROM t"),
            &mut first,
            None,
            &mut out,
        );
        b.rewrite(
            b'P',
            &parse_body("s", "SELECT * FROM t"),
            &mut first,
            None,
            &mut out,
        );
        let old = a.statement(b"s").map(|s| s.id);
        assert_eq!(old, b.statement(b"s").map(|s| s.id));
        a.attached();
        b.attached();

        // After a schema change, a's Bind on `first` is refused as stale.
        out.clear();
        a.rewrite(b'B', &bind_body("s"), &mut first, None, &mut out);
        a.forwarded(b'S');
        let stale = error("0A000", backend::STALE_PLAN_ROUTINE);
        assert_eq!(a.on_server(b'E', Some(&stale), &mut first), Answer::Forward);
        assert_eq!(a.on_server(b'Z', None, &mut first), Answer::Forward);
        assert!(parsed.is_stale(old.unwrap_or_default()));

        // The driver re-prepares the same text under a new name: a new statement,
        // really parsed, never echoed from the stale one.
        out.clear();
        a.rewrite(
            b'P',
            &parse_body("s2", "SELECT * FROM t"),
            &mut first,
            None,
            &mut out,
        );
        let renewed = a.statement(b"s2").map(|s| s.id);
        assert_ne!(renewed, old);
        assert!(messages(&out)
            .iter()
            .all(|(_, name)| name != "pgrelay_echo"));

        // b still holds the old statement. On a server that never had it, it is not
        // prepared afresh: a failing Parse stands in, and its error is replaced.
        out.clear();
        b.rewrite(b'B', &bind_body("s"), &mut second, None, &mut out);
        b.forwarded(b'S');
        assert_eq!(messages(&out)[0], ('P', "pgrelay_stale".into()));
        assert_eq!(
            b.on_server(b'E', Some(&error("42601", "scanner_yyerror")), &mut second),
            Answer::Replace
        );
        assert_eq!(second.len(), 0);
        // Another error in that place (an aborted transaction) is passed on.
        out.clear();
        b.attached();
        b.rewrite(b'B', &bind_body("s"), &mut second, None, &mut out);
        b.forwarded(b'S');
        let aborted = error("25P02", "exec_parse_message");
        assert_eq!(
            b.on_server(b'E', Some(&aborted), &mut second),
            Answer::Forward
        );
    }

    #[test]
    fn statements_prepared_after_a_schema_change_are_new() {
        let parsed = Arc::new(Parsed::default());
        let mut client = Prepared::new(10, parsed.clone());
        let mut server = ServerStatements::default();
        let mut out = BytesMut::new();
        client.rewrite(
            b'P',
            &parse_body("a", "SELECT 1"),
            &mut server,
            None,
            &mut out,
        );
        parsed.schema_changed();
        client.rewrite(
            b'P',
            &parse_body("b", "SELECT 1"),
            &mut server,
            None,
            &mut out,
        );
        assert_ne!(
            client.statement(b"a").map(|s| s.id),
            client.statement(b"b").map(|s| s.id)
        );
        assert_eq!(server.len(), 2, "the second is parsed, not echoed");
    }

    #[test]
    fn servers_keep_the_most_recently_used() {
        let mut server = ServerStatements::default();
        assert_eq!(server.insert(1, 2), None);
        assert_eq!(server.insert(2, 2), None);
        assert!(server.touch(1));
        assert_eq!(server.insert(3, 2), Some(2));
        assert!(server.touch(1) && server.touch(3) && !server.touch(2));
    }

    #[test]
    fn closes_and_second_parses_are_answered_by_the_server() {
        let mut client = prepared(10);
        let mut server = ServerStatements::default();
        let mut out = BytesMut::new();
        client.rewrite(
            b'P',
            &parse_body("a", "SELECT 1"),
            &mut server,
            None,
            &mut out,
        );
        out.clear();
        client.rewrite(
            b'P',
            &parse_body("a", "SELECT 2"),
            &mut server,
            None,
            &mut out,
        );
        assert_eq!(
            messages(&out),
            [
                ('C', "pgrelay_duplicate".into()),
                ('P', "pgrelay_duplicate".into()),
                ('P', "pgrelay_duplicate".into())
            ]
        );
        out.clear();
        let mut close = vec![b'S'];
        close.extend_from_slice(b"a\0");
        client.rewrite(b'C', &close, &mut server, None, &mut out);
        assert_eq!(messages(&out), [('C', "pgrelay_none".into())]);
        assert!(client.statement(b"a").is_none());
    }
}
