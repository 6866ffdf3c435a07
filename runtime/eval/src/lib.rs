//! Measured tool calling: how often a model picks the right tool with the
//! right arguments ([`bfcl`]), and how often the task then succeeds when
//! the tools really run ([`tasks`]). `agent eval` is a thin front for
//! [`run_bfcl`] and [`run_tasks`].
//!
//! Decoding is deterministic: [`EvalOptions::default`] samples greedily
//! (temperature 0) with a fixed seed, so a run can be repeated and two
//! models or two prompts compared case by case.
//!
//! Executable tasks run each in a fresh temporary workspace, through the
//! same agent loop, gate, policy and sandbox as the REPL. The policy's
//! `ask` decisions are approved (there is nobody to ask); `deny` still
//! denies, and every call still runs sandboxed. Nothing is kept: no
//! transcript, no audit log.

pub mod bfcl;
mod report;
pub mod tasks;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde_json::Value;

use stack_agent::{Event, GroundingMode, Runtime, SessionConfig, TurnEnd};
use stack_core::policy::{ApprovalAnswer, ApprovalRequest, Policy};
use stack_model::{CompletionRequest, ModelBackend, SamplingOptions, ToolChoice};
use stack_types::message::{Message, Role, ToolCall};
use stack_types::outcome::Status;

pub use bfcl::{BfclCase, Category, Failure, FailureKind};
pub use report::{CaseRecord, CategoryReport, Report, Suite};
pub use tasks::{LoadedTask, Task};

/// Why an evaluation could not run (a case that fails is a result, not
/// an error).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line of a data or task file is malformed.
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Its 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A folder holds no BFCL data file of the asked categories.
    #[error("{0} holds no BFCL_v*_{{simple_python,multiple,parallel,irrelevance}}.json of the categories asked for")]
    NoBfclData(PathBuf),
    /// A task file holds no task.
    #[error("{0} holds no task")]
    NoTasks(PathBuf),
    /// The model backend failed to open a session.
    #[error("the model: {0}")]
    Model(#[from] stack_model::ModelError),
}

/// How to run an evaluation.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Sampling: greedy with a fixed seed by default.
    pub sampling: SamplingOptions,
    /// A system prompt to put first, where the case has none (`None`: the
    /// model's or the runtime's default).
    pub system_prompt: Option<String>,
    /// Most model steps per executable task.
    pub max_steps: u32,
    /// Whether executable tasks offer the built-in tools (default: yes).
    pub builtin_tools: bool,
    /// How executable tasks ground the built-in tools' parameters (see
    /// `SessionConfig::grounding`).
    pub grounding: GroundingMode,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            sampling: SamplingOptions {
                temperature: 0.0,
                seed: 42,
                max_tokens: 256,
                ..SamplingOptions::default()
            },
            system_prompt: None,
            max_steps: 4,
            builtin_tools: true,
            grounding: GroundingMode::Auto,
        }
    }
}

/// Runs BFCL-format cases on `backend`, one model step each, and scores
/// them. `on_case` sees each record as it is made (for a per-case log).
pub async fn run_bfcl(
    backend: Arc<dyn ModelBackend>,
    cases: &[BfclCase],
    options: &EvalOptions,
    on_case: &mut (dyn FnMut(&CaseRecord) + Send),
) -> Result<Report, EvalError> {
    let mut session = backend.open_session().await?;
    let mut records = Vec::new();
    for case in cases {
        let started = Instant::now();
        let mut messages = case.messages.clone();
        if let Some(system) = &options.system_prompt {
            if !messages.iter().any(|m| m.role == Role::System) {
                messages.insert(0, Message::system(system.clone()));
            }
        }
        let (deltas, _ignored) = tokio::sync::mpsc::unbounded_channel();
        let request = CompletionRequest {
            messages,
            tools: case.tools.clone(),
            tool_choice: ToolChoice::Auto,
            sampling: options.sampling.clone(),
            response_format: None,
            argument_values: Default::default(),
        };
        let generation = session
            .complete(request, deltas, Arc::new(AtomicBool::new(false)))
            .await;
        let seconds = started.elapsed().as_secs_f64();
        let record = match generation {
            Ok(generation) => {
                let calls = generation.turn.tool_calls;
                let verdict = bfcl::score(case, &calls);
                CaseRecord {
                    suite: Suite::Bfcl,
                    id: case.id.clone(),
                    category: case.category.as_str().to_string(),
                    passed: verdict.is_ok(),
                    failure: verdict.err(),
                    right_tool: right_function(case, &calls),
                    schema_valid_calls: schema_valid(&case.tools, &calls),
                    calls,
                    text: generation.text,
                    seconds,
                }
            }
            Err(err) => CaseRecord::error(
                Suite::Bfcl,
                &case.id,
                case.category.as_str(),
                err.to_string(),
                seconds,
            ),
        };
        on_case(&record);
        records.push(record);
    }
    Ok(Report::from_records(Suite::Bfcl, records))
}

/// Whether the call names the function the case wants (`None` where no
/// call is wanted): the first call for one expected call; the same set of
/// names for parallel calls.
fn right_function(case: &BfclCase, calls: &[ToolCall]) -> Option<bool> {
    let expected = case.expected.as_ref()?;
    let mut wanted: Vec<&str> = expected.iter().map(|c| c.name.as_str()).collect();
    let mut made: Vec<&str> = calls.iter().map(|c| c.function.name.as_str()).collect();
    if expected.len() == 1 {
        return Some(made.first() == wanted.first());
    }
    wanted.sort_unstable();
    made.sort_unstable();
    made.dedup();
    wanted.dedup();
    Some(made == wanted)
}

/// How many of `calls` name an offered tool and pass its schema.
fn schema_valid(tools: &[Value], calls: &[ToolCall]) -> usize {
    calls
        .iter()
        .filter(|call| {
            let Some(parameters) = tools.iter().find_map(|tool| {
                (tool.pointer("/function/name").and_then(Value::as_str)
                    == Some(call.function.name.as_str()))
                .then(|| tool.pointer("/function/parameters"))
                .flatten()
            }) else {
                return false;
            };
            let Ok(arguments) = serde_json::from_str::<Value>(&call.function.arguments) else {
                return false;
            };
            jsonschema::validator_for(parameters).is_ok_and(|v| v.is_valid(&arguments))
        })
        .count()
}

fn approve_all(_: &ApprovalRequest) -> ApprovalAnswer {
    ApprovalAnswer::Yes
}

/// Runs executable tasks on `backend` through the agent loop, each in a
/// fresh workspace under `policy`, offering the built-in tools (unless
/// [`EvalOptions::builtin_tools`] is off) and those of `tool_dirs`. Every
/// `ask` of the policy is approved (the task's tools must run to be
/// scored); `deny` rules still hold.
pub async fn run_tasks(
    backend: Arc<dyn ModelBackend>,
    tasks: &[LoadedTask],
    policy: &Policy,
    tool_dirs: &[PathBuf],
    options: &EvalOptions,
    on_case: &mut (dyn FnMut(&CaseRecord) + Send),
) -> Report {
    let mut records = Vec::new();
    for loaded in tasks {
        let record = run_task(&backend, loaded, policy, tool_dirs, options).await;
        on_case(&record);
        records.push(record);
    }
    Report::from_records(Suite::Tasks, records)
}

/// One executable task; whatever fails (its workspace, the runtime, the
/// turn) is that task's result, and the run goes on.
async fn run_task(
    backend: &Arc<dyn ModelBackend>,
    loaded: &LoadedTask,
    policy: &Policy,
    tool_dirs: &[PathBuf],
    options: &EvalOptions,
) -> CaseRecord {
    let task = &loaded.task;
    let started = Instant::now();
    let failed = |message: String| {
        CaseRecord::error(
            Suite::Tasks,
            &task.id,
            &task.category,
            message,
            started.elapsed().as_secs_f64(),
        )
    };
    let workspace = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(err) => return failed(format!("making the task's workspace: {err}")),
    };
    if let Err(err) = tasks::prepare(task, workspace.path()) {
        return failed(format!("writing the task's files: {err}"));
    }
    let mut builder = Runtime::builder()
        .backend(Arc::clone(backend))
        .builtin_tools(options.builtin_tools)
        .workspace(workspace.path())
        .policy(policy.clone())
        .approval_handler(Arc::new(approve_all))
        .transcripts(None)
        .audit_log(None);
    for dir in tool_dirs {
        builder = builder.tool_dir(dir);
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(err) => return failed(format!("building the runtime: {err}")),
    };
    let tools = runtime.registry().openai_tools();
    let mut config = SessionConfig {
        tool_choice: ToolChoice::Auto,
        sampling: options.sampling.clone(),
        max_steps: options.max_steps,
        grounding: options.grounding,
        ..SessionConfig::default()
    };
    if let Some(system) = &options.system_prompt {
        config.system_prompt = Some(system.clone());
    }
    let session = match runtime.session(config).await {
        Ok(session) => session,
        Err(err) => return failed(format!("opening the session: {err}")),
    };
    let mut turn = session.send(task.prompt.clone());
    let mut record = tasks::TurnRecord::default();
    let mut calls = Vec::new();
    let mut last_error = None;
    let mut ended = None;
    while let Some(event) = turn.next().await {
        match event {
            Event::AssistantMessage { message } => {
                if let Some(proposed) = &message.tool_calls {
                    calls.extend(proposed.iter().cloned());
                }
                record.answer = message.text();
            }
            Event::ToolFinished { name, outcome, .. } => {
                record
                    .results
                    .push((name, outcome.status == Status::Ok, outcome.stdout));
            }
            Event::Error { message } => last_error = Some(message),
            Event::TurnFinished { reason, .. } => ended = Some(reason),
            _ => {}
        }
    }
    drop(turn);
    drop(session);
    let seconds = started.elapsed().as_secs_f64();
    let right_tool = Some(calls.iter().any(|c| c.function.name == task.tool));
    // A turn that ended at its step limit or on repeated failures still
    // did what it did: the checks decide. Only a failed turn is an error.
    let failure = if ended == Some(TurnEnd::Error) || ended.is_none() {
        Some(Failure {
            kind: FailureKind::TurnError,
            detail: last_error.unwrap_or_else(|| "the turn ended without finishing".into()),
        })
    } else {
        loaded
            .first_failed_check(workspace.path(), &record)
            .map(|detail| Failure {
                kind: if calls.is_empty() {
                    FailureKind::NoCall
                } else if right_tool == Some(false) {
                    FailureKind::WrongFunction
                } else {
                    FailureKind::CheckFailed
                },
                detail,
            })
    };
    CaseRecord {
        suite: Suite::Tasks,
        id: task.id.clone(),
        category: task.category.clone(),
        passed: failure.is_none(),
        failure,
        right_tool,
        schema_valid_calls: schema_valid(&tools, &calls),
        calls,
        text: record.answer,
        seconds,
    }
}
