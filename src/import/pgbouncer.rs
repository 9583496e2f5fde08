//! PgBouncer's `pgbouncer.ini` (with its `auth_file` and `auth_hba_file`) into
//! pgrelay's settings: `[pgbouncer]` to the top level, `[pool]` and `[tls]`;
//! `[databases]` to `[[backends]]` and `[[databases]]` (in `aliases.rs`); the auth file
//! and `[users]` to `[[users]]`.

use std::collections::BTreeMap;

use super::doc::{Doc, Section};
use super::hba::{self, TlsSide};
use super::ini::{self, pairs, Setting};
use super::secrets::{self, UserSecret};
use super::{
    aliases, dedup, duration_text, listen_entries, notes, parse_time, unmapped, ImportError,
    Request, Source,
};

const SOURCE: Source = Source::PgBouncer;

/// A connection string's `key=value` pairs.
type Params = Vec<(String, String)>;

/// The `[pgbouncer]` settings not yet used: value and line, by key.
type General = BTreeMap<String, (String, usize)>;

pub(super) fn import(request: &Request) -> Result<String, ImportError> {
    let file = request.main.name.as_str();
    if request.pool_passwd.is_some() {
        return Err(ImportError::file(
            file,
            "--pool-passwd is for Pgpool-II files; PgBouncer's passwords come with --userlist",
        ));
    }
    let settings = ini::parse(file, &request.main.text)?;
    let mut general = General::new();
    for s in settings.iter().filter(|s| s.section == "pgbouncer") {
        general.insert(s.key.clone(), (s.value.clone(), s.line));
    }
    let mut doc = Doc::default();
    doc.intro(format!(
        "pgrelay.toml imported from {file} by `pgrelay import`."
    ));
    doc.intro(
        "Comments starting with \"pgbouncer:\" are settings with no pgrelay equivalent or \
         with a different meaning. Check this file with `pgrelay check -c FILE`.",
    );
    listen(&mut doc, file, &mut general)?;
    pool(&mut doc, file, &mut general)?;
    let tls = tls(&mut doc, file, &mut general)?;
    let databases: Vec<&Setting> = settings
        .iter()
        .filter(|s| s.section == "databases")
        .collect();
    aliases::add(&mut doc, file, &databases)?;
    let auth_type = auth(&mut doc, request, &mut general, tls)?;
    users(&mut doc, request, &settings, &mut general, auth_type)?;
    raise_to_min_pool_size(&mut doc);
    for s in settings
        .iter()
        .filter(|s| !["pgbouncer", "databases", "users"].contains(&s.section.as_str()))
    {
        let why = "a section the importer does not know; not carried over";
        doc.note(
            Section::Top,
            unmapped(SOURCE, &format!("[{}] {}", s.section, s.key), &s.value, why),
        );
    }
    for (key, (value, _)) in &general {
        let (section, why) = notes::pgbouncer(key);
        doc.note(section, unmapped(SOURCE, key, value, why));
    }
    Ok(doc.render())
}

/// pgrelay keeps every pool at least `min_pool_size`; PgBouncer let a database's or a
/// user's `pool_size` be smaller.
fn raise_to_min_pool_size(doc: &mut Doc) {
    let min = doc
        .get(Section::Pool, "min_pool_size")
        .and_then(toml::Value::as_integer);
    let Some(min) = min.filter(|m| *m > 0) else {
        return;
    };
    for section in [Section::Databases, Section::Users] {
        for entry in doc.entries_mut(section) {
            let size = entry.get("pool_size").and_then(toml::Value::as_integer);
            if let Some(size) = size.filter(|s| *s < min) {
                let why = format!("pgrelay keeps a pool at least min_pool_size ({min})");
                let note = unmapped(SOURCE, "pool_size", &size.to_string(), &why);
                entry.set_noted("pool_size", min, note);
            }
        }
    }
}

fn take(general: &mut General, key: &str) -> Option<(String, usize)> {
    general.remove(key)
}

fn listen(doc: &mut Doc, file: &str, general: &mut General) -> Result<(), ImportError> {
    let port = match take(general, "listen_port") {
        Some((p, line)) => p.trim().parse::<u16>().map_err(|_| {
            ImportError::line(file, line, format!("listen_port = {p:?} is not a port"))
        })?,
        None => 6432,
    };
    let addr = take(general, "listen_addr")
        .map(|(a, _)| a)
        .unwrap_or_default();
    let (mut entries, notes) = listen_entries(SOURCE, "listen_addr", &addr, port);
    for note in notes {
        doc.note(Section::Top, note);
    }
    match take(general, "unix_socket_dir") {
        Some((dir, _)) if !dir.trim().is_empty() => {
            entries.push(format!(
                "unix:{}/.s.PGSQL.{port}",
                dir.trim().trim_end_matches('/')
            ));
        }
        Some(_) => {}
        None => doc.note(
            Section::Top,
            format!(
                "pgbouncer: unix_socket_dir is not set, so PgBouncer also listened on \
                 /tmp/.s.PGSQL.{port}; pgrelay listens only where listen says: add \
                 \"unix:/tmp/.s.PGSQL.{port}\" if clients use it"
            ),
        ),
    }
    if entries.is_empty() {
        doc.note(
            Section::Top,
            format!("nothing to listen on was left: 127.0.0.1:{port} is used"),
        );
        entries.push(format!("127.0.0.1:{port}"));
    }
    doc.set(Section::Top, "listen", dedup(entries));
    Ok(())
}

/// `[pool]` keys that keep their PgBouncer name and take a number.
const POOL_NUMBERS: [&str; 8] = [
    "max_client_conn",
    "default_pool_size",
    "min_pool_size",
    "max_db_connections",
    "max_user_connections",
    "max_db_client_connections",
    "max_user_client_connections",
    "max_prepared_statements",
];

/// `[pool]` durations that keep their PgBouncer name (seconds there), and whether 0
/// means "off" in pgrelay too.
const POOL_TIMES: [(&str, bool); 9] = [
    ("query_wait_timeout", false),
    ("server_idle_timeout", false),
    ("server_lifetime", false),
    ("client_login_timeout", false),
    ("server_connect_timeout", false),
    ("query_timeout", true),
    ("idle_transaction_timeout", true),
    ("client_idle_timeout", true),
    ("transaction_timeout", true),
];

fn pool(doc: &mut Doc, file: &str, general: &mut General) -> Result<(), ImportError> {
    match take(general, "pool_mode") {
        Some((mode, _)) if mode == "session" || mode == "transaction" => {
            doc.set(Section::Pool, "mode", mode);
        }
        Some((mode, _)) if mode == "statement" => {
            let why = "pgrelay has no statement mode: transaction mode is the closest (a \
                       multi-statement transaction keeps its server)";
            doc.table(Section::Pool).set_noted(
                "mode",
                "transaction",
                unmapped(SOURCE, "pool_mode", &mode, why),
            );
        }
        Some((mode, line)) => {
            return Err(ImportError::line(
                file,
                line,
                format!("unknown pool_mode {mode:?}"),
            ));
        }
        None => doc.table(Section::Pool).set_noted(
            "mode",
            "session",
            "PgBouncer's default pool_mode is session (pgrelay's is transaction)".to_owned(),
        ),
    }
    pool_sizes(doc, file, general)?;
    pool_times(doc, file, general)?;
    if let Some((query, _)) = take(general, "server_reset_query") {
        doc.set(Section::Pool, "server_reset_query", query);
    }
    Ok(())
}

/// The sizes and limits of `[pool]`, PgBouncer's defaults where pgrelay's differ.
fn pool_sizes(doc: &mut Doc, file: &str, general: &mut General) -> Result<(), ImportError> {
    let mut sizes = BTreeMap::new();
    for key in POOL_NUMBERS {
        if let Some((value, line)) = take(general, key) {
            let number: u32 = value.trim().parse().map_err(|_| {
                ImportError::line(file, line, format!("{key} = {value:?} is not a number"))
            })?;
            sizes.insert(key, number);
        }
    }
    let per_node = [
        "default_pool_size",
        "min_pool_size",
        "max_db_connections",
        "max_user_connections",
    ];
    if per_node.iter().any(|key| sizes.contains_key(key)) {
        doc.note(
            Section::Pool,
            "pool sizes and max_db_connections / max_user_connections count per node in \
             pgrelay (each backend has its own pools), where PgBouncer had one host per database",
        );
    }
    for (key, number) in &sizes {
        let must_be_positive = ["max_client_conn", "default_pool_size"].contains(key);
        if must_be_positive && *number == 0 {
            doc.note(
                Section::Pool,
                unmapped(
                    SOURCE,
                    key,
                    "0",
                    "pgrelay needs at least 1: its default is kept",
                ),
            );
            continue;
        }
        doc.set(Section::Pool, key, i64::from(*number));
    }
    // PgBouncer's defaults where pgrelay's differ.
    if !sizes.contains_key("max_client_conn") {
        let note = "PgBouncer's default max_client_conn is 100 (pgrelay's 10000)".to_owned();
        doc.table(Section::Pool)
            .set_noted("max_client_conn", 100, note);
    }
    if !general.contains_key("server_connect_timeout") {
        let note = "PgBouncer's default server_connect_timeout is 15s (pgrelay's 5s)".to_owned();
        doc.table(Section::Pool)
            .set_noted("server_connect_timeout", "15s", note);
    }
    let size = sizes
        .get("default_pool_size")
        .copied()
        .filter(|n| *n > 0)
        .unwrap_or(20);
    if sizes.get("min_pool_size").is_some_and(|min| *min > size) {
        let why = "pgrelay keeps min_pool_size at most default_pool_size";
        doc.table(Section::Pool).set_noted(
            "min_pool_size",
            i64::from(size),
            unmapped(
                SOURCE,
                "min_pool_size",
                &sizes["min_pool_size"].to_string(),
                why,
            ),
        );
    }
    Ok(())
}

/// The timeouts of `[pool]`, in seconds in PgBouncer.
fn pool_times(doc: &mut Doc, file: &str, general: &mut General) -> Result<(), ImportError> {
    for (key, zero_is_off) in POOL_TIMES {
        let Some((value, line)) = take(general, key) else {
            continue;
        };
        let time = parse_time(&value, 1000.0).ok_or_else(|| {
            ImportError::line(
                file,
                line,
                format!("{key} = {value:?} is not a time in seconds"),
            )
        })?;
        if time.is_zero() && !zero_is_off {
            let why =
                "0 turns it off in PgBouncer; pgrelay has no \"off\" here: its default is kept";
            doc.note(Section::Pool, unmapped(SOURCE, key, &value, why));
            continue;
        }
        doc.set(Section::Pool, key, duration_text(time));
    }
    Ok(())
}

/// `[tls]`; returns what `[[hba]]` rules may rely on.
fn tls(doc: &mut Doc, file: &str, general: &mut General) -> Result<TlsSide, ImportError> {
    for key in ["client_tls_sslmode", "server_tls_sslmode"] {
        if let Some((mode, line)) = general.get(key) {
            const MODES: [&str; 6] = [
                "disable",
                "allow",
                "prefer",
                "require",
                "verify-ca",
                "verify-full",
            ];
            if !MODES.contains(&mode.as_str()) {
                let why = format!("{key} = {mode:?} is not one of {}", MODES.join(", "));
                return Err(ImportError::line(file, *line, why));
            }
        }
    }
    let mut value = |key: &str| {
        take(general, key)
            .map(|(v, _)| v)
            .filter(|v| !v.is_empty() && v != "<system default>")
    };
    let client_mode = value("client_tls_sslmode");
    let (cert, key, ca) = (
        value("client_tls_cert_file"),
        value("client_tls_key_file"),
        value("client_tls_ca_file"),
    );
    let server_mode = value("server_tls_sslmode");
    let server_ca = value("server_tls_ca_file");
    let table = doc.table(Section::Tls);
    let mut tls_on = false;
    if let Some(mode) = client_mode.filter(|m| m != "disable") {
        let verifies = mode.starts_with("verify");
        if cert.is_none() || key.is_none() || (verifies && ca.is_none()) {
            let why = "the certificate and key files (and for verify-* a CA) are not all \
                       given: TLS towards clients is left off";
            table.note(unmapped(SOURCE, "client_tls_sslmode", &mode, why));
        } else {
            table.set("client_mode", mode);
            tls_on = true;
        }
    }
    if tls_on {
        table.set("client_cert", cert.clone().unwrap_or_default());
        table.set("client_key", key.clone().unwrap_or_default());
    }
    if let Some(ca) = &ca {
        table.set("client_ca", ca.as_str());
    }
    if let Some(mode) = server_mode {
        if mode.starts_with("verify") && server_ca.is_none() {
            table.set_noted(
                "server_ca",
                "/etc/ssl/certs/ca-certificates.crt",
                "PgBouncer verified servers against the system's CAs; pgrelay needs the file \
                 (Debian's bundle here)"
                    .to_owned(),
            );
        }
        table.set("server_mode", mode);
    }
    if let Some(ca) = server_ca {
        table.set("server_ca", ca);
    }
    Ok(TlsSide {
        tls_on,
        client_ca: ca.is_some(),
    })
}

/// The top-level auth keys and `[[hba]]`; returns the global `auth_type` written.
fn auth(
    doc: &mut Doc,
    request: &Request,
    general: &mut General,
    tls: TlsSide,
) -> Result<String, ImportError> {
    let (auth_type, _) = take(general, "auth_type").unwrap_or_else(|| ("md5".to_owned(), 0));
    let hba_file = take(general, "auth_hba_file");
    let written = match auth_type.as_str() {
        "trust" | "plain" | "md5" | "scram-sha-256" => auth_type.clone(),
        "cert" if tls.tls_on && tls.client_ca => auth_type.clone(),
        "hba" => {
            add_hba(doc, request, hba_file.as_ref(), tls)?;
            let note = "auth_type = hba: the [[hba]] rules decide; md5 (SCRAM for users \
                        stored with a SCRAM secret) serves the checks of [[users]]";
            doc.note(Section::Top, note);
            "md5".to_owned()
        }
        "any" => {
            let why = "no password is asked, but a user must still be in [[users]] \
                       (PgBouncer's any also let in users it did not know): trust";
            doc.note(Section::Top, unmapped(SOURCE, "auth_type", &auth_type, why));
            "trust".to_owned()
        }
        other => {
            let why = "not available in pgrelay (or its TLS settings are missing): md5 is used";
            doc.note(Section::Top, unmapped(SOURCE, "auth_type", other, why));
            "md5".to_owned()
        }
    };
    if auth_type != "hba" {
        if let Some((path, _)) = hba_file {
            let why = "used only with auth_type = hba";
            doc.note(Section::Top, unmapped(SOURCE, "auth_hba_file", &path, why));
        }
    }
    doc.set(Section::Top, "auth_type", written.as_str());
    match take(general, "auth_file") {
        Some((path, _)) if request.userlist.is_none() => {
            let why = "not read: pass it with --userlist to bring its users and passwords";
            doc.note(Section::Users, unmapped(SOURCE, "auth_file", &path, why));
        }
        _ => {}
    }
    if let Some((query, _)) = take(general, "auth_query") {
        doc.set(Section::Top, "auth_query", query);
    }
    if let Some((dbname, _)) = take(general, "auth_dbname") {
        doc.set(Section::Top, "auth_dbname", dbname);
    }
    Ok(written)
}

fn add_hba(
    doc: &mut Doc,
    request: &Request,
    hba_file: Option<&(String, usize)>,
    tls: TlsSide,
) -> Result<(), ImportError> {
    match &request.hba {
        Some(input) => {
            let rules = hba::parse(&input.name, &input.text)?;
            hba::add_rules(doc, &input.name, &rules, tls)
        }
        None => {
            let path = hba_file.map_or("(not set)", |(p, _)| p.as_str());
            let why = "not read: pass it with --hba to bring its rules; without rules every \
                       user authenticates with md5 (or SCRAM)";
            doc.note(Section::Hba, unmapped(SOURCE, "auth_hba_file", path, why));
            Ok(())
        }
    }
}

/// `[[users]]` from the auth file and `[users]`, then the lists that name users.
fn users(
    doc: &mut Doc,
    request: &Request,
    settings: &[Setting],
    general: &mut General,
    auth_type: String,
) -> Result<(), ImportError> {
    let listed = match &request.userlist {
        Some(input) => secrets::userlist(&input.name, &input.text)?,
        None => Vec::new(),
    };
    let mut overrides: BTreeMap<&str, (Params, usize)> = BTreeMap::new();
    for s in settings.iter().filter(|s| s.section == "users") {
        let params =
            pairs(&s.value).map_err(|why| ImportError::line(&request.main.name, s.line, why))?;
        overrides.insert(s.key.as_str(), (params, s.line));
    }
    let mut kept: Vec<&UserSecret> = Vec::new();
    for user in &listed {
        if auth_type == "scram-sha-256" && user.is_md5() {
            let why = format!(
                "user {:?} (line {}) is stored as an md5 hash, which cannot serve \
                 scram-sha-256 (PgBouncer refused its logins too): give its plaintext or \
                 SCRAM secret",
                user.name, user.line
            );
            doc.note(Section::Users, why);
            continue;
        }
        kept.push(user);
        let entry = doc.push(Section::Users);
        entry.set("name", user.name.as_str());
        entry.set("password", user.secret.as_str());
        if let Some((params, _)) = overrides.remove(user.name.as_str()) {
            user_overrides(entry, &user.name, params);
        }
    }
    for (name, (_, line)) in overrides {
        doc.note(
            Section::Users,
            format!(
                "[users] {name} (line {line}): not carried over: the user has no password in \
                 the auth file, and a [[users]] entry needs one"
            ),
        );
    }
    let known = |name: &str| kept.iter().any(|u| u.name == name);
    for list in ["admin_users", "stats_users"] {
        let Some((value, _)) = take(general, list) else {
            continue;
        };
        let names: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        let (found, missing): (Vec<&str>, Vec<&str>) = names.into_iter().partition(|n| known(n));
        if !missing.is_empty() {
            let why = format!(
                "{} not in [[users]] (no password in the auth file): left out",
                missing.join(", ")
            );
            doc.note(Section::Top, unmapped(SOURCE, list, &value, &why));
        }
        doc.set(Section::Top, list, found);
    }
    if let Some((user, _)) = take(general, "auth_user") {
        if known(&user) {
            doc.set(Section::Top, "auth_user", user);
        } else {
            let why = "not in [[users]] (its password must be there): auth_query is off until it is added";
            doc.note(Section::Top, unmapped(SOURCE, "auth_user", &user, why));
        }
    }
    Ok(())
}

fn user_overrides(entry: &mut super::doc::Table, name: &str, params: Vec<(String, String)>) {
    for (key, value) in params {
        let number = value.parse::<u32>().ok();
        match (key.as_str(), number) {
            ("pool_mode", _) if value == "session" || value == "transaction" => {
                entry.set("pool_mode", value);
            }
            ("pool_size", Some(n)) if n > 0 => entry.set("pool_size", i64::from(n)),
            ("max_user_connections" | "max_user_client_connections", Some(n)) => {
                entry.set(&key, i64::from(n));
            }
            _ => entry.note(unmapped(
                SOURCE,
                &format!("[users] {name} {key}"),
                &value,
                "no per-user equivalent in pgrelay",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, PoolMode};
    use crate::import::{import, InputFile};

    fn input(name: &str, text: &str) -> InputFile {
        InputFile {
            name: name.to_owned(),
            text: text.to_owned(),
        }
    }

    fn run(ini: &str, userlist: Option<&str>, hba: Option<&str>) -> Result<String, ImportError> {
        import(&Request {
            main: input("pgbouncer.ini", ini),
            from: None,
            userlist: userlist.map(|t| input("userlist.txt", t)),
            hba: hba.map(|t| input("hba.conf", t)),
            pool_passwd: None,
        })
    }

    #[test]
    fn statement_mode_and_scram_with_md5_users() {
        let ini = "[databases]\napp = host=10.0.0.5\n[pgbouncer]\nlisten_addr = 10.0.0.1\n\
                   pool_mode = statement\nauth_type = scram-sha-256\nadmin_users = old, root\n";
        let users = "\"old\" \"md5f3e4b1a7e9c5d2b8a6f0e1d2c3b4a596\"\n\"root\" \"pw\"\n";
        let text = run(ini, Some(users), None).expect("import");
        let config = Config::from_toml_str(&text).expect("valid");
        assert_eq!(config.pool.mode, PoolMode::Transaction);
        assert_eq!(config.admin_users, ["root"]);
        assert_eq!(config.users.len(), 1);
        assert!(
            text.contains("pgbouncer: pool_mode = statement -- "),
            "{text}"
        );
        assert!(
            text.contains("user \"old\" (line 1) is stored as an md5 hash"),
            "{text}"
        );
        assert_eq!(config.listen[0].to_string(), "10.0.0.1:6432");
    }

    #[test]
    fn hba_mode_reads_the_rules() {
        let ini = "[pgbouncer]\nauth_type = hba\nauth_hba_file = /etc/pgbouncer/hba.conf\n";
        let text = run(
            ini,
            Some("\"a\" \"b\"\n"),
            Some("host all all 10.0.0.0/8 scram-sha-256\n"),
        )
        .expect("import");
        let config = Config::from_toml_str(&text).expect("valid");
        assert_eq!(config.hba.len(), 1);
        let without = run(ini, None, None).expect("import").replace("\n#   ", " ");
        assert!(without.contains("pass it with --hba"), "{without}");
    }

    #[test]
    fn what_pgrelay_would_refuse_is_adjusted() {
        let ini = "[databases]\napp = host=a pool_size=2\napp = host=b\nrep = host=a pool_size=1\n\
                   [users]\nu = pool_size=1\n[pgbouncer]\nlisten_addr = 127.0.0.1, localhost\n\
                   min_pool_size = 3\ndefault_pool_size = 2\n";
        let text = run(ini, Some("\"u\" \"pw\"\n"), None).expect("import");
        let config = Config::from_toml_str(&text).expect("valid");
        assert_eq!(config.listen.len(), 1);
        assert_eq!(config.pool.min_pool_size, 2);
        let app = config.database("app").expect("app");
        assert_eq!(
            (app.pool_size, config.backends[0].host.as_str()),
            (None, "b")
        );
        assert_eq!(config.database("rep").and_then(|d| d.pool_size), Some(2));
        assert_eq!(config.user("u").and_then(|u| u.pool_size), Some(2));
        let text = text.replace("\n#   ", " ");
        assert!(
            text.contains("is set again at line 3: the last one is kept"),
            "{text}"
        );
    }

    #[test]
    fn bad_values_name_their_line() {
        for (ini, line) in [
            ("[pgbouncer]\nlisten_port = sixty\n", 2),
            ("[pgbouncer]\n\ndefault_pool_size = many\n", 3),
            ("[databases]\napp = host='db\n", 2),
            ("[pgbouncer]\nquery_timeout = soon\n", 2),
        ] {
            let err = run(ini, None, None).expect_err(ini);
            assert!(
                err.to_string()
                    .starts_with(&format!("pgbouncer.ini:{line}: ")),
                "{err}"
            );
        }
    }
}
