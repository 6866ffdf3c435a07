//! Rust tools registered by the embedding host.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use crate::context::ToolContext;

/// A handler for a host-registered tool. It receives arguments that already
/// passed validation against the tool's schema.
pub trait HostHandler: Send + Sync {
    /// Runs the tool: `Ok(text)` is the result, `Err(text)` a failure the
    /// model sees.
    fn call(&self, arguments: &Value, ctx: &ToolContext) -> Result<String, String>;
}

struct Typed<A, F> {
    handler: F,
    _args: PhantomData<fn() -> A>,
}

impl<A, F> HostHandler for Typed<A, F>
where
    A: DeserializeOwned,
    F: Fn(A, &ToolContext) -> Result<String, String> + Send + Sync,
{
    fn call(&self, arguments: &Value, ctx: &ToolContext) -> Result<String, String> {
        let args = A::deserialize(arguments)
            .map_err(|err| format!("arguments did not fit the tool's Rust type: {err}"))?;
        (self.handler)(args, ctx)
    }
}

/// Wraps a typed closure as a [`HostHandler`].
pub(crate) fn typed_handler<A, F>(handler: F) -> Arc<dyn HostHandler>
where
    A: DeserializeOwned + 'static,
    F: Fn(A, &ToolContext) -> Result<String, String> + Send + Sync + 'static,
{
    Arc::new(Typed {
        handler,
        _args: PhantomData,
    })
}
