//! `status`: the runtime's own status object, verbatim.

use super::Context;
use crate::contract::vocab::ErrorCode;
use crate::contract::vocab::Route;
use crate::contract::{Completion, OpsResult, Record, ResultStatus};
use crate::millrace::command::command_cwd;

pub async fn run(cx: Context<'_>) -> OpsResult {
    let Some(root) = cx.resolution.root.as_deref() else {
        return cx.failure(Record::error(
            ErrorCode::WorkspaceUnresolved,
            "Unable to resolve Millrace workspace.",
        ));
    };
    let cwd = command_cwd(cx.service.settings.cwd.as_deref(), root);
    let status = match &cx.service.status_cache {
        Some(cache) => cache.status(&cx.service.millrace, root, &cwd).await,
        None => cx.service.millrace.status(root, &cwd).await,
    };
    match status {
        Ok(status) => {
            let mut out = OpsResult::new(
                &cx.request.request_id,
                &cx.request.action,
                ResultStatus::Succeeded,
                cx.resolution.workspace_ref(&cx.request.workspace_ref),
                cx.started_at.clone(),
            );
            out.result = status;
            out.route = Some(Route::StatusOnly.as_str().to_string());
            out.completion = Some(Completion::unknown("not_applicable"));
            out
        }
        Err(err) => cx.failure(Record::error(err.code(), err.to_string())),
    }
}
