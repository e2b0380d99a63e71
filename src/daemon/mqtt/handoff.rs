//! Which outbox entries the MQTT client holds and the broker has not acknowledged yet.
//!
//! An alert leaves the outbox only on its PUBACK. The client tells which packet id a
//! publish got only through its event stream (`Outgoing::Publish(pkid)`, in the order the
//! requests were handed to it) and the PUBACK names that id. This module keeps that
//! bookkeeping, pure and without threads:
//!
//! - every QoS-1 publish handed to the client is recorded in hand-off order, tagged with
//!   its outbox sequence number (or untagged: retained state, replies);
//! - `Outgoing::Publish(pkid)` gives the oldest untold hand-off its packet id; a packet id
//!   already awaiting its PUBACK is the client re-sending it after a reconnect, not a new
//!   hand-off;
//! - a PUBACK releases the packet id and names the outbox entry that may be deleted;
//! - when the connection fails, the client moves its in-flight publishes and the requests
//!   still queued into a pending list ([`Handoff::connection_lost`] is told how many fresh
//!   QoS-1 publishes that list holds). If the broker then has no session for us, the client
//!   discards that list: those entries were never delivered and go back to the outbox's
//!   unsent ones ([`Handoff::reconnected`]). Hand-offs made after the failure are still in
//!   the client's queue and stay recorded.
//!
//! Hand-written: no MQTT crate reports per-message acknowledgements for the synchronous
//! client, and the rules above are the whole of it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The outbox sequence number of a hand-off, `None` for messages that are not in the outbox.
pub type Tag = Option<u64>;

#[derive(Default)]
pub struct Handoff {
    /// Hand-offs whose packet id the client has not told yet, oldest first.
    untold: VecDeque<Tag>,
    /// Publishes on the wire by packet id, with the time they were sent.
    awaiting: HashMap<u16, (Tag, Instant)>,
    /// How many of the oldest `untold` hand-offs sat in the client's pending list at the
    /// last connection failure.
    in_pending: usize,
}

impl Handoff {
    /// A QoS-1 publish was handed to the client (call under the same lock as the hand-off,
    /// so that this order is the client's queue order).
    pub fn handed(&mut self, tag: Tag) {
        self.untold.push_back(tag);
    }

    /// The client wrote a publish with `pkid` (0 for QoS 0, which is not tracked).
    pub fn sent(&mut self, pkid: u16, now: Instant) {
        if pkid == 0 {
            return;
        }
        if let Some(waiting) = self.awaiting.get_mut(&pkid) {
            // A re-send of a publish already on the wire (session resumed).
            waiting.1 = now;
            return;
        }
        if let Some(tag) = self.untold.pop_front() {
            self.in_pending = self.in_pending.saturating_sub(1);
            self.awaiting.insert(pkid, (tag, now));
        }
    }

    /// The broker acknowledged `pkid`: the outbox entry it carried, if any, is delivered.
    pub fn acked(&mut self, pkid: u16) -> Tag {
        self.awaiting.remove(&pkid).and_then(|(tag, _)| tag)
    }

    /// The connection failed; the client's pending list now holds `fresh_in_pending` QoS-1
    /// publishes that had not been written yet (the oldest untold hand-offs).
    pub fn connection_lost(&mut self, fresh_in_pending: usize) {
        self.in_pending = fresh_in_pending.min(self.untold.len());
    }

    /// Connected again (at `now`). Without a session the client dropped its pending list:
    /// the outbox entries it held are returned, to be handed again. With a session it
    /// re-sends them, and their wait for a PUBACK starts again.
    pub fn reconnected(&mut self, session_present: bool, now: Instant) -> Vec<u64> {
        if session_present {
            self.awaiting.values_mut().for_each(|(_, sent)| *sent = now);
            return Vec::new();
        }
        let mut lost: Vec<u64> = self.awaiting.drain().filter_map(|(_, (tag, _))| tag).collect();
        lost.extend(self.untold.drain(..self.in_pending).flatten());
        self.in_pending = 0;
        lost.sort_unstable();
        lost
    }

    /// How long the oldest publish on the wire has waited for its PUBACK.
    pub fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        self.awaiting.values().map(|(_, sent)| now.saturating_duration_since(*sent)).max()
    }

    /// Hand-offs not yet acknowledged (told or not).
    pub fn outstanding(&self) -> usize {
        self.untold.len() + self.awaiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_delivered_by_its_own_puback_whatever_else_is_on_the_wire() {
        let mut h = Handoff::default();
        let now = Instant::now();
        h.handed(Some(7));
        h.handed(None); // a retained state message
        h.handed(Some(8));
        h.sent(0, now); // a QoS-0 snapshot in between: not tracked
        h.sent(1, now);
        h.sent(2, now);
        h.sent(3, now);
        assert_eq!(h.acked(2), None);
        assert_eq!(h.acked(3), Some(8));
        assert_eq!(h.acked(3), None, "a second PUBACK for the same id names nothing");
        assert_eq!(h.acked(1), Some(7));
        assert_eq!(h.outstanding(), 0);
    }

    #[test]
    fn without_a_session_what_the_client_held_goes_back_and_later_hand_offs_stay() {
        let mut h = Handoff::default();
        let now = Instant::now();
        for seq in 1..=4 {
            h.handed(Some(seq));
        }
        h.sent(1, now); // seq 1 on the wire
        h.connection_lost(3); // seqs 2, 3 and 4 were queued: the failure moved them to pending
        h.handed(Some(5)); // handed after the failure: still in the client's queue
        // The broker has no session: the client dropped seq 1 (in flight) and its pending list.
        assert_eq!(h.reconnected(false, now), vec![1, 2, 3, 4]);
        h.sent(1, now);
        assert_eq!(h.acked(1), Some(5), "the first publish written after the reconnect is seq 5");
        assert_eq!(h.outstanding(), 0);
    }

    #[test]
    fn with_a_session_re_sends_keep_their_ids_and_fresh_ones_follow() {
        let mut h = Handoff::default();
        let t0 = Instant::now();
        h.handed(Some(1));
        h.handed(Some(2));
        h.sent(1, t0);
        h.connection_lost(1);
        let t1 = t0 + Duration::from_secs(5);
        assert!(h.reconnected(true, t1).is_empty());
        assert_eq!(h.oldest_wait(t1), Some(Duration::ZERO), "the wait starts again on a resumed session");
        h.sent(1, t1); // the re-send of seq 1
        h.sent(2, t1); // seq 2, fresh from the pending list
        assert_eq!(h.oldest_wait(t1), Some(Duration::ZERO));
        assert_eq!(h.acked(2), Some(2));
        assert_eq!(h.acked(1), Some(1));
    }
}
