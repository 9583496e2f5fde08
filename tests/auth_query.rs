//! Users the config does not list, logged in with the secret `auth_query` fetches from
//! the primary (PgBouncer's `auth_user`/`auth_query`), against real PostgreSQL and
//! tokio-postgres: SCRAM and md5 secrets, servers logged in to with what the client
//! proved, a changed password, unknown users told exactly what a wrong password is
//! told, and a client's `search_path` kept away from the lookup.

mod support;

use support::{raw, start, EnvOptions, TestEnv, APP_DB, APP_USER};

const ROLE: &str = "carol";
const ROLE_PASSWORD: &str = "carol-secret";

/// The documented way: a SECURITY DEFINER function the auth user may call, and an
/// `auth_query` that names it with its schema (the lookup's path is `pg_catalog`).
const LOOKUP_FUNCTION: &str = "\
    CREATE FUNCTION public.pgrelay_lookup(name) RETURNS TABLE(usename name, passwd text) \
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS \
    $$ SELECT usename, passwd::text FROM pg_catalog.pg_shadow WHERE usename = $1 $$; \
    REVOKE ALL ON FUNCTION public.pgrelay_lookup(name) FROM PUBLIC; \
    GRANT EXECUTE ON FUNCTION public.pgrelay_lookup(name) TO app;";

/// pgrelay with `auth_user = "app"` and the function as `auth_query`.
async fn env_with_function() -> TestEnv {
    let env = start(EnvOptions {
        top_extra: vec![
            "auth_user = \"app\"".into(),
            "auth_query = \"SELECT usename, passwd FROM public.pgrelay_lookup($1)\"".into(),
        ],
        ..Default::default()
    })
    .await;
    let superuser = env.direct_superuser().await;
    superuser
        .batch_execute(LOOKUP_FUNCTION)
        .await
        .expect("create the lookup function");
    env
}

/// pgrelay whose `auth_user` is the superuser, with PgBouncer's default `auth_query`
/// (reading `pg_shadow` needs a superuser), clients and servers on `auth`.
async fn env_with_default_query(auth: &'static str) -> TestEnv {
    let mut relay_users = EnvOptions::default().relay_users;
    relay_users.push(("postgres".into(), "not-needed".into()));
    start(EnvOptions {
        client_auth: auth,
        server_auth: auth,
        relay_users,
        top_extra: vec!["auth_user = \"postgres\"".into()],
        ..Default::default()
    })
    .await
}

async fn create_role(env: &TestEnv, role: &str, password: &str) {
    env.direct_superuser()
        .await
        .batch_execute(&format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
        .await
        .expect("create role");
}

/// A query in a transaction runs as `user` on a pooled server, which pgrelay logged in
/// to with what the client proved (no plaintext password anywhere).
async fn assert_runs_as(client: &tokio_postgres::Client, user: &str) {
    let rows = support::simple_rows(
        client,
        "BEGIN; SELECT current_user, current_database(); COMMIT",
    )
    .await
    .expect("a transaction through pgrelay");
    assert_eq!(
        rows,
        [[Some(user.to_owned()), Some(APP_DB.to_owned())]],
        "the transaction's row"
    );
}

/// FATAL 28P01 with PostgreSQL's text; returns (severity, code, message with the user
/// name replaced) so that two failures can be compared.
fn password_failure(err: &tokio_postgres::Error, user: &str) -> (String, String, String) {
    let db = support::password_failure(err, user);
    (
        db.severity().to_owned(),
        db.code().code().to_owned(),
        db.message().replace(user, "USER"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_only_the_server_knows_logs_in_and_its_servers_with_the_proved_key() {
    let env = env_with_function().await;
    create_role(&env, ROLE, ROLE_PASSWORD).await;
    let client = env
        .connect(ROLE, ROLE_PASSWORD, APP_DB)
        .await
        .expect("a role found by auth_query logs in");
    assert_runs_as(&client, ROLE).await;
    // A second client shares the pool; several servers log in with the ClientKey.
    let other = env
        .connect(ROLE, ROLE_PASSWORD, APP_DB)
        .await
        .expect("a second login (cached secret)");
    tokio::join!(assert_runs_as(&client, ROLE), assert_runs_as(&other, ROLE));
    let pool = env
        .relay
        .shared
        .pools
        .all()
        .into_iter()
        .find(|p| p.key.user == ROLE)
        .expect("a pool for the role");
    assert!(pool.counts().1 >= 1, "the role's pool opened servers");
    // libpq logs in too.
    let (ok, out, err) = tokio::task::block_in_place(|| psql(&env, ROLE, ROLE_PASSWORD));
    assert!(ok, "psql as a role found by auth_query: {err}");
    assert_eq!(out.trim(), ROLE);
    // The app user's own login is unchanged.
    assert_runs_as(&env.client().await, APP_USER).await;
}

/// Runs `SELECT current_user` with psql through pgrelay: (success, stdout, stderr).
fn psql(env: &TestEnv, user: &str, password: &str) -> (bool, String, String) {
    let out = std::process::Command::new("psql")
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .args(["-X", "-tA", "-h", "127.0.0.1", "-p"])
        .arg(env.port().to_string())
        .args(["-U", user, "-d", APP_DB, "-c", "SELECT current_user"])
        .output()
        .expect("run psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A lookup that fails (here the query itself) is not a wrong password: the client is
/// told the password could not be looked up, and the server it failed on is not
/// handed to anyone else in its failed transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lookup_is_reported_as_such_and_leaves_the_pool_clean() {
    let env = start(EnvOptions {
        top_extra: vec![
            "auth_user = \"app\"".into(),
            "auth_query = \"SELECT usename, passwd FROM public.no_such_table WHERE usename = $1\""
                .into(),
        ],
        ..Default::default()
    })
    .await;
    create_role(&env, ROLE, ROLE_PASSWORD).await;
    let err = env
        .connect(ROLE, ROLE_PASSWORD, APP_DB)
        .await
        .expect_err("the lookup fails");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert_eq!(
        db.message(),
        format!("could not look up the password of user \"{ROLE}\"")
    );
    // The app user's pool, which the lookup used, still serves transactions.
    for _ in 0..3 {
        assert_runs_as(&env.client().await, APP_USER).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_works_after_at_most_one_failed_login() {
    let env = env_with_function().await;
    create_role(&env, ROLE, ROLE_PASSWORD).await;
    let client = env
        .connect(ROLE, ROLE_PASSWORD, APP_DB)
        .await
        .expect("first login");
    assert_runs_as(&client, ROLE).await;
    env.direct_superuser()
        .await
        .batch_execute(&format!("ALTER ROLE {ROLE} PASSWORD 'changed'"))
        .await
        .expect("alter role");
    // The cached secret is the old one: the first login with the new password may
    // fail, and that failure makes the next one fetch the secret again.
    let first = env.connect(ROLE, "changed", APP_DB).await;
    if let Err(err) = &first {
        password_failure(err, ROLE);
    }
    let client = match first {
        Ok(client) => client,
        Err(_) => env
            .connect(ROLE, "changed", APP_DB)
            .await
            .expect("the new password works at the next login"),
    };
    assert_runs_as(&client, ROLE).await;
    let old = env
        .connect(ROLE, ROLE_PASSWORD, APP_DB)
        .await
        .expect_err("the old password no longer works");
    password_failure(&old, ROLE);
    // Servers opened from now on log in with the new key.
    let clients: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| env.connect(ROLE, "changed", APP_DB)))
            .await
            .into_iter()
            .map(|c| c.expect("login with the new password"))
            .collect();
    futures_util::future::join_all(clients.iter().map(|c| assert_runs_as(c, ROLE))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_is_told_what_a_wrong_password_is() {
    let env = env_with_function().await;
    create_role(&env, ROLE, ROLE_PASSWORD).await;
    // Both are asked for SCRAM alike.
    assert_eq!(
        raw::first_auth_request(env.addr, ROLE, APP_DB).await,
        raw::first_auth_request(env.addr, "ghost", APP_DB).await
    );
    let wrong = env
        .connect(ROLE, "not-the-password", APP_DB)
        .await
        .expect_err("a wrong password fails");
    let unknown = env
        .connect("ghost", ROLE_PASSWORD, APP_DB)
        .await
        .expect_err("an unknown user fails");
    assert_eq!(
        password_failure(&wrong, ROLE),
        password_failure(&unknown, "ghost")
    );
    // A database the server does not have: the lookup fails (08006, nothing about
    // the user), and no pool for the client's made-up name stays behind.
    let err = env
        .connect(ROLE, ROLE_PASSWORD, "no_such_db")
        .await
        .expect_err("no such database");
    assert_eq!(support::sqlstate(&err).as_deref(), Some("08006"), "{err}");
    let pools = env.relay.shared.pools.all();
    assert!(pools.iter().all(|p| p.key.database != "no_such_db"));
    // A role created since the failed lookup logs in at once (the miss is forgotten).
    create_role(&env, "ghost", "boo").await;
    let client = env
        .connect("ghost", "boo", APP_DB)
        .await
        .expect("a role created after a failed login");
    assert_runs_as(&client, "ghost").await;
}

/// A client's `search_path` is applied to the pooled servers of its user, the same
/// pool the lookup uses: a `pg_shadow` of the client's own placed before `pg_catalog`
/// must not answer the lookup (PgBouncer's CVE-2025-12819).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_search_path_does_not_reach_the_lookup() {
    let env = env_with_default_query("scram-sha-256").await;
    create_role(&env, ROLE, ROLE_PASSWORD).await;
    create_role(&env, "scratch", "evil-password").await;
    let superuser = env.direct_superuser().await;
    let evil_secret = support::stored_secret(&superuser, "scratch").await;
    superuser
        .batch_execute(&format!(
            "CREATE SCHEMA evil; \
             CREATE TABLE evil.pg_shadow (usename name, passwd text); \
             INSERT INTO evil.pg_shadow VALUES ('{ROLE}', '{evil_secret}')"
        ))
        .await
        .expect("the attacker's pg_shadow");
    // A client of the auth user leaves `search_path = evil, pg_catalog` on the servers
    // of the pool the lookup runs on.
    let mut config: tokio_postgres::Config = env
        .conn_string("postgres", "not-needed", APP_DB)
        .parse()
        .expect("config");
    config.options("-c search_path=evil,pg_catalog");
    let (attacker, _end) = support::connect_watched(&config).await.expect("attacker");
    let shadowed = support::simple_value(
        &attacker,
        &format!("SELECT passwd FROM pg_shadow WHERE usename = '{ROLE}'"),
    )
    .await;
    assert_eq!(
        shadowed, evil_secret,
        "the attacker's path is on the server"
    );
    drop(attacker);
    // The victim's own startup asks for the same path.
    let mut victim: tokio_postgres::Config = env
        .conn_string(ROLE, "evil-password", APP_DB)
        .parse()
        .expect("config");
    victim.options("-c search_path=evil,pg_catalog");
    let refused = victim
        .connect(tokio_postgres::NoTls)
        .await
        .map(drop)
        .expect_err("the attacker's secret must not let anyone in");
    password_failure(&refused, ROLE);
    victim.password(ROLE_PASSWORD);
    let (client, _end) = support::connect_watched(&victim)
        .await
        .expect("the real password works");
    assert_runs_as(&client, ROLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_md5_stored_password_logs_in_with_md5_on_both_sides() {
    let env = env_with_default_query("md5").await;
    env.direct_superuser()
        .await
        .batch_execute(
            "SET password_encryption = 'md5'; CREATE ROLE dave LOGIN PASSWORD 'dave-secret'",
        )
        .await
        .expect("create an md5 role");
    assert_eq!(
        raw::first_auth_request(env.addr, "dave", APP_DB).await,
        Some(5),
        "md5 is asked for an md5 secret"
    );
    let client = env
        .connect("dave", "dave-secret", APP_DB)
        .await
        .expect("md5 login through auth_query");
    assert_runs_as(&client, "dave").await;
    let wrong = env
        .connect("dave", "wrong", APP_DB)
        .await
        .expect_err("wrong md5 password");
    password_failure(&wrong, "dave");
    // A SCRAM secret is still asked for with SCRAM under auth_type = "md5", as
    // PostgreSQL does, and so is a user with no secret (password_encryption's default).
    create_role(&env, ROLE, ROLE_PASSWORD).await;
    assert_eq!(
        raw::first_auth_request(env.addr, ROLE, APP_DB).await,
        Some(10)
    );
    assert_eq!(
        raw::first_auth_request(env.addr, "ghost", APP_DB).await,
        Some(10)
    );
    let unknown = env
        .connect("ghost", "dave-secret", APP_DB)
        .await
        .expect_err("unknown user under md5");
    password_failure(&unknown, "ghost");
    let client = env
        .connect(ROLE, ROLE_PASSWORD, APP_DB)
        .await
        .expect("a SCRAM role under md5");
    assert_runs_as(&client, ROLE).await;
}

/// `[[hba]]` rules apply to users found by auth_query as to listed ones: a `reject`
/// rule for one role refuses it before any lookup is of use, and the rule after it
/// lets another looked-up role and the listed user in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_rules_apply_to_looked_up_users() {
    let rules = format!(
        "[[hba]]\ntype = \"host\"\ndatabase = \"all\"\nuser = \"{ROLE}\"\naddress = \"all\"\n\
         method = \"reject\"\n\n\
         [[hba]]\ntype = \"host\"\ndatabase = \"all\"\nuser = \"all\"\naddress = \"all\"\n\
         method = \"scram-sha-256\"\n"
    );
    let env = start(EnvOptions {
        top_extra: vec![
            "auth_user = \"app\"".into(),
            "auth_query = \"SELECT usename, passwd FROM public.pgrelay_lookup($1)\"".into(),
        ],
        sections: vec![rules],
        ..Default::default()
    })
    .await;
    let superuser = env.direct_superuser().await;
    superuser
        .batch_execute(LOOKUP_FUNCTION)
        .await
        .expect("create the lookup function");
    create_role(&env, ROLE, ROLE_PASSWORD).await;
    create_role(&env, "dave", "dave-secret").await;

    let err = env
        .connect(ROLE, ROLE_PASSWORD, APP_DB)
        .await
        .expect_err("the reject rule");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(
        db.message()
            .starts_with("pg_hba.conf rejects connection for host"),
        "{db:?}"
    );
    let dave = env
        .connect("dave", "dave-secret", APP_DB)
        .await
        .expect("another looked-up role, under the scram rule");
    assert_runs_as(&dave, "dave").await;
    let app = env.client().await;
    assert_runs_as(&app, APP_USER).await;
}
