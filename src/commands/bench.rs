//! `edge-inspect bench`: inference throughput of a bundle on this machine.
//!
//! For each batch size: the median UNet call (ONNX Runtime, after warm-up), UNet
//! evaluations per second, then whole DDIM reconstructions at each step count (frames/s,
//! ms per frame). Printed as a Markdown table, with the provider that really ran. With
//! `--frames`, whole camera frames go through the inspection path (`Inspector`: tiles,
//! stitching, post-processing) at each of the DDIM step counts (UNet calls per tile, at
//! `--t0`): tiles/s, frames/s, megapixels/s and the process's peak RSS. This is the benchmark
//! behind `docs/performance.md`; speed is not checked by timed tests.

use std::time::Instant;

use anyhow::bail;

use crate::cli::BenchArgs;
use crate::infer::bundle::Bundle;
use crate::infer::inspect::{FrameView, Inspector};
use crate::infer::runtime::Denoiser;
use crate::model::manifest::GoldenCheck;
use crate::model::sampling::{ReconstructionSpec, Sampler};

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.batches.contains(&0) || args.ddim_steps.iter().any(|s| *s == 0 || *s > args.t0) || args.repeats == 0 {
        bail!("batch sizes and --repeats must be >= 1, DDIM steps in 1..=t0 ({})", args.t0);
    }
    let frames = args.frames.iter().map(|f| parse_frame(f)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut bundle = Bundle::load(&args.model, &args.runtime.to_config())?;
    let input = bundle.manifest.input;
    println!(
        "model {} ({}), input {}×{}×{}, provider {}{}, ORT intra-op threads {}, cores available {}",
        bundle.manifest.name,
        &bundle.manifest.artifact.sha256[..12],
        input.channels,
        input.height,
        input.width,
        bundle.denoiser.provider(),
        if bundle.denoiser.fell_back_to_cpu() { " (CPU fallback)" } else { "" },
        args.runtime.threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!();
    println!("| batch | UNet call ms (median) | UNet evals/s | DDIM steps (t0 = {}) | frames/s | ms/frame |", args.t0);
    println!("|---|---|---|---|---|---|");
    for &batch in &args.batches {
        let x = GoldenCheck::probe(batch, &input);
        let t = vec![(args.t0 / 2) as f32; batch];
        let shape = [batch, input.channels, input.height, input.width];
        for _ in 0..3 {
            bundle.denoiser.predict_eps(&x, shape, &t, &mut |_| {})?;
        }
        let mut times = Vec::with_capacity(args.repeats);
        for _ in 0..args.repeats {
            let start = Instant::now();
            bundle.denoiser.predict_eps(&x, shape, &t, &mut |_| {})?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let call_ms = times[times.len() / 2];
        for &steps in &args.ddim_steps {
            let spec = ReconstructionSpec { t0: args.t0, steps, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 };
            let mut reconstructor = bundle.reconstructor(Some(spec))?;
            let seeds: Vec<u64> = (0..batch as u64).collect();
            let mut out = vec![0.0f32; x.len()];
            // At least ~40 UNet calls per figure, so short reconstructions are not noise.
            let rounds = (40 / steps).max(1);
            let start = Instant::now();
            for _ in 0..rounds {
                reconstructor.reconstruct(&mut bundle.denoiser, &x, shape, &seeds, &mut out)?;
            }
            let frames_per_s = (rounds * batch) as f64 / start.elapsed().as_secs_f64();
            println!(
                "| {batch} | {call_ms:.2} | {:.1} | {steps} | {frames_per_s:.2} | {:.1} |",
                batch as f64 * 1e3 / call_ms,
                1e3 / frames_per_s
            );
        }
    }
    if !frames.is_empty() {
        let specs = args
            .ddim_steps
            .iter()
            .map(|&steps| ReconstructionSpec { t0: args.t0, steps, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 })
            .collect::<Vec<_>>();
        bench_frames(bundle, &frames, &specs, *args.batches.iter().max().expect("default batches"))?;
    }
    Ok(())
}

fn parse_frame(text: &str) -> anyhow::Result<[usize; 2]> {
    let parsed = text.split_once('x').and_then(|(w, h)| Some([h.parse().ok()?, w.parse().ok()?]));
    match parsed {
        Some([h, w]) if h > 0 && w > 0 => Ok([h, w]),
        _ => bail!("--frames: {text:?} is not WIDTHxHEIGHT"),
    }
}

/// Whole frames through `Inspector` at each of `specs`, `tile_batch` tiles per UNet batch.
fn bench_frames(
    bundle: Bundle,
    frames: &[[usize; 2]],
    specs: &[ReconstructionSpec],
    tile_batch: usize,
) -> anyhow::Result<()> {
    let manifest = bundle.manifest.clone();
    let mut inspector = Inspector::new(bundle, None)?.with_tile_batch(tile_batch);
    println!();
    println!("inspection: {:?}, {tile_batch} tiles per UNet batch", manifest.inspection);
    println!();
    println!("| frame | tiles | UNet calls per tile | s/frame | frames/s | tiles/s | MP/s | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|");
    for &spec in specs {
        inspector = inspector.with_spec(spec)?;
        for &[height, width] in frames {
            let image =
                image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(width as u32, height as u32, |x, y| {
                    image::Luma([(128.0 + 60.0 * ((x as f32) * 0.31).sin() * ((y as f32) * 0.17).cos()) as u8])
                }));
            let prepared = manifest.input.prepare_for(manifest.inspection, &image);
            let view = FrameView::new(&prepared.tensor, prepared.size());
            let tiles = inspector.tile_grid(view.size).tiles.len();
            let start = Instant::now();
            inspector.inspect(&[view], &[1])?;
            let seconds = start.elapsed().as_secs_f64();
            println!(
                "| {width}×{height} | {tiles} | {} | {seconds:.2} | {:.2} | {:.1} | {:.3} | {} |",
                inspector.unet_calls(),
                1.0 / seconds,
                tiles as f64 / seconds,
                (width * height) as f64 / 1e6 / seconds,
                peak_rss_mib().map_or("n/a".into(), |m| format!("{m:.0}")),
            );
        }
    }
    Ok(())
}

/// The process's peak resident set (VmHWM) in MiB, where /proc says.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}
