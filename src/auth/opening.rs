//! A client connection's opening, before its StartupMessage: the TLS negotiation.
//!
//! With `tls.client_mode = "disable"` nothing happens here: the handshake answers any
//! SSLRequest `N`, as it always did. Otherwise a connection whose first byte opens a
//! TLS record is direct TLS (PostgreSQL 17's `sslnegotiation=direct`, ALPN
//! `postgresql` required); an SSLRequest is answered `S` and TLS follows (ALPN
//! optional); a GSSENCRequest is answered `N`; anything else is the plaintext
//! client's first packet, handed on to the handshake. Whether a plaintext client may
//! go on is the handshake's decision, once it knows who the client is.

use tokio::net::TcpStream;

use crate::config::TlsMode;
use crate::error::ClientError;
use crate::protocol::backend;
use crate::protocol::startup::StartupPacket;
use crate::stream::{Conn, Stream, StreamError};
use crate::tls::accept::{self, ClientTls, Negotiation, TlsSession};

use super::hba::Peer;
use super::AuthError;

/// What the opening established, for the rest of the handshake.
#[derive(Debug)]
pub struct Opening {
    /// `tls.client_mode` when the connection opened; `disable` on a Unix socket, where
    /// TLS is neither offered nor required (PostgreSQL answers `N` there too).
    pub mode: TlsMode,
    /// Where the client connected from, for the `[[hba]]` rules.
    pub peer: Peer,
    /// The TLS session, when the client is on TLS.
    pub tls: Option<TlsSession>,
    /// The first packet after the negotiation, already read (a plaintext client's).
    pub first: Option<StartupPacket>,
}

impl Opening {
    /// A connection with no TLS negotiation behind it (`disable`, or tests), from `peer`.
    pub fn plain(mode: TlsMode, peer: Peer) -> Opening {
        Opening {
            mode,
            peer,
            tls: None,
            first: None,
        }
    }

    /// A client on a Unix socket: an SSLRequest is answered `N`, and TLS is not required.
    pub fn unix() -> Opening {
        Opening::plain(TlsMode::Disable, Peer::Unix)
    }
}

/// Negotiates TLS on a new client connection. An error has been told to the client
/// where it could be (in plaintext, before TLS); the caller only logs it.
pub async fn open(tcp: TcpStream, tls: &ClientTls) -> Result<(Conn<Stream>, Opening), AuthError> {
    let mode = tls.mode();
    let peer = tcp
        .peer_addr()
        .map_or(Peer::Unknown, |addr| Peer::Ip(addr.ip()));
    if !tls.offers_tls() {
        return Ok((Conn::new(Stream::Plain(tcp)), Opening::plain(mode, peer)));
    }
    if accept::starts_with_handshake(&tcp)
        .await
        .map_err(StreamError::from)?
    {
        return secure(tcp, tls, Negotiation::Direct, peer).await;
    }
    let mut conn = Conn::new(tcp);
    loop {
        match conn.read_startup().await? {
            StartupPacket::GssEnc => {
                backend::refuse_encryption(conn.wbuf());
                conn.flush().await?;
            }
            StartupPacket::Ssl => {
                // Bytes sent after the SSLRequest and before our answer were not
                // protected by TLS, yet would be read as if they were (CVE-2021-23214).
                if conn.rbuf_len() > 0 {
                    let err = ClientError::protocol("received unencrypted data after SSL request");
                    err.encode(conn.wbuf());
                    let _ = conn.flush().await;
                    return Err(err.into());
                }
                conn.write_all(b"S").await?;
                return secure(conn.into_io(), tls, Negotiation::SslRequest, peer).await;
            }
            first => {
                let opening = Opening {
                    mode,
                    peer,
                    tls: None,
                    first: Some(first),
                };
                return Ok((conn.map_io(Stream::Plain), opening));
            }
        }
    }
}

async fn secure(
    tcp: TcpStream,
    tls: &ClientTls,
    how: Negotiation,
    peer: Peer,
) -> Result<(Conn<Stream>, Opening), AuthError> {
    let (stream, session) = tls.accept(tcp, how).await?;
    let opening = Opening {
        mode: tls.mode(),
        peer,
        tls: Some(session),
        first: None,
    };
    Ok((Conn::new(stream), opening))
}
