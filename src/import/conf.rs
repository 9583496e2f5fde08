//! Pgpool-II's pgpool.conf syntax (PostgreSQL's): `key = value` (the `=` may be left
//! out), values bare or in single quotes (`''` or `\'` for a quote), `#` comments,
//! also after a value. A key set twice keeps its last value, as in Pgpool-II.

use super::ImportError;

/// One setting as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Setting {
    /// Lowercased.
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// Every setting of the file, in order, a repeated key only at its last line.
pub(super) fn parse(file: &str, text: &str) -> Result<Vec<Setting>, ImportError> {
    let mut settings: Vec<Setting> = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let Some((key, value)) =
            parse_line(raw).map_err(|why| ImportError::line(file, line, why))?
        else {
            continue;
        };
        settings.retain(|s| s.key != key);
        settings.push(Setting { key, value, line });
    }
    Ok(settings)
}

/// `None` for a blank or comment line.
fn parse_line(raw: &str) -> Result<Option<(String, String)>, String> {
    let text = raw.trim_start();
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let key_end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(text.len());
    if key_end == 0 {
        return Err(format!("expected `name = value`, found {:?}", text.trim()));
    }
    let key = text[..key_end].to_ascii_lowercase();
    let mut rest = text[key_end..].trim_start();
    if let Some(after) = rest.strip_prefix('=') {
        rest = after.trim_start();
    }
    let (value, rest) = if let Some(quoted) = rest.strip_prefix('\'') {
        quoted_value(quoted).ok_or_else(|| format!("the quoted value of {key} is not closed"))?
    } else {
        let end = rest
            .find(|c: char| c.is_whitespace() || c == '#')
            .unwrap_or(rest.len());
        if end == 0 {
            return Err(format!("{key} has no value"));
        }
        (rest[..end].to_owned(), &rest[end..])
    };
    let rest = rest.trim();
    if !rest.is_empty() && !rest.starts_with('#') {
        // A password's value is never repeated in a message.
        let shown = if super::is_secret(&key) {
            String::new()
        } else {
            format!(": {rest:?}")
        };
        return Err(format!(
            "unexpected text after the value of {key}{shown} (quote a value with spaces)"
        ));
    }
    Ok(Some((key, value)))
}

/// The value up to the closing quote, and what follows it.
fn quoted_value(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => value.push(chars.next()?.1),
            '\'' if chars.peek().is_some_and(|(_, c)| *c == '\'') => {
                chars.next();
                value.push('\'');
            }
            '\'' => return Some((value, &text[i + 1..])),
            c => value.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_bare_quoted_and_commented() {
        let text = "# intro\nport = 5432\nlisten_addresses = '*'   # all\n\
                    log_line_prefix = '%t: pid %p: '\nchild_life_time 5min\n\
                    reset_query_list = 'ABORT; DISCARD ALL'\nreset_query_list = 'DISCARD ALL'\n\
                    x = 'it''s \\'ok\\''\nPORT=9999\n";
        let settings = parse("p.conf", text).expect("parse");
        let get = |k: &str| {
            settings
                .iter()
                .find(|s| s.key == k)
                .map(|s| (s.value.as_str(), s.line))
        };
        assert_eq!(get("port"), Some(("9999", 9)));
        assert_eq!(get("listen_addresses"), Some(("*", 3)));
        assert_eq!(get("log_line_prefix"), Some(("%t: pid %p: ", 4)));
        assert_eq!(get("child_life_time"), Some(("5min", 5)));
        assert_eq!(get("reset_query_list"), Some(("DISCARD ALL", 7)));
        assert_eq!(get("x"), Some(("it's 'ok'", 8)));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for (text, line) in [
            ("port = 5432\nbackend_hostname0 = 'db\n", 2),
            ("this is not a setting\n", 1),
            ("= 5\n", 1),
            ("sr_check_password = two words\n", 1),
            ("\n\nport =\n", 3),
        ] {
            let err = parse("p.conf", text).expect_err(text);
            assert!(
                err.to_string().starts_with(&format!("p.conf:{line}: ")),
                "{err}"
            );
            assert!(
                !err.to_string().contains("words"),
                "a password shown: {err}"
            );
        }
    }
}
