//! Server-facing TLS: pgrelay as the TLS client of PostgreSQL servers, for pool
//! connections, health and lag checks alike.
//!
//! [`Connector`] holds the current [`ServerTls`] (the `tls.server_mode` policy and the
//! rustls `ClientConfig` built once for it) behind an `ArcSwap`: a RELOAD or SIGHUP
//! builds a new one for new server connections, and a `server_ca` that fails to load
//! leaves the old one in place. [`ServerTls::negotiate`] asks a freshly connected
//! server for TLS (SSLRequest) and does the handshake; [`end_point_hash`] gives what
//! SCRAM-SHA-256-PLUS binds to (`tls-server-end-point`, RFC 5929).
//!
//! The modes mean what libpq's `sslmode` means: `disable` never asks; `allow` logs in
//! in plaintext and tries once more over TLS if the server refuses that login; `prefer`
//! asks and falls back to plaintext when the server answers `N` (and, as libpq, tries
//! once more in plaintext when the handshake fails or the server refuses the login over
//! TLS; those second tries are `pool::server`'s); `require` insists and checks no
//! certificate; `verify-ca` checks the chain against `server_ca` but not the host name;
//! `verify-full` checks both. As in libpq, SNI carries the backend's host name, never
//! an IP address. TLS 1.2 and 1.3 only. No client certificate is shown to servers.
//!
//! No background task and no logging: the callers log (`control` a failed reload, the
//! pools and health checks a server that failed).

use std::io;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{TlsConfig, TlsMode};
use crate::stream::{Stream, TlsSocket};

/// SSLRequest: length 8, then the code 80877103 (1234 << 16 | 5679).
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Why a server TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("tls.server_ca {path:?} could not be read: {source}")]
    CaRead {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("tls.server_ca {path:?} holds no usable CA certificate")]
    CaEmpty { path: String },
    #[error("tls.server_ca {path:?}: {source}")]
    Verifier {
        path: String,
        source: rustls::client::VerifierBuilderError,
    },
    #[error("could not build the TLS client configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why TLS with one server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsConnectError {
    #[error("i/o error asking for TLS: {0}")]
    Io(#[from] io::Error),
    #[error("the server does not accept TLS (it answered N to SSLRequest) and tls.server_mode = {mode:?} requires it")]
    Refused { mode: &'static str },
    #[error("unexpected answer {0:?} to SSLRequest")]
    Answer(char),
    #[error("host name {0:?} cannot be verified (tls.server_mode = \"verify-full\")")]
    ServerName(String),
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] io::Error),
    #[error("no TLS configuration: {0}")]
    Unavailable(Arc<ConnectorError>),
}

impl TlsConnectError {
    /// The connection broke on its way (reset, closed): another try may work. A
    /// refusal, a certificate that fails verification or a missing CA says the same
    /// next time.
    pub fn transient(&self) -> bool {
        match self {
            TlsConnectError::Io(_) => true,
            TlsConnectError::Handshake(err) => err.kind() != io::ErrorKind::InvalidData,
            _ => false,
        }
    }
}

/// The current server TLS settings, swapped whole on reload.
pub struct Connector {
    current: ArcSwap<ServerTls>,
}

impl Connector {
    /// Builds the settings `tls` asks for (reading `server_ca` for the verify modes).
    pub fn new(tls: &TlsConfig) -> Result<Connector, ConnectorError> {
        Ok(Connector {
            current: ArcSwap::from_pointee(ServerTls::build(tls)?),
        })
    }

    /// Settings whose TLS connections all fail with `err`: what pgrelay runs with when
    /// `server_ca` could not be loaded at start (the caller refuses to start, or logs).
    pub fn failed(mode: TlsMode, err: ConnectorError) -> Connector {
        Connector {
            current: ArcSwap::from_pointee(ServerTls {
                mode,
                client: Err(Arc::new(err)),
            }),
        }
    }

    /// The settings for a new server connection.
    pub fn current(&self) -> Arc<ServerTls> {
        self.current.load_full()
    }

    /// Builds new settings from `tls` for connections opened from now on. On an
    /// error the old settings stay in place and the error is returned to be logged.
    pub fn reload(&self, tls: &TlsConfig) -> Result<(), ConnectorError> {
        let next = ServerTls::build(tls)?;
        self.current.store(Arc::new(next));
        Ok(())
    }
}

impl Default for Connector {
    /// `[tls]`'s defaults: `prefer`, no CA.
    fn default() -> Self {
        let mode = TlsConfig::default().server_mode;
        Connector {
            current: ArcSwap::from_pointee(ServerTls {
                mode,
                client: client_config(mode, None).map_err(Arc::new),
            }),
        }
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("mode", &self.current.load().mode.as_str())
            .finish()
    }
}

/// One generation of the server TLS settings.
pub struct ServerTls {
    mode: TlsMode,
    /// Built once per generation; an error only when `server_ca` failed at start-up.
    client: Result<Arc<ClientConfig>, Arc<ConnectorError>>,
}

impl ServerTls {
    fn build(tls: &TlsConfig) -> Result<ServerTls, ConnectorError> {
        let mode = tls.server_mode;
        let roots = if mode.verifies_peer() {
            Some(load_roots(&tls.server_ca)?)
        } else {
            None
        };
        let client = client_config(mode, roots).map_err(|err| match err {
            ConnectorError::Verifier { source, .. } => ConnectorError::Verifier {
                path: tls.server_ca.clone(),
                source,
            },
            err => err,
        })?;
        Ok(ServerTls {
            mode,
            client: Ok(client),
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Why TLS connections fail, when the CA could not be loaded at start-up.
    pub fn error(&self) -> Option<&Arc<ConnectorError>> {
        self.client.as_ref().err()
    }

    /// Whether a first login asks for TLS: every mode but `disable` and `allow`.
    pub fn asks_first(&self) -> bool {
        !matches!(self.mode, TlsMode::Disable | TlsMode::Allow)
    }

    /// On a fresh connection to `host`: with `ask`, sends SSLRequest and, if the
    /// server agrees, does the TLS handshake. A server's `N` gives a plaintext stream
    /// in `prefer` and an error in the modes that require TLS, and in `allow`, whose
    /// only TLS attempt is the retry after a refused plaintext login. Not cancel safe.
    pub async fn negotiate(
        &self,
        mut tcp: TcpStream,
        host: &str,
        ask: bool,
    ) -> Result<Stream, TlsConnectError> {
        if !ask || self.mode == TlsMode::Disable {
            return Ok(Stream::Plain(tcp));
        }
        let client = self
            .client
            .as_ref()
            .map_err(|e| TlsConnectError::Unavailable(e.clone()))?;
        tcp.write_all(&SSL_REQUEST).await?;
        // One byte, read straight off the socket: whatever a server sent after its 'S'
        // stays unread and reaches rustls, which rejects it (CVE-2021-23222).
        match tcp.read_u8().await? {
            b'S' => {}
            b'N' if self.mode == TlsMode::Prefer => return Ok(Stream::Plain(tcp)),
            b'N' => {
                return Err(TlsConnectError::Refused {
                    mode: self.mode.as_str(),
                })
            }
            other => return Err(TlsConnectError::Answer(other as char)),
        }
        let name = server_name(host, self.mode)?;
        let tls = tokio_rustls::TlsConnector::from(client.clone())
            .connect(name, TlsSocket::new(tcp))
            .await
            .map_err(TlsConnectError::Handshake)?;
        Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(tls))))
    }
}

/// The name the handshake is for: the host name (sent as SNI, checked in
/// `verify-full`) or an IP address (never sent as SNI). A host that is neither (it
/// cannot be in a certificate) is only an error where the name is checked.
fn server_name(host: &str, mode: TlsMode) -> Result<ServerName<'static>, TlsConnectError> {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match ServerName::try_from(host.to_owned()) {
        Ok(name) => Ok(name),
        Err(_) if mode != TlsMode::VerifyFull => Ok(ServerName::IpAddress(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
        )),
        Err(_) => Err(TlsConnectError::ServerName(host.to_owned())),
    }
}

fn load_roots(path: &str) -> Result<RootCertStore, ConnectorError> {
    let read_error = |source| ConnectorError::CaRead {
        path: path.to_owned(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(Path::new(path)).map_err(read_error)? {
        // A certificate rustls cannot use is skipped, as OpenSSL does in a bundle.
        let _ = roots.add(cert.map_err(read_error)?);
    }
    if roots.is_empty() {
        return Err(ConnectorError::CaEmpty {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

fn client_config(
    mode: TlsMode,
    roots: Option<RootCertStore>,
) -> Result<Arc<ClientConfig>, ConnectorError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        Some(roots) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| ConnectorError::Verifier {
                    path: String::new(),
                    source,
                })?;
            if mode == TlsMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly { webpki })
            }
        }
        None => Arc::new(AnyCertificate { algorithms }),
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// `require` (and `prefer`, `allow`): any certificate, as libpq without a root
/// certificate. The handshake's signatures are still checked, so the peer holds the
/// key of the certificate it showed (which channel binding relies on).
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain (trust, validity, usage) is checked as in `verify-full`;
/// only a certificate that is not for the host name is let through.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name last, after the chain: this error means the chain held.
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// What a SCRAM-SHA-256-PLUS login over `stream` binds to: the `tls-server-end-point`
/// hash of the server's certificate (RFC 5929: the hash of its signature algorithm,
/// SHA-256 for MD5 and SHA-1). None over plaintext, and for a certificate whose
/// signature algorithm names no such hash (RSA-PSS, Ed25519), for which PostgreSQL
/// cannot compute it either.
pub fn end_point_hash(stream: &Stream) -> Option<Vec<u8>> {
    let Stream::Tls(tls) = stream else {
        return None;
    };
    let tokio_rustls::TlsStream::Client(client) = tls.as_ref() else {
        return None;
    };
    let cert = client.get_ref().1.peer_certificates()?.first()?;
    certificate_hash(cert)
}

/// The `tls-server-end-point` hash of a DER certificate.
pub fn certificate_hash(der: &[u8]) -> Option<Vec<u8>> {
    let hash = match signature_algorithm(der)? {
        // md5, sha1 (RSA) and ecdsa-with-SHA1 become SHA-256, as RFC 5929 says.
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04 | 0x05 | 0x0b]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02] => sha2::Sha256::digest(der).to_vec(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] => sha2::Sha384::digest(der).to_vec(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04] => sha2::Sha512::digest(der).to_vec(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e]
        | [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x01] => sha2::Sha224::digest(der).to_vec(),
        _ => return None,
    };
    Some(hash)
}

/// The OID (content bytes) of a certificate's outer `signatureAlgorithm`:
/// `Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm
/// AlgorithmIdentifier, signatureValue }`.
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (_tbs, rest) = der_element(certificate, 0x30)?;
    let (algorithm, _) = der_element(rest, 0x30)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    Some(oid)
}

/// Splits one DER element with tag `tag` off `input`: (its content, what follows).
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len_byte, rest) = rest.split_first()?;
    let (len, rest) = if len_byte < 0x80 {
        (usize::from(len_byte), rest)
    } else {
        let count = usize::from(len_byte & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[count..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tokio::net::TcpListener;

    /// A CA (its PEM in a temp file) and a server certificate it signed for
    /// `localhost` and 127.0.0.1.
    struct TestPki {
        dir: tempfile::TempDir,
        ca: String,
        server_der: CertificateDer<'static>,
        server_key: Vec<u8>,
    }

    fn pki() -> TestPki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Each CA its own name, or webpki takes one for the other's issuer.
        let name = format!("test CA {}", rand::random::<u64>());
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_cert = params.self_signed(&ca_key).expect("CA");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).expect("write CA");
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
        let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("sign");
        TestPki {
            ca: ca.to_string_lossy().into_owned(),
            dir,
            server_der: cert.der().clone(),
            server_key: key.serialize_der(),
        }
    }

    fn tls_config(mode: TlsMode, ca: &str) -> TlsConfig {
        TlsConfig {
            server_mode: mode,
            server_ca: ca.to_owned(),
            ..TlsConfig::default()
        }
    }

    /// A server that answers one SSLRequest with `answer` and, for `S`, completes a
    /// TLS handshake with `pki`'s certificate. Returns its address and what it saw
    /// as SNI.
    async fn sni_server(
        answer: u8,
        pki: Option<&TestPki>,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Option<String>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = pki.map(|pki| {
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server_key.clone().into());
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![pki.server_der.clone()], key)
            .expect("server config");
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let seen = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = [0; 8];
            socket.read_exact(&mut request).await.expect("SSLRequest");
            assert_eq!(request, SSL_REQUEST);
            socket.write_all(&[answer]).await.expect("answer");
            let mut tls = acceptor?.accept(socket).await.ok()?;
            let sni = tls.get_ref().1.server_name().map(str::to_owned);
            let _ = tls.write_all(b"hi").await;
            let _ = tls.flush().await;
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
            sni
        });
        (addr, seen)
    }

    async fn fake_server(answer: u8, pki: Option<&TestPki>) -> std::net::SocketAddr {
        sni_server(answer, pki).await.0
    }

    async fn negotiate(
        tls: &TlsConfig,
        addr: std::net::SocketAddr,
        host: &str,
    ) -> Result<Stream, TlsConnectError> {
        let connector = Connector::new(tls).expect("connector");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        connector.current().negotiate(tcp, host, true).await
    }

    #[tokio::test]
    async fn verify_full_with_the_right_ca_binds_to_the_certificate() {
        let pki = pki();
        let addr = fake_server(b'S', Some(&pki)).await;
        let mut stream = negotiate(&tls_config(TlsMode::VerifyFull, &pki.ca), addr, "localhost")
            .await
            .expect("TLS");
        assert!(matches!(stream, Stream::Tls(_)));
        let expected = sha2::Sha256::digest(&pki.server_der).to_vec();
        assert_eq!(end_point_hash(&stream), Some(expected));
        let mut hi = [0; 2];
        stream.read_exact(&mut hi).await.expect("read over TLS");
        assert_eq!(&hi, b"hi");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_fails_verification() {
        let (pki, other) = (pki(), pki());
        for mode in [TlsMode::VerifyFull, TlsMode::VerifyCa] {
            let addr = fake_server(b'S', Some(&pki)).await;
            let err = negotiate(&tls_config(mode, &other.ca), addr, "localhost")
                .await
                .err()
                .expect("verification fails");
            assert!(err.to_string().contains("UnknownIssuer"), "{err}");
            assert!(!err.transient(), "{err}");
        }
        // require checks nothing.
        let addr = fake_server(b'S', Some(&pki)).await;
        let stream = negotiate(&tls_config(TlsMode::Require, &other.ca), addr, "localhost").await;
        assert!(matches!(stream, Ok(Stream::Tls(_))));
    }

    #[tokio::test]
    async fn verify_ca_ignores_the_host_name_and_verify_full_does_not() {
        let pki = pki();
        let addr = fake_server(b'S', Some(&pki)).await;
        let stream = negotiate(&tls_config(TlsMode::VerifyCa, &pki.ca), addr, "db.example").await;
        assert!(matches!(stream, Ok(Stream::Tls(_))));
        let addr = fake_server(b'S', Some(&pki)).await;
        let err = negotiate(
            &tls_config(TlsMode::VerifyFull, &pki.ca),
            addr,
            "db.example",
        )
        .await
        .err()
        .expect("wrong name");
        assert!(err.to_string().contains("not valid for name"), "{err}");
        // An IP address is checked against the certificate's IP names.
        let addr = fake_server(b'S', Some(&pki)).await;
        let stream = negotiate(&tls_config(TlsMode::VerifyFull, &pki.ca), addr, "127.0.0.1").await;
        assert!(matches!(stream, Ok(Stream::Tls(_))));
    }

    /// SNI carries a host name, never an IP address (as libpq).
    #[tokio::test]
    async fn sni_is_the_host_name() {
        let pki = pki();
        for (host, expected) in [("localhost", Some("localhost")), ("127.0.0.1", None)] {
            let (addr, seen) = sni_server(b'S', Some(&pki)).await;
            let stream = negotiate(&tls_config(TlsMode::VerifyFull, &pki.ca), addr, host)
                .await
                .expect("TLS");
            drop(stream);
            assert_eq!(seen.await.expect("server").as_deref(), expected, "{host}");
        }
    }

    #[tokio::test]
    async fn a_server_without_tls() {
        let addr = fake_server(b'N', None).await;
        let stream = negotiate(&tls_config(TlsMode::Prefer, ""), addr, "localhost").await;
        assert!(matches!(stream, Ok(Stream::Plain(_))));
        for mode in [TlsMode::Require, TlsMode::Allow] {
            let addr = fake_server(b'N', None).await;
            let err = negotiate(&tls_config(mode, ""), addr, "localhost")
                .await
                .err()
                .expect("refused");
            assert!(matches!(err, TlsConnectError::Refused { .. }), "{err}");
        }
        let addr = fake_server(b'E', None).await;
        let err = negotiate(&tls_config(TlsMode::Prefer, ""), addr, "localhost").await;
        assert!(matches!(err, Err(TlsConnectError::Answer('E'))));
    }

    /// `disable`, and a first plaintext attempt, send nothing before the startup packet.
    #[tokio::test]
    async fn disable_sends_no_ssl_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut first = [0; 5];
            socket.read_exact(&mut first).await.expect("read");
            first
        });
        let connector = Connector::new(&tls_config(TlsMode::Disable, "")).expect("connector");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut stream = connector
            .current()
            .negotiate(tcp, "localhost", true)
            .await
            .expect("plain");
        assert!(matches!(stream, Stream::Plain(_)));
        stream.write_all(b"hello").await.expect("write");
        assert_eq!(&server.await.expect("server"), b"hello");
        assert!(!Connector::new(&tls_config(TlsMode::Allow, ""))
            .expect("allow")
            .current()
            .asks_first());
    }

    #[test]
    fn reload_keeps_the_old_settings_when_the_ca_fails() {
        let pki = pki();
        let connector = Connector::new(&tls_config(TlsMode::VerifyFull, &pki.ca)).expect("built");
        let missing = pki.dir.path().join("missing.pem");
        let err = connector
            .reload(&tls_config(TlsMode::VerifyCa, &missing.to_string_lossy()))
            .expect_err("missing CA");
        assert!(matches!(err, ConnectorError::CaRead { .. }), "{err}");
        assert_eq!(connector.current().mode(), TlsMode::VerifyFull);
        let empty = pki.dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificates here\n").expect("write");
        let err = connector
            .reload(&tls_config(TlsMode::VerifyCa, &empty.to_string_lossy()))
            .expect_err("empty CA");
        assert!(matches!(err, ConnectorError::CaEmpty { .. }), "{err}");
        connector
            .reload(&tls_config(TlsMode::Require, ""))
            .expect("no CA needed");
        assert_eq!(connector.current().mode(), TlsMode::Require);
        assert!(connector.current().error().is_none());
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let cert = CertificateParams::new(vec!["x".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(
            certificate_hash(cert.der()),
            Some(sha2::Sha384::digest(cert.der()).to_vec())
        );
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let cert = CertificateParams::new(vec!["x".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(certificate_hash(cert.der()), None, "Ed25519 names no hash");
        assert_eq!(certificate_hash(b"\x30\x03\x02\x01"), None);
        assert_eq!(certificate_hash(b""), None);
    }

    #[test]
    fn der_lengths() {
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend([0u8; 0x80]);
        let (content, rest) = der_element(&long, 0x30).expect("long form");
        assert_eq!((content.len(), rest.len()), (0x80, 0));
        assert!(der_element(&[0x30, 0x82, 0x01], 0x30).is_none());
        assert!(der_element(&[0x30, 0x05, 0x01], 0x30).is_none());
        assert!(der_element(&[0x31, 0x00], 0x30).is_none());
    }

    #[test]
    fn server_names() {
        assert!(matches!(
            server_name("127.0.0.1", TlsMode::VerifyFull),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("[::1]", TlsMode::VerifyFull),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name("db.internal", TlsMode::VerifyFull),
            Ok(ServerName::DnsName(_))
        ));
        assert!(server_name("not a host", TlsMode::VerifyFull).is_err());
        assert!(server_name("not a host", TlsMode::Require).is_ok());
    }
}
