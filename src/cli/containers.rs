//! `moat start|ps|stop|kill|wait|logs`: the daemon's containers (SPEC 5.3), over the admin
//! socket of the `moat serve` that runs them.

use std::io::Write;

use serde_json::{Value, json};

use crate::admin::client;
use crate::admin::commands::{CommandError, encode_path};
use crate::config::Config;

/// `moat start`'s flags.
#[derive(Debug, Default)]
pub struct StartOptions {
    pub id: Option<String>,
    pub class: Option<String>,
    pub env: Vec<String>,
    pub internet: Option<bool>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// `--memory`, in bytes.
    pub memory: Option<u64>,
    /// `--pids`.
    pub pids: Option<u32>,
}

/// Calls the admin API; an error answer becomes its one line (exit 2 for the user's mistake).
fn call(config: &Config, method: &str, path: &str, body: Option<Value>) -> Result<Value, CommandError> {
    let (code, text) = client::call(&config.admin_socket, method, path, body.map(|b| b.to_string()))
        .map_err(|e| CommandError(1, e))?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if code >= 400 {
        let msg = v["error"].as_str().map(str::to_string).unwrap_or(text);
        return Err(CommandError(if code < 500 { 2 } else { 1 }, msg));
    }
    Ok(v)
}

fn path(id: &str, rest: &str) -> String {
    format!("/v1/containers/{}{rest}", encode_path(id, false))
}

/// Starts `cmd` as a container of the running moat, detached; prints its id.
pub fn start(config: &Config, options: StartOptions, cmd: &[String]) -> Result<(), CommandError> {
    let usage = |m: String| CommandError(2, m);
    let id = match options.id {
        Some(id) => id,
        None => {
            let bytes = crate::tls::random_bytes(4).map_err(|e| CommandError(1, format!("no random bytes: {e}")))?;
            format!("c-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
        }
    };
    let mut env = serde_json::Map::new();
    for pair in &options.env {
        let (k, v) = pair
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| usage(format!("--env {pair:?}: write K=V")))?;
        env.insert(k.to_string(), json!(v));
    }
    let workdir = match options.workdir {
        Some(d) => {
            Some(std::path::absolute(&d).map_err(|e| usage(format!("--workdir {d}: {e}")))?.display().to_string())
        }
        None => std::env::current_dir().ok().map(|d| d.display().to_string()),
    };
    let body = json!({
        "id": id, "class": options.class, "entrypoint": cmd, "env": env,
        "enableInternet": options.internet, "workdir": workdir, "user": options.user,
        "memory": options.memory, "pids": options.pids,
    });
    call(config, "POST", "/v1/containers", Some(body))?;
    println!("{id}");
    Ok(())
}

/// Lists the containers the running moat has records of.
pub fn ps(config: &Config) -> Result<(), CommandError> {
    let v = call(config, "GET", "/v1/containers", None)?;
    let mut out = std::io::stdout().lock();
    let records: Vec<&Value> = v["records"].as_array().into_iter().flatten().collect();
    // Nodes sharing a registry ([cluster] store) list each other's containers: say whose.
    let nodes = records.iter().any(|r| r["node"].is_string());
    let node_of = |r: &Value| if nodes { format!("{:<14} ", r["node"].as_str().unwrap_or("-")) } else { String::new() };
    let header = if nodes { format!("{:<14} ", "NODE") } else { String::new() };
    let _ = writeln!(out, "{:<20} {header}{:<12} {:<10} {:>8} {:>5}  COMMAND", "ID", "CLASS", "STATE", "PID", "EXIT");
    for r in records {
        let field = |k: &str| match &r[k] {
            Value::Null => "-".to_string(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let cmd: Vec<&str> = r["entrypoint"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let _ = writeln!(
            out,
            "{:<20} {}{:<12} {:<10} {:>8} {:>5}  {}",
            field("id"),
            node_of(r),
            field("class"),
            field("state"),
            field("pid"),
            field("exitCode"),
            cmd.join(" ")
        );
    }
    Ok(())
}

/// `moat stop`: SIGTERM, SIGKILL after the grace period; waits for its end.
pub fn stop(config: &Config, id: &str) -> Result<(), CommandError> {
    call(config, "DELETE", &path(id, ""), Some(json!({})))?;
    wait(config, id).map(drop)
}

/// `moat kill [-s SIG]`: a signal by number or name (TERM, SIGTERM, 15).
pub fn kill(config: &Config, id: &str, signal: &str) -> Result<(), CommandError> {
    let number = signal_number(signal)
        .ok_or_else(|| CommandError(2, format!("-s {signal}: not a signal (a number, or a name like TERM)")))?;
    call(config, "POST", &path(id, "/signal"), Some(json!({ "signal": number })))?;
    Ok(())
}

fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    let names = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2", "PIPE", "ALRM",
        "TERM",
    ];
    names.iter().position(|n| *n == name).map(|i| i as i32 + 1)
}

/// `moat wait`: blocks until the container ends; prints its exit code and returns it (the
/// destroy message is an error).
pub fn wait(config: &Config, id: &str) -> Result<i32, CommandError> {
    let v = call(config, "GET", &path(id, "/wait"), None)?;
    let code = v["exitCode"].as_i64().unwrap_or(1) as i32;
    println!("{code}");
    Ok(code)
}

/// `moat logs [-f]`: the container's output, kept under the data folder; with `follow`,
/// then what it writes until it ends.
pub fn logs(config: &Config, id: &str, follow: bool) -> Result<(), CommandError> {
    let file = crate::serve::container_log(&config.data_dir, id);
    let mut done = 0u64;
    loop {
        let text = std::fs::read(&file)
            .map_err(|e| CommandError(1, format!("no log of container {id} ({}: {e})", file.display())))?;
        // The log keeps its newer half when it grows too big: start over then.
        let from = if (text.len() as u64) < done { 0 } else { done as usize };
        let _ = std::io::stdout().write_all(&text[from..]);
        let _ = std::io::stdout().flush();
        done = text.len() as u64;
        if !follow {
            return Ok(());
        }
        let v = call(config, "GET", &path(id, ""), None)?;
        if !v["lifecycle"]["running"].as_bool().unwrap_or(false) {
            let rest = std::fs::read(&file).unwrap_or_default();
            let _ = std::io::stdout().write_all(rest.get(done as usize..).unwrap_or_default());
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `moat port ID PORT [METHOD PATH]`: an HTTP request into the container at PORT (its
/// loopback, from inside its namespace); prints the answer's body. `data` is the body sent.
pub fn port(
    config: &Config,
    id: &str,
    port: u16,
    method: &str,
    target: &str,
    data: Option<&str>,
) -> Result<(), CommandError> {
    let target = target.trim_start_matches('/');
    let path = path(id, &format!("/ports/{port}/{target}"));
    let (code, body) = client::call_bytes(&config.admin_socket, method, &path, data.map(|d| d.as_bytes().to_vec()))
        .map_err(|e| CommandError(1, e))?;
    let is_ours = code >= 400 && serde_json::from_slice::<Value>(&body).is_ok_and(|v| v["code"].is_string());
    if is_ours {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        return Err(CommandError(if code < 500 { 2 } else { 1 }, v["error"].as_str().unwrap_or("failed").to_string()));
    }
    let _ = std::io::stdout().write_all(&body);
    if code >= 400 {
        return Err(CommandError(1, format!("the container answered {code}")));
    }
    Ok(())
}

/// `moat exec ID -- CMD`: CMD in the running container `id`, as its command runs (same
/// namespaces, user, environment, no privileges); returns CMD's exit code.
pub fn exec(config: &Config, id: &str, cmd: &[String]) -> Result<i32, CommandError> {
    let v = call(config, "GET", &path(id, ""), None)?;
    let pid = v["lifecycle"]["pid"].as_u64().filter(|_| v["lifecycle"]["running"].as_bool() == Some(true));
    let pid = pid.ok_or_else(|| CommandError(2, format!("container {id} is not running")))?;
    let exe = std::env::current_exe().map_err(|e| CommandError(1, format!("cannot find moat's own binary: {e}")))?;
    // A fresh process: entering namespaces needs a single thread.
    let status = std::process::Command::new(exe)
        .arg("__sandbox-exec")
        .arg(pid.to_string())
        .arg(std::path::absolute(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone()))
        .arg("--")
        .args(cmd)
        .status()
        .map_err(|e| CommandError(1, format!("cannot run moat exec: {e}")))?;
    Ok(crate::sandbox::exit_code(status))
}
