//! What the failover state machine ([`super::failover`]) takes in and gives out: a
//! probe's findings, the operator's commands, and the transitions of nodes and of the
//! primary that the health monitor turns into hooks and dropped pools.

/// What one probe of a node found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// A primary's WAL insert timeline, a replica's received one.
    pub timeline: Option<u32>,
    /// Where a replica streams from (`sender_host`, `sender_port`), while streaming.
    pub upstream: Option<(String, u16)>,
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Connecting, logging in or asking failed.
    #[error(transparent)]
    Server(#[from] crate::pool::server::ServerError),
    #[error("no answer within health_check.timeout ({0:?})")]
    Timeout(std::time::Duration),
    /// The probe query answered something else than a boolean first.
    #[error("unexpected probe answer {0:?}")]
    Answer(Option<String>),
}

/// A probe's result: what it found, or why it failed.
pub type Outcome = Result<Probe, ProbeError>;

/// Why a node left service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    /// Its health checks failed `max_retries + 1` times in a row.
    HealthCheck,
    /// It claims to be primary while another node is the authoritative one.
    FalsePrimary,
    /// An operator detached it.
    Detached,
}

/// A change the health monitor acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// `node` left service (`failover_command`).
    Down {
        node: usize,
        reason: DownReason,
        /// The primary before the change (`%P`).
        old_primary: Option<usize>,
        /// The main node before the change (`%M`).
        old_main: Option<usize>,
        /// The main node after it (`%m`): when the primary was lost, the replica
        /// that should replace it.
        new_main: Option<usize>,
    },
    /// A down node is back in service (`failback_command`).
    Up { node: usize },
    /// `node` is the primary now. `follow`: the previous primary was lost, so the
    /// other nodes are told to follow this one (`follow_primary_command`).
    NewPrimary {
        node: usize,
        old: Option<usize>,
        follow: bool,
    },
    /// The primary is in recovery now (demoted by a switchover); its pools go.
    Demoted { node: usize },
}

/// What a reload did to the nodes.
#[derive(Debug, Default)]
pub struct BackendChanges {
    /// Nodes added (or listed again).
    pub added: Vec<usize>,
    /// Nodes no longer listed: they take nothing and their pools close.
    pub removed: Vec<usize>,
    pub transitions: Vec<Transition>,
}

/// An operator's command (the admin console's `DETACH NODE`, `ATTACH NODE`,
/// `PROMOTE NODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Take the node out of service (runs `failover_command`); it stays out until
    /// attached.
    Detach(usize),
    /// Put a node that answers its probes back into service (runs `failback_command`).
    Attach(usize),
    /// Make `node` pgrelay's primary. With `switchover`, the current primary is
    /// detached first (running `failover_command` with `node` as the new main node,
    /// for the script to promote), writes wait until `node` leaves recovery, and the
    /// other nodes are told to follow it.
    Promote { node: usize, switchover: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperationError {
    #[error("there is no node {0}")]
    NoSuchNode(usize),
    #[error("node {0} does not answer its health checks")]
    Unreachable(usize),
    #[error("node {0} is not in service")]
    NotUp(usize),
}
