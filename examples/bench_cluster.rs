//! Figures for a NATS cluster: three real nats-servers with JetStream (R3 streams and
//! bucket) on loopback, two `millracer worker`s each knowing one server, and a client on the
//! third. Requests lost and run twice when the server one worker is connected to dies
//! (SIGKILL) mid-run, and during a rolling restart (one worker SIGTERMed and replaced);
//! the time from the server's death to that worker taking requests again.
//!
//! ```sh
//! scripts/setup.sh && cargo build --release && cargo run --release --example bench_cluster
//! ```
//!
//! Uses `.venv/bin/nats-server` (or `$MILLRACER_TEST_NATS_SERVER`) and
//! `target/release/millracer`. Requests are cheap on purpose (`enqueue` without text: it
//! takes its workspace's lane and the one-at-a-time `change` consumer and answers
//! `invalid_input`), so the figures measure the bus, not the runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use millracer::bus::subjects::{self, JobClass};
use serde_json::Value;

mod common;
use common::{
    WorkerProc, free_port, keys_of, last_after, longest_stall, nats_server_bin, publish, request,
    run_twice, wait_ready,
};

/// Three servers, as deploy/nats-cluster.conf describes them, on free loopback ports.
struct Cluster {
    children: Vec<Option<Child>>,
    client_ports: Vec<u16>,
    http_ports: Vec<u16>,
}

impl Cluster {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
        let route_urls = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut cluster = Self {
            children: Vec::new(),
            client_ports: Vec::new(),
            http_ports: Vec::new(),
        };
        for (i, route) in routes.iter().enumerate() {
            let store = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&store)?;
            let (port, http) = (free_port()?, free_port()?);
            let config = dir.join(format!("n{i}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: n{i}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: bench, listen: 127.0.0.1:{route}, routes: [{route_urls}] }}\n",
                    store.display()
                ),
            )?;
            cluster.children.push(Some(
                Command::new(nats_server_bin())
                    .arg("-c")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            ));
            cluster.client_ports.push(port);
            cluster.http_ports.push(http);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.ready() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the cluster elected no meta leader"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    /// Every server names the same meta leader, which sees the two others as current.
    fn ready(&self) -> bool {
        let mut leaders = Vec::new();
        let mut current = 0;
        for port in &self.http_ports {
            let Some(jsz) = http_get_json(*port, "/jsz") else {
                return false;
            };
            let leader = jsz["meta_cluster"]["leader"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if let Some(peers) = jsz["meta_cluster"]["replicas"].as_array() {
                current = current.max(peers.iter().filter(|p| p["current"] == true).count());
            }
            leaders.push(leader);
        }
        !leaders[0].is_empty() && leaders.iter().all(|l| *l == leaders[0]) && current >= 2
    }

    fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.client_ports[i])
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

fn http_get_json(port: u16, path: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
}

/// Waits for every id's record to be done; returns completion instants (by id) and the
/// ids never answered within `limit`.
async fn collect(
    kv: &jetstream::kv::Store,
    ids: &[String],
    keys: &[String],
    limit: Duration,
) -> (HashMap<String, Instant>, Vec<String>) {
    let mut done = HashMap::new();
    let deadline = Instant::now() + limit;
    while done.len() < ids.len() && Instant::now() < deadline {
        for (id, key) in ids.iter().zip(keys) {
            if done.contains_key(id) {
                continue;
            }
            if let Ok(Some(bytes)) = kv.get(key).await
                && serde_json::from_slice::<Value>(&bytes).is_ok_and(|r| r["state"] == "done")
            {
                done.insert(id.clone(), Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lost = ids
        .iter()
        .filter(|id| !done.contains_key(*id))
        .cloned()
        .collect();
    (done, lost)
}

/// How many of the requests under `keys` are done now.
async fn answered(kv: &jetstream::kv::Store, keys: &[String]) -> usize {
    let mut n = 0;
    for key in keys {
        if let Ok(Some(bytes)) = kv.get(key).await
            && serde_json::from_slice::<Value>(&bytes).is_ok_and(|r| r["state"] == "done")
        {
            n += 1;
        }
    }
    n
}

/// Publishes one request to the workspace only worker A serves, retrying while the
/// cluster fails over, and waits for its result: when A takes requests again.
async fn probe(js: &jetstream::Context, kv: &jetstream::kv::Store, id: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let message = jetstream::message::PublishMessage::build()
            .payload(request(id, "enqueue", Some("solo")).to_string().into())
            .message_id(subjects::result_key(Some("solo"), id));
        let stored = match js
            .send_publish(subjects::jobs_by_id("solo", JobClass::Change), message)
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if stored {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the probe was never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = subjects::result_key(Some("solo"), id);
    loop {
        if let Ok(Some(bytes)) = kv.get(&key).await
            && serde_json::from_slice::<Value>(&bytes).is_ok_and(|r| r["state"] == "done")
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the probe was never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    // Worker A alone also serves `solo`: a request for it shows A is taking requests.
    let solo = dir.path().join("solo");
    std::fs::create_dir_all(&solo)?;
    let mut with_solo = workspaces.clone();
    with_solo.push(("solo".to_string(), solo));
    let home_a = dir.path().join("home-a");
    let home_b = dir.path().join("home-b");
    std::fs::create_dir_all(&home_a)?;
    std::fs::create_dir_all(&home_b)?;
    let mut cluster = Cluster::start(dir.path())?;
    let _a = WorkerProc::spawn(
        &cluster.url(0),
        &with_solo,
        &home_a,
        &["--stream-replicas", "3"],
    )?;
    let mut b = WorkerProc::spawn(
        &cluster.url(1),
        &workspaces,
        &home_b,
        &["--stream-replicas", "3"],
    )?;
    let client = async_nats::connect(cluster.url(2)).await?;
    wait_ready(&client, 1 + 2 * with_solo.len()).await?;
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(subjects::RESULTS_BUCKET).await?;
    probe(&js, &kv, "probe-warm").await?;
    let lanes = workspaces.len();
    let m = 2000;
    let mut report = String::new();

    // 1. The server worker A is connected to dies (SIGKILL) mid-run.
    let ids: Vec<String> = (0..m).map(|i| format!("srv-{i}")).collect();
    publish(&js, &ids, &workspaces).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = answered(&kv, &keys_of(&ids, &workspaces)).await;
    let killed = Instant::now();
    cluster.kill(0);
    if let Err(err) = probe(&js, &kv, "probe-after-kill").await {
        let log = std::fs::read_to_string(home_a.join("worker.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "worker A's log (last lines, newest first):\n{}",
            tail.join("\n")
        );
        return Err(err);
    }
    let back = killed.elapsed();
    let (done, lost) = collect(
        &kv,
        &ids,
        &keys_of(&ids, &workspaces),
        Duration::from_secs(120),
    )
    .await;
    let twice = run_twice(&js, &ids).await?;
    report.push_str(&format!(
        "| server SIGKILL (worker A's) during {m} changes over {lanes} workspaces ({before} answered at the kill) | lost {} | run twice {} | worker A answers again {back:.2?} after the death | longest per-workspace stall {:.2?} | all answered {:.2?} after the kill |\n",
        lost.len(),
        twice,
        longest_stall(&ids, &done, killed, lanes),
        last_after(&done, killed),
    ));

    // 2. Rolling restart: worker B is stopped (SIGTERM) and replaced mid-run.
    let ids: Vec<String> = (0..m).map(|i| format!("roll-{i}")).collect();
    publish(&js, &ids, &workspaces).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = answered(&kv, &keys_of(&ids, &workspaces)).await;
    let stopped = Instant::now();
    let stop = b.stop()?;
    let _b2 = WorkerProc::spawn(
        &format!("{},{}", cluster.url(1), cluster.url(2)),
        &workspaces,
        &home_b,
        &["--stream-replicas", "3"],
    )?;
    let (done, lost) = collect(
        &kv,
        &ids,
        &keys_of(&ids, &workspaces),
        Duration::from_secs(120),
    )
    .await;
    let twice = run_twice(&js, &ids).await?;
    report.push_str(&format!(
        "| rolling restart (worker B SIGTERM, exits in {stop:.2?}, replaced) during {m} changes ({before} answered at the stop) | lost {} | run twice {} | longest per-workspace stall {:.2?} | all answered {:.2?} after the stop |\n",
        lost.len(),
        twice,
        longest_stall(&ids, &done, stopped, lanes),
        last_after(&done, stopped),
    ));
    println!("{report}");
    Ok(())
}
