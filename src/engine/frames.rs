//! Frames and results on their way out. [`Progress`] (in `contract`) numbers a request's
//! frames; the engine turns them and the final result into [`Outbound`] messages that a
//! transport (NATS or in-process) delivers in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::contract::OpsResult;
pub use crate::contract::progress::{FrameOut, TraceContext};

/// Where a result goes, as the transport that received the request knows it. One closed
/// set, so the publisher matches instead of guessing: a core reply is published, a
/// durable one is stored and then acked (never the other way round), a local one is read
/// off the engine's queue by the in-process caller.
#[derive(Debug)]
pub enum ReplyTo {
    /// A core NATS request/reply (or a publish without a reply subject).
    Core(CoreReply),
    /// A JetStream request: the transport stores its result and settles the message.
    Durable(Box<dyn DurableReply>),
    /// An in-process call (`ops --transport local`, `run`): nothing to publish.
    Local,
}

/// A core request: where to answer, which micro endpoint counts it, when it arrived.
#[derive(Debug)]
pub struct CoreReply {
    /// The NATS reply subject; `None` for a request published without one.
    pub subject: Option<String>,
    /// The micro endpoint (`$SRV.STATS`) the request came in on.
    pub endpoint: usize,
    pub received: Instant,
    /// The workspace the endpoint's subject binds (`None`: `req.any`): the result is kept
    /// under this scope's result key.
    pub scope: Option<String>,
}

/// A durable request's settlement, implemented by the transport (the engine stays free of
/// JetStream): the result is stored first, then the message acked (or terminated for
/// invalid input), so a worker that dies in between leaves a redelivery, not a loss.
pub trait DurableReply: Send + std::fmt::Debug {
    /// The micro endpoint counting this request and how long it took so far.
    fn stats(&self) -> Option<(usize, Duration)>;
    /// Stores `result` (with the sequence of the request's last frame) and settles.
    fn settle(self: Box<Self>, result: Arc<OpsResult>, last_sequence: Option<u64>);
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
