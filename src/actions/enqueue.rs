//! `enqueue`: delegated work. Validates the task text as the reference does; the
//! delegation machinery itself is not part of this build yet, so a valid enqueue is
//! refused with a clear, recoverable error instead of being half-run.

use serde_json::Value;

use super::Context;
use crate::contract::{OpsResult, Record};

/// The reference's `_task_text`: `input.text`, else `input.payload.task` (or `.text`).
pub fn task_text(input: &serde_json::Map<String, Value>) -> Option<String> {
    if let Some(Value::String(text)) = input.get("text") {
        if !text.trim().is_empty() {
            return Some(text.trim().to_string());
        }
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
    if task_text(&cx.request.input).is_none() {
        return cx.failure(Record::error(
            "invalid_input",
            "enqueue requires input.text or input.payload.task.",
        ));
    }
    cx.failure(
        Record::error(
            "unsupported_action",
            "enqueue is not available in this build: delegation to the Millrace daemon is not enabled.",
        )
        .suggest("Use status, or run a build with delegated enqueue."),
    )
}
