//! From a burn UNet to a verified bundle on disk: the exporter that `retrain` and
//! `export` share.
//!
//! The ONNX graph is written to a staging directory, loaded back through ONNX Runtime
//! (the daemon's own path), compared with burn's forward pass on the golden probe
//! (max |ORT − burn| ≤ [`PARITY_TOLERANCE`]), and only then given its golden statistics
//! and renamed into place. A graph that fails any step never becomes a bundle.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData};

use crate::infer::bundle::{BundleError, Staged, pair_input_spec, run_golden, sha256_hex};
use crate::infer::runtime::{Denoiser, OrtDenoiser, RuntimeConfig};
use crate::model::architecture::UNetConfig;
use crate::model::manifest::{GoldenCheck, HEAD_FILE, HeadArtifact, MANIFEST_FILE, Manifest, ONNX_FILE};
use crate::model::onnx_export::{OPSET, export_onnx};
use crate::model::unet::UNet;

/// Largest accepted |ORT − burn| on the probe batch.
pub const PARITY_TOLERANCE: f64 = 1e-4;
/// Golden statistics tolerance; loose enough for GPU kernels, tight enough to catch a
/// different or corrupted graph.
pub const GOLDEN_TOLERANCE: f64 = 1e-3;

/// Forward pass of the burn model on a host batch.
pub fn burn_forward(model: &UNet, x: &[f32], shape: [usize; 4], t: &[f32]) -> Vec<f32> {
    let device = model.conv_in.weight.val().device();
    let x = Tensor::<4>::from_data(TensorData::new(x.to_vec(), shape), &device);
    let t = Tensor::<1>::from_data(TensorData::new(t.to_vec(), [t.len()]), &device);
    model.forward(x, t).into_data().as_slice::<f32>().expect("the UNet computes in f32").to_vec()
}

/// Largest element-wise difference between ORT and burn on `x`, `t`.
pub fn parity(
    model: &UNet,
    ort: &mut dyn Denoiser,
    x: &[f32],
    shape: [usize; 4],
    t: &[f32],
) -> Result<f64, BundleError> {
    let reference = burn_forward(model, x, shape, t);
    let mut worst = f64::NAN;
    ort.predict_eps(x, shape, t, &mut |eps| {
        // NaN-propagating maximum (`f64::max` would skip a NaN and pass a broken graph).
        worst = eps
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, |w, d| if w.is_nan() || d.is_nan() { f64::NAN } else { w.max(d) });
    })?;
    Ok(worst)
}

/// For [`export_bundle`]: keep the manifest's operating point and thresholds as given.
pub fn keep_thresholds(_: &mut OrtDenoiser, _: &mut Manifest, _: &Staged) -> Result<(), BundleError> {
    Ok(())
}

/// A trained head and what its artifact records of the training.
pub struct TrainedHead {
    pub model: UNet,
    pub unet: UNetConfig,
    pub final_loss: f64,
    pub training_steps: usize,
    /// The patch map's standardisation, for a head that reads it.
    pub patch_channel: Option<[f64; 2]>,
}

/// Writes the learned head into the staged bundle: ONNX export, ORT parity with burn on
/// the probe (as for the denoiser), golden statistics. Returns its session and artifact.
pub fn export_head(
    trained: &TrainedHead,
    manifest: &Manifest,
    staged: &Staged,
    runtime: &RuntimeConfig,
) -> Result<(OrtDenoiser, HeadArtifact), BundleError> {
    let TrainedHead { model: head, unet, final_loss, training_steps, patch_channel } = trained;
    let onnx = export_onnx(head, unet, env!("CARGO_PKG_VERSION"));
    staged.write(HEAD_FILE, &onnx)?;
    let path = staged.path(HEAD_FILE);
    let mut ort = OrtDenoiser::load(&path, unet.channels, runtime)?;
    let input = pair_input_spec(manifest, unet.channels);
    let (batch, timesteps) = (2, vec![0.0, 0.0]);
    let probe = GoldenCheck::probe(batch, &input);
    let shape = [batch, input.channels, input.height, input.width];
    let worst = parity(head, &mut ort, &probe, shape, &timesteps)?;
    if !(worst <= PARITY_TOLERANCE) {
        return Err(BundleError::Inconsistent {
            path,
            what: format!("head export parity failed: max |ORT − burn| = {worst:e} > {PARITY_TOLERANCE:e}"),
        });
    }
    let golden = pair_golden(&mut ort, manifest, unet.channels)?;
    let artifact = HeadArtifact {
        onnx: HEAD_FILE.to_string(),
        sha256: sha256_hex(&onnx),
        unet: unet.clone(),
        training_steps: *training_steps,
        final_loss: *final_loss,
        golden,
        patch_channel: *patch_channel,
    };
    Ok((ort, artifact))
}

/// The golden statistics of a graph of the head's contract with `channels` input channels
/// (frame ‖ reconstruction (‖ patch map): the head, the normal-patch model) on a probe
/// batch of two.
pub fn pair_golden(graph: &mut dyn Denoiser, manifest: &Manifest, channels: usize) -> Result<GoldenCheck, BundleError> {
    let input = pair_input_spec(manifest, channels);
    let (batch, timesteps) = (2, vec![0.0, 0.0]);
    let probe = GoldenCheck::probe(batch, &input);
    let mut golden = None;
    graph.predict_eps(&probe, [batch, input.channels, input.height, input.width], &timesteps, &mut |out| {
        golden = Some(GoldenCheck::from_output(batch, timesteps.clone(), out, GOLDEN_TOLERANCE));
    })?;
    Ok(golden.expect("predict_eps hands over its output"))
}

/// The golden statistics of a UNet graph on the probe of `manifest`'s input, one frame at
/// each of `timesteps` (export's parity probe; the int8 copy answers the same probe).
pub fn unet_golden(
    graph: &mut dyn Denoiser,
    manifest: &Manifest,
    timesteps: &[f32],
) -> Result<GoldenCheck, BundleError> {
    let (input, batch) = (manifest.input, timesteps.len());
    let probe = GoldenCheck::probe(batch, &input);
    let mut golden = None;
    graph.predict_eps(&probe, [batch, input.channels, input.height, input.width], timesteps, &mut |eps| {
        golden = Some(GoldenCheck::from_output(batch, timesteps.to_vec(), eps, GOLDEN_TOLERANCE));
    })?;
    Ok(golden.expect("predict_eps hands over its output"))
}

/// Exports `model` as the bundle described by `manifest` (its `artifact` and `golden`
/// sections are filled in here) into `target`. `calibrate` runs on the verified graph,
/// before the manifest is written, and may choose the operating point (reconstruction,
/// anomaly map), add files (the head) to the staged bundle and replace the thresholds; the
/// result is validated like any manifest.
pub fn export_bundle(
    model: &UNet,
    mut manifest: Manifest,
    target: &Path,
    runtime: &RuntimeConfig,
    force: bool,
    calibrate: impl FnOnce(&mut OrtDenoiser, &mut Manifest, &Staged) -> Result<(), BundleError>,
) -> Result<(PathBuf, Manifest), BundleError> {
    let staged = Staged::new(target, force)?;
    let onnx = export_onnx(model, &manifest.unet, env!("CARGO_PKG_VERSION"));
    staged.write(ONNX_FILE, &onnx)?;
    let onnx_path = staged.path(ONNX_FILE);
    let mut ort = OrtDenoiser::load(&onnx_path, manifest.unet.channels, runtime)?;

    let input = manifest.input;
    let batch = 2;
    let timesteps = vec![0.0, (manifest.schedule.steps / 2) as f32];
    let probe = GoldenCheck::probe(batch, &input);
    let shape = [batch, input.channels, input.height, input.width];
    let worst = parity(model, &mut ort, &probe, shape, &timesteps)?;
    if !(worst <= PARITY_TOLERANCE) {
        return Err(BundleError::Inconsistent {
            path: onnx_path,
            what: format!("export parity failed: max |ORT − burn| = {worst:e} > {PARITY_TOLERANCE:e}"),
        });
    }
    manifest.golden = unet_golden(&mut ort, &manifest, &timesteps)?;
    manifest.artifact.onnx = ONNX_FILE.to_string();
    manifest.artifact.sha256 = sha256_hex(&onnx);
    manifest.artifact.opset = OPSET;
    manifest.artifact.parity_max_abs_diff = worst;
    calibrate(&mut ort, &mut manifest, &staged)?;
    crate::infer::bundle::validate(&manifest)
        .map_err(|what| BundleError::Inconsistent { path: target.to_path_buf(), what })?;
    run_golden(&mut ort, &manifest).map_err(|what| BundleError::Golden { path: onnx_path.clone(), what })?;

    let text = toml::to_string_pretty(&manifest)
        .map_err(|e| BundleError::ManifestParse { path: staged.path(MANIFEST_FILE), message: e.to_string() })?;
    staged.write(MANIFEST_FILE, text.as_bytes())?;
    drop(ort);
    let path = staged.commit()?;
    tracing::info!(bundle = %path.display(), parity = worst, sha256 = %manifest.artifact.sha256, "Bundle exported.");
    Ok((path, manifest))
}
