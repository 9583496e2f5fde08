//! A session handed to another pgrelay process (`pgrelay run --takeover`): between
//! transactions, a transaction-mode client with nothing pinned to a server moves with
//! its socket and what the session knows of it (who it is, its parameters, its
//! prepared statements, its cancel key, what its reads must see of its writes). The
//! new process goes on where this one stopped; the client sees nothing.
//!
//! What cannot move stays and ends as in a shutdown: a TLS client (its connection's
//! keys live in this process), a session-mode client (its server is its own), a
//! client pinned to a server by session state, the admin console.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::auth::ClientLogin;
use crate::config::{EndpointTarget, PoolMode};
use crate::error::ClientError;
use crate::pool::params::ParamSet;
use crate::registry;
use crate::stream::{Conn, Stream};
use crate::Shared;

use super::fail::say_goodbye;
use super::route;
use super::state::Attachment;
use super::Session;

/// What a session is, for the process that goes on with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    pub user: String,
    pub database: String,
    /// Settings from its startup packet.
    pub gucs: Vec<(String, String)>,
    pub minor: u16,
    /// Its endpoint: `auto`, `primary`, `replica` or `any`, and whether a replica
    /// endpoint may fall back to the primary.
    pub target: String,
    pub fallback: bool,
    /// Its parameter set: `(name, value, reported)`.
    pub params: Vec<(String, String, bool)>,
    /// The cancel key it was given.
    pub pid: i32,
    #[serde(with = "base64_bytes")]
    pub secret: Vec<u8>,
    /// Its prepared statements.
    pub statements: Vec<Carried>,
    /// `read_after_write`: it may have written (`Some`), and the primary's WAL
    /// position its reads must wait for, if taken.
    pub writes: Option<Option<u64>>,
    pub pid_statements: bool,
    pub application_name: String,
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    /// A Unix-socket client: the port its socket file's name carries.
    pub unix: Option<u16>,
}

/// One prepared statement: the client's name and the Parse body after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    #[serde(with = "base64_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "base64_bytes")]
    pub rest: Vec<u8>,
}

/// A client on its way to another process: its socket and its state.
#[derive(Debug)]
pub struct Transfer {
    pub fd: OwnedFd,
    pub state: SessionState,
}

/// Where sessions are handed while a takeover runs.
pub type Outbox = tokio::sync::mpsc::UnboundedSender<Transfer>;

fn target_name(target: EndpointTarget) -> &'static str {
    match target {
        EndpointTarget::Auto => "auto",
        EndpointTarget::Primary => "primary",
        EndpointTarget::Replica => "replica",
        EndpointTarget::Any => "any",
    }
}

fn target_named(name: &str) -> Option<EndpointTarget> {
    Some(match name {
        "auto" => EndpointTarget::Auto,
        "primary" => EndpointTarget::Primary,
        "replica" => EndpointTarget::Replica,
        "any" => EndpointTarget::Any,
        _ => return None,
    })
}

impl Session {
    /// A takeover runs and this session can move now: transaction mode, between
    /// transactions, nothing pinned or held, a plain socket, and nothing of its next
    /// request read yet (what the kernel holds moves with the socket).
    pub(super) fn may_hand_over(&self) -> bool {
        self.handing_over()
            && self.movable()
            && matches!(self.attachment, Attachment::Detached)
            && self.pin.is_none()
            && self.held.iter().all(Option::is_none)
            && self.client.rbuf_len() == 0
            && self.wire.client.last_boundary != Some(crate::protocol::frontend::FLUSH)
    }

    /// A takeover runs and the process taking over is still there.
    pub(super) fn handing_over(&self) -> bool {
        self.shared
            .handover
            .get()
            .is_some_and(|outbox| !outbox.is_closed())
    }

    /// Whether this session can ever move: a transaction-mode client on a plain
    /// socket. (One that cannot is told to go between transactions, as in a shutdown.)
    pub(super) fn movable(&self) -> bool {
        self.mode == PoolMode::Transaction
            && matches!(self.client.get_ref(), Stream::Plain(_) | Stream::Unix(_))
    }

    fn handover_state(&self) -> SessionState {
        let entry = &self.handle.entry;
        let statements = self.wire.prepared.as_deref().map_or_else(Vec::new, |p| {
            p.listed()
                .map(|(name, rest)| Carried {
                    name: name.to_vec(),
                    rest: rest.to_vec(),
                })
                .collect()
        });
        SessionState {
            user: self.login.user.clone(),
            database: self.login.database.clone(),
            gucs: self.login.gucs.clone(),
            minor: self.login.minor,
            target: target_name(self.target.0).to_owned(),
            fallback: self.target.1,
            params: self
                .params
                .entries()
                .map(|(n, v, r)| (n.to_owned(), v.to_owned(), r))
                .collect(),
            pid: self.cancel.pid(),
            secret: self.cancel.secret().to_vec(),
            statements,
            writes: self.routing.writes_state(),
            pid_statements: self.wire.client.pid_statements,
            application_name: entry.application_name.clone(),
            addr: entry.addr,
            local: entry.local,
            unix: entry.unix,
        }
    }

    /// Hands the session to the process taking over: its state and its socket go
    /// there, and this task ends without a word to the client.
    pub(super) async fn hand_over(mut self) {
        let state = self.handover_state();
        self.account();
        self.count_prepared();
        self.cancel.set(None).await;
        let Some(outbox) = self.shared.handover.get().cloned() else {
            return self.finish().await;
        };
        let Session { client, .. } = self;
        let fd = match client.into_io() {
            Stream::Plain(tcp) => tcp.into_std().map(OwnedFd::from),
            Stream::Unix(socket) => socket.into_std().map(OwnedFd::from),
            // `may_hand_over` let only plain sockets through.
            _ => return,
        };
        match fd {
            Ok(fd) => {
                if outbox.send(Transfer { fd, state }).is_err() {
                    tracing::warn!(
                        "the process taking over is gone: a client handed to it is closed"
                    );
                }
            }
            Err(err) => tracing::warn!(%err, "a client's socket could not be handed over"),
        }
    }
}

/// Goes on with a session another process handed over, on `stream` (its socket),
/// with `cancel` the key it was given if it is still reserved for it here.
pub async fn resume(
    shared: Arc<Shared>,
    stream: Stream,
    state: SessionState,
    reserved: Option<crate::cancel::CancelHandle>,
) {
    let mut client = Conn::new(stream);
    let config = shared.config.load_full();
    let mode = config.pool_mode_for(&state.database, &state.user);
    let Some(target) = target_named(&state.target) else {
        return say_goodbye(&mut client, &ClientError::shutting_down()).await;
    };
    if mode != PoolMode::Transaction {
        // The new config pools this client in session mode: it cannot go on unseen.
        tracing::info!(user = %state.user, database = %state.database, "a client handed over is now in a session-mode pool: it is closed");
        return say_goodbye(&mut client, &ClientError::shutting_down()).await;
    }
    let new_client = registry::NewClient {
        user: &state.user,
        database: &state.database,
        application_name: &state.application_name,
        addr: state.addr,
        local: state.local,
        unix: state.unix,
        admin: false,
        tls: "",
    };
    let handle = match super::register(&shared, &config, new_client) {
        Ok(handle) => handle,
        Err(err) => return say_goodbye(&mut client, &err).await,
    };
    let login = ClientLogin {
        user: state.user,
        database: state.database,
        gucs: state.gucs,
        minor: state.minor,
    };
    let endpoint = (target, state.fallback);
    let deadline = tokio::time::Instant::now() + config.failover.hold_timeout;
    let greeting = route::greeting_pool(&shared, &config, &login, (mode, endpoint), deadline);
    let pool = match greeting.await {
        Ok(pool) => pool,
        Err(err) => return say_goodbye(&mut client, &err).await,
    };
    let params = ParamSet::from_entries(
        state
            .params
            .iter()
            .map(|(n, v, r)| (n.as_str(), v.as_str(), *r)),
    );
    let cancel = reserved
        .filter(|handle| handle.pid() == state.pid && handle.secret() == &state.secret[..])
        .inspect(|handle| handle.claim())
        .or_else(|| {
            let secret = state.secret.clone().into_boxed_slice();
            shared.cancel.register_issued(state.pid, secret)
        })
        .unwrap_or_else(|| {
            tracing::warn!(pid = state.pid, "a handed-over client's cancel key is taken here: it gets a new one, and its old key cancels nothing");
            let len = crate::protocol::backend::secret_len(login.minor);
            shared.cancel.register_random(len)
        });
    let parts = super::Parts {
        login,
        endpoint,
        mode,
        pool,
        params,
        cancel,
        handle,
    };
    let mut session = Session::assemble(shared, client, parts, &config);
    let search_path = session.params.get("search_path").map(str::to_owned);
    if let Some(prepared) = session.wire.prepared.as_deref_mut() {
        for carried in &state.statements {
            prepared.adopt(&carried.name, &carried.rest, search_path.as_deref());
        }
    }
    session.routing.resume_writes(state.writes);
    session.wire.client.pid_statements = state.pid_statements;
    let mut session = Box::new(session);
    let exit = session.run().await;
    Box::pin(session.end(exit)).await
}

/// Byte strings as base64 in the JSON a takeover sends.
mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_its_json() {
        let state = SessionState {
            user: "app".into(),
            database: "app".into(),
            gucs: vec![("application_name".into(), "pgbench".into())],
            minor: 2,
            target: "replica".into(),
            fallback: true,
            params: vec![("TimeZone".into(), "UTC".into(), true)],
            pid: 4_200_000,
            secret: vec![0, 7, 255, 1, 2, 3, 4, 5],
            statements: vec![Carried {
                name: b"s1".to_vec(),
                rest: b"SELECT $1\0\0\x01\0\0\0\x17".to_vec(),
            }],
            writes: Some(Some(0x1_0000_0028)),
            pid_statements: false,
            application_name: "pgbench".into(),
            addr: Some("127.0.0.1:40000".parse().unwrap()),
            local: Some("127.0.0.1:6432".parse().unwrap()),
            unix: None,
        };
        let json = serde_json::to_string(&state).unwrap();
        assert!(json.contains("\"secret\":\"AAf/AQIDBAU=\""), "{json}");
        assert_eq!(serde_json::from_str::<SessionState>(&json).unwrap(), state);
    }

    #[test]
    fn every_target_has_a_name() {
        for target in [
            EndpointTarget::Auto,
            EndpointTarget::Primary,
            EndpointTarget::Replica,
            EndpointTarget::Any,
        ] {
            assert_eq!(target_named(target_name(target)), Some(target));
        }
        assert_eq!(target_named("other"), None);
    }
}
