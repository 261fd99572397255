//! `list_workspaces`: the workspaces this process serves, sorted by id; on a worker with
//! the bus's registry, every workspace the bus serves, with its owners and whether each is
//! live (a workspace-less request may reach any worker: each answers with the bus's view).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::Context;
use crate::contract::OpsResult;
use crate::contract::registry::Owner;

pub fn run(cx: Context<'_>) -> OpsResult {
    let registry = &cx.service.registry;
    let mut workspaces: BTreeMap<String, Map<String, Value>> = registry
        .records()
        .map(|record| {
            let map = object(json!({
                "workspace_id": record.id,
                "root_path": record.root.display().to_string(),
                "display_name": record.display_name,
                "default_mode": record.default_mode,
                "tags": record.tags,
                "is_default": registry.default_id() == Some(record.id.as_str()),
            }));
            (record.id.clone(), map)
        })
        .collect();
    if let Some(directory) = &cx.service.directory {
        let mut owners: BTreeMap<String, Vec<Owner>> = BTreeMap::new();
        for owner in directory.owners() {
            owners
                .entry(owner.entry.workspace_id.clone())
                .or_default()
                .push(owner);
        }
        for (id, owners) in owners {
            let first = &owners[0].entry;
            let item = workspaces.entry(id.clone()).or_insert_with(|| {
                object(json!({
                    "workspace_id": id,
                    "root_path": first.root_path,
                    "display_name": first.display_name,
                    "default_mode": Value::Null,
                    "tags": [],
                    "is_default": false,
                }))
            });
            item.insert("live".into(), json!(owners.iter().any(|o| o.live)));
            item.insert(
                "owners".into(),
                owners
                    .iter()
                    .map(|o| {
                        json!({
                            "worker_id": o.entry.worker_id,
                            "worker_name": o.entry.worker_name,
                            "host": o.entry.host,
                            "root_path": o.entry.root_path,
                            "fingerprint": o.entry.fingerprint,
                            "version": o.entry.version,
                            "at": o.entry.at,
                            "age_seconds": o.age.as_secs_f64(),
                            "live": o.live,
                        })
                    })
                    .collect(),
            );
        }
        // A workspace this worker serves but the registry does not show yet (its first put
        // is on its way): served, by this worker.
        for item in workspaces.values_mut() {
            item.entry("live").or_insert(json!(true));
            item.entry("owners").or_insert(json!([]));
        }
    }
    let mut result = Map::new();
    result.insert(
        "workspaces".to_string(),
        Value::Array(workspaces.into_values().map(Value::Object).collect()),
    );
    cx.inspect_success(result, None)
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}
