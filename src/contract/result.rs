//! OpsResult: the one final answer every request gets.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::vocab::{ErrorCode, Outcome, Severity};
use super::{SCHEMA_VERSION, ScopedWorkItem, WorkspaceRef, pyjson};

/// The four result states of the reference. Exit code 1 of `ops --json` means `Failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Succeeded,
    Failed,
    Blocked,
    Incomplete,
}

impl ResultStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Blocked => "blocked",
            Self::Incomplete => "incomplete",
        }
    }
}

/// A warning or error record. Optional keys are omitted when absent, as the reference does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub code: String,
    pub message: String,
    pub severity: String,
    pub recoverable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggested_action: Option<String>,
}

impl Record {
    /// An error record. Every error the reference emits is recoverable, so that is the
    /// default here; use [`Record::fatal`] for the few that are not.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().to_string(),
            message: message.into(),
            severity: Severity::Error.as_str().to_string(),
            recoverable: true,
            related_ref: None,
            suggested_action: None,
        }
    }

    /// A warning record (`severity: warning`, recoverable).
    pub fn warning(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning.as_str().to_string(),
            ..Self::error(code, message)
        }
    }

    pub fn fatal(mut self) -> Self {
        self.recoverable = false;
        self
    }

    pub fn suggest(mut self, action: impl Into<String>) -> Self {
        self.suggested_action = Some(action.into());
        self
    }
}

/// What is known about completion. Always rendered with all six keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub outcome: String,
    pub scoped_completion: bool,
    #[serde(default)]
    pub evidence_summary: Vec<Map<String, Value>>,
    #[serde(default)]
    pub missing_evidence: Vec<String>,
    pub verification_status: String,
    #[serde(default)]
    pub terminal_outcome_ref: Option<String>,
}

impl Completion {
    /// `unknown` outcome: what read-only and error results carry.
    pub fn unknown(verification_status: &str) -> Self {
        Self {
            outcome: Outcome::Unknown.as_str().to_string(),
            scoped_completion: false,
            evidence_summary: Vec::new(),
            missing_evidence: Vec::new(),
            verification_status: verification_status.to_string(),
            terminal_outcome_ref: None,
        }
    }
}

/// The final answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpsResult {
    pub schema_version: String,
    pub request_id: String,
    pub status: ResultStatus,
    pub action: String,
    pub workspace_ref: WorkspaceRef,
    pub started_at: String,
    pub finished_at: String,
    pub warnings: Vec<Record>,
    pub errors: Vec<Record>,
    pub result: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intake_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scoped_work_item: Option<ScopedWorkItem>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<Completion>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence_refs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_cursor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_compat: Option<Map<String, Value>>,
}

impl OpsResult {
    /// A bare result; callers fill in what their action produces.
    pub fn new(
        request_id: &str,
        action: &str,
        status: ResultStatus,
        workspace_ref: WorkspaceRef,
        started_at: String,
    ) -> Self {
        Self {
            schema_version: SCHEMA_VERSION.to_string(),
            request_id: request_id.to_string(),
            status,
            action: action.to_string(),
            workspace_ref,
            started_at,
            finished_at: super::time::now(),
            warnings: Vec::new(),
            errors: Vec::new(),
            result: Map::new(),
            route: None,
            intake_kind: None,
            scoped_work_item: None,
            completion: None,
            evidence_refs: Vec::new(),
            event_cursor: None,
            session_ref: None,
            raw_compat: None,
        }
    }

    /// The reference's error shape: `failed`, one error, empty result, no route,
    /// completion `unknown/unverified`.
    pub fn failure(
        request_id: &str,
        action: &str,
        workspace_ref: WorkspaceRef,
        started_at: String,
        error: Record,
    ) -> Self {
        let mut result = Self::new(
            request_id,
            action,
            ResultStatus::Failed,
            workspace_ref,
            started_at,
        );
        result.errors.push(error);
        result.completion = Some(Completion::unknown("unverified"));
        result
    }

    /// The JSON value of this result, keys as the reference renders them.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Map::new()))
    }

    /// What `ops --json` prints: sorted keys, two-space indent, non-ASCII escaped.
    pub fn to_pretty_json(&self) -> String {
        pyjson::to_pretty(&self.to_value())
    }

    /// One compact line, for JSON-lines streams.
    pub fn to_json_line(&self) -> String {
        pyjson::to_line(&self.to_value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_keys_are_omitted_and_completion_is_complete() {
        let res = OpsResult::failure(
            "r1",
            "bogus",
            WorkspaceRef::default(),
            "t".into(),
            Record::error(ErrorCode::UnsupportedAction, "x"),
        );
        let v = res.to_value();
        let obj = v.as_object().expect("object");
        assert!(!obj.contains_key("route"));
        assert!(!obj.contains_key("evidence_refs"));
        assert_eq!(
            v["workspace_ref"],
            serde_json::json!({"runtime_kind": "local"})
        );
        assert_eq!(v["completion"]["terminal_outcome_ref"], Value::Null);
        assert_eq!(v["errors"][0]["recoverable"], Value::Bool(true));
        assert!(v["errors"][0].get("suggested_action").is_none());
        let back: OpsResult = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, res);
    }
}
