//! `millracer events --follow`: the live view of every workspace's frames, as Mission
//! Control sees them. One line per frame, or the frames themselves with `--json`.

use std::io::Write;

use futures::StreamExt;

use crate::app::cli::EventsArgs;
use crate::bus::nats;
use crate::bus::subjects;
use crate::contract::OpsEventFrame;

pub async fn run(args: EventsArgs) -> anyhow::Result<()> {
    if !args.follow && !args.replay {
        anyhow::bail!(
            "events needs --follow (live frames) or --replay (stored frames; with --follow, then live)"
        );
    }
    let url = nats::url(&args.nats.credentials(), None);
    // Says on stderr while the broker cannot be reached (with the cause), never silent.
    let client =
        nats::connect_patiently(&args.nats.credentials(), &url, "millracer-events").await?;
    // With both, the exact subject: what a role scoped to that workspace may read.
    let subject = match (&args.request, &args.workspace) {
        (Some(request_id), Some(ws)) => subjects::frames(Some(ws), request_id),
        (Some(request_id), None) => subjects::frames_of_request(request_id),
        (None, ws) => subjects::frames_of_workspace(ws.as_deref()),
    };
    if args.replay {
        return replay(&args, &client, &subject).await;
    }
    let mut frames = client.subscribe(subject.clone()).await?;
    client.flush().await?;
    tracing::info!(%subject, %url, "following frames");
    loop {
        let message = tokio::select! {
            message = frames.next() => message,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(message) = message else { break };
        if !print(&args, &message.subject, &message.payload) {
            break;
        }
    }
    Ok(())
}

/// The stored frames in stream order (an ordered consumer), then, with `--follow`, the
/// ones that come after; without it, stops once nothing new came for a second.
async fn replay(
    args: &EventsArgs,
    client: &async_nats::Client,
    subject: &str,
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(subjects::FRAMES_STREAM).await.map_err(|e| {
        anyhow::anyhow!("no frames stream to replay ({e}); is a worker with JetStream running?")
    })?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            // Named, so its filter is part of the create subject (see docs/permissions.md).
            name: Some(subjects::replay_consumer()),
            filter_subject: subject.to_string(),
            ..Default::default()
        })
        .await?;
    let mut frames = consumer.messages().await?;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(std::time::Duration::from_secs(1), frames.next()) => next,
            _ = tokio::signal::ctrl_c() => break,
        };
        let message = match next {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(err))) => {
                tracing::debug!(%err, "replay interrupted");
                continue;
            }
            Ok(None) => break,
            Err(_) if args.follow => continue,
            Err(_) => break,
        };
        if !print(args, &message.subject, &message.payload) {
            break;
        }
    }
    Ok(())
}

/// Prints one frame; false when stdout went away.
fn print(args: &EventsArgs, subject: &str, payload: &[u8]) -> bool {
    {
        let mut stdout = std::io::stdout().lock();
        let wrote = if args.json {
            stdout
                .write_all(payload)
                .and_then(|()| stdout.write_all(b"\n"))
        } else {
            // The workspace is the subject's fifth token (`millracer.ops.v0_2.frames.<ws>.<req>`).
            let workspace = subject.split('.').nth(4).unwrap_or("?").to_string();
            match serde_json::from_slice::<OpsEventFrame>(payload) {
                Ok(frame) => writeln!(stdout, "{}", render(&workspace, &frame)),
                Err(err) => writeln!(stdout, "{workspace}  (unreadable frame: {err})"),
            }
        };
        // The reader went away (a closed pipe): stop quietly.
        wrote.and_then(|()| stdout.flush()).is_ok()
    }
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
