//! Figures for durable intake, on a private nats-server and real `millracer worker`s:
//! requests lost and run twice under a worker kill and a broker restart, the time to recover
//! from each, and durable submission throughput against core request/reply in one run.
//!
//! ```sh
//! scripts/setup.sh && cargo build --release && cargo run --release --example bench_durable
//! ```
//!
//! Uses `.venv/bin/nats-server` (or `$MILLRACER_TEST_NATS_SERVER`) and the `millracer` binary
//! next to this example's directory (`target/release/millracer`). Requests are cheap on
//! purpose (`enqueue` without text: it takes its workspace's lane and answers
//! `invalid_input`; `list_workspaces` for throughput), so the figures measure the bus, not
//! the runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use millracer::bus::subjects;
use serde_json::Value;

mod common;
use common::{
    WorkerProc, free_port, keys_of, last_after, longest_stall, nats_server_bin, publish, request,
    run_twice, wait_ready,
};
use tokio::sync::oneshot;

struct Server {
    child: Child,
    port: u16,
    store: PathBuf,
}

impl Server {
    fn start(store: &Path, port: u16) -> anyhow::Result<Self> {
        Ok(Self {
            child: Self::spawn(store, port)?,
            port,
            store: store.to_path_buf(),
        })
    }

    fn spawn(store: &Path, port: u16) -> anyhow::Result<Child> {
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    fn restart(&mut self) -> anyhow::Result<Duration> {
        let down = Instant::now();
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.store, self.port)?;
        Ok(down.elapsed())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client's own result wait: one KV watch on the results bucket (started before
/// anything is published), each `done` record handed to whoever waits for its key. Every
/// completion instant is when the client learns of the result, as an adapter would.
#[derive(Clone)]
struct Results {
    done: Arc<Mutex<HashMap<String, Instant>>>,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Instant>>>>,
}

impl Results {
    async fn watch(kv: &jetstream::kv::Store) -> anyhow::Result<Self> {
        let mut watch = kv.watch_all().await?;
        let this = Self {
            done: Arc::default(),
            waiting: Arc::default(),
        };
        let inner = this.clone();
        tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                if entry.operation != jetstream::kv::Operation::Put
                    || !serde_json::from_slice::<Value>(&entry.value)
                        .is_ok_and(|r| r["state"] == "done")
                {
                    continue;
                }
                let now = Instant::now();
                let mut done = inner.done.lock().unwrap_or_else(|e| e.into_inner());
                if done.contains_key(&entry.key) {
                    continue;
                }
                done.insert(entry.key.clone(), now);
                drop(done);
                if let Some(tx) = inner
                    .waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&entry.key)
                {
                    let _ = tx.send(now);
                }
            }
        });
        Ok(this)
    }

    /// A receiver that resolves when `key` is done (at once if it is already).
    fn wait(&self, key: &str) -> oneshot::Receiver<Instant> {
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = self
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
        {
            let _ = tx.send(at);
        } else {
            waiting.insert(key.to_string(), tx);
        }
        rx
    }

    /// How many of `keys` are done now.
    fn answered(&self, keys: &[String]) -> usize {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter().filter(|k| done.contains_key(*k)).count()
    }
}

/// Waits for every id's result through the watch; returns completion instants (by id) and
/// the ids never answered within `limit`.
async fn collect(
    results: &Results,
    ids: &[String],
    keys: &[String],
    limit: Duration,
) -> (HashMap<String, Instant>, Vec<String>) {
    let waits = ids
        .iter()
        .zip(keys)
        .map(|(id, key)| {
            let rx = results.wait(key);
            let id = id.clone();
            async move { (id, rx.await.ok()) }
        })
        .collect::<Vec<_>>();
    let all = futures::future::join_all(waits);
    let mut done = HashMap::new();
    if let Ok(answers) = tokio::time::timeout(limit, all).await {
        for (id, at) in answers {
            if let Some(at) = at {
                done.insert(id, at);
            }
        }
    } else {
        let now = results
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (id, key) in ids.iter().zip(keys) {
            if let Some(at) = now.get(key) {
                done.insert(id.clone(), *at);
            }
        }
    }
    let lost = ids
        .iter()
        .filter(|id| !done.contains_key(*id))
        .cloned()
        .collect();
    (done, lost)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let workspaces: Vec<(String, PathBuf)> = (0..4)
        .map(|i| {
            let path = dir.path().join(format!("ws{i}"));
            std::fs::create_dir_all(&path).map(|()| (format!("w{i}"), path))
        })
        .collect::<Result<_, _>>()?;
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home)?;
    let store = dir.path().join("js");
    let mut server = Server::start(&store, free_port()?)?;
    let url = server.url();
    let mut a = WorkerProc::spawn(&url, &workspaces, &home, &[])?;
    let _b = WorkerProc::spawn(&url, &workspaces, &home, &[])?;
    let client = async_nats::connect(&url).await?;
    wait_ready(&client, 1 + 2 * workspaces.len()).await?;
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(subjects::RESULTS_BUCKET).await?;
    let mut report = String::new();

    let results = Results::watch(&kv).await?;

    // 1. Throughput: the same cheap read, durable vs core request/reply, each with at most
    //    64 requests outstanding, in ABBA rounds (durable, core, core, durable). A durable
    //    request is done when the client's watch sees its result.
    let n = 2000;
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut failed: HashMap<&str, usize> = HashMap::new();
    for (round, side) in ["durable", "core", "core", "durable"]
        .into_iter()
        .enumerate()
    {
        let started = Instant::now();
        let ok = if side == "durable" {
            futures::stream::iter(0..n)
                .map(|i| {
                    let js = js.clone();
                    let results = results.clone();
                    async move {
                        let id = format!("tp-{round}-{i}");
                        let key = subjects::result_key(None, &id);
                        let done = results.wait(&key);
                        let message = jetstream::message::PublishMessage::build()
                            .payload(request(&id, "list_workspaces", None).to_string().into())
                            .message_id(key);
                        let Ok(ack) = js.send_publish(subjects::jobs_any(), message).await else {
                            return false;
                        };
                        if ack.await.is_err() {
                            return false;
                        }
                        tokio::time::timeout(Duration::from_secs(60), done)
                            .await
                            .is_ok_and(|r| r.is_ok())
                    }
                })
                .buffer_unordered(64)
                .filter(|ok| futures::future::ready(*ok))
                .count()
                .await
        } else {
            futures::stream::iter(0..n)
                .map(|i| {
                    let client = client.clone();
                    async move {
                        let body = request(&format!("core-{round}-{i}"), "list_workspaces", None)
                            .to_string();
                        client
                            .request(subjects::request_any(), body.into())
                            .await
                            .is_ok_and(|m| {
                                serde_json::from_slice::<Value>(&m.payload)
                                    .is_ok_and(|r| r["status"] == "succeeded")
                            })
                    }
                })
                .buffer_unordered(64)
                .filter(|ok| futures::future::ready(*ok))
                .count()
                .await
        };
        rates
            .entry(side)
            .or_default()
            .push(ok as f64 / started.elapsed().as_secs_f64());
        *failed.entry(side).or_default() += n - ok;
    }
    let show = |side: &str| {
        rates[side]
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    report.push_str(&format!(
        "| throughput, {n} list_workspaces per round, 64 outstanding, rounds durable/core/core/durable | durable (publish, result seen by a KV watch): {} req/s, {} failed | core request/reply: {} req/s, {} failed |\n",
        show("durable"),
        failed["durable"],
        show("core"),
        failed["core"],
    ));

    // 2. Worker kill -9 mid-stream.
    let m = 4000;
    let lanes = workspaces.len();
    let ids: Vec<String> = (0..m).map(|i| format!("kill-{i}")).collect();
    publish(&js, &ids, &workspaces).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = Instant::now();
    a.kill();
    let before = results.answered(&keys_of(&ids, &workspaces));
    let _c = WorkerProc::spawn(&url, &workspaces, &home, &[])?;
    let (done, lost) = collect(
        &results,
        &ids,
        &keys_of(&ids, &workspaces),
        Duration::from_secs(120),
    )
    .await;
    let twice = run_twice(&js, &ids).await?;
    report.push_str(&format!(
        "| worker SIGKILL during {m} changes over {lanes} workspaces ({before} answered at the kill) | lost {} | run twice {} | recovery (longest per-workspace stall, ack wait 3 s) {:.2?} | all answered {:.2?} after the kill |\n",
        lost.len(),
        twice,
        longest_stall(&ids, &done, killed, lanes),
        last_after(&done, killed),
    ));

    // 3. Broker restart mid-stream.
    let ids: Vec<String> = (0..m).map(|i| format!("restart-{i}")).collect();
    publish(&js, &ids, &workspaces).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = results.answered(&keys_of(&ids, &workspaces));
    let restarted = Instant::now();
    let outage = server.restart()?;
    let (done, lost) = collect(
        &results,
        &ids,
        &keys_of(&ids, &workspaces),
        Duration::from_secs(120),
    )
    .await;
    let twice = run_twice(&js, &ids).await?;
    report.push_str(&format!(
        "| nats-server SIGKILL + restart (same store) during {m} changes ({before} answered at the kill) | lost {} | run twice {} | outage {:.2?}; recovery (longest per-workspace stall) {:.2?} | all answered {:.2?} after the kill |\n",
        lost.len(),
        twice,
        outage,
        longest_stall(&ids, &done, restarted, lanes),
        last_after(&done, restarted),
    ));
    println!("{report}");
    Ok(())
}
