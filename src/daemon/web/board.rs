//! What the review page shows of the running pipeline, kept by the publisher as frames
//! pass: per camera the latest inspected frame (for the live overlay), a score history of
//! one bucket per second, and the recent defect events; plus the push channel the live
//! page listens on (server-sent events).
//!
//! Everything is bounded: the latest frame is one picture per camera, replaced at most
//! every [`LIVE_EVERY`] (anomalous frames always); the history keeps [`HISTORY_SECONDS`]
//! buckets per camera; the events [`MAX_EVENTS`]; the push channel is a ring of
//! [`PUSH_CAPACITY`] messages where a listener that falls behind skips ahead (counted by
//! `daemon::http`) instead of holding the publisher.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use image::RgbImage;
use serde::Serialize;

use crate::frame::Inspected;
use crate::postprocess::anomaly::Analysis;
use crate::postprocess::render::{OverlayFormat, overlay_within};
use crate::timestamp::rfc3339;

/// The live picture of a camera is replaced at most this often (an anomalous frame
/// always replaces it).
pub const LIVE_EVERY: Duration = Duration::from_millis(250);
/// Seconds of score history kept per camera (4 h).
pub const HISTORY_SECONDS: usize = 4 * 3600;
/// Defect events kept for the review page.
pub const MAX_EVENTS: usize = 500;
/// Messages the push channel holds for a slow listener.
pub const PUSH_CAPACITY: usize = 256;
/// The widest live picture rendered (pixels).
const LIVE_MAX_WIDTH: u32 = 960;

/// One second of a camera's verdicts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bucket {
    /// Unix seconds.
    pub second: u64,
    /// The highest normalised score (0.5 = the image threshold at sensitivity 1).
    pub peak: f64,
    pub frames: u32,
    pub alerts: u32,
}

/// The latest inspected frame of a camera.
struct Latest {
    seq: u64,
    captured: SystemTime,
    display: RgbImage,
    analysis: Analysis,
    /// The JPEG overlay, rendered on the first request for it.
    rendered: Option<Vec<u8>>,
}

#[derive(Default)]
struct CameraBoard {
    latest: Option<Latest>,
    replaced_at: Option<Instant>,
    history: VecDeque<Bucket>,
    /// The latest verdict, whichever frame it was.
    last: Option<Verdict>,
}

/// A camera's latest verdict as the pages and the push channel give it.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub camera: String,
    pub seq: u64,
    pub captured_at: String,
    pub score: f64,
    pub normalised_score: f64,
    pub anomalous: bool,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_id: Option<String>,
    /// The sequence number of the live picture (`/live/<camera>.jpg`).
    pub picture_seq: u64,
}

/// The review page's view of the pipeline (module docs).
pub struct Board {
    cameras: Mutex<BTreeMap<String, CameraBoard>>,
    events: Mutex<VecDeque<serde_json::Value>>,
    push: tokio::sync::broadcast::Sender<String>,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            cameras: Mutex::default(),
            events: Mutex::default(),
            push: tokio::sync::broadcast::channel(PUSH_CAPACITY).0,
        }
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Board {
    /// Takes one inspected frame of `camera` (called by the publisher for every frame).
    pub fn observe(&self, camera: &str, inspected: &Inspected) {
        let (f, a) = (&inspected.frame, &inspected.analysis);
        let mut cameras = self.cameras.lock().expect("board lock");
        let board = cameras.entry(camera.to_string()).or_default();
        board.add_to_history(unix_seconds(f.captured), a.normalised_score, a.anomalous);
        let due = board.replaced_at.is_none_or(|t| t.elapsed() >= LIVE_EVERY);
        if !(due || a.anomalous) {
            return;
        }
        board.replaced_at = Some(Instant::now());
        board.latest = Some(Latest {
            seq: f.seq,
            captured: f.captured,
            display: f.display.clone(),
            analysis: a.clone(),
            rendered: None,
        });
        let verdict = Verdict {
            camera: camera.to_string(),
            seq: f.seq,
            captured_at: rfc3339(f.captured),
            score: a.score,
            normalised_score: a.normalised_score,
            anomalous: a.anomalous,
            model: inspected.model.name.clone(),
            part_id: f.part.as_ref().map(|p| p.id.clone()),
            picture_seq: f.seq,
        };
        board.last = Some(verdict.clone());
        drop(cameras);
        // No listener is not an error: the page may simply not be open.
        let _ = self.push.send(serde_json::to_string(&verdict).expect("a verdict serialises"));
    }

    /// Keeps a defect event (`<camera>/events` payload), replacing earlier messages of
    /// the same episode.
    pub fn event(&self, message: serde_json::Value) {
        let mut events = self.events.lock().expect("board lock");
        let id = message.get("id").cloned();
        events.retain(|e| e.get("id") != id.as_ref());
        events.push_front(message);
        events.truncate(MAX_EVENTS);
    }

    /// The events kept, newest first.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.events.lock().expect("board lock").iter().cloned().collect()
    }

    /// The latest verdict of `camera`.
    pub fn last(&self, camera: &str) -> Option<Verdict> {
        self.cameras.lock().expect("board lock").get(camera).and_then(|b| b.last.clone())
    }

    /// The live overlay of `camera` as JPEG, with its sequence number and capture time.
    pub fn picture(&self, camera: &str) -> Option<(u64, SystemTime, Vec<u8>)> {
        let mut cameras = self.cameras.lock().expect("board lock");
        let latest = cameras.get_mut(camera)?.latest.as_mut()?;
        let rendered = latest.rendered.get_or_insert_with(|| {
            overlay_within(&latest.display, &latest.analysis, None, OverlayFormat::Jpeg { quality: 85 }, LIVE_MAX_WIDTH)
        });
        Some((latest.seq, latest.captured, rendered.clone()))
    }

    /// `camera`'s buckets of the last `seconds` seconds, oldest first.
    pub fn history(&self, camera: &str, seconds: u64) -> Vec<Bucket> {
        let since = unix_seconds(SystemTime::now()).saturating_sub(seconds);
        let cameras = self.cameras.lock().expect("board lock");
        let Some(board) = cameras.get(camera) else { return Vec::new() };
        board.history.iter().filter(|b| b.second >= since).copied().collect()
    }

    /// Frames per second of `camera` over the last 10 s.
    pub fn fps(&self, camera: &str) -> f64 {
        let frames: u32 = self.history(camera, 10).iter().map(|b| b.frames).sum();
        f64::from(frames) / 10.0
    }

    /// A listener for the push channel (one verdict as JSON per message).
    pub fn listen(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.push.subscribe()
    }
}

impl CameraBoard {
    fn add_to_history(&mut self, second: u64, score: f64, anomalous: bool) {
        match self.history.back_mut() {
            Some(last) if last.second == second => {
                last.peak = last.peak.max(score);
                last.frames += 1;
                last.alerts += u32::from(anomalous);
            }
            _ => {
                self.history.push_back(Bucket { second, peak: score, frames: 1, alerts: u32::from(anomalous) });
                if self.history.len() > HISTORY_SECONDS {
                    self.history.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_keeps_one_bucket_per_second_and_a_bounded_number() {
        let mut board = CameraBoard::default();
        board.add_to_history(100, 0.2, false);
        board.add_to_history(100, 0.7, true);
        board.add_to_history(101, 0.1, false);
        let first = board.history[0];
        assert_eq!((first.frames, first.alerts, first.peak), (2, 1, 0.7));
        for s in 0..HISTORY_SECONDS as u64 + 5 {
            board.add_to_history(200 + s, 0.1, false);
        }
        assert_eq!(board.history.len(), HISTORY_SECONDS);
        assert_eq!(board.history.back().unwrap().second, 200 + HISTORY_SECONDS as u64 + 4);
    }

    #[test]
    fn an_event_replaces_the_earlier_messages_of_its_episode() {
        let board = Board::default();
        board.event(serde_json::json!({"id": "a", "type": "new"}));
        board.event(serde_json::json!({"id": "b", "type": "new"}));
        board.event(serde_json::json!({"id": "a", "type": "end"}));
        let kinds: Vec<String> = board.events().iter().map(|e| format!("{}:{}", e["id"], e["type"])).collect();
        assert_eq!(kinds, ["\"a\":\"end\"", "\"b\":\"new\""]);
    }
}
