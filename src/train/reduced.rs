//! `retrain --int8` and `--fp16`: reduced-precision copies of a finished bundle's graphs (the
//! UNet, the head and the normal-patch model), shipped beside the f32 ones for
//! `runtime.precision = "int8"` or `"fp16"`, and the quality rule that decides which ship.
//!
//! fp16 copies are a conversion (`model::half`). For int8, each graph's activation scales come from running its observer graph
//! (`model::quantize::observer`) through the shipped rule on the held-out calibration
//! frames — the UNet at the operating point's timesteps, the head on real reconstructions,
//! the patch model on real tiles — so the ranges are the ones inspection meets. The int8
//! graphs then get their own golden checks. Either way the shipped rule is scored with the
//! copies on the search's validation defects against its f32 figures ([`Reducer`] scores
//! those once for both precisions): if a precision loses more than its [`QualityBound`]
//! allows, none of its graphs ships (the report says why).

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::infer::bundle::{BundleError, Staged, sha256_hex};
use crate::infer::ensemble::{Ensemble, MapGraphs};
use serde::{Deserialize, Serialize};

use crate::infer::runtime::{Denoiser, OrtDenoiser, RuntimeConfig, RuntimeError};
use crate::model::diffusion::NoiseSchedule;
use crate::model::half::to_fp16;
use crate::model::manifest::{
    FP16_HEAD_FILE, FP16_ONNX_FILE, FP16_PATCH_FILE, Fp16Graphs, HEAD_FILE, INT8_HEAD_FILE, INT8_ONNX_FILE,
    INT8_PATCH_FILE, Int8Graphs, Manifest, ONNX_FILE, PATCH_FILE, QuantizedGraph, RuleFigures,
};
use crate::model::quantize::{Ranges, observer, quantize};
use crate::postprocess::anomaly::{AnomalySpec, Residual};
use crate::train::export::{pair_golden, unet_golden};
use crate::train::operating_point::shipped_figures;

/// The largest losses of the shipped rule (a reduced precision against f32, on the
/// validation defects) at which its graphs still ship.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QualityBound {
    pub pixel_auroc: f64,
    pub pixel_auprc: f64,
}

impl Default for QualityBound {
    /// 0.01 pixel AUROC (as the cascade's quality rule) and 0.05 pixel AUPRC.
    fn default() -> Self {
        Self { pixel_auroc: 0.01, pixel_auprc: 0.05 }
    }
}

impl QualityBound {
    /// `flag` names the option the bound came from in the error.
    pub fn validate(&self, flag: &str) -> Result<(), String> {
        for (name, v) in [("AUROC", self.pixel_auroc), ("AUPRC", self.pixel_auprc)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{flag}: the pixel {name} loss must be in [0, 1], got {v}"));
            }
        }
        Ok(())
    }

    fn admits(&self, fp32: &RuleFigures, int8: &RuleFigures) -> bool {
        fp32.pixel_auroc - int8.pixel_auroc <= self.pixel_auroc
            && fp32.pixel_auprc - int8.pixel_auprc <= self.pixel_auprc
    }
}

/// Weight prefixes of convolutions that stay f32: the patch model's whitening, whose output
/// is squared into the Mahalanobis distance.
const PATCH_F32: &[&str] = &["patch."];

/// The f32 sessions of the finished bundle and what they run on.
pub struct Finished<'a, 'g> {
    pub unet: &'a mut OrtDenoiser,
    pub graphs: &'a mut MapGraphs<'g>,
    pub frames: &'a [Vec<f32>],
    pub seed: u64,
}

/// One of the bundle's graphs: its f32 file, the files its copies get, and the channels
/// of its input.
struct Graph {
    f32_file: &'static str,
    int8_file: &'static str,
    fp16_file: &'static str,
    channels: usize,
    skip: &'static [&'static str],
}

/// The bundle's graphs, the UNet first, then the head and the patch model where present.
fn graphs_of(manifest: &Manifest) -> [Option<Graph>; 3] {
    let unet = Graph {
        f32_file: ONNX_FILE,
        int8_file: INT8_ONNX_FILE,
        fp16_file: FP16_ONNX_FILE,
        channels: manifest.unet.channels,
        skip: &[],
    };
    let head = manifest.head.as_ref().map(|h| Graph {
        f32_file: HEAD_FILE,
        int8_file: INT8_HEAD_FILE,
        fp16_file: FP16_HEAD_FILE,
        channels: h.input_channels(manifest.input.channels),
        skip: &[],
    });
    let patch = manifest.patch.as_ref().map(|_| Graph {
        f32_file: PATCH_FILE,
        int8_file: INT8_PATCH_FILE,
        fp16_file: FP16_PATCH_FILE,
        channels: 2 * manifest.input.channels,
        skip: PATCH_F32,
    });
    [Some(unet), head, patch]
}

/// What `retrain --int8` or `--fp16` tried and chose, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReducedReport {
    /// The shipped rule's figures at f32 on the validation defects.
    pub fp32: Option<RuleFigures>,
    /// Each set of copies tried, most reduced first, and its figures.
    pub tried: Vec<ReducedTry>,
    /// The graphs whose copies ship (empty: none).
    pub shipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReducedTry {
    pub graphs: Vec<String>,
    pub figures: RuleFigures,
    pub shipped: bool,
}

/// A copy written into the bundle, opened, with its golden statistics.
type Copy = (OrtDenoiser, QuantizedGraph);

/// The copies that ship and the figures they were chosen on.
struct Chosen {
    unet: QuantizedGraph,
    head: Option<QuantizedGraph>,
    patch: Option<QuantizedGraph>,
    fp32: RuleFigures,
    figures: RuleFigures,
}

/// What the copies are made from and scored against: the finished bundle's f32 sessions
/// and the shipped rule's f32 figures, scored once for both precisions.
pub struct Reducer<'a, 'g> {
    graphs: &'a mut MapGraphs<'g>,
    frames: &'a [Vec<f32>],
    seed: u64,
    manifest: &'a Manifest,
    staged: &'a Staged,
    runtime: &'a RuntimeConfig,
    ensemble: Ensemble,
    fp32: RuleFigures,
}

impl<'a, 'g> Reducer<'a, 'g> {
    /// Scores the shipped rule at f32 on the validation defects.
    pub fn new(
        finished: Finished<'a, 'g>,
        manifest: &'a Manifest,
        staged: &'a Staged,
        runtime: &'a RuntimeConfig,
    ) -> Result<Self, BundleError> {
        let Finished { unet, graphs, frames, seed } = finished;
        let mut ensemble = ensemble_of(manifest, staged.path(""))?;
        let shape = shape_of(manifest);
        let fp32 = shipped_figures(unet, graphs, &mut ensemble, frames, shape, seed, &manifest.anomaly)?;
        Ok(Self { graphs, frames, seed, manifest, staged, runtime, ensemble, fp32 })
    }

    /// Quantises the staged bundle's graphs (scales measured through the shipped rule on
    /// the held-out frames) and ships the int8 copies the quality rule admits
    /// ([`Self::choose`]).
    pub fn int8(&mut self, bound: QualityBound, report: &mut ReducedReport) -> Result<Option<Int8Graphs>, BundleError> {
        let (manifest, staged, runtime) = (self.manifest, self.staged, self.runtime);
        let graphs = graphs_of(manifest);
        let (frames, seed, ensemble) = (self.frames, self.seed, &mut self.ensemble);
        let ranges = observe(manifest, staged, runtime, graphs.each_ref().map(Option::as_ref), |unet, observed| {
            let all_tiles = AnomalySpec { screen: None, ..manifest.anomaly };
            ensemble.raw_maps_of(unet, observed, frames, shape_of(manifest), seed, &all_tiles).map(|_| ())
        })?;
        let mut ranges = ranges.into_iter();
        let copies = copies_of(manifest, staged, runtime, &graphs, |g, onnx| {
            let ranges = ranges.next().expect("one range table per graph");
            (g.int8_file, quantize(onnx, &ranges, g.skip))
        })?;
        let chosen = self.choose(copies, bound, report)?;
        remove_unshipped(staged, &graphs, chosen.as_ref(), |g| g.int8_file)?;
        Ok(chosen.map(|c| Int8Graphs {
            unet: c.unet,
            head: c.head,
            patch: c.patch,
            calibration_frames: self.frames.len(),
            fp32: c.fp32,
            int8: c.figures,
            max_pixel_auroc_loss: bound.pixel_auroc,
            max_pixel_auprc_loss: bound.pixel_auprc,
        }))
    }

    /// Converts the staged bundle's graphs to fp16 (`model::half`) and ships the copies the
    /// quality rule admits ([`Self::choose`]).
    pub fn fp16(&mut self, bound: QualityBound, report: &mut ReducedReport) -> Result<Option<Fp16Graphs>, BundleError> {
        let graphs = graphs_of(self.manifest);
        let copies =
            copies_of(self.manifest, self.staged, self.runtime, &graphs, |g, onnx| (g.fp16_file, to_fp16(onnx)))?;
        let chosen = self.choose(copies, bound, report)?;
        remove_unshipped(self.staged, &graphs, chosen.as_ref(), |g| g.fp16_file)?;
        Ok(chosen.map(|c| Fp16Graphs {
            unet: c.unet,
            head: c.head,
            patch: c.patch,
            fp32: c.fp32,
            fp16: c.figures,
            max_pixel_auroc_loss: bound.pixel_auroc,
            max_pixel_auprc_loss: bound.pixel_auprc,
        }))
    }

    /// Scores the shipped rule with the copies against its f32 figures: all of them first,
    /// then with the patch model left f32 (its distance is the most sensitive to precision).
    /// The first set within `bound` is chosen.
    fn choose(
        &mut self,
        copies: [Option<Copy>; 3],
        bound: QualityBound,
        report: &mut ReducedReport,
    ) -> Result<Option<Chosen>, BundleError> {
        let manifest = self.manifest;
        let [unet_copy, mut head_copy, mut patch_copy] = copies;
        let mut unet_copy = unet_copy.expect("the UNet always has a copy");
        let fp32 = self.fp32;
        report.fp32 = Some(fp32);
        let has_head = head_copy.is_some();
        let names = |patch_reduced: bool| {
            let mut n = vec!["unet".to_string()];
            n.extend(has_head.then(|| "head".to_string()));
            n.extend(patch_reduced.then(|| "patch".to_string()));
            n
        };
        let tries: &[bool] = if patch_copy.is_some() { &[true, false] } else { &[true] };
        for &patch_reduced in tries {
            let head_graph = head_copy.as_mut().map(|q| &mut q.0 as &mut dyn Denoiser);
            let patch_graph = match patch_copy.as_mut().filter(|_| patch_reduced) {
                Some(q) => Some(&mut q.0 as &mut dyn Denoiser),
                None => self.graphs.patch.as_mut().map(|g| &mut **g as &mut dyn Denoiser),
            };
            let mut mixed = rule_graphs(manifest, head_graph, patch_graph, self.graphs.head_patch);
            let figures = shipped_figures(
                &mut unet_copy.0,
                &mut mixed,
                &mut self.ensemble,
                self.frames,
                shape_of(manifest),
                self.seed,
                &manifest.anomaly,
            )?;
            let shipped = bound.admits(&fp32, &figures);
            tracing::info!(graphs = ?names(patch_reduced), ?fp32, ?figures, ?bound, shipped, "Reduced-precision graphs scored against f32 on the validation defects.");
            report.tried.push(ReducedTry { graphs: names(patch_reduced), figures, shipped });
            if shipped {
                report.shipped = names(patch_reduced);
                return Ok(Some(Chosen {
                    unet: unet_copy.1,
                    head: head_copy.map(|q| q.1),
                    patch: patch_copy.filter(|_| patch_reduced).map(|q| q.1),
                    fp32,
                    figures,
                }));
            }
        }
        tracing::warn!(?bound, "Reduced-precision graphs lose too much quality: none shipped.");
        Ok(None)
    }
}

fn shape_of(manifest: &Manifest) -> [usize; 3] {
    [manifest.input.channels, manifest.input.height, manifest.input.width]
}

/// Each graph's copy made by `rewrite` (its file and bytes), written, opened and given its
/// own golden statistics.
fn copies_of(
    manifest: &Manifest,
    staged: &Staged,
    runtime: &RuntimeConfig,
    graphs: &[Option<Graph>; 3],
    mut rewrite: impl FnMut(&Graph, &[u8]) -> (&'static str, Result<Vec<u8>, String>),
) -> Result<[Option<Copy>; 3], BundleError> {
    let mut copies = [None, None, None];
    for (i, g) in graphs.iter().enumerate() {
        let Some(g) = g else { continue };
        let path = staged.path(g.f32_file);
        let inconsistent = |what: String| BundleError::Inconsistent { path: path.clone(), what };
        let onnx = std::fs::read(&path).map_err(|e| inconsistent(e.to_string()))?;
        let (file, bytes) = rewrite(g, &onnx);
        let bytes = bytes.map_err(inconsistent)?;
        staged.write(file, &bytes)?;
        let mut session = OrtDenoiser::load(&staged.path(file), g.channels, runtime)?;
        let golden = if i == 0 {
            unet_golden(&mut session, manifest, &manifest.golden.timesteps)?
        } else {
            pair_golden(&mut session, manifest, g.channels)?
        };
        copies[i] = Some((session, QuantizedGraph { onnx: file.into(), sha256: sha256_hex(&bytes), golden }));
    }
    Ok(copies)
}

/// Removes the copy files that do not ship (all of them when nothing was chosen).
fn remove_unshipped(
    staged: &Staged,
    graphs: &[Option<Graph>; 3],
    chosen: Option<&Chosen>,
    file: impl Fn(&Graph) -> &'static str,
) -> Result<(), BundleError> {
    let kept = chosen.map_or([false; 3], |c| [true, c.head.is_some(), c.patch.is_some()]);
    for (g, kept) in graphs.iter().zip(kept) {
        if let Some(g) = g.as_ref().filter(|_| !kept) {
            staged.remove(file(g))?;
        }
    }
    Ok(())
}

/// Runs `run` with observer sessions of `graphs` (the UNet first, then the head and the
/// patch model where present, as the shipped rule uses them) and returns each one's ranges.
fn observe(
    manifest: &Manifest,
    staged: &Staged,
    runtime: &RuntimeConfig,
    graphs: [Option<&Graph>; 3],
    run: impl FnOnce(&mut OrtDenoiser, &mut MapGraphs<'_>) -> Result<(), RuntimeError>,
) -> Result<Vec<Ranges>, BundleError> {
    let [unet, head, patch] = graphs;
    let mut observers = Observers::default();
    let mut unet_obs = observers.open(unet.expect("the UNet is always quantised"), staged, runtime)?;
    let mut head_obs = head.map(|g| observers.open(g, staged, runtime)).transpose()?;
    let mut patch_obs = patch.map(|g| observers.open(g, staged, runtime)).transpose()?;
    let head_patch = manifest.head.as_ref().and_then(|h| h.patch_channel);
    let head_graph = head_obs.as_mut().map(|g| g as &mut dyn Denoiser);
    let patch_graph = patch_obs.as_mut().map(|g| g as &mut dyn Denoiser);
    run(&mut unet_obs, &mut rule_graphs(manifest, head_graph, patch_graph, head_patch))?;
    drop((unet_obs, head_obs, patch_obs));
    Ok(observers.ranges())
}

/// The observer sessions' ranges, one table per graph in the order they were opened.
#[derive(Default)]
struct Observers(Vec<Arc<Mutex<Ranges>>>);

impl Observers {
    fn open(&mut self, g: &Graph, staged: &Staged, runtime: &RuntimeConfig) -> Result<OrtDenoiser, BundleError> {
        let path = staged.path(g.f32_file);
        let onnx =
            std::fs::read(&path).map_err(|e| BundleError::Inconsistent { path: path.clone(), what: e.to_string() })?;
        let (graph, _) =
            observer(&onnx, g.skip).map_err(|what| BundleError::Inconsistent { path: path.clone(), what })?;
        let mut session = OrtDenoiser::from_memory(&graph, &path, g.channels, runtime)?;
        let ranges = Arc::new(Mutex::new(Ranges::default()));
        let sink = Arc::clone(&ranges);
        session
            .observe(Box::new(move |name, values| sink.lock().expect("only the observer locks").observe(name, values)));
        self.0.push(ranges);
        Ok(session)
    }

    fn ranges(self) -> Vec<Ranges> {
        self.0.into_iter().map(|r| r.lock().expect("the observers are gone").clone()).collect()
    }
}

/// The map graphs of `manifest`'s rule made of these sessions.
fn rule_graphs<'g>(
    manifest: &Manifest,
    head: Option<&'g mut dyn Denoiser>,
    patch: Option<&'g mut dyn Denoiser>,
    head_patch: Option<[f64; 2]>,
) -> MapGraphs<'g> {
    let (rule, patch) = match manifest.anomaly.residual {
        Residual::Head => (head, patch),
        Residual::Patch => (patch, None),
        _ => (None, patch),
    };
    MapGraphs { rule, patch, head_patch }
}

fn ensemble_of(manifest: &Manifest, bundle: impl AsRef<Path>) -> Result<Ensemble, BundleError> {
    let schedule = NoiseSchedule::new(&manifest.schedule).expect("validated");
    Ensemble::new(&schedule, manifest.reconstruction, manifest.extra_t0())
        .map_err(|e| BundleError::Inconsistent { path: bundle.as_ref().to_path_buf(), what: e.to_string() })
}
