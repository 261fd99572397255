//! Workspaces whose stages run the stand-in runner (`tests/support/stand_in_pi.py`)
//! instead of a model: the real `millrace` daemon, real stages, scripted answers.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Workspace, repo_root};

/// A real workspace wired to the stand-in runner, with a scenario file the test controls.
pub struct StandInWorkspace {
    pub workspace: Workspace,
    pub script: PathBuf,
    pub calls: PathBuf,
}

impl StandInWorkspace {
    /// `stages` maps a stage name to `{"marker": "blocked"|"success"|…, "delay_seconds": n,
    /// "hold_until": "/path/of/a/release/file"}` (see `tests/support/README.md`).
    pub fn new(stages: Value) -> Self {
        let workspace = Workspace::init();
        let support = tempfile::Builder::new()
            .prefix("stand-in-")
            .tempdir()
            .expect("stand-in temp dir")
            .keep();
        let script = support.join("scenario.json");
        let calls = support.join("calls.jsonl");
        let stand_in = repo_root().join("tests/support/stand_in_pi.py");
        assert!(
            stand_in.is_file(),
            "stand-in runner missing at {}",
            stand_in.display()
        );
        let toml = workspace
            .path()
            .join("millrace-agents")
            .join("millrace.toml");
        let mut text = std::fs::read_to_string(&toml).expect("read millrace.toml");
        text.push_str(&format!(
            "\n[runners.pi]\ncommand = \"{}\"\nenv = {{ STAND_IN_PI_SCRIPT = \"{}\" }}\n",
            stand_in.display(),
            script.display()
        ));
        std::fs::write(&toml, text).expect("write millrace.toml");
        let this = Self {
            workspace,
            script,
            calls,
        };
        this.set_stages(stages);
        this
    }

    pub fn path(&self) -> &Path {
        self.workspace.path()
    }

    /// Replaces the scenario (the stand-in re-reads it on every prompt).
    pub fn set_stages(&self, stages: Value) {
        let scenario = json!({"log": self.calls, "default_delay_seconds": 0.0, "stages": stages});
        std::fs::write(&self.script, scenario.to_string()).expect("write scenario");
    }

    /// The stage runs the stand-in started, in order: one `started` line each. The
    /// `abandoned` and `crashed` lines the stand-in adds about a run already counted are not
    /// runs of their own (see [`StandInWorkspace::log_lines`] for every line).
    pub fn calls(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|line| line["event"] == "started")
            .collect()
    }

    /// Every line of the stand-in's call log (`started`, `abandoned`, `crashed`), in order.
    pub fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}
