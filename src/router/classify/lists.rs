//! The classifier's built-in word lists: functions known to write or to leave session
//! state, functions known to be safe on a standby, and keywords that take parentheses
//! without being function calls. Names are lower-case; each list is sorted so lookups
//! are a binary search with no allocation.

use std::collections::HashSet;

/// Functions that change the database, the cluster or another session, or that need a
/// transaction id: a standby rejects or cannot honour them. `pg_backend_pid` is here
/// too: in session mode a client's BackendKeyData is its primary server's, and the pid
/// it reads must agree with it (and with NOTIFY sender pids).
pub(super) const WRITE_FUNCTIONS: &[&str] = &[
    "currval",
    "dblink_exec",
    "lastval",
    "lo_close",
    "lo_creat",
    "lo_create",
    "lo_export",
    "lo_from_bytea",
    "lo_get",
    "lo_import",
    "lo_lseek",
    "lo_lseek64",
    "lo_open",
    "lo_put",
    "lo_tell",
    "lo_tell64",
    "lo_truncate",
    "lo_truncate64",
    "lo_unlink",
    "lo_write",
    "loread",
    "lowrite",
    "nextval",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_backend_pid",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_cancel_backend",
    "pg_create_logical_replication_slot",
    "pg_create_physical_replication_slot",
    "pg_create_restore_point",
    "pg_current_xact_id",
    "pg_drop_replication_slot",
    "pg_logical_emit_message",
    "pg_notify",
    "pg_promote",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_start_backup",
    "pg_stat_reset",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters",
    "pg_stop_backup",
    "pg_switch_wal",
    "pg_terminate_backend",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "setval",
    "txid_current",
];

/// Functions that release advisory locks: they write (a standby has no locks to
/// release), and may end a client's pin to its server.
pub(super) const ADVISORY_UNLOCKS: &[&str] = &[
    "pg_advisory_unlock",
    "pg_advisory_unlock_all",
    "pg_advisory_unlock_shared",
];

/// Functions that take session-level advisory locks: they outlive the transaction, so
/// the client must stay on the server that ran them (until it unlocks).
pub(super) const SESSION_ADVISORY_LOCKS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Other functions whose effect outlives the transaction in the session that called
/// them (`set_config(.., false)`, the random seed, dblink connections), so the client
/// must stay on the server that ran them.
pub(super) const SESSION_FUNCTIONS: &[&str] = &[
    "dblink_connect",
    "dblink_connect_u",
    "set_config",
    "setseed",
];

/// Every function of [`SESSION_ADVISORY_LOCKS`], [`ADVISORY_UNLOCKS`] and
/// [`SESSION_FUNCTIONS`] has one of these in its name (a test checks): a text without
/// any of them calls none of those functions, so its calls need no look.
const SESSION_CALL_MARKERS: &[&str] = &["advisory", "dblink_connect", "set_config", "setseed"];

/// The bytes a marker starts with, in either case.
const MARKER_FIRSTS: [bool; 256] = {
    let mut firsts = [false; 256];
    let mut i = 0;
    while i < SESSION_CALL_MARKERS.len() {
        let first = SESSION_CALL_MARKERS[i].as_bytes()[0];
        firsts[first as usize] = true;
        firsts[first.to_ascii_uppercase() as usize] = true;
        i += 1;
    }
    firsts
};

/// Whether `sql` may call a function that leaves session state or releases it. One
/// pass over the bytes: only a marker's first letter (in either case) costs a compare.
pub(super) fn may_call_session_function(sql: &[u8]) -> bool {
    if !sql.contains(&b'(') {
        return false;
    }
    sql.iter().enumerate().any(|(i, &b)| {
        MARKER_FIRSTS[usize::from(b)]
            && SESSION_CALL_MARKERS.iter().any(|marker| {
                sql.get(i..i + marker.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(marker.as_bytes()))
            })
    })
}

/// Functions that are safe on a standby, so ordinary queries need no catalog lookup.
/// Some are volatile (`random`, `clock_timestamp`) but only read.
pub(super) const READ_FUNCTIONS: &[&str] = &[
    "abs",
    "age",
    "array_agg",
    "array_append",
    "array_cat",
    "array_length",
    "array_lower",
    "array_position",
    "array_positions",
    "array_prepend",
    "array_remove",
    "array_to_json",
    "array_to_string",
    "array_upper",
    "ascii",
    "avg",
    "bit_and",
    "bit_length",
    "bit_or",
    "bool_and",
    "bool_or",
    "btrim",
    "cardinality",
    "ceil",
    "ceiling",
    "char_length",
    "character_length",
    "chr",
    "clock_timestamp",
    "col_description",
    "concat",
    "concat_ws",
    "count",
    "cume_dist",
    "current_database",
    "current_schema",
    "current_setting",
    "date_bin",
    "date_part",
    "date_trunc",
    "decode",
    "dense_rank",
    "encode",
    "every",
    "exp",
    "first_value",
    "floor",
    "format",
    "format_type",
    "gen_random_uuid",
    "generate_series",
    "generate_subscripts",
    "grouping",
    "has_table_privilege",
    "inet_client_addr",
    "inet_server_addr",
    "inet_server_port",
    "initcap",
    "isfinite",
    "json_agg",
    "json_array_length",
    "json_build_array",
    "json_build_object",
    "json_each",
    "json_extract_path",
    "json_extract_path_text",
    "json_object",
    "json_object_agg",
    "json_typeof",
    "jsonb_agg",
    "jsonb_array_elements",
    "jsonb_array_length",
    "jsonb_build_array",
    "jsonb_build_object",
    "jsonb_each",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "jsonb_insert",
    "jsonb_object_agg",
    "jsonb_path_query",
    "jsonb_pretty",
    "jsonb_set",
    "jsonb_strip_nulls",
    "jsonb_typeof",
    "lag",
    "last_value",
    "lead",
    "left",
    "length",
    "ln",
    "log",
    "lower",
    "lpad",
    "ltrim",
    "make_date",
    "make_interval",
    "make_timestamp",
    "max",
    "md5",
    "min",
    "mod",
    "mode",
    "now",
    "nth_value",
    "ntile",
    "num_nonnulls",
    "num_nulls",
    "obj_description",
    "octet_length",
    "percent_rank",
    "percentile_cont",
    "percentile_disc",
    "pg_column_size",
    "pg_database_size",
    "pg_get_constraintdef",
    "pg_get_expr",
    "pg_get_indexdef",
    "pg_get_viewdef",
    "pg_is_in_recovery",
    "pg_last_wal_receive_lsn",
    "pg_last_wal_replay_lsn",
    "pg_last_xact_replay_timestamp",
    "pg_postmaster_start_time",
    "pg_relation_size",
    "pg_size_pretty",
    "pg_sleep",
    "pg_table_is_visible",
    "pg_total_relation_size",
    "pg_typeof",
    "power",
    "quote_ident",
    "quote_literal",
    "quote_nullable",
    "random",
    "rank",
    "regexp_match",
    "regexp_matches",
    "regexp_replace",
    "regexp_split_to_array",
    "regexp_split_to_table",
    "repeat",
    "replace",
    "reverse",
    "right",
    "round",
    "row_number",
    "row_to_json",
    "rpad",
    "rtrim",
    "sha256",
    "sign",
    "split_part",
    "sqrt",
    "statement_timestamp",
    "stddev",
    "string_agg",
    "string_to_array",
    "strpos",
    "substr",
    "sum",
    "timeofday",
    "to_char",
    "to_date",
    "to_hex",
    "to_json",
    "to_jsonb",
    "to_number",
    "to_timestamp",
    "transaction_timestamp",
    "trunc",
    "unnest",
    "upper",
    "variance",
    "version",
    "width_bucket",
];

/// Words that may be followed by `(` without calling a function: SQL syntax, type
/// names with modifiers, and the special forms PostgreSQL parses as keywords.
pub(super) const PAREN_KEYWORDS: &[&str] = &[
    "all",
    "and",
    "any",
    "array",
    "as",
    "between",
    "bigint",
    "bit",
    "by",
    "case",
    "cast",
    "char",
    "character",
    "coalesce",
    "collation",
    "cube",
    "current_time",
    "current_timestamp",
    "dec",
    "decimal",
    "distinct",
    "else",
    "except",
    "exists",
    "extract",
    "filter",
    "float",
    "for",
    "from",
    "greatest",
    "group",
    "grouping",
    "having",
    "ilike",
    "in",
    "intersect",
    "interval",
    "is",
    "join",
    "lateral",
    "least",
    "like",
    "limit",
    "localtime",
    "localtimestamp",
    "materialized",
    "nchar",
    "normalize",
    "not",
    "nullif",
    "numeric",
    "offset",
    "on",
    "only",
    "or",
    "over",
    "overlay",
    "partition",
    "position",
    "recursive",
    "returning",
    "rollup",
    "row",
    "rows",
    "select",
    "sets",
    "similar",
    "some",
    "substring",
    "then",
    "time",
    "timestamp",
    "treat",
    "trim",
    "union",
    "using",
    "values",
    "varchar",
    "varying",
    "when",
    "where",
    "window",
    "with",
    "within",
    "xmlattributes",
    "xmlconcat",
    "xmlelement",
    "xmlexists",
    "xmlforest",
    "xmlparse",
    "xmlpi",
    "xmlroot",
    "xmlserialize",
    "xmltable",
];

/// What calling a function means, for routing and for the session it runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FunctionKind {
    /// Takes a session-level advisory lock: primary, and the client stays on the
    /// server that holds it until it unlocks.
    SessionLock,
    /// Leaves other state in the session that the server cannot be asked about
    /// (`set_config`, `setseed`, dblink connections): primary, and the client stays on
    /// that server for good. The function's name, as listed.
    SessionState(&'static str),
    /// Releases advisory locks: writes (a standby has none), and may end a pin.
    Unlock,
    Write,
    Read,
    /// Neither built in nor configured: the router asks `pg_proc`.
    Unknown,
}

/// What the built-in lists of functions that write or leave session state say of a
/// folded function name, if they list it. No configuration overrides them.
pub(super) fn builtin_kind(name: &[u8]) -> Option<FunctionKind> {
    if let Ok(i) = SESSION_FUNCTIONS.binary_search_by(|probe| probe.as_bytes().cmp(name)) {
        Some(FunctionKind::SessionState(SESSION_FUNCTIONS[i]))
    } else if contains(SESSION_ADVISORY_LOCKS, name) {
        Some(FunctionKind::SessionLock)
    } else if contains(ADVISORY_UNLOCKS, name) {
        Some(FunctionKind::Unlock)
    } else if contains(WRITE_FUNCTIONS, name) {
        Some(FunctionKind::Write)
    } else {
        None
    }
}

/// The built-in lists plus the configured ones, as folded names.
#[derive(Debug, Default)]
pub(super) struct Lists {
    write: HashSet<Box<[u8]>>,
    read: HashSet<Box<[u8]>>,
}

impl Lists {
    pub(super) fn new(write: &[String], read: &[String]) -> Lists {
        Lists {
            write: write.iter().map(|name| fold_config_name(name)).collect(),
            read: read.iter().map(|name| fold_config_name(name)).collect(),
        }
    }

    /// The built-in lists are checked before the configured read-only list, so that
    /// configuration cannot make `nextval` or an advisory lock run on a standby.
    pub(super) fn kind(&self, name: &[u8]) -> FunctionKind {
        match builtin_kind(name) {
            Some(kind) => kind,
            None if self.write.contains(name) => FunctionKind::Write,
            None if contains(READ_FUNCTIONS, name) || self.read.contains(name) => {
                FunctionKind::Read
            }
            None => FunctionKind::Unknown,
        }
    }
}

/// A configured function name, folded as PostgreSQL folds the name in a call: the last
/// part of a qualified name, lower-cased unless written in double quotes.
fn fold_config_name(name: &str) -> Box<[u8]> {
    // A quoted last part may itself contain dots.
    let name = name.trim();
    if let Some(start) = name.strip_suffix('"').and_then(|n| n.rfind(".\"")) {
        return fold_config_name(&name[start + 1..]);
    }
    if let Some(quoted) = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        return quoted.replace("\"\"", "\"").into_bytes().into_boxed_slice();
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    last.to_ascii_lowercase().into_bytes().into_boxed_slice()
}

/// Whether `name` (already folded) is in a sorted list.
pub(super) fn contains(list: &[&str], name: &[u8]) -> bool {
    list.binary_search_by(|probe| probe.as_bytes().cmp(name))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_sorted_and_disjoint() {
        for list in [
            WRITE_FUNCTIONS,
            ADVISORY_UNLOCKS,
            SESSION_ADVISORY_LOCKS,
            SESSION_FUNCTIONS,
            READ_FUNCTIONS,
            PAREN_KEYWORDS,
        ] {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "{:?}", list);
        }
        for name in READ_FUNCTIONS {
            assert!(!contains(WRITE_FUNCTIONS, name.as_bytes()), "{name}");
            assert!(!contains(SESSION_FUNCTIONS, name.as_bytes()), "{name}");
            assert!(!contains(SESSION_ADVISORY_LOCKS, name.as_bytes()), "{name}");
            assert!(!contains(ADVISORY_UNLOCKS, name.as_bytes()), "{name}");
        }
    }

    #[test]
    fn session_functions_carry_a_marker() {
        for list in [SESSION_ADVISORY_LOCKS, ADVISORY_UNLOCKS, SESSION_FUNCTIONS] {
            for name in list {
                assert!(may_call_session_function(
                    format!("select {name}(1)").as_bytes()
                ));
            }
        }
        assert!(!may_call_session_function(b"select advisory"));
        assert!(!may_call_session_function(b"select f(1)"));
        assert!(may_call_session_function(b"SELECT PG_ADVISORY_LOCK(1)"));
        assert!(may_call_session_function(b"select x(1), SetSeed(0.5)"));
        assert!(may_call_session_function(b"select dblink_connect('x')"));
    }

    #[test]
    fn configured_names_fold_like_postgres() {
        let lists = Lists::new(
            &["My_Fn".into(), "s.Other".into(), "\"Quoted\"".into()],
            &["nextval".into(), "safe".into()],
        );
        assert_eq!(lists.kind(b"my_fn"), FunctionKind::Write);
        assert_eq!(lists.kind(b"other"), FunctionKind::Write);
        assert_eq!(lists.kind(b"Quoted"), FunctionKind::Write);
        assert_eq!(lists.kind(b"quoted"), FunctionKind::Unknown);
        assert_eq!(lists.kind(b"nextval"), FunctionKind::Write);
        assert_eq!(lists.kind(b"safe"), FunctionKind::Read);
        assert_eq!(lists.kind(b"pg_advisory_lock"), FunctionKind::SessionLock);
        assert_eq!(
            lists.kind(b"set_config"),
            FunctionKind::SessionState("set_config")
        );
        assert_eq!(lists.kind(b"pg_advisory_unlock"), FunctionKind::Unlock);
    }
}
