//! Follows one delegated work item through the runtime's own records and decides, from
//! those records alone, how it ended. Never from text, never from one status poll.
//!
//! What belongs to the request: the intake document's id (a task or probe keeps it as
//! its work item id), the spec an idea is normalised into (`idea_normalized_to_spec`
//! names the inbox file, whose stem is our id), and items derived from ours (the
//! runtime names them `<parent>-…`: a probe's generated task, a spec's tasks).
//!
//! How it ended:
//! - completed: a task's card in `tasks/done/`; an idea's arbiter closure record closed
//!   with a passing verdict; a probe whose card is in `probes/done/` and whose derived
//!   work is all done once the daemon reports idle;
//! - blocked: any of our cards in a `blocked/` folder (only after troubleshooter and
//!   consultant gave up, unlike `current_failure_class`, which shows up early);
//! - nothing ran: the daemon reports idle and none of our items ever started.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::contract::progress::Progress;
use crate::contract::vocab::{EventType, JobState, Severity};
use crate::millrace::intake::IntakeKind;
use crate::millrace::records::{self, Lifecycle, RuntimeEvent};
use crate::payload;

/// How the delegated work ended, with what the verdict rests on.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Completed {
        reason: String,
        evidence: Vec<Map<String, Value>>,
    },
    Blocked {
        failure_class: String,
        evidence: Vec<Map<String, Value>>,
    },
    NothingRan,
}

/// A stage that ran for one of our items (for the deterministic summary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRun {
    pub stage: String,
    pub work_item_id: String,
    pub terminal_result: Option<String>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Tracker {
    workspace: PathBuf,
    root_id: String,
    kind: IntakeKind,
    ours: BTreeSet<String>,
    root_spec: Option<String>,
    started: bool,
    failure_classes: HashMap<String, String>,
    /// Ids seen that are not ours (so their cards are read once).
    strangers: BTreeSet<String>,
    pub stages: Vec<StageRun>,
    open_stage: Option<String>,
}

impl Tracker {
    pub fn new(workspace: &Path, root_id: &str, kind: IntakeKind) -> Self {
        Self {
            workspace: workspace.to_path_buf(),
            root_id: root_id.to_string(),
            kind,
            ours: BTreeSet::from([root_id.to_string()]),
            root_spec: None,
            started: false,
            failure_classes: HashMap::new(),
            strangers: BTreeSet::new(),
            stages: Vec::new(),
            open_stage: None,
        }
    }

    /// The work items this request owns so far.
    pub fn work_items(&self) -> Vec<String> {
        self.ours.iter().cloned().collect()
    }

    /// Whether any stage ever started on our work.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The stage running right now for our work, if any.
    pub fn active_stage(&self) -> Option<&str> {
        self.open_stage.as_deref()
    }

    fn is_ours(&mut self, id: &str) -> bool {
        if self.ours.contains(id) {
            return true;
        }
        if self.strangers.contains(id) {
            return false;
        }
        // Derived work names its origin on its card: `Root-Intake-ID: <probe id>` for a
        // probe's generated task, `Root-Spec-ID: <spec id>` for a spec's tasks. The
        // runtime's `<parent>-…` naming is the fallback.
        let card = records::lifecycle(&self.workspace, id)
            .and_then(|place| std::fs::read_to_string(place.path).ok())
            .unwrap_or_default();
        let by_card = card.lines().any(|line| {
            ["Root-Intake-ID:", "Root-Spec-ID:"].iter().any(|key| {
                line.strip_prefix(key)
                    .is_some_and(|v| self.ours.contains(v.trim()))
            })
        });
        let by_name = self.ours.iter().any(|mine| {
            id.len() > mine.len()
                && id.starts_with(mine.as_str())
                && id.as_bytes()[mine.len()] == b'-'
        });
        if by_card || by_name {
            self.ours.insert(id.to_string());
            true
        } else {
            self.strangers.insert(id.to_string());
            false
        }
    }

    /// The arbiter's `stage_started` names no work item; while our idea's closure is
    /// open, an arbiter run in this workspace is judging it.
    fn arbiter_for_us(&self, event: &RuntimeEvent) -> Option<String> {
        if event.str("stage") == Some("arbiter") && event.work_item_id().is_none() {
            self.root_spec.clone()
        } else {
            None
        }
    }

    /// Takes one runtime event: emits the frames it means for this request and returns
    /// a verdict when the event settles it.
    pub fn observe(&mut self, event: &RuntimeEvent, progress: &Progress) -> Option<Verdict> {
        match event.event_type.as_str() {
            "idea_normalized_to_spec" => {
                let stem = event
                    .str("idea_path")
                    .and_then(|p| Path::new(p).file_stem())
                    .map(|s| s.to_string_lossy().into_owned());
                if stem.as_deref() == Some(self.root_id.as_str())
                    && let Some(spec) = event.str("spec_id")
                {
                    self.ours.insert(spec.to_string());
                    self.root_spec = Some(spec.to_string());
                    progress.info(
                        EventType::RuntimeIdeaNormalized,
                        format!("Idea normalised into spec {spec}."),
                        payload! {"work_item_id" => spec, "idea_id" => self.root_id},
                    );
                }
                None
            }
            "stage_started" => {
                let id = match event.work_item_id() {
                    Some(id) => id.to_string(),
                    None => self.arbiter_for_us(event)?,
                };
                if !self.is_ours(&id) {
                    return None;
                }
                self.started = true;
                let stage = event.str("stage").unwrap_or("stage").to_string();
                self.open_stage = Some(stage.clone());
                progress.info(
                    EventType::RuntimeStageStarted,
                    format!("{stage} started on {id}."),
                    stage_payload(event, &id),
                );
                None
            }
            "stage_completed" => {
                let id = event.work_item_id()?.to_string();
                if !self.is_ours(&id) {
                    return None;
                }
                self.started = true;
                let stage = event.str("stage").unwrap_or("stage").to_string();
                let result = event.str("terminal_result").map(str::to_string);
                self.open_stage = None;
                self.stages.push(StageRun {
                    stage: stage.clone(),
                    work_item_id: id.clone(),
                    terminal_result: result.clone(),
                });
                let blocked = result.as_deref().is_some_and(|r| r.ends_with("BLOCKED"));
                progress.emit(
                    EventType::RuntimeStageCompleted,
                    if blocked {
                        Severity::Warning
                    } else {
                        Severity::Info
                    },
                    format!(
                        "{stage} finished on {id}: {}.",
                        result.as_deref().unwrap_or("no result")
                    ),
                    stage_payload(event, &id),
                );
                None
            }
            "router_decision" | "blocked_item_metadata_written" => {
                if let (Some(id), Some(class)) = (event.work_item_id(), event.str("failure_class"))
                {
                    let id = id.to_string();
                    if self.is_ours(&id) {
                        self.failure_classes.insert(id, class.to_string());
                    }
                }
                None
            }
            "runtime_tick_idle" => {
                if self.settled_on_idle() {
                    return self.check_records(true);
                }
                if !self.started
                    && records::lifecycle(&self.workspace, &self.root_id)
                        .is_none_or(|l| l.state == JobState::Queue)
                {
                    return Some(Verdict::NothingRan);
                }
                None
            }
            _ => None,
        }
    }

    fn settled_on_idle(&self) -> bool {
        self.started
    }

    /// Reads the lifecycle folders and closure records. `idle` says the daemon has
    /// nothing left to do, which lets a probe's outcome be read off its derived work.
    pub fn check_records(&mut self, idle: bool) -> Option<Verdict> {
        let mut places: Vec<(String, Lifecycle)> = Vec::new();
        for id in self.ours.clone() {
            if let Some(place) = records::lifecycle(&self.workspace, &id) {
                places.push((id, place));
            }
        }
        if let Some((id, place)) = places.iter().find(|(_, p)| p.state == JobState::Blocked) {
            let failure_class = self
                .failure_classes
                .get(id)
                .cloned()
                .or_else(|| self.failure_classes.values().next().cloned())
                .unwrap_or_else(|| "blocked".to_string());
            return Some(Verdict::Blocked {
                evidence: vec![self.lifecycle_evidence(id, place)],
                failure_class,
            });
        }
        let root_done = places
            .iter()
            .find(|(id, p)| *id == self.root_id && p.state == JobState::Done);
        match self.kind {
            IntakeKind::Task => {
                let (id, place) = root_done?;
                let mut evidence = vec![self.lifecycle_evidence(id, place)];
                evidence.extend(self.stage_evidence(id, "updater"));
                Some(Verdict::Completed {
                    reason: format!("task {id} reached {}/{}", place.family, place.state),
                    evidence,
                })
            }
            IntakeKind::Idea => {
                let spec = self.root_spec.clone()?;
                let (target_path, target) = records::arbiter_target(&self.workspace, &spec)?;
                if target.get("closure_open") != Some(&Value::Bool(false)) {
                    return None;
                }
                let verdict_rel = target.get("latest_verdict_path").and_then(Value::as_str)?;
                let verdict_path = self.workspace.join(verdict_rel);
                let verdict: Value =
                    serde_json::from_str(&std::fs::read_to_string(&verdict_path).ok()?).ok()?;
                if verdict.get("status").and_then(Value::as_str) != Some("pass") {
                    return None;
                }
                let mut evidence = vec![
                    payload! {
                        "kind" => "arbiter_closure",
                        "workspace" => self.workspace.display().to_string(),
                        "reason" => format!("closure target {spec} closed"),
                        "source" => self.relative(&target_path),
                        "closed_at" => target.get("closed_at").cloned().unwrap_or(Value::Null),
                    },
                    payload! {
                        "kind" => "arbiter_verdict",
                        "workspace" => self.workspace.display().to_string(),
                        "reason" => format!("arbiter verdict {} ({})", "pass", verdict.get("terminal_result").and_then(Value::as_str).unwrap_or("")),
                        "source" => verdict_rel,
                    },
                ];
                evidence.extend(self.stage_evidence(&spec, "arbiter"));
                Some(Verdict::Completed {
                    reason: format!("idea {} closed by the arbiter as spec {spec}", self.root_id),
                    evidence,
                })
            }
            IntakeKind::Probe => {
                let (id, place) = root_done?;
                if !idle {
                    return None;
                }
                let derived_open = self.ours.iter().filter(|d| **d != self.root_id).any(|d| {
                    records::lifecycle(&self.workspace, d)
                        .is_some_and(|l| l.state != JobState::Done)
                });
                if derived_open {
                    return None;
                }
                let mut evidence = vec![self.lifecycle_evidence(id, place)];
                for (derived, place) in places.iter().filter(|(d, _)| *d != self.root_id) {
                    evidence.push(self.lifecycle_evidence(derived, place));
                }
                evidence.extend(self.stage_evidence(id, "recon"));
                Some(Verdict::Completed {
                    reason: format!("probe {id} and its derived work reached done"),
                    evidence,
                })
            }
        }
    }

    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.workspace)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    fn lifecycle_evidence(&self, id: &str, place: &Lifecycle) -> Map<String, Value> {
        payload! {
            "kind" => "work_item_lifecycle",
            "workspace" => self.workspace.display().to_string(),
            "reason" => format!("{id} is in {}/{}", place.family, place.state),
            "source" => self.relative(&place.path),
        }
    }

    fn stage_evidence(&self, id: &str, stage: &str) -> Vec<Map<String, Value>> {
        self.stages
            .iter()
            .rev()
            .find(|s| s.work_item_id == id && s.stage == stage)
            .map(|s| {
                payload! {
                    "kind" => "runtime_event",
                    "workspace" => self.workspace.display().to_string(),
                    "reason" => format!("{} stage_completed {}", s.stage, s.terminal_result.as_deref().unwrap_or("")),
                    "source" => self.relative(&records::events_path(&self.workspace)),
                }
            })
            .into_iter()
            .collect()
    }
}

fn stage_payload(event: &RuntimeEvent, id: &str) -> Map<String, Value> {
    let mut map = payload! {
        "stage" => event.str("stage"),
        "work_item_id" => id,
        "work_item_kind" => event.str("work_item_kind"),
        "run_id" => event.str("run_id"),
        "occurred_at" => event.occurred_at,
    };
    if let Some(result) = event.str("terminal_result") {
        map.insert(
            "terminal_result".to_string(),
            Value::String(result.to_string()),
        );
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::progress::Progress;

    fn event(kind: &str, data: serde_json::Value) -> RuntimeEvent {
        RuntimeEvent {
            event_type: kind.to_string(),
            occurred_at: "2026-11-24T00:00:00+00:00".to_string(),
            data: data.as_object().cloned().unwrap_or_default(),
        }
    }

    fn progress() -> (
        Progress,
        tokio::sync::mpsc::UnboundedReceiver<crate::contract::progress::FrameOut>,
    ) {
        Progress::channel("r", None)
    }

    fn card(ws: &Path, family: &str, state: &str, id: &str, text: &str) {
        let dir = records::agents_dir(ws).join(family).join(state);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("{id}.md")), text).expect("card");
    }

    #[test]
    fn idle_before_anything_started_means_nothing_ran() {
        let ws = tempfile::tempdir().expect("ws");
        let (p, _rx) = progress();
        let mut t = Tracker::new(ws.path(), "task-1", IntakeKind::Task);
        assert_eq!(
            t.observe(&event("runtime_started", serde_json::json!({})), &p),
            None
        );
        assert_eq!(
            t.observe(
                &event(
                    "runtime_tick_idle",
                    serde_json::json!({"reason": "no_work"})
                ),
                &p
            ),
            Some(Verdict::NothingRan)
        );
    }

    #[test]
    fn a_blocked_card_blocks_with_the_failure_class_even_when_status_would_look_early() {
        let ws = tempfile::tempdir().expect("ws");
        let (p, _rx) = progress();
        let mut t = Tracker::new(ws.path(), "task-1", IntakeKind::Task);
        let started = serde_json::json!({"stage": "checker", "work_item_id": "task-1", "work_item_kind": "task"});
        t.observe(&event("stage_started", started), &p);
        t.observe(
            &event("router_decision", serde_json::json!({"work_item_id": "task-1", "failure_class": "consultant_blocked"})),
            &p,
        );
        // The failure class is known, but the card is still active: not blocked yet.
        card(ws.path(), "tasks", "active", "task-1", "Task-ID: task-1\n");
        assert_eq!(t.check_records(false), None);
        std::fs::remove_file(records::agents_dir(ws.path()).join("tasks/active/task-1.md"))
            .expect("rm");
        card(ws.path(), "tasks", "blocked", "task-1", "Task-ID: task-1\n");
        match t.check_records(false) {
            Some(Verdict::Blocked {
                failure_class,
                evidence,
            }) => {
                assert_eq!(failure_class, "consultant_blocked");
                assert!(
                    evidence[0]["source"]
                        .as_str()
                        .unwrap_or("")
                        .contains("tasks/blocked/task-1.md")
                );
            }
            other => panic!("expected blocked, got {other:?}"),
        }
    }

    #[test]
    fn a_probe_completes_only_when_its_derived_task_is_done_and_the_daemon_is_idle() {
        let ws = tempfile::tempdir().expect("ws");
        let (p, _rx) = progress();
        let mut t = Tracker::new(ws.path(), "probe-1", IntakeKind::Probe);
        card(
            ws.path(),
            "probes",
            "done",
            "probe-1",
            "Probe-ID: probe-1\n",
        );
        // A generated task named unlike its probe, linked by its card.
        card(
            ws.path(),
            "tasks",
            "active",
            "fix-thing",
            "Task-ID: fix-thing\nRoot-Intake-ID: probe-1\n",
        );
        let started = serde_json::json!({"stage": "builder", "work_item_id": "fix-thing", "work_item_kind": "task"});
        t.observe(&event("stage_started", started), &p);
        assert!(t.work_items().contains(&"fix-thing".to_string()));
        assert_eq!(t.check_records(false), None, "a probe waits for idle");
        assert_eq!(
            t.check_records(true),
            None,
            "its derived task is still active"
        );
        std::fs::remove_file(records::agents_dir(ws.path()).join("tasks/active/fix-thing.md"))
            .expect("rm");
        card(
            ws.path(),
            "tasks",
            "done",
            "fix-thing",
            "Task-ID: fix-thing\nRoot-Intake-ID: probe-1\n",
        );
        assert!(matches!(
            t.check_records(true),
            Some(Verdict::Completed { .. })
        ));
        // Somebody else's task is not ours.
        let other = serde_json::json!({"stage": "builder", "work_item_id": "other", "work_item_kind": "task"});
        card(ws.path(), "tasks", "active", "other", "Task-ID: other\n");
        t.observe(&event("stage_started", other), &p);
        assert!(!t.work_items().contains(&"other".to_string()));
    }
}
