//! SCRAM-SHA-256 (RFC 5802/7677 as PostgreSQL uses it, without channel binding) on both
//! sides: [`ServerExchange`] verifies a client against a stored secret and recovers the
//! ClientKey it proved; [`client_final_with_keys`] logs in to a server with such a key
//! when pgrelay holds a SCRAM secret rather than a password.
//!
//! Sans-IO: the handshake code in `auth/mod.rs` moves the messages.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::ScramSecret;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message")]
    Malformed,
    #[error("channel binding is not supported")]
    ChannelBinding,
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

/// The server side of one SCRAM exchange.
pub struct ServerExchange {
    secret: ScramSecret,
    nonce: String,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
}

impl ServerExchange {
    /// Takes the client-first-message; returns the exchange and the server-first-message.
    pub fn start(secret: ScramSecret, client_first: &[u8]) -> Result<(Self, String), ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed)?;
        let (gs2_header, bare) = split_gs2(text)?;
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
            gs2_header: gs2_header.to_owned(),
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final-message. On success returns the proven ClientKey and the
    /// server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<([u8; 32], String), ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed)?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed)?;
        let binding = attribute(without_proof, 'c').ok_or(ScramError::Malformed)?;
        if binding != B64.encode(&self.gs2_header) {
            return Err(ScramError::ChannelBinding);
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

/// Splits `n,,n=user,r=...` into the GS2 header (`n,,`) and the bare message.
fn split_gs2(text: &str) -> Result<(&str, &str), ScramError> {
    let header_len = match text.as_bytes().first() {
        Some(b'n' | b'y') => {
            let first = text.find(',').ok_or(ScramError::Malformed)?;
            let second = text[first + 1..].find(',').ok_or(ScramError::Malformed)?;
            first + second + 2
        }
        Some(b'p') => return Err(ScramError::ChannelBinding),
        _ => return Err(ScramError::Malformed),
    };
    Ok(text.split_at(header_len))
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
            ServerExchange::start(secret.clone(), first.as_bytes()).unwrap();
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
        let (server, server_first) = ServerExchange::start(secret, first.as_bytes()).unwrap();
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
            gs2_header: "n,,".into(),
        };
        let (_, server_final) = exchange
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(
            server_final,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }

    #[test]
    fn channel_binding_and_garbage() {
        let secret = derive_secret(b"x", b"s".to_vec(), 2);
        assert_eq!(
            ServerExchange::start(secret.clone(), b"p=tls-server-end-point,,n=,r=abc").err(),
            Some(ScramError::ChannelBinding)
        );
        assert!(ServerExchange::start(secret.clone(), b"garbage").is_err());
        assert!(ServerExchange::start(secret, b"n,,n=,r=").is_err());
    }

    #[test]
    fn cleartext_check() {
        let secret = derive_secret(b"secret", b"salt".to_vec(), 8);
        assert!(password_matches(&secret, b"secret"));
        assert!(!password_matches(&secret, b"Secret"));
    }
}
