//! The pi runner's two figures, measured side by side in one run against one scripted
//! model server (`tests/support/model_server.py`) and the real `pi`:
//!
//! (a) harness overhead per RPC turn: millracer's pi harness (`PiSession::complete`) vs a
//!     raw pi RPC round trip (write the prompt line, read until `agent_end`), both on warm
//!     `pi --mode rpc` processes with the same command line, turns interleaved;
//! (b) `millracer run` with two turns (decision + direct) vs the reference
//!     `millracer==0.2.0 run`, same task, same server, same pi, runs interleaved.
//!
//! Run: `scripts/setup.sh && cargo bench --bench pi_runner`. The reference is
//! `$MILLRACER_REF`, else `.venv-ref/bin/millracer`, installed by `scripts/setup.sh`
//! (`millracer==0.2.0` with `millrace-ai==0.21.1`, pinned together).
//! Knobs: `BENCH_TURNS` (default 300 per side), `BENCH_RUNS` (default 15 per side).

use std::io::{BufRead, BufReader as StdBufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use millracer::agent::pi::{PiConfig, PiRunner, SessionKind};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn pi_bin() -> PathBuf {
    let path = std::env::var_os("MILLRACER_TEST_PI")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".tools/pi/node_modules/.bin/pi"));
    assert!(
        path.is_file(),
        "pi not found at {}: run scripts/setup.sh",
        path.display()
    );
    path
}

/// The reference CLI (`millracer==0.2.0` with `millrace-ai==0.21.1`, pinned together):
/// `$MILLRACER_REF`, else `.venv-ref/bin/millracer` as `scripts/setup.sh` installs it; run
/// `scripts/setup.sh` when it is missing or its pins are not the ones it recorded.
fn reference_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MILLRACER_REF") {
        return PathBuf::from(path);
    }
    let venv = repo().join(".venv-ref");
    let bin = venv.join("bin/millracer");
    let stamp = std::fs::read_to_string(venv.join(".millracer-setup-stamp")).unwrap_or_default();
    assert!(
        bin.is_file() && stamp == "millracer==0.2.0 millrace-ai==0.21.1",
        "the reference (millracer==0.2.0 with millrace-ai==0.21.1) is not installed in {}: run scripts/setup.sh",
        venv.display()
    );
    bin
}

/// The scripted server and pi's private state (agent dir, HOME, working directory).
struct Setup {
    dir: tempfile::TempDir,
    server: std::process::Child,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("script.json");
        std::fs::write(
            &script,
            json!({"replies": [
                {"when": "Decide whether this task", "repeat": true,
                 "text": "```json\n{\"decision\": \"direct\", \"why\": \"small\"}\n```"},
                {"when": "Handle this task directly", "repeat": true, "text": "done"},
            ], "default": {"text": "pong"}})
            .to_string(),
        )
        .expect("script");
        let mut server = Command::new("python3")
            .arg(repo().join("tests/support/model_server.py"))
            .arg("--script")
            .arg(&script)
            .arg("--log")
            .arg(dir.path().join("requests.jsonl"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("model server");
        let mut line = String::new();
        StdBufReader::new(server.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("port line");
        let port: u16 = line
            .trim()
            .trim_start_matches("PORT ")
            .parse()
            .expect("port");
        let agent = dir.path().join("agent");
        for d in ["agent", "home", "work"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("dir");
        }
        std::fs::write(
            agent.join("models.json"),
            json!({"providers": {"fake": {"baseUrl": format!("http://127.0.0.1:{port}/v1"),
                "api": "openai-completions", "apiKey": "k",
                "compat": {"supportsDeveloperRole": false, "supportsReasoningEffort": false},
                "models": [{"id": "fake-chat", "reasoning": false, "input": ["text"],
                    "contextWindow": 128000, "maxTokens": 4096}]}}})
            .to_string(),
        )
        .expect("models.json");
        std::fs::write(
            agent.join("settings.json"),
            json!({"defaultProvider": "fake", "defaultModel": "fake-chat", "quietStartup": true,
                "enableInstallTelemetry": false,
                "retry": {"enabled": false, "provider": {"maxRetries": 0, "timeoutMs": 30000}}})
            .to_string(),
        )
        .expect("settings.json");
        // pi and everything started here see only the private state.
        // SAFETY: set before any thread of this process reads the environment.
        unsafe {
            std::env::set_var("PI_CODING_AGENT_DIR", &agent);
            std::env::set_var("PI_OFFLINE", "1");
            std::env::set_var("PI_TELEMETRY", "0");
            std::env::set_var("HOME", dir.path().join("home"));
        }
        Setup { dir, server }
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn config() -> PiConfig {
    PiConfig {
        command: pi_bin().display().to_string(),
        provider: Some("fake".into()),
        model: Some("fake-chat".into()),
        kind: SessionKind::Rpc,
        ..PiConfig::default()
    }
}

/// A bare `pi --mode rpc` client: the least any caller must do for one turn.
struct RawPi {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    n: u64,
}

impl RawPi {
    fn start(cwd: &Path) -> Self {
        let mut child = tokio::process::Command::new(pi_bin())
            .args(config().rpc_args())
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("raw pi");
        let stdin = child.stdin.take().expect("stdin");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        RawPi {
            child,
            stdin,
            lines,
            n: 0,
        }
    }

    async fn turn(&mut self, prompt: &str) {
        self.n += 1;
        let line = format!(
            "{}\n",
            json!({"id": format!("prompt-{}", self.n), "type": "prompt", "message": prompt})
        );
        self.stdin.write_all(line.as_bytes()).await.expect("write");
        self.stdin.flush().await.expect("flush");
        while let Some(line) = self.lines.next_line().await.expect("read") {
            if line.starts_with("{\"type\":\"agent_end\"") {
                return;
            }
        }
        panic!("raw pi ended");
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Stats {
    p50: f64,
    p90: f64,
    mean: f64,
    n: usize,
}

fn stats(mut samples: Vec<f64>) -> Stats {
    samples.sort_by(f64::total_cmp);
    Stats {
        p50: percentile(&samples, 50.0),
        p90: percentile(&samples, 90.0),
        mean: samples.iter().sum::<f64>() / samples.len().max(1) as f64,
        n: samples.len(),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn figure_a(setup: &Setup) -> (Stats, Stats) {
    let turns = env_usize("BENCH_TURNS", 300);
    let work = setup.work();
    let mut raw = RawPi::start(&work);
    let session = PiRunner::new(config()).session(&work);
    // Warm both: start-up, first requests, JIT.
    for _ in 0..20 {
        raw.turn("ping").await;
        session.complete("ping").await.expect("harness turn");
    }
    let (mut raw_ms, mut ours_ms) = (Vec::new(), Vec::new());
    // Interleaved in small blocks, so both see the same machine.
    for block in 0..turns.div_ceil(10) {
        for side in [block % 2, 1 - block % 2] {
            for _ in 0..10 {
                let start = Instant::now();
                if side == 0 {
                    raw.turn("ping").await;
                    raw_ms.push(start.elapsed().as_secs_f64() * 1e3);
                } else {
                    session.complete("ping").await.expect("harness turn");
                    ours_ms.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    }
    session.close().await;
    drop(raw.stdin);
    let _ = raw.child.wait().await;
    (stats(raw_ms), stats(ours_ms))
}

/// Wall time of one `run` (the two-turn direct route).
fn time_run(program: &Path, extra: &[&str], work: &Path) -> f64 {
    let start = Instant::now();
    let out = Command::new(program)
        .arg("run")
        .args([
            "--pi-command",
            &pi_bin().display().to_string(),
            "--provider",
            "fake",
            "--model",
            "fake-chat",
            "--workspace",
            &work.display().to_string(),
        ])
        .args(extra)
        .arg("Say hello")
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let elapsed = start.elapsed().as_secs_f64();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == "done\n",
        "{} failed: {}\n{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

fn figure_b(setup: &Setup) -> (Stats, Stats) {
    let runs = env_usize("BENCH_RUNS", 15);
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_millracer"));
    let reference = reference_bin();
    let work = setup.work();
    // One of each first, not counted: file caches, the reference's bytecode.
    time_run(&reference, &[], &work);
    time_run(&ours, &["--transport", "local"], &work);
    let (mut ref_s, mut ours_s) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            if side == 0 {
                ref_s.push(time_run(&reference, &[], &work));
            } else {
                ours_s.push(time_run(&ours, &["--transport", "local"], &work));
            }
        }
    }
    (stats(ref_s), stats(ours_s))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without
    // it, and a minute of benchmarking (plus installing the reference) is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("pi_runner: a benchmark; run it with `cargo bench --bench pi_runner`");
        return;
    }
    let setup = Setup::new();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {} cores, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (raw, ours) = runtime.block_on(figure_a(&setup));
    println!("\n(a) one warm RPC turn (prompt -> answer), ms");
    println!(
        "    raw pi RPC round trip   p50 {:7.2}  p90 {:7.2}  mean {:7.2}  n={}",
        raw.p50, raw.p90, raw.mean, raw.n
    );
    println!(
        "    millracer pi harness    p50 {:7.2}  p90 {:7.2}  mean {:7.2}  n={}",
        ours.p50, ours.p90, ours.mean, ours.n
    );
    println!(
        "    ratio harness/raw       p50 {:.3}x  mean {:.3}x   (target <= 1.2x)",
        ours.p50 / raw.p50,
        ours.mean / raw.mean
    );
    let (reference, ours) = figure_b(&setup);
    println!("\n(b) `run` with two turns (decision + direct), wall time, s");
    println!(
        "    reference millracer 0.2.0  p50 {:6.3}  p90 {:6.3}  mean {:6.3}  n={}",
        reference.p50, reference.p90, reference.mean, reference.n
    );
    println!(
        "    millracer (this build)     p50 {:6.3}  p90 {:6.3}  mean {:6.3}  n={}",
        ours.p50, ours.p90, ours.mean, ours.n
    );
    println!(
        "    ratio ours/reference       p50 {:.3}x  mean {:.3}x   (target <= 1x)",
        ours.p50 / reference.p50,
        ours.mean / reference.mean
    );
}
