//! Tenants that cannot reach each other: a nats-server started with
//! `deploy/nats-server.conf`, a worker serving `shop` and `other`, and the `adapter-shop`
//! user trying every way into `other`. Each attempt is either refused by the server (the
//! permission error is asserted, not a silence or a timeout) or answered by the worker with
//! `workspace_mismatch`; afterwards nothing of `other` changed (no frames, no result keys,
//! no session written) and the legitimate path of `shop` still works, including the replay
//! of its own frames through the bridge.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::acl::{
    ADAPTER, MISSION_CONTROL, Role, WORKER, connect, publish_denied, subscribe_denied,
};
use common::{NatsServer, Worker, Workspace, repo_root, request_json, rt, run_ops_with_timeout};
use futures::StreamExt;
use millracer::bus::subjects::{self, JobClass};
use serde_json::{Value, json};

// The roles of `deploy/nats-server.conf` and their permission-error probes are shared with
// `tests/access.rs` (`tests/common/acl.rs`).
const SHOP: Role = ADAPTER;

/// A core request as the adapter; the OpsResult it gets back.
async fn core(client: &async_nats::Client, subject: String, request: &Value) -> Value {
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request(subject, request.to_string().into()),
    )
    .await
    .expect("an answer within 30 s")
    .expect("an answer");
    serde_json::from_slice(&reply.payload).expect("OpsResult JSON")
}

/// A durable submission as the adapter, with the documented message id.
async fn durable(js: &jetstream::Context, subject: String, workspace: &str, request: &Value) {
    let id = request["request_id"].as_str().expect("request_id");
    let message = jetstream::message::PublishMessage::build()
        .payload(request.to_string().into())
        .message_id(subjects::result_key(Some(workspace), id));
    js.send_publish(subject, message)
        .await
        .expect("publish")
        .await
        .expect("stored by the jobs stream");
}

/// The finished record under `key`, read as the adapter (≤ 60 s).
async fn done(kv: &jetstream::kv::Store, key: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(bytes)) = kv.get(key).await
            && let Ok(record) = serde_json::from_slice::<Value>(&bytes)
            && record["state"] == "done"
        {
            return record;
        }
        assert!(Instant::now() < deadline, "no finished record under {key}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mismatch(result: &Value) {
    assert_eq!(result["status"], "failed", "{result:#}");
    assert_eq!(
        result["errors"][0]["code"], "workspace_mismatch",
        "{result:#}"
    );
}

/// Every key of the results bucket (read with the worker's rights).
async fn keys(kv: &jetstream::kv::Store) -> Vec<String> {
    let mut keys: Vec<String> = kv
        .keys()
        .await
        .expect("keys")
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    keys.sort();
    keys
}

/// How many frames the frames stream holds under `filter`.
async fn stored_frames(js: &jetstream::Context, filter: &str) -> usize {
    let stream = js
        .get_stream(subjects::FRAMES_STREAM)
        .await
        .expect("frames stream");
    let counts: Vec<usize> = stream
        .info_with_subjects(filter)
        .await
        .expect("stream info")
        .filter_map(|e| async move { e.ok().map(|(_, n)| n) })
        .collect()
        .await;
    counts.into_iter().sum()
}

#[test]
fn the_shop_adapter_cannot_reach_another_workspace() {
    let conf = std::fs::read_to_string(repo_root().join("deploy/nats-server.conf"))
        .expect("deploy/nats-server.conf");
    let nats = NatsServer::start_with_config(&conf);
    let shop = Workspace::init();
    let other = Workspace::init();
    let worker = Worker::spawn(
        &nats.url,
        &[("shop", shop.path()), ("other", other.path())],
        &[
            "--host-id",
            "test-host",
            "--nats-user",
            WORKER.0,
            "--nats-password",
            WORKER.1,
            "--inbox-prefix",
            WORKER.2,
        ],
    );
    let other_root = other.path().display().to_string();
    rt().block_on(async {
        let (admin, _) = connect(&nats, WORKER).await;
        let admin_js = jetstream::new(admin.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = admin_js.get_stream(subjects::JOBS_STREAM).await
                && stream
                    .consumer_info(subjects::jobs_consumer(
                        "other",
                        &subjects::fingerprint(
                            "test-host",
                            &millracer::millrace::workspace::resolve_path(other.path()),
                        ),
                        JobClass::Change,
                    ))
                    .await
                    .is_ok()
                && admin_js
                    .get_key_value(subjects::RESULTS_BUCKET)
                    .await
                    .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "worker never set up its consumers: {}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let admin_kv = admin_js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");

        let (adapter, mut v) = connect(&nats, SHOP).await;
        let js = jetstream::new(adapter.clone());
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("the adapter opens the results bucket");

        // The legitimate path, core and durable: an empty workspace_ref means `shop`.
        let ok = core(
            &adapter,
            subjects::request_by_id("shop"),
            &request_json("ok-core", "status", json!({}), json!({})),
        )
        .await;
        assert_eq!(ok["status"], "succeeded", "{ok:#}");
        assert_eq!(ok["workspace_ref"]["workspace_id"], "shop", "{ok:#}");
        durable(
            &js,
            subjects::jobs_by_id("shop", JobClass::Read),
            "shop",
            &request_json("ok-durable", "status", json!({}), json!({})),
        )
        .await;
        let record = done(&kv, &subjects::result_key(Some("shop"), "ok-durable")).await;
        assert_eq!(record["result"]["status"], "succeeded", "{record:#}");
        assert_eq!(record["result"]["workspace_ref"]["workspace_id"], "shop");
        // `other` has an (old) result the adapter must not read.
        let other_key = subjects::result_key(Some("other"), "secret-1");
        admin_kv
            .put(&other_key, r#"{"state":"done"}"#.into())
            .await
            .expect("the worker role stores");

        let keys_before = keys(&admin_kv).await;
        let other_frames_before =
            stored_frames(&admin_js, &subjects::frames_of_workspace(Some("other"))).await;

        // 1. A body naming another workspace, core: by id, by path, by its own id with
        //    another's path, a select_workspace naming `other` (in workspace_ref or in its
        //    payload), and the host-wide reads that would list `other`.
        let select = |workspace: Option<&str>| {
            let mut payload = json!({"session_id": "s-1"});
            if let Some(ws) = workspace {
                payload["workspace_id"] = json!(ws);
            }
            json!({"kind": "structured_action", "payload": payload})
        };
        for (id, wref, action, input) in [
            (
                "esc-core-id",
                json!({"workspace_id": "other"}),
                "status",
                json!({}),
            ),
            (
                "esc-core-path",
                json!({"root_path": other_root}),
                "status",
                json!({}),
            ),
            (
                "esc-core-both",
                json!({"workspace_id": "shop", "root_path": other_root}),
                "status",
                json!({}),
            ),
            (
                "esc-core-select-ref",
                json!({"workspace_id": "other"}),
                "select_workspace",
                select(Some("shop")),
            ),
            (
                "esc-core-select-payload",
                json!({}),
                "select_workspace",
                select(Some("other")),
            ),
            ("esc-core-sessions", json!({}), "list_sessions", json!({})),
            (
                "esc-core-workspaces",
                json!({}),
                "list_workspaces",
                json!({}),
            ),
        ] {
            let result = core(
                &adapter,
                subjects::request_by_id("shop"),
                &request_json(id, action, wref, input),
            )
            .await;
            mismatch(&result);
        }

        // 2. The same on the durable path, by id and by path (read and change), and an
        //    enqueue: answered in `shop`'s keys, never run, nothing under `other`.
        for (id, wref, action, class) in [
            (
                "esc-jobs-id",
                json!({"workspace_id": "other"}),
                "status",
                JobClass::Read,
            ),
            (
                "esc-jobs-path",
                json!({"root_path": other_root}),
                "status",
                JobClass::Read,
            ),
            (
                "esc-jobs-enqueue",
                json!({"workspace_id": "other"}),
                "enqueue",
                JobClass::Change,
            ),
        ] {
            let mut request = request_json(
                id,
                action,
                wref,
                json!({"kind": "natural_language", "text": "delete everything"}),
            );
            request["route_preference"] = json!("millrace");
            durable(&js, subjects::jobs_by_id("shop", class), "shop", &request).await;
            let record = done(&kv, &subjects::result_key(Some("shop"), id)).await;
            mismatch(&record["result"]);
        }
        // A request_id built to look like another workspace's key stays inside `shop`.
        durable(
            &js,
            subjects::jobs_by_id("shop", JobClass::Read),
            "shop",
            &request_json("other.secret-1", "status", json!({}), json!({})),
        )
        .await;
        let record = done(&kv, &subjects::result_key(Some("shop"), "other.secret-1")).await;
        assert_eq!(record["result"]["status"], "succeeded", "{record:#}");

        // 3. Another workspace's subjects and the trusted workspace-less ones: refused.
        for subject in [
            subjects::request_by_id("other"),
            subjects::request_any(),
            subjects::jobs_by_id("other", JobClass::Read),
            subjects::jobs_by_id("other", JobClass::Change),
            subjects::jobs_any(),
        ] {
            publish_denied(&adapter, &mut v, &subject).await;
        }

        // 4. Other roles' replies: the shared `_INBOX.>` and another role's prefix.
        for subject in [
            "_INBOX.>",
            "_INBOX_mission_control.>",
            "_INBOX_adapter_other.>",
            "_INBOX_worker.>",
        ] {
            subscribe_denied(&adapter, &mut v, subject).await;
        }

        // 5. Another workspace's result key (direct get by subject, and the message get
        //    whose subject hides in the body) and frames (live and replayed).
        let direct = format!(
            "$JS.API.DIRECT.GET.KV_{}.$KV.{}.{other_key}",
            subjects::RESULTS_BUCKET,
            subjects::RESULTS_BUCKET
        );
        let read = tokio::time::timeout(Duration::from_secs(3), kv.get(&other_key)).await;
        assert!(
            !matches!(read, Ok(Ok(Some(_)))),
            "the adapter read another workspace's result: {read:?}"
        );
        v.expect("Publish", &direct).await;
        publish_denied(
            &adapter,
            &mut v,
            &format!("$JS.API.STREAM.MSG.GET.KV_{}", subjects::RESULTS_BUCKET),
        )
        .await;
        for subject in [
            subjects::frames_of_workspace(Some("other")),
            subjects::frames_of_workspace(None),
            subjects::frames_of_request("ok-core"),
        ] {
            subscribe_denied(&adapter, &mut v, &subject).await;
        }
        for subject in [
            format!(
                "$JS.API.CONSUMER.CREATE.{}.peek.{}",
                subjects::FRAMES_STREAM,
                subjects::frames_of_workspace(Some("other"))
            ),
            format!(
                "$JS.API.CONSUMER.CREATE.{}.peek.{}",
                subjects::FRAMES_STREAM,
                subjects::frames_of_workspace(None)
            ),
            format!("$JS.API.CONSUMER.CREATE.{}", subjects::FRAMES_STREAM),
        ] {
            publish_denied(&adapter, &mut v, &subject).await;
        }

        // 6. Forging: frames, results, acks, answers to discovery or to another role.
        for subject in [
            subjects::frames(Some("shop"), "ok-core"),
            subjects::frames(Some("other"), "forged"),
            format!("$KV.{}.{other_key}", subjects::RESULTS_BUCKET),
            format!(
                "$KV.{}.{}",
                subjects::RESULTS_BUCKET,
                subjects::result_key(Some("shop"), "forged")
            ),
            format!(
                "$JS.ACK.{}.ws-other-change.1.1.1.1.0",
                subjects::JOBS_STREAM
            ),
            "_INBOX_mission_control.answer".to_string(),
            "_INBOX.answer".to_string(),
        ] {
            publish_denied(&adapter, &mut v, &subject).await;
        }
        for subject in ["$SRV.>", "$SRV.PING.millracer", "millracer.ops.v0_2.req.>"] {
            subscribe_denied(&adapter, &mut v, subject).await;
        }

        // Nothing of `other` changed: no frame, no result key beyond `shop`'s answers.
        assert_eq!(
            stored_frames(&admin_js, &subjects::frames_of_workspace(Some("other"))).await,
            other_frames_before,
            "frames were published for `other`"
        );
        let keys_after = keys(&admin_kv).await;
        let new: Vec<&String> = keys_after
            .iter()
            .filter(|k| !keys_before.contains(k))
            .collect();
        assert!(
            new.iter().all(|k| k.starts_with("shop.")),
            "keys outside `shop`: {new:?}"
        );
        // Results of requests that change state are kept by request_id, core and durable
        // (2 core `select_workspace`); every durable answer is stored for its caller (4,
        // one of them under its hashed id); core reads are not kept.
        assert_eq!(new.len(), 6, "one key per kept attempt in `shop`: {new:?}");
        assert!(
            keys_after
                .iter()
                .filter(|k| k.starts_with("other."))
                .count()
                == 1,
            "{keys_after:?}"
        );
        assert!(
            !worker.home().join(".millracer/sessions.json").exists(),
            "select_workspace for another workspace wrote the session store"
        );
        let unclaimed = v.unclaimed();
        assert!(
            unclaimed.is_empty(),
            "unexpected server errors: {unclaimed:?}"
        );
    });

    // The legitimate path still works through the bridge: its own workspace's result and
    // the replay of its frames, as the adapter.
    let out = run_ops_with_timeout(
        &[
            "ops",
            "--stream-json",
            "--attach",
            "ok-durable",
            "--attach-workspace",
            "shop",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
            "--nats-user",
            SHOP.0,
            "--nats-password",
            SHOP.1,
            "--inbox-prefix",
            SHOP.2,
        ],
        "",
        &[],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}\nworker: {}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let finished = lines
        .iter()
        .filter(|l| l["event_type"] == "request.finished")
        .count();
    assert_eq!(finished, 1, "replayed frames: {stdout}");
    assert_eq!(
        lines.last().map(|l| l["status"].clone()),
        Some(json!("succeeded"))
    );
    rt().block_on(async {
        let (mission, _) = connect(&nats, MISSION_CONTROL).await;
        let kv = jetstream::new(mission)
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("mission control opens the bucket");
        assert!(
            kv.get(subjects::result_key(Some("other"), "secret-1"))
                .await
                .expect("mission control reads every workspace")
                .is_some()
        );
    });
}
