//! Certificates the TLS tests make for themselves: a CA, a server certificate for
//! `localhost`, `127.0.0.1` and `::1`, and client certificates whose CN is a user name.
//! Everything is generated per test into a temp dir; no private key is committed.
//!
//! The files are readable by everyone in that dir's tree except the keys, which are
//! 0600 and, when the tests run as root, owned by `postgres` (the harness runs
//! PostgreSQL as that user, and it refuses a key others can read).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// A certificate and its key, written as PEM files.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority and what it signed, in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_cert: Certificate,
    ca_key: KeyPair,
    /// The CA's certificate: what `client_ca`, `server_ca` and `sslrootcert` point at.
    pub ca: PathBuf,
    /// For `localhost`, `127.0.0.1` and `::1`, signed by the CA.
    pub server: Pem,
}

impl Pki {
    /// A new CA named `name` and its server certificate.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("pgrelay-pki-")
            .tempdir()
            .expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = name_of(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = params.self_signed(&ca_key).expect("CA certificate");
        let ca = dir.path().join("ca.pem");
        write(&ca, ca_cert.pem().as_bytes(), 0o644);
        let mut pki = Pki {
            server: Pem {
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            dir,
            ca_cert,
            ca_key,
            ca,
        };
        pki.server = pki.sign(
            "server",
            "localhost",
            &["localhost", "127.0.0.1", "::1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        pki
    }

    /// A client certificate with CN `user`, signed by this CA.
    pub fn client(&self, user: &str) -> Pem {
        self.sign(
            &format!("client-{user}"),
            user,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        )
    }

    /// A client certificate with CN `user` that expired in 2001.
    pub fn expired_client(&self, user: &str) -> Pem {
        self.sign(
            &format!("expired-{user}"),
            user,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            true,
        )
    }

    /// The temp dir everything is written to.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn sign(
        &self,
        file: &str,
        common_name: &str,
        alt_names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> Pem {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name = name_of(common_name);
        params.subject_alt_names = alt_names
            .iter()
            .map(|name| match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().expect("DNS name")),
            })
            .collect();
        params.extended_key_usages = vec![purpose];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign");
        let pem = Pem {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
        };
        write(&pem.cert, cert.pem().as_bytes(), 0o644);
        write(&pem.key, key.serialize_pem().as_bytes(), 0o600);
        pem
    }
}

fn name_of(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// Writes `bytes` with `mode`; as root, the file goes to `postgres` so the servers
/// the harness runs as that user can read their key.
fn write(path: &Path, bytes: &[u8], mode: u32) {
    fs::write(path, bytes).expect("write PEM");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod PEM");
    if nix::unistd::geteuid().is_root() {
        if let Ok(Some(user)) = nix::unistd::User::from_name("postgres") {
            std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .expect("chown PEM");
        }
    }
}
