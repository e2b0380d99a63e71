//! Evaluation of a bundle against labelled data (`eval`).
//!
//! Owns the evaluation protocol: which images count for which subset (overall, and each
//! defect type against the normal images, as MVTec AD reports it), which score feeds which
//! metric (image score → image metrics, raw anomaly map → pixel metrics), and the report.
//! Frames go through [`Inspector`], the daemon's own inspection path, so a number here is
//! a number the line will see.

pub mod data;
pub mod metrics;
pub mod synth;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::infer::inspect::{FrameView, Inspector};
use crate::model::sampling::ReconstructionSpec;
use crate::postprocess::anomaly::{AnomalySpec, connected_components};
use crate::postprocess::render::{OverlayFormat, overlay_within};
use data::{EvalDataError, EvalLayout, EvalSet, NORMAL};

/// Overlays of frames wider than this are scaled down (a 5 MP overlay helps nobody).
const OVERLAY_MAX_WIDTH: u32 = 1600;

/// Version of the report's JSON layout.
pub const REPORT_SCHEMA: u32 = 1;
/// AUPRO integrates the per-region overlap up to this false-positive rate (MVTec AD).
pub const AUPRO_FPR_LIMIT: f64 = 0.3;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Resize images and masks to the model's input instead of requiring that size.
    pub resize: bool,
    pub batch: usize,
    /// Image `i` (in dataset order) uses reconstruction seed `seed + i`.
    pub seed: u64,
    /// How many overlays to write (spread over the dataset).
    pub overlays: usize,
    pub progress: bool,
    /// The sensitivity the deployed verdicts are given at (as a camera's, 1 = calibrated).
    pub sensitivity: f64,
}

/// Metrics of one subset; `None` where a metric is undefined (the reason is in `notes`).
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub images: usize,
    pub anomalous: usize,
    pub image_auroc: Option<f64>,
    pub image_ap: Option<f64>,
    pub image_best_f1: Option<f64>,
    pub image_best_f1_threshold: Option<f64>,
    /// Image verdicts at the deployed threshold (the calibrated one at the report's
    /// sensitivity), as the daemon would alert.
    pub deployed: Deployed,
    pub pixel_auroc: Option<f64>,
    pub pixel_ap: Option<f64>,
    pub pixel_aupro: Option<f64>,
    pub pixel_best_f1: Option<f64>,
    pub pixel_best_f1_threshold: Option<f64>,
    /// Mean squared reconstruction error in [0, 1] intensity units.
    pub reconstruction_mse: f64,
    pub notes: Vec<String>,
}

/// Precision, recall and F1 of the image verdicts at the threshold the bundle ships with;
/// `None` where undefined (nothing flagged, or nothing anomalous).
#[derive(Debug, Clone, Serialize)]
pub struct Deployed {
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
}

impl Deployed {
    fn of(records: &[&Record]) -> Self {
        let count = |flagged: bool, anomalous: bool| {
            records.iter().filter(|r| r.flagged == flagged && (r.defect_type != NORMAL) == anomalous).count()
        };
        let (tp, fp, fn_) = (count(true, true), count(true, false), count(false, true));
        let ratio = |a: usize, b: usize| (a + b > 0).then(|| a as f64 / (a + b) as f64);
        let (precision, recall) = (ratio(tp, fp), ratio(tp, fn_));
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            (Some(_), Some(_)) => Some(0.0),
            _ => None,
        };
        Self { true_positives: tp, false_positives: fp, false_negatives: fn_, precision, recall, f1 }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: String,
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub provider: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataInfo {
    pub path: String,
    pub layout: EvalLayout,
    pub images_per_type: BTreeMap<String, usize>,
    pub pixel_ground_truth: bool,
    pub resized: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SkippedImage {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub model: ModelInfo,
    pub data: DataInfo,
    pub reconstruction: ReconstructionSpec,
    /// The anomaly-map settings scored (the manifest's, or `--anomaly-map`'s rule).
    pub anomaly: AnomalySpec,
    pub seed: u64,
    /// The sensitivity of the deployed verdicts, masks and overlays.
    pub sensitivity: f64,
    pub unet_calls_per_image: usize,
    /// Tiles inspected, and of those the cascade's screen declared clean without a
    /// reconstruction (`anomaly.screen`).
    pub tiles_inspected: usize,
    pub tiles_screened: usize,
    /// Reconstruction + post-processing wall time per image (decoding excluded).
    pub ms_per_image: f64,
    pub wall_s: f64,
    pub overall: Scores,
    pub per_type: BTreeMap<String, Scores>,
    pub skipped: Vec<SkippedImage>,
    pub overlays: Vec<String>,
}

/// What inspection concluded about one test image.
struct Record {
    defect_type: String,
    score: f32,
    /// The verdict at the deployed threshold (what the daemon would say).
    flagged: bool,
    reconstruction_mse: f64,
    map: Vec<f32>,
    truth: Vec<u8>,
    /// `[height, width]` of `map` and `truth`.
    size: [usize; 2],
}

/// A map at the image's own `[height, width]`: unchanged when inspected at native size,
/// else resampled (bilinear) from the inspected `[height, width]`, so pixel metrics are
/// computed against the native-resolution mask for every model.
fn at_native_size(map: Vec<f32>, [h, w]: [usize; 2], [native_h, native_w]: [usize; 2]) -> Vec<f32> {
    if [h, w] == [native_h, native_w] {
        return map;
    }
    let buffer = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(w as u32, h as u32, map)
        .expect("the map has the inspected size");
    image::imageops::resize(&buffer, native_w as u32, native_h as u32, image::imageops::FilterType::Triangle).into_raw()
}

/// Indices of `count` samples spread evenly over `0..total`.
fn spread(total: usize, count: usize) -> Vec<usize> {
    let count = count.min(total);
    (0..count).map(|k| k * total / count).collect()
}

/// Runs `inspector` over the test images of `data_dir`; overlays go to `out/overlays`.
pub fn evaluate(
    inspector: &mut Inspector,
    model_dir: &Path,
    data_dir: &Path,
    out: &Path,
    options: &EvalOptions,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let set: EvalSet = data::discover(data_dir)?;
    let (input, inspection) = (inspector.manifest().input, inspector.manifest().inspection);
    // Fail on size/mask mismatches before spending minutes on inference.
    for sample in &set.samples {
        data::check_sizes(sample, &input, inspection, options.resize)?;
    }
    let overlay_picks = spread(set.samples.len(), options.overlays);
    let overlay_dir = out.join("overlays");
    if !overlay_picks.is_empty() {
        std::fs::create_dir_all(&overlay_dir)?;
    }
    let bar = progress_bar(set.samples.len(), options.progress);
    let mut records = Vec::with_capacity(set.samples.len());
    let mut skipped = Vec::new();
    let mut overlays = Vec::new();
    let mut inspect_time = 0.0f64;
    let indices: Vec<usize> = (0..set.samples.len()).collect();
    for chunk in indices.chunks(options.batch.max(1)) {
        let mut loaded = Vec::with_capacity(chunk.len());
        for &i in chunk {
            match data::load(&set.samples[i], &input, inspection)? {
                Ok(l) => loaded.push((i, l)),
                Err(reason) => {
                    tracing::warn!(image = %set.samples[i].image.display(), %reason, "Unreadable test image skipped.");
                    skipped.push(SkippedImage { path: set.samples[i].image.display().to_string(), reason });
                }
            }
        }
        if loaded.is_empty() {
            bar.inc(chunk.len() as u64);
            continue;
        }
        let views: Vec<FrameView<'_>> = loaded
            .iter()
            .map(|(_, l)| FrameView { sensitivity: options.sensitivity, ..FrameView::new(&l.tensor, l.inspected) })
            .collect();
        let seeds: Vec<u64> = loaded.iter().map(|(i, _)| options.seed.wrapping_add(*i as u64)).collect();
        let t = Instant::now();
        let analyses = inspector.inspect(&views, &seeds)?;
        drop(views);
        inspect_time += t.elapsed().as_secs_f64();
        for ((i, l), analysis) in loaded.into_iter().zip(analyses) {
            let sample = &set.samples[i];
            if overlay_picks.contains(&i) {
                let name = format!(
                    "{}_{}.png",
                    sample.defect_type,
                    sample.image.file_stem().unwrap_or_default().to_string_lossy()
                );
                let truth = (l.inspected == l.size).then_some(l.truth.as_slice());
                let bytes = overlay_within(&l.display, &analysis, truth, OverlayFormat::Png, OVERLAY_MAX_WIDTH);
                crate::durable::write_atomic(&overlay_dir.join(&name), &bytes)?;
                overlays.push(format!("overlays/{name}"));
            }
            records.push(Record {
                defect_type: sample.defect_type.clone(),
                score: analysis.score as f32,
                flagged: analysis.anomalous,
                reconstruction_mse: analysis.reconstruction_mse,
                map: at_native_size(analysis.map, l.inspected, l.size),
                truth: l.truth,
                size: l.size,
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if records.is_empty() {
        return Err(EvalDataError::Empty { path: data_dir.to_path_buf(), what: "readable test" }.into());
    }
    let all: Vec<&Record> = records.iter().collect();
    let overall = scores(&all, set.has_masks);
    let mut per_type = BTreeMap::new();
    let types: std::collections::BTreeSet<&str> =
        records.iter().map(|r| r.defect_type.as_str()).filter(|t| *t != NORMAL).collect();
    for defect_type in types {
        let subset: Vec<&Record> =
            records.iter().filter(|r| r.defect_type == NORMAL || r.defect_type == defect_type).collect();
        per_type.insert(defect_type.to_string(), scores(&subset, set.has_masks));
    }
    let mut images_per_type = BTreeMap::new();
    for s in &set.samples {
        *images_per_type.entry(s.defect_type.clone()).or_insert(0) += 1;
    }
    let manifest = inspector.manifest();
    Ok(Report {
        schema: REPORT_SCHEMA,
        model: ModelInfo {
            path: model_dir.display().to_string(),
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            sha256: manifest.artifact.sha256.clone(),
            provider: inspector.denoiser().provider().to_string(),
        },
        data: DataInfo {
            path: data_dir.display().to_string(),
            layout: set.layout,
            images_per_type,
            pixel_ground_truth: set.has_masks,
            resized: options.resize,
        },
        reconstruction: *inspector.spec(),
        anomaly: inspector.manifest().anomaly,
        seed: options.seed,
        sensitivity: options.sensitivity,
        unet_calls_per_image: inspector.unet_calls(),
        tiles_inspected: inspector.tile_counts()[0],
        tiles_screened: inspector.tile_counts()[1],
        ms_per_image: inspect_time * 1e3 / records.len() as f64,
        wall_s: started.elapsed().as_secs_f64(),
        overall,
        per_type,
        skipped,
        overlays,
    })
}

fn progress_bar(len: usize, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images ETA {eta}")
            .expect("static template"),
    );
    bar
}

/// All metrics of one subset of records.
fn scores(records: &[&Record], has_masks: bool) -> Scores {
    let mut notes = Vec::new();
    let mut note = |what: &str, e: metrics::MetricError| notes.push(format!("{what}: {e}"));
    let image_scores: Vec<f32> = records.iter().map(|r| r.score).collect();
    let image_labels: Vec<bool> = records.iter().map(|r| r.defect_type != NORMAL).collect();
    let image_auroc = metrics::auroc(&image_scores, &image_labels).map_err(|e| note("image AUROC", e)).ok();
    let image_ap = metrics::average_precision(&image_scores, &image_labels).map_err(|e| note("image AP", e)).ok();
    let image_f1 = metrics::best_f1(&image_scores, &image_labels).map_err(|e| note("image best F1", e)).ok();
    let (mut pixel_auroc, mut pixel_ap, mut pixel_aupro, mut pixel_f1) = (None, None, None, None);
    if has_masks {
        let pixels = records.iter().map(|r| r.truth.len()).sum();
        let mut pixel_scores = Vec::with_capacity(pixels);
        let mut pixel_labels = Vec::with_capacity(pixels);
        let mut region_labels = Vec::with_capacity(pixels);
        let mut next_region = 0u32;
        for r in records {
            pixel_scores.extend_from_slice(&r.map);
            pixel_labels.extend(r.truth.iter().map(|t| *t != 0));
            let (labels, count) = connected_components(&r.truth, r.size[0], r.size[1]);
            region_labels.extend(labels.iter().map(|l| if *l == 0 { 0 } else { l + next_region }));
            next_region += count as u32;
        }
        pixel_auroc = metrics::auroc(&pixel_scores, &pixel_labels).map_err(|e| note("pixel AUROC", e)).ok();
        pixel_ap = metrics::average_precision(&pixel_scores, &pixel_labels).map_err(|e| note("pixel AP", e)).ok();
        pixel_aupro =
            metrics::aupro(&pixel_scores, &region_labels, AUPRO_FPR_LIMIT).map_err(|e| note("pixel AUPRO", e)).ok();
        pixel_f1 = metrics::best_f1(&pixel_scores, &pixel_labels).map_err(|e| note("pixel best F1", e)).ok();
    } else {
        notes.push("pixel metrics: the dataset has no ground-truth masks".into());
    }
    Scores {
        images: records.len(),
        anomalous: image_labels.iter().filter(|l| **l).count(),
        image_auroc,
        image_ap,
        image_best_f1: image_f1.map(|f| f.0),
        image_best_f1_threshold: image_f1.map(|f| f.1 as f64),
        deployed: Deployed::of(records),
        pixel_auroc,
        pixel_ap,
        pixel_aupro,
        pixel_best_f1: pixel_f1.map(|f| f.0),
        pixel_best_f1_threshold: pixel_f1.map(|f| f.1 as f64),
        reconstruction_mse: records.iter().map(|r| r.reconstruction_mse).sum::<f64>() / records.len() as f64,
        notes,
    }
}

/// The report as a short Markdown summary.
pub fn markdown(report: &Report) -> String {
    let fmt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3}"));
    let r = &report.reconstruction;
    let mut md = format!(
        "# Evaluation of {} {} on {}\n\n\
         - model: `{}` (sha256 {}…), provider {}\n\
         - reconstruction: {:?} t0 = {}, condition {}, {} UNet calls per image, seed {}; map {}; sensitivity {}\n\
         - {:.1} ms per image, {:.1} s in total; images per type: {}\n\n\
         | subset | images | anomalous | image AUROC | image AP | best F1 | deployed P / R / F1 | pixel AUROC | pixel AUPRC | AUPRO@{} | recon MSE |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        report.model.name,
        report.model.version,
        report.data.path,
        report.model.path,
        &report.model.sha256[..report.model.sha256.len().min(12)],
        report.model.provider,
        r.sampler,
        r.t0,
        r.condition,
        report.unet_calls_per_image,
        report.seed,
        report.anomaly.residual.name(),
        report.sensitivity,
        report.ms_per_image,
        report.wall_s,
        report.data.images_per_type.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        AUPRO_FPR_LIMIT,
    );
    let rows = std::iter::once(("all", &report.overall)).chain(report.per_type.iter().map(|(k, v)| (k.as_str(), v)));
    for (name, s) in rows {
        md += &format!(
            "| {name} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} | {} | {:.5} |\n",
            s.images,
            s.anomalous,
            fmt(s.image_auroc),
            fmt(s.image_ap),
            fmt(s.image_best_f1),
            fmt(s.deployed.precision),
            fmt(s.deployed.recall),
            fmt(s.deployed.f1),
            fmt(s.pixel_auroc),
            fmt(s.pixel_ap),
            fmt(s.pixel_aupro),
            s.reconstruction_mse
        );
    }
    if report.tiles_screened > 0 {
        md += &format!(
            "\n{} of {} tiles ({:.1} %) screened out as clean without a reconstruction.\n",
            report.tiles_screened,
            report.tiles_inspected,
            100.0 * report.tiles_screened as f64 / report.tiles_inspected.max(1) as f64
        );
    }
    let notes: Vec<&String> = report.overall.notes.iter().collect();
    if !notes.is_empty() || !report.skipped.is_empty() {
        md += "\n";
        for n in notes {
            md += &format!("- note: {n}\n");
        }
        for s in &report.skipped {
            md += &format!("- skipped {}: {}\n", s.path, s.reason);
        }
    }
    md
}
