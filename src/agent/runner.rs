//! The outer agent: the natural-language route from a task to its final answer.
//!
//! A decision turn picks the route (unless the caller forced one); the direct route is
//! one pi turn in the working directory; the delegated route hands the task to Millrace
//! through a [`Delegate`] (in-process in a worker, through the ops dispatch for `run` and
//! `operator`), tells pi about meaningful stage events while it runs, and ends with a
//! finalization turn that reports the real outcome and its evidence.
//!
//! Differences from the reference, on purpose: a failed progress note or finalization
//! turn does not throw the delegated outcome away (the final answer then is Millracer's
//! summary of the runtime's records, with a warning saying so); a mode pi names is used
//! only when pi named one (the reference also forces its silent `default_pi`).

use std::future::Future;
use std::path::Path;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::agent::decision::{Decision, parse_decision};
use crate::agent::legacy::{LegacyEvent, RunResult};
use crate::agent::pi::{PiError, PiSession};
use crate::agent::prompts;
use crate::contract::vocab::EventType;
use crate::contract::vocab::Outcome;
use crate::contract::vocab::Route;
use crate::contract::{OpsEventFrame, Record, ScopedWorkItem};
use crate::millrace::intake::{self, IntakeKind};

/// Why a task got no final answer.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Pi(#[from] PiError),
    /// The delegated run failed before it had an outcome (the record says why).
    #[error("{}", .0.message)]
    Delegation(Box<Record>),
}

impl AgentError {
    /// A delegation failure with this record.
    pub fn delegation(record: Record) -> Self {
        Self::Delegation(Box::new(record))
    }

    /// The record an OpsResult carries for this failure.
    pub fn record(&self) -> Record {
        match self {
            Self::Pi(err) => Record::error(err.code(), err.to_string())
                .suggest("Check the pi runner (--pi-command, --provider, --model) and retry."),
            Self::Delegation(record) => (**record).clone(),
        }
    }
}

/// What the caller decides about one task.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// The workspace root, as pi and the legacy document show it.
    pub workspace: &'a Path,
    /// `auto`, `direct` or `millrace` (anything else is `auto`).
    /// `auto` asks pi; `direct` and `millrace` force the route.
    pub route: Route,
    /// A forced intake kind (`--intake`, `intake_preference`).
    pub intake: Option<IntakeKind>,
    pub scoped: Option<&'a ScopedWorkItem>,
    /// Send pi a note for meaningful stage events (`--notify-terminal-stages`).
    pub notify: bool,
}

/// What to delegate.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    pub task: &'a str,
    pub kind: IntakeKind,
    /// The mode pi named, if it named one; otherwise the workspace's own.
    pub mode: Option<&'a str>,
    pub scoped: Option<&'a ScopedWorkItem>,
}

/// How delegated work ended, from the runtime's records.
#[derive(Debug, Clone, PartialEq)]
pub struct Delegated {
    pub outcome: Outcome,
    pub scoped_completion: bool,
    pub event: LegacyEvent,
    pub task_path: Option<String>,
    pub status: Option<Map<String, Value>>,
    pub evidence: Vec<Map<String, Value>>,
    pub warnings: Vec<String>,
    pub work_items: Vec<String>,
    pub evidence_refs: Vec<String>,
    /// Millracer's own account of the run, used when pi cannot write the final answer.
    pub summary: String,
}

/// Runs delegated work to its end, sending a [`LegacyEvent`] on `notes` for each
/// meaningful stage event (see [`progress_note`]) while it runs. `notes` must be dropped
/// when the work ends: the agent waits for the notes to run out.
pub trait Delegate {
    fn delegate(
        self,
        job: Job<'_>,
        notes: mpsc::UnboundedSender<LegacyEvent>,
    ) -> impl Future<Output = Result<Delegated, AgentError>> + Send;
}

/// Stages whose completion ends or redirects a work item: worth telling pi about.
const TERMINAL_STAGES: [&str; 4] = ["updater", "arbiter", "recon", "manager"];

/// The progress note a frame means, if it is a meaningful stage event: a terminal
/// stage's completion, or any stage that ended blocked. The reason reads like the
/// reference's (`updater update complete`).
pub fn progress_note(frame: &OpsEventFrame, workspace: &str) -> Option<LegacyEvent> {
    if frame.event_type != EventType::RuntimeStageCompleted {
        return None;
    }
    let stage = frame.payload.get("stage").and_then(Value::as_str)?;
    let result = frame
        .payload
        .get("terminal_result")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !TERMINAL_STAGES.contains(&stage) && !result.ends_with("BLOCKED") {
        return None;
    }
    let words = result.to_lowercase().replace('_', " ");
    Some(LegacyEvent {
        kind: "stage_progress".to_string(),
        workspace: workspace.to_string(),
        reason: format!("{stage} {words}").trim().to_string(),
    })
}

/// One task, start to final answer. See the module docs.
pub async fn run<D: Delegate>(
    pi: &PiSession,
    task: &str,
    options: &Options<'_>,
    delegate: D,
) -> Result<RunResult, AgentError> {
    let decision = match options.route {
        route @ (Route::Direct | Route::Millrace) => Decision::forced(route),
        _ => parse_decision(&pi.complete(&prompts::decision_prompt(task)).await?),
    };
    let intake = intake::choose(
        task,
        options.intake,
        decision.intake_kind.map(|k| (k, decision.signals.clone())),
    );
    let mut warnings = decision.warnings();
    if decision.is_direct() {
        let output = pi.complete(&prompts::direct_prompt(task)).await?;
        return Ok(RunResult {
            route: Route::Direct,
            decision,
            output,
            intake_kind: intake.kind,
            intake_signals: intake.signals,
            event: None,
            task_path: None,
            status: None,
            warnings,
            scoped_work_item: options.scoped.cloned(),
            progress_events: Vec::new(),
            outcome: Outcome::Completed,
            scoped_completion: false,
            completion_evidence: Vec::new(),
            work_items: None,
            evidence_refs: Vec::new(),
        });
    }

    let workspace = options.workspace.display().to_string();
    let job = Job {
        task,
        kind: intake.kind,
        mode: decision.mode_given.then_some(decision.mode.as_str()),
        scoped: options.scoped,
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<LegacyEvent>();
    let mut progress_events = Vec::new();
    let mut note_failure = None;
    let notes = async {
        while let Some(note) = rx.recv().await {
            if !options.notify {
                continue;
            }
            let prompt = prompts::progress_prompt(
                task,
                &workspace,
                intake.kind.as_str(),
                &note.kind,
                &note.reason,
            );
            progress_events.push(note);
            // The reply is not used; a failed note must not stop the delegated work.
            if let Err(err) = pi.complete(&prompt).await
                && note_failure.is_none()
            {
                note_failure = Some(err);
            }
        }
    };
    let (delegated, ()) = tokio::join!(delegate.delegate(job, tx), notes);
    let delegated = delegated?;
    if let Some(err) = note_failure {
        warnings.push(format!("pi could not take a progress note: {err}"));
    }
    warnings.extend(delegated.warnings.iter().cloned());

    let scoped_work = options
        .scoped
        .map(|s| serde_json::to_value(s).unwrap_or(Value::Null));
    let progress_json = Value::Array(progress_events.iter().map(LegacyEvent::to_json).collect());
    let prompt = prompts::finalization_prompt(&prompts::Finalization {
        task,
        workspace: &workspace,
        route: Route::Millrace.as_str(),
        intake_kind: intake.kind.as_str(),
        outcome: delegated.outcome.as_str(),
        scoped_completion: delegated.scoped_completion,
        completion_evidence: &delegated.evidence,
        event_kind: &delegated.event.kind,
        event_reason: &delegated.event.reason,
        status: delegated.status.as_ref(),
        warnings: &warnings,
        scoped_work,
        progress_events: progress_json,
    });
    let output = match pi.complete(&prompt).await {
        Ok(text) => text,
        Err(err) => {
            warnings.push(format!(
                "pi could not write the final answer ({err}); the answer is Millracer's summary of the runtime's records"
            ));
            delegated.summary.clone()
        }
    };
    Ok(RunResult {
        route: Route::Millrace,
        decision,
        output,
        intake_kind: intake.kind,
        intake_signals: intake.signals,
        event: Some(delegated.event),
        task_path: delegated.task_path,
        status: delegated.status,
        warnings,
        scoped_work_item: options.scoped.cloned(),
        progress_events,
        outcome: delegated.outcome,
        scoped_completion: delegated.scoped_completion,
        completion_evidence: delegated.evidence,
        work_items: Some(delegated.work_items),
        evidence_refs: delegated.evidence_refs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::vocab::Severity;
    use crate::payload;

    fn frame(event_type: EventType, stage: &str, result: &str) -> OpsEventFrame {
        OpsEventFrame::new(
            "r",
            1,
            event_type,
            Severity::Info,
            "m",
            payload! {"stage" => stage, "terminal_result" => result},
        )
    }

    #[test]
    fn only_meaningful_stage_events_become_notes() {
        let note = progress_note(
            &frame(
                EventType::RuntimeStageCompleted,
                "updater",
                "UPDATE_COMPLETE",
            ),
            "/w",
        )
        .expect("note");
        assert_eq!(note.reason, "updater update complete");
        assert_eq!(note.kind, "stage_progress");
        assert!(
            progress_note(
                &frame(
                    EventType::RuntimeStageCompleted,
                    "builder",
                    "BUILDER_COMPLETE"
                ),
                "/w"
            )
            .is_none()
        );
        assert!(
            progress_note(
                &frame(
                    EventType::RuntimeStageCompleted,
                    "checker",
                    "CHECKER_BLOCKED"
                ),
                "/w"
            )
            .is_some()
        );
        assert!(
            progress_note(
                &frame(EventType::RuntimeStageStarted, "updater", "UPDATE_COMPLETE"),
                "/w"
            )
            .is_none()
        );
    }
}
