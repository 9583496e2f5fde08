//! Read and write endpoints without SQL parsing (issue 16): `[[databases]]` entries with
//! `target = "primary" | "replica" | "any"` beside today's `auto`, and a listener tied
//! to a target, as PgBouncer's `mydb_write` / `mydb_read` aliases and HAProxy's write
//! and read ports map onto one pgrelay. A write on a `replica` endpoint fails with
//! PostgreSQL's 25006 wherever it runs, the primary included when it stands in for a
//! missing replica (`primary_fallback`); without the fallback, a request waits for a
//! replica up to `failover.hold_timeout` and then fails with 08006.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use pgrelay::config::Config;
use pgrelay::listener::Pgrelay;
use support::*;
use tokio_postgres::Client;

const SECOND: Duration = Duration::from_secs(1);

const DATABASES: &str = "[[databases]]\nname = \"app\"\n\
     [[databases]]\nname = \"app_write\"\ndbname = \"app\"\ntarget = \"primary\"\n\
     [[databases]]\nname = \"app_read\"\ndbname = \"app\"\ntarget = \"replica\"\n\
     [[databases]]\nname = \"app_any\"\ndbname = \"app\"\ntarget = \"any\"\n\
     [[databases]]\nname = \"app_read_strict\"\ndbname = \"app\"\ntarget = \"replica\"\n\
     primary_fallback = false\n\
     [failover]\nhold_timeout = \"2s\"";

/// One primary and one replica; pgrelay with the endpoints above and a second
/// listener whose clients all go to a replica.
async fn endpoints(mode: &'static str) -> (TestEnv, Pgrelay) {
    let options = EnvOptions {
        replicas: 1,
        sections: vec![DATABASES.into()],
        ..EnvOptions::mode(mode)
    };
    let env = start(options).await;
    let text = config_text(&env.options, &env.cluster.ports()).replacen(
        "listen = [\"127.0.0.1:0\"]",
        "listen = [\"127.0.0.1:0\", { address = \"127.0.0.1:0\", target = \"replica\" }]",
        1,
    );
    let config = Config::from_toml_str(&text).expect("config with a replica listener");
    let relay = Pgrelay::start(config).await.expect("start pgrelay");
    // A replica takes reads once its lag has been measured: until then a replica
    // endpoint would stand in on the primary.
    let shared = relay.shared.clone();
    let readable = eventually(Duration::from_secs(10), || async {
        shared
            .cluster
            .load()
            .nodes
            .get(1)
            .is_some_and(|n| n.readable)
    })
    .await;
    assert!(readable, "the replica takes reads");
    (env, relay)
}

async fn connect_to(relay: &Pgrelay, listener: usize, database: &str) -> Client {
    let conn = relay_conn_string(relay.addrs[listener], APP_USER, APP_PASSWORD, database);
    connect_str(&conn).await.expect("connect")
}

/// The ports of the servers that answered `count` transactions.
async fn ports_seen(client: &Client, count: usize) -> HashSet<String> {
    let mut seen = HashSet::new();
    for _ in 0..count {
        seen.insert(simple_value(client, "SELECT current_setting('port')").await);
    }
    seen
}

fn ports(list: &[u16]) -> HashSet<String> {
    list.iter().map(u16::to_string).collect()
}

/// A write (one that needs no table, which the replica may not have replayed yet)
/// fails as on a replica.
async fn write_fails_read_only(client: &Client, what: &str) {
    let err = client
        .batch_execute("CREATE TABLE endpoint_ro (a int)")
        .await
        .expect_err("a write on a read-only endpoint");
    assert_eq!(sqlstate(&err).as_deref(), Some("25006"), "{what}: {err:?}");
}

/// Each endpoint sends its transactions where its target says, in both pool modes:
/// `primary` everything (reads too), `replica` and the replica listener only the
/// replica, read-only, `any` both nodes; `auto` still routes by the SQL.
async fn targets(mode: &'static str) {
    let (env, relay) = endpoints(mode).await;
    let (primary, replica) = (env.cluster.primary_port(), env.cluster.replica_ports()[0]);
    let admin = env.direct_superuser().await;
    admin
        .batch_execute("CREATE TABLE endpoint_t (a int); GRANT ALL ON endpoint_t TO app")
        .await
        .expect("create table");

    let write = connect_to(&relay, 0, "app_write").await;
    assert_eq!(ports_seen(&write, 10).await, ports(&[primary]));
    write
        .batch_execute("INSERT INTO endpoint_t VALUES (1)")
        .await
        .expect("a write on the primary's endpoint");

    let read = connect_to(&relay, 0, "app_read").await;
    assert_eq!(ports_seen(&read, 10).await, ports(&[replica]));
    assert_eq!(
        simple_value(&read, "SHOW default_transaction_read_only").await,
        "on"
    );
    write_fails_read_only(&read, "app_read").await;

    let by_port = connect_to(&relay, 1, "app").await;
    assert_eq!(ports_seen(&by_port, 10).await, ports(&[replica]));
    write_fails_read_only(&by_port, "the replica listener").await;

    if mode == "transaction" {
        let any = connect_to(&relay, 0, "app_any").await;
        assert_eq!(ports_seen(&any, 40).await, ports(&[primary, replica]));
    } else {
        // A session-mode client keeps the node it was given, whichever it is.
        let any = connect_to(&relay, 0, "app_any").await;
        assert_eq!(ports_seen(&any, 10).await.len(), 1);
    }
    let any = connect_to(&relay, 0, "app_any").await;
    assert_eq!(
        simple_value(&any, "SHOW default_transaction_read_only").await,
        "off"
    );

    let auto = connect_to(&relay, 0, "app").await;
    auto.batch_execute("INSERT INTO endpoint_t VALUES (2)")
        .await
        .expect("auto sends a write to the primary");
    drop(relay);
}
both_modes!(targets);

/// With the replica stopped, a `replica` endpoint's transactions go to the primary,
/// still read-only; one with `primary_fallback = false` waits `failover.hold_timeout`
/// for a replica and fails with 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_replica_the_primary_stands_in_read_only() {
    let (env, relay) = endpoints("transaction").await;
    let primary = env.cluster.primary_port();
    let admin = env.direct_superuser().await;
    admin
        .batch_execute("CREATE TABLE endpoint_t (a int); GRANT ALL ON endpoint_t TO app")
        .await
        .expect("create table");
    let read = connect_to(&relay, 0, "app_read").await;
    let strict = connect_to(&relay, 0, "app_read_strict").await;
    assert_eq!(simple_value(&strict, "SELECT 1").await, "1");

    let replica = env.cluster.replica_ports()[0];
    env.cluster
        .stop_node(replica, "fast")
        .expect("stop the replica");
    let moved = eventually(20 * SECOND, || async {
        simple_value(&read, "SELECT current_setting('port')").await == primary.to_string()
    })
    .await;
    assert!(moved, "the replica endpoint never fell back to the primary");
    assert_eq!(
        simple_value(&read, "SHOW default_transaction_read_only").await,
        "on"
    );
    write_fails_read_only(&read, "app_read on the primary").await;

    let started = std::time::Instant::now();
    let err = strict
        .simple_query("SELECT 1")
        .await
        .expect_err("no replica and no fallback");
    assert_eq!(sqlstate(&err).as_deref(), Some("08006"), "{err:?}");
    assert!(started.elapsed() >= SECOND, "it did not wait for a replica");
    let message = err.as_db_error().map(|db| db.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("primary_fallback")),
        "{message:?}: the message says why"
    );
    drop(relay);
}
