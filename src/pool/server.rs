//! One PostgreSQL server connection: connect, log in with whatever the server asks for
//! (trust, cleartext, md5, SCRAM-SHA-256), remember its key and parameters, and run
//! pgrelay's own housekeeping queries on it (reset, parameter reconciliation).
//!
//! It never talks to clients; the relay moves client traffic through [`Server::conn`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::DuplexStream;
use tokio::net::TcpStream;

use crate::auth::{md5, scram, ServerCredentials};
use crate::error::Side;
use crate::protocol::backend::{self, ErrorFields};
use crate::protocol::MAX_MESSAGE_LEN;
use crate::stream::{Conn, Stream, StreamError};

use super::params::ParamSet;
use super::statements::ServerStatements;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {addr}")]
    ConnectTimeout { addr: String },
    #[error("server rejected the connection: {} ({})", .0.message, .0.code)]
    Rejected(ErrorFields),
    #[error("server asked for an authentication method pgrelay cannot answer: {0}")]
    AuthMethod(&'static str),
    #[error("SCRAM with server failed: {0}")]
    Scram(#[source] ScramFailure),
    #[error("server error during an internal query: {} ({})", .0.message, .0.code)]
    Query(ErrorFields),
    #[error("unexpected message {tag:?} from server")]
    Unexpected { tag: char },
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// Why a SCRAM login to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ScramFailure {
    /// postgres-protocol's client, logging in with a password.
    #[error(transparent)]
    Password(std::io::Error),
    /// pgrelay's own client, logging in with the keys a client proved.
    #[error(transparent)]
    Keys(#[from] scram::ScramError),
}

impl ServerError {
    /// Who caused it: a server's refusal of pgrelay's own query (a client's setting
    /// it rejects) leaves the server usable, everything else does not.
    pub fn side(&self) -> Side {
        match self {
            ServerError::Query(_) if !self.unreachable() => Side::Client,
            _ => Side::Server,
        }
    }

    /// The server could not be reached or is going away: refused, reset, timed out,
    /// closed, or an answer of 57P01-57P03 (shutting down, crashed, starting up) or
    /// class 08. The client's request never reached it, so waiting for the cluster to
    /// settle and trying again (perhaps elsewhere) is safe. Refusals of the login
    /// itself (password, database, method) are not: they say the same next time.
    pub fn unreachable(&self) -> bool {
        match self {
            ServerError::Connect { .. }
            | ServerError::ConnectTimeout { .. }
            | ServerError::Unexpected { .. }
            | ServerError::Stream(_) => true,
            ServerError::Rejected(fields) | ServerError::Query(fields) => {
                fields.code.starts_with("57P") || fields.code.starts_with("08")
            }
            ServerError::AuthMethod(_) | ServerError::Scram(_) => false,
        }
    }
}

/// Where and as whom a pool's servers connect.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
}

/// An authenticated server connection.
pub struct Server {
    pub conn: Conn<Stream>,
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    /// What the session currently has set: reported values and settings pgrelay applied.
    pub params: ParamSet,
    pub created: Instant,
    /// When it last went back to its pool.
    pub idle_since: Instant,
    /// The statements pgrelay prepared on it for clients (transaction mode).
    pub statements: ServerStatements,
    /// Its pool's epoch when it was opened (see `Pools::retire_node`).
    pub epoch: u64,
}

/// How a pool reaches its servers.
#[derive(Debug, Clone, Default)]
pub enum Dial {
    /// TCP to the target's host and port: every pool a running pgrelay has.
    #[default]
    Tcp,
    /// An in-memory pipe per server, its far end sent here for a fake server to
    /// answer: a listener in memory, so that a benchmark drives the real pool and
    /// session without sockets or PostgreSQL (`benches/request.rs`). Only
    /// `Pools::dialing` sets it.
    Memory(tokio::sync::mpsc::UnboundedSender<DuplexStream>),
}

/// How many bytes an in-memory pipe holds in each direction before a write waits.
const MEMORY_PIPE: usize = 64 * 1024;

impl Server {
    /// Opens a server the way `dial` says and logs in to it.
    pub async fn dial(
        dial: &Dial,
        target: &ServerTarget,
        credentials: &ServerCredentials,
        timeout: Duration,
    ) -> Result<Server, ServerError> {
        match dial {
            Dial::Tcp => Server::connect(target, credentials, timeout).await,
            Dial::Memory(listener) => {
                let (near, far) = tokio::io::duplex(MEMORY_PIPE);
                listener.send(far).map_err(|_| ServerError::Connect {
                    addr: "memory".into(),
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                })?;
                // No address: a cancel request for it fails to connect, and is logged.
                let addr = SocketAddr::from(([0, 0, 0, 0], 0));
                let server = Server::new(Stream::Memory(near), addr);
                server.login_within(target, credentials, timeout).await
            }
        }
    }

    /// Connects to `target` over TCP and logs in.
    pub async fn connect(
        target: &ServerTarget,
        credentials: &ServerCredentials,
        timeout: Duration,
    ) -> Result<Server, ServerError> {
        let addr_text = format!("{}:{}", target.host, target.port);
        let tcp = tokio::time::timeout(
            timeout,
            TcpStream::connect((target.host.as_str(), target.port)),
        )
        .await
        .map_err(|_| ServerError::ConnectTimeout {
            addr: addr_text.clone(),
        })?
        .map_err(|source| ServerError::Connect {
            addr: addr_text.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let addr = tcp.peer_addr().map_err(|source| ServerError::Connect {
            addr: addr_text.clone(),
            source,
        })?;
        Server::new(Stream::Plain(tcp), addr)
            .login_within(target, credentials, timeout)
            .await
    }

    fn new(stream: Stream, addr: SocketAddr) -> Server {
        Server {
            conn: Conn::new(stream),
            addr,
            pid: 0,
            secret: 0,
            params: ParamSet::default(),
            created: Instant::now(),
            idle_since: Instant::now(),
            statements: ServerStatements::default(),
            epoch: 0,
        }
    }

    /// The startup handshake, within `timeout`.
    async fn login_within(
        mut self,
        target: &ServerTarget,
        credentials: &ServerCredentials,
        timeout: Duration,
    ) -> Result<Server, ServerError> {
        tokio::time::timeout(timeout, self.login(target, credentials))
            .await
            .map_err(|_| ServerError::ConnectTimeout {
                addr: format!("{}:{}", target.host, target.port),
            })??;
        Ok(self)
    }

    async fn login(
        &mut self,
        target: &ServerTarget,
        credentials: &ServerCredentials,
    ) -> Result<(), ServerError> {
        let params = [
            ("user", target.user.as_str()),
            ("database", target.dbname.as_str()),
        ];
        encode(
            |b| frontend::startup_message(params.iter().copied(), b),
            self.conn.wbuf(),
        );
        self.conn.flush().await?;
        let mut scram = None;
        loop {
            let frame = self.conn.read_frame(MAX_MESSAGE_LEN).await?;
            match frame.tag() {
                backend::AUTHENTICATION => {
                    self.authenticate(frame.body(), target, credentials, &mut scram)
                        .await?
                }
                backend::PARAMETER_STATUS => {
                    let (name, value) =
                        backend::parameter_status(frame.body()).map_err(StreamError::from)?;
                    self.params.set_reported(name, value);
                }
                backend::BACKEND_KEY_DATA => {
                    (self.pid, self.secret) =
                        backend::backend_key(frame.body()).map_err(StreamError::from)?;
                }
                backend::ERROR_RESPONSE => {
                    return Err(ServerError::Rejected(backend::error_fields(frame.body())))
                }
                backend::READY_FOR_QUERY => return Ok(()),
                backend::NOTICE_RESPONSE | b'v' => {}
                tag => return Err(ServerError::Unexpected { tag: tag as char }),
            }
        }
    }

    async fn authenticate(
        &mut self,
        body: &[u8],
        target: &ServerTarget,
        credentials: &ServerCredentials,
        scram: &mut Option<ScramState>,
    ) -> Result<(), ServerError> {
        let malformed = || ServerError::Unexpected { tag: 'R' };
        let code = body
            .get(..4)
            .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .ok_or_else(malformed)?;
        let data = &body[4..];
        let wbuf = self.conn.wbuf();
        match (code, credentials) {
            (0, _) => return Ok(()),
            (3, ServerCredentials::Password(p)) => {
                encode(|b| frontend::password_message(p, b), wbuf)
            }
            (3, _) => {
                return Err(ServerError::AuthMethod(
                    "cleartext password without a plaintext password",
                ))
            }
            (5, creds) => {
                let salt: [u8; 4] = data.try_into().map_err(|_| malformed())?;
                let stored = match creds {
                    ServerCredentials::Password(p) => md5::stored_hash(&target.user, p),
                    ServerCredentials::Md5(h) => *h,
                    _ => {
                        return Err(ServerError::AuthMethod(
                            "md5 without a password or md5 hash",
                        ))
                    }
                };
                encode(
                    |b| frontend::password_message(md5::response(&stored, salt).as_bytes(), b),
                    wbuf,
                );
            }
            (10, creds) => {
                let (state, first) = ScramState::start(creds)?;
                encode(
                    |b| frontend::sasl_initial_response(scram::MECHANISM, &first, b),
                    wbuf,
                );
                *scram = Some(state);
            }
            (11, _) => {
                let state = scram.as_mut().ok_or_else(malformed)?;
                let client_final = state.respond(data)?;
                encode(|b| frontend::sasl_response(&client_final, b), wbuf);
            }
            (12, _) => return scram.take().ok_or_else(malformed)?.finish(data),
            _ => {
                return Err(ServerError::AuthMethod(
                    "an unsupported method (GSSAPI, SSPI, Kerberos)",
                ))
            }
        }
        self.conn.flush().await?;
        Ok(())
    }

    /// Runs one simple query of pgrelay's own and waits for ReadyForQuery, recording
    /// the parameters it changes. Not cancel safe.
    pub async fn run(&mut self, sql: &str) -> Result<(), ServerError> {
        self.query_value(sql).await.map(drop)
    }

    /// Like [`Server::run`], returning the first column of the first row as text.
    pub async fn query_value(&mut self, sql: &str) -> Result<Option<String>, ServerError> {
        Ok(self.query_row(sql).await?.into_iter().next().flatten())
    }

    /// Like [`Server::run`], returning every column of the first row as text (NULL as
    /// None; no row, no columns).
    pub async fn query_row(&mut self, sql: &str) -> Result<Vec<Option<String>>, ServerError> {
        encode(|b| frontend::query(sql, b), self.conn.wbuf());
        self.conn.flush().await?;
        let (mut failure, mut value): (_, Option<Vec<Option<String>>>) = (None, None);
        loop {
            let frame = self.conn.read_frame(MAX_MESSAGE_LEN).await?;
            match frame.tag() {
                backend::PARAMETER_STATUS => {
                    let (name, value) =
                        backend::parameter_status(frame.body()).map_err(StreamError::from)?;
                    self.params.set_reported(name, value);
                }
                b'D' if value.is_none() => value = Some(columns(frame.body())),
                backend::ERROR_RESPONSE => failure = Some(backend::error_fields(frame.body())),
                backend::READY_FOR_QUERY => break,
                _ => {}
            }
        }
        failure.map_or(Ok(value.unwrap_or_default()), |f| {
            Err(ServerError::Query(f))
        })
    }

    /// Makes this server's parameters equal to `desired` (a client's). Not cancel safe.
    pub async fn reconcile(&mut self, desired: &ParamSet) -> Result<(), ServerError> {
        if self.params.fingerprint() == desired.fingerprint() {
            return Ok(());
        }
        if let Some(sql) = self.params.reconcile_sql(desired) {
            tracing::debug!(pid = self.pid, %sql, "reconciling server parameters");
            // Boxed: rare (the sets differ), and kept out of every client's task.
            Box::pin(self.run(&sql)).await?;
            self.params.record_reconciled(desired);
        }
        Ok(())
    }
}

/// The columns of a DataRow body, as text (NULL as None).
fn columns(body: &[u8]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let Some(count) = body.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])) else {
        return out;
    };
    let mut rest = &body[2..];
    for _ in 0..count {
        let Some(len) = rest
            .get(..4)
            .map(|l| i32::from_be_bytes([l[0], l[1], l[2], l[3]]))
        else {
            break;
        };
        rest = &rest[4..];
        match usize::try_from(len) {
            Ok(len) if len <= rest.len() => {
                out.push(Some(String::from_utf8_lossy(&rest[..len]).into_owned()));
                rest = &rest[len..];
            }
            Ok(_) => break,
            Err(_) => out.push(None),
        }
    }
    out
}

/// postgres-protocol's builders only fail on lengths over 2 GiB; ours are tiny.
fn encode(build: impl FnOnce(&mut BytesMut) -> std::io::Result<()>, buf: &mut BytesMut) {
    if let Err(err) = build(buf) {
        tracing::error!(%err, "could not encode a message to the server");
    }
}

/// A SCRAM login in progress: with a password (postgres-protocol's client) or with the
/// keys a client proved to pgrelay.
enum ScramState {
    Password(Box<ScramSha256>),
    Keys {
        client: scram::KeyClient,
        server_final: Option<String>,
    },
}

impl ScramState {
    fn start(credentials: &ServerCredentials) -> Result<(ScramState, Vec<u8>), ServerError> {
        match credentials {
            ServerCredentials::Password(p) => {
                let client = ScramSha256::new(p, ChannelBinding::unsupported());
                let first = client.message().to_vec();
                Ok((ScramState::Password(Box::new(client)), first))
            }
            ServerCredentials::ScramKeys {
                client_key,
                server_key,
            } => {
                let (client, first) = scram::KeyClient::new(*client_key, *server_key);
                Ok((
                    ScramState::Keys {
                        client,
                        server_final: None,
                    },
                    first.into_bytes(),
                ))
            }
            ServerCredentials::Md5(_) => {
                Err(ServerError::AuthMethod("SCRAM with only an md5 hash"))
            }
            ServerCredentials::Missing => Err(ServerError::AuthMethod(
                "SCRAM before any client proved its key (log in once with the password)",
            )),
        }
    }

    fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ServerError> {
        match self {
            ScramState::Password(client) => {
                client
                    .update(server_first)
                    .map_err(|e| ServerError::Scram(ScramFailure::Password(e)))?;
                Ok(client.message().to_vec())
            }
            ScramState::Keys {
                client,
                server_final,
            } => {
                let (message, expected) = client
                    .respond(server_first)
                    .map_err(|e| ServerError::Scram(e.into()))?;
                *server_final = Some(expected);
                Ok(message.into_bytes())
            }
        }
    }

    fn finish(self, server_final: &[u8]) -> Result<(), ServerError> {
        match self {
            ScramState::Password(mut client) => client
                .finish(server_final)
                .map_err(|e| ServerError::Scram(ScramFailure::Password(e))),
            ScramState::Keys {
                server_final: Some(expected),
                ..
            } if expected.as_bytes() == server_final => Ok(()),
            ScramState::Keys { .. } => Err(ServerError::Scram(
                scram::ScramError::ServerSignature.into(),
            )),
        }
    }
}

impl Server {
    /// Sends Terminate and closes, without waiting long for a server that is gone.
    pub async fn terminate(mut self) {
        frontend::terminate(self.conn.wbuf());
        let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.flush()).await;
        self.conn.shutdown().await;
    }

    /// What a CancelRequest for this server's current query needs.
    pub fn cancel_target(&self) -> crate::cancel::CancelTarget {
        crate::cancel::CancelTarget {
            addr: self.addr,
            pid: self.pid,
            secret: self.secret,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(code: &str) -> ErrorFields {
        ErrorFields {
            severity: "FATAL".into(),
            code: code.into(),
            message: "m".into(),
            routine: String::new(),
        }
    }

    /// Going away or not reached: worth a wait and another try. Refused logins: not.
    #[test]
    fn unreachable_servers() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let connect = ServerError::Connect {
            addr: "127.0.0.1:5432".into(),
            source: refused,
        };
        assert!(connect.unreachable());
        for code in ["57P01", "57P02", "57P03", "08006"] {
            assert!(ServerError::Rejected(fields(code)).unreachable(), "{code}");
            assert!(ServerError::Query(fields(code)).unreachable(), "{code}");
        }
        for code in ["28P01", "3D000", "53300", "22023"] {
            assert!(!ServerError::Rejected(fields(code)).unreachable(), "{code}");
        }
        assert!(!ServerError::AuthMethod("GSS").unreachable());
    }

    /// Only a refusal of pgrelay's own query leaves a server fit to keep.
    #[test]
    fn sides() {
        assert_eq!(ServerError::Query(fields("22023")).side(), Side::Client);
        assert_eq!(ServerError::Query(fields("57P01")).side(), Side::Server);
        assert_eq!(ServerError::Rejected(fields("28P01")).side(), Side::Server);
        let closed = ServerError::Stream(StreamError::Closed);
        assert_eq!(closed.side(), Side::Server);
    }

    /// A SCRAM failure keeps its cause as a source, not as text.
    #[test]
    fn scram_failures_keep_their_source() {
        use std::error::Error;
        let err = ServerError::Scram(scram::ScramError::ServerSignature.into());
        let source = err.source().expect("a source");
        assert_eq!(source.to_string(), "server signature does not match");
    }
}
