//! The regression losses of RDDPM on the noise residual `r = ε − ε̂`.
//!
//! Shape-checked free functions over `[B, C, H, W]` tensors returning a scalar `[1]`
//! tensor that gradients flow through:
//! - `mse`: plain DDPM, mean of r²;
//! - `l1`: mean |r| (the paper's "δ = 0" point);
//! - `huber`: element-wise, ½r² if |r| ≤ δ else δ(|r| − ½δ), mean over elements
//!   (PyTorch `F.huber_loss(.., delta=δ)`; not `smooth_l1_loss`, which divides by δ);
//! - `lts`: least trimmed squares per batch: the per-sample mean squared residuals, the
//!   ⌊λ·B⌋ (at least 1) smallest kept and averaged; the dropped samples get no gradient.

use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// The training objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Loss {
    Mse,
    L1,
    Huber { delta: f64 },
    Lts { lambda: f64 },
}

impl Loss {
    /// The short name recorded in manifests and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Loss::Mse => "mse",
            Loss::L1 => "l1",
            Loss::Huber { .. } => "huber",
            Loss::Lts { .. } => "lts",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LossError {
    #[error("prediction shape {prediction:?} differs from target shape {target:?}")]
    Shape { prediction: [usize; 4], target: [usize; 4] },
    #[error("huber delta must be > 0, got {0} (use the l1 loss for delta = 0)")]
    Delta(f64),
    #[error("lts lambda must be in (0, 1], got {0}")]
    Lambda(f64),
}

fn check(prediction: &Tensor<4>, target: &Tensor<4>) -> Result<(), LossError> {
    let (p, t) = (prediction.dims(), target.dims());
    if p != t {
        return Err(LossError::Shape { prediction: p, target: t });
    }
    Ok(())
}

pub fn mse(prediction: Tensor<4>, target: Tensor<4>) -> Result<Tensor<1>, LossError> {
    check(&prediction, &target)?;
    Ok(prediction.sub(target).square().mean())
}

pub fn l1(prediction: Tensor<4>, target: Tensor<4>) -> Result<Tensor<1>, LossError> {
    check(&prediction, &target)?;
    Ok(prediction.sub(target).abs().mean())
}

pub fn huber(prediction: Tensor<4>, target: Tensor<4>, delta: f64) -> Result<Tensor<1>, LossError> {
    check(&prediction, &target)?;
    if !(delta > 0.0) {
        return Err(LossError::Delta(delta));
    }
    let r = prediction.sub(target).abs();
    // q = min(|r|, δ): ½q² + δ(|r| − q) is ½r² inside and δ(|r| − ½δ) outside, branch-free.
    let q = r.clone().clamp_max(delta as f32);
    Ok(q.clone().square().mul_scalar(0.5).add(r.sub(q).mul_scalar(delta as f32)).mean())
}

/// Per-sample mean squared residual, `[B]`.
pub fn per_sample_mse(prediction: Tensor<4>, target: Tensor<4>) -> Result<Tensor<1>, LossError> {
    check(&prediction, &target)?;
    let [b, c, h, w] = prediction.dims();
    Ok(prediction.sub(target).square().reshape([b, c * h * w]).mean_dim(1).reshape([b]))
}

/// Number of samples LTS keeps out of `batch`.
pub fn lts_kept(batch: usize, lambda: f64) -> usize {
    ((lambda * batch as f64).floor() as usize).clamp(1, batch.max(1))
}

/// LTS loss and the indices of the kept samples (ascending residual).
pub fn lts(prediction: Tensor<4>, target: Tensor<4>, lambda: f64) -> Result<(Tensor<1>, Vec<usize>), LossError> {
    if !(lambda > 0.0 && lambda <= 1.0) {
        return Err(LossError::Lambda(lambda));
    }
    let per_sample = per_sample_mse(prediction, target)?;
    let batch = per_sample.dims()[0];
    // The sort happens on the host: B values per step, negligible, and identical on every backend.
    let values = per_sample.clone().into_data();
    let values = values.as_slice::<f32>().expect("losses are f32");
    let mut order: Vec<usize> = (0..batch).collect();
    order.sort_by(|a, b| values[*a].total_cmp(&values[*b]).then(a.cmp(b)));
    let kept_count = lts_kept(batch, lambda);
    order.truncate(kept_count);
    let mut mask = vec![0.0f32; batch];
    for &i in &order {
        mask[i] = 1.0;
    }
    let mask = Tensor::<1>::from_data(TensorData::new(mask, [batch]), &per_sample.device());
    Ok((per_sample.mul(mask).sum().div_scalar(kept_count as f32), order))
}

/// The configured loss as one scalar.
pub fn loss(kind: Loss, prediction: Tensor<4>, target: Tensor<4>) -> Result<Tensor<1>, LossError> {
    match kind {
        Loss::Mse => mse(prediction, target),
        Loss::L1 => l1(prediction, target),
        Loss::Huber { delta } => huber(prediction, target, delta),
        Loss::Lts { lambda } => lts(prediction, target, lambda).map(|(l, _)| l),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    // Golden values from the PyTorch formulas evaluated in plain Python (float64):
    //   pred = [[0.1,-0.5,0.3,0.0],[1.0,0.2,-0.2,0.05],[0.4,0.4,-1.5,0.1]]
    //   tgt  = [[0,0,0,0],[0,0,0,0],[0.5,0.1,0.2,-0.3]];  d = pred - tgt (flattened)
    //   mse = mean(d²)                      = 0.38187499999999996
    //   l1  = mean(|d|)                     = 0.40416666666666673
    //   huber(δ=0.2) = mean(½d² if |d|≤δ else δ(|d|−½δ)) = 0.06427083333333335
    //   per-sample mse = [0.0875, 0.270625, 0.7875]; lts(λ=0.8): keep ⌊2.4⌋=2 -> 0.1790625
    fn pair(device: &Device) -> (Tensor<4>, Tensor<4>) {
        let pred = vec![0.1, -0.5, 0.3, 0.0, 1.0, 0.2, -0.2, 0.05, 0.4, 0.4, -1.5, 0.1];
        let tgt = vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.1, 0.2, -0.3];
        (
            Tensor::from_data(TensorData::new(pred, [3, 1, 2, 2]), device),
            Tensor::from_data(TensorData::new(tgt, [3, 1, 2, 2]), device),
        )
    }

    fn scalar(t: Tensor<1>) -> f64 {
        t.into_data().as_slice::<f32>().unwrap()[0] as f64
    }

    #[test]
    fn golden_values() {
        let device = Device::flex();
        let (p, t) = pair(&device);
        assert!((scalar(mse(p.clone(), t.clone()).unwrap()) - 0.381875).abs() < 1e-6);
        assert!((scalar(l1(p.clone(), t.clone()).unwrap()) - 0.40416666666666673).abs() < 1e-6);
        assert!((scalar(huber(p.clone(), t.clone(), 0.2).unwrap()) - 0.06427083333333335).abs() < 1e-6);
        let (l, kept) = lts(p, t, 0.8).unwrap();
        assert!((scalar(l) - 0.1790625).abs() < 1e-6);
        assert_eq!(kept, vec![0, 1]);
    }

    #[test]
    fn lts_drops_the_largest_residuals_and_gives_them_no_gradient() {
        let device = Device::flex().autodiff();
        let (p, t) = pair(&device);
        let p = p.require_grad();
        let (l, kept) = lts(p.clone(), t, 0.8).unwrap();
        assert_eq!(kept, vec![0, 1], "sample 2 has the largest residual");
        let grads = l.backward();
        let g = p.grad(&grads).unwrap().into_data();
        let g = g.as_slice::<f32>().unwrap();
        assert!(g[8..].iter().all(|v| *v == 0.0), "dropped sample has gradient {:?}", &g[8..]);
        assert!(g[..8].iter().filter(|v| **v != 0.0).count() >= 6, "kept samples must have gradient: {g:?}");
        // d/dp of (1/s)·mean_i(d_i²) = 2·d/(s·n_per_sample) = 2·0.1/(2·4) for p[0].
        assert!((g[0] - 0.025).abs() < 1e-6, "{}", g[0]);
    }

    #[test]
    fn shapes_and_parameters_are_checked() {
        let device = Device::flex();
        let a = Tensor::<4>::zeros([2, 1, 2, 2], &device);
        let b = Tensor::<4>::zeros([2, 1, 2, 3], &device);
        assert!(matches!(mse(a.clone(), b), Err(LossError::Shape { .. })));
        assert_eq!(huber(a.clone(), a.clone(), 0.0).unwrap_err(), LossError::Delta(0.0));
        assert!(matches!(lts(a.clone(), a, 1.5), Err(LossError::Lambda(_))));
        assert_eq!(lts_kept(16, 0.8), 12);
        assert_eq!(lts_kept(1, 0.1), 1);
    }
}
