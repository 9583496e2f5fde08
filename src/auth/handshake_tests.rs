//! The handshake's TLS decisions over an in-memory connection: what `client_mode`
//! demands of plaintext and TLS clients, `verify-full`'s CN check, `cert`
//! authentication, and which SASL mechanisms are offered.

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
