//! Recording frames for retraining: the capture store that `retrain --data` reads.
//!
//! Layout (`train::data` reads exactly this; the marker file makes it recognisable):
//! `<dir>/edge-inspect-captures.toml`, `<dir>/<camera>/flagged/<id>.png` (the clean frame
//! as captured, after the region of interest) with `<id>_mask.png` and `<id>.json`, and
//! `<dir>/<camera>/normal/<id>.png` for a sample of normal frames. Every file is written
//! atomically. The store is pruned by age, then oldest-first down to its size limit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use serde::Serialize;

use super::config::RecorderConfig;
use super::pipeline::Inspected;
use super::publish::{ModelRef, rfc3339};
use super::stats::PipelineStats;
use crate::model::bundle::write_atomic;
use crate::postprocess::anomaly::Region;
use crate::postprocess::render::mask_png;

/// The marker file's name (shared with `retrain`'s layout detection).
pub const MARKER: &str = "edge-inspect-captures.toml";

#[derive(Serialize)]
struct Sidecar<'a> {
    schema: u32,
    camera: &'a str,
    seq: u64,
    captured_at: String,
    score: f64,
    normalised_score: f64,
    regions: &'a [Region],
    model: &'a ModelRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_file: Option<&'a str>,
}

pub struct Recorder {
    config: RecorderConfig,
    cameras: Vec<String>,
    model: ModelRef,
    stats: Arc<PipelineStats>,
    last_prune: Option<Instant>,
}

/// How often the store is checked against its limits.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

impl Recorder {
    /// Creates the store (and its marker) if needed.
    pub fn open(
        config: RecorderConfig,
        cameras: Vec<String>,
        model: ModelRef,
        stats: Arc<PipelineStats>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&config.dir)?;
        let marker = config.dir.join(MARKER);
        if !marker.is_file() {
            write_atomic(&marker, b"# edge-inspect capture store: <camera>/{normal,flagged}/; read by `edge-inspect retrain`\nversion = 1\n")?;
        }
        Ok(Self { config, cameras, model, stats, last_prune: None })
    }

    fn record(&self, item: &Inspected) -> std::io::Result<()> {
        let f = &item.frame;
        let a = &item.analysis;
        let camera = &self.cameras[f.camera];
        let class = if a.anomalous { "flagged" } else { "normal" };
        let dir = self.config.dir.join(camera).join(class);
        std::fs::create_dir_all(&dir)?;
        let millis = f.captured.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let id = format!("{millis}-{:06}", f.seq);
        let mut png = std::io::Cursor::new(Vec::new());
        f.original.write_to(&mut png, image::ImageFormat::Png).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(format!("{id}.png")), png.get_ref())?;
        if a.anomalous {
            write_atomic(&dir.join(format!("{id}_mask.png")), &mask_png(a))?;
            let sidecar = Sidecar {
                schema: 1,
                camera,
                seq: f.seq,
                captured_at: rfc3339(f.captured),
                score: a.score,
                normalised_score: a.normalised_score,
                regions: &a.regions,
                model: &self.model,
                source_file: f.source_file.as_deref(),
            };
            write_atomic(
                &dir.join(format!("{id}.json")),
                &serde_json::to_vec_pretty(&sidecar).expect("sidecar serialises"),
            )?;
            self.stats.recorded_flagged.fetch_add(1, Relaxed);
        } else {
            self.stats.recorded_normal.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// Deletes files older than the age limit, then the oldest until under the size limit.
    pub fn prune(&self) -> std::io::Result<usize> {
        let mut files: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        collect_files(&self.config.dir, &mut files)?;
        let now = SystemTime::now();
        files.sort();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let mut removed = 0;
        for (modified, size, path) in files {
            let too_old = now.duration_since(modified).unwrap_or_default() > self.config.max_age;
            if too_old || total > self.config.max_bytes {
                std::fs::remove_file(&path)?;
                total -= size;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Records until the publisher is gone.
    pub fn run(mut self, input: Receiver<Inspected>) {
        for item in input {
            if let Err(e) = self.record(&item) {
                self.stats.recorder_errors.fetch_add(1, Relaxed);
                tracing::error!(dir = %self.config.dir.display(), error = %e, "Cannot record frame.");
            }
            if self.last_prune.is_none_or(|t| t.elapsed() > PRUNE_EVERY) {
                self.last_prune = Some(Instant::now());
                match self.prune() {
                    Ok(n) => {
                        self.stats.recorder_pruned.fetch_add(n as u64, Relaxed);
                    }
                    Err(e) => tracing::error!(error = %e, "Cannot prune the capture store."),
                }
            }
        }
        tracing::debug!("Recorder stopped.");
    }
}

/// Recorded files (not the marker) with modification time and size.
fn collect_files(dir: &Path, out: &mut Vec<(SystemTime, u64, PathBuf)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            collect_files(&path, out)?;
        } else if path.file_name().is_some_and(|n| n != MARKER) {
            out.push((meta.modified()?, meta.len(), path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_old_files_then_oldest_until_under_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let config = RecorderConfig {
            enabled: true,
            dir: dir.path().to_path_buf(),
            normal_sample_rate: 1.0,
            max_bytes: 250,
            max_age: Duration::from_secs(3600),
        };
        let model = ModelRef { name: "m".into(), version: "1".into(), sha256: "x".into() };
        let recorder = Recorder::open(config, vec!["cam".into()], model, Arc::default()).unwrap();
        let store = dir.path().join("cam/normal");
        std::fs::create_dir_all(&store).unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        for (i, name) in ["a.png", "b.png", "c.png", "d.png"].iter().enumerate() {
            let path = store.join(name);
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            let when = if i == 0 { old } else { SystemTime::now() - Duration::from_secs(100 - i as u64 * 10) };
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(when).unwrap();
        }
        // a is too old; then b goes to get from 300 bytes to 200 <= 250.
        assert_eq!(recorder.prune().unwrap(), 2);
        let mut left: Vec<String> =
            std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["c.png", "d.png"]);
        assert!(dir.path().join(MARKER).is_file(), "the marker is never pruned");
    }
}
