//! A workspace's health in the eleven states of the 0.3.0 reference
//! (`services/health.py:classify_health`), with its precedence: an explicit state, then
//! `stale_lock` > `crashed` > `spiraling` > `blocked_hard` > `blocked_recoverable` >
//! paused (`paused_expected`/`paused_unexpected`) > `healthy_completed_scope` >
//! `healthy_idle` > `healthy_running` > `unknown`.
//!
//! The reference classifies evidence a caller supplies; here the evidence is gathered live
//! and without Python where possible: the runtime's status (the worker's snapshot), the
//! pause millracer itself applied (`<root>/.millracer/pause.json`, which makes a pause
//! *expected*), the stage results of the runtime's event log since the daemon last
//! started (a stage failing three times is a retry loop: `spiraling`), and the blocked
//! work item cards. Every fact that decided the state is in the report's `evidence`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::millrace::records::{self, RuntimeEvent};

/// The eleven states, in the reference's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    HealthyRunning,
    HealthyIdle,
    HealthyCompletedScope,
    PausedExpected,
    PausedUnexpected,
    BlockedRecoverable,
    BlockedHard,
    Spiraling,
    Crashed,
    StaleLock,
    Unknown,
}

impl HealthState {
    pub const ALL: [Self; 11] = [
        Self::HealthyRunning,
        Self::HealthyIdle,
        Self::HealthyCompletedScope,
        Self::PausedExpected,
        Self::PausedUnexpected,
        Self::BlockedRecoverable,
        Self::BlockedHard,
        Self::Spiraling,
        Self::Crashed,
        Self::StaleLock,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::HealthyRunning => "healthy_running",
            Self::HealthyIdle => "healthy_idle",
            Self::HealthyCompletedScope => "healthy_completed_scope",
            Self::PausedExpected => "paused_expected",
            Self::PausedUnexpected => "paused_unexpected",
            Self::BlockedRecoverable => "blocked_recoverable",
            Self::BlockedHard => "blocked_hard",
            Self::Spiraling => "spiraling",
            Self::Crashed => "crashed",
            Self::StaleLock => "stale_lock",
            Self::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The reference's `_summary_for`.
    pub fn summary(self) -> &'static str {
        match self {
            Self::HealthyRunning => "Daemon is running with active or queued work.",
            Self::HealthyIdle => "Daemon is idle and no scoped work is active.",
            Self::HealthyCompletedScope => "Scoped work appears complete from evidence.",
            Self::PausedExpected => "Daemon is paused by expected policy or request.",
            Self::PausedUnexpected => "Daemon is paused without expected-pause evidence.",
            Self::BlockedRecoverable => "Runtime is blocked by recoverable failure evidence.",
            Self::BlockedHard => "Runtime is blocked by non-recoverable failure evidence.",
            Self::Spiraling => "Runtime appears to be repeating recovery or retry loops.",
            Self::Crashed => "Daemon appears stopped while work remains.",
            Self::StaleLock => "Runtime ownership lock is stale.",
            Self::Unknown => "Runtime evidence is insufficient to classify health.",
        }
    }

    /// The reference's suggested interventions for a derived state.
    pub fn interventions(self) -> &'static [&'static str] {
        match self {
            Self::StaleLock => &["restart daemon after confirming no active owner"],
            Self::Crashed => &["inspect daemon logs", "restart daemon"],
            Self::Spiraling => &[
                "pause daemon",
                "inspect recovery counters and latest run trace",
            ],
            Self::BlockedHard => &["inspect runtime error report"],
            Self::BlockedRecoverable => &["run diagnose"],
            Self::PausedUnexpected => &["resume daemon or inspect pause reason"],
            _ => &[],
        }
    }
}

const RECOVERABLE_HINTS: [&str; 6] = [
    "timeout",
    "transient",
    "retry",
    "recoverable",
    "missing",
    "unavailable",
];
const HARD_HINTS: [&str; 7] = [
    "hard",
    "fatal",
    "unrecoverable",
    "schema",
    "contract",
    "policy",
    "permission",
];
/// Pause reasons the reference counts as expected.
pub const EXPECTED_PAUSE_REASONS: [&str; 4] =
    ["operator_requested", "scheduled", "expected", "manual"];

/// The facts health is decided from.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// `millrace status --format json`.
    pub status: Map<String, Value>,
    /// The reason of the pause millracer applied and has not resumed, if any.
    pub pause_reason: Option<String>,
    /// Stage results since the daemon last started: `(stage, failed)`.
    pub trace: Vec<(String, bool)>,
    /// Work item cards in a `blocked/` folder.
    pub blocked_cards: Vec<String>,
}

/// The classification: state, summary, interventions and the observations behind it.
#[derive(Debug, Clone)]
pub struct Classification {
    pub state: HealthState,
    pub summary: &'static str,
    pub decided_by: String,
}

impl Evidence {
    fn int(&self, key: &str) -> i64 {
        match self.status.get(key) {
            Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
            Some(Value::Bool(b)) => i64::from(*b),
            Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
            _ => 0,
        }
    }

    fn string(&self, key: &str) -> Option<&str> {
        self.status
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    fn flag(&self, key: &str) -> Option<bool> {
        optional_bool(self.status.get(key))
    }

    pub fn process_running(&self) -> Option<bool> {
        if self.status.contains_key("process_running") {
            self.flag("process_running")
        } else {
            self.flag("daemon_running")
        }
    }

    pub fn active_stage(&self) -> &str {
        self.string("active_stage").unwrap_or("none")
    }

    pub fn queued_work(&self) -> i64 {
        [
            "execution_queue_depth",
            "planning_queue_depth",
            "learning_queue_depth",
            "queue_depth",
            "queued_count",
        ]
        .iter()
        .map(|k| self.int(k))
        .sum()
    }

    fn failure_text(&self) -> String {
        ["current_failure_class", "failure_class"]
            .iter()
            .filter_map(|k| self.status.get(*k))
            .filter(|v| !v.is_null())
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_lowercase))
            .chain(
                (!self.blocked_cards.is_empty() && self.process_running() != Some(true))
                    .then(|| "blocked work item".to_string()),
            )
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn spiraling_stage(&self) -> Option<(&str, usize)> {
        let mut counts: Vec<(&str, usize)> = Vec::new();
        for (stage, failed) in &self.trace {
            if !failed {
                continue;
            }
            match counts.iter_mut().find(|(s, _)| s == stage) {
                Some((_, n)) => *n += 1,
                None => counts.push((stage, 1)),
            }
        }
        counts.into_iter().find(|(_, n)| *n >= 3)
    }

    fn closure_target_open(&self) -> Option<bool> {
        self.flag("closure_target_open")
    }

    /// The reference's `_classify_evidence`, in its order.
    pub fn classify(&self) -> Classification {
        let decide = |state: HealthState, why: String| Classification {
            state,
            summary: state.summary(),
            decided_by: why,
        };
        if let Some(state) = ["health_state", "health"]
            .iter()
            .find_map(|k| self.string(k).and_then(HealthState::parse))
        {
            return decide(state, "the runtime states its health".into());
        }
        if self
            .string("runtime_ownership_lock")
            .or(self.string("lock_status"))
            == Some("stale")
        {
            return decide(
                HealthState::StaleLock,
                "runtime_ownership_lock is stale".into(),
            );
        }
        let running = self.process_running();
        let active_runs = self.int("active_run_count");
        let queued = self.queued_work();
        let stage = self.active_stage().to_string();
        let busy = active_runs > 0 || queued > 0 || stage != "none";
        if running == Some(false) && busy {
            return decide(
                HealthState::Crashed,
                format!(
                    "process_running is false with {active_runs} active run(s), {queued} queued item(s), active stage {stage}"
                ),
            );
        }
        if let Some((stage, n)) = self.spiraling_stage() {
            return decide(
                HealthState::Spiraling,
                format!("stage {stage} failed {n} times since the daemon started"),
            );
        }
        let failure = self.failure_text();
        if self.flag("blocked_hard") == Some(true) || HARD_HINTS.iter().any(|h| failure.contains(h))
        {
            return decide(
                HealthState::BlockedHard,
                format!("failure evidence {failure:?} is not recoverable"),
            );
        }
        if self.flag("blocked_idle") == Some(true)
            || (!failure.is_empty()
                && (failure.contains("blocked")
                    || RECOVERABLE_HINTS.iter().any(|h| failure.contains(h))))
        {
            return decide(
                HealthState::BlockedRecoverable,
                if failure.is_empty() {
                    "blocked_idle is true".to_string()
                } else {
                    format!("failure evidence {failure:?}")
                },
            );
        }
        let paused = self.flag("paused") == Some(true)
            || self.string("status") == Some("paused")
            || self.string("daemon_status") == Some("paused");
        if paused {
            let reason = self.pause_reason.as_deref().or(self.string("pause_reason"));
            let expected = self.flag("pause_expected") == Some(true)
                || reason.is_some_and(|r| EXPECTED_PAUSE_REASONS.contains(&r));
            return if expected {
                decide(
                    HealthState::PausedExpected,
                    format!("paused, by request: {}", reason.unwrap_or("pause_expected")),
                )
            } else {
                decide(
                    HealthState::PausedUnexpected,
                    match reason {
                        Some(r) => format!("paused, with reason {r:?} that is not an expected one"),
                        None => "paused, and no pause was requested through millracer".into(),
                    },
                )
            };
        }
        let closure_open = self.closure_target_open();
        if self
            .status
            .get("closure_target_root_spec_id")
            .is_some_and(|v| !v.is_null())
            && closure_open == Some(false)
        {
            return decide(
                HealthState::HealthyCompletedScope,
                "the closure target is closed".into(),
            );
        }
        if ["planning_status_marker", "execution_status_marker"]
            .iter()
            .any(|k| self.string(k) == Some("### ARBITER_COMPLETE"))
        {
            return decide(
                HealthState::HealthyCompletedScope,
                "a status marker is ### ARBITER_COMPLETE".into(),
            );
        }
        if !busy && running != Some(false) && closure_open != Some(true) {
            return decide(
                HealthState::HealthyIdle,
                "nothing queued or active and the daemon is not stopped".into(),
            );
        }
        if running == Some(true) && busy {
            return decide(
                HealthState::HealthyRunning,
                format!(
                    "daemon running with {active_runs} active run(s), {queued} queued item(s), active stage {stage}"
                ),
            );
        }
        decide(
            HealthState::Unknown,
            match running {
                Some(false) => "the daemon is stopped and nothing is queued or active".into(),
                _ => "no status fact maps to a state".into(),
            },
        )
    }

    /// The observations of a report (the reference's, plus what millracer adds).
    pub fn observations(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "kind": "runtime_status",
            "process_running": self.process_running(),
            "active_stage": self.active_stage(),
            "active_run_count": self.int("active_run_count"),
            "paused": self.flag("paused"),
            "runtime_ownership_lock": self.string("runtime_ownership_lock"),
            "current_failure_class": self.status.get("current_failure_class").cloned().unwrap_or(Value::Null),
        })];
        out.push(json!({"kind": "queue_depth", "value": self.queued_work()}));
        if let Some(reason) = &self.pause_reason {
            out.push(json!({"kind": "pause_requested", "reason": reason}));
        }
        if !self.trace.is_empty() {
            let failed = self.trace.iter().filter(|(_, f)| *f).count();
            out.push(json!({"kind": "run_trace", "event_count": self.trace.len(), "failed_stages": failed}));
        }
        if !self.blocked_cards.is_empty() {
            out.push(json!({"kind": "blocked_work_items", "items": self.blocked_cards}));
        }
        out
    }
}

fn optional_bool(value: Option<&Value>) -> Option<bool> {
    match value? {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_lowercase().as_str() {
            "1" | "true" | "yes" | "y" | "on" => Some(true),
            "0" | "false" | "no" | "n" | "off" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Where millracer records the pause it applied: `<root>/.millracer/pause.json`.
pub fn pause_record_path(root: &Path) -> PathBuf {
    root.join(".millracer").join("pause.json")
}

/// The reason of the pause millracer applied, if it is still recorded.
pub fn read_pause_reason(root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(pause_record_path(root)).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    value.get("reason")?.as_str().map(str::to_string)
}

/// Stage results since the daemon last started, from the event log (its last 1 MiB).
pub fn read_trace(root: &Path) -> Vec<(String, bool)> {
    let events = records::read_recent(root, 1 << 20);
    let start = events
        .iter()
        .rposition(|e| e.event_type == "runtime_started")
        .map_or(0, |i| i + 1);
    events[start..]
        .iter()
        .filter(|e| e.event_type == "stage_completed")
        .filter_map(|e: &RuntimeEvent| {
            let stage = e.str("stage")?.to_string();
            let failed = e
                .str("terminal_result")
                .is_some_and(|r| r.contains("BLOCKED"));
            Some((stage, failed))
        })
        .collect()
}

/// Ids of the work item cards in a `blocked/` folder.
pub fn read_blocked_cards(root: &Path) -> Vec<String> {
    let agents = records::agents_dir(root);
    let mut out = Vec::new();
    for family in ["tasks", "probes", "specs"] {
        let Ok(dir) = std::fs::read_dir(agents.join(family).join("blocked")) else {
            continue;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".md") {
                out.push(id.to_string());
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(status: Value) -> Evidence {
        Evidence {
            status: status.as_object().cloned().unwrap_or_default(),
            ..Evidence::default()
        }
    }

    #[test]
    fn precedence_follows_the_reference() {
        let state = |e: &Evidence| e.classify().state;
        assert_eq!(
            state(&evidence(
                json!({"process_running": false, "active_stage": null})
            )),
            HealthState::Unknown,
            "a stopped, empty workspace is unknown"
        );
        assert_eq!(
            state(&evidence(
                json!({"process_running": true, "active_run_count": 0})
            )),
            HealthState::HealthyIdle
        );
        assert_eq!(
            state(&evidence(
                json!({"process_running": true, "active_stage": "builder", "active_run_count": 1})
            )),
            HealthState::HealthyRunning
        );
        assert_eq!(
            state(&evidence(
                json!({"process_running": false, "execution_queue_depth": 1})
            )),
            HealthState::Crashed
        );
        assert_eq!(
            state(&evidence(
                json!({"process_running": false, "execution_queue_depth": 1, "runtime_ownership_lock": "stale"})
            )),
            HealthState::StaleLock
        );
        assert_eq!(
            state(&evidence(
                json!({"process_running": true, "current_failure_class": "consultant_blocked"})
            )),
            HealthState::BlockedRecoverable
        );
        assert_eq!(
            state(&evidence(
                json!({"process_running": true, "current_failure_class": "schema_invalid"})
            )),
            HealthState::BlockedHard
        );
        assert_eq!(
            state(&evidence(json!({"process_running": true, "paused": true}))),
            HealthState::PausedUnexpected
        );
        let mut expected = evidence(json!({"process_running": true, "paused": true}));
        expected.pause_reason = Some("operator_requested".into());
        assert_eq!(state(&expected), HealthState::PausedExpected);
        expected.pause_reason = Some("because".into());
        assert_eq!(state(&expected), HealthState::PausedUnexpected);
        assert_eq!(
            state(&evidence(
                json!({"process_running": true, "closure_target_root_spec_id": "s", "closure_target_open": false})
            )),
            HealthState::HealthyCompletedScope
        );
        assert_eq!(
            state(&evidence(
                json!({"health_state": "spiraling", "process_running": true})
            )),
            HealthState::Spiraling
        );
        let mut looping = evidence(json!({"process_running": true, "active_stage": "checker"}));
        looping.trace = vec![("checker".into(), true); 3];
        assert_eq!(state(&looping), HealthState::Spiraling);
        looping.trace.truncate(2);
        assert_eq!(state(&looping), HealthState::HealthyRunning);
        let mut parked = evidence(json!({"process_running": false}));
        parked.blocked_cards = vec!["task-1".into()];
        assert_eq!(state(&parked), HealthState::BlockedRecoverable);
    }
}
