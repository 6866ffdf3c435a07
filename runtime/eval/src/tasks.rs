//! Executable tasks: a prompt, the files it starts with, and checks on what
//! the agent did. The tools really run, in the sandbox, under the policy:
//! a task passes when every check holds. The share of tasks that pass is
//! the *tool success rate*.
//!
//! A task file holds one JSON object per line (blank lines and lines
//! starting with `//` are skipped):
//!
//! ```json
//! {"id": "read_notes", "category": "read_file", "tool": "read_file",
//!  "prompt": "What is in notes.txt? Read it.",
//!  "files": {"notes.txt": "The meeting is at 3pm."},
//!  "checks": [{"answer_matches": "3 ?pm"}]}
//! ```
//!
//! Checks:
//! * `{"file": PATH, "matches": REGEX}`: the file exists in the workspace
//!   after the turn, and its text matches;
//! * `{"answer_matches": REGEX}`: the last assistant message matches;
//! * `{"tool_output_matches": REGEX, "tool": NAME}`: some successful
//!   result of that tool (its stdout) matches.
//!
//! Patterns are Rust regexes, case-insensitive. `tool` names the tool the
//! task needs, for the "right tool" count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

use crate::EvalError;

/// One executable task.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// A unique id.
    pub id: String,
    /// Its report category (a tool, or `execute_code:python`, ...).
    pub category: String,
    /// The tool the task needs.
    pub tool: String,
    /// The user's prompt.
    pub prompt: String,
    /// Files the workspace starts with: relative path to text.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// What must hold afterwards.
    pub checks: Vec<Check>,
}

/// One check on a finished task.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Check {
    /// A workspace file's text matches.
    File {
        /// Relative path.
        file: String,
        /// The pattern.
        matches: String,
    },
    /// The final answer matches.
    Answer {
        /// The pattern.
        answer_matches: String,
    },
    /// A successful result of `tool` matches.
    ToolOutput {
        /// The pattern.
        tool_output_matches: String,
        /// The tool.
        tool: String,
    },
}

/// A task with its checks' patterns compiled.
#[derive(Debug, Clone)]
pub struct LoadedTask {
    /// The task.
    pub task: Task,
    patterns: Vec<Regex>,
}

/// What a turn left behind, for the checks.
#[derive(Debug, Default, Clone, Serialize)]
pub struct TurnRecord {
    /// The last assistant message's text.
    pub answer: String,
    /// Each finished call: tool, whether it succeeded, its stdout.
    pub results: Vec<(String, bool, String)>,
}

impl LoadedTask {
    /// The first check that does not hold, described; `None` when all do.
    pub fn first_failed_check(&self, workspace: &Path, turn: &TurnRecord) -> Option<String> {
        self.task
            .checks
            .iter()
            .zip(&self.patterns)
            .find_map(|(check, pattern)| match check {
                Check::File { file, matches } => {
                    match std::fs::read_to_string(workspace.join(file)) {
                        Ok(text) if pattern.is_match(&text) => None,
                        Ok(text) => Some(format!(
                            "{file} does not match /{matches}/: {:?}",
                            clip(&text)
                        )),
                        Err(err) => Some(format!("{file} cannot be read: {err}")),
                    }
                }
                Check::Answer { answer_matches } => (!pattern.is_match(&turn.answer)).then(|| {
                    format!(
                        "the answer does not match /{answer_matches}/: {:?}",
                        clip(&turn.answer)
                    )
                }),
                Check::ToolOutput {
                    tool_output_matches,
                    tool,
                } => (!turn
                    .results
                    .iter()
                    .any(|(name, ok, out)| name == tool && *ok && pattern.is_match(out)))
                .then(|| format!("no successful {tool} result matches /{tool_output_matches}/")),
            })
    }
}

fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

/// Loads a task file.
pub fn load(path: &Path) -> Result<Vec<LoadedTask>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tasks = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("//") {
            continue;
        }
        let at = |message: String| EvalError::Malformed {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        };
        let task: Task = serde_json::from_str(trimmed).map_err(|e| at(e.to_string()))?;
        if !ids.insert(task.id.clone()) {
            return Err(at(format!("the id `{}` is used twice", task.id)));
        }
        if task.checks.is_empty() {
            return Err(at(format!("task `{}` has no checks", task.id)));
        }
        for file in task.files.keys() {
            if !is_relative_inside(file) {
                return Err(at(format!(
                    "`{file}` is not a relative path inside the workspace"
                )));
            }
        }
        let patterns = task
            .checks
            .iter()
            .map(|check| {
                let pattern = match check {
                    Check::File { matches, file } => {
                        if !is_relative_inside(file) {
                            return Err(at(format!(
                                "`{file}` is not a relative path inside the workspace"
                            )));
                        }
                        matches
                    }
                    Check::Answer { answer_matches } => answer_matches,
                    Check::ToolOutput {
                        tool_output_matches,
                        ..
                    } => tool_output_matches,
                };
                RegexBuilder::new(pattern)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| at(format!("bad pattern /{pattern}/: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        tasks.push(LoadedTask { task, patterns });
    }
    if tasks.is_empty() {
        return Err(EvalError::NoTasks(path.to_path_buf()));
    }
    Ok(tasks)
}

fn is_relative_inside(path: &str) -> bool {
    let path = PathBuf::from(path);
    path.is_relative()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Writes a task's files into `workspace`.
pub fn prepare(task: &Task, workspace: &Path) -> std::io::Result<()> {
    for (file, text) in &task.files {
        let path = workspace.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_files_load_and_bad_ones_name_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.jsonl");
        std::fs::write(
            &good,
            "// a comment\n{\"id\": \"a\", \"category\": \"read_file\", \"tool\": \"read_file\", \"prompt\": \"p\", \"files\": {\"n.txt\": \"x\"}, \"checks\": [{\"answer_matches\": \"X\"}, {\"file\": \"n.txt\", \"matches\": \"x\"}, {\"tool_output_matches\": \"x\", \"tool\": \"read_file\"}]}\n",
        )
        .expect("write");
        let tasks = load(&good).expect("loads");
        assert_eq!(tasks.len(), 1);
        let ws = tempfile::tempdir().expect("tempdir");
        prepare(&tasks[0].task, ws.path()).expect("prepare");
        let turn = TurnRecord {
            answer: "it says x".into(),
            results: vec![("read_file".into(), true, "x".into())],
        };
        assert_eq!(tasks[0].first_failed_check(ws.path(), &turn), None);
        let failed = TurnRecord {
            answer: "nothing".into(),
            results: vec![("read_file".into(), false, "x".into())],
        };
        assert!(tasks[0]
            .first_failed_check(ws.path(), &failed)
            .is_some_and(|m| m.contains("answer")));
        for (bad, expected) in [
            ("{\"id\": \"a\"}", "missing field"),
            ("{\"id\": \"a\", \"category\": \"c\", \"tool\": \"t\", \"prompt\": \"p\", \"checks\": []}", "no checks"),
            ("{\"id\": \"a\", \"category\": \"c\", \"tool\": \"t\", \"prompt\": \"p\", \"checks\": [{\"answer_matches\": \"(\"}]}", "bad pattern"),
            ("{\"id\": \"a\", \"category\": \"c\", \"tool\": \"t\", \"prompt\": \"p\", \"files\": {\"../x\": \"\"}, \"checks\": [{\"answer_matches\": \"x\"}]}", "inside the workspace"),
            ("{\"id\": \"a\", \"category\": \"c\", \"tool\": \"t\", \"prompt\": \"p\", \"checks\": [{\"answer_matchez\": \"x\"}]}", "did not match any variant"),
        ] {
            let path = dir.path().join("bad.jsonl");
            std::fs::write(&path, format!("\n{bad}\n")).expect("write");
            let err = load(&path).expect_err(bad).to_string();
            assert!(err.contains(":2:") && err.contains(expected), "{err}");
        }
    }
}
