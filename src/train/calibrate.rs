//! Label-free threshold calibration on held-out training frames.
//!
//! The frames are as contaminated as the training set, so the rule is robust by
//! construction: reconstruct every held-out frame exactly as the daemon would (the same
//! [`Ensemble`] as `Inspector`), rank the
//! frames by image score, drop the top `trim` fraction (the likely defects), then take the
//! pixel threshold as a high quantile of the remaining pixels' scores and the image
//! threshold as a quantile (default: the maximum) of the remaining image scores. The
//! spread used for normalisation is the min…max of those remaining values.
//!
//! A tiled model is calibrated on the held-out frames' tiles, but the daemon scores whole
//! frames: the image score of a frame is the rule's score over all its tiles' maps (the
//! top-k mean over the union is the frame's top-k mean; the max, its max), never a single
//! tile's — a threshold taken over tile scores would sit inside the spread of one frame's
//! tiles, and a frame of many tiles would almost always alert.

use serde::{Deserialize, Serialize};

use crate::infer::ensemble::{Ensemble, MapGraphs};
use crate::infer::runtime::{Denoiser, RuntimeError};
use crate::model::manifest::{Calibration, Manifest, Thresholds};
use crate::postprocess::anomaly::{ImageScore, Threshold, image_score, verdict};

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

/// Each frame's image score under `rule` over the maps of its tiles (`groups[i]` tiles of
/// `tile_maps` in order make frame `i`), with the maps of all its tiles.
fn frame_scores(
    tile_maps: Vec<Vec<f32>>,
    groups: &[usize],
    rule: ImageScore,
    tile_area: usize,
) -> Vec<(f64, Vec<f32>)> {
    assert_eq!(groups.iter().sum::<usize>(), tile_maps.len(), "the groups cover every tile once");
    let mut tiles = tile_maps.into_iter();
    groups
        .iter()
        .map(|&count| {
            let map: Vec<f32> = tiles.by_ref().take(count).flatten().collect();
            (image_score(&map, rule, tile_area), map)
        })
        .collect()
}

/// How many of `n` frames, sorted by score, calibration keeps: the top `trim` fraction is
/// dropped, rounded *up* — a held-out set as contaminated as the training frames holds about
/// `trim · n` defective frames, and rounding down kept the one defect of a small set as the
/// image threshold — but one frame is always kept.
fn kept_count(n: usize, trim: f64) -> usize {
    let dropped = (n as f64 * trim - 1e-9).ceil().max(0.0) as usize;
    n - dropped.min(n.saturating_sub(1))
}

/// Which of the frames with these image `scores` the trim drops: the highest-scoring ones,
/// [`kept_count`] left.
fn trimmed(scores: &[f64], trim: f64) -> Vec<bool> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut dropped = vec![false; scores.len()];
    for &i in &order[kept_count(scores.len(), trim)..] {
        dropped[i] = true;
    }
    dropped
}

/// One held-out frame's image score and whether the trim dropped it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOutScore {
    pub image_score: f64,
    pub trimmed: bool,
}

/// Computes thresholds for `manifest` from `frames` (`[C, H, W]` each, model space): the
/// tiles of the held-out frames, `groups[i]` consecutive ones making frame `i` (one each
/// for a model that sees whole frames). Also returns each frame's score, in `groups`'
/// order, so the report can say which frames were trimmed and which set the threshold.
#[allow(clippy::too_many_arguments)] // the model, its graphs and the frames, all needed
pub fn calibrate(
    denoiser: &mut dyn Denoiser,
    graphs: &mut MapGraphs<'_>,
    ensemble: &mut Ensemble,
    manifest: &Manifest,
    frames: &[Vec<f32>],
    groups: &[usize],
    rule: &CalibrationRule,
    seed: u64,
) -> Result<(Thresholds, Vec<HeldOutScore>), RuntimeError> {
    assert!(!frames.is_empty(), "calibration needs at least one frame");
    let input = manifest.input;
    let neutral = Threshold { value: 0.0, min: 0.0, max: 1.0 };
    let size = [input.height, input.width];
    let shape = [input.channels, input.height, input.width];
    let tile_maps: Vec<Vec<f32>> = ensemble
        .raw_maps_of(denoiser, graphs, frames, shape, seed, &manifest.anomaly)?
        .into_iter()
        .map(|(raw, mse)| verdict(raw, mse, size, size[0] * size[1], &manifest.anomaly, &neutral, &neutral).map)
        .collect();
    let per_frame = frame_scores(tile_maps, groups, manifest.anomaly.image_score, size[0] * size[1]);
    let scores: Vec<f64> = per_frame.iter().map(|(s, _)| *s).collect();
    let dropped = trimmed(&scores, rule.trim);
    let kept: Vec<&(f64, Vec<f32>)> = per_frame.iter().zip(&dropped).filter(|(_, d)| !**d).map(|(f, _)| f).collect();
    let held_out =
        scores.iter().zip(&dropped).map(|(&image_score, &trimmed)| HeldOutScore { image_score, trimmed }).collect();

    let mut image_scores: Vec<f64> = kept.iter().map(|(s, _)| *s).collect();
    image_scores.sort_by(f64::total_cmp);
    let mut pixels: Vec<f64> = kept.iter().flat_map(|(_, m)| m.iter().map(|v| *v as f64)).collect();
    pixels.sort_by(f64::total_cmp);
    let table = |sorted: &[f64]| REPORTED_QUANTILES.iter().map(|q| [*q, quantile(sorted, *q)]).collect();
    let thresholds = Thresholds {
        pixel: threshold_from(&pixels, rule.pixel_quantile),
        image: threshold_from(&image_scores, rule.image_quantile),
        calibration: Calibration {
            rule: rule.describe(),
            frames: kept.len(),
            pixel_quantiles: table(&pixels),
            image_quantiles: table(&image_scores),
        },
    };
    Ok((thresholds, held_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_of_tiles_is_scored_over_all_its_tiles_like_the_daemon_scores_it() {
        // Two frames of three 4-pixel tiles and one whole frame; one hot tile in the first.
        let tile = |v: f32| vec![v; 4];
        let maps = vec![tile(0.1), tile(0.9), tile(0.2), tile(0.3), tile(0.3), tile(0.3), tile(0.5)];
        let top = ImageScore::TopKMean { fraction: 0.5 };
        let scores = frame_scores(maps.clone(), &[3, 3, 1], top, 4);
        let got: Vec<f64> = scores.iter().map(|(s, _)| (*s * 100.0).round() / 100.0).collect();
        assert_eq!(got, [0.9, 0.3, 0.5], "a frame scores as its hottest pixels, wherever the tile");
        assert_eq!(scores[0].1.len(), 12, "a frame's map holds all its tiles' pixels");
        let max = frame_scores(maps, &[1; 7], ImageScore::Max, 4);
        assert_eq!(max.len(), 7, "one tile per frame: tile scores, as before");
    }

    #[test]
    fn the_trimmed_fraction_is_rounded_up_and_one_frame_is_always_kept() {
        assert_eq!(kept_count(6, 0.1), 5, "six held-out frames at 10 % contamination: the top one goes");
        assert_eq!(kept_count(10, 0.1), 9);
        assert_eq!(kept_count(20, 0.1), 18);
        assert_eq!(kept_count(8, 0.0), 8, "no trim");
        assert_eq!(kept_count(1, 0.1), 1, "one frame stays");
        assert_eq!(kept_count(3, 1.0), 1);
    }

    #[test]
    fn the_highest_scoring_frames_are_the_ones_trimmed_wherever_they_are() {
        let scores = [3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 4.0, 5.0, 6.0, 0.5, 0.4, 0.3];
        let dropped = trimmed(&scores, 0.2);
        let which: Vec<f64> = scores.iter().zip(&dropped).filter(|(_, d)| **d).map(|(s, _)| *s).collect();
        assert_eq!(which, [9.0, 7.0, 8.0], "12 frames at 0.2: the top 3 go, in the frames' own order");
        assert_eq!(trimmed(&[2.0], 0.5), [false], "one frame is kept");
    }

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
