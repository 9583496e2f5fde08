//! The password files: PgBouncer's `auth_file` (`"user" "secret"` lines) and
//! Pgpool-II's `pool_passwd` (`user:secret` lines, the secret `md5...`,
//! `SCRAM-SHA-256$...`, `TEXT<plaintext>` or `AES<base64>`). Every secret is checked with
//! pgrelay's own parser, so a malformed one is refused with its line.

use crate::config::Secret;

use super::ImportError;

/// One user with the secret to put in its `[[users]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct UserSecret {
    pub name: String,
    pub secret: String,
    pub line: usize,
}

impl UserSecret {
    /// Whether the secret is an md5 hash (which cannot serve `scram-sha-256`).
    pub(super) fn is_md5(&self) -> bool {
        matches!(Secret::parse(&self.secret), Ok(Secret::Md5(_)))
    }
}

/// What a `pool_passwd` line gave that cannot become a `[[users]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Skipped {
    pub name: String,
    pub line: usize,
    pub why: &'static str,
}

/// PgBouncer's `auth_file`: lines of two double-quoted strings (`""` for a quote
/// inside); lines that do not start with `"` are ignored, as PgBouncer does.
pub(super) fn userlist(file: &str, text: &str) -> Result<Vec<UserSecret>, ImportError> {
    let mut users = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if !trimmed.starts_with('"') {
            continue;
        }
        let (name, rest) = quoted(trimmed)
            .ok_or_else(|| ImportError::line(file, line, "the user name's quote is not closed"))?;
        let (secret, rest) = quoted(rest.trim_start()).ok_or_else(|| {
            ImportError::line(file, line, "expected `\"user\" \"secret\"` (both quoted)")
        })?;
        if !rest.trim().is_empty() {
            return Err(ImportError::line(
                file,
                line,
                "unexpected text after `\"user\" \"secret\"`",
            ));
        }
        check_secret(file, line, &secret)?;
        push_unique(&mut users, UserSecret { name, secret, line });
    }
    Ok(users)
}

/// Pgpool-II's `pool_passwd`. AES-encrypted passwords need Pgpool-II's key file to be
/// read, so they are returned as skipped.
pub(super) fn pool_passwd(
    file: &str,
    text: &str,
) -> Result<(Vec<UserSecret>, Vec<Skipped>), ImportError> {
    let mut users = Vec::new();
    let mut skipped = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim_end_matches(['\r', '\n']);
        if trimmed.trim().is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((name, stored)) = trimmed.split_once(':') else {
            return Err(ImportError::line(
                file,
                line,
                "expected `user:secret` (an md5, SCRAM-SHA-256, TEXT or AES secret)",
            ));
        };
        if name.is_empty() {
            return Err(ImportError::line(file, line, "a line without a user name"));
        }
        let name = name.to_owned();
        if stored.starts_with("AES") {
            skipped.push(Skipped {
                name,
                line,
                why: "an AES-encrypted password, which only Pgpool-II's key file (.pgpoolkey) \
                      decrypts: give the user its plaintext (pg_enc shows how it was made) or \
                      its SCRAM secret from pg_authid",
            });
            continue;
        }
        let secret = stored.strip_prefix("TEXT").unwrap_or(stored).to_owned();
        if secret.is_empty() {
            skipped.push(Skipped {
                name,
                line,
                why: "no password",
            });
            continue;
        }
        check_secret(file, line, &secret)?;
        push_unique(&mut users, UserSecret { name, secret, line });
    }
    Ok((users, skipped))
}

/// A `"..."` string at the start of `text` and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let inner = text.strip_prefix('"')?;
    let mut value = String::new();
    let mut chars = inner.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if chars.peek().is_some_and(|(_, c)| *c == '"') {
                chars.next();
                value.push('"');
                continue;
            }
            return Some((value, &inner[i + 1..]));
        }
        value.push(c);
    }
    None
}

fn check_secret(file: &str, line: usize, secret: &str) -> Result<(), ImportError> {
    Secret::parse(secret).map(drop).map_err(|err| {
        // The error names no value, only what is wrong with it.
        ImportError::line(file, line, format!("the secret is malformed: {err}"))
    })
}

/// A user listed twice keeps its last line, as PgBouncer and Pgpool-II read them.
fn push_unique(users: &mut Vec<UserSecret>, user: UserSecret) {
    users.retain(|u| u.name != user.name);
    users.push(user);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAM: &str = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$Q0xJRU5US0VZQ0xJRU5US0VZQ0xJRU5US0VZQ0xJRU4=:U0VSVkVSS0VZU0VSVkVSS0VZU0VSVkVSS0VZU0VSVkU=";

    #[test]
    fn userlist_lines() {
        let text = format!(
            ";; comment\n\"app\" \"{SCRAM}\"\n\"o\"\"dd\" \"md5f3e4b1a7e9c5d2b8a6f0e1d2c3b4a596\"\n\"plain\" \"secret\"\n"
        );
        let users = userlist("u.txt", &text).expect("parse");
        assert_eq!(users.len(), 3);
        assert_eq!(users[1].name, "o\"dd");
        assert!(users[1].is_md5());
        assert!(!users[2].is_md5());
        assert_eq!(users[2].line, 4);
        for bad in [
            "\"app\" secret\n",
            "\"app \"x\"\n",
            "\"a\" \"b\" c\n",
            "\"a\" \"md5abc\"\n",
        ] {
            let err = userlist("u.txt", bad).expect_err(bad);
            assert!(err.to_string().starts_with("u.txt:1: "), "{err}");
        }
    }

    #[test]
    fn pool_passwd_lines() {
        let text = format!("app:{SCRAM}\nadmin:TEXTadmin-secret\nold:AESabcdef==\nmd:md5e5e2b6ef9ef1e1e09e4bf4e0c7c8f0a1\n");
        let (users, skipped) = pool_passwd("p", &text).expect("parse");
        let names: Vec<&str> = users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["app", "admin", "md"]);
        assert_eq!(users[1].secret, "admin-secret");
        assert_eq!(skipped.len(), 1);
        assert_eq!((skipped[0].name.as_str(), skipped[0].line), ("old", 3));
        let err = pool_passwd("p", "app:x\nno colon here\n").expect_err("bad");
        assert!(err.to_string().starts_with("p:2: "), "{err}");
    }
}
