//! Frame sources: where frames come from, behind one trait (cameras and file replay), and
//! the capture thread that drives each of them (`thread`).
//!
//! The daemon drives every source the same way (one thread per camera, reopen with
//! backoff on error); tests and `eval` use sources that need no hardware. Cameras
//! (`camera`, feature `camera`) decode their raw buffers through nokhwa; any GStreamer
//! pipeline (`gstreamer`, feature `gstreamer`: RTSP, files, test patterns) ends in an appsink.

#[cfg(feature = "camera")]
pub mod camera;
#[cfg(feature = "genicam")]
pub mod genicam;
#[cfg(feature = "gstreamer")]
pub mod gstreamer;
pub mod labels;
pub mod mask;
pub mod replay;
pub mod thread;
pub mod trigger;

/// The file at the root of a capture store (frames the daemon recorded for retraining):
/// the daemon's recorder writes it, `retrain` recognises the layout by it.
pub const STORE_MARKER: &str = "edge-inspect-captures.toml";

use std::path::PathBuf;
use std::time::Duration;

use image::DynamicImage;

/// Where a camera's frames come from (validated `[[cameras]]` keys).
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    Replay {
        path: String,
        fps: f64,
        repeat: bool,
    },
    #[cfg(feature = "camera")]
    Camera(camera::CameraSettings),
    #[cfg(feature = "gstreamer")]
    Gstreamer(gstreamer::GstSettings),
    #[cfg(feature = "genicam")]
    Genicam(genicam::GenicamSettings),
}

impl SourceConfig {
    /// Whether the source delivers a frame when asked (a replay's next file, a camera's
    /// software trigger): a triggered camera then asks once per trigger instead of reading
    /// all the time.
    pub fn on_demand(&self) -> bool {
        match self {
            Self::Replay { .. } => true,
            #[cfg(feature = "genicam")]
            Self::Genicam(settings) => settings.software_trigger(),
            #[allow(unreachable_patterns)] // the other sources, where built
            _ => false,
        }
    }
}

/// One camera as the daemon runs it: the validated `[[cameras]]` table (`crate::config`
/// builds it; the capture thread runs it).
#[derive(Debug, Clone, PartialEq)]
pub struct CameraConfig {
    pub id: String,
    pub enabled: bool,
    pub source: SourceConfig,
    /// The camera's own model bundle (else the node's `model.path`).
    pub model: Option<PathBuf>,
    /// Scales the model's calibrated image threshold (`controls`); 1 = as calibrated.
    pub sensitivity: f64,
    /// `[x, y, width, height]` in source pixels.
    pub roi: Option<[u32; 4]>,
    /// Which pixels of a frame (after the ROI) are inspected (`capture::mask`).
    pub mask: Option<mask::InspectMask>,
    /// A frame with more pixels than this is counted as `too_large` and never decoded.
    pub max_frame_pixels: u64,
    pub stall_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Free-running, or one frame per trigger (`capture::trigger`).
    pub trigger: trigger::TriggerMode,
}

/// What a source that delivers frames on its own (a stream, a GenICam camera) is opened
/// with besides its settings.
#[cfg(any(feature = "gstreamer", feature = "genicam"))]
pub struct StreamContext {
    /// The camera id frames and errors are attributed to.
    pub camera: String,
    /// The model's channels (1: grey, 3: RGB): the pixel format delivered.
    pub channels: usize,
    /// A frame with more pixels is refused as `TooLarge`.
    pub max_pixels: u64,
    /// How long to wait for a frame before the source counts as stalled.
    pub stall: Duration,
    /// Disconnected when the capture thread is told to stop.
    pub stop: crossbeam_channel::Receiver<()>,
}

/// A capture failure, naming the camera and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("camera '{camera}': cannot open {device}: {reason}")]
    Open { camera: String, device: String, reason: String },
    #[error("camera '{camera}': read failed: {reason}")]
    Read { camera: String, reason: String },
    #[error("camera '{camera}': corrupt frame {what}: {reason}")]
    Corrupt { camera: String, what: String, reason: String },
    #[error("camera '{camera}': no more frames")]
    Ended { camera: String },
    #[error("camera '{camera}': stopped")]
    Stopped { camera: String },
    #[error("camera '{camera}': incomplete frame ({status})")]
    Incomplete { camera: String, status: String },
    #[error("camera '{camera}': frame {what} is {width}x{height}, over the limit of {limit} pixels; not decoded")]
    TooLarge { camera: String, what: String, width: u32, height: u32, limit: u64 },
    #[error("camera '{camera}': cannot decode a {format} frame of {width}x{height} from {bytes} bytes: {reason}")]
    Decode { camera: String, format: String, width: u32, height: u32, bytes: usize, reason: String },
}

/// Something that yields frames, one at a time, blocking until the next is there.
pub trait FrameSource {
    /// The camera id frames are attributed to.
    fn camera(&self) -> &str;
    /// The next frame. `Corrupt`/`Decode`/`TooLarge` errors are one bad frame (count and skip);
    /// `Open`/`Read` mean the source is gone (reopen with backoff); `Ended` means a finite
    /// source has no more frames; `Stopped` that the capture thread was told to stop while
    /// the source waited for a frame.
    fn next_frame(&mut self) -> Result<DynamicImage, CaptureError>;
    /// Frames the source itself dropped (newest wins) since the last call.
    fn take_dropped(&mut self) -> u64 {
        0
    }
    /// Asks an on-demand source for a frame (`SourceConfig::on_demand`): a camera's
    /// software trigger. A replay needs no asking.
    fn fire(&mut self) -> Result<(), CaptureError> {
        Ok(())
    }
    /// The file the last frame came from, for sources that read files.
    fn current_file(&self) -> Option<&std::path::PathBuf> {
        None
    }
    /// What the camera itself said about the last frame, where it says anything.
    fn stamp(&self) -> CameraStamp {
        CameraStamp::default()
    }
}

/// A frame as the camera numbered and timed it (GenICam: the stream's block id, the
/// camera's clock), beside the daemon's own sequence number and wall-clock time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CameraStamp {
    /// The camera's frame counter.
    pub frame_id: Option<u64>,
    /// The camera's timestamp of the exposure, in nanoseconds of its own clock.
    pub timestamp_ns: Option<u64>,
}
