//! Buckets on an S3-compatible service (`backend = "s3"`: AWS S3, Cloudflare R2, MinIO, …)
//! through `object_store`, so that every moat node sees the same objects.
//!
//! Work runs on a runtime of this backend's own (the service's connections live there); a
//! body streams in both directions: a get hands back the service's response stream, and a put
//! sends an object that fits in one part as one request, else a multipart upload with at most
//! [`PARTS_IN_FLIGHT`] parts of [`PART`] bytes buffered at a time.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use http_body::Frame;
use http_body_util::BodyExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};

use super::{BlobBackend, BlobError, BlobFuture, ListQuery, Listing, ObjectMeta, PutMeta, Range};
use crate::body::{Body, BoxError};
use crate::config::S3Options;

/// Size of one part of a multipart upload (S3 needs at least 5 MiB but for the last).
const PART: usize = 8 << 20;
/// Parts of one upload in flight at once: what a put buffers is at most this many parts.
const PARTS_IN_FLIGHT: usize = 2;

/// One S3-compatible bucket (a moat bucket binding maps to exactly one).
pub struct S3Blobs {
    store: Arc<AmazonS3>,
    /// `s3 BUCKET at ENDPOINT`: how errors name it.
    shown: String,
    rt: crate::db::runtime::StoreRuntime,
}

/// R2's `httpMetadata` names and the attribute each is stored as.
const HTTP_METADATA: [(&str, Attribute); 5] = [
    ("contentType", Attribute::ContentType),
    ("contentLanguage", Attribute::ContentLanguage),
    ("contentDisposition", Attribute::ContentDisposition),
    ("contentEncoding", Attribute::ContentEncoding),
    ("cacheControl", Attribute::CacheControl),
];

impl S3Blobs {
    pub fn open(o: &S3Options) -> Result<Self, String> {
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&o.bucket)
            .with_region(&o.region)
            .with_access_key_id(&o.access_key)
            .with_secret_access_key(&o.secret_key)
            .with_client_options(
                ClientOptions::default()
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(60)),
            )
            // A service that is down fails a call within seconds, never minutes.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(5),
            });
        if let Some(endpoint) = &o.endpoint {
            b = b.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
        }
        let store = b.build().map_err(|e| format!("cannot use bucket {:?}: {e}", o.bucket))?;
        let rt = crate::db::runtime::StoreRuntime::new("moat-blob")
            .map_err(|e| format!("cannot start the blob runtime: {e}"))?;
        let at = o.endpoint.as_deref().unwrap_or("AWS");
        Ok(Self { store: Arc::new(store), shown: format!("s3 bucket {} at {at}", o.bucket), rt })
    }

    /// Runs `work` on this backend's runtime.
    fn run<'a, T: Send + 'static>(
        &'a self,
        work: impl std::future::Future<Output = Result<T, BlobError>> + Send + 'static,
    ) -> BlobFuture<'a, T> {
        let task = self.rt.spawn(work);
        Box::pin(async move { task.await.map_err(|e| BlobError::Storage(format!("blob task failed: {e}")))? })
    }
}

/// object_store's error as one line: its chain of causes, joined.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out.replace('\n', " ")
}

/// `key` with `options`, or `None` when the service has no such object.
async fn get_object(
    store: &AmazonS3,
    key: &str,
    options: GetOptions,
    shown: &str,
) -> Result<Option<object_store::GetResult>, BlobError> {
    match store.get_opts(&path(key)?, options).await {
        Ok(r) => Ok(Some(r)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(BlobError::Storage(format!("{shown}: {}", one_line(&e)))),
    }
}

fn path(key: &str) -> Result<Path, BlobError> {
    Path::parse(key).map_err(|e| BlobError::Invalid(format!("invalid object key {key:?} for an S3 bucket: {e}")))
}

fn attributes(meta: &PutMeta) -> Attributes {
    let mut out = Attributes::new();
    for (name, attr) in HTTP_METADATA {
        if let Some(v) = meta.http_metadata.get(name).and_then(|v| v.as_str()) {
            out.insert(attr, AttributeValue::from(v.to_string()));
        }
    }
    for (k, v) in &meta.custom_metadata {
        let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        out.insert(Attribute::Metadata(k.clone().into()), AttributeValue::from(v));
    }
    out
}

fn object(key: &str, m: &object_store::ObjectMeta, attrs: Option<&Attributes>, meta: Option<&PutMeta>) -> ObjectMeta {
    let mut out = ObjectMeta {
        key: key.to_string(),
        size: m.size,
        etag: m.e_tag.as_deref().unwrap_or("").trim_matches('"').to_string(),
        uploaded: m.last_modified.timestamp_millis().max(0) as u64,
        http_metadata: Default::default(),
        custom_metadata: Default::default(),
        file: String::new(),
    };
    if let Some(attrs) = attrs {
        for (attr, value) in attrs {
            let value = serde_json::Value::String(value.as_ref().to_string());
            match attr {
                Attribute::Metadata(k) => drop(out.custom_metadata.insert(k.to_string(), value)),
                other => {
                    if let Some((name, _)) = HTTP_METADATA.iter().find(|(_, a)| a == other) {
                        out.http_metadata.insert(name.to_string(), value);
                    }
                }
            }
        }
    }
    if let Some(meta) = meta {
        out.http_metadata = meta.http_metadata.clone();
        out.custom_metadata = meta.custom_metadata.clone();
    }
    out
}

impl BlobBackend for S3Blobs {
    fn head<'a>(&'a self, _bucket: &'a str, key: &'a str) -> BlobFuture<'a, Option<ObjectMeta>> {
        let (store, key) = (self.store.clone(), key.to_string());
        let shown = self.shown.clone();
        self.run(async move {
            let options = GetOptions { head: true, ..Default::default() };
            let found = get_object(&store, &key, options, &shown).await?;
            Ok(found.map(|r| object(&key, &r.meta, Some(&r.attributes), None)))
        })
    }

    fn get<'a>(&'a self, bucket: &'a str, key: &'a str, range: Range) -> BlobFuture<'a, Option<(ObjectMeta, Body)>> {
        let head = range.map(|_| self.head(bucket, key));
        let (store, key) = (self.store.clone(), key.to_string());
        let shown = self.shown.clone();
        Box::pin(async move {
            // A range is clamped to the object first, as R2 and the local backend do.
            let range = match head {
                None => None,
                Some(head) => {
                    let Some(meta) = head.await? else { return Ok(None) };
                    let (offset, length) = super::local::clamp(range, meta.size);
                    if length == 0 {
                        return Ok(Some((meta, crate::body::empty())));
                    }
                    Some(GetRange::Bounded(offset..offset + length))
                }
            };
            self.run(async move {
                let found = get_object(&store, &key, GetOptions { range, ..Default::default() }, &shown).await?;
                Ok(found.map(|r| {
                    let meta = object(&key, &r.meta, Some(&r.attributes), None);
                    (meta, crate::body::boxed(StreamBody(r.into_stream())))
                }))
            })
            .await
        })
    }

    fn put<'a>(&'a self, _bucket: &'a str, key: &'a str, body: Body, meta: PutMeta) -> BlobFuture<'a, ObjectMeta> {
        let (store, key) = (self.store.clone(), key.to_string());
        let shown = self.shown.clone();
        self.run(async move {
            let location = path(&key)?;
            let failed = |e: object_store::Error| BlobError::Storage(format!("{shown}: {}", one_line(&e)));
            upload(&store, &location, body, attributes(&meta)).await.map_err(|e| match e {
                Upload::Store(e) => failed(e),
                Upload::Body(e) => BlobError::Storage(format!("put {key:?}: {e}")),
            })?;
            let head = store.head(&location).await.map_err(failed)?;
            Ok(object(&key, &head, None, Some(&meta)))
        })
    }

    fn delete<'a>(&'a self, _bucket: &'a str, keys: &'a [String]) -> BlobFuture<'a, ()> {
        let (store, keys) = (self.store.clone(), keys.to_vec());
        let shown = self.shown.clone();
        self.run(async move {
            for key in keys {
                match store.delete(&path(&key)?).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(BlobError::Storage(format!("{shown}: {}", one_line(&e)))),
                }
            }
            Ok(())
        })
    }

    fn list<'a>(&'a self, _bucket: &'a str, q: &'a ListQuery) -> BlobFuture<'a, Listing> {
        let (store, q) = (self.store.clone(), q.clone());
        let shown = self.shown.clone();
        self.run(
            async move { list(&store, &q).await.map_err(|e| BlobError::Storage(format!("{shown}: {}", one_line(&e)))) },
        )
    }
}

enum Upload {
    Store(object_store::Error),
    Body(BoxError),
}

/// Sends `body` to `location`: one request when it fits in one part, else a multipart
/// upload (aborted if the body fails, so no part is left behind).
async fn upload(store: &AmazonS3, location: &Path, mut body: Body, attributes: Attributes) -> Result<(), Upload> {
    let mut first: Vec<Bytes> = Vec::new();
    let mut buffered = 0;
    while buffered < PART {
        match body.frame().await {
            None => {
                let payload = PutPayload::from_iter(first);
                let options = PutOptions { attributes, ..Default::default() };
                return store.put_opts(location, payload, options).await.map(drop).map_err(Upload::Store);
            }
            Some(Err(e)) => return Err(Upload::Body(e)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buffered += data.len();
                    first.push(data);
                }
            }
        }
    }
    let options = PutMultipartOptions { attributes, ..Default::default() };
    let upload = store.put_multipart_opts(location, options).await.map_err(Upload::Store)?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
    for data in first {
        writer.put(data);
    }
    loop {
        if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
            let _ = writer.abort().await;
            return Err(Upload::Store(e));
        }
        match body.frame().await {
            None => return writer.finish().await.map(drop).map_err(Upload::Store),
            Some(Err(e)) => {
                let _ = writer.abort().await;
                return Err(Upload::Body(e));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    writer.put(data);
                }
            }
        }
    }
}

/// R2's listing on S3's: keys in order after the cursor that start with the prefix (a string
/// prefix, not a folder), rolled up at the delimiter, at most `limit` entries.
async fn list(store: &AmazonS3, q: &ListQuery) -> Result<Listing, object_store::Error> {
    // object_store lists under a folder: the prefix up to its last '/'.
    let folder = q.prefix.rfind('/').map(|i| &q.prefix[..i]).filter(|f| !f.is_empty());
    let folder = folder.map(Path::parse).transpose()?;
    let start = match &q.cursor {
        Some(c) if c.as_str() > q.prefix.as_str() => c.clone(),
        // Start just before the prefix: every key that has it sorts after.
        _ => q.prefix.clone(),
    };
    let mut items = if start.is_empty() {
        store.list(folder.as_ref())
    } else {
        store.list_with_offset(folder.as_ref(), &Path::from_iter(start.split('/')))
    };
    let mut out = Listing::default();
    let mut count = 0;
    let delimiter = q.delimiter.as_deref().filter(|d| !d.is_empty());
    while let Some(item) = items.next().await {
        let item = item?;
        let key = item.location.as_ref();
        if Some(key) == q.cursor.as_deref() || key < start.as_str() {
            continue;
        }
        if !key.starts_with(&q.prefix) {
            if key > q.prefix.as_str() && !q.prefix.is_empty() {
                break;
            }
            continue;
        }
        if count == q.limit {
            out.truncated = true;
            break;
        }
        let rest = &key[q.prefix.len()..];
        match delimiter.and_then(|d| rest.find(d).map(|i| (i, d))) {
            Some((i, d)) => {
                let p = format!("{}{}{d}", q.prefix, &rest[..i]);
                if out.delimited_prefixes.last() != Some(&p) {
                    out.delimited_prefixes.push(p.clone());
                    count += 1;
                }
                out.cursor = Some(format!("{p}\u{10FFFF}"));
            }
            None => {
                out.objects.push(object(key, &item, None, None));
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

/// object_store's byte stream as an HTTP body.
struct StreamBody(BoxStream<'static, object_store::Result<Bytes>>);

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.0.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
