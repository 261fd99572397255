//! `queue_status`: the runtime's queue depths (`millrace queue ls`), parsed.

use super::Context;
use crate::contract::OpsResult;
use crate::millrace::command::Inspect;

pub async fn run(cx: Context<'_>) -> OpsResult {
    cx.runtime_payload(&Inspect::QueueList, "inspect_only")
        .await
}
