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
use crate::actions::dispatch::{LaneKey, Plan, Service};
use crate::contract::progress::Progress;
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
}

struct Job {
    request: OpsRequest,
    /// The ledger key: the bound workspace and the request_id.
    key: String,
    plan: Plan,
    hints: SubmitHints,
    progress: Progress,
    span: tracing::Span,
}

struct Lane {
    tx: UnboundedSender<Job>,
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
                "request_too_large",
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
                let error = Record::error("invalid_request", err.to_string()).suggest(
                    "Send a millracer.ops.v0.2 OpsRequest (see contracts/ops-request.schema.json).",
                );
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
                });
                return;
            }
            Admission::New => {}
        }
        let plan = self.service.plan(&request);
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
        // `workspace_id` only when one was resolved: the frame schema has it optional and a
        // string, never null.
        let mut accepted = payload! {"action" => request.action};
        if let Some(id) = &plan.workspace_id {
            accepted.insert("workspace_id".to_string(), serde_json::json!(id));
        }
        progress.info("request.accepted", "Request accepted.", accepted);
        let job = Job {
            request,
            key,
            plan,
            hints,
            progress,
            span,
        };
        match job.plan.lane.clone() {
            Some(key) => self.enqueue(key, job),
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
        });
    }

    fn enqueue(self: &Arc<Self>, key: LaneKey, job: Job) {
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
        job.progress.info(
            "request.queued",
            if position == 0 {
                "Request is next in its workspace lane.".to_string()
            } else {
                format!("Request waits behind {position} in its workspace lane.")
            },
            payload! {"lane" => lane_name(&job.plan), "position" => position},
        );
        if let Err(err) = lane.tx.send(job) {
            // The lane task is gone (shutdown): answer rather than lose the request.
            lane.depth.fetch_sub(1, Ordering::SeqCst);
            let job = err.0;
            let engine = self.clone();
            self.tracker.spawn(async move { engine.run(job).await });
        }
    }

    async fn lane_loop(
        self: Arc<Self>,
        key: LaneKey,
        mut rx: UnboundedReceiver<Job>,
        depth: Arc<AtomicUsize>,
    ) {
        while let Some(job) = rx.recv().await {
            let guard = match &key {
                LaneKey::Workspace(root) => lock_workspace(root, &job.progress).await,
                LaneKey::Sessions => None,
            };
            self.run(job).await;
            drop(guard);
            depth.fetch_sub(1, Ordering::SeqCst);
        }
    }

    async fn run(&self, job: Job) {
        let Job {
            request,
            key,
            plan,
            hints,
            progress,
            span,
        } = job;
        async {
            progress.info(
                "request.started",
                "Request started.",
                payload! {"action" => request.action},
            );
            let started_at = time::now();
            let result = self
                .service
                .execute(
                    &request,
                    &plan,
                    started_at,
                    &progress,
                    hints.resume.as_ref(),
                )
                .await;
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
            let severity = if result.errors.is_empty() {
                "info"
            } else {
                "error"
            };
            progress.emit(
                "request.finished",
                severity,
                format!("Request finished: {status}."),
                payload! {"status" => status, "outcome" => outcome},
            );
            let result = Arc::new(result);
            let to = self.lock_ledger().finish(&key, result.clone());
            let _ = self.out.send(Outbound::Result {
                to,
                workspace: plan.workspace_id.clone(),
                result,
                trace: progress.trace(),
            });
        }
        .instrument(span)
        .await;
    }
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
async fn lock_workspace(root: &std::path::Path, progress: &Progress) -> Option<std::fs::File> {
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
        if !announced {
            announced = true;
            progress.info(
                "request.waiting",
                "Another process is changing this workspace; waiting for its lock.",
                payload! {"lock" => path.display().to_string()},
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
