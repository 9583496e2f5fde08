//! Entry points shared by the cargo-fuzz targets in `fuzz/` (nightly) and the corpus
//! replay test `tests/fuzz_corpus.rs` (stable), so every decoder is exercised by both.
//! Each function must never panic, whatever the input. The runs and what each target
//! covers are recorded in `fuzz/README.md`.

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

/// Runs both sides of a SCRAM-SHA-256 exchange on hostile messages. The input is a
/// flags byte (bit 0: -PLUS offered, bit 1: -PLUS selected), then the client-first,
/// client-final and server-first messages separated by NUL bytes. `%N` in the
/// client-final stands for the server's nonce and in the server-first for the client's,
/// which are random, so that the fuzzer gets past the nonce checks.
pub fn scram(data: &[u8]) {
    use crate::auth::scram::{self, Binding, KeyClient, ServerExchange};
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let _ = crate::protocol::frontend::sasl_initial(rest);
    let mut parts = rest.splitn(3, |&b| b == 0);
    let client_first = parts.next().unwrap_or_default();
    let client_final = parts.next().unwrap_or_default();
    let server_first = parts.next().unwrap_or_default();

    let binding = Binding {
        offered: (flags & 1 != 0).then_some(b"certificate hash".as_slice()),
        selected: flags & 2 != 0,
    };
    let secret = scram::mock_secret("fuzz", &[7; 32]);
    if let Ok((exchange, sent)) = ServerExchange::start(secret, client_first, binding) {
        let nonce = sent
            .split(',')
            .next()
            .unwrap_or_default()
            .trim_start_matches("r=");
        let _ = exchange.finish(&replace_nonce(client_final, nonce));
    }

    let (client, first) = KeyClient::new([1; 32], [2; 32]);
    let nonce = first.rsplit_once("r=").map_or("", |(_, nonce)| nonce);
    if let Ok((client_final, server_final)) = client.respond(&replace_nonce(server_first, nonce)) {
        assert!(client_final.contains(",p=") && server_final.starts_with("v="));
    }
}

/// `message` with each `%N` replaced by `nonce`.
fn replace_nonce(message: &[u8], nonce: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + nonce.len());
    let mut rest = message;
    while let Some(at) = rest.windows(2).position(|w| w == b"%N") {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(nonce.as_bytes());
        rest = &rest[at + 2..];
    }
    out.extend_from_slice(rest);
    out
}

/// Parses a console query string as the admin console does: each `;`-separated command.
pub fn admin(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for command in text.split(';') {
        if let Ok(command) = crate::admin::parse(command) {
            let _ = command.read_only();
        }
    }
}

/// Parses and validates arbitrary text as a configuration file; anything wrong must be
/// an `Err`. A valid one is also read the ways the admin console and the pools read it.
pub fn config(data: &[u8]) {
    use crate::config::{Config, PatroniEndpoint, Secret};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Secret::parse(text);
    let _ = PatroniEndpoint::parse(text);
    let Ok(config) = Config::from_toml_str(text) else {
        return;
    };
    let _ = config.settings();
    for user in &config.users {
        for database in &config.databases {
            let _ = config.pool_mode_for(&database.name, &user.name);
            let _ = config.pool_size_for(&database.name, &user.name);
        }
    }
}

/// Parses `[[hba]]` addresses (CIDR ranges), checks that one prints back as itself and
/// matches addresses made of the input's bytes against it.
pub fn hba(data: &[u8]) {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use crate::config::Cidr;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cidr) = Cidr::parse(text) else {
        return;
    };
    assert_eq!(
        Cidr::parse(&cidr.to_string()),
        Ok(cidr),
        "{text:?} does not print back as itself"
    );
    let mut octets = [0u8; 16];
    for (octet, byte) in octets.iter_mut().zip(data.iter().rev()) {
        *octet = *byte;
    }
    let v4 = Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]);
    for ip in [
        IpAddr::V4(v4),
        IpAddr::V6(Ipv6Addr::from(octets)),
        IpAddr::V6(v4.to_ipv6_mapped()),
    ] {
        let _ = cidr.contains(ip);
    }
}
