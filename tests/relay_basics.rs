//! Simple and extended queries, pipelines, errors and parameters through pgrelay, in
//! both pool modes.

mod support;

use support::{start, EnvOptions};

async fn simple_and_extended(mode: &'static str) {
    let env = start(EnvOptions::mode(mode)).await;
    let client = env.client().await;
    let rows = client
        .simple_query("SELECT 1 AS a; SELECT 'x' AS b")
        .await
        .unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "x"]);
    let row = client
        .query_one("SELECT $1::int4 + 1, $2::text", &[&41i32, &"hé"])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, &str>(1), "hé");
    let err = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(support::sqlstate(&err).as_deref(), Some("22012"));
    // The session is still usable after an error.
    let row = client.query_one("SELECT 7::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_transaction_mode() {
    simple_and_extended("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_session_mode() {
    simple_and_extended("session").await;
}
