//! `cargo xtask modgraph`: the module import graph inside every workspace crate, and its cycles.
//!
//! An edge `a → b` means a file of top-level module `a` names `crate::b` (or `super::b` from a
//! direct child of the crate root). Submodules count as their top-level module. A cycle
//! is a strongly connected component of more than one module; the command fails when one
//! exists, so a new cycle cannot land unnoticed (`tests/tests/layering.rs` runs it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates checked (directory of each crate's `src`).
pub const CRATES: &[&str] = &[
    "abi",
    "checkpoint",
    "transport",
    "monitor",
    "devices",
    "workloads",
    "vmx",
    "sink",
    "ft",
    "testkit",
    "tandem",
    "guest-images",
    "xtask",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src` belongs to (`lib`/`main` for the root).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .unwrap_or_default();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::NAME` in `text`, and `super::NAME` when `top` (a file directly under `src`,
/// whose `super` is the crate root). Comments are skipped.
fn crate_refs(text: &str, top: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let prefixes: &[&str] = if top {
        &["crate::", "super::"]
    } else {
        &["crate::"]
    };
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for prefix in prefixes {
            refs_after(code, prefix, &mut out);
        }
    }
    out
}

fn refs_after(code: &str, prefix: &str, out: &mut BTreeSet<String>) {
    {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let tail = &rest[i + prefix.len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_lowercase()) {
                out.insert(name);
            }
            rest = tail;
        }
    }
}

/// Module graph of one crate: module → modules it names.
pub fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let m = module_of(src, f);
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let top = f.parent() == Some(src);
        let entry = g.entry(m.clone()).or_default();
        for r in crate_refs(&text, top) {
            if r != m && modules.contains(&r) && m != "lib" && m != "main" {
                entry.insert(r);
            }
        }
    }
    g
}

/// Strongly connected components with more than one module (Tarjan).
pub fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.g.get(v) {
            for w in ws {
                let w = w.as_str();
                if !t.g.contains_key(w) {
                    continue;
                }
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(lw));
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low[v];
                    t.low.insert(v, lv.min(iw));
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// Prints every crate's module graph and fails on a cycle.
pub fn run(root: &Path) -> Result<(), String> {
    let mut bad = Vec::new();
    for c in CRATES {
        let src = root.join(c).join("src");
        let g = graph(&src);
        let edges: Vec<String> = g
            .iter()
            .flat_map(|(a, bs)| bs.iter().map(move |b| format!("{a}→{b}")))
            .collect();
        let cyc = cycles(&g);
        println!(
            "{c}: {} modules, {} edges{}",
            g.len(),
            edges.len(),
            if cyc.is_empty() {
                ", no cycle".to_string()
            } else {
                format!(", CYCLES: {cyc:?}")
            }
        );
        for comp in cyc {
            bad.push(format!("{c}: {}", comp.join(" ↔ ")));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("module import cycles: {}", bad.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_cycle_and_only_a_cycle() {
        let mut g = BTreeMap::new();
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        g.insert("a".to_string(), set(&["b"]));
        g.insert("b".to_string(), set(&["c"]));
        g.insert("c".to_string(), set(&["a"]));
        g.insert("d".to_string(), set(&["a"]));
        assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
        g.insert("c".to_string(), set(&[]));
        assert!(cycles(&g).is_empty());
        assert_eq!(
            crate_refs("use crate::vm::Vm; // crate::x", true),
            set(&["vm"])
        );
        assert_eq!(
            crate_refs("use super::epoch::Staging;", true),
            set(&["epoch"])
        );
        assert!(crate_refs("use super::epoch::Staging;", false).is_empty());
    }
}
