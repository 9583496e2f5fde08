//! What one server has prepared for clients in transaction mode: the ids of
//! pgrelay's content-named statements, in a bounded LRU (`max_prepared_statements`).
//!
//! It belongs to the server connection ([`super::server::Server`]); the client side
//! (`session::prepared`) decides what to prepare and reads and updates this record.

use std::collections::HashMap;

/// What one server has prepared: statement ids by last use, at most `capacity`.
#[derive(Debug, Default)]
pub struct ServerStatements {
    last_use: HashMap<u128, u64>,
    tick: u64,
}

impl ServerStatements {
    /// Whether the server has it; marks it used.
    pub fn touch(&mut self, id: u128) -> bool {
        self.tick += 1;
        match self.last_use.get_mut(&id) {
            Some(used) => {
                *used = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records a statement; returns the least recently used one it pushed out.
    pub fn insert(&mut self, id: u128, capacity: usize) -> Option<u128> {
        let evicted = if self.last_use.len() >= capacity.max(1) {
            let oldest = self
                .last_use
                .iter()
                .min_by_key(|(_, used)| **used)
                .map(|(id, _)| *id);
            oldest.inspect(|id| {
                self.last_use.remove(id);
            })
        } else {
            None
        };
        self.tick += 1;
        self.last_use.insert(id, self.tick);
        evicted
    }

    pub fn remove(&mut self, id: u128) {
        self.last_use.remove(&id);
    }

    /// The server dropped every statement (`DISCARD ALL`, `DEALLOCATE ALL`).
    /// The statements it has, for another process taking the server over.
    pub fn ids(&self) -> impl Iterator<Item = u128> + '_ {
        self.last_use.keys().copied()
    }

    /// A server's statements as [`ServerStatements::ids`] listed them.
    pub fn from_ids(ids: impl IntoIterator<Item = u128>) -> ServerStatements {
        let mut statements = ServerStatements::default();
        for id in ids {
            statements.tick += 1;
            statements.last_use.insert(id, statements.tick);
        }
        statements
    }

    pub fn clear(&mut self) {
        self.last_use.clear();
    }

    pub fn len(&self) -> usize {
        self.last_use.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_use.is_empty()
    }
}
