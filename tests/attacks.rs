//! Attacks on a running pgrelay while real clients work through it (issue 15, "hostile
//! input"): 1,000 slowloris sockets trickling a startup packet, 10,000 silent sockets,
//! a crowd sending garbage before and after login, clients that send a huge request
//! and never read, and clients that vanish in the middle of COPY, a pipeline or a large
//! result. During each, pgbench (8 clients, select-only) runs through the same pgrelay:
//! it must finish with 0 failed transactions and an average latency within 2x of the
//! same run just before the attack; pgrelay's peak resident set must stay under a bound
//! stated per attack; nothing may panic; no server may be left behind; and a fresh
//! client must log in afterwards.
//!
//! pgrelay runs here as its own process (the built binary, a config file in a temp
//! dir): its memory is read from `/proc/<pid>/status` (VmRSS, and VmHWM for the peak,
//! reset before each attack), its open descriptors from `/proc/<pid>/fd`, and its
//! stderr, kept in a file, is searched for panics. Clients log in with `trust`: the
//! attackers' raw logins need no SCRAM, and pgrelay still logs in to PostgreSQL with
//! SCRAM. The tests take the machine's cores, so they run one at a time.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use pgrelay::demo::LocalCluster;
use support::process::RelayProcess;
use support::raw::{self, Message};
use support::{config_text, connect_str, eventually, EnvOptions, APP_DB, APP_PASSWORD, APP_USER};

/// Each test wants both cores for pgbench, PostgreSQL, pgrelay and the attackers; two
/// at once would measure each other. (tokio's Mutex works across the tests' runtimes.)
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Servers per pool: pgbench's 8 clients plus the attackers that hold a server.
const POOL_SIZE: u32 = 16;
/// Length of each measured pgbench run; the same with and without the attack.
const BENCH_SECONDS: u32 = 6;
/// Latency under attack may be at most this many times the baseline's.
const LATENCY_FACTOR: f64 = 2.0;
/// One MiB, in the KiB that `/proc/<pid>/status` counts in.
const MIB: u64 = 1024;

// ---------------------------------------------------------------------------------
// pgrelay as a process, and the cluster behind it
// ---------------------------------------------------------------------------------

/// The pgrelay binary running against the test cluster; stopped (SIGTERM, then
/// SIGKILL) when dropped.
struct Relay {
    process: RelayProcess,
    addr: SocketAddr,
    /// Holds the config file and the log.
    _dir: tempfile::TempDir,
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    /// The peak since start or since the last [`Relay::reset_peak`].
    peak: u64,
}

impl Relay {
    /// Starts pgrelay in front of `ports` (primary first) and waits until it listens.
    /// `max_client_conn` is set above the 10,000 silent sockets plus pgbench: pgrelay
    /// counts a socket from its accept, before any login (as PgBouncer does, and as
    /// PostgreSQL counts a backend before authentication), so with the default of
    /// 10,000 those sockets would have pgbench told 53300 "sorry, too many clients
    /// already" until `client_login_timeout` (60 s) closed them.
    fn spawn(ports: &[u16]) -> Relay {
        let options = EnvOptions {
            client_auth: "trust",
            pool_size: POOL_SIZE,
            pool_extra: vec![
                "max_client_conn = 20000".into(),
                "shutdown_timeout = \"1s\"".into(),
            ],
            ..EnvOptions::default()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("pgrelay.toml");
        std::fs::write(&config, config_text(&options, ports)).expect("write config");
        let mut process = RelayProcess::spawn(&config, dir.path().join("pgrelay.log"), &[]);
        let addr = process.addr();
        Relay {
            process,
            addr,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn log_text(&self) -> String {
        self.process.log_text()
    }

    fn memory(&self) -> Memory {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read pgrelay's /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status"))
        };
        Memory {
            rss: field("VmRSS:"),
            peak: field("VmHWM:"),
        }
    }

    /// Sets pgrelay's peak resident set back to its current one (Linux 4.0 on).
    fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5")
            .expect("reset pgrelay's VmHWM");
    }

    /// File descriptors pgrelay has open: its listener, clients and servers.
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read pgrelay's fds")
            .count()
    }

    /// No panic in pgrelay's output, and pgrelay still running (not even a zombie).
    fn assert_no_panic(&self) {
        let text = self.log_text();
        let panics: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("panicked"))
            .collect();
        assert!(panics.is_empty(), "pgrelay panicked: {panics:?}");
        let running = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .is_ok_and(|stat| !stat.contains(") Z "));
        assert!(running, "pgrelay has exited:\n{text}");
    }
}

/// PostgreSQL and pgrelay in front of it, pgbench's tables loaded.
struct Target {
    /// First, so pgrelay stops before PostgreSQL.
    relay: Relay,
    cluster: LocalCluster,
}

impl Target {
    async fn start() -> Target {
        raise_fd_limit();
        let cluster = support::app_cluster(0).await;
        // Waits for pgrelay's "listening" line in its log with short sleeps.
        let relay = tokio::task::block_in_place(|| Relay::spawn(&cluster.ports()));
        let port = relay.addr.port();
        tokio::task::spawn_blocking(move || {
            pgbench(port, &["-i", "-s", "1", "-q"]);
            // Warm-up: the pool's servers are logged in before anything is measured.
            pgbench(port, &["-n", "-S", "-c", "8", "-j", "2", "-T", "1"]);
        })
        .await
        .expect("pgbench task");
        Target { relay, cluster }
    }

    fn addr(&self) -> SocketAddr {
        self.relay.addr
    }

    /// The superuser, straight to PostgreSQL (behind pgrelay's back).
    async fn direct(&self) -> tokio_postgres::Client {
        connect_str(&format!(
            "host=127.0.0.1 port={} user={} dbname={APP_DB}",
            self.cluster.primary_port(),
            self.cluster.superuser()
        ))
        .await
        .expect("direct connection")
    }

    /// A new client through pgrelay; it must log in and query within 10 s.
    async fn assert_fresh_login(&self) {
        let conn = format!(
            "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB} \
             connect_timeout=10",
            self.addr().port()
        );
        let check = async {
            let client = connect_str(&conn).await.expect("a fresh login");
            client
                .simple_query("SELECT 1")
                .await
                .expect("a fresh client's query");
        };
        tokio::time::timeout(Duration::from_secs(10), check)
            .await
            .expect("a fresh client logged in and queried in time");
    }
}

/// The test process and pgrelay (which inherits it) get the hard limit of open files:
/// 10,000 sockets on each side.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");
    }
}

/// The number of silent sockets the open-file limit allows: 10,000, or less on a
/// machine whose hard limit is lower (each side needs one descriptor per socket).
fn silent_sockets() -> usize {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    10_000.min(
        usize::try_from(soft)
            .unwrap_or(usize::MAX)
            .saturating_sub(500),
    )
}

// ---------------------------------------------------------------------------------
// pgbench, and one measured attack
// ---------------------------------------------------------------------------------

/// Runs pgbench through pgrelay; returns stdout, panicking with its output if it fails.
fn pgbench(port: u16, args: &[&str]) -> String {
    let out = Command::new(support::needs::program("pgbench"))
        .env("PGPASSWORD", APP_PASSWORD)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", APP_USER])
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

/// What one pgbench run reports.
#[derive(Debug, Clone, Copy)]
struct Bench {
    tps: f64,
    latency_ms: f64,
    processed: u64,
    failed: u64,
}

/// 8 clients on 2 threads, select-only, for [`BENCH_SECONDS`].
async fn bench(port: u16) -> Bench {
    let stdout = tokio::task::spawn_blocking(move || {
        let seconds = BENCH_SECONDS.to_string();
        pgbench(port, &["-n", "-S", "-c", "8", "-j", "2", "-T", &seconds])
    })
    .await
    .expect("pgbench task");
    let after = |prefix: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split([' ', '/']).next())
            .unwrap_or_else(|| panic!("no `{prefix}` in pgbench's output:\n{stdout}"))
            .to_owned()
    };
    let number = |prefix: &str| -> f64 {
        after(prefix)
            .parse()
            .unwrap_or_else(|_| panic!("`{prefix}` is no number:\n{stdout}"))
    };
    Bench {
        tps: number("tps = "),
        latency_ms: number("latency average = "),
        processed: number("number of transactions actually processed: ") as u64,
        failed: number("number of failed transactions: ") as u64,
    }
}

/// An attack under way, with the pgbench runs before and during it.
struct Attacked<T> {
    name: &'static str,
    baseline: Bench,
    attacked: Bench,
    before: Memory,
    during: Memory,
    /// The most pgrelay's peak resident set grew in any attempt, in KiB.
    growth: u64,
    fds_before: usize,
    fds_during: usize,
    /// Earlier attempts whose attacked run was over [`LATENCY_FACTOR`], as reported.
    earlier: Vec<String>,
    stop: CancellationToken,
    attack: JoinHandle<T>,
}

/// Attempts at a pair of measurements (baseline, then under attack). The machine is
/// shared (CI runners, other builds): a burst of someone else's work during the
/// attacked run can double its latency by itself. Such a run is measured again, with
/// a new baseline and a new attack; every attempt must still have 0 failed
/// transactions and is reported, and the last one is held to the full bound.
const ATTEMPTS: usize = 3;

/// Measures a baseline pgbench run (the better of two), starts the attack (`start`
/// returns once it is going, with the task that ends when its token is cancelled), and
/// runs pgbench again while it goes; again, up to [`ATTEMPTS`] times, while the
/// attacked run is over [`LATENCY_FACTOR`] of its baseline. The attack is still going
/// on return: [`Attacked::end`] stops it and checks the figures.
async fn under_attack<T, Fut>(
    target: &Target,
    name: &'static str,
    mut start: impl FnMut(CancellationToken) -> Fut,
) -> Attacked<T>
where
    Fut: std::future::Future<Output = JoinHandle<T>>,
{
    let port = target.addr().port();
    let mut earlier = Vec::new();
    let mut growth = 0;
    loop {
        // The better of two: a slow baseline would excuse a slow attacked run.
        let (first, second) = (bench(port).await, bench(port).await);
        for run in [first, second] {
            assert_eq!(run.failed, 0, "{name}: baseline {run:?}");
        }
        let baseline = if first.latency_ms <= second.latency_ms {
            first
        } else {
            second
        };
        let fds_before = target.relay.open_fds();
        let before = target.relay.memory();
        target.relay.reset_peak();
        let stop = CancellationToken::new();
        let attack = start(stop.clone()).await;
        let attacked = bench(port).await;
        let during = target.relay.memory();
        growth = growth.max(during.peak.saturating_sub(before.rss));
        let measured = Attacked {
            name,
            baseline,
            attacked,
            before,
            during,
            growth,
            fds_before,
            fds_during: target.relay.open_fds(),
            earlier: Vec::new(),
            stop,
            attack,
        };
        assert_eq!(attacked.failed, 0, "{name}: under attack {attacked:?}");
        let within = attacked.latency_ms <= LATENCY_FACTOR * baseline.latency_ms;
        if within || earlier.len() + 1 == ATTEMPTS {
            return Attacked {
                earlier,
                ..measured
            };
        }
        let report = measured.figures();
        eprintln!("{report}: over {LATENCY_FACTOR}x, measuring again");
        earlier.push(report);
        measured.stop.cancel();
        measured.attack.await.expect("attack task");
        let settled = eventually(Duration::from_secs(10), || async {
            target.relay.open_fds() <= fds_before + 4
        })
        .await;
        assert!(settled, "{name}: pgrelay still holds the attack's sockets");
    }
}

impl<T> Attacked<T> {
    /// The figures of this attempt, for the test's output.
    fn figures(&self) -> String {
        let (baseline, attacked) = (&self.baseline, &self.attacked);
        format!(
            "{}: baseline {:.0} tps, {:.3} ms, {} failed | attacked {:.0} tps, {:.3} ms, \
             {} failed | pgrelay rss {} KiB before, peak {} KiB during (+{} KiB), \
             fds {} before, {} during",
            self.name,
            baseline.tps,
            baseline.latency_ms,
            baseline.failed,
            attacked.tps,
            attacked.latency_ms,
            attacked.failed,
            self.before.rss,
            self.during.peak,
            self.during.peak.saturating_sub(self.before.rss),
            self.fds_before,
            self.fds_during
        )
    }

    /// Stops the attack and checks that pgbench was unharmed, that pgrelay's peak
    /// memory grew by at most `bound_mib`, that it closed what the attackers left
    /// (its descriptors are back to about where they were) and left no server busy,
    /// that it never panicked and that a new client logs in. Returns what the attack
    /// counted.
    async fn end(self, target: &Target, bound_mib: u64) -> T {
        eprintln!("{}", self.figures());
        let Attacked {
            name,
            baseline,
            attacked,
            growth,
            fds_before,
            earlier,
            stop,
            attack,
            ..
        } = self;
        stop.cancel();
        let counted = attack.await.expect("attack task");
        assert!(attacked.processed > 0, "{name}: {attacked:?}");
        assert!(
            attacked.latency_ms <= LATENCY_FACTOR * baseline.latency_ms,
            "{name}: latency {:.3} ms under attack, {:.3} ms without (earlier attempts: \
             {earlier:?})",
            attacked.latency_ms,
            baseline.latency_ms
        );
        assert!(
            growth <= bound_mib * MIB,
            "{name}: pgrelay's peak resident set grew by up to {growth} KiB (bound {bound_mib} MiB)"
        );
        let relay = &target.relay;
        // Servers come and go with the pool; a few descriptors of slack for them.
        let closed = eventually(Duration::from_secs(10), || async {
            relay.open_fds() <= fds_before + 4
        })
        .await;
        assert!(
            closed,
            "{name}: pgrelay holds {} descriptors after the attack, {fds_before} before",
            relay.open_fds()
        );
        assert_servers_settled(target, name).await;
        relay.assert_no_panic();
        target.assert_fresh_login().await;
        counted
    }
}

/// Runs `work` in `count` tasks until `stop`, and joins them.
fn spawn_crowd<F, Fut>(count: usize, stop: &CancellationToken, work: F) -> JoinHandle<()>
where
    F: Fn(usize, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<JoinHandle<()>> = (0..count)
        .map(|i| tokio::spawn(work(i, stop.clone())))
        .collect();
    tokio::spawn(async move {
        for result in join_all(tasks).await {
            result.expect("attacker task");
        }
    })
}

/// Sleeps `pause`, or returns false at once when `stop` is cancelled.
async fn pause(stop: &CancellationToken, pause: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// Counts PostgreSQL backends of the app user (pgrelay's servers) matching `filter`.
async fn servers(admin: &tokio_postgres::Client, filter: &str) -> i64 {
    admin
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{APP_USER}' AND {filter}"
            ),
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// After an attack, within 10 s, every server of pgrelay is idle (none running a
/// query or left in a transaction) and there are no more of them than the pool allows.
async fn assert_servers_settled(target: &Target, name: &str) {
    let admin = target.direct().await;
    let settled = eventually(Duration::from_secs(10), || async {
        servers(&admin, "state <> 'idle'").await == 0
    })
    .await;
    let busy = admin
        .query(
            "SELECT state, left(query, 80) FROM pg_stat_activity \
             WHERE usename = $1 AND state <> 'idle'",
            &[&APP_USER],
        )
        .await
        .expect("pg_stat_activity");
    let busy: Vec<(Option<String>, Option<String>)> =
        busy.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert!(settled, "{name}: servers left busy: {busy:?}");
    let total = servers(&admin, "true").await;
    assert!(
        total <= i64::from(POOL_SIZE),
        "{name}: {total} servers for a pool of {POOL_SIZE}"
    );
}

// ---------------------------------------------------------------------------------
// 1. Slowloris: 1,000 sockets trickling a startup packet
// ---------------------------------------------------------------------------------

const SLOWLORIS: usize = 1_000;
/// Each slowloris socket sends one byte of its startup packet this often; a packet of
/// about 160 bytes takes 16 s, longer than the attack.
const TRICKLE: Duration = Duration::from_millis(100);

/// What the slowloris sockets did.
#[derive(Default, Debug)]
struct Trickled {
    connects: AtomicU64,
    bytes: AtomicU64,
    /// Sockets pgrelay closed before their packet was complete.
    cut_off: AtomicU64,
    /// Packets sent whole (each then logs in, and the socket starts over).
    finished: AtomicU64,
}

async fn slowloris(addr: SocketAddr, stop: CancellationToken) -> JoinHandle<Arc<Trickled>> {
    let counts = Arc::new(Trickled::default());
    let crowd = spawn_crowd(SLOWLORIS, &stop, |i, stop| {
        trickle(addr, i, stop, counts.clone())
    });
    // Every socket connected and trickling before pgbench starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::spawn(async move {
        crowd.await.expect("slowloris");
        counts
    })
}

/// One slowloris socket: a byte of a valid startup packet every [`TRICKLE`], over and
/// over on a new connection if pgrelay closes this one.
async fn trickle(addr: SocketAddr, i: usize, stop: CancellationToken, counts: Arc<Trickled>) {
    let name = format!("slowloris-{i}-{}", "x".repeat(100));
    let packet = raw::startup_message(&[
        ("user", APP_USER),
        ("database", APP_DB),
        ("application_name", &name),
    ]);
    // The sockets' bytes spread over the interval rather than arriving in bursts.
    if !pause(&stop, TRICKLE * (i % 100) as u32 / 100).await {
        return;
    }
    'connect: loop {
        let mut stream = TcpStream::connect(addr).await.expect("slowloris connect");
        counts.connects.fetch_add(1, Ordering::Relaxed);
        for &byte in &packet {
            if !pause(&stop, TRICKLE).await {
                return;
            }
            if stream.write_all(&[byte]).await.is_err() {
                counts.cut_off.fetch_add(1, Ordering::Relaxed);
                continue 'connect;
            }
            counts.bytes.fetch_add(1, Ordering::Relaxed);
        }
        counts.finished.fetch_add(1, Ordering::Relaxed);
    }
}

/// 1,000 sockets each trickling a startup packet a byte every 100 ms, from before
/// pgbench starts to after it ends: pgbench is unharmed, and pgrelay holds them all
/// in at most 32 MiB more (about 32 KiB a socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_startup_packets() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let target = Target::start().await;
    let addr = target.addr();
    let attacked = under_attack(&target, "slowloris", |stop| slowloris(addr, stop)).await;
    let (fds_before, fds_during) = (attacked.fds_before, attacked.fds_during);
    let counts = attacked.end(&target, 32).await;
    eprintln!("slowloris: {counts:?}");
    assert!(
        fds_during >= fds_before + SLOWLORIS * 95 / 100,
        "pgrelay held {fds_during} descriptors under attack, {fds_before} before"
    );
    // About 10 bytes a second from each socket, for more than BENCH_SECONDS.
    let bytes = counts.bytes.load(Ordering::Relaxed);
    assert!(
        bytes >= (SLOWLORIS as u64) * u64::from(BENCH_SECONDS) * 5,
        "only {bytes} bytes trickled"
    );
}

// ---------------------------------------------------------------------------------
// 2. 10,000 silent sockets
// ---------------------------------------------------------------------------------

/// Connects `count` sockets that send nothing, and returns once pgrelay has accepted
/// them all; the task returns how many pgrelay still had open when `stop` came.
async fn silent(target: &Target, count: usize, stop: CancellationToken) -> JoinHandle<usize> {
    let addr = target.addr();
    let fds = target.relay.open_fds();
    let mut sockets = Vec::with_capacity(count);
    let mut left = count;
    while left > 0 {
        let batch = left.min(500);
        for socket in join_all((0..batch).map(|_| TcpStream::connect(addr))).await {
            sockets.push(socket.expect("connect a silent socket"));
        }
        left -= batch;
    }
    let accepted = eventually(Duration::from_secs(30), || async {
        target.relay.open_fds() >= fds + count
    })
    .await;
    assert!(
        accepted,
        "pgrelay accepted only {} of {count} sockets",
        target.relay.open_fds().saturating_sub(fds)
    );
    tokio::spawn(async move {
        stop.cancelled().await;
        // A socket pgrelay closed reads end-of-file; a silent one that is open blocks.
        let mut byte = [0u8; 1];
        sockets
            .iter()
            .filter(|socket| {
                matches!(socket.try_read(&mut byte),
                    Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    })
}

/// 10,000 sockets (or what the open-file limit allows) connect and send nothing, all
/// through pgbench's run: pgbench is unharmed and pgrelay holds them in at most
/// 96 MiB more (under 10 KiB a socket), until client_login_timeout (60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_silent_sockets() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let target = Target::start().await;
    let count = silent_sockets();
    eprintln!("silent sockets: {count}");
    let attacked = under_attack(&target, "silent sockets", |stop| {
        silent(&target, count, stop)
    })
    .await;
    let held = attacked.end(&target, 96).await;
    eprintln!("silent sockets: {held} of {count} still open at the end");
    assert_eq!(
        held, count,
        "pgrelay closed silent sockets within the login timeout"
    );
}

// ---------------------------------------------------------------------------------
// 3. Garbage before and after login, from a crowd
// ---------------------------------------------------------------------------------

/// Garbage senders at once; each pauses [`GARBAGE_PAUSE`] between connections.
const GARBAGE_SENDERS: usize = 16;
const GARBAGE_PAUSE: Duration = Duration::from_millis(20);

/// One piece of garbage: what it is, whether it follows a login, its bytes, and the
/// SQLSTATE pgrelay must answer it with (else an error with any SQLSTATE, or a close).
struct Garbage {
    what: &'static str,
    after_login: bool,
    bytes: Vec<u8>,
    expected: Option<&'static str>,
}

fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.gen_range(1..512);
    (0..len).map(|_| rng.gen()).collect()
}

/// Cut somewhere strictly inside `whole`.
fn truncated(rng: &mut StdRng, whole: &[u8]) -> Vec<u8> {
    whole[..rng.gen_range(1..whole.len())].to_vec()
}

fn garbage(rng: &mut StdRng) -> Garbage {
    let startup = raw::startup_message(&[("user", APP_USER), ("database", APP_DB)]);
    let (what, after_login, bytes, expected): (_, _, Vec<u8>, _) = match rng.gen_range(0..10) {
        0 => (
            "a truncated startup packet",
            false,
            truncated(rng, &startup),
            None,
        ),
        1 => (
            "a startup length of 100000",
            false,
            vec![0, 1, 0x86, 0xa0, 0, 3, 0, 0],
            None,
        ),
        2 => (
            "a startup length of 2^31-1",
            false,
            vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0],
            None,
        ),
        3 => ("a startup length of 3", false, vec![0, 0, 0, 3], None),
        4 => ("random bytes before login", false, random_bytes(rng), None),
        5 => (
            "an unknown message type",
            true,
            raw::message(b'z', &[]),
            Some("08P01"),
        ),
        6 => (
            "a message length of 2^31-1",
            true,
            vec![b'Q', 0x7f, 0xff, 0xff, 0xff],
            Some("08P01"),
        ),
        7 => (
            "a message length of 3",
            true,
            vec![b'Q', 0, 0, 0, 3],
            Some("08P01"),
        ),
        8 => (
            "a truncated Query",
            true,
            truncated(rng, &raw::query("SELECT 1")),
            None,
        ),
        _ => ("random bytes after login", true, random_bytes(rng), None),
    };
    Garbage {
        what,
        after_login,
        bytes,
        expected,
    }
}

/// What pgrelay answered the garbage with.
#[derive(Default, Debug)]
struct Answers {
    sent: BTreeMap<&'static str, u64>,
    /// SQLSTATEs of the ErrorResponses seen.
    sqlstates: BTreeMap<String, u64>,
    /// Closes without an ErrorResponse.
    closes: u64,
    /// Answers that were neither a clean close nor well-formed errors (at most 10 kept).
    wrong: Vec<String>,
    wrong_count: u64,
}

impl Answers {
    fn wrong(&mut self, what: &str, problem: String) {
        self.wrong_count += 1;
        if self.wrong.len() < 10 {
            self.wrong.push(format!("{what}: {problem}"));
        }
    }

    /// Judges what pgrelay sent back for `garbage` until it closed (`Err`: it did not
    /// close within the time given).
    fn judge(&mut self, garbage: &Garbage, answer: Result<Vec<u8>, Vec<u8>>) {
        *self.sent.entry(garbage.what).or_default() += 1;
        let bytes = match answer {
            Ok(bytes) => bytes,
            Err(bytes) => {
                let problem = format!("still open, {} bytes read", bytes.len());
                return self.wrong(garbage.what, problem);
            }
        };
        let messages = raw::split_messages(&bytes);
        let whole: usize = messages.iter().map(|m| m.body.len() + 5).sum();
        if whole != bytes.len() {
            let problem = format!("{} bytes of a partial message", bytes.len() - whole);
            self.wrong(garbage.what, problem);
        }
        let errors: Vec<&Message> = messages.iter().filter(|m| m.tag == b'E').collect();
        if errors.is_empty() {
            self.closes += 1;
        }
        for error in &errors {
            let code = error.sqlstate().unwrap_or_default();
            if code.len() != 5 || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
                self.wrong(
                    garbage.what,
                    format!("an ErrorResponse without a SQLSTATE: {error:?}"),
                );
            }
            *self.sqlstates.entry(code).or_default() += 1;
        }
        if let Some(expected) = garbage.expected {
            let first = errors.first().and_then(|e| e.sqlstate());
            if first.as_deref() != Some(expected) {
                self.wrong(garbage.what, format!("answered {first:?}, not {expected}"));
            }
        }
        // Before login there is nothing to say but an error.
        if !garbage.after_login && messages.iter().any(|m| m.tag != b'E') {
            self.wrong(garbage.what, format!("answered {messages:?}"));
        }
    }
}

/// One garbage sender: connect (and log in, for garbage after login), send, end its
/// side of the connection, and read pgrelay's answer until pgrelay closes; again
/// after a pause, until `stop`.
async fn send_garbage(
    addr: SocketAddr,
    seed: usize,
    stop: CancellationToken,
    answers: Arc<Mutex<Answers>>,
) {
    let mut rng = StdRng::seed_from_u64(seed as u64);
    while pause(&stop, GARBAGE_PAUSE).await {
        let garbage = garbage(&mut rng);
        let mut stream = if garbage.after_login {
            raw::login_trust(addr, APP_USER, APP_DB).await
        } else {
            TcpStream::connect(addr).await.expect("connect")
        };
        // pgrelay may close before it has everything (a reset here): that is an answer.
        let _ = stream.write_all(&garbage.bytes).await;
        // Its end of input: pgrelay waiting for the rest of a message must give up.
        let _ = stream.shutdown().await;
        let answer = raw::read_to_close(&mut stream, Duration::from_secs(10)).await;
        answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .judge(&garbage, answer);
    }
}

async fn garbage_crowd(addr: SocketAddr, stop: CancellationToken) -> JoinHandle<Answers> {
    let answers = Arc::new(Mutex::new(Answers::default()));
    let crowd = spawn_crowd(GARBAGE_SENDERS, &stop, |i, stop| {
        send_garbage(addr, i, stop, answers.clone())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::spawn(async move {
        crowd.await.expect("garbage senders");
        let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|e| e.into_inner()));
        answers
    })
}

/// 16 senders connect again and again (a pause of 20 ms between connections) with
/// truncated, oversized and random frames, before login as startup packets and after
/// a login as messages: every answer is ErrorResponses with a SQLSTATE (the right one
/// where there is one right answer) and a close, within 10 s of the sender's end of
/// input; pgbench is unharmed, and pgrelay grows by at most 16 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_and_after_login() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let target = Target::start().await;
    let addr = target.addr();
    let attacked = under_attack(&target, "garbage", |stop| garbage_crowd(addr, stop)).await;
    let answers = attacked.end(&target, 16).await;
    eprintln!("garbage: {answers:?}");
    assert!(
        answers.wrong.is_empty(),
        "{} wrong answers: {:?}",
        answers.wrong_count,
        answers.wrong
    );
    let sent: u64 = answers.sent.values().sum();
    assert!(sent >= 500, "only {sent} pieces of garbage sent");
}

// ---------------------------------------------------------------------------------
// 4. A huge request whose results are never read
// ---------------------------------------------------------------------------------

const STUCK_CLIENTS: usize = 2;
/// 800 MB of results per query: far more than every buffer between PostgreSQL and the
/// client holds.
const HUGE_RESULT: &str = "SELECT repeat('x', 8000) FROM generate_series(1, 100000)";

/// A client that pipelines a huge request (a 4 MiB query, then 100 more, each with a
/// result of 800 MB) and never reads; it closes, results unread, at `stop`.
async fn never_read(addr: SocketAddr, i: usize, stop: CancellationToken) {
    let mut stream = raw::login_trust(addr, APP_USER, APP_DB).await;
    let padding = "p".repeat(4 << 20);
    let mut request = raw::query(&format!("{HUGE_RESULT} /* attack-stuck {i} {padding} */"));
    for _ in 0..100 {
        request.extend(raw::query(&format!("{HUGE_RESULT} /* attack-stuck {i} */")));
    }
    // pgrelay stops reading the request once it cannot write results: this write
    // never finishes.
    tokio::select! {
        _ = stop.cancelled() => {}
        written = stream.write_all(&request) => {
            written.expect("send the request");
            stop.cancelled().await;
        }
    }
}

async fn stuck(addr: SocketAddr, stop: CancellationToken) -> JoinHandle<()> {
    let crowd = spawn_crowd(STUCK_CLIENTS, &stop, |i, stop| never_read(addr, i, stop));
    // The request in, and the servers blocked on the clients, before pgbench starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    crowd
}

/// Two clients each send a huge request (4 MiB of query text, then 100 pipelined
/// queries with 800 MB results) and never read. Their servers are stuck writing
/// (PostgreSQL's wait event is ClientWrite); pgrelay grows by at most 24 MiB (the two
/// requests' 8 MiB and its buffers: the results are not buffered), pgbench is
/// unharmed; and when the clients close, their servers stop running within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_request_never_read() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let target = Target::start().await;
    let addr = target.addr();
    let attacked = under_attack(&target, "never read", |stop| stuck(addr, stop)).await;
    let admin = target.direct().await;
    let stuck_query = "state = 'active' AND query LIKE '%attack-stuck%'";
    let stuck_servers = servers(&admin, stuck_query).await;
    let writing = servers(
        &admin,
        &format!("{stuck_query} AND wait_event = 'ClientWrite'"),
    )
    .await;
    eprintln!("never read: {stuck_servers} servers stuck, {writing} of them in ClientWrite");
    assert_eq!(stuck_servers, STUCK_CLIENTS as i64);
    attacked.end(&target, 24).await;
    let released = eventually(Duration::from_secs(10), || async {
        servers(&admin, stuck_query).await == 0
    })
    .await;
    assert!(released, "servers still run the stuck clients' queries");
}

// ---------------------------------------------------------------------------------
// 5. Clients that leave in the middle of COPY, a pipeline or a large result
// ---------------------------------------------------------------------------------

/// Each kind of leaver pauses this long between its visits.
const LEAVER_PAUSE: Duration = Duration::from_millis(50);

/// The next message, within 10 s.
async fn next_message(stream: &mut TcpStream) -> Message {
    tokio::time::timeout(Duration::from_secs(10), raw::read_message(stream))
        .await
        .expect("pgrelay answered in time")
        .expect("read from pgrelay")
        .expect("pgrelay closed")
}

/// COPY FROM STDIN, 1,000 rows of CopyData, and gone without CopyDone.
async fn leave_mid_copy(addr: SocketAddr) {
    let mut stream = raw::login_trust(addr, APP_USER, APP_DB).await;
    let copy = raw::query("COPY attack_rows FROM STDIN /* attack-copy */");
    stream.write_all(&copy).await.expect("send COPY");
    loop {
        let message = next_message(&mut stream).await;
        assert_ne!(message.tag, b'E', "COPY refused: {:?}", message.fields());
        if message.tag == b'G' {
            break;
        }
    }
    let rows: Vec<u8> = (0..1000)
        .flat_map(|n| raw::message(b'd', format!("{n}\tcopied\n").as_bytes()))
        .collect();
    stream.write_all(&rows).await.expect("send CopyData");
}

/// Parse, then Bind and Execute three times with a Flush and no Sync; gone after the
/// first rows.
async fn leave_mid_pipeline(addr: SocketAddr) {
    let mut stream = raw::login_trust(addr, APP_USER, APP_DB).await;
    let sql = "SELECT g FROM generate_series(1, 200000) g /* attack-pipeline */";
    let mut parse = vec![0];
    parse.extend_from_slice(sql.as_bytes());
    parse.extend_from_slice(&[0, 0, 0]);
    let mut pipeline = raw::message(b'P', &parse);
    for _ in 0..3 {
        pipeline.extend(raw::message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
        pipeline.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
    }
    pipeline.extend(raw::message(b'H', &[]));
    stream
        .write_all(&pipeline)
        .await
        .expect("send the pipeline");
    while next_message(&mut stream).await.tag != b'D' {}
}

/// BEGIN, an INSERT and a slow SELECT pipelined as simple queries; gone after BEGIN's
/// answer. The INSERT must never be committed.
async fn leave_mid_transaction(addr: SocketAddr) {
    let mut stream = raw::login_trust(addr, APP_USER, APP_DB).await;
    let mut pipeline = raw::query("BEGIN");
    pipeline.extend(raw::query(
        "INSERT INTO attack_rows VALUES (-1, 'uncommitted')",
    ));
    pipeline.extend(raw::query("SELECT pg_sleep(0.2) /* attack-transaction */"));
    stream
        .write_all(&pipeline)
        .await
        .expect("send the pipeline");
    while next_message(&mut stream).await.tag != b'Z' {}
}

/// A result of 2,000,000 rows (about 220 MB); gone after its first 64 KiB.
async fn leave_mid_result(addr: SocketAddr) {
    let mut stream = raw::login_trust(addr, APP_USER, APP_DB).await;
    let sql = "SELECT g, repeat('x', 100) FROM generate_series(1, 2000000) g /* attack-result */";
    stream
        .write_all(&raw::query(sql))
        .await
        .expect("send the query");
    let mut chunk = vec![0; 64 << 10];
    let mut read = 0;
    while read < chunk.len() {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk[read..]))
            .await
            .expect("rows in time")
            .expect("read rows");
        assert!(n > 0, "pgrelay closed mid-result");
        read += n;
    }
}

/// How many times each kind of leaver left.
#[derive(Default, Debug)]
struct Left {
    copy: AtomicU64,
    pipeline: AtomicU64,
    transaction: AtomicU64,
    result: AtomicU64,
}

async fn leave(addr: SocketAddr, kind: usize, stop: CancellationToken, left: Arc<Left>) {
    while pause(&stop, LEAVER_PAUSE).await {
        let counter = match kind % 4 {
            0 => {
                leave_mid_copy(addr).await;
                &left.copy
            }
            1 => {
                leave_mid_pipeline(addr).await;
                &left.pipeline
            }
            2 => {
                leave_mid_transaction(addr).await;
                &left.transaction
            }
            _ => {
                leave_mid_result(addr).await;
                &left.result
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

async fn leavers(addr: SocketAddr, stop: CancellationToken) -> JoinHandle<Arc<Left>> {
    let left = Arc::new(Left::default());
    let crowd = spawn_crowd(4, &stop, |kind, stop| leave(addr, kind, stop, left.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::spawn(async move {
        crowd.await.expect("leavers");
        left
    })
}

/// One client of each kind leaves again and again (50 ms apart) in the middle of COPY
/// FROM STDIN, of an extended-protocol pipeline without Sync, of a transaction whose
/// statements it pipelined, and of a 220 MB result: pgbench is unharmed, pgrelay grows
/// by at most 16 MiB, afterwards no server is busy or left in a transaction and there
/// are no more than the pool's, and nothing of the COPYs or transactions was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leave_mid_copy_pipeline_and_result() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let target = Target::start().await;
    let app = connect_str(&format!(
        "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}",
        target.addr().port()
    ))
    .await
    .expect("connect through pgrelay");
    app.batch_execute("CREATE TABLE attack_rows (n int, note text)")
        .await
        .expect("create table");
    let addr = target.addr();
    let attacked = under_attack(&target, "leavers", |stop| leavers(addr, stop)).await;
    let left = attacked.end(&target, 16).await;
    eprintln!("leavers: {left:?}");
    for (kind, count) in [
        ("COPY", &left.copy),
        ("pipeline", &left.pipeline),
        ("transaction", &left.transaction),
        ("result", &left.result),
    ] {
        let count = count.load(Ordering::Relaxed);
        assert!(count >= 5, "left mid-{kind} only {count} times");
    }
    let rows = app
        .simple_query("SELECT count(*) FROM attack_rows")
        .await
        .expect("count");
    let committed = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(
        committed.as_deref(),
        Some("0"),
        "rows of abandoned COPYs or transactions"
    );
}
