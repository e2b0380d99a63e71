//! Home Assistant MQTT discovery: retained config messages under the discovery prefix that
//! make every camera a device with a defect binary sensor, a score sensor and the snapshot
//! as an image entity, all unavailable while the node's `available` topic says `offline`.
//!
//! The configs are retained state of the MQTT link, so they go out on every (re)connect and
//! again whenever Home Assistant's birth message (`<prefix>/status` = `online`) arrives. A
//! camera that left the config since the last run has its entities removed (an empty
//! retained config, Home Assistant's convention); the cameras announced are remembered in
//! `<state_dir>/homeassistant.json` for that. With MQTT commands on, each camera also gets
//! a switch on `<camera>/enabled/set` (state from the retained `<camera>/enabled/state`).

use std::path::Path;

use serde_json::json;

use crate::config::DaemonConfig;
use crate::durable::write_atomic;

/// The entities of one camera: `(component, object)`; the last, the enable switch, only
/// while the daemon takes commands.
const ENTITIES: [(&str, &str); 4] =
    [("binary_sensor", "defect"), ("sensor", "score"), ("image", "snapshot"), ("switch", "enabled")];

/// The entities announced under `config`.
fn entities(config: &DaemonConfig) -> &'static [(&'static str, &'static str)] {
    if config.mqtt.commands { &ENTITIES } else { &ENTITIES[..3] }
}

/// The file that remembers which cameras were announced.
const ANNOUNCED_FILE: &str = "homeassistant.json";

/// `<prefix>/<component>/<node>_<camera>/<object>/config`.
fn config_topic(prefix: &str, component: &str, node: &str, camera: &str, object: &str) -> String {
    format!("{prefix}/{component}/{node}_{camera}/{object}/config")
}

/// The discovery configs of `camera`: `(topic, payload)`.
pub fn configs(config: &DaemonConfig, camera: &str) -> Vec<(String, Vec<u8>)> {
    let (node, base) = (&config.node_id, &config.mqtt.base_topic);
    let device = json!({
        "identifiers": [format!("edge-inspect_{node}_{camera}")],
        "name": format!("{node} {camera}"),
        "manufacturer": "edge-inspect",
        "model": "RDDPM visual inspection",
        "sw_version": env!("EDGE_INSPECT_VERSION"),
    });
    let availability = json!([{ "topic": format!("{base}/available"), "payload_available": "online", "payload_not_available": "offline" }]);
    let state_topic = format!("{base}/{camera}/state");
    entities(config)
        .iter()
        .map(|&(component, object)| {
            let unique_id = format!("edge-inspect_{node}_{camera}_{object}");
            let mut entity = json!({
                "unique_id": unique_id,
                "object_id": unique_id.replace('-', "_"),
                "device": device,
                "availability": availability,
            });
            let specific = match object {
                "defect" => json!({
                    "name": "Defect",
                    "device_class": "problem",
                    "state_topic": state_topic,
                    "value_template": "{{ 'ON' if value_json.label == 'anomalous' else 'OFF' }}",
                    "json_attributes_topic": state_topic,
                }),
                "score" => json!({
                    "name": "Anomaly score",
                    "state_topic": state_topic,
                    "value_template": "{{ value_json.normalised_score | round(3) }}",
                    "state_class": "measurement",
                    "icon": "mdi:chart-bell-curve",
                }),
                "enabled" => json!({
                    "name": "Inspection",
                    "command_topic": format!("{base}/{camera}/enabled/set"),
                    "state_topic": format!("{base}/{camera}/enabled/state"),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "icon": "mdi:cctv",
                }),
                _ => json!({
                    "name": "Snapshot",
                    "image_topic": format!("{base}/{camera}/snapshot"),
                    "content_type": "image/jpeg",
                }),
            };
            entity.as_object_mut().expect("an object").extend(specific.as_object().expect("an object").clone());
            let topic = config_topic(&config.homeassistant.discovery_prefix, component, node, camera, object);
            (topic, serde_json::to_vec(&entity).expect("discovery config serialises"))
        })
        .collect()
}

/// Every retained message discovery needs now: the configs of the configured cameras and an
/// empty config for each entity of a camera announced before but configured no more. Records
/// the announced cameras in `state_dir`.
pub fn messages(config: &DaemonConfig) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let path = config.state_dir.join(ANNOUNCED_FILE);
    let current: Vec<String> = config.cameras.iter().map(|c| c.id.clone()).collect();
    let mut out: Vec<(String, Vec<u8>)> = previously_announced(&path)
        .into_iter()
        .filter(|camera| !current.contains(camera))
        .flat_map(|gone| {
            tracing::info!(camera = %gone, "Removing a camera's Home Assistant entities.");
            let prefix = &config.homeassistant.discovery_prefix;
            ENTITIES.map(|(component, object)| {
                (config_topic(prefix, component, &config.node_id, &gone, object), Vec::new())
            })
        })
        .collect();
    out.extend(current.iter().flat_map(|camera| configs(config, camera)));
    std::fs::create_dir_all(&config.state_dir)?;
    write_atomic(&path, &serde_json::to_vec(&json!({ "cameras": current })).expect("serialises"))?;
    Ok(out)
}

fn previously_announced(path: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(path) else { return Vec::new() };
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v) => v["cameras"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(String::from)).collect(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "Unreadable record of announced cameras; none removed.");
            Vec::new()
        }
    }
}
