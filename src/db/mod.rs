//! Where moat keeps state: its own database file, `data_dir/moat.redb` (overrides, KV
//! namespaces, ctx.storage, the container registry), and optionally a shared PostgreSQL
//! database ([`pg`]) that several moat nodes use together.

pub mod containers;
pub mod overrides;
pub mod pg;
pub mod runtime;
pub mod schema;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

/// Opens (or creates) the database, creating `data_dir` private to its owner (mode 0700).
pub fn open(data_dir: &Path) -> Result<Arc<redb::Database>, OpenError> {
    if !data_dir.exists() {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| OpenError::Other(format!("cannot create {}: {e}", data_dir.display())))?;
        let _ = std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700));
    }
    let path = data_dir.join("moat.redb");
    // Created private before redb opens it (redb would create it with the umask's mode).
    if !path.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path);
    }
    match redb::Database::create(&path) {
        Ok(db) => Ok(Arc::new(db)),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(OpenError::InUse),
        Err(e) => Err(OpenError::Other(format!("{}: {e}", path.display()))),
    }
}

/// A database failure as a user reads it. redb refuses every later write once a write failed
/// (a full disk, an I/O error), with a message that asks the program to reopen the database;
/// this says what the user can do.
pub fn describe(e: redb::Error) -> String {
    match e {
        redb::Error::PreviousIo => {
            "the database had a write error earlier (a full disk?) and takes no more writes until moat restarts: free space, then restart moat".into()
        }
        e => e.to_string(),
    }
}

/// Every row of a text table (key, value); none when the table was never written.
pub fn text_rows(
    db: &redb::Database,
    table: redb::TableDefinition<'_, &str, &str>,
) -> Result<Vec<(String, String)>, String> {
    use redb::{ReadableDatabase, ReadableTable};
    let read = db.begin_read().map_err(|e| e.to_string())?;
    let table = match read.open_table(table) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let mut out = Vec::new();
    for row in table.iter().map_err(|e| e.to_string())? {
        let (k, v) = row.map_err(|e| e.to_string())?;
        out.push((k.value().to_string(), v.value().to_string()));
    }
    Ok(out)
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A running moat holds it: go through its admin API.
    #[error("the database is in use by a running moat")]
    InUse,
    #[error("{0}")]
    Other(String),
}
