//! moat's tables in a shared PostgreSQL database, and the channels it notifies on.

/// Notified with `NS HEXKEY` after every KV write (in the same statement, so a commit and its
/// notification are one).
pub const KV_CHANNEL: &str = "moat_kv";
/// Notified with the container id after every override change.
pub const OVERRIDES_CHANNEL: &str = "moat_overrides";

/// Every channel the listener subscribes to.
pub const CHANNELS: [&str; 2] = [KV_CHANNEL, OVERRIDES_CHANNEL];

/// Created at start if missing. The advisory lock keeps nodes that start together from racing
/// on `CREATE TABLE IF NOT EXISTS` (which is not safe against a concurrent twin).
///
/// `key` is `bytea`: PostgreSQL orders it byte by byte, the order Workers KV lists in.
pub const POSTGRES: &str = "
SELECT pg_advisory_lock(7262011);
CREATE TABLE IF NOT EXISTS moat_kv (
    ns text NOT NULL,
    key bytea NOT NULL,
    value bytea NOT NULL,
    expiration bigint,
    metadata text,
    PRIMARY KEY (ns, key)
);
CREATE INDEX IF NOT EXISTS moat_kv_expiring ON moat_kv (expiration) WHERE expiration IS NOT NULL;
CREATE TABLE IF NOT EXISTS moat_overrides (
    container text PRIMARY KEY,
    spec text NOT NULL
);
CREATE TABLE IF NOT EXISTS moat_containers (
    id text PRIMARY KEY,
    node text NOT NULL,
    running boolean NOT NULL,
    status text NOT NULL
);
SELECT pg_advisory_unlock(7262011);
";
