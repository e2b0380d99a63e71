//! What the daemon says about each inspected frame: alert, mask and snapshot for anomalous
//! frames, the retained per-camera `state`, and hand-off to the recorder.
//!
//! Payload layouts are versioned by [`PAYLOAD_SCHEMA`] and documented in `docs/mqtt.md`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rumqttc::v5::mqttbytes::QoS;
use serde::Serialize;

use super::client::Mqtt;
use super::events::{Emitted, Observation, Tracker};
use crate::config::{DaemonConfig, EventsConfig};
use crate::daemon::cameras::Cameras;
use crate::frame::{Inspected, ModelRef};
use crate::postprocess::anomaly::Region;
use crate::postprocess::render::{OverlayFormat, mask_png_within, overlay_within};
use crate::stats::{DropReason, Progress};
use crate::timestamp::rfc3339;

/// Version of the alert and state payloads (2: regions in camera pixels, inspected area
/// and mask scale stated; see `docs/mqtt.md`).
pub const PAYLOAD_SCHEMA: u32 = 2;

/// One alert per anomalous frame on `<camera>/anomaly`.
#[derive(Debug, Serialize)]
pub struct Alert<'a> {
    pub schema: u32,
    pub id: String,
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    pub captured_at: String,
    pub seq: u64,
    pub camera: &'a str,
    pub score: f64,
    pub normalised_score: f64,
    pub threshold: f64,
    /// Defect pixels of the mask, in camera pixels.
    pub defect_area_px: usize,
    pub defect_ratio: f64,
    /// Connected defect regions, bounding boxes and areas in camera-frame pixels.
    pub regions: &'a [Region],
    /// The inspected area `[x, y, width, height]` in camera pixels (the ROI, or the frame).
    pub inspected: [u32; 4],
    /// `[width, height]` of the mask PNG; it covers `inspected`.
    pub mask_size: [usize; 2],
    /// Camera pixels per mask pixel `[x, y]` (1 for a native-scale tiled model).
    pub mask_scale: [f64; 2],
    pub model: &'a ModelRef,
    pub latency_ms: f64,
    /// The replayed file, for replay sources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_file: Option<&'a str>,
    /// The part a triggered camera was triggered for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_id: Option<&'a str>,
    /// The camera's own timestamp of the frame (ns of its clock), where it gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub camera_timestamp_ns: Option<u64>,
    pub mask_topic: String,
    pub snapshot_topic: String,
}

/// The retained latest verdict on `<camera>/state`.
#[derive(Debug, Serialize)]
pub struct State<'a> {
    pub schema: u32,
    #[serde(rename = "@timestamp")]
    pub timestamp: String,
    /// When the frame was captured (`@timestamp` is when the verdict was published).
    pub captured_at: String,
    pub seq: u64,
    pub label: &'static str,
    pub score: f64,
    pub normalised_score: f64,
    pub defect_area_px: usize,
    pub model: &'a ModelRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_id: Option<&'a str>,
    /// The camera's own timestamp of the frame (ns of its clock), where it gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub camera_timestamp_ns: Option<u64>,
}

/// From inspection pixels (the analysis) to camera-frame pixels: the ROI's origin plus
/// the scale between the captured ROI and the inspected picture.
struct CameraMapping {
    origin: [u32; 2],
    size: [u32; 2],
    /// Camera pixels per inspection pixel, `[x, y]`.
    scale: [f64; 2],
}

impl CameraMapping {
    fn of(frame: &crate::frame::Frame, analysis: &crate::postprocess::anomaly::Analysis) -> Self {
        Self::new(frame.origin, [frame.original.width(), frame.original.height()], [analysis.width, analysis.height])
    }

    /// `origin` and `size` of the captured area in camera pixels; `inspected` `[w, h]`.
    fn new(origin: [u32; 2], size: [u32; 2], inspected: [usize; 2]) -> Self {
        let scale = [size[0] as f64 / inspected[0] as f64, size[1] as f64 / inspected[1] as f64];
        Self { origin, size, scale }
    }

    fn inspected(&self) -> [u32; 4] {
        [self.origin[0], self.origin[1], self.size[0], self.size[1]]
    }

    fn area(&self, pixels: usize) -> usize {
        (pixels as f64 * self.scale[0] * self.scale[1]).round() as usize
    }

    /// The camera-pixel box covering the region's inspection pixels.
    fn region(&self, r: &Region) -> Region {
        let [x, y, w, h] = r.bbox;
        let (x0, y0) = ((x as f64 * self.scale[0]).floor(), (y as f64 * self.scale[1]).floor());
        let (x1, y1) = (((x + w) as f64 * self.scale[0]).ceil(), ((y + h) as f64 * self.scale[1]).ceil());
        Region {
            bbox: [
                self.origin[0] as usize + x0 as usize,
                self.origin[1] as usize + y0 as usize,
                (x1 - x0) as usize,
                (y1 - y0) as usize,
            ],
            area: self.area(r.area),
            max_score: r.max_score,
        }
    }
}

pub struct PublisherContext {
    pub mqtt: Option<Arc<Mqtt>>,
    /// Names, counters and controls (sensitivity, snapshot requests) of the cameras.
    pub cameras: Cameras,
    pub node: String,
    pub options: PublishOptions,
    /// The recorder's queue.
    pub recorder: Option<Sender<Inspected>>,
    /// What the review page shows (with the HTTP endpoint on).
    pub board: Option<Arc<crate::daemon::web::board::Board>>,
}

/// What a SIGHUP may change in publishing while frames flow; the publisher takes a new
/// value between frames.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishOptions {
    pub publish_images: bool,
    pub snapshot_quality: u8,
    pub image_max_width: u32,
    pub events: EventsConfig,
    /// The fraction of normal frames the recorder keeps.
    pub normal_sample_rate: f64,
}

impl PublishOptions {
    pub fn of(config: &DaemonConfig) -> Self {
        Self {
            publish_images: config.mqtt.publish_images,
            snapshot_quality: config.mqtt.snapshot_quality,
            image_max_width: config.mqtt.image_max_width,
            events: config.events.clone(),
            normal_sample_rate: config.recorder.normal_sample_rate,
        }
    }
}

/// Publishes every inspected frame (and its camera's events); ends when the inference
/// worker is gone, after ending the events still open. New options from `options` apply
/// from the next frame on (event rules: to the episodes still to come and the open ones).
pub fn publisher(
    ctx: PublisherContext,
    input: Receiver<Inspected>,
    options: Receiver<PublishOptions>,
    progress: Progress,
) {
    let trackers = BTreeMap::new();
    let mut publisher = Publisher { sampler: crate::backoff::clock_seeded_rng(), trackers, latest_model: None, ctx };
    // Fault drill (docs/deploy.md): the publisher dies at its first frame.
    let injected_panic = std::env::var("EDGE_INSPECT_FAULT").is_ok_and(|f| f == "publisher-panic");
    loop {
        progress.beat();
        if let Some(new) = options.try_iter().last() {
            publisher.set_options(new);
        }
        match input.recv_timeout(Progress::TURN) {
            Ok(inspected) => {
                assert!(!injected_panic, "injected fault: EDGE_INSPECT_FAULT=publisher-panic");
                publisher.frame(inspected);
            }
            // Idle: an episode whose camera went quiet still ends on time.
            Err(RecvTimeoutError::Timeout) => publisher.expire_events(),
            Err(RecvTimeoutError::Disconnected) => break,
        }
        publisher.expire_triggers();
    }
    publisher.finish_events();
    publisher.abandon_triggers();
    tracing::debug!("Publisher stopped.");
}

struct Publisher {
    ctx: PublisherContext,
    /// Per camera slot, from its first frame on.
    trackers: BTreeMap<usize, Tracker>,
    /// The model of the latest frame: events ended without a frame name it.
    latest_model: Option<Arc<ModelRef>>,
    /// Picks the normal frames the recorder keeps.
    sampler: rand_chacha::ChaCha8Rng,
}

impl Publisher {
    fn set_options(&mut self, options: PublishOptions) {
        tracing::info!(?options, "Publishing options changed.");
        for tracker in self.trackers.values_mut() {
            tracker.set_rules(options.events.open_frames, options.events.close_after);
        }
        self.ctx.options = options;
    }

    /// Alerts (if per-frame alerts are on), the retained state, metrics, events, and the
    /// recorder's share of one inspected frame.
    fn frame(&mut self, inspected: Inspected) {
        self.latest_model = Some(inspected.model.clone());
        let Publisher { ctx, trackers, sampler, .. } = self;
        let index = inspected.frame.camera;
        let camera = ctx.cameras.get(index);
        if camera.controls.take_snapshot_request()
            && let Some(mqtt) = &ctx.mqtt
        {
            // Asked for explicitly: published even when `mqtt.publish_images` is off.
            mqtt.publish(&format!("{}/snapshot", camera.id), QoS::AtMostOnce, true, overlay_jpeg(ctx, &inspected));
        }
        let (a, f) = (&inspected.analysis, &inspected.frame);
        let to_camera = CameraMapping::of(f, a);
        let defect_area = to_camera.area(a.mask.iter().filter(|m| **m != 0).count());
        let regions: Vec<Region> = a.regions.iter().map(|r| to_camera.region(r)).collect();
        let now = SystemTime::now();
        if a.anomalous {
            camera.stats.anomalies.fetch_add(1, Relaxed);
            // Logged once the alert is in the outbox: a crash after this line loses nothing.
            let id = ctx
                .options
                .events
                .frame_alerts
                .then(|| alert(ctx, &inspected, &to_camera, &regions, defect_area, now))
                .flatten();
            tracing::info!(camera = %camera.id, seq = f.seq, alert = id.as_deref(), score = a.normalised_score, regions = a.regions.len(), source = ?f.source_file, "Anomaly.");
        }
        if let Some(mqtt) = &ctx.mqtt {
            let state = State {
                schema: PAYLOAD_SCHEMA,
                timestamp: rfc3339(now),
                captured_at: rfc3339(f.captured),
                seq: f.seq,
                label: if a.anomalous { "anomalous" } else { "normal" },
                score: a.score,
                normalised_score: a.normalised_score,
                defect_area_px: defect_area,
                model: &inspected.model,
                part_id: f.part.as_ref().map(|p| p.id.as_str()),
                camera_timestamp_ns: f.stamp.timestamp_ns,
            };
            let payload = serde_json::to_vec(&state).expect("state serialises");
            mqtt.publish(&format!("{}/state", camera.id), QoS::AtMostOnce, true, payload);
        }
        if let Some(part) = &f.part {
            super::verdict::inspected(ctx, &camera, &inspected, part);
        }
        camera.stats.scores.observe(a.normalised_score);
        camera.stats.latency.observe(f.captured_at.elapsed().as_secs_f64());
        let events = &ctx.options.events;
        if events.enabled {
            let observation = Observation {
                seq: f.seq,
                captured: f.captured,
                captured_at: f.captured_at,
                anomalous: a.anomalous,
                score: a.score,
                normalised_score: a.normalised_score,
                regions,
                part_id: f.part.as_ref().map(|p| p.id.clone()),
                camera_timestamp_ns: f.stamp.timestamp_ns,
            };
            let tracker = trackers
                .entry(index)
                .or_insert_with(|| Tracker::new(&ctx.node, &camera.id, events.open_frames, events.close_after));
            for event in tracker.observe(observation, || snapshot(ctx, &inspected)) {
                publish_event(ctx, &inspected.model, index, event);
            }
        }
        if let Some(board) = &ctx.board {
            board.observe(&camera.id, &inspected);
        }
        if let Some(recorder) = &ctx.recorder {
            let keep = inspected.analysis.anomalous || rand::Rng::random_bool(sampler, ctx.options.normal_sample_rate);
            if keep && recorder.try_send(inspected).is_err() {
                camera.stats.drop_frame(DropReason::RecorderFull);
            }
        }
    }

    /// Ends the episodes of cameras that have gone quiet.
    fn expire_events(&mut self) {
        let now = std::time::Instant::now();
        let Some(model) = &self.latest_model else { return };
        for (index, tracker) in &mut self.trackers {
            if let Some(end) = tracker.expire(now) {
                publish_event(&self.ctx, model, *index, end);
            }
        }
    }

    /// Answers `missed` to the triggers past their deadlines (within a turn of them).
    fn expire_triggers(&self) {
        let now = std::time::Instant::now();
        for (_, camera) in self.ctx.cameras.active() {
            for missed in camera.triggers.expire(now) {
                super::verdict::missed(&self.ctx, &camera, &missed);
            }
        }
    }

    /// Answers `missed` to every trigger still open when the daemon stops.
    fn abandon_triggers(&self) {
        for (_, camera) in self.ctx.cameras.active() {
            for missed in camera.triggers.abandon("the daemon stopped before the part was inspected") {
                super::verdict::missed(&self.ctx, &camera, &missed);
            }
        }
    }

    /// Ends every open episode (shutdown).
    fn finish_events(&mut self) {
        let Some(model) = &self.latest_model else { return };
        for (index, tracker) in &mut self.trackers {
            if let Some(end) = tracker.finish() {
                publish_event(&self.ctx, model, *index, end);
            }
        }
    }
}

/// The per-frame alert, its mask and snapshot; the alert's id once it is kept (or sent).
fn alert(
    ctx: &PublisherContext,
    inspected: &Inspected,
    to_camera: &CameraMapping,
    regions: &[Region],
    defect_area: usize,
    now: SystemTime,
) -> Option<String> {
    let mqtt = ctx.mqtt.as_ref()?;
    let (a, f) = (&inspected.analysis, &inspected.frame);
    let camera = ctx.cameras.get(f.camera);
    let id = format!(
        "{}-{}-{}-{}",
        ctx.node,
        camera.id,
        f.captured.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
        f.seq
    );
    let (mask, mask_size) = mask_png_within(a, ctx.options.image_max_width);
    let [inspected_w, inspected_h] = [to_camera.size[0] as f64, to_camera.size[1] as f64];
    let alert = Alert {
        schema: PAYLOAD_SCHEMA,
        id: id.clone(),
        timestamp: rfc3339(now),
        captured_at: rfc3339(f.captured),
        seq: f.seq,
        camera: &camera.id,
        score: a.score,
        normalised_score: a.normalised_score,
        threshold: a.image_threshold,
        defect_area_px: defect_area,
        defect_ratio: defect_area as f64 / a.mask.len().max(1) as f64,
        regions,
        inspected: to_camera.inspected(),
        mask_size,
        mask_scale: [inspected_w / mask_size[0] as f64, inspected_h / mask_size[1] as f64],
        model: &inspected.model,
        latency_ms: f.captured_at.elapsed().as_secs_f64() * 1e3,
        source_file: f.source_file.as_deref(),
        part_id: f.part.as_ref().map(|p| p.id.as_str()),
        camera_timestamp_ns: f.stamp.timestamp_ns,
        mask_topic: mqtt.topic(&format!("{}/mask", camera.id)),
        snapshot_topic: mqtt.topic(&format!("{}/snapshot", camera.id)),
    };
    let payload = serde_json::to_vec(&alert).expect("alert serialises");
    // Alerts and masks are durable: on disk first, sent, deleted on their PUBACK.
    let mut kept = mqtt.publish_durable(&format!("{}/anomaly", camera.id), payload);
    if ctx.options.publish_images {
        kept &= mqtt.publish_durable(&format!("{}/mask", camera.id), mask);
        // The snapshot is QoS 0 and retained: a newer one supersedes it, a reconnect re-sends it.
        mqtt.publish(&format!("{}/snapshot", camera.id), QoS::AtMostOnce, true, snapshot(ctx, inspected));
    }
    if !kept {
        camera.stats.drop_frame(DropReason::AlertLost);
        return None;
    }
    Some(id)
}

/// The frame with its heat map and mask outline, as JPEG (empty when images are off).
fn snapshot(ctx: &PublisherContext, inspected: &Inspected) -> Vec<u8> {
    if ctx.options.publish_images { overlay_jpeg(ctx, inspected) } else { Vec::new() }
}

/// The frame with its heat map and mask outline, as JPEG.
fn overlay_jpeg(ctx: &PublisherContext, inspected: &Inspected) -> Vec<u8> {
    let format = OverlayFormat::Jpeg { quality: ctx.options.snapshot_quality };
    overlay_within(&inspected.frame.display, &inspected.analysis, None, format, ctx.options.image_max_width)
}

/// An event on `<camera>/events` (durable, like alerts) and, when the best frame changed,
/// its snapshot on the retained `<camera>/events/snapshot`.
fn publish_event(ctx: &PublisherContext, model: &ModelRef, camera: usize, event: Emitted) {
    let camera = ctx.cameras.get(camera);
    let id = &camera.id;
    let message = event.message(id, model, format!("{id}/events/snapshot"));
    tracing::info!(camera = %id, event = %message.id, kind = ?message.kind, frames = message.frames, "Event.");
    if let Some(board) = &ctx.board {
        board.event(serde_json::to_value(&message).expect("event serialises"));
    }
    let Some(mqtt) = &ctx.mqtt else { return };
    let payload = serde_json::to_vec(&message).expect("event serialises");
    let kept = mqtt.publish_durable(&format!("{id}/events"), payload);
    if let Some(jpeg) = event.snapshot.filter(|j| !j.is_empty()) {
        mqtt.publish(&format!("{id}/events/snapshot"), QoS::AtMostOnce, true, jpeg);
    }
    if !kept {
        camera.stats.drop_frame(DropReason::AlertLost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_move_to_camera_pixels() {
        // Native tiled model, ROI at (200, 100): only the offset applies.
        let native = CameraMapping::new([200, 100], [640, 480], [640, 480]);
        let r = Region { bbox: [300, 200, 6, 6], area: 36, max_score: 0.9 };
        assert_eq!(native.region(&r), Region { bbox: [500, 300, 6, 6], area: 36, max_score: 0.9 });
        assert_eq!(native.inspected(), [200, 100, 640, 480]);
        // A resize model saw a 200×100 ROI at (30, 40) as 64×64.
        let resized = CameraMapping::new([30, 40], [200, 100], [64, 64]);
        let r = Region { bbox: [32, 16, 2, 4], area: 5, max_score: 0.7 };
        // x: 32·3.125 = 100 … 34·3.125 = 106.25 → 107; y: 16·1.5625 = 25 … 20·1.5625 = 31.25 → 32.
        assert_eq!(resized.region(&r).bbox, [130, 65, 7, 7]);
        assert_eq!(resized.area(64 * 64), 200 * 100);
    }
}
