//! Pure session state: whether a client holds a server, and the rules for when it may
//! let it go. No I/O here.

use crate::config::PoolMode;
use crate::pool::ServerGuard;

/// A client's hold on a server. One lives inline in each session, so the size
/// difference between the variants costs nothing, while boxing would cost an allocation
/// per transaction.
#[allow(clippy::large_enum_variant)]
pub enum Attachment {
    /// Transaction mode between transactions: the next complete request picks a server.
    Detached,
    /// A server runs this client's transaction (or, in session mode, its whole session).
    Attached(ServerGuard),
}

/// What happens to a server when its client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    /// Idle and clean: back to the pool as it is (transaction mode).
    Release,
    /// Idle and clean, but session state must go first (`server_reset_query`).
    ResetThenRelease,
    /// Mid-transaction or with unread output: close it.
    Discard,
}

impl Farewell {
    pub fn decide(mode: PoolMode, server_clean: bool, reset_query: &str) -> Farewell {
        match (server_clean, mode) {
            (false, _) => Farewell::Discard,
            (true, PoolMode::Transaction) => Farewell::Release,
            (true, PoolMode::Session) if reset_query.trim().is_empty() => Farewell::Release,
            (true, PoolMode::Session) => Farewell::ResetThenRelease,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn farewell_rules() {
        assert_eq!(
            Farewell::decide(PoolMode::Session, false, "DISCARD ALL"),
            Farewell::Discard
        );
        assert_eq!(
            Farewell::decide(PoolMode::Transaction, true, "DISCARD ALL"),
            Farewell::Release
        );
        assert_eq!(
            Farewell::decide(PoolMode::Session, true, "DISCARD ALL"),
            Farewell::ResetThenRelease
        );
        assert_eq!(
            Farewell::decide(PoolMode::Session, true, " "),
            Farewell::Release
        );
    }
}
