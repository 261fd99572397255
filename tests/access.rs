//! Access control: a nats-server started with `deploy/nats-server.conf` (the documented
//! roles) lets an adapter scoped to one workspace submit requests and read its frames and
//! results, and nothing more: it cannot publish frames or results, nor read another
//! workspace's frames, nor submit for another workspace.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::{NatsServer, Worker, Workspace, repo_root, request_json, rt, run_ops_with_timeout};
use futures::StreamExt;
use millracer::bus::subjects::{self, JobClass};
use serde_json::json;

/// User, password and reply inbox prefix of each role in `deploy/nats-server.conf`.
const WORKER: (&str, &str, &str) = ("worker", "worker-change-me", "_INBOX_worker");
const ADAPTER: (&str, &str, &str) = ("adapter-shop", "adapter-change-me", "_INBOX_adapter_shop");
const MISSION_CONTROL: (&str, &str, &str) = (
    "mission-control",
    "mission-control-change-me",
    "_INBOX_mission_control",
);

async fn as_user(
    nats: &NatsServer,
    (user, password, inbox): (&str, &str, &str),
) -> async_nats::Client {
    nats.client_with(
        async_nats::ConnectOptions::with_user_and_password(user.to_string(), password.to_string())
            .custom_inbox_prefix(inbox),
    )
    .await
}

/// Whether `sub` receives anything within `wait`.
async fn receives(sub: &mut async_nats::Subscriber, wait: Duration) -> bool {
    matches!(tokio::time::timeout(wait, sub.next()).await, Ok(Some(_)))
}

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
        let admin = as_user(&nats, WORKER).await;
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
        let adapter = as_user(&nats, ADAPTER).await;
        let worker_role = as_user(&nats, WORKER).await;
        let mission = as_user(&nats, MISSION_CONTROL).await;
        let wait = Duration::from_millis(1500);

        // Frames of its own workspace: readable.
        let mut own = adapter
            .subscribe(subjects::frames_of_workspace(Some("shop")))
            .await
            .expect("subscribe own frames");
        // Another workspace's frames: the server refuses the subscription.
        let mut other = adapter
            .subscribe(subjects::frames_of_workspace(Some("other")))
            .await
            .expect("subscribe call itself returns");
        let mut everything = mission
            .subscribe(subjects::frames_of_workspace(None))
            .await
            .expect("mission control subscribes to all frames");
        adapter.flush().await.expect("flush");
        mission.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(200)).await;

        worker_role
            .publish(subjects::frames(Some("shop"), "real-1"), "{}".into())
            .await
            .expect("worker publishes a frame");
        worker_role
            .publish(subjects::frames(Some("other"), "real-2"), "{}".into())
            .await
            .expect("worker publishes a frame");
        worker_role.flush().await.expect("flush");
        assert!(
            receives(&mut own, wait).await,
            "adapter reads its workspace's frames"
        );
        assert!(
            !receives(&mut other, wait).await,
            "adapter must not read another workspace's frames"
        );
        // Mission Control saw both real frames.
        assert!(receives(&mut everything, wait).await);
        assert!(receives(&mut everything, wait).await);

        // The adapter cannot forge a frame: nobody receives it.
        adapter
            .publish(subjects::frames(Some("shop"), "forged"), "{}".into())
            .await
            .expect("publish call itself returns");
        adapter.flush().await.expect("flush");
        assert!(
            !receives(&mut everything, wait).await,
            "a forged frame reached subscribers"
        );

        // The adapter cannot write a result.
        let adapter_js = jetstream::new(adapter.clone());
        let kv = adapter_js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("the adapter may open the results bucket to read");
        let forged = tokio::time::timeout(
            Duration::from_secs(5),
            kv.put(
                subjects::result_key(Some("shop"), "forged-1"),
                "{\"state\":\"done\"}".into(),
            ),
        )
        .await;
        assert!(
            !matches!(forged, Ok(Ok(_))),
            "adapter stored a result: {forged:?}"
        );
        let admin_kv = jetstream::new(worker_role.clone())
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        assert!(
            admin_kv
                .get(subjects::result_key(Some("shop"), "forged-1"))
                .await
                .expect("read")
                .is_none()
        );
        // It reads its own result.
        assert!(
            kv.get(subjects::result_key(Some("shop"), "acl-1"))
                .await
                .expect("read")
                .is_some()
        );

        // The adapter cannot submit for another workspace.
        let other_job = tokio::time::timeout(Duration::from_secs(5), async {
            adapter_js
                .publish(
                    subjects::jobs_by_id("other", JobClass::Read),
                    request.to_string().into(),
                )
                .await?
                .await
                .map_err(async_nats::Error::from)
        })
        .await;
        assert!(
            !matches!(other_job, Ok(Ok(_))),
            "adapter submitted for another workspace"
        );
    });
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
