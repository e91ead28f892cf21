//! Hot reload (SPEC 7.1): watch each policy's folder and the folders of the modules it
//! requires; on a change, debounce, load and validate a new generation, and make it current.
//! A failed load keeps the previous generation (SPEC 8.8).
//!
//! Folders are watched rather than files because editors save in three ways: writing in
//! place, renaming a temp file over the original, or deleting and re-creating it. A watch
//! on the file itself is lost with the last two.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::state::{ClassId, Shared};

/// Quiet time after the last change before reloading: editors write a file in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Longest wait after the first change, however often policy files keep changing (SPEC 7.1
/// wants a save live within a second).
const DEBOUNCE_MAX: Duration = Duration::from_millis(500);

/// What the reload thread is asked to do.
pub enum ReloadRequest {
    /// Files changed (absolute paths).
    Changed(Vec<PathBuf>),
    /// Reload every class now (SIGHUP).
    All,
}

/// Starts the reload thread; returns the sender that SIGHUP uses.
pub fn start(shared: Arc<Shared>) -> std::io::Result<mpsc::Sender<ReloadRequest>> {
    let (tx, rx) = mpsc::channel::<ReloadRequest>();
    let events = tx.clone();
    let policies: Vec<PathBuf> = shared.classes().map(|(_, c)| absolute(&c.config.policy)).collect();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Opening or reading a file is not a change (and moat's own reads would otherwise
        // trigger reloads of their own). Only policies and Lua modules matter: a log file or
        // an agent's scratch files in the same folder must not keep the reload thread busy.
        let Some(event) = res.ok().filter(|e| !matches!(e.kind, notify::EventKind::Access(_))) else { return };
        if event.paths.iter().any(|p| p.extension().is_some_and(|e| e == "lua") || policies.contains(p) || is_swap(p)) {
            let _ = events.send(ReloadRequest::Changed(event.paths));
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("cannot watch policy files ({e}); reload with SIGHUP");
            None
        }
    };
    // Watch before returning, so that a save right after startup is not missed.
    let mut watched = BTreeSet::new();
    if let Some(w) = watcher.as_mut() {
        update_watches(w, &shared, &mut watched);
    }
    std::thread::Builder::new().name("moat-reload".into()).spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut all = matches!(first, ReloadRequest::All);
            let mut changed: Vec<PathBuf> = match first {
                ReloadRequest::Changed(p) => p,
                ReloadRequest::All => Vec::new(),
            };
            let give_up = std::time::Instant::now() + DEBOUNCE_MAX;
            loop {
                let quiet = DEBOUNCE.min(give_up.saturating_duration_since(std::time::Instant::now()));
                if quiet.is_zero() {
                    break;
                }
                match rx.recv_timeout(quiet) {
                    Ok(ReloadRequest::Changed(p)) => changed.extend(p),
                    Ok(ReloadRequest::All) => all = true,
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            for (id, _) in shared.classes() {
                if all || affects(&shared, id, &changed) {
                    reload_class(&shared, id);
                }
            }
            if let Some(w) = watcher.as_mut() {
                update_watches(w, &shared, &mut watched);
            }
        }
    })?;
    Ok(tx)
}

/// Loads class `id` again and logs the outcome.
pub fn reload_class(shared: &Shared, id: ClassId) {
    // Secrets are read "at start and at reload" (SPEC 6): a changed secret file takes effect
    // with the next generation.
    if let Err(e) = shared.bindings.refresh_secrets(&shared.config) {
        tracing::error!(target: "moat::reload", "secrets not re-read, keeping the previous values: {e}");
    }
    let class = shared.class(id);
    let label = crate::metrics::Metrics::class_label(&class.config.name);
    match class.reload(&shared.config.limits, shared.test_gate.get().map(|g| &**g)) {
        Ok(g) => {
            shared.metrics.generation.get_or_create(&label).set(g.number as i64);
            let what = if g.number == 1 { "policy loaded" } else { "policy reloaded" };
            tracing::info!(target: "moat::reload", class = %class.config.name, generation = g.number, "{what}: {}", class.config.policy.display());
        }
        Err(e) => {
            shared.metrics.reload_failures.get_or_create(&label).inc();
            let kept =
                class.current().map_or("none (requests get 503 until fixed)".to_string(), |g| g.number.to_string());
            tracing::error!(target: "moat::reload", class = %class.config.name, "policy load failed, serving generation {kept}: {e}");
        }
    }
}

/// The files whose change reloads class `id`: its policy and the modules it required.
fn files_of(shared: &Shared, id: ClassId) -> Vec<PathBuf> {
    let class = shared.class(id);
    let mut files = vec![absolute(&class.config.policy)];
    files.extend(class.config.tests.as_deref().map(absolute));
    if let Some(g) = class.current() {
        files.extend(g.modules.values().map(|(p, _)| absolute(p)));
    }
    files
}

fn affects(shared: &Shared, id: ClassId, changed: &[PathBuf]) -> bool {
    let files = files_of(shared, id);
    let policy_dir = files[0].parent().map(Path::to_path_buf).unwrap_or_default();
    let unloaded = shared.class(id).current().is_none();
    changed.iter().any(|c| {
        files.contains(c)
            // A class that never loaded may be missing a module it has not named yet.
            || (unloaded && c.parent() == Some(policy_dir.as_path()) && c.extension().is_some_and(|e| e == "lua"))
            // A folder whose files are symlinks into a swapped `..data` changed them all.
            || (is_swap(c) && files.iter().any(|f| f.parent() == c.parent()))
    })
}

/// Whether `path` is part of an atomic folder swap as Kubernetes mounts a ConfigMap: the
/// files are symlinks through `..data`, itself a symlink to a `..TIMESTAMP` folder that an
/// update replaces with one rename. Nothing named like the files changes, so these names
/// stand for all of them.
fn is_swap(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.as_encoded_bytes().starts_with(b".."))
}

fn update_watches(w: &mut notify::RecommendedWatcher, shared: &Shared, watched: &mut BTreeSet<PathBuf>) {
    for (id, _) in shared.classes() {
        for file in files_of(shared, id) {
            let Some(dir) = file.parent().map(Path::to_path_buf) else { continue };
            if !watched.contains(&dir) {
                match w.watch(&dir, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        watched.insert(dir);
                    }
                    Err(e) => tracing::warn!("cannot watch {}: {e}", dir.display()),
                }
            }
        }
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
