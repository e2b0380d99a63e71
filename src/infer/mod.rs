//! Running a model bundle: the ONNX Runtime session and the reconstruction samplers.

pub mod reconstruct;
pub mod runtime;
