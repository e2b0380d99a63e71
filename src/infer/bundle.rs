//! Loading and writing model bundles (`models/<name>/{model.onnx, manifest.toml}`).
//!
//! Loading verifies, in order: the manifest parses and is self-consistent, the ONNX
//! file's sha256 matches, ORT accepts the graph and its inputs match the manifest, and the
//! golden probe reproduces the recorded output (this run is also the warm-up). Any failure
//! is a [`BundleError`] naming the file and the value.
//!
//! Writing is staged in a hidden sibling directory and renamed into place, so a reader
//! never sees a half-written bundle and a failed export leaves nothing behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::infer::reconstruct::Reconstructor;
use crate::infer::runtime::{Denoiser, OrtDenoiser, Precision, RuntimeConfig, RuntimeError};
use crate::model::diffusion::NoiseSchedule;
use crate::model::manifest::{GoldenCheck, MANIFEST_FILE, Manifest, QuantizedGraph, SCHEMA_VERSION};
use crate::model::preprocess::InputSpec;
use crate::model::sampling::ReconstructionSpec;
use crate::postprocess::anomaly::Residual;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: model bundle directory not found")]
    NotFound { path: PathBuf },
    #[error("{path}: missing from the bundle")]
    MissingFile { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid manifest: {message}")]
    ManifestParse { path: PathBuf, message: String },
    #[error("{path}: schema_version {found} is not supported (this build reads {SCHEMA_VERSION})")]
    SchemaVersion { path: PathBuf, found: u32 },
    #[error("{path}: {what}")]
    Inconsistent { path: PathBuf, what: String },
    #[error("{path}: sha256 is {actual}, manifest expects {expected}")]
    ShaMismatch { path: PathBuf, expected: String, actual: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{path}: golden check failed: {what}")]
    Golden { path: PathBuf, what: String },
    #[error("{path}: already exists (use --force to replace it)")]
    Exists { path: PathBuf },
}

/// Lowercase hex sha256 of a byte string.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io { path: path.to_path_buf(), source }
}

/// Reads and checks a manifest (no ONNX Runtime needed).
pub fn read_manifest(dir: &Path) -> Result<Manifest, BundleError> {
    if !dir.is_dir() {
        return Err(BundleError::NotFound { path: dir.to_path_buf() });
    }
    let path = dir.join(MANIFEST_FILE);
    if !path.is_file() {
        return Err(BundleError::MissingFile { path });
    }
    let text = fs::read_to_string(&path).map_err(io_error(&path))?;
    // Check the version before the full parse so an old file gets the precise error.
    let version = toml::from_str::<toml::Table>(&text)
        .map_err(|e| BundleError::ManifestParse { path: path.clone(), message: e.to_string() })?
        .get("schema_version")
        .and_then(toml::Value::as_integer);
    match version {
        Some(v) if v == SCHEMA_VERSION as i64 => {}
        Some(v) => return Err(BundleError::SchemaVersion { path, found: v.max(0) as u32 }),
        None => return Err(BundleError::ManifestParse { path, message: "schema_version is missing".into() }),
    }
    let manifest: Manifest =
        toml::from_str(&text).map_err(|e| BundleError::ManifestParse { path: path.clone(), message: e.to_string() })?;
    validate(&manifest).map_err(|what| BundleError::Inconsistent { path, what })?;
    Ok(manifest)
}

/// Cross-field rules a parsed manifest must satisfy.
pub fn validate(m: &Manifest) -> Result<(), String> {
    if m.input.channels != 1 && m.input.channels != 3 {
        return Err(format!("input.channels must be 1 or 3, got {}", m.input.channels));
    }
    if m.input.channels != m.unet.channels {
        return Err(format!("input.channels = {} but unet.channels = {}", m.input.channels, m.unet.channels));
    }
    if !(m.input.std > 0.0) {
        return Err(format!("input.std must be > 0, got {}", m.input.std));
    }
    m.unet.validate().map_err(|e| e.to_string())?;
    m.unet.check_input_size(m.input.height, m.input.width).map_err(|e| e.to_string())?;
    m.inspection.validate([m.input.height, m.input.width])?;
    check_anomaly(&m.anomaly)?;
    let schedule = NoiseSchedule::new(&m.schedule).map_err(|e| format!("schedule: {e}"))?;
    crate::infer::ensemble::Ensemble::new(&schedule, m.reconstruction, m.extra_t0())
        .map_err(|e| format!("reconstruction: {e}"))?;
    check_feature_t(m.anomaly.feature_t, m.schedule.steps).map_err(|e| format!("anomaly.{e}"))?;
    for (name, t) in [("pixel", &m.thresholds.pixel), ("image", &m.thresholds.image)] {
        if !(t.max >= t.min) || !t.value.is_finite() {
            return Err(format!("thresholds.{name}: need finite value and max >= min, got {t:?}"));
        }
    }
    match (&m.head, m.anomaly.residual) {
        (None, Residual::Head) => return Err("anomaly.residual = \"head\" but the bundle has no [head]".into()),
        _ if m.anomaly.fusion.is_some() && m.patch.is_none() => {
            return Err("anomaly.fusion needs the bundle's normal-patch model ([patch])".into());
        }
        (_, Residual::Patch) if m.anomaly.fusion.is_some() => {
            return Err("anomaly.fusion fuses the patch map into another rule, not into \"patch\"".into());
        }
        (_, Residual::Patch) if m.patch.is_none() => {
            return Err("anomaly.residual = \"patch\" but the bundle has no [patch]".into());
        }
        (Some(h), _) if h.patch_channel.is_some() && m.patch.is_none() => {
            return Err("head.patch_channel: the head reads the patch map, but the bundle has no [patch]".into());
        }
        (Some(h), _) if h.patch_channel.is_some_and(|[mean, sd]| !(mean.is_finite() && sd > 0.0)) => {
            return Err(format!("head.patch_channel needs a finite mean and a positive sd, got {:?}", h.patch_channel));
        }
        (Some(h), _) if h.unet.channels != h.input_channels(m.input.channels) => {
            return Err(format!(
                "head.unet.channels = {}, need 2 × input.channels{} = {}",
                h.unet.channels,
                if h.patch_channel.is_some() { " + 1 (the patch map)" } else { "" },
                h.input_channels(m.input.channels)
            ));
        }
        _ => {}
    }
    if m.golden.batch == 0 || m.golden.timesteps.len() != m.golden.batch {
        return Err(format!("golden: {} timesteps for batch {}", m.golden.timesteps.len(), m.golden.batch));
    }
    Ok(())
}

/// The feature map's timestep must be one of the schedule's.
fn check_feature_t(feature_t: usize, steps: usize) -> Result<(), String> {
    if feature_t >= steps {
        return Err(format!("feature_t = {feature_t} is beyond the schedule's {steps} timesteps"));
    }
    Ok(())
}

/// Anomaly-map settings within bounds the post-processing can run with (a σ of 1e9 would
/// ask for a 64 GB kernel at the first frame).
fn check_anomaly(a: &crate::postprocess::anomaly::AnomalySpec) -> Result<(), String> {
    if !(a.smoothing_sigma.is_finite() && (0.0..=64.0).contains(&a.smoothing_sigma)) {
        return Err(format!("anomaly.smoothing_sigma must be in 0..=64 pixels, got {}", a.smoothing_sigma));
    }
    if let crate::postprocess::anomaly::ImageScore::TopKMean { fraction } = a.image_score
        && !(fraction > 0.0 && fraction <= 1.0)
    {
        return Err(format!("anomaly.image_score.fraction must be in (0, 1], got {fraction}"));
    }
    if let Some(fusion) = &a.fusion {
        fusion.validate()?;
    }
    if let Some(screen) = &a.screen {
        screen.validate()?;
        if a.fusion.is_none_or(|f| f.patch_weight <= 0.0) {
            return Err("anomaly.screen screens tiles on the patch map: it needs anomaly.fusion with a \
                        patch_weight above 0"
                .into());
        }
    }
    if a.min_region_area > 1 << 24 {
        return Err(format!("anomaly.min_region_area must be at most 16777216, got {}", a.min_region_area));
    }
    Ok(())
}

/// A verified bundle with a warm ONNX Runtime session (and one for its head, if any, and
/// for the feature distance when its map rule is `feature`).
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub denoiser: OrtDenoiser,
    pub head: Option<OrtDenoiser>,
    pub features: Option<OrtDenoiser>,
    /// The normal-patch model's graph, when the bundle has one.
    pub patch: Option<OrtDenoiser>,
}

impl Bundle {
    pub fn load(dir: &Path, runtime: &RuntimeConfig) -> Result<Self, BundleError> {
        let manifest = read_manifest(dir)?;
        let chosen = GraphRefs::at(&manifest, runtime.precision)
            .map_err(|what| BundleError::Inconsistent { path: dir.to_path_buf(), what })?;
        let onnx_path = dir.join(chosen.unet.onnx);
        verify_sha(&onnx_path, chosen.unet.sha256)?;
        let mut denoiser = OrtDenoiser::load(&onnx_path, manifest.unet.channels, runtime)?;
        check_golden(&mut denoiser, chosen.unet.golden, &manifest.input)
            .map_err(|what| BundleError::Golden { path: onnx_path, what })?;
        let pair = 2 * manifest.input.channels;
        let graph =
            |g: GraphRef, channels: usize| pair_graph(dir, g.onnx, g.sha256, g.golden, channels, &manifest, runtime);
        let head_channels = manifest.head.as_ref().map_or(pair, |a| a.unet.channels);
        let head = chosen.head.map(|g| graph(g, head_channels)).transpose()?;
        let patch = chosen.patch.map(|g| graph(g, pair)).transpose()?;
        tracing::info!(bundle = %dir.display(), name = %manifest.name, version = %manifest.version, sha256 = %manifest.artifact.sha256, precision = %runtime.precision, "Model bundle verified.");
        let (residual, feature_t) = (manifest.anomaly.residual, manifest.anomaly.feature_t);
        let mut bundle = Self { dir: dir.to_path_buf(), manifest, denoiser, head, features: None, patch };
        bundle.use_map_rule(residual, feature_t, runtime)?;
        Ok(bundle)
    }

    /// Switches the map rule (e.g. `eval --anomaly-map --feature-t`), opening the graph it
    /// needs: the feature distance is derived from the verified weights. Another rule than
    /// the manifest's is not fused with the patch map.
    pub fn use_map_rule(
        &mut self,
        residual: Residual,
        feature_t: usize,
        runtime: &RuntimeConfig,
    ) -> Result<(), BundleError> {
        check_feature_t(feature_t, self.manifest.schedule.steps)
            .map_err(|what| BundleError::Inconsistent { path: self.dir.clone(), what })?;
        if residual == Residual::Head && self.head.is_none() {
            return Err(BundleError::Inconsistent {
                path: self.dir.clone(),
                what: "the head map rule needs a bundle with a learned head (retrain --head-steps)".into(),
            });
        }
        if residual == Residual::Patch && self.patch.is_none() {
            return Err(BundleError::Inconsistent {
                path: self.dir.clone(),
                what: "the patch map rule needs a bundle with a normal-patch model (retrain --patch-model)".into(),
            });
        }
        if residual == Residual::Feature && self.features.is_none() {
            let onnx_path = self.dir.join(&self.manifest.artifact.onnx);
            self.features = Some(feature_session(&onnx_path, &self.manifest, runtime)?);
        }
        if residual != self.manifest.anomaly.residual {
            // Another rule is scored on its own: the manifest's fusion was fitted for its rule.
            self.manifest.anomaly.fusion = None;
        }
        self.manifest.anomaly.residual = residual;
        self.manifest.anomaly.feature_t = feature_t;
        Ok(())
    }

    /// A reconstructor for this model; `spec` overrides the manifest's t0/steps/sampler.
    pub fn reconstructor(&self, spec: Option<ReconstructionSpec>) -> Result<Reconstructor, BundleError> {
        let schedule = NoiseSchedule::new(&self.manifest.schedule)
            .map_err(|e| BundleError::Inconsistent { path: self.dir.clone(), what: e.to_string() })?;
        Reconstructor::new(schedule, spec.unwrap_or(self.manifest.reconstruction))
            .map_err(|e| BundleError::Inconsistent { path: self.dir.clone(), what: format!("reconstruction: {e}") })
    }
}

/// A graph file of the bundle, its hash and its golden check.
#[derive(Clone, Copy)]
struct GraphRef<'a> {
    onnx: &'a str,
    sha256: &'a str,
    golden: &'a GoldenCheck,
}

/// The graphs a bundle runs at one precision.
struct GraphRefs<'a> {
    unet: GraphRef<'a>,
    head: Option<GraphRef<'a>>,
    patch: Option<GraphRef<'a>>,
}

impl<'a> GraphRefs<'a> {
    fn at(m: &'a Manifest, precision: Precision) -> Result<Self, String> {
        let head = m.head.as_ref().map(|a| GraphRef { onnx: &a.onnx, sha256: &a.sha256, golden: &a.golden });
        let patch = m.patch.as_ref().map(|a| GraphRef { onnx: &a.onnx, sha256: &a.sha256, golden: &a.golden });
        let unet = GraphRef { onnx: &m.artifact.onnx, sha256: &m.artifact.sha256, golden: &m.golden };
        let copies = match precision {
            Precision::Fp32 => return Ok(Self { unet, head, patch }),
            Precision::Int8 => m.int8.as_ref().map(|g| (&g.unet, g.head.as_ref(), g.patch.as_ref())),
            Precision::Fp16 => m.fp16.as_ref().map(|g| (&g.unet, g.head.as_ref(), g.patch.as_ref())),
        };
        let (unet_copy, head_copy, patch_copy) = copies.ok_or_else(|| {
            format!(
                "precision {precision}: the bundle has no {precision} graphs (made without `retrain --{precision}`, \
                 or its {precision} graphs lost too much quality: see the retrain report)"
            )
        })?;
        let of = |g: &'a QuantizedGraph| GraphRef { onnx: &g.onnx, sha256: &g.sha256, golden: &g.golden };
        // A graph without a copy runs in f32 (retrain kept it so: its copy cost too much
        // quality); a copy of a graph the bundle lacks is an inconsistent manifest.
        let copy = |name: &str, f32_graph: Option<GraphRef<'a>>, q: Option<&'a QuantizedGraph>| match (f32_graph, q) {
            (Some(_), Some(q)) => Ok(Some(of(q))),
            (f32_graph, None) => Ok(f32_graph),
            (None, Some(_)) => Err(format!("precision {precision}: [{precision}.{name}] without a [{name}]")),
        };
        Ok(Self { unet: of(unet_copy), head: copy("head", head, head_copy)?, patch: copy("patch", patch, patch_copy)? })
    }
}

/// The feature-distance graph of the weights in `onnx_path` (already verified), in a session.
#[cfg(feature = "train")]
fn feature_session(onnx_path: &Path, manifest: &Manifest, runtime: &RuntimeConfig) -> Result<OrtDenoiser, BundleError> {
    use crate::model::onnx_export::{export_feature_onnx, import_weights};
    use crate::model::unet::UNet;
    let inconsistent = |what: String| BundleError::Inconsistent { path: onnx_path.to_path_buf(), what };
    let bytes = fs::read(onnx_path).map_err(io_error(onnx_path))?;
    let model =
        UNet::init(&manifest.unet, 0, &burn::tensor::Device::flex()).map_err(|e| inconsistent(e.to_string()))?;
    let model = import_weights(model, &bytes).map_err(inconsistent)?;
    let graph = export_feature_onnx(&model, &manifest.unet, env!("CARGO_PKG_VERSION"));
    let label = onnx_path.with_file_name("features (derived from model.onnx)");
    Ok(OrtDenoiser::from_memory(&graph, &label, 2 * manifest.input.channels, runtime)?)
}

/// Without the training stack there is no UNet to derive the feature graph from.
#[cfg(not(feature = "train"))]
fn feature_session(onnx_path: &Path, _: &Manifest, _: &RuntimeConfig) -> Result<OrtDenoiser, BundleError> {
    Err(BundleError::Inconsistent {
        path: onnx_path.to_path_buf(),
        what: "the feature map rule needs a build with the `train` feature (it derives its graph from the weights)"
            .into(),
    })
}

/// A graph of the head's contract (frame ‖ reconstruction (‖ patch map) in, `channels`
/// channels), its file checked against the manifest's sha256 and its output against the
/// golden statistics.
fn pair_graph(
    dir: &Path,
    file: &str,
    sha256: &str,
    golden: &GoldenCheck,
    channels: usize,
    manifest: &Manifest,
    runtime: &RuntimeConfig,
) -> Result<OrtDenoiser, BundleError> {
    let path = dir.join(file);
    verify_sha(&path, sha256)?;
    let mut graph = OrtDenoiser::load(&path, channels, runtime)?;
    check_golden(&mut graph, golden, &pair_input_spec(manifest, channels))
        .map_err(|what| BundleError::Golden { path, what })?;
    Ok(graph)
}

/// Checks that `path` exists and hashes to `expected`.
fn verify_sha(path: &Path, expected: &str) -> Result<(), BundleError> {
    if !path.is_file() {
        return Err(BundleError::MissingFile { path: path.to_path_buf() });
    }
    let actual = sha256_hex(&fs::read(path).map_err(io_error(path))?);
    if actual != expected {
        return Err(BundleError::ShaMismatch { path: path.to_path_buf(), expected: expected.to_string(), actual });
    }
    Ok(())
}

/// Runs the golden probe through `denoiser` and compares with the manifest.
pub fn run_golden(denoiser: &mut dyn Denoiser, manifest: &Manifest) -> Result<(), String> {
    check_golden(denoiser, &manifest.golden, &manifest.input)
}

/// The input of a graph of the head's contract with `channels` channels (frame ‖
/// reconstruction: `2·C`; a head that reads the patch map: `2·C + 1`).
pub fn pair_input_spec(manifest: &Manifest, channels: usize) -> InputSpec {
    InputSpec { channels, ..manifest.input }
}

/// Runs the golden probe for frames of `input` through `denoiser` and compares.
pub fn check_golden(denoiser: &mut dyn Denoiser, golden: &GoldenCheck, input: &InputSpec) -> Result<(), String> {
    let probe = GoldenCheck::probe(golden.batch, input);
    let shape = [golden.batch, input.channels, input.height, input.width];
    let mut verdict = Err("the model produced no output".to_string());
    denoiser
        .predict_eps(&probe, shape, &golden.timesteps, &mut |eps| verdict = golden.verify(eps))
        .map_err(|e| e.to_string())?;
    verdict
}

/// A bundle being written in a hidden sibling directory; [`Staged::commit`] renames it
/// into place, dropping it without commit removes it.
pub struct Staged {
    target: PathBuf,
    staging: PathBuf,
    force: bool,
    committed: bool,
}

impl Staged {
    pub fn new(target: &Path, force: bool) -> Result<Self, BundleError> {
        if target.exists() && !force {
            return Err(BundleError::Exists { path: target.to_path_buf() });
        }
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(io_error(parent))?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "bundle".into());
        let staging = parent.join(format!(".{name}.staging-{}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
        }
        fs::create_dir(&staging).map_err(io_error(&staging))?;
        Ok(Self { target: target.to_path_buf(), staging, force, committed: false })
    }

    /// Path of a file inside the staging directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.staging.join(file)
    }

    pub fn write(&self, file: &str, bytes: &[u8]) -> Result<(), BundleError> {
        let path = self.path(file);
        let mut f = fs::File::create(&path).map_err(io_error(&path))?;
        f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io_error(&path))
    }

    /// Removes a staged file that is not to be shipped.
    pub fn remove(&self, file: &str) -> Result<(), BundleError> {
        let path = self.path(file);
        fs::remove_file(&path).map_err(io_error(&path))
    }

    /// Moves the staged bundle into place, replacing an old one only with `force`.
    pub fn commit(mut self) -> Result<PathBuf, BundleError> {
        let old = self.staging.with_extension("previous");
        if self.target.exists() {
            if !self.force {
                return Err(BundleError::Exists { path: self.target.clone() });
            }
            fs::rename(&self.target, &old).map_err(io_error(&self.target))?;
        }
        if let Err(e) = fs::rename(&self.staging, &self.target) {
            // Put the previous bundle back: a failed write never loses the good model.
            let _ = fs::rename(&old, &self.target);
            return Err(BundleError::Io { path: self.target.clone(), source: e });
        }
        self.committed = true;
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io_error(&old))?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}
