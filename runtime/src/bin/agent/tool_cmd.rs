//! `agent tool list | schema | run`: the stable tool CLI contract.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use stack_runtime::dispatch::{SandboxKind, ToolContext};
use stack_runtime::gate::Gate;
use stack_runtime::message::ToolCall;
use stack_runtime::outcome::ToolOutcome;
use stack_runtime::policy::{ApprovalAnswer, ApprovalRequest, AuditLog, Policy};
use stack_runtime::tools::LoadDiagnostic;
use stack_runtime::tools::Registry;
use stack_runtime::workspace::Workspace;

#[derive(Debug, Subcommand)]
pub enum ToolCommand {
    /// List the registered tools.
    List {
        /// Print the tools as an OpenAI `tools` JSON array.
        #[arg(long)]
        json: bool,
        /// Also list the tools of the MCP servers this policy names (a file
        /// or a preset); they are started, in the sandbox, to ask them.
        #[arg(long, value_name = "FILE")]
        policy: Option<String>,
        /// The workspace those servers get (defaults to the current
        /// directory).
        #[arg(long, value_name = "DIR")]
        workspace: Option<PathBuf>,
    },
    /// Print one tool's definition in the OpenAI function format.
    Schema {
        /// The tool's name.
        name: String,
    },
    /// Validate and run one tool call; prints exactly one JSON result object.
    Run {
        /// The tool's name.
        name: String,
        /// The arguments, as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Policy to obey: a file, or a preset (default, strict, trusted).
        /// Without it the `default` preset applies and, since a person typed
        /// the command, its `ask` decisions count as approved.
        #[arg(long, value_name = "FILE")]
        policy: Option<String>,
        /// Append audit records (JSONL) to this file.
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
        /// Session workspace (defaults to the current directory).
        #[arg(long, value_name = "DIR")]
        workspace: Option<PathBuf>,
        /// Sandbox for code.
        #[arg(long, value_enum)]
        sandbox: Option<SandboxArg>,
        /// Approve any call the policy would ask about.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SandboxArg {
    Wasi,
    Process,
}

impl SandboxArg {
    pub fn kind(self) -> SandboxKind {
        match self {
            SandboxArg::Wasi => SandboxKind::Wasi,
            SandboxArg::Process => SandboxKind::Process,
        }
    }
}

/// Which tools to load besides the policy's MCP servers.
pub struct ToolDirs {
    /// `--tools` folders.
    pub extra: Vec<PathBuf>,
    /// The built-in tools and the shipped tool folder (off with
    /// `--no-default-tools`).
    pub include_default: bool,
}

/// The tool folder shipped with the runtime, when it exists on this machine:
/// `$STACK_RUNTIME_TOOLS`, else the repository's `tools/`.
pub fn default_tool_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("STACK_RUNTIME_TOOLS") {
        return Some(PathBuf::from(dir));
    }
    let repo_tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools");
    repo_tools.is_dir().then_some(repo_tools)
}

/// The tools `dirs` name, each schema file's problems printed as a warning.
pub fn build_registry(dirs: &ToolDirs) -> Registry {
    let (registry, diagnostics) = load_registry(dirs);
    for diagnostic in diagnostics {
        eprintln!("warning: {diagnostic}");
    }
    registry
}

/// The tools `dirs` name, and the schema files' problems.
pub fn load_registry(dirs: &ToolDirs) -> (Registry, Vec<LoadDiagnostic>) {
    let mut registry = if dirs.include_default {
        Registry::with_builtins()
    } else {
        Registry::new()
    };
    let mut diagnostics = Vec::new();
    for dir in dirs.folders() {
        diagnostics.extend(registry.load_dir(&dir));
    }
    (registry, diagnostics)
}

impl ToolDirs {
    /// The schema-file folders: the shipped one (unless
    /// `--no-default-tools`), then the `--tools` ones.
    pub fn folders(&self) -> Vec<PathBuf> {
        self.include_default
            .then(default_tool_dir)
            .flatten()
            .into_iter()
            .chain(self.extra.iter().cloned())
            .collect()
    }
}

pub fn run(command: ToolCommand, dirs: &ToolDirs) -> anyhow::Result<ExitCode> {
    let registry = build_registry(dirs);
    match command {
        ToolCommand::List {
            json,
            policy,
            workspace,
        } => {
            let Some(policy) = policy else {
                return list(&registry, json);
            };
            let policy = Policy::load_named(&policy).context("loading the policy")?;
            let policy = crate::mcp_cmd::with_config_mcp_servers(policy, None)?;
            let root = match workspace {
                Some(dir) => dir,
                None => std::env::current_dir().context("no current directory")?,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let mut registry = registry;
            let sandbox = stack_runtime::sandbox::process::ProcessSandbox::locate()
                .ok()
                .map(Arc::new);
            let servers = runtime.block_on(crate::mcp_cmd::attach_mcp_servers(
                &mut registry,
                &policy,
                &root,
                sandbox,
                None,
            ))?;
            let listed = list(&registry, json);
            // The servers (held by their tools) stop inside their runtime.
            runtime.block_on(async move {
                drop(servers);
                drop(registry);
            });
            listed
        }
        ToolCommand::Schema { name } => schema(&registry, &name),
        ToolCommand::Run {
            name,
            args,
            policy,
            audit_log,
            workspace,
            sandbox,
            yes,
        } => {
            let sandbox = sandbox.map(SandboxArg::kind);
            let options = RunOptions {
                policy,
                audit_log,
                workspace,
                sandbox,
                yes,
            };
            let report = run_tool(registry, &name, args, options);
            let mut stdout = std::io::stdout().lock();
            serde_json::to_writer(&mut stdout, &report).context("writing the result")?;
            writeln!(stdout).context("writing the result")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn list(registry: &Registry, json: bool) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &registry.openai_tools())?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let width = registry
        .tools()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(out, "{:width$}  {:8}  DESCRIPTION", "NAME", "EXECUTOR")?;
    for tool in registry.tools() {
        let description = tool.description.lines().next().unwrap_or("");
        writeln!(
            out,
            "{:width$}  {:8}  {description}",
            tool.name,
            tool.executor.kind()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn schema(registry: &Registry, name: &str) -> anyhow::Result<ExitCode> {
    let Some(tool) = registry.get(name) else {
        let call = ToolCall::function("schema", name, "{}");
        let message = registry
            .validate(&call)
            .err()
            .map_or_else(|| format!("unknown tool `{name}`"), |e| e.to_string());
        eprintln!("error: {message}");
        return Ok(ExitCode::FAILURE);
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &tool.spec().to_openai())?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// The one JSON object `agent tool run` prints.
#[derive(Serialize)]
struct RunReport {
    tool: String,
    #[serde(flatten)]
    outcome: ToolOutcome,
}

struct RunOptions {
    policy: Option<String>,
    audit_log: Option<PathBuf>,
    workspace: Option<PathBuf>,
    sandbox: Option<SandboxKind>,
    yes: bool,
}

fn approve_all(_: &ApprovalRequest) -> ApprovalAnswer {
    ApprovalAnswer::Yes
}

fn run_tool(mut registry: Registry, name: &str, args: String, options: RunOptions) -> RunReport {
    let report = |outcome| RunReport {
        tool: name.to_string(),
        outcome,
    };
    // With an explicit policy, `ask` is a denial unless --yes; without one,
    // the default preset applies and the person at the terminal approves.
    let (policy, approve) = match &options.policy {
        Some(policy) => (Policy::load_named(policy), options.yes),
        None => (Policy::preset("default"), true),
    };
    let policy = match policy {
        Ok(policy) => policy,
        Err(err) => return report(ToolOutcome::internal_error(format!("policy: {err}"))),
    };
    let policy = match crate::mcp_cmd::with_config_mcp_servers(policy, None) {
        Ok(policy) => policy,
        Err(err) => return report(ToolOutcome::internal_error(format!("config: {err:#}"))),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return report(ToolOutcome::internal_error(format!(
                "cannot start the async runtime: {err}"
            )))
        }
    };
    let root = match options.workspace {
        Some(dir) => dir,
        None => match std::env::current_dir() {
            Ok(dir) => dir,
            Err(err) => {
                return report(ToolOutcome::internal_error(format!(
                    "no current directory: {err}"
                )))
            }
        },
    };
    let workspace = match Workspace::open(&root) {
        Ok(workspace) => workspace,
        Err(err) => return report(ToolOutcome::internal_error(err.to_string())),
    };
    let mut ctx = ToolContext::new(workspace);
    ctx.sandbox = options.sandbox;
    // The policy's MCP servers are started only when the tool is theirs,
    // in the sandbox and workspace the call gets.
    let servers = if name.contains(stack_runtime::policy::MCP_TOOL_SEPARATOR) {
        let server = name.split(stack_runtime::policy::MCP_TOOL_SEPARATOR).next();
        match runtime.block_on(crate::mcp_cmd::attach_mcp_servers(
            &mut registry,
            &policy,
            ctx.workspace.root(),
            ctx.process.clone(),
            server,
        )) {
            Ok(servers) => Some(servers),
            Err(err) => return report(ToolOutcome::internal_error(format!("{err:#}"))),
        }
    } else {
        None
    };
    let vault = match crate::chat::policy_vault(&policy) {
        Ok((vault, lease)) => (vault, lease),
        Err(err) => return report(ToolOutcome::internal_error(format!("{err:#}"))),
    };
    let mut gate = Gate::new(Arc::new(registry), Arc::new(policy), "cli");
    if approve {
        gate = gate.with_approver(Arc::new(approve_all));
    }
    if let Some(path) = &options.audit_log {
        match AuditLog::open_with(path, Arc::clone(&vault.0)) {
            Ok(log) => gate = gate.with_audit_log(Arc::new(log)),
            Err(err) => {
                return report(ToolOutcome::internal_error(format!(
                    "audit log {}: {err}",
                    path.display()
                )))
            }
        }
    }
    let call = ToolCall::function("cli", name, args);
    let outcome = runtime.block_on(gate.call(&call, &ctx));
    // The servers stop inside the runtime they run on.
    runtime.block_on(async move { drop(servers) });
    report(outcome)
}
