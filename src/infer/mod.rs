//! Running a model bundle: loading and verifying it (`bundle`), the ONNX Runtime session, the reconstruction samplers and the
//! shared inspection path (reconstruct + post-process), the tiling of large frames, and the tiles per
//! UNet call chosen for the device (`batch_size`).

pub mod batch_size;
pub mod bundle;
pub mod ensemble;
pub mod inspect;
pub mod reconstruct;
pub mod runtime;
pub mod tiling;
