//! The one place that maps an action to its handler, decides which lane it runs in and
//! refuses workspaces this process does not serve. Handlers know nothing of NATS.

use std::path::PathBuf;
use std::time::Duration;

use crate::actions;
use crate::contract::progress::Progress;
use crate::contract::vocab::ErrorCode;
use crate::contract::{OpsRequest, OpsResult, Record};
use crate::millrace::command::Millrace;
use crate::millrace::sessions::SessionStore;
use crate::millrace::workspace::{self, Registry, Resolution};

/// The actions this version knows. Matching is case-sensitive, as in the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Status,
    Enqueue,
    ListWorkspaces,
    ListSessions,
    SelectWorkspace,
    InspectSession,
    QueueStatus,
    ShowWorkItem,
    ListRuns,
    ShowRun,
    Diagnose,
    Health,
    Pause,
    Resume,
    Cancel,
    Unsupported,
}

impl Action {
    pub fn parse(name: &str) -> Self {
        match name {
            "status" => Self::Status,
            "enqueue" => Self::Enqueue,
            "list_workspaces" => Self::ListWorkspaces,
            "list_sessions" => Self::ListSessions,
            "select_workspace" => Self::SelectWorkspace,
            "inspect_session" => Self::InspectSession,
            "queue_status" => Self::QueueStatus,
            "show_work_item" => Self::ShowWorkItem,
            "list_runs" => Self::ListRuns,
            "show_run" => Self::ShowRun,
            "diagnose" => Self::Diagnose,
            "health" => Self::Health,
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "cancel" => Self::Cancel,
            _ => Self::Unsupported,
        }
    }

    /// The reference answers these before resolving a workspace.
    pub fn needs_workspace(self) -> bool {
        !matches!(
            self,
            Self::ListWorkspaces
                | Self::ListSessions
                | Self::SelectWorkspace
                | Self::InspectSession
        )
    }

    /// Actions that change state run one at a time per lane; the rest never wait.
    /// `cancel` changes state too, but must never wait behind what it cancels.
    pub fn is_mutating(self) -> bool {
        matches!(
            self,
            Self::Enqueue | Self::SelectWorkspace | Self::Pause | Self::Resume
        )
    }

    /// Whether a result of this action is worth keeping by request_id after its caller has
    /// it: the answer to something that changed state (a repeat must get it, not run it
    /// again). A read's answer is not: asking again is harmless and gives current data, and
    /// keeping every status answer of a polling dashboard would fill the results bucket.
    pub fn keeps_result(self) -> bool {
        self.is_mutating() || self == Self::Cancel
    }

    /// Whether a running request of this action stops only when its handler notices the
    /// cancellation (it cleans up after itself); others are simply dropped.
    pub fn cancels_itself(self) -> bool {
        matches!(self, Self::Enqueue)
    }
}

/// Which workspaces a process answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// A worker: only the registry's workspaces; anything else is refused.
    Registered,
    /// The in-process bridge: any path, as the reference does.
    AnyPath,
}

/// Where a mutating action waits its turn.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LaneKey {
    /// One workspace: its lock file lives in `<root>/.millracer/`.
    Workspace(PathBuf),
    /// The host's session store.
    Sessions,
}

/// Settings that shape what handlers do, from the common options.
#[derive(Debug, Clone)]
pub struct Settings {
    pub millrace_mode: String,
    pub cwd: Option<PathBuf>,
    pub daemon_timeout: Duration,
    pub max_daemon_restarts: u32,
    pub keep_daemon: bool,
    pub notify_terminal_stages: bool,
}

/// Everything a handler may use. Shared by every request of a process.
#[derive(Debug)]
pub struct Service {
    pub registry: Registry,
    pub serving: Serving,
    /// The reference's "CLI workspace": `--workspace` for the bridge, the default
    /// workspace for a worker.
    pub cli_workspace: Option<PathBuf>,
    pub millrace: Millrace,
    pub sessions: SessionStore,
    pub settings: Settings,
    /// Status snapshots shared by requests (a worker); `None` asks the runtime each time.
    pub status_cache: Option<crate::millrace::status::StatusCache>,
    /// The pi runner for the natural-language route (`enqueue` with route `auto` or
    /// `direct`). A worker has one only when configured (`--pi-runner`, `[pi]`); the
    /// in-process bridge builds one from the common options, as the reference does.
    pub pi: Option<crate::agent::pi::PiRunner>,
    /// The bus's registry of served workspaces (a worker on a broker with JetStream):
    /// `list_workspaces` on `req.any` answers with every workspace the bus serves.
    pub directory: Option<std::sync::Arc<crate::contract::registry::Directory>>,
    /// The requests of this process that can be cancelled (see [`actions::cancel`]).
    pub cancels: actions::cancel::Cancels,
}

/// What the engine needs to know before running a request: decided synchronously, on
/// arrival, so lanes keep arrival order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub action: Action,
    pub resolution: Resolution,
    /// An error that ends the request before its handler runs.
    pub refusal: Option<Record>,
    pub lane: Option<LaneKey>,
    /// The registered id of the resolved workspace: the frames subject token.
    pub workspace_id: Option<String>,
}

impl Service {
    /// Classifies and resolves a request without doing any I/O beyond path resolution.
    pub fn plan(&self, request: &OpsRequest) -> Plan {
        let action = Action::parse(&request.action);
        if !action.needs_workspace() {
            let lane = action.is_mutating().then_some(LaneKey::Sessions);
            return Plan {
                action,
                resolution: Resolution::empty(),
                refusal: None,
                lane,
                workspace_id: None,
            };
        }
        let mut resolution =
            workspace::resolve(request, &self.registry, self.cli_workspace.as_deref());
        let Some(root) = resolution.root.clone() else {
            return Plan {
                action,
                resolution,
                refusal: Some(
                    Record::error(
                        ErrorCode::WorkspaceUnresolved,
                        "Unable to resolve Millrace workspace.",
                    )
                    .suggest("Pass workspace_ref.root_path or register/select a workspace."),
                ),
                lane: None,
                workspace_id: None,
            };
        };
        let record = self.registry.by_root(&root);
        if self.serving == Serving::Registered && record.is_none() {
            return Plan {
                action,
                refusal: Some(
                    Record::error(
                        ErrorCode::WorkspaceNotServed,
                        format!("This worker does not serve the workspace at {}.", root.display()),
                    )
                    .suggest("Send the request for a workspace this worker serves (see list_workspaces), or add the workspace to the worker's configuration."),
                ),
                resolution,
                lane: None,
                workspace_id: None,
            };
        }
        if let (Serving::Registered, Some(record)) = (self.serving, record) {
            // On the bus a request reached this workspace by id, by path key or by its
            // subject: its result names the workspace it served, as its frames do.
            resolution
                .workspace_id
                .get_or_insert_with(|| record.id.clone());
            if resolution.display_name.is_none() {
                resolution.display_name = record.display_name.clone();
            }
            if resolution.mode.is_none() {
                resolution.mode = record.default_mode.clone();
            }
        }
        Plan {
            action,
            lane: action
                .is_mutating()
                .then(|| LaneKey::Workspace(root.clone())),
            workspace_id: record.map(|r| r.id.clone()),
            resolution,
            refusal: None,
        }
    }

    /// Runs the handler for a planned request.
    pub async fn execute(
        &self,
        request: &OpsRequest,
        plan: &Plan,
        started_at: String,
        progress: &Progress,
        resume: Option<&crate::millrace::delegation::Resume>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> OpsResult {
        if let Some(refusal) = &plan.refusal {
            return OpsResult::failure(
                &request.request_id,
                &request.action,
                plan.resolution.workspace_ref(&request.workspace_ref),
                started_at,
                refusal.clone(),
            );
        }
        let cx = actions::Context {
            service: self,
            request,
            resolution: &plan.resolution,
            started_at,
            progress,
            resume,
            cancel,
        };
        match plan.action {
            Action::Status => actions::status::run(cx).await,
            Action::Enqueue => actions::enqueue::run(cx).await,
            Action::ListWorkspaces => actions::list_workspaces::run(cx),
            Action::ListSessions => actions::list_sessions::run(cx),
            Action::SelectWorkspace => actions::select_workspace::run(cx),
            Action::InspectSession => actions::inspect_session::run(cx),
            Action::QueueStatus => actions::queue_status::run(cx).await,
            Action::ShowWorkItem => actions::show_work_item::run(cx).await,
            Action::ListRuns => actions::list_runs::run(cx).await,
            Action::ShowRun => actions::show_run::run(cx).await,
            Action::Diagnose => actions::diagnose::run(cx).await,
            Action::Health => actions::health::run(cx).await,
            Action::Pause => actions::pause::run(cx).await,
            Action::Resume => actions::resume::run(cx).await,
            Action::Cancel => actions::cancel::run(cx).await,
            Action::Unsupported => actions::unsupported::run(cx),
        }
    }
}
