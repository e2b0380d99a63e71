//! Label-free choice of the operating point a bundle ships with: t0, reverse steps, DDAD
//! conditioning and the anomaly-map rule.
//!
//! Field frames carry no labels, so the choice is made on synthetic defects: the
//! `synth` generator pastes scratches, holes, stains and transplants ([`TRAINING_DEFECTS`])
//! on the held-out calibration frames, every candidate within the user's UNet-call budget
//! reconstructs the clean and the defective copies exactly as the daemon would, and the
//! candidate with the best pixel AUPRC against the pasted masks wins (ties: fewer calls).
//! The calibration frames are as contaminated as the training data; their own defects count
//! as normal pixels here, which costs every candidate alike.
//!
//! Reconstructions are shared: the anomaly-map rules are scored on the same reconstruction,
//! so the search costs one reconstruction per (t0, steps, condition).

use image::GrayImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::eval::metrics::{auroc, average_precision};
use crate::eval::synth::{DefectKind, TRAINING_DEFECTS, paste_defect, paste_transplant};
use crate::infer::ensemble::{Ensemble, MapGraphs};
use crate::infer::reconstruct::Reconstructor;
use crate::infer::runtime::{Denoiser, RuntimeError};
use crate::model::diffusion::NoiseSchedule;
use crate::model::manifest::{CandidateScore, OperatingPoint};
use crate::model::sampling::{ReconstructionSpec, Sampler};
use crate::postprocess::anomaly::{AnomalySpec, Residual, Threshold, residual_map, verdict};

/// The candidates and the budget; stored in the training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchSpace {
    /// Most UNet calls per tile a candidate may use.
    pub budget_unet_calls: usize,
    pub t0: Vec<usize>,
    /// DDIM steps (those above the budget or above t0 are skipped).
    pub steps: Vec<usize>,
    pub condition: Vec<f64>,
    pub residual: Vec<Residual>,
    /// At most this many calibration frames are used (each clean and with a defect).
    pub max_frames: usize,
}

impl SearchSpace {
    /// The default grid under `budget` calls per tile.
    pub fn with_budget(budget_unet_calls: usize) -> Self {
        Self {
            budget_unet_calls,
            t0: vec![10, 25, 50, 100, 200],
            steps: vec![1, 5, 10],
            condition: vec![0.0, 2.0],
            residual: vec![Residual::L1, Residual::Ssim, Residual::Msgms],
            max_frames: 32,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.budget_unet_calls == 0 {
            return Err("the UNet-call budget must be at least 1".into());
        }
        if self.t0.is_empty() || self.steps.is_empty() || self.condition.is_empty() || self.residual.is_empty() {
            return Err("the operating-point search needs at least one t0, steps, condition and map rule".into());
        }
        if self.max_frames == 0 {
            return Err("the operating-point search needs at least one frame".into());
        }
        Ok(())
    }

    /// The reconstruction settings to try, in a fixed order.
    fn reconstructions(&self, schedule_steps: usize) -> Vec<ReconstructionSpec> {
        let mut out = Vec::new();
        for &t0 in &self.t0 {
            for &steps in &self.steps {
                for &condition in &self.condition {
                    let spec = ReconstructionSpec { t0, steps, sampler: Sampler::Ddim, eta: 0.0, condition };
                    if steps <= self.budget_unet_calls && spec.check(schedule_steps).is_ok() {
                        out.push(spec);
                    }
                }
            }
        }
        out
    }
}

/// Clean frames and their defective copies with masks, all `[C, H, W]` in model space.
pub(crate) struct ValidationSet {
    pub frames: Vec<Vec<f32>>,
    /// Per frame, 1 where a defect was pasted (all zero for the clean copies).
    pub truth: Vec<Vec<u8>>,
    pub clean_count: usize,
}

/// Pastes one training defect ([`TRAINING_DEFECTS`]: a painted scratch, hole or stain, or a
/// transplant from another of `frames`) on a copy of each frame. The defect is painted on
/// the frame's grey level (channel mean) and its change added to every channel.
pub(crate) fn validation_set(frames: &[Vec<f32>], [channels, height, width]: [usize; 3], seed: u64) -> ValidationSet {
    let plane = height * width;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2);
    let mut set =
        ValidationSet { frames: frames.to_vec(), truth: vec![vec![0; plane]; frames.len()], clean_count: frames.len() };
    let greys: Vec<GrayImage> = frames.iter().map(|frame| grey_level(frame, [channels, height, width])).collect();
    for (i, frame) in frames.iter().enumerate() {
        let mut painted = greys[i].clone();
        let choice = rng.random_range(0..TRAINING_DEFECTS.len());
        let mask = match DefectKind::SELECTION.get(choice) {
            Some(&kind) => paste_defect(&mut painted, kind, &mut rng),
            None => {
                let donor = (i + rng.random_range(1..frames.len().max(2))) % frames.len();
                paste_transplant(&mut painted, &greys[donor], &mut rng)
            }
        };
        let mut defective = frame.clone();
        for p in 0..plane {
            let delta = (painted.as_raw()[p] as f32 - greys[i].as_raw()[p] as f32) / 255.0 * 2.0;
            for c in 0..channels {
                defective[c * plane + p] = (defective[c * plane + p] + delta).clamp(-1.0, 1.0);
            }
        }
        set.frames.push(defective);
        set.truth.push(mask.as_raw().iter().map(|m| u8::from(*m != 0)).collect());
    }
    set
}

/// A model-space frame's grey level (channel mean) as an 8-bit image.
fn grey_level(frame: &[f32], [channels, height, width]: [usize; 3]) -> GrayImage {
    let plane = height * width;
    let grey = (0..plane)
        .map(|p| {
            let mean = (0..channels).map(|c| frame[c * plane + p]).sum::<f32>() / channels as f32;
            (((mean + 1.0) / 2.0) * 255.0).round().clamp(0.0, 255.0) as u8
        })
        .collect();
    GrayImage::from_raw(width as u32, height as u32, grey).expect("plane size")
}

/// What the search scores candidates on: the model's calibration frames (`[C, H, W]`, model
/// space) with synthetic defects pasted, under `anomaly`'s smoothing and image rule.
#[derive(Clone, Copy)]
pub struct Validation<'a> {
    pub schedule: &'a NoiseSchedule,
    pub shape: [usize; 3],
    pub anomaly: &'a AnomalySpec,
    pub frames: &'a [Vec<f32>],
    pub space: &'a SearchSpace,
    pub seed: u64,
}

impl Validation<'_> {
    /// Scores every candidate on synthetic defects pasted on `frames` and returns them, best
    /// first, with the search's description. `anomaly` supplies smoothing and the image rule.
    /// Candidates are single reconstructions and, within the budget, two-member ensembles of
    /// the same steps and conditioning at two t0 (maps averaged, as [`Ensemble`] does).
    ///
    /// [`Ensemble`]: crate::infer::ensemble::Ensemble
    pub fn search(&self, denoiser: &mut dyn Denoiser) -> Result<OperatingPoint, RuntimeError> {
        let Validation { schedule, shape, anomaly, frames, space, seed } = *self;
        let used = &frames[..frames.len().min(space.max_frames)];
        let set = validation_set(used, shape, seed);
        let specs = space.reconstructions(schedule.len());
        // raw[spec][residual][frame]: unsmoothed dissimilarity maps.
        let mut raw: Vec<Vec<Vec<Vec<f32>>>> = Vec::with_capacity(specs.len());
        for spec in &specs {
            let mut reconstructor = Reconstructor::new(schedule.clone(), *spec).expect("checked when listed");
            let recon = reconstruct_all(denoiser, &mut reconstructor, &set.frames, shape, seed)?;
            raw.push(
                space
                    .residual
                    .iter()
                    .map(|&residual| {
                        let rule = AnomalySpec { residual, ..*anomaly };
                        set.frames.iter().zip(&recon).map(|(f, r)| residual_map(f, r, shape, &rule)).collect()
                    })
                    .collect(),
            );
        }
        let mut candidates = Vec::new();
        for (r, &residual) in space.residual.iter().enumerate() {
            let rule = AnomalySpec { residual, ..*anomaly };
            for (a, spec) in specs.iter().enumerate() {
                candidates.push(score(&set, raw[a][r].clone(), shape, &rule, spec, &[], spec.steps));
                for (b, other) in specs.iter().enumerate().skip(a + 1) {
                    let pairable =
                        other.steps == spec.steps && other.condition == spec.condition && other.t0 != spec.t0;
                    if pairable && spec.steps + other.steps <= space.budget_unet_calls {
                        let averaged = raw[a][r]
                            .iter()
                            .zip(&raw[b][r])
                            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p + q) / 2.0).collect())
                            .collect();
                        candidates.push(score(
                            &set,
                            averaged,
                            shape,
                            &rule,
                            spec,
                            &[other.t0],
                            spec.steps + other.steps,
                        ));
                    }
                }
            }
        }
        rank(&mut candidates);
        let chosen = candidates.first().expect("the search space is validated non-empty").clone();
        Ok(OperatingPoint {
            rule: format!(
                "one synthetic {} pasted on each of {} held-out calibration frames (synth generator, seed {seed}); \
             DDIM candidates and two-t0 ensembles within {} UNet calls per tile; best pixel AUPRC, ties to fewer calls",
                TRAINING_DEFECTS.join("/"),
                used.len(),
                space.budget_unet_calls
            ),
            budget_unet_calls: space.budget_unet_calls,
            validation_frames: used.len(),
            defect_kinds: TRAINING_DEFECTS.iter().map(|k| k.to_string()).collect(),
            chosen,
            candidates,
        })
    }

    /// Scores the map rule `residual` whose graph is `graph` (the learned head, the
    /// normal-patch model) at the chosen reconstruction (t0, ensemble, steps, conditioning)
    /// on the same validation frames and defects as [`search`], adds it to `point`'s
    /// candidates and re-ranks them: it becomes the choice only if it wins.
    pub fn add_map_candidate(
        &self,
        point: &mut OperatingPoint,
        denoiser: &mut dyn Denoiser,
        graph: &mut dyn Denoiser,
        residual: Residual,
    ) -> Result<CandidateScore, RuntimeError> {
        let Validation { schedule, shape, anomaly, frames, space, seed } = *self;
        let set = validation_set(&frames[..frames.len().min(space.max_frames)], shape, seed);
        let base = point.chosen.clone();
        let spec = base.reconstruction();
        let mut ensemble = Ensemble::new(schedule, spec, &base.extra_t0).expect("a searched candidate is valid");
        let rule = AnomalySpec { residual, ..*anomaly };
        let raw = ensemble.raw_maps_of(denoiser, &mut MapGraphs::rule(Some(graph)), &set.frames, shape, seed, &rule)?;
        let maps = raw.into_iter().map(|(map, _)| map).collect();
        let candidate = score(&set, maps, shape, &rule, &spec, &base.extra_t0, base.unet_calls);
        point.candidates.push(candidate.clone());
        rank(&mut point.candidates);
        point.chosen = point.candidates[0].clone();
        Ok(candidate)
    }
}

/// Best pixel AUPRC first; ties to fewer UNet calls.
fn rank(candidates: &mut [CandidateScore]) {
    candidates.sort_by(|a, b| b.pixel_auprc.total_cmp(&a.pixel_auprc).then(a.unet_calls.cmp(&b.unet_calls)));
}

/// One candidate's figures: its raw map per validation frame (members already averaged),
/// smoothed and scored as `Inspector` would.
fn score(
    set: &ValidationSet,
    maps: Vec<Vec<f32>>,
    [_, height, width]: [usize; 3],
    rule: &AnomalySpec,
    primary: &ReconstructionSpec,
    extra_t0: &[usize],
    unet_calls: usize,
) -> CandidateScore {
    let neutral = Threshold { value: 0.0, min: 0.0, max: 1.0 };
    let mut pixel_scores = Vec::with_capacity(set.frames.len() * height * width);
    let mut image_scores = Vec::with_capacity(set.frames.len());
    for map in maps {
        let analysis = verdict(map, 0.0, [height, width], height * width, rule, &neutral, &neutral);
        image_scores.push(analysis.score as f32);
        pixel_scores.extend(analysis.map);
    }
    let labels: Vec<bool> = set.truth.iter().flatten().map(|t| *t != 0).collect();
    let image_labels: Vec<bool> = (0..set.frames.len()).map(|i| i >= set.clean_count).collect();
    CandidateScore {
        t0: primary.t0,
        extra_t0: extra_t0.to_vec(),
        steps: primary.steps,
        condition: primary.condition,
        residual: rule.residual,
        unet_calls,
        pixel_auprc: average_precision(&pixel_scores, &labels).unwrap_or(0.0),
        pixel_auroc: auroc(&pixel_scores, &labels).unwrap_or(0.5),
        image_auroc: auroc(&image_scores, &image_labels).unwrap_or(0.5),
    }
}

/// Reconstructs `frames` in batches of 8; frame `i` is seeded with `seed + i`, as in
/// calibration, so a frame's result does not depend on the batch it shared.
pub(crate) fn reconstruct_all(
    denoiser: &mut dyn Denoiser,
    reconstructor: &mut Reconstructor,
    frames: &[Vec<f32>],
    [channels, height, width]: [usize; 3],
    seed: u64,
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    const BATCH: usize = 8;
    let mut out = Vec::with_capacity(frames.len());
    for (chunk_index, chunk) in frames.chunks(BATCH).enumerate() {
        let clean = chunk.concat();
        let seeds: Vec<u64> = (0..chunk.len()).map(|i| seed.wrapping_add((chunk_index * BATCH + i) as u64)).collect();
        let mut recon = vec![0.0; clean.len()];
        reconstructor.reconstruct(denoiser, &clean, [chunk.len(), channels, height, width], &seeds, &mut recon)?;
        out.extend(recon.chunks(channels * height * width).map(<[f32]>::to_vec));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_respect_budget_and_t0() {
        let space =
            SearchSpace { t0: vec![3, 50], steps: vec![1, 5, 10], condition: vec![0.0], ..SearchSpace::with_budget(5) };
        let listed: Vec<(usize, usize)> = space.reconstructions(1000).iter().map(|s| (s.t0, s.steps)).collect();
        assert_eq!(listed, vec![(3, 1), (50, 1), (50, 5)]);
        assert!(SearchSpace::with_budget(0).validate().is_err());
    }

    #[test]
    fn pasted_defects_change_exactly_their_masks() {
        let (h, w) = (32, 32);
        let frames: Vec<Vec<f32>> =
            (0..4).map(|k| (0..2 * h * w).map(|i| ((i + k) as f32 * 0.13).sin() * 0.5).collect()).collect();
        let set = validation_set(&frames, [2, h, w], 7);
        assert_eq!((set.frames.len(), set.clean_count), (8, 4));
        for (i, frame) in set.frames.iter().enumerate().skip(4) {
            let truth = &set.truth[i];
            assert!(truth.contains(&1), "frame {i} got no defect");
            for p in 0..h * w {
                for c in 0..2 {
                    let changed = (frame[c * h * w + p] - frames[i - 4][c * h * w + p]).abs() > 1e-6;
                    assert!(!changed || truth[p] == 1, "frame {i} pixel {p} changed outside the mask");
                }
            }
        }
        assert!(set.truth[..4].iter().flatten().all(|t| *t == 0));
    }
}
