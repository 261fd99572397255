//! Workspaces: the registry a process knows, and the reference's resolution rules.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::contract::token;
use crate::contract::{OpsRequest, WorkspaceRef};

/// One workspace a process knows by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceRecord {
    pub id: String,
    /// Resolved (absolute, symlinks followed) at start, so comparisons are exact.
    pub root: PathBuf,
    pub display_name: Option<String>,
    pub default_mode: Option<String>,
    pub tags: Vec<String>,
}

/// The workspaces known to this process, and which one is the default.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    records: BTreeMap<String, WorkspaceRecord>,
    default_id: Option<String>,
}

/// Why a registry could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "workspace id {0:?} is not allowed: use 1-64 letters, digits, '-' or '_', not starting with '_'"
    )]
    BadId(String),
    #[error("workspace id {0:?} is given twice")]
    Duplicate(String),
    #[error("workspace root {0} is given twice (ids {1:?} and {2:?})")]
    DuplicateRoot(String, String, String),
    #[error("default workspace {0:?} is not one of the configured workspaces")]
    UnknownDefault(String),
}

impl Registry {
    /// Builds a registry. Ids must be plain subject tokens: they become part of subjects.
    pub fn new(
        records: Vec<WorkspaceRecord>,
        default_id: Option<String>,
    ) -> Result<Self, RegistryError> {
        let mut map = BTreeMap::new();
        for record in records {
            if !token::is_plain_token(&record.id) {
                return Err(RegistryError::BadId(record.id));
            }
            if let Some(other) = map
                .values()
                .find(|r: &&WorkspaceRecord| r.root == record.root)
            {
                return Err(RegistryError::DuplicateRoot(
                    record.root.display().to_string(),
                    other.id.clone(),
                    record.id,
                ));
            }
            if map.contains_key(&record.id) {
                return Err(RegistryError::Duplicate(record.id));
            }
            map.insert(record.id.clone(), record);
        }
        let default_id = match default_id {
            Some(id) if !map.contains_key(&id) => return Err(RegistryError::UnknownDefault(id)),
            Some(id) => Some(id),
            None if map.len() == 1 => map.keys().next().cloned(),
            None => None,
        };
        Ok(Self {
            records: map,
            default_id,
        })
    }

    pub fn get(&self, id: &str) -> Option<&WorkspaceRecord> {
        self.records.get(id)
    }

    pub fn default_record(&self) -> Option<&WorkspaceRecord> {
        self.default_id.as_deref().and_then(|id| self.get(id))
    }

    pub fn default_id(&self) -> Option<&str> {
        self.default_id.as_deref()
    }

    /// Records sorted by id.
    pub fn records(&self) -> impl Iterator<Item = &WorkspaceRecord> {
        self.records.values()
    }

    /// The record whose root is exactly this resolved path.
    pub fn by_root(&self, root: &Path) -> Option<&WorkspaceRecord> {
        self.records.values().find(|r| r.root == root)
    }
}

/// How a request's workspace was found (the reference's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RequestWorkspaceId,
    RequestRootPath,
    CliWorkspace,
    Unresolved,
}

/// The outcome of resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub root: Option<PathBuf>,
    pub workspace_id: Option<String>,
    pub strategy: Strategy,
    pub mode: Option<String>,
    pub display_name: Option<String>,
}

impl Resolution {
    /// The reference's `_empty_resolution`: used by session actions' error results.
    pub fn empty() -> Self {
        Self {
            root: None,
            workspace_id: None,
            strategy: Strategy::Unresolved,
            mode: None,
            display_name: None,
        }
    }

    pub fn is_resolved(&self) -> bool {
        self.root.is_some()
    }

    /// The result's workspace_ref for this resolution (reference rule: resolution values
    /// win, the request fills the gaps; runtime_kind and environment come from the request).
    pub fn workspace_ref(&self, request: &WorkspaceRef) -> WorkspaceRef {
        WorkspaceRef {
            workspace_id: self
                .workspace_id
                .clone()
                .or_else(|| request.workspace_id.clone()),
            root_path: self.root.as_ref().map(|p| p.display().to_string()),
            display_name: self
                .display_name
                .clone()
                .or_else(|| request.display_name.clone()),
            runtime_kind: request.runtime_kind.clone(),
            mode: self.mode.clone().or_else(|| request.mode.clone()),
            environment: request.environment.clone(),
        }
    }
}

/// The reference's order: request id (falling back to root_path for an unknown id), then
/// root_path, then the process's own workspace, else unresolved.
pub fn resolve(
    request: &OpsRequest,
    registry: &Registry,
    cli_workspace: Option<&Path>,
) -> Resolution {
    let wref = &request.workspace_ref;
    if let Some(id) = &wref.workspace_id {
        return match registry.get(id) {
            Some(record) => Resolution {
                root: Some(record.root.clone()),
                workspace_id: Some(record.id.clone()),
                strategy: Strategy::RequestWorkspaceId,
                mode: wref.mode.clone().or_else(|| record.default_mode.clone()),
                display_name: record.display_name.clone(),
            },
            None => match &wref.root_path {
                Some(root) => from_path(root, Strategy::RequestRootPath, wref, Some(id.clone())),
                None => Resolution::empty(),
            },
        };
    }
    if let Some(root) = &wref.root_path {
        return from_path(root, Strategy::RequestRootPath, wref, None);
    }
    if let Some(cli) = cli_workspace {
        return Resolution {
            root: Some(resolve_path(cli)),
            workspace_id: None,
            strategy: Strategy::CliWorkspace,
            mode: wref.mode.clone(),
            display_name: None,
        };
    }
    Resolution::empty()
}

fn from_path(
    root: &str,
    strategy: Strategy,
    wref: &WorkspaceRef,
    id: Option<String>,
) -> Resolution {
    Resolution {
        root: Some(resolve_path(Path::new(root))),
        workspace_id: id,
        strategy,
        mode: wref.mode.clone(),
        display_name: wref.display_name.clone(),
    }
}

/// Python's `Path(p).expanduser().resolve()`: `~` from `$HOME`, relative paths against
/// the process's cwd, symlinks followed as far as the path exists, `..` applied after.
pub fn resolve_path(path: &Path) -> PathBuf {
    let expanded = expand_user(path);
    let absolute = if expanded.is_absolute() {
        expanded
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(expanded)
    };
    realpath(&absolute, 0)
}

fn expand_user(path: &Path) -> PathBuf {
    let mut components = path.components();
    match components.next() {
        Some(Component::Normal(first)) if first == "~" => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(components.as_path()),
            None => path.to_path_buf(),
        },
        _ => path.to_path_buf(),
    }
}

/// `os.path.realpath` without strictness: resolves each existing symlink in turn.
fn realpath(absolute: &Path, depth: usize) -> PathBuf {
    let mut out = PathBuf::from("/");
    let mut components: Vec<Component<'_>> = absolute.components().collect();
    components.reverse();
    while let Some(component) = components.pop() {
        match component {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                let candidate = out.join(name);
                match std::fs::read_link(&candidate) {
                    Ok(target) if depth < 40 => {
                        let joined = if target.is_absolute() {
                            target
                        } else {
                            out.join(target)
                        };
                        let rest: PathBuf = components.iter().rev().collect();
                        return realpath(&joined.join(rest), depth + 1);
                    }
                    _ => out = candidate,
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_path_follows_symlinks_and_dots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = resolve_path(dir.path());
        let target = real.join("target");
        std::fs::create_dir(&target).expect("mkdir");
        let link = real.join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert_eq!(resolve_path(&link.join("missing/../x")), target.join("x"));
        assert_eq!(resolve_path(&real.join("a/./b/..")), real.join("a"));
    }

    #[test]
    fn registry_rejects_unsafe_ids() {
        let rec = |id: &str, root: &str| WorkspaceRecord {
            id: id.into(),
            root: root.into(),
            display_name: None,
            default_mode: None,
            tags: vec![],
        };
        assert!(Registry::new(vec![rec("a.b", "/x")], None).is_err());
        assert!(Registry::new(vec![rec("_x", "/x")], None).is_err());
        assert!(Registry::new(vec![rec("a", "/x"), rec("b", "/x")], None).is_err());
        let reg = Registry::new(vec![rec("a", "/x")], None).expect("ok");
        assert_eq!(reg.default_id(), Some("a"));
    }
}
