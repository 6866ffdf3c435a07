//! `agent serve`: the runtime as a local HTTP service (see the
//! `stack-serve` crate): OpenAI-compatible chat completions and agent
//! sessions on the model the flags choose.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use stack_runtime::serve::{ServeOptions, Server};
use tokio_util::sync::CancellationToken;

use crate::chat::{build_runtime, ChatArgs};
use crate::mcp_cmd::{random_token, wait_for_stop_signal};
use crate::tool_cmd::ToolDirs;

/// The environment variable that holds the bearer token.
pub const TOKEN_ENV: &str = "STACK_RUNTIME_TOKEN";

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The address to listen on. Anything but loopback needs a token you
    /// give (STACK_RUNTIME_TOKEN or --token-file).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// The port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// A file whose first line is the bearer token (else
    /// STACK_RUNTIME_TOKEN, else one is made for this run and printed).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A folder sessions' workspaces must lie in (repeatable; the first is
    /// the default workspace). Default: --workspace, or the current folder.
    #[arg(long = "workspace-root", value_name = "DIR")]
    workspace_roots: Vec<PathBuf>,
    /// Most open sessions.
    #[arg(long, default_value_t = 16)]
    max_sessions: usize,
    /// Most generations (completions and turns) at once.
    #[arg(long, default_value_t = 4)]
    max_running: usize,
    /// Most requests waiting for a generation; more get 429.
    #[arg(long, default_value_t = 32)]
    max_queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Longest a turn may run, in seconds, before it is cancelled.
    #[arg(long, default_value_t = 600)]
    turn_timeout: u64,
    /// At shutdown (SIGTERM, Ctrl-C), how long running turns get to
    /// finish, in seconds, before they are cancelled and every session is
    /// saved.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
    /// Take spoken input: load the speech model (--speech-model, which
    /// implies this, else the default) for `POST /v1/audio/transcriptions`
    /// and turns with `audio`.
    #[arg(long)]
    voice: bool,
    #[command(flatten)]
    pub chat: ChatArgs,
}

/// The token and whether the operator gave it.
fn bearer_token(args: &ServeArgs) -> anyhow::Result<(String, bool)> {
    if let Some(file) = &args.token_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--token-file {}", file.display()))?;
        let token = text.lines().next().unwrap_or_default().trim().to_string();
        return Ok((token, true));
    }
    match std::env::var(TOKEN_ENV) {
        Ok(token) if !token.is_empty() => Ok((token, true)),
        _ => Ok((random_token()?, false)),
    }
}

pub fn run(mut args: ServeArgs, dirs: &ToolDirs) -> anyhow::Result<ExitCode> {
    // One slot of the batched context per generation that may run at once.
    args.chat
        .model
        .parallel
        .get_or_insert(args.max_running as u32);
    let (token, token_given) = bearer_token(&args)?;
    // A speech model named is one asked for.
    let voice = args.voice || args.chat.voice.speech_model.is_some();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (runtime, session_defaults) =
        build_runtime(&args.chat, dirs, None, false, Some("serve"), voice, &tokio)?;
    let roots = if args.workspace_roots.is_empty() {
        vec![match &args.chat.workspace {
            Some(dir) => dir.clone(),
            None => std::env::current_dir().context("no current folder")?,
        }]
    } else {
        args.workspace_roots.clone()
    };
    let options = ServeOptions {
        addr: SocketAddr::new(args.host, args.port),
        token_given,
        workspace_roots: roots,
        max_body_bytes: args.max_body_bytes,
        max_sessions: args.max_sessions,
        max_running: args.max_running,
        max_queue: args.max_queue,
        turn_timeout: Duration::from_secs(args.turn_timeout.max(1)),
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        session_defaults,
        ..ServeOptions::new(token.clone(), PathBuf::new())
    };
    let model = runtime.backend().info().name;
    tokio.block_on(async move {
        let server = Server::bind(Arc::new(runtime), options).await?;
        eprintln!(
            "agent serve: listening on http://{} ({model}: OpenAI API under /v1, sessions under /v1/sessions, /metrics, /health)",
            server.local_addr()
        );
        if !token_given {
            eprintln!(
                "agent serve: clients must send `Authorization: Bearer {token}` (made for this run; give your own with {TOKEN_ENV} or --token-file)"
            );
        }
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            wait_for_stop_signal().await;
            eprintln!("agent serve: stopping (running turns get a grace period)");
            stop.cancel();
        });
        server.run(shutdown).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
