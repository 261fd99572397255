//! Requests keyed by request_id: a request_id seen again is not run again. A caller that
//! repeats a running request waits for its result; one that repeats a finished request
//! gets the stored result at once.

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
    /// Finished recently: answer this reply address with this result.
    Finished(Arc<OpsResult>, Option<ReplyTo>),
}

#[derive(Debug)]
enum Entry {
    Running { waiters: Vec<ReplyTo> },
    Done { result: Arc<OpsResult> },
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
            Some(Entry::Done { result }) => Admission::Finished(result.clone(), reply),
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

    /// Stores a result and returns every reply address waiting for it.
    pub fn finish(&mut self, request_id: &str, result: Arc<OpsResult>) -> Vec<ReplyTo> {
        let waiters = match self
            .entries
            .insert(request_id.to_string(), Entry::Done { result })
        {
            Some(Entry::Running { waiters }) => waiters,
            _ => Vec::new(),
        };
        self.finished
            .push_back((request_id.to_string(), Instant::now()));
        self.evict(Instant::now());
        waiters
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

    fn result() -> Arc<OpsResult> {
        Arc::new(OpsResult::failure(
            "r",
            "a",
            WorkspaceRef::default(),
            "t".into(),
            Record::error("x", "y"),
        ))
    }

    #[test]
    fn duplicates_attach_then_replay() {
        let mut ledger = Ledger::new(Duration::from_secs(60), 10);
        assert!(matches!(
            ledger.admit("r", Some(ReplyTo::new("a"))),
            Admission::New
        ));
        assert!(matches!(
            ledger.admit("r", Some(ReplyTo::new("b"))),
            Admission::Attached
        ));
        assert_eq!(
            ledger
                .finish("r", result())
                .into_iter()
                .filter_map(|r| r.into_inner::<&str>())
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
        assert!(matches!(
            ledger.admit("r", Some(ReplyTo::new("c"))),
            Admission::Finished(_, Some(_))
        ));
    }

    #[test]
    fn capacity_bounds_memory() {
        let mut ledger = Ledger::new(Duration::from_secs(60), 2);
        for id in ["a", "b", "c"] {
            ledger.admit(id, None);
            ledger.finish(id, result());
        }
        assert!(matches!(ledger.admit("a", None), Admission::New));
        assert!(matches!(
            ledger.admit("c", None),
            Admission::Finished(_, None)
        ));
    }
}
