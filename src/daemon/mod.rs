//! `edge-inspect run`: the streaming inspection daemon.
//!
//! This module owns the main thread's life: validate the config (exit 78 on error), start
//! the demo broker if asked, load and warm the models (the node's and the cameras' own,
//! each once), start the stages (`wiring`) under the [`supervisor`], tell systemd READY,
//! then watch (stage exits and progress, camera status and stalls, stats, the systemd
//! watchdog) until SIGTERM/SIGINT, a failed stage or the end of every source: stop
//! capture, drain (under a deadline unless the sources ended by themselves), publish
//! `offline`, disconnect. What it does to cameras and models meanwhile — starts, stops,
//! stalls, a SIGHUP's [`reload::plan`] — is in `lifecycle`.
//!
//! ```text
//! capture::thread (1/camera) → queue (bounded, newest wins) ┐
//!                                                            ├→ batch (1 open batch/model) → worker (models by key)
//! capture::thread …          → queue                        ┘     → mqtt::publish → MQTT (mqtt::client, outbox)
//!                                                                           → recorder → capture store
//! main thread: signals, reloads, supervisor (exits, progress bounds, watchdog), stalls, stats
//! models thread: loads and verifies bundles, hands them to the worker
//! ```

pub mod cameras;
pub mod fleet;
pub mod http;
mod lifecycle;
pub mod models;
pub mod mqtt;
pub mod recorder;
pub mod reload;
pub mod signals;
pub mod supervisor;
pub mod upload;
pub mod web;
mod wiring;
pub mod worker;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, bounded, select, tick};
use rumqttc::v5::mqttbytes::QoS;
use sd_notify::NotifyState;

use crate::config::{self, ConfigIssue, DaemonConfig};
use crate::frame::Frame;
use crate::infer::bundle::{Bundle, BundleError};
use crate::infer::inspect::Inspector;
use crate::infer::runtime::RuntimeError;
use crate::stats::{self, CameraStatus, PipelineStats, RateTracker, StatsReport};
use cameras::Cameras;
use http::Endpoint;
use lifecycle::{ModelSlot, RunningCamera};
use models::{CurrentModel, Load, NODE_MODEL};
use mqtt::publish::PublishOptions;
use mqtt::{Mqtt, homeassistant};
use signals::Signals;
use supervisor::{Failure, Health, Role, Supervisor};
use wiring::Wiring;

/// Where the cameras' controls persist, under `node.state_dir`.
const CONTROLS_FILE: &str = "controls.json";

/// Every bundle the config names with the key that names it (`model.path` for the node's,
/// `cameras[i].model` for a camera's own), each once, the node's first.
fn named_bundles(config: &DaemonConfig) -> Vec<(String, std::path::PathBuf)> {
    let mut named = vec![("model.path".to_string(), config.model.path.clone())];
    for (i, camera) in config.cameras.iter().enumerate() {
        if let Some(path) = &camera.model
            && !named.iter().any(|(_, p)| p == path)
        {
            named.push((format!("cameras[{i}].model"), path.clone()));
        }
    }
    named
}

/// Checks what validation cannot see without reading the bundles: each manifest and the
/// reconstruction overrides against its schedule. Cheap: no ONNX Runtime involved.
pub fn check_model(config: &DaemonConfig) -> Vec<ConfigIssue> {
    named_bundles(config).into_iter().filter_map(|(key, path)| check_bundle(config, key, &path)).collect()
}

fn check_bundle(config: &DaemonConfig, key: String, path: &std::path::Path) -> Option<ConfigIssue> {
    let manifest = match crate::infer::bundle::read_manifest(path) {
        Ok(m) => m,
        Err(e) => return Some(ConfigIssue { key, message: e.to_string() }),
    };
    let m = &config.model;
    let spec = manifest.reconstruction.with_overrides(m.t0, m.steps, m.sampler, m.eta, None);
    let problem = match crate::model::diffusion::NoiseSchedule::new(&manifest.schedule) {
        Ok(schedule) => match crate::infer::ensemble::Ensemble::new(&schedule, spec, manifest.extra_t0()) {
            Ok(_) => return None,
            Err(e) => ("model.t0/steps/sampler".to_string(), format!("{}: {e}", path.display())),
        },
        Err(e) => (key, e.to_string()),
    };
    Some(ConfigIssue { key: problem.0, message: problem.1 })
}

/// Loads and fully checks a config file: what `check-config` and `run` do first.
pub fn load_config(path: &std::path::Path) -> Result<DaemonConfig, config::ConfigErrors> {
    let config = config::load(path)?;
    let issues = check_model(&config);
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(config::ConfigErrors { source_name: path.display().to_string(), issues })
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed.");
    }
}

/// The daemon stopped because a stage failed (panicked, ended early, got stuck) or missed
/// the drain deadline; `main` exits with [`EXIT_SOFTWARE`] so systemd restarts the service.
#[derive(Debug, thiserror::Error)]
#[error("the daemon stopped: {}", .0.join("; "))]
pub struct StageFailed(pub Vec<String>);

/// EX_SOFTWARE: an internal error (a stage failed).
pub const EXIT_SOFTWARE: u8 = 70;

/// Loads and verifies every bundle the config names through ONNX Runtime (sha256, graph
/// contract, golden check, providers), the node's first: the part of `check-config` that
/// needs the runtime. A failure is a configuration error (exit 78), keyed by what to fix.
pub fn load_bundles(config: &DaemonConfig, source_name: &str) -> Result<Vec<Bundle>, config::ConfigErrors> {
    named_bundles(config)
        .into_iter()
        .map(|(model_key, path)| {
            let issue = |key: String, message: String| config::ConfigErrors {
                source_name: source_name.to_string(),
                issues: vec![ConfigIssue { key, message }],
            };
            let mut bundle = Bundle::load(&path, &config.runtime).map_err(|e| {
                let key = match &e {
                    BundleError::Runtime(RuntimeError::NoProvider { .. } | RuntimeError::EmptyProviders) => {
                        "runtime.providers".to_string()
                    }
                    BundleError::Runtime(RuntimeError::LibraryMissing { .. } | RuntimeError::LibraryLoad { .. }) => {
                        "runtime.library_path".to_string()
                    }
                    _ => model_key,
                };
                issue(key, e.to_string())
            })?;
            models::choose_screen(&mut bundle, config)
                .map_err(|message| issue("model.screen_recall".into(), message))?;
            Ok(bundle)
        })
        .collect()
}

/// The model as the daemon reports it (stats, status line): the node's.
struct ModelInfo {
    /// What runs now (a model swap changes it).
    current: CurrentModel,
    provider: String,
    fell_back: bool,
    unet_calls: usize,
    tile_batch: usize,
}

/// Runs the daemon until SIGTERM/SIGINT, until every source has ended (finite replays,
/// disabled cameras), or until a stage fails; then it drains and stops — with
/// [`StageFailed`] after a failure or a missed drain deadline.
pub fn run(config: DaemonConfig, config_path: &std::path::Path) -> anyhow::Result<()> {
    let source_name = &config_path.display().to_string();
    let mut supervisor = Supervisor::default();
    // Listening from the start: a probe sees `503 loading model`, not a refused connection.
    let endpoint = if config.http.enabled {
        let endpoint = Endpoint::bind(config.http.listen).map_err(|message| config::ConfigErrors {
            source_name: source_name.to_string(),
            issues: vec![ConfigIssue { key: "http.listen".into(), message }],
        })?;
        let serving = endpoint.clone();
        supervisor.spawn("http", Role::Link, None, move || {
            if let Err(e) = serving.serve() {
                tracing::error!(error = %e, "HTTP endpoint failed.");
            }
        })?;
        Some(endpoint)
    } else {
        None
    };
    // The bundles are verified before the pipeline starts: a bad one is a configuration error.
    notify(&[NotifyState::Status("loading model")]);
    let bundles = load_bundles(&config, source_name)?;
    let signals = Signals::listen(&mut supervisor)?;

    #[cfg(feature = "embedded-broker")]
    if config.mqtt.enabled && config.mqtt.embedded_broker {
        mqtt::broker::start(&config.mqtt)?;
    }

    let mut inspectors = Vec::new();
    for bundle in bundles {
        inspectors.push(models::inspector(bundle, &config)?);
    }
    let node = &inspectors[NODE_MODEL];
    let manifest = node.manifest();
    let model = ModelInfo {
        current: Arc::new(Mutex::new(Arc::new(models::model_ref(manifest)))),
        provider: node.denoiser().provider().to_string(),
        fell_back: node.denoiser().fell_back_to_cpu(),
        unet_calls: node.unet_calls(),
        tile_batch: node.tile_batch(),
    };
    tracing::info!(model = %manifest.name, provider = %model.provider, fell_back_to_cpu = model.fell_back, unet_calls = model.unet_calls, tile_batch = model.tile_batch, models = inspectors.len(), "Model ready.");
    let status_line =
        format!("inspecting {} camera(s) with {} on {}", config.cameras.len(), manifest.name, model.provider);

    let mut running = Running::start(config, supervisor, inspectors, model, endpoint)?;
    running.config_path = config_path.to_path_buf();
    notify(&[NotifyState::Ready, NotifyState::Status(&status_line)]);
    tracing::info!(node = %running.config.node_id, cameras = running.config.cameras.len(), "Running.");
    let outcome = running.supervise(&signals);
    running.stop(outcome, &signals)
}

/// Why supervision ended.
enum Outcome {
    Signalled,
    SourcesEnded,
    Failed(Failure),
}

/// A started daemon: its supervised threads and what the main thread needs to watch,
/// report, reconfigure and stop them.
struct Running {
    /// What runs: the loaded config with the changes a reload applied.
    config: DaemonConfig,
    supervisor: Supervisor,
    /// The monitoring endpoint, shut down last.
    endpoint: Option<Arc<Endpoint>>,
    /// The file SIGHUP re-reads.
    config_path: std::path::PathBuf,
    /// Bundles for the model loader (dropped at shutdown, so it ends); what became of them
    /// comes back on `loaded`.
    loads: Option<Sender<Load>>,
    loaded: Receiver<models::Loaded>,
    /// Every model by key; a camera's frames name its key.
    models: Vec<ModelSlot>,
    mqtt: Option<Arc<Mqtt>>,
    /// Dropped to stop the MQTT link, after `offline` went out.
    mqtt_stop: Option<Sender<()>>,
    /// Dropped to stop the uploader.
    upload_stop: Option<Sender<()>>,
    /// Dropped to stop the batcher (capture threads have their own stops).
    capture_stop: Option<Sender<()>>,
    /// New camera queues for the batcher; dropped at shutdown.
    joins: Option<Sender<Receiver<Frame>>>,
    /// Camera status changes from the capture threads, by camera slot.
    status: Receiver<(usize, CameraStatus)>,
    status_tx: Sender<(usize, CameraStatus)>,
    cameras: Cameras,
    /// The configured cameras' capture threads, by slot.
    running: std::collections::BTreeMap<usize, RunningCamera>,
    /// Configured cameras whose model is still loading; they start when it is ready.
    waiting: Vec<crate::capture::CameraConfig>,
    /// New publishing options for the publisher; new limits for the recorder.
    options: Sender<PublishOptions>,
    recorder_limits: Option<Sender<config::RecorderLimits>>,
    /// Set at shutdown: batches reaching the worker after it are dropped.
    drain_deadline: Arc<Mutex<Option<Instant>>>,
    pipeline: Arc<PipelineStats>,
    model: ModelInfo,
    watchdog: Option<Duration>,
    started: Instant,
    last_stats: Instant,
    rates: RateTracker,
}

impl Running {
    /// Connects MQTT and starts the pipe from its end: recorder ← publisher ← worker ←
    /// batcher ← captures (`wiring`). `inspectors` are the config's bundles, the node's first.
    fn start(
        config: DaemonConfig,
        mut supervisor: Supervisor,
        inspectors: Vec<Inspector>,
        model: ModelInfo,
        endpoint: Option<Arc<Endpoint>>,
    ) -> anyhow::Result<Self> {
        let pipeline = Arc::new(PipelineStats::default());
        let cameras = Cameras::default();
        // `inspectors` are `named_bundles`' in order: the keys are their positions.
        let models: Vec<ModelSlot> = named_bundles(&config)
            .into_iter()
            .zip(&inspectors)
            .map(|((_, path), inspector)| ModelSlot { path, manifest: Some(inspector.manifest().clone()) })
            .collect();
        let mut wiring = Wiring {
            config: &config,
            supervisor: &mut supervisor,
            pipeline: &pipeline,
            cameras: &cameras,
            uploaded: Arc::default(),
        };
        // Verified models for the worker, from the loader; bundles to load, from the
        // control thread and reloads.
        let (swaps_tx, swaps_rx) = bounded(1);
        let (loads_tx, loads_rx) = bounded(64);
        let mut link = wiring.mqtt(&loads_tx)?;
        let loader = wiring.loader(&link, swaps_tx, model.current.clone(), &inspectors, loads_tx, loads_rx)?;
        let recorder = wiring.recorder()?;
        let board = endpoint.as_ref().map(|_| Arc::new(web::board::Board::default()));
        let (output, options) = wiring.publisher(&link, recorder.as_ref().map(|(tx, _)| tx.clone()), board.clone())?;
        let inference = wiring.worker(inspectors, &model, swaps_rx, output)?;
        let (capture_stop, joins) = wiring.batcher(inference.batches)?;
        let upload = wiring.uploader()?;
        wiring.follower(&mut link, loader.loads.clone(), loader.node_bundle.clone(), inference.progress.clone())?;
        if let (Some(endpoint), Some(board)) = (&endpoint, board) {
            let site = web::Site {
                node: config.node_id.clone(),
                board,
                control: link.control.clone(),
                cameras: cameras.clone(),
                store: config.recorder.enabled.then(|| config.recorder.dir.clone()),
                models_dir: config.model.models_dir.clone(),
                model: model.current.clone(),
                token: config.http.token.clone(),
                review_window: config.http.review_window,
            };
            endpoint.ready(
                http::Report {
                    cameras: cameras.clone(),
                    pipeline: pipeline.clone(),
                    model: model.current.clone(),
                    provider: model.provider.clone(),
                    worker: inference.progress,
                    stage_timeout: config.pipeline.stage_timeout,
                    mqtt: config.mqtt.enabled,
                    upload: upload.as_ref().map(|(stats, _)| stats.clone()),
                },
                site,
            );
        }
        let (status_tx, status) = bounded(64);
        let mut running = Self {
            config,
            supervisor,
            endpoint,
            config_path: std::path::PathBuf::new(),
            loads: Some(loader.loads),
            loaded: loader.loaded,
            models,
            mqtt: link.client,
            mqtt_stop: link.stop,
            upload_stop: upload.map(|(_, stop)| stop),
            capture_stop: Some(capture_stop),
            joins: Some(joins),
            status,
            status_tx,
            cameras,
            running: Default::default(),
            waiting: Vec::new(),
            options,
            recorder_limits: recorder.map(|(_, limits)| limits),
            drain_deadline: inference.drain_deadline,
            pipeline,
            model,
            watchdog: sd_notify::watchdog_enabled(),
            started: Instant::now(),
            last_stats: Instant::now(),
            rates: RateTracker::default(),
        };
        for camera in running.config.cameras.clone() {
            running.start_camera(camera)?;
        }
        running.announce()?;
        Ok(running)
    }

    /// Home Assistant discovery for the configured cameras (and the removal of others').
    fn announce(&self) -> anyhow::Result<()> {
        let Some(mqtt) = self.mqtt.as_ref().filter(|_| self.config.homeassistant.enabled) else { return Ok(()) };
        let messages = homeassistant::messages(&self.config)
            .with_context(|| format!("{}: cannot record the announced cameras", self.config.state_dir.display()))?;
        for (topic, payload) in messages {
            mqtt.publish_at(topic, QoS::AtLeastOnce, true, payload);
        }
        Ok(())
    }

    /// Watches the threads until a signal, the end of every source, or a failure.
    fn supervise(&mut self, signals: &Signals) -> Outcome {
        let second = tick(Duration::from_secs(1));
        let exits = self.supervisor.exits().clone();
        let (statuses, loaded) = (self.status.clone(), self.loaded.clone());
        loop {
            select! {
                recv(signals.stop) -> _ => return Outcome::Signalled,
                recv(signals.reload) -> _ => self.reload(),
                recv(loaded) -> result => {
                    if let Ok((key, manifest)) = result {
                        self.model_loaded(key, manifest);
                    }
                }
                recv(statuses) -> change => {
                    if let Ok((slot, status)) = change {
                        self.publish_status(slot, status);
                    }
                }
                recv(exits) -> index => {
                    match self.supervisor.exited(index.expect("the supervisor holds an exit sender")) {
                        Health::Running => {}
                        Health::SourcesEnded => {
                            tracing::info!("Every source has ended; finishing the frames in the pipeline.");
                            return Outcome::SourcesEnded;
                        }
                        Health::Failed(failure) => {
                            tracing::error!(stage = %failure.stage, what = %failure.what, "A stage failed; shutting down.");
                            return Outcome::Failed(failure);
                        }
                    }
                }
                recv(second) -> _ => {
                    if let Some(failure) = self.supervisor.stuck() {
                        tracing::error!(stage = %failure.stage, what = %failure.what, "A stage is stuck; shutting down.");
                        return Outcome::Failed(failure);
                    }
                    // Fed only while every stage shows progress within its bound.
                    if let Some(period) = self.watchdog {
                        tracing::trace!(period_ms = period.as_millis() as u64, "Watchdog.");
                        notify(&[NotifyState::Watchdog]);
                    }
                    self.check_stalls();
                    if self.last_stats.elapsed() >= self.config.mqtt.stats_interval {
                        self.publish_stats();
                    }
                }
            }
        }
    }

    fn publish_error(&self, reply: serde_json::Value) {
        if let Some(mqtt) = &self.mqtt {
            mqtt.publish("error", QoS::AtLeastOnce, false, serde_json::to_vec(&reply).expect("serialises"));
        }
    }

    fn publish_stats(&mut self) {
        self.last_stats = Instant::now();
        let current = self.model.current.lock().expect("model lock").clone();
        let model = stats::ModelReport {
            name: current.name.clone(),
            version: current.version.clone(),
            sha256: current.sha256.clone(),
        };
        let (m, p) = (&self.model, &self.pipeline);
        let shape = stats::InferenceShape {
            max_batch: self.config.pipeline.max_batch,
            tile_batch: m.tile_batch,
            unet_calls: m.unet_calls,
        };
        let inference = stats::inference_report(p, m.provider.clone(), m.fell_back, shape);
        let cameras = self
            .cameras
            .active()
            .into_iter()
            .map(|(_, c)| (c.id.clone(), stats::camera_report(&c.stats, c.queue_rx.len(), self.rates.rates(&c.stats))))
            .collect();
        let uptime = self.started.elapsed();
        let report = StatsReport::now(self.config.node_id.clone(), uptime, model, inference, cameras, p);
        let payload = serde_json::to_vec(&report).expect("stats serialise");
        tracing::debug!(stats = %String::from_utf8_lossy(&payload), "Stats.");
        if let Some(mqtt) = &self.mqtt {
            mqtt.publish("stats", QoS::AtMostOnce, false, payload);
        }
    }

    /// Stops capture, lets the pipe drain (under the drain deadline unless every source
    /// ended by itself: then every queued frame is inspected), publishes `offline` and
    /// disconnects.
    fn stop(mut self, outcome: Outcome, signals: &Signals) -> anyhow::Result<()> {
        tracing::info!(drain_ms = self.config.drain_timeout.as_millis() as u64, "Stopping.");
        notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
        let deadline = match outcome {
            Outcome::SourcesEnded => Instant::now() + Duration::from_secs(24 * 3600),
            Outcome::Signalled | Outcome::Failed(_) => {
                let deadline = Instant::now() + self.config.drain_timeout;
                *self.drain_deadline.lock().expect("deadline lock") = Some(deadline);
                deadline
            }
        };
        let mut failures: Vec<String> = match &outcome {
            Outcome::Failed(failure) => vec![failure.to_string()],
            _ => Vec::new(),
        };
        let note_panics = |panicked: Vec<String>, failures: &mut Vec<String>| {
            let known = |name: &String| matches!(&outcome, Outcome::Failed(f) if &f.stage == name);
            failures.extend(panicked.into_iter().filter(|n| !known(n)).map(|n| format!("{n}: panicked")));
        };
        self.running.clear();
        drop(self.joins.take());
        drop(self.capture_stop.take());
        let (panicked, blocked) = self.supervisor.wait_for(Role::Source, deadline);
        note_panics(panicked, &mut failures);
        for name in blocked {
            // Only a blocking device read keeps a capture thread; its queue is drained anyway.
            tracing::warn!(thread = %name, "Capture thread did not stop before the deadline; leaving it.");
        }
        // A frame of thousands of tiles can take minutes: past the deadline, the inference in
        // flight is terminated, and the stages drain right after.
        let (_, busy) = self.supervisor.wait_for(Role::Pipe, deadline);
        if !busy.is_empty() {
            tracing::info!(stages = ?busy, "Drain deadline reached; terminating the inference in flight.");
            crate::infer::runtime::terminate_runs();
        }
        let (panicked, undrained) = self.supervisor.wait_for(Role::Pipe, deadline + Duration::from_secs(2));
        note_panics(panicked, &mut failures);
        for name in undrained {
            tracing::error!(stage = %name, "Stage did not finish before the drain deadline.");
            failures.push(format!("{name}: missed the drain deadline"));
        }
        let last: Vec<_> = self.status.try_iter().collect();
        for (slot, status) in last {
            self.publish_status(slot, status);
        }
        self.publish_stats();
        if let Some(mqtt) = &self.mqtt {
            mqtt.flush(Instant::now() + self.config.drain_timeout);
            let ids: Vec<String> = self.cameras.active().into_iter().map(|(_, c)| c.id.clone()).collect();
            mqtt.go_offline(&ids);
        }
        drop(self.mqtt_stop.take());
        drop(self.upload_stop.take());
        drop(self.loads.take());
        if let Some(endpoint) = &self.endpoint {
            endpoint.shutdown();
        }
        signals.close();
        let (panicked, _) = self.supervisor.wait_for(Role::Link, Instant::now() + Duration::from_secs(4));
        note_panics(panicked, &mut failures);
        tracing::info!("Stopped.");
        if failures.is_empty() { Ok(()) } else { Err(StageFailed(failures).into()) }
    }
}
