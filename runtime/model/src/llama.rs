//! The llama.cpp backend (through `llama-cpp-2`): loading GGUF models,
//! sessions that keep their KV cache between turns, sampling, and
//! grammar-constrained tool calls.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use stack_seal::StateFile;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use serde_json::Value;

use super::backend::{offered_tools, prompt_tools, tool_name, CallPath};
pub use super::backend::{
    Counters, Generation, GrammarCheck, ModelError, Routing, SamplingOptions, StopReason,
    DEFAULT_DRY_MULTIPLIER, MAX_DRY_MULTIPLIER, SMALL_MODEL_PARAMETERS,
};
use super::batch::{AsideLease, Engine, Lease, Want, PROMPT_CHUNK};
use super::call_grammar::{call_grammar, CallCount, CallGrammar, CallTrigger};
pub use super::cpu_backends::CpuBackend;
use super::formats::ToolFormat;
use super::grammar::{ArgumentValues, ToolChoice};
use super::routing::{
    clip, describe_tool, instruments_in, name_verbs_in, name_words_in, named_choices_in,
    RoutingScores, MAX_EVIDENCE_CHARS,
};
use super::template::PromptRenderer;
use super::toolcall::{drop_repeated_calls, parse_reply, ParsedTurn};
use stack_types::message::{Message, Role};

/// How to load a model.
pub struct ModelOptions {
    /// The GGUF file; `None` means the embedded default (SmolLM2-135M).
    pub path: Option<PathBuf>,
    /// Context size in tokens; 0 means the size the model was trained
    /// with.
    pub context_size: u32,
    /// CPU threads; `None` picks them per session: the CPUs this process
    /// may use, less those other processes keep busy as the session opens
    /// (see [`automatic_threads`]).
    pub threads: Option<i32>,
    /// Batch size for prompt processing.
    pub batch_size: u32,
    /// Layers to offload to the GPU; `None` means all when built with
    /// `cuda`, none otherwise.
    pub gpu_layers: Option<u32>,
    /// Called with load progress from 0 to 1.
    pub progress: Option<Box<dyn FnMut(f32) + Send>>,
    /// Sequences decoded together (continuous batching, see
    /// [`crate::batch`]): above 1, every session shares one context with
    /// this many slots of `context_size` tokens each, and sessions that
    /// generate at once are decoded in one batch. 1 gives each session a
    /// context of its own, and sessions generate in turn.
    pub parallel: u32,
    /// A Jinja chat template to use instead of the GGUF's own (as
    /// llama-server's `--chat-template-file`): for a GGUF whose template is
    /// missing or wrong. The tool-call format is detected from it.
    pub chat_template: Option<String>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            path: None,
            context_size: 4096,
            threads: None,
            batch_size: 512,
            gpu_layers: None,
            progress: None,
            parallel: 1,
            chat_template: None,
        }
    }
}

/// What the model file says about itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The file.
    pub path: PathBuf,
    /// `general.name`.
    pub name: String,
    /// `general.architecture`.
    pub architecture: String,
    /// Parameter count.
    pub parameters: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Context length it was trained with.
    pub trained_context: u32,
    /// Whether its own chat template renders tools.
    pub template_supports_tools: bool,
    /// The tool-call syntax the model is shown (and parsed first): its
    /// template's, or Hermes through the ChatML fallback.
    pub tool_format: ToolFormat,
    /// Layers offloaded to a GPU.
    pub gpu_layers: u32,
    /// The CPU features ggml's kernels use (see [`cpu_kernels`]).
    pub cpu_kernels: Vec<String>,
    /// The CPU backend those kernels are in (see [`cpu_backend`]).
    pub cpu_backend: Option<CpuBackend>,
}

/// The process-wide llama.cpp backend (initialized once, after its CPU
/// backend is loaded, see [`crate::cpu_backends`]; its logs go to
/// `tracing`).
pub fn backend() -> Result<&'static LlamaBackend, ModelError> {
    initialized().map(|(backend, _)| backend)
}

/// The CPU backend llama.cpp runs in this process: the variant picked for
/// this CPU, and the folder it came from.
pub fn cpu_backend() -> Result<&'static CpuBackend, ModelError> {
    initialized().map(|(_, cpu)| cpu)
}

fn initialized() -> Result<(&'static LlamaBackend, &'static CpuBackend), ModelError> {
    static BACKEND: OnceLock<Result<(LlamaBackend, CpuBackend), String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            // First, and on failure never llama.cpp at all: with no backend
            // registered, `llama_backend_init` (and llama's GPU probes) fall
            // back to ggml's default search, which looks in the current
            // directory.
            let cpu = crate::cpu_backends::load()?;
            let backend = LlamaBackend::init().map_err(|e| e.to_string())?;
            Ok((backend, cpu))
        })
        .as_ref()
        .map(|(backend, cpu)| (backend, cpu))
        .map_err(|e| ModelError::Backend(e.clone()))
}

/// The CPU features ggml's kernels use in this build, as llama.cpp reports
/// them (`AVX2`, `FMA`, `F16C`, ...; those reported `= 1`).
pub fn cpu_kernels() -> Result<Vec<String>, ModelError> {
    backend()?;
    // SAFETY: `llama_print_system_info` takes no arguments and returns a
    // pointer to a NUL-terminated string in a static buffer of llama.cpp's,
    // valid until the next call; it is copied before anything else runs
    // and checked for null first.
    let text = unsafe {
        let pointer = llama_cpp_sys_2::llama_print_system_info();
        if pointer.is_null() {
            return Ok(Vec::new());
        }
        std::ffi::CStr::from_ptr(pointer)
            .to_string_lossy()
            .into_owned()
    };
    Ok(text
        .split('|')
        .filter_map(|field| {
            let (name, value) = field.split_once('=')?;
            let name = name.trim().rsplit(':').next()?.trim();
            (value.trim() == "1").then(|| name.to_string())
        })
        .collect())
}

/// Threads for a session when none were asked for: the CPUs this process
/// may use (its affinity and cgroup quota), less the CPUs other processes
/// keep busy now, sampled from `/proc/stat` over 50 ms; at least one.
///
/// llama.cpp's own default is 4 threads whatever the machine, and its
/// OpenMP threads spin at every barrier: on 2 cores with one CPU-bound
/// process beside it, 2 threads generated 3.4–3.9x slower than alone, and
/// 1 thread no slower (`cargo bench --workspace --bench contention`).
/// Blocks for the sample: call it off any async runtime (sessions open on
/// their own thread).
pub fn automatic_threads() -> i32 {
    let available = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let busy_elsewhere = cpus_busy(std::time::Duration::from_millis(50)).unwrap_or(0.0);
    let free = (available as f64 - busy_elsewhere).round();
    (free.max(1.0) as i32).min(i32::try_from(available).unwrap_or(i32::MAX))
}

/// How many CPUs' worth of time the machine spent busy over `window`.
fn cpus_busy(window: std::time::Duration) -> Option<f64> {
    /// The aggregate line's total and idle jiffies, and the machine's CPUs.
    fn sample() -> Option<(u64, u64, usize)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count();
        Some((total, idle, cpus.max(1)))
    }
    let (total_before, idle_before, _) = sample()?;
    std::thread::sleep(window);
    let (total_after, idle_after, cpus) = sample()?;
    let total = total_after.checked_sub(total_before)?;
    let idle = idle_after.checked_sub(idle_before)?;
    if total == 0 {
        return None;
    }
    Some(cpus as f64 * (total - idle) as f64 / total as f64)
}

/// A loaded model, shared by any number of sessions.
pub struct Model {
    // Boxed, never moved out or replaced while the Model exists: sessions'
    // contexts borrow it (see `Model::session`), and it is freed when the
    // last `Arc<Model>` (each session holds one) goes.
    model: Arc<LlamaModel>,
    renderer: PromptRenderer,
    info: ModelInfo,
    context_size: u32,
    batch_size: u32,
    threads: Option<i32>,
    turn: std::sync::Mutex<()>,
    parallel: u32,
    /// The shared context's engine, made with the first session.
    engine: OnceLock<Arc<Engine>>,
    engine_start: std::sync::Mutex<()>,
    /// DRY samplers made once per multiplier, cloned for each step:
    /// making one reads every token of the vocabulary once per sequence
    /// breaker, and a clone copies what that found.
    dry_prototypes: std::sync::Mutex<Vec<(u32, LlamaSampler)>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("info", &self.info).finish()
    }
}

impl Model {
    /// Loads a GGUF model.
    pub fn load(mut options: ModelOptions) -> Result<Arc<Model>, ModelError> {
        let path = match options.path.take() {
            Some(path) => path,
            None => stack_assets::Asset::DefaultModel
                .locate()
                .map_err(|e| ModelError::Backend(e.to_string()))?,
        };
        check_gguf(&path)?;
        let backend = backend()?;
        let gpu_layers =
            options
                .gpu_layers
                .unwrap_or(if cfg!(feature = "cuda") { u32::MAX } else { 0 });
        let mut params = LlamaModelParams::default().with_n_gpu_layers(gpu_layers);
        if let Some(mut progress) = options.progress.take() {
            params = params.with_progress_callback(move |fraction| {
                progress(fraction);
                true
            });
        }
        let model =
            LlamaModel::load_from_file(backend, &path, &params).map_err(|e| ModelError::Load {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let model = Arc::new(model);
        let template = match options.chat_template.take() {
            Some(template) => template,
            None => model
                .meta_val_str("tokenizer.chat_template")
                .unwrap_or_else(|_| CHATML.to_string()),
        };
        let meta = |key: &str| model.meta_val_str(key).unwrap_or_default();
        let renderer = PromptRenderer::new(
            &template,
            "You are a helpful assistant that can call tools.",
        )?;
        let info = ModelInfo {
            path: path.clone(),
            name: meta("general.name"),
            architecture: meta("general.architecture"),
            parameters: model.n_params(),
            size_bytes: model.size(),
            trained_context: model.n_ctx_train(),
            template_supports_tools: renderer.own_template_supports_tools(),
            tool_format: renderer.call_format(),
            gpu_layers: gpu_layers.min(model.n_layer()),
            cpu_kernels: cpu_kernels().unwrap_or_default(),
            cpu_backend: cpu_backend().ok().cloned(),
        };
        let context_size = if options.context_size == 0 {
            info.trained_context
        } else {
            options.context_size
        };
        Ok(Arc::new(Model {
            model,
            renderer,
            info,
            context_size,
            batch_size: options.batch_size.max(1),
            threads: options.threads,
            turn: std::sync::Mutex::new(()),
            parallel: options.parallel.max(1),
            engine: OnceLock::new(),
            engine_start: std::sync::Mutex::new(()),
            dry_prototypes: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// The DRY multiplier `options` sample with on this model (see
    /// [`SamplingOptions::dry_multiplier`]): at most
    /// [`MAX_DRY_MULTIPLIER`], and 0 (off) for anything not above 0,
    /// not-a-number included.
    pub fn dry_multiplier(&self, options: &SamplingOptions) -> f32 {
        let multiplier =
            options
                .dry_multiplier
                .unwrap_or(if self.info.parameters < SMALL_MODEL_PARAMETERS {
                    DEFAULT_DRY_MULTIPLIER
                } else {
                    0.0
                });
        if multiplier > 0.0 {
            multiplier.min(MAX_DRY_MULTIPLIER)
        } else {
            0.0
        }
    }

    /// A fresh DRY sampler of `multiplier`, cloned from the one made for
    /// it first.
    fn dry_sampler(&self, multiplier: f32) -> LlamaSampler {
        let prototypes = || {
            self.dry_prototypes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let key = multiplier.to_bits();
        if let Some((_, prototype)) = prototypes().iter().find(|(k, _)| *k == key) {
            return prototype.clone();
        }
        // Made without the lock: other sessions' steps go on meanwhile.
        let made = LlamaSampler::dry(
            &self.model,
            multiplier,
            DRY_BASE,
            DRY_ALLOWED_LENGTH,
            // All of a step: only its own tokens are accepted, and a
            // step's repeats are sought among those it has. (This
            // llama.cpp takes a negative length as 0, which is off.)
            DRY_MOST_TOKENS,
            DRY_SEQUENCE_BREAKERS,
        );
        let mut prototypes = prototypes();
        if !prototypes.iter().any(|(k, _)| *k == key) {
            if prototypes.len() >= MAX_DRY_PROTOTYPES {
                prototypes.remove(0);
            }
            prototypes.push((key, made.clone()));
        }
        made
    }

    /// Held while a session generates, so sessions sharing the model (and
    /// the machine's cores) are served in turn.
    pub fn turn_lock(&self) -> &std::sync::Mutex<()> {
        &self.turn
    }

    /// The context size sessions are made with, in tokens.
    pub fn context_size(&self) -> u32 {
        self.context_size
    }

    /// What the model says about itself.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Whether `grammar` (GBNF, start rule `root`) accepts `text` whole,
    /// read token by token as this model would write it: each token
    /// allowed where it comes, and the end allowed after the last. With a
    /// trigger the grammar is lazy, as under `auto`: llama.cpp applies it
    /// from where the trigger's patterns match. This is how call grammars
    /// are checked against real model output.
    pub fn grammar_accepts(
        &self,
        grammar: &str,
        trigger: Option<&CallTrigger>,
        text: &str,
    ) -> Result<bool, ModelError> {
        let mut sampler = match trigger {
            Some(trigger) => LlamaSampler::grammar_lazy_patterns(
                &self.model,
                grammar,
                "root",
                &trigger.patterns(),
                &[],
            ),
            None => LlamaSampler::grammar(&self.model, grammar, "root"),
        }
        .map_err(|e| ModelError::Grammar(e.to_string()))?;
        let vocab = self.model.vocab();
        let allowed = |sampler: &mut LlamaSampler, token: LlamaToken| {
            let mut candidates =
                LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 0.0, 0.0)], false);
            sampler.apply(&mut candidates);
            candidates
                .data
                .first()
                .is_some_and(|d| d.logit().is_finite())
        };
        for token in vocab.tokenize(text.as_bytes(), false, false) {
            if !allowed(&mut sampler, token) || sampler.try_accept(token).is_err() {
                return Ok(false);
            }
        }
        Ok(allowed(&mut sampler, vocab.eos()))
    }

    /// The prompt renderer (the model's template, or the ChatML fallback).
    pub fn renderer(&self) -> &PromptRenderer {
        &self.renderer
    }

    /// The llama.cpp model, for benchmarks that drive it directly.
    pub fn raw(&self) -> &LlamaModel {
        &self.model
    }

    /// Whether sessions share one batched context ([`ModelOptions::parallel`]).
    pub fn batched(&self) -> bool {
        self.parallel > 1
    }

    /// Sessions decoded together ([`ModelOptions::parallel`]).
    pub fn parallel(&self) -> u32 {
        self.parallel
    }

    /// The batching engine's slots and their size, once it runs.
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.get()
    }

    /// A new session: with a context of its own (KV cache), or, for a
    /// batched model, a claim on the shared context's slots.
    pub fn session(self: &Arc<Self>) -> Result<ModelSession, ModelError> {
        static OWNERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let kv = if self.batched() {
            let engine = match self.engine.get() {
                Some(engine) => Arc::clone(engine),
                None => {
                    // One context only, however many sessions open at once.
                    let _starting = self.engine_start.lock().unwrap_or_else(|p| p.into_inner());
                    match self.engine.get() {
                        Some(engine) => Arc::clone(engine),
                        None => {
                            let made = self.start_engine()?;
                            Arc::clone(self.engine.get_or_init(|| made))
                        }
                    }
                }
            };
            Kv::Shared {
                engine,
                lease: None,
                aside: None,
                owner: OWNERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            }
        } else {
            // A small model routes under `Routing::Auto`, so it gets a
            // sequence aside; a larger one scores in its conversation's
            // sequence when asked to route (and then evaluates its
            // prompt afresh), rather than hold cells it seldom uses.
            let small = self.info.parameters < SMALL_MODEL_PARAMETERS;
            Kv::Own {
                ctx: self.new_own_context(small)?,
                size: self.context_size,
                aside: small.then(Vec::new),
            }
        };
        Ok(ModelSession {
            kv,
            model: Arc::clone(self),
            cached: Vec::new(),
            totals: Counters::default(),
            last_logits: Vec::new(),
            grounding: ArgumentValues::none(),
            cancel: None,
        })
    }

    /// Context parameters for `cells` KV cells shared by `sequences`.
    fn context_params(&self, cells: u32, sequences: u32) -> LlamaContextParams {
        LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(cells))
            .with_n_batch(self.batch_size.max(sequences * PROMPT_CHUNK as u32))
            .with_n_seq_max(sequences)
    }

    /// Opens a context with `params`, on `threads` unless `--threads` says.
    fn open_context(
        &self,
        params: LlamaContextParams,
        threads: i32,
    ) -> Result<LlamaContext<'static>, ModelError> {
        let threads = self.threads.unwrap_or(threads);
        let params = params.with_n_threads(threads).with_n_threads_batch(threads);
        // SAFETY: the context borrows the model, which stays at its
        // address (in its `Arc`) for as long as any `Arc` of it lives. A
        // session holding a context also holds an `Arc` of this `Model`
        // (which holds the model's `Arc`) in a field declared after the
        // context, so the context is dropped first; the batching thread
        // holds the model's `Arc` itself until its context is dropped.
        let model: &'static LlamaModel = unsafe { &*Arc::as_ptr(&self.model) };
        model
            .new_context(backend()?, params)
            .map_err(|e| ModelError::Backend(e.to_string()))
    }

    /// A session's context of its own: the conversation's `context_size`
    /// cells in sequence 0 and, `with_aside`, [`ASIDE_CELLS`] more in one
    /// unified pool, for the routing step's prompts in sequence
    /// [`ASIDE_SEQ`].
    fn new_own_context(&self, with_aside: bool) -> Result<LlamaContext<'static>, ModelError> {
        let params = if with_aside {
            self.context_params(self.context_size.saturating_add(ASIDE_CELLS), 2)
                .with_kv_unified(true)
        } else {
            self.context_params(self.context_size, 1)
        };
        self.open_context(params, automatic_threads())
    }

    /// The shared context of `parallel` slots of `context_size` cells,
    /// each slot a KV stream of its own (as llama-server's `-np N`), and,
    /// for a small model (which routes under `Routing::Auto`), a sequence
    /// aside for the routing step's prompts: one stream more (llama.cpp
    /// gives every stream the same share), of which it uses
    /// [`ASIDE_CELLS`].
    ///
    /// Streams rather than one unified pool: in a unified pool every token
    /// attends over the cells of every sequence (masked), which costs more
    /// the longer the conversations; streams keep each slot's attention to
    /// its own cells (8 sessions, measured once with the serve bench given
    /// a second batched configuration: 148 tok/s in streams against 137
    /// in one pool of 8 × 1024 cells, 1.02x and 0.90x llama-server's; see
    /// the README). A step carries its streams in one pass only while
    /// their sequence ids run without a gap (see `in_sequence_order` in
    /// `batch.rs`): a busy slot between idle ones costs a pass of its own,
    /// which a unified pool would not. A saved KV state records the number
    /// of streams, so it loads only into an engine of as many (else the
    /// prompt is evaluated again).
    fn start_engine(&self) -> Result<Arc<Engine>, ModelError> {
        let with_aside =
            self.info.parameters < SMALL_MODEL_PARAMETERS && self.parallel < LLAMA_MAX_SEQUENCES;
        let sequences = self.parallel.saturating_add(u32::from(with_aside));
        let cells = self.context_size.saturating_mul(sequences);
        let params = self.context_params(cells, sequences).with_kv_unified(false);
        // The shared context lives as long as the model and serves every
        // session: how busy the machine is the moment it opens says
        // little, so it takes the CPUs the process may use (a session's
        // own context samples the load instead).
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| i32::try_from(n.get()).unwrap_or(i32::MAX));
        let ctx = self.open_context(params, threads)?;
        let keep_alive: Arc<dyn std::any::Any + Send + Sync> = Arc::clone(&self.model) as _;
        Engine::start(
            ctx,
            self.parallel,
            self.context_size,
            with_aside,
            keep_alive,
        )
    }

    pub(crate) fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        let vocab = self.model.vocab();
        vocab.tokenize(text.as_bytes(), vocab.should_add_bos(), true)
    }
}

/// The most sequences a llama.cpp context holds (`LLAMA_MAX_SEQ`): an
/// engine of this many slots has no sequence aside.
const LLAMA_MAX_SEQUENCES: u32 = 256;

/// The sequence of a session's own context that the routing step's
/// prompts use, so the conversation's KV cache in sequence 0 stays.
const ASIDE_SEQ: i32 = 1;

/// KV cells a session's own context holds beyond its conversation's size,
/// for the routing step's prompts, and the most a batched engine's
/// sequence aside holds (no more than a slot; their text is bounded by
/// [`MAX_EVIDENCE_CHARS`]). A tool's prompt over this many tokens is not
/// weighed; a neutral prompt over it fails the step, and the model
/// decides as under `Routing::Free`.
const ASIDE_CELLS: u32 = 512;

/// [`ModelSession::score_aside`] in a shared context's sequence aside:
/// the log-probability of `tokens[from..]` after `tokens[..from]`, the
/// prefix the sequence holds reused, the rest sent to the engine in chunks
/// of `chunk` tokens (logits asked for only where they score).
fn score_in_engine_aside(
    engine: &Engine,
    aside: &mut AsideLease,
    tokens: &[LlamaToken],
    from: usize,
    chunk: usize,
) -> Result<(f64, Counters), ModelError> {
    let room = engine_aside_room(engine);
    // The last token is scored, never evaluated.
    if tokens.len().saturating_sub(1) > room as usize {
        return Err(ModelError::ContextFull {
            needed: tokens.len(),
            context: room,
        });
    }
    let from = from.clamp(1, tokens.len().max(1));
    // The token before the first scored one is evaluated now, for its logits.
    let scored_from = from - 1;
    let mut keep = common_prefix(&aside.cached, tokens).min(scored_from);
    if !engine.truncate(aside.seq, keep) {
        engine.truncate(aside.seq, 0);
        keep = 0;
    }
    aside.cached.truncate(keep);
    let end = tokens.len().saturating_sub(1).max(keep);
    let chunk = chunk.max(1);
    let mut score = 0.0;
    let mut at = keep;
    while at < end {
        let (stop, want) = if at < scored_from {
            ((at + chunk).min(scored_from).min(end), Want::Nothing)
        } else {
            ((at + chunk).min(end), Want::All)
        };
        let part = &tokens[at..stop];
        // A failed step leaves nothing of `part` in the sequence.
        let rows = engine.eval(aside.seq, part, at, want)?;
        aside.cached.extend_from_slice(part);
        for (row, next) in rows.iter().zip(&tokens[at + 1..]) {
            score += log_softmax(row, *next);
        }
        at = stop;
    }
    Ok((
        score,
        Counters {
            prompt_evaluated: (end - keep) as u64,
            prompt_reused: keep as u64,
            generated: 0,
        },
    ))
}

/// The tokens an engine's sequence aside holds: [`ASIDE_CELLS`], and no
/// more than a slot.
fn engine_aside_room(engine: &Engine) -> u32 {
    ASIDE_CELLS.min(engine.slot_size())
}

/// How many leading items `a` and `b` share.
fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The log-probability of `token` under `logits`.
fn log_softmax(logits: &[f32], token: LlamaToken) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| f64::from(l - max).exp()).sum();
    let logit = usize::try_from(token.0)
        .ok()
        .and_then(|i| logits.get(i).copied())
        .unwrap_or(f32::NEG_INFINITY);
    f64::from(logit - max) - sum.ln()
}

/// The template used when a GGUF carries none.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn check_gguf(path: &Path) -> Result<(), ModelError> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).map_err(|_| ModelError::NotFound(path.to_path_buf()))?;
    let mut magic = [0u8; 4];
    let read = file.read(&mut magic).unwrap_or(0);
    if read < 4 || &magic != b"GGUF" {
        return Err(ModelError::NotGguf {
            path: path.to_path_buf(),
            magic: String::from_utf8_lossy(&magic[..read]).into_owned(),
        });
    }
    Ok(())
}

/// What a routing step spent: its own work as a [`Generation`], and the
/// part of it that evaluated the conversation's prompt (with a call's
/// opening after it) for the step that follows to reuse.
struct Routed {
    step: Generation,
    conversation: Counters,
}

impl Default for Routed {
    fn default() -> Self {
        Routed {
            step: Generation::empty(),
            conversation: Counters::default(),
        }
    }
}

/// One conversation's context: the KV cache holds the tokens of the last
/// prompt and reply, and each turn evaluates only what comes after the
/// longest common prefix.
pub struct ModelSession {
    // Dropped before `model` (fields drop in order): a context of its own
    // borrows the model (see `Model::new_context`).
    kv: Kv,
    model: Arc<Model>,
    cached: Vec<LlamaToken>,
    totals: Counters,
    /// The logits after the last evaluated token.
    last_logits: Vec<f32>,
    /// The grounded argument values in force (see [`ArgumentValues`]).
    grounding: ArgumentValues,
    /// Set by the caller to stop a completion between chunks of its
    /// prompt, before the first token (see [`ModelSession::set_cancel`]).
    cancel: Option<Arc<AtomicBool>>,
}

/// Where a session's KV cache lives.
enum Kv {
    /// A context of its own: the conversation in sequence 0, bounded to
    /// `size` tokens, and, where `aside` is some, the routing step's
    /// prompts in [`ASIDE_SEQ`] (`aside` holds the tokens that sequence
    /// holds).
    Own {
        ctx: LlamaContext<'static>,
        size: u32,
        aside: Option<Vec<LlamaToken>>,
    },
    /// A slot of the model's shared context, lent per generation, and
    /// the engine's sequence aside while the routing step holds it.
    Shared {
        engine: Arc<Engine>,
        lease: Option<Lease>,
        aside: Option<AsideLease>,
        owner: u64,
    },
}

impl Drop for ModelSession {
    fn drop(&mut self) {
        self.clear_aside();
        self.end_generation();
        if let Kv::Shared { engine, owner, .. } = &self.kv {
            engine.disown(*owner);
        }
    }
}

impl std::fmt::Debug for ModelSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSession")
            .field("cached_tokens", &self.cached.len())
            .field("totals", &self.totals)
            .finish()
    }
}

impl ModelSession {
    /// Sets the grounded argument values that the tool-call grammars of
    /// the next completions use (none by default).
    pub fn set_argument_values(&mut self, grounding: ArgumentValues) {
        self.grounding = grounding;
    }

    /// A flag that, once set, stops the next completions while their
    /// prompt is still being evaluated: between chunks of it, so that a
    /// client gone during a long prompt (thousands of tokens take a large
    /// model on a CPU minutes) does not hold the model until it ends.
    /// What was evaluated stays cached. Once tokens come, `on_token`
    /// returning `false` stops generation as before.
    pub fn set_cancel(&mut self, cancel: Option<Arc<AtomicBool>>) {
        self.cancel = cancel;
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|flag| flag.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Counters over the session's life.
    pub fn totals(&self) -> Counters {
        self.totals
    }

    /// Tokens currently in the KV cache.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len()
    }

    /// Saves the KV cache and the tokens it holds to `path`, so a resumed
    /// session reuses it on its next turn.
    pub fn save_state(&mut self, path: &StateFile) -> Result<(), ModelError> {
        match &self.kv {
            Kv::Own { ctx, .. } => path
                .save_with(|named| ctx.state_save_file(named, &self.cached).map(|_| ()))
                .map_err(|e| ModelError::Backend(format!("saving the session state: {e}"))),
            Kv::Shared { engine, owner, .. } => {
                // Only a slot that still holds this session's tokens has
                // anything to save.
                let Some(lease) = engine.acquire_own(*owner) else {
                    return Ok(());
                };
                let saved = engine.save(lease.seq, path.clone(), lease.cached.clone());
                engine.release(lease);
                saved
            }
        }
    }

    /// Restores a KV cache saved by [`save_state`](Self::save_state);
    /// returns how many tokens it holds.
    pub fn load_state(&mut self, path: &StateFile) -> Result<usize, ModelError> {
        let (ctx, capacity) = match &mut self.kv {
            Kv::Own { ctx, size, aside } => {
                if let Some(aside) = aside {
                    aside.clear();
                }
                (ctx, *size as usize)
            }
            Kv::Shared { engine, owner, .. } => {
                let engine = Arc::clone(engine);
                let Some(mut lease) = engine.acquire(*owner, None) else {
                    return Err(ModelError::Backend("no slot to load the state into".into()));
                };
                let loaded = engine.load(lease.seq, path.clone());
                lease.cached = loaded.as_ref().map(Vec::clone).unwrap_or_default();
                engine.release(lease);
                return loaded.map(|tokens| tokens.len());
            }
        };
        match path.load_with(|named| ctx.state_load_file(named, capacity)) {
            Ok(tokens) => {
                self.cached = tokens;
                Ok(self.cached.len())
            }
            Err(err) => {
                self.clear_cache();
                Err(ModelError::Backend(format!(
                    "loading the session state: {err}"
                )))
            }
        }
    }

    /// Forgets the KV cache (the next turn evaluates its whole prompt).
    pub fn clear_cache(&mut self) {
        match &mut self.kv {
            Kv::Own { ctx, aside, .. } => {
                ctx.clear_kv_cache();
                if let Some(aside) = aside {
                    aside.clear();
                }
            }
            Kv::Shared {
                engine,
                lease,
                owner,
                ..
            } => match lease {
                Some(lease) => {
                    engine.truncate(lease.seq, 0);
                }
                None => engine.disown(*owner),
            },
        }
        self.cached.clear();
    }

    /// The context size this session's conversation must fit in.
    fn n_ctx(&self) -> u32 {
        match &self.kv {
            Kv::Own { size, .. } => *size,
            Kv::Shared { engine, .. } => engine.slot_size(),
        }
    }

    /// Runs `work` holding a slot of the shared context (nothing to take
    /// with a context of its own). A caller that gives up while it waits
    /// for a slot gets a cancelled generation, nothing evaluated.
    fn in_slot(
        &mut self,
        work: impl FnOnce(&mut Self) -> Result<Generation, ModelError>,
    ) -> Result<Generation, ModelError> {
        let waiting = Instant::now();
        if !self.begin_generation() {
            return Ok(Generation {
                stop: StopReason::Cancelled,
                prompt_ms: waiting.elapsed().as_secs_f64() * 1000.0,
                ..Generation::empty()
            });
        }
        let done = work(self);
        self.end_generation();
        done
    }

    /// Takes a slot of the shared context for one generation (waiting for
    /// one when all are busy); its cached tokens become this session's.
    /// `false` when the session's cancel flag was set while it waited.
    fn begin_generation(&mut self) -> bool {
        if let Kv::Shared {
            engine,
            lease,
            owner,
            ..
        } = &mut self.kv
        {
            if lease.is_none() {
                let Some(mut taken) = engine.acquire(*owner, self.cancel.as_deref()) else {
                    return false;
                };
                self.cached = std::mem::take(&mut taken.cached);
                *lease = Some(taken);
            }
        }
        true
    }

    /// Gives the slot back with what its cache holds.
    fn end_generation(&mut self) {
        if let Kv::Shared { engine, lease, .. } = &mut self.kv {
            if let Some(mut taken) = lease.take() {
                taken.cached = std::mem::take(&mut self.cached);
                engine.release(taken);
            }
        }
    }

    /// Evaluates `tokens` after what is cached and returns the logits
    /// `want` asks for (the last ones are also kept for sampling).
    fn eval(&mut self, tokens: &[LlamaToken], want: Want) -> Result<Vec<Vec<f32>>, ModelError> {
        let start = self.cached.len();
        let rows = match &mut self.kv {
            Kv::Own { ctx, .. } => {
                let mut batch = LlamaBatch::new(tokens.len().max(1), 1);
                for (i, token) in tokens.iter().enumerate() {
                    let logits = match want {
                        Want::Nothing => false,
                        Want::Last => i + 1 == tokens.len(),
                        Want::All => true,
                    };
                    batch
                        .add(*token, (start + i) as i32, &[0], logits)
                        .map_err(|e| ModelError::Decode(e.to_string()))?;
                }
                if let Err(err) = ctx.decode(&mut batch) {
                    // Nothing of a failed decode stays in the cache.
                    let _ = ctx.kv_cache_seq_rm(0, Some(start as u32), None);
                    return Err(ModelError::Decode(err.to_string()));
                }
                match want {
                    Want::Nothing => Vec::new(),
                    Want::Last => vec![ctx.get_logits_ith(tokens.len() as i32 - 1).to_vec()],
                    Want::All => (0..tokens.len() as i32)
                        .map(|i| ctx.get_logits_ith(i).to_vec())
                        .collect(),
                }
            }
            Kv::Shared { engine, lease, .. } => {
                let seq = lease.as_ref().map(|l| l.seq).ok_or_else(|| {
                    ModelError::Backend("no slot taken for this generation".into())
                })?;
                engine.eval(seq, tokens, start, want)?
            }
        };
        self.cached.extend_from_slice(tokens);
        if let Some(last) = rows.last() {
            self.last_logits.clone_from(last);
        }
        Ok(rows)
    }

    /// Keeps the first `keep` cached tokens and drops the rest.
    fn truncate_cache(&mut self, keep: usize) {
        let removed = match &mut self.kv {
            Kv::Own { ctx, .. } => ctx.kv_cache_seq_rm(0, Some(keep as u32), None).is_ok(),
            Kv::Shared {
                engine,
                lease: Some(lease),
                ..
            } => engine.truncate(lease.seq, keep),
            Kv::Shared { lease: None, .. } => false,
        };
        if removed {
            self.cached.truncate(keep);
        } else {
            self.clear_cache();
        }
    }

    /// Generates the assistant's next turn for `messages`, offering `tools`
    /// (OpenAI tool objects) under `tool_choice`, and parses its tool calls.
    /// `on_token` gets each piece of text as it is produced and returns
    /// `false` to stop.
    #[allow(clippy::too_many_arguments)]
    pub fn complete(
        &mut self,
        messages: &[Message],
        tools: &[Value],
        tool_choice: &ToolChoice,
        sampling: &SamplingOptions,
        response_format: Option<&Value>,
        on_token: &mut dyn FnMut(&str) -> bool,
        next_id: &mut dyn FnMut() -> String,
    ) -> Result<Generation, ModelError> {
        self.in_slot(|session| {
            session.complete_in_slot(
                messages,
                tools,
                tool_choice,
                sampling,
                response_format,
                on_token,
                next_id,
            )
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn complete_in_slot(
        &mut self,
        messages: &[Message],
        tools: &[Value],
        tool_choice: &ToolChoice,
        sampling: &SamplingOptions,
        response_format: Option<&Value>,
        on_token: &mut dyn FnMut(&str) -> bool,
        next_id: &mut dyn FnMut() -> String,
    ) -> Result<Generation, ModelError> {
        // The prompt lists every tool whenever any is offered; a name that
        // matches no tool offers none, and shows none.
        let mut offered = offered_tools(tools, tool_choice);
        let rendered = prompt_tools(tools, &offered);
        // Routing narrows the grammar, never the prompt: one render serves both.
        let prompt = self.model.renderer.render(messages, rendered)?;
        let mut routing = None;
        let routed;
        let tool_choice = match tool_choice {
            ToolChoice::Auto
                if self.constrains(sampling.routing)
                    && !offered.is_empty()
                    && messages.last().is_some_and(|m| m.role == Role::User) =>
            {
                // A template that refuses the routing questions (strict
                // role alternation), or a prompt they would overflow,
                // leaves the step to the model, as under `Free`.
                let (choice, generation) = match self.route(messages, &prompt, &offered) {
                    Ok(routed) => routed,
                    Err(err) => {
                        tracing::warn!(%err, "the routing step failed; the model decides freely");
                        (None, Routed::default())
                    }
                };
                routing = Some(generation);
                match choice {
                    Some(name) => {
                        routed = ToolChoice::Named(name);
                        offered = offered_tools(tools, &routed);
                        &routed
                    }
                    None => tool_choice,
                }
            }
            other => other,
        };
        let grammar = match tool_choice {
            ToolChoice::Auto | ToolChoice::None if response_format.is_some() => {
                let schema = response_format.map(Value::to_string).unwrap_or_default();
                let grammar = llama_cpp_2::json_schema_to_grammar(&schema)
                    .map_err(|e| ModelError::Grammar(format!("response_format: {e}")))?;
                offered.clear();
                Some((grammar, None))
            }
            ToolChoice::None => None,
            _ if offered.is_empty() => None,
            // In the model's own call syntax: lazily under `auto`, from
            // the first token when a call is required.
            ToolChoice::Auto => {
                let CallGrammar { gbnf, trigger } = format_grammar(
                    self.model.info.tool_format,
                    &offered,
                    &self.grounding,
                    sampling.calls_per_reply,
                )?;
                Some((gbnf, Some(trigger)))
            }
            ToolChoice::Required | ToolChoice::Named(_) => {
                let grammar = format_grammar(
                    self.model.info.tool_format,
                    &offered,
                    &self.grounding,
                    sampling.calls_per_reply,
                )?;
                Some((grammar.gbnf, None))
            }
        };
        let mut generation = self.generate_in_slot(
            &prompt,
            grammar
                .as_ref()
                .map(|(g, trigger)| (g.as_str(), trigger.as_ref())),
            sampling,
            on_token,
        )?;
        if let Some(routing) = routing {
            // What the routing step evaluated is work done for this turn;
            // what its prompts reused is the same cached prefix counted
            // again, so it is not added. The conversation's prompt that it
            // evaluated comes to this step as reused: it is this request's
            // prompt work all the same, not a prefix cached before.
            // Its prefill also evaluated the opening of a call after the
            // prompt, which is no part of it: of what this step reused,
            // only what lies past the prefix cached before the request
            // (and no more than the prefill evaluated) moves over.
            let Routed { step, conversation } = routing;
            let moved = conversation.prompt_evaluated.min(
                generation
                    .counters
                    .prompt_reused
                    .saturating_sub(conversation.prompt_reused),
            );
            generation.counters.prompt_reused -= moved;
            generation.counters.prompt_evaluated += step.counters.prompt_evaluated;
            generation.routing_prompt_evaluated =
                step.routing_prompt_evaluated + (conversation.prompt_evaluated - moved);
            generation.prompt_ms += step.prompt_ms;
            generation.routing_ms = step.routing_ms;
        }
        if !offered.is_empty() {
            generation.turn = parse_reply(&generation.text, &offered, generation.stop, next_id);
            // Where DRY guards a small model against its own repeats, a
            // call it writes twice in one reply is such a repeat too.
            if self.model.dry_multiplier(sampling) > 0.0 {
                let dropped = drop_repeated_calls(&mut generation.turn.tool_calls);
                if dropped > 0 {
                    tracing::debug!(dropped, "dropped calls that repeat one of the same reply");
                }
            }
            if !generation.turn.tool_calls.is_empty() {
                generation.call_path = Some(if grammar.is_some() {
                    CallPath::Grammar
                } else {
                    CallPath::Parsed
                });
            }
        }
        Ok(generation)
    }

    /// Whether `routing` takes the constrained step in this session:
    /// under `Auto`, only where the step's prompts can run aside (a small
    /// model's context of its own, or its shared context's sequence
    /// aside), so it never costs the conversation's cache.
    fn constrains(&self, routing: Routing) -> bool {
        match routing {
            Routing::Constrained => true,
            Routing::Free => false,
            Routing::Auto => match &self.kv {
                Kv::Own { aside, .. } => aside.is_some(),
                Kv::Shared { engine, .. } => engine.has_aside(),
            },
        }
    }

    /// The constrained routing step (see [`Routing::Constrained`]).
    ///
    /// First, whether any tool fits: for each tool, how much likelier the
    /// model finds the user's message after a system message that tells
    /// of that tool than after one that tells of none ([`tool_evidence`]).
    /// Where no tool has [`ROUTING_EVIDENCE_NATS`], counting
    /// [`INSTRUMENT_NATS`] for one the message asks for as its means ("with
    /// Python", [`instruments_in`]), no tool is named.
    /// Then which: each tool is also scored by how likely the model finds
    /// a call to it, opened the way the model's own syntax opens one
    /// ([`ToolFormat::name_frame`]: `<tool_call>\n{"name": "NAME"` for
    /// Hermes), by the words of its name the message holds (more for the
    /// one that opens a request, its verb), by [`NAMED_CHOICE_NATS`] where
    /// the message names one of its enumerated values, and by
    /// [`INSTRUMENT_NATS`] where it asks for one as its means;
    /// [`RoutingScores::choice`] adds them, among the tools asked for as
    /// the means where only the means opened the gate. The name prompts
    /// share the conversation with each other and with the step that
    /// follows, so each evaluates only what is its own; the evidence
    /// prompts run aside (see [`ASIDE_SEQ`], and a batched engine's
    /// sequence aside).
    ///
    /// [`ROUTING_EVIDENCE_NATS`]: crate::routing::ROUTING_EVIDENCE_NATS
    /// [`NAMED_CHOICE_NATS`]: crate::routing::NAMED_CHOICE_NATS
    /// [`INSTRUMENT_NATS`]: crate::routing::INSTRUMENT_NATS
    ///
    /// [`tool_evidence`]: Self::tool_evidence
    fn route(
        &mut self,
        messages: &[Message],
        prompt: &str,
        offered: &[Value],
    ) -> Result<(Option<String>, Routed), ModelError> {
        let started = Instant::now();
        let query = messages.last().map(Message::text).unwrap_or_default();
        // Read as far as the evidence prompts read it.
        let query = clip(query.trim(), MAX_EVIDENCE_CHARS);
        // Scores are kept by index: tools without a name take no part.
        let offered: Vec<&Value> = offered.iter().filter(|t| tool_name(t).is_some()).collect();
        self.take_aside();
        let evidence = self.tool_evidence(query, &offered);
        self.clear_aside();
        let (evidence, counters) = evidence?;
        let mut spent = Routed {
            step: Generation {
                counters,
                routing_prompt_evaluated: counters.prompt_evaluated,
                ..Generation::empty()
            },
            conversation: Counters::default(),
        };
        let names: Vec<&str> = offered.iter().filter_map(|t| tool_name(t)).collect();
        let mut scores = RoutingScores {
            named: named_choices_in(query, &offered),
            instrument: instruments_in(query, &offered),
            evidence,
            ..RoutingScores::default()
        };
        let choice = if !scores.some_tool_fits() || names.is_empty() {
            None
        } else if let [only] = names.as_slice() {
            Some(only.to_string())
        } else {
            // Each name as the model's own syntax opens a call with it.
            let (open, close) = self.model.info.tool_format.name_frame();
            let opening = format!("{prompt}{open}");
            let shared = self.model.tokenize(&opening);
            // The conversation's prompt, which the step that follows
            // reuses, is the prompt's time, not the routing's. Its last
            // token is left to the first name's score, which evaluates it
            // for its logits.
            self.check_room(&shared)?;
            let prefilling = Instant::now();
            let counters = self.prefill(&shared[..shared.len().saturating_sub(1).max(1)])?;
            self.totals.add(counters);
            spent.step.counters.add(counters);
            spent.conversation = counters;
            spent.step.prompt_ms = prefilling.elapsed().as_secs_f64() * 1000.0;
            if self.cancelled() {
                // The step that follows sees the flag and stops too.
                return Ok((None, spent));
            }
            for name in &names {
                let tokens = self.model.tokenize(&format!("{opening}{name}{close}"));
                let from = common_prefix(&tokens, &shared);
                let (score, counters) = self.score_continuation(&tokens, from)?;
                spent.step.counters.add(counters);
                spent.step.routing_prompt_evaluated += counters.prompt_evaluated;
                scores.name.push(score);
            }
            scores.words = name_words_in(query, &names);
            scores.verbs = name_verbs_in(query, &names);
            scores
                .choice()
                .and_then(|i| names.get(i))
                .map(|name| name.to_string())
        };
        tracing::debug!(?scores, ?choice, "routing step");
        spent.step.routing_ms = started.elapsed().as_secs_f64() * 1000.0 - spent.step.prompt_ms;
        Ok((choice, spent))
    }

    /// For each of `offered`, in nats, how much the model's log-likelihood
    /// of the user's message `query` rises when a system message tells of
    /// that tool, over a system message that tells of none: a
    /// noisy-channel score, the log Bayes factor of "this request is for
    /// this tool". It asks how well the tool explains the request, not
    /// whether the model would like to call it, which a small model says
    /// yes to whatever is asked. The message and each description are
    /// clipped to [`MAX_EVIDENCE_CHARS`].
    fn tool_evidence(
        &mut self,
        query: &str,
        offered: &[&Value],
    ) -> Result<(Vec<f64>, Counters), ModelError> {
        let query = clip(query.trim(), MAX_EVIDENCE_CHARS);
        let mut counters = Counters::default();
        if query.is_empty() {
            // Nothing asked: no tool explains it.
            return Ok((vec![0.0; offered.len()], counters));
        }
        let (tokens, from) = self.evidence_prompt(None, query)?;
        let (neutral, spent) = self.score_aside(&tokens, from)?;
        counters.add(spent);
        let mut evidence = Vec::with_capacity(offered.len());
        for tool in offered {
            if self.cancelled() {
                // No tool is weighed once the caller gave up; the step
                // that follows sees the flag and stops.
                evidence.push(f64::NEG_INFINITY);
                continue;
            }
            let (tokens, from) = self.evidence_prompt(Some(tool), query)?;
            if tokens.len().saturating_sub(1) > self.aside_room() as usize {
                // A tool told of at such length is not weighed; the others are.
                evidence.push(f64::NEG_INFINITY);
                continue;
            }
            let (score, spent) = self.score_aside(&tokens, from)?;
            counters.add(spent);
            evidence.push(score - neutral);
        }
        Ok((evidence, counters))
    }

    /// The routing step's prompt: a system message that tells of `tool`
    /// (or a neutral one), then `query` as the user's message, rendered
    /// with the model's template. Returns its tokens and where the user's
    /// words start in them.
    fn evidence_prompt(
        &self,
        tool: Option<&Value>,
        query: &str,
    ) -> Result<(Vec<LlamaToken>, usize), ModelError> {
        let system = match tool {
            Some(tool) => format!("You can call this tool:\n{}\n", describe_tool(tool)),
            None => "You are a helpful assistant.".to_string(),
        };
        let render = |text: &str| {
            self.model
                .renderer
                .render(&[Message::system(system.clone()), Message::user(text)], &[])
        };
        let rendered = render(query)?;
        // The user's words start where the rendering of an empty message
        // parts from this one; a template that does not show them there,
        // as written, cannot be scored.
        let at = common_prefix(rendered.as_bytes(), render("")?.as_bytes());
        if !rendered.is_char_boundary(at) || !rendered[at..].starts_with(query) {
            return Err(ModelError::Backend(
                "the routing step: the chat template does not show the message as written".into(),
            ));
        }
        // The user's words and what closes their turn on that line.
        let after = at + query.len();
        let end = rendered[after..]
            .find('\n')
            .map_or(rendered.len(), |i| after + i);
        let head = self.model.tokenize(&rendered[..at]);
        let tokens = self.model.tokenize(&rendered[..end]);
        let from = common_prefix(&tokens, &head);
        Ok((tokens, from))
    }

    /// The log-probability the model gives `tokens[from..]` after
    /// `tokens[..from]`, evaluated aside from the conversation: in
    /// [`ASIDE_SEQ`] of a context of its own, or in the sequence aside of
    /// a shared context (taken by [`take_aside`](Self::take_aside)),
    /// reusing the prefix that sequence holds. A large model's context has
    /// no sequence aside (see `Model::session`), nor its shared context;
    /// the conversation's own sequence is used, and the next step
    /// evaluates its prompt afresh.
    fn score_aside(
        &mut self,
        tokens: &[LlamaToken],
        from: usize,
    ) -> Result<(f64, Counters), ModelError> {
        let batch_size = self.chunk_size();
        if let Kv::Shared {
            engine,
            aside: Some(aside),
            ..
        } = &mut self.kv
        {
            let counters = score_in_engine_aside(engine, aside, tokens, from, batch_size);
            if let Ok((_, counters)) = &counters {
                self.totals.add(*counters);
            }
            return counters;
        }
        let Kv::Own {
            ctx,
            aside: Some(aside),
            ..
        } = &mut self.kv
        else {
            return self.score_continuation(tokens, from);
        };
        // The last token is scored, never evaluated.
        if tokens.len().saturating_sub(1) > ASIDE_CELLS as usize {
            return Err(ModelError::ContextFull {
                needed: tokens.len(),
                context: ASIDE_CELLS,
            });
        }
        let from = from.clamp(1, tokens.len().max(1));
        // The token before the first scored one is evaluated now, for its logits.
        let mut keep = common_prefix(aside, tokens).min(from - 1);
        if ctx
            .kv_cache_seq_rm(ASIDE_SEQ, Some(keep as u32), None)
            .is_err()
        {
            let _ = ctx.kv_cache_seq_rm(ASIDE_SEQ, None, None);
            keep = 0;
        }
        aside.truncate(keep);
        let mut score = 0.0;
        let fresh = &tokens[keep..tokens.len().saturating_sub(1).max(keep)];
        for (chunk_index, chunk) in fresh.chunks(batch_size).enumerate() {
            let first = keep + chunk_index * batch_size;
            let mut batch = LlamaBatch::new(chunk.len(), 1);
            for (i, token) in chunk.iter().enumerate() {
                let position = first + i;
                batch
                    .add(*token, position as i32, &[ASIDE_SEQ], position + 1 >= from)
                    .map_err(|e| ModelError::Decode(e.to_string()))?;
            }
            if let Err(err) = ctx.decode(&mut batch) {
                let _ = ctx.kv_cache_seq_rm(ASIDE_SEQ, Some(first as u32), None);
                return Err(ModelError::Decode(err.to_string()));
            }
            aside.extend_from_slice(chunk);
            for (i, next) in tokens[first + 1..].iter().take(chunk.len()).enumerate() {
                if first + i + 1 >= from {
                    score += log_softmax(ctx.get_logits_ith(i as i32), *next);
                }
            }
        }
        let counters = Counters {
            prompt_evaluated: fresh.len() as u64,
            prompt_reused: keep as u64,
            generated: 0,
        };
        self.totals.add(counters);
        Ok((score, counters))
    }

    /// The most tokens a routing prompt may have, but the last (which is
    /// scored, never evaluated).
    fn aside_room(&self) -> u32 {
        match &self.kv {
            Kv::Own { .. } => ASIDE_CELLS,
            Kv::Shared { engine, .. } => engine_aside_room(engine),
        }
    }

    /// Takes the shared context's sequence aside for the routing step,
    /// where it has one (waiting while another session's step holds it).
    fn take_aside(&mut self) {
        if let Kv::Shared { engine, aside, .. } = &mut self.kv {
            if aside.is_none() {
                *aside = engine.acquire_aside();
            }
        }
    }

    /// Empties the sequence aside of a context of its own (see
    /// [`score_aside`](Self::score_aside)), and gives a shared context's
    /// back as it is (its cells are its own, and the next step reuses the
    /// template's head).
    fn clear_aside(&mut self) {
        if let Kv::Shared { engine, aside, .. } = &mut self.kv {
            if let Some(lease) = aside.take() {
                engine.release_aside(lease);
            }
            return;
        }
        if let Kv::Own {
            ctx,
            aside: Some(aside),
            ..
        } = &mut self.kv
        {
            if !aside.is_empty() {
                let _ = ctx.kv_cache_seq_rm(ASIDE_SEQ, None, None);
                aside.clear();
            }
        }
    }

    /// Whether the context holds `tokens` and room for one token after
    /// them; [`ModelError::ContextFull`] where it does not.
    fn check_room(&self, tokens: &[LlamaToken]) -> Result<(), ModelError> {
        let context = self.n_ctx();
        if tokens.len() + 1 > context as usize {
            return Err(ModelError::ContextFull {
                needed: tokens.len(),
                context,
            });
        }
        Ok(())
    }

    /// The log-probability the model gives `tokens[from..]` after
    /// `tokens[..from]`. The KV cache is left holding `tokens`.
    fn score_continuation(
        &mut self,
        tokens: &[LlamaToken],
        from: usize,
    ) -> Result<(f64, Counters), ModelError> {
        let from = from.clamp(1, tokens.len());
        self.check_room(tokens)?;
        let counters = self.prefill(&tokens[..from])?;
        self.totals.add(counters);
        let rest = &tokens[from..];
        let Some((first, _)) = rest.split_first() else {
            return Ok((0.0, counters));
        };
        let mut score = log_softmax(&self.last_logits, *first);
        let scored = &rest[..rest.len() - 1];
        let batch_size = self.chunk_size();
        for (chunk_index, chunk) in scored.chunks(batch_size).enumerate() {
            let rows = self.eval(chunk, Want::All)?;
            let next_tokens = &rest[1 + chunk_index * batch_size..];
            for (row, next) in rows.iter().zip(next_tokens) {
                score += log_softmax(row, *next);
            }
        }
        let evaluated = Counters {
            prompt_evaluated: scored.len() as u64,
            ..Counters::default()
        };
        self.totals.add(evaluated);
        Ok((
            score,
            Counters {
                prompt_evaluated: counters.prompt_evaluated + evaluated.prompt_evaluated,
                ..counters
            },
        ))
    }

    /// Generates from a raw prompt, optionally under a grammar: from the
    /// first token, or (lazily) from where its trigger opens a call.
    pub fn generate(
        &mut self,
        prompt: &str,
        grammar: Option<(&str, Option<&CallTrigger>)>,
        sampling: &SamplingOptions,
        on_token: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        self.in_slot(|session| session.generate_in_slot(prompt, grammar, sampling, on_token))
    }

    fn generate_in_slot(
        &mut self,
        prompt: &str,
        grammar: Option<(&str, Option<&CallTrigger>)>,
        sampling: &SamplingOptions,
        on_token: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let started = Instant::now();
        let tokens = self.model.tokenize(prompt);
        let context = self.n_ctx();
        self.check_room(&tokens)?;
        let counters = self.prefill(&tokens)?;
        let prompt_ms = started.elapsed().as_secs_f64() * 1000.0;
        if self.cancelled() {
            // Stopped in the prompt (or just after it): nothing generated.
            self.totals.add(counters);
            return Ok(Generation {
                stop: StopReason::Cancelled,
                counters,
                prompt_ms,
                ..Generation::empty()
            });
        }
        let generating = Instant::now();
        let mut sampler = self.sampler(grammar, sampling)?;
        let model = Arc::clone(&self.model);
        let vocab = model.model.vocab();
        let mut text = String::new();
        let mut pending = Vec::new();
        let mut generated = 0u64;
        let mut sampling_ms = 0.0;
        let mut stop = StopReason::MaxTokens;
        // The lazy grammar's trigger, until a call has opened.
        let mut awaiting = grammar.and_then(|(_, trigger)| trigger);
        while generated < u64::from(sampling.max_tokens) {
            if self.cached.len() + 1 >= context as usize {
                break;
            }
            // Until the lazy grammar has triggered, a token may complete
            // its trigger.
            let picking = Instant::now();
            let picked = self.sample_next(&mut sampler, awaiting.map(|t| (t, text.as_str())));
            sampling_ms += picking.elapsed().as_secs_f64() * 1000.0;
            let token = match picked {
                Ok(token) => token,
                Err(SampleFailure::NothingAllowed) => {
                    stop = StopReason::GrammarDeadEnd;
                    break;
                }
                Err(SampleFailure::Rejected(reason)) => {
                    return Err(ModelError::Grammar(reason));
                }
            };
            if vocab.is_eog(token) {
                stop = StopReason::EndOfTurn;
                break;
            }
            generated += 1;
            pending.extend(vocab.token_to_piece(token, true, None));
            let piece = take_utf8(&mut pending);
            if awaiting.is_some_and(|trigger| trigger.completed_by(&text, &piece)) {
                awaiting = None;
            }
            text.push_str(&piece);
            self.eval(&[token], Want::Last)?;
            if !piece.is_empty() && !on_token(&piece) {
                stop = StopReason::Cancelled;
                break;
            }
        }
        let turn_counters = Counters {
            generated,
            ..counters
        };
        self.totals.add(turn_counters);
        Ok(Generation {
            turn: ParsedTurn {
                content: Some(text.clone()),
                tool_calls: Vec::new(),
            },
            text,
            stop,
            counters: turn_counters,
            routing_prompt_evaluated: 0,
            prompt_ms,
            routing_ms: 0.0,
            generation_ms: generating.elapsed().as_secs_f64() * 1000.0,
            sampling_ms,
            call_path: None,
            server_ms: None,
        })
    }

    /// Brings the KV cache to `tokens`, evaluating only what follows the
    /// longest common prefix with what is cached.
    fn prefill(&mut self, tokens: &[LlamaToken]) -> Result<Counters, ModelError> {
        let common = common_prefix(&self.cached, tokens);
        // At least one token must be evaluated to have logits to sample from.
        let reuse = common.min(tokens.len().saturating_sub(1));
        if reuse < self.cached.len() {
            self.truncate_cache(reuse);
        }
        let reuse = self.cached.len();
        let fresh = &tokens[reuse..];
        let batch_size = self.chunk_size();
        let mut evaluated = 0;
        for (chunk_index, chunk) in fresh.chunks(batch_size).enumerate() {
            if self.cancelled() {
                break;
            }
            evaluated += chunk.len();
            let last_chunk = (chunk_index + 1) * batch_size >= fresh.len();
            self.eval(
                chunk,
                if last_chunk {
                    Want::Last
                } else {
                    Want::Nothing
                },
            )?;
        }
        Ok(Counters {
            prompt_evaluated: evaluated as u64,
            prompt_reused: reuse as u64,
            generated: 0,
        })
    }

    /// The most prompt tokens evaluated in one call: the batch size for a
    /// context of its own, [`PROMPT_CHUNK`] on a shared one (so prompts
    /// interleave with the other sessions' generation).
    fn chunk_size(&self) -> usize {
        match &self.kv {
            Kv::Own { .. } => self.model.batch_size as usize,
            Kv::Shared { .. } => PROMPT_CHUNK,
        }
    }

    /// Picks the next token and has the sampler accept it.
    ///
    /// The token is chosen by [`StepSampler::pick`] (the chain's pick put
    /// to the grammar first, see [`GrammarCheck`]) and accepted by the
    /// grammar separately, through the `common` shim, which catches
    /// llama.cpp's C++ exceptions: `llama_sampler_sample` would let the
    /// grammar's "empty grammar stack" exception unwind into Rust, and that
    /// aborts the process. The exception happens when a token completes a
    /// lazy grammar's trigger and goes on with text the grammar rejects
    /// (`…within <tool_call` then `>.`): the sampler is then restored from
    /// a copy made before the token, the token is ruled out, and the next
    /// best is tried.
    fn sample_next(
        &self,
        sampler: &mut StepSampler,
        awaiting_trigger: Option<(&CallTrigger, &str)>,
    ) -> Result<LlamaToken, SampleFailure> {
        let vocab = self.model.model.vocab();
        let mut ruled_out: Vec<LlamaToken> = Vec::new();
        loop {
            let token = sampler
                .pick(&self.last_logits, &ruled_out)
                .ok_or(SampleFailure::NothingAllowed)?;
            // Generation ends at an end-of-generation token: accepting it
            // would only let an unfinished grammar abort the process.
            if vocab.is_eog(token) {
                return Ok(token);
            }
            let Some(grammar) = sampler.grammar.as_mut() else {
                sampler.chain.accept(token);
                return Ok(token);
            };
            // Only the token that completes the trigger can be refused
            // while the grammar waits: keep a copy to go back to.
            let completes_trigger = awaiting_trigger.is_some_and(|(trigger, text)| {
                let piece = vocab.token_to_piece(token, true, None);
                trigger.completed_by(text, &String::from_utf8_lossy(&piece))
            });
            let before = completes_trigger.then(|| grammar.clone());
            match (grammar.try_accept(token), before) {
                (Ok(()), _) => {
                    sampler.chain.accept(token);
                    return Ok(token);
                }
                (Err(_), Some(before)) if ruled_out.len() < MAX_RULED_OUT => {
                    *grammar = before;
                    ruled_out.push(token);
                }
                (Err(_), Some(_)) => return Err(SampleFailure::NothingAllowed),
                (Err(err), None) => {
                    return Err(SampleFailure::Rejected(format!(
                        "the grammar refused a token it had allowed ({err})"
                    )))
                }
            }
        }
    }

    fn sampler(
        &self,
        grammar: Option<(&str, Option<&CallTrigger>)>,
        options: &SamplingOptions,
    ) -> Result<StepSampler, ModelError> {
        let mut constrained = None;
        if let Some((grammar, trigger)) = grammar {
            let made = match trigger {
                // Plain patterns, searched for (see `CallTrigger::patterns`).
                Some(trigger) => LlamaSampler::grammar_lazy_patterns(
                    &self.model.model,
                    grammar,
                    "root",
                    &trigger.patterns(),
                    &[],
                ),
                None => LlamaSampler::grammar(&self.model.model, grammar, "root"),
            };
            constrained = Some(made.map_err(|e| ModelError::Grammar(e.to_string()))?);
        }
        let mut chain = Vec::new();
        let repeat_penalty = options.repeat_penalty_or_default();
        if (repeat_penalty - 1.0).abs() > f32::EPSILON
            || options.frequency_penalty != 0.0
            || options.presence_penalty != 0.0
        {
            chain.push(LlamaSampler::penalties(
                self.model.model.n_vocab(),
                64,
                repeat_penalty,
                options.frequency_penalty,
                options.presence_penalty,
            ));
        }
        let dry_multiplier = self.model.dry_multiplier(options);
        if dry_multiplier > 0.0 {
            chain.push(self.model.dry_sampler(dry_multiplier));
        }
        if options.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            let top_k = options.top_k_or_default();
            if top_k > 0 {
                chain.push(LlamaSampler::top_k(top_k));
            }
            chain.push(LlamaSampler::top_p(options.top_p, 1));
            chain.push(LlamaSampler::min_p(options.min_p_or_default(), 1));
            chain.push(LlamaSampler::temp(options.temperature));
            chain.push(LlamaSampler::dist(options.seed));
        }
        Ok(StepSampler {
            grammar: constrained,
            chain: LlamaSampler::chain_simple(chain),
            check: options.grammar_check,
        })
    }
}

/// One step's samplers: the call grammar, where there is one, apart from
/// the rest of the chain (penalties, DRY, then greedy or temperature), so
/// that the grammar can be asked about one token (see [`GrammarCheck`]).
struct StepSampler {
    grammar: Option<LlamaSampler>,
    chain: LlamaSampler,
    check: GrammarCheck,
}

impl StepSampler {
    /// The token the chain picks from `logits`, among those the grammar
    /// allows and not `ruled_out`; `None` where none is allowed. Nothing
    /// is accepted.
    fn pick(&mut self, logits: &[f32], ruled_out: &[LlamaToken]) -> Option<LlamaToken> {
        let candidates = || {
            let mut candidates = LlamaTokenDataArray::from_iter(
                (0_i32..)
                    .zip(logits)
                    .map(|(id, logit)| LlamaTokenData::new(LlamaToken::new(id), *logit, 0.0)),
                false,
            );
            for token in ruled_out {
                if let Some(data) = usize::try_from(token.0)
                    .ok()
                    .and_then(|i| candidates.data.get_mut(i))
                {
                    data.set_logit(f32::NEG_INFINITY);
                }
            }
            candidates
        };
        let picked = |candidates: &LlamaTokenDataArray| {
            candidates
                .selected
                .and_then(|i| candidates.data.get(i))
                .filter(|data| data.logit().is_finite() && !ruled_out.contains(&data.id()))
                .map(LlamaTokenData::id)
        };
        // The chain's pick from every token, where no grammar is asked or
        // the grammar is asked about that pick first.
        if self.grammar.is_none() || self.check == GrammarCheck::PickedFirst {
            let mut all = candidates();
            self.chain.apply(&mut all);
            let token = picked(&all);
            let Some(grammar) = &mut self.grammar else {
                return token;
            };
            if let Some(token) = token {
                let mut one =
                    LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 0.0, 0.0)], false);
                grammar.apply(&mut one);
                if one
                    .data
                    .first()
                    .is_some_and(|data| data.logit().is_finite())
                {
                    return Some(token);
                }
            }
        }
        // The chain's pick among the tokens the grammar allows.
        let mut allowed = candidates();
        if let Some(grammar) = &mut self.grammar {
            grammar.apply(&mut allowed);
        }
        self.chain.apply(&mut allowed);
        picked(&allowed)
    }
}

/// llama.cpp's defaults for its DRY sampler (`common/common.h`): the
/// penalty grows by this factor with each token of repeat…
const DRY_BASE: f32 = 1.75;
/// …past this many tokens, which repeat freely…
const DRY_ALLOWED_LENGTH: i32 = 2;
/// …and a repeat never reaches back across one of these.
const DRY_SEQUENCE_BREAKERS: [&str; 4] = ["\n", ":", "\"", "*"];
/// The most recent tokens of a step among which DRY looks for repeats.
const DRY_MOST_TOKENS: i32 = 8192;
/// The most DRY multipliers a model keeps a sampler made for.
const MAX_DRY_PROTOTYPES: usize = 4;

/// How many tokens that break the lazy grammar's trigger are ruled out in
/// one step before generation stops.
const MAX_RULED_OUT: usize = 32;

/// Why no next token was accepted.
enum SampleFailure {
    /// Nothing the grammar allows is left (the turn ends where it is).
    NothingAllowed,
    /// The sampler refused a token outside the trigger (a llama.cpp fault).
    Rejected(String),
}

/// The Hermes GBNF grammar for calls to any of `tools`, string
/// parameters narrowed to their grounded values.
pub fn tool_grammar(tools: &[Value], grounding: &ArgumentValues) -> Result<String, ModelError> {
    Ok(format_grammar(ToolFormat::Hermes, tools, grounding, CallCount::Many)?.gbnf)
}

/// The grammar for `count` calls to any of `tools` in `format`'s syntax,
/// and its lazy trigger (see [`crate::call_grammar`]).
pub fn format_grammar(
    format: ToolFormat,
    tools: &[Value],
    grounding: &ArgumentValues,
    count: CallCount,
) -> Result<CallGrammar, ModelError> {
    call_grammar(format, tools, grounding, count, &convert_schema).map_err(ModelError::Grammar)
}

/// llama.cpp's JSON-Schema-to-GBNF converter.
fn convert_schema(schema: &Value) -> Result<String, String> {
    llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|e| e.to_string())
}

/// Takes the longest valid UTF-8 prefix out of `pending`.
fn take_utf8(pending: &mut Vec<u8>) -> String {
    let mut text = String::new();
    loop {
        match std::str::from_utf8(pending) {
            Ok(valid) => {
                text.push_str(valid);
                pending.clear();
                return text;
            }
            Err(error) => {
                let valid = error.valid_up_to();
                text.push_str(&String::from_utf8_lossy(&pending[..valid]));
                match error.error_len() {
                    // Bytes that can never be UTF-8: one replacement
                    // character, and the rest is decoded on.
                    Some(bad) => {
                        pending.drain(..valid + bad);
                        text.push('\u{fffd}');
                    }
                    // An incomplete character: wait for the next piece.
                    None => {
                        pending.drain(..valid);
                        return text;
                    }
                }
            }
        }
    }
}
