//! `enqueue`: delegated work on the real runtime (see [`crate::delegation`]).
//!
//! Route `millrace` delegates; route `auto` without a pi runner delegates with the
//! reference's deterministic intake fallback; route `direct` needs a pi runner, which
//! this build does not drive, and is refused clearly. The mode is the request's, else the
//! workspace's default, else `--millrace-mode` (the reference silently forces
//! `default_pi`). The result is shaped as the reference shapes it.

use serde_json::{Map, Value, json};

use super::Context;
use crate::contract::{Completion, OpsResult, Record, ResultStatus};
use crate::delegation::{self, DelegationError, Outcome};
use crate::intake::{self, IntakeDecision, IntakeKind};
use crate::runtime::command_cwd;
use crate::subjects;

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

pub async fn run(cx: Context<'_>) -> OpsResult {
    let Some(task) = task_text(&cx.request.input) else {
        return cx.failure(Record::error(
            "invalid_input",
            "enqueue requires input.text or input.payload.task.",
        ));
    };
    let Some(root) = cx.resolution.root.clone() else {
        return cx.failure(Record::error(
            "workspace_unresolved",
            "Unable to resolve Millrace workspace.",
        ));
    };
    let route = match cx.request.route_preference.as_str() {
        r @ ("auto" | "direct" | "millrace") => r,
        _ => "auto",
    };
    if route == "direct" {
        return cx.failure(
            Record::error(
                "runner_unavailable",
                "enqueue with route direct needs a pi runner, and this process has none configured.",
            )
            .suggest("Use route_preference millrace (or auto) to delegate to the Millrace runtime."),
        );
    }
    let forced = IntakeKind::parse(&cx.request.intake_preference);
    let decision = intake::choose(&task, forced, None);
    let settings = &cx.service.settings;
    let mode = cx
        .resolution
        .mode
        .clone()
        .unwrap_or_else(|| settings.millrace_mode.clone());
    let cwd = command_cwd(settings.cwd.as_deref(), &root);
    let plan = delegation::Plan {
        millrace: &cx.service.millrace,
        workspace: &root,
        cwd: &cwd,
        mode: &mode,
        task: &task,
        kind: decision.kind,
        scoped: cx.request.scoped_work_item.as_ref(),
        daemon_timeout: settings.daemon_timeout,
        max_restarts: settings.max_daemon_restarts,
        keep_daemon: settings.keep_daemon,
        log_name: subjects::token(&cx.request.request_id),
        resume: cx.resume,
    };
    let outcome = delegation::run(&plan, cx.progress).await;
    if let Some(cache) = &cx.service.status_cache {
        cache.invalidate(&root);
    }
    match outcome {
        Ok(outcome) => shape(&cx, route, &task, &mode, &decision, outcome),
        Err(err) => delegation_failure(&cx, &err),
    }
}

fn delegation_failure(cx: &Context<'_>, err: &DelegationError) -> OpsResult {
    let mut record = Record::error(err.code(), err.to_string());
    if matches!(err, DelegationError::Timeout(_)) {
        record =
            record.suggest("Raise --daemon-timeout-seconds, or inspect the workspace with status.");
    }
    cx.failure(record)
}

/// The reference's result for a delegated run, from our outcome.
fn shape(
    cx: &Context<'_>,
    route: &str,
    task: &str,
    mode: &str,
    decision: &IntakeDecision,
    outcome: Outcome,
) -> OpsResult {
    let status = match outcome.outcome.as_str() {
        "completed" if outcome.scoped_completion => ResultStatus::Succeeded,
        "blocked" => ResultStatus::Blocked,
        "incomplete" => ResultStatus::Incomplete,
        _ => ResultStatus::Failed,
    };
    let output = summary(&outcome);
    let event = json!({
        "kind": outcome.event.kind,
        "workspace": cx.resolution.root.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "reason": outcome.event.reason,
    });
    let task_path = delegation::task_path(&outcome).map(|p| p.display().to_string());
    let status_value = outcome.status.clone().map_or(Value::Null, Value::Object);
    let mut result = OpsResult::new(
        &cx.request.request_id,
        &cx.request.action,
        status,
        cx.resolution.workspace_ref(&cx.request.workspace_ref),
        cx.started_at.clone(),
    );
    result.result = json_object(json!({
        "task": task,
        "output": output,
        "event": event,
        "task_path": task_path,
        "status": status_value,
        "work_items": outcome.work_items,
    }));
    result.route = Some("millrace".to_string());
    result.intake_kind = Some(decision.kind.as_str().to_string());
    result.scoped_work_item = cx.request.scoped_work_item.clone();
    result.warnings = outcome
        .warnings
        .iter()
        .map(|w| Record::warning("runtime_warning", w.clone()))
        .collect();
    result.evidence_refs = outcome
        .evidence
        .iter()
        .filter_map(|e| e.get("source").and_then(Value::as_str).map(str::to_string))
        .collect();
    result.evidence_refs.dedup();
    result.completion = Some(Completion {
        outcome: outcome.outcome.clone(),
        scoped_completion: outcome.scoped_completion,
        evidence_summary: outcome.evidence.clone(),
        missing_evidence: if outcome.scoped_completion {
            Vec::new()
        } else {
            vec!["positive scoped completion evidence".to_string()]
        },
        verification_status: if outcome.scoped_completion {
            "verified"
        } else {
            "unverified"
        }
        .to_string(),
        terminal_outcome_ref: None,
    });
    let why = if route == "millrace" {
        "route forced by --route millrace".to_string()
    } else {
        "no pi runner configured: delegated with the deterministic intake fallback".to_string()
    };
    result.raw_compat = Some(json_object(json!({
        "route": "millrace",
        "intake_kind": decision.kind.as_str(),
        "intake_signals": decision.signals,
        "decision": {
            "route": "millrace",
            "intake_kind": Value::Null,
            "why": why,
            "mode": mode,
            "custom_loop_needed": false,
            "signals": decision.signals,
            "notes": Value::Null,
        },
        "output": result.result.get("output").cloned().unwrap_or(Value::Null),
        "event": event,
        "task_path": task_path,
        "status": status_value,
        "warnings": outcome.warnings,
        "outcome": outcome.outcome,
        "scoped_completion": outcome.scoped_completion,
        "completion_evidence": outcome.evidence,
        "scoped_work_item": cx.request.scoped_work_item,
        "progress_events": Vec::<Value>::new(),
    })));
    result
}

fn json_object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The final answer when no pi runner writes one: what happened, from the records.
pub fn summary(outcome: &Outcome) -> String {
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
    match outcome.outcome.as_str() {
        "completed" => format!("Millrace completed {item}. {ran}{proof}"),
        "blocked" => format!(
            "Millrace blocked {item}: {}. {ran}{proof}",
            outcome.event.reason
        ),
        "incomplete" => format!(
            "Millrace did not run {item}: {}. {ran}",
            outcome.event.reason
        ),
        other => format!(
            "Millrace did not finish {item} ({other}: {}). {ran}",
            outcome.event.reason
        ),
    }
}
