//! `edge-inspect export`: a seeded random-weight UNet as a verified bundle.
//!
//! For tests, benchmarks and integration checks of the runtime path before a model is
//! trained; the manifest says `loss = "random"` and the thresholds are uncalibrated.

use anyhow::Context;
use burn::tensor::Device;

use crate::cli::{ExportArgs, bundle_name};
use crate::model::diffusion::ScheduleSpec;
use crate::model::manifest::{Artifact, Calibration, GoldenCheck, Manifest, Provenance, SCHEMA_VERSION, Thresholds};
use crate::model::preprocess::Inspection;
use crate::model::sampling::ReconstructionSpec;
use crate::model::unet::UNet;
use crate::postprocess::anomaly::{AnomalySpec, Threshold};
use crate::train::export::{export_bundle, keep_thresholds};

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let unet = args.architecture.unet();
    let model = UNet::init(&unet, args.seed, &Device::flex()).context("invalid UNet settings")?;
    let name = bundle_name(&args.out, args.name.as_deref());
    let uncalibrated = Threshold { value: 0.1, min: 0.0, max: 0.2 };
    let manifest = Manifest {
        schema_version: SCHEMA_VERSION,
        name,
        version: "0.0.0-random".into(),
        created: crate::timestamp::now(),
        input: args.architecture.input(),
        inspection: args.tile_stride.map_or(Inspection::Resize, |stride| Inspection::Tiled { scale: 1.0, stride }),
        unet,
        schedule: ScheduleSpec::default(),
        reconstruction: ReconstructionSpec {
            t0: args.t0,
            steps: args.steps,
            sampler: args.sampler.into(),
            eta: 0.0,
            condition: 0.0,
        },
        anomaly: AnomalySpec::default(),
        thresholds: Thresholds {
            pixel: uncalibrated,
            image: uncalibrated,
            calibration: Calibration {
                rule: "uncalibrated (random weights)".into(),
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
            seed: args.seed,
            command: std::env::args().collect::<Vec<_>>().join(" "),
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
    };
    let (path, manifest) =
        export_bundle(&model, manifest, &args.out, &args.runtime.to_config(), args.force, keep_thresholds)?;
    println!(
        "exported {} (sha256 {}, parity {:.2e})",
        path.display(),
        manifest.artifact.sha256,
        manifest.artifact.parity_max_abs_diff
    );
    Ok(())
}
