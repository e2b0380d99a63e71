//! edge-inspect: visual inspection on factory lines with robust diffusion (RDDPM).
//!
//! # Layout
//!
//! ```text
//! infer:  model::preprocess → infer::tiling (tiles at the model's scale) → infer::reconstruct
//!         (ORT UNet, ensembles, DDAD conditioning) → postprocess::anomaly (or the head graph)
//!         → stitched map → render + JSON
//! export: model::unet (burn) → model::onnx_export → model::export (ORT parity, golden) → bundle
//! train:  train::data → model::preprocess → model::diffusion (q_sample) → model::unet
//!         → train::losses → AdamW/EMA → model::export → train::operating_point (search on
//!         synthetic defects) [→ train::head] → train::calibrate → bundle
//! run:    capture → daemon::pipeline (queues, batcher) → infer::inspect → daemon::publish (MQTT,
//!         daemon::outbox for what cannot go now) → daemon::recorder (capture store, read by retrain)
//! eval:   eval::data → infer::inspect → eval::metrics → report; eval::synth builds benchmarks
//! shared core: model::{manifest, bundle, preprocess, diffusion, architecture},
//!              infer::{runtime, reconstruct, inspect}, postprocess::{anomaly, render}
//! ```
//!
//! - [`capture`]: frame sources behind one trait; V4L2 cameras (feature `camera`).
//! - [`model`]: what a model *is*: architecture, schedule, preprocessing, the bundle format
//!   and (feature `train`) the burn UNet and its ONNX exporter.
//! - [`infer`]: running a model: ONNX Runtime sessions and the reconstruction samplers.
//! - [`postprocess`]: from reconstruction to verdict: maps, scores, masks, regions, images.
//! - `train` (feature `train`): `retrain`: data layouts, robust losses, the training loop,
//!   calibration.
//! - [`eval`]: `eval` and `synth`: labelled datasets, exact metrics (AUROC, AP, best F1,
//!   AUPRO), reports, and the synthetic contamination benchmark.
//! - [`daemon`]: `run`: config, capture threads, batching, inference worker, MQTT,
//!   recording, systemd integration.
//! - [`image_files`]: which files are images, listed the same way everywhere.
//! - [`commands`]: the subcommands, thin over the above.

pub mod capture;
pub mod cli;
pub mod commands;
pub mod daemon;
pub mod eval;
pub mod image_files;
pub mod infer;
pub mod model;
pub mod postprocess;
#[cfg(feature = "train")]
pub mod train;
