//! `pgrelay import`: PgBouncer's and Pgpool-II's configuration files translated into a
//! pgrelay.toml text.
//!
//! This module reads the old files (`pgbouncer.ini` with its `userlist.txt` and
//! `auth_hba_file`; `pgpool.conf` with `pool_hba.conf` and `pool_passwd`) and writes
//! one TOML document, with a comment for every setting that has no equivalent or a
//! different meaning. It only produces text: it starts nothing and touches no file but
//! the ones it is given. Before the text is returned it is parsed and validated with
//! [`Config::from_toml_str`]; a text pgrelay refuses is an importer bug and an error.
//! Input it cannot read is refused with the file's name and line number.
//!
//! `pgbouncer.rs` (with `aliases.rs` for `[databases]`) and `pgpool.rs` (with
//! `pgpool_nodes.rs` for backends, health checks and failover) map each tool's
//! settings; `ini.rs` and `conf.rs` read their syntax; `hba.rs` reads pg_hba.conf-style
//! rules; `secrets.rs` reads the password files; `notes.rs` says why the rest is not
//! carried over; `doc.rs` is the output being built.

mod aliases;
mod conf;
mod doc;
mod hba;
mod ini;
mod notes;
mod pgbouncer;
mod pgpool;
mod pgpool_nodes;
#[cfg(test)]
mod robust;
mod secrets;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, ConfigError};

/// Which tool a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    PgBouncer,
    Pgpool,
}

impl Source {
    /// The name its comments carry (`# pgbouncer: key = value -- why`).
    fn tag(self) -> &'static str {
        match self {
            Source::PgBouncer => "pgbouncer",
            Source::Pgpool => "pgpool",
        }
    }
}

/// One input file: the name errors and comments use, and its text.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub name: String,
    pub text: String,
}

impl InputFile {
    /// Reads `path`; the error names it.
    pub fn read(path: &Path) -> Result<InputFile, ImportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ImportError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(InputFile {
            name: path.display().to_string(),
            text,
        })
    }
}

/// What to translate.
#[derive(Debug, Clone)]
pub struct Request {
    /// `pgbouncer.ini` or `pgpool.conf`.
    pub main: InputFile,
    /// Which of the two; `None`: told from the text ([`detect`]).
    pub from: Option<Source>,
    /// PgBouncer's `auth_file` (`"user" "secret"` lines).
    pub userlist: Option<InputFile>,
    /// Access rules: Pgpool-II's `pool_hba.conf`, or PgBouncer's `auth_hba_file`.
    pub hba: Option<InputFile>,
    /// Pgpool-II's `pool_passwd` (`user:secret` lines).
    pub pool_passwd: Option<InputFile>,
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// An input file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line the importer cannot read or will not translate.
    #[error("{file}:{line}: {message}")]
    Line {
        file: String,
        line: usize,
        message: String,
    },
    /// A problem with a whole file or with the request.
    #[error("{file}: {message}")]
    File { file: String, message: String },
    /// The importer wrote a configuration pgrelay refuses: a bug in the importer.
    #[error("the imported configuration does not pass pgrelay's checks (an importer bug, please report it with the input)")]
    Invalid(#[source] ConfigError),
}

impl ImportError {
    fn line(file: &str, line: usize, message: impl Into<String>) -> ImportError {
        ImportError::Line {
            file: file.to_owned(),
            line,
            message: message.into(),
        }
    }

    fn file(file: &str, message: impl Into<String>) -> ImportError {
        ImportError::File {
            file: file.to_owned(),
            message: message.into(),
        }
    }
}

/// Translates the request's files into a pgrelay.toml text that pgrelay accepts.
pub fn import(request: &Request) -> Result<String, ImportError> {
    let source = match request.from {
        Some(source) => source,
        None => detect(&request.main.text).ok_or_else(|| {
            ImportError::file(
                &request.main.name,
                "cannot tell a PgBouncer file (a [pgbouncer] section) from a Pgpool-II one \
                 (backend_hostname0 = ...): say which with --from pgbouncer or --from pgpool",
            )
        })?,
    };
    let text = match source {
        Source::PgBouncer => pgbouncer::import(request)?,
        Source::Pgpool => pgpool::import(request)?,
    };
    Config::from_toml_str(&text).map_err(ImportError::Invalid)?;
    Ok(text)
}

/// Which tool `text` is a configuration file of, if that can be told.
pub fn detect(text: &str) -> Option<Source> {
    let lines = || text.lines().map(|l| l.trim().to_ascii_lowercase());
    let section = |l: &str| l == "[pgbouncer]" || l == "[databases]" || l == "[users]";
    if lines().any(|l| section(&l)) {
        return Some(Source::PgBouncer);
    }
    const PGPOOL_KEYS: [&str; 6] = [
        "backend_hostname",
        "backend_clustering_mode",
        "master_slave_mode",
        "num_init_children",
        "enable_pool_hba",
        "pcp_port",
    ];
    lines()
        .any(|l| PGPOOL_KEYS.iter().any(|k| l.starts_with(k)))
        .then_some(Source::Pgpool)
}

/// A comment for a setting that is not carried over, or carried with a different
/// meaning: `pgbouncer: key = value -- why`. Passwords are never shown.
fn unmapped(source: Source, key: &str, value: &str, why: &str) -> String {
    let value = if is_secret(key) && !value.is_empty() {
        "<hidden>".to_owned()
    } else if value.is_empty() {
        "''".to_owned()
    } else {
        value.to_owned()
    };
    format!("{}: {key} = {value} -- {why}", source.tag())
}

fn is_secret(key: &str) -> bool {
    key.contains("password") || key.contains("authkey")
}

/// A duration as pgrelay writes it: whole seconds, else milliseconds.
fn duration_text(d: Duration) -> String {
    crate::config::duration_text(d)
}

/// A number with an optional unit (`ms`, `s`, `min`, `h`, `d`); a bare number is in
/// `bare_ms` milliseconds. Fractions are allowed.
fn parse_time(text: &str, bare_ms: f64) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let unit_ms = match unit.trim() {
        "" => bare_ms,
        "ms" => 1.0,
        "s" => 1_000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    let ms = number * unit_ms;
    (0.0..1e15)
        .contains(&ms)
        .then(|| Duration::from_millis(ms.round() as u64))
}

/// `on`/`off`, `true`/`false`, `yes`/`no`, `1`/`0`.
fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// The role a host or alias name suggests: `postgres-replica`, `mydb_read`,
/// `pg-master` and the like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NamedRole {
    Primary,
    Replica,
    Unknown,
}

impl NamedRole {
    fn of(name: &str) -> NamedRole {
        const REPLICA_PARTS: [&str; 4] = ["replica", "standby", "slave", "secondary"];
        const REPLICA_WORDS: [&str; 5] = ["read", "reads", "reader", "ro", "readonly"];
        const PRIMARY_PARTS: [&str; 3] = ["primary", "master", "leader"];
        const PRIMARY_WORDS: [&str; 5] = ["rw", "write", "writes", "writer", "main"];
        let lower = name.to_ascii_lowercase();
        let words: Vec<&str> = lower
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        let has = |parts: &[&str], whole: &[&str]| {
            words
                .iter()
                .any(|w| whole.contains(w) || parts.iter().any(|p| w.contains(p)))
        };
        match (
            has(&REPLICA_PARTS, &REPLICA_WORDS),
            has(&PRIMARY_PARTS, &PRIMARY_WORDS),
        ) {
            (true, false) => NamedRole::Replica,
            (false, true) => NamedRole::Primary,
            _ => NamedRole::Unknown,
        }
    }
}

/// The `listen` entries for `addresses` (comma-separated, `*` and `localhost`
/// understood) on `port`, with notes for what cannot be listened on as given.
fn listen_entries(
    source: Source,
    key: &str,
    addresses: &str,
    port: u16,
) -> (Vec<String>, Vec<String>) {
    let mut entries = Vec::new();
    let mut notes = Vec::new();
    for address in addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        match address {
            "*" => {
                entries.push(format!("0.0.0.0:{port}"));
                notes.push(unmapped(
                    source,
                    key,
                    address,
                    "\"*\" is every IPv4 address here (0.0.0.0); add \"[::]:PORT\" in place of \
                     it for IPv6 too (on Linux [::] takes IPv4 as well)",
                ));
            }
            "localhost" => {
                entries.push(format!("127.0.0.1:{port}"));
                notes.push(unmapped(
                    source,
                    key,
                    address,
                    "pgrelay listens on IP addresses: localhost is 127.0.0.1 here (add \
                     \"[::1]:PORT\" for IPv6)",
                ));
            }
            other => match other.parse::<std::net::IpAddr>() {
                Ok(ip) => entries.push(std::net::SocketAddr::new(ip, port).to_string()),
                Err(_) => notes.push(unmapped(
                    source,
                    key,
                    address,
                    "a host name: pgrelay listens on IP addresses only; add its address to \
                     listen",
                )),
            },
        }
    }
    (entries, notes)
}

/// `entries` without repeats, in their first order (`127.0.0.1, localhost` would
/// listen twice on one address).
fn dedup(entries: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in entries {
        if !out.contains(&entry) {
            out.push(entry);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_suggest_roles() {
        for name in [
            "postgres-replica",
            "mydb_read",
            "pg-standby-1",
            "postgresql-slaves-0.postgresql-slaves",
            "db-ro",
        ] {
            assert_eq!(NamedRole::of(name), NamedRole::Replica, "{name}");
        }
        for name in [
            "postgres-primary",
            "mydb_write",
            "postgresql-master",
            "db-rw",
        ] {
            assert_eq!(NamedRole::of(name), NamedRole::Primary, "{name}");
        }
        for name in [
            "db1",
            "localhost",
            "reports",
            "10.0.0.5",
            "primary-or-replica",
        ] {
            assert_eq!(NamedRole::of(name), NamedRole::Unknown, "{name}");
        }
    }

    #[test]
    fn times_and_booleans() {
        assert_eq!(parse_time("10", 1000.0), Some(Duration::from_secs(10)));
        assert_eq!(parse_time("1min", 1000.0), Some(Duration::from_secs(60)));
        assert_eq!(parse_time("10000", 1.0), Some(Duration::from_secs(10)));
        assert_eq!(parse_time("0.5", 1000.0), Some(Duration::from_millis(500)));
        assert_eq!(parse_time("soon", 1000.0), None);
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration_text(Duration::from_secs(60)), "60s");
        assert_eq!(parse_bool("On"), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("maybe"), None);
    }

    #[test]
    fn detects_the_tool() {
        assert_eq!(
            detect("[databases]\n[pgbouncer]\n"),
            Some(Source::PgBouncer)
        );
        assert_eq!(
            detect("backend_clustering_mode = 'streaming_replication'\n"),
            Some(Source::Pgpool)
        );
        assert_eq!(detect("port = 5432\n"), None);
    }

    #[test]
    fn listen_addresses() {
        let (entries, notes) = listen_entries(
            Source::Pgpool,
            "listen_addresses",
            "*, 10.0.0.1, db.example",
            9999,
        );
        assert_eq!(entries, ["0.0.0.0:9999", "10.0.0.1:9999"]);
        assert_eq!(notes.len(), 2);
        assert!(notes[1].starts_with("pgpool: listen_addresses = db.example -- "));
    }
}
