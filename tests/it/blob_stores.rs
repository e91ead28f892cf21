//! The bucket contract every backend passes (R2's: metadata, atomic replacement, ranges,
//! string prefixes, delimiter listing with a cursor, streaming both ways), run once per
//! backend: moat's blob folder, and a real S3-compatible server (moto).

use std::collections::HashMap;
use std::sync::Arc;

use http_body_util::BodyExt;
use moat::bench::{BlobBackend, BlobStore, ListQuery, LocalBlobs, PutMeta};

use crate::harness::*;

fn body(data: impl Into<bytes::Bytes>) -> moat::bench::Body {
    moat::bench::full_body(data)
}

async fn read(store: &BlobStore, key: &str, range: Option<(u64, Option<u64>)>) -> Option<Vec<u8>> {
    let (_, b) = store.of("B").get("B", key, range).await.unwrap()?;
    Some(b.collect().await.unwrap().to_bytes().to_vec())
}

async fn keys(store: &BlobStore, q: ListQuery) -> (Vec<String>, Vec<String>, Option<String>) {
    let l = store.of("B").list("B", &q).await.unwrap();
    (l.objects.into_iter().map(|o| o.key).collect(), l.delimited_prefixes, l.cursor)
}

fn q(prefix: &str, limit: usize, cursor: Option<String>, delimiter: Option<&str>) -> ListQuery {
    ListQuery { prefix: prefix.into(), limit, cursor, delimiter: delimiter.map(str::to_string) }
}

async fn bucket_contract(store: &BlobStore) {
    let b = store.of("B");
    assert!(b.head("B", "missing").await.unwrap().is_none());
    assert!(read(store, "missing", None).await.is_none());

    // Put with metadata; head and get give it back.
    let mut meta = PutMeta::default();
    meta.http_metadata.insert("contentType".into(), "text/plain".into());
    meta.custom_metadata.insert("owner".into(), "agent-1".into());
    let put = b.put("B", "dir/a.txt", body("hello world"), meta).await.unwrap();
    assert_eq!((put.key.as_str(), put.size), ("dir/a.txt", 11));
    let head = b.head("B", "dir/a.txt").await.unwrap().unwrap();
    assert_eq!(head.size, 11);
    assert!(!head.etag.is_empty() && head.etag == put.etag, "{} vs {}", head.etag, put.etag);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(head.uploaded + 60_000 > now && head.uploaded <= now + 60_000, "uploaded {}", head.uploaded);
    assert_eq!(head.http_metadata.get("contentType").and_then(|v| v.as_str()), Some("text/plain"));
    assert_eq!(head.custom_metadata.get("owner").and_then(|v| v.as_str()), Some("agent-1"));
    assert_eq!(read(store, "dir/a.txt", None).await.unwrap(), b"hello world");

    // Ranges, clamped to the object.
    assert_eq!(read(store, "dir/a.txt", Some((6, Some(3)))).await.unwrap(), b"wor");
    assert_eq!(read(store, "dir/a.txt", Some((6, None))).await.unwrap(), b"world");
    assert_eq!(read(store, "dir/a.txt", Some((6, Some(100)))).await.unwrap(), b"world");
    assert_eq!(read(store, "dir/a.txt", Some((50, Some(3)))).await.unwrap(), b"");

    // A put replaces the object, etag and all; the old data is gone.
    let again = b.put("B", "dir/a.txt", body("v2"), PutMeta::default()).await.unwrap();
    assert_ne!(again.etag, put.etag);
    assert_eq!(read(store, "dir/a.txt", None).await.unwrap(), b"v2");

    // An object larger than one upload part streams in and out whole.
    let big: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<bytes::Bytes> = big.chunks(64 << 10).map(bytes::Bytes::copy_from_slice).collect();
    let put = b.put("B", "big.bin", moat::bench::boxed_body(Chunks(chunks.into())), PutMeta::default()).await.unwrap();
    assert_eq!(put.size, 20 << 20);
    assert!(read(store, "big.bin", None).await.unwrap() == big, "the 20 MiB object came back different");
    assert_eq!(read(store, "big.bin", Some((10 << 20, Some(5)))).await.unwrap(), &big[10 << 20..(10 << 20) + 5]);

    // Listing: key order, string prefixes (not folders), delimiter roll-ups, pages.
    for k in ["a1", "a2", "ab/x", "ab/y", "ab/z/1", "b", "abc"] {
        b.put("B", k, body("."), PutMeta::default()).await.unwrap();
    }
    let (objects, prefixes, cursor) = keys(store, q("a", 1000, None, None)).await;
    assert_eq!(objects, ["a1", "a2", "ab/x", "ab/y", "ab/z/1", "abc"]);
    assert!(prefixes.is_empty() && cursor.is_none());
    let (objects, prefixes, _) = keys(store, q("", 1000, None, Some("/"))).await;
    assert_eq!(objects, ["a1", "a2", "abc", "b", "big.bin"]);
    assert_eq!(prefixes, ["ab/", "dir/"]);
    let (objects, prefixes, _) = keys(store, q("ab/", 1000, None, Some("/"))).await;
    assert_eq!((objects, prefixes), (vec!["ab/x".to_string(), "ab/y".to_string()], vec!["ab/z/".to_string()]));
    // Pages of two, prefixes counting as entries, the cursor skipping a rolled-up prefix.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let l = b.list("B", &q("", 2, cursor.clone(), Some("/"))).await.unwrap();
        assert!(l.objects.len() + l.delimited_prefixes.len() <= 2);
        seen.extend(l.objects.into_iter().map(|o| o.key));
        seen.extend(l.delimited_prefixes);
        if !l.truncated {
            break;
        }
        cursor = l.cursor;
    }
    seen.sort();
    assert_eq!(seen, ["a1", "a2", "ab/", "abc", "b", "big.bin", "dir/"]);

    // Keys with spaces, percent signs, plus signs and non-ASCII letters are kept as given.
    for k in ["odd/sp ace+plus%25 ü.txt", "odd/100%"] {
        b.put("B", k, body(k.to_string()), PutMeta::default()).await.unwrap();
        assert_eq!(read(store, k, None).await.unwrap(), k.as_bytes(), "{k}");
    }
    let (objects, _, _) = keys(store, q("odd/", 10, None, None)).await;
    assert_eq!(objects, ["odd/100%", "odd/sp ace+plus%25 ü.txt"]);
    b.delete("B", &["odd/100%".to_string(), "odd/sp ace+plus%25 ü.txt".to_string()]).await.unwrap();

    // Deletes: one, several, missing ones too.
    b.delete("B", &["a1".to_string()]).await.unwrap();
    b.delete("B", &["a2".to_string(), "nope".to_string(), "ab/x".to_string()]).await.unwrap();
    assert!(b.head("B", "a1").await.unwrap().is_none());
    let (objects, _, _) = keys(store, q("a", 1000, None, None)).await;
    assert_eq!(objects, ["ab/y", "ab/z/1", "abc"]);
}

/// A body that hands out its chunks one frame at a time (as a client's upload arrives).
struct Chunks(std::collections::VecDeque<bytes::Bytes>);

impl http_body::Body for Chunks {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(|c| Ok(http_body::Frame::data(c))))
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn bucket_contract_on_the_blob_folder() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("t.redb")).unwrap());
    let local: Arc<dyn BlobBackend> = Arc::new(LocalBlobs::new(db, dir.path()));
    rt().block_on(bucket_contract(&BlobStore::with_backends(local, HashMap::new())));
}

#[test]
fn bucket_contract_on_s3() {
    let Some(server) = S3Server::start() else { return };
    server.create_bucket("moat-conformance");
    let options = moat::bench::S3Options {
        bucket: "moat-conformance".into(),
        endpoint: Some(server.endpoint()),
        region: "us-east-1".into(),
        access_key: S3_ACCESS_KEY.into(),
        secret_key: S3_SECRET_KEY.into(),
    };
    let s3: Arc<dyn BlobBackend> = Arc::new(moat::bench::S3Blobs::open(&options).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(redb::Database::create(dir.path().join("t.redb")).unwrap());
    let local: Arc<dyn BlobBackend> = Arc::new(LocalBlobs::new(db, dir.path()));
    let store = BlobStore::with_backends(local, HashMap::from([("B".to_string(), s3)]));
    rt().block_on(bucket_contract(&store));
}
