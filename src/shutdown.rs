//! Process signals: SIGHUP reloads the config, SIGTERM drains gracefully (stop
//! accepting, let sessions finish up to `shutdown_timeout`), SIGINT exits fast.

use tokio::signal::unix::{signal, SignalKind};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Reload,
    Graceful,
    Fast,
}

/// Waits for the next signal of interest.
pub async fn next_signal() -> std::io::Result<Signal> {
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = hup.recv() => Signal::Reload,
        _ = term.recv() => Signal::Graceful,
        _ = int.recv() => Signal::Fast,
    })
}
