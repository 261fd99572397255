//! The versioned messages of `millracer.ops.v0.2`: requests, results and event frames.
//!
//! Parsing follows the reference tool's rules and error texts exactly, because adapters
//! already match on them; rendering omits the keys the reference omits. Nothing in here
//! knows about NATS or the runtime.

pub mod frame;
pub mod progress;
pub mod pyjson;
pub mod registry;
pub mod request;
pub mod result;
pub mod time;
pub mod token;
pub mod vocab;

pub use frame::OpsEventFrame;
pub use request::{OpsRequest, RequestError, ScopedWorkItem, WorkspaceRef, parse_request};
pub use result::{Completion, OpsResult, Record, ResultStatus};
pub use vocab::{ErrorCode, EventType, JobState, Outcome, Route, Severity};

/// The one schema version this contract speaks, on input and output.
pub const SCHEMA_VERSION: &str = "millracer.ops.v0.2";

/// A reference "strip-string": a string whose trimmed value is non-empty, else absent.
pub(crate) fn strip_string(value: Option<&serde_json::Value>) -> Option<String> {
    match value {
        Some(serde_json::Value::String(s)) => {
            let trimmed = s.trim();
            (!trimmed.is_empty()).then(|| trimmed.to_string())
        }
        _ => None,
    }
}

/// Lists of strip-strings; everything else in the list is dropped, as the reference does.
pub(crate) fn strip_strings(value: Option<&serde_json::Value>) -> Vec<String> {
    match value {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|item| strip_string(Some(item)))
            .collect(),
        _ => Vec::new(),
    }
}

/// An object, or an empty object for anything else (the reference's `_mapping_or_empty`).
pub(crate) fn object_or_empty(
    value: Option<&serde_json::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    match value {
        Some(serde_json::Value::Object(map)) => map.clone(),
        _ => serde_json::Map::new(),
    }
}
