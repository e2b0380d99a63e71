//! Alerts and masks that could not be handed to the broker, kept on disk until they can.
//!
//! A broker restart or a link that drops must not lose an alert. While MQTT is down (or the
//! client queue is full) the publisher appends each QoS-1 message to this outbox, one file
//! per message under `<state_dir>/outbox/` (`<seq>.msg`: a JSON header line with the topic
//! and the time it was queued, then the payload), written atomically. After a reconnect the
//! connection thread hands them to the client oldest first — behind `online` and the
//! retained state — and deletes each once the client has taken it. The outbox is bounded in
//! bytes and age; the oldest entries go first, counted. It survives a daemon restart.
//!
//! Hand-written: the MQTT crates keep unsent messages in memory only, and a queue of files
//! with a size cap is a few dozen lines over `std::fs`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::durable::write_atomic;
use crate::stats::PipelineStats;

#[derive(Serialize, Deserialize)]
struct Header {
    topic: String,
    retain: bool,
    /// Seconds since the Unix epoch at which the message was queued.
    queued_at: f64,
}

/// A message waiting for the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub topic: String,
    pub retain: bool,
    pub payload: Vec<u8>,
}

pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    max_age: Duration,
    /// Sequence number, path and size of every entry, oldest first.
    entries: VecDeque<(u64, PathBuf, u64)>,
    total: u64,
    next: u64,
    stats: Arc<PipelineStats>,
}

impl Outbox {
    /// Opens (creating) the outbox in `dir` and indexes what an earlier run left there.
    pub fn open(dir: &Path, max_bytes: u64, max_age: Duration, stats: Arc<PipelineStats>) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let seq = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u64>().ok());
            if let (Some(seq), Some("msg")) = (seq, path.extension().and_then(|e| e.to_str())) {
                entries.push((seq, path.clone(), std::fs::metadata(&path)?.len()));
            }
        }
        entries.sort();
        let total = entries.iter().map(|e| e.2).sum();
        let next = entries.last().map_or(0, |e| e.0 + 1);
        stats.outbox_queued.store(entries.len() as u64, Relaxed);
        Ok(Self { dir: dir.to_path_buf(), max_bytes, max_age, entries: entries.into(), total, next, stats })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a message; the oldest entries are dropped (counted) to stay under the cap.
    pub fn push(&mut self, topic: &str, retain: bool, payload: &[u8]) -> std::io::Result<()> {
        let queued_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut bytes = serde_json::to_vec(&Header { topic: topic.into(), retain, queued_at }).expect("header");
        bytes.push(b'\n');
        bytes.extend_from_slice(payload);
        let size = bytes.len() as u64;
        while self.total + size > self.max_bytes && !self.entries.is_empty() {
            self.drop_front("outbox full");
        }
        let path = self.dir.join(format!("{:020}.msg", self.next));
        write_atomic(&path, &bytes)?;
        self.entries.push_back((self.next, path, size));
        self.next += 1;
        self.total += size;
        self.stats.outbox_queued.store(self.entries.len() as u64, Relaxed);
        Ok(())
    }

    /// The oldest message still within the age limit (older and unreadable ones are
    /// dropped, counted).
    pub fn front(&mut self) -> Option<Queued> {
        while let Some((_, path, _)) = self.entries.front() {
            match read(path) {
                Ok((header, payload)) => {
                    let queued = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(header.queued_at.max(0.0));
                    if SystemTime::now().duration_since(queued).unwrap_or_default() > self.max_age {
                        self.drop_front("expired");
                        continue;
                    }
                    return Some(Queued { topic: header.topic, retain: header.retain, payload });
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "Unreadable outbox entry dropped.");
                    self.drop_front("unreadable");
                }
            }
        }
        None
    }

    /// Deletes the oldest entry after the client has taken it.
    pub fn pop_front(&mut self) {
        if let Some((_, path, size)) = self.entries.pop_front() {
            self.total -= size;
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "Cannot delete a delivered outbox entry.");
            }
            self.stats.outbox_queued.store(self.entries.len() as u64, Relaxed);
        }
    }

    fn drop_front(&mut self, reason: &str) {
        self.pop_front();
        self.stats.outbox_dropped.fetch_add(1, Relaxed);
        tracing::warn!(reason, "Outbox entry dropped.");
    }
}

fn read(path: &Path) -> std::io::Result<(Header, Vec<u8>)> {
    let bytes = std::fs::read(path)?;
    let newline = bytes.iter().position(|b| *b == b'\n').ok_or_else(|| std::io::Error::other("no header line"))?;
    let header: Header = serde_json::from_slice(&bytes[..newline]).map_err(std::io::Error::other)?;
    Ok((header, bytes[newline + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_a_reopen_in_order_and_the_cap_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(PipelineStats::default());
        let mut outbox = Outbox::open(dir.path(), 1 << 20, Duration::from_secs(60), stats.clone()).unwrap();
        for i in 0..3u8 {
            outbox.push(&format!("t/{i}"), false, &[i; 10]).unwrap();
        }
        drop(outbox);
        let mut outbox = Outbox::open(dir.path(), 1 << 20, Duration::from_secs(60), stats.clone()).unwrap();
        assert_eq!(outbox.front(), Some(Queued { topic: "t/0".into(), retain: false, payload: vec![0; 10] }));
        outbox.pop_front();
        outbox.push("t/3", true, b"x").unwrap();
        let mut topics = Vec::new();
        while let Some(q) = outbox.front() {
            topics.push(q.topic);
            outbox.pop_front();
        }
        assert_eq!(topics, ["t/1", "t/2", "t/3"]);
        assert!(outbox.is_empty() && std::fs::read_dir(dir.path()).unwrap().next().is_none());

        // A cap of two entries' size: the third push drops the first, counted.
        let size =
            10 + serde_json::to_vec(&Header { topic: "t/0".into(), retain: false, queued_at: 0.0 }).unwrap().len();
        let mut small =
            Outbox::open(&dir.path().join("small"), 2 * size as u64 + 40, Duration::from_secs(60), stats.clone())
                .unwrap();
        for i in 0..3u8 {
            small.push(&format!("t/{i}"), false, &[i; 10]).unwrap();
        }
        assert_eq!(small.front().unwrap().topic, "t/1");
        assert_eq!(stats.outbox_dropped.load(Relaxed), 1);
    }

    #[test]
    fn expired_and_unreadable_entries_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(PipelineStats::default());
        let mut outbox = Outbox::open(dir.path(), 1 << 20, Duration::ZERO, stats.clone()).unwrap();
        outbox.push("old", false, b"1").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(outbox.front(), None, "older than max_age");
        let mut outbox = Outbox::open(dir.path(), 1 << 20, Duration::from_secs(60), stats.clone()).unwrap();
        outbox.push("bad", false, b"1").unwrap();
        std::fs::write(dir.path().join(format!("{:020}.msg", 0)), b"no header").unwrap();
        assert_eq!(outbox.front(), None);
        assert_eq!(stats.outbox_dropped.load(Relaxed), 2);
    }
}
