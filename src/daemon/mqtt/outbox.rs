//! Alerts, masks and events kept on disk until the broker has acknowledged them.
//!
//! A broker restart, a broker that hangs, a link that drops or a daemon that is killed must
//! not lose an alert. The publisher writes every durable message here first — one file per
//! message under `<state_dir>/outbox/` (`<seq>.msg`: a JSON header line with the topic and
//! the time it was queued, then the payload), written atomically — and only then hands it
//! to the MQTT client. An entry is deleted when its PUBACK arrives ([`Outbox::ack`]); until
//! then it is *handed*. A connection that fails before the PUBACK makes it unsent again
//! ([`Outbox::unhand`]) and the connection thread hands it once more, oldest first, after
//! `online` and the retained state: at least once, possibly twice. The outbox is bounded in
//! bytes and age; the oldest entries go first, counted. It survives a daemon restart, where
//! every entry starts unsent.
//!
//! Hand-written: the MQTT crates keep unacknowledged messages in memory only, and a queue
//! of files with a size cap is a few dozen lines over `std::fs`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::durable::write_atomic;
use crate::stats::{LogThrottle, PipelineStats};

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

struct Entry {
    seq: u64,
    path: PathBuf,
    size: u64,
    /// Handed to the client, its PUBACK not seen yet.
    handed: bool,
}

pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    max_age: Duration,
    /// Every entry, oldest (lowest sequence number) first.
    entries: VecDeque<Entry>,
    total: u64,
    next: u64,
    stats: Arc<PipelineStats>,
    /// Drops are counted each; logged once per 10 s (a small cap in a long outage drops
    /// one entry per alert).
    drops: LogThrottle,
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
                let size = std::fs::metadata(&path)?.len();
                entries.push(Entry { seq, path, size, handed: false });
            }
        }
        entries.sort_by_key(|e| e.seq);
        let total = entries.iter().map(|e| e.size).sum();
        let next = entries.last().map_or(0, |e| e.seq + 1);
        stats.outbox_queued.store(entries.len() as u64, Relaxed);
        let drops = LogThrottle::new(Duration::from_secs(10));
        Ok(Self { dir: dir.to_path_buf(), max_bytes, max_age, entries: entries.into(), total, next, stats, drops })
    }

    /// Nothing waits, handed or not.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Some entry waits to be handed to the client.
    pub fn has_unsent(&self) -> bool {
        self.entries.iter().any(|e| !e.handed)
    }

    /// Appends a message and returns its sequence number; the oldest entries are dropped
    /// (counted) to stay under the cap.
    pub fn push(&mut self, topic: &str, retain: bool, payload: &[u8]) -> std::io::Result<u64> {
        let queued_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let mut bytes = serde_json::to_vec(&Header { topic: topic.into(), retain, queued_at }).expect("header");
        bytes.push(b'\n');
        bytes.extend_from_slice(payload);
        let size = bytes.len() as u64;
        while self.total + size > self.max_bytes && !self.entries.is_empty() {
            self.drop_at(0, "outbox full");
        }
        let seq = self.next;
        let path = self.dir.join(format!("{seq:020}.msg"));
        write_atomic(&path, &bytes)?;
        self.entries.push_back(Entry { seq, path, size, handed: false });
        self.next += 1;
        self.total += size;
        self.stats.outbox_queued.store(self.entries.len() as u64, Relaxed);
        Ok(seq)
    }

    /// The oldest unsent message still within the age limit, with its sequence number
    /// (older and unreadable ones are dropped, counted).
    pub fn next_unsent(&mut self) -> Option<(u64, Queued)> {
        while let Some(index) = self.entries.iter().position(|e| !e.handed) {
            match read(&self.entries[index].path) {
                Ok((header, payload)) => {
                    let queued = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(header.queued_at.max(0.0));
                    if SystemTime::now().duration_since(queued).unwrap_or_default() > self.max_age {
                        self.drop_at(index, "expired");
                        continue;
                    }
                    let message = Queued { topic: header.topic, retain: header.retain, payload };
                    return Some((self.entries[index].seq, message));
                }
                Err(e) => {
                    let path = self.entries[index].path.display().to_string();
                    tracing::warn!(path, error = %e, "Unreadable outbox entry dropped.");
                    self.drop_at(index, "unreadable");
                }
            }
        }
        None
    }

    /// Entry `seq` was handed to the client.
    pub fn handed(&mut self, seq: u64) {
        if let Some(index) = self.index(seq) {
            self.entries[index].handed = true;
        }
    }

    /// Entries the client no longer holds (a connection lost before their PUBACK): they
    /// are unsent again.
    pub fn unhand(&mut self, seqs: &[u64]) {
        for seq in seqs {
            if let Some(index) = self.index(*seq) {
                self.entries[index].handed = false;
            }
        }
    }

    /// Entry `seq` was acknowledged by the broker: it is deleted. Unknown sequence numbers
    /// (an entry the cap already dropped) are ignored.
    pub fn ack(&mut self, seq: u64) {
        if let Some(index) = self.index(seq) {
            self.remove(index);
        }
    }

    /// Drops entry `seq` unsent, counted, with `reason` (a message the broker cannot take).
    pub fn drop_entry(&mut self, seq: u64, reason: &str) {
        if let Some(index) = self.index(seq) {
            self.drop_at(index, reason);
        }
    }

    fn index(&self, seq: u64) -> Option<usize> {
        self.entries.binary_search_by_key(&seq, |e| e.seq).ok()
    }

    fn remove(&mut self, index: usize) {
        let Some(entry) = self.entries.remove(index) else { return };
        self.total -= entry.size;
        if let Err(e) = std::fs::remove_file(&entry.path) {
            tracing::warn!(path = %entry.path.display(), error = %e, "Cannot delete an outbox entry.");
        }
        self.stats.outbox_queued.store(self.entries.len() as u64, Relaxed);
    }

    fn drop_at(&mut self, index: usize, reason: &str) {
        self.remove(index);
        self.stats.outbox_dropped.fetch_add(1, Relaxed);
        if let Some(suppressed) = self.drops.admit() {
            tracing::warn!(reason, suppressed, "Outbox entry dropped.");
        }
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

    fn drain(outbox: &mut Outbox) -> Vec<String> {
        let mut topics = Vec::new();
        while let Some((seq, q)) = outbox.next_unsent() {
            topics.push(q.topic);
            outbox.handed(seq);
            outbox.ack(seq);
        }
        topics
    }

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
        let (seq, first) = outbox.next_unsent().unwrap();
        assert_eq!(first, Queued { topic: "t/0".into(), retain: false, payload: vec![0; 10] });
        outbox.handed(seq);
        outbox.ack(seq);
        outbox.push("t/3", true, b"x").unwrap();
        assert_eq!(drain(&mut outbox), ["t/1", "t/2", "t/3"]);
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
        assert_eq!(small.next_unsent().unwrap().1.topic, "t/1");
        assert_eq!(stats.outbox_dropped.load(Relaxed), 1);
    }

    #[test]
    fn a_handed_entry_stays_on_disk_until_its_ack_and_returns_when_unhanded() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(PipelineStats::default());
        let mut outbox = Outbox::open(dir.path(), 1 << 20, Duration::from_secs(60), stats.clone()).unwrap();
        let a = outbox.push("a", false, b"1").unwrap();
        let b = outbox.push("b", false, b"2").unwrap();
        outbox.handed(a);
        outbox.handed(b);
        assert!(outbox.next_unsent().is_none() && !outbox.has_unsent());
        outbox.ack(b); // acknowledged out of order
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "only the unacknowledged one is kept");
        // The connection failed before a's PUBACK: it is sent again, and so is it after a restart.
        outbox.unhand(&[a]);
        assert_eq!(
            outbox.next_unsent().unwrap(),
            (a, Queued { topic: "a".into(), retain: false, payload: b"1".to_vec() })
        );
        outbox.handed(a);
        drop(outbox);
        let mut reopened = Outbox::open(dir.path(), 1 << 20, Duration::from_secs(60), stats.clone()).unwrap();
        assert_eq!(reopened.next_unsent().map(|(seq, _)| seq), Some(a), "a restart sends what was never acknowledged");
        assert_eq!(stats.outbox_queued.load(Relaxed), 1);
    }

    #[test]
    fn expired_and_unreadable_entries_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(PipelineStats::default());
        let mut outbox = Outbox::open(dir.path(), 1 << 20, Duration::ZERO, stats.clone()).unwrap();
        outbox.push("old", false, b"1").unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(outbox.next_unsent(), None, "older than max_age");
        let mut outbox = Outbox::open(dir.path(), 1 << 20, Duration::from_secs(60), stats.clone()).unwrap();
        outbox.push("bad", false, b"1").unwrap();
        std::fs::write(dir.path().join(format!("{:020}.msg", 0)), b"no header").unwrap();
        assert_eq!(outbox.next_unsent(), None);
        assert_eq!(stats.outbox_dropped.load(Relaxed), 2);
    }
}
