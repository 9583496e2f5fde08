//! Load through pgrelay: many concurrent clients over a small transaction pool, every
//! answer checked; and pgbench in both pool modes and both query protocols.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use support::{
    simple_rows, simple_value, start, EnvOptions, TestEnv, APP_DB, APP_PASSWORD, APP_USER,
};

/// The tests here each want the machine's two cores; run in parallel, pgrelay's
/// unoptimized SCRAM logins to new servers can eat most of pgbench's 3 s window.
/// (tokio's Mutex works across the tests' separate runtimes.)
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CLIENTS: i32 = 200;
const ITERATIONS: i32 = 20;
const POOL_SIZE: usize = 10;

fn payload(client_id: i32, iteration: i32) -> String {
    format!("client {client_id} iteration {iteration} — ünïcode 'quoted'")
}

/// What the series query must return for row `g`: its own checks, computed locally.
fn series_row(g: i32, factor: i32) -> (i32, i32, String) {
    let letter = char::from(b'A' + (g % 26) as u8);
    (g, g * factor, letter.to_string().repeat((g % 17) as usize))
}

const SERIES: &str = "SELECT g, g * $1::int4, repeat(chr(65 + g % 26), g % 17) \
     FROM generate_series(1, $2::int4) g";

fn int(v: &i32) -> (&(dyn ToSql + Sync), Type) {
    (v, Type::INT4)
}

/// One client's iteration: insert a row (simple and extended protocol alternately),
/// read it back with both protocols, and check every row of a series.
async fn iteration(client: &Client, id: i32, it: i32) -> Result<(), String> {
    let text = payload(id, it);
    if it % 2 == 0 {
        let sql = format!(
            "INSERT INTO load_rows VALUES ({id}, {it}, '{}')",
            text.replace('\'', "''")
        );
        client
            .simple_query(&sql)
            .await
            .map_err(|e| format!("insert: {e}"))?;
    } else {
        client
            .query_typed(
                "INSERT INTO load_rows VALUES ($1, $2, $3)",
                &[int(&id), int(&it), (&text, Type::TEXT)],
            )
            .await
            .map_err(|e| format!("typed insert: {e}"))?;
    }
    let simple = simple_rows(
        client,
        &format!("SELECT payload FROM load_rows WHERE client_id = {id} AND iteration = {it}"),
    )
    .await
    .map_err(|e| format!("simple read: {e}"))?;
    if simple != [[Some(text.clone())]] {
        return Err(format!("simple read {id}/{it}: {simple:?}"));
    }
    let typed = client
        .query_typed(
            "SELECT payload FROM load_rows WHERE client_id = $1 AND iteration = $2",
            &[int(&id), int(&it)],
        )
        .await
        .map_err(|e| format!("typed read: {e}"))?;
    if typed.len() != 1 || typed[0].get::<_, &str>(0) != text {
        return Err(format!("typed read {id}/{it}: {typed:?}"));
    }
    let count = 10 + (id + it) % 50;
    let rows: Vec<(i32, i32, String)> = if it % 2 == 0 {
        let sql = SERIES
            .replace("$1::int4", &id.to_string())
            .replace("$2::int4", &count.to_string());
        simple_rows(client, &sql)
            .await
            .map_err(|e| format!("simple series: {e}"))?
            .into_iter()
            .map(|r| {
                let field = |i: usize| r[i].clone().unwrap_or_default();
                (
                    field(0).parse().unwrap_or(-1),
                    field(1).parse().unwrap_or(-1),
                    field(2),
                )
            })
            .collect()
    } else {
        client
            .query_typed(SERIES, &[int(&id), int(&count)])
            .await
            .map_err(|e| format!("typed series: {e}"))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let want: Vec<_> = (1..=count).map(|g| series_row(g, id)).collect();
    if rows != want {
        return Err(format!(
            "series {id}/{it}: {} rows, first {:?}",
            rows.len(),
            rows.first()
        ));
    }
    Ok(())
}

/// 200 clients, 10 servers, 20 iterations each of inserts, reads in both protocols
/// and checked multi-row results: no error, no wrong answer, no lost or doubled row,
/// and never more than 10 servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_transaction_mode() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // Trust for clients: 200 SCRAM logins would spend seconds of unoptimized key
    // stretching in the test process. pgrelay still logs in to PostgreSQL with SCRAM.
    let env = Arc::new(
        start(EnvOptions {
            client_auth: "trust",
            pool_size: POOL_SIZE as u32,
            ..EnvOptions::mode("transaction")
        })
        .await,
    );
    env.client()
        .await
        .batch_execute(
            "CREATE TABLE load_rows (client_id int4, iteration int4, payload text NOT NULL, \
             PRIMARY KEY (client_id, iteration))",
        )
        .await
        .expect("create table");

    let stop = Arc::new(AtomicBool::new(false));
    let max_total = Arc::new(AtomicUsize::new(0));
    let monitor = {
        let (env, stop, max_total) = (env.clone(), stop.clone(), max_total.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for pool in env.relay.shared.pools.all() {
                    max_total.fetch_max(pool.counts().1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let began = Instant::now();
    let clients = (0..CLIENTS).map(|id| {
        let env = env.clone();
        tokio::spawn(async move {
            let client = env
                .connect(APP_USER, APP_PASSWORD, APP_DB)
                .await
                .map_err(|e| format!("client {id} connect: {e}"))?;
            for it in 0..ITERATIONS {
                iteration(&client, id, it).await?;
            }
            Ok::<(), String>(())
        })
    });
    let errors: Vec<String> = join_all(clients)
        .await
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(format!("task: {e}")),
        })
        .collect();
    let elapsed = began.elapsed();
    stop.store(true, Ordering::Relaxed);
    monitor.await.expect("monitor");
    assert!(
        errors.is_empty(),
        "{} clients failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(max_total.load(Ordering::Relaxed) <= POOL_SIZE);

    let admin = env.direct_superuser().await;
    let summary = simple_rows(
        &admin,
        "SELECT count(*), count(DISTINCT client_id), count(DISTINCT iteration), \
         sum(client_id), sum(iteration) FROM load_rows",
    )
    .await
    .expect("summary");
    let n = i64::from(CLIENTS * ITERATIONS);
    let want = [
        n,
        i64::from(CLIENTS),
        i64::from(ITERATIONS),
        i64::from(ITERATIONS) * i64::from(CLIENTS * (CLIENTS - 1) / 2),
        i64::from(CLIENTS) * i64::from(ITERATIONS * (ITERATIONS - 1) / 2),
    ]
    .map(|v| Some(v.to_string()));
    assert_eq!(summary, [want.to_vec()]);
    let mut wrong = 0;
    for row in admin
        .query("SELECT client_id, iteration, payload FROM load_rows", &[])
        .await
        .expect("rows")
    {
        let (id, it): (i32, i32) = (row.get(0), row.get(1));
        wrong += usize::from(row.get::<_, &str>(2) != payload(id, it));
    }
    assert_eq!(wrong, 0, "rows with the wrong payload");
    assert!(elapsed < Duration::from_secs(45), "took {elapsed:?}");
}

// ---------------------------------------------------------------------------------
// pgbench
// ---------------------------------------------------------------------------------

/// Runs pgbench through pgrelay; returns stdout, panicking with its output if it fails.
fn pgbench(env: &TestEnv, args: &[&str]) -> String {
    let port = env.port().to_string();
    let out = Command::new("pgbench")
        .env("PGPASSWORD", APP_PASSWORD)
        .args(["-h", "127.0.0.1", "-p", &port, "-U", APP_USER])
        .args(args)
        .arg(APP_DB)
        .output()
        .expect("run pgbench");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "pgbench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// `pgbench -i -s 1`, then 16 clients for 3 s with the simple and the extended protocol:
/// pgbench succeeds and reports no failed transaction.
async fn pgbench_runs(mode: &'static str) {
    let _serial = ONE_AT_A_TIME.lock().await;
    // Session mode: each of the 16 clients holds a server for the whole run.
    let pool_size = if mode == "session" {
        20
    } else {
        POOL_SIZE as u32
    };
    let env = start(EnvOptions {
        pool_size,
        ..EnvOptions::mode(mode)
    })
    .await;
    tokio::task::block_in_place(|| pgbench(&env, &["-i", "-s", "1", "-q"]));
    let client = env.client().await;
    assert_eq!(
        simple_value(&client, "SELECT count(*) FROM pgbench_accounts").await,
        "100000"
    );
    let mut last_run = 0;
    for protocol in ["simple", "extended"] {
        let stdout = tokio::task::block_in_place(|| {
            pgbench(&env, &["-c", "16", "-j", "2", "-T", "3", "-M", protocol])
        });
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{protocol}:\n{stdout}"
        );
        let processed: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split('/').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{protocol}: no transaction count:\n{stdout}"));
        assert!(processed > 0, "{protocol}:\n{stdout}");
        last_run = processed;
    }
    // Every committed transaction of the last run logged exactly one history row
    // (pgbench truncates pgbench_history before each run).
    let history: u64 = simple_value(&client, "SELECT count(*) FROM pgbench_history")
        .await
        .parse()
        .expect("count");
    assert_eq!(history, last_run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_transaction_mode() {
    pgbench_runs("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_session_mode() {
    pgbench_runs("session").await;
}
