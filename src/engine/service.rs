//! The transport-agnostic core of a worker: admits raw requests, keeps them keyed by
//! request_id, runs read-only actions at once and mutating actions one at a time per
//! lane in arrival order, and emits frames then one result for each.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::actions::binding::Bound;
use crate::actions::cancel::{self, Ticket, Withdraw};
use crate::actions::dispatch::{LaneKey, Plan, Service, Serving};
use crate::contract::progress::Progress;
use crate::contract::vocab::{ErrorCode, EventType, Severity};
use crate::contract::{
    OpsRequest, OpsResult, Record, WorkspaceRef, parse_request, request::salvage_ids, time,
};
use crate::engine::frames::{Outbound, ReplyTo};
use crate::engine::ledger::{Admission, Ledger};
use crate::engine::trace;
use crate::payload;

/// Limits of one engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Larger requests are refused with `request_too_large` before parsing.
    pub max_request_bytes: usize,
    /// How long a finished result is kept for a repeated request_id.
    pub result_ttl: Duration,
    /// How many finished results are kept at most.
    pub result_capacity: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_request_bytes: 256 * 1024,
            result_ttl: Duration::from_secs(900),
            result_capacity: 10_000,
        }
    }
}

/// What a transport knows about a request beyond its bytes.
#[derive(Debug, Clone, Default)]
pub struct SubmitHints {
    /// The request was started by another worker that is gone: pick up its work item.
    pub resume: Option<crate::millrace::delegation::Resume>,
    /// The last frame sequence already published for this request (by a previous owner).
    pub last_sequence: u64,
    /// What the subject the request arrived on binds; `None` in process (no subject).
    pub bound: Option<Bound>,
    /// The request was cancelled while no worker held it (the reason): it is answered as
    /// cancelled, and what a previous owner started is stopped, never resumed.
    pub cancelled: Option<String>,
    /// Where the request's run stores its intent before queuing work (durable intake).
    pub checkpoint: Option<Arc<dyn crate::contract::progress::Checkpoint>>,
}

struct Job {
    request: OpsRequest,
    /// The ledger key: the bound workspace and the request_id.
    key: String,
    plan: Plan,
    hints: SubmitHints,
    progress: Progress,
    span: tracing::Span,
    ticket: Ticket,
}

/// A lane's hold on a waiting request: empty once a `cancel` has taken it out.
type Slot = Arc<Mutex<Option<Job>>>;

struct Lane {
    tx: UnboundedSender<Slot>,
    /// Requests in this lane, running or waiting: a new arrival's position.
    depth: Arc<AtomicUsize>,
}

/// See the module docs.
pub struct Engine {
    service: Arc<Service>,
    out: UnboundedSender<Outbound>,
    ledger: Mutex<Ledger>,
    lanes: Mutex<HashMap<LaneKey, Lane>>,
    tracker: TaskTracker,
    options: EngineOptions,
}

impl Engine {
    /// An engine and the receiving end of its outbound messages, for a transport.
    pub fn new(
        service: Arc<Service>,
        options: EngineOptions,
    ) -> (Arc<Self>, UnboundedReceiver<Outbound>) {
        let (out, rx) = mpsc::unbounded_channel();
        let engine = Arc::new(Self {
            service,
            out,
            ledger: Mutex::new(Ledger::new(options.result_ttl, options.result_capacity)),
            lanes: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            options,
        });
        (engine, rx)
    }

    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Admits one raw request. Synchronous on purpose: the order of calls is the order
    /// of lanes. `reply` is where the result goes; `parent` is the transport's span for
    /// this message (carrying the caller's trace context), under which the request runs.
    pub fn submit(self: &Arc<Self>, raw: &[u8], reply: Option<ReplyTo>, parent: &tracing::Span) {
        self.submit_with(raw, reply, parent, SubmitHints::default());
    }

    /// [`Engine::submit`] with what the transport knows about the request (a resumed
    /// request's work item and frame numbering). Hints of a request already running in
    /// this engine are ignored: the caller attaches to it.
    pub fn submit_with(
        self: &Arc<Self>,
        raw: &[u8],
        reply: Option<ReplyTo>,
        parent: &tracing::Span,
        hints: SubmitHints,
    ) {
        if raw.len() > self.options.max_request_bytes {
            // Bounded by the server's max_payload; worth it to name the refused request.
            let (request_id, action) = salvage_ids(raw);
            let error = Record::error(
                ErrorCode::RequestTooLarge,
                format!(
                    "Request of {} bytes exceeds this worker's limit of {} bytes.",
                    raw.len(),
                    self.options.max_request_bytes
                ),
            )
            .suggest("Send a smaller request: pass large inputs by reference (context_refs) instead of inline.");
            self.reject(&request_id, &action, error, reply);
            return;
        }
        let mut request = match parse_request(raw) {
            Ok(request) => request,
            Err(err) => {
                let (request_id, action) = salvage_ids(raw);
                let error = Record::error(ErrorCode::InvalidRequest, err.to_string())
                    .suggest(err.suggestion());
                self.reject(&request_id, &action, error, reply);
                return;
            }
        };
        if let Some(bound) = &hints.bound
            && let Err(error) = self.service.bind(&mut request, bound)
        {
            self.reject(&request.request_id, &request.action, *error, reply);
            return;
        }
        self.submit_request(request, None, reply, parent, hints);
    }

    /// Admits a request the transport already parsed and bound to its subject (durable
    /// intake reads it to claim it), with its plan when the transport made one: a request
    /// is parsed and planned once. The order of calls is the order of lanes, as for
    /// [`Engine::submit`].
    pub fn submit_request(
        self: &Arc<Self>,
        request: OpsRequest,
        plan: Option<Plan>,
        reply: Option<ReplyTo>,
        parent: &tracing::Span,
        hints: SubmitHints,
    ) {
        // The same request_id on two workspaces' subjects is two requests: one workspace
        // never gets another's stored result.
        let key = format!(
            "{}\u{0}{}",
            hints
                .bound
                .as_ref()
                .and_then(Bound::workspace)
                .unwrap_or(""),
            request.request_id
        );
        let admission = self.lock_ledger().admit(&key, reply);
        match admission {
            Admission::Attached => {
                tracing::debug!(request_id = %request.request_id, "repeated request attached to the running one");
                return;
            }
            Admission::Finished(result, reply) => {
                tracing::debug!(request_id = %request.request_id, "repeated request answered from the ledger");
                let _ = self.out.send(Outbound::Result {
                    to: reply.into_iter().collect(),
                    workspace: None,
                    result,
                    trace: Arc::new(trace::context_of(parent)),
                    last_sequence: None,
                });
                return;
            }
            Admission::New => {}
        }
        let plan = plan.unwrap_or_else(|| self.service.plan(&request));
        let span = tracing::info_span!(
            parent: parent,
            "request",
            request_id = %request.request_id,
            action = %request.action,
            workspace = plan.workspace_id.as_deref().unwrap_or(""),
            route = tracing::field::Empty,
            status = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let progress = Progress::continuing(
            &request.request_id,
            plan.workspace_id.clone(),
            {
                let out = self.out.clone();
                // A closed queue means the process is going away; the frame has nowhere to go.
                move |frame| drop(out.send(Outbound::Frame(frame)))
            },
            trace::context_of(&span),
            hints.last_sequence,
        );
        if let Some(checkpoint) = &hints.checkpoint {
            progress.set_checkpoint(checkpoint.clone());
        }
        progress.info(
            EventType::RequestAccepted,
            "Request accepted.",
            payload! {"action" => request.action, "workspace_id" => plan.workspace_id},
        );
        let slot: Slot = Arc::new(Mutex::new(None));
        let withdraw = plan.lane.is_some().then(|| {
            let engine = Arc::downgrade(self);
            let slot = slot.clone();
            Box::new(move |reason: &str| {
                let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                match (job, engine.upgrade()) {
                    (Some(job), Some(engine)) => {
                        engine.answer_withdrawn(job, reason);
                        true
                    }
                    _ => false,
                }
            }) as Withdraw
        });
        let ticket = self.service.cancels.register(
            &request.request_id,
            plan.resolution.root.as_deref(),
            withdraw,
        );
        if let Some(reason) = &hints.cancelled {
            self.service.cancels.mark(&ticket, reason);
        }
        let job = Job {
            request,
            key,
            plan,
            hints,
            progress,
            span,
            ticket,
        };
        match job.plan.lane.clone() {
            Some(key) => {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(job);
                self.enqueue(key, slot);
            }
            None => {
                // Read-only work that needs no waiting (list, inspect, a current status
                // snapshot) finishes in this first poll, on the receiving task: no task
                // hand-off for the common case. Anything that must wait is spawned as is.
                let engine = self.clone();
                let mut run = Box::pin(async move { engine.run(job).await });
                if futures::FutureExt::now_or_never(&mut run).is_none() {
                    self.tracker.spawn(run);
                }
            }
        }
    }

    /// Waits for every admitted request to finish. Call after the transport stopped
    /// submitting.
    pub async fn shutdown(&self) {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// How many requests are running or waiting.
    pub fn in_flight(&self) -> usize {
        self.lock_ledger().running()
    }

    /// The request_ids running or waiting (what a stop that ran out of time leaves).
    pub fn in_flight_ids(&self) -> Vec<String> {
        // Ledger keys are `<workspace> NUL <request_id>`: shown as `<workspace>/<request_id>`.
        self.lock_ledger()
            .running_ids()
            .into_iter()
            .map(|id| id.replace('\0', "/"))
            .collect()
    }

    fn lock_ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reject(&self, request_id: &str, action: &str, error: Record, reply: Option<ReplyTo>) {
        tracing::warn!(request_id, code = %error.code, message = %error.message, "request refused");
        let now = time::now();
        let result = OpsResult::failure(request_id, action, WorkspaceRef::default(), now, error);
        let _ = self.out.send(Outbound::Result {
            to: reply.into_iter().collect(),
            workspace: None,
            result: Arc::new(result),
            trace: Arc::default(),
            last_sequence: None,
        });
    }

    fn enqueue(self: &Arc<Self>, key: LaneKey, slot: Slot) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        let lane = lanes.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let depth = Arc::new(AtomicUsize::new(0));
            let engine = self.clone();
            let lane_depth = depth.clone();
            self.tracker
                .spawn(async move { engine.lane_loop(key, rx, lane_depth).await });
            Lane { tx, depth }
        });
        let position = lane.depth.fetch_add(1, Ordering::SeqCst);
        if let Some(job) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            job.progress.info(
                EventType::RequestQueued,
                if position == 0 {
                    "Request is next in its workspace lane.".to_string()
                } else {
                    format!("Request waits behind {position} in its workspace lane.")
                },
                payload! {"lane" => lane_name(&job.plan), "position" => position},
            );
        }
        if let Err(err) = lane.tx.send(slot) {
            // The lane task is gone (shutdown): answer rather than lose the request.
            lane.depth.fetch_sub(1, Ordering::SeqCst);
            let job = err.0.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(job) = job {
                let engine = self.clone();
                self.tracker.spawn(async move { engine.run(job).await });
            }
        }
    }

    /// Answers a request a `cancel` took out of its lane: it never ran.
    fn answer_withdrawn(&self, job: Job, reason: &str) {
        let span = job.span.clone();
        let _entered = span.enter();
        job.progress.emit(
            EventType::RequestCancelled,
            Severity::Warning,
            "Request cancelled while it waited in its lane; it did not run.",
            payload! {"reason" => reason, "state" => "waiting"},
        );
        let result = cancelled_result(&job, reason);
        self.complete(job, result);
    }

    async fn lane_loop(
        self: Arc<Self>,
        key: LaneKey,
        mut rx: UnboundedReceiver<Slot>,
        depth: Arc<AtomicUsize>,
    ) {
        while let Some(slot) = rx.recv().await {
            let job = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            let Some(job) = job else {
                // Cancelled while it waited: already answered.
                depth.fetch_sub(1, Ordering::SeqCst);
                continue;
            };
            let guard = match &key {
                LaneKey::Workspace(root) => {
                    lock_workspace(root, &job.progress, &job.ticket.token).await
                }
                LaneKey::Sessions => None,
            };
            self.run(job).await;
            drop(guard);
            depth.fetch_sub(1, Ordering::SeqCst);
        }
    }

    async fn run(&self, job: Job) {
        let span = job.span.clone();
        async {
            let ticket = job.ticket.clone();
            self.service.cancels.started(&ticket);
            // A cancelled request taken over from a worker that is gone still runs its
            // handler when it cleans up after itself: it stops what the owner started.
            let cleanup = job.plan.action.cancels_itself() && job.hints.resume.is_some();
            let result = if ticket.token.is_cancelled() && !cleanup {
                None
            } else {
                job.progress.info(
                    EventType::RequestStarted,
                    "Request started.",
                    payload! {"action" => job.request.action},
                );
                let started_at = time::now();
                let execution = self.service.execute(
                    &job.request,
                    &job.plan,
                    started_at,
                    &job.progress,
                    job.hints.resume.as_ref(),
                    &ticket.token,
                );
                if job.plan.action.cancels_itself() {
                    Some(execution.await)
                } else {
                    // Reads and control commands have nothing to clean up: dropping the
                    // future kills their `millrace` child.
                    tokio::select! {
                        result = execution => Some(result),
                        () = ticket.token.cancelled() => None,
                    }
                }
            };
            let result = match result {
                Some(result) => result,
                None => {
                    let reason = self
                        .service
                        .cancels
                        .reason(&ticket)
                        .unwrap_or_else(|| ErrorCode::Cancelled.as_str().to_string());
                    job.progress.emit(
                        EventType::RequestCancelled,
                        Severity::Warning,
                        "Request cancelled; it was stopped.",
                        payload! {"reason" => reason, "state" => "running"},
                    );
                    cancelled_result(&job, &reason)
                }
            };
            self.complete(job, result);
        }
        .instrument(span)
        .await;
    }

    /// Ends a request: its `request.finished` frame, its result to every waiter.
    fn complete(&self, job: Job, result: OpsResult) {
        let Job {
            key,
            plan,
            progress,
            ticket,
            ..
        } = job;
        let status = result.status.as_str();
        let current = tracing::Span::current();
        current.record("status", status);
        if let Some(route) = &result.route {
            current.record("route", route.as_str());
        }
        let outcome = result.completion.as_ref().map(|c| c.outcome.clone());
        if let Some(outcome) = &outcome {
            current.record("outcome", outcome.as_str());
        }
        let code = result.errors.first().map(|e| e.code.clone());
        if code.as_deref() == Some(cancel::CANCELLED.as_str())
            && plan.action.cancels_itself()
            && ticket.token.is_cancelled()
        {
            // A handler that stopped itself: its own frames said how; this one says that.
            progress.emit(
                EventType::RequestCancelled,
                Severity::Warning,
                "Request cancelled; its work was stopped.",
                payload! {"reason" => self.service.cancels.reason(&ticket), "state" => "running"},
            );
        }
        let severity = if result.errors.is_empty() {
            Severity::Info
        } else {
            Severity::Error
        };
        let last = progress.emit(
            EventType::RequestFinished,
            severity,
            format!("Request finished: {status}."),
            payload! {"status" => status, "outcome" => outcome},
        );
        let mut result = result;
        // The sequence of the request's last frame: an adapter that replays the frames
        // from the bus later resumes from it. In-process (`ops --transport local`) no
        // frame is kept anywhere, and the result stays the reference's.
        if self.service.serving == Serving::Registered {
            result.event_cursor = Some(last.to_string());
        }
        // Only a request that changed something is remembered after it finished.
        let keep = plan.action.is_mutating();
        let to = self.lock_ledger().finish(&key, &result, keep);
        let result = Arc::new(result);
        let _ = self.out.send(Outbound::Result {
            to,
            workspace: plan.workspace_id.clone(),
            result: result.clone(),
            trace: progress.trace(),
            last_sequence: Some(last),
        });
        self.service
            .cancels
            .finish(&ticket, result.status.as_str(), code.as_deref());
    }
}

/// The final result of a request stopped by a `cancel`.
fn cancelled_result(job: &Job, reason: &str) -> OpsResult {
    OpsResult::failure(
        &job.request.request_id,
        &job.request.action,
        job.plan
            .resolution
            .workspace_ref(&job.request.workspace_ref),
        time::now(),
        cancel::cancelled_record(reason),
    )
}

fn lane_name(plan: &Plan) -> String {
    match &plan.lane {
        Some(LaneKey::Sessions) => "sessions".to_string(),
        Some(LaneKey::Workspace(root)) => plan
            .workspace_id
            .clone()
            .unwrap_or_else(|| root.display().to_string()),
        None => String::new(),
    }
}

/// The cross-process half of a workspace lane: an exclusive lock on
/// `<root>/.millracer/lane.lock`, so two workers (or a worker and an in-process bridge)
/// on one host never change one workspace at the same time. Polled, so no thread is tied
/// up while another process holds it. A workspace that does not exist has nothing to lock.
async fn lock_workspace(
    root: &std::path::Path,
    progress: &Progress,
    cancelled: &tokio_util::sync::CancellationToken,
) -> Option<std::fs::File> {
    if !root.is_dir() {
        return None;
    }
    let dir: PathBuf = root.join(".millracer");
    if let Err(err) = std::fs::create_dir_all(&dir) {
        tracing::warn!(dir = %dir.display(), %err, "cannot create lock directory; running without the cross-process lock");
        return None;
    }
    let path = dir.join("lane.lock");
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(file) => file,
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "cannot open lane lock; running without it");
            return None;
        }
    };
    let mut announced = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Some(file),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(err)) => {
                tracing::warn!(path = %path.display(), %err, "lane lock failed; running without it");
                return None;
            }
        }
        if cancelled.is_cancelled() {
            return None;
        }
        if !announced {
            announced = true;
            progress.info(
                EventType::RequestWaiting,
                "Another process is changing this workspace; waiting for its lock.",
                payload! {"lock" => path.display().to_string()},
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
