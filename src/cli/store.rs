//! `moat kv get|put|delete|list BINDING [KEY] [VALUE|-]` and
//! `moat blob get|put|delete|list BUCKET [KEY] [FILE|-]`: the data the policies see, opened
//! directly, or through the running instance's admin API when it holds the database.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use crate::admin::commands::{CommandError, encode_path};
use crate::config::{BindingOptions, Config};

use crate::bindings::kv::{Entry, kv_table};

/// One operation, with its key (for `list`: the prefix).
enum Op<'a> {
    Get(&'a str),
    Put(&'a str),
    Delete(&'a str),
    List(&'a str),
}

impl<'a> Op<'a> {
    fn parse(kind: &str, op: &str, key: Option<&'a str>) -> Result<Self, CommandError> {
        let need = || key.ok_or_else(|| usage(format!("{kind} {op}: missing KEY")));
        Ok(match op {
            "get" => Op::Get(need()?),
            "put" => Op::Put(need()?),
            "delete" => Op::Delete(need()?),
            "list" => Op::List(key.unwrap_or("")),
            other => return Err(usage(format!("{kind}: unknown operation {other:?}: use get, put, delete or list"))),
        })
    }
}

fn usage(m: String) -> CommandError {
    CommandError(2, m)
}

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError(1, e.to_string())
}

/// The binding names of a section, with the embedded default when the section is absent.
fn check_binding(
    section: &BTreeMap<String, BindingOptions>,
    default: &str,
    name: &str,
    what: &str,
) -> Result<(), CommandError> {
    let names: Vec<String> = if section.is_empty() { vec![default.into()] } else { section.keys().cloned().collect() };
    if names.iter().any(|n| n == name) {
        Ok(())
    } else {
        Err(usage(format!("no {what} {name:?} in the config (have: {})", names.join(", "))))
    }
}

/// The bytes to store: standard input for `-`, else the literal value (`kv`) or the file
/// it names (`blob`).
fn input(arg: Option<&str>, literal: bool, kind: &str) -> Result<Vec<u8>, CommandError> {
    match arg {
        None => Err(usage(format!(
            "{kind} put: missing {} (or - to read standard input)",
            if literal { "VALUE" } else { "FILE" }
        ))),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map_err(failed)?;
            Ok(buf)
        }
        Some(v) if literal => Ok(v.as_bytes().to_vec()),
        Some(f) => std::fs::read(f).map_err(|e| failed(format!("cannot read {f}: {e}"))),
    }
}

fn write_out(bytes: &[u8]) -> Result<(), CommandError> {
    let mut out = std::io::stdout();
    out.write_all(bytes).and_then(|_| out.flush()).map_err(failed)
}

/// Runs one `moat kv` operation.
pub fn kv(
    config: &Config,
    op: &str,
    binding: &str,
    key: Option<&str>,
    value: Option<&str>,
) -> Result<(), CommandError> {
    check_binding(&config.file.kv, "KV", binding, "KV binding")?;
    let op = Op::parse("kv", op, key)?;
    let store = match crate::db::open(&config.data_dir) {
        Ok(db) => crate::serve::stores::open(config, &db, false).map_err(failed)?.kv,
        Err(crate::db::OpenError::InUse) => return via_admin(config, "kv", binding, op, || input(value, true, "kv")),
        Err(e) => return Err(failed(e)),
    };
    let table = kv_table(binding);
    match op {
        Op::Get(k) => match store.get(&table, k.as_bytes()).map_err(failed)? {
            Some(e) => write_out(&e.value),
            None => Err(failed(format!("no key {k:?} in {binding}"))),
        },
        Op::Put(k) => {
            let entry = Entry { value: input(value, true, "kv")?, expiration: None, metadata: None };
            store.put(&table, k.as_bytes(), &entry).map_err(failed)
        }
        Op::Delete(k) => store.delete(&table, k.as_bytes()).map_err(failed),
        Op::List(prefix) => {
            let mut cursor: Option<String> = None;
            loop {
                let page = store
                    .list(&table, prefix.as_bytes(), crate::bindings::kv::MAX_LIST, cursor.as_deref())
                    .map_err(failed)?;
                for k in &page.keys {
                    println!("{}", String::from_utf8_lossy(&k.name));
                }
                if page.complete {
                    return Ok(());
                }
                cursor = page.cursor;
            }
        }
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
    check_binding(&config.file.blob, "BUCKET", bucket, "bucket")?;
    let op = Op::parse("blob", op, key)?;
    let store = match crate::db::open(&config.data_dir) {
        Ok(db) => crate::serve::stores::open(config, &db, false).map_err(failed)?.blob,
        Err(crate::db::OpenError::InUse) => {
            return via_admin(config, "blob", bucket, op, || input(file, false, "blob"));
        }
        Err(e) => return Err(failed(e)),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(failed)?;
    rt.block_on(async {
        match op {
            Op::Get(k) => match store.get_bytes(bucket, k).await.map_err(failed)? {
                Some(b) => write_out(&b),
                None => Err(failed(format!("no object {k:?} in {bucket}"))),
            },
            Op::Put(k) => store.put_bytes(bucket, k, input(file, false, "blob")?).await.map(|_| ()).map_err(failed),
            Op::Delete(k) => store.of(bucket).delete(bucket, &[k.to_string()]).await.map_err(failed),
            Op::List(prefix) => {
                for o in store.list_all(bucket, prefix).await.map_err(failed)? {
                    println!("{}", o.key);
                }
                Ok(())
            }
        }
    })
}

/// The same operation through the running moat's admin API (`/v1/kv/…` or `/v1/blob/…`).
fn via_admin(
    config: &Config,
    kind: &str,
    binding: &str,
    op: Op<'_>,
    body: impl FnOnce() -> Result<Vec<u8>, CommandError>,
) -> Result<(), CommandError> {
    let at = |k: &str| format!("/v1/{kind}/{binding}/{}", encode_path(k, true));
    let (method, path, body, listing) = match op {
        Op::Get(k) => ("GET", at(k), None, false),
        Op::Delete(k) => ("DELETE", at(k), None, false),
        Op::Put(k) => ("PUT", at(k), Some(body()?), false),
        Op::List(p) => ("GET", format!("/v1/{kind}/{binding}/?prefix={}", encode_path(p, false)), None, true),
    };
    let (code, bytes) = crate::admin::client::call_bytes(&config.admin_socket, method, &path, body).map_err(failed)?;
    if code >= 400 {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        return Err(CommandError(if code == 404 { 1 } else { 2 }, v["error"].as_str().unwrap_or("failed").to_string()));
    }
    if listing {
        // KV lists `keys[].name`, buckets list `objects[].key`.
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let items = v["keys"].as_array().or(v["objects"].as_array()).cloned().unwrap_or_default();
        for item in items {
            println!("{}", item["name"].as_str().or(item["key"].as_str()).unwrap_or(""));
        }
        return Ok(());
    }
    if method == "GET" { write_out(&bytes) } else { Ok(()) }
}
