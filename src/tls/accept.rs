//! Client-facing TLS: pgrelay as the TLS server.
//!
//! [`ClientTls`] is what one `[tls]` section makes of the client side: the
//! `client_mode` policy and, unless that is `disable`, a rustls acceptor built from
//! `client_cert`, `client_key` and `client_ca` (TLS 1.2 and 1.3, ALPN `postgresql`).
//! It is built once per start or reload and shared by every login until the next one,
//! so nothing about it is read or parsed per connection, let alone per transaction.
//!
//! [`ClientTls::accept`] runs one handshake and returns what authentication needs of
//! it ([`TlsSession`]): the verified client certificate's CN and the
//! `tls-server-end-point` channel-binding data of pgrelay's certificate (RFC 5929).
//! Deciding when to offer TLS and what to refuse is the login's (`auth`); this module
//! only knows how. It runs no background task.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use tokio::net::TcpStream;
use tokio_rustls::LazyConfigAcceptor;
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::{Decode, Tag, Tagged};

use crate::config::{TlsConfig, TlsMode};
use crate::stream::{Stream, TlsSocket};

/// The ALPN protocol PostgreSQL 17 defined for its connections.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The first byte of a TLS handshake record: a ClientHello sent without SSLRequest.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why the client side's certificates could not be loaded; [`CertError::key`] names
/// the `[tls]` key it is about.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("could not read {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    Empty { key: &'static str, path: String },
    #[error("client_cert and client_key do not make a usable pair: {0}")]
    Pair(#[source] rustls::Error),
    #[error("no usable CA certificate: {0}")]
    Ca(#[source] rustls::server::VerifierBuilderError),
}

impl CertError {
    /// The key the error is about, for a config error naming it.
    pub fn key(&self) -> &'static str {
        match self {
            CertError::Read { key, .. } | CertError::Empty { key, .. } => key,
            CertError::Pair(_) => "tls.client_cert",
            CertError::Ca(_) => "tls.client_ca",
        }
    }
}

/// Why a client's TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    /// PostgreSQL's rule for direct TLS: without the ALPN protocol `postgresql` the
    /// client may be something else that speaks TLS (an HTTPS client), so it is refused.
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    NoAlpn,
}

/// How the client came to TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiation {
    /// SSLRequest answered `S` (ALPN optional, as with PostgreSQL).
    SslRequest,
    /// A ClientHello as the first bytes (`sslnegotiation=direct`): ALPN required.
    Direct,
}

/// What a finished handshake established, for authentication.
#[derive(Debug, Clone, Default)]
pub struct TlsSession {
    /// The CN of the client certificate, which the verifier accepted; `None` when the
    /// client showed none (or it has no CN).
    pub common_name: Option<String>,
    /// `tls-server-end-point` channel-binding data: `None` when pgrelay's certificate
    /// is signed with an algorithm RFC 5929 gives no hash for (then no -PLUS).
    pub end_point: Option<Arc<[u8]>>,
    /// `TLSv1.3` or `TLSv1.2`, for logs and the console.
    pub version: &'static str,
    /// The cipher suite's IANA-style name, for logs and the console.
    pub cipher: &'static str,
}

impl TlsSession {
    /// `SHOW CLIENTS`' `tls` column, in PgBouncer's `version/cipher` form.
    pub fn label(&self) -> String {
        format!("{}/{}", self.version, self.cipher)
    }
}

/// The client side of one `[tls]` section: the mode and its acceptor.
pub struct ClientTls {
    mode: TlsMode,
    acceptor: Option<Acceptor>,
}

struct Acceptor {
    config: Arc<ServerConfig>,
    /// Computed once from the certificate: it is the same for every client.
    end_point: Option<Arc<[u8]>>,
}

impl ClientTls {
    /// `mode` without an acceptor, until one is loaded: SSLRequest is answered `N`,
    /// so with a mode that requires TLS no client gets in (it fails closed).
    pub fn unavailable(mode: TlsMode) -> ClientTls {
        ClientTls {
            mode,
            acceptor: None,
        }
    }

    /// Reads the certificate, key and CA files `config` names (none for `disable`).
    pub fn load(config: &TlsConfig) -> Result<ClientTls, CertError> {
        let acceptor = match config.client_mode {
            TlsMode::Disable => None,
            mode => Some(Acceptor::load(config, mode)?),
        };
        Ok(ClientTls {
            mode: config.client_mode,
            acceptor,
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether an SSLRequest is answered `S` (and a ClientHello accepted).
    pub fn offers_tls(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Runs the handshake on `tcp`. A client whose certificate the mode requires and
    /// that shows none, or one the CA did not sign or that expired, fails here. Not
    /// cancel safe (a handshake cut short leaves the socket useless); the login's
    /// timeout drops the connection with it.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        how: Negotiation,
    ) -> Result<(Stream, TlsSession), AcceptError> {
        let Some(acceptor) = &self.acceptor else {
            let refused = io::Error::new(io::ErrorKind::Unsupported, "TLS is disabled");
            return Err(AcceptError::Handshake(refused));
        };
        let start =
            LazyConfigAcceptor::new(rustls::server::Acceptor::default(), TlsSocket::new(tcp))
                .await
                .map_err(AcceptError::Handshake)?;
        let offers_postgresql = start
            .client_hello()
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_POSTGRESQL));
        if how == Negotiation::Direct && !offers_postgresql {
            return Err(AcceptError::NoAlpn);
        }
        let tls = start
            .into_stream(acceptor.config.clone())
            .await
            .map_err(AcceptError::Handshake)?;
        let (_, connection) = tls.get_ref();
        let session = TlsSession {
            common_name: connection
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| common_name(cert)),
            end_point: acceptor.end_point.clone(),
            version: match connection.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "TLSv1.3",
            },
            cipher: connection
                .negotiated_cipher_suite()
                .and_then(|suite| suite.suite().as_str())
                .unwrap_or_default(),
        };
        Ok((Stream::Tls(Box::new(tls.into())), session))
    }
}

/// Whether the client's first byte opens a TLS handshake (direct TLS) rather than a
/// startup packet. Reads nothing: the byte stays for whoever reads next (so it is
/// cancel safe).
pub async fn starts_with_handshake(tcp: &TcpStream) -> io::Result<bool> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await?;
    Ok(n == 1 && first[0] == TLS_HANDSHAKE_RECORD)
}

impl Acceptor {
    fn load(config: &TlsConfig, mode: TlsMode) -> Result<Acceptor, CertError> {
        let chain = read_certs("tls.client_cert", &config.client_cert)?;
        let key =
            PrivateKeyDer::from_pem_file(&config.client_key).map_err(|source| CertError::Read {
                key: "tls.client_key",
                path: config.client_key.clone(),
                source,
            })?;
        let end_point = chain
            .first()
            .and_then(|cert| end_point(cert))
            .map(Arc::from);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(CertError::Pair)?;
        let builder = if config.client_ca.is_empty() {
            builder.with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(read_certs("tls.client_ca", &config.client_ca)?);
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            // Below verify-ca a certificate is asked for but optional, as PostgreSQL
            // does with ssl_ca_file: users with `cert` authentication need one.
            let verifier = if mode.verifies_peer() {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(CertError::Ca)?)
        };
        let mut server = builder
            .with_single_cert(chain, key)
            .map_err(CertError::Pair)?;
        server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Acceptor {
            config: Arc::new(server),
            end_point,
        })
    }
}

fn read_certs(key: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let read_error = |source| CertError::Read {
        key,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(Path::new(path))
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if certs.is_empty() {
        return Err(CertError::Empty {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first CN of a certificate's subject, as PostgreSQL reads it for `cert`
/// authentication and `clientcert=verify-full`.
pub fn common_name(cert: &[u8]) -> Option<String> {
    const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
    let cert = x509_cert::Certificate::from_der(cert).ok()?;
    let subject = &cert.tbs_certificate.subject.0;
    let value = &subject
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == CN)?
        .value;
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString => {
            std::str::from_utf8(value.value()).ok().map(str::to_owned)
        }
        _ => None,
    }
}

/// `tls-server-end-point` data for a certificate (RFC 5929 §4.1): its DER hashed with
/// the hash of its signature algorithm, SHA-256 for MD5 and SHA-1. `None` for
/// algorithms without one hash (Ed25519, RSASSA-PSS), where PostgreSQL too has no
/// channel binding.
pub fn end_point(cert: &[u8]) -> Option<Vec<u8>> {
    let parsed = x509_cert::Certificate::from_der(cert).ok()?;
    let algorithm = parsed.signature_algorithm.oid.to_string();
    let hash = match algorithm.as_str() {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256,
        // dsa-with-sha1, dsa-with-sha256.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2"
        | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.2" => Sha256::digest(cert).to_vec(),
        // sha224WithRSA, ecdsa-with-SHA224.
        "1.2.840.113549.1.1.14" | "1.2.840.10045.4.3.1" => Sha224::digest(cert).to_vec(),
        // sha384WithRSA, ecdsa-with-SHA384.
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Sha384::digest(cert).to_vec(),
        // sha512WithRSA, ecdsa-with-SHA512.
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Sha512::digest(cert).to_vec(),
        _ => return None,
    };
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(alg: &'static rcgen::SignatureAlgorithm, cn: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// The hash follows the signature: SHA-256 for ECDSA P-256, SHA-384 for P-384,
    /// none for Ed25519 (no -PLUS, as PostgreSQL).
    #[test]
    fn end_point_follows_the_signature_hash() {
        let p256 = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256, "a");
        assert_eq!(end_point(&p256).unwrap(), Sha256::digest(&p256).to_vec());
        let p384 = cert_with(&rcgen::PKCS_ECDSA_P384_SHA384, "a");
        assert_eq!(end_point(&p384).unwrap(), Sha384::digest(&p384).to_vec());
        let ed = cert_with(&rcgen::PKCS_ED25519, "a");
        assert_eq!(end_point(&ed), None);
        assert_eq!(end_point(b"not a certificate"), None);
    }

    #[test]
    fn common_name_is_read() {
        let cert = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256, "app_user");
        assert_eq!(common_name(&cert).as_deref(), Some("app_user"));
        assert_eq!(common_name(b"\x30\x03\x02\x01\x00"), None);
    }

    #[test]
    fn disabled_offers_nothing() {
        let tls = ClientTls::load(&TlsConfig::default()).unwrap();
        assert_eq!(tls.mode(), TlsMode::Disable);
        assert!(!tls.offers_tls());
    }

    #[test]
    fn missing_files_name_their_key() {
        let config = TlsConfig {
            client_mode: TlsMode::Require,
            client_cert: "/nonexistent/cert.pem".to_owned(),
            client_key: "/nonexistent/key.pem".to_owned(),
            ..TlsConfig::default()
        };
        let err = ClientTls::load(&config).err().unwrap();
        assert_eq!(err.key(), "tls.client_cert");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
