//! Process signals: SIGHUP reloads the config, SIGTERM drains gracefully (stop
//! accepting, let sessions finish up to `shutdown_timeout`), SIGINT exits fast, SIGUSR2
//! starts a successor that takes over (`takeover_socket`, see [`crate::service`]).

use tokio::signal::unix::{signal, SignalKind};

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Reload,
    Graceful,
    Fast,
    Upgrade,
}

/// The signal streams, registered once: a signal that arrives while the previous one
/// is being handled waits in its stream instead of being lost.
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// Waits for the next signal of interest.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.hup.recv() => Signal::Reload,
            _ = self.term.recv() => Signal::Graceful,
            _ = self.int.recv() => Signal::Fast,
            _ = self.usr2.recv() => Signal::Upgrade,
        }
    }
}
