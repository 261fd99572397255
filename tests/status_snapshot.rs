//! `status` snapshots.
//!
//! 1. The cache on its own: the real runtime is asked once while nothing changes, again in
//!    the background as soon as its files change or the ownership lock's process ends, and
//!    on the safety net; requests never wait for those refreshes.
//! 2. The proof: the status a running worker serves over the bus equals a fresh
//!    `millrace status --format json` of the same workspace after each kind of change the
//!    runtime knows (see [`served_status_follows_the_runtime_through_every_kind_of_change`]).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::stand_in::StandInWorkspace;
use common::{NatsServer, Worker, Workspace, millrace_bin, request_json};
use millracer::bus::subjects;
use millracer::millrace::command::Millrace;
use millracer::millrace::intake::{IntakeKind, render};
use millracer::millrace::status::StatusCache;
use serde_json::{Map, Value, json};

/// Polls `done` every 20 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write_lock(root: &Path, pid: u32) {
    let lock = json!({
        "workspace_root": root.display().to_string(),
        "owner_pid": pid,
        "owner_hostname": "test",
        "owner_session_id": "s",
        "acquired_at": "2026-01-01T00:00:00+00:00",
    });
    let state = root.join("millrace-agents").join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("runtime_daemon.lock.json"), lock.to_string()).expect("lock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_refreshed_in_the_background_on_changes_and_the_lock_owner_ending() {
    let ws = Workspace::init();
    let millrace = Millrace::new(
        millrace_bin().display().to_string(),
        Duration::from_secs(60),
    );
    let cache = StatusCache::new(Duration::from_secs(4));
    let root = ws.path();

    // Eight concurrent first requests share one refresh.
    let all = futures::future::join_all((0..8).map(|_| cache.status(&millrace, root, root))).await;
    for status in &all {
        let status = status.as_ref().expect("status");
        assert_eq!(status["workspace"], root.display().to_string());
    }
    assert_eq!(cache.refreshes(), 1);
    cache.status(&millrace, root, root).await.expect("status");
    assert_eq!(cache.refreshes(), 1, "unchanged: served from the snapshot");

    // A change under millrace-agents/ refreshes in the background, with no request.
    std::fs::write(root.join("millrace-agents").join("touched.txt"), "x").expect("touch");
    assert!(
        eventually(Duration::from_secs(10), || cache.refreshes() >= 2).await,
        "a runtime file changed: refreshed without being asked"
    );

    // The lock names a live process: the lock file's change refreshes; its end (no file
    // changes) refreshes again, and the snapshot then says the lock is stale.
    let mut sleeper = Command::new("sleep").arg("60").spawn().expect("sleep");
    let before = cache.refreshes();
    write_lock(root, sleeper.id());
    assert!(
        eventually(Duration::from_secs(10), || cache.refreshes() > before).await,
        "lock written"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            futures::executor::block_on(cache.status(&millrace, root, root))
                .is_ok_and(|s| s["runtime_ownership_lock"] == "active")
        })
        .await,
        "the snapshot sees the live lock owner"
    );
    let before = cache.refreshes();
    sleeper.kill().expect("kill");
    sleeper.wait().expect("reap");
    assert!(
        eventually(Duration::from_secs(10), || cache.refreshes() > before).await,
        "the lock's owner ended: refreshed although no file changed"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            futures::executor::block_on(cache.status(&millrace, root, root))
                .is_ok_and(|s| s["runtime_ownership_lock"] == "stale")
        })
        .await,
        "the snapshot sees the stale lock"
    );

    // Settled: a change elsewhere in the workspace refreshes nothing.
    let settled = cache.refreshes();
    std::fs::write(root.join("README.md"), "project file").expect("write");
    for _ in 0..10 {
        cache.status(&millrace, root, root).await.expect("status");
    }
    assert!(
        cache.refreshes() <= settled + 1,
        "at most the safety net ran"
    );

    // The safety net refreshes in the background even when nothing changed.
    let before = cache.refreshes();
    assert!(
        eventually(Duration::from_secs(15), || cache.refreshes() > before).await,
        "the safety net refreshed"
    );
}

// ---------------------------------------------------------------------------------------
// The proof: served status == the runtime's status, after every kind of change.
// ---------------------------------------------------------------------------------------

static NEXT: AtomicU64 = AtomicU64::new(0);

/// How long after a change the served status may still differ from the runtime's: one
/// refresh already running when the change came plus the one it causes, each one
/// `millrace status` (a Python start-up: ~0.7 s on an idle machine), plus 1 s of slack for
/// a loaded machine. It is measured, not guessed: twice the slowest `millrace status`
/// this test has timed so far, plus 1 s.
fn bound(slowest_fresh: Duration) -> Duration {
    slowest_fresh * 2 + Duration::from_secs(1)
}

struct Proof<'a> {
    client: async_nats::Client,
    root: &'a Path,
    slowest_fresh: Duration,
    lags: Vec<(String, Duration)>,
}

impl Proof<'_> {
    /// The status the worker serves, through the bus.
    async fn served(&self) -> Map<String, Value> {
        let id = format!("snap-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let request = request_json(
            &id,
            "status",
            json!({"workspace_id": "default"}),
            json!({"kind": "structured_action", "payload": {}}),
        );
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            self.client.request(
                subjects::request_by_id("default"),
                serde_json::to_vec(&request).expect("json").into(),
            ),
        )
        .await
        .expect("answered within 30 s")
        .expect("request");
        let result: Value = serde_json::from_slice(&reply.payload).expect("result json");
        assert_eq!(result["status"], "succeeded", "{result:#}");
        match result.get("result") {
            Some(Value::Object(map)) => map.clone(),
            other => panic!("no status object: {other:?}"),
        }
    }

    /// A fresh `millrace status --format json` (the runtime's truth now).
    async fn fresh(&mut self) -> Map<String, Value> {
        let started = Instant::now();
        let out = tokio::process::Command::new(millrace_bin())
            .args(["status", "--format", "json", "--workspace"])
            .arg(self.root)
            .current_dir(self.root)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run millrace status");
        self.slowest_fresh = self.slowest_fresh.max(started.elapsed());
        assert!(out.status.success(), "millrace status: {out:?}");
        match serde_json::from_slice(&out.stdout) {
            Ok(Value::Object(map)) => map,
            other => panic!("millrace status printed no object: {other:?}"),
        }
    }

    /// Equality is the whole object: the runtime's status holds no time-of-read field
    /// (every time in it is a recorded event's time), so nothing is left out. The truth is
    /// read once the change is complete; the served status is then polled against it. If
    /// the runtime's status itself moved meanwhile, the truth is read again.
    async fn agrees(&mut self, case: &str) {
        let changed = Instant::now();
        loop {
            let truth = self.fresh().await;
            let truth_at = changed.elapsed();
            let mut served = self.served().await;
            let poll_until = Instant::now() + bound(self.slowest_fresh);
            while served != truth && Instant::now() < poll_until {
                tokio::time::sleep(Duration::from_millis(20)).await;
                served = self.served().await;
            }
            if served == truth {
                let lag = changed.elapsed();
                eprintln!(
                    "{case}: served equal to the runtime {} ms after the change, {} ms after a fresh `millrace status` (started after the change) answered",
                    lag.as_millis(),
                    lag.saturating_sub(truth_at).as_millis()
                );
                self.lags.push((case.to_string(), lag));
                return;
            }
            if changed.elapsed() > bound(self.slowest_fresh) * 2 {
                let differing: Vec<String> = truth
                    .iter()
                    .filter(|(k, v)| served.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k}: runtime {v} served {:?}", served.get(k)))
                    .collect();
                panic!(
                    "{case}: served status still differs from the runtime's {} ms after the change (bound {} ms): {differing:#?}",
                    changed.elapsed().as_millis(),
                    bound(self.slowest_fresh).as_millis()
                );
            }
        }
    }
}

fn millrace(root: &Path, args: &[&str]) {
    let out = Command::new(millrace_bin())
        .args(args)
        .arg("--workspace")
        .arg(root)
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .expect("run millrace");
    assert!(out.status.success(), "millrace {args:?}: {out:?}");
}

/// A daemon started by someone other than the worker (the worker must find it from the
/// runtime's ownership lock).
fn start_daemon(root: &Path) -> Child {
    Command::new(millrace_bin())
        .args([
            "run",
            "daemon",
            "--mode",
            "default_pi",
            "--monitor",
            "none",
            "--workspace",
        ])
        .arg(root)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start millrace daemon")
}

fn started_stages(ws: &StandInWorkspace) -> Vec<String> {
    ws.calls()
        .iter()
        .filter(|c| c["event"] == "started")
        .filter_map(|c| c["stage"].as_str().map(str::to_string))
        .collect()
}

fn queue_task(root: &Path, id: &str) {
    let doc = root.join(format!("{id}.md"));
    std::fs::write(
        &doc,
        render(
            IntakeKind::Task,
            id,
            "Make the snapshot proof pass",
            "2026-01-01T00:00:00Z",
            None,
        ),
    )
    .expect("task doc");
    millrace(
        root,
        &["queue", "add-task", doc.to_str().expect("utf-8 path")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_status_follows_the_runtime_through_every_kind_of_change() {
    // builder and checker stay running long enough to compare while they run.
    let ws = StandInWorkspace::new(json!({
        "builder": {"delay_seconds": 12},
        "checker": {"delay_seconds": 12},
    }));
    let root = ws.path();
    let nats = NatsServer::start();
    // A safety net far beyond the test: only noticed changes can make it pass.
    let worker = Worker::spawn(
        &nats.url,
        &[("default", root)],
        &["--status-max-age-seconds", "3600"],
    );
    let client = nats.client().await;
    worker.wait_ready(&client).await;
    let mut proof = Proof {
        client,
        root,
        slowest_fresh: Duration::ZERO,
        lags: Vec::new(),
    };
    // The first request of the workspace waits for the first snapshot.
    proof.served().await;

    proof.agrees("idle").await;

    queue_task(root, "snap-task-1");
    proof.agrees("queue add-task").await;

    let mut daemon = start_daemon(root);
    assert!(
        eventually(Duration::from_secs(60), || started_stages(&ws)
            .contains(&"builder".to_string()))
        .await,
        "the daemon started the builder"
    );
    proof.agrees("daemon started (builder running)").await;

    assert!(
        eventually(Duration::from_secs(60), || started_stages(&ws)
            .contains(&"checker".to_string()))
        .await,
        "the checker stage started"
    );
    proof.agrees("a stage running (checker)").await;

    let done = root.join("millrace-agents/tasks/done/snap-task-1.md");
    assert!(
        eventually(Duration::from_secs(90), || done.is_file()).await,
        "the task finished"
    );
    proof.agrees("work finished").await;

    daemon.kill().expect("SIGKILL the daemon");
    daemon.wait().expect("reap the daemon");
    proof.agrees("daemon killed with SIGKILL").await;

    millrace(root, &["control", "clear-stale-state"]);
    let mut daemon = start_daemon(root);
    let lock = root.join("millrace-agents/state/runtime_daemon.lock.json");
    assert!(
        eventually(Duration::from_secs(30), || lock.is_file()).await,
        "the second daemon took the lock"
    );
    proof.agrees("daemon started again").await;

    millrace(root, &["control", "stop"]);
    let stopped = eventually(Duration::from_secs(30), || {
        matches!(daemon.try_wait(), Ok(Some(_)))
    })
    .await;
    assert!(stopped, "control stop ended the daemon");
    proof.agrees("control stop").await;

    // Another process edits the runtime's files: an unreadable ownership lock.
    let out = Command::new("sh")
        .args(["-c", "printf 'not json' > \"$1\"", "sh"])
        .arg(&lock)
        .output()
        .expect("sh");
    assert!(out.status.success());
    proof.agrees("files changed by another process").await;

    eprintln!(
        "bound used: {} ms (slowest millrace status {} ms); lags: {:?}",
        bound(proof.slowest_fresh).as_millis(),
        proof.slowest_fresh.as_millis(),
        proof
            .lags
            .iter()
            .map(|(c, d)| format!("{c}={}ms", d.as_millis()))
            .collect::<Vec<_>>()
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
}
