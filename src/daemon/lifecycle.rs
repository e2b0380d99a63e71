//! The cameras and models while the daemon runs, as the main thread changes them: a
//! camera starts in its slot (or waits for its model), stops, is retired; a loaded model
//! lets its cameras start; a stalled camera is marked offline and reopened; a SIGHUP's
//! [`reload::plan`] is carried out. Beside the registry of cameras (`cameras`), which
//! the other threads read.

use crate::capture::trigger::TriggerMode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;

use anyhow::Context;
use crossbeam_channel::{Sender, bounded};
use rumqttc::v5::mqttbytes::QoS;

use super::models::{Load, NODE_MODEL};
use super::mqtt::control;
use super::reload::{self, CameraAction};
use super::supervisor::Role;
use super::{CONTROLS_FILE, Running, load_config};
use crate::capture::CameraConfig;
use crate::capture::thread::CaptureLoop;
use crate::config::DaemonConfig;
use crate::stats::CameraStatus;

/// A model the daemon knows, by key (the index in [`Running::models`]; 0 is the node's).
pub(super) struct ModelSlot {
    pub(super) path: std::path::PathBuf,
    /// The loaded bundle's manifest; `None` while it loads or after it failed to.
    pub(super) manifest: Option<crate::model::manifest::Manifest>,
}

/// A configured camera whose capture thread runs.
pub(super) struct RunningCamera {
    config: CameraConfig,
    /// Dropped to stop its capture thread.
    stop: Sender<()>,
    /// Set when the camera stalled, so its thread reopens the source.
    reopen: Arc<AtomicBool>,
}

impl Running {
    /// The key of the model `camera` runs: the node's, or its own bundle's (loaded once,
    /// whichever camera named it first). A bundle not known yet gets a key and is loaded.
    fn model_key(&mut self, camera: &CameraConfig) -> usize {
        let Some(path) = &camera.model else { return NODE_MODEL };
        if let Some(key) = self.models.iter().position(|m| &m.path == path) {
            return key;
        }
        self.models.push(ModelSlot { path: path.clone(), manifest: None });
        let key = self.models.len() - 1;
        tracing::info!(camera = %camera.id, key, model = %path.display(), "Loading the camera's model.");
        self.request_load(Load::new(key, path.clone()));
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
    pub(super) fn start_camera(&mut self, camera: CameraConfig) -> anyhow::Result<()> {
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
            triggers: entry.triggers.clone(),
            enable_at_run_time: self.config.mqtt.enabled && self.config.mqtt.commands,
            inspect_mask: Default::default(),
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

    /// The loader's answer for model `key`: the manifest is recorded and the cameras that
    /// waited for it start; a model that failed to load keeps them out (published on
    /// `<node>/error`) until a reload names a bundle that loads.
    pub(super) fn model_loaded(&mut self, key: usize, manifest: Result<crate::model::manifest::Manifest, String>) {
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

    /// SIGHUP: the config file is checked in full first (as `check-config`); an invalid one
    /// changes nothing and its errors are logged and published on `<node>/error`. A valid
    /// one is applied as far as it can be while frames flow: cameras added, removed or
    /// changed (only the changed ones restart their capture; the others are untouched),
    /// each model whose path now holds another bundle swapped, publishing and recorder
    /// options handed on. What is left different needs a restart, and is logged as such.
    pub(super) fn reload(&mut self) {
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
                    self.request_load(Load::new(key, path.clone()));
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
                    self.start_camera(*camera.clone())?;
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
    /// and told to reopen (a triggered replay waiting for its next trigger is idle, not stalled).
    pub(super) fn check_stalls(&self) {
        for (slot, camera) in &self.running {
            let entry = self.cameras.get(*slot);
            let s = &entry.stats;
            let on_demand = camera.config.trigger != TriggerMode::Free && camera.config.source.on_demand();
            if on_demand && !entry.triggers.waiting() {
                continue;
            }
            if s.status() == CameraStatus::Online && s.since_progress() > camera.config.stall_timeout {
                tracing::warn!(camera = %camera.config.id, stalled_ms = s.since_progress().as_millis() as u64, "Camera stalled.");
                s.stalls.fetch_add(1, Relaxed);
                *s.status.lock().expect("stats lock") = CameraStatus::Offline;
                camera.reopen.store(true, Relaxed);
                self.publish_status(*slot, CameraStatus::Offline);
            }
        }
    }

    pub(super) fn publish_status(&self, slot: usize, status: CameraStatus) {
        let camera = self.cameras.get(slot);
        // A camera removed by a reload stays offline, whatever its last thread says.
        let status = if camera.active() { status } else { CameraStatus::Offline };
        tracing::info!(camera = %camera.id, status = status.as_str(), "Camera status.");
        if let Some(mqtt) = &self.mqtt {
            mqtt.publish(&format!("{}/status", camera.id), QoS::AtLeastOnce, true, status.as_str().into());
        }
    }
}
