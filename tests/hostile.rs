//! Hostile input: 100,000 generated requests (random bytes, broken JSON, valid requests with
//! fields removed, retyped, oversized or full of subject metacharacters), each with a
//! request_id of its own.
//!
//! - All of them through parsing and planning (pure functions: nothing may panic).
//! - A slice through the engine with the real `millrace` on a real workspace (stages answered
//!   by the stand-in runner): every input gets exactly one result, valid against
//!   `contracts/ops-result.schema.json`, its error codes in the documented set, the request_id
//!   echoed (trimmed); every frame is valid and a request's `request.finished` frame comes
//!   before its result; the lanes still run afterwards.
//! - A slice through a real nats-server and worker, on the core and the jobs subjects, by id,
//!   by path and workspace-less: the same checks on the replies and the stored results, and
//!   the worker still serves afterwards.
//!
//! A seeded generator rather than a fuzzing crate: deterministic in CI, no extra toolchain,
//! and a failure names the seed and the input's index.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::schemas::violations;
use common::stand_in::StandInWorkspace;
use common::{NatsServer, Worker, millrace_bin, rt};
use futures::StreamExt;
use millracer::actions::dispatch::{Service, Serving, Settings};
use millracer::bus::subjects;
use millracer::bus::subjects::JobClass;
use millracer::contract::parse_request;
use millracer::engine::frames::{Outbound, ReplyTo};
use millracer::engine::service::{Engine, EngineOptions};
use millracer::millrace::command::Millrace;
use millracer::millrace::sessions::SessionStore;
use millracer::millrace::status::StatusCache;
use millracer::millrace::workspace::{Registry, WorkspaceRecord};
use serde_json::{Map, Value, json};

/// Inputs through parsing and planning.
const INPUTS: usize = 100_000;
/// Of those, the first ones also run through the engine on the real runtime.
const ENGINE_INPUTS: usize = 1_000;
/// Inputs sent through a real broker and worker (another seed).
const BUS_INPUTS: usize = 700;
const SEED: u64 = 0x6d69_6c6c_7261_6365;
const BUS_SEED: u64 = 0x6275_735f_6861_7264;

/// Every error and warning code the README and the result schema document.
const DOCUMENTED_CODES: &[&str] = &[
    // the reference's
    "workspace_unresolved",
    "session_store_unavailable",
    "runtime_command_failed",
    "invalid_input",
    "unsupported_action",
    "unsupported_transport",
    "runtime_warning",
    // the bus worker's
    "invalid_request",
    "request_too_large",
    "workspace_not_served",
    "workspace_mismatch",
    "service_error",
    "runtime_timeout",
    "daemon_timeout",
    "intake_failed",
    "runner_unavailable",
    "runner_failed",
    "runner_timeout",
];

/// xorshift64*: small, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NASTY: &[&str] = &[
    "",
    " ",
    "a.b",
    "*",
    ">",
    "a b",
    "$SYS",
    "_h00",
    "é",
    "\u{0}",
    "\r\n",
    "../../etc",
    "/",
    "demo",
    "alpha",
    "ws.>",
    "x\ny",
    "🙂",
    "null",
    "0",
    "-",
    "_none",
];

fn string(rng: &mut Rng) -> Value {
    match rng.below(4) {
        0 => json!(rng.pick(NASTY)),
        1 => json!("x".repeat(rng.below(300))),
        2 => json!(format!("id-{}", rng.next())),
        _ => {
            let bytes: Vec<u8> = (0..rng.below(20)).map(|_| rng.below(128) as u8).collect();
            json!(String::from_utf8_lossy(&bytes))
        }
    }
}

fn value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(rng.next() as i64),
        3 => json!((rng.next() as f64) / 7.0),
        4 => string(rng),
        5 => Value::Array((0..rng.below(4)).map(|_| value(rng, depth + 1)).collect()),
        _ => {
            let mut map = Map::new();
            for _ in 0..rng.below(4) {
                map.insert(
                    string(rng).as_str().unwrap_or("k").to_string(),
                    value(rng, depth + 1),
                );
            }
            Value::Object(map)
        }
    }
}

const FIELDS: &[&str] = &[
    "schema_version",
    "request_id",
    "workspace_ref",
    "source",
    "action",
    "input",
    "route_preference",
    "intake_preference",
    "scoped_work_item",
    "session_ref",
    "context_refs",
];
const ACTIONS: &[&str] = &[
    "status",
    "enqueue",
    "list_workspaces",
    "list_sessions",
    "select_workspace",
    "inspect_session",
    "pause",
    "cancel",
    "health",
    "show_work_item",
    "reboot_host",
    "STATUS",
    "",
];

fn request(rng: &mut Rng, root: &str, index: usize) -> Value {
    let workspace_ref = match rng.below(4) {
        0 => json!({"workspace_id": "demo"}),
        1 => json!({"workspace_id": string(rng)}),
        2 => json!({"root_path": root}),
        _ => json!({"root_path": string(rng), "mode": string(rng)}),
    };
    let mut r = json!({
        "schema_version": "millracer.ops.v0.2",
        "request_id": if rng.below(3) == 0 { string(rng) } else { json!(format!("r-{index}")) },
        "workspace_ref": workspace_ref,
        "source": {"kind": rng.pick(&["cli", "chat", "", "x"]), "adapter_id": string(rng)},
        "action": rng.pick(ACTIONS),
        "input": match rng.below(3) {
            0 => json!({}),
            1 => json!({"kind": "natural_language", "text": string(rng)}),
            _ => value(rng, 0),
        },
    });
    // Mutations: drop, retype or add fields.
    for _ in 0..rng.below(4) {
        let field = rng.pick(FIELDS);
        let Some(object) = r.as_object_mut() else {
            break;
        };
        match rng.below(3) {
            0 => {
                object.remove(field);
            }
            _ => {
                object.insert(field.to_string(), value(rng, 0));
            }
        }
    }
    r
}

/// The generator: inputs whose request_ids (as the worker reads them: trimmed) are all
/// distinct, so none is answered from the ledger of another.
struct Inputs {
    rng: Rng,
    root: String,
    ids: HashSet<String>,
    index: usize,
}

impl Inputs {
    fn new(seed: u64, root: &str) -> Self {
        Inputs {
            rng: Rng(seed),
            root: root.to_string(),
            ids: HashSet::new(),
            index: 0,
        }
    }

    fn next(&mut self) -> Vec<u8> {
        let index = self.index;
        self.index += 1;
        let rng = &mut self.rng;
        match rng.below(10) {
            0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
            1 => {
                let text = request(rng, &self.root, index).to_string();
                let cut = rng.below(text.len().max(1));
                text.as_bytes()[..cut].to_vec()
            }
            2 => value(rng, 0).to_string().into_bytes(),
            3 => format!(
                "{}{}",
                "[".repeat(rng.below(5_000)),
                "]".repeat(rng.below(5_000))
            )
            .into_bytes(),
            _ => {
                let mut r = request(rng, &self.root, index);
                if let Some(id) = r.get("request_id").and_then(Value::as_str) {
                    let mut id = id.to_string();
                    if !id.trim().is_empty() && !self.ids.insert(id.trim().to_string()) {
                        // Seen before: keep it hostile, make it this input's own.
                        id = format!("{id}~{index}");
                        assert!(self.ids.insert(id.trim().to_string()));
                        r["request_id"] = json!(id);
                    }
                }
                r.to_string().into_bytes()
            }
        }
    }
}

/// The request_id the worker reads from `raw` (trimmed), if it can read one.
fn expected_id(raw: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(raw).ok()?;
    let id = value.get("request_id")?.as_str()?.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// Checks one OpsResult (as JSON) of input `index`: valid against the schema, every code
/// documented, a success without errors, the request_id echoed.
fn check_result(what: &str, index: usize, raw: &[u8], result: &Value) {
    let wrong = violations("result", result);
    assert!(
        wrong.is_empty(),
        "{what} #{index}: the result violates the schema: {wrong:#?}\nresult: {result:#}\ninput: {:?}",
        String::from_utf8_lossy(raw)
    );
    for list in ["errors", "warnings"] {
        for record in result[list].as_array().into_iter().flatten() {
            let code = record["code"].as_str().unwrap_or("");
            assert!(
                DOCUMENTED_CODES.contains(&code),
                "{what} #{index}: undocumented code {code:?} in {result:#}"
            );
        }
    }
    if result["status"] == "succeeded" {
        assert_eq!(
            result["errors"],
            json!([]),
            "{what} #{index}: a success carries no error"
        );
    }
    let echoed = result["request_id"].as_str().unwrap_or("<not a string>");
    match expected_id(raw) {
        Some(id) => assert_eq!(echoed, id, "{what} #{index}: request_id not echoed"),
        None => assert_eq!(
            result["status"], "failed",
            "{what} #{index}: an input without a request_id fails: {result:#}"
        ),
    }
}

fn service(root: PathBuf, home: &Path) -> Service {
    let record = WorkspaceRecord {
        id: "demo".to_string(),
        root: root.clone(),
        display_name: None,
        default_mode: None,
        tags: Vec::new(),
    };
    Service {
        registry: Registry::new(vec![record], Some("demo".to_string())).expect("registry"),
        serving: Serving::Registered,
        cli_workspace: Some(root),
        // The real runtime: valid requests really run (status from the worker's snapshot).
        millrace: Millrace::new(
            millrace_bin().display().to_string(),
            Duration::from_secs(60),
        ),
        sessions: SessionStore::new(home.join("sessions.json")),
        pi: None,
        settings: Settings {
            millrace_mode: "default_pi".to_string(),
            cwd: None,
            daemon_timeout: Duration::from_secs(120),
            max_daemon_restarts: 0,
            keep_daemon: false,
            notify_terminal_stages: false,
        },
        status_cache: Some(StatusCache::new(Duration::from_secs(2))),
        directory: None,
        cancels: Default::default(),
    }
}

#[test]
fn a_hundred_thousand_hostile_inputs_each_get_one_clear_answer() {
    let ws = StandInWorkspace::new(json!({}));
    let home = tempfile::tempdir().expect("temp dir");
    let root = ws.path().canonicalize().expect("canonical root");
    let root_text = root.display().to_string();

    // All of them through parsing and planning.
    let mut inputs = Inputs::new(SEED, &root_text);
    let all: Vec<Vec<u8>> = (0..INPUTS).map(|_| inputs.next()).collect();
    let planner = service(root.clone(), home.path());
    let mut parsed = 0usize;
    for raw in &all {
        if let Ok(request) = parse_request(raw) {
            parsed += 1;
            assert_eq!(Some(request.request_id.clone()), expected_id(raw));
            let token = subjects::token(&request.request_id);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{token}"
            );
            let _ = planner.plan(&request);
        }
    }
    eprintln!("{INPUTS} inputs parsed and planned ({parsed} parse)");

    // A slice through the engine on the real runtime.
    rt().block_on(async {
        let options = EngineOptions {
            max_request_bytes: 8 * 1024,
            ..EngineOptions::default()
        };
        let (engine, mut rx) = Engine::new(Arc::new(service(root.clone(), home.path())), options);
        let started = Instant::now();
        let span = tracing::Span::none();
        for (index, raw) in all.iter().take(ENGINE_INPUTS).enumerate() {
            engine.submit(raw, Some(reply_token(index)), &span);
        }
        let mut answered: HashMap<usize, usize> = HashMap::new();
        let mut last_frame: HashMap<String, String> = HashMap::new();
        let mut frames = 0usize;
        let mut with_frames = 0usize;
        let deadline = Instant::now() + Duration::from_secs(600);
        while answered.len() < ENGINE_INPUTS {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {ENGINE_INPUTS} inputs answered: a lane is stuck",
                        answered.len()
                    )
                })
                .expect("engine alive");
            match message {
                Outbound::Frame(out) => {
                    frames += 1;
                    let frame = serde_json::to_value(&*out.frame).expect("frame JSON");
                    let wrong = violations("frame", &frame);
                    assert!(wrong.is_empty(), "{wrong:#?}\n{frame:#}");
                    last_frame.insert(out.frame.request_id.clone(), out.frame.event_type.clone());
                }
                Outbound::Result { to, result, .. } => {
                    let value = serde_json::to_value(&*result).expect("result JSON");
                    // A request refused before it was admitted (unreadable, invalid, too
                    // large) gets its result and no frames; one that was admitted gets its
                    // result after its request.finished frame.
                    if let Some(last) = last_frame.get(&result.request_id) {
                        with_frames += 1;
                        assert_eq!(
                            last, "request.finished",
                            "the result of {:?} comes after its request.finished frame",
                            result.request_id
                        );
                    }
                    for reply in to {
                        let index = token_index(reply);
                        check_result("engine", index, &all[index], &value);
                        *answered.entry(index).or_default() += 1;
                    }
                }
            }
        }
        assert!(
            answered.values().all(|n| *n == 1),
            "an input got more than one result"
        );
        assert!(with_frames > 0, "no admitted request among the inputs");
        eprintln!(
            "{ENGINE_INPUTS} inputs answered on the real runtime in {:?} ({frames} frames, {with_frames} admitted requests)",
            started.elapsed()
        );
        // The lanes still run: one more change for the workspace is answered promptly.
        let last = json!({
            "schema_version": "millracer.ops.v0.2", "request_id": "after-the-storm",
            "workspace_ref": {"workspace_id": "demo"}, "source": {"kind": "cli"},
            "action": "enqueue", "input": {},
        });
        engine.submit(
            last.to_string().as_bytes(),
            Some(reply_token(usize::MAX)),
            &span,
        );
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(Outbound::Result { result, .. }) = rx.recv().await {
                    return result;
                }
            }
        })
        .await
        .expect("the lane still runs");
        assert_eq!(answer.request_id, "after-the-storm");
        assert_eq!(answer.errors[0].code, "invalid_input");
    });
}

/// Where a bus input goes.
#[derive(Clone, Copy, Debug)]
enum Route {
    CoreById,
    CoreByPath,
    CoreAny,
    JobsById(JobClass),
    JobsByPath(JobClass),
    JobsAny,
}

const ROUTES: [Route; 8] = [
    Route::CoreById,
    Route::CoreByPath,
    Route::CoreAny,
    Route::JobsById(JobClass::Change),
    Route::JobsById(JobClass::Read),
    Route::JobsByPath(JobClass::Change),
    Route::JobsByPath(JobClass::Read),
    Route::JobsAny,
];

#[test]
fn hostile_inputs_through_a_real_broker_and_worker_each_get_one_valid_answer() {
    let ws = StandInWorkspace::new(json!({}));
    let root = ws.path().canonicalize().expect("canonical root");
    let mut inputs = Inputs::new(BUS_SEED, &root.display().to_string());
    let all: Vec<Vec<u8>> = (0..BUS_INPUTS).map(|_| inputs.next()).collect();
    let nats = NatsServer::start();
    let worker = Worker::spawn(
        &nats.url,
        &[("demo", ws.path())],
        &["--max-request-bytes", "8192", "--host-id", "hostile-host"],
    );
    // The path key a caller on this host computes for the workspace (docs/bus-naming.md).
    let key = millracer::contract::token::path_key("hostile-host", &root);
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let js = jetstream::new(client.clone());
        let started = Instant::now();

        // Durable submissions first (published at once), then the core requests.
        let mut stored: Vec<(usize, String)> = Vec::new();
        for (index, raw) in all.iter().enumerate() {
            let route = ROUTES[index % ROUTES.len()];
            let (subject, scope) = match route {
                Route::JobsById(class) => (subjects::jobs_by_id("demo", class), Some("demo")),
                Route::JobsByPath(class) => (subjects::jobs_by_path(&key, class), Some("demo")),
                Route::JobsAny => (subjects::jobs_any(), None),
                _ => continue,
            };
            let key = expected_id(raw).map(|id| subjects::result_key(scope, &id));
            let message = jetstream::message::PublishMessage::build()
                .payload(raw.clone().into())
                .message_id(key.clone().unwrap_or_else(|| format!("hostile-{index}")));
            let ack = js
                .send_publish(subject, message)
                .await
                .expect("publish")
                .await
                .expect("stored");
            assert!(!ack.duplicate, "#{index}: ids are distinct");
            if let Some(key) = key {
                stored.push((index, key));
            }
        }
        let core: Vec<(usize, String)> = all
            .iter()
            .enumerate()
            .filter_map(|(index, _)| match ROUTES[index % ROUTES.len()] {
                Route::CoreById => Some((index, subjects::request_by_id("demo"))),
                Route::CoreByPath => Some((index, subjects::request_by_path(&key))),
                Route::CoreAny => Some((index, subjects::request_any())),
                _ => None,
            })
            .collect();
        let answers: Vec<(usize, Value)> = futures::stream::iter(core)
            .map(|(index, subject)| {
                let client = client.clone();
                let raw = all[index].clone();
                async move {
                    let reply = client
                        .send_request(
                            subject,
                            async_nats::Request::new()
                                .payload(raw.into())
                                .timeout(Some(Duration::from_secs(180))),
                        )
                        .await
                        .unwrap_or_else(|err| panic!("core #{index}: no answer: {err}"));
                    let result: Value = serde_json::from_slice(&reply.payload)
                        .unwrap_or_else(|err| panic!("core #{index}: not JSON ({err})"));
                    (index, result)
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (index, result) in &answers {
            check_result("core", *index, &all[*index], result);
        }

        // Every durable submission is taken (answered and acked or terminated) …
        let mut stream = js.get_stream(subjects::JOBS_STREAM).await.expect("jobs");
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let left = stream.info().await.expect("info").state.messages;
            if left == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{left} durable submissions never taken: {}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // … and each one with a request_id has its stored, valid result.
        let kv = js
            .get_key_value(subjects::RESULTS_BUCKET)
            .await
            .expect("bucket");
        for (index, key) in &stored {
            let deadline = Instant::now() + Duration::from_secs(30);
            let record = loop {
                if let Ok(Some(bytes)) = kv.get(key).await
                    && let Ok(record) = serde_json::from_slice::<Value>(&bytes)
                    && record["state"] == "done"
                {
                    break record;
                }
                assert!(
                    Instant::now() < deadline,
                    "jobs #{index}: no stored result under {key}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            check_result("jobs", *index, &all[*index], &record["result"]);
        }
        eprintln!(
            "{BUS_INPUTS} inputs over the bus ({} core, {} durable with an id) answered in {:?}",
            answers.len(),
            stored.len(),
            started.elapsed()
        );

        // Every frame stored meanwhile is a valid frame.
        let mut frames_stream = js
            .get_stream(subjects::FRAMES_STREAM)
            .await
            .expect("frames stream");
        let total = frames_stream.info().await.expect("info").state.messages;
        let consumer = frames_stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("messages");
        for _ in 0..total {
            let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .expect("a stored frame within 10 s")
                .expect("a frame")
                .expect("a frame message");
            let frame: Value = serde_json::from_slice(&message.payload).expect("frame JSON");
            let wrong = violations("frame", &frame);
            assert!(wrong.is_empty(), "{wrong:#?}\n{frame:#}");
        }

        // The worker still serves.
        assert!(worker.try_wait().is_none(), "the worker died");
        let status = common::request_json(
            "after-the-bus-storm",
            "status",
            json!({"workspace_id": "demo"}),
            json!({}),
        );
        let reply = client
            .send_request(
                subjects::request_by_id("demo"),
                async_nats::Request::new()
                    .payload(status.to_string().into())
                    .timeout(Some(Duration::from_secs(30))),
            )
            .await
            .expect("answered within 30 s");
        let result: Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert_eq!(result["status"], "succeeded", "{result:#}");
    });
}

/// A reply that names which input it answers: the core endpoint index carries it.
fn reply_token(index: usize) -> ReplyTo {
    ReplyTo::Core(millracer::engine::frames::CoreReply {
        subject: None,
        endpoint: index,
        received: Instant::now(),
        scope: None,
    })
}

/// The input a reply made by [`reply_token`] answers.
fn token_index(reply: ReplyTo) -> usize {
    match reply {
        ReplyTo::Core(core) => core.endpoint,
        other => panic!("not our reply token: {other:?}"),
    }
}
