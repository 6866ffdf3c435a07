//! Tools: definitions, the registry, schema-file loading, validation and the
//! built-in tools.

pub mod builtin;
mod host;
pub(crate) mod loader;
mod registry;
mod spec;
pub(crate) mod strict_json;
mod validate;

pub use builtin::{Builtin, Language};
pub use host::HostHandler;
pub use loader::LoadDiagnostic;
pub use registry::{
    RegisterError, RegisteredTool, Registry, ValidatedCall, DEFAULT_MAX_ARGUMENT_BYTES,
};
pub use spec::{
    CommandExecutor, Executor, ExternalTool, ScriptRuntime, ToolOrigin, ToolSpec, WasiExecutor,
};
pub use validate::{ValidationError, Violation};
