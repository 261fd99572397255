//! Worker configuration: `--workspace [ID=]PATH` flags and/or a TOML file.
//!
//! ```toml
//! [nats]
//! url = "nats://127.0.0.1:4222"  # or several, comma-separated: "nats://a:4222,nats://b:4222"
//! stream_replicas = 3            # replicas of the streams and bucket (--stream-replicas wins)
//!
//! [worker]
//! host_id = "build-1"        # default: the host name (see docs/bus-naming.md)
//!
//! [[workspace]]
//! id = "demo"
//! path = "/srv/millrace/demo"
//! display_name = "Demo"      # default: the directory name
//! default_mode = "default_pi" # default: --millrace-mode
//! tags = ["team-a"]
//! default = true              # the workspace for requests that name none
//!
//! [pi]                        # a pi runner for the natural-language route (optional)
//! enabled = true              # same as --pi-runner
//! command = "pi"              # each key defaults to the command-line option
//! provider = "openai"
//! model = "gpt-5"
//! thinking = "high"
//! skills = ["/srv/skills/millrace-ops-agent-manual"]
//! timeout_seconds = 600
//! session = "rpc"             # or "print"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::millrace::workspace::{Registry, RegistryError, WorkspaceRecord, resolve_path};

/// The file's shape. Unknown keys are an error: a typo should not silently do nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub nats: NatsSection,
    #[serde(default, rename = "workspace")]
    pub workspaces: Vec<WorkspaceEntry>,
    #[serde(default)]
    pub pi: PiSection,
    #[serde(default)]
    pub worker: WorkerSection,
}

/// `[worker]`: the worker's identity on the bus.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    /// The host id (`--host-id` and `MILLRACER_HOST_ID` win).
    pub host_id: Option<String>,
}

/// `[pi]`: the worker's pi runner. Unset keys fall back to the command-line options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiSection {
    #[serde(default)]
    pub enabled: bool,
    pub command: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub thinking: Option<String>,
    #[serde(default)]
    pub skills: Vec<PathBuf>,
    pub timeout_seconds: Option<u64>,
    pub session: Option<PiSessionName>,
}

/// `[pi] session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PiSessionName {
    Rpc,
    Print,
}

impl PiSection {
    /// The worker's pi configuration: this section over the command-line options.
    pub fn apply(
        &self,
        mut base: crate::agent::pi::PiConfig,
        workspace: Option<&Path>,
    ) -> Result<crate::agent::pi::PiConfig, crate::agent::pi::PiError> {
        if let Some(command) = &self.command {
            base.command = command.clone();
        }
        if self.provider.is_some() {
            base.provider = self.provider.clone();
        }
        if self.model.is_some() {
            base.model = self.model.clone();
        }
        if let Some(thinking) = &self.thinking {
            base.thinking = Some(thinking.clone()).filter(|t| !t.is_empty());
        }
        if !self.skills.is_empty() {
            base.skills = crate::agent::pi::resolve_skills(&self.skills, true, workspace)?;
        }
        if let Some(seconds) = self.timeout_seconds {
            base.turn_timeout = std::time::Duration::from_secs(seconds.max(1));
        }
        match self.session {
            Some(PiSessionName::Print) => base.kind = crate::agent::pi::SessionKind::Print,
            Some(PiSessionName::Rpc) => base.kind = crate::agent::pi::SessionKind::Rpc,
            None => {}
        }
        Ok(base)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsSection {
    pub url: Option<String>,
    pub creds: Option<PathBuf>,
    /// The worker's reply inbox prefix (`--inbox-prefix` wins).
    pub inbox_prefix: Option<String>,
    /// Replicas of the jobs and frames streams and the results bucket
    /// (`--stream-replicas` wins).
    pub stream_replicas: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceEntry {
    pub id: String,
    pub path: PathBuf,
    pub display_name: Option<String>,
    pub default_mode: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "no workspace to serve: pass --workspace [ID=]PATH or list [[workspace]] entries in --config"
    )]
    NoWorkspace,
    #[error("several unnamed workspaces: name each one with --workspace ID=PATH")]
    Unnamed,
    #[error("workspace {id:?}: {path} is not a directory")]
    NotADirectory { id: String, path: PathBuf },
    #[error("more than one workspace is marked default")]
    TwoDefaults,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

/// Splits `ID=PATH`; anything whose part before `=` is not a plain id is a bare path.
pub fn parse_workspace_flag(spec: &str) -> (Option<String>, PathBuf) {
    if let Some((id, path)) = spec.split_once('=')
        && crate::bus::subjects::is_plain_token(id)
        && !path.is_empty()
    {
        return (Some(id.to_string()), PathBuf::from(path));
    }
    (None, PathBuf::from(spec))
}

/// Builds the registry a worker serves from flags and the config file. Paths are
/// resolved once here; each must be an existing directory. An unnamed workspace gets the
/// id `<dir-slug>-<8 hex of its fingerprint on host>` (see docs/bus-naming.md).
pub fn build_registry(
    flags: &[String],
    file: Option<&ConfigFile>,
    default_mode: &str,
    host: &str,
) -> Result<Registry, ConfigError> {
    let mut entries: Vec<(Option<String>, PathBuf, Option<&WorkspaceEntry>)> = flags
        .iter()
        .map(|spec| {
            let (id, path) = parse_workspace_flag(spec);
            (id, path, None)
        })
        .collect();
    if let Some(file) = file {
        entries.extend(
            file.workspaces
                .iter()
                .map(|e| (Some(e.id.clone()), e.path.clone(), Some(e))),
        );
    }
    if entries.is_empty() {
        return Err(ConfigError::NoWorkspace);
    }
    let unnamed = entries.iter().filter(|(id, _, _)| id.is_none()).count();
    if unnamed > 1 || (unnamed == 1 && entries.len() > 1) {
        return Err(ConfigError::Unnamed);
    }
    let mut default_id = None;
    let mut records = Vec::new();
    for (id, path, entry) in entries {
        let root = resolve_path(&path);
        let id = id.unwrap_or_else(|| {
            let fingerprint = crate::bus::subjects::fingerprint(host, &root);
            crate::contract::token::unnamed_workspace_id(&root, &fingerprint)
        });
        if !root.is_dir() {
            return Err(ConfigError::NotADirectory { id, path: root });
        }
        if entry.is_some_and(|e| e.default) {
            if default_id.is_some() {
                return Err(ConfigError::TwoDefaults);
            }
            default_id = Some(id.clone());
        }
        let display_name = entry
            .and_then(|e| e.display_name.clone())
            .or_else(|| root.file_name().map(|n| n.to_string_lossy().into_owned()))
            .or_else(|| Some(root.display().to_string()));
        records.push(WorkspaceRecord {
            id,
            display_name,
            default_mode: Some(
                entry
                    .and_then(|e| e.default_mode.clone())
                    .unwrap_or_else(|| default_mode.to_string()),
            ),
            tags: entry.map(|e| e.tags.clone()).unwrap_or_default(),
            root,
        });
    }
    Ok(Registry::new(records, default_id)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_file_build_one_registry() {
        let a = tempfile::tempdir().expect("a");
        let b = tempfile::tempdir().expect("b");
        let file: ConfigFile = toml::from_str(&format!(
            "[[workspace]]\nid = \"b\"\npath = \"{}\"\ndefault = true\ntags = [\"x\"]\n",
            b.path().display()
        ))
        .expect("toml");
        let reg = build_registry(
            &[format!("a={}", a.path().display())],
            Some(&file),
            "default_pi",
            "h",
        )
        .expect("registry");
        assert_eq!(reg.default_id(), Some("b"));
        assert_eq!(reg.records().count(), 2);
    }

    #[test]
    fn single_unnamed_gets_a_host_scoped_id_and_bad_configs_fail() {
        let a = tempfile::tempdir().expect("a");
        let flags = [a.path().display().to_string()];
        let reg = build_registry(&flags, None, "m", "h1").expect("ok");
        let id = reg
            .default_id()
            .expect("the single workspace is the default");
        let root = resolve_path(a.path());
        let fp = crate::bus::subjects::fingerprint("h1", &root);
        assert!(id.ends_with(&fp[..8]), "{id}");
        assert_ne!(id, "default");
        let other = build_registry(&flags, None, "m", "h2").expect("ok");
        assert_ne!(other.default_id(), Some(id), "another host, another id");
        assert!(matches!(
            build_registry(&[], None, "m", "h"),
            Err(ConfigError::NoWorkspace)
        ));
        assert!(matches!(
            build_registry(&["x=/definitely/not/here".into()], None, "m", "h"),
            Err(ConfigError::NotADirectory { .. })
        ));
        assert!(toml::from_str::<ConfigFile>("bogus = 1").is_err());
        let file: ConfigFile =
            toml::from_str("[pi]\nenabled = true\nsession = \"print\"\nmodel = \"m\"\n")
                .expect("pi section");
        let config = file
            .pi
            .apply(crate::agent::pi::PiConfig::default(), None)
            .expect("apply");
        assert!(file.pi.enabled);
        assert_eq!(config.kind, crate::agent::pi::SessionKind::Print);
        assert_eq!(config.model.as_deref(), Some("m"));
        assert_eq!(config.command, "pi");
    }
}
