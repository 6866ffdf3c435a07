//! `agent mcp`: the sandboxed tools as an MCP server, over stdio or
//! Streamable HTTP (see the `stack-mcp` crate).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use stack_runtime::dispatch::ToolContext;
use stack_runtime::mcp::http::{HttpOptions, McpHttpServer, MCP_PATH};
use stack_runtime::mcp::{McpServers, ServerOptions, ToolService, UnansweredAsk};
use stack_runtime::policy::{AuditLog, Policy};
use stack_runtime::workspace::Workspace;
use tokio_util::sync::CancellationToken;

use crate::tool_cmd::{build_registry, SandboxArg, ToolDirs};

#[derive(Debug, clap::Args)]
pub struct McpArgs {
    /// Serve Streamable HTTP at http://ADDR/mcp instead of stdio. Loopback
    /// addresses only, unless a bearer token is configured.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// The environment variable that holds the bearer token every HTTP
    /// request must carry (`Authorization: Bearer <token>`). Without it
    /// (and without --no-auth) a random token is made and printed.
    #[arg(
        long,
        value_name = "VAR",
        requires = "http",
        conflicts_with = "no_auth"
    )]
    token_env: Option<String>,
    /// Serve HTTP without a bearer token: loopback addresses only, and any
    /// local process (sandboxed code with full network access included)
    /// can then call the tools and answer their approvals.
    #[arg(long, requires = "http")]
    no_auth: bool,
    /// A host name (or host:port) clients may use in `Host` besides the
    /// loopback names (repeatable; HTTP only).
    #[arg(long = "allow-host", value_name = "HOST", requires = "http")]
    allow_hosts: Vec<String>,
    /// Policy every call obeys: a file, or a preset (default, strict,
    /// trusted). Defaults to `default`.
    #[arg(long, value_name = "FILE")]
    policy: Option<String>,
    /// Append audit records (JSONL) to this file.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// The workspace the tools work in (defaults to the current directory).
    #[arg(long, value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Sandbox for code (overrides the policy's backend).
    #[arg(long, value_enum)]
    sandbox: Option<SandboxArg>,
    /// Approve a call the policy asks about when the client cannot be asked
    /// (it did not declare elicitation). Without it such calls are refused.
    #[arg(long)]
    yes: bool,
}

pub fn run(args: McpArgs, dirs: &ToolDirs) -> anyhow::Result<ExitCode> {
    let mut registry = build_registry(dirs);
    let policy = Policy::load_named(args.policy.as_deref().unwrap_or("default"))
        .context("loading the policy")?;
    let policy = with_config_mcp_servers(policy, None)?;
    let (vault, _lease) = crate::chat::policy_vault(&policy)?;
    let audit = match &args.audit_log {
        Some(path) => Some(Arc::new(
            AuditLog::open_with(path, vault)
                .with_context(|| format!("audit log {}", path.display()))?,
        )),
        None => None,
    };
    let root = match &args.workspace {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("no current directory")?,
    };
    let workspace =
        Workspace::open(&root).with_context(|| format!("workspace {}", root.display()))?;
    // Built here, before the async runtime: it finds the process sandbox's
    // helper and compiles (or loads) the WASI interpreters.
    let mut context = ToolContext::new(workspace);
    context.sandbox = args.sandbox.map(SandboxArg::kind);
    let (bearer_token, made_token) = match (&args.token_env, args.no_auth) {
        (Some(var), _) => (
            Some(
                std::env::var(var)
                    .with_context(|| format!("--token-env {var}: the variable is not set"))?,
            ),
            false,
        ),
        (None, true) => (None, false),
        // A token made for this run serves loopback only: a server meant
        // for other hosts gets the token its clients are given.
        (None, false) if args.http.is_some_and(|addr| !addr.ip().is_loopback()) => (None, false),
        (None, false) => (Some(random_token()?), true),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The policy's MCP servers run in the sandbox; their tools are served
    // too, so a client gets them sandboxed and behind this policy.
    let servers = runtime.block_on(attach_mcp_servers(
        &mut registry,
        &policy,
        context.workspace.root(),
        context.process.clone(),
        None,
    ))?;
    let service = ToolService::new(ServerOptions {
        registry: Arc::new(registry),
        policy: Arc::new(policy),
        context,
        unanswered_ask: if args.yes {
            UnansweredAsk::Approve
        } else {
            UnansweredAsk::Deny
        },
        audit,
    });
    runtime.block_on(async move {
        match args.http {
            None => stack_runtime::mcp::serve_stdio(&service)
                .await
                .context("serving MCP over stdio")?,
            Some(addr) => {
                let shutdown = CancellationToken::new();
                let options = HttpOptions {
                    addr,
                    bearer_token: bearer_token.clone(),
                    allowed_hosts: args.allow_hosts,
                };
                let server = McpHttpServer::bind(service, options, shutdown.clone()).await?;
                eprintln!(
                    "agent mcp: serving MCP at http://{}{MCP_PATH}",
                    server.local_addr()
                );
                match (&bearer_token, made_token) {
                    (Some(token), true) => eprintln!(
                        "agent mcp: clients must send `Authorization: Bearer {token}` (a token made for this run; give your own with --token-env VAR)"
                    ),
                    (Some(_), false) => {}
                    (None, _) => eprintln!(
                        "agent mcp: no bearer token (--no-auth): any local process can call these tools"
                    ),
                }
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_stop_signal().await;
                    stop.cancel();
                });
                server.run(shutdown).await?;
            }
        }
        // The servers stop inside the runtime they run on.
        drop(servers);
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
pub async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A fresh 256-bit token, hex-encoded, from the kernel's random source.
pub fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("reading /dev/urandom for a bearer token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `policy` with the MCP servers of the user's config file added (the
/// file at `config`, else the default one when it exists): sessions
/// started from the CLI get them, as if the policy named them. A server
/// the policy names itself keeps the policy's section.
pub fn with_config_mcp_servers(
    mut policy: Policy,
    config: Option<&std::path::Path>,
) -> anyhow::Result<Policy> {
    let (path, missing_ok) = match config {
        Some(path) => (path.to_path_buf(), false),
        None => match stack_runtime::config::default_path() {
            Some(path) => (path, true),
            None => return Ok(policy),
        },
    };
    let user = stack_runtime::config::UserConfig::load(&path, missing_ok)?;
    let skipped = policy
        .add_mcp_servers(&user.mcp_servers)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    for name in skipped {
        eprintln!(
            "note: the policy names an MCP server `{name}` too; the policy's section is used, not the one in {}",
            path.display()
        );
    }
    Ok(policy)
}

/// Starts the MCP servers `policy` names (stdio ones in the process
/// sandbox; HTTP ones are connected to), and adds
/// their tools to `registry`; a server that fails is reported and left out.
pub async fn attach_mcp_servers(
    registry: &mut stack_runtime::tools::Registry,
    policy: &Policy,
    workspace: &std::path::Path,
    sandbox: Option<Arc<stack_runtime::sandbox::process::ProcessSandbox>>,
    only: Option<&str>,
) -> anyhow::Result<McpServers> {
    if policy.mcp_servers().is_empty() {
        return Ok(McpServers::default());
    }
    let stdio = policy.mcp_servers().iter().any(|(name, server)| {
        only.is_none_or(|only| only == name.as_str())
            && matches!(
                server.endpoint(),
                stack_runtime::policy::McpEndpoint::Stdio { .. }
            )
    });
    if stdio && sandbox.is_none() {
        anyhow::bail!(
            "the policy names stdio MCP servers, and they run only in the process sandbox, which is not available here ({})",
            stack_runtime::sandbox::process::ProcessSandbox::locate()
                .err()
                .map_or_else(|| "not configured".to_string(), |e| e.to_string())
        );
    }
    let (servers, errors) =
        McpServers::attach_only(registry, policy, workspace, sandbox, only).await;
    for error in errors {
        eprintln!("warning: {error}");
    }
    Ok(servers)
}
