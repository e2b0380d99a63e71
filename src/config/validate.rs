//! From raw sections to a [`DaemonConfig`]: defaults applied, every value checked, one
//! method per section, each problem recorded with its key path instead of stopping at the
//! first.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::*;
use super::*;

/// A frame larger than this (32 MP: a 5 MP line camera six times over) is not decoded unless
/// a camera's `max_frame_pixels` says so.
const DEFAULT_MAX_FRAME_PIXELS: u64 = 32_000_000;
use crate::capture::SourceConfig;
use crate::capture::mask::InspectMask;
use crate::capture::trigger::TriggerMode;
use crate::infer::batch_size::{MAX_TILE_BATCH, TileBatch};

pub(super) struct Validator {
    pub(super) issues: Vec<ConfigIssue>,
    /// systemd's `$CREDENTIALS_DIRECTORY` (LoadCredential=).
    pub(super) credentials: Option<PathBuf>,
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

    pub(super) fn build(&mut self, raw: RawConfig, resolve: &dyn Fn(PathBuf) -> PathBuf) -> DaemonConfig {
        let RawConfig {
            node,
            model,
            runtime,
            pipeline,
            mqtt,
            recorder,
            http,
            upload,
            fleet,
            events,
            homeassistant,
            cameras,
        } = raw;
        let (node_id, state_dir, drain_timeout) = self.node(node, resolve);
        let model = self.model(model, resolve);
        self.runtime(&runtime);
        let pipeline = self.pipeline(pipeline);
        let mqtt = self.mqtt(mqtt, &node_id, &state_dir);
        let recorder = self.recorder(recorder, &state_dir);
        let cameras = self.cameras(cameras, resolve);
        for (i, camera) in cameras.iter().enumerate() {
            let key = || format!("cameras[{i}].trigger");
            match camera.trigger {
                TriggerMode::Free => {}
                TriggerMode::Mqtt { .. } if !(mqtt.enabled && mqtt.commands) => self
                    .fail(key(), "\"mqtt\" needs [mqtt] enabled = true and commands = true: the triggers are commands"),
                TriggerMode::Camera { .. } if !mqtt.enabled => {
                    self.fail(key(), "\"camera\" needs [mqtt] enabled = true: the verdicts go there")
                }
                TriggerMode::Mqtt { .. } | TriggerMode::Camera { .. } => {}
            }
        }
        let (http, events, homeassistant) = (self.http(http), self.events(events), self.homeassistant(homeassistant));
        let upload = self.upload(upload);
        if upload.enabled && !recorder.enabled {
            self.fail("upload.enabled", "needs [recorder] enabled = true: what is uploaded is the capture store");
        }
        let fleet = self.fleet(fleet, &mqtt, &upload);
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
            upload,
            fleet,
            events,
            homeassistant,
            cameras,
        }
    }

    /// `[fleet]`: rollouts come over MQTT and bundles through `[upload]`'s connection.
    fn fleet(&mut self, fleet: RawFleet, mqtt: &MqttConfig, upload: &UploadConfig) -> FleetConfig {
        let enabled = fleet.enabled.unwrap_or(false);
        if enabled && !mqtt.enabled {
            self.fail("fleet.enabled", "needs [mqtt] enabled = true: rollouts arrive there");
        }
        let endpoint = &upload.endpoint;
        if enabled && !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            self.fail(
                "fleet.enabled",
                format!(
                    "needs [upload] endpoint (an http:// or https:// URL, got {endpoint:?}): bundles come from there"
                ),
            );
        }
        FleetConfig {
            enabled,
            watch: Duration::from_secs(self.within("fleet.watch_s", fleet.watch_s.unwrap_or(600), 0..=86_400)),
            retry: Duration::from_secs(self.within("fleet.retry_s", fleet.retry_s.unwrap_or(30), 1..=3600)),
            max_alert_ratio: self.within("fleet.max_alert_ratio", fleet.max_alert_ratio.unwrap_or(3.0), 1.0..=1000.0),
            min_alert_fraction: self.within(
                "fleet.min_alert_fraction",
                fleet.min_alert_fraction.unwrap_or(0.1),
                0.0..=1.0,
            ),
            min_frames: self.within("fleet.min_frames", fleet.min_frames.unwrap_or(50), 1..=1_000_000),
        }
    }

    /// `[node]`: the id, the state directory and the drain timeout.
    fn node(&mut self, node: RawNode, resolve: &dyn Fn(PathBuf) -> PathBuf) -> (String, PathBuf, Duration) {
        // Two nodes with the same id take each other's MQTT session over: without an id, the
        // host name is the id.
        let node_id = node.id.unwrap_or_else(host_name_id);
        self.identifier("node.id", &node_id);
        if node_id == crate::fleet::FLEET_LEVEL {
            // `<prefix>/fleet/model` is the rollout message: a node of that id would answer it.
            self.fail("node.id", format!("'{node_id}' is reserved for the fleet's topics (<prefix>/fleet/…)"));
        }
        let state_dir = resolve(node.state_dir.unwrap_or_else(|| "/var/lib/edge-inspect".into()));
        // Created at start when missing; a file there would fail every write (a restart loop).
        if state_dir.exists() && !state_dir.is_dir() {
            self.fail("node.state_dir", format!("{}: exists and is not a directory", state_dir.display()));
        }
        let drain_ms = self.within("node.drain_timeout_ms", node.drain_timeout_ms.unwrap_or(5000), 1..=600_000);
        let drain_timeout = Duration::from_millis(drain_ms);
        (node_id, state_dir, drain_timeout)
    }

    /// `[model]`: the node's bundle and the reconstruction overrides.
    fn model(&mut self, model: RawModel, resolve: &dyn Fn(PathBuf) -> PathBuf) -> ModelConfig {
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
        let models_dir = match model.models_dir.map(resolve) {
            Some(dir) => {
                if !dir.is_dir() {
                    self.fail("model.models_dir", format!("{}: folder not found", dir.display()));
                }
                dir
            }
            None => model_path.parent().map_or_else(|| PathBuf::from("."), |p| p.to_path_buf()),
        };
        ModelConfig {
            path: model_path,
            models_dir,
            t0: model.t0,
            steps: model.steps,
            sampler: model.sampler,
            eta: model.eta,
            seed: model.seed.unwrap_or(0),
            screen_recall: model.screen_recall.unwrap_or_default(),
        }
    }

    /// `[runtime]`: checked only (its struct is the runtime's own).
    fn runtime(&mut self, runtime: &RuntimeConfig) {
        if runtime.providers.is_empty() {
            self.fail("runtime.providers", "empty: list at least one of \"cuda\", \"tensorrt\", \"cpu\"");
        }
        if runtime.intra_threads == 0 {
            self.fail("runtime.intra_threads", "must be at least 1");
        }
        if let TileBatch::Fixed(n) = runtime.tile_batch {
            self.within("runtime.tile_batch", n, 1..=MAX_TILE_BATCH);
        }
    }

    /// `[pipeline]`: batching, queues and the stage timeout.
    fn pipeline(&mut self, pipeline: RawPipeline) -> PipelineConfig {
        PipelineConfig {
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
        }
    }

    /// `[mqtt]`: the broker, topics, credentials, TLS, payloads and the outbox.
    fn mqtt(&mut self, mqtt: RawMqtt, node_id: &str, state_dir: &Path) -> MqttConfig {
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
        let credentials =
            self.mqtt_credentials(mqtt.username, mqtt.password, mqtt.password_file, mqtt.password_credential);
        let tls = mqtt.tls.map(|t| self.tls(t));
        let embedded_broker = mqtt.embedded_broker.unwrap_or(false);
        if embedded_broker && !cfg!(feature = "embedded-broker") {
            self.fail("mqtt.embedded_broker", "this build has no embedded broker (cargo feature `embedded-broker`)");
        }
        let snapshot_quality = mqtt.snapshot_quality.unwrap_or(80);
        if !(1..=100).contains(&snapshot_quality) {
            self.fail("mqtt.snapshot_quality", format!("must be in 1..=100, got {snapshot_quality}"));
        }
        MqttConfig {
            enabled: mqtt.enabled.unwrap_or(true),
            host: mqtt.host.unwrap_or_else(|| "localhost".into()),
            port: port.clamp(1, 65535) as u16,
            client_id: mqtt.client_id.unwrap_or_else(|| format!("edge-inspect-{node_id}")),
            base_topic: format!("{topic_prefix}/{node_id}"),
            topic_prefix,
            // MQTT carries the keep-alive in 16 bits; the client pings no more often than 5 s.
            keep_alive: Duration::from_secs(self.within(
                "mqtt.keep_alive_s",
                mqtt.keep_alive_s.unwrap_or(30),
                5..=65_535,
            )),
            // The broker keeps the session (subscriptions, commands queued at QoS 1) this
            // long while the node is away: an hour bridges a broker restart or a partition;
            // commands queued for longer than a week would be stale.
            session_expiry: Duration::from_secs(self.within(
                "mqtt.session_expiry_s",
                mqtt.session_expiry_s.unwrap_or(3_600),
                0..=7 * 86_400,
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
        }
    }

    /// `mqtt.username` and the password from one of its three places.
    fn mqtt_credentials(
        &mut self,
        username: Option<String>,
        inline: Option<String>,
        file: Option<PathBuf>,
        credential: Option<String>,
    ) -> Option<(String, String)> {
        let password = self.secret("mqtt.password", inline, file, credential);
        match (username, password) {
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
        }
    }

    /// `[mqtt.tls]`: the CA, and a client certificate with its key (a file or a credential).
    fn tls(&mut self, t: RawTls) -> TlsConfig {
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
    }

    /// `[recorder]`: the capture store's place, sampling and bounds.
    fn recorder(&mut self, recorder: RawRecorder, state_dir: &Path) -> RecorderConfig {
        let sample_rate = recorder.normal_sample_rate.unwrap_or(0.01);
        if !(0.0..=1.0).contains(&sample_rate) {
            self.fail("recorder.normal_sample_rate", format!("must be in [0, 1], got {sample_rate}"));
        }
        let max_age_days = recorder.max_age_days.unwrap_or(30.0);
        if !(max_age_days > 0.0 && max_age_days <= 36_500.0) {
            self.fail("recorder.max_age_days", format!("must be in (0, 36500], got {max_age_days}"));
        }
        let max_side = self.within("recorder.max_side", recorder.max_side.unwrap_or(4096), 64..=16_384);
        RecorderConfig {
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
            min_free_bytes: self.within(
                "recorder.min_free_bytes",
                recorder.min_free_bytes.unwrap_or(512 << 20),
                0..=1 << 40,
            ),
        }
    }

    /// `[[cameras]]`: each table, ids unique.
    fn cameras(&mut self, cameras: Vec<RawCamera>, resolve: &dyn Fn(PathBuf) -> PathBuf) -> Vec<CameraConfig> {
        if cameras.is_empty() {
            self.fail("cameras", "no cameras configured (add a [[cameras]] table)");
        }
        let mut ids = BTreeSet::new();
        cameras.into_iter().enumerate().filter_map(|(i, c)| self.camera(i, c, &mut ids, resolve)).collect()
    }

    fn http(&mut self, http: RawHttp) -> HttpConfig {
        let listen = http.listen.unwrap_or_else(|| "127.0.0.1:9610".into());
        HttpConfig {
            enabled: http.enabled.unwrap_or(true),
            listen: listen.parse().unwrap_or_else(|e| {
                self.fail("http.listen", format!("not a host:port address ({e}): {listen:?}"));
                std::net::SocketAddr::from(([127, 0, 0, 1], 9610))
            }),
            token: self
                .secret("http.token", http.token, http.token_file, http.token_credential)
                .filter(|t| self.token_is_long_enough(t)),
            review_window: Duration::from_secs(
                3600 * self.within("http.review_hours", http.review_hours.unwrap_or(24), 1..=720),
            ),
        }
    }

    /// `[upload]`: where the capture store goes; endpoint and bucket are needed once enabled.
    fn upload(&mut self, upload: RawUpload) -> UploadConfig {
        let enabled = upload.enabled.unwrap_or(false);
        let endpoint = upload.endpoint.unwrap_or_default();
        if enabled && !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            self.fail("upload.endpoint", format!("expected an http:// or https:// URL, got {endpoint:?}"));
        }
        let bucket = upload.bucket.unwrap_or_default();
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if enabled && !valid_bucket {
            self.fail("upload.bucket", format!("not a bucket name (3–63 of a-z 0-9 . -): {bucket:?}"));
        }
        let prefix = upload.prefix.unwrap_or_else(|| "edge-inspect".into()).trim_matches('/').to_string();
        let secret = self.secret(
            "upload.secret_access_key",
            upload.secret_access_key,
            upload.secret_access_key_file,
            upload.secret_access_key_credential,
        );
        let credentials = match (upload.access_key_id, secret) {
            (Some(id), Some(secret)) => Some((id, secret)),
            (None, None) => None,
            _ => {
                self.fail("upload.access_key_id", "give both the access key id and the secret access key, or neither");
                None
            }
        };
        let region = upload.region.unwrap_or_else(|| "us-east-1".into());
        UploadConfig { enabled, endpoint, bucket, region, prefix, credentials }
    }

    /// A write token guessable in few tries protects nothing: at least 16 characters.
    fn token_is_long_enough(&mut self, token: &str) -> bool {
        let long = token.chars().count() >= 16;
        if !long {
            self.fail("http.token", format!("a token of {} characters; give at least 16", token.chars().count()));
        }
        long
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
        let mask = c.mask.clone().map(resolve).and_then(|path| match InspectMask::load(&path) {
            Ok(mask) => Some(mask),
            Err(e) => {
                self.fail(key("mask"), e);
                None
            }
        });
        if let (Some(mask), Some([_, _, w, h])) = (&mask, roi)
            && mask.size() != [w, h]
        {
            let [mw, mh] = mask.size();
            self.fail(key("mask"), format!("{}: {mw}x{mh}, but the ROI is {w}x{h}", mask.path().display()));
        }
        let source = match c.source.as_deref() {
            Some("replay") => {
                let Some(path) = c.path.clone() else {
                    self.fail(key("path"), "missing: a folder of images or a glob pattern");
                    return None;
                };
                let path = resolve(PathBuf::from(path)).display().to_string();
                if !path.contains(['*', '?', '[']) {
                    if !Path::new(&path).is_dir() {
                        self.fail(key("path"), format!("{path}: folder not found"));
                    }
                } else {
                    // A pattern that matches nothing would leave the camera without a frame for good.
                    match glob::glob(&path).map(|mut matches| matches.any(|m| m.is_ok_and(|p| p.is_file()))) {
                        Ok(true) => {}
                        Ok(false) => self.fail(key("path"), format!("{path}: the pattern matches no file")),
                        Err(e) => self.fail(key("path"), format!("{path}: not a glob pattern: {e}")),
                    }
                }
                // Bounded both ways: 1e-20 fps is a pacing interval no clock can hold.
                let fps = self.within(&key("fps"), c.fps.unwrap_or(5.0), 0.001..=1000.0);
                SourceConfig::Replay { path, fps, repeat: c.repeat.unwrap_or(true) }
            }
            Some("camera") => self.camera_source(&key, &c)?,
            Some("gstreamer") => self.gstreamer_source(&key, &c)?,
            Some("genicam") => self.genicam_source(&key, &c)?,
            Some(other) => {
                self.fail(
                    key("source"),
                    format!("'{other}' is not a source type (replay, camera, gstreamer, genicam)"),
                );
                return None;
            }
            None => {
                self.fail(key("source"), "missing: replay, camera, gstreamer or genicam");
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
        let trigger = self.trigger(&key, &c);
        Some(CameraConfig {
            id,
            enabled: c.enabled.unwrap_or(true),
            source,
            model,
            sensitivity: self.within(&key("sensitivity"), c.sensitivity.unwrap_or(1.0), crate::controls::SENSITIVITY),
            roi,
            mask,
            // Decoding allocates width × height × channels up front: a bound, not a wish.
            max_frame_pixels: self.within(
                &key("max_frame_pixels"),
                c.max_frame_pixels.unwrap_or(DEFAULT_MAX_FRAME_PIXELS),
                4096..=256 << 20,
            ),
            stall_timeout: Duration::from_millis(self.within(
                &key("stall_timeout_ms"),
                c.stall_timeout_ms.unwrap_or(10_000),
                1..=hour_ms,
            )),
            backoff_initial,
            backoff_max,
            trigger,
        })
    }

    /// `trigger = "free"` (default), `"mqtt"` with its two timeouts, or `"camera"` (a
    /// GenICam camera triggered by the line) with its verdict timeout.
    fn trigger(&mut self, key: &dyn Fn(&str) -> String, c: &RawCamera) -> TriggerMode {
        let ms = |v: &mut Self, field: &str, given: Option<u64>, default: u64| {
            Duration::from_millis(v.within(&key(field), given.unwrap_or(default), 1..=3_600_000))
        };
        let frame_timeout = ms(self, "trigger_timeout_ms", c.trigger_timeout_ms, 2000);
        let verdict_timeout = ms(self, "verdict_timeout_ms", c.verdict_timeout_ms, 60_000);
        match c.trigger.as_deref().unwrap_or("free") {
            "free" => TriggerMode::Free,
            "mqtt" => TriggerMode::Mqtt { frame_timeout, verdict_timeout },
            "camera" if c.source.as_deref() == Some("genicam") => TriggerMode::Camera { verdict_timeout },
            "camera" => {
                self.fail(
                    key("trigger"),
                    "\"camera\" (triggered by the line, numbered by its frame counter) needs source = \"genicam\"",
                );
                TriggerMode::Free
            }
            other => {
                self.fail(key("trigger"), format!("'{other}' is not one of free, mqtt, camera"));
                TriggerMode::Free
            }
        }
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

    #[cfg(feature = "gstreamer")]
    fn gstreamer_source(&mut self, key: &dyn Fn(&str) -> String, c: &RawCamera) -> Option<SourceConfig> {
        use crate::capture::gstreamer::{GstSettings, Input, check_pipeline};
        let input = match (c.uri.clone(), c.pipeline.clone()) {
            (Some(uri), None) => {
                let Ok(parsed) = url::Url::parse(&uri) else {
                    self.fail(key("uri"), format!("'{uri}' is not a URI"));
                    return None;
                };
                // A password in the URI would be in every log line and `ps` listing.
                if !parsed.username().is_empty() || parsed.password().is_some() {
                    self.fail(key("uri"), "holds user information: give username and password_credential instead");
                    return None;
                }
                Input::Uri(uri)
            }
            (None, Some(pipeline)) if !pipeline.trim().is_empty() => Input::Pipeline(pipeline),
            (None, Some(_)) => {
                self.fail(key("pipeline"), "empty");
                return None;
            }
            _ => {
                self.fail(key("source"), "a gstreamer source takes one of uri and pipeline");
                return None;
            }
        };
        let password = self.secret(&key("password"), None, c.password_file.clone(), c.password_credential.clone());
        let credentials = match (c.username.clone(), password) {
            (Some(user), Some(password)) => Some((user, password)),
            (None, None) => None,
            _ => {
                self.fail(key("username"), "username and a password (_file or _credential) go together");
                None
            }
        };
        let buffers = self.within(&key("buffers"), c.buffers.unwrap_or(2), 1..=64);
        let settings = GstSettings { input, credentials, buffers };
        if let Err(e) = check_pipeline(&settings) {
            self.fail(key(if c.uri.is_some() { "uri" } else { "pipeline" }), e);
        }
        Some(SourceConfig::Gstreamer(settings))
    }

    #[cfg(feature = "genicam")]
    fn genicam_source(&mut self, key: &dyn Fn(&str) -> String, c: &RawCamera) -> Option<SourceConfig> {
        use crate::capture::genicam::{Feature, GenicamSettings};
        let region = c.region.clone().and_then(|r| match r[..] {
            [x, y, w, h] if w > 0 && h > 0 => Some([x, y, w, h]),
            _ => {
                self.fail(key("region"), format!("must be [x, y, width, height] with width, height > 0, got {r:?}"));
                None
            }
        });
        let positive =
            |v: &mut Self, field: &str, value: Option<f64>| value.map(|x| v.within(&key(field), x, 1e-3..=1e9));
        let exposure_us = positive(self, "exposure_us", c.exposure_us);
        let frame_rate = positive(self, "fps", c.fps);
        let gain_db = c.gain_db.map(|g| self.within(&key("gain_db"), g, -100.0..=100.0));
        let features = c.features.clone().unwrap_or_default().into_iter().map(|(name, value)| {
            let value = match value {
                RawFeature::Bool(b) => Feature::Bool(b),
                RawFeature::Int(i) => Feature::Int(i),
                RawFeature::Float(f) => Feature::Float(f),
                RawFeature::Text(t) => Feature::Text(t),
            };
            (name, value)
        });
        Some(SourceConfig::Genicam(GenicamSettings {
            device: c.device.clone(),
            pixel_format: c.pixel_format.clone(),
            exposure_us,
            gain_db,
            frame_rate,
            region,
            features: features.collect(),
            trigger_source: c.trigger_source.clone(),
            buffers: self.within(&key("buffers"), c.buffers.unwrap_or(4), 1..=64),
        }))
    }

    #[cfg(not(feature = "genicam"))]
    fn genicam_source(&mut self, key: &dyn Fn(&str) -> String, _: &RawCamera) -> Option<SourceConfig> {
        self.fail(key("source"), "this build has no GenICam support (cargo feature `genicam`)");
        None
    }

    #[cfg(not(feature = "gstreamer"))]
    fn gstreamer_source(&mut self, key: &dyn Fn(&str) -> String, _: &RawCamera) -> Option<SourceConfig> {
        self.fail(key("source"), "this build has no GStreamer support (cargo feature `gstreamer`)");
        None
    }

    #[cfg(not(feature = "camera"))]
    fn camera_source(&mut self, key: &dyn Fn(&str) -> String, _: &RawCamera) -> Option<SourceConfig> {
        self.fail(key("source"), "this build has no camera support (cargo feature `camera`)");
        None
    }
}

/// The host name as a node id: `/proc/sys/kernel/hostname`, characters outside the id set
/// replaced by `-`; "default" where there is none.
pub(super) fn host_name_id() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = name
        .trim()
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' })
        .collect();
    if id.is_empty() { "default".into() } else { id }
}
