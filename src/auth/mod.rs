//! Client-facing authentication and the startup handshake: the TLS negotiation
//! ([`opening`]), the StartupMessage, protocol negotiation, what `tls.client_mode`
//! demands of a client (TLS, a certificate whose CN is the user), and the exchange for
//! the user's `auth_type` (trust, cleartext, md5, SCRAM-SHA-256 and -PLUS, cert).
//!
//! It also keeps the server-side [`Credentials`]: what pgrelay can log in to servers
//! with, including the SCRAM ClientKey a client proved when the configured password is a
//! SCRAM secret (PgBouncer's approach). It must not touch servers itself: the secrets of
//! users the config does not list (`auth_query`) come from a [`lookup::SecretSource`]
//! the session passes in ([`handshake_with`]), and are cached here.

pub mod hba;
pub mod lookup;
pub mod md5;
pub mod opening;
pub mod scram;
pub mod throttle;

use bytes::BytesMut;
use dashmap::DashMap;
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{AuthType, Config, ScramSecret, Secret, TlsMode, UserConfig};
use crate::error::{sqlstate, ClientError, ErrorKind};
use crate::protocol::backend;
use crate::protocol::frontend::{self, PASSWORD};
use crate::protocol::startup::{parse_options, StartupPacket, StartupParams};
use crate::stream::{Conn, StreamError};
use crate::tls::accept::{AcceptError, TlsSession};
use opening::Opening;

/// Password messages are small; anything longer is an attack or a bug.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Tls(#[from] AcceptError),
    /// The client is told this, then the connection closes.
    #[error("{}", .0.message)]
    Client(ClientError),
}

impl From<ClientError> for AuthError {
    fn from(e: ClientError) -> Self {
        AuthError::Client(e)
    }
}

/// What a client can prove to pgrelay with, and pgrelay to a server.
#[derive(Clone)]
pub enum ServerCredentials {
    Password(Vec<u8>),
    Md5([u8; 16]),
    ScramKeys {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
    /// A SCRAM secret for which no client has proven its key yet.
    Missing,
}

impl std::fmt::Debug for ServerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            ServerCredentials::Password(_) => "Password",
            ServerCredentials::Md5(_) => "Md5",
            ServerCredentials::ScramKeys { .. } => "ScramKeys",
            ServerCredentials::Missing => "Missing",
        };
        write!(f, "ServerCredentials::{kind}(<redacted>)")
    }
}

/// Server credentials learned from clients, and derived SCRAM secrets.
pub struct Credentials {
    /// ClientKeys proven by clients, per user, for users stored with a SCRAM secret.
    learned: DashMap<String, ServerCredentials>,
    /// SCRAM secrets derived once from plaintext passwords: `(password, secret)`.
    derived: DashMap<String, (Vec<u8>, ScramSecret)>,
    /// Salts the fake exchanges for unknown users.
    process_key: [u8; 32],
    /// How to log in to servers as a user found by `auth_query`: what its last
    /// successful login proved (SCRAM keys, an md5 hash, a password).
    queried: DashMap<String, ServerCredentials>,
    /// Secrets fetched by `auth_query`.
    secrets: lookup::SecretCache,
}

impl Default for Credentials {
    fn default() -> Self {
        let mut process_key = [0; 32];
        rand::thread_rng().fill_bytes(&mut process_key);
        Credentials {
            learned: DashMap::new(),
            derived: DashMap::new(),
            process_key,
            queried: DashMap::new(),
            secrets: lookup::SecretCache::default(),
        }
    }
}

impl Credentials {
    /// How to log in to servers as `user`.
    pub fn for_server(&self, user: &UserConfig) -> ServerCredentials {
        if let Some(queried) = self.queried.get(&user.name) {
            return queried.clone();
        }
        match &user.password {
            Secret::Plain(p) => ServerCredentials::Password(p.as_bytes().to_vec()),
            Secret::Md5(h) => ServerCredentials::Md5(*h),
            Secret::Scram(_) => self
                .learned
                .get(&user.name)
                .map(|c| c.clone())
                .unwrap_or(ServerCredentials::Missing),
        }
    }

    /// The entry a pool of a user found by `auth_query` runs with, once the user has
    /// logged in: its servers are logged in to with what that login proved.
    pub fn queried_user(&self, name: &str) -> Option<UserConfig> {
        self.queried.contains_key(name).then(|| UserConfig {
            name: name.to_owned(),
            password: Secret::Plain(String::new()),
            pool_mode: None,
            pool_size: None,
            auth_type: None,
            max_user_connections: None,
            max_user_client_connections: None,
        })
    }

    /// Forgets what logins through `auth_query` proved for users `config` now lists
    /// (a reload added them): their `[[users]]` entry decides again.
    pub fn forget_listed(&self, config: &Config) {
        self.queried.retain(|name, _| config.user(name).is_none());
    }

    fn learn(&self, user: &str, credentials: ServerCredentials) {
        self.learned.insert(user.to_owned(), credentials);
    }

    fn derived_secret(&self, user: &str, password: &str) -> ScramSecret {
        if let Some(entry) = self.derived.get(user) {
            if entry.0 == password.as_bytes() {
                return entry.1.clone();
            }
        }
        let mut salt = vec![0; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        let secret = scram::derive_secret(password.as_bytes(), salt, scram::DEFAULT_ITERATIONS);
        self.derived.insert(
            user.to_owned(),
            (password.as_bytes().to_vec(), secret.clone()),
        );
        secret
    }
}

/// How a connection's startup ended.
pub enum Handshake {
    Login(ClientLogin),
    /// A CancelRequest: the pid and secret of a BackendKeyData; `forwarded` by a peer.
    Cancel {
        pid: i32,
        secret: bytes::Bytes,
        forwarded: bool,
    },
}

/// An authenticated client, before it has been given its session parameters.
#[derive(Debug, Clone)]
pub struct ClientLogin {
    pub user: String,
    pub database: String,
    /// Settings from the startup packet and `options`, to apply on every server.
    pub gucs: Vec<(String, String)>,
    /// The minor version of protocol 3 spoken with the client (0 or 2 in practice):
    /// from 3.2 on, its cancel key has a longer secret.
    pub minor: u16,
}

/// Runs the startup phase, after the [`opening`], up to (not including) AuthenticationOk.
pub async fn handshake<S>(
    conn: &mut Conn<S>,
    config: &Config,
    credentials: &Credentials,
    too_many_clients: bool,
    opening: Opening,
) -> Result<Handshake, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handshake_with(
        conn,
        config,
        credentials,
        (
            too_many_clients.then(ClientError::too_many_clients),
            opening,
        ),
        &lookup::NoLookup,
    )
    .await
}

/// [`handshake`], fetching the secrets of users the config does not list from
/// `source` when `auth_query` is on.
pub async fn handshake_with<S, L>(
    conn: &mut Conn<S>,
    config: &Config,
    credentials: &Credentials,
    (refusal, opening): (Option<ClientError>, Opening),
    source: &L,
) -> Result<Handshake, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    L: lookup::SecretSource,
{
    let mut first = opening.first;
    let params = loop {
        let packet = match first.take() {
            Some(packet) => packet,
            None => conn.read_startup().await?,
        };
        match packet {
            StartupPacket::Ssl | StartupPacket::GssEnc => {
                backend::refuse_encryption(conn.wbuf());
                conn.flush().await?;
            }
            StartupPacket::Cancel {
                pid,
                secret,
                forwarded,
            } => {
                return Ok(Handshake::Cancel {
                    pid,
                    secret,
                    forwarded,
                })
            }
            StartupPacket::Startup(params) => break params,
        }
    };
    negotiate(conn, &params).await?;
    let tls = opening.tls.as_ref();
    if tls.is_none() && opening.mode.is_required() {
        return Err(tls_required().into());
    }
    // Refused before its credentials are looked at (too many clients, too many
    // failed logins from its address), but after its startup packet, as PostgreSQL.
    if let Some(refusal) = refusal {
        return Err(refusal.into());
    }
    let login = read_login(&params)?;
    let rules_say = hba::method_for(
        config,
        &hba::Connection {
            peer: opening.peer,
            tls: tls.is_some(),
            user: &login.user,
            database: &login.database,
        },
    )?;
    if opening.mode == TlsMode::VerifyFull {
        check_common_name(tls, &login.user)?;
    }
    if config.user(&login.user).is_none() && config.auth_query_user().is_some() {
        let queried = lookup::Queried {
            auth_type: rules_say.unwrap_or(config.auth_type),
            config,
            credentials,
            source,
        };
        queried.authenticate(conn, &login, tls).await?;
    } else {
        authenticate(conn, config, credentials, &login.user, tls, rules_say).await?;
    }
    if crate::config::is_admin_database(&login.database) {
        let allowed =
            config.admin_users.contains(&login.user) || config.stats_users.contains(&login.user);
        if !allowed {
            let message = format!(
                "user \"{}\" may not use the admin console (admin_users, stats_users)",
                login.user
            );
            return Err(ClientError::fatal(
                ErrorKind::Auth,
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                message,
            )
            .into());
        }
        return Ok(Handshake::Login(login));
    }
    if !config.allows_any_database() && config.database(&login.database).is_none() {
        let message = format!("database \"{}\" does not exist", login.database);
        return Err(ClientError::fatal(
            ErrorKind::UnknownDatabase,
            sqlstate::INVALID_CATALOG_NAME,
            message,
        )
        .into());
    }
    Ok(Handshake::Login(login))
}

/// Answers a request for a newer minor version than 3.2, or for `_pq_.` options, as
/// PostgreSQL 18 does: one NegotiateProtocolVersion naming the version spoken and the
/// options, before anything else is sent (an error included), and only once: the
/// handshake reads one StartupMessage.
async fn negotiate<S>(conn: &mut Conn<S>, params: &StartupParams) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if params.needs_negotiation() {
        let version = 3 << 16 | i32::from(params.agreed_minor());
        backend::negotiate_protocol_version(conn.wbuf(), version, params.protocol_options());
        conn.flush().await?;
    }
    Ok(())
}

/// What a plaintext client is told when `tls.client_mode` requires TLS.
fn tls_required() -> ClientError {
    ClientError::fatal(
        ErrorKind::Auth,
        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        "TLS is required to connect to pgrelay: connect with sslmode=require or stronger",
    )
}

/// `verify-full` and `cert` authentication: the verified certificate's CN must be the
/// user name, as PostgreSQL's `clientcert=verify-full` and `cert` require.
fn check_common_name(tls: Option<&TlsSession>, user: &str) -> Result<(), ClientError> {
    match tls.and_then(|tls| tls.common_name.as_deref()) {
        Some(common_name) if common_name == user => Ok(()),
        common_name => {
            tracing::info!(%user, ?common_name, "client certificate's CN is not the user name");
            Err(cert_failed(user))
        }
    }
}

fn cert_failed(user: &str) -> ClientError {
    let message = format!("certificate authentication failed for user \"{user}\"");
    ClientError::fatal(
        ErrorKind::Auth,
        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        message,
    )
}

fn read_login(params: &StartupParams) -> Result<ClientLogin, ClientError> {
    let user = match params.get("user") {
        Some(u) if !u.is_empty() => u.to_owned(),
        _ => {
            return Err(ClientError::fatal(
                ErrorKind::Protocol,
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                "no PostgreSQL user name specified in startup packet",
            ))
        }
    };
    if params
        .get("replication")
        .is_some_and(|v| v != "false" && v != "0" && v != "off")
    {
        return Err(ClientError::fatal(
            ErrorKind::Protocol,
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by pgrelay",
        ));
    }
    let database = params
        .get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_owned();
    let mut gucs = Vec::new();
    for (name, value) in &params.params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => gucs.extend(
                parse_options(value)
                    .map_err(|e| ClientError::protocol(format!("invalid options: {e}")))?,
            ),
            n if n.starts_with("_pq_.") => {}
            _ => gucs.push((name.clone(), value.clone())),
        }
    }
    for (name, _) in &gucs {
        if !valid_guc_name(name) {
            return Err(ClientError::fatal(
                ErrorKind::Protocol,
                sqlstate::UNDEFINED_OBJECT,
                format!("unrecognized configuration parameter \"{name}\""),
            ));
        }
    }
    Ok(ClientLogin {
        user,
        database,
        gucs,
        minor: params.agreed_minor(),
    })
}

/// Setting names become part of SQL (`RESET name`), so only plain names pass.
pub fn valid_guc_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

fn auth_failed(user: &str) -> AuthError {
    let message = format!("password authentication failed for user \"{user}\"");
    ClientError::fatal(ErrorKind::Auth, sqlstate::INVALID_PASSWORD, message).into()
}

/// Runs the exchange of `hba_method` (the `[[hba]]` rule's), or else of the user's
/// `auth_type`.
async fn authenticate<S>(
    conn: &mut Conn<S>,
    config: &Config,
    credentials: &Credentials,
    user: &str,
    tls: Option<&TlsSession>,
    hba_method: Option<AuthType>,
) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let entry = config.user(user);
    let auth_type = hba_method
        .unwrap_or_else(|| entry.map_or(config.auth_type, |u| u.auth_type_or(config.auth_type)));
    let binding = scram::Binding {
        offered: tls.and_then(|tls| tls.end_point.as_deref()),
        selected: false,
    };
    match (auth_type, entry.map(|u| &u.password)) {
        (AuthType::Trust, Some(_)) => Ok(()),
        (AuthType::Trust, None) => {
            let message = format!("role \"{user}\" is not known to pgrelay");
            Err(ClientError::fatal(
                ErrorKind::Auth,
                sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                message,
            )
            .into())
        }
        (AuthType::Cert, Some(_)) => Ok(check_common_name(tls, user)?),
        // Refused as a user with the wrong certificate is, telling nothing more.
        (AuthType::Cert, None) => Err(cert_failed(user).into()),
        (AuthType::Plain, secret) => cleartext(conn, credentials, user, secret).await,
        (AuthType::Md5, Some(Secret::Scram(secret))) => {
            let secret = secret.clone();
            scram_exchange(conn, credentials, user, Some(secret), true, binding).await
        }
        (AuthType::Md5, secret) => md5_exchange(conn, user, secret).await,
        (AuthType::ScramSha256, Some(Secret::Scram(secret))) => {
            let secret = secret.clone();
            scram_exchange(conn, credentials, user, Some(secret), true, binding).await
        }
        (AuthType::ScramSha256, Some(Secret::Plain(password))) => {
            let secret = credentials.derived_secret(user, password);
            scram_exchange(conn, credentials, user, Some(secret), false, binding).await
        }
        // PostgreSQL cannot run SCRAM against an md5 hash either; the exchange runs
        // against a fake secret so the failure looks like any other.
        (AuthType::ScramSha256, Some(Secret::Md5(_)) | None) => {
            scram_exchange(conn, credentials, user, None, false, binding).await
        }
    }
}

async fn read_password<S>(conn: &mut Conn<S>) -> Result<bytes::Bytes, AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = conn.read_frame(MAX_AUTH_MESSAGE).await?;
    if frame.tag() != PASSWORD {
        return Err(ClientError::protocol(format!(
            "expected password response, got message type {:?}",
            frame.tag() as char
        ))
        .into());
    }
    Ok(bytes::Bytes::copy_from_slice(frame.body()))
}

async fn cleartext<S>(
    conn: &mut Conn<S>,
    credentials: &Credentials,
    user: &str,
    secret: Option<&Secret>,
) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    backend::auth_cleartext(conn.wbuf());
    conn.flush().await?;
    let body = read_password(conn).await?;
    let password = frontend::password(&body).map_err(|e| ClientError::protocol(e.to_string()))?;
    let ok = match secret {
        Some(Secret::Plain(p)) => scram::constant_time_eq(p.as_bytes(), password),
        Some(Secret::Md5(h)) => scram::constant_time_eq(&md5::stored_hash(user, password), h),
        Some(Secret::Scram(s)) => scram::password_matches(s, password),
        None => false,
    };
    if !ok {
        return Err(auth_failed(user));
    }
    if matches!(secret, Some(Secret::Scram(_))) {
        credentials.learn(user, ServerCredentials::Password(password.to_vec()));
    }
    Ok(())
}

async fn md5_exchange<S>(
    conn: &mut Conn<S>,
    user: &str,
    secret: Option<&Secret>,
) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    backend::auth_md5(conn.wbuf(), salt);
    conn.flush().await?;
    let body = read_password(conn).await?;
    let answer = frontend::password(&body).map_err(|e| ClientError::protocol(e.to_string()))?;
    let stored = match secret {
        Some(Secret::Plain(p)) => Some(md5::stored_hash(user, p.as_bytes())),
        Some(Secret::Md5(h)) => Some(*h),
        _ => None,
    };
    match stored {
        Some(stored)
            if scram::constant_time_eq(md5::response(&stored, salt).as_bytes(), answer) =>
        {
            Ok(())
        }
        _ => Err(auth_failed(user)),
    }
}

async fn scram_exchange<S>(
    conn: &mut Conn<S>,
    credentials: &Credentials,
    user: &str,
    secret: Option<ScramSecret>,
    learn_key: bool,
    mut binding: scram::Binding<'_>,
) -> Result<(), AuthError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let known = secret.is_some();
    let secret = secret.unwrap_or_else(|| scram::mock_secret(user, &credentials.process_key));
    let server_key = secret.server_key;
    let offered = binding.mechanisms();
    backend::auth_sasl(conn.wbuf(), offered);
    conn.flush().await?;
    let body = read_password(conn).await?;
    let (mechanism, client_first) =
        frontend::sasl_initial(&body).map_err(|e| ClientError::protocol(e.to_string()))?;
    if !offered.iter().any(|m| m.as_bytes() == mechanism) {
        return Err(ClientError::protocol(
            "client selected an invalid SASL authentication mechanism",
        )
        .into());
    }
    binding.selected = mechanism == scram::MECHANISM_PLUS.as_bytes();
    let (exchange, server_first) = scram::ServerExchange::start(secret, client_first, binding)
        .map_err(|e| scram_error(user, e))?;
    backend::auth_sasl_continue(conn.wbuf(), server_first.as_bytes());
    conn.flush().await?;
    let body = read_password(conn).await?;
    let (client_key, server_final) = exchange.finish(&body).map_err(|e| scram_error(user, e))?;
    if !known {
        return Err(auth_failed(user));
    }
    if learn_key {
        credentials.learn(
            user,
            ServerCredentials::ScramKeys {
                client_key,
                server_key,
            },
        );
    }
    backend::auth_sasl_final(conn.wbuf(), server_final.as_bytes());
    Ok(())
}

fn scram_error(user: &str, error: scram::ScramError) -> AuthError {
    match error {
        scram::ScramError::Proof => auth_failed(user),
        scram::ScramError::BindingDowngrade => ClientError::fatal(
            ErrorKind::Auth,
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            error.to_string(),
        )
        .into(),
        other => ClientError::protocol(other.to_string()).into(),
    }
}

/// Appends AuthenticationOk.
pub fn auth_ok(buf: &mut BytesMut) {
    backend::auth_ok(buf);
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
