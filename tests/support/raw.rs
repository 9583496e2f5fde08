//! Hand-written wire-protocol bytes over a plain `TcpStream`, for tests that must send
//! what no well-behaved client library would (garbage, half packets, sudden closes) or
//! must see exactly which messages pgrelay sends (the authentication request code).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Protocol 3.0, as the StartupMessage's version field.
pub const PROTOCOL_3_0: u32 = 196_608;

/// A StartupMessage for protocol 3.0 with the given parameters.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
    for (name, value) in params {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// A tagged message with a correct length.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A simple-protocol Query.
pub fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

/// One backend message.
#[derive(Debug, Clone)]
pub struct Message {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Message {
    /// The fields of an ErrorResponse or NoticeResponse, by field code ('C', 'M', 'S').
    pub fn fields(&self) -> HashMap<u8, String> {
        let mut fields = HashMap::new();
        for part in self.body.split(|&b| b == 0) {
            if let Some((&code, value)) = part.split_first() {
                fields.insert(code, String::from_utf8_lossy(value).into_owned());
            }
        }
        fields
    }

    /// The SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        if self.tag != b'E' {
            return None;
        }
        self.fields().remove(&b'C')
    }

    /// The request code of an Authentication message (0 ok, 3 cleartext, 5 md5, 10 SASL).
    pub fn auth_code(&self) -> Option<i32> {
        let code = self.body.get(..4)?;
        (self.tag == b'R').then(|| i32::from_be_bytes([code[0], code[1], code[2], code[3]]))
    }
}

/// Reads one message; `Ok(None)` when the peer closed cleanly before a new message.
pub async fn read_message(stream: &mut TcpStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        let n = stream.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if !(4..=1 << 20).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("implausible message length {len}"),
        ));
    }
    let mut body = vec![0; len - 4];
    stream.read_exact(&mut body).await?;
    Ok(Some(Message {
        tag: header[0],
        body,
    }))
}

/// Reads messages up to and including ReadyForQuery, or until an ErrorResponse that
/// is followed by a close. Panics after `timeout`.
pub async fn read_until_ready(stream: &mut TcpStream, timeout: Duration) -> Vec<Message> {
    let read = async {
        let mut messages = Vec::new();
        while let Some(message) = read_message(stream).await.expect("read from pgrelay") {
            let done = message.tag == b'Z';
            messages.push(message);
            if done {
                break;
            }
        }
        messages
    };
    tokio::time::timeout(timeout, read)
        .await
        .expect("pgrelay answered in time")
}

/// Connects and sends a StartupMessage for `user` and `database`.
pub async fn send_startup(addr: SocketAddr, user: &str, database: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect to pgrelay");
    stream
        .write_all(&startup_message(&[("user", user), ("database", database)]))
        .await
        .expect("send StartupMessage");
    stream
}

/// Logs in where no password is asked (`auth_type = "trust"`) and reads up to the
/// first ReadyForQuery.
pub async fn login_trust(addr: SocketAddr, user: &str, database: &str) -> TcpStream {
    let mut stream = send_startup(addr, user, database).await;
    let messages = read_until_ready(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(
        messages.first().and_then(Message::auth_code),
        Some(0),
        "expected AuthenticationOk first: {messages:?}"
    );
    assert_eq!(messages.last().map(|m| m.tag), Some(b'Z'), "{messages:?}");
    stream
}

/// The first Authentication request pgrelay sends after a StartupMessage.
pub async fn first_auth_request(addr: SocketAddr, user: &str, database: &str) -> Option<i32> {
    let mut stream = send_startup(addr, user, database).await;
    let message = tokio::time::timeout(Duration::from_secs(10), read_message(&mut stream))
        .await
        .expect("pgrelay answered the StartupMessage in time")
        .expect("read from pgrelay")?;
    message.auth_code()
}

/// Reads until the peer closes; returns everything read before the close. `Err` with
/// what was read so far if the socket is still open after `timeout`. A reset counts as
/// a close.
pub async fn read_to_close(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Err(seen),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Splits bytes read from pgrelay into messages (a trailing partial one is dropped).
pub fn split_messages(mut bytes: &[u8]) -> Vec<Message> {
    let mut messages = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if len < 4 || bytes.len() < len + 1 {
            break;
        }
        messages.push(Message {
            tag: bytes[0],
            body: bytes[5..len + 1].to_vec(),
        });
        bytes = &bytes[len + 1..];
    }
    messages
}

/// Sends a simple Query and reads its answer up to ReadyForQuery.
pub async fn simple_query(stream: &mut TcpStream, sql: &str) -> Vec<Message> {
    stream.write_all(&query(sql)).await.expect("send Query");
    read_until_ready(stream, Duration::from_secs(10)).await
}

/// The first column of the first DataRow among `messages`, as text.
pub fn first_value(messages: &[Message]) -> Option<String> {
    let row = messages.iter().find(|m| m.tag == b'D')?;
    let len = i32::from_be_bytes(row.body.get(2..6)?.try_into().ok()?);
    let value = row.body.get(6..6 + usize::try_from(len).ok()?)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

/// A SASLInitialResponse naming `mechanism`, with `data` as the client-first-message.
pub fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    message(b'p', &body)
}
