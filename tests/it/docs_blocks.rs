//! Docs that work as written: every `lua` and `toml` block in README.md and docs/ is either
//! a complete file that this test checks, or marked `<!-- fragment -->` on the line above.
//!
//! Within one page, a block whose first line names a file (`-- agent.lua: ...`,
//! `# moat.toml`) is written under that name and stays for the page's later blocks; other
//! Lua blocks are `policy.lua`. Policies must pass `moat check`; test files (`*_test.lua`)
//! must pass `moat test`; TOML blocks are a moat.toml that must pass `moat check --config`,
//! with the files, variables and CA certificates they name provided by the test.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::*;

struct Block {
    page: String,
    line: usize,
    lang: String,
    name: Option<String>,
    text: String,
}

fn blocks(page: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(page).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let lang = lines[i].strip_prefix("```").map(|l| l.split_whitespace().next().unwrap_or("")).unwrap_or("");
        if lines[i].starts_with("```") && (lang == "lua" || lang == "toml") {
            let start = i;
            let end = (i + 1..lines.len()).find(|&j| lines[j].starts_with("```")).expect("closed fence");
            let fragment = start > 0 && lines[start - 1].trim_start().starts_with("<!-- fragment");
            if !fragment {
                let body = lines[start + 1..end].join("\n") + "\n";
                let first = lines.get(start + 1).copied().unwrap_or("");
                let name = first
                    .trim_start_matches("--")
                    .trim_start_matches('#')
                    .split([':', ' '])
                    .find(|w| w.ends_with(".lua") || w.ends_with(".toml"))
                    .map(str::to_string);
                out.push(Block {
                    page: page.display().to_string(),
                    line: start + 1,
                    lang: lang.into(),
                    name,
                    text: body,
                });
            }
            i = end;
        }
        i += 1;
    }
    out
}

/// The quoted values of `key = "..."` (or a list of them) in a TOML text.
fn values_of(toml: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in toml.lines() {
        let line = line.split('#').next().unwrap_or("");
        for (i, _) in line.match_indices(key) {
            let before_ok = i == 0 || !line.as_bytes()[i - 1].is_ascii_alphanumeric() && line.as_bytes()[i - 1] != b'_';
            let rest = line[i + key.len()..].trim_start();
            if before_ok && let Some(rest) = rest.strip_prefix('=') {
                out.extend(rest.split('"').skip(1).step_by(2).map(str::to_string));
            }
        }
    }
    out
}

fn run(dir: &Path, args: &[&str], env: &[(String, String)]) -> (i32, String) {
    let out = Command::new(MOAT).args(args).current_dir(dir).envs(env.iter().cloned()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn check_toml(dir: &Path, b: &Block, ca: &TestCa) {
    let mut text = b.text.clone();
    let mut env = Vec::new();
    let credentials = ["env", "token_env", "access_key_env", "secret_key_env"];
    for var in credentials.iter().flat_map(|key| values_of(&text, key)) {
        env.push((var, "a-value-of-sixteen-chars-or-more".to_string()));
    }
    // A database URL on loopback where nothing listens: its form is checked, and a [cluster]
    // store, whose overrides moat check reads, is found unreachable (a warning, exit 0).
    for var in values_of(&text, "url_env") {
        env.push((var, "postgres://moat:a-password@127.0.0.1:1/moat".to_string()));
    }
    for file in values_of(&text, "file").into_iter().chain(values_of(&text, "token_file")) {
        let local = dir.join(file.trim_start_matches('/').replace('/', "_"));
        std::fs::write(&local, "a-secret-value-from-a-file").unwrap();
        text = text.replace(&format!("\"{file}\""), &format!("{:?}", local));
    }
    for pem in values_of(&text, "extra_ca") {
        std::fs::copy(&ca.pem, dir.join(&pem)).unwrap();
    }
    for policy in values_of(&text, "policy") {
        let p = dir.join(&policy);
        if !p.exists() {
            write(dir, &policy, "enableInternet = false\n");
        }
    }
    let file = b.name.clone().filter(|n| n.ends_with(".toml")).unwrap_or_else(|| "moat.toml".into());
    std::fs::write(dir.join(&file), &text).unwrap();
    let mut args = vec!["check", "--config", file.as_str()];
    if !text.contains("[[class]]") {
        write(dir, "stub.lua", "enableInternet = false\n");
        args.extend(["--policy", "stub.lua"]);
    }
    let (code, out) = run(dir, &args, &env);
    assert_eq!(code, 0, "{}:{}: this moat.toml does not pass moat check:\n{out}", b.page, b.line);
}

#[test]
fn every_lua_and_toml_block_of_the_docs_is_checked_or_marked_a_fragment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages: Vec<PathBuf> = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    let ca = TestCa::new();
    let mut checked = 0;
    for page in pages {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for b in blocks(&page) {
            checked += 1;
            if b.lang == "toml" {
                check_toml(d, &b, &ca);
                continue;
            }
            let name = b.name.clone().unwrap_or_else(|| "policy.lua".into());
            std::fs::write(d.join(&name), &b.text).unwrap();
            let (code, out) = if name.ends_with("_test.lua") {
                run(d, &["test", &name], &[])
            } else {
                run(d, &["check", "--policy", &name], &[])
            };
            assert_eq!(code, 0, "{}:{}: {name} as written fails:\n{out}", b.page, b.line);
        }
    }
    assert!(checked >= 18, "only {checked} blocks found");
}
