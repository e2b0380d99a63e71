//! Operator commands over MQTT, after Frigate's `<camera>/<feature>/set` convention. Today
//! one: `<camera>/label/set` with `{"seq": N, "verdict": "defect" | "normal"}` labels the
//! newest recording of that camera and sequence number in the capture store
//! (`capture::labels`); the label is echoed on the retained `<camera>/label/state`. A
//! payload that cannot be carried out — bad JSON, an unknown camera or verdict, no such
//! recording, recording switched off — is answered on `<node>/error` with the reason, and
//! nothing else happens. Runs on its own thread, fed by the MQTT link; `mqtt.commands =
//! false` switches it off.

use std::path::PathBuf;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use rumqttc::QoS;
use serde::{Deserialize, Serialize};

use super::mqtt::{Incoming, Mqtt};
use crate::capture::labels::{Verdict, write_label};

/// The command topic filters of a node whose topics start with `base`.
pub fn filters(base: &str) -> Vec<String> {
    vec![format!("{base}/+/label/set")]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelCommand {
    seq: u64,
    verdict: Verdict,
}

#[derive(Debug, Serialize)]
struct LabelState<'a> {
    seq: u64,
    verdict: Verdict,
    file: &'a str,
}

/// What the commands act on.
pub struct Control {
    pub mqtt: Arc<Mqtt>,
    pub cameras: Vec<String>,
    /// The capture store, if recording is on.
    pub store: Option<PathBuf>,
}

impl Control {
    /// Carries out commands until the link is gone.
    pub fn run(self, incoming: Receiver<Incoming>) {
        for command in incoming {
            if let Err(error) = self.handle(&command) {
                tracing::warn!(topic = %command.topic, error = %error, "Command refused.");
                let reply = serde_json::json!({
                    "topic": command.topic,
                    "payload": String::from_utf8_lossy(&command.payload),
                    "error": error,
                });
                self.mqtt.publish("error", QoS::AtLeastOnce, false, serde_json::to_vec(&reply).expect("serialises"));
            }
        }
        tracing::debug!("Command handler stopped.");
    }

    fn handle(&self, command: &Incoming) -> Result<(), String> {
        let path = command.topic.strip_prefix(&format!("{}/", self.mqtt.base)).unwrap_or(&command.topic);
        let Some(camera) = path.strip_suffix("/label/set") else {
            return Err(format!("unknown command topic {}", command.topic));
        };
        if !self.cameras.iter().any(|c| c == camera) {
            return Err(format!("unknown camera '{camera}'"));
        }
        let label: LabelCommand = serde_json::from_slice(&command.payload)
            .map_err(|e| format!("expected {{\"seq\": <n>, \"verdict\": \"defect\" | \"normal\"}}: {e}"))?;
        let store = self.store.as_ref().ok_or("recording is off ([recorder] enabled = false): nothing to label")?;
        let file = write_label(store, camera, label.seq, label.verdict, "mqtt").map_err(|e| e.to_string())?;
        tracing::info!(camera = %camera, seq = label.seq, verdict = ?label.verdict, file = %file.display(), "Frame labelled.");
        let state = LabelState { seq: label.seq, verdict: label.verdict, file: &file.display().to_string() };
        let payload = serde_json::to_vec(&state).expect("serialises");
        self.mqtt.publish(&format!("{camera}/label/state"), QoS::AtLeastOnce, true, payload);
        Ok(())
    }
}
