//! Side-by-side benchmarks of the millracer worker: against a bare async-nats echo
//! responder on the same private broker, and against the Python reference
//! (`millracer==0.2.0`) on the same kind of workspace. Everything runs on this machine:
//! a private `nats-server`, real Millrace workspaces (`millrace init`), release-built
//! `millracer worker` processes and, for delegated work, the real `millrace` daemon whose
//! stages are answered by the stand-in runner (`tests/support/stand_in_pi.py`).
//!
//! ```text
//! cargo run --release --example bench -- [--quick] [which ...]
//! ```
//! `which`: `roundtrip` (1), `inspect-throughput` (2), `ops-status` (3), `memory` (4),
//! `monitor-cpu` (5), `detection` (6), `status-throughput` (7), `status-paced` (8),
//! `enqueue-exit` (9), `memory-after-load` (10), or `all` (default).
//! `--quick` shrinks every figure for a smoke run; its numbers are not the documented ones.
//! `scripts/bench.sh` builds everything, installs the reference and runs this.
//!
//! Tools: `MILLRACER_BENCH_NATS_SERVER`, `MILLRACER_BENCH_MILLRACE`,
//! `MILLRACER_BENCH_REFERENCE` (the reference's `millracer`), defaulting to
//! `.venv/bin/nats-server`, `.venv/bin/millrace` and `.venv-ref/bin/millracer` in the
//! repository. The worker binary is `millracer` next to this example's directory
//! (`target/release/millracer`).

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use millracer::bus::subjects;
use serde_json::{Value, json};

/// Marks every process the bench starts (inherited by what those start: daemons,
/// runners), so cleanup finds exactly those.
const OWNER_VAR: &str = "MILLRACER_BENCH_OWNER";
const SCHEMA: &str = "millracer.ops.v0.2";
/// The echo responder's subject (a bench subject, not one of millracer's).
const ECHO_SUBJECT: &str = "bench.echo";
const ECHO_QUEUE: &str = "bench-echo";
/// The workspace id every bench worker serves.
const WS_ID: &str = "bench";

const FIGURES: [(&str, &str); 11] = [
    ("1", "roundtrip"),
    ("2", "inspect-throughput"),
    ("3", "ops-status"),
    ("4", "memory"),
    ("5", "monitor-cpu"),
    ("6", "detection"),
    ("7", "status-throughput"),
    ("8", "status-paced"),
    ("9", "enqueue-exit"),
    ("10", "memory-after-load"),
    ("11", "operator"),
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__echo") {
        return echo_main(args.get(1).context("__echo needs a NATS URL")?);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mut which = BTreeSet::new();
    for arg in args.iter().filter(|a| !a.starts_with("--")) {
        if arg == "all" {
            which.extend(FIGURES.iter().map(|(n, _)| *n));
            continue;
        }
        match FIGURES.iter().find(|(n, name)| arg == n || arg == name) {
            Some((n, _)) => {
                which.insert(*n);
            }
            None => bail!(
                "unknown benchmark {arg:?}; one of: all, {}",
                FIGURES
                    .iter()
                    .map(|(_, name)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    if which.is_empty() {
        which.extend(FIGURES.iter().map(|(n, _)| *n));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(which, quick))
}

async fn run(which: BTreeSet<&str>, quick: bool) -> anyhow::Result<()> {
    let ctx = Ctx::new(quick)?;
    eprintln!(
        "bench: {} cores, load average {} (at start){}",
        cores(),
        loadavg(),
        if quick {
            "; QUICK run: sizes below the documented minimums"
        } else {
            ""
        }
    );
    let mut report = Report::default();
    for n in &which {
        let name = FIGURES.iter().find(|(k, _)| k == n).map_or("", |(_, v)| *v);
        eprintln!("bench: [{n}] {name} …");
        let started = Instant::now();
        let outcome = match *n {
            "1" => roundtrip(&ctx, &mut report).await,
            "2" => inspect_throughput(&ctx, &mut report).await,
            "3" => ops_status(&ctx, &mut report).await,
            "4" => memory(&ctx, &mut report).await,
            "5" => monitor_cpu(&ctx, &mut report).await,
            "6" => detection(&ctx, &mut report).await,
            "7" => status_throughput(&ctx, &mut report).await,
            "8" => status_paced(&ctx, &mut report).await,
            "9" => enqueue_exit(&ctx, &mut report).await,
            "10" => memory_after_load(&ctx, &mut report).await,
            "11" => operator(&ctx, &mut report).await,
            _ => unreachable!("validated above"),
        };
        if let Err(err) = outcome {
            report.note(format!("[{n}] {name} FAILED: {err:#}"));
            eprintln!("bench: [{n}] {name} failed: {err:#}");
        }
        eprintln!(
            "bench: [{n}] {name} done in {:.1} s (load average {})",
            started.elapsed().as_secs_f64(),
            loadavg()
        );
    }
    report.print(quick);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Sizes {
    /// Sequential requests per side (worker, echo) after warm-up.
    rtt_per_side: usize,
    /// Requests per block; blocks alternate worker/echo (ABBA).
    rtt_block: usize,
    rtt_warmup: usize,
    /// Measured window of the load figures, after the warm-up.
    load_window: Duration,
    load_warmup: Duration,
    inspect_clients: usize,
    status_clients: usize,
    /// `ops --json` runs per side.
    ops_runs: usize,
    /// Requests made to wait in the worker.
    waiting: usize,
    monitor_window: Duration,
    /// The stand-in builder's delay while monitoring is measured.
    builder_delay: f64,
    /// Sequential task enqueues for detection latency (3 stage completions each).
    detect_tasks: usize,
    /// How long the reference's sequential `ops --json status` runs go on.
    reference_window: Duration,
    /// Rounds of the operator read actions, and cancels measured.
    operator_rounds: usize,
    operator_cancels: usize,
}

impl Sizes {
    fn full() -> Self {
        Self {
            rtt_per_side: 6_000,
            rtt_block: 500,
            rtt_warmup: 1_000,
            load_window: Duration::from_secs(10),
            load_warmup: Duration::from_secs(2),
            inspect_clients: 32,
            status_clients: 8,
            ops_runs: 12,
            waiting: 1_000,
            monitor_window: Duration::from_secs(25),
            builder_delay: 45.0,
            detect_tasks: 11,
            reference_window: Duration::from_secs(10),
            operator_rounds: 15,
            operator_cancels: 3,
        }
    }

    fn quick() -> Self {
        Self {
            rtt_per_side: 1_000,
            rtt_block: 250,
            rtt_warmup: 200,
            load_window: Duration::from_secs(3),
            load_warmup: Duration::from_secs(1),
            inspect_clients: 32,
            status_clients: 8,
            ops_runs: 3,
            waiting: 1_000,
            monitor_window: Duration::from_secs(8),
            builder_delay: 20.0,
            detect_tasks: 2,
            reference_window: Duration::from_secs(3),
            operator_rounds: 3,
            operator_cancels: 1,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Context: tools, temporary directory, process marks
// ---------------------------------------------------------------------------------------

struct Ctx {
    sizes: Sizes,
    nats_server: PathBuf,
    millrace: PathBuf,
    millracer: PathBuf,
    reference: PathBuf,
    stand_in: PathBuf,
    /// `PATH` with the pinned `millrace` first (the worker's default command is `millrace`).
    path_env: OsString,
    tmp: tempfile::TempDir,
    clk_tck: u64,
}

impl Ctx {
    fn new(quick: bool) -> anyhow::Result<Self> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let tool = |var: &str, rel: &str| -> PathBuf {
            std::env::var_os(var)
                .filter(|v| !v.is_empty())
                .map_or_else(|| repo.join(rel), PathBuf::from)
        };
        let nats_server = tool("MILLRACER_BENCH_NATS_SERVER", ".venv/bin/nats-server");
        let millrace = tool("MILLRACER_BENCH_MILLRACE", ".venv/bin/millrace");
        let reference = tool("MILLRACER_BENCH_REFERENCE", ".venv-ref/bin/millracer");
        let exe = std::env::current_exe()?;
        let millracer = exe
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("millracer"))
            .context("cannot locate the target directory")?;
        for (what, path) in [
            ("nats-server (run scripts/setup.sh)", &nats_server),
            ("millrace (run scripts/setup.sh)", &millrace),
            (
                "millracer (cargo build --release --bin millracer)",
                &millracer,
            ),
        ] {
            if !path.is_file() {
                bail!("{what} not found at {}", path.display());
            }
        }
        let stand_in = repo.join("tests/support/stand_in_pi.py");
        let mut dirs = vec![millrace.parent().context("millrace dir")?.to_path_buf()];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        let path_env = std::env::join_paths(dirs)?;
        let tmp = tempfile::Builder::new()
            .prefix("millracer-bench-")
            .tempdir()?;
        let clk_tck = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100);
        Ok(Self {
            sizes: if quick { Sizes::quick() } else { Sizes::full() },
            nats_server,
            millrace,
            millracer,
            reference,
            stand_in,
            path_env,
            tmp,
            clk_tck,
        })
    }

    fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.tmp.path().join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn reference(&self) -> anyhow::Result<&Path> {
        if !self.reference.is_file() {
            bail!(
                "the reference millracer 0.2.0 is not at {} (scripts/bench.sh installs it into .venv-ref/)",
                self.reference.display()
            );
        }
        Ok(&self.reference)
    }

    /// A command with a private `HOME`, the pinned `millrace` first on `PATH`, none of the
    /// caller's `MILLRACER_*` settings, and a fresh owner mark.
    fn command(&self, program: &Path, home: &Path) -> (Command, String) {
        let mark = new_mark();
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if let Some(key) = key.to_str()
                && key.starts_with("MILLRACER_")
            {
                cmd.env_remove(key);
            }
        }
        cmd.env("PATH", &self.path_env)
            .env("HOME", home)
            .env(OWNER_VAR, &mark)
            .stdin(Stdio::null());
        (cmd, mark)
    }

    fn ticks_to_secs(&self, ticks: u64) -> f64 {
        ticks as f64 / self.clk_tck as f64
    }
}

fn new_mark() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A process the bench started; on drop it and everything carrying its mark is killed.
struct Spawned {
    child: Child,
    mark: String,
}

impl Spawned {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        kill_marked(&self.mark);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The live processes whose environment carries this mark.
fn marked_pids(mark: &str) -> Vec<u32> {
    let needle = format!("{OWNER_VAR}={mark}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes())
                .then_some(pid)
        })
        .collect()
}

/// SIGSTOPs then SIGKILLs every process carrying `mark` (stopped first, so none forks one
/// that escapes).
fn kill_marked(mark: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for _ in 0..5 {
        let pids = marked_pids(mark);
        if pids.is_empty() {
            return;
        }
        for signal in [Signal::SIGSTOP, Signal::SIGKILL] {
            for pid in &pids {
                if let Ok(pid) = i32::try_from(*pid) {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// The parts: broker, workspaces, workers
// ---------------------------------------------------------------------------------------

/// A private nats-server on 127.0.0.1 and a random port, with JetStream (its store under
/// `dir`).
fn start_nats(ctx: &Ctx, dir: &Path) -> anyhow::Result<(Spawned, String)> {
    let log = std::fs::File::create(dir.join("nats-server.log"))?;
    let (mut cmd, mark) = ctx.command(&ctx.nats_server, dir);
    // With JetStream, as a worker needs it (without it a worker refuses to start unless
    // `--core-only`): the figures measure the worker as it is deployed.
    cmd.arg("-js").arg("-sd").arg(dir.join("jetstream"));
    cmd.args(["-a", "127.0.0.1", "-p", "-1", "--ports_file_dir"])
        .arg(dir)
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn().context("cannot start nats-server")?;
    let spawned = Spawned { child, mark };
    let ports = dir.join(format!("nats-server_{}.ports", spawned.pid()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&ports)
            && let Ok(value) = serde_json::from_str::<Value>(&text)
            && let Some(url) = value["nats"][0].as_str()
        {
            return Ok((spawned, url.to_string()));
        }
        if Instant::now() > deadline {
            bail!("nats-server wrote no ports file in 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `millrace init --workspace <path>`.
fn init_workspace(ctx: &Ctx, path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)?;
    let out = Command::new(&ctx.millrace)
        .arg("init")
        .arg("--workspace")
        .arg(path)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "millrace init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// An initialised workspace whose stages run the stand-in runner with these stage settings.
fn stand_in_workspace(ctx: &Ctx, path: &Path, stages: Value) -> anyhow::Result<()> {
    init_workspace(ctx, path)?;
    let support = path.with_extension("stand-in");
    std::fs::create_dir_all(&support)?;
    let scenario = support.join("scenario.json");
    std::fs::write(
        &scenario,
        json!({"log": support.join("calls.jsonl"), "default_delay_seconds": 0.0, "stages": stages})
            .to_string(),
    )?;
    let toml = path.join("millrace-agents").join("millrace.toml");
    let mut text = std::fs::read_to_string(&toml)?;
    write!(
        text,
        "\n[runners.pi]\ncommand = \"{}\"\nenv = {{ STAND_IN_PI_SCRIPT = \"{}\" }}\n",
        ctx.stand_in.display(),
        scenario.display()
    )?;
    std::fs::write(&toml, text)?;
    Ok(())
}

/// `millracer worker` serving `bench=<workspace>`, logging to `<dir>/worker.log`.
fn start_worker(ctx: &Ctx, dir: &Path, url: &str, workspace: &Path) -> anyhow::Result<Spawned> {
    let home = dir.join("worker-home");
    std::fs::create_dir_all(&home)?;
    let log = std::fs::File::create(dir.join("worker.log"))?;
    let (mut cmd, mark) = ctx.command(&ctx.millracer, &home);
    cmd.arg("worker")
        .arg("--nats-url")
        .arg(url)
        .arg("--workspace")
        .arg(format!("{WS_ID}={}", workspace.display()))
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn().context("cannot start the worker")?;
    Ok(Spawned { child, mark })
}

async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::connect(url)
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// Milliseconds, rounded, space-separated (the runs of a figure's note).
fn whole_ms(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until the worker started in `dir` answers on `req.any`; a worker that does not
/// answer is reported with the end of its log.
async fn wait_worker(client: &async_nats::Client, dir: &Path) -> anyhow::Result<()> {
    wait_answering(client, &subjects::request_any())
        .await
        .map_err(|err| {
            let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            err.context(format!("the worker's log ends:\n{}", tail.join("\n")))
        })
}

/// Waits until something answers on `subject` (a worker or the echo responder).
async fn wait_answering(client: &async_nats::Client, subject: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let payload = request_bytes(&unique("ready"), "list_workspaces", json!({}), json!({}));
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(subject.to_string(), payload.into()),
        )
        .await;
        if let Ok(Ok(_)) = attempt {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing answered on {subject} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------

fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn request(id: &str, action: &str, workspace_ref: Value, payload: Value) -> Value {
    json!({
        "schema_version": SCHEMA,
        "request_id": id,
        "workspace_ref": workspace_ref,
        "source": {"kind": "cli", "surface": "bench"},
        "action": action,
        "input": {"kind": "structured_action", "payload": payload},
    })
}

fn request_bytes(id: &str, action: &str, workspace_ref: Value, payload: Value) -> Vec<u8> {
    request(id, action, workspace_ref, payload)
        .to_string()
        .into_bytes()
}

/// A delegated task, the way an adapter sends it.
fn enqueue_request(id: &str, workspace_ref: Value, text: &str) -> Value {
    let mut r = request(id, "enqueue", workspace_ref, json!({}));
    r["input"] = json!({"kind": "natural_language", "text": text});
    r["route_preference"] = json!("millrace");
    r["intake_preference"] = json!("task");
    r
}

fn succeeded(payload: &[u8]) -> bool {
    serde_json::from_slice::<Value>(payload).is_ok_and(|v| v["status"] == "succeeded")
}

// ---------------------------------------------------------------------------------------
// Statistics and /proc
// ---------------------------------------------------------------------------------------

/// Nearest-rank percentiles of sorted samples.
#[derive(Debug, Clone, Copy)]
struct Summary {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    min: f64,
    max: f64,
    mean: f64,
}

impl Summary {
    fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let at = |p: f64| -> f64 {
            if n == 0 {
                return f64::NAN;
            }
            let rank = ((p / 100.0) * n as f64).ceil() as usize;
            samples[rank.clamp(1, n) - 1]
        };
        Self {
            n,
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            p999: at(99.9),
            min: samples.first().copied().unwrap_or(f64::NAN),
            max: samples.last().copied().unwrap_or(f64::NAN),
            mean: samples.iter().sum::<f64>() / n.max(1) as f64,
        }
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The fields of `/proc/<pid>/stat` the bench uses (times in clock ticks).
#[derive(Debug, Clone, Copy)]
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl Stat {
    fn own(&self) -> u64 {
        self.utime + self.stime
    }
    fn with_reaped_children(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

fn proc_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: num(1)? as u32,
        utime: num(11)?,
        stime: num(12)?,
        cutime: num(13)?,
        cstime: num(14)?,
    })
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `VmRSS`/`VmHWM` and the like from `/proc/<pid>/status`, in KiB.
fn vm_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Nanoseconds on CPU of every live thread of `pid` (`/proc/<pid>/task/*/schedstat`), by
/// thread id: precise where clock ticks are coarse, but a thread that has exited is gone.
fn thread_cpu_ns(pid: u32) -> HashMap<u32, u64> {
    let mut threads = HashMap::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in entries.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if let Some(ns) = std::fs::read_to_string(entry.path().join("schedstat"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            {
                threads.insert(tid, ns);
            }
        }
    }
    threads
}

fn total_ns(pid: u32) -> u64 {
    thread_cpu_ns(pid).values().sum()
}

/// The command of a process for display: its first arguments, or its name when it has no
/// command line any more (a zombie).
fn describe_process(pid: u32) -> String {
    let argv = cmdline(pid);
    if argv.is_empty() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        return format!("{} (exited)", comm.trim());
    }
    argv.iter()
        .skip(1)
        .take(2)
        .map(|a| {
            Path::new(a)
                .file_name()
                .map_or(a.clone(), |f| f.to_string_lossy().into_owned())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_runtime_daemon(pid: u32) -> bool {
    cmdline(pid)
        .windows(2)
        .any(|w| w[0] == "run" && w[1] == "daemon")
}

/// One walk of a process tree: `root` and its live descendants, leaving out the runtime
/// daemon's subtree (and the runners under it).
struct Tree {
    /// Included processes and their stats.
    members: Vec<(u32, Stat)>,
    /// Daemons found (and left out).
    daemons: Vec<u32>,
}

impl Tree {
    fn walk(root: u32) -> Self {
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut stats: HashMap<u32, Stat> = HashMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                    continue;
                };
                if let Some(stat) = proc_stat(pid) {
                    children.entry(stat.ppid).or_default().push(pid);
                    stats.insert(pid, stat);
                }
            }
        }
        let mut members = Vec::new();
        let mut daemons = Vec::new();
        let mut stack = vec![root];
        while let Some(pid) = stack.pop() {
            if pid != root && is_runtime_daemon(pid) {
                daemons.push(pid);
                continue;
            }
            if let Some(stat) = stats.get(&pid) {
                members.push((pid, *stat));
            }
            stack.extend(children.get(&pid).into_iter().flatten().copied());
        }
        Self { members, daemons }
    }

    /// CPU ticks of the included processes: their own, plus what their reaped children
    /// used (`cutime`/`cstime`). A child still running counts with its own time, and its
    /// whole time moves into its parent's `cutime` once reaped, so deltas add up.
    fn cpu_ticks(&self) -> u64 {
        self.members
            .iter()
            .map(|(_, s)| s.with_reaped_children())
            .sum()
    }
}

// ---------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    rows: Vec<[String; 7]>,
    notes: Vec<String>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        fig: &str,
        metric: &str,
        ours: String,
        other: String,
        ratio: String,
        target: &str,
        met: Option<bool>,
    ) {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        self.rows.push([
            fig.to_string(),
            metric.to_string(),
            ours,
            other,
            ratio,
            target.to_string(),
            met.to_string(),
        ]);
    }

    fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("bench: {text}");
        self.notes.push(text);
    }

    fn print(&self, quick: bool) {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n## millracer benchmarks{} ({} cores, load average {} at the end)\n",
            if quick { " (QUICK)" } else { "" },
            cores(),
            loadavg()
        );
        let _ = writeln!(
            out,
            "Commit measured: {}\n",
            std::env::var("MILLRACER_BENCH_COMMIT").unwrap_or_else(|_| "unknown".to_string())
        );
        let _ = writeln!(
            out,
            "| # | metric | millracer | baseline / reference | ratio | target | met |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\nNotes:");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        print!("{out}");
        let _ = std::io::stdout().flush();
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

fn us(v: f64) -> String {
    format!("{v:.0} µs")
}

// ---------------------------------------------------------------------------------------
// 1. Round trip: list_workspaces through a worker vs a bare echo responder
// ---------------------------------------------------------------------------------------

fn echo_main(url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = connect(url).await?;
        let mut requests = client
            .queue_subscribe(ECHO_SUBJECT, ECHO_QUEUE.to_string())
            .await?;
        client.flush().await?;
        while let Some(message) = requests.next().await {
            if let Some(reply) = message.reply {
                client.publish(reply, message.payload).await?;
            }
        }
        Ok(())
    })
}

fn start_echo(ctx: &Ctx, dir: &Path, url: &str) -> anyhow::Result<Spawned> {
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(dir.join("echo.log"))?;
    let (mut cmd, mark) = ctx.command(&exe, dir);
    cmd.arg("__echo")
        .arg(url)
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd.spawn().context("cannot start the echo responder")?;
    Ok(Spawned { child, mark })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Worker,
    Echo,
}

async fn roundtrip(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.sizes;
    let dir = ctx.dir("1-roundtrip")?;
    let ws = dir.join("ws");
    init_workspace(ctx, &ws)?;
    let (nats, url) = start_nats(ctx, &dir)?;
    let worker = start_worker(ctx, &dir, &url, &ws)?;
    let echo = start_echo(ctx, &dir, &url)?;
    let client = connect(&url).await?;
    let any = subjects::request_any();
    // CPU of the worker, the echo responder and the broker, read between blocks.
    let pids = [worker.pid(), echo.pid(), nats.pid()];
    let cpu_now = || pids.map(total_ns);
    let mut spent = [[0u64; 3]; 2];
    wait_worker(&client, &dir).await?;
    wait_answering(&client, ECHO_SUBJECT).await?;

    let subject = |side| match side {
        Side::Worker => any.clone(),
        Side::Echo => ECHO_SUBJECT.to_string(),
    };
    let mut samples: HashMap<bool, Vec<f64>> = HashMap::new();
    let mut errors = [0usize; 2];
    let mut sizes = [0usize; 2];
    let mut one = async |side: Side, keep: bool| -> anyhow::Result<()> {
        let payload: bytes::Bytes =
            request_bytes(&unique("rtt"), "list_workspaces", json!({}), json!({})).into();
        let subject = subject(side);
        let started = Instant::now();
        let answer = client.request(subject, payload).await;
        let took = started.elapsed();
        let i = usize::from(side == Side::Echo);
        match answer {
            Ok(message) => {
                sizes[i] = message.payload.len();
                if side == Side::Worker && !succeeded(&message.payload) {
                    errors[i] += 1;
                }
            }
            Err(_) => errors[i] += 1,
        }
        if keep {
            samples
                .entry(side == Side::Worker)
                .or_default()
                .push(micros(took));
        }
        Ok(())
    };
    for side in [Side::Worker, Side::Echo] {
        for _ in 0..s.rtt_warmup {
            one(side, false).await?;
        }
    }
    let blocks = s.rtt_per_side.div_ceil(s.rtt_block);
    for block in 0..blocks {
        // ABBA: each side goes first in every other pair of blocks.
        let order = if block % 2 == 0 {
            [Side::Worker, Side::Echo]
        } else {
            [Side::Echo, Side::Worker]
        };
        for side in order {
            let before = cpu_now();
            for _ in 0..s.rtt_block {
                one(side, true).await?;
            }
            let after = cpu_now();
            let i = usize::from(side == Side::Echo);
            for k in 0..3 {
                spent[i][k] += after[k].saturating_sub(before[k]);
            }
        }
    }
    let worker_cpu = spent[0].map(|ns| ns as f64 / 1e3 / (blocks * s.rtt_block) as f64);
    let echo_cpu = spent[1].map(|ns| ns as f64 / 1e3 / (blocks * s.rtt_block) as f64);
    drop((worker, echo, nats));
    let worker = Summary::of(samples.remove(&true).unwrap_or_default());
    let echo = Summary::of(samples.remove(&false).unwrap_or_default());
    let r50 = worker.p50 / echo.p50;
    let r99 = worker.p99 / echo.p99;
    report.row(
        "1",
        &format!(
            "list_workspaces round trip p50 (n={} each, sequential)",
            worker.n
        ),
        us(worker.p50),
        format!("{} (echo)", us(echo.p50)),
        format!("{r50:.2}×"),
        "≤ 1.5×",
        Some(r50 <= 1.5),
    );
    report.row(
        "1",
        "list_workspaces round trip p99",
        us(worker.p99),
        format!("{} (echo)", us(echo.p99)),
        format!("{r99:.2}×"),
        "≤ 1.5×",
        Some(r99 <= 1.5),
    );
    report.note(format!(
        "[1] worker: mean {}, p90 {}, p99.9 {}, max {}; echo: mean {}, p90 {}, p99.9 {}, max {}; reply sizes {} B (worker) vs {} B (echo); errors {} (worker) {} (echo); {} blocks of {} alternating ABBA after {} warm-up requests each; CPU per request (schedstat): worker {:.0} µs + nats-server {:.0} µs in worker blocks, echo {:.0} µs + nats-server {:.0} µs in echo blocks",
        us(worker.mean),
        us(worker.p90),
        us(worker.p999),
        us(worker.max),
        us(echo.mean),
        us(echo.p90),
        us(echo.p999),
        us(echo.max),
        sizes[0],
        sizes[1],
        errors[0],
        errors[1],
        blocks,
        s.rtt_block,
        s.rtt_warmup,
        worker_cpu[0],
        worker_cpu[2],
        echo_cpu[1],
        echo_cpu[2]
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Closed-loop load: N clients, each on its own connection, one request at a time
// ---------------------------------------------------------------------------------------

struct Load {
    ok: u64,
    errors: u64,
    window: Duration,
    latency: Summary,
    /// Requests that took longer than 50 ms.
    slow: usize,
    /// CPU seconds over the window, by process.
    cpu: Vec<(String, f64)>,
}

/// Runs `clients` closed loops (one connection each) for warm-up + window; counts only
/// requests that start and finish inside the window.
async fn closed_loop(
    ctx: &Ctx,
    url: &str,
    clients: usize,
    watch: &[(&str, u32)],
    make: impl Fn(usize, u64) -> (String, Vec<u8>) + Send + Sync + 'static,
) -> anyhow::Result<Load> {
    let s = ctx.sizes;
    let make = Arc::new(make);
    let start = Instant::now() + Duration::from_millis(200);
    let window_start = start + s.load_warmup;
    let window_end = window_start + s.load_window;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = connect(url).await?;
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut ok = 0u64;
            let mut errors = 0u64;
            let mut samples = Vec::new();
            let mut n = 0u64;
            loop {
                let (subject, payload) = make(c, n);
                n += 1;
                let t0 = Instant::now();
                if t0 >= window_end {
                    break;
                }
                let answer = client.request(subject, payload.into()).await;
                let t1 = Instant::now();
                let good = answer.is_ok_and(|m| {
                    // A cheap check: results carry `"status": "succeeded"` on success.
                    memchr_find(&m.payload, b"\"succeeded\"")
                });
                if t0 >= window_start && t1 <= window_end {
                    if good {
                        ok += 1;
                    } else {
                        errors += 1;
                    }
                    samples.push(micros(t1 - t0));
                }
            }
            (ok, errors, samples)
        }));
    }
    tokio::time::sleep_until(window_start.into()).await;
    let before: Vec<u64> = watch
        .iter()
        .map(|(_, pid)| proc_stat(*pid).map_or(0, |s| s.own()))
        .collect();
    let self_before = proc_stat(std::process::id()).map_or(0, |s| s.own());
    tokio::time::sleep_until(window_end.into()).await;
    let after: Vec<u64> = watch
        .iter()
        .map(|(_, pid)| proc_stat(*pid).map_or(0, |s| s.own()))
        .collect();
    let self_after = proc_stat(std::process::id()).map_or(0, |s| s.own());
    let mut ok = 0;
    let mut errors = 0;
    let mut samples = Vec::new();
    for task in tasks {
        let (o, e, s) = task.await?;
        ok += o;
        errors += e;
        samples.extend(s);
    }
    let mut cpu: Vec<(String, f64)> = watch
        .iter()
        .zip(before.iter().zip(after.iter()))
        .map(|((name, _), (b, a))| (name.to_string(), ctx.ticks_to_secs(a - b)))
        .collect();
    cpu.push((
        "bench clients".to_string(),
        ctx.ticks_to_secs(self_after - self_before),
    ));
    let slow = samples.iter().filter(|us| **us > 50_000.0).count();
    Ok(Load {
        ok,
        errors,
        window: s.load_window,
        slow,
        latency: Summary::of(samples),
        cpu,
    })
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn cpu_split(load: &Load) -> String {
    load.cpu
        .iter()
        .map(|(name, secs)| {
            format!(
                "{name} {:.0}%",
                100.0 * secs / load.window.as_secs_f64() / cores() as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------
// 2. Inspect-only throughput with 32 clients
// ---------------------------------------------------------------------------------------

async fn inspect_throughput(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.sizes;
    let dir = ctx.dir("2-inspect")?;
    let ws = dir.join("ws");
    init_workspace(ctx, &ws)?;
    let (nats, url) = start_nats(ctx, &dir)?;
    let worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    let any = subjects::request_any();
    wait_worker(&client, &dir).await?;
    // A session to inspect (inspect_session reads the session file each time).
    let select = request_bytes(
        &unique("select"),
        "select_workspace",
        json!({}),
        json!({"workspace_id": WS_ID, "session_id": "bench-session"}),
    );
    let answer = client.request(any.clone(), select.into()).await?;
    if !succeeded(&answer.payload) {
        bail!(
            "select_workspace failed: {}",
            String::from_utf8_lossy(&answer.payload)
        );
    }
    let rss_idle = vm_kib(worker.pid(), "VmRSS").unwrap_or(0);
    let subject = any.clone();
    let load = closed_loop(
        ctx,
        &url,
        s.inspect_clients,
        &[("worker", worker.pid()), ("nats-server", nats.pid())],
        move |c, n| {
            let id = format!("tp-{c}-{n}");
            let payload = if n % 2 == 0 {
                request_bytes(&id, "list_workspaces", json!({}), json!({}))
            } else {
                request_bytes(
                    &id,
                    "inspect_session",
                    json!({}),
                    json!({"session_id": "bench-session"}),
                )
            };
            (subject.clone(), payload)
        },
    )
    .await?;
    let rate = load.ok as f64 / load.window.as_secs_f64();
    report.row(
        "2",
        &format!(
            "inspect-only throughput, {} clients on {} connections, {:.0} s",
            s.inspect_clients,
            s.inspect_clients,
            load.window.as_secs_f64()
        ),
        format!("{rate:.0} req/s"),
        String::new(),
        String::new(),
        "≥ 10,000 req/s",
        Some(rate >= 10_000.0),
    );
    report.row(
        "2",
        "inspect-only errors",
        format!("{}", load.errors),
        String::new(),
        String::new(),
        "0",
        Some(load.errors == 0),
    );
    let rss_after = vm_kib(worker.pid(), "VmRSS").unwrap_or(0);
    report.note(format!(
        "[2] list_workspaces and inspect_session alternating; {} ok in the window; latency under load p50 {}, p99 {}, max {}; CPU over the window (share of {} cores): {}; worker RSS {} KiB before, {} KiB after (result ledger holds up to 10,000 results)",
        load.ok,
        us(load.latency.p50),
        us(load.latency.p99),
        us(load.latency.max),
        cores(),
        cpu_split(&load),
        rss_idle,
        rss_after
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 3. `ops --json` status, whole process: through a worker vs the reference
// ---------------------------------------------------------------------------------------

/// Runs one `ops --json` process with `stdin`; returns its wall time and whether it
/// printed a succeeded result.
fn run_ops(ctx: &Ctx, program: &Path, args: &[OsString], stdin: &[u8], home: &Path) -> (f64, bool) {
    let (mut cmd, mark) = ctx.command(program, home);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let Ok(mut child) = cmd.spawn() else {
        return (f64::NAN, false);
    };
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin);
    }
    let output = child.wait_with_output();
    let wall = started.elapsed().as_secs_f64();
    kill_marked(&mark);
    let ok = output.is_ok_and(|o| o.status.success() && succeeded(&o.stdout));
    (wall, ok)
}

fn ours_status_args(url: &str, ws: &Path) -> Vec<OsString> {
    [
        "ops",
        "--json",
        "--transport",
        "nats",
        "--nats-url",
        url,
        "--workspace",
    ]
    .iter()
    .map(OsString::from)
    .chain([ws.as_os_str().to_owned()])
    .collect()
}

fn reference_args(ctx: &Ctx, ws: &Path) -> Vec<OsString> {
    vec![
        "ops".into(),
        "--json".into(),
        "--workspace".into(),
        ws.as_os_str().to_owned(),
        "--millrace-command".into(),
        ctx.millrace.as_os_str().to_owned(),
    ]
}

async fn ops_status(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.sizes;
    let reference = ctx.reference()?.to_path_buf();
    let dir = ctx.dir("3-ops-status")?;
    let ws = dir.join("ws");
    init_workspace(ctx, &ws)?;
    let (_nats, url) = start_nats(ctx, &dir)?;
    let _worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;
    let home = dir.join("ops-home");
    std::fs::create_dir_all(&home)?;
    let ours_args = ours_status_args(&url, &ws);
    let ref_args = reference_args(ctx, &ws);
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    let mut failures = [0usize; 2];
    // One warm-up run each (page cache, the worker's first status snapshot), then pairs
    // in ABBA order (ours first in even pairs, the reference first in odd ones), so neither
    // side always runs right after the other. A failed run is counted, not timed.
    for i in 0..=s.ops_runs {
        let stdin = request_bytes(&unique("ops-status"), "status", json!({}), json!({}));
        let (a, a_ok, b, b_ok) = if i % 2 == 0 {
            let (a, a_ok) = run_ops(ctx, &ctx.millracer, &ours_args, &stdin, &home);
            let (b, b_ok) = run_ops(ctx, &reference, &ref_args, &stdin, &home);
            (a, a_ok, b, b_ok)
        } else {
            let (b, b_ok) = run_ops(ctx, &reference, &ref_args, &stdin, &home);
            let (a, a_ok) = run_ops(ctx, &ctx.millracer, &ours_args, &stdin, &home);
            (a, a_ok, b, b_ok)
        };
        if i == 0 {
            continue;
        }
        failures[0] += usize::from(!a_ok);
        failures[1] += usize::from(!b_ok);
        if a_ok {
            ours.push(a * 1e3);
        }
        if b_ok {
            theirs.push(b * 1e3);
        }
    }
    let hits: Vec<f64> = ours.iter().copied().filter(|v| *v <= 300.0).collect();
    let misses: Vec<f64> = ours.iter().copied().filter(|v| *v > 300.0).collect();
    let (o, t) = (Summary::of(ours.clone()), Summary::of(theirs.clone()));
    let speedup = t.p50 / o.p50;
    report.row(
        "3",
        &format!(
            "`ops --json` status, whole process, median of {} vs {} (ABBA)",
            o.n, t.n
        ),
        ms(o.p50),
        format!("{} (reference 0.2.0)", ms(t.p50)),
        format!("{speedup:.1}× faster"),
        "",
        None,
    );
    let fmt = whole_ms;
    report.note(format!(
        "[3] pairs in ABBA order (ours first, then the reference first, …) after one warm-up each; only successful runs are timed; ours (ms): {}; reference (ms): {}; {} of our runs took ≤ 300 ms (median {}){}; failures {} (ours) {} (reference)",
        fmt(&ours),
        fmt(&theirs),
        hits.len(),
        ms(Summary::of(hits.clone()).p50),
        if misses.is_empty() {
            String::new()
        } else {
            format!(
                ", {} took longer (median {}: the worker was refreshing its status snapshot, a `millrace status`)",
                misses.len(),
                ms(Summary::of(misses.clone()).p50)
            )
        },
        failures[0],
        failures[1]
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. Worker memory: idle, and with 1,000 requests waiting in a workspace lane
// ---------------------------------------------------------------------------------------

async fn memory(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.sizes;
    let dir = ctx.dir("4-memory")?;
    let ws = dir.join("ws");
    // The first enqueue's builder takes 15 minutes: it holds the workspace lane.
    stand_in_workspace(ctx, &ws, json!({"builder": {"delay_seconds": 900}}))?;
    let (_nats, url) = start_nats(ctx, &dir)?;
    let worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = vm_kib(worker.pid(), "VmRSS").unwrap_or(0);

    let mut frames = client
        .subscribe(subjects::frames_of_workspace(Some(WS_ID)))
        .await?;
    let replies = client.new_inbox();
    let _reply_sub = client.subscribe(format!("{replies}.>")).await?;
    client.flush().await?;
    let wref = json!({"workspace_id": WS_ID});
    let hold = enqueue_request("mem-hold", wref.clone(), "Hold the workspace lane");
    client
        .publish_with_reply(
            subjects::request_by_id(WS_ID),
            format!("{replies}.hold"),
            hold.to_string().into(),
        )
        .await?;
    // Wait until the held request's builder stage runs.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(message)) = tokio::time::timeout(remaining, frames.next()).await else {
            bail!("the first enqueue's builder did not start within 120 s");
        };
        let frame: Value = serde_json::from_slice(&message.payload)?;
        if frame["event_type"] == "runtime.stage_started" {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let running = vm_kib(worker.pid(), "VmRSS").unwrap_or(0);

    for n in 0..s.waiting {
        let req = enqueue_request(
            &format!("mem-wait-{n}"),
            wref.clone(),
            &format!("Waiting task {n}"),
        );
        client
            .publish_with_reply(
                subjects::request_by_id(WS_ID),
                format!("{replies}.{n}"),
                req.to_string().into(),
            )
            .await?;
    }
    client.flush().await?;
    // Every waiting request answers `request.queued` with its position in the lane.
    let mut queued = BTreeSet::new();
    let mut max_position = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while queued.len() < s.waiting {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(message)) = tokio::time::timeout(remaining, frames.next()).await else {
            bail!(
                "only {} of {} requests were queued within 60 s",
                queued.len(),
                s.waiting
            );
        };
        let frame: Value = serde_json::from_slice(&message.payload)?;
        if frame["event_type"] == "request.queued"
            && let Some(id) = frame["request_id"].as_str()
            && id.starts_with("mem-wait-")
        {
            queued.insert(id.to_string());
            max_position = max_position.max(frame["payload"]["position"].as_u64().unwrap_or(0));
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let waiting = vm_kib(worker.pid(), "VmRSS").unwrap_or(0);
    let hwm = vm_kib(worker.pid(), "VmHWM").unwrap_or(0);
    let threads = vm_kib(worker.pid(), "Threads").unwrap_or(0);
    let per_request = (waiting.saturating_sub(running)) as f64 * 1024.0 / s.waiting as f64;
    report.row(
        "4",
        "worker VmRSS idle (ready, nothing running)",
        format!("{:.1} MiB", idle as f64 / 1024.0),
        String::new(),
        String::new(),
        "",
        None,
    );
    report.row(
        "4",
        &format!(
            "worker VmRSS with {} enqueues waiting behind a running one",
            s.waiting
        ),
        format!("{:.1} MiB", waiting as f64 / 1024.0),
        format!(
            "{:.1} MiB with only the running one",
            running as f64 / 1024.0
        ),
        format!("≈ {per_request:.0} B per waiting request"),
        "",
        None,
    );
    report.note(format!(
        "[4] one enqueue runs (stand-in builder delayed 900 s, the lane held), then {} enqueues for the same workspace were published; all {} answered request.queued (last position {max_position}) and wait in the lane's queue inside the worker; VmHWM {} KiB; {threads} threads",
        s.waiting,
        queued.len(),
        hwm
    ));
    drop(worker);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 5. Monitoring cost while a stage runs
// ---------------------------------------------------------------------------------------

/// Waits until the runtime's event log records `stage_started` for `stage`.
async fn wait_stage_started(ws: &Path, stage: &str, limit: Duration) -> anyhow::Result<()> {
    let log = ws
        .join("millrace-agents")
        .join("logs")
        .join("runtime_events.jsonl");
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(&log) {
            let started = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .any(|e| e["event_type"] == "stage_started" && e["data"]["stage"] == stage);
            if started {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("no {stage} stage started within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Window {
    cpu_secs: f64,
    /// The monitoring process's own CPU from its threads' schedstat (sampled every 200 ms).
    own_ns: u64,
    /// Threads of the monitoring process that ended during the window.
    threads_exited: usize,
    /// Whether anything under it (reaped or live, daemon left out) used CPU besides itself.
    children_ticks: u64,
    /// Distinct short-lived processes seen under the monitored process, by command.
    spawned: HashMap<String, usize>,
    daemon_alive: bool,
}

/// Measures the CPU of `root` and its descendants (the runtime daemon's subtree left
/// out) over `window`, sampling the tree every 200 ms to count spawned processes.
async fn measure_window(ctx: &Ctx, root: u32, window: Duration) -> Window {
    let before = Tree::walk(root);
    // Per thread: CPU at the start (0 for threads born later) and when last seen, so a
    // thread that exits in the window loses at most one sampling interval.
    let base = thread_cpu_ns(root);
    let mut last = base.clone();
    let daemons: Vec<u32> = before.daemons.clone();
    let mut seen: HashMap<u32, String> = HashMap::new();
    let end = Instant::now() + window;
    while Instant::now() < end {
        for (pid, _) in Tree::walk(root).members.iter().filter(|(p, _)| *p != root) {
            seen.entry(*pid).or_insert_with(|| describe_process(*pid));
        }
        last.extend(thread_cpu_ns(root));
        tokio::time::sleep(Duration::from_millis(200).min(end - Instant::now().min(end))).await;
    }
    let after = Tree::walk(root);
    let now = thread_cpu_ns(root);
    let threads_exited = last.keys().filter(|t| !now.contains_key(t)).count();
    last.extend(now);
    let own_ns: u64 = last
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(base.get(tid).copied().unwrap_or(0)))
        .sum();
    let ticks = after.cpu_ticks().saturating_sub(before.cpu_ticks());
    let own = |t: &Tree| {
        t.members
            .iter()
            .find(|(p, _)| *p == root)
            .map_or(0, |(_, s)| s.own())
    };
    let children_ticks = ticks.saturating_sub(own(&after).saturating_sub(own(&before)));
    let mut spawned = HashMap::new();
    for what in seen.into_values() {
        *spawned.entry(what).or_insert(0) += 1;
    }
    Window {
        cpu_secs: ctx.ticks_to_secs(ticks),
        own_ns,
        threads_exited,
        children_ticks,
        spawned,
        daemon_alive: !daemons.is_empty() && daemons.iter().all(|d| proc_stat(*d).is_some()),
    }
}

fn describe_spawned(w: &Window) -> String {
    if w.spawned.is_empty() {
        return "no processes".to_string();
    }
    let mut v: Vec<String> = w
        .spawned
        .iter()
        .map(|(what, n)| format!("{n}× `{what}`"))
        .collect();
    v.sort();
    v.join(", ")
}

async fn monitor_cpu(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.sizes;
    let reference = ctx.reference()?.to_path_buf();
    let dir = ctx.dir("5-monitor")?;
    let stages = json!({"builder": {"delay_seconds": s.builder_delay}});

    // Both sides at once, on two workspaces with the same stand-in stage: ours (a worker
    // runs the enqueue; the bench only publishes the request) and the reference
    // (`ops --json` enqueue, route millrace, intake task; it polls `millrace status` every
    // 2 s, its default --poll-interval-seconds). Both windows start once both builders run
    // and are measured together with the same instrument.
    let ws_a = dir.join("ws-ours");
    stand_in_workspace(ctx, &ws_a, stages.clone())?;
    let (_nats, url) = start_nats(ctx, &dir)?;
    let worker = start_worker(ctx, &dir, &url, &ws_a)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;
    let ws_b = dir.join("ws-reference");
    stand_in_workspace(ctx, &ws_b, stages)?;
    let home = dir.join("reference-home");
    std::fs::create_dir_all(&home)?;

    let req = enqueue_request(
        &unique("monitor"),
        json!({"workspace_id": WS_ID}),
        "Monitor me",
    );
    client
        .publish_with_reply(
            subjects::request_by_id(WS_ID),
            client.new_inbox(),
            req.to_string().into(),
        )
        .await?;
    client.flush().await?;
    let log = std::fs::File::create(dir.join("reference.log"))?;
    let (mut cmd, mark) = ctx.command(&reference, &home);
    cmd.args(reference_args(ctx, &ws_b))
        .stdin(Stdio::piped())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = cmd.spawn().context("cannot start the reference")?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(
            enqueue_request(&unique("monitor-ref"), json!({}), "Monitor me")
                .to_string()
                .as_bytes(),
        )?;
    }
    let reference_proc = Spawned { child, mark };
    wait_stage_started(&ws_a, "builder", Duration::from_secs(120)).await?;
    wait_stage_started(&ws_b, "builder", Duration::from_secs(120)).await?;
    let (ours, theirs) = tokio::join!(
        measure_window(ctx, worker.pid(), s.monitor_window),
        measure_window(ctx, reference_proc.pid(), s.monitor_window),
    );
    drop(worker);
    drop(reference_proc);

    // One instrument for both: the monitoring process's own threads from their schedstat
    // (nanoseconds, sampled every 200 ms) plus what its other processes used in clock
    // ticks (the runtime daemon's subtree left out on both sides).
    let total = |w: &Window| w.own_ns as f64 / 1e9 + ctx.ticks_to_secs(w.children_ticks);
    let (ours_secs, theirs_secs) = (total(&ours), total(&theirs));
    let ratio = ours_secs / theirs_secs;
    report.row(
        "5",
        &format!(
            "monitoring CPU over the same {:.0} s of a running stage, both sides at once",
            s.monitor_window.as_secs_f64()
        ),
        format!("{:.1} ms", ours_secs * 1e3),
        format!("{:.2} s (reference 0.2.0)", theirs_secs),
        format!("1/{:.0}", 1.0 / ratio),
        "≤ 1/20",
        Some(ratio <= 0.05),
    );
    report.note(format!(
        "[5] both sides ran at once and were measured over the same window, which starts when both runtimes logged stage_started for the builder (stand-in delay {:.0} s); CPU = the monitoring process's own threads (schedstat: ours {:.1} ms, reference {:.1} ms; threads ended in the window: ours {}, reference {}) + its other processes in clock ticks of {} ms (utime+stime+cutime+cstime; ours {} ticks, reference {} ticks); clock ticks alone, the process included: ours {:.2} s, reference {:.2} s; the runtime daemon and the stand-in runner under it are excluded on both sides (daemon still running at the end: ours {}, reference {}); processes started during the window: ours {}, reference {}",
        s.builder_delay,
        ours.own_ns as f64 / 1e6,
        theirs.own_ns as f64 / 1e6,
        ours.threads_exited,
        theirs.threads_exited,
        1000 / ctx.clk_tck,
        ours.children_ticks,
        theirs.children_ticks,
        ours.cpu_secs,
        theirs.cpu_secs,
        ours.daemon_alive,
        theirs.daemon_alive,
        describe_spawned(&ours),
        describe_spawned(&theirs)
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 6. Detection latency: runtime's stage_completed → our frame at a subscriber
// ---------------------------------------------------------------------------------------

fn unix_nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

fn occurred_nanos(text: &str) -> Option<i128> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()?
        .timestamp_nanos_opt()
        .map(i128::from)
}

async fn detection(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.sizes;
    let dir = ctx.dir("6-detection")?;
    let ws = dir.join("ws");
    stand_in_workspace(ctx, &ws, json!({}))?;
    let (_nats, url) = start_nats(ctx, &dir)?;
    let _worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;

    // The subscriber stamps each frame the moment it arrives.
    let seen: Arc<Mutex<Vec<(SystemTime, Value)>>> = Arc::default();
    let mut frames = client
        .subscribe(subjects::frames_of_workspace(Some(WS_ID)))
        .await?;
    client.flush().await?;
    let sink = seen.clone();
    let collector = tokio::spawn(async move {
        while let Some(message) = frames.next().await {
            let at = SystemTime::now();
            if let Ok(frame) = serde_json::from_slice::<Value>(&message.payload) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((at, frame));
            }
        }
    });

    let mut outcomes = Vec::new();
    for n in 0..s.detect_tasks {
        let req = enqueue_request(
            &unique("detect"),
            json!({"workspace_id": WS_ID}),
            &format!("Detection task {n}"),
        );
        let answer = client
            .send_request(
                subjects::request_by_id(WS_ID),
                async_nats::Request::new()
                    .payload(req.to_string().into())
                    .timeout(Some(Duration::from_secs(180))),
            )
            .await?;
        let result: Value = serde_json::from_slice(&answer.payload)?;
        outcomes.push(
            result["completion"]["outcome"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    collector.abort();

    let latencies = |event: &str| -> Vec<f64> {
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, f)| f["event_type"] == event)
            .filter_map(|(at, f)| {
                let occurred = occurred_nanos(f["payload"]["occurred_at"].as_str()?)?;
                Some((unix_nanos(*at) - occurred) as f64 / 1e6)
            })
            .collect()
    };
    let completed = Summary::of(latencies("runtime.stage_completed"));
    let started = Summary::of(latencies("runtime.stage_started"));
    let in_log = std::fs::read_to_string(
        ws.join("millrace-agents")
            .join("logs")
            .join("runtime_events.jsonl"),
    )
    .unwrap_or_default()
    .lines()
    .filter(|l| l.contains("\"stage_completed\""))
    .count();
    report.row(
        "6",
        &format!(
            "detection latency stage_completed → frame, p50 (n={})",
            completed.n
        ),
        ms(completed.p50),
        String::new(),
        String::new(),
        "p50 ≤ 250 ms",
        Some(completed.p50 <= 250.0),
    );
    report.row(
        "6",
        "detection latency p90",
        ms(completed.p90),
        String::new(),
        String::new(),
        "",
        None,
    );
    let done = outcomes.iter().filter(|o| *o == "completed").count();
    report.note(format!(
        "[6] {} sequential task enqueues ({done} completed), stages with no delay; {} stage_completed lines in the runtime's log, {} frames; completed: min {}, max {}, mean {}; stage_started (n={}): p50 {}, p90 {}, max {}; receive time is the subscriber's wall clock on arrival, the start is the event's occurred_at (same machine clock)",
        s.detect_tasks,
        in_log,
        completed.n,
        ms(completed.min),
        ms(completed.max),
        ms(completed.mean),
        started.n,
        ms(started.p50),
        ms(started.p90),
        ms(started.max)
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 7. status throughput: 8 clients through the worker vs the reference's sequential runs
// ---------------------------------------------------------------------------------------

/// `clients` loops, each running `program args` (a status request on stdin) as whole
/// processes one after another until `window` has passed; returns (ok, failed) runs.
fn process_loop(
    ctx: &Ctx,
    program: &Path,
    args: &[OsString],
    home: &Path,
    clients: usize,
    window: Duration,
) -> (u64, u64) {
    let end = Instant::now() + window;
    let (mut ok, mut failed) = (0u64, 0u64);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                scope.spawn(move || {
                    let (mut ok, mut failed) = (0u64, 0u64);
                    let mut n = 0u64;
                    while Instant::now() < end {
                        let stdin = request_bytes(
                            &unique(&format!("tp-{c}-{n}")),
                            "status",
                            json!({}),
                            json!({}),
                        );
                        n += 1;
                        let (_, good) = run_ops(ctx, program, args, &stdin, home);
                        if good {
                            ok += 1;
                        } else {
                            failed += 1;
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        for handle in handles {
            if let Ok((o, f)) = handle.join() {
                ok += o;
                failed += f;
            }
        }
    });
    (ok, failed)
}

async fn status_throughput(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let s = ctx.sizes;
    let reference = ctx.reference()?.to_path_buf();
    let dir = ctx.dir("7-status")?;
    let ws = dir.join("ws");
    init_workspace(ctx, &ws)?;
    let (nats, url) = start_nats(ctx, &dir)?;
    let worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;
    // Like with like: the same clients on both sides, each a loop of whole `ops --json`
    // status processes (what a user or a script runs), `status_clients` at once, in ABBA
    // windows (ours, reference, reference, ours). Failed runs are counted, not served.
    let home = dir.join("ops-home");
    std::fs::create_dir_all(&home)?;
    let ours_args = ours_status_args(&url, &ws);
    let ref_args = reference_args(ctx, &ws);
    let window = s.reference_window;
    let mut ours_ok = 0u64;
    let mut ours_failed = 0u64;
    let mut ref_ok = 0u64;
    let mut ref_failed = 0u64;
    let mut ours_time = 0f64;
    let mut ref_time = 0f64;
    for side in ["ours", "reference", "reference", "ours"] {
        let (program, args) = if side == "ours" {
            (ctx.millracer.clone(), ours_args.clone())
        } else {
            (reference.clone(), ref_args.clone())
        };
        let started = Instant::now();
        let (ok, failed) = tokio::task::block_in_place(|| {
            process_loop(ctx, &program, &args, &home, s.status_clients, window)
        });
        let took = started.elapsed().as_secs_f64();
        if side == "ours" {
            ours_ok += ok;
            ours_failed += failed;
            ours_time += took;
        } else {
            ref_ok += ok;
            ref_failed += failed;
            ref_time += took;
        }
    }
    let ours = ours_ok as f64 / ours_time;
    let theirs = ref_ok as f64 / ref_time;
    let ratio = ours / theirs;
    report.row(
        "7",
        &format!(
            "status throughput, {} clients of whole `ops --json` processes each side, 2 × {:.0} s ABBA",
            s.status_clients,
            window.as_secs_f64()
        ),
        format!("{ours:.1} runs/s"),
        format!("{theirs:.1} runs/s (reference 0.2.0)"),
        format!("{ratio:.1}×"),
        "",
        None,
    );
    report.note(format!(
        "[7] windows ours, reference, reference, ours of {:.0} s each, {} clients per side each running whole processes one after another; ours: {ours_ok} ok, {ours_failed} failed; reference: {ref_ok} ok, {ref_failed} failed",
        window.as_secs_f64(),
        s.status_clients,
    ));

    // What the worker serves to warm clients (the reference has no server to compare).
    let subject = subjects::request_by_id(WS_ID);
    let load = closed_loop(
        ctx,
        &url,
        s.status_clients,
        &[("worker", worker.pid()), ("nats-server", nats.pid())],
        move |c, n| {
            (
                subject.clone(),
                request_bytes(
                    &format!("st-{c}-{n}"),
                    "status",
                    json!({"workspace_id": WS_ID}),
                    json!({}),
                ),
            )
        },
    )
    .await?;
    let warm = load.ok as f64 / load.window.as_secs_f64();
    report.row(
        "7b",
        &format!(
            "status capacity of one worker, {} warm NATS clients, {:.0} s, unchanged workspace",
            s.status_clients,
            load.window.as_secs_f64()
        ),
        format!("{warm:.0} req/s, {} errors", load.errors),
        "(no reference: it has no server)".to_string(),
        String::new(),
        "",
        None,
    );
    report.note(format!(
        "[7b] {} ok, {} errors; latency p50 {}, p99 {}, p99.9 {}, max {}; {} requests took > 50 ms; CPU over the window: {}",
        load.ok,
        load.errors,
        us(load.latency.p50),
        us(load.latency.p99),
        us(load.latency.p999),
        ms(load.latency.max / 1e3),
        load.slow,
        cpu_split(&load)
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 8. `ops --json` status as a person or an adapter calls it: one call every 3 s
// ---------------------------------------------------------------------------------------

/// Like [`run_ops`], also returning stdout and the wall-clock moment the process exited.
fn run_ops_full(
    ctx: &Ctx,
    program: &Path,
    args: &[OsString],
    stdin: &[u8],
    home: &Path,
) -> (f64, bool, SystemTime, Vec<u8>) {
    let (mut cmd, mark) = ctx.command(program, home);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let Ok(mut child) = cmd.spawn() else {
        return (f64::NAN, false, SystemTime::now(), Vec::new());
    };
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin);
    }
    let output = child.wait_with_output();
    let exited = SystemTime::now();
    let wall = started.elapsed().as_secs_f64();
    kill_marked(&mark);
    match output {
        Ok(o) => {
            let ok = o.status.success() && succeeded(&o.stdout);
            (wall, ok, exited, o.stdout)
        }
        Err(_) => (wall, false, exited, Vec::new()),
    }
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

async fn status_paced(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let calls = if ctx.sizes.ops_runs < 12 { 3 } else { 20 };
    let pace = Duration::from_secs(3);
    let reference = ctx.reference()?.to_path_buf();
    let dir = ctx.dir("8-status-paced")?;
    let ws = dir.join("ws");
    init_workspace(ctx, &ws)?;
    let (_nats, url) = start_nats(ctx, &dir)?;
    let _worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;
    let home = dir.join("ops-home");
    std::fs::create_dir_all(&home)?;
    // Side 0: the default transport (auto: the bus when a worker answers; durable
    // submission). Side 1: `--submit request` (core request/reply). Side 2: the reference.
    let sides: [(&str, &Path, Vec<OsString>); 3] = [
        (
            "default",
            &ctx.millracer,
            os_args(&["ops", "--json", "--nats-url", &url]),
        ),
        (
            "--submit request",
            &ctx.millracer,
            os_args(&["ops", "--json", "--nats-url", &url, "--submit", "request"]),
        ),
        ("reference", &reference, reference_args(ctx, &ws)),
    ];
    let stdin_for = |side: usize| {
        let wref = if side == 2 {
            json!({})
        } else {
            json!({"workspace_id": WS_ID})
        };
        request_bytes(&unique("paced"), "status", wref, json!({}))
    };
    // One warm-up call each: the worker's first snapshot of the workspace, page cache.
    for (side, (_, program, args)) in sides.iter().enumerate() {
        let _ = run_ops_full(ctx, program, args, &stdin_for(side), &home);
    }
    let mut samples: [Vec<f64>; 3] = Default::default();
    let mut failures = [0usize; 3];
    for i in 0..calls {
        let cycle = Instant::now();
        // Sides alternate: 0 1 2, then 2 1 0, …
        let order: [usize; 3] = if i % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for side in order {
            let (_, program, args) = &sides[side];
            let (wall, ok, _, _) = run_ops_full(ctx, program, args, &stdin_for(side), &home);
            samples[side].push(wall * 1e3);
            failures[side] += usize::from(!ok);
        }
        let next = cycle + pace;
        if Instant::now() < next {
            tokio::time::sleep_until(next.into()).await;
        }
    }
    let sum: Vec<Summary> = samples.iter().map(|s| Summary::of(s.clone())).collect();
    let reference_p50 = sum[2].p50;
    for (side, name) in [(0usize, "default transport"), (1, "`--submit request`")] {
        let speedup = reference_p50 / sum[side].p50;
        report.row(
            "8",
            &format!(
                "`ops --json` status, one call every 3 s, {name}: median (n={})",
                sum[side].n
            ),
            ms(sum[side].p50),
            format!("{} (reference 0.2.0)", ms(reference_p50)),
            format!("{speedup:.0}× faster"),
            "≤ 20 ms, ≥ 25×",
            Some(sum[side].p50 <= 20.0 && speedup >= 25.0),
        );
        report.row(
            "8",
            &format!("… {name}: p99"),
            ms(sum[side].p99),
            format!("{} (reference p99)", ms(sum[2].p99)),
            String::new(),
            "≤ 50 ms",
            Some(sum[side].p99 <= 50.0),
        );
    }
    let fmt = whole_ms;
    report.note(format!(
        "[8] {calls} cycles, one every 3 s, each runs the three sides once, order alternating (default, request, reference / reference, request, default), after one warm-up call each; default (ms): {}; --submit request (ms): {}; reference (ms): {}; failures {} / {} / {}",
        fmt(&samples[0]),
        fmt(&samples[1]),
        fmt(&samples[2]),
        failures[0],
        failures[1],
        failures[2]
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 9. A delegated enqueue: the runtime's terminal record → the bridge's exit
// ---------------------------------------------------------------------------------------

/// The `occurred_at` (Unix ns) of the last `stage_completed` record in the workspace's
/// runtime event log written no later than `before`: the runtime's terminal record of
/// the work that just ended.
fn last_stage_completed(ws: &Path, before: SystemTime) -> Option<i128> {
    let log = std::fs::read_to_string(
        ws.join("millrace-agents")
            .join("logs")
            .join("runtime_events.jsonl"),
    )
    .ok()?;
    let limit = unix_nanos(before);
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event_type"] == "stage_completed")
        .filter_map(|v| occurred_nanos(v["occurred_at"].as_str()?))
        .filter(|t| *t <= limit)
        .max()
}

async fn enqueue_exit(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let runs = if ctx.sizes.ops_runs < 12 { 2 } else { 6 };
    let reference = ctx.reference()?.to_path_buf();
    let dir = ctx.dir("9-enqueue-exit")?;
    let ws = dir.join("ws");
    let ref_ws = dir.join("ref-ws");
    stand_in_workspace(ctx, &ws, json!({}))?;
    stand_in_workspace(ctx, &ref_ws, json!({}))?;
    let (_nats, url) = start_nats(ctx, &dir)?;
    let _worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;
    // The worker's `runtime.terminal` frame, stamped by the worker (its `timestamp`).
    let terminal: Arc<Mutex<HashMap<String, i128>>> = Arc::default();
    let mut frames = client
        .subscribe(subjects::frames_of_workspace(Some(WS_ID)))
        .await?;
    client.flush().await?;
    let sink = terminal.clone();
    let collector = tokio::spawn(async move {
        while let Some(message) = frames.next().await {
            if let Ok(frame) = serde_json::from_slice::<Value>(&message.payload)
                && frame["event_type"] == "runtime.terminal"
                && let (Some(id), Some(at)) = (
                    frame["request_id"].as_str(),
                    frame["timestamp"].as_str().and_then(occurred_nanos),
                )
            {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_string(), at);
            }
        }
    });
    let home = dir.join("ops-home");
    std::fs::create_dir_all(&home)?;
    let ours_args = os_args(&["ops", "--json", "--nats-url", &url]);
    // The reference asks pi for its final answer even on route `millrace`: it gets the
    // stand-in runner too.
    let mut ref_args = reference_args(ctx, &ref_ws);
    ref_args.extend(["--pi-command".into(), ctx.stand_in.as_os_str().to_owned()]);
    let mut from_record: [Vec<f64>; 2] = Default::default();
    let mut from_frame = Vec::new();
    let mut outcomes: [Vec<String>; 2] = Default::default();
    for i in 0..runs {
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let id = unique("exit");
            let (program, args, root, wref) = if side == 0 {
                (
                    &ctx.millracer,
                    &ours_args,
                    &ws,
                    json!({"workspace_id": WS_ID}),
                )
            } else {
                (&reference, &ref_args, &ref_ws, json!({}))
            };
            let stdin = enqueue_request(&id, wref, &format!("Exit latency task {i}"))
                .to_string()
                .into_bytes();
            let (_, _, exited, stdout) = run_ops_full(ctx, program, args, &stdin, &home);
            let outcome = serde_json::from_slice::<Value>(&stdout)
                .ok()
                .and_then(|v| v["completion"]["outcome"].as_str().map(str::to_string))
                .unwrap_or_else(|| "?".to_string());
            outcomes[side].push(outcome);
            if let Some(record) = last_stage_completed(root, exited) {
                from_record[side].push((unix_nanos(exited) - record) as f64 / 1e6);
            }
            if side == 0
                && let Some(at) = terminal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&id)
                    .copied()
            {
                from_frame.push((unix_nanos(exited) - at) as f64 / 1e6);
            }
        }
    }
    collector.abort();
    let ours = Summary::of(from_record[0].clone());
    let theirs = Summary::of(from_record[1].clone());
    let frame = Summary::of(from_frame.clone());
    report.row(
        "9",
        &format!(
            "delegated enqueue: worker's `runtime.terminal` frame → bridge exit, p50 (n={})",
            frame.n
        ),
        ms(frame.p50),
        String::new(),
        String::new(),
        "≤ 50 ms",
        Some(frame.p50 <= 50.0),
    );
    report.row(
        "9",
        &format!(
            "delegated enqueue: runtime's last `stage_completed` record → bridge exit, p50 (n={})",
            ours.n
        ),
        ms(ours.p50),
        format!("{} (reference 0.2.0, n={})", ms(theirs.p50), theirs.n),
        format!("{:.1}× faster", theirs.p50 / ours.p50),
        "",
        None,
    );
    let fmt = whole_ms;
    report.note(format!(
        "[9] {runs} task enqueues per side (route millrace, intake task, stand-in stages with no delay), sides alternating; ours by `ops --json` with the default transport (durable), the reference in-process on its own workspace (its final pi answer from the stand-in, `--pi-command`); frame → exit (ms): {}; record → exit, ours (ms): {}; reference (ms): {}; outcomes ours {:?}, reference {:?}. Record → exit includes what each does after the work ends: stopping the daemon (`control stop`) and a final `millrace status`",
        fmt(&from_frame),
        fmt(&from_record[0]),
        fmt(&from_record[1]),
        outcomes[0],
        outcomes[1]
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 10. Worker memory after many status requests and enqueues
// ---------------------------------------------------------------------------------------

async fn memory_after_load(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let quick = ctx.sizes.ops_runs < 12;
    let statuses: usize = if quick { 20_000 } else { 200_000 };
    let enqueues: usize = if quick { 100 } else { 1_000 };
    let clients = ctx.sizes.status_clients;
    let dir = ctx.dir("10-memory-after-load")?;
    let ws = dir.join("ws");
    init_workspace(ctx, &ws)?;
    let (_nats, url) = start_nats(ctx, &dir)?;
    let worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;
    // Ready, and the workspace's first status snapshot taken.
    client
        .request(
            subjects::request_by_id(WS_ID),
            request_bytes(
                "mem-first",
                "status",
                json!({"workspace_id": WS_ID}),
                json!({}),
            )
            .into(),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = vm_kib(worker.pid(), "VmRSS").unwrap_or(0);

    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = connect(&url).await?;
        let per = statuses / clients + usize::from(c < statuses % clients);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            for n in 0..per {
                let payload = request_bytes(
                    &format!("mem-st-{c}-{n}"),
                    "status",
                    json!({"workspace_id": WS_ID}),
                    json!({}),
                );
                if client
                    .request(subjects::request_by_id(WS_ID), payload.into())
                    .await
                    .is_ok_and(|m| memchr_find(&m.payload, b"\"succeeded\""))
                {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut status_ok = 0;
    for task in tasks {
        status_ok += task.await.unwrap_or(0);
    }
    let status_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_status = vm_kib(worker.pid(), "VmRSS").unwrap_or(0);

    // Enqueues that end at once, each a mutating request the worker remembers: route
    // `direct` on a worker without a pi runner is answered `runner_unavailable`.
    let mut refused = 0usize;
    for n in 0..enqueues {
        let mut req = enqueue_request(
            &format!("mem-enq-{n}"),
            json!({"workspace_id": WS_ID}),
            &format!("Memory task {n}"),
        );
        req["route_preference"] = json!("direct");
        let answer = client
            .request(subjects::request_by_id(WS_ID), req.to_string().into())
            .await?;
        if memchr_find(&answer.payload, b"runner_unavailable") {
            refused += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = vm_kib(worker.pid(), "VmRSS").unwrap_or(0);
    let hwm = vm_kib(worker.pid(), "VmHWM").unwrap_or(0);
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    report.row(
        "10",
        &format!("worker VmRSS after {statuses} status requests ({clients} clients) and {enqueues} enqueues"),
        mib(after),
        format!("{} idle", mib(idle)),
        String::new(),
        "≤ 40 MB",
        Some(after as f64 * 1024.0 <= 40e6),
    );
    report.note(format!(
        "[10] idle {} (after the first status); after the status requests {} ({status_ok} of {statuses} succeeded in {status_secs:.1} s); after the enqueues {} ({refused} of {enqueues} answered runner_unavailable at once, each remembered by the ledger as a finished mutating request); VmHWM {}",
        mib(idle),
        mib(after_status),
        mib(after),
        mib(hwm)
    ));
    // What the load left on the broker: the results bucket keeps the answers to changes,
    // not to reads.
    let mut results = async_nats::jetstream::new(client.clone())
        .get_stream(format!("KV_{}", subjects::RESULTS_BUCKET))
        .await?;
    let state = results.info().await?.state.clone();
    report.row(
        "10",
        &format!(
            "results bucket after the same load ({statuses} core status, {enqueues} core enqueues)"
        ),
        format!("{} records, {}", state.messages, mib(state.bytes / 1024)),
        format!("{enqueues} changes answered"),
        String::new(),
        "",
        None,
    );
    Ok(())
}

// 11. Operator actions: read round trips next to list_workspaces, and cancel
// ---------------------------------------------------------------------------------------

/// One request on the workspace's subject; its round trip and whether it succeeded.
async fn timed(
    client: &async_nats::Client,
    action: &str,
    payload: Value,
) -> anyhow::Result<(Duration, bool)> {
    let (subject, wref) = if action == "list_workspaces" {
        (subjects::request_any(), json!({}))
    } else {
        (
            subjects::request_by_id(WS_ID),
            json!({"workspace_id": WS_ID}),
        )
    };
    let body = request_bytes(&unique(action), action, wref, payload);
    let started = Instant::now();
    let answer = client
        .send_request(
            subject,
            async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(Duration::from_secs(120))),
        )
        .await?;
    Ok((started.elapsed(), succeeded(&answer.payload)))
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

async fn operator(ctx: &Ctx, report: &mut Report) -> anyhow::Result<()> {
    let rounds = ctx.sizes.operator_rounds;
    let cancels = ctx.sizes.operator_cancels;
    let dir = ctx.dir("8-operator")?;
    let ws = dir.join("ws");
    stand_in_workspace(ctx, &ws, json!({"builder": {"delay_seconds": 120}}))?;
    let (_nats, url) = start_nats(ctx, &dir)?;
    let _worker = start_worker(ctx, &dir, &url, &ws)?;
    let client = connect(&url).await?;
    wait_worker(&client, &dir).await?;

    // Read round trips, the actions alternated so load drifts hit every side alike.
    let actions = [
        "list_workspaces",
        "status",
        "health",
        "queue_status",
        "list_runs",
        "diagnose",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); actions.len()];
    let mut failed = 0;
    for _ in 0..rounds {
        for (i, action) in actions.iter().enumerate() {
            let (d, ok) = timed(&client, action, json!({})).await?;
            failed += usize::from(!ok);
            times[i].push(d);
        }
    }
    let base = median_ms(times[0].clone());
    for (i, action) in actions.iter().enumerate().skip(1) {
        let m = median_ms(times[i].clone());
        report.row(
            "11",
            &format!("`{action}` round trip, p50 ({rounds} each, alternated)"),
            ms(m),
            format!("{} (list_workspaces)", ms(base)),
            format!("{:.0}×", m / base),
            "",
            None,
        );
    }
    if failed > 0 {
        report.note(format!("[11] {failed} read requests did not succeed"));
    }

    // Cancel: from sending `cancel` to the waiting caller's result, for a request waiting
    // in the lane and for a delegated request mid-stage.
    let mut running = Vec::new();
    let mut waiting = Vec::new();
    for n in 0..cancels {
        let long_id = unique("long");
        let mut frames = client
            .subscribe(subjects::frames_of_request(&long_id))
            .await?;
        client.flush().await?;
        let c = client.clone();
        let body = enqueue_request(
            &long_id,
            json!({"workspace_id": WS_ID}),
            &format!("Slow task {n}"),
        );
        let long = tokio::spawn(async move {
            c.send_request(
                subjects::request_by_id(WS_ID),
                async_nats::Request::new()
                    .payload(body.to_string().into())
                    .timeout(Some(Duration::from_secs(300))),
            )
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let m = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                frames.next(),
            )
            .await
            .context("the builder never started")?
            .context("frames closed")?;
            let f: Value = serde_json::from_slice(&m.payload)?;
            if f["event_type"] == "runtime.stage_started" && f["payload"]["stage"] == "builder" {
                break;
            }
        }
        // One more request waits behind it in the lane.
        let wait_id = unique("waits");
        let mut wframes = client
            .subscribe(subjects::frames_of_request(&wait_id))
            .await?;
        client.flush().await?;
        let c = client.clone();
        let body = enqueue_request(&wait_id, json!({"workspace_id": WS_ID}), "Waiting task");
        let behind = tokio::spawn(async move {
            c.send_request(
                subjects::request_by_id(WS_ID),
                async_nats::Request::new()
                    .payload(body.to_string().into())
                    .timeout(Some(Duration::from_secs(300))),
            )
            .await
        });
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), wframes.next())
                .await
                .context("no queued frame")?
                .context("frames closed")?;
            let f: Value = serde_json::from_slice(&m.payload)?;
            if f["event_type"] == "request.queued" {
                break;
            }
        }
        let t0 = Instant::now();
        let _ = timed(&client, "cancel", json!({"request_id": wait_id})).await?;
        let _ = behind.await??;
        waiting.push(t0.elapsed());
        let t0 = Instant::now();
        let c = client.clone();
        let cancel =
            tokio::spawn(async move { timed(&c, "cancel", json!({"request_id": long_id})).await });
        let answer = long.await??;
        running.push(t0.elapsed());
        let result: Value = serde_json::from_slice(&answer.payload)?;
        if result["errors"][0]["code"] != "cancelled" {
            report.note(format!(
                "[11] the running request was not cancelled: {result}"
            ));
        }
        let _ = cancel.await?;
    }
    let w = median_ms(waiting);
    let r = median_ms(running);
    report.row(
        "11",
        &format!("cancel → result of a request waiting in the lane, p50 ({cancels})"),
        ms(w),
        String::new(),
        String::new(),
        "",
        None,
    );
    report.row(
        "11",
        &format!("cancel → result of a delegated request mid-stage, p50 ({cancels})"),
        ms(r),
        String::new(),
        String::new(),
        "≤ 2 s",
        Some(r <= 2000.0),
    );
    Ok(())
}
