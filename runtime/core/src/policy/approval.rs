//! Approvals: what happens when the policy says `ask`.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::Value;

/// What an approval handler is asked.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalRequest {
    /// The tool.
    pub tool: String,
    /// The parsed arguments.
    pub arguments: Value,
    /// The rule that asked (`tools.execute_code`, `rules[2]`, `defaults`).
    pub rule: String,
    /// Why it asks.
    pub reason: Option<String>,
}

/// The answer to an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalAnswer {
    /// Run this call.
    Yes,
    /// Do not run it.
    No,
    /// Run it, and allow what asked (this tool, or this rule) for the rest of
    /// the session.
    Always,
}

/// Decides `ask` calls: the host's callback, a channel to a UI, the REPL prompt.
pub trait ApprovalHandler: Send + Sync {
    /// Answers one request.
    fn approve(&self, request: &ApprovalRequest) -> ApprovalAnswer;
}

impl<F: Fn(&ApprovalRequest) -> ApprovalAnswer + Send + Sync> ApprovalHandler for F {
    fn approve(&self, request: &ApprovalRequest) -> ApprovalAnswer {
        self(request)
    }
}

/// An approval handler that forwards requests over a channel and waits for
/// the answer, for hosts whose UI runs elsewhere. A dropped receiver or
/// reply sender counts as `No`.
pub struct ChannelApprover {
    sender: std::sync::mpsc::Sender<(ApprovalRequest, std::sync::mpsc::Sender<ApprovalAnswer>)>,
}

impl ChannelApprover {
    /// A handler and the receiver the host answers from.
    #[allow(clippy::type_complexity)]
    pub fn new() -> (
        Self,
        std::sync::mpsc::Receiver<(ApprovalRequest, std::sync::mpsc::Sender<ApprovalAnswer>)>,
    ) {
        let (sender, receiver) = std::sync::mpsc::channel();
        (ChannelApprover { sender }, receiver)
    }
}

impl ApprovalHandler for ChannelApprover {
    fn approve(&self, request: &ApprovalRequest) -> ApprovalAnswer {
        let (reply, answer) = std::sync::mpsc::channel();
        if self.sender.send((request.clone(), reply)).is_err() {
            return ApprovalAnswer::No;
        }
        answer.recv().unwrap_or(ApprovalAnswer::No)
    }
}

/// A session-scoped permission added by an `always` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// Its id, for revoking.
    pub id: u64,
    /// The tool it covers.
    pub tool: String,
    /// The rule it answers (`tools.NAME`, `defaults` or `rules[N]`).
    pub rule: String,
}

/// The grants of one session. Cheap to clone; clones share the list.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    inner: Arc<Mutex<(u64, Vec<Grant>)>>,
}

impl Grants {
    /// Adds a grant for `tool` answering `rule`; returns it.
    pub fn add(&self, tool: &str, rule: &str) -> Grant {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        guard.0 += 1;
        let grant = Grant {
            id: guard.0,
            tool: tool.to_string(),
            rule: rule.to_string(),
        };
        guard.1.push(grant.clone());
        grant
    }

    /// Every grant, oldest first.
    pub fn list(&self) -> Vec<Grant> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Revokes a grant; false when no grant has that id.
    pub fn revoke(&self, id: u64) -> bool {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let before = guard.1.len();
        guard.1.retain(|g| g.id != id);
        guard.1.len() != before
    }

    /// Whether a grant covers `tool` asked about by `rule`.
    pub fn covers(&self, tool: &str, rule: &str) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .iter()
            .any(|g| g.tool == tool && g.rule == rule)
    }
}
