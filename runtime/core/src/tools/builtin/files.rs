//! The workspace file tools: `read_file`, `write_file`, `list_dir`,
//! `search_files`. They run in-process and reach the disk only through
//! [`crate::workspace::Workspace`], whose threat model covers them.

use std::io::{BufRead, BufReader, Read};

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use super::Builtin;
use crate::context::ToolContext;
use stack_types::outcome::ToolOutcome;
use stack_types::text::one_line;

/// Arguments of `read_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// Path of the file, relative to the workspace root.
    #[schemars(length(min = 1))]
    pub path: String,
    /// First line to return, counting from 1. Defaults to 1.
    #[schemars(range(min = 1))]
    pub start_line: Option<u64>,
    /// Number of lines to return. Defaults to the whole file.
    #[schemars(range(min = 1))]
    pub line_count: Option<u64>,
}

/// Arguments of `write_file`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// Path of the file, relative to the workspace root.
    #[schemars(length(min = 1))]
    pub path: String,
    /// The text to write.
    pub content: String,
    /// Append to the file instead of replacing it.
    pub append: Option<bool>,
}

/// Arguments of `list_dir`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListDirArgs {
    /// Folder to list, relative to the workspace root. Defaults to the root.
    pub path: Option<String>,
}

/// Arguments of `search_files`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchFilesArgs {
    /// Regular expression (Rust regex syntax) to look for in each line.
    #[schemars(length(min = 1))]
    pub pattern: String,
    /// Folder to search, relative to the workspace root. Defaults to the root.
    pub path: Option<String>,
    /// Most matches to return. Defaults to 100.
    #[schemars(range(min = 1, max = 10000))]
    pub max_results: Option<u32>,
}

/// Files larger than this are skipped by `search_files`.
const SEARCH_MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;
/// What one search may read in all, and for how long it may run: a
/// workspace that sandboxed code filled (red-team M3) costs the runtime a
/// bounded amount of work, and the result says where it stopped.
const SEARCH_MAX_TOTAL_BYTES: u64 = 256 * 1024 * 1024;
const SEARCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Says why a workspace-relative path (as the kernel resolved it) is off
/// limits, if the policy denies it.
pub(crate) type Denied<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Runs a file tool on already validated arguments. The policy's `deny`
/// path rules (`denied`) apply again to the path each tool actually opens,
/// symlinks resolved, and to every path a search visits.
pub(crate) fn run(
    builtin: Builtin,
    arguments: &Value,
    ctx: &ToolContext,
    denied: Denied<'_>,
) -> ToolOutcome {
    let result = match builtin {
        Builtin::ReadFile => parse(arguments).and_then(|args| read_file(args, ctx, denied)),
        Builtin::WriteFile => parse(arguments).and_then(|args| write_file(args, ctx)),
        Builtin::ListDir => parse(arguments).and_then(|args| list_dir(args, ctx, denied)),
        Builtin::SearchFiles => parse(arguments).and_then(|args| search_files(args, ctx, denied)),
        Builtin::ExecuteCode => Err(Failure::Internal(
            "execute_code is not a file tool".to_string(),
        )),
    };
    match result {
        Ok((text, truncated)) => ToolOutcome::ok_text(text, truncated),
        Err(Failure::Tool(message)) => ToolOutcome::failed(message),
        Err(Failure::Internal(message)) => ToolOutcome::internal_error(message),
    }
}

enum Failure {
    /// The tool ran and failed (missing file, path outside the workspace).
    Tool(String),
    /// A runtime bug: validated arguments did not fit the handler's type.
    Internal(String),
}

impl From<crate::workspace::WorkspaceError> for Failure {
    fn from(err: crate::workspace::WorkspaceError) -> Self {
        Failure::Tool(err.to_string())
    }
}

type Output = Result<(String, bool), Failure>;

fn parse<T: serde::de::DeserializeOwned>(arguments: &Value) -> Result<T, Failure> {
    serde_json::from_value(arguments.clone()).map_err(|err| {
        Failure::Internal(format!(
            "validated arguments did not fit the handler: {err}"
        ))
    })
}

fn read_file(args: ReadFileArgs, ctx: &ToolContext, denied: Denied<'_>) -> Output {
    let limit = ctx.max_output_bytes as u64;
    let whole_file = args.start_line.is_none() && args.line_count.is_none();
    if whole_file {
        return Ok(ctx.workspace.read_text_checked(&args.path, limit, denied)?);
    }
    // Line ranges read the file in full (up to a generous bound) and slice it.
    let (text, cut) =
        ctx.workspace
            .read_text_checked(&args.path, limit.saturating_mul(16), denied)?;
    let start = args.start_line.unwrap_or(1).saturating_sub(1) as usize;
    let count = args.line_count.map_or(usize::MAX, |n| n as usize);
    let mut selected = String::new();
    let mut truncated = cut;
    for line in text.split_inclusive('\n').skip(start).take(count) {
        if selected.len() + line.len() > ctx.max_output_bytes {
            truncated = true;
            break;
        }
        selected.push_str(line);
    }
    Ok((selected, truncated))
}

fn write_file(args: WriteFileArgs, ctx: &ToolContext) -> Output {
    let append = args.append.unwrap_or(false);
    let written = ctx
        .workspace
        .write(&args.path, args.content.as_bytes(), append)?;
    let verb = if append { "appended" } else { "wrote" };
    Ok((format!("{verb} {written} bytes to {}", args.path), false))
}

fn list_dir(args: ListDirArgs, ctx: &ToolContext, denied: Denied<'_>) -> Output {
    let path = args.path.unwrap_or_else(|| ".".to_string());
    let entries = ctx.workspace.list_dir_checked(&path, denied)?;
    let mut text = String::new();
    for entry in &entries {
        // A name is one line, whatever it holds (red-team L6).
        let name = one_line(&entry.name);
        let line = match (entry.kind, entry.size) {
            ("dir", _) => format!("{name}/\n"),
            ("file", Some(size)) => format!("{name}  ({size} bytes)\n"),
            ("symlink", _) => format!("{name}  (symlink)\n"),
            _ => format!("{name}  ({})\n", entry.kind),
        };
        if text.len() + line.len() > ctx.max_output_bytes {
            return Ok((text, true));
        }
        text.push_str(&line);
    }
    if entries.is_empty() {
        text.push_str("(empty folder)\n");
    }
    Ok((text, false))
}

fn search_files(args: SearchFilesArgs, ctx: &ToolContext, denied: Denied<'_>) -> Output {
    let regex = regex::RegexBuilder::new(&args.pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|err| {
            Failure::Tool(format!(
                "`pattern` is not a valid regular expression: {err}"
            ))
        })?;
    let path = args.path.unwrap_or_else(|| ".".to_string());
    let max_results = args.max_results.unwrap_or(100) as usize;
    let mut text = String::new();
    let mut matches = 0usize;
    let mut truncated = false;
    let started = std::time::Instant::now();
    let mut budget = SEARCH_MAX_TOTAL_BYTES;
    let mut stopped: Option<String> = None;
    let out_of_time = || started.elapsed() > SEARCH_DEADLINE;
    ctx.workspace
        .walk_files_until(&path, denied, &out_of_time, &mut |relative, file| {
            if started.elapsed() > SEARCH_DEADLINE {
                stopped = Some(format!(
                    "the search stopped after {} s, its time limit; narrow `path` or `pattern`",
                    SEARCH_DEADLINE.as_secs()
                ));
                return false;
            }
            let size = file.metadata().map_or(u64::MAX, |m| m.len());
            if size > SEARCH_MAX_FILE_BYTES {
                return true;
            }
            if size > budget {
                stopped = Some(format!(
                    "the search stopped after reading {} MiB, its limit; narrow `path` or `pattern`",
                    SEARCH_MAX_TOTAL_BYTES >> 20
                ));
                return false;
            }
            budget -= size;
            let reader = BufReader::new(file.take(size));
            for (index, line) in reader.split(b'\n').enumerate() {
                let Ok(line) = line else { return true };
                if line.contains(&0) {
                    return true; // binary file
                }
                let line = String::from_utf8_lossy(&line);
                if regex.is_match(&line) {
                    if matches == max_results {
                        truncated = true;
                        return false;
                    }
                    let entry = format!(
                        "{}:{}: {}\n",
                        one_line(&relative.display().to_string()),
                        index + 1,
                        one_line(line.trim_end())
                    );
                    if text.len() + entry.len() > ctx.max_output_bytes {
                        truncated = true;
                        return false;
                    }
                    text.push_str(&entry);
                    matches += 1;
                }
            }
            true
        })?;
    if matches == 0 {
        text.push_str("no matches\n");
    }
    if stopped.is_none() && out_of_time() {
        stopped = Some(format!(
            "the search stopped after {} s, its time limit; narrow `path` or `pattern`",
            SEARCH_DEADLINE.as_secs()
        ));
    }
    if let Some(note) = stopped {
        text.push_str(&format!("({note})\n"));
        truncated = true;
    }
    Ok((text, truncated))
}
