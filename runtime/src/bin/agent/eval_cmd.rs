//! `agent eval`: measured tool calling on BFCL-format data and on
//! executable tasks (see `stack_runtime::eval`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use stack_runtime::eval::{self, bfcl, CaseRecord, Category, EvalOptions, Report};
use stack_runtime::policy::Policy;

use crate::chat::{GroundingArg, RoutingArg};
use crate::model_cmd::{self, ModelArgs};
use crate::tool_cmd::ToolDirs;

/// Flags of `agent eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A folder of BFCL data (`BFCL_v4_*.json` and `possible_answer/`).
    #[arg(long, value_name = "DIR")]
    bfcl: Option<PathBuf>,
    /// BFCL categories to run (comma-separated).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "simple,multiple,parallel,irrelevance"
    )]
    category: Vec<String>,
    /// A file of executable tasks (JSON lines).
    #[arg(long, value_name = "FILE")]
    tasks: Option<PathBuf>,
    /// Run only the first N cases of each category.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// The policy executable tasks run under (its `ask` is approved).
    #[arg(long, default_value = "default")]
    policy: String,
    /// A system prompt to put first.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Random seed (decoding is greedy; the seed fixes any tie-breaking).
    #[arg(long, default_value_t = 42)]
    seed: u32,
    /// Most tokens per model step.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// DRY penalty on repeating what a step already wrote, 0 (off) to 1
    /// (default: 0.8 for a model under 1B parameters, else off).
    #[arg(long, value_name = "X", value_parser = crate::chat::dry_multiplier)]
    dry_multiplier: Option<f32>,
    /// Most model steps per executable task.
    #[arg(long, default_value_t = 4)]
    max_steps: u32,
    /// How the model decides to call a tool (see `agent --help`).
    #[arg(long, value_enum, default_value_t = RoutingArg::Auto)]
    routing: RoutingArg,
    /// How far executable tasks ground the built-in tools' arguments (see
    /// `agent --help`).
    #[arg(long, value_enum, default_value_t = GroundingArg::Auto)]
    grounding: GroundingArg,
    /// Write every case's record here, one JSON object per line.
    #[arg(long, value_name = "FILE")]
    jsonl: Option<PathBuf>,
    /// Print the reports as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

pub fn run(args: EvalArgs, dirs: &ToolDirs) -> anyhow::Result<ExitCode> {
    if args.bfcl.is_none() && args.tasks.is_none() {
        anyhow::bail!("nothing to evaluate: give --bfcl DIR and/or --tasks FILE");
    }
    let categories = args
        .category
        .iter()
        .map(|name| {
            Category::parse(name.trim()).with_context(|| {
                format!("unknown category `{name}` (simple, multiple, parallel, irrelevance)")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cases = match &args.bfcl {
        Some(dir) => limit(bfcl::load(dir, &categories)?, args.limit, |c| c.category),
        None => Vec::new(),
    };
    let tasks = match &args.tasks {
        Some(file) => limit(eval::tasks::load(file)?, args.limit, |t| {
            t.task.category.clone()
        }),
        None => Vec::new(),
    };
    let policy = Policy::load_named(&args.policy).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let mut options = EvalOptions {
        system_prompt: args.system.clone(),
        max_steps: args.max_steps,
        builtin_tools: dirs.include_default,
        ..EvalOptions::default()
    };
    options.sampling.seed = args.seed;
    options.sampling.max_tokens = args.max_tokens;
    options.sampling.dry_multiplier = args.dry_multiplier;
    options.sampling.routing = args.routing.into();
    options.grounding = args.grounding.into();
    let tool_dirs: Vec<PathBuf> = dirs.folders();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let backend = model_cmd::backend(&args.model, true, &tokio)?;
    let mut jsonl = match &args.jsonl {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let total = cases.len() + tasks.len();
    let mut done = 0;
    let mut log_error = None;
    let mut on_case = |record: &CaseRecord| {
        done += 1;
        let verdict = match &record.failure {
            None => "pass".to_string(),
            Some(failure) => format!("{}: {}", failure.kind.as_str(), one_line(&failure.detail)),
        };
        eprintln!(
            "[{done}/{total}] {} {verdict} ({:.1} s)",
            record.id, record.seconds
        );
        if let Some(out) = jsonl.as_mut() {
            let written = serde_json::to_string(record)
                .map_err(std::io::Error::other)
                .and_then(|line| writeln!(out, "{line}"))
                .and_then(|()| out.flush());
            if let Err(err) = written {
                log_error.get_or_insert(err);
            }
        }
    };
    let mut reports: Vec<Report> = Vec::new();
    if !cases.is_empty() {
        reports.push(tokio.block_on(eval::run_bfcl(
            backend.clone(),
            &cases,
            &options,
            &mut on_case,
        ))?);
    }
    if !tasks.is_empty() {
        reports.push(tokio.block_on(eval::run_tasks(
            backend.clone(),
            &tasks,
            &policy,
            &tool_dirs,
            &options,
            &mut on_case,
        )));
    }
    if let Some(mut out) = jsonl {
        out.flush().context("writing the per-case records")?;
    }
    if let Some(err) = log_error {
        anyhow::bail!("writing the per-case records: {err}");
    }
    let info = backend.info();
    if args.json {
        let value = serde_json::json!({"model": info.name, "reports": reports});
        println!("{value}");
    } else {
        println!("model: {} ({})", info.name, info.detail);
        for report in &reports {
            println!("\n{report}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Keeps the first `limit` items of each group, in order.
fn limit<T, K: PartialEq>(items: Vec<T>, limit: Option<usize>, key: impl Fn(&T) -> K) -> Vec<T> {
    let Some(limit) = limit else {
        return items;
    };
    let mut seen: Vec<(K, usize)> = Vec::new();
    items
        .into_iter()
        .filter(|item| {
            let k = key(item);
            let count = match seen.iter_mut().find(|(s, _)| *s == k) {
                Some((_, count)) => count,
                None => {
                    seen.push((k, 0));
                    match seen.last_mut() {
                        Some((_, count)) => count,
                        None => return false,
                    }
                }
            };
            *count += 1;
            *count <= limit
        })
        .collect()
}

fn one_line(text: &str) -> String {
    stack_runtime::text::one_line(text)
        .chars()
        .take(160)
        .collect()
}
