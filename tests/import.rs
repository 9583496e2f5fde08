//! `pgrelay import`: the setups of `../shared/migration` (PgBouncer with write and read
//! aliases, Pgpool-II with old parameter names and its access files) and the sample
//! configurations Debian's `pgbouncer` and `pgpool2` packages install become files
//! `pgrelay check` accepts, with the expected mappings and a comment for every setting
//! without an equivalent; input the importer cannot read is refused with its line.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pgrelay::config::{
    AuthType, Config, EndpointTarget, HbaMethod, HbaType, PoolMode, ReadAfterWrite, RoleHint,
    TlsMode,
};
use support::certs::Pki;
use support::needs::TEST_COMMAND;

const BIN: &str = env!("CARGO_BIN_EXE_pgrelay");

/// `../shared/migration` beside the repository, or the copy under `tests/fixtures` in
/// a checkout that has no `../shared`.
fn migration(file: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let shared = root.join("../shared/migration");
    let dir = if shared.is_dir() {
        shared
    } else {
        eprintln!("../shared/migration is not there: using tests/fixtures/migration");
        root.join("tests/fixtures/migration")
    };
    dir.join(file)
}

/// Runs `pgrelay import ARGS` (the file, then flags and their files, all as paths):
/// (success, stdout, stderr).
fn import(args: &[&Path]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("import")
        .args(args)
        .output()
        .expect("run pgrelay import");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Imports and requires success; returns the text.
fn imported(args: &[&Path]) -> String {
    let (ok, stdout, stderr) = import(args);
    assert!(ok, "pgrelay import {args:?} failed: {stderr}");
    stdout
}

/// The text with wrapped comment lines joined, for looking for a sentence.
fn flat(text: &str) -> String {
    text.replace("\n#   ", " ")
}

/// `pgrelay check` on `text`, with file paths replaced as `paths` says (certificate
/// files that exist only on the imported machine).
fn check(text: &str, paths: &[(&str, &Path)]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = text.to_owned();
    for (from, to) in paths {
        assert!(text.contains(from), "{from} is not in the output");
        text = text.replace(from, &to.display().to_string());
    }
    let file = dir.path().join("pgrelay.toml");
    std::fs::write(&file, &text).expect("write");
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .expect("run pgrelay check");
    assert!(
        out.status.success(),
        "pgrelay check refused the imported file: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn pgbouncer_with_write_and_read_aliases() {
    let ini = migration("pgbouncer.ini");
    let userlist = migration("userlist.txt");
    let args = [ini.as_path(), Path::new("--userlist"), userlist.as_path()];
    let text = imported(&args);
    assert_eq!(text, imported(&args), "the output is not deterministic");
    let config = Config::from_toml_str(&text).expect("the output is valid");

    let listen: Vec<String> = config.listen.iter().map(|l| l.to_string()).collect();
    assert_eq!(
        listen,
        ["0.0.0.0:6432", "unix:/var/run/postgresql/.s.PGSQL.6432"]
    );
    assert_eq!(config.auth_type, AuthType::Md5);
    assert_eq!(config.auth_user.as_deref(), Some("pgbouncer_auth"));
    assert_eq!(
        config.auth_query,
        "SELECT usename, passwd FROM pgbouncer.user_lookup($1)"
    );
    assert_eq!(config.admin_users, ["admin"]);
    assert_eq!(config.stats_users, ["monitor"]);

    let pool = &config.pool;
    assert_eq!(pool.mode, PoolMode::Transaction);
    assert_eq!(
        (
            pool.default_pool_size,
            pool.min_pool_size,
            pool.max_client_conn
        ),
        (25, 5, 1000)
    );
    assert_eq!(pool.max_db_connections, 80);
    assert_eq!(pool.max_prepared_statements, 100);
    assert_eq!(pool.query_wait_timeout, secs(120));
    assert_eq!(pool.server_lifetime, secs(3600));
    assert_eq!(pool.server_idle_timeout, secs(600));
    assert_eq!(pool.client_login_timeout, secs(60));
    assert_eq!(pool.server_reset_query, "DISCARD ALL");

    // The primary first; the roles by the services' names.
    let backends: Vec<(&str, u16, Option<RoleHint>)> = config
        .backends
        .iter()
        .map(|b| (b.host.as_str(), b.port, b.role))
        .collect();
    assert_eq!(
        backends,
        [
            ("postgres-primary", 5432, Some(RoleHint::Primary)),
            ("postgres-replica", 5432, Some(RoleHint::Replica)),
        ]
    );
    // The write and read aliases become endpoints; `*` is explained, not listed.
    let databases: Vec<(&str, &str, EndpointTarget)> = config
        .databases
        .iter()
        .map(|d| (d.name.as_str(), d.server_dbname(), d.target))
        .collect();
    assert_eq!(
        databases,
        [
            ("mydb_write", "mydb", EndpointTarget::Primary),
            ("mydb_read", "mydb", EndpointTarget::Replica),
            ("reports", "mydb", EndpointTarget::Replica),
        ]
    );
    let reports = config.database("reports").expect("reports");
    assert_eq!(reports.pool_size, Some(5));
    assert_eq!(reports.pool_mode, Some(PoolMode::Session));

    let users: Vec<(&str, &str)> = config
        .users
        .iter()
        .map(|u| (u.name.as_str(), u.password.kind()))
        .collect();
    assert_eq!(
        users,
        [
            ("app", "scram-sha-256"),
            ("batch", "md5"),
            ("admin", "plain"),
            ("monitor", "plain"),
            ("pgbouncer_auth", "plain"),
        ]
    );
    let batch = config.user("batch").expect("batch");
    assert_eq!(batch.pool_mode, Some(PoolMode::Session));
    assert_eq!(batch.max_user_connections, Some(10));

    assert_eq!(config.tls.client_mode, TlsMode::Prefer);
    assert_eq!(config.tls.server_mode, TlsMode::Require);

    let text_flat = flat(&text);
    for comment in [
        "# pgbouncer: reserve_pool_size = 5 -- no reserve pool",
        "# pgbouncer: reserve_pool_timeout = 3 -- ",
        "# pgbouncer: server_check_query = select 1 -- ",
        "# pgbouncer: ignore_startup_parameters = extra_float_digits,options -- not needed",
        "# pgbouncer: log_connections = 1 -- ",
        "# pgbouncer: stats_period = 60 -- ",
        "[databases] * (line 6): the fallback entry",
        "target = \"replica\": PgBouncer sent all of its clients to postgres-replica:5432",
    ] {
        assert!(text_flat.contains(comment), "no {comment:?} in:\n{text}");
    }
    assert!(!text_flat.contains("not known to the importer"), "{text}");

    let pki = Pki::new("import");
    check(
        &text,
        &[
            ("/etc/pgbouncer/tls/server.crt", &pki.server.cert),
            ("/etc/pgbouncer/tls/server.key", &pki.server.key),
        ],
    );
}

#[test]
fn pgpool_with_old_names_and_its_access_files() {
    let conf = migration("pgpool.conf");
    let hba = migration("pool_hba.conf");
    let passwd = migration("pool_passwd");
    let text = imported(&[
        conf.as_path(),
        Path::new("--pool-hba"),
        hba.as_path(),
        Path::new("--pool-passwd"),
        passwd.as_path(),
    ]);
    let config = Config::from_toml_str(&text).expect("the output is valid");

    let listen: Vec<String> = config.listen.iter().map(|l| l.to_string()).collect();
    assert_eq!(
        listen,
        ["0.0.0.0:5432", "unix:/var/run/pgpool/.s.PGSQL.5432"]
    );
    assert_eq!(config.auth_type, AuthType::Md5);
    let pool = &config.pool;
    assert_eq!(pool.mode, PoolMode::Session);
    assert_eq!((pool.max_client_conn, pool.default_pool_size), (20, 20));
    assert_eq!(pool.server_connect_timeout, secs(10));

    let routing = &config.routing;
    assert!(routing.enabled);
    assert_eq!(routing.read_after_write, ReadAfterWrite::Transaction);
    assert_eq!(routing.write_functions, ["nextval", "setval", "lastval"]);
    assert_eq!(routing.max_lag_bytes, 10_000_000);
    assert_eq!(routing.lag_check_period, secs(10));

    let health = &config.health_check;
    assert_eq!((health.period, health.timeout), (secs(10), secs(5)));
    assert_eq!((health.max_retries, health.retry_delay), (3, secs(1)));
    assert_eq!(health.user, "admin");
    assert_eq!(health.database, "production");
    // health_check_password = '': Pgpool-II took it from pool_passwd (TEXT).
    assert_eq!(health.password, "admin-secret");
    assert!(health.recheck_on_backend_error);

    let failover = &config.failover;
    assert_eq!(
        failover.failover_command,
        "/etc/pgpool/failover.sh %d %h %p %D %m %H %M %P %r %R"
    );
    // follow_master_command, the old name.
    assert_eq!(
        failover.follow_primary_command,
        "/etc/pgpool/follow_master.sh %d %h %p %D %m %H %M %P %r %R"
    );
    assert!(!failover.auto_failback);

    let backends: Vec<(&str, u16, f64, &str)> = config
        .backends
        .iter()
        .map(|b| (b.host.as_str(), b.port, b.weight, b.data_directory.as_str()))
        .collect();
    let data = "/var/lib/postgresql/data";
    assert_eq!(
        backends,
        [
            ("postgresql-master", 5432, 1.0, data),
            ("postgresql-slaves-0.postgresql-slaves", 5432, 1.0, data),
            ("postgresql-slaves-1.postgresql-slaves", 5432, 2.0, data),
        ]
    );

    let users: Vec<(&str, &str)> = config
        .users
        .iter()
        .map(|u| (u.name.as_str(), u.password.kind()))
        .collect();
    assert_eq!(
        users,
        [
            ("app", "scram-sha-256"),
            ("reporting", "md5"),
            ("admin", "plain")
        ]
    );
    assert_eq!(config.hba.len(), 6);
    assert_eq!(
        (config.hba[0].kind, config.hba[0].method),
        (HbaType::Local, HbaMethod::Trust)
    );
    let app = &config.hba[2];
    assert_eq!(
        (app.kind, app.method),
        (HbaType::Host, HbaMethod::ScramSha256)
    );
    assert!(app.database.matches("production", "app") && !app.database.matches("x", "app"));
    assert!(app.user.matches("app", "app") && !app.user.matches("reporting", "reporting"));
    assert!(app
        .address
        .is_some_and(|a| a.contains("10.1.2.3".parse().expect("ip"))));

    let text_flat = flat(&text);
    for comment in [
        "# pgpool: master_slave_mode = on -- streaming replication is what pgrelay does",
        "# pgpool: max_pool = 4 -- ",
        "# pgpool: child_life_time = 300 -- ",
        "# pgpool: backend_flag2 = DISALLOW_TO_FAILOVER -- ",
        "# pgpool: use_watchdog = off -- watchdog",
        "# pgpool: recovery_1st_stage_command = recovery_1st_stage -- online recovery",
        "# pgpool: pcp_port = 9898 -- no PCP",
        "# pgpool: search_primary_node_timeout = 300 -- ",
        "# pgpool: disable_load_balance_on_write = transaction -- ",
        "# pgpool: failover_on_backend_error = on -- ",
    ] {
        assert!(text_flat.contains(comment), "no {comment:?} in:\n{text}");
    }
    assert!(!text_flat.contains("not known to the importer"), "{text}");
    assert!(!text.contains("pcp.conf:"), "pcp.conf is not an input");

    let pki = Pki::new("import");
    check(
        &text,
        &[
            ("/etc/pgpool/tls/server.crt", &pki.server.cert),
            ("/etc/pgpool/tls/server.key", &pki.server.key),
            ("/etc/pgpool/tls/ca.crt", &pki.ca),
        ],
    );
}

/// The copies of a Debian package's sample file this user can read: the installed
/// configuration (readable by root and postgres only) and the one under
/// /usr/share/doc (which slim images may leave out). None readable fails the test,
/// naming the package.
fn samples(package: &str, candidates: &[&str]) -> Vec<PathBuf> {
    let found: Vec<PathBuf> = candidates
        .iter()
        .map(PathBuf::from)
        .filter(|path| std::fs::read(path).is_ok())
        .collect();
    assert!(
        !found.is_empty(),
        "none of {candidates:?} can be read (Debian package `{package}`); the README's test \
         command, `{TEST_COMMAND}`, installs it and everything else the tests need"
    );
    found
}

/// `text` with every commented-out `key = value` line (`;key` or `#key`) enabled: all
/// the settings a sample documents.
fn enable_all(text: &str) -> String {
    text.lines()
        .map(|line| {
            let rest = line.strip_prefix(';').or_else(|| line.strip_prefix('#'));
            match rest {
                Some(rest)
                    if rest.starts_with(|c: char| c.is_ascii_alphabetic() || c == '*')
                        && rest.contains('=') =>
                {
                    rest
                }
                _ => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Imports `args` (the main file first), checks the result, and requires that every
/// setting was understood: none is left as "not known to the importer".
fn import_sample(args: &[&Path]) -> String {
    let text = imported(args);
    Config::from_toml_str(&text).expect("the output is valid");
    check(&text, &[]);
    assert!(
        !flat(&text).contains("not known to the importer"),
        "{:?}: a setting the importer does not know:\n{text}",
        args[0]
    );
    text
}

/// `sample` with all its settings enabled, written into `dir`.
fn enabled_copy(dir: &Path, sample: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let text = std::fs::read_to_string(sample).expect("read the sample");
    let path = dir.join(sample.file_name().expect("a file name"));
    std::fs::write(&path, edit(enable_all(&text))).expect("write");
    path
}

#[test]
fn debian_pgbouncer_samples() {
    let inis = samples(
        "pgbouncer",
        &[
            "/etc/pgbouncer/pgbouncer.ini",
            "/usr/share/doc/pgbouncer/examples/pgbouncer.ini",
        ],
    );
    let userlists = samples(
        "pgbouncer",
        &[
            "/etc/pgbouncer/userlist.txt",
            "/usr/share/doc/pgbouncer/examples/userlist.txt",
        ],
    );
    for ini in &inis {
        let text = import_sample(&[ini, Path::new("--userlist"), &userlists[0]]);
        let listen = "listen = [\"127.0.0.1:6432\", \"unix:/var/run/postgresql/.s.PGSQL.6432\"]";
        assert!(text.contains(listen), "{text}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let all = enabled_copy(dir.path(), &inis[0], |text| text);
    let text = import_sample(&[&all]);
    assert!(text.matches("# pgbouncer: ").count() > 30, "{text}");
    let config = Config::from_toml_str(&text).expect("valid");
    assert_eq!(config.databases.len(), 4, "{text}");
}

#[test]
fn debian_pgpool2_samples() {
    let confs = samples(
        "pgpool2",
        &[
            "/etc/pgpool2/pgpool.conf",
            "/usr/share/doc/pgpool2/examples/pgpool.conf.sample",
        ],
    );
    let hbas = samples(
        "pgpool2",
        &[
            "/etc/pgpool2/pool_hba.conf",
            "/usr/share/doc/pgpool2/examples/pool_hba.conf.sample",
        ],
    );
    let hba = hbas[0].as_path();
    for conf in &confs {
        let text = import_sample(&[conf, Path::new("--pool-hba"), hba]);
        assert!(text.contains("pgpool: enable_pool_hba = off"), "{text}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let all = enabled_copy(dir.path(), &confs[0], |text| {
        text.replace("enable_pool_hba = off", "enable_pool_hba = on")
    });
    let text = import_sample(&[&all, Path::new("--pool-hba"), hba]);
    assert!(text.matches("# pgpool: ").count() > 100, "{text}");
    let config = Config::from_toml_str(&text).expect("valid");
    assert_eq!(config.backends.len(), 2, "{text}");
    assert_eq!(config.hba.len(), 3, "{text}");
}

#[test]
fn unreadable_input_is_refused_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let ini = write(
        "bad.ini",
        "[databases]\napp = host=db\nthis line is not a setting\n",
    );
    let conf = write("bad.conf", "backend_hostname0 = 'db'\nport = '5432\n");
    let good_ini = write(
        "good.ini",
        "[databases]\napp = host=db\n[pgbouncer]\nauth_type = md5\n",
    );
    let good_conf = write(
        "good.conf",
        "backend_hostname0 = 'db'\nenable_pool_hba = on\n",
    );
    let userlist = write("userlist.txt", "\"app\" \"x\"\n\"b\" unquoted\n");
    let hba = write("pool_hba.conf", "local all all trust\nhost all all\n");
    let passwd = write(
        "pool_passwd",
        "app:md5e5e2b6ef9ef1e1e09e4bf4e0c7c8f0a1\n\nnocolon\n",
    );
    let cases: [(Vec<&Path>, PathBuf, usize); 5] = [
        (vec![&ini], ini.clone(), 3),
        (vec![&conf], conf.clone(), 2),
        (
            vec![&good_ini, Path::new("--userlist"), &userlist],
            userlist.clone(),
            2,
        ),
        (
            vec![&good_conf, Path::new("--pool-hba"), &hba],
            hba.clone(),
            2,
        ),
        (
            vec![&good_conf, Path::new("--pool-passwd"), &passwd],
            passwd.clone(),
            3,
        ),
    ];
    for (args, file, line) in cases {
        let (ok, stdout, stderr) = import(&args);
        assert!(!ok, "{args:?} was accepted:\n{stdout}");
        assert!(stdout.is_empty(), "{stdout}");
        let want = format!("{}:{line}: ", file.display());
        assert!(
            stderr.contains(&want),
            "{args:?}: no {want:?} in {stderr:?}"
        );
    }
}

#[test]
fn the_tool_is_told_from_the_file_or_from_from() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = dir.path().join("plain.conf");
    std::fs::write(&plain, "port = 5432\nlisten_addresses = '*'\n").expect("write");
    let (ok, _, stderr) = import(&[&plain]);
    assert!(
        !ok && stderr.contains("--from pgbouncer or --from pgpool"),
        "{stderr}"
    );
    let text = imported(&[&plain, Path::new("--from"), Path::new("pgpool")]);
    assert!(text.contains("listen = [\"0.0.0.0:5432\"]"), "{text}");
    let ini = migration("pgbouncer.ini");
    let (ok, _, stderr) = import(&[&ini, Path::new("--pool-passwd"), &ini]);
    assert!(!ok && stderr.contains("--userlist"), "{stderr}");
}

/// The "after" side of each migration guide (its first `toml` block) is a file
/// `pgrelay check` accepts.
#[test]
fn the_migration_guides_examples_pass_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/migration");
    for guide in [
        "from-pgbouncer.md",
        "from-pgpool.md",
        "from-haproxy-patroni.md",
    ] {
        let text = std::fs::read_to_string(dir.join(guide)).expect("read the guide");
        let (_, rest) = text.split_once("```toml\n").expect("a toml block");
        let (example, _) = rest.split_once("```").expect("its end");
        if let Err(err) = Config::from_toml_str(example) {
            panic!("{guide}: {err}");
        }
        check(example, &[]);
    }
}
