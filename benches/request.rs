//! Criterion benchmark of one whole request through pgrelay: the request in, a server
//! checked out of the pool, the relay both ways, the server released. It runs the real
//! login, session, pool and relay in transaction mode, over in-memory pipes
//! (`pgrelay::benching`), all on one current-thread runtime, so a regression shows
//! without PostgreSQL and without the kernel's noise.
//!
//! The server is a fake that answers pgbench's `-S` queries from pre-encoded bytes, to
//! measure the proxy's own capacity; it stands in for PostgreSQL nowhere else. Each
//! figure is the time per request (per statement for the pipelined batch); `direct`
//! runs the same client against the fake server with nothing between them, so the
//! difference is pgrelay's share.
//!
//! `cargo bench --bench request`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;

use pgrelay::config::Config;
use pgrelay::protocol::backend::{self, oid, TxStatus};
use pgrelay::protocol::startup::{self, StartupPacket};
use pgrelay::protocol::{split_frame, MAX_MESSAGE_LEN};
use pgrelay::Shared;

/// Bytes an in-memory pipe holds each way (pgrelay's own server pipes hold as much).
const PIPE: usize = 64 * 1024;

/// Statements a pipelined batch sends in one write. pgrelay keeps the server while
/// their answers are owed, so a batch is one checkout and release, ten statements
/// relayed.
const BATCH: usize = 10;

/// pgbench's `-S` statement, as `-M simple` sends it.
const SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;";

/// pgbench's `-S` statement with its parameter, as `-M extended` and `prepared` send it.
const SELECT_PARAM: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

/// The name pgbench gives its prepared statement.
const STATEMENT: &str = "P0_1";

/// pgrelay in transaction mode with trust logins, one backend and a pool of one, so
/// every request checks out and releases the same server. The backend's address is
/// never dialled: the pool's servers come through in-memory pipes.
const CONFIG: &str = r#"
listen = ["127.0.0.1:0"]
metrics_listen = ""
auth_type = "trust"

[pool]
mode = "transaction"
default_pool_size = 1

[[backends]]
host = "127.0.0.1"
port = 5432

[[users]]
name = "bench"
password = "unused"
"#;

fn msg(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_u32(body.len() as u32 + 4);
    buf.put_slice(body);
}

fn cstr(buf: &mut Vec<u8>, text: &str) {
    buf.extend_from_slice(text.as_bytes());
    buf.push(0);
}

fn startup_message() -> BytesMut {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608_i32.to_be_bytes());
    // No application_name, unlike pgbench: pgrelay would set it on the server with a
    // query of its own, which the fake server does not answer.
    for text in ["user", "bench", "database", "bench"] {
        cstr(&mut body, text);
    }
    body.push(0);
    let mut buf = BytesMut::new();
    buf.put_u32(body.len() as u32 + 4);
    buf.put_slice(&body);
    buf
}

fn query(buf: &mut BytesMut, sql: &str) {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    msg(buf, b'Q', &body);
}

fn parse(buf: &mut BytesMut, name: &str) {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, SELECT_PARAM);
    body.extend_from_slice(&0_i16.to_be_bytes());
    msg(buf, b'P', &body);
}

/// Bind (text parameter `12345`, text results), Describe portal, Execute, Sync: what
/// libpq sends after a Parse for `PQexecParams` and alone for `PQexecPrepared`.
fn bind_execute(buf: &mut BytesMut, statement: &str) {
    let mut body = Vec::new();
    cstr(&mut body, "");
    cstr(&mut body, statement);
    body.extend_from_slice(&0_i16.to_be_bytes());
    body.extend_from_slice(&1_i16.to_be_bytes());
    body.extend_from_slice(&5_i32.to_be_bytes());
    body.extend_from_slice(b"12345");
    body.extend_from_slice(&1_i16.to_be_bytes());
    body.extend_from_slice(&0_i16.to_be_bytes());
    msg(buf, b'B', &body);
    msg(buf, b'D', b"P\0");
    msg(buf, b'E', b"\0\0\0\0\0");
    msg(buf, b'S', b"");
}

const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
const BIND_COMPLETE: &[u8] = b"2\0\0\0\x04";
const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// Everything the fake server and the clients send, encoded once.
struct Encoded {
    login: BytesMut,
    /// DataRow and CommandComplete.
    rows: BytesMut,
    row_description: BytesMut,
    parameter_description: BytesMut,
    ready: BytesMut,
    simple: BytesMut,
    simple_answer: BytesMut,
    extended: BytesMut,
    prepared: BytesMut,
    extended_answer: BytesMut,
    /// `-M prepared`'s Parse of its statement, and a Sync.
    prepare: BytesMut,
}

/// What PostgreSQL sends a client it logs in: AuthenticationOk, the parameters it
/// reports, BackendKeyData and ReadyForQuery.
fn login_answer() -> BytesMut {
    let mut login = BytesMut::new();
    backend::auth_ok(&mut login);
    for (name, value) in [
        ("application_name", ""),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("default_transaction_read_only", "off"),
        ("in_hot_standby", "off"),
        ("integer_datetimes", "on"),
        ("IntervalStyle", "postgres"),
        ("is_superuser", "off"),
        ("server_encoding", "UTF8"),
        ("server_version", "15.8"),
        ("session_authorization", "bench"),
        ("standard_conforming_strings", "on"),
        ("TimeZone", "UTC"),
    ] {
        backend::parameter_status_msg(&mut login, name, value);
    }
    backend::backend_key_data(&mut login, 4242, &1_234_567_i32.to_be_bytes());
    backend::ready_for_query(&mut login, TxStatus::Idle);
    login
}

impl Encoded {
    fn new() -> Encoded {
        let mut row_description = BytesMut::new();
        backend::row_description(&mut row_description, &[("abalance", oid::INT4)]);
        let mut rows = BytesMut::new();
        backend::data_row(&mut rows, &[Some("0")]);
        backend::command_complete(&mut rows, "SELECT 1");
        let mut ready = BytesMut::new();
        backend::ready_for_query(&mut ready, TxStatus::Idle);
        let mut parameter_description = BytesMut::new();
        backend::parameter_description(&mut parameter_description, &[oid::INT4]);

        let mut simple = BytesMut::new();
        query(&mut simple, SELECT);
        let mut simple_answer = BytesMut::new();
        for part in [&row_description, &rows, &ready] {
            simple_answer.put_slice(part);
        }

        let mut extended = BytesMut::new();
        parse(&mut extended, "");
        bind_execute(&mut extended, "");
        let mut prepared = BytesMut::new();
        bind_execute(&mut prepared, STATEMENT);
        let mut extended_answer = BytesMut::new();
        for part in [
            PARSE_COMPLETE,
            BIND_COMPLETE,
            &row_description,
            &rows,
            &ready,
        ] {
            extended_answer.put_slice(part);
        }
        let mut prepare = BytesMut::new();
        parse(&mut prepare, STATEMENT);
        msg(&mut prepare, b'S', b"");

        Encoded {
            login: login_answer(),
            rows,
            row_description,
            parameter_description,
            ready,
            simple,
            simple_answer,
            extended,
            prepared,
            extended_answer,
            prepare,
        }
    }

    /// `-M prepared`: no Parse, so the extended answer without its ParseComplete.
    fn prepared_answer(&self) -> &[u8] {
        &self.extended_answer[PARSE_COMPLETE.len()..]
    }
}

/// A fake PostgreSQL server on one pipe: it logs anyone in and answers pgbench's `-S`
/// statement, in the simple and the extended protocol, from pre-encoded bytes. What
/// it cannot answer, it refuses loudly: the benchmark must not measure something else.
async fn fake_server(mut pipe: DuplexStream, bytes: &'static Encoded) {
    let mut rbuf = BytesMut::with_capacity(PIPE);
    let mut out = BytesMut::with_capacity(PIPE);
    loop {
        match startup::decode(&mut rbuf) {
            Ok(Some(StartupPacket::Startup(_))) => break,
            Ok(None) => {}
            other => panic!("fake server: not a StartupMessage: {other:?}"),
        }
        if pipe.read_buf(&mut rbuf).await.unwrap_or(0) == 0 {
            return;
        }
    }
    if pipe.write_all(&bytes.login).await.is_err() {
        return;
    }
    let simple = &bytes.simple[5..];
    loop {
        while let Some(frame) = split_frame(&mut rbuf, MAX_MESSAGE_LEN).expect("a frame") {
            let answer: &[&[u8]] = match frame.tag() {
                b'Q' if frame.body() == simple => &[&bytes.simple_answer],
                b'Q' => panic!("fake server: only pgbench -S, not {:?}", frame.body()),
                b'P' if frame.body().ends_with(b"= $1;\0\0\0") => &[PARSE_COMPLETE],
                b'P' => panic!("fake server: only pgbench -S, not {:?}", frame.body()),
                b'B' => &[BIND_COMPLETE],
                b'D' if frame.body().first() == Some(&b'S') => {
                    &[&bytes.parameter_description, &bytes.row_description]
                }
                b'D' => &[&bytes.row_description],
                b'E' => &[&bytes.rows],
                b'S' => &[&bytes.ready],
                b'C' => &[CLOSE_COMPLETE],
                b'H' => &[],
                b'X' => return,
                tag => panic!("fake server: unexpected {:?}", tag as char),
            };
            for part in answer {
                out.put_slice(part);
            }
        }
        if !out.is_empty() {
            if pipe.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if pipe.read_buf(&mut rbuf).await.unwrap_or(0) == 0 {
            return;
        }
    }
}

/// A pgbench-like client on one pipe.
struct Client {
    pipe: DuplexStream,
    rbuf: Vec<u8>,
}

impl Client {
    /// Logs in through pgrelay.
    async fn through(shared: &std::sync::Arc<Shared>) -> Client {
        let (near, far) = tokio::io::duplex(PIPE);
        tokio::spawn(pgrelay::benching::serve_client(shared.clone(), far));
        Client::log_in(near).await
    }

    /// Logs in to a fake server of its own, with nothing between them.
    async fn direct(bytes: &'static Encoded) -> Client {
        let (near, far) = tokio::io::duplex(PIPE);
        tokio::spawn(fake_server(far, bytes));
        Client::log_in(near).await
    }

    async fn log_in(pipe: DuplexStream) -> Client {
        let mut client = Client {
            pipe,
            rbuf: vec![0; PIPE],
        };
        client.send_until_ready(&startup_message()).await;
        client
    }

    /// Sends `request` and reads frames up to ReadyForQuery: logins and preparing.
    async fn send_until_ready(&mut self, request: &[u8]) {
        self.pipe.write_all(request).await.expect("write");
        let mut buf = BytesMut::new();
        loop {
            while let Some(frame) = split_frame(&mut buf, MAX_MESSAGE_LEN).expect("a frame") {
                match frame.tag() {
                    b'E' => panic!("refused: {:?}", backend::error_fields(frame.body())),
                    b'Z' => return,
                    _ => {}
                }
            }
            let n = self.pipe.read_buf(&mut buf).await.expect("read");
            assert!(n > 0, "closed before ReadyForQuery");
        }
    }

    /// One request and its whole answer, `len` bytes long.
    async fn round_trip(&mut self, request: &[u8], len: usize) {
        self.pipe.write_all(request).await.expect("write");
        self.pipe
            .read_exact(&mut self.rbuf[..len])
            .await
            .expect("read");
    }

    /// A round trip whose answer must be `answer`, byte for byte: the request went
    /// where it should, and the answer came back untouched.
    async fn check(&mut self, request: &[u8], answer: &[u8]) {
        self.round_trip(request, answer.len()).await;
        assert_eq!(&self.rbuf[..answer.len()], answer, "unexpected answer");
    }
}

/// Times `iters` round trips of `request` (its answer `answer`), after checking one,
/// and returns the time per request: `per` requests make one round trip.
fn timed(
    runtime: &Runtime,
    client: &mut Client,
    (request, answer): (&[u8], &[u8]),
    per: u32,
    iters: u64,
) -> Duration {
    runtime.block_on(async {
        client.check(request, answer).await;
        let started = Instant::now();
        for _ in 0..iters {
            client.round_trip(request, answer.len()).await;
        }
        started.elapsed() / per
    })
}

/// Servers the pool opened: the fake server's logins.
static OPENED: AtomicUsize = AtomicUsize::new(0);

/// Between requests the pool's one server is back in it, and no other was ever opened:
/// what was timed was a checkout and a release per request, not a server held by the
/// session, nor one discarded and opened again.
fn assert_released(runtime: &Runtime, shared: &Shared) {
    // The session releases right after it writes the answer's last byte: let it run.
    runtime.block_on(tokio::task::yield_now());
    let counts: Vec<_> = shared.pools.all().iter().map(|p| p.counts()).collect();
    assert_eq!(counts, [(1, 1, 0)], "(idle, total, waiting) of each pool");
    assert_eq!(OPENED.load(Ordering::Relaxed), 1, "servers opened");
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let bytes: &'static Encoded = Box::leak(Box::new(Encoded::new()));
    let config = Config::from_toml_str(CONFIG).expect("the benchmark's config");
    let shared = runtime.block_on(async {
        let (shared, mut servers) = pgrelay::benching::in_memory(config);
        tokio::spawn(async move {
            while let Some(pipe) = servers.recv().await {
                OPENED.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(fake_server(pipe, bytes));
            }
        });
        shared
    });
    let simple = (&bytes.simple[..], &bytes.simple_answer[..]);
    let extended = (&bytes.extended[..], &bytes.extended_answer[..]);
    let prepared = (&bytes.prepared[..], bytes.prepared_answer());
    let batch = (
        bytes.simple.repeat(BATCH),
        bytes.simple_answer.repeat(BATCH),
    );

    let mut group = c.benchmark_group("request");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let mut client = runtime.block_on(Client::through(&shared));
    group.bench_function("simple -S", |b| {
        b.iter_custom(|iters| timed(&runtime, &mut client, simple, 1, iters))
    });
    assert_released(&runtime, &shared);
    group.bench_function("extended -S", |b| {
        b.iter_custom(|iters| timed(&runtime, &mut client, extended, 1, iters))
    });
    assert_released(&runtime, &shared);
    runtime.block_on(client.send_until_ready(&bytes.prepare));
    group.bench_function("prepared -S", |b| {
        b.iter_custom(|iters| timed(&runtime, &mut client, prepared, 1, iters))
    });
    assert_released(&runtime, &shared);
    let batch = (&batch.0[..], &batch.1[..]);
    group.bench_function("simple -S, 10 pipelined (per statement)", |b| {
        b.iter_custom(|iters| timed(&runtime, &mut client, batch, BATCH as u32, iters))
    });
    assert_released(&runtime, &shared);
    let mut direct = runtime.block_on(Client::direct(bytes));
    group.bench_function("direct simple -S (no pgrelay)", |b| {
        b.iter_custom(|iters| timed(&runtime, &mut direct, simple, 1, iters))
    });
    group.bench_function("direct extended -S (no pgrelay)", |b| {
        b.iter_custom(|iters| timed(&runtime, &mut direct, extended, 1, iters))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
