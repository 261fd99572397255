//! `inspect_session`: one session record or `null`; never an error for a missing one.

use serde_json::{Map, Value};

use super::Context;
use crate::contract::vocab::ErrorCode;
use crate::contract::{OpsResult, Record};

pub fn run(cx: Context<'_>) -> OpsResult {
    let session_id = cx.request.payload_string("session_id");
    let sessions = match cx.service.sessions.list() {
        Ok(sessions) => sessions,
        Err(err) => return cx.failure(Record::error(ErrorCode::ServiceError, err.to_string())),
    };
    let selected = session_id
        .as_deref()
        .and_then(|id| sessions.iter().find(|s| s.session_id == id));
    let mut result = Map::new();
    result.insert(
        "session".to_string(),
        selected.map_or(Value::Null, |s| s.to_value()),
    );
    cx.inspect_success(result, session_id)
}
