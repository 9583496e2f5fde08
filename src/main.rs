//! The `pgrelay` command: `run -c FILE`, `check -c FILE`, `demo`, `import FILE`.
//! Logging, runtime and wiring only; everything else lives in the library.

use std::io::IsTerminal;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgrelay::config::{Config, ConfigError, LogFormat};
use pgrelay::import::{InputFile, Source};
use pgrelay::listener::{Inherited, Pgrelay};
use pgrelay::shutdown::{Signal, Signals};
use pgrelay::{service, takeover};

#[derive(Parser)]
#[command(version, about = "PostgreSQL connection pooler and read/write router")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run pgrelay with a config file.
    Run {
        /// The configuration file (TOML); conf/pgrelay.toml documents every key.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Take over from the pgrelay running with this config (its `takeover_socket`):
        /// its listening sockets, and its clients as each finishes its transaction.
        #[arg(long)]
        takeover: bool,
    },
    /// Check a config file and report problems with the key's path.
    Check {
        /// The configuration file (TOML) to check; nothing is started.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL primary and replica with pgrelay in front of them.
    Demo {
        /// The port pgrelay listens on, on 127.0.0.1 (PostgreSQL takes free ports).
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
    /// Print a pgrelay.toml translated from a PgBouncer or Pgpool-II configuration file.
    ///
    /// Settings with no equivalent, or with a different meaning, become comments.
    /// Check the result with `pgrelay check -c FILE`.
    Import {
        /// pgbouncer.ini or pgpool.conf.
        file: PathBuf,
        /// Which tool FILE belongs to; by default told from its content.
        #[arg(long, value_enum, value_name = "TOOL")]
        from: Option<ImportFrom>,
        /// PgBouncer's auth_file (userlist.txt): users and their passwords.
        #[arg(long, value_name = "FILE")]
        userlist: Option<PathBuf>,
        /// Access rules: Pgpool-II's pool_hba.conf or PgBouncer's auth_hba_file.
        #[arg(long, visible_alias = "hba", value_name = "FILE")]
        pool_hba: Option<PathBuf>,
        /// Pgpool-II's pool_passwd: users and their passwords.
        #[arg(long, value_name = "FILE")]
        pool_passwd: Option<PathBuf>,
    },
}

/// `pgrelay import --from`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ImportFrom {
    Pgbouncer,
    Pgpool,
}

fn main() -> ExitCode {
    match execute(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` puts the causes on the same line: "cannot read FILE: <OS reason>".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { config } => check(&config),
        Command::Run {
            config: path,
            takeover,
        } => {
            let config = load(&path)?;
            init_logging(config.log_format);
            runtime(config.worker_threads)?.block_on(run(config, Some(path), takeover))
        }
        Command::Demo { port } => {
            init_logging(LogFormat::Text);
            demo(port)
        }
        Command::Import {
            file,
            from,
            userlist,
            pool_hba,
            pool_passwd,
        } => {
            let read = |path: Option<PathBuf>| path.as_deref().map(InputFile::read).transpose();
            let request = pgrelay::import::Request {
                main: InputFile::read(&file)?,
                from: from.map(|from| match from {
                    ImportFrom::Pgbouncer => Source::PgBouncer,
                    ImportFrom::Pgpool => Source::Pgpool,
                }),
                userlist: read(userlist)?,
                hba: read(pool_hba)?,
                pool_passwd: read(pool_passwd)?,
            };
            print!("{}", pgrelay::import::import(&request)?);
            Ok(())
        }
    }
}

/// One thread by default (as PgBouncer); `worker_threads` > 1 for a multi-thread runtime.
fn runtime(workers: u32) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers as usize);
        builder
    };
    Ok(builder.enable_all().build()?)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGRELAY_LOG")
        .unwrap_or_else(|_| "info".into());
    // Logs go to stderr; stdout is for what the user asked for (`check`, `demo`).
    // Colours only on a terminal: in a file or a pipe the escape codes are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Loads the file; an error names it once: "cannot read FILE: <OS reason>", or
/// "FILE: <key>: <problem>".
fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|err| match err {
        ConfigError::Read { .. } => anyhow::Error::new(err),
        err => anyhow::Error::new(err).context(path.display().to_string()),
    })
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    // What `run` would fail on: certificate files that cannot be loaded. The server
    // side's message already carries its cause: `{:#}` in `main` would repeat it.
    pgrelay::tls::accept::ClientTls::load(&config.tls)
        .map_err(|err| anyhow::anyhow!("{}: {}: {err}", path.display(), err.key()))?;
    if let Err(err) = pgrelay::tls::connect::Connector::new(&config.tls) {
        anyhow::bail!("{}: {err}", path.display());
    }
    println!("{}: ok", path.display());
    Ok(())
}

/// Fails at once when the demo's port is taken, before a cluster is built for nothing.
/// The probe socket is closed again at once; pgrelay binds the port itself.
fn ensure_port_free(port: u16) -> anyhow::Result<()> {
    match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
        Ok(_) => Ok(()),
        Err(err) => anyhow::bail!(
            "port {port} on 127.0.0.1 is not free ({err}); stop what listens there or \
             choose another port with `pgrelay demo --port <PORT>`"
        ),
    }
}

async fn run(config: Config, path: Option<PathBuf>, takeover: bool) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    // Read now: after a package upgrade the path holds the new binary.
    let relaunch = path.as_deref().map(service::Relaunch::new).transpose()?;
    let relay = if takeover {
        take_over(config).await?
    } else {
        Pgrelay::start(config).await?
    };
    *relay
        .shared
        .config_path
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = path;
    let successors = relay
        .shared
        .config
        .load()
        .takeover_socket
        .as_deref()
        .map(|socket| {
            takeover::listen(socket)
                .with_context(|| format!("cannot listen on takeover_socket {}", socket.display()))
        })
        .transpose()?;
    service::ready();
    // What ends the run: a signal (or the console's SHUTDOWN), or a new process
    // taking over.
    let end = {
        let next_successor = async {
            match &successors {
                Some(listener) => takeover::next_successor(listener, || relay.offer()).await,
                None => std::future::pending().await,
            }
        };
        let mut next_successor = std::pin::pin!(next_successor);
        loop {
            let signal = tokio::select! {
                signal = signals.next() => signal,
                () = relay.shared.shutdown_requested.notified() => Signal::Graceful,
                successor = &mut next_successor => break End::TakenOver(successor),
            };
            match signal {
                Signal::Reload => {
                    // Failures are logged with their reason; the running config stays.
                    let _ = relay.shared.reload();
                }
                Signal::Graceful => break End::Graceful,
                Signal::Fast => break End::Fast,
                Signal::Upgrade => upgrade(relaunch.as_ref(), successors.is_some()),
            }
        }
    };
    // Read now: a reload may have changed it.
    let drain = relay.shared.config.load().pool.shutdown_timeout;
    match end {
        End::Graceful => {
            service::stopping();
            tracing::info!("shutting down: draining sessions");
            relay.shutdown(drain).await;
        }
        End::Fast => {
            service::stopping();
            tracing::info!("SIGINT: exiting");
            relay.shutdown(Duration::ZERO).await;
        }
        End::TakenOver(successor) => relay.hand_over(successor, drain).await,
    }
    Ok(())
}

/// SIGUSR2: starts a successor that takes over through `takeover_socket`.
fn upgrade(relaunch: Option<&service::Relaunch>, takeover_socket: bool) {
    let Some(relaunch) = relaunch.filter(|_| takeover_socket) else {
        tracing::warn!("SIGUSR2 asks for a takeover, which needs takeover_socket in the config");
        return;
    };
    match relaunch.start() {
        Ok(pid) => {
            tracing::info!(pid, exe = %relaunch.exe.display(), "SIGUSR2: started a successor to take over")
        }
        Err(err) => {
            tracing::warn!(%err, exe = %relaunch.exe.display(), "SIGUSR2: could not start a successor")
        }
    }
}

/// How a run ends.
enum End {
    Graceful,
    Fast,
    TakenOver(takeover::Successor),
}

/// `run --takeover`: takes the running pgrelay's sockets, starts on them, and
/// serves the clients it hands over.
async fn take_over(mut config: Config) -> anyhow::Result<Pgrelay> {
    let socket = config.takeover_socket.clone().context(
        "--takeover needs takeover_socket in the config: where the running pgrelay waits",
    )?;
    let mut predecessor = takeover::Predecessor::connect(&socket).await?;
    // Cancel keys carry the instance id: the clients handed over keep theirs.
    if config.instance_id.is_none() {
        config.instance_id = Some(predecessor.instance_id);
    }
    let inherited = Inherited::from_predecessor(&mut predecessor);
    let mut relay = Pgrelay::start_with(config, inherited).await?;
    predecessor.ready().await?;
    tracing::info!("took over the running pgrelay's sockets");
    relay.receive(predecessor);
    Ok(relay)
}

fn demo(port: u16) -> anyhow::Result<()> {
    ensure_port_free(port)?;
    let options = pgrelay::demo::ClusterOptions {
        replicas: 1,
        host_auth: "scram-sha-256".into(),
        users: vec![("app".into(), "app-secret".into())],
        databases: vec![("app".into(), "app".into())],
        extra_conf: Vec::new(),
    };
    println!("starting a PostgreSQL primary and one streaming replica...");
    let cluster =
        pgrelay::demo::LocalCluster::start(&options).context("could not start the demo cluster")?;
    let ports = cluster.ports();
    let backends: String = ports
        .iter()
        .map(|p| format!("[[backends]]\nhost = \"127.0.0.1\"\nport = {p}\n"))
        .collect();
    let text = format!(
        "listen = [\"127.0.0.1:{port}\"]\nauth_type = \"scram-sha-256\"\n\
         metrics_listen = \"127.0.0.1:0\"\nadmin_users = [\"admin\"]\n\
         [pool]\nmode = \"transaction\"\ndefault_pool_size = 10\n\
         {backends}\n[[databases]]\nname = \"app\"\n\n[[users]]\nname = \"app\"\npassword = \"app-secret\"\n\
         [[users]]\nname = \"admin\"\npassword = \"admin-secret\"\n"
    );
    let config = Config::from_toml_str(&text).context("demo config")?;
    runtime(1)?.block_on(async {
        let relay = Pgrelay::start(config).await?;
        println!(
            "\npgrelay is listening on 127.0.0.1:{port} in front of a primary on port {} and a replica on port {}.\n\
             Connect with:\n\n    psql \"postgres://app:app-secret@127.0.0.1:{port}/app\"\n\n\
             or run a benchmark:\n\n    PGPASSWORD=app-secret pgbench -i -h 127.0.0.1 -p {port} -U app app\n    \
             PGPASSWORD=app-secret pgbench -c 8 -T 10 -h 127.0.0.1 -p {port} -U app app\n\n\
             The admin console:\n\n    psql \"postgres://admin:admin-secret@127.0.0.1:{port}/pgrelay\" -c \"SHOW POOL_NODES\"\n\n\
             Metrics and probes: http://{metrics}/metrics  /healthz  /readyz\n\n\
             Press Ctrl-C to stop pgrelay and remove the cluster.",
            ports[0],
            ports.get(1).copied().unwrap_or(0),
            metrics = relay
                .metrics_addr
                .map_or_else(|| "(off)".to_owned(), |a| a.to_string()),
        );
        // Ctrl-C or SIGTERM (as from `timeout` or a service manager) both clean up.
        let mut signals = Signals::new()?;
        while matches!(signals.next().await, Signal::Reload | Signal::Upgrade) {}
        println!("stopping...");
        relay.shutdown(Duration::from_secs(2)).await;
        anyhow::Ok(())
    })?;
    drop(cluster);
    Ok(())
}
