//! Frames and results on their way out. [`Progress`] (in `contract`) numbers a request's
//! frames; the engine turns them and the final result into [`Outbound`] messages that a
//! transport (NATS or in-process) delivers in order.

use std::sync::Arc;

use crate::contract::OpsResult;
pub use crate::contract::progress::{FrameOut, TraceContext};

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

/// A message for the transport to deliver.
#[derive(Debug)]
pub enum Outbound {
    /// One frame of one request.
    Frame(FrameOut),
    /// The final result, for every caller waiting on this request.
    Result {
        to: Vec<ReplyTo>,
        workspace: Option<String>,
        result: Arc<OpsResult>,
        trace: Arc<TraceContext>,
        /// The sequence of the request's last frame (its `request.finished`), `None` when
        /// this answer comes with no frames (a refusal, a stored result). Sent with the
        /// result so a caller reads frames up to it instead of guessing when they end.
        last_sequence: Option<u64>,
    },
}
