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
    /// Show how a policy decides one call, and the sandbox settings it
    /// gets; with `--host`, whether sandboxed code may reach that host.
    Explain {
        /// A policy file or a preset name.
        file: String,
        /// The tool (with `--host`: whose sandbox section applies; the
        /// defaults when left out).
        #[arg(long, required_unless_present = "host")]
        tool: Option<String>,
        /// The arguments, as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// A host (`pypi.org`, `pypi.org:443`, `10.0.0.7`): the network
        /// decision sandboxed code gets for it, names resolved as the
        /// egress proxy would (port 443 unless given).
        #[arg(long)]
        host: Option<String>,
        /// With `--host`: the language whose sandbox section applies.
        #[arg(long)]
        language: Option<String>,
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
        PolicyCommand::Explain {
            file,
            tool,
            args,
            host,
            language,
        } => {
            let policy = match Policy::load_named(&file) {
                Ok(policy) => policy,
                Err(err) => {
                    eprintln!("error: {err}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            if let Some(host) = host {
                return explain_host(&policy, tool.as_deref(), language.as_deref(), &host);
            }
            let Some(tool) = tool else {
                anyhow::bail!("--tool is required without --host");
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

/// `agent policy explain FILE --host HOST[:PORT]`: the egress decision for
/// one host under the sandbox section that applies.
fn explain_host(
    policy: &Policy,
    tool: Option<&str>,
    language: Option<&str>,
    host: &str,
) -> anyhow::Result<ExitCode> {
    use stack_runtime::sandbox::process::Network;
    let (name, port) =
        stack_runtime::egress::rules::split_host_port(host).map_err(anyhow::Error::msg)?;
    let port = port.unwrap_or(443);
    let sandbox = policy.sandbox_for(tool.unwrap_or(""), language);
    let network = sandbox.network.clone().unwrap_or_default();
    let section = match (tool, language) {
        (Some(tool), _) => format!("[sandbox.tools.{tool}]"),
        (None, Some(language)) => format!("[sandbox.languages.{language}]"),
        (None, None) => "[sandbox]".to_string(),
    };
    let wasi = sandbox.backend == Some(stack_runtime::policy::Backend::Wasi);
    let report = match &network {
        _ if wasi => serde_json::json!({
            "decision": "refused",
            "rule": "this section runs code in WASI, whose guests have no network at all",
        }),
        Network::Allowlist(list) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match runtime.block_on(stack_runtime::egress::vet(list, name, port)) {
                Ok(vetted) => serde_json::json!({
                    "decision": "allowed",
                    "rule": vetted.rule,
                    "resolved": vetted.resolved,
                    "connects_to": vetted.usable,
                }),
                Err(refused) => serde_json::json!({
                    "decision": refused.decision,
                    "rule": refused.refusal.rule,
                    "resolved": refused.resolved,
                }),
            }
        }
        Network::Full => serde_json::json!({
            "decision": "allowed",
            "rule": "network = \"full\": every host, no proxy",
        }),
        Network::Loopback => serde_json::json!({
            "decision": "refused",
            "rule": "network = \"loopback\": the sandbox's own loopback only",
        }),
        Network::None => serde_json::json!({
            "decision": "refused",
            "rule": "network = \"none\"",
        }),
    };
    let mut report = report;
    report["host"] = serde_json::json!(name);
    report["port"] = serde_json::json!(port);
    report["section"] = serde_json::json!(section);
    report["network"] = serde_json::json!(network.describe());
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(ExitCode::SUCCESS)
}
