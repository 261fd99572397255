//! OpsEventFrame: the ordered progress messages a request produces before its result.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::vocab::{EventType, Severity};
use super::{SCHEMA_VERSION, pyjson};

/// One event frame. `sequence` starts at 1 and has no gaps within a request, so a
/// subscriber can tell a lost frame from a quiet one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpsEventFrame {
    // Strings, not the vocabulary's enums: a frame read off the bus may come from a newer
    // worker with event types this build does not know, and must still be relayed.
    pub schema_version: String,
    pub request_id: String,
    pub event_id: String,
    pub sequence: u64,
    pub timestamp: String,
    pub event_type: String,
    pub severity: String,
    pub message: String,
    #[serde(default)]
    pub payload: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

impl OpsEventFrame {
    /// A frame with the reference's conventions: `event_id = <request_id>-<sequence>`,
    /// `cursor = sequence` as a string.
    pub fn new(
        request_id: &str,
        sequence: u64,
        event_type: EventType,
        severity: Severity,
        message: impl Into<String>,
        payload: Map<String, Value>,
    ) -> Self {
        Self {
            schema_version: SCHEMA_VERSION.to_string(),
            request_id: request_id.to_string(),
            event_id: format!("{request_id}-{sequence}"),
            sequence,
            timestamp: super::time::now(),
            event_type: event_type.as_str().to_string(),
            severity: severity.as_str().to_string(),
            message: message.into(),
            payload,
            cursor: Some(sequence.to_string()),
        }
    }

    /// The frame's event type, when this build knows it.
    pub fn kind(&self) -> Option<EventType> {
        EventType::parse(&self.event_type)
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Map::new()))
    }

    /// One compact line with sorted keys, for `--stream-json` and the bus.
    pub fn to_json_line(&self) -> String {
        pyjson::to_line(&self.to_value())
    }
}
