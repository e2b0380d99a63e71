//! ONNX Runtime: finding the library, choosing the execution provider, running the UNet.
//!
//! ORT is loaded at run time (`load-dynamic`), from the first of: the configured path,
//! `ORT_DYLIB_PATH`, `libonnxruntime.so` beside the executable, `../lib/edge-inspect/
//! libonnxruntime.so` from it (where the Debian package puts it: an alternative pointing at
//! the CPU or the GPU runtime). Every path is checked to exist before `dlopen`, because
//! ort's own error says only "dlopen failed"; symbolic links are resolved first, so that ORT
//! finds its provider libraries beside the real file.
//!
//! Execution providers are registered with `error_on_failure`, in the configured order, so
//! a missing CUDA never silently turns into CPU (ORT's default). CPU is used only if it is
//! listed or `allow_cpu_fallback` is set, and then with a warning; the provider that really
//! runs is reported in [`OrtDenoiser::provider`] for logs and stats.
//!
//! Every call runs with the process's [`RunOptions`], so that a stop past its drain deadline
//! can end the calls in flight ([`terminate_runs`]) instead of waiting minutes for a frame
//! of thousands of tiles.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::ep;
use ort::session::{RunOptions, Session};
use ort::value::{TensorRef, ValueType};
use serde::{Deserialize, Serialize};

use super::batch_size::TileBatch;

/// Names of the graph's inputs and output (the exporter's contract).
pub const INPUT_IMAGE: &str = "x_t";
pub const INPUT_TIME: &str = "t";
pub const OUTPUT_EPS: &str = "eps";

/// An execution provider to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cuda,
    Tensorrt,
    Cpu,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Cuda => "cuda",
            Provider::Tensorrt => "tensorrt",
            Provider::Cpu => "cpu",
        })
    }
}

/// Which of a bundle's graphs run: the f32 ones, or the int8 or fp16 copies that
/// `retrain --int8` / `--fp16` made (refused where the bundle has none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Int8,
    Fp16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
            Precision::Fp16 => "fp16",
        })
    }
}

/// How to run the model; part of the daemon config and of `infer`'s flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Path to `libonnxruntime.so`; falls back to `ORT_DYLIB_PATH`, then beside the binary.
    pub library_path: Option<PathBuf>,
    /// Providers to try, in order.
    pub providers: Vec<Provider>,
    /// Use CPU when none of `providers` registers (logged, and reported as the provider).
    pub allow_cpu_fallback: bool,
    /// ORT intra-op threads (1 is fastest on small contended machines).
    pub intra_threads: usize,
    /// CUDA/TensorRT device index.
    pub device_id: i32,
    /// TensorRT engine and timing cache directory.
    pub tensorrt_cache: Option<PathBuf>,
    /// The bundle's f32 graphs or their int8 copies.
    pub precision: Precision,
    /// Tiles per UNet call: probed for the device (`"auto"`) or fixed.
    pub tile_batch: TileBatch,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            library_path: None,
            providers: vec![Provider::Cpu],
            allow_cpu_fallback: false,
            intra_threads: 1,
            device_id: 0,
            tensorrt_cache: None,
            precision: Precision::Fp32,
            tile_batch: TileBatch::Auto,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("ONNX Runtime library not found; tried {}. Run scripts/fetch-onnxruntime.sh and set ORT_DYLIB_PATH or runtime.library_path", tried.join(", "))]
    LibraryMissing { tried: Vec<String> },
    #[error("could not load ONNX Runtime from {path}: {reason}")]
    LibraryLoad { path: PathBuf, reason: String },
    #[error("ONNX Runtime was already loaded from {loaded}; cannot also load {requested} in one process")]
    LibraryConflict { loaded: PathBuf, requested: PathBuf },
    #[error("no execution provider could be registered ({}); set allow_cpu_fallback = true to run on CPU", failures.join("; "))]
    NoProvider { failures: Vec<String> },
    #[error("runtime.providers is empty")]
    EmptyProviders,
    #[error("{path}: ONNX Runtime could not load the model: {reason}")]
    ModelLoad { path: PathBuf, reason: String },
    #[error("{path}: graph {what}")]
    GraphContract { path: PathBuf, what: String },
    #[error("inference failed: {0}")]
    Run(String),
}

/// One ORT environment per process (ORT's own rule), and the library it came from.
static ENVIRONMENT: OnceLock<(PathBuf, Environment)> = OnceLock::new();

/// Candidate library paths in priority order, with the reason each was considered.
fn library_candidates(configured: Option<&Path>) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Some(p) = configured {
        out.push(("runtime.library_path".to_string(), p.to_path_buf()));
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(("ORT_DYLIB_PATH".to_string(), PathBuf::from(p)));
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        out.push(("beside the binary".to_string(), dir.join("libonnxruntime.so")));
        out.push(("installed with the binary".to_string(), dir.join("../lib/edge-inspect/libonnxruntime.so")));
    }
    out
}

/// Opts the process out of ONNX Runtime's telemetry before the library is loaded:
/// Microsoft's Linux builds (1.32 here) create a device id and an event queue under
/// `~/.cache/Microsoft/DeveloperTools` and upload usage events when the environment is
/// created, before any API call could turn them off; `ORT_DISABLE_TELEMETRY=1`, read at
/// that moment, stops all of it. `main` calls this first, while it is the only thread.
#[allow(unsafe_code)]
pub fn opt_out_of_telemetry() {
    // SAFETY: called as the first statement of `main`, before any other thread exists
    // (nothing else can read or write the environment concurrently).
    unsafe { std::env::set_var("ORT_DISABLE_TELEMETRY", "1") };
}

/// The run options of every session call in the process (see [`terminate_runs`]).
static RUN_OPTIONS: OnceLock<RunOptions> = OnceLock::new();

fn run_options() -> Result<&'static RunOptions, RuntimeError> {
    if let Some(options) = RUN_OPTIONS.get() {
        return Ok(options);
    }
    let options = RunOptions::new().map_err(|e| RuntimeError::Run(e.to_string()))?;
    Ok(RUN_OPTIONS.get_or_init(|| options))
}

/// Ends every ONNX Runtime call in flight (they fail with "terminate flag set") and makes
/// later ones fail at once: the daemon's drain deadline has passed and nothing more will
/// be inspected. Process-wide, as a stop is.
pub fn terminate_runs() {
    match run_options().and_then(|o| o.terminate().map_err(|e| RuntimeError::Run(e.to_string()))) {
        Ok(()) => tracing::info!("ONNX Runtime calls in flight terminated."),
        Err(e) => tracing::warn!(error = %e, "Cannot terminate the ONNX Runtime calls in flight."),
    }
}

/// Loads ONNX Runtime once and returns the process's environment.
pub fn environment(configured: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    let candidates = library_candidates(configured);
    if let Some((loaded, env)) = ENVIRONMENT.get() {
        // Only a different *explicit* request is a conflict; env/beside-binary are defaults.
        if let Some(requested) = configured
            && requested != loaded
        {
            return Err(RuntimeError::LibraryConflict { loaded: loaded.clone(), requested: requested.to_path_buf() });
        }
        return Ok(env);
    }
    let Some((source, path)) = candidates.iter().find(|(_, p)| p.is_file()).cloned() else {
        let tried = candidates.iter().map(|(why, p)| format!("{} ({why})", p.display())).collect();
        return Err(RuntimeError::LibraryMissing { tried });
    };
    // ORT looks for its provider libraries (CUDA, TensorRT) beside the file it was loaded
    // from: load the real file, not an alternatives link to it.
    let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    let builder =
        ort::init_from(&real).map_err(|e| RuntimeError::LibraryLoad { path: real.clone(), reason: e.to_string() })?;
    // Microsoft's builds send usage telemetry and keep a device id and an event queue under
    // `~/.cache/Microsoft`; a line node must not phone home (tested: `no_telemetry`).
    let env = builder
        .with_name("edge-inspect")
        .with_telemetry(false)
        .build()
        .map_err(|e| RuntimeError::LibraryLoad { path: path.clone(), reason: e.to_string() })?;
    tracing::info!(library = %real.display(), source = %source, "ONNX Runtime loaded.");
    let (_, env) = ENVIRONMENT.get_or_init(|| (path, env));
    Ok(env)
}

fn provider_dispatch(provider: Provider, config: &RuntimeConfig) -> ep::ExecutionProviderDispatch {
    match provider {
        Provider::Cuda => ep::CUDA::default().with_device_id(config.device_id).build().error_on_failure(),
        Provider::Tensorrt => {
            let mut trt = ep::TensorRT::default().with_device_id(config.device_id);
            if let Some(cache) = &config.tensorrt_cache {
                let cache = cache.display().to_string();
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&cache)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&cache);
            }
            trt.build().error_on_failure()
        }
        Provider::Cpu => ep::CPU::default().build().error_on_failure(),
    }
}

/// The ε-prediction network, whatever runs it. The ORT session is the product's; the
/// burn model implements it too (training-time evaluation), so reconstruction is one code.
pub trait Denoiser {
    /// Image channels the network expects.
    fn channels(&self) -> usize;
    /// Predicts ε for a batch `x [n, C, h, w]` at float timesteps `t [n]`, and hands the
    /// prediction (same layout as `x`) to `consume`, which must not keep it.
    fn predict_eps(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[f32],
        consume: &mut dyn FnMut(&[f32]),
    ) -> Result<(), RuntimeError>;
}

/// A denoiser made of a function `(element index, x_t value, timestep index) → ε`, for unit
/// tests of the samplers and the inspection path without a model.
#[cfg(test)]
pub(crate) struct FnDenoiser<F: FnMut(usize, f32, usize) -> f32>(pub F);

#[cfg(test)]
impl<F: FnMut(usize, f32, usize) -> f32> Denoiser for FnDenoiser<F> {
    fn channels(&self) -> usize {
        1
    }
    fn predict_eps(
        &mut self,
        x: &[f32],
        _: [usize; 4],
        t: &[f32],
        consume: &mut dyn FnMut(&[f32]),
    ) -> Result<(), RuntimeError> {
        let k = t[0] as usize;
        consume(&x.iter().enumerate().map(|(i, v)| (self.0)(i, *v, k)).collect::<Vec<f32>>());
        Ok(())
    }
}

/// Receives each extra output of an observer graph by name (int8 calibration).
pub type Observer = Box<dyn FnMut(&str, &[f32]) + Send>;

/// A loaded UNet session and the provider it actually runs on.
pub struct OrtDenoiser {
    session: Session,
    channels: usize,
    provider: Provider,
    fell_back_to_cpu: bool,
    /// Sees every output besides `eps` after each run (`model::quantize::observer` graphs).
    observer: Option<Observer>,
}

impl OrtDenoiser {
    /// Builds the session and checks the graph's inputs and output against the contract.
    pub fn load(model_path: &Path, channels: usize, config: &RuntimeConfig) -> Result<Self, RuntimeError> {
        Self::open(model_path, None, channels, config)
    }

    /// As [`OrtDenoiser::load`], for a graph built in memory (`label` names it in errors
    /// and logs).
    pub fn from_memory(
        graph: &[u8],
        label: &Path,
        channels: usize,
        config: &RuntimeConfig,
    ) -> Result<Self, RuntimeError> {
        Self::open(label, Some(graph), channels, config)
    }

    fn open(
        model_path: &Path,
        in_memory: Option<&[u8]>,
        channels: usize,
        config: &RuntimeConfig,
    ) -> Result<Self, RuntimeError> {
        let env = environment(config.library_path.as_deref())?;
        if config.providers.is_empty() {
            return Err(RuntimeError::EmptyProviders);
        }
        let build = |dispatch: ep::ExecutionProviderDispatch| -> Result<Session, String> {
            let mut builder = Session::builder(env)
                .map_err(|e| e.to_string())?
                .with_execution_providers([dispatch])
                .map_err(|e| e.to_string())?
                .with_intra_threads(config.intra_threads.max(1))
                .map_err(|e| e.to_string())?
                // ORT's workers spin after each run by default: with the UNet, the head and
                // the patch model in turn, each session's spinning threads took the cores
                // from the next one, and a 640x480 frame took twice as long (performance.md).
                // Nothing here busy-waits.
                .with_intra_op_spinning(false)
                .map_err(|e| e.to_string())?;
            let session = match in_memory {
                Some(graph) => builder.commit_from_memory(graph),
                None => builder.commit_from_file(model_path),
            };
            session.map_err(|e| e.to_string())
        };
        let mut failures = Vec::new();
        let mut chosen = None;
        for &provider in &config.providers {
            match build(provider_dispatch(provider, config)) {
                Ok(session) => {
                    chosen = Some((session, provider, false));
                    break;
                }
                // A model the runtime cannot parse fails on every provider: say so plainly.
                Err(reason) if reason.contains("Protobuf parsing failed") || reason.contains("ModelProto") => {
                    return Err(RuntimeError::ModelLoad { path: model_path.to_path_buf(), reason });
                }
                Err(reason) => {
                    tracing::warn!(provider = %provider, error = %reason, "Execution provider failed to register.");
                    failures.push(format!("{provider}: {reason}"));
                }
            }
        }
        let (session, provider, fell_back_to_cpu) = match chosen {
            Some(found) => found,
            None if config.allow_cpu_fallback => {
                tracing::warn!(failed = %failures.join("; "), "Falling back to the CPU execution provider (allow_cpu_fallback = true).");
                let session = build(provider_dispatch(Provider::Cpu, config))
                    .map_err(|reason| RuntimeError::ModelLoad { path: model_path.to_path_buf(), reason })?;
                (session, Provider::Cpu, true)
            }
            None => return Err(RuntimeError::NoProvider { failures }),
        };
        let denoiser = Self { session, channels, provider, fell_back_to_cpu, observer: None };
        denoiser.check_contract(model_path)?;
        tracing::info!(model = %model_path.display(), provider = %provider, fallback = fell_back_to_cpu, "Model session ready.");
        Ok(denoiser)
    }

    fn check_contract(&self, path: &Path) -> Result<(), RuntimeError> {
        let contract = |what: String| RuntimeError::GraphContract { path: path.to_path_buf(), what };
        let names: Vec<&str> = self.session.inputs().iter().map(|i| i.name()).collect();
        for wanted in [INPUT_IMAGE, INPUT_TIME] {
            if !names.contains(&wanted) {
                return Err(contract(format!("has inputs {names:?}, expected '{INPUT_IMAGE}' and '{INPUT_TIME}'")));
            }
        }
        if !self.session.outputs().iter().any(|o| o.name() == OUTPUT_EPS) {
            return Err(contract(format!("has no output '{OUTPUT_EPS}'")));
        }
        let image = self.session.inputs().iter().find(|i| i.name() == INPUT_IMAGE).expect("checked above");
        if let ValueType::Tensor { shape, .. } = image.dtype() {
            let dims: Vec<i64> = shape.iter().copied().collect();
            if dims.len() != 4 {
                return Err(contract(format!("input '{INPUT_IMAGE}' has rank {}, expected 4 (N,C,H,W)", dims.len())));
            }
            if dims[1] >= 0 && dims[1] as usize != self.channels {
                return Err(contract(format!(
                    "input '{INPUT_IMAGE}' has {} channels but the manifest says {}",
                    dims[1], self.channels
                )));
            }
        }
        Ok(())
    }

    /// The provider the session really runs on.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// True when none of the configured providers registered and CPU was used instead.
    pub fn fell_back_to_cpu(&self) -> bool {
        self.fell_back_to_cpu
    }

    /// Hands every output besides `eps` of each later run to `observer`.
    pub fn observe(&mut self, observer: Observer) {
        self.observer = Some(observer);
    }
}

impl OrtDenoiser {
    /// Runs the graph on `x [n, C, h, w]` at timesteps `t` and hands the output's shape and
    /// values to `consume`, whatever their shape (a feature graph's output is not `x`'s).
    pub fn predict_raw(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[f32],
        consume: &mut dyn FnMut(&[usize], &[f32]),
    ) -> Result<(), RuntimeError> {
        let run = |e: ort::Error| RuntimeError::Run(e.to_string());
        let image = TensorRef::from_array_view((shape, x)).map_err(run)?;
        let time = TensorRef::from_array_view(([t.len()], t)).map_err(run)?;
        let inputs = ort::inputs![INPUT_IMAGE => image, INPUT_TIME => time];
        let outputs = self.session.run_with_options(inputs, run_options()?).map_err(run)?;
        if let Some(observer) = self.observer.as_mut() {
            for (name, value) in outputs.iter().filter(|(name, _)| *name != OUTPUT_EPS) {
                observer(name, value.try_extract_tensor::<f32>().map_err(run)?.1);
            }
        }
        let (out_shape, out) = outputs[OUTPUT_EPS].try_extract_tensor::<f32>().map_err(run)?;
        let dims: Vec<usize> = out_shape.iter().map(|&d| d as usize).collect();
        consume(&dims, out);
        Ok(())
    }
}

impl Denoiser for OrtDenoiser {
    fn channels(&self) -> usize {
        self.channels
    }

    fn predict_eps(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[f32],
        consume: &mut dyn FnMut(&[f32]),
    ) -> Result<(), RuntimeError> {
        let mut mismatch = None;
        self.predict_raw(x, shape, t, &mut |out_shape, eps| match eps.len() == x.len() {
            true => consume(eps),
            false => mismatch = Some(out_shape.to_vec()),
        })?;
        match mismatch {
            None => Ok(()),
            Some(out_shape) => {
                Err(RuntimeError::Run(format!("output '{OUTPUT_EPS}' has shape {out_shape:?}, input was {shape:?}")))
            }
        }
    }
}
