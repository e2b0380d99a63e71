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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::infer::runtime::RuntimeConfig;
use crate::model::sampling::Sampler;

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

// ---------------------------------------------------------------------------------------
// Raw structs: what the file may say. Defaults live here; checks live in `validate`.

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawNode {
    id: Option<String>,
    state_dir: Option<PathBuf>,
    /// Stop draining in-flight frames after this long on shutdown.
    drain_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawModel {
    path: Option<PathBuf>,
    /// Where `<node>/model/set` looks bundles up by name (default: `path`'s directory).
    models_dir: Option<PathBuf>,
    t0: Option<usize>,
    steps: Option<usize>,
    sampler: Option<Sampler>,
    eta: Option<f64>,
    seed: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPipeline {
    max_batch: Option<usize>,
    max_wait_ms: Option<u64>,
    queue_capacity: Option<usize>,
    /// Frames waiting for the publisher / recorder before new ones are dropped.
    output_capacity: Option<usize>,
    /// The longest a pipeline stage may go without progress before the daemon counts it
    /// as stuck (watchdog pings stop, the daemon stops with exit 70).
    stage_timeout_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTls {
    ca_file: Option<PathBuf>,
    client_cert_file: Option<PathBuf>,
    client_key_file: Option<PathBuf>,
    client_key_credential: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawMqtt {
    enabled: Option<bool>,
    host: Option<String>,
    port: Option<i64>,
    client_id: Option<String>,
    topic_prefix: Option<String>,
    keep_alive_s: Option<u64>,
    stats_interval_s: Option<u64>,
    max_packet_bytes: Option<usize>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
    password_credential: Option<String>,
    tls: Option<RawTls>,
    embedded_broker: Option<bool>,
    publish_images: Option<bool>,
    /// Take operator commands (`<camera>/label/set`; default true).
    commands: Option<bool>,
    snapshot_quality: Option<u8>,
    image_max_width: Option<u32>,
    reconnect_max_s: Option<u64>,
    outbox_max_bytes: Option<u64>,
    outbox_max_age_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRecorder {
    enabled: Option<bool>,
    dir: Option<PathBuf>,
    normal_sample_rate: Option<f64>,
    max_bytes: Option<u64>,
    max_age_days: Option<f64>,
    max_side: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawHttp {
    /// Serve `/metrics` and `/healthz` (default true).
    enabled: Option<bool>,
    /// `host:port`; default `127.0.0.1:9610` (loopback: expose it deliberately).
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawEvents {
    /// Publish `<camera>/events` (new / update / end per defect episode; default true).
    enabled: Option<bool>,
    /// Consecutive anomalous frames that open an event (default 2).
    open_frames: Option<u32>,
    /// Time without an anomalous frame that closes it (default 5000).
    close_after_ms: Option<u64>,
    /// Keep the per-frame `<camera>/anomaly` alerts (default true).
    frame_alerts: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawHomeAssistant {
    /// Publish MQTT discovery configs (default true).
    enabled: Option<bool>,
    /// Home Assistant's discovery prefix (default `homeassistant`).
    discovery_prefix: Option<String>,
}

/// Every section as read, before validation.
struct RawConfig {
    node: RawNode,
    model: RawModel,
    runtime: RuntimeConfig,
    pipeline: RawPipeline,
    mqtt: RawMqtt,
    recorder: RawRecorder,
    http: RawHttp,
    events: RawEvents,
    homeassistant: RawHomeAssistant,
    cameras: Vec<RawCamera>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawCamera {
    id: Option<String>,
    enabled: Option<bool>,
    source: Option<String>,
    // replay
    path: Option<String>,
    fps: Option<f64>,
    #[serde(rename = "loop")]
    repeat: Option<bool>,
    // camera
    device: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    pixel_format: Option<String>,
    // both
    model: Option<PathBuf>,
    sensitivity: Option<f64>,
    roi: Option<Vec<u32>>,
    stall_timeout_ms: Option<u64>,
    backoff_initial_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
}

// ---------------------------------------------------------------------------------------
// Validated config.

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
        let overrides = |m: &ModelConfig| (m.t0, m.steps, m.sampler, m.eta, m.seed, m.models_dir.clone());
        vec![
            ("node", node(self) != node(other)),
            ("model overrides", overrides(&self.model) != overrides(&other.model)),
            ("runtime", self.runtime != other.runtime),
            ("pipeline", self.pipeline != other.pipeline),
            ("mqtt", self.mqtt != other.mqtt),
            ("recorder", self.recorder != other.recorder),
            ("http", self.http != other.http),
            ("events", self.events != other.events),
            ("homeassistant", self.homeassistant != other.homeassistant),
            ("cameras", self.cameras != other.cameras),
        ]
    }
}

/// The monitoring endpoint (`/metrics`, `/healthz`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConfig {
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
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
    pub keep_alive: Duration,
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

use crate::capture::{CameraConfig, SourceConfig};

// ---------------------------------------------------------------------------------------
// Loading.

/// Reads `path` (TOML) overlaid by the environment, and validates it.
pub fn load(path: &Path) -> Result<DaemonConfig, ConfigErrors> {
    let vars: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(path, &vars)
}

/// [`load`] with an explicit environment (tests).
pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<DaemonConfig, ConfigErrors> {
    let errors = |issues| ConfigErrors { source_name: path.display().to_string(), issues };
    if !path.is_file() {
        return Err(errors(vec![ConfigIssue { key: "--config".into(), message: "file not found".into() }]));
    }
    let overrides: config::Map<String, String> = env.iter().cloned().collect();
    let merged = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        )
        .build()
        .map_err(|e| errors(vec![ConfigIssue { key: "(file)".into(), message: e.to_string() }]))?;
    let table: BTreeMap<String, config::Value> = merged
        .try_deserialize()
        .map_err(|e| errors(vec![ConfigIssue { key: "(root)".into(), message: e.to_string() }]))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let credentials = env.iter().find(|(k, _)| k == "CREDENTIALS_DIRECTORY").map(|(_, v)| PathBuf::from(v));
    from_table(table, base, credentials).map_err(errors)
}

/// Deserialises one section, recording unknown keys and type errors under `section`.
fn section<T: DeserializeOwned + Default>(
    table: &mut BTreeMap<String, config::Value>,
    name: &str,
    issues: &mut Vec<ConfigIssue>,
) -> T {
    let Some(value) = table.remove(name) else {
        return T::default();
    };
    parse(value, name, issues).unwrap_or_default()
}

fn parse<T: DeserializeOwned>(value: config::Value, key: &str, issues: &mut Vec<ConfigIssue>) -> Option<T> {
    let mut unknown = Vec::new();
    let result = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()));
    for path in unknown {
        issues.push(ConfigIssue { key: format!("{key}.{path}"), message: "unknown key".into() });
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            issues.push(config_error_issue(key, e));
            None
        }
    }
}

/// Turns a `config` error into an issue whose key is the full path.
fn config_error_issue(prefix: &str, error: config::ConfigError) -> ConfigIssue {
    let join = |key: Option<String>| match key {
        Some(k) if !k.is_empty() => format!("{prefix}.{k}"),
        _ => prefix.to_string(),
    };
    match error {
        config::ConfigError::Type { unexpected, expected, key, .. } => {
            ConfigIssue { key: join(key), message: format!("invalid type: {unexpected}, expected {expected}") }
        }
        config::ConfigError::At { error, key, .. } => ConfigIssue { key: join(key), message: error.to_string() },
        other => ConfigIssue { key: prefix.to_string(), message: other.to_string() },
    }
}

const SECTIONS: [&str; 10] =
    ["node", "model", "runtime", "pipeline", "mqtt", "recorder", "http", "events", "homeassistant", "cameras"];

fn from_table(
    mut table: BTreeMap<String, config::Value>,
    base: &Path,
    credentials: Option<PathBuf>,
) -> Result<DaemonConfig, Vec<ConfigIssue>> {
    let mut issues = Vec::new();
    for key in table.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
        issues.push(ConfigIssue { key: key.clone(), message: "unknown section".into() });
    }
    let node: RawNode = section(&mut table, "node", &mut issues);
    let model: RawModel = section(&mut table, "model", &mut issues);
    let runtime: RuntimeConfig = section(&mut table, "runtime", &mut issues);
    let pipeline: RawPipeline = section(&mut table, "pipeline", &mut issues);
    let mqtt: RawMqtt = section(&mut table, "mqtt", &mut issues);
    let recorder: RawRecorder = section(&mut table, "recorder", &mut issues);
    let http: RawHttp = section(&mut table, "http", &mut issues);
    let events: RawEvents = section(&mut table, "events", &mut issues);
    let homeassistant: RawHomeAssistant = section(&mut table, "homeassistant", &mut issues);
    let cameras: Vec<config::Value> = match table.remove("cameras") {
        None => Vec::new(),
        Some(v) => parse(v, "cameras", &mut issues).unwrap_or_default(),
    };
    let cameras: Vec<RawCamera> =
        cameras.into_iter().enumerate().filter_map(|(i, v)| parse(v, &format!("cameras[{i}]"), &mut issues)).collect();
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let mut v = Validator { issues, credentials };
    let raw = RawConfig { node, model, runtime, pipeline, mqtt, recorder, http, events, homeassistant, cameras };
    let config = v.build(raw, &resolve);
    if v.issues.is_empty() { Ok(config) } else { Err(v.issues) }
}

/// The host name as a node id: `/proc/sys/kernel/hostname`, characters outside the id set
/// replaced by `-`; "default" where there is none.
fn host_name_id() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = name
        .trim()
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .collect();
    if id.is_empty() { "default".into() } else { id }
}

struct Validator {
    issues: Vec<ConfigIssue>,
    /// systemd's `$CREDENTIALS_DIRECTORY` (LoadCredential=).
    credentials: Option<PathBuf>,
}

impl Validator {
    fn fail(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.issues.push(ConfigIssue { key: key.into(), message: message.into() });
    }

    fn positive<T: PartialOrd + Default + std::fmt::Display + Copy>(&mut self, key: &str, value: T) -> T {
        if value <= T::default() {
            self.fail(key, format!("must be greater than 0, got {value}"));
        }
        value
    }

    /// A node or camera id: it becomes an MQTT topic level and a directory name, so only
    /// `A–Z a–z 0–9 _ -`, 1 to 64 characters (no `.`/`..`, separators or wildcards).
    fn identifier(&mut self, key: &str, value: &str) {
        let safe = !value.is_empty()
            && value.len() <= 64
            && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !safe {
            self.fail(key, format!("'{value}' is not an id: use 1–64 characters of A–Z a–z 0–9 _ -"));
        }
    }

    /// A number within `range`, else an issue naming it.
    fn within<T: PartialOrd + std::fmt::Display + Copy>(
        &mut self,
        key: &str,
        value: T,
        range: std::ops::RangeInclusive<T>,
    ) -> T {
        if !range.contains(&value) {
            self.fail(key, format!("must be in {}..={}, got {value}", range.start(), range.end()));
        }
        value
    }

    /// A secret from inline text, a file, or `$CREDENTIALS_DIRECTORY/<name>`.
    fn secret(
        &mut self,
        key: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
        credential: Option<String>,
    ) -> Option<String> {
        let given = [inline.is_some(), file.is_some(), credential.is_some()].iter().filter(|g| **g).count();
        if given > 1 {
            self.fail(key, "give only one of the inline value, the _file path and the _credential name");
            return None;
        }
        if let Some(v) = inline {
            return Some(v);
        }
        let path = match (file, credential) {
            (Some(f), _) => f,
            (None, Some(name)) => match &self.credentials {
                Some(dir) => dir.join(name),
                None => {
                    self.fail(
                        format!("{key}_credential"),
                        "CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)",
                    );
                    return None;
                }
            },
            (None, None) => return None,
        };
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => {
                self.fail(key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    fn build(&mut self, raw: RawConfig, resolve: &dyn Fn(PathBuf) -> PathBuf) -> DaemonConfig {
        let RawConfig { node, model, runtime, pipeline, mqtt, recorder, http, events, homeassistant, cameras } = raw;
        // Two nodes with the same id take each other's MQTT session over: without an id, the
        // host name is the id.
        let node_id = node.id.unwrap_or_else(host_name_id);
        self.identifier("node.id", &node_id);
        let state_dir = resolve(node.state_dir.unwrap_or_else(|| "/var/lib/edge-inspect".into()));
        let drain_ms = self.within("node.drain_timeout_ms", node.drain_timeout_ms.unwrap_or(5000), 1..=600_000);
        let drain_timeout = Duration::from_millis(drain_ms);

        let model_path = match model.path {
            None => {
                self.fail("model.path", "missing: the model bundle directory");
                PathBuf::new()
            }
            Some(p) => {
                let p = resolve(p);
                if !p.join(crate::model::manifest::MANIFEST_FILE).is_file() {
                    self.fail(
                        "model.path",
                        format!("{}: not a model bundle (no {})", p.display(), crate::model::manifest::MANIFEST_FILE),
                    );
                }
                p
            }
        };
        if let Some(eta) = model.eta
            && !(0.0..=1.0).contains(&eta)
        {
            self.fail("model.eta", format!("must be in [0, 1], got {eta}"));
        }
        let models_dir = model
            .models_dir
            .map(resolve)
            .unwrap_or_else(|| model_path.parent().map_or_else(|| PathBuf::from("."), |p| p.to_path_buf()));
        let model = ModelConfig {
            path: model_path,
            models_dir,
            t0: model.t0,
            steps: model.steps,
            sampler: model.sampler,
            eta: model.eta,
            seed: model.seed.unwrap_or(0),
        };
        if runtime.providers.is_empty() {
            self.fail("runtime.providers", "empty: list at least one of \"cuda\", \"tensorrt\", \"cpu\"");
        }
        if runtime.intra_threads == 0 {
            self.fail("runtime.intra_threads", "must be at least 1");
        }

        let pipeline = PipelineConfig {
            // Bounded: batches and queues are allocated; a queue of 10^12 frames is no bound.
            max_batch: self.within("pipeline.max_batch", pipeline.max_batch.unwrap_or(4), 1..=1024),
            max_wait: Duration::from_millis(self.within(
                "pipeline.max_wait_ms",
                pipeline.max_wait_ms.unwrap_or(50),
                0..=60_000,
            )),
            queue_capacity: self.within("pipeline.queue_capacity", pipeline.queue_capacity.unwrap_or(2), 1..=1024),
            output_capacity: self.within("pipeline.output_capacity", pipeline.output_capacity.unwrap_or(8), 1..=4096),
            // At least a second: stages show progress every half second when idle.
            stage_timeout: Duration::from_millis(self.within(
                "pipeline.stage_timeout_ms",
                pipeline.stage_timeout_ms.unwrap_or(60_000),
                1000..=3_600_000,
            )),
        };

        let port = mqtt.port.unwrap_or(1883);
        if !(1..=65535).contains(&port) {
            self.fail("mqtt.port", format!("must be in 1..=65535, got {port}"));
        }
        let topic_prefix = mqtt.topic_prefix.unwrap_or_else(|| "edge-inspect".into());
        if topic_prefix.is_empty() || topic_prefix.contains(['+', '#']) || topic_prefix.ends_with('/') {
            self.fail(
                "mqtt.topic_prefix",
                format!("'{topic_prefix}' must be non-empty, without + or # or a trailing /"),
            );
        }
        let password = self.secret("mqtt.password", mqtt.password, mqtt.password_file, mqtt.password_credential);
        let credentials = match (mqtt.username, password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(_), None) => {
                self.fail(
                    "mqtt.password",
                    "mqtt.username is set but no password (password_file or password_credential)",
                );
                None
            }
            (None, Some(_)) => {
                self.fail("mqtt.username", "a password is set but no username");
                None
            }
        };
        let tls = mqtt.tls.map(|t| {
            for (key, path) in [("mqtt.tls.ca_file", &t.ca_file), ("mqtt.tls.client_cert_file", &t.client_cert_file)] {
                if let Some(p) = path
                    && !p.is_file()
                {
                    self.fail(key, format!("{}: file not found", p.display()));
                }
            }
            let key_path = match (t.client_key_file, t.client_key_credential) {
                (Some(_), Some(_)) => {
                    self.fail("mqtt.tls.client_key_file", "give only one of client_key_file and client_key_credential");
                    None
                }
                (Some(f), None) => Some(f),
                (None, Some(name)) => match &self.credentials {
                    Some(dir) => Some(dir.join(name)),
                    None => {
                        self.fail(
                            "mqtt.tls.client_key_credential",
                            "CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)",
                        );
                        None
                    }
                },
                (None, None) => None,
            };
            if let Some(k) = &key_path
                && !k.is_file()
            {
                self.fail("mqtt.tls.client_key_file", format!("{}: file not found", k.display()));
            }
            let client_auth = match (t.client_cert_file, key_path) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                _ => {
                    self.fail("mqtt.tls", "a client certificate needs a client key and vice versa");
                    None
                }
            };
            TlsConfig { ca_file: t.ca_file, client_auth }
        });
        let embedded_broker = mqtt.embedded_broker.unwrap_or(false);
        if embedded_broker && !cfg!(feature = "embedded-broker") {
            self.fail("mqtt.embedded_broker", "this build has no embedded broker (cargo feature `embedded-broker`)");
        }
        let snapshot_quality = mqtt.snapshot_quality.unwrap_or(80);
        if !(1..=100).contains(&snapshot_quality) {
            self.fail("mqtt.snapshot_quality", format!("must be in 1..=100, got {snapshot_quality}"));
        }
        let mqtt = MqttConfig {
            enabled: mqtt.enabled.unwrap_or(true),
            host: mqtt.host.unwrap_or_else(|| "localhost".into()),
            port: port.clamp(1, 65535) as u16,
            client_id: mqtt.client_id.unwrap_or_else(|| format!("edge-inspect-{node_id}")),
            base_topic: format!("{topic_prefix}/{node_id}"),
            // MQTT carries the keep-alive in 16 bits.
            keep_alive: Duration::from_secs(self.within(
                "mqtt.keep_alive_s",
                mqtt.keep_alive_s.unwrap_or(30),
                1..=65_535,
            )),
            stats_interval: Duration::from_secs(self.within(
                "mqtt.stats_interval_s",
                mqtt.stats_interval_s.unwrap_or(15),
                1..=86_400,
            )),
            max_packet_bytes: self.positive("mqtt.max_packet_bytes", mqtt.max_packet_bytes.unwrap_or(8 << 20)),
            credentials,
            tls,
            embedded_broker,
            publish_images: mqtt.publish_images.unwrap_or(true),
            commands: mqtt.commands.unwrap_or(true),
            image_max_width: self.within("mqtt.image_max_width", mqtt.image_max_width.unwrap_or(1920), 64..=16_384),
            snapshot_quality,
            // A broker back after an outage is found within this: keep it short.
            reconnect_max: Duration::from_secs(self.within(
                "mqtt.reconnect_max_s",
                mqtt.reconnect_max_s.unwrap_or(2),
                1..=300,
            )),
            outbox_dir: state_dir.join("outbox"),
            outbox_max_bytes: self.within(
                "mqtt.outbox_max_bytes",
                mqtt.outbox_max_bytes.unwrap_or(256 << 20),
                1 << 16..=1 << 40,
            ),
            outbox_max_age: Duration::from_secs(self.within(
                "mqtt.outbox_max_age_s",
                mqtt.outbox_max_age_s.unwrap_or(7 * 86_400),
                1..=365 * 86_400,
            )),
        };

        let sample_rate = recorder.normal_sample_rate.unwrap_or(0.01);
        if !(0.0..=1.0).contains(&sample_rate) {
            self.fail("recorder.normal_sample_rate", format!("must be in [0, 1], got {sample_rate}"));
        }
        let max_age_days = recorder.max_age_days.unwrap_or(30.0);
        if !(max_age_days > 0.0 && max_age_days <= 36_500.0) {
            self.fail("recorder.max_age_days", format!("must be in (0, 36500], got {max_age_days}"));
        }
        let max_side = self.within("recorder.max_side", recorder.max_side.unwrap_or(4096), 64..=16_384);
        let recorder = RecorderConfig {
            enabled: recorder.enabled.unwrap_or(true),
            dir: recorder
                .dir
                .map_or_else(|| state_dir.join("captures"), |d| if d.is_absolute() { d } else { state_dir.join(d) }),
            normal_sample_rate: sample_rate,
            max_bytes: self.positive("recorder.max_bytes", recorder.max_bytes.unwrap_or(1 << 30)),
            // An invalid value was reported above; any in-range stand-in keeps this from panicking.
            max_age: Duration::from_secs_f64(
                if max_age_days.is_finite() { max_age_days.clamp(0.0, 36_500.0) } else { 30.0 } * 86_400.0,
            ),
            max_side,
        };

        if cameras.is_empty() {
            self.fail("cameras", "no cameras configured (add a [[cameras]] table)");
        }
        let mut ids = BTreeSet::new();
        let cameras =
            cameras.into_iter().enumerate().filter_map(|(i, c)| self.camera(i, c, &mut ids, resolve)).collect();
        let (http, events, homeassistant) = (self.http(http), self.events(events), self.homeassistant(homeassistant));
        DaemonConfig {
            node_id,
            state_dir,
            drain_timeout,
            model,
            runtime,
            pipeline,
            mqtt,
            recorder,
            http,
            events,
            homeassistant,
            cameras,
        }
    }

    fn http(&mut self, http: RawHttp) -> HttpConfig {
        let listen = http.listen.unwrap_or_else(|| "127.0.0.1:9610".into());
        HttpConfig {
            enabled: http.enabled.unwrap_or(true),
            listen: listen.parse().unwrap_or_else(|e| {
                self.fail("http.listen", format!("not a host:port address ({e}): {listen:?}"));
                std::net::SocketAddr::from(([127, 0, 0, 1], 9610))
            }),
        }
    }

    fn events(&mut self, events: RawEvents) -> EventsConfig {
        EventsConfig {
            enabled: events.enabled.unwrap_or(true),
            open_frames: self.within("events.open_frames", events.open_frames.unwrap_or(2), 1..=10_000),
            close_after: Duration::from_millis(self.within(
                "events.close_after_ms",
                events.close_after_ms.unwrap_or(5000),
                0..=86_400_000,
            )),
            frame_alerts: events.frame_alerts.unwrap_or(true),
        }
    }

    fn homeassistant(&mut self, homeassistant: RawHomeAssistant) -> HomeAssistantConfig {
        let discovery_prefix = homeassistant.discovery_prefix.unwrap_or_else(|| "homeassistant".into());
        let topic_safe =
            !discovery_prefix.contains(['+', '#', '\0']) && discovery_prefix.split('/').all(|level| !level.is_empty());
        if !topic_safe {
            self.fail("homeassistant.discovery_prefix", format!("not a topic prefix: {discovery_prefix:?}"));
        }
        HomeAssistantConfig { enabled: homeassistant.enabled.unwrap_or(true), discovery_prefix }
    }

    fn camera(
        &mut self,
        i: usize,
        c: RawCamera,
        ids: &mut BTreeSet<String>,
        resolve: &dyn Fn(PathBuf) -> PathBuf,
    ) -> Option<CameraConfig> {
        let key = |field: &str| format!("cameras[{i}].{field}");
        let id = match c.id.clone() {
            Some(id) => id,
            None => {
                self.fail(key("id"), "missing");
                return None;
            }
        };
        self.identifier(&key("id"), &id);
        if !ids.insert(id.clone()) {
            self.fail(key("id"), format!("'{id}' is used by another camera"));
        }
        let model = c.model.clone().map(resolve);
        if let Some(m) = &model
            && !m.join(crate::model::manifest::MANIFEST_FILE).is_file()
        {
            let file = crate::model::manifest::MANIFEST_FILE;
            self.fail(key("model"), format!("{}: not a model bundle (no {file})", m.display()));
        }
        let roi = c.roi.clone().and_then(|r| match r[..] {
            [x, y, w, h] if w > 0 && h > 0 => Some([x, y, w, h]),
            _ => {
                self.fail(key("roi"), format!("must be [x, y, width, height] with width, height > 0, got {r:?}"));
                None
            }
        });
        let source = match c.source.as_deref() {
            Some("replay") => {
                let Some(path) = c.path else {
                    self.fail(key("path"), "missing: a folder of images or a glob pattern");
                    return None;
                };
                let path = resolve(PathBuf::from(path)).display().to_string();
                if !path.contains(['*', '?', '[']) && !Path::new(&path).is_dir() {
                    self.fail(key("path"), format!("{path}: folder not found"));
                }
                // Bounded both ways: 1e-20 fps is a pacing interval no clock can hold.
                let fps = self.within(&key("fps"), c.fps.unwrap_or(5.0), 0.001..=1000.0);
                SourceConfig::Replay { path, fps, repeat: c.repeat.unwrap_or(true) }
            }
            Some("camera") => self.camera_source(&key, &c)?,
            Some(other) => {
                self.fail(key("source"), format!("'{other}' is not a source type (replay, camera)"));
                return None;
            }
            None => {
                self.fail(key("source"), "missing: replay or camera");
                return None;
            }
        };
        let hour_ms = 3_600_000;
        let backoff_initial = Duration::from_millis(self.within(
            &key("backoff_initial_ms"),
            c.backoff_initial_ms.unwrap_or(500),
            1..=hour_ms,
        ));
        let backoff_max =
            Duration::from_millis(self.within(&key("backoff_max_ms"), c.backoff_max_ms.unwrap_or(30_000), 1..=hour_ms));
        if backoff_max < backoff_initial {
            self.fail(key("backoff_max_ms"), "must not be below backoff_initial_ms");
        }
        Some(CameraConfig {
            id,
            enabled: c.enabled.unwrap_or(true),
            source,
            model,
            sensitivity: self.within(&key("sensitivity"), c.sensitivity.unwrap_or(1.0), crate::controls::SENSITIVITY),
            roi,
            stall_timeout: Duration::from_millis(self.within(
                &key("stall_timeout_ms"),
                c.stall_timeout_ms.unwrap_or(10_000),
                1..=hour_ms,
            )),
            backoff_initial,
            backoff_max,
        })
    }

    #[cfg(feature = "camera")]
    fn camera_source(&mut self, key: &dyn Fn(&str) -> String, c: &RawCamera) -> Option<SourceConfig> {
        use crate::capture::camera::{CameraSettings, PixelFormat};
        let pixel_format = match c.pixel_format.as_deref().unwrap_or("mjpeg") {
            "mjpeg" => PixelFormat::Mjpeg,
            "yuyv" => PixelFormat::Yuyv,
            "nv12" => PixelFormat::Nv12,
            "gray" => PixelFormat::Gray,
            "rgb" => PixelFormat::Rgb,
            other => {
                self.fail(key("pixel_format"), format!("'{other}' is not one of mjpeg, yuyv, nv12, gray, rgb"));
                return None;
            }
        };
        let fps = c.fps.unwrap_or(15.0);
        if !(fps >= 1.0 && fps.fract() == 0.0) {
            self.fail(key("fps"), format!("a camera's fps must be a whole number >= 1, got {fps}"));
        }
        Some(SourceConfig::Camera(CameraSettings {
            device: c.device.clone().unwrap_or_else(|| "0".into()),
            width: self.positive(&key("width"), c.width.unwrap_or(1280)),
            height: self.positive(&key("height"), c.height.unwrap_or(720)),
            fps: fps.max(1.0) as u32,
            pixel_format,
        }))
    }

    #[cfg(not(feature = "camera"))]
    fn camera_source(&mut self, key: &dyn Fn(&str) -> String, _: &RawCamera) -> Option<SourceConfig> {
        self.fail(key("source"), "this build has no camera support (cargo feature `camera`)");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::write(model.join(crate::model::manifest::MANIFEST_FILE), "").unwrap();
        let frames = dir.join("frames");
        std::fs::create_dir_all(&frames).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const MINIMAL: &str =
        "[model]\npath = \"model\"\n[[cameras]]\nid = \"c\"\nsource = \"replay\"\npath = \"frames\"\n";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_relative_paths_and_environment_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), MINIMAL);
        let c = load_with_env(&path, &[]).unwrap();
        assert_eq!(c.model.path, dir.path().join("model"));
        // Without node.id the host name is the id.
        assert_eq!((c.mqtt.port, c.mqtt.base_topic), (1883, format!("edge-inspect/{}", host_name_id())));
        assert_ne!(host_name_id(), "");
        assert_eq!(c.pipeline.queue_capacity, 2);
        assert_eq!(c.recorder.dir, PathBuf::from("/var/lib/edge-inspect/captures"));
        let c = load_with_env(
            &path,
            &env(&[("EDGE_INSPECT__MQTT__PORT", "1884"), ("EDGE_INSPECT__NODE__ID", "line2"), ("OTHER__X", "1")]),
        )
        .unwrap();
        assert_eq!((c.mqtt.port, c.mqtt.base_topic.as_str()), (1884, "edge-inspect/line2"));
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{MINIMAL}[pipeline]\nmax_batch = 0\nmax_wait_ms = \"soon\"\n[mqtt]\nport = 0\nusername = \"u\"\n\
             [mqtt.tls]\nca_file = \"/no/ca.pem\"\n[recorder]\nnormal_sample_rate = 2.0\nsize = 3\n[http]\nlisten = \"nowhere\"\n\
             [[cameras]]\nid = \"c\"\nsource = \"usb\"\nroi = [1, 2]\n"
        );
        let path = write(dir.path(), &text);
        let errors = load_with_env(&path, &[]).unwrap_err();
        let keys: Vec<&str> = errors.issues.iter().map(|i| i.key.as_str()).collect();
        for expected in [
            "pipeline.max_wait_ms",
            "mqtt.port",
            "mqtt.password",
            "mqtt.tls.ca_file",
            "recorder.normal_sample_rate",
            "recorder.size",
            "http.listen",
            "cameras[1].id",
            "cameras[1].roi",
            "cameras[1].source",
        ] {
            assert!(keys.contains(&expected), "no issue for {expected}: {errors}");
        }
        // A type error in a section does not hide the other sections' problems.
        assert!(errors.to_string().contains("invalid type"), "{errors}");
    }

    #[test]
    fn secrets_come_from_files_and_systemd_credentials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        let creds = dir.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("mqtt-password"), "from-systemd").unwrap();
        let file = write(
            dir.path(),
            &format!("{MINIMAL}[mqtt]\nusername = \"u\"\npassword_file = \"{}\"\n", dir.path().join("pw").display()),
        );
        let c = load_with_env(&file, &[]).unwrap();
        assert_eq!(c.mqtt.credentials, Some(("u".into(), "s3cret".into())));
        assert!(!format!("{:?}", c.mqtt).contains("s3cret"), "passwords stay out of debug output");
        let cred =
            write(dir.path(), &format!("{MINIMAL}[mqtt]\nusername = \"u\"\npassword_credential = \"mqtt-password\"\n"));
        let c = load_with_env(&cred, &env(&[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())])).unwrap();
        assert_eq!(c.mqtt.credentials, Some(("u".into(), "from-systemd".into())));
        let e = load_with_env(&cred, &[]).unwrap_err().to_string();
        assert!(e.contains("mqtt.password_credential") && e.contains("CREDENTIALS_DIRECTORY"), "{e}");
    }
}
