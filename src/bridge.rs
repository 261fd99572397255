//! `millracer ops`: reads one OpsRequest from stdin, sends it over the bus (or runs it
//! in-process) and prints the OpsResult the way the reference prints it.
//!
//! Exit codes: 0 done (also `blocked`/`incomplete`), 1 the result is `failed` or the
//! request is invalid (the reference's), 2 usage, 3 no worker answers for the workspace
//! or the bus cannot be reached (`--transport nats`), 4 timed out waiting for the result.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use futures::StreamExt;
use tracing::Instrument;

use crate::cli::{OpsArgs, Submit, Transport, secs};
use crate::contract::{OpsEventFrame, OpsRequest, OpsResult, ResultStatus, parse_request};
use crate::dispatch::{Action, Service, Serving};
use crate::sessions::SessionStore;
use crate::subjects;
use crate::transport::durable;
use crate::transport::nats::{self, Patience};
use crate::workspace::{Registry, WorkspaceRecord, resolve_path};

pub const EXIT_NO_WORKER: i32 = 3;
pub const EXIT_TIMEOUT: i32 = 4;

/// How long `auto` and `nats` wait for the broker before deciding there is none.
const CONNECT_PATIENCE: Duration = Duration::from_secs(2);

/// Why the bus gave no result.
#[derive(Debug, thiserror::Error)]
enum BusError {
    #[error("{0}")]
    Unavailable(String),
    #[error("timed out after {0:?} waiting for the result")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
}

pub async fn run(args: OpsArgs) -> i32 {
    if !args.json && !args.stream_json {
        eprintln!("millracer: error: ops requires --json or --stream-json");
        return 2;
    }
    if let Some(request_id) = args.attach.clone() {
        let mut out = Output::new(args.stream_json);
        let outcome = attach(&args, &request_id, &mut out).await;
        return finish(outcome, &mut out);
    }
    let mut raw = Vec::new();
    if let Err(err) = std::io::stdin().read_to_end(&mut raw) {
        eprintln!("millracer: error: {err}");
        return 1;
    }
    let request = match parse_request(&raw) {
        Ok(request) => request,
        Err(err) => {
            eprintln!("millracer: error: {err}");
            return 1;
        }
    };
    let mut out = Output::new(args.stream_json);
    let span = tracing::info_span!(
        "ops",
        request_id = %request.request_id,
        action = %request.action,
        transport = ?args.transport,
    );
    let outcome = async {
        match args.transport {
            Transport::Local => Ok(local(&args, &raw, &mut out).await),
            Transport::Nats => bus(&args, &raw, &request, &mut out, true).await,
            Transport::Auto => match bus(&args, &raw, &request, &mut out, false).await {
                Err(BusError::Unavailable(why)) => {
                    eprintln!("millracer: note: {why}; running in-process");
                    Ok(local(&args, &raw, &mut out).await)
                }
                other => other,
            },
        }
    }
    .instrument(span)
    .await;
    finish(outcome, &mut out)
}

/// Prints the outcome and gives the exit code.
fn finish(outcome: Result<Option<OpsResult>, BusError>, out: &mut Output) -> i32 {
    match outcome {
        Ok(Some(result)) => {
            out.result(&result);
            i32::from(result.status == ResultStatus::Failed)
        }
        Ok(None) => {
            eprintln!("millracer: error: no result was produced");
            1
        }
        Err(BusError::Unavailable(why)) => {
            eprintln!("millracer: error: {why}");
            EXIT_NO_WORKER
        }
        Err(err @ BusError::Timeout(_)) => {
            eprintln!("millracer: error: {err}");
            EXIT_TIMEOUT
        }
        Err(BusError::Failed(why)) => {
            eprintln!("millracer: error: {why}");
            1
        }
    }
}

/// The bus, by the chosen submission.
async fn bus(
    args: &OpsArgs,
    raw: &[u8],
    request: &OpsRequest,
    out: &mut Output,
    required: bool,
) -> Result<Option<OpsResult>, BusError> {
    match args.submit {
        Submit::Request => via_bus(args, raw, request, out, required).await,
        Submit::Durable => via_durable(args, raw, request, out, required).await,
    }
}

/// Prints frames and the result on stdout in the chosen format, and on a terminal keeps
/// a progress line on stderr (stdout stays machine-readable).
struct Output {
    stream: bool,
    line: Option<indicatif::ProgressBar>,
}

impl Output {
    fn new(stream: bool) -> Self {
        let line = (std::io::stderr().is_terminal()
            && std::env::var_os("MILLRACER_NO_PROGRESS").is_none())
        .then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar.set_message("waiting for the worker");
            bar
        });
        Self { stream, line }
    }

    /// Whether frames are wanted at all (printed, or shown on the progress line).
    fn wants_frames(&self) -> bool {
        self.stream || self.line.is_some()
    }

    fn frame_line(&mut self, line: &str) {
        if let Some(bar) = &self.line
            && let Ok(frame) = serde_json::from_str::<OpsEventFrame>(line)
        {
            bar.set_message(progress_message(&frame));
        }
        if self.stream {
            let write = || {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "{line}");
                let _ = stdout.flush();
            };
            match &self.line {
                Some(bar) => bar.suspend(write),
                None => write(),
            }
        }
    }

    fn frame(&mut self, frame: &OpsEventFrame) {
        if self.wants_frames() {
            self.frame_line(&frame.to_json_line());
        }
    }

    fn result(&mut self, result: &OpsResult) {
        if let Some(bar) = self.line.take() {
            bar.finish_and_clear();
        }
        let mut stdout = std::io::stdout().lock();
        let text = if self.stream {
            result.to_json_line()
        } else {
            result.to_pretty_json()
        };
        let _ = writeln!(stdout, "{text}");
        let _ = stdout.flush();
    }
}

/// The progress line for a frame: the stage when one runs, the lane position when
/// waiting, else the frame's own message.
fn progress_message(frame: &OpsEventFrame) -> String {
    let p = &frame.payload;
    match frame.event_type.as_str() {
        "request.queued" => format!(
            "queued in lane {} at position {}",
            p.get("lane").and_then(|v| v.as_str()).unwrap_or("?"),
            p.get("position").and_then(|v| v.as_u64()).unwrap_or(0)
        ),
        "runtime.stage_started" => format!(
            "{} running on {}",
            p.get("stage").and_then(|v| v.as_str()).unwrap_or("stage"),
            p.get("work_item_id").and_then(|v| v.as_str()).unwrap_or("")
        ),
        _ => frame.message.clone(),
    }
}

/// The reference's in-process service: one registered workspace `default` at
/// `--workspace`, any path allowed.
fn local_service(args: &OpsArgs) -> Service {
    let root = resolve_path(&args.workspace);
    let record = WorkspaceRecord {
        id: "default".to_string(),
        display_name: root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| Some(root.display().to_string())),
        default_mode: Some(args.common.millrace_mode.clone()),
        tags: Vec::new(),
        root: root.clone(),
    };
    let registry = Registry::new(vec![record], Some("default".to_string())).unwrap_or_default();
    Service {
        registry,
        serving: Serving::AnyPath,
        cli_workspace: Some(root),
        millrace: args.common.millrace(),
        sessions: SessionStore::new(SessionStore::default_path()),
        settings: args.common.settings(),
        status_cache: None,
    }
}

async fn local(args: &OpsArgs, raw: &[u8], out: &mut Output) -> Option<OpsResult> {
    crate::transport::local::run_once(local_service(args), raw, |frame| out.frame(frame)).await
}

/// Request subjects to try, most specific first.
fn candidate_subjects(request: &OpsRequest, cli_workspace: &std::path::Path) -> Vec<String> {
    if !Action::parse(&request.action).needs_workspace() {
        return vec![subjects::request_any()];
    }
    let wref = &request.workspace_ref;
    let mut subjects = Vec::new();
    if let Some(id) = &wref.workspace_id {
        subjects.push(subjects::request_by_id(id));
    }
    match &wref.root_path {
        Some(root) => subjects.push(subjects::request_by_path(&resolve_path(
            std::path::Path::new(root),
        ))),
        None if wref.workspace_id.is_none() => {
            subjects.push(subjects::request_by_path(&resolve_path(cli_workspace)));
        }
        None => {}
    }
    subjects
}

async fn via_bus(
    args: &OpsArgs,
    raw: &[u8],
    request: &OpsRequest,
    out: &mut Output,
    ask_any_worker: bool,
) -> Result<Option<OpsResult>, BusError> {
    let (client, url) = connect(args, !ask_any_worker).await?;
    let mut frames = if out.wants_frames() {
        Some(
            client
                .subscribe(subjects::frames_of_request(&request.request_id))
                .await
                .map_err(|e| BusError::Failed(format!("cannot subscribe to frames: {e}")))?,
        )
    } else {
        None
    };
    let timeout = args.timeout.map(secs);
    let mut reply = None;
    let mut candidates = candidate_subjects(request, &args.workspace);
    // With the bus required, a workspace no worker serves still gets an answer from any
    // worker there is: a clear `workspace_not_served` result rather than silence.
    if ask_any_worker && !candidates.contains(&subjects::request_any()) {
        candidates.push(subjects::request_any());
    }
    for subject in candidates {
        let mut headers = async_nats::HeaderMap::new();
        crate::telemetry::inject(&tracing::Span::current(), &mut headers);
        let sending = client.send_request(
            subject.clone(),
            async_nats::Request::new()
                .payload(raw.to_vec().into())
                .headers(headers)
                .timeout(timeout),
        );
        tokio::pin!(sending);
        let answer = loop {
            tokio::select! {
                answer = &mut sending => break answer,
                Some(message) = next_frame(&mut frames) => {
                    out.frame_line(&String::from_utf8_lossy(&message.payload));
                }
            }
        };
        match answer {
            Ok(message) => {
                reply = Some(message);
                break;
            }
            Err(err) if err.kind() == RequestErrorKind::NoResponders => continue,
            Err(err) if err.kind() == RequestErrorKind::TimedOut => {
                return Err(BusError::Timeout(timeout.unwrap_or_default()));
            }
            Err(err) => return Err(BusError::Failed(format!("request failed: {err}"))),
        }
    }
    let Some(reply) = reply else {
        return Err(BusError::Unavailable(format!(
            "no worker on {url} answers for {}",
            describe_target(request, &args.workspace)
        )));
    };
    let result: OpsResult = serde_json::from_slice(&reply.payload)
        .map_err(|e| BusError::Failed(format!("the worker sent an unreadable result: {e}")))?;
    // Frames precede the result on the worker's connection, but arrive here on another
    // subscription: print the ones still buffered, up to the finished frame.
    if let Some(frames) = frames.as_mut() {
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_millis(500), frames.next()).await
        {
            out.frame_line(&String::from_utf8_lossy(&message.payload));
            let finished = message
                .headers
                .as_ref()
                .and_then(|h| h.get(subjects::HEADER_EVENT_TYPE))
                .is_some_and(|v| v.as_str() == "request.finished");
            if finished {
                break;
            }
        }
    }
    Ok(Some(result))
}

async fn next_frame(frames: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match frames {
        Some(frames) => frames.next().await,
        None => std::future::pending().await,
    }
}

fn describe_target(request: &OpsRequest, cli_workspace: &std::path::Path) -> String {
    let wref = &request.workspace_ref;
    if !Action::parse(&request.action).needs_workspace() {
        return format!("action {}", request.action);
    }
    match (&wref.workspace_id, &wref.root_path) {
        (Some(id), _) => format!("workspace id {id:?}"),
        (None, Some(root)) => format!(
            "workspace {}",
            resolve_path(std::path::Path::new(root)).display()
        ),
        (None, None) => format!("workspace {}", resolve_path(cli_workspace).display()),
    }
}

/// Connects; with `find_worker` (`auto`) also finds a worker first (the NATS micro
/// protocol), so a bus without one falls back at once.
async fn connect(
    args: &OpsArgs,
    find_worker: bool,
) -> Result<(async_nats::Client, String), BusError> {
    let url = nats::url(&args.nats, None);
    let client = nats::connect(
        &args.nats,
        &url,
        "millracer-ops",
        Patience::Once(CONNECT_PATIENCE),
    )
    .await
    .map_err(|e| BusError::Unavailable(e.to_string()))?;
    if find_worker {
        let ping = format!("$SRV.PING.{}", crate::transport::micro::SERVICE_NAME);
        match tokio::time::timeout(CONNECT_PATIENCE, client.request(ping, bytes::Bytes::new()))
            .await
        {
            Ok(Ok(_)) => {}
            _ => {
                return Err(BusError::Unavailable(format!(
                    "no millracer worker answers on {url}"
                )));
            }
        }
    }
    Ok((client, url))
}

/// The jobs subject of a request, most specific first: its workspace id, else its root
/// path (or the bridge's `--workspace`); workspace-less actions go to any worker.
fn jobs_subject(request: &OpsRequest, cli_workspace: &std::path::Path) -> String {
    let action = Action::parse(&request.action);
    if !action.needs_workspace() {
        return subjects::jobs_any();
    }
    let class = if action.is_mutating() {
        subjects::JobClass::Change
    } else {
        subjects::JobClass::Read
    };
    let wref = &request.workspace_ref;
    match (&wref.workspace_id, &wref.root_path) {
        (Some(id), _) => subjects::jobs_by_id(id, class),
        (None, Some(root)) => {
            subjects::jobs_by_path(&resolve_path(std::path::Path::new(root)), class)
        }
        (None, None) => subjects::jobs_by_path(&resolve_path(cli_workspace), class),
    }
}

/// The jobs stream and the results bucket, as workers set them up. The bridge creates
/// neither: a broker where no worker ever set up durable intake has no worker ("no worker",
/// exit 3, or in-process with `auto`), while on one where workers run, a request waits in
/// the stream for a worker serving its workspace.
async fn jetstream_parts(
    client: &async_nats::Client,
    url: &str,
) -> Result<
    (
        async_nats::jetstream::Context,
        async_nats::jetstream::kv::Store,
    ),
    BusError,
> {
    let js = async_nats::jetstream::new(client.clone());
    let missing = |what: &str, err: String| {
        BusError::Unavailable(format!(
            "no worker on {url} takes durable requests ({what}: {err})"
        ))
    };
    js.get_stream(subjects::JOBS_STREAM)
        .await
        .map_err(|e| missing(subjects::JOBS_STREAM, e.to_string()))?;
    let kv = js
        .get_key_value(subjects::RESULTS_BUCKET)
        .await
        .map_err(|e| missing(subjects::RESULTS_BUCKET, e.to_string()))?;
    Ok((js, kv))
}

/// Durable submission: the stored result when there is one; otherwise the request is
/// published to the jobs stream (deduplicated by request_id) and the result is read from
/// the results bucket, so a broker restart or a worker crash on the way loses nothing.
async fn via_durable(
    args: &OpsArgs,
    raw: &[u8],
    request: &OpsRequest,
    out: &mut Output,
    required: bool,
) -> Result<Option<OpsResult>, BusError> {
    let (client, url) = connect(args, !required).await?;
    let (js, kv) = jetstream_parts(&client, &url).await?;
    let timeout = args.timeout.map(secs);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    if let Some(record) = durable::read_record(&kv, &request.request_id)
        .await
        .map_err(|e| BusError::Failed(format!("cannot read the results bucket: {e}")))?
        && record.is_done()
    {
        tracing::debug!(request_id = %request.request_id, "answered from the results bucket");
        let mut frames = replay_frames(
            &js,
            &request.request_id,
            request.workspace_ref.workspace_id.as_deref(),
            out,
        )
        .await;
        if let Some(frames) = frames.as_mut() {
            drain_until_finished(frames, out).await;
        }
        return record
            .result()
            .map(Some)
            .ok_or_else(|| BusError::Failed("the stored result is unreadable".to_string()));
    }
    let mut frames = replay_frames(
        &js,
        &request.request_id,
        request.workspace_ref.workspace_id.as_deref(),
        out,
    )
    .await;
    let subject = jobs_subject(request, &args.workspace);
    if required {
        note_if_unserved(&js, request, &url).await;
    }
    let mut headers = async_nats::HeaderMap::new();
    crate::telemetry::inject(&tracing::Span::current(), &mut headers);
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(bytes::Bytes::copy_from_slice(raw))
        .headers(headers)
        .message_id(subjects::result_key(&request.request_id));
    // Published until the stream confirms it (a broker restarting is waited for).
    loop {
        let attempt = async {
            js.send_publish(subject.clone(), message.clone())
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        match attempt.await {
            Ok(ack) => {
                tracing::debug!(stream = %ack.stream, sequence = ack.sequence, duplicate = ack.duplicate, "request stored");
                break;
            }
            Err(err) if err.contains("maximum") || err.contains("size") => {
                return Err(BusError::Failed(format!(
                    "the request of {} bytes is too large for the bus: {err}",
                    raw.len()
                )));
            }
            Err(err) => {
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return Err(BusError::Timeout(timeout.unwrap_or_default()));
                }
                tracing::warn!(%err, "cannot store the request yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    wait_for_result(
        &kv,
        &request.request_id,
        &mut frames,
        out,
        deadline,
        timeout,
    )
    .await
}

/// `--attach`: the frames a request published so far, then live ones, then its result.
async fn attach(
    args: &OpsArgs,
    request_id: &str,
    out: &mut Output,
) -> Result<Option<OpsResult>, BusError> {
    let (client, url) = connect(args, false).await?;
    let (js, kv) = jetstream_parts(&client, &url).await?;
    let timeout = args.timeout.map(secs);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let known = durable::read_record(&kv, request_id)
        .await
        .map_err(|e| BusError::Failed(format!("cannot read the results bucket: {e}")))?;
    if known.is_none() {
        return Err(BusError::Failed(format!(
            "no request {request_id:?} is known to the bus (never sent durably, or its result expired)"
        )));
    }
    let workspace = known.and_then(|r| r.workspace);
    let mut frames = replay_frames(&js, request_id, workspace.as_deref(), out).await;
    wait_for_result(&kv, request_id, &mut frames, out, deadline, timeout).await
}

/// A replay of the request's stored frames followed by live ones (an ordered consumer on
/// the frames stream), when frames are wanted.
async fn replay_frames(
    js: &async_nats::jetstream::Context,
    request_id: &str,
    workspace: Option<&str>,
    out: &Output,
) -> Option<async_nats::jetstream::consumer::pull::Ordered> {
    if !out.wants_frames() {
        return None;
    }
    // Named workspace: the exact subject, which a workspace-scoped adapter may read.
    let filter = match workspace {
        Some(ws) => subjects::frames(Some(ws), request_id),
        None => subjects::frames_of_request(request_id),
    };
    let stream = js.get_stream(subjects::FRAMES_STREAM).await.ok()?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter,
            ..Default::default()
        })
        .await
        .map_err(|e| tracing::warn!(%e, "cannot replay frames"))
        .ok()?;
    consumer
        .messages()
        .await
        .map_err(|e| tracing::warn!(%e, "cannot replay frames"))
        .ok()
}

async fn next_replayed(
    frames: &mut Option<async_nats::jetstream::consumer::pull::Ordered>,
) -> Option<async_nats::jetstream::Message> {
    match frames {
        Some(frames) => loop {
            match frames.next().await {
                Some(Ok(message)) => return Some(message),
                Some(Err(err)) => {
                    tracing::debug!(%err, "frame replay interrupted");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => return std::future::pending().await,
            }
        },
        None => std::future::pending().await,
    }
}

fn is_finished(message: &async_nats::jetstream::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(subjects::HEADER_EVENT_TYPE))
        .is_some_and(|v| v.as_str() == "request.finished")
}

/// Prints the frames still on their way, up to the finished frame.
async fn drain_until_finished(
    frames: &mut async_nats::jetstream::consumer::pull::Ordered,
    out: &mut Output,
) {
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(1000), frames.next()).await
    {
        out.frame_line(&String::from_utf8_lossy(&message.payload));
        if is_finished(&message) {
            break;
        }
    }
}

/// Waits until the results bucket holds the request's final result, printing frames as
/// they come. Polls the bucket: unlike a watch, a poll needs no resubscription after a
/// broker restart.
async fn wait_for_result(
    kv: &async_nats::jetstream::kv::Store,
    request_id: &str,
    frames: &mut Option<async_nats::jetstream::consumer::pull::Ordered>,
    out: &mut Output,
    deadline: Option<tokio::time::Instant>,
    timeout: Option<Duration>,
) -> Result<Option<OpsResult>, BusError> {
    let mut finished_seen = false;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    return Err(BusError::Timeout(timeout.unwrap_or_default()));
                }
                match durable::read_record(kv, request_id).await {
                    Ok(Some(record)) if record.is_done() => {
                        if !finished_seen && let Some(frames) = frames.as_mut() {
                            drain_until_finished(frames, out).await;
                        }
                        return record.result().map(Some).ok_or_else(|| {
                            BusError::Failed("the stored result is unreadable".to_string())
                        });
                    }
                    Ok(_) => {}
                    Err(err) => tracing::debug!(%err, "cannot read the results bucket yet"),
                }
            }
            Some(message) = next_replayed(frames) => {
                out.frame_line(&String::from_utf8_lossy(&message.payload));
                finished_seen |= is_finished(&message);
            }
        }
    }
}

/// With `--transport nats`, says on stderr when no worker is pulling the workspace's
/// requests right now: the request is stored and waits for one.
async fn note_if_unserved(js: &async_nats::jetstream::Context, request: &OpsRequest, url: &str) {
    let action = Action::parse(&request.action);
    let consumer = if !action.needs_workspace() {
        subjects::JOBS_ANY_CONSUMER.to_string()
    } else if let Some(id) = &request.workspace_ref.workspace_id {
        let class = if action.is_mutating() {
            subjects::JobClass::Change
        } else {
            subjects::JobClass::Read
        };
        subjects::jobs_consumer(id, class)
    } else {
        return;
    };
    let Ok(mut stream) = js.get_stream(subjects::JOBS_STREAM).await else {
        return;
    };
    let waiting = match stream.consumer_info(&consumer).await {
        Ok(info) => info.num_waiting > 0,
        Err(_) => false,
    };
    let _ = &mut stream;
    if !waiting {
        eprintln!(
            "millracer: note: no worker on {url} takes requests for {} right now; the request is stored and waits for one (durable)",
            describe_target(request, std::path::Path::new("."))
        );
    }
}
