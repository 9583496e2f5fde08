//! The classifier's statement table, and the differential property against the
//! sqlparser oracle over statements generated from a small grammar.

use proptest::prelude::*;

use super::*;

const R: Target = Target::Replica;
const P: Target = Target::Primary;

fn classifier() -> Classifier {
    Classifier::new(
        &["audit_write".into(), "app.\"Bump\"".into()],
        &["my_pure_fn".into()],
    )
}

/// (statement, target, reason when it matters)
const TABLE: &[(&str, Target, Option<Reason>)] = &[
    // pgbench
    ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", R, None),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;", R, None),
    ("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2", P, Some(Reason::Write)),
    ("UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2", P, Some(Reason::Write)),
    ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)", P, Some(Reason::Write)),
    ("BEGIN", P, Some(Reason::Transaction)),
    ("BEGIN;", P, Some(Reason::Transaction)),
    ("END", R, None),
    ("END;", R, None),
    // neutral
    ("", R, None),
    ("   ", R, None),
    (";", R, None),
    (";;;", R, None),
    ("-- just a comment", R, None),
    ("/* a /* nested */ comment */", R, None),
    ("COMMIT", R, None),
    ("ROLLBACK", R, None),
    ("ABORT", R, None),
    ("SAVEPOINT s1", R, None),
    ("RELEASE SAVEPOINT s1", R, None),
    ("ROLLBACK TO SAVEPOINT s1", R, None),
    ("SET LOCAL work_mem = '64MB'", R, None),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", R, None),
    ("SET CONSTRAINTS ALL DEFERRED", R, None),
    // reads
    ("SELECT 1", R, None),
    ("select * from t where a = 'x' order by b limit 10 offset 5", R, None),
    ("VALUES (1, 2), (3, 4)", R, None),
    ("TABLE t", R, None),
    ("(SELECT 1) UNION (SELECT 2)", R, None),
    ("WITH x AS (SELECT 1) SELECT * FROM x", R, None),
    ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT sum(n) FROM t", R, None),
    ("WITH a AS (SELECT 1), b(x, y) AS MATERIALIZED (SELECT 1, 2) SELECT * FROM a, b", R, None),
    ("WITH a AS NOT MATERIALIZED (SELECT 1) SELECT * FROM a", R, None),
    ("SHOW search_path", R, None),
    ("SHOW ALL", R, None),
    ("EXPLAIN SELECT 1", R, None),
    ("EXPLAIN DELETE FROM t", R, None),
    ("EXPLAIN (COSTS off, FORMAT json) UPDATE t SET a = 1", R, None),
    ("EXPLAIN ANALYZE SELECT * FROM t", R, None),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t", R, None),
    ("SELECT 'DELETE FROM x'", R, None),
    ("SELECT 1 -- for update", R, None),
    ("SELECT 1 /* INSERT INTO t */", R, None),
    ("SELECT $$ DROP TABLE t; $$", R, None),
    ("SELECT $fn$ it's ; UPDATE t $fn$ AS body", R, None),
    ("SELECT E'it\\'s; DELETE FROM t'", R, None),
    ("SELECT 'it''s; DELETE FROM t'", R, None),
    ("SELECT \"delete\" FROM \"update\"", R, None),
    ("SELECT a::numeric(10,2), CAST(b AS varchar(20)) FROM t", R, None),
    ("SELECT x FROM (VALUES (1), (2)) v(x)", R, None),
    ("SELECT * FROM generate_series(1, 3) AS g(i)", R, None),
    ("SELECT * FROM unnest(ARRAY[1,2]) WITH ORDINALITY AS u(x, n)", R, None),
    ("SELECT count(*) FILTER (WHERE a > 1) OVER (PARTITION BY b) FROM t", R, None),
    ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM t", R, None),
    ("SELECT coalesce(a, 0), nullif(b, 1), greatest(1, 2), least(1, 2) FROM t", R, None),
    ("SELECT extract(year FROM now()), substring('abc' FROM 1 FOR 2), position('b' IN 'abc')", R, None),
    ("SELECT trim(both 'x' FROM 'xax'), overlay('abc' PLACING 'z' FROM 2 FOR 1)", R, None),
    ("SELECT * FROM t WHERE a IN (1, 2) AND EXISTS (SELECT 1 FROM u) AND b = ANY(ARRAY[1])", R, None),
    ("SELECT lower(name), upper(name), length(name), round(x, 2), date_trunc('day', ts) FROM t", R, None),
    ("SELECT jsonb_build_object('a', 1), json_agg(t), string_agg(s, ','), array_agg(x) FROM t", R, None),
    ("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), current_setting('x'), version()", R, None),
    ("SELECT pg_catalog.lower('A')", R, None),
    ("SELECT my_pure_fn(1)", R, None),
    ("SELECT My_Pure_Fn(1)", R, None),
    ("SELECT random(), now(), clock_timestamp(), CURRENT_TIMESTAMP, current_user", R, None),
    ("SELECT ROW(1, 2) = ROW(1, 2)", R, None),
    ("SELECT x FROM t ORDER BY x FETCH FIRST 3 ROWS WITH TIES", R, None),
    ("SELECT * FROM t WHERE ts AT TIME ZONE 'UTC' > now()", R, None),
    ("SELECT * FROM a JOIN b USING (id) LEFT JOIN c ON (a.x = c.x)", R, None),
    ("SELECT * FROM t TABLESAMPLE BERNOULLI (10) REPEATABLE (1)", R, None),
    ("COPY t TO STDOUT", R, None),
    ("COPY t (a, b) TO STDOUT WITH (FORMAT csv)", R, None),
    ("COPY (SELECT * FROM t) TO STDOUT", R, None),
    ("SELECT 1; SELECT 2; SELECT 3", R, None),
    ("BEGIN READ ONLY", R, None),
    ("BEGIN TRANSACTION READ ONLY", R, None),
    ("START TRANSACTION READ ONLY", R, None),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE", R, None),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", R, None),
    ("BEGIN; SET TRANSACTION READ ONLY; SELECT 1; COMMIT", R, None),
    ("BEGIN READ ONLY; SELECT 1; SELECT 2; END", R, None),
    ("START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ ONLY", R, None),
    // transactions that may write
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", P, Some(Reason::Transaction)),
    ("BEGIN ISOLATION LEVEL READ COMMITTED", P, Some(Reason::Transaction)),
    ("BEGIN READ WRITE", P, Some(Reason::Transaction)),
    ("BEGIN READ ONLY, READ WRITE", P, Some(Reason::Transaction)),
    ("START TRANSACTION", P, Some(Reason::Transaction)),
    ("BEGIN WORK", P, Some(Reason::Transaction)),
    ("BEGIN READ ONLY; SET TRANSACTION READ WRITE; SELECT 1", P, Some(Reason::Transaction)),
    ("BEGIN; SELECT 1; COMMIT", P, Some(Reason::Transaction)),
    // writes
    ("INSERT INTO t VALUES (1)", P, Some(Reason::Write)),
    ("insert into t select * from u", P, Some(Reason::Write)),
    ("DELETE FROM t WHERE a = 1", P, Some(Reason::Write)),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN DELETE", P, Some(Reason::Write)),
    ("COPY t FROM STDIN", P, Some(Reason::Write)),
    ("COPY t TO '/tmp/file'", P, Some(Reason::Write)),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", P, Some(Reason::Write)),
    ("CREATE TABLE t (a int)", P, Some(Reason::Write)),
    ("CREATE INDEX ON t (a)", P, Some(Reason::Write)),
    ("ALTER TABLE t ADD COLUMN b int", P, Some(Reason::Write)),
    ("DROP TABLE t", P, Some(Reason::Write)),
    ("TRUNCATE t", P, Some(Reason::Write)),
    ("GRANT SELECT ON t TO bob", P, Some(Reason::Write)),
    ("REVOKE SELECT ON t FROM bob", P, Some(Reason::Write)),
    ("VACUUM t", P, Some(Reason::Write)),
    ("ANALYZE t", P, Some(Reason::Write)),
    ("CLUSTER t", P, Some(Reason::Write)),
    ("REINDEX TABLE t", P, Some(Reason::Write)),
    ("REFRESH MATERIALIZED VIEW v", P, Some(Reason::Write)),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", P, Some(Reason::Write)),
    ("NOTIFY chan, 'x'", P, Some(Reason::Write)),
    ("CALL proc(1)", P, Some(Reason::Write)),
    ("DO $$BEGIN PERFORM 1; END$$", P, Some(Reason::Write)),
    ("DO LANGUAGE plpgsql $body$ BEGIN RAISE NOTICE 'x'; END $body$", P, Some(Reason::Write)),
    ("PREPARE TRANSACTION 'tx1'", P, Some(Reason::Write)),
    ("COMMIT PREPARED 'tx1'", P, Some(Reason::Write)),
    ("ROLLBACK PREPARED 'tx1'", P, Some(Reason::Write)),
    ("CHECKPOINT", P, Some(Reason::Write)),
    ("DECLARE c CURSOR FOR SELECT 1", P, Some(Reason::Write)),
    ("FETCH 10 FROM c", P, Some(Reason::Write)),
    ("MOVE NEXT IN c", P, Some(Reason::Write)),
    ("CLOSE c", P, Some(Reason::Write)),
    ("EXECUTE stmt(1)", P, Some(Reason::Write)),
    ("FROBNICATE the database", P, Some(Reason::Write)),
    ("EXPLAIN ANALYZE DELETE FROM t", P, Some(Reason::Write)),
    ("EXPLAIN (ANALYZE true, VERBOSE) INSERT INTO t VALUES (1)", P, Some(Reason::Write)),
    ("EXPLAIN ANALYZE VERBOSE UPDATE t SET a = 1", P, Some(Reason::Write)),
    // row locks at any depth
    ("SELECT * FROM t FOR UPDATE", P, Some(Reason::Write)),
    ("SELECT * FROM t FOR NO KEY UPDATE", P, Some(Reason::Write)),
    ("SELECT * FROM t FOR SHARE", P, Some(Reason::Write)),
    ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", P, Some(Reason::Write)),
    ("SELECT * FROM t FOR UPDATE OF t NOWAIT", P, Some(Reason::Write)),
    ("select * from t for no key update", P, Some(Reason::Write)),
    ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", P, Some(Reason::Write)),
    ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR NO KEY UPDATE)", P, Some(Reason::Write)),
    ("WITH l AS (SELECT * FROM t FOR SHARE) SELECT * FROM l", P, Some(Reason::Write)),
    // SELECT INTO and writable CTEs
    ("SELECT * INTO new_t FROM t", P, Some(Reason::Write)),
    ("SELECT a, b INTO TEMP new_t FROM t", P, Some(Reason::Write)),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", P, Some(Reason::Write)),
    ("WITH u AS MATERIALIZED (UPDATE t SET a = 1 RETURNING *) SELECT * FROM u", P, Some(Reason::Write)),
    ("WITH i AS NOT MATERIALIZED (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i", P, Some(Reason::Write)),
    ("WITH a AS (SELECT 1), m AS (MERGE INTO t USING u ON true WHEN MATCHED THEN DELETE RETURNING *) SELECT 1", P, Some(Reason::Write)),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", P, Some(Reason::Write)),
    ("WITH x AS (SELECT 1) DELETE FROM t", P, Some(Reason::Write)),
    // functions
    ("SELECT nextval('s')", P, Some(Reason::Function)),
    ("SELECT pg_catalog.nextval('s')", P, Some(Reason::Function)),
    ("SELECT \"nextval\"('s')", P, Some(Reason::Function)),
    ("SELECT setval('s', 1), currval('s'), lastval()", P, Some(Reason::Function)),
    ("SELECT pg_advisory_xact_lock(1)", P, Some(Reason::Function)),
    ("SELECT pg_try_advisory_xact_lock(1)", P, Some(Reason::Function)),
    ("SELECT lo_import('/tmp/x')", P, Some(Reason::Function)),
    ("SELECT lo_unlink(123)", P, Some(Reason::Function)),
    ("SELECT txid_current()", P, Some(Reason::Function)),
    ("SELECT pg_current_xact_id()", P, Some(Reason::Function)),
    ("SELECT pg_notify('c', 'x')", P, Some(Reason::Function)),
    ("SELECT pg_terminate_backend(123)", P, Some(Reason::Function)),
    ("SELECT pg_switch_wal()", P, Some(Reason::Function)),
    ("SELECT pg_reload_conf()", P, Some(Reason::Function)),
    ("SELECT pg_logical_emit_message(true, 'p', 'x')", P, Some(Reason::Function)),
    ("SELECT dblink_exec('conn', 'DELETE FROM t')", P, Some(Reason::Function)),
    ("SELECT a FROM t WHERE b = nextval ( 's' )", P, Some(Reason::Function)),
    // a vertical tab is white space to PostgreSQL's lexer (found by the classify fuzz target)
    ("SELECT\x0bnextval\x0b('s')", P, Some(Reason::Function)),
    ("\x0bDELETE FROM t", P, Some(Reason::Write)),
    ("SELECT * FROM t WHERE id IN (SELECT lo_create(0))", P, Some(Reason::Function)),
    ("SELECT audit_write(1)", P, Some(Reason::Function)),
    ("SELECT app.\"Bump\"(1)", P, Some(Reason::Function)),
    ("SELECT count(*) FROM t; SELECT nextval('s')", P, Some(Reason::Function)),
    // session state
    ("SET search_path = app", P, Some(Reason::SessionState)),
    ("SET SESSION statement_timeout = 0", P, Some(Reason::SessionState)),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", P, Some(Reason::SessionState)),
    ("SET ROLE admin", P, Some(Reason::SessionState)),
    ("RESET ALL", P, Some(Reason::SessionState)),
    ("DISCARD ALL", P, Some(Reason::SessionState)),
    ("DEALLOCATE ALL", P, Some(Reason::SessionState)),
    ("UNLISTEN *", P, Some(Reason::SessionState)),
    ("PREPARE q (int) AS SELECT $1", P, Some(Reason::SessionState)),
    ("LISTEN chan", P, Some(Reason::SessionState)),
    ("LOAD 'auto_explain'", P, Some(Reason::SessionState)),
    ("CREATE TEMP TABLE x (a int)", P, Some(Reason::SessionState)),
    ("CREATE TEMPORARY VIEW v AS SELECT 1", P, Some(Reason::SessionState)),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", P, Some(Reason::SessionState)),
    ("CREATE LOCAL TEMPORARY SEQUENCE s", P, Some(Reason::SessionState)),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", P, Some(Reason::SessionState)),
    ("SELECT pg_advisory_lock(1)", P, Some(Reason::SessionState)),
    ("SELECT pg_try_advisory_lock_shared(1)", P, Some(Reason::SessionState)),
    ("SELECT set_config('a.b', 'c', false)", P, Some(Reason::SessionState)),
    // hints
    ("/* pgrelay:primary */ SELECT 1", P, Some(Reason::Hint)),
    ("/*NO LOAD BALANCE*/ SELECT 1", P, Some(Reason::Hint)),
    ("-- no load balance\nSELECT 1", P, Some(Reason::Hint)),
    ("/* app=x */ /* PgRelay:Primary */ SELECT 1", P, Some(Reason::Hint)),
    ("SELECT 1 /* pgrelay:primary */", R, None),
    // multi-statement strings
    ("SELECT 1; INSERT INTO t VALUES (1)", P, Some(Reason::Write)),
    ("SELECT 1; SET x = 1", P, Some(Reason::SessionState)),
    ("BEGIN READ ONLY; SELECT 1; COMMIT; BEGIN; SELECT 2", P, Some(Reason::Transaction)),
    ("SELECT 1;;  ; SELECT 2;", R, None),
    // needs sqlparser: DML keywords where only a parser can place them
    ("WITH x AS (SELECT 1) SELECT update FROM x", R, None),
    ("SELECT t.delete FROM t", R, None),
    // unterminated or unparsable
    ("SELECT 'oops", P, Some(Reason::Unsure)),
    ("SELECT 1 /* unterminated", P, Some(Reason::Unsure)),
    ("WITH x AS (SELECT 1) SELECT * FROM x WHERE (DELETE", P, Some(Reason::Unsure)),
    // backslashes: lexed both ways because standard_conforming_strings is unknown
    ("SELECT 'a\\'; DELETE FROM t; --'", P, Some(Reason::Write)),
    ("SELECT 'x\\''; DELETE FROM t; --'", P, Some(Reason::Write)),
    ("SELECT 'C:\\dir' AS path", R, None),
];

#[test]
fn statement_table() {
    assert!(TABLE.len() >= 130, "{}", TABLE.len());
    let classifier = classifier();
    let mut wrong = Vec::new();
    for &(sql, target, reason) in TABLE {
        let verdict = classifier.classify(sql.as_bytes());
        if verdict.target != target
            || (verdict.reason != reason && (reason.is_some() || target == R))
        {
            wrong.push(format!("{sql}: {verdict:?}"));
            continue;
        }
        assert_eq!(
            verdict.session_state,
            reason == Some(Reason::SessionState)
                && !["RESET", "DISCARD", "DEALLOCATE", "UNLISTEN"]
                    .iter()
                    .any(|kw| sql.starts_with(kw)),
            "{sql}: {verdict:?}"
        );
        // The differential property holds on the table too (for the built-in lists,
        // which are all the oracle knows).
        let plain = Classifier::new(&[], &[]).classify(sql.as_bytes());
        assert!(agrees_with_oracle(sql, &plain), "{sql}: {plain:?}");
    }
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn postgres_syntax_sqlparser_cannot_parse() {
    for sql in [
        "SELECT * FROM t FOR NO KEY UPDATE",
        "DO $$BEGIN PERFORM 1; END$$",
        "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
    ] {
        assert_eq!(oracle(sql), None, "sqlparser parses {sql}");
        let (_, parsed) = classifier().understand_uncached(sql.as_bytes());
        assert!(!parsed, "{sql} needed sqlparser");
    }
}

#[test]
fn pgbench_needs_neither_sqlparser_nor_allocation() {
    let classifier = classifier();
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);",
        "BEGIN;",
        "END;",
    ] {
        let (meaning, parsed) = classifier.understand_uncached(sql.as_bytes());
        assert!(!parsed, "{sql}");
        assert_eq!(meaning.verdict.functions.capacity(), 0, "{sql}");
        assert_eq!(meaning.effects.settings.capacity(), 0, "{sql}");
    }
}

#[test]
fn unknown_functions_are_reported_once() {
    let verdict = classifier()
        .classify(b"SELECT my_fn(a), s.My_Fn(b), \"Other\"(c), count(*) FROM t WHERE other(d)");
    assert_eq!(verdict.target, R);
    let names: Vec<&str> = verdict.functions.iter().map(|f| &**f).collect();
    assert_eq!(names, ["my_fn", "Other", "other"]);
    let verdict = classifier().classify(b"SELECT count(*) FROM t");
    assert!(verdict.functions.is_empty());
    // A function in a text that is a write anyway is still reported.
    let verdict = classifier().classify(b"SELECT f(1) FOR UPDATE");
    assert_eq!(verdict.functions.len(), 1);
}

#[test]
fn cache_stays_bounded() {
    let classifier = classifier();
    let filler = "x".repeat(CACHE_MIN_LEN);
    for i in 0..CACHE_MAX_ENTRIES + 10 {
        let sql = format!("SELECT '{filler}', {i}");
        assert_eq!(classifier.classify(sql.as_bytes()).target, R);
    }
    let len = classifier.cache.len();
    assert!(len <= CACHE_MAX_ENTRIES, "{len}");
    // Short texts that needed no parser are not cached.
    let classifier = Classifier::new(&[], &[]);
    classifier.classify(b"SELECT 1");
    assert_eq!(classifier.cache.len(), 0);
    classifier.classify(b"SELECT t.delete FROM t");
    assert_eq!(classifier.cache.len(), 1);
    // Parse texts are cached whatever their length, and answered from the cache.
    let parse = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    assert_eq!(classifier.classify_prepared(parse).target, R);
    assert_eq!(classifier.cache.len(), 2);
    assert_eq!(
        classifier.classify_prepared(parse),
        classifier.classify(parse)
    );
}

#[test]
fn classifier_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Classifier>();
}

/// Fragments from which the differential test builds statements.
fn statement_strategy() -> impl Strategy<Value = String> {
    let column = prop::sample::select(vec![
        "a",
        "t.b",
        "count(*)",
        "nextval('s')",
        "my_fn(a)",
        "lower(c)",
        "coalesce(a, 1)",
        "'DELETE FROM x'",
        "$1",
        "a::numeric(10,2)",
        "(SELECT max(a) FROM u)",
        "pg_advisory_lock(1)",
        "CASE WHEN a > 1 THEN 'x' ELSE 'y' END",
        "now()",
    ]);
    let from = prop::sample::select(vec![
        "",
        " FROM t",
        " FROM t JOIN u ON t.a = u.a",
        " FROM (SELECT * FROM t FOR UPDATE) s",
        " FROM generate_series(1, 3) g",
        " FROM (VALUES (1)) v(a)",
    ]);
    let filter = prop::sample::select(vec![
        "",
        " WHERE a = 1",
        " WHERE a IN (SELECT a FROM u)",
        " WHERE b = setval('s', 1)",
        " WHERE c LIKE '%update%'",
        " WHERE EXISTS (SELECT 1 FROM u FOR SHARE)",
    ]);
    let tail = prop::sample::select(vec![
        "",
        " ORDER BY a",
        " LIMIT 1",
        " FOR UPDATE",
        " FOR SHARE",
        " FOR NO KEY UPDATE",
        " FOR KEY SHARE",
        " -- for update",
        " /* INSERT */",
    ]);
    let cte = prop::sample::select(vec![
        "",
        "WITH x AS (SELECT 1) ",
        "WITH x AS (DELETE FROM t RETURNING *) ",
        "WITH x AS MATERIALIZED (UPDATE t SET a = 1 RETURNING a) ",
        "WITH RECURSIVE r(n) AS (SELECT 1) ",
        "/* pgrelay:primary */ ",
    ]);
    let prefix = prop::sample::select(vec!["", "EXPLAIN ", "EXPLAIN ANALYZE ", "BEGIN; "]);
    (
        prefix,
        cte,
        prop::collection::vec(column, 1..4),
        from,
        filter,
        tail,
    )
        .prop_map(|(prefix, cte, columns, from, filter, tail)| {
            format!(
                "{prefix}{cte}SELECT {}{from}{filter}{tail}",
                columns.join(", ")
            )
        })
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = classifier().classify(&data);
    }

    #[test]
    fn never_less_conservative_than_the_oracle(sql in statement_strategy()) {
        let verdict = Classifier::new(&[], &[]).classify(sql.as_bytes());
        prop_assert!(agrees_with_oracle(&sql, &verdict), "{}: {:?}", sql, verdict);
    }
}

#[test]
fn deep_nesting_reaching_sqlparser_is_refused_not_overflowed() {
    let sql = format!(
        "SELECT t.delete FROM {}t{}",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    let verdict = classifier().classify(sql.as_bytes());
    assert_eq!(verdict.target, P);
    assert_eq!(oracle(&sql), None);
}

/// One pass yields the route class and the session effects, and reading a text for the
/// effects alone finds the same effects as reading it for routing.
#[test]
fn one_pass_yields_route_and_effects() {
    let classifier = classifier();
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "SET statement_timeout = '5s'",
        "set session Search_Path to a, b",
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "RESET ALL",
        "LISTEN jobs",
        "CREATE TEMP TABLE t (x int)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "PREPARE p AS SELECT 1",
        "SELECT pg_advisory_lock(42)",
        "select 1; select PG_TRY_ADVISORY_LOCK(1, 2)",
        "UNLISTEN *",
        "SELECT pg_advisory_unlock_all()",
        "DROP TABLE t",
        "DISCARD ALL",
        "deallocate prepare all",
        "SELECT set_config('a.b', 'c', false)",
        "SET SESSION AUTHORIZATION bob",
        "LOAD 'auto_explain'",
        "ALTER TABLE t ADD COLUMN b int",
        "SELECT 1; ALTER TYPE c ADD ATTRIBUTE z int",
        "INSERT INTO t SELECT pg_advisory_lock(1)",
        "EXPLAIN ANALYZE SELECT pg_advisory_lock(1)",
        "SELECT 'pg_advisory_lock(1)' -- listen x",
        "BEGIN; SET LOCAL work_mem = '1MB'; COMMIT",
    ] {
        let meaning = classifier.understand(sql.as_bytes());
        assert_eq!(meaning.effects, session_effects(sql.as_bytes()), "{sql}");
    }
    let meaning = classifier.understand(b"SET statement_timeout = 5; SELECT pg_advisory_lock(1)");
    assert_eq!(meaning.verdict.target, Target::Primary);
    assert_eq!(meaning.verdict.reason, Some(Reason::SessionState));
    assert!(meaning.verdict.session_state);
    assert!(meaning.effects.may_pin);
    assert_eq!(&*meaning.effects.settings, [Box::from("statement_timeout")]);
    assert_eq!(meaning.command, Command::Other);
    let meaning = classifier.understand(b"SELECT * FROM t WHERE a = 1");
    assert_eq!(meaning.verdict.target, Target::Replica);
    assert!(meaning.effects.is_empty());
    assert_eq!(meaning.command, Command::Select);
}
