//! Safety policies: what a session may run, where, and within what budget.
//!
//! A [`Policy`] is resolved from policy files (see [`file`]) and decides each
//! validated call: per-tool `allow` / `ask` / `deny`, overridden by matching
//! argument rules (deny beats ask beats allow among them), with `ask` going
//! to an [`ApprovalHandler`] (none means deny) and `always` answers kept as
//! session [`Grants`]. [`Policy::authorize`] is the only way to obtain an
//! [`AuthorizedCall`], and only an `AuthorizedCall` runs.
//!
//! # Threat model
//!
//! The model is untrusted and may craft arguments to slip past rules; the
//! policy author and the host are trusted. Rules therefore match the parsed
//! arguments (never the raw JSON text, so escapes and key order do not
//! matter; duplicate keys never get this far), can normalize paths, and can
//! scan every string in the arguments. A call the policy cannot decide
//! (no handler for `ask`) is denied. Tool output is redacted before it is
//! stored or shown.

pub mod approval;
pub mod audit;
pub mod budget;
pub mod file;
pub mod redact;
pub mod rules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

pub use approval::{
    ApprovalAnswer, ApprovalHandler, ApprovalRequest, ChannelApprover, Grant, Grants,
    PendingApproval,
};
pub use audit::{AuditLog, AuditRecord};
pub use budget::{BudgetExceeded, BudgetTracker};
pub use file::{
    Backend, BudgetSettings, McpEndpoint, McpServerSpec, PolicyError, PrivacySettings,
    SandboxSettings, ToolSettings, Verdict,
};
pub use redact::Redactor;
pub use rules::ArgRule;

use crate::tools::ValidatedCall;
use file::LoadedFile;
use stack_sandbox::process::{DiskBudget, Network, ProcessPolicy, ResourceLimits};

/// What the policy decided about one call, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// allow, ask or deny.
    pub verdict: Verdict,
    /// The rule that decided: `rules[N]`, `tools.NAME`, `defaults`, or one of
    /// those followed by ` (granted)` when a session grant turned ask into allow.
    pub rule: String,
    /// The rule's reason, when it has one.
    pub reason: Option<String>,
}

/// A call that passed validation and the policy (and approval, if asked).
/// Only [`Policy::authorize`] makes one.
#[derive(Debug, Clone)]
pub struct AuthorizedCall {
    call: ValidatedCall,
    decision: Decision,
    approval: Option<ApprovalAnswer>,
    sandbox: SandboxSettings,
    /// The policy's `deny` path rules for this tool (`path = true`, pointer
    /// `/path` or `""`): the file tools check them again against the path
    /// the kernel resolved, and on every path a walk visits.
    path_denials: Vec<ArgRule>,
}

impl AuthorizedCall {
    /// Why `relative` (a workspace-relative path as the kernel resolved it:
    /// through symlinks, or one a walk visits) is denied, if a `deny` path
    /// rule of the policy matches it. A link named `envlink` that leads to
    /// `.env` is `.env` here.
    pub fn denied_path(&self, relative: &str) -> Option<String> {
        let as_argument = serde_json::json!({ "path": relative });
        self.path_denials
            .iter()
            .find(|rule| rule.matches(&as_argument))
            .map(|rule| format!("denied by policy ({}): {}", rule.name(), rule.spec.reason))
    }

    /// The validated call.
    pub fn call(&self) -> &ValidatedCall {
        &self.call
    }

    /// The decision that let it through.
    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The approval answer, when the policy asked.
    pub fn approval(&self) -> Option<ApprovalAnswer> {
        self.approval
    }

    /// The effective sandbox settings for this call.
    pub fn sandbox(&self) -> &SandboxSettings {
        &self.sandbox
    }
}

/// Why [`Policy::authorize`] refused a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("denied by policy ({}): {}", decision.rule, message)]
pub struct Refusal {
    /// The decision (`deny`, or `ask` that was not approved).
    pub decision: Decision,
    /// The approval answer, when one was given.
    pub approval: Option<ApprovalAnswer>,
    /// Words for the model and the user.
    pub message: String,
}

/// A resolved policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The files it was built from, base first.
    pub sources: Vec<PathBuf>,
    /// The description of the most specific file that has one.
    pub description: Option<String>,
    defaults: ToolSettings,
    tools: BTreeMap<String, ToolSettings>,
    rules: Vec<ArgRule>,
    sandbox_defaults: SandboxSettings,
    sandbox_languages: BTreeMap<String, SandboxSettings>,
    sandbox_tools: BTreeMap<String, SandboxSettings>,
    /// Session budgets.
    pub budgets: BudgetSettings,
    /// Transcript settings.
    pub privacy: PrivacySettings,
    redactor: Redactor,
    mcp_servers: BTreeMap<String, McpServerSpec>,
    /// The policy this one was narrowed from ([`Policy::within`]): every
    /// call must pass it too.
    outer: Option<std::sync::Arc<Policy>>,
}

impl Policy {
    /// Loads a policy file and what it extends.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        Self::resolve(file::load_chain(path)?)
    }

    /// A shipped preset: `default`, `strict` or `trusted`.
    pub fn preset(name: &str) -> Result<Policy, PolicyError> {
        Self::resolve(file::load_preset(name)?)
    }

    /// A policy from TOML text; `origin` names it in errors, and a relative
    /// `extends` path is resolved against `origin`'s folder.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Policy, PolicyError> {
        Self::resolve(file::chain_from_text(text, origin)?)
    }

    /// A preset name or a path.
    pub fn load_named(name_or_path: &str) -> Result<Policy, PolicyError> {
        if file::PRESETS.iter().any(|(name, _)| *name == name_or_path) {
            Self::preset(name_or_path)
        } else {
            Self::load(Path::new(name_or_path))
        }
    }

    fn resolve(chain: Vec<LoadedFile>) -> Result<Policy, PolicyError> {
        let mut policy = Policy {
            sources: Vec::new(),
            description: None,
            defaults: ToolSettings {
                decision: Some(Verdict::Ask),
                reason: None,
            },
            tools: BTreeMap::new(),
            rules: Vec::new(),
            sandbox_defaults: SandboxSettings::default(),
            sandbox_languages: BTreeMap::new(),
            sandbox_tools: BTreeMap::new(),
            budgets: BudgetSettings::default(),
            privacy: PrivacySettings::default(),
            redactor: Redactor::default(),
            mcp_servers: BTreeMap::new(),
            outer: None,
        };
        let mut builtin_redaction = true;
        let mut patterns = Vec::new();
        for loaded in chain {
            let LoadedFile { path, text, file } = loaded;
            let fail = |line: Option<usize>, message: String| PolicyError {
                path: path.clone(),
                line,
                message,
            };
            policy.sources.push(path.clone());
            policy.description = file.description.or(policy.description);
            if let Some(defaults) = file.defaults {
                policy.defaults = layer_tool(&policy.defaults, &defaults);
            }
            for (name, settings) in file.tools {
                let merged = layer_tool(
                    policy.tools.get(&name).unwrap_or(&ToolSettings::default()),
                    &settings,
                );
                policy.tools.insert(name, merged);
            }
            for (nth, spec) in file.rules.into_iter().enumerate() {
                let index = policy.rules.len();
                let rule = ArgRule::compile(spec, index).map_err(|message| {
                    fail(
                        nth_header_line(&text, "[[rules]]", nth),
                        format!("rule {}: {message}", nth + 1),
                    )
                })?;
                policy.rules.push(rule);
            }
            if let Some(sandbox) = file.sandbox {
                policy.sandbox_defaults = policy.sandbox_defaults.layered(&sandbox.defaults());
                for (language, settings) in sandbox.languages {
                    if !["python", "javascript", "bash"].contains(&language.as_str()) {
                        return Err(fail(find_line(&text, &language), format!("unknown language `{language}` under [sandbox.languages]; use python, javascript or bash")));
                    }
                    let merged = policy
                        .sandbox_languages
                        .get(&language)
                        .cloned()
                        .unwrap_or_default()
                        .layered(&settings);
                    policy.sandbox_languages.insert(language, merged);
                }
                for (tool, settings) in sandbox.tools {
                    let merged = policy
                        .sandbox_tools
                        .get(&tool)
                        .cloned()
                        .unwrap_or_default()
                        .layered(&settings);
                    policy.sandbox_tools.insert(tool, merged);
                }
            }
            for (name, server) in file.mcp_servers {
                if let Err(message) = check_mcp_server_name(&name) {
                    return Err(fail(find_line(&text, &name), message));
                }
                if let Err(message) = server.check(&name) {
                    return Err(fail(find_line(&text, &name), message));
                }
                policy.mcp_servers.insert(name, server);
            }
            if let Some(budgets) = file.budgets {
                policy.budgets = layer_budgets(&policy.budgets, &budgets);
            }
            if let Some(privacy) = file.privacy {
                policy.privacy = PrivacySettings {
                    keep_transcripts: privacy.keep_transcripts.or(policy.privacy.keep_transcripts),
                    transcript_dir: privacy
                        .transcript_dir
                        .or(policy.privacy.transcript_dir.clone()),
                    audit_log: privacy.audit_log.or(policy.privacy.audit_log),
                    max_age_days: privacy.max_age_days.or(policy.privacy.max_age_days),
                    encrypt: privacy.encrypt.or(policy.privacy.encrypt),
                    keep_audio: privacy.keep_audio.or(policy.privacy.keep_audio),
                };
            }
            if let Some(redaction) = file.redaction {
                builtin_redaction = redaction.builtin.unwrap_or(builtin_redaction);
                for pattern in redaction.patterns {
                    if let Err(message) =
                        Redactor::new(false, &[(pattern.name.clone(), pattern.regex.clone())])
                    {
                        return Err(fail(find_line(&text, &pattern.name), message));
                    }
                    patterns.push((pattern.name, pattern.regex));
                }
            }
        }
        policy.redactor =
            Redactor::new(builtin_redaction, &patterns).map_err(|message| PolicyError {
                path: policy.sources.last().cloned().unwrap_or_default(),
                line: None,
                message,
            })?;
        Ok(policy)
    }

    /// The MCP servers the policy names.
    pub fn mcp_servers(&self) -> &BTreeMap<String, McpServerSpec> {
        &self.mcp_servers
    }

    /// Adds MCP servers from outside the policy (the user's config file),
    /// each checked as a policy's would be. A server the policy itself
    /// names keeps the policy's section: the added one is skipped, and its
    /// name returned, so the caller can say so.
    pub fn add_mcp_servers(
        &mut self,
        servers: &BTreeMap<String, McpServerSpec>,
    ) -> Result<Vec<String>, String> {
        let mut skipped = Vec::new();
        for (name, server) in servers {
            check_mcp_server_name(name)?;
            server.check(name)?;
            if self.mcp_servers.contains_key(name) {
                skipped.push(name.clone());
                continue;
            }
            self.mcp_servers.insert(name.clone(), server.clone());
        }
        Ok(skipped)
    }

    /// The decision an `[mcp_servers.NAME]` section makes for `tool`
    /// (`NAME__tool`): its per-tool entry, else its own default; `None`
    /// for a tool of no configured server, or a server without a decision.
    fn mcp_decision(&self, tool: &str) -> Option<Decision> {
        let (server_name, _) = tool.split_once(MCP_TOOL_SEPARATOR)?;
        let server = self.mcp_servers.get(server_name)?;
        let per_tool = server.tools.iter().find(|(name, settings)| {
            settings.decision.is_some() && mcp_tool_name(server_name, name) == tool
        });
        match per_tool {
            Some((name, settings)) => Some(Decision {
                verdict: settings.decision.unwrap_or(Verdict::Ask),
                rule: format!("mcp_servers.{server_name}.tools.{name}"),
                reason: settings.reason.clone(),
            }),
            None => server.decision.map(|verdict| Decision {
                verdict,
                rule: format!("mcp_servers.{server_name}"),
                reason: server.reason.clone(),
            }),
        }
    }

    /// The process sandbox an MCP server runs in: the policy's `[sandbox]`
    /// settings, then the server's own (network `none` unless it says
    /// otherwise; its `read_only` paths added; CPU seconds over its life).
    pub fn mcp_server_sandbox(&self, server: &McpServerSpec) -> ProcessPolicy {
        let mut settings = self.sandbox_defaults.clone();
        settings.network = Some(server.network.clone().unwrap_or(Network::None));
        settings.memory_mb = server.memory_mb.or(settings.memory_mb);
        settings.processes = server.processes.or(settings.processes);
        settings.cpu_seconds = Some(server.cpu_seconds.unwrap_or(600));
        let mut read_only = settings.read_only_paths.take().unwrap_or_default();
        read_only.extend(server.read_only.iter().cloned());
        settings.read_only_paths = Some(read_only);
        process_policy(&settings)
    }

    /// Decides a call by its tool and parsed arguments. A policy narrowed
    /// with [`Policy::within`] takes the stricter of its own decision and
    /// the outer policy's (deny beats ask beats allow; on a tie, the outer
    /// one's rule is named).
    pub fn decide(&self, tool: &str, arguments: &Value, grants: &Grants) -> Decision {
        // A narrowed policy's rule names carry `session:`, so that a grant
        // made for one of its rules never covers the outer policy's rule of
        // the same name (both count `rules[N]` from 0).
        let layer = if self.outer.is_some() { "session:" } else { "" };
        let own = self.decide_own(tool, arguments, grants, layer);
        match &self.outer {
            Some(outer) => {
                let theirs = outer.decide(tool, arguments, grants);
                if own.verdict > theirs.verdict {
                    own
                } else {
                    theirs
                }
            }
            None => own,
        }
    }

    fn decide_own(&self, tool: &str, arguments: &Value, grants: &Grants, layer: &str) -> Decision {
        let strongest = self
            .rules
            .iter()
            .filter(|rule| rule.applies_to(tool) && rule.matches(arguments))
            .max_by(|a, b| {
                a.spec
                    .decision
                    .cmp(&b.spec.decision)
                    .then(b.index.cmp(&a.index))
            });
        let mut decision = match strongest {
            Some(rule) => Decision {
                verdict: rule.spec.decision,
                rule: rule.name(),
                reason: Some(rule.spec.reason.clone()),
            },
            None => match self.tools.get(tool).filter(|t| t.decision.is_some()) {
                Some(settings) => Decision {
                    verdict: settings.decision.unwrap_or(Verdict::Ask),
                    rule: format!("tools.{tool}"),
                    reason: settings.reason.clone(),
                },
                None => self.mcp_decision(tool).unwrap_or_else(|| Decision {
                    verdict: self.defaults.decision.unwrap_or(Verdict::Ask),
                    rule: "defaults".to_string(),
                    reason: self.defaults.reason.clone(),
                }),
            },
        };
        decision.rule.insert_str(0, layer);
        if decision.verdict == Verdict::Ask && grants.covers(tool, &decision.rule) {
            decision.verdict = Verdict::Allow;
            decision.rule.push_str(" (granted)");
        }
        decision
    }

    /// Decides a validated call, asking `approver` when the policy says
    /// `ask` (no approver means deny). An `always` answer adds a grant.
    pub async fn authorize(
        &self,
        call: ValidatedCall,
        approver: Option<&dyn ApprovalHandler>,
        grants: &Grants,
    ) -> Result<AuthorizedCall, Refusal> {
        let tool = call.tool().name.clone();
        let decision = self.decide(&tool, call.arguments(), grants);
        let reason = decision
            .reason
            .clone()
            .unwrap_or_else(|| "no reason given".to_string());
        let approval = match decision.verdict {
            Verdict::Allow => None,
            Verdict::Deny => {
                return Err(Refusal {
                    message: reason,
                    decision,
                    approval: None,
                });
            }
            Verdict::Ask => {
                let Some(approver) = approver else {
                    return Err(Refusal {
                        message: format!(
                            "this call needs approval and no one can approve it here ({reason})"
                        ),
                        decision,
                        approval: None,
                    });
                };
                let request = ApprovalRequest {
                    call_id: call.id().to_string(),
                    tool: tool.clone(),
                    arguments: call.arguments().clone(),
                    rule: decision.rule.clone(),
                    reason: decision.reason.clone(),
                };
                let answer = approver.approve(&request).await;
                match answer {
                    ApprovalAnswer::No => {
                        return Err(Refusal {
                            message: "the user declined this call".to_string(),
                            decision,
                            approval: Some(answer),
                        });
                    }
                    ApprovalAnswer::Always => {
                        grants.add(&tool, &decision.rule);
                    }
                    ApprovalAnswer::Yes => {}
                }
                Some(answer)
            }
        };
        let language = call
            .arguments()
            .get("language")
            .and_then(Value::as_str)
            .map(str::to_string);
        let sandbox = self.sandbox_for(&tool, language.as_deref());
        let path_denials = self
            .rules()
            .iter()
            .chain(self.outer.iter().flat_map(|outer| outer.rules().iter()))
            .filter(|rule| {
                rule.spec.path
                    && rule.spec.decision == Verdict::Deny
                    && matches!(rule.spec.pointer.as_str(), "/path" | "")
                    && rule.applies_to(&tool)
            })
            .cloned()
            .collect();
        Ok(AuthorizedCall {
            call,
            decision,
            approval,
            sandbox,
            path_denials,
        })
    }

    /// The effective sandbox settings for a tool (and language, for code):
    /// defaults, then the language's, then the tool's.
    pub fn sandbox_for(&self, tool: &str, language: Option<&str>) -> SandboxSettings {
        let mut settings = self.sandbox_defaults.clone();
        if let Some(language_settings) = language.and_then(|l| self.sandbox_languages.get(l)) {
            settings = settings.layered(language_settings);
        }
        if let Some(tool_settings) = self.sandbox_tools.get(tool) {
            settings = settings.layered(tool_settings);
        }
        match &self.outer {
            Some(outer) => settings.within(&outer.sandbox_for(tool, language)),
            None => settings,
        }
    }

    /// This policy, narrowed to what `outer` allows: a host (`agent serve`)
    /// lets a client bring its own policy for a session, and the client's
    /// policy can only take rights away. Each call must pass both
    /// ([`Policy::decide`] takes the stricter verdict), each sandbox limit
    /// is the smaller of the two, the network the narrower, the protected
    /// workspace paths the union; budgets take the smaller of each; output
    /// is redacted by both sets of patterns. What only the host decides
    /// comes from `outer` alone: transcripts and the audit log
    /// (`[privacy]`), MCP servers, and extra read-only host paths.
    pub fn within(mut self, outer: std::sync::Arc<Policy>) -> Policy {
        self.budgets = tighter_budgets(&self.budgets, &outer.budgets);
        self.privacy = outer.privacy.clone();
        self.mcp_servers = outer.mcp_servers.clone();
        self.redactor = outer.redactor.merged(&self.redactor);
        self.sources.splice(0..0, outer.sources.iter().cloned());
        self.outer = Some(outer);
        self
    }

    /// Whether this policy was narrowed from another ([`Policy::within`]).
    pub fn outer(&self) -> Option<&Policy> {
        self.outer.as_deref()
    }

    /// The redactor for tool output.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// A fresh budget tracker for a session under this policy.
    pub fn budget_tracker(&self) -> BudgetTracker {
        BudgetTracker::new(self.budgets.clone())
    }

    /// The argument rules, in order.
    pub fn rules(&self) -> &[ArgRule] {
        &self.rules
    }
}

/// The process sandbox policy for these settings (unset ones take the
/// sandbox's defaults).
pub fn process_policy(settings: &SandboxSettings) -> ProcessPolicy {
    let base = ResourceLimits::default();
    ProcessPolicy {
        network: settings.network.clone().unwrap_or_default(),
        limits: ResourceLimits {
            wall_ms: settings.timeout_ms.unwrap_or(base.wall_ms),
            cpu_seconds: settings.cpu_seconds.unwrap_or(base.cpu_seconds),
            memory_bytes: settings.memory_mb.map_or(base.memory_bytes, |mb| mb << 20),
            processes: settings.processes.unwrap_or(base.processes),
            file_size_bytes: settings
                .file_size_mb
                .map_or(base.file_size_bytes, |mb| mb << 20),
            output_bytes: settings.output_bytes.unwrap_or(base.output_bytes),
            disk: disk_budget(settings),
            ..base
        },
        extra_read_only: settings.read_only_paths.clone().unwrap_or_default(),
        protected: protected_paths(settings),
        ..ProcessPolicy::default()
    }
}

/// The process sandbox's disk budget for these settings: the default
/// budget's bounds where unset, none at all with `disk_mb = 0`.
pub fn disk_budget(settings: &SandboxSettings) -> Option<DiskBudget> {
    let default = DiskBudget::default();
    if settings.disk_mb == Some(0) {
        return None;
    }
    Some(DiskBudget {
        bytes: settings.disk_mb.map_or(default.bytes, |mb| mb << 20),
        files: settings.max_files.unwrap_or(default.files).max(1),
    })
}

/// Between a server's name and its tool's in the registry: `time__now`.
pub const MCP_TOOL_SEPARATOR: &str = "__";

/// The registry name of an MCP server's tool: `SERVER__tool`. A name that
/// had to change to fit a tool name (a character other than letters,
/// digits, `_` and `-` replaced by `_`, or cut to the 64 characters OpenAI
/// allows) also gets `_` and 8 hex digits of a hash of the server's own
/// name, so that two tools never share a name (nor a policy entry) because
/// they were cut or sanitized alike.
pub fn mcp_tool_name(server: &str, tool: &str) -> String {
    const LIMIT: usize = 64;
    let sanitized: String = tool
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("{server}{MCP_TOOL_SEPARATOR}{sanitized}");
    if sanitized == tool && name.len() <= LIMIT {
        return name;
    }
    // FNV-1a: stable across runs and builds, which the policy relies on.
    let hash = tool.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let suffix = format!("_{:08x}", hash as u32);
    let mut name = name;
    name.truncate(LIMIT - suffix.len());
    name + &suffix
}

/// A server name: letters, digits, `-` and single `_`, so `NAME__tool`
/// splits back into its server unambiguously.
pub fn check_mcp_server_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !name.contains(MCP_TOOL_SEPARATOR)
        && !name.ends_with('_');
    if valid {
        Ok(())
    } else {
        Err(format!("[mcp_servers.{name}]: a server name is 1-32 letters, digits, `-` or single `_` (not ending in `_`), so that `NAME__tool` names its tools unambiguously"))
    }
}

/// The protected workspace paths of these settings: each list the policy
/// sets replaces its default.
pub fn protected_paths(
    settings: &SandboxSettings,
) -> Vec<(std::path::PathBuf, stack_sandbox::process::ProtectedMode)> {
    stack_sandbox::process::protected_list(
        settings.read_only_in_workspace.as_deref(),
        settings.hidden_in_workspace.as_deref(),
    )
}

/// The WASI sandbox policy for these settings (unset ones take the WASI
/// defaults; read-only paths are mounted at the same path in the guest).
#[cfg(feature = "wasi")]
pub fn wasi_policy(settings: &SandboxSettings) -> stack_sandbox::wasi::WasiPolicy {
    let base = stack_sandbox::wasi::WasiPolicy::default();
    stack_sandbox::wasi::WasiPolicy {
        wall_ms: settings.timeout_ms.unwrap_or(base.wall_ms),
        memory_bytes: settings.memory_mb.map_or(base.memory_bytes, |mb| {
            usize::try_from(mb << 20).unwrap_or(usize::MAX)
        }),
        fuel: base.fuel,
        output_bytes: settings.output_bytes.unwrap_or(base.output_bytes),
        read_only: settings
            .read_only_paths
            .iter()
            .flatten()
            .map(|path| (path.clone(), path.display().to_string()))
            .collect(),
        protected: protected_paths(settings),
        open_files: base.open_files,
        disk: disk_budget(settings),
    }
}

fn layer_tool(base: &ToolSettings, over: &ToolSettings) -> ToolSettings {
    ToolSettings {
        decision: over.decision.or(base.decision),
        reason: over.reason.clone().or_else(|| base.reason.clone()),
    }
}

fn layer_budgets(base: &BudgetSettings, over: &BudgetSettings) -> BudgetSettings {
    BudgetSettings {
        calls_per_turn: over.calls_per_turn.or(base.calls_per_turn),
        calls_per_session: over.calls_per_session.or(base.calls_per_session),
        sandbox_cpu_seconds: over.sandbox_cpu_seconds.or(base.sandbox_cpu_seconds),
        sandbox_wall_seconds: over.sandbox_wall_seconds.or(base.sandbox_wall_seconds),
        result_bytes_to_model: over.result_bytes_to_model.or(base.result_bytes_to_model),
        output_bytes_to_model: over.output_bytes_to_model.or(base.output_bytes_to_model),
        disk_mb: over.disk_mb.or(base.disk_mb),
        files: over.files.or(base.files),
    }
}

/// The smaller of each budget, where either sets it.
fn tighter_budgets(a: &BudgetSettings, b: &BudgetSettings) -> BudgetSettings {
    fn min<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    BudgetSettings {
        calls_per_turn: min(a.calls_per_turn, b.calls_per_turn),
        calls_per_session: min(a.calls_per_session, b.calls_per_session),
        sandbox_cpu_seconds: min(a.sandbox_cpu_seconds, b.sandbox_cpu_seconds),
        sandbox_wall_seconds: min(a.sandbox_wall_seconds, b.sandbox_wall_seconds),
        result_bytes_to_model: min(a.result_bytes_to_model, b.result_bytes_to_model),
        output_bytes_to_model: min(a.output_bytes_to_model, b.output_bytes_to_model),
        disk_mb: min(a.disk_mb, b.disk_mb),
        files: min(a.files, b.files),
    }
}

fn nth_header_line(text: &str, header: &str, nth: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.trim() == header)
        .nth(nth)
        .map(|(index, _)| index + 1)
}

fn find_line(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|line| line.contains(needle))
        .map(|index| index + 1)
}
