//! The cameras of a running daemon, shared by every stage that names or counts them.
//!
//! A SIGHUP may add and remove cameras while frames are in flight, so a camera is not an
//! index into the config: it is a *slot* here, appended when its id is first configured and
//! never reused by another id. [`crate::frame::Frame::camera`] is the slot, so a frame of a
//! camera that has just been removed still finds its counters, its controls and its name on
//! the way out. A camera removed and added again gets its old slot back: its counters and
//! sequence numbers go on. Which slots are configured now is the `active` flag; only the
//! main thread adds or retires.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::capture::trigger::Triggers;
use crate::controls::Controls;
use crate::frame::Frame;
use crate::stats::CameraStats;

/// One camera id's shared state, for as long as the daemon runs.
pub struct Camera {
    pub id: String,
    pub stats: Arc<CameraStats>,
    pub controls: Arc<Controls>,
    /// The camera's bounded frame queue: capture offers, the batcher takes. One queue per
    /// slot for the daemon's life, so a restarted capture thread feeds the same queue.
    pub queue_tx: Sender<Frame>,
    pub queue_rx: Receiver<Frame>,
    /// Open triggers (`capture::trigger`): the command handler adds, capture claims, the
    /// publisher answers.
    pub triggers: Arc<Triggers>,
    active: AtomicBool,
}

impl Camera {
    /// Whether the camera is in the running config.
    pub fn active(&self) -> bool {
        self.active.load(Relaxed)
    }
}

/// Every camera slot; cloned handles share it.
#[derive(Clone, Default)]
pub struct Cameras(Arc<RwLock<Vec<Arc<Camera>>>>);

impl Cameras {
    /// The camera in `slot`. Slots come from [`Cameras::activate`], so one always exists.
    pub fn get(&self, slot: usize) -> Arc<Camera> {
        self.0.read().expect("cameras lock")[slot].clone()
    }

    /// The configured cameras with their slots, in slot order.
    pub fn active(&self) -> Vec<(usize, Arc<Camera>)> {
        let slots = self.0.read().expect("cameras lock");
        slots.iter().enumerate().filter(|(_, c)| c.active()).map(|(i, c)| (i, c.clone())).collect()
    }

    /// The configured camera called `id`.
    pub fn find(&self, id: &str) -> Option<(usize, Arc<Camera>)> {
        self.active().into_iter().find(|(_, c)| c.id == id)
    }

    /// Marks `id` configured, creating its slot (with `controls` and a queue of
    /// `queue_capacity`) if the id is new; returns the slot and whether it was created.
    pub fn activate(&self, id: &str, queue_capacity: usize, controls: impl FnOnce() -> Controls) -> (usize, bool) {
        let mut slots = self.0.write().expect("cameras lock");
        if let Some(slot) = slots.iter().position(|c| c.id == id) {
            slots[slot].active.store(true, Relaxed);
            return (slot, false);
        }
        let (queue_tx, queue_rx) = bounded(queue_capacity);
        slots.push(Arc::new(Camera {
            id: id.to_string(),
            stats: Arc::new(CameraStats::new(id)),
            controls: Arc::new(controls()),
            queue_tx,
            queue_rx,
            triggers: Arc::default(),
            active: AtomicBool::new(true),
        }));
        (slots.len() - 1, true)
    }

    /// Marks the camera in `slot` as no longer configured.
    pub fn retire(&self, slot: usize) {
        self.get(slot).active.store(false, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_outlives_its_camera_and_comes_back_with_its_id() {
        let cameras = Cameras::default();
        let controls = || Controls::new(true, 1.0);
        assert_eq!(cameras.activate("a", 2, controls), (0, true));
        assert_eq!(cameras.activate("b", 2, controls), (1, true));
        cameras.get(0).stats.frames_in.fetch_add(7, Relaxed);
        cameras.retire(0);
        assert_eq!(cameras.active().iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1]);
        assert!(cameras.find("a").is_none());
        assert_eq!(cameras.get(0).id, "a", "a retired slot still names its frames");
        assert_eq!(cameras.activate("c", 2, controls), (2, true), "slots are not reused by another id");
        assert_eq!(cameras.activate("a", 2, controls), (0, false));
        assert_eq!(cameras.find("a").unwrap().1.stats.frames_in.load(Relaxed), 7, "its counters go on");
    }
}
