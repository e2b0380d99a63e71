//! `retrain`'s normal-patch model: pretrained features of training tiles, a robust
//! Gaussian fitted on them (`model::patch`), and the `patch.onnx` graph written into the
//! staged bundle with its golden check.
//!
//! For the global Gaussian the tiles are random crops of the training frames at the model's
//! scale, as the head's are; for the per-position model (aligned parts, frames seen whole)
//! they are the training frames themselves, unflipped. The calibration frames stay held
//! out. The frames are contaminated, and nothing labels which patches are defects: the trim
//! of the most distant vectors between refits is what keeps them out of the model
//! (`model::patch`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::infer::bundle::{BundleError, Staged, sha256_hex};
use crate::infer::runtime::{OrtDenoiser, RuntimeConfig};
use crate::model::backbone::{Backbone, FeatureSpec};
use crate::model::manifest::{Manifest, PATCH_FILE, PatchArtifact, PatchFit};
use crate::model::patch::{Gaussian, PerPosition, RobustFit, patch_onnx, per_position_onnx};
use crate::train::export::pair_golden;

/// Which model of normal patch features is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchKind {
    /// One Gaussian of every patch vector: textures, parts anywhere in the frame.
    #[default]
    Gaussian,
    /// One Gaussian per feature cell (PaDiM): parts in the same place in every frame.
    PerPosition,
}

impl PatchKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Gaussian => "gaussian",
            Self::PerPosition => "per-position",
        }
    }
}

/// The normal-patch model's settings; stored in the training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchConfig {
    /// The backbone checkpoint (`scripts/fetch-backbone.sh`).
    pub backbone: PathBuf,
    #[serde(default)]
    pub model: PatchKind,
    /// Training tiles whose features are modelled.
    pub tiles: usize,
    /// Fraction of patch vectors trimmed as the most distant before each refit.
    pub trim: f64,
    /// Refits after the first fit.
    pub rounds: usize,
    /// Covariance ridge, as a fraction of the mean variance.
    pub shrinkage: f64,
    /// Weight of the patch map fused into the shipped rule's map (0: not fused; the patch
    /// rule then only competes in the search on its own). `None`: chosen by the
    /// operating-point search among `operating_point::FUSION_WEIGHTS`, or
    /// [`DEFAULT_FUSION_WEIGHT`] when the operating point is fixed.
    pub fusion_weight: Option<f64>,
    /// The recall on the validation defects that the cascade's screen on the patch map is
    /// chosen for (`postprocess::screen`); `None`: no screen, every tile is reconstructed.
    #[serde(default)]
    pub screen_recall: Option<f64>,
}

pub use crate::postprocess::screen::DEFAULT_RECALL;

/// The fusion weight of a model whose operating point is not searched: equal weight to two
/// standardised maps.
pub const DEFAULT_FUSION_WEIGHT: f64 = 0.5;

impl PatchConfig {
    pub fn with_backbone(backbone: PathBuf, trim: f64, fusion_weight: Option<f64>) -> Self {
        Self {
            backbone,
            model: PatchKind::Gaussian,
            tiles: 256,
            trim,
            rounds: 3,
            shrinkage: 0.01,
            fusion_weight,
            screen_recall: Some(DEFAULT_RECALL),
        }
    }

    fn fit(&self) -> RobustFit {
        RobustFit { trim: self.trim, rounds: self.rounds, shrinkage: self.shrinkage }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.tiles == 0 || self.tiles > 1 << 16 {
            return Err(format!("the patch model needs 1..=65536 tiles, got {}", self.tiles));
        }
        if !self.backbone.is_file() {
            return Err(format!(
                "the backbone checkpoint {} is not a file (scripts/fetch-backbone.sh fetches it)",
                self.backbone.display()
            ));
        }
        if let Some(weight) = self.fusion_weight.filter(|w| !(0.0..=1.0).contains(w)) {
            return Err(format!("the patch map's fusion weight must be in [0, 1], got {weight}"));
        }
        self.fit().validate()
    }
}

/// Fits the normal-patch model on `tiles` (model-size frames `[C, H, W]`), writes
/// `patch.onnx` into `staged`, and returns its verified session and manifest section.
pub fn fit_patch_model(
    config: &PatchConfig,
    tiles: &[Vec<f32>],
    manifest: &Manifest,
    staged: &Staged,
    runtime: &RuntimeConfig,
) -> Result<(OrtDenoiser, PatchArtifact), BundleError> {
    let inconsistent = |what: String| BundleError::Inconsistent { path: config.backbone.clone(), what };
    let checkpoint =
        std::fs::read(&config.backbone).map_err(|source| BundleError::Io { path: config.backbone.clone(), source })?;
    let backbone = Backbone::load(&config.backbone).map_err(inconsistent)?;
    let input = manifest.input;
    let spec = FeatureSpec::for_tile(input.height.max(input.width), sha256_hex(&checkpoint));
    let version = env!("CARGO_PKG_VERSION");
    let graph = backbone.features_onnx(&spec, input.channels, version);
    let label = config.backbone.with_file_name("patch features (derived from the backbone)");
    let mut features = OrtDenoiser::from_memory(&graph, &label, input.channels, runtime)?;
    let (vectors, cells) = patch_vectors(&mut features, tiles, [input.channels, input.height, input.width])?;
    let onnx = match config.model {
        PatchKind::Gaussian => {
            let gaussian = Gaussian::fit(&vectors, spec.channels, &config.fit()).map_err(inconsistent)?;
            patch_onnx(&backbone, &spec, &gaussian, input.channels, version)
        }
        PatchKind::PerPosition => {
            let model = PerPosition::fit(&vectors, spec.channels, cells, &config.fit()).map_err(inconsistent)?;
            per_position_onnx(&backbone, &spec, &model, input.channels, version)
        }
    };
    staged.write(PATCH_FILE, &onnx)?;
    let path = staged.path(PATCH_FILE);
    let mut session = OrtDenoiser::load(&path, 2 * input.channels, runtime)?;
    let golden = pair_golden(&mut session, manifest, 2 * input.channels)?;
    let fit = PatchFit {
        tiles: tiles.len(),
        vectors: vectors.len() / spec.channels,
        trim: config.trim,
        rounds: config.rounds,
        shrinkage: config.shrinkage,
    };
    let model = config.model.name();
    tracing::info!(model, tiles = fit.tiles, vectors = fit.vectors, trim = fit.trim, "Normal-patch model fitted.");
    let artifact = PatchArtifact {
        onnx: PATCH_FILE.to_string(),
        sha256: sha256_hex(&onnx),
        features: spec,
        model: model.into(),
        fit,
        golden,
    };
    Ok((session, artifact))
}

/// The patch vectors of `tiles`, one row of `channels` values per feature cell (each
/// tile's cells in order), and the feature cells `[h, w]` of a tile.
fn patch_vectors(
    features: &mut OrtDenoiser,
    tiles: &[Vec<f32>],
    [c, h, w]: [usize; 3],
) -> Result<(Vec<f32>, [usize; 2]), BundleError> {
    const BATCH: usize = 8;
    let mut vectors = Vec::new();
    let mut grid = [0, 0];
    for chunk in tiles.chunks(BATCH) {
        let n = chunk.len();
        features.predict_raw(&chunk.concat(), [n, c, h, w], &vec![0.0; n], &mut |dims, out| {
            grid = [dims[2], dims[3]];
            let (channels, cells) = (dims[1], dims[2] * dims[3]);
            for frame in out.chunks_exact(channels * cells) {
                for cell in 0..cells {
                    vectors.extend((0..channels).map(|k| frame[k * cells + cell]));
                }
            }
        })?;
    }
    Ok((vectors, grid))
}
