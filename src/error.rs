//! Error classification shared by every module: a fixed [`ErrorKind`] (used as a metric
//! label), the [`Side`] that caused it, and [`ClientError`], the allowlist of what a
//! client may be told.
//!
//! Module errors stay typed (`thiserror`, sources kept); an error reaches a client only
//! by being turned into a `ClientError`, which carries a PostgreSQL SQLSTATE.

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
}

impl ErrorKind {
    /// Every kind, for metrics resolved up front.
    pub const ALL: [ErrorKind; 11] = [
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
        }
    }
}

/// Which end of a session caused an error: it decides whether a server is discarded
/// and whether a node's health is in question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
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
        Self::fatal(ErrorKind::Protocol, "08P01", message)
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
