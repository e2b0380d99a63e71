//! `edge-inspect run`: the streaming inspection daemon.
//!
//! This module owns the lifecycle: validate the config (exit 78 on error), start the demo
//! broker if asked, load and warm the model, connect MQTT, start the threads, tell systemd
//! READY, supervise (camera status, stall watchdog, stats, systemd WATCHDOG), and on
//! SIGTERM/SIGINT stop capture, drain under a deadline, publish `offline`, disconnect.
//!
//! ```text
//! capture (1 thread/camera) → queue (cap 2, newest wins) ┐
//!                                                          ├→ batcher → inference worker
//! capture …                 → queue                      ┘        → publisher → MQTT
//!                                                                 → recorder  → capture store
//! main thread: signals, status, stall watchdog, stats, sd_notify
//! ```

#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod config;
pub mod mqtt;
pub mod outbox;
pub mod pipeline;
pub mod publish;
pub mod recorder;
pub mod stats;

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{bounded, select, tick};
use rumqttc::QoS;
use sd_notify::NotifyState;

use crate::infer::inspect::Inspector;
use crate::infer::runtime::RuntimeError;
use crate::model::bundle::{Bundle, BundleError};
use config::{ConfigIssue, DaemonConfig};
use mqtt::Mqtt;
use pipeline::{CaptureContext, WorkerContext};
use publish::{ModelRef, PublisherContext};
use stats::{CameraStats, CameraStatus, PipelineStats, RateTracker, StatsReport};

/// Checks what validation cannot see without reading the bundle: the manifest and the
/// reconstruction overrides against its schedule. Cheap: no ONNX Runtime involved.
pub fn check_model(config: &DaemonConfig) -> Vec<ConfigIssue> {
    let issue = |message: String| ConfigIssue { key: "model.path".into(), message };
    let manifest = match crate::model::bundle::read_manifest(&config.model.path) {
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

/// Waits for `handles` until `deadline`; a thread still running then is reported and left
/// behind (it can only be stuck in a blocking device or file read).
/// Joins the threads that finish before `deadline`; returns the names of those that
/// panicked.
fn join_until(handles: Vec<(String, JoinHandle<()>)>, deadline: Instant) -> Vec<String> {
    let mut panicked = Vec::new();
    for (name, handle) in handles {
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if handle.is_finished() {
            if handle.join().is_err() {
                tracing::error!(thread = %name, "Thread panicked.");
                panicked.push(name);
            }
        } else {
            tracing::warn!(thread = %name, "Thread did not stop before the deadline; leaving it.");
        }
    }
    panicked
}

/// Joins the capture threads that have finished; returns the name of one that panicked.
fn join_panicked_captures(captures: &mut Vec<(String, JoinHandle<()>)>) -> Option<String> {
    let mut panicked = None;
    let mut running = Vec::with_capacity(captures.len());
    for (name, handle) in captures.drain(..) {
        if !handle.is_finished() {
            running.push((name, handle));
        } else if handle.join().is_err() {
            panicked = Some(name);
        }
    }
    *captures = running;
    panicked
}

/// The daemon stopped because a stage panicked; `main` exits with [`EXIT_SOFTWARE`] so
/// systemd restarts the service.
#[derive(Debug, thiserror::Error)]
#[error("stage(s) {0:?} panicked; the daemon stopped")]
pub struct StagePanicked(pub Vec<String>);

/// EX_SOFTWARE: an internal error (a stage panicked).
pub const EXIT_SOFTWARE: u8 = 70;

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> anyhow::Result<(String, JoinHandle<()>)> {
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .with_context(|| format!("cannot start thread {name}"))?;
    Ok((name.to_string(), handle))
}

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

/// Runs the daemon until SIGTERM/SIGINT, or until every source has ended (finite replays,
/// disabled cameras, a capture thread that died): then it drains and stops — with
/// [`StagePanicked`] if a capture thread panicked.
pub fn run(config: DaemonConfig, source_name: &str) -> anyhow::Result<()> {
    // The bundle is verified before anything starts: a bad one is a configuration error.
    notify(&[NotifyState::Status("loading model")]);
    let bundle = load_bundle(&config, source_name)?;
    let (signal_tx, signal_rx) = bounded::<()>(4);
    ctrlc::set_handler(move || {
        let _ = signal_tx.try_send(());
    })
    .context("cannot install the SIGTERM/SIGINT handler")?;

    #[cfg(feature = "embedded-broker")]
    if config.mqtt.enabled && config.mqtt.embedded_broker {
        broker::start(&config.mqtt)?;
    }

    let m = &config.model;
    let spec = bundle.manifest.reconstruction.with_overrides(m.t0, m.steps, m.sampler, m.eta, None);
    let inspector = Inspector::new(bundle, Some(spec))?.with_tile_batch(config.pipeline.max_batch);
    let manifest = inspector.manifest().clone();
    let provider = inspector.bundle.denoiser.provider().to_string();
    let fell_back = inspector.bundle.denoiser.fell_back_to_cpu();
    let unet_calls = inspector.unet_calls();
    let model_ref = ModelRef {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: manifest.artifact.sha256.clone(),
    };
    tracing::info!(model = %manifest.name, provider = %provider, fell_back_to_cpu = fell_back, t0 = spec.t0, steps = spec.steps, "Model ready.");

    let pipeline_stats = Arc::new(PipelineStats::default());
    let camera_ids: Vec<String> = config.cameras.iter().map(|c| c.id.clone()).collect();
    let camera_stats: Vec<Arc<CameraStats>> = camera_ids.iter().map(|id| Arc::new(CameraStats::new(id))).collect();

    let (mqtt_stop_tx, mqtt_stop_rx) = bounded::<()>(0);
    let (mqtt, mqtt_thread) = if config.mqtt.enabled {
        let (client, thread) = Mqtt::start(&config.mqtt, pipeline_stats.clone(), mqtt_stop_rx)?;
        (Some(Arc::new(client)), Some(thread))
    } else {
        drop(mqtt_stop_rx);
        (None, None)
    };
    for (id, camera) in camera_ids.iter().zip(&config.cameras) {
        let status = if camera.enabled { CameraStatus::Offline } else { CameraStatus::Disabled };
        if let Some(mqtt) = &mqtt {
            mqtt.publish(&format!("{id}/status"), QoS::AtLeastOnce, true, status.as_str().into());
        }
    }

    // The pipe, from the end: recorder ← publisher ← worker ← batcher ← captures.
    let mut downstream = Vec::new();
    let recorder_tx = if config.recorder.enabled {
        let (tx, rx) = bounded(config.pipeline.output_capacity);
        let recorder = recorder::Recorder::open(
            config.recorder.clone(),
            camera_ids.clone(),
            model_ref.clone(),
            pipeline_stats.clone(),
        )
        .with_context(|| format!("{}: cannot create the capture store", config.recorder.dir.display()))?;
        downstream.push(spawn("recorder", move || recorder.run(rx))?);
        Some((tx, config.recorder.normal_sample_rate))
    } else {
        None
    };
    let (output_tx, output_rx) = bounded(config.pipeline.output_capacity);
    let publisher_ctx = PublisherContext {
        mqtt: mqtt.clone(),
        cameras: camera_stats.clone(),
        model: model_ref.clone(),
        image_threshold: manifest.thresholds.image.value,
        publish_images: config.mqtt.publish_images,
        snapshot_quality: config.mqtt.snapshot_quality,
        image_max_width: config.mqtt.image_max_width,
        node: config.node_id.clone(),
        recorder: recorder_tx,
    };
    downstream.push(spawn("publisher", move || publish::publisher(publisher_ctx, output_rx))?);
    let (batch_tx, batch_rx) = bounded(1);
    let drain_deadline = Arc::new(Mutex::new(None));
    let heartbeat = Arc::new(Mutex::new(Instant::now()));
    // Every UNet batch of tiles is progress: a frame of many tiles keeps the watchdog fed
    // while it is inspected; a UNet call that hangs does not.
    let beat = heartbeat.clone();
    let worker_ctx = WorkerContext {
        inspector: inspector.with_progress(move || *beat.lock().expect("heartbeat lock") = Instant::now()),
        seed: config.model.seed,
        batches: batch_rx,
        output: output_tx,
        cameras: camera_stats.clone(),
        pipeline: pipeline_stats.clone(),
        drain_deadline: drain_deadline.clone(),
        heartbeat: heartbeat.clone(),
    };
    downstream.insert(0, spawn("inference", move || pipeline::inference_worker(worker_ctx))?);
    let mut queues = Vec::new();
    let mut captures = Vec::new();
    let (capture_stop_tx, capture_stop_rx) = bounded::<()>(0);
    let (status_tx, status_rx) = bounded(64);
    let mut reopen_flags = Vec::new();
    for (index, camera) in config.cameras.iter().enumerate() {
        let (tx, rx) = bounded(config.pipeline.queue_capacity);
        queues.push(rx.clone());
        let reopen = Arc::new(AtomicBool::new(false));
        reopen_flags.push(reopen.clone());
        let ctx = CaptureContext {
            index,
            config: camera.clone(),
            input: manifest.input,
            inspection: manifest.inspection,
            stats: camera_stats[index].clone(),
            queue_tx: tx,
            queue_rx: rx,
            stop: capture_stop_rx.clone(),
            reopen,
            status_tx: status_tx.clone(),
        };
        captures.push(spawn(&format!("capture-{}", camera.id), move || ctx.run())?);
    }
    drop(status_tx);
    let queue_gauges = queues.clone();
    let pipeline_config = config.pipeline.clone();
    let batcher_stop = capture_stop_rx.clone();
    downstream.insert(0, spawn("batcher", move || pipeline::batcher(queues, pipeline_config, batch_tx, batcher_stop))?);

    let status_line = format!("inspecting {} camera(s) with {} on {}", config.cameras.len(), manifest.name, provider);
    notify(&[NotifyState::Ready, NotifyState::Status(&status_line)]);
    tracing::info!(node = %config.node_id, cameras = config.cameras.len(), "Running.");

    // Supervise until a signal.
    let watchdog = sd_notify::watchdog_enabled();
    let second = tick(Duration::from_secs(1));
    let mut last_stats = Instant::now();
    let mut rates = RateTracker::default();
    let started = Instant::now();
    let publish_stats = |rates: &mut RateTracker| {
        let report = StatsReport {
            schema: stats::STATS_SCHEMA,
            node: config.node_id.clone(),
            timestamp: publish::rfc3339(std::time::SystemTime::now()),
            uptime_s: started.elapsed().as_secs_f64(),
            model: stats::ModelReport {
                name: model_ref.name.clone(),
                version: model_ref.version.clone(),
                sha256: model_ref.sha256.clone(),
            },
            inference: stats::inference_report(
                &pipeline_stats,
                provider.clone(),
                fell_back,
                config.pipeline.max_batch,
                unet_calls,
            ),
            cameras: camera_stats
                .iter()
                .zip(&queue_gauges)
                .map(|(c, q)| (c.id.clone(), stats::camera_report(c, q.len(), rates.rates(c))))
                .collect(),
            mqtt_connects: pipeline_stats.mqtt_connects.load(Relaxed),
            mqtt_connected: pipeline_stats.mqtt_connected.load(Relaxed),
            mqtt_failures: pipeline_stats.mqtt_failures.load(Relaxed),
            outbox_queued: pipeline_stats.outbox_queued.load(Relaxed),
            outbox_dropped: pipeline_stats.outbox_dropped.load(Relaxed),
            recorded_flagged: pipeline_stats.recorded_flagged.load(Relaxed),
            recorded_normal: pipeline_stats.recorded_normal.load(Relaxed),
            recorder_pruned: pipeline_stats.recorder_pruned.load(Relaxed),
            recorder_errors: pipeline_stats.recorder_errors.load(Relaxed),
        };
        let payload = serde_json::to_vec(&report).expect("stats serialise");
        tracing::debug!(stats = %String::from_utf8_lossy(&payload), "Stats.");
        if let Some(mqtt) = &mqtt {
            mqtt.publish("stats", QoS::AtMostOnce, false, payload);
        }
    };
    let mut stage_died: Option<String> = None;
    let signalled = loop {
        select! {
            recv(signal_rx) -> _ => break true,
            recv(status_rx) -> change => match change {
                Ok((index, status)) => {
                    tracing::info!(camera = %camera_ids[index], status = status.as_str(), "Camera status.");
                    if let Some(mqtt) = &mqtt {
                        mqtt.publish(&format!("{}/status", camera_ids[index]), QoS::AtLeastOnce, true, status.as_str().into());
                    }
                }
                // Every capture thread has returned: nothing more will come in.
                Err(_) => {
                    tracing::info!("Every source has ended; finishing the frames in the pipeline.");
                    break false;
                }
            },
            recv(second) -> _ => {
                // Supervision: a pipeline stage only ends when its input closes (every source
                // ended, or shutdown); one that ends while a source still runs died (a panic,
                // or its neighbour did): stop, exit 70.
                let sources_running = captures.iter().any(|(_, h)| !h.is_finished());
                if let Some((name, _)) = downstream.iter().find(|(_, h)| sources_running && h.is_finished()) {
                    tracing::error!(stage = %name, "A pipeline stage stopped unexpectedly; shutting down.");
                    stage_died = Some(name.clone());
                    break true;
                }
                // A capture thread may end (a finite replay, a disabled camera); one that
                // panicked is a dead stage too.
                if let Some(name) = join_panicked_captures(&mut captures) {
                    tracing::error!(stage = %name, "A capture thread panicked; shutting down.");
                    stage_died = Some(name);
                    break true;
                }
                for (i, camera) in config.cameras.iter().enumerate() {
                    let s = &camera_stats[i];
                    if s.status() == CameraStatus::Online && s.since_progress() > camera.stall_timeout {
                        tracing::warn!(camera = %camera.id, stalled_ms = s.since_progress().as_millis() as u64, "Camera stalled.");
                        s.stalls.fetch_add(1, Relaxed);
                        *s.status.lock().expect("stats lock") = CameraStatus::Offline;
                        reopen_flags[i].store(true, Relaxed);
                        if let Some(mqtt) = &mqtt {
                            mqtt.publish(&format!("{}/status", camera.id), QoS::AtLeastOnce, true, b"offline".to_vec());
                        }
                    }
                }
                // WATCHDOG only while the inference loop turns (busy or idle-waiting).
                if let Some(period) = watchdog
                    && heartbeat.lock().expect("heartbeat lock").elapsed() < period / 2
                {
                    notify(&[NotifyState::Watchdog]);
                }
                if last_stats.elapsed() >= config.mqtt.stats_interval {
                    last_stats = Instant::now();
                    publish_stats(&mut rates);
                }
            }
        }
    };

    // Shutdown: capture stops, the pipe drains (under the deadline after a signal), then
    // `offline`.
    tracing::info!(drain_ms = config.drain_timeout.as_millis() as u64, "Stopping.");
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    // A signal drains under the deadline; ended sources leave only the bounded queues' frames,
    // all of which are inspected (the stages end as their inputs close).
    let deadline = if signalled {
        let deadline = Instant::now() + config.drain_timeout;
        *drain_deadline.lock().expect("deadline lock") = Some(deadline);
        deadline
    } else {
        Instant::now() + Duration::from_secs(24 * 3600)
    };
    drop(capture_stop_tx);
    let mut panicked = join_until(captures, deadline);
    panicked.extend(join_until(downstream, deadline + Duration::from_secs(1)));
    publish_stats(&mut rates);
    if let Some(mqtt) = &mqtt {
        mqtt.go_offline(&camera_ids);
    }
    drop(mqtt_stop_tx);
    if let Some(thread) = mqtt_thread {
        join_until(vec![("mqtt".into(), thread)], Instant::now() + Duration::from_secs(4));
    }
    tracing::info!("Stopped.");
    panicked.extend(stage_died.filter(|name| !panicked.contains(name)));
    if panicked.is_empty() { Ok(()) } else { Err(StagePanicked(panicked).into()) }
}
