//! `synth` + `eval` through the binary: a generated benchmark scored by the demo model with
//! a real ONNX Runtime session, and the dataset errors `eval` must report clearly.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn edge_inspect(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-inspect")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn synth(out: &Path, size: u32, contamination: &str) {
    let texture = repo().join("tests/fixtures/brick_texture.png");
    let (ok, stdout, stderr) = edge_inspect(&[
        "synth",
        "--texture",
        texture.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--size",
        &size.to_string(),
        "--train",
        "10",
        "--test-good",
        "6",
        "--test-per-type",
        "2",
        "--contamination",
        contamination,
        "--seed",
        "4",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("defective / (normal + defective)"), "the ratio definition is stated: {stdout}");
}

/// `eval` of the demo model at 3 DDIM steps with 3 overlays, plus `extra` flags.
fn eval_with(data: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let model = repo().join("models/brick-huber");
    let (model, data, out) = (model.to_str().unwrap(), data.to_str().unwrap(), out.to_str().unwrap());
    let base =
        ["eval", "--model", model, "--data", data, "--out", out, "--overlays", "3", "--no-progress", "--steps", "3"];
    edge_inspect(&[&base[..], extra].concat())
}

fn eval(data: &Path, out: &Path) -> (bool, String, String) {
    eval_with(data, out, &[])
}

#[test]
fn eval_scores_a_generated_benchmark() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bench");
    synth(&data, 64, "0.2");
    let out = dir.path().join("report");
    let (ok, stdout, stderr) = eval(&data, &out);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("| all |") && stdout.contains("| scratch |"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let overall = &report["overall"];
    assert_eq!(overall["images"], 16);
    assert_eq!(overall["anomalous"], 10);
    for key in ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro", "image_best_f1", "pixel_best_f1"] {
        let v = overall[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {overall}"));
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    // The demo model sees pasted defects on its own texture far better than chance.
    assert!(overall["pixel_auroc"].as_f64().unwrap() > 0.7, "{overall}");
    assert_eq!(report["unet_calls_per_image"], 3);
    assert!(report["ms_per_image"].as_f64().unwrap() > 0.0);
    let types: Vec<&String> = report["per_type"].as_object().unwrap().keys().collect();
    assert_eq!(types, ["crack", "foreign", "hole", "scratch", "stain"]);
    assert_eq!(report["per_type"]["hole"]["images"], 8, "6 good + 2 hole");
    assert_eq!(report["overlays"].as_array().unwrap().len(), 3);
    assert!(out.join("summary.md").is_file());
    for overlay in report["overlays"].as_array().unwrap() {
        let img = image::open(out.join(overlay.as_str().unwrap())).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }

    // At sensitivity 10 the same scores meet a tenth of the thresholds: the threshold-free
    // metrics stay, the deployed verdicts flag at least as many images.
    let (ok, _, stderr) = eval_with(&data, &dir.path().join("s10"), &["--sensitivity", "10"]);
    assert!(ok, "{stderr}");
    let s10: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("s10/report.json")).unwrap()).unwrap();
    assert_eq!((report["sensitivity"].as_f64(), s10["sensitivity"].as_f64()), (Some(1.0), Some(10.0)));
    assert_eq!(s10["overall"]["image_auroc"], overall["image_auroc"]);
    let flagged =
        |d: &serde_json::Value| d["true_positives"].as_u64().unwrap() + d["false_positives"].as_u64().unwrap();
    let (at1, at10) = (flagged(&overall["deployed"]), flagged(&s10["overall"]["deployed"]));
    assert!(at10 >= at1 && at10 > 0, "flagged at 1: {at1}, at 10: {at10}");
    let (ok, _, stderr) = eval_with(&data, &dir.path().join("s0"), &["--sensitivity", "0"]);
    assert!(!ok && stderr.contains("\"0\""), "{stderr}");

    // The feature map rule: its graph is derived from the bundle's weights on the fly.
    let feature_eval = |out: &Path, t: &str| eval_with(&data, out, &["--anomaly-map", "feature", "--feature-t", t]);
    let (ok, _, stderr) = feature_eval(&dir.path().join("feature"), "10");
    assert!(ok, "{stderr}");
    let feature: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("feature/report.json")).unwrap()).unwrap();
    assert_eq!(feature["anomaly"]["residual"], "feature");
    assert_eq!(feature["anomaly"]["feature_t"], 10);
    let auroc = feature["overall"]["pixel_auroc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&auroc) && auroc != overall["pixel_auroc"].as_f64().unwrap(), "{auroc}");
    let (ok, _, stderr) = feature_eval(&dir.path().join("bad"), "1000");
    assert!(!ok && stderr.contains("feature_t = 1000"), "{stderr}");
    // A fusion weight needs a bundle that fuses a patch map; the demo model has none.
    let (ok, _, stderr) = eval_with(&data, &dir.path().join("fw"), &["--fusion-weight", "0.5"]);
    assert!(!ok && stderr.contains("--fusion-weight 0.5") && stderr.contains("brick-huber"), "{stderr}");
    let (ok, _, stderr) = eval_with(&data, &dir.path().join("fw"), &["--fusion-weight", "2"]);
    assert!(!ok && stderr.contains("\"2\""), "{stderr}");
}

#[test]
fn eval_rejects_mismatched_and_malformed_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    // Images of another size than the model's input.
    let small = dir.path().join("small");
    synth(&small, 32, "0");
    let (ok, _, stderr) = eval(&small, &out);
    assert!(!ok && stderr.contains("32x32") && stderr.contains("64x64") && stderr.contains("--resize"), "{stderr}");
    // An empty directory and a directory of the wrong shape.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (ok, _, stderr) = eval(&empty, &out);
    assert!(!ok && stderr.contains("not an evaluation dataset"), "{stderr}");
    let (ok, _, stderr) = eval(&dir.path().join("missing"), &out);
    assert!(!ok && stderr.contains("not found"), "{stderr}");
    // A mask that does not match its image, then a missing mask.
    let data = dir.path().join("bench");
    synth(&data, 64, "0");
    let mask = data.join("ground_truth/stain/001_mask.png");
    image::GrayImage::new(40, 64).save(&mask).unwrap();
    let (ok, _, stderr) = eval(&data, &out);
    assert!(!ok && stderr.contains("001_mask.png") && stderr.contains("40x64"), "{stderr}");
    std::fs::remove_file(&mask).unwrap();
    let (ok, _, stderr) = eval(&data, &out);
    assert!(!ok && stderr.contains("no ground-truth mask") && stderr.contains("stain/001.png"), "{stderr}");
    // Only normal test images: AUROC is undefined, said so.
    for t in ["scratch", "hole", "stain", "crack", "foreign"] {
        std::fs::remove_dir_all(data.join("test").join(t)).unwrap();
    }
    let (ok, _, stderr) = eval(&data, &out);
    assert!(!ok && stderr.contains("no anomalous test images"), "{stderr}");
}

#[test]
fn eval_scores_full_resolution_frames_at_native_resolution() {
    // The demo's line frames as an anomalib Folder dataset: 128×256 images, native masks.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("line");
    for sub in ["good", "bad", "mask"] {
        std::fs::create_dir_all(data.join(sub)).unwrap();
    }
    let line = repo().join("data/brick/line");
    std::fs::copy(line.join("000_good.png"), data.join("good/000_good.png")).unwrap();
    for name in ["001_scratch.png", "002_stain.png"] {
        std::fs::copy(line.join(name), data.join("bad").join(name)).unwrap();
        std::fs::copy(repo().join("data/brick/line-masks").join(name), data.join("mask").join(name)).unwrap();
    }
    let out = dir.path().join("report");
    let (ok, stdout, stderr) = eval(&data, &out);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let pixel_auroc = report["overall"]["pixel_auroc"].as_f64().unwrap_or_else(|| panic!("{stdout}"));
    // Both small defects are found by the tiled demo model at native resolution.
    assert!(pixel_auroc > 0.9, "pixel AUROC {pixel_auroc}: {stdout}");
    assert_eq!(report["overall"]["image_auroc"].as_f64(), Some(1.0), "{stdout}");
    for overlay in report["overlays"].as_array().unwrap() {
        let img = image::open(out.join(overlay.as_str().unwrap())).unwrap();
        assert_eq!((img.width(), img.height()), (128, 256), "overlays at native resolution");
    }
}
