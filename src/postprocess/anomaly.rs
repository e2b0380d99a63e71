//! From a frame and its reconstruction to a verdict: anomaly map, score, mask, regions.
//!
//! Pure functions, shared by `infer`, `run` and `eval`. Maps are in image-intensity units
//! (the residual of [0, 1] images), so thresholds mean the same for any normalisation.
//! Scores are normalised as anomalib does: `clamp((x − threshold)/(max − min) + 0.5, 0, 1)`,
//! putting the calibrated threshold at exactly 0.5.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Residual {
    /// |x − x̂|
    L1,
    /// (x − x̂)²
    L2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelReduction {
    Mean,
    Max,
}

/// How one image score summarises a map.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum ImageScore {
    Max,
    /// Mean of the highest `fraction` of pixels (at least one).
    TopKMean {
        fraction: f64,
    },
}

/// Anomaly-map settings; stored in the manifest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalySpec {
    pub residual: Residual,
    pub channel_reduction: ChannelReduction,
    /// Gaussian σ in pixels; 0 disables smoothing.
    pub smoothing_sigma: f64,
    pub image_score: ImageScore,
    /// Connected mask regions smaller than this many pixels are not reported.
    pub min_region_area: usize,
}

impl Default for AnomalySpec {
    fn default() -> Self {
        Self {
            residual: Residual::L1,
            channel_reduction: ChannelReduction::Mean,
            smoothing_sigma: 2.0,
            image_score: ImageScore::TopKMean { fraction: 0.01 },
            min_region_area: 4,
        }
    }
}

/// A raw threshold with the spread of calibration scores used for normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub value: f64,
    pub min: f64,
    pub max: f64,
}

impl Threshold {
    /// Normalised score: 0.5 at the threshold.
    pub fn normalise(&self, raw: f64) -> f64 {
        let spread = (self.max - self.min).max(f64::EPSILON);
        ((raw - self.value) / spread + 0.5).clamp(0.0, 1.0)
    }
}

/// A connected defect region in model-input pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Region {
    /// `[x, y, width, height]`.
    pub bbox: [usize; 4],
    pub area: usize,
    /// Highest normalised pixel score inside the region.
    pub max_score: f64,
}

/// Everything post-processing concludes about one frame.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub height: usize,
    pub width: usize,
    /// Raw anomaly map (after smoothing), row-major.
    pub map: Vec<f32>,
    /// Normalised per-pixel scores, 0.5 at the pixel threshold.
    pub normalised_map: Vec<f32>,
    /// 1 where the pixel is anomalous.
    pub mask: Vec<u8>,
    pub score: f64,
    pub normalised_score: f64,
    pub anomalous: bool,
    pub regions: Vec<Region>,
    /// Mean squared reconstruction error in [0, 1] units.
    pub reconstruction_mse: f64,
}

/// Per-pixel residual map of one frame, in [0, 1] intensity units.
/// `clean` and `recon` are `[C, H, W]` in model space [−1, 1].
pub fn residual_map(clean: &[f32], recon: &[f32], channels: usize, spec: &AnomalySpec) -> Vec<f32> {
    assert_eq!(clean.len(), recon.len(), "residual_map: length mismatch");
    let plane = clean.len() / channels;
    let mut map = vec![0.0f32; plane];
    for c in 0..channels {
        for (p, m) in map.iter_mut().enumerate() {
            // Model space spans 2 units per intensity unit.
            let d = (clean[c * plane + p] - recon[c * plane + p]).abs() / 2.0;
            let r = match spec.residual {
                Residual::L1 => d,
                Residual::L2 => d * d,
            };
            *m = match spec.channel_reduction {
                ChannelReduction::Mean => *m + r / channels as f32,
                ChannelReduction::Max => m.max(r),
            };
        }
    }
    map
}

/// Separable Gaussian blur with anomalib's kernel size `2·⌊4σ + 0.5⌋ + 1` and reflected
/// borders. Hand-written: `image`'s blur picks its own kernel size, which would shift
/// scores against the calibration, and a filtering crate for one kernel is not worth it.
pub fn gaussian_blur(map: &[f32], height: usize, width: usize, sigma: f64) -> Vec<f32> {
    if sigma <= 0.0 {
        return map.to_vec();
    }
    let radius = (4.0 * sigma + 0.5) as isize;
    let kernel: Vec<f32> = {
        let raw: Vec<f64> = (-radius..=radius).map(|i| (-(i * i) as f64 / (2.0 * sigma * sigma)).exp()).collect();
        let sum: f64 = raw.iter().sum();
        raw.iter().map(|k| (k / sum) as f32).collect()
    };
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let mut i = i;
        // Reflect until inside (kernels may be wider than tiny maps).
        loop {
            if i < 0 {
                i = -i - 1;
            } else if i >= n {
                i = 2 * n - i - 1;
            } else {
                return i as usize;
            }
        }
    };
    let mut horizontal = vec![0.0f32; map.len()];
    for y in 0..height {
        for x in 0..width {
            horizontal[y * width + x] = kernel
                .iter()
                .enumerate()
                .map(|(j, k)| k * map[y * width + reflect(x as isize + j as isize - radius, width)])
                .sum();
        }
    }
    let mut out = vec![0.0f32; map.len()];
    for y in 0..height {
        for x in 0..width {
            out[y * width + x] = kernel
                .iter()
                .enumerate()
                .map(|(j, k)| k * horizontal[reflect(y as isize + j as isize - radius, height) * width + x])
                .sum();
        }
    }
    out
}

/// The image score of a map under `rule`.
pub fn image_score(map: &[f32], rule: ImageScore) -> f64 {
    match rule {
        ImageScore::Max => map.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64,
        ImageScore::TopKMean { fraction } => {
            let k = ((map.len() as f64 * fraction).ceil() as usize).clamp(1, map.len());
            let mut sorted = map.to_vec();
            let (_, _, _) = sorted.select_nth_unstable_by(map.len() - k, |a, b| a.total_cmp(b));
            sorted[map.len() - k..].iter().map(|v| *v as f64).sum::<f64>() / k as f64
        }
    }
}

/// Labels the 8-connected components of `mask`: `labels[p]` is 0 for background and
/// 1..=count for the component of pixel `p`. Hand-written flood fill: the one image crate
/// that has it (imageproc) brings a large dependency tree for these thirty lines.
pub fn connected_components(mask: &[u8], height: usize, width: usize) -> (Vec<u32>, usize) {
    assert_eq!(mask.len(), height * width, "connected_components: mask is not {height}x{width}");
    let mut labels = vec![0u32; mask.len()];
    let mut count = 0u32;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if mask[start] == 0 || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(p) = stack.pop() {
            let (x, y) = (p % width, p / width);
            for dy in -1isize..=1 {
                for dx in -1isize..=1 {
                    let (nx, ny) = (x as isize + dx, y as isize + dy);
                    if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                        continue;
                    }
                    let q = ny as usize * width + nx as usize;
                    if mask[q] != 0 && labels[q] == 0 {
                        labels[q] = count;
                        stack.push(q);
                    }
                }
            }
        }
    }
    (labels, count as usize)
}

/// Connected mask regions with bounding boxes, areas and peak scores, in label order.
pub fn regions(mask: &[u8], scores: &[f32], height: usize, width: usize, min_area: usize) -> Vec<Region> {
    let (labels, count) = connected_components(mask, height, width);
    // Per component: x0, y0, x1, y1, area, peak.
    let mut stats = vec![(usize::MAX, usize::MAX, 0usize, 0usize, 0usize, 0.0f32); count];
    for (p, &label) in labels.iter().enumerate() {
        if label == 0 {
            continue;
        }
        let (x, y) = (p % width, p / width);
        let s = &mut stats[label as usize - 1];
        *s = (s.0.min(x), s.1.min(y), s.2.max(x), s.3.max(y), s.4 + 1, s.5.max(scores[p]));
    }
    stats
        .into_iter()
        .filter(|s| s.4 >= min_area.max(1))
        .map(|(x0, y0, x1, y1, area, peak)| Region {
            bbox: [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
            area,
            max_score: peak as f64,
        })
        .collect()
}

/// Full post-processing of one frame (`[C, H, W]`, model space).
pub fn analyse(
    clean: &[f32],
    recon: &[f32],
    [channels, height, width]: [usize; 3],
    spec: &AnomalySpec,
    pixel: &Threshold,
    image: &Threshold,
) -> Analysis {
    let raw = residual_map(clean, recon, channels, spec);
    let map = gaussian_blur(&raw, height, width, spec.smoothing_sigma);
    let normalised_map: Vec<f32> = map.iter().map(|v| pixel.normalise(*v as f64) as f32).collect();
    let mask: Vec<u8> = normalised_map.iter().map(|v| u8::from(*v >= 0.5)).collect();
    let score = image_score(&map, spec.image_score);
    let normalised_score = image.normalise(score);
    let regions = regions(&mask, &normalised_map, height, width, spec.min_region_area);
    let reconstruction_mse =
        clean.iter().zip(recon).map(|(a, b)| ((a - b) as f64 / 2.0).powi(2)).sum::<f64>() / clean.len() as f64;
    Analysis {
        height,
        width,
        map,
        normalised_map,
        mask,
        score,
        normalised_score,
        anomalous: normalised_score >= 0.5,
        regions,
        reconstruction_mse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_of_an_image_against_itself_is_zero() {
        let img: Vec<f32> = (0..3 * 8 * 8).map(|i| (i as f32 * 0.1).sin()).collect();
        for residual in [Residual::L1, Residual::L2] {
            let spec = AnomalySpec { residual, ..AnomalySpec::default() };
            let t = Threshold { value: 0.1, min: 0.0, max: 0.2 };
            let a = analyse(&img, &img, [3, 8, 8], &spec, &t, &t);
            assert!(a.map.iter().all(|v| *v == 0.0));
            assert_eq!(a.score, 0.0);
            assert!(!a.anomalous && a.regions.is_empty() && a.mask.iter().all(|m| *m == 0));
        }
    }

    #[test]
    fn residual_is_in_intensity_units() {
        // Model-space −1 vs 1 is black vs white: residual 1.
        let spec = AnomalySpec { smoothing_sigma: 0.0, ..AnomalySpec::default() };
        assert_eq!(residual_map(&[-1.0, 0.0], &[1.0, 0.5], 1, &spec), vec![1.0, 0.25]);
    }

    #[test]
    fn blur_keeps_mass_and_spreads_a_spike() {
        let mut map = vec![0.0f32; 15 * 15];
        map[7 * 15 + 7] = 1.0;
        let out = gaussian_blur(&map, 15, 15, 1.0);
        assert!((out.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // Centre weight of a σ=1, radius-4 kernel squared: (0.39894/Σ)² ≈ 0.159155
        assert!((out[7 * 15 + 7] - 0.159155).abs() < 1e-4, "{}", out[7 * 15 + 7]);
    }

    #[test]
    fn top_k_mean_and_normalisation() {
        let map: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
        assert!((image_score(&map, ImageScore::Max) - 0.99).abs() < 1e-6);
        assert!((image_score(&map, ImageScore::TopKMean { fraction: 0.05 }) - 0.97).abs() < 1e-6);
        let t = Threshold { value: 0.3, min: 0.1, max: 0.5 };
        assert_eq!(t.normalise(0.3), 0.5);
        assert_eq!(t.normalise(0.4), 0.75);
        assert_eq!(t.normalise(10.0), 1.0);
    }

    #[test]
    fn regions_are_eight_connected_with_boxes() {
        #[rustfmt::skip]
        let mask = [
            1, 0, 0, 0, 0,
            0, 1, 0, 0, 1,
            0, 0, 0, 0, 1,
            0, 0, 0, 0, 0,
        ];
        let scores: Vec<f32> = (0..20).map(|i| i as f32 / 20.0).collect();
        let r = regions(&mask, &scores, 4, 5, 1);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].bbox, [0, 0, 2, 2]);
        assert_eq!(r[0].area, 2);
        assert_eq!(r[1].bbox, [4, 1, 1, 2]);
        assert!((r[1].max_score - 0.7).abs() < 1e-6);
        assert_eq!(regions(&mask, &scores, 4, 5, 3).len(), 0);
    }
}
