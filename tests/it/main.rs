//! The integration tests, linked once into one binary (each module used to be its own
//! binary linking burn and the whole crate). Each module drives real parts — the
//! `edge-inspect` binary, ONNX Runtime sessions, Mosquitto, lavapipe — started by the test
//! and stopped by PID. Run one area with `cargo test --test it daemon::`.
//!
//! The 60 s broker outage drill is `#[ignore]`d: scheduled and release runs turn it on
//! with `EDGE_INSPECT_LONG_DRILLS=1 ./scripts/test` (which passes `--include-ignored`);
//! the 10 s drill runs every time.

mod backbone;
mod config_property;
mod daemon;
mod eval;
mod fleet;
#[cfg(feature = "genicam")]
mod genicam;
mod gpu_runtime;
#[cfg(feature = "gpu-train")]
mod gpu_train;
#[cfg(feature = "gstreamer")]
mod gstreamer;
mod model_core;
mod retrain;
mod review_page;
mod tiling;
mod trigger;
mod upload;
