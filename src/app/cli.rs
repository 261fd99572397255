//! The command line: `millracer worker`, `ops`, `run` and `operator`, with the
//! reference's common options and defaults.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::app::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "millracer",
    version,
    about = "Millrace on a NATS bus: typed ops requests, per-workspace lanes, streamed event frames."
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MILLRACER_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve Millrace workspaces on the bus.
    Worker(WorkerArgs),
    /// Send one OpsRequest (stdin) and print its OpsResult, like any other adapter.
    Ops(OpsArgs),
    /// Follow the event frames of every workspace (or one) live, as Mission Control does.
    Events(EventsArgs),
    /// Run one task in plain language: pi decides, works directly or delegates to
    /// Millrace, and reports the real outcome.
    Run(RunArgs),
    /// A persistent session to type tasks into (one pi conversation for all of them).
    Operator(OperatorArgs),
    #[command(flatten)]
    Operations(crate::app::commands::OperatorCommand),
}

#[derive(Debug, Clone, Args)]
pub struct EventsArgs {
    /// Keep following frames as they are published (required: frames are live).
    #[arg(long)]
    pub follow: bool,
    /// Only this workspace's frames.
    #[arg(long)]
    pub workspace: Option<String>,
    /// Only this request's frames.
    #[arg(long)]
    pub request: Option<String>,
    /// Print the frames themselves, one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Replay the stored frames (of `--request`, `--workspace` or all) in order from the
    /// frames stream first; with `--follow`, go on live after them.
    #[arg(long)]
    pub replay: bool,
    #[command(flatten)]
    pub nats: NatsOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Route {
    Auto,
    Direct,
    Millrace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Intake {
    Auto,
    Probe,
    Idea,
    Task,
}

/// The reference's common options, with its defaults.
#[derive(Debug, Clone, Args)]
pub struct CommonOptions {
    /// Working directory for runtime commands, when it differs from the workspace.
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    pub route: Route,
    #[arg(long, value_enum, default_value_t = Intake::Auto)]
    pub intake: Intake,
    #[arg(long, default_value = "pi")]
    pub pi_command: String,
    /// The Millrace CLI program (one executable; never a shell line).
    #[arg(long, default_value = "millrace", env = "MILLRACER_MILLRACE_COMMAND")]
    pub millrace_command: String,
    #[arg(long)]
    pub provider: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value = "high")]
    pub thinking: String,
    /// Millrace mode for delegated work (also each workspace's default mode).
    #[arg(long, default_value = "default_pi")]
    pub millrace_mode: String,
    #[arg(long = "skill")]
    pub skills: Vec<PathBuf>,
    #[arg(long)]
    pub no_default_skills: bool,
    #[arg(long, default_value_t = 2.0)]
    pub poll_interval_seconds: f64,
    #[arg(long, default_value_t = 7200.0)]
    pub daemon_timeout_seconds: f64,
    #[arg(long, default_value_t = 1)]
    pub max_daemon_restarts: u32,
    #[arg(long)]
    pub pi_timeout_seconds: Option<u64>,
    #[arg(long)]
    pub keep_daemon: bool,
    #[arg(long, overrides_with = "no_notify_terminal_stages")]
    pub notify_terminal_stages: bool,
    #[arg(long, overrides_with = "notify_terminal_stages")]
    pub no_notify_terminal_stages: bool,
    /// Upper bound in seconds for one short runtime command (status, queue add …).
    #[arg(long, default_value_t = 120.0)]
    pub runtime_timeout_seconds: f64,
}

/// How to reach NATS and prove who we are.
#[derive(Debug, Clone, Args)]
pub struct NatsOptions {
    /// NATS server URL [default: nats://127.0.0.1:4222].
    #[arg(long, env = "MILLRACER_NATS_URL")]
    pub nats_url: Option<String>,
    #[arg(long, env = "MILLRACER_NATS_USER")]
    pub nats_user: Option<String>,
    #[arg(long, env = "MILLRACER_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    #[arg(long, env = "MILLRACER_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    #[arg(long, env = "MILLRACER_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`) to authenticate with.
    #[arg(long, env = "MILLRACER_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// PEM file of the CA certificates to trust for the server's TLS certificate.
    #[arg(long, env = "MILLRACER_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `--nats-tls-key`).
    #[arg(long, env = "MILLRACER_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "MILLRACER_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse to talk to the server without TLS.
    #[arg(long, env = "MILLRACER_NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
    /// Reply inboxes (core replies and JetStream API replies) under this prefix instead of
    /// `_INBOX`, so the broker can let this role read only its own replies
    /// (`_INBOX_<role>` by convention; see docs/permissions.md).
    #[arg(long, env = "MILLRACER_INBOX_PREFIX", value_name = "PREFIX")]
    pub inbox_prefix: Option<String>,
}

impl NatsOptions {
    /// The options as the bus takes them.
    pub fn credentials(&self) -> crate::bus::nats::Credentials {
        crate::bus::nats::Credentials {
            url: self.nats_url.clone(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds: self.nats_creds.clone(),
            nkey: self.nats_nkey.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_required: self.nats_tls_required,
            inbox_prefix: self.inbox_prefix.clone(),
        }
    }
}

pub use crate::bus::nats::DEFAULT_NATS_URL;

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// A workspace to serve: `PATH`, or `ID=PATH` (repeatable). A single unnamed one
    /// gets the id `default`.
    #[arg(long = "workspace", value_name = "[ID=]PATH")]
    pub workspaces: Vec<String>,
    /// A TOML file listing workspaces (and optionally `[nats] url`).
    #[arg(long, env = "MILLRACER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Requests larger than this many bytes are refused with `request_too_large`.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_request_bytes: usize,
    /// How long a finished result is kept for a repeated request_id.
    #[arg(long, default_value_t = 900)]
    pub result_ttl_seconds: u64,
    /// How many finished results are kept for repeated request_ids.
    #[arg(long, default_value_t = 10_000)]
    pub result_capacity: usize,
    /// How long each request's state and final result are kept by request_id in the
    /// JetStream bucket (a request_id sent again within it is answered from there).
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub result_retention_seconds: u64,
    /// A durable request not acked (or progress-acked) for this long goes to another worker.
    /// Used when this worker creates the consumers; progress acks come every third of it.
    #[arg(long, default_value_t = 30.0)]
    pub ack_wait_seconds: f64,
    /// A status snapshot is reused while the workspace's runtime files are unchanged and
    /// it is younger than this (a dying daemon changes no file).
    #[arg(long, default_value_t = 2.0)]
    pub status_max_age_seconds: f64,
    /// Give the worker a pi runner: `enqueue` with route `auto` then asks pi for the
    /// decision, `direct` has pi do the work, and pi writes the final answer (as the
    /// reference's enqueue does). Without it (or `[pi] enabled = true` in --config) the
    /// worker runs no model.
    #[arg(long)]
    pub pi_runner: bool,
    #[command(flatten)]
    pub nats: NatsOptions,
    #[command(flatten)]
    pub common: CommonOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Transport {
    /// The bus when a worker answers for the workspace, else in-process (said on stderr).
    Auto,
    /// The bus only; no worker is an error (exit 3).
    Nats,
    /// In-process, with the reference's workspace resolution.
    Local,
}

/// How the bridge hands a request to the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Submit {
    /// JetStream: the request waits in a stream until a worker takes it, survives worker
    /// crashes and broker restarts; the result is read from the results bucket.
    Durable,
    /// Core NATS request/reply (`nats req` style): no worker, no answer.
    Request,
}

#[derive(Debug, Clone, Args)]
pub struct OpsArgs {
    /// How to submit over the bus.
    #[arg(long, value_enum, default_value_t = Submit::Durable, env = "MILLRACER_SUBMIT")]
    pub submit: Submit,
    /// Re-attach to a request sent earlier (by request_id): replay its frames, wait for and
    /// print its result. Reads no stdin.
    #[arg(long, value_name = "REQUEST_ID")]
    pub attach: Option<String>,
    /// The workspace id the `--attach`ed request was sent for: result keys and frames are
    /// scoped by workspace. Without it, a workspace-less request (`jobs.any`).
    #[arg(long, value_name = "WORKSPACE_ID", requires = "attach")]
    pub attach_workspace: Option<String>,
    /// Cancel the request with this request_id (reads no stdin): sends a `cancel` for the
    /// workspace `--cancel-workspace` (by id), else the one at `--workspace`.
    #[arg(long, value_name = "REQUEST_ID", conflicts_with = "attach")]
    pub cancel: Option<String>,
    /// The workspace id of the request to `--cancel`.
    #[arg(long, value_name = "WORKSPACE_ID", requires = "cancel")]
    pub cancel_workspace: Option<String>,
    /// Print the OpsResult as indented JSON.
    #[arg(long)]
    pub json: bool,
    /// Print each event frame as one JSON line as it arrives, then the OpsResult line.
    #[arg(long)]
    pub stream_json: bool,
    #[arg(long, value_enum, default_value_t = Transport::Auto, env = "MILLRACER_TRANSPORT")]
    pub transport: Transport,
    /// Give up waiting for the result after this many seconds (default: wait).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Workspace root and default command working directory.
    #[arg(long, default_value = ".")]
    pub workspace: PathBuf,
    #[command(flatten)]
    pub nats: NatsOptions,
    #[command(flatten)]
    pub common: CommonOptions,
}

/// `run --pi-session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PiSessionArg {
    /// One long-lived `pi --mode rpc` for every turn.
    Rpc,
    /// One `pi --print` per turn.
    Print,
}

/// `run --output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Warnings on stderr, the final answer on stdout.
    Text,
    /// The reference's RunResult document.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The task (words joined with spaces); read from stdin when none is given.
    pub task: Vec<String>,
    /// Read a legacy JSON request from stdin (`task`/`prompt`/`instructions`,
    /// `workspace`, `scoped_work_item`/`work_item`/`scope`, `intake_kind`, `metadata`).
    #[arg(long)]
    pub benchmark_json: bool,
    #[arg(long, value_enum, default_value_t = PiSessionArg::Rpc)]
    pub pi_session: PiSessionArg,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Workspace root and default working directory.
    #[arg(long, default_value = ".")]
    pub workspace: PathBuf,
    /// How delegated work reaches the dispatch (as for `ops`).
    #[arg(long, value_enum, default_value_t = Transport::Auto, env = "MILLRACER_TRANSPORT")]
    pub transport: Transport,
    /// How delegated work is submitted over the bus.
    #[arg(long, value_enum, default_value_t = Submit::Durable, env = "MILLRACER_SUBMIT")]
    pub submit: Submit,
    #[command(flatten)]
    pub nats: NatsOptions,
    #[command(flatten)]
    pub common: CommonOptions,
}

#[derive(Debug, Clone, Args)]
pub struct OperatorArgs {
    /// Workspace root and default working directory.
    #[arg(long, default_value = ".")]
    pub workspace: PathBuf,
    /// How delegated work reaches the dispatch (as for `ops`).
    #[arg(long, value_enum, default_value_t = Transport::Auto, env = "MILLRACER_TRANSPORT")]
    pub transport: Transport,
    /// How delegated work is submitted over the bus.
    #[arg(long, value_enum, default_value_t = Submit::Durable, env = "MILLRACER_SUBMIT")]
    pub submit: Submit,
    #[command(flatten)]
    pub nats: NatsOptions,
    #[command(flatten)]
    pub common: CommonOptions,
}

impl CommonOptions {
    /// How pi runs, from these options. `workspace` is where default skills are also
    /// looked for. Fails when a `--skill` path does not exist.
    pub fn pi_config(
        &self,
        kind: crate::agent::pi::SessionKind,
        workspace: Option<&std::path::Path>,
    ) -> Result<crate::agent::pi::PiConfig, crate::agent::pi::PiError> {
        Ok(crate::agent::pi::PiConfig {
            command: self.pi_command.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            thinking: Some(self.thinking.clone()).filter(|t| !t.is_empty()),
            skills: crate::agent::pi::resolve_skills(
                &self.skills,
                self.no_default_skills,
                workspace,
            )?,
            turn_timeout: self
                .pi_timeout_seconds
                .map_or(crate::agent::pi::DEFAULT_TURN_TIMEOUT, |s| {
                    std::time::Duration::from_secs(s.max(1))
                }),
            kind,
            env: Vec::new(),
        })
    }

    /// `--notify-terminal-stages` is on unless `--no-notify-terminal-stages` came last.
    pub fn notify(&self) -> bool {
        !self.no_notify_terminal_stages
    }

    pub fn settings(&self) -> crate::actions::dispatch::Settings {
        crate::actions::dispatch::Settings {
            millrace_mode: self.millrace_mode.clone(),
            cwd: self.cwd.clone(),
            daemon_timeout: secs(self.daemon_timeout_seconds),
            max_daemon_restarts: self.max_daemon_restarts,
            keep_daemon: self.keep_daemon,
            notify_terminal_stages: self.notify(),
        }
    }

    pub fn millrace(&self) -> crate::millrace::command::Millrace {
        crate::millrace::command::Millrace::new(
            self.millrace_command.clone(),
            secs(self.runtime_timeout_seconds),
        )
    }
}

/// Seconds from the command line as a duration; negative or absurd values are clamped.
pub fn secs(value: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(std::time::Duration::MAX)
}
