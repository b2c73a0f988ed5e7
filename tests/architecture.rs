//! The crate's rooms import one way: each top-level module of `src/` imports only
//! modules of its own tier or below, and no chain of imports comes back to where it
//! started. Read from the sources (non-test code, comments skipped), so a change that
//! points a dependency upwards fails here, naming the file and the import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each room's tier: a room imports rooms of its tier or below only.
const TIERS: &[(&str, u8)] = &[
    // The binary, the library's front door and the operator's commands.
    ("main", 3),
    ("lib", 3),
    ("ops", 3),
    // The loop that ties the rooms below together.
    ("worker", 2),
    // The plumbing and the destinations: Kafka, the tables, dead letters, maintenance.
    ("kafka", 1),
    ("table", 1),
    ("dead_letter", 1),
    ("history", 1),
    ("maintenance", 1),
    ("sample", 1),
    // Pure stages and shared vocabulary.
    ("decode", 0),
    ("update", 0),
    ("offsets", 0),
    ("status", 0),
    ("config", 0),
    ("delta", 0),
    ("retry", 0),
    ("faults", 0),
];

fn tier(room: &str) -> u8 {
    TIERS
        .iter()
        .find(|(name, _)| *name == room)
        .map(|(_, tier)| *tier)
        .unwrap_or_else(|| panic!("src/{room} has no tier: add it to TIERS in tests/architecture.rs"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The rooms `code` names as `crate::room` (or, in the binary, `position_sink::room`),
/// outside comments and before its unit tests.
fn imports(code: &str, prefix: &str) -> BTreeSet<String> {
    let code = code.split("#[cfg(test)]\nmod tests").next().unwrap_or(code);
    let mut rooms = BTreeSet::new();
    for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let mut rest = line;
        while let Some(at) = rest.find(prefix) {
            rest = &rest[at + prefix.len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if TIERS.iter().any(|(room, _)| *room == name) {
                rooms.insert(name);
            }
        }
    }
    rooms
}

/// room → (imported room → the first file that imports it).
fn import_graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src").to_string_lossy().into_owned();
        let room = relative.split('/').next().expect("a path").trim_end_matches(".rs").to_string();
        let code = std::fs::read_to_string(&file).expect("readable source");
        let prefix = if room == "main" { "position_sink::" } else { "crate::" };
        let entry = graph.entry(room.clone()).or_default();
        for imported in imports(&code, prefix).into_iter().filter(|r| *r != room) {
            entry.entry(imported).or_insert_with(|| format!("src/{relative}"));
        }
    }
    graph
}

#[test]
fn no_room_imports_a_room_above_it() {
    let mut upward = Vec::new();
    for (room, imported) in import_graph() {
        for (other, file) in imported {
            if tier(&other) > tier(&room) {
                upward.push(format!("{file}: {room} (tier {}) imports {other} (tier {})", tier(&room), tier(&other)));
            }
        }
    }
    assert!(upward.is_empty(), "imports pointing up:\n{}", upward.join("\n"));
}

#[test]
fn no_chain_of_imports_comes_back_to_its_room() {
    let graph = import_graph();
    // Depth-first search; a room met again on the current path closes a cycle.
    fn visit<'g>(
        room: &'g str,
        graph: &'g BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|r| *r == room) {
            let mut cycle: Vec<String> = path[start..].iter().map(|r| r.to_string()).collect();
            cycle.push(room.to_string());
            return Some(cycle);
        }
        if !done.insert(room) {
            return None;
        }
        path.push(room);
        for next in graph.get(room).into_iter().flat_map(|m| m.keys()) {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for room in graph.keys() {
        if let Some(cycle) = visit(room, &graph, &mut Vec::new(), &mut done) {
            panic!("the rooms import each other in a circle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_check_sees_imports() {
    let graph = import_graph();
    assert!(graph["worker"].contains_key("table"), "the worker writes the table: the check must see that import");
    assert!(graph["main"].contains_key("ops"), "the binary runs the operator's commands");
}
