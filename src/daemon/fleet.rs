//! Following the fleet's model rollouts (`[fleet]`; the protocol is `crate::fleet`). A
//! node that a rollout names downloads the bundle from object storage into `models_dir`
//! (`<name>-<version>`, checked against `SHA256SUMS` and the rollout's sha256), hands it to
//! the model loader — the hot swap of `<node>/model/set`: verified, golden-checked, swapped
//! between batches with no frame lost — and then *watches* it for `watch_s`:
//!
//! - alert rate: the fraction of inspected frames that alert, against the fraction under
//!   the model before it (once each has `min_frames`); over `max_alert_ratio` × that, and
//!   over `min_alert_fraction`, is a breach;
//! - health: the inference worker not turning within the stage timeout is a breach;
//! - a bundle that fails to verify or that the loader refuses is a breach at once.
//!
//! A breach swaps the previous bundle back (it stays on disk) and raises a halt for the
//! bundle, retained on `<topic_prefix>/fleet/halt/<sha256>`: no node takes it while the halt
//! stands, and a node still watching it rolls back too — the rollout stops. Each step is
//! reported on the retained `<node>/rollout` (`downloading`, `watching`, `running`,
//! `rolled_back`, `refused`, `halted`, `not_targeted`, `failed` with a reason). A download
//! that fails for the store's sake (unreachable, a timeout) is retried every `retry_s`; one that
//! fails for the bundle's (a checksum, a missing file) is a refusal.
//!
//! After a restart the node runs `model.path` again and takes the retained rollout anew (the
//! bundle is on disk: a verify and a swap).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use rumqttc::v5::mqttbytes::QoS;
use serde::Serialize;

use super::cameras::Cameras;
use super::models::{Load, NODE_MODEL, NodeBundle};
use super::mqtt::{Incoming, Mqtt};
use crate::config::{FleetConfig, UploadConfig};
use crate::fleet::{Halt, Rollout, bundle_sha, fetch_bundle, halt_topic, halted_sha, model_topic};
use crate::stats::Progress;
use crate::timestamp;

/// How long one download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a swap may wait for the loader (verification and warm-up included).
const SWAP_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a watched model is checked.
const TICK: Duration = Duration::from_secs(1);
/// Halts remembered (the oldest are forgotten beyond this; their retained messages stay).
const MAX_HALTS: usize = 1024;

/// Inspected frames and alerts of the node's cameras, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    frames: u64,
    alerts: u64,
}

impl Counts {
    fn now(cameras: &Cameras) -> Self {
        cameras.active().iter().fold(Self::default(), |sum, (_, camera)| Self {
            frames: sum.frames + camera.stats.processed.load(Relaxed),
            alerts: sum.alerts + camera.stats.anomalies.load(Relaxed),
        })
    }

    fn since(self, earlier: Self) -> Self {
        Self { frames: self.frames.saturating_sub(earlier.frames), alerts: self.alerts.saturating_sub(earlier.alerts) }
    }

    /// The alert fraction, once there are `min_frames` frames to judge by.
    fn fraction(self, min_frames: u64) -> Option<f64> {
        (self.frames >= min_frames.max(1)).then(|| self.alerts as f64 / self.frames as f64)
    }
}

/// The alert rule: a breach, with its reason, when the fraction since the swap exceeds
/// both the baseline's multiple and the floor.
fn alert_breach(config: &FleetConfig, baseline: Option<f64>, since: Counts) -> Option<String> {
    let fraction = since.fraction(config.min_frames)?;
    let limit =
        baseline.map_or(config.min_alert_fraction, |b| (b * config.max_alert_ratio).max(config.min_alert_fraction));
    (fraction > limit).then(|| {
        let before = baseline.map_or("unknown".into(), |b| format!("{b:.3}"));
        format!(
            "{fraction:.3} of {} frames alerting, over the limit {limit:.3} (before the swap: {before})",
            since.frames
        )
    })
}

/// A rolled-out model and what it replaced.
struct Adopted {
    rollout: Rollout,
    previous: PathBuf,
    swapped: Instant,
    at_swap: Counts,
    /// The previous model's alert fraction, if it inspected enough frames.
    baseline: Option<f64>,
    /// Still within `watch_s`.
    watching: bool,
}

/// The retained `<node>/rollout` state.
#[derive(Serialize)]
struct RolloutState<'a> {
    name: &'a str,
    version: &'a str,
    sha256: &'a str,
    status: &'a str,
    reason: Option<&'a str>,
    at: String,
}

/// Why a bundle did not become the node's model.
enum Failure {
    /// The store could not be reached: try again.
    Store(String),
    /// The bundle is bad (a checksum, a file missing, refused by the loader): a breach.
    Bundle(String),
}

pub struct Follower {
    pub node: String,
    pub topic_prefix: String,
    pub config: FleetConfig,
    /// The object store connection (`[upload]`'s endpoint and credentials).
    pub connection: UploadConfig,
    pub models_dir: PathBuf,
    pub mqtt: Arc<Mqtt>,
    pub loads: Sender<Load>,
    pub node_bundle: NodeBundle,
    pub cameras: Cameras,
    /// The inference worker's progress and its bound: the health rule.
    pub worker: Progress,
    pub stage_timeout: Duration,
}

/// What the follower knows between messages.
#[derive(Default)]
struct State {
    halts: BTreeSet<String>,
    /// Bundles this node refused or rolled back: not taken again.
    refused: BTreeSet<String>,
    adopted: Option<Adopted>,
    /// A rollout whose download failed for the store's sake, and when to try again.
    retry: Option<(Rollout, Instant)>,
    /// Counts at the last swap: the baseline of the next one starts there.
    mark: Counts,
}

impl Follower {
    /// Follows the rollouts arriving on `incoming` until the link is gone.
    pub fn run(self, incoming: Receiver<Incoming>) {
        let mut state = State { mark: Counts::now(&self.cameras), ..State::default() };
        loop {
            let watching = state.adopted.as_ref().is_some_and(|a| a.watching);
            let retry = state.retry.as_ref().map(|(_, at)| at.saturating_duration_since(Instant::now()));
            let wait =
                [watching.then_some(TICK), retry].into_iter().flatten().min().unwrap_or(Duration::from_secs(3600));
            match incoming.recv_timeout(wait) {
                Ok(message) => self.message(&mut state, message),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if let Some((rollout, at)) = state.retry.take() {
                if at <= Instant::now() {
                    self.consider(&mut state, rollout);
                } else {
                    state.retry = Some((rollout, at));
                }
            }
            self.watch(&mut state);
        }
        tracing::debug!("Fleet follower stopped.");
    }

    fn message(&self, state: &mut State, message: Incoming) {
        if let Some(sha) = halted_sha(&self.topic_prefix, &message.topic) {
            if message.payload.is_empty() {
                tracing::info!(sha256 = sha, "Fleet halt lifted.");
                state.halts.remove(sha);
                return;
            }
            if state.halts.len() >= MAX_HALTS {
                state.halts.pop_first();
            }
            state.halts.insert(sha.to_string());
            let halt: Option<Halt> = serde_json::from_slice(&message.payload).ok();
            let adopted = state.adopted.as_ref().is_some_and(|a| a.rollout.sha256 == sha && a.watching);
            if adopted {
                let by = halt.map_or("another node".into(), |h| format!("{}: {}", h.node, h.reason));
                self.roll_back(state, &format!("halted by {by}"), false);
            }
        } else if message.topic == model_topic(&self.topic_prefix) && !message.payload.is_empty() {
            match Rollout::parse(&message.payload) {
                Ok(rollout) => {
                    state.retry = None;
                    self.consider(state, rollout);
                }
                Err(error) => {
                    tracing::warn!(topic = %message.topic, error = %error, "Fleet rollout message refused.");
                    let reply = serde_json::json!({ "topic": message.topic, "error": error });
                    self.mqtt.publish(
                        "error",
                        QoS::AtLeastOnce,
                        false,
                        serde_json::to_vec(&reply).expect("serialises"),
                    );
                }
            }
        }
    }

    /// Takes `rollout` if it names this node, is not halted or refused, and is not running.
    fn consider(&self, state: &mut State, rollout: Rollout) {
        let sha = rollout.sha256.as_str();
        if state.halts.contains(sha) {
            return self.report(&rollout, "halted", Some("a node rolled this bundle back; the rollout stopped"));
        }
        if state.refused.contains(sha) {
            return self.report(&rollout, "refused", Some("this node refused or rolled back this bundle before"));
        }
        if !rollout.includes(&self.node) {
            return self.report(&rollout, "not_targeted", None);
        }
        let previous = self.node_bundle.lock().expect("bundle lock").clone();
        if bundle_sha(&previous).is_ok_and(|running| running == sha) {
            return self.report(&rollout, "running", None);
        }
        self.report(&rollout, "downloading", None);
        match self.fetch(&rollout).and_then(|dir| self.swap(dir).map_err(Failure::Bundle)) {
            Ok(()) => {
                let now = Counts::now(&self.cameras);
                let baseline = now.since(state.mark).fraction(self.config.min_frames);
                tracing::info!(name = %rollout.name, version = %rollout.version, "Rolled-out model running; watching it.");
                self.report(&rollout, "watching", None);
                state.mark = now;
                let watching = true;
                state.adopted =
                    Some(Adopted { rollout, previous, swapped: Instant::now(), at_swap: now, baseline, watching });
            }
            Err(Failure::Store(error)) => {
                tracing::warn!(url = %rollout.url, error = %error, "Cannot download the rolled-out bundle; trying again.");
                self.report(&rollout, "failed", Some(&error));
                state.retry = Some((rollout, Instant::now() + self.config.retry));
            }
            Err(Failure::Bundle(error)) => {
                tracing::error!(url = %rollout.url, error = %error, "Rolled-out bundle refused; halting the rollout.");
                state.refused.insert(rollout.sha256.clone());
                self.report(&rollout, "refused", Some(&error));
                self.halt(&rollout, &error);
            }
        }
    }

    /// Downloads and checks the bundle into `models_dir`.
    fn fetch(&self, rollout: &Rollout) -> Result<PathBuf, Failure> {
        let dest = rollout.bundle_dir(&self.models_dir);
        let (bucket, folder) = crate::objects::split_url(&rollout.url).map_err(|e| Failure::Bundle(e.to_string()))?;
        let store = crate::objects::configured_client(&self.connection, bucket, FETCH_TIMEOUT)
            .map_err(|e| Failure::Store(e.to_string()))?;
        let runtime = crate::objects::runtime().map_err(|e| Failure::Store(e.to_string()))?;
        runtime.block_on(fetch_bundle(&store, &folder, &rollout.sha256, &dest)).map_err(|e| {
            let unreachable = e.chain().any(|cause| {
                cause
                    .downcast_ref::<object_store::Error>()
                    .is_some_and(|o| !matches!(o, object_store::Error::NotFound { .. }))
            });
            if unreachable { Failure::Store(format!("{e:#}")) } else { Failure::Bundle(format!("{e:#}")) }
        })?;
        Ok(dest)
    }

    /// Has the loader swap the node's model to `bundle` and waits for the outcome.
    fn swap(&self, bundle: PathBuf) -> Result<(), String> {
        let (reply, outcome) = bounded(1);
        let load = Load { key: NODE_MODEL, path: bundle, reply: Some(reply) };
        self.loads.send_timeout(load, SWAP_TIMEOUT).map_err(|_| "the model loader is not taking loads".to_string())?;
        outcome.recv_timeout(SWAP_TIMEOUT).map_err(|_| "the model loader did not answer".to_string())?
    }

    /// Checks the watched model against the rules; rolls it back on a breach, and lets it
    /// be once `watch_s` has passed.
    fn watch(&self, state: &mut State) {
        let Some(adopted) = state.adopted.as_mut().filter(|a| a.watching) else { return };
        let since = Counts::now(&self.cameras).since(adopted.at_swap);
        let stalled = self.worker.stuck_past(self.stage_timeout);
        let breach = match stalled {
            Some(for_) => Some(format!("the inference worker has not turned for {:.0} s", for_.as_secs_f64())),
            None => alert_breach(&self.config, adopted.baseline, since),
        };
        if let Some(reason) = breach {
            self.roll_back(state, &reason, true);
        } else if adopted.swapped.elapsed() >= self.config.watch {
            adopted.watching = false;
            tracing::info!(name = %adopted.rollout.name, version = %adopted.rollout.version, "Rolled-out model passed its watch.");
            self.report(&adopted.rollout, "running", None);
        }
    }

    /// Swaps the previous bundle back, refuses the watched one from now on and, if this
    /// node found the breach (`raise`), halts the rollout.
    fn roll_back(&self, state: &mut State, reason: &str, raise: bool) {
        let Some(adopted) = state.adopted.take() else { return };
        let rollout = &adopted.rollout;
        tracing::error!(name = %rollout.name, version = %rollout.version, reason, "Rolling the rolled-out model back.");
        let reason = match self.swap(adopted.previous.clone()) {
            Ok(()) => reason.to_string(),
            Err(error) => format!("{reason}; the rollback failed too: {error}"),
        };
        state.refused.insert(rollout.sha256.clone());
        state.mark = Counts::now(&self.cameras);
        self.report(rollout, "rolled_back", Some(&reason));
        if raise {
            self.halt(rollout, &reason);
        }
    }

    fn halt(&self, rollout: &Rollout, reason: &str) {
        let halt = Halt {
            name: rollout.name.clone(),
            version: rollout.version.clone(),
            sha256: rollout.sha256.clone(),
            node: self.node.clone(),
            reason: reason.to_string(),
            at: timestamp::now(),
        };
        let topic = halt_topic(&self.topic_prefix, &rollout.sha256);
        self.mqtt.publish_at(topic, QoS::AtLeastOnce, true, serde_json::to_vec(&halt).expect("serialises"));
    }

    fn report(&self, rollout: &Rollout, status: &str, reason: Option<&str>) {
        tracing::debug!(name = %rollout.name, version = %rollout.version, status, reason, "Rollout state.");
        let state = RolloutState {
            name: &rollout.name,
            version: &rollout.version,
            sha256: &rollout.sha256,
            status,
            reason,
            at: timestamp::now(),
        };
        self.mqtt.publish("rollout", QoS::AtLeastOnce, true, serde_json::to_vec(&state).expect("serialises"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alert_rule_judges_after_enough_frames_against_the_model_before() {
        let config = FleetConfig {
            enabled: true,
            watch: Duration::from_secs(60),
            retry: Duration::from_secs(30),
            max_alert_ratio: 3.0,
            min_alert_fraction: 0.1,
            min_frames: 20,
        };
        let counts = |frames, alerts| Counts { frames, alerts };
        assert_eq!(alert_breach(&config, Some(0.0), counts(19, 19)), None, "too few frames to judge");
        assert_eq!(alert_breach(&config, Some(0.0), counts(20, 2)), None, "the floor: 0.1");
        assert!(alert_breach(&config, Some(0.0), counts(20, 3)).is_some());
        assert_eq!(alert_breach(&config, Some(0.2), counts(100, 60)), None, "3 × 0.2");
        let breach = alert_breach(&config, Some(0.2), counts(100, 61)).unwrap();
        assert!(breach.contains("0.610 of 100 frames") && breach.contains("0.600") && breach.contains("0.200"));
        assert!(alert_breach(&config, None, counts(100, 11)).is_some(), "no baseline: the floor alone");
        assert_eq!(counts(5, 1).since(counts(7, 0)), counts(0, 1), "counters never go below zero");
    }
}
