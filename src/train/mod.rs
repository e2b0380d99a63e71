//! `retrain`: robust DDPM training on unlabelled, contaminated frames, ending in a
//! verified, calibrated bundle that the daemon loads.
//!
//! Flow: `data` (frames, held-out calibration slice) → the explicit loop below (seeded
//! per-step sampling, q-sample, UNet, `losses`, AdamW with warm-up + cosine learning rate
//! and gradient clipping, EMA of the weights) → checkpoints → `train::export` of the EMA
//! weights with `operating_point` (the search for t0, steps, conditioning, map rule and
//! fusion weight on the synthetic defect families of `defects`) and `calibrate` run on the
//! exported graph → JSON report.
//!
//! Determinism: every step draws its batch, timesteps and noise from a ChaCha8 stream
//! seeded by `(seed, step)`, and parameter ids are fixed by construction order, so a run
//! resumed from a checkpoint continues bit for bit where it stopped.

pub mod calibrate;
pub mod data;
pub mod defects;
pub mod export;
pub mod head;
pub mod losses;
pub mod operating_point;
pub mod patch_model;
pub mod reduced;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use self::calibrate::{CalibrationRule, HeldOutScore, calibrate};
use self::data::{Augment, Dataset, Layout, Skipped};
use self::defects::{FOLDS, Family};
use self::head::HeadConfig;
use self::losses::Loss;
use self::operating_point::{SearchSpace, Validation, pasted_set};
use self::patch_model::{DEFAULT_FUSION_WEIGHT, PatchConfig, PatchKind, fit_patch_model};
use crate::infer::bundle::{BundleError, Staged, read_manifest};
use crate::infer::ensemble::{Ensemble, MapGraphs, patch_maps_of};
use crate::infer::reconstruct::Reconstructor;
use crate::infer::runtime::RuntimeConfig;
use crate::infer::runtime::{Denoiser, OrtDenoiser, RuntimeError};
use crate::model::architecture::UNetConfig;
use crate::model::diffusion::{NoiseSchedule, ScheduleSpec};
use crate::model::manifest::{
    Artifact, Calibration, EnsembleSpec, GoldenCheck, HEAD_FILE, Manifest, OperatingPoint, Provenance, SCHEMA_VERSION,
    Thresholds,
};
use crate::model::onnx_export::{export_onnx, import_weights};
use crate::model::preprocess::{InputSpec, Inspection};
use crate::model::sampling::ReconstructionSpec;
use crate::model::unet::UNet;
use crate::postprocess::anomaly::{AnomalySpec, Fusion, Residual, Threshold};
use crate::postprocess::screen::{SCREEN_RECALLS, Screen, screen_score};
use crate::train::export::{export_bundle, export_head};

/// Everything a training run depends on; saved in the checkpoint and the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub name: String,
    pub version: String,
    pub input: InputSpec,
    /// How the model will see frames; tiled models train on crops at the tiling scale.
    #[serde(default)]
    pub inspection: Inspection,
    pub unet: UNetConfig,
    pub schedule: ScheduleSpec,
    pub reconstruction: ReconstructionSpec,
    pub anomaly: AnomalySpec,
    pub loss: Loss,
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Per-parameter gradient norm cap (burn clips each tensor separately).
    pub grad_clip_norm: f64,
    pub ema_decay: f64,
    pub seed: u64,
    pub flips: bool,
    pub random_crop: Option<u32>,
    pub calibration_fraction: f64,
    pub calibration: CalibrationRule,
    /// Search the operating point on synthetic defects after training (`None`: ship
    /// `reconstruction` and `anomaly` as given).
    #[serde(default)]
    pub operating_point: Option<SearchSpace>,
    /// Train a learned defect head after the search and keep it if it wins there.
    #[serde(default)]
    pub head: Option<HeadConfig>,
    /// Fit a normal-patch model on pretrained features; it is shipped in the bundle, fused
    /// into the searched rule's map at the searched or given weight, or (given weight 0) the
    /// `patch` rule if it wins the search.
    #[serde(default)]
    pub patch: Option<PatchConfig>,
    /// Also ship int8 copies of the graphs if they keep the shipped rule's quality within
    /// this bound (`int8`).
    pub int8: Option<reduced::QualityBound>,
    /// Also ship fp16 copies of the graphs if they keep the shipped rule's quality within
    /// this bound (`fp16`).
    #[serde(default)]
    pub fp16: Option<reduced::QualityBound>,
}

/// Where and how to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub data: PathBuf,
    pub layout: Option<Layout>,
    pub out: PathBuf,
    pub force: bool,
    /// Start from this bundle's weights (fine-tuning).
    pub init: Option<PathBuf>,
    pub checkpoint_dir: PathBuf,
    pub checkpoint_every: usize,
    pub resume: bool,
    /// Run at most this many steps in this invocation, then checkpoint and stop.
    pub stop_after: Option<usize>,
    /// Also export the EMA weights every this many steps (0: never) as interim bundles in
    /// `interim_dir`, for quality against training steps.
    pub export_every: usize,
    pub interim_dir: PathBuf,
    pub runtime: RuntimeConfig,
    pub report: Option<PathBuf>,
    pub progress: bool,
    /// The command line, recorded in the manifest's provenance.
    pub command: String,
    /// Set by Ctrl-C: checkpoint and stop at the next step boundary.
    pub interrupt: Arc<AtomicBool>,
    /// Where the UNet trains.
    pub device: TrainDevice,
}

/// Where the UNet trains: burn's Flex on the CPU unless asked otherwise. A GPU is never
/// picked silently, and one that cannot be opened is an error, not a fall back to the CPU.
/// Weights start on the CPU either way (so a seed gives the same model on every device),
/// and the EMA weights are exported from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainDevice {
    /// burn's Flex backend on the CPU's cores.
    #[default]
    Cpu,
    /// burn's wgpu backend on the first discrete GPU (Vulkan, Metal); `gpu-train` builds.
    Wgpu,
    /// burn's wgpu backend on a CPU adapter such as Mesa's lavapipe: for checking the GPU
    /// path where there is no GPU (CI), not for speed; `gpu-train` builds.
    WgpuCpu,
}

impl TrainDevice {
    /// Opens the device, checked with one tiny computation.
    pub fn open(self) -> Result<Device, TrainError> {
        match self {
            Self::Cpu => Ok(Device::flex()),
            #[cfg(feature = "gpu-train")]
            Self::Wgpu => Self::checked(Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(0)), "wgpu"),
            #[cfg(feature = "gpu-train")]
            Self::WgpuCpu => Self::checked(Device::wgpu(burn::tensor::DeviceKind::Cpu), "wgpu-cpu"),
            #[cfg(not(feature = "gpu-train"))]
            other => Err(TrainError::Config(format!(
                "--device {other:?}: this binary was built without a GPU training backend (cargo build --features gpu-train)"
            ))),
        }
    }

    /// burn opens an adapter lazily and panics when there is none; the panic becomes an
    /// error naming the device (the default hook's report is held back meanwhile: this runs
    /// before any other training thread).
    #[cfg(feature = "gpu-train")]
    fn checked(device: Device, name: &str) -> Result<Device, TrainError> {
        let probe = device.clone();
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened =
            std::panic::catch_unwind(move || Tensor::<1>::from_floats([1.0, 2.0], &probe).sum().into_scalar::<f32>());
        std::panic::set_hook(hook);
        opened.map_err(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            TrainError::Config(format!(
                "--device {name}: wgpu could not open such an adapter (Vulkan or Metal driver missing?): {why}"
            ))
        })?;
        Ok(device)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("{path}: {what}")]
    Checkpoint { path: PathBuf, what: String },
    #[error("loss: {0}")]
    Loss(#[from] losses::LossError),
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("interrupted at step {step}; checkpoint written to {path} (continue with --resume)")]
    Interrupted { step: usize, path: PathBuf },
}

/// How the run ended.
#[derive(Debug)]
pub enum Outcome {
    /// All steps done; the bundle is in place.
    Finished { bundle: PathBuf, report: Box<Report> },
    /// `stop_after` reached; a checkpoint holds the state.
    Paused { step: usize, checkpoint: PathBuf },
}

#[derive(Debug, Clone, Serialize)]
pub struct DataReport {
    pub layout: Layout,
    pub directory: String,
    pub loaded: usize,
    pub training_frames: usize,
    pub calibration_frames: usize,
    pub skipped: Vec<Skipped>,
    /// Capture-store frames left out because an operator labelled them `defect`.
    pub labelled_defect_excluded: usize,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossSummary {
    pub first: f64,
    pub last: f64,
    pub min: f64,
    /// Mean loss of each tenth of the run.
    pub deciles: Vec<f64>,
    /// Mean loss of each hundredth of the run (fewer points in runs under 100 steps): the
    /// loss curve.
    pub curve: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: TrainConfig,
    pub data: DataReport,
    pub loss: LossSummary,
    pub thresholds: Thresholds,
    /// The searched operating point, when there was a search.
    pub operating_point: Option<crate::model::manifest::CandidateScore>,
    pub bundle: String,
    pub sha256: String,
    pub parity_max_abs_diff: f64,
    pub wall_seconds: f64,
    pub seconds_per_step: f64,
    /// Where a step's time went: each phase's mean over the steps this invocation ran.
    pub step_phases: StepPhases,
    pub resumed_from_step: usize,
    /// The held-out calibration frames, highest image score first: the trimmed ones, then
    /// the one whose score set the image threshold (at the default quantile 1). A defect
    /// there means the frames held more contamination than the trim; label it and retrain.
    pub held_out: Vec<HeldOutFrame>,
    /// With `--int8`: the figures of each set of int8 graphs tried and which shipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub int8: Option<reduced::ReducedReport>,
    /// With `--fp16`: the same for the fp16 graphs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fp16: Option<reduced::ReducedReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeldOutFrame {
    pub file: String,
    pub image_score: f64,
    pub trimmed: bool,
}

/// Wall seconds of the training loop's phases. On the CPU (Flex) every operation runs
/// when it is called, so each phase is its own cost; on a GPU backend work is queued and
/// lands in the next phase that reads a value back (the loss, then the update's values).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepPhases {
    /// Drawing the frames, augmenting them, noising them, building the input tensors.
    pub batch: f64,
    /// UNet forward and the robust loss, up to reading the loss value.
    pub forward: f64,
    pub backward: f64,
    /// Gradient clipping and the AdamW update.
    pub optimizer: f64,
    /// The EMA of the weights.
    pub ema: f64,
    /// Progress, logging, checkpoints and interim bundles.
    pub other: f64,
}

impl StepPhases {
    /// Each phase divided by `steps` (at least 1).
    fn per_step(self, steps: usize) -> Self {
        let n = steps.max(1) as f64;
        Self {
            batch: self.batch / n,
            forward: self.forward / n,
            backward: self.backward / n,
            optimizer: self.optimizer / n,
            ema: self.ema / n,
            other: self.other / n,
        }
    }
}

/// The held-out frames' files beside their calibration scores, highest first.
fn held_out_frames(dataset: &Dataset, split: &Split, scores: &[HeldOutScore]) -> Vec<HeldOutFrame> {
    let mut frames: Vec<HeldOutFrame> = split
        .calibration
        .iter()
        .zip(scores)
        .map(|(&i, s)| HeldOutFrame {
            file: dataset.files[i].display().to_string(),
            image_score: s.image_score,
            trimmed: s.trimmed,
        })
        .collect();
    frames.sort_by(|a, b| b.image_score.total_cmp(&a.image_score));
    if let Some(first_kept) = frames.iter().find(|f| !f.trimmed) {
        tracing::info!(file = %first_kept.file, image_score = first_kept.image_score, trimmed = frames.iter().filter(|f| f.trimmed).count(), "Highest-scoring held-out frame kept by calibration.");
    }
    frames
}

/// Adds the time since `*mark` to `*phase` and moves the mark on.
fn lap(mark: &mut Instant, phase: &mut f64) {
    let now = Instant::now();
    *phase += (now - *mark).as_secs_f64();
    *mark = now;
}

/// Learning rate at `step`: linear warm-up, then cosine decay to 0.
/// Two lines of arithmetic; burn's schedulers are stateful objects that would also have to
/// be checkpointed.
pub fn learning_rate(config: &TrainConfig, step: usize) -> f64 {
    if step < config.warmup_steps {
        return config.learning_rate * (step + 1) as f64 / config.warmup_steps as f64;
    }
    let span = (config.steps - config.warmup_steps).max(1) as f64;
    let progress = (step - config.warmup_steps) as f64 / span;
    config.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The ChaCha8 stream of one step (splitmix-style mixing of seed and step).
fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mixed = seed ^ (step as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ChaCha8Rng::seed_from_u64(mixed)
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.unet.validate().map_err(|e| e.to_string())?;
        self.unet.check_input_size(self.input.height, self.input.width).map_err(|e| e.to_string())?;
        if self.input.channels != self.unet.channels {
            return Err(format!("input channels {} != unet channels {}", self.input.channels, self.unet.channels));
        }
        NoiseSchedule::new(&self.schedule).map_err(|e| e.to_string())?;
        match self.loss {
            Loss::Huber { delta } if !(delta > 0.0) => return Err(format!("--delta must be > 0, got {delta}")),
            Loss::Lts { lambda } if !(lambda > 0.0 && lambda <= 1.0) => {
                return Err(format!("--lambda must be in (0, 1], got {lambda}"));
            }
            _ => {}
        }
        if self.steps == 0 || self.batch_size == 0 {
            return Err(format!("--steps ({}) and --batch-size ({}) must be at least 1", self.steps, self.batch_size));
        }
        if self.warmup_steps >= self.steps {
            return Err(format!("--warmup-steps ({}) must be below --steps ({})", self.warmup_steps, self.steps));
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(format!("--ema-decay must be in [0, 1), got {}", self.ema_decay));
        }
        if let Some(space) = &self.operating_point {
            space.validate()?;
        }
        if let Some(head) = &self.head {
            head.validate()?;
            if self.operating_point.is_none() {
                return Err("the learned head is chosen by the operating-point search; it needs the search".into());
            }
            if head.patch_channel && self.patch.is_none() {
                return Err("--head-patch-channel: the head reads the patch map, which needs --patch-model".into());
            }
        }
        if let Some(patch) = &self.patch {
            patch.validate()?;
            if patch.model == PatchKind::PerPosition && self.inspection != Inspection::Resize {
                return Err("--patch-model per-position models each feature cell at its place in the frame: it \
                     needs whole frames, --inspection resize (aligned parts), not tiles"
                    .into());
            }
        }
        if self.anomaly.residual == Residual::Patch && self.patch.is_none() {
            return Err("--anomaly-map patch needs the normal-patch model (--patch-model gaussian)".into());
        }
        self.inspection.validate([self.input.height, self.input.width])?;
        if let Some(bound) = &self.int8 {
            bound.validate("--int8-max-loss")?;
        }
        if let Some(bound) = &self.fp16 {
            bound.validate("--fp16-max-loss")?;
        }
        if !(0.0..1.0).contains(&self.calibration_fraction) {
            return Err(format!("--calibration-fraction must be in [0, 1), got {}", self.calibration_fraction));
        }
        Ok(())
    }
}

/// Collects parameter tensors in visiting order (detached, on the plain device).
struct Snapshot(Vec<Tensor<1>>);

impl ModuleVisitor for Snapshot {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val().inner();
        let n = t.shape().num_elements();
        self.0.push(t.reshape([n]));
    }
}

/// `ema ← decay·ema + (1 − decay)·model`, parameter by parameter in visiting order.
struct EmaUpdate {
    sources: std::vec::IntoIter<Tensor<1>>,
    decay: f32,
}

impl ModuleMapper for EmaUpdate {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let source = self.sources.next().expect("EMA and model have the same parameters");
        let decay = self.decay;
        param.map(|ema| {
            let shape = ema.shape();
            ema.mul_scalar(decay).add(source.reshape(shape).mul_scalar(1.0 - decay))
        })
    }
}

/// Progress persisted beside the weights.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    config: TrainConfig,
    losses: Vec<f64>,
}

const CKPT_MODEL: &str = "model.bpk";
const CKPT_EMA: &str = "ema.bpk";
const CKPT_OPTIMIZER: &str = "optimizer.bpk";
const CKPT_STATE: &str = "state.json";

fn checkpoint_error(path: &Path) -> impl Fn(String) -> TrainError + '_ {
    move |what| TrainError::Checkpoint { path: path.to_path_buf(), what }
}

/// Writes a checkpoint into a fresh directory and swaps it in, so a crash mid-write leaves
/// the previous checkpoint intact.
/// Writes `w` (and the config it was trained with) to `dir`, replacing what was there
/// only once the new checkpoint is complete.
fn save_checkpoint(dir: &Path, w: &Weights, config: &TrainConfig) -> Result<(), TrainError> {
    let (model, ema, optimizer) = (&w.model, &w.ema, &w.optimizer);
    let state = &CheckpointState { step: w.step, config: config.clone(), losses: w.losses.clone() };
    let err = checkpoint_error(dir);
    let staging = dir.with_extension("writing");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| err(e.to_string()))?;
    model.clone().save_file(staging.join(CKPT_MODEL)).map_err(|e| err(e.to_string()))?;
    ema.clone().save_file(staging.join(CKPT_EMA)).map_err(|e| err(e.to_string()))?;
    optimizer.save(staging.join(CKPT_OPTIMIZER)).map_err(|e| err(e.to_string()))?;
    let json = serde_json::to_vec_pretty(state).map_err(|e| err(e.to_string()))?;
    std::fs::write(staging.join(CKPT_STATE), json).map_err(|e| err(e.to_string()))?;
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| err(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn loss_summary(losses: &[f64]) -> LossSummary {
    let means = |parts: usize| {
        let chunk = losses.len().div_ceil(parts).max(1);
        losses.chunks(chunk).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect()
    };
    LossSummary {
        first: losses.first().copied().unwrap_or(f64::NAN),
        last: losses.last().copied().unwrap_or(f64::NAN),
        min: losses.iter().copied().fold(f64::INFINITY, f64::min),
        deciles: means(10),
        curve: means(100),
    }
}

/// From EMA weights to bundles: interim ones along the run (calibrated only), and the final
/// one, whose exported graph gets the operating-point search, the head (trained, exported,
/// scored against the searched point) and calibration before the manifest is written.
struct Exporter<'a> {
    config: &'a TrainConfig,
    options: &'a RunOptions,
    calibration_frames: &'a [Vec<f32>],
    /// How many consecutive calibration frames (tiles) make each held-out frame.
    calibration_groups: &'a [usize],
    head_frames: &'a [Vec<f32>],
    patch_tiles: &'a [Vec<f32>],
    data_sha256: &'a str,
    /// The held-out frames' scores from the last calibration, for the report.
    held_out: std::cell::RefCell<Vec<HeldOutScore>>,
    /// What `--int8` tried and shipped, for the report.
    int8: std::cell::RefCell<reduced::ReducedReport>,
    /// What `--fp16` tried and shipped, for the report.
    fp16: std::cell::RefCell<reduced::ReducedReport>,
}

impl Exporter<'_> {
    /// The manifest of weights trained for `steps` steps, before export and calibration fill
    /// in the artifact, the golden check and the thresholds.
    fn draft_manifest(&self, steps: usize) -> Manifest {
        let config = self.config;
        Manifest {
            schema_version: SCHEMA_VERSION,
            name: config.name.clone(),
            version: config.version.clone(),
            created: crate::timestamp::now(),
            input: config.input,
            inspection: config.inspection,
            unet: config.unet.clone(),
            schedule: config.schedule,
            reconstruction: config.reconstruction,
            anomaly: config.anomaly,
            thresholds: Thresholds {
                pixel: Threshold { value: 0.0, min: 0.0, max: 1.0 },
                image: Threshold { value: 0.0, min: 0.0, max: 1.0 },
                calibration: Calibration {
                    rule: String::new(),
                    frames: 0,
                    pixel_quantiles: vec![],
                    image_quantiles: vec![],
                },
            },
            provenance: Provenance {
                loss: config.loss.name().into(),
                huber_delta: match config.loss {
                    Loss::Huber { delta } => Some(delta),
                    _ => None,
                },
                lts_lambda: match config.loss {
                    Loss::Lts { lambda } => Some(lambda),
                    _ => None,
                },
                data_sha256: self.data_sha256.to_string(),
                training_steps: steps,
                seed: config.seed,
                command: self.options.command.clone(),
            },
            artifact: Artifact::pending(),
            golden: GoldenCheck::pending(),
            operating_point: None,
            ensemble: None,
            head: None,
            patch: None,
            screen_curve: Vec::new(),
            int8: None,
            fp16: None,
        }
    }

    /// The final bundle's exported graph: the patch model, the search, the head and the
    /// fusion weight where configured, then calibration by the chosen rule.
    fn finish(&self, ort: &mut OrtDenoiser, manifest: &mut Manifest, staged: &Staged) -> Result<(), BundleError> {
        let schedule = NoiseSchedule::new(&manifest.schedule).expect("validated");
        let input = manifest.input;
        let shape = [input.channels, input.height, input.width];
        let mut head_session = None;
        let mut patch_session = None;
        if let Some(patch) = &self.config.patch {
            let (session, artifact) =
                fit_patch_model(patch, self.patch_tiles, manifest, staged, &self.options.runtime)?;
            manifest.patch = Some(artifact);
            patch_session = Some(session);
        }
        let given_weight = self.config.patch.as_ref().and_then(|p| p.fusion_weight);
        let mut weight = self.config.patch.as_ref().map_or(0.0, |_| given_weight.unwrap_or(DEFAULT_FUSION_WEIGHT));
        if let Some(space) = &self.config.operating_point {
            let anomaly = manifest.anomaly;
            let validation = Validation {
                schedule: &schedule,
                shape,
                anomaly: &anomaly,
                frames: self.calibration_frames,
                space,
                seed: self.config.seed,
            };
            let mut point = validation.search(ort)?;
            // A patch map fused into the searched rule does not compete with it.
            if let Some(patch) = patch_session.as_mut().filter(|_| given_weight == Some(0.0)) {
                let scored = validation.add_map_candidate(&mut point, ort, &mut [patch], Residual::Patch, None)?;
                let chosen = point.chosen.residual == Residual::Patch;
                tracing::info!(
                    pixel_auprc = scored.pixel_auprc,
                    chosen,
                    "Patch model scored on the validation defects."
                );
            }
            let mut fold_heads = Vec::new();
            if let Some(head_config) = &self.config.head
                && let Some((head, folds)) =
                    self.try_head(head_config, &validation, &mut point, ort, patch_session.as_mut(), manifest, staged)?
            {
                head_session = Some(head);
                fold_heads = folds;
            }
            if let Some(patch) = patch_session.as_mut().filter(|_| given_weight.is_none()) {
                let mut rule_graphs: Vec<&mut dyn Denoiser> =
                    fold_heads.iter_mut().map(|g| g as &mut dyn Denoiser).collect();
                let head_patch = manifest.head.as_ref().and_then(|h| h.patch_channel);
                point.fusion_candidates = validation.fusion_scores(&point, ort, &mut rule_graphs, patch, head_patch)?;
                weight = point.fusion_candidates[0].patch_weight;
                tracing::info!(weight, scores = ?point.fusion_candidates, "Fusion weight chosen.");
            }
            let chosen = &point.chosen;
            tracing::info!(t0 = chosen.t0, extra_t0 = ?chosen.extra_t0, steps = chosen.steps, condition = chosen.condition, residual = chosen.residual.name(), pixel_auprc = chosen.pixel_auprc, candidates = point.candidates.len(), "Operating point chosen.");
            manifest.reconstruction = chosen.reconstruction();
            manifest.ensemble =
                (!chosen.extra_t0.is_empty()).then(|| EnsembleSpec { extra_t0: chosen.extra_t0.clone() });
            manifest.anomaly.residual = chosen.residual;
            manifest.operating_point = Some(point);
        }
        if weight >= 1.0 && patch_session.is_some() {
            // The patch map alone won: it is the rule, and nothing is fused into it.
            manifest.anomaly.residual = Residual::Patch;
        }
        let (rule, patch) = match manifest.anomaly.residual {
            Residual::Head => (head_session.as_mut(), patch_session.as_mut()),
            Residual::Patch => (patch_session.as_mut(), None),
            _ => (None, patch_session.as_mut()),
        };
        let mut graphs = MapGraphs {
            rule: rule.map(|g| g as &mut dyn Denoiser),
            patch: patch.map(|g| g as &mut dyn Denoiser),
            head_patch: manifest.head.as_ref().and_then(|h| h.patch_channel),
        };
        // A searched weight of 0 still records the standardisation (`eval --fusion-weight`
        // can then fuse at any weight); a given 0 means no fusion at all.
        if graphs.patch.is_some() && (weight > 0.0 || given_weight.is_none()) {
            manifest.anomaly.fusion = Some(self.fusion(ort, &mut graphs, manifest, weight)?);
        }
        let recall = self.config.patch.as_ref().and_then(|p| p.screen_recall);
        if let (Some(recall), Some(patch)) = (recall, graphs.patch.as_mut())
            && manifest.anomaly.fusion.is_some_and(|f| f.patch_weight > 0.0)
        {
            manifest.screen_curve = self.screen_curve(&mut **patch, manifest, recall)?;
            manifest.anomaly.screen = manifest.screen_at(recall).ok();
        }
        self.calibrate(ort, &mut graphs, manifest, &self.options.out)?;
        if self.config.int8.is_none() && self.config.fp16.is_none() {
            return Ok(());
        }
        let (frames, seed) = (self.calibration_frames, self.config.seed);
        let finished = reduced::Finished { unet: ort, graphs: &mut graphs, frames, seed };
        let mut reducer = reduced::Reducer::new(finished, manifest, staged, &self.options.runtime)?;
        let int8 = match self.config.int8 {
            Some(bound) => reducer.int8(bound, &mut self.int8.borrow_mut())?,
            None => None,
        };
        let fp16 = match self.config.fp16 {
            Some(bound) => reducer.fp16(bound, &mut self.fp16.borrow_mut())?,
            None => None,
        };
        (manifest.int8, manifest.fp16) = (int8, fp16);
        Ok(())
    }

    /// The cascade's screen at `recall` and at each of [`SCREEN_RECALLS`], chosen on the
    /// patch maps of the calibration frames and of copies with every family group's defects
    /// pasted (as the search's); recalls at which no clean tile would be screened out are left
    /// out.
    fn screen_curve(
        &self,
        patch: &mut dyn Denoiser,
        manifest: &Manifest,
        recall: f64,
    ) -> Result<Vec<Screen>, BundleError> {
        let input = manifest.input;
        let shape = [input.channels, input.height, input.width];
        let set = pasted_set(self.calibration_frames, shape, self.config.seed, &FOLDS);
        let scores: Vec<f64> = patch_maps_of(patch, &set.frames, shape)?.iter().map(|m| screen_score(m)).collect();
        let defective: Vec<(f64, usize)> = (set.clean_count..set.frames.len())
            .map(|i| (scores[i], set.truth[i].iter().filter(|&&t| t > 0).count()))
            .collect();
        let mut targets = SCREEN_RECALLS.to_vec();
        if !targets.contains(&recall) {
            targets.push(recall);
            targets.sort_by(f64::total_cmp);
        }
        let curve: Vec<Screen> =
            targets.iter().filter_map(|&r| Screen::choose(&defective, &scores[..set.clean_count], r)).collect();
        for s in &curve {
            tracing::info!(
                recall_target = s.recall_target,
                threshold = s.threshold,
                recall = s.recall,
                clean_screened = s.clean_screened,
                shipped = s.recall_target == recall,
                "Cascade screen."
            );
        }
        if !curve.iter().any(|s| s.recall_target == recall) {
            tracing::info!(recall, "No cascade screen: at this recall it would screen out no clean tile.");
        }
        Ok(curve)
    }

    /// The standardisation of the rule's and the patch model's maps on the held-out
    /// calibration frames, for fusing them at `weight`.
    fn fusion(
        &self,
        ort: &mut OrtDenoiser,
        graphs: &mut MapGraphs<'_>,
        manifest: &Manifest,
        weight: f64,
    ) -> Result<Fusion, BundleError> {
        let schedule = NoiseSchedule::new(&manifest.schedule).expect("validated");
        let mut ensemble = Ensemble::new(&schedule, manifest.reconstruction, manifest.extra_t0())
            .map_err(|e| BundleError::Inconsistent { path: self.options.out.clone(), what: e.to_string() })?;
        let input = manifest.input;
        let shape = [input.channels, input.height, input.width];
        let (frames, seed) = (self.calibration_frames, self.config.seed);
        let mut maps = |graphs: &mut MapGraphs<'_>, residual: Residual| {
            let rule = AnomalySpec { residual, fusion: None, ..manifest.anomaly };
            let raw = ensemble.raw_maps_of(ort, graphs, frames, shape, seed, &rule)?;
            Ok::<Vec<Vec<f32>>, RuntimeError>(raw.into_iter().map(|(map, _)| map).collect())
        };
        let rule_maps = maps(graphs, manifest.anomaly.residual)?;
        let patch = graphs.patch.as_mut().expect("fusion needs the patch model's graph");
        let patch_maps = patch_maps_of(&mut **patch, frames, shape)?;
        let fusion = Fusion::from_normal_maps(weight, &rule_maps, &patch_maps);
        tracing::info!(rule = manifest.anomaly.residual.name(), weight, ?fusion, "Patch map fused into the rule's.");
        Ok(fusion)
    }

    /// Sets the manifest's thresholds from the held-out frames, scored by its own rule.
    fn calibrate(
        &self,
        ort: &mut OrtDenoiser,
        graphs: &mut MapGraphs<'_>,
        manifest: &mut Manifest,
        bundle: &Path,
    ) -> Result<(), BundleError> {
        let schedule = NoiseSchedule::new(&manifest.schedule).expect("validated");
        let mut ensemble = Ensemble::new(&schedule, manifest.reconstruction, manifest.extra_t0())
            .map_err(|e| BundleError::Inconsistent { path: bundle.to_path_buf(), what: e.to_string() })?;
        let (thresholds, held_out) = calibrate(
            ort,
            graphs,
            &mut ensemble,
            manifest,
            self.calibration_frames,
            self.calibration_groups,
            &self.config.calibration,
            self.config.seed,
        )?;
        manifest.thresholds = thresholds;
        *self.held_out.borrow_mut() = held_out;
        Ok(())
    }

    /// Exports the EMA weights as they stand after `step` steps into
    /// `<interim_dir>/step-<step>`: the configured operating point, calibrated, without the
    /// search and the head, so the bundles along one run differ in their weights only.
    fn export_interim(&self, ema: &UNet, step: usize) -> Result<PathBuf, BundleError> {
        let manifest = self.draft_manifest(step);
        let target = self.options.interim_dir.join(format!("step-{step:06}"));
        let ema = ema.clone().to_device(&Device::flex());
        // Overwriting is safe: a resumed run that passes this step again writes the same weights.
        let (bundle, _) = export_bundle(&ema, manifest, &target, &self.options.runtime, true, |ort, m, _| {
            self.calibrate(ort, &mut MapGraphs::default(), m, &target)
        })?;
        Ok(bundle)
    }

    /// Trains the head at the searched point: one per family group without that group's
    /// families (scored on them: the head's figures are on shapes it never saw), and the
    /// one to ship on every family, exported into the staged bundle. Keeps it (`[head]` in
    /// the manifest; its session and the group heads' returned) only if it becomes the
    /// choice, else removes its file again.
    #[allow(clippy::too_many_arguments)] // the export's state, all needed
    fn try_head(
        &self,
        config: &HeadConfig,
        validation: &Validation<'_>,
        point: &mut OperatingPoint,
        ort: &mut OrtDenoiser,
        mut patch: Option<&mut OrtDenoiser>,
        manifest: &mut Manifest,
        staged: &Staged,
    ) -> Result<Option<(OrtDenoiser, Vec<OrtDenoiser>)>, BundleError> {
        let spec = point.chosen.reconstruction();
        let mut reconstructor =
            Reconstructor::new(validation.schedule.clone(), spec).expect("a searched candidate is valid");
        let seed = self.config.seed;
        let mut train = |families: &[Family], patch: Option<&mut dyn Denoiser>| {
            let (frames, shape) = (self.head_frames, validation.shape);
            head::train_head(ort, &mut reconstructor, patch, frames, shape, config, seed, families)
        };
        let mut group_heads = Vec::with_capacity(FOLDS.len());
        for k in 0..FOLDS.len() {
            let trained = train(&defects::outside_fold(k), patch.as_deref_mut().map(|g| g as &mut dyn Denoiser))?;
            let label = staged.path(&format!("head-without-group-{k}.onnx"));
            let onnx = export_onnx(&trained.model, &trained.unet, env!("CARGO_PKG_VERSION"));
            group_heads.push(OrtDenoiser::from_memory(&onnx, &label, trained.unet.channels, &self.options.runtime)?);
        }
        let trained = train(&Family::ALL, patch.as_deref_mut().map(|g| g as &mut dyn Denoiser))?;
        let (session, artifact) = export_head(&trained, manifest, staged, &self.options.runtime)?;
        let mut graphs: Vec<&mut dyn Denoiser> = group_heads.iter_mut().map(|g| g as &mut dyn Denoiser).collect();
        let patch = patch.map(|g| g as &mut dyn Denoiser).zip(trained.patch_channel);
        let scored = validation.add_map_candidate(point, ort, &mut graphs, Residual::Head, patch)?;
        let chosen = point.chosen.residual == Residual::Head;
        tracing::info!(pixel_auprc = scored.pixel_auprc, chosen, "Head scored on the family groups it never saw.");
        if !chosen {
            staged.remove(HEAD_FILE)?;
            return Ok(None);
        }
        manifest.head = Some(artifact);
        Ok(Some((session, group_heads)))
    }
}

/// Runs (or resumes) a training run: the data and its held-out split, the weights (new,
/// fine-tuned or resumed), the training loop, then the export, whose `Exporter::finish`
/// fits the patch model, searches the operating point, trains the head and calibrates.
pub fn train(config: TrainConfig, options: &RunOptions) -> Result<Outcome, TrainError> {
    config.validate().map_err(TrainError::Config)?;
    if options.out.exists() && !options.force {
        return Err(BundleError::Exists { path: options.out.clone() }.into());
    }
    let started = Instant::now();
    let dataset = Dataset::load(&options.data, options.layout, config.input)?;
    let data_sha256 = dataset.fingerprint().map_err(|e| TrainError::Config(format!("hashing the data: {e}")))?;
    let split = Split::of(dataset.len(), config.seed, config.calibration_fraction);
    tracing::info!(layout = ?dataset.layout, loaded = dataset.len(), skipped = dataset.skipped.len(), training = split.train.len(), calibration = split.calibration.len(), "Training data loaded.");

    let device = options.device.open()?.autodiff();
    tracing::info!(device = ?options.device, "Training device ready.");
    let schedule = NoiseSchedule::new(&config.schedule).map_err(|e| TrainError::Config(e.to_string()))?;
    let weights = initial_weights(&config, options, &device)?;
    let start_step = weights.step;

    let augment = Augment { flips: config.flips, random_crop: config.random_crop };
    let calibration: Vec<Vec<Vec<f32>>> =
        split.calibration.iter().map(|&i| dataset.frames_for_calibration(i, &augment)).collect();
    let calibration_groups: Vec<usize> = calibration.iter().map(Vec::len).collect();
    let calibration_frames: Vec<Vec<f32>> = calibration.into_iter().flatten().collect();
    // The head and the normal-patch model learn from training frames (random crops at the
    // model's scale), never from the calibration frames they are then scored on.
    let head_count = config.head.as_ref().map_or(0, |h| h.frames);
    let head_frames = split.sample(&dataset, &augment, head_count, config.seed ^ 0x4845_4144);
    let patch_tiles = match &config.patch {
        None => Vec::new(),
        Some(p) if p.model == PatchKind::PerPosition => split.whole(&dataset, p.tiles),
        Some(p) => split.sample(&dataset, &augment, p.tiles, config.seed ^ 0x5041_5443),
    };
    let exporter = Exporter {
        config: &config,
        options,
        calibration_frames: &calibration_frames,
        calibration_groups: &calibration_groups,
        head_frames: &head_frames,
        patch_tiles: &patch_tiles,
        data_sha256: &data_sha256,
        held_out: Default::default(),
        int8: Default::default(),
        fp16: Default::default(),
    };

    let loop_started = Instant::now();
    let trainer =
        Trainer { config: &config, options, dataset: &dataset, split: &split, augment, device: &device, schedule };
    let mut phases = StepPhases::default();
    let weights = match trainer.run(weights, &exporter, &mut phases)? {
        Trained::Done(weights) => *weights,
        Trained::Stopped(outcome) => return Ok(outcome),
    };
    let steps_run = config.steps - start_step;
    let seconds_per_step = loop_started.elapsed().as_secs_f64() / steps_run.max(1) as f64;
    let step_phases = phases.per_step(steps_run);
    tracing::info!(seconds_per_step, ?step_phases, "Training loop timed.");

    // Finish: export the EMA weights, calibrate on the held-out frames through the graph.
    let ema = weights.ema.to_device(&Device::flex());
    let manifest = exporter.draft_manifest(config.steps);
    let (bundle, manifest) =
        export_bundle(&ema, manifest, &options.out, &options.runtime, options.force, |ort, m, staged| {
            exporter.finish(ort, m, staged)
        })?;
    let held_out = held_out_frames(&dataset, &split, &exporter.held_out.take());
    let int8 = config.int8.map(|_| exporter.int8.take());
    let fp16 = config.fp16.map(|_| exporter.fp16.take());
    let report = Report {
        config: config.clone(),
        data: DataReport {
            layout: dataset.layout,
            directory: options.data.display().to_string(),
            loaded: dataset.len(),
            training_frames: split.train.len(),
            calibration_frames: split.calibration.len(),
            skipped: dataset.skipped.clone(),
            labelled_defect_excluded: dataset.labelled_defect,
            sha256: data_sha256,
        },
        loss: loss_summary(&weights.losses),
        thresholds: manifest.thresholds.clone(),
        operating_point: manifest.operating_point.as_ref().map(|p| p.chosen.clone()),
        bundle: bundle.display().to_string(),
        sha256: manifest.artifact.sha256.clone(),
        parity_max_abs_diff: manifest.artifact.parity_max_abs_diff,
        wall_seconds: started.elapsed().as_secs_f64(),
        seconds_per_step,
        step_phases,
        resumed_from_step: start_step,
        held_out,
        int8,
        fp16,
    };
    if let Some(path) = &options.report {
        let json = serde_json::to_vec_pretty(&report).map_err(|e| TrainError::Config(e.to_string()))?;
        crate::durable::write_atomic(path, &json)
            .map_err(|e| TrainError::Config(format!("{}: cannot write report: {e}", path.display())))?;
    }
    let _ = std::fs::remove_dir_all(&options.checkpoint_dir);
    Ok(Outcome::Finished { bundle, report: Box::new(report) })
}

/// Mixed into the seed of the held-out split ("SPLIT").
const SPLIT_STREAM: u64 = 0x53_504C_4954;

/// The dataset's frames split by a seeded shuffle: the held-out calibration frames are
/// never trained on.
struct Split {
    train: Vec<usize>,
    calibration: Vec<usize>,
}

impl Split {
    /// `len` frames, `fraction` of them held out, shuffled by `seed`'s own stream: a plain
    /// `seed` would repeat the shuffle with which `synth` (same algorithm, same seed) chose
    /// its contaminated frames, and hold out exactly those.
    fn of(len: usize, seed: u64, fraction: f64) -> Self {
        let order = crate::eval::synth::shuffled(len, &mut ChaCha8Rng::seed_from_u64(seed ^ SPLIT_STREAM));
        let held_out = if len >= 2 { ((len as f64 * fraction).round() as usize).clamp(1, len - 1) } else { 0 };
        let (calibration, train) = order.split_at(held_out);
        // With a single frame there is nothing to hold out: calibrate on the training frame.
        let calibration = if calibration.is_empty() { train.to_vec() } else { calibration.to_vec() };
        Self { train: train.to_vec(), calibration }
    }

    /// The first `count` training frames whole (resized to the model input), unflipped: each
    /// once, every part where the camera saw it.
    fn whole(&self, dataset: &Dataset, count: usize) -> Vec<Vec<f32>> {
        let whole = Augment { flips: false, random_crop: None };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        self.train.iter().take(count).map(|&i| dataset.augmented(i, &whole, &mut rng)).collect()
    }

    /// `count` augmented training frames drawn with `seed`.
    fn sample(&self, dataset: &Dataset, augment: &Augment, count: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..count)
            .map(|_| dataset.augmented(self.train[rng.random_range(0..self.train.len())], augment, &mut rng))
            .collect()
    }
}

/// What the training loop carries from step to step (and a checkpoint keeps).
struct Weights {
    model: UNet,
    ema: UNet,
    optimizer: ModuleOptimizer,
    losses: Vec<f64>,
    /// The next step to run.
    step: usize,
}

/// New weights from the seed, or a bundle's (`--init`, fine-tuning), on `device`; or the
/// checkpoint's, with the optimizer and the losses so far (`--resume`).
fn initial_weights(config: &TrainConfig, options: &RunOptions, device: &Device) -> Result<Weights, TrainError> {
    let mut model = UNet::init(&config.unet, config.seed, &Device::flex().autodiff())
        .map_err(|e| TrainError::Config(e.to_string()))?;
    if let Some(init) = &options.init {
        model = fine_tune_from(model, init, config)?;
    }
    if options.device != TrainDevice::Cpu {
        // Parameters are created lazily: touch them on the CPU, then move them.
        model.visit(&mut Snapshot(Vec::new()));
        model = model.fork(device);
    }
    let ema = model.valid();
    let optimizer = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_grad_clipping(Some(GradientClippingConfig::Norm(config.grad_clip_norm as f32)))
        .init();
    let weights = Weights { model, ema, optimizer, losses: Vec::with_capacity(config.steps), step: 0 };
    if !options.resume {
        return Ok(weights);
    }
    let ckpt = &options.checkpoint_dir;
    let err = checkpoint_error(ckpt);
    let state: CheckpointState =
        serde_json::from_slice(&std::fs::read(ckpt.join(CKPT_STATE)).map_err(|e| err(format!("cannot resume: {e}")))?)
            .map_err(|e| err(e.to_string()))?;
    if state.config != *config {
        return Err(
            err("the checkpoint was written with a different configuration; resume with the same flags".into()),
        );
    }
    tracing::info!(step = state.step, checkpoint = %ckpt.display(), "Resumed.");
    Ok(Weights {
        model: weights.model.try_load_file(ckpt.join(CKPT_MODEL)).map_err(|e| err(e.to_string()))?,
        ema: weights.ema.try_load_file(ckpt.join(CKPT_EMA)).map_err(|e| err(e.to_string()))?,
        optimizer: weights.optimizer.load(ckpt.join(CKPT_OPTIMIZER)).map_err(|e| err(e.to_string()))?,
        losses: state.losses,
        step: state.step,
    })
}

/// `model` with the weights of the bundle at `init`, which must have this run's architecture.
fn fine_tune_from(model: UNet, init: &Path, config: &TrainConfig) -> Result<UNet, TrainError> {
    let manifest = read_manifest(init)?;
    if manifest.unet != config.unet || manifest.input.channels != config.input.channels {
        return Err(TrainError::Config(format!(
            "{}: --init bundle has architecture {:?}, this run {:?}",
            init.display(),
            manifest.unet,
            config.unet
        )));
    }
    let onnx_path = init.join(&manifest.artifact.onnx);
    let bytes = std::fs::read(&onnx_path).map_err(|e| TrainError::Config(format!("{}: {e}", onnx_path.display())))?;
    let model =
        import_weights(model, &bytes).map_err(|e| TrainError::Config(format!("{}: {e}", onnx_path.display())))?;
    tracing::info!(from = %init.display(), "Fine-tuning from bundle weights.");
    Ok(model)
}

/// How the training loop ended.
enum Trained {
    /// Every step ran.
    Done(Box<Weights>),
    /// Interrupted or paused (`--stop-after`): checkpointed, the run ends here.
    Stopped(Outcome),
}

/// The training loop and what it reads.
struct Trainer<'a> {
    config: &'a TrainConfig,
    options: &'a RunOptions,
    dataset: &'a Dataset,
    split: &'a Split,
    augment: Augment,
    device: &'a Device,
    schedule: NoiseSchedule,
}

impl Trainer<'_> {
    /// Steps from `weights.step` to the end (or `--stop-after`), with progress, periodic
    /// checkpoints and interim bundles; an interrupt checkpoints and stops. Each step's
    /// time is added to `phases`.
    fn run(&self, mut w: Weights, exporter: &Exporter<'_>, phases: &mut StepPhases) -> Result<Trained, TrainError> {
        let (config, options) = (self.config, self.options);
        let ckpt = &options.checkpoint_dir;
        let bar = progress_bar(options.progress, config.steps, w.step);
        let (start_step, loop_started) = (w.step, Instant::now());
        let end = options.stop_after.map_or(config.steps, |n| (start_step + n).min(config.steps));
        while w.step < end {
            if options.interrupt.load(Ordering::SeqCst) {
                save_checkpoint(ckpt, &w, config)?;
                return Err(TrainError::Interrupted { step: w.step, path: ckpt.clone() });
            }
            let step = w.step;
            w = self.step(w, phases)?;
            let mut mark = Instant::now();
            let (done, loss) = (w.step, *w.losses.last().expect("a step records its loss"));
            if let Some(bar) = &bar {
                let per_second =
                    (done - start_step) as f64 * config.batch_size as f64 / loop_started.elapsed().as_secs_f64();
                bar.set_position(done as u64);
                bar.set_message(format!("loss {loss:.4} · {per_second:.1} img/s"));
            }
            if done % config.steps.div_ceil(20).max(1) == 0 {
                tracing::info!(step = done, loss, lr = learning_rate(config, step), "Training.");
            }
            if options.checkpoint_every > 0 && done % options.checkpoint_every == 0 && done < config.steps {
                save_checkpoint(ckpt, &w, config)?;
            }
            if options.export_every > 0 && done % options.export_every == 0 && done < config.steps {
                let bundle = exporter.export_interim(&w.ema, done)?;
                tracing::info!(step = done, bundle = %bundle.display(), "Interim bundle exported.");
            }
            lap(&mut mark, &mut phases.other);
        }
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        if end < config.steps {
            save_checkpoint(ckpt, &w, config)?;
            return Ok(Trained::Stopped(Outcome::Paused { step: end, checkpoint: ckpt.clone() }));
        }
        Ok(Trained::Done(Box::new(w)))
    }

    /// One step: a batch of noised training frames, the robust loss of the predicted
    /// noise, an AdamW update and the EMA; each phase's time is added to `phases`.
    fn step(&self, w: Weights, phases: &mut StepPhases) -> Result<Weights, TrainError> {
        let mut mark = Instant::now();
        let Weights { model, ema, mut optimizer, mut losses, step } = w;
        let (config, schedule) = (self.config, &self.schedule);
        let frame_len = config.input.frame_len();
        let shape = [config.batch_size, config.input.channels, config.input.height, config.input.width];
        let mut rng = step_rng(config.seed, step);
        let mut x_t = Vec::with_capacity(config.batch_size * frame_len);
        let mut noise = Vec::with_capacity(config.batch_size * frame_len);
        let mut timesteps = Vec::with_capacity(config.batch_size);
        for _ in 0..config.batch_size {
            let index = self.split.train[rng.random_range(0..self.split.train.len())];
            let x0 = self.dataset.augmented(index, &self.augment, &mut rng);
            let k = rng.random_range(0..schedule.len());
            let eps: Vec<f32> = (0..frame_len).map(|_| StandardNormal.sample(&mut rng)).collect();
            let mut noisy = vec![0.0; frame_len];
            schedule.q_sample(&x0, &eps, k, &mut noisy);
            x_t.extend_from_slice(&noisy);
            noise.extend_from_slice(&eps);
            timesteps.push(k as f32);
        }
        let x_t = Tensor::<4>::from_data(TensorData::new(x_t, shape), self.device);
        let eps = Tensor::<4>::from_data(TensorData::new(noise, shape), self.device);
        let t = Tensor::<1>::from_data(TensorData::new(timesteps, [config.batch_size]), self.device);
        lap(&mut mark, &mut phases.batch);
        let prediction = model.forward(x_t, t);
        let loss = losses::loss(config.loss, prediction, eps)?;
        let loss_value = loss.clone().into_data().as_slice::<f32>().expect("f32 loss")[0] as f64;
        if !loss_value.is_finite() {
            return Err(TrainError::Config(format!("loss became {loss_value} at step {step}; lower --learning-rate")));
        }
        lap(&mut mark, &mut phases.forward);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        lap(&mut mark, &mut phases.backward);
        let model = optimizer.step(learning_rate(config, step), model, grads);
        lap(&mut mark, &mut phases.optimizer);
        let decay = config.ema_decay.min((1 + step) as f64 / (10 + step) as f64) as f32;
        let mut snapshot = Snapshot(Vec::new());
        model.visit(&mut snapshot);
        let ema = ema.map(&mut EmaUpdate { sources: snapshot.0.into_iter(), decay });
        lap(&mut mark, &mut phases.ema);
        losses.push(loss_value);
        Ok(Weights { model, ema, optimizer, losses, step: step + 1 })
    }
}

fn progress_bar(enabled: bool, steps: usize, position: usize) -> Option<indicatif::ProgressBar> {
    enabled.then(|| {
        let bar = indicatif::ProgressBar::new(steps as u64).with_position(position as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} ETA {eta}",
            )
            .expect("static template"),
        );
        bar
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::synth::contaminated_positions;

    /// `synth --seed s` and `retrain --seed s` once drew the same shuffle of the same 60
    /// frames: at 10 % contamination the held-out frames were exactly the defective ones, so
    /// training saw none and calibration saw only defects. The split now has its own stream:
    /// over eight seeds it holds out about as many defective frames as chance would.
    #[test]
    fn the_held_out_frames_are_not_the_ones_synth_contaminated_with_the_same_seed() {
        let (frames, defective, seeds) = (60, 6, 0..8u64);
        let mut overlap = 0;
        for seed in seeds.clone() {
            let split = Split::of(frames, seed, 0.1);
            assert_eq!(split.calibration.len(), 6);
            assert_eq!(split.calibration.len() + split.train.len(), frames);
            let contaminated = contaminated_positions(&mut ChaCha8Rng::seed_from_u64(seed), frames, defective);
            overlap += split.calibration.iter().filter(|i| contaminated.contains(i)).count();
        }
        // Chance: 8 seeds × 6 held out × 6/60 defective = 4.8; the shared shuffle gave 48.
        assert!(overlap <= 14, "{overlap} of {} held-out frames were synth's defective ones", 6 * seeds.count());
    }
}
