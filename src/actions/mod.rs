//! One file per action. Each handler turns a resolved request into its OpsResult.

pub mod binding;
pub mod cancel;
pub mod diagnose;
pub mod dispatch;
pub mod enqueue;
pub mod health;
pub mod inspect_session;
pub mod list_runs;
pub mod list_sessions;
pub mod list_workspaces;
pub mod pause;
pub mod queue_status;
pub mod resume;
pub mod select_workspace;
pub mod show_run;
pub mod show_work_item;
pub mod status;
pub mod unsupported;

use serde_json::{Map, Value};

use crate::actions::dispatch::Service;
use crate::contract::progress::Progress;
use crate::contract::vocab::ErrorCode;
use crate::contract::vocab::Route;
use crate::contract::{Completion, OpsRequest, OpsResult, Record, ResultStatus};
use crate::millrace::command::{Inspect, command_cwd};
use crate::millrace::workspace::Resolution;

/// What a handler gets: the process's service, the request, its resolution and a way to
/// emit progress frames.
pub struct Context<'a> {
    pub service: &'a Service,
    pub request: &'a OpsRequest,
    pub resolution: &'a Resolution,
    pub started_at: String,
    pub progress: &'a Progress,
    /// A request another worker started and left: the work to pick up (delegated runs).
    pub resume: Option<&'a crate::millrace::delegation::Resume>,
    /// Fires when a `cancel` asks this request to stop.
    pub cancel: &'a tokio_util::sync::CancellationToken,
}

impl Context<'_> {
    /// The reference's `_success_result` for session/list actions: the request's own
    /// workspace_ref echoed, route `inspect_only`, completion `unknown/not_applicable`.
    pub fn inspect_success(
        &self,
        result: Map<String, Value>,
        session_ref: Option<String>,
    ) -> OpsResult {
        let mut out = OpsResult::new(
            &self.request.request_id,
            &self.request.action,
            ResultStatus::Succeeded,
            self.request.workspace_ref.clone(),
            self.started_at.clone(),
        );
        out.result = result;
        out.route = Some(Route::InspectOnly.as_str().to_string());
        out.completion = Some(Completion::unknown("not_applicable"));
        out.session_ref = session_ref;
        out
    }

    /// The 0.3.0 reference's `_runtime_payload_result`: one runtime command against the
    /// resolved workspace, its parsed answer as `result`, route `route`, completion
    /// `unknown/not_applicable`; a failing command is `runtime_command_failed` (or
    /// `runtime_timeout`).
    pub async fn runtime_payload(&self, what: &Inspect, route: &str) -> OpsResult {
        let Some(root) = self.resolution.root.as_deref() else {
            return self.failure(Record::error(
                ErrorCode::WorkspaceUnresolved,
                "Unable to resolve Millrace workspace.",
            ));
        };
        let cwd = command_cwd(self.service.settings.cwd.as_deref(), root);
        let answer = match &self.service.status_cache {
            // A worker: read-only inspections are remembered until the runtime changes.
            Some(cache) => {
                cache
                    .inspect(&self.service.millrace, what, root, &cwd)
                    .await
            }
            None => self.service.millrace.inspect(what, root, &cwd).await,
        };
        match answer {
            Ok(payload) => self.resolved_success(payload, route),
            Err(err) => self.failure(Record::error(err.code(), err.to_string())),
        }
    }

    /// A success with the resolved workspace_ref, completion `unknown/not_applicable`.
    pub fn resolved_success(&self, result: Map<String, Value>, route: &str) -> OpsResult {
        let mut out = OpsResult::new(
            &self.request.request_id,
            &self.request.action,
            ResultStatus::Succeeded,
            self.resolution.workspace_ref(&self.request.workspace_ref),
            self.started_at.clone(),
        );
        out.result = result;
        out.route = Some(route.to_string());
        out.completion = Some(Completion::unknown("not_applicable"));
        out
    }

    /// The first of `keys` in the payload that is a non-empty string (the reference's
    /// `_input_string`), checked as a runtime id: `invalid_input` names what is missing.
    pub fn required_id(&self, keys: &[&str], what: &str) -> Result<String, Box<OpsResult>> {
        let Some(id) = keys.iter().find_map(|k| self.request.payload_string(k)) else {
            return Err(Box::new(self.failure(Record::error(
                ErrorCode::InvalidInput,
                format!("{} requires input.payload.{what}.", self.request.action),
            ))));
        };
        if id.len() > 256 || id.chars().any(char::is_control) {
            return Err(Box::new(self.failure(Record::error(
                ErrorCode::InvalidInput,
                format!("input.payload.{what} is not a valid id."),
            ))));
        }
        Ok(id)
    }

    /// The reference's `_error_result` with this request's resolution.
    pub fn failure(&self, error: Record) -> OpsResult {
        self.failure_with(self.resolution, error)
    }

    pub fn failure_with(&self, resolution: &Resolution, error: Record) -> OpsResult {
        OpsResult::failure(
            &self.request.request_id,
            &self.request.action,
            resolution.workspace_ref(&self.request.workspace_ref),
            self.started_at.clone(),
            error,
        )
    }
}
