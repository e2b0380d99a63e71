//! The supervisor owns every thread of the daemon: it starts them, observes each exit the
//! moment it happens, judges the stages' progress against their bounds, decides whether
//! systemd's watchdog may be fed, and stops the threads in order under a deadline.
//!
//! Threads have roles, and a role says which exits are normal:
//! - a **source** (a capture thread) may end: a finite replay, a disabled camera. A source
//!   that panics is a failure; when every source has ended the pipeline drains and the
//!   daemon exits 0.
//! - a **pipe** stage (batcher, worker, publisher, recorder) ends only when its input
//!   closes; one that ends while a source still runs died (a panic, or a neighbour did).
//!   Each pipe stage beats a [`Progress`]; one that goes longer than its bound without is
//!   stuck: the watchdog is no longer fed and the daemon stops with exit 70.
//! - a **link** (the MQTT connection) ends only when told to.
//!
//! Every thread holds an exit notice whose drop (normal return or unwinding panic) tells the
//! supervisor, so exits are observed through a channel, never by polling.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::stats::Progress;

/// What a thread is to the pipeline; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Pipe,
    Link,
}

/// A failure the supervisor saw; the daemon stops and exits 70.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub stage: String,
    pub what: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.stage, self.what)
    }
}

/// What an exit or a check means for the daemon.
#[derive(Debug, PartialEq, Eq)]
pub enum Health {
    Running,
    /// Every source has ended normally: drain and stop.
    SourcesEnded,
    Failed(Failure),
}

struct Thread {
    name: String,
    role: Role,
    /// `None` once joined.
    handle: Option<JoinHandle<()>>,
    panicked: bool,
    /// The stage's progress and the longest it may go without.
    watch: Option<(Progress, Duration)>,
}

/// How long a pipe stage that ended waits for the sources whose end closed its input.
const SOURCE_GRACE: Duration = Duration::from_millis(500);

/// Sends the thread's index when dropped: at return and while unwinding from a panic.
struct ExitNotice(Sender<usize>, usize);

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

pub struct Supervisor {
    threads: Vec<Thread>,
    exits_tx: Sender<usize>,
    exits: Receiver<usize>,
}

impl Default for Supervisor {
    fn default() -> Self {
        let (exits_tx, exits) = unbounded();
        Self { threads: Vec::new(), exits_tx, exits }
    }
}

impl Supervisor {
    /// Starts `body` on a thread named `name`; `watch` bounds a pipe stage's progress.
    pub fn spawn(
        &mut self,
        name: &str,
        role: Role,
        watch: Option<(Progress, Duration)>,
        body: impl FnOnce() + Send + 'static,
    ) -> anyhow::Result<()> {
        let notice = ExitNotice(self.exits_tx.clone(), self.threads.len());
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _notice = notice;
                body()
            })
            .with_context(|| format!("cannot start thread {name}"))?;
        self.threads.push(Thread { name: name.into(), role, handle: Some(handle), panicked: false, watch });
        Ok(())
    }

    /// Exit notices: select on this, then hand what arrives to [`Supervisor::exited`].
    pub fn exits(&self) -> &Receiver<usize> {
        &self.exits
    }

    /// Joins the thread that sent exit notice `index` and says what its end means.
    pub fn exited(&mut self, index: usize) -> Health {
        self.join(index);
        let thread = &self.threads[index];
        if thread.panicked {
            return self.failed(index, "panicked");
        }
        match thread.role {
            Role::Source if self.running(Role::Source) == 0 => Health::SourcesEnded,
            Role::Source => Health::Running,
            Role::Pipe if self.running(Role::Source) > 0 => {
                // Its input may have closed because the last sources are returning right
                // now (a source drops its queue just before its exit notice goes out).
                self.settle(SOURCE_GRACE);
                match self.running(Role::Source) {
                    0 => Health::SourcesEnded,
                    _ => self.failed(index, "stopped while sources still run"),
                }
            }
            Role::Pipe => Health::Running,
            Role::Link => self.failed(index, "stopped"),
        }
    }

    /// Joins the threads whose exit notices arrive within `grace`, while sources run.
    fn settle(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.running(Role::Source) > 0 {
            match self.exits.recv_deadline(deadline) {
                Ok(index) => self.join(index),
                Err(_) => return,
            }
        }
    }

    /// A running pipe stage that has gone longer than its bound without progress.
    pub fn stuck(&self) -> Option<Failure> {
        self.threads.iter().filter(|t| t.handle.is_some()).find_map(|t| {
            let (progress, bound) = t.watch.as_ref()?;
            let since = progress.stuck_past(*bound)?;
            Some(Failure {
                stage: t.name.clone(),
                what: format!("no progress for {:.1} s (bound {:.1} s)", since.as_secs_f64(), bound.as_secs_f64()),
            })
        })
    }

    /// Waits until every thread of `role` has exited or `deadline` passes; returns the
    /// names of those that panicked and of those still running.
    pub fn wait_for(&mut self, role: Role, deadline: Instant) -> (Vec<String>, Vec<String>) {
        while self.running(role) > 0 {
            match self.exits.recv_deadline(deadline) {
                Ok(index) => self.join(index),
                Err(_) => break,
            }
        }
        let of_role = || self.threads.iter().filter(move |t| t.role == role);
        let panicked = of_role().filter(|t| t.panicked).map(|t| t.name.clone()).collect();
        let running = of_role().filter(|t| t.handle.is_some()).map(|t| t.name.clone()).collect();
        (panicked, running)
    }

    fn running(&self, role: Role) -> usize {
        self.threads.iter().filter(|t| t.role == role && t.handle.is_some()).count()
    }

    fn join(&mut self, index: usize) {
        let thread = &mut self.threads[index];
        if let Some(handle) = thread.handle.take() {
            // The notice is sent while the thread unwinds; the join returns right after.
            thread.panicked = handle.join().is_err();
        }
    }

    fn failed(&self, index: usize, what: &str) -> Health {
        Health::Failed(Failure { stage: self.threads[index].name.clone(), what: what.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(s: &mut Supervisor) -> Health {
        let index = s.exits().recv_timeout(Duration::from_secs(5)).expect("an exit");
        s.exited(index)
    }

    #[test]
    fn sources_may_end_and_then_the_pipeline_drains() {
        let mut s = Supervisor::default();
        let (release_pipe, pipe_held) = crossbeam_channel::bounded::<()>(0);
        let (release_b, b_held) = crossbeam_channel::bounded::<()>(0);
        s.spawn("pipe", Role::Pipe, None, move || {
            let _ = pipe_held.recv();
        })
        .unwrap();
        s.spawn("a", Role::Source, None, || {}).unwrap();
        s.spawn("b", Role::Source, None, move || {
            let _ = b_held.recv();
        })
        .unwrap();
        assert_eq!(next(&mut s), Health::Running, "one source left");
        drop(release_b);
        assert_eq!(next(&mut s), Health::SourcesEnded);
        drop(release_pipe);
        assert_eq!(next(&mut s), Health::Running, "a pipe stage may end once the sources have");
        assert_eq!(s.wait_for(Role::Pipe, Instant::now()), (vec![], vec![]));
    }

    #[test]
    fn a_pipe_stage_whose_sources_are_just_ending_is_not_a_failure() {
        let mut s = Supervisor::default();
        let (release, held) = crossbeam_channel::bounded::<()>(0);
        s.spawn("camera", Role::Source, None, move || {
            let _ = held.recv();
            std::thread::sleep(Duration::from_millis(100)); // its queue is closed; it returns late
        })
        .unwrap();
        s.spawn("batcher", Role::Pipe, None, move || drop(release)).unwrap();
        assert_eq!(next(&mut s), Health::SourcesEnded);
    }

    #[test]
    fn a_panic_or_a_pipe_stage_that_ends_early_is_a_failure() {
        let mut s = Supervisor::default();
        let (_hold, held) = crossbeam_channel::bounded::<()>(0);
        s.spawn("camera", Role::Source, None, move || {
            let _ = held.recv();
        })
        .unwrap();
        s.spawn("publisher", Role::Pipe, None, || {}).unwrap();
        let Health::Failed(failure) = next(&mut s) else { panic!("expected a failure") };
        assert_eq!(failure.stage, "publisher");
        s.spawn("other", Role::Source, None, || panic!("injected")).unwrap();
        let Health::Failed(failure) = next(&mut s) else { panic!("expected a failure") };
        assert_eq!((failure.stage.as_str(), failure.what.as_str()), ("other", "panicked"));
    }

    #[test]
    fn a_stage_without_progress_past_its_bound_is_stuck_and_wait_for_reports_it() {
        let mut s = Supervisor::default();
        let progress = Progress::new();
        let (_hold, held) = crossbeam_channel::bounded::<()>(0);
        s.spawn("worker", Role::Pipe, Some((progress.clone(), Duration::from_millis(100))), move || {
            let _ = held.recv();
        })
        .unwrap();
        assert_eq!(s.stuck(), None);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(s.stuck().map(|f| f.stage), Some("worker".into()));
        progress.beat();
        assert_eq!(s.stuck(), None, "a beat clears it");
        let (panicked, running) = s.wait_for(Role::Pipe, Instant::now() + Duration::from_millis(50));
        assert_eq!((panicked, running), (vec![], vec!["worker".to_string()]), "a missed deadline names the stage");
    }
}
