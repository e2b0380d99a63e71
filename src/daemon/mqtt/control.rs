//! Operator commands over MQTT, after Frigate's `<camera>/<feature>/set` convention:
//! - `<camera>/label/set` with `{"seq": N, "verdict": "defect" | "normal"}` labels the newest
//!   recording of that camera and sequence number in the capture store (`capture::labels`),
//!   echoed on the retained `<camera>/label/state`;
//! - `<camera>/enabled/set` `ON` / `OFF` and `<camera>/sensitivity/set` (a number in
//!   [`SENSITIVITY`]) change the camera's [`Controls`], persist them and echo them on the
//!   retained `<camera>/enabled/state` and `<camera>/sensitivity/state`;
//! - `<camera>/snapshot/set` publishes the next inspected frame's overlay on `<camera>/snapshot`;
//! - `<node>/model/set` with a bundle name hands it to the model loader (`daemon::models`),
//!   which answers on the retained `<node>/model`;
//! - `<camera>/trigger` (empty, a part id, or `{"part_id": "…"}`) opens a trigger on a
//!   triggered camera (`capture::trigger`), answered on `<camera>/verdict`.
//!
//! A payload that cannot be carried out — bad JSON or value, an unknown camera, command or
//! verdict, no such recording, recording switched off — is answered on `<node>/error` with
//! the reason, and nothing else happens. Runs on its own thread, fed by the MQTT link;
//! `mqtt.commands = false` switches that off. The review page (`daemon::web`) carries out
//! its writes through the same [`Control::execute`], so a click and a command are one
//! implementation, refused the same way and echoed on the same retained states.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Receiver;
use rumqttc::v5::mqttbytes::QoS;
use serde::{Deserialize, Serialize};

use super::client::{Incoming, Mqtt};
use crate::capture::labels::{Verdict, write_label};
use crate::controls::{Controls, SENSITIVITY, save};
use crate::daemon::cameras::{Camera, Cameras};
use crate::daemon::models::{Load, NODE_MODEL};
use crate::stats::LogThrottle;

/// The retained `/state` echoes of a camera's controls (at its start and after changes).
pub fn publish_state(mqtt: &Mqtt, camera: &Camera) {
    let enabled = if camera.controls.enabled() { "ON" } else { "OFF" };
    mqtt.publish(&format!("{}/enabled/state", camera.id), QoS::AtLeastOnce, true, enabled.into());
    let sensitivity = camera.controls.sensitivity().to_string();
    mqtt.publish(&format!("{}/sensitivity/state", camera.id), QoS::AtLeastOnce, true, sensitivity.into());
}

/// Writes the configured cameras' controls to `file` (logged if it fails: the controls
/// still apply, they would just not survive a restart).
pub fn persist(cameras: &Cameras, file: &std::path::Path) {
    let active = cameras.active();
    let all: Vec<(String, &Controls)> = active.iter().map(|(_, c)| (c.id.clone(), &*c.controls)).collect();
    if let Err(e) = save(file, &all) {
        tracing::error!(path = %file.display(), error = %e, "Cannot persist the camera controls.");
    }
}

/// The command topic filters of a node whose topics start with `base`.
pub fn filters(base: &str) -> Vec<String> {
    let camera = ["label", "enabled", "sensitivity", "snapshot"].iter().map(|f| format!("{base}/+/{f}/set"));
    [format!("{base}/model/set"), format!("{base}/+/trigger")].into_iter().chain(camera).collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelCommand {
    seq: u64,
    verdict: Verdict,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerCommand {
    part_id: Option<String>,
}

#[derive(Debug, Serialize)]
struct LabelState<'a> {
    seq: u64,
    verdict: Verdict,
    file: &'a str,
}

/// The largest command payload parsed: every command is a few bytes (a label is a small
/// JSON object); anything longer is refused unread.
pub const MAX_COMMAND_BYTES: usize = 4096;
/// The longest bundle name `<node>/model/set` takes.
pub const MAX_BUNDLE_NAME: usize = 128;
/// How much of a refused payload an error echoes.
const EXCERPT_BYTES: usize = 64;

/// A short, escaped excerpt of `payload` for logs and error replies: a hostile payload is
/// never echoed in full.
fn excerpt(payload: &[u8]) -> String {
    let head = String::from_utf8_lossy(&payload[..payload.len().min(EXCERPT_BYTES)]);
    if payload.len() > EXCERPT_BYTES { format!("{head:?}… ({} bytes)", payload.len()) } else { format!("{head:?}") }
}

/// What the commands act on.
pub struct Control {
    /// Where states are echoed (`None` with MQTT off: the review page still acts).
    pub mqtt: Option<Arc<Mqtt>>,
    /// The configured cameras (commands to others are refused) and their controls.
    pub cameras: Cameras,
    /// Where enabled and sensitivity persist.
    pub controls_file: PathBuf,
    /// The capture store, if recording is on.
    pub store: Option<PathBuf>,
    /// Bundles for the model loader (`<node>/model/set`).
    pub models: crossbeam_channel::Sender<Load>,
    /// Where `<node>/model/set` names bundles.
    pub models_dir: PathBuf,
}

impl Control {
    /// Carries out commands until the link is gone.
    /// Every refusal is answered on `error`; the log gets one line per 10 s (a flood of bad
    /// commands must not flood the journal).
    pub fn run(&self, mqtt: &Mqtt, incoming: Receiver<Incoming>) {
        let refusals = LogThrottle::new(Duration::from_secs(10));
        for command in incoming {
            let path = command.topic.strip_prefix(&format!("{}/", mqtt.base)).unwrap_or(&command.topic);
            if let Err(error) = self.execute(path, &command.payload, "mqtt") {
                if let Some(suppressed) = refusals.admit() {
                    tracing::warn!(topic = %command.topic, error = %error, suppressed, "Command refused.");
                }
                let reply = serde_json::json!({
                    "topic": command.topic,
                    "payload": excerpt(&command.payload),
                    "error": error,
                });
                mqtt.publish("error", QoS::AtLeastOnce, false, serde_json::to_vec(&reply).expect("serialises"));
            }
        }
        tracing::debug!("Command handler stopped.");
    }

    /// Carries out the command `path` (the topic below the node's base, e.g.
    /// `cam0/enabled/set`) with `payload`, or says why not; `origin` (`mqtt`, `web`) is
    /// what a label records as its source.
    pub fn execute(&self, path: &str, payload: &[u8], origin: &str) -> Result<(), String> {
        if payload.len() > MAX_COMMAND_BYTES {
            let size = payload.len();
            return Err(format!("a payload of {size} bytes; a command has at most {MAX_COMMAND_BYTES}"));
        }
        if path == "model/set" {
            let name = String::from_utf8_lossy(payload).trim().to_string();
            let safe = !name.starts_with('.') && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if name.is_empty() || name.len() > MAX_BUNDLE_NAME || !safe {
                return Err(format!(
                    "not a bundle name (1–{MAX_BUNDLE_NAME} letters, digits, . _ -, not starting with .): {}",
                    excerpt(name.as_bytes())
                ));
            }
            let load = Load::new(NODE_MODEL, self.models_dir.join(&name));
            return self.models.try_send(load).map_err(|_| "a model swap is already queued; try again".to_string());
        }
        if let Some(camera) = path.strip_suffix("/trigger") {
            return self.trigger(camera, payload);
        }
        let Some((camera, feature)) = path.strip_suffix("/set").and_then(|p| p.rsplit_once('/')) else {
            return Err(format!("unknown command topic {path}"));
        };
        let Some((_, entry)) = self.cameras.find(camera) else {
            return Err(format!("unknown camera '{camera}'"));
        };
        let bytes = payload;
        let payload = String::from_utf8_lossy(bytes);
        let controls = &entry.controls;
        match feature {
            "label" => return self.label(camera, bytes, origin),
            "snapshot" => {
                controls.request_snapshot();
                return Ok(());
            }
            "enabled" => match payload.trim() {
                "ON" => controls.set_enabled(true),
                "OFF" => controls.set_enabled(false),
                other => return Err(format!("expected ON or OFF, got {}", excerpt(other.as_bytes()))),
            },
            "sensitivity" => match payload.trim().parse::<f64>() {
                Ok(s) if SENSITIVITY.contains(&s) => controls.set_sensitivity(s),
                _ => {
                    return Err(format!("expected a sensitivity in {SENSITIVITY:?}, got {}", excerpt(bytes)));
                }
            },
            other => return Err(format!("unknown command '{other}'")),
        }
        tracing::info!(camera = %camera, feature = %feature, value = %payload.trim(), "Camera control changed.");
        persist(&self.cameras, &self.controls_file);
        if let Some(mqtt) = &self.mqtt {
            publish_state(mqtt, &entry);
        }
        Ok(())
    }

    /// A part to inspect: an empty payload, the part id as text, or `{"part_id": "…"}`.
    fn trigger(&self, camera: &str, payload: &[u8]) -> Result<(), String> {
        let Some((_, entry)) = self.cameras.find(camera) else {
            return Err(format!("unknown camera '{camera}'"));
        };
        let text = std::str::from_utf8(payload).map_err(|_| "a part id is UTF-8 text".to_string())?.trim();
        let id = if text.starts_with('{') {
            let command: TriggerCommand =
                serde_json::from_str(text).map_err(|e| format!("expected {{\"part_id\": \"…\"}}: {e}"))?;
            command.part_id
        } else {
            (!text.is_empty()).then(|| text.to_string())
        };
        let part = entry.triggers.trigger(camera, id.as_deref())?;
        tracing::debug!(camera = %camera, part = %part, "Triggered.");
        Ok(())
    }

    fn label(&self, camera: &str, payload: &[u8], origin: &str) -> Result<(), String> {
        let label: LabelCommand = serde_json::from_slice(payload)
            .map_err(|e| format!("expected {{\"seq\": <n>, \"verdict\": \"defect\" | \"normal\"}}: {e}"))?;
        let store = self.store.as_ref().ok_or("recording is off ([recorder] enabled = false): nothing to label")?;
        let file = write_label(store, camera, label.seq, label.verdict, origin).map_err(|e| e.to_string())?;
        tracing::info!(camera = %camera, seq = label.seq, verdict = ?label.verdict, file = %file.display(), "Frame labelled.");
        let state = LabelState { seq: label.seq, verdict: label.verdict, file: &file.display().to_string() };
        let payload = serde_json::to_vec(&state).expect("serialises");
        if let Some(mqtt) = &self.mqtt {
            mqtt.publish(&format!("{camera}/label/state"), QoS::AtLeastOnce, true, payload);
        }
        Ok(())
    }
}
