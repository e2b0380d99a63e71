//! `edge-inspect eval`: scores a bundle on labelled test data and writes `report.json`,
//! `summary.md` and overlays into the report directory; prints the summary.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::cli::EvalArgs;
use crate::commands::infer::reconstruction_spec;
use crate::durable::write_atomic;
use crate::eval::{EvalOptions, evaluate, markdown};
use crate::infer::bundle::Bundle;
use crate::infer::inspect::Inspector;
use crate::model::preprocess::Inspection;
use crate::postprocess::screen::ScreenChoice;

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let data = crate::objects::local_data(&args.data, &crate::objects::cache_root())?;
    // Data problems are cheaper to find than a model load.
    crate::eval::data::discover(&data)?;
    let runtime = args.runtime.to_config();
    let mut bundle = Bundle::load(&args.model, &runtime)?;
    let anomaly = bundle.manifest.anomaly;
    let residual = args.anomaly_map.map_or(anomaly.residual, Into::into);
    bundle.use_map_rule(residual, args.feature_t.unwrap_or(anomaly.feature_t), &runtime)?;
    if args.no_fusion {
        bundle.manifest.anomaly.fusion = None;
    }
    let screen = ScreenChoice::from_flags(args.no_fusion || args.no_screen, args.screen_recall);
    bundle.manifest.choose_screen(screen).map_err(|e| anyhow::anyhow!("--screen-recall: {e}"))?;
    if let Some(weight) = args.fusion_weight {
        let Some(fusion) = bundle.manifest.anomaly.fusion.as_mut() else {
            bail!("--fusion-weight {weight}: {} fuses no patch map (no [anomaly.fusion])", args.model.display());
        };
        fusion.patch_weight = weight;
    }
    if let Some(stride) = args.tile_stride {
        let Inspection::Tiled { scale, .. } = bundle.manifest.inspection else {
            bail!("--tile-stride {stride}: {} is not a tiled model", args.model.display());
        };
        let tile = bundle.manifest.input.width.min(bundle.manifest.input.height);
        if stride == 0 || stride > tile {
            bail!("--tile-stride {stride}: must be in 1..={tile} (the tile size), or tiles would leave gaps");
        }
        bundle.manifest.inspection = Inspection::Tiled { scale, stride };
    }
    let spec = reconstruction_spec(bundle.manifest.reconstruction, &args.reconstruction);
    let mut inspector = Inspector::new(bundle, Some(spec))?.with_tile_batch(args.batch);
    if args.no_ensemble {
        inspector = inspector.without_ensemble()?;
    }
    let out = args.out.clone().unwrap_or_else(|| {
        let data_name = data.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        PathBuf::from("results").join(&inspector.manifest().name).join(data_name)
    });
    fs::create_dir_all(&out).with_context(|| format!("{}: cannot create report directory", out.display()))?;
    let options = EvalOptions {
        resize: args.resize,
        batch: args.batch,
        seed: args.seed,
        overlays: args.overlays,
        progress: !args.no_progress,
        sensitivity: args.sensitivity,
    };
    let report = evaluate(&mut inspector, &args.model, &data, &out, &options)?;
    let summary = markdown(&report);
    write_atomic(&out.join("report.json"), &serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("{}: cannot write report.json", out.display()))?;
    write_atomic(&out.join("summary.md"), summary.as_bytes())
        .with_context(|| format!("{}: cannot write summary.md", out.display()))?;
    print!("{summary}");
    tracing::info!(report = %out.join("report.json").display(), "Evaluation written.");
    Ok(())
}
