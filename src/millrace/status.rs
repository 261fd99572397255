//! `status` without paying for Python each time: one snapshot per workspace, refreshed
//! when the runtime's files change (inotify via `notify`) and at a bounded age
//! otherwise (a daemon that dies changes no file). Concurrent requests share one
//! refresh. A snapshot is never older than the last change this process has observed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use serde_json::{Map, Value};

use crate::millrace::command::{Millrace, RuntimeError};
use crate::millrace::records::agents_dir;

type Snapshot = Result<Arc<Map<String, Value>>, RuntimeError>;

struct Slot {
    generation: u64,
    at: Instant,
    value: Snapshot,
}

struct Entry {
    generation: Arc<AtomicU64>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    watching_agents: Mutex<bool>,
    slot: tokio::sync::Mutex<Option<Slot>>,
}

/// See the module docs.
pub struct StatusCache {
    max_age: Duration,
    entries: Mutex<HashMap<PathBuf, Arc<Entry>>>,
    refreshes: AtomicU64,
}

impl std::fmt::Debug for StatusCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusCache")
            .field("max_age", &self.max_age)
            .field("refreshes", &self.refreshes.load(Ordering::Relaxed))
            .finish()
    }
}

impl StatusCache {
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            entries: Mutex::new(HashMap::new()),
            refreshes: AtomicU64::new(0),
        }
    }

    /// How many times the runtime was actually asked.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// The workspace's status: the snapshot when still current, else a fresh one.
    pub async fn status(
        &self,
        millrace: &Millrace,
        workspace: &Path,
        cwd: &Path,
    ) -> Result<Map<String, Value>, RuntimeError> {
        let entry = self.entry(workspace);
        self.ensure_watch(&entry, workspace);
        let mut slot = entry.slot.lock().await;
        let current = entry.generation.load(Ordering::SeqCst);
        if let Some(cached) = slot.as_ref()
            && cached.generation == current
            && cached.at.elapsed() < self.max_age
        {
            return cached
                .value
                .as_ref()
                .map(|m| (**m).clone())
                .map_err(Clone::clone);
        }
        // Read the generation before asking, so a change during the call makes the
        // next request ask again.
        let value = millrace.status(workspace, cwd).await.map(Arc::new);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let out = value.as_ref().map(|m| (**m).clone()).map_err(Clone::clone);
        *slot = Some(Slot {
            generation: current,
            at: Instant::now(),
            value,
        });
        out
    }

    /// Marks a workspace's snapshot stale (for changes this process makes itself).
    pub fn invalidate(&self, workspace: &Path) {
        self.entry(workspace)
            .generation
            .fetch_add(1, Ordering::SeqCst);
    }

    fn entry(&self, workspace: &Path) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .entry(workspace.to_path_buf())
            .or_insert_with(|| {
                let generation = Arc::new(AtomicU64::new(0));
                let bump = generation.clone();
                let agents = agents_dir(workspace);
                // Only the runtime's own files matter; edits elsewhere in the workspace (the
                // project itself, our intake documents) leave the snapshot current.
                let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    if let Ok(event) = event
                        && !matches!(event.kind, notify::EventKind::Access(_))
                        && event.paths.iter().any(|p| p.starts_with(&agents))
                    {
                        bump.fetch_add(1, Ordering::SeqCst);
                    }
                });
                let watcher = match watcher {
                    Ok(mut w) => {
                        // The root itself, to notice `millrace init` creating the agents dir.
                        let _ = w.watch(workspace, RecursiveMode::NonRecursive);
                        Some(w)
                    }
                    Err(err) => {
                        tracing::warn!(%err, "no file notifications; status snapshots expire by age only");
                        None
                    }
                };
                Arc::new(Entry {
                    generation,
                    watcher: Mutex::new(watcher),
                    watching_agents: Mutex::new(false),
                    slot: tokio::sync::Mutex::new(None),
                })
            })
            .clone()
    }

    fn ensure_watch(&self, entry: &Entry, workspace: &Path) {
        let mut watching = entry
            .watching_agents
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *watching {
            return;
        }
        let agents = agents_dir(workspace);
        if !agents.is_dir() {
            return;
        }
        if let Some(watcher) = entry
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            match watcher.watch(&agents, RecursiveMode::Recursive) {
                Ok(()) => {
                    *watching = true;
                    entry.generation.fetch_add(1, Ordering::SeqCst);
                }
                Err(err) => {
                    tracing::warn!(%err, dir = %agents.display(), "cannot watch runtime files")
                }
            }
        }
    }
}
