//! The daemon's configuration: a TOML file overlaid by `EDGE_INSPECT__SECTION__KEY`
//! environment variables (through the `config` crate), read into raw serde structs and
//! converted once into a validated [`DaemonConfig`].
//!
//! Every problem is collected, not just the first: each section is deserialised on its
//! own, unknown keys are found with `serde_ignored`, and validation checks every value;
//! each [`ConfigIssue`] names its key path. `check-config` prints them and `run` refuses to
//! start (exit 78, `EX_CONFIG`) before touching a camera, a broker or a model.
//! Secrets (MQTT password, TLS client key) come from a file or from systemd's
//! `$CREDENTIALS_DIRECTORY`, so that no secret has to sit in the file; an inline password is
//! accepted as well (tests, demos).

use std::path::PathBuf;
use std::time::Duration;

use crate::capture::CameraConfig;
use crate::infer::runtime::RuntimeConfig;
use crate::model::sampling::Sampler;
use crate::postprocess::screen::ScreenChoice;

/// Default config file location (systemd's `ConfigurationDirectory=edge-inspect`).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/edge-inspect/edge-inspect.toml";
/// Prefix of environment overrides: `EDGE_INSPECT__MQTT__PORT=1884`.
pub const ENV_PREFIX: &str = "EDGE_INSPECT";
/// `sysexits.h` EX_CONFIG: what an invalid configuration exits with.
pub const EXIT_CONFIG: u8 = 78;

/// One configuration problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// All problems found in a configuration, with where it came from.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {} configuration error(s):\n{}", issues.len(), issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors {
    pub source_name: String,
    pub issues: Vec<ConfigIssue>,
}

mod load;
mod raw;
#[cfg(test)]
mod tests;
mod validate;

pub use load::{load, load_with_env};

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub node_id: String,
    pub state_dir: PathBuf,
    pub drain_timeout: Duration,
    pub model: ModelConfig,
    pub runtime: RuntimeConfig,
    pub pipeline: PipelineConfig,
    pub mqtt: MqttConfig,
    pub recorder: RecorderConfig,
    pub http: HttpConfig,
    pub upload: UploadConfig,
    pub fleet: FleetConfig,
    pub events: EventsConfig,
    pub homeassistant: HomeAssistantConfig,
    pub cameras: Vec<CameraConfig>,
}

/// Home Assistant MQTT discovery.
#[derive(Debug, Clone, PartialEq)]
pub struct HomeAssistantConfig {
    pub enabled: bool,
    pub discovery_prefix: String,
}

/// Defect episodes on `<camera>/events`, and whether per-frame alerts go out too.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsConfig {
    pub enabled: bool,
    pub open_frames: u32,
    pub close_after: Duration,
    pub frame_alerts: bool,
}

impl DaemonConfig {
    /// Each section other than the model's, and whether `other` differs in it (what a
    /// SIGHUP cannot apply live).
    pub fn differences(&self, other: &DaemonConfig) -> Vec<(&'static str, bool)> {
        let node = |c: &DaemonConfig| (c.node_id.clone(), c.state_dir.clone(), c.drain_timeout);
        let overrides =
            |m: &ModelConfig| (m.t0, m.steps, m.sampler, m.eta, m.seed, m.screen_recall, m.models_dir.clone());
        vec![
            ("node", node(self) != node(other)),
            ("model overrides", overrides(&self.model) != overrides(&other.model)),
            ("runtime", self.runtime != other.runtime),
            ("pipeline", self.pipeline != other.pipeline),
            ("mqtt", self.mqtt != other.mqtt),
            ("recorder", self.recorder != other.recorder),
            ("http", self.http != other.http),
            ("upload", self.upload != other.upload),
            ("fleet", self.fleet != other.fleet),
            ("events", self.events != other.events),
            ("homeassistant", self.homeassistant != other.homeassistant),
            ("cameras", self.cameras != other.cameras),
        ]
    }
}

/// Shipping the capture store to an S3-compatible object store (`daemon::upload`).
#[derive(Clone, PartialEq)]
pub struct UploadConfig {
    pub enabled: bool,
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub prefix: String,
    /// Access key id and secret; `None`: unsigned requests (a server that allows them).
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for UploadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadConfig")
            .field("enabled", &self.enabled)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.credentials.as_ref().map(|c| &c.0))
            .field("secret_access_key", &self.credentials.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Following the fleet's model rollouts (`daemon::fleet`), and the rules that roll a
/// watched model back.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    pub enabled: bool,
    pub watch: Duration,
    /// A download that failed for the store's sake is tried again after this.
    pub retry: Duration,
    pub max_alert_ratio: f64,
    pub min_alert_fraction: f64,
    pub min_frames: u64,
}

/// The HTTP endpoint: monitoring (`/metrics`, `/healthz`) and the review page.
#[derive(Clone, PartialEq)]
pub struct HttpConfig {
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
    /// What the review page's writes must carry; `None`: the page is read-only.
    pub token: Option<String>,
    /// How far back the review page lists alerts and events.
    pub review_window: Duration,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("review_window", &self.review_window)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub path: PathBuf,
    /// Bundles `<node>/model/set` may name.
    pub models_dir: PathBuf,
    pub t0: Option<usize>,
    pub steps: Option<usize>,
    pub sampler: Option<Sampler>,
    pub eta: Option<f64>,
    pub seed: u64,
    /// Which of each bundle's cascade screens runs (a recall must be on every bundle's
    /// `screen_curve`).
    pub screen_recall: ScreenChoice,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue_capacity: usize,
    pub output_capacity: usize,
    /// A pipeline stage without progress for this long is stuck.
    pub stage_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (mutual TLS).
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

#[derive(Clone, PartialEq)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// `<topic_prefix>/<node>`: every topic starts with this.
    pub base_topic: String,
    /// What the nodes of a fleet share (`<topic_prefix>/fleet/…`).
    pub topic_prefix: String,
    pub keep_alive: Duration,
    /// How long the broker keeps the node's session (subscriptions, queued commands) while
    /// it is away.
    pub session_expiry: Duration,
    pub stats_interval: Duration,
    pub max_packet_bytes: usize,
    pub credentials: Option<(String, String)>,
    pub tls: Option<TlsConfig>,
    pub embedded_broker: bool,
    pub publish_images: bool,
    /// Subscribe to the command topics.
    pub commands: bool,
    pub snapshot_quality: u8,
    /// Masks and snapshots wider than this are scaled down (the payload states the scale).
    pub image_max_width: u32,
    pub reconnect_max: Duration,
    /// Undelivered alerts and masks: `<state_dir>/outbox`, bounded in bytes and age.
    pub outbox_dir: PathBuf,
    pub outbox_max_bytes: u64,
    pub outbox_max_age: Duration,
}

impl std::fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("client_id", &self.client_id)
            .field("base_topic", &self.base_topic)
            .field("topic_prefix", &self.topic_prefix)
            .field("username", &self.credentials.as_ref().map(|c| &c.0))
            .field("password", &self.credentials.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecorderConfig {
    pub enabled: bool,
    pub dir: PathBuf,
    pub normal_sample_rate: f64,
    pub max_bytes: u64,
    pub max_age: Duration,
    /// Recorded frames larger than this (width or height) are scaled down to it.
    pub max_side: u32,
    /// The recorder pauses while its filesystem has less than this free (and never takes
    /// the outbox's `mqtt.outbox_max_bytes` where they share a filesystem).
    pub min_free_bytes: u64,
}

/// The recorder's bounds: what a reload may change while it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecorderLimits {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub max_side: u32,
}

impl RecorderConfig {
    pub fn limits(&self) -> RecorderLimits {
        RecorderLimits { max_bytes: self.max_bytes, max_age: self.max_age, max_side: self.max_side }
    }

    pub fn set_limits(&mut self, l: RecorderLimits) {
        (self.max_bytes, self.max_age, self.max_side) = (l.max_bytes, l.max_age, l.max_side);
    }
}
