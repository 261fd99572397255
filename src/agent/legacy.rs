//! The reference's legacy JSON boundary: `run --benchmark-json` requests in, and the
//! `RunResult` document out (`run --output json`, and `raw_compat` of an enqueue result).

use std::path::PathBuf;

use serde_json::{Map, Value, json};

use crate::agent::decision::Decision;
use crate::contract::pyjson::{self, py_str};
use crate::contract::request::is_truthy;
use crate::contract::vocab::Outcome;
use crate::contract::vocab::Route;
use crate::contract::{ScopedWorkItem, object_or_empty};
use crate::millrace::intake::IntakeKind;

/// Why a legacy request was refused. The texts are the reference's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacyError {
    /// Not JSON: Python's decoder message for the same input.
    #[error("{0}")]
    InvalidJson(String),
    #[error("external request must be a JSON object")]
    NotAnObject,
    #[error("external request requires a non-empty task, prompt, or instructions field")]
    NoTask,
}

/// One legacy request.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchmarkRequest {
    /// As given (not stripped, as in the reference; intake rendering strips).
    pub task: String,
    pub workspace: Option<PathBuf>,
    pub intake_kind: Option<IntakeKind>,
    pub scoped_work_item: Option<ScopedWorkItem>,
    pub metadata: Map<String, Value>,
}

/// Python's `a or b or c`: the first truthy value, else the last one looked at.
fn first_truthy<'a>(values: &[Option<&'a Value>]) -> Option<&'a Value> {
    let mut last = None;
    for value in values {
        last = *value;
        if value.is_some_and(is_truthy) {
            return *value;
        }
    }
    last
}

/// The reference's `parse_benchmark_request`, with every alias it accepts: the task from
/// `task`, `prompt` or `instructions`; the scoped item from `scoped_work_item`,
/// `work_item`, `scope` or `metadata.scoped_work_item`; the intake kind from
/// `intake_kind` or `metadata.intake_kind`.
pub fn parse_benchmark_request(raw: &str) -> Result<BenchmarkRequest, LegacyError> {
    let payload: Value = match serde_json::from_str(raw) {
        Ok(value) => value,
        Err(err) => {
            return Err(LegacyError::InvalidJson(
                pyjson::decode_error(raw).unwrap_or_else(|| err.to_string()),
            ));
        }
    };
    let map = payload.as_object().ok_or(LegacyError::NotAnObject)?;
    let task = match first_truthy(&[map.get("task"), map.get("prompt"), map.get("instructions")]) {
        Some(Value::String(task)) if !task.trim().is_empty() => task.clone(),
        _ => return Err(LegacyError::NoTask),
    };
    let workspace = match map.get("workspace") {
        Some(Value::String(ws)) if !ws.is_empty() => Some(PathBuf::from(ws)),
        _ => None,
    };
    let metadata = object_or_empty(map.get("metadata"));
    let scoped = first_truthy(&[
        map.get("scoped_work_item"),
        map.get("work_item"),
        map.get("scope"),
        metadata.get("scoped_work_item"),
    ]);
    let intake = first_truthy(&[map.get("intake_kind"), metadata.get("intake_kind")])
        .filter(|v| is_truthy(v))
        .and_then(|v| IntakeKind::parse(&py_str(v)));
    Ok(BenchmarkRequest {
        task,
        workspace,
        intake_kind: intake,
        scoped_work_item: ScopedWorkItem::from_value(scoped),
        metadata,
    })
}

/// An event as the legacy document shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyEvent {
    pub kind: String,
    pub workspace: String,
    pub reason: String,
}

impl LegacyEvent {
    pub fn to_json(&self) -> Value {
        json!({"kind": self.kind, "workspace": self.workspace, "reason": self.reason})
    }
}

/// How one task ended: the reference's `RunResult`, plus what the ops result adds.
#[derive(Debug, Clone, PartialEq)]
pub struct RunResult {
    /// `direct` or `millrace`.
    pub route: Route,
    pub decision: Decision,
    /// The final answer.
    pub output: String,
    pub intake_kind: IntakeKind,
    pub intake_signals: Vec<String>,
    pub event: Option<LegacyEvent>,
    pub task_path: Option<String>,
    pub status: Option<Map<String, Value>>,
    pub warnings: Vec<String>,
    pub scoped_work_item: Option<ScopedWorkItem>,
    pub progress_events: Vec<LegacyEvent>,
    /// `completed`, `blocked`, `incomplete`, `crashed` or `restart_needed`.
    pub outcome: Outcome,
    pub scoped_completion: bool,
    pub completion_evidence: Vec<Map<String, Value>>,
    /// Not in the legacy document: the runtime work items of a delegated run.
    pub work_items: Option<Vec<String>>,
    /// Not in the legacy document: where the completion evidence lives.
    pub evidence_refs: Vec<String>,
}

impl RunResult {
    /// The reference's `RunResult.to_jsonable()`.
    pub fn to_json(&self) -> Value {
        let signals = if self.decision.signals.is_empty() {
            &self.intake_signals
        } else {
            &self.decision.signals
        };
        json!({
            "route": self.route,
            "intake_kind": self.intake_kind.as_str(),
            "intake_signals": self.intake_signals,
            "decision": {
                "route": self.decision.route,
                "intake_kind": self.decision.intake_kind.map(IntakeKind::as_str),
                "why": self.decision.why,
                "mode": self.decision.mode,
                "custom_loop_needed": self.decision.custom_loop_needed,
                "signals": signals,
                "notes": self.decision.notes,
            },
            "output": self.output,
            "event": self.event.as_ref().map(LegacyEvent::to_json),
            "task_path": self.task_path,
            "status": self.status,
            "warnings": self.warnings,
            "outcome": self.outcome,
            "scoped_completion": self.scoped_completion,
            "completion_evidence": self.completion_evidence,
            "scoped_work_item": self.scoped_work_item,
            "progress_events": self.progress_events.iter().map(LegacyEvent::to_json).collect::<Vec<_>>(),
        })
    }

    /// `run --output json`: `json.dumps(…, indent=2, sort_keys=True)`.
    pub fn to_pretty_json(&self) -> String {
        pyjson::to_pretty(&self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_errors_follow_the_reference() {
        let r = parse_benchmark_request(
            r#"{"task": "", "prompt": "  do it  ", "workspace": "/w", "metadata": {"scoped_work_item": {"id": "A-1"}, "intake_kind": " IDEA "}}"#,
        )
        .expect("valid");
        assert_eq!(r.task, "  do it  ");
        assert_eq!(r.workspace, Some(PathBuf::from("/w")));
        assert_eq!(r.intake_kind, Some(IntakeKind::Idea));
        assert_eq!(
            r.scoped_work_item.map(|s| s.item_id),
            Some("A-1".to_string())
        );
        let r = parse_benchmark_request(
            r#"{"instructions": "x", "scope": {"item_id": "S"}, "intake_kind": "banana"}"#,
        )
        .expect("valid");
        assert_eq!(r.intake_kind, None);
        assert_eq!(r.scoped_work_item.map(|s| s.item_id), Some("S".into()));
        let r = parse_benchmark_request(r#"{"task": "x", "work_item": {"id": "W"}}"#).expect("ok");
        assert_eq!(r.scoped_work_item.map(|s| s.item_id), Some("W".into()));
        assert_eq!(
            parse_benchmark_request("[1]"),
            Err(LegacyError::NotAnObject)
        );
        assert_eq!(
            parse_benchmark_request(r#"{"task": "   "}"#),
            Err(LegacyError::NoTask)
        );
        assert_eq!(
            parse_benchmark_request(r#"{"task": 5}"#),
            Err(LegacyError::NoTask)
        );
        assert_eq!(
            parse_benchmark_request("").map_err(|e| e.to_string()),
            Err("Expecting value: line 1 column 1 (char 0)".to_string())
        );
    }
}
