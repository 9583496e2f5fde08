//! SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL uses it) on both sides: [`ServerExchange`]
//! verifies a client against a stored secret and recovers the ClientKey it proved,
//! with `tls-server-end-point` channel binding (SCRAM-SHA-256-PLUS, RFC 5929) when the
//! client is on TLS; [`KeyClient`] logs in to a server with such a key when pgrelay
//! holds a SCRAM secret rather than a password, and with keys derived from a password
//! otherwise (derived once per password, salt and iteration count: [`password_keys`]).
//!
//! Sans-IO: the handshake code in `auth/mod.rs` moves the messages.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::ScramSecret;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// The mechanism with channel binding, offered to TLS clients before [`MECHANISM`].
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The one channel-binding type PostgreSQL (and so libpq) uses.
const END_POINT: &str = "tls-server-end-point";
/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    /// The GS2 header contradicts the mechanism the client chose (PostgreSQL's
    /// "malformed SCRAM message" with its detail).
    #[error("malformed SCRAM message: {0}")]
    BindingFlag(&'static str),
    #[error("unsupported SCRAM channel-binding type")]
    BindingType,
    /// `y`: the client can bind but thinks pgrelay cannot, while -PLUS was offered: a
    /// downgrade, refused as RFC 5802 §6 and PostgreSQL do.
    #[error("SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not, and this server does")]
    BindingDowngrade,
    #[error("SCRAM channel binding check failed")]
    BindingCheck,
    #[error("SCRAM nonce mismatch")]
    Nonce,
    #[error("SCRAM proof does not match")]
    Proof,
    #[error("server signature does not match")]
    ServerSignature,
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// PBKDF2-HMAC-SHA-256 with one output block, SCRAM's `Hi()`.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        out = xor(&out, &u);
    }
    out
}

/// SASLprep as PostgreSQL applies it: a password that does not normalize is used raw.
fn prepare_password(password: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(password).map(stringprep::saslprep) {
        Ok(Ok(prepared)) => prepared.into_owned().into_bytes(),
        _ => password.to_vec(),
    }
}

/// Derives a SCRAM secret from a password, as `CREATE ROLE ... PASSWORD` would.
pub fn derive_secret(password: &[u8], salt: Vec<u8>, iterations: u32) -> ScramSecret {
    let salted = salted_password(&prepare_password(password), &salt, iterations);
    let client_key = hmac(&salted, &[b"Client Key"]);
    ScramSecret {
        iterations,
        salt,
        stored_key: sha256(&client_key),
        server_key: hmac(&salted, &[b"Server Key"]),
    }
}

/// Whether a cleartext password matches a SCRAM secret.
pub fn password_matches(secret: &ScramSecret, password: &[u8]) -> bool {
    let derived = derive_secret(password, secret.salt.clone(), secret.iterations);
    constant_time_eq(&derived.stored_key, &secret.stored_key)
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_nonce() -> String {
    let mut raw = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

/// Channel binding in one exchange: what pgrelay offered and what the client chose.
#[derive(Debug, Clone, Copy, Default)]
pub struct Binding<'a> {
    /// `tls-server-end-point` data when SCRAM-SHA-256-PLUS was offered (TLS clients,
    /// unless pgrelay's certificate has no defined hash).
    pub offered: Option<&'a [u8]>,
    /// The client chose SCRAM-SHA-256-PLUS.
    pub selected: bool,
}

impl Binding<'_> {
    /// The mechanisms to offer, -PLUS first as PostgreSQL lists them.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.offered.is_some() {
            &[MECHANISM_PLUS, MECHANISM]
        } else {
            &[MECHANISM]
        }
    }

    /// What the client-final-message's `c=` must carry, before base64: the GS2 header,
    /// and the binding data when the client bound.
    fn expected_input(&self, gs2_header: &str) -> Result<Vec<u8>, ScramError> {
        let mut input = gs2_header.as_bytes().to_vec();
        match (gs2_header.as_bytes()[0], self.selected, self.offered) {
            (b'p', false, _) => Err(ScramError::BindingFlag(
                "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM \
                 message includes channel binding data.",
            )),
            (b'p', true, Some(data)) => {
                let kind = gs2_header[2..].split(',').next().unwrap_or_default();
                if kind != END_POINT {
                    return Err(ScramError::BindingType);
                }
                input.extend_from_slice(data);
                Ok(input)
            }
            // The mechanism check before the exchange refuses -PLUS when not offered.
            (b'p', true, None) => Err(ScramError::BindingType),
            (_, true, _) => Err(ScramError::BindingFlag(
                "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not \
                 include channel binding data.",
            )),
            (b'y', false, Some(_)) => Err(ScramError::BindingDowngrade),
            _ => Ok(input),
        }
    }
}

/// The server side of one SCRAM exchange.
pub struct ServerExchange {
    secret: ScramSecret,
    nonce: String,
    client_first_bare: String,
    server_first: String,
    /// What `c=` must decode to: the GS2 header, plus the binding data for `p=`.
    binding_input: Vec<u8>,
}

impl ServerExchange {
    /// Takes the client-first-message; returns the exchange and the server-first-message.
    pub fn start(
        secret: ScramSecret,
        client_first: &[u8],
        binding: Binding<'_>,
    ) -> Result<(Self, String), ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        let (gs2_header, bare) = split_gs2(text)?;
        let binding_input = binding.expected_input(gs2_header)?;
        let client_nonce = attribute(bare, 'r').ok_or(ScramError::Malformed)?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed);
        }
        let nonce = format!("{client_nonce}{}", random_nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&secret.salt),
            secret.iterations
        );
        let exchange = ServerExchange {
            secret,
            nonce,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            binding_input,
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final-message. On success returns the proven ClientKey and the
    /// server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<([u8; 32], String), ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let binding = attribute(without_proof, 'c').ok_or(ScramError::Malformed)?;
        let binding = B64.decode(binding).map_err(|_| ScramError::Malformed)?;
        if !constant_time_eq(&binding, &self.binding_input) {
            return Err(ScramError::BindingCheck);
        }
        if attribute(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed)?;
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.secret.stored_key, &[auth_message.as_bytes()]);
        let client_key = xor(&proof, &client_signature);
        if !constant_time_eq(&sha256(&client_key), &self.secret.stored_key) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&self.secret.server_key, &[auth_message.as_bytes()]);
        Ok((client_key, format!("v={}", B64.encode(server_signature))))
    }
}

/// Splits `n,,n=user,r=...` (or `p=tls-server-end-point,,...`) into the GS2 header
/// (`n,,`) and the bare message.
fn split_gs2(text: &str) -> Result<(&str, &str), ScramError> {
    if !matches!(text.as_bytes(), [b'n' | b'y', b',', ..] | [b'p', b'=', ..]) {
        return Err(ScramError::Malformed);
    }
    let first = text.find(',').ok_or(ScramError::Malformed)?;
    let second = text[first + 1..].find(',').ok_or(ScramError::Malformed)?;
    Ok(text.split_at(first + second + 2))
}

/// The value of `k=value` in a comma-separated SCRAM message.
fn attribute(message: &str, key: char) -> Option<&str> {
    message.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(key) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

/// A deterministic fake secret for unknown users, so an exchange for a user that does
/// not exist looks like one for a user that does (same salt every time).
pub fn mock_secret(user: &str, process_key: &[u8; 32]) -> ScramSecret {
    let salt = hmac(process_key, &[b"salt", user.as_bytes()])[..16].to_vec();
    let stored_key = hmac(process_key, &[b"stored", user.as_bytes()]);
    ScramSecret {
        iterations: DEFAULT_ITERATIONS,
        salt,
        stored_key,
        server_key: stored_key,
    }
}

/// The client side when only the keys are known: state between the first messages.
pub struct KeyClient {
    client_key: [u8; 32],
    server_key: [u8; 32],
    nonce: String,
    /// What the client-final-message's `c=` carries: the GS2 header, then the
    /// channel-binding data if there is any.
    binding_input: Vec<u8>,
}

/// The channel binding the client side of an exchange asks for (RFC 5802's GS2
/// header), as PostgreSQL's clients choose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBinding {
    /// `n`: none (no TLS, or nothing to bind to).
    Unsupported,
    /// `y`: the client could bind, but the server did not offer -PLUS.
    NotOffered,
    /// `p=tls-server-end-point`: SCRAM-SHA-256-PLUS, bound to this hash of the
    /// server's certificate.
    TlsServerEndPoint(Vec<u8>),
}

impl ClientBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            ClientBinding::Unsupported => "n,,",
            ClientBinding::NotOffered => "y,,",
            ClientBinding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }
}

impl KeyClient {
    /// Returns the client and its client-first-message.
    pub fn new(client_key: [u8; 32], server_key: [u8; 32]) -> (Self, String) {
        Self::bound(client_key, server_key, ClientBinding::Unsupported)
    }

    /// Like [`KeyClient::new`], with channel binding as `binding` says.
    pub fn bound(
        client_key: [u8; 32],
        server_key: [u8; 32],
        binding: ClientBinding,
    ) -> (Self, String) {
        let nonce = random_nonce();
        let header = binding.gs2_header();
        let first = format!("{header}n=,r={nonce}");
        let mut binding_input = header.as_bytes().to_vec();
        if let ClientBinding::TlsServerEndPoint(hash) = binding {
            binding_input.extend_from_slice(&hash);
        }
        (
            KeyClient {
                client_key,
                server_key,
                nonce,
                binding_input,
            },
            first,
        )
    }

    /// Given the server-first-message: the client-final-message and the expected
    /// server-final-message.
    pub fn respond(&self, server_first: &[u8]) -> Result<(String, String), ScramError> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
        let nonce = attribute(server_first, 'r').ok_or(ScramError::Malformed)?;
        if !nonce.starts_with(&self.nonce) {
            return Err(ScramError::Nonce);
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(&self.binding_input));
        let auth_message = format!("n=,r={},{server_first},{without_proof}", self.nonce);
        let stored_key = sha256(&self.client_key);
        let proof = xor(
            &self.client_key,
            &hmac(&stored_key, &[auth_message.as_bytes()]),
        );
        let server_final = format!(
            "v={}",
            B64.encode(hmac(&self.server_key, &[auth_message.as_bytes()]))
        );
        Ok((
            format!("{without_proof},p={}", B64.encode(proof)),
            server_final,
        ))
    }
}

/// A password's ClientKey and ServerKey for one salt and iteration count, remembered
/// by the SHA-256 of the prepared password (not the password itself).
struct DerivedKeys {
    password_hash: [u8; 32],
    salt: Vec<u8>,
    iterations: u32,
    keys: ([u8; 32], [u8; 32]),
}

/// How many derivations [`password_keys`] remembers: one per user, node and password
/// in use is enough; past this the oldest is forgotten.
const DERIVED_KEYS_KEPT: usize = 64;

/// The ClientKey and ServerKey of `password` for a server's salt and iteration count.
/// Deriving them is 4096 rounds of HMAC (milliseconds, on the thread that runs every
/// session) and pgrelay logs in to the same servers with the same password again and
/// again (a discarded server is replaced at once), so each derivation is done once.
/// This memo of a pure function is process-wide rather than in `Shared`: the same
/// inputs always give the same keys, so no configuration or reload can make it stale.
pub fn password_keys(password: &[u8], salt: &[u8], iterations: u32) -> ([u8; 32], [u8; 32]) {
    static DERIVED: std::sync::Mutex<Vec<DerivedKeys>> = std::sync::Mutex::new(Vec::new());
    let prepared = prepare_password(password);
    let password_hash = sha256(&prepared);
    let found = |derived: &Vec<DerivedKeys>| {
        derived
            .iter()
            .find(|d| {
                d.password_hash == password_hash && d.salt == salt && d.iterations == iterations
            })
            .map(|d| d.keys)
    };
    if let Some(keys) = found(&DERIVED.lock().unwrap_or_else(|p| p.into_inner())) {
        return keys;
    }
    // Derived without the lock held: another login may derive the same keys meanwhile.
    let salted = salted_password(&prepared, salt, iterations);
    let keys = (
        hmac(&salted, &[b"Client Key"]),
        hmac(&salted, &[b"Server Key"]),
    );
    let mut derived = DERIVED.lock().unwrap_or_else(|p| p.into_inner());
    if found(&derived).is_none() {
        if derived.len() >= DERIVED_KEYS_KEPT {
            derived.remove(0);
        }
        derived.push(DerivedKeys {
            password_hash,
            salt: salt.to_vec(),
            iterations,
            keys,
        });
    }
    keys
}

impl KeyClient {
    /// A client for a plaintext password: its keys come from the server-first-message's
    /// salt and iteration count ([`KeyClient::respond_with_password`]).
    pub fn for_password(binding: ClientBinding) -> (Self, String) {
        Self::bound([0; 32], [0; 32], binding)
    }

    /// [`KeyClient::respond`] with the keys of `password` for the salt and iteration
    /// count in `server_first`.
    pub fn respond_with_password(
        &mut self,
        password: &[u8],
        server_first: &[u8],
    ) -> Result<(String, String), ScramError> {
        let text = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed)?;
        let salt = attribute(text, 's')
            .and_then(|salt| B64.decode(salt).ok())
            .ok_or(ScramError::Malformed)?;
        let iterations = attribute(text, 'i')
            .and_then(|i| i.parse::<u32>().ok())
            .filter(|&i| i > 0)
            .ok_or(ScramError::Malformed)?;
        (self.client_key, self.server_key) = password_keys(password, &salt, iterations);
        self.respond(server_first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full exchange between our own client and server halves, then the same client
    /// key used again, as pgrelay does when it logs in to a server.
    #[test]
    fn exchange_recovers_client_key() {
        let secret = derive_secret(b"pencil", b"0123456789abcdef".to_vec(), 4096);
        let salted = salted_password(b"pencil", b"0123456789abcdef", 4096);
        let expected_key = hmac(&salted, &[b"Client Key"]);
        let (client, first) = KeyClient::new(expected_key, secret.server_key);
        let (server, server_first) =
            ServerExchange::start(secret.clone(), first.as_bytes(), Binding::default()).unwrap();
        let (client_final, expected_server_final) =
            client.respond(server_first.as_bytes()).unwrap();
        let (key, server_final) = server.finish(client_final.as_bytes()).unwrap();
        assert_eq!(key, expected_key);
        assert_eq!(server_final, expected_server_final);
    }

    #[test]
    fn wrong_key_is_rejected() {
        let secret = derive_secret(b"pencil", b"salt".to_vec(), 16);
        let (client, first) = KeyClient::new([1; 32], secret.server_key);
        let (server, server_first) =
            ServerExchange::start(secret, first.as_bytes(), Binding::default()).unwrap();
        let (client_final, _) = client.respond(server_first.as_bytes()).unwrap();
        assert_eq!(
            server.finish(client_final.as_bytes()).unwrap_err(),
            ScramError::Proof
        );
    }

    /// RFC 7677's test vector for SCRAM-SHA-256.
    #[test]
    fn rfc7677_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let secret = derive_secret(b"pencil", salt, 4096);
        let exchange = ServerExchange {
            secret,
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            client_first_bare: "n=user,r=rOprNGfwEbeRWgbNEkqO".into(),
            server_first: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".into(),
            binding_input: b"n,,".to_vec(),
        };
        let (_, server_final) = exchange
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(
            server_final,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    /// A client with a password derives its keys from the server's salt and iteration
    /// count (once: the second login finds them remembered) and proves itself to a
    /// server holding the secret of "pencil" with RFC 7677's salt; a wrong password's
    /// proof is refused, and a server-first-message without a salt is malformed.
    #[test]
    fn password_client_derives_keys_from_the_server_first() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let secret = derive_secret(b"pencil", salt, 4096);
        for _ in 0..2 {
            let (mut client, first) = KeyClient::for_password(ClientBinding::Unsupported);
            let (server, server_first) =
                ServerExchange::start(secret.clone(), first.as_bytes(), Binding::default())
                    .unwrap();
            let (client_final, expected) = client
                .respond_with_password(b"pencil", server_first.as_bytes())
                .unwrap();
            let (_, server_final) = server.finish(client_final.as_bytes()).unwrap();
            assert_eq!(server_final, expected);
        }
        let (mut client, first) = KeyClient::for_password(ClientBinding::Unsupported);
        let (server, server_first) =
            ServerExchange::start(secret, first.as_bytes(), Binding::default()).unwrap();
        let (client_final, _) = client
            .respond_with_password(b"pencil!", server_first.as_bytes())
            .unwrap();
        assert_eq!(
            server.finish(client_final.as_bytes()).unwrap_err(),
            ScramError::Proof
        );
        let (mut client, _) = KeyClient::for_password(ClientBinding::Unsupported);
        assert_eq!(
            client.respond_with_password(b"pencil", b"r=x,i=4096"),
            Err(ScramError::Malformed)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let secret = derive_secret(b"x", b"s".to_vec(), 2);
        let none = Binding::default();
        assert!(ServerExchange::start(secret.clone(), b"garbage", none).is_err());
        assert!(ServerExchange::start(secret.clone(), b"n,,n=,r=", none).is_err());
        assert!(ServerExchange::start(secret, b"p", none).is_err());
    }

    const BOUND: &[u8] = b"p=tls-server-end-point,,n=,r=abc";

    /// Every combination of what was offered, what the client chose and its GS2 flag,
    /// decided as PostgreSQL decides it.
    #[test]
    fn binding_decisions() {
        let secret = derive_secret(b"x", b"s".to_vec(), 2);
        let data: &[u8] = b"certificate hash";
        let plain = Binding::default();
        let tls = |selected| Binding {
            offered: Some(data),
            selected,
        };
        let start = |first: &[u8], binding| {
            ServerExchange::start(secret.clone(), first, binding)
                .map(|(exchange, _)| exchange.binding_input)
        };
        // Plaintext: `p=` is refused, `n` and `y` go ahead.
        assert!(matches!(
            start(BOUND, plain),
            Err(ScramError::BindingFlag(_))
        ));
        assert_eq!(start(b"n,,n=,r=abc", plain).unwrap(), b"n,,");
        assert_eq!(start(b"y,,n=,r=abc", plain).unwrap(), b"y,,");
        // TLS, -PLUS chosen: only `p=tls-server-end-point` will do.
        let mut expected = b"p=tls-server-end-point,,".to_vec();
        expected.extend_from_slice(data);
        assert_eq!(start(BOUND, tls(true)).unwrap(), expected);
        let unique = b"p=tls-unique,,n=,r=abc";
        assert_eq!(start(unique, tls(true)), Err(ScramError::BindingType));
        assert!(matches!(
            start(b"n,,n=,r=abc", tls(true)),
            Err(ScramError::BindingFlag(_))
        ));
        // TLS, plain SCRAM chosen: `n` is honest, `y` a downgrade, `p=` a contradiction.
        assert_eq!(start(b"n,,n=,r=abc", tls(false)).unwrap(), b"n,,");
        assert_eq!(
            start(b"y,,n=,r=abc", tls(false)),
            Err(ScramError::BindingDowngrade)
        );
        assert!(matches!(
            start(BOUND, tls(false)),
            Err(ScramError::BindingFlag(_))
        ));
        assert_eq!(tls(false).mechanisms(), [MECHANISM_PLUS, MECHANISM]);
        assert_eq!(plain.mechanisms(), [MECHANISM]);
    }

    /// A bound exchange end to end: the right `c=` passes, a client bound to another
    /// certificate fails the check.
    #[test]
    fn bound_exchange_checks_the_data() {
        let secret = derive_secret(b"pencil", b"salt".to_vec(), 16);
        let salted = salted_password(b"pencil", b"salt", 16);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let ours: &[u8] = b"hash of pgrelay's certificate";
        let binding = Binding {
            offered: Some(ours),
            selected: true,
        };
        let run = |theirs: &[u8]| {
            let (server, server_first) =
                ServerExchange::start(secret.clone(), BOUND, binding).unwrap();
            let nonce = attribute(&server_first, 'r').unwrap().to_owned();
            let mut c = b"p=tls-server-end-point,,".to_vec();
            c.extend_from_slice(theirs);
            let without_proof = format!("c={},r={nonce}", B64.encode(&c));
            let auth_message = format!("n=,r=abc,{server_first},{without_proof}");
            let signature = hmac(&sha256(&client_key), &[auth_message.as_bytes()]);
            let proof = B64.encode(xor(&client_key, &signature));
            server.finish(format!("{without_proof},p={proof}").as_bytes())
        };
        assert_eq!(run(ours).unwrap().0, client_key);
        assert_eq!(
            run(b"another certificate").unwrap_err(),
            ScramError::BindingCheck
        );
    }

    #[test]
    fn cleartext_check() {
        let secret = derive_secret(b"secret", b"salt".to_vec(), 8);
        assert!(password_matches(&secret, b"secret"));
        assert!(!password_matches(&secret, b"Secret"));
    }
}
