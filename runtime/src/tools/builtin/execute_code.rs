//! `execute_code`: the model's way to run code. The arguments are defined
//! here; the sandboxes (process and WASI) run it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Arguments of `execute_code`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteCodeArgs {
    /// The source code to run.
    #[schemars(length(min = 1))]
    pub code: String,
    /// The language of the code.
    pub language: Language,
}

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
