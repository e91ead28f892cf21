//! Loading and validating a policy script into a [`Generation`] (SPEC 2, 7.1).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, Value};

use super::sandbox::{self, ModuleSource, StateOptions};
use super::scope::{self, Scope};
use crate::config::Limits;
use crate::policy::{ByHost, ClassPolicy, HostList, HostPattern};

/// One loaded, validated version of a class's script. Shared by every worker; each builds
/// its own Lua state from `source` and `modules`.
#[derive(Debug)]
pub struct Generation {
    /// Counts up from 1 per class.
    pub number: u64,
    pub class: String,
    pub path: PathBuf,
    pub source: Arc<str>,
    /// Modules the script required from its folder, with their text at validation time.
    pub modules: BTreeMap<String, (PathBuf, Arc<str>)>,
    /// The class's policy as Rust data.
    pub policy: Arc<ClassPolicy>,
    pub loaded_at: SystemTime,
}

/// A script that failed to load: `file:line: message` when the line is known.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct LoadError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl LoadError {
    fn render(&self) -> String {
        match self.line {
            Some(l) => format!("{}:{l}: {}", self.file.display(), self.message),
            None => format!("{}: {}", self.file.display(), self.message),
        }
    }
}

/// Reads, runs and validates a policy in a fresh state.
pub fn load_generation(class: &str, path: &Path, number: u64, limits: &Limits) -> Result<Generation, LoadError> {
    let fail = |line, message: String| LoadError { file: path.to_path_buf(), line, message };
    let text = std::fs::read_to_string(path).map_err(|e| fail(None, format!("cannot read policy: {e}")))?;
    let source: Arc<str> = Arc::from(text);
    let modules = ModuleSource {
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        captured: BTreeMap::new(),
        read: Default::default(),
    };
    let lua = sandbox::new_state(StateOptions {
        memory_limit: limits.lua_memory,
        body_buffer: limits.body_buffer,
        upstream: None,
        sink: None,
        modules,
        policy_path: path,
    })
    .map_err(|e| fail(None, e.to_string()))?;
    run_chunk(&lua, path, &source, class, limits).map_err(|e| lua_error(path, &e))?;
    let policy = extract_policy(&lua, path, &source)?;
    let modules = lua.app_data_ref::<ModuleSource>().map(|m| m.read.borrow().clone()).unwrap_or_default();
    Ok(Generation {
        number,
        class: class.to_string(),
        path: path.to_path_buf(),
        source,
        modules,
        policy: Arc::new(policy),
        loaded_at: SystemTime::now(),
    })
}

/// Runs the policy's top level under the CPU budget.
pub fn run_chunk(lua: &Lua, path: &Path, source: &str, class: &str, limits: &Limits) -> mlua::Result<()> {
    let s = Scope::new("load".into(), "-".into(), class.into(), limits.lua_cpu, 0);
    scope::enter(&s, || lua.load(source).set_name(format!("@{}", path.display())).set_mode(ChunkMode::Text).exec())
}

/// Turns a Lua error into file:line + message (first line, no traceback).
fn lua_error(path: &Path, e: &mlua::Error) -> LoadError {
    let text = match e {
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::RuntimeError(m) => m.clone(),
        mlua::Error::CallbackError { cause, .. } => cause.to_string(),
        mlua::Error::MemoryError(_) => "out of memory while loading (limits.lua_memory)".into(),
        other => other.to_string(),
    };
    let first = text.lines().next().unwrap_or("error").to_string();
    // Lua prefixes "file:line: " itself; split it back out so the rendering is uniform.
    let shown = path.display().to_string();
    let ours = first.strip_prefix(&format!("{shown}:")).and_then(|rest| rest.split_once(": "));
    if let Some((n, msg)) = ours.and_then(|(line, msg)| Some((line.parse().ok()?, msg))) {
        return LoadError { file: path.to_path_buf(), line: Some(n), message: msg.to_string() };
    }
    // An error inside a required module names that module's file.
    let other = first.split_once(": ").and_then(|(loc, msg)| {
        let (file, line) = loc.rsplit_once(':')?;
        Some((file, line.parse().ok()?, msg))
    });
    if let Some((file, n, msg)) = other {
        return LoadError { file: PathBuf::from(file), line: Some(n), message: msg.to_string() };
    }
    LoadError { file: path.to_path_buf(), line: None, message: first }
}

/// The line where `name = …` is first assigned at the start of a line, if any.
fn assignment_line(source: &str, name: &str) -> Option<usize> {
    source
        .lines()
        .position(|l| {
            let t = l.trim_start();
            t.strip_prefix(name)
                .is_some_and(|rest| rest.trim_start().starts_with('=') && !rest.trim_start().starts_with("=="))
        })
        .map(|i| i + 1)
}

fn extract_policy(lua: &Lua, path: &Path, source: &str) -> Result<ClassPolicy, LoadError> {
    let g = lua.globals();
    let fail = |name: &str, message: String| LoadError {
        file: path.to_path_buf(),
        line: assignment_line(source, name),
        message,
    };
    let get = |name: &str| g.get::<Value>(name).map_err(|e| fail(name, e.to_string()));

    let boolean = |name: &str, default: bool| -> Result<bool, LoadError> {
        match get(name)? {
            Value::Nil => Ok(default),
            Value::Boolean(b) => Ok(b),
            other => Err(fail(name, format!("{name} must be true or false, got {}", other.type_name()))),
        }
    };
    let list = |name: &str| -> Result<Option<HostList>, LoadError> {
        match get(name)? {
            Value::Nil => Ok(None),
            Value::Table(t) => {
                let mut items = Vec::new();
                for v in t.sequence_values::<Value>() {
                    match v.map_err(|e| fail(name, e.to_string()))? {
                        Value::String(s) => items.push(s.to_string_lossy()),
                        other => {
                            return Err(fail(
                                name,
                                format!("{name} entries must be strings, got {}", other.type_name()),
                            ));
                        }
                    }
                }
                if items.len() != t.raw_len() || t.pairs::<Value, Value>().count() != items.len() {
                    return Err(fail(name, format!("{name} must be a list like {{ \"api.example.com\" }}")));
                }
                HostList::parse(&items).map(Some).map_err(|e| fail(name, format!("{name}: {e}")))
            }
            other => Err(fail(name, format!("{name} must be a list of host patterns, got {}", other.type_name()))),
        }
    };
    let functions = |name: &str| -> Result<Vec<(String, Function)>, LoadError> {
        match get(name)? {
            Value::Nil => Ok(Vec::new()),
            Value::Table(t) => {
                let mut out = Vec::new();
                for pair in t.pairs::<Value, Value>() {
                    let (k, v) = pair.map_err(|e| fail(name, e.to_string()))?;
                    let Value::String(key) = k else {
                        return Err(fail(name, format!("{name} keys must be strings, got {}", k.type_name())));
                    };
                    let key = key.to_string_lossy();
                    match v {
                        Value::Function(f) => out.push((key, f)),
                        other => {
                            let line = source.lines().position(|l| l.contains(&format!("\"{key}\""))).map(|i| i + 1);
                            return Err(LoadError {
                                file: path.to_path_buf(),
                                line: line.or_else(|| assignment_line(source, name)),
                                message: format!("{name}[\"{key}\"] must be a function, got {}", other.type_name()),
                            });
                        }
                    }
                }
                Ok(out)
            }
            other => Err(fail(name, format!("{name} must be a table of functions, got {}", other.type_name()))),
        }
    };

    reject_misspelt_settings(&g, path, source)?;
    let mut by_host = Vec::new();
    for (key, _) in functions("outboundByHost")? {
        let p = HostPattern::parse(&key).map_err(|e| fail("outboundByHost", format!("outboundByHost: {e}")))?;
        by_host.push((p, ()));
    }
    let handler_names: BTreeSet<String> = functions("outboundHandlers")?.into_iter().map(|(k, _)| k).collect();
    let has_outbound = match get("outbound")? {
        Value::Nil => false,
        Value::Function(_) => true,
        other => return Err(fail("outbound", format!("outbound must be a function, got {}", other.type_name()))),
    };
    Ok(ClassPolicy {
        enable_internet: boolean("enableInternet", true)?,
        intercept_https: boolean("interceptHttps", false)?,
        redact_secrets: boolean("redactSecrets", false)?,
        allowed: list("allowedHosts")?,
        denied: list("deniedHosts")?,
        by_host: ByHost::new(by_host),
        has_outbound,
        handler_names,
    })
}

/// The globals a policy configures its class with (SPEC 2).
const SETTINGS: [&str; 8] = [
    "enableInternet",
    "interceptHttps",
    "redactSecrets",
    "allowedHosts",
    "deniedHosts",
    "outboundByHost",
    "outboundHandlers",
    "outbound",
];

/// A global that is almost a setting's name (`deniedhosts`, `denyHosts`, `outboundByHosts`) is
/// refused: Lua would accept it silently, and a policy that believes it denies hosts but does
/// not is the one mistake a user cannot see from the outside.
fn reject_misspelt_settings(g: &mlua::Table, path: &Path, source: &str) -> Result<(), LoadError> {
    for pair in g.pairs::<Value, Value>() {
        let Ok((Value::String(name), _)) = pair else { continue };
        let name = name.to_string_lossy();
        if SETTINGS.contains(&name.as_str()) {
            continue;
        }
        if let Some(meant) = SETTINGS.iter().find(|s| looks_like(&name, s)) {
            return Err(LoadError {
                file: path.to_path_buf(),
                line: assignment_line(source, &name),
                message: format!(
                    "global {name} is not a policy setting; did you mean {meant}? (names are case-sensitive; make a helper `local` to keep its name)"
                ),
            });
        }
    }
    Ok(())
}

/// Names users reach for that are further than two edits from the setting they mean.
const ALIASES: [(&str, &str); 3] =
    [("denyhosts", "deniedHosts"), ("blockedhosts", "deniedHosts"), ("blockhosts", "deniedHosts")];

/// Same letters in another case, at most two edits away, or a known alias.
fn looks_like(name: &str, setting: &str) -> bool {
    let (a, b) = (name.to_ascii_lowercase(), setting.to_ascii_lowercase());
    a == b
        || ALIASES.contains(&(a.as_str(), setting))
        || (name.len() >= 6 && edit_distance(a.as_bytes(), b.as_bytes()) <= 2)
}

/// Levenshtein distance (insert, delete, substitute), two rows.
fn edit_distance(a: &[u8], b: &[u8]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelt_settings_are_recognised_and_helpers_are_not() {
        for typo in [
            "deniedhosts",
            "denyHosts",
            "allowHosts",
            "allowedHost",
            "outboundByHosts",
            "outboundHandler",
            "interceptHTTPS",
            "outbounds",
            "enableinternet",
        ] {
            assert!(SETTINGS.iter().any(|s| looks_like(typo, s)), "{typo}");
        }
        for helper in
            ["inbound", "json", "helpers", "allowedHostsFor", "UPSTREAM", "outboundByHostFor", "config", "secrets"]
        {
            assert!(!SETTINGS.iter().any(|s| looks_like(helper, s)), "{helper}");
        }
        assert_eq!(edit_distance(b"kitten", b"sitting"), 3);
    }
}
