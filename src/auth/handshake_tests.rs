//! The handshake's TLS decisions over an in-memory connection: what `client_mode`
//! demands of plaintext and TLS clients, `verify-full`'s CN check, `cert`
//! authentication, and which SASL mechanisms are offered; users found by `auth_query`
//! (a fake [`lookup::SecretSource`]).

use std::sync::Arc;

use tokio::io::{AsyncReadExt, DuplexStream};

use super::*;
use crate::protocol::startup::StartupParams;

/// A config with user `app` (plaintext password), `auth_type` and `client_mode`.
fn config(auth_type: &str, mode: &str) -> Config {
    let text = format!(
        "auth_type = \"{auth_type}\"\n[tls]\nclient_mode = \"{mode}\"\nclient_cert = \"c.pem\"\n\
         client_key = \"k.pem\"\nclient_ca = \"ca.pem\"\n[[backends]]\nhost = \"127.0.0.1\"\n\
         [[users]]\nname = \"app\"\npassword = \"secret\"\n"
    );
    Config::from_toml_str(&text).expect("test config")
}

/// A TLS session whose client certificate has `common_name`; pgrelay's certificate
/// has channel-binding data.
fn tls(common_name: Option<&str>) -> Option<TlsSession> {
    Some(TlsSession {
        common_name: common_name.map(str::to_owned),
        end_point: Some(Arc::from(&b"end point"[..])),
        version: "TLSv1.3",
        cipher: "TLS13_AES_128_GCM_SHA256",
    })
}

fn opening(mode: TlsMode, tls: Option<TlsSession>) -> Opening {
    let params = StartupParams {
        minor: 0,
        params: vec![
            ("database".to_owned(), "app".to_owned()),
            ("user".to_owned(), "app".to_owned()),
        ],
    };
    Opening {
        mode,
        peer: crate::auth::hba::Peer::Unknown,
        tls,
        first: Some(StartupPacket::Startup(params)),
    }
}

/// Runs the handshake with `opening`; the client side is returned to read from.
async fn run(config: &Config, opening: Opening) -> (Result<Handshake, AuthError>, DuplexStream) {
    let (client, server) = tokio::io::duplex(4096);
    let mut conn = Conn::new(server);
    let credentials = Credentials::default();
    let result = handshake(&mut conn, config, &credentials, false, opening).await;
    (result, client)
}

fn refusal(result: Result<Handshake, AuthError>) -> ClientError {
    match result {
        Err(AuthError::Client(err)) => err,
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(_) => panic!("expected a refusal, got in"),
    }
}

#[tokio::test]
async fn plaintext_is_refused_when_tls_is_required() {
    for mode in [TlsMode::Require, TlsMode::VerifyCa, TlsMode::VerifyFull] {
        let (result, _) = run(&config("trust", mode.as_str()), opening(mode, None)).await;
        let err = refusal(result);
        assert_eq!(err.code, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION);
        assert!(
            err.message.starts_with("TLS is required"),
            "{}",
            err.message
        );
    }
    for mode in [TlsMode::Disable, TlsMode::Allow, TlsMode::Prefer] {
        let (result, _) = run(&config("trust", mode.as_str()), opening(mode, None)).await;
        assert!(matches!(result, Ok(Handshake::Login(_))), "{mode:?}");
    }
}

#[tokio::test]
async fn verify_full_wants_the_user_as_cn() {
    let full = config("trust", "verify-full");
    let (result, _) = run(&full, opening(TlsMode::VerifyFull, tls(Some("app")))).await;
    assert!(matches!(result, Ok(Handshake::Login(_))));
    for cn in [Some("other"), None] {
        let (result, _) = run(&full, opening(TlsMode::VerifyFull, tls(cn))).await;
        let err = refusal(result);
        assert_eq!(err.code, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION);
        assert_eq!(
            err.message,
            "certificate authentication failed for user \"app\""
        );
    }
    // verify-ca checks the CA only.
    let ca = config("trust", "verify-ca");
    let (result, _) = run(&ca, opening(TlsMode::VerifyCa, tls(Some("other")))).await;
    assert!(matches!(result, Ok(Handshake::Login(_))));
}

#[tokio::test]
async fn cert_authentication_is_the_cn() {
    let cert = config("cert", "require");
    let (result, _) = run(&cert, opening(TlsMode::Require, tls(Some("app")))).await;
    assert!(matches!(result, Ok(Handshake::Login(_))));
    for session in [tls(Some("other")), tls(None), None] {
        let (result, _) = run(&cert, opening(TlsMode::Require, session)).await;
        assert_eq!(
            refusal(result).code,
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION
        );
    }
    // Per user: `app` by certificate while the global type asks for passwords.
    let mut per_user = config("scram-sha-256", "prefer");
    per_user.users[0].auth_type = Some(AuthType::Cert);
    let (result, _) = run(&per_user, opening(TlsMode::Prefer, tls(Some("app")))).await;
    assert!(matches!(result, Ok(Handshake::Login(_))));
}

/// The SASL mechanisms of the first authentication request, as the client reads them.
async fn offered(session: Option<TlsSession>) -> Vec<String> {
    let scram = config("scram-sha-256", "prefer");
    let (client, server) = tokio::io::duplex(4096);
    let credentials = Credentials::default();
    let login = async move {
        let mut conn = Conn::new(server);
        let opening = opening(TlsMode::Prefer, session);
        // Ends when the client below hangs up.
        let _ = handshake(&mut conn, &scram, &credentials, false, opening).await;
    };
    let read = async move {
        let mut client = client;
        let mut header = [0u8; 9];
        client.read_exact(&mut header).await.expect("request");
        assert_eq!(header[0], b'R');
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 8];
        client.read_exact(&mut body).await.expect("mechanisms");
        body.split(|&b| b == 0)
            .filter(|m| !m.is_empty())
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect::<Vec<_>>()
    };
    tokio::join!(login, read).1
}

#[tokio::test]
async fn tls_clients_are_offered_plus_first() {
    assert_eq!(
        offered(tls(None)).await,
        ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    );
    assert_eq!(offered(None).await, ["SCRAM-SHA-256"]);
    // A certificate without channel-binding data (Ed25519): no -PLUS.
    let unbindable = tls(None).map(|session| TlsSession {
        end_point: None,
        ..session
    });
    assert_eq!(offered(unbindable).await, ["SCRAM-SHA-256"]);
}

/// A secret source that answers from a fixed list and counts its fetches.
struct FakeSource {
    secrets: Vec<(&'static str, Secret)>,
    fetches: std::sync::atomic::AtomicUsize,
}

impl lookup::SecretSource for FakeSource {
    async fn fetch(&self, user: &str, _db: &str) -> Result<Option<Secret>, lookup::LookupError> {
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self
            .secrets
            .iter()
            .find(|(name, _)| *name == user)
            .map(|(_, secret)| secret.clone()))
    }
}

/// `auth_type = "md5"` with `auth_query` on for `app`'s pool.
fn queried_config() -> Config {
    let mut config = config("md5", "disable");
    config.auth_user = Some("app".into());
    config
}

/// An md5 login of `user` (not in `[[users]]`) with `password`: the handshake's
/// result, and the authentication request code the client was sent.
async fn md5_login(
    config: &Config,
    credentials: &Credentials,
    source: &FakeSource,
    user: &str,
    password: &str,
) -> (Result<Handshake, AuthError>, i32) {
    let (client, server) = tokio::io::duplex(4096);
    // `user` or `user@database`.
    let (user, database) = user.split_once('@').unwrap_or((user, "app"));
    let mut first = opening(TlsMode::Disable, None);
    if let Some(StartupPacket::Startup(params)) = &mut first.first {
        params.params[0].1 = database.to_owned();
        params.params[1].1 = user.to_owned();
    }
    let login = async move {
        let mut conn = Conn::new(server);
        handshake_with(&mut conn, config, credentials, (None, first), source).await
    };
    let answer = async move {
        let mut client = client;
        let mut header = [0u8; 9];
        client.read_exact(&mut header).await.expect("request");
        let code = i32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        if code == 5 {
            let mut salt = [0u8; 4];
            client.read_exact(&mut salt).await.expect("salt");
            let stored = md5::stored_hash(user, password.as_bytes());
            let mut buf = BytesMut::new();
            postgres_protocol::message::frontend::password_message(
                md5::response(&stored, salt).as_bytes(),
                &mut buf,
            )
            .expect("encode");
            tokio::io::AsyncWriteExt::write_all(&mut client, &buf)
                .await
                .expect("answer");
        }
        if code == 5 {
            // Keep the pipe open until the handshake is over.
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest).await;
        }
        code
    };
    tokio::join!(login, answer)
}

#[tokio::test]
async fn a_queried_md5_user_logs_in_and_servers_get_its_hash() {
    let config = queried_config();
    let credentials = Credentials::default();
    let hash = md5::stored_hash("bob", b"pw");
    let source = FakeSource {
        secrets: vec![("bob", Secret::Md5(hash))],
        fetches: Default::default(),
    };
    let (result, code) = md5_login(&config, &credentials, &source, "bob", "pw").await;
    assert_eq!(code, 5);
    assert!(matches!(result, Ok(Handshake::Login(_))));
    let user = credentials.queried_user("bob").expect("a pool entry");
    assert!(matches!(credentials.for_server(&user), ServerCredentials::Md5(h) if h == hash));
    // Cached: a second login fetches nothing; a wrong password forgets the secret.
    let (result, _) = md5_login(&config, &credentials, &source, "bob", "pw").await;
    assert!(result.is_ok());
    assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    let (result, _) = md5_login(&config, &credentials, &source, "bob", "nope").await;
    assert_eq!(refusal(result).code, sqlstate::INVALID_PASSWORD);
    let (result, _) = md5_login(&config, &credentials, &source, "bob", "pw").await;
    assert!(result.is_ok());
    assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn without_auth_user_unlisted_users_are_not_looked_up() {
    let mut config = queried_config();
    config.auth_user = None;
    let credentials = Credentials::default();
    let source = FakeSource {
        secrets: vec![("bob", Secret::Md5(md5::stored_hash("bob", b"pw")))],
        fetches: Default::default(),
    };
    let (result, code) = md5_login(&config, &credentials, &source, "bob", "pw").await;
    assert_eq!(code, 5, "today's md5 exchange for an unknown user");
    assert_eq!(refusal(result).code, sqlstate::INVALID_PASSWORD);
    assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert!(credentials.queried_user("bob").is_none());
}

#[tokio::test]
async fn no_lookup_for_the_admin_console_or_a_database_not_served() {
    let mut config = queried_config();
    let credentials = Credentials::default();
    let source = FakeSource {
        secrets: vec![("bob", Secret::Md5(md5::stored_hash("bob", b"pw")))],
        fetches: Default::default(),
    };
    let (result, code) = md5_login(&config, &credentials, &source, "bob@pgrelay", "pw").await;
    assert_eq!(code, 10, "the fake exchange, as for a user with no secret");
    assert!(result.is_err());
    config.databases = vec![crate::config::DatabaseConfig {
        name: "app".into(),
        dbname: None,
        pool_mode: None,
        pool_size: None,
        max_db_connections: None,
        max_db_client_connections: None,
        target: crate::config::EndpointTarget::Auto,
        primary_fallback: None,
    }];
    let (result, code) = md5_login(&config, &credentials, &source, "bob@other", "pw").await;
    assert_eq!(code, 10);
    assert!(result.is_err());
    assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 0);
    let (result, _) = md5_login(&config, &credentials, &source, "bob@app", "pw").await;
    assert!(result.is_ok());
}
