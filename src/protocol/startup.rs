//! Untagged packets a client sends before it is authenticated: StartupMessage,
//! SSLRequest, GSSENCRequest and CancelRequest.
//!
//! The StartupMessage body is decoded with pgwire; the request codes are told apart
//! here. Parameters are kept as pgwire gives them; the `options` string is split into
//! `-c name=value` settings by [`parse_options`].
//!
//! Protocol 3.2 (PostgreSQL 18) changed only the cancel key: the secret of
//! BackendKeyData and CancelRequest is 4 to 256 bytes long instead of exactly 4.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message};

use super::ProtocolError;

/// PostgreSQL's limit on a startup packet.
pub const MAX_STARTUP_LEN: usize = 10_000;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// A CancelRequest one pgrelay forwards to another (1234/5677, a code of pgrelay's own
/// beside PostgreSQL's 1234/5678): the receiver looks the key up among its own clients
/// and never forwards it again, so a cancel crosses a fleet at most once.
const FORWARDED_CANCEL_REQUEST: u32 = 80_877_101;
/// The newest minor version of protocol 3 pgrelay speaks with clients: 3.2, whose
/// cancel keys are longer. Servers are still spoken to in 3.0.
pub const NEWEST_MINOR: u16 = 2;
/// The shortest and longest secret of a cancel key (protocol 3.2; 3.0's is 4 bytes).
pub const MIN_SECRET_LEN: usize = 4;
pub const MAX_SECRET_LEN: usize = 256;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    /// A CancelRequest: the pid and secret of a BackendKeyData; `forwarded` when
    /// another pgrelay of the fleet sent it on.
    Cancel {
        pid: i32,
        secret: Bytes,
        forwarded: bool,
    },
    Startup(StartupParams),
}

/// A decoded StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupParams {
    pub minor: u16,
    /// Every parameter as sent, in name order (pgwire keeps a BTreeMap).
    pub params: Vec<(String, String)>,
}

impl StartupParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The minor version spoken with this client: the one it asked for, or pgrelay's
    /// newest if it asked for more (as PostgreSQL does).
    pub fn agreed_minor(&self) -> u16 {
        self.minor.min(NEWEST_MINOR)
    }

    /// The protocol options (`_pq_.` parameters) the client asked for: pgrelay knows
    /// none, so all of them are named in NegotiateProtocolVersion.
    pub fn protocol_options(&self) -> Vec<String> {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Whether the client is sent NegotiateProtocolVersion: it asked for a newer minor
    /// version than pgrelay's newest, or for protocol options.
    pub fn needs_negotiation(&self) -> bool {
        self.minor > NEWEST_MINOR || self.params.iter().any(|(k, _)| k.starts_with("_pq_."))
    }
}

/// Decodes one startup-phase packet from the front of `buf`. `Ok(None)`: need more.
pub fn decode(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    // The length is checked as soon as it is in: a client that sends a bad length and
    // then waits must be refused at once, not when the login timeout expires.
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_LEN).contains(&len) {
        return Err(ProtocolError::BadLength { tag: '\0', len });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    match code {
        SSL_REQUEST | GSSENC_REQUEST => {
            if len != 8 {
                return Err(ProtocolError::Malformed { what: "SSLRequest" });
            }
            buf.advance(8);
            Ok(Some(if code == SSL_REQUEST {
                StartupPacket::Ssl
            } else {
                StartupPacket::GssEnc
            }))
        }
        CANCEL_REQUEST | FORWARDED_CANCEL_REQUEST => {
            // Code and pid, then the secret: the rest of the packet.
            if !(12 + MIN_SECRET_LEN..=12 + MAX_SECRET_LEN).contains(&len) {
                return Err(ProtocolError::Malformed {
                    what: "CancelRequest",
                });
            }
            let mut packet = buf.split_to(len);
            packet.advance(8);
            let pid = packet.get_i32();
            Ok(Some(StartupPacket::Cancel {
                pid,
                secret: packet.freeze(),
                forwarded: code == FORWARDED_CANCEL_REQUEST,
            }))
        }
        _ => decode_startup(buf, len, code).map(Some),
    }
}

fn decode_startup(
    buf: &mut BytesMut,
    len: usize,
    code: u32,
) -> Result<StartupPacket, ProtocolError> {
    let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
    if major != 3 {
        buf.advance(len);
        return Err(ProtocolError::UnsupportedProtocol { major, minor });
    }
    // The parameter list must end with an empty name; pgwire is lenient about that.
    if buf[len - 1] != 0 {
        buf.advance(len);
        return Err(ProtocolError::Malformed {
            what: "StartupMessage",
        });
    }
    let mut packet = buf.split_to(len);
    let startup = Startup::decode(&mut packet, &DecodeContext::default())
        .map_err(|_| ProtocolError::Malformed {
            what: "StartupMessage",
        })?
        .ok_or(ProtocolError::Malformed {
            what: "StartupMessage",
        })?;
    Ok(StartupPacket::Startup(StartupParams {
        minor: startup.protocol_number_minor,
        params: startup.parameters.into_iter().collect(),
    }))
}

/// Splits libpq's `options` parameter into settings: `-c name=value`, `-cname=value`
/// and `--name=value`, separated by spaces, with `\` escaping the next character.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let words = split_words(options);
    let mut out = Vec::new();
    let mut iter = words.into_iter();
    while let Some(word) = iter.next() {
        let setting = if word == "-c" {
            iter.next().ok_or("-c needs a setting")?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else {
            return Err(format!("unsupported option {word:?}"));
        };
        let (name, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("option {setting:?} has no value"))?;
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            c if c.is_ascii() && super::is_space(c as u8) => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// The CancelRequest pgrelay forwards to a peer of its fleet for the key `pid` and
/// `secret` (marked as forwarded, so the peer does not send it on).
pub fn forwarded_cancel_request(buf: &mut BytesMut, pid: i32, secret: &[u8]) {
    buf.put_u32(12 + secret.len() as u32);
    buf.put_u32(FORWARDED_CANCEL_REQUEST);
    buf.put_i32(pid);
    buf.put_slice(secret);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)], minor: u16) -> BytesMut {
        let mut body = BytesMut::new();
        body.put_u16(3);
        body.put_u16(minor);
        for (k, v) in params {
            body.put_slice(k.as_bytes());
            body.put_u8(0);
            body.put_slice(v.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut buf = BytesMut::new();
        buf.put_u32(body.len() as u32 + 4);
        buf.put_slice(&body);
        buf
    }

    #[test]
    fn decodes_startup_message() {
        let mut buf = startup(&[("user", "app"), ("database", "db")], 0);
        let Some(StartupPacket::Startup(p)) = decode(&mut buf).unwrap() else {
            panic!("not a startup")
        };
        assert_eq!(p.get("user"), Some("app"));
        assert_eq!(p.get("database"), Some("db"));
        assert!(buf.is_empty());
    }

    #[test]
    fn negotiates_up_to_protocol_3_2() {
        let decoded = |minor, params: &[(&str, &str)]| {
            let mut buf = startup(params, minor);
            match decode(&mut buf).unwrap() {
                Some(StartupPacket::Startup(p)) => p,
                other => panic!("not a startup: {other:?}"),
            }
        };
        let user = [("user", "app")];
        for (minor, agreed, negotiates) in [
            (0, 0, false),
            (1, 1, false),
            (2, 2, false),
            (3, 2, true),
            (9999, 2, true),
        ] {
            let p = decoded(minor, &user);
            assert_eq!(p.agreed_minor(), agreed, "3.{minor}");
            assert_eq!(p.needs_negotiation(), negotiates, "3.{minor}");
        }
        let p = decoded(
            2,
            &[
                ("user", "app"),
                ("_pq_.test_protocol_negotiation", ""),
                ("_pq_.x", "1"),
            ],
        );
        assert!(p.needs_negotiation());
        assert_eq!(
            p.protocol_options(),
            ["_pq_.test_protocol_negotiation", "_pq_.x"]
        );
    }

    #[test]
    fn decodes_requests() {
        let mut buf = BytesMut::new();
        buf.put_u32(8);
        buf.put_u32(SSL_REQUEST);
        buf.put_u32(16);
        buf.put_u32(CANCEL_REQUEST);
        buf.put_i32(42);
        buf.put_i32(-7);
        assert_eq!(decode(&mut buf).unwrap(), Some(StartupPacket::Ssl));
        assert_eq!(
            decode(&mut buf).unwrap(),
            Some(StartupPacket::Cancel {
                pid: 42,
                secret: Bytes::copy_from_slice(&(-7i32).to_be_bytes()),
                forwarded: false,
            })
        );
        let mut buf = BytesMut::new();
        forwarded_cancel_request(&mut buf, 42, &[1, 2, 3, 4]);
        assert_eq!(
            decode(&mut buf).unwrap(),
            Some(StartupPacket::Cancel {
                pid: 42,
                secret: Bytes::from_static(&[1, 2, 3, 4]),
                forwarded: true,
            })
        );
    }

    fn cancel_request(pid: i32, secret: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u32(12 + secret.len() as u32);
        buf.put_u32(CANCEL_REQUEST);
        buf.put_i32(pid);
        buf.put_slice(secret);
        buf
    }

    /// Protocol 3.2: the secret is the rest of the packet, 4 to 256 bytes.
    #[test]
    fn decodes_long_cancel_keys() {
        for len in [4, 32, 256] {
            let secret: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut buf = cancel_request(7, &secret);
            buf.put_u32(8);
            buf.put_u32(SSL_REQUEST);
            assert_eq!(
                decode(&mut buf).unwrap(),
                Some(StartupPacket::Cancel {
                    pid: 7,
                    secret: Bytes::from(secret),
                    forwarded: false,
                }),
                "{len} bytes"
            );
            assert_eq!(decode(&mut buf).unwrap(), Some(StartupPacket::Ssl));
        }
        for len in [0, 1, 3, 257, 300] {
            let mut buf = cancel_request(7, &vec![1; len]);
            assert!(
                matches!(decode(&mut buf), Err(ProtocolError::Malformed { .. })),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn rejects_a_bad_length_before_the_rest_arrives() {
        for len in [0u32, 3, 7, 10_001, 100_000] {
            let mut buf = BytesMut::new();
            buf.put_u32(len);
            assert!(
                matches!(decode(&mut buf), Err(ProtocolError::BadLength { .. })),
                "length {len}"
            );
        }
        let mut buf = BytesMut::new();
        buf.put_u32(8);
        assert_eq!(decode(&mut buf).unwrap(), None);
        let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
        assert_eq!(decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn rejects_bad_packets() {
        let mut buf = BytesMut::new();
        buf.put_u32(1_000_000);
        buf.put_u32(196_608);
        assert!(decode(&mut buf).is_err());
        let mut buf = startup(&[("user", "x")], 0);
        let n = buf.len();
        buf[n - 1] = b'x';
        assert!(decode(&mut buf).is_err());
        let mut buf = BytesMut::new();
        buf.put_u32(8);
        buf.put_u32(2 << 16);
        assert!(matches!(
            decode(&mut buf),
            Err(ProtocolError::UnsupportedProtocol { major: 2, .. })
        ));
    }

    #[test]
    fn parses_options() {
        assert_eq!(
            parse_options("-c search_path=a,b  -cstatement_timeout=5s --work-mem=64MB -c x=a\\ b")
                .unwrap(),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into()),
                ("x".into(), "a b".into()),
            ]
        );
        assert!(parse_options("-D /tmp").is_err());
        // Split on C's isspace, as PostgreSQL does: the vertical tab included.
        assert_eq!(
            parse_options("-c\x0bx=1").unwrap(),
            vec![("x".into(), "1".into())]
        );
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut buf = BytesMut::from(&data[..]);
            let _ = decode(&mut buf);
        }
    }
}
