//! Shipping the capture store to S3-compatible object storage (`[upload]`), so that
//! recordings and labels reach shared storage where training runs, through `object_store`.
//!
//! The queue is the store itself: every few seconds the uploader lists the store and puts
//! each file that its ledger (`<state_dir>/upload-ledger.json`: path → size and mtime of
//! what was uploaded, written atomically) does not hold as is — new recordings, and labels
//! written or changed since. So nothing to upload is lost across restarts or outages, and
//! the queue is bounded by the store's own bounds (`max_bytes`, `max_age_days`); a file the
//! recorder prunes before it was uploaded is gone from the queue with it. A failed put is
//! counted and retried after a backoff (1 s doubling to 60 s); inspection never waits for
//! it: the uploader runs on a thread of its own and reads only what the recorder wrote.
//!
//! Keys are `<prefix>/<node>/<camera>/<YYYY-MM-DD>/<class>/<file>`, the day (UTC) from the
//! recording's capture time, so that a store's listing by node, camera and day is a prefix.
//!
//! What is uploaded is shared with the recorder ([`Uploaded`]): when the store is full it
//! prunes recordings already in object storage before those still waiting, so an outage
//! loses the newest uploads' local copies rather than recordings that exist nowhere else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::Receiver;
use object_store::ObjectStore;

use crate::backoff::{Backoff, pause};
use crate::config::UploadConfig;
use crate::durable::write_atomic;
use crate::stats::LogThrottle;

/// The ledger's file name under `state_dir`.
pub const LEDGER: &str = "upload-ledger.json";
/// How often the store is listed while nothing is pending.
const SCAN_EVERY: Duration = Duration::from_secs(2);
/// The ledger is written at most this often while uploads go on (and at the end).
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// Time one put may take.
const PUT_TIMEOUT: Duration = Duration::from_secs(60);

/// The uploader's counters (`/metrics`).
#[derive(Debug, Default)]
pub struct UploadStats {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
    /// Files waiting at the last listing.
    pub pending: AtomicU64,
}

/// What the ledger keeps of an uploaded file.
type Seen = (u64, u128);

/// The store's files that are in object storage as they are (absolute paths), kept by the
/// uploader and read by the recorder when it makes room; as large as the ledger.
#[derive(Debug, Default)]
pub struct Uploaded(std::sync::Mutex<std::collections::HashSet<PathBuf>>);

impl Uploaded {
    /// Whether every one of `files` is uploaded.
    pub fn all(&self, files: impl IntoIterator<Item = impl AsRef<Path>>) -> bool {
        let uploaded = self.0.lock().expect("uploaded lock");
        files.into_iter().all(|f| uploaded.contains(f.as_ref()))
    }

    /// `file` is in object storage as it is now.
    pub fn insert(&self, file: PathBuf) {
        self.0.lock().expect("uploaded lock").insert(file);
    }

    /// Now exactly `files` (relative to `store_dir`).
    fn reset<'a>(&self, store_dir: &Path, files: impl Iterator<Item = &'a String>) {
        *self.0.lock().expect("uploaded lock") = files.map(|relative| store_dir.join(relative)).collect();
    }
}

pub struct Uploader {
    config: UploadConfig,
    node: String,
    store_dir: PathBuf,
    ledger_path: PathBuf,
    ledger: BTreeMap<String, Seen>,
    stats: Arc<UploadStats>,
    uploaded: Arc<Uploaded>,
}

impl Uploader {
    /// The uploader of `store_dir` with the ledger under `state_dir` (an unreadable ledger
    /// is logged and started afresh: puts are idempotent, so files go up again); each
    /// listing and put brings `uploaded` in step with the ledger.
    pub fn new(
        config: UploadConfig,
        node: String,
        store_dir: PathBuf,
        state_dir: &Path,
        stats: Arc<UploadStats>,
        uploaded: Arc<Uploaded>,
    ) -> Self {
        let ledger_path = state_dir.join(LEDGER);
        let ledger = match std::fs::read(&ledger_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %ledger_path.display(), error = %e, "Unreadable upload ledger; starting afresh.");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        Self { config, node, store_dir, ledger_path, ledger, stats, uploaded }
    }

    fn client(&self) -> object_store::Result<object_store::aws::AmazonS3> {
        crate::objects::configured_client(&self.config, &self.config.bucket, PUT_TIMEOUT)
    }

    /// Uploads until `stop`'s sender is dropped; saves the ledger on the way out.
    pub fn run(mut self, stop: Receiver<()>) {
        let client = match self.client() {
            Ok(client) => client,
            Err(e) => {
                tracing::error!(error = %e, "Cannot set up the object store client; nothing is uploaded.");
                return;
            }
        };
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            tracing::error!("Cannot start the uploader's runtime; nothing is uploaded.");
            return;
        };
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let failures = LogThrottle::new(Duration::from_secs(30));
        let mut saved = Instant::now();
        loop {
            let pending = self.pending();
            self.stats.pending.store(pending.len() as u64, Relaxed);
            let mut failed = false;
            for (relative, seen) in &pending {
                match runtime.block_on(self.put(&client, relative)) {
                    // Pruned by the recorder since the listing: the next one forgets it.
                    Ok(None) => {}
                    Ok(Some(bytes)) => {
                        self.ledger.insert(relative.clone(), *seen);
                        self.uploaded.insert(self.store_dir.join(relative));
                        self.stats.files.fetch_add(1, Relaxed);
                        self.stats.bytes.fetch_add(bytes, Relaxed);
                        self.stats.pending.fetch_sub(1, Relaxed);
                        backoff.reset();
                    }
                    Err(e) => {
                        self.stats.failures.fetch_add(1, Relaxed);
                        if let Some(suppressed) = failures.admit() {
                            tracing::warn!(file = %relative, error = %e, suppressed, "Upload failed; retrying.");
                        }
                        failed = true;
                        break;
                    }
                }
                if saved.elapsed() >= SAVE_EVERY {
                    self.save();
                    saved = Instant::now();
                }
                if matches!(stop.try_recv(), Err(crossbeam_channel::TryRecvError::Disconnected)) {
                    break;
                }
            }
            self.save();
            saved = Instant::now();
            let wait = if failed { backoff.next_delay() } else { SCAN_EVERY };
            if !pause(&stop, wait) {
                break;
            }
        }
        self.save();
        tracing::debug!("Uploader stopped.");
    }

    /// Puts one file of the store; the bytes sent, `None` if the file is gone.
    async fn put(&self, client: &object_store::aws::AmazonS3, relative: &str) -> Result<Option<u64>, String> {
        let key = object_key(&self.config.prefix, &self.node, relative).ok_or("not a recording's file")?;
        let bytes = match std::fs::read(self.store_dir.join(relative)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{relative}: {e}")),
        };
        let size = bytes.len() as u64;
        client.put(&key, bytes.into()).await.map_err(|e| causes(&e))?;
        Ok(Some(size))
    }

    /// The store's files the ledger does not hold as they are now, oldest first; entries
    /// of files no longer in the store leave the ledger.
    fn pending(&mut self) -> Vec<(String, Seen)> {
        let mut found = Vec::new();
        list(&self.store_dir, &self.store_dir, &mut found);
        let present: std::collections::BTreeSet<&String> = found.iter().map(|(r, _, _)| r).collect();
        self.ledger.retain(|path, _| present.contains(path));
        let current = found.iter().filter(|(relative, seen, _)| self.ledger.get(relative) == Some(seen));
        self.uploaded.reset(&self.store_dir, current.map(|(relative, _, _)| relative));
        let mut pending: Vec<(String, Seen, SystemTime)> = found
            .into_iter()
            .filter(|(relative, seen, _)| self.ledger.get(relative) != Some(seen))
            .filter(|(relative, _, _)| object_key(&self.config.prefix, &self.node, relative).is_some())
            .collect();
        pending.sort_by_key(|(_, _, modified)| *modified);
        pending.into_iter().map(|(r, seen, _)| (r, seen)).collect()
    }

    fn save(&self) {
        let bytes = serde_json::to_vec(&self.ledger).expect("the ledger serialises");
        if let Err(e) = write_atomic(&self.ledger_path, &bytes) {
            tracing::warn!(path = %self.ledger_path.display(), error = %e, "Cannot save the upload ledger.");
        }
    }
}

/// `e` with its causes (a client error's own text is often only "builder error").
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

/// Every file under `dir` as (path relative to `root`, (size, mtime ns), mtime).
fn list(root: &Path, dir: &Path, out: &mut Vec<(String, Seen, SystemTime)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            list(root, &path, out);
        } else if let (Ok(relative), Ok(modified)) = (path.strip_prefix(root), meta.modified()) {
            let ns = modified.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
            out.push((relative.to_string_lossy().into_owned(), (meta.len(), ns), modified));
        }
    }
}

/// `<prefix>/<node>/<camera>/<day>/<class>/<file>` for the store's `<camera>/<class>/<file>`,
/// where `<file>` starts with the capture time in ms (`<ms>-<seq>…`); `None` for anything
/// else (the marker, temporary files).
pub fn object_key(prefix: &str, node: &str, relative: &str) -> Option<object_store::path::Path> {
    let [camera, class, file] = relative.split('/').collect::<Vec<_>>()[..] else { return None };
    let ms: u64 = file.split_once('-')?.0.parse().ok()?;
    if !matches!(class, "flagged" | "normal") || file.starts_with('.') {
        return None;
    }
    let day = crate::timestamp::rfc3339(UNIX_EPOCH + Duration::from_millis(ms));
    let key = [prefix, node, camera, &day[..10], class, file]
        .iter()
        .filter(|p| !p.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("/");
    object_store::path::Path::parse(key).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_node_camera_day_and_class_and_leave_other_files_out() {
        let key = object_key("plant-a", "line3", "cam0/flagged/1796416558210-000003_mask.png").unwrap();
        assert_eq!(key.as_ref(), "plant-a/line3/cam0/2026-12-04/flagged/1796416558210-000003_mask.png");
        let label = object_key("", "n", "cam0/normal/1000-000001.label.json").unwrap();
        assert_eq!(label.as_ref(), "n/cam0/1970-01-01/normal/1000-000001.label.json");
        for other in
            ["edge-inspect-captures.toml", "cam0/flagged/.tmp-x", "cam0/other/1000-1.png", "cam0/flagged/x.png"]
        {
            assert!(object_key("p", "n", other).is_none(), "{other}");
        }
    }

    #[test]
    fn pending_files_are_the_ones_the_ledger_does_not_hold_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("captures");
        std::fs::create_dir_all(store.join("cam0/flagged")).unwrap();
        std::fs::write(store.join("cam0/flagged/1000-000001.png"), b"a").unwrap();
        std::fs::write(store.join("cam0/flagged/2000-000002.png"), b"bb").unwrap();
        std::fs::write(store.join("edge-inspect-captures.toml"), b"marker").unwrap();
        let config = UploadConfig {
            enabled: true,
            endpoint: "http://127.0.0.1:1".into(),
            bucket: "b".into(),
            region: "us-east-1".into(),
            prefix: "p".into(),
            credentials: None,
        };
        let stats = Arc::new(UploadStats::default());
        let uploaded = Arc::new(Uploaded::default());
        let mut uploader =
            Uploader::new(config.clone(), "n".into(), store.clone(), dir.path(), stats.clone(), uploaded.clone());
        let pending = uploader.pending();
        assert_eq!(
            pending.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(),
            ["cam0/flagged/1000-000001.png", "cam0/flagged/2000-000002.png"]
        );
        // The first was uploaded; a ledger entry of a file now gone is dropped.
        uploader.ledger.insert(pending[0].0.clone(), pending[0].1);
        uploader.ledger.insert("cam0/flagged/0-000000.png".into(), (1, 1));
        uploader.save();
        let uploaded = Arc::new(Uploaded::default());
        let mut reopened = Uploader::new(config, "n".into(), store.clone(), dir.path(), stats, uploaded.clone());
        let first = store.join("cam0/flagged/1000-000001.png");
        assert_eq!(reopened.pending().len(), 1, "the ledger survives a restart");
        assert!(uploaded.all([&first]), "the recorder knows what the ledger holds");
        assert!(!reopened.ledger.contains_key("cam0/flagged/0-000000.png"));
        assert!(!uploaded.all([store.join("cam0/flagged/0-000000.png")]), "nor a file gone");
        assert!(!uploaded.all([&first, &store.join("cam0/flagged/2000-000002.png")]));
        // A file that changes (a label rewritten) is pending again.
        std::fs::write(&first, b"changed").unwrap();
        assert_eq!(reopened.pending().len(), 2);
        assert!(!uploaded.all([&first]), "a changed file is not uploaded as it is");
    }
}
