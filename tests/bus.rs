//! The bus foundation, end to end: a private nats-server, the real `millrace` runtime, a
//! `millracer worker` process and the `millracer ops` bridge, as an adapter would use them.

mod common;

use std::time::Duration;

use common::schemas::assert_valid;
use common::{NatsServer, Worker, Workspace, request_json, rt, run_ops};
use futures::StreamExt;
use millracer::bus::subjects;
use serde_json::{Value, json};

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

fn without_times(mut v: Value) -> Value {
    let obj = v.as_object_mut().expect("result object");
    obj.remove("started_at");
    obj.remove("finished_at");
    v
}

/// Sends raw bytes as a core NATS request and parses the answer.
async fn raw_request(client: &async_nats::Client, subject: String, payload: Vec<u8>) -> Value {
    let reply = client
        .send_request(
            subject,
            async_nats::Request::new()
                .payload(payload.into())
                .timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("answered within 30 s");
    let value = parse(&reply.payload);
    assert_valid("result", &value);
    value
}

#[test]
fn status_through_the_bus_equals_status_in_process() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let root = ws.path().display().to_string();
    let worker = Worker::spawn(&nats.url, &[("default", ws.path())], &[]);
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });

    let request = request_json(
        "req-status-eq",
        "status",
        json!({"root_path": root, "display_name": "Demo", "mode": "default_pi", "environment": "dev"}),
        json!({"kind": "structured_action", "payload": {}}),
    )
    .to_string();
    let bus = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
        ],
        &request,
        &[],
    );
    let local = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "local",
            "--workspace",
            &root,
        ],
        &request,
        &[],
    );
    assert_eq!(
        bus.status.code(),
        Some(0),
        "bus stderr: {}",
        String::from_utf8_lossy(&bus.stderr)
    );
    assert_eq!(
        local.status.code(),
        Some(0),
        "local stderr: {}",
        String::from_utf8_lossy(&local.stderr)
    );
    let (bus_v, local_v) = (parse(&bus.stdout), parse(&local.stdout));
    assert_valid("result", &bus_v);
    assert_valid("result", &local_v);
    assert_eq!(bus_v["status"], "succeeded");
    assert_eq!(bus_v["result"]["workspace"], json!(root));
    // Through a worker the result names the workspace it served (the request named only
    // its path) and carries the cursor of its last frame: accepted, started, finished.
    assert_eq!(bus_v["workspace_ref"]["workspace_id"], "default");
    assert_eq!(bus_v["event_cursor"], "3");
    assert!(local_v.get("event_cursor").is_none(), "{local_v}");
    assert!(local_v["workspace_ref"].get("workspace_id").is_none());
    let mut bus_v = without_times(bus_v);
    bus_v["workspace_ref"]
        .as_object_mut()
        .expect("workspace_ref")
        .remove("workspace_id");
    bus_v
        .as_object_mut()
        .expect("result")
        .remove("event_cursor");
    assert_eq!(bus_v, without_times(local_v));
    // Printed as the reference prints: sorted keys, two-space indent, one trailing newline.
    let text = String::from_utf8_lossy(&bus.stdout);
    assert!(
        text.starts_with("{\n  \"action\": \"status\",\n  \"completion\": {"),
        "{text}"
    );
    assert!(text.ends_with("}\n"));
}

#[test]
fn stream_json_prints_ordered_frames_then_one_result() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let worker = Worker::spawn(&nats.url, &[("demo", ws.path())], &[]);
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });
    // Durable (the default submission: the result from the results bucket, frames
    // replayed up to the record's last_sequence) and core request/reply (frames up to the
    // result's Millracer-Sequence header): every frame, then the result, on both.
    for (id, submit) in [("req-stream-1", "durable"), ("req-stream-2", "request")] {
        let request =
            request_json(id, "status", json!({"workspace_id": "demo"}), json!({})).to_string();
        let out = run_ops(
            &[
                "ops",
                "--stream-json",
                "--transport",
                "nats",
                "--submit",
                submit,
                "--nats-url",
                &nats.url,
            ],
            &request,
            &[],
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| parse(l.as_bytes()))
            .collect();
        let (result, frames) = lines.split_last().expect("at least one line");
        assert_valid("result", result);
        assert_eq!(result["request_id"], id);
        let types: Vec<&str> = frames
            .iter()
            .map(|f| f["event_type"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            types,
            ["request.accepted", "request.started", "request.finished"],
            "{submit}"
        );
        for (i, frame) in frames.iter().enumerate() {
            assert_valid("frame", frame);
            assert_eq!(frame["sequence"], json!(i + 1));
            assert_eq!(frame["request_id"], id);
        }
        assert_eq!(frames[2]["payload"]["status"], "succeeded");
    }
}

/// The bridge learns of a durable result as it is written (a subscription on the result
/// key's subject), not from its slow fallback poll: with the workspace's status snapshot
/// warm, a durable `status` ends well inside the poll's first period (5 s).
#[test]
fn a_durable_result_is_seen_as_it_is_written() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let worker = Worker::spawn(&nats.url, &[("demo", ws.path())], &[]);
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });
    let args = [
        "ops",
        "--json",
        "--transport",
        "nats",
        "--nats-url",
        &nats.url,
    ];
    let warm = request_json(
        "req-warm",
        "status",
        json!({"workspace_id": "demo"}),
        json!({}),
    );
    let out = run_ops(&args, &warm.to_string(), &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let request = request_json(
        "req-seen",
        "status",
        json!({"workspace_id": "demo"}),
        json!({}),
    );
    let started = std::time::Instant::now();
    let out = run_ops(&args, &request.to_string(), &[]);
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(parse(&out.stdout)["status"], "succeeded");
    assert!(
        took < Duration::from_secs(4),
        "the durable result took {took:?}: found by the fallback poll, not as it was written"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_the_worker_keeps_serving() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let other = Workspace::init();
    let worker = Worker::spawn(&nats.url, &[("demo", ws.path())], &[]);
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let any = subjects::request_any;

        let v = raw_request(&client, any(), b"{not json".to_vec()).await;
        assert_eq!(v["errors"][0]["code"], "invalid_request");
        assert_eq!(
            v["errors"][0]["message"],
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
        );

        let v = raw_request(
            &client,
            any(),
            br#"{"schema_version":"millracer.ops.v0.2","request_id":5,"action":"status"}"#.to_vec(),
        )
        .await;
        assert_eq!(
            v["errors"][0]["message"],
            "ops payload requires non-empty request_id"
        );

        let v = raw_request(&client, any(), br#"[1,2]"#.to_vec()).await;
        assert_eq!(
            v["errors"][0]["message"],
            "ops request must be a JSON object"
        );

        let unknown = request_json(
            "req-unknown",
            "drop_tables",
            json!({"workspace_id": "demo"}),
            json!({}),
        );
        let v = raw_request(&client, any(), unknown.to_string().into_bytes()).await;
        assert_eq!(v["errors"][0]["code"], "unsupported_action");
        assert_eq!(
            v["errors"][0]["message"],
            "Unsupported Millracer ops action: drop_tables"
        );

        let foreign = request_json(
            "req-foreign",
            "status",
            json!({"root_path": other.path()}),
            json!({}),
        );
        let v = raw_request(&client, any(), foreign.to_string().into_bytes()).await;
        assert_eq!(v["errors"][0]["code"], "workspace_not_served");
        assert_eq!(v["status"], "failed");

        let mut huge = request_json(
            "req-huge",
            "status",
            json!({"workspace_id": "demo"}),
            json!({}),
        );
        huge["metadata"] = json!({"blob": "x".repeat(300 * 1024)});
        let v = raw_request(&client, any(), huge.to_string().into_bytes()).await;
        assert_eq!(v["errors"][0]["code"], "request_too_large");
        assert_eq!(v["request_id"], "req-huge");

        // A hostile request_id is answered, and its frames stay on one encoded subject.
        let mut all_frames = client
            .subscribe("millracer.ops.v0_2.frames.>")
            .await
            .expect("subscribe");
        let hostile_id = "x.*.> $SYS evil";
        let hostile = request_json(
            hostile_id,
            "status",
            json!({"workspace_id": "demo"}),
            json!({}),
        );
        let v = raw_request(
            &client,
            subjects::request_by_id("demo"),
            hostile.to_string().into_bytes(),
        )
        .await;
        assert_eq!(v["request_id"], hostile_id);
        assert_eq!(v["status"], "succeeded");
        let frame = tokio::time::timeout(Duration::from_secs(5), all_frames.next())
            .await
            .expect("a frame")
            .expect("open");
        assert_eq!(
            frame.subject.as_str(),
            subjects::frames(Some("demo"), hostile_id)
        );
        assert_eq!(frame.subject.split('.').count(), 6, "{}", frame.subject);

        // Still serving.
        let ok = request_json(
            "req-after",
            "status",
            json!({"workspace_id": "demo"}),
            json!({}),
        );
        let v = raw_request(
            &client,
            subjects::request_by_id("demo"),
            ok.to_string().into_bytes(),
        )
        .await;
        assert_eq!(v["status"], "succeeded");
    });
    assert!(worker.try_wait().is_none(), "the worker must still run");

    // The bridge keeps the reference's stderr contract for input it cannot parse.
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
        ],
        "",
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "millracer: error: Expecting value: line 1 column 1 (char 0)\n"
    );
    let out = run_ops(&["ops"], "{}", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "millracer: error: ops requires --json or --stream-json\n"
    );
}

#[test]
fn the_same_request_id_twice_runs_once() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let worker = Worker::spawn(&nats.url, &[("demo", ws.path())], &[]);
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let first = request_json(
            "req-once",
            "select_workspace",
            json!({}),
            json!({"payload": {"workspace_id": "demo", "session_id": "first"}}),
        );
        let second = request_json(
            "req-once",
            "select_workspace",
            json!({}),
            json!({"payload": {"workspace_id": "demo", "session_id": "second"}}),
        );
        let a = raw_request(
            &client,
            subjects::request_any(),
            first.to_string().into_bytes(),
        )
        .await;
        let b = raw_request(
            &client,
            subjects::request_any(),
            second.to_string().into_bytes(),
        )
        .await;
        assert_eq!(a["status"], "succeeded");
        assert_eq!(
            a, b,
            "the repeat gets the stored result, timestamps included"
        );
        let listed = request_json("req-list", "list_sessions", json!({}), json!({}));
        let v = raw_request(
            &client,
            subjects::request_any(),
            listed.to_string().into_bytes(),
        )
        .await;
        let ids: Vec<&str> = v["result"]["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .map(|s| s["session_id"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(ids, ["first"], "the second payload never ran");
    });
    let text = std::fs::read_to_string(worker.home().join(".millracer/sessions.json"))
        .expect("sessions file");
    assert!(
        text.contains("\"first\"") && !text.contains("\"second\""),
        "{text}"
    );
}

#[test]
fn no_worker_is_a_distinct_error_and_auto_runs_in_process() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let root = ws.path().display().to_string();
    let request = request_json("req-noworker", "status", json!({}), json!({})).to_string();
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
            "--workspace",
            &root,
        ],
        &request,
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no worker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run_ops(
        &[
            "ops",
            "--json",
            "--nats-url",
            &nats.url,
            "--workspace",
            &root,
        ],
        &request,
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("running in-process"));
    let v = parse(&out.stdout);
    assert_eq!(v["result"]["workspace"], json!(root));

    // No broker at all: auto still answers in-process.
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--workspace",
            &root,
        ],
        &request,
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_worker_refuses_unsafe_workspace_ids() {
    let ws = Workspace::init();
    let out = run_ops(
        &[
            "worker",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--workspace",
            &format!("a.b={}", ws.path().display()),
        ],
        "",
        &[],
    );
    // `a.b` is not a plain id, so the whole flag is read as a path, which does not exist.
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::write_file(
        dir.path(),
        "w.toml",
        &format!(
            "[[workspace]]\nid = \"bad>id\"\npath = \"{}\"\n",
            ws.path().display()
        ),
    );
    let out = run_ops(
        &[
            "worker",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--config",
            &config.display().to_string(),
        ],
        "",
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not allowed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Messages true to their schemas: a workspace-less action's frames carry no
/// `workspace_id` (the schema types it as a string), every frame and the result validate,
/// the result's `event_cursor` is its last frame's sequence, and an answer to a request
/// whose id could not be read has no `Millracer-Request-Id` header rather than an empty one.
#[test]
fn workspace_less_frames_and_results_follow_their_schemas() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let worker = Worker::spawn(&nats.url, &[("demo", ws.path())], &[]);
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let mut frames = client
            .subscribe(subjects::frames_of_request("req-schema-wl"))
            .await
            .expect("subscribe to frames");
        client.flush().await.expect("flush");
        let request = request_json("req-schema-wl", "list_workspaces", json!({}), json!({}));
        let result = raw_request(
            &client,
            subjects::request_any(),
            request.to_string().into_bytes(),
        )
        .await;
        assert_eq!(result["status"], "succeeded", "{result}");
        let mut seen = Vec::new();
        loop {
            let message = tokio::time::timeout(Duration::from_secs(10), frames.next())
                .await
                .expect("every frame within 10 s")
                .expect("frames subscription open");
            let frame = parse(&message.payload);
            assert_valid("frame", &frame);
            let finished = frame["event_type"] == "request.finished";
            seen.push(frame);
            if finished {
                break;
            }
        }
        assert_eq!(seen[0]["event_type"], "request.accepted");
        assert!(
            seen[0]["payload"].get("workspace_id").is_none(),
            "a workspace-less frame names no workspace: {}",
            seen[0]
        );
        let last = seen.last().expect("frames")["sequence"]
            .as_u64()
            .expect("seq");
        assert_eq!(result["event_cursor"], json!(last.to_string()));

        // Bytes that are not JSON: a failed result, and no request id header at all.
        let reply = client
            .send_request(
                subjects::request_any(),
                async_nats::Request::new()
                    .payload(b"{\"not json".to_vec().into())
                    .timeout(Some(Duration::from_secs(30))),
            )
            .await
            .expect("answered");
        let value = parse(&reply.payload);
        assert_valid("result", &value);
        assert_eq!(value["errors"][0]["code"], "invalid_request");
        let headers = reply.headers.expect("headers on a result");
        assert!(
            headers.get(subjects::HEADER_REQUEST_ID).is_none(),
            "no request id header for an unreadable id: {headers:?}"
        );
    });
}
