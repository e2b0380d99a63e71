//! The plain data that crosses threads in the daemon: a captured frame, prepared for the
//! model, and the same frame with the model's verdict. Capture produces [`Frame`]s, the
//! batcher groups them, the inference worker turns them into [`Inspected`], which the
//! publisher and the recorder consume.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use image::{DynamicImage, RgbImage};
use serde::Serialize;

use crate::capture::CameraStamp;
use crate::capture::trigger::Part;
use crate::postprocess::anomaly::Analysis;

/// A captured frame on its way through the pipeline.
pub struct Frame {
    /// The camera's slot (`daemon::cameras`).
    pub camera: usize,
    /// The model that is to inspect it (the worker's key; batches never mix models).
    pub model: usize,
    pub seq: u64,
    pub captured: SystemTime,
    pub captured_at: Instant,
    /// Where a replayed frame came from.
    pub source_file: Option<String>,
    /// `[C, H, W]` model-space tensor at inspection resolution (the model's input for a
    /// resize model; the ROI at the model's scale for a tiled one).
    pub tensor: Vec<f32>,
    /// Inspection-resolution picture for overlays.
    pub display: RgbImage,
    /// The frame as captured (after the region of interest), for recording.
    pub original: DynamicImage,
    /// Camera-frame pixel of `original`'s top-left corner (the ROI's origin, else 0, 0).
    pub origin: [u32; 2],
    /// The camera's inspection mask at inspection resolution (1 = inspected), if it has one.
    pub inspect: Option<Arc<Vec<u8>>>,
    /// The part a triggered frame shows (`capture::trigger`); `None` when free-running.
    pub part: Option<Part>,
    /// The camera's own number and time for it, where the camera gives them.
    pub stamp: CameraStamp,
}

/// A frame and the model's verdict on it.
pub struct Inspected {
    pub frame: Frame,
    pub analysis: Analysis,
    /// The model that judged it (models can be swapped while the daemon runs).
    pub model: Arc<ModelRef>,
}

/// A model as verdicts name it: alerts, states, events and sidecars carry it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

#[cfg(test)]
impl Frame {
    /// A grey frame of camera `camera`, `[h, w]` pixels, every model value `fill`.
    pub(crate) fn uniform(camera: usize, seq: u64, [h, w]: [u32; 2], fill: f32) -> Self {
        Self {
            camera,
            model: 0,
            seq,
            captured: SystemTime::now(),
            captured_at: Instant::now(),
            source_file: None,
            tensor: vec![fill; (h * w) as usize],
            display: RgbImage::new(w, h),
            original: DynamicImage::new_luma8(w, h),
            origin: [0, 0],
            inspect: None,
            stamp: CameraStamp::default(),
            part: None,
        }
    }
}
