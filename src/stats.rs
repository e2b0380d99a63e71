//! Counters and histograms shared by the pipeline's threads, and the `stats` payload built
//! from them (the Prometheus endpoint reads the same figures).
//!
//! Every drop has a reason and a per-camera counter; gauges (queue depth, status) are read
//! when the payload is built. Counters are relaxed atomics: they are figures for people
//! and dashboards, not synchronisation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;

/// A stage's last sign of life: the stage beats at every turn of its loop (and within
/// long work, e.g. every UNet batch of tiles); the supervisor compares the time since with
/// the stage's bound.
#[derive(Debug, Clone)]
pub struct Progress(Arc<Mutex<Instant>>);

impl Progress {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }

    pub fn beat(&self) {
        *self.0.lock().expect("progress lock") = Instant::now();
    }

    /// Time since the last beat.
    pub fn since(&self) -> Duration {
        self.0.lock().expect("progress lock").elapsed()
    }

    /// How long the stage has gone without progress, if that is longer than `bound` (the
    /// stage is stuck: the supervisor stops the daemon, `/healthz` says not ready).
    pub fn stuck_past(&self, bound: Duration) -> Option<Duration> {
        Some(self.since()).filter(|since| *since > bound)
    }

    /// The next item of `input`, beating at least every [`Progress::TURN`] while waiting for
    /// it (an idle stage is alive); `None` once `input` is closed and empty.
    pub fn recv<T>(&self, input: &Receiver<T>) -> Option<T> {
        loop {
            self.beat();
            match input.recv_timeout(Self::TURN) {
                Ok(item) => return Some(item),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// The longest an idle stage waits between beats.
    pub const TURN: Duration = Duration::from_millis(500);
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a frame did not make it through the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The camera's queue was full; the oldest queued frame gave way to the newest.
    QueueFull,
    /// The source delivered frames faster than its capture thread took them; the oldest
    /// gave way inside the source (a GStreamer appsink's queue).
    SourceQueue,
    /// The frame could not be decoded.
    DecodeError,
    /// The camera delivered the frame incomplete (lost GVSP packets, a timeout, a size
    /// mismatch).
    Incomplete,
    /// The frame had more pixels than the camera's `max_frame_pixels`; it was not decoded.
    TooLarge,
    /// The region of interest lies outside the frame.
    RoiOutside,
    /// The camera's inspection mask is not the size of the frame (after the ROI).
    MaskSize,
    /// The publisher was behind; the inspected frame was not published.
    OutputFull,
    /// The frame's alert, mask or event could neither be kept in the outbox nor handed to
    /// the broker (a failing disk while the broker is away, or a message over the broker's
    /// packet limit).
    AlertLost,
    /// The recorder was behind; the frame was not recorded.
    RecorderFull,
    /// Still queued when the shutdown deadline passed.
    Shutdown,
    /// Inference failed for the batch.
    InferenceError,
}

impl DropReason {
    /// The name in `stats` payloads and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::SourceQueue => "source_queue",
            Self::DecodeError => "decode_error",
            Self::Incomplete => "incomplete",
            Self::TooLarge => "too_large",
            Self::RoiOutside => "roi_outside",
            Self::MaskSize => "mask_size",
            Self::OutputFull => "output_full",
            Self::AlertLost => "alert_lost",
            Self::RecorderFull => "recorder_full",
            Self::Shutdown => "shutdown",
            Self::InferenceError => "inference_error",
        }
    }

    pub const ALL: [DropReason; 12] = [
        Self::QueueFull,
        Self::SourceQueue,
        Self::DecodeError,
        Self::Incomplete,
        Self::TooLarge,
        Self::RoiOutside,
        Self::MaskSize,
        Self::OutputFull,
        Self::AlertLost,
        Self::RecorderFull,
        Self::Shutdown,
        Self::InferenceError,
    ];
}

/// A camera's availability as published on `<camera>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraStatus {
    Online,
    Offline,
    Disabled,
}

impl CameraStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Offline => "offline",
            Self::Disabled => "disabled",
        }
    }
}

pub struct CameraStats {
    pub id: String,
    pub frames_in: AtomicU64,
    pub processed: AtomicU64,
    pub anomalies: AtomicU64,
    pub reopens: AtomicU64,
    pub stalls: AtomicU64,
    /// The sequence number of the camera's latest frame: a capture thread restarted for a
    /// changed config goes on from it.
    pub last_seq: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
    pub status: Mutex<CameraStatus>,
    /// When the capture thread last got a frame (or opened the source).
    pub last_progress: Mutex<Instant>,
    /// Per-frame warnings of this camera (corrupt frames, ROI outside the frame).
    pub warnings: LogThrottle,
    /// Seconds from capture to the verdict's publication (Prometheus only).
    pub latency: Histogram,
    /// Normalised scores (1 = the image threshold): a drift shows here first.
    pub scores: Histogram,
    /// Seconds from a trigger to its verdict's publication (triggered cameras).
    pub trigger_latency: Histogram,
    /// Verdicts of triggered cameras: pass, fail, missed.
    pub verdicts: [AtomicU64; 3],
}

/// At most one log line per `every` for a problem that repeats with every frame; the
/// occurrences in between are counted and reported with the next line (the drop counters
/// in `stats` have them all). Hand-written: `tracing` has no rate limiting of its own.
pub struct LogThrottle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub fn new(every: Duration) -> Self {
        Self { every, state: Mutex::new((None, 0)) }
    }

    /// `Some(suppressed)` when a line may be logged now, with the number of occurrences
    /// not logged since the last one; `None` while inside the interval.
    pub fn admit(&self) -> Option<u64> {
        let mut state = self.state.lock().expect("throttle lock");
        let due = state.0.is_none_or(|last| last.elapsed() >= self.every);
        if due {
            let suppressed = std::mem::take(&mut state.1);
            state.0 = Some(Instant::now());
            Some(suppressed)
        } else {
            state.1 += 1;
            None
        }
    }
}

impl CameraStats {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.into(),
            frames_in: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            anomalies: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            drops: Default::default(),
            status: Mutex::new(CameraStatus::Offline),
            last_progress: Mutex::new(Instant::now()),
            warnings: LogThrottle::new(Duration::from_secs(10)),
            latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            scores: Histogram::new((1..=20).map(|tenths| f64::from(tenths) / 10.0)),
            trigger_latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            verdicts: Default::default(),
        }
    }

    pub fn drop_frame(&self, reason: DropReason) {
        self.drop_frames(reason, 1);
    }

    pub fn drop_frames(&self, reason: DropReason, count: u64) {
        self.drops[reason as usize].fetch_add(count, Relaxed);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Relaxed)
    }

    pub fn touch(&self) {
        *self.last_progress.lock().expect("stats lock") = Instant::now();
    }

    pub fn since_progress(&self) -> Duration {
        self.last_progress.lock().expect("stats lock").elapsed()
    }

    pub fn status(&self) -> CameraStatus {
        *self.status.lock().expect("stats lock")
    }
}

/// Pipeline-wide figures.
pub struct PipelineStats {
    pub batches: AtomicU64,
    pub batched_frames: AtomicU64,
    /// Seconds per inference batch, and frames per batch (Prometheus only).
    pub inference_seconds: Histogram,
    pub batch_frames: Histogram,
    /// Tiles inspected, and of those the cascade's screen declared clean (not reconstructed).
    pub tiles: AtomicU64,
    pub tiles_screened: AtomicU64,
    /// Total inference time in microseconds.
    pub inference_us: AtomicU64,
    pub last_inference_us: AtomicU64,
    pub mqtt_connects: AtomicU64,
    pub mqtt_connected: std::sync::atomic::AtomicBool,
    pub recorded_flagged: AtomicU64,
    pub recorded_normal: AtomicU64,
    pub recorder_pruned: AtomicU64,
    pub recorder_errors: AtomicU64,
    /// Frames not recorded because free space was under the recorder's floor.
    pub recorder_low_disk: AtomicU64,
    /// The last durable message could not be written to the outbox (cleared by the next
    /// that could): `/healthz` says degraded.
    pub outbox_failing: std::sync::atomic::AtomicBool,
    /// Messages waiting in the outbox for the broker.
    pub outbox_queued: AtomicU64,
    /// Outbox entries given up (cap, age, unreadable).
    pub outbox_dropped: AtomicU64,
    /// Connection attempts that failed.
    pub mqtt_failures: AtomicU64,
    /// Connections dropped because the broker stopped answering (no PINGRESP, or a publish
    /// unacknowledged past the keep-alive).
    pub mqtt_unresponsive: AtomicU64,
    /// Durable messages that could not be written to the outbox (a full or failing disk).
    pub outbox_write_failures: AtomicU64,
}

impl Default for PipelineStats {
    fn default() -> Self {
        Self {
            batches: AtomicU64::default(),
            batched_frames: AtomicU64::default(),
            inference_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            batch_frames: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            tiles: AtomicU64::default(),
            tiles_screened: AtomicU64::default(),
            inference_us: AtomicU64::default(),
            last_inference_us: AtomicU64::default(),
            mqtt_connects: AtomicU64::default(),
            mqtt_connected: std::sync::atomic::AtomicBool::default(),
            recorded_flagged: AtomicU64::default(),
            recorded_normal: AtomicU64::default(),
            recorder_pruned: AtomicU64::default(),
            recorder_errors: AtomicU64::default(),
            recorder_low_disk: AtomicU64::default(),
            outbox_failing: std::sync::atomic::AtomicBool::default(),
            outbox_queued: AtomicU64::default(),
            outbox_dropped: AtomicU64::default(),
            mqtt_failures: AtomicU64::default(),
            mqtt_unresponsive: AtomicU64::default(),
            outbox_write_failures: AtomicU64::default(),
        }
    }
}

/// Version of the `stats` payload.
pub const STATS_SCHEMA: u32 = 1;

#[derive(Debug, Serialize)]
pub struct CameraReport {
    pub status: CameraStatus,
    pub fps_in: f64,
    pub fps_processed: f64,
    pub frames_in: u64,
    pub processed: u64,
    pub anomalies: u64,
    pub drops: BTreeMap<DropReason, u64>,
    pub queue_depth: usize,
    pub reopens: u64,
    pub stalls: u64,
}

#[derive(Debug, Serialize)]
pub struct ModelReport {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Debug, Serialize)]
pub struct InferenceReport {
    pub provider: String,
    pub fell_back_to_cpu: bool,
    pub batches: u64,
    pub mean_batch_fill: f64,
    pub max_batch: usize,
    /// Tiles per UNet call (`runtime.tile_batch`, probed for the device when `"auto"`).
    pub tile_batch: usize,
    /// Tiles inspected, and of those the cascade's screen declared clean.
    pub tiles: u64,
    pub tiles_screened: u64,
    pub mean_ms: f64,
    pub last_ms: f64,
    pub unet_calls_per_frame: usize,
}

#[derive(Debug, Serialize)]
pub struct StatsReport {
    pub schema: u32,
    pub node: String,
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    pub uptime_s: f64,
    pub model: ModelReport,
    pub inference: InferenceReport,
    pub cameras: BTreeMap<String, CameraReport>,
    pub mqtt_connects: u64,
    pub mqtt_connected: bool,
    pub mqtt_failures: u64,
    pub mqtt_unresponsive: u64,
    pub outbox_queued: u64,
    pub outbox_dropped: u64,
    pub outbox_write_failures: u64,
    pub recorded_flagged: u64,
    pub recorded_normal: u64,
    pub recorder_pruned: u64,
    pub recorder_errors: u64,
    pub recorder_low_disk: u64,
}

impl StatsReport {
    /// The report at this moment: the node's identity and model, the inference figures,
    /// the cameras' reports, and the pipeline's MQTT, outbox and recorder counters.
    pub fn now(
        node: String,
        uptime: Duration,
        model: ModelReport,
        inference: InferenceReport,
        cameras: BTreeMap<String, CameraReport>,
        p: &PipelineStats,
    ) -> Self {
        Self {
            schema: STATS_SCHEMA,
            node,
            timestamp: crate::timestamp::now(),
            uptime_s: uptime.as_secs_f64(),
            model,
            inference,
            cameras,
            mqtt_connects: p.mqtt_connects.load(Relaxed),
            mqtt_connected: p.mqtt_connected.load(Relaxed),
            mqtt_failures: p.mqtt_failures.load(Relaxed),
            mqtt_unresponsive: p.mqtt_unresponsive.load(Relaxed),
            outbox_queued: p.outbox_queued.load(Relaxed),
            outbox_dropped: p.outbox_dropped.load(Relaxed),
            outbox_write_failures: p.outbox_write_failures.load(Relaxed),
            recorded_flagged: p.recorded_flagged.load(Relaxed),
            recorded_normal: p.recorded_normal.load(Relaxed),
            recorder_pruned: p.recorder_pruned.load(Relaxed),
            recorder_errors: p.recorder_errors.load(Relaxed),
            recorder_low_disk: p.recorder_low_disk.load(Relaxed),
        }
    }
}

/// Remembers the previous counts to turn totals into rates.
#[derive(Default)]
pub struct RateTracker {
    previous: BTreeMap<String, (u64, u64, Option<Instant>)>,
}

impl RateTracker {
    /// `(fps in, fps processed)` since the last call for this camera.
    pub fn rates(&mut self, camera: &CameraStats) -> (f64, f64) {
        let now = Instant::now();
        let (frames_in, processed) = (camera.frames_in.load(Relaxed), camera.processed.load(Relaxed));
        let entry = self.previous.entry(camera.id.clone()).or_insert((0, 0, None));
        let rates = match entry.2 {
            Some(at) => {
                let dt = now.duration_since(at).as_secs_f64().max(1e-3);
                ((frames_in - entry.0) as f64 / dt, (processed - entry.1) as f64 / dt)
            }
            None => (0.0, 0.0),
        };
        *entry = (frames_in, processed, Some(now));
        rates
    }
}

pub fn camera_report(camera: &CameraStats, queue_depth: usize, rates: (f64, f64)) -> CameraReport {
    CameraReport {
        status: camera.status(),
        fps_in: rates.0,
        fps_processed: rates.1,
        frames_in: camera.frames_in.load(Relaxed),
        processed: camera.processed.load(Relaxed),
        anomalies: camera.anomalies.load(Relaxed),
        drops: DropReason::ALL.iter().map(|r| (*r, camera.drops(*r))).filter(|(_, n)| *n > 0).collect(),
        queue_depth,
        reopens: camera.reopens.load(Relaxed),
        stalls: camera.stalls.load(Relaxed),
    }
}

/// How the node's model runs: frames per batch, tiles per UNet call, UNet calls per tile.
pub struct InferenceShape {
    pub max_batch: usize,
    pub tile_batch: usize,
    pub unet_calls: usize,
}

pub fn inference_report(
    p: &PipelineStats,
    provider: String,
    fell_back: bool,
    shape: InferenceShape,
) -> InferenceReport {
    let batches = p.batches.load(Relaxed);
    InferenceReport {
        provider,
        fell_back_to_cpu: fell_back,
        batches,
        mean_batch_fill: if batches == 0 { 0.0 } else { p.batched_frames.load(Relaxed) as f64 / batches as f64 },
        max_batch: shape.max_batch,
        tile_batch: shape.tile_batch,
        tiles: p.tiles.load(Relaxed),
        tiles_screened: p.tiles_screened.load(Relaxed),
        mean_ms: if batches == 0 { 0.0 } else { p.inference_us.load(Relaxed) as f64 / 1e3 / batches as f64 },
        last_ms: p.last_inference_us.load(Relaxed) as f64 / 1e3,
        unet_calls_per_frame: shape.unet_calls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_admits_one_line_per_interval_and_counts_the_rest() {
        let throttle = LogThrottle::new(Duration::from_millis(50));
        assert_eq!(throttle.admit(), Some(0));
        assert_eq!((throttle.admit(), throttle.admit()), (None, None));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.admit(), Some(2), "two lines were held back");
    }
}
