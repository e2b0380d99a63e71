//! edge-inspect: visual inspection on factory lines with robust diffusion (RDDPM).
//!
//! # Layout
//!
//! ```text
//! infer:  model::preprocess → infer::reconstruct (ORT UNet) → postprocess::anomaly → render + JSON
//! export: model::unet (burn) → model::onnx_export → model::export (ORT parity, golden) → bundle
//! train:  train::data → model::preprocess → model::diffusion (q_sample) → model::unet
//!         → train::losses → AdamW/EMA → model::export + train::calibrate → bundle
//! shared core: model::{manifest, bundle, preprocess, diffusion, architecture},
//!              infer::{runtime, reconstruct}, postprocess::{anomaly, render}
//! ```
//!
//! - [`capture`]: frame sources behind one trait; V4L2 cameras (feature `camera`).
//! - [`model`]: what a model *is*: architecture, schedule, preprocessing, the bundle format
//!   and (feature `train`) the burn UNet and its ONNX exporter.
//! - [`infer`]: running a model: ONNX Runtime sessions and the reconstruction samplers.
//! - [`postprocess`]: from reconstruction to verdict: maps, scores, masks, regions, images.
//! - `train` (feature `train`): `retrain`: data layouts, robust losses, the training loop,
//!   calibration.
//! - [`eval`]: exact detection and segmentation metrics (AUROC, AP, best F1, AUPRO).
//! - [`commands`]: the subcommands, thin over the above.

pub mod capture;
pub mod cli;
pub mod commands;
pub mod eval;
pub mod infer;
pub mod model;
pub mod postprocess;
#[cfg(feature = "train")]
pub mod train;
