//! The PostgreSQL v3 wire codec, sans-IO: no tokio, no sockets, no clocks.
//!
//! It owns the framing rules (a tag byte, then a big-endian length that counts itself)
//! and the [`Scanner`] the relay uses to walk a read buffer without copying it: the
//! scanner reports each message's tag, hands over the body only of the few message
//! types the caller inspects, and lets every other message stream through, even before
//! it has fully arrived. Decoders return complete / need-more / error and never panic on
//! any input; each has a fuzz target or property test.

pub mod backend;
pub mod frontend;
pub mod startup;

use bytes::{Bytes, BytesMut};

/// The largest message pgrelay accepts (PostgreSQL's own limit, `MaxAllocSize - 1`).
pub const MAX_MESSAGE_LEN: usize = 0x3fff_ffff;

/// Bytes of a tagged message's header: the tag and the length.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: usize },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
    #[error("unexpected message type {tag:?}")]
    UnexpectedTag { tag: char },
    /// More bytes than a configured limit, before the message or request was complete.
    #[error("request of more than {max} bytes (the configured limit)")]
    TooLarge { max: usize },
    #[error("unsupported frontend protocol {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
}

/// One complete tagged message, header included, as it arrived on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    bytes: Bytes,
}

impl Frame {
    pub fn tag(&self) -> u8 {
        self.bytes[0]
    }

    pub fn body(&self) -> &[u8] {
        &self.bytes[HEADER_LEN..]
    }

    /// The whole message, ready to be written unchanged.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Reads a message header at the start of `buf`: `(tag, total length including tag)`.
/// `Ok(None)` means fewer than five bytes are buffered.
pub fn header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=max_len).contains(&len) {
        return Err(ProtocolError::BadLength {
            tag: buf[0] as char,
            len,
        });
    }
    Ok(Some((buf[0], len + 1)))
}

/// The length of the message at the start of `buf`, header included, if its header
/// is there and valid.
pub fn message_len(buf: &[u8]) -> Option<usize> {
    header(buf, MAX_MESSAGE_LEN)
        .ok()
        .flatten()
        .map(|(_, total)| total)
}

/// Splits one complete message off the front of `buf` without copying it.
pub fn split_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    match header(buf, max_len)? {
        Some((_, total)) if buf.len() >= total => Ok(Some(Frame {
            bytes: buf.split_to(total).freeze(),
        })),
        _ => Ok(None),
    }
}

/// What a scan callback wants done with the message it was shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Forward it and keep scanning.
    Forward,
    /// Forward it, then stop: the caller acts before anything after it moves.
    StopAfter,
    /// Do not forward it; stop in front of it (it stays first in the buffer).
    StopBefore,
}

/// The outcome of one [`Scanner::scan`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Leading bytes of the buffer that may be forwarded now.
    pub forward: usize,
    /// A callback asked to stop.
    pub stopped: bool,
}

/// Walks a stream of tagged messages, possibly across many reads.
///
/// Messages whose tag is in the `inspect` table are shown to the callback whole (body
/// included) once they have fully arrived; all others are shown at their header (body
/// `None`) and stream through, so a 100 MB DataRow never needs a 100 MB buffer.
#[derive(Debug, Clone)]
pub struct Scanner {
    inspect: &'static [bool; 256],
    max_len: usize,
    /// The largest inspected message (header included) it will wait to have whole.
    max_inspected: usize,
    /// Bytes of a streaming (uninspected) message that are still to come.
    passthrough: usize,
}

/// Builds an inspect table from a list of tags.
pub const fn tag_table(tags: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < tags.len() {
        table[tags[i] as usize] = true;
        i += 1;
    }
    table
}

impl Scanner {
    pub fn new(inspect: &'static [bool; 256], max_len: usize) -> Self {
        Scanner {
            inspect,
            max_len,
            max_inspected: usize::MAX,
            passthrough: 0,
        }
    }

    /// Refuses ([`ProtocolError::TooLarge`]) an inspected message longer than `max`
    /// bytes (0: no limit but `max_len`), rather than buffer it whole; streamed
    /// messages stay bounded by `max_len` only.
    pub fn limit_inspected(mut self, max: usize) -> Self {
        if max > 0 {
            self.max_inspected = max;
        }
        self
    }

    /// True when the scanner stands between two messages.
    pub fn at_boundary(&self) -> bool {
        self.passthrough == 0
    }

    /// Scans `buf` (which starts where the previous scan's `forward` ended) and calls
    /// `on_message(tag, body)` for each message reached.
    pub fn scan<F>(&mut self, buf: &[u8], mut on_message: F) -> Result<Scanned, ProtocolError>
    where
        F: FnMut(u8, Option<&[u8]>) -> Step,
    {
        let mut pos = 0;
        if self.passthrough > 0 {
            let take = self.passthrough.min(buf.len());
            self.passthrough -= take;
            pos = take;
        }
        while self.passthrough == 0 {
            let Some((tag, total)) = header(&buf[pos..], self.max_len)? else {
                break;
            };
            let available = buf.len() - pos;
            let step = if self.inspect[tag as usize] {
                if available < total {
                    if total > self.max_inspected {
                        return Err(too_large(self.max_inspected));
                    }
                    break;
                }
                on_message(tag, Some(&buf[pos + HEADER_LEN..pos + total]))
            } else {
                on_message(tag, None)
            };
            match step {
                Step::StopBefore => {
                    return Ok(Scanned {
                        forward: pos,
                        stopped: true,
                    })
                }
                Step::Forward | Step::StopAfter => {
                    let take = total.min(available);
                    self.passthrough = total - take;
                    pos += take;
                    if step == Step::StopAfter {
                        return Ok(Scanned {
                            forward: pos,
                            stopped: true,
                        });
                    }
                }
            }
        }
        Ok(Scanned {
            forward: pos,
            stopped: false,
        })
    }
}

/// The error of an inspected message over its limit: out of the scan loop's way.
#[cold]
#[inline(never)]
fn too_large(max: usize) -> ProtocolError {
    ProtocolError::TooLarge { max }
}

/// PostgreSQL's white space (scan.l's `{space}`, C's `isspace`):
/// `u8::is_ascii_whitespace` plus the vertical tab, which PostgreSQL also skips. A
/// parser that did not would read `f\x0b(1)` as something other than a call of `f`.
pub fn is_space(c: u8) -> bool {
    c.is_ascii_whitespace() || c == b'\x0b'
}

/// Reads a NUL-terminated string at the start of `buf`: `(text, rest after the NUL)`.
pub fn read_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = buf.iter().position(|&b| b == 0)?;
    Some((&buf[..nul], &buf[nul + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.put_u32(body.len() as u32 + 4);
        v.extend_from_slice(body);
        v
    }

    static INSPECT_Z: [bool; 256] = tag_table(b"Z");

    #[test]
    fn split_frame_needs_whole_message() {
        let m = msg(b'Q', b"select 1\0");
        let mut buf = BytesMut::from(&m[..m.len() - 1]);
        assert_eq!(split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap(), None);
        buf.put_u8(0);
        let f = split_frame(&mut buf, MAX_MESSAGE_LEN).unwrap().unwrap();
        assert_eq!(f.tag(), b'Q');
        assert_eq!(f.body(), b"select 1\0");
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(split_frame(&mut buf, MAX_MESSAGE_LEN).is_err());
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(split_frame(&mut buf, MAX_MESSAGE_LEN).is_err());
    }

    #[test]
    fn scanner_refuses_to_wait_for_an_inspected_message_over_its_limit() {
        let query = msg(b'Q', &[b' '; 100]);
        let copy = msg(b'd', &[7u8; 100]);
        let mut s = Scanner::new(&INSPECT_Z, MAX_MESSAGE_LEN).limit_inspected(50);
        // Streamed messages are not limited, whole ones are shown.
        assert!(s.scan(&copy[..60], |_, _| Step::Forward).is_ok());
        let mut s = Scanner::new(&INSPECT_Q, MAX_MESSAGE_LEN).limit_inspected(200);
        assert_eq!(s.scan(&query, |_, _| Step::Forward).unwrap().forward, 105);
        // An inspected message over the limit is refused before it is all there.
        let mut s = Scanner::new(&INSPECT_Q, MAX_MESSAGE_LEN).limit_inspected(50);
        assert_eq!(
            s.scan(&query[..60], |_, _| Step::Forward),
            Err(ProtocolError::TooLarge { max: 50 })
        );
    }

    static INSPECT_Q: [bool; 256] = tag_table(b"Q");

    #[test]
    fn scanner_streams_uninspected_and_waits_for_inspected() {
        let mut wire = msg(b'D', &[7u8; 100]);
        wire.extend(msg(b'Z', b"I"));
        let mut s = Scanner::new(&INSPECT_Z, MAX_MESSAGE_LEN);
        let mut seen = Vec::new();
        // Only part of the DataRow has arrived: it streams anyway.
        let r = s
            .scan(&wire[..50], |t, b| {
                seen.push((t, b.map(<[u8]>::to_vec)));
                Step::Forward
            })
            .unwrap();
        assert_eq!(r.forward, 50);
        assert!(!s.at_boundary());
        // The rest of it plus half of ReadyForQuery: the Z must wait.
        let r = s
            .scan(&wire[50..108], |t, b| {
                seen.push((t, b.map(<[u8]>::to_vec)));
                Step::Forward
            })
            .unwrap();
        assert_eq!(r.forward, 55);
        let r = s
            .scan(&wire[105..], |t, b| {
                seen.push((t, b.map(<[u8]>::to_vec)));
                Step::StopAfter
            })
            .unwrap();
        assert_eq!(
            r,
            Scanned {
                forward: 6,
                stopped: true
            }
        );
        assert_eq!(seen, vec![(b'D', None), (b'Z', Some(b"I".to_vec()))]);
    }

    #[test]
    fn stop_before_leaves_the_message() {
        let mut wire = msg(b'S', b"");
        wire.extend(msg(b'X', b""));
        let mut s = Scanner::new(&INSPECT_Z, MAX_MESSAGE_LEN);
        let r = s
            .scan(&wire, |t, _| {
                if t == b'X' {
                    Step::StopBefore
                } else {
                    Step::Forward
                }
            })
            .unwrap();
        assert_eq!(
            r,
            Scanned {
                forward: 5,
                stopped: true
            }
        );
    }

    proptest::proptest! {
        /// Any byte soup, cut anywhere: the scanner never panics and never forwards more
        /// than it was given.
        #[test]
        fn scanner_never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..300), cut in 0usize..300) {
            let mut s = Scanner::new(&INSPECT_Z, 1000);
            let cut = cut.min(data.len());
            let mut offset = 0;
            for chunk in [&data[..cut], &data[cut..]] {
                if let Ok(r) = s.scan(chunk, |_, _| Step::Forward) {
                    proptest::prop_assert!(r.forward <= chunk.len());
                    offset += r.forward;
                }
            }
            proptest::prop_assert!(offset <= data.len());
        }
    }
}
