//! The Lua runtime: sandboxed states, script loading and validation, handler calls.

pub mod api;
pub mod lint;
pub mod load;
pub mod runtime;
pub mod sandbox;
pub mod scope;

pub use load::{Generation, LoadError, load_generation};
pub use runtime::{CallContext, ClassRuntime, HandlerFailure};
