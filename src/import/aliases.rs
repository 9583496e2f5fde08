//! PgBouncer's `[databases]`: each entry's connection string becomes a `[[databases]]`
//! entry, and the hosts they name become `[[backends]]`. An entry whose host (or,
//! failing that, whose own name) says primary or replica (`postgres-replica`,
//! `mydb_read`, `pg-master`) gets `target = "primary"` or `"replica"`, as does an entry
//! serving the same database as one on a primary-named host; each decision is written
//! beside it so a user can correct it.

use std::collections::BTreeMap;

use crate::config::is_admin_database;

use super::doc::{Doc, Section};
use super::ini::{pairs, Setting};
use super::{unmapped, ImportError, NamedRole, Source};

/// PgBouncer's own default port for servers.
const DEFAULT_PORT: u16 = 5432;

/// One host and port a `[databases]` entry points at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Endpoint {
    host: String,
    port: u16,
}

/// One `[databases]` entry as read.
#[derive(Debug)]
struct Alias {
    name: String,
    line: usize,
    dbname: Option<String>,
    endpoints: Vec<Endpoint>,
    /// Keys carried into its `[[databases]]` entry.
    carried: Vec<(&'static str, toml::Value)>,
    notes: Vec<String>,
}

/// What was decided about one endpoint's role, and why.
#[derive(Debug, Clone)]
struct Judged {
    role: NamedRole,
    why: String,
}

/// Adds `[[backends]]` and `[[databases]]` for the `[databases]` settings.
pub(super) fn add(doc: &mut Doc, file: &str, entries: &[&Setting]) -> Result<(), ImportError> {
    // A name set twice keeps its last line, as PgBouncer reads the file.
    let mut last: Vec<&Setting> = Vec::new();
    for entry in entries {
        if let Some(i) = last.iter().position(|e| e.key == entry.key) {
            let note = format!(
                "[databases] {} (line {}) is set again at line {}: the last one is kept",
                entry.key, last[i].line, entry.line
            );
            doc.note(Section::Databases, note);
            last.remove(i);
        }
        last.push(entry);
    }
    let mut aliases = Vec::new();
    for entry in last {
        aliases.push(read_alias(file, entry)?);
    }
    let roles = judge(&aliases);
    add_backends(doc, &aliases, &roles);
    for alias in &aliases {
        add_database(doc, alias, &roles);
    }
    Ok(())
}

fn read_alias(file: &str, entry: &Setting) -> Result<Alias, ImportError> {
    let params = pairs(&entry.value).map_err(|why| ImportError::line(file, entry.line, why))?;
    let mut alias = Alias {
        name: entry.key.clone(),
        line: entry.line,
        dbname: None,
        endpoints: Vec::new(),
        carried: Vec::new(),
        notes: Vec::new(),
    };
    let (mut hosts, mut ports) = (String::new(), String::new());
    let here = format!("[databases] {}", entry.key);
    for (key, value) in params {
        let number = || {
            value.parse::<u32>().map_err(|_| {
                ImportError::line(file, entry.line, format!("{key}={value:?} is not a number"))
            })
        };
        match key.as_str() {
            "dbname" => alias.dbname = Some(value),
            "host" => hosts = value,
            "port" => ports = value,
            "pool_size" => alias
                .carried
                .push(("pool_size", i64::from(number()?.max(1)).into())),
            "max_db_connections" => alias
                .carried
                .push(("max_db_connections", i64::from(number()?).into())),
            "max_db_client_connections" => alias
                .carried
                .push(("max_db_client_connections", i64::from(number()?).into())),
            "pool_mode" => match value.as_str() {
                "session" | "transaction" => alias.carried.push(("pool_mode", value.into())),
                _ => alias.notes.push(unmapped(
                    Source::PgBouncer,
                    &format!("{here} pool_mode"),
                    &value,
                    "pgrelay has session and transaction modes only: pool.mode applies",
                )),
            },
            _ => alias.notes.push(unmapped(
                Source::PgBouncer,
                &format!("{here} {key}"),
                &value,
                database_param_why(&key),
            )),
        }
    }
    alias.endpoints = endpoints(file, entry.line, &hosts, &ports, &mut alias.notes)?;
    Ok(alias)
}

/// Why a connection-string key of a `[databases]` entry is not carried over.
fn database_param_why(key: &str) -> &'static str {
    match key {
        "user" | "password" => {
            "pgrelay logs in to servers as the client's own user, with its [[users]] password; \
             there is no forced user per database"
        }
        "auth_user" | "auth_query" | "auth_dbname" => {
            "pgrelay has one auth_user / auth_query for all databases (top-level keys)"
        }
        "client_encoding" | "datestyle" | "timezone" | "application_name" => {
            "no per-database server setting: set it on the database (ALTER DATABASE ... SET) \
             or in the clients; pgrelay carries each client's own settings across servers"
        }
        "connect_query" => "no query on new server connections: use ALTER ROLE/DATABASE ... SET",
        "reserve_pool" | "reserve_pool_size" => "no reserve pool: raise pool_size instead",
        "min_pool_size" | "server_lifetime" => {
            "only pgrelay's global pool.min_pool_size / pool.server_lifetime exist"
        }
        "load_balance_hosts" => {
            "pgrelay balances reads over the replicas by routing.load_balance and backends' weight"
        }
        _ => "not known to the importer; not carried over",
    }
}

/// The hosts and ports of a connection string (`host=a,b port=5432,5433`). A Unix
/// socket (no host, or a directory) becomes 127.0.0.1: pgrelay connects over TCP.
fn endpoints(
    file: &str,
    line: usize,
    hosts: &str,
    ports: &str,
    notes: &mut Vec<String>,
) -> Result<Vec<Endpoint>, ImportError> {
    let ports: Vec<u16> = ports
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse()
                .map_err(|_| ImportError::line(file, line, format!("port {p:?} is not a port")))
        })
        .collect::<Result<_, _>>()?;
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    let mut out = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let port = ports
            .get(i)
            .or(ports.last())
            .copied()
            .unwrap_or(DEFAULT_PORT);
        let host = if host.is_empty() || host.starts_with('/') {
            let socket = if host.is_empty() {
                "the default Unix socket"
            } else {
                host
            };
            notes.push(format!(
                "PgBouncer reached this database through {socket}; pgrelay connects over TCP: \
                 127.0.0.1:{port} is assumed, correct the [[backends]] entry if PostgreSQL \
                 listens elsewhere"
            ));
            "127.0.0.1".to_owned()
        } else {
            (*host).to_owned()
        };
        out.push(Endpoint { host, port });
    }
    Ok(out)
}

/// The role of every endpoint: by its host name, else by the names of the entries
/// that point at it, else by sharing a database with a primary-named endpoint.
fn judge(aliases: &[Alias]) -> BTreeMap<Endpoint, Judged> {
    let mut roles: BTreeMap<Endpoint, Judged> = BTreeMap::new();
    for alias in aliases {
        for endpoint in &alias.endpoints {
            let by_host = NamedRole::of(&endpoint.host);
            let by_alias = if alias.name == "*" {
                NamedRole::Unknown
            } else {
                NamedRole::of(&alias.name)
            };
            let judged = roles.entry(endpoint.clone()).or_insert(Judged {
                role: NamedRole::Unknown,
                why: "its name says neither primary nor replica".to_owned(),
            });
            if by_host != NamedRole::Unknown {
                *judged = Judged {
                    role: by_host,
                    why: format!("its host name {:?} says {}", endpoint.host, said(by_host)),
                };
            } else if judged.role == NamedRole::Unknown && by_alias != NamedRole::Unknown {
                *judged = Judged {
                    role: by_alias,
                    why: format!(
                        "the entry {:?} that points at it says {}",
                        alias.name,
                        said(by_alias)
                    ),
                };
            }
        }
    }
    // The same database on a primary-named host and on an unnamed one: the other one
    // is where the reads were sent.
    for alias in aliases {
        let db = alias.dbname.as_deref().unwrap_or(&alias.name);
        let primary = aliases.iter().find(|other| {
            other.dbname.as_deref().unwrap_or(&other.name) == db
                && other
                    .endpoints
                    .iter()
                    .any(|e| roles.get(e).is_some_and(|j| j.role == NamedRole::Primary))
        });
        let Some(primary) = primary else { continue };
        for endpoint in &alias.endpoints {
            if let Some(judged) = roles.get_mut(endpoint) {
                if judged.role == NamedRole::Unknown {
                    *judged = Judged {
                        role: NamedRole::Replica,
                        why: format!(
                            "it serves database {db:?}, which {:?} also serves from the primary",
                            primary.name
                        ),
                    };
                }
            }
        }
    }
    roles
}

fn said(role: NamedRole) -> &'static str {
    match role {
        NamedRole::Primary => "primary",
        NamedRole::Replica => "replica",
        NamedRole::Unknown => "neither",
    }
}

fn add_backends(doc: &mut Doc, aliases: &[Alias], roles: &BTreeMap<Endpoint, Judged>) {
    let mut order: Vec<&Endpoint> = Vec::new();
    for endpoint in aliases.iter().flat_map(|a| &a.endpoints) {
        if !order.contains(&endpoint) {
            order.push(endpoint);
        }
    }
    let rank = |e: &&Endpoint| match roles.get(*e).map(|j| j.role) {
        Some(NamedRole::Primary) => 0,
        Some(NamedRole::Unknown) | None => 1,
        Some(NamedRole::Replica) => 2,
    };
    order.sort_by_key(rank);
    if order.is_empty() {
        doc.note(
            Section::Backends,
            "[databases] names no server: this backend is PostgreSQL's default, on this host; \
             replace it with the primary and the replicas",
        );
        doc.push(Section::Backends).set("host", "127.0.0.1");
        return;
    }
    doc.note(
        Section::Backends,
        "[[backends]]: every host the [databases] entries point at, the primary first. \
         pgrelay detects each node's real role by probing it; a service name in front of \
         several replicas is one node to pgrelay: list the replicas themselves for lag \
         checks per replica",
    );
    for endpoint in order {
        let used_by: Vec<&str> = aliases
            .iter()
            .filter(|a| a.endpoints.contains(endpoint))
            .map(|a| a.name.as_str())
            .collect();
        let entry = doc.push(Section::Backends);
        let judged = &roles[endpoint];
        entry.note(format!(
            "from [databases] {}: {} ({})",
            used_by.join(", "),
            match judged.role {
                NamedRole::Primary => "taken for the primary",
                NamedRole::Replica => "taken for a replica",
                NamedRole::Unknown => "role left to detection",
            },
            judged.why
        ));
        entry.set("host", endpoint.host.as_str());
        entry.set("port", i64::from(endpoint.port));
        match judged.role {
            NamedRole::Primary => entry.set("role", "primary"),
            NamedRole::Replica => entry.set("role", "replica"),
            NamedRole::Unknown => {}
        }
    }
}

fn add_database(doc: &mut Doc, alias: &Alias, roles: &BTreeMap<Endpoint, Judged>) {
    let here = format!("[databases] {} (line {})", alias.name, alias.line);
    if alias.name == "*" {
        doc.note(
            Section::Databases,
            format!(
                "{here}: the fallback entry. With no [[databases]] at all pgrelay passes every \
                 database name through; with some listed, other names are refused (3D000): \
                 add the databases clients use"
            ),
        );
        for note in &alias.notes {
            doc.note(Section::Databases, format!("{here}: {note}"));
        }
        if let Some(dbname) = &alias.dbname {
            let why = "pgrelay passes the client's database name through unchanged";
            doc.note(
                Section::Databases,
                unmapped(Source::PgBouncer, "[databases] * dbname", dbname, why),
            );
        }
        return;
    }
    if is_admin_database(&alias.name) {
        doc.note(
            Section::Databases,
            format!("{here}: left out: the name is pgrelay's admin console"),
        );
        return;
    }
    let found: Vec<&Judged> = alias
        .endpoints
        .iter()
        .filter_map(|e| roles.get(e))
        .collect();
    let all = |role| !found.is_empty() && found.iter().all(|j| j.role == role);
    let target = if all(NamedRole::Primary) {
        Some("primary")
    } else if all(NamedRole::Replica) {
        Some("replica")
    } else {
        None
    };
    let entry = doc.push(Section::Databases);
    for note in &alias.notes {
        entry.note(note.clone());
    }
    let hosts: Vec<String> = alias
        .endpoints
        .iter()
        .map(|e| format!("{}:{}", e.host, e.port))
        .collect();
    let decision = match target {
        Some(target) => format!(
            "target = {target:?}: PgBouncer sent all of its clients to {}, taken for the {target} \
             because {}; make it \"auto\" to route by SQL instead",
            hosts.join(", "),
            found.first().map_or("", |j| j.why.as_str()),
        ),
        None => format!(
            "no target (\"auto\": routed by what the SQL does): PgBouncer sent all of its clients \
             to {}, whose role the importer could not tell; set target = \"primary\" or \
             \"replica\" to pin it",
            hosts.join(", ")
        ),
    };
    entry.note(format!("{here}: {decision}"));
    entry.set("name", alias.name.as_str());
    if let Some(dbname) = alias.dbname.as_deref().filter(|d| *d != alias.name) {
        entry.set("dbname", dbname);
    }
    for (key, value) in &alias.carried {
        entry.set(key, value.clone());
    }
    if let Some(target) = target {
        entry.set("target", target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::ini;

    fn run(text: &str) -> String {
        let settings = ini::parse("b.ini", text).expect("parse");
        let entries: Vec<&Setting> = settings.iter().collect();
        let mut doc = Doc::default();
        add(&mut doc, "b.ini", &entries).expect("add");
        doc.render()
    }

    #[test]
    fn write_and_read_aliases_become_targets() {
        let text = run(
            "[databases]\nmydb_write = host=postgres-primary dbname=mydb\n\
                        mydb_read = host=postgres-replica port=5433 dbname=mydb\n\
                        * = host=postgres-primary\n",
        );
        let primary = text.find("host = \"postgres-primary\"").expect("primary");
        let replica = text.find("host = \"postgres-replica\"").expect("replica");
        assert!(primary < replica, "{text}");
        assert!(
            text.contains("name = \"mydb_write\"\ndbname = \"mydb\"\ntarget = \"primary\""),
            "{text}"
        );
        assert!(
            text.contains("name = \"mydb_read\"\ndbname = \"mydb\"\ntarget = \"replica\""),
            "{text}"
        );
        assert!(text.contains("the fallback entry"), "{text}");
        assert_eq!(text.matches("\n[[backends]]\n").count(), 2, "{text}");
    }

    #[test]
    fn an_unnamed_host_beside_the_primary_is_a_replica() {
        let text = run("[databases]\napp = host=db-master dbname=app\napp_ro2 = host=db2 dbname=app\nother = host=db3\n");
        assert!(
            text.contains("name = \"app_ro2\"\ndbname = \"app\"\ntarget = \"replica\""),
            "{text}"
        );
        assert!(text.contains("name = \"other\"\n"), "{text}");
        assert!(!text.contains("name = \"other\"\ntarget"), "{text}");
    }

    #[test]
    fn unix_sockets_and_forced_users_are_explained() {
        let text =
            run("[databases]\nfoodb =\nbar = host=/var/run/postgresql user=u password=secret\n");
        assert!(text.contains("127.0.0.1:5432 is assumed"), "{text}");
        assert!(text.contains("password = <hidden>"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert_eq!(text.matches("\n[[backends]]\n").count(), 1, "{text}");
    }
}
