//! One camera's capture thread: open the source, read frames, prepare them for the model,
//! offer them to the camera's bounded queue, and reopen with backoff when the source fails,
//! stalls or delivers corrupt frames — until shutdown or the end of a finite replay.
//!
//! Capture never blocks on the pipeline: the queue is bounded and the newest frame wins
//! (the oldest queued frame is dropped and counted, as Frigate does). Status changes
//! (online, offline, disabled) go to the supervisor, which publishes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use image::DynamicImage;

use super::trigger::{Part, TriggerMode, Triggers};
use super::{CameraConfig, CameraStamp, CaptureError, FrameSource, SourceConfig};
use crate::backoff::{Backoff, pause};
use crate::controls::Controls;
use crate::frame::Frame;
use crate::model::preprocess::{InputSpec, Inspection};
use crate::stats::{CameraStats, CameraStatus, DropReason};

/// Everything a capture thread needs.
pub struct CaptureLoop {
    /// The camera's slot (`daemon::cameras`), named on every frame.
    pub slot: usize,
    pub config: CameraConfig,
    /// The model that inspects this camera's frames, named on every frame (the batcher
    /// never mixes models in a batch).
    pub model: usize,
    pub input: InputSpec,
    /// Whole-frame resize or tiles at the model's scale (from the manifest).
    pub inspection: Inspection,
    pub stats: Arc<CameraStats>,
    pub queue_tx: Sender<Frame>,
    /// A clone of the queue's receiver, to drop the oldest frame when full.
    pub queue_rx: Receiver<Frame>,
    /// Dropped to stop this thread: at shutdown, or when the camera is removed or changed.
    pub stop: Receiver<()>,
    /// Set by the watchdog when the camera stalled; the thread reopens the source.
    pub reopen: Arc<AtomicBool>,
    /// Told about status changes (published on `<camera>/status`).
    pub status_tx: Sender<(usize, CameraStatus)>,
    /// Enabled or not, as the operator last said (or the config).
    pub controls: Arc<Controls>,
    /// The camera's open triggers, when it is triggered (`config.trigger`).
    pub triggers: Arc<Triggers>,
    /// Whether a disabled camera can be enabled at run time (MQTT commands are on): its
    /// thread then waits instead of ending.
    pub enable_at_run_time: bool,
    /// The camera's mask at inspection resolution, made at the first frame it fits.
    pub inspect_mask: std::cell::OnceCell<Arc<Vec<u8>>>,
}

/// How often a disabled camera looks whether it was enabled again.
const DISABLED_POLL: Duration = Duration::from_millis(250);

/// Consecutive corrupt frames after which a source is reopened.
const CORRUPT_REOPEN: u32 = 10;

/// Opened inside the capture thread: camera handles are not `Send`. `channels` are the
/// model's (a source that can negotiate its pixel format delivers them); `stop` ends a
/// source's wait for a frame.
fn open_source(
    config: &CameraConfig,
    channels: usize,
    stop: &Receiver<()>,
) -> Result<Box<dyn FrameSource>, CaptureError> {
    #[cfg(any(feature = "gstreamer", feature = "genicam"))]
    let context = || super::StreamContext {
        camera: config.id.clone(),
        channels,
        max_pixels: config.max_frame_pixels,
        stall: config.stall_timeout,
        stop: stop.clone(),
    };
    let _ = (channels, stop); // used by some sources only
    match &config.source {
        SourceConfig::Replay { path, .. } => {
            Ok(Box::new(super::replay::ReplaySource::open(&config.id, path, config.max_frame_pixels)?))
        }
        #[cfg(feature = "camera")]
        SourceConfig::Camera(settings) => Ok(Box::new(super::camera::CameraSource::open(&config.id, settings)?)),
        #[cfg(feature = "gstreamer")]
        SourceConfig::Gstreamer(settings) => Ok(Box::new(super::gstreamer::GstSource::open(settings, context())?)),
        #[cfg(feature = "genicam")]
        SourceConfig::Genicam(settings) => Ok(Box::new(super::genicam::GenicamSource::open(settings, context())?)),
    }
}

impl CaptureLoop {
    fn set_status(&self, status: CameraStatus) {
        let mut current = self.stats.status.lock().expect("stats lock");
        if *current != status {
            *current = status;
            let _ = self.status_tx.try_send((self.slot, status));
        }
    }

    /// Offers a frame to the camera's queue; when full, the oldest queued frame is dropped.
    fn enqueue(&self, mut frame: Frame) {
        loop {
            match self.queue_tx.try_send(frame) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) => {
                    if let Ok(evicted) = self.queue_rx.try_recv() {
                        self.stats.drop_frame(DropReason::QueueFull);
                        self.triggers.lost(evicted.seq, DropReason::QueueFull.as_str());
                    }
                    frame = back;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }

    fn prepare(&self, image: DynamicImage, taken: Taken, source_file: Option<String>) -> Option<Frame> {
        let Taken { seq, captured, captured_at, part, stamp } = taken;
        let origin = self.config.roi.map_or([0, 0], |[x, y, _, _]| [x, y]);
        let original = match self.config.roi {
            None => image,
            Some([x, y, w, h]) => {
                if x + w > image.width() || y + h > image.height() {
                    self.stats.drop_frame(DropReason::RoiOutside);
                    self.triggers.lost(seq, DropReason::RoiOutside.as_str());
                    if let Some(suppressed) = self.stats.warnings.admit() {
                        tracing::warn!(camera = %self.config.id, roi = ?self.config.roi, width = image.width(), height = image.height(), suppressed, "Region of interest lies outside the frame; frame dropped.");
                    }
                    return None;
                }
                image.crop_imm(x, y, w, h)
            }
        };
        if let Some(mask) = &self.config.mask
            && mask.size() != [original.width(), original.height()]
        {
            self.stats.drop_frame(DropReason::MaskSize);
            self.triggers.lost(seq, DropReason::MaskSize.as_str());
            if let Some(suppressed) = self.stats.warnings.admit() {
                tracing::warn!(camera = %self.config.id, mask = %mask.path().display(), mask_size = ?mask.size(), width = original.width(), height = original.height(), suppressed, "The inspection mask is not the size of the frame (after the ROI); frame dropped.");
            }
            return None;
        }
        let prepared = self.input.prepare_for(self.inspection, &original);
        let inspect = self.config.mask.as_ref().map(|mask| {
            let size = [prepared.display.height() as usize, prepared.display.width() as usize];
            self.inspect_mask.get_or_init(|| Arc::new(mask.at(size))).clone()
        });
        Some(Frame {
            camera: self.slot,
            model: self.model,
            seq,
            captured,
            captured_at,
            source_file,
            tensor: prepared.tensor,
            display: prepared.display,
            original,
            origin,
            inspect,
            part,
            stamp,
        })
    }

    /// Numbers a frame the source delivered; a triggered camera keeps only a frame that a
    /// waiting trigger claims (the others show no part: neither numbered nor counted).
    fn take(&self, stamp: CameraStamp) -> Option<Taken> {
        let (captured, captured_at) = (SystemTime::now(), Instant::now());
        // From the camera's counter: a thread restarted by a reload goes on where the last
        // one stopped, never repeating a number.
        let number = || self.stats.last_seq.fetch_add(1, Relaxed) + 1;
        let (seq, part) = match self.config.trigger {
            TriggerMode::Free => (number(), None),
            TriggerMode::Mqtt { .. } => {
                self.triggers.claim(captured_at, number).map(|(seq, part)| (seq, Some(part)))?
            }
            TriggerMode::Camera { .. } => {
                // Validated: only a GenICam source is line-triggered, and it numbers frames.
                let id = stamp.frame_id.map_or_else(|| "unnumbered".to_string(), |n| n.to_string());
                let Some((seq, part)) = self.triggers.arrived(id, captured, captured_at, number) else {
                    self.stats.frames_in.fetch_add(1, Relaxed);
                    self.stats.drop_frame(DropReason::QueueFull);
                    return None;
                };
                (seq, Some(part))
            }
        };
        Some(Taken { seq, captured, captured_at, part, stamp })
    }

    /// A triggered replay takes its next file only when a trigger waits (a stream is read
    /// all the time and keeps what a trigger claims); `false` at shutdown.
    fn wait_for_trigger(&self) -> bool {
        while !self.triggers.waiting() {
            crossbeam_channel::select! {
                recv(self.triggers.bell()) -> _ => {}
                recv(self.stop) -> _ => return false,
            }
        }
        // Idle until now by design: the stall watchdog counts from the trigger on.
        self.stats.touch();
        true
    }

    /// While the camera is disabled: status `disabled`, wait to be enabled; `false` at
    /// shutdown.
    fn wait_while_disabled(&self) -> bool {
        if self.controls.enabled() {
            return true;
        }
        self.set_status(CameraStatus::Disabled);
        tracing::info!(camera = %self.config.id, "Camera disabled.");
        while !self.controls.enabled() {
            if !pause(&self.stop, DISABLED_POLL) {
                return false;
            }
        }
        tracing::info!(camera = %self.config.id, "Camera enabled.");
        true
    }

    /// The capture loop: open, read, reopen with backoff, until shutdown.
    pub fn run(self) {
        let id = self.config.id.clone();
        // Fault drill (docs/deploy.md): this camera's capture thread dies at start.
        let fault = std::env::var("EDGE_INSPECT_FAULT").unwrap_or_default();
        assert!(fault != format!("capture-panic:{id}"), "injected fault: EDGE_INSPECT_FAULT={fault}");
        if !self.controls.enabled() && !self.enable_at_run_time {
            self.set_status(CameraStatus::Disabled);
            return;
        }
        self.triggers.configure(self.config.trigger);
        let triggered = self.config.trigger != TriggerMode::Free;
        let pacing = match &self.config.source {
            SourceConfig::Replay { .. } if triggered => None,
            SourceConfig::Replay { fps, .. } => Some(Duration::from_secs_f64(1.0 / fps)),
            #[cfg(feature = "camera")]
            SourceConfig::Camera(_) => None,
            #[cfg(feature = "gstreamer")]
            SourceConfig::Gstreamer(_) => None,
            #[cfg(feature = "genicam")]
            SourceConfig::Genicam(_) => None,
        };
        let repeat = matches!(self.config.source, SourceConfig::Replay { repeat: true, .. });
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut first_open = true;
        // Kept across reopens, so a looping replay keeps its pace at the wrap-around.
        let mut next_due = Instant::now();
        'reopen: loop {
            if !self.wait_while_disabled() {
                break;
            }
            if !first_open {
                self.stats.reopens.fetch_add(1, Relaxed);
                let delay = backoff.next_delay();
                tracing::info!(camera = %id, delay_ms = delay.as_millis() as u64, "Reopening source after backoff.");
                if !pause(&self.stop, delay) {
                    break;
                }
            }
            first_open = false;
            self.reopen.store(false, Relaxed);
            let mut source = match open_source(&self.config, self.input.channels, &self.stop) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(camera = %id, error = %e, "Cannot open source.");
                    self.set_status(CameraStatus::Offline);
                    continue 'reopen;
                }
            };
            self.stats.touch();
            let mut corrupt_run = 0u32;
            loop {
                // Disabled: the source is released (a camera device is free again) until
                // the operator enables the camera; then it reopens without backoff.
                if !self.controls.enabled() {
                    first_open = true;
                    continue 'reopen;
                }
                if let Some(interval) = pacing {
                    let wait = next_due.saturating_duration_since(Instant::now());
                    if !pause(&self.stop, wait) {
                        break 'reopen;
                    }
                    // A late frame does not make the next ones come in a burst.
                    let floor = Instant::now().checked_sub(interval).unwrap_or(next_due);
                    next_due = next_due.max(floor) + interval;
                } else if !pause(&self.stop, Duration::ZERO) {
                    break 'reopen;
                }
                if triggered && self.config.source.on_demand() {
                    if !self.wait_for_trigger() {
                        break 'reopen;
                    }
                    if let Err(e) = source.fire() {
                        tracing::warn!(camera = %id, error = %e, "Source failed.");
                        self.set_status(CameraStatus::Offline);
                        continue 'reopen;
                    }
                }
                let result = source.next_frame();
                // Frames a source dropped were captured, so they count as frames in.
                let dropped = source.take_dropped();
                self.stats.frames_in.fetch_add(dropped, Relaxed);
                self.stats.drop_frames(DropReason::SourceQueue, dropped);
                if self.reopen.load(Relaxed) {
                    tracing::warn!(camera = %id, "Source stalled; reopening.");
                    continue 'reopen;
                }
                match result {
                    Ok(image) => {
                        corrupt_run = 0;
                        backoff.reset();
                        self.stats.touch();
                        self.set_status(CameraStatus::Online);
                        let Some(taken) = self.take(source.stamp()) else { continue };
                        self.stats.frames_in.fetch_add(1, Relaxed);
                        let file = source_file(&*source);
                        if let Some(frame) = self.prepare(image, taken, file) {
                            self.enqueue(frame);
                        }
                    }
                    Err(
                        e @ (CaptureError::Corrupt { .. }
                        | CaptureError::Decode { .. }
                        | CaptureError::TooLarge { .. }
                        | CaptureError::Incomplete { .. }),
                    ) => {
                        self.stats.frames_in.fetch_add(1, Relaxed);
                        self.stats.drop_frame(match e {
                            CaptureError::TooLarge { .. } => DropReason::TooLarge,
                            CaptureError::Incomplete { .. } => DropReason::Incomplete,
                            _ => DropReason::DecodeError,
                        });
                        self.stats.touch();
                        if let Some(suppressed) = self.stats.warnings.admit() {
                            tracing::warn!(camera = %id, error = %e, suppressed, "Corrupt frame skipped.");
                        }
                        corrupt_run += 1;
                        if corrupt_run >= CORRUPT_REOPEN {
                            self.set_status(CameraStatus::Offline);
                            continue 'reopen;
                        }
                    }
                    Err(CaptureError::Stopped { .. }) => break 'reopen,
                    Err(CaptureError::Ended { .. }) if repeat => {
                        first_open = true; // looping is not a failure: no backoff
                        // The tick that found the end delivered no frame: it gives its slot
                        // back, or every wrap-around costs one (a one-file loop ran at half
                        // its fps, and the daemon looked slower than `bench`).
                        if let Some(interval) = pacing {
                            next_due = next_due.checked_sub(interval).unwrap_or(next_due);
                        }
                        continue 'reopen;
                    }
                    Err(CaptureError::Ended { .. }) => {
                        tracing::info!(camera = %id, last_seq = self.stats.last_seq.load(Relaxed), "Replay finished.");
                        self.set_status(CameraStatus::Offline);
                        break 'reopen;
                    }
                    Err(e) => {
                        tracing::warn!(camera = %id, error = %e, "Source failed.");
                        self.set_status(CameraStatus::Offline);
                        continue 'reopen;
                    }
                }
            }
        }
        tracing::debug!(camera = %id, "Capture thread stopped.");
    }
}

/// A frame's number, capture times and part, given when the source delivered it.
struct Taken {
    seq: u64,
    captured: SystemTime,
    captured_at: Instant,
    part: Option<Part>,
    stamp: CameraStamp,
}

/// The replayed file a frame came from (replay sources only).
fn source_file(source: &dyn FrameSource) -> Option<String> {
    source.current_file().map(|p| p.display().to_string())
}
