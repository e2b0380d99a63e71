//! Running a model bundle: the ONNX Runtime session, the reconstruction samplers and the
//! shared inspection path (reconstruct + post-process), and the tiling of large frames.

pub mod inspect;
pub mod reconstruct;
pub mod runtime;
pub mod tiling;
