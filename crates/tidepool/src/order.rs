//! The order in which a shared connection's statements reach the server.
//!
//! Statements pipelined on one connection are answered in the order their requests were sent,
//! so the oldest statement not yet answered is the one the server runs. [`Order`] records each
//! request at the moment it is sent (the sender holds the connection's `Order` lock while
//! tokio-postgres enqueues it, so the record is the wire order), and answers: that is what tells
//! a statement whether its turn has come, and when an abandoned statement (its caller went away)
//! is the one running, so that a cancel request stops it rather than a neighbour.
//!
//! Fixed size, no allocation: a shared connection has at most a few dozen requests in flight.

/// One recorded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// Its caller waits for the answer.
    Live,
    /// Its caller went away before the answer: it must not run for nobody.
    Abandoned,
    /// Abandoned, and a cancel request was sent while it was the oldest.
    Cancelled,
}

/// Most requests recorded at once; more than a connection ever has in flight (pipelining stops
/// at 16). A request past it is not recorded, and never counts as started.
const CAPACITY: usize = 32;

/// The requests of one connection still unanswered (or abandoned), oldest first.
pub(crate) struct Order {
    entries: [(u64, Entry); CAPACITY],
    len: usize,
    next: u64,
}

impl Default for Order {
    fn default() -> Self {
        Order {
            entries: [(0, Entry::Live); CAPACITY],
            len: 0,
            next: 0,
        }
    }
}

impl Order {
    /// A request is sent now: its sequence number.
    pub(crate) fn sent(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        if self.len < CAPACITY {
            self.entries[self.len] = (seq, Entry::Live);
            self.len += 1;
        }
        seq
    }

    fn position(&self, seq: u64) -> Option<usize> {
        self.entries[..self.len].iter().position(|(s, _)| *s == seq)
    }

    fn remove(&mut self, i: usize) {
        self.entries.copy_within(i + 1..self.len, i);
        self.len -= 1;
    }

    /// Request `seq` was answered, so every request sent before it was too: abandoned ones
    /// ahead of it are over. True when the oldest request left is an abandoned one, which the
    /// server runs now: cancel it (it is marked as cancelled).
    pub(crate) fn answered(&mut self, seq: u64) -> bool {
        if let Some(mut i) = self.position(seq) {
            self.remove(i);
            // Live requests ahead are answered too; their callers just have not looked yet.
            let mut j = 0;
            while j < i {
                if self.entries[j].1 == Entry::Live {
                    j += 1;
                } else {
                    self.remove(j);
                    i -= 1;
                }
            }
        }
        self.cancel_oldest()
    }

    /// Request `seq`'s caller went away before its answer. True when it is the oldest request:
    /// the server runs it now, so cancel it (it is marked as cancelled).
    pub(crate) fn abandoned(&mut self, seq: u64) -> bool {
        match self.position(seq) {
            Some(i) if self.entries[i].1 == Entry::Live => self.entries[i].1 = Entry::Abandoned,
            _ => return false,
        }
        self.cancel_oldest()
    }

    /// Marks the oldest request as cancelled when it is abandoned; whether it was.
    fn cancel_oldest(&mut self) -> bool {
        match self.entries[..self.len].first_mut() {
            Some(entry) if entry.1 == Entry::Abandoned => {
                entry.1 = Entry::Cancelled;
                true
            }
            _ => false,
        }
    }

    /// Whether request `seq` is the oldest unanswered one: the server has started it. A
    /// cancelled request ahead still counts (the cancel may not have arrived), so a statement
    /// behind one never counts as started before an answer says so.
    pub(crate) fn started(&self, seq: u64) -> bool {
        self.entries[..self.len]
            .first()
            .is_some_and(|(s, _)| *s == seq)
    }

    /// Forgets everything (the connection was drained: nothing is in flight any more).
    pub(crate) fn clear(&mut self) {
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(n: usize) -> (Order, Vec<u64>) {
        let mut o = Order::default();
        let seqs = (0..n).map(|_| o.sent()).collect();
        (o, seqs)
    }

    #[test]
    fn the_oldest_unanswered_request_has_started() {
        let (mut o, s) = order(3);
        assert!(o.started(s[0]) && !o.started(s[1]) && !o.started(s[2]));
        assert!(!o.answered(s[0]));
        assert!(o.started(s[1]));
        // Answered out of observation order: an earlier live one was answered too.
        assert!(!o.answered(s[2]));
        assert!(o.started(s[1]));
    }

    #[test]
    fn an_abandoned_request_is_cancelled_once_it_is_the_oldest() {
        let (mut o, s) = order(3);
        assert!(!o.abandoned(s[1]), "not running yet: nothing to cancel");
        assert!(o.answered(s[0]), "now it runs: cancel it");
        assert!(!o.started(s[2]), "the cancel may not have arrived yet");
        assert!(!o.answered(s[2]));
        assert_eq!(o.len, 0);
        let (mut o, s) = order(2);
        assert!(o.abandoned(s[0]), "running now: cancel at once");
        assert!(!o.abandoned(s[0]), "cancelled only once");
        assert!(!o.started(s[1]));
    }

    /// X (abandoned, cancelled), B, C (abandoned), D: B's answer ends X but not C, which is
    /// the oldest now and gets its cancel; D has not started.
    #[test]
    fn an_answer_ends_only_what_was_sent_before_it() {
        let (mut o, s) = order(4);
        let (x, b, c, d) = (s[0], s[1], s[2], s[3]);
        assert!(o.abandoned(x));
        assert!(!o.abandoned(c));
        assert!(o.answered(b), "C is the oldest now and must be cancelled");
        assert!(!o.started(d));
        assert!(!o.answered(d));
        assert_eq!(o.len, 0);
    }

    #[test]
    fn requests_past_capacity_are_never_started() {
        let (mut o, s) = order(CAPACITY + 1);
        assert!(!o.started(s[CAPACITY]));
        o.clear();
        assert!(!o.started(s[0]));
        let next = o.sent();
        assert!(o.started(next));
    }
}
