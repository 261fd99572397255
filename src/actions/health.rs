//! `health`: the workspace's health in the 0.3.0 reference's eleven states (see
//! [`crate::millrace::health`]), decided from live evidence, with that evidence.
//!
//! No Python start-up beyond `status`, which a worker serves from its snapshot: the rest
//! is read from files (millracer's pause record, the runtime's event log and cards).

use serde_json::{Map, Value, json};

use super::Context;
use crate::contract::vocab::ErrorCode;
use crate::contract::{OpsResult, Record, time};
use crate::millrace::command::command_cwd;
use crate::millrace::health::{self, Evidence};

pub async fn run(cx: Context<'_>) -> OpsResult {
    let Some(root) = cx.resolution.root.as_deref() else {
        return cx.failure(Record::error(
            ErrorCode::WorkspaceUnresolved,
            "Unable to resolve Millrace workspace.",
        ));
    };
    let cwd = command_cwd(cx.service.settings.cwd.as_deref(), root);
    let status = match &cx.service.status_cache {
        Some(cache) => cache.status(&cx.service.millrace, root, &cwd).await,
        None => cx.service.millrace.status(root, &cwd).await,
    };
    let status = match status {
        Ok(status) => status,
        Err(err) => return cx.failure(Record::error(err.code(), err.to_string())),
    };
    let evidence = Evidence {
        status,
        pause_reason: health::read_pause_reason(root),
        trace: health::read_trace(root),
        blocked_cards: health::read_blocked_cards(root),
    };
    let decided = evidence.classify();
    let state = decided.state;
    let report_id = format!("health-{}", uuid::Uuid::new_v4());
    let mut report = Map::new();
    report.insert("report_id".into(), json!(report_id));
    report.insert("checked_at".into(), json!(time::now()));
    report.insert("health_state".into(), json!(state.as_str()));
    report.insert("summary".into(), json!(decided.summary));
    report.insert("decided_by".into(), json!(decided.decided_by));
    report.insert("observations".into(), json!(evidence.observations()));
    report.insert(
        "suggested_interventions".into(),
        json!(state.interventions()),
    );
    if let Some(item) = evidence
        .status
        .get("active_work_item_id")
        .filter(|v| !v.is_null())
    {
        report.insert("work_item_ref".into(), json!({"item_id": item}));
    }
    report.insert(
        "evidence".into(),
        json!({
            "status": Value::Object(evidence.status.clone()),
            "pause_reason": evidence.pause_reason,
            "stage_results": evidence.trace.iter().map(|(s, f)| json!({"stage": s, "failed": f})).collect::<Vec<_>>(),
            "blocked_work_items": evidence.blocked_cards,
        }),
    );
    let mut result = Map::new();
    result.insert("health_state".into(), json!(state.as_str()));
    result.insert("health_report".into(), Value::Object(report));
    let mut out = cx.resolved_success(result, "inspect_only");
    out.evidence_refs = vec![format!("health:{report_id}")];
    out
}
