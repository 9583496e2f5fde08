//! Error classification shared by every module: a fixed [`ErrorKind`] (used as a metric
//! label), the [`Side`] that caused it, and [`ClientError`], the allowlist of what a
//! client may be told.
//!
//! Module errors stay typed (`thiserror`, sources kept); an error reaches a client only
//! by being turned into a `ClientError`, which carries a PostgreSQL SQLSTATE from
//! [`sqlstate`] and a message written for the client. Addresses, io errors and
//! authentication failures between pgrelay and its servers go to the log, never into
//! a `ClientError`: the constructors below are the allowlist of what pgrelay says in
//! its own words.

use std::borrow::Cow;

use bytes::BytesMut;

use crate::protocol::backend::{self, Severity};

/// What went wrong, in a fixed set fit for a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    Protocol,
    Auth,
    ClientLimit,
    UnknownDatabase,
    PoolTimeout,
    ServerConnect,
    ServerAuth,
    ServerLost,
    ClientLost,
    Config,
    /// A refused or failed admin console command.
    Admin,
    /// A client ended by `query_timeout`, `idle_transaction_timeout`,
    /// `transaction_timeout` or `client_idle_timeout`.
    Timeout,
}

impl ErrorKind {
    /// Every kind, for metrics resolved up front.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::Protocol,
        ErrorKind::Auth,
        ErrorKind::ClientLimit,
        ErrorKind::UnknownDatabase,
        ErrorKind::PoolTimeout,
        ErrorKind::ServerConnect,
        ErrorKind::ServerAuth,
        ErrorKind::ServerLost,
        ErrorKind::ClientLost,
        ErrorKind::Config,
        ErrorKind::Admin,
        ErrorKind::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Auth => "auth",
            ErrorKind::ClientLimit => "client_limit",
            ErrorKind::UnknownDatabase => "unknown_database",
            ErrorKind::PoolTimeout => "pool_timeout",
            ErrorKind::ServerConnect => "server_connect",
            ErrorKind::ServerAuth => "server_auth",
            ErrorKind::ServerLost => "server_lost",
            ErrorKind::ClientLost => "client_lost",
            ErrorKind::Config => "config",
            ErrorKind::Admin => "admin",
            ErrorKind::Timeout => "timeout",
        }
    }
}

/// Which end of a session caused an error: it decides whether a server is discarded
/// and whether a node's health is in question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// What the client asked for was refused; the server is as good as before.
    Client,
    /// The server (or the way to it) failed; it is not to be used again.
    Server,
}

/// The SQLSTATE codes pgrelay writes in its own ErrorResponses (PostgreSQL's
/// `errcodes.txt` names).
pub mod sqlstate {
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const IN_FAILED_SQL_TRANSACTION: &str = "25P02";
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: &str = "25P03";
    pub const TRANSACTION_TIMEOUT: &str = "25P04";
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    pub const QUERY_CANCELED: &str = "57014";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const IDLE_SESSION_TIMEOUT: &str = "57P05";
}

/// An error a client may see: an ErrorResponse with a SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub kind: ErrorKind,
    pub code: Cow<'static, str>,
    pub message: String,
    /// FATAL errors end the client's connection after they are sent.
    pub fatal: bool,
}

impl ClientError {
    pub fn fatal(
        kind: ErrorKind,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        ClientError {
            kind,
            code: code.into(),
            message: message.into(),
            fatal: true,
        }
    }

    /// Like [`ClientError::fatal`], but the connection stays open.
    pub fn error(
        kind: ErrorKind,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        ClientError {
            fatal: false,
            ..Self::fatal(kind, code, message)
        }
    }

    pub fn protocol(message: impl Into<String>) -> Self {
        Self::fatal(ErrorKind::Protocol, sqlstate::PROTOCOL_VIOLATION, message)
    }

    /// `max_client_conn` clients are connected already.
    pub fn too_many_clients() -> Self {
        Self::fatal(
            ErrorKind::ClientLimit,
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        )
    }

    /// The client's address had `limits.auth_failure_limit` failed logins in the
    /// window: it is refused without a look at its credentials.
    pub fn too_many_auth_failures() -> Self {
        Self::fatal(
            ErrorKind::ClientLimit,
            sqlstate::TOO_MANY_CONNECTIONS,
            "too many failed logins from this address; try again later (limits.auth_failure_limit)",
        )
    }

    /// A request larger than `limits.max_request_buffer`: it is not buffered, and the
    /// connection closes (the rest of it is still on its way).
    pub fn request_too_large(max: usize) -> Self {
        Self::fatal(
            ErrorKind::ClientLimit,
            sqlstate::PROGRAM_LIMIT_EXCEEDED,
            format!(
                "request too large: more than {max} bytes that pgrelay would have to buffer (limits.max_request_buffer)"
            ),
        )
    }

    /// A server could not be reached, or is going away: which one and why is logged.
    pub fn server_unavailable() -> Self {
        Self::fatal(
            ErrorKind::ServerConnect,
            sqlstate::CONNECTION_FAILURE,
            "the server is not available",
        )
    }

    /// pgrelay could not log in to a server for a reason that is its own
    /// configuration's (an authentication method or a SCRAM exchange it cannot
    /// complete): the log has the details.
    pub fn server_login_failed() -> Self {
        Self::fatal(
            ErrorKind::ServerAuth,
            sqlstate::CONNECTION_FAILURE,
            "pgrelay could not log in to the server",
        )
    }

    /// The primary is unknown or cannot be reached, and `failover.hold_timeout` passed.
    pub fn no_primary(waited: std::time::Duration) -> Self {
        Self::error(
            ErrorKind::ServerConnect,
            sqlstate::CONNECTION_FAILURE,
            format!(
                "the primary server is not available (waited failover.hold_timeout, {waited:?})"
            ),
        )
    }

    /// A `replica` endpoint without `primary_fallback`: no replica could take the
    /// request within `failover.hold_timeout`.
    pub fn no_replica(waited: std::time::Duration) -> Self {
        Self::error(
            ErrorKind::ServerConnect,
            sqlstate::CONNECTION_FAILURE,
            format!(
                "no replica is available for this read-only endpoint (waited failover.hold_timeout, {waited:?}; primary_fallback = false)"
            ),
        )
    }

    /// A login over `max_user_client_connections` or `max_db_client_connections`:
    /// `of` is "user" or "database", `name` its name, `setting` the limit's key.
    pub fn too_many_clients_of(of: &str, name: &str, setting: &str) -> Self {
        Self::fatal(
            ErrorKind::ClientLimit,
            sqlstate::TOO_MANY_CONNECTIONS,
            format!("too many client connections for {of} \"{name}\" ({setting})"),
        )
    }

    /// No server connection was free within `query_wait_timeout`.
    pub fn pool_timeout(wait: std::time::Duration) -> Self {
        Self::error(
            ErrorKind::PoolTimeout,
            sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
            format!("query_wait_timeout: no server connection became available within {wait:?}"),
        )
    }

    /// The client's socket failed while pgrelay wrote to it (the client never reads it).
    pub fn client_gone() -> Self {
        Self::fatal(
            ErrorKind::ClientLost,
            sqlstate::CONNECTION_FAILURE,
            "client went away",
        )
    }

    /// What an idle client is told when pgrelay shuts down.
    pub fn shutting_down() -> Self {
        Self::fatal(
            ErrorKind::ClientLost,
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection because pgrelay is shutting down",
        )
    }

    /// What a client terminated by `KILL` or `pg_terminate_backend` is told, as
    /// PostgreSQL tells a terminated session.
    pub fn terminated() -> Self {
        Self::fatal(
            ErrorKind::ClientLost,
            sqlstate::ADMIN_SHUTDOWN,
            "terminating connection due to administrator command",
        )
    }

    /// `query_timeout`: the server did not finish answering a request in time.
    pub fn query_timeout(after: std::time::Duration) -> Self {
        Self::fatal(
            ErrorKind::Timeout,
            sqlstate::QUERY_CANCELED,
            format!("terminating connection due to query_timeout: the server did not answer within {after:?}"),
        )
    }

    /// `idle_transaction_timeout`: the client sat idle inside a transaction block.
    pub fn idle_transaction_timeout() -> Self {
        Self::fatal(
            ErrorKind::Timeout,
            sqlstate::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            "terminating connection due to idle-in-transaction timeout (idle_transaction_timeout)",
        )
    }

    /// `transaction_timeout`: a transaction block stayed open too long.
    pub fn transaction_timeout() -> Self {
        Self::fatal(
            ErrorKind::Timeout,
            sqlstate::TRANSACTION_TIMEOUT,
            "terminating connection due to transaction timeout (transaction_timeout)",
        )
    }

    /// `client_idle_timeout`: the client sent nothing for too long between transactions.
    pub fn client_idle_timeout() -> Self {
        Self::fatal(
            ErrorKind::Timeout,
            sqlstate::IDLE_SESSION_TIMEOUT,
            "terminating connection due to idle-session timeout (client_idle_timeout)",
        )
    }

    /// The client did not finish logging in within `client_login_timeout`.
    pub fn login_timeout() -> Self {
        Self::fatal(
            ErrorKind::Protocol,
            sqlstate::PROTOCOL_VIOLATION,
            "client_login_timeout expired before the client logged in",
        )
    }

    /// Appends the ErrorResponse to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        let severity = if self.fatal {
            Severity::Fatal
        } else {
            Severity::Error
        };
        backend::error_response(buf, severity, &self.code, &self.message);
    }
}
