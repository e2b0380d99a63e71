//! `edge-inspect retrain`: flags → [`TrainConfig`], Ctrl-C → checkpoint, outcome → stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;

use crate::cli::{InspectionArg, LossArg, PatchModelArg, RetrainArgs, ScreenRecallArg, bundle_name};
use crate::infer::runtime::Precision;
use crate::model::diffusion::ScheduleSpec;
use crate::model::preprocess::Inspection;
use crate::model::sampling::ReconstructionSpec;
use crate::postprocess::anomaly::AnomalySpec;
use crate::postprocess::screen::{DEFAULT_RECALL, TILED_RECALL};
use crate::train::calibrate::CalibrationRule;
use crate::train::head::HeadConfig;
use crate::train::losses::Loss;
use crate::train::operating_point::SearchSpace;
use crate::train::patch_model::{PatchConfig, PatchKind};
use crate::train::{Outcome, RunOptions, TrainConfig, train};

/// The OpenMP wait policy training runs under, running this process again with
/// `OMP_WAIT_POLICY=PASSIVE` when the environment chose none.
///
/// libgomp, the OpenMP runtime oneDNN runs the CPU kernels on (`model::onednn`), reads its
/// policy once, as it loads with the binary, and nothing can change it afterwards (a
/// `setenv` from `.preinit_array` is undone by glibc's own start-up). Left at its default,
/// its idle threads spin between oneDNN calls and take the cores from whatever else runs —
/// on a line node, the daemon: beside one busy process a training step took 1.5–1.8× as
/// long as with passive waiting (`docs/performance.md`). `exec` keeps the process id, the
/// arguments and the standard streams.
fn passive_openmp() -> anyhow::Result<String> {
    use std::os::unix::process::CommandExt;
    if let Ok(policy) = std::env::var("OMP_WAIT_POLICY") {
        return Ok(policy);
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let error =
        std::process::Command::new("/proc/self/exe").arg0(arg0).args(args).env("OMP_WAIT_POLICY", "PASSIVE").exec();
    anyhow::bail!("cannot run retrain again with OMP_WAIT_POLICY=PASSIVE: {error}")
}

pub fn run(args: RetrainArgs) -> anyhow::Result<()> {
    let wait_policy = passive_openmp()?;
    tracing::info!(openmp_wait_policy = %wait_policy, "CPU training kernels: oneDNN on OpenMP.");
    if args.runtime.precision != Precision::Fp32 {
        anyhow::bail!(
            "--precision {}: retrain trains, searches and calibrates in fp32; --int8 and --fp16 add the reduced-precision graphs",
            args.runtime.precision
        );
    }
    let name = bundle_name(&args.out, args.name.as_deref());
    let loss = match args.loss {
        LossArg::Mse => Loss::Mse,
        LossArg::L1 => Loss::L1,
        LossArg::Huber => Loss::Huber { delta: args.delta },
        LossArg::Lts => Loss::Lts { lambda: args.lambda },
    };
    let input = args.architecture.input();
    let inspection = match args.inspection {
        InspectionArg::Tiled => Inspection::Tiled {
            scale: args.scale,
            // Tiles side by side: ¾-stride overlap cost 1.6× the tiles for no measured
            // quality (native gravel, docs/performance.md).
            stride: args.tile_stride.unwrap_or(input.width.min(input.height)).max(1),
        },
        InspectionArg::Resize => Inspection::Resize,
    };
    // Tiled models learn from crops that cover one tile at the tiling scale.
    let random_crop = match inspection {
        Inspection::Tiled { scale, .. } if args.random_crop.is_none() => {
            Some((input.width.max(input.height) as f64 / scale).round() as u32)
        }
        _ => args.random_crop,
    };
    let config = TrainConfig {
        name: name.clone(),
        version: args.version.clone(),
        input,
        inspection,
        unet: args.architecture.unet(),
        schedule: ScheduleSpec::default(),
        reconstruction: ReconstructionSpec {
            t0: args.t0,
            steps: args.reverse_steps,
            sampler: args.sampler.into(),
            eta: 0.0,
            condition: args.condition,
        },
        anomaly: AnomalySpec {
            residual: args.anomaly_map.into(),
            smoothing_sigma: args.smoothing_sigma,
            ..AnomalySpec::default()
        },
        loss,
        steps: args.steps,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        warmup_steps: args.warmup_steps.unwrap_or((args.steps / 10).min(200)),
        weight_decay: args.weight_decay,
        grad_clip_norm: args.grad_clip,
        ema_decay: args.ema_decay,
        seed: args.seed,
        flips: args.flips,
        random_crop,
        calibration_fraction: args.calibration_fraction,
        calibration: CalibrationRule { trim: args.calibration_trim, ..CalibrationRule::default() },
        operating_point: (!args.fixed_operating_point).then(|| SearchSpace::with_budget(args.unet_budget)),
        head: head_config(&args),
        patch: patch_config(&args, inspection)?,
        int8: args.int8.then_some(args.int8_max_loss),
        fp16: args.fp16.then_some(args.fp16_max_loss),
    };
    let interrupt = Arc::new(AtomicBool::new(false));
    // Ctrl-C or SIGTERM: the training loop sees the flag, writes a checkpoint and stops.
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupt.clone()).context("cannot install the Ctrl-C handler")?;
    }
    let checkpoint_dir = args.checkpoint_dir.clone().unwrap_or_else(|| {
        let parent = args.out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        parent.join(format!(".{name}.checkpoint"))
    });
    let report = args.report.clone().unwrap_or_else(|| beside(&args.out, ".report.json"));
    let data = crate::objects::local_data(&args.data, &crate::objects::cache_root())?;
    let options = RunOptions {
        data,
        layout: args.layout,
        out: args.out.clone(),
        force: args.force,
        init: args.init.clone(),
        checkpoint_dir,
        checkpoint_every: args.checkpoint_every,
        resume: args.resume,
        stop_after: args.stop_after,
        export_every: args.export_every,
        interim_dir: args.interim_dir.clone().unwrap_or_else(|| beside(&args.out, ".interim")),
        runtime: args.runtime.to_config(),
        report: Some(report.clone()),
        progress: !args.no_progress,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        interrupt,
        device: args.device,
    };
    match train(config, &options)? {
        Outcome::Finished { bundle, report: summary } => {
            if let Some(p) = &summary.operating_point {
                println!(
                    "operating point: t0 {}{}, {} DDIM step(s), condition {}, map {} (validation pixel AUPRC {:.3}, pixel AUROC {:.3})",
                    p.t0,
                    p.extra_t0.iter().map(|t| format!(" + {t}")).collect::<String>(),
                    p.steps,
                    p.condition,
                    p.residual.name(),
                    p.pixel_auprc,
                    p.pixel_auroc
                );
            }
            println!(
                "trained {} in {:.0} s: loss {:.4} → {:.4}, {} training / {} calibration frames, {} skipped; pixel threshold {:.4}, image threshold {:.4}; report {}",
                bundle.display(),
                summary.wall_seconds,
                summary.loss.first,
                summary.loss.last,
                summary.data.training_frames,
                summary.data.calibration_frames,
                summary.data.skipped.len(),
                summary.thresholds.pixel.value,
                summary.thresholds.image.value,
                report.display()
            );
            if let Some(url) = &args.publish {
                println!("published {}", crate::objects::publish(&bundle, url)?);
            }
        }
        Outcome::Paused { step, checkpoint } => {
            println!("paused at step {step}; checkpoint {} (continue with --resume)", checkpoint.display());
        }
    }
    Ok(())
}

/// The learned head's settings: `--head-steps`, else 400 steps where the operating point
/// is searched (the head is one of the search's candidates).
fn head_config(args: &RetrainArgs) -> Option<HeadConfig> {
    let steps = args.head_steps.unwrap_or(if args.fixed_operating_point { 0 } else { DEFAULT_HEAD_STEPS });
    (steps > 0).then(|| HeadConfig {
        trim: args.head_trim,
        patch_channel: args.head_patch_channel,
        base_channels: args.head_base_channels,
        ..HeadConfig::with_steps(steps)
    })
}

/// The head's training steps when `--head-steps` is not given (`docs/results.md`: 400 at
/// 800 UNet steps is the benchmarked recipe).
const DEFAULT_HEAD_STEPS: usize = 400;

/// The backbone checkpoint the `edge-inspect-train` package installs
/// (`/usr/share/edge-inspect/backbone/`, found from the binary's own directory), if there.
fn installed_backbone() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let path = exe.parent()?.join("../share/edge-inspect/backbone/efficientnet-lite0-57934424.pth");
    path.is_file().then_some(path)
}

/// The normal-patch model's settings, when `--patch-model` asks for one.
fn patch_config(args: &RetrainArgs, inspection: Inspection) -> anyhow::Result<Option<PatchConfig>> {
    match args.patch_model {
        PatchModelArg::None => Ok(None),
        PatchModelArg::Gaussian | PatchModelArg::PerPosition => {
            let backbone = args.backbone.clone().or_else(installed_backbone).context(
                "--patch-model (gaussian by default) needs the backbone checkpoint: --backbone or \
                 EDGE_INSPECT_BACKBONE (scripts/fetch-backbone.sh fetches it; the edge-inspect-train \
                 package installs it), or --patch-model none",
            )?;
            let model = match args.patch_model {
                PatchModelArg::PerPosition => PatchKind::PerPosition,
                _ => PatchKind::Gaussian,
            };
            let config = PatchConfig::with_backbone(backbone, args.patch_trim, args.patch_fusion.0);
            let screen_recall = screen_recall(args.screen_recall, inspection);
            Ok(Some(PatchConfig { model, screen_recall, ..config }))
        }
    }
}

/// The recall the shipped cascade screen is chosen for (`--screen-recall`; `auto` by the
/// inspection), or none.
fn screen_recall(arg: ScreenRecallArg, inspection: Inspection) -> Option<f64> {
    match (arg, inspection) {
        (ScreenRecallArg::Auto, Inspection::Tiled { .. }) => Some(TILED_RECALL),
        (ScreenRecallArg::Auto, Inspection::Resize) => Some(DEFAULT_RECALL),
        (ScreenRecallArg::None, _) => None,
        (ScreenRecallArg::Recall(r), _) => Some(r),
    }
}

/// `<out><suffix>`, appended rather than set with `with_extension`, which would turn
/// `gravel-p0.2-mse` into `gravel-p0.report.json` and make bundles named alike collide.
fn beside(out: &Path, suffix: &str) -> PathBuf {
    let mut path = out.as_os_str().to_owned();
    path.push(suffix);
    path.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn the_shipped_screen_recall_follows_the_inspection_unless_given() {
        let parsed = |extra: &[&str]| {
            let args = ["edge-inspect", "retrain", "--data", "d", "--out", "o"].iter().chain(extra);
            match Cli::try_parse_from(args).map(|c| c.command) {
                Ok(Command::Retrain(args)) => Ok(args.screen_recall),
                Ok(_) => unreachable!("retrain parses as retrain"),
                Err(e) => Err(e.to_string()),
            }
        };
        let tiled = Inspection::Tiled { scale: 1.0, stride: 64 };
        let auto = parsed(&[]).unwrap();
        assert_eq!(auto, ScreenRecallArg::Auto);
        assert_eq!(screen_recall(auto, tiled), Some(TILED_RECALL));
        assert_eq!(screen_recall(auto, Inspection::Resize), Some(DEFAULT_RECALL));
        let given = parsed(&["--screen-recall", "0.95"]).unwrap();
        assert_eq!(screen_recall(given, tiled), Some(0.95));
        assert_eq!(screen_recall(parsed(&["--screen-recall", "none"]).unwrap(), tiled), None);
        for bad in ["0", "1.2", "fast"] {
            let e = parsed(&["--screen-recall", bad]).unwrap_err();
            assert!(e.contains("--screen-recall") && e.contains(bad), "{bad}: {e}");
        }
    }
}
