//! The floors hold: every `crate::` path in `src/` (in `use` lines and written inline)
//! points to a module on the same floor or a lower one. The table is the one in
//! `lib.rs`'s layout doc and ARCHITECTURE.md; a new module must be given a floor here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module (a file or a directory of `src/`) and its floor.
const FLOORS: &[(&str, u8)] = &[
    ("protocol", 0),
    ("config", 0),
    ("error", 0),
    ("stream", 1),
    ("tls", 1),
    ("auth", 2),
    ("pool", 3),
    ("registry", 3),
    ("cancel", 3),
    ("cluster", 4),
    ("router", 5),
    ("session", 6),
    ("admin", 7),
    ("metrics", 7),
    ("control", 8),
    ("listener", 9),
    ("takeover", 9),
    ("main", 10),
    // Entry points outside the stack, that nothing in it may use: the signals `main`
    // waits on, the throwaway clusters of `pgrelay demo` and the tests, the fuzz
    // targets' doors into the decoders, and the benchmarks' door into a session over
    // in-memory pipes, and `pgrelay import`'s translators of PgBouncer and Pgpool-II
    // files (text in, text out, checked with `config`).
    ("shutdown", 10),
    ("service", 10),
    ("demo", 10),
    ("fuzzing", 10),
    ("benching", 10),
    ("import", 10),
];

/// What `lib.rs` itself defines (the `Shared` context and its helpers) sits on the
/// session's floor: sessions and everything above are handed `Shared`; nothing
/// below may name it (the cluster loops get a `cluster::Monitor` instead). `lib.rs`'s
/// own lines are not checked: they declare the modules and assemble the context.
const ROOT_FLOOR: u8 = 6;
const ROOT_ITEMS: &[&str] = &["Shared", "pool_settings"];

/// Upward edges allowed for now, each with its reason: (from module, to module,
/// why). Every entry must still be needed; remove it when the edge goes.
const ALLOWED: &[(&str, &str, &str)] = &[];

fn floor(module: &str) -> Option<u8> {
    FLOORS.iter().find(|(m, _)| *m == module).map(|(_, f)| *f)
}

/// The top-level module a file of `src/` belongs to (`None` for `lib.rs`).
fn module_of(relative: &Path) -> Option<String> {
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_owned())
}

/// The first segment of every `crate::` path in `source`, comment lines skipped:
/// `crate::pool::Pool` gives `pool`, `crate::{auth, config::Config}` gives `auth` and
/// `config`.
fn crate_paths(source: &str) -> BTreeSet<String> {
    let code: String = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded {
            continue; // `pgrelay_crate::` or the like, not this crate's root
        }
        if let Some(group) = rest.strip_prefix('{') {
            found.extend(group_heads(group));
        } else {
            found.insert(identifier(rest).to_owned());
        }
    }
    found.remove("");
    found
}

/// The first segment of each item of a `{...}` group (its text after the brace).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut expect_head = true;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => expect_head = true,
            c if expect_head && (c.is_alphanumeric() || c == '_') => {
                heads.push(identifier(&group[i..]).to_owned());
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every edge between two modules: (from, to, a file where it is written).
fn edges() -> Vec<(String, String, PathBuf)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut edges = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src/").to_owned();
        let Some(from) = module_of(&relative) else {
            continue;
        };
        let source = std::fs::read_to_string(&file).expect("read a source file");
        for to in crate_paths(&source) {
            if to != from {
                edges.push((from.clone(), to, relative.clone()));
            }
        }
    }
    edges
}

#[test]
fn no_module_imports_from_a_higher_floor() {
    let mut upward = Vec::new();
    let mut allowed_used = BTreeSet::new();
    for (from, to, file) in edges() {
        let from_floor =
            floor(&from).unwrap_or_else(|| panic!("module {from} has no floor: add it to FLOORS"));
        let to_floor = match floor(&to) {
            Some(floor) => floor,
            None if ROOT_ITEMS.contains(&to.as_str()) => ROOT_FLOOR,
            None => panic!("{} uses crate::{to}, which has no floor", file.display()),
        };
        if to_floor <= from_floor {
            continue;
        }
        if let Some(allowed) = ALLOWED.iter().find(|(f, t, _)| *f == from && *t == to) {
            allowed_used.insert(allowed.0.to_owned() + "->" + allowed.1);
            continue;
        }
        upward.push(format!(
            "{} ({from}, floor {from_floor}) uses crate::{to} (floor {to_floor})",
            file.display()
        ));
    }
    assert!(
        upward.is_empty(),
        "imports pointing up a floor:\n{}",
        upward.join("\n")
    );
    for (from, to, why) in ALLOWED {
        assert!(
            allowed_used.contains(&format!("{from}->{to}")),
            "{from} -> {to} is allowed ({why}) but no longer used: remove it from ALLOWED"
        );
    }
}

#[test]
fn paths_are_read_from_use_lines_groups_and_inline() {
    let source = "use crate::pool::Pool;\n\
                  use crate::{\n    auth::{self, Login},\n    config,\n};\n\
                  // crate::admin in a comment is no edge\n\
                  fn f() { crate::cluster::health::run(); let x = crate::Shared::new(); }\n";
    let found: Vec<String> = crate_paths(source).into_iter().collect();
    assert_eq!(found, ["Shared", "auth", "cluster", "config", "pool"]);
    assert_eq!(
        module_of(Path::new("session/relay.rs")).as_deref(),
        Some("session")
    );
    assert_eq!(
        module_of(Path::new("control.rs")).as_deref(),
        Some("control")
    );
    assert_eq!(module_of(Path::new("lib.rs")), None);
}
