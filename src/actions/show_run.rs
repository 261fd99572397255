//! `show_run`: one run (`millrace runs show <id>`), parsed. The id is
//! `input.payload.run_id` (or `id`); without one, `invalid_input`.

use super::Context;
use crate::contract::OpsResult;
use crate::millrace::command::Inspect;

pub async fn run(cx: Context<'_>) -> OpsResult {
    match cx.required_id(&["run_id", "id"], "run_id") {
        Ok(id) => {
            cx.runtime_payload(&Inspect::RunsShow(id), "inspect_only")
                .await
        }
        Err(refusal) => *refusal,
    }
}
