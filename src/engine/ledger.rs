//! Requests keyed by request_id: a request_id seen again is not run again. A caller that
//! repeats a running request waits for its result; one that repeats a finished request
//! that changed something gets the stored result at once.
//!
//! Only what idempotency needs is kept: running requests (any action) and finished
//! mutating ones. A finished read-only result is forgotten at once (answering the read
//! again is harmless and current), so a stream of status calls leaves nothing behind.
//! Kept results are their compact JSON bytes, not value trees (a runtime status is ~50
//! keys: a tree costs several times its text). The durable results bucket stays the
//! long memory of durable requests.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::contract::OpsResult;
use crate::engine::frames::ReplyTo;

/// What to do with an arriving request_id.
#[derive(Debug)]
pub enum Admission {
    /// Not seen: run it.
    New,
    /// Running: the reply address was added to its waiters.
    Attached,
    /// Finished recently (and it changed something): answer this reply address with this
    /// result.
    Finished(Arc<OpsResult>, Option<ReplyTo>),
}

#[derive(Debug)]
enum Entry {
    Running {
        waiters: Vec<ReplyTo>,
    },
    /// The result's compact JSON (`serde_json`), parsed again only when replayed.
    Done {
        result: bytes::Bytes,
    },
}

/// In-memory ledger of running and recently finished requests, bounded by age and count.
#[derive(Debug)]
pub struct Ledger {
    entries: HashMap<String, Entry>,
    finished: VecDeque<(String, Instant)>,
    ttl: Duration,
    capacity: usize,
}

impl Ledger {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            finished: VecDeque::new(),
            ttl,
            capacity: capacity.max(1),
        }
    }

    /// Admits a request_id; `reply` is where its caller waits.
    pub fn admit(&mut self, request_id: &str, reply: Option<ReplyTo>) -> Admission {
        self.evict(Instant::now());
        match self.entries.get_mut(request_id) {
            Some(Entry::Running { waiters }) => {
                waiters.extend(reply);
                Admission::Attached
            }
            Some(Entry::Done { result }) => match serde_json::from_slice::<OpsResult>(result) {
                Ok(result) => Admission::Finished(Arc::new(result), reply),
                // Cannot happen for bytes we wrote; running it again is the safe answer.
                Err(err) => {
                    tracing::warn!(%err, request_id, "stored result unreadable; running again");
                    self.entries.insert(
                        request_id.to_string(),
                        Entry::Running {
                            waiters: reply.into_iter().collect(),
                        },
                    );
                    Admission::New
                }
            },
            None => {
                self.entries.insert(
                    request_id.to_string(),
                    Entry::Running {
                        waiters: reply.into_iter().collect(),
                    },
                );
                Admission::New
            }
        }
    }

    /// Ends a request and returns every reply address waiting for it. `keep`: remember
    /// the result for a repeated request_id (mutating actions); otherwise the request_id
    /// is forgotten now and a repeat runs again.
    pub fn finish(&mut self, request_id: &str, result: &OpsResult, keep: bool) -> Vec<ReplyTo> {
        let stored = if keep {
            match serde_json::to_vec(result) {
                Ok(bytes) => Some(bytes::Bytes::from(bytes)),
                Err(err) => {
                    tracing::warn!(%err, request_id, "result not storable; a repeat runs again");
                    None
                }
            }
        } else {
            None
        };
        let previous = match stored {
            Some(result) => {
                self.finished
                    .push_back((request_id.to_string(), Instant::now()));
                self.entries
                    .insert(request_id.to_string(), Entry::Done { result })
            }
            None => self.entries.remove(request_id),
        };
        self.evict(Instant::now());
        match previous {
            Some(Entry::Running { waiters }) => waiters,
            _ => Vec::new(),
        }
    }

    /// How many finished results are remembered.
    pub fn remembered(&self) -> usize {
        self.entries.len() - self.running()
    }

    /// How many requests are running.
    pub fn running(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e, Entry::Running { .. }))
            .count()
    }

    /// The request_ids still running, sorted.
    pub fn running_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Running { .. }))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    fn evict(&mut self, now: Instant) {
        while let Some((id, at)) = self.finished.front() {
            let expired = now.duration_since(*at) > self.ttl;
            if !expired && self.finished.len() <= self.capacity {
                break;
            }
            if matches!(self.entries.get(id), Some(Entry::Done { .. })) {
                self.entries.remove(id);
            }
            self.finished.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{OpsResult, Record, WorkspaceRef};

    fn result() -> OpsResult {
        OpsResult::failure(
            "r",
            "a",
            WorkspaceRef::default(),
            "t".into(),
            Record::error(crate::contract::ErrorCode::ServiceError, "y"),
        )
    }

    fn core(subject: &str) -> ReplyTo {
        ReplyTo::Core(crate::engine::frames::CoreReply {
            subject: Some(subject.to_string()),
            endpoint: 0,
            received: std::time::Instant::now(),
            scope: None,
        })
    }

    #[test]
    fn duplicates_attach_then_replay() {
        let finished = result();
        let mut ledger = Ledger::new(Duration::from_secs(60), 10);
        assert!(matches!(ledger.admit("r", Some(core("a"))), Admission::New));
        assert!(matches!(
            ledger.admit("r", Some(core("b"))),
            Admission::Attached
        ));
        assert_eq!(
            ledger
                .finish("r", &finished, true)
                .into_iter()
                .filter_map(|r| match r {
                    ReplyTo::Core(c) => c.subject,
                    _ => None,
                })
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        match ledger.admit("r", Some(core("c"))) {
            Admission::Finished(stored, Some(_)) => assert_eq!(*stored, finished),
            other => panic!("expected the stored result, got {other:?}"),
        }
    }

    #[test]
    fn read_only_results_are_not_kept() {
        let mut ledger = Ledger::new(Duration::from_secs(60), 10);
        assert!(matches!(ledger.admit("r", None), Admission::New));
        assert!(matches!(
            ledger.admit("r", Some(core("b"))),
            Admission::Attached
        ));
        assert_eq!(ledger.finish("r", &result(), false).len(), 1);
        assert_eq!(ledger.remembered(), 0);
        assert_eq!(ledger.running(), 0);
        assert!(matches!(ledger.admit("r", None), Admission::New));
    }

    #[test]
    fn capacity_bounds_memory() {
        let mut ledger = Ledger::new(Duration::from_secs(60), 2);
        for id in ["a", "b", "c"] {
            ledger.admit(id, None);
            ledger.finish(id, &result(), true);
        }
        assert!(matches!(ledger.admit("a", None), Admission::New));
        assert!(matches!(
            ledger.admit("c", None),
            Admission::Finished(_, None)
        ));
    }
}
