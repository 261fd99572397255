//! The real `pi` against a scripted model server (`tests/support/model_server.py`), offline
//! and deterministic, as the notes on the pi runner describe: a private agent directory
//! with `models.json` (the server's port written in) and `settings.json`, `PI_OFFLINE=1`,
//! `PI_TELEMETRY=0` and a temporary `HOME`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use super::{pi_bin, repo_root};

/// A scripted OpenAI-compatible chat-completions server on 127.0.0.1 (ephemeral port).
/// It ends when dropped (its stdin closes and it is killed).
pub struct ModelServer {
    pub port: u16,
    child: Child,
    /// Held open: the server exits when it closes.
    _stdin: ChildStdin,
    dir: TempDir,
}

impl ModelServer {
    /// Starts the server with `script` (`{"replies": [...], "default": {...}}`, see the
    /// server's docs) and waits for its port.
    pub fn start(script: Value) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("model-server-")
            .tempdir()
            .expect("model server temp dir");
        let script_path = dir.path().join("script.json");
        std::fs::write(&script_path, script.to_string()).expect("write script");
        let server = repo_root().join("tests/support/model_server.py");
        assert!(server.is_file(), "missing {}", server.display());
        let mut child = Command::new("python3")
            .arg(&server)
            .arg("--script")
            .arg(&script_path)
            .arg("--log")
            .arg(dir.path().join("requests.jsonl"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {} with python3: {e}", server.display()));
        let stdin = child.stdin.take().expect("stdin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the port line");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("model server said {line:?} instead of PORT <n>"));
        ModelServer {
            port,
            child,
            _stdin: stdin,
            dir,
        }
    }

    /// Replaces the script (the server reloads it; use counters start over).
    pub fn set_script(&self, script: Value) {
        let tmp = self.dir.path().join("script.json.tmp");
        std::fs::write(&tmp, script.to_string()).expect("write script");
        std::fs::rename(&tmp, self.dir.path().join("script.json")).expect("replace script");
    }

    /// Every request received so far, in order: `{n, reply, last_text, message_count, body}`.
    pub fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The `last_text` of each request, shortened, for failure messages.
    pub fn summary(&self) -> String {
        self.requests()
            .iter()
            .map(|r| {
                let text: String = r["last_text"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(70)
                    .collect();
                format!(
                    "#{} reply={} messages={} {:?}",
                    r["n"], r["reply"], r["message_count"], text
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reply whose text is the decision JSON in a fenced block, for prompts that ask for one.
pub fn decision_reply(decision: Value) -> Value {
    json!({
        "when": "Decide whether this task",
        "text": format!("Here is my decision.\n```json\n{}\n```\n", serde_json::to_string_pretty(&decision).expect("json")),
    })
}

/// [`decision_reply`] only for the decision about a task whose text contains `task_part`.
pub fn decision_reply_for(task_part: &str, decision: Value) -> Value {
    let mut reply = decision_reply(decision);
    reply["when"] = json!(["Decide whether this task", task_part]);
    reply
}

/// A private pi installation state: agent directory, HOME and a working directory.
pub struct PiHome {
    pub dir: TempDir,
}

impl PiHome {
    /// `models.json` pointing provider `fake` (model `fake-chat`) at `server`; retries off
    /// unless `retry` gives pi's `retry` settings.
    pub fn new(server: &ModelServer, retry: Option<Value>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pi-home-")
            .tempdir()
            .expect("pi temp dir");
        let agent = dir.path().join("agent");
        std::fs::create_dir_all(&agent).expect("agent dir");
        std::fs::create_dir_all(dir.path().join("home")).expect("home dir");
        std::fs::create_dir_all(dir.path().join("work")).expect("work dir");
        let models = json!({"providers": {"fake": {
            "baseUrl": format!("http://127.0.0.1:{}/v1", server.port),
            "api": "openai-completions",
            "apiKey": "k",
            "compat": {"supportsDeveloperRole": false, "supportsReasoningEffort": false},
            "models": [{"id": "fake-chat", "reasoning": false, "input": ["text"], "contextWindow": 128000, "maxTokens": 4096}]
        }}});
        std::fs::write(agent.join("models.json"), models.to_string()).expect("models.json");
        let retry = retry.unwrap_or_else(
            || json!({"enabled": false, "provider": {"maxRetries": 0, "timeoutMs": 30000}}),
        );
        let settings = json!({
            "defaultProvider": "fake",
            "defaultModel": "fake-chat",
            "quietStartup": true,
            "enableInstallTelemetry": false,
            "retry": retry,
        });
        std::fs::write(agent.join("settings.json"), settings.to_string()).expect("settings.json");
        PiHome { dir }
    }

    /// A clean working directory (scripted tool calls really run there).
    pub fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// The environment pi needs: `PI_CODING_AGENT_DIR`, `PI_OFFLINE`, `PI_TELEMETRY`, `HOME`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "PI_CODING_AGENT_DIR".into(),
                self.dir.path().join("agent").display().to_string(),
            ),
            ("PI_OFFLINE".into(), "1".into()),
            ("PI_TELEMETRY".into(), "0".into()),
            (
                "HOME".into(),
                self.dir.path().join("home").display().to_string(),
            ),
        ]
    }

    /// A `pi` that records its argv (one file per run, arguments NUL-terminated, in
    /// `argv/`) before running the real one: to check the command lines millracer builds.
    pub fn recording_pi(&self) -> (PathBuf, PathBuf) {
        let dir = self.dir.path().join("argv");
        std::fs::create_dir_all(&dir).expect("argv dir");
        let wrapper = super::write_script(
            &self.dir.path().join("pi-recording"),
            &format!(
                "#!/bin/sh\nprintf '%s\\0' \"$@\" > '{}'/\"$(date +%s%N)-$$\"\nexec '{}' \"$@\"\n",
                dir.display(),
                pi_bin().display()
            ),
        );
        (wrapper, dir)
    }
}

/// The argv of each run a [`PiHome::recording_pi`] recorded, oldest first.
pub fn recorded_argv(dir: &Path) -> Vec<Vec<String>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .map(|file| {
            let bytes = std::fs::read(file).unwrap_or_default();
            let mut args: Vec<String> = bytes
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.pop(); // after the last NUL
            args
        })
        .collect()
}

/// How long a pi test may run a `millracer` command.
pub const PI_COMMAND_TIMEOUT: Duration = Duration::from_secs(90);
