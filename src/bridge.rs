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

use crate::cli::{OpsArgs, Transport, secs};
use crate::contract::{OpsEventFrame, OpsRequest, OpsResult, ResultStatus, parse_request};
use crate::dispatch::{Action, Service, Serving};
use crate::sessions::SessionStore;
use crate::subjects;
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
            Transport::Nats => via_bus(&args, &raw, &request, &mut out, true).await,
            Transport::Auto => match via_bus(&args, &raw, &request, &mut out, false).await {
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
    let url = nats::url(&args.nats, None);
    let client = nats::connect(
        &args.nats,
        &url,
        "millracer-ops",
        Patience::Once(CONNECT_PATIENCE),
    )
    .await
    .map_err(|e| BusError::Unavailable(e.to_string()))?;
    if !ask_any_worker {
        // `auto`: find a worker first (the NATS micro protocol), so a bus without one
        // falls back at once.
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
