//! The operator's toolset on the bus, against real workspaces on the real runtime (stages
//! answered by the stand-in runner): the read actions and `health` in the states that
//! matter, pause/resume, and cancel of waiting, running, finished and unknown requests.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::schemas::assert_valid;
use common::stand_in::StandInWorkspace;
use common::{NatsServer, Worker, millrace_bin, request_json, rt, run_ops};
use futures::StreamExt;
use millracer::bus::subjects;
use serde_json::{Value, json};

fn action(id: &str, ws: &str, action: &str, payload: Value) -> Value {
    request_json(
        id,
        action,
        json!({"workspace_id": ws}),
        json!({"kind": "structured_action", "payload": payload}),
    )
}

fn enqueue(id: &str, ws: &str, text: &str) -> Value {
    let mut r = request_json(
        id,
        "enqueue",
        json!({"workspace_id": ws}),
        json!({"kind": "natural_language", "text": text}),
    );
    r["route_preference"] = json!("millrace");
    r["intake_preference"] = json!("task");
    r
}

/// One request, its result (schema-checked).
async fn ask(client: &async_nats::Client, ws: &str, request: &Value) -> Value {
    let answer = client
        .send_request(
            subjects::request_by_id(ws),
            async_nats::Request::new()
                .payload(request.to_string().into())
                .timeout(Some(Duration::from_secs(120))),
        )
        .await
        .expect("an answer within 120 s");
    let result: Value = serde_json::from_slice(&answer.payload).expect("result JSON");
    assert_valid("result", &result);
    result
}

/// Sends a request on a task of its own; the frames of that request are collected.
struct Pending {
    reply: tokio::task::JoinHandle<Value>,
    frames: async_nats::Subscriber,
    seen: Vec<Value>,
}

async fn send(client: &async_nats::Client, ws: &str, request: &Value) -> Pending {
    let id = request["request_id"].as_str().expect("request_id");
    let frames = client
        .subscribe(subjects::frames_of_request(id))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let c = client.clone();
    let subject = subjects::request_by_id(ws);
    let payload = request.to_string();
    let reply = tokio::spawn(async move {
        let answer = c
            .send_request(
                subject,
                async_nats::Request::new()
                    .payload(payload.into())
                    .timeout(Some(Duration::from_secs(240))),
            )
            .await
            .expect("an answer");
        serde_json::from_slice::<Value>(&answer.payload).expect("result JSON")
    });
    Pending {
        reply,
        frames,
        seen: Vec::new(),
    }
}

impl Pending {
    /// Waits (bounded) for a frame matching `pred`; returns it.
    async fn frame(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(f) = self.seen.iter().find(|f| pred(f)) {
            return f.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.frames.next())
                .await
                .unwrap_or_else(|_| panic!("no {what} frame within 90 s: {:#?}", self.seen))
                .expect("frames subscription open");
            let frame: Value = serde_json::from_slice(&message.payload).expect("frame JSON");
            assert_valid("frame", &frame);
            self.seen.push(frame.clone());
            if pred(&frame) {
                return frame;
            }
        }
    }

    /// The result, and every frame up to `request.finished`.
    async fn finish(mut self) -> (Value, Vec<Value>) {
        let result = tokio::time::timeout(Duration::from_secs(240), &mut self.reply)
            .await
            .expect("result within 240 s")
            .expect("task");
        assert_valid("result", &result);
        self.frame("request.finished", |f| {
            f["event_type"] == "request.finished"
        })
        .await;
        for (i, f) in self.seen.iter().enumerate() {
            assert_eq!(f["sequence"], json!(i + 1), "gapless: {:#?}", self.seen);
        }
        (result, self.seen)
    }
}

fn types(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["event_type"].as_str().unwrap_or("").to_string())
        .collect()
}

fn millrace(args: &[&str], ws: &Path) -> String {
    let out = Command::new(millrace_bin())
        .args(args)
        .arg("--workspace")
        .arg(ws)
        .output()
        .expect("run millrace");
    assert!(out.status.success(), "millrace {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(ws: &Path) -> Value {
    serde_json::from_str(&millrace(&["status", "--format", "json"], ws)).expect("status JSON")
}

/// A task card queued straight into the runtime (no daemon): the "queued" state.
fn queue_task_directly(ws: &Path, id: &str) {
    let card = ws.join(format!("{id}.md"));
    std::fs::write(
        &card,
        format!(
            "# queued directly\n\nTask-ID: {id}\nTitle: queued directly\nSummary: s\nCreated-At: 2026-01-01T00:00:00Z\nCreated-By: test\n\nTarget-Paths:\n- .\n\nAcceptance:\n- a\n\nRequired-Checks:\n- c\n\nReferences:\n- r\n\nRisk:\n- low\n"
        ),
    )
    .expect("write card");
    millrace(&["queue", "add-task", card.to_str().expect("utf-8")], ws);
}

/// Asks `health` until it says `want`, within a bound: the worker answers from its status
/// snapshot, which follows a change made behind its back (a direct `millrace control`)
/// within the time of one background refresh (a `millrace status`), not at once.
async fn health_becomes(client: &async_nats::Client, ws: &str, id: &str, want: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    loop {
        n += 1;
        let h = ask(
            client,
            ws,
            &action(&format!("{id}-{n}"), ws, "health", json!({})),
        )
        .await;
        if health_of(&h) == want {
            return h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "health never became {want} within 60 s: {h:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn health_of(result: &Value) -> &str {
    assert_eq!(result["status"], "succeeded", "{result:#}");
    assert_eq!(result["route"], "inspect_only");
    let state = result["result"]["health_state"]
        .as_str()
        .expect("health_state");
    assert_eq!(result["result"]["health_report"]["health_state"], state);
    assert!(
        result["result"]["health_report"]["evidence"]["status"].is_object(),
        "health carries its evidence: {result:#}"
    );
    state
}

#[test]
fn read_actions_and_health_on_empty_queued_and_blocked_workspaces() {
    let empty = StandInWorkspace::new(json!({}));
    let queued = StandInWorkspace::new(json!({}));
    let blocked = StandInWorkspace::new(json!({
        "checker": {"marker": "blocked"},
        "troubleshooter": {"marker": "blocked"},
        "consultant": {"marker": "blocked"},
    }));
    queue_task_directly(queued.path(), "task-queued-1");
    let nats = NatsServer::start();
    let worker = Worker::spawn(
        &nats.url,
        &[
            ("empty", empty.path()),
            ("queued", queued.path()),
            ("blocked", blocked.path()),
        ],
        &[],
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;

        // Empty.
        let q = ask(
            &client,
            "empty",
            &action("q-empty", "empty", "queue_status", json!({})),
        )
        .await;
        assert_eq!(q["status"], "succeeded", "{q:#}");
        assert_eq!(q["route"], "inspect_only");
        assert_eq!(q["result"]["execution_queue_depth"], 0);
        assert_eq!(q["result"]["command"][1], "queue");
        let runs = ask(
            &client,
            "empty",
            &action("r-empty", "empty", "list_runs", json!({})),
        )
        .await;
        assert_eq!(runs["status"], "succeeded", "{runs:#}");
        assert_eq!(runs["result"]["runs"], json!([]));
        let doctor = ask(
            &client,
            "empty",
            &action("d-empty", "empty", "diagnose", json!({})),
        )
        .await;
        assert_eq!(doctor["status"], "succeeded", "{doctor:#}");
        assert_eq!(doctor["result"]["ok"], true, "{doctor:#}");
        let h = ask(
            &client,
            "empty",
            &action("h-empty", "empty", "health", json!({})),
        )
        .await;
        assert_eq!(
            health_of(&h),
            "unknown",
            "a stopped, empty workspace: {h:#}"
        );
        assert_eq!(
            h["evidence_refs"][0]
                .as_str()
                .map(|s| s.starts_with("health:")),
            Some(true)
        );

        // Missing and unknown ids.
        for (act, id) in [("show_work_item", "swi-none"), ("show_run", "sr-none")] {
            let r = ask(&client, "empty", &action(id, "empty", act, json!({}))).await;
            assert_eq!(r["status"], "failed");
            assert_eq!(r["errors"][0]["code"], "invalid_input", "{r:#}");
        }
        let r = ask(
            &client,
            "empty",
            &action(
                "swi-unknown",
                "empty",
                "show_work_item",
                json!({"id": "task-nope"}),
            ),
        )
        .await;
        assert_eq!(r["errors"][0]["code"], "runtime_command_failed", "{r:#}");
        assert!(
            r["errors"][0]["message"]
                .as_str()
                .unwrap_or("")
                .contains("work item not found"),
            "{r:#}"
        );
        let r = ask(
            &client,
            "empty",
            &action(
                "swi-dash",
                "empty",
                "show_work_item",
                json!({"work_item_id": "--help"}),
            ),
        )
        .await;
        assert_eq!(
            r["errors"][0]["code"], "runtime_command_failed",
            "an id is never an option: {r:#}"
        );

        // Queued (no daemon): the item is visible; N11 calls queued work with a stopped
        // daemon `crashed`.
        let q = ask(
            &client,
            "queued",
            &action("q-queued", "queued", "queue_status", json!({})),
        )
        .await;
        assert_eq!(q["result"]["task_queue_depth"], 1, "{q:#}");
        let item = ask(
            &client,
            "queued",
            &action(
                "swi-queued",
                "queued",
                "show_work_item",
                json!({"item_id": "task-queued-1"}),
            ),
        )
        .await;
        assert_eq!(item["status"], "succeeded", "{item:#}");
        assert_eq!(item["result"]["work_item_id"], "task-queued-1");
        assert_eq!(item["result"]["work_item_state"], "queue");
        let h = ask(
            &client,
            "queued",
            &action("h-queued", "queued", "health", json!({})),
        )
        .await;
        assert_eq!(health_of(&h), "crashed", "{h:#}");

        // Blocked: a delegated task whose checker and recovery stages block.
        let r = ask(
            &client,
            "blocked",
            &enqueue("enq-blocked", "blocked", "Fix the flaky thing"),
        )
        .await;
        assert_eq!(r["status"], "blocked", "{r:#}");
        let h = ask(
            &client,
            "blocked",
            &action("h-blocked", "blocked", "health", json!({})),
        )
        .await;
        assert_eq!(health_of(&h), "blocked_recoverable", "{h:#}");
        assert!(
            !h["result"]["health_report"]["evidence"]["blocked_work_items"]
                .as_array()
                .expect("list")
                .is_empty(),
            "{h:#}"
        );
        let runs = ask(
            &client,
            "blocked",
            &action("r-blocked", "blocked", "list_runs", json!({})),
        )
        .await;
        let run_id = runs["result"]["runs"][0]["run_id"]
            .as_str()
            .expect("a run")
            .to_string();
        let run = ask(
            &client,
            "blocked",
            &action(
                "sr-blocked",
                "blocked",
                "show_run",
                json!({"run_id": run_id}),
            ),
        )
        .await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        assert_eq!(run["result"]["run_id"], run_id.as_str());
    });
}

/// How many times the worker ran `millrace <words…>`, from the log its `millrace` keeps.
fn calls(log: &Path, words: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.starts_with(words))
        .count()
}

#[test]
fn queue_and_run_reads_are_answered_from_memory_until_the_runtime_changes() {
    let ws = StandInWorkspace::new(json!({}));
    // The real `millrace`, behind a script that writes down each call's words.
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("calls.log");
    let wrapper = common::write_script(
        &dir.path().join("millrace"),
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            millrace_bin().display()
        ),
    );
    let nats = NatsServer::start();
    let wrapper_arg = wrapper.display().to_string();
    let worker = Worker::spawn(
        &nats.url,
        &[("ws", ws.path())],
        &["--millrace-command", &wrapper_arg],
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        // The first status waits for the worker's first snapshot; by then it watches the
        // runtime's files.
        let s = ask(
            &client,
            "ws",
            &action("m-status", "ws", "status", json!({})),
        )
        .await;
        assert_eq!(s["status"], "succeeded", "{s:#}");

        let mut answers = Vec::new();
        for n in 0..3 {
            let q = ask(
                &client,
                "ws",
                &action(&format!("m-q{n}"), "ws", "queue_status", json!({})),
            )
            .await;
            assert_eq!(q["status"], "succeeded", "{q:#}");
            answers.push(q["result"].clone());
        }
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:#?}");
        assert_eq!(answers[0]["task_queue_depth"], 0, "{:#}", answers[0]);
        assert_eq!(
            calls(&log, "queue ls"),
            1,
            "three queue reads of an unchanged workspace ask the runtime once"
        );
        for n in 0..2 {
            let r = ask(
                &client,
                "ws",
                &action(&format!("m-r{n}"), "ws", "list_runs", json!({})),
            )
            .await;
            assert_eq!(r["status"], "succeeded", "{r:#}");
        }
        assert_eq!(calls(&log, "runs ls"), 1);

        // A change behind the worker's back (the runtime's own CLI, not the worker's): the
        // next reads follow it within a bound.
        queue_task_directly(ws.path(), "task-behind-1");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut n = 0;
        loop {
            n += 1;
            let q = ask(
                &client,
                "ws",
                &action(&format!("m-after{n}"), "ws", "queue_status", json!({})),
            )
            .await;
            if q["result"]["task_queue_depth"] == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the queue read did not follow a task queued behind the worker's back: {q:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(calls(&log, "queue ls") >= 2);
    });
}

#[test]
fn pause_then_resume_with_work_queued_is_recorded_and_health_tells_expected_from_unexpected() {
    let ws = StandInWorkspace::new(json!({}));
    let other = StandInWorkspace::new(json!({}));
    queue_task_directly(ws.path(), "task-paused-1");
    let nats = NatsServer::start();
    let worker = Worker::spawn(
        &nats.url,
        &[("ws", ws.path()), ("other", other.path())],
        &[],
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;

        let pending = send(
            &client,
            "ws",
            &action(
                "pause-1",
                "ws",
                "pause",
                json!({"reason": "operator_requested"}),
            ),
        )
        .await;
        let (paused, frames) = pending.finish().await;
        assert_eq!(paused["status"], "succeeded", "{paused:#}");
        assert_eq!(paused["route"], "runtime_control");
        assert_eq!(paused["result"]["applied"], true, "{paused:#}");
        let t = types(&frames);
        assert!(
            t.contains(&"request.queued".to_string()),
            "pause runs in the lane: {t:?}"
        );
        let frame = frames
            .iter()
            .find(|f| f["event_type"] == "runtime.paused")
            .expect("runtime.paused frame");
        assert_eq!(frame["payload"]["reason"], "operator_requested");
        assert_eq!(status(ws.path())["paused"], true);
        let q = ask(
            &client,
            "ws",
            &action("q-paused", "ws", "queue_status", json!({})),
        )
        .await;
        assert_eq!(
            q["result"]["task_queue_depth"], 1,
            "the work stays queued: {q:#}"
        );

        let (resumed, frames) = send(
            &client,
            "ws",
            &action(
                "resume-1",
                "ws",
                "resume",
                json!({"reason": "done waiting"}),
            ),
        )
        .await
        .finish()
        .await;
        assert_eq!(resumed["status"], "succeeded", "{resumed:#}");
        let frame = frames
            .iter()
            .find(|f| f["event_type"] == "runtime.unpaused")
            .expect("runtime.unpaused frame");
        assert_eq!(frame["payload"]["reason"], "done waiting");
        assert_eq!(status(ws.path())["paused"], false);

        // Health: a pause asked through millracer is expected; one made behind its back is not.
        let r = ask(
            &client,
            "other",
            &action("pause-2", "other", "pause", json!({})),
        )
        .await;
        assert_eq!(r["result"]["reason"], "operator_requested");
        health_becomes(&client, "other", "h-paused", "paused_expected").await;
        ask(
            &client,
            "other",
            &action("resume-2", "other", "resume", json!({})),
        )
        .await;
        millrace(&["control", "pause"], other.path());
        health_becomes(&client, "other", "h-unexpected", "paused_unexpected").await;

        // The same through the subcommands and the bridge.
        let url = nats.url.clone();
        let bus = ["--transport", "nats", "--nats-url", url.as_str()];
        let cli = |args: &[&str]| {
            let all: Vec<&str> = args.iter().chain(bus.iter()).copied().collect();
            run_ops(&all, "", &[])
        };
        let out = cli(&["health", "--workspace-id", "other"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{out:?}");
        assert!(
            text.contains("health: paused_unexpected"),
            "readable: {text}"
        );
        let out = cli(&["health", "--workspace-id", "other", "--json"]);
        let full: Value = serde_json::from_slice(&out.stdout).expect("--json is the OpsResult");
        assert_valid("result", &full);
        assert_eq!(full["result"]["health_state"], "paused_unexpected");
        let out = cli(&["queue", "--workspace-id", "ws"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{out:?}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("task_queue_depth") && l.trim_end().ends_with(" 1")),
            "a table of fields: {text}"
        );
        let out = cli(&["runs", "show"]);
        assert_eq!(out.status.code(), Some(2), "usage: {out:?}");
        let out = cli(&["cancel", "never-sent", "--workspace-id", "ws"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("request_not_found"),
            "{out:?}"
        );
        let out = cli(&[
            "ops",
            "--json",
            "--cancel",
            "never-sent-2",
            "--cancel-workspace",
            "ws",
        ]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let full: Value = serde_json::from_slice(&out.stdout).expect("OpsResult");
        assert_eq!(full["action"], "cancel");
        assert_eq!(full["errors"][0]["code"], "request_not_found", "{full:#}");

        let bad = ask(
            &client,
            "ws",
            &action("pause-bad", "ws", "pause", json!({"reason": "two\nlines"})),
        )
        .await;
        assert_eq!(bad["errors"][0]["code"], "invalid_input", "{bad:#}");
    });
}

#[test]
fn cancel_of_a_running_delegated_request_a_waiting_one_a_finished_one_and_an_unknown_one() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 60}}));
    let nats = NatsServer::start();
    let worker = Worker::spawn(&nats.url, &[("ws", ws.path())], &[]);
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;

        let mut running = send(
            &client,
            "ws",
            &enqueue("long-1", "ws", "Build the slow thing"),
        )
        .await;
        let started = running
            .frame("builder started", |f| {
                f["event_type"] == "runtime.stage_started" && f["payload"]["stage"] == "builder"
            })
            .await;
        let item = started["payload"]["work_item_id"]
            .as_str()
            .expect("work item")
            .to_string();
        let waiting = send(&client, "ws", &enqueue("waits-1", "ws", "Another task")).await;

        // Reads never wait behind the lane; health sees the running stage.
        let h = ask(
            &client,
            "ws",
            &action("h-running", "ws", "health", json!({})),
        )
        .await;
        assert_eq!(health_of(&h), "healthy_running", "{h:#}");
        let q = ask(
            &client,
            "ws",
            &action("q-running", "ws", "queue_status", json!({})),
        )
        .await;
        assert_eq!(q["result"]["active_task_count"], 1, "{q:#}");

        // The waiting request leaves the lane at once.
        let mut waiting = waiting;
        waiting
            .frame("waits-1 queued", |f| f["event_type"] == "request.queued")
            .await;
        let t0 = Instant::now();
        let c = ask(
            &client,
            "ws",
            &action(
                "cancel-waiting",
                "ws",
                "cancel",
                json!({"request_id": "waits-1"}),
            ),
        )
        .await;
        assert_eq!(c["status"], "succeeded", "{c:#}");
        assert_eq!(c["result"]["state"], "waiting");
        assert_eq!(c["result"]["cancelled"], true);
        let (w, frames) = waiting.finish().await;
        eprintln!(
            "cancel of a waiting request answered its caller in {:?}",
            t0.elapsed()
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert_eq!(w["status"], "failed");
        assert_eq!(w["errors"][0]["code"], "cancelled", "{w:#}");
        let t = types(&frames);
        assert!(t.contains(&"request.cancelled".to_string()), "{t:?}");
        assert!(
            !t.contains(&"request.started".to_string()),
            "it never ran: {t:?}"
        );

        // The running one: the stage is stopped, the item cancelled in the runtime.
        let t0 = Instant::now();
        let cancel = send(
            &client,
            "ws",
            &action(
                "cancel-running",
                "ws",
                "cancel",
                json!({"request_id": "long-1", "reason": "changed my mind"}),
            ),
        )
        .await;
        let (r, frames) = running.finish().await;
        let to_caller = t0.elapsed();
        eprintln!("cancel of a running stage answered its caller in {to_caller:?}");
        assert!(to_caller < Duration::from_secs(15), "{to_caller:?}");
        assert_eq!(r["status"], "failed", "{r:#}");
        assert_eq!(r["errors"][0]["code"], "cancelled", "{r:#}");
        let t = types(&frames);
        let at = t
            .iter()
            .position(|x| x == "request.cancelled")
            .expect("request.cancelled frame");
        assert_eq!(t.last().map(String::as_str), Some("request.finished"));
        assert!(
            !t[..at].iter().any(|x| x == "runtime.stage_completed"),
            "the builder never completed: {t:?}"
        );
        assert!(
            t.contains(&"runtime.work_item_cancelled".to_string()),
            "{t:?}"
        );
        let (c, _) = cancel.finish().await;
        assert_eq!(c["status"], "succeeded", "{c:#}");
        assert_eq!(c["result"]["state"], "running");
        assert_eq!(c["result"]["target_error"], "cancelled");
        let shown = millrace(&["queue", "show", &item], ws.path());
        assert!(
            shown.contains("work_item_state: queue_cancelled"),
            "{shown}"
        );
        let st = status(ws.path());
        assert_eq!(st["process_running"], false, "{st:#}");
        // No stage runs after the cancel: the stand-in started the builder only.
        let stages: Vec<String> = ws
            .calls()
            .iter()
            .filter(|c| c["event"] == "started")
            .filter_map(|c| c["stage"].as_str().map(str::to_string))
            .collect();
        assert_eq!(stages, vec!["builder".to_string()], "{stages:?}");

        // Finished and unknown.
        let c = ask(
            &client,
            "ws",
            &action(
                "cancel-again",
                "ws",
                "cancel",
                json!({"request_id": "long-1"}),
            ),
        )
        .await;
        assert_eq!(c["status"], "failed");
        assert_eq!(c["errors"][0]["code"], "request_finished", "{c:#}");
        let c = ask(
            &client,
            "ws",
            &action(
                "cancel-unknown",
                "ws",
                "cancel",
                json!({"request_id": "never-sent"}),
            ),
        )
        .await;
        assert_eq!(c["errors"][0]["code"], "request_not_found", "{c:#}");
        let c = ask(
            &client,
            "ws",
            &action("cancel-none", "ws", "cancel", json!({})),
        )
        .await;
        assert_eq!(c["errors"][0]["code"], "invalid_input", "{c:#}");
    });
}

/// Publishes a request to the jobs stream like an adapter.
async fn publish_job(js: &async_nats::jetstream::Context, subject: String, request: &Value) {
    let id = request["request_id"].as_str().expect("request_id");
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(request.to_string().into())
        .message_id(id);
    js.send_publish(subject, message)
        .await
        .expect("publish")
        .await
        .expect("stored");
}

/// The stored record of a request once it is done.
async fn wait_done(kv: &async_nats::jetstream::kv::Store, ws: &str, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(bytes)) = kv.get(subjects::result_key(Some(ws), request_id)).await
            && let Ok(record) = serde_json::from_slice::<Value>(&bytes)
            && record["state"] == "done"
        {
            return record;
        }
        assert!(Instant::now() < deadline, "no result for {request_id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_request_whose_worker_was_killed_is_cancelled_and_the_new_owner_does_not_resume_it() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 60}}));
    let nats = NatsServer::start();
    // Long enough that the cancel lands before JetStream hands the request on.
    let ack = ["--ack-wait-seconds", "12"];
    let mut first = Worker::spawn(&nats.url, &[("ws", ws.path())], &ack);
    rt().block_on(async {
        let client = nats.client().await;
        first.wait_ready(&client).await;
        let js = async_nats::jetstream::new(client.clone());
        let mut frames = client
            .subscribe(subjects::frames_of_request("orphan-1"))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        publish_job(
            &js,
            subjects::jobs_by_id("ws", subjects::JobClass::Change),
            &enqueue("orphan-1", "ws", "Build the slow thing"),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(90);
        let item = loop {
            let m = tokio::time::timeout(deadline - Instant::now(), frames.next())
                .await
                .expect("builder starts")
                .expect("frames");
            let f: Value = serde_json::from_slice(&m.payload).expect("frame");
            if f["event_type"] == "runtime.stage_started" && f["payload"]["stage"] == "builder" {
                break f["payload"]["work_item_id"]
                    .as_str()
                    .expect("item")
                    .to_string();
            }
        };
        first.sigkill();
        let second = Worker::spawn_with(
            &nats.url,
            &[("ws", ws.path())],
            &ack,
            &[],
            Some(first.home()),
        );
        second.wait_ready(&client).await;
        let t0 = Instant::now();
        let c = ask(
            &client,
            "ws",
            &action(
                "cancel-orphan",
                "ws",
                "cancel",
                json!({"request_id": "orphan-1"}),
            ),
        )
        .await;
        assert_eq!(c["status"], "succeeded", "{c:#}\n{}", second.log());
        assert_eq!(c["result"]["state"], "orphaned", "{c:#}");
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let record = wait_done(&kv, "ws", "orphan-1").await;
        eprintln!(
            "cancelled orphan answered {:?} after the cancel",
            t0.elapsed()
        );
        assert_eq!(record["result"]["status"], "failed", "{record:#}");
        assert_eq!(
            record["result"]["errors"][0]["code"], "cancelled",
            "{record:#}"
        );
        let stream = js
            .get_stream(subjects::FRAMES_STREAM)
            .await
            .expect("frames stream");
        let mut types = Vec::new();
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                filter_subject: subjects::frames_of_request("orphan-1"),
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("fetch");
        while let Some(Ok(m)) = batch.next().await {
            let f: Value = serde_json::from_slice(&m.payload).expect("frame");
            types.push(f["event_type"].as_str().unwrap_or("").to_string());
        }
        assert!(
            !types.contains(&"runtime.resumed".to_string()),
            "never resumed: {types:?}"
        );
        assert!(
            types.contains(&"runtime.not_resumed".to_string()),
            "{types:?}"
        );
        assert!(
            types.contains(&"runtime.work_item_cancelled".to_string()),
            "{types:?}"
        );
        let shown = millrace(&["queue", "show", &item], ws.path());
        assert!(
            shown.contains("work_item_state: queue_cancelled"),
            "{shown}\n{types:?}\n{}",
            second.log()
        );
        let started: Vec<Value> = ws
            .calls()
            .into_iter()
            .filter(|c| c["event"] == "started")
            .collect();
        assert_eq!(started.len(), 1, "only the first builder ran: {started:#?}");
    });
}

#[test]
fn cancel_during_a_pi_turn_abandons_the_turn_and_answers_the_caller() {
    use common::pi::{ModelServer, PiHome};
    // The model takes a minute to answer the decision turn.
    let server = ModelServer::start(json!({"replies": [
        {"when": "Decide whether", "text": "```json\n{\"decision\": \"direct\"}\n```", "delay_seconds": 60}
    ], "default": {"text": "ok"}}));
    let home = PiHome::new(&server, None);
    let ws = StandInWorkspace::new(json!({}));
    let nats = NatsServer::start();
    let pi = common::pi_bin().display().to_string();
    let env = home.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let worker = Worker::spawn_with(
        &nats.url,
        &[("ws", ws.path())],
        &[
            "--pi-runner",
            "--pi-command",
            &pi,
            "--provider",
            "fake",
            "--model",
            "fake-chat",
        ],
        &env,
        None,
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let request = request_json(
            "pi-slow-1",
            "enqueue",
            json!({"workspace_id": "ws"}),
            json!({"kind": "natural_language", "text": "Think about the build for a while"}),
        );
        let running = send(&client, "ws", &request).await;
        // The decision turn reached the model.
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.requests().is_empty() {
            assert!(
                Instant::now() < deadline,
                "pi never asked the model: {}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t0 = Instant::now();
        let c = ask(
            &client,
            "ws",
            &action(
                "cancel-pi",
                "ws",
                "cancel",
                json!({"request_id": "pi-slow-1"}),
            ),
        )
        .await;
        let (r, frames) = running.finish().await;
        eprintln!(
            "cancel of a pi turn answered its caller in {:?}",
            t0.elapsed()
        );
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        assert_eq!(c["status"], "succeeded", "{c:#}");
        assert_eq!(r["status"], "failed", "{r:#}");
        assert_eq!(r["errors"][0]["code"], "cancelled", "{r:#}");
        let t = types(&frames);
        assert!(t.contains(&"agent.aborted".to_string()), "{t:?}");
        assert!(t.contains(&"request.cancelled".to_string()), "{t:?}");
    });
}
