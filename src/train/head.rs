//! The discriminative head (DRAEM, Zavrtanik et al. ICCV 2021; DiffusionAD): a small UNet
//! that looks at a frame and its diffusion reconstruction side by side and predicts, per
//! pixel, the probability that the frame shows a defect there.
//!
//! The pixel residual of a reconstruction is a weak map on irregular textures: the model
//! redraws *a* plausible texture, not *this* one. The head learns which differences matter
//! from synthetic defects of the given families ([`crate::train::defects`]) pasted on
//! training frames, and the bundle's own reconstructions of them; `retrain` trains one head
//! per family group without that group (to score it on shapes it never saw) and the shipped
//! one on every family. Cracks, foreign photographs, wear and dents are never pasted here, so
//! benchmark scores on them measure shapes the head never saw. Training frames are
//! contaminated; their own defects count as normal pixels here, which only makes the head
//! more conservative.
//!
//! The head reuses the project's UNet (input and output channels `2·C`, timestep fixed at
//! 0, output channel 0 is the logit), so the exporter, the ONNX contract and the runtime
//! are the denoiser's own.

use burn::module::Module;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::defects::{Family, names};
use super::operating_point::{pasted_set, reconstruct_all};
use crate::infer::ensemble::{head_input, patch_maps_of};
use crate::infer::reconstruct::Reconstructor;
use crate::infer::runtime::{Denoiser, RuntimeError};
use crate::model::architecture::UNetConfig;
use crate::model::unet::UNet;
use crate::postprocess::anomaly::mean_sd;
use crate::train::export::TrainedHead;

/// How the head is trained; stored in the training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub base_channels: usize,
    /// Training frames each given a pasted defect (each is also used clean).
    pub frames: usize,
    /// Weight of defect pixels in the binary cross-entropy (they are a few % of pixels).
    pub positive_weight: f64,
    /// Fraction of the normal-labelled pixels of each batch left out of the loss: those
    /// with the highest loss, where an unlabelled defect of the contaminated frames is the
    /// likeliest reason (LTS on the head's loss); 0 = every pixel counts.
    #[serde(default)]
    pub trim: f64,
    /// The head also reads the normal-patch model's map (standardised) as a third input,
    /// so it can learn where to trust the pretrained features.
    #[serde(default)]
    pub patch_channel: bool,
}

impl HeadConfig {
    pub fn with_steps(steps: usize) -> Self {
        Self {
            steps,
            batch_size: 8,
            learning_rate: 1e-3,
            base_channels: 16,
            frames: 128,
            positive_weight: 4.0,
            trim: 0.0,
            patch_channel: false,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.steps == 0 || self.batch_size == 0 || self.frames == 0 {
            return Err(format!(
                "the head needs steps, batch size and frames of at least 1, got {} / {} / {}",
                self.steps, self.batch_size, self.frames
            ));
        }
        if !(self.learning_rate > 0.0 && self.positive_weight > 0.0) {
            return Err("the head's learning rate and positive weight must be > 0".into());
        }
        // Its width: the architecture's own rules (channels 1 stands for any frame).
        self.unet(1).validate().map_err(|e| format!("the head: {e}"))?;
        if !(0.0..0.5).contains(&self.trim) {
            return Err(format!("the head's trim must be in [0, 0.5), got {}", self.trim));
        }
        Ok(())
    }

    /// The head's architecture for frames of `channels` channels.
    pub fn unet(&self, channels: usize) -> UNetConfig {
        UNetConfig {
            channels: 2 * channels + usize::from(self.patch_channel),
            base_channels: self.base_channels,
            channel_mults: vec![1, 2],
            res_blocks: 1,
            attention: false,
            groups: 8,
        }
    }
}

/// Trains the head on `frames` (`[C, H, W]` each, model space; training frames, never the
/// calibration ones the head is then scored on), each used clean and with a pasted defect
/// of one of `families`, reconstructed by `denoiser` with `reconstructor` (the operating
/// point's primary setting); `patch` computes the patch map a head with
/// [`HeadConfig::patch_channel`] reads. Returns the trained head with its mean loss over
/// the last tenth of the steps.
#[allow(clippy::too_many_arguments)] // the head's inputs, all needed, none derivable from another
pub fn train_head(
    denoiser: &mut dyn Denoiser,
    reconstructor: &mut Reconstructor,
    patch: Option<&mut dyn Denoiser>,
    frames: &[Vec<f32>],
    [channels, height, width]: [usize; 3],
    config: &HeadConfig,
    seed: u64,
    families: &[Family],
) -> Result<TrainedHead, RuntimeError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(3);
    let set = pasted_set(frames, [channels, height, width], seed.wrapping_add(1), &[families]);
    let recon = reconstruct_all(denoiser, reconstructor, &set.frames, [channels, height, width], seed)?;
    tracing::info!(pairs = set.frames.len(), families = ?names(families), "Head training pairs reconstructed.");
    let patch = match patch.filter(|_| config.patch_channel) {
        Some(graph) => Some(standardised_patch_maps(graph, &set.frames, set.clean_count, [channels, height, width])?),
        None if config.patch_channel => panic!("a head that reads the patch map needs the patch model's graph"),
        None => None,
    };

    let device = Device::flex().autodiff();
    let architecture = config.unet(channels);
    let mut model = UNet::init(&architecture, seed ^ 0x4845_4144, &device).expect("the head architecture is valid");
    let mut optimizer =
        AdamWConfig::new().with_weight_decay(0.0).with_grad_clipping(Some(GradientClippingConfig::Norm(1.0))).init();
    let plane = height * width;
    let in_channels = architecture.channels;
    let mut losses = Vec::with_capacity(config.steps);
    for _ in 0..config.steps {
        let mut input = Vec::with_capacity(config.batch_size * in_channels * plane);
        let mut target = Vec::with_capacity(config.batch_size * plane);
        for _ in 0..config.batch_size {
            let i = rng.random_range(0..set.frames.len());
            let extra = patch.as_ref().map(|(maps, _)| maps[i].as_slice());
            input.extend(head_input(&set.frames[i], &recon[i], extra, 1));
            target.extend(set.truth[i].iter().map(|t| *t as f32));
        }
        let n = config.batch_size;
        let x = Tensor::<4>::from_data(TensorData::new(input, [n, in_channels, height, width]), &device);
        let y = Tensor::<4>::from_data(TensorData::new(target, [n, 1, height, width]), &device);
        let t = Tensor::<1>::from_data(TensorData::new(vec![0.0f32; n], [n]), &device);
        let logits = model.forward(x, t).narrow(1, 0, 1);
        let loss = weighted_bce_with_logits(logits, y, config.positive_weight, config.trim);
        losses.push(loss.clone().into_data().as_slice::<f32>().expect("f32 loss")[0] as f64);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(config.learning_rate, model, grads);
    }
    let tail = &losses[losses.len() - (losses.len() / 10).max(1)..];
    let final_loss = tail.iter().sum::<f64>() / tail.len() as f64;
    tracing::info!(steps = config.steps, first = losses[0], last = final_loss, "Head trained.");
    Ok(TrainedHead {
        model: model.valid(),
        unet: architecture,
        final_loss,
        training_steps: config.steps,
        patch_channel: patch.map(|(_, stats)| stats),
    })
}

/// The patch map of each of `frames`, standardised by its mean and standard deviation over
/// the first `clean` (the clean frames); returns the maps and those statistics.
fn standardised_patch_maps(
    graph: &mut dyn Denoiser,
    frames: &[Vec<f32>],
    clean: usize,
    [c, h, w]: [usize; 3],
) -> Result<(Vec<Vec<f32>>, [f64; 2]), RuntimeError> {
    let mut maps = patch_maps_of(graph, frames, [c, h, w])?;
    let [mean, sd] = mean_sd(&maps[..clean]);
    for map in &mut maps {
        map.iter_mut().for_each(|v| *v = ((*v as f64 - mean) / sd) as f32);
    }
    Ok((maps, [mean, sd]))
}

/// Mean binary cross-entropy of `logits` against 0/1 `target`, defect pixels weighted by
/// `positive_weight`: `w·(softplus(z) − y·z)` with the stable
/// `softplus(z) = max(z, 0) + ln(1 + e^{−|z|})`. With `trim` > 0 the `trim` fraction of
/// normal-labelled pixels with the highest loss is left out, and the mean is over the rest.
fn weighted_bce_with_logits(logits: Tensor<4>, target: Tensor<4>, positive_weight: f64, trim: f64) -> Tensor<1> {
    let softplus = logits.clone().clamp_min(0.0).add(logits.clone().abs().neg().exp().add_scalar(1.0).log());
    let per_pixel = softplus.sub(target.clone().mul(logits));
    let weight = target.clone().mul_scalar((positive_weight - 1.0) as f32).add_scalar(1.0);
    let weighted = per_pixel.mul(weight);
    if trim <= 0.0 {
        return weighted.mean();
    }
    let values = weighted.clone().into_data().try_into_vec::<f32>().expect("f32 loss");
    let labels = target.into_data().try_into_vec::<f32>().expect("f32 target");
    let mut normal: Vec<f32> = values.iter().zip(&labels).filter(|(_, y)| **y == 0.0).map(|(v, _)| *v).collect();
    let dropped = (trim * normal.len() as f64).floor() as usize;
    if dropped == 0 {
        return weighted.mean();
    }
    let cut = normal.len() - dropped;
    normal.select_nth_unstable_by(cut, f32::total_cmp);
    let limit = normal[cut];
    // Ties at the limit are all dropped: at most a few pixels more than `dropped`.
    let keep: Vec<f32> = values.iter().zip(&labels).map(|(v, y)| f32::from(*y != 0.0 || *v < limit)).collect();
    let kept = keep.iter().sum::<f32>().max(1.0);
    let shape = weighted.shape();
    let mask = Tensor::<4>::from_data(TensorData::new(keep, shape), &weighted.device());
    weighted.mul(mask).sum().div_scalar(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heads_width_is_checked_like_any_unet() {
        let head = |base_channels| HeadConfig { base_channels, ..HeadConfig::with_steps(10) };
        assert_eq!(head(8).validate(), Ok(()));
        assert_eq!(head(8).unet(1).level_widths(), vec![8, 16]);
        for bad in [0, 12] {
            let e = head(bad).validate().unwrap_err();
            assert!(e.starts_with("the head: ") && e.contains(&bad.to_string()), "{bad}: {e}");
        }
    }

    #[test]
    fn weighted_bce_matches_the_closed_form() {
        let device = Device::flex();
        let z = Tensor::<4>::from_data(TensorData::new(vec![-2.0f32, 0.0, 3.0, 40.0], [1, 1, 2, 2]), &device);
        let y = Tensor::<4>::from_data(TensorData::new(vec![0.0f32, 1.0, 1.0, 0.0], [1, 1, 2, 2]), &device);
        let got = weighted_bce_with_logits(z, y, 3.0, 0.0).into_data().as_slice::<f32>().unwrap()[0] as f64;
        let bce =
            |z: f64, y: f64| -(y * (1.0 / (1.0 + (-z).exp())).ln() + (1.0 - y) * (1.0 - 1.0 / (1.0 + (-z).exp())).ln());
        // z = 40, y = 0: softplus(40) = 40 (the naive formula overflows to inf).
        let want = (bce(-2.0, 0.0) + 3.0 * bce(0.0, 1.0) + 3.0 * bce(3.0, 1.0) + 40.0) / 4.0;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }

    #[test]
    fn the_trim_leaves_out_the_worst_normal_pixels_and_their_gradient() {
        // Four normal pixels, one of them (z = 40) a defect nobody labelled; one defect pixel.
        let device = Device::flex().autodiff();
        let z = Tensor::<4>::from_data(TensorData::new(vec![-2.0f32, -1.0, 40.0, -3.0, 0.5], [1, 1, 1, 5]), &device)
            .require_grad();
        let y = Tensor::<4>::from_data(TensorData::new(vec![0.0f32, 0.0, 0.0, 0.0, 1.0], [1, 1, 1, 5]), &device);
        let loss = weighted_bce_with_logits(z.clone(), y, 2.0, 0.25);
        let got = loss.clone().into_data().as_slice::<f32>().unwrap()[0] as f64;
        let softplus = |z: f64| (1.0 + z.exp()).ln();
        // The pixel at z = 40 is a quarter of the normal ones: out; the defect pixel stays.
        let want = (softplus(-2.0) + softplus(-1.0) + softplus(-3.0) + 2.0 * (softplus(0.5) - 0.5)) / 4.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let grads = loss.backward();
        let dz = z.grad(&grads).unwrap().into_data().try_into_vec::<f32>().unwrap();
        assert_eq!(dz[2], 0.0, "no gradient from the trimmed pixel: {dz:?}");
        assert!(dz.iter().enumerate().all(|(i, g)| i == 2 || *g != 0.0), "{dz:?}");
    }
}
