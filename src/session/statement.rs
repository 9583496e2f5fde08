//! A client statement's identity, and what all sessions know of statements.
//!
//! A statement is known by its content: its text and parameter types, the client's
//! `search_path` and the schema generation it was prepared in. Equal statements of many
//! clients share one server-side statement, `pgrelay_<128-bit hash>`; [`Parsed`] is what
//! every session knows of them (which parsed, which went stale, the generation).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dashmap::DashSet;

use crate::protocol::read_cstr;
use crate::router::classify::effects::Effects;
use crate::router::classify::session_effects;

/// Server-side names start so; client names never reach a server with it.
pub(super) const PREFIX: &[u8] = b"pgrelay_";
const NAME_LEN: usize = PREFIX.len() + 32;

/// One statement a client prepared.
#[derive(Debug)]
pub struct Statement {
    pub(super) id: u128,
    pub(super) name: [u8; NAME_LEN],
    /// The Parse body after the statement name: text, parameter count and types.
    pub(super) rest: Bytes,
    /// What executing it does to the session, if anything.
    pub(super) effects: Option<Box<Effects>>,
}

impl Statement {
    /// `generation` is the schema generation it was prepared in (see [`Parsed`]).
    pub(super) fn new(rest: &[u8], search_path: Option<&str>, generation: u64) -> Statement {
        let hash = |salt: u8| {
            let mut hasher = DefaultHasher::new();
            salt.hash(&mut hasher);
            rest.hash(&mut hasher);
            // The same text means other tables under another search_path.
            search_path.hash(&mut hasher);
            // After a schema change the same text may return another shape: it is
            // another statement, prepared afresh on every server.
            generation.hash(&mut hasher);
            hasher.finish()
        };
        let id = (u128::from(hash(1)) << 64) | u128::from(hash(2));
        let text = read_cstr(rest).map_or(&[][..], |(text, _)| text);
        let effects = session_effects(text);
        Statement {
            id,
            name: server_name(id),
            rest: Bytes::copy_from_slice(rest),
            effects: (!effects.is_empty()).then(|| Box::new(effects)),
        }
    }

    /// The SQL text, for routing.
    pub fn text(&self) -> &[u8] {
        read_cstr(&self.rest).map_or(&[][..], |(text, _)| text)
    }
}

/// What all sessions know about statements, shared.
///
/// - Statements some server has parsed without error, by id: a client that prepares one
///   of them (Parse and Sync, nothing else) is answered without a server.
/// - The schema generation, bumped by every schema change pgrelay sees (DDL or `DISCARD
///   PLANS`/`ALL` through it, or a server refusing a statement as stale). It is part of a
///   statement's id, so a statement a client prepares after a change is never served
///   from a preparation made before it.
/// - Statements a server refused because their result shape changed (0A000 "cached plan
///   must not change result type"): PostgreSQL refuses them on every connection that
///   prepared them before the change, so pgrelay never prepares them afresh on another
///   server, where they would silently return the new shape.
///
/// The sets are bounded; each is emptied when full.
#[derive(Debug, Default)]
pub struct Parsed {
    ids: DashSet<u128>,
    generation: AtomicU64,
    stale: DashSet<u128>,
}

const PARSED_MAX: usize = 10_000;

impl Parsed {
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The schema may have changed: statements prepared from now on get new ids.
    pub fn schema_changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn mark_stale(&self, id: u128) {
        if self.stale.len() >= PARSED_MAX {
            self.stale.clear();
        }
        self.stale.insert(id);
    }

    pub(super) fn is_stale(&self, id: u128) -> bool {
        self.stale.contains(&id)
    }

    pub(super) fn knows(&self, id: u128) -> bool {
        self.ids.contains(&id)
    }

    pub(super) fn learn(&self, id: u128) {
        if self.ids.len() >= PARSED_MAX {
            self.ids.clear();
        }
        self.ids.insert(id);
    }
}

pub(super) fn server_name(id: u128) -> [u8; NAME_LEN] {
    let mut name = [0u8; NAME_LEN];
    name[..PREFIX.len()].copy_from_slice(PREFIX);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in name[PREFIX.len()..].iter_mut().enumerate() {
        *slot = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    name
}
