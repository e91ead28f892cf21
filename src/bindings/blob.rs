//! Blob buckets (SPEC 6), R2-shaped. Object data lives in files under
//! `data_dir/blobs/BUCKET/`; object metadata (and which file holds the current version) lives
//! in the redb table `blob/BUCKET`.
//!
//! A put streams into a temporary file, syncs it, renames it to a name no other version
//! uses, then commits the metadata that points at it: a reader sees the old object or the new
//! one, never a torn one. The old version's file is removed after the commit (a reader that
//! already opened it keeps reading it: POSIX keeps an unlinked open file).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

/// Longest object key, in bytes (as R2).
pub const MAX_KEY: usize = 1024;
/// Most objects one `list` returns.
pub const MAX_LIST: usize = 1000;

fn table(name: &str) -> TableDefinition<'_, &'static str, &'static str> {
    TableDefinition::new(name)
}

/// A blob failure; the message is what a script sees.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{0}")]
    Invalid(String),
    #[error("blob storage failed: {0}")]
    Storage(String),
}

/// A database failure, as [`crate::db::describe`] says it.
fn storage(e: impl Into<redb::Error>) -> BlobError {
    BlobError::Storage(crate::db::describe(e.into()))
}

/// Index entries are moat's own JSON: one that does not parse is a damaged database.
fn bad_entry(e: serde_json::Error) -> BlobError {
    BlobError::Storage(format!("damaged index entry: {e}"))
}

/// What is stored about an object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    pub etag: String,
    /// Milliseconds since the epoch.
    pub uploaded: u64,
    #[serde(default)]
    pub http_metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    pub custom_metadata: serde_json::Map<String, serde_json::Value>,
    /// File name (inside the bucket folder) of this version's data.
    pub file: String,
}

/// One page of `list`.
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<ObjectMeta>,
    pub delimited_prefixes: Vec<String>,
    pub truncated: bool,
    pub cursor: Option<String>,
}

/// Every bucket of this instance.
pub struct BlobStore {
    db: Arc<redb::Database>,
    root: PathBuf,
}

/// A fresh data-file name for a version of `key`, and a temporary name to write it under.
pub fn new_file_names(key: &str) -> (String, String) {
    let mut r = [0u8; 8];
    let _ = aws_lc_rs::rand::SecureRandom::fill(&aws_lc_rs::rand::SystemRandom::new(), &mut r);
    let unique = hex(&r);
    let key_id = hex(&aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes()).as_ref()[..8]);
    (format!("{key_id}-{unique}.obj"), format!(".tmp-{unique}"))
}

/// The etag of an object: the first 16 bytes of its SHA-256, in hex.
pub fn etag(sha256: &[u8]) -> String {
    hex(&sha256[..16])
}

pub fn now_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Refuses keys that are empty, too long, contain NUL, or could be read as a path that
/// leaves the bucket (`..` segments, absolute paths). Data files are never named after keys,
/// so this is defence in depth and keeps keys portable to R2.
pub fn validate_key(key: &str) -> Result<(), BlobError> {
    // A key of any length may be refused; the message quotes at most its start.
    let shown: String = key.chars().take(80).collect();
    let more = if shown.len() < key.len() { "…" } else { "" };
    let bad = |why: &str| Err(BlobError::Invalid(format!("invalid object key {shown:?}{more}: {why}")));
    if key.is_empty() {
        return bad("empty");
    }
    if key.len() > MAX_KEY {
        return bad("longer than 1024 bytes");
    }
    if key.contains('\0') {
        return bad("contains NUL");
    }
    if key.starts_with('/') {
        return bad("absolute path");
    }
    if key.split(['/', '\\']).any(|seg| seg == ".." || seg == ".") {
        return bad("contains a . or .. segment");
    }
    Ok(())
}

impl BlobStore {
    pub fn new(db: Arc<redb::Database>, data_dir: &Path) -> Self {
        Self { db, root: data_dir.join("blobs") }
    }

    /// The folder of a bucket's data files.
    pub fn bucket_dir(&self, bucket: &str) -> PathBuf {
        self.root.join(bucket)
    }

    fn table_name(bucket: &str) -> String {
        format!("blob/{bucket}")
    }

    pub fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectMeta>, BlobError> {
        validate_key(key)?;
        let name = Self::table_name(bucket);
        let tx = self.db.begin_read().map_err(storage)?;
        let t = match tx.open_table(table(&name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        let Some(raw) = t.get(key).map_err(storage)? else { return Ok(None) };
        serde_json::from_str(raw.value()).map(Some).map_err(bad_entry)
    }

    /// Commits `meta` as the current version of its key; returns the replaced version.
    pub fn commit(&self, bucket: &str, meta: &ObjectMeta) -> Result<Option<ObjectMeta>, BlobError> {
        let name = Self::table_name(bucket);
        let json = serde_json::to_string(meta).map_err(bad_entry)?;
        let tx = self.db.begin_write().map_err(storage)?;
        let old = {
            let mut t = tx.open_table(table(&name)).map_err(storage)?;
            let old = t.insert(meta.key.as_str(), json.as_str()).map_err(storage)?.map(|v| v.value().to_string());
            old.and_then(|o| serde_json::from_str::<ObjectMeta>(&o).ok())
        };
        tx.commit().map_err(storage)?;
        Ok(old)
    }

    /// Removes keys; returns the removed versions (their files are the caller's to delete).
    pub fn remove(&self, bucket: &str, keys: &[String]) -> Result<Vec<ObjectMeta>, BlobError> {
        keys.iter().try_for_each(|k| validate_key(k))?;
        let name = Self::table_name(bucket);
        let tx = self.db.begin_write().map_err(storage)?;
        let mut removed = Vec::new();
        {
            let mut t = tx.open_table(table(&name)).map_err(storage)?;
            for k in keys {
                let old = t.remove(k.as_str()).map_err(storage)?;
                removed.extend(old.and_then(|v| serde_json::from_str(v.value()).ok()));
            }
        }
        tx.commit().map_err(storage)?;
        Ok(removed)
    }

    /// Stores an object from bytes in memory (CLI and admin API); the same steps as a streamed
    /// put: temporary file, sync, rename to a fresh name, commit, remove the old version.
    pub fn put_bytes(&self, bucket: &str, key: &str, data: &[u8]) -> Result<ObjectMeta, BlobError> {
        use std::io::Write;
        validate_key(key)?;
        let dir = self.bucket_dir(bucket);
        std::fs::create_dir_all(&dir).map_err(storage)?;
        let (file, tmp) = new_file_names(key);
        let tmp = dir.join(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(storage)?;
        f.write_all(data).and_then(|_| f.sync_all()).map_err(storage)?;
        std::fs::rename(&tmp, dir.join(&file)).map_err(storage)?;
        let meta = ObjectMeta {
            key: key.to_string(),
            size: data.len() as u64,
            etag: etag(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref()),
            uploaded: now_millis(),
            http_metadata: Default::default(),
            custom_metadata: Default::default(),
            file,
        };
        if let Some(old) = self.commit(bucket, &meta)? {
            let _ = std::fs::remove_file(dir.join(old.file));
        }
        Ok(meta)
    }

    /// Reads a whole object (CLI and admin API).
    pub fn get_bytes(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, BlobError> {
        for _ in 0..3 {
            let Some(meta) = self.head(bucket, key)? else { return Ok(None) };
            match std::fs::read(self.bucket_dir(bucket).join(&meta.file)) {
                Ok(b) => return Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(storage(e)),
            }
        }
        Err(BlobError::Storage(format!("{key:?} kept changing; try again")))
    }

    /// Deletes keys and their files.
    pub fn delete(&self, bucket: &str, keys: &[String]) -> Result<(), BlobError> {
        for m in self.remove(bucket, keys)? {
            let _ = std::fs::remove_file(self.bucket_dir(bucket).join(m.file));
        }
        Ok(())
    }

    /// Objects in key order after `cursor` under `prefix`; with a delimiter, keys that have it
    /// after the prefix are rolled up into `delimited_prefixes`.
    pub fn list(
        &self,
        bucket: &str,
        prefix: &str,
        limit: usize,
        cursor: Option<&str>,
        delimiter: Option<&str>,
    ) -> Result<Listing, BlobError> {
        let limit = limit.clamp(1, MAX_LIST);
        let name = Self::table_name(bucket);
        let tx = self.db.begin_read().map_err(storage)?;
        let t = match tx.open_table(table(&name)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Listing::default()),
            Err(e) => return Err(storage(e)),
        };
        let start = match cursor {
            Some(c) if c > prefix => c,
            _ => prefix,
        };
        let mut out = Listing::default();
        let mut count = 0;
        for row in t.range::<&str>(start..).map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let key = k.value();
            if Some(key) == cursor {
                continue;
            }
            if !key.starts_with(prefix) {
                break;
            }
            if count == limit {
                out.truncated = true;
                break;
            }
            let rest = &key[prefix.len()..];
            match delimiter.filter(|d| !d.is_empty()).and_then(|d| rest.find(d).map(|i| (i, d))) {
                Some((i, d)) => {
                    let p = format!("{prefix}{}{d}", &rest[..i]);
                    if out.delimited_prefixes.last() != Some(&p) {
                        out.delimited_prefixes.push(p.clone());
                        count += 1;
                    }
                    // Resume after every key under this rolled-up prefix.
                    out.cursor = Some(format!("{p}\u{10FFFF}"));
                }
                None => {
                    out.objects.push(serde_json::from_str(v.value()).map_err(bad_entry)?);
                    count += 1;
                    out.cursor = Some(key.to_string());
                }
            }
        }
        if !out.truncated {
            out.cursor = None;
        }
        Ok(out)
    }
}
