//! `status` without paying for Python on a request's path: one snapshot per workspace,
//! kept current in the background.
//!
//! The runtime's status (`millrace status --format json`, 0.21.1) is computed from the
//! files under `millrace-agents/` plus one fact that is not a file: whether the pid in
//! the ownership lock (`millrace-agents/state/runtime_daemon.lock.json`) is alive. So
//! the snapshot is refreshed the moment either changes:
//! - file changes under `millrace-agents/` (inotify via `notify`);
//! - the lock's daemon ending (a pidfd, see `exit_watch`), however it ends (SIGKILL
//!   included) and whoever started it (this worker or anyone else).
//!
//! Refreshes run in a background task per workspace, one at a time; a change seen during
//! a refresh makes it run once more. Requests never wait for a refresh, except the very
//! first request of a workspace (there is nothing to serve yet): a request during a
//! refresh gets the previous snapshot. A safety-net refresh runs when nothing changed for
//! `safety_net` (minutes), also in the background.
//!
//! The same change signal keeps the answers of the runtime's read-only inspections
//! (`queue ls|show`, `runs ls|show`): each is remembered with the generation it was asked
//! at and answered again from memory while nothing changed, so an operator polling the
//! queue does not pay a Python start-up per call. They are asked on the request's path
//! (only when something changed), never in the background.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use serde_json::{Map, Value};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::millrace::command::{Inspect, Millrace, RuntimeError};
use crate::millrace::exit_watch;
use crate::millrace::records::agents_dir;

type Snapshot = Result<Arc<Map<String, Value>>, RuntimeError>;

/// Bursts of file events (the daemon writes several files per step) are gathered for
/// this long before a refresh starts.
const SETTLE: Duration = Duration::from_millis(20);

/// What changed since the last refresh began, and who to wake.
struct Changes {
    generation: AtomicU64,
    wake: Notify,
}

impl Changes {
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// A remembered inspection answer and the generation it was asked at.
struct Read {
    generation: u64,
    at: std::time::Instant,
    value: Arc<Map<String, Value>>,
}

/// Remembered inspections per workspace at most (distinct ids of `queue show` and
/// `runs show` included); past it they are forgotten together.
const MAX_READS: usize = 256;

struct Entry {
    changes: Arc<Changes>,
    /// Inspection answers by the command's words.
    reads: Mutex<HashMap<Vec<std::ffi::OsString>, Read>>,
    /// The latest snapshot; `None` until the first refresh has finished.
    served: watch::Sender<Option<Snapshot>>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    watching_agents: Mutex<bool>,
}

/// See the module docs.
pub struct StatusCache {
    safety_net: Duration,
    entries: Mutex<HashMap<PathBuf, Arc<Entry>>>,
    refreshes: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl std::fmt::Debug for StatusCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusCache")
            .field("safety_net", &self.safety_net)
            .field("refreshes", &self.refreshes.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for StatusCache {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl StatusCache {
    /// `safety_net`: the longest a snapshot goes without a refresh when nothing was seen
    /// to change (a guard against a missed notification, not a freshness bound).
    pub fn new(safety_net: Duration) -> Self {
        Self {
            safety_net: safety_net.max(Duration::from_secs(1)),
            entries: Mutex::new(HashMap::new()),
            refreshes: Arc::new(AtomicU64::new(0)),
            stop: CancellationToken::new(),
        }
    }

    /// How many times the runtime was actually asked.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// The workspace's latest snapshot. Only the first request of a workspace waits (for
    /// the first refresh); later ones are answered from memory at once.
    pub async fn status(
        &self,
        millrace: &Millrace,
        workspace: &Path,
        cwd: &Path,
    ) -> Result<Map<String, Value>, RuntimeError> {
        let entry = self.entry(millrace, workspace, cwd);
        let mut served = entry.served.subscribe();
        let snapshot = match served.wait_for(Option::is_some).await {
            Ok(snapshot) => snapshot.clone(),
            // The refresher ended (the cache is being dropped): ask directly.
            Err(_) => None,
        };
        match snapshot {
            Some(snapshot) => snapshot.map(|m| (*m).clone()),
            None => millrace.status(workspace, cwd).await,
        }
    }

    /// A read-only inspection of the workspace (see the module docs): the remembered
    /// answer while the runtime's files and the lock's daemon are unchanged since it was
    /// asked (and not older than the safety net), else the runtime's. Errors are not
    /// remembered; commands that are not pure reads always run.
    pub async fn inspect(
        &self,
        millrace: &Millrace,
        what: &Inspect,
        workspace: &Path,
        cwd: &Path,
    ) -> Result<Map<String, Value>, RuntimeError> {
        if !what.reads_records_only() {
            return millrace.inspect(what, workspace, cwd).await;
        }
        let entry = self.entry(millrace, workspace, cwd);
        // Without a watch on the runtime's files no change would be seen: ask every time.
        let watching = *entry
            .watching_agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            && entry
                .watcher
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some();
        let key = what.args();
        // Read before asking, so a change during the call is seen as a change after it.
        let generation = entry.changes.generation.load(Ordering::SeqCst);
        if watching {
            let reads = entry.reads.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(read) = reads.get(&key)
                && read.generation == generation
                && read.at.elapsed() < self.safety_net
            {
                return Ok((*read.value).clone());
            }
        }
        let value = millrace.inspect(what, workspace, cwd).await?;
        if watching {
            let mut reads = entry.reads.lock().unwrap_or_else(|e| e.into_inner());
            if reads.len() >= MAX_READS {
                reads.clear();
            }
            reads.insert(
                key,
                Read {
                    generation,
                    at: std::time::Instant::now(),
                    value: Arc::new(value.clone()),
                },
            );
        }
        Ok(value)
    }

    /// Schedules a refresh (for changes this process makes itself). Does not wait.
    pub fn invalidate(&self, workspace: &Path) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get(workspace) {
            entry.changes.bump();
        }
    }

    fn entry(&self, millrace: &Millrace, workspace: &Path, cwd: &Path) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get(workspace) {
            return entry.clone();
        }
        let changes = Arc::new(Changes {
            generation: AtomicU64::new(0),
            wake: Notify::new(),
        });
        let entry = Arc::new(Entry {
            watcher: Mutex::new(file_watcher(workspace, changes.clone())),
            changes,
            reads: Mutex::new(HashMap::new()),
            served: watch::Sender::new(None),
            watching_agents: Mutex::new(false),
        });
        entries.insert(workspace.to_path_buf(), entry.clone());
        let refresher = Refresher {
            entry: entry.clone(),
            millrace: millrace.clone(),
            workspace: workspace.to_path_buf(),
            cwd: cwd.to_path_buf(),
            safety_net: self.safety_net,
            refreshes: self.refreshes.clone(),
            daemon: None,
            // The first refresh is the first request's work (it waits for it): traced
            // under that request's span. Later ones belong to no request.
            first_span: Some(tracing::Span::current()),
        };
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = refresher.run() => {}
            }
        });
        entry
    }
}

/// Watches the workspace root (to see `millrace init` create the agents dir) and,
/// once it exists, the agents dir recursively. Only the runtime's own files matter:
/// edits elsewhere in the workspace (the project itself, our intake documents) leave
/// the snapshot current.
fn file_watcher(workspace: &Path, changes: Arc<Changes>) -> Option<notify::RecommendedWatcher> {
    let agents = agents_dir(workspace);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            Ok(event)
                if !matches!(event.kind, notify::EventKind::Access(_))
                    && event.paths.iter().any(|p| p.starts_with(&agents)) =>
            {
                changes.bump()
            }
            Ok(_) => {}
            // Lost events (queue overflow): something may have changed.
            Err(_) => changes.bump(),
        }
    });
    match watcher {
        Ok(mut w) => {
            if let Err(err) = w.watch(workspace, RecursiveMode::NonRecursive) {
                tracing::warn!(%err, dir = %workspace.display(), "cannot watch workspace");
            }
            Some(w)
        }
        Err(err) => {
            tracing::warn!(%err, "no file notifications; status snapshots refresh on the safety net only");
            None
        }
    }
}

/// A daemon whose end is being waited for.
struct WatchedDaemon {
    pid: u32,
    task: tokio::task::JoinHandle<()>,
}

struct Refresher {
    entry: Arc<Entry>,
    millrace: Millrace,
    workspace: PathBuf,
    cwd: PathBuf,
    safety_net: Duration,
    refreshes: Arc<AtomicU64>,
    daemon: Option<WatchedDaemon>,
    first_span: Option<tracing::Span>,
}

impl Drop for Refresher {
    fn drop(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.task.abort();
        }
    }
}

impl Refresher {
    async fn run(mut self) {
        loop {
            self.ensure_agents_watch();
            // Read the generation before asking, so a change during the call is seen
            // as a change after it.
            let generation = self.entry.changes.generation.load(Ordering::SeqCst);
            // Watch the lock's daemon before asking: if it dies during or after the
            // call, that wakes the next refresh.
            self.watch_daemon();
            let span = self.first_span.take().unwrap_or_else(tracing::Span::none);
            let value = self
                .millrace
                .status(&self.workspace, &self.cwd)
                .instrument(span)
                .await
                .map(Arc::new);
            self.refreshes.fetch_add(1, Ordering::Relaxed);
            self.entry.served.send_replace(Some(value));
            self.wait_for_change(generation).await;
        }
    }

    async fn wait_for_change(&self, generation: u64) {
        let changes = &self.entry.changes;
        let net = tokio::time::sleep(self.safety_net);
        tokio::pin!(net);
        while changes.generation.load(Ordering::SeqCst) == generation {
            tokio::select! {
                () = changes.wake.notified() => {}
                () = &mut net => return,
            }
        }
        tokio::time::sleep(SETTLE).await;
    }

    fn ensure_agents_watch(&self) {
        let mut watching = self
            .entry
            .watching_agents
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *watching {
            return;
        }
        let agents = agents_dir(&self.workspace);
        if !agents.is_dir() {
            return;
        }
        if let Some(watcher) = self
            .entry
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            match watcher.watch(&agents, RecursiveMode::Recursive) {
                Ok(()) => *watching = true,
                Err(err) => {
                    tracing::warn!(%err, dir = %agents.display(), "cannot watch runtime files")
                }
            }
        }
    }

    /// Follows the pid named by the ownership lock: a new pid gets a waiter that bumps
    /// the generation when that process ends.
    fn watch_daemon(&mut self) {
        let pid = lock_owner(&self.workspace);
        // The same pid as before: already waited for (or already seen to end, which a
        // stale lock keeps naming; waiting again would refresh in a loop).
        if self.daemon.as_ref().map(|d| d.pid) == pid {
            return;
        }
        if let Some(old) = self.daemon.take() {
            old.task.abort();
        }
        if let Some(pid) = pid {
            let changes = self.entry.changes.clone();
            let task = tokio::spawn(async move {
                exit_watch::exited(pid).await;
                tracing::debug!(pid, "runtime daemon ended; refreshing status");
                changes.bump();
            });
            self.daemon = Some(WatchedDaemon { pid, task });
        }
    }
}

/// The pid in the runtime's ownership lock, when there is a readable one.
pub fn lock_owner(workspace: &Path) -> Option<u32> {
    let path = agents_dir(workspace)
        .join("state")
        .join("runtime_daemon.lock.json");
    let text = std::fs::read_to_string(path).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    value
        .get("owner_pid")?
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
}
