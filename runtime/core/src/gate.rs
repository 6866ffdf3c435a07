//! The gate: the one place a model's tool call goes through, in order —
//! validate, budget, policy (and approval), execute, redact, account, audit.
//!
//! The agent loop and `agent tool run` both call [`Gate::call`]; nothing
//! else reaches a sandbox.

use std::sync::Arc;

use serde_json::Value;
use tracing::Instrument;

use crate::dispatch::{self, ToolContext};
use crate::policy::{
    ApprovalHandler, AuditLog, AuditRecord, AuthorizedCall, BudgetTracker, Grants, Policy,
};
use crate::tools::Registry;
use stack_types::message::ToolCall;
use stack_types::outcome::ToolOutcome;

/// What [`Gate::admit`] decided before anything ran.
#[derive(Debug)]
pub enum Admission {
    /// Validated and authorized: run it with [`dispatch::execute`], then
    /// pass the outcome to [`Gate::finish`].
    Run(Box<AuthorizedCall>),
    /// Refused (invalid, over budget, denied or not approved); the outcome
    /// is final and already audited.
    Refused(ToolOutcome),
}

/// Everything a session needs to turn tool calls into outcomes.
pub struct Gate {
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    grants: Grants,
    approver: Option<Arc<dyn ApprovalHandler>>,
    audit: Option<Arc<AuditLog>>,
    session: String,
    budget: BudgetTracker,
}

impl Gate {
    /// A gate with no approver (so `ask` means deny) and no audit log.
    pub fn new(registry: Arc<Registry>, policy: Arc<Policy>, session: impl Into<String>) -> Gate {
        let budget = policy.budget_tracker();
        Gate {
            registry,
            policy,
            grants: Grants::default(),
            approver: None,
            audit: None,
            session: session.into(),
            budget,
        }
    }

    /// A blocking job that grounds the built-in tools' parameters in
    /// `workspace` as it is when the job runs (and, in `request` mode, in
    /// the user's `request`), under this gate's policy and grants (see
    /// [`crate::grounding`]). Run it on a blocking thread.
    pub fn grounding_job(
        &self,
        workspace: Arc<crate::workspace::Workspace>,
        mode: crate::grounding::GroundingMode,
        request: String,
    ) -> impl FnOnce() -> Vec<crate::grounding::GroundedParameter> + Send + 'static {
        let (registry, policy, grants) = (
            Arc::clone(&self.registry),
            Arc::clone(&self.policy),
            self.grants.clone(),
        );
        move || {
            let asked = crate::grounding::GroundingRequest {
                mode,
                request: &request,
            };
            crate::grounding::ground_arguments(&workspace, &registry, &policy, &grants, asked)
        }
    }

    /// Sets who answers `ask` decisions.
    pub fn with_approver(mut self, approver: Arc<dyn ApprovalHandler>) -> Gate {
        self.approver = Some(approver);
        self
    }

    /// Replaces who answers `ask` decisions.
    pub fn set_approver(&mut self, approver: Option<Arc<dyn ApprovalHandler>>) {
        self.approver = approver;
    }

    /// Writes an audit record for every decision and result.
    pub fn with_audit_log(mut self, audit: Arc<AuditLog>) -> Gate {
        self.audit = Some(audit);
        self
    }

    /// The session's grants (list and revoke them here).
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The registry in use.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The session's budget tracker.
    pub fn budget(&mut self) -> &mut BudgetTracker {
        &mut self.budget
    }

    /// Runs one tool call through every check. Never panics on what the
    /// call contains; every refusal is an outcome the model can read.
    pub async fn call(&mut self, call: &ToolCall, ctx: &ToolContext) -> ToolOutcome {
        match self.admit(call).await {
            Admission::Refused(outcome) => outcome,
            Admission::Run(authorized) => {
                let outcome = dispatch::execute(&authorized, ctx)
                    .instrument(self.span(call))
                    .await;
                self.finish(call, outcome)
            }
        }
    }

    /// Everything before execution, in order: validation, budgets, the
    /// policy and its approval; records the decision (and, for a refusal,
    /// the result) in the audit log. Approval prompts happen here, one call
    /// at a time; the calls it lets through may then run concurrently.
    pub async fn admit(&mut self, call: &ToolCall) -> Admission {
        let tool = call.function.name.clone();
        let validated = match self.registry.validate(call) {
            Ok(validated) => validated,
            Err(err) => {
                let outcome = ToolOutcome::invalid(err.to_string());
                self.record_result(&call.id, &tool, &outcome);
                return Admission::Refused(outcome);
            }
        };
        if let Err(exceeded) = self.budget.admit_call() {
            let mut outcome = ToolOutcome::denied(exceeded.to_string());
            outcome.limit = Some(stack_types::Limit::Budget);
            self.record_decision(
                &call.id,
                &tool,
                validated.arguments(),
                "budgets",
                "deny",
                None,
                Some(exceeded.to_string()),
            );
            self.record_result(&call.id, &tool, &outcome);
            return Admission::Refused(outcome);
        }
        let arguments = validated.arguments().clone();
        match self
            .policy
            .authorize(validated, self.approver.as_deref(), &self.grants)
            .await
        {
            Ok(authorized) => {
                let decision = authorized.decision().clone();
                let approval = authorized
                    .approval()
                    .map(|a| format!("{a:?}").to_lowercase());
                self.record_decision(
                    &call.id,
                    &tool,
                    &arguments,
                    &decision.rule,
                    decision.verdict.as_str(),
                    approval,
                    decision.reason.clone(),
                );
                Admission::Run(Box::new(authorized))
            }
            Err(refusal) => {
                let approval = refusal.approval.map(|a| format!("{a:?}").to_lowercase());
                self.record_decision(
                    &call.id,
                    &tool,
                    &arguments,
                    &refusal.decision.rule,
                    refusal.decision.verdict.as_str(),
                    approval,
                    refusal.decision.reason.clone(),
                );
                let outcome = ToolOutcome::denied(refusal.to_string());
                self.record_result(&call.id, &tool, &outcome);
                Admission::Refused(outcome)
            }
        }
    }

    /// Everything after execution: redaction, budget accounting, the audit
    /// record of the result. Returns the outcome as the model may see it.
    pub fn finish(&mut self, call: &ToolCall, mut outcome: ToolOutcome) -> ToolOutcome {
        self.policy.redactor().redact_outcome(&mut outcome);
        if outcome.exit_code.is_some() || outcome.signal.is_some() || outcome.limit.is_some() {
            // CPU time of sandboxed processes is charged at its upper bound,
            // the wall time of the call.
            self.budget
                .charge_sandbox(outcome.duration_ms, outcome.duration_ms);
        }
        if let Some(added) = outcome.disk {
            self.budget.charge_disk(added);
        }
        self.record_result(&call.id, &call.function.name, &outcome);
        outcome
    }

    /// Finishes a call its caller abandoned while it ran (a cancelled turn,
    /// an MCP client's `notifications/cancelled`): charged for the wall time
    /// it ran (its CPU time at that bound too), then redacted, accounted and
    /// audited like any other.
    pub fn finish_abandoned(
        &mut self,
        call: &ToolCall,
        ran_for: std::time::Duration,
    ) -> ToolOutcome {
        let ran_ms = u64::try_from(ran_for.as_millis()).unwrap_or(u64::MAX);
        let mut outcome = ToolOutcome::internal_error(format!(
            "cancelled by the caller after {ran_ms} ms; the call was stopped"
        ));
        outcome.duration_ms = ran_ms;
        self.budget.charge_sandbox(ran_ms, ran_ms);
        self.finish(call, outcome)
    }

    /// The `tracing` span a call's execution runs in.
    pub fn span(&self, call: &ToolCall) -> tracing::Span {
        tracing::info_span!("tool_call", session = %self.session, call_id = %call.id, tool = %call.function.name)
    }

    /// The text of an outcome as the model will see it: redacted already,
    /// and cut to the session's output budget with a visible marker.
    pub fn text_for_model(&mut self, outcome: &ToolOutcome) -> String {
        self.budget.feed_to_model(&outcome.to_model_text())
    }

    #[allow(clippy::too_many_arguments)]
    fn record_decision(
        &self,
        call_id: &str,
        tool: &str,
        arguments: &Value,
        rule: &str,
        decision: &str,
        approval: Option<String>,
        reason: Option<String>,
    ) {
        let Some(audit) = &self.audit else { return };
        let redacted = self.policy.redactor().redact(&arguments.to_string());
        let arguments = serde_json::from_str(&redacted).unwrap_or(Value::String(redacted));
        let record = AuditRecord::Decision {
            time_ms: crate::policy::audit::now_ms(),
            session: self.session.clone(),
            call_id: call_id.to_string(),
            tool: tool.to_string(),
            arguments,
            rule: rule.to_string(),
            decision: decision.to_string(),
            approval,
            reason,
        };
        if let Err(err) = audit.append(&record) {
            tracing::error!(%err, path = %audit.path().display(), "could not write the audit log");
        }
    }

    fn record_result(&self, call_id: &str, tool: &str, outcome: &ToolOutcome) {
        let Some(audit) = &self.audit else { return };
        let record = AuditRecord::Result {
            time_ms: crate::policy::audit::now_ms(),
            session: self.session.clone(),
            call_id: call_id.to_string(),
            tool: tool.to_string(),
            status: outcome.status.as_str().to_string(),
            duration_ms: outcome.duration_ms,
            limit: outcome.limit,
            error: outcome
                .error
                .as_deref()
                .map(|e| self.policy.redactor().redact(e)),
        };
        if let Err(err) = audit.append(&record) {
            tracing::error!(%err, path = %audit.path().display(), "could not write the audit log");
        }
        for connection in &outcome.egress {
            let record = AuditRecord::Egress {
                time_ms: crate::policy::audit::now_ms(),
                session: self.session.clone(),
                call_id: call_id.to_string(),
                tool: tool.to_string(),
                record: connection.clone(),
            };
            if let Err(err) = audit.append(&record) {
                tracing::error!(%err, path = %audit.path().display(), "could not write the audit log");
            }
        }
    }
}
