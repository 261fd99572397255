//! A delegated run on the real runtime, start to end: init, validate, the intake
//! document, `queue add-<kind>`, the daemon, following the work item through the
//! runtime's records, stopping the daemon, and the final status.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::contract::ScopedWorkItem;
use crate::contract::progress::{Milestone, Progress, WorkItem};
use crate::contract::vocab::{ErrorCode, EventType, Outcome, Severity};
use crate::millrace::command::{Millrace, RuntimeError};
use crate::millrace::daemon::Daemon;
use crate::millrace::intake::{self, IntakeDocument, IntakeKind};
use crate::millrace::monitor::{StageRun, Tracker, Verdict};
use crate::millrace::records::{self, EventTail};
use crate::payload;

/// What a delegated run needs to know.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub millrace: &'a Millrace,
    pub workspace: &'a Path,
    pub cwd: &'a Path,
    pub mode: &'a str,
    pub task: &'a str,
    pub kind: IntakeKind,
    pub scoped: Option<&'a ScopedWorkItem>,
    pub daemon_timeout: Duration,
    pub max_restarts: u32,
    pub keep_daemon: bool,
    /// A name for this run's daemon log (the request's subject token).
    pub log_name: String,
    /// Set when another worker started this request and died: its work item is already
    /// queued (and maybe its daemon still runs), so nothing is written or queued again.
    pub resume: Option<&'a Resume>,
    /// Fires when the request is cancelled: the run stops its daemon and cancels its
    /// work item in the runtime (see [`cancel_run`]).
    pub cancel: Option<&'a tokio_util::sync::CancellationToken>,
}

/// A work item a request queued, as recorded in the result store so another worker can
/// pick it up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkItemRef {
    pub id: String,
    pub path: PathBuf,
    pub kind: String,
}

/// What a previous owner of a request left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    pub work_item: Option<WorkItemRef>,
    pub daemon_pid: Option<u32>,
    /// The intake document the previous owner wrote and meant to queue, recorded before
    /// `queue add`; whether it got queued is for the runtime to say.
    pub intake: Option<WorkItemRef>,
}

impl Resume {
    fn document(&self) -> Option<IntakeDocument> {
        self.work_item.as_ref().and_then(WorkItemRef::document)
    }

    /// The previous owner's intended document, when it recorded one but not its queuing
    /// (and the file is still there).
    fn intended(&self) -> Option<IntakeDocument> {
        if self.work_item.is_some() {
            return None;
        }
        self.intake
            .as_ref()
            .and_then(WorkItemRef::document)
            .filter(|doc| doc.path.is_file())
    }
}

impl WorkItemRef {
    fn document(&self) -> Option<IntakeDocument> {
        Some(IntakeDocument {
            id: self.id.clone(),
            path: self.path.clone(),
            kind: IntakeKind::parse(&self.kind)?,
        })
    }
}

/// The terminal event, in the reference's vocabulary (`kind`, `reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub reason: String,
}

/// How a delegated run ended.
#[derive(Debug, Clone)]
pub struct Report {
    /// `completed`, `blocked`, `incomplete`, `crashed` or `restart_needed`.
    pub outcome: Outcome,
    pub scoped_completion: bool,
    pub event: Event,
    pub evidence: Vec<Map<String, Value>>,
    pub document: Option<IntakeDocument>,
    pub status: Option<Map<String, Value>>,
    pub stages: Vec<StageRun>,
    pub work_items: Vec<String>,
    pub warnings: Vec<String>,
    pub restarts: u32,
}

/// Why a delegated run could not give an outcome.
#[derive(Debug, thiserror::Error)]
pub enum DelegationError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot write the intake document: {0}")]
    Intake(String),
    #[error("timed out waiting for Millrace daemon event in {0}")]
    Timeout(String),
    /// A `cancel` stopped the run; the work item (if one was queued) is cancelled.
    #[error("{detail}")]
    Cancelled {
        work_item_id: Option<String>,
        detail: String,
    },
}

impl DelegationError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Runtime(e) => e.code(),
            Self::Intake(_) => ErrorCode::IntakeFailed,
            Self::Timeout(_) => ErrorCode::DaemonTimeout,
            Self::Cancelled { .. } => ErrorCode::Cancelled,
        }
    }
}

/// The background check for what files cannot show (the daemon is our child, so its
/// death is seen at once; this only catches missed file notifications).
const BACKSTOP: Duration = Duration::from_secs(5);

/// One delegated run, as the steps a reader can name: make the workspace ready, take over
/// what an earlier attempt left, write and queue the work item, follow it until the
/// runtime gives a verdict, let the last stage events arrive, stop (or keep) the daemon,
/// and report.
pub async fn run(plan: &Plan<'_>, progress: &Progress) -> Result<Report, DelegationError> {
    let never = tokio_util::sync::CancellationToken::new();
    let cancel = plan.cancel.unwrap_or(&never);
    if cancel.is_cancelled() {
        return Err(cancelled_before_start(plan, progress).await);
    }
    prepare_workspace(plan).await?;
    let earlier = match resume_or_reuse(plan, progress).await? {
        ControlFlow::Continue(earlier) => earlier,
        ControlFlow::Break(blocked) => return Ok(blocked),
    };
    // Read from where the log ends now (before anything is queued), so this run's events
    // are seen; a resumed run reads it all, its item's events came before.
    let tail = if earlier.resumed.is_some() {
        EventTail::from_start(plan.workspace)
    } else {
        EventTail::from_end(plan.workspace)
    };
    let queued = write_and_queue(plan, earlier, progress).await?;
    let mut follow = Follow::start(plan, &queued, tail, progress).await?;
    let verdict = follow
        .until_verdict(plan, cancel, &queued.document.id, progress)
        .await?;
    follow.settle_stage_events(progress).await;
    let status = stop_or_keep_daemon(plan, &mut follow.daemon, progress).await;
    Ok(report(verdict, queued.document, status, follow, progress))
}

/// `argv` for the runtime from plain words.
fn os_args(words: &[&str]) -> Vec<std::ffi::OsString> {
    words.iter().map(Into::into).collect()
}

/// A request cancelled before its run began: what a previous owner queued is cancelled
/// (not resumed); with nothing queued there is nothing to undo.
async fn cancelled_before_start(plan: &Plan<'_>, progress: &Progress) -> DelegationError {
    match plan.resume.and_then(Resume::document) {
        Some(doc) => cancel_taken_over(plan, &doc, progress).await,
        None => DelegationError::Cancelled {
            work_item_id: None,
            detail: "The request was cancelled before anything was queued.".into(),
        },
    }
}

/// `millrace init` and `compile validate` for the requested mode: a workspace the runtime
/// cannot run in fails here, before any document is written or daemon started.
async fn prepare_workspace(plan: &Plan<'_>) -> Result<(), DelegationError> {
    let ws_arg = plan.workspace.as_os_str().to_owned();
    plan.millrace
        .run_checked(
            &[os_args(&["init", "--workspace"]), vec![ws_arg.clone()]].concat(),
            plan.cwd,
        )
        .await?;
    plan.millrace
        .run_checked(
            &[
                os_args(&["compile", "validate", "--workspace"]),
                vec![ws_arg],
                os_args(&["--mode", plan.mode]),
            ]
            .concat(),
            plan.cwd,
        )
        .await?;
    Ok(())
}

/// What earlier attempts at this request (or at the same scoped item) left behind.
struct Earlier {
    /// Queued by a worker that stopped: followed, not queued again.
    resumed: Option<IntakeDocument>,
    /// Written by a worker that stopped before queuing it (the runtime does not know it).
    intended: Option<IntakeDocument>,
    /// The document this run uses instead of writing one: the resumed or intended one, or
    /// a scoped item queued before.
    existing: Option<IntakeDocument>,
}

/// Finds what an earlier attempt left: a previous owner's queued item or intended
/// document (the runtime's records say whether its queuing happened; the worker may have
/// died between `queue add` and storing that it had queued), or a scoped item sent before.
/// A re-sent scoped item is not queued twice, and one the runtime reports a failure for
/// ends the run here as `blocked` ([`ControlFlow::Break`]).
async fn resume_or_reuse(
    plan: &Plan<'_>,
    progress: &Progress,
) -> Result<ControlFlow<Report, Earlier>, DelegationError> {
    let ws = plan.workspace;
    let mut resumed = plan.resume.and_then(Resume::document);
    let mut intended = plan.resume.and_then(Resume::intended);
    if let Some(doc) = intended.take_if(|doc| records::queued(ws, &doc.id, doc.kind.as_str())) {
        resumed = Some(doc);
    }
    if let Some(doc) = &resumed {
        milestone(progress, Milestone::WorkItemQueued(work_item(doc))).await;
        progress.info(
            EventType::RuntimeResumed,
            format!(
                "Resuming {} {}, queued by a worker that stopped; not queuing it again.",
                doc.kind.as_str(),
                doc.id
            ),
            payload! {"work_item_id" => doc.id, "path" => doc.path.display().to_string(), "intake_kind" => doc.kind.as_str(), "daemon_pid" => plan.resume.and_then(|r| r.daemon_pid)},
        );
    }

    let existing = match (&resumed, &intended) {
        (Some(doc), _) | (None, Some(doc)) => Some(doc.clone()),
        (None, None) => plan.scoped.and_then(|item| intake::find_scoped(ws, item)),
    };
    if let Some(doc) = existing
        .as_ref()
        .filter(|_| resumed.is_none() && intended.is_none())
    {
        let status = plan.millrace.status(ws, plan.cwd).await?;
        let failure = status
            .get("current_failure_class")
            .filter(|v| crate::contract::request::is_truthy(v))
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .or_else(|| {
                status
                    .get("latest_runtime_error_report_path")
                    .filter(|v| crate::contract::request::is_truthy(v))
                    .map(|_| "latest runtime error".to_string())
            });
        if let Some(reason) = failure {
            progress.emit(
                EventType::RuntimeTerminal,
                Severity::Warning,
                format!("Scoped item was queued before and the runtime reports {reason}."),
                payload! {"outcome" => Outcome::Blocked, "work_item_id" => doc.id},
            );
            return Ok(ControlFlow::Break(Report {
                outcome: Outcome::Blocked,
                scoped_completion: false,
                event: Event {
                    kind: Outcome::Blocked.as_str().to_string(),
                    reason,
                },
                evidence: Vec::new(),
                document: existing.clone(),
                status: Some(status),
                stages: Vec::new(),
                work_items: vec![doc.id.clone()],
                warnings: Vec::new(),
                restarts: 0,
            }));
        }
        progress.info(
            EventType::RuntimeIntakeReused,
            format!(
                "Scoped item {} was queued before as {}; not queuing it again.",
                doc.id,
                doc.path.display()
            ),
            payload! {"work_item_id" => doc.id, "path" => doc.path.display().to_string()},
        );
    }
    Ok(ControlFlow::Continue(Earlier {
        resumed,
        intended,
        existing,
    }))
}

/// The work item this run follows, and whether a previous owner had queued it.
struct Queued {
    document: IntakeDocument,
    resumed: bool,
}

/// Writes the intake document (unless an earlier one is reused) and queues it with
/// `queue add-<kind>` when the runtime does not have it yet.
///
/// A reused document is queued again only when the runtime has no card for it (an earlier
/// attempt wrote it but never queued it); an idea's id is not a card id, so a reused idea
/// is never queued twice. A resumed request's item is already queued. A document the
/// previous owner meant to queue and the runtime does not know is queued now
/// (`intended` was checked by [`resume_or_reuse`]).
async fn write_and_queue(
    plan: &Plan<'_>,
    earlier: Earlier,
    progress: &Progress,
) -> Result<Queued, DelegationError> {
    let ws = plan.workspace;
    let Earlier {
        resumed,
        intended,
        existing,
    } = earlier;
    let (document, queue_it) = match existing {
        Some(doc) if intended.is_some() => {
            progress.info(
                EventType::RuntimeIntakeReused,
                format!(
                    "{} {} was written by a worker that stopped before queuing it; queuing it now.",
                    doc.kind.as_str(),
                    doc.id
                ),
                payload! {"work_item_id" => doc.id, "path" => doc.path.display().to_string()},
            );
            (doc, true)
        }
        Some(doc) => {
            let unknown = resumed.is_none()
                && doc.kind != IntakeKind::Idea
                && records::lifecycle(ws, &doc.id).is_none();
            (doc, unknown)
        }
        None => {
            let doc = intake::write(ws, plan.kind, plan.task, plan.scoped, chrono::Utc::now())
                .map_err(|e| DelegationError::Intake(e.to_string()))?;
            progress.info(
                EventType::RuntimeIntakeWritten,
                format!("Intake document written: {}.", doc.path.display()),
                payload! {"path" => doc.path.display().to_string(), "work_item_id" => doc.id, "intake_kind" => doc.kind.as_str()},
            );
            // The intent is stored before `queue add`: a worker taking over after a crash
            // right after queuing finds this id in the runtime rather than queuing again.
            if let Err(err) = progress
                .checkpoint(Milestone::IntakeWritten(work_item(&doc)))
                .await
            {
                tracing::warn!(%err, work_item_id = %doc.id, "cannot record the intent to queue; queuing anyway");
            }
            (doc, true)
        }
    };
    if queue_it {
        plan.millrace
            .run_checked(
                &[
                    os_args(&["queue", document.kind.queue_command()]),
                    vec![
                        document.path.as_os_str().to_owned(),
                        "--workspace".into(),
                        ws.as_os_str().to_owned(),
                    ],
                ]
                .concat(),
                plan.cwd,
            )
            .await?;
        milestone(progress, Milestone::WorkItemQueued(work_item(&document))).await;
        progress.info(
            EventType::RuntimeWorkItemQueued,
            format!("Queued into Millrace as {} {}.", document.kind.as_str(), document.id),
            payload! {"work_item_id" => document.id, "intake_kind" => document.kind.as_str(), "path" => document.path.display().to_string()},
        );
    }
    Ok(Queued {
        document,
        resumed: resumed.is_some(),
    })
}

/// What following found: the runtime's verdict, or the daemon stopped for good
/// (`kind`, `reason` in the reference's vocabulary) once its restarts were used up.
type Finding = Result<Verdict, (String, String)>;

/// A queued work item followed through the runtime's records while a daemon works on it.
struct Follow {
    tail: EventTail,
    tracker: Tracker,
    /// Fires when anything under `millrace-agents/` changes.
    wake: mpsc::Receiver<()>,
    /// Kept alive for as long as `wake` is read.
    _watcher: Option<notify::RecommendedWatcher>,
    log_path: PathBuf,
    daemon: Daemon,
    restarts: u32,
    warnings: Vec<String>,
}

impl Follow {
    /// Watches the runtime's files and gets a daemon working: the previous owner's, when a
    /// resumed request's daemon still runs, else a new one.
    async fn start(
        plan: &Plan<'_>,
        queued: &Queued,
        tail: EventTail,
        progress: &Progress,
    ) -> Result<Self, DelegationError> {
        let ws = plan.workspace;
        let document = &queued.document;
        let tracker = Tracker::new(ws, &document.id, document.kind);
        let (wake_tx, wake) = mpsc::channel::<()>(1);
        let watcher = watch(&records::agents_dir(ws), wake_tx);
        let log_path = daemon_log_path(plan);
        let adopted = plan
            .resume
            .and_then(|r| r.daemon_pid)
            .filter(|_| queued.resumed)
            .and_then(|pid| Daemon::adopt(pid, log_path.clone()));
        let daemon = match adopted {
            Some(daemon) => {
                if let Some(pid) = daemon.pid() {
                    milestone(progress, Milestone::DaemonRunning { pid }).await;
                }
                progress.info(
                    EventType::RuntimeDaemonAdopted,
                    "The Millrace daemon the previous worker started still runs; following it.",
                    payload! {"pid" => daemon.pid()},
                );
                daemon
            }
            None => start_daemon(plan, &log_path, progress, 0).await?,
        };
        Ok(Self {
            tail,
            tracker,
            wake,
            _watcher: watcher,
            log_path,
            daemon,
            restarts: 0,
            warnings: Vec::new(),
        })
    }

    /// Reads the runtime's events and records on every file change (and every
    /// [`BACKSTOP`]) until they give a verdict. A daemon that exits first is restarted up
    /// to `max_restarts` times; the deadline stops the daemon and fails the run; a cancel
    /// stops the daemon and cancels the work item ([`cancel_run`]).
    async fn until_verdict(
        &mut self,
        plan: &Plan<'_>,
        cancel: &tokio_util::sync::CancellationToken,
        work_item_id: &str,
        progress: &Progress,
    ) -> Result<Finding, DelegationError> {
        let ws = plan.workspace;
        let deadline = Instant::now() + plan.daemon_timeout;
        loop {
            if let Some(verdict) = drain(&mut self.tail, &mut self.tracker, progress) {
                return Ok(Ok(verdict));
            }
            if let Some(verdict) = self.tracker.check_records(false) {
                return Ok(Ok(verdict));
            }
            let now = Instant::now();
            if now >= deadline {
                let _ = self
                    .daemon
                    .stop(plan.millrace, ws, plan.cwd, Duration::from_secs(30))
                    .await;
                progress.emit(
                    EventType::RuntimeTerminal,
                    Severity::Error,
                    "Timed out waiting for the delegated work; the daemon was stopped.",
                    payload! {"outcome" => Outcome::Timeout},
                );
                return Err(DelegationError::Timeout(ws.display().to_string()));
            }
            tokio::select! {
                _ = self.wake.recv() => {}
                _ = tokio::time::sleep(BACKSTOP.min(deadline - now)) => {}
                () = cancel.cancelled() => {
                    return Err(cancel_run(plan, &mut self.daemon, work_item_id, &mut self.tail, &mut self.tracker, progress).await);
                }
                code = self.daemon.wait() => {
                    // Read what the daemon wrote before it ended.
                    if let Some(verdict) = drain(&mut self.tail, &mut self.tracker, progress) {
                        return Ok(Ok(verdict));
                    }
                    if let Some(verdict) = self.tracker.check_records(true) {
                        return Ok(Ok(verdict));
                    }
                    let status = plan.millrace.status(ws, plan.cwd).await?;
                    let (kind, reason) = classify_dead_daemon(&status);
                    progress.emit(
                        EventType::RuntimeDaemonExited,
                        Severity::Warning,
                        format!("The Millrace daemon exited (code {code}) before the work ended: {reason}."),
                        payload! {"exit_code" => code, "kind" => kind, "reason" => reason},
                    );
                    if self.restarts >= plan.max_restarts {
                        return Ok(Err((kind, reason)));
                    }
                    self.restarts += 1;
                    self.warnings.push(format!("daemon restarted after it stopped: {reason}"));
                    self.daemon = start_daemon(plan, &self.log_path, progress, self.restarts).await?;
                }
            }
        }
    }

    /// Records can move a card before the event log has the stage's completion line:
    /// waits briefly (3 s at most) for it, so subscribers see every stage start and finish
    /// exactly once.
    async fn settle_stage_events(&mut self, progress: &Progress) {
        let settle_until = Instant::now() + Duration::from_secs(3);
        while self.tracker.active_stage().is_some() && Instant::now() < settle_until {
            tokio::select! {
                _ = self.wake.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let _ = drain(&mut self.tail, &mut self.tracker, progress);
        }
    }
}

/// Where this run's daemon writes its log: `.millracer/logs/daemon-<log name>.log`.
fn daemon_log_path(plan: &Plan<'_>) -> PathBuf {
    plan.workspace
        .join(".millracer")
        .join("logs")
        .join(format!("daemon-{}.log", plan.log_name))
}

/// Stops the daemon (tidying a stale lock it leaves) unless `--keep-daemon`, and reads
/// the runtime's final status for the result: the one the stale-state check read when it
/// is still current, else a fresh `millrace status` (none when that fails).
async fn stop_or_keep_daemon(
    plan: &Plan<'_>,
    daemon: &mut Daemon,
    progress: &Progress,
) -> Option<Map<String, Value>> {
    let mut final_status = None;
    if plan.keep_daemon {
        progress.info(
            EventType::RuntimeDaemonKept,
            "The daemon keeps running (--keep-daemon).",
            payload! {"pid" => daemon.pid()},
        );
    } else {
        let _ = daemon
            .stop(
                plan.millrace,
                plan.workspace,
                plan.cwd,
                Duration::from_secs(30),
            )
            .await;
        final_status = clear_stale_if_needed(plan).await;
        progress.info(
            EventType::RuntimeDaemonStopped,
            "The Millrace daemon was stopped.",
            payload! {"pid" => daemon.pid()},
        );
    }
    match final_status {
        Some(status) => Some(status),
        None => plan.millrace.status(plan.workspace, plan.cwd).await.ok(),
    }
}

/// Turns what following found into the outcome in the reference's vocabulary, says it in
/// one `runtime.terminal` frame, and builds the report.
fn report(
    verdict: Finding,
    document: IntakeDocument,
    status: Option<Map<String, Value>>,
    follow: Follow,
    progress: &Progress,
) -> Report {
    let (outcome, scoped, event, evidence) = match verdict {
        Ok(Verdict::Completed { reason, evidence }) => (
            Outcome::Completed,
            true,
            Event {
                kind: "scoped_complete".into(),
                reason,
            },
            evidence,
        ),
        Ok(Verdict::Blocked {
            failure_class,
            evidence,
        }) => (
            Outcome::Blocked,
            false,
            Event {
                kind: Outcome::Blocked.as_str().into(),
                reason: failure_class,
            },
            evidence,
        ),
        Ok(Verdict::NothingRan) => (
            Outcome::Incomplete,
            false,
            Event {
                kind: "idle_no_work".into(),
                reason: "daemon idle with no work".into(),
            },
            Vec::new(),
        ),
        Err((kind, reason)) => {
            let outcome = if kind == Outcome::Crashed.as_str() {
                Outcome::Crashed
            } else {
                Outcome::RestartNeeded
            };
            (outcome, false, Event { kind, reason }, Vec::new())
        }
    };
    progress.emit(
        EventType::RuntimeTerminal,
        if outcome == Outcome::Completed {
            Severity::Info
        } else {
            Severity::Warning
        },
        format!("Delegated work ended: {outcome} ({}: {}).", event.kind, event.reason),
        payload! {"outcome" => outcome, "kind" => event.kind, "reason" => event.reason, "scoped_completion" => scoped, "work_item_id" => document.id},
    );
    Report {
        outcome,
        scoped_completion: scoped,
        event,
        evidence,
        document: Some(document),
        status,
        stages: follow.tracker.stages.clone(),
        work_items: follow.tracker.work_items(),
        warnings: follow.warnings,
        restarts: follow.restarts,
    }
}

/// A request cancelled while its worker was gone: what that worker started is stopped (its
/// daemon, when still alive) and its work item cancelled, never resumed.
async fn cancel_taken_over(
    plan: &Plan<'_>,
    doc: &IntakeDocument,
    progress: &Progress,
) -> DelegationError {
    progress.emit(
        EventType::RuntimeNotResumed,
        Severity::Warning,
        format!(
            "The request was cancelled while no worker held it: {} {} is cancelled, not resumed.",
            doc.kind.as_str(),
            doc.id
        ),
        payload! {"work_item_id" => doc.id},
    );
    let mut daemon = plan
        .resume
        .and_then(|r| r.daemon_pid)
        .and_then(|pid| Daemon::adopt(pid, daemon_log_path(plan)));
    cancel_work(plan, daemon.as_mut(), &doc.id, None, progress).await
}

/// Stops a running delegated run at once: the daemon's process group is killed (the
/// runtime defers `queue cancel` while a stage runs, and `control stop` waits for the
/// stage to end), the work item left active is requeued (`control clear-stale-state`)
/// and then cancelled in the runtime (`queue cancel`, which records it under
/// `queue/cancelled/`), so no later stage runs it.
async fn cancel_run(
    plan: &Plan<'_>,
    daemon: &mut Daemon,
    work_item_id: &str,
    tail: &mut EventTail,
    tracker: &mut Tracker,
    progress: &Progress,
) -> DelegationError {
    cancel_work(
        plan,
        Some(daemon),
        work_item_id,
        Some((tail, tracker)),
        progress,
    )
    .await
}

async fn cancel_work(
    plan: &Plan<'_>,
    daemon: Option<&mut Daemon>,
    work_item_id: &str,
    seen: Option<(&mut EventTail, &mut Tracker)>,
    progress: &Progress,
) -> DelegationError {
    let ws = plan.workspace;
    if let Some(daemon) = daemon {
        // SIGKILL at once: the daemon's graceful exit takes 1-2 s, and what it would tidy
        // (the ownership lock, the active run) `clear-stale-state` tidies next.
        daemon.kill(Duration::ZERO).await;
        // What the runtime wrote before it was stopped, so the frames show the last stage.
        if let Some((tail, tracker)) = seen {
            let _ = drain(tail, tracker, progress);
        }
        progress.emit(
            EventType::RuntimeDaemonStopped,
            Severity::Warning,
            "The Millrace daemon was stopped to cancel the request.",
            payload! {"pid" => daemon.pid(), ErrorCode::Cancelled => true},
        );
    }
    let clear: Vec<std::ffi::OsString> = vec![
        "control".into(),
        "clear-stale-state".into(),
        "--workspace".into(),
        ws.into(),
    ];
    let reason = "cancelled through millracer";
    // The runtime refuses (`applied: false`) while it still sees an active stage: requeue
    // the item and try again, a few times.
    let mut cancelled = Err(RuntimeError::Spawn("not tried".into()));
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Err(err) = plan.millrace.run_checked(&clear, plan.cwd).await {
            tracing::warn!(%err, "clear-stale-state after cancel failed");
        }
        cancelled = plan
            .millrace
            .cancel_work_item(ws, plan.cwd, work_item_id, reason)
            .await;
        let applied = cancelled
            .as_ref()
            .is_ok_and(|a| a.get("applied") == Some(&serde_json::Value::Bool(true)));
        if applied {
            break;
        }
        tracing::warn!(attempt, answer = ?cancelled, "the runtime did not apply the cancel yet");
    }
    let (severity, message, applied) = match &cancelled {
        Ok(answer) if answer.get("applied") == Some(&serde_json::Value::Bool(true)) => (
            Severity::Warning,
            format!("Work item {work_item_id} cancelled in the Millrace runtime."),
            answer.get("applied").cloned(),
        ),
        Ok(answer) => (
            Severity::Error,
            format!(
                "The runtime did not apply the cancel of work item {work_item_id}: {}",
                answer
                    .get("detail")
                    .map_or_else(|| "no detail".to_string(), |d| d.to_string())
            ),
            answer.get("applied").cloned(),
        ),
        Err(err) => (
            Severity::Error,
            format!("The runtime did not cancel work item {work_item_id}: {err}"),
            None,
        ),
    };
    progress.emit(
        EventType::RuntimeWorkItemCancelled,
        severity,
        message.clone(),
        payload! {"work_item_id" => work_item_id, "applied" => applied, "runtime" => cancelled.as_ref().ok()},
    );
    DelegationError::Cancelled {
        work_item_id: Some(work_item_id.to_string()),
        detail: format!("The request was cancelled; its daemon was stopped. {message}"),
    }
}

fn drain(tail: &mut EventTail, tracker: &mut Tracker, progress: &Progress) -> Option<Verdict> {
    for event in tail.read_new() {
        if let Some(verdict) = tracker.observe(&event, progress) {
            return Some(verdict);
        }
    }
    None
}

/// The reference's classification of a stopped daemon, from one status read.
fn classify_dead_daemon(status: &Map<String, Value>) -> (String, String) {
    let int = |k: &str| status.get(k).and_then(Value::as_i64).unwrap_or(0);
    let queued =
        int("execution_queue_depth") + int("planning_queue_depth") + int("learning_queue_depth");
    let stale = status.get("runtime_ownership_lock").and_then(Value::as_str) == Some("stale");
    if int("active_run_count") > 0 {
        return (
            Outcome::Crashed.as_str().into(),
            "daemon stopped with active runs".into(),
        );
    }
    let mut reason = "daemon stopped with queued work".to_string();
    if queued == 0 {
        reason = "daemon stopped before the work ended".to_string();
    }
    if stale {
        reason.push_str(" and stale runtime ownership lock");
    }
    (Outcome::RestartNeeded.as_str().into(), reason)
}

async fn start_daemon(
    plan: &Plan<'_>,
    log_path: &Path,
    progress: &Progress,
    restarts: u32,
) -> Result<Daemon, DelegationError> {
    clear_stale_if_needed(plan).await;
    let daemon = Daemon::start(
        plan.millrace,
        plan.workspace,
        plan.cwd,
        plan.mode,
        log_path.to_path_buf(),
    )
    .await?;
    let (event, message) = if restarts == 0 {
        (
            EventType::RuntimeDaemonStarted,
            "Millrace daemon started.".to_string(),
        )
    } else {
        (
            EventType::RuntimeDaemonRestarted,
            format!("Millrace daemon restarted ({restarts})."),
        )
    };
    if let Some(pid) = daemon.pid() {
        milestone(progress, Milestone::DaemonRunning { pid }).await;
    }
    progress.info(
        event,
        message,
        payload! {"pid" => daemon.pid(), "mode" => plan.mode, "restarts" => restarts, "log" => log_path.display().to_string()},
    );
    Ok(daemon)
}

/// A runtime work item as the durable intake records it.
fn work_item(doc: &IntakeDocument) -> WorkItem {
    WorkItem {
        id: doc.id.clone(),
        path: doc.path.clone(),
        kind: doc.kind.as_str().to_string(),
    }
}

/// Tells the durable intake (if any) a step it needs for a takeover; a failure to store
/// it costs only a takeover's precision (the runtime's records still decide), so the run
/// goes on.
async fn milestone(progress: &Progress, milestone: Milestone) {
    if let Err(err) = progress.checkpoint(milestone.clone()).await {
        tracing::warn!(%err, ?milestone, "cannot record a step of the run for a takeover");
    }
}

/// `control clear-stale-state` when the runtime reports a stale ownership lock, or a run
/// left active by a daemon that is gone (a graceful stop mid-stage leaves the item in
/// `active/` with the lock `absent`; the reference only looks at the lock and hangs).
/// Returns the status it read when nothing had to be cleared: it is still current, so a
/// caller needs no second `millrace status` (0.6 s each).
async fn clear_stale_if_needed(plan: &Plan<'_>) -> Option<Map<String, Value>> {
    let status = plan.millrace.status(plan.workspace, plan.cwd).await.ok()?;
    let stale = status.get("runtime_ownership_lock").and_then(Value::as_str) == Some("stale");
    let orphaned = status.get("process_running") == Some(&Value::Bool(false))
        && status
            .get("active_run_count")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            > 0;
    if !stale && !orphaned {
        return Some(status);
    }
    let args: Vec<std::ffi::OsString> = vec![
        "control".into(),
        "clear-stale-state".into(),
        "--workspace".into(),
        plan.workspace.into(),
    ];
    if let Err(err) = plan.millrace.run_checked(&args, plan.cwd).await {
        tracing::warn!(%err, "clear-stale-state failed");
    }
    None
}

/// Wakes the monitor when anything under `millrace-agents/` changes.
fn watch(dir: &Path, wake: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = wake.try_send(());
        }
    })
    .map_err(
        |err| tracing::warn!(%err, "no file notifications; falling back to the backstop check"),
    )
    .ok()?;
    if let Err(err) = watcher.watch(dir, RecursiveMode::Recursive) {
        tracing::warn!(%err, dir = %dir.display(), "cannot watch runtime files; falling back to the backstop check");
    }
    Some(watcher)
}

/// The task path a result reports, as the reference does.
pub fn task_path(outcome: &Report) -> Option<PathBuf> {
    outcome.document.as_ref().map(|d| d.path.clone())
}
