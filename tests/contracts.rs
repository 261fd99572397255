//! The published contract (`contracts/`) is consistent with itself: every schema is a valid
//! draft 2020-12 schema, every example message matches the schema its file name names, and
//! messages that break the contract are refused.
//!
//! Example files are named `<kind>.<what>.json`, where `<kind>` is `request`, `result` or
//! `frame`; a file with any other prefix fails the test, so a misnamed example cannot go
//! unchecked.

#[path = "common/schemas.rs"]
mod schemas;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

fn contracts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn example(file: &str) -> Value {
    read_json(&contracts_dir().join("examples").join(file))
}

#[test]
fn schemas_are_valid_draft_2020_12_schemas() {
    for (name, file, _) in schemas::SCHEMAS {
        let schema = schemas::schema(name);
        assert_eq!(
            schema["$schema"],
            json!("https://json-schema.org/draft/2020-12/schema"),
            "{file} must declare draft 2020-12"
        );
        if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
            panic!(
                "{file} is not a valid draft 2020-12 schema: {e} at {}",
                e.instance_path()
            );
        }
        // Compiles (all `$ref`s resolve, all patterns are valid regexes) ...
        let validator = schemas::validator(name);
        // ... and agrees with the examples it carries itself.
        let examples = schema["examples"]
            .as_array()
            .unwrap_or_else(|| panic!("{file} has no examples"));
        for (i, instance) in examples.iter().enumerate() {
            let errors: Vec<String> = validator
                .iter_errors(instance)
                .map(|e| format!("{}: {e}", e.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{file} examples[{i}]: {errors:?}");
        }
    }
}

#[test]
fn every_example_matches_the_schema_its_name_names() {
    let dir = contracts_dir().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();

    let mut failures = Vec::new();
    let mut checked = Vec::new();
    for path in &files {
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 file name");
        let kind = file.split('.').next().unwrap_or_default();
        if !schemas::SCHEMAS.iter().any(|(short, _, _)| *short == kind) {
            failures.push(format!(
                "{file}: name must start with request., result. or frame."
            ));
            continue;
        }
        let errors = schemas::violations(kind, &read_json(path));
        if !errors.is_empty() {
            failures.push(format!("{file}:\n    {}", errors.join("\n    ")));
        }
        checked.push(file.to_string());
    }
    assert!(
        failures.is_empty(),
        "examples that break the contract:\n  {}",
        failures.join("\n  ")
    );

    // The examples the contract documents, and the reference's own fixtures, are all there.
    for expected in [
        "request.status.json",
        "request.enqueue.json",
        "request.select_workspace.json",
        "request.list_workspaces.json",
        "request.fixture.status_request.json",
        "request.fixture.enqueue_request.json",
        "result.status.json",
        "result.enqueue.incomplete.json",
        "result.error.unsupported_action.json",
        "result.error.invalid_request.json",
        "result.fixture.status_result.json",
        "result.fixture.incomplete_scoped_result.json",
        "frame.accepted.json",
        "frame.queued.json",
        "frame.started.json",
        "frame.finished.json",
        "frame.stage_completed.json",
    ] {
        assert!(
            checked.iter().any(|f| f == expected),
            "missing example {expected}"
        );
    }
}

/// A change that makes a valid example break the contract.
type Breakage = fn(&mut Value);

#[test]
fn messages_that_break_the_contract_are_refused() {
    let cases: [(&str, &str, &str, Breakage); 21] = [
        (
            "request",
            "request.enqueue.json",
            "missing request_id",
            |v| {
                v.as_object_mut().expect("object").remove("request_id");
            },
        ),
        ("request", "request.enqueue.json", "blank request_id", |v| {
            v["request_id"] = json!("   ");
        }),
        (
            "request",
            "request.enqueue.json",
            "other schema version",
            |v| {
                v["schema_version"] = json!("millracer.ops.v0.3");
            },
        ),
        (
            "request",
            "request.status.json",
            "workspace_ref not an object",
            |v| {
                v["workspace_ref"] = json!("/tmp/ws");
            },
        ),
        (
            "request",
            "request.status.json",
            "source without kind",
            |v| {
                v["source"] = json!({"surface": "command_panel"});
            },
        ),
        (
            "request",
            "request.status.json",
            "actor without kind",
            |v| {
                v["actor"] = json!({"display_name": "operator"});
            },
        ),
        (
            "request",
            "request.enqueue.json",
            "scoped item without id",
            |v| {
                v["scoped_work_item"] = json!({"title": "no id"});
            },
        ),
        (
            "result",
            "result.status.json",
            "status outside the enum",
            |v| {
                v["status"] = json!("done");
            },
        ),
        ("result", "result.status.json", "null route", |v| {
            v["route"] = Value::Null;
        }),
        (
            "result",
            "result.status.json",
            "null in workspace_ref",
            |v| {
                v["workspace_ref"]["environment"] = Value::Null;
            },
        ),
        (
            "result",
            "result.status.json",
            "unknown top-level key",
            |v| {
                v["extra"] = json!(1);
            },
        ),
        ("result", "result.status.json", "timestamp with Z", |v| {
            v["finished_at"] = json!("2026-05-12T00:00:01Z");
        }),
        (
            "result",
            "result.status.json",
            "completion missing a key",
            |v| {
                v["completion"]
                    .as_object_mut()
                    .expect("object")
                    .remove("terminal_outcome_ref");
            },
        ),
        ("result", "result.status.json", "empty evidence_refs", |v| {
            v["evidence_refs"] = json!([]);
        }),
        (
            "result",
            "result.status.json",
            "empty request_id on success",
            |v| {
                v["request_id"] = json!("");
            },
        ),
        // Matches the timestamp pattern; only `format: date-time` refuses it, which proves
        // format validation is on.
        ("frame", "frame.started.json", "impossible date", |v| {
            v["timestamp"] = json!("2026-02-30T00:00:00+00:00");
        }),
        ("frame", "frame.started.json", "sequence 0", |v| {
            v["sequence"] = json!(0);
        }),
        (
            "frame",
            "frame.started.json",
            "event type not dotted lower case",
            |v| {
                v["event_type"] = json!("Request.Started");
            },
        ),
        (
            "frame",
            "frame.accepted.json",
            "accepted without its action",
            |v| {
                v["payload"]
                    .as_object_mut()
                    .expect("payload")
                    .remove("action");
            },
        ),
        (
            "frame",
            "frame.queued.json",
            "negative queue position",
            |v| {
                v["payload"]["position"] = json!(-1);
            },
        ),
        (
            "frame",
            "frame.finished.json",
            "finished without status",
            |v| {
                v["payload"] = json!({"outcome": "incomplete"});
            },
        ),
    ];
    for (kind, file, what, breakage) in cases {
        let mut message = example(file);
        assert!(
            schemas::violations(kind, &message).is_empty(),
            "{file} must be valid before it is broken"
        );
        breakage(&mut message);
        assert!(
            !schemas::validator(kind).is_valid(&message),
            "{kind} schema accepted a message with {what}: {message:#}"
        );
    }
}

#[test]
fn asyncapi_document_names_the_schemas_and_subjects() {
    let path = contracts_dir().join("asyncapi.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        text.contains("asyncapi: 3.0.0"),
        "asyncapi.yaml must be AsyncAPI 3.0.0"
    );
    for (_, file, _) in schemas::SCHEMAS {
        assert!(
            text.contains(&format!("./{file}")),
            "asyncapi.yaml must reference {file}"
        );
    }
    for address in [
        "millracer.ops.v0_2.req.ws.{workspace}",
        "millracer.ops.v0_2.req.path.{path_key}",
        "millracer.ops.v0_2.req.any",
        "millracer.ops.v0_2.frames.{workspace}.{request}",
    ] {
        assert!(
            text.contains(address),
            "asyncapi.yaml must document {address}"
        );
    }
}
