//! The registry of what a shared bus serves: one document per owner of a workspace in the
//! KV bucket `MILLRACER_WORKSPACES` (key `<workspace id>.<worker id>`), put by its worker
//! every 10 s and deleted when it stops, so an entry present is a live owner and one whose
//! worker died is gone within 30 s. Workers, the bridge and adapters read the same
//! document; [`Directory`] is a worker's live copy of the whole bucket, which
//! `list_workspaces` on `req.any` answers from.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// One owner of one workspace, as stored in the registry bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    pub workspace_id: String,
    pub display_name: Option<String>,
    /// SHA-256 of `<host> NUL <canonical root path>`, first 32 hex digits: the workspace's
    /// identity and its path key.
    pub fingerprint: String,
    /// The owner's host id.
    pub host: String,
    /// The canonical root path on that host.
    pub root_path: String,
    /// The worker's service id (`$SRV.PING.millracer.<id>`).
    pub worker_id: String,
    pub worker_name: String,
    pub version: String,
    /// When the worker last refreshed the entry (its clock).
    pub at: String,
}

/// An owner whose last refresh is older than this is shown `live: false` (two refreshes
/// missed) until the bucket drops its entry.
pub const LIVE_WITHIN: Duration = Duration::from_secs(20);
/// Entries older than this are gone (the bucket's `max_age`).
pub const EXPIRES_AFTER: Duration = Duration::from_secs(30);

/// One owner as a reader sees it.
#[derive(Debug, Clone)]
pub struct Owner {
    pub entry: RegistryEntry,
    /// Since the entry was last stored (the server's timestamp).
    pub age: Duration,
    pub live: bool,
}

/// A live copy of the registry bucket, kept by a watch.
#[derive(Debug, Default)]
pub struct Directory {
    entries: Mutex<BTreeMap<String, (RegistryEntry, SystemTime)>>,
}

impl Directory {
    /// Records a put of `key`, stored at `at`.
    pub fn put(&self, key: &str, entry: RegistryEntry, at: SystemTime) {
        self.lock().insert(key.to_string(), (entry, at));
    }

    /// Records a delete (or purge) of `key`.
    pub fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Every owner not yet expired, by key order (workspace id, then worker id).
    pub fn owners(&self) -> Vec<Owner> {
        let now = SystemTime::now();
        let mut entries = self.lock();
        entries.retain(|_, (_, at)| age(now, *at) <= EXPIRES_AFTER);
        entries
            .values()
            .map(|(entry, at)| {
                let age = age(now, *at);
                Owner {
                    entry: entry.clone(),
                    age,
                    live: age <= LIVE_WITHIN,
                }
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (RegistryEntry, SystemTime)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn age(now: SystemTime, at: SystemTime) -> Duration {
    now.duration_since(at).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ws: &str, worker: &str) -> RegistryEntry {
        RegistryEntry {
            workspace_id: ws.into(),
            display_name: None,
            fingerprint: "f".repeat(32),
            host: "h".into(),
            root_path: "/x".into(),
            worker_id: worker.into(),
            worker_name: "w".into(),
            version: "0".into(),
            at: String::new(),
        }
    }

    #[test]
    fn stale_owners_are_not_live_and_expired_ones_are_gone() {
        let d = Directory::default();
        let now = SystemTime::now();
        d.put("a.1", entry("a", "1"), now);
        d.put("a.2", entry("a", "2"), now - Duration::from_secs(25));
        d.put("b.3", entry("b", "3"), now - Duration::from_secs(40));
        let owners = d.owners();
        assert_eq!(owners.len(), 2);
        assert!(owners[0].live);
        assert!(!owners[1].live);
        d.remove("a.1");
        assert_eq!(d.owners().len(), 1);
    }
}
