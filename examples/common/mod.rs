//! What the durable and cluster figures share: the binaries, a worker process, cheap
//! requests published durably, and how their answers are counted. Each example uses a
//! part of it, hence `dead_code` allowed here.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use millracer::bus::subjects::{self, JobClass};
use serde_json::{Value, json};

pub fn nats_server_bin() -> PathBuf {
    std::env::var_os("MILLRACER_TEST_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server"))
}

pub fn millracer_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    let bin = dir.join("millracer");
    anyhow::ensure!(
        bin.is_file(),
        "{} missing: run cargo build --release first",
        bin.display()
    );
    Ok(bin)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn request(id: &str, action: &str, workspace: Option<&str>) -> Value {
    json!({
        "schema_version": "millracer.ops.v0.2", "request_id": id,
        "workspace_ref": workspace.map_or(json!({}), |w| json!({"workspace_id": w})),
        "source": {"kind": "cli", "surface": "bench"}, "action": action, "input": {},
    })
}

pub async fn wait_ready(client: &async_nats::Client, consumers: usize) -> anyhow::Result<()> {
    let js = jetstream::new(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut stream) = js.get_stream(subjects::JOBS_STREAM).await
            && let Ok(info) = stream.info().await
            && info.state.consumer_count >= consumers
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "workers not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The result keys of `ids` published by [`publish`] (round-robin over `workspaces`), or of
/// workspace-less requests when `workspaces` is empty.
pub fn keys_of(ids: &[String], workspaces: &[(String, PathBuf)]) -> Vec<String> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let ws = (!workspaces.is_empty()).then(|| workspaces[i % workspaces.len()].0.as_str());
            subjects::result_key(ws, id)
        })
        .collect()
}

/// Publishes `ids` durably (change class, round-robin over `workspaces`).
pub async fn publish(
    js: &jetstream::Context,
    ids: &[String],
    workspaces: &[(String, PathBuf)],
) -> anyhow::Result<()> {
    let mut acks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let ws = &workspaces[i % workspaces.len()].0;
        let body = request(id, "enqueue", Some(ws)).to_string();
        let message = jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(subjects::result_key(Some(ws), id));
        acks.push(
            js.send_publish(subjects::jobs_by_id(ws, JobClass::Change), message)
                .await?,
        );
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}

/// How many of `ids` started more than once (their `request.started` frames).
pub async fn run_twice(js: &jetstream::Context, ids: &[String]) -> anyhow::Result<usize> {
    let stream = js.get_stream(subjects::FRAMES_STREAM).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::frames_of_workspace(None),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut started: HashMap<String, usize> = HashMap::new();
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(2), messages.next()).await
    {
        if let Ok(frame) = serde_json::from_slice::<Value>(&message.payload)
            && frame["event_type"] == "request.started"
        {
            *started
                .entry(frame["request_id"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
    }
    Ok(ids
        .iter()
        .filter(|id| started.get(*id).copied().unwrap_or(0) > 1)
        .count())
}

/// How long after `from` the last of `done` was answered.
pub fn last_after(done: &HashMap<String, Instant>, from: Instant) -> Duration {
    done.values()
        .max()
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(from))
}

/// The longest pause between consecutive completions of one workspace after `from`
/// (requests are spread round-robin over `lanes` workspaces): how long a workspace waited
/// to recover.
pub fn longest_stall(
    ids: &[String],
    done: &HashMap<String, Instant>,
    from: Instant,
    lanes: usize,
) -> Duration {
    let mut worst = Duration::ZERO;
    for lane in 0..lanes {
        let mut times: Vec<Instant> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % lanes == lane)
            .filter_map(|(_, id)| done.get(id).copied())
            .filter(|t| *t >= from)
            .collect();
        times.sort();
        let mut prev = from;
        for t in times {
            worst = worst.max(t - prev);
            prev = t;
        }
    }
    worst
}

/// A `millracer worker` process, killed when dropped.
pub struct WorkerProc(Child);

impl WorkerProc {
    /// `millracer worker --nats-url URL --ack-wait-seconds 3 <extra…> --workspace ID=PATH…`
    /// with `HOME` = `home`; its log goes to `home/worker.log` (appended), to be read when
    /// a figure fails.
    pub fn spawn(
        url: &str,
        workspaces: &[(String, PathBuf)],
        home: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(millracer_bin()?);
        cmd.args(["worker", "--nats-url", url, "--ack-wait-seconds", "3"])
            .args(extra);
        for (id, path) in workspaces {
            cmd.arg("--workspace")
                .arg(format!("{id}={}", path.display()));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(home.join("worker.log"))?;
        Ok(Self(
            cmd.env("HOME", home)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()?,
        ))
    }
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    /// SIGTERM, then waits for the exit (a graceful stop); how long it took.
    pub fn stop(&mut self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.0.try_wait()?.is_none() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "worker did not stop within 120 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(started.elapsed())
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.kill();
    }
}
