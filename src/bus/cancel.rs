//! `cancel` across workers. A request may run on another worker than the one a `cancel`
//! reaches (the queue group spreads requests; a durable request's owner may be anyone).
//!
//! - The worker that got the `cancel` and does not hold the request asks every worker on
//!   [`subjects::cancel`] (no queue group). The one holding it answers twice on the reply
//!   inbox: at once that it holds it, then when the request has ended.
//! - Nobody answers within [`HOLDER_PATIENCE`]: the results bucket decides. A request
//!   recorded `running` (its worker is gone) is marked cancelled by compare-and-swap, so
//!   the worker that takes it over stops it instead of resuming it; a request with no
//!   record yet (still waiting in the jobs stream) gets a stored cancelled result, so no
//!   worker ever runs it and its caller is answered at once; a finished one says so.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::actions::cancel::{self, Remote, RemoteAnswer};
use crate::bus::durable::JobRecord;
use crate::bus::subjects;
use crate::contract::{OpsResult, WorkspaceRef, time};
use crate::engine::service::Engine;

/// How long the holder of a request has to say it holds it.
pub const HOLDER_PATIENCE: Duration = Duration::from_millis(1000);
/// How long a holder may take to stop the request.
const END_PATIENCE: Duration = Duration::from_secs(70);

/// What a `cancel` sends to the other workers.
#[derive(Debug, Serialize, Deserialize)]
struct Ask {
    request_id: String,
    workspace_id: Option<String>,
    reason: String,
}

/// [`Remote`] over NATS and the results bucket.
pub struct BusCancel {
    pub client: async_nats::Client,
    pub kv: Option<kv::Store>,
    pub owner: String,
}

impl Remote for BusCancel {
    fn cancel<'a>(
        &'a self,
        workspace_id: Option<&'a str>,
        request_id: &'a str,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<RemoteAnswer>> + Send + 'a>> {
        Box::pin(async move {
            if let Some(answer) = self.ask_holders(workspace_id, request_id, reason).await {
                return Some(answer);
            }
            match &self.kv {
                Some(kv) => self.mark_stored(kv, workspace_id, request_id, reason).await,
                None => None,
            }
        })
    }
}

impl BusCancel {
    async fn ask_holders(
        &self,
        workspace_id: Option<&str>,
        request_id: &str,
        reason: &str,
    ) -> Option<RemoteAnswer> {
        let inbox = self.client.new_inbox();
        let mut replies = self.client.subscribe(inbox.clone()).await.ok()?;
        let ask = Ask {
            request_id: request_id.to_string(),
            workspace_id: workspace_id.map(str::to_string),
            reason: reason.to_string(),
        };
        let body = serde_json::to_vec(&ask).ok()?;
        self.client
            .publish_with_reply(
                subjects::cancel(workspace_id, request_id),
                inbox,
                Bytes::from(body),
            )
            .await
            .ok()?;
        let first = tokio::time::timeout(HOLDER_PATIENCE, replies.next())
            .await
            .ok()??;
        let first: RemoteAnswer = serde_json::from_slice(&first.payload).ok()?;
        if first.state != "running" || first.target_status.is_some() {
            return Some(first);
        }
        // Held and being stopped: the second message says how it ended.
        match tokio::time::timeout(END_PATIENCE, replies.next()).await {
            Ok(Some(end)) => serde_json::from_slice(&end.payload).ok().or(Some(first)),
            _ => Some(RemoteAnswer {
                state: "stopping".into(),
                target_status: None,
                target_error: None,
            }),
        }
    }

    async fn mark_stored(
        &self,
        kv: &kv::Store,
        workspace_id: Option<&str>,
        request_id: &str,
        reason: &str,
    ) -> Option<RemoteAnswer> {
        let key = subjects::result_key(workspace_id, request_id);
        for _ in 0..3 {
            let entry = kv.entry(&key).await.ok()?;
            let entry = entry.filter(|e| e.operation == kv::Operation::Put);
            let Some(entry) = entry else {
                // Not started anywhere: a stored cancelled result answers its caller and
                // keeps any worker from running it.
                let record = self.cancelled_record(workspace_id, request_id, reason);
                let body = Bytes::from(serde_json::to_vec(&record).ok()?);
                return match kv.create(&key, body).await {
                    Ok(_) => None,
                    // Claimed meanwhile: look again.
                    Err(_) => continue,
                };
            };
            let mut record: JobRecord = serde_json::from_slice(&entry.value).ok()?;
            if record.is_done() {
                let result = record.result();
                return Some(RemoteAnswer {
                    state: "finished".into(),
                    target_status: result.as_ref().map(|r| r.status.as_str().to_string()),
                    target_error: result.and_then(|r| r.errors.first().map(|e| e.code.clone())),
                });
            }
            record.cancelled = Some(reason.to_string());
            record.updated_at = time::now();
            let body = Bytes::from(serde_json::to_vec(&record).ok()?);
            if kv.update(&key, body, entry.revision).await.is_ok() {
                return Some(RemoteAnswer {
                    state: "orphaned".into(),
                    target_status: None,
                    target_error: None,
                });
            }
        }
        None
    }

    fn cancelled_record(
        &self,
        workspace_id: Option<&str>,
        request_id: &str,
        reason: &str,
    ) -> JobRecord {
        let now = time::now();
        let mut result = OpsResult::failure(
            request_id,
            "",
            WorkspaceRef {
                workspace_id: workspace_id.map(str::to_string),
                ..WorkspaceRef::default()
            },
            now.clone(),
            cancel::cancelled_record(reason),
        );
        result.errors[0].message =
            format!("The request was cancelled before any worker started it: {reason}.");
        JobRecord {
            state: "done".into(),
            owner: self.owner.clone(),
            workspace: workspace_id.map(str::to_string),
            work_item: None,
            intake: None,
            daemon_pid: None,
            last_sequence: None,
            result: serde_json::from_str(&result.to_json_line()).ok(),
            updated_at: now,
            cancelled: Some(reason.to_string()),
        }
    }
}

/// Answers other workers' cancels for the requests this worker holds: one subscription per
/// served workspace (and the workspace-less scope), no queue group.
pub async fn serve(
    client: async_nats::Client,
    engine: Arc<Engine>,
    workspaces: Vec<(Option<String>, Option<PathBuf>)>,
    stop: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    for (workspace, root) in workspaces {
        let subject = subjects::cancels_of_workspace(workspace.as_deref());
        let mut sub = match client.subscribe(subject.clone()).await {
            Ok(sub) => sub,
            Err(err) => {
                tracing::warn!(%err, subject, "cannot hear cancels from other workers");
                continue;
            }
        };
        let client = client.clone();
        let engine = engine.clone();
        let stop = stop.clone();
        tracker.spawn(async move {
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => break,
                    message = sub.next() => match message { Some(m) => m, None => break },
                };
                let Ok(ask) = serde_json::from_slice::<Ask>(&message.payload) else {
                    continue;
                };
                // The subject binds the workspace and the request: a body naming another is
                // ignored, so permission to publish one workspace's cancels is all it takes.
                if ask.workspace_id != workspace
                    || subjects::cancel(workspace.as_deref(), &ask.request_id)
                        != message.subject.as_str()
                {
                    continue;
                }
                let Some(reply) = message.reply.clone() else {
                    continue;
                };
                let client = client.clone();
                let engine = engine.clone();
                let root = root.clone();
                tokio::spawn(async move {
                    let said = client.clone();
                    let said_reply = reply.clone();
                    let answer = engine
                        .service()
                        .cancels
                        .cancel_and_wait(&ask.request_id, root.as_deref(), &ask.reason, |state| {
                            let held = RemoteAnswer {
                                state: state.into(),
                                target_status: None,
                                target_error: None,
                            };
                            if let Ok(body) = serde_json::to_vec(&held) {
                                tokio::spawn(async move {
                                    let _ = said.publish(said_reply, Bytes::from(body)).await;
                                });
                            }
                        })
                        .await;
                    if let Some(answer) = answer
                        && let Ok(body) = serde_json::to_vec(&answer)
                    {
                        let _ = client.publish(reply, Bytes::from(body)).await;
                        let _ = client.flush().await;
                    }
                });
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}
