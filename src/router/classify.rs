//! Lexical SQL classification: a token scanner over the raw bytes of a statement that
//! skips white space and comments, never allocates for a statement it does not match,
//! and never needs valid UTF-8.
//!
//! For now it recognizes the commands that need a database free of other sessions
//! (`DROP DATABASE x`, `ALTER DATABASE x RENAME`, `CREATE DATABASE ... TEMPLATE x`), so
//! pgrelay can close its own idle server connections to `x` first.

/// A lexical token: a keyword or identifier (unquoted, lower-cased when compared), a
/// quoted identifier, or a single punctuation byte.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a [u8]),
    Quoted(Vec<u8>),
    Punct(u8),
}

struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn new(sql: &'a [u8]) -> Self {
        Lexer { sql, pos: 0 }
    }

    fn skip_space_and_comments(&mut self) {
        loop {
            let rest = &self.sql[self.pos..];
            match rest {
                [c, ..] if c.is_ascii_whitespace() => self.pos += 1,
                [b'-', b'-', ..] => {
                    self.pos += rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
                }
                [b'/', b'*', ..] => self.skip_block_comment(),
                _ => return,
            }
        }
    }

    /// Block comments nest in PostgreSQL.
    fn skip_block_comment(&mut self) {
        let mut depth = 0usize;
        while self.pos < self.sql.len() {
            match &self.sql[self.pos..] {
                [b'/', b'*', ..] => {
                    depth += 1;
                    self.pos += 2;
                }
                [b'*', b'/', ..] => {
                    depth -= 1;
                    self.pos += 2;
                    if depth == 0 {
                        return;
                    }
                }
                _ => self.pos += 1,
            }
        }
    }

    fn next_token(&mut self) -> Option<Token<'a>> {
        self.skip_space_and_comments();
        let start = self.pos;
        let first = *self.sql.get(start)?;
        if first == b'"' {
            return Some(self.quoted());
        }
        if first.is_ascii_alphabetic() || first == b'_' || first >= 0x80 {
            let len = self.sql[start..]
                .iter()
                .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80))
                .unwrap_or(self.sql.len() - start);
            self.pos += len;
            return Some(Token::Word(&self.sql[start..start + len]));
        }
        self.pos += 1;
        Some(Token::Punct(first))
    }

    fn quoted(&mut self) -> Token<'a> {
        let mut out = Vec::new();
        self.pos += 1;
        while let Some(&c) = self.sql.get(self.pos) {
            self.pos += 1;
            if c == b'"' {
                if self.sql.get(self.pos) == Some(&b'"') {
                    out.push(b'"');
                    self.pos += 1;
                } else {
                    break;
                }
            } else {
                out.push(c);
            }
        }
        Token::Quoted(out)
    }
}

fn is_word(token: &Option<Token<'_>>, keyword: &str) -> bool {
    matches!(token, Some(Token::Word(w)) if w.eq_ignore_ascii_case(keyword.as_bytes()))
}

/// The name a token stands for, folded as PostgreSQL folds unquoted identifiers.
fn identifier(token: Option<Token<'_>>) -> Option<String> {
    match token? {
        Token::Word(w) => Some(String::from_utf8_lossy(w).to_lowercase()),
        Token::Quoted(q) => Some(String::from_utf8_lossy(&q).into_owned()),
        Token::Punct(_) => None,
    }
}

/// The database a statement needs free of other sessions, if it is `DROP DATABASE`,
/// `ALTER DATABASE ... RENAME` or `CREATE DATABASE ... TEMPLATE`.
pub fn database_needing_exclusive_use(sql: &[u8]) -> Option<String> {
    // Runs on every Query: most start with a letter that rules these commands out.
    let first = sql.iter().find(|b| !b.is_ascii_whitespace())?;
    if !matches!(first.to_ascii_lowercase(), b'd' | b'a' | b'c' | b'/' | b'-') {
        return None;
    }
    let mut lexer = Lexer::new(sql);
    let verb = lexer.next_token();
    let is_drop = is_word(&verb, "drop");
    if !(is_drop || is_word(&verb, "alter") || is_word(&verb, "create")) {
        return None;
    }
    if !is_word(&lexer.next_token(), "database") {
        return None;
    }
    if is_drop {
        let mut name = lexer.next_token();
        if is_word(&name, "if") {
            lexer.next_token();
            name = lexer.next_token();
        }
        return identifier(name);
    }
    if is_word(&verb, "alter") {
        let name = identifier(lexer.next_token())?;
        return is_word(&lexer.next_token(), "rename").then_some(name);
    }
    // CREATE DATABASE name [WITH] ... TEMPLATE [=] template ...
    loop {
        let token = lexer.next_token()?;
        if is_word(&Some(token), "template") {
            let mut name = lexer.next_token();
            if name == Some(Token::Punct(b'=')) {
                name = lexer.next_token();
            }
            return identifier(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_exclusive_database_commands() {
        let cases: &[(&str, Option<&str>)] = &[
            ("DROP DATABASE foo", Some("foo")),
            ("drop database if exists \"Foo\" with (force)", Some("Foo")),
            (
                "/* hi */ -- x\n DROP /* a /* nested */ b */ DATABASE Bar;",
                Some("bar"),
            ),
            ("ALTER DATABASE foo RENAME TO bar", Some("foo")),
            ("ALTER DATABASE foo SET work_mem = '1MB'", None),
            ("CREATE DATABASE c TEMPLATE = tpl", Some("tpl")),
            (
                "create database c with owner x template tpl encoding 'UTF8'",
                Some("tpl"),
            ),
            ("CREATE DATABASE c", None),
            ("SELECT 'DROP DATABASE x'", None),
            ("DROP TABLE x", None),
            ("", None),
        ];
        for (sql, want) in cases {
            assert_eq!(
                database_needing_exclusive_use(sql.as_bytes()).as_deref(),
                *want,
                "{sql}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = database_needing_exclusive_use(&data);
        }
    }
}
