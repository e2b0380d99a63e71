//! `retrain` end to end on tiny real images: loss goes down, resume is bit-exact, the
//! bundle passes the model core's checks and `infer`, bad files are skipped and reported.
//!
//! Needs `ORT_DYLIB_PATH` (set by `.ci/run`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use edge_inspect::infer::bundle::{Bundle, read_manifest};
use edge_inspect::infer::ensemble::{Ensemble, MapGraphs, patch_maps};
use edge_inspect::infer::inspect::{FrameView, Inspector};
use edge_inspect::infer::runtime::RuntimeConfig;
use edge_inspect::model::architecture::UNetConfig;
use edge_inspect::model::diffusion::{NoiseSchedule, ScheduleSpec};
use edge_inspect::model::manifest::ONNX_FILE;
use edge_inspect::model::preprocess::{InputSpec, Inspection};
use edge_inspect::model::sampling::{ReconstructionSpec, Sampler};
use edge_inspect::postprocess::anomaly::{AnomalySpec, Residual};
use edge_inspect::postprocess::screen::{Screen, screen_score};
use edge_inspect::train::calibrate::CalibrationRule;
use edge_inspect::train::head::HeadConfig;
use edge_inspect::train::losses::Loss;
use edge_inspect::train::operating_point::SearchSpace;
use edge_inspect::train::patch_model::{PatchConfig, PatchKind};
use edge_inspect::train::{Outcome, RunOptions, TrainConfig, TrainDevice, TrainError, train};
use rand::{Rng, SeedableRng};

const BIN: &str = env!("CARGO_BIN_EXE_edge-inspect");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A folder of real frames: the committed brick crops, one with a pasted defect
/// (contamination), plus flipped copies.
fn tiny_dataset(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    for name in ["brick_clean.png", "brick_clean_2.png", "brick_stain.png"] {
        let img = image::open(fixture(name)).unwrap();
        img.save(dir.join(name)).unwrap();
        img.fliph().save(dir.join(format!("flipped_{name}"))).unwrap();
    }
}

fn config(loss: Loss, steps: usize) -> TrainConfig {
    TrainConfig {
        name: "tiny".into(),
        version: "0.1.0".into(),
        input: InputSpec { width: 16, height: 16, ..InputSpec::default() },
        inspection: Inspection::default(),
        unet: UNetConfig {
            channels: 1,
            base_channels: 16,
            channel_mults: vec![1, 2],
            res_blocks: 1,
            attention: false,
            groups: 8,
        },
        schedule: ScheduleSpec::default(),
        reconstruction: ReconstructionSpec { t0: 20, steps: 2, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 },
        anomaly: AnomalySpec::default(),
        loss,
        steps,
        batch_size: 8,
        learning_rate: 2e-3,
        warmup_steps: 2,
        weight_decay: 0.0,
        grad_clip_norm: 1.0,
        ema_decay: 0.9,
        seed: 11,
        flips: true,
        random_crop: Some(48),
        calibration_fraction: 0.2,
        calibration: CalibrationRule::default(),
        operating_point: None,
        head: None,
        patch: None,
        int8: None,
        fp16: None,
    }
}

fn options(data: &Path, out: &Path) -> RunOptions {
    assert!(std::env::var_os("ORT_DYLIB_PATH").is_some(), "set ORT_DYLIB_PATH (scripts/fetch-onnxruntime.sh)");
    RunOptions {
        data: data.to_path_buf(),
        layout: None,
        out: out.to_path_buf(),
        force: false,
        init: None,
        checkpoint_dir: out.with_extension("ckpt"),
        checkpoint_every: 0,
        resume: false,
        stop_after: None,
        export_every: 0,
        interim_dir: out.with_extension("interim"),
        runtime: RuntimeConfig::default(),
        report: Some(out.with_extension("report.json")),
        progress: false,
        command: "test".into(),
        interrupt: Arc::new(AtomicBool::new(false)),
        device: TrainDevice::Cpu,
    }
}

#[test]
fn short_training_lowers_the_loss_and_exports_a_loadable_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    fs::write(data.join("corrupt.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    fs::write(data.join("notes.txt"), b"ignored: not an image").unwrap();
    let out = tmp.path().join("bundle");
    let Outcome::Finished { bundle, report } =
        train(config(Loss::Huber { delta: 0.2 }, 40), &options(&data, &out)).unwrap()
    else {
        panic!("expected a finished run");
    };
    let deciles = &report.loss.deciles;
    assert!(deciles.last().unwrap() < &(deciles[0] * 0.7), "loss did not go down: {deciles:?}");
    assert_eq!(report.data.loaded, 6);
    assert_eq!(report.data.skipped.len(), 1, "{:?}", report.data.skipped);
    assert!(report.data.skipped[0].path.ends_with("corrupt.png"));
    assert_eq!(report.data.training_frames + report.data.calibration_frames, 6);
    let written: serde_json::Value =
        serde_json::from_slice(&fs::read(out.with_extension("report.json")).unwrap()).unwrap();
    assert_eq!(written["data"]["skipped"][0]["path"].as_str().unwrap(), report.data.skipped[0].path);
    // The step's phases are timed and account for the loop's time.
    let p = report.step_phases;
    let timed = p.batch + p.forward + p.backward + p.optimizer + p.ema + p.other;
    assert!(p.forward > 0.0 && p.backward > 0.0 && p.optimizer > 0.0 && p.ema > 0.0, "{p:?}");
    assert!(
        timed <= report.seconds_per_step * 1.001 && timed > report.seconds_per_step * 0.9,
        "{p:?} vs {}",
        report.seconds_per_step
    );
    assert!(written["step_phases"]["backward"].as_f64().unwrap() > 0.0);

    let manifest = read_manifest(&bundle).unwrap();
    assert_eq!(manifest.provenance.loss, "huber");
    assert_eq!(manifest.provenance.huber_delta, Some(0.2));
    assert!(manifest.thresholds.calibration.frames >= 1);
    assert!(manifest.thresholds.pixel.value > 0.0 && manifest.thresholds.image.value > 0.0);
    Bundle::load(&bundle, &RuntimeConfig::default()).unwrap();
    // The report names the held-out frames, highest score first; the highest one the trim
    // kept is the image threshold (quantile 1).
    let held_out = &report.held_out;
    assert_eq!(held_out.len(), report.data.calibration_frames);
    assert!(held_out.windows(2).all(|w| w[0].image_score >= w[1].image_score), "{held_out:?}");
    assert!(held_out.iter().all(|f| f.file.starts_with(data.to_str().unwrap()) && f.file.ends_with(".png")));
    let kept: Vec<_> = held_out.iter().filter(|f| !f.trimmed).collect();
    assert_eq!(kept.len(), manifest.thresholds.calibration.frames);
    assert!((kept[0].image_score - manifest.thresholds.image.value).abs() < 1e-9, "{held_out:?}");

    let o = Command::new(BIN)
        .args(["infer", "--model", bundle.to_str().unwrap(), "--out", tmp.path().join("infer").to_str().unwrap()])
        .arg(fixture("brick_scratch.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(line["model"]["sha256"], manifest.artifact.sha256.as_str());

    // Fine-tuning from the bundle starts from its weights: the first loss is already low.
    let mut opts = options(&data, &tmp.path().join("tuned"));
    opts.init = Some(bundle.clone());
    let Outcome::Finished { report: tuned, .. } = train(config(Loss::Lts { lambda: 0.8 }, 4), &opts).unwrap() else {
        panic!()
    };
    assert!(
        tuned.loss.first < report.loss.first * 0.7,
        "fine-tune first loss {} vs scratch {}",
        tuned.loss.first,
        report.loss.first
    );
}

#[test]
fn retrain_chooses_the_operating_point_within_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    let out = tmp.path().join("searched");
    let mut with_search = config(Loss::Huber { delta: 0.2 }, 10);
    with_search.operating_point = Some(SearchSpace {
        t0: vec![5, 20],
        steps: vec![1, 2, 4],
        condition: vec![0.0, 2.0],
        residual: vec![Residual::L1, Residual::Ssim, Residual::Msgms],
        max_frames: 8,
        ..SearchSpace::with_budget(2)
    });
    let Outcome::Finished { bundle, report } = train(with_search, &options(&data, &out)).unwrap() else { panic!() };
    let manifest = read_manifest(&bundle).unwrap();
    let point = manifest.operating_point.clone().expect("the search is recorded in the manifest");
    // Singles: 2 t0 × 2 step counts within budget (1, 2; 4 is over) × 2 conditions × 3 rules;
    // ensembles: t0 5 + 20 at one step each (2 calls) × 2 conditions × 3 rules.
    assert_eq!(point.candidates.len(), 24 + 6, "{:#?}", point.candidates);
    assert!(point.candidates.iter().all(|c| c.unet_calls <= 2 && c.unet_calls == c.steps * (1 + c.extra_t0.len())));
    let best = point.candidates.iter().map(|c| c.pixel_auprc).fold(f64::MIN, f64::max);
    assert_eq!(point.chosen, point.candidates[0]);
    assert_eq!(point.chosen.pixel_auprc, best);
    assert!(point.candidates.iter().all(|c| (0.0..=1.0).contains(&c.pixel_auprc)));
    assert_eq!(
        point.defect_kinds,
        ["scratch", "hole", "stain", "lines", "shift", "transplant", "patch"],
        "never the benchmark's test-only crack, foreign, wear or dent"
    );
    assert!(point.rule.contains("scratch/lines | hole/stain/shift | transplant/patch"), "{}", point.rule);
    assert!(point.fusion_candidates.is_empty(), "no patch model, no fusion weight to search");
    assert_eq!(
        (manifest.reconstruction.t0, manifest.reconstruction.steps, manifest.reconstruction.condition),
        (point.chosen.t0, point.chosen.steps, point.chosen.condition)
    );
    assert_eq!(manifest.anomaly.residual, point.chosen.residual);
    assert_eq!(manifest.extra_t0(), point.chosen.extra_t0.as_slice());
    assert_eq!(report.operating_point, Some(point.chosen.clone()));
    // Thresholds are calibrated under the chosen rule, and the bundle verifies.
    assert!(manifest.thresholds.pixel.value > 0.0);
    Bundle::load(&bundle, &RuntimeConfig::default()).unwrap();
}

#[test]
fn retrain_trains_a_head_and_ships_it_only_where_it_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    let out = tmp.path().join("with-head");
    let mut with_head = config(Loss::Huber { delta: 0.2 }, 10);
    with_head.operating_point = Some(SearchSpace {
        t0: vec![5, 20],
        steps: vec![1],
        condition: vec![0.0],
        residual: vec![Residual::L1],
        max_frames: 8,
        ..SearchSpace::with_budget(1)
    });
    with_head.head = Some(HeadConfig { frames: 16, ..HeadConfig::with_steps(60) });
    // The fusion weight searched too (`--patch-fusion auto`), with the group heads where the
    // head wins.
    with_head.patch = Some(PatchConfig { tiles: 16, ..PatchConfig::with_backbone(backbone(), 0.1, None) });
    let Outcome::Finished { bundle, .. } = train(with_head, &options(&data, &out)).unwrap() else { panic!() };
    let manifest = read_manifest(&bundle).unwrap();
    let point = manifest.operating_point.clone().unwrap();
    let weights: Vec<f64> = point.fusion_candidates.iter().map(|f| f.patch_weight).collect();
    assert_eq!(weights.len(), 5, "every fusion weight is scored: {weights:?}");
    let best = &point.fusion_candidates[0];
    assert!(point.fusion_candidates.iter().all(|f| f.pixel_auprc <= best.pixel_auprc), "{weights:?}");
    match manifest.anomaly.fusion {
        Some(fusion) => assert_eq!(fusion.patch_weight, best.patch_weight, "{:?}", point.fusion_candidates),
        None => assert!(best.patch_weight == 1.0 && manifest.anomaly.residual == Residual::Patch),
    }
    let head_score = point.candidates.iter().find(|c| c.residual == Residual::Head).expect("the head is scored");
    let best_pixel_rule = point.candidates.iter().find(|c| c.residual != Residual::Head).unwrap();
    assert_eq!(
        (head_score.t0, head_score.steps),
        (best_pixel_rule.t0, best_pixel_rule.steps),
        "scored at the searched point"
    );
    let shipped = manifest.head.is_some();
    assert_eq!(shipped, point.chosen.residual == Residual::Head);
    assert_eq!(shipped, bundle.join("head.onnx").is_file(), "head.onnx ships exactly when chosen");
    eprintln!("head AUPRC {} vs L1 {}", head_score.pixel_auprc, best_pixel_rule.pixel_auprc);
    let loaded = Bundle::load(&bundle, &RuntimeConfig::default()).unwrap();
    assert_eq!(loaded.head.is_some(), shipped);
    if shipped {
        // The head is verified like the denoiser: a flipped byte is refused.
        flip_last_byte(&bundle.join("head.onnx"));
        let e =
            Bundle::load(&bundle, &RuntimeConfig::default()).err().expect("a corrupt head must not load").to_string();
        assert!(e.contains("head.onnx") && e.contains("sha256"), "{e}");
    }
}

/// A search of one candidate: t0 `t0`, one DDIM step, no conditioning, the L1 map, on at
/// most 8 frames.
fn one_candidate(t0: usize) -> SearchSpace {
    SearchSpace {
        t0: vec![t0],
        steps: vec![1],
        condition: vec![0.0],
        residual: vec![Residual::L1],
        max_frames: 8,
        ..SearchSpace::with_budget(1)
    }
}

/// Corrupts a bundle file the way a bad copy would.
fn flip_last_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    fs::write(path, bytes).unwrap();
}

/// The checkpoint `scripts/fetch-backbone.sh` fetched (exported by `scripts/setup.sh`).
fn backbone() -> PathBuf {
    PathBuf::from(
        std::env::var_os("EDGE_INSPECT_BACKBONE").expect("set EDGE_INSPECT_BACKBONE (scripts/fetch-backbone.sh)"),
    )
}

/// Mean of `map` inside and outside the mask `mask_name` (resized to the map).
fn inside_outside(map: &[f32], size: usize, mask_name: &str) -> (f64, f64) {
    let mask = image::open(fixture(mask_name)).unwrap().to_luma8();
    let mask = image::imageops::resize(&mask, size as u32, size as u32, image::imageops::FilterType::Nearest);
    let (mut inside, mut outside) = ((0.0, 0), (0.0, 0));
    for (i, p) in mask.pixels().enumerate() {
        let bucket = if p[0] > 127 { &mut inside } else { &mut outside };
        bucket.0 += map[i] as f64;
        bucket.1 += 1;
    }
    (inside.0 / inside.1 as f64, outside.0 / outside.1 as f64)
}

#[test]
fn retrain_fits_a_patch_model_that_ships_verified_and_finds_pasted_defects() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    let out = tmp.path().join("with-patch");
    let mut with_patch = config(Loss::Huber { delta: 0.2 }, 6);
    with_patch.input = InputSpec { width: 32, height: 32, ..InputSpec::default() };
    with_patch.operating_point = Some(one_candidate(20));
    with_patch.patch = Some(PatchConfig { tiles: 16, ..PatchConfig::with_backbone(backbone(), 0.1, Some(0.0)) });
    let Outcome::Finished { bundle, .. } = train(with_patch, &options(&data, &out)).unwrap() else { panic!() };
    let manifest = read_manifest(&bundle).unwrap();
    let patch = manifest.patch.clone().expect("the patch model is in the manifest");
    assert_eq!((patch.fit.tiles, patch.fit.vectors), (16, 16 * 32 * 32), "16 tiles of 32×32 feature cells");
    assert_eq!((patch.features.input_scale, patch.features.channels), (4, 64));
    let point = manifest.operating_point.clone().unwrap();
    assert!(point.candidates.iter().any(|c| c.residual == Residual::Patch), "the patch rule is scored");
    assert_eq!(manifest.anomaly.screen, None, "no fused patch map, no screen on it");

    // The patch rule, on frames it never saw, is higher inside pasted defects than outside.
    let mut loaded = Bundle::load(&bundle, &RuntimeConfig::default()).unwrap();
    loaded.use_map_rule(Residual::Patch, 0, &RuntimeConfig::default()).unwrap();
    let input = loaded.manifest.input;
    let mut inspector = Inspector::new(loaded, None).unwrap();
    for (frame, mask) in [("brick_scratch.png", "brick_scratch_mask.png"), ("brick_stain.png", "brick_stain_mask.png")]
    {
        let prepared = input.prepare(&image::open(fixture(frame)).unwrap());
        let analysis = inspector.inspect(&[FrameView::new(&prepared.tensor, prepared.size())], &[1]).unwrap();
        let (inside, outside) = inside_outside(&analysis[0].map, 32, mask);
        eprintln!("{frame}: patch distance inside {inside:.3}, outside {outside:.3}");
        assert!(inside > 1.2 * outside, "{frame}: patch distance inside {inside:.3}, outside {outside:.3}");
    }

    // patch.onnx is verified like the denoiser: a flipped byte is refused.
    flip_last_byte(&bundle.join("patch.onnx"));
    let e = Bundle::load(&bundle, &RuntimeConfig::default()).err().expect("a corrupt patch model must not load");
    assert!(e.to_string().contains("patch.onnx") && e.to_string().contains("sha256"), "{e}");
}

#[test]
fn retrain_fuses_the_patch_map_into_the_shipped_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    let out = tmp.path().join("fused");
    let mut fused = config(Loss::Huber { delta: 0.2 }, 6);
    fused.input = InputSpec { width: 32, height: 32, ..InputSpec::default() };
    // Three calibration frames: the screen is chosen on them and their pasted copies.
    fused.calibration_fraction = 0.5;
    fused.patch = Some(PatchConfig { tiles: 16, ..PatchConfig::with_backbone(backbone(), 0.1, Some(0.5)) });
    let Outcome::Finished { bundle, .. } = train(fused, &options(&data, &out)).unwrap() else { panic!() };
    let manifest = read_manifest(&bundle).unwrap();
    assert_eq!(manifest.anomaly.residual, Residual::L1, "the configured rule stays the rule");
    let fusion = manifest.anomaly.fusion.expect("the patch map is fused in");
    assert_eq!(fusion.patch_weight, 0.5);
    assert!(fusion.rule[1] > 0.0 && fusion.patch[1] > fusion.rule[1], "{fusion:?}: patch distances are larger");
    // Thresholds are calibrated on the fused map: standardised, so about 0 on normal frames.
    assert!(manifest.thresholds.pixel.value.abs() < 10.0, "{:?}", manifest.thresholds.pixel);

    let loaded = Bundle::load(&bundle, &RuntimeConfig::default()).unwrap();
    let input = loaded.manifest.input;
    let mut inspector = Inspector::new(loaded, None).unwrap();
    let prepared = input.prepare(&image::open(fixture("brick_stain.png")).unwrap());
    let analysis = inspector.inspect(&[FrameView::new(&prepared.tensor, prepared.size())], &[1]).unwrap();
    let (inside, outside) = inside_outside(&analysis[0].map, 32, "brick_stain_mask.png");
    assert!(inside > outside + 1.0, "fused map inside {inside:.3}, outside {outside:.3} (standardised units)");

    the_screen_skips_exactly_the_tiles_below_it(&bundle);
    the_daemon_runs_the_screen_its_config_names(&bundle, &data);

    // A fused manifest without its patch model is refused before anything runs.
    let text = fs::read_to_string(bundle.join("manifest.toml")).unwrap();
    let cut = text.find("[patch]").expect("a [patch] section");
    fs::write(bundle.join("manifest.toml"), &text[..cut]).unwrap();
    let e = Bundle::load(&bundle, &RuntimeConfig::default()).err().expect("fusion without [patch]").to_string();
    assert!(e.contains("fusion") && e.contains("[patch]"), "{e}");
}

/// `model.screen_recall` picks one of `bundle`'s screens in the daemon: at the recall that
/// screens the most clean validation tiles, replaying the training frames (the clean
/// calibration frames among them) screens some tiles out; `"off"` screens none; a recall
/// the bundle has no screen for is a configuration error (exit 78) naming the key.
fn the_daemon_runs_the_screen_its_config_names(bundle: &Path, frames: &Path) {
    use crate::daemon::{Daemon, camera, check_config, rig, wait_for, write_config_for};
    let manifest = read_manifest(bundle).unwrap();
    let widest = manifest.screen_curve.iter().max_by(|a, b| a.clean_screened.total_cmp(&b.clean_screened)).unwrap();
    let frame_count = fs::read_dir(frames).unwrap().count() as u64;
    let tiles = |choice: &str| {
        let (broker, sub, dir) = rig();
        let cameras = camera("cam0", &frames.display().to_string(), 50.0, false, "");
        let model_keys = format!("screen_recall = {choice}");
        let pipeline = "max_batch = 1\nqueue_capacity = 8";
        let config = write_config_for(bundle, &model_keys, dir.path(), broker.port, pipeline, &cameras);
        let mut daemon = Daemon::start(&config);
        let status = daemon.wait_exit(Duration::from_secs(120));
        assert!(status.success(), "screen_recall = {choice}: exit {status:?}; log:\n{}", daemon.log_text());
        let inference = |sub: &crate::daemon::Subscriber| sub.last_stats().map(|s| s["inference"].clone());
        wait_for(Duration::from_secs(10), "the final stats", || {
            inference(&sub).is_some_and(|i| i["tiles"].as_u64() == Some(frame_count))
        });
        let i = inference(&sub).unwrap();
        (i["tiles_screened"].as_u64().unwrap(), daemon.log_text())
    };
    let (screened, log) = tiles(&widest.recall_target.to_string());
    assert!(screened > 0 && screened <= frame_count, "recall {}: {screened} screened; {log}", widest.recall_target);
    assert!(log.contains("Cascade screen chosen by model.screen_recall"), "{log}");
    assert_eq!(tiles("\"off\"").0, 0, "screen_recall = \"off\" reconstructs every tile");

    let dir = tempfile::tempdir().unwrap();
    let cameras = camera("cam0", &frames.display().to_string(), 50.0, false, "");
    let config = write_config_for(bundle, "screen_recall = 0.5", dir.path(), 1883, "", &cameras);
    let (code, out) = check_config(&config, &[]);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("model.screen_recall") && out.contains("no cascade screen for recall 0.5"), "{out}");
}

/// The cascade on `bundle` (fused, with the screen `retrain` chose): frames whose patch map
/// reaches the threshold get exactly the maps they get without a screen; the others are not
/// reconstructed, and their map is the patch map's share alone.
fn the_screen_skips_exactly_the_tiles_below_it(bundle: &Path) {
    let mut loaded = Bundle::load(bundle, &RuntimeConfig::default()).unwrap();
    let chosen = loaded.manifest.anomaly.screen.expect("retrain chose a screen at recall 0.99");
    assert!(chosen.recall >= 0.99 && chosen.clean_screened > 0.0, "{chosen:?}");
    // The screens at other recalls: a higher recall never screens out more.
    let curve = &loaded.manifest.screen_curve;
    assert_eq!(loaded.manifest.screen_at(0.99), Ok(chosen));
    assert!(loaded.manifest.screen_at(0.5).unwrap_err().contains("no cascade screen for recall 0.5"));
    for pair in curve.windows(2) {
        let (lower, higher) = (pair[0], pair[1]);
        assert!(lower.recall_target < higher.recall_target && higher.recall >= higher.recall_target, "{curve:?}");
        assert!(higher.threshold <= lower.threshold && higher.clean_screened <= lower.clean_screened, "{curve:?}");
    }
    let (input, anomaly) = (loaded.manifest.input, loaded.manifest.anomaly);
    let fusion = anomaly.fusion.unwrap();
    let names = ["brick_clean.png", "brick_scratch.png", "brick_stain.png", "brick_clean.png"];
    let frames: Vec<f32> = names.iter().flat_map(|n| input.prepare(&image::open(fixture(n)).unwrap()).tensor).collect();
    let shape = [names.len(), 1, input.height, input.width];
    let patch_graph = loaded.patch.as_mut().unwrap();
    let patch = patch_maps(patch_graph, &frames, shape).unwrap();
    let mut scores: Vec<f64> = patch.iter().map(|m| screen_score(m)).collect();
    let maps = |loaded: &mut Bundle, screen: Option<Screen>| {
        let schedule = NoiseSchedule::new(&loaded.manifest.schedule).unwrap();
        let mut ensemble = Ensemble::new(&schedule, loaded.manifest.reconstruction, &[]).unwrap();
        let mut graphs = MapGraphs { rule: None, patch: loaded.patch.as_mut().map(|g| g as _), head_patch: None };
        let anomaly = AnomalySpec { screen, ..anomaly };
        let maps = ensemble.raw_maps(&mut loaded.denoiser, &mut graphs, &frames, shape, &[1, 2, 3, 4], &anomaly);
        (maps.unwrap(), ensemble.screened())
    };
    let (all, none_screened) = maps(&mut loaded, None);
    assert_eq!(none_screened, 0);
    // A threshold between the frames' scores: some pass, some do not.
    let threshold = {
        let mut sorted = scores.clone();
        sorted.sort_by(f64::total_cmp);
        (sorted[1] + sorted[2]) / 2.0
    };
    let (cascaded, screened) = maps(&mut loaded, Some(Screen { threshold, ..chosen }));
    assert_eq!(screened, 2, "{scores:?} around {threshold}");
    for (i, score) in scores.drain(..).enumerate() {
        if score >= threshold {
            let diff = all[i].0.iter().zip(&cascaded[i].0).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff < 1e-4, "frame {i} passes the screen: its map must not change ({diff})");
        } else {
            let mut alone = vec![fusion.rule[0] as f32; patch[i].len()];
            fusion.fuse(&mut alone, &patch[i]);
            assert_eq!(cascaded[i].0, alone, "frame {i} is screened out: the patch map's share alone");
            assert_eq!(cascaded[i].1, 0.0, "a screened frame is not reconstructed");
        }
    }
}

#[test]
fn the_patch_rule_without_a_patch_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(Loss::Mse, 4);
    cfg.anomaly.residual = Residual::Patch;
    let e = train(cfg, &options(tmp.path(), &tmp.path().join("out"))).err().unwrap().to_string();
    assert!(e.contains("--patch-model"), "{e}");
    let mut cfg = config(Loss::Mse, 4);
    cfg.patch = Some(PatchConfig::with_backbone(tmp.path().join("missing.pth"), 0.1, None));
    let e = train(cfg, &options(tmp.path(), &tmp.path().join("out"))).err().unwrap().to_string();
    assert!(e.contains("missing.pth") && e.contains("fetch-backbone"), "{e}");
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    let straight = tmp.path().join("straight");
    train(config(Loss::Lts { lambda: 0.75 }, 12), &options(&data, &straight)).unwrap();

    // The interrupted run also exports interim bundles; they must not disturb its training.
    let resumed = tmp.path().join("resumed");
    let mut first = options(&data, &resumed);
    first.stop_after = Some(5);
    first.export_every = 4;
    match train(config(Loss::Lts { lambda: 0.75 }, 12), &first).unwrap() {
        Outcome::Paused { step: 5, .. } => {}
        other => panic!("expected a pause at step 5, got {other:?}"),
    }
    assert!(!resumed.exists(), "a paused run must not leave a bundle");
    let mut second = options(&data, &resumed);
    second.resume = true;
    second.export_every = 4;
    let Outcome::Finished { report, .. } = train(config(Loss::Lts { lambda: 0.75 }, 12), &second).unwrap() else {
        panic!()
    };
    assert_eq!(report.resumed_from_step, 5);
    assert_eq!(report.loss.curve.len(), 12, "one curve point per step in a 12-step run");
    let a = fs::read(straight.join(ONNX_FILE)).unwrap();
    let b = fs::read(resumed.join(ONNX_FILE)).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");

    // Interim bundles at steps 4 (before the pause) and 8 (after it), none at the end: each
    // verifies, records its own step and holds weights of its own.
    let interim = resumed.with_extension("interim");
    let mut names: Vec<String> =
        fs::read_dir(&interim).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["step-000004", "step-000008"]);
    let mut weights = vec![b];
    for (name, step) in names.iter().zip([4, 8]) {
        let bundle = interim.join(name);
        Bundle::load(&bundle, &RuntimeConfig::default()).unwrap();
        let manifest = read_manifest(&bundle).unwrap();
        assert_eq!(manifest.provenance.training_steps, step);
        assert!(manifest.operating_point.is_none() && manifest.head.is_none());
        assert!(manifest.thresholds.pixel.value > 0.0, "interim bundles are calibrated");
        weights.push(fs::read(bundle.join(ONNX_FILE)).unwrap());
    }
    assert!(weights[0] != weights[1] && weights[1] != weights[2], "interim weights repeat");

    // Resuming with other settings is refused, not silently mixed.
    let mut third = options(&data, &tmp.path().join("other"));
    third.checkpoint_dir = tmp.path().join("c");
    third.stop_after = Some(1);
    train(config(Loss::Mse, 12), &third).unwrap();
    third.stop_after = None;
    third.resume = true;
    let e = train(config(Loss::Huber { delta: 0.2 }, 12), &third).unwrap_err();
    assert!(matches!(e, TrainError::Checkpoint { .. }) && e.to_string().contains("different configuration"), "{e}");
}

#[test]
fn bad_data_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    fs::create_dir_all(&empty).unwrap();
    fs::write(empty.join("broken.jpg"), b"nope").unwrap();
    let e = train(config(Loss::Mse, 5), &options(&empty, &tmp.path().join("x"))).err().unwrap();
    assert!(e.to_string().contains("no usable training images") && e.to_string().contains("1 unreadable"), "{e}");
    let e = train(config(Loss::Mse, 5), &options(&tmp.path().join("missing"), &tmp.path().join("x"))).err().unwrap();
    assert!(e.to_string().contains("data directory not found"), "{e}");
    let mut bad = config(Loss::Huber { delta: 0.0 }, 5);
    let e = train(bad.clone(), &options(&empty, &tmp.path().join("x"))).err().unwrap();
    assert!(e.to_string().contains("--delta"), "{e}");
    bad.loss = Loss::Mse;
    bad.warmup_steps = 5;
    assert!(train(bad, &options(&empty, &tmp.path().join("x"))).err().unwrap().to_string().contains("--warmup-steps"));
}

#[test]
fn retrain_cli_reads_the_mvtec_layout_and_writes_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let category = tmp.path().join("brick");
    tiny_dataset(&category.join("train/good"));
    tiny_dataset(&category.join("test/good"));
    // A dotted name, as the benchmarks write them: the report and the interim bundles go
    // beside it under its whole name.
    let out = tmp.path().join("models/cli-p0.2");
    let o = Command::new(BIN)
        .args(["retrain", "--data", category.to_str().unwrap(), "--loss", "huber", "--out", out.to_str().unwrap()])
        .args(["--steps", "6", "--batch-size", "4", "--size", "16", "--base-channels", "16", "--channel-mults", "1,2"])
        .args(["--t0", "10", "--reverse-steps", "2", "--no-progress", "--export-every", "3"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // oneDNN's OpenMP threads wait passively unless told otherwise (commands::retrain).
    assert!(stderr.contains("openmp_wait_policy=PASSIVE"), "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("trained") && stdout.contains("5 training / 1 calibration frames"), "{stdout}");
    assert!(stdout.contains("operating point: t0 "), "retrain searches by default: {stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(tmp.path().join("models/cli-p0.2.report.json")).unwrap()).unwrap();
    assert_eq!(report["data"]["layout"], "mvtec");
    let interim = tmp.path().join("models/cli-p0.2.interim/step-000003");
    assert_eq!(read_manifest(&interim).unwrap().provenance.training_steps, 3);
    let manifest = read_manifest(&out).unwrap();
    assert!(manifest.provenance.command.contains("retrain --data"));
    // Line-scale by default: tiles of the input size side by side, at native scale.
    assert_eq!(manifest.inspection, Inspection::Tiled { scale: 1.0, stride: 16 });
    // The benchmarked recipe by default: a learned head in the search, the normal-patch
    // model fused into the chosen rule at weight ½ (not searched).
    let point = manifest.operating_point.as_ref().unwrap();
    assert!(point.candidates.iter().any(|c| c.residual == Residual::Head), "the head is trained and scored");
    assert!(manifest.patch.is_some(), "{:?}", manifest.anomaly);
    assert!(point.fusion_candidates.is_empty(), "{:?}", point.fusion_candidates);
    assert_eq!(manifest.anomaly.fusion.map(|f| f.patch_weight), Some(0.5), "{:?}", manifest.anomaly);
    {
        // `eval --fusion-weight` re-weights the shipped standardisation.
        let bench = tmp.path().join("bench");
        let texture = fixture("brick_texture.png");
        let o = Command::new(BIN)
            .args(["synth", "--texture", texture.to_str().unwrap(), "--out", bench.to_str().unwrap(), "--size", "32"])
            .args(["--train", "4", "--test-good", "4", "--test-per-type", "1", "--seed", "1"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let scored = |weight: &str| {
            let report = tmp.path().join(format!("eval-{weight}"));
            let o = Command::new(BIN)
                .args(["eval", "--model", out.to_str().unwrap(), "--data", bench.to_str().unwrap()])
                .args(["--out", report.to_str().unwrap(), "--resize", "--overlays", "0", "--no-progress"])
                .args(["--fusion-weight", weight])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let report: serde_json::Value =
                serde_json::from_slice(&fs::read(report.join("report.json")).unwrap()).unwrap();
            assert_eq!(report["anomaly"]["fusion"]["patch_weight"].as_f64(), Some(weight.parse().unwrap()));
            report["overall"]["pixel_auroc"].as_f64().unwrap()
        };
        assert_ne!(scored("0"), scored("1"), "the rule's map and the patch map differ");
    }
    // Without the backbone, the default says what is missing and how to do without it.
    let o = Command::new(BIN)
        .args(["retrain", "--data", category.to_str().unwrap(), "--out", tmp.path().join("x").to_str().unwrap()])
        .args(["--steps", "2", "--no-progress"])
        .env_remove("EDGE_INSPECT_BACKBONE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("fetch-backbone.sh") && stderr.contains("--patch-model none"),
        "{stderr}"
    );
    // Never overwrite without --force.
    let o = Command::new(BIN)
        .args([
            "retrain",
            "--data",
            category.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "6",
            "--no-progress",
        ])
        .env("OMP_WAIT_POLICY", "active")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("--force"), "{stderr}");
    assert!(stderr.contains("openmp_wait_policy=active"), "a policy the environment chose is kept: {stderr}");
}

/// Aligned parts: 100 frames of one brick crop, each with its own sensor noise, and a
/// bright square always at the top left. `misplaced` adds the same square at the bottom
/// right: normal in appearance, a defect by its place.
fn aligned_frame(seed: u64, misplaced: bool) -> image::GrayImage {
    let texture = image::open(fixture("brick_texture.png")).unwrap().to_luma8();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    image::GrayImage::from_fn(32, 32, |x, y| {
        let square = (3..9).contains(&x) && (3..9).contains(&y);
        let moved = misplaced && (22..28).contains(&x) && (22..28).contains(&y);
        let base = if square || moved { 235.0 } else { texture.get_pixel(40 + x, 40 + y)[0] as f64 * 0.6 };
        image::Luma([(base + rng.random_range(-4.0..4.0)).clamp(0.0, 255.0) as u8])
    })
}

#[test]
fn a_per_position_model_finds_a_normal_pattern_in_the_wrong_place() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    fs::create_dir_all(&data).unwrap();
    for i in 0..100 {
        aligned_frame(i, false).save(data.join(format!("part_{i:03}.png"))).unwrap();
    }
    let ratio = |kind: PatchKind| {
        let mut cfg = config(Loss::Huber { delta: 0.2 }, 4);
        cfg.input = InputSpec { width: 32, height: 32, ..InputSpec::default() };
        (cfg.inspection, cfg.random_crop, cfg.flips) = (Inspection::Resize, None, false);
        cfg.anomaly.residual = Residual::Patch;
        cfg.patch =
            Some(PatchConfig { model: kind, tiles: 100, ..PatchConfig::with_backbone(backbone(), 0.1, Some(0.0)) });
        let out = tmp.path().join(kind.name());
        let Outcome::Finished { bundle, .. } = train(cfg, &options(&data, &out)).unwrap() else { panic!() };
        let manifest = read_manifest(&bundle).unwrap();
        let patch = manifest.patch.clone().unwrap();
        assert_eq!(patch.model, kind.name());
        // Per position: each of the 80 training frames once (a fifth is held out for
        // calibration); globally: 100 frames drawn. 32×32 cells each.
        let frames = if kind == PatchKind::PerPosition { 80 } else { 100 };
        assert_eq!((patch.fit.tiles, patch.fit.vectors), (frames, frames * 32 * 32));
        let loaded = Bundle::load(&bundle, &RuntimeConfig::default()).unwrap();
        let input = loaded.manifest.input;
        let mut inspector = Inspector::new(loaded, None).unwrap();
        let frame = image::DynamicImage::ImageLuma8(aligned_frame(1000, true));
        let prepared = input.prepare(&frame);
        let map = &inspector.inspect(&[FrameView::new(&prepared.tensor, prepared.size())], &[1]).unwrap()[0].map;
        let (mut inside, mut outside) = ((0.0, 0), (0.0, 0));
        for (i, v) in map.iter().enumerate() {
            let (x, y) = (i % 32, i / 32);
            let bucket = if (22..28).contains(&x) && (22..28).contains(&y) { &mut inside } else { &mut outside };
            (bucket.0, bucket.1) = (bucket.0 + *v as f64, bucket.1 + 1);
        }
        inside.0 / inside.1 as f64 / (outside.0 / outside.1 as f64)
    };
    let (global, per_position) = (ratio(PatchKind::Gaussian), ratio(PatchKind::PerPosition));
    eprintln!("misplaced square, inside / outside: global {global:.2}, per position {per_position:.2}");
    assert!(per_position > 2.0 && per_position > 1.5 * global, "global {global:.2}, per position {per_position:.2}");

    // Tiles have no fixed place in the frame: the per-position model refuses them.
    let mut tiled = config(Loss::Huber { delta: 0.2 }, 4);
    tiled.inspection = Inspection::Tiled { scale: 1.0, stride: 12 };
    tiled.patch =
        Some(PatchConfig { model: PatchKind::PerPosition, ..PatchConfig::with_backbone(backbone(), 0.1, None) });
    let e = train(tiled, &options(&data, &tmp.path().join("tiled"))).err().unwrap().to_string();
    assert!(e.contains("per-position") && e.contains("--inspection resize"), "{e}");
}

/// 32² frames, 6 steps, and a head that reads the patch map (the patch model not yet
/// configured): at t0 = 2 the reconstruction is nearly the frame, its L1 map is weak, and
/// the head wins the search and ships.
fn head_reading_the_patch_map() -> TrainConfig {
    let mut cfg = config(Loss::Huber { delta: 0.2 }, 6);
    cfg.input = InputSpec { width: 32, height: 32, ..InputSpec::default() };
    cfg.operating_point = Some(one_candidate(2));
    cfg.head = Some(HeadConfig { frames: 16, patch_channel: true, ..HeadConfig::with_steps(40) });
    cfg
}

#[test]
fn a_head_can_read_the_patch_map_as_a_third_input() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    let mut cfg = head_reading_the_patch_map();
    // Without the patch model there is no map to read.
    let e = train(cfg.clone(), &options(&data, &tmp.path().join("x"))).err().unwrap().to_string();
    assert!(e.contains("--head-patch-channel") && e.contains("--patch-model"), "{e}");
    cfg.patch = Some(PatchConfig { tiles: 16, ..PatchConfig::with_backbone(backbone(), 0.1, Some(0.5)) });
    let out = tmp.path().join("head-patch");
    let Outcome::Finished { bundle, .. } = train(cfg, &options(&data, &out)).unwrap() else { panic!() };
    let manifest = read_manifest(&bundle).unwrap();
    let point = manifest.operating_point.clone().unwrap();
    assert!(point.candidates.iter().any(|c| c.residual == Residual::Head), "the head is scored");
    let head = manifest.head.clone().unwrap_or_else(|| panic!("the head should win: {:?}", point.candidates));
    let [mean, sd] = head.patch_channel.expect("the patch map's standardisation is recorded");
    assert!(mean.is_finite() && sd > 0.0);
    assert_eq!(head.unet.channels, 3, "frame, reconstruction and patch map");
    // It inspects through the bundle: the patch graph runs for the head and the fusion.
    let loaded = Bundle::load(&bundle, &RuntimeConfig::default()).unwrap();
    let input = loaded.manifest.input;
    let mut inspector = Inspector::new(loaded, None).unwrap();
    let prepared = input.prepare(&image::open(fixture("brick_stain.png")).unwrap());
    let analysis = inspector.inspect(&[FrameView::new(&prepared.tensor, prepared.size())], &[1]).unwrap();
    assert!(analysis[0].map.iter().all(|v| v.is_finite()));
    // A head that reads the patch map without the bundle's patch model is refused.
    // Without the patch map there is no fusion, and no cascade screen on it.
    let drop_section = |text: String, header: &str| match text.find(header) {
        Some(at) => {
            let after = at + text[at..].find("\n[").expect("a section after it") + 1;
            format!("{}{}", &text[..at], &text[after..])
        }
        None => text,
    };
    let text = fs::read_to_string(bundle.join("manifest.toml")).unwrap();
    assert!(text.contains("[anomaly.fusion]"), "fused at 0.5");
    let text = drop_section(drop_section(text, "[anomaly.fusion]"), "[anomaly.screen]");
    let cut = text.find("[patch]").expect("a [patch] section");
    fs::write(bundle.join("manifest.toml"), &text[..cut]).unwrap();
    let e = Bundle::load(&bundle, &RuntimeConfig::default()).err().expect("no [patch]").to_string();
    assert!(e.contains("head.patch_channel") && e.contains("[patch]"), "{e}");
}

/// A tiled bundle's image threshold is calibrated on whole frames, scored over all their
/// tiles as the daemon and `eval` score them: normal 128² frames of sixty-four 16² tiles
/// rarely alert. (Calibrated on single tiles, the threshold sat inside the spread of one
/// frame's tiles, whose top-k mean is near their maximum: 14 of these 16 frames alerted.)
#[test]
fn a_tiled_bundle_is_calibrated_on_whole_frames_and_passes_normal_frames() {
    let dir = tempfile::tempdir().unwrap();
    let brick = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/brick");
    let bundle = dir.path().join("brick");
    let (_, report) =
        crate::daemon::retrain_small(brick.to_str().unwrap(), &bundle, &["--calibration-fraction", "0.5"], &[]);
    assert_eq!(report["data"]["calibration_frames"], 8, "{}", report["data"]);
    let manifest = read_manifest(&bundle).unwrap();
    let kept = manifest.thresholds.calibration.frames;
    assert!((1..=8).contains(&kept), "{kept}: counted in frames (after trimming), not in their 512 tiles");
    let held_out = report["held_out"].as_array().unwrap();
    let trimmed: Vec<bool> = held_out.iter().map(|f| f["trimmed"].as_bool().unwrap()).collect();
    assert_eq!(trimmed, [true, false, false, false, false, false, false, false], "the top frame of eight is trimmed");
    // The same frame scored in two batches of different make-up: equal up to the last bits
    // of ORT's CPU kernels (one ulp apart on an AVX2-only EPYC); the other frames' scores
    // are 10⁻² and more away.
    let (top_kept, threshold) = (held_out[1]["image_score"].as_f64().unwrap(), manifest.thresholds.image.value);
    assert!((top_kept - threshold).abs() <= 1e-9 * threshold.abs(), "{threshold} vs {held_out:?}");

    // The sixteen normal training frames (half of them held out for the calibration), and
    // one scratched test frame with its mask (eval needs an anomalous image).
    let data = dir.path().join("normal");
    fs::create_dir_all(data.join("test/good")).unwrap();
    for sub in ["test/scratch", "ground_truth/scratch"] {
        fs::create_dir_all(data.join(sub)).unwrap();
    }
    fs::copy(brick.join("test/scratch/000.png"), data.join("test/scratch/000.png")).unwrap();
    fs::copy(brick.join("ground_truth/scratch/000_mask.png"), data.join("ground_truth/scratch/000_mask.png")).unwrap();
    for entry in fs::read_dir(brick.join("train/good")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, data.join("test/good").join(path.file_name().unwrap())).unwrap();
    }
    let out = dir.path().join("eval");
    let o = Command::new(BIN)
        .args(["eval", "--model", bundle.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap(), "--no-progress"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&fs::read(out.join("report.json")).unwrap()).unwrap();
    let overall = &report["overall"];
    assert_eq!(overall["images"], 17, "{overall}");
    let false_alarms = overall["deployed"]["false_positives"].as_u64().expect("deployed counts");
    eprintln!("calibrated on whole frames: {false_alarms} of 16 normal frames alerted");
    assert!(false_alarms <= 6, "{false_alarms} of 16 normal frames alerted: {overall}");
}

/// `retrain --int8` on a bundle with all three graphs (the UNet, a head that reads the
/// patch map, the fused patch model): each gets an int8 copy with its own hash and golden
/// check, calibrated through the shipped rule, and ships only within the quality bound on
/// the validation defects: a bound of 0 refuses every set and leaves no int8 file; a
/// looser one refuses the int8 patch model and ships the UNet and head, the patch model
/// running in f32; `precision = "int8"` runs the copies, refuses a corrupt one, and a
/// bundle without int8 graphs is refused at that precision with a message that says how to
/// make them.
#[test]
fn int8_and_fp16_copies_ship_within_their_quality_bounds_and_run_at_their_precision() {
    use edge_inspect::infer::runtime::Precision;
    use edge_inspect::train::reduced::QualityBound;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    let mut cfg = head_reading_the_patch_map();
    cfg.patch = Some(PatchConfig { tiles: 16, ..PatchConfig::with_backbone(backbone(), 0.1, Some(0.5)) });
    cfg.int8 = Some(QualityBound { pixel_auroc: 0.0, pixel_auprc: 0.0 });
    let strict = tmp.path().join("strict");
    let Outcome::Finished { bundle: refused, report } = train(cfg.clone(), &options(&data, &strict)).unwrap() else {
        panic!()
    };
    let tried = report.int8.expect("the report says what --int8 tried");
    assert_eq!(tried.tried.len(), 2, "all graphs, then the patch model left f32: {tried:?}");
    assert!(tried.tried.iter().all(|t| !t.shipped) && tried.shipped.is_empty(), "{tried:?}");
    assert!(read_manifest(&refused).unwrap().int8.is_none());
    for file in ["model.int8.onnx", "head.int8.onnx", "patch.int8.onnx"] {
        assert!(!refused.join(file).exists(), "{file} is left behind");
    }

    // All three int8 graphs lose most of the patch map (its whitened distance amplifies
    // feature noise: AUROC 0.99 → 0.74 here); with the patch model left f32, the UNet and
    // the head lose 0.006 AUROC and 0.21 AUPRC on this 6-step model, inside this bound.
    cfg.int8 = Some(QualityBound { pixel_auroc: 0.01, pixel_auprc: 0.25 });
    cfg.fp16 = Some(QualityBound { pixel_auroc: 0.005, pixel_auprc: 0.02 });
    let out = tmp.path().join("int8");
    let Outcome::Finished { bundle, report } = train(cfg, &options(&data, &out)).unwrap() else { panic!() };
    let manifest = read_manifest(&bundle).unwrap();
    assert!(manifest.head.is_some() && manifest.patch.is_some(), "the head and the patch model ship");
    let tried = report.int8.expect("the report says what --int8 tried");
    let int8 = manifest.int8.clone().unwrap_or_else(|| panic!("int8 graphs within the bound: {tried:?}"));
    eprintln!("validation figures: f32 {:?}, int8 {:?}; tried {tried:?}", int8.fp32, int8.int8);
    assert_eq!(tried.shipped, ["unet", "head"], "the patch model stays f32: {tried:?}");
    assert!(!tried.tried[0].shipped && tried.tried[1].shipped);
    assert_eq!((int8.fp32, int8.int8), (tried.fp32.unwrap(), tried.tried[1].figures));
    assert!(int8.calibration_frames > 0 && int8.patch.is_none());
    assert!(!bundle.join("patch.int8.onnx").exists(), "the refused patch copy is removed");
    let head = int8.head.as_ref().expect("the head's int8 copy");
    for q in [&int8.unet, head] {
        let bytes = fs::read(bundle.join(&q.onnx)).unwrap();
        assert_eq!(edge_inspect::infer::bundle::sha256_hex(&bytes), q.sha256, "{}", q.onnx);
        assert!(String::from_utf8_lossy(&bytes).contains("QuantizeLinear"), "{} is in QDQ form", q.onnx);
    }
    // The f32 graphs are those of the run whose int8 copies were refused: the copies are extra.
    assert_eq!(manifest.artifact.sha256, read_manifest(&refused).unwrap().artifact.sha256);

    let prepared = manifest.input.prepare(&image::open(fixture("brick_stain.png")).unwrap());
    let map_at = |precision: Precision| {
        let runtime = RuntimeConfig { precision, ..RuntimeConfig::default() };
        let mut inspector = Inspector::new(Bundle::load(&bundle, &runtime).unwrap(), None).unwrap();
        inspector.inspect(&[FrameView::new(&prepared.tensor, prepared.size())], &[1]).unwrap().remove(0).map
    };
    let (f32_map, int8_map) = (map_at(Precision::Fp32), map_at(Precision::Int8));
    let mean_abs = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x.abs() as f64).sum::<f64>() / f32_map.len() as f64;
    let diff = mean_abs(&mut f32_map.iter().zip(&int8_map).map(|(a, b)| a - b));
    let scale = mean_abs(&mut f32_map.iter().copied());
    // Int8 answers differently, but about the same map (this 6-step model's fused map moved
    // by about a third of its mean magnitude).
    assert!(diff > 0.0 && diff < 0.5 * scale, "int8 map differs by {diff:.4} (f32 map mean |x| {scale:.4})");

    let int8_runtime = RuntimeConfig { precision: Precision::Int8, ..RuntimeConfig::default() };
    let e = Bundle::load(&refused, &int8_runtime).err().expect("no int8 graphs").to_string();
    assert!(e.contains("precision int8") && e.contains("retrain --int8"), "{e}");
    flip_last_byte(&bundle.join(&head.onnx));
    let e = Bundle::load(&bundle, &int8_runtime).err().expect("a corrupt int8 copy must not load").to_string();
    assert!(e.contains("head.int8.onnx") && e.contains("sha256"), "{e}");
    Bundle::load(&bundle, &RuntimeConfig::default()).expect("f32 never reads the int8 copies");

    // fp16: the frame path in half precision costs (almost) nothing, so every copy ships.
    let tried = report.fp16.expect("the report says what --fp16 tried");
    let fp16 = manifest.fp16.clone().unwrap_or_else(|| panic!("fp16 graphs within the bound: {tried:?}"));
    eprintln!("validation figures: f32 {:?}, fp16 {:?}; tried {tried:?}", fp16.fp32, fp16.fp16);
    assert_eq!(tried.shipped, ["unet", "head", "patch"], "{tried:?}");
    assert!(fp16.fp32.pixel_auroc - fp16.fp16.pixel_auroc <= 0.005);
    for q in [Some(&fp16.unet), fp16.head.as_ref(), fp16.patch.as_ref()] {
        let q = q.expect("each graph has its fp16 copy");
        let bytes = fs::read(bundle.join(&q.onnx)).unwrap();
        assert_eq!(edge_inspect::infer::bundle::sha256_hex(&bytes), q.sha256, "{}", q.onnx);
    }
    let fp16_map = map_at(Precision::Fp16);
    let diff = mean_abs(&mut f32_map.iter().zip(&fp16_map).map(|(a, b)| a - b));
    assert!(diff > 0.0 && diff < 0.02 * scale, "fp16 map differs by {diff:.5} (f32 map mean |x| {scale:.4})");
    let fp16_runtime = RuntimeConfig { precision: Precision::Fp16, ..RuntimeConfig::default() };
    let e = Bundle::load(&refused, &fp16_runtime).err().expect("no fp16 graphs").to_string();
    assert!(e.contains("precision fp16") && e.contains("retrain --fp16"), "{e}");
}
