//! The lexical pass over one statement: what its first keyword makes it, for routing
//! and for the session it runs in, and for queries a single walk over every token
//! looking for row locks, `SELECT INTO`, writable CTEs and function calls. It reports
//! `Unsure` rather than guess, and allocates only to record a function it does not
//! know or a setting the statement changes.

use super::effects::{self, Effects};
use super::lexer::{is, Statement, Token};
use super::lists::{self, FunctionKind, Lists};
use super::{Command, Reason};

/// What one statement means for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Changes nothing a replica could not follow: empty, COMMIT, SAVEPOINT, SET LOCAL.
    Neutral,
    Read,
    Begin {
        read_only: bool,
    },
    /// `SET TRANSACTION`, with the access mode it sets, if any.
    SetTransaction {
        read_only: Option<bool>,
    },
    /// COMMIT, END, ROLLBACK, ABORT: closes a BEGIN.
    End,
    Primary {
        reason: Reason,
        session_state: bool,
    },
    /// The lexical pass cannot tell; sqlparser decides.
    Unsure,
}

const WRITE: Kind = Kind::Primary {
    reason: Reason::Write,
    session_state: false,
};

const fn session(session_state: bool) -> Kind {
    Kind::Primary {
        reason: Reason::SessionState,
        session_state,
    }
}

/// A keyword lower-cased into `buf`; words longer than any keyword come back empty.
fn keyword<'b>(word: &[u8], buf: &'b mut [u8; 16]) -> &'b [u8] {
    let Some(out) = buf.get_mut(..word.len()) else {
        return &[];
    };
    for (o, c) in out.iter_mut().zip(word) {
        *o = c.to_ascii_lowercase();
    }
    out
}

fn is_word(token: Option<Token<'_>>, kw: &str) -> bool {
    matches!(token, Some(Token::Word(w)) if is(w, kw))
}

/// What one pass over a text collects besides each statement's [`Kind`].
pub(super) struct Pass<'p> {
    pub(super) lists: &'p Lists,
    /// Functions called whose volatility is unknown (routing).
    pub(super) functions: &'p mut Vec<Box<str>>,
    /// What the statements do to the session.
    pub(super) effects: &'p mut Effects,
    /// The first statement's command, by its first keyword.
    pub(super) command: Option<Command>,
    /// Routing wants the answer. Without it a statement is read only as far as its
    /// effects need: its first keywords, and its calls if `calls`.
    pub(super) route: bool,
    /// The text may call a function that leaves session state or releases it: every
    /// call is looked at.
    pub(super) calls: bool,
}

/// Reads one statement: returns what it means for routing, and adds what it does to
/// the session (and the unknown functions it calls) to `pass`.
pub(super) fn statement(stmt: &mut Statement<'_, '_>, pass: &mut Pass<'_>) -> Kind {
    let kind = dispatch(stmt, pass);
    if pass.calls {
        // The calls in what the first keywords left unread.
        calls(stmt, pass.effects);
    }
    kind
}

/// The statement by its first keyword (after EXPLAIN ANALYZE, the statement it runs).
fn dispatch(stmt: &mut Statement<'_, '_>, pass: &mut Pass<'_>) -> Kind {
    let mut first = stmt.next();
    loop {
        let word = match first {
            None => return Kind::Neutral,
            Some(Token::Punct(b'(')) => {
                pass.command.get_or_insert(Command::Select);
                return query(stmt, first, pass, false);
            }
            Some(Token::Word(w)) => w,
            Some(_) => return WRITE,
        };
        let mut buf = [0; 16];
        let kw = keyword(word, &mut buf);
        pass.command.get_or_insert(Command::of(kw));
        let effects = &mut *pass.effects;
        return match kw {
            b"select" | b"values" | b"table" | b"with" => query(stmt, first, pass, false),
            b"show" => Kind::Read,
            b"explain" => match explain(stmt) {
                Some(analyzed) => {
                    first = analyzed;
                    continue;
                }
                None => Kind::Read,
            },
            b"begin" => Kind::Begin {
                read_only: transaction_modes(stmt) == Some(true),
            },
            b"start" if is_word(stmt.next(), "transaction") => Kind::Begin {
                read_only: transaction_modes(stmt) == Some(true),
            },
            b"commit" | b"end" | b"rollback" | b"abort" => {
                // `ON COMMIT DROP` temporary tables go with the transaction.
                effects.may_release = true;
                end(stmt)
            }
            b"savepoint" | b"release" => Kind::Neutral,
            b"set" => set(stmt, effects),
            b"copy" => copy(stmt, pass),
            _ => held_state(kw, stmt, effects),
        };
    }
}

/// Commands that keep, undo or change what a session holds (and any other command):
/// their route class, with their effects added to `effects`.
fn held_state(kw: &[u8], stmt: &mut Statement<'_, '_>, effects: &mut Effects) -> Kind {
    match kw {
        // These undo session state. They must run where that state lives, but leave
        // nothing new behind, so they do not pin the client.
        b"reset" => {
            effects::reset(stmt, effects);
            session(false)
        }
        b"discard" => {
            effects::discard(stmt, effects);
            session(false)
        }
        b"deallocate" => {
            effects::deallocate(stmt, effects);
            session(false)
        }
        b"unlisten" => {
            effects.may_release = true;
            session(false)
        }
        b"listen" => {
            effects.may_pin = true;
            session(true)
        }
        b"load" => {
            effects.pin = effects.pin.or(Some("LOAD"));
            session(true)
        }
        b"prepare" if is_word(stmt.next(), "transaction") => WRITE,
        b"prepare" => {
            effects.may_pin = true;
            session(true)
        }
        b"create" => create(stmt, effects),
        b"declare" => {
            // Without HOLD it leaves nothing: the server check afterwards says so.
            effects.may_pin = true;
            declare(stmt)
        }
        b"alter" => {
            effects.schema_change = true;
            WRITE
        }
        b"drop" => {
            effects.may_release = true;
            effects.schema_change = true;
            WRITE
        }
        b"close" => {
            effects.may_release = true;
            WRITE
        }
        _ => WRITE,
    }
}

/// Looks at every call in the rest of the statement, for its effects on the session.
fn calls(stmt: &mut Statement<'_, '_>, effects: &mut Effects) {
    let mut previous: Option<Token<'_>> = None;
    while let Some(token) = stmt.next() {
        if token == Token::Punct(b'(') {
            if let Some(name @ (Token::Word(_) | Token::Quoted(_))) = previous {
                let mut buf = [0; 64];
                if let Some(kind) = lists::builtin_kind(fold_name(name, &mut buf)) {
                    effects::call(effects, kind);
                }
            }
        }
        previous = Some(token);
    }
}

/// Reads EXPLAIN's options. With ANALYZE the statement runs, so the caller classifies
/// it: returns its first token. Without, EXPLAIN only plans: returns None.
fn explain<'a>(stmt: &mut Statement<'_, 'a>) -> Option<Option<Token<'a>>> {
    let mut analyze = false;
    let mut token = stmt.next();
    let is_analyze = |w: &[u8]| is(w, "analyze") || is(w, "analyse");
    if token == Some(Token::Punct(b'(')) {
        loop {
            match stmt.next() {
                None | Some(Token::Punct(b')')) => break,
                // Even `ANALYZE false`: being wrong that way only costs a replica.
                Some(Token::Word(w)) if is_analyze(w) => analyze = true,
                Some(_) => {}
            }
        }
        token = stmt.next();
    } else {
        while let Some(Token::Word(w)) = token {
            if is_analyze(w) {
                analyze = true;
            } else if !is(w, "verbose") {
                break;
            }
            token = stmt.next();
        }
    }
    analyze.then_some(token)
}

/// The access mode a list of transaction modes ends with, if any.
fn transaction_modes(stmt: &mut Statement<'_, '_>) -> Option<bool> {
    let mut read_only = None;
    let mut after_read = false;
    while let Some(token) = stmt.next() {
        let word = match token {
            Token::Word(w) => w,
            _ => {
                after_read = false;
                continue;
            }
        };
        if after_read && is(word, "only") {
            read_only = Some(true);
        } else if after_read && is(word, "write") {
            read_only = Some(false);
        }
        after_read = is(word, "read");
    }
    read_only
}

fn end(stmt: &mut Statement<'_, '_>) -> Kind {
    while let Some(token) = stmt.next() {
        if is_word(Some(token), "prepared") {
            return WRITE;
        }
        if is_word(Some(token), "to") {
            // ROLLBACK TO SAVEPOINT: the transaction goes on.
            return Kind::Neutral;
        }
    }
    Kind::End
}

fn set(stmt: &mut Statement<'_, '_>, effects: &mut Effects) -> Kind {
    let next = stmt.next();
    if is_word(next, "transaction") {
        Kind::SetTransaction {
            read_only: transaction_modes(stmt),
        }
    } else if is_word(next, "local") || is_word(next, "constraints") {
        // Both last only until the transaction ends.
        Kind::Neutral
    } else {
        effects::set(stmt, next, effects);
        session(true)
    }
}

/// CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY] ... lives as long as the session.
/// Anything else it creates may change what prepared statements return.
fn create(stmt: &mut Statement<'_, '_>, effects: &mut Effects) -> Kind {
    while let Some(Token::Word(w)) = stmt.next() {
        if is(w, "temp") || is(w, "temporary") {
            effects.may_pin = true;
            return session(true);
        }
        if !(is(w, "or") || is(w, "replace") || is(w, "global") || is(w, "local")) {
            break;
        }
    }
    effects.schema_change = true;
    WRITE
}

/// A cursor WITH HOLD outlives its transaction.
fn declare(stmt: &mut Statement<'_, '_>) -> Kind {
    let mut after_with = false;
    while let Some(token) = stmt.next() {
        if is_word(Some(token), "for") {
            break;
        }
        if after_with && is_word(Some(token), "hold") {
            return session(true);
        }
        after_with = is_word(Some(token), "with");
    }
    WRITE
}

/// `COPY table TO STDOUT` and `COPY (query) TO STDOUT` read; anything else writes
/// rows or server files.
fn copy(stmt: &mut Statement<'_, '_>, pass: &mut Pass<'_>) -> Kind {
    let token = stmt.next();
    let source = if token == Some(Token::Punct(b'(')) {
        let first = stmt.next();
        let reads = matches!(first, Some(Token::Punct(b'(')))
            || ["select", "with", "values", "table"]
                .iter()
                .any(|kw| is_word(first, kw));
        if !reads {
            return WRITE;
        }
        query(stmt, first, pass, true)
    } else {
        // A table name, maybe qualified, maybe with a column list.
        let mut after = stmt.next();
        while after == Some(Token::Punct(b'.')) {
            stmt.next();
            after = stmt.next();
        }
        if after == Some(Token::Punct(b'(')) {
            while !matches!(stmt.next(), None | Some(Token::Punct(b')'))) {}
            after = stmt.next();
        }
        if !is_word(after, "to") {
            return WRITE;
        }
        return if is_word(stmt.next(), "stdout") {
            Kind::Read
        } else {
            WRITE
        };
    };
    if is_word(stmt.next(), "to") && is_word(stmt.next(), "stdout") {
        source
    } else {
        WRITE
    }
}

/// Scans a query (SELECT, VALUES, TABLE, WITH or a parenthesized one) from its first
/// token. With `until_close` it stops at the `)` that closes the query (COPY's form).
fn query<'a>(
    stmt: &mut Statement<'_, 'a>,
    first: Option<Token<'a>>,
    pass: &mut Pass<'_>,
    until_close: bool,
) -> Kind {
    if !pass.route {
        // Only calls can matter to the session: `calls` looks at them.
        return Kind::Read;
    }
    let mut scan = QueryScan {
        lists: pass.lists,
        functions: &mut *pass.functions,
        effects: &mut *pass.effects,
        history: [None; 3],
        depth: 0,
        starts_with_with: is_word(first, "with"),
        cte_depth: None,
        cte_name_next: false,
        after_cte_name: false,
        primary: None,
        unsure: false,
    };
    let mut token = first;
    while let Some(t) = token {
        if t == Token::Punct(b')') && scan.depth == 0 && until_close {
            break;
        }
        scan.token(t);
        token = stmt.next();
    }
    match scan.primary {
        Some((reason, session_state)) => Kind::Primary {
            reason,
            session_state,
        },
        None if scan.unsure => Kind::Unsure,
        None => Kind::Read,
    }
}

struct QueryScan<'s, 'a> {
    lists: &'s Lists,
    functions: &'s mut Vec<Box<str>>,
    effects: &'s mut Effects,
    /// The last three tokens, most recent first: enough to recognize `FOR NO KEY
    /// UPDATE`, `AS MATERIALIZED (DELETE` and `schema.f(` without lookahead.
    history: [Option<Token<'a>>; 3],
    depth: u32,
    starts_with_with: bool,
    /// The parenthesis depth of the WITH whose CTE list is being read, so that a `,`
    /// there announces another CTE name.
    cte_depth: Option<u32>,
    cte_name_next: bool,
    /// The previous token named a CTE: a `(` now opens its column list, not a call.
    after_cte_name: bool,
    primary: Option<(Reason, bool)>,
    unsure: bool,
}

impl<'a> QueryScan<'_, 'a> {
    fn token(&mut self, token: Token<'a>) {
        let mut names_cte = false;
        match token {
            Token::Punct(b'(') => {
                if self.history[0] == Some(Token::Punct(b')')) && self.cte_depth == Some(self.depth)
                {
                    self.cte_depth = None;
                }
                self.call_check();
                self.depth += 1;
            }
            Token::Punct(b')') => self.depth = self.depth.saturating_sub(1),
            Token::Punct(b',') if self.cte_depth == Some(self.depth) => self.cte_name_next = true,
            Token::Word(w) => names_cte = self.word(w),
            Token::Quoted(_) if self.cte_name_next => {
                self.cte_name_next = false;
                names_cte = true;
            }
            _ => {}
        }
        self.after_cte_name = names_cte;
        self.history = [Some(token), self.history[0], self.history[1]];
    }

    fn prev_is(&self, back: usize, kw: &str) -> bool {
        is_word(self.history[back], kw)
    }

    fn write(&mut self, reason: Reason, session_state: bool) {
        let entry = self.primary.get_or_insert((reason, false));
        entry.1 |= session_state;
    }

    /// Handles a word; returns whether it names a CTE.
    fn word(&mut self, word: &[u8]) -> bool {
        let mut buf = [0; 16];
        let kw = keyword(word, &mut buf);
        if self.cte_name_next {
            if matches!(kw, b"ordinality" | b"ties" | b"time") && self.prev_is(0, "with") {
                // WITH ORDINALITY, WITH TIES, WITH TIME ZONE: not a CTE list.
                self.cte_name_next = false;
                self.cte_depth = None;
                return false;
            }
            self.cte_name_next = kw == b"recursive";
            return !self.cte_name_next;
        }
        let at_cte_level = self.cte_depth == Some(self.depth);
        match kw {
            b"with" => {
                self.cte_name_next = true;
                self.cte_depth = Some(self.depth);
            }
            b"update" | b"share" if self.is_lock_clause() => self.write(Reason::Write, false),
            b"insert" | b"update" | b"delete" | b"merge" => self.data_modifying(),
            b"into" => self.write(Reason::Write, false),
            // MySQL's LOCK IN SHARE MODE: sqlparser may read it as a row lock.
            b"lock" => self.unsure = true,
            b"select" | b"values" | b"table" if at_cte_level => self.cte_depth = None,
            _ => {}
        }
        false
    }

    /// FOR UPDATE, FOR NO KEY UPDATE, FOR SHARE, FOR KEY SHARE.
    fn is_lock_clause(&self) -> bool {
        self.prev_is(0, "for")
            || (self.prev_is(0, "key") && (self.prev_is(1, "no") || self.prev_is(1, "for")))
    }

    /// INSERT, UPDATE, DELETE or MERGE inside a query: a writable CTE's body, the main
    /// statement after a CTE list, or something only a parser can place.
    fn data_modifying(&mut self) {
        let cte_body = self.history[0] == Some(Token::Punct(b'('))
            && (self.prev_is(1, "as") || self.prev_is(1, "materialized"));
        let after_ctes =
            self.depth == 0 && self.starts_with_with && self.history[0] == Some(Token::Punct(b')'));
        if cte_body || after_ctes {
            self.write(Reason::Write, false);
        } else {
            self.unsure = true;
        }
    }

    /// Called at `(`: decides whether the previous token names a function.
    fn call_check(&mut self) {
        if self.after_cte_name {
            return;
        }
        let name = match self.history[0] {
            Some(token @ (Token::Word(_) | Token::Quoted(_))) => token,
            _ => return,
        };
        match self.history[1] {
            // A type modifier (`::numeric(10,2)`, `AS varchar(3)`) or an alias's
            // column list (`AS t(a, b)`, `(VALUES (1)) v(a)`).
            Some(Token::Cast | Token::Punct(b')')) => return,
            Some(Token::Word(w)) if is(w, "as") => return,
            _ => {}
        }
        let qualified = self.history[1] == Some(Token::Punct(b'.'));
        let mut buf = [0; 64];
        let folded = fold_name(name, &mut buf);
        if !qualified
            && matches!(name, Token::Word(_))
            && lists::contains(lists::PAREN_KEYWORDS, folded)
        {
            return;
        }
        let kind = self.lists.kind(folded);
        effects::call(self.effects, kind);
        match kind {
            FunctionKind::SessionLock | FunctionKind::SessionState(_) => {
                self.write(Reason::SessionState, true)
            }
            FunctionKind::Unlock | FunctionKind::Write => self.write(Reason::Function, false),
            FunctionKind::Read => {}
            FunctionKind::Unknown => {
                let name = String::from_utf8_lossy(folded);
                if !self.functions.iter().any(|f| **f == *name) {
                    self.functions.push(name.into());
                }
            }
        }
    }
}

/// A function name as PostgreSQL folds it, truncated like PostgreSQL to 63 bytes:
/// unquoted words lower-cased (ASCII only), quoted ones with `""` undoubled.
fn fold_name<'b>(token: Token<'_>, buf: &'b mut [u8; 64]) -> &'b [u8] {
    let mut len = 0;
    match token {
        Token::Word(w) => {
            for (o, c) in buf.iter_mut().zip(w.iter().take(63)) {
                *o = c.to_ascii_lowercase();
                len += 1;
            }
        }
        Token::Quoted(q) => {
            let mut i = 0;
            while i < q.len() && len < 63 {
                buf[len] = q[i];
                len += 1;
                i += if q[i] == b'"' { 2 } else { 1 };
            }
        }
        _ => {}
    }
    &buf[..len]
}
