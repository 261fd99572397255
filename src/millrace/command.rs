//! The Millrace runtime adapter: `millrace` commands run as argv (never through a shell),
//! each with a timeout, with failures worded as the reference words them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::process::Command;

use crate::contract::pyjson;
use crate::contract::vocab::ErrorCode;

/// How to call the runtime.
#[derive(Debug, Clone)]
pub struct Millrace {
    /// The program (`--millrace-command`): one executable, not a shell line.
    pub command: String,
    /// Upper bound for one short command (status, init, queue add, control …).
    pub timeout: Duration,
}

/// What a finished command printed.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    pub argv: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// A runtime command that did not give a usable answer. Display texts follow the
/// reference (`command failed (<rc>): <argv>\n<detail>`, `[Errno 2] …`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("command failed ({code}): {command}\n{detail}")]
    Failed {
        code: i32,
        command: String,
        detail: String,
    },
    #[error("{0}")]
    Spawn(String),
    #[error("command timed out after {seconds}s: {command}")]
    Timeout { seconds: f64, command: String },
    #[error("millrace status JSON must be an object")]
    NotAnObject,
    #[error("{0}")]
    InvalidJson(String),
}

impl RuntimeError {
    /// The error code a result carries for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Timeout { .. } => ErrorCode::RuntimeTimeout,
            _ => ErrorCode::RuntimeCommandFailed,
        }
    }
}

impl Millrace {
    pub fn new(command: impl Into<String>, timeout: Duration) -> Self {
        Self {
            command: command.into(),
            timeout,
        }
    }

    /// `millrace status --workspace W --format json`, parsed; the object is returned
    /// verbatim. Empty output counts as `{}`, as in the reference.
    pub async fn status(
        &self,
        workspace: &Path,
        cwd: &Path,
    ) -> Result<Map<String, Value>, RuntimeError> {
        let out = self
            .run_checked(
                &[
                    "status".into(),
                    "--workspace".into(),
                    workspace.into(),
                    "--format".into(),
                    "json".into(),
                ],
                cwd,
            )
            .await?;
        let text = if out.stdout.is_empty() {
            "{}"
        } else {
            out.stdout.as_str()
        };
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(RuntimeError::NotAnObject),
            Err(err) => Err(RuntimeError::InvalidJson(
                pyjson::decode_error(text).unwrap_or_else(|| err.to_string()),
            )),
        }
    }

    /// Runs one command and fails on a non-zero exit.
    pub async fn run_checked(
        &self,
        args: &[OsString],
        cwd: &Path,
    ) -> Result<CommandOutput, RuntimeError> {
        let out = self.run(args, cwd).await?;
        if out.code != 0 {
            let detail = [out.stderr.trim(), out.stdout.trim()]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or("no output")
                .to_string();
            return Err(RuntimeError::Failed {
                code: out.code,
                command: out.argv.join(" "),
                detail,
            });
        }
        Ok(out)
    }

    /// Runs one command with a null stdin, capturing its output, within the timeout.
    /// The child is killed if the timeout passes or the caller goes away.
    #[tracing::instrument(name = "millrace", skip_all, fields(argv = tracing::field::Empty, code = tracing::field::Empty))]
    pub async fn run(&self, args: &[OsString], cwd: &Path) -> Result<CommandOutput, RuntimeError> {
        let mut argv = vec![self.command.clone()];
        argv.extend(args.iter().map(|a| a.to_string_lossy().into_owned()));
        let span = tracing::Span::current();
        span.record("argv", argv.join(" ").as_str());
        let started = Instant::now();
        let child = Command::new(&self.command)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| RuntimeError::Spawn(spawn_error(&e, &self.command)))?;
        let output = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) => return Err(RuntimeError::Spawn(e.to_string())),
            Err(_) => {
                return Err(RuntimeError::Timeout {
                    seconds: self.timeout.as_secs_f64(),
                    command: argv.join(" "),
                });
            }
        };
        let code = exit_code(&output.status);
        span.record("code", code);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "runtime command finished"
        );
        Ok(CommandOutput {
            argv,
            code,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        })
    }
}

/// Python's returncode: the exit status, or minus the signal that ended the process.
pub fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| -s))
        .unwrap_or(-1)
}

/// The reference's text for a program that cannot be started.
fn spawn_error(err: &std::io::Error, command: &str) -> String {
    crate::millrace::sessions::python_os_error(err, Path::new(command))
}

/// The working directory for runtime commands: `--cwd`, else the workspace, falling back
/// to the process's cwd when that does not exist (as the reference does).
pub fn command_cwd(cwd_option: Option<&Path>, workspace: &Path) -> PathBuf {
    let candidate = cwd_option.map_or_else(
        || workspace.to_path_buf(),
        crate::millrace::workspace::resolve_path,
    );
    if candidate.is_dir() {
        candidate
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
    }
}

/// The runtime's answer to an inspection or control command, as the 0.3.0 reference
/// reports it (`_parsed_command_payload`): its JSON object when it prints one (a list
/// becomes `items`), else its `key: value` lines as fields (`lines` for the rest, `text`
/// when no line is a field), plus `command` (the argv) and `stderr` when not empty. The
/// 0.21 CLI has no `--format json` for `queue`, `runs`, `control` or `doctor`.
pub fn command_payload(out: &CommandOutput) -> Map<String, Value> {
    let mut payload = parse_cli_payload(&out.stdout);
    payload
        .entry("command")
        .or_insert_with(|| Value::from(out.argv.clone()));
    let stderr = out.stderr.trim();
    if !stderr.is_empty() {
        payload
            .entry("stderr")
            .or_insert_with(|| Value::from(stderr));
    }
    payload
}

/// The reference's `_parse_cli_payload`.
pub fn parse_cli_payload(stdout: &str) -> Map<String, Value> {
    let text = stdout.trim();
    let mut out = Map::new();
    if text.is_empty() {
        return out;
    }
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        match value {
            Value::Object(map) => return map,
            Value::Array(items) => {
                out.insert("items".into(), Value::Array(items));
            }
            other => {
                out.insert("value".into(), other);
            }
        }
        return out;
    }
    let mut unparsed = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let field = [':', '=']
            .into_iter()
            .filter_map(|sep| line.split_once(sep))
            .find_map(|(key, value)| {
                let key = normalize_cli_key(key);
                (!key.is_empty()).then(|| (key, parse_cli_scalar(value.trim())))
            });
        match field {
            Some((key, value)) => {
                out.insert(key, value);
            }
            None => unparsed.push(Value::from(line)),
        }
    }
    if out.is_empty() {
        out.insert("text".into(), Value::from(text));
    } else if !unparsed.is_empty() {
        out.insert("lines".into(), Value::Array(unparsed));
    }
    out
}

/// Lower case, runs of anything but `[a-z0-9]` become `_`, trimmed of `_`.
fn normalize_cli_key(key: &str) -> String {
    let mut out = String::new();
    for c in key.trim().to_lowercase().chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

fn parse_cli_scalar(value: &str) -> Value {
    match value.to_lowercase().as_str() {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        "none" | "null" => return Value::Null,
        _ => {}
    }
    let digits = value.strip_prefix('-').unwrap_or(value);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = value.parse::<i64>() {
            return Value::from(n);
        }
    } else if let Some((whole, frac)) = digits.split_once('.')
        && !whole.is_empty()
        && !frac.is_empty()
        && whole
            .bytes()
            .chain(frac.bytes())
            .all(|b| b.is_ascii_digit())
        && let Ok(f) = value.parse::<f64>()
    {
        return Value::from(f);
    }
    Value::from(value)
}

/// `runs ls` prints one block of `key: value` lines per run, each starting `run_id:`.
fn run_blocks(stdout: &str) -> Vec<Value> {
    let mut blocks: Vec<String> = Vec::new();
    for line in stdout.lines() {
        if line.trim_start().starts_with("run_id:") || blocks.is_empty() {
            blocks.push(String::new());
        }
        if let Some(block) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks
        .iter()
        .map(|b| parse_cli_payload(b))
        .filter(|m| m.contains_key("run_id"))
        .map(Value::Object)
        .collect()
}

/// The inspection and control commands of the operator actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspect {
    /// `queue ls`
    QueueList,
    /// `queue show <id>`
    QueueShow(String),
    /// `runs ls`
    RunsList,
    /// `runs show <id>`
    RunsShow(String),
    /// `doctor`
    Doctor,
    /// `control pause`
    Pause,
    /// `control resume`
    Resume,
}

impl Inspect {
    /// Whether the command only reads the runtime's files under `millrace-agents/` (its
    /// answer changes only when they do), so a remembered answer stays true until then.
    /// `doctor` also looks at the machine; pause and resume change the workspace.
    pub fn reads_records_only(&self) -> bool {
        matches!(
            self,
            Self::QueueList | Self::QueueShow(_) | Self::RunsList | Self::RunsShow(_)
        )
    }

    /// The command's words after `millrace`, options first, the id last.
    pub(crate) fn args(&self) -> Vec<OsString> {
        let words: &[&str] = match self {
            Self::QueueList => &["queue", "ls"],
            Self::QueueShow(_) => &["queue", "show"],
            Self::RunsList => &["runs", "ls"],
            Self::RunsShow(_) => &["runs", "show"],
            Self::Doctor => &["doctor"],
            Self::Pause => &["control", "pause"],
            Self::Resume => &["control", "resume"],
        };
        let mut args: Vec<OsString> = words.iter().map(Into::into).collect();
        if let Self::QueueShow(id) | Self::RunsShow(id) = self {
            // An id that looks like an option would be taken as one: `--` ends options.
            args.push("--".into());
            args.push(id.into());
        }
        args
    }
}

impl Millrace {
    /// Runs an inspection or control command against a workspace and parses its answer
    /// (see [`command_payload`]). A non-zero exit is an error.
    pub async fn inspect(
        &self,
        what: &Inspect,
        workspace: &Path,
        cwd: &Path,
    ) -> Result<Map<String, Value>, RuntimeError> {
        let mut args = vec!["--workspace".into(), workspace.into()];
        let mut command = what.args();
        // Options before `--`, so the id stays the last word.
        let tail = command
            .iter()
            .position(|a| a == "--")
            .map(|i| command.split_off(i))
            .unwrap_or_default();
        command.append(&mut args);
        command.extend(tail);
        let out = self.run_checked(&command, cwd).await?;
        let mut payload = command_payload(&out);
        if *what == Inspect::RunsList {
            // The reference's parse keeps only the last run's fields (keys repeat per run);
            // every run is kept here too, in order.
            payload.insert("runs".into(), Value::Array(run_blocks(&out.stdout)));
        }
        Ok(payload)
    }

    /// `queue cancel <id> --reason R`: the runtime requires a reason.
    pub async fn cancel_work_item(
        &self,
        workspace: &Path,
        cwd: &Path,
        work_item_id: &str,
        reason: &str,
    ) -> Result<Map<String, Value>, RuntimeError> {
        let args: Vec<OsString> = vec![
            "queue".into(),
            "cancel".into(),
            "--workspace".into(),
            workspace.into(),
            "--reason".into(),
            reason.into(),
            "--".into(),
            work_item_id.into(),
        ];
        let out = self.run_checked(&args, cwd).await?;
        Ok(command_payload(&out))
    }
}

#[cfg(test)]
mod payload_tests {
    use super::*;

    #[test]
    fn cli_lines_become_fields_as_the_reference_parses_them() {
        let parsed = parse_cli_payload(
            "ok: true\nerrors: 0\nwarning: runner_binary_unavailable x\nratio = 1.5\nplain line\n",
        );
        assert_eq!(parsed["ok"], Value::Bool(true));
        assert_eq!(parsed["errors"], Value::from(0));
        assert_eq!(
            parsed["warning"],
            Value::from("runner_binary_unavailable x")
        );
        assert_eq!(parsed["ratio"], Value::from(1.5));
        assert_eq!(parsed["lines"], serde_json::json!(["plain line"]));
        assert_eq!(
            parse_cli_payload("just text"),
            serde_json::json!({"text": "just text"})
                .as_object()
                .cloned()
                .unwrap_or_default()
        );
        assert_eq!(
            parse_cli_payload("[1,2]")["items"],
            serde_json::json!([1, 2])
        );
        assert!(parse_cli_payload("  ").is_empty());
        assert_eq!(
            normalize_cli_key(" Active Task-Count "),
            "active_task_count"
        );
    }
}
