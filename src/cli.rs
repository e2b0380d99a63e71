//! Command-line arguments for each subcommand. No logic lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::infer::reconstruct::Sampler;
use crate::infer::runtime::{Provider, RuntimeConfig};

#[derive(Debug, Parser)]
#[command(name = "edge-inspect", version, about = "Visual inspection with robust diffusion (RDDPM) anomaly maps")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a model bundle on image files and write maps, masks, overlays and JSON lines.
    Infer(InferArgs),
    /// Export a UNet with seeded random weights as a verified bundle (tests, benchmarks).
    #[cfg(feature = "train")]
    Export(ExportArgs),
}

/// Where ONNX Runtime comes from and what it runs on.
#[derive(Debug, Clone, Args)]
pub struct RuntimeArgs {
    /// Path to libonnxruntime.so (else ORT_DYLIB_PATH, else beside the binary).
    #[arg(long, value_name = "PATH")]
    pub ort_lib: Option<PathBuf>,
    /// Execution providers to try in order.
    #[arg(long = "provider", value_enum, default_values = ["cpu"])]
    pub providers: Vec<ProviderArg>,
    /// Use CPU (with a warning) when no listed provider registers.
    #[arg(long)]
    pub allow_cpu_fallback: bool,
    /// ONNX Runtime intra-op threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProviderArg {
    Cuda,
    Tensorrt,
    Cpu,
}

impl RuntimeArgs {
    pub fn to_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            library_path: self.ort_lib.clone(),
            providers: self
                .providers
                .iter()
                .map(|p| match p {
                    ProviderArg::Cuda => Provider::Cuda,
                    ProviderArg::Tensorrt => Provider::Tensorrt,
                    ProviderArg::Cpu => Provider::Cpu,
                })
                .collect(),
            allow_cpu_fallback: self.allow_cpu_fallback,
            intra_threads: self.threads,
            ..RuntimeConfig::default()
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SamplerArg {
    Ddpm,
    Ddim,
}

impl From<SamplerArg> for Sampler {
    fn from(s: SamplerArg) -> Self {
        match s {
            SamplerArg::Ddpm => Sampler::Ddpm,
            SamplerArg::Ddim => Sampler::Ddim,
        }
    }
}

/// Overrides of the manifest's reconstruction settings.
#[derive(Debug, Clone, Args)]
pub struct ReconstructionArgs {
    /// Forward noising steps.
    #[arg(long)]
    pub t0: Option<usize>,
    /// Reverse UNet calls (DDPM: must equal t0).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// DDIM stochasticity in [0, 1].
    #[arg(long)]
    pub eta: Option<f64>,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Model bundle directory (models/<name>).
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the reconstruction noise; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frames per UNet batch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[command(flatten)]
    pub reconstruction: ReconstructionArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Image files (png, jpg, bmp, tiff).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[cfg(feature = "train")]
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Bundle directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Model name recorded in the manifest (default: the directory name).
    #[arg(long)]
    pub name: Option<String>,
    /// Input height and width.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    #[arg(long, default_value_t = 32)]
    pub base_channels: usize,
    /// Channel multipliers per level, comma separated.
    #[arg(long, default_value = "1,2,2", value_delimiter = ',')]
    pub channel_mults: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    pub res_blocks: usize,
    /// Self-attention at the lowest resolution.
    #[arg(long)]
    pub attention: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub t0: usize,
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, value_enum, default_value = "ddim")]
    pub sampler: SamplerArg,
    /// Replace an existing bundle.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}
