//! Lazy views of the client messages pgrelay looks into, and the inspect table the
//! session's client-side scanner uses.
//!
//! Views borrow the message body; nothing here copies SQL text or turns it into a
//! `String`.

use super::{read_cstr, tag_table, ProtocolError};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
