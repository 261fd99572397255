//! Delegated work on the real runtime: a worker enqueues into real Millrace workspaces
//! whose stages are answered by the stand-in runner; an adapter-style client follows the
//! frames and gates on `completion.scoped_completion`.

mod common;

use std::time::Duration;

use common::schemas::assert_valid;
use common::stand_in::StandInWorkspace;
use common::{NatsServer, Worker, request_json, rt, run_ops};
use futures::{FutureExt, StreamExt};
use millracer::bus::subjects;
use serde_json::{Value, json};

fn enqueue(id: &str, ws: &str, text: &str, intake: &str) -> Value {
    let mut r = request_json(
        id,
        "enqueue",
        json!({"workspace_id": ws}),
        json!({"kind": "natural_language", "text": text}),
    );
    r["route_preference"] = json!("millrace");
    r["intake_preference"] = json!(intake);
    r
}

/// Frames of one request, subscribed (and the subscription flushed) before it is sent.
async fn frames_of(client: &async_nats::Client, request_id: &str) -> async_nats::Subscriber {
    let frames = client
        .subscribe(subjects::frames_of_request(request_id))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    frames
}

/// Sends a request on a task of its own: it is on the wire at once, awaited later.
fn spawn_request(
    client: &async_nats::Client,
    subject: String,
    request: &Value,
) -> tokio::task::JoinHandle<Result<async_nats::Message, async_nats::RequestError>> {
    let client = client.clone();
    let payload = request.to_string();
    tokio::spawn(async move {
        client
            .send_request(
                subject,
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(Duration::from_secs(240))),
            )
            .await
    })
}

/// Sends a request like an adapter: frames subscribed first, then the request; returns
/// the result and every frame of this request, in arrival order.
async fn send_and_follow(
    client: &async_nats::Client,
    subject: String,
    request: &Value,
) -> (Value, Vec<Value>) {
    let id = request["request_id"].as_str().expect("request_id");
    let frames = frames_of(client, id).await;
    let reply = spawn_request(client, subject, request);
    follow(reply, frames, Vec::new()).await
}

/// Follows a request already sent to its result: `seen` are its frames read so far (the
/// subscription and the request on one connection); returns the result and every frame.
async fn follow(
    mut reply: tokio::task::JoinHandle<Result<async_nats::Message, async_nats::RequestError>>,
    mut frames: async_nats::Subscriber,
    mut seen: Vec<Value>,
) -> (Value, Vec<Value>) {
    let answer = loop {
        tokio::select! {
            answer = &mut reply => break answer.expect("task").expect("an answer"),
            Some(frame) = frames.next() => seen.push(serde_json::from_slice::<Value>(&frame.payload).expect("frame JSON")),
        }
    };
    // The result comes after the `request.finished` frame: one connection delivers in
    // order, so every frame published before the reply is already here, without waiting.
    while let Some(Some(frame)) = frames.next().now_or_never() {
        seen.push(serde_json::from_slice(&frame.payload).expect("frame JSON"));
    }
    assert_eq!(
        seen.last().map(|f| &f["event_type"]),
        Some(&json!("request.finished")),
        "the request.finished frame arrived before the result: {seen:#?}"
    );
    let result: Value = serde_json::from_slice(&answer.payload).expect("result JSON");
    assert_valid("result", &result);
    for (i, frame) in seen.iter().enumerate() {
        assert_valid("frame", frame);
        assert_eq!(
            frame["sequence"],
            json!(i + 1),
            "frames arrive in order without gaps: {seen:#?}"
        );
    }
    (result, seen)
}

/// `(event_type, stage)` of the runtime stage frames.
fn stages(frames: &[Value]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter(|f| {
            f["event_type"]
                .as_str()
                .is_some_and(|t| t.starts_with("runtime.stage_"))
        })
        .map(|f| {
            (
                f["event_type"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches("runtime.stage_")
                    .to_string(),
                f["payload"]["stage"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn started_then_completed(names: &[&str]) -> Vec<(String, String)> {
    names
        .iter()
        .flat_map(|s| {
            [
                ("started".to_string(), s.to_string()),
                ("completed".to_string(), s.to_string()),
            ]
        })
        .collect()
}

/// The timestamp of the first frame of `event_type`; fails the test when there is none, so
/// an ordering check can never pass on missing frames.
fn at(frames: &[Value], event_type: &str) -> String {
    frames
        .iter()
        .find(|f| f["event_type"] == event_type)
        .and_then(|f| f["timestamp"].as_str())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("no {event_type} frame with a timestamp in {frames:#?}"))
        .to_string()
}

/// The next frame on `frames`, failing the test after `limit` or when the subscription ends.
async fn next_frame(frames: &mut async_nats::Subscriber, limit: Duration) -> Value {
    match tokio::time::timeout(limit, frames.next()).await {
        Ok(Some(message)) => serde_json::from_slice(&message.payload).expect("frame JSON"),
        Ok(None) => panic!("the frame subscription ended"),
        Err(_) => panic!("no frame within {limit:?}"),
    }
}

/// The frames on `frames` up to and including the first of `event_type`, each within 90 s.
async fn frames_until(frames: &mut async_nats::Subscriber, event_type: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let frame = next_frame(frames, Duration::from_secs(90)).await;
        let found = frame["event_type"] == event_type;
        seen.push(frame);
        if found {
            return seen;
        }
    }
}

fn frame_types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["event_type"].as_str().unwrap_or(""))
        .collect()
}

struct Setup {
    nats: NatsServer,
    worker: Worker,
}

fn serve(workspaces: &[(&str, &StandInWorkspace)], extra: &[&str]) -> Setup {
    let nats = NatsServer::start();
    let list: Vec<(&str, &std::path::Path)> =
        workspaces.iter().map(|(id, w)| (*id, w.path())).collect();
    let worker = Worker::spawn(&nats.url, &list, extra);
    Setup { nats, worker }
}

#[test]
fn a_task_completes_with_scoped_completion_and_every_stage_seen_once() {
    let ws = StandInWorkspace::new(json!({}));
    let s = serve(&[("alpha", &ws)], &[]);
    rt().block_on(async {
        let client = s.nats.client().await;
        s.worker.wait_ready(&client).await;
        let mut request = enqueue(
            "req-task-ok",
            "alpha",
            "Fix src/app.py so tests/test_app.py passes",
            "task",
        );
        request["scoped_work_item"] = json!({"item_id": "ITEM-1", "title": "the one item"});
        let (result, frames) =
            send_and_follow(&client, subjects::request_by_id("alpha"), &request).await;
        assert_eq!(result["status"], "succeeded", "{result:#}");
        assert_eq!(result["route"], "millrace");
        assert_eq!(result["intake_kind"], "task");
        assert_eq!(result["completion"]["outcome"], "completed");
        assert_eq!(result["completion"]["scoped_completion"], true);
        assert_eq!(result["completion"]["verification_status"], "verified");
        let evidence = result["completion"]["evidence_summary"].to_string();
        assert!(
            evidence.contains("millrace-agents/tasks/done/task-"),
            "{evidence}"
        );
        assert_eq!(result["scoped_work_item"]["item_id"], "ITEM-1");
        assert_eq!(
            stages(&frames),
            started_then_completed(&["builder", "checker", "updater"])
        );
        let types = frame_types(&frames);
        for t in [
            "request.accepted",
            "request.queued",
            "request.started",
            "runtime.intake_written",
            "runtime.work_item_queued",
            "runtime.daemon_started",
            "runtime.terminal",
            "request.finished",
        ] {
            assert_eq!(
                types.iter().filter(|x| **x == t).count(),
                1,
                "{t} once in {types:?}"
            );
        }
        assert_eq!(types.last(), Some(&"request.finished"));
        let doc =
            std::fs::read_to_string(result["result"]["task_path"].as_str().expect("task_path"))
                .expect("intake doc");
        assert!(
            doc.contains("- Item-ID: ITEM-1\n- Title: the one item\n"),
            "{doc}"
        );

        // The same scoped item sent again is not queued twice: the records already prove it.
        let mut again = request.clone();
        again["request_id"] = json!("req-task-again");
        let (result, frames) =
            send_and_follow(&client, subjects::request_by_id("alpha"), &again).await;
        let types = frame_types(&frames);
        assert!(types.contains(&"runtime.intake_reused"), "{types:?}");
        assert!(!types.contains(&"runtime.work_item_queued"), "{types:?}");
        assert_eq!(result["completion"]["scoped_completion"], true);
        // ITEM-12 is another item, although its id contains ITEM-1.
        let mut other = request.clone();
        other["request_id"] = json!("req-task-12");
        other["scoped_work_item"] = json!({"item_id": "ITEM-12"});
        let (result, frames) =
            send_and_follow(&client, subjects::request_by_id("alpha"), &other).await;
        assert!(frame_types(&frames).contains(&"runtime.work_item_queued"));
        assert_eq!(result["status"], "succeeded");
    });
    let stages_run: Vec<String> = ws
        .calls()
        .iter()
        .map(|c| c["stage"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        stages_run,
        [
            "builder", "checker", "updater", "builder", "checker", "updater"
        ]
    );
}

#[test]
fn an_idea_and_a_probe_complete_from_the_runtime_records() {
    let idea_ws = StandInWorkspace::new(json!({}));
    let probe_ws = StandInWorkspace::new(json!({}));
    let s = serve(&[("idea", &idea_ws), ("probe", &probe_ws)], &[]);
    rt().block_on(async {
        let client = s.nats.client().await;
        s.worker.wait_ready(&client).await;
        let idea = enqueue(
            "req-idea-ok",
            "idea",
            "Build a new operator dashboard",
            "auto",
        );
        let probe = enqueue(
            "req-probe-ok",
            "probe",
            "Investigate the storage layer before changing it",
            "probe",
        );
        let (idea_out, probe_out) = tokio::join!(
            send_and_follow(&client, subjects::request_by_id("idea"), &idea),
            send_and_follow(&client, subjects::request_by_id("probe"), &probe),
        );
        let (result, frames) = idea_out;
        assert_eq!(
            result["intake_kind"], "idea",
            "auto picks idea for a new capability"
        );
        assert_eq!(result["status"], "succeeded", "{result:#}");
        assert_eq!(result["completion"]["scoped_completion"], true);
        let evidence = result["completion"]["evidence_summary"].to_string();
        assert!(
            evidence.contains("arbiter_closure") && evidence.contains("arbiter/targets/"),
            "{evidence}"
        );
        assert_eq!(
            stages(&frames),
            started_then_completed(&[
                "planner", "manager", "builder", "checker", "updater", "arbiter"
            ])
        );
        assert!(frame_types(&frames).contains(&"runtime.idea_normalized"));

        let (result, frames) = probe_out;
        assert_eq!(result["status"], "succeeded", "{result:#}");
        assert_eq!(result["intake_kind"], "probe");
        assert_eq!(result["completion"]["scoped_completion"], true);
        assert!(
            result["completion"]["evidence_summary"]
                .to_string()
                .contains("probes/done/")
        );
        assert_eq!(
            stages(&frames),
            started_then_completed(&["recon", "builder", "checker", "updater"])
        );
    });
}

#[test]
fn blocked_work_is_reported_blocked_with_its_failure_class() {
    let task_ws = StandInWorkspace::new(json!({
        "checker": {"marker": "blocked"}, "troubleshooter": {"marker": "blocked"}, "consultant": {"marker": "blocked"}
    }));
    let idea_ws = StandInWorkspace::new(
        json!({"planner": {"marker": "blocked"}, "mechanic": {"marker": "blocked"}}),
    );
    let s = serve(&[("task", &task_ws), ("idea", &idea_ws)], &[]);
    rt().block_on(async {
        let client = s.nats.client().await;
        s.worker.wait_ready(&client).await;
        let task = enqueue(
            "req-task-blocked",
            "task",
            "Fix src/app.py so tests/test_app.py passes",
            "task",
        );
        let idea = enqueue("req-idea-blocked", "idea", "Shape a new workflow", "idea");
        let ((task_result, task_frames), (idea_result, _)) = tokio::join!(
            send_and_follow(&client, subjects::request_by_id("task"), &task),
            send_and_follow(&client, subjects::request_by_id("idea"), &idea),
        );
        assert_eq!(task_result["status"], "blocked", "{task_result:#}");
        assert_eq!(task_result["completion"]["outcome"], "blocked");
        assert_eq!(task_result["completion"]["scoped_completion"], false);
        assert_eq!(
            task_result["completion"]["missing_evidence"],
            json!(["positive scoped completion evidence"])
        );
        assert_eq!(task_result["result"]["event"]["kind"], "blocked");
        assert!(
            task_result["result"]["event"]["reason"]
                .as_str()
                .unwrap_or("")
                .contains("blocked")
        );
        assert!(
            task_result["completion"]["evidence_summary"]
                .to_string()
                .contains("tasks/blocked/")
        );
        let seen: Vec<String> = stages(&task_frames)
            .into_iter()
            .filter(|(e, _)| e == "completed")
            .map(|(_, s)| s)
            .collect();
        assert_eq!(seen, ["builder", "checker", "troubleshooter", "consultant"]);

        assert_eq!(idea_result["status"], "blocked", "{idea_result:#}");
        assert_eq!(idea_result["result"]["event"]["reason"], "planner_blocked");
    });
    // `ops` exits 0 for blocked, as the reference does, and prints the result: the same
    // request_id sent again through the bridge is answered from the worker's ledger.
    let task = enqueue(
        "req-task-blocked",
        "task",
        "Fix src/app.py so tests/test_app.py passes",
        "task",
    );
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--submit",
            "request",
            "--nats-url",
            &s.nats.url,
        ],
        &task.to_string(),
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "ops exits 0 for blocked: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("result JSON on stdout");
    assert_eq!(printed["request_id"], "req-task-blocked");
    assert_eq!(printed["status"], "blocked", "{printed:#}");
}

#[test]
fn a_killed_daemon_is_restarted_and_the_work_completes() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 30}}));
    let s = serve(&[("alpha", &ws)], &[]);
    rt().block_on(async {
        let client = s.nats.client().await;
        s.worker.wait_ready(&client).await;
        let request = enqueue("req-crash", "alpha", "Fix src/app.py so tests/test_app.py passes", "task");
        let mut frames = frames_of(&client, "req-crash").await;
        let mut reply = spawn_request(&client, subjects::request_by_id("alpha"), &request);
        let mut pid = None;
        let mut types = Vec::new();
        let answer = loop {
            tokio::select! {
                answer = &mut reply => break answer.expect("task").expect("answer"),
                Some(frame) = frames.next() => {
                    let frame: Value = serde_json::from_slice(&frame.payload).expect("frame");
                    types.push(frame["event_type"].as_str().unwrap_or("").to_string());
                    if frame["event_type"] == "runtime.daemon_started" {
                        pid = frame["payload"]["pid"].as_u64();
                    }
                    if frame["event_type"] == "runtime.stage_started" && types.iter().filter(|t| *t == "runtime.stage_started").count() == 1 {
                        ws.set_stages(json!({}));
                        let pid = pid.expect("daemon pid in the daemon_started frame");
                        let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
                        assert!(status.success());
                    }
                }
            }
        };
        let result: Value = serde_json::from_slice(&answer.payload).expect("result");
        assert_valid("result", &result);
        assert!(types.contains(&"runtime.daemon_exited".to_string()), "{types:?}");
        assert!(types.contains(&"runtime.daemon_restarted".to_string()), "{types:?}");
        assert_eq!(result["status"], "succeeded", "{result:#}");
        assert_eq!(result["completion"]["scoped_completion"], true);
        assert_eq!(result["warnings"][0]["code"], "runtime_warning");
    });
}

#[test]
fn a_daemon_timeout_stops_the_daemon_and_fails_clearly() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 60}}));
    let s = serve(&[("alpha", &ws)], &["--daemon-timeout-seconds", "4"]);
    rt().block_on(async {
        let client = s.nats.client().await;
        s.worker.wait_ready(&client).await;
        let request = enqueue(
            "req-timeout",
            "alpha",
            "Fix src/app.py so tests/test_app.py passes",
            "task",
        );
        let (result, frames) =
            send_and_follow(&client, subjects::request_by_id("alpha"), &request).await;
        assert_eq!(result["status"], "failed", "{result:#}");
        assert_eq!(result["errors"][0]["code"], "daemon_timeout");
        assert!(frame_types(&frames).contains(&"runtime.terminal"));
        // The daemon was stopped: the runtime says so itself.
        let status = request_json(
            "req-after-timeout",
            "status",
            json!({"workspace_id": "alpha"}),
            json!({}),
        );
        let (status, _) = send_and_follow(&client, subjects::request_by_id("alpha"), &status).await;
        assert_eq!(status["result"]["process_running"], false, "{status:#}");
    });
}

#[test]
fn enqueues_queue_per_workspace_while_status_flows_and_other_workspaces_run() {
    // Both workspaces' builders hold until the test writes the release file: the runs stay
    // mid-stage for as long as the test looks, however slow the machine.
    let release_dir = tempfile::tempdir().expect("temp dir");
    let release = release_dir.path().join("release");
    let held = json!({"builder": {"hold_until": release}});
    let a = StandInWorkspace::new(held.clone());
    let b = StandInWorkspace::new(held);
    let s = serve(&[("a", &a), ("b", &b)], &[]);
    rt().block_on(async {
        let one = s.nats.client().await;
        let two = s.nats.client().await;
        s.worker.wait_ready(&one).await;
        let a1 = enqueue(
            "req-a1",
            "a",
            "Fix src/one.py so tests/test_one.py passes",
            "task",
        );
        let a2 = enqueue(
            "req-a2",
            "a",
            "Fix src/two.py so tests/test_two.py passes",
            "task",
        );
        let b1 = enqueue(
            "req-b1",
            "b",
            "Fix src/three.py so tests/test_three.py passes",
            "task",
        );
        // Each request's frames and reply on one connection, so they arrive in order.
        let mut a1_frames = frames_of(&one, "req-a1").await;
        let mut a2_frames = frames_of(&two, "req-a2").await;
        let mut b1_frames = frames_of(&two, "req-b1").await;
        let a1_reply = spawn_request(&one, subjects::request_by_id("a"), &a1);
        let b1_reply = spawn_request(&two, subjects::request_by_id("b"), &b1);
        // a2 is sent once a1 holds workspace a's lane: a1's `request.queued` frame says so.
        let mut f1 = frames_until(&mut a1_frames, "request.queued").await;
        let a2_reply = spawn_request(&two, subjects::request_by_id("a"), &a2);
        let mut f2 = frames_until(&mut a2_frames, "request.queued").await;
        // a1 and b1 are both in a stage, held there: they run at the same time.
        f1.extend(frames_until(&mut a1_frames, "runtime.stage_started").await);
        let mut fb = frames_until(&mut b1_frames, "runtime.stage_started").await;
        // Read-only requests never wait behind the running or the queued enqueue: a status
        // that did would wait for the release, which comes only after it.
        let mut statuses = Vec::new();
        for i in 0..3 {
            let req = request_json(
                &format!("req-a-status-{i}"),
                "status",
                json!({"workspace_id": "a"}),
                json!({}),
            );
            let (result, _) = tokio::time::timeout(
                Duration::from_secs(60),
                send_and_follow(&one, subjects::request_by_id("a"), &req),
            )
            .await
            .expect("a status request was answered while a1 ran and a2 waited");
            assert_eq!(result["status"], "succeeded", "{result:#}");
            statuses.push(result["finished_at"].as_str().unwrap_or("").to_string());
        }
        std::fs::write(&release, "").expect("write the release file");
        let ((r1, rest1), (r2, rest2), (rb, restb)) = tokio::join!(
            follow(a1_reply, a1_frames, std::mem::take(&mut f1)),
            follow(a2_reply, a2_frames, std::mem::take(&mut f2)),
            follow(b1_reply, b1_frames, std::mem::take(&mut fb)),
        );
        let (f1, f2, fb) = (rest1, rest2, restb);
        for r in [&r1, &r2, &rb] {
            assert_eq!(r["status"], "succeeded", "{r:#}");
        }
        let queued = |frames: &[Value]| {
            frames
                .iter()
                .find(|f| f["event_type"] == "request.queued")
                .map(|f| f["payload"]["position"].clone())
        };
        assert_eq!(queued(&f1), Some(json!(0)));
        assert_eq!(queued(&f2), Some(json!(1)), "a2 waits behind a1");
        assert!(
            at(&f1, "request.finished") <= at(&f2, "request.started"),
            "a1 and a2 never overlap"
        );
        assert!(
            at(&fb, "request.started") < at(&f1, "request.finished"),
            "b runs while a1 runs"
        );
        assert!(
            at(&f1, "request.started") < at(&fb, "request.finished"),
            "b runs while a1 runs"
        );
        let a2_started = at(&f2, "request.started");
        assert!(
            statuses.iter().all(|t| !t.is_empty() && *t < a2_started),
            "status answered while a2 waited: {statuses:?}, a2 started {a2_started}"
        );
    });
}

#[test]
fn sigterm_answers_requests_in_flight_then_exits_zero() {
    // The builder holds until the worker has logged the signal: the run is in flight when
    // the stop begins, however slow the machine.
    let release_dir = tempfile::tempdir().expect("temp dir");
    let release = release_dir.path().join("release");
    let ws = StandInWorkspace::new(json!({"builder": {"hold_until": release}}));
    // A stop bound above the run's length: the stop waits for it.
    let mut s = serve(&[("alpha", &ws)], &["--shutdown-timeout", "60"]);
    rt().block_on(async {
        let client = s.nats.client().await;
        s.worker.wait_ready(&client).await;
        let request = enqueue(
            "req-term",
            "alpha",
            "Fix src/app.py so tests/test_app.py passes",
            "task",
        );
        let mut frames = frames_of(&client, "req-term").await;
        let send = |req: Value| spawn_request(&client, subjects::request_by_id("alpha"), &req);
        let reply = send(request);
        let status = request_json(
            "req-term-status",
            "status",
            json!({"workspace_id": "alpha"}),
            json!({}),
        );
        let mut status_frames = frames_of(&client, "req-term-status").await;
        // Wait until the delegated run is under way, then ask the worker to stop, once it
        // has accepted the status request too (its `request.accepted` frame): both are in
        // flight when the signal comes.
        let mut status_reply = None;
        loop {
            let frame = next_frame(&mut frames, Duration::from_secs(90)).await;
            if frame["event_type"] == "runtime.daemon_started" {
                status_reply = Some(send(status.clone()));
            }
            if frame["event_type"] == "runtime.stage_started" {
                assert!(
                    status_reply.is_some(),
                    "daemon_started came before stage_started"
                );
                frames_until(&mut status_frames, "request.accepted").await;
                s.worker.sigterm();
                s.worker
                    .wait_log("SIGTERM received", Duration::from_secs(30));
                std::fs::write(&release, "").expect("write the release file");
                break;
            }
        }
        let status_reply = status_reply.expect("daemon_started frame seen");
        let (answer, status_answer) = tokio::join!(reply, status_reply);
        let answer = answer
            .expect("task")
            .expect("the in-flight enqueue is answered");
        let result: Value = serde_json::from_slice(&answer.payload).expect("json");
        assert_eq!(result["status"], "succeeded", "{result:#}");
        let status_answer = status_answer.expect("task").expect("status answered");
        let status: Value = serde_json::from_slice(&status_answer.payload).expect("json");
        assert_eq!(status["status"], "succeeded");
    });
    let exit = s
        .worker
        .wait_exit(Duration::from_secs(30))
        .expect("worker exits after SIGTERM");
    assert_eq!(exit.code(), Some(0));
    // The bridge sees no worker now (core request/reply: no worker, no answer; durable
    // submission would store the request and wait for a worker instead).
    let late = request_json(
        "req-late",
        "status",
        json!({"workspace_id": "alpha"}),
        json!({}),
    )
    .to_string();
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--submit",
            "request",
            "--nats-url",
            &s.nats.url,
        ],
        &late,
        &[],
    );
    assert_eq!(out.status.code(), Some(3));
}

/// A process a test reads while it runs. Dropped (also when the test fails), it releases
/// the held stage and ends the process and everything it started.
struct Running {
    child: std::process::Child,
    mark: String,
    release: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.release, "");
        let _ = self.child.kill();
        let _ = self.child.wait();
        common::end_marked(&self.mark);
    }
}

#[test]
fn a_workspace_lane_holds_across_processes_on_one_host() {
    // The first run's builder holds until the test writes the release file, which it does
    // once the second process says it waits: the two meet however slow the machine.
    let release_dir = tempfile::tempdir().expect("temp dir");
    let release = release_dir.path().join("release");
    let ws = StandInWorkspace::new(json!({"builder": {"hold_until": release}}));
    let s = serve(&[("alpha", &ws)], &[]);
    let root = ws.path().display().to_string();
    rt().block_on(async {
        let client = s.nats.client().await;
        s.worker.wait_ready(&client).await;
        let first = enqueue(
            "req-host-1",
            "alpha",
            "Fix src/one.py so tests/test_one.py passes",
            "task",
        );
        let mut frames = frames_of(&client, "req-host-1").await;
        let reply = spawn_request(&client, subjects::request_by_id("alpha"), &first);
        let first_frames = frames_until(&mut frames, "runtime.stage_started").await;
        // Another process (the in-process bridge) changes the same workspace meanwhile.
        let second = json!({
            "schema_version": "millracer.ops.v0.2", "request_id": "req-host-2",
            "workspace_ref": {"root_path": root}, "source": {"kind": "cli"}, "action": "enqueue",
            "route_preference": "millrace", "intake_preference": "task",
            "input": {"text": "Fix src/two.py so tests/test_two.py passes"}
        });
        let home = tempfile::tempdir().expect("HOME temp dir");
        let mut command = common::millracer_command();
        command
            .args([
                "ops",
                "--stream-json",
                "--transport",
                "local",
                "--workspace",
                &root,
            ])
            .env("HOME", home.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mark = common::mark(&mut command);
        let mut child = command.spawn().expect("spawn millracer ops");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let stdout = common::Lines::new(child.stdout.take().expect("piped stdout"));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        let mut running = Running {
            child,
            mark,
            release: release.clone(),
        };
        std::io::Write::write_all(&mut stdin, second.to_string().as_bytes())
            .expect("write the request");
        drop(stdin);
        // Its frames, then its result (the one line without an event type). The first run
        // is released at the second's `request.waiting` frame.
        let lines = tokio::task::spawn_blocking(move || {
            let mut lines: Vec<Value> = Vec::new();
            let mut released = false;
            loop {
                let line = stdout.next_within(
                    Duration::from_secs(90),
                    if released {
                        "the second process's frames and result"
                    } else {
                        "the second process's request.waiting frame"
                    },
                );
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a JSON line ({e}): {line}"));
                if value["event_type"] == "request.waiting" && !released {
                    std::fs::write(&release, "").expect("write the release file");
                    released = true;
                }
                let end = value.get("event_type").is_none();
                lines.push(value);
                if end {
                    return lines;
                }
            }
        })
        .await
        .expect("reader thread");
        let exit = common::wait_child(&mut running.child, Duration::from_secs(30));
        let stderr = stderr.join().unwrap_or_default();
        assert_eq!(exit.and_then(|e| e.code()), Some(0), "{stderr}");
        let (first_result, first_frames) = follow(reply, frames, first_frames).await;
        assert_eq!(first_result["status"], "succeeded", "{first_result:#}");
        let (second_result, second_frames) = lines.split_last().expect("lines");
        assert_eq!(second_result["status"], "succeeded", "{second_result:#}");
        let types = frame_types(second_frames);
        assert!(
            types.contains(&"request.waiting"),
            "the second process waited for the lock: {types:?}"
        );
        assert!(
            at(&first_frames, "request.finished") <= at(second_frames, "request.started"),
            "never overlapping"
        );
    });
}
