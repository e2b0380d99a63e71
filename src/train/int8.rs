//! `retrain --int8`: int8 copies of a finished bundle's graphs (the UNet, the head and the
//! normal-patch model), shipped beside the f32 ones for `runtime.precision = "int8"`.
//!
//! Each graph's activation scales come from running its observer graph
//! (`model::quantize::observer`) through the shipped rule on the held-out calibration
//! frames — the UNet at the operating point's timesteps, the head on real reconstructions,
//! the patch model on real tiles — so the ranges are the ones inspection meets. The int8
//! graphs then get their own golden checks, and the shipped rule is scored at both
//! precisions on the search's validation defects: if int8 loses more than the
//! [`Int8Bound`] allows, no int8 graph ships (the report says why).

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::infer::bundle::{BundleError, Staged, sha256_hex};
use crate::infer::ensemble::{Ensemble, MapGraphs};
use serde::{Deserialize, Serialize};

use crate::infer::runtime::{Denoiser, OrtDenoiser, RuntimeConfig, RuntimeError};
use crate::model::diffusion::NoiseSchedule;
use crate::model::manifest::{
    GoldenCheck, HEAD_FILE, INT8_HEAD_FILE, INT8_ONNX_FILE, INT8_PATCH_FILE, Int8Graphs, Manifest, ONNX_FILE,
    PATCH_FILE, QuantizedGraph, RuleFigures,
};
use crate::model::quantize::{Ranges, observer, quantize};
use crate::postprocess::anomaly::{AnomalySpec, Residual};
use crate::train::export::{pair_golden, unet_golden};
use crate::train::operating_point::shipped_figures;

/// The largest losses of the shipped rule (int8 against f32, on the validation defects)
/// at which int8 graphs still ship.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Int8Bound {
    pub pixel_auroc: f64,
    pub pixel_auprc: f64,
}

impl Default for Int8Bound {
    /// 0.01 pixel AUROC (as the cascade's quality rule) and 0.05 pixel AUPRC.
    fn default() -> Self {
        Self { pixel_auroc: 0.01, pixel_auprc: 0.05 }
    }
}

impl Int8Bound {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [("AUROC", self.pixel_auroc), ("AUPRC", self.pixel_auprc)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("--int8-max-loss: the pixel {name} loss must be in [0, 1], got {v}"));
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

/// One of the bundle's graphs: its f32 file, the int8 file it gets, and the channels of
/// its input.
struct Graph {
    f32_file: &'static str,
    int8_file: &'static str,
    channels: usize,
    skip: &'static [&'static str],
}

/// What `retrain --int8` tried and chose, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Int8Report {
    /// The shipped rule's figures at f32 on the validation defects.
    pub fp32: Option<RuleFigures>,
    /// Each set of int8 graphs tried, most quantised first, and its figures.
    pub tried: Vec<Int8Try>,
    /// The graphs that ship as int8 (empty: none).
    pub shipped: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Int8Try {
    pub graphs: Vec<String>,
    pub figures: RuleFigures,
    pub shipped: bool,
}

/// Quantises the staged bundle's graphs and scores the shipped rule at f32 and with int8
/// graphs: all of them first, then the UNet and head with the patch model left in f32 (its
/// distance is the most sensitive to feature noise). The first within
/// `bound` ships; if none is, no int8 file is left in the bundle.
pub fn quantize_bundle(
    finished: Finished<'_, '_>,
    manifest: &Manifest,
    staged: &Staged,
    runtime: &RuntimeConfig,
    bound: Int8Bound,
    report: &mut Int8Report,
) -> Result<Option<Int8Graphs>, BundleError> {
    let Finished { unet, graphs, frames, seed } = finished;
    let pair = 2 * manifest.input.channels;
    let unet_graph =
        Graph { f32_file: ONNX_FILE, int8_file: INT8_ONNX_FILE, channels: manifest.unet.channels, skip: &[] };
    let head = manifest.head.as_ref().map(|h| Graph {
        f32_file: HEAD_FILE,
        int8_file: INT8_HEAD_FILE,
        channels: h.input_channels(manifest.input.channels),
        skip: &[],
    });
    let patch = manifest.patch.as_ref().map(|_| Graph {
        f32_file: PATCH_FILE,
        int8_file: INT8_PATCH_FILE,
        channels: pair,
        skip: PATCH_F32,
    });
    let shape = [manifest.input.channels, manifest.input.height, manifest.input.width];
    let mut ensemble = ensemble_of(manifest, staged.path(""))?;
    let ranges =
        observe(manifest, staged, runtime, [Some(&unet_graph), head.as_ref(), patch.as_ref()], |unet, observed| {
            let all_tiles = AnomalySpec { screen: None, ..manifest.anomaly };
            ensemble.raw_maps_of(unet, observed, frames, shape, seed, &all_tiles).map(|_| ())
        })?;

    let mut unet_q = quantized(&unet_graph, &ranges[0], staged, runtime)?;
    unet_q.1.golden = unet_golden(&mut unet_q.0, manifest, &manifest.golden.timesteps)?;
    let mut next = 1;
    let mut pair_quantized = |g: Option<&Graph>| -> Result<Option<(OrtDenoiser, QuantizedGraph)>, BundleError> {
        let Some(g) = g else { return Ok(None) };
        let (mut session, mut artifact) = quantized(g, &ranges[next], staged, runtime)?;
        next += 1;
        artifact.golden = pair_golden(&mut session, manifest, g.channels)?;
        Ok(Some((session, artifact)))
    };
    let (mut head_q, mut patch_q) = (pair_quantized(head.as_ref())?, pair_quantized(patch.as_ref())?);

    let fp32 = shipped_figures(&mut *unet, graphs, &mut ensemble, frames, shape, seed, &manifest.anomaly)?;
    report.fp32 = Some(fp32);
    let has_head = head_q.is_some();
    let names = |patch_int8: bool| {
        let mut n = vec!["unet".to_string()];
        n.extend(has_head.then(|| "head".to_string()));
        n.extend(patch_int8.then(|| "patch".to_string()));
        n
    };
    let tries: &[bool] = if patch_q.is_some() { &[true, false] } else { &[true] };
    for &patch_int8 in tries {
        let head_graph = head_q.as_mut().map(|q| &mut q.0 as &mut dyn Denoiser);
        let patch_graph = match patch_q.as_mut().filter(|_| patch_int8) {
            Some(q) => Some(&mut q.0 as &mut dyn Denoiser),
            None => graphs.patch.as_mut().map(|g| &mut **g as &mut dyn Denoiser),
        };
        let mut mixed = rule_graphs(manifest, head_graph, patch_graph, graphs.head_patch);
        let int8 = shipped_figures(&mut unet_q.0, &mut mixed, &mut ensemble, frames, shape, seed, &manifest.anomaly)?;
        let shipped = bound.admits(&fp32, &int8);
        tracing::info!(graphs = ?names(patch_int8), ?fp32, ?int8, ?bound, shipped, "int8 graphs scored against f32 on the validation defects.");
        report.tried.push(Int8Try { graphs: names(patch_int8), figures: int8, shipped });
        if shipped {
            report.shipped = names(patch_int8);
            if !patch_int8 && let Some(g) = &patch {
                staged.remove(g.int8_file)?;
            }
            return Ok(Some(Int8Graphs {
                unet: unet_q.1,
                head: head_q.map(|q| q.1),
                patch: patch_q.filter(|_| patch_int8).map(|q| q.1),
                calibration_frames: frames.len(),
                fp32,
                int8,
                max_pixel_auroc_loss: bound.pixel_auroc,
                max_pixel_auprc_loss: bound.pixel_auprc,
            }));
        }
    }
    tracing::warn!(?bound, "int8 graphs lose too much quality: none shipped.");
    for g in [Some(&unet_graph), head.as_ref(), patch.as_ref()].into_iter().flatten() {
        staged.remove(g.int8_file)?;
    }
    Ok(None)
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

/// Writes `g`'s int8 graph into the bundle and opens it (golden statistics pending).
fn quantized(
    g: &Graph,
    ranges: &Ranges,
    staged: &Staged,
    runtime: &RuntimeConfig,
) -> Result<(OrtDenoiser, QuantizedGraph), BundleError> {
    let path = staged.path(g.f32_file);
    let onnx =
        std::fs::read(&path).map_err(|e| BundleError::Inconsistent { path: path.clone(), what: e.to_string() })?;
    let int8 = quantize(&onnx, ranges, g.skip).map_err(|what| BundleError::Inconsistent { path, what })?;
    staged.write(g.int8_file, &int8)?;
    let session = OrtDenoiser::load(&staged.path(g.int8_file), g.channels, runtime)?;
    let artifact =
        QuantizedGraph { onnx: g.int8_file.into(), sha256: sha256_hex(&int8), golden: GoldenCheck::pending() };
    Ok((session, artifact))
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
