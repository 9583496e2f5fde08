//! The pgrelay.toml an importer writes, as data: sections in pgrelay's order, their keys
//! and the comments that explain what was (not) carried over. Rendering is
//! deterministic: the same input gives the same text, byte for byte.

use std::collections::BTreeMap;

/// A table of the output file, in the order it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Section {
    /// Top-level keys (before any table header).
    Top,
    Pool,
    Routing,
    HealthCheck,
    Failover,
    Tls,
    Limits,
    Backends,
    Databases,
    Users,
    Hba,
}

impl Section {
    const ALL: [Section; 11] = [
        Section::Top,
        Section::Pool,
        Section::Routing,
        Section::HealthCheck,
        Section::Failover,
        Section::Tls,
        Section::Limits,
        Section::Backends,
        Section::Databases,
        Section::Users,
        Section::Hba,
    ];

    fn name(self) -> &'static str {
        match self {
            Section::Top => "",
            Section::Pool => "pool",
            Section::Routing => "routing",
            Section::HealthCheck => "health_check",
            Section::Failover => "failover",
            Section::Tls => "tls",
            Section::Limits => "limits",
            Section::Backends => "backends",
            Section::Databases => "databases",
            Section::Users => "users",
            Section::Hba => "hba",
        }
    }

    fn is_array(self) -> bool {
        matches!(
            self,
            Section::Backends | Section::Databases | Section::Users | Section::Hba
        )
    }
}

/// One table: its keys in the order they were set, each with the comment lines above it.
#[derive(Debug, Default, Clone)]
pub(super) struct Table {
    /// Comment lines written above the table's header (array entries) or first key.
    notes: Vec<String>,
    keys: Vec<(String, toml::Value, Vec<String>)>,
}

impl Table {
    /// Sets `key` (replacing an earlier value, which keeps its place).
    pub(super) fn set(&mut self, key: &str, value: impl Into<toml::Value>) {
        let value = value.into();
        match self.keys.iter_mut().find(|(k, _, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.keys.push((key.to_owned(), value, Vec::new())),
        }
    }

    /// Sets `key` with a comment line above it.
    pub(super) fn set_noted(&mut self, key: &str, value: impl Into<toml::Value>, note: String) {
        self.set(key, value);
        if let Some(entry) = self.keys.iter_mut().find(|(k, _, _)| k == key) {
            entry.2.push(note);
        }
    }

    /// The value of `key`, if set.
    pub(super) fn get(&self, key: &str) -> Option<&toml::Value> {
        self.keys.iter().find(|(k, _, _)| k == key).map(|e| &e.1)
    }

    /// A comment line for this table.
    pub(super) fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    fn is_empty(&self) -> bool {
        self.notes.is_empty() && self.keys.is_empty()
    }
}

/// The whole output file.
#[derive(Debug, Default)]
pub(super) struct Doc {
    /// Comment lines at the top of the file.
    intro: Vec<String>,
    /// The single tables (`Top`, `[pool]`...), by section.
    single: BTreeMap<Section, Table>,
    /// The entries of the array sections (`[[backends]]`...), by section.
    arrays: BTreeMap<Section, Vec<Table>>,
    /// Comment lines written before an array section's first entry.
    array_notes: BTreeMap<Section, Vec<String>>,
}

impl Doc {
    pub(super) fn intro(&mut self, text: impl Into<String>) {
        self.intro.push(text.into());
    }

    /// The single table of `section` (not an array section).
    pub(super) fn table(&mut self, section: Section) -> &mut Table {
        debug_assert!(!section.is_array());
        self.single.entry(section).or_default()
    }

    pub(super) fn set(&mut self, section: Section, key: &str, value: impl Into<toml::Value>) {
        self.table(section).set(key, value);
    }

    pub(super) fn get(&self, section: Section, key: &str) -> Option<&toml::Value> {
        self.single.get(&section).and_then(|t| t.get(key))
    }

    /// A comment in `section`: above its keys, or above an array section's entries.
    pub(super) fn note(&mut self, section: Section, text: impl Into<String>) {
        if section.is_array() {
            self.array_notes
                .entry(section)
                .or_default()
                .push(text.into());
        } else {
            self.table(section).note(text);
        }
    }

    /// A new entry of an array section.
    pub(super) fn push(&mut self, section: Section) -> &mut Table {
        debug_assert!(section.is_array());
        let entries = self.arrays.entry(section).or_default();
        entries.push(Table::default());
        let last = entries.len() - 1;
        &mut entries[last]
    }

    /// The entries of an array section, to change.
    pub(super) fn entries_mut(&mut self, section: Section) -> &mut [Table] {
        self.arrays
            .get_mut(&section)
            .map_or(&mut [], Vec::as_mut_slice)
    }

    /// The entries of an array section so far.
    #[cfg(test)]
    pub(super) fn entries(&self, section: Section) -> &[Table] {
        self.arrays.get(&section).map_or(&[], Vec::as_slice)
    }

    /// The file's text.
    pub(super) fn render(&self) -> String {
        let mut out = String::new();
        for line in &self.intro {
            comment(&mut out, line);
        }
        for section in Section::ALL {
            if section.is_array() {
                self.render_array(section, &mut out);
            } else if let Some(table) = self.single.get(&section).filter(|t| !t.is_empty()) {
                out.push('\n');
                if section != Section::Top {
                    out.push_str(&format!("[{}]\n", section.name()));
                }
                render_table(table, &mut out);
            }
        }
        out
    }

    fn render_array(&self, section: Section, out: &mut String) {
        if let Some(notes) = self.array_notes.get(&section) {
            out.push('\n');
            for line in notes {
                comment(out, line);
            }
        }
        for table in self.arrays.get(&section).into_iter().flatten() {
            out.push('\n');
            for line in &table.notes {
                comment(out, line);
            }
            out.push_str(&format!("[[{}]]\n", section.name()));
            let keys_only = Table {
                notes: Vec::new(),
                keys: table.keys.clone(),
            };
            render_table(&keys_only, out);
        }
    }
}

fn render_table(table: &Table, out: &mut String) {
    for line in &table.notes {
        comment(out, line);
    }
    for (key, value, notes) in &table.keys {
        for line in notes {
            comment(out, line);
        }
        out.push_str(&format!("{key} = {value}\n"));
    }
}

/// Writes `text` as `# ` comment lines of at most about 92 columns.
fn comment(out: &mut String, text: &str) {
    const WIDTH: usize = 90;
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&format!("# {line}\n"));
            line = "  ".to_owned();
        }
        if !line.trim().is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.trim().is_empty() || text.is_empty() {
        out.push_str(format!("# {line}").trim_end());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sections_in_order_with_comments() {
        let mut doc = Doc::default();
        doc.intro("made by a test");
        doc.set(Section::Pool, "mode", "session");
        doc.set(Section::Top, "listen", vec!["0.0.0.0:6432"]);
        doc.note(
            Section::Pool,
            "pgbouncer: reserve_pool_size = 5 -- no reserve pool",
        );
        let backend = doc.push(Section::Backends);
        backend.note("from [databases] app");
        backend.set("host", "db1");
        backend.set("port", 5433);
        let text = doc.render();
        assert_eq!(
            text,
            "# made by a test\n\nlisten = [\"0.0.0.0:6432\"]\n\n[pool]\n\
             # pgbouncer: reserve_pool_size = 5 -- no reserve pool\nmode = \"session\"\n\n\
             # from [databases] app\n[[backends]]\nhost = \"db1\"\nport = 5433\n"
        );
    }

    #[test]
    fn long_comments_wrap() {
        let mut out = String::new();
        comment(&mut out, &"word ".repeat(40));
        assert!(out.lines().count() > 1);
        assert!(out.lines().all(|l| l.starts_with("# ") && l.len() <= 94));
    }
}
