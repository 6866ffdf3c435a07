//! `agent policy check | explain`.

use std::process::ExitCode;

use clap::Subcommand;
use stack_runtime::message::ToolCall;
use stack_runtime::policy::{process_policy, Grants, Policy};

use crate::tool_cmd::{build_registry, ToolDirs};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check a policy file (and what it extends); report file:line on errors.
    Check {
        /// A policy file or a preset name.
        file: String,
    },
    /// Show how a policy decides one call, and the sandbox settings it gets.
    Explain {
        /// A policy file or a preset name.
        file: String,
        /// The tool.
        #[arg(long)]
        tool: String,
        /// The arguments, as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
    },
}

pub fn run(command: PolicyCommand, dirs: &ToolDirs) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check { file } => match Policy::load_named(&file) {
            Ok(policy) => {
                let chain: Vec<String> = policy
                    .sources
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                println!("ok: {}", chain.join(" <- "));
                if let Some(description) = &policy.description {
                    println!("{description}");
                }
                println!("{} argument rule(s)", policy.rules().len());
                Ok(ExitCode::SUCCESS)
            }
            Err(err) => {
                eprintln!("error: {err}");
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Explain { file, tool, args } => {
            let policy = match Policy::load_named(&file) {
                Ok(policy) => policy,
                Err(err) => {
                    eprintln!("error: {err}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            let mut registry = build_registry(dirs);
            // An MCP server's tool: that server is started (in the sandbox)
            // to learn its schema.
            let server = tool
                .split_once(stack_runtime::policy::MCP_TOOL_SEPARATOR)
                .and_then(|(server, _)| {
                    policy.mcp_servers().get(server).map(|spec| (server, spec))
                });
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let servers = match server {
                Some((name, _)) => Some(
                    runtime.block_on(crate::mcp_cmd::attach_mcp_servers(
                        &mut registry,
                        &policy,
                        &std::env::current_dir()?,
                        stack_runtime::sandbox::process::ProcessSandbox::locate()
                            .ok()
                            .map(std::sync::Arc::new),
                        Some(name),
                    ))?,
                ),
                None => None,
            };
            let validated = registry.validate(&ToolCall::function("explain", &tool, &args));
            runtime.block_on(async move {
                drop(servers);
            });
            let validated = match validated {
                Ok(validated) => validated,
                Err(err) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "tool": tool,
                            "decision": "invalid",
                            "error": err.to_string(),
                        }))?
                    );
                    return Ok(ExitCode::SUCCESS);
                }
            };
            let decision = policy.decide(&tool, validated.arguments(), &Grants::default());
            let language = validated
                .arguments()
                .get("language")
                .and_then(|l| l.as_str());
            let sandbox = policy.sandbox_for(&tool, language);
            // An MCP tool runs in its server's sandbox, not a call's.
            let process = match server {
                Some((_, spec)) => policy.mcp_server_sandbox(spec),
                None => process_policy(&sandbox),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "tool": tool,
                    "decision": decision.verdict,
                    "rule": decision.rule,
                    "reason": decision.reason,
                                        "sandbox": match server {
                        // Its server's own sandbox, for the server's life.
                        Some((name, spec)) => serde_json::json!({
                            "mcp_server": name,
                            "read_only_paths": process.extra_read_only,
                            "call_timeout_ms": spec.timeout_ms.unwrap_or(60_000),
                        }),
                        None => serde_json::to_value(&sandbox)?,
                    },
                    "process_limits": process.limits,
                    "network": process.network,
                }))?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
