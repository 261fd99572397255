//! `list_sessions`: the session records, sorted by id.

use serde_json::{Map, Value};

use super::Context;
use crate::contract::vocab::ErrorCode;
use crate::contract::{OpsResult, Record};

pub fn run(cx: Context<'_>) -> OpsResult {
    match cx.service.sessions.list() {
        Ok(sessions) => {
            let mut result = Map::new();
            result.insert(
                "sessions".to_string(),
                Value::Array(sessions.iter().map(|s| s.to_value()).collect()),
            );
            cx.inspect_success(result, None)
        }
        Err(err) => cx.failure(Record::error(ErrorCode::ServiceError, err.to_string())),
    }
}
