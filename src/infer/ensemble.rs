//! The reconstructions of one operating point and the raw maps they make: the primary
//! reconstruction and one member per extra t0 (AnoDDPM-style), each member's map by the
//! manifest's rule — a pixel residual, or a graph over frame and reconstruction (the
//! learned head, the encoder's feature map) — then averaged, plus the patch map of the
//! frame alone where the manifest fuses one.
//!
//! Owned here, below both the bundle (which checks that a manifest's ensemble can be built)
//! and the [`Inspector`](crate::infer::inspect::Inspector) (which runs it over tiles), and
//! used as is by `retrain`'s search and calibration, so a map means the same everywhere.

use crate::infer::reconstruct::Reconstructor;
use crate::infer::runtime::{Denoiser, RuntimeError};
use crate::model::diffusion::NoiseSchedule;
use crate::model::sampling::{ReconstructionError, ReconstructionSpec};
use crate::postprocess::anomaly::{AnomalySpec, Residual, reconstruction_mse, residual_map};

/// Stacks frames, reconstructions and, for a head that reads it, the standardised patch map
/// channel-wise: `[n, 2C (+ 1), H, W]`, the head's input.
pub fn head_input(clean: &[f32], recon: &[f32], patch: Option<&[f32]>, n: usize) -> Vec<f32> {
    let frame_len = clean.len() / n;
    let plane = patch.map_or(0, |p| p.len() / n);
    let mut out = Vec::with_capacity(2 * clean.len() + plane * n);
    for i in 0..n {
        out.extend_from_slice(&clean[i * frame_len..(i + 1) * frame_len]);
        out.extend_from_slice(&recon[i * frame_len..(i + 1) * frame_len]);
        if let Some(patch) = patch {
            out.extend_from_slice(&patch[i * plane..(i + 1) * plane]);
        }
    }
    out
}

/// Per frame of `clean`/`recon` (`[n, C, H, W]`), the head's defect probability: the
/// sigmoid of its output channel 0 (timestep input 0). `patch`: the standardised patch map
/// per frame (`[n, H, W]`), for a head that reads it as a third input.
pub fn head_maps(
    head: &mut dyn Denoiser,
    clean: &[f32],
    recon: &[f32],
    patch: Option<&[f32]>,
    [n, c, h, w]: [usize; 4],
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let channels = 2 * c + usize::from(patch.is_some());
    let input = head_input(clean, recon, patch, n);
    pair_maps(head, &input, [n, channels, h, w], 0, |z| 1.0 / (1.0 + (-z).exp()))
}

/// Per frame of `clean`/`recon` (`[n, C, H, W]`), the feature distance computed by the
/// `features` graph (`model::onnx_export::export_feature_onnx`) at timestep `t`.
pub fn feature_maps(
    features: &mut dyn Denoiser,
    clean: &[f32],
    recon: &[f32],
    [n, c, h, w]: [usize; 4],
    t: usize,
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    pair_maps(features, &head_input(clean, recon, None, n), [n, 2 * c, h, w], t, |d| d)
}

/// Per frame of `clean` (`[n, C, H, W]`), the normal-patch model's map (it reads only the
/// frame half of its pair input).
pub fn patch_maps(
    patch: &mut dyn Denoiser,
    clean: &[f32],
    [n, c, h, w]: [usize; 4],
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    pair_maps(patch, &head_input(clean, clean, None, n), [n, 2 * c, h, w], 0, |d| d)
}

/// [`patch_maps`] over a list of model-size frames (`[C, H, W]` each), in batches of 8. No
/// reconstruction is run: the patch map reads only the frame.
pub fn patch_maps_of(
    patch: &mut dyn Denoiser,
    frames: &[Vec<f32>],
    [c, h, w]: [usize; 3],
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let mut maps = Vec::with_capacity(frames.len());
    for chunk in frames.chunks(8) {
        maps.extend(patch_maps(patch, &chunk.concat(), [chunk.len(), c, h, w])?);
    }
    Ok(maps)
}

/// Runs a graph of the head's contract (`input [n, channels, H, W]`, the map in output
/// channel 0) at timestep `t` and maps channel 0 of each frame through `value`.
fn pair_maps(
    graph: &mut dyn Denoiser,
    input: &[f32],
    [n, channels, h, w]: [usize; 4],
    t: usize,
    value: impl Fn(f32) -> f32,
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let mut maps = Vec::with_capacity(n);
    graph.predict_eps(input, [n, channels, h, w], &vec![t as f32; n], &mut |out| {
        let frame_out = channels * h * w;
        maps.extend((0..n).map(|i| out[i * frame_out..i * frame_out + h * w].iter().map(|&v| value(v)).collect()));
    })?;
    Ok(maps)
}

/// The graphs a map rule may need beside the denoiser.
#[derive(Default)]
pub struct MapGraphs<'a> {
    /// The rule's own graph: the head, the feature distance or the normal-patch model.
    pub rule: Option<&'a mut dyn Denoiser>,
    /// The normal-patch model, when the rule fuses its map in (`AnomalySpec::fusion`) or
    /// the head reads it.
    pub patch: Option<&'a mut dyn Denoiser>,
    /// For a head that reads the patch map: the map's mean and standard deviation on
    /// normal frames, which standardise it (`HeadArtifact::patch_channel`).
    pub head_patch: Option<[f64; 2]>,
}

impl<'a> MapGraphs<'a> {
    /// Just the rule's graph.
    pub fn rule(graph: Option<&'a mut dyn Denoiser>) -> Self {
        Self { rule: graph, patch: None, head_patch: None }
    }
}

/// The reconstructions of one operating point: the primary setting and one member per
/// extra t0 (same sampler, steps and conditioning).
pub struct Ensemble {
    members: Vec<Reconstructor>,
    recon: Vec<f32>,
    /// Frames the screen declared clean so far (`anomaly.screen`).
    screened: usize,
}

impl Ensemble {
    pub fn new(
        schedule: &NoiseSchedule,
        primary: ReconstructionSpec,
        extra_t0: &[usize],
    ) -> Result<Self, ReconstructionError> {
        let specs = std::iter::once(primary).chain(extra_t0.iter().map(|&t0| ReconstructionSpec { t0, ..primary }));
        let members = specs.map(|spec| Reconstructor::new(schedule.clone(), spec)).collect::<Result<_, _>>()?;
        Ok(Self { members, recon: Vec::new(), screened: 0 })
    }

    /// The primary member's settings.
    pub fn spec(&self) -> &ReconstructionSpec {
        self.members[0].spec()
    }

    /// UNet evaluations per frame, all members together.
    pub fn unet_calls(&self) -> usize {
        self.members.iter().map(Reconstructor::unet_calls).sum()
    }

    /// Frames (tiles) the screen has declared clean since this ensemble was made.
    pub fn screened(&self) -> usize {
        self.screened
    }

    /// Per frame of `clean [n, C, H, W]`: the members' averaged raw dissimilarity map under
    /// `anomaly` (the `map_graph` computes it for [`Residual::Head`], the head, and
    /// [`Residual::Feature`], the feature distance, and [`Residual::Patch`], the normal-patch
    /// model), and their mean reconstruction MSE. With `anomaly.fusion`, the patch model's
    /// map (`graphs.patch`, computed once: it reads only the frame) is fused into the average;
    /// with `anomaly.screen` as well, a frame the screen declares clean is not reconstructed:
    /// its rule map is the rule's mean on normal frames and its MSE 0.
    pub fn raw_maps(
        &mut self,
        denoiser: &mut dyn Denoiser,
        graphs: &mut MapGraphs<'_>,
        clean: &[f32],
        shape: [usize; 4],
        seeds: &[u64],
        anomaly: &AnomalySpec,
    ) -> Result<Vec<(Vec<f32>, f64)>, RuntimeError> {
        let [n, c, h, w] = shape;
        // The patch map reads only the frame: computed once, for the fusion and for a head
        // that reads it.
        let fused = anomaly.fusion.filter(|f| f.patch_weight > 0.0);
        let head_patch = graphs.head_patch.filter(|_| anomaly.residual == Residual::Head);
        let patch = match graphs.patch.as_mut() {
            Some(graph) if fused.is_some() || head_patch.is_some() => Some(patch_maps(&mut **graph, clean, shape)?),
            _ if fused.is_some() || head_patch.is_some() => panic!("the map rule needs the patch model's graph"),
            _ => None,
        };
        let passing: Vec<usize> = match (anomaly.screen, fused, &patch) {
            (Some(screen), Some(_), Some(maps)) => (0..n).filter(|&i| screen.passes(&maps[i])).collect(),
            _ => (0..n).collect(),
        };
        self.screened += n - passing.len();
        let rule_mean = fused.map_or(0.0, |f| f.rule[0]) as f32;
        let mut out = vec![(vec![rule_mean; h * w], 0.0f64); n];
        if !passing.is_empty() {
            let (frame_len, plane) = (c * h * w, h * w);
            let sub_clean: Vec<f32> =
                passing.iter().flat_map(|&i| &clean[i * frame_len..(i + 1) * frame_len]).copied().collect();
            let sub_seeds: Vec<u64> = passing.iter().map(|&i| seeds[i]).collect();
            let head_extra: Option<Vec<f32>> = head_patch.map(|[mean, sd]| {
                let maps = patch.as_ref().expect("computed above");
                passing.iter().flat_map(|&i| &maps[i]).map(|&v| ((v as f64 - mean) / sd) as f32).collect()
            });
            debug_assert!(head_extra.as_ref().is_none_or(|e| e.len() == passing.len() * plane));
            let sub_shape = [passing.len(), c, h, w];
            let maps =
                self.member_maps(denoiser, graphs, &sub_clean, sub_shape, &sub_seeds, head_extra.as_deref(), anomaly)?;
            for (&i, map) in passing.iter().zip(maps) {
                out[i] = map;
            }
        }
        if let Some(fusion) = &anomaly.fusion {
            // At weight 0 the patch map counts for nothing (and was not computed).
            let zeros = vec![vec![0.0; h * w]; n];
            let patch_maps = if fused.is_some() { patch.as_ref().expect("computed above") } else { &zeros };
            for ((map, _), patch_map) in out.iter_mut().zip(patch_maps) {
                fusion.fuse(map, patch_map);
            }
        }
        Ok(out)
    }

    /// The members' averaged map by the rule (before any fusion) and mean reconstruction MSE
    /// per frame of `clean`; `head_extra`: the standardised patch map for a head that reads it.
    #[allow(clippy::too_many_arguments)] // one batch's inputs and the graphs it runs
    fn member_maps(
        &mut self,
        denoiser: &mut dyn Denoiser,
        graphs: &mut MapGraphs<'_>,
        clean: &[f32],
        shape: [usize; 4],
        seeds: &[u64],
        head_extra: Option<&[f32]>,
        anomaly: &AnomalySpec,
    ) -> Result<Vec<(Vec<f32>, f64)>, RuntimeError> {
        let [n, c, h, w] = shape;
        let frame_len = c * h * w;
        let mut out = vec![(vec![0.0f32; h * w], 0.0f64); n];
        let share = 1.0 / self.members.len() as f32;
        self.recon.resize(clean.len(), 0.0);
        for member in &mut self.members {
            member.reconstruct(denoiser, clean, shape, seeds, &mut self.recon)?;
            let learned = match (anomaly.residual, graphs.rule.as_mut()) {
                (Residual::Head, Some(head)) => Some(head_maps(&mut **head, clean, &self.recon, head_extra, shape)?),
                (Residual::Feature, Some(features)) => {
                    Some(feature_maps(&mut **features, clean, &self.recon, shape, anomaly.feature_t)?)
                }
                (Residual::Patch, Some(patch)) => Some(patch_maps(&mut **patch, clean, shape)?),
                (rule @ (Residual::Head | Residual::Feature | Residual::Patch), None) => {
                    panic!("the {} map rule needs its graph", rule.name())
                }
                _ => None,
            };
            for (i, (map, mse)) in out.iter_mut().enumerate() {
                let range = i * frame_len..(i + 1) * frame_len;
                let member_map = match &learned {
                    Some(maps) => maps[i].clone(),
                    None => residual_map(&clean[range.clone()], &self.recon[range.clone()], [c, h, w], anomaly),
                };
                map.iter_mut().zip(member_map).for_each(|(m, v)| *m += share * v);
                *mse += reconstruction_mse(&clean[range.clone()], &self.recon[range]) * share as f64;
            }
        }
        Ok(out)
    }

    /// [`Ensemble::raw_maps`] over a list of model-size frames (`[C, H, W]` each), in
    /// batches of 8; frame `i` is seeded `seed + i`, so results do not depend on batching.
    pub fn raw_maps_of(
        &mut self,
        denoiser: &mut dyn Denoiser,
        graphs: &mut MapGraphs<'_>,
        frames: &[Vec<f32>],
        [c, h, w]: [usize; 3],
        seed: u64,
        anomaly: &AnomalySpec,
    ) -> Result<Vec<(Vec<f32>, f64)>, RuntimeError> {
        const BATCH: usize = 8;
        let mut out = Vec::with_capacity(frames.len());
        for (chunk_index, chunk) in frames.chunks(BATCH).enumerate() {
            let seeds: Vec<u64> =
                (0..chunk.len()).map(|i| seed.wrapping_add((chunk_index * BATCH + i) as u64)).collect();
            out.extend(self.raw_maps(denoiser, graphs, &chunk.concat(), [chunk.len(), c, h, w], &seeds, anomaly)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::runtime::FnDenoiser;
    use crate::model::diffusion::ScheduleSpec;
    use crate::model::sampling::Sampler;

    #[test]
    fn the_head_input_stacks_frame_reconstruction_and_patch_map() {
        // Two frames of one 1×2 channel each, and a 1×2 patch map per frame.
        let (clean, recon, patch) = ([1.0f32, 2.0, 3.0, 4.0], [5.0f32, 6.0, 7.0, 8.0], [9.0f32, 10.0, 11.0, 12.0]);
        assert_eq!(head_input(&clean, &recon, None, 2), [1.0, 2.0, 5.0, 6.0, 3.0, 4.0, 7.0, 8.0]);
        let with_patch = head_input(&clean, &recon, Some(&patch), 2);
        assert_eq!(with_patch, [1.0, 2.0, 5.0, 6.0, 9.0, 10.0, 3.0, 4.0, 7.0, 8.0, 11.0, 12.0]);
    }

    /// Predicts half the noisy input as noise: deterministic, input-dependent, cheap.
    fn half() -> FnDenoiser<impl FnMut(usize, f32, usize) -> f32> {
        FnDenoiser(|_, x, _| 0.5 * x)
    }

    #[test]
    fn an_ensemble_averages_its_members_maps() {
        let schedule = NoiseSchedule::new(&ScheduleSpec::default()).unwrap();
        let primary = ReconstructionSpec { t0: 10, steps: 2, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 };
        let clean: Vec<f32> = (0..2 * 8 * 8).map(|i| ((i as f32) * 0.3).sin() * 0.7).collect();
        let (shape, seeds, spec) = ([2, 1, 8, 8], [4, 9], AnomalySpec::default());
        let single = |t0: usize| {
            let mut e = Ensemble::new(&schedule, ReconstructionSpec { t0, ..primary }, &[]).unwrap();
            e.raw_maps(&mut half(), &mut MapGraphs::default(), &clean, shape, &seeds, &spec).unwrap()
        };
        let (a, b) = (single(10), single(60));
        let mut both = Ensemble::new(&schedule, primary, &[60]).unwrap();
        assert_eq!(both.unet_calls(), 4);
        let averaged = both.raw_maps(&mut half(), &mut MapGraphs::default(), &clean, shape, &seeds, &spec).unwrap();
        for frame in 0..2 {
            assert!(a[frame].0 != b[frame].0, "members should differ");
            for p in 0..64 {
                let want = (a[frame].0[p] + b[frame].0[p]) / 2.0;
                assert!((averaged[frame].0[p] - want).abs() < 1e-6);
            }
            assert!((averaged[frame].1 - (a[frame].1 + b[frame].1) / 2.0).abs() < 1e-9);
        }
        assert!(Ensemble::new(&schedule, primary, &[5000]).is_err(), "a member t0 beyond the schedule");
    }
}
