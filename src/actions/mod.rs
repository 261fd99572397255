//! One file per action. Each handler turns a resolved request into its OpsResult.

pub mod binding;
pub mod dispatch;
pub mod enqueue;
pub mod inspect_session;
pub mod list_sessions;
pub mod list_workspaces;
pub mod select_workspace;
pub mod status;
pub mod unsupported;

use serde_json::{Map, Value};

use crate::actions::dispatch::Service;
use crate::contract::progress::Progress;
use crate::contract::vocab::Route;
use crate::contract::{Completion, OpsRequest, OpsResult, Record, ResultStatus};
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
