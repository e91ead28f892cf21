//! The layering of `src/` (docs/architecture.md): a module uses only modules of lower
//! layers. Read from the sources: every `crate::MODULE` path outside comments.

use std::collections::BTreeMap;
use std::path::Path;

/// Lowest first; the same table as docs/architecture.md.
const LAYERS: [&[&str]; 7] = [
    &["identity", "policy", "body", "rt", "log", "headers", "metrics", "db"],
    &["config"],
    &["tls", "bindings", "upstream"],
    &["script"],
    &["proxy"],
    &["admin"],
    &["serve", "cli", "fuzz"],
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
