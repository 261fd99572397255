//! Event frames and results on their way out. The engine and handlers push
//! [`Outbound`] messages; a transport (NATS or in-process) delivers them in order.

use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::contract::{OpsEventFrame, OpsResult};

/// Where a result goes, as the transport that received the request knows it (a NATS
/// reply subject with its endpoint, or nothing for an in-process call). Opaque here, so
/// the engine stays free of any transport.
pub struct ReplyTo(Box<dyn std::any::Any + Send>);

impl ReplyTo {
    pub fn new<T: std::any::Any + Send>(value: T) -> Self {
        Self(Box::new(value))
    }

    /// The transport's own value back.
    pub fn into_inner<T: std::any::Any>(self) -> Option<T> {
        self.0.downcast::<T>().ok().map(|b| *b)
    }

    /// The transport's own value back, or this box untouched when it holds another type
    /// (a worker answers core request/reply and JetStream requests through one publisher).
    pub fn try_into_inner<T: std::any::Any>(self) -> Result<T, Self> {
        self.0.downcast::<T>().map(|b| *b).map_err(Self)
    }
}

impl std::fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplyTo(..)")
    }
}

/// W3C trace context (`traceparent`, `tracestate`) to send along with a message.
pub type TraceContext = std::collections::HashMap<String, String>;

/// A message for the transport to deliver.
#[derive(Debug)]
pub enum Outbound {
    /// One frame of one request; `workspace` is the resolved workspace id, if any.
    Frame {
        workspace: Option<String>,
        frame: Box<OpsEventFrame>,
        trace: Arc<TraceContext>,
    },
    /// The final result, for every caller waiting on this request.
    Result {
        to: Vec<ReplyTo>,
        workspace: Option<String>,
        result: Arc<OpsResult>,
        trace: Arc<TraceContext>,
    },
}

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

/// Emits the frames of one request, numbered 1, 2, 3 … without gaps. Numbering and
/// sending happen under one lock so frames leave in sequence order even when emitted
/// from several tasks.
#[derive(Debug)]
pub struct Progress {
    request_id: String,
    workspace: Option<String>,
    state: Mutex<u64>,
    out: UnboundedSender<Outbound>,
    trace: Arc<TraceContext>,
    tap: Mutex<Option<Tap>>,
}

impl Progress {
    pub fn new(
        request_id: &str,
        workspace: Option<String>,
        out: UnboundedSender<Outbound>,
        trace: TraceContext,
    ) -> Self {
        Self::continuing(request_id, workspace, out, trace, 0)
    }

    /// Frames numbered after `last_sequence`: a worker that takes over a request another
    /// worker started continues its numbering, so a replaying subscriber sees one gapless
    /// sequence.
    pub fn continuing(
        request_id: &str,
        workspace: Option<String>,
        out: UnboundedSender<Outbound>,
        trace: TraceContext,
        last_sequence: u64,
    ) -> Self {
        Self {
            request_id: request_id.to_string(),
            workspace,
            state: Mutex::new(last_sequence),
            out,
            trace: Arc::new(trace),
            tap: Mutex::new(None),
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
        event_type: &str,
        severity: &str,
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
        // A closed channel means the process is going away; the frame has nowhere to go.
        let _ = self.out.send(Outbound::Frame {
            workspace: self.workspace.clone(),
            frame: Box::new(frame),
            trace: self.trace.clone(),
        });
        *seq
    }

    /// An `info` frame.
    pub fn info(
        &self,
        event_type: &str,
        message: impl Into<String>,
        payload: Map<String, Value>,
    ) -> u64 {
        self.emit(event_type, "info", message, payload)
    }

    /// How many frames were emitted so far.
    pub fn last_sequence(&self) -> u64 {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Builds a payload map from pairs.
#[macro_export]
macro_rules! payload {
    ($($key:expr => $value:expr),* $(,)?) => {{
        #[allow(unused_mut)]
        let mut map = serde_json::Map::new();
        $(map.insert($key.to_string(), serde_json::json!($value));)*
        map
    }};
}
