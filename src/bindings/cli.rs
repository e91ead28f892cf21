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

/// Runs one `moat blob` operation: `get` writes the object to standard output, `put` reads
/// FILE (or standard input for `-`), `list` prints keys under an optional prefix.
pub fn blob(
    config: &Config,
    op: &str,
    bucket: &str,
    key: Option<&str>,
    file: Option<&str>,
) -> Result<(), CommandError> {
    let usage = |m: String| CommandError(2, m);
    let names: Vec<String> =
        if config.file.blob.is_empty() { vec!["BUCKET".into()] } else { config.file.blob.keys().cloned().collect() };
    if !names.iter().any(|n| n == bucket) {
        return Err(usage(format!("no bucket {bucket:?} in the config (have: {})", names.join(", "))));
    }
    let need_key = || key.ok_or_else(|| usage(format!("blob {op}: missing KEY")));
    let read_input = || -> Result<Vec<u8>, CommandError> {
        match file {
            None => Err(usage("blob put: missing FILE (or - to read standard input)".into())),
            Some("-") => {
                let mut buf = Vec::new();
                std::io::stdin().read_to_end(&mut buf).map_err(|e| CommandError(1, e.to_string()))?;
                Ok(buf)
            }
            Some(f) => std::fs::read(f).map_err(|e| CommandError(1, format!("cannot read {f}: {e}"))),
        }
    };
    match crate::db::open(&config.data_dir) {
        Ok(db) => {
            let store = super::blob::BlobStore::new(db, &config.data_dir);
            let fail = |e: super::blob::BlobError| CommandError(1, e.to_string());
            match op {
                "get" => match store.get_bytes(bucket, need_key()?).map_err(fail)? {
                    Some(b) => write_out(&b),
                    None => Err(CommandError(1, format!("no object {:?} in {bucket}", need_key()?))),
                },
                "put" => store.put_bytes(bucket, need_key()?, &read_input()?).map(|_| ()).map_err(fail),
                "delete" => store.delete(bucket, &[need_key()?.to_string()]).map_err(fail),
                "list" => {
                    let mut cursor: Option<String> = None;
                    loop {
                        let l = store
                            .list(bucket, key.unwrap_or(""), super::blob::MAX_LIST, cursor.as_deref(), None)
                            .map_err(fail)?;
                        for o in &l.objects {
                            println!("{}", o.key);
                        }
                        if !l.truncated {
                            return Ok(());
                        }
                        cursor = l.cursor;
                    }
                }
                other => Err(usage(format!("blob: unknown operation {other:?}: use get, put, delete or list"))),
            }
        }
        Err(crate::db::OpenError::InUse) => {
            let enc = |s: &str| {
                s.bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect::<String>()
            };
            let (method, path, body) = match op {
                "get" => ("GET", format!("/v1/blob/{bucket}/{}", enc(need_key()?)), None),
                "delete" => ("DELETE", format!("/v1/blob/{bucket}/{}", enc(need_key()?)), None),
                "put" => ("PUT", format!("/v1/blob/{bucket}/{}", enc(need_key()?)), Some(read_input()?)),
                "list" => ("GET", format!("/v1/blob/{bucket}/?prefix={}", enc(key.unwrap_or(""))), None),
                other => return Err(usage(format!("blob: unknown operation {other:?}: use get, put, delete or list"))),
            };
            let (code, bytes) = crate::admin::client::call_bytes(&config.admin_socket, method, &path, body)
                .map_err(|e| CommandError(1, e))?;
            if code >= 400 {
                let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                return Err(CommandError(
                    if code == 404 { 1 } else { 2 },
                    v["error"].as_str().unwrap_or("failed").to_string(),
                ));
            }
            match op {
                "get" => write_out(&bytes),
                "list" => {
                    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                    for o in v["objects"].as_array().into_iter().flatten() {
                        println!("{}", o["key"].as_str().unwrap_or(""));
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        Err(e) => Err(CommandError(1, e.to_string())),
    }
}
