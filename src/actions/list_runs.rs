//! `list_runs`: the runtime's runs (`millrace runs ls`), parsed.

use super::Context;
use crate::contract::OpsResult;
use crate::millrace::command::Inspect;

pub async fn run(cx: Context<'_>) -> OpsResult {
    cx.runtime_payload(&Inspect::RunsList, "inspect_only").await
}
