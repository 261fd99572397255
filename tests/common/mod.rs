//! The shared harness of the integration tests: the real parts, started privately per test.
//!
//! Every `tests/*.rs` does `mod common;`. What is here:
//! - where the real binaries are ([`nats_server_bin`], [`millrace_bin`], [`pi_bin`],
//!   [`millracer_bin`]); a missing one is a test **failure** naming `scripts/setup.sh`,
//!   never a skip;
//! - [`NatsServer`]: a private `nats-server` (random port, JetStream in a temporary directory),
//!   restartable on the same port and store;
//! - [`Workspace`]: a temporary Millrace workspace made by the real `millrace init`;
//! - [`Worker`]: a `millracer worker` process with a private `HOME` and a captured log that is
//!   printed when the test fails;
//! - [`run_ops`]: the `millracer` binary as a one-shot command, with a watchdog;
//! - [`request_json`]: a valid `millracer.ops.v0.2` OpsRequest.
//!
//! Everything here is synchronous except what talks NATS, and cleans up on drop (also when a
//! test panics), so a failing test leaves no process behind.
#![allow(dead_code)] // not every test binary uses every helper

// The JSON Schema helpers live in the sibling file `schemas.rs`:
pub mod acl;
pub mod cluster;
pub mod pi;
pub mod schemas;
pub mod stand_in;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The schema version every request built here carries.
pub const SCHEMA_VERSION: &str = "millracer.ops.v0.2";

/// The core-NATS subject a worker answers for requests that name no particular workspace.
/// (The crate builds its subjects in one module; a binary crate cannot be imported from the
/// tests, so this one is repeated here.)
pub const REQUEST_ANY_SUBJECT: &str = "millracer.ops.v0_2.req.any";

/// How long [`run_ops`] lets the `millracer` binary run before killing it and failing. A
/// watchdog against hangs, not a speed check: on a loaded two-core machine one delegated
/// enqueue (a dozen `millrace` processes of ~0.7 s Python start-up each) has taken over 60 s.
pub const RUN_OPS_TIMEOUT: Duration = Duration::from_secs(240);

/// How long a private nats-server may take to come up.
const NATS_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Worker::wait_ready`] waits for the first answer.
const WORKER_READY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Where the binaries are
// ---------------------------------------------------------------------------------------------

/// The repository root (the crate's manifest directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `$var` if set and non-empty, else `<repo>/<default_rel>`; panics when the file is missing,
/// so a machine without the set-up fails loudly instead of skipping tests.
fn tool_path(what: &str, var: &str, default_rel: &str) -> PathBuf {
    let path = match std::env::var_os(var) {
        Some(value) if !value.is_empty() => PathBuf::from(value),
        _ => repo_root().join(default_rel),
    };
    if !path.is_file() {
        panic!(
            "{what} not found at {}: run scripts/setup.sh",
            path.display()
        );
    }
    path
}

/// The pinned `nats-server` (v2.15.1): `$MILLRACER_TEST_NATS_SERVER`, else `.venv/bin/nats-server`.
pub fn nats_server_bin() -> PathBuf {
    tool_path(
        "nats-server",
        "MILLRACER_TEST_NATS_SERVER",
        ".venv/bin/nats-server",
    )
}

/// Writes an executable `sh` script (a wrapper around a real part, e.g. one that logs its
/// calls) at `path` and returns that path.
pub fn write_script(path: &Path, body: &str) -> PathBuf {
    fs::write(path, body).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    fs::set_permissions(path, mode).unwrap_or_else(|err| panic!("chmod {}: {err}", path.display()));
    path.to_path_buf()
}

/// The pinned Millrace runtime CLI (`millrace-ai==0.21.1`): `$MILLRACER_TEST_MILLRACE`, else
/// `.venv/bin/millrace`.
pub fn millrace_bin() -> PathBuf {
    tool_path("millrace", "MILLRACER_TEST_MILLRACE", ".venv/bin/millrace")
}

/// The real pi coding agent (npm `@mariozechner/pi-coding-agent@0.73.1`): `$MILLRACER_TEST_PI`,
/// else `.tools/pi/node_modules/.bin/pi`.
pub fn pi_bin() -> PathBuf {
    tool_path("pi", "MILLRACER_TEST_PI", ".tools/pi/node_modules/.bin/pi")
}

/// The Python reference, `millracer==0.2.0` with `millrace-ai==0.21.1`:
/// `$MILLRACER_TEST_REFERENCE`, else `.venv-ref/bin/millracer` (both installed by
/// `scripts/setup.sh`).
pub fn reference_bin() -> PathBuf {
    tool_path(
        "the reference (millracer 0.2.0)",
        "MILLRACER_TEST_REFERENCE",
        ".venv-ref/bin/millracer",
    )
}

/// A command for `program` with the test environment of [`millracer_command`]: the pinned
/// `millrace` first on `PATH`, no inherited `MILLRACER_*` settings.
pub fn tool_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if let Some(key) = key.to_str()
            && key.starts_with("MILLRACER_")
            && !key.starts_with("MILLRACER_TEST_")
        {
            cmd.env_remove(key);
        }
    }
    cmd.env("PATH", path_with_tools())
        .env("RUST_BACKTRACE", "1");
    cmd
}

/// The `millracer` binary cargo built for this test run.
pub fn millracer_bin() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_millracer"));
    if !path.is_file() {
        panic!(
            "millracer not found at {}: build it with cargo",
            path.display()
        );
    }
    path
}

/// `PATH` with the directory of the pinned `millrace` in front, so that a `millracer` started
/// by a test finds the pinned runtime as plain `millrace` (its default `--millrace-command`).
pub fn path_with_tools() -> String {
    let millrace_dir = millrace_bin()
        .parent()
        .expect("millrace has a parent directory")
        .to_path_buf();
    let mut dirs = vec![millrace_dir];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs)
        .expect("PATH entries contain no ':'")
        .into_string()
        .expect("PATH is UTF-8")
}

/// A command for the `millracer` binary with the test environment: `PATH` led by the pinned
/// `millrace`'s directory (its default `--millrace-command` is plain `millrace`),
/// `RUST_BACKTRACE=1`, and none of the caller's `MILLRACER_*` settings (`MILLRACER_NATS_URL`,
/// `MILLRACER_TRANSPORT`, `MILLRACER_CONFIG`, credentials…) except `MILLRACER_TEST_*`, so a
/// developer's shell cannot change what a test sees. Every `millracer` a test starts is
/// built here (through [`Worker`], [`run_ops`] or directly, e.g. a long-running `events`).
pub fn millracer_command() -> Command {
    tool_command(&millracer_bin())
}

/// A process-wide counter for unique names (request ids, file names).
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Sends `signal` (e.g. `"TERM"`, `"KILL"`) to the processes `pids` with the `kill` command
/// (no libc here); the result is ignored (a process may be gone already).
fn send_signal(signal: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The environment variable that marks every process a [`Worker`] or [`run_ops`] starts,
/// inherited by everything those start in turn (runtime daemons, runners), even when they
/// detach into their own session. Cleanup finds them by it.
const OWNER_VAR: &str = "MILLRACER_TEST_OWNER";

/// A mark no other process carries: this test process's pid and a counter.
fn new_owner_mark() -> String {
    format!("{}-{}", std::process::id(), next_id())
}

/// The live processes whose environment carries `OWNER_VAR=<mark>` (zombies have none).
fn marked_pids(mark: &str) -> Vec<u32> {
    let needle = format!("{OWNER_VAR}={mark}");
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let environ = fs::read(entry.path().join("environ")).ok()?;
            environ
                .split(|byte| *byte == 0)
                .any(|var| var == needle.as_bytes())
                .then_some(pid)
        })
        .collect()
}

/// SIGKILLs every process carrying `mark`: stops them first, so none can fork a process that
/// escapes, then kills what is there. Returns how many were found.
fn kill_marked(mark: &str) -> usize {
    let mut found = 0;
    for _ in 0..5 {
        let pids = marked_pids(mark);
        if pids.is_empty() {
            break;
        }
        found = found.max(pids.len());
        send_signal("STOP", &pids);
        send_signal("KILL", &marked_pids(mark));
        send_signal("KILL", &pids);
        std::thread::sleep(Duration::from_millis(20));
    }
    found
}

/// Marks `cmd` like the commands [`run_ops`] starts, for a test that reads a process's
/// output while it runs; pass the mark to [`end_marked`] when done, so nothing it started
/// (runtime daemons, runners) outlives the test.
pub fn mark(cmd: &mut Command) -> String {
    let mark = new_owner_mark();
    cmd.env(OWNER_VAR, &mark);
    mark
}

/// Ends every process carrying `mark` (see [`mark`]); returns how many there were.
pub fn end_marked(mark: &str) -> usize {
    kill_marked(mark)
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => panic!("waiting for process {}: {err}", child.id()),
        }
    }
}

/// The file's text, or a note saying why there is none.
fn read_log(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(err) => format!("<cannot read {}: {err}>", path.display()),
    }
}

/// A log file opened for appending, usable as a child's stdout and (cloned) stderr.
fn log_sink(path: &Path) -> (Stdio, Stdio) {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|err| panic!("cannot open log {}: {err}", path.display()));
    let err_file = file.try_clone().expect("clone log file handle");
    (Stdio::from(file), Stdio::from(err_file))
}

// ---------------------------------------------------------------------------------------------
// NATS server
// ---------------------------------------------------------------------------------------------

/// A private `nats-server` for one test: 127.0.0.1 on a random port, JetStream on, its store,
/// ports file, log and config in one temporary directory. Killed on drop.
pub struct NatsServer {
    /// The client URL, e.g. `nats://127.0.0.1:40213`.
    pub url: String,
    /// The client port; stays the same across [`NatsServer::restart`].
    pub port: u16,
    /// JetStream store (`-sd`), ports files, `nats-server.log`, optional `nats-server.conf`.
    store_dir: TempDir,
    child: Child,
    /// The config file given to [`NatsServer::start_with_config`], reused on restart.
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts a private server with JetStream and waits until it accepts TCP connections.
    pub fn start() -> Self {
        Self::start_in(None)
    }

    /// Like [`NatsServer::start`], with `conf_text` written to a config file and passed with
    /// `-c` (for auth tests and the like). The command-line flags (`-a 127.0.0.1 -p … -js -sd …`)
    /// take precedence over the file, so the server stays private.
    pub fn start_with_config(conf_text: &str) -> Self {
        Self::start_in(Some(conf_text))
    }

    fn start_in(conf_text: Option<&str>) -> Self {
        let store_dir = tempfile::Builder::new()
            .prefix("millracer-nats-")
            .tempdir()
            .expect("create nats-server temp dir");
        let config = conf_text.map(|text| {
            let path = store_dir.path().join("nats-server.conf");
            fs::write(&path, text).expect("write nats-server.conf");
            path
        });
        let (child, url, port) = spawn_nats_server(store_dir.path(), config.as_deref(), None);
        NatsServer {
            url,
            port,
            store_dir,
            child,
            config,
        }
    }

    /// Kills the server (SIGKILL, like a crash) and starts it again on the same port with the
    /// same JetStream store and config; returns once it accepts connections again.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Kills the server (SIGKILL) and waits for it; the store is kept. Pair with
    /// [`NatsServer::start_again`] to hold an outage open for a while.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts a stopped server again on the same port and store.
    pub fn start_again(&mut self) {
        let (child, url, port) = spawn_nats_server(
            self.store_dir.path(),
            self.config.as_deref(),
            Some(self.port),
        );
        assert_eq!(
            port, self.port,
            "restarted nats-server moved to another port"
        );
        self.child = child;
        self.url = url;
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary directory holding the JetStream store, ports files and log.
    pub fn store_dir(&self) -> &Path {
        self.store_dir.path()
    }

    /// Everything the server wrote to stdout/stderr so far (all runs, in order).
    pub fn log(&self) -> String {
        read_log(&self.store_dir.path().join("nats-server.log"))
    }

    /// A client connected to this server with default options.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url)
            .await
            .unwrap_or_else(|err| panic!("connect to {}: {err}", self.url))
    }

    /// A client connected with the given options (credentials, reconnect tuning, …).
    pub async fn client_with(&self, options: async_nats::ConnectOptions) -> async_nats::Client {
        options
            .connect(&self.url)
            .await
            .unwrap_or_else(|err| panic!("connect to {}: {err}", self.url))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(100)..];
            eprintln!(
                "----- nats-server log ({}, last {} lines) -----\n{}\n----- end of nats-server log -----",
                self.url,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Spawns `nats-server` in `dir` and waits (≤ 10 s) for its ports file and a TCP connect.
/// `port: None` lets the server choose (`-p -1`).
fn spawn_nats_server(dir: &Path, config: Option<&Path>, port: Option<u16>) -> (Child, String, u16) {
    let bin = nats_server_bin();
    let log_path = dir.join("nats-server.log");
    let (stdout, stderr) = log_sink(&log_path);
    let mut cmd = Command::new(&bin);
    if let Some(config) = config {
        cmd.arg("-c").arg(config);
    }
    let port_arg = port.map_or_else(|| "-1".to_string(), |p| p.to_string());
    cmd.args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
        .arg(dir)
        .arg("--ports_file_dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {}: {err}", bin.display()));

    let deadline = Instant::now() + NATS_START_TIMEOUT;
    let ports_file = dir.join(format!("nats-server_{}.ports", child.id()));
    let fail = |child: &mut Child, why: String| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "nats-server did not start: {why}\n----- nats-server log -----\n{}",
            read_log(&log_path)
        );
    };

    // The ports file: {"nats":["nats://127.0.0.1:PORT"], …}, written once the listener is up.
    let url = loop {
        if let Ok(Some(status)) = child.try_wait() {
            fail(&mut child, format!("it exited with {status}"));
        }
        if let Ok(text) = fs::read_to_string(&ports_file)
            && let Ok(ports) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(url) = ports["nats"].get(0).and_then(|u| u.as_str())
        {
            break url.to_string();
        }
        if Instant::now() >= deadline {
            fail(
                &mut child,
                format!("no ports file {} after 10 s", ports_file.display()),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let port: u16 = match url.rsplit(':').next().and_then(|p| p.parse().ok()) {
        Some(port) => port,
        None => fail(&mut child, format!("cannot read a port from {url:?}")),
    };

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            fail(&mut child, format!("it exited with {status}"));
        }
        if Instant::now() >= deadline {
            fail(&mut child, format!("{addr} refused connections for 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, url, port)
}

// ---------------------------------------------------------------------------------------------
// Millrace workspace
// ---------------------------------------------------------------------------------------------

/// A temporary Millrace workspace created by the real `millrace init`; removed on drop.
pub struct Workspace {
    pub dir: TempDir,
}

impl Workspace {
    /// Runs `millrace init --workspace <tempdir>` and asserts it succeeded.
    pub fn init() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("millrace-ws-")
            .tempdir()
            .expect("create workspace temp dir");
        let bin = millrace_bin();
        let output = Command::new(&bin)
            .arg("init")
            .arg("--workspace")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("run {}: {err}", bin.display()));
        assert!(
            output.status.success(),
            "millrace init --workspace {} failed with {}\n----- stdout -----\n{}\n----- stderr -----\n{}",
            dir.path().display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        Workspace { dir }
    }

    /// The workspace root (the directory holding `millrace-agents/`).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

// ---------------------------------------------------------------------------------------------
// millracer worker
// ---------------------------------------------------------------------------------------------

/// A running `millracer worker` with a private `HOME` (so `~/.millracer/` is the test's own)
/// and stdout+stderr captured to a log file that is printed when the test fails. Dropping it
/// kills the worker and every process it started (found by [`OWNER_VAR`]).
pub struct Worker {
    /// Locked only briefly (never across an await), so `&self` methods can poll the process.
    child: Mutex<Child>,
    pid: u32,
    /// The [`OWNER_VAR`] value of this worker and everything it starts.
    mark: String,
    /// Holds `worker.log` and, unless a home was given, `home/`.
    dir: TempDir,
    home: PathBuf,
    log_path: PathBuf,
    /// The `--ready-file` this worker was started with (none when the test passed its own):
    /// [`Worker::wait_ready`] waits for it, so it knows that this worker, not another one
    /// on the same subjects, is ready.
    ready_path: Option<PathBuf>,
}

impl Worker {
    /// Spawns `millracer worker --nats-url <nats_url> --workspace ID=PATH… <extra…>` with a
    /// fresh private `HOME`.
    pub fn spawn(nats_url: &str, workspaces: &[(&str, &Path)], extra: &[&str]) -> Self {
        Self::spawn_with(nats_url, workspaces, extra, &[], None)
    }

    /// Like [`Worker::spawn`], with extra environment variables and optionally a given `HOME`
    /// (to start a second worker on the state of a first one). The environment is the test
    /// environment (see `millracer_command`: pinned `millrace` first on `PATH`, no inherited
    /// `MILLRACER_*` settings); `env` is applied last and wins.
    pub fn spawn_with(
        nats_url: &str,
        workspaces: &[(&str, &Path)],
        extra: &[&str],
        env: &[(&str, &str)],
        home: Option<&Path>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("millracer-worker-")
            .tempdir()
            .expect("create worker temp dir");
        let home = match home {
            Some(home) => home.to_path_buf(),
            None => {
                let home = dir.path().join("home");
                fs::create_dir(&home).expect("create worker HOME");
                home
            }
        };
        let log_path = dir.path().join("worker.log");
        let (stdout, stderr) = log_sink(&log_path);
        let mark = new_owner_mark();
        let ready_path = (!extra.contains(&"--ready-file")).then(|| dir.path().join("ready"));

        let mut cmd = millracer_command();
        cmd.arg("worker").arg("--nats-url").arg(nats_url);
        if let Some(ready) = &ready_path {
            cmd.arg("--ready-file").arg(ready);
        }
        for (id, path) in workspaces {
            cmd.arg("--workspace")
                .arg(format!("{id}={}", path.display()));
        }
        cmd.args(extra)
            .env("HOME", &home)
            .envs(env.iter().copied())
            .env(OWNER_VAR, &mark)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|err| panic!("spawn millracer worker: {err}"));
        let pid = child.id();
        Worker {
            child: Mutex::new(child),
            pid,
            mark,
            dir,
            home,
            log_path,
            ready_path,
        }
    }

    /// Waits (≤ 30 s) until the worker has written its ready file and answers a core-NATS `list_workspaces` request on
    /// [`REQUEST_ANY_SUBJECT`]; returns that answer (an OpsResult). Fails the test, printing
    /// the worker's log, if the worker exits or does not answer in time.
    pub async fn wait_ready(&self, client: &async_nats::Client) -> serde_json::Value {
        let deadline = Instant::now() + WORKER_READY_TIMEOUT;
        // This worker's own word first: with several workers on one subject, any of them
        // may answer the request below.
        if let Some(ready) = &self.ready_path {
            while !ready.exists() {
                if let Some(status) = self.try_wait() {
                    panic!("worker exited with {status} before it was ready (its log follows)");
                }
                assert!(
                    Instant::now() < deadline,
                    "the worker wrote no ready file within {} s (its log follows)",
                    WORKER_READY_TIMEOUT.as_secs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut last_error = String::from("no attempt made");
        loop {
            if let Some(status) = self.try_wait() {
                panic!("worker exited with {status} before it was ready (its log follows)");
            }
            if Instant::now() >= deadline {
                panic!(
                    "worker did not answer list_workspaces on {REQUEST_ANY_SUBJECT} within {} s (last: {last_error}; its log follows)",
                    WORKER_READY_TIMEOUT.as_secs(),
                );
            }
            let request = request_json(
                &format!("ready-{}-{}", self.pid, next_id()),
                "list_workspaces",
                serde_json::json!({}),
                serde_json::json!({"kind": "structured_action", "payload": {}}),
            );
            let payload = serde_json::to_vec(&request).expect("serialise request");
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                client.request(REQUEST_ANY_SUBJECT, payload.into()),
            )
            .await;
            match attempt {
                Ok(Ok(message)) => {
                    match serde_json::from_slice::<serde_json::Value>(&message.payload) {
                        Ok(answer) => return answer,
                        Err(err) => panic!(
                            "worker answered list_workspaces with something that is not JSON ({err}): {:?} (its log follows)",
                            String::from_utf8_lossy(&message.payload),
                        ),
                    }
                }
                Ok(Err(err)) => last_error = err.to_string(),
                Err(_) => last_error = "request timed out after 2 s".to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The worker's service id (its micro service id, the `owner` of the durable records it
    /// writes), read from its `worker ready` log line; waits ≤ 15 s for that line and fails
    /// the test without it.
    pub fn service_id(&self) -> String {
        let deadline = Instant::now() + WORKER_READY_TIMEOUT;
        loop {
            let log = self.log();
            if let Some(id) = log
                .lines()
                .filter(|line| line.contains("worker ready"))
                .find_map(|line| {
                    // `--log-format json`: {"fields": {"id": …}}; readable: `id=…`.
                    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
                        return json["fields"]["id"].as_str().map(str::to_string);
                    }
                    line.split_whitespace()
                        .find_map(|field| field.strip_prefix("id="))
                        .map(|id| id.trim_matches('"').to_string())
                })
            {
                return id;
            }
            if let Some(status) = self.try_wait() {
                panic!("worker exited with {status} before its ready line (its log follows)");
            }
            assert!(
                Instant::now() < deadline,
                "no `worker ready … id=` line in the worker's log within 15 s (its log follows)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM to the worker process (a graceful stop).
    pub fn sigterm(&self) {
        send_signal("TERM", &[self.pid]);
    }

    /// Sends SIGKILL to the worker process only (a crash: anything it started keeps running,
    /// as it would after a real crash, until this Worker is dropped or
    /// [`Worker::kill_all`] is called).
    pub fn sigkill(&mut self) {
        send_signal("KILL", &[self.pid]);
    }

    /// SIGKILLs the worker and every process it started (daemons, runners), and reaps the
    /// worker; returns how many processes were still alive.
    pub fn kill_all(&mut self) -> usize {
        let found = kill_marked(&self.mark);
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        found
    }

    /// The live processes the worker started (itself included while it runs), by pid.
    pub fn process_ids(&self) -> Vec<u32> {
        marked_pids(&self.mark)
    }

    /// Waits up to `timeout` for the worker to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(self.child.get_mut().expect("worker child lock"), timeout)
    }

    /// The exit status if the worker has exited, without waiting.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().expect("worker child lock");
        child.try_wait().expect("poll worker process")
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The worker's `HOME`.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Everything the worker wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Waits for a line containing `needle` in the worker's log, failing the test (with the
    /// log) after `within`: an event to wait for where nothing else on the bus says it.
    pub fn wait_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().lines().any(|line| line.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "no line with {needle:?} in the worker's log within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_block(&self) -> String {
        format!(
            "----- worker {} log ({}) -----\n{}\n----- end of worker log -----",
            self.pid,
            self.log_path.display(),
            self.log()
        )
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Also ends runtime daemons and runners it started, so nothing outlives the test.
        self.kill_all();
        if std::thread::panicking() {
            eprintln!("{}", self.log_block());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One-shot commands and requests
// ---------------------------------------------------------------------------------------------

/// Runs the `millracer` binary with `args` (the whole argument list, e.g.
/// `["ops", "--json", "--transport", "nats", "--nats-url", &url]`), writes `stdin` to it and
/// returns its output. Fails the test if it runs longer than [`RUN_OPS_TIMEOUT`].
///
/// Environment: `HOME` is a fresh temporary directory unless `env` sets one (pass the same
/// `HOME` to calls that must share `~/.millracer/`); `PATH` is led by the pinned `millrace`'s
/// directory; inherited `MILLRACER_*` settings are removed; `env` is applied last and wins.
///
/// Also a failure: the command exits but something it started keeps its stdout/stderr open
/// for 5 s (a caller waiting for end-of-output, like a shell's `$(…)`, would hang). Processes
/// it started that do not hold the pipes are left running.
pub fn run_ops(args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    run_ops_with_timeout(args, stdin, env, RUN_OPS_TIMEOUT)
}

/// [`run_ops`] with another watchdog.
pub fn run_ops_with_timeout(
    args: &[&str],
    stdin: &str,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Output {
    let output = run_command(millracer_command(), args, stdin.as_bytes(), env, timeout);
    assert_messages_valid(&output.stdout);
    output
}

/// Every contract message a command printed (the OpsResult of `--json`, the frame and
/// result lines of `--stream-json`) is valid against its schema: checked for every command
/// a test runs, so no test sees a message the contract would reject.
fn assert_messages_valid(stdout: &[u8]) {
    let text = String::from_utf8_lossy(stdout);
    let check = |value: &serde_json::Value| {
        if value.get("schema_version").and_then(|v| v.as_str()) != Some("millracer.ops.v0.2") {
            return;
        }
        let name = if value.get("event_type").is_some() {
            "frame"
        } else {
            "result"
        };
        schemas::assert_valid(name, value);
    };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(value) => check(&value),
        Err(_) => text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .for_each(|value| check(&value)),
    }
}

/// Runs `cmd` (a program with the test environment, e.g. from [`millracer_command`]) like
/// [`run_ops_with_timeout`] runs `millracer`: fresh `HOME` unless `env` sets one, `stdin`
/// written, output drained, a watchdog of `timeout`, processes it left behind killed.
pub fn run_command(
    mut cmd: Command,
    args: &[&str],
    stdin: &[u8],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Output {
    let default_home = tempfile::Builder::new()
        .prefix("millracer-home-")
        .tempdir()
        .expect("create HOME temp dir");
    let mark = new_owner_mark();
    cmd.args(args)
        .env("HOME", default_home.path())
        .envs(env.iter().copied())
        .env(OWNER_VAR, &mark)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|err| panic!("spawn millracer {args:?}: {err}"));

    // Feed stdin and drain stdout/stderr on threads, so no pipe can fill up and block.
    let mut child_stdin = child.stdin.take().expect("piped stdin");
    let input = stdin.to_vec();
    std::thread::spawn(move || {
        // A child that exits without reading stdin closes the pipe: not our failure.
        let _ = child_stdin.write_all(&input);
    });
    let stdout_rx = drain(child.stdout.take().expect("piped stdout"));
    let stderr_rx = drain(child.stderr.take().expect("piped stderr"));

    let status = wait_child(&mut child, timeout);
    let timed_out = status.is_none();
    // After a normal exit the pipes close at once, unless something the command started still
    // holds them: give that 5 s, then kill everything it started.
    let grace = if timed_out {
        Duration::ZERO
    } else {
        Duration::from_secs(5)
    };
    let grace_end = Instant::now() + grace;
    let mut stdout = stdout_rx.recv_timeout(grace).ok();
    let mut stderr = stderr_rx
        .recv_timeout(grace_end.saturating_duration_since(Instant::now()))
        .ok();
    let pipes_held = !timed_out && (stdout.is_none() || stderr.is_none());
    if timed_out || pipes_held {
        kill_marked(&mark);
        let _ = child.kill();
    }
    let status = match status {
        Some(status) => status,
        None => child
            .wait()
            .unwrap_or_else(|err| panic!("wait for millracer {args:?}: {err}")),
    };
    if stdout.is_none() {
        stdout = stdout_rx.recv_timeout(Duration::from_secs(5)).ok();
    }
    if stderr.is_none() {
        stderr = stderr_rx.recv_timeout(Duration::from_secs(5)).ok();
    }
    let stdout = stdout.unwrap_or_default();
    let stderr = stderr.unwrap_or_default();
    if timed_out {
        panic!(
            "millracer {args:?} did not finish within {} s; killed\n----- stdout -----\n{}\n----- stderr -----\n{}",
            timeout.as_secs(),
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr),
        );
    }
    if pipes_held {
        panic!(
            "millracer {args:?} exited ({status}) but processes it started kept its stdout/stderr open for 5 s; killed\n----- stdout -----\n{}\n----- stderr -----\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr),
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Reads `pipe` to its end on a thread; the bytes arrive on the returned channel.
fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = tx.send(bytes);
    });
    rx
}

/// A valid `millracer.ops.v0.2` OpsRequest with `source {kind: "cli", surface: "test"}`.
pub fn request_json(
    request_id: &str,
    action: &str,
    workspace_ref: serde_json::Value,
    input: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "request_id": request_id,
        "workspace_ref": workspace_ref,
        "source": {"kind": "cli", "surface": "test"},
        "action": action,
        "input": input,
    })
}

/// Writes `text` to a new file in `dir` and returns its path (for request files, configs…).
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let mut file =
        File::create(&path).unwrap_or_else(|err| panic!("create {}: {err}", path.display()));
    file.write_all(text.as_bytes())
        .unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
    path
}

/// A multi-threaded tokio runtime for a synchronous test that talks NATS.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The lines of a child's pipe, read on a thread so that a test can wait for the next one
/// with a bound instead of blocking on the pipe.
pub struct Lines {
    rx: mpsc::Receiver<String>,
}

impl Lines {
    /// Starts reading `pipe` line by line.
    pub fn new(pipe: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines { rx }
    }

    /// The next line; fails the test when none comes within `limit` or the pipe closed.
    pub fn next_within(&self, limit: Duration, what: &str) -> String {
        match self.rx.recv_timeout(limit) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("waiting for {what}: no line within {limit:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("waiting for {what}: the pipe closed")
            }
        }
    }

    /// Reads lines until one satisfies `want` (returned), failing the test after `limit`.
    pub fn until(&self, limit: Duration, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.next_within(left, what);
            if want(&line) {
                return line;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The durable side as tests read it
// ---------------------------------------------------------------------------------------------

/// Waits (≤ 120 s) for the first frame of `event_type` (and, if given, of that stage) on a
/// core subscription; fails the test without it.
pub async fn wait_frame(
    frames: &mut async_nats::Subscriber,
    event_type: &str,
    stage: Option<&str>,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(message)) = tokio::time::timeout(left, futures::StreamExt::next(frames)).await
        else {
            panic!("no {event_type} frame within 120 s");
        };
        let frame: serde_json::Value =
            serde_json::from_slice(&message.payload).expect("frame JSON");
        if frame["event_type"] == event_type && stage.is_none_or(|s| frame["payload"]["stage"] == s)
        {
            return;
        }
    }
}

/// The stored record of a request once it is done (fails after `limit`).
pub async fn wait_done(
    kv: &async_nats::jetstream::kv::Store,
    workspace: &str,
    request_id: &str,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(bytes)) = kv
            .get(millracer::bus::subjects::result_key(
                Some(workspace),
                request_id,
            ))
            .await
            && let Ok(record) = serde_json::from_slice::<serde_json::Value>(&bytes)
            && record["state"] == "done"
        {
            schemas::assert_valid("result", &record["result"]);
            return record;
        }
        assert!(
            Instant::now() < deadline,
            "no result for {request_id} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every stored frame under `filter`, in stream order.
pub async fn stored_frames(
    js: &async_nats::jetstream::Context,
    filter: &str,
) -> Vec<serde_json::Value> {
    let mut stream = js
        .get_stream(millracer::bus::subjects::FRAMES_STREAM)
        .await
        .expect("frames stream");
    let total = stream.info().await.expect("stream info").state.messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut out = Vec::new();
    while out.len() as u64 <= total {
        match tokio::time::timeout(
            Duration::from_secs(2),
            futures::StreamExt::next(&mut messages),
        )
        .await
        {
            Ok(Some(Ok(m))) => {
                let frame: serde_json::Value =
                    serde_json::from_slice(&m.payload).expect("frame JSON");
                schemas::assert_valid("frame", &frame);
                out.push(frame);
            }
            _ => break,
        }
    }
    out
}
