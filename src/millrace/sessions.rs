//! Operator session convenience state: `$HOME/.millracer/sessions.json`, as the reference
//! keeps it. Sessions never hold queue, run or completion truth; the runtime does.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::contract::{pyjson, strip_string, strip_strings};

/// One session record, normalised the way the reference loads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub session_id: String,
    pub client_name: String,
    pub selected_workspace_id: Option<String>,
    pub selected_mode: Option<String>,
    pub recent_request_ids: Vec<String>,
    pub last_warning_codes: Vec<String>,
}

impl SessionRecord {
    pub fn to_value(&self) -> Value {
        json!({
            "session_id": self.session_id,
            "client_name": self.client_name,
            "selected_workspace_id": self.selected_workspace_id,
            "selected_mode": self.selected_mode,
            "recent_request_ids": self.recent_request_ids,
            "last_warning_codes": self.last_warning_codes,
        })
    }
}

/// Why the session file could not be read or written. Messages follow Python's wording
/// (`[Errno 17] File exists: '…'`, decoder messages) so they read like the reference's.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Io(String),
}

/// The session file and the lock that serialises writers across processes.
#[derive(Debug, Clone)]
pub struct SessionStore {
    path: PathBuf,
}

impl SessionStore {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// `$MILLRACER_HOME/sessions.json`, else `$HOME/.millracer/sessions.json`.
    pub fn default_path() -> PathBuf {
        if let Some(dir) = std::env::var_os("MILLRACER_HOME") {
            return PathBuf::from(dir).join("sessions.json");
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".millracer").join("sessions.json")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sessions sorted by id. Missing or empty file: none.
    pub fn list(&self) -> Result<Vec<SessionRecord>, SessionError> {
        Ok(self.load()?.into_values().collect())
    }

    /// Sets a session's selection, creating the session (client_name = id) when new.
    /// The read-modify-write holds an exclusive lock so two processes cannot lose a write.
    pub fn update_selection(
        &self,
        session_id: &str,
        workspace_id: &str,
        mode: Option<&str>,
    ) -> Result<SessionRecord, SessionError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| os_error(&e, dir))?;
        let lock_path = self.path.with_extension("json.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| os_error(&e, &lock_path))?;
        lock.lock().map_err(|e| os_error(&e, &lock_path))?;
        let mut sessions = self.load()?;
        let previous = sessions.remove(session_id);
        let updated = SessionRecord {
            session_id: session_id.to_string(),
            client_name: previous
                .as_ref()
                .map_or_else(|| session_id.to_string(), |p| p.client_name.clone()),
            selected_workspace_id: Some(workspace_id.to_string()),
            selected_mode: mode.map(str::to_string),
            recent_request_ids: previous
                .as_ref()
                .map(|p| p.recent_request_ids.clone())
                .unwrap_or_default(),
            last_warning_codes: previous.map(|p| p.last_warning_codes).unwrap_or_default(),
        };
        sessions.insert(session_id.to_string(), updated.clone());
        self.save(&sessions, dir)?;
        drop(lock);
        Ok(updated)
    }

    fn load(&self) -> Result<BTreeMap<String, SessionRecord>, SessionError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(os_error(&e, &self.path)),
        };
        let text = if text.is_empty() { "{}" } else { text.as_str() };
        let value: Value = serde_json::from_str(text).map_err(|e| {
            SessionError::Corrupt(pyjson::decode_error(text).unwrap_or_else(|| e.to_string()))
        })?;
        let mut out = BTreeMap::new();
        // The reference crashes when `sessions` is not an object; we read it as empty.
        let Some(Value::Object(sessions)) = value.as_object().and_then(|m| m.get("sessions"))
        else {
            return Ok(out);
        };
        for (id, raw) in sessions {
            let Value::Object(raw) = raw else { continue };
            out.insert(id.clone(), parse_record(id, raw));
        }
        Ok(out)
    }

    fn save(
        &self,
        sessions: &BTreeMap<String, SessionRecord>,
        dir: &Path,
    ) -> Result<(), SessionError> {
        let map: Map<String, Value> = sessions
            .iter()
            .map(|(id, record)| (id.clone(), record.to_value()))
            .collect();
        let text = pyjson::to_pretty(&json!({ "sessions": map }));
        // Written to a temporary file and renamed: a reader never sees half a file.
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| os_error(&e, dir))?;
        tmp.write_all(text.as_bytes())
            .map_err(|e| os_error(&e, tmp.path()))?;
        tmp.persist(&self.path)
            .map_err(|e| os_error(&e.error, &self.path))?;
        Ok(())
    }
}

fn parse_record(id: &str, raw: &Map<String, Value>) -> SessionRecord {
    SessionRecord {
        session_id: id.to_string(),
        client_name: strip_string(raw.get("client_name")).unwrap_or_else(|| id.to_string()),
        selected_workspace_id: strip_string(raw.get("selected_workspace_id")),
        selected_mode: strip_string(raw.get("selected_mode")),
        recent_request_ids: strip_strings(raw.get("recent_request_ids")),
        last_warning_codes: strip_strings(raw.get("last_warning_codes")),
    }
}

/// An OS error worded as Python words it: `[Errno 17] File exists: '/path'`.
pub fn os_error(err: &std::io::Error, path: &Path) -> SessionError {
    SessionError::Io(python_os_error(err, path))
}

/// Python's `OSError.__str__` for an error on one path.
pub fn python_os_error(err: &std::io::Error, path: &Path) -> String {
    match err.raw_os_error() {
        Some(code) => {
            let text = err.to_string();
            let strerror = text
                .split(" (os error")
                .next()
                .unwrap_or(text.as_str())
                .to_string();
            format!("[Errno {code}] {strerror}: '{}'", path.display())
        }
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_creates_then_keeps_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SessionStore::new(dir.path().join("m").join("sessions.json"));
        assert!(store.list().expect("empty").is_empty());
        std::fs::create_dir_all(dir.path().join("m")).expect("mkdir");
        std::fs::write(
            store.path(),
            r#"{"sessions": {"local": {"recent_request_ids": ["a", 1, " "]}, "bad": 3}}"#,
        )
        .expect("seed");
        let rec = store
            .update_selection("local", "default", Some("default_pi"))
            .expect("select");
        assert_eq!(rec.recent_request_ids, vec!["a"]);
        assert_eq!(rec.client_name, "local");
        let text = std::fs::read_to_string(store.path()).expect("read");
        assert!(!text.ends_with('\n'));
        assert!(!text.contains("bad"));
        assert_eq!(store.list().expect("list").len(), 1);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SessionStore::new(dir.path().join("sessions.json"));
        std::fs::write(store.path(), "{").expect("seed");
        assert!(matches!(store.list(), Err(SessionError::Corrupt(_))));
    }
}
