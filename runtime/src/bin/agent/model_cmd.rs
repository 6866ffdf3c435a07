//! `agent model`: load a GGUF model (with a progress bar), or connect to a
//! served one, and show what it says about itself. Also the shared model
//! flags, config-file profiles included, and picking the backend from them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use stack_runtime::config::{ModelProfile, UserConfig};
use stack_runtime::model::llama::{Model, ModelOptions};
use stack_runtime::model::remote::{ApiKey, CallConstraint, RemoteConfig, RemoteModel, ToolPath};
use stack_runtime::model::{BackendInfo, ModelBackend};

/// Flags that choose and configure the model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// GGUF model file (default: the embedded SmolLM2-135M-Instruct).
    #[arg(long, value_name = "GGUF")]
    pub model: Option<PathBuf>,
    /// Context size in tokens (default 4096).
    #[arg(long, value_name = "TOKENS")]
    pub ctx_size: Option<u32>,
    /// CPU threads (default: llama.cpp's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Batch size for prompt processing.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub batch_size: u32,
    /// Layers to offload to the GPU (default: all with the `cuda` feature, else 0).
    #[arg(long)]
    pub gpu_layers: Option<u32>,
    /// Sessions decoded together on one context (continuous batching),
    /// each with a slot of --ctx-size tokens (default 1, a context per
    /// session; `agent serve` defaults to --max-running).
    #[arg(long, value_name = "N")]
    pub parallel: Option<u32>,
    /// A Jinja chat template file to use instead of the GGUF's own (the
    /// tool-call format is detected from it; see `agent model`).
    #[arg(long, value_name = "FILE", conflicts_with = "model_url")]
    pub chat_template_file: Option<PathBuf>,
    /// A served model's OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1
    /// (vLLM, SGLang, llama-server, Ollama), instead of a local GGUF.
    #[arg(long, value_name = "URL", conflicts_with = "model")]
    pub model_url: Option<String>,
    /// The served model's name (default: the server's first model).
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
    /// The environment variable holding the served model's API key.
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
    /// A file whose first line is the served model's API key.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust for a served model over
    /// https:// besides the public roots (a server behind an internal CA).
    #[arg(long, value_name = "FILE")]
    pub model_ca_file: Option<PathBuf>,
    /// How a served model's tool calls travel: auto, native or prompted.
    #[arg(long, value_name = "PATH")]
    pub tool_path: Option<String>,
    /// Ask a served model for OpenAI `strict` function schemas.
    #[arg(long)]
    pub strict: bool,
    /// Whether a served model's server constrains calls under
    /// `tool_choice: auto` with a structural tag: auto (vLLM and SGLang),
    /// structural-tag (any server) or off.
    #[arg(long, value_name = "HOW")]
    pub call_constraint: Option<String>,
    /// A model profile from the config file.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// The config file (default: ~/.config/stack-runtime/config.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ModelArgs {
    /// These flags, with those written before the subcommand where these
    /// leave one unset: `agent --model-url URL model` reads the URL as
    /// `agent model --model-url URL` does, rather than ignoring it.
    ///
    /// Which model is one choice: where these flags name one (a GGUF, a
    /// URL or a profile), nothing of the outer choice is mixed in.
    pub fn or_outer(self, outer: &ModelArgs) -> ModelArgs {
        let mut outer = outer.clone();
        if self.model.is_some() || self.model_url.is_some() || self.profile.is_some() {
            outer.model = None;
            outer.model_url = None;
            outer.profile = None;
            outer.model_name = None;
            outer.api_key_env = None;
            outer.api_key_file = None;
            outer.model_ca_file = None;
        }
        ModelArgs {
            model: self.model.or(outer.model),
            ctx_size: self.ctx_size.or(outer.ctx_size),
            threads: self.threads.or(outer.threads),
            batch_size: if self.batch_size == DEFAULT_BATCH_SIZE {
                outer.batch_size
            } else {
                self.batch_size
            },
            gpu_layers: self.gpu_layers.or(outer.gpu_layers),
            parallel: self.parallel.or(outer.parallel),
            chat_template_file: self.chat_template_file.or(outer.chat_template_file),
            model_url: self.model_url.or(outer.model_url),
            model_name: self.model_name.or(outer.model_name),
            api_key_env: self.api_key_env.or(outer.api_key_env),
            api_key_file: self.api_key_file.or(outer.api_key_file),
            model_ca_file: self.model_ca_file.or(outer.model_ca_file),
            tool_path: self.tool_path.or(outer.tool_path),
            strict: self.strict || outer.strict,
            call_constraint: self.call_constraint.or(outer.call_constraint),
            profile: self.profile.or(outer.profile),
            config: self.config.or(outer.config),
        }
    }

    /// These flags over the chosen profile: a flag wins over the profile.
    fn resolved(&self) -> anyhow::Result<ModelArgs> {
        let (path, missing_ok) = match &self.config {
            Some(path) => (Some(path.clone()), false),
            None => (stack_runtime::config::default_path(), true),
        };
        let config = match path {
            Some(path) => UserConfig::load(&path, missing_ok)?,
            None => UserConfig::default(),
        };
        let Some(profile) = config
            .profile(self.profile.as_deref())
            .map_err(anyhow::Error::msg)?
        else {
            return Ok(self.clone());
        };
        let flags_name_a_model = self.model.is_some() || self.model_url.is_some();
        if flags_name_a_model && self.profile.is_none() {
            // A model named on the command line replaces the default
            // profile whole: its server, name and key never reach another.
            return Ok(self.clone());
        }
        let ModelProfile {
            model,
            gpu_layers,
            ctx_size,
            url,
            model_name,
            api_key_env,
            api_key_file,
            ca_file,
            tool_path,
            strict,
            call_constraint,
        } = profile.clone();
        let mut args = self.clone();
        args.gpu_layers = args.gpu_layers.or(gpu_layers);
        args.ctx_size = args.ctx_size.or(ctx_size);
        if flags_name_a_model {
            return Ok(args);
        }
        args.model = model;
        args.model_url = url;
        args.model_name = args.model_name.or(model_name);
        // The key's source is one setting: a flag replaces the profile's.
        if args.api_key_env.is_none() && args.api_key_file.is_none() {
            args.api_key_env = api_key_env;
            args.api_key_file = api_key_file;
        }
        args.model_ca_file = args.model_ca_file.or(ca_file);
        args.tool_path = args.tool_path.or_else(|| {
            tool_path.map(|path| match path {
                ToolPath::Auto => "auto".to_string(),
                ToolPath::Native => "native".to_string(),
                ToolPath::Prompted => "prompted".to_string(),
            })
        });
        args.strict = args.strict || strict.unwrap_or(false);
        args.call_constraint = args.call_constraint.or_else(|| {
            call_constraint.map(|how| match how {
                CallConstraint::Auto => "auto".to_string(),
                CallConstraint::StructuralTag => "structural-tag".to_string(),
                CallConstraint::Off => "off".to_string(),
            })
        });
        Ok(args)
    }
}

/// The `--batch-size` default.
const DEFAULT_BATCH_SIZE: u32 = 512;

/// The `--ctx-size` default (a profile's own applies when the flag is unset).
const DEFAULT_CTX_SIZE: u32 = 4096;

/// A `~/` at the start of a path, as the user's home.
fn expand_home(path: &std::path::Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_path_buf(),
    }
}

/// The backend these flags choose: a served model when a URL is given (by
/// flag or profile), else the local GGUF. Connecting runs on `tokio`.
pub fn backend(
    args: &ModelArgs,
    quiet: bool,
    tokio: &tokio::runtime::Runtime,
) -> anyhow::Result<Arc<dyn ModelBackend>> {
    let args = args.resolved()?;
    let Some(url) = &args.model_url else {
        return Ok(load(&args, quiet)?);
    };
    let mut config = RemoteConfig::new(url.clone());
    config.model = args.model_name.clone();
    config.strict = args.strict;
    config.ca_file = args.model_ca_file.as_deref().map(expand_home);
    config.api_key = match (&args.api_key_env, &args.api_key_file) {
        (Some(var), _) => Some(ApiKey::from_env(var)?),
        (None, Some(file)) => Some(ApiKey::from_file(&expand_home(file))?),
        (None, None) => None,
    };
    config.tool_path = match args.tool_path.as_deref() {
        None | Some("auto") => ToolPath::Auto,
        Some("native") => ToolPath::Native,
        Some("prompted") => ToolPath::Prompted,
        Some(other) => anyhow::bail!("--tool-path must be auto, native or prompted (got {other})"),
    };
    config.call_constraint = match args.call_constraint.as_deref() {
        None | Some("auto") => CallConstraint::Auto,
        Some("structural-tag") => CallConstraint::StructuralTag,
        Some("off") => CallConstraint::Off,
        Some(other) => {
            anyhow::bail!("--call-constraint must be auto, structural-tag or off (got {other})")
        }
    };
    let model = tokio
        .block_on(RemoteModel::connect(config))
        .with_context(|| {
            format!(
                "connecting to the model server at {}",
                stack_runtime::model::remote::shown_url(url)
            )
        })?;
    Ok(model)
}

/// For `agent doctor`: the served model these flags (or the default
/// profile) name, connected to and described; `None` for a local GGUF,
/// which doctor does not load.
pub fn served(args: &ModelArgs) -> Option<anyhow::Result<BackendInfo>> {
    let args = match args.resolved() {
        Ok(args) => args,
        Err(err) => return Some(Err(err)),
    };
    args.model_url.as_ref()?;
    let described = (|| {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        Ok(backend(&args, true, &tokio)?.info())
    })();
    Some(described)
}

/// What `agent model` and `agent doctor` say about a backend.
pub fn describe(info: &BackendInfo) -> Vec<(&'static str, String)> {
    let caps = info.capabilities;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    vec![
        ("model", info.name.clone()),
        ("backend", info.detail.clone()),
        (
            "context",
            info.context_length
                .map_or_else(|| "not reported".to_string(), |n| format!("{n} tokens")),
        ),
        (
            "constrained calls",
            yes_no(caps.constrained_decoding).into(),
        ),
        ("native calls", yes_no(caps.native_tool_calls).into()),
        ("prefix reuse", yes_no(caps.kv_prefix_reuse).into()),
        ("saved state", yes_no(caps.saved_state).into()),
    ]
}

/// Loads the model with a progress bar on stderr.
pub fn load(args: &ModelArgs, quiet: bool) -> anyhow::Result<Arc<Model>> {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(100);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading model {bar:30} {pos:>3}%")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    };
    let progress_bar = bar.clone();
    let chat_template = match &args.chat_template_file {
        Some(path) => {
            let path = expand_home(path);
            Some(std::fs::read_to_string(&path).with_context(|| {
                format!("--chat-template-file {}: cannot read it", path.display())
            })?)
        }
        None => None,
    };
    let model = Model::load(ModelOptions {
        path: args.model.as_deref().map(expand_home),
        context_size: args.ctx_size.unwrap_or(DEFAULT_CTX_SIZE),
        threads: args.threads,
        batch_size: args.batch_size,
        gpu_layers: args.gpu_layers,
        parallel: args.parallel.unwrap_or(1),
        progress: Some(Box::new(move |fraction| {
            progress_bar.set_position((fraction * 100.0) as u64)
        })),
        chat_template,
    })?;
    bar.finish_and_clear();
    Ok(model)
}

pub fn info(args: &ModelArgs, json: bool) -> anyhow::Result<ExitCode> {
    let args = &args.resolved()?;
    if args.model_url.is_some() {
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let backend = backend(args, json, &tokio)?;
        let info = backend.info();
        if json {
            println!("{}", serde_json::to_string_pretty(&info)?);
        } else {
            for (key, value) in describe(&info) {
                println!("{key:17} {value}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let model = load(args, json)?;
    let info = model.info();
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
    } else {
        println!("model         {}", info.name);
        println!("file          {}", info.path.display());
        println!("architecture  {}", info.architecture);
        println!("parameters    {:.1} M", info.parameters as f64 / 1e6);
        println!(
            "size          {:.1} MiB",
            info.size_bytes as f64 / (1u64 << 20) as f64
        );
        println!("trained ctx   {}", info.trained_context);
        println!("gpu layers    {}", info.gpu_layers);
        let whose = match &args.chat_template_file {
            Some(path) => format!("{} (--chat-template-file)", path.display()),
            None => "the model's own".to_string(),
        };
        println!(
            "chat template {whose}{}",
            if info.template_supports_tools {
                " (renders tools)"
            } else {
                "; tools use the ChatML <tools> fallback"
            }
        );
        println!("tool calls    {}", info.tool_format.as_str());
        println!("cpu kernels   {}", info.cpu_kernels.join(" "));
        if let Some(cpu) = &info.cpu_backend {
            println!("cpu backend   {}", cpu.summary());
        }
    }
    Ok(ExitCode::SUCCESS)
}
