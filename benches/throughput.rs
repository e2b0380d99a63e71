//! Inference throughput on this machine: UNet evaluations/s and frames/s through ONNX
//! Runtime for batch 1 and 8 and DDIM 5/10/50 steps, printed as a Markdown table.
//!
//! `cargo bench --bench throughput` (needs ORT_DYLIB_PATH). Environment knobs:
//! `BENCH_PROVIDER=cuda|tensorrt|cpu` (default cpu), `BENCH_THREADS` (ORT intra-op
//! threads, default 1), `BENCH_BATCHES` (comma list, default "1,8"), `BENCH_SIZE` (64).
//! The model is the default architecture with seeded random weights, exported and
//! verified exactly as a trained model would be: speed does not depend on weight values.

use std::time::Instant;

use burn::tensor::Device;
use edge_inspect::infer::reconstruct::{ReconstructionSpec, Sampler};
use edge_inspect::infer::runtime::{Denoiser, Provider, RuntimeConfig};
use edge_inspect::model::architecture::UNetConfig;
use edge_inspect::model::bundle::Bundle;
use edge_inspect::model::diffusion::ScheduleSpec;
use edge_inspect::model::export::{export_bundle, keep_thresholds};
use edge_inspect::model::manifest::{Artifact, Calibration, GoldenCheck, Manifest, Provenance, SCHEMA_VERSION, Thresholds};
use edge_inspect::model::preprocess::InputSpec;
use edge_inspect::model::unet::UNet;
use edge_inspect::postprocess::anomaly::{AnomalySpec, Threshold};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    let provider = match env_or("BENCH_PROVIDER", "cpu").as_str() {
        "cuda" => Provider::Cuda,
        "tensorrt" => Provider::Tensorrt,
        _ => Provider::Cpu,
    };
    let threads: usize = env_or("BENCH_THREADS", "1").parse().expect("BENCH_THREADS");
    let size: usize = env_or("BENCH_SIZE", "64").parse().expect("BENCH_SIZE");
    let batches: Vec<usize> = env_or("BENCH_BATCHES", "1,8").split(',').map(|b| b.trim().parse().expect("BENCH_BATCHES")).collect();
    let runtime = RuntimeConfig { providers: vec![provider], intra_threads: threads, ..RuntimeConfig::default() };

    let unet = UNetConfig::default();
    let t = Threshold { value: 0.1, min: 0.0, max: 0.2 };
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        name: "bench".into(),
        version: "0".into(),
        created: "1970-01-01T00:00:00Z".into(),
        input: InputSpec { width: size, height: size, ..InputSpec::default() },
        unet: unet.clone(),
        schedule: ScheduleSpec::default(),
        reconstruction: ReconstructionSpec { t0: 100, steps: 10, sampler: Sampler::Ddim, eta: 0.0 },
        anomaly: AnomalySpec::default(),
        thresholds: Thresholds { pixel: t, image: t, calibration: Calibration { rule: "none".into(), frames: 0, pixel_quantiles: vec![], image_quantiles: vec![] } },
        provenance: Provenance { loss: "random".into(), huber_delta: None, lts_lambda: None, data_sha256: String::new(), training_steps: 0, seed: 0, command: "bench".into() },
        artifact: Artifact { onnx: String::new(), sha256: String::new(), opset: 0, parity_max_abs_diff: 0.0 },
        golden: GoldenCheck::from_output(1, vec![0.0], &[0.0], 0.0),
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("bench");
    let model = UNet::init(&unet, 0, &Device::flex()).expect("default UNet");
    // Parity is checked on CPU; the benchmark session then uses the requested provider.
    export_bundle(&model, manifest, &dir, &RuntimeConfig { intra_threads: threads, ..RuntimeConfig::default() }, false, keep_thresholds)
        .expect("export");
    let mut bundle = Bundle::load(&dir, &runtime).expect("load bundle");

    println!("provider: {} (fallback: {}), ORT intra-op threads: {threads}, input 1×{size}×{size}, UNet {unet:?}", bundle.denoiser.provider(), bundle.denoiser.fell_back_to_cpu());
    println!();
    println!("| batch | forward ms (median) | UNet evals/s (frames·calls) | DDIM steps | frames/s | ms/frame |");
    println!("|---|---|---|---|---|---|");
    for &batch in &batches {
        let frame = size * size;
        let x: Vec<f32> = (0..batch * frame).map(|i| ((i % 97) as f32 / 48.5) - 1.0).collect();
        let t = vec![50.0f32; batch];
        let shape = [batch, 1, size, size];
        for _ in 0..3 {
            bundle.denoiser.predict_eps(&x, shape, &t, &mut |_| {}).expect("warm-up");
        }
        let mut times = Vec::new();
        for _ in 0..15 {
            let start = Instant::now();
            bundle.denoiser.predict_eps(&x, shape, &t, &mut |_| {}).expect("forward");
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let forward_ms = times[times.len() / 2];
        let evals_per_s = batch as f64 * 1e3 / forward_ms;
        for steps in [5usize, 10, 50] {
            let spec = ReconstructionSpec { t0: 100, steps, sampler: Sampler::Ddim, eta: 0.0 };
            let mut recon = bundle.reconstructor(Some(spec)).expect("reconstructor");
            let seeds: Vec<u64> = (0..batch as u64).collect();
            let mut out = vec![0.0f32; x.len()];
            let rounds = if steps >= 50 { 2 } else { 4 };
            let start = Instant::now();
            for _ in 0..rounds {
                recon.reconstruct(&mut bundle.denoiser, &x, shape, &seeds, &mut out).expect("reconstruct");
            }
            let secs = start.elapsed().as_secs_f64();
            let frames_per_s = (rounds * batch) as f64 / secs;
            println!("| {batch} | {forward_ms:.2} | {evals_per_s:.1} | {steps} | {frames_per_s:.2} | {:.1} |", 1e3 / frames_per_s);
        }
    }
}
