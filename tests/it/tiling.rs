//! Native-resolution inspection in tiles, with a real ONNX Runtime session: the demo model
//! (trained on random 64-pixel crops of 128×128 brick frames, i.e. at native scale) given a
//! tiled manifest, frames larger than one tile and not divisible by the stride, a pasted
//! defect at known camera coordinates, and batch compositions that must not matter.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use edge_inspect::infer::bundle::Bundle;
use edge_inspect::infer::inspect::{FrameView, Inspector};
use edge_inspect::infer::runtime::RuntimeConfig;
use edge_inspect::model::preprocess::{Inspection, Prepared};
use image::{DynamicImage, GrayImage, Luma};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of the demo bundle with `inspection` (a TOML table body) instead of its own.
fn demo_copy(dir: &Path, name: &str, inspection: &str) -> PathBuf {
    let bundle = dir.join(name);
    fs::create_dir_all(&bundle).unwrap();
    let source = repo().join("models/brick-huber");
    fs::copy(source.join("model.onnx"), bundle.join("model.onnx")).unwrap();
    let manifest = fs::read_to_string(source.join("manifest.toml")).unwrap();
    let own = manifest.find("\n[inspection]").expect("the demo bundle states its inspection");
    let rest = manifest[own + 1..].find("\n[").map_or(String::new(), |end| manifest[own + 1 + end..].to_string());
    let text = format!("{}{rest}\n[inspection]\n{inspection}\n", &manifest[..own]);
    fs::write(bundle.join("manifest.toml"), text).unwrap();
    bundle
}

/// The demo bundle as shipped: tiles of 64 at native scale, 48 apart.
fn tiled_demo(dir: &Path) -> PathBuf {
    demo_copy(dir, "brick-tiled", "mode = \"tiled\"\nscale = 1.0\nstride = 48")
}

/// A 128×128 brick frame from the project's own data with a white 6×6 patch whose
/// top-left corner is at camera pixel (100, 30).
fn frame_with_defect() -> GrayImage {
    let mut frame = image::open(repo().join("data/brick/train/good/000.png")).unwrap().to_luma8();
    assert_eq!(frame.dimensions(), (128, 128));
    for y in 30..36 {
        for x in 100..106 {
            frame.put_pixel(x, y, Luma([255]));
        }
    }
    frame
}

fn load(bundle: &Path) -> Inspector {
    assert!(std::env::var_os("ORT_DYLIB_PATH").is_some(), "set ORT_DYLIB_PATH (scripts/fetch-onnxruntime.sh)");
    Inspector::new(Bundle::load(bundle, &RuntimeConfig::default()).unwrap(), None).unwrap()
}

fn prepare(inspector: &Inspector, image: &GrayImage) -> Prepared {
    let manifest = inspector.manifest();
    manifest.input.prepare_for(manifest.inspection, &DynamicImage::ImageLuma8(image.clone()))
}

fn view(p: &Prepared) -> FrameView<'_> {
    FrameView::new(&p.tensor, p.size())
}

#[test]
fn infer_on_a_frame_larger_than_a_tile_answers_in_camera_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = tiled_demo(tmp.path());
    let image = tmp.path().join("frame.png");
    frame_with_defect().save(&image).unwrap();
    let out = tmp.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_edge-inspect"))
        .args(["infer", "--model", bundle.to_str().unwrap(), "--out", out.to_str().unwrap(), "--seed", "3"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for name in ["frame_map.png", "frame_mask.png", "frame_overlay.png"] {
        assert_eq!(image::image_dimensions(out.join(name)).unwrap(), (128, 128), "{name} is not at camera size");
    }
    let regions = line["regions"].as_array().unwrap();
    assert!(!regions.is_empty(), "the white patch should be found: {line}");
    let bbox = |r: &serde_json::Value| -> Vec<u64> {
        r["bbox"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect()
    };
    for r in regions {
        let b = bbox(r);
        assert!(b[0] + b[2] <= 128 && b[1] + b[3] <= 128, "region outside the frame: {b:?}");
    }
    let strongest = regions
        .iter()
        .max_by(|a, b| a["max_score"].as_f64().unwrap().total_cmp(&b["max_score"].as_f64().unwrap()))
        .unwrap();
    let b = bbox(strongest);
    assert!(
        b[0] <= 103 && 103 < b[0] + b[2] && b[1] <= 33 && 33 < b[1] + b[3],
        "strongest region {b:?} misses the patch at (100..106, 30..36)"
    );
    assert_eq!(line["label"], "anomalous");
}

#[test]
fn tiled_results_do_not_depend_on_the_batch_and_one_tile_frames_are_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tiled = load(&tiled_demo(tmp.path()));
    assert_eq!(tiled.manifest().inspection, Inspection::Tiled { scale: 1.0, stride: 48 });
    let big = frame_with_defect();
    let small = image::open(repo().join("data/brick/test/good/000.png")).unwrap().to_luma8();
    assert_eq!(small.dimensions(), (64, 64));
    let (big, small) = (prepare(&tiled, &big), prepare(&tiled, &small));
    assert_eq!((big.size(), small.size()), ([128, 128], [64, 64]));
    assert_eq!(tiled.tile_grid(big.size()).tiles.len(), 9, "starts 0, 48, 64 in each direction");

    let seeds = [11, 12];
    let alone = tiled.inspect(&[view(&big), view(&small)], &seeds).unwrap();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let mut mixed = load(&tiled_demo(&tmp.path().join("again")))
        .with_tile_batch(4)
        .with_progress(move || _ = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let shared = mixed.inspect(&[view(&small), view(&big)], &[seeds[1], seeds[0]]).unwrap();
    // 1 + 9 tiles in UNet batches of 4: progress after each of the 3 batches (the watchdog).
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    for (a, b) in [(&alone[0], &shared[1]), (&alone[1], &shared[0])] {
        assert_eq!((a.height, a.width), (b.height, b.width));
        let worst = a.map.iter().zip(&b.map).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-5, "batch composition changed a map by {worst}");
    }

    // A frame of exactly one tile is what the same model sees with whole-frame resizing.
    let mut resize = load(&demo_copy(tmp.path(), "brick-resize", "mode = \"resize\""));
    assert_eq!(resize.manifest().inspection, Inspection::Resize);
    let old = resize.inspect(&[view(&small)], &[seeds[1]]).unwrap();
    assert_eq!(old[0].map, alone[1].map);
    assert_eq!(old[0].regions, alone[1].regions);
    assert_eq!(old[0].score, alone[1].score);
}

/// A camera's inspection mask: tiles without an inspected pixel are never computed, pixels
/// outside it score the calibration's lowest (so a defect there raises nothing), and inside
/// it the map is the unmasked one.
#[test]
fn tiles_outside_the_inspection_mask_are_not_computed_and_score_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bundle = demo_copy(tmp.path(), "side-by-side", "mode = \"tiled\"\nscale = 1.0\nstride = 64");
    let (mut whole, mut masked) = (load(&bundle), load(&bundle));
    let frame = prepare(&whole, &frame_with_defect());
    let [h, w] = frame.size();
    // Only the left half (x < 64) is inspected; the defect is at x = 100..106.
    let mask: Vec<u8> = (0..h * w).map(|i| u8::from(i % w < 64)).collect();
    let unmasked = whole.inspect(&[view(&frame)], &[5]).unwrap().remove(0);
    let cut = masked.inspect(&[FrameView { inspect: Some(&mask), ..view(&frame) }], &[5]).unwrap().remove(0);
    assert_eq!((whole.tile_counts()[0], masked.tile_counts()[0]), (4, 2), "two of four tiles computed");
    let fill = masked.manifest().thresholds.pixel.min as f32;
    let (mut right, mut left) = (0.0f32, 0.0f32);
    for y in 0..h {
        for x in 0..w {
            let (a, b) = (unmasked.map[y * w + x], cut.map[y * w + x]);
            if x >= 80 {
                assert!((b - fill).abs() < 1e-4, "({x}, {y}) outside the mask scores {b}, not {fill}");
                right = right.max(a);
            } else if x < 48 {
                left = left.max((a - b).abs());
            }
        }
    }
    assert!(left < 1e-5, "inside the mask the map changed by {left}");
    let threshold = masked.manifest().thresholds.pixel.value as f32;
    assert!(right > threshold && unmasked.anomalous, "the defect at x = 100 scores {right} unmasked ({threshold})");
    assert!(cut.score < unmasked.score, "masked out, the defect no longer sets the image score");
}
