//! Triggered capture: one inspected frame per part, and exactly one verdict per trigger.
//!
//! On a conveyor the camera is triggered once per part — by software, a message on
//! `<camera>/trigger` with the part's id, or by the line itself, wired to the camera's
//! trigger input (then every frame the camera delivers is a part, numbered by the camera's
//! frame counter); the line diverts the part by the verdict published for that id. The
//! [`Triggers`] ledger of a camera owns the life of each trigger:
//! `pending` (waiting for a frame) → `captured` (its frame is in the pipeline) → answered.
//! The capture thread claims the oldest pending trigger for the next frame it takes; the
//! publisher answers a captured one with the frame's verdict; a trigger whose frame does not
//! arrive within `frame_timeout`, or whose frame gets no verdict within `verdict_timeout`
//! (dropped on the way: a full queue, a failed inference, the shutdown deadline), is answered
//! `missed` with the reason. A frame dropped on the way with its reason known (a full queue,
//! a failed inference) is answered `missed` at once, within a turn of the publisher, rather
//! than at its deadline. Whichever comes first removes the entry, so a late verdict never
//! answers a trigger twice.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, bounded};

/// Triggers a camera holds at most (waiting or in the pipeline); one more is refused.
pub const MAX_TRIGGERS: usize = 256;
/// The longest part id taken.
pub const MAX_PART_ID: usize = 128;

/// The verdicts a trigger gets, in the order `CameraStats::verdicts` counts them.
pub const VERDICTS: [&str; 3] = ["pass", "fail", "missed"];

/// How a camera's frames are taken.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TriggerMode {
    /// Every frame the source delivers (as before triggers existed).
    Free,
    /// One frame per `<camera>/trigger` message.
    Mqtt { frame_timeout: Duration, verdict_timeout: Duration },
    /// The camera is triggered by the line (GenICam `TriggerSource=Line0`…): every frame it
    /// delivers is a part, its id the camera's frame counter.
    Camera { verdict_timeout: Duration },
}

/// The part a triggered frame shows, carried with the frame to its verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub id: String,
    pub triggered: SystemTime,
    pub triggered_at: Instant,
}

/// A trigger that ended without a verdict, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Missed {
    pub part: Part,
    pub reason: String,
    /// The frame it claimed, if one arrived.
    pub seq: Option<u64>,
}

#[derive(Debug)]
struct Entry {
    part: Part,
    /// The frame's sequence number once a frame claimed it.
    seq: Option<u64>,
    deadline: Instant,
    /// Why its frame was dropped, once the pipeline said so.
    lost: Option<String>,
}

/// One camera's triggers (shared by the command handler, the capture thread and the
/// publisher for the daemon's life, like the camera's slot).
pub struct Triggers {
    state: Mutex<State>,
    /// Rung by every new trigger: a replay camera waits on it instead of pacing.
    bell_tx: Sender<()>,
    bell_rx: Receiver<()>,
}

struct State {
    mode: TriggerMode,
    entries: VecDeque<Entry>,
    /// For part ids made up when a trigger names none.
    counter: u64,
}

impl Default for Triggers {
    fn default() -> Self {
        let (bell_tx, bell_rx) = bounded(1);
        let state = State { mode: TriggerMode::Free, entries: VecDeque::new(), counter: 0 };
        Self { state: Mutex::new(state), bell_tx, bell_rx }
    }
}

impl Triggers {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("triggers lock")
    }

    /// Set by the camera's capture thread at its start (the config may change on reload).
    pub fn configure(&self, mode: TriggerMode) {
        self.state().mode = mode;
    }

    pub fn mode(&self) -> TriggerMode {
        self.state().mode
    }

    /// Receives a ring for each new trigger (at most one ring waits).
    pub fn bell(&self) -> &Receiver<()> {
        &self.bell_rx
    }

    /// A trigger for part `id` (or, without one, `<camera>-<n>`); refused for a free-running
    /// camera, an id that is not printable text of at most [`MAX_PART_ID`] bytes, and when
    /// [`MAX_TRIGGERS`] are already open. Returns the part id.
    pub fn trigger(&self, camera: &str, id: Option<&str>) -> Result<String, String> {
        let mut state = self.state();
        let frame_timeout = match state.mode {
            TriggerMode::Mqtt { frame_timeout, .. } => frame_timeout,
            TriggerMode::Free => {
                return Err(format!("camera '{camera}' is free-running (trigger = \"free\"): it takes no triggers"));
            }
            TriggerMode::Camera { .. } => {
                return Err(format!(
                    "camera '{camera}' is triggered by the line (trigger = \"camera\"), not over MQTT"
                ));
            }
        };
        if state.entries.len() >= MAX_TRIGGERS {
            return Err(format!("camera '{camera}' already holds {MAX_TRIGGERS} open triggers"));
        }
        state.counter += 1;
        let id = match id {
            Some(id) if id.is_empty() || id.len() > MAX_PART_ID || id.chars().any(char::is_control) => {
                return Err(format!("a part id is 1–{MAX_PART_ID} bytes of printable text"));
            }
            Some(id) => id.to_string(),
            None => format!("{camera}-{}", state.counter),
        };
        let now = Instant::now();
        let part = Part { id: id.clone(), triggered: SystemTime::now(), triggered_at: now };
        state.entries.push_back(Entry { part, seq: None, deadline: now + frame_timeout, lost: None });
        let _ = self.bell_tx.try_send(());
        Ok(id)
    }

    /// Whether a trigger waits for a frame.
    pub fn waiting(&self) -> bool {
        self.state().entries.iter().any(|e| e.seq.is_none())
    }

    /// The oldest trigger still waiting for a frame, given to the frame captured at
    /// `captured_at` (a frame taken before the trigger came does not show the part); the
    /// frame is numbered by `number` only when it is claimed, so frames between triggers
    /// leave no gaps. Returns the frame's number and part.
    pub fn claim(&self, captured_at: Instant, number: impl FnOnce() -> u64) -> Option<(u64, Part)> {
        let mut state = self.state();
        let TriggerMode::Mqtt { verdict_timeout, .. } = state.mode else { return None };
        let entry = state.entries.iter_mut().find(|e| e.seq.is_none())?;
        if entry.part.triggered_at > captured_at {
            return None;
        }
        let seq = number();
        entry.seq = Some(seq);
        entry.deadline = captured_at + verdict_timeout;
        Some((seq, entry.part.clone()))
    }

    /// A frame that a line-triggered camera delivered is part `id` (its frame counter),
    /// numbered by `number`; `None` when [`MAX_TRIGGERS`] parts already wait for verdicts
    /// (the frame is then dropped: the verdicts are not keeping up).
    pub fn arrived(
        &self,
        id: String,
        captured: SystemTime,
        captured_at: Instant,
        number: impl FnOnce() -> u64,
    ) -> Option<(u64, Part)> {
        let mut state = self.state();
        let TriggerMode::Camera { verdict_timeout } = state.mode else { return None };
        if state.entries.len() >= MAX_TRIGGERS {
            return None;
        }
        let seq = number();
        let part = Part { id, triggered: captured, triggered_at: captured_at };
        state.entries.push_back(Entry {
            part: part.clone(),
            seq: Some(seq),
            deadline: captured_at + verdict_timeout,
            lost: None,
        });
        Some((seq, part))
    }

    /// The verdict of frame `seq` answers its trigger; `false` if the trigger was already
    /// answered `missed` (its verdict then goes unpublished).
    pub fn answer(&self, seq: u64) -> bool {
        let mut state = self.state();
        let Some(at) = state.entries.iter().position(|e| e.seq == Some(seq)) else { return false };
        state.entries.remove(at);
        true
    }

    /// Frame `seq` was dropped on the way for `reason`: its trigger is due now, answered
    /// `missed` with that reason at the publisher's next turn. Nothing for a frame that
    /// carries no trigger or was already answered.
    pub fn lost(&self, seq: u64, reason: &str) {
        let mut state = self.state();
        if let Some(entry) = state.entries.iter_mut().find(|e| e.seq == Some(seq)) {
            entry.deadline = Instant::now();
            entry.lost = Some(reason.to_string());
        }
    }

    /// Removes and returns the triggers past their deadline at `now`.
    pub fn expire(&self, now: Instant) -> Vec<Missed> {
        let mut state = self.state();
        let (late, open): (Vec<Entry>, Vec<Entry>) = state.entries.drain(..).partition(|e| e.deadline <= now);
        state.entries = open.into();
        late.into_iter().map(missed).collect()
    }

    /// Removes and returns every open trigger (the camera stops, or the daemon does).
    pub fn abandon(&self, reason: &str) -> Vec<Missed> {
        let mut state = self.state();
        state.entries.drain(..).map(|e| Missed { reason: reason.to_string(), seq: e.seq, part: e.part }).collect()
    }
}

fn missed(entry: Entry) -> Missed {
    let waited = entry.deadline.saturating_duration_since(entry.part.triggered_at).as_millis();
    let reason = match (entry.seq, entry.lost) {
        (None, _) => format!("no frame within {waited} ms of the trigger"),
        (Some(seq), Some(lost)) => format!("frame {seq} was dropped: {lost}"),
        (Some(seq), None) => format!("frame {seq} got no verdict (dropped on the way; see stats)"),
    };
    Missed { part: entry.part, reason, seq: entry.seq }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn triggered(frame_ms: u64, verdict_ms: u64) -> Triggers {
        let t = Triggers::default();
        let mode = TriggerMode::Mqtt {
            frame_timeout: Duration::from_millis(frame_ms),
            verdict_timeout: Duration::from_millis(verdict_ms),
        };
        t.configure(mode);
        t
    }

    #[test]
    fn each_trigger_takes_one_later_frame_and_is_answered_once() {
        let t = triggered(1000, 5000);
        let before = Instant::now();
        assert_eq!(t.trigger("cam", Some("P-1")).unwrap(), "P-1");
        assert_eq!(t.trigger("cam", None).unwrap(), "cam-2");
        assert!(t.bell().try_recv().is_ok() && t.bell().try_recv().is_err(), "one ring waits");
        assert_eq!(t.claim(before, || unreachable!("not numbered")), None, "a frame from before the trigger");
        let now = Instant::now();
        assert_eq!(t.claim(now, || 8).unwrap().1.id, "P-1");
        assert_eq!(t.claim(now, || 9).unwrap().1.id, "cam-2");
        assert!(!t.waiting());
        assert_eq!(t.claim(now, || unreachable!("not numbered")), None, "no trigger, no part");
        assert!(t.answer(9) && t.answer(8));
        assert!(!t.answer(8), "answered once");
    }

    #[test]
    fn a_trigger_without_a_frame_or_a_verdict_is_missed_once() {
        let t = triggered(100, 200);
        t.trigger("cam", Some("no-frame")).unwrap();
        t.trigger("cam", Some("no-verdict")).unwrap();
        let start = Instant::now();
        // The first is answered; the second's frame comes and is then lost; a third waits.
        assert_eq!(t.claim(start, || 1).unwrap().1.id, "no-frame");
        assert!(t.answer(1));
        assert_eq!(t.claim(start, || 2).unwrap().1.id, "no-verdict");
        t.trigger("cam", Some("late")).unwrap();
        let missed = t.expire(start + Duration::from_millis(150));
        assert_eq!(missed.len(), 1, "{missed:?}");
        assert_eq!((missed[0].part.id.as_str(), missed[0].seq), ("late", None));
        assert!(missed[0].reason.starts_with("no frame within 100 ms"), "{}", missed[0].reason);
        let missed = t.expire(start + Duration::from_millis(250));
        assert_eq!((missed[0].part.id.as_str(), missed[0].seq), ("no-verdict", Some(2)));
        assert!(!t.answer(2), "a verdict after `missed` answers nothing");
        assert!(t.expire(start + Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn a_frame_dropped_on_the_way_answers_its_trigger_missed_at_once_with_the_reason() {
        let t = triggered(100, 60_000);
        t.trigger("cam", Some("P-1")).unwrap();
        t.trigger("cam", Some("P-2")).unwrap();
        let start = Instant::now();
        t.claim(start, || 1).unwrap();
        t.claim(start, || 2).unwrap();
        t.lost(1, "the camera's queue was full");
        t.lost(7, "a frame that carries no trigger");
        let missed = t.expire(Instant::now());
        assert_eq!(missed.len(), 1, "only the lost frame's trigger, long before its deadline: {missed:?}");
        assert_eq!((missed[0].part.id.as_str(), missed[0].seq), ("P-1", Some(1)));
        assert_eq!(missed[0].reason, "frame 1 was dropped: the camera's queue was full");
        assert!(!t.answer(1) && t.answer(2), "the other trigger still takes its verdict");
    }

    #[test]
    fn a_line_triggered_camera_makes_every_frame_a_part_and_takes_no_mqtt_trigger() {
        let t = Triggers::default();
        t.configure(TriggerMode::Camera { verdict_timeout: Duration::from_millis(100) });
        assert!(t.trigger("cam", Some("P-1")).unwrap_err().contains("triggered by the line"));
        let now = Instant::now();
        let (seq, part) = t.arrived("17".into(), SystemTime::now(), now, || 4).unwrap();
        assert_eq!((seq, part.id.as_str()), (4, "17"));
        assert!(!t.waiting(), "nothing waits for a frame");
        t.arrived("18".into(), SystemTime::now(), now, || 5).unwrap();
        assert!(t.answer(4));
        let missed = t.expire(now + Duration::from_millis(150));
        assert_eq!((missed.len(), missed[0].seq), (1, Some(5)), "{missed:?}");
        for n in 0..MAX_TRIGGERS as u64 {
            t.arrived(n.to_string(), SystemTime::now(), now, || n).unwrap();
        }
        assert_eq!(t.arrived("full".into(), SystemTime::now(), now, || unreachable!("not numbered")), None);
    }

    #[test]
    fn triggers_are_refused_on_free_cameras_bad_ids_and_a_full_ledger() {
        let free = Triggers::default();
        assert!(free.trigger("cam", None).unwrap_err().contains("free-running"));
        let t = triggered(1000, 1000);
        assert!(t.trigger("cam", Some("")).is_err());
        assert!(t.trigger("cam", Some("a\nb")).is_err());
        assert!(t.trigger("cam", Some(&"x".repeat(MAX_PART_ID + 1))).is_err());
        for _ in 0..MAX_TRIGGERS {
            t.trigger("cam", None).unwrap();
        }
        assert!(t.trigger("cam", None).unwrap_err().contains("256 open triggers"));
        assert_eq!(t.abandon("stopping").len(), MAX_TRIGGERS);
        assert!(!t.waiting());
    }
}
