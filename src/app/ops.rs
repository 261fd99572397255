//! `millracer ops`: reads one OpsRequest from stdin, sends it over the bus (or runs it
//! in-process) and prints the OpsResult the way the reference prints it.
//!
//! Exit codes: 0 done (also `blocked`/`incomplete`), 1 the result is `failed` or the
//! request is invalid (the reference's), 2 usage, 3 no live worker serves the workspace
//! (the bus's registry says so within a second; `--wait-for-worker` waits instead) or the
//! bus cannot be reached (`--transport nats`), 4 timed out waiting for the result.
//!
//! Never silent: a wait longer than a second (the broker, a worker, the result) is said on
//! stderr with what is waited for and `--timeout`; stdout carries only the result (and
//! frames with `--stream-json`).

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use backon::Retryable;
use futures::StreamExt;
use tracing::Instrument;

use crate::actions::dispatch::{Action, Service, Serving};
use crate::agent::pi::{PiError, PiRunner, SessionKind};
use crate::app::cli::{CommonOptions, NatsOptions, OpsArgs, Submit, Transport, secs};
use crate::bus::durable;
use crate::bus::nats::{self, Patience};
use crate::bus::subjects;
use crate::bus::{failover, retry};
use crate::contract::vocab::EventType;
use crate::contract::{OpsEventFrame, OpsRequest, OpsResult, ResultStatus, parse_request};
use crate::millrace::sessions::SessionStore;
use crate::millrace::workspace::{Registry, WorkspaceRecord, resolve_path};

pub const EXIT_NO_WORKER: i32 = 3;
pub const EXIT_TIMEOUT: i32 = 4;

/// How long `auto` and `nats` wait for the broker before deciding there is none.
const CONNECT_PATIENCE: Duration = Duration::from_secs(2);
/// Without `--timeout`, the longest wait for a request's remaining frames once its result
/// is known (they normally arrive within milliseconds).
const TRAILING_FRAMES_CAP: Duration = Duration::from_secs(30);
/// The durable result is learnt from its write as it happens; this slow re-read of the
/// results bucket is only the fallback (a write missed while the link was down, or a role
/// not allowed to subscribe to its results' subject).
const RESULT_FALLBACK_POLL: Duration = Duration::from_secs(5);

/// A wait longer than this is said on stderr: what is waited for, and `--timeout`.
const NOTE_AFTER: Duration = Duration::from_secs(1);
/// ...and said again this often while it lasts.
const NOTE_AGAIN_EVERY: Duration = Duration::from_secs(30);

/// Says on stderr what the bridge waits for once the wait has lasted [`NOTE_AFTER`], and
/// again every [`NOTE_AGAIN_EVERY`]; silent when the wait ends sooner (dropped). The
/// bridge never waits silently, whatever the transport.
struct WaitNote(tokio::task::JoinHandle<()>);

impl WaitNote {
    fn start(what: String) -> Self {
        Self(tokio::spawn(async move {
            let since = tokio::time::Instant::now();
            tokio::time::sleep(NOTE_AFTER).await;
            eprintln!("millracer: waiting for {what}");
            loop {
                tokio::time::sleep(NOTE_AGAIN_EVERY).await;
                eprintln!(
                    "millracer: still waiting ({} s) for {what}",
                    since.elapsed().as_secs()
                );
            }
        }))
    }
}

impl Drop for WaitNote {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long the bridge will wait, in words naming `--timeout`.
fn patience(timeout: Option<Duration>) -> String {
    match timeout {
        None => "no time limit; give --timeout SECONDS to stop waiting".to_string(),
        Some(t) => format!("giving up after {} s (--timeout)", t.as_secs_f64()),
    }
}

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
    let link = Link {
        transport: args.transport,
        nats: args.nats.clone(),
        timeout: args.timeout.map(secs),
        workspace: args.workspace.clone(),
        common: args.common.clone(),
        submit: args.submit,
        host_id: args.host_id.clone(),
        wait_for_worker: args.wait_for_worker,
    };
    if let Some(request_id) = args.attach.clone() {
        let mut out = Output::new(args.stream_json);
        let want_frames = out.wants_frames();
        let attached = {
            let mut on_frame = |frame: FrameIn<'_>| out.frame_line(frame.line);
            attach(
                &link,
                &request_id,
                args.attach_workspace.as_deref(),
                want_frames,
                &mut on_frame,
            )
            .await
        };
        return finish(attached, &mut out);
    }
    let mut raw = Vec::new();
    if let Some(target) = &args.cancel {
        let workspace_ref = match &args.cancel_workspace {
            Some(id) => serde_json::json!({"workspace_id": id}),
            None => {
                serde_json::json!({"root_path": resolve_path(&args.workspace).display().to_string()})
            }
        };
        raw = serde_json::json!({
            "schema_version": crate::contract::SCHEMA_VERSION,
            "request_id": format!("req-cli-cancel-{}", uuid::Uuid::new_v4()),
            "workspace_ref": workspace_ref,
            "source": {"kind": "cli", "surface": "ops"},
            "action": "cancel",
            "input": {"kind": "structured_action", "payload": {"request_id": target}},
        })
        .to_string()
        .into_bytes();
    } else if let Err(err) = std::io::stdin().read_to_end(&mut raw) {
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
    finish(sent, &mut out)
}

/// Prints the outcome and gives the exit code.
fn finish(outcome: Result<OpsResult, BusError>, out: &mut Output) -> i32 {
    match outcome {
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
    /// Durable submission (the jobs stream and the results bucket), or core request/reply.
    pub submit: Submit,
    /// This host's id (path keys are per host); `None`: `MILLRACER_HOST_ID` or the host name.
    pub host_id: Option<String>,
    /// Wait for a worker when the registry shows none (bounded by `timeout`), instead of
    /// answering "no worker" at once.
    pub wait_for_worker: bool,
}

impl Link {
    /// This host's id, for path keys.
    fn host(&self) -> Result<String, BusError> {
        crate::app::cli::host_id(self.host_id.as_deref()).map_err(BusError::Setup)
    }
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
        Transport::Nats => bus(link, raw, request, want_frames, on_frame, true).await,
        Transport::Auto => match bus(link, raw, request, want_frames, on_frame, false).await {
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

/// The bus, by the chosen submission.
async fn bus(
    link: &Link,
    raw: &[u8],
    request: &OpsRequest,
    want_frames: bool,
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
    required: bool,
) -> Result<OpsResult, BusError> {
    match link.submit {
        Submit::Request => via_bus(link, raw, request, want_frames, on_frame, required).await,
        Submit::Durable => match durable_scope(request) {
            Some(workspace) => {
                via_durable(
                    link,
                    raw,
                    request,
                    workspace.as_deref(),
                    want_frames,
                    on_frame,
                    required,
                )
                .await
            }
            None => {
                tracing::debug!(
                    "the request names its workspace by path only: sent by request/reply"
                );
                via_bus(link, raw, request, want_frames, on_frame, required).await
            }
        },
    }
}

/// The workspace whose results hold a durable request's record: `Some(None)` for
/// workspace-less actions (`jobs.any`), `Some(Some(id))` for a request naming its workspace
/// id. `None` when the request names its workspace by path only: its key holds the worker's
/// workspace id, which the bridge does not know, so it goes by request/reply instead.
fn durable_scope(request: &OpsRequest) -> Option<Option<String>> {
    if !Action::parse(&request.action).needs_workspace() {
        return Some(None);
    }
    request.workspace_ref.workspace_id.clone().map(Some)
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
    match frame.kind() {
        Some(EventType::RequestQueued) => format!(
            "queued in lane {} at position {}",
            p.get("lane").and_then(|v| v.as_str()).unwrap_or("?"),
            p.get("position").and_then(|v| v.as_u64()).unwrap_or(0)
        ),
        Some(EventType::RuntimeStageStarted) => format!(
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
        directory: None,
        cancels: Default::default(),
    })
}

async fn local(
    link: &Link,
    raw: &[u8],
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
) -> Result<OpsResult, BusError> {
    let service =
        local_service(&link.workspace, &link.common).map_err(|e| BusError::Setup(e.to_string()))?;
    crate::bus::local::run_once(service, raw, |frame| {
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
fn candidate_subjects(
    request: &OpsRequest,
    cli_workspace: &std::path::Path,
    host: &str,
) -> Vec<String> {
    if !Action::parse(&request.action).needs_workspace() {
        return vec![subjects::request_any()];
    }
    let wref = &request.workspace_ref;
    let mut subjects = Vec::new();
    if let Some(id) = &wref.workspace_id {
        subjects.push(subjects::request_by_id(id));
    }
    match &wref.root_path {
        Some(root) => subjects.push(subjects::request_by_path(&subjects::path_key(
            host,
            &resolve_path(std::path::Path::new(root)),
        ))),
        None if wref.workspace_id.is_none() => {
            subjects.push(subjects::request_by_path(&subjects::path_key(
                host,
                &resolve_path(cli_workspace),
            )));
        }
        None => {}
    }
    subjects
}

/// What a request needs a live owner of, in the bus's registry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Workspace-less actions: any worker.
    Any,
    Id(String),
    /// A path on this host: its path key (fingerprint).
    PathKey(String),
}

fn target(request: &OpsRequest, cli_workspace: &std::path::Path, host: &str) -> Target {
    if !Action::parse(&request.action).needs_workspace() {
        return Target::Any;
    }
    let wref = &request.workspace_ref;
    match (&wref.workspace_id, &wref.root_path) {
        (Some(id), _) => Target::Id(id.clone()),
        (None, Some(root)) => Target::PathKey(subjects::path_key(
            host,
            &resolve_path(std::path::Path::new(root)),
        )),
        (None, None) => Target::PathKey(subjects::path_key(host, &resolve_path(cli_workspace))),
    }
}

/// Whether the registry shows a live owner for the request: `Ok(None)` when the bus has
/// no registry (a broker without JetStream, core-only workers: the caller goes on as
/// before), `Ok(Some(served))` otherwise.
async fn served(
    client: &async_nats::Client,
    request: &OpsRequest,
    link: &Link,
) -> Result<Option<bool>, BusError> {
    let host = link.host()?;
    if !client.server_info().jetstream {
        // A broker without JetStream has no registry: only core-only workers serve there,
        // and request/reply finds them (no responders: exit 3).
        return Ok(None);
    }
    let js = async_nats::jetstream::new(client.clone());
    let target = target(request, &link.workspace, &host);
    // One workspace's entries only when the id is known (what a role scoped to that
    // workspace may read); everything otherwise.
    let filter = match &target {
        Target::Id(id) => format!("{}.*", subjects::token(id)),
        _ => ">".to_string(),
    };
    // A cluster electing leaders answers the registry late for a few seconds: tried again
    // for a bounded while before the caller is told.
    let owners = (|| crate::bus::registry::read(&js, &filter))
        .retry(retry::patiently(Some(REGISTRY_PATIENCE)))
        .notify(|err, _| tracing::debug!(%err, "cannot read the bus's registry yet; retrying"))
        .await
        .map_err(|err| BusError::Failed(format!("cannot read the bus's registry: {err}")))?;
    let Some(owners) = owners else {
        return Ok(None);
    };
    Ok(Some(owners.iter().any(|o| {
        o.live
            && match &target {
                Target::Any => true,
                Target::Id(id) => &o.entry.workspace_id == id,
                Target::PathKey(key) => &o.entry.fingerprint == key,
            }
    })))
}

/// Refuses at once (exit 3, naming the workspace) when the registry shows no live owner
/// for the request, unless the caller asked to wait; `registry_required` says what an
/// absent registry means (durable intake: nobody registered, so nobody serves).
async fn require_served(
    client: &async_nats::Client,
    request: &OpsRequest,
    link: &Link,
    url: &str,
    registry_required: bool,
) -> Result<(), BusError> {
    let served = match served(client, request, link).await {
        Ok(Some(served)) => served,
        Ok(None) if registry_required => false,
        Ok(None) => return Ok(()),
        // The registry cannot be read (a role without the grant, a cluster still electing
        // leaders): the request is sent all the same and waits for its answer, said so.
        Err(err) => {
            eprintln!("millracer: note: {err}; sending the request anyway");
            return Ok(());
        }
    };
    if served {
        return Ok(());
    }
    let what = describe_target(request, &link.workspace);
    if link.wait_for_worker {
        eprintln!(
            "millracer: note: no live worker serves {what} on {url} right now; waiting for one (--wait-for-worker)"
        );
        return Ok(());
    }
    Err(BusError::Unavailable(format!(
        "no live worker serves {what} on {url} (registry {}); start a worker for it, or pass --wait-for-worker to wait for one (bounded by --timeout)",
        subjects::REGISTRY_BUCKET
    )))
}

/// `--wait-for-worker` by request/reply: polls the registry until a live owner appears,
/// bounded by the deadline.
async fn wait_until_served(
    client: &async_nats::Client,
    request: &OpsRequest,
    link: &Link,
    deadline: Option<tokio::time::Instant>,
) -> Result<(), BusError> {
    loop {
        if served(client, request, link).await? != Some(false) {
            return Ok(());
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Err(BusError::Timeout(link.timeout.unwrap_or_default()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn via_bus(
    link: &Link,
    raw: &[u8],
    request: &OpsRequest,
    want_frames: bool,
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
    ask_any_worker: bool,
) -> Result<OpsResult, BusError> {
    let (client, url) = connect(link, !ask_any_worker).await?;
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
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    require_served(&client, request, link, &url, false).await?;
    if link.wait_for_worker {
        wait_until_served(&client, request, link, deadline).await?;
    }
    let mut reply = None;
    let mut candidates = candidate_subjects(request, &link.workspace, &link.host()?);
    // With the bus required, a workspace no worker serves still gets an answer from any
    // worker there is: a clear `workspace_not_served` result rather than silence.
    if ask_any_worker && !candidates.contains(&subjects::request_any()) {
        candidates.push(subjects::request_any());
    }
    for subject in candidates {
        let _note = WaitNote::start(format!(
            "the answer to request {} from a worker on {url} (subject {subject}); {}",
            request.request_id,
            patience(timeout)
        ));
        let mut headers = async_nats::HeaderMap::new();
        crate::bus::trace::inject(&tracing::Span::current(), &mut headers);
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
    // subscription: read them up to the last one, which the result's header names (none:
    // this answer has no frames, e.g. a refusal).
    if let Some(frames) = frames.as_mut() {
        let last = header_sequence(reply.headers.as_ref());
        let until = trailing_deadline(deadline);
        match last {
            Some(last) => {
                while let Ok(Some(message)) = tokio::time::timeout_at(until, frames.next()).await {
                    deliver(&message, on_frame);
                    if header_sequence(message.headers.as_ref()).is_some_and(|s| s >= last) {
                        break;
                    }
                }
            }
            None => {
                while let Some(Some(message)) = futures::FutureExt::now_or_never(frames.next()) {
                    deliver(&message, on_frame);
                }
            }
        }
    }
    Ok(result)
}

fn deliver(message: &async_nats::Message, on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send)) {
    deliver_bytes(&message.payload, on_frame);
}

/// Hands one frame, as received, to the caller.
fn deliver_bytes(payload: &[u8], on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send)) {
    let line = String::from_utf8_lossy(payload);
    let frame = serde_json::from_slice::<OpsEventFrame>(payload).ok();
    on_frame(FrameIn {
        line: &line,
        frame: frame.as_ref(),
    });
}

/// A frame's (or a result's) `Millracer-Sequence` header.
fn header_sequence(headers: Option<&async_nats::HeaderMap>) -> Option<u64> {
    headers
        .and_then(|h| h.get(subjects::HEADER_SEQUENCE))
        .and_then(|v| v.as_str().parse().ok())
}

/// How long frames still on their way after the result are waited for: up to `--timeout`;
/// without one, up to [`TRAILING_FRAMES_CAP`] (the result is known; frames lost on the
/// way must not keep the bridge from exiting).
fn trailing_deadline(deadline: Option<tokio::time::Instant>) -> tokio::time::Instant {
    deadline.unwrap_or_else(|| tokio::time::Instant::now() + TRAILING_FRAMES_CAP)
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
async fn connect(link: &Link, find_worker: bool) -> Result<(async_nats::Client, String), BusError> {
    let url = nats::url(&link.nats.credentials(), None);
    let note = WaitNote::start(format!(
        "the broker at {url} (up to {} s; set it with --nats-url or MILLRACER_NATS_URL)",
        CONNECT_PATIENCE.as_secs()
    ));
    let client = nats::connect(
        &link.nats.credentials(),
        &url,
        "millracer-ops",
        Patience::Once(CONNECT_PATIENCE),
    )
    .await
    .map_err(|e| BusError::Unavailable(e.to_string()))?;
    drop(note);
    if find_worker {
        let _note = WaitNote::start(format!(
            "a millracer worker to answer on {url} (up to {} s, then the request runs in-process)",
            CONNECT_PATIENCE.as_secs()
        ));
        let ping = format!("$SRV.PING.{}", crate::bus::micro::SERVICE_NAME);
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
fn jobs_subject(request: &OpsRequest, cli_workspace: &std::path::Path, host: &str) -> String {
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
        (None, Some(root)) => subjects::jobs_by_path(
            &subjects::path_key(host, &resolve_path(std::path::Path::new(root))),
            class,
        ),
        (None, None) => subjects::jobs_by_path(
            &subjects::path_key(host, &resolve_path(cli_workspace)),
            class,
        ),
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
    // A cluster electing new leaders (a server died, a stream was just created) answers
    // with timeouts or "no responders" for a few seconds: that is not "no worker". Only a
    // stream or bucket that does not exist is.
    type Failure = (&'static str, Box<dyn std::error::Error + Send + Sync>);
    let parts = || async {
        js.get_stream(subjects::JOBS_STREAM)
            .await
            .map_err(|e| (subjects::JOBS_STREAM, Box::new(e) as _))?;
        js.get_key_value(subjects::RESULTS_BUCKET)
            .await
            .map_err(|e| (subjects::RESULTS_BUCKET, Box::new(e) as _))
    };
    match parts
        .retry(retry::patiently(Some(JETSTREAM_PATIENCE)))
        .when(|(_, err): &Failure| failover::is_transient(err.as_ref()))
        .notify(
            |(what, err): &Failure, _| tracing::debug!(%err, what, "JetStream not ready; retrying"),
        )
        .await
    {
        Ok(kv) => Ok((js, kv)),
        Err((what, err)) => Err(missing(what, err.to_string())),
    }
}

/// How long the bridge tries to read the registry before it sends without knowing.
const REGISTRY_PATIENCE: Duration = Duration::from_secs(10);

/// How long the bridge waits for a JetStream that answers with transient errors.
const JETSTREAM_PATIENCE: Duration = Duration::from_secs(30);

/// [`durable::read_record`], retried while JetStream answers with transient errors.
async fn read_record_patiently(
    kv: &async_nats::jetstream::kv::Store,
    key: &str,
) -> Result<Option<durable::JobRecord>, async_nats::jetstream::kv::EntryError> {
    (|| durable::read_record(kv, key))
        .retry(retry::patiently(Some(JETSTREAM_PATIENCE)))
        .when(|err| failover::is_transient(err))
        .notify(|err, _| tracing::debug!(%err, "cannot read the results bucket yet; retrying"))
        .await
}

/// Durable submission: the stored result when there is one; otherwise the request is
/// published to the jobs stream (deduplicated by request_id) and the result is read from
/// the results bucket, so a broker restart or a worker crash on the way loses nothing.
async fn via_durable(
    link: &Link,
    raw: &[u8],
    request: &OpsRequest,
    workspace: Option<&str>,
    want_frames: bool,
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
    required: bool,
) -> Result<OpsResult, BusError> {
    let (client, url) = connect(link, !required).await?;
    let (js, kv) = jetstream_parts(&client, &url).await?;
    let timeout = link.timeout;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let key = subjects::result_key(workspace, &request.request_id);
    // Subscribed before anything is published or read, so no write is missed.
    let writes = watch_result(&client, &key).await;
    if let Some(record) = read_record_patiently(&kv, &key)
        .await
        .map_err(|e| BusError::Failed(format!("cannot read the results bucket: {e}")))?
        && record.is_done()
    {
        tracing::debug!(request_id = %request.request_id, "answered from the results bucket");
        let mut frames = replay_frames(&js, &request.request_id, workspace, want_frames).await;
        if let Some(frames) = frames.as_mut() {
            drain_until(frames, record.last_sequence, deadline, on_frame).await;
        }
        return record
            .result()
            .ok_or_else(|| BusError::Failed("the stored result is unreadable".to_string()));
    }
    require_served(&client, request, link, &url, true).await?;
    let mut frames = replay_frames(&js, &request.request_id, workspace, want_frames).await;
    let subject = jobs_subject(request, &link.workspace, &link.host()?);
    let _note = WaitNote::start(format!(
        "a worker to finish request {} for {} on {url}; {}",
        request.request_id,
        describe_target(request, &link.workspace),
        patience(timeout)
    ));
    let mut headers = async_nats::HeaderMap::new();
    crate::bus::trace::inject(&tracing::Span::current(), &mut headers);
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(bytes::Bytes::copy_from_slice(raw))
        .headers(headers)
        .message_id(key.clone());
    // Published until the stream confirms it (a broker restarting is waited for, within
    // `--timeout`); a refusal by the server is final.
    let publish = || async {
        js.send_publish(subject.clone(), message.clone())
            .await?
            .await
    };
    let stored = publish
        .retry(retry::patiently(timeout))
        .when(|err| failover::publish_refusal(err).is_none())
        .notify(|err, _| tracing::warn!(%err, "cannot store the request yet; retrying"))
        .await;
    match stored {
        Ok(ack) => {
            tracing::debug!(stream = %ack.stream, sequence = ack.sequence, duplicate = ack.duplicate, "request stored");
        }
        Err(err) => {
            return Err(match failover::publish_refusal(&err) {
                Some(failover::Refusal::NotStored(why)) => BusError::Failed(format!(
                    "the bus refused to store the request on {subject}: {why} (at most {} requests wait per jobs subject for a worker)",
                    durable::JOBS_MAX_PER_SUBJECT
                )),
                Some(failover::Refusal::TooLarge) => BusError::Failed(format!(
                    "the request of {} bytes is too large for the bus: {err}",
                    raw.len()
                )),
                None => BusError::Timeout(timeout.unwrap_or_default()),
            });
        }
    }
    let wait = Wait {
        client: &client,
        kv: &kv,
        key: &key,
        deadline,
        timeout,
    };
    wait.result(writes, &mut frames, on_frame).await
}

/// `--attach`: the frames a request published so far, then live ones, then its result.
async fn attach(
    link: &Link,
    request_id: &str,
    workspace: Option<&str>,
    want_frames: bool,
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
) -> Result<OpsResult, BusError> {
    let (client, url) = connect(link, false).await?;
    let (js, kv) = jetstream_parts(&client, &url).await?;
    let timeout = link.timeout;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let key = subjects::result_key(workspace, request_id);
    let writes = watch_result(&client, &key).await;
    let known = durable::read_record(&kv, &key)
        .await
        .map_err(|e| BusError::Failed(format!("cannot read the results bucket: {e}")))?;
    if known.is_none() {
        let scope = workspace.map_or_else(
            || "no workspace (give --attach-workspace for a workspace's request)".to_string(),
            |w| format!("workspace {w:?}"),
        );
        return Err(BusError::Failed(format!(
            "no request {request_id:?} of {scope} is known to the bus (never sent durably, or its result expired)"
        )));
    }
    let mut frames = replay_frames(&js, request_id, workspace, want_frames).await;
    let _note = WaitNote::start(format!(
        "the result of request {request_id} on {url}; {}",
        patience(timeout)
    ));
    let wait = Wait {
        client: &client,
        kv: &kv,
        key: &key,
        deadline,
        timeout,
    };
    wait.result(writes, &mut frames, on_frame).await
}

/// A replay of the request's stored frames followed by live ones (an ordered consumer on
/// the frames stream), when frames are wanted.
async fn replay_frames(
    js: &async_nats::jetstream::Context,
    request_id: &str,
    workspace: Option<&str>,
    want_frames: bool,
) -> Option<async_nats::jetstream::consumer::pull::Ordered> {
    if !want_frames {
        return None;
    }
    // The exact subject of the request in its workspace (`_none` for workspace-less
    // requests): what a workspace-scoped role may read, and never another workspace's
    // frames of a request with the same id.
    let filter = subjects::frames(workspace, request_id);
    let stream = js.get_stream(subjects::FRAMES_STREAM).await.ok()?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            // Named, so the filter is part of the API subject
            // (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`) and a role can be
            // granted the replay of its own workspace's frames only.
            name: Some(subjects::replay_consumer()),
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

/// Prints the frames still on their way, up to the request's last one (`last`, from its
/// record; `None`: the request has no frames, e.g. a refusal), bounded by `--timeout`.
async fn drain_until(
    frames: &mut async_nats::jetstream::consumer::pull::Ordered,
    last: Option<u64>,
    deadline: Option<tokio::time::Instant>,
    on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
) {
    let Some(last) = last else {
        return;
    };
    let until = trailing_deadline(deadline);
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(until, frames.next()).await {
        deliver_bytes(&message.payload, on_frame);
        if header_sequence(message.headers.as_ref()).is_some_and(|s| s >= last) {
            break;
        }
    }
}

/// A core subscription on the result key's subject: every write of the request's record
/// arrives as it is written. The client re-subscribes by itself after a reconnect; a write
/// made while the link was down is caught by re-reading the key once the link is back.
/// `None` (and the slow poll only) when the subscription cannot be made.
async fn watch_result(client: &async_nats::Client, key: &str) -> Option<async_nats::Subscriber> {
    match client.subscribe(subjects::result_key_subject(key)).await {
        Ok(sub) => Some(sub),
        Err(err) => {
            tracing::debug!(%err, "cannot watch the result key; polling it slowly");
            None
        }
    }
}

/// Waiting for a durable request's result.
struct Wait<'a> {
    client: &'a async_nats::Client,
    kv: &'a async_nats::jetstream::kv::Store,
    key: &'a str,
    deadline: Option<tokio::time::Instant>,
    timeout: Option<Duration>,
}

impl Wait<'_> {
    /// Waits until the results bucket holds the request's final result, printing frames
    /// as they come. Learns of the result from the key's writes (see [`watch_result`]),
    /// re-reads the key after a reconnect, and every [`RESULT_FALLBACK_POLL`] otherwise.
    async fn result(
        &self,
        mut writes: Option<async_nats::Subscriber>,
        frames: &mut Option<async_nats::jetstream::consumer::pull::Ordered>,
        on_frame: &mut (dyn FnMut(FrameIn<'_>) + Send),
    ) -> Result<OpsResult, BusError> {
        let mut last_frame = None;
        // The key was read just before: the first fallback read is one period away.
        let mut fallback = tokio::time::interval_at(
            tokio::time::Instant::now() + RESULT_FALLBACK_POLL,
            RESULT_FALLBACK_POLL,
        );
        // Local only (no network): notices the link coming back, to re-read the key.
        let mut link = tokio::time::interval(Duration::from_millis(250));
        link.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_connected = true;
        let never = tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let deadline = self.deadline.unwrap_or(never);
        loop {
            let record = tokio::select! {
                _ = fallback.tick() => self.read().await,
                _ = link.tick() => {
                    let connected = self.client.connection_state()
                        == async_nats::connection::State::Connected;
                    let back = connected && !was_connected;
                    was_connected = connected;
                    if back { self.read().await } else { None }
                }
                write = next_write(&mut writes) => match write {
                    Some(message) => serde_json::from_slice::<durable::JobRecord>(&message.payload).ok(),
                    None => {
                        // The subscription ended: the poll alone carries on.
                        writes = None;
                        None
                    }
                },
                Some(message) = next_replayed(frames) => {
                    deliver_bytes(&message.payload, on_frame);
                    last_frame = header_sequence(message.headers.as_ref()).max(last_frame);
                    None
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(BusError::Timeout(self.timeout.unwrap_or_default()));
                }
            };
            let Some(record) = record.filter(durable::JobRecord::is_done) else {
                continue;
            };
            if let Some(frames) = frames.as_mut() {
                let missing = match (record.last_sequence, last_frame) {
                    (Some(last), Some(seen)) if seen >= last => None,
                    (last, _) => last,
                };
                drain_until(frames, missing, self.deadline, on_frame).await;
            }
            return record
                .result()
                .ok_or_else(|| BusError::Failed("the stored result is unreadable".to_string()));
        }
    }

    async fn read(&self) -> Option<durable::JobRecord> {
        match durable::read_record(self.kv, self.key).await {
            Ok(record) => record,
            Err(err) => {
                tracing::debug!(%err, "cannot read the results bucket yet");
                None
            }
        }
    }
}

async fn next_write(writes: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match writes {
        Some(writes) => writes.next().await,
        None => std::future::pending().await,
    }
}
