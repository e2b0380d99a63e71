//! `edge-inspect run`: the streaming inspection daemon.
//!
//! This module owns the lifecycle: validate the config (exit 78 on error), start the demo
//! broker if asked, load and warm the model, connect MQTT, wire the stages and hand their
//! threads to the [`supervisor`], tell systemd READY, then watch (stage exits and progress,
//! camera status and stalls, stats, the systemd watchdog), and on SIGTERM/SIGINT, a failed
//! stage or the end of every source: stop capture, drain (under a deadline unless the
//! sources ended by themselves), publish `offline`, disconnect.
//!
//! ```text
//! capture::thread (1/camera) → queue (cap 2, newest wins) ┐
//!                                                          ├→ batch → worker → publish → MQTT (mqtt, outbox)
//! capture::thread …          → queue                      ┘                           → recorder → capture store
//! main thread: signals, supervisor (exits, progress bounds, watchdog), stalls, stats
//! ```

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod control;
pub mod events;
pub mod homeassistant;
pub mod http;
pub mod models;
pub mod mqtt;
pub mod outbox;
pub mod publish;
pub mod recorder;
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
use crate::controls::Controls;
use crate::frame::Frame;
use crate::infer::bundle::{Bundle, BundleError};
use crate::infer::inspect::Inspector;
use crate::infer::runtime::RuntimeError;
use crate::stats::{self, CameraStats, CameraStatus, PipelineStats, Progress, RateTracker, StatsReport};
use http::Endpoint;
use models::CurrentModel;
use mqtt::Mqtt;
use publish::PublisherContext;
use signals::Signals;
use supervisor::{Failure, Health, Role, Supervisor};
use worker::Worker;

/// Checks what validation cannot see without reading the bundle: the manifest and the
/// reconstruction overrides against its schedule. Cheap: no ONNX Runtime involved.
pub fn check_model(config: &DaemonConfig) -> Vec<ConfigIssue> {
    let issue = |message: String| ConfigIssue { key: "model.path".into(), message };
    let manifest = match crate::infer::bundle::read_manifest(&config.model.path) {
        Ok(m) => m,
        Err(e) => return vec![issue(e.to_string())],
    };
    let m = &config.model;
    let spec = manifest.reconstruction.with_overrides(m.t0, m.steps, m.sampler, m.eta, None);
    match crate::model::diffusion::NoiseSchedule::new(&manifest.schedule) {
        Ok(schedule) => match crate::infer::inspect::Ensemble::new(&schedule, spec, manifest.extra_t0()) {
            Ok(_) => Vec::new(),
            Err(e) => vec![ConfigIssue { key: "model.t0/steps/sampler".into(), message: e.to_string() }],
        },
        Err(e) => vec![issue(e.to_string())],
    }
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

/// Loads and verifies the configured bundle through ONNX Runtime (sha256, graph contract,
/// golden check, providers): the part of `check-config` that needs the runtime. A failure
/// is a configuration error (exit 78), keyed by what to fix.
pub fn load_bundle(config: &DaemonConfig, source_name: &str) -> Result<Bundle, config::ConfigErrors> {
    Bundle::load(&config.model.path, &config.runtime).map_err(|e| {
        let key = match &e {
            BundleError::Runtime(RuntimeError::NoProvider { .. } | RuntimeError::EmptyProviders) => "runtime.providers",
            BundleError::Runtime(RuntimeError::LibraryMissing { .. } | RuntimeError::LibraryLoad { .. }) => {
                "runtime.library_path"
            }
            _ => "model.path",
        };
        config::ConfigErrors {
            source_name: source_name.to_string(),
            issues: vec![ConfigIssue { key: key.into(), message: e.to_string() }],
        }
    })
}

/// The model as the daemon reports it (stats, status line).
struct ModelInfo {
    /// What runs now (a model swap changes it).
    current: CurrentModel,
    provider: String,
    fell_back: bool,
    unet_calls: usize,
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
    // The bundle is verified before the pipeline starts: a bad one is a configuration error.
    notify(&[NotifyState::Status("loading model")]);
    let bundle = load_bundle(&config, source_name)?;
    let signals = Signals::listen(&mut supervisor)?;

    #[cfg(feature = "embedded-broker")]
    if config.mqtt.enabled && config.mqtt.embedded_broker {
        broker::start(&config.mqtt)?;
    }

    let m = &config.model;
    let spec = bundle.manifest.reconstruction.with_overrides(m.t0, m.steps, m.sampler, m.eta, None);
    let inspector = Inspector::new(bundle, Some(spec))?.with_tile_batch(config.pipeline.max_batch);
    let manifest = inspector.manifest();
    let model = ModelInfo {
        current: Arc::new(Mutex::new(Arc::new(models::model_ref(manifest)))),
        provider: inspector.denoiser().provider().to_string(),
        fell_back: inspector.denoiser().fell_back_to_cpu(),
        unet_calls: inspector.unet_calls(),
    };
    tracing::info!(model = %manifest.name, provider = %model.provider, fell_back_to_cpu = model.fell_back, t0 = spec.t0, steps = spec.steps, "Model ready.");
    let status_line =
        format!("inspecting {} camera(s) with {} on {}", config.cameras.len(), manifest.name, model.provider);

    let mut running = Running::start(&config, supervisor, inspector, model, endpoint)?;
    running.config_path = config_path.to_path_buf();
    notify(&[NotifyState::Ready, NotifyState::Status(&status_line)]);
    tracing::info!(node = %config.node_id, cameras = config.cameras.len(), "Running.");
    let outcome = running.supervise(&signals);
    running.stop(outcome, &signals)
}

/// Why supervision ended.
enum Outcome {
    Signalled,
    SourcesEnded,
    Failed(Failure),
}

/// A started daemon: its supervised threads and what the main thread needs to watch, report
/// and stop them.
struct Running<'a> {
    config: &'a DaemonConfig,
    supervisor: Supervisor,
    /// The monitoring endpoint, shut down last.
    endpoint: Option<Arc<Endpoint>>,
    /// The file SIGHUP re-reads.
    config_path: std::path::PathBuf,
    /// Bundles for the model loader (none without MQTT commands).
    models: Option<Sender<std::path::PathBuf>>,
    mqtt: Option<Arc<Mqtt>>,
    /// Dropped to stop the MQTT link, after `offline` went out.
    mqtt_stop: Option<Sender<()>>,
    /// Dropped to stop capture.
    capture_stop: Option<Sender<()>>,
    /// Camera status changes from the capture threads.
    status: Receiver<(usize, CameraStatus)>,
    cameras: Vec<Arc<CameraStats>>,
    /// The camera queues' receivers, read as depth gauges.
    queues: Vec<Receiver<Frame>>,
    /// Per camera: set when the camera stalled, so its thread reopens the source.
    reopen: Vec<Arc<AtomicBool>>,
    /// Set at shutdown: batches reaching the worker after it are dropped.
    drain_deadline: Arc<Mutex<Option<Instant>>>,
    pipeline: Arc<PipelineStats>,
    model: ModelInfo,
    watchdog: Option<Duration>,
    started: Instant,
    last_stats: Instant,
    rates: RateTracker,
}

impl<'a> Running<'a> {
    /// Connects MQTT and starts the pipe from its end: recorder ← publisher ← worker ←
    /// batcher ← captures.
    fn start(
        config: &'a DaemonConfig,
        mut supervisor: Supervisor,
        inspector: Inspector,
        model: ModelInfo,
        endpoint: Option<Arc<Endpoint>>,
    ) -> anyhow::Result<Self> {
        let pipeline = Arc::new(PipelineStats::default());
        // Verified models for the worker, from the loader (`<node>/model/set`).
        let (swaps_tx, swaps_rx) = bounded(1);
        let cameras: Vec<Arc<CameraStats>> = config.cameras.iter().map(|c| Arc::new(CameraStats::new(&c.id))).collect();
        let controls_file = config.state_dir.join("controls.json");
        let configured: Vec<(String, bool)> = config.cameras.iter().map(|c| (c.id.clone(), c.enabled)).collect();
        let controls: Vec<Arc<Controls>> =
            crate::controls::load(&controls_file, &configured).into_iter().map(Arc::new).collect();
        let mut models = None;
        let (mqtt, mqtt_stop) = if config.mqtt.enabled {
            let ha = &config.homeassistant;
            let (commands_tx, commands_rx) = bounded(64);
            let (models_tx, models_rx) = bounded(4);
            models = Some(models_tx.clone());
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
                    cameras: config.cameras.iter().map(|c| c.id.clone()).collect(),
                    controls: controls.clone(),
                    controls_file,
                    store: config.recorder.enabled.then(|| config.recorder.dir.clone()),
                    models: models_tx,
                    models_dir: config.model.models_dir.clone(),
                };
                control.publish_states();
                supervisor.spawn("control", Role::Link, None, move || control.run(commands_rx))?;
                let loader = models::Loader {
                    config: config.clone(),
                    mqtt: client.clone(),
                    swaps: swaps_tx,
                    current: model.current.clone(),
                    running: inspector.manifest().clone(),
                };
                supervisor.spawn("models", Role::Link, None, move || loader.run(models_rx))?;
            }
            (Some(client), Some(stop_tx))
        } else {
            (None, None)
        };
        for (camera, controls) in config.cameras.iter().zip(&controls) {
            let status = if controls.enabled() { CameraStatus::Offline } else { CameraStatus::Disabled };
            if let Some(mqtt) = &mqtt {
                mqtt.publish(&format!("{}/status", camera.id), QoS::AtLeastOnce, true, status.as_str().into());
            }
        }
        if let Some(mqtt) = mqtt.as_ref().filter(|_| config.homeassistant.enabled) {
            let messages = homeassistant::messages(config)
                .with_context(|| format!("{}: cannot record the announced cameras", config.state_dir.display()))?;
            for (topic, payload) in messages {
                mqtt.publish_at(topic, QoS::AtLeastOnce, true, payload);
            }
        }
        let watch = |progress: &Progress| Some((progress.clone(), config.pipeline.stage_timeout));

        let recorder = if config.recorder.enabled {
            let (tx, rx) = bounded(config.pipeline.output_capacity);
            let ids = config.cameras.iter().map(|c| c.id.clone()).collect();
            let recorder = recorder::Recorder::open(config.recorder.clone(), ids, pipeline.clone())
                .with_context(|| format!("{}: cannot create the capture store", config.recorder.dir.display()))?;
            let progress = Progress::new();
            supervisor.spawn("recorder", Role::Pipe, watch(&progress), move || recorder.run(rx, progress))?;
            Some((tx, config.recorder.normal_sample_rate))
        } else {
            None
        };

        let (output_tx, output_rx) = bounded(config.pipeline.output_capacity);
        let publisher = PublisherContext {
            mqtt: mqtt.clone(),
            cameras: cameras.clone(),
            publish_images: config.mqtt.publish_images,
            snapshot_quality: config.mqtt.snapshot_quality,
            image_max_width: config.mqtt.image_max_width,
            node: config.node_id.clone(),
            events: config.events.clone(),
            controls: controls.clone(),
            recorder,
        };
        let progress = Progress::new();
        supervisor.spawn("publisher", Role::Pipe, watch(&progress), move || {
            publish::publisher(publisher, output_rx, progress)
        })?;

        let (input, inspection) = (inspector.manifest().input, inspector.manifest().inspection);
        let (batch_tx, batch_rx) = bounded(1);
        let drain_deadline = Arc::new(Mutex::new(None));
        let worker_progress = Progress::new();
        let (seed, progress) = (config.model.seed, worker_progress.clone());
        let running = model.current.lock().expect("model lock").clone();
        let worker =
            Worker::new(inspector, running, seed, cameras.clone(), pipeline.clone(), drain_deadline.clone(), progress);
        supervisor.spawn("inference", Role::Pipe, watch(&worker_progress), move || {
            worker.run(batch_rx, output_tx, swaps_rx)
        })?;

        let (capture_stop, capture_stop_rx) = bounded::<()>(0);
        let (status_tx, status) = bounded(64);
        let (mut queues, mut reopen) = (Vec::new(), Vec::new());
        for (index, camera) in config.cameras.iter().enumerate() {
            let (queue_tx, queue_rx) = bounded(config.pipeline.queue_capacity);
            let flag = Arc::new(AtomicBool::new(false));
            let capture = CaptureLoop {
                index,
                config: camera.clone(),
                input,
                inspection,
                stats: cameras[index].clone(),
                queue_tx,
                queue_rx: queue_rx.clone(),
                stop: capture_stop_rx.clone(),
                reopen: flag.clone(),
                status_tx: status_tx.clone(),
                controls: controls[index].clone(),
                enable_at_run_time: config.mqtt.enabled && config.mqtt.commands,
            };
            supervisor.spawn(&format!("capture-{}", camera.id), Role::Source, None, move || capture.run())?;
            queues.push(queue_rx);
            reopen.push(flag);
        }

        let progress = Progress::new();
        let (batch_queues, max_batch, max_wait) = (queues.clone(), config.pipeline.max_batch, config.pipeline.max_wait);
        supervisor.spawn("batcher", Role::Pipe, watch(&progress), move || {
            batch::run(batch_queues, max_batch, max_wait, batch_tx, capture_stop_rx, progress)
        })?;

        if let Some(endpoint) = &endpoint {
            endpoint.ready(http::Report {
                cameras: cameras.clone(),
                pipeline: pipeline.clone(),
                queues: queues.clone(),
                model: model.current.clone(),
                provider: model.provider.clone(),
                worker: worker_progress,
                stage_timeout: config.pipeline.stage_timeout,
            });
        }
        Ok(Self {
            config,
            supervisor,
            endpoint,
            config_path: std::path::PathBuf::new(),
            models,
            mqtt,
            mqtt_stop,
            capture_stop: Some(capture_stop),
            status,
            cameras,
            queues,
            reopen,
            drain_deadline,
            pipeline,
            model,
            watchdog: sd_notify::watchdog_enabled(),
            started: Instant::now(),
            last_stats: Instant::now(),
            rates: RateTracker::default(),
        })
    }

    /// Watches the threads until a signal, the end of every source, or a failure.
    fn supervise(&mut self, signals: &Signals) -> Outcome {
        let second = tick(Duration::from_secs(1));
        let exits = self.supervisor.exits().clone();
        let (statuses, closed) = (self.status.clone(), crossbeam_channel::never());
        let mut statuses_open = true;
        loop {
            // A closed channel is always ready: once every capture thread is gone, stop
            // listening to it.
            let status = if statuses_open { &statuses } else { &closed };
            select! {
                recv(signals.stop) -> _ => return Outcome::Signalled,
                recv(signals.reload) -> _ => self.reload(),
                recv(status) -> change => match change {
                    Ok((index, status)) => self.publish_status(index, status),
                    Err(_) => statuses_open = false,
                },
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

    /// SIGHUP: the config file is checked in full first (as `check-config`); an invalid one
    /// changes nothing and its errors are logged and published on `<node>/error`. A valid one
    /// swaps the model when `model.path` now holds another bundle (a moved `current` link, an
    /// edited path); every other difference is logged as needing a restart.
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
                let reply = serde_json::json!({ "reload": path, "errors": issues });
                if let Some(mqtt) = &self.mqtt {
                    mqtt.publish("error", QoS::AtLeastOnce, false, serde_json::to_vec(&reply).expect("serialises"));
                }
                return;
            }
        };
        let running_sha = self.model.current.lock().expect("model lock").sha256.clone();
        let new_sha = crate::infer::bundle::read_manifest(&new.model.path).map(|m| m.artifact.sha256);
        match (&self.models, new_sha) {
            (Some(models), Ok(sha)) if sha != running_sha => {
                tracing::info!(model = %new.model.path.display(), "SIGHUP: the configured model changed; swapping.");
                let _ = models.try_send(new.model.path.clone());
            }
            (None, Ok(sha)) if sha != running_sha => {
                tracing::warn!("SIGHUP: the configured model changed; swapping needs MQTT commands on, or a restart.");
            }
            _ => {}
        }
        for (section, changed) in self.config.differences(&new) {
            if changed {
                tracing::warn!(section = section, "SIGHUP: this section changed and needs a restart to take effect.");
            }
        }
    }

    /// A camera online without a frame for longer than its stall timeout is marked offline
    /// and told to reopen.
    fn check_stalls(&self) {
        for (i, camera) in self.config.cameras.iter().enumerate() {
            let s = &self.cameras[i];
            if s.status() == CameraStatus::Online && s.since_progress() > camera.stall_timeout {
                tracing::warn!(camera = %camera.id, stalled_ms = s.since_progress().as_millis() as u64, "Camera stalled.");
                s.stalls.fetch_add(1, Relaxed);
                *s.status.lock().expect("stats lock") = CameraStatus::Offline;
                self.reopen[i].store(true, Relaxed);
                self.publish_status(i, CameraStatus::Offline);
            }
        }
    }

    fn publish_status(&self, index: usize, status: CameraStatus) {
        let id = &self.config.cameras[index].id;
        tracing::info!(camera = %id, status = status.as_str(), "Camera status.");
        if let Some(mqtt) = &self.mqtt {
            mqtt.publish(&format!("{id}/status"), QoS::AtLeastOnce, true, status.as_str().into());
        }
    }

    fn publish_stats(&mut self) {
        self.last_stats = Instant::now();
        let p = &self.pipeline;
        let report = StatsReport {
            schema: stats::STATS_SCHEMA,
            node: self.config.node_id.clone(),
            timestamp: publish::rfc3339(std::time::SystemTime::now()),
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
                .iter()
                .zip(&self.queues)
                .map(|(c, q)| (c.id.clone(), stats::camera_report(c, q.len(), self.rates.rates(c))))
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
        for (index, status) in last {
            self.publish_status(index, status);
        }
        self.publish_stats();
        if let Some(mqtt) = &self.mqtt {
            mqtt.flush(Instant::now() + self.config.drain_timeout);
            let ids: Vec<String> = self.config.cameras.iter().map(|c| c.id.clone()).collect();
            mqtt.go_offline(&ids);
        }
        drop(self.mqtt_stop.take());
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
