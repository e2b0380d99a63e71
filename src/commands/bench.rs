//! `edge-inspect bench`: inference throughput of a bundle on this machine.
//!
//! For each batch size: the median UNet call (ONNX Runtime, after warm-up), UNet
//! evaluations per second, then whole DDIM reconstructions at each step count (frames/s,
//! ms per frame). Printed as a Markdown table, with the provider that really ran. This is
//! the benchmark behind `docs/performance.md`; speed is not checked by timed tests.

use std::time::Instant;

use anyhow::bail;

use crate::cli::BenchArgs;
use crate::infer::reconstruct::{ReconstructionSpec, Sampler};
use crate::infer::runtime::Denoiser;
use crate::model::bundle::Bundle;
use crate::model::manifest::GoldenCheck;

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.batches.contains(&0) || args.ddim_steps.iter().any(|s| *s == 0 || *s > args.t0) || args.repeats == 0 {
        bail!("batch sizes and --repeats must be >= 1, DDIM steps in 1..=t0 ({})", args.t0);
    }
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
    Ok(())
}
