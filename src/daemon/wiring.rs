//! The daemon's threads, started from the pipe's end: each function starts one stage
//! under the supervisor and returns the handles the main thread keeps (senders to stop or
//! reconfigure it, receivers of what it reports). [`Running::start`](super::Running)
//! calls them in order: MQTT (and the control thread), the model loader, the recorder,
//! the publisher, the inference worker, the batcher.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, bounded};

use super::cameras::Cameras;
use super::fleet::Follower;
use super::models::{self, CurrentModel, Load, NODE_MODEL};
use super::mqtt::publish::{self, PublishOptions, PublisherContext};
use super::mqtt::{Incoming, Mqtt, Subscriptions, control};
use super::recorder::Recorder;
use super::supervisor::{Role, Supervisor};
use super::upload::{UploadStats, Uploaded, Uploader};
use super::worker::{Swap, Worker};
use super::{CONTROLS_FILE, ModelInfo};
use crate::batch;
use crate::config::{DaemonConfig, RecorderLimits};
use crate::frame::{Frame, Inspected};
use crate::infer::inspect::Inspector;
use crate::stats::{PipelineStats, Progress};

/// What every stage is started with.
pub struct Wiring<'a> {
    pub config: &'a DaemonConfig,
    pub supervisor: &'a mut Supervisor,
    pub pipeline: &'a Arc<PipelineStats>,
    pub cameras: &'a Cameras,
    /// What the uploader has put in object storage, for the recorder's pruning.
    pub uploaded: Arc<Uploaded>,
}

/// The MQTT link: the client stages publish through, the sender whose drop stops it, and
/// the operator commands (carried out for MQTT and for the review page alike).
pub struct Link {
    pub client: Option<Arc<Mqtt>>,
    pub stop: Option<Sender<()>>,
    pub control: Arc<control::Control>,
    /// Rollouts and halts for the fleet follower (`[fleet]` on).
    pub fleet: Option<Receiver<Incoming>>,
}

/// The model loader's channels: bundles to load, and what became of them.
pub struct Loader {
    pub loads: Sender<Load>,
    pub loaded: Receiver<models::Loaded>,
    /// The bundle the node's model came from (what a rollback returns to).
    pub node_bundle: models::NodeBundle,
}

/// The inference worker's handles.
pub struct Inference {
    /// Frames for the batcher to batch into.
    pub batches: Sender<Vec<Frame>>,
    /// Set at shutdown: batches reaching the worker after it are dropped.
    pub drain_deadline: Arc<Mutex<Option<Instant>>>,
    pub progress: Progress,
}

impl Wiring<'_> {
    /// A watch on a pipe stage: progress within the stage timeout.
    fn watch(&self, progress: &Progress) -> Option<(Progress, std::time::Duration)> {
        Some((progress.clone(), self.config.pipeline.stage_timeout))
    }

    /// Connects MQTT (if enabled) and starts its link and, for command topics, the
    /// control thread, which queues bundle loads on `loads`.
    pub fn mqtt(&mut self, loads: &Sender<Load>) -> anyhow::Result<Link> {
        let config = self.config;
        let control = |mqtt: Option<Arc<Mqtt>>| {
            Arc::new(control::Control {
                mqtt,
                cameras: self.cameras.clone(),
                controls_file: config.state_dir.join(CONTROLS_FILE),
                store: config.recorder.enabled.then(|| config.recorder.dir.clone()),
                models: loads.clone(),
                models_dir: config.model.models_dir.clone(),
            })
        };
        if !config.mqtt.enabled {
            return Ok(Link { client: None, stop: None, control: control(None), fleet: None });
        }
        let ha = &config.homeassistant;
        let (commands_tx, commands_rx) = bounded(64);
        let (fleet_tx, fleet_rx) = bounded(16);
        let subscriptions = Subscriptions {
            birth: ha.enabled.then(|| format!("{}/status", ha.discovery_prefix)),
            commands: config.mqtt.commands.then(|| (control::filters(&config.mqtt.base_topic), commands_tx)),
            fleet: config.fleet.enabled.then(|| (config.mqtt.topic_prefix.clone(), fleet_tx)),
        };
        let (client, link) = Mqtt::start(&config.mqtt, self.pipeline.clone(), subscriptions)?;
        let client = Arc::new(client);
        let (stop_tx, stop_rx) = bounded::<()>(0);
        self.supervisor.spawn("mqtt", Role::Link, None, move || link.run(stop_rx))?;
        let control = control(Some(client.clone()));
        if config.mqtt.commands {
            let (control, client) = (control.clone(), client.clone());
            self.supervisor.spawn("control", Role::Link, None, move || control.run(&client, commands_rx))?;
        }
        let fleet = config.fleet.enabled.then_some(fleet_rx);
        Ok(Link { client: Some(client), stop: Some(stop_tx), control, fleet })
    }

    /// The fleet follower (if `[fleet]` is on): rollouts from `link`, swaps through `loads`.
    pub fn follower(
        &mut self,
        link: &mut Link,
        loads: Sender<Load>,
        node_bundle: models::NodeBundle,
        worker: crate::stats::Progress,
    ) -> anyhow::Result<()> {
        let (Some(incoming), Some(mqtt)) = (link.fleet.take(), link.client.clone()) else { return Ok(()) };
        let config = self.config;
        let follower = Follower {
            node: config.node_id.clone(),
            topic_prefix: config.mqtt.topic_prefix.clone(),
            config: config.fleet.clone(),
            connection: config.upload.clone(),
            models_dir: config.model.models_dir.clone(),
            mqtt,
            loads,
            node_bundle,
            cameras: self.cameras.clone(),
            worker,
            stage_timeout: config.pipeline.stage_timeout,
        };
        self.supervisor.spawn("fleet", Role::Link, None, move || follower.run(incoming))?;
        Ok(())
    }

    /// The model loader: verified bundles go to the worker on `swaps`.
    pub fn loader(
        &mut self,
        link: &Link,
        swaps: Sender<Swap<crate::infer::runtime::OrtDenoiser>>,
        current: CurrentModel,
        inspectors: &[Inspector],
        loads: Sender<Load>,
        loads_rx: Receiver<Load>,
    ) -> anyhow::Result<Loader> {
        let (loaded_tx, loaded) = bounded(8);
        let node_bundle = Arc::new(Mutex::new(self.config.model.path.clone()));
        let loader = models::Loader {
            config: self.config.clone(),
            mqtt: link.client.clone(),
            swaps,
            current,
            node_bundle: node_bundle.clone(),
            running: inspectors.iter().enumerate().map(|(key, i)| (key, i.manifest().clone())).collect(),
            loaded: loaded_tx,
        };
        self.supervisor.spawn("models", Role::Link, None, move || loader.run(loads_rx))?;
        Ok(Loader { loads, loaded, node_bundle })
    }

    /// The recorder (if enabled): its input and the channel for new limits.
    pub fn recorder(&mut self) -> anyhow::Result<Option<(Sender<Inspected>, Sender<RecorderLimits>)>> {
        let config = self.config;
        if !config.recorder.enabled {
            return Ok(None);
        }
        let (tx, rx) = bounded(config.pipeline.output_capacity);
        let (limits_tx, limits_rx) = bounded(4);
        let outbox = config.mqtt.enabled.then_some((config.mqtt.outbox_dir.as_path(), config.mqtt.outbox_max_bytes));
        let recorder = Recorder::open(config.recorder.clone(), self.cameras.clone(), self.pipeline.clone(), outbox)
            .with_context(|| format!("{}: cannot create the capture store", config.recorder.dir.display()))?;
        // The review page shows the flagged frames of its window: making room spares them.
        let recorder =
            if config.http.enabled { recorder.spare_flagged_for(config.http.review_window) } else { recorder };
        // Making room takes what is already in object storage first.
        let recorder =
            if config.upload.enabled { recorder.prune_uploaded_first(self.uploaded.clone()) } else { recorder };
        let progress = Progress::new();
        let watch = self.watch(&progress);
        self.supervisor.spawn("recorder", Role::Pipe, watch, move || recorder.run(rx, limits_rx, progress))?;
        Ok(Some((tx, limits_tx)))
    }

    /// The publisher: its input of verdicts and the channel for new options.
    pub fn publisher(
        &mut self,
        link: &Link,
        recorder: Option<Sender<Inspected>>,
        board: Option<Arc<crate::daemon::web::board::Board>>,
    ) -> anyhow::Result<(Sender<Inspected>, Sender<PublishOptions>)> {
        let (output_tx, output_rx) = bounded(self.config.pipeline.output_capacity);
        let (options, options_rx) = bounded(4);
        let publisher = PublisherContext {
            mqtt: link.client.clone(),
            cameras: self.cameras.clone(),
            node: self.config.node_id.clone(),
            options: PublishOptions::of(self.config),
            recorder,
            board,
        };
        let progress = Progress::new();
        let watch = self.watch(&progress);
        self.supervisor.spawn("publisher", Role::Pipe, watch, move || {
            publish::publisher(publisher, output_rx, options_rx, progress)
        })?;
        Ok((output_tx, options))
    }

    /// The uploader (if `[upload]` is on): its counters and the sender whose drop stops it.
    pub fn uploader(&mut self) -> anyhow::Result<Option<(Arc<UploadStats>, Sender<()>)>> {
        let config = self.config;
        if !config.upload.enabled {
            return Ok(None);
        }
        let stats = Arc::new(UploadStats::default());
        let uploader = Uploader::new(
            config.upload.clone(),
            config.node_id.clone(),
            config.recorder.dir.clone(),
            &config.state_dir,
            stats.clone(),
            self.uploaded.clone(),
        );
        let (stop, stop_rx) = bounded::<()>(0);
        self.supervisor.spawn("upload", Role::Link, None, move || uploader.run(stop_rx))?;
        Ok(Some((stats, stop)))
    }

    /// The inference worker over every loaded model (the node's first), taking swaps from
    /// the loader and handing verdicts to `output`.
    pub fn worker(
        &mut self,
        inspectors: Vec<Inspector>,
        model: &ModelInfo,
        swaps: Receiver<Swap<crate::infer::runtime::OrtDenoiser>>,
        output: Sender<Inspected>,
    ) -> anyhow::Result<Inference> {
        let (batches, batch_rx) = bounded(1);
        let drain_deadline = Arc::new(Mutex::new(None));
        let progress = Progress::new();
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
        let worker = Worker::new(
            loaded_models,
            self.config.model.seed,
            self.cameras.clone(),
            self.pipeline.clone(),
            drain_deadline.clone(),
            progress.clone(),
        );
        let watch = self.watch(&progress);
        self.supervisor.spawn("inference", Role::Pipe, watch, move || worker.run(batch_rx, output, swaps))?;
        Ok(Inference { batches, drain_deadline, progress })
    }

    /// The batcher: camera queues join on the returned sender; dropping the other stops it.
    pub fn batcher(&mut self, batches: Sender<Vec<Frame>>) -> anyhow::Result<(Sender<()>, Sender<Receiver<Frame>>)> {
        let (capture_stop, capture_stop_rx) = bounded::<()>(0);
        let (joins, joins_rx) = bounded(1024);
        let progress = Progress::new();
        let (max_batch, max_wait) = (self.config.pipeline.max_batch, self.config.pipeline.max_wait);
        let watch = self.watch(&progress);
        self.supervisor.spawn("batcher", Role::Pipe, watch, move || {
            batch::run(joins_rx, max_batch, max_wait, batches, capture_stop_rx, progress)
        })?;
        Ok((capture_stop, joins))
    }
}
