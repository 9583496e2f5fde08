//! Pgpool-II's cluster settings: `backend_*N` into `[[backends]]`, health checks, and
//! the failover commands (old and new names), whose placeholders are checked against
//! the ones pgrelay's hooks fill.

use std::collections::BTreeMap;

use super::conf::Setting;
use super::doc::Section;
use super::pgpool::{Import, SOURCE};
use super::secrets::UserSecret;
use super::{duration_text, unmapped, ImportError};

pub(super) fn health(im: &mut Import, users: &[UserSecret]) -> Result<(), ImportError> {
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

pub(super) fn failover(im: &mut Import) -> Result<(), ImportError> {
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

/// `backend_*N` settings into `[[backends]]`, in the order of N (the `%d` of hooks).
pub(super) fn backends(im: &mut Import) -> Result<(), ImportError> {
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
    let mut seen: Vec<(String, String)> = Vec::new();
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
        let port = fields.get("port").map_or("5432", |p| p.value.as_str());
        let endpoint = (host.value.clone(), port.to_owned());
        if let Some(first) = seen.iter().position(|e| *e == endpoint) {
            return Err(ImportError::line(
                im.file,
                host.line,
                format!("the same host and port as backend {first}: list each node once"),
            ));
        }
        seen.push(endpoint);
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
    if let Some(s) = fields
        .get("weight")
        .filter(|_| weight.is_some_and(|w| !(w.is_finite() && w >= 0.0)))
    {
        let why = format!(
            "{} = {:?}: a weight must be a number, 0 or more",
            s.key, s.value
        );
        return Err(ImportError::line(im.file, s.line, why));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert!(unknown_placeholders("/f.sh %d %h %p %D %m %H %M %P %r %R %N %S %%").is_empty());
        assert_eq!(unknown_placeholders("x %a %d %"), ["%a", "%"]);
    }
}
