//! SQL statement classification for read/write routing, from the raw bytes of a simple
//! Query or a Parse message (any encoding, possibly several `;`-separated statements).
//!
//! One lexical pass over a text yields everything pgrelay needs to know of it
//! ([`Classifier::understand`], a [`Meaning`]): where it may run, what it does to the
//! session ([`effects`]), and what command it is. When only the effects are wanted
//! (transaction pooling without routing, or inside a transaction), [`session_effects`]
//! runs the same pass reading no further than the effects need.
//!
//! [`Classifier::classify`] decides whether a text may run on a streaming replica. It is
//! conservative: whatever may write, leaves session state behind, or cannot be judged
//! goes to the primary. It runs on the hot path, so the common case is one lexical pass
//! over borrowed tokens ([`lexer`], [`scan`]) with no allocation. Only when that pass is
//! unsure (data-modifying keywords where only a parser can place them) does it parse
//! with sqlparser ([`ast`]); those answers, and those for long texts, are kept in a
//! bounded cache. It never does I/O: functions it does not know are returned for the
//! router to look up in `pg_proc`.
//!
//! It also recognizes the commands that need a database free of other sessions
//! (`DROP DATABASE x`, `ALTER DATABASE x RENAME`, `CREATE DATABASE ... TEMPLATE x`), so
//! pgrelay can close its own idle server connections to `x` first.

mod ast;
pub mod effects;
mod lexer;
mod lists;
mod scan;
#[cfg(test)]
mod table_tests;

use dashmap::DashMap;

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use effects::Effects;
use lexer::{identifier, Lexer, Statement, Token};
use scan::{Kind, Pass};

/// Where a statement string may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Replica,
    Primary,
}

/// Why a string must go to the primary (for logs and metrics); `None` when it may read
/// on a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A statement that writes, or an unknown command.
    Write,
    /// BEGIN or START TRANSACTION without READ ONLY.
    Transaction,
    /// A statement that sets or undoes session state (SET, RESET, PREPARE, LISTEN,
    /// DISCARD, DEALLOCATE, UNLISTEN, CREATE TEMP, DECLARE WITH HOLD, LOAD, session
    /// advisory locks, `set_config`).
    SessionState,
    /// A routing hint comment (`pgrelay:primary`, `NO LOAD BALANCE`).
    Hint,
    /// A call of a function known to write (built in or configured `write_functions`).
    Function,
    /// Neither the lexical pass nor sqlparser could judge the text.
    Unsure,
}

/// The classification of one statement string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub target: Target,
    pub reason: Option<Reason>,
    /// The string leaves state in the session that cannot follow the client to another
    /// server: session-level SET and SET SESSION CHARACTERISTICS, PREPARE, LISTEN,
    /// CREATE TEMP/TEMPORARY, DECLARE ... WITH HOLD, LOAD, session advisory locks,
    /// `set_config`, `setseed`, `dblink_connect`. Such strings are always Primary.
    ///
    /// RESET, DISCARD, DEALLOCATE and UNLISTEN undo state: they go to the primary (where
    /// the state they undo lives) with [`Reason::SessionState`], but leave nothing behind,
    /// so they do not set this flag.
    pub session_state: bool,
    /// Functions called whose volatility is unknown to the classifier, lower-cased
    /// unqualified names (quoted names keep their case), deduplicated. The string may
    /// run on a replica only if none of them turns out to be volatile; the router looks
    /// them up in `pg_proc`. Empty (no allocation) for ordinary statements.
    pub functions: Vec<Box<str>>,
}

/// What a statement string is, by its first statement's first keyword, as
/// `SHOW POOL_BACKEND_STATS` counts the writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Select,
    Insert,
    Update,
    Delete,
    Ddl,
    Other,
}

impl Command {
    /// The command a lower-case first keyword starts.
    fn of(keyword: &[u8]) -> Command {
        match keyword {
            b"select" | b"values" | b"table" => Command::Select,
            b"insert" => Command::Insert,
            b"update" => Command::Update,
            b"delete" => Command::Delete,
            b"create" | b"alter" | b"drop" | b"truncate" | b"comment" | b"grant" | b"revoke"
            | b"reindex" => Command::Ddl,
            _ => Command::Other,
        }
    }
}

/// Everything one lexical pass learns of a statement string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meaning {
    /// Where it may run.
    pub verdict: Verdict,
    /// What it does to the session it runs in.
    pub effects: Effects,
    pub command: Command,
}

/// Texts at least this long are cached: lexing them costs more than hashing them.
const CACHE_MIN_LEN: usize = 512;
/// The cache is emptied when it reaches this many entries, so it cannot grow without
/// bound under a workload of ever-new texts; a working set refills it quickly.
const CACHE_MAX_ENTRIES: usize = 10_000;

/// The statement classifier: the configured function lists and a bounded cache.
/// Shared by all sessions behind an `Arc`.
pub struct Classifier {
    lists: lists::Lists,
    /// Meanings of texts that needed sqlparser, are long, or came in a Parse message,
    /// by text. Sharded, so sessions on several worker threads rarely meet on a lock.
    cache: DashMap<Box<[u8]>, Meaning>,
}

impl Classifier {
    /// `write_functions` are treated like `nextval`; `read_only_functions` are safe on a
    /// replica (they cannot override the built-in write list). Names are matched as
    /// PostgreSQL folds them: the last part of a qualified name, lower-cased unless
    /// written in double quotes.
    pub fn new(write_functions: &[String], read_only_functions: &[String]) -> Classifier {
        Classifier {
            lists: lists::Lists::new(write_functions, read_only_functions),
            cache: DashMap::new(),
        }
    }

    /// Classifies a statement string.
    pub fn classify(&self, sql: &[u8]) -> Verdict {
        self.understand(sql).verdict
    }

    /// Classifies the text of a Parse message.
    pub fn classify_prepared(&self, sql: &[u8]) -> Verdict {
        self.understand_prepared(sql).verdict
    }

    /// Everything pgrelay needs to know of a statement string, in one pass.
    pub fn understand(&self, sql: &[u8]) -> Meaning {
        if sql.len() >= CACHE_MIN_LEN {
            if let Some(meaning) = self.cached(sql) {
                return meaning;
            }
        }
        let (meaning, parsed) = self.understand_uncached(sql);
        if parsed || sql.len() >= CACHE_MIN_LEN {
            self.remember(sql, &meaning);
        }
        meaning
    }

    /// The meaning of a Parse message's text. Drivers send the same few texts over and
    /// over (with `$n` parameters, not literals), so every one is cached.
    pub fn understand_prepared(&self, sql: &[u8]) -> Meaning {
        if let Some(meaning) = self.cached(sql) {
            return meaning;
        }
        let (meaning, _) = self.understand_uncached(sql);
        self.remember(sql, &meaning);
        meaning
    }

    fn cached(&self, sql: &[u8]) -> Option<Meaning> {
        self.cache.get(sql).map(|m| m.clone())
    }

    fn remember(&self, sql: &[u8], meaning: &Meaning) {
        if self.cache.len() >= CACHE_MAX_ENTRIES {
            self.cache.clear();
        }
        self.cache.insert(sql.into(), meaning.clone());
    }

    /// The meaning, and whether sqlparser was needed.
    fn understand_uncached(&self, sql: &[u8]) -> (Meaning, bool) {
        let mut lexical = lexical_pass(sql, &self.lists, false, true);
        if lexical.backslash_in_string {
            // The server's standard_conforming_strings decides where a string with a
            // backslash ends; take the more conservative of the two readings.
            lexical.merge(lexical_pass(sql, &self.lists, true, true));
        }
        if lexical.unterminated {
            lexical.primary = Some(Reason::Unsure);
            return (lexical.meaning(), false);
        }
        if !lexical.unsure || lexical.primary.is_some() {
            return (lexical.meaning(), false);
        }
        if sql.len() < CACHE_MIN_LEN {
            if let Some(meaning) = self.cached(sql) {
                return (meaning, false);
            }
        }
        (self.parsed(sql, lexical), true)
    }

    /// Asks sqlparser about a text the lexical pass was unsure of.
    fn parsed(&self, sql: &[u8], mut lexical: Lexical) -> Meaning {
        let parsed = std::str::from_utf8(sql)
            .ok()
            .and_then(|text| Parser::parse_sql(&PostgreSqlDialect {}, text).ok());
        let Some(statements) = parsed else {
            lexical.primary = Some(Reason::Unsure);
            return lexical.meaning();
        };
        let judgement = ast::judge(&statements, &self.lists);
        lexical.session_state |= judgement.session_state;
        lexical.primary = lexical.primary.or(judgement.primary);
        if judgement.opaque {
            lexical.primary.get_or_insert(Reason::Unsure);
        }
        for name in judgement.functions {
            if !lexical.functions.contains(&name) {
                lexical.functions.push(name);
            }
        }
        lexical.meaning()
    }
}

/// What a statement string does to the session it runs in: the one lexical pass,
/// reading each statement no further than its effects need.
pub fn session_effects(sql: &[u8]) -> Effects {
    static BUILT_IN: std::sync::LazyLock<lists::Lists> =
        std::sync::LazyLock::new(lists::Lists::default);
    lexical_pass(sql, &BUILT_IN, false, false).effects
}

/// The lexical pass over every statement of a text. Without `route` it reads only what
/// the effects need: a statement's first keywords, and its calls if the text may call
/// a function that leaves session state.
fn lexical_pass(sql: &[u8], lists: &lists::Lists, backslash_escapes: bool, route: bool) -> Lexical {
    let mut lexer = Lexer::new(sql, backslash_escapes);
    let mut hint = false;
    lexer.skip_space_and_comments(|comment| hint |= is_hint(comment));
    let mut lexical = Lexical::default();
    if hint {
        lexical.primary = Some(Reason::Hint);
    }
    let calls = lists::may_call_session_function(sql);
    // One statement, perhaps with a `;` at the end: its effects are all read.
    let single = !route
        && match sql.iter().position(|&b| b == b';') {
            None => true,
            Some(i) => sql[i + 1..].iter().all(|&c| lexer::is_space(c)),
        };
    loop {
        let mut statement = Statement::new(&mut lexer);
        let mut pass = Pass {
            lists,
            functions: &mut lexical.functions,
            effects: &mut lexical.effects,
            command: lexical.command,
            route,
            calls,
        };
        let kind = scan::statement(&mut statement, &mut pass);
        lexical.command = pass.command;
        lexical.add(kind);
        if single {
            break;
        }
        statement.drain();
        if statement.last {
            break;
        }
    }
    lexical.close_transaction();
    lexical.unterminated = lexer.unterminated;
    lexical.backslash_in_string = lexer.backslash_in_string;
    lexical
}

/// The lexical pass's findings over a whole text.
#[derive(Debug, Default)]
struct Lexical {
    primary: Option<Reason>,
    session_state: bool,
    functions: Vec<Box<str>>,
    /// Some statement needs sqlparser.
    unsure: bool,
    /// Some(read_only) while inside a BEGIN.
    open_transaction: Option<bool>,
    unterminated: bool,
    backslash_in_string: bool,
    effects: Effects,
    command: Option<Command>,
}

impl Lexical {
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Neutral | Kind::Read => {}
            Kind::Begin { read_only } => {
                self.close_transaction();
                self.open_transaction = Some(read_only);
            }
            Kind::SetTransaction { read_only } => {
                if let (Some(open), Some(read_only)) = (self.open_transaction.as_mut(), read_only) {
                    *open = read_only;
                }
            }
            Kind::End => self.close_transaction(),
            Kind::Primary {
                reason,
                session_state,
            } => {
                self.primary.get_or_insert(reason);
                self.session_state |= session_state;
            }
            Kind::Unsure => self.unsure = true,
        }
    }

    /// A transaction that was not read-only when it ended (or the text did) writes.
    fn close_transaction(&mut self) {
        if self.open_transaction.take() == Some(false) {
            self.primary.get_or_insert(Reason::Transaction);
        }
    }

    fn merge(&mut self, other: Lexical) {
        self.primary = self.primary.or(other.primary);
        self.session_state |= other.session_state;
        self.unsure |= other.unsure;
        self.unterminated |= other.unterminated;
        for name in other.functions {
            if !self.functions.contains(&name) {
                self.functions.push(name);
            }
        }
    }

    fn meaning(self) -> Meaning {
        Meaning {
            verdict: Verdict {
                target: if self.primary.is_some() {
                    Target::Primary
                } else {
                    Target::Replica
                },
                reason: self.primary,
                session_state: self.session_state,
                functions: self.functions,
            },
            effects: self.effects,
            command: self.command.unwrap_or(Command::Other),
        }
    }
}

/// Whether a comment before the first statement asks for the primary: pgrelay's own
/// `pgrelay:primary` or Pgpool-II's `NO LOAD BALANCE`, in any case.
fn is_hint(comment: &[u8]) -> bool {
    [&b"pgrelay:primary"[..], b"no load balance"]
        .iter()
        .any(|hint| {
            comment
                .windows(hint.len())
                .any(|w| w.eq_ignore_ascii_case(hint))
        })
}

/// The target sqlparser's syntax tree alone gives, for differential tests and fuzzing:
/// `None` when sqlparser cannot parse the text or the tree holds something this judge
/// does not walk. It is conservative: every function not in the built-in read-only list
/// counts as a write. The property [`Classifier::classify`] keeps: whenever this says
/// Primary, `classify` says Primary or leaves the decision to a `pg_proc` lookup of the
/// unknown functions it returns.
#[doc(hidden)]
pub fn oracle(sql: &str) -> Option<Target> {
    let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    let judgement = ast::judge(&statements, &lists::Lists::default());
    if judgement.primary.is_some() || !judgement.functions.is_empty() {
        Some(Target::Primary)
    } else if judgement.opaque {
        None
    } else {
        Some(Target::Replica)
    }
}

/// The differential property between [`Classifier::classify`] (built with the built-in
/// lists only) and the sqlparser oracle: whenever [`oracle`] says Primary, the verdict
/// is Primary or defers to a `pg_proc` lookup of unknown functions; and when the tree
/// shows a write even with every unknown function assumed safe, the verdict is Primary
/// outright.
#[doc(hidden)]
pub fn agrees_with_oracle(sql: &str, verdict: &Verdict) -> bool {
    if oracle(sql) == Some(Target::Primary)
        && verdict.target != Target::Primary
        && verdict.functions.is_empty()
    {
        return false;
    }
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, sql) else {
        return true;
    };
    let judgement = ast::judge(&statements, &lists::Lists::default());
    judgement.primary.is_none() || verdict.target == Target::Primary
}

fn is_word(token: &Option<Token<'_>>, keyword: &str) -> bool {
    matches!(token, Some(Token::Word(w)) if lexer::is(w, keyword))
}

/// The database a statement needs free of other sessions, if it is `DROP DATABASE`,
/// `ALTER DATABASE ... RENAME` or `CREATE DATABASE ... TEMPLATE`.
pub fn database_needing_exclusive_use(sql: &[u8]) -> Option<String> {
    // Runs on every Query: most start with a letter that rules these commands out.
    let first = sql.iter().find(|&&c| !lexer::is_space(c))?;
    if !matches!(first.to_ascii_lowercase(), b'd' | b'a' | b'c' | b'/' | b'-') {
        return None;
    }
    let mut lexer = Lexer::new(sql, false);
    let verb = lexer.next_token();
    let is_drop = is_word(&verb, "drop");
    if !(is_drop || is_word(&verb, "alter") || is_word(&verb, "create")) {
        return None;
    }
    if !is_word(&lexer.next_token(), "database") {
        return None;
    }
    if is_drop {
        let mut name = lexer.next_token();
        if is_word(&name, "if") {
            lexer.next_token();
            name = lexer.next_token();
        }
        return name.and_then(identifier);
    }
    if is_word(&verb, "alter") {
        let name = identifier(lexer.next_token()?)?;
        return is_word(&lexer.next_token(), "rename").then_some(name);
    }
    // CREATE DATABASE name [WITH] ... TEMPLATE [=] template ...
    loop {
        let token = lexer.next_token()?;
        if is_word(&Some(token), "template") {
            let mut name = lexer.next_token();
            if name == Some(Token::Punct(b'=')) {
                name = lexer.next_token();
            }
            return name.and_then(identifier);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exclusive_database_commands() {
        let cases: &[(&str, Option<&str>)] = &[
            ("DROP DATABASE foo", Some("foo")),
            ("drop database if exists \"Foo\" with (force)", Some("Foo")),
            (
                "/* hi */ -- x\n DROP /* a /* nested */ b */ DATABASE Bar;",
                Some("bar"),
            ),
            ("ALTER DATABASE foo RENAME TO bar", Some("foo")),
            ("ALTER DATABASE foo SET work_mem = '1MB'", None),
            ("CREATE DATABASE c TEMPLATE = tpl", Some("tpl")),
            (
                "create database c with owner x template tpl encoding 'UTF8'",
                Some("tpl"),
            ),
            ("CREATE DATABASE c", None),
            ("SELECT 'DROP DATABASE x'", None),
            ("DROP TABLE x", None),
            ("", None),
        ];
        for (sql, want) in cases {
            assert_eq!(
                database_needing_exclusive_use(sql.as_bytes()).as_deref(),
                *want,
                "{sql}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = database_needing_exclusive_use(&data);
        }
    }
}
