//! `pause`: `millrace control pause`, in the workspace's lane (route `runtime_control`).
//! The reason (`input.payload.reason`, default `operator_requested`) is recorded in a
//! `runtime.paused` frame and in `<root>/.millracer/pause.json`, so `health` can tell a
//! requested pause (`paused_expected`) from one nobody asked millracer for.

use serde_json::{Value, json};

use super::Context;
use crate::contract::vocab::{ErrorCode, EventType};
use crate::contract::{OpsResult, Record, time};
use crate::millrace::command::Inspect;
use crate::millrace::health;

/// The reason when the request gives none (the 0.3.0 CLI's default).
pub const DEFAULT_REASON: &str = "operator_requested";

pub async fn run(cx: Context<'_>) -> OpsResult {
    control(cx, true).await
}

/// Pause or resume: the command, the frame, the record.
pub(crate) async fn control(cx: Context<'_>, pause: bool) -> OpsResult {
    let reason = match reason(&cx) {
        Ok(reason) => reason,
        Err(refusal) => return *refusal,
    };
    let (what, event, verb) = if pause {
        (Inspect::Pause, EventType::RuntimePaused, "paused")
    } else {
        (Inspect::Resume, EventType::RuntimeUnpaused, "resumed")
    };
    let mut out = cx.runtime_payload(&what, "runtime_control").await;
    let Some(root) = cx.resolution.root.as_deref() else {
        return out;
    };
    if let Some(cache) = &cx.service.status_cache {
        cache.invalidate(root);
    }
    if !out.errors.is_empty() {
        return out;
    }
    let record = health::pause_record_path(root);
    let written = if pause {
        let body = json!({"reason": reason, "request_id": cx.request.request_id, "paused_at": time::now()});
        record
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&record, body.to_string()))
    } else {
        match std::fs::remove_file(&record) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    };
    if let Err(err) = written {
        out.warnings.push(Record::warning(
            ErrorCode::PauseRecordFailed,
            format!("The pause record {} could not be updated: {err}. health may call this pause unexpected.", record.display()),
        ));
    }
    out.result
        .insert("reason".into(), Value::from(reason.clone()));
    cx.progress.info(
        event,
        format!("Millrace runtime {verb}: {reason}."),
        crate::payload! {"reason" => reason, "applied" => out.result.get("applied").cloned()},
    );
    out
}

/// `input.payload.reason`: a short single-line text.
fn reason(cx: &Context<'_>) -> Result<String, Box<OpsResult>> {
    let Some(reason) = cx.request.payload_string("reason") else {
        return Ok(DEFAULT_REASON.to_string());
    };
    if reason.len() > 500 || reason.chars().any(char::is_control) {
        return Err(Box::new(cx.failure(Record::error(
            ErrorCode::InvalidInput,
            "input.payload.reason must be one line of at most 500 bytes.",
        ))));
    }
    Ok(reason)
}
