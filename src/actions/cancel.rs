//! `cancel`: stops a request by its request_id (`input.payload.request_id`).
//!
//! - A request **waiting in its workspace's lane** leaves the lane and gets its final
//!   result at once.
//! - A **running** request is told to stop: a delegated run kills the daemon it started
//!   (and with it the running stage), requeues the work item (`control clear-stale-state`)
//!   and cancels it in the runtime (`queue cancel`); a pi turn is stopped (pi's RPC
//!   `abort`, then its process is closed); a read or control command is dropped (its `millrace` child killed).
//!   `cancel` answers once the request has ended.
//! - A request **finished** before, or **unknown** here, is said to be so
//!   (`request_finished`, `request_not_found`).
//!
//! The cancelled request emits a `request.cancelled` frame, then `request.finished`, and
//! its final OpsResult is `status: failed` with the error code [`CANCELLED`]. Only
//! requests of the same workspace can be cancelled: the cancel resolves its workspace
//! like any workspace action, and a request of another workspace is not found.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::contract::vocab::ErrorCode;
use crate::contract::{OpsResult, Record};

/// The error code of a cancelled request's final result.
pub const CANCELLED: ErrorCode = ErrorCode::Cancelled;
/// `cancel` of a request that already ended.
pub const REQUEST_FINISHED: ErrorCode = ErrorCode::RequestFinished;
/// `cancel` of a request this process does not know (for this workspace).
pub const REQUEST_NOT_FOUND: ErrorCode = ErrorCode::RequestNotFound;

/// How long `cancel` waits for a running request to end before answering anyway.
const WAIT_FOR_END: Duration = Duration::from_secs(60);
/// How many finished request ids are remembered to say "finished" rather than "unknown".
const FINISHED_CAPACITY: usize = 10_000;

/// Takes a waiting request out of its lane and answers it as cancelled. Returns `false`
/// when the request had already left the lane to run.
pub type Withdraw = Box<dyn FnOnce(&str) -> bool + Send>;

struct Active {
    serial: u64,
    root: Option<PathBuf>,
    token: CancellationToken,
    done: CancellationToken,
    withdraw: Option<Withdraw>,
}

#[derive(Debug, Clone)]
struct Finished {
    status: String,
    code: Option<String>,
}

#[derive(Default)]
struct Inner {
    active: HashMap<String, Vec<Active>>,
    finished: HashMap<(Option<PathBuf>, String), Finished>,
    order: VecDeque<(Option<PathBuf>, String)>,
    /// Why each cancelled request was cancelled, until it ends.
    reasons: HashMap<u64, String>,
}

/// What another worker (or the results store) said about a request this one does not hold.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteAnswer {
    /// `waiting`, `running` (it was stopped), `finished`, or `orphaned` (its worker is
    /// gone: marked cancelled so the worker taking it over stops it instead of resuming).
    pub state: String,
    #[serde(default)]
    pub target_status: Option<String>,
    #[serde(default)]
    pub target_error: Option<String>,
}

/// Cancels on the other workers of a bus; set by a worker (the bus layer implements it).
pub trait Remote: Send + Sync {
    /// Asks whoever holds `request_id` of `workspace_id` to stop it; `None`: nobody does.
    fn cancel<'a>(
        &'a self,
        workspace_id: Option<&'a str>,
        request_id: &'a str,
        reason: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<RemoteAnswer>> + Send + 'a>>;
}

/// Every request of a process that can still be cancelled, and the recently finished.
#[derive(Default)]
pub struct Cancels {
    inner: Mutex<Inner>,
    serial: AtomicU64,
    remote: OnceLock<Arc<dyn Remote>>,
}

impl std::fmt::Debug for Cancels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancels").finish_non_exhaustive()
    }
}

/// One admitted request's handle: its cancellation token and its registry entry.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub request_id: String,
    serial: u64,
    pub token: CancellationToken,
    done: CancellationToken,
}

impl Ticket {
    /// A ticket nobody can cancel (requests outside an engine).
    pub fn detached(request_id: &str) -> Self {
        Self {
            request_id: request_id.to_string(),
            serial: 0,
            token: CancellationToken::new(),
            done: CancellationToken::new(),
        }
    }
}

/// What a cancel found.
#[derive(Debug)]
pub enum Found {
    /// Taken out of its lane and answered.
    Withdrawn,
    /// Told to stop; `done` fires when it has ended.
    Running(CancellationToken),
    Finished {
        status: String,
        code: Option<String>,
    },
    Unknown,
}

impl Cancels {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an admitted request of the workspace at `root`. `withdraw` is set for a
    /// request that waits in a lane.
    pub fn register(
        &self,
        request_id: &str,
        root: Option<&Path>,
        withdraw: Option<Withdraw>,
    ) -> Ticket {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let ticket = Ticket {
            request_id: request_id.to_string(),
            serial,
            token: CancellationToken::new(),
            done: CancellationToken::new(),
        };
        self.lock()
            .active
            .entry(request_id.to_string())
            .or_default()
            .push(Active {
                serial,
                root: root.map(Path::to_path_buf),
                token: ticket.token.clone(),
                done: ticket.done.clone(),
                withdraw,
            });
        ticket
    }

    /// Lets this process's cancels reach requests other workers hold.
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        let _ = self.remote.set(remote);
    }

    /// Cancels a just registered request before it runs (it was cancelled elsewhere).
    pub fn mark(&self, ticket: &Ticket, reason: &str) {
        self.lock()
            .reasons
            .insert(ticket.serial, reason.to_string());
        ticket.token.cancel();
    }

    /// Cancels a request held here and waits (bounded) for it to end: what a worker says
    /// to another worker's `cancel`. `None` when this process does not hold it.
    pub async fn cancel_and_wait(
        &self,
        request_id: &str,
        root: Option<&Path>,
        reason: &str,
        on_found: impl FnOnce(&str),
    ) -> Option<RemoteAnswer> {
        let state = match self.cancel(request_id, root, reason) {
            Found::Withdrawn => "waiting",
            Found::Running(done) => {
                on_found("running");
                if tokio::time::timeout(WAIT_FOR_END, done.cancelled())
                    .await
                    .is_err()
                {
                    return Some(RemoteAnswer {
                        state: "stopping".into(),
                        target_status: None,
                        target_error: None,
                    });
                }
                "running"
            }
            Found::Finished { .. } | Found::Unknown => return None,
        };
        let (target_status, target_error) = match self.cancel(request_id, root, reason) {
            Found::Finished { status, code } => (Some(status), code),
            _ => (None, None),
        };
        Some(RemoteAnswer {
            state: state.into(),
            target_status,
            target_error,
        })
    }

    /// The request left its lane to run: it can no longer be withdrawn.
    pub fn started(&self, ticket: &Ticket) {
        let withdraw = self.with_active(ticket, |a| a.withdraw.take()).flatten();
        drop(withdraw);
    }

    /// The reason given when the request was cancelled, if it was.
    pub fn reason(&self, ticket: &Ticket) -> Option<String> {
        self.lock().reasons.get(&ticket.serial).cloned()
    }

    /// The request ended with `status` (and its first error code).
    pub fn finish(&self, ticket: &Ticket, status: &str, code: Option<&str>) {
        let mut inner = self.lock();
        let mut root = None;
        if let Some(list) = inner.active.get_mut(&ticket.request_id) {
            if let Some(i) = list.iter().position(|a| a.serial == ticket.serial) {
                root = list.remove(i).root;
            }
            if list.is_empty() {
                inner.active.remove(&ticket.request_id);
            }
        }
        inner.reasons.remove(&ticket.serial);
        let key = (root, ticket.request_id.clone());
        inner.finished.insert(
            key.clone(),
            Finished {
                status: status.to_string(),
                code: code.map(str::to_string),
            },
        );
        inner.order.push_back(key);
        while inner.order.len() > FINISHED_CAPACITY {
            if let Some(old) = inner.order.pop_front() {
                inner.finished.remove(&old);
            }
        }
        drop(inner);
        ticket.done.cancel();
    }

    /// Cancels the request `request_id` of the workspace at `root`.
    pub fn cancel(&self, request_id: &str, root: Option<&Path>, reason: &str) -> Found {
        let mut inner = self.lock();
        let entry = inner.active.get_mut(request_id).and_then(|list| {
            list.iter_mut()
                .find(|a| a.root.as_deref() == root && !a.token.is_cancelled())
        });
        if let Some(active) = entry {
            let serial = active.serial;
            active.token.cancel();
            let withdraw = active.withdraw.take();
            let done = active.done.clone();
            inner.reasons.insert(serial, reason.to_string());
            drop(inner);
            // Outside the lock: withdrawing answers the request, which finishes it here.
            if let Some(withdraw) = withdraw
                && withdraw(reason)
            {
                return Found::Withdrawn;
            }
            return Found::Running(done);
        }
        let key = (root.map(Path::to_path_buf), request_id.to_string());
        match inner.finished.get(&key) {
            Some(f) => Found::Finished {
                status: f.status.clone(),
                code: f.code.clone(),
            },
            None => Found::Unknown,
        }
    }

    /// Whether the request `request_id` of `root` runs or waits here.
    pub fn is_active(&self, request_id: &str, root: Option<&Path>) -> bool {
        self.lock()
            .active
            .get(request_id)
            .is_some_and(|l| l.iter().any(|a| a.root.as_deref() == root))
    }

    fn with_active<T>(&self, ticket: &Ticket, f: impl FnOnce(&mut Active) -> T) -> Option<T> {
        let mut inner = self.lock();
        inner
            .active
            .get_mut(&ticket.request_id)?
            .iter_mut()
            .find(|a| a.serial == ticket.serial)
            .map(f)
    }
}

/// The final result of a cancelled request.
pub fn cancelled_record(reason: &str) -> Record {
    Record::error(CANCELLED, format!("The request was cancelled: {reason}."))
        .suggest("Send the request again (with a new request_id) if it is still wanted.")
}

/// The reason of a cancel request (`input.payload.reason`).
fn reason(cx: &Context<'_>) -> String {
    let by = &cx.request.request_id;
    match cx.request.payload_string("reason") {
        Some(reason) if reason.len() <= 500 && !reason.chars().any(char::is_control) => {
            format!("{reason} (cancel request {by})")
        }
        _ => format!("cancelled by request {by}"),
    }
}

pub async fn run(cx: Context<'_>) -> OpsResult {
    let target = match cx.required_id(&["request_id"], "request_id") {
        Ok(id) => id,
        Err(refusal) => return *refusal,
    };
    let root = cx.resolution.root.as_deref();
    let reason = reason(&cx);
    let found = cx.service.cancels.cancel(&target, root, &reason);
    let mut body = Map::new();
    body.insert("request_id".into(), json!(target));
    let was = match found {
        Found::Withdrawn => "waiting",
        Found::Running(done) => {
            if tokio::time::timeout(WAIT_FOR_END, done.cancelled())
                .await
                .is_err()
            {
                body.insert(ErrorCode::Cancelled.as_str().into(), json!(false));
                body.insert("state".into(), json!("stopping"));
                let mut out = cx.failure(Record::error(
                    ErrorCode::CancelPending,
                    format!(
                        "Request {target} was told to stop but has not ended within {}s.",
                        WAIT_FOR_END.as_secs()
                    ),
                ));
                out.result = body;
                return out;
            }
            "running"
        }
        Found::Finished { status, code } => {
            body.insert(ErrorCode::Cancelled.as_str().into(), json!(false));
            body.insert("state".into(), json!("finished"));
            body.insert("target_status".into(), json!(status));
            let mut out = cx.failure(
                Record::error(
                    REQUEST_FINISHED,
                    format!("Request {target} already finished ({status}); nothing to cancel."),
                )
                .suggest("Ask for its result again by sending the same request (same request_id)."),
            );
            if let Some(code) = code {
                body.insert("target_error".into(), json!(code));
            }
            out.result = body;
            return out;
        }
        Found::Unknown if cx.service.cancels.remote.get().is_some() => {
            let remote = cx.service.cancels.remote.get().cloned();
            let workspace = root
                .and_then(|r| cx.service.registry.by_root(r))
                .map(|r| r.id.clone());
            let answer = match remote {
                Some(remote) => remote.cancel(workspace.as_deref(), &target, &reason).await,
                None => None,
            };
            return remote_result(&cx, &target, &reason, answer);
        }
        Found::Unknown => {
            body.insert(ErrorCode::Cancelled.as_str().into(), json!(false));
            body.insert("state".into(), json!("unknown"));
            let mut out = cx.failure(
                Record::error(
                    REQUEST_NOT_FOUND,
                    format!("No request {target} runs or waits for this workspace here."),
                )
                .suggest("Check the request_id and the workspace; a request that finished long ago is forgotten."),
            );
            out.result = body;
            return out;
        }
    };
    // A running request may have finished on its own just before it could stop.
    let ended = cx.service.cancels.cancel(&target, root, &reason);
    let (status, code) = match ended {
        Found::Finished { status, code } => (status, code),
        _ => ("failed".to_string(), Some(CANCELLED.to_string())),
    };
    let cancelled = code.as_deref() == Some(CANCELLED.as_str());
    body.insert(ErrorCode::Cancelled.as_str().into(), json!(cancelled));
    body.insert("state".into(), json!(was));
    body.insert("target_status".into(), json!(status));
    body.insert("target_error".into(), code.map_or(Value::Null, Value::from));
    body.insert("reason".into(), json!(reason));
    if !cancelled {
        let mut out = cx.failure(Record::error(
            REQUEST_FINISHED,
            format!("Request {target} finished ({status}) before it could be stopped."),
        ));
        out.result = body;
        return out;
    }
    cx.resolved_success(body, "runtime_control")
}

/// The `cancel` answer from what another worker or the results store said.
fn remote_result(
    cx: &Context<'_>,
    target: &str,
    reason: &str,
    answer: Option<RemoteAnswer>,
) -> OpsResult {
    let mut body = Map::new();
    body.insert("request_id".into(), json!(target));
    let Some(answer) = answer else {
        body.insert(ErrorCode::Cancelled.as_str().into(), json!(false));
        body.insert("state".into(), json!("unknown"));
        let mut out = cx.failure(
            Record::error(
                REQUEST_NOT_FOUND,
                format!("No worker runs request {target} for this workspace, and no record of it is stored."),
            )
            .suggest("Check the request_id and the workspace; a request that finished long ago is forgotten."),
        );
        out.result = body;
        return out;
    };
    let cancelled = match answer.state.as_str() {
        "orphaned" => true,
        "waiting" | "running" => answer.target_error.as_deref() == Some(CANCELLED.as_str()),
        _ => false,
    };
    body.insert(ErrorCode::Cancelled.as_str().into(), json!(cancelled));
    body.insert("state".into(), json!(answer.state));
    if let Some(status) = &answer.target_status {
        body.insert("target_status".into(), json!(status));
    }
    if let Some(code) = &answer.target_error {
        body.insert("target_error".into(), json!(code));
    }
    body.insert("reason".into(), json!(reason));
    if cancelled {
        return cx.resolved_success(body, "runtime_control");
    }
    let message = match answer.state.as_str() {
        "stopping" => format!(
            "Request {target} was told to stop but has not ended within {}s.",
            WAIT_FOR_END.as_secs()
        ),
        _ => format!(
            "Request {target} already finished ({}); nothing to cancel.",
            answer.target_status.as_deref().unwrap_or("unknown status")
        ),
    };
    let code = if answer.state == "stopping" {
        ErrorCode::CancelPending
    } else {
        REQUEST_FINISHED
    };
    let mut out = cx.failure(Record::error(code, message));
    out.result = body;
    out
}
