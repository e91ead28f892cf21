//! The layering of `src/` (docs/architecture.md): a module uses only modules of lower
//! layers. Read from the sources: every `crate::MODULE` path outside comments.

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first; the same table as docs/architecture.md.
const LAYERS: [&[&str]; 10] = [
    &["units"],
    &["identity", "policy", "body", "rt", "log", "headers", "metrics", "db", "sandbox", "lifecycle"],
    &["config"],
    &["tls", "bindings", "upstream"],
    &["script"],
    &["proxy"],
    &["admin"],
    &["policytest"],
    &["serve", "fuzz", "bench"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Each `.rs` file below `dir` with its top-level module (`src/proxy/conn.rs` → `proxy`).
fn sources(dir: &Path, top: Option<&str>, out: &mut Vec<(String, std::path::PathBuf)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let module = top.map_or(name, str::to_string);
        if path.is_dir() {
            sources(&path, Some(&module), out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push((module, path));
        }
    }
}

#[test]
fn no_module_uses_one_of_its_own_or_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, None, &mut files);
    let mut wrong = BTreeMap::new();
    for (module, path) in &files {
        if matches!(module.as_str(), "lib" | "main") {
            continue;
        }
        let own = layer_of(module).unwrap_or_else(|| {
            panic!("src/{module} is in no layer: place it in docs/architecture.md and in LAYERS here")
        });
        let text = std::fs::read_to_string(path).unwrap();
        for line in text.lines().map(|l| l.split("//").next().unwrap_or("")) {
            for (i, _) in line.match_indices("crate::") {
                let used: String =
                    line[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if used == *module || used.is_empty() {
                    continue;
                }
                match layer_of(&used) {
                    Some(l) if l < own => {}
                    _ => {
                        wrong.insert(format!("{} uses crate::{used}", path.strip_prefix(&src).unwrap().display()), ());
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "uses that reach up or sideways:\n{}", wrong.into_keys().collect::<Vec<_>>().join("\n"));
}

/// Module path of each file (`src/proxy/conn.rs` → `proxy::conn`, `mod.rs` → its folder,
/// `lib.rs` and `main.rs` → the crate root, "").
fn module_paths(src: &Path) -> BTreeMap<String, std::path::PathBuf> {
    let mut files = Vec::new();
    sources(src, None, &mut files);
    let mut out = BTreeMap::new();
    for (_, path) in files {
        let rel = path.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        if parts == ["lib"] || parts == ["main"] {
            parts.clear();
        }
        out.insert(parts.join("::"), path);
    }
    out
}

/// The source without comments (line and block), so that doc links do not count as uses.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    out.push_str(rest);
    out.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand_use(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree.split("as").next().unwrap_or("").to_string()];
    };
    let prefix = tree[..open].trim_end_matches("::");
    let inner = &tree[open + 1..tree.len() - 1];
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    let mut out = Vec::new();
    for part in parts.into_iter().filter(|p| !p.is_empty()) {
        for path in expand_use(part) {
            out.push(if path == "self" { prefix.to_string() } else { format!("{prefix}::{path}") });
        }
    }
    out
}

/// The file module a path (`crate::a::b::Item`, `super::x`, `self::y`) names, from `module`.
fn file_of(modules: &BTreeMap<String, std::path::PathBuf>, module: &str, path: &str) -> Option<String> {
    let mut segments: Vec<&str> = path.split("::").collect();
    let mut base: Vec<&str> = if module.is_empty() { vec![] } else { module.split("::").collect() };
    match segments.first() {
        Some(&"crate") => base.clear(),
        Some(&"super") => {
            while segments.first() == Some(&"super") {
                base.pop();
                segments.remove(0);
            }
            segments.insert(0, "self");
        }
        Some(&"self") => {}
        _ => return None,
    }
    base.extend(segments.into_iter().skip(1));
    (0..=base.len()).rev().map(|n| base[..n].join("::")).find(|m| modules.contains_key(m))
}

#[test]
fn no_two_files_of_src_import_each_other_even_through_others() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = module_paths(&src);
    let mut imports: BTreeMap<&str, std::collections::BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &modules {
        let code = code_of(&std::fs::read_to_string(path).unwrap());
        let mut paths = Vec::new();
        for statement in code.split(';') {
            if let Some(at) = statement.find("use ")
                && statement[..at].split_whitespace().all(|w| w == "pub" || w.starts_with("pub("))
            {
                paths.extend(expand_use(&statement[at + 4..]));
            }
        }
        for (i, _) in
            code.match_indices("crate::").chain(code.match_indices("super::")).chain(code.match_indices("self::"))
        {
            if code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String =
                code[i..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
            paths.push(path.trim_end_matches(':').to_string());
        }
        let found = paths.iter().filter_map(|p| file_of(&modules, module, p)).filter(|m| m != module).collect();
        imports.insert(module, found);
    }
    // A depth-first walk from each file: meeting a file still on the path is a cycle.
    fn walk<'a>(
        m: &'a str,
        imports: &'a BTreeMap<&str, std::collections::BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut std::collections::BTreeSet<&'a str>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|p| *p == m) {
            cycles.push(format!("{} -> {m}", path[at..].join(" -> ")));
            return;
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for next in imports.get(m).into_iter().flatten() {
            walk(next, imports, path, done, cycles);
        }
        path.pop();
    }
    let (mut done, mut cycles) = (Default::default(), Vec::new());
    for m in imports.keys() {
        walk(m, &imports, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(imports.get("proxy::conn").is_some_and(|i| i.contains("proxy::request")), "the walk reads no imports");
    assert!(cycles.is_empty(), "files that import each other (a -> b: a uses b):\n{}", cycles.join("\n"));
}
