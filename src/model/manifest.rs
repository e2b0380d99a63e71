//! The versioned sidecar of a model bundle (`models/<name>/manifest.toml`).
//!
//! Written by the exporter (`retrain`, `export`), verified by every loader. It pins
//! everything needed to reproduce the training-time view of a frame: input size and
//! normalisation, architecture, schedule, reconstruction, anomaly-map settings,
//! thresholds with their calibration, provenance, the ONNX file's sha256 and a golden
//! input/output check.

use serde::{Deserialize, Serialize};

use super::architecture::UNetConfig;
use super::diffusion::ScheduleSpec;
use super::preprocess::{InputSpec, Inspection};
use crate::model::sampling::ReconstructionSpec;
use crate::postprocess::anomaly::{AnomalySpec, Residual, Threshold};
use crate::postprocess::screen::{Screen, ScreenChoice};

/// Bumped on any incompatible change of this file's layout.
pub const SCHEMA_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.toml";
pub const ONNX_FILE: &str = "model.onnx";
pub const HEAD_FILE: &str = "head.onnx";
pub const PATCH_FILE: &str = "patch.onnx";
/// The int8 graphs' files, beside their f32 ones.
pub const INT8_ONNX_FILE: &str = "model.int8.onnx";
pub const INT8_HEAD_FILE: &str = "head.int8.onnx";
pub const INT8_PATCH_FILE: &str = "patch.int8.onnx";
pub const FP16_ONNX_FILE: &str = "model.fp16.onnx";
pub const FP16_HEAD_FILE: &str = "head.fp16.onnx";
pub const FP16_PATCH_FILE: &str = "patch.fp16.onnx";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub name: String,
    pub version: String,
    /// RFC 3339 creation time.
    pub created: String,
    pub input: InputSpec,
    /// Whole-frame resize or tiles at a pixel scale (absent in older bundles: resize).
    #[serde(default)]
    pub inspection: Inspection,
    pub unet: UNetConfig,
    pub schedule: ScheduleSpec,
    pub reconstruction: ReconstructionSpec,
    /// Further reconstructions whose maps are averaged with the primary one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<EnsembleSpec>,
    pub anomaly: AnomalySpec,
    pub thresholds: Thresholds,
    pub provenance: Provenance,
    pub artifact: Artifact,
    pub golden: GoldenCheck,
    /// The learned defect head, when `anomaly.residual` is `head`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<HeadArtifact>,
    /// How `reconstruction` and `anomaly.residual` were chosen, when `retrain` searched
    /// for them (absent in bundles from before the search, or trained with fixed settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_point: Option<OperatingPoint>,
    /// The normal-patch model on pretrained features, when `retrain` fitted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<PatchArtifact>,
    /// The cascade's screen at other recall targets than `anomaly.screen`'s (`retrain`
    /// chose each on the same validation defects): `eval`, `bench` and the daemon can take
    /// one instead, trading recall for speed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub screen_curve: Vec<Screen>,
    /// The statically quantised graphs (`retrain --int8`), run where the runtime's
    /// `precision` is `int8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8: Option<Int8Graphs>,
    /// The half-precision graphs (`retrain --fp16`), run where the runtime's `precision` is
    /// `fp16` (CUDA's and TensorRT's fp16 kernels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp16: Option<Fp16Graphs>,
}

impl Manifest {
    /// The screen chosen for `recall` on the manifest's curve; an error lists the recalls it has.
    pub fn screen_at(&self, recall: f64) -> Result<Screen, String> {
        self.screen_curve.iter().find(|s| s.recall_target == recall).copied().ok_or_else(|| {
            let have: Vec<f64> = self.screen_curve.iter().map(|s| s.recall_target).collect();
            format!("the bundle has no cascade screen for recall {recall} (it has {have:?})")
        })
    }

    /// Makes `choice` the screen that runs (`anomaly.screen`); an error names the recall the
    /// bundle lacks.
    pub fn choose_screen(&mut self, choice: ScreenChoice) -> Result<(), String> {
        match choice {
            ScreenChoice::Bundle => {}
            ScreenChoice::Off => self.anomaly.screen = None,
            ScreenChoice::Recall(recall) => self.anomaly.screen = Some(self.screen_at(recall)?),
        }
        Ok(())
    }
}

/// How a bundle's pretrained patch features are taken (`model::backbone`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub backbone: String,
    /// sha256 of the checkpoint the weights were read from.
    pub backbone_sha256: String,
    /// Tiles are resized by this factor before the network.
    pub input_scale: usize,
    /// Reflect padding per side, in pixels of the resized tile (a multiple of 8).
    pub pad: usize,
    /// Feature channels.
    pub channels: usize,
}

/// The `patch` map rule's graph: the pretrained backbone's patch features of the frame and
/// their distance to a model of normal patches fitted by `retrain` on the (contaminated)
/// training frames. In the head's contract (frame ‖ reconstruction in, the map in output
/// channel 0); it reads only the frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchArtifact {
    pub onnx: String,
    pub sha256: String,
    pub features: FeatureSpec,
    /// The normal model, e.g. "gaussian".
    pub model: String,
    /// How it was fitted.
    pub fit: PatchFit,
    pub golden: GoldenCheck,
}

/// The robust fit of the normal-patch model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchFit {
    /// Training tiles the features came from.
    pub tiles: usize,
    /// Patch vectors in all.
    pub vectors: usize,
    /// Fraction of vectors left out as the most distant after each refit.
    pub trim: f64,
    /// Refits (concentration steps) after the first fit.
    pub rounds: usize,
    /// Ridge added to the covariance, as a fraction of its mean variance.
    pub shrinkage: f64,
}

/// The discriminative head's graph: a UNet over the frame and its reconstruction stacked
/// channel-wise (`2·C` channels in and out, timestep 0), output channel 0 the defect logit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadArtifact {
    pub onnx: String,
    pub sha256: String,
    pub unet: UNetConfig,
    pub training_steps: usize,
    /// Mean loss over the last tenth of the head's training steps.
    pub final_loss: f64,
    pub golden: GoldenCheck,
    /// For a head that reads the normal-patch model's map as a third input: that map's mean
    /// and standard deviation on normal frames, which standardise it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_channel: Option<[f64; 2]>,
}

impl HeadArtifact {
    /// The head's input channels for frames of `channels`: frame, reconstruction and, where
    /// it reads it, the patch map.
    pub fn input_channels(&self, channels: usize) -> usize {
        2 * channels + usize::from(self.patch_channel.is_some())
    }
}

/// One graph's int8 or fp16 copy: its file, hash and golden statistics (its own: a reduced
/// precision answers the probe a little differently from f32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizedGraph {
    pub onnx: String,
    pub sha256: String,
    pub golden: GoldenCheck,
}

/// The shipped rule's figures on the validation defects (the search's pasted families,
/// mean over the family groups), at one precision.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFigures {
    pub pixel_auroc: f64,
    pub pixel_auprc: f64,
    pub image_auroc: f64,
}

/// The int8 graphs of a bundle: the UNet's, and the head's and the patch model's where the
/// bundle has them; how they were calibrated and what they cost in quality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Int8Graphs {
    pub unet: QuantizedGraph,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<QuantizedGraph>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<QuantizedGraph>,
    /// Held-out frames (tiles) whose activations set the scales.
    pub calibration_frames: usize,
    pub fp32: RuleFigures,
    pub int8: RuleFigures,
    /// The largest pixel-AUROC and AUPRC losses `retrain` accepted (int8 below f32 by more:
    /// not shipped).
    pub max_pixel_auroc_loss: f64,
    pub max_pixel_auprc_loss: f64,
}

/// The fp16 graphs of a bundle (`model::half`: the frame path in f16, the timestep branch
/// and the distances in f32) and what they cost in quality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fp16Graphs {
    pub unet: QuantizedGraph,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<QuantizedGraph>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<QuantizedGraph>,
    pub fp32: RuleFigures,
    pub fp16: RuleFigures,
    pub max_pixel_auroc_loss: f64,
    pub max_pixel_auprc_loss: f64,
}

/// Ensemble members beyond `reconstruction`: the same sampler, steps and conditioning at
/// other t0 (each costs its own UNet calls).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsembleSpec {
    pub extra_t0: Vec<usize>,
}

impl Manifest {
    /// The ensemble's extra t0 values (empty for a single reconstruction).
    pub fn extra_t0(&self) -> &[usize] {
        self.ensemble.as_ref().map_or(&[], |e| &e.extra_t0)
    }
}

/// The outcome of `retrain`'s operating-point search: synthetic defects pasted on the
/// held-out calibration frames, every candidate within the UNet-call budget scored, the
/// best by pixel AUPRC kept (ties: fewer UNet calls).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatingPoint {
    /// The rule in words.
    pub rule: String,
    /// Most UNet calls per tile a candidate could use.
    pub budget_unet_calls: usize,
    /// Clean frames the defects were pasted on (each scored clean and defective).
    pub validation_frames: usize,
    /// Defect shapes pasted for the search (held-out scoring should use others too).
    pub defect_kinds: Vec<String>,
    pub chosen: CandidateScore,
    /// Every candidate, best first.
    pub candidates: Vec<CandidateScore>,
    /// The weights tried for fusing the patch map into the chosen rule's, best first; empty
    /// when the weight was given, not searched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fusion_candidates: Vec<FusionScore>,
}

/// One fusion weight of the patch map and its validation figures (as a candidate's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusionScore {
    pub patch_weight: f64,
    pub pixel_auprc: f64,
    pub pixel_auroc: f64,
    pub image_auroc: f64,
}

impl CandidateScore {
    /// The candidate's primary reconstruction (DDIM, deterministic).
    pub fn reconstruction(&self) -> ReconstructionSpec {
        ReconstructionSpec {
            t0: self.t0,
            steps: self.steps,
            sampler: crate::model::sampling::Sampler::Ddim,
            eta: 0.0,
            condition: self.condition,
        }
    }
}

/// One candidate setting and its validation figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidateScore {
    pub t0: usize,
    /// Ensemble members at other t0 (maps averaged); empty for one reconstruction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_t0: Vec<usize>,
    pub steps: usize,
    pub condition: f64,
    pub residual: Residual,
    pub unet_calls: usize,
    pub pixel_auprc: f64,
    pub pixel_auroc: f64,
    pub image_auroc: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Thresholds {
    pub pixel: Threshold,
    pub image: Threshold,
    pub calibration: Calibration,
}

/// How the thresholds were chosen, with the statistics they came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// The rule in words, e.g. "uncalibrated" or "quantile 0.995 of pixel scores after
    /// trimming the top 10 % of frames".
    pub rule: String,
    /// Frames the statistics were computed on (0 = not calibrated).
    pub frames: usize,
    #[serde(default)]
    pub pixel_quantiles: Vec<[f64; 2]>,
    #[serde(default)]
    pub image_quantiles: Vec<[f64; 2]>,
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// "random" for untrained exports, else the training loss ("mse", "huber", "lts", "l1").
    pub loss: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huber_delta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lts_lambda: Option<f64>,
    /// sha256 over the training data (sorted file hashes); empty when untrained.
    pub data_sha256: String,
    pub training_steps: usize,
    pub seed: u64,
    /// The exact command that produced the bundle.
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub onnx: String,
    pub sha256: String,
    pub opset: i64,
    /// Largest |ORT − burn| on the export probe batch.
    pub parity_max_abs_diff: f64,
}

impl Artifact {
    /// Placeholder for a manifest not exported yet; `train::export::export_bundle` fills it in.
    pub fn pending() -> Self {
        Self { onnx: String::new(), sha256: String::new(), opset: 0, parity_max_abs_diff: f64::NAN }
    }
}

/// A deterministic probe and the statistics of the graph's answer to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenCheck {
    pub batch: usize,
    /// Timestep index of each probe frame.
    pub timesteps: Vec<f32>,
    pub output_mean: f64,
    pub output_mean_abs: f64,
    pub output_rms: f64,
    /// First output values, for a pointed message when the check fails.
    pub output_head: Vec<f32>,
    pub tolerance: f64,
}

impl GoldenCheck {
    /// Placeholder for a manifest not exported yet; `train::export::export_bundle` fills it in.
    pub fn pending() -> Self {
        Self::from_output(1, vec![0.0], &[0.0], 0.0)
    }

    /// The probe input: a smooth deterministic pattern in [−0.9, 0.9].
    pub fn probe(batch: usize, input: &InputSpec) -> Vec<f32> {
        (0..batch * input.frame_len()).map(|i| 0.9 * ((i as f32) * 0.37).sin() * ((i as f32) * 0.011).cos()).collect()
    }

    /// Statistics of an output, in the form stored in the manifest.
    pub fn from_output(batch: usize, timesteps: Vec<f32>, output: &[f32], tolerance: f64) -> Self {
        let n = output.len() as f64;
        Self {
            batch,
            timesteps,
            output_mean: output.iter().map(|v| *v as f64).sum::<f64>() / n,
            output_mean_abs: output.iter().map(|v| v.abs() as f64).sum::<f64>() / n,
            output_rms: (output.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n).sqrt(),
            output_head: output.iter().take(8).copied().collect(),
            tolerance,
        }
    }

    /// Compares an observed output with the recorded statistics; `Err` says what differs.
    pub fn verify(&self, output: &[f32]) -> Result<(), String> {
        let got = Self::from_output(self.batch, self.timesteps.clone(), output, self.tolerance);
        let pairs = [
            ("mean", self.output_mean, got.output_mean),
            ("mean |x|", self.output_mean_abs, got.output_mean_abs),
            ("rms", self.output_rms, got.output_rms),
        ];
        // Written so that NaN fails: a NaN difference is not within any tolerance.
        for (what, want, have) in pairs {
            if !((want - have).abs() <= self.tolerance) {
                return Err(format!(
                    "output {what} is {have:.6}, manifest expects {want:.6} (tolerance {})",
                    self.tolerance
                ));
            }
        }
        for (i, (want, have)) in self.output_head.iter().zip(&got.output_head).enumerate() {
            if !((want - have).abs() as f64 <= self.tolerance) {
                return Err(format!(
                    "output[{i}] is {have:.6}, manifest expects {want:.6} (tolerance {})",
                    self.tolerance
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nan_output_fails_the_golden_check() {
        let output: Vec<f32> = (0..32).map(|i| (i as f32 * 0.3).sin()).collect();
        let golden = GoldenCheck::from_output(1, vec![0.0], &output, 1e-3);
        assert!(golden.verify(&output).is_ok());
        let mut broken = output.clone();
        broken[20] = f32::NAN;
        assert!(golden.verify(&broken).is_err(), "NaN in the statistics");
        let mut head = output.clone();
        head[0] = f32::NAN;
        assert!(golden.verify(&head).is_err(), "NaN in the first values");
    }
}
