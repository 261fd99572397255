//! `millracer events --follow`: the live view of every workspace's frames, as Mission
//! Control sees them. One line per frame, or the frames themselves with `--json`.

use std::io::Write;

use futures::StreamExt;

use crate::cli::EventsArgs;
use crate::contract::OpsEventFrame;
use crate::subjects;
use crate::transport::nats::{self, Patience};

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    if !args.follow {
        anyhow::bail!("events needs --follow: frames are followed live as workers publish them");
    }
    let url = nats::url(&args.nats, None);
    let client = nats::connect(&args.nats, &url, "millracer-events", Patience::Retry).await?;
    let subject = match &args.request {
        Some(request_id) => subjects::frames_of_request(request_id),
        None => subjects::frames_of_workspace(args.workspace.as_deref()),
    };
    let mut frames = client.subscribe(subject.clone()).await?;
    client.flush().await?;
    tracing::info!(%subject, %url, "following frames");
    loop {
        let message = tokio::select! {
            message = frames.next() => message,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(message) = message else { break };
        let mut stdout = std::io::stdout().lock();
        let wrote = if args.json {
            stdout
                .write_all(&message.payload)
                .and_then(|()| stdout.write_all(b"\n"))
        } else {
            // The workspace is the subject's fifth token (`millracer.ops.v0_2.frames.<ws>.<req>`).
            let workspace = message.subject.split('.').nth(4).unwrap_or("?").to_string();
            match serde_json::from_slice::<OpsEventFrame>(&message.payload) {
                Ok(frame) => writeln!(stdout, "{}", render(&workspace, &frame)),
                Err(err) => writeln!(stdout, "{workspace}  (unreadable frame: {err})"),
            }
        };
        if wrote.and_then(|()| stdout.flush()).is_err() {
            // The reader went away (a closed pipe): stop quietly.
            break;
        }
    }
    Ok(())
}

/// `time  workspace  request  #seq  event_type  message`.
pub fn render(workspace: &str, frame: &OpsEventFrame) -> String {
    let time = frame
        .timestamp
        .get(11..19)
        .unwrap_or(frame.timestamp.as_str());
    format!(
        "{time}  {workspace:<12} {:<24} #{:<3} {:<26} {}",
        frame.request_id, frame.sequence, frame.event_type, frame.message
    )
}
