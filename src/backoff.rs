//! Retrying with backoff: delays that double with jitter up to a cap, and sleeps that
//! shutdown cuts short. Shared by the capture threads (reopening a camera) and the MQTT
//! link (reconnecting to the broker).

use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sleeps `duration` unless shutdown (the sender side of `stop` dropped) comes first;
/// returns whether to keep going.
pub fn pause(stop: &Receiver<()>, duration: Duration) -> bool {
    matches!(stop.recv_timeout(duration), Err(RecvTimeoutError::Timeout))
}

/// Exponential backoff with ±25 % jitter, reset after a success.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    jitter: ChaCha8Rng,
}

/// A generator seeded from the clock: jitter must differ between nodes, not be secret.
pub fn clock_seeded_rng() -> ChaCha8Rng {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    ChaCha8Rng::seed_from_u64(nanos as u64 ^ u64::from(std::process::id()))
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, current: initial, jitter: clock_seeded_rng() }
    }

    /// The next wait: the current delay with jitter, never above `max` (so a peer that
    /// comes back is retried within `max`); the delay then doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let jitter = self.jitter.random_range(0.75..1.25);
        let delay = self.current.mul_f64(jitter).min(self.max);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        for (w, nominal) in waits.iter().zip([100u128, 200, 350, 350, 350]) {
            assert!(*w >= nominal * 3 / 4 && *w <= (nominal * 5 / 4).min(350), "{waits:?}");
        }
        b.reset();
        assert!(b.next_delay().as_millis() <= 125);
    }
}
