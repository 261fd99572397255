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
