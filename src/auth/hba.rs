//! The `[[hba]]` rules applied to a login: the first rule whose type, database, user
//! and address match decides the method, as in pg_hba.conf; `reject`, and no rule
//! matching, refuse the client with PostgreSQL's own words (28000). Evaluated once per
//! login, on the config snapshot the login began with; nothing here runs per request.

use std::net::IpAddr;

use crate::config::{AuthType, Config, HbaMethod, HbaRule, HbaType};
use crate::error::{sqlstate, ClientError, ErrorKind};

/// Where a client connected from, as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A Unix-socket listener: `local` rules.
    Unix,
    /// TCP from this address: the `host` rules.
    Ip(IpAddr),
    /// No address known (an in-memory client of a benchmark): no rule matches.
    Unknown,
}

impl Peer {
    /// How PostgreSQL names the client's host in its messages.
    fn host(self) -> String {
        match self {
            Peer::Unix => "[local]".to_owned(),
            Peer::Ip(ip) => ip.to_canonical().to_string(),
            Peer::Unknown => "[unknown]".to_owned(),
        }
    }
}

/// A connection as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub peer: Peer,
    /// On TLS.
    pub tls: bool,
    pub user: &'a str,
    pub database: &'a str,
}

/// The method for this connection: `None` with no `[[hba]]` rules (`auth_type` and
/// `users.auth_type` decide), else the first matching rule's. Refused with
/// PostgreSQL's error when that rule is `reject` or no rule matches.
pub fn method_for(config: &Config, conn: &Connection<'_>) -> Result<Option<AuthType>, ClientError> {
    if config.hba.is_empty() {
        return Ok(None);
    }
    let Some(rule) = config.hba.iter().find(|rule| matches(rule, conn)) else {
        return Err(refused("no pg_hba.conf entry for", conn));
    };
    let auth_type = match rule.method {
        HbaMethod::Reject => return Err(refused("pg_hba.conf rejects connection for", conn)),
        HbaMethod::Trust => AuthType::Trust,
        HbaMethod::Password => AuthType::Plain,
        HbaMethod::Md5 => AuthType::Md5,
        HbaMethod::ScramSha256 => AuthType::ScramSha256,
        HbaMethod::Cert => AuthType::Cert,
    };
    Ok(Some(auth_type))
}

/// Whether `rule` applies to `conn`.
fn matches(rule: &HbaRule, conn: &Connection<'_>) -> bool {
    let transport = match (rule.kind, conn.peer) {
        (HbaType::Local, Peer::Unix) => true,
        (HbaType::Host, Peer::Ip(_)) => true,
        (HbaType::Hostssl, Peer::Ip(_)) => conn.tls,
        (HbaType::Hostnossl, Peer::Ip(_)) => !conn.tls,
        _ => false,
    };
    let address = match (rule.address, conn.peer) {
        (Some(address), Peer::Ip(ip)) => address.contains(ip),
        (None, _) => true,
        (Some(_), _) => false,
    };
    transport
        && address
        && rule.database.matches(conn.database, conn.user)
        && rule.user.matches(conn.user, conn.user)
}

/// PostgreSQL's refusal: `<what> host "<ip>", user "<u>", database "<d>", <encryption>`.
fn refused(what: &str, conn: &Connection<'_>) -> ClientError {
    let encryption = if conn.tls {
        "SSL encryption"
    } else {
        "no encryption"
    };
    let message = format!(
        "{what} host \"{}\", user \"{}\", database \"{}\", {encryption}",
        conn.peer.host(),
        conn.user,
        conn.database
    );
    ClientError::fatal(
        ErrorKind::Auth,
        sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKEND: &str = "[[backends]]\nhost = \"127.0.0.1\"\n";
    const TLS: &str = "[tls]\nclient_mode = \"prefer\"\nclient_cert = \"c.pem\"\n\
                       client_key = \"k.pem\"\nclient_ca = \"ca.pem\"\n";

    /// A config whose `[[hba]]` rules are `rows`: `(type, database, user, address, method)`.
    fn config(rows: &[(&str, &str, &str, &str, &str)]) -> Config {
        let mut text = format!("{TLS}{BACKEND}");
        for (kind, database, user, address, method) in rows {
            text.push_str(&format!(
                "[[hba]]\ntype = \"{kind}\"\ndatabase = \"{database}\"\nuser = \"{user}\"\n\
                 method = \"{method}\"\n"
            ));
            if !address.is_empty() {
                text.push_str(&format!("address = \"{address}\"\n"));
            }
        }
        Config::from_toml_str(&text).expect("valid config")
    }

    fn conn<'a>(peer: &str, tls: bool, user: &'a str, database: &'a str) -> Connection<'a> {
        let peer = match peer {
            "unix" => Peer::Unix,
            "" => Peer::Unknown,
            ip => Peer::Ip(ip.parse().expect("ip")),
        };
        Connection {
            peer,
            tls,
            user,
            database,
        }
    }

    fn method(config: &Config, conn: &Connection<'_>) -> Result<Option<AuthType>, String> {
        method_for(config, conn).map_err(|e| {
            assert_eq!(e.code, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION);
            e.message.to_string()
        })
    }

    #[test]
    fn no_rules_leave_auth_type_in_charge() {
        let config = config(&[]);
        assert_eq!(
            method(&config, &conn("10.0.0.1", false, "a", "b")),
            Ok(None)
        );
    }

    #[test]
    fn first_match_wins() {
        let config = config(&[
            ("host", "all", "bob", "all", "reject"),
            ("host", "all", "all", "127.0.0.0/8", "trust"),
            ("host", "all", "all", "all", "scram-sha-256"),
        ]);
        let bob = method(&config, &conn("127.0.0.1", false, "bob", "app"));
        assert_eq!(
            bob,
            Err(
                "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"bob\", \
                 database \"app\", no encryption"
                    .to_owned()
            )
        );
        let local = conn("127.0.0.1", false, "app", "app");
        assert_eq!(method(&config, &local), Ok(Some(AuthType::Trust)));
        let remote = conn("192.0.2.7", true, "app", "app");
        assert_eq!(method(&config, &remote), Ok(Some(AuthType::ScramSha256)));
    }

    #[test]
    fn no_match_is_refused_with_postgres_words() {
        let config = config(&[("host", "all", "all", "10.0.0.0/8", "md5")]);
        let refused = method(&config, &conn("127.0.0.1", true, "app", "app"));
        assert_eq!(
            refused,
            Err(
                "no pg_hba.conf entry for host \"127.0.0.1\", user \"app\", database \"app\", \
                 SSL encryption"
                    .to_owned()
            )
        );
        let unix = method(&config, &conn("unix", false, "app", "db"));
        assert_eq!(
            unix,
            Err(
                "no pg_hba.conf entry for host \"[local]\", user \"app\", database \"db\", \
                 no encryption"
                    .to_owned()
            )
        );
        assert_eq!(
            method(&config, &conn("10.1.1.1", false, "app", "app")),
            Ok(Some(AuthType::Md5))
        );
    }

    #[test]
    fn types_match_their_transport() {
        let config = config(&[
            ("local", "all", "all", "", "trust"),
            ("hostssl", "all", "all", "all", "cert"),
            ("hostnossl", "all", "all", "all", "password"),
        ]);
        let at = |peer, tls| method(&config, &conn(peer, tls, "u", "d"));
        assert_eq!(at("unix", false), Ok(Some(AuthType::Trust)));
        assert_eq!(at("::1", true), Ok(Some(AuthType::Cert)));
        assert_eq!(at("::1", false), Ok(Some(AuthType::Plain)));
        assert!(at("", false).is_err(), "an unknown peer matches nothing");
        let host_only = self::config(&[("host", "all", "all", "all", "trust")]);
        assert!(method(&host_only, &conn("unix", false, "u", "d")).is_err());
    }

    #[test]
    fn names_and_addresses_narrow_rules() {
        let config = config(&[
            ("host", "sameuser", "all", "::1/128", "trust"),
            ("host", "app,pgrelay", "admin, app", "fd00::/8", "md5"),
            ("host", "app,pgrelay", "admin, app", "127.0.0.1", "password"),
        ]);
        let at = |peer, user, db| method(&config, &conn(peer, false, user, db));
        assert_eq!(at("::1", "bob", "bob"), Ok(Some(AuthType::Trust)));
        assert!(at("::1", "bob", "app").is_err());
        assert_eq!(
            at("127.0.0.1", "admin", "pgrelay"),
            Ok(Some(AuthType::Plain))
        );
        assert_eq!(at("fd00::5", "app", "app"), Ok(Some(AuthType::Md5)));
        // An IPv4 client on an IPv6 socket is an IPv4 client, as in PostgreSQL.
        assert_eq!(
            at("::ffff:127.0.0.1", "app", "app"),
            Ok(Some(AuthType::Plain))
        );
        assert!(at("127.0.0.1", "carol", "app").is_err());
    }
}
