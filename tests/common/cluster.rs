//! A private 3-server JetStream cluster on loopback: each server with its own client,
//! route and monitoring port (free ports picked at start), its own store, config and log,
//! all in one temporary directory. Started from `MILLRACER_TEST_NATS_SERVER`; ready once
//! JetStream has a meta leader. Killed on drop.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{log_sink, nats_server_bin, read_log};

/// How long a cluster may take to elect its JetStream meta leader.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One server of a [`NatsCluster`].
struct Member {
    name: String,
    client_port: u16,
    http_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// See the module docs.
pub struct NatsCluster {
    dir: TempDir,
    members: Vec<Member>,
}

/// A port free right now on 127.0.0.1 (the listener is closed before the server binds it;
/// a clash fails the start loudly, never silently).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl NatsCluster {
    /// Starts `size` servers (3 for a quorum that survives one death) and waits until
    /// every one accepts clients and JetStream has a meta leader.
    pub fn start(size: usize) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("millracer-cluster-")
            .tempdir()
            .expect("cluster temp dir");
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_urls = routes
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let mut members = Vec::new();
        for (i, route_port) in routes.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            fs::create_dir_all(&store).expect("store dir");
            let client_port = free_port();
            let http_port = free_port();
            let config = dir.path().join(format!("{name}.conf"));
            fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{http_port}\n\
                     jetstream {{ store_dir: \"{}\", max_memory_store: 64MB, max_file_store: 1GB }}\n\
                     cluster {{ name: millracer-test, listen: 127.0.0.1:{route_port}, routes: [{route_urls}] }}\n",
                    store.display()
                ),
            )
            .expect("write server config");
            members.push(Member {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port,
                http_port,
                config,
                child: None,
            });
        }
        let mut cluster = Self { dir, members };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster.wait_ready();
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let member = &mut self.members[i];
        let (stdout, stderr) = log_sink(&member.log);
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&member.config)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {}: {err}", bin.display()));
        member.child = Some(child);
    }

    /// Every live server accepts TCP, and a live server's `/jsz` names a meta leader
    /// among the live servers with a quorum.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + CLUSTER_READY_TIMEOUT;
        loop {
            for member in &mut self.members {
                if let Some(child) = &mut member.child
                    && let Ok(Some(status)) = child.try_wait()
                {
                    panic!(
                        "nats-server {} exited with {status}\n{}",
                        member.name,
                        read_log(&member.log)
                    );
                }
            }
            let leader = self.meta_leader();
            if leader.is_some() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the JetStream cluster elected no meta leader within {CLUSTER_READY_TIMEOUT:?}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The JetStream meta leader, once every live server's monitoring endpoint (`/jsz`)
    /// names the same live server and that leader sees every other live server as a
    /// current peer (before that, creating an R3 stream can fail for want of peers).
    pub fn meta_leader(&self) -> Option<String> {
        let live: Vec<&Member> = self.members.iter().filter(|m| m.child.is_some()).collect();
        let mut agreed: Option<String> = None;
        for member in &live {
            let jsz = http_get_json(member.http_port, "/jsz")?;
            let leader = jsz["meta_cluster"]["leader"].as_str()?.to_string();
            if !live.iter().any(|m| m.name == leader)
                || agreed.as_ref().is_some_and(|a| *a != leader)
            {
                return None;
            }
            agreed = Some(leader);
        }
        let leader = agreed?;
        let member = live.iter().find(|m| m.name == leader)?;
        let jsz = http_get_json(member.http_port, "/jsz")?;
        let current = jsz["meta_cluster"]["replicas"]
            .as_array()?
            .iter()
            .filter(|r| r["current"] == true && live.iter().any(|m| r["name"] == m.name.as_str()))
            .count();
        (current + 1 >= live.len()).then_some(leader)
    }

    /// The client URL of server `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every server's client URL, comma-separated (as `--nats-url` takes them).
    pub fn urls(&self) -> String {
        (0..self.members.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The server name of member `i` (`n1`, `n2`, …).
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    /// Kills server `i` with SIGKILL (a crash) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server `i` again on its ports and store, and waits for the cluster.
    pub fn start_again(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready();
    }

    /// A client connected to server `i` only (it still learns the others from the
    /// cluster).
    pub async fn client(&self, i: usize) -> async_nats::Client {
        async_nats::connect(self.url(i))
            .await
            .unwrap_or_else(|err| panic!("connect to {}: {err}", self.url(i)))
    }

    /// Where the stores, configs and logs are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of every server's log.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = read_log(&m.log);
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "----- nats-server {} log (last 60 lines) -----\n{}",
                    m.name,
                    lines[lines.len().saturating_sub(60)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// `GET path` on the monitoring port; the JSON body, or `None` when the server does not
/// answer (yet).
fn http_get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}
