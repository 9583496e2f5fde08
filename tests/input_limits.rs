//! Hostile input limits (issue 15): the startup packet's 10,000 bytes, and
//! `limits.max_request_buffer` on a request read before it is routed and on a Query
//! inside a transaction, while COPY data still streams. (A message length header of 0x7fffffff is 08P01 and a close without
//! an allocation: `bad_input::malformed_messages_are_08p01_then_close`.)

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::raw;
use support::{simple_value, start, EnvOptions, APP_DB, APP_USER};

fn trust() -> EnvOptions {
    EnvOptions {
        client_auth: "trust",
        ..Default::default()
    }
}

/// This process's peak resident set in KiB since [`reset_peak_rss`]: pgrelay runs in
/// the test process, and a large buffer it dropped is given back to the system (the
/// resident set after a refusal says nothing; its peak does).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// Sets the peak resident set back to the current one (Linux 4.0 on).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
}

/// A StartupMessage of exactly `len` bytes (an application_name pads it).
fn startup_of_len(len: usize) -> Vec<u8> {
    let base = raw::startup_message(&[
        ("user", APP_USER),
        ("database", APP_DB),
        ("application_name", ""),
    ]);
    let pad = "a".repeat(len - base.len());
    let packet = raw::startup_message(&[
        ("user", APP_USER),
        ("database", APP_DB),
        ("application_name", &pad),
    ]);
    assert_eq!(packet.len(), len);
    packet
}

/// PostgreSQL's limit: a startup packet of 10,000 bytes logs in, one of 10,001 is
/// closed at once (as PostgreSQL closes it, "invalid length of startup packet").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_packet_over_10000_bytes_is_closed() {
    let env = start(trust()).await;
    let mut ok = TcpStream::connect(env.addr).await.expect("connect");
    ok.write_all(&startup_of_len(10_000))
        .await
        .expect("send startup");
    let answer = raw::read_until_ready(&mut ok, Duration::from_secs(10)).await;
    assert_eq!(answer.first().and_then(raw::Message::auth_code), Some(0));
    assert_eq!(answer.last().map(|m| m.tag), Some(b'Z'));

    let mut over = TcpStream::connect(env.addr).await.expect("connect");
    over.write_all(&startup_of_len(10_001))
        .await
        .expect("send startup");
    let started = Instant::now();
    let seen = raw::read_to_close(&mut over, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(started.elapsed() < Duration::from_secs(2));
    for message in raw::split_messages(&seen) {
        assert_eq!(message.sqlstate().as_deref(), Some("08P01"), "{message:?}");
    }
}

/// A 100 MB Query in transaction mode (PostgreSQL itself would take it: its limit is
/// 1 GB) is refused with 54000 and a close after at most `max_request_buffer` (16 MiB
/// by default) was buffered: pgrelay's memory does not grow by the request's size. A
/// new client works at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_is_54000_and_not_buffered() {
    let env = start(trust()).await;
    let stream = raw::login_trust(env.addr, APP_USER, APP_DB).await;
    refuses_100_mb_query(stream).await;
    let client = env.client().await;
    assert_eq!(simple_value(&client, "SELECT 1").await, "1");
}

/// The same inside an open transaction block, where the Query goes to the server the
/// client already holds: pgrelay reads a Query whole before relaying it, and refuses
/// one over `max_request_buffer` rather than buffer it. The server it held is closed
/// (its transaction rolls back) and a new client works at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_query_inside_a_transaction_is_54000_too() {
    let env = start(trust()).await;
    let mut stream = raw::login_trust(env.addr, APP_USER, APP_DB).await;
    let begun = raw::simple_query(&mut stream, "BEGIN").await;
    assert_eq!(begun.last().map(|m| m.tag), Some(b'Z'), "{begun:?}");
    refuses_100_mb_query(stream).await;
    let client = env.client().await;
    assert_eq!(simple_value(&client, "SELECT 1").await, "1");
}

/// Sends a 100 MB Query on a logged-in `stream` and checks it is refused with FATAL
/// 54000 and a close, and that this process's (pgrelay's) peak memory did not grow by
/// anything near its size.
async fn refuses_100_mb_query(stream: TcpStream) {
    const QUERY_LEN: usize = 100 << 20;
    reset_peak_rss();
    let rss_before = peak_rss_kib();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut header = vec![b'Q'];
        header.extend_from_slice(&((QUERY_LEN + 4) as u32).to_be_bytes());
        write.write_all(&header).await?;
        // One chunk sent over and over: the test itself holds 1 MiB, not 100. A
        // well-formed Query (blanks, then the NUL): only its size is wrong.
        let mut chunk = vec![b' '; 1 << 20];
        for _ in 1..QUERY_LEN / chunk.len() {
            write.write_all(&chunk).await?;
        }
        chunk[(1 << 20) - 1] = 0;
        write.write_all(&chunk).await?;
        std::io::Result::Ok(())
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::AsyncReadExt;
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "still open: {:?}",
        raw::split_messages(&seen)
    );
    let rss_after = peak_rss_kib();
    // pgrelay refused it: the rest of the 100 MB could not be sent.
    let sent = writer.await.expect("writer task");
    assert!(sent.is_err(), "all 100 MB were accepted");
    let errors = raw::split_messages(&seen);
    assert_eq!(errors.len(), 1, "{errors:?}");
    let fields = errors[0].fields();
    assert_eq!(errors[0].sqlstate().as_deref(), Some("54000"));
    assert_eq!(fields.get(&b'S').map(String::as_str), Some("FATAL"));
    assert!(
        fields[&b'M'].contains("max_request_buffer"),
        "{:?}",
        fields[&b'M']
    );
    let grown_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 48,
        "peak RSS grew by {grown_mib} MiB for a refused request"
    );
}

/// COPY data is never counted against `max_request_buffer`: 50 MB (over three times
/// the 16 MiB default) of COPY FROM STDIN goes through in transaction mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_of_50_mb_streams() {
    let env = start(EnvOptions::default()).await;
    let mut client = env.client().await;
    client
        .batch_execute("CREATE TABLE copy_big (line text)")
        .await
        .expect("create table");
    let transaction = client.transaction().await.expect("BEGIN");
    let sink = transaction
        .copy_in::<_, Bytes>("COPY copy_big FROM STDIN")
        .await
        .expect("COPY FROM STDIN");
    futures_util::pin_mut!(sink);
    // 1 KiB lines, 1 MiB per CopyData, 50 of them.
    let mut line = vec![b'x'; 1023];
    line.push(b'\n');
    let chunk = Bytes::from(line.repeat(1024));
    for _ in 0..50 {
        sink.send(chunk.clone()).await.expect("CopyData");
    }
    assert_eq!(sink.finish().await.expect("CopyDone"), 50 * 1024);
    transaction.commit().await.expect("COMMIT");
    let size = simple_value(&client, "SELECT sum(length(line)) FROM copy_big").await;
    assert_eq!(size, (50 * 1024 * 1023).to_string());
}

fn limits(lines: &[&str]) -> EnvOptions {
    EnvOptions {
        limits: lines.iter().map(|line| (*line).to_owned()).collect(),
        ..Default::default()
    }
}

async fn log_in(env: &support::TestEnv, password: &str) -> Result<(), Option<String>> {
    let conn = support::relay_conn_string(env.addr, APP_USER, password, APP_DB);
    match support::connect_str(&conn).await {
        Ok(_) => Ok(()),
        Err(err) => Err(support::sqlstate(&err)),
    }
}

/// `auth_failure_delay`: a wrong password is told only after the delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_login_waits_auth_failure_delay() {
    let env = start(limits(&["auth_failure_delay = \"700ms\""])).await;
    let started = Instant::now();
    assert_eq!(log_in(&env, "wrong").await, Err(Some("28P01".into())));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(700),
        "told after {waited:?}"
    );
    log_in(&env, support::APP_PASSWORD).await.expect("login");
}

/// `auth_failure_limit = 3` in a 3s window: after three wrong passwords from
/// 127.0.0.1, even the right one is refused at once with 53300 until the window
/// passes; another source address (127.0.0.2) is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_per_address_are_limited() {
    let env = start(limits(&[
        "auth_failure_limit = 3",
        "auth_failure_window = \"3s\"",
    ]))
    .await;
    let mut first_failed = None;
    for _ in 0..3 {
        assert_eq!(log_in(&env, "wrong").await, Err(Some("28P01".into())));
        // pgrelay counted the failure before it told the client.
        first_failed.get_or_insert_with(Instant::now);
    }
    let refused_at = Instant::now();
    assert_eq!(
        log_in(&env, support::APP_PASSWORD).await,
        Err(Some("53300".into()))
    );
    assert!(refused_at.elapsed() < Duration::from_secs(1));

    // Another source: it is asked for its password (SASL), not refused.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let mut other = socket.connect(env.addr).await.expect("connect");
    other
        .write_all(&raw::startup_message(&[
            ("user", APP_USER),
            ("database", APP_DB),
        ]))
        .await
        .expect("send startup");
    let request = raw::read_message(&mut other)
        .await
        .expect("read")
        .expect("a message");
    assert_eq!(request.auth_code(), Some(10), "{request:?}");

    // The window began with the first failure: after it, the address logs in again.
    let window_end = first_failed.expect("a failure") + Duration::from_secs(3);
    tokio::time::sleep_until(window_end.into()).await;
    log_in(&env, support::APP_PASSWORD)
        .await
        .expect("login after the window");
}
