//! Events: one per defect episode and camera, on `<camera>/events`, after Frigate's
//! `frigate/events` (`new`, `update`, `end` with one id for the episode).
//!
//! An episode opens after `events.open_frames` consecutive anomalous frames (one stray frame
//! does not page anyone), is updated when a frame scores above its peak (the best frame's
//! snapshot moves with it), and ends `events.close_after_ms` after its last anomalous frame
//! — judged on the next frame, on the publisher's idle ticks when no frame comes, and at
//! shutdown. [`Tracker`] is that rule alone, tested without MQTT; the publisher feeds it.

use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::frame::ModelRef;
use crate::postprocess::anomaly::Region;
use crate::timestamp::rfc3339;

/// Version of the event payload.
pub const EVENT_SCHEMA: u32 = 1;

/// One inspected frame, as events see it.
pub struct Observation {
    pub seq: u64,
    pub captured: SystemTime,
    pub captured_at: Instant,
    pub anomalous: bool,
    pub score: f64,
    pub normalised_score: f64,
    /// Camera-pixel regions.
    pub regions: Vec<Region>,
    /// The part a triggered camera was triggered for.
    pub part_id: Option<String>,
    /// The camera's own timestamp of the frame, where it gives one.
    pub camera_timestamp_ns: Option<u64>,
}

/// The best frame of an episode.
#[derive(Debug, Clone)]
struct Best {
    seq: u64,
    captured: SystemTime,
    score: f64,
    normalised_score: f64,
    regions: Vec<Region>,
    part_id: Option<String>,
    camera_timestamp_ns: Option<u64>,
    snapshot: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Episode {
    id: String,
    start: SystemTime,
    last_anomalous: SystemTime,
    last_anomalous_at: Instant,
    frames: u64,
    best: Best,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    New,
    Update,
    End,
}

/// What to publish: the event message, and the best frame's snapshot when it changed.
pub struct Emitted {
    pub kind: Kind,
    episode: Episode,
    pub snapshot: Option<Vec<u8>>,
}

/// The `<camera>/events` payload.
#[derive(Debug, Serialize)]
pub struct EventMessage<'a> {
    pub schema: u32,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub id: &'a str,
    pub camera: &'a str,
    pub start_time: String,
    /// The last anomalous frame's capture time; `null` until the episode ends.
    pub end_time: Option<String>,
    /// Anomalous frames in the episode so far.
    pub frames: u64,
    pub peak_score: f64,
    pub peak_normalised_score: f64,
    /// Sequence number and capture time of the best frame.
    pub best_seq: u64,
    pub best_captured_at: String,
    /// The best frame's defect regions, camera pixels.
    pub regions: &'a [Region],
    /// The best frame's snapshot (JPEG, retained): the latest event's.
    pub snapshot_topic: String,
    pub model: &'a ModelRef,
    /// The best frame's part (triggered cameras).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_part_id: Option<&'a str>,
    /// The camera's own timestamp of the best frame, where it gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_camera_timestamp_ns: Option<u64>,
}

impl Emitted {
    pub fn message<'a>(&'a self, camera: &'a str, model: &'a ModelRef, snapshot_topic: String) -> EventMessage<'a> {
        let e = &self.episode;
        EventMessage {
            schema: EVENT_SCHEMA,
            kind: self.kind,
            id: &e.id,
            camera,
            start_time: rfc3339(e.start),
            end_time: (self.kind == Kind::End).then(|| rfc3339(e.last_anomalous)),
            frames: e.frames,
            peak_score: e.best.score,
            peak_normalised_score: e.best.normalised_score,
            best_seq: e.best.seq,
            best_captured_at: rfc3339(e.best.captured),
            regions: &e.best.regions,
            snapshot_topic,
            model,
            best_part_id: e.best.part_id.as_deref(),
            best_camera_timestamp_ns: e.best.camera_timestamp_ns,
        }
    }
}

/// One camera's episodes.
pub struct Tracker {
    open_frames: u32,
    close_after: Duration,
    /// `<node>-<camera>`, the prefix of event ids.
    id_prefix: String,
    /// Anomalous frames in a row while no episode is open (their first and best).
    streak: Option<(u32, SystemTime, Best)>,
    episode: Option<Episode>,
}

impl Tracker {
    pub fn new(node: &str, camera: &str, open_frames: u32, close_after: Duration) -> Self {
        Self { open_frames, close_after, id_prefix: format!("{node}-{camera}"), streak: None, episode: None }
    }

    /// New debounce rules (a reload): they apply from the next frame on.
    pub fn set_rules(&mut self, open_frames: u32, close_after: Duration) {
        (self.open_frames, self.close_after) = (open_frames, close_after);
    }

    /// Feeds one frame; `snapshot` is asked for only if this frame becomes an episode's best.
    pub fn observe(&mut self, frame: Observation, snapshot: impl FnOnce() -> Vec<u8>) -> Vec<Emitted> {
        let mut out = Vec::new();
        if let Some(ended) = self.expire(frame.captured_at) {
            out.push(ended);
        }
        if !frame.anomalous {
            self.streak = None;
            return out;
        }
        let best_of = |frame: Observation, snapshot: Vec<u8>| Best {
            seq: frame.seq,
            captured: frame.captured,
            score: frame.score,
            normalised_score: frame.normalised_score,
            regions: frame.regions,
            part_id: frame.part_id,
            camera_timestamp_ns: frame.camera_timestamp_ns,
            snapshot,
        };
        let (captured, captured_at) = (frame.captured, frame.captured_at);
        if let Some(episode) = &mut self.episode {
            episode.frames += 1;
            episode.last_anomalous = captured;
            episode.last_anomalous_at = captured_at;
            if frame.score > episode.best.score {
                episode.best = best_of(frame, snapshot());
                let snapshot = Some(episode.best.snapshot.clone());
                out.push(Emitted { kind: Kind::Update, episode: episode.clone(), snapshot });
            }
            return out;
        }
        let (count, start, best) = match self.streak.take() {
            None => (1, captured, best_of(frame, snapshot())),
            Some((count, start, best)) if frame.score > best.score => (count + 1, start, best_of(frame, snapshot())),
            Some((count, start, best)) => (count + 1, start, best),
        };
        if count < self.open_frames {
            self.streak = Some((count, start, best));
            return out;
        }
        let millis = start.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let episode = Episode {
            id: format!("{}-{millis}-{}", self.id_prefix, best.seq),
            start,
            last_anomalous: captured,
            last_anomalous_at: captured_at,
            frames: u64::from(count),
            best,
        };
        let snapshot = Some(episode.best.snapshot.clone());
        out.push(Emitted { kind: Kind::New, episode: episode.clone(), snapshot });
        self.episode = Some(episode);
        out
    }

    /// Ends the open episode if its last anomalous frame is `close_after` before `now`.
    pub fn expire(&mut self, now: Instant) -> Option<Emitted> {
        let quiet = now.saturating_duration_since(self.episode.as_ref()?.last_anomalous_at);
        (quiet >= self.close_after).then(|| self.finish()).flatten()
    }

    /// Ends the open episode now (shutdown).
    pub fn finish(&mut self) -> Option<Emitted> {
        self.streak = None;
        self.episode.take().map(|episode| Emitted { kind: Kind::End, episode, snapshot: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames 100 ms apart from one start, anomalous with `score` or normal (`None`).
    struct Clip {
        t0: (SystemTime, Instant),
        seq: u64,
    }

    impl Clip {
        fn frame(&mut self, score: Option<f64>) -> Observation {
            self.seq += 1;
            let offset = Duration::from_millis(100 * self.seq);
            Observation {
                seq: self.seq,
                captured: self.t0.0 + offset,
                captured_at: self.t0.1 + offset,
                anomalous: score.is_some(),
                score: score.unwrap_or(0.01),
                normalised_score: score.unwrap_or(0.01) * 10.0,
                regions: Vec::new(),
                part_id: None,
                camera_timestamp_ns: None,
            }
        }
    }

    fn kinds(out: &[Emitted]) -> Vec<Kind> {
        out.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn an_episode_opens_after_n_frames_updates_on_a_better_frame_and_ends_after_quiet_time() {
        let mut clip = Clip { t0: (SystemTime::now(), Instant::now()), seq: 0 };
        let mut t = Tracker::new("node", "cam", 2, Duration::from_millis(300));
        // One stray anomalous frame opens nothing.
        assert!(t.observe(clip.frame(Some(0.5)), Vec::new).is_empty());
        assert!(t.observe(clip.frame(None), Vec::new).is_empty());
        // Two in a row open an episode whose best frame is the higher of the two.
        assert!(t.observe(clip.frame(Some(0.7)), || b"a".to_vec()).is_empty());
        let new = t.observe(clip.frame(Some(0.6)), || b"b".to_vec());
        assert_eq!(kinds(&new), [Kind::New]);
        assert_eq!(new[0].snapshot.as_deref(), Some(&b"a"[..]), "the streak's best frame");
        let model = ModelRef { name: "m".into(), version: "1".into(), sha256: "s".into() };
        let id = new[0].message("cam", &model, String::new()).id.to_string();
        assert!(id.starts_with("node-cam-") && id.ends_with("-3"), "{id}");
        // A lower frame is no news; a higher one is an update with its snapshot.
        assert!(t.observe(clip.frame(Some(0.65)), || unreachable!("not the best")).is_empty());
        let update = t.observe(clip.frame(Some(0.9)), || b"c".to_vec());
        assert_eq!(kinds(&update), [Kind::Update]);
        assert_eq!(update[0].snapshot.as_deref(), Some(&b"c"[..]));
        // Normal frames within the quiet time keep it open; the first one after it ends it.
        assert!(t.observe(clip.frame(None), Vec::new).is_empty());
        assert!(t.observe(clip.frame(None), Vec::new).is_empty());
        let end = t.observe(clip.frame(None), Vec::new);
        assert_eq!(kinds(&end), [Kind::End]);
        let message = end[0].message("cam", &model, String::new());
        assert_eq!((message.id, message.frames, message.best_seq, message.peak_score), (id.as_str(), 4, 6, 0.9));
        assert!(message.end_time.is_some() && message.end_time.as_deref() >= Some(message.start_time.as_str()));
    }

    #[test]
    fn quiet_time_ends_an_episode_without_frames_and_shutdown_ends_it_at_once() {
        let mut clip = Clip { t0: (SystemTime::now(), Instant::now()), seq: 0 };
        let mut t = Tracker::new("n", "c", 1, Duration::from_secs(2));
        assert_eq!(kinds(&t.observe(clip.frame(Some(0.5)), Vec::new)), [Kind::New]);
        let last = clip.t0.1 + Duration::from_millis(100);
        assert!(t.expire(last + Duration::from_millis(1900)).is_none());
        assert_eq!(t.expire(last + Duration::from_secs(2)).map(|e| e.kind), Some(Kind::End));
        assert!(t.finish().is_none(), "nothing left open");
        assert_eq!(kinds(&t.observe(clip.frame(Some(0.5)), Vec::new)), [Kind::New]);
        assert_eq!(t.finish().map(|e| e.kind), Some(Kind::End));
    }

    #[test]
    fn an_event_names_the_part_of_its_best_frame() {
        let mut clip = Clip { t0: (SystemTime::now(), Instant::now()), seq: 0 };
        let mut t = Tracker::new("n", "c", 1, Duration::from_secs(2));
        let model = ModelRef { name: "m".into(), version: "1".into(), sha256: "s".into() };
        let part = |frame: Observation, id: &str| Observation { part_id: Some(id.into()), ..frame };
        let new = t.observe(part(clip.frame(Some(0.5)), "A-1"), Vec::new);
        assert_eq!(new[0].message("c", &model, String::new()).best_part_id, Some("A-1"));
        let update = t.observe(part(clip.frame(Some(0.8)), "A-2"), Vec::new);
        assert_eq!(update[0].message("c", &model, String::new()).best_part_id, Some("A-2"));
        let json = serde_json::to_value(update[0].message("c", &model, String::new())).unwrap();
        assert_eq!(json["best_part_id"], "A-2");
    }
}
