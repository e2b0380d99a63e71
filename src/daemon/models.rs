//! Model lifecycle while the daemon runs: a bundle named by `<node>/model/set` (a directory
//! under `model.models_dir`) is loaded, verified — sha256, graph contract, golden check, which
//! is also its warm-up — and checked against the running pipeline on this thread, while the
//! current model keeps inspecting; then the inference worker takes it over between batches
//! (no batch mixes models, no frame is dropped for it). If anything fails, the current model
//! stays and the error is published. The retained `<node>/model` state says what runs: name,
//! version, sha256, path, when it was loaded, and the last error. A `model/set` to an
//! earlier bundle is the rollback.
//!
//! A bundle with another input (size, channels, normalisation) or inspection (resize vs
//! tiles, scale, stride) than the running one is refused: the capture threads prepare frames
//! for the running model, so such a change needs a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};
use rumqttc::QoS;
use serde::Serialize;

use super::mqtt::Mqtt;
use super::worker::Swap;
use crate::config::DaemonConfig;
use crate::frame::ModelRef;
use crate::infer::bundle::Bundle;
use crate::infer::inspect::Inspector;
use crate::infer::runtime::OrtDenoiser;
use crate::model::manifest::{Manifest, now_rfc3339};

/// How verdicts name the model of `manifest`.
pub fn model_ref(manifest: &Manifest) -> ModelRef {
    ModelRef {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: manifest.artifact.sha256.clone(),
        image_threshold: manifest.thresholds.image.value,
    }
}

/// The model now in use, for `stats` and `/metrics`.
pub type CurrentModel = Arc<Mutex<Arc<ModelRef>>>;

/// The retained `<node>/model` state.
#[derive(Debug, Serialize)]
struct ModelState<'a> {
    name: &'a str,
    version: &'a str,
    sha256: &'a str,
    path: String,
    loaded_at: &'a str,
    last_error: Option<&'a str>,
}

pub struct Loader {
    pub config: DaemonConfig,
    pub mqtt: Arc<Mqtt>,
    pub swaps: Sender<Swap<OrtDenoiser>>,
    pub current: CurrentModel,
    /// The running bundle's manifest: what a new one must match.
    pub running: Manifest,
}

impl Loader {
    /// Publishes the state, then carries out `requests` (bundle directories) until they close.
    pub fn run(mut self, requests: Receiver<PathBuf>) {
        let (mut path, mut loaded_at) = (self.config.model.path.clone(), now_rfc3339());
        self.publish(&path, &loaded_at, None);
        for request in requests {
            tracing::info!(model = %request.display(), "Loading a model to swap in.");
            match self.load(&request) {
                Ok((swap, manifest, at)) => {
                    let model = swap.model.clone();
                    if self.swaps.send(swap).is_err() {
                        return; // the worker is gone: the daemon is stopping
                    }
                    *self.current.lock().expect("model lock") = model;
                    (path, loaded_at, self.running) = (at, now_rfc3339(), manifest);
                    self.publish(&path, &loaded_at, None);
                }
                Err(error) => {
                    tracing::error!(model = %request.display(), error = %error, "Model not swapped; the current one stays.");
                    self.publish(&path, &loaded_at, Some(&error));
                }
            }
        }
        tracing::debug!("Model loader stopped.");
    }

    /// Loads, verifies and warms up the bundle at `path`; checks it fits the running pipeline.
    fn load(&self, path: &Path) -> Result<(Swap<OrtDenoiser>, Manifest, PathBuf), String> {
        let bundle = Bundle::load(path, &self.config.runtime).map_err(|e| e.to_string())?;
        let (new, old) = (&bundle.manifest, &self.running);
        if new.input != old.input || new.inspection != old.inspection {
            return Err(format!(
                "{}: input {:?} / {:?} differs from the running model's {:?} / {:?}; that needs a restart",
                path.display(),
                new.input,
                new.inspection,
                old.input,
                old.inspection
            ));
        }
        let m = &self.config.model;
        let spec = new.reconstruction.with_overrides(m.t0, m.steps, m.sampler, m.eta, None);
        let manifest = bundle.manifest.clone();
        let inspector = Inspector::new(bundle, Some(spec))
            .map_err(|e| e.to_string())?
            .with_tile_batch(self.config.pipeline.max_batch);
        let model = Arc::new(model_ref(&manifest));
        Ok((Swap { inspector, model }, manifest, path.to_path_buf()))
    }

    fn publish(&self, path: &std::path::Path, loaded_at: &str, last_error: Option<&str>) {
        let current = self.current.lock().expect("model lock").clone();
        let state = ModelState {
            name: &current.name,
            version: &current.version,
            sha256: &current.sha256,
            path: path.display().to_string(),
            loaded_at,
            last_error,
        };
        let payload = serde_json::to_vec(&state).expect("serialises");
        self.mqtt.publish("model", QoS::AtLeastOnce, true, payload);
    }
}
