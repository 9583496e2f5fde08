//! The token scanner behind the classifier: PostgreSQL's lexical rules over raw bytes,
//! borrowing every token from the input so that ordinary statements cost no allocation.
//! It only has to be right about token boundaries; it never checks grammar.

/// One lexical token. Literals carry no text: the classifier never looks inside them,
/// which is exactly why keywords hidden in strings and comments cannot fool it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token<'a> {
    /// An unquoted keyword or identifier, as written (compare with [`is`]).
    Word(&'a [u8]),
    /// A quoted identifier's body, with any `""` still doubled.
    Quoted(&'a [u8]),
    /// A string literal of any kind (`'..'`, `E'..'`, `$tag$..$tag$`, ...).
    Str,
    Number,
    /// A `$n` parameter.
    Param,
    /// `::`, so that a type name after it is not mistaken for a function.
    Cast,
    /// Any other byte: punctuation or one byte of an operator.
    Punct(u8),
}

/// Whether an unquoted word is the given (lower-case) keyword.
pub(super) fn is(word: &[u8], keyword: &str) -> bool {
    word.eq_ignore_ascii_case(keyword.as_bytes())
}

pub(super) struct Lexer<'a> {
    sql: &'a [u8],
    pos: usize,
    /// How plain `'...'` strings treat backslashes: PostgreSQL's
    /// `standard_conforming_strings`, which the classifier cannot see, so a string whose
    /// meaning depends on it is lexed both ways (see [`Lexer::backslash_in_string`]).
    backslash_escapes: bool,
    /// Set when a plain string contained a backslash, so that the other reading of
    /// `standard_conforming_strings` could split the text differently.
    pub(super) backslash_in_string: bool,
    /// Set when the text ends inside a string, quoted identifier or comment: PostgreSQL
    /// would reject it, and the classifier will not guess what the client meant.
    pub(super) unterminated: bool,
}

pub(super) use crate::protocol::is_space;

impl<'a> Lexer<'a> {
    pub(super) fn new(sql: &'a [u8], backslash_escapes: bool) -> Self {
        Lexer {
            sql,
            pos: 0,
            backslash_escapes,
            backslash_in_string: false,
            unterminated: false,
        }
    }

    /// Skips white space and comments, returning the comments' text: the caller reads
    /// routing hints from the comments before the first statement.
    pub(super) fn skip_space_and_comments(&mut self, mut comment: impl FnMut(&[u8])) {
        loop {
            let rest = &self.sql[self.pos..];
            match rest {
                [c, ..] if is_space(*c) => self.pos += 1,
                [b'-', b'-', ..] => {
                    let len = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
                    comment(&rest[..len]);
                    self.pos += len;
                }
                [b'/', b'*', ..] => {
                    let start = self.pos;
                    self.skip_block_comment();
                    comment(&self.sql[start..self.pos]);
                }
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
        self.unterminated = true;
    }

    pub(super) fn next_token(&mut self) -> Option<Token<'a>> {
        self.skip_space_and_comments(|_| ());
        let start = self.pos;
        let first = *self.sql.get(start)?;
        let second = self.sql.get(start + 1).copied();
        let token = match first {
            b'"' => {
                self.pos += 1;
                let body = self.quoted_body(b'"', false);
                Token::Quoted(body)
            }
            b'\'' => {
                self.pos += 1;
                self.quoted_body(b'\'', self.backslash_escapes);
                Token::Str
            }
            b'e' | b'E' if second == Some(b'\'') => {
                self.pos += 2;
                self.quoted_body(b'\'', true);
                Token::Str
            }
            b'b' | b'B' | b'x' | b'X' | b'n' | b'N' if second == Some(b'\'') => {
                self.pos += 2;
                self.quoted_body(b'\'', self.backslash_escapes);
                Token::Str
            }
            b'u' | b'U' if second == Some(b'&') && self.sql.get(start + 2) == Some(&b'\'') => {
                // In U& strings a backslash starts a Unicode escape, never a quote.
                self.pos += 3;
                self.quoted_body(b'\'', false);
                Token::Str
            }
            b'u' | b'U' if second == Some(b'&') && self.sql.get(start + 2) == Some(&b'"') => {
                self.pos += 3;
                Token::Quoted(self.quoted_body(b'"', false))
            }
            b'$' => return Some(self.dollar()),
            b':' if second == Some(b':') => {
                self.pos += 2;
                Token::Cast
            }
            b'0'..=b'9' => self.number(),
            b'.' if second.is_some_and(|c| c.is_ascii_digit()) => self.number(),
            c if is_ident_start(c) => {
                let len = self.sql[start..]
                    .iter()
                    .position(|&c| !is_ident_char(c))
                    .unwrap_or(self.sql.len() - start);
                self.pos += len;
                Token::Word(&self.sql[start..start + len])
            }
            c => {
                self.pos += 1;
                Token::Punct(c)
            }
        };
        Some(token)
    }

    /// Consumes up to and including the closing quote (doubled quotes stay inside) and
    /// returns the body.
    fn quoted_body(&mut self, quote: u8, backslash_escapes: bool) -> &'a [u8] {
        let start = self.pos;
        while let Some(&c) = self.sql.get(self.pos) {
            if c == b'\\' && backslash_escapes {
                self.pos += 2;
                continue;
            }
            if c == b'\\' && quote == b'\'' {
                self.backslash_in_string = true;
            }
            self.pos += 1;
            if c == quote {
                if self.sql.get(self.pos) == Some(&quote) {
                    self.pos += 1;
                } else {
                    return &self.sql[start..self.pos - 1];
                }
            }
        }
        self.pos = self.sql.len();
        self.unterminated = true;
        &self.sql[start..]
    }

    /// `$1` is a parameter; `$$...$$` and `$tag$...$tag$` are strings; a lone `$` is
    /// punctuation.
    fn dollar(&mut self) -> Token<'a> {
        let start = self.pos;
        let rest = &self.sql[start + 1..];
        if rest.first().is_some_and(u8::is_ascii_digit) {
            let len = rest
                .iter()
                .position(|c| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            self.pos += 1 + len;
            return Token::Param;
        }
        let tag_len = rest
            .iter()
            .position(|&c| !(is_ident_char(c) && c != b'$'))
            .unwrap_or(rest.len());
        if rest.get(tag_len) != Some(&b'$') {
            self.pos += 1;
            return Token::Punct(b'$');
        }
        let delimiter = &self.sql[start..start + tag_len + 2];
        let body_start = start + tag_len + 2;
        match find(&self.sql[body_start..], delimiter) {
            Some(end) => self.pos = body_start + end + delimiter.len(),
            None => {
                self.pos = self.sql.len();
                self.unterminated = true;
            }
        }
        Token::Str
    }

    /// Digits with an optional fraction and exponent. Letters right after a number are
    /// left for the next token, as PostgreSQL before 15 reads `1into` as `1 into`.
    fn number(&mut self) -> Token<'a> {
        let rest = &self.sql[self.pos..];
        let mut len = rest
            .iter()
            .position(|&c| !(c.is_ascii_digit() || c == b'.' || c == b'_'))
            .unwrap_or(rest.len());
        if matches!(rest.get(len), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(rest.get(len + 1), Some(b'+' | b'-')));
            if rest.get(len + 1 + sign).is_some_and(u8::is_ascii_digit) {
                len += 1 + sign;
                len += rest[len..]
                    .iter()
                    .position(|c| !c.is_ascii_digit())
                    .unwrap_or(rest.len() - len);
            }
        }
        self.pos += len;
        Token::Number
    }
}

/// The tokens of one statement: ends at `;` or at the end of the text.
pub(super) struct Statement<'l, 'a> {
    lexer: &'l mut Lexer<'a>,
    done: bool,
    /// Whether the statement ended with the text rather than at a `;`.
    pub(super) last: bool,
}

impl<'l, 'a> Statement<'l, 'a> {
    pub(super) fn new(lexer: &'l mut Lexer<'a>) -> Self {
        Statement {
            lexer,
            done: false,
            last: false,
        }
    }

    pub(super) fn next(&mut self) -> Option<Token<'a>> {
        if self.done {
            return None;
        }
        match self.lexer.next_token() {
            Some(Token::Punct(b';')) => {
                self.done = true;
                None
            }
            None => {
                self.done = true;
                self.last = true;
                None
            }
            token => token,
        }
    }

    pub(super) fn drain(&mut self) {
        while self.next().is_some() {}
    }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An identifier's name as PostgreSQL folds it: unquoted words lower-cased, quoted ones
/// kept with `""` undoubled.
pub(super) fn identifier(token: Token<'_>) -> Option<String> {
    match token {
        Token::Word(w) => Some(String::from_utf8_lossy(w).to_lowercase()),
        Token::Quoted(q) => Some(String::from_utf8_lossy(q).replace("\"\"", "\"")),
        _ => None,
    }
}
