//! The internals the benchmarks drive directly (`bench/lua_call.rs` builds a worker's Lua
//! state and calls its handler without a client). Not an API: hidden, and free to change.

pub use crate::body::empty as empty_body;
pub use crate::config::Limits;
pub use crate::policy::overrides::Setter;
pub use crate::policy::{CanonicalHost, HandlerChoice};
pub use crate::script::api::body::{BodySlot, SharedBody};
pub use crate::script::api::container::OverrideSink;
pub use crate::script::api::headers::LuaHeaders;
pub use crate::script::api::request::{LuaRequest, ParsedUrl};
pub use crate::script::{CallContext, ClassRuntime, load_generation};
pub use crate::upstream::resolve::Resolver;
pub use crate::upstream::tls::UpstreamTls;
pub use crate::upstream::{DialRules, Target, Upstream, to_upstream_request};

// The stores and their backends, which the conformance suite (tests/it/stores.rs) drives
// directly, once per backend.
pub use crate::bindings::blob::local::LocalBlobs;
#[cfg(feature = "s3")]
pub use crate::bindings::blob::s3::S3Blobs;
pub use crate::bindings::blob::{BlobBackend, BlobStore, ListQuery, PutMeta};
pub use crate::bindings::kv::postgres::PgKv;
pub use crate::bindings::kv::redb::RedbKv;
pub use crate::bindings::kv::{Entry as KvEntry, KvBackend, KvStore, Page as KvPage};
pub use crate::body::{Body, boxed as boxed_body, full as full_body};
pub use crate::config::S3Options;
pub use crate::db::containers::{PgRegistry, RedbRegistry, RegistryBackend};
pub use crate::db::overrides::{OverrideBackend, PgOverrides, RedbOverrides};
pub use crate::db::pg::Pg;
