//! The storage contract every backend passes (KV as Workers KV; override specs
//! compare-and-swap), run once per backend: moat's redb file, and a real PostgreSQL server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat::bench::{KvBackend, KvEntry, KvStore, OverrideBackend, Pg, PgKv, PgOverrides, RedbKv, RedbOverrides};

use crate::harness::shared_pg;

fn entry(v: &str) -> KvEntry {
    KvEntry { value: v.as_bytes().to_vec(), expiration: None, metadata: None }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn names(page: &moat::bench::KvPage) -> Vec<Vec<u8>> {
    page.keys.iter().map(|k| k.name.clone()).collect()
}

/// Everything SPEC 6 promises of a KV namespace, against `kv` (empty at the start).
fn kv_contract(kv: &KvStore) {
    // get, put, delete; metadata and expiration kept; namespaces apart.
    assert_eq!(kv.get("kv/A", b"k").unwrap(), None);
    let e = KvEntry {
        metadata: Some(serde_json::json!({"a": 1, "b": [true, null]})),
        expiration: Some(now() + 3600),
        ..entry("v")
    };
    kv.put("kv/A", b"k", &e).unwrap();
    assert_eq!(kv.get("kv/A", b"k").unwrap(), Some(e.clone()));
    assert_eq!(kv.get("kv/B", b"k").unwrap(), None, "namespaces are separate");
    assert_eq!(kv.get("storage/c1", b"k").unwrap(), None, "ctx.storage is separate");
    kv.put("kv/A", b"k", &entry("v2")).unwrap();
    assert_eq!(kv.get("kv/A", b"k").unwrap(), Some(entry("v2")), "a put replaces value, metadata and expiration");
    kv.delete("kv/A", b"k").unwrap();
    assert_eq!(kv.get("kv/A", b"k").unwrap(), None);
    kv.delete("kv/A", b"never").unwrap();

    // Expired entries are gone for get and list, and the sweep removes them.
    kv.put("kv/A", b"old", &KvEntry { expiration: Some(now() - 1), ..entry("x") }).unwrap();
    assert_eq!(kv.get("kv/A", b"old").unwrap(), None);
    assert!(kv.list("kv/A", b"", 1000, None).unwrap().keys.is_empty());
    assert_eq!(kv.purge_expired().unwrap(), 1);

    // Limits: keys 1..=512 bytes, values up to 25 MiB, metadata up to 1024 bytes of JSON.
    assert!(kv.put("kv/A", b"", &entry("v")).is_err());
    assert!(kv.put("kv/A", &[b'x'; 513], &entry("v")).is_err());
    kv.put("kv/A", &[b'x'; 512], &entry("v")).unwrap();
    kv.delete("kv/A", &[b'x'; 512]).unwrap();
    let big = KvEntry { value: vec![7u8; 25 << 20], expiration: None, metadata: None };
    kv.put("kv/big", b"max", &big).unwrap();
    assert_eq!(kv.get("kv/big", b"max").unwrap().unwrap().value.len(), 25 << 20);
    assert!(kv.put("kv/big", b"over", &KvEntry { value: vec![0u8; (25 << 20) + 1], ..entry("") }).is_err());
    kv.delete("kv/big", b"max").unwrap();
    let meta = serde_json::Value::String("m".repeat(1100));
    assert!(kv.put("kv/A", b"m", &KvEntry { metadata: Some(meta), ..entry("v") }).is_err());

    // Binary keys and values, listed in byte order (0x00 first, 0xff after every letter).
    for k in [&b"a1"[..], b"a2", b"a3", b"a4", b"a5", b"b1", b"a\x00", b"a\xff", b"A"] {
        kv.put("kv/L", k, &KvEntry { value: vec![0, 159, 255], ..entry("") }).unwrap();
    }
    assert_eq!(kv.get("kv/L", b"a\xff").unwrap().unwrap().value, vec![0, 159, 255]);
    let all = kv.list("kv/L", b"", 1000, None).unwrap();
    assert!(all.complete && all.cursor.is_none());
    let expect: Vec<Vec<u8>> =
        [&b"A"[..], b"a\x00", b"a1", b"a2", b"a3", b"a4", b"a5", b"a\xff", b"b1"].iter().map(|k| k.to_vec()).collect();
    assert_eq!(names(&all), expect);

    // Pages by prefix with a cursor.
    let p1 = kv.list("kv/L", b"a", 3, None).unwrap();
    assert_eq!(names(&p1), [b"a\x00".to_vec(), b"a1".to_vec(), b"a2".to_vec()]);
    assert!(!p1.complete);
    let p2 = kv.list("kv/L", b"a", 3, p1.cursor.as_deref()).unwrap();
    assert_eq!(names(&p2), [b"a3".to_vec(), b"a4".to_vec(), b"a5".to_vec()]);
    let p3 = kv.list("kv/L", b"a", 3, p2.cursor.as_deref()).unwrap();
    assert_eq!(names(&p3), [b"a\xff".to_vec()]);
    assert!(p3.complete && p3.cursor.is_none());
    assert!(kv.list("kv/L", b"a", 3, Some("zz")).is_err(), "a cursor moat did not give is refused");
    assert!(kv.list("kv/L", b"zz", 10, None).unwrap().keys.is_empty());

    // Listing carries expiration and metadata.
    kv.put(
        "kv/M",
        b"x",
        &KvEntry { expiration: Some(now() + 60), metadata: Some(serde_json::json!({"n": 1})), ..entry("v") },
    )
    .unwrap();
    let listed = &kv.list("kv/M", b"", 10, None).unwrap().keys[0];
    assert_eq!(listed.metadata, Some(serde_json::json!({"n": 1})));
    assert!(listed.expiration.is_some_and(|x| x + 2 >= now() + 60 && x <= now() + 60));

    // A prefix with LIKE's and regex's special characters means only its bytes.
    kv.put("kv/P", b"a%b", &entry("1")).unwrap();
    kv.put("kv/P", b"a_c", &entry("1")).unwrap();
    kv.put("kv/P", b"axb", &entry("1")).unwrap();
    assert_eq!(names(&kv.list("kv/P", b"a%", 10, None).unwrap()), [b"a%b".to_vec()]);
    assert_eq!(names(&kv.list("kv/P", b"a_", 10, None).unwrap()), [b"a_c".to_vec()]);
}

/// Every override-store promise: load, compare-and-swap, removal.
fn overrides_contract(o: &dyn OverrideBackend) {
    assert!(o.load_all().unwrap().is_empty());
    assert!(o.swap("c1", None, Some("{\"a\":1}")).unwrap());
    assert!(!o.swap("c1", None, Some("{\"a\":2}")).unwrap(), "a create over an existing spec fails");
    assert!(!o.swap("c1", Some("{\"a\":9}"), Some("{\"a\":2}")).unwrap(), "a stale swap fails");
    assert_eq!(o.load("c1").unwrap().as_deref(), Some("{\"a\":1}"));
    assert!(o.swap("c1", Some("{\"a\":1}"), Some("{\"a\":2}")).unwrap());
    assert!(o.swap("c2", None, Some("{}")).unwrap());
    let mut all = o.load_all().unwrap();
    all.sort();
    assert_eq!(all, [("c1".to_string(), "{\"a\":2}".to_string()), ("c2".to_string(), "{}".to_string())]);
    assert!(!o.swap("c1", Some("{\"a\":1}"), None).unwrap(), "a stale removal fails");
    assert!(o.swap("c1", Some("{\"a\":2}"), None).unwrap());
    assert_eq!(o.load("c1").unwrap(), None);
    assert!(o.swap("c1", None, None).unwrap(), "removing what is absent holds");
}

fn redb_file() -> (tempfile::TempDir, Arc<redb::Database>) {
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
    (dir, Arc::new(db))
}

fn kv_on(backend: Arc<dyn KvBackend>) -> Arc<KvStore> {
    let kv = Arc::new(KvStore::with_backends(backend.clone(), HashMap::new(), backend));
    kv.watch();
    kv
}

#[test]
fn kv_contract_on_redb() {
    let (_dir, db) = redb_file();
    kv_contract(&kv_on(Arc::new(RedbKv { db })));
}

#[test]
fn kv_contract_on_postgres() {
    let Some(server) = shared_pg() else { return };
    let pg = Pg::open(&server.fresh_database()).unwrap();
    kv_contract(&kv_on(Arc::new(PgKv { pg })));
}

#[test]
fn override_contract_on_redb() {
    let (_dir, db) = redb_file();
    overrides_contract(&RedbOverrides { db });
}

#[test]
fn override_contract_on_postgres() {
    let Some(server) = shared_pg() else { return };
    overrides_contract(&PgOverrides { pg: Pg::open(&server.fresh_database()).unwrap() });
}

/// Two stores on one database, as two nodes have: what one writes, the other reads at once
/// (the reader's cache drops the key when the writer's notification arrives).
#[test]
fn a_cached_key_follows_what_another_node_writes() {
    let Some(server) = shared_pg() else { return };
    let url = server.fresh_database();
    let a = kv_on(Arc::new(PgKv { pg: Pg::open(&url).unwrap() }));
    let b = kv_on(Arc::new(PgKv { pg: Pg::open(&url).unwrap() }));
    a.put("kv/KV", b"k", &entry("one")).unwrap();
    // B's cache is on once its listener is; read until B serves "one" from its cache.
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.cached("kv/KV", b"k").is_none() {
        assert_eq!(b.get("kv/KV", b"k").unwrap(), Some(entry("one")));
        assert!(Instant::now() < deadline, "B never cached the key");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, value) in ["two", "three", "four"].iter().enumerate() {
        a.put("kv/KV", b"k", &entry(value)).unwrap();
        let t = Instant::now();
        while b.get("kv/KV", b"k").unwrap() != Some(entry(value)) {
            assert!(t.elapsed() < Duration::from_secs(1), "write {i} not seen by B within 1 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    a.delete("kv/KV", b"k").unwrap();
    let t = Instant::now();
    while b.get("kv/KV", b"k").unwrap().is_some() {
        assert!(t.elapsed() < Duration::from_secs(1), "delete not seen by B within 1 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What a node's container registry keeps (its own records), and, shared, what it lets
/// other nodes see and take.
fn registry_contract(a: &dyn moat::bench::RegistryBackend, b: Option<&dyn moat::bench::RegistryBackend>) {
    assert!(a.mine().unwrap().is_empty());
    assert_eq!(a.claim("c1").unwrap(), Ok(()));
    a.save("c1", r#"{"id":"c1","v":1}"#, true).unwrap();
    a.save("c1", r#"{"id":"c1","v":2}"#, true).unwrap();
    assert_eq!(a.mine().unwrap(), [r#"{"id":"c1","v":2}"#]);
    assert_eq!(a.claim("c1").unwrap(), Ok(()), "a node may claim its own id again");
    let Some(b) = b else { return };
    assert_eq!(b.others().unwrap(), [("node-a".to_string(), r#"{"id":"c1","v":2}"#.to_string())]);
    assert_eq!(b.claim("c1").unwrap(), Err("node-a".to_string()), "an id running elsewhere is refused");
    b.save("c1", r#"{"id":"c1","v":"b"}"#, false).unwrap();
    assert_eq!(a.mine().unwrap(), [r#"{"id":"c1","v":2}"#], "B cannot overwrite A's record");
    a.save("c1", r#"{"id":"c1","v":3}"#, false).unwrap();
    assert_eq!(b.claim("c1").unwrap(), Ok(()), "an id that no longer runs may move");
    assert!(a.mine().unwrap().is_empty());
    b.release("c1").unwrap();
    assert_eq!(a.claim("c1").unwrap(), Ok(()), "a released id may move back");
    // A claim whose start failed leaves no record: B never saved one, A's old one is gone.
    assert_eq!(b.claim("c2").unwrap(), Ok(()));
    b.release("c2").unwrap();
    assert!(b.mine().unwrap().is_empty(), "{:?}", b.mine());
}

#[test]
fn registry_contract_on_redb() {
    let (_dir, db) = redb_file();
    registry_contract(&moat::bench::RedbRegistry { db }, None);
}

#[test]
fn registry_contract_on_postgres() {
    let Some(server) = shared_pg() else { return };
    let url = server.fresh_database();
    let a = moat::bench::PgRegistry { pg: Pg::open(&url).unwrap(), node: "node-a".into() };
    let b = moat::bench::PgRegistry { pg: Pg::open(&url).unwrap(), node: "node-b".into() };
    registry_contract(&a, Some(&b));
}
