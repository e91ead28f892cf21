//! Buckets in moat's data folder: object data in files under `data_dir/blobs/BUCKET/`,
//! object metadata (and which file holds the current version) in the redb table
//! `blob/BUCKET`.
//!
//! A put streams into a temporary file, syncs it, renames it to a name no other version
//! uses, then commits the metadata that points at it: a reader sees the old object or the new
//! one, never a torn one. The old version's file is removed after the commit (a reader that
//! already opened it keeps reading it: POSIX keeps an unlinked open file).

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt, ReadBuf};

use redb::{ReadableDatabase, TableDefinition};

use super::{
    BlobBackend, BlobError, BlobFuture, ListQuery, Listing, MAX_LIST, ObjectMeta, PutMeta, Range, etag, hex,
    now_millis, validate_key,
};
use crate::body::{Body, BoxError};

fn table(name: &str) -> TableDefinition<'_, &'static str, &'static str> {
    TableDefinition::new(name)
}

/// A database failure, as [`crate::db::describe`] says it.
fn storage(e: impl Into<redb::Error>) -> BlobError {
    BlobError::Storage(crate::db::describe(e.into()))
}

/// Index entries are moat's own JSON: one that does not parse is a damaged database.
fn bad_entry(e: serde_json::Error) -> BlobError {
    BlobError::Storage(format!("damaged index entry: {e}"))
}

/// Every bucket kept in moat's data folder.
#[derive(Clone)]
pub struct LocalBlobs {
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

impl LocalBlobs {
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

/// Runs an index operation on tokio's blocking pool (a redb commit must not stall a worker).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, BlobError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| BlobError::Storage(format!("blob task failed: {e}")))?
}

impl BlobBackend for LocalBlobs {
    fn head<'a>(&'a self, bucket: &'a str, key: &'a str) -> BlobFuture<'a, Option<ObjectMeta>> {
        let (this, bucket, key) = (self.clone(), bucket.to_string(), key.to_string());
        Box::pin(blocking(move || this.head(&bucket, &key)))
    }

    fn get<'a>(&'a self, bucket: &'a str, key: &'a str, range: Range) -> BlobFuture<'a, Option<(ObjectMeta, Body)>> {
        Box::pin(self.get_stream(bucket, key, range))
    }

    fn put<'a>(&'a self, bucket: &'a str, key: &'a str, body: Body, meta: PutMeta) -> BlobFuture<'a, ObjectMeta> {
        Box::pin(self.put_stream(bucket, key, body, meta))
    }

    fn delete<'a>(&'a self, bucket: &'a str, keys: &'a [String]) -> BlobFuture<'a, ()> {
        let (this, bucket, keys) = (self.clone(), bucket.to_string(), keys.to_vec());
        Box::pin(async move {
            let dir = this.bucket_dir(&bucket);
            let removed = blocking(move || this.remove(&bucket, &keys)).await?;
            for m in removed {
                let _ = tokio::fs::remove_file(dir.join(&m.file)).await;
            }
            Ok(())
        })
    }

    fn list<'a>(&'a self, bucket: &'a str, q: &'a ListQuery) -> BlobFuture<'a, Listing> {
        let (this, bucket, q) = (self.clone(), bucket.to_string(), q.clone());
        Box::pin(blocking(move || this.list(&bucket, &q.prefix, q.limit, q.cursor.as_deref(), q.delimiter.as_deref())))
    }
}

/// An upload's temporary file, removed unless the upload completed: a handler call cancelled
/// mid-upload (its timeout, the client gone) must not leave it behind.
struct Unfinished(Option<PathBuf>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl LocalBlobs {
    async fn put_stream(
        &self,
        bucket: &str,
        key: &str,
        mut body: Body,
        meta: PutMeta,
    ) -> Result<ObjectMeta, BlobError> {
        let io = |e: std::io::Error| BlobError::Storage(format!("put {key:?}: {e}"));
        let dir = self.bucket_dir(bucket);
        tokio::fs::create_dir_all(&dir).await.map_err(io)?;
        let (file, tmp) = new_file_names(key);
        let tmp = dir.join(tmp);
        let mut out = tokio::fs::File::create(&tmp).await.map_err(io)?;
        let mut unfinished = Unfinished(Some(tmp.clone()));
        let mut hash = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut size = 0u64;
        let written: Result<(), String> = async {
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                if let Ok(data) = frame.into_data() {
                    hash.update(&data);
                    size += data.len() as u64;
                    out.write_all(&data).await.map_err(|e| e.to_string())?;
                }
            }
            out.sync_all().await.map_err(|e| e.to_string())
        }
        .await;
        if let Err(e) = written {
            return Err(BlobError::Storage(format!("put {key:?}: {e}")));
        }
        drop(out);
        tokio::fs::rename(&tmp, dir.join(&file)).await.map_err(io)?;
        unfinished.0 = None;
        let meta = ObjectMeta {
            key: key.to_string(),
            size,
            etag: etag(hash.finish().as_ref()),
            uploaded: now_millis(),
            http_metadata: meta.http_metadata,
            custom_metadata: meta.custom_metadata,
            file,
        };
        let (this, b, m) = (self.clone(), bucket.to_string(), meta.clone());
        if let Some(old) = blocking(move || this.commit(&b, &m)).await? {
            let _ = tokio::fs::remove_file(dir.join(old.file)).await;
        }
        Ok(meta)
    }

    async fn get_stream(&self, bucket: &str, key: &str, range: Range) -> Result<Option<(ObjectMeta, Body)>, BlobError> {
        // The metadata names the file of the current version; if a concurrent put replaced and
        // removed it between the two steps, read the metadata again.
        for _ in 0..3 {
            let (this, b, k) = (self.clone(), bucket.to_string(), key.to_string());
            let Some(meta) = blocking(move || this.head(&b, &k)).await? else { return Ok(None) };
            let path = self.bucket_dir(bucket).join(&meta.file);
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(BlobError::Storage(format!("get {key:?}: {e}"))),
            };
            let (offset, length) = clamp(range, meta.size);
            if offset > 0 {
                file.seek(SeekFrom::Start(offset)).await.map_err(|e| BlobError::Storage(e.to_string()))?;
            }
            let body = crate::body::boxed(FileBody { file, remaining: length, buf: BytesMut::new() });
            return Ok(Some((meta, body)));
        }
        Err(BlobError::Storage(format!("get {key:?}: the object kept changing; try again")))
    }
}

/// `range` within an object of `size` bytes: (offset, length), both clamped to the object.
pub fn clamp(range: Range, size: u64) -> (u64, u64) {
    match range {
        None => (0, size),
        Some((off, len)) => {
            let off = off.min(size);
            (off, len.unwrap_or(size - off).min(size - off))
        }
    }
}

/// Streams `remaining` bytes of a file in 64 KiB chunks.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: BytesMut,
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = self.remaining.min(64 * 1024) as usize;
        let this = &mut *self;
        this.buf.resize(want, 0);
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err("blob file ended early".into())));
                }
                this.remaining -= n as u64;
                let chunk = this.buf.split_to(n).freeze();
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }
}
