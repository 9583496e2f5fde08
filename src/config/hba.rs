//! `[[hba]]`: host-based access rules with pg_hba.conf's meaning (PgBouncer's
//! `auth_hba_file`, Pgpool-II's `pool_hba.conf`), as data and their parsing. Matching a
//! connection against them is `auth`'s job; what is checked across keys (an `address`
//! on a `local` rule, `cert` without client TLS) is in `validate`.

use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// One `[[hba]]` entry. The first entry whose `type`, `database`, `user` and `address`
/// match a connection decides how it authenticates; none matching refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HbaRule {
    /// Which transport the rule is for. Required.
    #[serde(rename = "type")]
    pub kind: HbaType,
    /// `"all"`, names (an array, or a comma-separated string as in pg_hba.conf), and
    /// `sameuser` (the database named as the user). Required.
    pub database: NameList,
    /// `"all"` or names, as `database`. Required.
    pub user: NameList,
    /// A CIDR (`10.0.0.0/8`, `::1/128`; a bare address is a single host) or `"all"`;
    /// required for the `host` types, absent for `local`.
    #[serde(default)]
    pub address: Option<HbaAddress>,
    /// How a matching connection authenticates. Required.
    pub method: HbaMethod,
}

/// `hba.type`: the transport a rule is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HbaType {
    /// A Unix-socket listener (`listen = ["unix:..."]`).
    Local,
    /// TCP, with or without TLS.
    Host,
    /// TCP over TLS only.
    Hostssl,
    /// TCP without TLS only.
    Hostnossl,
}

/// `hba.method`: how a connection a rule matched authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum HbaMethod {
    /// Let in without a password (the user must still be in `[[users]]`).
    #[serde(rename = "trust")]
    Trust,
    /// Refuse, with PostgreSQL's "pg_hba.conf rejects connection" error.
    #[serde(rename = "reject")]
    Reject,
    /// Cleartext password (`auth_type = "plain"`).
    #[serde(rename = "password")]
    Password,
    /// MD5 challenge; users stored with a SCRAM secret get SCRAM, as in PostgreSQL.
    #[serde(rename = "md5")]
    Md5,
    /// SCRAM-SHA-256 (and -PLUS over TLS).
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// A verified client certificate whose CN is the user name; `hostssl` only.
    #[serde(rename = "cert")]
    Cert,
}

/// `hba.database` / `hba.user`: what a rule's name column matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameList(pub Vec<NamePattern>);

/// One entry of a [`NameList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    /// `all`: any name.
    All,
    /// `sameuser` (databases only): the database named as the user.
    SameUser,
    /// This name exactly.
    Name(String),
}

impl NameList {
    /// Whether `name` is matched; `user` is the connecting user, for `sameuser`.
    pub fn matches(&self, name: &str, user: &str) -> bool {
        self.0.iter().any(|pattern| match pattern {
            NamePattern::All => true,
            NamePattern::SameUser => name == user,
            NamePattern::Name(n) => n == name,
        })
    }

    /// The first pg_hba.conf keyword pgrelay does not take, with why, for `validate`.
    pub(super) fn unsupported(&self, is_user: bool) -> Option<String> {
        self.0.iter().find_map(|pattern| match pattern {
            NamePattern::SameUser if is_user => {
                Some("\"sameuser\" only applies to database".to_owned())
            }
            NamePattern::Name(n) if n.is_empty() => Some("names must not be empty".to_owned()),
            NamePattern::Name(n) if n == "replication" && !is_user => Some(
                "\"replication\" matches replication connections, which pgrelay does not \
                 accept"
                    .to_owned(),
            ),
            NamePattern::Name(n) if n == "samerole" || n == "samegroup" => {
                Some(format!("\"{n}\" is not supported: list the names"))
            }
            NamePattern::Name(n) if n.starts_with('+') || n.starts_with('@') => Some(format!(
                "{n:?}: group (+) and file (@) names are not supported: list the names"
            )),
            _ => None,
        })
    }

    fn from_names<'a>(names: impl Iterator<Item = &'a str>) -> NameList {
        NameList(
            names
                .map(|name| match name {
                    "all" => NamePattern::All,
                    "sameuser" => NamePattern::SameUser,
                    name => NamePattern::Name(name.to_owned()),
                })
                .collect(),
        )
    }
}

impl<'de> Deserialize<'de> for NameList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<NameList, D::Error> {
        deserializer.deserialize_any(NameListVisitor)
    }
}

struct NameListVisitor;

impl<'de> Visitor<'de> for NameListVisitor {
    type Value = NameList;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("\"all\", an array of names, or names separated by commas")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<NameList, E> {
        Ok(NameList::from_names(value.split(',').map(str::trim)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NameList, A::Error> {
        let mut names = Vec::new();
        while let Some(name) = seq.next_element::<String>()? {
            names.push(name);
        }
        if names.is_empty() {
            return Err(de::Error::custom("the list must not be empty"));
        }
        Ok(NameList::from_names(names.iter().map(String::as_str)))
    }
}

/// `hba.address`: the client addresses a `host` rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaAddress {
    /// `all`: any address.
    All,
    /// An address range.
    Cidr(Cidr),
}

impl HbaAddress {
    /// Whether a client at `ip` is in range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            HbaAddress::All => true,
            HbaAddress::Cidr(cidr) => cidr.contains(ip),
        }
    }
}

/// An IPv4 or IPv6 network: an address and the length of its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (a single host).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| {
            format!(
                "{text:?} is not an IP address or CIDR range such as \"10.0.0.0/8\" or \
                 \"::1/128\" (host names are not supported)"
            )
        })?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => match prefix.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{text:?}: the prefix length must be 0 to {max}")),
            },
        };
        let cidr = Cidr { network, prefix };
        if cidr.masked(network) != network {
            return Err(format!(
                "{text:?} has bits set outside its /{prefix} prefix (did you mean {}/{prefix}?)",
                cidr.masked(network)
            ));
        }
        // An IPv4-mapped range (`::ffff:10.0.0.0/104`) names IPv4 clients: clients are
        // matched by their canonical address, so it is kept as the IPv4 range it is.
        Ok(match network {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Cidr {
                    network: IpAddr::V4(v4),
                    prefix: prefix - 96,
                },
                None => cidr,
            },
            _ => cidr,
        })
    }

    /// Whether `ip` is in this network. An IPv4 client seen on an IPv6 socket
    /// (`::ffff:a.b.c.d`) matches IPv4 ranges, as in PostgreSQL.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let same_family = ip.is_ipv4() == self.network.is_ipv4();
        same_family && self.masked(ip) == self.network
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> Deserialize<'de> for HbaAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<HbaAddress, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "all" {
            return Ok(HbaAddress::All);
        }
        Cidr::parse(&text)
            .map(HbaAddress::Cidr)
            .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let net = Cidr::parse("10.0.0.0/8").expect("v4");
        assert!(net.contains(ip("10.1.2.3")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::1")));
        assert!(net.contains(ip("::ffff:10.9.9.9")), "v4-mapped client");
        let host = Cidr::parse("127.0.0.1").expect("bare v4");
        assert_eq!(host.to_string(), "127.0.0.1/32");
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
        let v6 = Cidr::parse("::1/128").expect("v6");
        assert!(v6.contains(ip("::1")) && !v6.contains(ip("127.0.0.1")));
        let wide = Cidr::parse("fd00::/8").expect("v6 net");
        assert!(wide.contains(ip("fd12:3456::1")) && !wide.contains(ip("fe80::1")));
        let any = Cidr::parse("0.0.0.0/0").expect("any v4");
        assert!(any.contains(ip("192.0.2.1")) && !any.contains(ip("::2")));
        assert!(Cidr::parse("::/0")
            .expect("any v6")
            .contains(ip("2001:db8::1")));
        // A rule written in IPv4-mapped form names the IPv4 clients it maps.
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").expect("mapped range");
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        assert!(mapped.contains(ip("10.1.2.3")) && mapped.contains(ip("::ffff:10.1.2.3")));
        assert!(!mapped.contains(ip("11.0.0.1")));
        let mapped_host = Cidr::parse("::ffff:127.0.0.1").expect("mapped host");
        assert!(mapped_host.contains(ip("127.0.0.1")) && !mapped_host.contains(ip("127.0.0.2")));
    }

    #[test]
    fn bad_cidrs_say_why() {
        for bad in [
            "10.0.0.0/33",
            "::1/129",
            "localhost",
            "10.0.0/8",
            "10.0.0.1/8",
            "",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        let err = Cidr::parse("10.0.0.1/8").expect_err("host bits");
        assert!(err.contains("10.0.0.0/8"), "{err}");
    }

    #[test]
    fn name_lists_take_arrays_and_commas() {
        #[derive(Deserialize)]
        struct Row {
            names: NameList,
        }
        let parse = |text: &str| toml::from_str::<Row>(text).map(|row| row.names);
        let list = parse("names = \"app, reports\"").expect("commas");
        assert!(list.matches("app", "u") && list.matches("reports", "u"));
        assert!(!list.matches("other", "u"));
        let list = parse("names = [\"app\", \"sameuser\"]").expect("array");
        assert!(list.matches("app", "u") && list.matches("bob", "bob"));
        assert!(!list.matches("bob", "alice"));
        assert!(parse("names = \"all\"").expect("all").matches("x", "y"));
        assert!(parse("names = []").is_err());
        assert!(parse("names = 3").is_err());
    }

    #[test]
    fn unsupported_keywords_are_named() {
        let list = |names: &[&str]| NameList::from_names(names.iter().copied());
        assert!(list(&["replication"]).unsupported(false).is_some());
        assert!(list(&["+admins"]).unsupported(true).is_some());
        assert!(list(&["@file"]).unsupported(false).is_some());
        assert!(list(&["sameuser"]).unsupported(true).is_some());
        assert!(list(&["sameuser"]).unsupported(false).is_none());
        assert!(list(&["a", ""]).unsupported(false).is_some());
        assert!(list(&["all", "app"]).unsupported(true).is_none());
    }
}
