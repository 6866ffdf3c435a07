//! Session budgets: how much a session may spend on tools.

use super::file::BudgetSettings;

/// Why a call was refused by a budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetExceeded {
    /// Too many calls in this turn.
    #[error("tool-call budget for this turn is used up ({0} calls); answer without more tools or ask the user to continue")]
    CallsPerTurn(u64),
    /// Too many calls in this session.
    #[error("tool-call budget for this session is used up ({0} calls)")]
    CallsPerSession(u64),
    /// Sandbox CPU time used up.
    #[error("sandbox CPU budget for this session is used up ({0} s)")]
    CpuSeconds(u64),
    /// Sandbox wall time used up.
    #[error("sandbox time budget for this session is used up ({0} s)")]
    WallSeconds(u64),
    /// Output fed back to the model used up.
    #[error("the budget of tool output for this session is used up ({0} bytes)")]
    OutputBytes(u64),
    /// What the session's calls may add to the workspace is used up.
    #[error("the session's disk budget is used up: its calls have added {0} MiB to the workspace and tmp; delete files or start a new session")]
    DiskMb(u64),
    /// The names the session's calls may add are used up.
    #[error("the session's file budget is used up: its calls have added {0} files, folders or links; delete some or start a new session")]
    Files(u64),
}

/// What a session has spent, checked against the policy's budgets.
#[derive(Debug, Clone, Default)]
pub struct BudgetTracker {
    limits: BudgetSettings,
    calls_this_turn: u64,
    calls: u64,
    cpu_ms: u64,
    wall_ms: u64,
    output_bytes: u64,
    disk_bytes: u64,
    files: u64,
}

impl BudgetTracker {
    /// A tracker for these limits (unset limits are unlimited).
    pub fn new(limits: BudgetSettings) -> Self {
        BudgetTracker {
            limits,
            ..Default::default()
        }
    }

    /// Starts a new turn.
    pub fn start_turn(&mut self) {
        self.calls_this_turn = 0;
    }

    /// Admits one more call, or says which budget it would break.
    pub fn admit_call(&mut self) -> Result<(), BudgetExceeded> {
        let l = &self.limits;
        if let Some(max) = l.calls_per_turn.filter(|max| self.calls_this_turn >= *max) {
            return Err(BudgetExceeded::CallsPerTurn(max));
        }
        if let Some(max) = l.calls_per_session.filter(|max| self.calls >= *max) {
            return Err(BudgetExceeded::CallsPerSession(max));
        }
        if let Some(max) = l
            .sandbox_cpu_seconds
            .filter(|max| self.cpu_ms >= max * 1000)
        {
            return Err(BudgetExceeded::CpuSeconds(max));
        }
        if let Some(max) = l
            .sandbox_wall_seconds
            .filter(|max| self.wall_ms >= max * 1000)
        {
            return Err(BudgetExceeded::WallSeconds(max));
        }
        if let Some(max) = l
            .output_bytes_to_model
            .filter(|max| self.output_bytes >= *max)
        {
            return Err(BudgetExceeded::OutputBytes(max));
        }
        if let Some(max) = l.disk_mb.filter(|max| self.disk_bytes >= max << 20) {
            return Err(BudgetExceeded::DiskMb(max));
        }
        if let Some(max) = l.files.filter(|max| self.files >= *max) {
            return Err(BudgetExceeded::Files(max));
        }
        self.calls_this_turn += 1;
        self.calls += 1;
        Ok(())
    }

    /// Records sandbox time spent by a finished call.
    pub fn charge_sandbox(&mut self, wall_ms: u64, cpu_ms: u64) {
        self.wall_ms += wall_ms;
        self.cpu_ms += cpu_ms;
    }

    /// Records what a finished call added to the workspace and its tmp
    /// (its disk budget's count).
    pub fn charge_disk(&mut self, added: stack_types::DiskAdded) {
        self.disk_bytes = self.disk_bytes.saturating_add(added.bytes);
        self.files = self.files.saturating_add(added.files);
    }

    /// Cuts `text` to what the budgets let the model see, with a visible
    /// marker where it was cut, and records what was fed back.
    pub fn feed_to_model(&mut self, text: &str) -> String {
        let per_result = self.limits.result_bytes_to_model.unwrap_or(usize::MAX);
        let session_left = self.limits.output_bytes_to_model.map_or(usize::MAX, |max| {
            usize::try_from(max.saturating_sub(self.output_bytes)).unwrap_or(usize::MAX)
        });
        let allowed = per_result.min(session_left);
        let fed = if text.len() <= allowed {
            text.to_string()
        } else {
            let end = text.floor_char_boundary(allowed);
            format!(
                "{}\n[... {} more bytes cut by the session's output budget ...]",
                &text[..end],
                text.len() - end
            )
        };
        self.output_bytes += fed.len().min(allowed) as u64;
        fed
    }

    /// Calls made in this session.
    pub fn calls(&self) -> u64 {
        self.calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stack_types::DiskAdded;

    #[test]
    fn a_session_that_added_its_disk_budget_gets_no_more_calls() {
        for (added, want) in [
            (
                DiskAdded {
                    bytes: 3 << 20,
                    files: 10,
                },
                Ok(()),
            ),
            (
                DiskAdded {
                    bytes: 4 << 20,
                    files: 10,
                },
                Err(BudgetExceeded::DiskMb(4)),
            ),
            (
                DiskAdded {
                    bytes: 1 << 20,
                    files: 50,
                },
                Err(BudgetExceeded::Files(50)),
            ),
        ] {
            let mut tracker = BudgetTracker::new(BudgetSettings {
                disk_mb: Some(4),
                files: Some(50),
                ..BudgetSettings::default()
            });
            assert_eq!(tracker.admit_call(), Ok(()));
            tracker.charge_disk(added);
            assert_eq!(tracker.admit_call(), want, "after {added:?}");
        }
    }
}
