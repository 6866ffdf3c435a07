//! Approvals: what happens when the policy says `ask`.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use serde::Serialize;
use serde_json::Value;
use stack_types::text::{for_terminal, one_line};

/// What an approval handler is asked.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalRequest {
    /// The call's id (as the model gave it), which an approval over HTTP
    /// names.
    pub call_id: String,
    /// The tool.
    pub tool: String,
    /// The parsed arguments.
    pub arguments: Value,
    /// The rule that asked (`tools.execute_code`, `rules[2]`, `defaults`).
    pub rule: String,
    /// Why it asks.
    pub reason: Option<String>,
}

impl ApprovalRequest {
    /// The whole call, as a person should read it before allowing it: each
    /// argument on its own, multi-line strings (code) as the lines they are,
    /// every control character escaped.
    pub fn describe(&self) -> Vec<String> {
        let mut lines = vec![format!("{} wants to run:", one_line(&self.tool))];
        let arguments = match &self.arguments {
            Value::Object(map) => map.iter().collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        if arguments.is_empty() {
            lines.push(format!("  {}", for_terminal(&self.arguments.to_string())));
        }
        for (key, value) in arguments {
            match value {
                Value::String(text) if text.contains('\n') => {
                    lines.push(format!("  {}:", one_line(key)));
                    // Split on `\n` alone: a `\r` is shown (escaped), as
                    // everything that runs is.
                    lines.extend(
                        text.strip_suffix('\n')
                            .unwrap_or(text)
                            .split('\n')
                            .map(|line| format!("  │ {}", for_terminal(line))),
                    );
                }
                Value::String(text) => {
                    lines.push(format!("  {}: {}", one_line(key), one_line(text)));
                }
                other => lines.push(format!(
                    "  {}: {}",
                    one_line(key),
                    one_line(&other.to_string())
                )),
            }
        }
        lines
    }
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

/// Decides `ask` calls: the host's callback, a UI in another task, the
/// REPL prompt, an MCP elicitation. Asynchronous: the gate awaits the
/// answer, so a handler waits for a person without holding a runtime
/// thread. A handler that must block (a terminal read) does so on a
/// blocking thread of its own (`tokio::task::spawn_blocking`).
pub trait ApprovalHandler: Send + Sync {
    /// Answers one request.
    fn approve<'a>(&'a self, request: &'a ApprovalRequest) -> BoxFuture<'a, ApprovalAnswer>;
}

/// A plain function answers at once (it must not block: it runs on the
/// gate's task).
impl<F: Fn(&ApprovalRequest) -> ApprovalAnswer + Send + Sync> ApprovalHandler for F {
    fn approve<'a>(&'a self, request: &'a ApprovalRequest) -> BoxFuture<'a, ApprovalAnswer> {
        Box::pin(std::future::ready(self(request)))
    }
}

/// One request waiting for its answer, as a [`ChannelApprover`] hands it to
/// the host. Dropping it unanswered answers `No`.
#[derive(Debug)]
pub struct PendingApproval {
    /// What is asked.
    pub request: ApprovalRequest,
    reply: tokio::sync::oneshot::Sender<ApprovalAnswer>,
}

impl PendingApproval {
    /// Answers the request.
    pub fn answer(self, answer: ApprovalAnswer) {
        let _ = self.reply.send(answer);
    }
}

/// An approval handler for hosts whose UI runs in another task or thread:
/// each request arrives on the receiver as a [`PendingApproval`], which any
/// task answers. A dropped receiver, or a request dropped unanswered,
/// counts as `No`.
#[derive(Debug, Clone)]
pub struct ChannelApprover {
    sender: tokio::sync::mpsc::Sender<PendingApproval>,
}

impl ChannelApprover {
    /// A handler and the receiver the host answers from (`recv().await`
    /// from async code, `blocking_recv()` from a thread of its own).
    pub fn new() -> (Self, tokio::sync::mpsc::Receiver<PendingApproval>) {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        (ChannelApprover { sender }, receiver)
    }
}

impl ApprovalHandler for ChannelApprover {
    fn approve<'a>(&'a self, request: &'a ApprovalRequest) -> BoxFuture<'a, ApprovalAnswer> {
        Box::pin(async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let pending = PendingApproval {
                request: request.clone(),
                reply,
            };
            if self.sender.send(pending).await.is_err() {
                return ApprovalAnswer::No;
            }
            answer.await.unwrap_or(ApprovalAnswer::No)
        })
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
