//! `listen` entries: a TCP address, or a Unix socket (`unix:<path of the socket file>`),
//! written as a string, or as a table that also ties the listener to an endpoint
//! (`{ address = "0.0.0.0:5001", target = "replica" }`) for users who route by port.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::schema::EndpointTarget;

/// What `unix:` entries start with.
const UNIX_PREFIX: &str = "unix:";

/// The longest socket path the kernel takes (`sun_path` holds 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// One address the client listener binds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// `IP:port` (IPv6 in brackets).
    Tcp(SocketAddr),
    /// `unix:<path>`: the socket file itself. libpq finds it as `.s.PGSQL.<port>` in
    /// the directory given as `host`, so name it that way for psql `-h <dir> -p <port>`.
    Unix(PathBuf),
}

impl ListenAddr {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            ListenAddr::Tcp(addr) => Some(*addr),
            ListenAddr::Unix(_) => None,
        }
    }

    /// The socket file, if this is a Unix socket.
    pub fn unix(&self) -> Option<&Path> {
        match self {
            ListenAddr::Tcp(_) => None,
            ListenAddr::Unix(path) => Some(path),
        }
    }

    /// The port a Unix socket's file name carries (`.s.PGSQL.6432`), for display.
    pub fn socket_port(path: &Path) -> Option<u16> {
        path.file_name()?
            .to_str()?
            .strip_prefix(".s.PGSQL.")?
            .parse()
            .ok()
    }
}

impl From<SocketAddr> for ListenAddr {
    fn from(addr: SocketAddr) -> Self {
        ListenAddr::Tcp(addr)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => addr.fmt(f),
            ListenAddr::Unix(path) => write!(f, "{UNIX_PREFIX}{}", path.display()),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<ListenAddr, String> {
        if let Some(path) = text.strip_prefix(UNIX_PREFIX) {
            if path.is_empty() || path.ends_with('/') {
                return Err(format!(
                    "{text:?}: give the socket file's path, e.g. \"unix:/run/pgrelay/.s.PGSQL.6432\""
                ));
            }
            if path.len() > MAX_SOCKET_PATH {
                return Err(format!(
                    "{text:?}: a Unix socket path may be at most {MAX_SOCKET_PATH} bytes"
                ));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        text.parse().map(ListenAddr::Tcp).map_err(|_| {
            format!(
                "{text:?} is not an IP:port address such as \"127.0.0.1:6432\" or \
                 \"[::1]:6432\", nor a Unix socket such as \"unix:/run/pgrelay/.s.PGSQL.6432\""
            )
        })
    }
}

/// One `listen` entry: where to listen, and the endpoint its clients reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub addr: ListenAddr,
    /// Every client of this listener goes to this endpoint, whatever its database's
    /// `target` (none: its database's).
    pub target: Option<EndpointTarget>,
    /// As a database's `primary_fallback`, for this listener's `target`. Default `true`.
    pub primary_fallback: Option<bool>,
}

impl Listen {
    /// The TCP address, if this is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        self.addr.tcp()
    }

    /// The endpoint this listener ties its clients to, if any, with its fallback.
    pub fn endpoint(&self) -> Option<(EndpointTarget, bool)> {
        self.target
            .map(|target| (target, self.primary_fallback.unwrap_or(true)))
    }
}

impl From<ListenAddr> for Listen {
    fn from(addr: ListenAddr) -> Self {
        Listen {
            addr,
            target: None,
            primary_fallback: None,
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Listen, String> {
        text.parse::<ListenAddr>().map(Listen::from)
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target {
            None => self.addr.fmt(f),
            Some(target) => {
                let target = serde_json::to_value(target).map_err(|_| fmt::Error)?;
                write!(f, "{} (target = {target})", self.addr)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Listen, D::Error> {
        deserializer.deserialize_any(ListenVisitor)
    }
}

struct ListenVisitor;

/// The table form's keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenTable {
    address: ListenAddr,
    #[serde(default)]
    target: Option<EndpointTarget>,
    #[serde(default)]
    primary_fallback: Option<bool>,
}

impl<'de> Visitor<'de> for ListenVisitor {
    type Value = Listen;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str(
            "an address (\"127.0.0.1:6432\", \"unix:/run/pgrelay/.s.PGSQL.6432\") or a table \
             { address = \"...\", target = \"replica\" }",
        )
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Listen, E> {
        text.parse().map_err(E::custom)
    }

    fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Listen, M::Error> {
        let table = ListenTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Listen {
            addr: table.address,
            target: table.target,
            primary_fallback: table.primary_fallback,
        })
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<ListenAddr, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        let tcp: ListenAddr = "[::1]:6432".parse().expect("tcp");
        assert_eq!(
            tcp.tcp(),
            Some(SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 6432)))
        );
        let unix: ListenAddr = "unix:/run/pgrelay/.s.PGSQL.6432".parse().expect("unix");
        assert_eq!(unix.unix(), Some(Path::new("/run/pgrelay/.s.PGSQL.6432")));
        assert_eq!(unix.to_string(), "unix:/run/pgrelay/.s.PGSQL.6432");
        assert_eq!(
            ListenAddr::socket_port(unix.unix().expect("path")),
            Some(6432)
        );
        assert_eq!(
            ListenAddr::socket_port(Path::new("/tmp/pgrelay.sock")),
            None
        );
        for bad in ["unix:", "unix:/run/pgrelay/", "localhost:6432", "6432"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        let long = format!("unix:/{}", "x".repeat(MAX_SOCKET_PATH));
        assert!(long.parse::<ListenAddr>().is_err());
    }
}
