//! The synthetic defect families `retrain` pastes on its own frames — to train the head and
//! to score the operating-point candidates — and the folds that keep the scoring honest.
//!
//! Field frames carry no labels, so every choice `retrain` makes is scored on defects it
//! paints itself. A criterion that scores the same shapes the head learnt rewards whatever
//! learnt those shapes best, not what finds defects nobody drew (issue 21: the search's own
//! figures were 0.70–0.88 AUPRC for models at 0.66–0.78 AUROC on unseen shapes). So the
//! families are many and unlike each other, grouped into [`FOLDS`] of related families, and
//! a learnt candidate is scored only on the fold it never trained on (leave one family
//! group out); the criterion is the mean over folds.
//!
//! The families, each drawn on a frame's grey level with an exact mask:
//! - painted shapes from the benchmark generator: short scratches, holes, stains;
//! - **lines**: one to three long, thin, gently curved lines of either polarity;
//! - **shift**: a low-frequency brightness change of either sign inside a Perlin-noise
//!   mask (DRAEM's mask generator);
//! - **transplant**: another frame's texture turned, flipped and rescaled in a blob;
//! - **patch**: another frame's texture stretched and rotated at any angle inside a Perlin
//!   mask, matched to the surface's mean and contrast there, so only its structure differs.
//!
//! Cracks, foreign photographs, wear and dents — the benchmark's test-only families — are
//! drawn by none of them.

use image::{GrayImage, Luma};
use noise::{NoiseFn, Perlin};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::eval::synth::{DefectKind, paste_defect, paste_transplant, sample, segment_distance};

/// One family of synthetic training defects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Scratch,
    Hole,
    Stain,
    Lines,
    Shift,
    Transplant,
    Patch,
}

/// Groups of related families. A learnt candidate trained without fold `k`'s families is
/// scored on them: thin lines, area intensity changes, texture that does not belong.
pub const FOLDS: [&[Family]; 3] = [
    &[Family::Scratch, Family::Lines],
    &[Family::Hole, Family::Stain, Family::Shift],
    &[Family::Transplant, Family::Patch],
];

impl Family {
    pub const ALL: [Family; 7] =
        [Self::Scratch, Self::Hole, Self::Stain, Self::Lines, Self::Shift, Self::Transplant, Self::Patch];

    pub fn name(self) -> &'static str {
        match self {
            Self::Scratch => "scratch",
            Self::Hole => "hole",
            Self::Stain => "stain",
            Self::Lines => "lines",
            Self::Shift => "shift",
            Self::Transplant => "transplant",
            Self::Patch => "patch",
        }
    }

    /// Paints one defect of this family on `img`; `donor` is another frame of the same
    /// surface (texture for transplants and patches). Returns the exact mask (0/255).
    pub fn paste(self, img: &mut GrayImage, donor: &GrayImage, rng: &mut ChaCha8Rng) -> GrayImage {
        match self {
            Self::Scratch => paste_defect(img, DefectKind::Scratch, rng),
            Self::Hole => paste_defect(img, DefectKind::Hole, rng),
            Self::Stain => paste_defect(img, DefectKind::Stain, rng),
            Self::Transplant => paste_transplant(img, donor, rng),
            Self::Lines => paste_lines(img, rng),
            Self::Shift => paste_shift(img, rng),
            Self::Patch => paste_patch(img, donor, rng),
        }
    }
}

/// Every family outside fold `k`: what a learnt candidate scored on fold `k` trains on.
pub fn outside_fold(k: usize) -> Vec<Family> {
    Family::ALL.into_iter().filter(|f| !FOLDS[k].contains(f)).collect()
}

/// Names of `families`, for logs and manifests.
pub fn names(families: &[Family]) -> Vec<String> {
    families.iter().map(|f| f.name().to_string()).collect()
}

/// A Perlin-noise mask covering a random 3–12 % of `img`, at 2–4 noise cycles per side:
/// the noise field thresholded at the quantile that leaves that fraction inside (a few
/// irregular blobs). Returns the mask and, per pixel, how far above the threshold the
/// field is, scaled to [0, 1] inside (0 outside).
fn perlin_mask(width: u32, height: u32, rng: &mut ChaCha8Rng) -> (Vec<bool>, Vec<f64>) {
    let perlin = Perlin::new(rng.random());
    let cycles = rng.random_range(2.0..4.0);
    let (ox, oy) = (rng.random_range(0.0..64.0), rng.random_range(0.0..64.0));
    let side = width.max(height) as f64;
    let field: Vec<f64> = (0..height)
        .flat_map(|y| (0..width).map(move |x| (x, y)))
        .map(|(x, y)| perlin.get([ox + x as f64 * cycles / side, oy + y as f64 * cycles / side]))
        .collect();
    let mut sorted = field.clone();
    sorted.sort_by(f64::total_cmp);
    let fraction = rng.random_range(0.03..0.12);
    let cut = ((1.0 - fraction) * (sorted.len() - 1) as f64) as usize;
    let (threshold, top) = (sorted[cut], sorted[sorted.len() - 1]);
    let mask: Vec<bool> = field.iter().map(|v| *v > threshold).collect();
    let depth = field.iter().map(|v| if *v > threshold { (v - threshold) / (top - threshold).max(1e-9) } else { 0.0 });
    (mask, depth.collect())
}

/// Writes `value(x, y, old)` into every masked pixel of `img`; returns the mask (0/255).
fn apply(img: &mut GrayImage, mask: &[bool], mut value: impl FnMut(u32, u32, f64) -> f64) -> GrayImage {
    let width = img.width();
    let mut out = GrayImage::new(width, img.height());
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let (x, y) = (i as u32 % width, i as u32 / width);
        let old = img.get_pixel(x, y).0[0] as f64;
        img.put_pixel(x, y, Luma([value(x, y, old).round().clamp(0.0, 255.0) as u8]));
        out.put_pixel(x, y, Luma([255]));
    }
    out
}

/// One to three thin (1–1.5 px) quadratic curves across 40–90 % of the frame, all of one
/// polarity, 12–45 % of full scale: hairline cracks, fibres, seams.
fn paste_lines(img: &mut GrayImage, rng: &mut ChaCha8Rng) -> GrayImage {
    let (width, height) = img.dimensions();
    let extent = width.min(height) as f64;
    let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
    let strength = rng.random_range(0.12..0.45) * 255.0 * sign;
    let thickness = if rng.random_bool(0.5) { 1.0 } else { 1.5 };
    let mut segments = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let centre = (rng.random_range(0.25..0.75) * width as f64, rng.random_range(0.25..0.75) * height as f64);
        let angle = rng.random_range(0.0..std::f64::consts::PI);
        let length = rng.random_range(0.4..0.9) * extent;
        let (dx, dy) = (angle.cos() * length / 2.0, angle.sin() * length / 2.0);
        let (start, end) = ((centre.0 - dx, centre.1 - dy), (centre.0 + dx, centre.1 + dy));
        let bend = rng.random_range(-0.25..0.25) * length;
        let control = ((start.0 + end.0) / 2.0 - angle.sin() * bend, (start.1 + end.1) / 2.0 + angle.cos() * bend);
        let point = |t: f64| {
            let u = 1.0 - t;
            (
                u * u * start.0 + 2.0 * u * t * control.0 + t * t * end.0,
                u * u * start.1 + 2.0 * u * t * control.1 + t * t * end.1,
            )
        };
        segments.extend((0..16).map(|i| (point(i as f64 / 16.0), point((i + 1) as f64 / 16.0))));
    }
    let mask: Vec<bool> = (0..height)
        .flat_map(|y| (0..width).map(move |x| (x as f64 + 0.5, y as f64 + 0.5)))
        .map(|p| segments.iter().any(|(a, b)| segment_distance(p, *a, *b) <= thickness / 2.0 + 0.25))
        .collect();
    apply(img, &mask, |_, _, v| v + strength)
}

/// A brightness change of either sign, 8–30 % of full scale at its strongest, fading to
/// half of that at the mask's edge, inside a Perlin-noise mask.
fn paste_shift(img: &mut GrayImage, rng: &mut ChaCha8Rng) -> GrayImage {
    let (mask, depth) = perlin_mask(img.width(), img.height(), rng);
    let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
    let strength = rng.random_range(0.08..0.3) * 255.0 * sign;
    let width = img.width();
    apply(img, &mask, |x, y, v| v + strength * (0.5 + 0.5 * depth[(y * width + x) as usize]))
}

/// `donor`'s texture rotated by any angle and stretched (1.5–3× along one axis, 0.4–1×
/// along the other) inside a Perlin-noise mask, shifted and scaled to the mean and
/// standard deviation of `img` under the mask: same brightness and contrast, foreign
/// structure.
fn paste_patch(img: &mut GrayImage, donor: &GrayImage, rng: &mut ChaCha8Rng) -> GrayImage {
    let (width, height) = img.dimensions();
    let (mask, _) = perlin_mask(width, height, rng);
    let angle = rng.random_range(0.0..std::f64::consts::PI);
    let (stretch, squeeze) = (rng.random_range(1.5..3.0), rng.random_range(0.4..1.0));
    let offset = (rng.random_range(0.0..donor.width() as f64), rng.random_range(0.0..donor.height() as f64));
    let (dw, dh) = (donor.width() as f64, donor.height() as f64);
    let source = |x: u32, y: u32| {
        let (u, v) = (x as f64 - width as f64 / 2.0, y as f64 - height as f64 / 2.0);
        let (r, s) = (u * angle.cos() - v * angle.sin(), u * angle.sin() + v * angle.cos());
        let (sx, sy) = ((r / stretch + offset.0).rem_euclid(dw - 1.0), (s / squeeze + offset.1).rem_euclid(dh - 1.0));
        sample(donor, sx, sy)
    };
    let inside: Vec<(u32, u32)> =
        mask.iter().enumerate().filter(|(_, m)| **m).map(|(i, _)| (i as u32 % width, i as u32 / width)).collect();
    let moments = |f: &dyn Fn(u32, u32) -> f64| {
        let n = inside.len().max(1) as f64;
        let mean = inside.iter().map(|&(x, y)| f(x, y)).sum::<f64>() / n;
        let var = inside.iter().map(|&(x, y)| (f(x, y) - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt().max(1.0))
    };
    let (surface_mean, surface_sd) = moments(&|x, y| img.get_pixel(x, y).0[0] as f64);
    let (patch_mean, patch_sd) = moments(&source);
    apply(img, &mask, |x, y, _| surface_mean + (source(x, y) - patch_mean) / patch_sd * surface_sd)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn texture(seed: u32) -> GrayImage {
        GrayImage::from_fn(64, 64, |x, y| Luma([(128.0 + 50.0 * ((x * 7 + y * 3 + seed) as f64 * 0.7).sin()) as u8]))
    }

    #[test]
    fn every_family_changes_only_its_mask_and_something_inside_it() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for family in Family::ALL {
            for _ in 0..20 {
                let (clean, donor) = (texture(0), texture(11));
                let mut painted = clean.clone();
                let mask = family.paste(&mut painted, &donor, &mut rng);
                let inside = mask.pixels().filter(|m| m.0[0] != 0).count();
                assert!(inside > 0 && inside < 64 * 64 / 3, "{}: {inside} pixels", family.name());
                let mut changed = 0;
                for ((c, p), m) in clean.pixels().zip(painted.pixels()).zip(mask.pixels()) {
                    if m.0[0] == 0 {
                        assert_eq!(c, p, "{} changed a pixel outside its mask", family.name());
                    } else if c != p {
                        changed += 1;
                    }
                }
                assert!(changed * 4 >= inside, "{}: {changed} of {inside} masked pixels changed", family.name());
            }
        }
    }

    #[test]
    fn folds_cover_every_family_once() {
        let mut seen: Vec<Family> = FOLDS.iter().flat_map(|f| f.iter().copied()).collect();
        assert_eq!(seen.len(), Family::ALL.len());
        seen.dedup();
        assert!(Family::ALL.iter().all(|f| seen.contains(f)));
        for (k, fold) in FOLDS.iter().enumerate() {
            let outside = outside_fold(k);
            assert_eq!(outside.len() + fold.len(), Family::ALL.len());
            assert!(outside.iter().all(|f| !fold.contains(f)));
        }
    }

    #[test]
    fn a_patch_keeps_the_surface_mean_and_contrast() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let clean = texture(0);
        let donor = GrayImage::from_fn(64, 64, |x, _| Luma([if x % 8 < 4 { 20 } else { 240 }]));
        let mut painted = clean.clone();
        let mask = Family::Patch.paste(&mut painted, &donor, &mut rng);
        let stats = |img: &GrayImage| {
            let values: Vec<f64> =
                img.pixels().zip(mask.pixels()).filter(|(_, m)| m.0[0] != 0).map(|(p, _)| p.0[0] as f64).collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            (mean, (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64).sqrt())
        };
        let ((m0, s0), (m1, s1)) = (stats(&clean), stats(&painted));
        assert!((m0 - m1).abs() < 3.0 && (s0 - s1).abs() < 0.15 * s0, "{m0} ± {s0} against {m1} ± {s1}");
        assert_ne!(clean, painted);
    }
}
