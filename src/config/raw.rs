//! What the file may say: one serde struct per section, every key optional, unknown keys
//! found by the loader. Defaults and checks live in `validate`.

use std::path::PathBuf;

use serde::Deserialize;

use crate::infer::runtime::RuntimeConfig;
use crate::model::sampling::Sampler;
use crate::postprocess::screen::ScreenChoice;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawNode {
    pub(super) id: Option<String>,
    pub(super) state_dir: Option<PathBuf>,
    /// Stop draining in-flight frames after this long on shutdown.
    pub(super) drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawModel {
    pub(super) path: Option<PathBuf>,
    /// Where `<node>/model/set` looks bundles up by name (default: `path`'s directory).
    pub(super) models_dir: Option<PathBuf>,
    pub(super) t0: Option<usize>,
    pub(super) steps: Option<usize>,
    pub(super) sampler: Option<Sampler>,
    pub(super) eta: Option<f64>,
    pub(super) seed: Option<u64>,
    /// Which of the bundle's cascade screens runs: `"bundle"`, `"off"` or a recall.
    pub(super) screen_recall: Option<ScreenChoice>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawPipeline {
    pub(super) max_batch: Option<usize>,
    pub(super) max_wait_ms: Option<u64>,
    pub(super) queue_capacity: Option<usize>,
    /// Frames waiting for the publisher / recorder before new ones are dropped.
    pub(super) output_capacity: Option<usize>,
    /// The longest a pipeline stage may go without progress before the daemon counts it
    /// as stuck (watchdog pings stop, the daemon stops with exit 70).
    pub(super) stage_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawTls {
    pub(super) ca_file: Option<PathBuf>,
    pub(super) client_cert_file: Option<PathBuf>,
    pub(super) client_key_file: Option<PathBuf>,
    pub(super) client_key_credential: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawMqtt {
    pub(super) enabled: Option<bool>,
    pub(super) host: Option<String>,
    pub(super) port: Option<i64>,
    pub(super) client_id: Option<String>,
    pub(super) topic_prefix: Option<String>,
    pub(super) keep_alive_s: Option<u64>,
    pub(super) session_expiry_s: Option<u64>,
    pub(super) stats_interval_s: Option<u64>,
    pub(super) max_packet_bytes: Option<usize>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) password_credential: Option<String>,
    pub(super) tls: Option<RawTls>,
    pub(super) embedded_broker: Option<bool>,
    pub(super) publish_images: Option<bool>,
    /// Take operator commands (`<camera>/label/set`; default true).
    pub(super) commands: Option<bool>,
    pub(super) snapshot_quality: Option<u8>,
    pub(super) image_max_width: Option<u32>,
    pub(super) reconnect_max_s: Option<u64>,
    pub(super) outbox_max_bytes: Option<u64>,
    pub(super) outbox_max_age_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawRecorder {
    pub(super) enabled: Option<bool>,
    pub(super) dir: Option<PathBuf>,
    pub(super) normal_sample_rate: Option<f64>,
    pub(super) max_bytes: Option<u64>,
    pub(super) max_age_days: Option<f64>,
    pub(super) max_side: Option<u32>,
    pub(super) min_free_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawUpload {
    /// Ship the capture store to object storage (default false).
    pub(super) enabled: Option<bool>,
    /// The S3-compatible endpoint, `http(s)://host:port` (AWS: `https://s3.<region>.amazonaws.com`).
    pub(super) endpoint: Option<String>,
    pub(super) bucket: Option<String>,
    /// Default `us-east-1` (what most S3-compatible servers expect).
    pub(super) region: Option<String>,
    /// Keys are `<prefix>/<node>/<camera>/<day>/<class>/<file>`; default `edge-inspect`.
    pub(super) prefix: Option<String>,
    pub(super) access_key_id: Option<String>,
    pub(super) secret_access_key: Option<String>,
    pub(super) secret_access_key_file: Option<PathBuf>,
    pub(super) secret_access_key_credential: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawFleet {
    /// Follow the fleet's rollouts on `<topic_prefix>/fleet/model` (default false); bundles
    /// are downloaded through `[upload]`'s endpoint and credentials.
    pub(super) enabled: Option<bool>,
    /// How long a rolled-out model is watched before it counts as good (default 600).
    pub(super) watch_s: Option<u64>,
    /// A download that failed for the store's sake (unreachable, a timeout) is tried again
    /// after this many seconds (default 30).
    pub(super) retry_s: Option<u64>,
    /// The alert fraction a watched model may reach, as a multiple of the one before it
    /// (default 3).
    pub(super) max_alert_ratio: Option<f64>,
    /// …and never breaches below this fraction of frames alerting (default 0.1).
    pub(super) min_alert_fraction: Option<f64>,
    /// Frames inspected before the alert rule judges (default 50).
    pub(super) min_frames: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawHttp {
    /// Serve `/metrics` and `/healthz` (default true).
    pub(super) enabled: Option<bool>,
    /// `host:port`; default `127.0.0.1:9610` (loopback: expose it deliberately).
    pub(super) listen: Option<String>,
    /// The token the review page's writes (labels, controls) must carry: inline, from a
    /// file, or a systemd credential. Without one the page is read-only.
    pub(super) token: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) token_credential: Option<String>,
    /// How far back the review page lists alerts and events (hours, default 24).
    pub(super) review_hours: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawEvents {
    /// Publish `<camera>/events` (new / update / end per defect episode; default true).
    pub(super) enabled: Option<bool>,
    /// Consecutive anomalous frames that open an event (default 2).
    pub(super) open_frames: Option<u32>,
    /// Time without an anomalous frame that closes it (default 5000).
    pub(super) close_after_ms: Option<u64>,
    /// Keep the per-frame `<camera>/anomaly` alerts (default true).
    pub(super) frame_alerts: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawHomeAssistant {
    /// Publish MQTT discovery configs (default true).
    pub(super) enabled: Option<bool>,
    /// Home Assistant's discovery prefix (default `homeassistant`).
    pub(super) discovery_prefix: Option<String>,
}

/// Every section as read, before validation.
pub(super) struct RawConfig {
    pub(super) node: RawNode,
    pub(super) model: RawModel,
    pub(super) runtime: RuntimeConfig,
    pub(super) pipeline: RawPipeline,
    pub(super) mqtt: RawMqtt,
    pub(super) recorder: RawRecorder,
    pub(super) http: RawHttp,
    pub(super) upload: RawUpload,
    pub(super) fleet: RawFleet,
    pub(super) events: RawEvents,
    pub(super) homeassistant: RawHomeAssistant,
    pub(super) cameras: Vec<RawCamera>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawCamera {
    pub(super) id: Option<String>,
    pub(super) enabled: Option<bool>,
    pub(super) source: Option<String>,
    // replay
    pub(super) path: Option<String>,
    pub(super) fps: Option<f64>,
    #[serde(rename = "loop")]
    pub(super) repeat: Option<bool>,
    // camera
    pub(super) device: Option<String>,
    pub(super) width: Option<u32>,
    pub(super) height: Option<u32>,
    pub(super) pixel_format: Option<String>,
    // gstreamer
    pub(super) uri: Option<String>,
    pub(super) pipeline: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) password_credential: Option<String>,
    pub(super) buffers: Option<usize>,
    // genicam
    pub(super) exposure_us: Option<f64>,
    pub(super) gain_db: Option<f64>,
    pub(super) region: Option<Vec<u32>>,
    pub(super) features: Option<std::collections::BTreeMap<String, RawFeature>>,
    pub(super) trigger_source: Option<String>,
    // all
    pub(super) model: Option<PathBuf>,
    pub(super) sensitivity: Option<f64>,
    pub(super) roi: Option<Vec<u32>>,
    pub(super) mask: Option<PathBuf>,
    pub(super) max_frame_pixels: Option<u64>,
    pub(super) stall_timeout_ms: Option<u64>,
    pub(super) backoff_initial_ms: Option<u64>,
    pub(super) backoff_max_ms: Option<u64>,
    pub(super) trigger: Option<String>,
    pub(super) trigger_timeout_ms: Option<u64>,
    pub(super) verdict_timeout_ms: Option<u64>,
}

/// A GenICam feature value as TOML gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
#[cfg_attr(not(feature = "genicam"), allow(dead_code))] // read only where GenICam is built
pub(super) enum RawFeature {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}
