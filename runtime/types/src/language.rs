//! What code runs in: the languages `execute_code` accepts and the
//! interpreters script tools run on.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A language `execute_code` can run: `python`, `javascript` or `bash`.
///
/// The variants carry no doc comments on purpose: schemars would turn them
/// into a `oneOf` of described constants instead of a plain `enum`, which is
/// harder for small models to follow.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Javascript,
    Bash,
}

impl Language {
    /// The name used in arguments and policies.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Javascript => "javascript",
            Language::Bash => "bash",
        }
    }
}

/// The language runtime a WASI script runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScriptRuntime {
    /// CPython 3.12 (`python.wasm`).
    Python,
    /// QuickJS-ng (`quickjs.wasm`).
    Javascript,
}
