//! Criterion benchmarks of the statement classifier: the lexical pass on pgbench's
//! statements (the hot path), a multi-statement string, a long SELECT served from the
//! cache, and the sqlparser path for comparison; and the session-effects pass that
//! transaction mode runs on every Query and Parse text.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pgrelay::router::classify::session_effects;
use pgrelay::router::classify::{oracle, Classifier};

const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;";
const UPDATE: &str = "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;";
const INSERT: &str = "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
                      VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP);";
const THREE: &str = "BEGIN READ ONLY; SELECT abalance FROM pgbench_accounts WHERE aid = $1; END;";

/// A ~2 KB reporting query: long enough to be cached.
fn long_select() -> String {
    let mut sql = String::from("SELECT a.aid, a.bid, a.abalance");
    for i in 0..55 {
        sql.push_str(&format!(", coalesce(a.filler, 'x{i}') AS f{i}"));
    }
    sql.push_str(
        " FROM pgbench_accounts a JOIN pgbench_branches b ON a.bid = b.bid \
         WHERE a.aid BETWEEN $1 AND $2 ORDER BY a.aid LIMIT 100",
    );
    sql
}

fn bench(c: &mut Criterion) {
    let classifier = Classifier::new(&[], &[]);
    let long = long_select();
    assert!((1800..2400).contains(&long.len()), "{}", long.len());

    let mut group = c.benchmark_group("classify");
    for (name, sql) in [
        ("pgbench SELECT", SELECT),
        ("pgbench UPDATE", UPDATE),
        ("pgbench INSERT", INSERT),
        ("3 statements", THREE),
        ("2 KB SELECT (cached)", long.as_str()),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| classifier.classify(black_box(sql.as_bytes())))
        });
    }
    let prepared = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
    group.bench_function("Parse text (cached)", |b| {
        b.iter(|| classifier.classify_prepared(black_box(prepared.as_bytes())))
    });
    group.bench_function("sqlparser oracle on pgbench SELECT", |b| {
        b.iter(|| oracle(black_box(SELECT)))
    });
    group.finish();

    let mut group = c.benchmark_group("session effects");
    for (name, sql) in [
        ("pgbench SELECT", SELECT),
        ("pgbench UPDATE", UPDATE),
        ("pgbench INSERT", INSERT),
        ("SET statement_timeout", "SET statement_timeout = '5s'"),
        ("advisory lock", "SELECT pg_advisory_lock(42)"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| session_effects(black_box(sql.as_bytes())))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
