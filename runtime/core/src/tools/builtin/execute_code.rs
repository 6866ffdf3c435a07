//! `execute_code`: the model's way to run code. The arguments are defined
//! here; the sandboxes (process and WASI) run it.

use schemars::JsonSchema;
use serde::Deserialize;

pub use stack_types::Language;

/// Arguments of `execute_code`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteCodeArgs {
    // The fields' order is the schema's, and so the order in which a
    // constrained model writes them: the language first, so the code is
    // written once its language is named. With the code first, the
    // default model wrote words for code (`banana` as a bash command,
    // `current_dir` for the current directory); after the language, more
    // of it is code (`echo banana`, `print(`). The example programs in
    // the code's description are for small models too: with them, asked
    // for the current directory in bash, it wrote `echo $HOME`.
    /// The language of the code.
    pub language: Language,
    /// The source code to run: a whole program that prints what it finds, such as `print(6 * 7)` in python, `console.log("abc".length)` in javascript or `ls -l` in bash.
    #[schemars(length(min = 1))]
    pub code: String,
}
