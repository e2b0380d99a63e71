//! Recording frames for retraining: the capture store that `retrain --data` reads.
//!
//! Layout (`train::data` reads exactly this; the marker file makes it recognisable):
//! `<dir>/edge-inspect-captures.toml`, `<dir>/<camera>/flagged/<id>.png` (the clean frame
//! as captured, after the region of interest) with `<id>_mask.png` and `<id>.json`, and
//! `<dir>/<camera>/normal/<id>.png` for a sample of normal frames. Every file is written
//! atomically. Before every write the oldest recordings (a frame, its mask and sidecar
//! together) are deleted until the new one fits under `max_bytes`, so the store never
//! exceeds it; every 30 s recordings older than `max_age` go. A file that cannot be deleted
//! is logged, counted (`recorder_errors`) and skipped, and pruning goes on with the next.
//! Frames larger than `max_side` are recorded scaled down.
//!
//! With the review page on, making room spares the flagged frames of its review window:
//! while anything else is left, the oldest normal sample (or flagged frame older than the
//! window) goes first, so that the frames an operator is to label stay visible; only a
//! store holding nothing else gives up its oldest flagged frame. `max_age` applies to all.
//!
//! With `[upload]` on, making room takes recordings already in object storage (the
//! uploader's [`Uploaded`]) before those still waiting to go up, within the same order:
//! uploaded and unspared, then unspared, then the oldest.
//!
//! Disk pressure spares alerts: before each write the recorder checks the free space of
//! its filesystem and pauses — counting every frame it does not record
//! (`recorder_low_disk`), logging when it pauses and when it resumes — while that is under
//! its floor: `min_free_bytes`, and at least the outbox's cap where the outbox shares the
//! filesystem, so the recorder never takes the space alerts are kept in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use serde::Serialize;

use super::cameras::Cameras;
use super::upload::Uploaded;
use crate::config::{RecorderConfig, RecorderLimits};
use crate::durable::write_atomic;
use crate::frame::Inspected;
use crate::frame::ModelRef;
use crate::postprocess::anomaly::Region;
use crate::postprocess::render::mask_png;
use crate::stats::{PipelineStats, Progress};
use crate::timestamp::rfc3339;

/// The marker file's name (shared with `retrain`'s layout detection).
pub use crate::capture::STORE_MARKER as MARKER;

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
    /// The part a triggered camera was triggered for.
    #[serde(skip_serializing_if = "Option::is_none")]
    part_id: Option<&'a str>,
    /// The camera's own timestamp of the frame (ns of its clock), where it gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    camera_timestamp_ns: Option<u64>,
}

pub struct Recorder {
    config: RecorderConfig,
    /// Names the camera directories.
    cameras: Cameras,
    stats: Arc<PipelineStats>,
    store: Store,
    last_age_prune: Option<Instant>,
    /// Free bytes the recorder leaves on its filesystem.
    floor: u64,
    /// Paused for lack of space (logged on each change).
    paused: bool,
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Whether `a` and `b` (both existing) lie on the same filesystem.
fn same_filesystem(a: &Path, b: &Path) -> std::io::Result<bool> {
    Ok(rustix::fs::stat(a)?.st_dev == rustix::fs::stat(b)?.st_dev)
}

/// How often the store is checked against its age limit (size is kept on every write).
const AGE_PRUNE_EVERY: Duration = Duration::from_secs(30);

/// The recorded groups (a frame with its mask and sidecar) oldest first, and their bytes.
/// Kept in memory so every write makes room first: the store never exceeds `max_bytes`.
#[derive(Default)]
struct Store {
    /// Keyed by (modification time, the group's path without extension).
    groups: BTreeMap<(SystemTime, PathBuf), Vec<(PathBuf, u64)>>,
    total: u64,
    /// Flagged frames this young are deleted to make room only when nothing else is left.
    spare_flagged: Option<Duration>,
    /// Files in object storage: their groups go first when making room.
    uploaded: Option<Arc<Uploaded>>,
}

impl Store {
    /// Reads what is on disk: files grouped by directory and id (`<id>.png`,
    /// `<id>_mask.png`, `<id>.json`), dated by their newest file.
    fn scan(dir: &Path) -> std::io::Result<Self> {
        let mut files = Vec::new();
        collect_files(dir, &mut files)?;
        let mut by_key: BTreeMap<PathBuf, (SystemTime, Vec<(PathBuf, u64)>)> = BTreeMap::new();
        for (modified, size, path) in files {
            let entry = by_key.entry(group_key(&path)).or_insert((modified, Vec::new()));
            entry.0 = entry.0.max(modified);
            entry.1.push((path, size));
        }
        let mut store = Self::default();
        for (key, (modified, files)) in by_key {
            store.add(modified, key, files);
        }
        Ok(store)
    }

    fn add(&mut self, modified: SystemTime, key: PathBuf, files: Vec<(PathBuf, u64)>) {
        self.total += files.iter().map(|f| f.1).sum::<u64>();
        self.groups.entry((modified, key)).or_default().extend(files);
    }

    /// Deletes the oldest group's files (see [`Store::drop_group`]).
    fn drop_oldest(&mut self, stats: &PipelineStats) -> usize {
        let Some(key) = self.groups.keys().next().cloned() else { return 0 };
        self.drop_group(&key, stats)
    }

    /// The group to delete to make room: the oldest uploaded one that is not a flagged
    /// frame within `spare_flagged`, else the oldest such one uploaded or not, else the
    /// oldest.
    fn next_to_go(&self) -> Option<(SystemTime, PathBuf)> {
        let since = self.spare_flagged.map(|window| SystemTime::now() - window);
        let spared = |(t, key): &(SystemTime, PathBuf)| {
            since.is_some_and(|since| *t >= since) && key.parent().is_some_and(|d| d.ends_with("flagged"))
        };
        let mut unspared = self.groups.iter().filter(|(key, _)| !spared(key));
        let uploaded = self
            .uploaded
            .as_ref()
            .and_then(|uploaded| unspared.clone().find(|(_, files)| uploaded.all(files.iter().map(|(path, _)| path))));
        let (key, _) = uploaded.or_else(|| unspared.next()).or_else(|| self.groups.iter().next())?;
        Some(key.clone())
    }

    /// Deletes a group's files; a file that cannot be deleted is logged with its path,
    /// counted and skipped (its bytes stay counted). Returns the files deleted.
    fn drop_group(&mut self, key: &(SystemTime, PathBuf), stats: &PipelineStats) -> usize {
        let Some(files) = self.groups.remove(key) else { return 0 };
        let mut deleted = 0;
        for (path, size) in files {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    self.total -= size;
                    deleted += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.total -= size,
                Err(e) => {
                    stats.recorder_errors.fetch_add(1, Relaxed);
                    tracing::warn!(path = %path.display(), error = %e, "Cannot delete a recorded file; skipped.");
                }
            }
        }
        deleted
    }

    /// Deletes oldest groups until `incoming` more bytes fit under `max_bytes`; false if
    /// they cannot fit even in an empty store.
    fn make_room(&mut self, incoming: u64, max_bytes: u64, stats: &PipelineStats) -> bool {
        while self.total + incoming > max_bytes
            && let Some(key) = self.next_to_go()
        {
            let deleted = self.drop_group(&key, stats);
            stats.recorder_pruned.fetch_add(deleted as u64, Relaxed);
        }
        self.total + incoming <= max_bytes
    }

    /// Deletes groups older than `max_age`.
    fn prune_age(&mut self, max_age: Duration, stats: &PipelineStats) {
        let now = SystemTime::now();
        while self
            .groups
            .first_key_value()
            .is_some_and(|((t, _), _)| now.duration_since(*t).unwrap_or_default() > max_age)
        {
            let deleted = self.drop_oldest(stats);
            stats.recorder_pruned.fetch_add(deleted as u64, Relaxed);
        }
    }
}

/// `<dir>/<id>` for `<dir>/<id>.png`, `<dir>/<id>_mask.png`, `<dir>/<id>.json` and an
/// operator's `<dir>/<id>.label.json`: the files pruned together.
fn group_key(path: &Path) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let id = stem.strip_suffix("_mask").or_else(|| stem.strip_suffix(".label")).unwrap_or(&stem);
    path.with_file_name(id)
}

impl Recorder {
    /// Creates the store (and its marker) if needed and indexes what is already in it.
    /// `outbox` is the MQTT outbox's directory and cap: where it shares the filesystem, the
    /// recorder leaves at least that much free.
    pub fn open(
        config: RecorderConfig,
        cameras: Cameras,
        stats: Arc<PipelineStats>,
        outbox: Option<(&Path, u64)>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&config.dir)?;
        let marker = config.dir.join(MARKER);
        if !marker.is_file() {
            write_atomic(&marker, b"# edge-inspect capture store: <camera>/{normal,flagged}/; read by `edge-inspect retrain`\nversion = 1\n")?;
        }
        let store = Store::scan(&config.dir)?;
        let reserve = match outbox {
            Some((dir, cap)) if same_filesystem(&config.dir, dir)? => cap,
            _ => 0,
        };
        let floor = config.min_free_bytes.max(reserve);
        Ok(Self { config, cameras, stats, store, last_age_prune: None, floor, paused: false })
    }

    /// Spares the flagged frames of the last `window` when making room (module docs).
    pub fn spare_flagged_for(mut self, window: Duration) -> Self {
        self.store.spare_flagged = Some(window);
        self
    }

    /// Prunes files in object storage first when making room (module docs).
    pub fn prune_uploaded_first(mut self, uploaded: Arc<Uploaded>) -> Self {
        self.store.uploaded = Some(uploaded);
        self
    }

    /// Whether `bytes` more leave the floor free; logs when the recorder pauses or resumes.
    fn room_on_disk(&mut self, bytes: u64) -> std::io::Result<bool> {
        let free = free_bytes(&self.config.dir)?;
        let room = free >= self.floor.saturating_add(bytes);
        if room == self.paused {
            self.paused = !room;
            let (dir, floor) = (self.config.dir.display(), self.floor);
            if room {
                tracing::info!(dir = %dir, free, floor, "Recorder resumed: free space is above its floor again.");
            } else {
                tracing::warn!(dir = %dir, free, floor, "Recorder paused: free space is under its floor (kept for alerts).");
            }
        }
        Ok(room)
    }

    /// The frame as recorded: as captured, scaled down to `max_side` if larger.
    fn frame_png(&self, original: &image::DynamicImage) -> std::io::Result<Vec<u8>> {
        let side = self.config.max_side;
        let scaled;
        let frame = if original.width() > side || original.height() > side {
            scaled = original.resize(side, side, image::imageops::FilterType::Triangle);
            &scaled
        } else {
            original
        };
        let mut png = std::io::Cursor::new(Vec::new());
        frame.write_to(&mut png, image::ImageFormat::Png).map_err(std::io::Error::other)?;
        Ok(png.into_inner())
    }

    fn record(&mut self, item: &Inspected) -> std::io::Result<()> {
        let f = &item.frame;
        let a = &item.analysis;
        let camera = &self.cameras.get(f.camera).id;
        let class = if a.anomalous { "flagged" } else { "normal" };
        let dir = self.config.dir.join(camera).join(class);
        let millis = f.captured.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let id = format!("{millis}-{:06}", f.seq);
        let mut files = vec![(dir.join(format!("{id}.png")), self.frame_png(&f.original)?)];
        if a.anomalous {
            let sidecar = Sidecar {
                schema: 1,
                camera,
                seq: f.seq,
                captured_at: rfc3339(f.captured),
                score: a.score,
                normalised_score: a.normalised_score,
                regions: &a.regions,
                model: &item.model,
                source_file: f.source_file.as_deref(),
                part_id: f.part.as_ref().map(|p| p.id.as_str()),
                camera_timestamp_ns: f.stamp.timestamp_ns,
            };
            files.push((dir.join(format!("{id}_mask.png")), mask_png(a)));
            files.push((
                dir.join(format!("{id}.json")),
                serde_json::to_vec_pretty(&sidecar).expect("sidecar serialises"),
            ));
        }
        let bytes: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
        if !self.room_on_disk(bytes)? {
            self.stats.recorder_low_disk.fetch_add(1, Relaxed);
            return Ok(());
        }
        if !self.store.make_room(bytes, self.config.max_bytes, &self.stats) {
            return Err(std::io::Error::other(format!(
                "a {bytes}-byte recording does not fit in recorder.max_bytes = {}",
                self.config.max_bytes
            )));
        }
        std::fs::create_dir_all(&dir)?;
        let mut written = Vec::with_capacity(files.len());
        for (path, content) in &files {
            write_atomic(path, content)?;
            written.push((path.clone(), content.len() as u64));
        }
        self.store.add(SystemTime::now(), dir.join(&id), written);
        let counter = if a.anomalous { &self.stats.recorded_flagged } else { &self.stats.recorded_normal };
        counter.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Records until the publisher is gone. New limits (`max_bytes`, `max_age`,
    /// `max_side` of a reloaded config; the store stays where it is) apply from the next
    /// frame on.
    pub fn run(mut self, input: Receiver<Inspected>, limits: Receiver<RecorderLimits>, progress: Progress) {
        let failures = crate::stats::LogThrottle::new(Duration::from_secs(10));
        while let Some(item) = progress.recv(&input) {
            if let Some(new) = limits.try_iter().last() {
                tracing::info!(
                    max_bytes = new.max_bytes,
                    max_age_s = new.max_age.as_secs(),
                    max_side = new.max_side,
                    "Recorder limits changed."
                );
                self.config.set_limits(new);
            }
            if let Err(e) = self.record(&item) {
                self.stats.recorder_errors.fetch_add(1, Relaxed);
                if let Some(suppressed) = failures.admit() {
                    tracing::error!(dir = %self.config.dir.display(), error = %e, suppressed, "Cannot record frame.");
                }
            }
            if self.last_age_prune.is_none_or(|t| t.elapsed() > AGE_PRUNE_EVERY) {
                self.last_age_prune = Some(Instant::now());
                self.store.prune_age(self.config.max_age, &self.stats);
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

    fn one_camera() -> Cameras {
        let cameras = Cameras::default();
        cameras.activate("cam", 2, || crate::controls::Controls::new(true, 1.0));
        cameras
    }

    fn config(dir: &Path, max_bytes: u64) -> RecorderConfig {
        RecorderConfig {
            enabled: true,
            dir: dir.to_path_buf(),
            normal_sample_rate: 1.0,
            max_bytes,
            max_age: Duration::from_secs(3600),
            max_side: 4096,
            min_free_bytes: 0,
        }
    }

    fn put(store: &Path, name: &str, bytes: usize, age: Duration) {
        let path = store.join(name);
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(SystemTime::now() - age).unwrap();
    }

    fn left(store: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(store).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn recordings_are_pruned_by_age_and_to_make_room_a_frame_with_its_mask_and_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("cam/flagged");
        std::fs::create_dir_all(&store).unwrap();
        put(&store, "a.png", 100, Duration::from_secs(7200));
        put(&store, "b.png", 100, Duration::from_secs(90));
        put(&store, "b_mask.png", 20, Duration::from_secs(90));
        put(&store, "b.json", 30, Duration::from_secs(90));
        put(&store, "c.png", 100, Duration::from_secs(80));
        let stats = Arc::new(PipelineStats::default());
        let mut recorder = Recorder::open(config(dir.path(), 400), one_camera(), stats.clone(), None).unwrap();
        assert_eq!(recorder.store.total, 350);
        recorder.store.prune_age(Duration::from_secs(3600), &stats);
        assert_eq!(left(&store), ["b.json", "b.png", "b_mask.png", "c.png"]);
        // 250 bytes stored; 200 more only fit once b and its mask and sidecar are gone.
        assert!(recorder.store.make_room(200, 400, &stats));
        assert_eq!(left(&store), ["c.png"]);
        assert_eq!(recorder.store.total, 100);
        assert_eq!(stats.recorder_pruned.load(Relaxed), 4);
        assert!(!recorder.store.make_room(500, 400, &stats), "larger than the whole store");
        assert!(dir.path().join(MARKER).is_file(), "the marker is never pruned");
    }

    #[test]
    fn making_room_spares_the_flagged_frames_of_the_review_window_while_anything_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let (flagged, normal) = (dir.path().join("cam/flagged"), dir.path().join("cam/normal"));
        std::fs::create_dir_all(&flagged).unwrap();
        std::fs::create_dir_all(&normal).unwrap();
        put(&flagged, "old.png", 100, Duration::from_secs(7200));
        put(&flagged, "a.png", 100, Duration::from_secs(300));
        put(&normal, "n1.png", 100, Duration::from_secs(200));
        put(&flagged, "b.png", 100, Duration::from_secs(100));
        put(&normal, "n2.png", 100, Duration::from_secs(50));
        let stats = Arc::new(PipelineStats::default());
        let recorder = Recorder::open(config(dir.path(), 500), one_camera(), stats.clone(), None).unwrap();
        let mut recorder = recorder.spare_flagged_for(Duration::from_secs(3600));
        // Room for 300 bytes: the flagged frame older than the window, then both normal samples.
        assert!(recorder.store.make_room(300, 500, &stats));
        assert_eq!(left(&flagged), ["a.png", "b.png"]);
        assert!(left(&normal).is_empty());
        // Nothing else left: the oldest flagged frame of the window goes.
        assert!(recorder.store.make_room(400, 500, &stats));
        assert_eq!(left(&flagged), ["b.png"]);
    }

    #[test]
    fn making_room_takes_what_is_already_in_object_storage_first() {
        let dir = tempfile::tempdir().unwrap();
        let normal = dir.path().join("cam/normal");
        std::fs::create_dir_all(&normal).unwrap();
        for (name, age) in [("a", 400), ("b", 300), ("c", 200), ("d", 100)] {
            put(&normal, &format!("{name}.png"), 100, Duration::from_secs(age));
        }
        put(&normal, "c.json", 10, Duration::from_secs(200));
        let uploaded = Arc::new(Uploaded::default());
        // b whole; c without its sidecar: only b counts as uploaded.
        for name in ["b.png", "c.png"] {
            uploaded.insert(normal.join(name));
        }
        let stats = Arc::new(PipelineStats::default());
        let recorder = Recorder::open(config(dir.path(), 410), one_camera(), stats.clone(), None).unwrap();
        let mut recorder = recorder.prune_uploaded_first(uploaded.clone());
        assert!(recorder.store.make_room(100, 410, &stats));
        assert_eq!(left(&normal), ["a.png", "c.json", "c.png", "d.png"], "b went before the older a");
        // Nothing else uploaded: the oldest goes, as without an uploader.
        assert!(recorder.store.make_room(200, 410, &stats));
        assert_eq!(left(&normal), ["c.json", "c.png", "d.png"]);
    }

    #[test]
    fn the_recorder_leaves_its_floor_and_the_outbox_cap_free() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("outbox");
        std::fs::create_dir_all(&outbox).unwrap();
        // The outbox shares the filesystem and its cap is more than any disk has: paused.
        let stats = Arc::new(PipelineStats::default());
        let cap = u64::MAX / 2;
        let mut recorder =
            Recorder::open(config(dir.path(), 1 << 30), one_camera(), stats.clone(), Some((&outbox, cap))).unwrap();
        assert_eq!(recorder.floor, cap);
        assert!(!recorder.room_on_disk(1).unwrap() && recorder.paused);
        // A floor that leaves room: it resumes.
        recorder.floor = 0;
        assert!(recorder.room_on_disk(1).unwrap() && !recorder.paused);
        // The cap of an outbox on another filesystem (/dev/shm is a tmpfs) is not reserved.
        let elsewhere = tempfile::tempdir_in("/dev/shm").unwrap();
        let other =
            Recorder::open(config(dir.path(), 1 << 30), one_camera(), stats, Some((elsewhere.path(), u64::MAX)));
        assert_eq!(other.unwrap().floor, 0);
    }

    #[test]
    fn large_frames_are_recorded_scaled_down_to_max_side() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::open(
            RecorderConfig { max_side: 64, ..config(dir.path(), 1 << 20) },
            one_camera(),
            Arc::default(),
            None,
        )
        .unwrap();
        let decoded = |png: Vec<u8>| {
            let img = image::load_from_memory(&png).unwrap();
            (img.width(), img.height())
        };
        let big = image::DynamicImage::new_luma8(200, 100);
        assert_eq!(decoded(recorder.frame_png(&big).unwrap()), (64, 32));
        let small = image::DynamicImage::new_luma8(40, 30);
        assert_eq!(decoded(recorder.frame_png(&small).unwrap()), (40, 30));
    }

    /// The field drill: one file that cannot be deleted (`chattr +i`) must not stop pruning.
    #[test]
    fn an_undeletable_file_is_counted_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("cam/normal");
        std::fs::create_dir_all(&store).unwrap();
        put(&store, "a.png", 100, Duration::from_secs(300));
        put(&store, "b.png", 100, Duration::from_secs(200));
        put(&store, "c.png", 100, Duration::from_secs(100));
        let immutable = store.join("a.png");
        let chattr = |flag: &str| {
            let status = std::process::Command::new("chattr").arg(flag).arg(&immutable).status().unwrap();
            assert!(status.success(), "chattr {flag} (the tests run as root on ext4)");
        };
        chattr("+i");
        let stats = Arc::new(PipelineStats::default());
        let mut recorder = Recorder::open(config(dir.path(), 300), one_camera(), stats.clone(), None).unwrap();
        let fits = recorder.store.make_room(100, 300, &stats);
        chattr("-i");
        assert!(fits, "b went instead of a");
        assert_eq!(left(&store), ["a.png", "c.png"]);
        assert_eq!(stats.recorder_errors.load(Relaxed), 1, "the failed delete is counted");
    }
}
