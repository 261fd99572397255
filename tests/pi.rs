//! The natural-language route with the real `pi` (npm `@mariozechner/pi-coding-agent`,
//! pinned by `scripts/setup.sh`) against a scripted model server on 127.0.0.1: only the
//! model is replaced. Delegated work runs on the real Millrace runtime with the stand-in
//! stage runner.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::pi::{
    ModelServer, PI_COMMAND_TIMEOUT, PiHome, decision_reply, decision_reply_for, recorded_argv,
};
use common::schemas::assert_valid;
use common::stand_in::StandInWorkspace;
use common::{NatsServer, Worker, pi_bin, request_json, rt, run_ops_with_timeout};
use futures::StreamExt;
use millracer::bus::subjects;
use serde_json::{Value, json};

/// `millracer <args…>` with pi's private environment.
fn millracer(args: &[String], stdin: &str, home: &PiHome) -> Output {
    let env = home.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ops_with_timeout(&args, stdin, &env, PI_COMMAND_TIMEOUT)
}

/// `<command> --pi-command <pi> --provider fake --model fake-chat --workspace <work>
/// --transport local`, then `rest`.
fn args(command: &str, home: &PiHome, pi: &Path, rest: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        command.into(),
        "--pi-command".into(),
        pi.display().to_string(),
        "--provider".into(),
        "fake".into(),
        "--model".into(),
        "fake-chat".into(),
        "--workspace".into(),
        home.work().display().to_string(),
        "--transport".into(),
        "local".into(),
    ];
    args.extend(rest.iter().map(|s| s.to_string()));
    args
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn explain(out: &Output, server: &ModelServer) -> String {
    format!(
        "exit {:?}\n----- stdout -----\n{}\n----- stderr -----\n{}\n----- model requests -----\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
        server.summary()
    )
}

fn json_of(out: &Output, server: &ModelServer) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", explain(out, server)))
}

fn last_texts(server: &ModelServer) -> Vec<String> {
    server
        .requests()
        .iter()
        .map(|r| r["last_text"].as_str().unwrap_or("").to_string())
        .collect()
}

fn message_counts(server: &ModelServer) -> Vec<u64> {
    server
        .requests()
        .iter()
        .map(|r| r["message_count"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn a_fenced_json_decision_routes_direct_and_pi_edits_a_file_with_a_tool() {
    let server = ModelServer::start(json!({"replies": [
        decision_reply(json!({"decision": "direct", "intake_kind": "task", "why": "A one-line file.",
            "custom_loop_needed": true, "signals": ["tiny edit"]})),
        {"when": "Handle this task directly", "tool_calls": [
            {"name": "write", "arguments": {"path": "notes/hello.txt", "content": "hello from pi\n"}}]},
        {"when": "Successfully wrote", "text": "I created notes/hello.txt."},
    ]}));
    let home = PiHome::new(&server, None);
    let out = millracer(
        &args(
            "run",
            &home,
            &pi_bin(),
            &[
                "--output",
                "json",
                "Create",
                "notes/hello.txt",
                "saying hello",
            ],
        ),
        "",
        &home,
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    let result = json_of(&out, &server);
    assert_eq!(result["route"], "direct");
    assert_eq!(result["outcome"], "completed");
    assert_eq!(result["scoped_completion"], false);
    assert_eq!(result["output"], "I created notes/hello.txt.");
    assert_eq!(result["decision"]["why"], "A one-line file.");
    assert_eq!(result["decision"]["custom_loop_needed"], true);
    assert_eq!(result["intake_kind"], "task");
    assert_eq!(result["intake_signals"], json!(["tiny edit"]));
    assert_eq!(
        result["warnings"],
        json!([
            "Pi indicated that a custom Millrace loop may be needed; Millracer will still use `default_pi` unless the caller passes a different --millrace-mode."
        ])
    );
    assert_eq!(result["event"], Value::Null);
    assert_eq!(
        std::fs::read_to_string(home.work().join("notes/hello.txt")).expect("pi wrote the file"),
        "hello from pi\n"
    );
    // One session: decision, direct work, the tool result; the conversation grows.
    let texts = last_texts(&server);
    assert_eq!(texts.len(), 3, "{}", server.summary());
    assert!(texts[0].starts_with("Decide whether this task should be handled directly"));
    assert!(texts[0].ends_with("Task:\nCreate notes/hello.txt saying hello\n"));
    assert!(texts[1].starts_with("Handle this task directly in the current repository."));
    assert_eq!(message_counts(&server), [2, 4, 6]);
    let system = server.requests()[0]["body"]["messages"][0].clone();
    assert_eq!(system["role"], "system");
    assert!(
        system["content"]
            .as_str()
            .unwrap_or("")
            .contains("You are Millracer, a Pi-backed outer agent"),
        "{system}"
    );
}

#[test]
fn an_unstructured_decision_falls_back_to_the_direct_route() {
    let server = ModelServer::start(json!({"replies": [
        {"when": "Decide whether", "text": "I would simply answer this one."},
        {"when": "Handle this task directly", "text": "42"},
    ]}));
    let home = PiHome::new(&server, None);
    let out = millracer(
        &args("run", &home, &pi_bin(), &["--output", "json"]),
        "What is six times seven?\n",
        &home,
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    let result = json_of(&out, &server);
    assert_eq!(result["route"], "direct");
    assert_eq!(
        result["decision"]["why"],
        "Pi returned unstructured output."
    );
    assert_eq!(result["decision"]["intake_kind"], Value::Null);
    assert_eq!(result["output"], "42");
    // No intake kind from pi: the deterministic fallback, reported even for direct work.
    assert_eq!(result["intake_kind"], "probe");
    assert_eq!(
        result["intake_signals"],
        json!(["uncertain delegated repo work"])
    );
    assert!(last_texts(&server)[0].ends_with("Task:\nWhat is six times seven?\n"));
}

#[test]
fn a_provider_error_is_an_error_not_an_empty_reply() {
    let server = ModelServer::start(json!({"replies": [
        {"when": "Decide whether", "status": 500, "error": "upstream exploded"},
    ]}));
    let home = PiHome::new(&server, None);
    let out = millracer(&args("run", &home, &pi_bin(), &["Say hello"]), "", &home);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out, &server));
    assert!(out.stdout.is_empty(), "{}", explain(&out, &server));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("millracer: error: pi reported a provider error")
            && stderr.contains("upstream exploded"),
        "{}",
        explain(&out, &server)
    );
    // The reference would have taken the empty reply as "direct" and asked again.
    assert_eq!(server.requests().len(), 1, "{}", server.summary());
}

#[test]
fn pi_auto_retry_is_followed_to_the_answer() {
    let server = ModelServer::start(json!({"replies": [
        {"when": "Decide whether", "status": 503, "error": "overloaded, try again"},
        decision_reply(json!({"decision": "direct", "why": "small"})),
        {"when": "Handle this task directly", "text": "done after a retry"},
    ]}));
    let home = PiHome::new(
        &server,
        Some(json!({"enabled": true, "maxRetries": 2, "baseDelayMs": 20})),
    );
    let out = millracer(&args("run", &home, &pi_bin(), &["Say hello"]), "", &home);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    assert_eq!(text(&out.stdout), "done after a retry\n");
    let texts = last_texts(&server);
    assert_eq!(texts.len(), 3, "{}", server.summary());
    assert!(texts[0].starts_with("Decide whether"));
    assert!(
        texts[1].starts_with("Decide whether"),
        "pi retried the decision"
    );
    // The direct prompt went out after the retry ended, on top of the retried answer.
    assert!(texts[2].starts_with("Handle this task directly"));
    assert_eq!(message_counts(&server), [2, 2, 4]);
}

#[test]
fn a_timed_out_turn_is_an_error_and_the_next_task_gets_a_fresh_session() {
    let server = ModelServer::start(json!({"replies": [
        {"when": "first task", "text": "too late", "delay_seconds": 40},
        {"when": "second task", "text": "second answer"},
    ]}));
    let home = PiHome::new(&server, None);
    let out = millracer(
        &args(
            "operator",
            &home,
            &pi_bin(),
            // Long enough for pi to start on a busy machine (the first turn's time
            // includes the start-up, as in the reference).
            &["--route", "direct", "--pi-timeout-seconds", "8"],
        ),
        "the first task\nthe second task\n/exit\n",
        &home,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out, &server));
    assert!(
        stderr.contains("millracer: error: pi gave no answer within 8 s"),
        "{}",
        explain(&out, &server)
    );
    assert!(
        text(&out.stdout).contains("second answer\n"),
        "{}",
        explain(&out, &server)
    );
    // The second task's request carries only the system prompt and its own prompt: a new
    // pi process, not the one that timed out.
    let counts = message_counts(&server);
    assert_eq!(counts, [2, 2], "{}", server.summary());
}

#[test]
fn operator_keeps_one_pi_session_for_all_tasks() {
    let server = ModelServer::start(json!({"replies": [
        decision_reply(json!({"decision": "direct", "why": "small"})),
        decision_reply(json!({"decision": "direct", "why": "also small"})),
        {"when": "Handle this task directly", "text": "answer one"},
        {"when": "Handle this task directly", "text": "answer two"},
    ]}));
    let home = PiHome::new(&server, None);
    let out = millracer(
        &args("operator", &home, &pi_bin(), &[]),
        "What is one plus one?\n\n  And two plus two?  \n",
        &home,
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    assert!(
        text(&out.stderr).starts_with("Millracer operator ready. Type /exit to quit.\n"),
        "{}",
        explain(&out, &server)
    );
    assert_eq!(
        text(&out.stdout),
        "millracer> answer one\nmillracer> millracer> answer two\nmillracer> "
    );
    // Four turns in one conversation: each request carries everything said before.
    assert_eq!(
        message_counts(&server),
        [2, 4, 6, 8],
        "{}",
        server.summary()
    );
    let last = &server.requests()[3]["body"]["messages"];
    let history = last.to_string();
    assert!(history.contains("What is one plus one?"), "{history}");
    assert!(history.contains("answer one"), "{history}");
    assert!(last_texts(&server)[2].ends_with("Task:\nAnd two plus two?\n"));
}

#[test]
fn benchmark_json_in_and_the_legacy_document_out() {
    let server = ModelServer::start(json!({"replies": [
        {"when": "Handle this task directly", "text": "hi there"},
    ]}));
    let home = PiHome::new(&server, None);
    let request = json!({
        "prompt": "Say hi to the team",
        "workspace": home.work().display().to_string(),
        "scope": {"id": "ITEM-7", "title": "greeting", "constraints": ["be brief", 3]},
        "metadata": {"intake_kind": " IDEA "},
    });
    let mut run_args = vec![
        "run".to_string(),
        "--benchmark-json".into(),
        "--route".into(),
        "direct".into(),
        "--output".into(),
        "json".into(),
        "--pi-command".into(),
        pi_bin().display().to_string(),
        "--transport".into(),
        "local".into(),
    ];
    let out = millracer(&run_args, &request.to_string(), &home);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    let result = json_of(&out, &server);
    let mut keys: Vec<&str> = result
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "completion_evidence",
            "decision",
            "event",
            "intake_kind",
            "intake_signals",
            "outcome",
            "output",
            "progress_events",
            "route",
            "scoped_completion",
            "scoped_work_item",
            "status",
            "task_path",
            "warnings"
        ]
    );
    assert_eq!(
        result["decision"],
        json!({"route": "direct", "intake_kind": null, "why": "route forced by --route direct",
            "mode": "default_pi", "custom_loop_needed": false, "signals": ["forced --intake idea"], "notes": ""})
    );
    assert_eq!(result["intake_kind"], "idea");
    assert_eq!(
        result["scoped_work_item"],
        json!({"item_id": "ITEM-7", "title": "greeting", "source_queue": null, "spec_path": null,
            "completion_ref": null, "constraints": ["be brief"]})
    );
    assert_eq!(result["output"], "hi there");
    assert_eq!(result["status"], Value::Null);
    assert_eq!(result["task_path"], Value::Null);
    assert_eq!(result["progress_events"], json!([]));
    // Sorted keys, two-space indent, as Python prints it.
    assert!(
        text(&out.stdout).starts_with("{\n  \"completion_evidence\": [],\n  \"decision\": {\n")
    );
    assert!(last_texts(&server)[0].ends_with("Task:\nSay hi to the team\n"));

    // The reference's refusals, before any pi starts.
    for (stdin, message) in [
        (
            "[1]",
            "millracer: error: external request must be a JSON object\n",
        ),
        (
            "{\"task\": \"   \", \"prompt\": 5}",
            "millracer: error: external request requires a non-empty task, prompt, or instructions field\n",
        ),
        (
            "",
            "millracer: error: Expecting value: line 1 column 1 (char 0)\n",
        ),
    ] {
        let out = millracer(&run_args, stdin, &home);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(text(&out.stderr), message);
        assert!(out.stdout.is_empty());
    }
    run_args.retain(|a| a != "--benchmark-json");
    let out = millracer(&run_args, "  \n", &home);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "millracer: error: task text is required\n"
    );
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn print_sessions_run_one_pi_per_turn_with_a_null_stdin_and_the_reference_command_line() {
    let server = ModelServer::start(json!({"replies": [
        decision_reply(json!({"decision": "direct", "why": "small"})),
        {"when": "Handle this task directly", "text": "print answer"},
    ]}));
    let home = PiHome::new(&server, None);
    let skill = home.dir.path().join("skills/greeting");
    std::fs::create_dir_all(&skill).expect("skill dir");
    std::fs::write(
        skill.join("SKILL.md"),
        "---\nname: greeting\ndescription: Greets people politely.\n---\n\n# Greeting\n\nSay hello.\n",
    )
    .expect("SKILL.md");
    let (pi, argv_dir) = home.recording_pi();
    let out = millracer(
        &args(
            "run",
            &home,
            &pi,
            &[
                "--pi-session",
                "print",
                "--skill",
                &skill.display().to_string(),
                "Greet",
                "everyone",
            ],
        ),
        "STDIN-LEAK-MARKER\n",
        &home,
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    assert_eq!(text(&out.stdout), "print answer\n");
    let runs = recorded_argv(&argv_dir);
    assert_eq!(runs.len(), 2, "one pi process per turn: {runs:?}");
    for (run, prompt_start) in runs.iter().zip(["Decide whether", "Handle this task"]) {
        assert_eq!(
            run[..4],
            [
                "--print",
                "--no-session",
                "--no-context-files",
                "--append-system-prompt"
            ]
        );
        assert!(run[4].starts_with("You are Millracer, a Pi-backed outer agent"));
        assert_eq!(
            run[5..13],
            [
                "--provider",
                "fake",
                "--model",
                "fake-chat",
                "--thinking",
                "high",
                "--skill",
                &skill.display().to_string()
            ]
        );
        assert_eq!(run.len(), 14);
        assert!(run[13].starts_with(prompt_start), "{run:?}");
    }
    let all = server
        .requests()
        .iter()
        .map(|r| r["body"].to_string())
        .collect::<String>();
    assert!(!all.contains("STDIN-LEAK-MARKER"), "pi read our stdin");
    assert_eq!(message_counts(&server), [2, 2], "a fresh process each turn");

    // A provider error makes `pi --print` exit 1: an error, not an answer.
    server.set_script(json!({"replies": [
        {"when": "Decide whether", "status": 500, "error": "print upstream exploded"},
    ]}));
    let out = millracer(
        &args("run", &home, &pi, &["--pi-session", "print", "Greet"]),
        "",
        &home,
    );
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out, &server));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("pi --print exited with 1") && stderr.contains("print upstream exploded"),
        "{stderr}"
    );
}

#[test]
fn a_misconfigured_pi_is_refused_clearly() {
    let server =
        ModelServer::start(json!({"replies": [], "default": {"text": "should not be asked"}}));
    let home = PiHome::new(&server, None);
    // Without --model, pi silently replaces an unknown provider by its default; millracer
    // does not.
    let mut unknown = args("run", &home, &pi_bin(), &["Say hello"]);
    let at = unknown.iter().position(|a| a == "fake").expect("provider");
    unknown[at] = "nosuch".into();
    unknown.drain(at + 1..at + 3);
    let out = millracer(&unknown, "", &home);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out, &server));
    assert!(
        text(&out.stderr).contains("pi is not using provider \"nosuch\": it chose fake/fake-chat"),
        "{}",
        explain(&out, &server)
    );
    let missing = home.dir.path().join("no-such-pi");
    let out = millracer(&args("run", &home, &missing, &["Say hello"]), "", &home);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot start pi"),
        "{}",
        text(&out.stderr)
    );
    let out = millracer(
        &args(
            "run",
            &home,
            &pi_bin(),
            &["--skill", "no/such/skill", "Say hello"],
        ),
        "",
        &home,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("millracer: error: skill not found: "),
        "{}",
        text(&out.stderr)
    );
}

/// Frames of one request (its id starting with `prefix`) seen on the bus, in order.
async fn collect_frames(
    mut sub: async_nats::Subscriber,
    prefix: &str,
    until: Duration,
) -> Vec<Value> {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + until;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, sub.next()).await {
        let frame: Value = serde_json::from_slice(&message.payload).expect("frame JSON");
        if frame["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with(prefix))
        {
            let done = frame["event_type"] == "request.finished";
            frames.push(frame);
            if done {
                break;
            }
        }
    }
    frames
}

fn stage_frames(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f["event_type"] == "runtime.stage_completed")
        .map(|f| f["payload"]["stage"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The replies of a delegated run: a decision for Millrace, notes, the final answer.
fn delegating_script(final_text: &str) -> Vec<Value> {
    vec![
        decision_reply(json!({"decision": "millrace", "intake_kind": "task",
            "why": "Staged work with checks.", "mode": "default_pi", "signals": ["scoped fix"]})),
        json!({"when": "Millrace reported this progress event", "text": "Noted.", "repeat": true}),
        json!({"when": "Millrace emitted this terminal event", "text": final_text}),
    ]
}

#[test]
fn run_delegates_through_the_bus_to_the_real_runtime_and_pi_reports_the_outcome() {
    let server = ModelServer::start(json!({
        "replies": delegating_script("The task completed: tasks/done holds it.")
    }));
    let home = PiHome::new(&server, None);
    let ws = StandInWorkspace::new(json!({}));
    let nats = NatsServer::start();
    let worker = Worker::spawn(&nats.url, &[("alpha", ws.path())], &[]);
    let root = ws.path().display().to_string();
    let mut run_args = vec![
        "run".to_string(),
        "--output".into(),
        "json".into(),
        "--pi-command".into(),
        pi_bin().display().to_string(),
        "--workspace".into(),
        root.clone(),
        "--transport".into(),
        "nats".into(),
        "--nats-url".into(),
        nats.url.clone(),
        "--poll-interval-seconds".into(),
        "0.2".into(),
    ];
    run_args.push("Fix src/app.py so tests/test_app.py passes".into());
    let (out, frames) = rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let sub = client
            .subscribe(subjects::frames_of_workspace(Some("alpha")))
            .await
            .expect("subscribe");
        client.flush().await.expect("flush");
        let env = home.env();
        let run = tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let args: Vec<&str> = run_args.iter().map(String::as_str).collect();
            run_ops_with_timeout(&args, "", &env, Duration::from_secs(180))
        });
        let frames = collect_frames(sub, "req-run-", Duration::from_secs(180)).await;
        (run.await.expect("run task"), frames)
    });
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    let result = json_of(&out, &server);
    assert_eq!(result["route"], "millrace", "{result:#}");
    assert_eq!(result["outcome"], "completed", "{result:#}");
    assert_eq!(result["scoped_completion"], true);
    assert_eq!(result["output"], "The task completed: tasks/done holds it.");
    assert_eq!(result["intake_kind"], "task");
    assert_eq!(result["decision"]["why"], "Staged work with checks.");
    assert_eq!(result["event"]["kind"], "scoped_complete");
    assert!(
        result["progress_events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["reason"] == "updater update complete")),
        "{result:#}"
    );
    assert!(
        result["completion_evidence"]
            .to_string()
            .contains("tasks/done/task-"),
        "{result:#}"
    );
    let task_path = result["task_path"].as_str().expect("task_path");
    assert!(
        std::fs::read_to_string(task_path)
            .expect("intake document")
            .contains("Task-ID: task-")
    );
    // The frames of run's enqueue are on the bus like any adapter's.
    for frame in &frames {
        assert_valid("frame", frame);
    }
    assert_eq!(stage_frames(&frames), ["builder", "checker", "updater"]);
    assert_eq!(
        frames.last().map(|f| f["event_type"].clone()),
        Some(json!("request.finished"))
    );
    // pi heard about the updater, then got the real outcome to report.
    let texts = last_texts(&server);
    let note = texts
        .iter()
        .find(|t| t.starts_with("Millrace reported this progress event"))
        .expect("a progress note");
    assert!(
        note.contains("- reason: updater update complete\n"),
        "{note}"
    );
    let last = texts.last().expect("a finalization turn");
    assert!(
        last.starts_with("Millrace emitted this terminal event"),
        "{}",
        server.summary()
    );
    for line in [
        "- route: millrace\n",
        "- intake kind: task\n",
        "- outcome: completed\n",
        "- scoped completion: True\n",
        "- event: scoped_complete\n",
    ] {
        assert!(last.contains(line), "{line:?} in {last}");
    }
    assert!(last.contains("Original task:\nFix src/app.py so tests/test_app.py passes\n"));
    let stages: Vec<String> = ws
        .calls()
        .iter()
        .map(|c| c["stage"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(stages, ["builder", "checker", "updater"]);
}

#[test]
fn a_worker_with_a_pi_runner_decides_works_directly_and_finalizes_delegated_work() {
    let server = ModelServer::start(json!({"replies": [
        decision_reply_for("greeting file", json!({"decision": "direct", "why": "A greeting file."})),
        {"when": ["Handle this task directly", "greeting file"], "tool_calls": [
            {"name": "write", "arguments": {"path": "GREETING.md", "content": "Hello, team.\n"}}]},
        {"when": "Successfully wrote", "text": "Wrote GREETING.md."},
        delegating_script("Delegated: the fix is done and checked.")[0].clone(),
        delegating_script("")[1].clone(),
        delegating_script("Delegated: the fix is done and checked.")[2].clone(),
    ]}));
    let home = PiHome::new(&server, None);
    let ws = StandInWorkspace::new(json!({}));
    let nats = NatsServer::start();
    let pi = pi_bin().display().to_string();
    let env = home.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let worker = Worker::spawn_with(
        &nats.url,
        &[("alpha", ws.path())],
        &[
            "--pi-runner",
            "--pi-command",
            &pi,
            "--provider",
            "fake",
            "--model",
            "fake-chat",
        ],
        &env,
        None,
    );
    rt().block_on(async {
        let client = nats.client().await;
        worker.wait_ready(&client).await;
        let ask = |id: &str, text: &str| {
            let request = request_json(
                id,
                "enqueue",
                json!({"workspace_id": "alpha"}),
                json!({"kind": "natural_language", "text": text}),
            );
            let client = client.clone();
            async move {
                // The client's default request timeout (10 s) is too short for delegated
                // work on a busy machine.
                let reply = client
                    .send_request(
                        subjects::request_by_id("alpha"),
                        async_nats::Request::new()
                            .payload(request.to_string().into())
                            .timeout(Some(Duration::from_secs(180))),
                    )
                    .await
                    .expect("an answer within 180 s");
                let result: Value = serde_json::from_slice(&reply.payload).expect("result JSON");
                assert_valid("result", &result);
                result
            }
        };

        let direct = ask("req-pi-direct", "Write a greeting file for the team").await;
        // The reference reports this `failed`; a successful direct route succeeded.
        assert_eq!(
            direct["status"],
            "succeeded",
            "{direct:#}\n{}",
            server.summary()
        );
        assert_eq!(direct["route"], "direct");
        assert_eq!(direct["errors"], json!([]));
        assert_eq!(direct["result"]["output"], "Wrote GREETING.md.");
        assert_eq!(direct["completion"]["outcome"], "completed");
        assert_eq!(direct["completion"]["scoped_completion"], false);
        assert_eq!(direct["raw_compat"]["decision"]["why"], "A greeting file.");
        assert_eq!(
            std::fs::read_to_string(ws.path().join("GREETING.md")).expect("pi wrote it"),
            "Hello, team.\n"
        );

        let delegated = ask(
            "req-pi-delegated",
            "Fix src/app.py so tests/test_app.py passes",
        )
        .await;
        assert_eq!(
            delegated["status"],
            "succeeded",
            "{delegated:#}\n{}",
            server.summary()
        );
        assert_eq!(delegated["route"], "millrace");
        assert_eq!(delegated["intake_kind"], "task");
        assert_eq!(
            delegated["result"]["output"],
            "Delegated: the fix is done and checked."
        );
        assert_eq!(
            delegated["raw_compat"]["output"],
            "Delegated: the fix is done and checked."
        );
        assert_eq!(delegated["completion"]["scoped_completion"], true);
        assert_eq!(
            delegated["raw_compat"]["decision"]["why"],
            "Staged work with checks."
        );
        assert!(
            delegated["raw_compat"]["progress_events"]
                .to_string()
                .contains("updater update complete"),
            "{delegated:#}"
        );
    });
    // Each request had its own pi conversation: both decisions start one.
    let requests = server.requests();
    let decisions: Vec<u64> = requests
        .iter()
        .filter(|r| {
            r["last_text"]
                .as_str()
                .is_some_and(|t| t.starts_with("Decide whether"))
        })
        .map(|r| r["message_count"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(decisions, [2, 2], "{}", server.summary());
}

#[test]
fn operator_delegates_in_process_without_a_worker_and_keeps_the_conversation() {
    let mut replies = vec![decision_reply_for(
        "src/app.py",
        json!({"decision": "millrace", "intake_kind": "task", "why": "Staged work with checks."}),
    )];
    replies.extend(
        delegating_script("Delegated fix done.")[1..]
            .iter()
            .cloned(),
    );
    replies.push(decision_reply_for(
        "status line",
        json!({"decision": "direct", "why": "A summary."}),
    ));
    replies.push(json!({"when": "Handle this task directly", "text": "All good."}));
    let server = ModelServer::start(json!({ "replies": replies }));
    let home = PiHome::new(&server, None);
    let ws = StandInWorkspace::new(json!({}));
    let root = ws.path().display().to_string();
    let run_args: Vec<String> = [
        "operator",
        "--pi-command",
        &pi_bin().display().to_string(),
        "--workspace",
        &root,
        // No broker there: `auto` runs the delegated request in-process.
        "--nats-url",
        "nats://127.0.0.1:1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = millracer(
        &run_args,
        "Fix src/app.py so tests/test_app.py passes\nGive me a status line\n/quit\n",
        &home,
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    assert_eq!(
        text(&out.stdout),
        "millracer> Delegated fix done.\nmillracer> All good.\nmillracer> ",
        "{}",
        explain(&out, &server)
    );
    assert!(
        text(&out.stderr).contains("; running in-process"),
        "{}",
        explain(&out, &server)
    );
    let stages: Vec<String> = ws
        .calls()
        .iter()
        .map(|c| c["stage"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(stages, ["builder", "checker", "updater"]);
    // Decision, notes, finalization, then the next task: one growing conversation.
    let counts = message_counts(&server);
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 2),
        "{}",
        server.summary()
    );
    assert!(
        last_texts(&server)
            .iter()
            .any(|t| t.starts_with("Millrace emitted this terminal event"))
    );
}

#[test]
fn ops_in_process_has_a_pi_runner_for_direct_work() {
    let server = ModelServer::start(json!({"replies": [
        {"when": "Handle this task directly", "text": "Direct answer."},
    ]}));
    let home = PiHome::new(&server, None);
    let mut request = request_json(
        "req-ops-direct",
        "enqueue",
        json!({}),
        json!({"kind": "natural_language", "text": "Answer directly"}),
    );
    request["route_preference"] = json!("direct");
    let out = millracer(
        &args("ops", &home, &pi_bin(), &["--json"]),
        &request.to_string(),
        &home,
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &server));
    let result = json_of(&out, &server);
    assert_valid("result", &result);
    assert_eq!(result["status"], "succeeded");
    assert_eq!(result["route"], "direct");
    assert_eq!(result["result"]["output"], "Direct answer.");
    assert_eq!(
        result["raw_compat"]["decision"]["why"],
        "route forced by --route direct"
    );
}
