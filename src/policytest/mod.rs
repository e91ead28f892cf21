//! `moat test`: policy tests written in Lua beside the policy (`agent_test.lua` tests
//! `agent.lua`), each run against a fresh engine of its own (the real proxy on loopback, a
//! fresh database) with the network replaced by fixtures. One line per test, a summary, and
//! secrets never printed: every line goes through the log's redaction.

mod api;
mod client;
mod engine;
mod fixtures;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use mlua::{Function, Lua, Table, Value};

use crate::config::{ClassConfig, Config};
use crate::script::sandbox::{self, ModuleSource, StateOptions};
use engine::{Engine, Setup};
use fixtures::{Dialer, Fixtures, first_line};

/// An error as its one-line message (`map_err(text)`).
fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Longest a single test may run.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts over every file run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

/// What a line of `moat test`'s output is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// `ok    FILE: NAME`.
    Passed,
    /// `FAIL  FILE: NAME`, or one of the reasons under it.
    Failed,
    /// What a test printed (`print(...)`), shown before its result line.
    Printed,
}

/// Runs the test files, handing each output line (redacted) and its kind to `print`.
pub fn run_files(config: &Config, files: &[PathBuf], print: &mut dyn FnMut(&str, Line)) -> Tally {
    let saved = crate::log::secrets();
    crate::log::capture::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("test runtime");
    let local = tokio::task::LocalSet::new();
    let mut tally = Tally::default();
    for file in files {
        let mut say = |line: &str, kind| print(&crate::log::redact(line), kind);
        let t = local.block_on(&rt, run_file(config, file, &mut say));
        tally.passed += t.passed;
        tally.failed += t.failed;
    }
    crate::log::capture::stop();
    crate::log::set_secrets(saved);
    tally
}

/// Runs `class`'s `tests` (the reload gate `serve` installs): `Err` names what failed, in
/// one line. Runs on a thread of its own, whatever runtime the caller is on.
pub(crate) fn gate(config: &Config, class: &ClassConfig) -> Result<(), String> {
    let Some(tests) = class.tests.clone() else { return Ok(()) };
    let (passed, failed, lines) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut lines = Vec::new();
            let tally = run_files(config, std::slice::from_ref(&tests), &mut |line, kind| {
                if kind == Line::Failed {
                    lines.push(line.trim().to_string());
                }
            });
            (tally.passed, tally.failed, lines)
        })
        .join()
        .unwrap_or((0, 1, vec!["the test run panicked".to_string()]))
    });
    if failed == 0 {
        tracing::info!(target: "moat::reload", class = %class.name, "{passed} test(s) of {} passed", tests.display());
        return Ok(());
    }
    let shown: Vec<&str> = lines.iter().take(4).map(String::as_str).collect();
    Err(format!("{failed} of {} test(s) in {} failed: {}", passed + failed, tests.display(), shown.join(" / ")))
}

/// The test files of the config's classes: `tests` if the class names them, else
/// `STEM_test.lua` beside each policy when it exists.
pub fn discover(config: &Config) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for c in &config.classes {
        let candidate = c.tests.clone().unwrap_or_else(|| beside(&c.policy));
        if candidate.exists() && !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    out
}

/// `agent.lua` → `agent_test.lua` in the same folder.
fn beside(policy: &Path) -> PathBuf {
    let stem = policy.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    policy.with_file_name(format!("{stem}_test.lua"))
}

/// What a test file declares at its top level.
struct TestFile {
    lua: Lua,
    tests: Vec<(String, Function)>,
    /// What `print` wrote since it was last shown.
    printed: Rc<std::cell::RefCell<Vec<String>>>,
    policy: PathBuf,
    secrets: BTreeMap<String, String>,
    vars: BTreeMap<String, String>,
    hosts: BTreeMap<String, IpAddr>,
}

async fn run_file(config: &Config, file: &Path, say: &mut dyn FnMut(&str, Line)) -> Tally {
    let shown = file.display().to_string();
    let tf = match load(file) {
        Ok(tf) => tf,
        Err(e) => {
            say(&format!("FAIL  {shown}: {e}"), Line::Failed);
            return Tally { passed: 0, failed: 1 };
        }
    };
    let class = class_for(config, &tf.policy);
    let mut secrets = tf.secrets.clone();
    // A secret the config declares and the test does not give gets a recognisable value.
    for name in config.file.secrets.keys() {
        secrets.entry(name.clone()).or_insert_with(|| format!("moat-test-secret-{name}"));
    }
    let mut registered = crate::log::secrets();
    registered.extend(secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
    crate::log::set_secrets(registered);
    if tf.tests.is_empty() {
        say(&format!("FAIL  {shown}: defines no test (write test(\"name\", function(t) ... end))"), Line::Failed);
        return Tally { passed: 0, failed: 1 };
    }
    let mut tally = Tally::default();
    for (name, func) in &tf.tests {
        let setup = Setup {
            base: config,
            class: &class,
            secrets: secrets.clone(),
            vars: tf.vars.clone(),
            hosts: tf.hosts.clone(),
        };
        let outcome = run_one(&tf.lua, setup, func).await;
        for line in tf.printed.borrow_mut().drain(..) {
            say(&format!("      | {line}"), Line::Printed);
        }
        match outcome {
            Ok(()) => {
                tally.passed += 1;
                say(&format!("ok    {shown}: {name}"), Line::Passed);
            }
            Err(why) => {
                tally.failed += 1;
                say(&format!("FAIL  {shown}: {name}"), Line::Failed);
                for line in why {
                    say(&format!("      {line}"), Line::Failed);
                }
            }
        }
    }
    tally
}

/// Runs one test on a fresh engine; the reasons it failed, if it did.
async fn run_one(lua: &Lua, setup: Setup<'_>, func: &Function) -> Result<(), Vec<String>> {
    let fixtures = Fixtures::new(lua).map_err(|e| vec![e.to_string()])?;
    let engine = Rc::new(Engine::start(setup, Rc::new(Dialer(fixtures.clone()))).map_err(|e| vec![e])?);
    let t = api::make(lua, &engine, &fixtures).map_err(|e| vec![e.to_string()])?;
    let outcome = tokio::time::timeout(TEST_TIMEOUT, func.call_async::<()>(t)).await;
    drop(engine);
    let mut why = Vec::new();
    match outcome {
        Err(_) => why.push(format!("did not finish within {TEST_TIMEOUT:?}")),
        Ok(Err(e)) => why.push(first_line(&e)),
        Ok(Ok(())) => {}
    }
    why.extend(fixtures.failures.borrow().iter().cloned());
    if why.is_empty() { Ok(()) } else { Err(why) }
}

/// Runs a test file's top level: its `test(...)` calls and its settings.
fn load(file: &Path) -> Result<TestFile, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"))?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let lua = sandbox::new_state(StateOptions {
        memory_limit: 1 << 30,
        body_buffer: 64 << 20,
        upstream: None,
        sink: None,
        modules: ModuleSource { dir: dir.clone(), captured: BTreeMap::new(), read: Default::default() },
        policy_path: file,
    })
    .map_err(|e| e.to_string())?;
    let registered = lua.create_table().map_err(|e| e.to_string())?;
    let list = registered.clone();
    let test = lua
        .create_function(move |lua, (name, f): (String, Function)| {
            let pair = lua.create_table()?;
            pair.raw_push(name)?;
            pair.raw_push(f)?;
            list.raw_push(pair)
        })
        .map_err(|e| e.to_string())?;
    lua.globals().set("test", test).map_err(|e| e.to_string())?;
    // A test's own print goes with its test's lines (redacted there), not to the log.
    let printed: Rc<std::cell::RefCell<Vec<String>>> = Rc::default();
    let sink = printed.clone();
    let print = lua
        .create_function(move |_, args: mlua::Variadic<Value>| {
            let parts: Vec<String> = args.iter().map(|v| v.to_string().unwrap_or_else(|_| format!("{v:?}"))).collect();
            sink.borrow_mut().push(parts.join("\t"));
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    lua.globals().set("print", print).map_err(|e| e.to_string())?;
    lua.load(&text).set_name(format!("@{}", file.display())).exec().map_err(|e| first_line(&e))?;
    let mut tests = Vec::new();
    for entry in registered.sequence_values::<Table>() {
        let entry = entry.map_err(|e| e.to_string())?;
        tests.push((entry.get::<String>(1).map_err(|e| e.to_string())?, entry.get(2).map_err(|e| e.to_string())?));
    }
    let g = lua.globals();
    let policy = match g.get::<Value>("policy").map_err(|e| e.to_string())? {
        Value::String(s) => dir.join(s.to_str().map_err(|e| e.to_string())?.to_string()),
        Value::Nil => {
            let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let base = stem
                .strip_suffix("_test")
                .ok_or("set policy = \"FILE.lua\" (the file it tests), or name the test file POLICY_test.lua")?;
            dir.join(format!("{base}.lua"))
        }
        other => return Err(format!("policy must be a file name, not a {}", other.type_name())),
    };
    let strings = |name: &str| -> Result<BTreeMap<String, String>, String> {
        match g.get::<Option<Table>>(name) {
            Ok(None) => Ok(BTreeMap::new()),
            Ok(Some(t)) => t.pairs::<String, String>().collect::<mlua::Result<_>>().map_err(|e| format!("{name}: {e}")),
            Err(e) => Err(format!("{name} must be a table of strings: {e}")),
        }
    };
    let (secrets, vars) = (strings("secrets")?, strings("vars")?);
    let mut hosts = BTreeMap::new();
    for (name, ip) in strings("hosts")? {
        let ip = ip.parse().map_err(|_| format!("hosts[\"{name}\"] = {ip:?} is not an IP address"))?;
        hosts.insert(name.to_ascii_lowercase(), ip);
    }
    Ok(TestFile { lua, tests, printed, policy, secrets, vars, hosts })
}

/// The config's class for `policy`, else a class named after the file with the config's
/// settings (limits, bindings) around it.
fn class_for(config: &Config, policy: &Path) -> ClassConfig {
    let same = |p: &Path| std::fs::canonicalize(p).ok() == std::fs::canonicalize(policy).ok();
    config.classes.iter().find(|c| same(&c.policy)).cloned().unwrap_or_else(|| ClassConfig {
        name: policy.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "default".into()).into(),
        policy: policy.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("address"),
        tests: None,
    })
}
