//! Loading tool definitions from schema files.
//!
//! A folder of tools holds one tool per `*.json` or `*.toml` file, in either
//! of two shapes:
//!
//! * native: `{"name", "description", "parameters", "executor"}`;
//! * the OpenAI function format, as people already have it:
//!   `{"type": "function", "function": {"name", "description", "parameters"}}`,
//!   optionally with a top-level `"executor"`. Without one the tool is
//!   [`Executor::Unbound`] until the host binds a handler.
//!
//! Executors:
//!
//! ```json
//! {"type": "builtin"}
//! {"type": "wasi", "runtime": "python", "script": "convert.py"}
//! {"type": "wasi", "module": "tool.wasm", "args": ["--flag"]}
//! {"type": "command", "argv": ["python3", "./tool.py"]}
//! ```
//!
//! Relative script, module and `./program` paths are resolved against the
//! schema file's folder and must exist when the file loads. Unknown keys are
//! errors. A broken file yields a [`LoadDiagnostic`] with its path, line and
//! reason, and never stops the other files from loading.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::builtin::Builtin;
use super::spec::{CommandExecutor, Executor, ScriptRuntime, ToolOrigin, ToolSpec, WasiExecutor};
use super::strict_json::strip_position;

/// A problem with one schema file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadDiagnostic {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for LoadDiagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for LoadDiagnostic {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeFile {
    name: String,
    description: String,
    parameters: Value,
    executor: ExecutorFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiFile {
    #[serde(rename = "type")]
    kind: OpenAiKind,
    function: OpenAiFunction,
    #[serde(default)]
    executor: Option<ExecutorFile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum OpenAiKind {
    Function,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiFunction {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    strict: Option<bool>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ExecutorFile {
    Builtin,
    Wasi {
        #[serde(default)]
        runtime: Option<ScriptRuntime>,
        #[serde(default)]
        script: Option<String>,
        #[serde(default)]
        module: Option<String>,
        #[serde(default)]
        args: Vec<String>,
    },
    Command {
        argv: Vec<String>,
    },
}

/// The definition pulled out of a file, before executor paths are resolved.
struct RawTool {
    name: String,
    description: String,
    parameters: Value,
    executor: Option<ExecutorFile>,
}

/// Loads every schema file in `dir`, sorted by file name. Returns the tools
/// (with the line of their `parameters`, for later schema errors) and the
/// diagnostics for files that failed.
pub(crate) fn load_dir(dir: &Path) -> (Vec<(ToolSpec, Option<usize>)>, Vec<LoadDiagnostic>) {
    let mut tools = Vec::new();
    let mut diagnostics = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            diagnostics.push(LoadDiagnostic {
                path: dir.to_path_buf(),
                line: None,
                column: None,
                message: format!("cannot read tool folder: {err}"),
            });
            return (tools, diagnostics);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| is_schema_file(path))
        .collect();
    paths.sort();
    for path in paths {
        match load_file(&path) {
            Ok(tool) => tools.push(tool),
            Err(diagnostic) => diagnostics.push(diagnostic),
        }
    }
    (tools, diagnostics)
}

fn is_schema_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let extension = path.extension().and_then(|e| e.to_str());
    !hidden && path.is_file() && matches!(extension, Some("json") | Some("toml"))
}

/// Loads one schema file.
pub(crate) fn load_file(path: &Path) -> Result<(ToolSpec, Option<usize>), LoadDiagnostic> {
    let fail = |line: Option<usize>, column: Option<usize>, message: String| LoadDiagnostic {
        path: path.to_path_buf(),
        line,
        column,
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|err| fail(None, None, format!("cannot read: {err}")))?;
    load_text(&text, path)
}

/// [`load_file`] for a file's `text` (the path says its format, its
/// folder where executors are looked for, and where diagnostics point).
pub(crate) fn load_text(
    text: &str,
    path: &Path,
) -> Result<(ToolSpec, Option<usize>), LoadDiagnostic> {
    let fail = |line: Option<usize>, column: Option<usize>, message: String| LoadDiagnostic {
        path: path.to_path_buf(),
        line,
        column,
        message,
    };
    let is_toml = path.extension().and_then(|e| e.to_str()) == Some("toml");
    let raw = if is_toml {
        parse_toml(text).map_err(|(line, column, message)| fail(line, column, message))?
    } else {
        parse_json(text).map_err(|(line, column, message)| fail(line, column, message))?
    };
    let parameters_line = find_key_line(text, "parameters", is_toml);
    let folder = path.parent().unwrap_or(Path::new("."));
    let executor_line = find_key_line(text, "executor", is_toml);
    let executor = match raw.executor {
        None => Executor::Unbound,
        Some(file) => resolve_executor(file, &raw.name, folder)
            .map_err(|message| fail(executor_line, None, message))?,
    };
    Ok((
        ToolSpec {
            name: raw.name,
            description: raw.description,
            parameters: raw.parameters,
            executor,
            origin: ToolOrigin::File(path.to_path_buf()),
        },
        parameters_line,
    ))
}

type ParseFailure = (Option<usize>, Option<usize>, String);

fn parse_json(text: &str) -> Result<RawTool, ParseFailure> {
    let located = |err: serde_json::Error| {
        (
            Some(err.line()),
            Some(err.column()),
            strip_position(&err.to_string()),
        )
    };
    let value: Value = serde_json::from_str(text).map_err(located)?;
    if is_openai_shape(
        value.get("type").and_then(Value::as_str),
        value.get("function").is_some(),
    ) {
        let file: OpenAiFile = serde_json::from_str(text).map_err(located)?;
        Ok(from_openai(file))
    } else {
        let file: NativeFile = serde_json::from_str(text).map_err(located)?;
        Ok(from_native(file))
    }
}

fn parse_toml(text: &str) -> Result<RawTool, ParseFailure> {
    let located = |err: toml::de::Error| {
        let (line, column) = err
            .span()
            .map(|span| line_column(text, span.start))
            .map_or((None, None), |(l, c)| (Some(l), Some(c)));
        (line, column, err.message().to_string())
    };
    let table: toml::Table = toml::from_str(text).map_err(located)?;
    if is_openai_shape(
        table.get("type").and_then(toml::Value::as_str),
        table.contains_key("function"),
    ) {
        let file: OpenAiFile = toml::from_str(text).map_err(located)?;
        Ok(from_openai(file))
    } else {
        let file: NativeFile = toml::from_str(text).map_err(located)?;
        Ok(from_native(file))
    }
}

fn is_openai_shape(kind: Option<&str>, has_function: bool) -> bool {
    kind == Some("function") || has_function
}

fn from_native(file: NativeFile) -> RawTool {
    RawTool {
        name: file.name,
        description: file.description,
        parameters: file.parameters,
        executor: Some(file.executor),
    }
}

fn from_openai(file: OpenAiFile) -> RawTool {
    let OpenAiKind::Function = file.kind;
    RawTool {
        name: file.function.name,
        description: file.function.description,
        parameters: file
            .function
            .parameters
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
        executor: file.executor,
    }
}

fn resolve_executor(file: ExecutorFile, name: &str, folder: &Path) -> Result<Executor, String> {
    match file {
        ExecutorFile::Builtin => Builtin::from_name(name)
            .map(Executor::Builtin)
            .ok_or_else(|| {
                format!(
                    "executor is \"builtin\" but `{name}` is not a built-in tool; built-ins are: {}",
                    Builtin::names().join(", ")
                )
            }),
        ExecutorFile::Wasi {
            runtime,
            script,
            module,
            args,
        } => match (runtime, script, module) {
            (Some(runtime), Some(script), None) if args.is_empty() => Ok(Executor::Wasi(WasiExecutor::Script {
                runtime,
                script: existing_file(folder, &script, "script")?,
            })),
            (None, None, Some(module)) => Ok(Executor::Wasi(WasiExecutor::Module {
                module: existing_file(folder, &module, "module")?,
                args,
            })),
            _ => Err(
                "a wasi executor takes either {\"runtime\": \"python\"|\"javascript\", \"script\": PATH} or {\"module\": PATH, \"args\": [...]}".to_string(),
            ),
        },
        ExecutorFile::Command { argv } => {
            let Some(program) = argv.first() else {
                return Err("a command executor needs a non-empty \"argv\"".to_string());
            };
            let mut argv = argv.clone();
            if program.contains('/') && !Path::new(program).is_absolute() {
                argv[0] = existing_file(folder, program, "program")?.display().to_string();
            }
            Ok(Executor::Command(CommandExecutor { argv }))
        }
    }
}

fn existing_file(folder: &Path, relative: &str, what: &str) -> Result<PathBuf, String> {
    let path = folder.join(relative);
    if path.is_file() {
        std::fs::canonicalize(&path).map_err(|err| format!("{what} `{relative}`: {err}"))
    } else {
        Err(format!(
            "{what} `{relative}` not found (looked for {})",
            path.display()
        ))
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, column)
}

/// The line where `key` is defined, for errors found after parsing.
fn find_key_line(text: &str, key: &str, is_toml: bool) -> Option<usize> {
    let quoted = format!("\"{key}\"");
    text.lines()
        .position(|line| {
            let trimmed = line.trim_start();
            if is_toml {
                trimmed.starts_with(key)
                    && trimmed[key.len()..].trim_start().starts_with(['=', '.'])
                    || trimmed.starts_with(&format!("[{key}"))
            } else {
                trimmed.contains(&quoted)
            }
        })
        .map(|index| index + 1)
}
