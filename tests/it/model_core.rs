//! Model core against real parts: burn, the ONNX emitter, a real ONNX Runtime session,
//! bundles on disk and the `edge-inspect` binary.
//!
//! Needs `ORT_DYLIB_PATH` (set by `.ci/run` from `scripts/fetch-onnxruntime.sh`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::Device;
use edge_inspect::infer::bundle::{Bundle, BundleError, read_manifest};
use edge_inspect::infer::inspect::{FrameView, Inspector};
use edge_inspect::infer::runtime::{OrtDenoiser, RuntimeConfig};
use edge_inspect::model::architecture::UNetConfig;
use edge_inspect::model::diffusion::ScheduleSpec;
use edge_inspect::model::manifest::{
    Artifact, Calibration, GoldenCheck, HEAD_FILE, MANIFEST_FILE, Manifest, ONNX_FILE, Provenance, SCHEMA_VERSION,
    Thresholds,
};
use edge_inspect::model::preprocess::{InputSpec, Inspection};
use edge_inspect::model::sampling::{ReconstructionSpec, Sampler};
use edge_inspect::model::unet::UNet;
use edge_inspect::postprocess::anomaly::{AnomalySpec, Residual, Threshold};
use edge_inspect::train::export::{TrainedHead, export_bundle, export_head, keep_thresholds, parity};

const BIN: &str = env!("CARGO_BIN_EXE_edge-inspect");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn runtime() -> RuntimeConfig {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "set ORT_DYLIB_PATH to libonnxruntime.so (scripts/fetch-onnxruntime.sh prints it)"
    );
    RuntimeConfig::default()
}

/// A small UNet: 16×16 input, two levels, with attention so every op is exercised.
fn small_config(channels: usize, attention: bool) -> UNetConfig {
    UNetConfig { channels, base_channels: 16, channel_mults: vec![1, 2], res_blocks: 1, attention, groups: 8 }
}

fn manifest_for(unet: &UNetConfig, size: usize) -> Manifest {
    let t = Threshold { value: 0.1, min: 0.0, max: 0.2 };
    Manifest {
        schema_version: SCHEMA_VERSION,
        name: "test".into(),
        version: "0.0.0".into(),
        created: "2026-11-28T00:00:00Z".into(),
        input: InputSpec { width: size, height: size, channels: unet.channels, ..InputSpec::default() },
        inspection: Inspection::default(),
        unet: unet.clone(),
        schedule: ScheduleSpec::default(),
        reconstruction: ReconstructionSpec { t0: 20, steps: 4, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 },
        anomaly: AnomalySpec::default(),
        thresholds: Thresholds {
            pixel: t,
            image: t,
            calibration: Calibration {
                rule: "uncalibrated".into(),
                frames: 0,
                pixel_quantiles: vec![],
                image_quantiles: vec![],
            },
        },
        provenance: Provenance {
            loss: "random".into(),
            huber_delta: None,
            lts_lambda: None,
            data_sha256: String::new(),
            training_steps: 0,
            seed: 7,
            command: "test".into(),
        },
        artifact: Artifact::pending(),
        golden: GoldenCheck::pending(),
        operating_point: None,
        ensemble: None,
        head: None,
        patch: None,
        screen_curve: Vec::new(),
        int8: None,
        fp16: None,
    }
}

fn export_small(dir: &Path, channels: usize, attention: bool) -> (UNet, Manifest) {
    let config = small_config(channels, attention);
    let model = UNet::init(&config, 7, &Device::flex()).unwrap();
    let (_, manifest) =
        export_bundle(&model, manifest_for(&config, 16), dir, &runtime(), false, keep_thresholds).unwrap();
    (model, manifest)
}

/// Export parity: ORT on the emitted graph equals burn's forward pass at batch 1 and 4,
/// for grey and RGB, with and without attention, on seeded random weights.
#[test]
fn exported_graph_matches_burn_at_batch_1_and_4() {
    let tmp = tempfile::tempdir().unwrap();
    for (channels, attention) in [(1, true), (3, false)] {
        let dir = tmp.path().join(format!("c{channels}a{attention}"));
        let (model, manifest) = export_small(&dir, channels, attention);
        assert!(manifest.artifact.parity_max_abs_diff <= 1e-4);
        let mut ort = OrtDenoiser::load(&dir.join(ONNX_FILE), channels, &runtime()).unwrap();
        for batch in [1usize, 4] {
            let x: Vec<f32> =
                (0..batch * channels * 16 * 16).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            let t: Vec<f32> = (0..batch).map(|i| (i * 311 % 1000) as f32).collect();
            let worst = parity(&model, &mut ort, &x, [batch, channels, 16, 16], &t).unwrap();
            assert!(worst <= 1e-4, "channels {channels}, batch {batch}: max |ORT − burn| = {worst}");
            assert!(worst.is_finite());
        }
    }
}

#[test]
fn t0_zero_reconstruction_returns_the_input_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    export_small(&dir, 1, false);
    let mut bundle = Bundle::load(&dir, &runtime()).unwrap();
    let spec = ReconstructionSpec { t0: 0, steps: 0, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 };
    let mut r = bundle.reconstructor(Some(spec)).unwrap();
    let clean: Vec<f32> = (0..2 * 256).map(|i| (i as f32 * 0.01).sin()).collect();
    let mut out = vec![9.0; clean.len()];
    r.reconstruct(&mut bundle.denoiser, &clean, [2, 1, 16, 16], &[1, 2], &mut out).unwrap();
    assert_eq!(out, clean);
    assert_eq!(r.unet_calls(), 0);

    // And a real partial diffusion changes the frame, deterministically per seed.
    let mut r = bundle.reconstructor(None).unwrap();
    let mut a = vec![0.0; clean.len()];
    let mut b = vec![0.0; clean.len()];
    r.reconstruct(&mut bundle.denoiser, &clean, [2, 1, 16, 16], &[1, 2], &mut a).unwrap();
    r.reconstruct(&mut bundle.denoiser, &clean, [2, 1, 16, 16], &[1, 2], &mut b).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, clean);
    // Batch-invariant: frame 1 alone with its seed gives the same reconstruction.
    let mut single = vec![0.0; 256];
    r.reconstruct(&mut bundle.denoiser, &clean[256..], [1, 1, 16, 16], &[2], &mut single).unwrap();
    let worst = single.iter().zip(&a[256..]).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "batch composition changed a frame by {worst}");
}

fn load_err(dir: &Path) -> BundleError {
    match Bundle::load(dir, &runtime()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut toml::Table)) {
    let path = dir.join(MANIFEST_FILE);
    let mut table: toml::Table = toml::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut table);
    fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
}

#[test]
fn broken_bundles_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    export_small(&good, 1, false);
    Bundle::load(&good, &runtime()).unwrap();
    let copy = |name: &str| {
        let dir = tmp.path().join(name);
        fs::create_dir(&dir).unwrap();
        for f in [MANIFEST_FILE, ONNX_FILE] {
            fs::copy(good.join(f), dir.join(f)).unwrap();
        }
        dir
    };

    let sha = copy("sha");
    edit_manifest(&sha, |m| {
        m["artifact"]["sha256"] = toml::Value::String("0".repeat(64));
    });
    let e = load_err(&sha);
    assert!(matches!(e, BundleError::ShaMismatch { .. }), "{e}");
    assert!(e.to_string().contains("model.onnx") && e.to_string().contains(&"0".repeat(64)), "{e}");

    let missing = copy("missing");
    fs::remove_file(missing.join(ONNX_FILE)).unwrap();
    let e = load_err(&missing);
    assert!(matches!(e, BundleError::MissingFile { .. }) && e.to_string().contains("model.onnx"), "{e}");

    let no_manifest = copy("no-manifest");
    fs::remove_file(no_manifest.join(MANIFEST_FILE)).unwrap();
    assert!(matches!(load_err(&no_manifest), BundleError::MissingFile { .. }));

    // The manifest claims RGB; the graph takes one channel.
    let shape = copy("shape");
    edit_manifest(&shape, |m| {
        m["input"]["channels"] = toml::Value::Integer(3);
        m["unet"]["channels"] = toml::Value::Integer(3);
    });
    let e = load_err(&shape);
    assert!(e.to_string().contains("1 channels but the manifest says 3"), "{e}");

    // A feature-map timestep beyond the schedule.
    let feature_t = copy("feature-t");
    edit_manifest(&feature_t, |m| {
        m["anomaly"]["feature_t"] = toml::Value::Integer(5000);
    });
    let e = load_err(&feature_t);
    assert!(e.to_string().contains("anomaly.feature_t = 5000 is beyond the schedule's 1000 timesteps"), "{e}");

    // An input size the UNet cannot halve.
    let size = copy("size");
    edit_manifest(&size, |m| {
        m["input"]["width"] = toml::Value::Integer(15);
    });
    let e = load_err(&size);
    assert!(e.to_string().contains("input size 16x15"), "{e}");

    // A graph that does not reproduce its recorded output.
    let golden = copy("golden");
    edit_manifest(&golden, |m| {
        let old = m["golden"]["output_rms"].as_float().unwrap();
        m["golden"]["output_rms"] = toml::Value::Float(old + 0.5);
    });
    let e = load_err(&golden);
    assert!(matches!(e, BundleError::Golden { .. }) && e.to_string().contains("rms"), "{e}");

    let unknown = copy("unknown-key");
    edit_manifest(&unknown, |m| {
        m.insert("colour".into(), toml::Value::String("red".into()));
    });
    let e = read_manifest(&unknown).unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");

    let newer = copy("schema");
    edit_manifest(&newer, |m| {
        m["schema_version"] = toml::Value::Integer(99);
    });
    assert!(matches!(read_manifest(&newer), Err(BundleError::SchemaVersion { found: 99, .. })));

    // A corrupt ONNX file with a matching sha256 is refused by the runtime, not a panic.
    let corrupt = copy("corrupt");
    fs::write(corrupt.join(ONNX_FILE), b"not a model").unwrap();
    edit_manifest(&corrupt, |m| {
        m["artifact"]["sha256"] = toml::Value::String(edge_inspect::infer::bundle::sha256_hex(b"not a model"));
    });
    let e = load_err(&corrupt);
    assert!(e.to_string().contains("model.onnx"), "{e}");

    // Export never replaces a bundle without force.
    let config = small_config(1, false);
    let model = UNet::init(&config, 8, &Device::flex()).unwrap();
    let e = export_bundle(&model, manifest_for(&config, 16), &good, &runtime(), false, keep_thresholds).unwrap_err();
    assert!(matches!(e, BundleError::Exists { .. }));
    Bundle::load(&good, &runtime()).unwrap();
}

fn run_cli(args: &[&str], env_remove_ort: bool) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if env_remove_ort {
        cmd.env_remove("ORT_DYLIB_PATH");
    }
    cmd.output().unwrap()
}

fn export_cli(dir: &Path) {
    export_cli_with(dir, &[]);
}

/// `export` of a small random bundle, with `extra` flags after the defaults.
fn export_cli_with(dir: &Path, extra: &[&str]) {
    let args = [
        "export",
        "--out",
        dir.to_str().unwrap(),
        "--size",
        "64",
        "--base-channels",
        "16",
        "--channel-mults",
        "1,2",
        "--seed",
        "3",
        "--t0",
        "30",
        "--steps",
        "3",
    ];
    let out = run_cli(&[&args[..], extra].concat(), false);
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_onnxruntime_is_a_clear_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("m");
    export_cli(&bundle);
    let out = run_cli(
        &[
            "infer",
            "--model",
            bundle.to_str().unwrap(),
            "--out",
            tmp.path().join("o").to_str().unwrap(),
            "--ort-lib",
            "/nonexistent/libonnxruntime.so",
            fixture("brick_clean.png").to_str().unwrap(),
        ],
        true,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ONNX Runtime library not found") && stderr.contains("/nonexistent/libonnxruntime.so"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // A bad bundle through the CLI: non-zero, message names the file, no panic.
    fs::remove_file(bundle.join(ONNX_FILE)).unwrap();
    let out = run_cli(
        &[
            "infer",
            "--model",
            bundle.to_str().unwrap(),
            "--out",
            tmp.path().join("o").to_str().unwrap(),
            fixture("brick_clean.png").to_str().unwrap(),
        ],
        false,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("model.onnx: missing from the bundle") && !stderr.contains("panicked"), "{stderr}");
}

fn without_timings(jsonl: &str) -> Vec<serde_json::Value> {
    jsonl
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("timings").expect("timings present");
            v
        })
        .collect()
}

#[test]
fn infer_writes_outputs_deterministically() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("m");
    export_cli(&bundle);
    let images = [fixture("brick_clean.png"), fixture("brick_scratch.png"), fixture("brick_stain.png")];
    let infer = |out: &Path, seed: &str| {
        let mut args = vec![
            "infer",
            "--model",
            bundle.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--seed",
            seed,
            "--batch",
            "2",
        ];
        args.extend(images.iter().map(|p| p.to_str().unwrap()));
        let o = run_cli(&args, false);
        assert!(o.status.success(), "infer failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    let stdout_a = infer(&a, "5");
    infer(&b, "5");
    infer(&c, "6");

    let lines = without_timings(&fs::read_to_string(a.join("results.jsonl")).unwrap());
    assert_eq!(lines.len(), 3);
    assert_eq!(without_timings(&stdout_a), lines);
    assert_eq!(lines, without_timings(&fs::read_to_string(b.join("results.jsonl")).unwrap()));
    assert_ne!(lines, without_timings(&fs::read_to_string(c.join("results.jsonl")).unwrap()), "seed must matter");
    let manifest = read_manifest(&bundle).unwrap();
    for (line, stem) in lines.iter().zip(["brick_clean", "brick_scratch", "brick_stain"]) {
        assert_eq!(line["model"]["sha256"], manifest.artifact.sha256.as_str());
        assert_eq!(line["unet_calls"], 3);
        for suffix in ["map", "mask", "overlay"] {
            let name = format!("{stem}_{suffix}.png");
            let bytes_a = fs::read(a.join(&name)).unwrap();
            assert_eq!(bytes_a, fs::read(b.join(&name)).unwrap(), "{name} differs between identical runs");
            let img = image::load_from_memory(&bytes_a).unwrap();
            assert_eq!((img.width(), img.height()), (64, 64), "{name}");
        }
    }
    // A corrupt image is skipped, reported, and fails the run without losing the others.
    let corrupt = tmp.path().join("corrupt.png");
    fs::write(&corrupt, b"\x89PNG\r\n\x1a\nbroken").unwrap();
    let d = tmp.path().join("d");
    let o = run_cli(
        &[
            "infer",
            "--model",
            bundle.to_str().unwrap(),
            "--out",
            d.to_str().unwrap(),
            corrupt.to_str().unwrap(),
            images[0].to_str().unwrap(),
        ],
        false,
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("corrupt.png") && stderr.contains("1 of 2 images"), "{stderr}");
    assert!(d.join("brick_clean_mask.png").is_file());
}

/// The benchmark subcommand runs and prints one table row per batch size and step count.
#[test]
fn bench_prints_a_row_per_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tmp.path().join("m");
    export_cli(&bundle);
    let out = run_cli(
        &[
            "bench",
            "--model",
            bundle.to_str().unwrap(),
            "--batches",
            "1,2",
            "--ddim-steps",
            "1,3",
            "--t0",
            "6",
            "--repeats",
            "2",
        ],
        false,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("provider cpu"), "{stdout}");
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| 1 |") || l.starts_with("| 2 |")).collect();
    assert_eq!(rows.len(), 4, "{stdout}");

    // Whole frames through a tiled bundle: 160×100 in 64-pixel tiles 48 apart is 3 × 2 tiles.
    let tiled = tmp.path().join("tiled");
    export_cli_with(&tiled, &["--tile-stride", "48"]);
    let args = [
        "bench",
        "--model",
        tiled.to_str().unwrap(),
        "--batches",
        "4",
        "--ddim-steps",
        "2,1",
        "--t0",
        "6",
        "--repeats",
        "1",
    ];
    let out = run_cli(&[&args[..], &["--frames", "160x100,64x64"]].concat(), false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let frame_rows: Vec<Vec<&str>> = stdout
        .lines()
        .filter(|l| l.starts_with("| 160×100 |") || l.starts_with("| 64×64 |"))
        .map(|l| l.split(" | ").collect())
        .collect();
    assert_eq!(frame_rows.len(), 4, "two frames × two step counts: {stdout}");
    assert_eq!((frame_rows[0][1], frame_rows[0][2]), ("6", "2"), "{stdout}");
    assert_eq!((frame_rows[1][1], frame_rows[3][2]), ("1", "1"), "{stdout}");
    // Without --ddim-steps and --t0 the frames run at the bundle's own operating point (3
    // DDIM steps here), with the time of each stage: the UNet's is part of the frame's.
    let shipped = ["bench", "--model", tiled.to_str().unwrap(), "--batches", "4", "--repeats", "1"];
    let out = run_cli(&[&shipped[..], &["--frames", "160x100", "--frame-repeats", "2"]].concat(), false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("operating point: t0 30 × 3"), "{stdout}");
    let row: Vec<&str> = stdout.lines().find(|l| l.starts_with("| 160×100 |")).expect(&stdout).split(" | ").collect();
    assert_eq!((row[1], row[2]), ("6", "3"), "{stdout}");
    let [p50, unet]: [f64; 2] = [row[3], row[8]].map(|v| v.parse().unwrap());
    assert!(unet > 0.0 && unet <= p50 * 1.5, "UNet {unet} s of a {p50} s frame: {stdout}");
    let bad = run_cli(&[&args[..], &["--frames", "160by100"]].concat(), false);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("WIDTHxHEIGHT"));
}

/// A bundle with a learned head (random weights here): exported beside the denoiser with
/// parity and golden statistics, verified at load, run by `Inspector` as the map rule, and
/// refused when its file is corrupt or missing.
#[test]
fn a_bundle_with_a_head_is_verified_and_inspects_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("with-head");
    let config = small_config(1, false);
    let model = UNet::init(&config, 7, &Device::flex()).unwrap();
    let head_config = UNetConfig { channels: 2, ..small_config(1, false) };
    let head = UNet::init(&head_config, 8, &Device::flex()).unwrap();
    let mut manifest = manifest_for(&config, 16);
    manifest.anomaly.residual = Residual::Head;
    let trained =
        TrainedHead { model: head, unet: head_config, final_loss: 0.5, training_steps: 3, patch_channel: None };
    export_bundle(&model, manifest, &dir, &runtime(), false, |_, manifest, staged| {
        let (_, artifact) = export_head(&trained, manifest, staged, &runtime())?;
        manifest.head = Some(artifact);
        Ok(())
    })
    .unwrap();
    assert!(dir.join(HEAD_FILE).is_file());
    let bundle = Bundle::load(&dir, &runtime()).unwrap();
    assert!(bundle.head.is_some());
    let mut inspector = Inspector::new(bundle, None).unwrap();
    let frame: Vec<f32> = (0..16 * 16).map(|i| ((i as f32) * 0.37).sin() * 0.8).collect();
    let analysis = inspector.inspect(&[FrameView::new(&frame, [16, 16])], &[1]).unwrap();
    // Smoothed sigmoid probabilities: strictly inside (0, 1), not all equal.
    let map = &analysis[0].map;
    assert!(map.iter().all(|v| *v > 0.0 && *v < 1.0), "{map:?}");
    assert!(map.iter().any(|v| (v - map[0]).abs() > 1e-6));

    // A flipped byte in head.onnx, then a missing head.onnx: both refused, naming the file.
    let path = dir.join(HEAD_FILE);
    let good = fs::read(&path).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x10;
    fs::write(&path, &bad).unwrap();
    let e = Bundle::load(&dir, &runtime()).err().unwrap();
    assert!(matches!(e, BundleError::ShaMismatch { .. }) && e.to_string().contains("head.onnx"), "{e}");
    fs::remove_file(&path).unwrap();
    let e = Bundle::load(&dir, &runtime()).err().unwrap();
    assert!(matches!(e, BundleError::MissingFile { .. }) && e.to_string().contains("head.onnx"), "{e}");
    // A manifest that asks for the head rule without a head is inconsistent.
    let mut table: toml::Table = fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap().parse().unwrap();
    assert!(table.remove("head").is_some());
    fs::write(dir.join(MANIFEST_FILE), toml::to_string(&table).unwrap()).unwrap();
    let e = read_manifest(&dir).err().unwrap().to_string();
    assert!(e.contains("has no [head]"), "{e}");
}

/// Bilinear resize of one `[h, w]` plane to `[out_h, out_w]` with half-pixel centres
/// (ONNX `Resize`, mode linear, `half_pixel`): the reference for the feature graph.
fn resize_bilinear(plane: &[f32], [h, w]: [usize; 2], [out_h, out_w]: [usize; 2]) -> Vec<f32> {
    let sample = |pos: f32, len: usize| {
        let p = pos.clamp(0.0, (len - 1) as f32);
        let lo = p.floor() as usize;
        (lo, (lo + 1).min(len - 1), p - lo as f32)
    };
    let mut out = Vec::with_capacity(out_h * out_w);
    for oy in 0..out_h {
        let (y0, y1, fy) = sample((oy as f32 + 0.5) * h as f32 / out_h as f32 - 0.5, h);
        for ox in 0..out_w {
            let (x0, x1, fx) = sample((ox as f32 + 0.5) * w as f32 / out_w as f32 - 0.5, w);
            let at = |y: usize, x: usize| plane[y * w + x];
            let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
            let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// The feature-distance graph equals the same distance computed from burn's encoder
/// features, is zero where frame and reconstruction agree and largest where they differ.
#[test]
fn the_feature_graph_is_the_cosine_distance_of_the_encoder_features() {
    use burn::tensor::{Tensor, TensorData};
    use edge_inspect::infer::ensemble::feature_maps;
    use edge_inspect::model::onnx_export::export_feature_onnx;
    use edge_inspect::model::unet::BurnOps;

    let (n, size, t) = (2usize, 16usize, 10usize);
    let config = small_config(1, false);
    let model = UNet::init(&config, 7, &Device::flex()).unwrap();
    let graph = export_feature_onnx(&model, &config, "test");
    let mut features = OrtDenoiser::from_memory(&graph, Path::new("features"), 2, &runtime()).unwrap();
    let clean: Vec<f32> = (0..n * size * size).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let mut recon = clean.clone();
    for y in 4..8 {
        for x in 9..13 {
            recon[size * size + y * size + x] = -recon[size * size + y * size + x];
        }
    }
    let maps = feature_maps(&mut features, &clean, &recon, [n, 1, size, size], t).unwrap();

    let encode = |x: &[f32]| {
        let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), [n, 1, size, size]), &Device::flex());
        let t = Tensor::<1>::from_data(TensorData::new(vec![t as f32; n], [n]), &Device::flex());
        model.walk_features(&mut BurnOps, x, t)
    };
    let (fx, fr) = (encode(&clean), encode(&recon));
    let mut want = vec![vec![0.0f32; size * size]; n];
    for (a, b) in fx.into_iter().zip(fr) {
        let [_, c, h, w] = a.dims();
        let (a, b) = (a.into_data().try_into_vec::<f32>().unwrap(), b.into_data().try_into_vec::<f32>().unwrap());
        for (i, frame) in want.iter_mut().enumerate() {
            let distance: Vec<f32> = (0..h * w)
                .map(|p| {
                    let at = |v: &[f32], k: usize| v[(i * c + k) * h * w + p];
                    let dot: f32 = (0..c).map(|k| at(&a, k) * at(&b, k)).sum();
                    let na: f32 = (0..c).map(|k| at(&a, k) * at(&a, k)).sum();
                    let nb: f32 = (0..c).map(|k| at(&b, k) * at(&b, k)).sum();
                    1.0 - dot / (na * nb + 1e-12).sqrt()
                })
                .collect();
            for (m, d) in frame.iter_mut().zip(resize_bilinear(&distance, [h, w], [size, size])) {
                *m += d / 2.0;
            }
        }
    }
    for (got, want) in maps.iter().zip(&want) {
        let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "max |graph − reference| = {worst}");
    }
    assert!(maps[0].iter().all(|v| v.abs() < 1e-5), "identical frames must have zero distance");
    let inside: f32 = (4..8).flat_map(|y| (9..13).map(move |x| y * size + x)).map(|p| maps[1][p]).sum::<f32>() / 16.0;
    let far: f32 = (12..16).flat_map(|y| (0..4).map(move |x| y * size + x)).map(|p| maps[1][p]).sum::<f32>() / 16.0;
    assert!(inside > 10.0 * far.max(1e-6), "changed patch {inside} vs far corner {far}");
}

/// int8 (`model::quantize`): the observer graph exposes every convolution's input and
/// output, calibration on inputs of the kind the model sees gives each a range, and the QDQ
/// graph ORT runs from those ranges answers within a few percent of f32 on other inputs of
/// that kind, with its convolutions' weights stored as int8.
#[test]
fn an_int8_graph_calibrated_on_real_inputs_stays_close_to_f32() {
    use edge_inspect::model::onnx_export::export_onnx;
    use edge_inspect::model::quantize::{Ranges, observer, quantize};
    use std::sync::{Arc, Mutex};

    let config = small_config(1, true);
    let model = UNet::init(&config, 7, &Device::flex()).unwrap();
    let onnx = export_onnx(&model, &config, "test");
    let label = Path::new("int8-test");
    let inputs = |seed: usize| -> (Vec<f32>, Vec<f32>) {
        let x = (0..4 * 16 * 16).map(|i| ((i + seed) as f32 * 0.37).sin() * ((i as f32) * 0.05).cos()).collect();
        (x, vec![10.0 + seed as f32, 40.0, 120.0, 300.0])
    };
    let (observed, names) = observer(&onnx, &[]).unwrap();
    let convs = names.len();
    assert!(convs >= 10, "the small UNet has a dozen convolutions, observed {convs} tensors");
    let mut session = OrtDenoiser::from_memory(&observed, label, 1, &runtime()).unwrap();
    let ranges = Arc::new(Mutex::new(Ranges::default()));
    let sink = Arc::clone(&ranges);
    session.observe(Box::new(move |name, values| sink.lock().unwrap().observe(name, values)));
    for seed in 0..4 {
        let (x, t) = inputs(seed);
        session.predict_raw(&x, [4, 1, 16, 16], &t, &mut |_, _| {}).unwrap();
    }
    let ranges = ranges.lock().unwrap().clone();
    let int8 = quantize(&onnx, &ranges, &[]).unwrap();
    assert!(int8.len() < onnx.len() / 2, "int8 weights: {} bytes against {} for f32", int8.len(), onnx.len());

    let (x, t) = inputs(9);
    let mut f32_out = Vec::new();
    OrtDenoiser::from_memory(&onnx, label, 1, &runtime())
        .unwrap()
        .predict_raw(&x, [4, 1, 16, 16], &t, &mut |_, out| f32_out = out.to_vec())
        .unwrap();
    let mut int8_out = Vec::new();
    OrtDenoiser::from_memory(&int8, label, 1, &runtime())
        .unwrap()
        .predict_raw(&x, [4, 1, 16, 16], &t, &mut |_, out| int8_out = out.to_vec())
        .unwrap();
    let mean_abs = |v: &[f32]| v.iter().map(|a| a.abs() as f64).sum::<f64>() / v.len() as f64;
    let diff: Vec<f32> = f32_out.iter().zip(&int8_out).map(|(a, b)| a - b).collect();
    let relative = mean_abs(&diff) / mean_abs(&f32_out);
    // 7-bit weights (`quantize::WEIGHT_MAX`, safe from the u8·s8 saturation of CPUs without
    // VNNI): 0.055 on an AVX2-only EPYC, where 8-bit weights saturated to 0.42.
    assert!(relative < 0.08, "int8 differs from f32 by {relative:.4} (mean |Δ| / mean |f32|)");
    assert!(relative > 0.0, "the int8 graph computes something else than the f32 one");

    // Without a range for a convolution's tensors there is no graph.
    let err = quantize(&onnx, &Ranges::default(), &[]).unwrap_err();
    assert!(err.contains("calibration observed no values of tensor"), "{err}");
}

/// The fp16 copy computes what the f32 graph does (to f16's precision) over the whole
/// timestep range: the timestep branch stays f32, the frame path runs in f16.
#[test]
fn an_fp16_graph_keeps_the_timestep_branch_in_f32_and_stays_close_to_f32() {
    use edge_inspect::model::half::to_fp16;
    use edge_inspect::model::onnx_export::export_onnx;
    use onnx_ir::{Message, ModelProto};

    let config = small_config(1, true);
    let model = UNet::init(&config, 7, &Device::flex()).unwrap();
    let onnx = export_onnx(&model, &config, "test");
    let fp16 = to_fp16(&onnx).unwrap();
    let graph = ModelProto::parse_from_bytes(&fp16).unwrap().graph.unwrap();
    let halves = graph.initializer.iter().filter(|t| t.data_type == 10).count();
    assert!(halves >= 20, "{halves} f16 weights");
    assert!(fp16.len() < onnx.len() * 7 / 10, "f16 weights: {} bytes against {} for f32", fp16.len(), onnx.len());
    let sin = graph.node.iter().find(|n| n.op_type == "Sin").expect("the timestep embedding");
    assert!(!sin.input[0].ends_with("_f16"), "the embedding's argument must stay f32: {:?}", sin.input);

    let label = Path::new("fp16-test");
    let x: Vec<f32> = (0..4 * 16 * 16).map(|i| (i as f32 * 0.37).sin() * ((i as f32) * 0.05).cos()).collect();
    let run = |graph: &[u8], t: &[f32]| {
        let mut out = Vec::new();
        OrtDenoiser::from_memory(graph, label, 1, &runtime())
            .unwrap()
            .predict_raw(&x, [4, 1, 16, 16], t, &mut |_, o| out = o.to_vec())
            .unwrap();
        out
    };
    let mean_abs = |v: &[f32]| v.iter().map(|a| a.abs() as f64).sum::<f64>() / v.len() as f64;
    for t in [[0.0, 1.0, 2.0, 3.0], [500.0, 777.0, 998.0, 999.0]] {
        let (f32_out, f16_out) = (run(&onnx, &t), run(&fp16, &t));
        let diff: Vec<f32> = f32_out.iter().zip(&f16_out).map(|(a, b)| a - b).collect();
        let relative = mean_abs(&diff) / mean_abs(&f32_out);
        assert!(relative < 0.01, "t {t:?}: fp16 differs from f32 by {relative:.5} (mean |Δ| / mean |f32|)");
        assert!(relative > 0.0, "t {t:?}: the fp16 graph computes in f32");
    }
    let err = to_fp16(b"not a model").unwrap_err();
    assert!(err.contains("not an ONNX model"), "{err}");
}
