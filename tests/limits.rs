//! How many server connections each user and database may take, against real
//! PostgreSQL: `max_user_connections` and `max_db_connections` shared by several pools
//! (clients over the limit wait, and proceed as servers of the user or database close
//! or go idle elsewhere), the wait's `query_wait_timeout`, a per-user `pool_size`,
//! RELOAD, pgbench through a limited user; and `max_user_client_connections` /
//! `max_db_client_connections` (53300 for a login over them).

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio_postgres::Client;

use support::{
    config_text, connect_str, simple_value, sqlstate, start, EnvOptions, TestEnv, APP_DB,
    APP_PASSWORD, APP_USER,
};

const OTHER_DB: &str = "app2";
const BOB: &str = "bob";
const BOB_PASSWORD: &str = "bob-secret";

/// Pool size 5 and the `[pool]` lines `pool_extra`, with a second user, `bob`.
fn options(pool_extra: &[&str]) -> EnvOptions {
    EnvOptions {
        pool_size: 5,
        pool_extra: pool_extra.iter().map(|l| l.to_string()).collect(),
        server_users: vec![
            (APP_USER.into(), APP_PASSWORD.into()),
            (BOB.into(), BOB_PASSWORD.into()),
        ],
        relay_users: vec![
            (APP_USER.into(), APP_PASSWORD.into()),
            (BOB.into(), BOB_PASSWORD.into()),
        ],
        ..EnvOptions::default()
    }
}

/// Starts the servers and pgrelay, and creates the second database, `app2`.
async fn start_with_two_databases(options: EnvOptions) -> TestEnv {
    let env = start(options).await;
    let admin = env.direct_superuser().await;
    admin
        .batch_execute(&format!("CREATE DATABASE {OTHER_DB} OWNER {APP_USER}"))
        .await
        .expect("create the second database");
    env
}

async fn connect(env: &TestEnv, user: &str, db: &str) -> Client {
    let password = if user == BOB {
        BOB_PASSWORD
    } else {
        APP_PASSWORD
    };
    env.connect(user, password, db)
        .await
        .expect("connect through pgrelay")
}

/// Backends PostgreSQL has for clients, matching `filter` (a WHERE condition).
async fn backends(admin: &Client, filter: &str) -> i64 {
    admin
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND {filter}"
            ),
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Runs a transaction holding its server for 1 s on each client at once, while
/// sampling the backends that match `filter`; returns the most seen at once.
async fn hold_all_at_once(env: &TestEnv, clients: &[Client], filter: &str) -> i64 {
    let admin = env.direct_superuser().await;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, filter) = (done.clone(), filter.to_owned());
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                let seen = backends(&admin, &filter).await;
                most = most.max(seen);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            most
        })
    };
    let results = join_all(
        clients
            .iter()
            .map(|c| c.batch_execute("BEGIN; SELECT pg_sleep(1); COMMIT")),
    )
    .await;
    done.store(true, Ordering::Relaxed);
    for (i, result) in results.into_iter().enumerate() {
        result.unwrap_or_else(|err| panic!("client {i}: {err}"));
    }
    sampler.await.expect("sampler")
}

/// `max_user_connections = 2`, two databases each with pool size 5: six clients in
/// transactions at once never have more than 2 servers of that user, and all finish
/// (those of the second database once servers of the first go idle and close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_user_connections_spans_the_users_pools() {
    let mut options = options(&["max_user_connections = 2"]);
    // bob's own entry lifts the limit for him.
    options.relay_users = vec![(APP_USER.into(), APP_PASSWORD.into())];
    options.sections.push(format!(
        "[[users]]\nname = \"{BOB}\"\npassword = \"{BOB_PASSWORD}\"\nmax_user_connections = 0"
    ));
    let env = start_with_two_databases(options).await;
    let mut clients = Vec::new();
    for db in [APP_DB, OTHER_DB, APP_DB, OTHER_DB, APP_DB, OTHER_DB] {
        clients.push(connect(&env, APP_USER, db).await);
    }
    let most = hold_all_at_once(&env, &clients, "usename = 'app'").await;
    assert!(most <= 2, "{most} servers of app at once");
    assert!(most >= 1);
    let limits = env.relay.shared.pools.limits();
    assert!(limits.user_open(APP_USER, 0) <= 2);
    // bob's override (0: no limit) lets his three clients have three servers.
    let bobs: Vec<Client> = join_all((0..3).map(|_| connect(&env, BOB, APP_DB))).await;
    let most = hold_all_at_once(&env, &bobs, "usename = 'bob'").await;
    assert_eq!(most, 3, "bob is not limited");
}

/// A client waiting for room under `max_user_connections` longer than
/// `query_wait_timeout` gets the pool-timeout error; one idle server of the user in
/// another pool is closed to make room for a waiting pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_for_the_users_limit_times_out() {
    let env = start_with_two_databases(options(&[
        "max_user_connections = 1",
        "query_wait_timeout = \"1s\"",
    ]))
    .await;
    let other = connect(&env, APP_USER, OTHER_DB).await;
    assert_eq!(simple_value(&other, "SELECT 1").await, "1");
    // The only server app may have is idle in app2's pool: it closes for app's pool.
    let holder = connect(&env, APP_USER, APP_DB).await;
    holder.batch_execute("BEGIN").await.expect("begin");
    let started = std::time::Instant::now();
    let err = other
        .batch_execute("SELECT 1")
        .await
        .expect_err("no server for app within query_wait_timeout");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}: {err}",
        started.elapsed()
    );
    assert_eq!(sqlstate(&err).as_deref(), Some("53400"), "{err}");
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("query_wait_timeout")),
        "unexpected error: {err}"
    );
    // Once the holder is done, the other database's client is served again.
    holder.batch_execute("COMMIT").await.expect("commit");
    let again = connect(&env, APP_USER, OTHER_DB).await;
    assert_eq!(simple_value(&again, "SELECT 2").await, "2");
}

/// `[[databases]] max_db_connections = 2`: two users with three clients each in the
/// same database never have more than 2 servers there, and all finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_connections_spans_the_databases_pools() {
    let mut options = options(&[]);
    options
        .sections
        .push("[[databases]]\nname = \"app\"\nmax_db_connections = 2".to_owned());
    let env = start(options).await;
    let mut clients = Vec::new();
    for user in [APP_USER, BOB, APP_USER, BOB, APP_USER, BOB] {
        clients.push(connect(&env, user, APP_DB).await);
    }
    let most = hold_all_at_once(&env, &clients, "datname = 'app' AND usename <> 'postgres'").await;
    assert!(most <= 2, "{most} servers of database app at once");
    assert!(env.relay.shared.pools.limits().db_open(APP_DB, 0) <= 2);
}

/// `[[users]] pool_size = 1` overrides `default_pool_size` (5) for that user only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_pool_size_overrides_the_default() {
    let mut options = options(&[]);
    options.relay_users = vec![(APP_USER.into(), APP_PASSWORD.into())];
    options.sections.push(format!(
        "[[users]]\nname = \"{BOB}\"\npassword = \"{BOB_PASSWORD}\"\npool_size = 1"
    ));
    let env = start(options).await;
    let bobs: Vec<Client> = join_all((0..3).map(|_| connect(&env, BOB, APP_DB))).await;
    let most = hold_all_at_once(&env, &bobs, "usename = 'bob'").await;
    assert_eq!(most, 1, "bob's pool holds one server");
    let apps: Vec<Client> = join_all((0..3).map(|_| connect(&env, APP_USER, APP_DB))).await;
    let most = hold_all_at_once(&env, &apps, "usename = 'app'").await;
    assert_eq!(most, 3, "app keeps default_pool_size");
}

/// RELOAD lowers `max_user_connections` for servers opened afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_the_limit() {
    let options = options(&[]);
    let env = start(options.clone()).await;
    let clients: Vec<Client> = join_all((0..3).map(|_| connect(&env, APP_USER, APP_DB))).await;
    assert_eq!(hold_all_at_once(&env, &clients, "usename = 'app'").await, 3);
    // Lower the limit; close the servers that are open so the new limit governs.
    let mut lowered = options.clone();
    lowered
        .pool_extra
        .push("max_user_connections = 1".to_owned());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pgrelay.toml");
    std::fs::write(&path, config_text(&lowered, &env.cluster.ports())).expect("write");
    env.relay.reload(&path).expect("reload");
    env.pool_for(APP_DB).expect("app's pool").close_idle();
    assert_eq!(hold_all_at_once(&env, &clients, "usename = 'app'").await, 1);
}

/// pgbench, 4 clients for 3 s, through a user with `max_user_connections = 2`: no
/// transaction fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_under_a_user_limit() {
    let env = start(options(&["max_user_connections = 2"])).await;
    let run = |args: &[&str]| {
        let out = Command::new("pgbench")
            .env("PGPASSWORD", APP_PASSWORD)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &env.port().to_string(),
                "-U",
                APP_USER,
            ])
            .args(args)
            .arg(APP_DB)
            .output()
            .expect("run pgbench");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "pgbench {args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    tokio::task::block_in_place(|| run(&["-i", "-s", "1", "-q"]));
    let stdout = tokio::task::block_in_place(|| run(&["-c", "4", "-j", "2", "-T", "3"]));
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    assert!(env.relay.shared.pools.limits().user_open(APP_USER, 0) <= 2);
    let client = connect_str(&env.conn_string(APP_USER, APP_PASSWORD, APP_DB))
        .await
        .expect("connect");
    assert_eq!(simple_value(&client, "SELECT 1").await, "1");
}

/// The refusal a login over a client limit gets: 53300 and its message.
async fn assert_refused(env: &TestEnv, user: &str, db: &str, message: &str) {
    let password = if user == BOB {
        BOB_PASSWORD
    } else {
        APP_PASSWORD
    };
    let err = env
        .connect(user, password, db)
        .await
        .expect_err("over the client limit");
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err:?}");
    let got = err.as_db_error().map(|e| e.message().to_owned());
    assert_eq!(got.as_deref(), Some(message));
}

/// Waits until a login of `user` to `db` succeeds again (a client that left is
/// uncounted when its task ends, just after its socket closes).
async fn admitted_again(env: &TestEnv, user: &str, db: &str) -> Client {
    let password = if user == BOB {
        BOB_PASSWORD
    } else {
        APP_PASSWORD
    };
    for _ in 0..100 {
        if let Ok(client) = env.connect(user, password, db).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{user} is still refused on {db}");
}

/// `max_user_client_connections = 2`: the user's third client is told 53300 after its
/// login, other users are not, and a client leaving frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_user_client_connections_refuses_the_third() {
    let env = start(options(&["max_user_client_connections = 2"])).await;
    let first = connect(&env, APP_USER, APP_DB).await;
    let _second = connect(&env, APP_USER, APP_DB).await;
    assert_refused(
        &env,
        APP_USER,
        APP_DB,
        "too many client connections for user \"app\" (max_user_client_connections)",
    )
    .await;
    let _bob = connect(&env, BOB, APP_DB).await;
    drop(first);
    let third = admitted_again(&env, APP_USER, APP_DB).await;
    assert_eq!(simple_value(&third, "SELECT 3").await, "3");
}

/// `[[databases]] max_db_client_connections = 2`: the database's third client, of
/// any user, is refused; another database is not limited; a client leaving frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_client_connections_refuses_the_third() {
    let mut options = options(&[]);
    options.sections.push(
        "[[databases]]\nname = \"app\"\nmax_db_client_connections = 2\n\
         [[databases]]\nname = \"app2\""
            .to_owned(),
    );
    let env = start_with_two_databases(options).await;
    let first = connect(&env, APP_USER, APP_DB).await;
    let _second = connect(&env, BOB, APP_DB).await;
    assert_refused(
        &env,
        BOB,
        APP_DB,
        "too many client connections for database \"app\" (max_db_client_connections)",
    )
    .await;
    let _other = connect(&env, BOB, OTHER_DB).await;
    drop(first);
    let third = admitted_again(&env, BOB, APP_DB).await;
    assert_eq!(simple_value(&third, "SELECT 3").await, "3");
}

/// `[[users]] pool_mode = "session"` overrides `pool.mode` (transaction) for that user:
/// between transactions bob's client keeps its server, app's gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_pool_mode_overrides_the_default() {
    let mut options = options(&[]);
    options.relay_users = vec![(APP_USER.into(), APP_PASSWORD.into())];
    options.sections.push(format!(
        "[[users]]\nname = \"{BOB}\"\npassword = \"{BOB_PASSWORD}\"\npool_mode = \"session\""
    ));
    let env = start(options).await;
    let idle_of = |user: &str| {
        env.relay
            .shared
            .pools
            .all()
            .into_iter()
            .find(|p| p.key.user == user)
            .map(|p| p.counts().0)
    };
    let bob = connect(&env, BOB, APP_DB).await;
    assert_eq!(simple_value(&bob, "SELECT 1").await, "1");
    let app = connect(&env, APP_USER, APP_DB).await;
    assert_eq!(simple_value(&app, "SELECT 1").await, "1");
    assert_eq!(idle_of(BOB), Some(0), "bob's client holds its server");
    assert_eq!(idle_of(APP_USER), Some(1), "app's server went back");
}
