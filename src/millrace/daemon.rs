//! The Millrace daemon as a child process: started as argv, its output read and kept in
//! a log file, stopped politely (`control stop`), then firmly (SIGTERM, SIGKILL).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::millrace::command::{Millrace, RuntimeError, exit_code};
use crate::millrace::exit_watch::alive;

/// A running (or finished) daemon this process started.
#[derive(Debug)]
pub struct Daemon {
    /// `None` for a daemon adopted from a worker that is gone: not our child, so its end
    /// is seen through a pidfd (`exit_watch`).
    child: Option<Child>,
    pid: Option<u32>,
    log_path: PathBuf,
    exit: Option<i32>,
}

impl Daemon {
    /// Spawns `millrace run daemon --workspace W --mode M --monitor none`. Its stdout and
    /// stderr go, line by line, to `log_path` (the reference pipes them and never reads,
    /// which can stall a chatty daemon).
    pub async fn start(
        millrace: &Millrace,
        workspace: &Path,
        cwd: &Path,
        mode: &str,
        log_path: PathBuf,
    ) -> Result<Self, RuntimeError> {
        if let Some(dir) = log_path.parent() {
            let _ = tokio::fs::create_dir_all(dir).await;
        }
        let mut child = Command::new(&millrace.command)
            .args(["run", "daemon", "--workspace"])
            .arg(workspace)
            .args(["--mode", mode, "--monitor", "none"])
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: the runtime does not stop its runner children, so
            // stopping the daemon firmly means signalling the whole group.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                RuntimeError::Spawn(crate::millrace::sessions::python_os_error(
                    &e,
                    Path::new(&millrace.command),
                ))
            })?;
        let pid = child.id();
        let log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .await
            .ok();
        let log = std::sync::Arc::new(tokio::sync::Mutex::new(log));
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(copy_lines(stdout, log.clone(), "out"));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(copy_lines(stderr, log, "err"));
        }
        tracing::info!(pid, workspace = %workspace.display(), mode, "daemon started");
        Ok(Self {
            child: Some(child),
            pid,
            log_path,
            exit: None,
        })
    }

    /// Takes over a daemon another (dead) worker started, when `pid` is still a live
    /// `millrace … daemon` process; `None` otherwise (gone, a zombie, or a reused pid).
    pub fn adopt(pid: u32, log_path: PathBuf) -> Option<Self> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_millrace = args.iter().any(|a| a.ends_with(b"millrace"))
            || args.iter().any(|a| a.windows(8).any(|w| w == b"millrace"));
        let is_daemon = args.iter().any(|a| *a == b"daemon");
        if !(is_millrace && is_daemon && alive(pid)) {
            return None;
        }
        tracing::info!(pid, "adopted a running daemon");
        Some(Self {
            child: None,
            pid: Some(pid),
            log_path,
            exit: None,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit code once the daemon has ended, without waiting.
    pub fn try_exit(&mut self) -> Option<i32> {
        if self.exit.is_none() {
            match &mut self.child {
                Some(child) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        self.exit = Some(exit_code(&status));
                    }
                }
                None => {
                    if !self.pid.is_some_and(alive) {
                        self.exit = Some(-1);
                    }
                }
            }
        }
        self.exit
    }

    /// Waits for the daemon to end.
    pub async fn wait(&mut self) -> i32 {
        if let Some(code) = self.exit {
            return code;
        }
        let code = match &mut self.child {
            Some(child) => match child.wait().await {
                Ok(status) => exit_code(&status),
                Err(_) => -1,
            },
            None => {
                // Not our child: its exit status is not ours to read, only its end.
                if let Some(pid) = self.pid {
                    crate::millrace::exit_watch::exited(pid).await;
                }
                -1
            }
        };
        self.exit = Some(code);
        code
    }

    /// Asks the runtime to stop, waits up to `grace`, then SIGTERM (5 s), then SIGKILL.
    pub async fn stop(
        &mut self,
        millrace: &Millrace,
        workspace: &Path,
        cwd: &Path,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        let asked = millrace
            .run_checked(
                &[
                    "control".into(),
                    "stop".into(),
                    "--workspace".into(),
                    workspace.into(),
                ],
                cwd,
            )
            .await;
        if self.wait_for(grace).await {
            return asked.map(|_| ());
        }
        tracing::warn!(
            pid = self.pid,
            "daemon did not stop in time; sending SIGTERM to its group"
        );
        self.signal_group(nix::sys::signal::Signal::SIGTERM);
        if self.wait_for(Duration::from_secs(5)).await {
            self.signal_group(nix::sys::signal::Signal::SIGKILL);
            return Ok(());
        }
        tracing::warn!(pid = self.pid, "daemon ignored SIGTERM; killing its group");
        self.signal_group(nix::sys::signal::Signal::SIGKILL);
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        self.wait_for(Duration::from_secs(5)).await;
        Ok(())
    }

    /// Stops the daemon and its runners now: SIGTERM to its group, SIGKILL after `grace`
    /// (at once when `grace` is zero). For a cancel, where waiting for the running stage to
    /// end is what is not wanted; the stale state it leaves is cleared by the caller.
    pub async fn kill(&mut self, grace: Duration) {
        if !grace.is_zero() {
            self.signal_group(nix::sys::signal::Signal::SIGTERM);
        }
        if grace.is_zero() || !self.wait_for(grace).await {
            self.signal_group(nix::sys::signal::Signal::SIGKILL);
            if let Some(child) = &mut self.child {
                let _ = child.start_kill();
            }
            self.wait_for(Duration::from_secs(5)).await;
        }
        // Runners the daemon left behind in its group.
        self.signal_group(nix::sys::signal::Signal::SIGKILL);
    }

    /// Signals the daemon's process group (the daemon and the runners it started).
    fn signal_group(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    async fn wait_for(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.wait()).await.is_ok()
    }
}

async fn copy_lines<R: tokio::io::AsyncRead + Unpin>(
    reader: R,
    log: std::sync::Arc<tokio::sync::Mutex<Option<tokio::fs::File>>>,
    stream: &'static str,
) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::trace!(stream, %line, "daemon output");
        if let Some(file) = log.lock().await.as_mut() {
            let _ = file
                .write_all(format!("[{stream}] {line}\n").as_bytes())
                .await;
        }
    }
}
