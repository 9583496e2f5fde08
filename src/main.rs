//! The `pgrelay` command: `run -c FILE`, `check -c FILE`, `demo`. Logging, runtime and
//! wiring only; everything else lives in the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgrelay::config::{Config, LogFormat};
use pgrelay::listener::Pgrelay;
use pgrelay::shutdown::{Signal, Signals};

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
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Check a config file and report problems with the key's path.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Start a throwaway PostgreSQL primary and replica with pgrelay in front of them.
    Demo {
        /// Where pgrelay listens.
        #[arg(long, default_value_t = 6432)]
        port: u16,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config: path } => {
            let config = Config::load(&path)
                .with_context(|| format!("invalid config {}", path.display()))?;
            init_logging(config.log_format);
            runtime(config.worker_threads)?.block_on(run(config, Some(path)))
        }
        Command::Demo { port } => {
            init_logging(LogFormat::Text);
            demo(port)
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    match Config::load(path) {
        Ok(config) => {
            for warning in config.warnings() {
                println!("warning: {warning}");
            }
            println!("{}: ok", path.display());
            Ok(())
        }
        Err(err) => {
            eprintln!("{}: {err}", path.display());
            std::process::exit(1);
        }
    }
}

async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let relay = Pgrelay::start(config).await?;
    *relay
        .shared
        .config_path
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = path;
    loop {
        let signal = tokio::select! {
            signal = signals.next() => signal,
            () = relay.shared.shutdown_requested.notified() => Signal::Graceful,
        };
        // Read per signal: a reload may have changed it.
        let drain = relay.shared.config.load().pool.shutdown_timeout;
        match signal {
            Signal::Reload => {
                // Failures are logged with their reason; the running config stays.
                let _ = relay.shared.reload();
            }
            Signal::Graceful => {
                tracing::info!("shutting down: draining sessions");
                relay.shutdown(drain).await;
                return Ok(());
            }
            Signal::Fast => {
                tracing::info!("SIGINT: exiting");
                relay.shutdown(Duration::ZERO).await;
                return Ok(());
            }
        }
    }
}

fn demo(port: u16) -> anyhow::Result<()> {
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
        while signals.next().await == Signal::Reload {}
        println!("stopping...");
        relay.shutdown(Duration::from_secs(2)).await;
        anyhow::Ok(())
    })?;
    drop(cluster);
    Ok(())
}
