//! How a frame is reconstructed, as a manifest records it: the sampler, t0, reverse steps,
//! stochasticity and DDAD conditioning, and the timesteps that plan visits. Plain data and
//! arithmetic: the manifest, the config and the flags share it; `infer::reconstruct` runs it.

use serde::{Deserialize, Serialize};

/// The reverse sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampler {
    /// Ancestral DDPM: one UNet call per step from `t0` down to 1.
    Ddpm,
    /// DDIM: `steps` UNet calls on an evenly spaced subsequence.
    Ddim,
}

/// How a frame is reconstructed; stored in the manifest, overridable by config and flags.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconstructionSpec {
    /// Forward noising steps (0 returns the frame unchanged).
    pub t0: usize,
    /// Reverse UNet calls; must equal `t0` for DDPM.
    pub steps: usize,
    pub sampler: Sampler,
    /// DDIM stochasticity (0 = deterministic given the start noise, 1 ≈ DDPM).
    #[serde(default)]
    pub eta: f64,
    /// DDAD conditioning weight w ≥ 0: each step's x̂₀ moves toward the input by
    /// `w·(1 − ᾱ_t)` of the gap (0 = plain reconstruction, as before this field existed).
    #[serde(default)]
    pub condition: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReconstructionError {
    #[error("t0 = {t0} exceeds the schedule's {schedule_steps} steps")]
    T0TooLarge { t0: usize, schedule_steps: usize },
    #[error("ddpm runs every step: steps must equal t0 ({t0}), got {steps}")]
    DdpmSteps { t0: usize, steps: usize },
    #[error("ddim steps must be in 1..={t0} (t0), got {steps}")]
    DdimSteps { t0: usize, steps: usize },
    #[error("eta must be in [0, 1], got {0}")]
    Eta(f64),
    #[error("condition (DDAD weight) must be finite and in [0, 100], got {0}")]
    Condition(f64),
}

impl ReconstructionSpec {
    /// Applies overrides (flags, daemon config) to these settings. DDPM runs every step, so
    /// with the DDPM sampler and no explicit `steps`, steps follow t0.
    pub fn with_overrides(
        self,
        t0: Option<usize>,
        steps: Option<usize>,
        sampler: Option<Sampler>,
        eta: Option<f64>,
        condition: Option<f64>,
    ) -> Self {
        let t0 = t0.unwrap_or(self.t0);
        let sampler = sampler.unwrap_or(self.sampler);
        let steps = match (steps, sampler) {
            (Some(steps), _) => steps,
            (None, Sampler::Ddpm) => t0,
            (None, Sampler::Ddim) => self.steps,
        };
        Self { t0, steps, sampler, eta: eta.unwrap_or(self.eta), condition: condition.unwrap_or(self.condition) }
    }

    /// Checks these settings against a schedule of `schedule_steps` steps.
    pub fn check(&self, schedule_steps: usize) -> Result<(), ReconstructionError> {
        self.plan(schedule_steps).map(|_| ())
    }

    /// Descending timestep indices the sampler visits.
    pub fn plan(&self, schedule_steps: usize) -> Result<Vec<usize>, ReconstructionError> {
        let (t0, steps) = (self.t0, self.steps);
        if t0 > schedule_steps {
            return Err(ReconstructionError::T0TooLarge { t0, schedule_steps });
        }
        if !(0.0..=1.0).contains(&self.eta) {
            return Err(ReconstructionError::Eta(self.eta));
        }
        if !(0.0..=100.0).contains(&self.condition) {
            return Err(ReconstructionError::Condition(self.condition));
        }
        if t0 == 0 {
            return Ok(Vec::new());
        }
        match self.sampler {
            Sampler::Ddpm if steps != t0 => Err(ReconstructionError::DdpmSteps { t0, steps }),
            Sampler::Ddpm => Ok((0..t0).rev().collect()),
            Sampler::Ddim if steps == 0 || steps > t0 => Err(ReconstructionError::DdimSteps { t0, steps }),
            Sampler::Ddim if steps == 1 => Ok(vec![t0 - 1]),
            Sampler::Ddim => {
                let span = (t0 - 1) as f64 / (steps - 1) as f64;
                Ok((0..steps).rev().map(|j| (j as f64 * span).round() as usize).collect())
            }
        }
    }
}

/// Unconditioned, deterministic settings, for tests.
#[cfg(test)]
pub(crate) fn spec(t0: usize, steps: usize, sampler: Sampler) -> ReconstructionSpec {
    ReconstructionSpec { t0, steps, sampler, eta: 0.0, condition: 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_visit_the_expected_steps() {
        assert_eq!(spec(5, 5, Sampler::Ddpm).plan(1000).unwrap(), vec![4, 3, 2, 1, 0]);
        assert_eq!(spec(100, 5, Sampler::Ddim).plan(1000).unwrap(), vec![99, 74, 50, 25, 0]);
        assert_eq!(spec(100, 1, Sampler::Ddim).plan(1000).unwrap(), vec![99]);
        assert!(spec(0, 0, Sampler::Ddim).plan(1000).unwrap().is_empty());
        assert_eq!(spec(10, 3, Sampler::Ddpm).plan(1000), Err(ReconstructionError::DdpmSteps { t0: 10, steps: 3 }));
        assert_eq!(spec(10, 11, Sampler::Ddim).plan(1000), Err(ReconstructionError::DdimSteps { t0: 10, steps: 11 }));
        assert_eq!(
            spec(1001, 1, Sampler::Ddim).plan(1000),
            Err(ReconstructionError::T0TooLarge { t0: 1001, schedule_steps: 1000 })
        );
    }
}
