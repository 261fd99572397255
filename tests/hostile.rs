//! Hostile input: 100,000 generated requests (random bytes, broken JSON, valid requests with
//! fields removed, retyped, oversized or full of subject metacharacters) through parsing,
//! planning and the engine with the in-process transport. Every input gets exactly one
//! result, nothing panics, and the lanes still run afterwards.
//!
//! A seeded generator rather than a fuzzing crate: deterministic in CI, no extra toolchain,
//! and a failure names the seed and the input's index.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use millracer::actions::dispatch::{Service, Serving, Settings};
use millracer::bus::subjects;
use millracer::contract::parse_request;
use millracer::engine::frames::{Outbound, ReplyTo};
use millracer::engine::service::{Engine, EngineOptions};
use millracer::millrace::command::Millrace;
use millracer::millrace::sessions::SessionStore;
use millracer::millrace::workspace::{Registry, WorkspaceRecord};
use serde_json::{Map, Value, json};

const INPUTS: usize = 100_000;
const SEED: u64 = 0x6d69_6c6c_7261_6365;

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

fn request(rng: &mut Rng, root: &str) -> Value {
    let workspace_ref = match rng.below(4) {
        0 => json!({"workspace_id": "demo"}),
        1 => json!({"workspace_id": string(rng)}),
        2 => json!({"root_path": root}),
        _ => json!({"root_path": string(rng), "mode": string(rng)}),
    };
    let mut r = json!({
        "schema_version": "millracer.ops.v0.2",
        "request_id": if rng.below(3) == 0 { string(rng) } else { json!(format!("r-{}", rng.below(5_000))) },
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

fn input(rng: &mut Rng, root: &str) -> Vec<u8> {
    match rng.below(10) {
        0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
        1 => {
            let text = request(rng, root).to_string();
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
        _ => request(rng, root).to_string().into_bytes(),
    }
}

fn service(root: PathBuf, home: &std::path::Path) -> Service {
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
        // No such program: runtime commands fail at once, as a broken install would.
        millrace: Millrace::new("millracer-test-no-such-millrace", Duration::from_secs(5)),
        sessions: SessionStore::new(home.join("sessions.json")),
        pi: None,
        settings: Settings {
            millrace_mode: "default_pi".to_string(),
            cwd: None,
            daemon_timeout: Duration::from_secs(5),
            max_daemon_restarts: 0,
            keep_daemon: false,
            notify_terminal_stages: false,
        },
        status_cache: None,
        directory: None,
        cancels: Default::default(),
    }
}

#[test]
fn a_hundred_thousand_hostile_inputs_each_get_one_clear_answer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("ws");
    std::fs::create_dir_all(&root).expect("workspace dir");
    let root = root.canonicalize().expect("canonical root");
    let root_text = root.display().to_string();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let options = EngineOptions {
            max_request_bytes: 8 * 1024,
            ..EngineOptions::default()
        };
        let (engine, mut rx) = Engine::new(Arc::new(service(root.clone(), dir.path())), options);
        let mut rng = Rng(SEED);
        let started = Instant::now();
        let span = tracing::Span::none();
        let mut parsed = 0usize;
        for index in 0..INPUTS {
            let raw = input(&mut rng, &root_text);
            if let Ok(request) = parse_request(&raw) {
                parsed += 1;
                let _ = subjects::token(&request.request_id);
                let _ = engine.service().plan(&request);
            }
            engine.submit(&raw, Some(ReplyTo::new(index)), &span);
        }
        let mut answered: HashMap<usize, usize> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while answered.len() < INPUTS {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {INPUTS} inputs answered: a lane is stuck",
                        answered.len()
                    )
                })
                .expect("engine alive");
            if let Outbound::Result { to, result, .. } = message {
                assert!(
                    result.status != millracer::contract::ResultStatus::Succeeded
                        || result.errors.is_empty(),
                    "a success carries no error"
                );
                for reply in to {
                    let index = reply.into_inner::<usize>().expect("our reply token");
                    *answered.entry(index).or_default() += 1;
                }
            }
        }
        assert!(
            answered.values().all(|n| *n == 1),
            "an input got more than one result"
        );
        eprintln!(
            "{INPUTS} inputs ({parsed} parsed) answered in {:?}",
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
            Some(ReplyTo::new(usize::MAX)),
            &span,
        );
        let answer = tokio::time::timeout(Duration::from_secs(10), async {
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
