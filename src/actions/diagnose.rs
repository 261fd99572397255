//! `diagnose`: the runtime's own checks (`millrace doctor`), parsed.

use super::Context;
use crate::contract::OpsResult;
use crate::millrace::command::Inspect;

pub async fn run(cx: Context<'_>) -> OpsResult {
    cx.runtime_payload(&Inspect::Doctor, "inspect_only").await
}
