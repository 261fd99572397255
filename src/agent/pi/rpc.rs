//! `pi --mode rpc`: one long-lived process for every turn of a session, JSON lines on
//! stdin/stdout (LF-separated, a trailing CR tolerated).
//!
//! One turn: `{"id":"prompt-N","type":"prompt","message":…}` → the `response` with that id
//! (`success:false` is a rejection) → events until `agent_end`, whose last assistant
//! message is the answer: its text blocks joined and trimmed, as pi's
//! `get_last_assistant_text` would give (asked for only when `agent_end` carries no
//! assistant message, which saves a round trip per turn).
//!
//! A last message with `stopReason:"error"` is a provider error, unless pi retries it: pi
//! announces a retry with `auto_retry_start` right after that `agent_end`, in the same
//! step, so a `get_state` probe sent on seeing the `agent_end` is answered only after the
//! announcement. With a retry under way the turn goes on until the retry's own `agent_end`
//! (or its `auto_retry_end` failure); without one, the error is final. This keeps the
//! user's retry settings working without ever letting the next prompt collide with a
//! retry still running.
//!
//! A session whose process died, broke the protocol or ran out of time is closed; the next
//! turn starts a fresh process (the conversation starts over, which beats failing every
//! later turn as the reference does).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::{PiConfig, PiError, signal_group};

/// How much of pi's stderr is kept for error messages.
const STDERR_TAIL: usize = 16 * 1024;

/// Extension dialogs that block pi until the client answers.
const DIALOGS: [&str; 4] = ["select", "confirm", "input", "editor"];

/// See the module docs.
#[derive(Debug)]
pub struct RpcSession {
    config: Arc<PiConfig>,
    cwd: PathBuf,
    process: tokio::sync::Mutex<Option<RpcProcess>>,
    started: AtomicU64,
}

impl RpcSession {
    pub fn new(config: Arc<PiConfig>, cwd: &Path) -> Self {
        Self {
            config,
            cwd: cwd.to_path_buf(),
            process: tokio::sync::Mutex::new(None),
            started: AtomicU64::new(0),
        }
    }

    pub fn processes_started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Starts the process unless one is running.
    pub async fn start(&self) -> Result<(), PiError> {
        let mut guard = self.process.lock().await;
        self.ensure(&mut guard)?;
        Ok(())
    }

    /// A live process in `slot`: the one there, or a fresh one when there is none or it
    /// has exited.
    fn ensure<'a>(&self, slot: &'a mut Option<RpcProcess>) -> Result<&'a mut RpcProcess, PiError> {
        if slot.as_mut().is_some_and(RpcProcess::has_exited)
            && let Some(dead) = slot.take()
        {
            tracing::info!("the pi session ended; starting a fresh one");
            dead.close_in_background();
        }
        match slot {
            Some(process) => Ok(process),
            None => {
                let process = RpcProcess::spawn(&self.config, &self.cwd)?;
                self.started.fetch_add(1, Ordering::Relaxed);
                Ok(slot.insert(process))
            }
        }
    }

    pub async fn complete(&self, prompt: &str) -> Result<String, PiError> {
        let mut guard = self.process.lock().await;
        let timeout = self.config.turn_timeout.max(Duration::from_secs(1));
        let process = self.ensure(&mut guard)?;
        let outcome = tokio::time::timeout(timeout, process.turn(prompt)).await;
        let error = match outcome {
            Ok(Ok(text)) => return Ok(text),
            Ok(Err(err)) => err,
            Err(_) => {
                process.abort().await;
                PiError::Timeout(timeout)
            }
        };
        if ends_session(&error)
            && let Some(process) = guard.take()
        {
            tracing::info!(%error, "closing the pi session; the next turn starts a fresh one");
            process.close_in_background();
        }
        Err(error)
    }

    /// Asks pi to stop the turn in progress (RPC `abort`), then ends the process: for a
    /// turn abandoned by a cancel.
    pub async fn abort_and_close(&self) {
        let process = self.process.lock().await.take();
        if let Some(mut process) = process {
            process.abort().await;
            process.close().await;
        }
    }

    pub async fn close(&self) {
        let process = self.process.lock().await.take();
        if let Some(process) = process {
            process.close().await;
        }
    }
}

/// Errors after which the process cannot be trusted with another turn.
fn ends_session(error: &PiError) -> bool {
    matches!(
        error,
        PiError::Timeout(_)
            | PiError::Exited(_)
            | PiError::Protocol(_)
            | PiError::ProviderMismatch { .. }
    )
}

/// The fields of one stdout line that matter here; everything else is skipped unread.
#[derive(Debug, Deserialize)]
struct Line {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    success: Option<bool>,
    error: Option<Value>,
    data: Option<Value>,
    method: Option<String>,
    messages: Option<Vec<Value>>,
    #[serde(rename = "finalError")]
    final_error: Option<String>,
}

/// How a run of the agent ended, from its last assistant message.
enum Ending {
    Text(String),
    Error(String),
    Aborted,
    /// `agent_end` carried no assistant message.
    Unknown,
}

fn ending(messages: Option<&[Value]>) -> Ending {
    let Some(last) = messages
        .unwrap_or_default()
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    else {
        return Ending::Unknown;
    };
    match last.get("stopReason").and_then(Value::as_str) {
        Some("error") => Ending::Error(
            last.get("errorMessage")
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .unwrap_or("the provider failed without a message")
                .to_string(),
        ),
        Some("aborted") => Ending::Aborted,
        _ => Ending::Text(assistant_text(last)),
    }
}

/// pi's `getLastAssistantText`: the text blocks joined without separator, trimmed.
fn assistant_text(message: &Value) -> String {
    let mut text = String::new();
    if let Some(parts) = message.get("content").and_then(Value::as_array) {
        for part in parts {
            if part.get("type").and_then(Value::as_str) == Some("text")
                && let Some(t) = part.get("text").and_then(Value::as_str)
            {
                text.push_str(t);
            }
        }
    }
    text.trim().to_string()
}

/// One running `pi --mode rpc`.
#[derive(Debug)]
struct RpcProcess {
    child: Child,
    /// pi leads its own process group, so its tools' processes end with it.
    pgid: Option<u32>,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    /// Lines read ahead while probing for a retry, to be handled by the turn.
    pushback: VecDeque<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    next_id: u64,
    /// The id of the `get_state` sent at start to check `--provider`, until answered.
    provider_check: Option<(String, String)>,
}

impl RpcProcess {
    fn spawn(config: &PiConfig, cwd: &Path) -> Result<Self, PiError> {
        let mut command = Command::new(&config.command);
        command
            .args(config.rpc_args())
            .current_dir(cwd)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| PiError::Spawn {
            command: config.command.clone(),
            source,
        })?;
        let pgid = child.id();
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::unbounded_channel();
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(read_lines(stdout, tx));
        }
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(pipe) = child.stderr.take() {
            tokio::spawn(read_tail(pipe, stderr.clone()));
        }
        tracing::debug!(pid = ?pgid, cwd = %cwd.display(), "pi rpc session started");
        let mut process = Self {
            child,
            pgid,
            stdin,
            lines,
            pushback: VecDeque::new(),
            stderr,
            next_id: 0,
            provider_check: None,
        };
        // Pipelined ahead of the first prompt: answered as soon as pi is up, checked by
        // the first turn, so the check costs no extra wait.
        if let Some(provider) = config.provider.clone().filter(|p| !p.is_empty()) {
            let id = process.id("state");
            process.provider_check = Some((id, provider));
        }
        Ok(process)
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}-{}", self.next_id)
    }

    fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn stderr_tail(&self) -> String {
        let bytes = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    async fn send(&mut self, message: &Value) -> Result<(), PiError> {
        let mut line = message.to_string();
        line.push('\n');
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(PiError::Exited("its stdin is closed".into()));
        };
        if let Err(err) = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        }
        .await
        {
            // Give the stderr reader a moment: a dead pi usually said why.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let tail = self.stderr_tail();
            return Err(PiError::Exited(if tail.is_empty() {
                err.to_string()
            } else {
                tail
            }));
        }
        Ok(())
    }

    async fn next_line(&mut self) -> Result<String, PiError> {
        if let Some(line) = self.pushback.pop_front() {
            return Ok(line);
        }
        match self.lines.recv().await {
            Some(line) => Ok(line),
            None => {
                // stdout closed: wait briefly for the exit and the last stderr.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                Err(PiError::Exited(self.stderr_tail()))
            }
        }
    }

    async fn next_message(&mut self) -> Result<Line, PiError> {
        loop {
            let line = self.next_line().await?;
            match serde_json::from_str::<Line>(&line) {
                Ok(message) => return Ok(message),
                Err(err) => {
                    tracing::debug!(%err, line, "ignoring a line pi wrote that is not a JSON object")
                }
            }
        }
    }

    /// Lines left over from an earlier turn (nothing should be; logged when there are).
    fn drain_stale(&mut self) {
        self.pushback.clear();
        while let Ok(line) = self.lines.try_recv() {
            tracing::debug!(line, "discarding a stale line from pi");
        }
    }

    async fn turn(&mut self, prompt: &str) -> Result<String, PiError> {
        if let Some((check_id, _)) = &self.provider_check {
            let probe = json!({"id": check_id, "type": "get_state"});
            self.send(&probe).await?;
        } else {
            self.drain_stale();
        }
        let id = self.id("prompt");
        self.send(&json!({"id": id, "type": "prompt", "message": prompt}))
            .await?;
        let mut accepted = false;
        loop {
            let message = self.next_message().await?;
            match message.kind.as_deref() {
                Some("response") => {
                    if self.is_provider_check(&message)? {
                        continue;
                    }
                    if message.id.as_deref() == Some(id.as_str()) {
                        if message.success != Some(true) {
                            return Err(PiError::Rejected(rejection(&message)));
                        }
                        accepted = true;
                    }
                }
                Some("extension_ui_request") => self.answer_dialog(&message).await?,
                Some("auto_retry_end") if message.success == Some(false) && accepted => {
                    return Err(PiError::Provider(
                        message
                            .final_error
                            .unwrap_or_else(|| "pi gave up retrying".to_string()),
                    ));
                }
                Some("agent_end") if accepted => match ending(message.messages.as_deref()) {
                    Ending::Text(text) => return Ok(text),
                    Ending::Aborted => return Err(PiError::Aborted),
                    Ending::Unknown => return self.last_assistant_text().await,
                    Ending::Error(error) => {
                        if self.retry_follows().await? {
                            tracing::info!(%error, "pi retries the turn after a provider error");
                            continue;
                        }
                        return Err(PiError::Provider(error));
                    }
                },
                _ => {}
            }
        }
    }

    /// The answer to the start-up `get_state`: refuses a provider pi replaced silently.
    fn is_provider_check(&mut self, message: &Line) -> Result<bool, PiError> {
        let Some((check_id, wanted)) = &self.provider_check else {
            return Ok(false);
        };
        if message.id.as_deref() != Some(check_id.as_str()) {
            return Ok(false);
        }
        let model = message.data.as_ref().and_then(|d| d.get("model"));
        let provider = model
            .and_then(|m| m.get("provider"))
            .and_then(Value::as_str);
        if provider != Some(wanted.as_str()) {
            let got = match (
                provider,
                model.and_then(|m| m.get("id")).and_then(Value::as_str),
            ) {
                (Some(p), Some(id)) => format!("{p}/{id}"),
                (Some(p), None) => p.to_string(),
                _ => "no model".to_string(),
            };
            return Err(PiError::ProviderMismatch {
                wanted: wanted.clone(),
                got,
            });
        }
        self.provider_check = None;
        Ok(true)
    }

    /// After an error `agent_end`: does pi retry? See the module docs.
    async fn retry_follows(&mut self) -> Result<bool, PiError> {
        let probe = self.id("probe");
        self.send(&json!({"id": probe, "type": "get_state"}))
            .await?;
        let mut read = Vec::new();
        let mut retrying = false;
        loop {
            let line = self.next_line().await?;
            let Ok(message) = serde_json::from_str::<Line>(&line) else {
                continue;
            };
            match message.kind.as_deref() {
                Some("response") if message.id.as_deref() == Some(probe.as_str()) => break,
                Some("auto_retry_start") => retrying = true,
                Some("extension_ui_request") => self.answer_dialog(&message).await?,
                // The retry's own events may already follow: the turn reads them again.
                _ => read.push(line),
            }
        }
        for line in read.into_iter().rev() {
            self.pushback.push_front(line);
        }
        Ok(retrying)
    }

    /// The reference's way to the answer, when `agent_end` did not carry it.
    async fn last_assistant_text(&mut self) -> Result<String, PiError> {
        let id = self.id("last-assistant");
        self.send(&json!({"id": id, "type": "get_last_assistant_text"}))
            .await?;
        loop {
            let message = self.next_message().await?;
            if message.kind.as_deref() == Some("response") && message.id.as_deref() == Some(&id) {
                if message.success != Some(true) {
                    return Err(PiError::Protocol(
                        "get_last_assistant_text failed".to_string(),
                    ));
                }
                return Ok(message
                    .data
                    .as_ref()
                    .and_then(|d| d.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string());
            }
            if message.kind.as_deref() == Some("extension_ui_request") {
                self.answer_dialog(&message).await?;
            }
        }
    }

    /// No one is there to answer an extension's dialog: cancel it rather than hang.
    async fn answer_dialog(&mut self, message: &Line) -> Result<(), PiError> {
        let (Some(id), Some(method)) = (&message.id, &message.method) else {
            return Ok(());
        };
        if !DIALOGS.contains(&method.as_str()) {
            return Ok(());
        }
        tracing::info!(method, "cancelling an extension dialog pi asked for");
        let answer = json!({"type": "extension_ui_response", "id": id, "cancelled": true});
        self.send(&answer).await
    }

    /// Best effort: asks pi to stop the running turn.
    async fn abort(&mut self) {
        let id = self.id("abort");
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            self.send(&json!({"id": id, "type": "abort"})),
        )
        .await;
    }

    /// Closes stdin (pi exits cleanly), then SIGTERM, then SIGKILL, a second apart.
    async fn close(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(1), self.child.wait())
            .await
            .is_ok()
        {
            self.kill_group(Signal::SIGKILL);
            return;
        }
        self.kill_group(Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(1), self.child.wait())
            .await
            .is_err()
        {
            self.kill_group(Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        self.kill_group(Signal::SIGKILL);
    }

    fn close_in_background(self) {
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(self.close());
            }
            Err(_) => drop(self),
        }
    }

    /// Signals what is left of pi's process group (its tools' processes included).
    fn kill_group(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            signal_group(pgid, signal);
        }
    }
}

impl Drop for RpcProcess {
    fn drop(&mut self) {
        // Whatever way the session ends, nothing it started outlives it.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill_group(Signal::SIGKILL);
        }
    }
}

fn rejection(message: &Line) -> String {
    match &message.error {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) if !other.is_null() => other.to_string(),
        _ => "pi rpc prompt rejected".to_string(),
    }
}

/// Splits stdout on LF only (pi's framing; a trailing CR is dropped).
async fn read_lines(stdout: tokio::process::ChildStdout, tx: mpsc::UnboundedSender<String>) {
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                if buf.is_empty() {
                    continue;
                }
                if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                    break;
                }
            }
        }
    }
}

/// Keeps the last [`STDERR_TAIL`] bytes of stderr.
async fn read_tail(mut pipe: tokio::process::ChildStderr, tail: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut buf = tail.lock().unwrap_or_else(|e| e.into_inner());
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > STDERR_TAIL {
                    let cut = buf.len() - STDERR_TAIL;
                    buf.drain(..cut);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_are_read_from_the_last_assistant_message() {
        let ok = json!([{"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": [{"type": "text", "text": " a"}, {"type": "toolCall"}, {"type": "text", "text": "b \n"}], "stopReason": "stop"}]);
        assert!(matches!(ending(ok.as_array().map(Vec::as_slice)), Ending::Text(t) if t == "ab"));
        let err = json!([{"role": "assistant", "content": [], "stopReason": "error", "errorMessage": "500 boom"}]);
        assert!(
            matches!(ending(err.as_array().map(Vec::as_slice)), Ending::Error(e) if e == "500 boom")
        );
        let aborted = json!([{"role": "assistant", "content": [], "stopReason": "aborted"}]);
        assert!(matches!(
            ending(aborted.as_array().map(Vec::as_slice)),
            Ending::Aborted
        ));
        assert!(matches!(ending(None), Ending::Unknown));
    }
}
