//! Label-free threshold calibration on held-out training frames.
//!
//! The frames are as contaminated as the training set, so the rule is robust by
//! construction: reconstruct every held-out frame exactly as the daemon would (the same
//! [`Ensemble`] as `Inspector`), rank the
//! frames by image score, drop the top `trim` fraction (the likely defects), then take the
//! pixel threshold as a high quantile of the remaining pixels' scores and the image
//! threshold as a quantile (default: the maximum) of the remaining image scores. The
//! spread used for normalisation is the min…max of those remaining values.

use serde::{Deserialize, Serialize};

use crate::infer::ensemble::{Ensemble, MapGraphs};
use crate::infer::runtime::{Denoiser, RuntimeError};
use crate::model::manifest::{Calibration, Manifest, Thresholds};
use crate::postprocess::anomaly::{Threshold, verdict};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRule {
    /// Fraction of the highest-scoring held-out frames dropped before the quantiles.
    pub trim: f64,
    pub pixel_quantile: f64,
    pub image_quantile: f64,
}

impl Default for CalibrationRule {
    fn default() -> Self {
        Self { trim: 0.1, pixel_quantile: 0.999, image_quantile: 1.0 }
    }
}

impl CalibrationRule {
    pub fn describe(&self) -> String {
        format!(
            "held-out training frames, top {:.0}% by image score trimmed; pixel threshold = quantile {} of remaining pixel scores, image threshold = quantile {} of remaining image scores; normalisation spread = min..max of the remaining values",
            self.trim * 100.0,
            self.pixel_quantile,
            self.image_quantile
        )
    }
}

/// Linear-interpolated quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn threshold_from(sorted: &[f64], q: f64) -> Threshold {
    let value = quantile(sorted, q);
    let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
    // A degenerate spread (one frame, flat maps) would make normalisation a step function.
    let (min, max) = if max - min > 1e-9 { (min, max) } else { (0.0, (2.0 * value).max(1e-6)) };
    Threshold { value, min, max }
}

const REPORTED_QUANTILES: [f64; 6] = [0.5, 0.9, 0.99, 0.999, 0.9999, 1.0];

/// Computes thresholds for `manifest` from `frames` (`[C, H, W]` each, model space).
pub fn calibrate(
    denoiser: &mut dyn Denoiser,
    graphs: &mut MapGraphs<'_>,
    ensemble: &mut Ensemble,
    manifest: &Manifest,
    frames: &[Vec<f32>],
    rule: &CalibrationRule,
    seed: u64,
) -> Result<Thresholds, RuntimeError> {
    assert!(!frames.is_empty(), "calibration needs at least one frame");
    let input = manifest.input;
    let neutral = Threshold { value: 0.0, min: 0.0, max: 1.0 };
    let size = [input.height, input.width];
    let shape = [input.channels, input.height, input.width];
    let mut per_frame: Vec<(f64, Vec<f32>)> = ensemble
        .raw_maps_of(denoiser, graphs, frames, shape, seed, &manifest.anomaly)?
        .into_iter()
        .map(|(raw, mse)| {
            let a = verdict(raw, mse, size, size[0] * size[1], &manifest.anomaly, &neutral, &neutral);
            (a.score, a.map)
        })
        .collect();
    per_frame.sort_by(|a, b| a.0.total_cmp(&b.0));
    let dropped = (per_frame.len() as f64 * rule.trim).floor() as usize;
    let kept = &per_frame[..per_frame.len() - dropped.min(per_frame.len() - 1)];

    let mut image_scores: Vec<f64> = kept.iter().map(|(s, _)| *s).collect();
    image_scores.sort_by(f64::total_cmp);
    let mut pixels: Vec<f64> = kept.iter().flat_map(|(_, m)| m.iter().map(|v| *v as f64)).collect();
    pixels.sort_by(f64::total_cmp);
    let table = |sorted: &[f64]| REPORTED_QUANTILES.iter().map(|q| [*q, quantile(sorted, *q)]).collect();
    Ok(Thresholds {
        pixel: threshold_from(&pixels, rule.pixel_quantile),
        image: threshold_from(&image_scores, rule.image_quantile),
        calibration: Calibration {
            rule: rule.describe(),
            frames: kept.len(),
            pixel_quantiles: table(&pixels),
            image_quantiles: table(&image_scores),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 2.0);
        assert_eq!(quantile(&v, 0.625), 2.5);
        assert_eq!(quantile(&v, 1.0), 4.0);
        let t = threshold_from(&[0.3], 1.0);
        assert_eq!((t.value, t.min, t.max), (0.3, 0.0, 0.6));
    }
}
