//! Parity with the reference: the Python `millracer==0.2.0` (with `millrace-ai==0.21.1`,
//! installed by `scripts/setup.sh` into `.venv-ref/`) and this `millracer` run side by side
//! on the same input, and `ops --json` must print the same stdout bytes, the same stderr
//! bytes and exit with the same code.
//!
//! Cases: the reference's own fixtures (`tests/fixtures/reference/`, copied from the
//! reference's `tests/fixtures/ops/`) on a real workspace, the read-only actions, and every
//! request-validation error (JSON the decoder refuses, a value that is not an object, each
//! missing or mistyped required field). The only differences allowed are those in
//! [`DEVIATIONS`], each with its reason (they are the README's "Differences from the
//! reference"); the times of each run differ and are compared as `<time>`.
//!
//! A machine without the reference fails here, naming `scripts/setup.sh`: never a skip.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{Workspace, reference_bin, repo_root, run_command, tool_command};
use serde_json::{Value, json};

/// Deliberate deviations from the reference that this test meets, by case name, with the
/// reason. A case listed here must still differ (so the list stays true).
const DEVIATIONS: &[(&str, &str)] = &[
    ("nan", NON_STANDARD_JSON),
    ("nan-in-object", NON_STANDARD_JSON),
    ("infinity", NON_STANDARD_JSON),
    ("huge-number", NON_STANDARD_JSON),
    ("invalid-utf8-start", NOT_UTF8),
    ("invalid-utf8-continuation", NOT_UTF8),
    ("invalid-utf8-bare", NOT_UTF8),
];

/// Why `NaN`, `Infinity` and numbers beyond a double are refused as invalid JSON.
const NON_STANDARD_JSON: &str = "Python's decoder accepts NaN, Infinity and numbers beyond \
     a double (as nan/inf), which standard JSON has no words for: no JSON result, frame or \
     NATS client could carry them on. millracer refuses them as invalid JSON (exit 1 and \
     nothing on stdout, as the reference for every invalid request); the message is the \
     decoder's, not the reference's later validation message.";

/// Why bytes that are not UTF-8 are refused with the decoder's message.
const NOT_UTF8: &str = "The reference reads stdin with the locale's error handler: under \
     the C and C.UTF-8 locales it smuggles undecodable bytes in as lone surrogates and goes \
     on (a request_id made of them would be printed as \\udcXX escapes no UTF-8 consumer \
     can read back). millracer refuses such input with the UTF-8 decoder's message, what \
     the reference prints under a strict locale; exit 1 and nothing on stdout either way.";

/// One input for both programs.
struct Case {
    name: String,
    args: Vec<String>,
    stdin: Vec<u8>,
}

fn case(name: &str, args: &[&str], stdin: impl Into<Vec<u8>>) -> Case {
    Case {
        name: name.to_string(),
        args: args.iter().map(|a| a.to_string()).collect(),
        stdin: stdin.into(),
    }
}

/// A valid request (the reference's fixture shape) with `edit` applied.
fn request(action: &str, root: &Path, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut r = json!({
        "schema_version": "millracer.ops.v0.2",
        "request_id": format!("req-parity-{action}"),
        "workspace_ref": {"root_path": root.display().to_string()},
        "source": {"kind": "cli", "surface": "parity"},
        "action": action,
        "input": {"kind": "structured_action", "payload": {}},
    });
    edit(&mut r);
    r.to_string().into_bytes()
}

/// Every request the decoder or the validator refuses: (name, stdin).
fn validation_cases(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>| out.push((name.to_string(), bytes));
    // Not JSON, or JSON that is not an object.
    for (name, text) in [
        ("empty", ""),
        ("blank", "  \n"),
        ("open-brace", "{"),
        ("truncated-array", "[1,"),
        ("bad-literal", "nul"),
        ("trailing-comma", "{\"a\": 1,}"),
        ("single-quotes", "{'a': 1}"),
        ("unquoted-key", "{a: 1}"),
        ("extra-data", "{} {}"),
        ("control-char", "{\"a\": \"x\u{1}y\"}"),
        ("bad-escape", "{\"a\": \"\\q\"}"),
        ("bom", "\u{feff}{}"),
        ("array", "[]"),
        ("string", "\"x\""),
        ("number", "1"),
        ("null", "null"),
        ("true", "true"),
        ("nan", "NaN"),
        ("nan-in-object", "{\"schema_version\": NaN}"),
        ("infinity", "-Infinity"),
        ("huge-number", "1e400"),
    ] {
        add(name, text.as_bytes().to_vec());
    }
    add("invalid-utf8-start", b"{\"a\": \"\xff\"}".to_vec());
    add("invalid-utf8-continuation", b"{\"a\": \"\xc3(\"}".to_vec());
    add("invalid-utf8-bare", b"\xff".to_vec());
    add("deep-nesting", "[".repeat(100_000).into_bytes());
    // The schema version.
    for (name, value) in [
        ("schema-missing", None),
        ("schema-old", Some(json!("millracer.ops.v0.1"))),
        ("schema-blank", Some(json!(""))),
        ("schema-int", Some(json!(1))),
        ("schema-float", Some(json!(1.5))),
        ("schema-null", Some(Value::Null)),
        ("schema-bool", Some(json!(true))),
        ("schema-list", Some(json!(["millracer.ops.v0.2"]))),
        (
            "schema-object",
            Some(json!({"v": "millracer.ops.v0.2", "n": [1, null]})),
        ),
        ("schema-unicode", Some(json!("é\u{1f642}"))),
    ] {
        add(
            name,
            request("status", root, |r| match value {
                Some(v) => r["schema_version"] = v,
                None => {
                    r.as_object_mut().map(|o| o.remove("schema_version"));
                }
            }),
        );
    }
    // Required strings and objects: missing, blank, mistyped.
    for field in ["request_id", "action"] {
        for (how, value) in [
            ("missing", None),
            ("blank", Some(json!("   "))),
            ("number", Some(json!(7))),
            ("null", Some(Value::Null)),
        ] {
            add(
                &format!("{field}-{how}"),
                request("status", root, |r| match value {
                    Some(v) => r[field] = v,
                    None => {
                        r.as_object_mut().map(|o| o.remove(field));
                    }
                }),
            );
        }
    }
    for field in ["workspace_ref", "source"] {
        for (how, value) in [
            ("missing", None),
            ("list", Some(json!([]))),
            ("string", Some(json!("x"))),
        ] {
            add(
                &format!("{field}-{how}"),
                request("status", root, |r| match value {
                    Some(v) => r[field] = v,
                    None => {
                        r.as_object_mut().map(|o| o.remove(field));
                    }
                }),
            );
        }
    }
    add(
        "source-kind-missing",
        request("status", root, |r| r["source"] = json!({"surface": "x"})),
    );
    add(
        "source-kind-blank",
        request("status", root, |r| r["source"] = json!({"kind": " \t"})),
    );
    add(
        "actor-kind-missing",
        request("status", root, |r| {
            r["actor"] = json!({"display_name": "x"})
        }),
    );
    out
}

/// Runs one program on a case with its own `HOME`.
fn run(program: &Path, case: &Case, home: &Path) -> Output {
    let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
    let home = home.display().to_string();
    run_command(
        tool_command(program),
        &args,
        &case.stdin,
        &[("HOME", home.as_str())],
        Duration::from_secs(120),
    )
}

/// The output with each run's own times replaced by `<time>` (ISO 8601 date-times).
fn normalized(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if let Some(len) = timestamp_at(&chars[i..]) {
            out.push_str("<time>");
            i += len;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The length of an ISO 8601 date-time (`2026-05-12T00:00:00[.ffffff][Z|+00:00]`) at the
/// start of `s`.
fn timestamp_at(s: &[char]) -> Option<usize> {
    let shape = "dddd-dd-ddTdd:dd:dd";
    if s.len() < shape.len() {
        return None;
    }
    for (c, want) in s.iter().zip(shape.chars()) {
        let ok = if want == 'd' {
            c.is_ascii_digit()
        } else {
            *c == want
        };
        if !ok {
            return None;
        }
    }
    let mut n = shape.len();
    if s.get(n) == Some(&'.') {
        n += 1;
        while s.get(n).is_some_and(char::is_ascii_digit) {
            n += 1;
        }
    }
    if s.get(n) == Some(&'Z') {
        n += 1;
    } else if matches!(s.get(n), Some('+') | Some('-'))
        && s.len() >= n + 6
        && s[n + 3] == ':'
        && [1, 2, 4, 5].iter().all(|k| s[n + k].is_ascii_digit())
    {
        n += 6;
    }
    Some(n)
}

/// What differs between the reference's and our run of `case` (empty when nothing does).
fn differences(case: &Case, reference: &Output, ours: &Output) -> Vec<String> {
    let mut diffs = Vec::new();
    if reference.status.code() != ours.status.code() {
        diffs.push(format!(
            "exit code: reference {:?}, ours {:?}",
            reference.status.code(),
            ours.status.code()
        ));
    }
    for (what, r, o) in [
        ("stdout", &reference.stdout, &ours.stdout),
        ("stderr", &reference.stderr, &ours.stderr),
    ] {
        let (r, o) = (normalized(r), normalized(o));
        if r != o {
            diffs.push(format!(
                "{what} differs\n--- reference ---\n{r}\n--- ours ---\n{o}"
            ));
        }
    }
    if !diffs.is_empty() {
        diffs.insert(0, format!("case {}:", case.name));
    }
    diffs
}

/// Runs every case on both sides and fails listing each unexpected difference.
fn compare(cases: &[Case], ours_extra: &[&str]) {
    let reference = reference_bin();
    let ours = common::millracer_bin();
    let mut failures = Vec::new();
    let mut deviations_seen = Vec::new();
    for case in cases {
        let ref_home = tempfile::tempdir().expect("home");
        let our_home = tempfile::tempdir().expect("home");
        let r = run(&reference, case, ref_home.path());
        let mut our_case = Case {
            name: case.name.clone(),
            args: case.args.clone(),
            stdin: case.stdin.clone(),
        };
        our_case
            .args
            .extend(ours_extra.iter().map(|a| a.to_string()));
        let o = run(&ours, &our_case, our_home.path());
        let diffs = differences(case, &r, &o);
        let deviation = DEVIATIONS.iter().find(|(name, _)| *name == case.name);
        match (diffs.is_empty(), deviation) {
            (true, None) => {}
            // A deviation is in the message only: the same exit code, the same stdout.
            (false, Some(_))
                if r.status.code() != o.status.code()
                    || normalized(&r.stdout) != normalized(&o.stdout) =>
            {
                failures.push(format!(
                    "case {} deviates beyond its listed reason (exit code or stdout):\n{}",
                    case.name,
                    diffs.join("\n")
                ))
            }
            (false, Some(_)) => deviations_seen.push(case.name.clone()),
            (true, Some((name, _))) => failures.push(format!(
                "case {name} is listed in DEVIATIONS but no longer differs: remove it"
            )),
            (false, None) => failures.push(diffs.join("\n")),
        }
    }
    eprintln!(
        "{} cases compared; deviations on purpose met: {deviations_seen:?}",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from the reference:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_request_validation_error_matches_the_reference_byte_for_byte() {
    let dir = tempfile::tempdir().expect("dir");
    let cases: Vec<Case> = validation_cases(dir.path())
        .into_iter()
        .map(|(name, stdin)| case(&name, &["ops", "--json"], stdin))
        .collect();
    assert!(cases.len() > 50, "{} cases", cases.len());
    compare(&cases, &["--transport", "local"]);
}

#[test]
fn the_reference_fixtures_and_read_only_actions_match_the_reference() {
    let ws = Workspace::init();
    let root = ws.path().display().to_string();
    let fixtures = repo_root().join("tests/fixtures/reference");
    let fixture = |file: &str| -> Value {
        let text = std::fs::read_to_string(fixtures.join(file))
            .unwrap_or_else(|err| panic!("fixture {file}: {err}"));
        serde_json::from_str(&text).unwrap_or_else(|err| panic!("fixture {file}: {err}"))
    };
    // The reference's status fixture, pointed at a real workspace.
    let mut status = fixture("status_request.json");
    status["workspace_ref"]["root_path"] = json!(root);
    // And as the fixture is, naming a workspace that is not there.
    let status_missing = fixture("status_request.json");
    let ws_args = ["ops", "--json", "--workspace", root.as_str()];
    let mut cases = vec![
        case("fixture-status", &ws_args, status.to_string().into_bytes()),
        case(
            "fixture-status-unresolved",
            &ws_args,
            status_missing.to_string().into_bytes(),
        ),
        case(
            "fixture-status-pretty",
            &ws_args,
            serde_json::to_vec_pretty(&status).expect("json"),
        ),
    ];
    for action in [
        "status",
        "list_workspaces",
        "list_sessions",
        // An action neither version knows (`pause` was one in 0.2.0; millracer serves the
        // operator actions 0.3.0 added, so it is no longer a parity case).
        "reboot_host",
        "STATUS",
    ] {
        cases.push(case(
            &format!("action-{action}"),
            &ws_args,
            request(action, ws.path(), |_| {}),
        ));
    }
    cases.push(case(
        "inspect-session-missing",
        &ws_args,
        request("inspect_session", ws.path(), |r| {
            r["session_ref"] = json!({"session_id": "nope"});
            r["input"] = json!({"kind": "structured_action", "payload": {"session_id": "nope"}});
        }),
    ));
    cases.push(case(
        "enqueue-without-text",
        &ws_args,
        request("enqueue", ws.path(), |r| {
            r["route_preference"] = json!("millrace");
        }),
    ));
    cases.push(case(
        "workspace-not-there",
        &[
            "ops",
            "--json",
            "--workspace",
            "/nonexistent/millracer-parity",
        ],
        request("status", Path::new("/nonexistent/millracer-parity"), |_| {}),
    ));
    cases.push(case(
        "non-ascii-request-id",
        &ws_args,
        request("status", ws.path(), |r| {
            r["request_id"] = json!("  é-\u{1f642}-id  ");
        }),
    ));
    compare(&cases, &["--transport", "local"]);
}
