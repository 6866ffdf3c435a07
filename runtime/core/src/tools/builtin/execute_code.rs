//! `execute_code`: the model's way to run code. The arguments are defined
//! here; the sandboxes (process and WASI) run it.

use schemars::JsonSchema;
use serde::Deserialize;

pub use stack_types::Language;

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
