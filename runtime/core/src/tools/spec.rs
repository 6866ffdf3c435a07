//! What a tool is: its name, description, JSON Schema and executor.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;

use super::builtin::Builtin;
use super::host::HostHandler;

/// A tool as the registry holds it.
#[derive(Clone)]
pub struct ToolSpec {
    /// Unique name, `^[A-Za-z0-9_-]{1,64}$` as OpenAI requires.
    pub name: String,
    /// What the tool does, shown to the model.
    pub description: String,
    /// JSON Schema (draft 2020-12) of the arguments object.
    pub parameters: Value,
    /// What runs it.
    pub executor: Executor,
    /// Where it came from.
    pub origin: ToolOrigin,
}

impl std::fmt::Debug for ToolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolSpec")
            .field("name", &self.name)
            .field("executor", &self.executor.kind())
            .field("origin", &self.origin)
            .finish()
    }
}

impl ToolSpec {
    /// The tool in the OpenAI `tools` array format, as chat templates expect.
    pub fn to_openai(&self) -> Value {
        serde_json::json!({
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            }
        })
    }
}

/// Where a tool definition came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolOrigin {
    /// Compiled into the runtime.
    Builtin,
    /// Loaded from a schema file.
    File(PathBuf),
    /// Registered by the embedding host in Rust.
    Host,
    /// A tool of an MCP server the policy names.
    Mcp {
        /// The server's name in the policy.
        server: String,
    },
}

impl std::fmt::Display for ToolOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolOrigin::Builtin => f.write_str("built-in"),
            ToolOrigin::File(path) => write!(f, "{}", path.display()),
            ToolOrigin::Host => f.write_str("host"),
            ToolOrigin::Mcp { server } => write!(f, "MCP server `{server}`"),
        }
    }
}

/// What runs a tool once its call is validated.
#[derive(Clone)]
pub enum Executor {
    /// A handler compiled into the runtime.
    Builtin(Builtin),
    /// A Rust handler registered by the embedding host.
    Host(Arc<dyn HostHandler>),
    /// A script or raw module run in the WASI sandbox; arguments arrive as
    /// JSON on stdin, stdout is the result.
    Wasi(WasiExecutor),
    /// A command run in the process sandbox; arguments arrive as JSON on
    /// stdin, stdout is the result.
    Command(CommandExecutor),
    /// Run elsewhere, asynchronously: a tool of an MCP server.
    External(Arc<dyn ExternalTool>),
    /// Declared (for example, pasted in the OpenAI function format) but with
    /// nothing bound to run it. Calls validate, then fail with a clear error.
    Unbound,
}

/// A tool that something outside the registry runs (an MCP server's tool,
/// through `stack-mcp`). Dispatch reaches it only with a validated,
/// authorized call, like every other executor.
pub trait ExternalTool: Send + Sync {
    /// Runs one call with its validated arguments. Dropping the future
    /// abandons the call, and the implementation must then stop it (for
    /// MCP: `notifications/cancelled`). Never panics on what the call or
    /// the far side contains; every failure is an outcome.
    fn call<'a>(
        &'a self,
        arguments: &'a Value,
        ctx: &'a crate::context::ToolContext,
    ) -> futures::future::BoxFuture<'a, stack_types::outcome::ToolOutcome>;
}

impl Executor {
    /// A short name for listings: `builtin`, `host`, `wasi`, `command`,
    /// `mcp`, `unbound`.
    pub fn kind(&self) -> &'static str {
        match self {
            Executor::Builtin(_) => "builtin",
            Executor::Host(_) => "host",
            Executor::Wasi(_) => "wasi",
            Executor::Command(_) => "command",
            Executor::External(_) => "mcp",
            Executor::Unbound => "unbound",
        }
    }
}

pub use stack_types::ScriptRuntime;

/// A WASI executor: a script on an embedded interpreter, or a raw module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WasiExecutor {
    /// A script run by an embedded interpreter.
    Script {
        /// Which interpreter.
        runtime: ScriptRuntime,
        /// Absolute path of the script.
        script: PathBuf,
    },
    /// A WASI preview-1 command module.
    Module {
        /// Absolute path of the `.wasm` file.
        module: PathBuf,
        /// Fixed arguments after argv\[0\].
        args: Vec<String>,
    },
}

/// A command run in the process sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandExecutor {
    /// Program and fixed arguments. A program given as a relative path with a
    /// `/` is resolved against the schema file's folder; a bare name is looked
    /// up on the sandbox's `PATH`.
    pub argv: Vec<String>,
}
