//! Seeing it run: one trace from the bridge through the worker to each runtime command,
//! NATS micro service discovery, JSON logs and the live frame view.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{NatsServer, Worker, Workspace, request_json, rt, run_ops};
use serde_json::{Value, json};

/// A minimal OTLP/HTTP (JSON) receiver: keeps every body posted to `/v1/traces`.
struct OtlpReceiver {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl OtlpReceiver {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let sink = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    loop {
                        let mut request_line = String::new();
                        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0usize;
                        loop {
                            let mut header = String::new();
                            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                                return;
                            }
                            let header = header.trim_end();
                            if header.is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':')
                                && name.eq_ignore_ascii_case("content-length")
                            {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0u8; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        if request_line.contains("/v1/traces")
                            && let Ok(v) = serde_json::from_slice::<Value>(&body)
                        {
                            sink.lock().expect("lock").push(v);
                        }
                        let mut out = &stream;
                        let _ = out.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}");
                    }
                });
            }
        });
        Self { url, bodies }
    }

    /// Every span received: (service, name, traceId, spanId, parentSpanId).
    fn spans(&self) -> Vec<(String, String, String, String, String)> {
        let mut out = Vec::new();
        for body in self.bodies.lock().expect("lock").iter() {
            for rs in body["resourceSpans"].as_array().into_iter().flatten() {
                let service = rs["resource"]["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name")
                    .and_then(|a| a["value"]["stringValue"].as_str())
                    .unwrap_or("")
                    .to_string();
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    for span in ss["spans"].as_array().into_iter().flatten() {
                        let s = |k: &str| span[k].as_str().unwrap_or("").to_string();
                        out.push((
                            service.clone(),
                            s("name"),
                            s("traceId"),
                            s("spanId"),
                            s("parentSpanId"),
                        ));
                    }
                }
            }
        }
        out
    }
}

#[test]
fn one_trace_runs_from_the_bridge_through_the_worker_to_each_runtime_command() {
    let otlp = OtlpReceiver::start();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let mut worker = Worker::spawn_with(&nats.url, &[("demo", ws.path())], &[], &otel, None);
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });
    let request = request_json(
        "req-traced",
        "status",
        json!({"workspace_id": "demo"}),
        json!({}),
    )
    .to_string();
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
        ],
        &request,
        &otel,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    worker.sigterm();
    assert_eq!(
        worker
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = otlp.spans();
        let has = |name: &str| spans.iter().any(|s| s.1 == name);
        if (has("ops") && has("millrace")) || Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let ops = spans
        .iter()
        .find(|s| s.0 == "millracer-ops" && s.1 == "ops")
        .unwrap_or_else(|| panic!("no ops span from the bridge in {spans:#?}"))
        .clone();
    // The worker's spans of this request are those in the bridge's trace.
    let in_trace = |name: &str| {
        spans
            .iter()
            .find(|s| s.0 == "millracer-worker" && s.1 == name && s.2 == ops.2)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} span from the worker in the bridge's trace {}: {spans:#?}",
                    ops.2
                )
            })
            .clone()
    };
    let receive = in_trace("nats.receive");
    let request = in_trace("request");
    let command = in_trace("millrace");
    assert_eq!(receive.4, ops.3, "the worker continues the bridge's span");
    assert_eq!(request.4, receive.3);
    assert_eq!(
        command.4, request.3,
        "the runtime command hangs under the request span"
    );
}

#[test]
fn srv_ping_info_and_stats_find_and_describe_the_worker() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let worker = Worker::spawn(&nats.url, &[("demo", ws.path())], &[]);
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let ask = |subject: &'static str| {
            let client = client.clone();
            async move {
                let reply = client
                    .request(subject, bytes::Bytes::new())
                    .await
                    .expect("answer");
                serde_json::from_slice::<Value>(&reply.payload).expect("json")
            }
        };
        let ping = ask("$SRV.PING").await;
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
        assert!(ping["name"].as_str().unwrap_or("").contains("millracer"));
        assert!(!ping["version"].as_str().unwrap_or("").is_empty());
        let info = ask("$SRV.INFO.millracer").await;
        let subjects: Vec<&str> = info["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .map(|e| e["subject"].as_str().unwrap_or(""))
            .collect();
        assert!(
            subjects.contains(&"millracer.ops.v0_2.req.ws.demo"),
            "{subjects:?}"
        );
        assert!(subjects.contains(&"millracer.ops.v0_2.req.any"));

        let request = request_json(
            "req-counted",
            "status",
            json!({"workspace_id": "demo"}),
            json!({}),
        );
        client
            .request("millracer.ops.v0_2.req.ws.demo", request.to_string().into())
            .await
            .expect("status answered");
        let stats = ask("$SRV.STATS.millracer").await;
        let ws_endpoint = stats["endpoints"]
            .as_array()
            .expect("endpoints")
            .iter()
            .find(|e| e["name"] == "ws-demo")
            .cloned()
            .expect("ws-demo");
        assert_eq!(ws_endpoint["num_requests"], 1, "{stats:#}");
        assert!(ws_endpoint["processing_time"].as_u64().unwrap_or(0) > 0);
    });
}

#[test]
fn json_logs_parse_line_by_line_and_events_follow_shows_frames() {
    let nats = NatsServer::start();
    let ws = Workspace::init();
    let mut worker = Worker::spawn(&nats.url, &[("demo", ws.path())], &["--log-format", "json"]);
    rt().block_on(async { worker.wait_ready(&nats.client().await).await });

    // Started like every millracer of the tests: no inherited MILLRACER_* settings.
    let mut follower = common::millracer_command()
        .args(["events", "--follow", "--json", "--nats-url", &nats.url])
        .env("RUST_LOG", "info")
        .env("HOME", worker.home())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn events");
    let stderr = common::Lines::new(follower.stderr.take().expect("stderr"));
    stderr.until(Duration::from_secs(30), "events to subscribe", |line| {
        line.contains("following frames")
    });

    let request = request_json(
        "req-followed",
        "status",
        json!({"workspace_id": "demo"}),
        json!({}),
    )
    .to_string();
    let out = run_ops(
        &[
            "ops",
            "--json",
            "--transport",
            "nats",
            "--nats-url",
            &nats.url,
        ],
        &request,
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let stdout = common::Lines::new(follower.stdout.take().expect("stdout"));
    let mut types = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame_line = stdout.next_within(left, "the followed request's frames");
        let frame: Value = serde_json::from_str(&frame_line).expect("a frame per line");
        if frame["request_id"] == "req-followed" {
            types.push(frame["event_type"].as_str().unwrap_or("").to_string());
            if frame["event_type"] == "request.finished" {
                break;
            }
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(
        types,
        ["request.accepted", "request.started", "request.finished"]
    );

    worker.sigterm();
    assert_eq!(
        worker
            .wait_exit(Duration::from_secs(20))
            .and_then(|s| s.code()),
        Some(0)
    );
    let log = worker.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    assert!(lines.iter().any(|l| l.contains("worker ready")));
}
