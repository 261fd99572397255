//! `resume`: `millrace control resume`, in the workspace's lane (route
//! `runtime_control`), with an optional `input.payload.reason`; recorded in a
//! `runtime.resumed` frame, and millracer's pause record is removed.

use super::Context;
use crate::contract::OpsResult;

pub async fn run(cx: Context<'_>) -> OpsResult {
    super::pause::control(cx, false).await
}
