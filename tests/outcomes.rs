//! The outcomes the README promises, end to end on the real runtime (stages answered by the
//! stand-in runner): `incomplete` when nothing ran (a paused runtime), `crashed` when the
//! daemon dies mid-stage with no restart left, `restart_needed` when it dies before it took
//! the work, and `ops` exit codes: 0 for `incomplete`, 1 for `failed`, 4 when `--timeout`
//! passes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::schemas::assert_valid;
use common::stand_in::StandInWorkspace;
use common::{NatsServer, Worker, millrace_bin, request_json, rt, run_ops};
use futures::StreamExt;
use millracer::bus::subjects;
use serde_json::{Value, json};

fn enqueue(id: &str, ws: &str) -> Value {
    let mut r = request_json(
        id,
        "enqueue",
        json!({"workspace_id": ws}),
        json!({"kind": "natural_language", "text": "Fix src/app.py so tests/test_app.py passes"}),
    );
    r["route_preference"] = json!("millrace");
    r["intake_preference"] = json!("task");
    r
}

/// `ops --json` over the bus (core request/reply) with `extra` arguments.
fn ops(nats: &NatsServer, request: &Value, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "ops",
        "--json",
        "--transport",
        "nats",
        "--submit",
        "request",
        "--nats-url",
        nats.url.as_str(),
    ];
    args.extend_from_slice(extra);
    run_ops(&args, &request.to_string(), &[])
}

/// Sends `request`, kills the runtime daemon when `kill_at` says so (given each frame), and
/// returns the result and the frame types.
async fn run_and_kill(
    client: &async_nats::Client,
    request: &Value,
    kill_at: impl Fn(&Value) -> bool,
) -> (Value, Vec<String>) {
    let id = request["request_id"].as_str().expect("id");
    let mut frames = client
        .subscribe(subjects::frames_of_request(id))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let client2 = client.clone();
    let payload = request.to_string();
    let mut reply = tokio::spawn(async move {
        client2
            .send_request(
                subjects::request_by_id("alpha"),
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(Duration::from_secs(180))),
            )
            .await
    });
    let mut pid = None;
    let mut killed = false;
    let mut types = Vec::new();
    let answer = loop {
        tokio::select! {
            answer = &mut reply => break answer.expect("task").expect("an answer within 180 s"),
            Some(message) = frames.next() => {
                let frame: Value = serde_json::from_slice(&message.payload).expect("frame");
                assert_valid("frame", &frame);
                types.push(frame["event_type"].as_str().unwrap_or("").to_string());
                if frame["event_type"] == "runtime.daemon_started" {
                    pid = frame["payload"]["pid"].as_u64();
                }
                if !killed && kill_at(&frame) {
                    let pid = pid.expect("the daemon's pid in its daemon_started frame");
                    let status = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status()
                        .expect("kill");
                    assert!(status.success(), "kill {pid}");
                    killed = true;
                }
            }
        }
    };
    assert!(killed, "the daemon was never killed: {types:?}");
    let result: Value = serde_json::from_slice(&answer.payload).expect("result JSON");
    assert_valid("result", &result);
    (result, types)
}

#[test]
fn a_paused_runtime_runs_nothing_the_answer_is_incomplete_and_ops_exits_zero() {
    let ws = StandInWorkspace::new(json!({}));
    let paused = Command::new(millrace_bin())
        .args(["control", "pause", "--workspace"])
        .arg(ws.path())
        .output()
        .expect("millrace control pause");
    assert!(
        paused.status.success(),
        "{}",
        String::from_utf8_lossy(&paused.stderr)
    );
    let nats = NatsServer::start();
    let worker = Worker::spawn(&nats.url, &[("alpha", ws.path())], &[]);
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });
    let out = ops(&nats, &enqueue("req-paused", "alpha"), &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "ops exits 0 for incomplete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_valid("result", &result);
    assert_eq!(result["status"], "incomplete", "{result:#}");
    assert_eq!(result["completion"]["outcome"], "incomplete");
    assert_eq!(result["completion"]["scoped_completion"], false);
    assert!(ws.calls().is_empty(), "no stage ran: {:?}", ws.calls());
}

#[test]
fn a_daemon_killed_mid_stage_with_no_restart_left_is_crashed_and_ops_exits_one() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 60}}));
    let nats = NatsServer::start();
    let worker = Worker::spawn(
        &nats.url,
        &[("alpha", ws.path())],
        &["--max-daemon-restarts", "0"],
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let (result, types) = run_and_kill(&client, &enqueue("req-crash", "alpha"), |f| {
            f["event_type"] == "runtime.stage_started"
        })
        .await;
        assert!(
            types.contains(&"runtime.daemon_exited".to_string()),
            "{types:?}"
        );
        assert!(
            !types.contains(&"runtime.daemon_restarted".to_string()),
            "{types:?}"
        );
        assert_eq!(result["status"], "failed", "{result:#}");
        assert_eq!(result["completion"]["outcome"], "crashed", "{result:#}");
        assert_eq!(result["completion"]["scoped_completion"], false);
    });
    // The bridge prints the same stored answer and exits 1 for `failed`.
    let out = ops(&nats, &enqueue("req-crash", "alpha"), &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_eq!(printed["completion"]["outcome"], "crashed");
}

#[test]
fn a_daemon_killed_before_it_took_the_work_answers_restart_needed() {
    let ws = StandInWorkspace::new(json!({}));
    let nats = NatsServer::start();
    let worker = Worker::spawn(
        &nats.url,
        &[("alpha", ws.path())],
        &["--max-daemon-restarts", "0"],
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        // Killed the moment it is started: the runtime has not loaded, no run is active.
        let (result, types) = run_and_kill(&client, &enqueue("req-restart", "alpha"), |f| {
            f["event_type"] == "runtime.daemon_started"
        })
        .await;
        assert!(
            !types.contains(&"runtime.stage_started".to_string()),
            "{types:?}"
        );
        assert_eq!(result["status"], "failed", "{result:#}");
        assert_eq!(
            result["completion"]["outcome"], "restart_needed",
            "{result:#}"
        );
        assert_eq!(result["completion"]["scoped_completion"], false);
    });
    assert!(ws.calls().is_empty(), "no stage ran: {:?}", ws.calls());
}

#[test]
fn ops_exits_four_when_its_timeout_passes_on_either_submission() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 60}}));
    let nats = NatsServer::start();
    let worker = Worker::spawn(&nats.url, &[("alpha", ws.path())], &[]);
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });
    for (id, submit) in [
        ("req-slow-core", "request"),
        ("req-slow-durable", "durable"),
    ] {
        let started = Instant::now();
        let out = run_ops(
            &[
                "ops",
                "--json",
                "--transport",
                "nats",
                "--submit",
                submit,
                "--timeout",
                "3",
                "--nats-url",
                &nats.url,
            ],
            &enqueue(id, "alpha").to_string(),
            &[],
        );
        let took = started.elapsed();
        assert_eq!(
            out.status.code(),
            Some(4),
            "--submit {submit}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty(), "nothing on stdout after a timeout");
        assert!(!out.stderr.is_empty(), "the timeout is said on stderr");
        assert!(
            took < Duration::from_secs(30),
            "--timeout 3 gave up after {took:?}"
        );
    }
}
