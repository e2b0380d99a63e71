//! Partial-diffusion reconstruction: noise a frame to step `t0`, denoise it back.
//!
//! Owns the reverse samplers (ancestral DDPM over every step, DDIM over `steps` spaced
//! steps with stochasticity `eta`) and the buffers they reuse across batches. The noise of
//! each frame comes from its own seeded stream, so a frame's reconstruction does not depend
//! on which other frames share its batch.
//!
//! Optionally each reverse step is *conditioned* on the input (DDAD, Mousakhan et al. 2023):
//! the predicted clean image is pulled toward the frame by `condition · (1 − ᾱ_t)`, so
//! normal texture is reproduced as it is, not as some other plausible texture, while a
//! defect — far from anything the model can draw — is still replaced.

use super::runtime::{Denoiser, RuntimeError};
use crate::model::diffusion::NoiseSchedule;
use crate::model::sampling::{ReconstructionError, ReconstructionSpec, Sampler};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Reconstructs batches with one schedule and spec, reusing its buffers.
pub struct Reconstructor {
    schedule: NoiseSchedule,
    spec: ReconstructionSpec,
    plan: Vec<usize>,
    current: Vec<f32>,
    next: Vec<f32>,
    times: Vec<f32>,
    rngs: Vec<ChaCha8Rng>,
}

impl Reconstructor {
    pub fn new(schedule: NoiseSchedule, spec: ReconstructionSpec) -> Result<Self, ReconstructionError> {
        let plan = spec.plan(schedule.len())?;
        Ok(Self { schedule, spec, plan, current: Vec::new(), next: Vec::new(), times: Vec::new(), rngs: Vec::new() })
    }

    pub fn spec(&self) -> &ReconstructionSpec {
        &self.spec
    }

    /// UNet evaluations per frame.
    pub fn unet_calls(&self) -> usize {
        self.plan.len()
    }

    /// Reconstructs `clean [n, C, H, W]` (model space, [−1, 1]) into `out`; `seeds[i]`
    /// seeds frame `i`'s noise.
    pub fn reconstruct(
        &mut self,
        denoiser: &mut dyn Denoiser,
        clean: &[f32],
        shape: [usize; 4],
        seeds: &[u64],
        out: &mut [f32],
    ) -> Result<(), RuntimeError> {
        let [n, c, h, w] = shape;
        let per_frame = c * h * w;
        assert!(clean.len() == n * per_frame && out.len() == clean.len() && seeds.len() == n, "reconstruct: shapes");
        if self.plan.is_empty() {
            out.copy_from_slice(clean);
            return Ok(());
        }
        self.current.resize(clean.len(), 0.0);
        self.next.resize(clean.len(), 0.0);
        self.rngs.clear();
        self.rngs.extend(seeds.iter().map(|s| ChaCha8Rng::seed_from_u64(*s)));

        // Forward: x_{t0} = √ᾱ·x + √(1−ᾱ)·ε, per frame from its own stream.
        let start = self.plan[0];
        let signal = self.schedule.alpha_bars[start].sqrt() as f32;
        let spread = (1.0 - self.schedule.alpha_bars[start]).sqrt() as f32;
        for (i, rng) in self.rngs.iter_mut().enumerate() {
            let range = i * per_frame..(i + 1) * per_frame;
            for (x, x0) in self.current[range.clone()].iter_mut().zip(&clean[range]) {
                let noise: f32 = StandardNormal.sample(rng);
                *x = signal * x0 + spread * noise;
            }
        }

        for step in 0..self.plan.len() {
            let k = self.plan[step];
            let prev = match self.spec.sampler {
                Sampler::Ddpm => k.checked_sub(1),
                Sampler::Ddim => self.plan.get(step + 1).copied(),
            };
            let coefficients = StepCoefficients::new(&self.schedule, self.spec, k, prev);
            self.times.clear();
            self.times.resize(n, k as f32);
            let (current, next, rngs) = (&self.current, &mut self.next, &mut self.rngs);
            denoiser.predict_eps(current, shape, &self.times, &mut |eps| {
                for (i, rng) in rngs.iter_mut().enumerate() {
                    let range = i * per_frame..(i + 1) * per_frame;
                    let pixels = next[range.clone()]
                        .iter_mut()
                        .zip(&current[range.clone()])
                        .zip(&eps[range.clone()])
                        .zip(&clean[range]);
                    for (((x_next, x), e), y) in pixels {
                        *x_next = coefficients.apply(*x, *e, *y, rng);
                    }
                }
            })?;
            std::mem::swap(&mut self.current, &mut self.next);
        }
        for (o, x) in out.iter_mut().zip(&self.current) {
            *o = x.clamp(-1.0, 1.0);
        }
        Ok(())
    }
}

/// Per-step scalars of one reverse update, computed once per step, not per pixel.
struct StepCoefficients {
    sqrt_ab: f32,
    sqrt_one_minus_ab: f32,
    /// DDPM posterior mean `c_x0·x̂₀ + c_xt·x_t`; DDIM `√ᾱ_prev·x̂₀ + c_eps·ε̂`.
    c_x0: f32,
    c_xt: f32,
    c_eps: f32,
    /// Standard deviation of the fresh noise added this step.
    sigma: f32,
    /// DDAD pull of x̂₀ toward the input: `w·(1 − ᾱ_t)`, at most 1.
    pull: f32,
}

impl StepCoefficients {
    fn new(schedule: &NoiseSchedule, spec: ReconstructionSpec, k: usize, prev: Option<usize>) -> Self {
        let ab = schedule.alpha_bars[k];
        let ab_prev = schedule.alpha_bar_or_one(prev);
        let beta = schedule.betas[k];
        let (c_x0, c_xt, c_eps, sigma) = match spec.sampler {
            Sampler::Ddpm => {
                let c_x0 = ab_prev.sqrt() * beta / (1.0 - ab);
                let c_xt = schedule.alphas[k].sqrt() * (1.0 - ab_prev) / (1.0 - ab);
                let variance = beta * (1.0 - ab_prev) / (1.0 - ab);
                (c_x0, c_xt, 0.0, variance.sqrt())
            }
            Sampler::Ddim => {
                let sigma = spec.eta * ((1.0 - ab_prev) / (1.0 - ab)).sqrt() * (1.0 - ab / ab_prev).max(0.0).sqrt();
                let c_eps = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
                (ab_prev.sqrt(), 0.0, c_eps, sigma)
            }
        };
        Self {
            sqrt_ab: ab.sqrt() as f32,
            sqrt_one_minus_ab: (1.0 - ab).sqrt() as f32,
            c_x0: c_x0 as f32,
            c_xt: c_xt as f32,
            c_eps: c_eps as f32,
            sigma: sigma as f32,
            pull: (spec.condition * (1.0 - ab)).min(1.0) as f32,
        }
    }

    #[inline]
    fn apply(&self, x: f32, eps: f32, input: f32, rng: &mut ChaCha8Rng) -> f32 {
        // x̂₀ is clipped to the data range and pulled toward the input (DDAD's
        // ε̂ = ε − w·√(1−ᾱ)·(y_t − x_t) is exactly this move of x̂₀); ε is re-derived from
        // the final x̂₀ (DDIM).
        let x0 = ((x - self.sqrt_one_minus_ab * eps) / self.sqrt_ab).clamp(-1.0, 1.0);
        let x0 = x0 + self.pull * (input - x0);
        let eps_hat = (x - self.sqrt_ab * x0) / self.sqrt_one_minus_ab;
        let mean = self.c_x0 * x0 + self.c_xt * x + self.c_eps * eps_hat;
        if self.sigma > 0.0 {
            let z: f32 = StandardNormal.sample(rng);
            mean + self.sigma * z
        } else {
            mean
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::runtime::FnDenoiser;
    use crate::model::diffusion::ScheduleSpec;
    use crate::model::sampling::spec;

    /// A denoiser that knows the true clean image predicts ε exactly; every sampler must
    /// then return that image (up to float error), which checks the update algebra.
    #[test]
    fn oracle_denoiser_recovers_the_clean_image() {
        let schedule = NoiseSchedule::new(&ScheduleSpec::default()).unwrap();
        let clean: Vec<f32> = (0..32).map(|i| ((i as f32) * 0.37).sin() * 0.9).collect();
        for s in [
            spec(50, 50, Sampler::Ddpm),
            spec(250, 10, Sampler::Ddim),
            ReconstructionSpec { eta: 1.0, ..spec(100, 7, Sampler::Ddim) },
        ] {
            let mut r = Reconstructor::new(schedule.clone(), s).unwrap();
            let alpha_bars = schedule.alpha_bars.clone();
            let mut oracle = FnDenoiser(|i, x, k| {
                let ab = alpha_bars[k];
                ((x as f64 - ab.sqrt() * clean[i] as f64) / (1.0 - ab).sqrt()) as f32
            });
            let mut out = vec![0.0; 32];
            r.reconstruct(&mut oracle, &clean, [2, 1, 4, 4], &[1, 2], &mut out).unwrap();
            let worst = out.iter().zip(&clean).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-3, "{s:?}: worst {worst}");
        }
    }

    #[test]
    fn conditioning_pulls_the_reconstruction_toward_the_input() {
        let schedule = NoiseSchedule::new(&ScheduleSpec::default()).unwrap();
        let input: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.61).sin() * 0.8).collect();
        let distance = |condition: f64| {
            let s = ReconstructionSpec { condition, ..spec(100, 5, Sampler::Ddim) };
            let mut r = Reconstructor::new(schedule.clone(), s).unwrap();
            let mut out = vec![0.0; 64];
            // A blurry model: x̂₀ is half of the noisy image's signal, so anything it does not
            // know fades away over the reverse steps unless conditioning keeps pulling.
            let alpha_bars = schedule.alpha_bars.clone();
            let mut fading = FnDenoiser(|_, x, k| (0.5 * x as f64 / (1.0 - alpha_bars[k]).sqrt()) as f32);
            r.reconstruct(&mut fading, &input, [1, 1, 8, 8], &[3], &mut out).unwrap();
            out.iter().zip(&input).map(|(a, b)| (a - b).abs()).sum::<f32>() / 64.0
        };
        let (plain, some, strong) = (distance(0.0), distance(5.0), distance(100.0));
        assert!(some < plain && strong < some, "{plain} > {some} > {strong} expected");
        assert!(strong < 0.7 * plain, "a strong pull keeps the input: {strong} vs {plain}");
        let bad = ReconstructionSpec { condition: -1.0, ..spec(10, 1, Sampler::Ddim) };
        assert_eq!(bad.check(1000), Err(ReconstructionError::Condition(-1.0)));
    }
}
