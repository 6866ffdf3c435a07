//! What one sandboxed run did: the sandbox's own result type.
//!
//! Both sandboxes return an [`Execution`]. Its [`ExecStatus`] can only say
//! what a sandbox can say about code it ran: it succeeded, failed, timed
//! out, was stopped by a limit, or the sandbox itself failed. Policy
//! refusals and validation failures (`denied`, `invalid`) belong to the
//! gate above, and a sandbox cannot produce them.
//!
//! The tool-call result that the model, the CLI and MCP see,
//! [`ToolOutcome`], is made from an `Execution` by one `From` impl at the
//! bottom of this file, so the mapping from sandbox results to the CLI
//! contract (`status`, `exit_code`, `limit`, ...) lives in one place. The
//! same type crosses the pipe from the WASI helper process, so it is
//! serializable.

use serde::{Deserialize, Serialize};
use stack_types::outcome::{DiskAdded, Limit, Status, ToolOutcome};
use stack_types::EgressRecord;

/// How a sandboxed run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ExecStatus {
    /// Ran to its end and succeeded (exit code 0).
    Ok,
    /// Ran and failed: a nonzero exit, a signal that no limit explains, a
    /// crashed guest, a program that was not found, or changes the sandbox
    /// could not keep.
    Failed,
    /// Stopped by the wall-clock limit.
    Timeout,
    /// Stopped by another limit (see [`Execution::limit`]).
    Killed,
    /// The sandbox itself failed, or could not run the code here.
    Error,
}

impl From<ExecStatus> for Status {
    fn from(status: ExecStatus) -> Status {
        match status {
            ExecStatus::Ok => Status::Ok,
            ExecStatus::Failed => Status::Failed,
            ExecStatus::Timeout => Status::Timeout,
            ExecStatus::Killed => Status::Killed,
            ExecStatus::Error => Status::Error,
        }
    }
}

/// What one sandboxed run did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// How it ended.
    pub status: ExecStatus,
    /// The exit code, when the program (or guest) exited by itself.
    pub exit_code: Option<i32>,
    /// Standard output, as UTF-8 (invalid bytes replaced).
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
    /// Whether stdout or stderr was cut at its cap.
    pub truncated: bool,
    /// Wall time of the run in milliseconds.
    pub duration_ms: u64,
    /// Why it did not succeed, in words for the model and the user; or a
    /// note on a success (a Python session that was restarted, say).
    pub error: Option<String>,
    /// The signal that ended the process, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The limit that stopped the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// The connections the run asked the egress proxy for, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRecord>,
    /// What the run added to the workspace and its tmp, under a disk
    /// budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskAdded>,
}

impl Execution {
    fn empty(status: ExecStatus) -> Self {
        Execution {
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

    /// A run that got to its end: its captured output, status `ok` and
    /// exit code 0 until the sandbox classifies how it really ended.
    pub fn from_output(stdout: &[u8], stderr: &[u8], truncated: bool) -> Self {
        Execution {
            exit_code: Some(0),
            stdout: String::from_utf8_lossy(stdout).into_owned(),
            stderr: String::from_utf8_lossy(stderr).into_owned(),
            truncated,
            ..Self::empty(ExecStatus::Ok)
        }
    }

    /// The code could not run for a reason the model can act on (a
    /// program that is not installed, say).
    pub fn failed(message: impl Into<String>) -> Self {
        Execution {
            error: Some(message.into()),
            ..Self::empty(ExecStatus::Failed)
        }
    }

    /// The sandbox failed, or cannot run the code here.
    pub fn internal_error(message: impl Into<String>) -> Self {
        Execution {
            error: Some(message.into()),
            ..Self::empty(ExecStatus::Error)
        }
    }

    /// Stopped by the wall-clock limit, with `message` saying how.
    #[cfg(feature = "wasi")]
    pub(crate) fn timed_out(message: impl Into<String>) -> Self {
        Execution {
            limit: Some(Limit::WallTime),
            error: Some(message.into()),
            ..Self::empty(ExecStatus::Timeout)
        }
    }
}

impl From<Execution> for ToolOutcome {
    /// The tool-call result of a sandboxed run: every field carries over,
    /// and each [`ExecStatus`] is the [`Status`] of the same name.
    fn from(run: Execution) -> ToolOutcome {
        let Execution {
            status,
            exit_code,
            stdout,
            stderr,
            truncated,
            duration_ms,
            error,
            signal,
            limit,
            egress,
            disk,
        } = run;
        let mut outcome = ToolOutcome::ok_text(stdout, truncated);
        outcome.status = status.into();
        outcome.exit_code = exit_code;
        outcome.stderr = stderr;
        outcome.duration_ms = duration_ms;
        outcome.error = error;
        outcome.signal = signal;
        outcome.limit = limit;
        outcome.egress = egress;
        outcome.disk = disk;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_of_a_run_reaches_the_tool_outcome() {
        let run = Execution {
            status: ExecStatus::Killed,
            exit_code: Some(3),
            stdout: "out".into(),
            stderr: "err".into(),
            truncated: true,
            duration_ms: 42,
            error: Some("why".into()),
            signal: Some(9),
            limit: Some(Limit::Disk),
            egress: Vec::new(),
            disk: Some(DiskAdded { bytes: 7, files: 2 }),
        };
        let outcome = ToolOutcome::from(run.clone());
        assert_eq!(outcome.status, Status::Killed);
        assert_eq!(outcome.exit_code, Some(3));
        assert_eq!(
            (outcome.stdout.as_str(), outcome.stderr.as_str()),
            ("out", "err")
        );
        assert!(outcome.truncated);
        assert_eq!(outcome.duration_ms, 42);
        assert_eq!(outcome.error.as_deref(), Some("why"));
        assert_eq!(outcome.signal, Some(9));
        assert_eq!(outcome.limit, Some(Limit::Disk));
        assert_eq!(outcome.disk, Some(DiskAdded { bytes: 7, files: 2 }));
        // The JSON of the CLI contract is the same as the run's own.
        assert_eq!(
            serde_json::to_value(&run).expect("json"),
            serde_json::to_value(&outcome).expect("json")
        );
    }

    #[test]
    fn each_sandbox_status_is_the_tool_status_of_the_same_name() {
        for (run, tool) in [
            (ExecStatus::Ok, "ok"),
            (ExecStatus::Failed, "failed"),
            (ExecStatus::Timeout, "timeout"),
            (ExecStatus::Killed, "killed"),
            (ExecStatus::Error, "error"),
        ] {
            assert_eq!(Status::from(run).as_str(), tool);
            assert_eq!(
                serde_json::to_value(run).expect("json"),
                serde_json::Value::from(tool)
            );
        }
    }
}
