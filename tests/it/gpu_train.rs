//! The GPU training backend (burn's wgpu, `--features gpu-train`) against the CPU's (Flex):
//! on a CPU Vulkan adapter (Mesa's lavapipe in CI), the same tiny UNet with the same
//! weights and inputs gives the same loss and gradients, stays level through AdamW steps,
//! and `retrain --device wgpu-cpu` writes a bundle that loads and verifies.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use edge_inspect::model::architecture::UNetConfig;
use edge_inspect::model::unet::UNet;
use edge_inspect::train::losses::{Loss, loss};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> UNetConfig {
    UNetConfig { channels: 1, base_channels: 8, channel_mults: vec![1, 2], res_blocks: 1, attention: false, groups: 4 }
}

/// Every parameter's values (or, given gradients, every parameter's gradient), in order.
struct Collect<'a> {
    grads: Option<&'a GradientsParams>,
    out: Vec<Vec<f32>>,
}

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = match self.grads {
            Some(grads) => grads.get::<D>(param.id).expect("every parameter has a gradient"),
            None => param.val().inner(),
        };
        self.out.push(tensor.into_data().convert::<f32>().try_into_vec::<f32>().unwrap());
    }
}

fn collect(model: &UNet, grads: Option<&GradientsParams>) -> Vec<Vec<f32>> {
    let mut visitor = Collect { grads, out: Vec::new() };
    model.visit(&mut visitor);
    visitor.out
}

/// The largest difference of `a` and `b` relative to the largest magnitude in `a`.
fn relative(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let scale = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = a.iter().flatten().zip(b.iter().flatten()).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    worst / scale
}

/// One batch of noisy frames, their noise and their timesteps, deterministic.
fn batch(step: usize, device: &Device) -> (Tensor<4>, Tensor<4>, Tensor<1>) {
    let n = 4 * 32 * 32;
    let wave = |k: usize, f: f32| (k as f32 * f + step as f32).sin() * 0.8;
    let x: Vec<f32> = (0..n).map(|k| wave(k, 0.37)).collect();
    let eps: Vec<f32> = (0..n).map(|k| wave(k, 1.13)).collect();
    let t = vec![10.0, 250.0, 500.0, 900.0];
    (
        Tensor::from_data(TensorData::new(x, [4, 1, 32, 32]), device),
        Tensor::from_data(TensorData::new(eps, [4, 1, 32, 32]), device),
        Tensor::from_data(TensorData::new(t, [4]), device),
    )
}

#[test]
fn wgpu_on_lavapipe_matches_flex_in_loss_gradients_and_steps() {
    let flex = Device::flex().autodiff();
    let gpu = Device::wgpu(DeviceKind::Cpu).autodiff();
    let model = UNet::init(&tiny(), 7, &flex).unwrap();
    let start = collect(&model, None); // the lazy parameters exist from here on
    let mut models = [model.clone(), model.fork(&gpu)];
    assert_eq!(relative(&start, &collect(&models[1], None)), 0.0, "the same starting weights");
    let devices = [flex, gpu];
    let mut optimizers = [AdamWConfig::new().init(), AdamWConfig::new().init()];
    for step in 0..4 {
        let mut losses = Vec::new();
        let mut grads = Vec::new();
        for (i, device) in devices.iter().enumerate() {
            let (x, eps, t) = batch(step, device);
            let l = loss(Loss::Huber { delta: 0.2 }, models[i].forward(x, t), eps).unwrap();
            losses.push(l.clone().into_scalar::<f32>());
            let g = GradientsParams::from_grads(l.backward(), &models[i]);
            grads.push(collect(&models[i], Some(&g)));
            models[i] = optimizers[i].step(1e-3, models[i].clone(), g);
        }
        let loss_gap = (losses[0] - losses[1]).abs() / losses[0].abs();
        assert!(loss_gap < 1e-4, "step {step}: loss {} on flex, {} on wgpu", losses[0], losses[1]);
        let grad_gap = relative(&grads[0], &grads[1]);
        assert!(grad_gap < 1e-3, "step {step}: gradients differ by {grad_gap:e} (relative)");
    }
    let weights = relative(&collect(&models[0], None), &collect(&models[1], None));
    assert!(weights < 1e-3, "after 4 AdamW steps the weights differ by {weights:e}");
}

fn bin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edge-inspect")).args(args).current_dir(repo()).output().unwrap()
}

#[test]
fn retrain_on_the_gpu_backend_writes_a_bundle_that_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("gpu-model");
    let out_s = out.to_str().unwrap();
    let trained = bin(&[
        "retrain",
        "--data",
        "data/brick",
        "--out",
        out_s,
        "--device",
        "wgpu-cpu",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--size",
        "16",
        "--base-channels",
        "16",
        "--channel-mults",
        "1,2",
        "--t0",
        "10",
        "--reverse-steps",
        "2",
        "--fixed-operating-point",
        "--no-progress",
    ]);
    let log = String::from_utf8_lossy(&trained.stderr);
    assert!(trained.status.success(), "{log}");
    assert!(log.contains("device=WgpuCpu"), "it trained on the GPU backend: {log}");
    let image = repo().join("data/brick/test/good/000.png");
    let inferred =
        bin(&["infer", "--model", out_s, "--out", tmp.path().join("infer").to_str().unwrap(), image.to_str().unwrap()]);
    assert!(inferred.status.success(), "the bundle loads and verifies: {}", String::from_utf8_lossy(&inferred.stderr));
    assert!(Path::new(&out).join("manifest.toml").is_file());
}
