//! `moat status` and `moat policy ID <setter> [ARGS]`: the CLI over the admin socket.

use std::path::Path;

use serde_json::{Value, json};

use super::client;

/// A CLI failure with its exit code (2: the user's input was refused, 1: runtime).
pub struct CommandError(pub u8, pub String);

/// Prints the running instance's status.
pub fn status(socket: &Path) -> Result<(), CommandError> {
    let (code, body) = client::call(socket, "GET", "/v1/status", None).map_err(|e| CommandError(1, e))?;
    let v: Value = serde_json::from_str(&body).map_err(|e| CommandError(1, format!("bad answer from moat: {e}")))?;
    if code != 200 {
        return Err(CommandError(1, v["error"].as_str().unwrap_or(&body).to_string()));
    }
    println!(
        "moat {} on node {} up {}s",
        v["version"].as_str().unwrap_or("?"),
        v["node"].as_str().unwrap_or("?"),
        v["uptimeSeconds"]
    );
    let mut failing = 0;
    for c in v["classes"].as_array().into_iter().flatten() {
        failing += usize::from(c["generation"].is_null() || c["lastError"].is_string());
        let generation = c["generation"].as_u64().map_or("not loaded".to_string(), |g| format!("generation {g}"));
        println!(
            "class {} ({}) on {}: {generation}",
            c["name"].as_str().unwrap_or("?"),
            c["policy"].as_str().unwrap_or("?"),
            c["listen"].as_str().unwrap_or("?")
        );
        if let Some(err) = c["lastError"].as_str() {
            println!("  last reload failed: {err}");
        }
    }
    // Scripts (and health checks) can tell a moat that does not serve what was saved.
    if failing > 0 {
        return Err(CommandError(
            1,
            format!(
                "{failing} class(es) not serving their policy file as saved: fix it (moat check; moat test if it has tests)"
            ),
        ));
    }
    Ok(())
}

/// Runs one setter (Cloudflare's instance method names) for container `id`.
pub fn policy(socket: &Path, id: &str, class: Option<&str>, setter: &str, args: &[String]) -> Result<(), CommandError> {
    let usage = |m: &str| CommandError(2, m.to_string());
    let arg = |i: usize, what: &str| args.get(i).cloned().ok_or_else(|| usage(&format!("{setter}: missing {what}")));
    let params = |i: usize| -> Result<Option<Value>, CommandError> {
        args.get(i)
            .map(|p| serde_json::from_str(p).map_err(|e| usage(&format!("{setter}: params must be JSON: {e}"))))
            .transpose()
    };
    let handler = |name: String, params: Option<Value>| match params {
        Some(p) => json!({ "method": name, "params": p }),
        None => json!({ "method": name }),
    };
    let base = format!("/v1/containers/{}", encode_path(id, false));
    let (method, path, body) = match setter {
        "show" => ("GET", base.clone(), None),
        "setOutboundHandler" => ("PUT", format!("{base}/outbound-handler"), Some(handler(arg(0, "NAME")?, params(1)?))),
        "removeOutboundHandler" => ("DELETE", format!("{base}/outbound-handler"), None),
        "setOutboundByHost" => (
            "PUT",
            format!("{base}/outbound-by-host/{}", encode_path(&arg(0, "HOST")?, false)),
            Some(handler(arg(1, "NAME")?, params(2)?)),
        ),
        "setOutboundByHosts" => {
            let map: Value =
                serde_json::from_str(&arg(0, "JSON map")?).map_err(|e| usage(&format!("setOutboundByHosts: {e}")))?;
            ("PUT", format!("{base}/outbound-by-hosts"), Some(map))
        }
        "removeOutboundByHost" => {
            ("DELETE", format!("{base}/outbound-by-host/{}", encode_path(&arg(0, "HOST")?, false)), None)
        }
        "setAllowedHosts" => ("PUT", format!("{base}/allowed-hosts"), Some(json!(args))),
        "setDeniedHosts" => ("PUT", format!("{base}/denied-hosts"), Some(json!(args))),
        "allowHost" => ("POST", format!("{base}/allowed-hosts/{}", encode_path(&arg(0, "HOST")?, false)), None),
        "denyHost" => ("POST", format!("{base}/denied-hosts/{}", encode_path(&arg(0, "HOST")?, false)), None),
        "removeAllowedHost" => {
            ("DELETE", format!("{base}/allowed-hosts/{}", encode_path(&arg(0, "HOST")?, false)), None)
        }
        "removeDeniedHost" => ("DELETE", format!("{base}/denied-hosts/{}", encode_path(&arg(0, "HOST")?, false)), None),
        "clearOverrides" => ("DELETE", format!("{base}/overrides"), None),
        "interceptOutboundHttp" | "interceptOutboundHttps" => {
            let kind = if setter.ends_with("Https") { "https" } else { "http" };
            let body = json!({ "kind": kind, "target": arg(0, "TARGET")?, "handler": arg(1, "HANDLER")?, "props": params(2)? });
            ("POST", format!("{base}/intercepts"), Some(body))
        }
        "interceptAllOutboundHttp" => {
            let body = json!({ "kind": "all", "handler": arg(0, "HANDLER")?, "props": params(1)? });
            ("POST", format!("{base}/intercepts"), Some(body))
        }
        other => {
            return Err(usage(&format!(
                "unknown setter {other:?}: use show, setOutboundHandler, removeOutboundHandler, setOutboundByHost, \
                 setOutboundByHosts, removeOutboundByHost, setAllowedHosts, setDeniedHosts, allowHost, denyHost, \
                 removeAllowedHost, removeDeniedHost, clearOverrides, interceptOutboundHttp, interceptOutboundHttps or \
                 interceptAllOutboundHttp"
            )));
        }
    };
    let path = match class {
        Some(c) => format!("{path}?class={}", encode_path(c, false)),
        None => path,
    };
    let (code, text) =
        client::call(socket, method, &path, body.map(|b| b.to_string())).map_err(|e| CommandError(1, e))?;
    if code >= 400 {
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let msg = v["error"].as_str().map(str::to_string).unwrap_or(text);
        return Err(CommandError(if code < 500 { 2 } else { 1 }, msg));
    }
    print!("{text}");
    Ok(())
}

/// Percent-encodes a path segment (or, with `keep_slash`, a path of segments).
pub fn encode_path(s: &str, keep_slash: bool) -> String {
    s.bytes()
        .map(|b| {
            let plain = b.is_ascii_alphanumeric() || b"-._~*:[]".contains(&b) || (keep_slash && b == b'/');
            if plain { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}
