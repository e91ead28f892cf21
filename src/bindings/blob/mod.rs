//! Blob buckets (SPEC 6), R2-shaped, on a backend ([`BlobBackend`]): moat's blob folder with
//! its index in redb by default ([`local::LocalBlobs`]), or an S3-compatible service
//! ([`s3::S3Blobs`]: S3, R2, MinIO, …) that several moat nodes share. [`BlobStore`] is what
//! the rest of moat uses: it routes each bucket to its backend.

pub mod local;
#[cfg(feature = "s3")]
pub mod s3;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::body::Body;

/// Longest object key, in bytes (as R2).
pub const MAX_KEY: usize = 1024;
/// Most objects one `list` returns.
pub const MAX_LIST: usize = 1000;

/// A blob failure; the message is what a script sees.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("{0}")]
    Invalid(String),
    #[error("blob storage failed: {0}")]
    Storage(String),
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
    /// File name (inside the bucket folder) of this version's data; empty on other backends.
    #[serde(default)]
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

/// What `list` asks for.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub prefix: String,
    pub limit: usize,
    pub cursor: Option<String>,
    pub delimiter: Option<String>,
}

/// A part of an object: `offset`, and `length` (to the end when `None`).
pub type Range = Option<(u64, Option<u64>)>;

/// The future a backend call returns.
pub type BlobFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BlobError>> + Send + 'a>>;

/// The object metadata a put stores besides the data.
#[derive(Clone, Debug, Default)]
pub struct PutMeta {
    pub http_metadata: serde_json::Map<String, serde_json::Value>,
    pub custom_metadata: serde_json::Map<String, serde_json::Value>,
}

/// Where buckets are stored. Keys are validated before a backend is called. The contract
/// every backend passes is the conformance suite (`tests/it/blob_conformance.rs`).
pub trait BlobBackend: Send + Sync {
    fn head<'a>(&'a self, bucket: &'a str, key: &'a str) -> BlobFuture<'a, Option<ObjectMeta>>;
    /// The object and its data (the part `range` names), streamed.
    fn get<'a>(&'a self, bucket: &'a str, key: &'a str, range: Range) -> BlobFuture<'a, Option<(ObjectMeta, Body)>>;
    /// Stores `body` under `key`, streaming; atomic: a reader sees the old object or the new one.
    fn put<'a>(&'a self, bucket: &'a str, key: &'a str, body: Body, meta: PutMeta) -> BlobFuture<'a, ObjectMeta>;
    fn delete<'a>(&'a self, bucket: &'a str, keys: &'a [String]) -> BlobFuture<'a, ()>;
    /// Objects in key order after `cursor` under `prefix`; with a delimiter, keys that have
    /// it after the prefix are rolled up into `delimited_prefixes`.
    fn list<'a>(&'a self, bucket: &'a str, query: &'a ListQuery) -> BlobFuture<'a, Listing>;
}

/// Every bucket of this instance, each on its backend.
pub struct BlobStore {
    /// Bucket binding with its own backend → that backend.
    routes: HashMap<String, Arc<dyn BlobBackend>>,
    /// Every other bucket.
    default: Arc<dyn BlobBackend>,
}

impl BlobStore {
    /// Every bucket in moat's blob folder.
    pub fn new(db: Arc<redb::Database>, data_dir: &std::path::Path) -> Self {
        Self::with_backends(Arc::new(local::LocalBlobs::new(db, data_dir)), HashMap::new())
    }

    pub fn with_backends(default: Arc<dyn BlobBackend>, routes: HashMap<String, Arc<dyn BlobBackend>>) -> Self {
        Self { routes, default }
    }

    /// The backend of `bucket`.
    pub fn of(&self, bucket: &str) -> &Arc<dyn BlobBackend> {
        self.routes.get(bucket).unwrap_or(&self.default)
    }

    /// Stores bytes held in memory (CLI and admin API).
    pub async fn put_bytes(&self, bucket: &str, key: &str, data: Vec<u8>) -> Result<ObjectMeta, BlobError> {
        validate_key(key)?;
        self.of(bucket).put(bucket, key, crate::body::full(data), PutMeta::default()).await
    }

    /// Reads a whole object into memory (CLI and admin API).
    pub async fn get_bytes(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, BlobError> {
        use http_body_util::BodyExt;
        validate_key(key)?;
        let Some((_, body)) = self.of(bucket).get(bucket, key, None).await? else { return Ok(None) };
        let data = body.collect().await.map_err(|e| BlobError::Storage(format!("reading {key:?}: {e}")))?;
        Ok(Some(data.to_bytes().to_vec()))
    }

    /// Every key under `prefix`, page after page (CLI and admin API).
    pub async fn list_all(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, BlobError> {
        let mut query = ListQuery { prefix: prefix.to_string(), limit: MAX_LIST, ..Default::default() };
        let mut out = Vec::new();
        loop {
            let page = self.of(bucket).list(bucket, &query).await?;
            out.extend(page.objects);
            if !page.truncated {
                return Ok(out);
            }
            query.cursor = page.cursor;
        }
    }
}

/// Refuses keys that are empty, too long, contain NUL, or could be read as a path that
/// leaves the bucket (`..` segments, absolute paths). Data files are never named after keys,
/// so this is defence in depth and keeps keys portable to R2 and S3.
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
