//! The crate's layering, checked from the source: every `crate::` / `super::` / `self::` path in
//! `src/**/*.rs` (the library; `src/main.rs` is the binary on top of it), in code, doc comments
//! and doc links alike — a doc link to a layer above is an arrow pointing the wrong way too.
//!
//! - (a) The modules of the crate (`config`, `plan`, `backend`, `model`, `sampler`, `exec`,
//!   ...) import each other without a cycle; nor do any two modules that are not nested in one
//!   another (a parent and its children are one unit of the code: `mod x; pub use x::Y` and a
//!   child's `super::` are how a module is split into files).
//! - (b) The kernel layer (`contract` and `cuda`) imports nothing but itself and `error`: no
//!   config, plan, backend, model, sampler, executor, runtime or bench.
//! - (c) Inside the kernel layer the arrows point one way: `contract` (the formats and the ABI)
//!   at the bottom, then `cuda::images`, `cuda::device`, then `cuda::raw` / `cuda::blas` /
//!   `cuda::profiler` on the device, then `cuda::ops` on the raw launches, and the `cuda`
//!   facade (docs, re-exports) on top; nothing imports a module at or above its own rank.
//! - (d) `error` imports nothing of the crate.
//!
//! Relative paths to a module's own children (`use program::Program;` in `sampler.rs`) are the
//! parent's business and are not read.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One module: its path (`cuda::ops`, `""` for the crate root).
#[derive(Debug, Clone)]
struct Module {
    path: String,
}

/// One reference: from module `from` (at `file:line`) to module `to`.
#[derive(Debug, Clone)]
struct Edge {
    from: String,
    to: String,
    at: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The module a library file defines: `src/lib.rs` → `""`, `src/a.rs` and `src/a/mod.rs` →
/// `a`, `src/a/b.rs` → `a::b`.
fn file_module(file: &Path) -> String {
    let rel = file.strip_prefix(src_dir()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts.join("::")
}

fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}::{child}")
    }
}

fn parent_of(path: &str) -> String {
    path.rsplit_once("::")
        .map_or(String::new(), |(p, _)| p.to_string())
}

/// `mod name {` opening an inline module (rustfmt style), with its indentation.
fn inline_mod(line: &str) -> Option<(usize, String)> {
    let indent = line.len() - line.trim_start().len();
    let t = line.trim_start();
    let t = t
        .strip_prefix("pub(crate) ")
        .or_else(|| t.strip_prefix("pub "))
        .unwrap_or(t);
    let name = t.strip_prefix("mod ")?.strip_suffix(" {")?;
    name.chars()
        .all(|c| c.is_alphanumeric() || c == '_')
        .then(|| (indent, name.to_string()))
}

/// Every file's lines, each with the (possibly inline) module it belongs to.
fn lines_by_module(files: &[PathBuf]) -> Vec<(String, PathBuf, usize, String)> {
    let mut out = Vec::new();
    for file in files {
        let text = fs::read_to_string(file).unwrap();
        let mut stack: Vec<(usize, String)> = vec![(usize::MAX, file_module(file))];
        for (i, line) in text.lines().enumerate() {
            let indent = line.len() - line.trim_start().len();
            if stack.len() > 1 && line.trim() == "}" && indent == stack.last().unwrap().0 {
                stack.pop();
                continue;
            }
            let current = stack.last().unwrap().1.clone();
            out.push((current.clone(), file.clone(), i + 1, line.to_string()));
            if let Some((indent, name)) = inline_mod(line) {
                stack.push((indent, join(&current, &name)));
            }
        }
    }
    out
}

/// The paths a `use`-tree starting at `text` (just after `crate::` etc.) names, as segment
/// lists: `a::{b::c, d}` → `[a, b, c]`, `[a, d]`.
fn path_tree(text: &str) -> Vec<Vec<String>> {
    fn tree(chars: &[char], i: &mut usize) -> Vec<Vec<String>> {
        let mut prefix: Vec<String> = Vec::new();
        loop {
            let start = *i;
            while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
                *i += 1;
            }
            if *i > start {
                prefix.push(chars[start..*i].iter().collect());
            }
            if chars.get(*i) == Some(&':') && chars.get(*i + 1) == Some(&':') {
                *i += 2;
                if chars.get(*i) == Some(&'{') {
                    *i += 1;
                    let mut out = Vec::new();
                    loop {
                        while chars
                            .get(*i)
                            .is_some_and(|c| c.is_whitespace() || *c == ',')
                        {
                            *i += 1;
                        }
                        match chars.get(*i) {
                            None => return out,
                            Some('}') => {
                                *i += 1;
                                return out;
                            }
                            _ => {}
                        }
                        let before = *i;
                        for sub in tree(chars, i) {
                            let mut p = prefix.clone();
                            p.extend(sub);
                            out.push(p);
                        }
                        if *i == before {
                            // Not a path (`*`, `self`, ...): skip one character.
                            *i += 1;
                        }
                    }
                }
                continue;
            }
            return if prefix.is_empty() {
                Vec::new()
            } else {
                vec![prefix]
            };
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    tree(&chars, &mut i)
}

/// Items the crate root re-exports or defines (`crate::Error`, `crate::bail_input`) and the
/// module that defines them.
fn root_items(files: &[PathBuf]) -> BTreeMap<String, String> {
    let mut items = BTreeMap::new();
    for file in files {
        let text = fs::read_to_string(file).unwrap();
        let mut exported = false;
        for line in text.lines() {
            let t = line.trim();
            if t == "#[macro_export]" {
                exported = true;
                continue;
            }
            if exported && let Some(rest) = t.strip_prefix("macro_rules! ") {
                let name = rest.trim_end_matches(" {").trim();
                items.insert(name.to_string(), file_module(file));
            }
            exported = false;
            if file_module(file).is_empty()
                && let Some(rest) = t.strip_prefix("pub use ")
            {
                for p in path_tree(rest.trim_end_matches(';')) {
                    let (item, module) = p.split_last().unwrap();
                    items.insert(item.clone(), module.join("::"));
                }
            }
        }
    }
    items
}

/// The longest prefix of `segments` (relative to the crate root) that is a module.
fn resolve(segments: &[String], modules: &BTreeSet<String>) -> Option<String> {
    (0..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|p| modules.contains(p))
}

/// Every module and every reference between modules.
fn graph() -> (Vec<Module>, Vec<Edge>) {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    files.retain(|f| f != &src_dir().join("main.rs"));
    let lines = lines_by_module(&files);
    let mut modules: Vec<Module> = files
        .iter()
        .map(|f| Module {
            path: file_module(f),
        })
        .collect();
    for (module, _, _, line) in &lines {
        if let Some((_, name)) = inline_mod(line) {
            modules.push(Module {
                path: join(module, &name),
            });
        }
    }
    let names: BTreeSet<String> = modules.iter().map(|m| m.path.clone()).collect();
    let roots = root_items(&files);
    let mut edges = Vec::new();
    for (module, file, n, line) in &lines {
        let at = format!(
            "{}:{n}",
            file.strip_prefix(src_dir().parent().unwrap())
                .unwrap()
                .display()
        );
        for (pos, _) in line.match_indices("::") {
            let head_end = pos;
            let head_start = line[..head_end]
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            let head = &line[head_start..head_end];
            // The path must start there (`a::crate::b` is not a crate path).
            let before = line[..head_start].chars().last();
            if before == Some(':') {
                continue;
            }
            let base = match head {
                "crate" => String::new(),
                "super" => parent_of(module),
                "self" => module.clone(),
                _ => continue,
            };
            for mut segments in path_tree(&line[head_end + 2..]) {
                // `super::super::x`
                let mut base = base.clone();
                while segments.first().is_some_and(|s| s == "super") {
                    segments.remove(0);
                    base = parent_of(&base);
                }
                let mut full: Vec<String> = if base.is_empty() {
                    Vec::new()
                } else {
                    base.split("::").map(str::to_string).collect()
                };
                if head == "crate"
                    && let Some(first) = segments.first()
                    && !names.contains(first.as_str())
                {
                    match roots.get(first) {
                        Some(m) => {
                            edges.push(Edge {
                                from: module.clone(),
                                to: m.clone(),
                                at: at.clone(),
                            });
                            continue;
                        }
                        None => panic!("{at}: `crate::{}` names no module", segments.join("::")),
                    }
                }
                full.extend(segments);
                let to = resolve(&full, &names)
                    .unwrap_or_else(|| panic!("{at}: cannot resolve {}", full.join("::")));
                edges.push(Edge {
                    from: module.clone(),
                    to,
                    at: at.clone(),
                });
            }
        }
    }
    (modules, edges)
}

fn top(path: &str) -> &str {
    path.split("::").next().unwrap()
}

fn nested(a: &str, b: &str) -> bool {
    let within = |inner: &str, outer: &str| {
        outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}::"))
    };
    within(a, b) || within(b, a)
}

/// A cycle of `edges` (as the edges along it), if there is one.
fn find_cycle<'e>(edges: &[&'e Edge], key: impl Fn(&str) -> String) -> Option<Vec<&'e Edge>> {
    let mut out: BTreeMap<String, Vec<&Edge>> = BTreeMap::new();
    for e in edges {
        let (a, b) = (key(&e.from), key(&e.to));
        if a != b {
            out.entry(a).or_default().push(e);
        }
    }
    // Depth-first search with colours; the stack holds the edges taken.
    fn visit<'e>(
        node: &str,
        out: &BTreeMap<String, Vec<&'e Edge>>,
        key: &dyn Fn(&str) -> String,
        colour: &mut BTreeMap<String, u8>,
        stack: &mut Vec<&'e Edge>,
    ) -> Option<Vec<&'e Edge>> {
        colour.insert(node.to_string(), 1);
        for e in out.get(node).into_iter().flatten() {
            let next = key(&e.to);
            stack.push(e);
            match colour.get(&next).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| key(&s.from) == next).unwrap();
                    return Some(stack[start..].to_vec());
                }
                0 => {
                    if let Some(c) = visit(&next, out, key, colour, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
            stack.pop();
        }
        colour.insert(node.to_string(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    let nodes: Vec<String> = out.keys().cloned().collect();
    for n in nodes {
        if colour.get(&n).copied().unwrap_or(0) == 0
            && let Some(c) = visit(&n, &out, &key, &mut colour, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn describe(cycle: &[&Edge]) -> String {
    cycle
        .iter()
        .map(|e| format!("  {} → {} ({})", e.from, e.to, e.at))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The unit of the kernel layer a module belongs to and its rank: a unit imports only units of
/// a lower rank (the contract's modules are one unit; they may import each other, acyclically,
/// as the cycle check holds). `None` for a module outside the kernel layer.
fn kernel_unit(path: &str) -> Option<(&'static str, u32)> {
    const RANKS: &[(&str, u32)] = &[
        ("contract", 0),
        ("cuda::images", 1),
        ("cuda::device", 2),
        ("cuda::raw", 3),
        ("cuda::blas", 3),
        ("cuda::profiler", 3),
        ("cuda::ops", 4),
        ("cuda", 5),
    ];
    if !matches!(top(path), "contract" | "cuda") {
        return None;
    }
    let unit = RANKS
        .iter()
        .filter(|(p, _)| path == *p || path.starts_with(&format!("{p}::")))
        .max_by_key(|(p, _)| p.len())
        .copied();
    // `cuda/mod.rs` is the layer's facade (docs, re-exports, its tests); a new module under
    // cuda/ must be given its place here.
    if let Some(("cuda", _)) = unit {
        assert!(
            path == "cuda" || path == "cuda::tests",
            "{path} has no kernel-layer rank: add it to `kernel_unit`"
        );
    }
    unit
}

#[test]
fn no_import_cycle_between_modules() {
    let (_, edges) = graph();
    let all: Vec<&Edge> = edges.iter().collect();
    if let Some(c) = find_cycle(&all, |m| top(m).to_string()) {
        panic!(
            "import cycle between the crate's modules:\n{}",
            describe(&c)
        );
    }
    let unrelated: Vec<&Edge> = edges.iter().filter(|e| !nested(&e.from, &e.to)).collect();
    if let Some(c) = find_cycle(&unrelated, |m| m.to_string()) {
        panic!("import cycle between modules:\n{}", describe(&c));
    }
}

#[test]
fn the_kernel_layer_imports_nothing_above_it() {
    let (_, edges) = graph();
    let bad: Vec<&Edge> = edges
        .iter()
        .filter(|e| kernel_unit(&e.from).is_some())
        .filter(|e| !matches!(top(&e.to), "contract" | "cuda" | "error"))
        .collect();
    assert!(
        bad.is_empty(),
        "the kernel layer (contract, cuda) imports the runtime:\n{}",
        describe(&bad)
    );
}

#[test]
fn inside_the_kernel_layer_arrows_point_down() {
    let (modules, edges) = graph();
    for m in &modules {
        kernel_unit(&m.path);
    }
    let bad: Vec<&Edge> = edges
        .iter()
        .filter(|e| match (kernel_unit(&e.from), kernel_unit(&e.to)) {
            (Some((a, ra)), Some((b, rb))) => a != b && rb >= ra,
            _ => false,
        })
        .collect();
    assert!(
        bad.is_empty(),
        "kernel-layer arrows pointing sideways or up (allowed: contract ← images ← device ← raw, \
         blas, profiler ← ops ← the cuda facade):\n{}",
        describe(&bad)
    );
}

#[test]
fn error_imports_nothing() {
    let (_, edges) = graph();
    let bad: Vec<&Edge> = edges
        .iter()
        .filter(|e| e.from == "error" && e.to != "error")
        .collect();
    assert!(
        bad.is_empty(),
        "error.rs imports the crate:\n{}",
        describe(&bad)
    );
}

/// The checker reads what it must: brace groups, `super`, `self`, inline modules, root items.
#[test]
fn the_checker_parses_paths() {
    assert_eq!(
        path_tree("a::{b::c, d::{e, f}}, g"),
        vec![
            vec!["a", "b", "c"],
            vec!["a", "d", "e"],
            vec!["a", "d", "f"]
        ]
    );
    assert_eq!(path_tree("Tag(0)"), vec![vec!["Tag"]]);
    assert_eq!(path_tree("*;"), Vec::<Vec<String>>::new());
    let (modules, edges) = graph();
    let has = |from: &str, to: &str| edges.iter().any(|e| e.from == from && e.to == to);
    assert!(modules.iter().any(|m| m.path == "cuda::images"));
    assert!(has("cuda::ops", "cuda::raw"), "a use of a sibling");
    assert!(has("cuda::raw", "cuda::device"));
    assert!(has("sampler::program", "sampler::patch"), "super::patch");
    assert!(has("sampler::program", "sampler"), "super::{{...}}");
    assert!(has("schedule", "error"), "crate::bail_input is error's");
    assert!(has("exec::host", "sampler"));
    // The top-level graph, for the record (`--nocapture`).
    let mut tops: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in &edges {
        if top(&e.from) != top(&e.to) && !top(&e.from).is_empty() && !top(&e.to).is_empty() {
            tops.entry(top(&e.from)).or_default().insert(top(&e.to));
        }
    }
    for (m, deps) in tops {
        println!("{m} → {}", deps.into_iter().collect::<Vec<_>>().join(", "));
    }
}
