//! `agent model info`: load a GGUF model (with a progress bar) and show what
//! it says about itself. Also the shared model flags.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use stack_runtime::model::llama::{Model, ModelOptions};

/// Flags that choose and configure the model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// GGUF model file (default: the embedded SmolLM2-135M-Instruct).
    #[arg(long, value_name = "GGUF")]
    pub model: Option<PathBuf>,
    /// Context size in tokens.
    #[arg(long, default_value_t = 4096)]
    pub ctx_size: u32,
    /// CPU threads (default: llama.cpp's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Batch size for prompt processing.
    #[arg(long, default_value_t = 512)]
    pub batch_size: u32,
    /// Layers to offload to the GPU (default: all with the `cuda` feature, else 0).
    #[arg(long)]
    pub gpu_layers: Option<u32>,
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
    let model = Model::load(ModelOptions {
        path: args.model.clone(),
        context_size: args.ctx_size,
        threads: args.threads,
        batch_size: args.batch_size,
        gpu_layers: args.gpu_layers,
        progress: Some(Box::new(move |fraction| {
            progress_bar.set_position((fraction * 100.0) as u64)
        })),
    })?;
    bar.finish_and_clear();
    Ok(model)
}

pub fn info(args: &ModelArgs, json: bool) -> anyhow::Result<ExitCode> {
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
        println!(
            "chat template {}",
            if info.template_supports_tools {
                "the model's own (renders tools)"
            } else {
                "the model's own; tools use the ChatML <tools> fallback"
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
