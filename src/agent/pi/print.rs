//! `pi --print`: one process per turn. The answer is stdout without its trailing
//! newlines; a non-zero exit is an error carrying stderr (pi exits 1 on a provider error).
//!
//! stdin is null: `pi --print` otherwise waits for stdin to close and prepends whatever
//! was piped to the prompt (so `millracer run` fed from a pipe would leak its input into
//! every turn). Each turn has the session's timeout; on expiry pi's whole process group is
//! killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::process::Command;

use super::{PiConfig, PiError, signal_group};

/// See the module docs.
#[derive(Debug)]
pub struct PrintSession {
    config: Arc<PiConfig>,
    cwd: PathBuf,
    started: AtomicU64,
}

impl PrintSession {
    pub fn new(config: Arc<PiConfig>, cwd: &Path) -> Self {
        Self {
            config,
            cwd: cwd.to_path_buf(),
            started: AtomicU64::new(0),
        }
    }

    pub fn processes_started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    pub async fn complete(&self, prompt: &str) -> Result<String, PiError> {
        let config = &self.config;
        let child = Command::new(&config.command)
            .args(config.print_args(prompt))
            .current_dir(&self.cwd)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| PiError::Spawn {
                command: config.command.clone(),
                source,
            })?;
        self.started.fetch_add(1, Ordering::Relaxed);
        let pgid = child.id();
        let timeout = config.turn_timeout.max(Duration::from_secs(1));
        let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(err)) => return Err(PiError::Exited(err.to_string())),
            Err(_) => {
                // The child was dropped (and killed) with the future; its tools too.
                if let Some(pgid) = pgid {
                    signal_group(pgid, Signal::SIGKILL);
                }
                return Err(PiError::Timeout(timeout));
            }
        };
        if let Some(pgid) = pgid {
            // Tools pi started in the background end with the turn.
            signal_group(pgid, Signal::SIGKILL);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let why = [stderr.trim(), stdout.trim()]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or("no output");
            let code = output
                .status
                .code()
                .map_or_else(|| "a signal".to_string(), |c| c.to_string());
            return Err(PiError::PrintFailed {
                code,
                why: why.to_string(),
            });
        }
        Ok(stdout.trim_end_matches('\n').to_string())
    }
}
