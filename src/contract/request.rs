//! OpsRequest parsing with the reference's validation order and messages.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{SCHEMA_VERSION, object_or_empty, pyjson, strip_string, strip_strings};

/// Why a request could not be parsed. The display texts are the reference's, word for
/// word: the bridge prints them as `millracer: error: <text>` and adapters match on them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not JSON; the text is what Python's decoder says for the same input.
    #[error("{0}")]
    InvalidJson(String),
    /// Bytes that are not UTF-8 (Python fails while decoding stdin).
    #[error("{0}")]
    InvalidUtf8(String),
    #[error("ops request must be a JSON object")]
    NotAnObject,
    /// Carries Python's `str()` of the offending value (`None` when missing).
    #[error("unsupported ops schema: {0}")]
    UnsupportedSchema(String),
    #[error("ops payload requires non-empty {0}")]
    MissingString(&'static str),
    #[error("ops payload requires object {0}")]
    MissingObject(&'static str),
}

impl RequestError {
    /// What to do about it, naming the field at fault: the reference's message stays
    /// word for word, this goes into the error's `suggested_action` on the bus.
    pub fn suggestion(&self) -> String {
        match self {
            Self::InvalidJson(_) | Self::InvalidUtf8(_) => {
                "Send one UTF-8 JSON object: a millracer.ops.v0.2 OpsRequest (see contracts/ops-request.schema.json).".to_string()
            }
            Self::NotAnObject => {
                "Send a JSON object, not an array or a scalar (see contracts/ops-request.schema.json).".to_string()
            }
            Self::UnsupportedSchema(found) if found == "None" => format!(
                "The field schema_version is missing: set \"schema_version\": \"{SCHEMA_VERSION}\"."
            ),
            Self::UnsupportedSchema(_) => format!(
                "The field schema_version names a version this worker does not speak: set \"schema_version\": \"{SCHEMA_VERSION}\"."
            ),
            Self::MissingString(field) => {
                format!("The field {field} is missing or empty: give it a non-empty string.")
            }
            Self::MissingObject(field) => {
                format!("The field {field} is missing or not an object: give it a JSON object.")
            }
        }
    }
}

/// Where the request says its workspace is. Every field is optional; resolution decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Always rendered; `local` unless the caller says otherwise.
    #[serde(default = "default_runtime_kind")]
    pub runtime_kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
}

fn default_runtime_kind() -> String {
    "local".to_string()
}

impl Default for WorkspaceRef {
    fn default() -> Self {
        Self {
            workspace_id: None,
            root_path: None,
            display_name: None,
            runtime_kind: default_runtime_kind(),
            mode: None,
            environment: None,
        }
    }
}

impl WorkspaceRef {
    /// Wrong types are silently ignored, as in the reference.
    fn parse(map: &Map<String, Value>) -> Self {
        Self {
            workspace_id: strip_string(map.get("workspace_id")),
            root_path: strip_string(map.get("root_path")),
            display_name: strip_string(map.get("display_name")),
            runtime_kind: strip_string(map.get("runtime_kind"))
                .unwrap_or_else(default_runtime_kind),
            mode: strip_string(map.get("mode")),
            environment: strip_string(map.get("environment")),
        }
    }
}

/// Who sent the request. Only `kind` is required; dispatch never reads the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_ref: Option<String>,
}

/// The person or program behind the source, when the caller says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorRef {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
}

/// One selected queue item the caller allows Millracer to delegate: the unit whose
/// completion `scoped_completion` speaks about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopedWorkItem {
    pub item_id: String,
    pub title: Option<String>,
    pub source_queue: Option<String>,
    pub spec_path: Option<String>,
    pub completion_ref: Option<String>,
    #[serde(default)]
    pub constraints: Vec<String>,
}

impl ScopedWorkItem {
    /// `item_id` (or its alias `id`) must be a strip-string, else the whole item is absent.
    pub fn from_value(value: Option<&Value>) -> Option<Self> {
        let map = value?.as_object()?;
        // Python: `payload.get("item_id") or payload.get("id")` — a falsy item_id falls back.
        let raw_id = match map.get("item_id") {
            Some(v) if is_truthy(v) => Some(v),
            _ => map.get("id"),
        };
        let item_id = strip_string(raw_id)?;
        Some(Self {
            item_id,
            title: strip_string(map.get("title")),
            source_queue: strip_string(map.get("source_queue")),
            spec_path: strip_string(map.get("spec_path")),
            completion_ref: strip_string(map.get("completion_ref")),
            constraints: strip_strings(map.get("constraints")),
        })
    }
}

/// Python truthiness of a JSON value.
pub(crate) fn is_truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// A parsed, validated request. Strings are already stripped, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct OpsRequest {
    pub request_id: String,
    pub action: String,
    pub workspace_ref: WorkspaceRef,
    pub source: SourceRef,
    pub input: Map<String, Value>,
    pub client_name: Option<String>,
    pub client_version: Option<String>,
    pub actor: Option<ActorRef>,
    pub route_preference: String,
    pub intake_preference: String,
    pub scoped_work_item: Option<ScopedWorkItem>,
    pub expected_evidence: Vec<String>,
    pub context_refs: Vec<String>,
    pub options: Map<String, Value>,
    pub metadata: Map<String, Value>,
    pub idempotency_key: Option<String>,
}

/// Parses raw bytes as the reference does: UTF-8, JSON, object, then the field checks in
/// the reference's order; the first failure wins.
pub fn parse_request(raw: &[u8]) -> Result<OpsRequest, RequestError> {
    let value = parse_json(raw)?;
    parse_request_value(&value)
}

/// JSON text to a value, with Python's error messages for bad input.
pub fn parse_json(raw: &[u8]) -> Result<Value, RequestError> {
    let text = std::str::from_utf8(raw).map_err(|err| {
        let pos = err.valid_up_to();
        let byte = raw.get(pos).copied().unwrap_or_default();
        RequestError::InvalidUtf8(format!(
            "'utf-8' codec can't decode byte 0x{byte:02x} in position {pos}: invalid start byte"
        ))
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(value) => Ok(value),
        Err(err) => Err(RequestError::InvalidJson(
            pyjson::decode_error(text).unwrap_or_else(|| err.to_string()),
        )),
    }
}

/// Validates an already-decoded value.
pub fn parse_request_value(value: &Value) -> Result<OpsRequest, RequestError> {
    let map = value.as_object().ok_or(RequestError::NotAnObject)?;
    match map.get("schema_version") {
        Some(Value::String(s)) if s == SCHEMA_VERSION => {}
        other => {
            let shown = other
                .map(pyjson::py_str)
                .unwrap_or_else(|| "None".to_string());
            return Err(RequestError::UnsupportedSchema(shown));
        }
    }
    let request_id = required_string(map, "request_id")?;
    let action = required_string(map, "action")?;
    let workspace = required_object(map, "workspace_ref")?;
    let source_map = required_object(map, "source")?;
    let source = SourceRef {
        kind: required_string(source_map, "kind")?,
        surface: strip_string(source_map.get("surface")),
        adapter_id: strip_string(source_map.get("adapter_id")),
        conversation_id: strip_string(source_map.get("conversation_id")),
        message_id: strip_string(source_map.get("message_id")),
        parent_request_id: strip_string(source_map.get("parent_request_id")),
        trace_ref: strip_string(source_map.get("trace_ref")),
    };
    let actor = match map.get("actor") {
        Some(Value::Object(actor)) => Some(ActorRef {
            kind: required_string(actor, "kind")?,
            display_name: strip_string(actor.get("display_name")),
            actor_id: strip_string(actor.get("actor_id")),
            metadata: object_or_empty(actor.get("metadata")),
        }),
        _ => None,
    };
    Ok(OpsRequest {
        request_id,
        action,
        workspace_ref: WorkspaceRef::parse(workspace),
        source,
        input: object_or_empty(map.get("input")),
        client_name: strip_string(map.get("client_name")),
        client_version: strip_string(map.get("client_version")),
        actor,
        route_preference: strip_string(map.get("route_preference"))
            .unwrap_or_else(|| "auto".to_string()),
        intake_preference: strip_string(map.get("intake_preference"))
            .unwrap_or_else(|| "auto".to_string()),
        scoped_work_item: ScopedWorkItem::from_value(map.get("scoped_work_item")),
        expected_evidence: strip_strings(map.get("expected_evidence")),
        context_refs: strip_strings(map.get("context_refs")),
        options: object_or_empty(map.get("options")),
        metadata: object_or_empty(map.get("metadata")),
        idempotency_key: strip_string(map.get("idempotency_key")),
    })
}

/// Best-effort `(request_id, action)` from a request that failed validation, so the
/// error result on the bus can still name what it answers.
pub fn salvage_ids(raw: &[u8]) -> (String, String) {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(raw) else {
        return (String::new(), String::new());
    };
    (
        strip_string(map.get("request_id")).unwrap_or_default(),
        strip_string(map.get("action")).unwrap_or_default(),
    )
}

fn required_string(map: &Map<String, Value>, key: &'static str) -> Result<String, RequestError> {
    strip_string(map.get(key)).ok_or(RequestError::MissingString(key))
}

fn required_object<'a>(
    map: &'a Map<String, Value>,
    key: &'static str,
) -> Result<&'a Map<String, Value>, RequestError> {
    map.get(key)
        .and_then(Value::as_object)
        .ok_or(RequestError::MissingObject(key))
}

impl OpsRequest {
    /// The reference's `_payload`: `input.payload` when it is an object, else `input`.
    pub fn payload(&self) -> &Map<String, Value> {
        match self.input.get("payload") {
            Some(Value::Object(nested)) => nested,
            _ => &self.input,
        }
    }

    /// A strip-string from [`Self::payload`].
    pub fn payload_string(&self, key: &str) -> Option<String> {
        strip_string(self.payload().get(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "schema_version": "millracer.ops.v0.2",
            "request_id": "  req-trim  ",
            "action": "status",
            "workspace_ref": {"root_path": "/tmp/ws", "mode": 5},
            "source": {"kind": "cli"},
        })
    }

    fn err_of(value: Value) -> String {
        parse_request_value(&value)
            .expect_err("must fail")
            .to_string()
    }

    #[test]
    fn strips_and_defaults() {
        let req = parse_request_value(&base()).expect("valid");
        assert_eq!(req.request_id, "req-trim");
        assert_eq!(req.route_preference, "auto");
        assert_eq!(req.workspace_ref.mode, None);
        assert_eq!(req.workspace_ref.runtime_kind, "local");
    }

    #[test]
    fn validation_order_and_messages() {
        assert_eq!(err_of(json!([1])), "ops request must be a JSON object");
        let mut v = base();
        v.as_object_mut().expect("obj").remove("schema_version");
        assert_eq!(err_of(v), "unsupported ops schema: None");
        assert!(
            RequestError::UnsupportedSchema("None".to_string())
                .suggestion()
                .contains("schema_version is missing")
        );
        let mut v = base();
        v["schema_version"] = json!("millracer.ops.v0.3");
        v["request_id"] = json!("");
        assert_eq!(err_of(v), "unsupported ops schema: millracer.ops.v0.3");
        let mut v = base();
        v["request_id"] = json!("   ");
        v["action"] = json!(1);
        assert_eq!(err_of(v), "ops payload requires non-empty request_id");
        let mut v = base();
        v["action"] = json!(1);
        assert_eq!(err_of(v), "ops payload requires non-empty action");
        let mut v = base();
        v["workspace_ref"] = json!("x");
        assert_eq!(err_of(v), "ops payload requires object workspace_ref");
        let mut v = base();
        v["source"] = json!(null);
        assert_eq!(err_of(v), "ops payload requires object source");
        let mut v = base();
        v["source"] = json!({"kind": " "});
        assert_eq!(err_of(v), "ops payload requires non-empty kind");
        let mut v = base();
        v["actor"] = json!({"display_name": "x"});
        assert_eq!(err_of(v), "ops payload requires non-empty kind");
    }

    #[test]
    fn scoped_item_alias_and_constraints() {
        let item = ScopedWorkItem::from_value(Some(
            &json!({"item_id": "", "id": " A-1 ", "constraints": ["x", 1, " "]}),
        ))
        .expect("item");
        assert_eq!(item.item_id, "A-1");
        assert_eq!(item.constraints, vec!["x"]);
        assert!(ScopedWorkItem::from_value(Some(&json!({"title": "t"}))).is_none());
    }

    #[test]
    fn invalid_json_uses_python_message() {
        let err = parse_request(b"").expect_err("empty");
        assert_eq!(err.to_string(), "Expecting value: line 1 column 1 (char 0)");
    }
}
