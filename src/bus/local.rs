//! In-process transport: the same engine and dispatch as a worker, driven once, for
//! `ops --transport local` and the `auto` fallback.

use std::sync::Arc;

use crate::actions::dispatch::Service;
use crate::contract::{OpsEventFrame, OpsResult};
use crate::engine::frames::Outbound;
use crate::engine::service::{Engine, EngineOptions};

/// Runs one raw request in-process, calling `on_frame` for each frame in order, and
/// returns its result.
pub async fn run_once(
    service: Service,
    raw: &[u8],
    mut on_frame: impl FnMut(&OpsEventFrame),
) -> Option<OpsResult> {
    let options = EngineOptions {
        // In-process there is no bus limit to protect.
        max_request_bytes: usize::MAX,
        ..EngineOptions::default()
    };
    let (engine, mut rx) = Engine::new(Arc::new(service), options);
    engine.submit(
        raw,
        Some(crate::engine::frames::ReplyTo::Local),
        &tracing::Span::current(),
    );
    let mut result = None;
    while let Some(message) = rx.recv().await {
        match message {
            Outbound::Frame(out) => on_frame(&out.frame),
            Outbound::Result { result: r, .. } => {
                result = Some(Arc::unwrap_or_clone(r));
                break;
            }
        }
    }
    engine.shutdown().await;
    result
}
