//! Cancels across a fleet (issue 17): two pgrelays in front of one cluster. A long
//! query through A is cancelled by a CancelRequest sent to B (a load balancer's
//! choice), with a protocol 3.0 key and with a 3.2 one: in transaction mode with each
//! naming the other in `[[peers]]`, and in session mode (where a 3.0 key is the
//! server's own and names no instance) with B finding A through DNS (`peers_dns`). A
//! key of no known instance is ignored, and a cancel a peer already forwarded is not
//! forwarded again: a cancel crosses the fleet once. And sizing: with
//! `max_fleet_server_connections = 4`, each of two live instances opens at most 2 server
//! connections to the primary, whatever its pool size; once one is gone, the other 4.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgrelay::config::Config;
use pgrelay::listener::Pgrelay;
use support::raw::{self, Message};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SECOND: Duration = Duration::from_secs(1);
const CANCEL_REQUEST: u32 = 80_877_102;
const FORWARDED_CANCEL_REQUEST: u32 = 80_877_101;

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr").port()
}

/// A pgrelay with `instance_id = id` on `port`, whose one peer is `peer` on `peer_port`.
async fn instance(env: &TestEnv, (id, port): (u16, u16), (peer, peer_port): (u16, u16)) -> Pgrelay {
    let options = EnvOptions {
        top_extra: vec![format!("instance_id = {id}")],
        sections: vec![format!(
            "[[peers]]\nid = {peer}\nhost = \"127.0.0.1\"\nport = {peer_port}"
        )],
        ..env.options.clone()
    };
    started(options, env, port).await
}

/// A pgrelay with `options` on `port`, in front of `env`'s cluster.
async fn started(options: EnvOptions, env: &TestEnv, port: u16) -> Pgrelay {
    let text = config_text(&options, &env.cluster.ports()).replacen(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:{port}\"]"),
        1,
    );
    let config = Config::from_toml_str(&text).expect("config");
    Pgrelay::start(config).await.expect("start pgrelay")
}

/// Logs in with protocol 3.`minor` where no password is asked; the stream and the
/// cancel key from BackendKeyData.
async fn log_in(addr: SocketAddr, minor: u8) -> (TcpStream, i32, Vec<u8>) {
    let mut packet = raw::startup_message(&[("user", APP_USER), ("database", APP_DB)]);
    packet[7] = minor;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&packet).await.expect("startup");
    let messages = raw::read_until_ready(&mut stream, 10 * SECOND).await;
    let key = messages
        .iter()
        .find(|m| m.tag == b'K')
        .unwrap_or_else(|| panic!("no BackendKeyData: {messages:?}"));
    let pid = i32::from_be_bytes(key.body[..4].try_into().expect("pid"));
    (stream, pid, key.body[4..].to_vec())
}

/// Sends a CancelRequest (`code`) for `pid` and `secret` to `addr`.
async fn send_cancel(addr: SocketAddr, code: u32, pid: i32, secret: &[u8]) {
    let mut packet = Vec::new();
    packet.extend_from_slice(&(12 + secret.len() as u32).to_be_bytes());
    packet.extend_from_slice(&code.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(secret);
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(&packet).await.expect("cancel");
    // The receiver closes once it has acted on it.
    let _ = raw::read_to_close(&mut stream, 10 * SECOND).await;
}

/// Runs `sql` on `stream` and returns what answered it, and how long it took.
async fn answer(stream: &mut TcpStream, sql: &str) -> (Vec<Message>, Duration) {
    let started = Instant::now();
    stream.write_all(&raw::query(sql)).await.expect("query");
    let messages = raw::read_until_ready(stream, 30 * SECOND).await;
    (messages, started.elapsed())
}

/// Logs in to `a` with protocol 3.`minor`, runs a long query there, and sends its
/// CancelRequest to `b`: the query must end with 57014, soon. The client and its key.
async fn cancelled_through(a: SocketAddr, b: SocketAddr, minor: u8) -> (TcpStream, i32, Vec<u8>) {
    let (mut client, pid, secret) = log_in(a, minor).await;
    let canceller = async {
        tokio::time::sleep(SECOND / 2).await;
        send_cancel(b, CANCEL_REQUEST, pid, &secret).await;
    };
    let ((messages, took), ()) =
        tokio::join!(answer(&mut client, "SELECT pg_sleep(30)"), canceller);
    assert_eq!(
        sqlstate_of(&messages).as_deref(),
        Some("57014"),
        "3.{minor}: {messages:?}"
    );
    assert!(took < 10 * SECOND, "3.{minor}: cancelled after {took:?}");
    (client, pid, secret)
}

fn sqlstate_of(messages: &[Message]) -> Option<String> {
    messages.iter().find_map(Message::sqlstate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_another_instance_finds_its_query() {
    let env = start(EnvOptions {
        client_auth: "trust",
        ..Default::default()
    })
    .await;
    let (port_a, port_b) = (free_port(), free_port());
    let a = instance(&env, (1, port_a), (2, port_b)).await;
    let b = instance(&env, (2, port_b), (1, port_a)).await;
    let (addr_a, addr_b) = (a.addrs[0], b.addrs[0]);

    for minor in [0, 2] {
        let (mut client, pid, secret) = cancelled_through(addr_a, addr_b, minor).await;
        assert!(pid >= 1 << 22, "transaction mode: a pid pgrelay issued");
        assert_eq!(secret.len(), if minor == 0 { 4 } else { 32 });
        // The session goes on.
        let (messages, _) = answer(&mut client, "SELECT 1").await;
        assert_eq!(raw::first_value(&messages).as_deref(), Some("1"));
    }

    // Ignored: a key of an instance nobody knows (7), a cancel already forwarded by a
    // peer (B does not send it on to A), and a wrong secret.
    let (mut client, pid, secret) = log_in(addr_a, 0).await;
    let unknown = (1 << 22) + 7 * (1 << 20) + 5;
    let mut wrong = secret.clone();
    wrong[0] ^= 1;
    let ignored = async {
        tokio::time::sleep(SECOND / 4).await;
        send_cancel(addr_b, CANCEL_REQUEST, unknown, &secret).await;
        send_cancel(addr_b, FORWARDED_CANCEL_REQUEST, pid, &secret).await;
        send_cancel(addr_b, CANCEL_REQUEST, pid, &wrong).await;
    };
    let ((messages, took), ()) = tokio::join!(answer(&mut client, "SELECT pg_sleep(1.5)"), ignored);
    assert_eq!(sqlstate_of(&messages), None, "{messages:?}");
    assert!(took >= SECOND, "{took:?}");
    drop((a, b));
}

/// Session mode, B with no `[[peers]]` but `peers_dns = "localhost:<A's port>"`: a
/// protocol 3.0 key (the server's own pid and secret, no instance in it) and a 3.2 key
/// sent to B both reach A through the name's addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_keys_find_their_query_through_dns() {
    let env = start(EnvOptions {
        client_auth: "trust",
        ..EnvOptions::session()
    })
    .await;
    let (port_a, port_b) = (free_port(), free_port());
    let a = started(env.options.clone(), &env, port_a).await;
    let options = EnvOptions {
        top_extra: vec![format!("peers_dns = \"localhost:{port_a}\"")],
        ..env.options.clone()
    };
    let b = started(options, &env, port_b).await;
    let (addr_a, addr_b) = (a.addrs[0], b.addrs[0]);
    for minor in [0, 2] {
        let (_, pid, _) = cancelled_through(addr_a, addr_b, minor).await;
        assert!(pid < 1 << 22, "session mode: the server's own pid");
    }
    drop((a, b));
}

/// Server connections `relay` has open, over all its pools.
fn servers_open(relay: &Pgrelay) -> usize {
    relay
        .shared
        .pools
        .all()
        .iter()
        .map(|pool| pool.counts().1)
        .sum()
}

/// Runs `clients` concurrent `pg_sleep(1)` through `relay` and returns the most server
/// connections it had open meanwhile.
async fn busiest(relay: &Pgrelay, clients: usize) -> usize {
    let conn = relay_conn_string(relay.addrs[0], APP_USER, APP_PASSWORD, APP_DB);
    let mut sessions = Vec::new();
    for _ in 0..clients {
        sessions.push(connect_str(&conn).await.expect("connect"));
    }
    let sleeps = sessions
        .iter()
        .map(|c| c.simple_query("SELECT pg_sleep(1)"));
    let watch = async {
        let mut most = 0;
        for _ in 0..30 {
            most = most.max(servers_open(relay));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        most
    };
    let (answers, most) = tokio::join!(futures_util::future::join_all(sleeps), watch);
    for answer in answers {
        answer.expect("every client is served, in turn");
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_shares_its_server_connections() {
    let env = start(EnvOptions {
        client_auth: "trust",
        pool_extra: vec!["max_fleet_server_connections = 4".into()],
        ..Default::default()
    })
    .await;
    let (port_a, port_b) = (free_port(), free_port());
    let a = instance(&env, (1, port_a), (2, port_b)).await;
    let b = instance(&env, (2, port_b), (1, port_a)).await;
    let counted = |relay: &Pgrelay, n: usize| {
        let pools = relay.shared.pools.clone();
        async move {
            eventually(10 * SECOND, || async {
                pools
                    .fleet_instances
                    .load(std::sync::atomic::Ordering::Relaxed)
                    == n
                    && pools.limits().node_max() == 4 / n
            })
            .await
        }
    };
    assert!(counted(&a, 2).await, "A counts two instances");
    assert_eq!(busiest(&a, 6).await, 2, "A's share with B alive");

    b.shutdown(SECOND).await;
    assert!(counted(&a, 1).await, "A counts itself alone");
    assert_eq!(busiest(&a, 6).await, 4, "the whole of it with B gone");
}
