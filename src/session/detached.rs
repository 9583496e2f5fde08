//! Between servers: the request a client sends while it holds none. It is read whole
//! (and, when it will be routed, understood as it is read), then routed, recorded,
//! sent, or discarded when no server could take it.

use std::future::poll_fn;
use std::io;

use bytes::Buf;

use super::relay::Wire;
use super::scan::{ClientEnd, Exchange, Flow, Front};
use crate::protocol::{frontend, ProtocolError, MAX_MESSAGE_LEN};
use crate::router::classify::Classifier;
use crate::router::Plan;
use crate::stream::{Conn, Stream};

impl Wire {
    /// Bytes of a complete request are buffered and scanned (detached mode).
    pub fn has_request(&self) -> bool {
        self.client.c2s > 0
    }

    pub fn client_done(&self) -> bool {
        self.client.end == ClientEnd::Done
    }

    pub fn take_protocol_error(&mut self) -> Option<ProtocolError> {
        self.client.end.take_error()
    }

    /// The complete request buffered while detached, for routing.
    pub fn request<'a>(&self, client: &'a mut Conn<Stream>) -> &'a [u8] {
        &client.rbuf()[..self.client.c2s]
    }

    /// Records the statements a just-routed request parses or closes on `node`.
    pub fn record_request(&mut self, client: &mut Conn<Stream>, node: usize) {
        self.node = node;
        if !self.policy.track_statements {
            return;
        }
        let request = &client.rbuf()[..self.client.c2s];
        for message in frontend::messages(request).map_while(Result::ok) {
            self.statements.observe(message.tag, message.body, node);
        }
    }

    /// Drops a buffered request the session answered itself, or will answer (e.g.
    /// with an error): it never reaches a server, which owes nothing for it.
    pub(super) fn consume_request(&mut self, client: &mut Conn<Stream>) {
        client.rbuf().advance(self.client.c2s);
        self.client.c2s = 0;
        self.client.exchange = Exchange::default();
    }

    /// Drops a buffered request the session answered itself (e.g. with an error).
    /// Returns true if the client still owes the Sync that ends it (the request ended
    /// with a Flush): PostgreSQL would then skip everything up to that Sync.
    pub fn discard_request(&mut self, client: &mut Conn<Stream>) -> bool {
        self.consume_request(client);
        self.client.last_boundary == Some(frontend::FLUSH)
    }

    /// After a failed extended request: drops client messages up to and including the
    /// next Sync, as PostgreSQL does after an error. Cancel safe.
    pub async fn skip_until_sync(
        &mut self,
        client: &mut Conn<Stream>,
    ) -> Result<(), crate::stream::StreamError> {
        loop {
            let frame = client.read_frame(MAX_MESSAGE_LEN).await?;
            match frame.tag() {
                frontend::SYNC => return Ok(()),
                frontend::TERMINATE => {
                    // A protocol error found before is reported first.
                    if self.client.end == ClientEnd::Open {
                        self.client.end = ClientEnd::Done;
                    }
                    return Ok(());
                }
                _ => {}
            }
        }
    }

    /// Detached: reads until a complete request (up to Query, Sync, Flush or
    /// FunctionCall) is scanned, or the client leaves. Cancel safe.
    ///
    /// With a `classifier`, the request is read for routing: each text is understood
    /// once, and [`Wire::texts`] holds what the texts mean for the route.
    pub async fn read_request(
        &mut self,
        client: &mut Conn<Stream>,
        classifier: Option<&Classifier>,
    ) -> Result<(), io::Error> {
        self.texts = Plan::default();
        let exchange = &mut self.client.exchange;
        if exchange.flow == Flow::Paused {
            exchange.flow = Flow::Flowing;
        }
        // Whatever a scan stopped in front of last time is scanned again from here.
        exchange.front = Front::Relayed;
        exchange.rewrite_buffered = false;
        loop {
            let buf = &client.rbuf()[self.client.c2s..];
            let stopped = self.scan_client_routed(buf, false, classifier);
            if stopped || self.client.end == ClientEnd::Done {
                return Ok(());
            }
            // One compare per read of the socket, none per message: a request that
            // outgrows the limit is refused before more of it is buffered.
            let max = self.policy.max_request;
            if max > 0 && client.rbuf_len() > max {
                self.client.end = ClientEnd::Broken(ProtocolError::TooLarge { max });
                return Ok(());
            }
            if poll_fn(|cx| client.poll_read_more(cx)).await? == 0 {
                self.client.end = ClientEnd::Done;
                return Ok(());
            }
        }
    }
}
