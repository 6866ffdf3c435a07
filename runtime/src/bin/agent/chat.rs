//! The conversational commands: the `agent` REPL, `agent run`, `agent
//! sessions` and `agent export`.

use futures::StreamExt;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use stack_runtime::agent::store::SessionStore;
use stack_runtime::agent::GroundingMode;
use stack_runtime::agent::{
    list_sessions, Event, Runtime, Session, SessionConfig, TurnEnd, TurnTimings,
};
use stack_runtime::model::llama::SamplingOptions;
use stack_runtime::model::{Routing, ToolChoice, MAX_DRY_MULTIPLIER};
use stack_runtime::outcome::Status;
use stack_runtime::policy::{ApprovalAnswer, ApprovalHandler, ApprovalRequest, Policy};
use stack_runtime::text::{for_terminal, one_line};

use crate::model_cmd::{self, ModelArgs};
use crate::tool_cmd::ToolDirs;

/// Flags shared by the REPL and `agent run`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Keep no transcript, KV state, history or audit log, whatever the
    /// policy says (the REPL's user said no when asked).
    #[arg(skip)]
    pub keep_nothing: bool,
    /// Policy: a file or a preset (default, strict, trusted).
    #[arg(long, default_value = "default")]
    pub policy: String,
    /// Session workspace (default: the current folder).
    #[arg(long, value_name = "DIR")]
    pub workspace: Option<PathBuf>,
    /// Resume a saved session.
    #[arg(long, value_name = "ID")]
    pub resume: Option<String>,
    /// Tool choice for the first step of each turn: auto, none, required or a tool name.
    #[arg(long, default_value = "auto")]
    pub tool_choice: String,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u32,
    /// DRY penalty on repeating what a model step already wrote, 0 (off)
    /// to 1 (llama.cpp's DRY sampler; in process only). Default: 0.8 for a
    /// model under 1B parameters, such as the default, else off.
    #[arg(long, value_name = "X", value_parser = dry_multiplier)]
    pub dry_multiplier: Option<f32>,
    /// Most tokens per model step.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: u32,
    /// Most model steps per turn.
    #[arg(long, default_value_t = 8)]
    pub max_steps: u32,
    /// The system prompt (default: one that says tools can read and write
    /// files and run code; an empty one sends none).
    #[arg(long, value_name = "TEXT", conflicts_with = "system_file")]
    pub system: Option<String>,
    /// Read the system prompt from a file.
    #[arg(long, value_name = "FILE")]
    pub system_file: Option<PathBuf>,
    /// How the model decides to call a tool under `--tool-choice auto`:
    /// `free` (it writes a call when it chooses), `constrained` (a step
    /// first weighs whether any tool fits and picks one), or `auto`
    /// (`constrained` for an in-process model under 1B parameters, such as
    /// the default, `free` otherwise).
    #[arg(long, value_enum, default_value_t = RoutingArg::Auto)]
    pub routing: RoutingArg,
    /// How far the call grammar grounds the built-in tools' arguments:
    /// `workspace` (paths that must exist are ones that do), `request`
    /// (also a new file's path and text, and a search pattern, copied from
    /// your words; for small models), `auto` (`request` for an in-process
    /// model under 1B parameters, such as the default, `workspace`
    /// otherwise), or `off`.
    #[arg(long, value_enum, default_value_t = GroundingArg::Auto)]
    pub grounding: GroundingArg,
    #[command(flatten)]
    pub voice: crate::voice_cmd::VoiceArgs,
}

/// What `agent run` sends: typed text (`-p`, or stdin), or speech
/// (`--audio FILE|-`).
pub struct Input {
    prompt: Option<String>,
    audio: Option<PathBuf>,
}

impl Input {
    /// From the flags.
    pub fn new(prompt: Option<String>, audio: Option<PathBuf>) -> Input {
        Input { prompt, audio }
    }
}

/// A turn's message, ready to send.
enum Said {
    Typed(String),
    Spoken(
        Box<stack_runtime::voice::Transcription>,
        stack_runtime::voice::Audio,
    ),
}

/// `--routing`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RoutingArg {
    /// The model writes a call when it chooses to.
    Free,
    /// A step first weighs whether any tool fits, then picks one (in
    /// process).
    Constrained,
    /// `constrained` for an in-process model under 1B parameters, `free`
    /// otherwise.
    Auto,
}

/// `--grounding`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GroundingArg {
    /// Every parameter as its schema has it.
    Off,
    /// Paths that must exist (read_file, list_dir, search_files) are ones
    /// that do; write_file's path stays inside the workspace, and code
    /// (execute_code) never ends open, in `(` or `,`.
    Workspace,
    /// Also write_file's path and text, and search_files' pattern, are
    /// copied from the request (for small models: a file's text can then
    /// only be words of the request).
    Request,
    /// `request` for an in-process model under 1B parameters, `workspace`
    /// otherwise.
    Auto,
}

impl From<GroundingArg> for GroundingMode {
    fn from(arg: GroundingArg) -> Self {
        match arg {
            GroundingArg::Off => GroundingMode::Off,
            GroundingArg::Workspace => GroundingMode::Workspace,
            GroundingArg::Request => GroundingMode::Request,
            GroundingArg::Auto => GroundingMode::Auto,
        }
    }
}

/// Parses `--dry-multiplier`: a finite number from 0 to
/// [`MAX_DRY_MULTIPLIER`].
pub fn dry_multiplier(text: &str) -> Result<f32, String> {
    match text.trim().parse::<f32>() {
        Ok(value) if (0.0..=MAX_DRY_MULTIPLIER).contains(&value) => Ok(value),
        Ok(_) => Err(format!(
            "the DRY multiplier must be from 0 (off) to {MAX_DRY_MULTIPLIER}"
        )),
        Err(err) => Err(format!("not a number: {err}")),
    }
}

impl From<RoutingArg> for Routing {
    fn from(arg: RoutingArg) -> Self {
        match arg {
            RoutingArg::Free => Routing::Free,
            RoutingArg::Constrained => Routing::Constrained,
            RoutingArg::Auto => Routing::Auto,
        }
    }
}

impl ChatArgs {
    /// The system prompt the flags ask for; `None` inside means none at all.
    pub fn system_prompt(&self) -> anyhow::Result<Option<Option<String>>> {
        let text = match (&self.system, &self.system_file) {
            (Some(text), _) => text.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("reading the system prompt from {}", path.display()))?,
            (None, None) => return Ok(None),
        };
        Ok(Some((!text.trim().is_empty()).then_some(text)))
    }
}

fn tool_choice(text: &str) -> ToolChoice {
    match text {
        "auto" => ToolChoice::Auto,
        "none" => ToolChoice::None,
        "required" => ToolChoice::Required,
        name => ToolChoice::Named(name.to_string()),
    }
}

fn build(
    args: &ChatArgs,
    dirs: &ToolDirs,
    approver: Option<Arc<dyn ApprovalHandler>>,
    quiet: bool,
    tokio: &tokio::runtime::Runtime,
) -> anyhow::Result<(Runtime, Session, SessionConfig)> {
    let (runtime, config) = build_runtime(args, dirs, approver, quiet, None, false, tokio)?;
    let session = tokio.block_on(runtime.session(config.clone()))?;
    Ok((runtime, session, config))
}

/// The runtime the flags describe (model, tools, the policy's MCP servers,
/// policy, workspace), and the session settings they ask for. With
/// `transcript_subfolder`, transcripts (and the audit log) go to that
/// subfolder of the policy's transcript folder: `agent serve` keeps its
/// clients' sessions apart from the REPL's.
pub fn build_runtime(
    args: &ChatArgs,
    dirs: &ToolDirs,
    approver: Option<Arc<dyn ApprovalHandler>>,
    quiet: bool,
    transcript_subfolder: Option<&str>,
    with_speech: bool,
    tokio: &tokio::runtime::Runtime,
) -> anyhow::Result<(Runtime, SessionConfig)> {
    let policy = Policy::load_named(&args.policy).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let policy = crate::mcp_cmd::with_config_mcp_servers(policy, args.model.config.as_deref())?;
    let backend = model_cmd::backend(&args.model, quiet, tokio)?;
    let workspace = match &args.workspace {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("no current folder")?,
    };
    let system_prompt = args.system_prompt()?;
    let mut builder = Runtime::builder()
        .backend(backend)
        .builtin_tools(dirs.include_default)
        .workspace(workspace.clone());
    for dir in dirs.folders() {
        builder = builder.tool_dir(&dir);
    }
    // The policy's MCP servers, started in the sandbox; their tools live
    // (and the servers with them) as long as the runtime's registry. They
    // are attached beside the tools the runtime will hold (the built-ins,
    // the schema files), so that a server tool whose name one of those has
    // is skipped with a warning, as in `agent mcp`, rather than failing
    // the build.
    // (The schema files' problems are the runtime's to report, when it
    // loads them; without MCP servers nothing is loaded here.)
    if !policy.mcp_servers().is_empty() {
        let (mut mcp_tools, _) = crate::tool_cmd::load_registry(dirs);
        let _servers = tokio.block_on(crate::mcp_cmd::attach_mcp_servers(
            &mut mcp_tools,
            &policy,
            &workspace,
            stack_runtime::sandbox::process::ProcessSandbox::locate()
                .ok()
                .map(Arc::new),
            None,
        ))?;
        for spec in mcp_tools.tools() {
            if matches!(spec.origin, stack_runtime::tools::ToolOrigin::Mcp { .. }) {
                builder = builder.tool(spec.clone());
            }
        }
    }
    if let (Some(folder), Some(dir)) = (
        transcript_subfolder,
        policy.privacy.transcript_dir.as_deref(),
    ) {
        builder = builder.transcripts(Some(stack_runtime::agent::expand_home(dir).join(folder)));
    }
    if args.keep_nothing {
        builder = builder.transcripts(None).audit_log(None);
    }
    let mut builder = builder.policy(policy);
    if with_speech {
        builder = crate::voice_cmd::with_speech_model(builder, &args.voice)?;
    }
    if let Some(approver) = approver {
        builder = builder.approval_handler(approver);
    }
    let runtime = builder.build()?;
    for diagnostic in runtime.diagnostics() {
        eprintln!("warning: {diagnostic}");
    }
    // `[privacy] max_age_days`: what has expired goes before anything new
    // is kept.
    match tokio.block_on(runtime.purge_expired()) {
        Ok(Some(removed)) if !removed.sessions.is_empty() && !quiet => eprintln!(
            "purged {} session(s) older than the policy's max_age_days",
            removed.sessions.len()
        ),
        Ok(_) => {}
        Err(err) => eprintln!("warning: purging expired sessions: {err}"),
    }
    let config = SessionConfig {
        tool_choice: tool_choice(&args.tool_choice),
        sampling: SamplingOptions {
            temperature: args.temperature,
            seed: args.seed,
            dry_multiplier: args.dry_multiplier,
            max_tokens: args.max_tokens,
            routing: args.routing.into(),
            ..SamplingOptions::default()
        },
        max_steps: args.max_steps,
        resume: args.resume.clone(),
        grounding: args.grounding.into(),
        ..SessionConfig::default()
    };
    let config = match system_prompt {
        Some(system_prompt) => SessionConfig {
            system_prompt,
            ..config
        },
        None => config,
    };
    Ok((runtime, config))
}

fn approve_all(_: &ApprovalRequest) -> ApprovalAnswer {
    ApprovalAnswer::Yes
}

/// `agent run`: one prompt, no terminal needed; events as text or JSONL.
pub fn run(
    args: &ChatArgs,
    input: Input,
    json: bool,
    yes: bool,
    dirs: &ToolDirs,
) -> anyhow::Result<ExitCode> {
    // Speech is checked and transcribed before the model loads: bad audio
    // fails fast, and the two never compute at once.
    let message = match (input.prompt, input.audio) {
        (_, Some(path)) => {
            let audio = crate::voice_cmd::read_audio(&path, &args.voice.limits())?;
            let heard = crate::voice_cmd::Ears::default()
                .transcribe(&args.voice, &audio)
                .with_context(|| format!("transcribing {}", path.display()))?;
            Said::Spoken(Box::new(heard), audio)
        }
        (Some(prompt), None) => Said::Typed(prompt),
        (None, None) => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading the prompt from stdin")?;
            Said::Typed(text)
        }
    };
    if let Said::Typed(prompt) = &message {
        if prompt.trim().is_empty() {
            anyhow::bail!(
                "no prompt: give -p TEXT, pipe one on stdin, or speak one with --audio FILE"
            );
        }
    }
    let approver: Option<Arc<dyn ApprovalHandler>> = if yes {
        Some(Arc::new(approve_all))
    } else {
        None
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (_runtime, session, _) = build(args, dirs, approver, json, &tokio)?;
    let ended = tokio.block_on(async {
        let turn = match message {
            Said::Typed(prompt) => session.send(prompt),
            Said::Spoken(heard, audio) => {
                let text = heard.text.clone();
                session.send_spoken(*heard, text, Some(audio))
            }
        };
        let ended = show_turn(turn, json, true).await;
        save_before_exit(&session).await;
        ended
    });
    Ok(if ended == Some(TurnEnd::Error) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Saves the KV cache (for a later `--resume`) and waits for it: dropping
/// the session only starts the save, which the process would not wait for.
async fn save_before_exit(session: &Session) {
    if let Err(err) = session.save_state().await {
        eprintln!("warning: the KV cache was not saved ({err}); a resumed session evaluates its prompt again");
    }
}

/// Runs one turn, printing its events; Ctrl-C cancels it (the turn still
/// ends with its `turn_finished` event). Returns why it ended.
async fn show_turn(
    mut turn: stack_runtime::agent::Turn,
    json: bool,
    echo_transcribed: bool,
) -> Option<TurnEnd> {
    let cancel = turn.cancellation();
    let printer = async {
        let mut printer = Printer::new(json);
        printer.echo_transcribed = echo_transcribed;
        let mut ended = None;
        while let Some(event) = turn.next().await {
            if let Event::TurnFinished { reason, .. } = &event {
                ended = Some(*reason);
            }
            printer.show(&event);
        }
        ended
    };
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_ok() {
            cancel.cancel();
            if !json {
                eprintln!("\n(cancelling)");
            }
        }
        std::future::pending::<()>().await
    };
    tokio::pin!(printer);
    tokio::select! {
        ended = &mut printer => ended,
        () = interrupt => printer.await,
    }
}

/// Prints events for a person (colour, truncation) or as JSON lines.
struct Printer {
    json: bool,
    /// Whether a `transcribed` event is shown (the REPL showed it already).
    echo_transcribed: bool,
    color: bool,
    in_text: bool,
}

impl Printer {
    fn new(json: bool) -> Self {
        Printer {
            json,
            echo_transcribed: true,
            color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            in_text: false,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn show(&mut self, event: &Event) {
        let mut out = std::io::stdout().lock();
        if self.json {
            let _ = writeln!(out, "{}", serde_json::to_string(event).unwrap_or_default());
            let _ = out.flush();
            return;
        }
        match event {
            Event::Transcribed { .. } if !self.echo_transcribed => {}
            Event::Transcribed { transcription } => {
                let _ = writeln!(
                    out,
                    "{}",
                    self.paint("2", &crate::voice_cmd::describe(transcription))
                );
            }
            Event::Token { text } => {
                let _ = write!(out, "{}", self.paint("32", &for_terminal(text)));
                self.in_text = true;
            }
            Event::AssistantMessage { .. } => {
                if self.in_text {
                    let _ = writeln!(out);
                    self.in_text = false;
                }
            }
            Event::ToolCallProposed { call, .. } => {
                let pretty = serde_json::from_str::<serde_json::Value>(&call.function.arguments)
                    .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                    .unwrap_or_else(|_| call.function.arguments.clone());
                let _ = writeln!(
                    out,
                    "{} {}",
                    self.paint("1;36", &format!("⚙ {}", one_line(&call.function.name))),
                    for_terminal(&truncate(&pretty, 600))
                );
            }
            Event::ApprovalNeeded { .. } | Event::ToolStarted { .. } => {}
            Event::Egress { record, .. } => {
                let colour = if record.decision == stack_runtime::EgressDecision::Allowed {
                    "2"
                } else {
                    "33"
                };
                let _ = writeln!(
                    out,
                    "  {}",
                    self.paint(colour, &format!("⇄ {}", for_terminal(&record.summary())))
                );
            }
            Event::ToolFinished { name, outcome, .. } => {
                let status = outcome.status.as_str();
                let colour = if outcome.status == Status::Ok {
                    "32"
                } else {
                    "31"
                };
                let _ = writeln!(
                    out,
                    "  {} {} ({} ms)",
                    self.paint(colour, &format!("→ {status}")),
                    one_line(name),
                    outcome.duration_ms
                );
                let body = if outcome.status == Status::Ok {
                    outcome.stdout.clone()
                } else {
                    outcome.to_model_text()
                };
                for line in truncate(&body, 800).lines().take(12) {
                    let _ = writeln!(out, "    {}", self.paint("2", &for_terminal(line)));
                }
            }
            Event::TurnFinished {
                reason,
                steps,
                counters,
                timings,
            } => {
                let _ = writeln!(
                    out,
                    "{}",
                    self.paint("2", &format!("[{reason}; {steps} step(s); {} prompt tokens evaluated, {} reused, {} generated; {}]", counters.prompt_evaluated, counters.prompt_reused, counters.generated, time_spent(timings)))
                );
                if *reason == TurnEnd::TokenLimit {
                    let _ = writeln!(
                        out,
                        "{}",
                        self.paint("33", "the reply was cut off at the token limit (--max-tokens, or the end of the context): raise it to let the model finish")
                    );
                }
            }
            Event::Error { message } => {
                let _ = writeln!(
                    out,
                    "{}",
                    self.paint("31", &format!("error: {}", for_terminal(message)))
                );
            }
        }
        let _ = out.flush();
    }
}

/// Where a turn's time went, in seconds: "2.41 s: routing 0.52, prompt
/// 0.20, generation 1.30 (sampling 0.04), tools 0.31, other 0.08"; parts
/// that took no time are left out.
fn time_spent(timings: &TurnTimings) -> String {
    let seconds = |ms: f64| ms / 1000.0;
    let mut parts = Vec::new();
    for (name, ms) in [
        ("grounding", timings.grounding_ms),
        ("routing", timings.routing_ms),
        ("prompt", timings.prompt_ms),
        ("generation", timings.generation_ms),
    ] {
        if ms >= 5.0 {
            parts.push(format!("{name} {:.2}", seconds(ms)));
        }
    }
    if timings.generation_ms >= 5.0 && timings.sampling_ms > 0.0 {
        if let Some(generation) = parts.last_mut() {
            generation.push_str(&format!(" (sampling {:.2})", seconds(timings.sampling_ms)));
        }
    }
    for (name, ms) in [("tools", timings.tools_ms), ("other", timings.other_ms())] {
        if ms >= 5.0 {
            parts.push(format!("{name} {:.2}", seconds(ms)));
        }
    }
    if parts.is_empty() {
        format!("{:.2} s", seconds(timings.total_ms))
    } else {
        format!("{:.2} s: {}", seconds(timings.total_ms), parts.join(", "))
    }
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let end = text.floor_char_boundary(limit);
    format!("{}… ({} more bytes)", &text[..end], text.len() - end)
}

/// Asks the person at the terminal: yes, no, or always for this session.
struct TerminalApprover;

impl ApprovalHandler for TerminalApprover {
    fn approve<'a>(
        &'a self,
        request: &'a ApprovalRequest,
    ) -> futures::future::BoxFuture<'a, ApprovalAnswer> {
        // Reading the terminal blocks: on a blocking thread, never on the
        // turn's task.
        let request = request.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || ask_terminal(&request))
                .await
                .unwrap_or(ApprovalAnswer::No)
        })
    }
}

/// Lines of a call shown at once before the approval prompt pages.
const APPROVAL_PAGE_LINES: usize = 30;

fn ask_terminal(request: &ApprovalRequest) -> ApprovalAnswer {
    let reason = request.reason.as_deref().unwrap_or("the policy asks");
    let lines = request.describe();
    let mut stderr = std::io::stderr();
    // The whole call is shown, a page at a time: what is approved is what
    // was read, never a prefix of it.
    for (index, page) in lines.chunks(APPROVAL_PAGE_LINES).enumerate() {
        for line in page {
            let _ = writeln!(stderr, "{line}");
        }
        let shown = (index + 1) * APPROVAL_PAGE_LINES;
        if shown < lines.len() {
            let _ = write!(
                stderr,
                "-- {shown} of {} lines; Enter for more --",
                lines.len()
            );
            let _ = stderr.flush();
            let mut more = String::new();
            if std::io::stdin()
                .read_line(&mut more)
                .map_or(true, |n| n == 0)
            {
                return ApprovalAnswer::No;
            }
        }
    }
    let _ = write!(
        stderr,
        "\x07allow {}? {} [y]es / [n]o / [a]lways: ",
        one_line(&request.tool),
        for_terminal(reason)
    );
    let _ = stderr.flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() {
        return ApprovalAnswer::No;
    }
    match answer.trim().to_lowercase().as_str() {
        "y" | "yes" => ApprovalAnswer::Yes,
        "a" | "always" => ApprovalAnswer::Always,
        _ => ApprovalAnswer::No,
    }
}

const HELP: &str = "/help  this text
/tools  the tools the model can call
/policy  the policy in force
/approvals [revoke ID]  session grants from 'always' answers
/reset  forget the conversation
/save  where this session is saved
/sessions  saved sessions
/resume ID  switch to a saved session
/training allow|deny  whether this session may be exported as training data
/voice FILE  speak: transcribe a WAV file, edit the text, send it
/listen  speak into the microphone (push to talk)
/exit  leave (Ctrl-D works too)";

/// The REPL's consent to keep transcripts: the user config's
/// `keep_transcripts`, asked once and recorded there when unset (the
/// REPL runs only on a terminal). `true` lets the policy decide.
fn transcript_consent(config: Option<&std::path::Path>) -> anyhow::Result<bool> {
    let path = match config {
        Some(path) => Some(path.to_path_buf()),
        None => stack_runtime::config::default_path(),
    };
    let Some(path) = path else {
        return Ok(true);
    };
    let user = stack_runtime::config::UserConfig::load(&path, config.is_none())?;
    if let Some(keep) = user.keep_transcripts {
        return Ok(keep);
    }
    print!(
        "Keep transcripts of your sessions (your prompts, tool output, the model's state) on this machine, so that you can resume them? Nothing leaves the machine. [y/N] "
    );
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer)? == 0 {
        // End of input is no answer: keep nothing now, ask again next time.
        println!();
        return Ok(false);
    }
    let keep = matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes");
    if let Err(err) = stack_runtime::config::record_transcript_consent(&path, keep) {
        eprintln!(
            "warning: could not record the answer in {} ({err}); it holds for this run only",
            path.display()
        );
        return Ok(keep);
    }
    // The history file of earlier versions held every line ever typed,
    // unredacted and of no one session: it goes.
    let legacy = stack_runtime::agent::expand_home("~/.local/share/stack-runtime/history");
    if legacy.is_file() && std::fs::remove_file(&legacy).is_ok() {
        println!("removed the old shared REPL history {}", legacy.display());
    }
    println!(
        "{} (recorded in {}; change keep_transcripts there)",
        if keep {
            "transcripts will be kept"
        } else {
            "nothing will be kept"
        },
        path.display()
    );
    Ok(keep)
}

/// What this session keeps on disk, where, for how long, and whether it is
/// encrypted (the banner's line).
fn storage_line(runtime: &Runtime, id: &str) -> String {
    match runtime.transcript_dir() {
        Some(dir) => {
            let kept = match runtime.policy().privacy.max_age_days {
                Some(days) => format!("for {days} day(s)"),
                None => "until deleted (agent sessions delete ID)".to_string(),
            };
            format!(
                "saving to  {}/{id}.jsonl, with its KV state, REPL history and audit records; kept {kept}; {}; training use not allowed unless you say /training allow",
                dir.display(),
                encryption_words(runtime.vault())
            )
        }
        None => "saving to  nowhere (the policy keeps no transcripts)".to_string(),
    }
}

/// Whether stored files are encrypted, and with which key (for the
/// banner and `agent doctor`).
pub fn encryption_words(vault: &stack_seal::Vault) -> String {
    match (vault.sealing_key(), vault.sealing_source()) {
        (Some(key), Some(source)) => {
            format!(
                "encrypted ({}, key {} from {source})",
                vault.record_cipher().describe(),
                key.id()
            )
        }
        _ => "not encrypted ([privacy] encrypt = true turns it on)".to_string(),
    }
}

/// The interactive REPL.
pub fn repl(args: &ChatArgs, dirs: &ToolDirs) -> anyhow::Result<ExitCode> {
    if !std::io::stdin().is_terminal() {
        // Piped input: one prompt, like `agent run`.
        return run(args, Input::new(None, None), false, false, dirs);
    }
    let approver: Arc<dyn ApprovalHandler> = Arc::new(TerminalApprover);
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut args = args.clone();
    if !transcript_consent(args.model.config.as_deref())? {
        args.keep_nothing = true;
    }
    let args = &args;
    let (runtime, mut session, config) =
        build(args, dirs, Some(Arc::clone(&approver)), false, &tokio)?;
    let info = runtime.backend().info();
    println!("Stack Runtime — {} ({})", info.name, info.detail);
    let facts = model_cmd::describe(&info);
    println!(
        "model      {}",
        facts
            .iter()
            .skip(2)
            .map(|(key, value)| format!("{key}: {value}"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!(
        "policy     {}",
        runtime
            .policy()
            .description
            .clone()
            .unwrap_or_else(|| args.policy.clone())
    );
    println!(
        "workspace  {}",
        session.tool_context().workspace.root().display()
    );
    println!("{}", storage_line(&runtime, session.id()));
    println!("type /help for commands");
    let mut editor = rustyline::DefaultEditor::new()?;
    // Up-arrow history: the lines typed in the newest sessions, each kept
    // with its session (deleting a session deletes its lines); nothing is
    // kept when the policy keeps no transcripts.
    let store = runtime.store();
    if let Some(store) = &store {
        let mut recent: Vec<_> = store.list().into_iter().take(10).collect();
        recent.reverse();
        for stored in recent {
            for line in store.history(&stored.id).unwrap_or_default() {
                let _ = editor.add_history_entry(line);
            }
        }
    }
    let mut ears = crate::voice_cmd::Ears::default();
    let mut history = store.as_ref().and_then(|store| {
        store
            .open_history(session.id())
            .map_err(|err| eprintln!("REPL history is not kept: {err}"))
            .ok()
    });
    loop {
        let line = match editor.readline("› ") {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(_) => break,
        };
        let line = line.trim().to_string();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(&line);
        if let Some(history) = &mut history {
            if let Err(err) = history.append(&runtime.policy().redactor().redact(&line)) {
                eprintln!("REPL history: {err}");
            }
        }
        if let Some(command) = line.strip_prefix('/') {
            let mut words = command.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("exit" | "quit"), _, _) => break,
                (Some("help"), _, _) => println!("{HELP}"),
                (Some("tools"), _, _) => {
                    for tool in runtime.registry().tools() {
                        println!("{:14} {}", tool.name, tool.description);
                    }
                }
                (Some("policy"), _, _) => {
                    let chain: Vec<String> = runtime
                        .policy()
                        .sources
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    println!("{}", chain.join(" <- "));
                    if let Some(description) = &runtime.policy().description {
                        println!("{description}");
                    }
                }
                (Some("approvals"), Some("revoke"), Some(id)) => {
                    let revoked = id.parse().is_ok_and(|id| session.grants().revoke(id));
                    println!(
                        "{}",
                        if revoked {
                            "revoked"
                        } else {
                            "no grant with that id"
                        }
                    );
                }
                (Some("approvals"), _, _) => {
                    let grants = session.grants().list();
                    if grants.is_empty() {
                        println!("no grants in this session");
                    }
                    for grant in grants {
                        println!("{}  {} ({})", grant.id, grant.tool, grant.rule);
                    }
                }
                (Some("reset"), _, _) => {
                    tokio.block_on(session.reset());
                    println!("conversation cleared");
                }
                (Some("save"), _, _) => match runtime.transcript_dir() {
                    Some(dir) => {
                        println!("saved as you go: {}/{}.jsonl", dir.display(), session.id())
                    }
                    None => println!("the policy keeps no transcripts"),
                },
                (Some("sessions"), _, _) => {
                    for id in runtime
                        .transcript_dir()
                        .map(list_sessions)
                        .unwrap_or_default()
                        .iter()
                        .take(20)
                    {
                        println!("{id}");
                    }
                }
                (Some("training"), Some(answer @ ("allow" | "deny")), _) => {
                    let allowed = answer == "allow";
                    match tokio.block_on(session.set_training_use(allowed)) {
                        Ok(()) => println!(
                            "this session's use as training data: {}",
                            if allowed { "allowed" } else { "not allowed" }
                        ),
                        Err(err) => println!("error: {err}"),
                    }
                }
                (Some("voice"), Some("-"), _) => {
                    println!("usage: /voice FILE (stdin is this terminal; `agent run --audio -` reads a pipe)")
                }
                (Some("voice"), Some(_), _) => {
                    let path = PathBuf::from(command.trim_start_matches("voice").trim());
                    let audio = crate::voice_cmd::read_audio(&path, &args.voice.limits());
                    hear_and_send(audio, &mut ears, args, &mut editor, &session, &tokio);
                }
                (Some("voice"), None, _) => println!("usage: /voice FILE (a WAV file)"),
                (Some("listen"), _, _) => {
                    let audio = crate::voice_cmd::listen(&args.voice.limits());
                    hear_and_send(audio, &mut ears, args, &mut editor, &session, &tokio);
                }
                (Some("resume"), Some(id), _) => {
                    // The same flags (sampling, tool choice, steps) as the
                    // session this one replaces.
                    let config = SessionConfig {
                        resume: Some(id.to_string()),
                        ..config.clone()
                    };
                    match tokio.block_on(runtime.session(config)) {
                        Ok(resumed) => {
                            session = resumed;
                            history = store.as_ref().and_then(|store| {
                                store
                                    .open_history(session.id())
                                    .map_err(|err| eprintln!("REPL history is not kept: {err}"))
                                    .ok()
                            });
                            let count = tokio.block_on(session.messages()).len();
                            println!("resumed {id} ({count} messages)");
                        }
                        Err(err) => println!("error: {err}"),
                    }
                }
                _ => println!("unknown command; /help lists them"),
            }
            continue;
        }
        // The turn's task is spawned on `tokio`: the stream is made inside it.
        tokio.block_on(async { show_turn(session.send(line), false, true).await });
    }
    tokio.block_on(save_before_exit(&session));
    Ok(ExitCode::SUCCESS)
}

/// `/voice` and `/listen`: transcribes `audio`, shows what was heard on an
/// editable line (Enter sends it as it is or as edited; an empty line or
/// Ctrl-C cancels), and runs the turn.
fn hear_and_send(
    audio: anyhow::Result<stack_runtime::voice::Audio>,
    ears: &mut crate::voice_cmd::Ears,
    args: &ChatArgs,
    editor: &mut rustyline::DefaultEditor,
    session: &Session,
    tokio: &tokio::runtime::Runtime,
) {
    let heard = audio.and_then(|audio| Ok((ears.transcribe(&args.voice, &audio)?, audio)));
    let (heard, audio) = match heard {
        Ok(heard) => heard,
        Err(err) => {
            println!("error: {err:#}");
            return;
        }
    };
    println!("{}", crate::voice_cmd::describe(&heard));
    match editor.readline_with_initial("send› ", (&heard.text, "")) {
        Ok(text) if !text.trim().is_empty() => {
            tokio.block_on(async {
                let turn = session.send_spoken(heard, text.trim(), Some(audio));
                // What was heard is on the screen already.
                show_turn(turn, false, false).await
            });
        }
        _ => println!("(not sent)"),
    }
}

/// `agent sessions …`.
#[derive(Debug, clap::Subcommand)]
pub enum SessionsCommand {
    /// List saved sessions, newest first: id, last change, size, whether
    /// its owner allowed training use.
    List,
    /// Delete one session: its transcript, KV state, consent record, REPL
    /// history and audit records (the audit log keeps a record of the
    /// deletion that names no content).
    Delete {
        /// The session id.
        id: String,
    },
    /// Delete every session older than DAYS (and audit records older than
    /// that), or every session with --all.
    Purge {
        /// Age in days of the newest file of a session to delete.
        #[arg(
            long,
            value_name = "DAYS",
            conflicts_with = "all",
            required_unless_present = "all"
        )]
        older_than: Option<u64>,
        /// Every session, and the whole audit log.
        #[arg(long)]
        all: bool,
    },
    /// Allow or refuse a session's use as training data (`agent export`
    /// refuses it until allowed).
    Training {
        /// The session id.
        id: String,
        /// allow or deny.
        answer: TrainingAnswer,
    },
}

/// A consent answer.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TrainingAnswer {
    /// Its use as training data is allowed.
    Allow,
    /// It is not.
    Deny,
}

/// `agent sessions …`.
pub fn sessions(policy: &str, action: Option<SessionsCommand>) -> anyhow::Result<ExitCode> {
    let (store, _lease) = stored_sessions(policy)?;
    match action.unwrap_or(SessionsCommand::List) {
        SessionsCommand::List => {
            for session in store.list() {
                let age = session
                    .modified
                    .elapsed()
                    .map_or(0, |age| age.as_secs() / 3600);
                println!(
                    "{}  {}h ago  {} bytes  training {}",
                    session.id,
                    age,
                    session.bytes,
                    if session.training_use {
                        "allowed"
                    } else {
                        "not allowed"
                    }
                );
            }
        }
        SessionsCommand::Delete { id } => {
            let removed = store.delete(&id)?;
            println!(
                "deleted {id}: {} file(s), {} audit record(s)",
                removed.files, removed.audit_records
            );
        }
        SessionsCommand::Purge { older_than, all } => {
            let age = match (older_than, all) {
                (_, true) => None,
                (Some(days), false) => {
                    Some(std::time::Duration::from_secs(days.saturating_mul(86_400)))
                }
                (None, false) => anyhow::bail!("say --older-than DAYS or --all"),
            };
            let removed = store.purge(age)?;
            println!(
                "purged {} session(s): {} file(s), {} audit record(s)",
                removed.sessions.len(),
                removed.files,
                removed.audit_records
            );
            for id in &removed.sessions {
                println!("  {id}");
            }
        }
        SessionsCommand::Training { id, answer } => {
            let allowed = matches!(answer, TrainingAnswer::Allow);
            store.set_training_use(&id, allowed)?;
            println!(
                "{id}: training use {}",
                if allowed { "allowed" } else { "not allowed" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `agent export ID --format chatml`.
pub fn export(id: &str, policy: &str) -> anyhow::Result<ExitCode> {
    let (store, _lease) = stored_sessions(policy)?;
    println!("{}", store.export_chatml(id)?);
    Ok(ExitCode::SUCCESS)
}

/// The sessions the policy keeps, with the keys that open them (and a
/// hold on the keys while they are used, so `agent keys rotate` waits).
pub fn stored_sessions(
    policy: &str,
) -> anyhow::Result<(SessionStore, Option<stack_seal::keys::KeyLease>)> {
    let policy = Policy::load_named(policy).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let dir = policy
        .privacy
        .transcript_dir
        .as_deref()
        .map(stack_runtime::agent::expand_home)
        .ok_or_else(|| anyhow::anyhow!("the policy names no transcript folder"))?;
    let (vault, lease) = policy_vault(&policy)?;
    Ok((SessionStore::new(dir).with_vault(vault), lease))
}

/// The keys the policy's stored data is sealed and opened with (see
/// `[privacy] encrypt`), and a hold on them while they are used.
pub fn policy_vault(
    policy: &Policy,
) -> anyhow::Result<(Arc<stack_seal::Vault>, Option<stack_seal::keys::KeyLease>)> {
    let encrypt = policy.privacy.encrypt.unwrap_or(false);
    let (vault, lease) = match stack_seal::keys::KeyStore::for_user() {
        Ok(keys) => keys.open(encrypt)?,
        Err(err) if encrypt => return Err(err.into()),
        Err(_) => (stack_seal::Vault::plaintext(), None),
    };
    Ok((Arc::new(vault), lease))
}
