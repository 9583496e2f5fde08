//! Lazy views of the server messages pgrelay inspects (ReadyForQuery, ParameterStatus,
//! ErrorResponse, BackendKeyData) and builders for the messages pgrelay writes itself.
//!
//! Builders append to a caller's `BytesMut` using pgwire's message types.

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{
    CommandComplete, ErrorResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{Authentication, NegotiateProtocolVersion, ParameterStatus};
use pgwire::messages::Message;

use super::startup::{MAX_SECRET_LEN, MIN_SECRET_LEN};
use super::{read_cstr, tag_table, ProtocolError};

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const PARSE_COMPLETE: u8 = b'1';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const NOTIFICATION_RESPONSE: u8 = b'A';

/// Server messages whose body the relay reads: ReadyForQuery, ParameterStatus,
/// ErrorResponse, CommandComplete (whether a transaction block began) and
/// NotificationResponse (whose sender pid it may rewrite).
pub static INSPECT: [bool; 256] = tag_table(&[
    READY_FOR_QUERY,
    PARAMETER_STATUS,
    ERROR_RESPONSE,
    COMMAND_COMPLETE,
    NOTIFICATION_RESPONSE,
]);

/// What a CommandComplete body says of the transaction block: `Some(true)` it began
/// one (`BEGIN`, also for `START TRANSACTION`), `Some(false)` it ended one (`COMMIT`,
/// `ROLLBACK`), `None` anything else.
pub fn block_change(body: &[u8]) -> Option<bool> {
    match body {
        b"BEGIN\0" => Some(true),
        b"COMMIT\0" | b"ROLLBACK\0" => Some(false),
        _ => None,
    }
}

/// Whether an ErrorResponse ends the server session (`FATAL` or `PANIC`).
pub fn is_fatal(body: &[u8]) -> bool {
    matches!(error_fields(body).severity.as_str(), "FATAL" | "PANIC")
}

/// The transaction status a ReadyForQuery reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    #[default]
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block; statements are refused until it ends.
    Failed,
}

impl TxStatus {
    /// The status byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// Transaction status of a ReadyForQuery body (`I`, `T` or `E`).
pub fn ready_status(body: &[u8]) -> Result<TxStatus, ProtocolError> {
    match body {
        b"I" => Ok(TxStatus::Idle),
        b"T" => Ok(TxStatus::InBlock),
        b"E" => Ok(TxStatus::Failed),
        _ => Err(ProtocolError::Malformed {
            what: "ReadyForQuery",
        }),
    }
}

/// `(name, value)` of a ParameterStatus body.
pub fn parameter_status(body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    const BAD: ProtocolError = ProtocolError::Malformed {
        what: "ParameterStatus",
    };
    let (name, rest) = read_cstr(body).ok_or(BAD)?;
    let (value, _) = read_cstr(rest).ok_or(BAD)?;
    let name = std::str::from_utf8(name).map_err(|_| BAD)?;
    let value = std::str::from_utf8(value).map_err(|_| BAD)?;
    Ok((name, value))
}

/// `(pid, secret)` of a BackendKeyData body: a 4-byte secret in protocol 3.0, 4 to 256
/// bytes in 3.2.
pub fn backend_key(body: &[u8]) -> Result<(i32, &[u8]), ProtocolError> {
    match body {
        [a, b, c, d, secret @ ..] if (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&secret.len()) => {
            Ok((i32::from_be_bytes([*a, *b, *c, *d]), secret))
        }
        _ => Err(ProtocolError::Malformed {
            what: "BackendKeyData",
        }),
    }
}

/// How long a secret a client of protocol 3.`minor` is given: 32 bytes from 3.2 on, as
/// PostgreSQL 18 gives, 4 before (the only length 3.0 allows).
pub fn secret_len(minor: u16) -> usize {
    if minor >= 2 {
        32
    } else {
        4
    }
}

/// The fields of an ErrorResponse or NoticeResponse body, for logging and matching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    /// The server function that raised it (`R`): names an error whatever the language
    /// of its message (`RevalidateCachedQuery` for a stale prepared statement).
    pub routine: String,
}

pub fn error_fields(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    let mut rest = body;
    while let [kind, tail @ ..] = rest {
        if *kind == 0 {
            break;
        }
        let Some((value, next)) = read_cstr(tail) else {
            break;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            // `V` (never translated, PostgreSQL 9.6+) follows `S` and wins.
            b'S' | b'V' => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            b'R' => fields.routine = value,
            _ => {}
        }
        rest = next;
    }
    fields
}

/// Appends a pgwire message; our own messages are small and always encodable.
fn put<M: Message>(buf: &mut BytesMut, message: &M) {
    if let Err(err) = message.encode(buf) {
        // Only over-long messages fail to encode; pgrelay never builds one.
        tracing::error!(%err, "could not encode an internal message");
    }
}

/// Severity of an error pgrelay reports itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    let severity = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    let mut message = message.to_owned();
    message.truncate(4000);
    put(
        buf,
        &ErrorResponse::new(vec![
            (b'S', severity.to_owned()),
            (b'V', severity.to_owned()),
            (b'C', code.to_owned()),
            (b'M', message),
        ]),
    );
}

/// The server function that refuses a prepared statement whose result shape changed.
pub const STALE_PLAN_ROUTINE: &str = "RevalidateCachedQuery";

impl ErrorFields {
    /// PostgreSQL refused to run a prepared statement because a schema change altered
    /// its result shape (0A000 "cached plan must not change result type").
    pub fn is_stale_plan(&self) -> bool {
        self.code == "0A000" && self.routine == STALE_PLAN_ROUTINE
    }
}

/// The error PostgreSQL gives when a prepared statement's result shape changed since it
/// was prepared, with the routine drivers recognise it by (asyncpg re-prepares on it).
pub fn stale_plan_error(buf: &mut BytesMut) {
    put(
        buf,
        &ErrorResponse::new(vec![
            (b'S', "ERROR".to_owned()),
            (b'V', "ERROR".to_owned()),
            (b'C', "0A000".to_owned()),
            (b'M', "cached plan must not change result type".to_owned()),
            (b'R', STALE_PLAN_ROUTINE.to_owned()),
        ]),
    );
}

/// Type OIDs of the columns pgrelay's own result sets use.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const FLOAT8: u32 = 701;
}

/// RowDescription for text-format columns `(name, type oid)`.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, u32)]) {
    let fields = columns
        .iter()
        .map(|&(name, type_id)| {
            let size = match type_id {
                oid::BOOL => 1,
                oid::INT4 => 4,
                oid::INT8 | oid::FLOAT8 => 8,
                _ => -1,
            };
            FieldDescription::new(name.to_owned(), 0, 0, type_id, size, -1, 0)
        })
        .collect();
    put(buf, &RowDescription::new(fields));
}

/// DataRow of text values (`None` is NULL).
pub fn data_row<S: AsRef<str>>(buf: &mut BytesMut, values: &[Option<S>]) {
    let mut data = BytesMut::new();
    for value in values {
        match value {
            Some(v) => {
                let v = v.as_ref().as_bytes();
                data.put_i32(v.len() as i32);
                data.put_slice(v);
            }
            None => data.put_i32(-1),
        }
    }
    put(buf, &DataRow::new(data, values.len() as i16));
}

/// EmptyQueryResponse: the answer to a query string with no command.
pub fn empty_query(buf: &mut BytesMut) {
    buf.put_u8(b'I');
    buf.put_i32(4);
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put(buf, &CommandComplete::new(tag.to_owned()));
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    let status = match status {
        TxStatus::InBlock => TransactionStatus::Transaction,
        TxStatus::Failed => TransactionStatus::Error,
        TxStatus::Idle => TransactionStatus::Idle,
    };
    put(buf, &ReadyForQuery::new(status));
}

pub fn auth_ok(buf: &mut BytesMut) {
    put(buf, &Authentication::Ok);
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    put(buf, &Authentication::CleartextPassword);
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put(buf, &Authentication::MD5Password(salt.to_vec()));
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    let mechanisms = mechanisms.iter().map(|m| (*m).to_owned()).collect();
    put(buf, &Authentication::SASL(mechanisms));
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put(
        buf,
        &Authentication::SASLContinue(Bytes::copy_from_slice(data)),
    );
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put(
        buf,
        &Authentication::SASLFinal(Bytes::copy_from_slice(data)),
    );
}

pub fn parameter_status_msg(buf: &mut BytesMut, name: &str, value: &str) {
    put(
        buf,
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
    );
}

/// BackendKeyData; `secret` is 4 bytes for a protocol 3.0 client, up to 256 for 3.2.
pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: &[u8]) {
    buf.put_u8(BACKEND_KEY_DATA);
    buf.put_i32(4 + 4 + secret.len() as i32);
    buf.put_i32(pid);
    buf.put_slice(secret);
}

/// NegotiateProtocolVersion. `newest` is the full version number (`3 << 16 | minor`):
/// the protocol docs call the field a minor version, but PostgreSQL sends the full
/// number and libpq 18 refuses anything below 3.0.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest: i32, unsupported: Vec<String>) {
    put(buf, &NegotiateProtocolVersion::new(newest, unsupported));
}

/// ParseComplete.
pub fn parse_complete(buf: &mut BytesMut) {
    buf.put_slice(&[PARSE_COMPLETE, 0, 0, 0, 4]);
}

/// CloseComplete.
pub fn close_complete(buf: &mut BytesMut) {
    buf.put_slice(&[CLOSE_COMPLETE, 0, 0, 0, 4]);
}

/// BindComplete.
pub fn bind_complete(buf: &mut BytesMut) {
    buf.put_slice(&[b'2', 0, 0, 0, 4]);
}

/// PortalSuspended: Execute's row limit was reached.
pub fn portal_suspended(buf: &mut BytesMut) {
    buf.put_slice(&[b's', 0, 0, 0, 4]);
}

/// ParameterDescription of the given parameter type OIDs.
pub fn parameter_description(buf: &mut BytesMut, types: &[u32]) {
    buf.put_u8(b't');
    buf.put_i32(4 + 2 + 4 * types.len() as i32);
    buf.put_i16(types.len() as i16);
    for &oid in types {
        buf.put_u32(oid);
    }
}

/// RowDescription of one boolean column `name`, sent in `format` (0 text, 1 binary).
pub fn bool_row_description(buf: &mut BytesMut, name: &str, format: i16) {
    let field = FieldDescription::new(name.to_owned(), 0, 0, oid::BOOL, 1, -1, format);
    put(buf, &RowDescription::new(vec![field]));
}

/// DataRow of one boolean value in `format` (0 text, 1 binary).
pub fn bool_data_row(buf: &mut BytesMut, value: bool, format: i16) {
    let byte = match (format, value) {
        (1, value) => u8::from(value),
        (_, true) => b't',
        (_, false) => b'f',
    };
    buf.put_u8(b'D');
    buf.put_i32(4 + 2 + 4 + 1);
    buf.put_i16(1);
    buf.put_i32(1);
    buf.put_u8(byte);
}

/// A single-byte answer to SSLRequest / GSSENCRequest.
pub fn refuse_encryption(buf: &mut BytesMut) {
    buf.put_u8(b'N');
}

/// A parameter PostgreSQL reports with ParameterStatus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportedParameter {
    /// Lower-case.
    pub name: &'static str,
    /// A session can set it; the others describe the server (or pgrelay keeps them
    /// as the server has them).
    pub settable: bool,
}

/// The parameters PostgreSQL reports with ParameterStatus: the one list. Their changes
/// are followed from the messages, not from SQL, and only the settable ones are
/// reconciled between a client and a server.
pub const REPORTED_PARAMETERS: &[ReportedParameter] = &[
    reported("application_name", true),
    reported("client_encoding", true),
    reported("datestyle", true),
    reported("intervalstyle", true),
    reported("timezone", true),
    reported("standard_conforming_strings", true),
    reported("is_superuser", false),
    reported("session_authorization", false),
    reported("server_version", false),
    reported("server_encoding", false),
    reported("integer_datetimes", false),
    reported("default_transaction_read_only", true),
    reported("in_hot_standby", false),
];

const fn reported(name: &'static str, settable: bool) -> ReportedParameter {
    ReportedParameter { name, settable }
}

/// The reported parameter called `name` (lower-case), if it is one.
pub fn reported_parameter(name: &str) -> Option<&'static ReportedParameter> {
    REPORTED_PARAMETERS.iter().find(|p| p.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{split_frame, MAX_MESSAGE_LEN};

    #[test]
    fn builders_round_trip_through_views() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Fatal, "28P01", "nope");
        ready_for_query(&mut buf, TxStatus::InBlock);
        parameter_status_msg(&mut buf, "TimeZone", "UTC");
        backend_key_data(&mut buf, 7, &(-9i32).to_be_bytes());
        backend_key_data(&mut buf, 8, &[5; 32]);
        let e = split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap().unwrap();
        let f = error_fields(e.body());
        assert_eq!(
            (f.severity.as_str(), f.code.as_str(), f.message.as_str()),
            ("FATAL", "28P01", "nope")
        );
        let z = split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(ready_status(z.body()).unwrap(), TxStatus::InBlock);
        assert_eq!(TxStatus::InBlock.byte(), b'T');
        assert!(ready_status(b"X").is_err());
        let s = split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(parameter_status(s.body()).unwrap(), ("TimeZone", "UTC"));
        let k = split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(
            backend_key(k.body()).unwrap(),
            (7, &(-9i32).to_be_bytes()[..])
        );
        let k = split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(k.as_bytes().len(), 1 + 4 + 4 + 32);
        assert_eq!(backend_key(k.body()).unwrap(), (8, &[5u8; 32][..]));
        assert!(buf.is_empty());
    }

    #[test]
    fn backend_keys_of_every_allowed_length_only() {
        for len in [0usize, 3, 257] {
            let mut body = 1i32.to_be_bytes().to_vec();
            body.resize(4 + len, 1);
            assert!(backend_key(&body).is_err(), "{len}-byte secret");
        }
        assert!(backend_key(&[]).is_err());
        assert_eq!(secret_len(0), 4);
        assert_eq!(secret_len(1), 4);
        assert_eq!(secret_len(2), 32);
    }

    #[test]
    fn command_tags_that_open_or_close_a_block() {
        assert_eq!(block_change(b"BEGIN\0"), Some(true));
        assert_eq!(block_change(b"COMMIT\0"), Some(false));
        assert_eq!(block_change(b"ROLLBACK\0"), Some(false));
        assert_eq!(block_change(b"INSERT 0 1\0"), None);
        assert_eq!(block_change(b"BEGIN"), None);
        assert!(INSPECT[COMMAND_COMPLETE as usize]);
    }
}
