//! From a frame and its reconstruction to a verdict: anomaly map, score, mask, regions.
//!
//! Pure functions, shared by `infer`, `run` and `eval`. Maps are dissimilarities of [0, 1]
//! images: intensity units for the pixel residuals (`l1`, `l2`), and 1 − similarity for the
//! structural rules (`ssim`, `msgms`), so thresholds mean the same for any normalisation.
//!
//! The structural rules exist because the pixel residual is a weak map on irregular
//! textures: a reconstruction that draws *a* plausible grass blade where the frame has
//! another one differs pixel by pixel, but not in local structure. SSIM (Bergmann et al.,
//! VISAPP 2019) compares local means, variances and covariance; MSGMS (Zavrtanik et al.,
//! RIAD 2021) compares gradient magnitudes at four scales.
//! Scores are normalised as anomalib does: `clamp((x − threshold)/(max − min) + 0.5, 0, 1)`,
//! putting the calibrated threshold at exactly 0.5.

use super::screen::Screen;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Residual {
    /// |x − x̂|
    L1,
    /// (x − x̂)²
    L2,
    /// (1 − SSIM)/2 over a Gaussian window (σ = 1.5 px, the SSIM paper's window).
    Ssim,
    /// 1 − gradient-magnitude similarity, averaged over scales 1, ½, ¼, ⅛ (RIAD's MSGMS).
    Msgms,
    /// The defect probability of the bundle's learned head (DRAEM-style) on the frame and
    /// its reconstruction; computed by `infer::inspect`, which runs the head graph.
    Head,
    /// Per-pixel cosine distance between the UNet encoder's features of the frame and of
    /// its reconstruction (at timestep `feature_t`), averaged over the encoder's levels; a
    /// graph derived from the bundle's own weights computes it (`infer::inspect`).
    Feature,
    /// Mahalanobis distance of the frame's pretrained patch features (EfficientNet-Lite0,
    /// blocks 2 + 4) to a Gaussian of normal patches fitted by `retrain` on the field
    /// frames; the bundle's `patch.onnx` computes it (`model::patch`, `infer::inspect`).
    Patch,
}

impl Residual {
    pub fn name(self) -> &'static str {
        match self {
            Self::L1 => "l1",
            Self::L2 => "l2",
            Self::Ssim => "ssim",
            Self::Msgms => "msgms",
            Self::Head => "head",
            Self::Feature => "feature",
            Self::Patch => "patch",
        }
    }
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
    /// Mean of the highest `fraction` × (model input area) pixels (at least one): on a
    /// tiled frame the count stays that of one tile, so a defect scores the same in a
    /// 64×64 frame and in a megapixel one, and the calibrated threshold keeps its meaning.
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
    /// The timestep at which the encoder sees frame and reconstruction for
    /// [`Residual::Feature`].
    #[serde(default)]
    pub feature_t: usize,
    /// The normal-patch model's map fused into this rule's map (absent: the rule alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<Fusion>,
    /// The cascade's screen on the patch map (needs a fusion): tiles it declares clean skip
    /// the reconstruction and the rule's graph (absent: every tile is reconstructed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screen: Option<Screen>,
}

/// Two maps made one: the rule's map and the normal-patch model's, each standardised by
/// its mean and standard deviation over normal frames (so neither dominates by its units),
/// then weighted: `(1 − w)·(r − μ_r)/σ_r + w·(p − μ_p)/σ_p` (at `w` = 0 the patch map is
/// not computed; the statistics are kept so `eval --fusion-weight` can try others). The reconstruction and the
/// pretrained features fail on different defects (`docs/results.md`); the sum keeps what
/// each finds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fusion {
    /// `w`, the patch map's weight in [0, 1].
    pub patch_weight: f64,
    /// The rule's map over normal frames: `[mean, standard deviation]`.
    pub rule: [f64; 2],
    /// The patch map over normal frames: `[mean, standard deviation]`.
    pub patch: [f64; 2],
}

impl Fusion {
    /// Standardisation statistics of the two maps on normal frames, weighted by `patch_weight`.
    pub fn from_normal_maps(patch_weight: f64, rule_maps: &[Vec<f32>], patch_maps: &[Vec<f32>]) -> Self {
        Self { patch_weight, rule: mean_sd(rule_maps), patch: mean_sd(patch_maps) }
    }

    /// Replaces `rule_map` with the fused map.
    pub fn fuse(&self, rule_map: &mut [f32], patch_map: &[f32]) {
        let w = self.patch_weight;
        let (rule_scale, patch_scale) = ((1.0 - w) / self.rule[1], w / self.patch[1]);
        for (r, p) in rule_map.iter_mut().zip(patch_map) {
            *r = ((*r as f64 - self.rule[0]) * rule_scale + (*p as f64 - self.patch[0]) * patch_scale) as f32;
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.patch_weight) {
            return Err(format!("anomaly.fusion.patch_weight must be in [0, 1], got {}", self.patch_weight));
        }
        let finite = self.rule.iter().chain(&self.patch).all(|v| v.is_finite());
        if !finite || self.rule[1] <= 0.0 || self.patch[1] <= 0.0 {
            return Err(format!(
                "anomaly.fusion needs finite means and positive standard deviations, got rule {:?}, patch {:?}",
                self.rule, self.patch
            ));
        }
        Ok(())
    }
}

/// `[mean, standard deviation]` of every value of `maps` (the deviation at least 1e-9).
pub fn mean_sd(maps: &[Vec<f32>]) -> [f64; 2] {
    let n = maps.iter().map(Vec::len).sum::<usize>().max(1) as f64;
    let mean = maps.iter().flatten().map(|&v| v as f64).sum::<f64>() / n;
    let var = maps.iter().flatten().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    [mean, var.sqrt().max(1e-9)]
}

impl Default for AnomalySpec {
    fn default() -> Self {
        Self {
            residual: Residual::L1,
            channel_reduction: ChannelReduction::Mean,
            smoothing_sigma: 2.0,
            image_score: ImageScore::TopKMean { fraction: 0.01 },
            min_region_area: 4,
            feature_t: 0,
            fusion: None,
            screen: None,
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

    /// The threshold an operator's sensitivity makes of this calibrated one: the value
    /// divided by `sensitivity` (2 = half the threshold, more alerts), the spread kept, so
    /// a normalised score is 0.5 at the threshold actually applied. The one rule for pixel
    /// and image thresholds alike, so mask, regions and verdict agree at any sensitivity.
    pub fn at_sensitivity(&self, sensitivity: f64) -> Threshold {
        assert!(sensitivity > 0.0, "sensitivity {sensitivity} is not positive");
        Threshold { value: self.value / sensitivity, ..*self }
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
    /// The raw image threshold the verdict applied (the calibrated one at the frame's
    /// sensitivity).
    pub image_threshold: f64,
    /// `normalised_score >= 0.5`, i.e. `score >= image_threshold`.
    pub anomalous: bool,
    pub regions: Vec<Region>,
    /// Mean squared reconstruction error in [0, 1] units.
    pub reconstruction_mse: f64,
}

/// Per-pixel dissimilarity map of one frame under `spec.residual`.
/// `clean` and `recon` are `[C, H, W]` in model space [−1, 1]; channels are reduced by
/// `spec.channel_reduction`.
pub fn residual_map(
    clean: &[f32],
    recon: &[f32],
    [channels, height, width]: [usize; 3],
    spec: &AnomalySpec,
) -> Vec<f32> {
    assert_eq!(clean.len(), recon.len(), "residual_map: length mismatch");
    let plane = height * width;
    assert_eq!(clean.len(), channels * plane, "residual_map: not {channels}x{height}x{width}");
    let mut map = vec![0.0f32; plane];
    for c in 0..channels {
        // Model space spans 2 units per intensity unit.
        let x: Vec<f32> = clean[c * plane..(c + 1) * plane].iter().map(|v| (v + 1.0) / 2.0).collect();
        let y: Vec<f32> = recon[c * plane..(c + 1) * plane].iter().map(|v| (v + 1.0) / 2.0).collect();
        let channel_map = match spec.residual {
            Residual::L1 => x.iter().zip(&y).map(|(a, b)| (a - b).abs()).collect(),
            Residual::L2 => x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).collect(),
            Residual::Ssim => ssim_dissimilarity(&x, &y, height, width),
            Residual::Msgms => msgms_dissimilarity(&x, &y, height, width),
            Residual::Head | Residual::Feature | Residual::Patch => {
                panic!("residual_map: the {} map comes from its graph (infer::inspect)", spec.residual.name())
            }
        };
        for (m, r) in map.iter_mut().zip(channel_map) {
            *m = match spec.channel_reduction {
                ChannelReduction::Mean => *m + r / channels as f32,
                ChannelReduction::Max => m.max(r),
            };
        }
    }
    map
}

/// `(1 − SSIM)/2` per pixel of two [0, 1] planes, with the SSIM paper's constants
/// (K1 = 0.01, K2 = 0.03, L = 1) and Gaussian window (σ = 1.5).
fn ssim_dissimilarity(x: &[f32], y: &[f32], height: usize, width: usize) -> Vec<f32> {
    const SIGMA: f64 = 1.5;
    const C1: f32 = 0.01 * 0.01;
    const C2: f32 = 0.03 * 0.03;
    let local_mean = |v: &[f32]| gaussian_blur(v, height, width, SIGMA);
    let product = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).collect::<Vec<f32>>();
    let (mean_x, mean_y) = (local_mean(x), local_mean(y));
    let (mean_xx, mean_yy, mean_xy) =
        (local_mean(&product(x, x)), local_mean(&product(y, y)), local_mean(&product(x, y)));
    (0..x.len())
        .map(|p| {
            let (mx, my) = (mean_x[p], mean_y[p]);
            let var_x = (mean_xx[p] - mx * mx).max(0.0);
            let var_y = (mean_yy[p] - my * my).max(0.0);
            let cov = mean_xy[p] - mx * my;
            let ssim = ((2.0 * mx * my + C1) * (2.0 * cov + C2)) / ((mx * mx + my * my + C1) * (var_x + var_y + C2));
            ((1.0 - ssim) / 2.0).clamp(0.0, 1.0)
        })
        .collect()
}

/// RIAD's multi-scale gradient-magnitude dissimilarity of two [0, 1] planes: at scales 1,
/// ½, ¼ and ⅛ (2×2 average pooling), `1 − (2·g_x·g_y + c)/(g_x² + g_y² + c)` with Prewitt
/// gradient magnitudes and c = 0.0026, brought back to full size (nearest neighbour) and
/// averaged. Scales whose plane would be smaller than 4×4 are skipped.
fn msgms_dissimilarity(x: &[f32], y: &[f32], height: usize, width: usize) -> Vec<f32> {
    const C: f32 = 0.0026;
    let mut out = vec![0.0f32; x.len()];
    let (mut x, mut y, mut h, mut w) = (x.to_vec(), y.to_vec(), height, width);
    let mut scales = 0usize;
    for level in 0..4 {
        if level > 0 {
            if h / 2 < 4 || w / 2 < 4 {
                break;
            }
            (x, y) = (average_pool(&x, h, w), average_pool(&y, h, w));
            (h, w) = (h / 2, w / 2);
        }
        let (gx, gy) = (gradient_magnitude(&x, h, w), gradient_magnitude(&y, h, w));
        let factor = 1usize << level;
        for row in 0..height {
            let source_row = (row / factor).min(h - 1);
            for col in 0..width {
                let q = source_row * w + (col / factor).min(w - 1);
                let similarity = (2.0 * gx[q] * gy[q] + C) / (gx[q] * gx[q] + gy[q] * gy[q] + C);
                out[row * width + col] += 1.0 - similarity;
            }
        }
        scales += 1;
    }
    out.iter_mut().for_each(|v| *v /= scales as f32);
    out
}

/// 2×2 average pooling (odd trailing rows/columns dropped).
fn average_pool(plane: &[f32], height: usize, width: usize) -> Vec<f32> {
    let (h, w) = (height / 2, width / 2);
    let mut out = Vec::with_capacity(h * w);
    for row in 0..h {
        for col in 0..w {
            let at = |r: usize, c: usize| plane[(2 * row + r) * width + 2 * col + c];
            out.push((at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) / 4.0);
        }
    }
    out
}

/// Prewitt gradient magnitude with replicated borders.
fn gradient_magnitude(plane: &[f32], height: usize, width: usize) -> Vec<f32> {
    let at = |r: isize, c: isize| {
        plane[r.clamp(0, height as isize - 1) as usize * width + c.clamp(0, width as isize - 1) as usize]
    };
    let mut out = Vec::with_capacity(plane.len());
    for r in 0..height as isize {
        for c in 0..width as isize {
            let gx = (at(r - 1, c + 1) + at(r, c + 1) + at(r + 1, c + 1)
                - at(r - 1, c - 1)
                - at(r, c - 1)
                - at(r + 1, c - 1))
                / 3.0;
            let gy = (at(r + 1, c - 1) + at(r + 1, c) + at(r + 1, c + 1)
                - at(r - 1, c - 1)
                - at(r - 1, c)
                - at(r - 1, c + 1))
                / 3.0;
            out.push((gx * gx + gy * gy).sqrt());
        }
    }
    out
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

/// The image score of a map under `rule`; `tile_area` is the model input's pixel count.
pub fn image_score(map: &[f32], rule: ImageScore, tile_area: usize) -> f64 {
    match rule {
        ImageScore::Max => map.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64,
        ImageScore::TopKMean { fraction } => {
            let k = ((tile_area as f64 * fraction).ceil() as usize).clamp(1, map.len());
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
    let raw = residual_map(clean, recon, [channels, height, width], spec);
    verdict(raw, reconstruction_mse(clean, recon), [height, width], height * width, spec, pixel, image)
}

/// Mean squared difference of two model-space tensors, in [0, 1] intensity units.
pub fn reconstruction_mse(clean: &[f32], recon: &[f32]) -> f64 {
    clean.iter().zip(recon).map(|(a, b)| ((a - b) as f64 / 2.0).powi(2)).sum::<f64>() / clean.len() as f64
}

/// From a raw (unsmoothed) dissimilarity map — one reconstruction's, or an ensemble's
/// average, or tiles stitched — to the verdict: smoothing, normalisation, mask, image
/// score, regions. `tile_area` is the model input's pixel count (see [`ImageScore`]).
#[allow(clippy::too_many_arguments)]
pub fn verdict(
    raw: Vec<f32>,
    reconstruction_mse: f64,
    [height, width]: [usize; 2],
    tile_area: usize,
    spec: &AnomalySpec,
    pixel: &Threshold,
    image: &Threshold,
) -> Analysis {
    let map = gaussian_blur(&raw, height, width, spec.smoothing_sigma);
    let normalised_map: Vec<f32> = map.iter().map(|v| pixel.normalise(*v as f64) as f32).collect();
    let mask: Vec<u8> = normalised_map.iter().map(|v| u8::from(*v >= 0.5)).collect();
    let score = image_score(&map, spec.image_score, tile_area);
    let normalised_score = image.normalise(score);
    let regions = regions(&mask, &normalised_map, height, width, spec.min_region_area);
    Analysis {
        height,
        width,
        map,
        normalised_map,
        mask,
        score,
        normalised_score,
        image_threshold: image.value,
        anomalous: normalised_score >= 0.5,
        regions,
        reconstruction_mse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_standardises_each_map_before_weighting() {
        // The rule's map in tiny units, the patch map in large ones: after fusion a pixel
        // two deviations up in either map counts the same at equal weight.
        let rule_normal = vec![vec![0.01, 0.03, 0.01, 0.03]];
        let patch_normal = vec![vec![10.0, 30.0, 10.0, 30.0]];
        let fusion = Fusion::from_normal_maps(0.5, &rule_normal, &patch_normal);
        assert!((fusion.rule[0] - 0.02).abs() < 1e-6 && (fusion.patch[0] - 20.0).abs() < 1e-6, "{fusion:?}");
        let mut rule = vec![0.04, 0.02];
        fusion.fuse(&mut rule, &[20.0, 40.0]);
        assert!((rule[0] - rule[1]).abs() < 1e-4, "{rule:?}");
        assert!((rule[0] - 1.0).abs() < 1e-3, "two deviations × ½ = 1, got {rule:?}");
        assert!(Fusion { patch_weight: 1.5, ..fusion }.validate().is_err());
        assert!(Fusion { rule: [0.0, 0.0], ..fusion }.validate().is_err());
        assert!(fusion.validate().is_ok());
    }

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
        assert_eq!(residual_map(&[-1.0, 0.0], &[1.0, 0.5], [1, 1, 2], &spec), vec![1.0, 0.25]);
    }

    fn textured(height: usize, width: usize) -> Vec<f32> {
        (0..height * width).map(|i| 0.6 * ((i % width) as f32 * 0.9).sin() * ((i / width) as f32 * 0.7).cos()).collect()
    }

    #[test]
    fn structural_rules_are_zero_on_identity_and_peak_on_a_structural_change() {
        let (h, w) = (32, 32);
        let clean = textured(h, w);
        let mut recon = clean.clone();
        // A flat 6×6 patch wipes out the texture's structure there.
        for r in 12..18 {
            for c in 20..26 {
                recon[r * w + c] = 0.0;
            }
        }
        for residual in [Residual::Ssim, Residual::Msgms] {
            let spec = AnomalySpec { residual, smoothing_sigma: 0.0, ..AnomalySpec::default() };
            let same = residual_map(&clean, &clean, [1, h, w], &spec);
            assert!(same.iter().all(|v| v.abs() < 1e-4), "{residual:?} of identical planes");
            let map = residual_map(&clean, &recon, [1, h, w], &spec);
            assert!(map.iter().all(|v| (0.0..=1.0).contains(v)), "{residual:?} out of range");
            let peak = (0..map.len()).max_by(|a, b| map[*a].total_cmp(&map[*b])).unwrap();
            let (row, col) = (peak / w, peak % w);
            assert!((10..20).contains(&row) && (18..28).contains(&col), "{residual:?} peaks at ({row}, {col})");
            let far = map[2 * w + 2];
            assert!(map[peak] > 10.0 * far.max(1e-4), "{residual:?}: peak {} vs far {far}", map[peak]);
        }
    }

    #[test]
    fn ssim_ignores_a_brightness_preserving_structure_copy_less_than_l1() {
        // A reconstruction shifted by a constant: L1 flags every pixel, SSIM's structure
        // term does not (only its luminance term reacts, weakly).
        let (h, w) = (16, 16);
        let clean = textured(h, w);
        let recon: Vec<f32> = clean.iter().map(|v| v + 0.1).collect();
        let l1 =
            residual_map(&clean, &recon, [1, h, w], &AnomalySpec { residual: Residual::L1, ..AnomalySpec::default() });
        let ssim = residual_map(
            &clean,
            &recon,
            [1, h, w],
            &AnomalySpec { residual: Residual::Ssim, ..AnomalySpec::default() },
        );
        let mean = |m: &[f32]| m.iter().sum::<f32>() / m.len() as f32;
        assert!(mean(&ssim) < 0.2 * mean(&l1), "ssim {} vs l1 {}", mean(&ssim), mean(&l1));
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
        assert!((image_score(&map, ImageScore::Max, 100) - 0.99).abs() < 1e-6);
        assert!((image_score(&map, ImageScore::TopKMean { fraction: 0.05 }, 100) - 0.97).abs() < 1e-6);
        // On a frame of four tiles the top-k count is still one tile's.
        let frame: Vec<f32> = (0..400).map(|i| if i < 5 { 1.0 } else { 0.0 }).collect();
        assert_eq!(image_score(&frame, ImageScore::TopKMean { fraction: 0.05 }, 100), 1.0);
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
