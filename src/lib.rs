//! edge-inspect: visual inspection on factory lines with robust diffusion (RDDPM).
//!
//! # Layout
//!
//! ```text
//! infer:  model::preprocess → infer::tiling (tiles at the model's scale) → infer::reconstruct
//!         (ORT UNet, ensembles, DDAD conditioning) → postprocess::anomaly (or the head graph)
//!         → stitched map → render + JSON
//! export: model::unet (burn) → model::onnx_export → train::export (ORT parity, golden) → bundle
//! train:  train::data → model::preprocess → model::diffusion (q_sample) → model::unet
//!         → train::losses → AdamW/EMA → train::export → train::operating_point (search on
//!         synthetic defects) [→ train::head] → train::calibrate → bundle
//! run:    config → capture::thread ×N (frame::Frame, bounded queues) → batch → daemon::worker
//!         (infer::inspect) → daemon::mqtt::publish (MQTT, its outbox for what cannot go now)
//!         → daemon::recorder (capture store, read by retrain); daemon::supervisor owns the
//!         threads, their progress bounds and the systemd watchdog
//! eval:   eval::data → infer::inspect → eval::metrics → report; eval::synth builds benchmarks
//! shared core: model::{manifest, sampling, preprocess, diffusion, architecture},
//!              infer::{bundle, runtime, reconstruct, inspect}, postprocess::{anomaly, render}
//! ```
//!
//! Dependencies point down: `model` and `postprocess` use nothing above them; `infer` uses
//! `model`; `capture`, `batch` and `stats` know nothing of the daemon; `train`, `eval` and
//! `daemon` sit on top; `commands` on everything.
//!
//! - [`config`]: the daemon's TOML + environment configuration, validated with key paths.
//! - [`capture`]: frame sources behind one trait, V4L2 cameras (feature `camera`), and the
//!   per-camera capture thread.
//! - [`controls`]: what an operator changes on a camera at run time (enabled, sensitivity).
//! - [`frame`]: the frames that cross threads. [`batch`]: the cross-camera batcher.
//! - [`stats`]: counters, drop reasons and stage progress shared by the threads.
//! - [`allocator`]: the process's malloc thresholds, fixed at start.
//! - [`backoff`]: retry delays and stop-aware sleeps. [`durable`]: atomic, durable writes.
//!   [`timestamp`]: RFC 3339, the one way a time is written.
//! - [`model`]: what a model *is*: architecture, schedule, sampling plan, preprocessing, the
//!   manifest and (feature `train`) the burn UNet and its ONNX graph.
//! - [`infer`]: running a model: loading and verifying bundles, ONNX Runtime sessions, the
//!   reconstruction samplers and the one inspection path.
//! - [`postprocess`]: from reconstruction to verdict: maps, scores, masks, regions, images.
//! - `train` (feature `train`): `retrain`: data layouts, robust losses, the training loop,
//!   export, the operating-point search, the head, calibration.
//! - [`eval`]: `eval` and `synth`: labelled datasets, exact metrics (AUROC, AP, best F1,
//!   AUPRO), reports, and the synthetic contamination benchmark.
//! - [`daemon`]: `run`: wiring, the supervisor, the inference worker, MQTT, recording,
//!   systemd integration.
//! - [`objects`]: object storage for the offline commands (`--data s3://…`, `--publish`).
//!   [`fleet`]: the fleet's rollout protocol (messages, targeting, checked bundle downloads),
//!   followed by `daemon::fleet` and published by `edge-inspect fleet`.
//! - [`image_files`]: which files are images, listed the same way everywhere.
//! - [`logging`]: text, journald-native or JSON logs.
//! - [`commands`]: the subcommands, thin over the above.

// Unsafe code only where it is allowed: `model::onednn` (the FFI to oneDNN) and
// `infer::runtime::opt_out_of_telemetry` (the environment, set before any thread starts).
#![deny(unsafe_code)]

pub mod allocator;
pub mod backoff;
pub mod batch;
pub mod capture;
pub mod cli;
pub mod commands;
pub mod config;
pub mod controls;
pub mod daemon;
pub mod durable;
pub mod eval;
pub mod fleet;
pub mod frame;
pub mod image_files;
pub mod infer;
pub mod logging;
pub mod model;
pub mod objects;
pub mod postprocess;
pub mod stats;
pub mod timestamp;
#[cfg(feature = "train")]
pub mod train;
