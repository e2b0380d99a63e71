//! The frame path: capture threads → per-camera queues → batcher → inference worker.
//!
//! Capture never blocks: each camera's queue is bounded and the newest frame wins (the
//! oldest queued frame is dropped and counted, as Frigate does). The batcher follows
//! DeepStream's nvstreammux: a batch closes when it has `max_batch` frames or when
//! `max_wait` has passed since its *first* frame. Shutdown flows down the pipe: capture
//! threads stop and drop their senders, the batcher flushes and ends, the worker finishes
//! what it can before the drain deadline and counts the rest as `shutdown` drops.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender, TrySendError};
use image::{DynamicImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{CameraConfig, PipelineConfig, SourceConfig};
use super::stats::{CameraStats, CameraStatus, DropReason, PipelineStats};
use crate::capture::{CaptureError, FrameSource};
use crate::infer::inspect::{FrameView, Inspector};
use crate::model::preprocess::{InputSpec, Inspection};
use crate::postprocess::anomaly::Analysis;

/// A captured frame on its way through the pipeline.
pub struct Frame {
    /// Index of the camera in the config.
    pub camera: usize,
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
}

/// A frame and the model's verdict on it.
pub struct Inspected {
    pub frame: Frame,
    pub analysis: Analysis,
}

/// Sleeps `duration` unless shutdown (the sender side of `stop` dropped) comes first;
/// returns whether to keep going.
pub fn pause(stop: &Receiver<()>, duration: Duration) -> bool {
    matches!(stop.recv_timeout(duration), Err(RecvTimeoutError::Timeout))
}

/// Exponential backoff with ±25 % jitter, reset after a success.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    jitter: ChaCha8Rng,
}

/// A generator seeded from the clock: jitter must differ between nodes, not be secret.
pub fn clock_seeded_rng() -> ChaCha8Rng {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    ChaCha8Rng::seed_from_u64(nanos as u64 ^ u64::from(std::process::id()))
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, current: initial, jitter: clock_seeded_rng() }
    }

    /// The next wait: the current delay with jitter; the delay then doubles up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let jitter = self.jitter.random_range(0.75..1.25);
        let delay = self.current.mul_f64(jitter);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// Everything a capture thread needs.
pub struct CaptureContext {
    pub index: usize,
    pub config: CameraConfig,
    pub input: InputSpec,
    /// Whole-frame resize or tiles at the model's scale (from the manifest).
    pub inspection: Inspection,
    pub stats: Arc<CameraStats>,
    pub queue_tx: Sender<Frame>,
    /// A clone of the queue's receiver, to drop the oldest frame when full.
    pub queue_rx: Receiver<Frame>,
    pub stop: Receiver<()>,
    /// Set by the watchdog when the camera stalled; the thread reopens the source.
    pub reopen: Arc<std::sync::atomic::AtomicBool>,
    /// Told about status changes (published on `<camera>/status`).
    pub status_tx: Sender<(usize, CameraStatus)>,
}

/// Consecutive corrupt frames after which a source is reopened.
const CORRUPT_REOPEN: u32 = 10;

/// Opened inside the capture thread: camera handles are not `Send`.
fn open_source(config: &CameraConfig) -> Result<Box<dyn FrameSource>, CaptureError> {
    match &config.source {
        SourceConfig::Replay { path, .. } => {
            Ok(Box::new(crate::capture::replay::ReplaySource::open(&config.id, path)?))
        }
        #[cfg(feature = "camera")]
        SourceConfig::Camera(settings) => {
            Ok(Box::new(crate::capture::camera::CameraSource::open(&config.id, settings)?))
        }
    }
}

impl CaptureContext {
    fn set_status(&self, status: CameraStatus) {
        let mut current = self.stats.status.lock().expect("stats lock");
        if *current != status {
            *current = status;
            let _ = self.status_tx.try_send((self.index, status));
        }
    }

    /// Offers a frame to the camera's queue; when full, the oldest queued frame is dropped.
    fn enqueue(&self, mut frame: Frame) {
        loop {
            match self.queue_tx.try_send(frame) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) => {
                    if self.queue_rx.try_recv().is_ok() {
                        self.stats.drop_frame(DropReason::QueueFull);
                    }
                    frame = back;
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }

    fn prepare(&self, image: DynamicImage, seq: u64, source_file: Option<String>) -> Option<Frame> {
        let captured = SystemTime::now();
        let captured_at = Instant::now();
        let origin = self.config.roi.map_or([0, 0], |[x, y, _, _]| [x, y]);
        let original = match self.config.roi {
            None => image,
            Some([x, y, w, h]) => {
                if x + w > image.width() || y + h > image.height() {
                    self.stats.drop_frame(DropReason::RoiOutside);
                    if let Some(suppressed) = self.stats.warnings.admit() {
                        tracing::warn!(camera = %self.config.id, roi = ?self.config.roi, width = image.width(), height = image.height(), suppressed, "Region of interest lies outside the frame; frame dropped.");
                    }
                    return None;
                }
                image.crop_imm(x, y, w, h)
            }
        };
        let prepared = self.input.prepare_for(self.inspection, &original);
        Some(Frame {
            camera: self.index,
            seq,
            captured,
            captured_at,
            source_file,
            tensor: prepared.tensor,
            display: prepared.display,
            original,
            origin,
        })
    }

    /// The capture loop: open, read, reopen with backoff, until shutdown.
    pub fn run(self) {
        let id = self.config.id.clone();
        // Fault drill (docs/deploy.md): this camera's capture thread dies at start.
        let fault = std::env::var("EDGE_INSPECT_FAULT").unwrap_or_default();
        assert!(fault != format!("capture-panic:{id}"), "injected fault: EDGE_INSPECT_FAULT={fault}");
        if !self.config.enabled {
            self.set_status(CameraStatus::Disabled);
            return;
        }
        let pacing = match &self.config.source {
            SourceConfig::Replay { fps, .. } => Some(Duration::from_secs_f64(1.0 / fps)),
            #[cfg(feature = "camera")]
            SourceConfig::Camera(_) => None,
        };
        let repeat = matches!(self.config.source, SourceConfig::Replay { repeat: true, .. });
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut seq = 0u64;
        let mut first_open = true;
        // Kept across reopens, so a looping replay keeps its pace at the wrap-around.
        let mut next_due = Instant::now();
        'reopen: loop {
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
            let mut source = match open_source(&self.config) {
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
                let result = source.next_frame();
                if self.reopen.load(Relaxed) {
                    tracing::warn!(camera = %id, "Source stalled; reopening.");
                    continue 'reopen;
                }
                match result {
                    Ok(image) => {
                        corrupt_run = 0;
                        backoff.reset();
                        self.stats.touch();
                        self.stats.frames_in.fetch_add(1, Relaxed);
                        self.set_status(CameraStatus::Online);
                        seq += 1;
                        let file = source_file(&*source);
                        if let Some(frame) = self.prepare(image, seq, file) {
                            self.enqueue(frame);
                        }
                    }
                    Err(e @ (CaptureError::Corrupt { .. } | CaptureError::Decode { .. })) => {
                        self.stats.frames_in.fetch_add(1, Relaxed);
                        self.stats.drop_frame(DropReason::DecodeError);
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
                    Err(CaptureError::Ended { .. }) if repeat => {
                        first_open = true; // looping is not a failure: no backoff
                        continue 'reopen;
                    }
                    Err(CaptureError::Ended { .. }) => {
                        tracing::info!(camera = %id, frames = seq, "Replay finished.");
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

/// The replayed file a frame came from (replay sources only).
fn source_file(source: &dyn FrameSource) -> Option<String> {
    source.current_file().map(|p| p.display().to_string())
}

/// Collects frames from all cameras into batches. Ends when every capture thread is gone,
/// or at shutdown (`stop` closed) after batching what is still queued — a capture thread
/// stuck in a blocking read cannot hold the drain up.
pub fn batcher(queues: Vec<Receiver<Frame>>, config: PipelineConfig, batches: Sender<Vec<Frame>>, stop: Receiver<()>) {
    let mut open: Vec<bool> = vec![true; queues.len()];
    let mut next_camera = 0usize;
    loop {
        // Wait for the first frame of a batch from any camera still open.
        let mut select = Select::new();
        let live: Vec<usize> = (0..queues.len()).filter(|i| open[*i]).collect();
        if live.is_empty() {
            break;
        }
        for &i in &live {
            select.recv(&queues[i]);
        }
        let stop_index = select.recv(&stop);
        let ready = select.select();
        let index = ready.index();
        let received = if index == stop_index {
            let _ = ready.recv(&stop);
            None
        } else {
            Some((live[index], ready.recv(&queues[live[index]])))
        };
        // Checked directly: `select` picks at random among ready operations.
        if matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Disconnected)) {
            let first = received.and_then(|(_, r)| r.ok());
            let mut rest: Vec<Frame> = first.into_iter().chain(queues.iter().flat_map(|q| q.try_iter())).collect();
            while !rest.is_empty() {
                let tail = rest.split_off(rest.len().min(config.max_batch));
                if batches.send(std::mem::replace(&mut rest, tail)).is_err() {
                    break;
                }
            }
            break;
        }
        let Some((camera, result)) = received else { continue };
        let first = match result {
            Ok(f) => f,
            Err(_) => {
                open[camera] = false;
                continue;
            }
        };
        let deadline = Instant::now() + config.max_wait;
        let mut batch = vec![first];
        // Fill round-robin from whatever is queued, then wait out the deadline.
        while batch.len() < config.max_batch {
            let mut took = false;
            for k in 0..queues.len() {
                let i = (next_camera + k) % queues.len();
                if batch.len() < config.max_batch
                    && let Ok(f) = queues[i].try_recv()
                {
                    batch.push(f);
                    took = true;
                }
            }
            next_camera = (next_camera + 1) % queues.len().max(1);
            if took {
                continue;
            }
            let mut select = Select::new();
            let live: Vec<usize> = (0..queues.len()).filter(|i| open[*i]).collect();
            for &i in &live {
                select.recv(&queues[i]);
            }
            match select.select_deadline(deadline) {
                Ok(op) => {
                    let camera = live[op.index()];
                    match op.recv(&queues[camera]) {
                        Ok(f) => batch.push(f),
                        Err(_) => open[camera] = false,
                    }
                }
                Err(_) => break,
            }
        }
        if batches.send(batch).is_err() {
            break;
        }
    }
}

/// Everything the inference worker needs.
pub struct WorkerContext {
    pub inspector: Inspector,
    pub seed: u64,
    pub batches: Receiver<Vec<Frame>>,
    pub output: Sender<Inspected>,
    pub cameras: Vec<Arc<CameraStats>>,
    pub pipeline: Arc<PipelineStats>,
    /// Set at shutdown: batches still arriving after it are dropped.
    pub drain_deadline: Arc<Mutex<Option<Instant>>>,
    /// Updated on every loop turn, busy or idle: the systemd watchdog's evidence of life.
    pub heartbeat: Arc<Mutex<Instant>>,
}

/// The inference loop; ends when the batcher is gone.
pub fn inference_worker(mut ctx: WorkerContext) {
    let failures = super::stats::LogThrottle::new(Duration::from_secs(10));
    loop {
        *ctx.heartbeat.lock().expect("heartbeat lock") = Instant::now();
        let batch = match ctx.batches.recv_timeout(Duration::from_millis(500)) {
            Ok(b) => b,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let past_deadline = ctx.drain_deadline.lock().expect("deadline lock").is_some_and(|d| Instant::now() > d);
        if past_deadline {
            for f in &batch {
                ctx.cameras[f.camera].drop_frame(DropReason::Shutdown);
            }
            continue;
        }
        let frames: Vec<FrameView<'_>> = batch
            .iter()
            .map(|f| FrameView { tensor: &f.tensor, size: [f.display.height() as usize, f.display.width() as usize] })
            .collect();
        // Per-frame seeds from camera and sequence: reproducible for a replay.
        let seeds: Vec<u64> =
            batch.iter().map(|f| ctx.seed.wrapping_add((f.camera as u64) << 40).wrapping_add(f.seq)).collect();
        let started = Instant::now();
        let result = ctx.inspector.inspect(&frames, &seeds);
        drop(frames);
        let elapsed = started.elapsed().as_micros() as u64;
        ctx.pipeline.batches.fetch_add(1, Relaxed);
        ctx.pipeline.batched_frames.fetch_add(batch.len() as u64, Relaxed);
        ctx.pipeline.inference_us.fetch_add(elapsed, Relaxed);
        ctx.pipeline.last_inference_us.store(elapsed, Relaxed);
        match result {
            Ok(analyses) => {
                for (frame, analysis) in batch.into_iter().zip(analyses) {
                    let camera = &ctx.cameras[frame.camera];
                    camera.processed.fetch_add(1, Relaxed);
                    match ctx.output.try_send(Inspected { frame, analysis }) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => camera.drop_frame(DropReason::OutputFull),
                        // The publisher is gone: stop too, so the supervisor sees the
                        // pipeline end instead of a worker that inspects for nobody.
                        Err(TrySendError::Disconnected(_)) => {
                            tracing::error!("The publisher has stopped; the inference worker stops.");
                            return;
                        }
                    }
                }
            }
            Err(e) => {
                if let Some(suppressed) = failures.admit() {
                    tracing::error!(error = %e, frames = batch.len(), suppressed, "Inference failed; batch dropped.");
                }
                for f in &batch {
                    ctx.cameras[f.camera].drop_frame(DropReason::InferenceError);
                }
            }
        }
    }
    tracing::debug!("Inference worker stopped.");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(camera: usize, seq: u64) -> Frame {
        Frame {
            camera,
            seq,
            captured: SystemTime::now(),
            captured_at: Instant::now(),
            source_file: None,
            tensor: Vec::new(),
            display: RgbImage::new(1, 1),
            original: DynamicImage::new_luma8(1, 1),
            origin: [0, 0],
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<u128> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        for (w, nominal) in waits.iter().zip([100u128, 200, 350, 350, 350]) {
            assert!(*w >= nominal * 3 / 4 && *w <= nominal * 5 / 4, "{waits:?}");
        }
        b.reset();
        assert!(b.next_delay().as_millis() <= 125);
    }

    #[test]
    fn batcher_closes_on_size_or_on_the_wait_from_the_first_frame() {
        let (a_tx, a_rx) = crossbeam_channel::bounded(4);
        let (b_tx, b_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(4);
        let config = PipelineConfig {
            max_batch: 3,
            max_wait: Duration::from_millis(150),
            queue_capacity: 4,
            output_capacity: 4,
        };
        for seq in 0..2 {
            a_tx.send(frame(0, seq)).unwrap();
        }
        b_tx.send(frame(1, 0)).unwrap();
        b_tx.send(frame(1, 1)).unwrap();
        let (_stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let worker = std::thread::spawn(move || batcher(vec![a_rx, b_rx], config, out_tx, stop_rx));
        // Four frames queued, max 3: a full batch at once, then one frame after the wait.
        let first = out_rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_eq!(first.len(), 3);
        let started = Instant::now();
        let second = out_rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_eq!(second.len(), 1);
        assert!(started.elapsed() >= Duration::from_millis(100), "partial batch waited {:?}", started.elapsed());
        // Both cameras are represented in the full batch (round robin).
        let cameras: std::collections::BTreeSet<usize> = first.iter().map(|f| f.camera).collect();
        assert_eq!(cameras.len(), 2);
        drop((a_tx, b_tx));
        worker.join().unwrap();
        assert!(out_rx.recv().is_err(), "batcher ends when every camera is gone");
    }

    #[test]
    fn batcher_flushes_the_queues_at_shutdown_even_if_a_camera_hangs() {
        let (a_tx, a_rx) = crossbeam_channel::bounded(8);
        let (out_tx, out_rx) = crossbeam_channel::bounded(8);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let config =
            PipelineConfig { max_batch: 2, max_wait: Duration::from_millis(10), queue_capacity: 8, output_capacity: 8 };
        // The camera still holds its sender (a capture thread stuck in a read) ...
        for seq in 0..3 {
            a_tx.send(frame(0, seq)).unwrap();
        }
        drop(stop_tx);
        let worker = std::thread::spawn(move || batcher(vec![a_rx], config, out_tx, stop_rx));
        worker.join().unwrap();
        // ... yet every queued frame came out, in batches of at most 2.
        let sizes: Vec<usize> = out_rx.try_iter().map(|b| b.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 3, "{sizes:?}");
        assert!(sizes.iter().all(|s| *s <= 2));
        drop(a_tx);
    }
}
