//! PgBouncer's ini syntax: `[section]` headers, `key = value` lines, comments starting
//! with `;` or `#`, and the `key=value key='quoted value'` connection strings of
//! `[databases]` and `[users]`. `%include` is refused: the importer reads one file.

use super::ImportError;

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Setting {
    /// The section, lowercased (`databases`, `users`, `pgbouncer`, ...).
    pub section: String,
    /// The key: lowercased in `[pgbouncer]`, as written elsewhere (database and user
    /// names are case-sensitive).
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// Every setting of the file, in order.
pub(super) fn parse(file: &str, text: &str) -> Result<Vec<Setting>, ImportError> {
    let mut section: Option<String> = None;
    let mut settings = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
            continue;
        }
        if trimmed.starts_with("%include") {
            return Err(ImportError::line(
                file,
                line,
                "%include is not followed: put the included file's lines in its place and \
                 import the result",
            ));
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let name = rest.strip_suffix(']').ok_or_else(|| {
                ImportError::line(file, line, "a section header must end with ']'")
            })?;
            section = Some(name.trim().to_ascii_lowercase());
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(ImportError::line(
                file,
                line,
                "expected `key = value` or a [section]".to_owned(),
            ));
        };
        let Some(section) = section.clone() else {
            return Err(ImportError::line(
                file,
                line,
                "a setting before any [section]",
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(ImportError::line(file, line, "a setting without a name"));
        }
        let key = if section == "pgbouncer" {
            key.to_ascii_lowercase()
        } else {
            unquote_name(key)
        };
        let value =
            unquote_value(value.trim()).map_err(|why| ImportError::line(file, line, why))?;
        settings.push(Setting {
            section,
            key,
            value,
            line,
        });
    }
    Ok(settings)
}

/// A database or user name, which may be written in double quotes.
fn unquote_name(key: &str) -> String {
    match key.strip_prefix('"').and_then(|k| k.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => key.to_owned(),
    }
}

/// A value that is one quoted string ('...' or "...") loses its quotes; anything else
/// is kept as written (connection strings keep their inner quotes for [`pairs`]).
fn unquote_value(value: &str) -> Result<String, String> {
    for quote in ['\'', '"'] {
        if value.starts_with(quote) && value.len() >= 2 && value.ends_with(quote) {
            let inner = &value[1..value.len() - 1];
            let doubled = format!("{quote}{quote}");
            if !inner.replace(&doubled, "").contains(quote) {
                return Ok(inner.replace(&doubled, &quote.to_string()));
            }
        }
    }
    Ok(value.to_owned())
}

/// The `key=value` pairs of a connection string; values may be `'quoted'` (with `\'`
/// or `''` for a quote inside).
pub(super) fn pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // Not quoting the word: it may be the rest of an unquoted password.
            let after = out
                .last()
                .map_or(String::new(), |(k, _)| format!(" after {k}="));
            return Err(format!(
                "expected key=value{after} in the connection string (quote a value with \
                 spaces: key='a b')"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("the quoted value of {key} is not closed")),
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') if chars.next_if_eq(&'\'').is_some() => value.push('\''),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        out.push((key.to_ascii_lowercase(), value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_comments_and_values() {
        let text = ";; comment\n[databases]\nMyDb = host=h port=5433\n\"odd name\" = dbname=x\n\
                    # another\n[PgBouncer]\nListen_Port = 6432\nauth_query = 'SELECT 1'\n";
        let settings = parse("f.ini", text).expect("parse");
        assert_eq!(settings.len(), 4);
        assert_eq!(settings[0].key, "MyDb");
        assert_eq!(settings[0].value, "host=h port=5433");
        assert_eq!(settings[1].key, "odd name");
        assert_eq!(settings[2].section, "pgbouncer");
        assert_eq!(settings[2].key, "listen_port");
        assert_eq!(settings[2].line, 7);
        assert_eq!(settings[3].value, "SELECT 1");
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for (text, line) in [
            ("[databases\n", 1),
            ("[pgbouncer]\nlisten_port 6432\n", 2),
            ("listen_port = 6432\n", 1),
            ("[pgbouncer]\n\n%include /etc/other.ini\n", 3),
        ] {
            let err = parse("f.ini", text).expect_err(text);
            assert!(
                err.to_string().starts_with(&format!("f.ini:{line}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn connection_strings() {
        let got = pairs("host=db port=5432 connect_query='SELECT ''a'', \\'b\\'' dbname = x")
            .expect("pairs");
        assert_eq!(
            got,
            [
                ("host".to_owned(), "db".to_owned()),
                ("port".to_owned(), "5432".to_owned()),
                ("connect_query".to_owned(), "SELECT 'a', 'b'".to_owned()),
                ("dbname".to_owned(), "x".to_owned()),
            ]
        );
        assert!(pairs("host").is_err());
        let err = pairs("host=h password=two words").expect_err("unquoted");
        assert!(
            err.contains("after password=") && !err.contains("words"),
            "{err}"
        );
        assert!(pairs("password='open").is_err());
        assert_eq!(pairs("").expect("empty"), []);
    }
}
