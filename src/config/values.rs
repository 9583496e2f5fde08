//! Values written as strings that need parsing: durations, addresses and passwords.
//!
//! Durations are a whole number and a unit: `"500ms"`, `"5s"`, `"2m"`, `"1h"`; `"0"` and
//! `"0s"` mean zero. A bare number (`5` or `"5"`) is refused rather than guessed, because
//! PgBouncer counts seconds and Pgpool-II mixes seconds and milliseconds, so a file ported
//! from either would otherwise be silently wrong. Passwords become a [`Secret`]; `Debug`
//! prints only their kind, and no parse error quotes them, not even when the TOML value
//! has the wrong type. This file holds no state and does no I/O; it authenticates nobody.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::ConfigError;

/// Units accepted after the number, with their length in milliseconds.
const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// Parses `"500ms"`, `"5s"`, `"2m"`, `"1h"`, `"0"` or `"0s"`.
///
/// The error is a sentence for the user; the caller prefixes the key it came from.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?} is not a duration: expected a whole number followed by a unit \
             (ms, s, m, h), e.g. \"5s\""
        ));
    }
    if unit.is_empty() {
        return Err(format!(
            "{text:?} has no unit: write e.g. \"{text}s\" or \"{text}ms\""
        ));
    }
    let Some(&(_, millis)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(format!(
            "{text:?} has an unknown unit {unit:?}: use ms, s, m or h"
        ));
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|value| value.checked_mul(millis))
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `deserialize_with` helper for a [`Duration`] field written as a string with a unit.
pub(super) fn deserialize_duration<'de, D>(deserializer: D) -> Result<Duration, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_any(DurationVisitor)
}

struct DurationVisitor;

impl DurationVisitor {
    fn bare_number<E: de::Error>(shown: impl fmt::Display) -> E {
        E::custom(format!(
            "a bare number ({shown}) is not a duration: add a unit, e.g. \"{shown}s\" or \
             \"{shown}ms\""
        ))
    }
}

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a duration string with a unit, e.g. \"5s\" or \"500ms\"")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Duration, E> {
        parse_duration(value).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Duration, E> {
        Err(Self::bare_number(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Duration, E> {
        Err(Self::bare_number(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Duration, E> {
        Err(Self::bare_number(value))
    }
}

/// `metrics_listen`: `""` means disabled, anything else must be an `IP:port`.
pub(super) fn deserialize_optional_addr<'de, D>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP:port address such as \"127.0.0.1:9930\" or \"[::1]:9930\" \
             (\"\" disables)"
        ))
    })
}

/// Prefix of PostgreSQL's SCRAM secret format (`pg_authid.rolpassword`).
const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";
/// Prefix of PostgreSQL's MD5 hash format.
const MD5_PREFIX: &str = "md5";

/// A user's password as pgrelay stores it; `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The password itself: every `auth_type` works with it.
    Plain(String),
    /// `md5(password || username)`, written `md5` + 32 hex digits. It cannot serve
    /// `auth_type = "scram-sha-256"`.
    Md5([u8; 16]),
    /// A SCRAM-SHA-256 verifier, as PostgreSQL stores it.
    Scram(ScramSecret),
}

/// The parts of `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (RFC 5802).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count sent to the client in the server-first message.
    pub iterations: u32,
    /// The salt, already base64-decoded.
    pub salt: Vec<u8>,
    /// `H(ClientKey)`: checks the client's proof.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`: signs the server-final message.
    pub server_key: [u8; 32],
}

impl Secret {
    /// Parses a password string as written in the configuration file.
    ///
    /// A string starting with `SCRAM-SHA-256$` must be a well-formed SCRAM secret; `md5`
    /// followed only by hex digits must have exactly 32 of them; anything else is a
    /// plaintext password. The error never contains the value.
    pub fn parse(text: &str) -> Result<Secret, ConfigError> {
        parse_secret(text).map_err(|reason| ConfigError::Invalid {
            key: "password".to_owned(),
            message: reason.to_owned(),
        })
    }

    /// The kind, for logs and the admin console: `plain`, `md5` or `scram-sha-256`.
    pub fn kind(&self) -> &'static str {
        match self {
            Secret::Plain(_) => "plain",
            Secret::Md5(_) => "md5",
            Secret::Scram(_) => "scram-sha-256",
        }
    }
}

fn parse_secret(text: &str) -> Result<Secret, &'static str> {
    if let Some(rest) = text.strip_prefix(SCRAM_PREFIX) {
        return parse_scram(rest).map(Secret::Scram);
    }
    if let Some(hex) = text.strip_prefix(MD5_PREFIX) {
        // PostgreSQL would take a truncated hash as a plaintext password; refusing it
        // turns a copy-paste slip into a startup error instead of a login mystery.
        if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return decode_md5(hex).map(Secret::Md5);
        }
    }
    Ok(Secret::Plain(text.to_owned()))
}

fn decode_md5(hex: &str) -> Result<[u8; 16], &'static str> {
    const WRONG_LENGTH: &str =
        "looks like an md5 hash but is not \"md5\" followed by exactly 32 hex digits";
    if hex.len() != 32 {
        return Err(WRONG_LENGTH);
    }
    let mut hash = [0u8; 16];
    for (byte, pair) in hash.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        let text = std::str::from_utf8(pair).map_err(|_| WRONG_LENGTH)?;
        *byte = u8::from_str_radix(text, 16).map_err(|_| WRONG_LENGTH)?;
    }
    Ok(hash)
}

fn parse_scram(rest: &str) -> Result<ScramSecret, &'static str> {
    const SHAPE: &str = "a SCRAM secret must look like \
        \"SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>\"";
    let (params, keys) = rest.split_once('$').ok_or(SHAPE)?;
    let (iterations, salt) = params.split_once(':').ok_or(SHAPE)?;
    let (stored_key, server_key) = keys.split_once(':').ok_or(SHAPE)?;
    let iterations = iterations
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0 && iterations.bytes().all(|b| b.is_ascii_digit()))
        .ok_or("the SCRAM iteration count must be a positive whole number")?;
    let salt = BASE64
        .decode(salt)
        .map_err(|_| "the SCRAM salt is not valid base64")?;
    if salt.is_empty() {
        return Err("the SCRAM salt is empty");
    }
    Ok(ScramSecret {
        iterations,
        salt,
        stored_key: decode_key(stored_key)
            .ok_or("the SCRAM StoredKey is not 32 bytes of base64")?,
        server_key: decode_key(server_key)
            .ok_or("the SCRAM ServerKey is not 32 bytes of base64")?,
    })
}

fn decode_key(text: &str) -> Option<[u8; 32]> {
    BASE64.decode(text).ok()?.try_into().ok()
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Secret::Plain(_) => "Plain",
            Secret::Md5(_) => "Md5",
            Secret::Scram(_) => "Scram",
        };
        write!(f, "Secret::{name}(<redacted>)")
    }
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt", &format_args!("<{} bytes>", self.salt.len()))
            .field("stored_key", &format_args!("<redacted>"))
            .field("server_key", &format_args!("<redacted>"))
            .finish()
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        let text = deserialize_redacted_string(deserializer)?;
        parse_secret(&text).map_err(de::Error::custom)
    }
}

/// `deserialize_with` helper for a password kept as a `String`: like `String`'s own
/// impl, except that a value of the wrong type is not echoed in the error.
pub(super) fn deserialize_redacted_string<'de, D>(deserializer: D) -> Result<String, D::Error>
where
    D: Deserializer<'de>,
{
    deserializer.deserialize_string(RedactedStringVisitor)
}

struct RedactedStringVisitor;

impl RedactedStringVisitor {
    fn wrong_type<E: de::Error>() -> E {
        E::custom("a password must be a string (value not shown)")
    }
}

impl Visitor<'_> for RedactedStringVisitor {
    type Value = String;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a password string")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<String, E> {
        Ok(value.to_owned())
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<String, E> {
        Ok(value)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
        Err(Self::wrong_type())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
        Err(Self::wrong_type())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
        Err(Self::wrong_type())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
        Err(Self::wrong_type())
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<String, E> {
        Err(Self::wrong_type())
    }
}

/// etcd's client port, for `failover.lease_endpoints` that name none.
pub const ETCD_PORT: u16 = 2379;

/// One HTTP endpoint: Patroni's REST API (`failover.patroni_urls`) or etcd's
/// (`failover.lease_endpoints`), checked when the config is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatroniEndpoint {
    pub host: String,
    pub port: u16,
}

impl PatroniEndpoint {
    /// Parses `http://host[:port][/]` (port 8008 by default, Patroni's).
    pub fn parse(url: &str) -> Result<PatroniEndpoint, String> {
        Self::parse_with_port(url, 8008)
    }

    /// Parses `http://host[:port][/]`, `default_port` when none is given (etcd's
    /// endpoints use this too, with [`ETCD_PORT`]).
    pub fn parse_with_port(url: &str, default_port: u16) -> Result<PatroniEndpoint, String> {
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            return Err(format!(
                "{url:?}: https is not supported; give Patroni's REST API over http://"
            ));
        } else {
            return Err(format!("{url:?} must start with http://"));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!("{url:?}: give only the scheme, host and port"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| format!("{url:?}: unclosed ["))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .map_err(|_| format!("{url:?}: bad port {port:?}"))?,
            None => default_port,
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        Ok(PatroniEndpoint {
            host: host.to_owned(),
            port,
        })
    }
}

/// A path where `""` means none.
pub(super) fn deserialize_optional_path<'de, D>(
    deserializer: D,
) -> Result<Option<std::path::PathBuf>, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    Ok((!text.is_empty()).then(|| text.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    type HmacSha256 = Hmac<Sha256>;

    fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// RFC 5802 `Hi()`: PBKDF2-HMAC-SHA-256 with one output block.
    fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut block = salt.to_vec();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = hmac(password, &block);
        let mut out = u;
        for _ in 1..iterations {
            u = hmac(password, &u);
            out.iter_mut().zip(u).for_each(|(o, x)| *o ^= x);
        }
        out
    }

    fn scram_string(password: &[u8], salt: &[u8], iterations: u32) -> (String, [u8; 32], [u8; 32]) {
        let salted = salted_password(password, salt, iterations);
        let stored: [u8; 32] = Sha256::digest(hmac(&salted, b"Client Key")).into();
        let server = hmac(&salted, b"Server Key");
        let text = format!(
            "SCRAM-SHA-256${iterations}:{}${}:{}",
            BASE64.encode(salt),
            BASE64.encode(stored),
            BASE64.encode(server)
        );
        (text, stored, server)
    }

    #[test]
    fn parses_plaintext() {
        assert_eq!(
            parse_secret("app-secret"),
            Ok(Secret::Plain("app-secret".into()))
        );
        assert_eq!(parse_secret(""), Ok(Secret::Plain(String::new())));
        assert_eq!(parse_secret("md5"), Ok(Secret::Plain("md5".into())));
        assert_eq!(
            parse_secret("md5-is-my-password"),
            Ok(Secret::Plain("md5-is-my-password".into()))
        );
    }

    #[test]
    fn parses_md5_from_postgres_protocol() {
        let text = postgres_protocol::password::md5(b"app-secret", "app");
        let Ok(Secret::Md5(hash)) = parse_secret(&text) else {
            panic!("md5 secret not recognised");
        };
        let expected: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(format!("md5{expected}"), text);
        let upper = format!("md5{}", expected.to_uppercase());
        assert_eq!(parse_secret(&upper), Ok(Secret::Md5(hash)));
    }

    #[test]
    fn rejects_truncated_md5() {
        let err = parse_secret("md5a3556571e93b0d20722ba62be61e8c2").unwrap_err();
        assert!(err.contains("32 hex digits"));
        assert!(!err.contains("a3556571"));
    }

    #[test]
    fn parses_scram_with_known_keys() {
        let (text, stored, server) = scram_string(b"app-secret", b"0123456789abcdef", 4096);
        let Ok(Secret::Scram(scram)) = parse_secret(&text) else {
            panic!("SCRAM secret not recognised");
        };
        assert_eq!(scram.iterations, 4096);
        assert_eq!(scram.salt, b"0123456789abcdef");
        assert_eq!(scram.stored_key, stored);
        assert_eq!(scram.server_key, server);
    }

    #[test]
    fn parses_scram_from_postgres_protocol() {
        let text = postgres_protocol::password::scram_sha_256(b"app-secret");
        let Ok(Secret::Scram(scram)) = parse_secret(&text) else {
            panic!("SCRAM secret not recognised");
        };
        assert_eq!(scram.iterations, 4096);
        assert!(!scram.salt.is_empty());
    }

    #[test]
    fn rejects_malformed_scram_without_echoing_it() {
        let (good, _, _) = scram_string(b"pw", b"salt-salt", 10);
        let bad = [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!!$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            &good[..good.len() - 4],
        ];
        for text in bad {
            let reason = parse_secret(text).expect_err(text);
            assert!(!reason.contains("c2FsdA"), "{reason}");
        }
    }

    #[test]
    fn debug_is_redacted() {
        let (text, _, _) = scram_string(b"pw", b"salt-salt", 10);
        let scram = parse_secret(&text).expect("valid");
        let md5 = parse_secret(&postgres_protocol::password::md5(b"pw", "u")).expect("valid");
        assert_eq!(
            format!("{:?}", Secret::Plain("hunter2".into())),
            "Secret::Plain(<redacted>)"
        );
        assert_eq!(format!("{md5:?}"), "Secret::Md5(<redacted>)");
        assert_eq!(format!("{scram:?}"), "Secret::Scram(<redacted>)");
        let Secret::Scram(inner) = scram else {
            panic!("not SCRAM")
        };
        let shown = format!("{inner:?}");
        assert!(
            shown.contains("iterations: 10") && !shown.contains(&BASE64.encode(inner.stored_key))
        );
    }

    #[test]
    fn public_parse_reports_invalid_password() {
        let err = Secret::parse("md5abc").unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { ref key, .. } if key == "password"));
        assert_eq!(Secret::parse("x").map(|s| s.kind()).ok(), Some("plain"));
    }

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3600s"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn parses_zero() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "", "5", "s", "-5s", "5 s", " 5s", "5sec", "1.5s", "5S", "5d", "ms5",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn names_the_problem() {
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5d")
            .unwrap_err()
            .contains("unknown unit \"d\""));
    }

    #[test]
    fn rejects_overflow() {
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration("18446744073709551615h").is_err());
    }

    #[test]
    fn endpoints_parse() {
        let ok = |url: &str| PatroniEndpoint::parse(url).expect(url);
        assert_eq!(
            ok("http://127.0.0.1:8008"),
            PatroniEndpoint {
                host: "127.0.0.1".into(),
                port: 8008
            }
        );
        assert_eq!(ok("http://db1/").port, 8008);
        assert_eq!(ok("http://[::1]:8009").host, "::1");
        assert!(PatroniEndpoint::parse("https://db1:8008").is_err());
        assert!(PatroniEndpoint::parse("db1:8008").is_err());
        assert!(PatroniEndpoint::parse("http://db1:80x").is_err());
        assert!(PatroniEndpoint::parse("http://db1:8008/cluster").is_err());
        assert!(PatroniEndpoint::parse("http://").is_err());
    }
}
