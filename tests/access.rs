//! Access control: a nats-server started with `deploy/nats-server.conf` (the documented
//! roles) lets an adapter scoped to one workspace submit requests and read its frames and
//! results, and nothing more: it cannot publish frames or results, nor read another
//! workspace's frames, nor submit for another workspace; Mission Control reads everything and
//! changes nothing. Every refusal is the server's permission error, and afterwards the
//! streams and the results bucket hold what they held before.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::acl::{self, ADAPTER, MISSION_CONTROL, WORKER};
use common::{
    NatsServer, REQUEST_ANY_SUBJECT, Worker, Workspace, repo_root, request_json, rt,
    run_ops_with_timeout,
};
use futures::StreamExt;
use millracer::bus::subjects::{self, JobClass};
use serde_json::json;

#[test]
fn an_adapter_submits_for_its_workspace_and_can_forge_or_read_nothing_else() {
    let conf = std::fs::read_to_string(repo_root().join("deploy/nats-server.conf"))
        .expect("deploy/nats-server.conf");
    let nats = NatsServer::start_with_config(&conf);
    let shop = Workspace::init();
    let worker = Worker::spawn(
        &nats.url,
        &[("shop", shop.path())],
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
    rt().block_on(async {
        // Ready when its durable consumers exist.
        let (admin, _) = acl::connect(&nats, WORKER).await;
        let js = jetstream::new(admin.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(stream) = js.get_stream(subjects::JOBS_STREAM).await
                && stream
                    .consumer_info(subjects::jobs_consumer(
                        "shop",
                        &subjects::fingerprint(
                            "test-host",
                            &millracer::millrace::workspace::resolve_path(shop.path()),
                        ),
                        JobClass::Read,
                    ))
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
    });

    // The adapter submits a durable request for its workspace through the bridge.
    let request = request_json(
        "acl-1",
        "status",
        json!({"workspace_id": "shop"}),
        json!({}),
    );
    let out = run_ops_with_timeout(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
            "--nats-user",
            ADAPTER.0,
            "--nats-password",
            ADAPTER.1,
            "--inbox-prefix",
            ADAPTER.2,
        ],
        &request.to_string(),
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}\nworker: {}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("result JSON");
    assert_eq!(result["status"], "succeeded", "{result:#}");

    rt().block_on(async {
        let (adapter, mut adapter_errors) = acl::connect(&nats, ADAPTER).await;
        let (worker_role, _) = acl::connect(&nats, WORKER).await;
        let (mission, mut mission_errors) = acl::connect(&nats, MISSION_CONTROL).await;
        let admin_js = jetstream::new(worker_role.clone());
        let before = counts(&admin_js).await;
        let wait = Duration::from_secs(10);

        // Frames of its own workspace: readable.
        let mut own = adapter
            .subscribe(subjects::frames_of_workspace(Some("shop")))
            .await
            .expect("subscribe own frames");
        // Another workspace's frames: the server refuses the subscription.
        acl::subscribe_denied(
            &adapter,
            &mut adapter_errors,
            &subjects::frames_of_workspace(Some("other")),
        )
        .await;
        let mut everything = mission
            .subscribe(subjects::frames_of_workspace(None))
            .await
            .expect("mission control subscribes to all frames");
        // A flush only writes the subscriptions out; a round trip on each connection (the
        // server answers in order) proves the server has them before anyone publishes.
        for client in [&adapter, &mission] {
            client
                .request("$JS.API.INFO", "".into())
                .await
                .expect("a round trip on the subscriber's connection");
        }

        worker_role
            .publish(subjects::frames(Some("shop"), "real-1"), "{}".into())
            .await
            .expect("worker publishes a frame");
        worker_role
            .publish(subjects::frames(Some("other"), "real-2"), "{}".into())
            .await
            .expect("worker publishes a frame");
        worker_role.flush().await.expect("flush");
        let first = next_subject(&mut own, wait).await;
        assert_eq!(first, subjects::frames(Some("shop"), "real-1"));
        // Mission Control saw both real frames.
        assert_eq!(
            next_subject(&mut everything, wait).await,
            subjects::frames(Some("shop"), "real-1")
        );
        assert_eq!(
            next_subject(&mut everything, wait).await,
            subjects::frames(Some("other"), "real-2")
        );

        // The adapter cannot forge a frame: the server refuses the publish.
        acl::publish_denied(
            &adapter,
            &mut adapter_errors,
            &subjects::frames(Some("shop"), "forged"),
        )
        .await;

        // The adapter cannot write a result: refused, and the key does not exist.
        let adapter_js = jetstream::new(adapter.clone());
        let kv = adapter_js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("the adapter may open the results bucket to read");
        let forged_key = subjects::result_key(Some("shop"), "forged-1");
        let forged = tokio::time::timeout(
            Duration::from_secs(5),
            kv.put(forged_key.clone(), "{\"state\":\"done\"}".into()),
        )
        .await;
        assert!(
            !matches!(forged, Ok(Ok(_))),
            "adapter stored a result: {forged:?}"
        );
        adapter_errors
            .expect(
                "Publish",
                &format!("$KV.{}.{forged_key}", subjects::RESULTS_BUCKET),
            )
            .await;
        let admin_kv = admin_js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        assert!(admin_kv.get(&forged_key).await.expect("read").is_none());
        // It reads its own result.
        assert!(
            kv.get(subjects::result_key(Some("shop"), "acl-1"))
                .await
                .expect("read")
                .is_some()
        );

        // The adapter cannot submit for another workspace: refused.
        acl::publish_denied(
            &adapter,
            &mut adapter_errors,
            &subjects::jobs_by_id("other", JobClass::Read),
        )
        .await;

        // Mission Control reads, and changes nothing: every way to submit, answer, forge or
        // delete is refused by the server.
        let mission_kv = jetstream::new(mission.clone())
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("mission control opens the results bucket");
        assert!(
            mission_kv
                .get(subjects::result_key(Some("shop"), "acl-1"))
                .await
                .expect("mission control reads a result")
                .is_some()
        );
        for subject in [
            subjects::jobs_by_id("shop", JobClass::Change),
            subjects::jobs_by_id("shop", JobClass::Read),
            subjects::request_by_id("shop"),
            REQUEST_ANY_SUBJECT.to_string(),
            subjects::frames(Some("shop"), "forged-by-mc"),
            format!(
                "$KV.{}.{}",
                subjects::RESULTS_BUCKET,
                subjects::result_key(Some("shop"), "mc-1")
            ),
            format!("$JS.API.STREAM.DELETE.{}", subjects::JOBS_STREAM),
            format!("$JS.API.STREAM.PURGE.{}", subjects::FRAMES_STREAM),
            format!(
                "$JS.API.CONSUMER.DELETE.{}.{}",
                subjects::JOBS_STREAM,
                subjects::jobs_consumer(
                    "shop",
                    &subjects::fingerprint(
                        "test-host",
                        &millracer::millrace::workspace::resolve_path(shop.path()),
                    ),
                    JobClass::Read
                )
            ),
            format!("$JS.ACK.{}.x.1.1.1.1.1", subjects::JOBS_STREAM),
        ] {
            acl::publish_denied(&mission, &mut mission_errors, &subject).await;
        }
        // And it cannot take requests meant for workers.
        acl::subscribe_denied(&mission, &mut mission_errors, "millracer.ops.v0_2.req.>").await;

        // Nothing changed: the real frames were live only (core publishes of the worker role
        // are stored too, so count them), no job was stored, no result key was added, the
        // worker's consumers are all there.
        let after = counts(&admin_js).await;
        assert_eq!(after.jobs, before.jobs, "no job was stored");
        assert_eq!(after.results, before.results, "no result was stored");
        assert_eq!(
            after.frames,
            before.frames + 2,
            "only the worker role's two frames were stored"
        );
        let stream = admin_js
            .get_stream(subjects::JOBS_STREAM)
            .await
            .expect("jobs stream still there");
        for class in [JobClass::Change, JobClass::Read] {
            stream
                .consumer_info(subjects::jobs_consumer(
                    "shop",
                    &subjects::fingerprint(
                        "test-host",
                        &millracer::millrace::workspace::resolve_path(shop.path()),
                    ),
                    class,
                ))
                .await
                .expect("the worker's consumer is still there");
        }
    });
}

/// Messages stored in the jobs and frames streams and the results bucket.
struct Counts {
    jobs: u64,
    frames: u64,
    results: u64,
}

async fn counts(js: &jetstream::Context) -> Counts {
    let count = async |name: &str| {
        js.get_stream(name)
            .await
            .unwrap_or_else(|err| panic!("stream {name}: {err}"))
            .info()
            .await
            .unwrap_or_else(|err| panic!("stream {name} info: {err}"))
            .state
            .messages
    };
    Counts {
        jobs: count(subjects::JOBS_STREAM).await,
        frames: count(subjects::FRAMES_STREAM).await,
        results: count(&format!("KV_{}", subjects::RESULTS_BUCKET)).await,
    }
}

/// The subject of the next message on `sub`; fails the test after `limit`.
async fn next_subject(sub: &mut async_nats::Subscriber, limit: Duration) -> String {
    match tokio::time::timeout(limit, sub.next()).await {
        Ok(Some(message)) => message.subject.to_string(),
        _ => panic!("no message within {limit:?}"),
    }
}

/// Runs `openssl` with `args` in `dir`, failing the test on error.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn status_request(id: &str) -> String {
    request_json(id, "status", json!({"workspace_id": "shop"}), json!({})).to_string()
}

#[test]
fn worker_and_bridge_authenticate_with_an_nkey_seed_file() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let conf = format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    );
    let nats = NatsServer::start_with_config(&conf);
    let dir = tempfile::tempdir().expect("dir");
    let seed_file = common::write_file(dir.path(), "user.nk", &format!("{seed}\n"));
    let seed_arg = seed_file.display().to_string();
    let shop = Workspace::init();
    let worker = Worker::spawn(
        &nats.url,
        &[("shop", shop.path())],
        &["--nats-nkey", &seed_arg],
    );
    let ok = || {
        run_ops_with_timeout(
            &[
                "ops",
                "--json",
                "--transport",
                "nats",
                "--nats-url",
                &nats.url,
                "--nats-nkey",
                &seed_arg,
            ],
            &status_request("nkey-1"),
            &[],
            Duration::from_secs(60),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = ok();
        if out.status.code() == Some(0) || Instant::now() >= deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    // Without the key: refused, "no bus" (exit 3).
    let out = run_ops_with_timeout(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
        ],
        &status_request("nkey-2"),
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn worker_and_bridge_speak_mutual_tls() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=millracer test CA",
        ],
    );
    std::fs::write(
        d.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext");
    for name in ["server", "client"] {
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
        );
    }
    let path = |f: &str| d.join(f).display().to_string();
    let conf = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 5 }}\n",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    );
    let nats = NatsServer::start_with_config(&conf);
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let tls = [
        "--nats-tls-ca",
        ca.as_str(),
        "--nats-tls-cert",
        cert.as_str(),
        "--nats-tls-key",
        key.as_str(),
        "--nats-tls-required",
    ];
    let shop = Workspace::init();
    let worker = Worker::spawn(&nats.url, &[("shop", shop.path())], &tls);
    let mut args = vec![
        "ops",
        "--json",
        "--transport",
        "nats",
        "--nats-url",
        nats.url.as_str(),
    ];
    args.extend(tls);
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = run_ops_with_timeout(
            &args,
            &status_request("tls-1"),
            &[],
            Duration::from_secs(60),
        );
        if out.status.code() == Some(0) || Instant::now() >= deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    // Without a client certificate the server refuses the bridge.
    let out = run_ops_with_timeout(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
            "--nats-tls-ca",
            &ca,
        ],
        &status_request("tls-2"),
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
