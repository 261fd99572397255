//! The subject binds the workspace. Permissions on a shared bus are written per subject
//! (`req.ws.shop`, `jobs.ws.shop.>`), so a request that arrives on a workspace's subject
//! must run against that workspace and no other, whatever its body says; otherwise a role
//! allowed to publish for `shop` could act on any workspace by naming it in the body.

use crate::actions::dispatch::{Action, Service};
use crate::contract::{OpsRequest, Record};
use crate::millrace::workspace::resolve_path;

/// The error code of a body that names a workspace other than its subject's.
pub const WORKSPACE_MISMATCH: &str = "workspace_mismatch";

/// What the subject a request arrived on binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// A workspace's subject (by id or by path): the registered id of that workspace.
    Workspace(String),
    /// `req.any` / `jobs.any`: workspace-less actions only.
    Any,
}

impl Bound {
    /// The workspace id the request is bound to, if any.
    pub fn workspace(&self) -> Option<&str> {
        match self {
            Self::Workspace(id) => Some(id),
            Self::Any => None,
        }
    }
}

impl Service {
    /// Checks the body against the subject's binding and fills an empty `workspace_ref`
    /// with the subject's workspace. `Err` is the refusal to answer with; nothing ran.
    pub fn bind(&self, request: &mut OpsRequest, bound: &Bound) -> Result<(), Record> {
        let action = Action::parse(&request.action);
        let wref = &mut request.workspace_ref;
        match bound {
            Bound::Any => {
                if matches!(action, Action::Status | Action::Enqueue) {
                    return Err(Record::error(
                        WORKSPACE_MISMATCH,
                        format!(
                            "Action {:?} needs a workspace; the workspace-less subject takes only list_workspaces, list_sessions, inspect_session and select_workspace.",
                            request.action
                        ),
                    )
                    .suggest("Send the request on its workspace's subject (req.ws.<workspace_id> or jobs.ws.<workspace_id>.<class>)."));
                }
                Ok(())
            }
            Bound::Workspace(id) => {
                let Some(record) = self.registry.get(id) else {
                    return Err(Record::error(
                        "workspace_not_served",
                        format!("This worker does not serve the workspace {id:?}."),
                    ));
                };
                let mismatch = |named: String| {
                    Record::error(
                        WORKSPACE_MISMATCH,
                        format!(
                            "The request names {named}, but it was sent on the subject of workspace {id:?}; it was not run."
                        ),
                    )
                    .suggest("Send a request on its own workspace's subject, or leave workspace_ref empty to mean the subject's workspace.")
                };
                if let Some(named) = &wref.workspace_id
                    && named != &record.id
                {
                    return Err(mismatch(format!("workspace {named:?}")));
                }
                if let Some(root) = &wref.root_path
                    && resolve_path(std::path::Path::new(root)) != record.root
                {
                    return Err(mismatch(format!("the root path {root:?}")));
                }
                let names_none = wref.workspace_id.is_none() && wref.root_path.is_none();
                let takes_workspace = action.needs_workspace() || action == Action::SelectWorkspace;
                if names_none && takes_workspace {
                    wref.workspace_id = Some(record.id.clone());
                }
                Ok(())
            }
        }
    }
}
