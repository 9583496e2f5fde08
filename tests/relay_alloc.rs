//! The relay does not allocate per message: a counting global allocator measures what
//! this process (pgrelay in-process; the clients are external `psql` and `pgbench`)
//! allocates while a large result streams through it, while a client's own
//! notifications have their pid rewritten, and while many transactions run in
//! transaction mode.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use support::{start, EnvOptions, APP_DB, APP_PASSWORD, APP_USER};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .env("PGPASSWORD", APP_PASSWORD)
        .args(args)
        .output()
        .expect("run client");
    assert!(
        out.status.success(),
        "{cmd} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_allocation_per_relayed_message() {
    // Health checks open a connection each period and would land in one run and not the
    // other; this test is about the relay, so they wait an hour.
    let env = start(EnvOptions {
        pool_size: 4,
        sections: vec!["[health_check]\nperiod = \"1h\"".into()],
        ..Default::default()
    })
    .await;
    let port = env.port().to_string();
    let conn = [
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        port.as_str(),
        "-U",
        APP_USER,
        "-d",
        APP_DB,
    ];
    // The clients are external processes; block_in_place keeps pgrelay's tasks running.
    let psql = |extra: &[&str]| {
        let args: Vec<&str> = conn.iter().chain(extra).copied().collect();
        tokio::task::block_in_place(|| run("psql", &args))
    };
    let pgbench = |extra: &[&str]| {
        let args: Vec<&str> = extra
            .iter()
            .chain(&[
                "-h",
                "127.0.0.1",
                "-p",
                port.as_str(),
                "-U",
                APP_USER,
                APP_DB,
            ])
            .copied()
            .collect();
        tokio::task::block_in_place(|| run("pgbench", &args))
    };

    // Warm up: the pool opens its servers, buffers reach their working size.
    psql(&["-Atc", "SELECT count(*) FROM generate_series(1, 1000)"]);

    // 200,000 DataRows plus framing pass through one session.
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    psql(&[
        "-Atq",
        "-o",
        "/dev/null",
        "-c",
        "SELECT i, repeat('x', 100) FROM generate_series(1, 200000) AS i",
    ]);
    let streamed = ALLOCATIONS.load(Ordering::Relaxed) - before;
    // A login (auth, session, params) costs a few hundred; 200,000 messages must add
    // next to nothing.
    assert!(
        streamed < 5_000,
        "{streamed} allocations while relaying 200,000 rows"
    );

    // 20,000 notifications of the client's own server: each gets the client's own pid,
    // written over the server's in the read buffer.
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    psql(&[
        "-Atq",
        "-o",
        "/dev/null",
        "-c",
        "LISTEN own; SELECT count(pg_notify('own', i::text)) FROM generate_series(1, 20000) AS i",
    ]);
    let notified = ALLOCATIONS.load(Ordering::Relaxed) - before;
    println!("relay allocations: {notified} for a login and 20,000 own notifications");
    assert!(
        notified < 5_000,
        "{notified} allocations while relaying 20,000 notifications"
    );

    // Transaction mode: 8 clients over 4 servers, so clients also wait in the pool's
    // queue (each session reuses its place in it). Two runs that differ only in their
    // number of transactions: logins, health checks and pool start-up cancel out.
    pgbench(&["-i", "-s", "1", "-q"]);
    let counted = |mode: &str, transactions: &str| {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let out = pgbench(&["-S", "-M", mode, "-c", "8", "-j", "2", "-t", transactions]);
        (ALLOCATIONS.load(Ordering::Relaxed) - before, out)
    };
    // Simple queries, then named prepared statements (renamed and carried to every
    // server: that must not allocate either once each server has them).
    for mode in ["simple", "prepared"] {
        let (short, _) = counted(mode, "125");
        let (long, out) = counted(mode, "625");
        assert!(
            out.contains("number of transactions actually processed: 5000/5000"),
            "{out}"
        );
        let per_txn = long.saturating_sub(short) as f64 / 4000.0;
        println!("relay allocations: {streamed} for 200,000 rows; -M {mode}: {per_txn:.3} per transaction ({short} for 1,000, {long} for 5,000)");
        assert!(
            per_txn < 0.05,
            "-M {mode}: {per_txn} allocations per transaction"
        );
    }
}
