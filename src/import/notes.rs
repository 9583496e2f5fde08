//! Why a setting is not carried over: for each PgBouncer and Pgpool-II setting with no
//! pgrelay equivalent, the section its comment goes to and the sentence it says.

use super::doc::Section;

/// Where the comment for a `[pgbouncer]` key with no equivalent goes, and why.
pub(super) fn pgbouncer(key: &str) -> (Section, &'static str) {
    let logs = "pgrelay logs to stderr (level: PGRELAY_LOG; log_format = \"json\" for JSON) \
                and counts at metrics_listen's /metrics";
    let sockets = "socket tuning pgrelay leaves to the operating system";
    match key {
        "logfile" | "pidfile" | "syslog" | "syslog_facility" | "syslog_ident" | "log_connections"
        | "log_disconnections" | "log_pooler_errors" | "log_stats" | "verbose" | "stats_period" => {
            (Section::Top, logs)
        }
        "listen_backlog" | "pkt_buf" | "sbuf_loopcnt" | "so_reuseport" | "tcp_defer_accept"
        | "tcp_socket_buffer" | "tcp_keepalive" | "tcp_keepcnt" | "tcp_keepidle"
        | "tcp_keepintvl" | "tcp_user_timeout" => (Section::Top, sockets),
        "dns_max_ttl" | "dns_zone_check_period" | "dns_nxdomain_ttl" | "resolv_conf" => {
            (Section::Top, "pgrelay resolves backend host names with the system resolver")
        }
        "unix_socket_mode" | "unix_socket_group" => (
            Section::Top,
            "pgrelay makes its socket 0777: restrict access with the directory's permissions",
        ),
        "user" => (Section::Top, "pgrelay does not change its Unix user: start it as the user it should run as"),
        "reserve_pool_size" | "reserve_pool_timeout" => {
            (Section::Pool, "no reserve pool: raise default_pool_size instead")
        }
        "server_check_query" | "server_check_delay" => (
            Section::Pool,
            "pgrelay checks servers with [health_check] probes (a login and pg_is_in_recovery()) \
             rather than a query on idle pool connections",
        ),
        "server_reset_query_always" => (
            Section::Pool,
            "pgrelay runs server_reset_query in session mode only; transaction mode carries \
             session state instead of resetting it",
        ),
        "ignore_startup_parameters" => (
            Section::Pool,
            "not needed: pgrelay accepts every startup parameter (extra_float_digits, options, \
             search_path...) and applies it on each server the client uses",
        ),
        "track_extra_parameters" => {
            (Section::Pool, "not needed: pgrelay tracks every reported parameter and startup setting")
        }
        "server_round_robin" => (Section::Routing, "reads are spread by routing.load_balance and backends' weight"),
        "max_packet_size" => (
            Section::Limits,
            "different meaning: limits.max_request_buffer (default 16 MiB) bounds one request \
             buffered before a server is chosen, not one packet; raise it for larger requests \
             outside transactions",
        ),
        "client_tls_protocols" | "client_tls_ciphers" | "client_tls_dheparams"
        | "client_tls_ecdhcurve" | "server_tls_protocols" | "server_tls_ciphers" => (
            Section::Tls,
            "pgrelay uses rustls: TLS 1.2 and 1.3 with its default cipher suites, not configurable",
        ),
        "server_tls_key_file" | "server_tls_cert_file" => {
            (Section::Tls, "pgrelay presents no client certificate to PostgreSQL")
        }
        "server_fast_close" | "server_login_retry" => (
            Section::Pool,
            "no equivalent: a server that cannot be reached fails the request that needed it \
             (08006), and health checks take its node out of service",
        ),
        "autodb_idle_timeout" => (Section::Pool, "pgrelay closes idle servers after server_idle_timeout"),
        "application_name_add_host" => (
            Section::Top,
            "no equivalent: SHOW CLIENTS in the admin console shows each client's address",
        ),
        "disable_pqexec" => (Section::Top, "no equivalent: pgrelay relays multi-statement queries"),
        "service_name" | "job_name" => (Section::Top, "Windows service names: not used"),
        "suspend_timeout" => (
            Section::Pool,
            "no online restart (SUSPEND/RESUME): pgrelay drains on SIGTERM for pool.shutdown_timeout",
        ),
        _ => (Section::Top, "no equivalent in pgrelay (or not known to the importer); not carried over"),
    }
}

/// Where the comment for a key with no equivalent goes, and why.
pub(super) fn pgpool(key: &str) -> (Section, &'static str) {
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
