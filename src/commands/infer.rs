//! `edge-inspect infer`: one-shot inference on image files.
//!
//! Writes per image `<stem>_map.png` (16-bit normalised scores), `<stem>_mask.png`,
//! `<stem>_overlay.png` and a JSON line (stdout and `results.jsonl`). A file that cannot be
//! read is reported, counted and skipped; the command then exits non-zero.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cli::{InferArgs, ReconstructionArgs};
use crate::durable::write_atomic;
use crate::infer::bundle::Bundle;
use crate::infer::inspect::{FrameView, Inspector};
use crate::model::preprocess::Prepared;
use crate::model::sampling::ReconstructionSpec;
use crate::postprocess::anomaly::Region;
use crate::postprocess::render::{OverlayFormat, map_png, mask_png, overlay};

/// Payload schema of one result line.
pub const RESULT_SCHEMA: u32 = 1;

#[derive(Debug, Serialize)]
struct ModelRef<'a> {
    name: &'a str,
    version: &'a str,
    sha256: &'a str,
}

#[derive(Debug, Serialize)]
struct Timings {
    preprocess_ms: f64,
    /// Reconstruction and post-processing, per frame.
    inspect_ms: f64,
    /// Encoding and writing the output images.
    render_ms: f64,
}

#[derive(Debug, Serialize)]
struct ResultLine<'a> {
    schema: u32,
    image: String,
    score: f64,
    normalised_score: f64,
    image_threshold: f64,
    label: &'static str,
    defect_area: usize,
    defect_ratio: f64,
    regions: Vec<Region>,
    reconstruction_mse: f64,
    seed: u64,
    unet_calls: usize,
    t0: usize,
    model: ModelRef<'a>,
    outputs: [String; 3],
    timings: Timings,
}

/// Applies flag overrides to the manifest's reconstruction settings.
pub fn reconstruction_spec(base: ReconstructionSpec, args: &ReconstructionArgs) -> ReconstructionSpec {
    base.with_overrides(args.t0, args.steps, args.sampler.map(Into::into), args.eta, args.condition)
}

/// Output stems, unique even when two inputs share a file name: a shared stem gets its
/// folder's name in front (`scratch_000`), and an index if that still collides.
fn output_stems(images: &[PathBuf]) -> Vec<String> {
    let stem_of = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut counts = std::collections::HashMap::new();
    for p in images {
        *counts.entry(stem_of(p)).or_insert(0usize) += 1;
    }
    let mut seen = HashSet::new();
    images
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let stem = stem_of(p);
            let stem = if counts[&stem] > 1 {
                let parent = p.parent().and_then(|d| d.file_name()).map(|d| d.to_string_lossy().into_owned());
                parent.map_or(stem.clone(), |d| format!("{d}_{stem}"))
            } else {
                stem
            };
            if seen.insert(stem.clone()) { stem } else { format!("{stem}-{i}") }
        })
        .collect()
}

pub fn run(args: InferArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let runtime = args.runtime.to_config();
    let bundle = Bundle::load(&args.model, &runtime)?;
    let spec = reconstruction_spec(bundle.manifest.reconstruction, &args.reconstruction);
    let mut inspector = Inspector::new(bundle, Some(spec))?.with_tile_batch(args.batch);
    fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create output directory", args.out.display()))?;
    let manifest = inspector.manifest().clone();
    let input = manifest.input;
    let stems = output_stems(&args.images);
    let mut lines = Vec::new();
    let mut failures = 0usize;

    let indices: Vec<usize> = (0..args.images.len()).collect();
    for chunk in indices.chunks(args.batch) {
        let started = Instant::now();
        let mut frames: Vec<(usize, Prepared)> = Vec::with_capacity(chunk.len());
        for &i in chunk {
            match input.prepare_file(manifest.inspection, &args.images[i]) {
                Ok(p) => frames.push((i, p)),
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "Image skipped.");
                }
            }
        }
        if frames.is_empty() {
            continue;
        }
        let preprocess_ms = started.elapsed().as_secs_f64() * 1e3 / frames.len() as f64;
        let n = frames.len();
        let views: Vec<FrameView<'_>> = frames.iter().map(|(_, p)| FrameView::new(&p.tensor, p.size())).collect();
        let seeds: Vec<u64> = frames.iter().map(|(i, _)| args.seed.wrapping_add(*i as u64)).collect();
        let started = Instant::now();
        let analyses = inspector.inspect(&views, &seeds)?;
        let inspect_ms = started.elapsed().as_secs_f64() * 1e3 / n as f64;

        for (slot, ((i, prepared), analysis)) in frames.iter().zip(&analyses).enumerate() {
            let started = Instant::now();
            let stem = &stems[*i];
            let outputs = [format!("{stem}_map.png"), format!("{stem}_mask.png"), format!("{stem}_overlay.png")];
            let encoded =
                [map_png(analysis), mask_png(analysis), overlay(&prepared.display, analysis, None, OverlayFormat::Png)];
            for (name, bytes) in outputs.iter().zip(&encoded) {
                let path = args.out.join(name);
                write_atomic(&path, bytes).with_context(|| format!("{}: cannot write", path.display()))?;
            }
            let defect_area = analysis.mask.iter().filter(|m| **m != 0).count();
            let line = ResultLine {
                schema: RESULT_SCHEMA,
                image: args.images[*i].display().to_string(),
                score: analysis.score,
                normalised_score: analysis.normalised_score,
                image_threshold: analysis.image_threshold,
                label: if analysis.anomalous { "anomalous" } else { "normal" },
                defect_area,
                defect_ratio: defect_area as f64 / analysis.mask.len() as f64,
                regions: analysis.regions.clone(),
                reconstruction_mse: analysis.reconstruction_mse,
                seed: seeds[slot],
                unet_calls: inspector.unet_calls(),
                t0: inspector.spec().t0,
                model: ModelRef { name: &manifest.name, version: &manifest.version, sha256: &manifest.artifact.sha256 },
                outputs,
                timings: Timings { preprocess_ms, inspect_ms, render_ms: started.elapsed().as_secs_f64() * 1e3 },
            };
            let json = serde_json::to_string(&line)?;
            println!("{json}");
            lines.push(json);
        }
    }
    write_results(&args.out, &lines)?;
    if failures > 0 {
        bail!("{failures} of {} images could not be read (see the errors above)", args.images.len());
    }
    Ok(())
}

fn write_results(out: &Path, lines: &[String]) -> anyhow::Result<()> {
    let mut text = Vec::new();
    for line in lines {
        writeln!(text, "{line}")?;
    }
    let path = out.join("results.jsonl");
    write_atomic(&path, &text).with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::SamplerArg;
    use crate::model::sampling::Sampler;

    #[test]
    fn overrides_keep_ddpm_on_every_step() {
        let base = ReconstructionSpec { t0: 100, steps: 10, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 };
        let none = ReconstructionArgs { t0: None, steps: None, sampler: None, eta: None, condition: None };
        assert_eq!(reconstruction_spec(base, &none), base);
        let ddpm = ReconstructionArgs { sampler: Some(SamplerArg::Ddpm), t0: Some(50), ..none.clone() };
        assert_eq!(
            reconstruction_spec(base, &ddpm),
            ReconstructionSpec { t0: 50, steps: 50, sampler: Sampler::Ddpm, eta: 0.0, condition: 0.0 }
        );
        let ddim = ReconstructionArgs { steps: Some(5), eta: Some(0.5), ..none };
        assert_eq!(
            reconstruction_spec(base, &ddim),
            ReconstructionSpec { t0: 100, steps: 5, sampler: Sampler::Ddim, eta: 0.5, condition: 0.0 }
        );
    }

    #[test]
    fn stems_stay_unique() {
        let images: Vec<PathBuf> = ["a/good/000.png", "a/scratch/000.png", "b/x.png", "c/x.jpg", "d/y.png"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(output_stems(&images), ["good_000", "scratch_000", "b_x", "c_x", "y"]);
        let same: Vec<PathBuf> = ["a/1.png", "a/1.jpg"].iter().map(PathBuf::from).collect();
        assert_eq!(output_stems(&same), ["a_1", "a_1-1"]);
    }
}
