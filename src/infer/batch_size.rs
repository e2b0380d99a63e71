//! How many tiles share one UNet call: fixed by the config, or chosen for the device the
//! session runs on by timing the warm UNet at a ladder of batch sizes.
//!
//! A CPU saturates at a few tiles per call and a GPU at hundreds, and where exactly depends
//! on the device, the graph and the precision, so `runtime.tile_batch = "auto"` measures
//! instead of guessing: each candidate is run once to warm up (a new shape allocates, and
//! TensorRT builds an engine for it, cached under its engine cache), then timed
//! [`TIMED_CALLS`] times; the choice is the smallest batch within [`TOLERANCE`] of the best
//! tiles per second, so that a plateau does not buy latency and memory for nothing. The
//! ladder stops early once two candidates in a row gain less than the tolerance, or when
//! the timed calls have used the time budget (warm-up calls do not count: a TensorRT engine
//! build takes far longer than the calls it serves, and must not end the ladder). On a hot
//! swap the probe runs beside the running model's inference, so on a busy CPU its figures
//! are noisier than at start-up.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::runtime::{Denoiser, Provider, RuntimeError};

/// Tiles per UNet call: `"auto"` (probed for the device) or a fixed count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TileBatchRepr", into = "TileBatchRepr")]
pub enum TileBatch {
    #[default]
    Auto,
    Fixed(usize),
}

/// The TOML form: the string `"auto"` or a number.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum TileBatchRepr {
    Count(usize),
    Name(String),
}

impl TryFrom<TileBatchRepr> for TileBatch {
    type Error = String;

    fn try_from(repr: TileBatchRepr) -> Result<Self, String> {
        match repr {
            TileBatchRepr::Count(n) => Ok(Self::Fixed(n)),
            TileBatchRepr::Name(name) if name == "auto" => Ok(Self::Auto),
            TileBatchRepr::Name(name) => Err(format!("expected \"auto\" or a number of tiles, got {name:?}")),
        }
    }
}

impl From<TileBatch> for TileBatchRepr {
    fn from(batch: TileBatch) -> Self {
        match batch {
            TileBatch::Auto => Self::Name("auto".into()),
            TileBatch::Fixed(n) => Self::Count(n),
        }
    }
}

/// The largest tile batch a config may fix (a batch of 64² pair tiles is 32 KiB per tile).
pub const MAX_TILE_BATCH: usize = 1024;

/// Timed calls per candidate, after one warm-up call; the median counts.
pub const TIMED_CALLS: usize = 3;

/// A batch within this fraction of the best throughput is as good as the best.
pub const TOLERANCE: f64 = 0.05;

/// Time in timed calls after which the ladder stops (the candidates measured so far decide).
pub const BUDGET: Duration = Duration::from_secs(10);

/// The largest probe input: candidates whose batch of tiles would be larger are not tried.
pub const MAX_PROBE_BYTES: usize = 64 << 20;

/// The batch sizes tried on `provider`, smallest first.
pub fn candidates(provider: Provider) -> &'static [usize] {
    match provider {
        Provider::Cpu => &[1, 2, 4, 8, 16, 32],
        Provider::Cuda | Provider::Tensorrt => &[8, 16, 32, 64, 128, 256],
    }
}

/// What the probe measured and chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// `(tiles per call, tiles per second)`, in the order measured.
    pub measured: Vec<(usize, f64)>,
    pub chosen: usize,
}

/// Times `denoiser` on batches of `candidates` (ascending) tiles of `[C, H, W]` and chooses
/// one (see the module docs). `clock` reads the time since any fixed origin; the daemon
/// passes a monotonic clock, tests a simulated one.
pub fn probe(
    denoiser: &mut dyn Denoiser,
    tile: [usize; 3],
    candidates: &[usize],
    clock: &mut dyn FnMut() -> Duration,
) -> Result<Probe, RuntimeError> {
    let [c, h, w] = tile;
    let mut spent = Duration::ZERO;
    let mut measured: Vec<(usize, f64)> = Vec::new();
    let (mut best, mut flat) = (0.0f64, 0);
    let fits = |n: usize| n == candidates[0] || n * c * h * w * size_of::<f32>() <= MAX_PROBE_BYTES;
    for n in candidates.iter().copied().filter(|&n| fits(n)) {
        // A fixed pattern in the model's range: zeros could take kernels' shortcuts.
        let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
        let t = vec![250.0; n];
        denoiser.predict_eps(&x, [n, c, h, w], &t, &mut |_| {})?;
        let mut calls = Vec::with_capacity(TIMED_CALLS);
        for _ in 0..TIMED_CALLS {
            let before = clock();
            denoiser.predict_eps(&x, [n, c, h, w], &t, &mut |_| {})?;
            let call = clock() - before;
            spent += call;
            calls.push(call.as_secs_f64());
        }
        calls.sort_by(f64::total_cmp);
        let rate = n as f64 / calls[TIMED_CALLS / 2].max(1e-9);
        measured.push((n, rate));
        flat = if rate >= best * (1.0 + TOLERANCE) { 0 } else { flat + 1 };
        best = best.max(rate);
        if flat == 2 || spent >= BUDGET {
            break;
        }
    }
    let chosen = choose(&measured);
    Ok(Probe { measured, chosen })
}

/// The smallest batch within [`TOLERANCE`] of the best measured throughput.
fn choose(measured: &[(usize, f64)]) -> usize {
    let best = measured.iter().map(|&(_, rate)| rate).fold(0.0, f64::max);
    measured
        .iter()
        .filter(|&&(_, rate)| rate >= best * (1.0 - TOLERANCE))
        .map(|&(n, _)| n)
        .min()
        .expect("at least one candidate is measured")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A denoiser that costs `fixed + per_tile · n` of a simulated clock per call, and
    /// records the batch sizes it was called with.
    struct Costly {
        clock: Rc<Cell<Duration>>,
        fixed: Duration,
        per_tile: Duration,
        calls: Vec<usize>,
    }

    impl Denoiser for Costly {
        fn channels(&self) -> usize {
            1
        }
        fn predict_eps(
            &mut self,
            x: &[f32],
            shape: [usize; 4],
            _: &[f32],
            consume: &mut dyn FnMut(&[f32]),
        ) -> Result<(), RuntimeError> {
            assert_eq!(x.len(), shape.iter().product::<usize>());
            self.calls.push(shape[0]);
            self.clock.set(self.clock.get() + self.fixed + self.per_tile * shape[0] as u32);
            consume(x);
            Ok(())
        }
    }

    fn costly(fixed_ms: u64, per_tile_ms: u64) -> (Costly, Rc<Cell<Duration>>) {
        let clock = Rc::new(Cell::new(Duration::ZERO));
        let denoiser = Costly {
            clock: clock.clone(),
            fixed: Duration::from_millis(fixed_ms),
            per_tile: Duration::from_millis(per_tile_ms),
            calls: Vec::new(),
        };
        (denoiser, clock)
    }

    #[test]
    fn a_device_with_a_large_fixed_cost_per_call_gets_a_large_batch() {
        // A GPU-like cost: 40 ms per launch, 1 ms per tile. Tiles/s: 8 → 167, 16 → 286,
        // 32 → 444, 64 → 615, 128 → 762, 256 → 865: still rising by more than 5 %.
        let (mut gpu, clock) = costly(40, 1);
        let p = probe(&mut gpu, [1, 8, 8], candidates(Provider::Cuda), &mut || clock.get()).unwrap();
        assert_eq!(p.measured.iter().map(|m| m.0).collect::<Vec<_>>(), [8, 16, 32, 64, 128, 256]);
        assert_eq!(p.chosen, 256);
        assert!((p.measured[0].1 - 8.0 / 0.048).abs() < 1e-6, "{:?}", p.measured);
        // One warm-up and the timed calls per candidate.
        assert_eq!(gpu.calls.len(), 6 * (1 + TIMED_CALLS));
    }

    #[test]
    fn a_saturated_device_stops_the_ladder_and_takes_the_smallest_good_batch() {
        // A CPU-like cost: 1 ms per call, 10 ms per tile. Tiles/s: 1 → 90.9, 2 → 95.2,
        // 4 → 97.6: two candidates in a row gain less than 5 % and stop the ladder; of the
        // three, 2 and 4 are within 5 % of the best (≥ 92.7), and 2 is the smaller.
        let (mut cpu, clock) = costly(1, 10);
        let p = probe(&mut cpu, [1, 8, 8], candidates(Provider::Cpu), &mut || clock.get()).unwrap();
        assert_eq!(p.measured.iter().map(|m| m.0).collect::<Vec<_>>(), [1, 2, 4]);
        assert_eq!(p.chosen, 2);
    }

    #[test]
    fn the_timed_calls_budget_ends_the_ladder() {
        // 1.5 s per call: each candidate's timed calls cost 4.5 s of the 10 s budget (its
        // warm-up call does not count), so the third is the last.
        let (mut slow, clock) = costly(1500, 0);
        let p = probe(&mut slow, [1, 8, 8], candidates(Provider::Cuda), &mut || clock.get()).unwrap();
        assert_eq!(p.measured.len(), 3);
        assert_eq!(p.chosen, 32, "a fixed cost per call: the largest batch measured is best");
    }

    #[test]
    fn a_slow_warm_up_does_not_end_the_ladder() {
        // A TensorRT-like first call per shape: a 60 s engine build, then 40 ms + 1 ms per tile.
        struct Building(Costly, Option<usize>);
        impl Denoiser for Building {
            fn channels(&self) -> usize {
                1
            }
            fn predict_eps(
                &mut self,
                x: &[f32],
                shape: [usize; 4],
                t: &[f32],
                consume: &mut dyn FnMut(&[f32]),
            ) -> Result<(), RuntimeError> {
                if self.1 != Some(shape[0]) {
                    self.1 = Some(shape[0]);
                    self.0.clock.set(self.0.clock.get() + Duration::from_secs(60));
                }
                self.0.predict_eps(x, shape, t, consume)
            }
        }
        let (gpu, clock) = costly(40, 1);
        let p =
            probe(&mut Building(gpu, None), [1, 8, 8], candidates(Provider::Tensorrt), &mut || clock.get()).unwrap();
        assert_eq!(p.measured.len(), 6, "{:?}", p.measured);
        assert_eq!(p.chosen, 256);
    }

    #[test]
    fn batches_too_large_for_the_probe_are_not_tried() {
        // 3 × 512² tiles are 3 MiB each: 16 fit in 64 MiB, 32 do not.
        let (mut gpu, clock) = costly(40, 1);
        let p = probe(&mut gpu, [3, 512, 512], candidates(Provider::Cuda), &mut || clock.get()).unwrap();
        assert_eq!(p.measured.iter().map(|m| m.0).collect::<Vec<_>>(), [8, 16]);
        assert_eq!(p.chosen, 16);
    }

    #[test]
    fn the_config_form_is_auto_or_a_count() {
        #[derive(Deserialize)]
        struct Runtime {
            tile_batch: TileBatch,
        }
        let parse = |s: &str| toml::from_str::<Runtime>(s).map(|r| r.tile_batch);
        assert_eq!(parse("tile_batch = \"auto\"").unwrap(), TileBatch::Auto);
        assert_eq!(parse("tile_batch = 64").unwrap(), TileBatch::Fixed(64));
        let e = parse("tile_batch = \"many\"").unwrap_err().to_string();
        assert!(e.contains("\"many\"") && e.contains("auto"), "{e}");
    }
}
