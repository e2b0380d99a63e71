//! Model lifecycle while the daemon runs: a bundle named by `<node>/model/set` (a directory
//! under `model.models_dir`), a moved `current` link or a camera's own `model` after a
//! SIGHUP is loaded, verified — sha256, graph contract, golden check, which
//! is also its warm-up — and checked against the running pipeline on this thread, while the
//! current model keeps inspecting; then the inference worker takes it over between batches
//! (no batch mixes models, no frame is dropped for it). If anything fails, the current model
//! stays and the error is published. The retained `<node>/model` state says what runs: name,
//! version, sha256, path, when it was loaded, and the last error. A `model/set` to an
//! earlier bundle is the rollback.
//!
//! Models have keys: 0 is the node's (`model.path`, what `<node>/model` reports), the others
//! are the cameras' own bundles, each loaded once however many cameras name it. A swap of a
//! loaded model with another input (size, channels, normalisation) or inspection (resize vs
//! tiles, scale, stride) is refused: the capture threads prepare frames for the running
//! model, so such a change needs a restart (or a camera that names the new bundle).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use rumqttc::v5::mqttbytes::QoS;
use serde::Serialize;

use super::mqtt::Mqtt;
use super::worker::Swap;
use crate::config::DaemonConfig;
use crate::frame::ModelRef;
use crate::infer::batch_size::{self, TileBatch};
use crate::infer::bundle::{Bundle, BundleError};
use crate::infer::inspect::Inspector;
use crate::infer::runtime::OrtDenoiser;
use crate::model::manifest::Manifest;
use crate::postprocess::screen::ScreenChoice;
use crate::timestamp;

/// How verdicts name the model of `manifest`.
pub fn model_ref(manifest: &Manifest) -> ModelRef {
    ModelRef {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        sha256: manifest.artifact.sha256.clone(),
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
    /// The sha256 of the bundle's manifest: its identity in fleet rollouts (`fleet`).
    bundle_sha256: Option<String>,
    path: String,
    loaded_at: &'a str,
    last_error: Option<&'a str>,
}

/// A bundle to load as model `key`: a swap of a loaded model, or a new one for a camera
/// that names it. Key 0 is the node's model (`model.path`, `<node>/model/set`).
#[derive(Debug, Clone)]
pub struct Load {
    pub key: usize,
    pub path: PathBuf,
    /// Where the outcome goes as well (the fleet follower waits for its swaps).
    pub reply: Option<Sender<Result<(), String>>>,
}

impl Load {
    pub fn new(key: usize, path: PathBuf) -> Self {
        Self { key, path, reply: None }
    }
}

/// The bundle directory the node's model was loaded from (what a rollback returns to).
pub type NodeBundle = Arc<Mutex<PathBuf>>;

/// The node's model: the one `<node>/model` reports and `model/set` swaps.
pub const NODE_MODEL: usize = 0;

/// What became of a [`Load`], for the main thread (a camera waiting for its model starts):
/// the key and the manifest of the model that now runs under it, or why not.
pub type Loaded = (usize, Result<Manifest, String>);

pub struct Loader {
    pub config: DaemonConfig,
    pub mqtt: Option<Arc<Mqtt>>,
    pub swaps: Sender<Swap<OrtDenoiser>>,
    /// The node's model, for `stats` and `/metrics`, and the bundle it came from.
    pub current: CurrentModel,
    pub node_bundle: NodeBundle,
    /// The manifests of the loaded models: what a swap of one must match.
    pub running: BTreeMap<usize, Manifest>,
    pub loaded: Sender<Loaded>,
}

impl Loader {
    /// Publishes the state, then carries out `requests` until they close.
    pub fn run(mut self, requests: Receiver<Load>) {
        let mut loaded_at = timestamp::now();
        self.publish(&loaded_at, None);
        for request in requests {
            let Load { key, path: bundle, reply } = &request;
            tracing::info!(key, model = %bundle.display(), "Loading a model.");
            let result = self.load(&request).and_then(|(swap, manifest)| {
                let model = swap.model.clone();
                // The worker gone means the daemon is stopping.
                self.swaps.send(swap).map_err(|_| "the inference worker has stopped".to_string())?;
                self.running.insert(*key, manifest.clone());
                if *key == NODE_MODEL {
                    *self.current.lock().expect("model lock") = model;
                    *self.node_bundle.lock().expect("bundle lock") = bundle.clone();
                    loaded_at = timestamp::now();
                }
                Ok(manifest)
            });
            if let Err(error) = &result {
                tracing::error!(key, model = %bundle.display(), error = %error, "Model not loaded; the current one stays.");
            }
            if *key == NODE_MODEL {
                self.publish(&loaded_at, result.as_ref().err().map(String::as_str));
            }
            if let Some(reply) = reply {
                let _ = reply.try_send(result.as_ref().map(|_| ()).map_err(Clone::clone));
            }
            if self.loaded.send((*key, result)).is_err() {
                break;
            }
        }
        tracing::debug!("Model loader stopped.");
    }

    /// Loads, verifies and warms up the bundle; a swap must fit the pipeline of the model
    /// it replaces.
    fn load(&self, request: &Load) -> Result<(Swap<OrtDenoiser>, Manifest), String> {
        let path = &request.path;
        let mut bundle = Bundle::load(path, &self.config.runtime).map_err(|e| e.to_string())?;
        choose_screen(&mut bundle, &self.config)?;
        if let Some(old) = self.running.get(&request.key) {
            let new = &bundle.manifest;
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
        }
        let manifest = bundle.manifest.clone();
        let inspector = inspector(bundle, &self.config).map_err(|e| e.to_string())?;
        let model = Arc::new(model_ref(&manifest));
        Ok((Swap { key: request.key, inspector, model }, manifest))
    }

    fn publish(&self, loaded_at: &str, last_error: Option<&str>) {
        let Some(mqtt) = &self.mqtt else { return };
        let current = self.current.lock().expect("model lock").clone();
        let path = self.node_bundle.lock().expect("bundle lock").clone();
        let state = ModelState {
            name: &current.name,
            version: &current.version,
            sha256: &current.sha256,
            bundle_sha256: crate::fleet::bundle_sha(&path).ok(),
            path: path.display().to_string(),
            loaded_at,
            last_error,
        };
        let payload = serde_json::to_vec(&state).expect("serialises");
        mqtt.publish("model", QoS::AtLeastOnce, true, payload);
    }
}

/// The inspector the daemon runs for `bundle`: the config's reconstruction overrides and
/// tile batch applied.
pub fn inspector(mut bundle: Bundle, config: &DaemonConfig) -> Result<Inspector, BundleError> {
    let m = &config.model;
    let spec = bundle.manifest.reconstruction.with_overrides(m.t0, m.steps, m.sampler, m.eta, None);
    let tiles = tile_batch(&mut bundle, config.runtime.tile_batch)?;
    Ok(Inspector::new(bundle, Some(spec))?.with_tile_batch(tiles))
}

/// Makes the config's `model.screen_recall` the screen `bundle` runs; an error names the
/// bundle and the recalls it has.
pub fn choose_screen(bundle: &mut Bundle, config: &DaemonConfig) -> Result<(), String> {
    let choice = config.model.screen_recall;
    bundle.manifest.choose_screen(choice).map_err(|e| format!("{}: {e}", bundle.dir.display()))?;
    if choice != ScreenChoice::Bundle {
        let recall = bundle.manifest.anomaly.screen.map(|s| s.recall_target);
        tracing::info!(model = %bundle.dir.display(), ?recall, "Cascade screen chosen by model.screen_recall.");
    }
    Ok(())
}

/// Tiles per UNet call for `bundle`'s session: the config's, or probed on the warm session
/// (`infer::batch_size`; the golden check at load was its first call).
fn tile_batch(bundle: &mut Bundle, setting: TileBatch) -> Result<usize, BundleError> {
    if let TileBatch::Fixed(n) = setting {
        return Ok(n);
    }
    let input = bundle.manifest.input;
    let provider = bundle.denoiser.provider();
    let start = Instant::now();
    let tile = [input.channels, input.height, input.width];
    let probe =
        batch_size::probe(&mut bundle.denoiser, tile, batch_size::candidates(provider), &mut || start.elapsed())?;
    let measured: Vec<String> = probe.measured.iter().map(|(n, rate)| format!("{n}: {rate:.0}/s")).collect();
    tracing::info!(model = %bundle.dir.display(), %provider, tile_batch = probe.chosen, measured = %measured.join(", "),
        took_ms = start.elapsed().as_millis() as u64, "Tile batch chosen for the device.");
    Ok(probe.chosen)
}
