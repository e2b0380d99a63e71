//! Command-line arguments for each subcommand. No logic lives here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::infer::runtime::{Precision, Provider, RuntimeConfig};
use crate::logging::LogFormat;
use crate::model::sampling::Sampler;
use crate::postprocess::anomaly::Residual;
#[cfg(feature = "train")]
use crate::train::reduced::QualityBound;

#[derive(Debug, Parser)]
#[command(name = "edge-inspect", version = env!("EDGE_INSPECT_VERSION_LINE"), about = "Visual inspection with robust diffusion (RDDPM) anomaly maps")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `auto` is journald-native when stderr is the journal (a systemd
    /// service), else text; `json` writes one JSON object per line for log shippers.
    #[arg(long, global = true, value_enum, default_value = "auto", env = "EDGE_INSPECT_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process; boxing buys nothing")]
pub enum Command {
    /// Run a model bundle on image files and write maps, masks, overlays and JSON lines.
    Infer(InferArgs),
    /// Run the inspection daemon: cameras → model → MQTT alerts, masks, snapshots, stats.
    Run(RunArgs),
    /// Validate a daemon config file (and its environment overrides); exit 78 if invalid.
    CheckConfig(RunArgs),
    /// Score a bundle on labelled test data (MVTec or anomalib Folder layout): pixel and image
    /// metrics, per defect type, with a JSON report, a Markdown summary and overlays.
    Eval(EvalArgs),
    /// Build a seeded benchmark in the MVTec layout from a texture photograph, with
    /// synthetic defects, exact masks and optional contamination of the training set.
    Synth(SynthArgs),
    /// Measure inference throughput of a bundle on this machine (UNet evals/s, frames/s).
    Bench(BenchArgs),
    /// Label a recorded frame in the capture store as a defect or normal (what the MQTT
    /// command `<camera>/label/set` does): `retrain` leaves out defects, `eval` scores on labels.
    Label(LabelArgs),
    /// The fleet: publish a bundle to object storage, roll it out to nodes over MQTT (a
    /// canary first), and list the nodes with their models, rollout states and alert rates.
    Fleet(FleetArgs),
    /// Export a UNet with seeded random weights as a verified bundle (tests, benchmarks).
    #[cfg(feature = "train")]
    Export(ExportArgs),
    /// Train a model on (contaminated, unlabelled) frames with a robust loss and export a bundle.
    #[cfg(feature = "train")]
    Retrain(RetrainArgs),
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
    /// The bundle's f32 graphs, or the int8 or fp16 copies `retrain --int8` / `--fp16` made.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
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
            precision: self.precision,
            ..RuntimeConfig::default()
        }
    }
}

/// `retrain --inspection`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum InspectionArg {
    Tiled,
    Resize,
}

/// Anomaly-map rules (see `postprocess::anomaly::Residual`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AnomalyMapArg {
    L1,
    L2,
    Ssim,
    Msgms,
    /// The bundle's learned head (bundles trained with --head-steps > 0).
    Head,
    /// Cosine distance of the UNet encoder's features of frame and reconstruction.
    Feature,
    /// The bundle's normal-patch model on pretrained features (bundles trained with
    /// --patch-model).
    Patch,
}

impl From<AnomalyMapArg> for Residual {
    fn from(a: AnomalyMapArg) -> Self {
        match a {
            AnomalyMapArg::L1 => Residual::L1,
            AnomalyMapArg::L2 => Residual::L2,
            AnomalyMapArg::Ssim => Residual::Ssim,
            AnomalyMapArg::Msgms => Residual::Msgms,
            AnomalyMapArg::Head => Residual::Head,
            AnomalyMapArg::Feature => Residual::Feature,
            AnomalyMapArg::Patch => Residual::Patch,
        }
    }
}

/// The normal-patch model `retrain` fits (see `model::patch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PatchModelArg {
    None,
    /// One Gaussian of all patch vectors, fitted robustly (trimmed refits).
    Gaussian,
    /// One Gaussian per feature cell (PaDiM), for parts in the same place in every frame;
    /// needs --inspection resize.
    PerPosition,
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
    /// DDAD conditioning weight (0 = none): each reverse step pulls the reconstruction
    /// toward the input.
    #[arg(long)]
    pub condition: Option<f64>,
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

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Daemon config (TOML); EDGE_INSPECT__SECTION__KEY environment variables override it.
    #[arg(long, default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Test data: an MVTec category, an anomalib Folder dataset, a capture store with labels,
    /// or `s3://<bucket>/<prefix>` (capture stores uploaded there; AWS_* variables).
    #[arg(long)]
    pub data: PathBuf,
    /// Report directory (default: results/<model name>/<data directory name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Overlays to write, spread over the dataset.
    #[arg(long, default_value_t = 8)]
    pub overlays: usize,
    /// Resize images and masks to the model's input size instead of requiring it.
    #[arg(long)]
    pub resize: bool,
    /// Seed of the reconstruction noise; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frames per UNet batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Give the deployed verdicts, masks and overlays at this sensitivity, as a camera set
    /// to it would (0.1–10; 2 = half the calibrated thresholds).
    #[arg(long, default_value_t = 1.0, value_parser = parse_sensitivity)]
    pub sensitivity: f64,
    #[command(flatten)]
    pub reconstruction: ReconstructionArgs,
    /// Score with this anomaly-map rule instead of the manifest's (the thresholds are not
    /// recalibrated: best-F1 and the threshold-free metrics stay meaningful, the verdicts
    /// in overlays do not).
    #[arg(long, value_enum)]
    pub anomaly_map: Option<AnomalyMapArg>,
    /// The timestep at which the encoder sees frame and reconstruction for the feature
    /// map rule, instead of the manifest's.
    #[arg(long, value_name = "T")]
    pub feature_t: Option<usize>,
    /// Run only the primary reconstruction, not the manifest's ensemble members.
    #[arg(long)]
    pub no_ensemble: bool,
    /// Score the map rule alone, without the manifest's fusion with the patch map.
    #[arg(long, conflicts_with = "fusion_weight")]
    pub no_fusion: bool,
    /// Fuse the patch map at this weight (0–1) instead of the manifest's, with the
    /// manifest's standardisation of the two maps (thresholds are not recalibrated).
    #[arg(long, value_name = "W", value_parser = parse_unit_weight)]
    pub fusion_weight: Option<f64>,
    /// Reconstruct every tile: no cascade screen, even where the manifest has one.
    #[arg(long)]
    pub no_screen: bool,
    /// Take the cascade screen `retrain` chose for this recall (the manifest's
    /// `screen_curve`) instead of the shipped one.
    #[arg(long, value_name = "RECALL", conflicts_with = "no_screen")]
    pub screen_recall: Option<f64>,
    /// Inspect a tiled model's frames with tiles this many pixels apart instead of the
    /// manifest's stride (the cost of less overlap; thresholds are not recalibrated).
    #[arg(long, value_name = "PIXELS")]
    pub tile_stride: Option<usize>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Texture photograph (any size larger than --crop).
    #[arg(long)]
    pub texture: PathBuf,
    /// Second texture for foreign-texture patches (default: a rotated patch of --texture).
    #[arg(long)]
    pub foreign: Option<PathBuf>,
    /// Dataset directory to create (MVTec layout).
    #[arg(long)]
    pub out: PathBuf,
    /// Output image side in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: u32,
    /// Side of the square texture crop, resized to --size.
    #[arg(long, default_value_t = 128)]
    pub crop: u32,
    /// Images in train/good (normal plus contaminated).
    #[arg(long, default_value_t = 200)]
    pub train: usize,
    /// Normal test images.
    #[arg(long, default_value_t = 40)]
    pub test_good: usize,
    /// Test images per defect type.
    #[arg(long, default_value_t = 12)]
    pub test_per_type: usize,
    /// Fraction of train/good that shows defects: defective / (normal + defective).
    #[arg(long, default_value_t = 0.0)]
    pub contamination: f64,
    /// Draw defects as for an image of this side: with --crop = --size (native scale,
    /// e.g. 256) and --defect-extent 64, defects are 3–20 px, as on a line camera.
    #[arg(long)]
    pub defect_extent: Option<u32>,
    /// Also draw the held-out defect families (wear: texture lost, brightness kept; dent:
    /// texture warped toward or away from a centre, with faint shading) into the test set;
    /// nothing in training, the contamination or retrain's search ever draws them.
    #[arg(long)]
    pub held_out_families: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace an existing dataset directory.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model bundle directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Batch sizes to measure.
    #[arg(long, default_value = "1,8", value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// DDIM reverse step counts to measure (UNet calls per reconstruction); default: the
    /// bundle's operating point.
    #[arg(long, value_delimiter = ',')]
    pub ddim_steps: Option<Vec<usize>>,
    /// Forward noising steps for the reconstructions; default: the bundle's operating point.
    #[arg(long)]
    pub t0: Option<usize>,
    /// Timed UNet calls per batch size (after 3 warm-up calls).
    #[arg(long, default_value_t = 15)]
    pub repeats: usize,
    /// Whole camera frames to time through the inspection path (tiles for a tiled
    /// model), as WIDTHxHEIGHT, e.g. 640x480,1280x1024: at the bundle's shipped operating
    /// point (its ensemble, map rule and fusion), or at each --ddim-steps count and --t0
    /// where they are given.
    #[arg(long, value_delimiter = ',')]
    pub frames: Vec<String>,
    /// Timed passes per frame size (after one warm-up pass), for the latency percentiles.
    #[arg(long, default_value_t = 5)]
    pub frame_repeats: usize,
    /// An image to inspect as the frames (repeated in mirror image up to each --frames
    /// size, at its own scale) instead of a synthetic pattern: the cascade screens tiles by
    /// content, so its speed-up shows only on frames like the line's.
    #[arg(long)]
    pub frame_image: Option<PathBuf>,
    /// Also write each frame inspected as `<DIR>/frame-WIDTHxHEIGHT.png` (to replay the
    /// same frames through the daemon: scripts/throughput.sh).
    #[arg(long, value_name = "DIR")]
    pub save_frames: Option<PathBuf>,
    /// Reconstruct every tile: no cascade screen, even where the manifest has one.
    #[arg(long)]
    pub no_screen: bool,
    /// Take the cascade screen `retrain` chose for this recall (the manifest's
    /// `screen_curve`) instead of the shipped one.
    #[arg(long, value_name = "RECALL", conflicts_with = "no_screen")]
    pub screen_recall: Option<f64>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Input size and UNet shape of a new model (`export`, `retrain`).
#[cfg(feature = "train")]
#[derive(Debug, Clone, Args)]
pub struct ArchitectureArgs {
    /// Model input height and width.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// 1 (grey) or 3 (RGB).
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
}

#[cfg(feature = "train")]
impl ArchitectureArgs {
    pub fn unet(&self) -> crate::model::architecture::UNetConfig {
        crate::model::architecture::UNetConfig {
            channels: self.channels,
            base_channels: self.base_channels,
            channel_mults: self.channel_mults.clone(),
            res_blocks: self.res_blocks,
            attention: self.attention,
            ..Default::default()
        }
    }

    pub fn input(&self) -> crate::model::preprocess::InputSpec {
        crate::model::preprocess::InputSpec {
            width: self.size,
            height: self.size,
            channels: self.channels,
            ..Default::default()
        }
    }
}

/// The model name for a bundle: `--name`, else the output directory's name.
pub fn bundle_name(out: &std::path::Path, name: Option<&str>) -> String {
    name.map(str::to_string)
        .or_else(|| out.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into())
}

#[cfg(feature = "train")]
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Bundle directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Record tiled inspection at native scale with tiles this many pixels apart.
    #[arg(long)]
    pub tile_stride: Option<usize>,
    /// Model name recorded in the manifest (default: the directory name).
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub architecture: ArchitectureArgs,
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

#[cfg(feature = "train")]
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LossArg {
    /// Plain DDPM (not robust).
    Mse,
    L1,
    /// Element-wise Huber with --delta (RDDPM).
    Huber,
    /// Least trimmed squares with --lambda (RDDPM-LTS).
    Lts,
}

#[cfg(feature = "train")]
#[derive(Debug, Args)]
pub struct RetrainArgs {
    /// Training frames: MVTec category, capture store, anomalib Folder, or any image folder;
    /// or `s3://<bucket>/<prefix>`: the capture stores nodes uploaded there (AWS_* variables).
    #[arg(long)]
    pub data: PathBuf,
    /// Also put the bundle under `s3://<bucket>/<prefix>/<name>/<version>/` with a SHA256SUMS.
    #[arg(long)]
    pub publish: Option<String>,
    /// Force the data layout instead of detecting it.
    #[arg(long, value_enum)]
    pub layout: Option<crate::train::data::Layout>,
    /// Bundle directory to write (models/<name>).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing bundle.
    #[arg(long)]
    pub force: bool,
    /// Where the UNet trains: `cpu`, or with a `gpu-train` build `wgpu` (the first discrete
    /// GPU) or `wgpu-cpu` (a CPU Vulkan adapter such as lavapipe, for checking the GPU path).
    #[arg(long, value_enum, default_value_t)]
    pub device: crate::train::TrainDevice,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "1.0.0")]
    pub version: String,
    #[arg(long, value_enum, default_value = "huber")]
    pub loss: LossArg,
    /// Huber threshold δ.
    #[arg(long, default_value_t = 0.2)]
    pub delta: f64,
    /// LTS kept fraction λ.
    #[arg(long, default_value_t = 0.8)]
    pub lambda: f64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2e-4)]
    pub learning_rate: f64,
    /// Linear warm-up steps (default: a tenth of --steps, at most 200).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Gradient norm cap per parameter tensor.
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, default_value_t = 0.999)]
    pub ema_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub architecture: ArchitectureArgs,
    /// Inference: forward noising steps recorded in the manifest.
    #[arg(long, default_value_t = 100)]
    pub t0: usize,
    /// Inference: reverse UNet calls recorded in the manifest.
    #[arg(long, default_value_t = 10)]
    pub reverse_steps: usize,
    #[arg(long, value_enum, default_value = "ddim")]
    pub sampler: SamplerArg,
    /// Inference: DDAD conditioning weight recorded in the manifest (with --fixed-operating-point).
    #[arg(long, default_value_t = 0.0)]
    pub condition: f64,
    /// Anomaly-map rule recorded in the manifest (with --fixed-operating-point).
    #[arg(long, value_enum, default_value = "l1")]
    pub anomaly_map: AnomalyMapArg,
    /// After training, choose t0, steps, conditioning and map rule on synthetic defects
    /// pasted on the calibration frames, using at most this many UNet calls per tile.
    #[arg(long, default_value_t = 10)]
    pub unet_budget: usize,
    /// Ship --t0, --reverse-steps, --sampler, --condition and --anomaly-map as given
    /// instead of searching.
    #[arg(long)]
    pub fixed_operating_point: bool,
    /// After the search, train a learned defect head (DRAEM-style, on synthetic
    /// scratches, holes and stains pasted on training frames) for this many steps and
    /// ship it if it beats the searched map on the validation defects; 0 = no head.
    /// Default: 400 when the operating point is searched, 0 with --fixed-operating-point.
    #[arg(long)]
    pub head_steps: Option<usize>,
    /// Fraction of the normal-labelled pixels of each head batch left out of its loss, the
    /// highest-loss ones (where the field frames' own unlabelled defects are likeliest).
    #[arg(long, default_value_t = 0.0)]
    pub head_trim: f64,
    /// The head's width: channels of its first level (a multiple of 8; 16 is the benchmarked
    /// recipe). The head costs about one UNet call per tile at 16; narrower is cheaper.
    #[arg(long, default_value_t = 16)]
    pub head_base_channels: usize,
    /// The head also reads the normal-patch model's map as a third input (needs
    /// --patch-model).
    #[arg(long)]
    pub head_patch_channel: bool,
    /// Fit a model of normal patches on pretrained features (ImageNet EfficientNet-Lite0)
    /// of the training frames and ship it in the bundle: its map fused into the searched
    /// rule's (--patch-fusion), or with --patch-fusion 0 the `patch` rule, chosen if it
    /// wins the search; `none` = no such model.
    #[arg(long, value_enum, default_value = "gaussian")]
    pub patch_model: PatchModelArg,
    /// The backbone checkpoint the patch model is built on (scripts/fetch-backbone.sh).
    #[arg(long, env = "EDGE_INSPECT_BACKBONE")]
    pub backbone: Option<PathBuf>,
    /// Fraction of patch vectors trimmed as the most distant before each refit of the
    /// patch model (robustness to the defects in the field frames); 0 = a plain fit.
    #[arg(long, default_value_t = 0.1)]
    pub patch_trim: f64,
    /// Weight of the patch model's map fused into the shipped rule's map, each map
    /// standardised on the calibration frames; `auto` = chosen by the operating-point search
    /// among 0, ¼, ½, ¾ and 1 (½ with --fixed-operating-point; measured worse than ½ on
    /// held-out data, docs/results.md); 0 = no fusion (the patch rule then competes in the
    /// search on its own instead).
    #[arg(long, default_value = "0.5", value_parser = parse_fusion_weight)]
    pub patch_fusion: FusionWeightArg,
    /// The cascade: a tile whose patch map stays below a screen threshold is declared clean
    /// without its reconstruction and head; the threshold is the highest that keeps this
    /// share of the validation defects' pixels in tiles that go on (needs a fused patch
    /// map); `auto` = 0.8 for tiled inspection (free on held-out data at native resolution,
    /// 1.7–1.9× faster), 0.99 for a model-size frame (0.8 cost pixel AUROC there);
    /// `none` = reconstruct every tile.
    #[arg(long, default_value = "auto", value_parser = parse_screen_recall)]
    pub screen_recall: ScreenRecallArg,
    /// Also ship int8 copies of the bundle's graphs (UNet, head, patch model), statically
    /// quantised with scales measured on the held-out frames through the shipped rule; kept
    /// only if the shipped rule loses at most --int8-max-loss on the validation defects (the
    /// patch model is left in f32 first). The daemon runs them with
    /// `runtime.precision = "int8"`.
    #[arg(long)]
    pub int8: bool,
    /// The largest pixel AUROC and AUPRC losses (int8 against f32) at which --int8 ships.
    #[arg(long, default_value = "0.01,0.05", value_parser = parse_int8_bound)]
    pub int8_max_loss: QualityBound,
    /// Also ship fp16 copies of the bundle's graphs for GPU providers (the frame path in
    /// f16; the timestep branch and the patch distance stay f32), kept only if the shipped
    /// rule loses at most --fp16-max-loss on the validation defects. The daemon runs them
    /// with `runtime.precision = "fp16"`.
    #[arg(long)]
    pub fp16: bool,
    /// The largest pixel AUROC and AUPRC losses (fp16 against f32) at which --fp16 ships.
    #[arg(long, default_value = "0.005,0.02", value_parser = parse_fp16_bound)]
    pub fp16_max_loss: QualityBound,
    /// Anomaly-map Gaussian σ in pixels.
    #[arg(long, default_value_t = 2.0)]
    pub smoothing_sigma: f64,
    /// How the model will see line frames: `tiled` (model-size tiles at --scale, the
    /// default) or `resize` (each whole frame shrunk to the model input, as before tiling).
    /// A tiled model trains on random input-size crops at --scale (unless --random-crop).
    #[arg(long, value_enum, default_value = "tiled")]
    pub inspection: InspectionArg,
    /// Tiled: tile starts this many model pixels apart (default: the input size, tiles side
    /// by side; less overlaps them, at more tiles per frame).
    #[arg(long)]
    pub tile_stride: Option<usize>,
    /// Tiled: model pixels per camera pixel (1 = native resolution).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Random horizontal/vertical flips.
    #[arg(long)]
    pub flips: bool,
    /// Random square crops of this many source pixels before the resize.
    #[arg(long)]
    pub random_crop: Option<u32>,
    /// Fraction of frames held out for threshold calibration.
    #[arg(long, default_value_t = 0.1)]
    pub calibration_fraction: f64,
    /// Fraction of highest-scoring held-out frames ignored by calibration (contamination).
    #[arg(long, default_value_t = 0.1)]
    pub calibration_trim: f64,
    /// Fine-tune from this bundle's weights.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Checkpoint directory (default: .<name>.checkpoint beside --out).
    #[arg(long)]
    pub checkpoint_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: usize,
    /// Continue from the checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Run at most this many steps now, then checkpoint and stop.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Also export the weights every N steps as interim bundles (the configured operating
    /// point, calibrated, no search and no head), for quality against training steps.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub export_every: usize,
    /// Where interim bundles go, as step-NNNNNN/ (default: <out>.interim beside --out).
    #[arg(long, value_name = "DIR")]
    pub interim_dir: Option<PathBuf>,
    /// JSON report path (default: <out>.report.json).
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, Args)]
pub struct LabelArgs {
    /// The capture store (`[recorder] dir`, default `<state_dir>/captures`).
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    #[arg(long)]
    pub camera: String,
    /// The frame's sequence number (`seq` in its alert, state and sidecar).
    #[arg(long)]
    pub seq: u64,
    #[arg(long, value_enum)]
    pub verdict: VerdictArg,
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub action: FleetAction,
}

#[derive(Debug, Subcommand)]
pub enum FleetAction {
    /// Put a bundle under `<to>/<name>/<version>/` with its SHA256SUMS (as `retrain
    /// --publish`); prints the folder's URL and the bundle's sha256. Object storage from the
    /// AWS_* variables.
    Publish {
        bundle: PathBuf,
        /// `s3://<bucket>/<prefix>`.
        #[arg(long)]
        to: String,
    },
    /// Roll the bundle in `url` (a folder `publish` printed) out to `--nodes`: the retained
    /// `<topic_prefix>/fleet/model`. Refused while a node's halt on that bundle stands.
    Rollout {
        url: String,
        /// `all`, node ids separated by commas, or a percentage (`10%`, a canary).
        #[arg(long)]
        nodes: String,
        /// Lift a halt on this bundle first.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// The nodes as their retained states and live stats tell: availability, model,
    /// rollout state, frames and alerts (alerts through a shared subscription, so several
    /// consumers split the stats stream).
    Status {
        #[command(flatten)]
        broker: BrokerArgs,
        /// The shared subscription group for the stats stream.
        #[arg(long, default_value = "edge-inspect-fleet")]
        group: String,
        /// How long to listen for the nodes' stats.
        #[arg(long, default_value_t = 5)]
        listen_s: u64,
        /// One JSON object per node instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Where the fleet's broker is.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// The nodes' `mqtt.topic_prefix`.
    #[arg(long, default_value = "edge-inspect")]
    pub topic_prefix: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum VerdictArg {
    Defect,
    Normal,
}

/// A sensitivity within [`crate::controls::SENSITIVITY`].
fn parse_sensitivity(s: &str) -> Result<f64, String> {
    let range = crate::controls::SENSITIVITY;
    match s.parse::<f64>() {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(format!("expected a sensitivity in {range:?}, got {s:?}")),
    }
}

/// `--patch-fusion`: `auto` (searched) or a weight in [0, 1].
#[cfg(feature = "train")]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FusionWeightArg(pub Option<f64>);

#[cfg(feature = "train")]
fn parse_fusion_weight(s: &str) -> Result<FusionWeightArg, String> {
    match s {
        "auto" => Ok(FusionWeightArg(None)),
        _ => parse_unit_weight(s).map(|w| FusionWeightArg(Some(w))).map_err(|e| format!("`auto` or {e}")),
    }
}

/// `--screen-recall`: `auto`, `none` or a recall in (0, 1].
#[cfg(feature = "train")]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScreenRecallArg {
    /// By the inspection: [`crate::postprocess::screen::TILED_RECALL`] for tiles, else
    /// [`crate::postprocess::screen::DEFAULT_RECALL`].
    Auto,
    None,
    Recall(f64),
}

#[cfg(feature = "train")]
fn parse_int8_bound(s: &str) -> Result<QualityBound, String> {
    parse_bound(s, "--int8-max-loss")
}

#[cfg(feature = "train")]
fn parse_fp16_bound(s: &str) -> Result<QualityBound, String> {
    parse_bound(s, "--fp16-max-loss")
}

/// `AUROC,AUPRC` losses of a reduced precision's quality bound.
#[cfg(feature = "train")]
fn parse_bound(s: &str, flag: &str) -> Result<QualityBound, String> {
    let parts: Vec<&str> = s.split(',').collect();
    let [auroc, auprc] = parts[..] else { return Err(format!("expected AUROC,AUPRC losses, got '{s}'")) };
    let number = |v: &str| v.trim().parse::<f64>().map_err(|e| format!("'{v}' in '{s}': {e}"));
    let bound = QualityBound { pixel_auroc: number(auroc)?, pixel_auprc: number(auprc)? };
    bound.validate(flag)?;
    Ok(bound)
}

#[cfg(feature = "train")]
fn parse_screen_recall(s: &str) -> Result<ScreenRecallArg, String> {
    match (s, s.parse::<f64>()) {
        ("auto", _) => Ok(ScreenRecallArg::Auto),
        ("none", _) => Ok(ScreenRecallArg::None),
        (_, Ok(r)) if crate::postprocess::screen::is_recall(r) => Ok(ScreenRecallArg::Recall(r)),
        _ => Err(format!("`auto`, `none` or a recall in (0, 1], got {s:?}")),
    }
}

fn parse_unit_weight(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(w) if (0.0..=1.0).contains(&w) => Ok(w),
        _ => Err(format!("expected a weight in [0, 1], got {s:?}")),
    }
}
