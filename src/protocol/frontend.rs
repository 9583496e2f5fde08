//! Lazy views of the client messages pgrelay looks into, an iterator over the messages
//! of a buffered request, builders for the client messages pgrelay writes to servers
//! itself, and the inspect table the session's client-side scanner uses.
//!
//! Views borrow the message body; nothing here copies SQL text or turns it into a
//! `String`. Builders append to a caller's `BytesMut`.

use bytes::{BufMut, BytesMut};

use super::{header, read_cstr, tag_table, ProtocolError, HEADER_LEN, MAX_MESSAGE_LEN};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const EXECUTE: u8 = b'E';
pub const DESCRIBE: u8 = b'D';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const TERMINATE: u8 = b'X';
pub const FUNCTION_CALL: u8 = b'F';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const PASSWORD: u8 = b'p';

/// Client messages whose body the session reads: Query (its SQL) and Terminate.
pub static INSPECT: [bool; 256] = tag_table(&[QUERY, TERMINATE, PARSE, CLOSE]);

/// With prepared statements carried across servers, Bind and Describe are read too.
pub static INSPECT_PREPARED: [bool; 256] =
    tag_table(&[QUERY, TERMINATE, PARSE, CLOSE, BIND, DESCRIBE]);

/// Every message type a client may send after the startup phase.
pub static KNOWN: [bool; 256] = tag_table(&[
    QUERY,
    PARSE,
    BIND,
    EXECUTE,
    DESCRIBE,
    CLOSE,
    SYNC,
    FLUSH,
    TERMINATE,
    FUNCTION_CALL,
    COPY_DATA,
    COPY_DONE,
    COPY_FAIL,
]);

/// The SQL text of a Query message body (without its terminating NUL).
pub fn query_text(body: &[u8]) -> Result<&[u8], ProtocolError> {
    read_cstr(body)
        .map(|(text, _)| text)
        .ok_or(ProtocolError::Malformed { what: "Query" })
}

/// A password message body: the NUL-terminated password.
pub fn password(body: &[u8]) -> Result<&[u8], ProtocolError> {
    read_cstr(body)
        .map(|(text, _)| text)
        .ok_or(ProtocolError::Malformed {
            what: "PasswordMessage",
        })
}

/// A SASLInitialResponse body: `(mechanism, client-first-message)`.
pub fn sasl_initial(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    const BAD: ProtocolError = ProtocolError::Malformed {
        what: "SASLInitialResponse",
    };
    let (mechanism, rest) = read_cstr(body).ok_or(BAD)?;
    if rest.len() < 4 {
        return Err(BAD);
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    if len < 0 || len as usize != data.len() {
        return Err(BAD);
    }
    Ok((mechanism, data))
}

/// One complete message of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub tag: u8,
    /// The body, after the header.
    pub body: &'a [u8],
    /// The whole message, header included, as it arrived.
    pub bytes: &'a [u8],
}

/// The complete messages at the start of a buffer, in order (see [`messages`]).
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    rest: &'a [u8],
    failed: bool,
}

/// Walks the complete messages at the start of `buf`. A message cut short ends the
/// walk; a bad length yields one error, then ends it.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages {
        rest: buf,
        failed: false,
    }
}

impl<'a> Messages<'a> {
    /// What follows the messages yielded so far.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, ProtocolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let (tag, total) = match header(self.rest, MAX_MESSAGE_LEN) {
            Ok(Some(found)) => found,
            Ok(None) => return None,
            Err(err) => {
                self.failed = true;
                return Some(Err(err));
            }
        };
        let bytes = self.rest.get(..total)?;
        self.rest = &self.rest[total..];
        Some(Ok(Message {
            tag,
            body: &bytes[HEADER_LEN..],
            bytes,
        }))
    }
}

/// A Parse body. Only the name is read up front: the SQL text may be long, and most
/// readers stop at the name or at the text's first words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    /// The statement name (empty: the unnamed statement).
    pub name: &'a [u8],
    /// Everything after the name: the text, its NUL, the parameter count and types.
    pub after_name: &'a [u8],
}

const BAD_PARSE: ProtocolError = ProtocolError::Malformed { what: "Parse" };

impl<'a> Parse<'a> {
    /// The SQL text.
    pub fn text(&self) -> Result<&'a [u8], ProtocolError> {
        read_cstr(self.after_name)
            .map(|(text, _)| text)
            .ok_or(BAD_PARSE)
    }

    /// The parameter count and types, as sent.
    pub fn param_types(&self) -> Result<&'a [u8], ProtocolError> {
        read_cstr(self.after_name)
            .map(|(_, types)| types)
            .ok_or(BAD_PARSE)
    }
}

/// Reads a Parse body's statement name.
pub fn parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let (name, after_name) = read_cstr(body).ok_or(BAD_PARSE)?;
    Ok(Parse { name, after_name })
}

/// A Bind body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Everything after the statement name: formats, parameters, result formats.
    pub after_statement: &'a [u8],
}

/// Reads a Bind body's names.
pub fn bind(body: &[u8]) -> Result<Bind<'_>, ProtocolError> {
    const BAD: ProtocolError = ProtocolError::Malformed { what: "Bind" };
    let (portal, rest) = read_cstr(body).ok_or(BAD)?;
    let (statement, after_statement) = read_cstr(rest).ok_or(BAD)?;
    Ok(Bind {
        portal,
        statement,
        after_statement,
    })
}

impl<'a> Bind<'a> {
    /// Reads the parameter formats, the values and the result formats; the body must
    /// end with them.
    pub fn params(&self) -> Result<BindParams<'a>, ProtocolError> {
        let bad = || ProtocolError::Malformed { what: "Bind" };
        let mut rest = self.after_statement;
        let formats = take_codes(&mut rest).ok_or_else(bad)?;
        let count = take_count(&mut rest).ok_or_else(bad)?;
        let start = rest;
        for _ in 0..count {
            let len = take_i32(&mut rest).ok_or_else(bad)?;
            if len >= 0 {
                rest = rest.get(len as usize..).ok_or_else(bad)?;
            } else if len != -1 {
                return Err(bad());
            }
        }
        let values = &start[..start.len() - rest.len()];
        let results = take_codes(&mut rest).ok_or_else(bad)?;
        if !rest.is_empty() {
            return Err(bad());
        }
        Ok(BindParams {
            formats,
            count,
            values,
            results,
        })
    }
}

/// The parameters of a Bind body (see [`Bind::params`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindParams<'a> {
    /// Parameter format codes, two bytes each.
    formats: &'a [u8],
    count: usize,
    /// For each value, a four-byte length (-1: NULL), then its bytes.
    values: &'a [u8],
    /// Result column format codes, two bytes each.
    results: &'a [u8],
}

impl<'a> BindParams<'a> {
    /// Parameter format codes (0 text, 1 binary): none, one for all, or one each.
    pub fn formats(&self) -> impl Iterator<Item = i16> + 'a {
        codes(self.formats)
    }

    /// How many parameter values there are.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The parameter values (`None`: NULL).
    pub fn values(&self) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        let mut rest = self.values;
        std::iter::from_fn(move || {
            let len = take_i32(&mut rest)?;
            let Ok(len) = usize::try_from(len) else {
                return Some(None);
            };
            let (value, tail) = rest.split_at_checked(len)?;
            rest = tail;
            Some(Some(value))
        })
    }

    /// Result column format codes, as [`BindParams::formats`].
    pub fn result_formats(&self) -> impl Iterator<Item = i16> + 'a {
        codes(self.results)
    }
}

fn take_i32(rest: &mut &[u8]) -> Option<i32> {
    let (head, tail) = rest.split_first_chunk::<4>()?;
    *rest = tail;
    Some(i32::from_be_bytes(*head))
}

/// A two-byte count, not negative.
fn take_count(rest: &mut &[u8]) -> Option<usize> {
    let (head, tail) = rest.split_first_chunk::<2>()?;
    *rest = tail;
    usize::try_from(i16::from_be_bytes(*head)).ok()
}

/// A count of two-byte codes, then the codes: the codes' bytes.
fn take_codes<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let count = take_count(rest)?;
    let (codes, tail) = rest.split_at_checked(count * 2)?;
    *rest = tail;
    Some(codes)
}

fn codes(bytes: &[u8]) -> impl Iterator<Item = i16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| i16::from_be_bytes([c[0], c[1]]))
}

/// What a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `S`: a prepared statement.
    Statement(&'a [u8]),
    /// `P`: a portal.
    Portal(&'a [u8]),
}

impl<'a> Target<'a> {
    /// The statement's name, if it names one.
    pub fn statement(self) -> Option<&'a [u8]> {
        match self {
            Target::Statement(name) => Some(name),
            Target::Portal(_) => None,
        }
    }
}

/// Reads a Describe body.
pub fn describe(body: &[u8]) -> Result<Target<'_>, ProtocolError> {
    target(body, "Describe")
}

/// Reads a Close body.
pub fn close(body: &[u8]) -> Result<Target<'_>, ProtocolError> {
    target(body, "Close")
}

fn target<'a>(body: &'a [u8], what: &'static str) -> Result<Target<'a>, ProtocolError> {
    let bad = || ProtocolError::Malformed { what };
    let (&kind, rest) = body.split_first().ok_or_else(bad)?;
    let (name, _) = read_cstr(rest).ok_or_else(bad)?;
    match kind {
        b'S' => Ok(Target::Statement(name)),
        b'P' => Ok(Target::Portal(name)),
        _ => Err(bad()),
    }
}

/// An Execute body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execute<'a> {
    pub portal: &'a [u8],
    /// Rows to return at most (0: all).
    pub max_rows: i32,
}

/// Reads an Execute body.
pub fn execute(body: &[u8]) -> Result<Execute<'_>, ProtocolError> {
    const BAD: ProtocolError = ProtocolError::Malformed { what: "Execute" };
    let (portal, rest) = read_cstr(body).ok_or(BAD)?;
    let max_rows: [u8; 4] = rest.try_into().map_err(|_| BAD)?;
    Ok(Execute {
        portal,
        max_rows: i32::from_be_bytes(max_rows),
    })
}

/// Checks a Sync body (empty).
pub fn sync(body: &[u8]) -> Result<(), ProtocolError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::Malformed { what: "Sync" })
    }
}

/// Appends a message with `tag` and `body`.
pub fn put_message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
}

/// Appends a Parse of statement `name`; `after_name` is the text, its NUL, the
/// parameter count and types (as [`Parse::after_name`]).
pub fn put_parse(out: &mut BytesMut, name: &[u8], after_name: &[u8]) {
    let start = begin(out, PARSE);
    put_cstr(out, name);
    out.put_slice(after_name);
    finish(out, start);
}

/// Appends a Bind of `portal` to statement `statement`; `after_statement` is the rest
/// of a Bind body (as [`Bind::after_statement`]).
pub fn put_bind(out: &mut BytesMut, portal: &[u8], statement: &[u8], after_statement: &[u8]) {
    let start = begin(out, BIND);
    put_cstr(out, portal);
    put_cstr(out, statement);
    out.put_slice(after_statement);
    finish(out, start);
}

/// Appends a Describe of statement `name`.
pub fn put_describe_statement(out: &mut BytesMut, name: &[u8]) {
    put_statement_message(out, DESCRIBE, name);
}

/// Appends a Close of statement `name`.
pub fn put_close_statement(out: &mut BytesMut, name: &[u8]) {
    put_statement_message(out, CLOSE, name);
}

fn put_statement_message(out: &mut BytesMut, tag: u8, name: &[u8]) {
    let start = begin(out, tag);
    out.put_u8(b'S');
    put_cstr(out, name);
    finish(out, start);
}

fn put_cstr(out: &mut BytesMut, text: &[u8]) {
    out.put_slice(text);
    out.put_u8(0);
}

/// Starts a message whose length is filled in by [`finish`].
fn begin(out: &mut BytesMut, tag: u8) -> usize {
    let start = out.len();
    out.put_u8(tag);
    out.put_u32(0);
    start
}

fn finish(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_message(&mut out, tag, body);
        out.to_vec()
    }

    #[test]
    fn messages_walks_complete_messages() {
        let mut buf = msg(PARSE, b"s1\0select 1\0\0\0");
        buf.extend(msg(SYNC, b""));
        let whole = buf.len();
        buf.extend(&msg(QUERY, b"select 2\0")[..7]);
        let mut walk = messages(&buf);
        let first = walk.next().unwrap().unwrap();
        assert_eq!((first.tag, first.body), (PARSE, &b"s1\0select 1\0\0\0"[..]));
        assert_eq!(first.bytes.len(), first.body.len() + HEADER_LEN);
        assert_eq!(walk.next().unwrap().unwrap().tag, SYNC);
        // The Query is cut short: the walk ends in front of it.
        assert!(walk.next().is_none());
        assert_eq!(walk.rest(), &buf[whole..]);
        assert_eq!(crate::protocol::message_len(&buf), Some(first.bytes.len()));
        assert_eq!(crate::protocol::message_len(&buf[..4]), None);
    }

    #[test]
    fn messages_errors_once_on_a_bad_length() {
        let mut buf = msg(SYNC, b"");
        buf.extend([QUERY, 0, 0, 0, 3]);
        let walk: Vec<_> = messages(&buf).collect();
        assert_eq!(walk.len(), 2);
        assert!(walk[0].is_ok());
        assert_eq!(walk[1], Err(ProtocolError::BadLength { tag: 'Q', len: 3 }));
        assert_eq!(crate::protocol::message_len(&buf[5..]), None);
    }

    #[test]
    fn extended_views() {
        let p = parse(b"s1\0select $1\0\0\x01\0\0\0\x17").unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.text().unwrap(), b"select $1");
        assert_eq!(p.after_name, b"select $1\0\0\x01\0\0\0\x17");
        assert_eq!(p.param_types().unwrap(), b"\0\x01\0\0\0\x17");
        assert_eq!(parse(b"s1\0").unwrap().name, b"s1");
        assert!(parse(b"s1\0select").unwrap().text().is_err());
        assert!(parse(b"s1").is_err());
        let b = bind(b"p\0s1\0\0\0\0\0\0\0").unwrap();
        assert_eq!((b.portal, b.statement), (&b"p"[..], &b"s1"[..]));
        assert_eq!(b.after_statement, b"\0\0\0\0\0\0");
        assert!(bind(b"p\0s1").is_err());
        // One text parameter `42`, one NULL; binary results.
        let b = bind(b"\0s1\0\0\x01\0\0\0\x02\0\0\0\x0242\xff\xff\xff\xff\0\x01\0\x01").unwrap();
        let params = b.params().unwrap();
        assert_eq!(params.formats().collect::<Vec<_>>(), [0]);
        assert_eq!(params.len(), 2);
        assert_eq!(
            params.values().collect::<Vec<_>>(),
            [Some(&b"42"[..]), None]
        );
        assert_eq!(params.result_formats().collect::<Vec<_>>(), [1]);
        assert!(bind(b"\0s1\0\0\0\0\x01\0\0\0\x05ab\0\0")
            .unwrap()
            .params()
            .is_err());
        assert!(bind(b"\0s1\0\0\0\0\0\0\0x").unwrap().params().is_err());
        assert_eq!(describe(b"Ss1\0").unwrap(), Target::Statement(b"s1"));
        assert_eq!(close(b"Pp\0").unwrap(), Target::Portal(b"p"));
        assert_eq!(close(b"Pp\0").unwrap().statement(), None);
        assert!(describe(b"Xs1\0").is_err());
        assert!(close(b"").is_err());
        let e = execute(b"p\0\0\0\0\x05").unwrap();
        assert_eq!((e.portal, e.max_rows), (&b"p"[..], 5));
        assert!(execute(b"p\0\0\0").is_err());
        assert!(sync(b"").is_ok() && sync(b"x").is_err());
    }

    #[test]
    fn builders_round_trip_through_views() {
        let mut out = BytesMut::new();
        put_parse(&mut out, b"s1", b"select 1\0\0\0");
        put_bind(&mut out, b"", b"s1", b"\0\0\0\0\0\0");
        put_describe_statement(&mut out, b"s1");
        put_close_statement(&mut out, b"s1");
        let walk: Vec<_> = messages(&out).map(Result::unwrap).collect();
        assert_eq!(walk.len(), 4);
        assert_eq!(parse(walk[0].body).unwrap().text().unwrap(), b"select 1");
        assert_eq!(bind(walk[1].body).unwrap().statement, b"s1");
        assert_eq!(describe(walk[2].body).unwrap(), Target::Statement(b"s1"));
        assert_eq!(
            (walk[3].tag, close(walk[3].body).unwrap()),
            (CLOSE, Target::Statement(&b"s1"[..]))
        );
        assert!(messages(&out).rest().len() == out.len());
    }

    #[test]
    fn views() {
        assert_eq!(query_text(b"select 1\0").unwrap(), b"select 1");
        assert!(query_text(b"select 1").is_err());
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend(3i32.to_be_bytes());
        body.extend(b"abc");
        assert_eq!(
            sasl_initial(&body).unwrap(),
            (&b"SCRAM-SHA-256"[..], &b"abc"[..])
        );
        body.push(b'x');
        assert!(sasl_initial(&body).is_err());
    }

    proptest::proptest! {
        /// Whatever names and bodies pgrelay writes, the views read them back, and the
        /// walk finds each message whole.
        #[test]
        fn builders_and_views_agree(
            name in proptest::collection::vec(1u8..=255, 0..20),
            text in proptest::collection::vec(1u8..=255, 0..40),
            rest in proptest::collection::vec(proptest::num::u8::ANY, 0..20),
        ) {
            let mut after_name = text.clone();
            after_name.push(0);
            after_name.extend(&rest);
            let mut out = BytesMut::new();
            put_parse(&mut out, &name, &after_name);
            put_bind(&mut out, &name, &name, &rest);
            put_describe_statement(&mut out, &name);
            put_close_statement(&mut out, &name);
            let walk: Vec<_> = messages(&out).collect::<Result<_, _>>().unwrap();
            proptest::prop_assert_eq!(walk.len(), 4);
            let p = parse(walk[0].body).unwrap();
            proptest::prop_assert_eq!(p.name, &name[..]);
            proptest::prop_assert_eq!(p.text().unwrap(), &text[..]);
            proptest::prop_assert_eq!(p.param_types().unwrap(), &rest[..]);
            let b = bind(walk[1].body).unwrap();
            proptest::prop_assert_eq!((b.portal, b.statement), (&name[..], &name[..]));
            proptest::prop_assert_eq!(b.after_statement, &rest[..]);
            proptest::prop_assert_eq!(describe(walk[2].body).unwrap(), Target::Statement(&name));
            proptest::prop_assert_eq!(close(walk[3].body).unwrap(), Target::Statement(&name));
        }
    }
}
