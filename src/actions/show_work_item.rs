//! `show_work_item`: one work item (`millrace queue show <id>`), parsed. The id is
//! `input.payload.work_item_id` (or `item_id`, `id`); without one, `invalid_input`.

use super::Context;
use crate::contract::OpsResult;
use crate::millrace::command::Inspect;

pub async fn run(cx: Context<'_>) -> OpsResult {
    match cx.required_id(&["work_item_id", "item_id", "id"], "work_item_id") {
        Ok(id) => {
            cx.runtime_payload(&Inspect::QueueShow(id), "inspect_only")
                .await
        }
        Err(refusal) => *refusal,
    }
}
