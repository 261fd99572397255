//! The pi runner: the coding-agent CLI that does millracer's natural-language work (the
//! route decision, direct work, progress notes and the final answer).
//!
//! Two harnesses, as in the reference: [`rpc`] keeps one `pi --mode rpc` process for every
//! turn of a session (so the conversation grows), [`print`] runs `pi --print` once per
//! turn. Both take the reference's command lines. What they do better than the reference
//! (see the notes on the pi runner):
//! - a provider error is an error, never an empty reply;
//! - pi's own auto-retry is followed to its end (the user's retry settings keep working,
//!   and the next prompt cannot collide with a retry still running);
//! - a session whose process died or timed out is replaced on the next turn;
//! - print mode gets a null stdin and writes no session file;
//! - an extension dialog (`extension_ui_request`) is answered "cancelled" instead of
//!   blocking the turn;
//! - an unknown `--provider`, which pi silently replaces by its default, is refused.

pub mod print;
pub mod rpc;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::agent::prompts::SYSTEM_PROMPT;
use crate::contract::vocab::ErrorCode;

/// The reference's per-turn timeout when `--pi-timeout-seconds` is not given.
pub const DEFAULT_TURN_TIMEOUT: Duration = Duration::from_secs(3600);

/// One process per turn, or one process for the whole session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Rpc,
    Print,
}

/// How pi is run. Built from the common options (`--pi-command`, `--provider`, `--model`,
/// `--thinking`, `--skill`, `--no-default-skills`, `--pi-timeout-seconds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiConfig {
    /// The pi program (one executable, never a shell line).
    pub command: String,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Always passed (the reference's default is `high`); empty means "do not pass".
    pub thinking: Option<String>,
    /// Absolute paths of skills (a `SKILL.md` or a package directory).
    pub skills: Vec<PathBuf>,
    /// The longest one turn may take, retries included.
    pub turn_timeout: Duration,
    pub kind: SessionKind,
    /// Extra environment for pi (on top of the inherited one).
    pub env: Vec<(OsString, OsString)>,
}

impl Default for PiConfig {
    fn default() -> Self {
        Self {
            command: "pi".to_string(),
            provider: None,
            model: None,
            thinking: Some("high".to_string()),
            skills: Vec::new(),
            turn_timeout: DEFAULT_TURN_TIMEOUT,
            kind: SessionKind::Rpc,
            env: Vec::new(),
        }
    }
}

/// Why a pi turn gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum PiError {
    #[error("cannot start pi ({command}): {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// The model provider failed (pi's `stopReason: "error"`), after any retries pi made.
    #[error("pi reported a provider error: {0}")]
    Provider(String),
    #[error("pi rejected the prompt: {0}")]
    Rejected(String),
    #[error("pi gave no answer within {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The process ended (or its pipes closed) before the turn ended.
    #[error("pi stopped before it answered{}", detail(.0))]
    Exited(String),
    /// `pi --print` exited non-zero (a provider error does that too).
    #[error("pi --print exited with {code}: {why}")]
    PrintFailed { code: String, why: String },
    #[error("pi aborted the turn before it answered")]
    Aborted,
    #[error("pi protocol error: {0}")]
    Protocol(String),
    #[error(
        "pi is not using provider {wanted:?}: it chose {got} (pi falls back to its default for an unknown provider; check --provider and pi's models.json)"
    )]
    ProviderMismatch { wanted: String, got: String },
    #[error("skill not found: {0}")]
    SkillMissing(PathBuf),
}

fn detail(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

impl PiError {
    /// The error code an OpsResult carries for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Spawn { .. } | Self::SkillMissing(_) | Self::ProviderMismatch { .. } => {
                ErrorCode::RunnerUnavailable
            }
            Self::Timeout(_) => ErrorCode::RunnerTimeout,
            _ => ErrorCode::RunnerFailed,
        }
    }
}

impl PiConfig {
    /// The arguments both harnesses share, after the mode flags: the system prompt, then
    /// `--provider`, `--model`, `--thinking` and one `--skill` per skill, as the reference
    /// orders them.
    fn common_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--no-context-files".into(),
            "--append-system-prompt".into(),
            SYSTEM_PROMPT.into(),
        ];
        if let Some(provider) = self.provider.as_deref().filter(|p| !p.is_empty()) {
            args.extend(["--provider".into(), provider.into()]);
        }
        if let Some(model) = self.model.as_deref().filter(|m| !m.is_empty()) {
            args.extend(["--model".into(), model.into()]);
        }
        if let Some(thinking) = self.thinking.as_deref().filter(|t| !t.is_empty()) {
            args.extend(["--thinking".into(), thinking.into()]);
        }
        for skill in &self.skills {
            args.extend(["--skill".into(), skill.into()]);
        }
        args
    }

    /// `pi --mode rpc --no-session --no-context-files --append-system-prompt …`.
    pub fn rpc_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--mode".into(), "rpc".into(), "--no-session".into()];
        args.extend(self.common_args());
        args
    }

    /// `pi --print --no-session --no-context-files --append-system-prompt … <prompt>`.
    /// (`--no-session` is ours: the reference's print mode leaves a session file per turn.)
    pub fn print_args(&self, prompt: &str) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--print".into(), "--no-session".into()];
        args.extend(self.common_args());
        args.push(prompt.into());
        args
    }
}

/// Makes pi sessions from one configuration. Cheap to clone; starts nothing by itself.
#[derive(Debug, Clone)]
pub struct PiRunner {
    config: Arc<PiConfig>,
}

impl PiRunner {
    pub fn new(config: PiConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }

    pub fn config(&self) -> &PiConfig {
        &self.config
    }

    /// A session whose turns run in `cwd` (the reference binds a session to one cwd).
    /// Nothing starts until [`PiSession::start`] or the first turn.
    pub fn session(&self, cwd: &Path) -> PiSession {
        match self.config.kind {
            SessionKind::Rpc => {
                PiSession::Rpc(Box::new(rpc::RpcSession::new(self.config.clone(), cwd)))
            }
            SessionKind::Print => {
                PiSession::Print(print::PrintSession::new(self.config.clone(), cwd))
            }
        }
    }
}

/// A conversation with pi in one working directory.
#[derive(Debug)]
pub enum PiSession {
    Rpc(Box<rpc::RpcSession>),
    Print(print::PrintSession),
}

impl PiSession {
    /// One turn: sends `prompt`, returns pi's final text (trimmed in RPC mode, without
    /// trailing newlines in print mode). Turns of one session run one at a time.
    pub async fn complete(&self, prompt: &str) -> Result<String, PiError> {
        match self {
            Self::Rpc(s) => s.complete(prompt).await,
            Self::Print(s) => s.complete(prompt).await,
        }
    }

    /// Starts the long-lived process now (RPC), so its start-up overlaps other work.
    /// A failure here is reported again by the first turn.
    pub async fn start(&self) {
        if let Self::Rpc(s) = self
            && let Err(err) = s.start().await
        {
            tracing::debug!(%err, "pi did not start early");
        }
    }

    /// Ends the process, if any: stdin closed, then SIGTERM, then SIGKILL.
    pub async fn close(&self) {
        if let Self::Rpc(s) = self {
            s.close().await;
        }
    }

    /// A cancel: pi is asked to stop its turn (RPC `abort`), then the process ends. A print
    /// session has no process between turns; an abandoned one was killed with its turn.
    pub async fn abort(&self) {
        if let Self::Rpc(s) = self {
            s.abort_and_close().await;
        }
    }

    /// How many pi processes this session started so far.
    pub fn processes_started(&self) -> u64 {
        match self {
            Self::Rpc(s) => s.processes_started(),
            Self::Print(s) => s.processes_started(),
        }
    }
}

/// Resolves `--skill` paths (each must exist) or, unless `no_default`, discovers the
/// default skills next to the executable or the workspace.
pub fn resolve_skills(
    given: &[PathBuf],
    no_default: bool,
    workspace: Option<&Path>,
) -> Result<Vec<PathBuf>, PiError> {
    if !given.is_empty() {
        return given
            .iter()
            .map(|p| {
                let abs = crate::millrace::workspace::resolve_path(p);
                if abs.exists() {
                    Ok(abs)
                } else {
                    Err(PiError::SkillMissing(abs))
                }
            })
            .collect();
    }
    if no_default {
        return Ok(Vec::new());
    }
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Some(ws) = workspace {
        starts.push(crate::millrace::workspace::resolve_path(ws));
    }
    Ok(starts
        .iter()
        .find_map(|s| discover_default_skills(s))
        .unwrap_or_default())
}

/// The reference's default skills: the first ancestor of `start` (itself included) with
/// `dev/source/millrace/docs/skills/` or `source/millrace/docs/skills/` holding both
/// `millrace-autonomous-delegation` and `millrace-ops-agent-manual`.
pub fn discover_default_skills(start: &Path) -> Option<Vec<PathBuf>> {
    const SKILLS: [&str; 2] = [
        "millrace-autonomous-delegation",
        "millrace-ops-agent-manual",
    ];
    for root in start.ancestors() {
        for rel in [
            "dev/source/millrace/docs/skills",
            "source/millrace/docs/skills",
        ] {
            let dir = root.join(rel);
            let paths: Vec<PathBuf> = SKILLS.iter().map(|s| dir.join(s)).collect();
            if paths.iter().all(|p| p.exists()) {
                return Some(paths);
            }
        }
    }
    None
}

/// Sends `signal` to the process group `pgid` (pi and whatever its tools started).
pub(crate) fn signal_group(pgid: u32, signal: nix::sys::signal::Signal) {
    if let Ok(pgid) = i32::try_from(pgid)
        && pgid > 1
    {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_follow_the_reference() {
        let config = PiConfig {
            provider: Some("fake".into()),
            model: Some("m".into()),
            skills: vec![PathBuf::from("/s/SKILL.md")],
            ..PiConfig::default()
        };
        let rpc: Vec<String> = config
            .rpc_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            rpc[..5],
            [
                "--mode",
                "rpc",
                "--no-session",
                "--no-context-files",
                "--append-system-prompt"
            ]
        );
        assert_eq!(rpc[5], SYSTEM_PROMPT);
        assert_eq!(
            rpc[6..],
            [
                "--provider",
                "fake",
                "--model",
                "m",
                "--thinking",
                "high",
                "--skill",
                "/s/SKILL.md"
            ]
        );
        let print: Vec<String> = config
            .print_args("hello")
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            print[..3],
            ["--print", "--no-session", "--no-context-files"]
        );
        assert_eq!(print.last().map(String::as_str), Some("hello"));
    }

    #[test]
    fn default_skills_need_both_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let skills = dir.path().join("source/millrace/docs/skills");
        std::fs::create_dir_all(skills.join("millrace-autonomous-delegation")).expect("mkdir");
        let deep = dir.path().join("a/b");
        std::fs::create_dir_all(&deep).expect("mkdir");
        assert!(discover_default_skills(&deep).is_none());
        std::fs::create_dir_all(skills.join("millrace-ops-agent-manual")).expect("mkdir");
        let found = discover_default_skills(&deep).expect("found");
        assert_eq!(found.len(), 2);
        assert!(matches!(
            resolve_skills(&[dir.path().join("nope")], false, None),
            Err(PiError::SkillMissing(_))
        ));
        assert!(
            resolve_skills(&[], true, Some(&deep))
                .expect("ok")
                .is_empty()
        );
        assert_eq!(
            resolve_skills(&[], false, Some(&deep)).expect("ok").len(),
            2
        );
    }
}
