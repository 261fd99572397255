//! Any action this version does not know: a machine-readable refusal, never a fallback
//! to something else.

use super::Context;
use crate::contract::vocab::ErrorCode;
use crate::contract::{OpsResult, Record};

pub fn run(cx: Context<'_>) -> OpsResult {
    cx.failure(
        Record::error(
            ErrorCode::UnsupportedAction,
            format!("Unsupported Millracer ops action: {}", cx.request.action),
        )
        .suggest("Use status or enqueue in this Millracer version."),
    )
}
