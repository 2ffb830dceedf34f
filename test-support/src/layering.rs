//! The module graph of a crate, read from its sources: which top-level modules name which
//! (`crate::x`, or `super::x` from one level down), so a test can hold the crates to a layering
//! with no import cycles. Test modules (`#[cfg(test)]` and `tests.rs` files) and comments are
//! left out: a test may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module name to the top-level modules it names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Reads `src` (a crate's `src/` folder) into its graph of top-level modules.
///
/// # Panics
/// A file under `src` cannot be read.
pub fn graph(src: &Path) -> Graph {
    let names = regex::Regex::new(r"\bcrate::(\w+)").expect("a valid pattern");
    let comments = regex::Regex::new(r"//.*").expect("a valid pattern");
    let mut graph = Graph::new();
    let mut files = Vec::new();
    collect(src, &mut files);
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let mut parts: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts.iter().skip(1).any(|p| p == "tests") {
            continue;
        }
        if matches!(
            parts.last().map(String::as_str),
            Some("lib" | "main" | "mod")
        ) {
            parts.pop();
        }
        let Some(top) = parts.first().cloned() else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let code = comments.replace_all(code, "");
        let deps = graph.entry(top.clone()).or_default();
        for c in names.captures_iter(&code) {
            if c[1] != *top {
                deps.insert(c[1].to_owned());
            }
        }
    }
    let known: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    graph
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a readable source folder") {
        let path = entry.expect("a readable folder entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Every import cycle of `graph` (its strongly connected components of more than one module),
/// each sorted.
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Kosaraju: finish order on the graph, then components on the reversed graph.
    fn finish(g: &Graph, v: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(v.to_owned()) {
            return;
        }
        for w in g.get(v).into_iter().flatten() {
            finish(g, w, seen, order);
        }
        order.push(v.to_owned());
    }
    let mut reversed = Graph::new();
    for (v, deps) in graph {
        reversed.entry(v.clone()).or_default();
        for d in deps {
            reversed.entry(d.clone()).or_default().insert(v.clone());
        }
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for v in graph.keys() {
        finish(graph, v, &mut seen, &mut order);
    }
    let mut assigned = BTreeSet::new();
    let mut found = Vec::new();
    for v in order.iter().rev() {
        let mut component = Vec::new();
        finish(&reversed, v, &mut assigned, &mut component);
        if component.len() > 1 {
            component.sort();
            found.push(component);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_src(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(name)
            .join("src")
    }

    #[test]
    fn a_cycle_is_found_and_a_layering_has_none() {
        let g: Graph = [
            ("a", vec!["b"]),
            ("b", vec!["c"]),
            ("c", vec!["a"]),
            ("d", vec!["a"]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
        .collect();
        assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
        let mut layered = g.clone();
        layered.get_mut("c").unwrap().clear();
        assert!(cycles(&layered).is_empty());
    }

    #[test]
    fn the_proxy_and_the_controller_have_no_import_cycles() {
        for name in ["proxy", "control-plane", "proxy/resilience"] {
            let g = graph(&crate_src(name));
            assert!(g.len() > 5, "{name}: read its modules: {g:?}");
            assert_eq!(
                cycles(&g),
                Vec::<Vec<String>>::new(),
                "{name}: import cycles"
            );
        }
    }
}
