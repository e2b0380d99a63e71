//! The answer to each trigger of a triggered camera (`capture::trigger`) on
//! `<camera>/verdict`: `pass` or `fail` with the frame's score, or `missed` with the reason
//! (no frame arrived, or the frame was lost on the way). Durable like alerts: a PLC-side
//! gateway diverts parts by it, so it waits in the outbox while the broker is away.

use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::publish::{PAYLOAD_SCHEMA, PublisherContext};
use crate::capture::trigger::{Missed, Part};
use crate::daemon::cameras::Camera;
use crate::frame::{Inspected, ModelRef};
use crate::stats::DropReason;
use crate::timestamp::rfc3339;

/// One verdict per trigger.
#[derive(Debug, Serialize)]
struct Verdict<'a> {
    schema: u32,
    #[serde(rename = "@timestamp")]
    timestamp: String,
    camera: &'a str,
    part_id: &'a str,
    /// `pass`, `fail` or `missed`.
    verdict: &'static str,
    triggered_at: String,
    /// From the trigger's arrival to this message.
    latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    captured_at: Option<String>,
    /// The camera's own timestamp of the frame (ns of its clock), where it gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    camera_timestamp_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    normalised_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    threshold: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a ModelRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl<'a> Verdict<'a> {
    fn new(camera: &'a Camera, part: &'a Part, verdict: &'static str) -> Self {
        Self {
            schema: PAYLOAD_SCHEMA,
            timestamp: rfc3339(SystemTime::now()),
            camera: &camera.id,
            part_id: &part.id,
            verdict,
            triggered_at: rfc3339(part.triggered),
            latency_ms: part.triggered_at.elapsed().as_secs_f64() * 1e3,
            seq: None,
            captured_at: None,
            camera_timestamp_ns: None,
            score: None,
            normalised_score: None,
            threshold: None,
            model: None,
            reason: None,
        }
    }
}

/// The verdict on an inspected frame that a trigger claimed, unless that trigger was
/// already answered `missed`.
pub fn inspected(ctx: &PublisherContext, camera: &Camera, inspected: &Inspected, part: &Part) {
    let (a, f) = (&inspected.analysis, &inspected.frame);
    if !camera.triggers.answer(f.seq) {
        tracing::warn!(camera = %camera.id, part = %part.id, seq = f.seq, "A verdict after its trigger was answered missed; not published.");
        return;
    }
    let mut verdict = Verdict::new(camera, part, if a.anomalous { "fail" } else { "pass" });
    verdict.seq = Some(f.seq);
    verdict.captured_at = Some(rfc3339(f.captured));
    verdict.camera_timestamp_ns = f.stamp.timestamp_ns;
    verdict.score = Some(a.score);
    verdict.normalised_score = Some(a.normalised_score);
    verdict.threshold = Some(a.image_threshold);
    verdict.model = Some(&inspected.model);
    send(ctx, camera, &verdict, part.triggered_at, usize::from(a.anomalous));
}

/// `missed`: the trigger got no frame, or its frame no verdict.
pub fn missed(ctx: &PublisherContext, camera: &Camera, missed: &Missed) {
    tracing::warn!(camera = %camera.id, part = %missed.part.id, reason = %missed.reason, "Part missed.");
    let mut verdict = Verdict::new(camera, &missed.part, "missed");
    verdict.seq = missed.seq;
    verdict.reason = Some(missed.reason.clone());
    send(ctx, camera, &verdict, missed.part.triggered_at, 2);
}

fn send(ctx: &PublisherContext, camera: &Camera, verdict: &Verdict, triggered_at: Instant, kind: usize) {
    camera.stats.verdicts[kind].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    camera.stats.trigger_latency.observe(triggered_at.elapsed().as_secs_f64());
    let Some(mqtt) = &ctx.mqtt else { return };
    let payload = serde_json::to_vec(verdict).expect("verdict serialises");
    if !mqtt.publish_durable(&format!("{}/verdict", camera.id), payload) {
        camera.stats.drop_frame(DropReason::AlertLost);
    }
}
