//! `enqueue`: a task, direct or delegated to the real runtime (see [`crate::millrace::delegation`]).
//!
//! With a pi runner (a worker started with `--pi-runner`, or the in-process bridge), the
//! route is the reference's natural-language route ([`crate::agent::runner`]): `auto` asks pi for
//! the decision, `direct` has pi do the work, a delegated run sends pi progress notes and
//! ends with pi's final answer. Without one, route `millrace` (and `auto`, with the
//! reference's deterministic intake fallback) delegates and the answer is Millracer's
//! summary of the runtime's records; `direct` is refused (`runner_unavailable`).
//!
//! A caller that is itself the outer agent (`millracer run`/`operator`, which hold their
//! own pi conversation) says so with `options.outer_agent = "caller"`: then this process
//! runs no pi turn for the request, as if it had no runner.
//!
//! The mode is the one pi named, else the request's, else the workspace's default, else
//! `--millrace-mode` (the reference silently forces `default_pi`). The result has the
//! reference's shape (`_ops_result_from_run_result`), with one defect fixed: a successful
//! direct route is `succeeded` (the reference reports it `failed` with no error).

use std::path::Path;

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::Context;
use crate::agent::decision::Decision;
use crate::agent::legacy::{LegacyEvent, RunResult};
use crate::agent::runner::{self, AgentError, Delegate, Delegated, Job};
use crate::contract::progress::Tap;
use crate::contract::token;
use crate::contract::vocab::ErrorCode;
use crate::contract::vocab::Outcome;
use crate::contract::vocab::Route;
use crate::contract::vocab::{EventType, Severity};
use crate::contract::{Completion, OpsResult, Record, ResultStatus};
use crate::millrace::command::command_cwd;
use crate::millrace::delegation::{self, DelegationError, Report};
use crate::millrace::intake::{self, IntakeKind};

/// The reference's `_task_text`: `input.text`, else `input.payload.task` (or `.text`).
pub fn task_text(input: &Map<String, Value>) -> Option<String> {
    if let Some(Value::String(text)) = input.get("text")
        && !text.trim().is_empty()
    {
        return Some(text.trim().to_string());
    }
    let Some(Value::Object(nested)) = input.get("payload") else {
        return None;
    };
    let task = match nested.get("task") {
        Some(v) if crate::contract::request::is_truthy(v) => Some(v),
        _ => nested.get("text"),
    };
    match task {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    }
}

/// `options.outer_agent`: who holds the pi conversation for this request.
pub const OUTER_AGENT_OPTION: &str = "outer_agent";

pub async fn run(cx: Context<'_>) -> OpsResult {
    let Some(task) = task_text(&cx.request.input) else {
        return cx.failure(Record::error(
            ErrorCode::InvalidInput,
            "enqueue requires input.text or input.payload.task.",
        ));
    };
    let Some(root) = cx.resolution.root.clone() else {
        return cx.failure(Record::error(
            ErrorCode::WorkspaceUnresolved,
            "Unable to resolve Millrace workspace.",
        ));
    };
    let route = match Route::parse(&cx.request.route_preference) {
        Some(r @ (Route::Direct | Route::Millrace)) => r,
        _ => Route::Auto,
    };
    let caller_is_agent = cx
        .request
        .options
        .get(OUTER_AGENT_OPTION)
        .and_then(Value::as_str)
        == Some("caller");
    // A request cancelled before it started (taken over from a worker that is gone) only
    // cleans up: no pi turn.
    let pi = cx
        .service
        .pi
        .as_ref()
        .filter(|_| !caller_is_agent && !cx.cancel.is_cancelled());
    let settings = &cx.service.settings;
    let mode = cx
        .resolution
        .mode
        .clone()
        .unwrap_or_else(|| settings.millrace_mode.clone());
    let cwd = command_cwd(settings.cwd.as_deref(), &root);
    let forced = IntakeKind::parse(&cx.request.intake_preference);
    let delegate = InProcess {
        cx: &cx,
        root: &root,
        cwd: &cwd,
        mode: &mode,
    };

    let Some(runner) = pi else {
        if route == Route::Direct {
            return cx.failure(
                Record::error(
                    ErrorCode::RunnerUnavailable,
                    "enqueue with route direct needs a pi runner, and this process has none configured.",
                )
                .suggest("Use route_preference millrace (or auto) to delegate to the Millrace runtime, or start the worker with --pi-runner."),
            );
        }
        return without_pi(&cx, &task, route, forced, &mode, delegate).await;
    };
    let session = runner.session(&cwd);
    let options = runner::Options {
        workspace: &root,
        route,
        intake: forced,
        scoped: cx.request.scoped_work_item.as_ref(),
        notify: settings.notify_terminal_stages,
    };
    let delegating = std::sync::atomic::AtomicBool::new(false);
    let delegate = Flagged {
        inner: delegate,
        delegating: &delegating,
    };
    let mut running = Box::pin(runner::run(&session, &task, &options, delegate));
    // A cancel during a pi turn abandons the turn (closing the session ends its pi
    // process); during delegation the delegated run stops itself and returns.
    let outcome = loop {
        tokio::select! {
            outcome = &mut running => break Some(outcome),
            () = cx.cancel.cancelled(), if !delegating.load(std::sync::atomic::Ordering::SeqCst) => break None,
            () = tokio::time::sleep(std::time::Duration::from_millis(200)), if cx.cancel.is_cancelled() => {}
        }
    };
    // An abandoned turn still holds the session's process: let go of it first.
    drop(running);
    if outcome.is_none() {
        session.abort().await;
    }
    session.close().await;
    match outcome {
        Some(Ok(run)) => ops_result(&cx, &task, &run),
        Some(Err(err)) => cx.failure(err.record()),
        None => {
            cx.progress.emit(
                EventType::AgentAborted,
                Severity::Warning,
                "The pi turn was abandoned and its process closed: the request was cancelled.",
                crate::payload! {},
            );
            cx.failure(super::cancel::cancelled_record("the pi turn was stopped"))
        }
    }
}

/// Delegation with the deterministic intake fallback; the answer is the summary.
async fn without_pi(
    cx: &Context<'_>,
    task: &str,
    route: Route,
    forced: Option<IntakeKind>,
    mode: &str,
    delegate: InProcess<'_, '_>,
) -> OpsResult {
    let intake = intake::choose(task, forced, None);
    let mut decision = Decision::forced(Route::Millrace);
    decision.mode = mode.to_string();
    if route != Route::Millrace {
        decision.why = "no pi runner: delegated with the deterministic intake fallback".to_string();
    }
    let job = Job {
        task,
        kind: intake.kind,
        mode: None,
        scoped: cx.request.scoped_work_item.as_ref(),
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let delegated = match delegate.delegate(job, tx).await {
        Ok(delegated) => delegated,
        Err(err) => return cx.failure(err.record()),
    };
    let run = RunResult {
        route: Route::Millrace,
        decision,
        output: delegated.summary.clone(),
        intake_kind: intake.kind,
        intake_signals: intake.signals,
        event: Some(delegated.event),
        task_path: delegated.task_path,
        status: delegated.status,
        warnings: delegated.warnings,
        scoped_work_item: cx.request.scoped_work_item.clone(),
        progress_events: Vec::new(),
        outcome: delegated.outcome,
        scoped_completion: delegated.scoped_completion,
        completion_evidence: delegated.evidence,
        work_items: Some(delegated.work_items),
        evidence_refs: delegated.evidence_refs,
    };
    ops_result(cx, task, &run)
}

/// Marks the time a delegated run is under way: a cancel then lets it stop itself.
struct Flagged<'a, D> {
    inner: D,
    delegating: &'a std::sync::atomic::AtomicBool,
}

impl<D: Delegate + Send> Delegate for Flagged<'_, D> {
    async fn delegate(
        self,
        job: Job<'_>,
        notes: mpsc::UnboundedSender<LegacyEvent>,
    ) -> Result<Delegated, AgentError> {
        let Self { inner, delegating } = self;
        delegating.store(true, std::sync::atomic::Ordering::SeqCst);
        let out = inner.delegate(job, notes).await;
        delegating.store(false, std::sync::atomic::Ordering::SeqCst);
        out
    }
}

/// Delegation inside this process: [`delegation::run`] with this request's frames, whose
/// meaningful stage events also become progress notes.
struct InProcess<'a, 'b> {
    cx: &'a Context<'b>,
    root: &'a Path,
    cwd: &'a Path,
    mode: &'a str,
}

impl Delegate for InProcess<'_, '_> {
    async fn delegate(
        self,
        job: Job<'_>,
        notes: mpsc::UnboundedSender<LegacyEvent>,
    ) -> Result<Delegated, AgentError> {
        let mode = job.mode.unwrap_or(self.mode);
        let settings = &self.cx.service.settings;
        let plan = delegation::Plan {
            millrace: &self.cx.service.millrace,
            workspace: self.root,
            cwd: self.cwd,
            mode,
            task: job.task,
            kind: job.kind,
            scoped: job.scoped,
            daemon_timeout: settings.daemon_timeout,
            max_restarts: settings.max_daemon_restarts,
            keep_daemon: settings.keep_daemon,
            log_name: token::token(&self.cx.request.request_id),
            resume: self.cx.resume,
            cancel: Some(self.cx.cancel),
        };
        let workspace = self.root.display().to_string();
        let progress = self.cx.progress;
        progress.set_tap(Tap::new(move |frame| {
            if let Some(note) = runner::progress_note(frame, &workspace) {
                let _ = notes.send(note);
            }
        }));
        let outcome = delegation::run(&plan, progress).await;
        // Dropping the tap drops the notes sender: the agent's note loop ends.
        progress.clear_tap();
        if let Some(cache) = &self.cx.service.status_cache {
            cache.invalidate(self.root);
        }
        match outcome {
            Ok(outcome) => Ok(delegated(self.root, outcome)),
            Err(err) => Err(AgentError::delegation(delegation_record(&err))),
        }
    }
}

fn delegation_record(err: &DelegationError) -> Record {
    let record = Record::error(err.code(), err.to_string());
    if matches!(err, DelegationError::Timeout(_)) {
        record.suggest("Raise --daemon-timeout-seconds, or inspect the workspace with status.")
    } else {
        record
    }
}

/// Our outcome in the agent's terms.
fn delegated(root: &Path, outcome: Report) -> Delegated {
    let mut evidence_refs: Vec<String> = outcome
        .evidence
        .iter()
        .filter_map(|e| e.get("source").and_then(Value::as_str).map(str::to_string))
        .collect();
    evidence_refs.dedup();
    Delegated {
        summary: summary(&outcome),
        event: LegacyEvent {
            kind: outcome.event.kind.clone(),
            workspace: root.display().to_string(),
            reason: outcome.event.reason.clone(),
        },
        task_path: delegation::task_path(&outcome).map(|p| p.display().to_string()),
        outcome: outcome.outcome,
        scoped_completion: outcome.scoped_completion,
        status: outcome.status,
        evidence: outcome.evidence,
        warnings: outcome.warnings,
        work_items: outcome.work_items,
        evidence_refs,
    }
}

/// The reference's `_status_for_outcome`, with a successful direct route `succeeded`.
fn status_for(run: &RunResult) -> ResultStatus {
    match run.outcome {
        Outcome::Completed if run.route == Route::Direct || run.scoped_completion => {
            ResultStatus::Succeeded
        }
        Outcome::Blocked => ResultStatus::Blocked,
        Outcome::Incomplete => ResultStatus::Incomplete,
        _ => ResultStatus::Failed,
    }
}

/// The reference's `_ops_result_from_run_result`.
pub fn ops_result(cx: &Context<'_>, task: &str, run: &RunResult) -> OpsResult {
    let mut result = OpsResult::new(
        &cx.request.request_id,
        &cx.request.action,
        status_for(run),
        cx.resolution.workspace_ref(&cx.request.workspace_ref),
        cx.started_at.clone(),
    );
    let mut body = json!({
        "task": task,
        "output": run.output,
        "event": run.event.as_ref().map(LegacyEvent::to_json),
        "task_path": run.task_path,
        "status": run.status,
    });
    if let (Some(items), Some(map)) = (&run.work_items, body.as_object_mut()) {
        map.insert("work_items".to_string(), json!(items));
    }
    result.result = match body {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    result.route = Some(run.route.as_str().to_string());
    result.intake_kind = Some(run.intake_kind.as_str().to_string());
    result.scoped_work_item = run
        .scoped_work_item
        .clone()
        .or_else(|| cx.request.scoped_work_item.clone());
    result.warnings = run
        .warnings
        .iter()
        .map(|w| Record::warning(ErrorCode::RuntimeWarning, w.clone()))
        .collect();
    result.evidence_refs = run.evidence_refs.clone();
    result.completion = Some(Completion {
        outcome: run.outcome.as_str().to_string(),
        scoped_completion: run.scoped_completion,
        evidence_summary: run.completion_evidence.clone(),
        missing_evidence: if run.scoped_completion {
            Vec::new()
        } else {
            vec!["positive scoped completion evidence".to_string()]
        },
        verification_status: if run.scoped_completion {
            "verified"
        } else {
            "unverified"
        }
        .to_string(),
        terminal_outcome_ref: None,
    });
    if let Value::Object(map) = run.to_json() {
        result.raw_compat = Some(map);
    }
    result
}

/// The final answer when no pi runner writes one: what happened, from the records.
pub fn summary(outcome: &Report) -> String {
    let item = outcome.document.as_ref().map_or_else(
        || "the work item".to_string(),
        |d| format!("{} {}", d.kind.as_str(), d.id),
    );
    let stages: Vec<String> = outcome
        .stages
        .iter()
        .map(|s| {
            format!(
                "{} ({})",
                s.stage,
                s.terminal_result.as_deref().unwrap_or("?")
            )
        })
        .collect();
    let ran = if stages.is_empty() {
        "No stage ran.".to_string()
    } else {
        format!("Stages: {}.", stages.join(", "))
    };
    let evidence: Vec<&str> = outcome
        .evidence
        .iter()
        .filter_map(|e| e.get("source").and_then(Value::as_str))
        .collect();
    let proof = if evidence.is_empty() {
        String::new()
    } else {
        format!(" Evidence: {}.", evidence.join(", "))
    };
    match outcome.outcome {
        Outcome::Completed => format!("Millrace completed {item}. {ran}{proof}"),
        Outcome::Blocked => format!(
            "Millrace blocked {item}: {}. {ran}{proof}",
            outcome.event.reason
        ),
        Outcome::Incomplete => format!(
            "Millrace did not run {item}: {}. {ran}",
            outcome.event.reason
        ),
        other => format!(
            "Millrace did not finish {item} ({other}: {}). {ran}",
            outcome.event.reason
        ),
    }
}
