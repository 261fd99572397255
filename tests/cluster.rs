//! A NATS cluster: three real JetStream servers on loopback with R3 streams. The server a
//! worker is connected to dies (-9) while a delegated stage runs; two workers of one
//! workspace are replaced one at a time (SIGTERM) while 40 requests are in flight; two
//! "hosts" (separate HOME and workspace roots) serve their workspaces through one cluster.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::cluster::NatsCluster;
use common::stand_in::StandInWorkspace;
use common::{
    Worker, Workspace, request_json, rt, run_ops_with_timeout, stored_frames, wait_done, wait_frame,
};
use millracer::bus::subjects::{self, JobClass};
use serde_json::{Value, json};

const R3: [&str; 2] = ["--stream-replicas", "3"];

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

fn count(frames: &[Value], event_type: &str) -> usize {
    frames
        .iter()
        .filter(|f| f["event_type"] == event_type)
        .count()
}

/// The runtime's task cards in every lifecycle folder.
fn task_cards(workspace: &Path) -> Vec<String> {
    let mut cards = Vec::new();
    for state in ["queue", "active", "done", "blocked"] {
        let dir = workspace.join("millrace-agents/tasks").join(state);
        if let Ok(entries) = std::fs::read_dir(dir) {
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

/// The replicas a stream has, as the cluster reports them.
async fn replicas(js: &jetstream::Context, stream: &str) -> usize {
    let mut stream = js.get_stream(stream).await.expect("stream");
    stream.info().await.expect("info").config.num_replicas
}

#[test]
fn the_workers_server_dies_mid_stage_and_the_bridge_on_another_server_gets_one_result() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 6}}));
    let mut cluster = NatsCluster::start(3);
    // The worker knows server A only; the bridge and the test talk to B and C.
    let worker = Worker::spawn(&cluster.url(0), &[("alpha", ws.path())], &R3);
    let request = enqueue(
        "cluster-1",
        "alpha",
        "Fix src/app.py so tests/test_app.py passes",
    );
    rt().block_on(async {
        let client = cluster.client(1).await;
        worker.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        for stream in [
            subjects::JOBS_STREAM.to_string(),
            subjects::FRAMES_STREAM.to_string(),
            format!("KV_{}", subjects::RESULTS_BUCKET),
        ] {
            assert_eq!(replicas(&js, &stream).await, 3, "{stream} is R3");
        }
        let mut frames = client
            .subscribe(subjects::frames_of_request("cluster-1"))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let bridge_url = cluster.url(1);
        let body = request.to_string();
        let bridge = std::thread::spawn(move || {
            run_ops_with_timeout(
                &[
                    "ops",
                    "--stream-json",
                    "--transport",
                    "nats",
                    "--nats-url",
                    &bridge_url,
                ],
                &body,
                &[],
                Duration::from_secs(240),
            )
        });
        wait_frame(&mut frames, "runtime.stage_started", Some("builder")).await;
        cluster.kill(0);
        let killed = Instant::now();
        // A durable read sent after the death, by a bridge listing the dead server first:
        // answered once the worker is back on the cluster (through B or C).
        let status = request_json(
            "cluster-after",
            "status",
            json!({"workspace_id": "alpha"}),
            json!({"kind": "structured_action", "payload": {}}),
        );
        let second_bridge = format!("{},{}", cluster.url(0), cluster.url(2));
        let out = tokio::task::spawn_blocking(move || {
            run_ops_with_timeout(
                &[
                    "ops",
                    "--json",
                    "--transport",
                    "nats",
                    "--nats-url",
                    &second_bridge,
                ],
                &status.to_string(),
                &[],
                Duration::from_secs(120),
            )
        })
        .await
        .expect("second bridge");
        let back = killed.elapsed();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("a new request answered {back:?} after the worker's server died");
        let out = tokio::task::spawn_blocking(move || bridge.join().expect("bridge thread"))
            .await
            .expect("join");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect();
        let results: Vec<&Value> = lines
            .iter()
            .filter(|l| l.get("status").is_some() && l.get("sequence").is_none())
            .collect();
        assert_eq!(results.len(), 1, "exactly one result: {lines:#?}");
        assert_eq!(results[0]["status"], "succeeded", "{:#}", results[0]);
        assert_eq!(results[0]["completion"]["scoped_completion"], true);
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let record = wait_done(&kv, "alpha", "cluster-1", Duration::from_secs(30)).await;
        assert_eq!(record["result"]["status"], "succeeded");
        let frames = stored_frames(&js, &subjects::frames_of_request("cluster-1")).await;
        let types: Vec<&str> = frames
            .iter()
            .filter_map(|f| f["event_type"].as_str())
            .collect();
        assert_eq!(count(&frames, "request.started"), 1, "{types:?}");
        assert_eq!(count(&frames, "runtime.work_item_queued"), 1, "{types:?}");
        assert_eq!(count(&frames, "request.finished"), 1, "{types:?}");
    });
    // Millrace ran the item once: one card, each stage answered once.
    let cards = task_cards(ws.path());
    assert_eq!(cards.len(), 1, "{cards:?}");
    assert!(cards[0].starts_with("done/"), "{cards:?}");
    let calls: Vec<String> = ws
        .calls()
        .iter()
        .map(|c| c["stage"].as_str().unwrap_or("").to_string())
        .collect();
    for stage in ["builder", "checker"] {
        assert_eq!(
            calls.iter().filter(|s| *s == stage).count(),
            1,
            "{stage} ran once: {calls:?}"
        );
    }
    assert!(worker.try_wait().is_none(), "the worker still runs");
}

#[test]
fn a_rolling_restart_answers_forty_requests_once_and_changes_in_order() {
    let ws = StandInWorkspace::new(json!({"builder": {"delay_seconds": 3}}));
    let cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let a = Worker::spawn(&urls, &[("alpha", ws.path())], &R3);
    let b = Worker::spawn(&urls, &[("alpha", ws.path())], &R3);
    // 40 requests: every other one a change. Change #5 is a real delegated run (it is in
    // flight when worker A is stopped); the other changes are `enqueue` without text, which
    // takes the workspace's lane and is answered `invalid_input` at once. Reads are
    // `status` (the real `millrace status`).
    let ids: Vec<(String, bool)> = (0..40)
        .map(|i| (format!("roll-{i:02}"), i % 2 == 0))
        .collect();
    let delegated = "roll-10";
    rt().block_on(async {
        let client = cluster.client(1).await;
        a.wait_ready(&client).await;
        b.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        let mut frames = client
            .subscribe(subjects::frames_of_request(delegated))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let mut acks = Vec::new();
        for (id, change) in &ids {
            let (request, class) = if id == delegated {
                (
                    enqueue(id, "alpha", "Fix src/app.py so tests/test_app.py passes"),
                    JobClass::Change,
                )
            } else if *change {
                let mut r =
                    request_json(id, "enqueue", json!({"workspace_id": "alpha"}), json!({}));
                r["route_preference"] = json!("millrace");
                (r, JobClass::Change)
            } else {
                (
                    request_json(
                        id,
                        "status",
                        json!({"workspace_id": "alpha"}),
                        json!({"kind": "structured_action", "payload": {}}),
                    ),
                    JobClass::Read,
                )
            };
            let message = jetstream::message::PublishMessage::build()
                .payload(request.to_string().into())
                .message_id(subjects::result_key(Some("alpha"), id));
            acks.push(
                js.send_publish(subjects::jobs_by_id("alpha", class), message)
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks {
            assert!(!ack.await.expect("stored").duplicate);
        }
        wait_frame(&mut frames, "runtime.stage_started", Some("builder")).await;
        a.sigterm();
        let replacement = Worker::spawn(&urls, &[("alpha", ws.path())], &R3);
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        let mut changes = Vec::new();
        for (id, change) in &ids {
            let record = wait_done(&kv, "alpha", id, Duration::from_secs(240)).await;
            let result = &record["result"];
            if id == delegated {
                assert_eq!(result["status"], "succeeded", "{record:#}");
            } else if *change {
                assert_eq!(result["errors"][0]["code"], "invalid_input", "{record:#}");
            } else {
                assert_eq!(result["status"], "succeeded", "{record:#}");
            }
            if *change {
                changes.push((
                    id.clone(),
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
        }
        for pair in changes.windows(2) {
            assert!(
                pair[0].2 <= pair[1].1,
                "a change started before the one sent before it finished: {pair:?}"
            );
        }
        let frames = stored_frames(&js, &subjects::frames_of_workspace(Some("alpha"))).await;
        let mut started: HashMap<String, usize> = HashMap::new();
        let mut finished: HashMap<String, usize> = HashMap::new();
        for frame in &frames {
            let id = frame["request_id"].as_str().unwrap_or("").to_string();
            match frame["event_type"].as_str() {
                Some("request.started") => *started.entry(id).or_default() += 1,
                Some("request.finished") => *finished.entry(id).or_default() += 1,
                _ => {}
            }
        }
        // Sequences per request: gapless and unique, whoever ran it.
        let mut sequences: HashMap<String, Vec<u64>> = HashMap::new();
        for frame in &frames {
            sequences
                .entry(frame["request_id"].as_str().unwrap_or("").to_string())
                .or_default()
                .push(frame["sequence"].as_u64().unwrap_or(0));
        }
        for (id, _) in &ids {
            assert_eq!(started.get(id), Some(&1), "{id} started once");
            assert_eq!(finished.get(id), Some(&1), "{id} finished once");
            let seqs = &sequences[id];
            let want: Vec<u64> = (1..=seqs.len() as u64).collect();
            assert_eq!(seqs, &want, "{id}: frame sequences");
        }
        drop(replacement);
    });
    let mut a = a;
    assert!(
        a.wait_exit(Duration::from_secs(120)).is_some(),
        "the stopped worker exited"
    );
    assert!(a.log().contains("worker stopped"), "{}", a.log());
    assert_eq!(
        task_cards(ws.path()).len(),
        1,
        "the delegated change ran once"
    );
}

#[test]
fn two_hosts_serve_their_own_workspaces_through_one_cluster() {
    let cluster = NatsCluster::start(3);
    let east = Workspace::init();
    let west = Workspace::init();
    // Separate HOME (the worker's own) and workspace roots; each host knows one server.
    let host1 = Worker::spawn(&cluster.url(0), &[("east", east.path())], &R3);
    let host2 = Worker::spawn(&cluster.url(2), &[("west", west.path())], &R3);
    assert_ne!(host1.home(), host2.home());
    rt().block_on(async {
        let client = cluster.client(1).await;
        host1.wait_ready(&client).await;
        host2.wait_ready(&client).await;
    });
    for (id, root) in [("east", east.path()), ("west", west.path())] {
        for submit in ["durable", "request"] {
            let request = request_json(
                &format!("host-{id}-{submit}"),
                "status",
                json!({"workspace_id": id}),
                json!({"kind": "structured_action", "payload": {}}),
            );
            let out = run_ops_with_timeout(
                &[
                    "ops",
                    "--json",
                    "--transport",
                    "nats",
                    "--submit",
                    submit,
                    "--nats-url",
                    &cluster.url(1),
                    // The worker registered on another server a moment ago: the registry's
                    // copy here may not have it yet, and waiting for it is what an adapter
                    // does for a worker just started.
                    "--wait-for-worker",
                    "--timeout",
                    "50",
                ],
                &request.to_string(),
                &[],
                Duration::from_secs(60),
            );
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let result: Value = serde_json::from_slice(&out.stdout).expect("OpsResult");
            assert_eq!(result["status"], "succeeded", "{result:#}");
            let answered_root = result["workspace_ref"]["root_path"]
                .as_str()
                .expect("root_path");
            assert_eq!(
                std::fs::canonicalize(answered_root).expect("root"),
                std::fs::canonicalize(root).expect("root"),
                "{id} answered from its own host's root ({submit})"
            );
        }
    }
}
