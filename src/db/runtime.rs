//! The runtime a store owns for its connections.

use std::future::Future;

/// A multi-threaded runtime a store owns for its connections (PostgreSQL, S3), named after
/// it. Dropped without waiting: the last owner of a store may be a task of this very runtime
/// or of a worker's, where a plain `Runtime` drop would panic.
pub struct StoreRuntime(Option<tokio::runtime::Runtime>);

impl StoreRuntime {
    /// Two threads named `name`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name(name).enable_all().build()?;
        Ok(Self(Some(rt)))
    }

    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.as_ref().expect("a store runtime lives until dropped").spawn(f)
    }
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
