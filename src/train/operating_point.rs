//! Label-free choice of the operating point a bundle ships with: t0, reverse steps, DDAD
//! conditioning, the anomaly-map rule and the weight of the fused patch map.
//!
//! Field frames carry no labels, so the choice is made on synthetic defects: every family
//! of [`crate::train::defects`] is pasted on copies of the held-out calibration frames, one
//! copy per family group ([`FOLDS`]); every candidate within the user's UNet-call budget
//! reconstructs the clean and the defective copies exactly as the daemon would and is
//! scored on each group (the clean frames and that group's copies); the criterion is the
//! mean of the groups' pixel AUPRC, and the best candidate wins (ties: fewer calls). A
//! learnt map (the head) is scored per group by a head trained without that group's
//! families, so the criterion says how it does on shapes it never saw. The calibration
//! frames are as contaminated as the training data; their own defects count as normal
//! pixels here, which costs every candidate alike.
//!
//! Reconstructions are shared: the anomaly-map rules are scored on the same reconstruction,
//! so the search costs one reconstruction per (t0, steps, condition).

use image::GrayImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::eval::metrics::{auroc, average_precision};
use crate::infer::ensemble::{Ensemble, MapGraphs, patch_maps_of};
use crate::infer::reconstruct::Reconstructor;
use crate::infer::runtime::{Denoiser, RuntimeError};
use crate::model::diffusion::NoiseSchedule;
use crate::model::manifest::{CandidateScore, FusionScore, OperatingPoint, RuleFigures};
use crate::model::sampling::{ReconstructionSpec, Sampler};
use crate::postprocess::anomaly::{AnomalySpec, Fusion, Residual, Threshold, residual_map, verdict};
use crate::train::defects::{FOLDS, Family, names};

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

/// Clean frames and defective copies of them with masks, all `[C, H, W]` in model space.
pub(crate) struct ValidationSet {
    pub frames: Vec<Vec<f32>>,
    /// Per frame, 1 where a defect was pasted (all zero for the clean copies).
    pub truth: Vec<Vec<u8>>,
    /// The first `clean_count` frames are the clean ones.
    pub clean_count: usize,
    /// Per group of families pasted ([`pasted_set`]), the indices of its defective copies.
    pub groups: Vec<Vec<usize>>,
}

impl ValidationSet {
    /// What group `k` is scored on: every clean frame, then group `k`'s defective copies.
    pub fn subset(&self, k: usize) -> Vec<usize> {
        (0..self.clean_count).chain(self.groups[k].iter().copied()).collect()
    }

    fn frames_of(&self, indices: &[usize]) -> Vec<Vec<f32>> {
        indices.iter().map(|&i| self.frames[i].clone()).collect()
    }
}

/// For each entry of `groups`, a defective copy of each of `frames` with one defect of that
/// group's families, taken in turn from a random start so that each family gets an equal
/// share; transplants and patches take their texture from another of `frames`. A defect is
/// painted on the frame's grey level (channel mean) and its change added to every channel.
pub(crate) fn pasted_set(
    frames: &[Vec<f32>],
    shape @ [channels, height, width]: [usize; 3],
    seed: u64,
    groups: &[&[Family]],
) -> ValidationSet {
    let plane = height * width;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(2);
    let mut set = ValidationSet {
        frames: frames.to_vec(),
        truth: vec![vec![0; plane]; frames.len()],
        clean_count: frames.len(),
        groups: Vec::with_capacity(groups.len()),
    };
    let greys: Vec<GrayImage> = frames.iter().map(|frame| grey_level(frame, shape)).collect();
    for families in groups {
        let first = rng.random_range(0..families.len());
        let mut members = Vec::with_capacity(frames.len());
        for (i, frame) in frames.iter().enumerate() {
            let family = families[(first + i) % families.len()];
            let donor = (i + rng.random_range(1..frames.len().max(2))) % frames.len();
            let mut painted = greys[i].clone();
            let mask = family.paste(&mut painted, &greys[donor], &mut rng);
            let mut defective = frame.clone();
            for p in 0..plane {
                let delta = (painted.as_raw()[p] as f32 - greys[i].as_raw()[p] as f32) / 255.0 * 2.0;
                for c in 0..channels {
                    defective[c * plane + p] = (defective[c * plane + p] + delta).clamp(-1.0, 1.0);
                }
            }
            members.push(set.frames.len());
            set.frames.push(defective);
            set.truth.push(mask.as_raw().iter().map(|m| u8::from(*m != 0)).collect());
        }
        set.groups.push(members);
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

/// The weights tried for the patch map fused into the chosen rule's map: 0 ships the rule
/// alone, 1 the patch map alone.
pub const FUSION_WEIGHTS: [f64; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// What the search scores candidates on: the model's calibration frames (`[C, H, W]`, model
/// space) with synthetic defects of every family group ([`FOLDS`]) pasted, under
/// `anomaly`'s smoothing and image rule.
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
    /// The validation frames with one defect of each family group pasted on a copy of each.
    fn set(&self) -> ValidationSet {
        let used = &self.frames[..self.frames.len().min(self.space.max_frames)];
        pasted_set(used, self.shape, self.seed, &FOLDS)
    }

    /// Scores every candidate on synthetic defects pasted on `frames` and returns them, best
    /// first, with the search's description. `anomaly` supplies smoothing and the image rule.
    /// Candidates are single reconstructions and, within the budget, two-member ensembles of
    /// the same steps and conditioning at two t0 (maps averaged, as [`Ensemble`] does).
    pub fn search(&self, denoiser: &mut dyn Denoiser) -> Result<OperatingPoint, RuntimeError> {
        let Validation { schedule, shape, anomaly, space, seed, .. } = *self;
        let set = self.set();
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
                candidates.push(score(&set, &raw[a][r], shape, &rule, spec, &[], spec.steps));
                for (b, other) in specs.iter().enumerate().skip(a + 1) {
                    let pairable =
                        other.steps == spec.steps && other.condition == spec.condition && other.t0 != spec.t0;
                    if pairable && spec.steps + other.steps <= space.budget_unet_calls {
                        let averaged: Vec<Vec<f32>> = raw[a][r]
                            .iter()
                            .zip(&raw[b][r])
                            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p + q) / 2.0).collect())
                            .collect();
                        let calls = spec.steps + other.steps;
                        candidates.push(score(&set, &averaged, shape, &rule, spec, &[other.t0], calls));
                    }
                }
            }
        }
        rank(&mut candidates);
        let chosen = candidates.first().expect("the search space is validated non-empty").clone();
        let groups: Vec<String> = FOLDS.iter().map(|fold| names(fold).join("/")).collect();
        Ok(OperatingPoint {
            rule: format!(
                "one synthetic defect of each family group ({}) pasted on a copy of each of {} held-out calibration \
                 frames (seed {seed}); DDIM candidates and two-t0 ensembles within {} UNet calls per tile; the mean \
                 over groups of the group's pixel AUPRC, learnt maps scored only on the group they never trained on; \
                 ties to fewer calls",
                groups.join(" | "),
                set.clean_count,
                space.budget_unet_calls
            ),
            budget_unet_calls: space.budget_unet_calls,
            validation_frames: set.clean_count,
            defect_kinds: names(&Family::ALL),
            chosen,
            candidates,
            fusion_candidates: Vec::new(),
        })
    }

    /// The raw maps of `frames` at `point`'s reconstruction (ensemble included) under `rule`,
    /// `graphs` computing learnt maps.
    fn maps(
        &self,
        denoiser: &mut dyn Denoiser,
        graphs: &mut MapGraphs<'_>,
        frames: &[Vec<f32>],
        point: &CandidateScore,
        rule: &AnomalySpec,
    ) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let mut ensemble = Ensemble::new(self.schedule, point.reconstruction(), &point.extra_t0)
            .expect("a searched candidate is valid");
        let raw = ensemble.raw_maps_of(denoiser, graphs, frames, self.shape, self.seed, rule)?;
        Ok(raw.into_iter().map(|(map, _)| map).collect())
    }

    /// Scores the map rule `residual` computed by a graph (the learned head, the
    /// normal-patch model) at the chosen reconstruction (t0, ensemble, steps, conditioning)
    /// on the same validation frames and defects as [`search`], adds it to `point`'s
    /// candidates and re-ranks them: it becomes the choice only if it wins. `graphs` is
    /// one graph for every group, or one per group ([`FOLDS`]) trained without that group's
    /// families and scored on them only. `head_patch`: the patch model's graph and its
    /// standardisation, for a head that reads the patch map.
    pub fn add_map_candidate(
        &self,
        point: &mut OperatingPoint,
        denoiser: &mut dyn Denoiser,
        graphs: &mut [&mut dyn Denoiser],
        residual: Residual,
        mut head_patch: Option<(&mut dyn Denoiser, [f64; 2])>,
    ) -> Result<CandidateScore, RuntimeError> {
        assert!(graphs.len() == 1 || graphs.len() == FOLDS.len(), "one graph, or one per family group");
        let set = self.set();
        let base = point.chosen.clone();
        let rule = AnomalySpec { residual, fusion: None, ..*self.anomaly };
        let mut per_group = Vec::with_capacity(set.groups.len());
        for k in 0..set.groups.len() {
            let indices = set.subset(k);
            let (patch, stats) = match head_patch.as_mut() {
                Some((graph, stats)) => (Some(&mut **graph as &mut dyn Denoiser), Some(*stats)),
                None => (None, None),
            };
            let mut map_graphs = MapGraphs { rule: Some(&mut *graphs[k % graphs.len()]), patch, head_patch: stats };
            let maps = self.maps(denoiser, &mut map_graphs, &set.frames_of(&indices), &base, &rule)?;
            per_group.push(figures(&set, &indices, maps, self.shape, &rule));
        }
        let candidate =
            Figures::mean(&per_group).candidate(&base.reconstruction(), &base.extra_t0, residual, base.unet_calls);
        point.candidates.push(candidate.clone());
        rank(&mut point.candidates);
        point.chosen = point.candidates[0].clone();
        Ok(candidate)
    }

    /// Scores the chosen rule's map fused with the patch map at each of [`FUSION_WEIGHTS`],
    /// both standardised on the clean frames as the shipped fusion is, per family group and
    /// averaged; `rule_graphs` computes the rule's map (none for a pixel rule, one per group
    /// for the head, each scored on the group it never trained on; `head_patch` is the
    /// patch map's standardisation for a head that reads it). Best first, ties to the weight
    /// nearest ½.
    pub fn fusion_scores(
        &self,
        point: &OperatingPoint,
        denoiser: &mut dyn Denoiser,
        rule_graphs: &mut [&mut dyn Denoiser],
        patch: &mut dyn Denoiser,
        head_patch: Option<[f64; 2]>,
    ) -> Result<Vec<FusionScore>, RuntimeError> {
        let set = self.set();
        let chosen = &point.chosen;
        let rule = AnomalySpec { residual: chosen.residual, fusion: None, ..*self.anomaly };
        let patch_maps = patch_maps_of(&mut *patch, &set.frames, self.shape)?;
        let mut per_weight = vec![Vec::with_capacity(set.groups.len()); FUSION_WEIGHTS.len()];
        for k in 0..set.groups.len() {
            let indices = set.subset(k);
            let n = rule_graphs.len().max(1);
            let graph: Option<&mut dyn Denoiser> = rule_graphs.get_mut(k % n).map(|g| &mut **g as &mut dyn Denoiser);
            let mut graphs = MapGraphs { rule: graph, patch: Some(&mut *patch), head_patch };
            let rule_maps = self.maps(denoiser, &mut graphs, &set.frames_of(&indices), chosen, &rule)?;
            let patch_maps: Vec<Vec<f32>> = indices.iter().map(|&i| patch_maps[i].clone()).collect();
            let clean = set.clean_count;
            for (&weight, figs) in FUSION_WEIGHTS.iter().zip(&mut per_weight) {
                let fusion = Fusion::from_normal_maps(weight, &rule_maps[..clean], &patch_maps[..clean]);
                let fused = rule_maps
                    .iter()
                    .zip(&patch_maps)
                    .map(|(r, p)| {
                        let mut map = r.clone();
                        fusion.fuse(&mut map, p);
                        map
                    })
                    .collect();
                figs.push(figures(&set, &indices, fused, self.shape, &rule));
            }
        }
        let mut scores: Vec<FusionScore> = FUSION_WEIGHTS
            .iter()
            .zip(per_weight)
            .map(|(&patch_weight, figs)| {
                let mean = Figures::mean(&figs);
                FusionScore {
                    patch_weight,
                    pixel_auprc: mean.pixel_auprc,
                    pixel_auroc: mean.pixel_auroc,
                    image_auroc: mean.image_auroc,
                }
            })
            .collect();
        scores.sort_by(|a, b| {
            let off_centre = |s: &FusionScore| (s.patch_weight - 0.5).abs();
            b.pixel_auprc.total_cmp(&a.pixel_auprc).then(off_centre(a).total_cmp(&off_centre(b)))
        });
        Ok(scores)
    }
}

/// The figures of the rule `anomaly` exactly as shipped (fusion and screen included) on
/// `frames` with one defect of every family group pasted on copies (as the search's
/// validation), mean over the groups: what `retrain --int8` compares the precisions by.
pub(crate) fn shipped_figures(
    denoiser: &mut dyn Denoiser,
    graphs: &mut MapGraphs<'_>,
    ensemble: &mut Ensemble,
    frames: &[Vec<f32>],
    shape: [usize; 3],
    seed: u64,
    anomaly: &AnomalySpec,
) -> Result<RuleFigures, RuntimeError> {
    let set = pasted_set(frames, shape, seed, &FOLDS);
    let maps: Vec<Vec<f32>> = ensemble
        .raw_maps_of(denoiser, graphs, &set.frames, shape, seed, anomaly)?
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    let per_group: Vec<Figures> = (0..set.groups.len())
        .map(|k| {
            let indices = set.subset(k);
            figures(&set, &indices, indices.iter().map(|&i| maps[i].clone()).collect(), shape, anomaly)
        })
        .collect();
    let mean = Figures::mean(&per_group);
    Ok(RuleFigures { pixel_auroc: mean.pixel_auroc, pixel_auprc: mean.pixel_auprc, image_auroc: mean.image_auroc })
}

/// Best pixel AUPRC first; ties to fewer UNet calls.
fn rank(candidates: &mut [CandidateScore]) {
    candidates.sort_by(|a, b| b.pixel_auprc.total_cmp(&a.pixel_auprc).then(a.unet_calls.cmp(&b.unet_calls)));
}

/// A map rule's figures on one family group, or their mean over groups.
#[derive(Debug, Clone, Copy)]
struct Figures {
    pixel_auprc: f64,
    pixel_auroc: f64,
    image_auroc: f64,
}

impl Figures {
    fn mean(all: &[Figures]) -> Figures {
        let n = all.len().max(1) as f64;
        Figures {
            pixel_auprc: all.iter().map(|f| f.pixel_auprc).sum::<f64>() / n,
            pixel_auroc: all.iter().map(|f| f.pixel_auroc).sum::<f64>() / n,
            image_auroc: all.iter().map(|f| f.image_auroc).sum::<f64>() / n,
        }
    }

    fn candidate(
        self,
        primary: &ReconstructionSpec,
        extra_t0: &[usize],
        residual: Residual,
        unet_calls: usize,
    ) -> CandidateScore {
        CandidateScore {
            t0: primary.t0,
            extra_t0: extra_t0.to_vec(),
            steps: primary.steps,
            condition: primary.condition,
            residual,
            unet_calls,
            pixel_auprc: self.pixel_auprc,
            pixel_auroc: self.pixel_auroc,
            image_auroc: self.image_auroc,
        }
    }
}

/// One candidate's figures: its raw map per validation frame (members already averaged),
/// scored per family group and averaged.
fn score(
    set: &ValidationSet,
    maps: &[Vec<f32>],
    shape: [usize; 3],
    rule: &AnomalySpec,
    primary: &ReconstructionSpec,
    extra_t0: &[usize],
    unet_calls: usize,
) -> CandidateScore {
    let per_group: Vec<Figures> = (0..set.groups.len())
        .map(|k| {
            let indices = set.subset(k);
            let maps = indices.iter().map(|&i| maps[i].clone()).collect();
            figures(set, &indices, maps, shape, rule)
        })
        .collect();
    Figures::mean(&per_group).candidate(primary, extra_t0, rule.residual, unet_calls)
}

/// The figures of `maps` (raw, one per frame of `indices`), smoothed and scored as
/// `Inspector` would, against the set's masks.
fn figures(
    set: &ValidationSet,
    indices: &[usize],
    maps: Vec<Vec<f32>>,
    [_, height, width]: [usize; 3],
    rule: &AnomalySpec,
) -> Figures {
    let neutral = Threshold { value: 0.0, min: 0.0, max: 1.0 };
    let mut pixel_scores = Vec::with_capacity(indices.len() * height * width);
    let mut image_scores = Vec::with_capacity(indices.len());
    for map in maps {
        let analysis = verdict(map, 0.0, [height, width], height * width, rule, &neutral, &neutral);
        image_scores.push(analysis.score as f32);
        pixel_scores.extend(analysis.map);
    }
    let labels: Vec<bool> = indices.iter().flat_map(|&i| set.truth[i].iter().map(|t| *t != 0)).collect();
    let image_labels: Vec<bool> = indices.iter().map(|&i| i >= set.clean_count).collect();
    Figures {
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
    use std::cell::Cell;

    use super::*;
    use crate::infer::runtime::FnDenoiser;
    use crate::model::diffusion::ScheduleSpec;

    /// Frames of a 16² sine texture with a per-frame phase, in model space.
    fn frames(count: usize, size: usize) -> Vec<Vec<f32>> {
        (0..count).map(|k| (0..size * size).map(|i| ((i * 7 + k * 3) as f32 * 0.37).sin() * 0.6).collect()).collect()
    }

    #[test]
    fn a_graph_per_group_is_scored_on_its_group_alone_and_fusion_weights_are_ranked() {
        let (size, count) = (16, 4);
        let frames = frames(count, size);
        let schedule = NoiseSchedule::new(&ScheduleSpec::default()).unwrap();
        let anomaly = AnomalySpec { smoothing_sigma: 0.0, ..AnomalySpec::default() };
        let space = SearchSpace {
            t0: vec![10],
            steps: vec![1],
            condition: vec![0.0],
            residual: vec![Residual::L1],
            ..SearchSpace::with_budget(1)
        };
        let validation = Validation {
            schedule: &schedule,
            shape: [1, size, size],
            anomaly: &anomaly,
            frames: &frames,
            space: &space,
            seed: 3,
        };
        let mut denoiser = FnDenoiser(|_, x, _| 0.5 * x);
        let mut point = validation.search(&mut denoiser).unwrap();
        assert_eq!(point.candidates.len(), 1);
        assert_eq!(point.defect_kinds.len(), Family::ALL.len());
        // Each group's graph counts the frames it is shown; graph 1 sees only noise.
        let seen = [Cell::new(0), Cell::new(0), Cell::new(0)];
        let plane = size * size;
        let counter = |k: usize| {
            let seen = &seen[k];
            FnDenoiser(move |i, x, _| {
                if i % (2 * plane) == 0 {
                    seen.set(seen.get() + 1);
                }
                if k == 1 { ((i * 31 % 17) as f32).sin() } else { x.abs() }
            })
        };
        let (mut g0, mut g1, mut g2) = (counter(0), counter(1), counter(2));
        let mut graphs: Vec<&mut dyn Denoiser> = vec![&mut g0, &mut g1, &mut g2];
        let scored =
            validation.add_map_candidate(&mut point, &mut denoiser, &mut graphs, Residual::Head, None).unwrap();
        assert_eq!(seen.iter().map(Cell::get).collect::<Vec<_>>(), vec![2 * count; 3], "clean + the group's copies");
        assert_eq!(point.candidates.len(), 2);
        assert!(point.candidates.contains(&scored));

        // Fusion weights: all five scored, best first, each a mean over the groups.
        let mut patch = FnDenoiser(|_, x, _| x.abs());
        let scores = validation.fusion_scores(&point, &mut denoiser, &mut graphs, &mut patch, None).unwrap();
        let mut weights: Vec<f64> = scores.iter().map(|s| s.patch_weight).collect();
        assert!(scores.windows(2).all(|w| w[0].pixel_auprc >= w[1].pixel_auprc), "{scores:?}");
        weights.sort_by(f64::total_cmp);
        assert_eq!(weights, FUSION_WEIGHTS);
    }

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
        let set = pasted_set(&frames, [2, h, w], 7, &FOLDS);
        assert_eq!((set.frames.len(), set.clean_count), (16, 4));
        assert_eq!(set.groups, vec![vec![4, 5, 6, 7], vec![8, 9, 10, 11], vec![12, 13, 14, 15]]);
        assert_eq!(set.subset(1), vec![0, 1, 2, 3, 8, 9, 10, 11]);
        for (i, frame) in set.frames.iter().enumerate().skip(4) {
            let truth = &set.truth[i];
            assert!(truth.contains(&1), "frame {i} got no defect");
            for p in 0..h * w {
                for c in 0..2 {
                    let changed = (frame[c * h * w + p] - frames[(i - 4) % 4][c * h * w + p]).abs() > 1e-6;
                    assert!(!changed || truth[p] == 1, "frame {i} pixel {p} changed outside the mask");
                }
            }
        }
        assert!(set.truth[..4].iter().flatten().all(|t| *t == 0));
    }
}
