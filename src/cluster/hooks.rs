//! Failover hooks: `failover_command`, `failback_command` and `follow_primary_command`,
//! run through `sh -c` with Pgpool-II's placeholders, one at a time and in the order
//! their transitions happened, each with `failover.command_timeout`. Their output is
//! logged line by line and their exit status recorded ([`HookRecord`]); a hook that
//! fails or hangs delays only the hooks queued behind it, never clients.
//!
//! In a fleet (`failover.lease = "etcd"`) a hook runs only if this instance holds the
//! failover lease when the hook's turn comes ([`super::lease`]); the holder then writes
//! a done-record. Otherwise the hook is kept as [`Deferred`], with who held the lease,
//! and when this instance acquires the lease it runs those the holder did not record
//! done ([`super::lease::verdict`]), so a holder that died with the primary still gets
//! its failover run, once.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::lease::{self, Lease, Permit, Verdict};
use super::Topology;

/// Which command a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Failover,
    Failback,
    FollowPrimary,
}

impl HookKind {
    pub const ALL: [HookKind; 3] = [
        HookKind::Failover,
        HookKind::Failback,
        HookKind::FollowPrimary,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::Failover => "failover_command",
            HookKind::Failback => "failback_command",
            HookKind::FollowPrimary => "follow_primary_command",
        }
    }
}

/// The nodes a hook's placeholders name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subjects {
    /// `%d %h %p %D`: the node the hook is about.
    pub node: Option<usize>,
    /// `%m %H %r %R`: the new main node.
    pub new_main: Option<usize>,
    /// `%M`: the old main node.
    pub old_main: Option<usize>,
    /// `%P %N %S`: the old primary.
    pub old_primary: Option<usize>,
}

/// Replaces Pgpool-II's placeholders in `template`:
///
/// | | |
/// |---|---|
/// | `%d` `%h` `%p` `%D` | the node's id, host, port, data directory |
/// | `%m` `%H` `%r` `%R` | the new main node's id, host, port, data directory |
/// | `%M` | the old main node's id |
/// | `%P` `%N` `%S` | the old primary's id, host, port |
/// | `%%` | `%` |
///
/// A node that does not exist gives id `-1` and empty host, port and directory, as
/// in Pgpool-II. Values are not quoted (hosts and directories come from the config).
/// An unknown `%x` is left as it is.
pub fn expand(template: &str, topology: &Topology, subjects: &Subjects) -> String {
    let id = |node: Option<usize>| node.map_or_else(|| "-1".to_owned(), |n| n.to_string());
    let field = |node: Option<usize>, pick: fn(&super::NodeState) -> String| {
        node.and_then(|n| topology.nodes.get(n))
            .map(pick)
            .unwrap_or_default()
    };
    let host = |n: &super::NodeState| n.host.clone();
    let port = |n: &super::NodeState| n.port.to_string();
    let dir = |n: &super::NodeState| n.data_directory.clone();
    let mut out = String::with_capacity(template.len() + 32);
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let value = match chars.next() {
            Some('d') => id(subjects.node),
            Some('h') => field(subjects.node, host),
            Some('p') => field(subjects.node, port),
            Some('D') => field(subjects.node, dir),
            Some('m') => id(subjects.new_main),
            Some('H') => field(subjects.new_main, host),
            Some('r') => field(subjects.new_main, port),
            Some('R') => field(subjects.new_main, dir),
            Some('M') => id(subjects.old_main),
            Some('P') => id(subjects.old_primary),
            Some('N') => field(subjects.old_primary, host),
            Some('S') => field(subjects.old_primary, port),
            Some('%') => "%".to_owned(),
            Some(other) => format!("%{other}"),
            None => "%".to_owned(),
        };
        out.push_str(&value);
    }
    out
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    Exited(i32),
    /// Killed by a signal it did not ask for.
    Signaled(i32),
    /// Still running after `command_timeout`: killed, with its process group.
    TimedOut,
    /// `sh` could not be started.
    SpawnFailed(String),
}

impl HookOutcome {
    pub fn succeeded(&self) -> bool {
        *self == HookOutcome::Exited(0)
    }
}

/// One hook that ran.
#[derive(Debug, Clone)]
pub struct HookRecord {
    pub kind: HookKind,
    pub node: Option<usize>,
    /// The command after placeholder expansion.
    pub command: String,
    pub started: SystemTime,
    pub elapsed: Duration,
    pub outcome: HookOutcome,
}

/// One hook waiting to run.
#[derive(Debug, Clone)]
pub struct HookRun {
    pub kind: HookKind,
    pub node: Option<usize>,
    pub command: String,
    pub timeout: Duration,
}

/// A hook this instance did not run because another instance held the lease (or none
/// could be known to); run later if this instance acquires it in time.
#[derive(Debug, Clone)]
pub struct Deferred {
    pub run: HookRun,
    /// When its turn came: the transition had just been seen.
    pub seen: SystemTime,
    /// Who held the lease then, as the lease key said.
    pub holder: String,
}

/// The most recent hooks, newest last, for the admin console and tests.
const KEPT: usize = 100;

/// Queues hooks for the runner and keeps what they did.
pub struct Hooks {
    queue: mpsc::UnboundedSender<HookRun>,
    records: Arc<Mutex<VecDeque<HookRecord>>>,
    /// Queued or running.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// Hooks run since start, by kind (as [`HookKind::ALL`]) and whether they failed.
    totals: Arc<[[std::sync::atomic::AtomicU64; 2]; 3]>,
    /// Hooks another instance's lease kept from running, oldest first.
    deferred: Arc<Mutex<Vec<Deferred>>>,
}

impl Hooks {
    /// Starts the runner task (on the current runtime); every hook runs.
    pub fn start() -> Hooks {
        Hooks::spawn(None)
    }

    /// Starts the runner task with hooks gated by `lease` (which lets every hook run
    /// while `failover.lease = "none"`).
    pub fn gated(lease: Arc<Lease>) -> Hooks {
        Hooks::spawn(Some(lease))
    }

    fn spawn(gate: Option<Arc<Lease>>) -> Hooks {
        let (queue, runs) = mpsc::unbounded_channel();
        let kept = Kept {
            records: Arc::default(),
            in_flight: Arc::default(),
            totals: Arc::new(Default::default()),
            deferred: Arc::default(),
        };
        let hooks = Hooks {
            queue,
            records: kept.records.clone(),
            in_flight: kept.in_flight.clone(),
            totals: Arc::clone(&kept.totals),
            deferred: kept.deferred.clone(),
        };
        tokio::spawn(run_queue(runs, kept, gate));
        hooks
    }

    /// The hooks kept deferred, oldest first.
    pub fn deferred(&self) -> Vec<Deferred> {
        self.deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Hooks run since start: `(kind, failed, count)` for every kind and outcome.
    pub fn totals(&self) -> Vec<(HookKind, bool, u64)> {
        let mut all = Vec::new();
        for (kind, counts) in HookKind::ALL.iter().zip(self.totals.iter()) {
            for (failed, count) in [false, true].into_iter().zip(counts) {
                all.push((
                    *kind,
                    failed,
                    count.load(std::sync::atomic::Ordering::Relaxed),
                ));
            }
        }
        all
    }

    /// Queues a hook; an empty command is not run.
    pub fn submit(&self, run: HookRun) {
        if run.command.trim().is_empty() {
            return;
        }
        tracing::info!(hook = run.kind.as_str(), node = ?run.node, command = %run.command, "queueing hook");
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.queue.send(run).is_err() {
            self.in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The hooks that ran, oldest first.
    pub fn records(&self) -> Vec<HookRecord> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.iter().cloned().collect()
    }

    /// Hooks queued or running.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Where the runner keeps what the hooks did.
struct Kept {
    records: Arc<Mutex<VecDeque<HookRecord>>>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    totals: Arc<[[std::sync::atomic::AtomicU64; 2]; 3]>,
    deferred: Arc<Mutex<Vec<Deferred>>>,
}

impl Kept {
    fn keep(&self, record: HookRecord) {
        let kind = HookKind::ALL.iter().position(|&k| k == record.kind);
        if let Some(counts) = kind.and_then(|k| self.totals.get(k)) {
            let failed = usize::from(!record.outcome.succeeded());
            counts[failed].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() == KEPT {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// Keeps `run` deferred, and drops those deferred too long ago to act on.
    fn defer(&self, run: HookRun, holder: String, window: Duration) {
        tracing::info!(hook = run.kind.as_str(), node = ?run.node, command = %run.command, %holder, "hook deferred: the failover lease is held by another instance");
        let now = SystemTime::now();
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        deferred.retain(|d| {
            let fresh = now.duration_since(d.seen).unwrap_or_default() <= window;
            if !fresh {
                tracing::info!(hook = d.run.kind.as_str(), node = ?d.run.node, "deferred hook dropped: seen longer ago than lease_ttl plus the failure detection time");
            }
            fresh
        });
        deferred.push(Deferred {
            run,
            seen: now,
            holder,
        });
    }
}

async fn run_queue(
    mut runs: mpsc::UnboundedReceiver<HookRun>,
    kept: Kept,
    gate: Option<Arc<Lease>>,
) {
    let mut acquired = gate.as_ref().map(|lease| lease.watch_held());
    loop {
        tokio::select! {
            run = runs.recv() => {
                let Some(run) = run else { return };
                take_turn(run, &kept, gate.as_deref()).await;
                kept.in_flight
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
            held = acquisition(&mut acquired) => {
                if let (true, Some(lease)) = (held, gate.as_deref()) {
                    run_deferred(&kept, lease).await;
                }
            }
        }
    }
}

/// The next change of the lease's holding (true: acquired); never, without a lease.
async fn acquisition(held: &mut Option<tokio::sync::watch::Receiver<bool>>) -> bool {
    let Some(held) = held else {
        return std::future::pending().await;
    };
    match held.changed().await {
        Ok(()) => *held.borrow_and_update(),
        // The lease is gone (shutting down): nothing more will be acquired.
        Err(_) => std::future::pending().await,
    }
}

/// A hook's turn: it runs, or is deferred if another instance holds the lease.
async fn take_turn(run: HookRun, kept: &Kept, gate: Option<&Lease>) {
    match gate.map_or(Permit::Free, Lease::permit) {
        Permit::Free => kept.keep(run_one(run).await),
        Permit::Held => run_holding(run, kept, gate).await,
        Permit::Deferred { holder } => {
            let window = gate.map(Lease::deferral_window).unwrap_or_default();
            kept.defer(run, holder, window);
        }
    }
}

/// Runs a hook as the lease's holder, and records it done for the others. A hook that
/// failed is recorded too: it was tried, and its failure is in the log and metrics.
async fn run_holding(run: HookRun, kept: &Kept, gate: Option<&Lease>) {
    let (kind, node) = (run.kind, run.node);
    kept.keep(run_one(run).await);
    if let Some(lease) = gate {
        if let Err(err) = lease.record_done(kind, node).await {
            tracing::warn!(hook = kind.as_str(), ?node, %err, "could not record the hook done in etcd");
        }
    }
}

/// Just acquired the lease: runs the deferred hooks nobody recorded done since they
/// were seen, drops the stale ones.
async fn run_deferred(kept: &Kept, lease: &Lease) {
    let pending = std::mem::take(&mut *kept.deferred.lock().unwrap_or_else(|p| p.into_inner()));
    let window = lease.deferral_window();
    let mut keep = Vec::new();
    for deferred in pending {
        let (kind, node) = (deferred.run.kind, deferred.run.node);
        let done = match lease.done_record(kind, node).await {
            Ok(done) if lease.holds() => done,
            Ok(_) => {
                keep.push(deferred);
                continue;
            }
            Err(err) => {
                tracing::warn!(hook = kind.as_str(), ?node, %err, "could not read the hook's done-record; it stays deferred");
                keep.push(deferred);
                continue;
            }
        };
        let now = lease::unix_ms(SystemTime::now());
        match lease::verdict(lease::unix_ms(deferred.seen), now, window, done) {
            Verdict::Run => {
                tracing::info!(hook = kind.as_str(), ?node, held_by = %deferred.holder, "running a deferred hook: nobody recorded it done");
                run_holding(deferred.run, kept, Some(lease)).await;
            }
            Verdict::AlreadyDone(record) => {
                tracing::info!(
                    hook = kind.as_str(),
                    ?node,
                    by = record.instance,
                    "deferred hook not run: another instance ran it"
                );
            }
            Verdict::Stale => {
                tracing::info!(hook = kind.as_str(), ?node, "deferred hook dropped: seen longer ago than lease_ttl plus the failure detection time");
            }
        }
    }
    let mut deferred = kept.deferred.lock().unwrap_or_else(|p| p.into_inner());
    keep.append(&mut deferred);
    *deferred = keep;
}

/// Output kept per stream; the rest is dropped (and said so).
const OUTPUT_LIMIT: usize = 64 * 1024;

async fn run_one(run: HookRun) -> HookRecord {
    use tokio::io::AsyncReadExt;
    let started = SystemTime::now();
    let clock = tokio::time::Instant::now();
    let hook = run.kind.as_str();
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&run.command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let record = |outcome| HookRecord {
        kind: run.kind,
        node: run.node,
        command: run.command.clone(),
        started,
        elapsed: clock.elapsed(),
        outcome,
    };
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            tracing::error!(hook, command = %run.command, %err, "could not start hook");
            return record(HookOutcome::SpawnFailed(err.to_string()));
        }
    };
    let pid = child.id();
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.take(OUTPUT_LIMIT as u64).read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.take(OUTPUT_LIMIT as u64).read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await;
        (status, out, err)
    };
    let outcome = match tokio::time::timeout(run.timeout, work).await {
        Ok((status, out, err)) => {
            log_output(hook, "stdout", &out);
            log_output(hook, "stderr", &err);
            match status {
                Ok(status) => match (status.code(), status.signal()) {
                    (Some(code), _) => HookOutcome::Exited(code),
                    (None, Some(signal)) => HookOutcome::Signaled(signal),
                    (None, None) => HookOutcome::Signaled(0),
                },
                Err(err) => HookOutcome::SpawnFailed(err.to_string()),
            }
        }
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // The whole group: `sh` and whatever it started.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            HookOutcome::TimedOut
        }
    };
    let record = record(outcome);
    if record.outcome.succeeded() {
        tracing::info!(hook, command = %record.command, elapsed = ?record.elapsed, "hook finished");
    } else {
        tracing::error!(hook, command = %record.command, elapsed = ?record.elapsed, outcome = ?record.outcome, "hook failed");
    }
    record
}

fn log_output(hook: &str, stream: &str, bytes: &[u8]) {
    for line in String::from_utf8_lossy(bytes).lines() {
        tracing::info!(hook, stream, "{line}");
    }
    if bytes.len() >= OUTPUT_LIMIT {
        tracing::warn!(hook, stream, "hook output cut at {OUTPUT_LIMIT} bytes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::NodeState;

    fn topology() -> Topology {
        Topology {
            nodes: vec![
                NodeState::new("db0".into(), 5432, 1.0, "/d/0".into()),
                NodeState::new("db1".into(), 5433, 1.0, "/d/1".into()),
            ],
            primary: Some(1),
        }
    }

    #[test]
    fn placeholders_follow_pgpool() {
        let subjects = Subjects {
            node: Some(0),
            new_main: Some(1),
            old_main: Some(0),
            old_primary: Some(0),
        };
        let out = expand(
            "f %d %h %p %D %m %H %r %R %M %P %N %S %% %x %",
            &topology(),
            &subjects,
        );
        assert_eq!(out, "f 0 db0 5432 /d/0 1 db1 5433 /d/1 0 0 db0 5432 % %x %");
        let none = expand("%d|%h|%m|%H|%P|%N", &topology(), &Subjects::default());
        assert_eq!(none, "-1||-1||-1|");
    }

    /// With `lease = "etcd"` and no lease held (etcd never reached here), a hook is
    /// kept deferred with who held the lease, not run; with `lease = "none"` it runs.
    #[tokio::test]
    async fn hooks_wait_for_the_lease() {
        let marker = tempfile::NamedTempFile::new().expect("temp file");
        let path = marker.path().display().to_string();
        let text = "[[backends]]\nhost = \"h\"\n[failover]\nlease = \"etcd\"\n";
        let config = crate::config::Config::from_toml_str(text).expect("config");
        let shared = Arc::new(arc_swap::ArcSwap::from_pointee(config.clone()));
        let hooks = Hooks::gated(Arc::new(Lease::new(shared.clone(), 1)));
        let run = HookRun {
            kind: HookKind::Failover,
            node: Some(0),
            command: format!("echo ran >> '{path}'"),
            timeout: Duration::from_secs(5),
        };
        hooks.submit(run.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while hooks.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(hooks.records().is_empty(), "not run without the lease");
        let deferred = hooks.deferred();
        assert_eq!(deferred.len(), 1);
        assert_eq!(
            (deferred[0].run.kind, deferred[0].run.node),
            (HookKind::Failover, Some(0))
        );
        assert!(
            deferred[0].holder.contains("etcd not reached"),
            "{}",
            deferred[0].holder
        );
        assert_eq!(std::fs::read_to_string(marker.path()).expect("read"), "");

        let mut none = config;
        none.failover.lease = crate::config::LeaseKind::None;
        shared.store(Arc::new(none));
        hooks.submit(run);
        while hooks.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            hooks.records().len(),
            1,
            "lease = \"none\": every instance runs it"
        );
        assert_eq!(
            std::fs::read_to_string(marker.path()).expect("read"),
            "ran\n"
        );
    }

    #[tokio::test]
    async fn hooks_run_in_order_and_record_their_end() {
        let hooks = Hooks::start();
        let run = |command: &str, timeout_ms| HookRun {
            kind: HookKind::Failover,
            node: Some(0),
            command: command.into(),
            timeout: Duration::from_millis(timeout_ms),
        };
        hooks.submit(run("echo out; echo err >&2; exit 3", 5_000));
        hooks.submit(run("sleep 30", 200));
        hooks.submit(run("", 1_000));
        hooks.submit(run("true", 5_000));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while hooks.in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let outcomes: Vec<HookOutcome> = hooks.records().into_iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [
                HookOutcome::Exited(3),
                HookOutcome::TimedOut,
                HookOutcome::Exited(0)
            ]
        );
    }
}
