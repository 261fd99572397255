//! Nothing lost: durable intake on the real nats-server (JetStream), results kept by
//! request_id, frames kept for replay, a worker killed mid-stage and a broker restarted
//! mid-run, the same request published twice, and 1,000 requests over 10 workspaces served
//! by 2 workers.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::stand_in::StandInWorkspace;
use common::{
    NatsServer, Worker, Workspace, request_json, rt, run_ops_with_timeout, wait_frame, write_script,
};
use futures::StreamExt;
use millracer::bus::subjects::{self, JobClass};
use serde_json::{Value, json};

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

/// Publishes a request to the jobs stream like an adapter; returns whether the stream
/// reported it a duplicate.
async fn publish_job(
    js: &jetstream::Context,
    subject: String,
    request: &Value,
    msg_id: &str,
) -> bool {
    let message = jetstream::message::PublishMessage::build()
        .payload(request.to_string().into())
        .message_id(msg_id);
    js.send_publish(subject, message)
        .await
        .expect("publish")
        .await
        .expect("stored")
        .duplicate
}

/// The stored record of a request of workspace `alpha` once it is done (fails after `limit`).
async fn wait_done(kv: &jetstream::kv::Store, request_id: &str, limit: Duration) -> Value {
    common::wait_done(kv, "alpha", request_id, limit).await
}

/// Every stored frame of a request, in stream order.
async fn stored_frames(js: &jetstream::Context, request_id: &str) -> Vec<Value> {
    common::stored_frames(js, &subjects::frames_of_request(request_id)).await
}

fn count(frames: &[Value], event_type: &str) -> usize {
    frames
        .iter()
        .filter(|f| f["event_type"] == event_type)
        .count()
}

fn assert_gapless(frames: &[Value]) {
    let seqs: Vec<u64> = frames
        .iter()
        .filter_map(|f| f["sequence"].as_u64())
        .collect();
    let want: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, want,
        "frame sequences gapless and unique: {frames:#?}"
    );
}

fn intake_documents(workspace: &Path) -> Vec<String> {
    std::fs::read_dir(workspace.join(".millracer").join("intake"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".md"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_same_request_published_twice_runs_once_and_is_answered_from_the_store() {
    let ws = Workspace::init();
    let nats = NatsServer::start();
    let worker = Worker::spawn(&nats.url, &[("alpha", ws.path())], &[]);
    let request = request_json(
        "dup-1",
        "status",
        json!({"workspace_id": "alpha"}),
        json!({}),
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        let subject = subjects::jobs_by_id("alpha", JobClass::Read);
        assert!(!publish_job(&js, subject.clone(), &request, "dup-1").await);
        // Inside the duplicate window: the stream keeps one.
        assert!(publish_job(&js, subject.clone(), &request, "dup-1").await);
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let first = wait_done(&kv, "dup-1", Duration::from_secs(30)).await;
        assert_eq!(first["result"]["status"], "succeeded", "{first:#}");
        // After the window (a new message id): the stored record answers, nothing runs.
        assert!(!publish_job(&js, subject.clone(), &request, "dup-1-later").await);
        let mut stream = js.get_stream(subjects::JOBS_STREAM).await.expect("jobs");
        let deadline = Instant::now() + Duration::from_secs(20);
        while stream.info().await.expect("info").state.messages > 0 {
            assert!(
                Instant::now() < deadline,
                "the repeated request was never taken"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let again = wait_done(&kv, "dup-1", Duration::from_secs(5)).await;
        assert_eq!(again["result"], first["result"]);
        // Garbage naming the same request_id is answered (and terminated) but never
        // overwrites the stored result.
        let garbage = json!({"request_id": "dup-1", "schema_version": "nope"});
        assert!(!publish_job(&js, subject.clone(), &garbage, "dup-1-garbage").await);
        let deadline = Instant::now() + Duration::from_secs(20);
        while stream.info().await.expect("info").state.messages > 0 {
            assert!(Instant::now() < deadline, "the garbage was never taken");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The worker tries to store the refusal before it terminates the message, and says
        // when a stored record is in the way: wait for that, not for a moment.
        worker.wait_log(
            "invalid input reuses a stored request_id; its record is kept",
            Duration::from_secs(20),
        );
        let kept = wait_done(&kv, "dup-1", Duration::from_secs(5)).await;
        assert_eq!(kept["result"], first["result"], "{kept:#}");
        let frames = stored_frames(&js, "dup-1").await;
        assert_eq!(count(&frames, "request.started"), 1, "{frames:#?}");
        assert_eq!(count(&frames, "request.finished"), 1);
        assert_gapless(&frames);
    });
    // The bridge sends the same request again: the stored result, at once, same as stored.
    let out = run_ops_with_timeout(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
        ],
        &request.to_string(),
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_eq!(printed["request_id"], "dup-1");
    assert_eq!(printed["status"], "succeeded");
    // And the worker ran it once: one accepted frame in the whole frames stream.
    rt().block_on(async {
        let js = jetstream::new(nats.client().await);
        assert_eq!(
            count(&stored_frames(&js, "dup-1").await, "request.accepted"),
            1
        );
    });
}

#[test]
fn a_broker_restart_mid_run_loses_nothing() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 6}}));
    let mut nats = NatsServer::start();
    let worker = Worker::spawn(&nats.url, &[("alpha", ws.path())], &[]);
    let request = enqueue(
        "restart-1",
        "alpha",
        "Fix src/app.py so tests/test_app.py passes",
    );
    let url = nats.url.clone();
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
    });
    let started = Instant::now();
    let bridge = {
        let text = request.to_string();
        std::thread::spawn(move || {
            run_ops_with_timeout(
                &["ops", "--json", "--transport", "nats", "--nats-url", &url],
                &text,
                &[],
                Duration::from_secs(240),
            )
        })
    };
    rt().block_on(async {
        let client = nats.client().await;
        let mut frames = client
            .subscribe(subjects::frames_of_request("restart-1"))
            .await
            .expect("subscribe");
        wait_frame(&mut frames, "runtime.stage_started", Some("builder")).await;
    });
    let down = Instant::now();
    nats.restart();
    eprintln!(
        "broker restarted {:?} after the request was sent",
        down - started
    );
    let out = bridge.join().expect("bridge thread");
    eprintln!(
        "result {:?} after the restart",
        Instant::now().duration_since(down)
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}\nworker: {}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_eq!(result["status"], "succeeded", "{result:#}");
    assert_eq!(result["completion"]["scoped_completion"], true);
    assert_eq!(intake_documents(ws.path()).len(), 1, "queued once");
    let builders = ws
        .calls()
        .iter()
        .filter(|c| c["stage"] == "builder")
        .count();
    assert_eq!(builders, 1, "{:?}", ws.calls());
}

#[test]
fn a_worker_killed_mid_stage_is_taken_over_without_queuing_again() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 8}}));
    let nats = NatsServer::start();
    let fast = ["--ack-wait-seconds", "3"];
    let mut first = Worker::spawn(&nats.url, &[("alpha", ws.path())], &fast);
    let request = enqueue(
        "kill-1",
        "alpha",
        "Fix src/app.py so tests/test_app.py passes",
    );
    rt().block_on(async {
        let client = nats.client().await;
        first.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        let mut frames = client
            .subscribe(subjects::frames_of_request("kill-1"))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        assert!(
            !publish_job(
                &js,
                subjects::jobs_by_id("alpha", JobClass::Change),
                &request,
                "kill-1",
            )
            .await,
            "a first publish is not a duplicate"
        );
        wait_frame(&mut frames, "runtime.stage_started", Some("builder")).await;
        let first_id = first.service_id();
        first.sigkill();
        let killed = Instant::now();
        let second = Worker::spawn_with(
            &nats.url,
            &[("alpha", ws.path())],
            &fast,
            &[],
            Some(first.home()),
        );
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let record = wait_done(&kv, "kill-1", Duration::from_secs(180)).await;
        eprintln!("result {:?} after the kill", killed.elapsed());
        let result = &record["result"];
        assert_eq!(
            result["status"],
            "succeeded",
            "{record:#}\n{}",
            second.log()
        );
        assert_eq!(result["completion"]["scoped_completion"], true);
        // The second worker took the request over and finished it.
        let second_id = second.service_id();
        assert_ne!(second_id, first_id);
        assert_eq!(record["owner"], json!(second_id), "{record:#}");
        let frames = stored_frames(&js, "kill-1").await;
        let types: Vec<&str> = frames
            .iter()
            .filter_map(|f| f["event_type"].as_str())
            .collect();
        eprintln!("frames of the taken-over request: {types:?}");
        assert_eq!(count(&frames, "runtime.work_item_queued"), 1, "{types:?}");
        assert_eq!(count(&frames, "runtime.intake_written"), 1, "{types:?}");
        assert_eq!(count(&frames, "runtime.resumed"), 1, "{types:?}");
        // The daemon the first worker started outlived it and was followed, not replaced.
        assert_eq!(count(&frames, "runtime.daemon_started"), 1, "{types:?}");
        assert_eq!(count(&frames, "runtime.daemon_adopted"), 1, "{types:?}");
        assert_eq!(count(&frames, "runtime.daemon_restarted"), 0, "{types:?}");
        let started_pid = frames
            .iter()
            .find(|f| f["event_type"] == "runtime.daemon_started")
            .map(|f| f["payload"]["pid"].clone());
        let adopted_pid = frames
            .iter()
            .find(|f| f["event_type"] == "runtime.daemon_adopted")
            .map(|f| f["payload"]["pid"].clone());
        assert_eq!(
            started_pid, adopted_pid,
            "the adopted daemon is the first one"
        );
        assert_eq!(count(&frames, "request.finished"), 1, "{types:?}");
        assert_gapless(&frames);
        drop(second);
    });
    assert_eq!(intake_documents(ws.path()).len(), 1, "queued once");
    let calls: Vec<String> = ws
        .calls()
        .iter()
        .map(|c| c["stage"].as_str().unwrap_or("").to_string())
        .collect();
    eprintln!("stages the stand-in answered: {calls:?}");
    // Each stage answered once: the stage running at the kill finished in the adopted
    // daemon and was not run again.
    for stage in ["builder", "checker", "updater"] {
        assert_eq!(
            calls.iter().filter(|s| *s == stage).count(),
            1,
            "{stage} once: {calls:?}"
        );
    }
    // The caller re-attaches and gets the one result.
    let out = run_ops_with_timeout(
        &[
            "ops",
            "--stream-json",
            "--attach",
            "kill-1",
            "--attach-workspace",
            "alpha",
            "--nats-url",
            &nats.url,
        ],
        "",
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let results = lines
        .iter()
        .filter(|l| l.get("status").is_some() && l.get("sequence").is_none())
        .count();
    assert_eq!(results, 1, "{lines:#?}");
    assert_eq!(
        lines.last().map(|l| &l["status"]),
        Some(&json!("succeeded"))
    );
}

#[test]
fn a_thousand_requests_over_ten_workspaces_with_two_workers_each_answered_once_in_order() {
    // `enqueue` without text is the cheapest mutating request: it takes its workspace's
    // lane (and the server-side one-at-a-time consumer) and answers `invalid_input` at once.
    let dirs: Vec<tempfile::TempDir> = (0..10)
        .map(|_| {
            tempfile::Builder::new()
                .prefix("durable-ws-")
                .tempdir()
                .expect("dir")
        })
        .collect();
    let names: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    let list: Vec<(&str, &Path)> = names
        .iter()
        .map(String::as_str)
        .zip(dirs.iter().map(|d| d.path()))
        .collect();
    let nats = NatsServer::start();
    let a = Worker::spawn(&nats.url, &list, &[]);
    let b = Worker::spawn(&nats.url, &list, &[]);
    let ids = [a.service_id(), b.service_id()];
    assert_ne!(ids[0], ids[1]);
    rt().block_on(async {
        let client = nats.client().await;
        a.wait_ready(&client).await;
        b.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        let started = Instant::now();
        let mut owners: HashMap<String, usize> = HashMap::new();
        let mut acks = Vec::new();
        for i in 0..1000 {
            let ws = &names[i % 10];
            let id = format!("bulk-{i:04}");
            let mut request = request_json(&id, "enqueue", json!({"workspace_id": ws}), json!({}));
            request["route_preference"] = json!("millrace");
            let message = jetstream::message::PublishMessage::build()
                .payload(request.to_string().into())
                .message_id(subjects::result_key(Some(ws), &id));
            acks.push(
                js.send_publish(subjects::jobs_by_id(ws, JobClass::Change), message)
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            assert!(!ack.await.expect("stored").duplicate);
        }
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let mut spans: HashMap<usize, Vec<(String, String)>> = HashMap::new();
        for i in 0..1000 {
            let record = common::wait_done(
                &kv,
                &names[i % 10],
                &format!("bulk-{i:04}"),
                Duration::from_secs(240),
            )
            .await;
            let result = &record["result"];
            assert_eq!(result["errors"][0]["code"], "invalid_input", "{record:#}");
            *owners
                .entry(record["owner"].as_str().unwrap_or("<none>").to_string())
                .or_default() += 1;
            spans.entry(i % 10).or_default().push((
                result["started_at"]
                    .as_str()
                    .expect("started_at")
                    .to_string(),
                result["finished_at"]
                    .as_str()
                    .expect("finished_at")
                    .to_string(),
            ));
        }
        eprintln!("1000 durable requests answered in {:?}", started.elapsed());
        for (ws, spans) in &spans {
            for pair in spans.windows(2) {
                assert!(
                    pair[0].1 <= pair[1].0,
                    "workspace w{ws}: a request started before the one before it finished: {pair:?}"
                );
            }
        }
        let frames = common::stored_frames(&js, &subjects::frames_of_workspace(None)).await;
        let mut started_count: HashMap<String, usize> = HashMap::new();
        for frame in frames
            .iter()
            .filter(|f| f["event_type"] == "request.started")
        {
            *started_count
                .entry(frame["request_id"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
        let bulk: Vec<_> = started_count
            .iter()
            .filter(|(k, _)| k.starts_with("bulk-"))
            .collect();
        assert_eq!(bulk.len(), 1000, "every request started");
        assert!(bulk.iter().all(|(_, n)| **n == 1), "each ran once");
        // Both workers took part: each one's id owns some of the records, no one else's does.
        eprintln!("records per owner: {owners:?}");
        for id in &ids {
            assert!(
                owners.get(id).copied().unwrap_or(0) > 0,
                "{id} ran nothing: {owners:?}"
            );
        }
        assert_eq!(owners.values().sum::<usize>(), 1000);
        assert_eq!(
            owners.len(),
            2,
            "only the two workers own records: {owners:?}"
        );
    });
}

#[test]
fn a_request_too_large_gets_a_clear_stored_error_and_is_not_retried() {
    let ws = Workspace::init();
    let nats = NatsServer::start();
    let worker = Worker::spawn(
        &nats.url,
        &[("alpha", ws.path())],
        &["--max-request-bytes", "4096"],
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
    });
    let request = request_json(
        "big-1",
        "status",
        json!({"workspace_id": "alpha"}),
        json!({"text": "x".repeat(10_000)}),
    );
    let out = run_ops_with_timeout(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
        ],
        &request.to_string(),
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("request_too_large") || said.contains("exceeds"),
        "{said}"
    );
    rt().block_on(async {
        let js = jetstream::new(nats.client().await);
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let record = wait_done(&kv, "big-1", Duration::from_secs(5)).await;
        assert_eq!(record["result"]["errors"][0]["code"], "request_too_large");
        // Terminated, not redelivered: the stream is empty and nothing waits.
        let mut stream = js.get_stream(subjects::JOBS_STREAM).await.expect("jobs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while stream.info().await.expect("info").state.messages > 0 {
            assert!(
                Instant::now() < deadline,
                "the refused request stayed in the stream"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn sigterm_finishes_the_running_request_stores_its_result_and_exits() {
    // The builder holds until the worker has logged the signal: the run is in flight when
    // the stop begins, however slow the machine.
    let release_dir = tempfile::tempdir().expect("temp dir");
    let release = release_dir.path().join("release");
    let ws = StandInWorkspace::new(json!({"builder": {"hold_until": release}}));
    let nats = NatsServer::start();
    // A stop bound above the request's length: the stop waits for it.
    let mut worker = Worker::spawn(
        &nats.url,
        &[("alpha", ws.path())],
        &["--shutdown-timeout", "120"],
    );
    let request = enqueue(
        "term-1",
        "alpha",
        "Fix src/app.py so tests/test_app.py passes",
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        let mut frames = client
            .subscribe(subjects::frames_of_request("term-1"))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        assert!(
            !publish_job(
                &js,
                subjects::jobs_by_id("alpha", JobClass::Change),
                &request,
                "term-1",
            )
            .await
        );
        wait_frame(&mut frames, "runtime.stage_started", Some("builder")).await;
    });
    worker.sigterm();
    worker.wait_log("SIGTERM received", Duration::from_secs(30));
    std::fs::write(&release, "").expect("write the release file");
    let exit = worker
        .wait_exit(Duration::from_secs(120))
        .expect("worker exits after finishing");
    assert_eq!(exit.code(), Some(0), "{}", worker.log());
    rt().block_on(async {
        let js = jetstream::new(nats.client().await);
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let record = wait_done(&kv, "term-1", Duration::from_secs(1)).await;
        assert_eq!(record["result"]["status"], "succeeded", "{record:#}");
        // Acked: nothing is left to redeliver.
        let mut stream = js.get_stream(subjects::JOBS_STREAM).await.expect("jobs");
        let deadline = Instant::now() + Duration::from_secs(5);
        while stream.info().await.expect("info").state.messages > 0 {
            assert!(
                Instant::now() < deadline,
                "the finished request was not acked: {}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn sigterm_leaves_unstarted_work_to_another_worker() {
    // The builder holds until the worker has logged the signal: the run is in flight when
    // the stop begins, however slow the machine.
    let release_dir = tempfile::tempdir().expect("temp dir");
    let release = release_dir.path().join("release");
    let ws = StandInWorkspace::new(json!({"builder": {"hold_until": release}}));
    let nats = NatsServer::start();
    // A stop bound long enough for term-a's stages: the test is about what SIGTERM hands
    // back, not about the bound.
    let mut first = Worker::spawn(
        &nats.url,
        &[("alpha", ws.path())],
        &["--shutdown-timeout", "120"],
    );
    let first_id = first.service_id();
    rt().block_on(async {
        let client = nats.client().await;
        first.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        let mut frames = client
            .subscribe(subjects::frames_of_request("term-a"))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let subject = subjects::jobs_by_id("alpha", JobClass::Change);
        for id in ["term-a", "term-b"] {
            let request = enqueue(id, "alpha", "Fix src/app.py so tests/test_app.py passes");
            assert!(
                !publish_job(
                    &js,
                    subject.clone(),
                    &request,
                    &subjects::result_key(Some("alpha"), id)
                )
                .await
            );
        }
        // term-a runs; term-b waits in the stream (one change per workspace at a time).
        wait_frame(&mut frames, "runtime.stage_started", Some("builder")).await;
    });
    first.sigterm();
    first.wait_log("SIGTERM received", Duration::from_secs(30));
    std::fs::write(&release, "").expect("write the release file");
    let exit = first
        .wait_exit(Duration::from_secs(120))
        .expect("the first worker exits after finishing term-a");
    assert_eq!(exit.code(), Some(0), "{}", first.log());
    let second = Worker::spawn(&nats.url, &[("alpha", ws.path())], &[]);
    let second_id = second.service_id();
    rt().block_on(async {
        let js = jetstream::new(nats.client().await);
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let a = wait_done(&kv, "term-a", Duration::from_secs(5)).await;
        assert_eq!(a["result"]["status"], "succeeded", "{a:#}");
        assert_eq!(
            a["owner"],
            json!(first_id),
            "term-a finished by the first worker"
        );
        let b = wait_done(&kv, "term-b", Duration::from_secs(120)).await;
        assert_eq!(b["result"]["status"], "succeeded", "{b:#}");
        assert_eq!(
            b["owner"],
            json!(second_id),
            "term-b run by the second worker"
        );
        for id in ["term-a", "term-b"] {
            let frames = stored_frames(&js, id).await;
            assert_eq!(count(&frames, "request.started"), 1, "{id} ran once");
            assert_eq!(
                count(&frames, "runtime.resumed"),
                0,
                "{id} was not taken over"
            );
        }
    });
    assert_eq!(intake_documents(ws.path()).len(), 2, "each queued once");
}

#[test]
fn a_request_is_delivered_at_most_five_times() {
    let ws = Workspace::init();
    let nats = NatsServer::start();
    // The worker sets up the stream and its consumers, then goes: nobody acks any more.
    let mut worker = Worker::spawn(
        &nats.url,
        &[("alpha", ws.path())],
        &["--ack-wait-seconds", "1", "--host-id", "durable-host"],
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
    });
    worker.sigterm();
    assert_eq!(
        worker
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    rt().block_on(async {
        let client = nats.client().await;
        let js = jetstream::new(client.clone());
        let stream = js.get_stream(subjects::JOBS_STREAM).await.expect("jobs");
        let name = subjects::jobs_consumer(
            "alpha",
            &subjects::fingerprint(
                "durable-host",
                &millracer::millrace::workspace::resolve_path(ws.path()),
            ),
            JobClass::Read,
        );
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&name)
            .await
            .expect("the worker's consumer");
        let mut advisories = client
            .subscribe(format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{name}",
                subjects::JOBS_STREAM
            ))
            .await
            .expect("subscribe advisories");
        client.flush().await.expect("flush");
        let request = request_json(
            "poison-1",
            "status",
            json!({"workspace_id": "alpha"}),
            json!({}),
        );
        assert!(
            !publish_job(
                &js,
                subjects::jobs_by_id("alpha", JobClass::Read),
                &request,
                &subjects::result_key(Some("alpha"), "poison-1"),
            )
            .await
        );
        // Take it like a worker that dies before acking, again and again.
        let mut deliveries = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(3))
                .messages()
                .await
                .expect("fetch");
            match batch.next().await {
                Some(Ok(message)) => {
                    let info = message.info().expect("a JetStream message");
                    deliveries.push(info.delivered);
                }
                Some(Err(err)) => panic!("fetch: {err}"),
                // Nothing within the fetch's expiry, three times the ack wait: no more.
                None => break,
            }
            assert!(
                Instant::now() < deadline,
                "delivered without end: {deliveries:?}"
            );
        }
        assert_eq!(deliveries, [1, 2, 3, 4, 5], "delivered at most 5 times");
        let advisory = tokio::time::timeout(Duration::from_secs(10), advisories.next())
            .await
            .expect("a max-deliveries advisory within 10 s")
            .expect("advisory");
        let advisory: Value = serde_json::from_slice(&advisory.payload).expect("advisory JSON");
        assert_eq!(advisory["deliveries"], 5, "{advisory:#}");
    });
}

/// A stand-in `millrace`: the real one, except that the first `queue …` command pauses,
/// touching `$GAP_MARKER` first, so a test can kill the worker there: after the real
/// `queue add` ran (the runtime has the card, the worker has not stored that it queued), or
/// with `GAP_BEFORE=1` before it ran.
fn pausing_millrace(dir: &Path) -> std::path::PathBuf {
    write_script(
        &dir.join("millrace"),
        "#!/bin/sh\n\
         case \"$1\" in queue) ;; *) exec \"$REAL_MILLRACE\" \"$@\" ;; esac\n\
         if [ ! -e \"$GAP_MARKER\" ] && [ -n \"$GAP_BEFORE\" ]; then : > \"$GAP_MARKER\"; sleep 600; fi\n\
         \"$REAL_MILLRACE\" \"$@\"\n\
         rc=$?\n\
         if [ ! -e \"$GAP_MARKER\" ]; then : > \"$GAP_MARKER\"; sleep 600; fi\n\
         exit $rc\n",
    )
}

/// The runtime's task cards in every lifecycle folder.
fn task_cards(workspace: &Path) -> Vec<String> {
    let mut cards = Vec::new();
    for state in ["queue", "active", "done", "blocked"] {
        if let Ok(entries) = std::fs::read_dir(workspace.join("millrace-agents/tasks").join(state))
        {
            cards.extend(
                entries
                    .flatten()
                    .map(|e| format!("{state}/{}", e.file_name().to_string_lossy()))
                    .filter(|n| n.ends_with(".md")),
            );
        }
    }
    cards
}

#[test]
fn a_worker_killed_between_queue_add_and_recording_it_leaves_one_card() {
    killed_in_the_gap(false);
}

#[test]
fn a_worker_killed_after_recording_its_intent_but_before_queue_add_leaves_one_card() {
    killed_in_the_gap(true);
}

/// A worker killed right after `queue add` (`before` false: the runtime has the card, the
/// record only the intent) or right before it (`before` true: the record has the intent,
/// the runtime nothing); the new owner leaves exactly one card either way.
fn killed_in_the_gap(before: bool) {
    let id = if before { "gap-before" } else { "gap-after" };
    let ws = StandInWorkspace::new(json!({}));
    let nats = NatsServer::start();
    let tools = tempfile::tempdir().expect("tools dir");
    let wrapper = pausing_millrace(tools.path());
    let marker = tools.path().join("queued");
    let real = common::millrace_bin();
    let fast = ["--ack-wait-seconds", "3"];
    let mut first = Worker::spawn_with(
        &nats.url,
        &[("alpha", ws.path())],
        &fast,
        &[
            (
                "MILLRACER_MILLRACE_COMMAND",
                wrapper.to_str().expect("utf-8"),
            ),
            ("REAL_MILLRACE", real.to_str().expect("utf-8")),
            ("GAP_MARKER", marker.to_str().expect("utf-8")),
            ("GAP_BEFORE", if before { "1" } else { "" }),
        ],
        None,
    );
    let request = enqueue(id, "alpha", "Fix src/app.py so tests/test_app.py passes");
    rt().block_on(async {
        let client = nats.client().await;
        first.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        publish_job(
            &js,
            subjects::jobs_by_id("alpha", JobClass::Change),
            &request,
            id,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(90);
        while !marker.exists() {
            assert!(
                Instant::now() < deadline,
                "the worker never ran `queue add`\n{}",
                first.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // In the gap: the stored record has the intent only; the runtime has the card
        // (after `queue add`) or nothing (before it).
        assert_eq!(task_cards(ws.path()).len(), usize::from(!before));
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let stored = kv
            .get(subjects::result_key(Some("alpha"), id))
            .await
            .expect("read")
            .expect("record");
        let stored: Value = serde_json::from_slice(&stored).expect("record JSON");
        assert_eq!(stored["work_item"], Value::Null, "{stored:#}");
        assert!(stored["intake"]["id"].is_string(), "{stored:#}");
        first.kill_all();
        let second = Worker::spawn(&nats.url, &[("alpha", ws.path())], &fast);
        let record = wait_done(&kv, id, Duration::from_secs(180)).await;
        assert_eq!(
            record["result"]["status"],
            "succeeded",
            "{record:#}\n{}",
            second.log()
        );
        assert_eq!(record["work_item"]["id"], stored["intake"]["id"]);
        let frames = stored_frames(&js, id).await;
        let types: Vec<&str> = frames
            .iter()
            .filter_map(|f| f["event_type"].as_str())
            .collect();
        assert_eq!(count(&frames, "runtime.intake_written"), 1, "{types:?}");
        // After `queue add`: found in the runtime and resumed; before it: queued now.
        let (resumed, queued) = if before { (0, 1) } else { (1, 0) };
        assert_eq!(count(&frames, "runtime.resumed"), resumed, "{types:?}");
        assert_eq!(count(&frames, "runtime.intake_reused"), queued, "{types:?}");
        assert_eq!(
            count(&frames, "runtime.work_item_queued"),
            queued,
            "{types:?}"
        );
        assert_eq!(count(&frames, "request.finished"), 1, "{types:?}");
        assert_gapless(&frames);
    });
    let cards = task_cards(ws.path());
    assert_eq!(cards.len(), 1, "one card: {cards:?}");
    assert!(cards[0].starts_with("done/"), "{cards:?}");
    assert_eq!(intake_documents(ws.path()).len(), 1);
    let calls: Vec<String> = ws
        .calls()
        .iter()
        .map(|c| c["stage"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        calls.iter().filter(|s| *s == "builder").count(),
        1,
        "{calls:?}"
    );
}
