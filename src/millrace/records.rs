//! The runtime's own records, read without starting Python: the append-only event log
//! `millrace-agents/logs/runtime_events.jsonl`, the work item lifecycle folders and the
//! arbiter closure records.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::contract::vocab::JobState;

/// `<workspace>/millrace-agents`.
pub fn agents_dir(workspace: &Path) -> PathBuf {
    workspace.join("millrace-agents")
}

/// The runtime's event log.
pub fn events_path(workspace: &Path) -> PathBuf {
    agents_dir(workspace)
        .join("logs")
        .join("runtime_events.jsonl")
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeEvent {
    pub event_type: String,
    pub occurred_at: String,
    pub data: Map<String, Value>,
}

impl RuntimeEvent {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }

    pub fn work_item_id(&self) -> Option<&str> {
        self.str("work_item_id")
    }
}

/// Reads the event log incrementally from a byte offset. A line still being written
/// (no newline yet) is left for the next read, so no event is seen half-written.
#[derive(Debug)]
pub struct EventTail {
    path: PathBuf,
    offset: u64,
}

impl EventTail {
    /// A tail starting at the current end of the log: only events written from now on.
    pub fn from_end(workspace: &Path) -> Self {
        let path = events_path(workspace);
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Self { path, offset }
    }

    /// A tail from the beginning of the log: a worker resuming a run another worker
    /// started reads the events it never saw (the tracker follows only its work item).
    pub fn from_start(workspace: &Path) -> Self {
        Self {
            path: events_path(workspace),
            offset: 0,
        }
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// New complete events since the last read.
    pub fn read_new(&mut self) -> Vec<RuntimeEvent> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // The log was truncated or replaced: start over from its beginning.
            self.offset = 0;
        }
        if len == self.offset || file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return Vec::new();
        }
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        bytes[..complete]
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
            .filter_map(|value| {
                let Value::Object(mut map) = value else {
                    return None;
                };
                let event_type = map.get("event_type")?.as_str()?.to_string();
                let occurred_at = map
                    .get("occurred_at")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let data = match map.remove("data") {
                    Some(Value::Object(data)) => data,
                    _ => Map::new(),
                };
                Some(RuntimeEvent {
                    event_type,
                    occurred_at,
                    data,
                })
            })
            .collect()
    }
}

/// The complete events in the last `max_bytes` of the log (a partial first line is
/// skipped), oldest first.
pub fn read_recent(workspace: &Path, max_bytes: u64) -> Vec<RuntimeEvent> {
    let path = events_path(workspace);
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max_bytes);
    let mut tail = EventTail {
        path,
        offset: start,
    };
    let mut events = tail.read_new();
    if start > 0 && !events.is_empty() {
        // The first line read may be the end of a longer one; it parsed only by chance.
        events.remove(0);
    }
    events
}

/// Where a work item's card lives: `<family>/<state>/<id>.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    pub family: &'static str,
    pub state: JobState,
    pub path: PathBuf,
}

/// Finds a work item's card in the lifecycle folders of `tasks`, `probes` and `specs`.
pub fn lifecycle(workspace: &Path, work_item_id: &str) -> Option<Lifecycle> {
    let agents = agents_dir(workspace);
    for family in ["tasks", "probes", "specs"] {
        // The furthest state first: a card moved on may leave a copy behind.
        for state in [
            JobState::Done,
            JobState::Blocked,
            JobState::Active,
            JobState::Queue,
        ] {
            let path = agents
                .join(family)
                .join(state.as_str())
                .join(format!("{work_item_id}.md"));
            if path.is_file() {
                return Some(Lifecycle {
                    family,
                    state,
                    path,
                });
            }
        }
    }
    None
}

/// Whether the runtime already knows a work item by this id: its card in a lifecycle
/// folder; for an idea (whose id is not a card id), the idea file in the ideas intake
/// folders or its normalisation in the event log; or a `queue add` still waiting in the
/// mailbox for a running daemon. Used before queuing a document a worker that died may
/// have queued already.
pub fn queued(workspace: &Path, work_item_id: &str, kind: &str) -> bool {
    if lifecycle(workspace, work_item_id).is_some() {
        return true;
    }
    let agents = agents_dir(workspace);
    let file_name = format!("{work_item_id}.md");
    if kind == "idea" {
        let ideas = agents.join("intake").join("ideas");
        if any_file(&ideas, 3, &mut |path| {
            path.file_name().is_some_and(|n| *n == *file_name)
        }) {
            return true;
        }
        let mut tail = EventTail::from_start(workspace);
        let normalised = tail.read_new().iter().any(|event| {
            event.event_type == "idea_normalized_to_spec"
                && event
                    .str("idea_path")
                    .and_then(|p| Path::new(p).file_stem())
                    .is_some_and(|stem| stem == work_item_id)
        });
        if normalised {
            return true;
        }
    }
    // A daemon that runs takes `queue add` through its mailbox: the command file names
    // the document.
    any_file(&agents.join("mailbox"), 3, &mut |path| {
        std::fs::read_to_string(path).is_ok_and(|text| text.contains(work_item_id))
    })
}

/// Whether a file under `dir` (at most `depth` levels down) satisfies `check`.
fn any_file(dir: &Path, depth: u32, check: &mut dyn FnMut(&Path) -> bool) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if depth > 0 && any_file(&path, depth - 1, check) {
                return true;
            }
        } else if kind.is_file() && check(&path) {
            return true;
        }
    }
    false
}

/// The arbiter's closure record for a root spec, when one exists.
pub fn arbiter_target(
    workspace: &Path,
    root_spec_id: &str,
) -> Option<(PathBuf, Map<String, Value>)> {
    let path = agents_dir(workspace)
        .join("arbiter")
        .join("targets")
        .join(format!("{root_spec_id}.json"));
    let text = std::fs::read_to_string(&path).ok()?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Some((path, map)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn queued_finds_cards_ideas_and_mailbox_commands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ws = dir.path();
        assert!(!queued(ws, "task-1", "task"));
        let queue = agents_dir(ws).join("tasks").join("queue");
        std::fs::create_dir_all(&queue).expect("mkdir");
        std::fs::write(queue.join("task-1.md"), "card").expect("card");
        assert!(queued(ws, "task-1", "task"));
        assert!(!queued(ws, "task-10", "task"));
        let inbox = agents_dir(ws).join("intake").join("ideas").join("inbox");
        std::fs::create_dir_all(&inbox).expect("mkdir");
        std::fs::write(inbox.join("idea-2.md"), "idea").expect("idea");
        assert!(queued(ws, "idea-2", "idea"));
        assert!(!queued(ws, "idea-3", "idea"));
        let mailbox = agents_dir(ws).join("mailbox").join("incoming");
        std::fs::create_dir_all(&mailbox).expect("mkdir");
        std::fs::write(mailbox.join("cmd.json"), "{\"source_name\":\"idea-3.md\"}")
            .expect("command");
        assert!(queued(ws, "idea-3", "idea"));
    }

    #[test]
    fn tail_reads_only_complete_new_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = events_path(dir.path());
        std::fs::create_dir_all(log.parent().expect("parent")).expect("mkdir");
        std::fs::write(&log, "{\"event_type\":\"old\",\"data\":{}}\n").expect("seed");
        let mut tail = EventTail::from_end(dir.path());
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("open");
        file.write_all(b"{\"event_type\":\"stage_started\",\"data\":{\"stage\":\"builder\"}}\n{\"event_type\":\"half")
            .expect("write");
        let events = tail.read_new();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].str("stage"), Some("builder"));
        file.write_all(b"\",\"data\":{}}\nnot json\n")
            .expect("write");
        let events = tail.read_new();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type, "half");
        assert!(tail.read_new().is_empty());
    }
}
