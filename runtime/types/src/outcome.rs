//! The result of one tool call, whatever ran it (or refused to).

use serde::{Deserialize, Serialize};

/// How a tool call ended. These are the `status` values of `agent tool run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Ran and succeeded (exit 0).
    Ok,
    /// Ran and failed (nonzero exit, or a tool-level error such as a missing file).
    Failed,
    /// Stopped by the wall-clock timeout.
    Timeout,
    /// Stopped by a resource limit (memory, CPU, processes, file size).
    Killed,
    /// Refused by policy.
    Denied,
    /// Failed validation; nothing ran.
    Invalid,
    /// An internal error of the runtime, or a backend that cannot run here.
    Error,
}

impl Status {
    /// The wire name (`ok`, `failed`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Timeout => "timeout",
            Status::Killed => "killed",
            Status::Denied => "denied",
            Status::Invalid => "invalid",
            Status::Error => "error",
        }
    }
}

/// A limit that stopped a call (serialized in snake_case: `wall_time`,
/// `cpu`, `memory`, `processes`, `file_size`, `fuel`, `budget`,
/// `open_files`, `disk`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Limit {
    /// The wall-clock timeout.
    WallTime,
    /// CPU time.
    Cpu,
    /// Memory.
    Memory,
    /// The number of processes.
    Processes,
    /// The size of one file.
    FileSize,
    /// A WASI guest's instruction budget.
    Fuel,
    /// A session budget (calls, CPU, output) refused the call.
    Budget,
    /// The number of files a WASI guest may hold open at once.
    OpenFiles,
    /// What a call may add to the workspace and its tmp (bytes or names):
    /// writes past it failed with `ENOSPC`.
    Disk,
}

impl Limit {
    /// Its name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::WallTime => "wall_time",
            Limit::Cpu => "cpu",
            Limit::Memory => "memory",
            Limit::Processes => "processes",
            Limit::FileSize => "file_size",
            Limit::Fuel => "fuel",
            Limit::Budget => "budget",
            Limit::OpenFiles => "open_files",
            Limit::Disk => "disk",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a tool call produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolOutcome {
    /// How it ended.
    pub status: Status,
    /// The process exit code, when a process ran to its end; `null` for
    /// in-process tools and for calls that never ran.
    pub exit_code: Option<i32>,
    /// Standard output (for in-process tools: the result text).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Whether stdout or stderr was cut at its cap.
    pub truncated: bool,
    /// Wall time of the call in milliseconds.
    pub duration_ms: u64,
    /// Why it did not succeed, in words for the model and the user.
    pub error: Option<String>,
    /// The signal that ended the process, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The limit that stopped the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// The connections the call asked the egress proxy for (a policy
    /// network allowlist), allowed and refused, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<crate::EgressRecord>,
    /// What the call used of its disk budget (a sandbox with one): the
    /// bytes and names it added to the workspace and its tmp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskAdded>,
}

/// What a call added to the workspace and its tmp, as its disk budget
/// counted it (see [`ToolOutcome::disk`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAdded {
    /// Bytes (whole pages per file).
    pub bytes: u64,
    /// Names: files, folders, links, and deletions of existing names.
    pub files: u64,
}

impl ToolOutcome {
    fn empty(status: Status) -> Self {
        ToolOutcome {
            status,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
            duration_ms: 0,
            error: None,
            signal: None,
            limit: None,
            egress: Vec::new(),
            disk: None,
        }
    }

    /// An in-process tool succeeded with `text`.
    pub fn ok_text(text: String, truncated: bool) -> Self {
        ToolOutcome {
            stdout: text,
            truncated,
            ..Self::empty(Status::Ok)
        }
    }

    /// A process (or guest) ran to its end: its captured output, status `ok`
    /// and exit code 0 until the caller classifies how it really ended.
    pub fn from_output(stdout: &[u8], stderr: &[u8], truncated: bool) -> Self {
        ToolOutcome {
            exit_code: Some(0),
            stdout: String::from_utf8_lossy(stdout).into_owned(),
            stderr: String::from_utf8_lossy(stderr).into_owned(),
            truncated,
            ..Self::empty(Status::Ok)
        }
    }

    /// The tool ran and failed for a reason the model can act on.
    pub fn failed(message: impl Into<String>) -> Self {
        ToolOutcome {
            error: Some(message.into()),
            ..Self::empty(Status::Failed)
        }
    }

    /// The call failed validation; nothing ran.
    pub fn invalid(message: impl Into<String>) -> Self {
        ToolOutcome {
            error: Some(message.into()),
            ..Self::empty(Status::Invalid)
        }
    }

    /// Policy refused the call; nothing ran.
    pub fn denied(message: impl Into<String>) -> Self {
        ToolOutcome {
            error: Some(message.into()),
            ..Self::empty(Status::Denied)
        }
    }

    /// The runtime could not run the call.
    pub fn internal_error(message: impl Into<String>) -> Self {
        ToolOutcome {
            error: Some(message.into()),
            ..Self::empty(Status::Error)
        }
    }

    /// The text fed back to the model as the `tool` message: the plain
    /// output for a clean success; otherwise every field that says more
    /// (a success can carry a note, such as a Python session that was
    /// restarted and lost its state).
    pub fn to_model_text(&self) -> String {
        if self.status == Status::Ok
            && self.stderr.is_empty()
            && !self.truncated
            && self.error.is_none()
            && !self.egress_refused()
        {
            return self.stdout.clone();
        }
        let mut text = format!("status: {}", self.status.as_str());
        if let Some(code) = self.exit_code {
            text.push_str(&format!("\nexit_code: {code}"));
        }
        if let Some(error) = &self.error {
            text.push_str(&format!("\nerror: {error}"));
        }
        if !self.stdout.is_empty() {
            text.push_str(&format!("\nstdout:\n{}", self.stdout));
        }
        if !self.stderr.is_empty() {
            text.push_str(&format!("\nstderr:\n{}", self.stderr));
        }
        if self.truncated {
            text.push_str("\n[output truncated]");
        }
        // Refused connections, so that the model can say why its code
        // could not reach a host (allowed ones are in the audit log).
        let refused: Vec<String> = self
            .egress
            .iter()
            .filter(|record| record.decision == crate::EgressDecision::Refused)
            .map(|record| format!("\n  {}", record.summary()))
            .collect();
        if !refused.is_empty() {
            text.push_str("\nnetwork (the policy's egress allowlist):");
            text.extend(refused);
        }
        text
    }

    /// Whether the egress proxy refused any connection of the call.
    pub fn egress_refused(&self) -> bool {
        self.egress
            .iter()
            .any(|record| record.decision == crate::EgressDecision::Refused)
    }
}
