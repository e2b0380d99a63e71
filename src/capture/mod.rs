//! Frame sources: where frames come from, behind one trait.
//!
//! The daemon drives every source the same way (one thread per camera, reopen with
//! backoff on error); tests and `eval` use sources that need no hardware. Cameras
//! (`camera`, feature `camera`) decode their raw buffers through nokhwa.

#[cfg(feature = "camera")]
pub mod camera;

use image::DynamicImage;

/// A capture failure, naming the camera and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("camera '{camera}': cannot open {device}: {reason}")]
    Open { camera: String, device: String, reason: String },
    #[error("camera '{camera}': read failed: {reason}")]
    Read { camera: String, reason: String },
    #[error("camera '{camera}': cannot decode a {format} frame of {width}x{height} from {bytes} bytes: {reason}")]
    Decode { camera: String, format: String, width: u32, height: u32, bytes: usize, reason: String },
}

/// Something that yields frames, one at a time, blocking until the next is there.
pub trait FrameSource {
    /// The camera id frames are attributed to.
    fn camera(&self) -> &str;
    /// The next frame; an `Err` asks the caller to count it and, for persistent errors,
    /// reopen the source.
    fn next_frame(&mut self) -> Result<DynamicImage, CaptureError>;
}
