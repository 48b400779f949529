//! Every `use crate::…` of the agent's modules points one way: no two
//! modules import each other, directly or through others (shared state sits
//! in `shared.rs`, node helpers in `node.rs`, below everything that uses
//! them). A cycle is reported with the modules on it.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Module → the modules it names as `crate::<module>`. `*_tests.rs` files
/// belong to their module; `lib.rs` and `main.rs` only declare modules.
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else { continue };
        if path.extension().is_none_or(|e| e != "rs") || stem == "lib" || stem == "main" {
            continue;
        }
        let module = stem.strip_suffix("_tests").unwrap_or(&stem).to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        // Doc and line comments name modules in links without importing them.
        let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        files.entry(module).or_default().push_str(&code);
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .iter()
        .map(|(m, code)| {
            let mut to = BTreeSet::new();
            for group in code.split("use crate::{").skip(1) {
                // Top-level names of the group: `a::…, b, c::{…}`.
                let mut depth = 0;
                let mut name = String::new();
                for ch in group.chars() {
                    match ch {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            to.insert(name.trim().split("::").next().unwrap_or("").to_owned());
                            name.clear();
                            continue;
                        }
                        _ => {}
                    }
                    name.push(ch);
                }
                to.insert(name.trim().split("::").next().unwrap_or("").to_owned());
            }
            for path in code.split("crate::").skip(1) {
                to.insert(path.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect());
            }
            to.retain(|t| t != m && modules.contains(t));
            (m.clone(), to)
        })
        .collect()
}

/// The modules on a cycle through `from`, if any.
fn cycle_through(from: &str, edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![vec![from.to_owned()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().unwrap();
        for next in edges.get(last).into_iter().flatten() {
            if next == from {
                return Some(path.clone());
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push(p);
            }
        }
    }
    None
}

#[test]
fn agent_modules_import_each_other_one_way_only() {
    let edges = edges(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(edges.len() > 10, "found only {:?}", edges.keys());
    assert!(edges["agent"].contains("shared") && edges["gc"].contains("shared"), "edges not parsed: {edges:#?}");
    let cycles: Vec<Vec<String>> = edges.keys().filter_map(|m| cycle_through(m, &edges)).collect();
    assert!(cycles.is_empty(), "import cycles {cycles:?} in {edges:#?}");
}
