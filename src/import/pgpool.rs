//! Pgpool-II's `pgpool.conf` (with `pool_hba.conf` and `pool_passwd`) into pgrelay's
//! settings. Old and new names are both understood (`master_slave_mode` and
//! `backend_clustering_mode`, `follow_master_command` and `follow_primary_command`,
//! `black_function_list` and `write_function_list`...). Clustering modes other than
//! streaming replication (and raw) are refused: pgrelay routes to one primary and its
//! streaming replicas.

use std::collections::BTreeMap;

use super::conf::{self, Setting};
use super::doc::{Doc, Section};
use super::hba::{self, TlsSide};
use super::secrets::{self, UserSecret};
use super::{
    duration_text, listen_entries, parse_bool, parse_time, unmapped, ImportError, Request, Source,
};

const SOURCE: Source = Source::Pgpool;

/// The settings not yet used, by key.
type Settings = BTreeMap<String, Setting>;

/// The reader's state: the file's name, the settings left, the output.
struct Import<'a> {
    file: &'a str,
    left: Settings,
    doc: Doc,
}

impl Import<'_> {
    fn take(&mut self, key: &str) -> Option<Setting> {
        self.left.remove(key)
    }

    /// The first of `keys` that is set (new name first), the others noted as shadowed.
    fn take_any(&mut self, keys: &[&str]) -> Option<Setting> {
        let mut found = None;
        for key in keys {
            if let Some(s) = self.take(key) {
                found.get_or_insert(s);
            }
        }
        found
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, ImportError> {
        self.take(key)
            .map(|s| {
                parse_bool(&s.value).ok_or_else(|| {
                    ImportError::line(
                        self.file,
                        s.line,
                        format!("{key} = {:?} is not on or off", s.value),
                    )
                })
            })
            .transpose()
    }

    /// A time setting: `bare_ms` milliseconds per unit when no unit is written.
    fn time(
        &mut self,
        key: &str,
        bare_ms: f64,
    ) -> Result<Option<(std::time::Duration, Setting)>, ImportError> {
        let Some(s) = self.take(key) else {
            return Ok(None);
        };
        let time = parse_time(&s.value, bare_ms).ok_or_else(|| {
            ImportError::line(
                self.file,
                s.line,
                format!("{key} = {:?} is not a time", s.value),
            )
        })?;
        Ok(Some((time, s)))
    }

    fn number(&mut self, key: &str) -> Result<Option<u64>, ImportError> {
        self.take(key)
            .map(|s| {
                s.value.trim().parse::<u64>().map_err(|_| {
                    ImportError::line(
                        self.file,
                        s.line,
                        format!("{key} = {:?} is not a number", s.value),
                    )
                })
            })
            .transpose()
    }

    fn note(&mut self, section: Section, s: &Setting, why: &str) {
        self.doc
            .note(section, unmapped(SOURCE, &s.key, &s.value, why));
    }
}

pub(super) fn import(request: &Request) -> Result<String, ImportError> {
    let file = request.main.name.as_str();
    if request.userlist.is_some() {
        return Err(ImportError::file(
            file,
            "--userlist is for PgBouncer files; Pgpool-II's passwords come with --pool-passwd",
        ));
    }
    let mut left = Settings::new();
    for s in conf::parse(file, &request.main.text)? {
        left.insert(s.key.clone(), s);
    }
    let mut im = Import {
        file,
        left,
        doc: Doc::default(),
    };
    im.doc.intro(format!(
        "pgrelay.toml imported from {file} by `pgrelay import`."
    ));
    im.doc.intro(
        "Comments starting with \"pgpool:\" are settings with no pgrelay equivalent or with a \
         different meaning. Check this file with `pgrelay check -c FILE`.",
    );
    clustering(&mut im)?;
    listen(&mut im)?;
    pool(&mut im)?;
    routing(&mut im)?;
    let passwd = match &request.pool_passwd {
        Some(input) => Some(secrets::pool_passwd(&input.name, &input.text)?),
        None => None,
    };
    let users: &[UserSecret] = passwd.as_ref().map_or(&[], |(u, _)| u.as_slice());
    health(&mut im, users)?;
    failover(&mut im)?;
    let tls = tls(&mut im)?;
    backends(&mut im)?;
    auth(&mut im, request, passwd.as_ref(), tls)?;
    let left = std::mem::take(&mut im.left);
    for s in left.values() {
        let (section, why) = unmapped_why(&s.key);
        im.note(section, s, why);
    }
    Ok(im.doc.render())
}

/// The clustering mode: streaming replication is pgrelay's model; raw turns routing
/// off; the others are refused.
fn clustering(im: &mut Import) -> Result<(), ImportError> {
    let refuse = |s: &Setting, mode: &str| {
        ImportError::line(
            im.file,
            s.line,
            format!(
                "{} = {:?}: {mode} is not supported; pgrelay routes to one primary and its \
                 streaming replicas (a node that is not in recovery is taken for the primary)",
                s.key, s.value
            ),
        )
    };
    if let Some(s) = im.left.get("backend_clustering_mode") {
        match s.value.as_str() {
            "streaming_replication" => {}
            "raw" => {}
            other => return Err(refuse(s, other)),
        }
    }
    if let Some(s) = im
        .left
        .get("replication_mode")
        .filter(|s| parse_bool(&s.value) == Some(true))
    {
        return Err(refuse(s, "native replication"));
    }
    let master_slave = im
        .left
        .get("master_slave_mode")
        .map(|s| parse_bool(&s.value));
    if master_slave == Some(Some(true)) {
        if let Some(sub) = im.left.get("master_slave_sub_mode") {
            if sub.value != "stream" {
                return Err(refuse(sub, &sub.value));
            }
        }
    }
    let raw = im
        .left
        .get("backend_clustering_mode")
        .is_some_and(|s| s.value == "raw")
        || master_slave == Some(Some(false));
    for key in [
        "backend_clustering_mode",
        "master_slave_mode",
        "master_slave_sub_mode",
        "replication_mode",
    ] {
        if let Some(s) = im.take(key) {
            let why = if raw {
                "raw mode: no load balancing, so routing is off; pgrelay still detects the \
                 primary by probing (a node not in recovery)"
            } else {
                "streaming replication is what pgrelay does: nothing to set"
            };
            im.note(Section::Routing, &s, why);
        }
    }
    if raw {
        im.doc.set(Section::Routing, "enabled", false);
    }
    Ok(())
}

fn listen(im: &mut Import) -> Result<(), ImportError> {
    let port = match im.take("port") {
        Some(s) => s.value.parse::<u16>().map_err(|_| {
            ImportError::line(
                im.file,
                s.line,
                format!("port = {:?} is not a port", s.value),
            )
        })?,
        None => {
            im.doc.note(
                Section::Top,
                "pgpool: port is not set: Pgpool-II's default is 9999 (5433 in Debian's build); \
                 9999 is used",
            );
            9999
        }
    };
    let addresses = im
        .take("listen_addresses")
        .map_or("localhost".to_owned(), |s| s.value);
    let (mut entries, notes) = listen_entries(SOURCE, "listen_addresses", &addresses, port);
    for note in notes {
        im.doc.note(Section::Top, note);
    }
    if let Some(s) = im.take_any(&["unix_socket_directories", "socket_dir"]) {
        for dir in s.value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            entries.push(format!(
                "unix:{}/.s.PGSQL.{port}",
                dir.trim_end_matches('/')
            ));
        }
    }
    if entries.is_empty() {
        im.doc.note(
            Section::Top,
            format!("nothing to listen on was left: 127.0.0.1:{port} is used"),
        );
        entries.push(format!("127.0.0.1:{port}"));
    }
    im.doc.set(Section::Top, "listen", entries);
    Ok(())
}

fn pool(im: &mut Import) -> Result<(), ImportError> {
    im.doc.table(Section::Pool).set_noted(
        "mode",
        "session",
        "Pgpool-II holds a server connection for each client's whole session: session mode \
         keeps that; \"transaction\" shares servers between clients where the application allows"
            .to_owned(),
    );
    let children = im
        .number("num_init_children")?
        .unwrap_or(32)
        .clamp(1, u64::from(u32::MAX));
    let table = im.doc.table(Section::Pool);
    table.set_noted(
        "max_client_conn",
        children as i64,
        "num_init_children: Pgpool-II served this many clients at once (more queued); pgrelay's \
         clients are cheap, raise it freely"
            .to_owned(),
    );
    table.set_noted(
        "default_pool_size",
        children as i64,
        "num_init_children: each child could hold a connection to a database as a user".to_owned(),
    );
    if let Some((time, s)) = im.time("connection_life_time", 1000.0)? {
        if time.is_zero() {
            im.note(Section::Pool, &s, "0 keeps connections forever in Pgpool-II; pgrelay's default server_lifetime is kept");
        } else {
            im.doc
                .set(Section::Pool, "server_lifetime", duration_text(time));
        }
    }
    if let Some((time, _)) = im
        .time("client_idle_limit", 1000.0)?
        .filter(|(t, _)| !t.is_zero())
    {
        let text = duration_text(time);
        let table = im.doc.table(Section::Pool);
        table.set_noted(
            "client_idle_timeout",
            text.as_str(),
            "client_idle_limit: pgrelay splits it into client_idle_timeout (outside transactions) \
             and idle_transaction_timeout (inside)"
                .to_owned(),
        );
        table.set("idle_transaction_timeout", text);
    }
    if let Some((time, s)) = im.time("authentication_timeout", 1000.0)? {
        if time.is_zero() {
            im.note(
                Section::Pool,
                &s,
                "0 turns it off in Pgpool-II; pgrelay's default is kept",
            );
        } else {
            im.doc
                .set(Section::Pool, "client_login_timeout", duration_text(time));
        }
    }
    if let Some((time, s)) = im.time("connect_timeout", 1.0)? {
        if time.is_zero() {
            im.note(
                Section::Pool,
                &s,
                "0 waits forever in Pgpool-II; pgrelay's default is kept",
            );
        } else {
            im.doc.set(
                Section::Pool,
                "server_connect_timeout",
                duration_text(time.max(std::time::Duration::from_millis(1))),
            );
        }
    }
    if let Some(s) = im.take("reset_query_list") {
        reset_query(im, &s);
    }
    Ok(())
}

/// `reset_query_list` is several statements; pgrelay runs one query string in session
/// mode, where `ABORT` is not needed and `DISCARD ALL` cannot share a string.
fn reset_query(im: &mut Import, s: &Setting) {
    let statements: Vec<&str> = s
        .value
        .split(';')
        .map(str::trim)
        .filter(|q| !q.is_empty() && !q.eq_ignore_ascii_case("abort"))
        .collect();
    let query = if statements
        .iter()
        .any(|q| q.eq_ignore_ascii_case("discard all"))
    {
        "DISCARD ALL".to_owned()
    } else {
        statements.join("; ")
    };
    let why = "pgrelay runs one query string when a session-mode client releases its server: \
               ABORT is dropped, and DISCARD ALL (which cannot share a string) covers the rest";
    im.doc.table(Section::Pool).set_noted(
        "server_reset_query",
        query,
        unmapped(SOURCE, &s.key, &s.value, why),
    );
}

fn routing(im: &mut Import) -> Result<(), ImportError> {
    if let Some(on) = im.bool("load_balance_mode")? {
        if im.doc.get(Section::Routing, "enabled").is_none() {
            im.doc.set(Section::Routing, "enabled", on);
        }
    }
    if let Some(s) = im.take("disable_load_balance_on_write") {
        let mode = match s.value.as_str() {
            "off" => "off",
            "transaction" | "trans_transaction" => "transaction",
            "always" => "session",
            "dml_adaptive" => "transaction",
            other => {
                return Err(ImportError::line(
                    im.file,
                    s.line,
                    format!("unknown disable_load_balance_on_write {other:?}"),
                ));
            }
        };
        let why =
            "read_after_write: pgrelay keeps a transaction on one server; \"lsn\" (pgrelay's \
                   default) sends a writer's later reads only to replicas that have replayed its \
                   write, stricter than any Pgpool-II value";
        im.doc.table(Section::Routing).set_noted(
            "read_after_write",
            mode,
            unmapped(SOURCE, &s.key, &s.value, why),
        );
    }
    for (keys, target) in [
        (
            ["write_function_list", "black_function_list"],
            "write_functions",
        ),
        (
            ["read_only_function_list", "white_function_list"],
            "read_only_functions",
        ),
    ] {
        let Some(s) = im.take_any(&keys) else {
            continue;
        };
        let (names, patterns): (Vec<&str>, Vec<&str>) = s
            .value
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .partition(|n| {
                n.chars()
                    .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
            });
        if !patterns.is_empty() {
            let why = format!(
                "regular expressions are not supported, only names: {} left out",
                patterns.join(", ")
            );
            im.note(Section::Routing, &s, &why);
        }
        im.doc.set(Section::Routing, target, names);
    }
    let bytes = im.number("delay_threshold")?.unwrap_or(0);
    let table = im.doc.table(Section::Routing);
    if bytes == 0 {
        let why = "Pgpool-II sent reads to replicas however far behind (delay_threshold 0 or \
                   not set); pgrelay's default drops replicas over 16 MiB";
        table.set_noted("max_lag_bytes", 0, why.to_owned());
    } else {
        table.set("max_lag_bytes", bytes.min(i64::MAX as u64) as i64);
    }
    match im.time("delay_threshold_by_time", 1.0)? {
        Some((time, _)) => im
            .doc
            .set(Section::Routing, "max_lag_seconds", time.as_secs_f64()),
        None => im.doc.table(Section::Routing).set_noted(
            "max_lag_seconds",
            0.0,
            "Pgpool-II measured lag in bytes only (delay_threshold_by_time is not set); pgrelay's \
             default also drops replicas more than 10 seconds behind"
                .to_owned(),
        ),
    }
    if let Some(on) = im.bool("prefer_lower_delay_standby")? {
        im.doc.set(Section::Routing, "prefer_lower_lag", on);
    }
    if let Some((time, s)) = im.time("sr_check_period", 1000.0)? {
        if time.is_zero() {
            im.note(
                Section::Routing,
                &s,
                "0 turns lag checks off in Pgpool-II; pgrelay always checks: its default is kept",
            );
        } else {
            im.doc
                .set(Section::Routing, "lag_check_period", duration_text(time));
        }
    }
    Ok(())
}

fn health(im: &mut Import, users: &[UserSecret]) -> Result<(), ImportError> {
    let positive = [
        ("health_check_period", "period"),
        ("health_check_timeout", "timeout"),
    ];
    for (key, target) in positive {
        if let Some((time, s)) = im.time(key, 1000.0)? {
            if time.is_zero() {
                im.note(
                    Section::HealthCheck,
                    &s,
                    "0 turns it off in Pgpool-II; pgrelay always checks: its default is kept",
                );
            } else {
                im.doc
                    .set(Section::HealthCheck, target, duration_text(time));
            }
        }
    }
    if let Some(n) = im.number("health_check_max_retries")? {
        im.doc.set(
            Section::HealthCheck,
            "max_retries",
            n.min(u64::from(u32::MAX)) as i64,
        );
    }
    if let Some((time, _)) = im.time("health_check_retry_delay", 1000.0)? {
        im.doc
            .set(Section::HealthCheck, "retry_delay", duration_text(time));
    }
    let user = im.take("health_check_user").filter(|s| !s.value.is_empty());
    if let Some(user) = &user {
        im.doc
            .set(Section::HealthCheck, "user", user.value.as_str());
    }
    if let Some(s) = im.take("health_check_database") {
        if s.value.is_empty() {
            im.note(
                Section::HealthCheck,
                &s,
                "Pgpool-II tried postgres, then template1; pgrelay uses postgres",
            );
        } else {
            im.doc.set(Section::HealthCheck, "database", s.value);
        }
    }
    let password = im
        .take("health_check_password")
        .map(|s| s.value)
        .unwrap_or_default();
    if !password.is_empty() {
        im.doc.set(Section::HealthCheck, "password", password);
    } else if let Some(user) = user {
        let stored = users.iter().find(|u| u.name == user.value);
        match stored.filter(|u| !u.secret.starts_with("md5") && !u.secret.starts_with("SCRAM-SHA-256$")) {
            Some(found) => im.doc.table(Section::HealthCheck).set_noted(
                "password",
                found.secret.as_str(),
                "health_check_password was empty: Pgpool-II took it from pool_passwd, as here".to_owned(),
            ),
            None => im.doc.note(
                Section::HealthCheck,
                "pgpool: health_check_password = '' -- Pgpool-II looked the user up in pool_passwd; \
                 pgrelay needs the plaintext here (or a trust rule for it on the servers)",
            ),
        }
    }
    if let Some(on) = im.bool("failover_on_backend_error")? {
        let why = "recheck_on_backend_error: pgrelay probes the node at once and fails it over \
                   only if the probes fail, rather than at the first error";
        let text = if on { "on" } else { "off" };
        im.doc.table(Section::HealthCheck).set_noted(
            "recheck_on_backend_error",
            on,
            unmapped(SOURCE, "failover_on_backend_error", text, why),
        );
    }
    Ok(())
}

fn failover(im: &mut Import) -> Result<(), ImportError> {
    let commands = [
        (&["failover_command"][..], "failover_command"),
        (&["failback_command"][..], "failback_command"),
        (
            &["follow_primary_command", "follow_master_command"][..],
            "follow_primary_command",
        ),
    ];
    for (keys, target) in commands {
        let Some(s) = im.take_any(keys) else { continue };
        if s.value.is_empty() {
            continue;
        }
        let unknown = unknown_placeholders(&s.value);
        let table = im.doc.table(Section::Failover);
        if unknown.is_empty() {
            table.set(target, s.value.as_str());
        } else {
            let why = format!(
                "placeholders pgrelay does not fill, left as written: {}",
                unknown.join(" ")
            );
            table.set_noted(
                target,
                s.value.as_str(),
                unmapped(SOURCE, &s.key, &s.value, &why),
            );
        }
    }
    match im.bool("auto_failback")? {
        Some(on) => im.doc.set(Section::Failover, "auto_failback", on),
        None => im.doc.table(Section::Failover).set_noted(
            "auto_failback",
            false,
            "Pgpool-II's default auto_failback is off (pgrelay's is on)".to_owned(),
        ),
    }
    Ok(())
}

/// The `%x` of `command` that pgrelay's hooks do not replace.
fn unknown_placeholders(command: &str) -> Vec<String> {
    const KNOWN: &str = "dhpDmHMPrRNS%";
    let mut out = Vec::new();
    let mut chars = command.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some(p) if KNOWN.contains(p) => {}
                Some(p) => out.push(format!("%{p}")),
                None => out.push("%".to_owned()),
            }
        }
    }
    out
}

fn tls(im: &mut Import) -> Result<TlsSide, ImportError> {
    let on = im.bool("ssl")?.unwrap_or(false);
    let mut path = |key: &str| im.take(key).map(|s| s.value).filter(|v| !v.is_empty());
    let (cert, key, ca) = (path("ssl_cert"), path("ssl_key"), path("ssl_ca_cert"));
    let table = im.doc.table(Section::Tls);
    let mut tls_on = false;
    match (on, &cert, &key) {
        (true, Some(cert), Some(key)) => {
            table.set_noted(
                "client_mode",
                "prefer",
                "ssl = on: TLS for clients that ask, plaintext for the others (\"require\" refuses those)".to_owned(),
            );
            table.set("client_cert", cert.as_str());
            table.set("client_key", key.as_str());
            tls_on = true;
        }
        (true, _, _) => table.note("pgpool: ssl = on -- ssl_cert and ssl_key are not both set: TLS towards clients is left off"),
        _ => {}
    }
    if let Some(ca) = &ca {
        table.set("client_ca", ca.as_str());
    }
    Ok(TlsSide {
        tls_on,
        client_ca: ca.is_some(),
    })
}

/// `backend_*N` settings into `[[backends]]`, in the order of N (the `%d` of hooks).
fn backends(im: &mut Import) -> Result<(), ImportError> {
    let mut nodes: BTreeMap<u32, BTreeMap<&'static str, Setting>> = BTreeMap::new();
    const FIELDS: [&str; 6] = [
        "hostname",
        "port",
        "weight",
        "data_directory",
        "flag",
        "application_name",
    ];
    let keys: Vec<String> = im.left.keys().cloned().collect();
    for key in keys {
        let Some(rest) = key.strip_prefix("backend_") else {
            continue;
        };
        for field in FIELDS {
            let Some(index) = rest.strip_prefix(field).and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(s) = im.take(&key) {
                nodes.entry(index).or_default().insert(field, s);
            }
            break;
        }
    }
    let mut count = 0;
    for (index, fields) in &nodes {
        let Some(host) = fields.get("hostname") else {
            for s in fields.values() {
                im.note(
                    Section::Backends,
                    s,
                    "no backend_hostname with this number: not carried over",
                );
            }
            continue;
        };
        if *index != count {
            im.doc.note(
                Section::Backends,
                format!(
                "pgpool: backend numbers have gaps: node {index} is backends[{count}] here, and \
                 hooks' %d and %m give {count}"
            ),
            );
        }
        backend(im, fields, host)?;
        count += 1;
    }
    if count == 0 {
        im.doc.note(
            Section::Backends,
            "pgpool: no backend_hostname0 is set: this backend is PostgreSQL's default, on this \
             host; replace it with the primary and the replicas",
        );
        im.doc.push(Section::Backends).set("host", "127.0.0.1");
    }
    Ok(())
}

fn backend(
    im: &mut Import,
    fields: &BTreeMap<&'static str, Setting>,
    host: &Setting,
) -> Result<(), ImportError> {
    let mut notes = Vec::new();
    let host_name = if host.value.is_empty() || host.value.starts_with('/') {
        notes.push(format!(
            "{} = {:?}: a Unix socket; pgrelay connects over TCP: 127.0.0.1 is assumed",
            host.key, host.value
        ));
        "127.0.0.1".to_owned()
    } else {
        host.value.clone()
    };
    let parse = |s: &Setting| {
        s.value.parse::<f64>().map_err(|_| {
            ImportError::line(
                im.file,
                s.line,
                format!("{} = {:?} is not a number", s.key, s.value),
            )
        })
    };
    let port = fields
        .get("port")
        .map(&parse)
        .transpose()?
        .unwrap_or(5432.0);
    if !(1.0..=65535.0).contains(&port) || port.fract() != 0.0 {
        let line = fields.get("port").map_or(host.line, |s| s.line);
        return Err(ImportError::line(
            im.file,
            line,
            "a port must be 1 to 65535",
        ));
    }
    let weight = fields.get("weight").map(&parse).transpose()?;
    let mut role = None;
    if let Some(flag) = fields.get("flag") {
        let flags: Vec<&str> = flag.value.split('|').map(str::trim).collect();
        if flags.contains(&"ALWAYS_PRIMARY") || flags.contains(&"ALWAYS_MASTER") {
            role = Some("primary");
        }
        if flags.contains(&"DISALLOW_TO_FAILOVER") {
            notes.push(unmapped(SOURCE, &flag.key, &flag.value, "pgrelay takes any node out of service after failed health checks; it runs failover_command for this one too"));
        }
    }
    if let Some(app) = fields.get("application_name") {
        notes.push(unmapped(
            SOURCE,
            &app.key,
            &app.value,
            "not needed: pgrelay reads each replica's replay position from the replica itself",
        ));
    }
    let entry = im.doc.push(Section::Backends);
    for note in notes {
        entry.note(note);
    }
    entry.set("host", host_name);
    entry.set("port", port as i64);
    if let Some(weight) = weight {
        if weight.fract() == 0.0 {
            entry.set("weight", weight as i64);
        } else {
            entry.set("weight", weight);
        }
    }
    if let Some(dir) = fields.get("data_directory").filter(|s| !s.value.is_empty()) {
        entry.set("data_directory", dir.value.as_str());
    }
    if let Some(role) = role {
        entry.set_noted("role", role, "backend_flag ALWAYS_PRIMARY".to_owned());
    }
    Ok(())
}

/// `[[users]]` from pool_passwd, `[[hba]]` from pool_hba.conf, and `auth_type`.
fn auth(
    im: &mut Import,
    request: &Request,
    passwd: Option<&(Vec<UserSecret>, Vec<secrets::Skipped>)>,
    tls: TlsSide,
) -> Result<(), ImportError> {
    im.doc.table(Section::Top).set_noted(
        "auth_type",
        "md5",
        "md5 for users stored as md5 or plaintext, SCRAM for users stored with a SCRAM secret \
         (as PostgreSQL and Pgpool-II do with pool_passwd)"
            .to_owned(),
    );
    let passwd_file = im.take("pool_passwd");
    match passwd {
        Some((users, skipped)) => {
            for user in users {
                let entry = im.doc.push(Section::Users);
                entry.set("name", user.name.as_str());
                entry.set("password", user.secret.as_str());
            }
            for skip in skipped {
                im.doc.note(
                    Section::Users,
                    format!(
                        "pool_passwd line {}: user {:?} left out: {}",
                        skip.line, skip.name, skip.why
                    ),
                );
            }
        }
        None => {
            let path = passwd_file
                .as_ref()
                .map_or("pool_passwd", |s| s.value.as_str())
                .to_owned();
            im.doc.note(Section::Users, format!(
                "pgpool: pool_passwd = {path} -- not read: pass it with --pool-passwd; pgrelay needs \
                 every user with its password in [[users]]"
            ));
        }
    }
    let enabled = im.bool("enable_pool_hba")?.unwrap_or(false);
    match (&request.hba, enabled) {
        (Some(input), true) => {
            let rules = hba::parse(&input.name, &input.text)?;
            hba::add_rules(&mut im.doc, &input.name, &rules, tls)?;
        }
        (Some(input), false) => im.doc.note(
            Section::Hba,
            format!("pgpool: enable_pool_hba = off -- {} was not applied by Pgpool-II, so it is not here either", input.name),
        ),
        (None, true) => im.doc.note(
            Section::Hba,
            "pgpool: enable_pool_hba = on -- pool_hba.conf not read: pass it with --pool-hba",
        ),
        (None, false) => {}
    }
    im.doc.note(
        Section::Top,
        "pgpool: PCP users (pcp.conf) are not carried over: pgrelay's admin console is the SQL \
         database \"pgrelay\" for the admin_users, who must be in [[users]]",
    );
    Ok(())
}

/// Where the comment for a key with no equivalent goes, and why.
fn unmapped_why(key: &str) -> (Section, &'static str) {
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| key.starts_with(p));
    let per_node = key.trim_end_matches(|c: char| c.is_ascii_digit()) != key;
    if starts(&["health_check_", "connect_timeout"]) && per_node {
        return (
            Section::HealthCheck,
            "per-node health checks: pgrelay's [health_check] applies to every node",
        );
    }
    if starts(&[
        "use_watchdog",
        "wd_",
        "heartbeat_",
        "hostname",
        "pgpool_port",
        "trusted_server",
        "ping_path",
        "if_",
        "arping",
        "delegate_ip",
        "clear_memqcache_on_escalation",
        "failover_when_quorum_exists",
        "failover_require_consensus",
        "allow_multiple_failover_requests",
        "enable_consensus_with_half_votes",
    ]) {
        return (Section::Failover, "watchdog: pgrelay instances do not elect each other or hold a virtual IP; run several behind a load balancer or a Kubernetes Service");
    }
    if starts(&[
        "log_",
        "logging_collector",
        "logdir",
        "syslog_",
        "client_min_messages",
        "pid_file_name",
    ]) {
        return (Section::Top, "pgrelay logs to stderr (level: PGRELAY_LOG; log_format = \"json\" for JSON) and counts at metrics_listen's /metrics");
    }
    if starts(&[
        "memory_cache_enabled",
        "memqcache_",
        "cache_safe_memqcache",
        "cache_unsafe_memqcache",
    ]) {
        return (Section::Routing, "no query cache in pgrelay");
    }
    if starts(&[
        "relcache_",
        "check_temp_table",
        "check_unlogged_table",
        "enable_shared_relcache",
    ]) {
        return (Section::Routing, "pgrelay routes without looking up tables (no relation cache); temporary tables pin a client to its server");
    }
    if starts(&["recovery_", "client_idle_limit_in_recovery"]) {
        return (Section::Failover, "online recovery: pgrelay does not rebuild nodes; use pg_basebackup, pg_rewind or Patroni");
    }
    if starts(&["pcp_"]) {
        return (Section::Top, "no PCP: pgrelay's admin console (SQL, database \"pgrelay\") has SHOW POOL_NODES, DETACH, PROMOTE...");
    }
    if starts(&["sr_check_"]) {
        return (
            Section::Routing,
            "pgrelay measures lag with the [health_check] user",
        );
    }
    if starts(&["ssl_"]) {
        return (
            Section::Tls,
            "pgrelay uses rustls: TLS 1.2 and 1.3 with its default cipher suites, not configurable",
        );
    }
    match key {
        "max_pool" => (Section::Pool, "Pgpool-II's per-child connection cache: pgrelay pools default_pool_size connections per node, database and user"),
        "child_life_time" | "child_max_connections" | "serialize_accept" | "listen_backlog_multiplier" | "reserved_connections" | "process_management_mode" | "process_management_strategy" | "min_spare_children" | "max_spare_children" => {
            (Section::Pool, "Pgpool-II's process management: pgrelay runs no child processes")
        }
        "connection_cache" => (Section::Pool, "pgrelay always pools server connections"),
        "statement_level_load_balance" => (Section::Routing, "pgrelay picks a node per transaction (a transaction never spans nodes)"),
        "ignore_leading_white_space" | "allow_sql_comments" => (Section::Routing, "pgrelay's classifier always skips leading white space and comments"),
        "database_redirect_preference_list" | "app_name_redirect_preference_list" => (Section::Routing, "no per-application redirects: give a database target = \"primary\" or \"replica\" in [[databases]]"),
        "primary_routing_query_pattern_list" | "black_query_pattern_list" | "dml_adaptive_object_relationship_list" => (Section::Routing, "no query patterns: write_functions lists functions that make a SELECT a write"),
        "log_standby_delay" => (Section::Routing, "replica lag is exported as metrics and shown by SHOW POOL_NODES"),
        "insert_lock" | "lobj_lock_table" | "replicate_select" | "replication_stop_on_mismatch" | "failover_if_affected_tuples_mismatch" => (Section::Routing, "native replication mode only"),
        "failover_on_backend_shutdown" => (Section::HealthCheck, "a server that shuts down fails its requests, and recheck_on_backend_error probes its node at once"),
        "search_primary_node_timeout" => (Section::Failover, "pgrelay looks for the primary on every health check; writes wait for one up to failover.hold_timeout"),
        "auto_failback_interval" => (Section::Failover, "a node serves again after health_check.up_after answers in a row"),
        "detach_false_primary" => (Section::Failover, "pgrelay always takes a second primary out of service, as detach_false_primary = on"),
        "allow_clear_text_frontend_auth" => (Section::Top, "auth_type and the [[hba]] methods decide how clients authenticate"),
        "enable_pool_hba" | "pool_passwd" => (Section::Hba, "see [[hba]] and [[users]]"),
        _ => (Section::Top, "no equivalent in pgrelay (or not known to the importer); not carried over"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert!(unknown_placeholders("/f.sh %d %h %p %D %m %H %M %P %r %R %N %S %%").is_empty());
        assert_eq!(unknown_placeholders("x %a %d %"), ["%a", "%"]);
    }
}

#[cfg(test)]
mod import_tests {
    use super::*;
    use crate::config::Config;
    use crate::import::{import, InputFile};

    fn run(conf: &str, passwd: Option<&str>) -> Result<String, ImportError> {
        import(&Request {
            main: InputFile {
                name: "pgpool.conf".to_owned(),
                text: conf.to_owned(),
            },
            from: None,
            userlist: None,
            hba: None,
            pool_passwd: passwd.map(|t| InputFile {
                name: "pool_passwd".to_owned(),
                text: t.to_owned(),
            }),
        })
    }

    #[test]
    fn refuses_modes_other_than_streaming() {
        for (conf, line) in [
            ("backend_hostname0 = 'a'\nbackend_clustering_mode = 'native_replication'\n", 2),
            ("backend_hostname0 = 'a'\nmaster_slave_mode = on\nmaster_slave_sub_mode = 'slony'\n", 3),
            ("replication_mode = on\nbackend_hostname0 = 'a'\n", 1),
        ] {
            let err = run(conf, None).expect_err(conf);
            assert!(err.to_string().starts_with(&format!("pgpool.conf:{line}: ")), "{err}");
        }
    }

    #[test]
    fn raw_mode_turns_routing_off_and_gaps_are_noted() {
        let conf = "backend_clustering_mode = 'raw'\nbackend_hostname0 = 'a'\n\
                    backend_hostname2 = 'c'\nbackend_weight2 = 0.5\n\
                    write_function_list = 'nextval,my_.*'\n\
                    failover_command = 'f.sh %d %a'\n";
        let text = run(conf, Some("u:AESxyz\nv:TEXTpw\n")).expect("import");
        let config = Config::from_toml_str(&text).expect("valid");
        let text = text.replace("\n#   ", " ");
        assert!(!config.routing.enabled);
        assert_eq!(config.backends.len(), 2);
        assert_eq!(config.backends[1].weight, 0.5);
        assert_eq!(config.routing.write_functions, ["nextval"]);
        assert_eq!(config.users.len(), 1);
        assert!(text.contains("node 2 is backends[1]"), "{text}");
        assert!(text.contains("my_.*"), "{text}");
        assert!(text.contains("left as written: %a"), "{text}");
        assert!(
            text.contains("user \"u\" left out: an AES-encrypted password"),
            "{text}"
        );
    }
}
