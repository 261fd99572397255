//! The natural-language commands: `millracer run` (one task) and `millracer operator` (a
//! session of tasks). Both hold their own pi conversation and send delegated work through
//! the same dispatch as `ops` (the bus when a worker serves the workspace, in-process
//! otherwise), so their frames appear on the bus like any adapter's.

use std::path::Path;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::actions::enqueue::OUTER_AGENT_OPTION;
use crate::agent::legacy::LegacyEvent;
use crate::agent::runner::{self, AgentError, Delegate, Delegated, Job};
use crate::app::ops::{self, FrameIn, Link};
use crate::contract::vocab::ErrorCode;
use crate::contract::vocab::Outcome;
use crate::contract::{OpsResult, Record, SCHEMA_VERSION, parse_request};

/// Delegation as an `enqueue` OpsRequest (route `millrace`, the decided intake kind,
/// `options.outer_agent = "caller"`) sent through [`ops::send`].
pub struct BusDelegate<'a> {
    pub link: &'a Link,
    /// The resolved workspace root (the request's `root_path`).
    pub workspace: &'a Path,
    /// `run` or `operator`: the request's `source.surface` and request_id prefix.
    pub surface: &'a str,
}

impl Delegate for BusDelegate<'_> {
    async fn delegate(
        self,
        job: Job<'_>,
        notes: mpsc::UnboundedSender<LegacyEvent>,
    ) -> Result<Delegated, AgentError> {
        let workspace = self.workspace.display().to_string();
        let mut workspace_ref = json!({"root_path": workspace});
        if let Some(mode) = job.mode {
            workspace_ref["mode"] = json!(mode);
        }
        let mut request = json!({
            "schema_version": SCHEMA_VERSION,
            "request_id": format!("req-{}-{}", self.surface, uuid::Uuid::new_v4()),
            "action": "enqueue",
            "workspace_ref": workspace_ref,
            "source": {"kind": "cli", "surface": self.surface, "adapter_id": format!("millracer-{}", self.surface)},
            "input": {"kind": "natural_language", "text": job.task},
            "route_preference": "millrace",
            "intake_preference": job.kind.as_str(),
            "options": {OUTER_AGENT_OPTION: "caller"},
        });
        if let Some(scoped) = job.scoped {
            request["scoped_work_item"] = serde_json::to_value(scoped).unwrap_or(Value::Null);
        }
        let raw = request.to_string().into_bytes();
        let parsed = parse_request(&raw).map_err(|e| {
            AgentError::delegation(Record::error(ErrorCode::InvalidRequest, e.to_string()))
        })?;
        let mut on_frame = |incoming: FrameIn<'_>| {
            if let Some(note) = incoming
                .frame
                .and_then(|frame| runner::progress_note(frame, &workspace))
            {
                let _ = notes.send(note);
            }
        };
        let result = ops::send(self.link, &raw, &parsed, true, &mut on_frame)
            .await
            .map_err(|e| {
                AgentError::delegation(Record::error(ErrorCode::TransportFailed, e.to_string()))
            })?;
        delegated_from(&result, &workspace)
    }
}

/// The delegated outcome an enqueue result reports (its `raw_compat` is our legacy
/// document). A result with errors has no outcome: the first error is the failure.
pub fn delegated_from(result: &OpsResult, workspace: &str) -> Result<Delegated, AgentError> {
    if let Some(error) = result.errors.first() {
        return Err(AgentError::delegation(error.clone()));
    }
    let raw = result.raw_compat.clone().unwrap_or_default();
    let body = &result.result;
    let pick = |key: &str| raw.get(key).or_else(|| body.get(key)).cloned();
    let completion = result.completion.clone();
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let event = match pick("event") {
        Some(Value::Object(event)) => LegacyEvent {
            kind: text(event.get("kind")),
            workspace: text(event.get("workspace")),
            reason: text(event.get("reason")),
        },
        _ => LegacyEvent {
            kind: Outcome::Unknown.as_str().to_string(),
            workspace: workspace.to_string(),
            reason: "the result names no terminal event".to_string(),
        },
    };
    Ok(Delegated {
        outcome: completion
            .as_ref()
            .and_then(|c| Outcome::parse(&c.outcome))
            .unwrap_or(Outcome::Incomplete),
        scoped_completion: completion.as_ref().is_some_and(|c| c.scoped_completion),
        event,
        task_path: pick("task_path").and_then(|v| v.as_str().map(str::to_string)),
        status: match pick("status") {
            Some(Value::Object(map)) => Some(map),
            _ => None,
        },
        evidence: completion
            .as_ref()
            .map(|c| c.evidence_summary.clone())
            .unwrap_or_default(),
        warnings: result.warnings.iter().map(|w| w.message.clone()).collect(),
        work_items: body
            .get("work_items")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        evidence_refs: result.evidence_refs.clone(),
        summary: text(body.get("output")),
    })
}
