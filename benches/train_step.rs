//! Training step time of the UNet: forward + loss + backward + AdamW, batch 16 at 64×64, the
//! configuration of `docs/performance.md`, on burn's Flex CPU backend (its convolutions, SiLU
//! and GroupNorm on oneDNN: `model::onednn`) or (built with `--features gpu-train`) its wgpu
//! backend.
//!
//! `cargo bench --bench train_step`. Knobs: `BENCH_BATCH` (16), `BENCH_SIZE` (64),
//! `BENCH_STEPS` (10 timed after 2 warm-up), `BENCH_LOSS` (mse|huber|lts), `BENCH_CHANNELS` (1),
//! `BENCH_ATTENTION` (0|1), `BENCH_DEVICE` (cpu|wgpu|wgpu-cpu, as `retrain --device`).
//! Threads: `RAYON_NUM_THREADS`.

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use clap::ValueEnum;
use edge_inspect::model::architecture::UNetConfig;
use edge_inspect::model::unet::UNet;
use edge_inspect::train::TrainDevice;
use edge_inspect::train::losses::{Loss, loss};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    let batch: usize = env_or("BENCH_BATCH", "16").parse().expect("BENCH_BATCH");
    let size: usize = env_or("BENCH_SIZE", "64").parse().expect("BENCH_SIZE");
    let steps: usize = env_or("BENCH_STEPS", "10").parse().expect("BENCH_STEPS");
    let channels: usize = env_or("BENCH_CHANNELS", "1").parse().expect("BENCH_CHANNELS");
    let attention = env_or("BENCH_ATTENTION", "0") == "1";
    let kind = match env_or("BENCH_LOSS", "huber").as_str() {
        "mse" => Loss::Mse,
        "lts" => Loss::Lts { lambda: 0.8 },
        _ => Loss::Huber { delta: 0.2 },
    };
    let device_name = env_or("BENCH_DEVICE", "cpu");
    let device = TrainDevice::from_str(&device_name, true).expect("BENCH_DEVICE").open().expect("device").autodiff();
    let config = UNetConfig { channels, attention, ..UNetConfig::default() };
    let mut model = UNet::init(&config, 0, &device).expect("UNet");
    let mut optimizer = AdamWConfig::new().with_weight_decay(0.01).init();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let shape = [batch, channels, size, size];
    let n = batch * channels * size * size;
    let mut times = Vec::new();
    for step in 0..steps + 2 {
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let e: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let t: Vec<f32> = (0..batch).map(|_| rng.random_range(0..1000) as f32).collect();
        let start = Instant::now();
        let pred = model.forward(
            Tensor::<4>::from_data(TensorData::new(x, shape), &device),
            Tensor::<1>::from_data(TensorData::new(t, [batch]), &device),
        );
        let l = loss(kind, pred, Tensor::<4>::from_data(TensorData::new(e, shape), &device)).expect("loss");
        let grads = GradientsParams::from_grads(l.backward(), &model);
        model = optimizer.step(2e-4, model, grads);
        let _ = model.conv_out.weight.val().into_data();
        if step >= 2 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "burn {device_name}: batch {batch}, {channels}×{size}×{size}, attention {attention}, loss {}: median step {:.0} ms (min {:.0}, max {:.0}) over {steps} steps, {:.1} images/s",
        kind.name(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        batch as f64 * 1e3 / times[times.len() / 2]
    );
}
