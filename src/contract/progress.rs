//! The frames of one request as they are emitted: numbered 1, 2, 3 … without gaps and
//! handed to a sink the caller provides. Here, at the bottom, because the runtime side
//! (delegation, the stage monitor) emits frames too and must not depend on the engine
//! that delivers them.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::contract::OpsEventFrame;
use crate::contract::vocab::{EventType, Severity};

/// W3C trace context (`traceparent`, `tracestate`) to send along with a message.
pub type TraceContext = std::collections::HashMap<String, String>;

/// One emitted frame with what its delivery needs.
#[derive(Debug)]
pub struct FrameOut {
    /// The resolved workspace id, if any: the frames subject's workspace token.
    pub workspace: Option<String>,
    pub frame: Box<OpsEventFrame>,
    pub trace: Arc<TraceContext>,
}

/// Where a request's frames go (the engine's outbound queue, a channel, a test's vector).
type FrameSink = Box<dyn Fn(FrameOut) + Send + Sync>;

/// A listener that sees every frame of a request as it is emitted (the outer agent uses
/// one to turn stage events into progress notes for pi).
pub struct Tap(Box<dyn Fn(&OpsEventFrame) + Send + Sync>);

impl Tap {
    pub fn new(f: impl Fn(&OpsEventFrame) + Send + Sync + 'static) -> Self {
        Self(Box::new(f))
    }
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tap")
    }
}

/// A step of a delegated run that a worker taking the request over must know, so it
/// continues the run instead of starting it again. Told to the durable intake through
/// [`Checkpoint`], typed: nothing is read back out of frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Milestone {
    /// The intake document is written and about to be queued: stored before `queue add`,
    /// so a takeover after a crash in between looks for it in the runtime first.
    IntakeWritten(WorkItem),
    /// The runtime has the work item (queued now, or found queued on takeover).
    WorkItemQueued(WorkItem),
    /// A Millrace daemon runs this request's work (started, restarted or adopted).
    DaemonRunning { pid: u32 },
}

/// A runtime work item as the intake wrote it: its id, its document, its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkItem {
    pub id: String,
    pub path: std::path::PathBuf,
    /// `task`, `idea` or `probe`.
    pub kind: String,
}

/// What a run must have stored durably before it goes on: called with each [`Milestone`]
/// and awaited. The durable intake provides one per request; in process there is none.
pub trait Checkpoint: Send + Sync + std::fmt::Debug {
    fn record<'a>(
        &'a self,
        milestone: &'a Milestone,
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;
}

/// Emits the frames of one request, numbered 1, 2, 3 … without gaps. Numbering and
/// sending happen under one lock so frames leave in sequence order even when emitted
/// from several tasks.
pub struct Progress {
    request_id: String,
    workspace: Option<String>,
    state: Mutex<u64>,
    out: FrameSink,
    trace: Arc<TraceContext>,
    tap: Mutex<Option<Tap>>,
    checkpoint: Mutex<Option<Arc<dyn Checkpoint>>>,
}

impl Progress {
    pub fn new(
        request_id: &str,
        workspace: Option<String>,
        out: impl Fn(FrameOut) + Send + Sync + 'static,
        trace: TraceContext,
    ) -> Self {
        Self::continuing(request_id, workspace, out, trace, 0)
    }

    /// A request's frames collected on a channel (in-process callers and tests).
    pub fn channel(
        request_id: &str,
        workspace: Option<String>,
    ) -> (Self, UnboundedReceiver<FrameOut>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let progress = Self::new(
            request_id,
            workspace,
            move |frame| {
                // A dropped receiver means nobody listens any more.
                let _ = tx.send(frame);
            },
            TraceContext::default(),
        );
        (progress, rx)
    }

    /// Frames numbered after `last_sequence`: a worker that takes over a request another
    /// worker started continues its numbering, so a replaying subscriber sees one gapless
    /// sequence.
    pub fn continuing(
        request_id: &str,
        workspace: Option<String>,
        out: impl Fn(FrameOut) + Send + Sync + 'static,
        trace: TraceContext,
        last_sequence: u64,
    ) -> Self {
        Self {
            request_id: request_id.to_string(),
            workspace,
            state: Mutex::new(last_sequence),
            out: Box::new(out),
            trace: Arc::new(trace),
            tap: Mutex::new(None),
            checkpoint: Mutex::new(None),
        }
    }

    /// Where [`Progress::checkpoint`] stores what must survive this worker.
    pub fn set_checkpoint(&self, checkpoint: Arc<dyn Checkpoint>) {
        *self.checkpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(checkpoint);
    }

    /// Stores a step durably before the run goes on (see [`Checkpoint`]); without a
    /// durable store (in process, core request/reply) there is nothing to do.
    pub async fn checkpoint(&self, milestone: Milestone) -> Result<(), String> {
        let checkpoint = self
            .checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match checkpoint {
            Some(checkpoint) => checkpoint.record(&milestone).await,
            None => Ok(()),
        }
    }

    /// The trace context the request's messages carry.
    pub fn trace(&self) -> Arc<TraceContext> {
        self.trace.clone()
    }

    /// Lets `tap` see every frame emitted from now on, until [`Progress::clear_tap`].
    pub fn set_tap(&self, tap: Tap) {
        *self.tap.lock().unwrap_or_else(|e| e.into_inner()) = Some(tap);
    }

    /// Removes the tap (dropping it, and whatever it owns).
    pub fn clear_tap(&self) {
        self.tap.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn workspace(&self) -> Option<&str> {
        self.workspace.as_deref()
    }

    /// Emits one frame; returns its sequence number.
    pub fn emit(
        &self,
        event_type: EventType,
        severity: Severity,
        message: impl Into<String>,
        payload: Map<String, Value>,
    ) -> u64 {
        let mut seq = self.state.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let frame = OpsEventFrame::new(
            &self.request_id,
            *seq,
            event_type,
            severity,
            message,
            payload,
        );
        if let Some(tap) = self.tap.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            (tap.0)(&frame);
        }
        (self.out)(FrameOut {
            workspace: self.workspace.clone(),
            frame: Box::new(frame),
            trace: self.trace.clone(),
        });
        *seq
    }

    /// An `info` frame.
    pub fn info(
        &self,
        event_type: EventType,
        message: impl Into<String>,
        payload: Map<String, Value>,
    ) -> u64 {
        self.emit(event_type, Severity::Info, message, payload)
    }

    /// How many frames were emitted so far.
    pub fn last_sequence(&self) -> u64 {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builds a frame payload from pairs. A value that serialises to `null` (a `None`) is left
/// out: the contract's optional payload keys are absent when unknown, never `null`
/// (`contracts/ops-event-frame.schema.json` types them as strings).
#[macro_export]
macro_rules! payload {
    ($($key:expr => $value:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut map = serde_json::Map::new();
        $(
            let value = serde_json::json!($value);
            if !value.is_null() {
                map.insert($key.to_string(), value);
            }
        )*
        map
    }};
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("request_id", &self.request_id)
            .field("workspace", &self.workspace)
            .finish_non_exhaustive()
    }
}
