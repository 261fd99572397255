//! `millracer ops`: reads one OpsRequest from stdin, sends it over the bus (or runs it
//! in-process) and prints the OpsResult the way the reference prints it.
//!
//! Exit codes: 0 done (also `blocked`/`incomplete`), 1 the result is `failed` or the
//! request is invalid (the reference's), 2 usage, 3 no worker answers for the workspace
//! or the bus cannot be reached (`--transport nats`), 4 timed out waiting for the result.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use futures::StreamExt;
use tracing::Instrument;

use crate::cli::{CommonOptions, NatsOptions, OpsArgs, Transport, secs};
use crate::contract::{OpsEventFrame, OpsRequest, OpsResult, ResultStatus, parse_request};
use crate::dispatch::{Action, Service, Serving};
use crate::pi::{PiError, PiRunner, SessionKind};
use crate::sessions::SessionStore;
use crate::subjects;
use crate::transport::nats::{self, Patience};
use crate::workspace::{Registry, WorkspaceRecord, resolve_path};

pub const EXIT_NO_WORKER: i32 = 3;
pub const EXIT_TIMEOUT: i32 = 4;

/// How long `auto` and `nats` wait for the broker before deciding there is none.
const CONNECT_PATIENCE: Duration = Duration::from_secs(2);

/// Why a request got no result.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No broker, or no worker answers for the workspace.
    #[error("{0}")]
    Unavailable(String),
    #[error("timed out after {0:?} waiting for the result")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
    /// The in-process service could not be built (e.g. a `--skill` that does not exist).
    #[error("{0}")]
    Setup(String),
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
    let link = Link {
        transport: args.transport,
        nats: args.nats.clone(),
        timeout: args.timeout.map(secs),
        workspace: args.workspace.clone(),
        common: args.common.clone(),
    };
    let mut out = Output::new(args.stream_json);
    let want_frames = out.wants_frames();
    let span = tracing::info_span!(
        "ops",
        request_id = %request.request_id,
        action = %request.action,
        transport = ?args.transport,
    );
    let sent = {
        let mut on_frame = |frame: FrameIn<'_>| out.frame_line(frame.line);
        send(&link, &raw, &request, want_frames, &mut on_frame)
            .instrument(span)
            .await
    };
    match sent {
        Ok(result) => {
            out.result(&result);
            i32::from(result.status == ResultStatus::Failed)
        }
        Err(err) => {
            eprintln!("millracer: error: {err}");
            err.exit_code()
        }
    }
}

/// Where a request goes: the transport, the bus settings, and what the in-process service
/// is built from (the CLI workspace and the common options).
#[derive(Debug, Clone)]
pub struct Link {
    pub transport: Transport,
    pub nats: NatsOptions,
    /// Give up waiting for a result on the bus after this long (default: wait).
    pub timeout: Option<Duration>,
    /// The reference's CLI workspace (`--workspace`).
    pub workspace: PathBuf,
    pub common: CommonOptions,
}

/// One frame on its way to the caller: its JSON line as sent, and the frame when it
/// could be read.
#[derive(Debug, Clone, Copy)]
pub struct FrameIn<'a> {
    pub line: &'a str,
    pub frame: Option<&'a OpsEventFrame>,
}

/// Sends one request the way `ops` does and returns its result: over the bus when a
/// worker answers for the workspace (`auto`, `nats`), else in-process (`auto` says so on
/// stderr, `local`). `on_frame` sees the request's frames in order; on the bus only when
/// `want_frames` (subscribing costs a round trip). `ops`, `run` and `operator` all send
/// through here, so their work reaches the same dispatch and their frames appear on the
/// bus like any adapter's.
pub async fn send(
    link: &Link,
    raw: &[u8],
    request: &OpsRequest,
    want_frames: bool,
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
) -> Result<OpsResult, BusError> {
    match link.transport {
        Transport::Local => local(link, raw, on_frame).await,
        Transport::Nats => via_bus(link, raw, request, want_frames, on_frame, true).await,
        Transport::Auto => match via_bus(link, raw, request, want_frames, on_frame, false).await {
            Err(BusError::Unavailable(why)) => {
                eprintln!("millracer: note: {why}; running in-process");
                local(link, raw, on_frame).await
            }
            other => other,
        },
    }
}

impl BusError {
    /// The exit code of `ops` for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Unavailable(_) => EXIT_NO_WORKER,
            Self::Timeout(_) => EXIT_TIMEOUT,
            Self::Failed(_) | Self::Setup(_) => 1,
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
/// `--workspace`, any path allowed, and a pi runner from the common options.
pub fn local_service(
    workspace: &std::path::Path,
    common: &CommonOptions,
) -> Result<Service, PiError> {
    let root = resolve_path(workspace);
    let record = WorkspaceRecord {
        id: "default".to_string(),
        display_name: root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| Some(root.display().to_string())),
        default_mode: Some(common.millrace_mode.clone()),
        tags: Vec::new(),
        root: root.clone(),
    };
    let registry = Registry::new(vec![record], Some("default".to_string())).unwrap_or_default();
    let pi = PiRunner::new(common.pi_config(SessionKind::Rpc, Some(&root))?);
    Ok(Service {
        registry,
        serving: Serving::AnyPath,
        cli_workspace: Some(root),
        millrace: common.millrace(),
        sessions: SessionStore::new(SessionStore::default_path()),
        settings: common.settings(),
        status_cache: None,
        pi: Some(pi),
    })
}

async fn local(
    link: &Link,
    raw: &[u8],
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
) -> Result<OpsResult, BusError> {
    let service =
        local_service(&link.workspace, &link.common).map_err(|e| BusError::Setup(e.to_string()))?;
    crate::transport::local::run_once(service, raw, |frame| {
        let line = frame.to_json_line();
        on_frame(FrameIn {
            line: &line,
            frame: Some(frame),
        });
    })
    .await
    .ok_or_else(|| BusError::Failed("no result was produced".to_string()))
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
    link: &Link,
    raw: &[u8],
    request: &OpsRequest,
    want_frames: bool,
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
    ask_any_worker: bool,
) -> Result<OpsResult, BusError> {
    let url = nats::url(&link.nats, None);
    let client = nats::connect(
        &link.nats,
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
    let mut frames = if want_frames {
        Some(
            client
                .subscribe(subjects::frames_of_request(&request.request_id))
                .await
                .map_err(|e| BusError::Failed(format!("cannot subscribe to frames: {e}")))?,
        )
    } else {
        None
    };
    let timeout = link.timeout;
    let mut reply = None;
    let mut candidates = candidate_subjects(request, &link.workspace);
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
                Some(message) = next_frame(&mut frames) => deliver(&message, on_frame),
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
            describe_target(request, &link.workspace)
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
            deliver(&message, on_frame);
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
    Ok(result)
}

fn deliver(message: &async_nats::Message, on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send)) {
    let line = String::from_utf8_lossy(&message.payload);
    let frame = serde_json::from_slice::<OpsEventFrame>(&message.payload).ok();
    on_frame(FrameIn {
        line: &line,
        frame: frame.as_ref(),
    });
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
