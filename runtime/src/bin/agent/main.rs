//! `agent`: the Stack Runtime command line.
//!
//! Thin glue over the `stack_runtime` library: argument parsing, printing,
//! exit codes. Subcommands live in their own modules.

mod chat;
mod doctor;
mod eval_cmd;
mod keys_cmd;
mod mcp_cmd;
mod model_cmd;
mod policy_cmd;
mod serve_cmd;
mod tool_cmd;
mod voice_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Stack Runtime: sandboxed tool execution for local models.
#[derive(Debug, Parser)]
#[command(name = "agent", version, about, long_about = None)]
struct Cli {
    /// Extra folders of tool schema files (repeatable).
    #[arg(long = "tools", value_name = "DIR", global = true)]
    tool_dirs: Vec<PathBuf>,

    /// Offer only your own tools: neither the built-in tools nor the tool
    /// folder that ships with the runtime (`--tools` folders, the policy's
    /// MCP servers and host tools still load).
    #[arg(long, global = true)]
    no_default_tools: bool,

    #[command(flatten)]
    chat: chat::ChatArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ExportFormat {
    /// ChatML messages with OpenAI tool_calls, one JSON object per line.
    Chatml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List, inspect and run tools by hand.
    #[command(subcommand)]
    Tool(tool_cmd::ToolCommand),
    /// Send one prompt and print the turn (or `--json` events); reads the
    /// prompt from stdin without `-p`.
    Run {
        /// The prompt.
        #[arg(short, long, conflicts_with = "audio")]
        prompt: Option<String>,
        /// Speak the prompt instead: a WAV file (`-` for stdin), transcribed
        /// locally with the speech model (see --speech-model).
        #[arg(long, value_name = "FILE")]
        audio: Option<PathBuf>,
        /// Stream the events as JSON lines.
        #[arg(long)]
        json: bool,
        /// Approve every call the policy would ask about.
        #[arg(long)]
        yes: bool,
    },
    /// Saved sessions: list (the default), delete, purge, training consent.
    Sessions {
        #[command(subcommand)]
        action: Option<chat::SessionsCommand>,
    },
    /// The key stored data is encrypted with: show it, or rotate it.
    #[command(subcommand)]
    Keys(keys_cmd::KeysCommand),
    /// Write a saved session as a training example.
    Export {
        /// The session id.
        id: String,
        /// Output format.
        #[arg(long, default_value = "chatml")]
        format: ExportFormat,
    },
    /// Load a model and show its metadata.
    Model {
        #[command(flatten)]
        model: model_cmd::ModelArgs,
        /// Print the metadata as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure tool calling: BFCL-format data (--bfcl DIR) and executable
    /// tasks (--tasks FILE), per category, with a per-case log.
    Eval(Box<eval_cmd::EvalArgs>),
    /// Serve the sandboxed tools to MCP clients (stdio, or --http).
    Mcp(mcp_cmd::McpArgs),
    /// Serve the runtime over HTTP: OpenAI-compatible chat completions and
    /// agent sessions, for host apps in any language.
    Serve(Box<serve_cmd::ServeArgs>),
    /// Check policy files and explain their decisions.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCommand),
    /// Show what the kernel offers the sandbox and which guarantees hold.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// A served model to check too (`--model-url`, or a profile).
        #[command(flatten)]
        model: model_cmd::ModelArgs,
    },
}

/// Colours only for a terminal, and never under `NO_COLOR`.
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The log filter when `AGENT_LOG` is not set: warnings, and for the
/// services (`agent mcp`, `agent serve`), whose stderr is their client's or
/// operator's log, the stderr of the MCP servers they run.
fn default_log_filter(command: Option<&Command>) -> &'static str {
    match command {
        Some(Command::Mcp(_) | Command::Serve(_)) => "warn,stack_mcp::server_stderr=info",
        _ => "warn",
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENT_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(default_log_filter(cli.command.as_ref()))
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_on_stderr())
        .init();
    let tool_dirs = tool_cmd::ToolDirs {
        extra: cli.tool_dirs,
        include_default: !cli.no_default_tools,
    };
    let result = match cli.command {
        Some(Command::Tool(command)) => tool_cmd::run(command, &tool_dirs),
        // Model flags written before the subcommand count as after it.
        Some(Command::Doctor { json, model }) => {
            doctor::run(json, &model.or_outer(&cli.chat.model), &cli.chat.policy)
        }
        Some(Command::Model { model, json }) => {
            model_cmd::info(&model.or_outer(&cli.chat.model), json)
        }
        Some(Command::Mcp(args)) => mcp_cmd::run(args, &tool_dirs),
        Some(Command::Serve(mut args)) => {
            args.chat.model = args.chat.model.or_outer(&cli.chat.model);
            serve_cmd::run(*args, &tool_dirs)
        }
        Some(Command::Eval(mut args)) => {
            args.model = args.model.or_outer(&cli.chat.model);
            eval_cmd::run(*args, &tool_dirs)
        }
        Some(Command::Policy(command)) => policy_cmd::run(command, &tool_dirs),
        Some(Command::Run {
            prompt,
            audio,
            json,
            yes,
        }) => chat::run(
            &cli.chat,
            chat::Input::new(prompt, audio),
            json,
            yes,
            &tool_dirs,
        ),
        Some(Command::Sessions { action }) => chat::sessions(&cli.chat.policy, action),
        Some(Command::Keys(command)) => keys_cmd::run(command, &cli.chat.policy),
        Some(Command::Export {
            id,
            format: ExportFormat::Chatml,
        }) => chat::export(&id, &cli.chat.policy),
        None => chat::repl(&cli.chat, &tool_dirs),
    };
    // Every runtime is dropped by now: let the sandboxes' zygotes exit and
    // their cgroups go before this process does.
    stack_runtime::sandbox::process::wait_for_cleanup(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
