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
    dedup, duration_text, listen_entries, notes, parse_bool, parse_time, pgpool_nodes, unmapped,
    ImportError, Request, Source,
};

pub(super) const SOURCE: Source = Source::Pgpool;

/// The settings not yet used, by key.
type Settings = BTreeMap<String, Setting>;

/// The reader's state: the file's name, the settings left, the output.
pub(super) struct Import<'a> {
    pub(super) file: &'a str,
    pub(super) left: Settings,
    pub(super) doc: Doc,
}

impl Import<'_> {
    pub(super) fn take(&mut self, key: &str) -> Option<Setting> {
        self.left.remove(key)
    }

    /// The first of `keys` that is set (new name first), the others noted as shadowed.
    pub(super) fn take_any(&mut self, keys: &[&str]) -> Option<Setting> {
        let mut found = None;
        for key in keys {
            if let Some(s) = self.take(key) {
                found.get_or_insert(s);
            }
        }
        found
    }

    pub(super) fn bool(&mut self, key: &str) -> Result<Option<bool>, ImportError> {
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
    pub(super) fn time(
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

    pub(super) fn number(&mut self, key: &str) -> Result<Option<u64>, ImportError> {
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

    pub(super) fn note(&mut self, section: Section, s: &Setting, why: &str) {
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
    pgpool_nodes::health(&mut im, users)?;
    pgpool_nodes::failover(&mut im)?;
    let tls = tls(&mut im)?;
    pgpool_nodes::backends(&mut im)?;
    auth(&mut im, request, passwd.as_ref(), tls)?;
    let left = std::mem::take(&mut im.left);
    for s in left.values() {
        let (section, why) = notes::pgpool(&s.key);
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
    im.doc.set(Section::Top, "listen", dedup(entries));
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
    lag(im)
}

/// The replica lag limits and how often lag is measured.
fn lag(im: &mut Import) -> Result<(), ImportError> {
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
    fn refuses_other_modes_and_a_node_listed_twice() {
        for (conf, line) in [
            ("backend_hostname0 = 'a'\nbackend_clustering_mode = 'native_replication'\n", 2),
            ("backend_hostname0 = 'a'\nmaster_slave_mode = on\nmaster_slave_sub_mode = 'slony'\n", 3),
            ("replication_mode = on\nbackend_hostname0 = 'a'\n", 1),
            ("backend_hostname0 = 'a'\nbackend_hostname1 = 'a'\n", 2),
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
