//! The relay's state machine over bytes, with no sockets: client bytes and server
//! bytes are fed to the scanning functions, and the tests check what would be
//! forwarded, what the client is owed, and the transaction status.

use bytes::BytesMut;

use super::*;
use crate::pool::statements::ServerStatements;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    frontend::put_message(&mut out, tag, body);
    out.to_vec()
}

fn cat(messages: &[Vec<u8>]) -> Vec<u8> {
    messages.concat()
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', format!("{sql}\0").as_bytes())
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    msg(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

fn bind(statement: &str) -> Vec<u8> {
    msg(b'B', format!("\0{statement}\0\0\0\0\0\0\0").as_bytes())
}

fn describe_portal() -> Vec<u8> {
    msg(b'D', b"P\0")
}

fn execute() -> Vec<u8> {
    msg(b'E', b"\0\0\0\0\0")
}

fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

fn flush() -> Vec<u8> {
    msg(b'H', b"")
}

fn copy_data(data: &[u8]) -> Vec<u8> {
    msg(b'd', data)
}

fn copy_done() -> Vec<u8> {
    msg(b'c', b"")
}

fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', format!("{tag}\0").as_bytes())
}

fn error(severity: &str) -> Vec<u8> {
    msg(
        b'E',
        format!("S{severity}\0V{severity}\0C42601\0Msyntax error\0\0").as_bytes(),
    )
}

fn row() -> Vec<u8> {
    msg(b'D', b"\0\x01\0\0\0\x011")
}

fn row_description() -> Vec<u8> {
    msg(b'T', b"\0\0")
}

/// One client's relay state and the bytes on both sides, as the poll loop would
/// keep them: scanned bytes are forwarded at once.
struct Relay {
    wire: Wire,
    from_client: Vec<u8>,
    from_server: Vec<u8>,
    client_params: ParamSet,
    server_params: ParamSet,
    statements: ServerStatements,
}

impl Relay {
    fn new(policy: Policy) -> Relay {
        Relay {
            wire: Wire::new(policy, None),
            from_client: Vec::new(),
            from_server: Vec::new(),
            client_params: ParamSet::default(),
            server_params: ParamSet::default(),
            statements: ServerStatements::default(),
        }
    }

    fn transaction_mode() -> Relay {
        Relay::new(Policy {
            transaction_pooling: true,
            ..Policy::default()
        })
    }

    /// The client sends `bytes`: what goes to the server now.
    fn client(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.from_client.extend_from_slice(bytes);
        let buf = self.from_client[self.wire.client.c2s..].to_vec();
        self.wire.scan_client_bytes(&buf, true);
        let scanned = std::mem::take(&mut self.wire.client.c2s);
        self.from_client.drain(..scanned).collect()
    }

    /// The server answered: what the client sent meanwhile goes on (as
    /// [`Wire::relay`] does on [`Flow::Resume`]).
    fn resume(&mut self) -> Vec<u8> {
        assert_eq!(self.wire.client.exchange.flow, Flow::Resume);
        self.wire.client.exchange.flow = Flow::Flowing;
        self.client(b"")
    }

    /// The server sends `bytes`: what goes to the client now.
    fn server(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.from_server.extend_from_slice(bytes);
        let buf = self.from_server[self.wire.server.s2c..].to_vec();
        let parts = ServerParts {
            pid: 7,
            params: &mut self.server_params,
            statements: &mut self.statements,
        };
        self.wire
            .scan_server_bytes(&buf, parts, &mut self.client_params);
        let scanned = std::mem::take(&mut self.wire.server.s2c);
        self.from_server.drain(..scanned).collect()
    }

    fn pending(&self) -> usize {
        self.wire.client.exchange.pending
    }

    /// The transaction is over and the server may go back to its pool.
    fn released(&self) -> bool {
        self.wire.server.release_point && self.wire.between_transactions()
    }
}

#[test]
fn a_pipelined_extended_request_is_forwarded_as_it_comes() {
    let mut relay = Relay::transaction_mode();
    let first = cat(&[
        parse("", "select 1"),
        bind(""),
        describe_portal(),
        execute(),
        sync(),
    ]);
    let second = cat(&[parse("", "select 2"), bind(""), execute(), sync()]);
    let pipeline = cat(&[first, second]);
    // Cut inside the second Parse: what arrived whole goes on, the rest waits.
    let cut = pipeline.len() - 30;
    let sent = relay.client(&pipeline[..cut]);
    assert!(sent.len() <= cut && sent.len() > cut - 30);
    assert_eq!(relay.pending(), 1);
    let sent_rest = relay.client(&pipeline[cut..]);
    assert_eq!([sent, sent_rest].concat(), pipeline);
    assert_eq!(relay.pending(), 2, "two Syncs: two ReadyForQuery owed");
    assert!(!relay.wire.client.exchange.extended_open);

    let answer = cat(&[
        msg(b'1', b""),
        msg(b'2', b""),
        row_description(),
        row(),
        complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(relay.server(&answer), answer);
    assert_eq!(relay.pending(), 1);
    assert!(!relay.released(), "the second request is still owed");
    let answer = cat(&[
        msg(b'1', b""),
        msg(b'2', b""),
        row(),
        complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(relay.server(&answer), answer);
    assert_eq!(relay.pending(), 0);
    assert!(relay.released());
    assert_eq!(relay.wire.take_counts().queries, 2);
}

#[test]
fn an_error_mid_pipeline_skips_to_sync() {
    let mut relay = Relay::transaction_mode();
    // One Sync for three statements: the server skips what follows the error.
    let request = cat(&[
        parse("", "select 1"),
        bind(""),
        execute(),
        parse("", "selec 2"),
        bind(""),
        execute(),
        parse("", "select 3"),
        bind(""),
        execute(),
        sync(),
    ]);
    assert_eq!(relay.client(&request), request);
    assert_eq!(relay.pending(), 1);
    let answer = cat(&[
        msg(b'1', b""),
        msg(b'2', b""),
        row(),
        complete("SELECT 1"),
        error("ERROR"),
        ready(b'I'),
    ]);
    assert_eq!(
        relay.server(&answer),
        answer,
        "the error reaches the client"
    );
    assert_eq!(relay.pending(), 0);
    assert!(relay.released());
    assert_eq!(relay.wire.take_counts().errors, [1, 0, 0]);
}

#[test]
fn a_fatal_error_ends_the_relay_and_is_kept_for_the_session() {
    let mut relay = Relay::transaction_mode();
    relay.client(&query("select 1"));
    let sent = relay.server(&cat(&[row_description(), error("FATAL")]));
    assert_eq!(sent, row_description(), "the FATAL error is not forwarded");
    assert!(matches!(relay.wire.server.end, ServerEnd::Closed));
    assert!(relay.wire.take_server_fatal().is_some());
    assert_eq!(relay.wire.take_counts().errors, [0, 1, 0]);
}

#[test]
fn copy_in_waits_for_the_server_then_streams() {
    // Routing on a replica: one request at a time.
    let mut relay = Relay::new(Policy {
        transaction_pooling: true,
        hold_at_boundary: true,
        ..Policy::default()
    });
    let copy = query("copy t from stdin");
    let data = cat(&[copy_data(b"1\n"), copy_data(b"2\n"), copy_done()]);
    let sent = relay.client(&cat(&[copy.clone(), data.clone()]));
    assert_eq!(sent, copy, "the data waits for the server's answer");
    assert_eq!(relay.wire.client.exchange.flow, Flow::Paused);
    // CopyInResponse: the server waits for the data.
    let copy_in = msg(b'G', b"\0\0\0");
    assert_eq!(relay.server(&copy_in), copy_in);
    assert_eq!(relay.resume(), data);
    assert_eq!(relay.pending(), 1);
    relay.server(&cat(&[complete("COPY 2"), ready(b'I')]));
    assert_eq!(relay.pending(), 0);
    assert!(relay.released());
}

#[test]
fn syncs_sent_into_copy_in_are_owed_nothing() {
    // tokio-postgres: Bind, Execute, Sync, then the data, CopyDone, Sync.
    let mut relay = Relay::transaction_mode();
    let request = cat(&[
        parse("", "copy t from stdin"),
        bind(""),
        execute(),
        sync(),
        copy_data(b"1\n"),
        copy_done(),
        sync(),
    ]);
    assert_eq!(relay.client(&request), request);
    assert_eq!(relay.pending(), 1);
    let answer = cat(&[
        msg(b'1', b""),
        msg(b'2', b""),
        msg(b'G', b"\0\0\0"),
        complete("COPY 1"),
        ready(b'I'),
    ]);
    assert_eq!(relay.server(&answer), answer);
    assert!(relay.released());
}

#[test]
fn copy_out_streams_before_each_row_has_arrived() {
    let mut relay = Relay::transaction_mode();
    relay.client(&query("copy t to stdout"));
    let big = copy_data(&[b'x'; 1000]);
    let answer = cat(&[msg(b'H', b"\0\0\0"), big.clone()]);
    // Half of the big CopyData: it streams anyway.
    let half = answer.len() - 500;
    assert_eq!(relay.server(&answer[..half]), &answer[..half]);
    assert!(!relay.wire.server.scanner.at_boundary());
    assert_eq!(relay.server(&answer[half..]), &answer[half..]);
    let end = cat(&[copy_done(), complete("COPY 1"), ready(b'I')]);
    assert_eq!(relay.server(&end), end);
    assert!(relay.released());
}

#[test]
fn a_server_lost_mid_response_leaves_what_the_client_is_owed() {
    let mut relay = Relay::transaction_mode();
    relay.client(&cat(&[query("select 1"), query("select 2")]));
    relay.server(&cat(&[row_description(), msg(b'D', b"\0\x01")]));
    assert_eq!(relay.wire.server.status, TxStatus::Idle);
    let loss = relay
        .wire
        .forget_server()
        .expect("the client is between messages");
    assert_eq!(
        loss,
        Loss {
            owed: 2,
            sync_owed: false
        }
    );
    // Both sides start afresh.
    assert_eq!(relay.pending(), 0);
    assert!(relay.wire.server.scanner.at_boundary());
    assert!(relay.wire.server.end.is_open());
    assert!(relay.wire.between_transactions());
}

#[test]
fn a_server_lost_under_an_open_extended_request_owes_the_sync() {
    let mut relay = Relay::transaction_mode();
    relay.client(&cat(&[parse("", "select 1"), bind(""), execute(), flush()]));
    relay.server(&msg(b'1', b""));
    let loss = relay.wire.forget_server().expect("between messages");
    assert_eq!(
        loss,
        Loss {
            owed: 0,
            sync_owed: true
        }
    );
}

#[test]
fn a_server_lost_while_the_client_is_mid_message_cannot_be_replaced() {
    let mut relay = Relay::transaction_mode();
    relay.client(&query("copy t from stdin"));
    let data = copy_data(&[b'x'; 100]);
    relay.client(&data[..50]);
    assert_eq!(relay.wire.forget_server(), None);
}

#[test]
fn the_status_moves_idle_in_block_failed_idle() {
    let mut relay = Relay::transaction_mode();
    relay.client(&query("begin"));
    relay.server(&complete("BEGIN"));
    // Before its ReadyForQuery the block is already the client's.
    assert!(relay.wire.in_block());
    relay.server(&ready(b'T'));
    assert_eq!(relay.wire.status(), TxStatus::InBlock);
    assert!(!relay.released(), "inside a block the server stays");

    relay.client(&query("selec 1"));
    relay.server(&cat(&[error("ERROR"), ready(b'E')]));
    assert_eq!(relay.wire.status(), TxStatus::Failed);
    assert!(relay.wire.in_block());
    assert!(!relay.released());

    relay.client(&query("rollback"));
    relay.server(&cat(&[complete("ROLLBACK"), ready(b'I')]));
    assert_eq!(relay.wire.status(), TxStatus::Idle);
    assert!(!relay.wire.in_block());
    assert!(relay.released());
}

#[test]
fn session_mode_never_releases() {
    let mut relay = Relay::new(Policy::default());
    relay.client(&query("select 1"));
    relay.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
    assert_eq!(relay.pending(), 0);
    assert!(!relay.wire.server.release_point);
}

#[test]
fn flush_without_sync_keeps_the_server() {
    let mut relay = Relay::transaction_mode();
    let request = cat(&[parse("", "select 1"), bind(""), execute(), flush()]);
    assert_eq!(relay.client(&request), request);
    assert_eq!(relay.pending(), 0, "a Flush is owed no ReadyForQuery");
    assert!(relay.wire.client.exchange.extended_open);
    let answer = cat(&[msg(b'1', b""), msg(b'2', b""), row(), complete("SELECT 1")]);
    assert_eq!(relay.server(&answer), answer);
    assert!(!relay.released());
    assert!(
        !relay.wire.between_transactions(),
        "the request is still open"
    );
    relay.client(&sync());
    assert_eq!(relay.pending(), 1);
    relay.server(&ready(b'I'));
    assert!(relay.released());
}

#[test]
fn an_unnamed_statement_keeps_its_server_until_it_runs() {
    let mut relay = Relay::transaction_mode();
    relay.client(&cat(&[parse("", "select 1"), sync()]));
    relay.server(&cat(&[msg(b'1', b""), ready(b'I')]));
    assert!(!relay.wire.server.release_point);
    relay.client(&cat(&[bind(""), execute(), sync()]));
    relay.server(&cat(&[msg(b'2', b""), complete("SELECT 1"), ready(b'I')]));
    assert!(relay.released());
}

#[test]
fn detached_reads_stop_at_each_request_boundary() {
    let mut relay = Relay::transaction_mode();
    let first = cat(&[parse("", "select 1"), bind(""), execute(), flush()]);
    let bytes = cat(&[first.clone(), sync(), query("select 2")]);
    assert!(relay.wire.scan_client_bytes(&bytes, false));
    assert_eq!(relay.wire.client.c2s, first.len());
    assert_eq!(relay.wire.client.last_boundary, Some(frontend::FLUSH));
    assert!(relay.wire.has_request());
}

#[test]
fn terminate_and_unknown_messages_end_the_client_side() {
    let mut relay = Relay::transaction_mode();
    let select = query("select 1");
    assert_eq!(
        relay.client(&cat(&[select.clone(), msg(b'X', b"")])),
        select
    );
    assert!(relay.wire.client_done());

    let mut relay = Relay::transaction_mode();
    assert_eq!(
        relay.client(&cat(&[select.clone(), msg(b'z', b"")])),
        select
    );
    assert_eq!(
        relay.wire.take_protocol_error(),
        Some(ProtocolError::UnexpectedTag { tag: 'z' })
    );
}

#[test]
fn parameter_status_is_noted_for_both_sides() {
    let mut relay = Relay::transaction_mode();
    relay.client(&query("set application_name = 'x'"));
    relay.server(&cat(&[
        msg(b'S', b"application_name\0x\0"),
        complete("SET"),
        ready(b'I'),
    ]));
    assert_eq!(relay.client_params.get("application_name"), Some("x"));
    assert_eq!(relay.server_params.get("application_name"), Some("x"));
}

#[test]
fn holding_at_boundaries_sends_one_request_at_a_time() {
    let mut relay = Relay::new(Policy {
        transaction_pooling: true,
        hold_at_boundary: true,
        ..Policy::default()
    });
    let (begin, select, commit) = (query("begin"), query("select 1"), query("commit"));
    let sent = relay.client(&cat(&[begin.clone(), select.clone()]));
    assert_eq!(sent, begin);
    // Not answered yet: more client bytes wait too.
    assert_eq!(relay.client(&commit), b"");
    relay.server(&cat(&[complete("BEGIN"), ready(b'T')]));
    assert!(!relay.wire.server.release_point);
    assert_eq!(relay.resume(), select, "one request, then a pause again");
    relay.server(&cat(&[complete("SELECT 1"), ready(b'T')]));
    assert_eq!(relay.resume(), commit);
    relay.server(&cat(&[complete("COMMIT"), ready(b'I')]));
    assert!(relay.released());
}

#[test]
fn a_finished_transaction_leaves_the_next_request_to_be_routed() {
    let mut relay = Relay::new(Policy {
        transaction_pooling: true,
        hold_at_boundary: true,
        ..Policy::default()
    });
    let (first, second) = (query("select 1"), query("select 2"));
    assert_eq!(relay.client(&cat(&[first.clone(), second.clone()])), first);
    relay.server(&cat(&[complete("SELECT 1"), ready(b'I')]));
    // The server goes back; the second request is read and routed on its own.
    assert!(relay.released());
    assert_eq!(relay.wire.client.exchange.flow, Flow::Paused);
    assert_eq!(relay.from_client, second);
}

#[test]
fn the_clients_own_notifications_stop_the_scan_at_the_sender_pid() {
    let mut relay = Relay::new(Policy {
        transaction_pooling: true,
        own_pid: Some(1234),
        ..Policy::default()
    });
    relay.client(&query("listen x"));
    let mut body = 7i32.to_be_bytes().to_vec();
    body.extend(b"x\0\0");
    let notification = msg(b'A', &body);
    let answer = cat(&[complete("LISTEN"), notification.clone(), ready(b'I')]);
    relay.from_server.extend_from_slice(&answer);
    let parts = ServerParts {
        pid: 7,
        params: &mut relay.server_params,
        statements: &mut relay.statements,
    };
    let at = relay
        .wire
        .scan_server_bytes(&answer, parts, &mut relay.client_params);
    // The pid sits after the notification's header.
    assert_eq!(at, Some(complete("LISTEN").len() + HEADER_LEN));
    assert_eq!(relay.wire.server.s2c, answer.len() - ready(b'I').len());
}

/// A request read for routing is understood once as it is read: the route class of
/// its texts and what they do to the session come from the same pass.
#[test]
fn a_request_read_for_routing_is_understood_once() {
    use crate::router::classify::{Classifier, Command, Reason, Target};
    let classifier = Classifier::new(&[], &[]);
    let tracking = || {
        Relay::new(Policy {
            transaction_pooling: true,
            track_effects: true,
            ..Policy::default()
        })
    };
    let mut relay = tracking();
    let request = cat(&[
        parse("", "SET statement_timeout = 5"),
        bind(""),
        execute(),
        sync(),
    ]);
    assert!(relay
        .wire
        .scan_client_routed(&request, false, Some(&classifier)));
    let texts = &relay.wire.texts;
    assert_eq!(texts.target, Target::Primary);
    assert_eq!(texts.reason, Some(Reason::SessionState));
    assert!(texts.session_state);
    assert_eq!(
        &*relay.wire.effects.settings,
        [Box::from("statement_timeout")]
    );
    let planned =
        crate::router::plan_request(&request, texts.clone(), &classifier, &relay.wire.statements);
    assert_eq!(planned.command, Some(Command::Other));

    // A read that is not routed leaves the plan alone, and still notes effects.
    let mut relay = tracking();
    assert!(relay
        .wire
        .scan_client_bytes(&query("INSERT INTO t VALUES (1)"), false));
    assert_eq!(relay.wire.texts.target, Target::Replica);
    assert!(relay.wire.scan_client_bytes(&query("LISTEN x"), false));
    assert!(relay.wire.effects.may_pin);
}
