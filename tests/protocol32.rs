//! Protocol 3.2 (PostgreSQL 18) between clients and pgrelay, in both pool modes, while
//! pgrelay speaks 3.0 to PostgreSQL 15: a 3.2 client is answered as a 3.2 server
//! would (no NegotiateProtocolVersion, a 32-byte cancel secret) and its long-key
//! CancelRequests cancel; a 3.0 client keeps its 4-byte secret; a newer minor version
//! or `_pq_.` options get exactly one NegotiateProtocolVersion naming 3.2 and the
//! options, before anything else; malformed CancelRequests are closed cleanly. With
//! hand-written bytes, and libpq 18 through psycopg.

mod support;

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::{raw, start, EnvOptions, APP_DB, APP_PASSWORD, APP_USER};

use support::both_modes;

const SECOND: Duration = Duration::from_secs(1);
const CANCEL_REQUEST_CODE: u32 = 80_877_102;

fn trust_env(mode: &'static str) -> EnvOptions {
    EnvOptions {
        client_auth: "trust",
        ..EnvOptions::mode(mode)
    }
}

/// A StartupMessage for protocol 3.`minor`.
fn startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut packet = raw::startup_message(params);
    packet[4..8].copy_from_slice(&(3u32 << 16 | u32::from(minor)).to_be_bytes());
    packet
}

fn app_startup(minor: u16, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut params = vec![("user", APP_USER), ("database", APP_DB)];
    params.extend_from_slice(extra);
    startup(minor, &params)
}

/// A CancelRequest of any length: code, pid, then the secret.
fn cancel_request(pid: i32, secret: &[u8]) -> Vec<u8> {
    let mut packet = (12 + secret.len() as u32).to_be_bytes().to_vec();
    packet.extend(CANCEL_REQUEST_CODE.to_be_bytes());
    packet.extend(pid.to_be_bytes());
    packet.extend_from_slice(secret);
    packet
}

/// Sends `packet` and reads the answer up to ReadyForQuery or close.
async fn login(port: u16, packet: &[u8]) -> (TcpStream, Vec<raw::Message>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(packet).await.expect("send startup");
    let messages = raw::read_until_ready(&mut stream, 10 * SECOND).await;
    (stream, messages)
}

/// The pid and secret of the one BackendKeyData among `messages`.
fn backend_key(messages: &[raw::Message]) -> (i32, Vec<u8>) {
    let keys: Vec<_> = messages.iter().filter(|m| m.tag == b'K').collect();
    assert_eq!(keys.len(), 1, "{messages:?}");
    let body = &keys[0].body;
    let pid = i32::from_be_bytes(body[..4].try_into().expect("a pid"));
    (pid, body[4..].to_vec())
}

/// The NegotiateProtocolVersion body PostgreSQL 18 sends: the full version, then the
/// options it does not know.
fn negotiation(minor: u16, options: &[&str]) -> Vec<u8> {
    let mut body = (3i32 << 16 | i32::from(minor)).to_be_bytes().to_vec();
    body.extend((options.len() as i32).to_be_bytes());
    for option in options {
        body.extend_from_slice(option.as_bytes());
        body.push(0);
    }
    body
}

fn tags(messages: &[raw::Message]) -> String {
    messages.iter().map(|m| m.tag as char).collect()
}

/// 3.2 is spoken without negotiation and gets a 32-byte secret; 3.0 and 3.1 get 4 bytes
/// (as from PostgreSQL 18: only 3.2 has long keys).
async fn backend_keys(mode: &'static str) {
    let env = start(trust_env(mode)).await;
    for (minor, len) in [(2, 32), (0, 4), (1, 4)] {
        let (_stream, messages) = login(env.port(), &app_startup(minor, &[])).await;
        assert_eq!(
            messages.first().and_then(raw::Message::auth_code),
            Some(0),
            "3.{minor}: no NegotiateProtocolVersion, AuthenticationOk first: {messages:?}"
        );
        assert_eq!(messages.last().map(|m| m.tag), Some(b'Z'), "{messages:?}");
        let (pid, secret) = backend_key(&messages);
        assert_eq!(secret.len(), len, "3.{minor}");
        assert_ne!(pid, 0);
        assert!(secret.iter().any(|&b| b != 0), "3.{minor}: a zero key");
    }
}

both_modes!(backend_keys);

/// A newer minor version and `_pq_.` options (PostgreSQL 19's grease among them) are
/// answered with exactly one NegotiateProtocolVersion, first, naming 3.2 and the
/// options; a 3.0 client's options are answered with 3.0. A client refused for
/// another reason hears the negotiation first, then the error, then the close.
async fn negotiation_once(mode: &'static str) {
    let env = start(trust_env(mode)).await;
    let grease = "_pq_.test_protocol_negotiation";
    // (minor, options, the negotiation's body, the secret's length)
    type Case<'a> = (u16, &'a [(&'a str, &'a str)], Vec<u8>, usize);
    let cases: [Case; 5] = [
        (3, &[], negotiation(2, &[]), 32),
        (3, &[("_pq_.x", "1")], negotiation(2, &["_pq_.x"]), 32),
        (9999, &[(grease, "")], negotiation(2, &[grease]), 32),
        (
            2,
            &[(grease, ""), ("_pq_.x", "1")],
            negotiation(2, &[grease, "_pq_.x"]),
            32,
        ),
        (0, &[("_pq_.x", "1")], negotiation(0, &["_pq_.x"]), 4),
    ];
    for (minor, options, want, len) in cases {
        let (_stream, messages) = login(env.port(), &app_startup(minor, options)).await;
        assert_eq!(
            tags(&messages).matches('v').count(),
            1,
            "3.{minor}: {messages:?}"
        );
        assert_eq!(messages[0].tag, b'v', "3.{minor}: {messages:?}");
        assert_eq!(messages[0].body, want, "3.{minor} {options:?}");
        assert_eq!(messages[1].auth_code(), Some(0), "{messages:?}");
        assert_eq!(messages.last().map(|m| m.tag), Some(b'Z'), "{messages:?}");
        assert_eq!(backend_key(&messages).1.len(), len, "3.{minor}");
    }

    // Refused: no user, an unknown database. The negotiation comes first, once.
    let refused = [
        startup(3, &[("database", APP_DB), ("_pq_.x", "1")]),
        startup(3, &[("user", APP_USER), ("database", "nope")]),
    ];
    for packet in refused {
        let mut stream = TcpStream::connect(("127.0.0.1", env.port()))
            .await
            .expect("connect");
        stream.write_all(&packet).await.expect("send startup");
        let seen = raw::read_to_close(&mut stream, 10 * SECOND)
            .await
            .expect("pgrelay closes after a refusal");
        let messages = raw::split_messages(&seen);
        let tags = tags(&messages);
        assert!(tags.starts_with('v') && tags.ends_with('E'), "{messages:?}");
        assert_eq!(tags.matches('v').count(), 1, "{messages:?}");
        assert_eq!(messages[0].body[..4], [0, 3, 0, 2]);
        let error = messages.last().expect("an error");
        assert_eq!(error.fields().get(&b'S').map(String::as_str), Some("FATAL"));
    }
}

both_modes!(negotiation_once);

/// Starts `SELECT pg_sleep(10)` on a raw connection, returns when it has been sent.
async fn start_sleep(stream: &mut TcpStream) {
    stream
        .write_all(&raw::query("SELECT pg_sleep(10)"))
        .await
        .expect("send query");
    // Time for it to reach a server: a cancel before that has nothing to cancel.
    tokio::time::sleep(SECOND / 2).await;
}

async fn send_cancel(port: u16, packet: &[u8]) -> Result<Vec<u8>, Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(packet).await.expect("send cancel");
    raw::read_to_close(&mut stream, 5 * SECOND).await
}

/// A 3.2 client's CancelRequest carries its 32-byte secret and cancels its query; part
/// of the secret cancels nothing; malformed requests (a 300-byte or a 1-byte key) are
/// closed without an answer, and pgrelay goes on.
async fn long_key_cancels(mode: &'static str) {
    let env = start(trust_env(mode)).await;
    let port = env.port();
    let (mut stream, messages) = login(port, &app_startup(2, &[])).await;
    let (pid, secret) = backend_key(&messages);
    assert_eq!(secret.len(), 32);

    for bad in [
        cancel_request(pid, &[7; 300]),
        cancel_request(pid, &secret[..1]),
        cancel_request(pid, &secret[..4]),
        cancel_request(pid, &[secret.clone(), vec![0]].concat()),
    ] {
        let answer = send_cancel(port, &bad).await;
        assert_eq!(answer, Ok(Vec::new()), "closed, no answer");
    }
    // A wrong key cancels nothing: the query runs to its end.
    stream
        .write_all(&raw::query("SELECT pg_sleep(1)"))
        .await
        .expect("send query");
    tokio::time::sleep(SECOND / 4).await;
    let mut wrong = secret.clone();
    wrong[31] ^= 1;
    assert_eq!(
        send_cancel(port, &cancel_request(pid, &wrong)).await,
        Ok(Vec::new())
    );
    let answer = raw::read_until_ready(&mut stream, 10 * SECOND).await;
    assert!(answer.iter().all(|m| m.tag != b'E'), "{answer:?}");

    start_sleep(&mut stream).await;
    let began = Instant::now();
    assert_eq!(
        send_cancel(port, &cancel_request(pid, &secret)).await,
        Ok(Vec::new())
    );
    let answer = raw::read_until_ready(&mut stream, 10 * SECOND).await;
    let error = answer.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(error.sqlstate().as_deref(), Some("57014"), "{answer:?}");
    assert!(began.elapsed() < 5 * SECOND);
    let after = raw::simple_query(&mut stream, "SELECT 'after'").await;
    assert_eq!(raw::first_value(&after).as_deref(), Some("after"));
}

both_modes!(long_key_cancels);

/// A 3.0 client's 4-byte key still cancels.
async fn short_key_cancels(mode: &'static str) {
    let env = start(trust_env(mode)).await;
    let (mut stream, messages) = login(env.port(), &app_startup(0, &[])).await;
    let (pid, secret) = backend_key(&messages);
    assert_eq!(secret.len(), 4);
    start_sleep(&mut stream).await;
    assert_eq!(
        send_cancel(env.port(), &cancel_request(pid, &secret)).await,
        Ok(Vec::new())
    );
    let answer = raw::read_until_ready(&mut stream, 10 * SECOND).await;
    let error = answer.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(error.sqlstate().as_deref(), Some("57014"), "{answer:?}");
}

both_modes!(short_key_cancels);

/// libpq 18 (psycopg): `max_protocol_version=3.2` gets 3.2 (PQfullProtocolVersion
/// 30002), and both its cancel APIs stop a running query; 3.0 still works.
async fn libpq18(mode: &'static str) {
    let env = start(EnvOptions::mode(mode)).await;
    let url = format!(
        "postgresql://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{}/{APP_DB}",
        env.port()
    );
    let text = support::needs::run_libpq18_driver("protocol32.py", &[&url, mode]);
    assert!(text.contains("protocol32 ok"), "{text}");
}

both_modes!(libpq18);
