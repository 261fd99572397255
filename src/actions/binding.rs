//! The subject binds the workspace. Permissions on a shared bus are written per subject
//! (`req.ws.shop`, `jobs.ws.shop.>`), so a request that arrives on a workspace's subject
//! must run against that workspace and no other, whatever its body says; otherwise a role
//! allowed to publish for `shop` could act on any workspace by naming it in the body.

use crate::actions::dispatch::{Action, Service};
use crate::contract::vocab::ErrorCode;
use crate::contract::{OpsRequest, Record};
use crate::millrace::workspace::{Registry, resolve_path};

/// The error code of a body that names a workspace other than its subject's.
pub const WORKSPACE_MISMATCH: ErrorCode = ErrorCode::WorkspaceMismatch;

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
    pub fn bind(&self, request: &mut OpsRequest, bound: &Bound) -> Result<(), Box<Record>> {
        bind(&self.registry, request, bound)
    }
}

/// [`Service::bind`] against a registry of served workspaces.
pub fn bind(
    registry: &Registry,
    request: &mut OpsRequest,
    bound: &Bound,
) -> Result<(), Box<Record>> {
    let action = Action::parse(&request.action);
    match bound {
        Bound::Any => bind_any(registry, request, action),
        Bound::Workspace(id) => {
            let Some(record) = registry.get(id) else {
                return Err(Box::new(Record::error(
                    ErrorCode::WorkspaceNotServed,
                    format!("This worker does not serve the workspace {id:?}."),
                )));
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
            if matches!(
                action,
                Action::ListWorkspaces | Action::ListSessions | Action::InspectSession
            ) {
                // Host-wide reads: every workspace and every session of this host, which a
                // role scoped to one workspace must not see.
                return Err(Box::new(Record::error(
                    WORKSPACE_MISMATCH,
                    format!(
                        "Action {:?} reads every workspace of this host; it is not taken on the subject of workspace {id:?}.",
                        request.action
                    ),
                )
                .suggest("Send it on the workspace-less subject (req.any or jobs.any), a trusted role's subject.")));
            }
            let wref = &mut request.workspace_ref;
            if let Some(named) = &wref.workspace_id
                && named != &record.id
            {
                return Err(Box::new(mismatch(format!("workspace {named:?}"))));
            }
            if let Some(root) = &wref.root_path
                && resolve_path(std::path::Path::new(root)) != record.root
            {
                return Err(Box::new(mismatch(format!("the root path {root:?}"))));
            }
            if wref.workspace_id.is_none() && wref.root_path.is_none() {
                wref.workspace_id = Some(record.id.clone());
            }
            if action == Action::SelectWorkspace {
                // select_workspace names the workspace to select in its payload.
                match request.payload_string("workspace_id") {
                    Some(named) if named != record.id => {
                        return Err(Box::new(mismatch(format!("workspace {named:?} to select"))));
                    }
                    Some(_) => {}
                    None => fill_payload_workspace(request, &record.id),
                }
            }
            Ok(())
        }
    }
}

/// `req.any` / `jobs.any`: workspace-less actions. `status` and `enqueue` for a workspace
/// this worker serves belong on that workspace's subject; one it does not serve goes on to
/// the usual `workspace_not_served` (or `workspace_unresolved`) answer, so a caller asking
/// any worker about an unknown workspace still gets a clear reason.
fn bind_any(registry: &Registry, request: &OpsRequest, action: Action) -> Result<(), Box<Record>> {
    if !action.needs_workspace() || action == Action::Unsupported {
        return Ok(());
    }
    let wref = &request.workspace_ref;
    let by_id = wref.workspace_id.as_deref().and_then(|id| registry.get(id));
    let by_path = wref
        .root_path
        .as_deref()
        .and_then(|root| registry.by_root(&resolve_path(std::path::Path::new(root))));
    let names_none = wref.workspace_id.is_none() && wref.root_path.is_none();
    if by_id.is_some() || by_path.is_some() || names_none {
        return Err(Box::new(Record::error(
            WORKSPACE_MISMATCH,
            format!(
                "Action {:?} needs a workspace; the workspace-less subject takes only list_workspaces, list_sessions, inspect_session and select_workspace.",
                request.action
            ),
        )
        .suggest("Send the request on its workspace's subject (req.ws.<workspace_id> or jobs.ws.<workspace_id>.<class>).")));
    }
    Ok(())
}

/// Puts `workspace_id` where [`OpsRequest::payload`] reads it.
fn fill_payload_workspace(request: &mut OpsRequest, id: &str) {
    let value = serde_json::Value::String(id.to_string());
    match request.input.get_mut("payload") {
        Some(serde_json::Value::Object(nested)) => {
            nested.insert("workspace_id".to_string(), value);
        }
        _ => {
            request.input.insert("workspace_id".to_string(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::parse_request;
    use crate::millrace::workspace::WorkspaceRecord;

    fn registry(shop: &std::path::Path, other: &std::path::Path) -> Registry {
        let record = |id: &str, root: &std::path::Path| WorkspaceRecord {
            id: id.to_string(),
            root: resolve_path(root),
            display_name: None,
            default_mode: None,
            tags: Vec::new(),
        };
        Registry::new(vec![record("shop", shop), record("other", other)], None).expect("registry")
    }

    fn request(action: &str, wref: serde_json::Value) -> OpsRequest {
        let raw = serde_json::json!({
            "schema_version": "millracer.ops.v0.2", "request_id": "r-1",
            "workspace_ref": wref, "source": {"kind": "cli"}, "action": action, "input": {},
        });
        parse_request(raw.to_string().as_bytes()).expect("valid request")
    }

    #[test]
    fn a_body_naming_another_workspace_is_refused_and_an_empty_one_is_filled() {
        let (shop, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let registry = registry(shop.path(), other.path());
        let bound = Bound::Workspace("shop".to_string());
        let other_path = other.path().display().to_string();
        let shop_path = shop.path().display().to_string();
        for wref in [
            serde_json::json!({"workspace_id": "other"}),
            serde_json::json!({"root_path": other_path}),
            serde_json::json!({"workspace_id": "shop", "root_path": other_path}),
            serde_json::json!({"workspace_id": "nowhere"}),
        ] {
            for action in ["status", "enqueue", "select_workspace"] {
                let mut r = request(action, wref.clone());
                let err = bind(&registry, &mut r, &bound).expect_err("mismatch");
                assert_eq!(err.code, WORKSPACE_MISMATCH, "{action} {wref}");
            }
        }
        let mut r = request("status", serde_json::json!({}));
        bind(&registry, &mut r, &bound).expect("empty means the subject's");
        assert_eq!(r.workspace_ref.workspace_id.as_deref(), Some("shop"));
        let mut r = request("status", serde_json::json!({"root_path": shop_path}));
        bind(&registry, &mut r, &bound).expect("its own path");
        for action in ["list_sessions", "list_workspaces", "inspect_session"] {
            let mut r = request(action, serde_json::json!({}));
            let err = bind(&registry, &mut r, &bound).expect_err("host-wide read");
            assert_eq!(err.code, WORKSPACE_MISMATCH, "{action}");
        }
        let mut r = request("select_workspace", serde_json::json!({}));
        r.input
            .insert("workspace_id".to_string(), serde_json::json!("other"));
        let err = bind(&registry, &mut r, &bound).expect_err("selects another");
        assert_eq!(err.code, WORKSPACE_MISMATCH);
        let mut r = request("select_workspace", serde_json::json!({}));
        bind(&registry, &mut r, &bound).expect("selects its own");
        assert_eq!(r.payload_string("workspace_id").as_deref(), Some("shop"));
    }

    #[test]
    fn the_workspace_less_subject_takes_workspace_less_actions_only() {
        let (shop, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let registry = registry(shop.path(), other.path());
        let shop_path = shop.path().display().to_string();
        for wref in [
            serde_json::json!({"workspace_id": "shop"}),
            serde_json::json!({"root_path": shop_path}),
            serde_json::json!({}),
        ] {
            for action in ["status", "enqueue"] {
                let mut r = request(action, wref.clone());
                let err = bind(&registry, &mut r, &Bound::Any).expect_err("refused");
                assert_eq!(err.code, WORKSPACE_MISMATCH, "{action} {wref}");
            }
        }
        // Not served here: left to the usual workspace_not_served answer.
        let mut r = request(
            "status",
            serde_json::json!({"root_path": "/nowhere/at/all"}),
        );
        bind(&registry, &mut r, &Bound::Any).expect("answered as not served");
        for action in [
            "list_workspaces",
            "list_sessions",
            "inspect_session",
            "select_workspace",
        ] {
            let mut r = request(action, serde_json::json!({}));
            bind(&registry, &mut r, &Bound::Any).expect(action);
        }
    }
}
