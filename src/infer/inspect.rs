//! A batch of prepared frames through the model: reconstruction, then post-processing.
//!
//! This is the one inspection path: `infer`, `eval` and the daemon's inference worker
//! all call [`Inspector::inspect`], and `retrain`'s calibration scores through the same
//! [`Ensemble`], so a verdict means the same everywhere. Frames larger than the model's
//! input are inspected in overlapping tiles (`infer::tiling`), the raw maps of the tiles
//! (`infer::ensemble`) stitched, and each frame post-processed once, at its camera's
//! sensitivity.

use std::path::PathBuf;

use crate::infer::bundle::{Bundle, BundleError};
use crate::infer::ensemble::{Ensemble, MapGraphs};
use crate::infer::runtime::{Denoiser, OrtDenoiser, RuntimeError};
use crate::infer::tiling::{Tile, TileGrid, tile_seed};
use crate::model::diffusion::NoiseSchedule;
use crate::model::manifest::Manifest;
use crate::model::preprocess::Inspection;
use crate::model::sampling::ReconstructionSpec;
#[cfg(doc)]
use crate::postprocess::anomaly::Threshold;
use crate::postprocess::anomaly::{Analysis, Residual, verdict};

/// A prepared frame: `[C, H, W]` model-space values and its `[H, W]`.
#[derive(Debug, Clone, Copy)]
pub struct FrameView<'a> {
    pub tensor: &'a [f32],
    pub size: [usize; 2],
    /// The operator's sensitivity for this frame's camera (1 = as calibrated): it scales
    /// the pixel and image thresholds alike ([`Threshold::at_sensitivity`]).
    pub sensitivity: f64,
    /// The camera's inspection mask at `size` (1 = inspected): tiles without an inspected
    /// pixel are not computed, and pixels outside it score the calibration's lowest.
    pub inspect: Option<&'a [u8]>,
}

impl<'a> FrameView<'a> {
    /// A whole frame at the calibrated thresholds (sensitivity 1).
    pub fn new(tensor: &'a [f32], size: [usize; 2]) -> Self {
        Self { tensor, size, sensitivity: 1.0, inspect: None }
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
    /// Tiles inspected since this inspector was made or its spec changed.
    tiles: usize,
}

impl Inspector<OrtDenoiser> {
    /// `spec` overrides the manifest's primary reconstruction settings; the manifest's
    /// ensemble members follow it (same sampler, steps, conditioning). Tiles are
    /// reconstructed 8 at a time unless [`Inspector::with_tile_batch`] says otherwise.
    pub fn new(mut bundle: Bundle, spec: Option<ReconstructionSpec>) -> Result<Self, BundleError> {
        let (map_graph, patch_graph) = rule_graphs(&mut bundle);
        Self::from_parts(bundle.dir, bundle.manifest, bundle.denoiser, map_graph, spec)?.with_patch_graph(patch_graph)
    }
}

/// Takes out of `bundle` the graphs its map rule runs beside the denoiser: the rule's own
/// graph (head, feature distance or patch model) and the patch model where the rule fuses
/// its map or the head reads it.
pub fn rule_graphs(bundle: &mut Bundle) -> (Option<OrtDenoiser>, Option<OrtDenoiser>) {
    let (map_graph, patch_graph) = match bundle.manifest.anomaly.residual {
        Residual::Head => (bundle.head.take(), bundle.patch.take()),
        Residual::Feature => (bundle.features.take(), bundle.patch.take()),
        Residual::Patch => (bundle.patch.take(), None),
        _ => (None, bundle.patch.take()),
    };
    (map_graph, patch_graph.filter(|_| needs_patch_graph(&bundle.manifest)))
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
            tiles: 0,
        })
    }

    /// Sets the normal-patch model's graph that a fused rule or a head that reads the patch
    /// map needs; such a rule without it is an error.
    pub fn with_patch_graph(mut self, graph: Option<D>) -> Result<Self, BundleError> {
        if needs_patch_graph(&self.manifest) && graph.is_none() {
            return Err(BundleError::Inconsistent {
                path: self.dir.clone(),
                what: "the map rule (fused, or a head that reads the patch map) needs the bundle's \
                       normal-patch model ([patch])"
                    .into(),
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

    /// Tiles per UNet call.
    pub fn tile_batch(&self) -> usize {
        self.tile_batch
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

    /// Tiles inspected, and of those the screen declared clean (`anomaly.screen`: not
    /// reconstructed), since this inspector was made or its spec changed.
    pub fn tile_counts(&self) -> [usize; 2] {
        [self.tiles, self.ensemble.screened()]
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
            assert!(f.inspect.is_none_or(|m| m.len() == f.size[0] * f.size[1]), "inspect: mask is not {:?}", f.size);
        }
        let grids: Vec<TileGrid> = frames.iter().map(|f| self.tile_grid(f.size)).collect();
        let mut stitchers: Vec<_> = grids.iter().map(TileGrid::stitcher).collect();
        let mut mse = vec![0.0f64; frames.len()];
        let jobs: Vec<(usize, Tile)> = grids
            .iter()
            .zip(frames)
            .enumerate()
            .flat_map(|(f, (g, frame))| {
                let inspected = move |t: &&Tile| frame.inspect.is_none_or(|mask| g.inspects(**t, mask));
                g.tiles.iter().filter(inspected).map(move |t| (f, *t))
            })
            .collect();
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
                head_patch: head_patch(&self.manifest),
            };
            let maps = self.ensemble.raw_maps(
                &mut self.denoiser,
                &mut graphs,
                &self.batch,
                [chunk.len(), channels, input.height, input.width],
                &tile_seeds,
                &self.manifest.anomaly,
            )?;
            self.tiles += chunk.len();
            for (&(f, t), (map, tile_mse)) in chunk.iter().zip(maps) {
                stitchers[f].add(t, &map);
                mse[f] += tile_mse / grids[f].tiles.len() as f64;
            }
            if let Some(progress) = &mut self.progress {
                progress();
            }
        }
        let manifest = &self.manifest;
        // Outside a mask, the lowest pixel score of the calibration's normal frames.
        let fill = manifest.thresholds.pixel.min as f32;
        Ok(stitchers
            .into_iter()
            .zip(frames.iter().zip(mse))
            .map(|(stitcher, (frame, mse))| {
                let map = match frame.inspect {
                    Some(mask) => stitcher.finish_masked(mask, fill),
                    None => stitcher.finish(),
                };
                verdict(
                    map,
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
/// The patch map's standardisation where the manifest's rule is a head that reads it.
fn head_patch(manifest: &Manifest) -> Option<[f64; 2]> {
    manifest.head.as_ref().and_then(|h| h.patch_channel).filter(|_| manifest.anomaly.residual == Residual::Head)
}

/// Whether the manifest's rule needs the normal-patch model's graph beside its own: fused
/// with the patch map, or a head that reads it.
fn needs_patch_graph(manifest: &Manifest) -> bool {
    manifest.anomaly.fusion.is_some() || head_patch(manifest).is_some()
}
