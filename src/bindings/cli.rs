//! `moat kv get|put|delete|list BINDING [KEY] [VALUE|-]`: the same data the policies see,
//! opened directly, or through the running instance's admin API when it holds the database.

use std::io::{Read, Write};

use crate::admin::commands::CommandError;
use crate::config::Config;

use super::kv::{Entry, KvStore, MAX_LIST, kv_table};

/// Runs one `moat kv` operation.
pub fn kv(
    config: &Config,
    op: &str,
    binding: &str,
    key: Option<&str>,
    value: Option<&str>,
) -> Result<(), CommandError> {
    let usage = |m: String| CommandError(2, m);
    let names: Vec<String> =
        if config.file.kv.is_empty() { vec!["KV".into()] } else { config.file.kv.keys().cloned().collect() };
    if !names.iter().any(|n| n == binding) {
        return Err(usage(format!("no KV binding {binding:?} in the config (have: {})", names.join(", "))));
    }
    let need_key = || key.ok_or_else(|| usage(format!("kv {op}: missing KEY")));
    let read_value = |v: Option<&str>| -> Result<Vec<u8>, CommandError> {
        match v {
            None => Err(usage("kv put: missing VALUE (or - to read standard input)".into())),
            Some("-") => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).map_err(|e| CommandError(1, e.to_string()))?;
                Ok(buf)
            }
            Some(v) => Ok(v.as_bytes().to_vec()),
        }
    };
    match crate::db::open(&config.data_dir) {
        Ok(db) => {
            let store = KvStore::new(db);
            let table = kv_table(binding);
            let fail = |e: super::kv::KvError| CommandError(1, e.to_string());
            match op {
                "get" => match store.get(&table, need_key()?.as_bytes()).map_err(fail)? {
                    Some(e) => write_out(&e.value),
                    None => Err(CommandError(1, format!("no key {:?} in {binding}", need_key()?))),
                },
                "put" => {
                    let entry = Entry { value: read_value(value)?, expiration: None, metadata: None };
                    store.put(&table, need_key()?.as_bytes(), &entry).map_err(fail)
                }
                "delete" => store.delete(&table, need_key()?.as_bytes()).map_err(fail),
                "list" => {
                    let mut cursor: Option<String> = None;
                    loop {
                        let page = store
                            .list(&table, key.unwrap_or("").as_bytes(), MAX_LIST, cursor.as_deref())
                            .map_err(fail)?;
                        for k in &page.keys {
                            println!("{}", String::from_utf8_lossy(&k.name));
                        }
                        if page.complete {
                            return Ok(());
                        }
                        cursor = page.cursor;
                    }
                }
                other => Err(usage(format!("kv: unknown operation {other:?}: use get, put, delete or list"))),
            }
        }
        Err(crate::db::OpenError::InUse) => via_admin(config, op, binding, key, value),
        Err(e) => Err(CommandError(1, e.to_string())),
    }
}

fn write_out(bytes: &[u8]) -> Result<(), CommandError> {
    let mut out = std::io::stdout();
    out.write_all(bytes).and_then(|_| out.flush()).map_err(|e| CommandError(1, e.to_string()))
}

fn via_admin(
    config: &Config,
    op: &str,
    binding: &str,
    key: Option<&str>,
    value: Option<&str>,
) -> Result<(), CommandError> {
    use crate::admin::client::call_bytes;
    let socket = &config.admin_socket;
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    let key_path = || {
        key.map(|k| format!("/v1/kv/{binding}/{}", enc(k)))
            .ok_or_else(|| CommandError(2, format!("kv {op}: missing KEY")))
    };
    let (method, path, body) = match op {
        "get" => ("GET", key_path()?, None),
        "delete" => ("DELETE", key_path()?, None),
        "put" => {
            let v = match value {
                Some("-") => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf).map_err(|e| CommandError(1, e.to_string()))?;
                    buf
                }
                Some(v) => v.as_bytes().to_vec(),
                None => return Err(CommandError(2, "kv put: missing VALUE (or - to read standard input)".into())),
            };
            ("PUT", key_path()?, Some(v))
        }
        "list" => ("GET", format!("/v1/kv/{binding}?prefix={}", enc(key.unwrap_or(""))), None),
        other => return Err(CommandError(2, format!("kv: unknown operation {other:?}: use get, put, delete or list"))),
    };
    let (code, bytes) = call_bytes(socket, method, &path, body).map_err(|e| CommandError(1, e))?;
    if code >= 400 {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        return Err(CommandError(if code == 404 { 1 } else { 2 }, v["error"].as_str().unwrap_or("failed").to_string()));
    }
    match op {
        "get" => write_out(&bytes),
        "list" => {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            for k in v["keys"].as_array().into_iter().flatten() {
                println!("{}", k["name"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
