//! `edge-inspect run`: the streaming inspection daemon.
//!
//! This module owns the lifecycle: validate the config (exit 78 on error), start the demo
//! broker if asked, load and warm the models (the node's and the cameras' own, each once),
//! connect MQTT, wire the stages and hand their threads to the [`supervisor`], tell systemd
//! READY, then watch (stage exits and progress, camera status and stalls, stats, the systemd
//! watchdog), apply a reloaded config (SIGHUP: cameras started, stopped and restarted one by
//! one, models swapped, options handed on), and on SIGTERM/SIGINT, a failed stage or the end
//! of every source: stop capture, drain (under a deadline unless the sources ended by
//! themselves), publish `offline`, disconnect.
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
pub mod http;
pub mod models;
pub mod mqtt;
pub mod recorder;
pub mod reload;
pub mod signals;
pub mod supervisor;
pub mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, bounded, select, tick};
use rumqttc::QoS;
use sd_notify::NotifyState;

use crate::batch;
use crate::capture::thread::CaptureLoop;
use crate::config::{self, ConfigIssue, DaemonConfig};
use crate::frame::Frame;
use crate::infer::bundle::{Bundle, BundleError};
use crate::infer::inspect::Inspector;
use crate::infer::runtime::RuntimeError;
use crate::stats::{self, CameraStatus, PipelineStats, Progress, RateTracker, StatsReport};
use cameras::Cameras;
use http::Endpoint;
use models::{CurrentModel, Load, NODE_MODEL};
use mqtt::publish::{PublishOptions, PublisherContext};
use mqtt::{Mqtt, control, homeassistant, publish};
use reload::CameraAction;
use signals::Signals;
use supervisor::{Failure, Health, Role, Supervisor};
use worker::{Swap, Worker};

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
            Bundle::load(&path, &config.runtime).map_err(|e| {
                let key = match &e {
                    BundleError::Runtime(RuntimeError::NoProvider { .. } | RuntimeError::EmptyProviders) => {
                        "runtime.providers".to_string()
                    }
                    BundleError::Runtime(RuntimeError::LibraryMissing { .. } | RuntimeError::LibraryLoad { .. }) => {
                        "runtime.library_path".to_string()
                    }
                    _ => model_key,
                };
                config::ConfigErrors {
                    source_name: source_name.to_string(),
                    issues: vec![ConfigIssue { key, message: e.to_string() }],
                }
            })
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
}

/// A model the daemon knows, by key (the index in [`Running::models`]; 0 is the node's).
struct ModelSlot {
    path: std::path::PathBuf,
    /// The loaded bundle's manifest; `None` while it loads or after it failed to.
    manifest: Option<crate::model::manifest::Manifest>,
}

/// A configured camera whose capture thread runs.
struct RunningCamera {
    config: crate::capture::CameraConfig,
    /// Dropped to stop its capture thread.
    stop: Sender<()>,
    /// Set when the camera stalled, so its thread reopens the source.
    reopen: Arc<AtomicBool>,
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
        supervisor.spawn("http", Role::Link, None, move || serving.serve())?;
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
    };
    tracing::info!(model = %manifest.name, provider = %model.provider, fell_back_to_cpu = model.fell_back, unet_calls = model.unet_calls, models = inspectors.len(), "Model ready.");
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
    /// batcher ← captures. `inspectors` are the config's bundles, the node's first.
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
        // Verified models for the worker, from the loader.
        let (swaps_tx, swaps_rx) = bounded(1);
        let (loads, loads_rx) = bounded(64);
        let (loaded_tx, loaded) = bounded(8);
        let (mqtt, mqtt_stop) = if config.mqtt.enabled {
            let ha = &config.homeassistant;
            let (commands_tx, commands_rx) = bounded(64);
            let subscriptions = mqtt::Subscriptions {
                birth: ha.enabled.then(|| format!("{}/status", ha.discovery_prefix)),
                commands: config.mqtt.commands.then(|| (control::filters(&config.mqtt.base_topic), commands_tx)),
            };
            let (client, link) = Mqtt::start(&config.mqtt, pipeline.clone(), subscriptions)?;
            let client = Arc::new(client);
            let (stop_tx, stop_rx) = bounded::<()>(0);
            supervisor.spawn("mqtt", Role::Link, None, move || link.run(stop_rx))?;
            if config.mqtt.commands {
                let control = control::Control {
                    mqtt: client.clone(),
                    cameras: cameras.clone(),
                    controls_file: config.state_dir.join(CONTROLS_FILE),
                    store: config.recorder.enabled.then(|| config.recorder.dir.clone()),
                    models: loads.clone(),
                    models_dir: config.model.models_dir.clone(),
                };
                supervisor.spawn("control", Role::Link, None, move || control.run(commands_rx))?;
            }
            (Some(client), Some(stop_tx))
        } else {
            (None, None)
        };
        let loader = models::Loader {
            config: config.clone(),
            mqtt: mqtt.clone(),
            swaps: swaps_tx,
            current: model.current.clone(),
            running: inspectors.iter().enumerate().map(|(key, i)| (key, i.manifest().clone())).collect(),
            loaded: loaded_tx,
        };
        supervisor.spawn("models", Role::Link, None, move || loader.run(loads_rx))?;
        let watch = |progress: &Progress| Some((progress.clone(), config.pipeline.stage_timeout));

        let recorder = if config.recorder.enabled {
            let (tx, rx) = bounded(config.pipeline.output_capacity);
            let (limits_tx, limits_rx) = bounded(4);
            let recorder = recorder::Recorder::open(config.recorder.clone(), cameras.clone(), pipeline.clone())
                .with_context(|| format!("{}: cannot create the capture store", config.recorder.dir.display()))?;
            let progress = Progress::new();
            supervisor
                .spawn("recorder", Role::Pipe, watch(&progress), move || recorder.run(rx, limits_rx, progress))?;
            Some((tx, limits_tx))
        } else {
            None
        };

        let (output_tx, output_rx) = bounded(config.pipeline.output_capacity);
        let (options, options_rx) = bounded(4);
        let publisher = PublisherContext {
            mqtt: mqtt.clone(),
            cameras: cameras.clone(),
            node: config.node_id.clone(),
            options: PublishOptions::of(&config),
            recorder: recorder.as_ref().map(|(tx, _)| tx.clone()),
        };
        let progress = Progress::new();
        supervisor.spawn("publisher", Role::Pipe, watch(&progress), move || {
            publish::publisher(publisher, output_rx, options_rx, progress)
        })?;

        let (batch_tx, batch_rx) = bounded(1);
        let drain_deadline = Arc::new(Mutex::new(None));
        let worker_progress = Progress::new();
        let loaded_models: Vec<Swap<_>> = inspectors
            .into_iter()
            .enumerate()
            .map(|(key, inspector)| {
                let model = if key == NODE_MODEL {
                    model.current.lock().expect("model lock").clone()
                } else {
                    Arc::new(models::model_ref(inspector.manifest()))
                };
                Swap { key, inspector, model }
            })
            .collect();
        let (seed, progress) = (config.model.seed, worker_progress.clone());
        let worker =
            Worker::new(loaded_models, seed, cameras.clone(), pipeline.clone(), drain_deadline.clone(), progress);
        supervisor.spawn("inference", Role::Pipe, watch(&worker_progress), move || {
            worker.run(batch_rx, output_tx, swaps_rx)
        })?;

        let (capture_stop, capture_stop_rx) = bounded::<()>(0);
        let (joins, joins_rx) = bounded(1024);
        let progress = Progress::new();
        let (max_batch, max_wait) = (config.pipeline.max_batch, config.pipeline.max_wait);
        supervisor.spawn("batcher", Role::Pipe, watch(&progress), move || {
            batch::run(joins_rx, max_batch, max_wait, batch_tx, capture_stop_rx, progress)
        })?;

        if let Some(endpoint) = &endpoint {
            endpoint.ready(http::Report {
                cameras: cameras.clone(),
                pipeline: pipeline.clone(),
                model: model.current.clone(),
                provider: model.provider.clone(),
                worker: worker_progress,
                stage_timeout: config.pipeline.stage_timeout,
            });
        }
        let (status_tx, status) = bounded(64);
        let mut running = Self {
            config,
            supervisor,
            endpoint,
            config_path: std::path::PathBuf::new(),
            loads: Some(loads),
            loaded,
            models,
            mqtt,
            mqtt_stop,
            capture_stop: Some(capture_stop),
            joins: Some(joins),
            status,
            status_tx,
            cameras,
            running: Default::default(),
            waiting: Vec::new(),
            options,
            recorder_limits: recorder.map(|(_, limits)| limits),
            drain_deadline,
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

    /// The key of the model `camera` runs: the node's, or its own bundle's (loaded once,
    /// whichever camera named it first). A bundle not known yet gets a key and is loaded.
    fn model_key(&mut self, camera: &crate::capture::CameraConfig) -> usize {
        let Some(path) = &camera.model else { return NODE_MODEL };
        if let Some(key) = self.models.iter().position(|m| &m.path == path) {
            return key;
        }
        self.models.push(ModelSlot { path: path.clone(), manifest: None });
        let key = self.models.len() - 1;
        tracing::info!(camera = %camera.id, key, model = %path.display(), "Loading the camera's model.");
        self.request_load(Load { key, path: path.clone() });
        key
    }

    fn request_load(&self, load: Load) {
        if let Some(loads) = &self.loads
            && loads.try_send(load).is_err()
        {
            tracing::error!("The model loader is busy or gone; the bundle was not queued. Reload again.");
        }
    }

    /// Starts `camera`'s capture thread (in its old slot if it ran before), or parks it
    /// until its model is loaded.
    fn start_camera(&mut self, camera: crate::capture::CameraConfig) -> anyhow::Result<()> {
        let key = self.model_key(&camera);
        let Some(manifest) = &self.models[key].manifest else {
            self.waiting.push(camera);
            return Ok(());
        };
        let (input, inspection) = (manifest.input, manifest.inspection);
        let controls_file = self.config.state_dir.join(CONTROLS_FILE);
        let configured = [(camera.id.clone(), camera.enabled, camera.sensitivity)];
        let (slot, created) = self.cameras.activate(&camera.id, self.config.pipeline.queue_capacity, || {
            crate::controls::load(&controls_file, &configured).remove(0)
        });
        let entry = self.cameras.get(slot);
        if created && let Some(joins) = &self.joins {
            joins.send(entry.queue_rx.clone()).context("the batcher has stopped")?;
        }
        let (stop, stop_rx) = bounded::<()>(0);
        let reopen = Arc::new(AtomicBool::new(false));
        let capture = CaptureLoop {
            slot,
            config: camera.clone(),
            model: key,
            input,
            inspection,
            stats: entry.stats.clone(),
            queue_tx: entry.queue_tx.clone(),
            queue_rx: entry.queue_rx.clone(),
            stop: stop_rx,
            reopen: reopen.clone(),
            status_tx: self.status_tx.clone(),
            controls: entry.controls.clone(),
            enable_at_run_time: self.config.mqtt.enabled && self.config.mqtt.commands,
        };
        self.supervisor.spawn(&format!("capture-{}", camera.id), Role::Source, None, move || capture.run())?;
        let status = if entry.controls.enabled() { CameraStatus::Offline } else { CameraStatus::Disabled };
        *entry.stats.status.lock().expect("stats lock") = status;
        self.publish_status(slot, status);
        if let Some(mqtt) = self.mqtt.as_ref().filter(|_| self.config.mqtt.commands) {
            control::publish_state(mqtt, &entry);
        }
        tracing::info!(camera = %camera.id, slot, model = key, "Camera started.");
        self.running.insert(slot, RunningCamera { config: camera, stop, reopen });
        Ok(())
    }

    /// Stops the capture thread of the camera in `slot` (its queued frames are still
    /// inspected); `retire` also takes the camera out of the configured ones.
    fn stop_camera(&mut self, slot: usize, retire: bool) {
        if let Some(camera) = self.running.remove(&slot) {
            drop(camera.stop);
            tracing::info!(camera = %camera.config.id, slot, "Camera stopped.");
        }
        if retire {
            self.cameras.retire(slot);
            self.publish_status(slot, CameraStatus::Offline);
        }
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

    /// The loader's answer for model `key`: the manifest is recorded and the cameras that
    /// waited for it start; a model that failed to load keeps them out (published on
    /// `<node>/error`) until a reload names a bundle that loads.
    fn model_loaded(&mut self, key: usize, manifest: Result<crate::model::manifest::Manifest, String>) {
        let (ready, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|c| c.model.as_ref() == Some(&self.models[key].path));
        self.waiting = rest;
        match manifest {
            Ok(manifest) => {
                self.models[key].manifest = Some(manifest);
                for camera in ready {
                    if let Err(e) = self.start_camera(camera) {
                        tracing::error!(error = %e, "Cannot start the camera.");
                    }
                }
            }
            Err(error) => {
                if self.models[key].manifest.is_none() {
                    // A new model that never loaded: forget it, so a reload tries again.
                    self.models[key].path = std::path::PathBuf::new();
                }
                for camera in ready {
                    tracing::error!(camera = %camera.id, error = %error, "The camera's model did not load; the camera does not start.");
                    self.publish_error(
                        serde_json::json!({ "camera": camera.id, "model": camera.model, "error": error }),
                    );
                }
            }
        }
    }

    fn publish_error(&self, reply: serde_json::Value) {
        if let Some(mqtt) = &self.mqtt {
            mqtt.publish("error", QoS::AtLeastOnce, false, serde_json::to_vec(&reply).expect("serialises"));
        }
    }

    /// SIGHUP: the config file is checked in full first (as `check-config`); an invalid one
    /// changes nothing and its errors are logged and published on `<node>/error`. A valid
    /// one is applied as far as it can be while frames flow: cameras added, removed or
    /// changed (only the changed ones restart their capture; the others are untouched),
    /// each model whose path now holds another bundle swapped, publishing and recorder
    /// options handed on. What is left different needs a restart, and is logged as such.
    fn reload(&mut self) {
        let path = self.config_path.display().to_string();
        tracing::info!(config = %path, "SIGHUP: reloading the configuration.");
        let new = match load_config(&self.config_path) {
            Ok(new) => new,
            Err(errors) => {
                for issue in &errors.issues {
                    tracing::error!(config = %path, key = %issue.key, error = %issue.message, "Reloaded configuration invalid; nothing changed.");
                }
                let issues: Vec<_> =
                    errors.issues.iter().map(|i| serde_json::json!({ "key": i.key, "message": i.message })).collect();
                self.publish_error(serde_json::json!({ "reload": path, "errors": issues }));
                return;
            }
        };
        let plan = reload::plan(&self.config, &new);
        self.swap_changed_models(&plan.running);
        if let Err(e) = self.apply_cameras(&plan) {
            tracing::error!(error = %e, "SIGHUP: cannot apply the camera changes.");
        }
        if let Some(options) = plan.publish {
            let _ = self.options.try_send(options);
        }
        if let (Some(limits), Some(channel)) = (plan.recorder, &self.recorder_limits) {
            let _ = channel.try_send(limits);
        }
        self.config = plan.running;
        for section in plan.needs_restart {
            tracing::warn!(section = section, "SIGHUP: this section changed and needs a restart to take effect.");
        }
    }

    /// Asks the loader to swap each loaded model whose bundle path (the node's `model.path`
    /// may name another one now) holds another bundle than the one running.
    fn swap_changed_models(&mut self, new: &DaemonConfig) {
        let node_path = new.model.path.clone();
        for (key, slot) in self.models.iter().enumerate() {
            let path = if key == NODE_MODEL { &node_path } else { &slot.path };
            let Some(running) = &slot.manifest else { continue };
            match crate::infer::bundle::read_manifest(path) {
                Ok(m) if m.artifact.sha256 != running.artifact.sha256 => {
                    tracing::info!(key, model = %path.display(), "SIGHUP: the bundle changed; swapping.");
                    self.request_load(Load { key, path: path.clone() });
                }
                _ => {}
            }
        }
        self.models[NODE_MODEL].path = node_path;
    }

    /// Carries out the plan's camera actions, then persists the controls and announces the
    /// cameras again if any changed.
    fn apply_cameras(&mut self, plan: &reload::Plan) -> anyhow::Result<()> {
        self.config.cameras = plan.running.cameras.clone();
        for action in &plan.cameras {
            match action {
                CameraAction::Stop { id, retire } => {
                    self.waiting.retain(|c| &c.id != id);
                    if let Some((slot, _)) = self.cameras.find(id) {
                        tracing::info!(camera = %id, "SIGHUP: camera {}.", if *retire { "removed" } else { "changed" });
                        self.stop_camera(slot, *retire);
                    }
                }
                CameraAction::SetEnabled { id, enabled } => {
                    if let Some((_, entry)) = self.cameras.find(id) {
                        entry.controls.set_enabled(*enabled);
                    }
                }
                CameraAction::SetSensitivity { id, sensitivity } => {
                    if let Some((_, entry)) = self.cameras.find(id) {
                        entry.controls.set_sensitivity(*sensitivity);
                        if let Some(mqtt) = self.mqtt.as_ref().filter(|_| self.config.mqtt.commands) {
                            control::publish_state(mqtt, &entry);
                        }
                    }
                }
                CameraAction::Start(camera) => {
                    if self.cameras.find(&camera.id).is_none() {
                        tracing::info!(camera = %camera.id, "SIGHUP: camera added.");
                    }
                    self.start_camera(camera.clone())?;
                }
            }
        }
        if plan.cameras_changed() {
            control::persist(&self.cameras, &self.config.state_dir.join(CONTROLS_FILE));
            self.announce()?;
        }
        Ok(())
    }

    /// A camera online without a frame for longer than its stall timeout is marked offline
    /// and told to reopen.
    fn check_stalls(&self) {
        for (slot, camera) in &self.running {
            let s = &self.cameras.get(*slot).stats;
            if s.status() == CameraStatus::Online && s.since_progress() > camera.config.stall_timeout {
                tracing::warn!(camera = %camera.config.id, stalled_ms = s.since_progress().as_millis() as u64, "Camera stalled.");
                s.stalls.fetch_add(1, Relaxed);
                *s.status.lock().expect("stats lock") = CameraStatus::Offline;
                camera.reopen.store(true, Relaxed);
                self.publish_status(*slot, CameraStatus::Offline);
            }
        }
    }

    fn publish_status(&self, slot: usize, status: CameraStatus) {
        let camera = self.cameras.get(slot);
        // A camera removed by a reload stays offline, whatever its last thread says.
        let status = if camera.active() { status } else { CameraStatus::Offline };
        tracing::info!(camera = %camera.id, status = status.as_str(), "Camera status.");
        if let Some(mqtt) = &self.mqtt {
            mqtt.publish(&format!("{}/status", camera.id), QoS::AtLeastOnce, true, status.as_str().into());
        }
    }

    fn publish_stats(&mut self) {
        self.last_stats = Instant::now();
        let p = &self.pipeline;
        let report = StatsReport {
            schema: stats::STATS_SCHEMA,
            node: self.config.node_id.clone(),
            timestamp: crate::timestamp::now(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            model: {
                let current = self.model.current.lock().expect("model lock").clone();
                stats::ModelReport {
                    name: current.name.clone(),
                    version: current.version.clone(),
                    sha256: current.sha256.clone(),
                }
            },
            inference: stats::inference_report(
                p,
                self.model.provider.clone(),
                self.model.fell_back,
                self.config.pipeline.max_batch,
                self.model.unet_calls,
            ),
            cameras: self
                .cameras
                .active()
                .into_iter()
                .map(|(_, c)| {
                    (c.id.clone(), stats::camera_report(&c.stats, c.queue_rx.len(), self.rates.rates(&c.stats)))
                })
                .collect(),
            mqtt_connects: p.mqtt_connects.load(Relaxed),
            mqtt_connected: p.mqtt_connected.load(Relaxed),
            mqtt_failures: p.mqtt_failures.load(Relaxed),
            outbox_queued: p.outbox_queued.load(Relaxed),
            outbox_dropped: p.outbox_dropped.load(Relaxed),
            recorded_flagged: p.recorded_flagged.load(Relaxed),
            recorded_normal: p.recorded_normal.load(Relaxed),
            recorder_pruned: p.recorder_pruned.load(Relaxed),
            recorder_errors: p.recorder_errors.load(Relaxed),
        };
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
        let (panicked, undrained) = self.supervisor.wait_for(Role::Pipe, deadline + Duration::from_secs(1));
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
