//! The inference worker: batches of frames through the [`Inspector`], verdicts on to the
//! publisher.
//!
//! It owns what a batch costs and what becomes of it: per-frame seeds (camera and sequence,
//! so a replay is reproducible), the timing counters, drops by reason (`inference_error`
//! for a failed batch, `output_full` when the publisher lags, `shutdown` for batches that
//! arrive after the drain deadline). It beats its [`Progress`] at every turn and after
//! every UNet batch of tiles, so a long frame is visibly alive and a hung call is not.
//! Generic over the denoiser: unit-tested with a fake.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::cameras::Cameras;

use crate::frame::{Frame, Inspected, ModelRef};
use crate::infer::inspect::{FrameView, Inspector};
use crate::infer::runtime::Denoiser;
use crate::stats::{DropReason, LogThrottle, PipelineStats, Progress};

/// A verified, warmed-up model for the worker: it takes over `key` between batches (a
/// swap), or adds it (a model for a camera that has just been configured).
pub struct Swap<D: Denoiser> {
    pub key: usize,
    pub inspector: Inspector<D>,
    pub model: Arc<ModelRef>,
}

/// One loaded model: what inspects and how verdicts name it.
struct Loaded<D: Denoiser> {
    /// Its progress callback beats the worker's progress (see [`Worker::new`]).
    inspector: Inspector<D>,
    model: Arc<ModelRef>,
}

/// Everything the inference worker needs.
pub struct Worker<D: Denoiser> {
    /// Every model frames may name ([`Frame::model`]), each loaded once and shared by the
    /// cameras that name it.
    models: BTreeMap<usize, Loaded<D>>,
    seed: u64,
    cameras: Cameras,
    pipeline: Arc<PipelineStats>,
    /// Set at shutdown: batches still arriving after it are dropped.
    drain_deadline: Arc<Mutex<Option<Instant>>>,
    progress: Progress,
    failures: LogThrottle,
}

impl<D: Denoiser> Worker<D> {
    pub fn new(
        models: Vec<Swap<D>>,
        seed: u64,
        cameras: Cameras,
        pipeline: Arc<PipelineStats>,
        drain_deadline: Arc<Mutex<Option<Instant>>>,
        progress: Progress,
    ) -> Self {
        let failures = LogThrottle::new(Duration::from_secs(10));
        let mut worker = Self { models: BTreeMap::new(), seed, cameras, pipeline, drain_deadline, progress, failures };
        models.into_iter().for_each(|m| worker.take_over(m));
        worker
    }

    fn take_over(&mut self, swap: Swap<D>) {
        let beat = self.progress.clone();
        let inspector = swap.inspector.with_progress(move || beat.beat());
        match self.models.insert(swap.key, Loaded { inspector, model: swap.model.clone() }) {
            Some(old) => {
                tracing::info!(key = swap.key, from = %old.model.sha256, to = %swap.model.sha256, model = %swap.model.name, "Model swapped.")
            }
            None => tracing::debug!(key = swap.key, model = %swap.model.name, "Model added."),
        }
    }

    /// The inference loop: ends when the batcher is gone, or when the publisher is (the
    /// supervisor then sees the pipeline end instead of a worker inspecting for nobody). A
    /// model on `swaps` takes over between batches, and while no frames flow (the loader
    /// must not wait for frames to hand over the next one): no batch mixes models, and the
    /// swap costs no frame.
    pub fn run(mut self, batches: Receiver<Vec<Frame>>, output: Sender<Inspected>, mut swaps: Receiver<Swap<D>>) {
        let hang = std::env::var("EDGE_INSPECT_FAULT").is_ok_and(|f| f == "inference-hang");
        loop {
            self.progress.beat();
            let batch = crossbeam_channel::select! {
                recv(swaps) -> swap => {
                    match swap {
                        Ok(swap) => self.take_over(swap),
                        // The loader has stopped: no more swaps, and no wake-ups from it.
                        Err(_) => swaps = crossbeam_channel::never(),
                    }
                    continue;
                }
                recv(batches) -> batch => match batch {
                    Ok(batch) => batch,
                    Err(_) => break,
                },
                default(Progress::TURN) => continue,
            };
            // A swap sent before this batch's frames were captured takes over first.
            for swap in swaps.try_iter() {
                self.take_over(swap);
            }
            // Fault drill (docs/deploy.md): a UNet call that never returns.
            if hang {
                tracing::warn!("Injected fault: the inference worker hangs.");
                loop {
                    std::thread::park();
                }
            }
            if !self.inspect(batch, &output) {
                tracing::error!("The publisher has stopped; the inference worker stops.");
                return;
            }
        }
        tracing::debug!("Inference worker stopped.");
    }

    /// The stop's drain deadline has passed.
    fn past_deadline(&self) -> bool {
        self.drain_deadline.lock().expect("deadline lock").is_some_and(|d| Instant::now() > d)
    }

    /// Inspects one batch and hands its verdicts on; `false` when the publisher is gone.
    fn inspect(&mut self, batch: Vec<Frame>, output: &Sender<Inspected>) -> bool {
        if self.past_deadline() {
            self.drop_all(&batch, DropReason::Shutdown);
            return true;
        }
        let frames: Vec<FrameView<'_>> = batch
            .iter()
            .map(|f| FrameView {
                tensor: &f.tensor,
                size: [f.display.height() as usize, f.display.width() as usize],
                sensitivity: self.cameras.get(f.camera).controls.sensitivity(),
                inspect: f.inspect.as_deref().map(Vec::as_slice),
            })
            .collect();
        let seeds: Vec<u64> =
            batch.iter().map(|f| self.seed.wrapping_add((f.camera as u64) << 40).wrapping_add(f.seq)).collect();
        // The batcher keeps models apart, and a camera starts only once its model is here.
        let Some(loaded) = self.models.get_mut(&batch[0].model) else {
            tracing::error!(key = batch[0].model, "A batch names a model that is not loaded; dropped.");
            self.drop_all(&batch, DropReason::InferenceError);
            return true;
        };
        let started = Instant::now();
        let [tiles, screened] = loaded.inspector.tile_counts();
        let result = loaded.inspector.inspect(&frames, &seeds);
        let [tiles_after, screened_after] = loaded.inspector.tile_counts();
        let model = loaded.model.clone();
        drop(frames);
        let elapsed = started.elapsed().as_micros() as u64;
        self.pipeline.tiles.fetch_add(tiles_after.saturating_sub(tiles) as u64, Relaxed);
        self.pipeline.tiles_screened.fetch_add(screened_after.saturating_sub(screened) as u64, Relaxed);
        self.pipeline.batches.fetch_add(1, Relaxed);
        self.pipeline.batched_frames.fetch_add(batch.len() as u64, Relaxed);
        self.pipeline.inference_us.fetch_add(elapsed, Relaxed);
        self.pipeline.last_inference_us.store(elapsed, Relaxed);
        self.pipeline.inference_seconds.observe(elapsed as f64 / 1e6);
        self.pipeline.batch_frames.observe(batch.len() as f64);
        let analyses = match result {
            Ok(analyses) => analyses,
            // The stop terminated the run at its drain deadline: a shutdown, not a failure.
            Err(_) if self.past_deadline() => {
                self.drop_all(&batch, DropReason::Shutdown);
                return true;
            }
            Err(e) => {
                if let Some(suppressed) = self.failures.admit() {
                    tracing::error!(error = %e, frames = batch.len(), suppressed, "Inference failed; batch dropped.");
                }
                self.drop_all(&batch, DropReason::InferenceError);
                return true;
            }
        };
        for (frame, analysis) in batch.into_iter().zip(analyses) {
            let camera = self.cameras.get(frame.camera);
            camera.stats.processed.fetch_add(1, Relaxed);
            let seq = frame.seq;
            match output.try_send(Inspected { frame, analysis, model: model.clone() }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    camera.stats.drop_frame(DropReason::OutputFull);
                    camera.triggers.lost(seq, DropReason::OutputFull.as_str());
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        true
    }

    fn drop_all(&self, batch: &[Frame], reason: DropReason) {
        for f in batch {
            let camera = self.cameras.get(f.camera);
            camera.stats.drop_frame(reason);
            camera.triggers.lost(f.seq, reason.as_str());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::infer::bundle::read_manifest;
    use crate::infer::runtime::{FnDenoiser, RuntimeError};
    use crate::model::preprocess::Inspection;
    use crate::postprocess::anomaly::Analysis;
    use crate::stats::CameraStats;
    use std::path::Path;

    fn model_ref() -> Arc<ModelRef> {
        Arc::new(ModelRef { name: "fake".into(), version: "1".into(), sha256: "f".into() })
    }

    /// The demo bundle's manifest as a one-tile (64×64) model.
    fn manifest() -> crate::model::manifest::Manifest {
        let mut manifest = read_manifest(Path::new("models/brick-huber")).unwrap();
        manifest.inspection = Inspection::Resize;
        manifest.ensemble = None;
        manifest
    }

    /// A worker over a fake denoiser, with what the tests watch it through.
    struct Rig<D: Denoiser> {
        worker: Worker<D>,
        cameras: Vec<Arc<CameraStats>>,
        deadline: Arc<Mutex<Option<Instant>>>,
    }

    /// Cameras `ids` in slots 0, 1, …, and their counters.
    fn cameras(ids: &[&str]) -> (Cameras, Vec<Arc<CameraStats>>) {
        let cameras = Cameras::default();
        let stats = ids
            .iter()
            .map(|id| cameras.activate(id, 2, || crate::controls::Controls::new(true, 1.0)).0)
            .map(|slot| cameras.get(slot).stats.clone())
            .collect();
        (cameras, stats)
    }

    fn model<D: Denoiser>(key: usize, inspector: Inspector<D>) -> Swap<D> {
        Swap { key, inspector, model: model_ref() }
    }

    fn rig<D: Denoiser>(denoiser: D) -> Rig<D> {
        let inspector = Inspector::from_parts("fake".into(), manifest(), denoiser, None, None).unwrap();
        let (registry, cameras) = cameras(&["a", "b"]);
        let deadline = Arc::new(Mutex::new(None));
        let worker =
            Worker::new(vec![model(0, inspector)], 7, registry, Arc::default(), deadline.clone(), Progress::new());
        Rig { worker, cameras, deadline }
    }

    #[test]
    fn verdicts_go_on_in_order_and_every_frame_is_accounted_for() {
        let Rig { worker: w, cameras, .. } = rig(FnDenoiser(|_, x, _| 0.3 * x));
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(2);
        batch_tx.send(vec![Frame::uniform(0, 1, [64, 64], 0.1), Frame::uniform(1, 1, [64, 64], -0.2)]).unwrap();
        // Three verdicts for a two-slot output: the third is an `output_full` drop.
        batch_tx.send(vec![Frame::uniform(0, 2, [64, 64], 0.0)]).unwrap();
        // The worker returns when its input closes: every batch has been dealt with then.
        drop(batch_tx);
        w.run(batch_rx, out_tx, crossbeam_channel::never());
        let seqs: Vec<(usize, u64)> = out_rx.try_iter().map(|i| (i.frame.camera, i.frame.seq)).collect();
        assert_eq!(seqs, vec![(0, 1), (1, 1)]);
        assert_eq!(cameras[0].drops(DropReason::OutputFull), 1);
        assert_eq!(cameras[0].processed.load(Relaxed) + cameras[1].processed.load(Relaxed), 3);

        // After the drain deadline a batch is dropped as `shutdown`, not inspected.
        let Rig { worker: w, cameras, deadline } = rig(FnDenoiser(|_, x, _| 0.3 * x));
        *deadline.lock().unwrap() = Some(Instant::now() - Duration::from_millis(1));
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(2);
        batch_tx.send(vec![Frame::uniform(1, 2, [64, 64], 0.0)]).unwrap();
        drop(batch_tx);
        w.run(batch_rx, out_tx, crossbeam_channel::never());
        assert!(out_rx.try_recv().is_err());
        assert_eq!(cameras[1].drops(DropReason::Shutdown), 1);
        assert_eq!(cameras[1].processed.load(Relaxed), 0);
    }

    #[test]
    fn each_batch_is_inspected_by_the_model_its_frames_name() {
        let named = |key: usize, name: &str| {
            let inspector =
                Inspector::from_parts("fake".into(), manifest(), FnDenoiser(|_, x, _| 0.3 * x), None, None).unwrap();
            let model = Arc::new(ModelRef { name: name.into(), ..(*model_ref()).clone() });
            Swap { key, inspector, model }
        };
        let (cameras, stats) = cameras(&["a", "b"]);
        let w = Worker::new(
            vec![named(0, "node"), named(3, "own")],
            7,
            cameras,
            Arc::default(),
            Arc::default(),
            Progress::new(),
        );
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(8);
        let frame = |camera, model| Frame { model, ..Frame::uniform(camera, 1, [64, 64], 0.0) };
        batch_tx.send(vec![frame(0, 0)]).unwrap();
        batch_tx.send(vec![frame(1, 3)]).unwrap();
        batch_tx.send(vec![frame(1, 5)]).unwrap(); // no such model: dropped with a reason
        drop(batch_tx);
        w.run(batch_rx, out_tx, crossbeam_channel::never());
        let named: Vec<(usize, String)> = out_rx.try_iter().map(|i| (i.frame.camera, i.model.name.clone())).collect();
        assert_eq!(named, vec![(0, "node".to_string()), (1, "own".to_string())]);
        assert_eq!(stats[1].drops(DropReason::InferenceError), 1);
    }

    /// One inspection of `frame` at `sensitivity` by a worker whose model has `thresholds`.
    fn judged(frame: Frame, thresholds: Option<crate::model::manifest::Thresholds>, sensitivity: f64) -> Analysis {
        let mut m = manifest();
        if let Some(t) = thresholds {
            m.thresholds = t;
        }
        let inspector = Inspector::from_parts("fake".into(), m, FnDenoiser(|_, x, _| 0.3 * x), None, None).unwrap();
        let (cameras, _) = cameras(&["a"]);
        cameras.get(0).controls.set_sensitivity(sensitivity);
        let mut w = Worker::new(vec![model(0, inspector)], 7, cameras, Arc::default(), Arc::default(), Progress::new());
        let (out_tx, out_rx) = crossbeam_channel::bounded(1);
        assert!(w.inspect(vec![frame], &out_tx));
        out_rx.try_recv().expect("a verdict").analysis
    }

    /// The camera's sensitivity reaches the one verdict: score, normalised score, mask,
    /// regions and the flag agree at every sensitivity (issue 22: the flag was once
    /// overwritten after the mask and normalised score were made at sensitivity 1).
    #[test]
    fn every_sensitivity_gives_one_consistent_verdict() {
        let frame = || {
            let mut frame = Frame::uniform(0, 1, [64, 64], 0.0);
            for (i, v) in frame.tensor.iter_mut().enumerate() {
                *v = ((i % 64) as f32 * 0.37).sin() * ((i / 64) as f32 * 0.21).cos() * 0.8;
            }
            frame
        };
        // Thresholds placed around this frame's own scores: at sensitivity 1 it is normal,
        // from 1.5 up it is anomalous; the pixel threshold sits above most of the map.
        let first = judged(frame(), None, 1.0);
        let mut sorted = first.map.clone();
        sorted.sort_by(f32::total_cmp);
        let mut thresholds = manifest().thresholds;
        thresholds.image.value = first.score * 1.5;
        thresholds.pixel.value = f64::from(sorted[sorted.len() * 9 / 10]) * 1.5;
        let mut masked = Vec::new();
        for sensitivity in [0.5, 1.0, 1.2, 2.0, 4.0, 10.0] {
            let a = judged(frame(), Some(thresholds.clone()), sensitivity);
            let image = thresholds.image.value / sensitivity;
            let pixel = thresholds.pixel.value / sensitivity;
            assert!((a.image_threshold - image).abs() < 1e-12, "at {sensitivity}");
            assert_eq!(a.anomalous, sensitivity >= 1.5, "at {sensitivity}: score {} vs {image}", a.score);
            assert_eq!(a.anomalous, a.normalised_score >= 0.5, "at {sensitivity}");
            assert_eq!(a.anomalous, a.score >= image, "at {sensitivity}");
            for ((m, n), raw) in a.mask.iter().zip(&a.normalised_map).zip(&a.map) {
                assert_eq!(*m == 1, *n >= 0.5, "at {sensitivity}");
                assert_eq!(*m == 1, f64::from(*raw) >= pixel - 1e-9, "at {sensitivity}: {raw} vs {pixel}");
            }
            let region_area: usize = a.regions.iter().map(|r| r.area).sum();
            assert!(region_area <= a.mask.iter().filter(|m| **m == 1).count(), "at {sensitivity}");
            masked.push(a.mask.iter().filter(|m| **m == 1).count());
        }
        assert!(masked.windows(2).all(|w| w[0] <= w[1]), "more sensitive, more pixels: {masked:?}");
        assert!(masked[0] < masked[5], "the mask follows the sensitivity: {masked:?}");
    }

    /// Fails every call; with a drain deadline, it sets it in the past first (a run the
    /// stop terminated).
    struct Broken(Option<Arc<Mutex<Option<Instant>>>>);
    impl Denoiser for Broken {
        fn channels(&self) -> usize {
            1
        }
        fn predict_eps(
            &mut self,
            _: &[f32],
            _: [usize; 4],
            _: &[f32],
            _: &mut dyn FnMut(&[f32]),
        ) -> Result<(), RuntimeError> {
            if let Some(deadline) = &self.0 {
                *deadline.lock().unwrap() = Some(Instant::now() - Duration::from_millis(1));
            }
            Err(RuntimeError::Run("injected".into()))
        }
    }

    /// The loader hands over one model at a time (a one-slot channel): the worker takes
    /// each while no frame flows, so a second load never waits for a batch.
    #[test]
    fn models_are_taken_over_while_no_frames_flow() {
        fn third(_: usize, x: f32, _: usize) -> f32 {
            0.3 * x
        }
        let Rig { worker: w, .. } = rig(FnDenoiser(third));
        let (batch_tx, batch_rx) = crossbeam_channel::bounded::<Vec<Frame>>(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(4);
        let (swap_tx, swap_rx) = crossbeam_channel::bounded(1);
        let thread = std::thread::spawn(move || w.run(batch_rx, out_tx, swap_rx));
        for key in 1..=3 {
            let inspector = Inspector::from_parts("fake".into(), manifest(), FnDenoiser(third), None, None).unwrap();
            swap_tx
                .send_timeout(model(key, inspector), Duration::from_secs(5))
                .expect("the worker takes models while idle");
        }
        // A stopped loader does not stop the worker: a batch sent after it still gets its
        // verdict. The batcher does.
        drop(swap_tx);
        batch_tx.send(vec![Frame::uniform(0, 1, [64, 64], 0.0)]).unwrap();
        out_rx.recv_timeout(Duration::from_secs(30)).expect("the worker still runs");
        drop(batch_tx);
        thread.join().unwrap();
    }

    #[test]
    fn a_run_terminated_at_the_drain_deadline_is_a_shutdown_not_a_failure() {
        let deadline = Arc::new(Mutex::new(None));
        let inspector =
            Inspector::from_parts("fake".into(), manifest(), Broken(Some(deadline.clone())), None, None).unwrap();
        let (registry, cameras) = cameras(&["a", "b"]);
        let w = Worker::new(vec![model(0, inspector)], 7, registry, Arc::default(), deadline, Progress::new());
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(4);
        batch_tx.send(vec![Frame::uniform(0, 1, [64, 64], 0.0), Frame::uniform(1, 1, [64, 64], 0.0)]).unwrap();
        drop(batch_tx);
        w.run(batch_rx, out_tx, crossbeam_channel::never());
        assert_eq!((cameras[0].drops(DropReason::Shutdown), cameras[1].drops(DropReason::Shutdown)), (1, 1));
        assert_eq!(cameras[0].drops(DropReason::InferenceError) + cameras[1].drops(DropReason::InferenceError), 0);
        assert!(out_rx.try_recv().is_err());
    }

    #[test]
    fn a_failed_batch_is_counted_and_the_worker_goes_on() {
        let Rig { worker: w, cameras, .. } = rig(Broken(None));
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(4);
        batch_tx.send(vec![Frame::uniform(0, 1, [64, 64], 0.0), Frame::uniform(1, 1, [64, 64], 0.0)]).unwrap();
        batch_tx.send(vec![Frame::uniform(0, 2, [64, 64], 0.0)]).unwrap();
        drop(batch_tx);
        w.run(batch_rx, out_tx, crossbeam_channel::never());
        assert_eq!(cameras[0].drops(DropReason::InferenceError), 2);
        assert_eq!(cameras[1].drops(DropReason::InferenceError), 1);
        assert!(out_rx.try_recv().is_err());
    }

    #[test]
    fn every_unet_batch_of_tiles_is_progress() {
        // A 64×256 frame in 64-px tiles 64 apart: 4 tiles, one per UNet batch, each 10 calls
        // of 40 ms. The frame takes 1.6 s, yet the worker's progress is never older than
        // about one tile's calls.
        let slow = FnDenoiser(|i, x, _| {
            if i == 0 {
                std::thread::sleep(Duration::from_millis(40));
            }
            0.3 * x
        });
        let mut tiled = manifest();
        tiled.inspection = Inspection::Tiled { scale: 1.0, stride: 64 };
        let inspector = Inspector::from_parts("fake".into(), tiled, slow, None, None).unwrap().with_tile_batch(1);
        let progress = Progress::new();
        let (cameras, _) = cameras(&["a"]);
        let w = Worker::new(vec![model(0, inspector)], 7, cameras, Arc::default(), Arc::default(), progress.clone());
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(1);
        let (out_tx, out_rx) = crossbeam_channel::bounded(1);
        batch_tx.send(vec![Frame::uniform(0, 1, [64, 256], 0.1)]).unwrap();
        let thread = std::thread::spawn(move || w.run(batch_rx, out_tx, crossbeam_channel::never()));
        let started = Instant::now();
        let mut oldest = Duration::ZERO;
        while out_rx.try_recv().is_err() {
            oldest = oldest.max(progress.since());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(started.elapsed() > Duration::from_millis(1200), "the frame took {:?}", started.elapsed());
        assert!(oldest < Duration::from_millis(800), "progress was {oldest:?} old during one frame");
        drop(batch_tx);
        thread.join().unwrap();
    }
}
