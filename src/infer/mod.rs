//! Running a model bundle: the ONNX Runtime session, the reconstruction samplers and the
//! shared inspection path (reconstruct + post-process).

pub mod inspect;
pub mod reconstruct;
pub mod runtime;
