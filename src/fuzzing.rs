//! Entry points shared by the cargo-fuzz targets in `fuzz/` (nightly) and the corpus
//! replay test `tests/fuzz_corpus.rs` (stable), so every decoder is exercised by both.
//! Each function must never panic, whatever the input.

use std::sync::OnceLock;

use bytes::BytesMut;

use crate::protocol::{self, startup, Scanner, Step};

/// Splits frames off arbitrary bytes until an error or a need for more.
pub fn frame(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = protocol::split_frame(&mut buf, 1 << 20) {
        let _ = (frame.tag(), frame.body().len());
    }
}

/// Decodes startup-phase packets, and the options string of any StartupMessage.
pub fn startup(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = startup::decode(&mut buf) {
        if let startup::StartupPacket::Startup(params) = packet {
            if let Some(options) = params.get("options") {
                let _ = startup::parse_options(options);
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = startup::parse_options(text);
    }
}

/// Feeds the relay's scanners (both directions) in two chunks split at the first byte's
/// value, checking that they never claim more bytes than they were given.
pub fn scanner(data: &[u8]) {
    let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
    for inspect in [&protocol::frontend::INSPECT, &protocol::backend::INSPECT] {
        let mut scanner = Scanner::new(inspect, 1 << 20);
        let mut start = 0;
        for end in [cut, data.len()] {
            let Some(chunk) = data.get(start..end) else {
                break;
            };
            match scanner.scan(chunk, |tag, body| {
                if let Some(body) = body {
                    let _ = protocol::backend::ready_status(body);
                    let _ = protocol::backend::parameter_status(body);
                    let _ = protocol::frontend::query_text(body);
                }
                if tag == b'X' {
                    Step::StopBefore
                } else {
                    Step::Forward
                }
            }) {
                Ok(scanned) => {
                    assert!(
                        scanned.forward <= chunk.len(),
                        "scanner forwarded bytes it was not given"
                    );
                    start += scanned.forward;
                }
                Err(_) => break,
            }
        }
    }
}

/// Walks arbitrary bytes as a buffered client request and reads every message through
/// the view of its type, checking that the walk covers the bytes exactly.
pub fn messages(data: &[u8]) {
    use crate::protocol::frontend;
    let mut walk = frontend::messages(data);
    let mut covered = 0;
    for message in walk.by_ref() {
        let Ok(message) = message else {
            return;
        };
        covered += message.bytes.len();
        let body = message.body;
        let _ = match message.tag {
            frontend::PARSE => frontend::parse(body)
                .and_then(|p| p.param_types())
                .map(<[u8]>::len),
            frontend::BIND => frontend::bind(body)
                .and_then(|b| b.params())
                .map(|p| p.values().count() + p.formats().count() + p.result_formats().count()),
            frontend::DESCRIBE => frontend::describe(body).map(|_| 0),
            frontend::CLOSE => frontend::close(body).map(|_| 0),
            frontend::EXECUTE => frontend::execute(body).map(|e| e.portal.len()),
            frontend::SYNC => frontend::sync(body).map(|()| 0),
            _ => frontend::query_text(body).map(<[u8]>::len),
        };
    }
    assert_eq!(
        covered + walk.rest().len(),
        data.len(),
        "the walk lost bytes"
    );
}

/// Runs the SQL classifiers on arbitrary bytes and, for text sqlparser can parse,
/// checks that the statement classifier is never less conservative than the oracle.
pub fn classify(data: &[u8]) {
    use crate::router::classify::{self, Classifier};
    // Built once: the fuzzer calls this millions of times. Only the built-in function
    // lists, because those are all the oracle knows.
    static CLASSIFIER: OnceLock<Classifier> = OnceLock::new();
    let _ = classify::database_needing_exclusive_use(data);
    let classifier = CLASSIFIER.get_or_init(|| Classifier::new(&[], &[]));
    let verdict = classifier.classify(data);
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(
            classify::agrees_with_oracle(text, &verdict),
            "less conservative than the oracle: {text:?} {verdict:?}"
        );
    }
}
