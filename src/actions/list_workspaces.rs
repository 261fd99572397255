//! `list_workspaces`: the registry this process serves, sorted by id.

use serde_json::{Map, Value, json};

use super::Context;
use crate::contract::OpsResult;

pub fn run(cx: Context<'_>) -> OpsResult {
    let registry = &cx.service.registry;
    let workspaces: Vec<Value> = registry
        .records()
        .map(|record| {
            json!({
                "workspace_id": record.id,
                "root_path": record.root.display().to_string(),
                "display_name": record.display_name,
                "default_mode": record.default_mode,
                "tags": record.tags,
                "is_default": registry.default_id() == Some(record.id.as_str()),
            })
        })
        .collect();
    let mut result = Map::new();
    result.insert("workspaces".to_string(), Value::Array(workspaces));
    cx.inspect_success(result, None)
}
