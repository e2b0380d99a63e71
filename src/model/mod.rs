//! What a model is: architecture, noise schedule, sampling plan, preprocessing and the
//! manifest, plus (feature `train`) the burn UNet and the ONNX graph it is written as.
//! Nothing here runs a model: that is `infer`, which depends on this module, never the
//! other way round.

pub mod architecture;
#[cfg(feature = "train")]
pub mod backbone;
pub mod diffusion;
#[cfg(feature = "train")]
pub mod half;
pub mod manifest;
#[cfg(feature = "train")]
// The crate's only unsafe code: the FFI to the oneDNN shim, each call with its SAFETY note.
#[allow(unsafe_code)]
pub mod onednn;
#[cfg(feature = "train")]
pub mod onnx_export;
#[cfg(feature = "train")]
pub mod patch;
pub mod preprocess;
#[cfg(feature = "train")]
pub mod quantize;
pub mod sampling;
#[cfg(feature = "train")]
pub mod unet;
