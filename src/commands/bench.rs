//! `edge-inspect bench`: inference throughput of a bundle on this machine.
//!
//! For each batch size: the median UNet call (ONNX Runtime, after warm-up), UNet
//! evaluations per second, then whole DDIM reconstructions at each step count (frames/s,
//! ms per frame). Printed as a Markdown table, with the provider that really ran. With
//! `--frames`, whole camera frames go through the inspection path (`Inspector`: tiles,
//! reconstruction, the map rule's graph, the patch model, stitching, post-processing) at
//! the bundle's shipped operating point unless `--ddim-steps`/`--t0` override it: MP/s,
//! p50/p99 frame latency, where each frame's time goes (UNet, map graph, patch graph, the
//! rest) and the process's peak RSS. This is the benchmark behind `docs/performance.md`;
//! speed is not checked by timed tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::cli::BenchArgs;
use crate::infer::bundle::Bundle;
use crate::infer::inspect::{FrameView, Inspector, rule_graphs};
use crate::infer::runtime::{Denoiser, OrtDenoiser, RuntimeError};
use crate::model::manifest::{GoldenCheck, Manifest};
use crate::model::sampling::{ReconstructionSpec, Sampler};
use crate::postprocess::screen::ScreenChoice;

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let frames = args.frames.iter().map(|f| parse_frame(f)).collect::<anyhow::Result<Vec<_>>>()?;
    let mut bundle = Bundle::load(&args.model, &args.runtime.to_config())?;
    let screen = ScreenChoice::from_flags(args.no_screen, args.screen_recall);
    bundle.manifest.choose_screen(screen).map_err(|e| anyhow::anyhow!("--screen-recall: {e}"))?;
    let shipped = bundle.manifest.reconstruction;
    let t0 = args.t0.unwrap_or(shipped.t0);
    let ddim_steps = args.ddim_steps.clone().unwrap_or(vec![shipped.steps]);
    if args.batches.contains(&0) || ddim_steps.iter().any(|s| *s == 0 || *s > t0) || args.repeats == 0 {
        bail!("batch sizes and --repeats must be >= 1, DDIM steps in 1..=t0 ({t0})");
    }
    if args.frame_repeats == 0 {
        bail!("--frame-repeats must be >= 1");
    }
    let input = bundle.manifest.input;
    println!(
        "model {} ({}), input {}×{}×{}, provider {}{}, ORT intra-op threads {}, cores available {}",
        bundle.manifest.name,
        &bundle.manifest.artifact.sha256[..12],
        input.channels,
        input.height,
        input.width,
        bundle.denoiser.provider(),
        if bundle.denoiser.fell_back_to_cpu() { " (CPU fallback)" } else { "" },
        args.runtime.threads,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!();
    println!("| batch | UNet call ms (median) | UNet evals/s | DDIM steps (t0 = {t0}) | frames/s | ms/frame |");
    println!("|---|---|---|---|---|---|");
    for &batch in &args.batches {
        let call_ms = median_call_ms(&mut bundle, batch, t0, args.repeats)?;
        for &steps in &ddim_steps {
            let spec = ReconstructionSpec { t0, steps, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 };
            let mut reconstructor = bundle.reconstructor(Some(spec))?;
            let x = GoldenCheck::probe(batch, &input);
            let shape = [batch, input.channels, input.height, input.width];
            let seeds: Vec<u64> = (0..batch as u64).collect();
            let mut out = vec![0.0f32; x.len()];
            // At least ~40 UNet calls per figure, so short reconstructions are not noise.
            let rounds = (40 / steps).max(1);
            let start = Instant::now();
            for _ in 0..rounds {
                reconstructor.reconstruct(&mut bundle.denoiser, &x, shape, &seeds, &mut out)?;
            }
            let frames_per_s = (rounds * batch) as f64 / start.elapsed().as_secs_f64();
            println!(
                "| {batch} | {call_ms:.2} | {:.1} | {steps} | {frames_per_s:.2} | {:.1} |",
                batch as f64 * 1e3 / call_ms,
                1e3 / frames_per_s
            );
        }
    }
    if !frames.is_empty() {
        let overridden = args.ddim_steps.is_some() || args.t0.is_some();
        let specs: Vec<Option<ReconstructionSpec>> = if overridden {
            let spec = |steps| ReconstructionSpec { t0, steps, sampler: Sampler::Ddim, eta: 0.0, condition: 0.0 };
            ddim_steps.iter().map(|&steps| Some(spec(steps))).collect()
        } else {
            vec![None]
        };
        let tile_batch = *args.batches.iter().max().expect("default batches");
        let image = match &args.frame_image {
            Some(path) => Some(image::open(path).with_context(|| format!("--frame-image {}", path.display()))?),
            None => None,
        };
        let frame_source = FrameSource { image: image.as_ref(), save_to: args.save_frames.as_deref() };
        bench_frames(bundle, &frames, frame_source, &specs, tile_batch, args.frame_repeats)?;
    }
    Ok(())
}

/// The median of `repeats` UNet calls on a batch of `batch` probes at `t0 / 2`, in ms,
/// after 3 warm-up calls.
fn median_call_ms(bundle: &mut Bundle, batch: usize, t0: usize, repeats: usize) -> anyhow::Result<f64> {
    let input = bundle.manifest.input;
    let x = GoldenCheck::probe(batch, &input);
    let t = vec![(t0 / 2) as f32; batch];
    let shape = [batch, input.channels, input.height, input.width];
    for _ in 0..3 {
        bundle.denoiser.predict_eps(&x, shape, &t, &mut |_| {})?;
    }
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        bundle.denoiser.predict_eps(&x, shape, &t, &mut |_| {})?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn parse_frame(text: &str) -> anyhow::Result<[usize; 2]> {
    let parsed = text.split_once('x').and_then(|(w, h)| Some([h.parse().ok()?, w.parse().ok()?]));
    match parsed {
        Some([h, w]) if h > 0 && w > 0 => Ok([h, w]),
        _ => bail!("--frames: {text:?} is not WIDTHxHEIGHT"),
    }
}

/// A graph that adds the wall time of its calls to a shared counter (ns), so a frame's
/// time splits into its stages.
struct Timed<D> {
    inner: D,
    spent_ns: Arc<AtomicU64>,
}

impl<D: Denoiser> Timed<D> {
    fn new(inner: D) -> (Self, Arc<AtomicU64>) {
        let spent_ns = Arc::new(AtomicU64::new(0));
        (Self { inner, spent_ns: spent_ns.clone() }, spent_ns)
    }
}

impl<D: Denoiser> Denoiser for Timed<D> {
    fn channels(&self) -> usize {
        self.inner.channels()
    }
    fn predict_eps(
        &mut self,
        x: &[f32],
        shape: [usize; 4],
        t: &[f32],
        consume: &mut dyn FnMut(&[f32]),
    ) -> Result<(), RuntimeError> {
        let start = Instant::now();
        let result = self.inner.predict_eps(x, shape, t, consume);
        self.spent_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }
}

/// Time spent per stage, shared with the [`Timed`] graphs of one inspector.
struct StageClocks([Arc<AtomicU64>; 3]);

impl StageClocks {
    /// Seconds per stage (UNet, map graph, patch graph) since the last call.
    fn take(&self) -> [f64; 3] {
        self.0.each_ref().map(|c| c.swap(0, Ordering::Relaxed) as f64 / 1e9)
    }
}

/// The bundle's graphs wrapped in [`Timed`], in an inspector at `spec` (None: the shipped
/// operating point), and the clocks they tick.
fn timed_inspector(
    bundle: Bundle,
    spec: Option<ReconstructionSpec>,
    tile_batch: usize,
) -> anyhow::Result<(Inspector<Timed<OrtDenoiser>>, StageClocks)> {
    let mut bundle = bundle;
    let (map_graph, patch_graph) = rule_graphs(&mut bundle);
    let (denoiser, unet) = Timed::new(bundle.denoiser);
    let (map_graph, rule) = split_timed(map_graph);
    let (patch_graph, patch) = split_timed(patch_graph);
    let inspector = Inspector::from_parts(bundle.dir, bundle.manifest, denoiser, map_graph, spec)?
        .with_patch_graph(patch_graph)?
        .with_tile_batch(tile_batch);
    Ok((inspector, StageClocks([unet, rule, patch])))
}

fn split_timed<D: Denoiser>(graph: Option<D>) -> (Option<Timed<D>>, Arc<AtomicU64>) {
    match graph.map(Timed::new) {
        Some((timed, clock)) => (Some(timed), clock),
        None => (None, Arc::new(AtomicU64::new(0))),
    }
}

/// Where the benchmark's frames come from and go.
struct FrameSource<'a> {
    /// Resized to each frame size; else a synthetic pattern.
    image: Option<&'a image::DynamicImage>,
    /// A directory to write each frame into as PNG.
    save_to: Option<&'a std::path::Path>,
}

impl FrameSource<'_> {
    fn frame(&self, [height, width]: [usize; 2]) -> anyhow::Result<image::DynamicImage> {
        let frame = match self.image {
            Some(image) => mirrored(image, [height, width]),
            None => image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(width as u32, height as u32, |x, y| {
                image::Luma([(128.0 + 60.0 * ((x as f32) * 0.31).sin() * ((y as f32) * 0.17).cos()) as u8])
            })),
        };
        if let Some(dir) = self.save_to {
            let path = dir.join(format!("frame-{width}x{height}.png"));
            std::fs::create_dir_all(dir)
                .and_then(|_| frame.save(&path).map_err(std::io::Error::other))
                .with_context(|| format!("--save-frames: cannot write {}", path.display()))?;
        }
        Ok(frame)
    }
}

/// `image` repeated in mirror image up to `[height, width]`: a line-like frame at the
/// image's own scale (resizing would change the texture's scale, which the model and its
/// screen are sensitive to), without seams.
fn mirrored(image: &image::DynamicImage, [height, width]: [usize; 2]) -> image::DynamicImage {
    let source = image.to_luma8();
    let (w, h) = source.dimensions();
    let fold = |v: u32, n: u32| if (v / n).is_multiple_of(2) { v % n } else { n - 1 - v % n };
    image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(width as u32, height as u32, |x, y| {
        *source.get_pixel(fold(x, w), fold(y, h))
    }))
}

/// Whole frames through `Inspector` at each of `specs` (None: the shipped operating
/// point), `tile_batch` tiles per UNet batch, one warm-up and `repeats` timed passes each.
fn bench_frames(
    bundle: Bundle,
    frames: &[[usize; 2]],
    source: FrameSource<'_>,
    specs: &[Option<ReconstructionSpec>],
    tile_batch: usize,
    repeats: usize,
) -> anyhow::Result<()> {
    let manifest = bundle.manifest.clone();
    let (mut inspector, clocks) = timed_inspector(bundle, None, tile_batch)?;
    println!();
    println!(
        "inspection: {:?}, {tile_batch} tiles per UNet batch, {repeats} timed passes per frame",
        manifest.inspection
    );
    println!("operating point: {}", operating_point(&manifest));
    println!("frames: {}", source.image.map_or("a synthetic pattern", |_| "--frame-image, mirrored to size"));
    println!();
    println!(
        "| frame | tiles | UNet calls per tile | s/frame p50 | p99 | MP/s | tiles/s | screened | UNet s | map graph s | patch graph s | rest s | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for spec in specs {
        if let Some(spec) = spec {
            inspector = inspector.with_spec(*spec)?;
        }
        for &[height, width] in frames {
            let frame = source.frame([height, width])?;
            let prepared = manifest.input.prepare_for(manifest.inspection, &frame);
            let view = FrameView::new(&prepared.tensor, prepared.size());
            let tiles = inspector.tile_grid(view.size).tiles.len();
            inspector.inspect(&[view], &[1])?;
            clocks.take();
            let before = inspector.tile_counts();
            let mut seconds = Vec::with_capacity(repeats);
            for pass in 0..repeats {
                let start = Instant::now();
                inspector.inspect(&[view], &[pass as u64])?;
                seconds.push(start.elapsed().as_secs_f64());
            }
            let stages = clocks.take().map(|s| s / repeats as f64);
            let after = inspector.tile_counts();
            let screened = (after[1] - before[1]) as f64 / (after[0] - before[0]).max(1) as f64;
            let mean = seconds.iter().sum::<f64>() / repeats as f64;
            seconds.sort_by(f64::total_cmp);
            let [p50, p99] = [0.5, 0.99].map(|q| seconds[((q * repeats as f64).ceil() as usize).clamp(1, repeats) - 1]);
            println!(
                "| {width}×{height} | {tiles} | {} | {p50:.3} | {p99:.3} | {:.3} | {:.1} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
                inspector.unet_calls(),
                (width * height) as f64 / 1e6 / mean,
                tiles as f64 / mean,
                screened,
                stages[0],
                stages[1],
                stages[2],
                mean - stages.iter().sum::<f64>(),
                peak_rss_mib().map_or("n/a".into(), |m| format!("{m:.0}")),
            );
        }
    }
    Ok(())
}

/// The operating point in one line: reconstructions, map rule, fusion.
fn operating_point(m: &Manifest) -> String {
    let r = m.reconstruction;
    let extra = m.extra_t0();
    let fusion = m.anomaly.fusion.as_ref().map_or("none".into(), |f| format!("patch weight {}", f.patch_weight));
    let screen = m.anomaly.screen.as_ref().map_or("none".into(), |s| {
        format!("patch map ≥ {:.3} (recall {:.3} on validation defects)", s.threshold, s.recall)
    });
    format!(
        "t0 {}{} × {} {:?} step(s), map rule {}, fusion {fusion}, screen {screen}",
        r.t0,
        if extra.is_empty() { String::new() } else { format!(" (+ members at t0 {extra:?})") },
        r.steps,
        r.sampler,
        m.anomaly.residual.name()
    )
}

/// The process's peak resident set (VmHWM) in MiB, where /proc says.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}
