//! The relay's side of carrying prepared statements across servers (transaction
//! mode): answering requests that need no server, accounting for or rewriting a
//! request read while detached, and handling the client message a scan stopped in
//! front of. What to write and what the server will answer is [`super::prepared`]'s.

use bytes::{Buf, BufMut};

use super::relay::{Front, Wire};
use crate::pool::params::ParamSet;
use crate::pool::server::Server;
use crate::protocol::{frontend, header, HEADER_LEN, MAX_MESSAGE_LEN};
use crate::router::classify::effects::Effects;
use crate::session::prepared::Prepared;
use crate::stream::{Conn, Stream};

/// What the client scan does with a message when prepared statements are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Carry {
    /// Relay it as it is.
    Relay,
    /// Attached: stop in front of it and rewrite it.
    Rewrite,
    /// Attached: stop in front of this own `DEALLOCATE` and answer it.
    Answer,
    /// Detached: the request needs rewriting when a server is attached.
    Later,
}

/// Decides [`Carry`] for a whole client message.
pub(super) fn carry(prepared: &Prepared, tag: u8, body: &[u8], attached: bool) -> Carry {
    let own_deallocate = tag == frontend::QUERY && prepared.is_own_deallocate(body);
    match (
        attached,
        own_deallocate || prepared.needs_rewrite(tag, body),
    ) {
        (true, true) if own_deallocate => Carry::Answer,
        (true, true) => Carry::Rewrite,
        (false, true) => Carry::Later,
        (_, false) => Carry::Relay,
    }
}

impl Wire {
    /// Detached: answers the buffered request without a server if it is a lone
    /// `DEALLOCATE` of the client's own protocol statement, or only prepares statements
    /// already known to parse (and closes some). Returns whether it did.
    pub fn answer_locally(&mut self, client: &mut Conn<Stream>, search_path: Option<&str>) -> bool {
        let Some(prepared) = self.prepared.as_deref_mut() else {
            return false;
        };
        let Ok(Some((tag, total))) = header(&client.rbuf()[..self.c2s], MAX_MESSAGE_LEN) else {
            return false;
        };
        let (rbuf, wbuf) = client.buffers();
        let named = rbuf.get(5).is_some_and(|&b| b != 0);
        let answered = match tag {
            frontend::QUERY => {
                let body = &rbuf[5..total];
                if total != self.c2s || !prepared.is_own_deallocate(body) {
                    return false;
                }
                prepared.deallocate(body, b'I', wbuf);
                true
            }
            frontend::PARSE if named => prepared.answer(&rbuf[..self.c2s], search_path, wbuf),
            frontend::CLOSE => prepared.answer(&rbuf[..self.c2s], search_path, wbuf),
            _ => false,
        };
        if answered {
            client.rbuf().advance(self.c2s);
            self.c2s = 0;
            self.pending = 0;
            self.extended_open = false;
            self.rewrite_buffered = false;
        }
        answered
    }

    /// A new attachment with prepared statements carried: accounts for the request read
    /// while detached, rewriting it into the server's write buffer if it names
    /// statements.
    pub(super) fn send_buffered(
        &mut self,
        client: &mut Conn<Stream>,
        server: &mut Server,
        client_params: &ParamSet,
    ) {
        let Some(prepared) = self.prepared.as_deref_mut() else {
            return;
        };
        if !self.resumed {
            prepared.attached();
        }
        let rewrite = std::mem::take(&mut self.rewrite_buffered);
        let mut pos = 0;
        while let Ok(Some((tag, total))) = header(&client.rbuf()[pos..self.c2s], MAX_MESSAGE_LEN) {
            let Some(message) = client.rbuf().get(pos..pos + total) else {
                break;
            };
            let body = &message[5..];
            if !rewrite {
                prepared.forwarded(tag);
            } else if prepared.needs_rewrite(tag, body) {
                let effects = self.track_effects.then_some(&mut self.effects);
                rewrite_message(prepared, message, server, client_params, effects);
            } else {
                server.conn.wbuf().put_slice(message);
                prepared.forwarded(tag);
            }
            pos += total;
        }
        if rewrite {
            client.rbuf().advance(self.c2s);
            self.c2s = 0;
        }
    }

    /// Attached: handles the client message the scan stopped in front of, once
    /// everything before it is on its way. Returns whether it did.
    pub(super) fn handle_front(
        &mut self,
        client: &mut Conn<Stream>,
        server: &mut Server,
        client_params: &ParamSet,
    ) -> bool {
        if self.c2s > 0 {
            return false;
        }
        let Some(prepared) = self.prepared.as_deref_mut() else {
            return false;
        };
        let Ok(Some((_, total))) = header(client.rbuf(), MAX_MESSAGE_LEN) else {
            return false;
        };
        if self.front == Front::Rewrite {
            let Some(message) = client.rbuf().get(..total) else {
                return false;
            };
            let effects = self.track_effects.then_some(&mut self.effects);
            rewrite_message(prepared, message, server, client_params, effects);
            client.rbuf().advance(total);
            self.front = Front::Relayed;
            return true;
        }
        // An own DEALLOCATE is answered after everything sent before it.
        let answered = self.s2c == 0 && self.pending == 0 && server.conn.wbuf().is_empty();
        if self.front != Front::Answer || !answered {
            return false;
        }
        let (rbuf, wbuf) = client.buffers();
        let Some(body) = rbuf.get(HEADER_LEN..total) else {
            return false;
        };
        prepared.deallocate(body, self.status, wbuf);
        rbuf.advance(total);
        self.front = Front::Relayed;
        self.client_needs_flush = true;
        if self.transaction_pooling && self.status == b'I' && !self.extended_open {
            self.release_point = true;
        }
        true
    }
}

/// Rewrites one client message into the server's write buffer; adds what the statement
/// a Bind runs does to the session to `effects`, if given.
fn rewrite_message(
    prepared: &mut Prepared,
    message: &[u8],
    server: &mut Server,
    client_params: &ParamSet,
    effects: Option<&mut Effects>,
) {
    let found = prepared.rewrite(
        message[0],
        &message[HEADER_LEN..],
        &mut server.statements,
        client_params.get("search_path"),
        server.conn.wbuf(),
    );
    if let (Some(effects), Some(found)) = (effects, found) {
        effects.merge(found.clone());
    }
}
