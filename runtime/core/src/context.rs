//! What a tool may use while it runs ([`ToolContext`]), and which sandbox
//! runs code ([`SandboxKind`]). Its own module, below both the tools (whose
//! handlers take a context) and dispatch (which makes the calls), so that
//! neither imports the other.

use std::sync::Arc;

use crate::workspace::Workspace;
use stack_sandbox::process::ProcessSandbox;

/// Which sandbox runs code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxKind {
    /// wasmtime with WASI preview 1.
    Wasi,
    /// A subprocess under landlock, seccomp, namespaces and rlimits.
    Process,
}

impl SandboxKind {
    /// `wasi` or `process`.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxKind::Wasi => "wasi",
            SandboxKind::Process => "process",
        }
    }
}

/// What a tool may use while it runs.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The session workspace; file tools cannot reach past it.
    pub workspace: Arc<Workspace>,
    /// Cap on the result text (and on each of stdout and stderr).
    pub max_output_bytes: usize,
    /// The sandbox for code when the caller chose one (overrides the policy's backend).
    pub sandbox: Option<SandboxKind>,
    /// The process sandbox, when its helper was found.
    pub process: Option<Arc<ProcessSandbox>>,
    /// The WASI sandbox (engine and compiled interpreters, shared).
    #[cfg(feature = "wasi")]
    pub wasi: Option<stack_sandbox::wasi::WasiSandbox>,
    /// The session's live Python interpreter, for stateful WASI calls.
    #[cfg(feature = "wasi")]
    pub python_session: Arc<tokio::sync::Mutex<Option<stack_sandbox::wasi::PythonSession>>>,
}

impl ToolContext {
    /// A context over `workspace` with default limits and no sandbox preference.
    pub fn new(workspace: Workspace) -> Self {
        ToolContext {
            workspace: Arc::new(workspace),
            max_output_bytes: stack_sandbox::process::ResourceLimits::default().output_bytes,
            sandbox: None,
            process: ProcessSandbox::locate().ok().map(Arc::new),
            #[cfg(feature = "wasi")]
            wasi: stack_sandbox::wasi::WasiSandbox::shared()
                .map_err(|err| tracing::warn!(%err, "the WASI sandbox is unavailable"))
                .ok(),
            #[cfg(feature = "wasi")]
            python_session: Arc::default(),
        }
    }

    /// A context for another session: the same workspace, limits and
    /// sandboxes, and its own (not yet started) Python interpreter.
    pub fn for_new_session(&self) -> ToolContext {
        ToolContext {
            #[cfg(feature = "wasi")]
            python_session: Arc::default(),
            ..self.clone()
        }
    }
}
