//! The relay's side of carrying prepared statements across servers (transaction
//! mode): answering requests that need no server, accounting for or rewriting a
//! request read while detached, and handling the client message a scan stopped in
//! front of. What to write and what the server will answer is [`super::prepared`]'s.

use bytes::{Buf, BufMut};

use super::relay::Wire;
use super::scan::Front;
use crate::pool::params::ParamSet;
use crate::pool::server::Server;
use crate::protocol::backend::TxStatus;
use crate::protocol::frontend;
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
    /// The client's `params` are looked at only for a request it answers.
    pub fn answer_locally(&mut self, client: &mut Conn<Stream>, params: &ParamSet) -> bool {
        let Some(prepared) = self.prepared.as_deref_mut() else {
            return false;
        };
        let (rbuf, wbuf) = client.buffers();
        let request = &rbuf[..self.client.c2s];
        let Some(Ok(first)) = frontend::messages(request).next() else {
            return false;
        };
        let answered = match first.tag {
            frontend::QUERY => {
                if first.bytes.len() != request.len() || !prepared.is_own_deallocate(first.body) {
                    return false;
                }
                prepared.deallocate(first.body, TxStatus::Idle, wbuf);
                true
            }
            frontend::PARSE if frontend::parse(first.body).is_ok_and(|p| !p.name.is_empty()) => {
                prepared.answer(request, params.get("search_path"), wbuf)
            }
            frontend::CLOSE => prepared.answer(request, params.get("search_path"), wbuf),
            _ => false,
        };
        if answered {
            self.consume_request(client);
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
        let rewrite = std::mem::take(&mut self.client.exchange.rewrite_buffered);
        let request = &client.rbuf()[..self.client.c2s];
        for message in frontend::messages(request).map_while(Result::ok) {
            let (tag, body) = (message.tag, message.body);
            if !rewrite {
                prepared.forwarded(tag);
            } else if prepared.needs_rewrite(tag, body) {
                let effects = self.policy.track_effects.then_some(&mut self.effects);
                rewrite_message(prepared, message, server, client_params, effects);
            } else {
                server.conn.wbuf().put_slice(message.bytes);
                prepared.forwarded(tag);
            }
        }
        if rewrite {
            client.rbuf().advance(self.client.c2s);
            self.client.c2s = 0;
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
        if self.client.c2s > 0 {
            return false;
        }
        let Some(prepared) = self.prepared.as_deref_mut() else {
            return false;
        };
        let exchange = &mut self.client.exchange;
        let (rbuf, wbuf) = client.buffers();
        let Some(Ok(message)) = frontend::messages(rbuf).next() else {
            return false;
        };
        let total = message.bytes.len();
        if exchange.front == Front::Rewrite {
            let effects = self.policy.track_effects.then_some(&mut self.effects);
            rewrite_message(prepared, message, server, client_params, effects);
            rbuf.advance(total);
            exchange.front = Front::Relayed;
            return true;
        }
        // An own DEALLOCATE is answered after everything sent before it.
        let answered =
            self.server.s2c == 0 && exchange.pending == 0 && server.conn.wbuf().is_empty();
        if exchange.front != Front::Answer || !answered {
            return false;
        }
        let status = self.server.status;
        prepared.deallocate(message.body, status, wbuf);
        rbuf.advance(total);
        exchange.front = Front::Relayed;
        self.client.needs_flush = true;
        if self.policy.transaction_pooling && status == TxStatus::Idle && !exchange.extended_open {
            self.server.release_point = true;
        }
        true
    }
}

/// Rewrites one client message into the server's write buffer; adds what the statement
/// a Bind runs does to the session to `effects`, if given.
fn rewrite_message(
    prepared: &mut Prepared,
    message: frontend::Message<'_>,
    server: &mut Server,
    client_params: &ParamSet,
    effects: Option<&mut Effects>,
) {
    let found = prepared.rewrite(
        message.tag,
        message.body,
        &mut server.statements,
        client_params.get("search_path"),
        server.conn.wbuf(),
    );
    if let (Some(effects), Some(found)) = (effects, found) {
        effects.merge(found.clone());
    }
}
