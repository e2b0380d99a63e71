//! What a SIGHUP changes: a pure function from the running config and the reloaded one to
//! the actions the main thread carries out while frames flow, and the config that runs
//! afterwards. No threads, no files: unit-tested here.
//!
//! Live: cameras removed, added or changed (only a changed camera restarts its capture; a
//! new `sensitivity` alone needs no restart), the config's `enabled` and `sensitivity`
//! (they become the operator's last word), the node model's path (the main thread checks
//! each bundle for a swap), publishing options and recorder limits. Anything else that
//! differs needs a restart, and is reported by section.

use super::mqtt::publish::PublishOptions;
use crate::capture::CameraConfig;
use crate::config::{DaemonConfig, RecorderLimits};

/// One change to the cameras, in the order the main thread carries them out: every stop
/// first, then per camera of the new config its controls and its start.
#[derive(Debug, Clone, PartialEq)]
pub enum CameraAction {
    /// Stop the camera's capture; `retire` (removed from the config) also takes it out of
    /// the registry.
    Stop {
        id: String,
        retire: bool,
    },
    SetEnabled {
        id: String,
        enabled: bool,
    },
    SetSensitivity {
        id: String,
        sensitivity: f64,
    },
    /// Start the camera (added, or changed and stopped above) in its old slot if it had one.
    Start(Box<CameraConfig>),
}

/// What a reload does.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub cameras: Vec<CameraAction>,
    /// New options for the publisher, if they changed.
    pub publish: Option<PublishOptions>,
    /// New limits for the recorder, if it runs and they changed.
    pub recorder: Option<RecorderLimits>,
    /// The config that runs once the plan is carried out: the old one with every live change.
    pub running: DaemonConfig,
    /// Sections that still differ: they take effect at the next restart.
    pub needs_restart: Vec<&'static str>,
}

impl Plan {
    /// Whether the cameras' controls or set changed (persist them, announce again).
    pub fn cameras_changed(&self) -> bool {
        !self.cameras.is_empty()
    }
}

/// The plan that takes the daemon from `old` (running) to `new` (reloaded, valid).
pub fn plan(old: &DaemonConfig, new: &DaemonConfig) -> Plan {
    let mut running = old.clone();
    running.model.path = new.model.path.clone();
    running.cameras = new.cameras.clone();
    let cameras = camera_actions(&old.cameras, &new.cameras);

    let publish = (PublishOptions::of(old) != PublishOptions::of(new)).then(|| PublishOptions::of(new));
    if publish.is_some() {
        let (m, n) = (&mut running.mqtt, &new.mqtt);
        (m.publish_images, m.snapshot_quality, m.image_max_width) =
            (n.publish_images, n.snapshot_quality, n.image_max_width);
        running.events = new.events.clone();
        running.recorder.normal_sample_rate = new.recorder.normal_sample_rate;
    }

    let (r, n) = (&old.recorder, &new.recorder);
    let recorder = (r.enabled && (r.enabled, &r.dir) == (n.enabled, &n.dir) && r.limits() != n.limits()).then(|| {
        running.recorder.set_limits(n.limits());
        n.limits()
    });

    let needs_restart =
        running.differences(new).into_iter().filter(|(_, changed)| *changed).map(|(section, _)| section).collect();
    Plan { cameras, publish, recorder, running, needs_restart }
}

/// Whether `a` and `b` capture the same way (all but the sensitivity equal).
fn capture_same(a: &CameraConfig, b: &CameraConfig) -> bool {
    *a == CameraConfig { sensitivity: a.sensitivity, ..b.clone() }
}

fn camera_actions(old: &[CameraConfig], new: &[CameraConfig]) -> Vec<CameraAction> {
    let find = |cameras: &[CameraConfig], id: &str| cameras.iter().find(|c| c.id == id).cloned();
    let mut actions = Vec::new();
    for camera in old {
        match find(new, &camera.id) {
            Some(kept) if capture_same(&kept, camera) => {}
            kept => actions.push(CameraAction::Stop { id: camera.id.clone(), retire: kept.is_none() }),
        }
    }
    for camera in new {
        let before = find(old, &camera.id);
        if let Some(before) = &before {
            if before.enabled != camera.enabled {
                actions.push(CameraAction::SetEnabled { id: camera.id.clone(), enabled: camera.enabled });
            }
            if before.sensitivity != camera.sensitivity {
                actions.push(CameraAction::SetSensitivity { id: camera.id.clone(), sensitivity: camera.sensitivity });
            }
        }
        if !before.as_ref().is_some_and(|b| capture_same(b, camera)) {
            actions.push(CameraAction::Start(Box::new(camera.clone())));
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::CameraAction::*;
    use super::*;
    use crate::config::load_with_env;

    /// A valid config of `cameras` (TOML tables) and `extra` top-level sections.
    fn config(extra: &str, cameras: &str) -> DaemonConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/models/brick-huber");
        std::fs::write(&path, format!("[model]\npath = \"{model}\"\n{extra}\n{cameras}")).unwrap();
        load_with_env(&path, &[]).unwrap()
    }

    fn camera(id: &str, more: &str) -> String {
        let frames = concat!(env!("CARGO_MANIFEST_DIR"), "/data/brick/test/good/*.png");
        format!("[[cameras]]\nid = \"{id}\"\nsource = \"replay\"\npath = \"{frames}\"\n{more}\n")
    }

    #[test]
    fn an_unchanged_config_changes_nothing() {
        let c = config("", &camera("a", ""));
        let plan = plan(&c, &c.clone());
        assert!(plan.cameras.is_empty() && plan.publish.is_none() && plan.recorder.is_none());
        assert!(plan.needs_restart.is_empty() && plan.running == c);
    }

    #[test]
    fn cameras_are_stopped_first_then_set_and_started() {
        let old = config("", &(camera("a", "") + &camera("b", "") + &camera("c", "")));
        // a: new sensitivity only; b: removed; c: new ROI (restart) and disabled; d: added.
        let new = config(
            "",
            &(camera("a", "sensitivity = 2.5")
                + &camera("c", "roi = [0, 0, 32, 32]\nenabled = false")
                + &camera("d", "")),
        );
        let actions = plan(&old, &new).cameras;
        let c = new.cameras[1].clone();
        assert_eq!(
            actions,
            vec![
                Stop { id: "b".into(), retire: true },
                Stop { id: "c".into(), retire: false },
                SetSensitivity { id: "a".into(), sensitivity: 2.5 },
                SetEnabled { id: "c".into(), enabled: false },
                Start(Box::new(c)),
                Start(Box::new(new.cameras[2].clone())),
            ]
        );
        let plan = plan(&old, &new);
        assert!(plan.cameras_changed() && plan.needs_restart.is_empty(), "{:?}", plan.needs_restart);
        assert_eq!(plan.running.cameras, new.cameras);
    }

    #[test]
    fn options_and_limits_apply_live_and_the_rest_waits_for_a_restart() {
        let old = config("[recorder]\nenabled = true\nmax_bytes = 1000000", &camera("a", ""));
        let new = config(
            "[recorder]\nenabled = true\nmax_bytes = 2000000\nnormal_sample_rate = 0.5\n\
             [mqtt]\npublish_images = false\n[pipeline]\nmax_batch = 2",
            &camera("a", ""),
        );
        let plan = plan(&old, &new);
        assert!(plan.cameras.is_empty());
        let publish = plan.publish.as_ref().expect("new publishing options");
        assert!(!publish.publish_images && publish.normal_sample_rate == 0.5);
        assert_eq!(plan.recorder.map(|l| l.max_bytes), Some(2_000_000));
        assert_eq!(plan.needs_restart, vec!["pipeline"]);
        assert_eq!(plan.running.pipeline, old.pipeline, "what needs a restart stays as it runs");
        assert_eq!((plan.running.recorder.max_bytes, plan.running.mqtt.publish_images), (2_000_000, false));

        // A recorder that does not run gets no limits: enabling it needs a restart.
        let off = config("[recorder]\nenabled = false", &camera("a", ""));
        let plan = super::plan(&off, &new);
        assert!(plan.recorder.is_none() && plan.needs_restart.contains(&"recorder"), "{:?}", plan.needs_restart);
    }
}
