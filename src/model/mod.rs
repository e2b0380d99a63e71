//! What a model is: architecture, noise schedule, preprocessing and the bundle format,
//! plus (feature `train`) the burn UNet and the ONNX exporter that turns it into a bundle.

pub mod architecture;
pub mod bundle;
pub mod diffusion;
#[cfg(feature = "train")]
pub mod export;
pub mod manifest;
#[cfg(feature = "train")]
pub mod onnx_export;
pub mod preprocess;
#[cfg(feature = "train")]
pub mod unet;
