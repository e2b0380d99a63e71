//! What an operator may change on a camera while the daemon runs (MQTT commands, after
//! Frigate's `<camera>/<feature>/set`): whether it is enabled, its sensitivity, and a request
//! for a snapshot. The control thread writes them, the capture thread reads `enabled`, the
//! publisher reads the sensitivity and the snapshot request. Enabled and sensitivity persist
//! in `<state_dir>/controls.json`, so a restart keeps what the operator set; a camera not in
//! the file starts as its config says (`enabled`, `sensitivity`), and a reload that changes
//! them in the config overrides what was set.
//!
//! Sensitivity `s` scales the calibrated image threshold: a frame is anomalous when its
//! score is at least `threshold / s` (1 = as calibrated, 2 = half the threshold, more
//! alerts; 0.5 = twice it, fewer). Masks and regions keep the calibrated pixel threshold.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::durable::write_atomic;

/// The sensitivities an operator may set.
pub const SENSITIVITY: RangeInclusive<f64> = 0.1..=10.0;

/// One camera's live controls.
#[derive(Debug)]
pub struct Controls {
    enabled: AtomicBool,
    /// `f64` bits.
    sensitivity: AtomicU64,
    snapshot_requested: AtomicBool,
}

impl Controls {
    pub fn new(enabled: bool, sensitivity: f64) -> Self {
        Self {
            enabled: AtomicBool::new(enabled),
            sensitivity: AtomicU64::new(sensitivity.to_bits()),
            snapshot_requested: AtomicBool::new(false),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Relaxed);
    }

    pub fn sensitivity(&self) -> f64 {
        f64::from_bits(self.sensitivity.load(Relaxed))
    }

    /// Sets a sensitivity within [`SENSITIVITY`]; the caller checks the range.
    pub fn set_sensitivity(&self, sensitivity: f64) {
        assert!(SENSITIVITY.contains(&sensitivity), "sensitivity {sensitivity} outside {SENSITIVITY:?}");
        self.sensitivity.store(sensitivity.to_bits(), Relaxed);
    }

    pub fn request_snapshot(&self) {
        self.snapshot_requested.store(true, Relaxed);
    }

    /// Whether a snapshot was asked for since the last call.
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_requested.swap(false, Relaxed)
    }
}

/// What `controls.json` holds per camera.
#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    enabled: bool,
    sensitivity: f64,
}

/// The controls of `cameras` (`(id, enabled, sensitivity)` as configured): persisted values
/// where `path` has them, else as configured.
pub fn load(path: &Path, cameras: &[(String, bool, f64)]) -> Vec<Controls> {
    let saved: BTreeMap<String, Persisted> = match std::fs::read(path) {
        Err(_) => BTreeMap::new(),
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "Unreadable camera controls; using the config's.");
            BTreeMap::new()
        }),
    };
    cameras
        .iter()
        .map(|(id, enabled, sensitivity)| match saved.get(id) {
            Some(p) if SENSITIVITY.contains(&p.sensitivity) => Controls::new(p.enabled, p.sensitivity),
            _ => Controls::new(*enabled, *sensitivity),
        })
        .collect()
}

/// Writes every camera's enabled and sensitivity to `path` (atomically).
pub fn save(path: &Path, cameras: &[(String, &Controls)]) -> std::io::Result<()> {
    let all: BTreeMap<&str, Persisted> = cameras
        .iter()
        .map(|(id, c)| (id.as_str(), Persisted { enabled: c.enabled(), sensitivity: c.sensitivity() }))
        .collect();
    write_atomic(path, &serde_json::to_vec_pretty(&all).expect("serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_persist_and_a_camera_without_a_record_starts_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controls.json");
        let cameras = [("a".to_string(), true, 1.0), ("b".to_string(), false, 3.0)];
        let controls = load(&path, &cameras);
        assert_eq!((controls[0].enabled(), controls[1].enabled(), controls[0].sensitivity()), (true, false, 1.0));
        assert_eq!(controls[1].sensitivity(), 3.0);
        controls[0].set_enabled(false);
        controls[0].set_sensitivity(2.5);
        save(&path, &[("a".into(), &controls[0])]).unwrap();
        let again = load(&path, &cameras);
        assert_eq!((again[0].enabled(), again[0].sensitivity()), (false, 2.5));
        assert!(!again[1].enabled(), "b has no record: as configured");
        assert!(!again[0].take_snapshot_request());
        again[0].request_snapshot();
        assert!(again[0].take_snapshot_request() && !again[0].take_snapshot_request());
    }
}
