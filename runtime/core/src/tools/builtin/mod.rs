//! The tools compiled into the runtime.
//!
//! Each tool's arguments are a Rust struct; its JSON Schema is generated
//! from that struct by `schemars`, so the schema the model sees, the one the
//! validator checks and the type the handler receives cannot drift apart.
//! The files `tools/<name>.json` are generated copies, kept equal by a test.

mod execute_code;
mod files;

use schemars::JsonSchema;
use serde_json::Value;

use super::spec::{Executor, ToolOrigin, ToolSpec};

pub use execute_code::{ExecuteCodeArgs, Language};
pub(crate) use files::run as run_file_tool;
pub use files::{ListDirArgs, ReadFileArgs, SearchFilesArgs, WriteFileArgs};

/// A built-in tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Builtin {
    /// `execute_code {language, code}`: runs code in a sandbox.
    ExecuteCode,
    /// `read_file {path, ...}`: reads a text file in the workspace.
    ReadFile,
    /// `write_file {path, content, ...}`: writes a file in the workspace.
    WriteFile,
    /// `list_dir {path}`: lists a workspace directory.
    ListDir,
    /// `search_files {pattern, ...}`: regex search over workspace files.
    SearchFiles,
}

impl Builtin {
    /// Every built-in, in listing order.
    pub const ALL: [Builtin; 5] = [
        Builtin::ExecuteCode,
        Builtin::ListDir,
        Builtin::ReadFile,
        Builtin::SearchFiles,
        Builtin::WriteFile,
    ];

    /// The tool name.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::ExecuteCode => "execute_code",
            Builtin::ReadFile => "read_file",
            Builtin::WriteFile => "write_file",
            Builtin::ListDir => "list_dir",
            Builtin::SearchFiles => "search_files",
        }
    }

    /// Every built-in name.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|b| b.name()).collect()
    }

    /// The built-in with this name.
    pub fn from_name(name: &str) -> Option<Builtin> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The description shown to the model.
    pub fn description(self) -> &'static str {
        match self {
            Builtin::ExecuteCode => "Run a snippet of code in a sandbox and return its stdout, stderr and exit code. The working directory is the session workspace; there is no network.",
            Builtin::ReadFile => "Read a text file from the workspace. Optionally return only some lines.",
            Builtin::WriteFile => "Write text to a file in the workspace, creating missing folders. Replaces the file unless append is true.",
            Builtin::ListDir => "List the files and folders in a workspace folder.",
            Builtin::SearchFiles => "Search the workspace files for lines matching a regular expression. Returns path:line: text for each match.",
        }
    }

    /// The JSON Schema of the arguments, generated from the argument struct.
    pub fn parameters(self) -> Value {
        match self {
            Builtin::ExecuteCode => schema_of::<ExecuteCodeArgs>(),
            Builtin::ReadFile => schema_of::<ReadFileArgs>(),
            Builtin::WriteFile => schema_of::<WriteFileArgs>(),
            Builtin::ListDir => schema_of::<ListDirArgs>(),
            Builtin::SearchFiles => schema_of::<SearchFilesArgs>(),
        }
    }

    /// The full tool definition.
    pub fn spec(self) -> ToolSpec {
        ToolSpec {
            name: self.name().to_string(),
            description: self.description().to_string(),
            parameters: self.parameters(),
            executor: Executor::Builtin(self),
            origin: ToolOrigin::Builtin,
        }
    }

    /// The schema file `tools/<name>.json` that documents this built-in.
    pub fn schema_file(self) -> Value {
        serde_json::json!({
            "name": self.name(),
            "description": self.description(),
            "parameters": self.parameters(),
            "executor": {"type": "builtin"},
        })
    }
}

/// The draft 2020-12 schema of `T`, shaped for tool calling: subschemas
/// inlined (no `$defs`), optional fields simply absent rather than nullable,
/// and no Rust-only annotations (the type name as `title`, the doc comment of
/// the argument struct, integer `format`s like `uint32`).
pub(crate) fn schema_of<T: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|settings| settings.inline_subschemas = true)
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    if let Some(object) = value.as_object_mut() {
        object.remove("title");
        object.remove("description");
    }
    simplify(&mut value);
    value
}

fn simplify(value: &mut Value) {
    match value {
        Value::Object(object) => {
            if let Some(Value::Array(types)) = object.get("type") {
                let non_null: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                if non_null.len() == 1 && types.len() == 2 {
                    object.insert("type".to_string(), non_null[0].clone());
                    if object.get("default") == Some(&Value::Null) {
                        object.remove("default");
                    }
                }
            }
            let rust_format = object
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| {
                    matches!(
                        f,
                        "int8"
                            | "int16"
                            | "int32"
                            | "int64"
                            | "uint"
                            | "uint8"
                            | "uint16"
                            | "uint32"
                            | "uint64"
                            | "float"
                            | "double"
                    )
                });
            if rust_format {
                object.remove("format");
            }
            object.values_mut().for_each(simplify);
        }
        Value::Array(items) => items.iter_mut().for_each(simplify),
        _ => {}
    }
}
