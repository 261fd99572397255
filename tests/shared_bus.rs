//! One bus for many operators: workspace identity (unnamed workspaces get host-scoped
//! ids, a collision is refused with exit 2), the registry of served workspaces (no worker →
//! exit 3 at once, `--wait-for-worker` waits), the bus's view (`list_workspaces` on
//! `req.any`, `$SRV.STATS` counting durable requests, results kept as long as their action needs),
//! a bounded stop with the broker gone, and no silently degraded worker without JetStream
//! (`--core-only` is explicit). Real nats-server, real millrace.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{NatsServer, Worker, Workspace, request_json, rt, run_ops_with_timeout};
use millracer::bus::subjects;
use millracer::contract::token;
use millracer::millrace::workspace::resolve_path;
use serde_json::{Value, json};

const HOST: &str = "test-host";

/// The id an unnamed `--workspace PATH` gets on host [`HOST`].
fn unnamed_id(path: &Path) -> String {
    let root = resolve_path(path);
    token::unnamed_workspace_id(&root, &token::fingerprint(HOST, &root))
}

fn unnamed_worker(nats: &NatsServer, path: &Path, extra: &[&str]) -> Worker {
    let path = path.display().to_string();
    let mut args = vec!["--host-id", HOST, "--workspace", path.as_str()];
    args.extend_from_slice(extra);
    Worker::spawn(&nats.url, &[], &args)
}

fn status_for(id: &str, request_id: &str) -> String {
    request_json(
        request_id,
        "status",
        json!({"workspace_id": id}),
        json!({"kind": "structured_action", "payload": {}}),
    )
    .to_string()
}

/// An `enqueue` without text: it takes the workspace's lane and is answered
/// `invalid_input` at once, so it stands for any request that changes state.
fn change_for(id: &str, request_id: &str) -> String {
    let mut request = request_json(
        request_id,
        "enqueue",
        json!({"workspace_id": id}),
        json!({}),
    );
    request["route_preference"] = json!("millrace");
    request.to_string()
}

/// The record stored under the workspace's key for `request_id`, waited for (≤ 10 s).
async fn stored(kv: &jetstream::kv::Store, workspace: &str, request_id: &str) -> Value {
    let key = subjects::result_key(Some(workspace), request_id);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(entry) = kv.get(&key).await.expect("kv get") {
            return parse(&entry);
        }
        assert!(Instant::now() < deadline, "{key} never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ops(nats: &NatsServer, extra: &[&str], stdin: &str) -> std::process::Output {
    let mut args = vec![
        "ops",
        "--json",
        "--transport",
        "nats",
        "--nats-url",
        nats.url.as_str(),
    ];
    args.extend_from_slice(extra);
    run_ops_with_timeout(&args, stdin, &[], Duration::from_secs(60))
}

fn parse(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {:?}",
            String::from_utf8_lossy(bytes)
                .chars()
                .take(2000)
                .collect::<String>()
        )
    })
}

/// Waits (bounded) until the worker's log holds `needle`.
fn wait_for_log(worker: &Worker, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !worker.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the worker never logged {needle:?} within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn list_workspaces_any(client: &async_nats::Client, n: usize) -> Value {
    let request = request_json(
        &format!("lw-{n}"),
        "list_workspaces",
        json!({}),
        json!({"kind": "structured_action", "payload": {}}),
    );
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(subjects::request_any(), request.to_string().into()),
    )
    .await
    .expect("answered within 10 s")
    .expect("a worker answers req.any");
    parse(&reply.payload)
}

fn ids_in(answer: &Value) -> Vec<(String, bool, usize)> {
    answer["result"]["workspaces"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|w| {
                    (
                        w["workspace_id"].as_str().unwrap_or_default().to_string(),
                        w["live"].as_bool().unwrap_or(false),
                        w["owners"].as_array().map_or(0, Vec::len),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_unnamed_workers_on_different_paths_both_serve_from_their_own_directory() {
    let nats = NatsServer::start();
    let (a, b) = (Workspace::init(), Workspace::init());
    let wa = unnamed_worker(&nats, a.path(), &[]);
    let wb = unnamed_worker(&nats, b.path(), &[]);
    rt().block_on(async {
        let client = nats.client().await;
        wa.wait_ready(&client).await;
        wb.wait_ready(&client).await;
    });
    let (ida, idb) = (unnamed_id(a.path()), unnamed_id(b.path()));
    assert_ne!(ida, idb);
    assert!(ida != "default" && idb != "default");
    // Both kept durable intake on (no consumer fight).
    for w in [&wa, &wb] {
        wait_for_log(w, "worker ready", Duration::from_secs(15));
        assert!(
            w.log()
                .contains("durable intake (JetStream) and core request/reply"),
            "durable intake is on: {}",
            w.log()
        );
    }
    for round in 0..3 {
        for (id, ws) in [(&ida, &a), (&idb, &b)] {
            let out = ops(&nats, &[], &status_for(id, &format!("st-{id}-{round}")));
            assert_eq!(
                out.status.code(),
                Some(0),
                "stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let result = parse(&out.stdout);
            assert_eq!(result["status"], "succeeded", "{result}");
            assert_eq!(
                result["workspace_ref"]["root_path"],
                resolve_path(ws.path()).display().to_string(),
                "answered from its own directory: {result}"
            );
        }
    }
}

#[test]
fn the_same_id_at_another_path_is_refused_with_exit_2() {
    let nats = NatsServer::start();
    let (a, b) = (Workspace::init(), Workspace::init());
    let first = Worker::spawn(&nats.url, &[("shop", a.path())], &["--host-id", HOST]);
    rt().block_on(async { first.wait_ready(&nats.client().await).await });
    let mut second = Worker::spawn(&nats.url, &[("shop", b.path())], &["--host-id", HOST]);
    let status = second
        .wait_exit(Duration::from_secs(30))
        .expect("the colliding worker exits");
    assert_eq!(status.code(), Some(2), "log: {}", second.log());
    let log = second.log();
    assert!(log.contains("workspace collision"), "{log}");
    assert!(
        log.contains(&resolve_path(a.path()).display().to_string())
            && log.contains(&resolve_path(b.path()).display().to_string()),
        "both paths named: {log}"
    );
    assert!(log.contains(HOST), "the host is named: {log}");
    // The first worker still serves its workspace.
    let out = ops(&nats, &[], &status_for("shop", "after-collision"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        parse(&out.stdout)["workspace_ref"]["root_path"],
        resolve_path(a.path()).display().to_string()
    );
}

#[test]
fn a_workspace_nobody_serves_gets_exit_3_at_once() {
    let nats = NatsServer::start();
    let a = Workspace::init();
    let worker = Worker::spawn(&nats.url, &[("shop", a.path())], &[]);
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });
    // By id (durable by default) and by path (request/reply).
    let by_path = request_json(
        "unserved-path",
        "status",
        json!({"root_path": "/etc"}),
        json!({"kind": "structured_action", "payload": {}}),
    )
    .to_string();
    for (stdin, named) in [
        (status_for("nobody", "unserved-id"), "\"nobody\""),
        (by_path, "/etc"),
    ] {
        let started = Instant::now();
        let out = ops(&nats, &[], &stdin);
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
        assert!(
            stderr.contains("no live worker serves") && stderr.contains(named),
            "names the workspace: {stderr}"
        );
        assert!(stderr.contains("--wait-for-worker"), "{stderr}");
        assert!(
            took < Duration::from_secs(10),
            "answered, not waited: {took:?}"
        );
    }
}

#[test]
fn wait_for_worker_waits_until_a_worker_starts() {
    let nats = NatsServer::start();
    let (other, shop) = (Workspace::init(), Workspace::init());
    // A worker of another workspace: the bus has durable intake, nobody serves `shop`.
    let first = Worker::spawn(&nats.url, &[("other", other.path())], &[]);
    rt().block_on(async { first.wait_ready(&nats.client().await).await });
    let url = nats.url.clone();
    let waiting = std::thread::spawn(move || {
        run_ops_with_timeout(
            &[
                "ops",
                "--json",
                "--transport",
                "nats",
                "--nats-url",
                &url,
                "--wait-for-worker",
                "--timeout",
                "60",
            ],
            &status_for("shop", "waits-for-shop"),
            &[],
            Duration::from_secs(90),
        )
    });
    // The request is stored, waiting: then a worker for `shop` starts.
    rt().block_on(async {
        let js = jetstream::new(nats.client().await);
        let subject = subjects::jobs_by_id("shop", subjects::JobClass::Read);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut stream = js
                .get_stream(subjects::JOBS_STREAM)
                .await
                .expect("jobs stream");
            if stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .is_ok()
            {
                break;
            }
            let _ = stream.info().await;
            assert!(Instant::now() < deadline, "the request was never stored");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let second = Worker::spawn(&nats.url, &[("shop", shop.path())], &[]);
    let out = waiting.join().expect("ops thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.contains("waiting for one"), "{stderr}");
    let result = parse(&out.stdout);
    assert_eq!(
        result["workspace_ref"]["root_path"],
        resolve_path(shop.path()).display().to_string()
    );
    drop(second);
}

#[test]
fn list_workspaces_on_req_any_shows_every_workers_workspaces() {
    let nats = NatsServer::start();
    let (a, b) = (Workspace::init(), Workspace::init());
    let wa = Worker::spawn(&nats.url, &[("shop", a.path())], &[]);
    let wb = unnamed_worker(&nats, b.path(), &[]);
    let idb = unnamed_id(b.path());
    rt().block_on(async {
        let client = nats.client().await;
        wa.wait_ready(&client).await;
        wb.wait_ready(&client).await;
        // Whichever worker answers shows both (once each has seen the other's entry).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut n = 0;
        let mut in_a_row = 0;
        while in_a_row < 6 {
            n += 1;
            let answer = list_workspaces_any(&client, n).await;
            let ids = ids_in(&answer);
            let both = ["shop", idb.as_str()].iter().all(|want| {
                ids.iter()
                    .any(|(id, live, owners)| id == want && *live && *owners == 1)
            });
            in_a_row = if both { in_a_row + 1 } else { 0 };
            assert!(
                Instant::now() < deadline,
                "list_workspaces never showed both workers' workspaces: {answer}"
            );
            if !both {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // Through the bridge too.
    let request = request_json(
        "lw-bridge",
        "list_workspaces",
        json!({}),
        json!({"kind": "structured_action", "payload": {}}),
    )
    .to_string();
    let out = ops(&nats, &[], &request);
    assert_eq!(out.status.code(), Some(0));
    let ids = ids_in(&parse(&out.stdout));
    assert!(ids.iter().any(|(id, _, _)| id == "shop"), "{ids:?}");
    assert!(ids.iter().any(|(id, _, _)| id == &idb), "{ids:?}");
}

#[test]
fn srv_stats_counts_durable_requests_and_results_are_kept_as_long_as_their_action_needs() {
    let nats = NatsServer::start();
    let a = Workspace::init();
    let worker = Worker::spawn(
        &nats.url,
        &[("shop", a.path())],
        &["--read-result-keep-seconds", "2"],
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
    });
    let out = ops(&nats, &[], &status_for("shop", "durable-counted"));
    assert_eq!(out.status.code(), Some(0));
    rt().block_on(async {
        let client = nats.client().await;
        let stats = parse(
            &client
                .request("$SRV.STATS.millracer", Default::default())
                .await
                .expect("stats")
                .payload,
        );
        let endpoints = stats["endpoints"].as_array().expect("endpoints");
        let durable: Vec<&Value> = endpoints
            .iter()
            .filter(|e| e["name"].as_str().is_some_and(|n| n.starts_with("jobs-")))
            .collect();
        let counted: u64 = durable
            .iter()
            .map(|e| e["num_requests"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(counted, 1, "{stats}");
        assert!(
            durable
                .iter()
                .any(|e| e["processing_time"].as_u64().unwrap_or(0) > 0),
            "{stats}"
        );
        let info = parse(
            &client
                .request("$SRV.INFO.millracer", Default::default())
                .await
                .expect("info")
                .payload,
        );
        assert_eq!(info["metadata"]["workspaces"], "shop", "{info}");

        // A core request that changes state is kept under its scoped key too; a core read
        // is not (asked again, it is answered again).
        let reply = client
            .request(
                subjects::request_by_id("shop"),
                status_for("shop", "core-read").into(),
            )
            .await
            .expect("core reply");
        assert_eq!(parse(&reply.payload)["status"], "succeeded");
        let reply = client
            .request(
                subjects::request_by_id("shop"),
                change_for("shop", "core-kept").into(),
            )
            .await
            .expect("core reply");
        assert_eq!(
            parse(&reply.payload)["errors"][0]["code"],
            "invalid_input",
            "an enqueue without text"
        );
        let kv = jetstream::new(client.clone())
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("results bucket");
        let record = stored(&kv, "shop", "core-kept").await;
        assert_eq!(record["state"], "done");
        assert_eq!(record["result"]["request_id"], "core-kept");
        assert!(
            kv.get(subjects::result_key(Some("shop"), "core-read"))
                .await
                .expect("kv get")
                .is_none(),
            "a core read's answer is not kept"
        );

        // Durable: a change's answer stays for the bucket's retention; a read's is purged
        // after --read-result-keep-seconds (2 s here).
        let out = ops(&nats, &[], &change_for("shop", "durable-kept"));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = ops(&nats, &[], &status_for("shop", "durable-read"));
        assert_eq!(out.status.code(), Some(0));
        let deadline = Instant::now() + Duration::from_secs(30);
        while kv
            .get(subjects::result_key(Some("shop"), "durable-read"))
            .await
            .expect("kv get")
            .is_some()
        {
            assert!(
                Instant::now() < deadline,
                "a durable read's answer was not purged within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Stored before the read, so it would have been purged by now were it a read.
        let record = stored(&kv, "shop", "durable-kept").await;
        assert_eq!(record["result"]["request_id"], "durable-kept");
        assert!(
            kv.get(subjects::result_key(Some("shop"), "durable-counted"))
                .await
                .expect("kv get")
                .is_none(),
            "the first durable read's answer was purged too"
        );
    });
}

#[test]
fn sigterm_with_the_broker_gone_ends_the_worker_within_the_bound() {
    let mut nats = NatsServer::start();
    let a = Workspace::init();
    let mut worker = Worker::spawn(
        &nats.url,
        &[("shop", a.path())],
        &["--shutdown-timeout", "3"],
    );
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });
    nats.stop();
    let stopped = Instant::now();
    worker.sigterm();
    let status = worker
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("the worker did not exit after SIGTERM: {}", worker.log()));
    let took = stopped.elapsed();
    assert!(status.code().is_some(), "exited, not killed: {status}");
    assert!(
        took < Duration::from_secs(10),
        "bound 3 s, exited after {took:?}"
    );
    let log = worker.log();
    assert!(
        log.contains("stop bound reached"),
        "says what it left: {log}"
    );
}

#[test]
fn a_leftover_consumer_for_the_same_id_at_another_path_is_refused_with_exit_2() {
    let nats = NatsServer::start();
    let (a, b) = (Workspace::init(), Workspace::init());
    let mut first = Worker::spawn(&nats.url, &[("shop", a.path())], &["--host-id", HOST]);
    rt().block_on(async { first.wait_ready(&nats.client().await).await });
    first.kill_all();
    // Its registry entries gone (as 30 s after a crash): only its consumers are left.
    rt().block_on(async {
        use futures::TryStreamExt;
        let kv = jetstream::new(nats.client().await)
            .get_key_value(subjects::REGISTRY_BUCKET)
            .await
            .expect("registry bucket");
        let keys: Vec<String> = kv
            .keys()
            .await
            .expect("keys")
            .try_collect()
            .await
            .expect("keys");
        assert!(!keys.is_empty(), "the first worker registered");
        for key in keys {
            kv.purge(key).await.expect("purge");
        }
    });
    let mut second = Worker::spawn(&nats.url, &[("shop", b.path())], &["--host-id", HOST]);
    let status = second
        .wait_exit(Duration::from_secs(30))
        .expect("the colliding worker exits");
    assert_eq!(status.code(), Some(2), "log: {}", second.log());
    let log = second.log();
    assert!(log.contains("overlaps another worker's consumer"), "{log}");
    assert!(
        log.contains(&format!("{HOST}:{}", resolve_path(b.path()).display())),
        "names this worker's host and path: {log}"
    );
    assert!(log.contains("nats consumer rm MILLRACER_JOBS"), "{log}");
}

/// A nats-server without JetStream (core NATS only), killed on drop.
struct CoreOnlyServer {
    url: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl CoreOnlyServer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = std::process::Command::new(common::nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
            .arg(dir.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        let ports = dir.path().join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = loop {
            if let Ok(text) = std::fs::read_to_string(&ports)
                && let Ok(v) = serde_json::from_str::<Value>(&text)
                && let Some(url) = v["nats"].get(0).and_then(Value::as_str)
            {
                break url.to_string();
            }
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            url,
            child,
            _dir: dir,
        }
    }
}

impl Drop for CoreOnlyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn without_jetstream_the_worker_refuses_unless_core_only_is_asked_for() {
    let nats = CoreOnlyServer::start();
    let a = Workspace::init();
    let mut refused = Worker::spawn(&nats.url, &[("shop", a.path())], &[]);
    let status = refused
        .wait_exit(Duration::from_secs(45))
        .expect("a worker without durable intake does not keep running");
    // Exit 3: a broker this worker cannot use (see src/app/worker.rs), said as one ERROR.
    assert_eq!(status.code(), Some(3), "{}", refused.log());
    let log = refused.log();
    assert!(
        log.contains("has no JetStream") && log.contains("--core-only"),
        "{log}"
    );
    // Asked for explicitly: core request/reply serves.
    let core = Worker::spawn(&nats.url, &[("shop", a.path())], &["--core-only"]);
    rt().block_on(async {
        let client = async_nats::connect(&nats.url).await.expect("connect");
        core.wait_ready(&client).await;
        let reply = client
            .request(
                subjects::request_by_id("shop"),
                status_for("shop", "core-only-status").into(),
            )
            .await
            .expect("core reply");
        assert_eq!(parse(&reply.payload)["status"], "succeeded");
    });
    assert!(core.log().contains("--core-only"), "{}", core.log());
}
