//! First contact: what a new user sees at the default log level when the broker is not
//! there, comes late, has no JetStream or is too old; that the oldest supported
//! nats-server (2.10, `MILLRACER_TEST_NATS_SERVER_OLD`) serves the core scenarios; and that
//! the bridge says on stderr what it waits for; a request without a schema names the field.
//!
//! Each worker here runs without `RUST_LOG` (its default level) and every wait for a line
//! is bounded.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Workspace, millracer_bin, nats_server_bin, path_with_tools, request_json, run_ops};
use serde_json::{Value, json};
use tempfile::TempDir;

/// How long a state line may take to appear at the default log level.
const LINE_WITHIN: Duration = Duration::from_secs(2);

/// A port nothing listens on right now (bound, then released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A nats-server started by hand: `bin` on `port`, with JetStream in a temporary store
/// when `jetstream`. Killed on drop.
struct Broker {
    child: Child,
    url: String,
    store: TempDir,
}

impl Broker {
    fn start(bin: &Path, port: u16, jetstream: bool) -> Self {
        let store = tempfile::Builder::new()
            .prefix("millracer-fc-nats-")
            .tempdir()
            .expect("temp dir");
        let log = fs::File::create(store.path().join("nats-server.log")).expect("log file");
        let mut cmd = Command::new(bin);
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if jetstream {
            cmd.arg("-js").arg("-sd").arg(store.path());
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} did not listen on {port} within 10 s",
                bin.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            store,
        }
    }

    /// The names of the JetStream streams stored on disk (none for a broker nothing was
    /// created on).
    fn stored_streams(&self) -> Vec<String> {
        let mut names = Vec::new();
        let Ok(accounts) = fs::read_dir(self.store.path().join("jetstream")) else {
            return names;
        };
        for account in accounts.flatten() {
            if let Ok(streams) = fs::read_dir(account.path().join("streams")) {
                names.extend(
                    streams
                        .flatten()
                        .map(|s| s.file_name().to_string_lossy().into_owned()),
                );
            }
        }
        names
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `millracer worker` with the test environment but no `RUST_LOG` (its default level),
/// its output in a file. Killed on drop; its log printed when the test fails.
struct Worker {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Worker {
    fn spawn(url: &str, workspace: &Path, extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("millracer-fc-worker-")
            .tempdir()
            .expect("temp dir");
        let home = dir.path().join("home");
        fs::create_dir(&home).expect("home");
        let log = dir.path().join("worker.log");
        let file = fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(millracer_bin());
        for (key, _) in std::env::vars_os() {
            if let Some(key) = key.to_str()
                && (key.starts_with("MILLRACER_") || key == "RUST_LOG")
            {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .arg("worker")
            .arg("--nats-url")
            .arg(url)
            .arg("--workspace")
            .arg(format!("demo={}", workspace.display()))
            .args(extra)
            .env("PATH", path_with_tools())
            .env("HOME", &home)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log"))
            .stderr(file)
            .spawn()
            .expect("spawn millracer worker");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until a log line contains every one of `needles`; returns that line.
    fn wait_line(&self, needles: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(line) = self
                .log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needles:?} within {within:?}; the worker said:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll worker") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not exit within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- worker log -----\n{}\n----- end -----", self.log());
        }
    }
}

fn old_nats_server_bin() -> PathBuf {
    let path = std::env::var_os("MILLRACER_TEST_NATS_SERVER_OLD")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || common::repo_root().join(".venv-old/bin/nats-server"),
            PathBuf::from,
        );
    assert!(
        path.is_file(),
        "the oldest supported nats-server (2.10) not found at {}: run scripts/setup.sh",
        path.display()
    );
    path
}

fn status_request(id: &str) -> String {
    request_json(
        id,
        "status",
        json!({"workspace_id": "demo"}),
        json!({"kind": "structured_action", "payload": {}}),
    )
    .to_string()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn no_broker_is_said_at_once_and_a_late_broker_is_served() {
    let ws = Workspace::init();
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let ready = ws.path().join("ready.json");
    let ready_arg = ready.display().to_string();
    let worker = Worker::spawn(&url, ws.path(), &["--ready-file", &ready_arg]);
    let line = worker.wait_line(
        &[&format!(
            "cannot reach {url}: connection refused; retrying every 2 s"
        )],
        LINE_WITHIN,
    );
    assert!(line.contains("WARN"), "{line}");
    assert!(!ready.exists(), "ready file before the worker is ready");

    // Rate-limited: the same cause is not said again on every attempt.
    let broker = Broker::start(&nats_server_bin(), port, true);
    let line = worker.wait_line(
        &["worker ready: serving workspaces [demo]"],
        Duration::from_secs(10),
    );
    assert!(line.contains(&url), "{line}");
    assert!(
        line.contains("durable intake (JetStream) and core request/reply"),
        "{line}"
    );
    let refused = worker
        .log()
        .lines()
        .filter(|l| l.contains("cannot reach") && l.contains("connection refused"))
        .count();
    assert_eq!(
        refused,
        1,
        "said once while the cause stayed the same:\n{}",
        worker.log()
    );
    assert_eq!(
        worker.log().matches("worker ready").count(),
        1,
        "ready is said once"
    );

    // The ready file says what it serves, and goes away when the worker stops.
    let deadline = Instant::now() + LINE_WITHIN;
    while !ready.exists() {
        assert!(Instant::now() < deadline, "no ready file");
        std::thread::sleep(Duration::from_millis(20));
    }
    let said: Value = serde_json::from_str(&fs::read_to_string(&ready).expect("read ready file"))
        .expect("ready file is JSON");
    assert_eq!(said["workspaces"], json!(["demo"]));
    assert_eq!(said["durable"], json!(true));
    assert_eq!(said["url"], json!(url));

    let out = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &broker.url,
            "--timeout",
            "30",
        ],
        &status_request("fc-late-1"),
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let mut worker = worker;
    worker.sigterm();
    assert_eq!(worker.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert!(!ready.exists(), "the ready file is removed at stop");
}

#[test]
fn a_worker_still_waiting_for_its_broker_stops_cleanly_on_sigterm() {
    let ws = Workspace::init();
    let url = format!("nats://127.0.0.1:{}", free_port());
    let worker = Worker::spawn(&url, ws.path(), &[]);
    worker.wait_line(&["connection refused; retrying"], LINE_WITHIN);
    let mut worker = worker;
    worker.sigterm();
    // Not the signal's default action (killed by SIGTERM, no exit code): a stop it says.
    assert_eq!(
        worker.wait_exit(Duration::from_secs(20)).code(),
        Some(0),
        "{}",
        worker.log()
    );
    let log = worker.log();
    assert!(
        log.contains("SIGTERM received before the worker was ready; worker stopped"),
        "{log}"
    );
}

#[test]
fn a_broker_without_jetstream_is_refused_unless_core_only() {
    let ws = Workspace::init();
    let broker = Broker::start(&nats_server_bin(), free_port(), false);
    let mut worker = Worker::spawn(&broker.url, ws.path(), &[]);
    let line = worker.wait_line(&["ERROR", "has no JetStream"], LINE_WITHIN);
    assert!(
        line.contains("nats-server 2.15.1"),
        "names the version: {line}"
    );
    assert!(
        line.contains("-js") && line.contains("--core-only"),
        "says what to do: {line}"
    );
    assert_eq!(worker.wait_exit(Duration::from_secs(5)).code(), Some(3));

    let ready = ws.path().join("ready.json");
    let ready_arg = ready.display().to_string();
    let mut worker = Worker::spawn(
        &broker.url,
        ws.path(),
        &["--core-only", "--ready-file", &ready_arg],
    );
    worker.wait_line(&["worker ready", "core request/reply only"], LINE_WITHIN);
    worker.wait_line(&["ready file written"], LINE_WITHIN);
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--submit",
            "request",
            "--nats-url",
            &broker.url,
            "--timeout",
            "30",
        ],
        &status_request("fc-core-1"),
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout).expect("an OpsResult");
    assert_eq!(result["request_id"], "fc-core-1");
    let said: Value =
        serde_json::from_str(&fs::read_to_string(&ready).expect("ready file")).expect("JSON");
    assert_eq!(said["durable"], json!(false));
    worker.sigterm();
    assert_eq!(worker.wait_exit(Duration::from_secs(20)).code(), Some(0));
    assert!(!ready.exists());
}

#[test]
fn the_oldest_supported_server_serves_the_core_scenarios() {
    let bin = old_nats_server_bin();
    let version = text(
        &Command::new(&bin)
            .arg("--version")
            .output()
            .expect("version")
            .stdout,
    );
    assert!(version.contains("v2.10."), "not a 2.10 server: {version}");
    let ws = Workspace::init();
    let broker = Broker::start(&bin, free_port(), true);
    let worker = Worker::spawn(&broker.url, ws.path(), &[]);
    worker.wait_line(
        &[
            "worker ready",
            "nats-server 2.10.",
            "durable intake (JetStream)",
        ],
        Duration::from_secs(10),
    );
    let base = [
        "ops",
        "--json",
        "--transport",
        "nats",
        "--nats-url",
        &broker.url,
        "--timeout",
        "30",
    ];

    // status, durable (the jobs stream, the results bucket) then core request/reply.
    for (id, submit) in [("fc-old-durable", "durable"), ("fc-old-core", "request")] {
        let mut args = base.to_vec();
        args.extend(["--submit", submit]);
        let out = run_ops(&args, &status_request(id), &[]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{submit}: {}",
            text(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).expect("an OpsResult");
        assert_eq!(result["request_id"], id);
        assert_eq!(result["status"], "succeeded", "{result:#}");
    }
    // Sent again, the durable one is answered from the results bucket (a direct get).
    let out = run_ops(&base, &status_request("fc-old-durable"), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    // enqueue through the change consumer: an empty enqueue is refused with invalid_input.
    let mut enqueue = request_json(
        "fc-old-enqueue",
        "enqueue",
        json!({"workspace_id": "demo"}),
        json!({}),
    );
    enqueue["route_preference"] = json!("millrace");
    for submit in ["durable", "request"] {
        let mut args = base.to_vec();
        args.extend(["--submit", submit]);
        let mut request = enqueue.clone();
        request["request_id"] = json!(format!("fc-old-enqueue-{submit}"));
        let out = run_ops(&args, &request.to_string(), &[]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{submit}: {}",
            text(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).expect("an OpsResult");
        assert_eq!(result["errors"][0]["code"], "invalid_input", "{result:#}");
    }
    // Frames replayed from the frames stream (consumer create on 2.10).
    let out = run_ops(
        &[
            "ops",
            "--stream-json",
            "--transport",
            "nats",
            "--nats-url",
            &broker.url,
            "--timeout",
            "30",
        ],
        &status_request("fc-old-frames"),
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("\"request.finished\""), "{stdout}");
    assert!(!worker.log().contains("ERROR"), "{}", worker.log());
    // (What the 2.9 test reads to prove nothing was created there.)
    let streams = broker.stored_streams();
    assert!(streams.iter().any(|s| s == "MILLRACER_JOBS"), "{streams:?}");
}

#[test]
#[ignore = "needs a nats-server 2.9 binary (Debian bookworm's package is 2.9.10): MILLRACER_TEST_NATS_SERVER_29=/usr/sbin/nats-server cargo test --test first_contact -- --ignored"]
fn a_nats_server_2_9_is_refused_before_anything_is_created() {
    let bin = PathBuf::from(
        std::env::var_os("MILLRACER_TEST_NATS_SERVER_29")
            .expect("MILLRACER_TEST_NATS_SERVER_29 names a nats-server 2.9 binary"),
    );
    let ws = Workspace::init();
    let broker = Broker::start(&bin, free_port(), true);
    let mut worker = Worker::spawn(&broker.url, ws.path(), &[]);
    let line = worker.wait_line(&["ERROR", "is too old"], LINE_WITHIN);
    assert!(
        line.contains("nats-server 2.9."),
        "names the version: {line}"
    );
    assert!(
        line.contains("2.10.0 or newer"),
        "names the minimum: {line}"
    );
    assert_eq!(worker.wait_exit(Duration::from_secs(5)).code(), Some(3));
    assert_eq!(broker.stored_streams(), Vec::<String>::new());
    // --core-only serves it all the same.
    let worker = Worker::spawn(&broker.url, ws.path(), &["--core-only"]);
    worker.wait_line(&["worker ready", "core request/reply only"], LINE_WITHIN);
}

#[test]
fn the_bridge_says_what_it_waits_for() {
    let ws = Workspace::init();
    let broker = Broker::start(&nats_server_bin(), free_port(), true);
    let worker = Worker::spawn(&broker.url, ws.path(), &[]);
    worker.wait_line(&["worker ready"], Duration::from_secs(10));

    // A workspace no worker serves, waited for on purpose: stored, waited for, said.
    let mut request = request_json(
        "fc-unserved",
        "status",
        json!({"workspace_id": "nobody"}),
        json!({"kind": "structured_action", "payload": {}}),
    );
    request["workspace_ref"]["workspace_id"] = json!("nobody");
    let started = Instant::now();
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--nats-url",
            &broker.url,
            "--wait-for-worker",
            "--timeout",
            "3",
        ],
        &request.to_string(),
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(
        stderr.contains("millracer: waiting for a worker to finish request fc-unserved for workspace id \"nobody\""),
        "{stderr}"
    );
    assert!(stderr.contains("--timeout"), "{stderr}");
    assert!(out.stdout.is_empty());

    // A request without schema_version: the reference's message, and the field named.
    common::rt().block_on(async {
        let client = async_nats::connect(&broker.url).await.expect("connect");
        let mut request = request_json(
            "fc-no-schema",
            "list_workspaces",
            json!({}),
            json!({"kind": "structured_action", "payload": {}}),
        );
        if let Some(fields) = request.as_object_mut() {
            fields.remove("schema_version");
        }
        let reply = client
            .request(common::REQUEST_ANY_SUBJECT, request.to_string().into())
            .await
            .expect("the worker answers");
        let result: Value = serde_json::from_slice(&reply.payload).expect("an OpsResult");
        assert_eq!(result["errors"][0]["code"], "invalid_request", "{result:#}");
        assert_eq!(
            result["errors"][0]["message"],
            "unsupported ops schema: None"
        );
        let hint = result["errors"][0]["suggested_action"]
            .as_str()
            .unwrap_or_default();
        assert!(hint.contains("schema_version is missing"), "{result:#}");
    });

    // A broker with no worker at all: said, then in-process.
    drop(worker);
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--nats-url",
            &broker.url,
            "--workspace",
            &ws.path().display().to_string(),
        ],
        &request_json(
            "fc-no-worker",
            "status",
            json!({}),
            json!({"kind": "structured_action", "payload": {}}),
        )
        .to_string(),
        &[],
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "millracer: note: no millracer worker answers on {}; running in-process",
            broker.url
        )),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}
