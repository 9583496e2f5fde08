//! Session parameters as sets that can be compared cheaply and reconciled: what a
//! client expects (its startup settings and every reported value it has been told) and
//! what a server currently has.
//!
//! In transaction mode a client moves between servers; before its request runs, the
//! server's set is made equal to the client's with one `set_config`/`RESET` query. A
//! fingerprint makes the common case (nothing differs) one integer comparison.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Param {
    /// The name as the server spells it (`TimeZone`), for ParameterStatus messages.
    name: String,
    value: String,
    /// The server reports changes of it with ParameterStatus.
    reported: bool,
}

/// Parameters keyed by lower-case name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamSet {
    /// Shared until written: most clients' sets are their pool's defaults, and a set of
    /// a dozen parameters costs a few KiB per idle client when copied.
    entries: Arc<BTreeMap<String, Param>>,
    /// Hash of every settable `(name, value)`; equal sets have equal fingerprints.
    fingerprint: u64,
    /// `in_hot_standby` is `on`: read on every checkout, so kept at hand.
    hot_standby: bool,
}

/// Reported parameters that describe the server are not reconciled.
fn settable(key: &str) -> bool {
    crate::protocol::backend::reported_parameter(key).is_none_or(|p| p.settable)
}

impl ParamSet {
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The server says it is a hot standby (`in_hot_standby`, PostgreSQL 14 and later).
    pub fn hot_standby(&self) -> bool {
        self.hot_standby
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let param = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.entries.get(&name.to_ascii_lowercase())
        } else {
            // The common case, and the per-request one: no key to allocate.
            self.entries.get(name)
        };
        param.map(|p| p.value.as_str())
    }

    /// Records a ParameterStatus value.
    pub fn set_reported(&mut self, name: &str, value: &str) {
        self.insert(name, value, true);
    }

    /// Records a setting the server does not report (set by pgrelay or the client).
    pub fn set_unreported(&mut self, name: &str, value: &str) {
        let reported = self
            .entries
            .get(&name.to_ascii_lowercase())
            .is_some_and(|p| p.reported);
        self.insert(name, value, reported);
    }

    fn insert(&mut self, name: &str, value: &str, reported: bool) {
        let key = name.to_ascii_lowercase();
        let param = Param {
            name: name.to_owned(),
            value: value.to_owned(),
            reported,
        };
        if self.entries.get(&key) != Some(&param) {
            Arc::make_mut(&mut self.entries).insert(key, param);
            self.rehash();
        }
    }

    pub fn remove(&mut self, name: &str) {
        let key = name.to_ascii_lowercase();
        if self.entries.contains_key(&key) {
            Arc::make_mut(&mut self.entries).remove(&key);
            self.rehash();
        }
    }

    fn rehash(&mut self) {
        let mut hasher = DefaultHasher::new();
        for (key, param) in self.entries.iter() {
            if settable(key) {
                key.hash(&mut hasher);
                param.value.hash(&mut hasher);
            }
        }
        self.fingerprint = hasher.finish();
        self.hot_standby = self.get("in_hot_standby") == Some("on");
    }

    /// Takes every reported value of `server` (after the client's settings were applied
    /// there, these are the normalized forms the client must be told).
    pub fn adopt_reported(&mut self, server: &ParamSet) {
        // The common case at login: the server's set is all reported values (a pool's
        // defaults) and has every value the client asked for, so the result is that
        // set: shared rather than copied.
        let all_reported = server.entries.values().all(|p| p.reported);
        let covered = self.entries.iter().all(|(key, param)| {
            server
                .entries
                .get(key)
                .is_some_and(|p| p.value == param.value)
        });
        if all_reported && covered {
            *self = server.clone();
            return;
        }
        for param in server.entries.values().filter(|p| p.reported) {
            self.insert(&param.name, &param.value, true);
        }
    }

    /// Every reported `(name, value)`, for the ParameterStatus burst at login.
    pub fn reported(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .values()
            .filter(|p| p.reported)
            .map(|p| (p.name.as_str(), p.value.as_str()))
    }

    /// Whether every settable value of `self` (a client's wish) equals `other`'s.
    pub fn satisfied_by(&self, other: &ParamSet) -> bool {
        self.entries
            .iter()
            .filter(|(k, _)| settable(k))
            .all(|(k, p)| other.entries.get(k).is_some_and(|o| o.value == p.value))
    }

    /// The query that turns a server with `self` into one with `desired`, if any differ.
    /// Values go through `set_config` as E'' literals, so they mean exactly what they
    /// would in a startup packet and cannot break out of the literal.
    pub fn reconcile_sql(&self, desired: &ParamSet) -> Option<String> {
        let mut sets = Vec::new();
        for (key, want) in desired.entries.iter().filter(|(k, _)| settable(k)) {
            if self.entries.get(key).map(|p| &p.value) != Some(&want.value) {
                sets.push(format!(
                    "pg_catalog.set_config({}, {}, false)",
                    literal(&want.name),
                    literal(&want.value)
                ));
            }
        }
        let resets: Vec<&str> = self
            .entries
            .iter()
            .filter(|(k, p)| !p.reported && settable(k) && !desired.entries.contains_key(*k))
            .map(|(k, _)| k.as_str())
            .collect();
        if sets.is_empty() && resets.is_empty() {
            return None;
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            sql = format!("SELECT {}", sets.join(", "));
        }
        for key in resets {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str("RESET ");
            sql.push_str(key);
        }
        Some(sql)
    }

    /// After `reconcile_sql(desired)` ran: the unreported values are now `desired`'s.
    /// (Reported ones arrive as ParameterStatus.) A setting the client made without
    /// knowing it is reported (a startup `client_encoding=utf8`) keeps the server's
    /// reported entry: its normalized value (`UTF8`) is what the client must be told,
    /// and the server sends no ParameterStatus when the value did not change.
    pub fn record_reconciled(&mut self, desired: &ParamSet) {
        let stale: Vec<String> = self
            .entries
            .iter()
            .filter(|(k, p)| !p.reported && !desired.entries.contains_key(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            Arc::make_mut(&mut self.entries).remove(&key);
        }
        for (key, param) in desired.entries.iter().filter(|(_, p)| !p.reported) {
            if !self.entries.get(key).is_some_and(|p| p.reported) {
                self.insert(&param.name, &param.value, false);
            }
        }
        self.rehash();
    }

    /// Every `(name, value, reported)`, to hand a client's set to another process.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str, bool)> {
        self.entries
            .values()
            .map(|p| (p.name.as_str(), p.value.as_str(), p.reported))
    }

    /// The set [`ParamSet::entries`] listed.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str, bool)>) -> Self {
        let mut set = ParamSet::default();
        for (name, value, reported) in entries {
            set.insert(name, value, reported);
        }
        set
    }

    /// Forgets unreported settings (after `DISCARD ALL` / `RESET ALL`).
    pub fn clear_unreported(&mut self) {
        if self.entries.values().any(|p| !p.reported) {
            Arc::make_mut(&mut self.entries).retain(|_, p| p.reported);
            self.rehash();
        }
    }
}

/// An escape-string literal: `E'...'` is read the same whatever
/// `standard_conforming_strings` says.
pub(crate) fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str("E'");
    for c in text.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_standby_follows_its_parameter() {
        let mut params = ParamSet::default();
        assert!(!params.hot_standby());
        params.set_reported("in_hot_standby", "on");
        assert!(params.hot_standby());
        params.set_reported("in_hot_standby", "off");
        assert!(!params.hot_standby());
    }

    #[test]
    fn equal_sets_need_nothing() {
        let mut a = ParamSet::default();
        a.set_reported("TimeZone", "UTC");
        let mut b = ParamSet::default();
        b.set_reported("TimeZone", "UTC");
        b.set_reported("server_version", "15.1");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.reconcile_sql(&b), None);
    }

    #[test]
    fn reconcile_sets_and_resets() {
        let mut server = ParamSet::default();
        server.set_reported("TimeZone", "UTC");
        server.set_unreported("statement_timeout", "5s");
        let mut client = ParamSet::default();
        client.set_reported("TimeZone", "Europe/Paris");
        client.set_unreported("search_path", "a,'b\\");
        let sql = server.reconcile_sql(&client).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'search_path', E'a,\\'b\\\\', false), \
             pg_catalog.set_config(E'TimeZone', E'Europe/Paris', false); RESET statement_timeout"
        );
        server.record_reconciled(&client);
        server.set_reported("TimeZone", "Europe/Paris");
        assert_eq!(server.fingerprint(), client.fingerprint());
    }

    #[test]
    fn reconciling_keeps_reported_normal_forms() {
        let mut server = ParamSet::default();
        server.set_reported("client_encoding", "UTF8");
        let mut client = ParamSet::default();
        client.set_unreported("client_encoding", "utf8");
        client.set_unreported("statement_timeout", "1234");
        server.record_reconciled(&client);
        assert_eq!(server.get("client_encoding"), Some("UTF8"));
        assert_eq!(server.get("statement_timeout"), Some("1234"));
        client.adopt_reported(&server);
        assert_eq!(
            client.reported().collect::<Vec<_>>(),
            vec![("client_encoding", "UTF8")]
        );
        assert_eq!(server.fingerprint(), client.fingerprint());
    }

    #[test]
    fn adopt_takes_normalized_values() {
        let mut client = ParamSet::default();
        client.set_unreported("client_encoding", "utf8");
        let mut server = ParamSet::default();
        server.set_reported("client_encoding", "UTF8");
        client.adopt_reported(&server);
        assert_eq!(client.get("CLIENT_ENCODING"), Some("UTF8"));
        assert_eq!(
            client.reported().collect::<Vec<_>>(),
            vec![("client_encoding", "UTF8")]
        );
    }

    #[test]
    fn adopting_a_pools_defaults_shares_them_until_written() {
        let mut defaults = ParamSet::default();
        defaults.set_reported("TimeZone", "UTC");
        defaults.set_reported("client_encoding", "UTF8");
        let mut client = ParamSet::default();
        client.set_unreported("TimeZone", "UTC");
        client.adopt_reported(&defaults);
        assert!(Arc::ptr_eq(&client.entries, &defaults.entries));
        assert_eq!(client, defaults);
        client.set_reported("TimeZone", "Europe/Paris");
        assert_eq!(defaults.get("TimeZone"), Some("UTC"));
        assert_eq!(client.get("timezone"), Some("Europe/Paris"));
        assert_ne!(client.fingerprint(), defaults.fingerprint());

        // A value of the client's own that the server lacks: copied, as before.
        let mut other = ParamSet::default();
        other.set_unreported("statement_timeout", "5s");
        other.adopt_reported(&defaults);
        assert!(!Arc::ptr_eq(&other.entries, &defaults.entries));
        assert_eq!(other.get("statement_timeout"), Some("5s"));
        assert_eq!(other.get("TimeZone"), Some("UTC"));
    }
}
