//! One PostgreSQL server connection: connect (over TLS as `tls.server_mode` says), log
//! in with whatever the server asks for (trust, cleartext, md5, SCRAM-SHA-256, and
//! SCRAM-SHA-256-PLUS over TLS), remember its key and parameters, and run pgrelay's own
//! housekeeping queries on it (reset, parameter reconciliation).
//!
//! It never talks to clients; the relay moves client traffic through [`Server::conn`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use postgres_protocol::message::frontend;
use tokio::io::DuplexStream;
use tokio::net::TcpStream;

use crate::auth::scram::ClientBinding;
use crate::auth::{md5, scram, ServerCredentials};
use crate::config::TlsMode;
use crate::error::Side;
use crate::protocol::backend::{self, ErrorFields};
use crate::protocol::MAX_MESSAGE_LEN;
use crate::stream::{Conn, Stream, StreamError};
use crate::tls::connect::{end_point_hash, Connector, ServerTls, TlsConnectError};

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
    #[error("TLS with server {addr}: {source}")]
    Tls {
        addr: String,
        source: TlsConnectError,
    },
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
    /// pgrelay's own client, logging in with a password or the keys a client proved.
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
            ServerError::Tls { source, .. } => source.transient(),
            ServerError::Rejected(fields) | ServerError::Query(fields) => {
                fields.code.starts_with("57P") || fields.code.starts_with("08")
            }
            ServerError::AuthMethod(_) | ServerError::Scram(_) => false,
        }
    }
}

/// Where, how and as whom a pool's servers connect.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    /// The server TLS settings (one for all of pgrelay; reloadable): each connection
    /// takes the current ones.
    pub tls: Arc<Connector>,
}

/// An authenticated server connection.
pub struct Server {
    pub conn: Conn<Stream>,
    pub addr: SocketAddr,
    /// The pid and secret of its BackendKeyData (protocol 3.0: a 4-byte secret). A
    /// server that sends none keeps pid 0, which no PostgreSQL process has: its
    /// queries cannot be cancelled through pgrelay.
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

    /// Connects and logs in, TLS as `tls.server_mode` says, with libpq's second try
    /// ([`retry`]) in `allow` and `prefer`.
    pub async fn connect(
        target: &ServerTarget,
        credentials: &ServerCredentials,
        timeout: Duration,
    ) -> Result<Server, ServerError> {
        let tls = target.tls.current();
        let first = Self::attempt(target, credentials, timeout, &tls, tls.asks_first()).await;
        let (err, over_tls) = match first {
            Ok(server) => return Ok(server),
            Err(failed) => failed,
        };
        let Some(ask_tls) = retry(tls.mode(), &err, over_tls) else {
            return Err(err);
        };
        tracing::debug!(host = %target.host, port = target.port, %err, tls = ask_tls,
            mode = tls.mode().as_str(), "server login failed; trying once more, as libpq");
        Self::attempt(target, credentials, timeout, &tls, ask_tls)
            .await
            .map_err(|(err, _)| err)
    }

    /// One connection and login: TCP, then TLS (when `ask_tls`) and the login within
    /// `timeout` again. A failure says whether the connection had become TLS.
    async fn attempt(
        target: &ServerTarget,
        credentials: &ServerCredentials,
        timeout: Duration,
        tls: &ServerTls,
        ask_tls: bool,
    ) -> Result<Server, (ServerError, bool)> {
        let addr_text = format!("{}:{}", target.host, target.port);
        let (tcp, addr) = tcp_connect(target, &addr_text, timeout)
            .await
            .map_err(|err| (err, false))?;
        let login = async {
            let stream = tls
                .negotiate(tcp, &target.host, ask_tls)
                .await
                .map_err(|source| {
                    let addr = addr_text.clone();
                    (ServerError::Tls { addr, source }, false)
                })?;
            let over_tls = matches!(stream, Stream::Tls(_));
            let mut server = Server::new(stream, addr);
            match server.login(target, credentials).await {
                Ok(()) => Ok(server),
                Err(err) => Err((err, over_tls)),
            }
        };
        let timed_out = || {
            let addr = addr_text.clone();
            (ServerError::ConnectTimeout { addr }, false)
        };
        tokio::time::timeout(timeout, login)
            .await
            .map_err(|_| timed_out())?
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
                backend::BACKEND_KEY_DATA => (self.pid, self.secret) = server_key(frame.body())?,
                backend::ERROR_RESPONSE => {
                    return Err(ServerError::Rejected(backend::error_fields(frame.body())))
                }
                backend::READY_FOR_QUERY => {
                    if self.pid == 0 {
                        tracing::info!(server = %self.addr, "server sent no cancel key: cancels of its queries are dropped");
                    }
                    return Ok(());
                }
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
                let binding = choose_binding(data, end_point_hash(self.conn.get_ref()))?;
                let mechanism = match binding {
                    ClientBinding::TlsServerEndPoint(_) => SCRAM_SHA_256_PLUS,
                    _ => SCRAM_SHA_256,
                };
                tracing::debug!(host = %target.host, port = target.port, mechanism, "SCRAM login to a server");
                let (state, first) = ScramState::start(creds, binding)?;
                encode(
                    |b| frontend::sasl_initial_response(mechanism, &first, b),
                    self.conn.wbuf(),
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

/// libpq's second try after a failed login, as whether to ask for TLS: in `allow`,
/// over TLS after the server refused the plaintext login (a pg_hba.conf with only
/// `hostssl` lines); in `prefer`, in plaintext after the TLS handshake failed or the
/// server refused the login over TLS (`hostnossl` lines). A certificate that fails
/// verification never gets here: `prefer` checks none.
fn retry(mode: TlsMode, err: &ServerError, over_tls: bool) -> Option<bool> {
    match (mode, err) {
        (TlsMode::Allow, ServerError::Rejected(_)) if !over_tls => Some(true),
        (TlsMode::Prefer, ServerError::Rejected(_)) if over_tls => Some(false),
        (
            TlsMode::Prefer,
            ServerError::Tls {
                source: TlsConnectError::Handshake(_),
                ..
            },
        ) => Some(false),
        _ => None,
    }
}

/// Opens the TCP connection to `target` within `timeout`.
async fn tcp_connect(
    target: &ServerTarget,
    addr_text: &str,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), ServerError> {
    let connect_error = |source| ServerError::Connect {
        addr: addr_text.to_owned(),
        source,
    };
    let tcp = tokio::time::timeout(
        timeout,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| ServerError::ConnectTimeout {
        addr: addr_text.to_owned(),
    })?
    .map_err(connect_error)?;
    let _ = tcp.set_nodelay(true);
    let addr = tcp.peer_addr().map_err(connect_error)?;
    Ok((tcp, addr))
}

/// The columns of a DataRow body, as text (NULL as None).
pub(super) fn columns(body: &[u8]) -> Vec<Option<String>> {
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

/// Which SCRAM a server gets, from the mechanisms its AuthenticationSASL offers and
/// what the connection can bind to (`end_point`: the certificate hash over TLS), as
/// libpq chooses: -PLUS whenever offered and possible; otherwise `y` over TLS (pgrelay
/// could bind, the server did not offer it) and `n` without anything to bind to. A
/// server offering -PLUS to a client that cannot compute the hash gets `n`, since `y`
/// would tell it that -PLUS was stripped from its offer.
fn choose_binding(
    offered: &[u8],
    end_point: Option<Vec<u8>>,
) -> Result<ClientBinding, ServerError> {
    let (mut plain, mut plus) = (false, false);
    for mechanism in offered.split(|b| *b == 0) {
        plain |= mechanism == SCRAM_SHA_256.as_bytes();
        plus |= mechanism == SCRAM_SHA_256_PLUS.as_bytes();
    }
    match (end_point, plus, plain) {
        (Some(hash), true, _) => Ok(ClientBinding::TlsServerEndPoint(hash)),
        (Some(_), false, true) => Ok(ClientBinding::NotOffered),
        (None, _, true) => Ok(ClientBinding::Unsupported),
        _ => Err(ServerError::AuthMethod(
            "a SASL mechanism other than SCRAM-SHA-256 (or -PLUS without TLS)",
        )),
    }
}

/// A SCRAM login in progress, with pgrelay's own client: with the keys a client proved
/// to pgrelay, or with keys derived from a password (once per password and salt:
/// [`scram::password_keys`]; postgres-protocol's client would derive them again at
/// every login, milliseconds of the runtime's thread each time).
struct ScramState {
    client: scram::KeyClient,
    /// The password the keys are derived from when the server sends its salt; `None`
    /// with proven keys.
    password: Option<Vec<u8>>,
    server_final: Option<String>,
}

impl ScramState {
    fn start(
        credentials: &ServerCredentials,
        binding: ClientBinding,
    ) -> Result<(ScramState, Vec<u8>), ServerError> {
        let ((client, first), password) = match credentials {
            ServerCredentials::Password(p) => {
                (scram::KeyClient::for_password(binding), Some(p.clone()))
            }
            ServerCredentials::ScramKeys {
                client_key,
                server_key,
            } => (
                scram::KeyClient::bound(*client_key, *server_key, binding),
                None,
            ),
            ServerCredentials::Md5(_) => {
                return Err(ServerError::AuthMethod("SCRAM with only an md5 hash"))
            }
            ServerCredentials::Missing => {
                return Err(ServerError::AuthMethod(
                    "SCRAM before any client proved its key (log in once with the password)",
                ))
            }
        };
        let state = ScramState {
            client,
            password,
            server_final: None,
        };
        Ok((state, first.into_bytes()))
    }

    fn respond(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ServerError> {
        let (message, expected) = match &self.password {
            Some(password) => self.client.respond_with_password(password, server_first),
            None => self.client.respond(server_first),
        }
        .map_err(|e| ServerError::Scram(e.into()))?;
        self.server_final = Some(expected);
        Ok(message.into_bytes())
    }

    fn finish(self, server_final: &[u8]) -> Result<(), ServerError> {
        match self.server_final {
            Some(expected) if expected.as_bytes() == server_final => Ok(()),
            _ => Err(ServerError::Scram(
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

    /// What a CancelRequest for this server's current query needs; `None` if it sent
    /// no BackendKeyData, so that a client's cancel is dropped rather than sent with a
    /// made-up key.
    pub fn cancel_target(&self) -> Option<crate::cancel::CancelTarget> {
        (self.pid != 0).then_some(crate::cancel::CancelTarget {
            addr: self.addr,
            pid: self.pid,
            secret: self.secret,
        })
    }
}

/// The pid and secret of a server's BackendKeyData. pgrelay speaks protocol 3.0 to
/// servers, whose secret is 4 bytes; a key of another length (a server that is not
/// quite PostgreSQL) cannot be sent back in a 3.0 CancelRequest, so it is dropped and
/// the server's queries are not cancellable, rather than its login failing.
fn server_key(body: &[u8]) -> Result<(i32, i32), ServerError> {
    let (pid, secret) = backend::backend_key(body).map_err(StreamError::from)?;
    match <[u8; 4]>::try_from(secret) {
        Ok(secret) if pid != 0 => Ok((pid, i32::from_be_bytes(secret))),
        _ => {
            tracing::warn!(
                pid,
                len = secret.len(),
                "server sent a cancel key pgrelay cannot use"
            );
            Ok((0, 0))
        }
    }
}

/// An idle server handed to another pgrelay process (`pgrelay run --takeover`) with
/// its socket: what the process taking it needs to go on with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerState {
    /// Its node, as the config names it.
    pub host: String,
    pub port: u16,
    /// The pool it belongs to: the client-facing database name and the user.
    pub database: String,
    pub user: String,
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
    /// Its parameter set: `(name, value, reported)`.
    pub params: Vec<(String, String, bool)>,
    /// The statements pgrelay prepared on it (their ids, in hex).
    pub statements: Vec<String>,
    /// How long it has been open, in ms (for `server_lifetime`).
    pub age_ms: u64,
}

impl Server {
    /// What another process needs to take this idle server over, with the socket
    /// to pass; the server back for one it cannot take (TLS: its keys live here).
    /// `Ok(None)`: the socket could not be taken from the runtime (it is closed).
    pub fn hand_over(
        self: Box<Self>,
        target: &ServerTarget,
        database: &str,
    ) -> Result<Option<(ServerState, std::os::fd::OwnedFd)>, Box<Server>> {
        if !matches!(self.conn.get_ref(), Stream::Plain(_)) || self.conn.rbuf_len() != 0 {
            return Err(self);
        }
        let Server {
            conn,
            addr,
            pid,
            secret,
            params,
            created,
            statements,
            ..
        } = *self;
        let state = ServerState {
            host: target.host.clone(),
            port: target.port,
            database: database.to_owned(),
            user: target.user.clone(),
            addr,
            pid,
            secret,
            params: params
                .entries()
                .map(|(n, v, r)| (n.to_owned(), v.to_owned(), r))
                .collect(),
            statements: statements.ids().map(|id| format!("{id:032x}")).collect(),
            age_ms: u64::try_from(created.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        let Stream::Plain(tcp) = conn.into_io() else {
            // Checked above.
            return Ok(None);
        };
        match tcp.into_std() {
            Ok(tcp) => Ok(Some((state, tcp.into()))),
            Err(err) => {
                tracing::warn!(%err, "an idle server could not be handed over; it is closed");
                Ok(None)
            }
        }
    }

    /// An idle server another process handed over, on `tcp`.
    pub fn adopted(state: &ServerState, tcp: TcpStream) -> Server {
        let now = Instant::now();
        let age = Duration::from_millis(state.age_ms);
        Server {
            conn: Conn::new(Stream::Plain(tcp)),
            addr: state.addr,
            pid: state.pid,
            secret: state.secret,
            params: ParamSet::from_entries(
                state
                    .params
                    .iter()
                    .map(|(n, v, r)| (n.as_str(), v.as_str(), *r)),
            ),
            created: now.checked_sub(age).unwrap_or(now),
            idle_since: now,
            statements: ServerStatements::from_ids(
                state
                    .statements
                    .iter()
                    .filter_map(|hex| u128::from_str_radix(hex, 16).ok()),
            ),
            epoch: 0,
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

    /// A server's login messages as pre-encoded bytes, their BackendKeyData read as the
    /// login reads it: the key is optional (some servers and poolers send none), and a
    /// server without a usable one keeps pid 0, which gives no cancel target.
    #[test]
    fn servers_without_a_cancel_key() {
        use crate::protocol::{split_frame, MAX_MESSAGE_LEN};
        let login = |key: Option<&[u8]>| {
            let mut buf = BytesMut::new();
            backend::auth_ok(&mut buf);
            backend::parameter_status_msg(&mut buf, "server_version", "18.0");
            if let Some(secret) = key {
                backend::backend_key_data(&mut buf, 4242, secret);
            }
            backend::ready_for_query(&mut buf, backend::TxStatus::Idle);
            let mut key = (0, 0);
            while let Some(frame) = split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap() {
                if frame.tag() == backend::BACKEND_KEY_DATA {
                    key = server_key(frame.body()).expect("a key or none");
                }
            }
            key
        };
        assert_eq!(login(Some(&7i32.to_be_bytes())), (4242, 7));
        assert_eq!(login(None), (0, 0));
        assert_eq!(login(Some(&[1; 32])), (0, 0), "a 3.2 key on a 3.0 login");
        let mut short = BytesMut::new();
        backend::backend_key_data(&mut short, 1, &[1, 2]);
        let frame = split_frame(&mut short, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert!(server_key(frame.body()).is_err(), "malformed");
    }

    /// A SCRAM failure keeps its cause as a source, not as text.
    #[test]
    fn scram_failures_keep_their_source() {
        use std::error::Error;
        let err = ServerError::Scram(scram::ScramError::ServerSignature.into());
        let source = err.source().expect("a source");
        assert_eq!(source.to_string(), "server signature does not match");
    }

    #[test]
    fn channel_binding_choice() {
        let both = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        let plain = b"SCRAM-SHA-256\0\0";
        let hash = || Some(vec![7; 32]);
        assert!(matches!(
            choose_binding(both, hash()),
            Ok(ClientBinding::TlsServerEndPoint(h)) if h == [7; 32]
        ));
        assert!(matches!(
            choose_binding(plain, hash()),
            Ok(ClientBinding::NotOffered)
        ));
        // Plaintext, or a certificate whose hash cannot be known: `n`, even if offered.
        assert!(matches!(
            choose_binding(both, None),
            Ok(ClientBinding::Unsupported)
        ));
        assert!(matches!(
            choose_binding(plain, None),
            Ok(ClientBinding::Unsupported)
        ));
        assert!(choose_binding(b"SCRAM-SHA-256-PLUS\0\0", None).is_err());
        assert!(choose_binding(b"OAUTHBEARER\0\0", hash()).is_err());
    }

    /// The keys-only client binds its proof to the certificate hash: checked here the
    /// way PostgreSQL checks it (c= holds the GS2 header and the hash, and the proof
    /// covers that), since pgrelay's own server side takes no -PLUS.
    #[test]
    fn key_client_with_channel_binding() {
        use base64::Engine;
        use hmac::{Hmac, Mac};
        use sha2::{Digest, Sha256};
        let b64 = base64::engine::general_purpose::STANDARD;
        let hmac = |key: &[u8], data: &[u8]| {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("key");
            mac.update(data);
            mac.finalize().into_bytes().to_vec()
        };
        let salted = {
            // Hi() with 2 iterations, enough for a test.
            let u1 = hmac(b"pencil", b"salt\0\0\0\x01");
            let u2 = hmac(b"pencil", &u1);
            u1.iter().zip(&u2).map(|(a, b)| a ^ b).collect::<Vec<u8>>()
        };
        let client_key: [u8; 32] = hmac(&salted, b"Client Key").try_into().expect("32");
        let server_key: [u8; 32] = hmac(&salted, b"Server Key").try_into().expect("32");
        let hash = vec![0xab; 32];
        let (client, first) = scram::KeyClient::bound(
            client_key,
            server_key,
            ClientBinding::TlsServerEndPoint(hash.clone()),
        );
        let bare = first
            .strip_prefix("p=tls-server-end-point,,")
            .expect("GS2 header");
        let nonce = bare.strip_prefix("n=,r=").expect("nonce");
        let server_first = format!("r={nonce}srv,s={},i=2", b64.encode(b"salt"));
        let (client_final, server_final) =
            client.respond(server_first.as_bytes()).expect("respond");
        let (without_proof, proof) = client_final.rsplit_once(",p=").expect("proof");
        let mut input = b"p=tls-server-end-point,,".to_vec();
        input.extend(&hash);
        assert_eq!(
            without_proof,
            format!("c={},r={nonce}srv", b64.encode(&input))
        );
        let auth_message = format!("{bare},{server_first},{without_proof}");
        let stored_key = Sha256::digest(client_key);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof = b64.decode(proof).expect("base64");
        let recovered: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        assert_eq!(recovered, client_key);
        let expected = format!(
            "v={}",
            b64.encode(hmac(&server_key, auth_message.as_bytes()))
        );
        assert_eq!(server_final, expected);
    }

    /// libpq's second tries, and nothing else is tried twice.
    #[test]
    fn second_tries() {
        let refused = || ServerError::Rejected(fields("28000"));
        let handshake = || ServerError::Tls {
            addr: "h:1".into(),
            source: TlsConnectError::Handshake(std::io::ErrorKind::InvalidData.into()),
        };
        assert_eq!(retry(TlsMode::Allow, &refused(), false), Some(true));
        assert_eq!(retry(TlsMode::Allow, &refused(), true), None);
        assert_eq!(retry(TlsMode::Prefer, &refused(), true), Some(false));
        // The server said N: the login was plaintext already.
        assert_eq!(retry(TlsMode::Prefer, &refused(), false), None);
        assert_eq!(retry(TlsMode::Prefer, &handshake(), false), Some(false));
        for mode in [
            TlsMode::Disable,
            TlsMode::Require,
            TlsMode::VerifyCa,
            TlsMode::VerifyFull,
        ] {
            assert_eq!(retry(mode, &refused(), true), None);
            assert_eq!(retry(mode, &refused(), false), None);
            assert_eq!(retry(mode, &handshake(), false), None);
        }
        let closed = ServerError::Stream(StreamError::Closed);
        assert_eq!(retry(TlsMode::Prefer, &closed, true), None);
        assert_eq!(retry(TlsMode::Allow, &closed, false), None);
    }
}
