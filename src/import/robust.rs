//! The importers never write a file pgrelay refuses: random settings, valid or not,
//! give either a checked pgrelay.toml or an error naming a line, never
//! [`ImportError::Invalid`].

use proptest::prelude::*;

use super::{import, ImportError, InputFile, Request};

const VALUES: [&str; 29] = [
    "0",
    "1",
    "2",
    "-1",
    "abc",
    "",
    "*",
    "localhost",
    "on",
    "off",
    "verify-full",
    "require",
    "disable",
    "1.5",
    "99999999999",
    "session",
    "statement",
    "transaction",
    "hba",
    "cert",
    "scram-sha-256",
    "md5",
    "any",
    "'quoted value'",
    "10.0.0.1,localhost",
    "5min",
    "nan",
    "inf",
    "-0.5",
];

const PGBOUNCER_KEYS: [&str; 30] = [
    "listen_addr",
    "listen_port",
    "unix_socket_dir",
    "auth_type",
    "auth_user",
    "auth_query",
    "auth_dbname",
    "admin_users",
    "stats_users",
    "pool_mode",
    "max_client_conn",
    "default_pool_size",
    "min_pool_size",
    "max_db_connections",
    "max_user_connections",
    "query_wait_timeout",
    "server_idle_timeout",
    "server_lifetime",
    "client_login_timeout",
    "server_connect_timeout",
    "query_timeout",
    "client_tls_sslmode",
    "client_tls_cert_file",
    "client_tls_key_file",
    "client_tls_ca_file",
    "server_tls_sslmode",
    "server_tls_ca_file",
    "server_reset_query",
    "max_prepared_statements",
    "auth_hba_file",
];

const PGPOOL_KEYS: [&str; 30] = [
    "listen_addresses",
    "port",
    "socket_dir",
    "num_init_children",
    "connection_life_time",
    "client_idle_limit",
    "authentication_timeout",
    "connect_timeout",
    "reset_query_list",
    "load_balance_mode",
    "master_slave_mode",
    "backend_clustering_mode",
    "disable_load_balance_on_write",
    "write_function_list",
    "delay_threshold",
    "delay_threshold_by_time",
    "sr_check_period",
    "health_check_period",
    "health_check_timeout",
    "health_check_user",
    "health_check_database",
    "health_check_max_retries",
    "failover_command",
    "auto_failback",
    "ssl",
    "ssl_cert",
    "ssl_key",
    "ssl_ca_cert",
    "backend_port1",
    "backend_weight0",
];

fn run(request: Request) -> Result<(), TestCaseError> {
    match import(&request) {
        Err(ImportError::Invalid(err)) => Err(TestCaseError::fail(format!(
            "an invalid file for {:?}: {err}",
            request.main.text
        ))),
        _ => Ok(()),
    }
}

fn input(name: &str, text: String) -> InputFile {
    InputFile {
        name: name.to_owned(),
        text,
    }
}

proptest! {
    // No regression files: the repository's top level holds only its own folders.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn pgbouncer_settings(settings in prop::collection::vec((0..PGBOUNCER_KEYS.len(), 0..VALUES.len()), 0..12),
                          pool_size in 0..VALUES.len()) {
        let mut ini = format!(
            "[databases]\napp = host=db pool_size={}\nro = host=db-replica dbname=app\n\
             [users]\nu = pool_size={}\n[pgbouncer]\n",
            VALUES[pool_size], VALUES[pool_size]
        );
        for (key, value) in settings {
            ini.push_str(&format!("{} = {}\n", PGBOUNCER_KEYS[key], VALUES[value]));
        }
        run(Request {
            main: input("pgbouncer.ini", ini),
            from: None,
            userlist: Some(input("userlist.txt", "\"u\" \"md5f3e4b1a7e9c5d2b8a6f0e1d2c3b4a596\"\n\"abc\" \"pw\"\n".to_owned())),
            hba: Some(input("hba", "hostssl all all 0.0.0.0/0 cert\nhost all all ::/0 md5\n".to_owned())),
            pool_passwd: None,
        })?;
    }

    #[test]
    fn pgpool_settings(settings in prop::collection::vec((0..PGPOOL_KEYS.len(), 0..VALUES.len()), 0..12)) {
        let mut conf = "backend_hostname0 = 'db0'\nbackend_hostname1 = 'db1'\nenable_pool_hba = on\n".to_owned();
        for (key, value) in settings {
            conf.push_str(&format!("{} = {}\n", PGPOOL_KEYS[key], VALUES[value]));
        }
        run(Request {
            main: input("pgpool.conf", conf),
            from: None,
            userlist: None,
            hba: Some(input("hba", "hostssl all all 0.0.0.0/0 cert\nlocal all all trust\n".to_owned())),
            pool_passwd: Some(input("pool_passwd", "abc:TEXTpw\nu:md5f3e4b1a7e9c5d2b8a6f0e1d2c3b4a596\n".to_owned())),
        })?;
    }
}
