//! Runtime glue for hyper on moat's worker threads.

/// Spawns hyper's background tasks (HTTP/2 streams and connections) on the worker's
/// `LocalSet`: bodies and handlers touch Lua state and are not `Send`.
#[derive(Clone, Copy)]
pub struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}
