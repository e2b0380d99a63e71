//! The noise schedule and the closed-form forward process.
//!
//! Owns β/α/ᾱ for a DDPM with `T` steps and `q_sample`, the one place where a clean
//! image is noised. Training (`retrain`) and inference (`infer::reconstruct`) both build
//! their schedule from the manifest's [`ScheduleSpec`], so the daemon can never noise a
//! frame differently from how the model was trained.
//!
//! Index convention: timestep index `k ∈ 0..T` is the value fed to the UNet and
//! `x_k = √ᾱ_k·x₀ + √(1−ᾱ_k)·ε` with `ᾱ_k = ∏_{i≤k} (1−β_i)`, as in DDPM/diffusers.

use serde::{Deserialize, Serialize};

/// How β grows over the steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum BetaSchedule {
    /// β evenly spaced from `beta_start` to `beta_end` (Ho et al. 2020).
    Linear { beta_start: f64, beta_end: f64 },
    /// ᾱ follows a squared cosine (Nichol & Dhariwal 2021), β capped at 0.999.
    Cosine { offset: f64 },
}

/// The serialisable description of a schedule, stored in the model manifest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Number of diffusion steps `T`.
    pub steps: usize,
    /// A nested table: serde cannot combine `flatten` with `deny_unknown_fields`.
    pub betas: BetaSchedule,
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self { steps: 1000, betas: BetaSchedule::Linear { beta_start: 1e-4, beta_end: 0.02 } }
    }
}

/// Precomputed per-step coefficients (f64 so that long products stay exact enough).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub betas: Vec<f64>,
    pub alphas: Vec<f64>,
    pub alpha_bars: Vec<f64>,
}

/// A schedule parameter that cannot describe a valid diffusion process.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("schedule steps must be at least 1, got {0}")]
    NoSteps(usize),
    #[error("linear betas must satisfy 0 < beta_start ({start}) <= beta_end ({end}) < 1")]
    BadLinearRange { start: f64, end: f64 },
    #[error("cosine offset must be in [0, 1), got {0}")]
    BadCosineOffset(f64),
}

impl NoiseSchedule {
    pub fn new(spec: &ScheduleSpec) -> Result<Self, ScheduleError> {
        let steps = spec.steps;
        if steps == 0 {
            return Err(ScheduleError::NoSteps(steps));
        }
        let betas: Vec<f64> = match spec.betas {
            BetaSchedule::Linear { beta_start, beta_end } => {
                if !(beta_start > 0.0 && beta_start <= beta_end && beta_end < 1.0) {
                    return Err(ScheduleError::BadLinearRange { start: beta_start, end: beta_end });
                }
                let span = (steps.max(2) - 1) as f64;
                (0..steps).map(|k| beta_start + (beta_end - beta_start) * k as f64 / span).collect()
            }
            BetaSchedule::Cosine { offset } => {
                if !(0.0..1.0).contains(&offset) {
                    return Err(ScheduleError::BadCosineOffset(offset));
                }
                let f = |k: f64| {
                    let u = (k / steps as f64 + offset) / (1.0 + offset) * std::f64::consts::FRAC_PI_2;
                    u.cos().powi(2)
                };
                (0..steps).map(|k| (1.0 - f(k as f64 + 1.0) / f(k as f64)).min(0.999)).collect()
            }
        };
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alpha_bars = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        Ok(Self { betas, alphas, alpha_bars })
    }

    /// Number of steps `T`.
    #[expect(clippy::len_without_is_empty, reason = "`new` refuses an empty schedule")]
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// ᾱ at index `k`, with ᾱ at "index −1" (the clean image) equal to 1.
    pub fn alpha_bar_or_one(&self, k: Option<usize>) -> f64 {
        k.map_or(1.0, |k| self.alpha_bars[k])
    }

    /// Closed-form forward process: writes `√ᾱ_k·x0 + √(1−ᾱ_k)·noise` into `out`.
    pub fn q_sample(&self, x0: &[f32], noise: &[f32], k: usize, out: &mut [f32]) {
        assert!(x0.len() == noise.len() && x0.len() == out.len(), "q_sample: length mismatch");
        let signal = self.alpha_bars[k].sqrt() as f32;
        let spread = (1.0 - self.alpha_bars[k]).sqrt() as f32;
        for ((o, x), n) in out.iter_mut().zip(x0).zip(noise) {
            *o = signal * x + spread * n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden values computed independently in Python (float64, plain loops):
    //   b = [1e-4 + (0.02 - 1e-4) * k / 999 for k in range(1000)]; ab = running product of 1 - b
    //   ab[0], ab[99], ab[249], ab[999] -> 0.9999, 0.89701814567496, 0.5240853738253606, 4.0358297653756754e-05
    //   cosine, s = 0.008: f = lambda k: cos((k/T + s)/(1 + s)·π/2)²; b = min(1 − f(k+1)/f(k), 0.999)
    //   ab[0], ab[499], ab[999] -> 0.999958715775178, 0.4938435904406382, 2.4287669070348567e-09
    #[test]
    fn linear_schedule_matches_numpy() {
        let s = NoiseSchedule::new(&ScheduleSpec::default()).unwrap();
        assert_eq!(s.len(), 1000);
        assert!((s.betas[0] - 1e-4).abs() < 1e-15);
        assert!((s.betas[999] - 0.02).abs() < 1e-15);
        assert!((s.alpha_bars[0] - 0.9999).abs() < 1e-12);
        assert!((s.alpha_bars[99] - 0.89701814567496).abs() < 1e-12, "{}", s.alpha_bars[99]);
        assert!((s.alpha_bars[249] - 0.5240853738253606).abs() < 1e-12, "{}", s.alpha_bars[249]);
        assert!((s.alpha_bars[999] - 4.0358297653756754e-05).abs() < 1e-15, "{}", s.alpha_bars[999]);
    }

    #[test]
    fn cosine_schedule_matches_numpy() {
        let spec = ScheduleSpec { steps: 1000, betas: BetaSchedule::Cosine { offset: 0.008 } };
        let s = NoiseSchedule::new(&spec).unwrap();
        assert!((s.alpha_bars[0] - 0.999958715775178).abs() < 1e-12, "{}", s.alpha_bars[0]);
        assert!((s.alpha_bars[499] - 0.4938435904406382).abs() < 1e-12, "{}", s.alpha_bars[499]);
        assert!((s.alpha_bars[999] - 2.4287669070348567e-09).abs() < 1e-15, "{}", s.alpha_bars[999]);
        assert!(s.betas.iter().all(|b| *b > 0.0 && *b <= 0.999));
    }

    #[test]
    fn q_sample_is_the_closed_form() {
        let s = NoiseSchedule::new(&ScheduleSpec::default()).unwrap();
        let x0 = [1.0f32, -0.5, 0.25];
        let noise = [0.5f32, 2.0, -1.0];
        let mut out = [0.0f32; 3];
        s.q_sample(&x0, &noise, 249, &mut out);
        // √ᾱ_249 = 0.7239374101573703, √(1 − ᾱ_249) = 0.689865658062959 (same Python run)
        let (a, b) = (0.7239374101573703, 0.689865658062959);
        let expect = [a + 0.5 * b, -0.5 * a + 2.0 * b, 0.25 * a - b];
        for (o, e) in out.iter().zip(expect) {
            assert!((*o as f64 - e).abs() < 1e-6, "{o} vs {e}");
        }
    }

    #[test]
    fn rejects_invalid_specs() {
        let bad = ScheduleSpec { steps: 10, betas: BetaSchedule::Linear { beta_start: 0.1, beta_end: 0.01 } };
        assert!(matches!(NoiseSchedule::new(&bad), Err(ScheduleError::BadLinearRange { .. })));
        let none = ScheduleSpec { steps: 0, ..ScheduleSpec::default() };
        assert_eq!(NoiseSchedule::new(&none).unwrap_err(), ScheduleError::NoSteps(0));
    }
}
