//! The cross-camera batcher, after DeepStream's nvstreammux: a batch closes when it holds
//! `max_batch` frames or when `max_wait` has passed since its *first* frame.
//!
//! [`Batcher`] is the decision alone — a state machine over "a frame came at time t" and
//! "it is now t" — so its rules are unit-tested without threads or clocks. [`run`] is the
//! thread around it: it keeps one open batch per model (a batch never mixes models), takes
//! queued frames round-robin (no camera starves the others) from the camera queues that
//! have joined so far (cameras come and go with a reload), waits for the next frame or the
//! deadline, hands batches on, and at shutdown batches whatever is still queued, so a
//! capture thread stuck in a blocking read cannot hold the drain up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, SendTimeoutError, Sender, TryRecvError};

use crate::frame::Frame;
use crate::stats::Progress;

/// The open batch and the rule that closes it.
#[derive(Debug)]
pub struct Batcher<T> {
    max_batch: usize,
    max_wait: Duration,
    pending: Vec<T>,
    /// When the open batch must close: its first item's arrival plus `max_wait`.
    deadline: Option<Instant>,
}

impl<T> Batcher<T> {
    pub fn new(max_batch: usize, max_wait: Duration) -> Self {
        assert!(max_batch > 0, "a batch holds at least one frame");
        Self { max_batch, max_wait, pending: Vec::with_capacity(max_batch), deadline: None }
    }

    /// Adds an item that arrived at `now`; returns the batch if that filled it.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Vec<T>> {
        if self.pending.is_empty() {
            self.deadline = Some(now + self.max_wait);
        }
        self.pending.push(item);
        (self.pending.len() >= self.max_batch).then(|| self.take())
    }

    /// When the open batch closes; `None` while there is none.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The open batch, if its deadline has come by `now`.
    pub fn due(&mut self, now: Instant) -> Option<Vec<T>> {
        self.deadline.is_some_and(|d| now >= d).then(|| self.take())
    }

    /// The open batch, whatever its size (shutdown, or every source gone).
    pub fn flush(&mut self) -> Option<Vec<T>> {
        (!self.pending.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> Vec<T> {
        self.deadline = None;
        std::mem::replace(&mut self.pending, Vec::with_capacity(self.max_batch))
    }
}

/// One open batch per model: frames for different models never share a batch, and each
/// batch closes by the [`Batcher`] rule on its own.
struct PerModel {
    max_batch: usize,
    max_wait: Duration,
    open: BTreeMap<usize, Batcher<Frame>>,
}

impl PerModel {
    fn new(max_batch: usize, max_wait: Duration) -> Self {
        Self { max_batch, max_wait, open: BTreeMap::new() }
    }

    fn push(&mut self, frame: Frame, now: Instant) -> Option<Vec<Frame>> {
        let (max_batch, max_wait) = (self.max_batch, self.max_wait);
        self.open.entry(frame.model).or_insert_with(|| Batcher::new(max_batch, max_wait)).push(frame, now)
    }

    /// When the next open batch closes.
    fn deadline(&self) -> Option<Instant> {
        self.open.values().filter_map(Batcher::deadline).min()
    }

    fn due(&mut self, now: Instant) -> Vec<Vec<Frame>> {
        self.open.values_mut().filter_map(|b| b.due(now)).collect()
    }

    fn flush(&mut self) -> Vec<Vec<Frame>> {
        self.open.values_mut().filter_map(Batcher::flush).collect()
    }
}

/// How long the batcher blocks at most before it shows progress again.
const TURN: Duration = Progress::TURN;

/// Why the batcher loop stopped handing batches on.
enum Stop {
    /// Shutdown, or every camera gone: what was queued has been batched.
    Drained,
    /// The inference worker is gone.
    Downstream,
}

/// The camera queues the batcher reads: each camera's queue joins once (`joins`), and
/// stays until it is closed and empty.
struct Queues {
    joins: Receiver<Receiver<Frame>>,
    /// Whether more queues may still join.
    joining: bool,
    queues: Vec<Receiver<Frame>>,
    /// Round-robin: the queue the next round starts at.
    next: usize,
}

impl Queues {
    fn take_joins(&mut self) {
        loop {
            match self.joins.try_recv() {
                Ok(queue) => self.queues.push(queue),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.joining = false;
                    return;
                }
            }
        }
    }

    /// Whether no frame can come any more: no queue may join and every queue is closed.
    fn ended(&self) -> bool {
        !self.joining && self.queues.is_empty()
    }
}

/// The batcher thread: camera queues (each sent once on `joins`) → `batches`, one open
/// batch per model. Ends when `joins` is closed and every queue is closed and empty, at
/// shutdown (`stop`'s sender dropped) after batching what is queued, or when the worker is
/// gone. `progress` turns at least every [`TURN`], also while it waits for a busy worker to
/// take a batch (that wait is the worker's time, not ours).
pub fn run(
    joins: Receiver<Receiver<Frame>>,
    max_batch: usize,
    max_wait: Duration,
    batches: Sender<Vec<Frame>>,
    stop: Receiver<()>,
    progress: Progress,
) {
    let mut batcher = PerModel::new(max_batch, max_wait);
    let mut queues = Queues { joins, joining: true, queues: Vec::new(), next: 0 };
    let stopped = loop {
        progress.beat();
        if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
            break drain(&mut queues, &mut batcher, &batches, &progress);
        }
        queues.take_joins();
        // One frame per camera per round, starting one camera later each time. Between
        // rounds the loop comes back here: under overload the queues never run empty, and
        // a camera that joins, a stop or another model's max_wait must not wait for that.
        let took = match take_round(&mut queues, &mut batcher, &batches, &progress) {
            Ok(took) => took,
            Err(stopped) => break stopped,
        };
        if let Err(stopped) = hand_on_all(&batches, batcher.due(Instant::now()), &progress) {
            break stopped;
        }
        if queues.ended() {
            break drain(&mut queues, &mut batcher, &batches, &progress);
        }
        if took {
            continue;
        }
        let mut select = Select::new();
        for queue in &queues.queues {
            select.recv(queue);
        }
        let stop_index = select.recv(&stop);
        let joins_index = queues.joining.then(|| select.recv(&queues.joins));
        let wake = batcher.deadline().map_or(Instant::now() + TURN, |d| d.min(Instant::now() + TURN));
        let Ok(ready) = select.select_deadline(wake) else { continue };
        if ready.index() == stop_index {
            let _ = ready.recv(&stop);
            continue; // the check at the top drains
        }
        if Some(ready.index()) == joins_index {
            match ready.recv(&queues.joins) {
                Ok(queue) => queues.queues.push(queue),
                Err(_) => queues.joining = false,
            }
            continue;
        }
        let camera = ready.index();
        match ready.recv(&queues.queues[camera]) {
            Ok(frame) => {
                if let Some(batch) = batcher.push(frame, Instant::now())
                    && let Err(stopped) = hand_on(&batches, batch, &progress)
                {
                    break stopped;
                }
            }
            Err(_) => {
                queues.queues.remove(camera);
            }
        }
    };
    match stopped {
        Stop::Drained => tracing::debug!("Batcher stopped."),
        Stop::Downstream => tracing::debug!("Batcher stopped: the inference worker is gone."),
    }
}

/// One round-robin round: the next queued frame of each camera into the batcher, full
/// batches handed on; `true` when it took any. A queue found closed and empty leaves.
fn take_round(
    queues: &mut Queues,
    batcher: &mut PerModel,
    batches: &Sender<Vec<Frame>>,
    progress: &Progress,
) -> Result<bool, Stop> {
    let mut took = false;
    let mut closed = Vec::new();
    let n = queues.queues.len();
    for k in 0..n {
        let i = (queues.next + k) % n;
        match queues.queues[i].try_recv() {
            Ok(frame) => {
                took = true;
                if let Some(batch) = batcher.push(frame, Instant::now()) {
                    hand_on(batches, batch, progress)?;
                }
            }
            Err(TryRecvError::Disconnected) => closed.push(i),
            Err(TryRecvError::Empty) => {}
        }
    }
    // Highest index first: the round started at `next`, so `closed` is not in order.
    closed.sort_unstable_by(|a, b| b.cmp(a));
    for i in closed {
        queues.queues.remove(i);
    }
    queues.next = (queues.next + 1) % queues.queues.len().max(1);
    Ok(took)
}

/// Batches everything still queued and hands it on: the last act of the batcher.
fn drain(queues: &mut Queues, batcher: &mut PerModel, batches: &Sender<Vec<Frame>>, progress: &Progress) -> Stop {
    queues.take_joins();
    for frame in queues.queues.iter().flat_map(|q| q.try_iter()) {
        if let Some(batch) = batcher.push(frame, Instant::now())
            && let Err(stopped) = hand_on(batches, batch, progress)
        {
            return stopped;
        }
    }
    match hand_on_all(batches, batcher.flush(), progress) {
        Err(stopped) => stopped,
        Ok(()) => Stop::Drained,
    }
}

fn hand_on_all(batches: &Sender<Vec<Frame>>, closed: Vec<Vec<Frame>>, progress: &Progress) -> Result<(), Stop> {
    closed.into_iter().try_for_each(|batch| hand_on(batches, batch, progress))
}

/// Sends `batch` to the worker, showing progress while the worker is busy.
fn hand_on(batches: &Sender<Vec<Frame>>, mut batch: Vec<Frame>, progress: &Progress) -> Result<(), Stop> {
    loop {
        match batches.send_timeout(batch, TURN) {
            Ok(()) => return Ok(()),
            Err(SendTimeoutError::Timeout(back)) => {
                progress.beat();
                batch = back;
            }
            Err(SendTimeoutError::Disconnected(_)) => return Err(Stop::Downstream),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `queues` as joined at the start, with no more to come.
    fn joined(queues: Vec<Receiver<Frame>>) -> Receiver<Receiver<Frame>> {
        let (tx, rx) = crossbeam_channel::unbounded();
        queues.into_iter().for_each(|q| tx.send(q).unwrap());
        rx
    }

    #[test]
    fn batches_never_mix_models_and_a_queue_may_join_later() {
        let (joins_tx, joins_rx) = crossbeam_channel::unbounded();
        let (out_tx, out_rx) = crossbeam_channel::bounded(8);
        let (_stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let worker =
            std::thread::spawn(move || run(joins_rx, 2, Duration::from_secs(60), out_tx, stop_rx, Progress::new()));
        let (a_tx, a_rx) = crossbeam_channel::bounded(8);
        joins_tx.send(a_rx).unwrap();
        let frame = |camera, seq, model| Frame { model, ..Frame::uniform(camera, seq, [1, 1], 0.0) };
        a_tx.send(frame(0, 1, 0)).unwrap();
        a_tx.send(frame(0, 2, 1)).unwrap();
        // One frame per model: no batch is full yet. Were one sent early, it would be the
        // first batch received below, not model 1's pair.
        let (b_tx, b_rx) = crossbeam_channel::bounded(8);
        joins_tx.send(b_rx).unwrap();
        b_tx.send(frame(1, 1, 1)).unwrap();
        let batch = out_rx.recv_timeout(Duration::from_secs(2)).unwrap();
        // Round-robin may take either camera's frame first.
        let mut got: Vec<(usize, usize)> = batch.iter().map(|f| (f.camera, f.model)).collect();
        got.sort();
        assert_eq!(got, vec![(0, 1), (1, 1)], "the late camera's frame joined model 1's batch");
        drop((joins_tx, a_tx, b_tx));
        worker.join().unwrap();
        let rest: Vec<Vec<(usize, usize)>> =
            out_rx.try_iter().map(|b| b.iter().map(|f| (f.camera, f.model)).collect()).collect();
        assert_eq!(rest, vec![vec![(0, 0)]], "model 0's frame flushed alone when every queue closed");
    }

    /// The drill for a panic: a round that starts at queue 1 finds queues 1 and 0 closed,
    /// in that order; removing them must not shift an index out of range.
    #[test]
    fn queues_closed_in_the_same_round_all_leave() {
        let (a_tx, a_rx) = crossbeam_channel::bounded(1);
        let (b_tx, b_rx) = crossbeam_channel::bounded(1);
        let (_joins_tx, joins) = crossbeam_channel::bounded(1);
        let mut queues = Queues { joins, joining: true, queues: vec![a_rx, b_rx], next: 1 };
        drop((a_tx, b_tx));
        let (out_tx, _out_rx) = crossbeam_channel::bounded(1);
        let mut batcher = PerModel::new(2, Duration::from_secs(1));
        assert_eq!(take_round(&mut queues, &mut batcher, &out_tx, &Progress::new()).ok(), Some(false));
        assert!(queues.queues.is_empty());
    }

    /// The drill for starvation under overload: while one camera's queue never runs empty
    /// (here: 40 frames queued and a worker that takes one batch at a time), a camera that
    /// joins gets its frame into the next rounds, not after the backlog.
    #[test]
    fn a_camera_that_joins_under_a_backlog_is_served_at_once() {
        let (joins_tx, joins_rx) = crossbeam_channel::unbounded();
        let (out_tx, out_rx) = crossbeam_channel::bounded(1);
        let (_stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (a_tx, a_rx) = crossbeam_channel::bounded(64);
        for seq in 0..40 {
            a_tx.send(Frame::uniform(0, seq, [1, 1], 0.0)).unwrap();
        }
        joins_tx.send(a_rx).unwrap();
        let worker =
            std::thread::spawn(move || run(joins_rx, 1, Duration::from_secs(60), out_tx, stop_rx, Progress::new()));
        // Camera 1 joins once the batcher is in its rounds over camera 0's backlog: it has
        // handed the first batch on and has moved at most two more frames (one in the full
        // channel, one waiting to be sent).
        let first = out_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first[0].camera, 0);
        let (b_tx, b_rx) = crossbeam_channel::bounded(4);
        b_tx.send(Frame::uniform(1, 0, [1, 1], 0.0)).unwrap();
        joins_tx.send(b_rx).unwrap();
        let order: Vec<usize> =
            (0..40).map(|_| out_rx.recv_timeout(Duration::from_secs(5)).unwrap()[0].camera).collect();
        let position = order.iter().position(|&camera| camera == 1);
        assert!(position.is_some_and(|p| p < 4), "camera 1's frame came at {position:?} of {order:?}");
        drop((joins_tx, a_tx, b_tx));
        worker.join().unwrap();
    }

    #[test]
    fn a_batch_closes_when_full_or_at_the_wait_from_its_first_item() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(3, ms(100));
        assert_eq!((b.deadline(), b.flush()), (None, None));
        assert_eq!(b.push('a', t), None);
        assert_eq!(b.deadline(), Some(t + ms(100)), "the wait runs from the first item");
        assert_eq!(b.push('b', t + ms(90)), None);
        assert_eq!(b.deadline(), Some(t + ms(100)), "later items do not extend it");
        assert_eq!(b.due(t + ms(99)), None);
        assert_eq!(b.due(t + ms(100)), Some(vec!['a', 'b']));
        assert_eq!(b.deadline(), None);
        for c in ['c', 'd'] {
            assert_eq!(b.push(c, t + ms(200)), None);
        }
        assert_eq!(b.push('e', t + ms(500)), Some(vec!['c', 'd', 'e']), "full closes at once, late or not");
        assert_eq!(b.push('f', t + ms(600)), None);
        assert_eq!(b.deadline(), Some(t + ms(700)), "a new batch, a new wait");
        assert_eq!(b.flush(), Some(vec!['f']));
        assert_eq!(b.due(t + ms(10_000)), None);
    }

    #[test]
    fn the_thread_fills_round_robin_then_waits_out_the_deadline() {
        let (a_tx, a_rx) = crossbeam_channel::bounded(4);
        let (b_tx, b_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(4);
        for seq in 0..2 {
            a_tx.send(Frame::uniform(0, seq, [1, 1], 0.0)).unwrap();
        }
        b_tx.send(Frame::uniform(1, 0, [1, 1], 0.0)).unwrap();
        b_tx.send(Frame::uniform(1, 1, [1, 1], 0.0)).unwrap();
        let (_stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let progress = Progress::new();
        let worker = std::thread::spawn(move || {
            run(joined(vec![a_rx, b_rx]), 3, Duration::from_millis(150), out_tx, stop_rx, progress)
        });
        // Four frames queued, max 3: a full batch at once, then one frame after the wait.
        let first = out_rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_eq!(first.len(), 3);
        let started = Instant::now();
        let second = out_rx.recv_timeout(Duration::from_secs(2)).unwrap();
        assert_eq!(second.len(), 1);
        assert!(started.elapsed() >= Duration::from_millis(100), "partial batch waited {:?}", started.elapsed());
        let cameras: std::collections::BTreeSet<usize> = first.iter().map(|f| f.camera).collect();
        assert_eq!(cameras.len(), 2, "both cameras in the full batch");
        drop((a_tx, b_tx));
        worker.join().unwrap();
        assert!(out_rx.recv().is_err(), "the batcher ends when every camera is gone");
    }

    #[test]
    fn shutdown_batches_what_is_queued_even_if_a_camera_hangs() {
        let (a_tx, a_rx) = crossbeam_channel::bounded(8);
        let (out_tx, out_rx) = crossbeam_channel::bounded(8);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        // The camera still holds its sender (a capture thread stuck in a read) ...
        for seq in 0..3 {
            a_tx.send(Frame::uniform(0, seq, [1, 1], 0.0)).unwrap();
        }
        drop(stop_tx);
        let worker = std::thread::spawn(move || {
            run(joined(vec![a_rx]), 2, Duration::from_secs(60), out_tx, stop_rx, Progress::new())
        });
        worker.join().unwrap();
        // ... yet every queued frame came out, in batches of at most 2.
        let sizes: Vec<usize> = out_rx.try_iter().map(|b| b.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 3, "{sizes:?}");
        assert!(sizes.iter().all(|s| *s <= 2));
        drop(a_tx);
    }

    #[test]
    fn progress_turns_while_waiting_for_a_busy_worker() {
        let (a_tx, a_rx) = crossbeam_channel::bounded(4);
        let (out_tx, out_rx) = crossbeam_channel::bounded(0); // nobody takes a batch
        let (_stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let progress = Progress::new();
        let watched = progress.clone();
        a_tx.send(Frame::uniform(0, 0, [1, 1], 0.0)).unwrap();
        let worker = std::thread::spawn(move || run(joined(vec![a_rx]), 1, Duration::ZERO, out_tx, stop_rx, progress));
        std::thread::sleep(Duration::from_millis(1600));
        assert!(watched.since() < Duration::from_millis(1000), "stale for {:?}", watched.since());
        drop(out_rx);
        worker.join().unwrap();
        drop(a_tx);
    }
}
