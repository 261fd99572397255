//! The operator's subcommands (`millracer status|health|diagnose|queue|runs|pause|resume|
//! cancel|workspaces|sessions`), as the 0.3.0 reference has them: each builds one OpsRequest
//! (`request_id = req-cli-<action>-<uuid4>`, `source {kind: cli, surface: <command>}`) and
//! sends it the way `ops` does (over the bus when a worker answers for the workspace, else
//! in-process), so it reaches the same dispatch. `--json` prints the full OpsResult; the
//! default is a short readable summary or table. Exit codes as `ops`: 0, 1 when the result
//! is `failed`, 2 usage, 3 no worker / no bus (`--transport nats`), 4 timeout.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Map, Value, json};

use crate::app::cli::{CommonOptions, NatsOptions, Submit, Transport, secs};
use crate::app::ops::{self, Link};
use crate::contract::{OpsResult, ResultStatus, parse_request};
use crate::millrace::workspace::resolve_path;

/// Where the request goes and how the answer is printed; shared by every subcommand.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Print the full OpsResult as indented JSON.
    #[arg(long)]
    pub json: bool,
    /// The workspace by registered id (a worker's `--workspace ID=PATH`; default: none, the
    /// workspace at `--workspace` is used).
    #[arg(long = "workspace-id", value_name = "ID")]
    pub workspace_id: Option<String>,
    /// The workspace by root path (when no `--workspace-id`).
    #[arg(long, default_value = ".")]
    pub workspace: PathBuf,
    /// How the request is sent on the bus: `request` = core request/reply (answers at once
    /// when no worker serves), `durable` = stored in the jobs stream, the result read from
    /// the results bucket.
    #[arg(long, value_enum, default_value_t = Submit::Request, env = "MILLRACER_SUBMIT")]
    pub submit: Submit,
    /// Where the request runs: `auto` = on the bus when a worker serves the workspace, else
    /// in-process (said on stderr); `nats` = the bus only (no worker: exit 3); `local` =
    /// in-process.
    #[arg(long, value_enum, default_value_t = Transport::Auto, env = "MILLRACER_TRANSPORT")]
    pub transport: Transport,
    /// Give up waiting for the result after this many seconds (default: wait).
    #[arg(long)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub nats: NatsOptions,
    #[command(flatten)]
    pub common: CommonOptions,
}

/// A subcommand whose words choose the action (`queue`, `runs`, `workspaces`, `sessions`).
#[derive(Debug, Clone, Args)]
pub struct Words {
    /// `ls`/`list` (the default), or `show ID` / `select ID` / `inspect ID`.
    pub words: Vec<String>,
    /// `workspaces select`: the session to select for.
    #[arg(long, default_value = "local")]
    pub session_id: String,
    /// `workspaces select`: the mode to select (default: none, the workspace's own).
    #[arg(long)]
    pub mode: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

/// `pause` / `resume`.
#[derive(Debug, Clone, Args)]
pub struct Reasoned {
    /// Why (recorded in the frame; `pause` defaults to `operator_requested`).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

/// `cancel REQUEST_ID`.
#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// The request_id of the request to stop.
    pub request_id: String,
    /// Why (recorded in the `request.cancelled` frame; default: `cancelled`).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

/// The exit codes every subcommand shares, for its `--help`.
macro_rules! exit_codes {
    () => {
        "\n\nExit codes: 0 done, 1 failed, 2 usage, 3 no worker/bus (--transport nats), 4 timeout."
    };
}

#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// The runtime's status, summarised.
    #[command(
        after_help = concat!("Examples:\n  millracer status --workspace-id shop --nats-url nats://127.0.0.1:4222", exit_codes!())
    )]
    Status(Target),
    /// The workspace's health state and the evidence behind it.
    #[command(
        after_help = concat!("Examples:\n  millracer health --workspace-id shop --json", exit_codes!())
    )]
    Health(Target),
    /// The runtime's own checks (`millrace doctor`).
    #[command(
        after_help = concat!("Examples:\n  millracer diagnose --workspace /srv/shop", exit_codes!())
    )]
    Diagnose(Target),
    /// The queue (`queue`, `queue ls`) or one work item (`queue show ID`).
    #[command(
        after_help = concat!("Examples:\n  millracer queue --workspace-id shop\n  millracer queue show task-20261205-fix-login --workspace-id shop", exit_codes!())
    )]
    Queue(Words),
    /// The runs (`runs`, `runs ls`) or one run (`runs show ID`).
    #[command(
        after_help = concat!("Examples:\n  millracer runs --workspace-id shop\n  millracer runs show run-0fe20fce --workspace-id shop --json", exit_codes!())
    )]
    Runs(Words),
    /// Pause the runtime (in the workspace's lane).
    #[command(
        after_help = concat!("Examples:\n  millracer pause --workspace-id shop --reason \"deploy window\"", exit_codes!())
    )]
    Pause(Reasoned),
    /// Resume the runtime (in the workspace's lane).
    #[command(
        after_help = concat!("Examples:\n  millracer resume --workspace-id shop --reason \"deploy done\"", exit_codes!())
    )]
    Resume(Reasoned),
    /// Stop a request by its request_id.
    #[command(
        after_help = concat!("Examples:\n  millracer cancel req-enqueue-001 --workspace-id shop", "\n\nA finished or unknown request is a failed result (exit 1).", exit_codes!())
    )]
    Cancel(CancelArgs),
    /// The workspaces served (`workspaces`, `list`) or select one (`select ID`).
    #[command(
        after_help = concat!("Examples:\n  millracer workspaces --transport nats\n  millracer workspaces select shop --session-id local", exit_codes!())
    )]
    Workspaces(Words),
    /// Operator sessions (`sessions`, `list`) or one (`inspect ID`).
    #[command(
        after_help = concat!("Examples:\n  millracer sessions\n  millracer sessions inspect local", exit_codes!())
    )]
    Sessions(Words),
}

impl OperatorCommand {
    fn name(&self) -> &'static str {
        match self {
            Self::Status(_) => "status",
            Self::Health(_) => "health",
            Self::Diagnose(_) => "diagnose",
            Self::Queue(_) => "queue",
            Self::Runs(_) => "runs",
            Self::Pause(_) => "pause",
            Self::Resume(_) => "resume",
            Self::Cancel(_) => "cancel",
            Self::Workspaces(_) => "workspaces",
            Self::Sessions(_) => "sessions",
        }
    }

    fn target(&self) -> &Target {
        match self {
            Self::Status(t) | Self::Health(t) | Self::Diagnose(t) => t,
            Self::Queue(w) | Self::Runs(w) | Self::Workspaces(w) | Self::Sessions(w) => &w.target,
            Self::Pause(r) | Self::Resume(r) => &r.target,
            Self::Cancel(c) => &c.target,
        }
    }

    /// The action and its payload, or a usage error.
    fn action(&self) -> Result<(&'static str, Map<String, Value>), String> {
        let mut payload = Map::new();
        fn words(w: &Words) -> Vec<&str> {
            w.words.iter().map(String::as_str).collect()
        }
        let action = match self {
            Self::Status(_) => "status",
            Self::Health(_) => "health",
            Self::Diagnose(_) => "diagnose",
            Self::Queue(w) => match words(w).as_slice() {
                [] | ["ls" | "list"] => "queue_status",
                ["show", id] => {
                    payload.insert("work_item_id".into(), json!(id));
                    "show_work_item"
                }
                other => return Err(format!("queue takes `ls` or `show ID`, not {other:?}")),
            },
            Self::Runs(w) => match words(w).as_slice() {
                [] | ["ls" | "list"] => "list_runs",
                ["show", id] => {
                    payload.insert("run_id".into(), json!(id));
                    "show_run"
                }
                other => return Err(format!("runs takes `ls` or `show ID`, not {other:?}")),
            },
            Self::Pause(r) | Self::Resume(r) => {
                if let Some(reason) = &r.reason {
                    payload.insert("reason".into(), json!(reason));
                }
                if matches!(self, Self::Pause(_)) {
                    "pause"
                } else {
                    "resume"
                }
            }
            Self::Cancel(c) => {
                payload.insert("request_id".into(), json!(c.request_id));
                if let Some(reason) = &c.reason {
                    payload.insert("reason".into(), json!(reason));
                }
                "cancel"
            }
            Self::Workspaces(w) => match words(w).as_slice() {
                [] | ["ls" | "list"] => "list_workspaces",
                ["select", id] => {
                    payload.insert("workspace_id".into(), json!(id));
                    payload.insert("session_id".into(), json!(w.session_id));
                    if let Some(mode) = &w.mode {
                        payload.insert("mode".into(), json!(mode));
                    }
                    "select_workspace"
                }
                other => {
                    return Err(format!(
                        "workspaces takes `list` or `select ID`, not {other:?}"
                    ));
                }
            },
            Self::Sessions(w) => match words(w).as_slice() {
                [] | ["ls" | "list"] => "list_sessions",
                ["inspect", id] => {
                    payload.insert("session_id".into(), json!(id));
                    "inspect_session"
                }
                other => {
                    return Err(format!(
                        "sessions takes `list` or `inspect ID`, not {other:?}"
                    ));
                }
            },
        };
        Ok((action, payload))
    }
}

pub async fn run(command: OperatorCommand) -> i32 {
    let (action, payload) = match command.action() {
        Ok(found) => found,
        Err(usage) => {
            eprintln!("millracer: error: {usage}");
            return 2;
        }
    };
    let target = command.target();
    let workspace_ref = match &target.workspace_id {
        Some(id) => json!({"workspace_id": id}),
        None => json!({"root_path": resolve_path(&target.workspace).display().to_string()}),
    };
    let body = json!({
        "schema_version": crate::contract::SCHEMA_VERSION,
        "request_id": format!("req-cli-{action}-{}", uuid::Uuid::new_v4()),
        "workspace_ref": workspace_ref,
        "source": {"kind": "cli", "surface": command.name()},
        "action": action,
        "input": {"kind": "structured_action", "payload": payload},
    });
    let raw = body.to_string().into_bytes();
    let request = match parse_request(&raw) {
        Ok(request) => request,
        Err(err) => {
            eprintln!("millracer: error: {err}");
            return 1;
        }
    };
    let link = Link {
        transport: target.transport,
        nats: target.nats.clone(),
        timeout: target.timeout.map(secs),
        workspace: target.workspace.clone(),
        common: target.common.clone(),
        submit: target.submit,
        host_id: None,
        wait_for_worker: false,
    };
    let mut ignore = |_: ops::FrameIn<'_>| {};
    match ops::send(&link, &raw, &request, false, &mut ignore).await {
        Ok(result) => {
            if target.json {
                println!("{}", result.to_pretty_json());
            } else {
                print!("{}", readable(&result));
            }
            i32::from(result.status == ResultStatus::Failed)
        }
        Err(err) => {
            eprintln!("millracer: error: {err}");
            err.exit_code()
        }
    }
}

/// The readable form of a result: a summary or a table, never raw JSON.
pub fn readable(result: &OpsResult) -> String {
    let mut out = String::new();
    if result.status == ResultStatus::Failed {
        for e in &result.errors {
            let _ = writeln!(out, "{} failed: {} ({})", result.action, e.message, e.code);
            if let Some(s) = &e.suggested_action {
                let _ = writeln!(out, "  suggestion: {s}");
            }
        }
        return out;
    }
    let r = &result.result;
    let s = |v: Option<&Value>| match v {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    match result.action.as_str() {
        "status" => {
            let _ = writeln!(
                out,
                "daemon running: {}   paused: {}   lock: {}",
                s(r.get("process_running")),
                s(r.get("paused")),
                s(r.get("runtime_ownership_lock"))
            );
            let _ = writeln!(
                out,
                "active stage: {}   work item: {}   active runs: {}",
                s(r.get("active_stage")),
                s(r.get("active_work_item_id")),
                s(r.get("active_run_count"))
            );
            let _ = writeln!(
                out,
                "queues: execution {}  planning {}  learning {}   failure: {}",
                s(r.get("execution_queue_depth")),
                s(r.get("planning_queue_depth")),
                s(r.get("learning_queue_depth")),
                s(r.get("current_failure_class"))
            );
        }
        "health" => {
            let report = r.get("health_report").and_then(Value::as_object);
            let get = |k: &str| s(report.and_then(|m| m.get(k)));
            let _ = writeln!(out, "health: {}", s(r.get("health_state")));
            let _ = writeln!(out, "{}", get("summary"));
            let _ = writeln!(out, "decided by: {}", get("decided_by"));
            if let Some(list) = report
                .and_then(|m| m.get("suggested_interventions"))
                .and_then(Value::as_array)
                .filter(|l| !l.is_empty())
            {
                let items: Vec<String> = list.iter().map(|v| s(Some(v))).collect();
                let _ = writeln!(out, "suggested: {}", items.join("; "));
            }
        }
        "list_runs" => {
            let runs = r
                .get("runs")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let rows: Vec<Vec<String>> = runs
                .iter()
                .map(|run| {
                    [
                        "run_id",
                        "runtime_outcome",
                        "work_item_kind",
                        "work_item_id",
                        "failure_class",
                    ]
                    .iter()
                    .map(|k| s(run.get(*k)))
                    .collect()
                })
                .collect();
            table(
                &mut out,
                &["RUN", "OUTCOME", "KIND", "WORK ITEM", "FAILURE"],
                &rows,
            );
        }
        "list_workspaces" => {
            let list = r
                .get("workspaces")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|w| {
                    ["workspace_id", "root_path", "default_mode", "is_default"]
                        .iter()
                        .map(|k| s(w.get(*k)))
                        .collect()
                })
                .collect();
            table(&mut out, &["ID", "ROOT", "MODE", "DEFAULT"], &rows);
        }
        "list_sessions" => {
            let list = r
                .get("sessions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|w| {
                    ["session_id", "selected_workspace_id", "mode", "updated_at"]
                        .iter()
                        .map(|k| s(w.get(*k)))
                        .collect()
                })
                .collect();
            table(
                &mut out,
                &["SESSION", "WORKSPACE", "MODE", "UPDATED"],
                &rows,
            );
        }
        "cancel" => {
            let _ = writeln!(
                out,
                "cancelled {} (it was {}); its caller got {} / {}",
                s(r.get("request_id")),
                s(r.get("state")),
                s(r.get("target_status")),
                s(r.get("target_error"))
            );
        }
        _ => {
            // The runtime's parsed answer: its fields, one per line.
            let rows: Vec<Vec<String>> = r
                .iter()
                .filter(|(k, v)| k.as_str() != "command" && !v.is_array() && !v.is_object())
                .map(|(k, v)| vec![k.clone(), s(Some(v))])
                .collect();
            table(&mut out, &["FIELD", "VALUE"], &rows);
        }
    }
    for w in &result.warnings {
        let _ = writeln!(out, "warning: {} ({})", w.message, w.code);
    }
    out
}

fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        let _ = writeln!(out, "(none)");
        return;
    }
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let _ = writeln!(out, "{}", line(head.to_vec()));
    for row in rows {
        let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
    }
}
