//! The JSON Schemas of `contracts/`, compiled for tests.
//!
//! Any integration test can check a message the worker emitted against the published
//! contract: `common::schemas::assert_valid("result", &value)`. The schema files are embedded
//! with `include_str!`, so editing one rebuilds the tests that use it, and format validation
//! (`date-time`) is switched on, since `jsonschema` leaves it off by default.
//!
//! This file is a plain submodule: it uses nothing from its parent, so it compiles both as
//! `common::schemas` and when included on its own with `#[path = "common/schemas.rs"]`.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use serde_json::Value;

/// The three message schemas: short name (the prefix of the files in `contracts/examples/`),
/// file name in `contracts/`, and the file's text.
pub const SCHEMAS: [(&str, &str, &str); 3] = [
    (
        "request",
        "ops-request.schema.json",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contracts/ops-request.schema.json"
        )),
    ),
    (
        "result",
        "ops-result.schema.json",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contracts/ops-result.schema.json"
        )),
    ),
    (
        "frame",
        "ops-event-frame.schema.json",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contracts/ops-event-frame.schema.json"
        )),
    ),
];

/// The schema named `name` as JSON: a short name (`request`, `result`, `frame`) or a file
/// name (`ops-request.schema.json`, `ops-result.schema.json`, `ops-event-frame.schema.json`).
///
/// Panics on an unknown name or a file that is not JSON: both are bugs in the test.
pub fn schema(name: &str) -> Value {
    let (_, file, text) = SCHEMAS
        .iter()
        .find(|(short, file, _)| *short == name || *file == name)
        .unwrap_or_else(|| {
            panic!("no contract schema named {name:?}; use request, result or frame")
        });
    serde_json::from_str(text).unwrap_or_else(|e| panic!("contracts/{file} is not JSON: {e}"))
}

/// A draft 2020-12 validator for the schema named `name` (see [`schema`]), with format
/// validation on.
pub fn validator(name: &str) -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema(name))
        .unwrap_or_else(|e| panic!("contract schema {name:?} does not compile: {e}"))
}

/// Every violation of `instance` against the schema named `name`, one line each
/// (`<JSON pointer or (root)>: <message>`); empty when it is valid.
pub fn violations(name: &str, instance: &Value) -> Vec<String> {
    let validator = validator(name);
    validator
        .iter_errors(instance)
        .map(|e| {
            let path = e.instance_path().to_string();
            let path = if path.is_empty() { "(root)" } else { &path };
            format!("{path}: {e}")
        })
        .collect()
}

/// Panics, listing every violation and the message itself, unless `instance` is valid
/// against the schema named `name`.
pub fn assert_valid(name: &str, instance: &Value) {
    let errors = violations(name, instance);
    assert!(
        errors.is_empty(),
        "message does not match the {name} contract:\n  {}\nmessage: {instance:#}",
        errors.join("\n  ")
    );
}
