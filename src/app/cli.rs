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
    /// Log format on stderr: `text` (readable) or `json` (one object per line). Levels
    /// follow `RUST_LOG` (default: `info` for the worker, `warn` for the others).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MILLRACER_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve Millrace workspaces on the bus.
    #[command(after_help = WORKER_EXAMPLES)]
    Worker(WorkerArgs),
    /// Send one OpsRequest (stdin) and print its OpsResult, like any other adapter.
    #[command(after_help = OPS_EXAMPLES)]
    Ops(OpsArgs),
    /// Follow the event frames of every workspace (or one) live, as Mission Control does.
    #[command(after_help = EVENTS_EXAMPLES)]
    Events(EventsArgs),
    /// Run one task in plain language: pi decides, works directly or delegates to
    /// Millrace, and reports the real outcome.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// A persistent session to type tasks into (one pi conversation for all of them).
    #[command(after_help = OPERATOR_EXAMPLES)]
    Operator(OperatorArgs),
    #[command(flatten)]
    Operations(crate::app::commands::OperatorCommand),
}

const WORKER_EXAMPLES: &str = "\
Examples:
  .venv/bin/millrace init --workspace ./ws      # once: a workspace needs `millrace init`
  .venv/bin/nats-server -js -sd /tmp/nats &     # a broker with JetStream
  millracer worker --workspace demo=./ws --ready-file /tmp/millracer.ready

Exit codes: 0 stopped by SIGTERM/SIGINT, 1 bad configuration, 3 the broker cannot serve
durable intake (no JetStream, or nats-server older than 2.10; --core-only serves anyway).";

const OPS_EXAMPLES: &str = "\
Examples:
  echo '{\"schema_version\":\"millracer.ops.v0.2\",\"request_id\":\"r1\",\"workspace_ref\":{\"workspace_id\":\"demo\"},\"source\":{\"kind\":\"cli\",\"surface\":\"shell\"},\"action\":\"status\",\"input\":{\"kind\":\"structured_action\",\"payload\":{}}}' \\
    | millracer ops --json --transport nats --timeout 30

Exit codes: 0 done, 1 failed or invalid request, 2 usage, 3 no worker / no broker
(--transport nats), 4 --timeout reached.";

const EVENTS_EXAMPLES: &str = "\
Examples:
  millracer events --follow                          # every workspace's frames, live
  millracer events --replay --request r1 --workspace demo --json";

const RUN_EXAMPLES: &str = "\
Examples:
  millracer run --workspace ./ws \"Add a health endpoint and test it\"
  echo '{\"task\": \"Fix the failing test\"}' | millracer run --benchmark-json --output json";

const OPERATOR_EXAMPLES: &str = "\
Examples:
  millracer operator --workspace ./ws      # then type tasks; /exit, /quit or EOF ends it";

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("mode").args(["follow", "replay"]).required(true).multiple(true)))]
pub struct EventsArgs {
    /// Follow frames live as they are published, until Ctrl-C (give this, `--replay`, or both).
    #[arg(long)]
    pub follow: bool,
    /// Only this workspace's frames (default: every workspace's).
    #[arg(long, value_name = "WORKSPACE_ID")]
    pub workspace: Option<String>,
    /// Only this request's frames (default: every request's).
    #[arg(long, value_name = "REQUEST_ID")]
    pub request: Option<String>,
    /// Print the frames themselves, one JSON object per line (default: one readable line each).
    #[arg(long)]
    pub json: bool,
    /// Replay the stored frames (of `--request`, `--workspace` or all) in order from the
    /// frames stream first; with `--follow`, go on live after them, else stop once no new
    /// frame came for a second.
    #[arg(long)]
    pub replay: bool,
    #[command(flatten)]
    pub nats: NatsOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Route {
    /// pi decides: work directly or delegate to Millrace.
    Auto,
    /// pi does the work itself.
    Direct,
    /// Delegate to Millrace (queue the work, run the daemon).
    Millrace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Intake {
    /// Chosen by pi's decision, else by the task's wording.
    Auto,
    /// A probe (a question to investigate).
    Probe,
    /// An idea (planned before it is built).
    Idea,
    /// A task (ready to execute).
    Task,
}

/// The reference's common options, with its defaults.
#[derive(Debug, Clone, Args)]
pub struct CommonOptions {
    /// Working directory for runtime commands, when it differs from the workspace
    /// (default: the workspace).
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// Who does the work: pi decides (`auto`), pi itself (`direct`) or Millrace (`millrace`).
    #[arg(long, value_enum, default_value_t = Route::Auto)]
    pub route: Route,
    /// The Millrace intake kind for delegated work (`auto`: from the decision or the wording).
    #[arg(long, value_enum, default_value_t = Intake::Auto)]
    pub intake: Intake,
    /// The pi coding agent program (one executable; never a shell line).
    #[arg(long, default_value = "pi")]
    pub pi_command: String,
    /// The Millrace CLI program (one executable; never a shell line).
    #[arg(long, default_value = "millrace", env = "MILLRACER_MILLRACE_COMMAND")]
    pub millrace_command: String,
    /// The model provider pi uses, passed as `pi --provider` (default: pi's own setting).
    #[arg(long)]
    pub provider: Option<String>,
    /// The model pi uses, passed as `pi --model` (default: pi's own setting).
    #[arg(long)]
    pub model: Option<String>,
    /// pi's thinking level, passed as `pi --thinking` (empty: not passed).
    #[arg(long, default_value = "high")]
    pub thinking: String,
    /// Millrace mode for delegated work (also each workspace's default mode).
    #[arg(long, default_value = "default_pi")]
    pub millrace_mode: String,
    /// A pi skill directory to load, passed as `pi --skill` (repeatable; given ones replace
    /// the default skills; default: none).
    #[arg(long = "skill", value_name = "PATH")]
    pub skills: Vec<PathBuf>,
    /// Do not look for Millrace's own skills next to the installation (default: look).
    #[arg(long)]
    pub no_default_skills: bool,
    /// How often a running Millrace daemon's status is polled, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub poll_interval_seconds: f64,
    /// Give up waiting for delegated work after this many seconds (per wait).
    #[arg(long, default_value_t = 7200.0)]
    pub daemon_timeout_seconds: f64,
    /// How often a Millrace daemon that died is started again for one delegated task.
    #[arg(long, default_value_t = 1)]
    pub max_daemon_restarts: u32,
    /// Upper bound in seconds for one pi turn; it is aborted after that (default: 3600).
    #[arg(long)]
    pub pi_timeout_seconds: Option<u64>,
    /// Leave the Millrace daemon running after delegated work ends (default: stop it).
    #[arg(long)]
    pub keep_daemon: bool,
    /// Tell pi about each stage Millrace finishes while delegated work runs (the default).
    #[arg(long, overrides_with = "no_notify_terminal_stages")]
    pub notify_terminal_stages: bool,
    /// Do not tell pi about finished stages (default: tell it).
    #[arg(long, overrides_with = "notify_terminal_stages")]
    pub no_notify_terminal_stages: bool,
    /// Upper bound in seconds for one short runtime command (status, queue add …).
    #[arg(long, default_value_t = 120.0)]
    pub runtime_timeout_seconds: f64,
}

/// How to reach NATS and prove who we are.
#[derive(Debug, Clone, Args)]
pub struct NatsOptions {
    /// NATS server URL, or several separated by commas (servers of one cluster); the
    /// servers a cluster advertises are followed too (default: the worker's `--config`
    /// `[nats] url`, else nats://127.0.0.1:4222).
    #[arg(long, env = "MILLRACER_NATS_URL", value_name = "URL[,URL...]")]
    pub nats_url: Option<String>,
    /// User name for NATS user/password authentication (with `--nats-password`; default: none).
    #[arg(long, env = "MILLRACER_NATS_USER")]
    pub nats_user: Option<String>,
    /// Password for NATS user/password authentication (default: none).
    #[arg(long, env = "MILLRACER_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// Token for NATS token authentication (default: none).
    #[arg(long, env = "MILLRACER_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// A `.creds` file (JWT + nkey seed; default: none).
    #[arg(long, env = "MILLRACER_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`) to authenticate with (default: none).
    #[arg(long, env = "MILLRACER_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// PEM file of the CA certificates to trust for the server's TLS certificate
    /// (default: the system's).
    #[arg(long, env = "MILLRACER_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `--nats-tls-key`; default: none).
    #[arg(long, env = "MILLRACER_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// PEM private key of the client certificate (default: none).
    #[arg(long, env = "MILLRACER_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse to talk to the server without TLS (default: TLS when the server asks for it).
    #[arg(long, env = "MILLRACER_NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,
    /// Reply inboxes (core replies and JetStream API replies) under this prefix instead of
    /// `_INBOX`, so the broker can let this role read only its own replies
    /// (`_INBOX_<role>` by convention; see docs/permissions.md; default: `_INBOX`).
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
    /// gets the id `<dir-slug>-<8 hex>` derived from the host id and its path (see
    /// docs/bus-naming.md), so unnamed workspaces of two operators never share an id. Each
    /// must have been made by `millrace init --workspace PATH` (default: none; give at
    /// least one here or in --config).
    #[arg(long = "workspace", value_name = "[ID=]PATH")]
    pub workspaces: Vec<String>,
    /// A TOML file listing workspaces (and optionally `[nats] url`; default: none).
    #[arg(long, env = "MILLRACER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Write this file once the worker serves (it holds what it serves, as JSON) and remove
    /// it when the worker stops: a readiness probe for service managers (default: none).
    #[arg(long, env = "MILLRACER_READY_FILE", value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Requests larger than this many bytes are refused with `request_too_large`.
    #[arg(long, default_value_t = 256 * 1024)]
    pub max_request_bytes: usize,
    /// In this worker's memory: how long a finished mutating result is kept to answer a
    /// request_id sent again by core request/reply (read-only results are not kept: a repeat
    /// is answered again; lost when the worker stops; compare `--result-retention-seconds`).
    #[arg(long, default_value_t = 900)]
    pub result_ttl_seconds: u64,
    /// In this worker's memory: how many finished mutating results are kept for repeated
    /// request_ids.
    #[arg(long, default_value_t = 10_000)]
    pub result_capacity: usize,
    /// On the broker: how long the state and final result of a request that changes state
    /// are kept by request_id in the JetStream results bucket, shared by every worker and
    /// surviving restarts (a request_id sent again within it is answered from there; reads:
    /// see `--read-result-keep-seconds`), and how long a durable request may wait in the
    /// jobs stream. Used when this worker creates them.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub result_retention_seconds: u64,
    /// On the broker: how long the stored answer to a durable read-only request (`status`,
    /// `health`, lists, inspections) stays in the results bucket before this worker purges
    /// it. Answers to requests that change state (`enqueue`, `pause`, `resume`,
    /// `select_workspace`, `cancel`) are kept for `--result-retention-seconds`. Keep it
    /// above the bridge's `--timeout` and the 120 s duplicate window.
    #[arg(long, default_value_t = crate::bus::durable::READ_RESULT_KEEP.as_secs())]
    pub read_result_keep_seconds: u64,
    /// A durable request not acked (or progress-acked) for this long goes to another worker.
    /// Used when this worker creates the consumers; progress acks come every third of it.
    #[arg(long, default_value_t = 30.0)]
    pub ack_wait_seconds: f64,
    /// Replicas of the jobs and frames streams and the results bucket (3 on a 3-server
    /// cluster). Used when they are created; an existing stream with other replicas is
    /// scaled when the server allows it, else the log says how (default: 1 for new
    /// streams, existing ones left as they are).
    #[arg(long, env = "MILLRACER_STREAM_REPLICAS", value_name = "N", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub stream_replicas: Option<u8>,
    /// Safety net for the status snapshot: refreshed in the background at least this
    /// often even when nothing was seen to change. The snapshot is otherwise refreshed
    /// the moment the runtime's files change or its daemon ends, and no request ever
    /// waits for this refresh (only a workspace's very first status request waits).
    #[arg(long, default_value_t = 300.0)]
    pub status_max_age_seconds: f64,
    /// Give the worker a pi runner: `enqueue` with route `auto` then asks pi for the
    /// decision, `direct` has pi do the work, and pi writes the final answer (as the
    /// reference's enqueue does). Without it (or `[pi] enabled = true` in --config) the
    /// worker runs no model (default: off).
    #[arg(long)]
    pub pi_runner: bool,
    /// This host's id on the bus: a workspace's identity is its host id and canonical path
    /// [default: `[worker] host_id` in --config, else the host name made a plain token].
    #[arg(long, env = "MILLRACER_HOST_ID", value_name = "ID")]
    pub host_id: Option<String>,
    /// Serve core request/reply only: no JetStream intake, no results bucket (for brokers without JetStream).
    #[arg(long)]
    pub core_only: bool,
    /// After SIGTERM/SIGINT, give up handing back what is still in flight after this many
    /// seconds (broker or not), log what was left, and exit.
    #[arg(
        long = "shutdown-timeout",
        value_name = "SECONDS",
        default_value_t = 10.0
    )]
    pub shutdown_timeout_seconds: f64,
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
    /// print its result. Reads no stdin (default: send the request read from stdin).
    #[arg(long, value_name = "REQUEST_ID")]
    pub attach: Option<String>,
    /// The workspace id the `--attach`ed request was sent for: result keys and frames are
    /// scoped by workspace (default: a workspace-less request, `jobs.any`).
    #[arg(long, value_name = "WORKSPACE_ID", requires = "attach")]
    pub attach_workspace: Option<String>,
    /// Cancel the request with this request_id (reads no stdin): sends a `cancel` for the
    /// workspace `--cancel-workspace` (by id), else the one at `--workspace` (default: none,
    /// the request on stdin is sent).
    #[arg(long, value_name = "REQUEST_ID", conflicts_with = "attach")]
    pub cancel: Option<String>,
    /// The workspace id of the request to `--cancel` (default: none, the workspace at
    /// `--workspace`).
    #[arg(long, value_name = "WORKSPACE_ID", requires = "cancel")]
    pub cancel_workspace: Option<String>,
    /// Print the OpsResult as indented JSON (this or `--stream-json` is required).
    #[arg(long)]
    pub json: bool,
    /// Print each event frame as one JSON line as it arrives, then the OpsResult line.
    #[arg(long)]
    pub stream_json: bool,
    /// Where the request runs: `auto` = on the bus when a millracer worker answers there,
    /// else in-process (said on stderr); `nats` = the bus only (no worker: exit 3);
    /// `local` = in-process, no bus.
    #[arg(long, value_enum, default_value_t = Transport::Auto, env = "MILLRACER_TRANSPORT")]
    pub transport: Transport,
    /// Give up waiting for the result after this many seconds, exit 4 (default: wait; what
    /// is waited for is said on stderr after a second).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// When no live worker serves the workspace (the bus's registry), wait for one instead
    /// of exiting 3 at once: the request is stored durably (bounded by `--timeout`).
    #[arg(long)]
    pub wait_for_worker: bool,
    /// This host's id, for the path key of a request naming its workspace by path [default:
    /// the host name made a plain token; must match the worker's].
    #[arg(long, env = "MILLRACER_HOST_ID", value_name = "ID")]
    pub host_id: Option<String>,
    /// Workspace root and default command working directory (in-process runs, and requests
    /// that name no workspace).
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
    /// How pi runs: one long-lived `pi --mode rpc` (`rpc`) or one `pi --print` per turn.
    #[arg(long, value_enum, default_value_t = PiSessionArg::Rpc)]
    pub pi_session: PiSessionArg,
    /// What goes to stdout: the final answer (`text`) or the RunResult document (`json`).
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

/// This host's id: `explicit` (flag, environment or config file), else
/// `MILLRACER_HOST_ID`, else the host name made a plain token. An explicit id must be a
/// plain token already.
pub fn host_id(explicit: Option<&str>) -> Result<String, String> {
    let explicit = explicit
        .map(str::to_string)
        .or_else(|| std::env::var("MILLRACER_HOST_ID").ok())
        .filter(|s| !s.is_empty());
    match explicit {
        Some(id) if crate::contract::token::is_plain_token(&id) => Ok(id),
        Some(id) => Err(format!(
            "host id {id:?} is not allowed: use 1-64 letters, digits, '-' or '_', not starting with '_'"
        )),
        None => {
            let name = nix::unistd::gethostname()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok(crate::contract::token::host_token(&name))
        }
    }
}

/// Seconds from the command line as a duration; negative or absurd values are clamped.
pub fn secs(value: f64) -> std::time::Duration {
    std::time::Duration::try_from_secs_f64(value.max(0.0)).unwrap_or(std::time::Duration::MAX)
}
