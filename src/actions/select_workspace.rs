//! `select_workspace`: records a session's selected workspace (and that workspace's
//! default mode). Runs in the session lane, one at a time.

use serde_json::Map;

use super::Context;
use crate::contract::vocab::ErrorCode;
use crate::contract::{OpsResult, Record};
use crate::millrace::workspace::Resolution;

pub fn run(cx: Context<'_>) -> OpsResult {
    let workspace_id = cx.request.payload_string("workspace_id");
    let session_id = cx
        .request
        .payload_string("session_id")
        .unwrap_or_else(|| "local".to_string());
    let record = workspace_id
        .as_deref()
        .and_then(|id| cx.service.registry.get(id));
    let Some(record) = record else {
        return cx.failure_with(
            &Resolution::empty(),
            Record::error(
                ErrorCode::WorkspaceUnresolved,
                "select_workspace requires a registered workspace_id.",
            ),
        );
    };
    match cx.service.sessions.update_selection(
        &session_id,
        &record.id,
        record.default_mode.as_deref(),
    ) {
        Ok(session) => {
            let mut result = Map::new();
            result.insert("session".to_string(), session.to_value());
            cx.inspect_success(result, Some(session.session_id))
        }
        Err(err) => cx.failure_with(
            &Resolution::empty(),
            Record::error(ErrorCode::ServiceError, err.to_string()),
        ),
    }
}
