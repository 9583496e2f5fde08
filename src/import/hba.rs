//! pg_hba.conf-style rules (Pgpool-II's `pool_hba.conf`, PgBouncer's `auth_hba_file`)
//! into `[[hba]]` entries. A rule pgrelay cannot apply as written is left out with a
//! comment when leaving it out can only refuse more (an allowing rule: connections it
//! matched fall to the rules below it, as they would for a host it does not name), and
//! becomes `reject` or an error otherwise, so an import never opens access.

use crate::config::Cidr;

use super::doc::{Doc, Section};
use super::ImportError;

/// One rule as read, before it is judged against the rest of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rule {
    pub kind: String,
    pub database: String,
    pub user: String,
    pub address: Option<String>,
    pub method: String,
    /// Options after the method (`clientcert=1`), as written.
    pub options: String,
    pub line: usize,
}

/// What the output's `[tls]` allows.
#[derive(Debug, Clone, Copy)]
pub(super) struct TlsSide {
    /// `tls.client_mode` is not `disable`.
    pub tls_on: bool,
    /// `tls.client_ca` is set.
    pub client_ca: bool,
}

/// Reads the rules of `text`; a line with too few fields, an unknown type or an
/// address that is neither a CIDR, an address with a mask, nor a keyword is refused.
pub(super) fn parse(file: &str, text: &str) -> Result<Vec<Rule>, ImportError> {
    let mut rules = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let content = raw.split('#').next().unwrap_or("");
        let fields: Vec<String> = content
            .split_whitespace()
            .map(|f| f.trim_matches('"').to_owned())
            .collect();
        if fields.is_empty() {
            continue;
        }
        let err = |why: String| ImportError::line(file, line, why);
        let kind = fields[0].to_ascii_lowercase();
        let needs_address = match kind.as_str() {
            "local" => false,
            "host" | "hostssl" | "hostnossl" => true,
            other => return Err(err(format!("unknown connection type {other:?}"))),
        };
        let min = if needs_address { 5 } else { 4 };
        if fields.len() < min {
            return Err(err(format!(
                "a {kind} rule needs {} fields: type, database, user,{} method",
                min,
                if needs_address { " address," } else { "" }
            )));
        }
        let mut next = 3;
        let address = if needs_address {
            let (address, used) = address(&fields[3..]).map_err(err)?;
            next += used;
            Some(address)
        } else {
            None
        };
        let method = fields
            .get(next)
            .ok_or_else(|| err("the rule has no method".to_owned()))?
            .to_ascii_lowercase();
        rules.push(Rule {
            kind,
            database: fields[1].clone(),
            user: fields[2].clone(),
            address,
            method,
            options: fields[next + 1..].join(" "),
            line,
        });
    }
    Ok(rules)
}

/// The address field (and a separate netmask, `10.0.0.0 255.0.0.0`), as a CIDR or a
/// keyword, and how many fields it took.
fn address(fields: &[String]) -> Result<(String, usize), String> {
    let first = &fields[0];
    if let (Ok(ip), Some(Ok(mask))) = (
        first.parse::<std::net::IpAddr>(),
        fields.get(1).map(|m| m.parse::<std::net::IpAddr>()),
    ) {
        let prefix = match mask {
            std::net::IpAddr::V4(m) => u32::from(m).leading_ones(),
            std::net::IpAddr::V6(m) => u128::from(m).leading_ones(),
        };
        return Ok((format!("{ip}/{prefix}"), 2));
    }
    Ok((first.clone(), 1))
}

/// Adds the rules to `doc` as `[[hba]]` entries, with a comment for each one changed
/// or left out. A reject rule that cannot be carried is an error.
pub(super) fn add_rules(
    doc: &mut Doc,
    file: &str,
    rules: &[Rule],
    tls: TlsSide,
) -> Result<(), ImportError> {
    doc.note(
        Section::Hba,
        format!("[[hba]]: the rules of {file}, in order; the first that matches decides"),
    );
    for rule in rules {
        let at = format!("{file}:{}", rule.line);
        if let Some(why) = unusable(rule, tls) {
            if rule.method == "reject" {
                return Err(ImportError::line(
                    file,
                    rule.line,
                    format!("a reject rule pgrelay cannot apply ({why}); leaving it out would let in what it refuses: rewrite it"),
                ));
            }
            doc.note(Section::Hba, format!("{at}: rule left out: {why}"));
            continue;
        }
        let entry = doc.push(Section::Hba);
        let method = match rule.method.as_str() {
            "trust" | "reject" | "md5" | "scram-sha-256" | "password" | "cert" => {
                rule.method.clone()
            }
            other => {
                entry.note(format!(
                    "{at}: method {other:?} is not supported by pgrelay (it has trust, \
                     password, md5, scram-sha-256, cert): these connections are refused"
                ));
                "reject".to_owned()
            }
        };
        if !rule.options.is_empty() {
            entry.note(format!("{at}: options not carried over: {}", rule.options));
        }
        entry.set("type", rule.kind.as_str());
        entry.set("database", rule.database.as_str());
        entry.set("user", rule.user.as_str());
        if let Some(address) = &rule.address {
            entry.set("address", address.as_str());
        }
        entry.set("method", method);
    }
    Ok(())
}

/// Why pgrelay cannot apply `rule` at all, if it cannot.
fn unusable(rule: &Rule, tls: TlsSide) -> Option<String> {
    for (column, names) in [("database", &rule.database), ("user", &rule.user)] {
        for name in names.split(',') {
            if name.starts_with('+') || name.starts_with('@') {
                return Some(format!(
                    "{column} {name:?}: groups (+) and files (@) are not supported, list the names"
                ));
            }
            let keyword = match name {
                "samerole" | "samegroup" => true,
                "replication" => column == "database",
                "sameuser" => column == "user",
                "" => true,
                _ => false,
            };
            if keyword {
                return Some(format!("{column} {name:?} is not supported"));
            }
        }
    }
    if let Some(address) = &rule.address {
        if address != "all" && Cidr::parse(address).is_err() {
            return Some(format!(
                "address {address:?}: host names, samehost and samenet are not supported, \
                 give a CIDR range"
            ));
        }
    }
    if rule.kind == "hostssl" && !tls.tls_on {
        return Some("a hostssl rule, and TLS towards clients is off".to_owned());
    }
    if rule.method == "cert" && (rule.kind != "hostssl" || !tls.client_ca) {
        return Some("method cert needs a hostssl rule and a client CA (tls.client_ca)".to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rules_with_masks_and_comments() {
        let text = "# TYPE DATABASE USER ADDRESS METHOD\nlocal all all trust\n\
                    host production app 10.0.0.0 255.0.0.0 scram-sha-256 # app\n\
                    host all all ::/0 md5 clientcert=verify-ca\n";
        let rules = parse("hba", text).expect("parse");
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].address, None);
        assert_eq!(rules[1].address.as_deref(), Some("10.0.0.0/8"));
        assert_eq!(rules[1].method, "scram-sha-256");
        assert_eq!(rules[1].line, 3);
        assert_eq!(rules[2].options, "clientcert=verify-ca");
    }

    #[test]
    fn refuses_lines_it_cannot_read() {
        for (text, line) in [
            ("hosts all all 0.0.0.0/0 md5\n", 1),
            ("\nhost all all md5\n", 2),
            ("local all\n", 1),
        ] {
            let err = parse("hba", text).expect_err(text);
            assert!(
                err.to_string().starts_with(&format!("hba:{line}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn leaves_out_allowing_rules_and_refuses_rejects_it_cannot_apply() {
        let tls = TlsSide {
            tls_on: false,
            client_ca: false,
        };
        let rules = parse(
            "hba",
            "host all +admins 10.0.0.0/8 md5\nhost all all db.example md5\nhost all all 0.0.0.0/0 ldap\n",
        )
        .expect("parse");
        let mut doc = Doc::default();
        add_rules(&mut doc, "hba", &rules, tls).expect("add");
        let text = doc.render();
        assert_eq!(doc.entries(Section::Hba).len(), 1, "{text}");
        assert!(text.contains("hba:1: rule left out"), "{text}");
        assert!(text.contains("method = \"reject\""), "{text}");
        let reject = parse("hba", "host all all samenet reject\n").expect("parse");
        let err = add_rules(&mut Doc::default(), "hba", &reject, tls).expect_err("reject");
        assert!(err.to_string().starts_with("hba:1: "), "{err}");
    }
}
