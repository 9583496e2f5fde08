//! What a statement string does to the session it runs in, for transaction pooling:
//! which settings it changes, what it may leave behind that cannot move to another
//! server (and so pins the client), and what may release such state.
//!
//! These are the recorders the one lexical pass ([`super::scan`]) calls as it reads a
//! statement's keywords and calls; the pass itself is [`super::session_effects`] when
//! only the effects are wanted, and [`super::Classifier::understand`] when routing
//! wants the route class too.

use super::lexer::{identifier, is, Lexer, Statement, Token};
use super::lists::FunctionKind;
use crate::protocol::backend::reported_parameter;

/// What one statement string does to its session.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Effects {
    /// Settings changed or reset for the session (`SET`, `RESET`, `SET SESSION
    /// CHARACTERISTICS`), lower-case names, except reported ones. Their values are
    /// read back from the server once the transaction is over.
    pub settings: Vec<Box<str>>,
    /// `RESET ALL` (or `DISCARD ALL`): every setting back to its session default.
    pub reset_all: bool,
    /// `DEALLOCATE ALL` (or `DISCARD ALL`): every prepared statement is gone.
    pub deallocate_all: bool,
    /// May leave state behind that cannot move to another server: `LISTEN`,
    /// `CREATE TEMP`, `DECLARE ... WITH HOLD`, SQL `PREPARE`, session advisory locks.
    /// Whether it did is asked of the server afterwards.
    pub may_pin: bool,
    /// May release such state: `UNLISTEN`, `DROP`, `CLOSE`, `DEALLOCATE`, `DISCARD`,
    /// advisory unlocks, and transaction ends (`ON COMMIT DROP` temp tables).
    pub may_release: bool,
    /// State the server cannot be asked about: the client stays on its server for good.
    pub pin: Option<&'static str>,
    /// May change what prepared statements return (`CREATE`, `ALTER`, `DROP` of
    /// anything but temporary objects, `DISCARD PLANS`/`ALL`): statements prepared
    /// before it are not shared with clients that prepare them after it.
    pub schema_change: bool,
}

impl Effects {
    pub fn is_empty(&self) -> bool {
        *self == Effects::default()
    }

    /// Adds another string's effects.
    pub fn merge(&mut self, other: Effects) {
        for name in other.settings {
            if !self.settings.contains(&name) {
                self.settings.push(name);
            }
        }
        self.reset_all |= other.reset_all;
        self.deallocate_all |= other.deallocate_all;
        self.may_pin |= other.may_pin;
        self.may_release |= other.may_release;
        self.pin = self.pin.or(other.pin);
        self.schema_change |= other.schema_change;
    }
}

/// If `sql` is exactly one `DEALLOCATE [PREPARE] name` (not ALL), the name as
/// PostgreSQL folds it.
pub fn deallocate_name(sql: &[u8]) -> Option<String> {
    let mut lexer = Lexer::new(sql, false);
    lexer.skip_space_and_comments(|_| {});
    let mut stmt = Statement::new(&mut lexer);
    if !matches!(stmt.next(), Some(Token::Word(w)) if is(w, "deallocate")) {
        return None;
    }
    let mut token = stmt.next()?;
    if matches!(token, Token::Word(w) if is(w, "prepare")) {
        token = stmt.next()?;
    }
    if matches!(token, Token::Word(w) if is(w, "all")) {
        return None;
    }
    let name = identifier(token)?;
    if stmt.next().is_some() {
        return None;
    }
    // Nothing but space and comments after the `;`.
    if !stmt.last && lexer.next_token().is_some() {
        return None;
    }
    Some(name)
}

fn word<'a>(token: Option<Token<'a>>) -> Option<&'a [u8]> {
    match token {
        Some(Token::Word(w)) => Some(w),
        _ => None,
    }
}

/// `DISCARD ...`: releases what it discards; `ALL` and `PLANS` may change what prepared
/// statements return.
pub(super) fn discard(stmt: &mut Statement<'_, '_>, effects: &mut Effects) {
    effects.may_release = true;
    let what = word(stmt.next());
    if what.is_some_and(|w| is(w, "all")) {
        effects.reset_all = true;
        effects.deallocate_all = true;
    }
    effects.schema_change |= what.is_some_and(|w| is(w, "all") || is(w, "plans"));
}

/// `DEALLOCATE [PREPARE] name | ALL`.
pub(super) fn deallocate(stmt: &mut Statement<'_, '_>, effects: &mut Effects) {
    effects.may_release = true;
    let mut next = word(stmt.next());
    if next.is_some_and(|w| is(w, "prepare")) {
        next = word(stmt.next());
    }
    if next.is_some_and(|w| is(w, "all")) {
        effects.deallocate_all = true;
    }
}

/// What a call of a function of `kind` does to the session.
pub(super) fn call(effects: &mut Effects, kind: FunctionKind) {
    match kind {
        FunctionKind::SessionLock => effects.may_pin = true,
        FunctionKind::Unlock => effects.may_release = true,
        FunctionKind::SessionState(name) => effects.pin = effects.pin.or(Some(name)),
        FunctionKind::Write | FunctionKind::Read | FunctionKind::Unknown => {}
    }
}

/// A session-level `SET`, from the token after `SET` (`LOCAL`, `TRANSACTION` and
/// `CONSTRAINTS` are not: they last until the transaction ends).
pub(super) fn set<'a>(
    stmt: &mut Statement<'_, 'a>,
    mut token: Option<Token<'a>>,
    effects: &mut Effects,
) {
    if word(token).is_some_and(|w| is(w, "session")) {
        token = stmt.next();
        match word(token) {
            Some(w) if is(w, "authorization") => {
                effects.pin = effects.pin.or(Some("SET SESSION AUTHORIZATION"));
                return;
            }
            Some(w) if is(w, "characteristics") => {
                for name in [
                    "default_transaction_isolation",
                    "default_transaction_deferrable",
                ] {
                    effects.settings.push(name.into());
                }
                return;
            }
            _ => {}
        }
    }
    let name = match word(token) {
        Some(w) if is(w, "time") => "timezone".to_owned(),
        Some(w) if is(w, "schema") => "search_path".to_owned(),
        Some(w) if is(w, "names") => "client_encoding".to_owned(),
        _ => match token.and_then(identifier) {
            Some(name) => dotted(stmt, name),
            None => return,
        },
    };
    setting(effects, name);
}

/// `RESET name | ALL`.
pub(super) fn reset(stmt: &mut Statement<'_, '_>, effects: &mut Effects) {
    let token = stmt.next();
    let name = match word(token) {
        Some(w) if is(w, "all") => {
            effects.reset_all = true;
            return;
        }
        Some(w) if is(w, "time") => "timezone".to_owned(),
        Some(w) if is(w, "session") => {
            // RESET SESSION AUTHORIZATION: a pin taken by SET stays.
            return;
        }
        _ => match token.and_then(identifier) {
            Some(name) => dotted(stmt, name),
            None => return,
        },
    };
    setting(effects, name);
}

/// A custom setting's name is `prefix.name`.
fn dotted(stmt: &mut Statement<'_, '_>, mut name: String) -> String {
    if stmt.next() == Some(Token::Punct(b'.')) {
        if let Some(rest) = stmt.next().and_then(identifier) {
            name.push('.');
            name.push_str(&rest);
        }
    }
    name
}

fn setting(effects: &mut Effects, name: String) {
    let name = name.to_ascii_lowercase();
    // Reported settings' changes are followed from ParameterStatus, not from SQL.
    if reported_parameter(&name).is_none() && !effects.settings.iter().any(|n| **n == *name) {
        effects.settings.push(name.into());
    }
}

#[cfg(test)]
mod tests {
    use super::super::session_effects;
    use super::*;

    fn settings(sql: &str) -> Vec<String> {
        session_effects(sql.as_bytes())
            .settings
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    #[test]
    fn ordinary_statements_have_none() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "UPDATE t SET x = 1",
            "insert into t values ('set x = 1; listen y')",
            "BEGIN",
            "SET LOCAL statement_timeout = 5",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "select pg_advisory_xact_lock(1)",
            "",
        ] {
            assert!(session_effects(sql.as_bytes()).is_empty(), "{sql}");
        }
    }

    #[test]
    fn session_settings_are_named() {
        assert_eq!(
            settings("SET statement_timeout = '5s'"),
            ["statement_timeout"]
        );
        assert_eq!(settings("set session Search_Path to a, b"), ["search_path"]);
        assert_eq!(settings("SET SCHEMA 'x'"), ["search_path"]);
        assert_eq!(settings("SET ROLE app"), ["role"]);
        assert_eq!(settings("SET myapp.tenant = 7"), ["myapp.tenant"]);
        assert_eq!(settings("RESET work_mem"), ["work_mem"]);
        assert_eq!(
            settings(
                "SET work_mem = '8MB'; SET TIME ZONE 'UTC'; SELECT 1; SET lock_timeout TO 100"
            ),
            ["work_mem", "lock_timeout"]
        );
        assert_eq!(
            settings("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
            [
                "default_transaction_isolation",
                "default_transaction_deferrable"
            ]
        );
        assert!(session_effects(b"RESET ALL").reset_all);
    }

    #[test]
    fn pins_and_releases() {
        for sql in [
            "LISTEN jobs",
            "CREATE TEMP TABLE t (x int)",
            "create global temporary table t (x int)",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "PREPARE p AS SELECT 1",
            "SELECT pg_advisory_lock(42)",
            "select 1; select PG_TRY_ADVISORY_LOCK(1, 2)",
        ] {
            let e = session_effects(sql.as_bytes());
            assert!(e.may_pin && e.pin.is_none(), "{sql}: {e:?}");
        }
        for sql in [
            "UNLISTEN *",
            "SELECT pg_advisory_unlock_all()",
            "DROP TABLE t",
            "CLOSE c",
            "DEALLOCATE p",
            "COMMIT",
        ] {
            let e = session_effects(sql.as_bytes());
            assert!(e.may_release && !e.may_pin, "{sql}: {e:?}");
        }
        let e = session_effects(b"SELECT set_config('a.b', 'c', false)");
        assert_eq!(e.pin, Some("set_config"));
        assert_eq!(session_effects(b"select setseed(0.5)").pin, Some("setseed"));
        assert_eq!(
            session_effects(b"SET SESSION AUTHORIZATION bob").pin,
            Some("SET SESSION AUTHORIZATION")
        );
        let e = session_effects(b"DISCARD ALL");
        assert!(e.reset_all && e.deallocate_all && e.may_release);
        assert!(session_effects(b"deallocate prepare all").deallocate_all);
        // In a string or a comment it is nothing.
        assert!(session_effects(b"SELECT 'pg_advisory_lock(1)' -- listen x").is_empty());
    }

    #[test]
    fn schema_changes_are_noted() {
        for sql in [
            "ALTER TABLE t ADD COLUMN b int",
            "drop table t",
            "CREATE TABLE t (a int)",
            "create or replace view v as select 1",
            "DISCARD PLANS",
            "discard all",
            "SELECT 1; ALTER TYPE c ADD ATTRIBUTE z int",
        ] {
            assert!(session_effects(sql.as_bytes()).schema_change, "{sql}");
        }
        for sql in [
            "CREATE TEMP TABLE x (a int)",
            "create temporary table x as select 1",
            "DISCARD TEMP",
            "SELECT 'alter table t'",
            "INSERT INTO t VALUES (1)",
        ] {
            assert!(!session_effects(sql.as_bytes()).schema_change, "{sql}");
        }
    }

    #[test]
    fn deallocate_of_one_name() {
        assert_eq!(deallocate_name(b"DEALLOCATE _pg3_0"), Some("_pg3_0".into()));
        assert_eq!(
            deallocate_name(b"deallocate prepare \"S_1\";"),
            Some("S_1".into())
        );
        assert_eq!(deallocate_name(b"DEALLOCATE Foo"), Some("foo".into()));
        assert_eq!(deallocate_name(b"DEALLOCATE ALL"), None);
        assert_eq!(deallocate_name(b"DEALLOCATE a; SELECT 1"), None);
        assert_eq!(deallocate_name(b"SELECT 1"), None);
    }
}
