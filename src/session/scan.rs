//! The client side of the relay's scan: what each client message means for the wire
//! state (answers owed, extended-protocol state, request boundaries, COPY), and what
//! Query and Parse texts do to the session. No I/O: [`super::relay::Wire`] feeds it
//! bytes and acts on what it learned.

use crate::protocol::frontend::{self, KNOWN};
use crate::protocol::Step;
use crate::router::classify;
use crate::router::classify::effects::{session_effects, Effects};

/// What one scan of client bytes learned.
pub(super) struct ClientScan {
    /// Stop after each request that the server answers with ReadyForQuery.
    pub(super) hold: bool,
    /// Stopped so: the rest waits for the answer.
    pub(super) paused: bool,
    /// The request-ending message seen last, if any.
    pub(super) boundary: Option<u8>,
    pub(super) wire_pending: usize,
    /// Syncs counted in `pending` that the server ignored during COPY FROM STDIN.
    pub(super) ignored_syncs: usize,
    pub(super) copy_syncs: usize,
    pub(super) extended_open: bool,
    pub(super) unnamed_unexecuted: bool,
    pub(super) terminate: bool,
    pub(super) bad_tag: Option<u8>,
    /// Query and Execute messages seen.
    pub(super) queries: u64,
}

impl ClientScan {
    /// A scan that starts between requests; the caller carries over the wire state.
    pub(super) fn new(hold: bool) -> ClientScan {
        ClientScan {
            hold,
            paused: false,
            boundary: None,
            wire_pending: 0,
            ignored_syncs: 0,
            copy_syncs: 0,
            extended_open: false,
            unnamed_unexecuted: false,
            terminate: false,
            bad_tag: None,
            queries: 0,
        }
    }

    pub(super) fn on_message(&mut self, tag: u8, body: Option<&[u8]>, attached: bool) -> Step {
        if matches!(
            tag,
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL | frontend::FLUSH
        ) {
            self.boundary = Some(tag);
        }
        let answered = matches!(
            tag,
            frontend::QUERY | frontend::SYNC | frontend::FUNCTION_CALL
        );
        let boundary = if !attached {
            Step::StopAfter
        } else if self.hold && answered {
            self.paused = true;
            Step::StopAfter
        } else {
            Step::Forward
        };
        self.queries += u64::from(matches!(tag, frontend::QUERY | frontend::EXECUTE));
        match tag {
            _ if !KNOWN[tag as usize] => {
                self.bad_tag = Some(tag);
                Step::StopBefore
            }
            frontend::TERMINATE => {
                self.terminate = true;
                Step::StopBefore
            }
            frontend::QUERY => {
                self.wire_pending += 1;
                self.copy_syncs = 0;
                // A simple query destroys the unnamed statement.
                self.unnamed_unexecuted = false;
                boundary
            }
            frontend::SYNC | frontend::FUNCTION_CALL => {
                self.wire_pending += 1;
                self.copy_syncs += usize::from(tag == frontend::SYNC);
                self.extended_open = false;
                boundary
            }
            frontend::FLUSH => boundary,
            frontend::COPY_DONE | frontend::COPY_FAIL => {
                self.ignored_syncs += std::mem::take(&mut self.copy_syncs);
                Step::Forward
            }
            frontend::EXECUTE => {
                self.copy_syncs = 0;
                self.extended_open = true;
                self.unnamed_unexecuted = false;
                Step::Forward
            }
            frontend::PARSE => {
                self.extended_open = true;
                if body.is_some_and(|b| b.first() == Some(&0)) {
                    self.unnamed_unexecuted = true;
                }
                Step::Forward
            }
            frontend::BIND | frontend::DESCRIBE | frontend::CLOSE => {
                self.extended_open = true;
                Step::Forward
            }
            _ => Step::Forward,
        }
    }
}

/// Adds what a Query or Parse text does to the session.
pub(super) fn note_effects(track: bool, tag: u8, body: Option<&[u8]>, effects: &mut Effects) {
    if !track {
        return;
    }
    let text = match (tag, body) {
        (frontend::QUERY, Some(body)) => frontend::query_text(body).ok(),
        (frontend::PARSE, Some(body)) => crate::protocol::read_cstr(body)
            .and_then(|(_, rest)| crate::protocol::read_cstr(rest))
            .map(|(text, _)| text),
        _ => None,
    };
    if let Some(text) = text {
        let found = session_effects(text);
        if !found.is_empty() {
            effects.merge(found);
        }
    }
}

/// The database a Query needs free of other sessions (`DROP DATABASE x` and friends
/// fail while any session is connected to `x`, pgrelay's own idle servers included):
/// the session closes those before the Query goes out.
pub(super) fn database_command(tag: u8, body: Option<&[u8]>) -> Option<String> {
    if tag != frontend::QUERY {
        return None;
    }
    let sql = frontend::query_text(body?).ok()?;
    classify::database_needing_exclusive_use(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(tags: &[u8]) -> ClientScan {
        let mut state = ClientScan::new(false);
        for &tag in tags {
            state.on_message(tag, None, true);
        }
        state
    }

    #[test]
    fn syncs_inside_copy_in_are_owed_nothing() {
        // tokio-postgres: Bind, Execute, Sync, CopyData.., CopyDone, Sync.
        let state = scan(b"BESddcS");
        assert_eq!(state.wire_pending - state.ignored_syncs, 1);
        let state = scan(b"BESdfS");
        assert_eq!(state.wire_pending - state.ignored_syncs, 1);
        // Flush instead of Sync before the data: the one Sync is answered.
        let state = scan(b"BEHdcS");
        assert_eq!(state.wire_pending - state.ignored_syncs, 1);
        // A simple-protocol COPY after an extended query owes both ReadyForQuerys.
        let state = scan(b"BESQdc");
        assert_eq!(state.wire_pending - state.ignored_syncs, 2);
    }
}
