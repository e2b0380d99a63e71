//! A batch of prepared frames through the model: reconstruction, then post-processing.
//!
//! This is the one inspection path: `infer`, `eval` and the daemon's inference worker
//! all call [`Inspector::inspect`], and `retrain`'s calibration scores through the same
//! [`Ensemble`], so a verdict means the same everywhere. Frames larger than the model's
//! input are inspected in overlapping tiles (`infer::tiling`) and their maps stitched.
//!
//! An operating point may reconstruct each frame at several t0 (the manifest's
//! `ensemble.extra_t0`, AnoDDPM-style): each member's dissimilarity map is computed, the
//! maps are averaged, and smoothing, scores and mask run on the average. Every member uses
//! the frame's own seed, so a one-member ensemble is exactly a plain reconstruction.

use std::path::PathBuf;

use crate::infer::bundle::{Bundle, BundleError};
use crate::infer::reconstruct::Reconstructor;
use crate::infer::runtime::{Denoiser, OrtDenoiser, RuntimeError};
use crate::infer::tiling::{Tile, TileGrid, tile_seed};
use crate::model::diffusion::NoiseSchedule;
use crate::model::manifest::Manifest;
use crate::model::preprocess::Inspection;
use crate::model::sampling::{ReconstructionError, ReconstructionSpec};
#[cfg(doc)]
use crate::postprocess::anomaly::Threshold;
use crate::postprocess::anomaly::{Analysis, AnomalySpec, Residual, reconstruction_mse, residual_map, verdict};

/// Stacks frames and reconstructions channel-wise: `[n, 2C, H, W]`, the head's input.
pub fn head_input(clean: &[f32], recon: &[f32], n: usize) -> Vec<f32> {
    let frame_len = clean.len() / n;
    let mut out = Vec::with_capacity(2 * clean.len());
    for i in 0..n {
        out.extend_from_slice(&clean[i * frame_len..(i + 1) * frame_len]);
        out.extend_from_slice(&recon[i * frame_len..(i + 1) * frame_len]);
    }
    out
}

/// Per frame of `clean`/`recon` (`[n, C, H, W]`), the head's defect probability: the
/// sigmoid of its output channel 0 (timestep input 0).
pub fn head_maps(
    head: &mut dyn Denoiser,
    clean: &[f32],
    recon: &[f32],
    shape: [usize; 4],
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    pair_maps(head, clean, recon, shape, 0, |z| 1.0 / (1.0 + (-z).exp()))
}

/// Per frame of `clean`/`recon` (`[n, C, H, W]`), the feature distance computed by the
/// `features` graph (`model::onnx_export::export_feature_onnx`) at timestep `t`.
pub fn feature_maps(
    features: &mut dyn Denoiser,
    clean: &[f32],
    recon: &[f32],
    shape: [usize; 4],
    t: usize,
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    pair_maps(features, clean, recon, shape, t, |d| d)
}

/// Runs a graph of the head's contract (frame ‖ reconstruction in, the map in output
/// channel 0) at timestep `t` and maps channel 0 of each frame through `value`.
fn pair_maps(
    graph: &mut dyn Denoiser,
    clean: &[f32],
    recon: &[f32],
    [n, c, h, w]: [usize; 4],
    t: usize,
    value: impl Fn(f32) -> f32,
) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let input = head_input(clean, recon, n);
    let mut maps = Vec::with_capacity(n);
    graph.predict_eps(&input, [n, 2 * c, h, w], &vec![t as f32; n], &mut |out| {
        let frame_out = 2 * c * h * w;
        maps.extend((0..n).map(|i| out[i * frame_out..i * frame_out + h * w].iter().map(|&v| value(v)).collect()));
    })?;
    Ok(maps)
}

/// The graphs a map rule may need beside the denoiser.
#[derive(Default)]
pub struct MapGraphs<'a> {
    /// The rule's own graph: the head, the feature distance or the normal-patch model.
    pub rule: Option<&'a mut dyn Denoiser>,
    /// The normal-patch model, when the rule fuses its map in (`AnomalySpec::fusion`).
    pub patch: Option<&'a mut dyn Denoiser>,
}

impl<'a> MapGraphs<'a> {
    /// Just the rule's graph.
    pub fn rule(graph: Option<&'a mut dyn Denoiser>) -> Self {
        Self { rule: graph, patch: None }
    }
}

/// The reconstructions of one operating point: the primary setting and one member per
/// extra t0 (same sampler, steps and conditioning).
pub struct Ensemble {
    members: Vec<Reconstructor>,
    recon: Vec<f32>,
}

impl Ensemble {
    pub fn new(
        schedule: &NoiseSchedule,
        primary: ReconstructionSpec,
        extra_t0: &[usize],
    ) -> Result<Self, ReconstructionError> {
        let specs = std::iter::once(primary).chain(extra_t0.iter().map(|&t0| ReconstructionSpec { t0, ..primary }));
        let members = specs.map(|spec| Reconstructor::new(schedule.clone(), spec)).collect::<Result<_, _>>()?;
        Ok(Self { members, recon: Vec::new() })
    }

    /// The primary member's settings.
    pub fn spec(&self) -> &ReconstructionSpec {
        self.members[0].spec()
    }

    /// UNet evaluations per frame, all members together.
    pub fn unet_calls(&self) -> usize {
        self.members.iter().map(Reconstructor::unet_calls).sum()
    }

    /// Per frame of `clean [n, C, H, W]`: the members' averaged raw dissimilarity map under
    /// `anomaly` (the `map_graph` computes it for [`Residual::Head`], the head, and
    /// [`Residual::Feature`], the feature distance, and [`Residual::Patch`], the normal-patch
    /// model), and their mean reconstruction MSE. With `anomaly.fusion`, the patch model's
    /// map (`graphs.patch`, computed once: it reads only the frame) is fused into the average.
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
        let frame_len = c * h * w;
        let mut out = vec![(vec![0.0f32; h * w], 0.0f64); n];
        let share = 1.0 / self.members.len() as f32;
        self.recon.resize(clean.len(), 0.0);
        for member in &mut self.members {
            member.reconstruct(denoiser, clean, shape, seeds, &mut self.recon)?;
            let learned = match (anomaly.residual, graphs.rule.as_mut()) {
                (Residual::Head, Some(head)) => Some(head_maps(&mut **head, clean, &self.recon, shape)?),
                (Residual::Feature, Some(features)) => {
                    Some(feature_maps(&mut **features, clean, &self.recon, shape, anomaly.feature_t)?)
                }
                (Residual::Patch, Some(patch)) => Some(pair_maps(&mut **patch, clean, &self.recon, shape, 0, |d| d)?),
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
        if let Some(fusion) = &anomaly.fusion {
            let patch = graphs.patch.as_mut().expect("a fused map rule needs the patch model's graph");
            let patch_maps = pair_maps(&mut **patch, clean, clean, shape, 0, |d| d)?;
            for ((map, _), patch_map) in out.iter_mut().zip(patch_maps) {
                fusion.fuse(map, &patch_map);
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

/// A prepared frame: `[C, H, W]` model-space values and its `[H, W]`.
#[derive(Debug, Clone, Copy)]
pub struct FrameView<'a> {
    pub tensor: &'a [f32],
    pub size: [usize; 2],
    /// The operator's sensitivity for this frame's camera (1 = as calibrated): it scales
    /// the pixel and image thresholds alike ([`Threshold::at_sensitivity`]).
    pub sensitivity: f64,
}

impl<'a> FrameView<'a> {
    /// A frame at the calibrated thresholds (sensitivity 1).
    pub fn new(tensor: &'a [f32], size: [usize; 2]) -> Self {
        Self { tensor, size, sensitivity: 1.0 }
    }
}

/// A model (denoiser, the graph of a head or feature map rule, manifest) with its
/// reconstruction ensemble and reusable batch buffers. Generic over the [`Denoiser`], so
/// the stages around it are unit-tested with a fake; the daemon, `infer` and `eval` use
/// [`OrtDenoiser`] sessions from a [`Bundle`].
pub struct Inspector<D: Denoiser = OrtDenoiser> {
    /// Where the model came from, for error messages.
    dir: PathBuf,
    manifest: Manifest,
    denoiser: D,
    /// Computes the map for the head, feature and patch rules.
    map_graph: Option<D>,
    /// The normal-patch model, when the rule fuses its map in.
    patch_graph: Option<D>,
    ensemble: Ensemble,
    /// Tiles per UNet batch.
    tile_batch: usize,
    batch: Vec<f32>,
    tile: Vec<f32>,
    /// Called after every UNet batch of tiles: a long frame shows progress (the daemon's
    /// watchdog) while it is still being inspected.
    progress: Option<Box<dyn FnMut() + Send>>,
}

impl Inspector<OrtDenoiser> {
    /// `spec` overrides the manifest's primary reconstruction settings; the manifest's
    /// ensemble members follow it (same sampler, steps, conditioning). Tiles are
    /// reconstructed 8 at a time unless [`Inspector::with_tile_batch`] says otherwise.
    pub fn new(bundle: Bundle, spec: Option<ReconstructionSpec>) -> Result<Self, BundleError> {
        let (map_graph, patch_graph) = match bundle.manifest.anomaly.residual {
            Residual::Head => (bundle.head, bundle.patch),
            Residual::Feature => (bundle.features, bundle.patch),
            Residual::Patch => (bundle.patch, None),
            _ => (None, bundle.patch),
        };
        let patch_graph = patch_graph.filter(|_| bundle.manifest.anomaly.fusion.is_some());
        Self::from_parts(bundle.dir, bundle.manifest, bundle.denoiser, map_graph, spec)?.with_patch_graph(patch_graph)
    }
}

impl<D: Denoiser> Inspector<D> {
    /// An inspector over any denoiser (and the graph of its head or feature map rule) for
    /// `manifest`; see [`Inspector::new`].
    pub fn from_parts(
        dir: PathBuf,
        manifest: Manifest,
        denoiser: D,
        map_graph: Option<D>,
        spec: Option<ReconstructionSpec>,
    ) -> Result<Self, BundleError> {
        let inconsistent = |what: String| BundleError::Inconsistent { path: dir.clone(), what };
        let schedule = NoiseSchedule::new(&manifest.schedule).map_err(|e| inconsistent(e.to_string()))?;
        let residual = manifest.anomaly.residual;
        if matches!(residual, Residual::Head | Residual::Feature | Residual::Patch) && map_graph.is_none() {
            return Err(inconsistent(format!("the {} map rule needs its graph", residual.name())));
        }
        let primary = spec.unwrap_or(manifest.reconstruction);
        let ensemble = Ensemble::new(&schedule, primary, manifest.extra_t0())
            .map_err(|e| inconsistent(format!("reconstruction: {e}")))?;
        if manifest.anomaly.fusion.is_some() && residual == Residual::Patch {
            return Err(inconsistent("the patch map rule cannot fuse the patch map into itself".into()));
        }
        Ok(Self {
            dir,
            manifest,
            denoiser,
            map_graph,
            patch_graph: None,
            ensemble,
            tile_batch: 8,
            batch: Vec::new(),
            tile: Vec::new(),
            progress: None,
        })
    }

    /// Sets the normal-patch model's graph that a fused rule needs; a fused rule without
    /// it is an error.
    pub fn with_patch_graph(mut self, graph: Option<D>) -> Result<Self, BundleError> {
        if self.manifest.anomaly.fusion.is_some() && graph.is_none() {
            return Err(BundleError::Inconsistent {
                path: self.dir.clone(),
                what: "the fused map rule needs the bundle's normal-patch model ([patch])".into(),
            });
        }
        self.patch_graph = graph;
        Ok(self)
    }

    /// Calls `progress` after every UNet batch of tiles.
    pub fn with_progress(mut self, progress: impl FnMut() + Send + 'static) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// Sets how many tiles (across frames) share one UNet batch.
    pub fn with_tile_batch(mut self, tiles: usize) -> Self {
        self.tile_batch = tiles.max(1);
        self
    }

    /// The same model at other primary reconstruction settings (the manifest's ensemble
    /// members follow them).
    pub fn with_spec(self, spec: ReconstructionSpec) -> Result<Self, BundleError> {
        let (tile_batch, progress, patch_graph) = (self.tile_batch, self.progress, self.patch_graph);
        let mut rebuilt = Self::from_parts(self.dir, self.manifest, self.denoiser, self.map_graph, Some(spec))?;
        rebuilt.tile_batch = tile_batch;
        rebuilt.progress = progress;
        rebuilt.patch_graph = patch_graph;
        Ok(rebuilt)
    }

    /// Drops the manifest's ensemble members: only the primary reconstruction runs.
    pub fn without_ensemble(mut self) -> Result<Self, BundleError> {
        let spec = *self.spec();
        self.manifest.ensemble = None;
        self.with_spec(spec)
    }

    /// The denoiser (e.g. to ask an ONNX Runtime session for its provider).
    pub fn denoiser(&self) -> &D {
        &self.denoiser
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The primary reconstruction's settings.
    pub fn spec(&self) -> &ReconstructionSpec {
        self.ensemble.spec()
    }

    /// UNet evaluations per tile.
    pub fn unet_calls(&self) -> usize {
        self.ensemble.unet_calls()
    }

    /// The tiles of a prepared frame of `size`: one for a model-size frame; overlapping
    /// tiles `stride` apart for a tiled model.
    pub fn tile_grid(&self, size: [usize; 2]) -> TileGrid {
        let input = self.manifest.input;
        let tile = [input.height, input.width];
        assert!(
            size[0] >= tile[0] && size[1] >= tile[1],
            "inspect: a {size:?} frame is smaller than one {tile:?} tile"
        );
        let stride = match self.manifest.inspection {
            Inspection::Tiled { stride, .. } => [stride, stride],
            Inspection::Resize => {
                assert_eq!(size, tile, "inspect: a resize model takes frames of its input size");
                tile
            }
        };
        TileGrid::new(size, tile, stride)
    }

    /// Inspects prepared frames (`InputSpec::prepare_for` the manifest's inspection);
    /// `seeds[i]` seeds frame `i`, tile `k` of it uses `tile_seed(seeds[i], k)`. Tiles of
    /// all frames share batches; maps are stitched per frame before post-processing, so
    /// each verdict is at the prepared frame's resolution.
    pub fn inspect(&mut self, frames: &[FrameView<'_>], seeds: &[u64]) -> Result<Vec<Analysis>, RuntimeError> {
        assert_eq!(frames.len(), seeds.len(), "inspect: one seed per frame");
        let input = self.manifest.input;
        let channels = input.channels;
        for f in frames {
            assert_eq!(
                f.tensor.len(),
                channels * f.size[0] * f.size[1],
                "inspect: tensor is not {channels}x{:?}",
                f.size
            );
        }
        let grids: Vec<TileGrid> = frames.iter().map(|f| self.tile_grid(f.size)).collect();
        let mut stitchers: Vec<_> = grids.iter().map(TileGrid::stitcher).collect();
        let mut mse = vec![0.0f64; frames.len()];
        let jobs: Vec<(usize, Tile)> =
            grids.iter().enumerate().flat_map(|(f, g)| g.tiles.iter().map(move |t| (f, *t))).collect();
        for chunk in jobs.chunks(self.tile_batch) {
            self.batch.clear();
            let mut tile_seeds = Vec::with_capacity(chunk.len());
            for &(f, t) in chunk {
                grids[f].cut(frames[f].tensor, channels, t, &mut self.tile);
                self.batch.extend_from_slice(&self.tile);
                tile_seeds.push(tile_seed(seeds[f], t.index));
            }
            let mut graphs = MapGraphs {
                rule: self.map_graph.as_mut().map(|g| g as &mut dyn Denoiser),
                patch: self.patch_graph.as_mut().map(|g| g as &mut dyn Denoiser),
            };
            let maps = self.ensemble.raw_maps(
                &mut self.denoiser,
                &mut graphs,
                &self.batch,
                [chunk.len(), channels, input.height, input.width],
                &tile_seeds,
                &self.manifest.anomaly,
            )?;
            for (&(f, t), (map, tile_mse)) in chunk.iter().zip(maps) {
                stitchers[f].add(t, &map);
                mse[f] += tile_mse / grids[f].tiles.len() as f64;
            }
            if let Some(progress) = &mut self.progress {
                progress();
            }
        }
        let manifest = &self.manifest;
        Ok(stitchers
            .into_iter()
            .zip(frames.iter().zip(mse))
            .map(|(stitcher, (frame, mse))| {
                verdict(
                    stitcher.finish(),
                    mse,
                    frame.size,
                    input.height * input.width,
                    &manifest.anomaly,
                    &manifest.thresholds.pixel.at_sensitivity(frame.sensitivity),
                    &manifest.thresholds.image.at_sensitivity(frame.sensitivity),
                )
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::runtime::FnDenoiser;
    use crate::model::diffusion::ScheduleSpec;
    use crate::model::sampling::Sampler;

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
