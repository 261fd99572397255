//! Durable intake on JetStream: requests wait in the `MILLRACER_JOBS` work queue until a
//! worker serving their workspace takes them; each request's state and final OpsResult are
//! kept by request_id in the `MILLRACER_RESULTS` bucket; frames are kept in
//! `MILLRACER_FRAMES` for replay.
//!
//! Why each piece:
//! - a work-queue stream with `Nats-Msg-Id` = request_id drops a request published twice
//!   inside the duplicate window;
//! - the KV record is the idempotency key beyond that window and across workers: `create`
//!   claims a request once, a finished record is answered without running again, and a record
//!   left `running` by a worker that is gone is taken over by compare-and-swap, with the work
//!   item it had queued, so a delegated item is never queued twice;
//! - acks come after the result is stored (a crash in between redelivers, and the stored
//!   result then answers); progress acks keep an hours-long run from being redelivered;
//!   invalid input is answered and then terminated, never retried.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, pull},
    kv,
    stream::{DiscardPolicy, RetentionPolicy, StorageType},
};
use backon::Retryable;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actions::binding::Bound;
use crate::bus::subjects::{self, JobClass};
use crate::bus::trace;
use crate::contract::progress::{Checkpoint, Milestone, WorkItem};
use crate::contract::{OpsEventFrame, OpsResult, parse_request, request::salvage_ids, time};
use crate::engine::frames::{DurableReply, ReplyTo};
use crate::engine::service::{Engine, SubmitHints};
use crate::millrace::delegation::{Resume, WorkItemRef};

/// How long a delivered request may go without an ack or progress ack before JetStream
/// hands it to another worker.
/// The default; `--ack-wait-seconds` sets it for the consumers a worker creates.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// Deliveries of one request at most (a request that crashes every worker stops somewhere).
pub const MAX_DELIVER: i64 = 5;
/// A request published twice within this window is stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long frames are kept for replay.
pub const FRAMES_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// At most this many bytes of frames are kept (the oldest go first).
pub const FRAMES_MAX_BYTES: i64 = 1 << 30;
/// At most this many requests wait on one jobs subject (one workspace and class, or
/// `jobs.any`); a request beyond it is refused at publish (the caller is told), never
/// silently dropped. With the bridge refusing unserved workspaces by default, only
/// explicit waiters (`--wait-for-worker`) and adapters that skip the registry queue there.
pub const JOBS_MAX_PER_SUBJECT: i64 = 10_000;

/// Why the durable parts could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("cannot set up JetStream {what}: {message}")]
    Setup { what: String, message: String },
    #[error(
        "the JetStream consumer {name} exists with other filters ({found:?}, expected {expected:?}): another worker serves a workspace with this id at another path; delete the consumer or rename the workspace"
    )]
    ConsumerDrift {
        name: String,
        found: Vec<String>,
        expected: Vec<String>,
    },
    #[error(
        "the JetStream consumer {name} (filters {filters:?}) overlaps another worker's consumer on {stream}: another worker serves this workspace id or path under another identity; stop it or rename the workspace (a consumer left by a worker that is gone: nats consumer rm {stream} <name>)"
    )]
    ConsumerOverlap {
        name: String,
        filters: Vec<String>,
        stream: String,
    },
}

impl DurableError {
    /// A collision of workspace identities (the worker refuses to start), rather than a
    /// broker that cannot do JetStream.
    pub fn is_collision(&self) -> bool {
        matches!(
            self,
            Self::ConsumerDrift { .. } | Self::ConsumerOverlap { .. }
        )
    }
}

fn setup(what: impl Into<String>) -> impl FnOnce(String) -> DurableError {
    let what = what.into();
    move |message| DurableError::Setup { what, message }
}

/// The stored state of one request, by request_id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    /// `running` or `done`.
    pub state: String,
    /// The worker (its service id) that runs or ran it.
    pub owner: String,
    pub workspace: Option<String>,
    pub work_item: Option<WorkItemRef>,
    /// The intake document the run wrote and is about to queue, stored before
    /// `queue add`: a worker taking over a record with `intake` and no `work_item` looks
    /// for that id in the runtime before queuing it (it may have been queued just before
    /// the previous owner died).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intake: Option<WorkItemRef>,
    pub daemon_pid: Option<u32>,
    /// The final OpsResult, once done.
    pub result: Option<Value>,
    /// The sequence of the request's last frame, once done (absent: no frames to wait
    /// for). A caller replaying frames reads up to this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sequence: Option<u64>,
    pub updated_at: String,
    /// Set by a `cancel` that found no live worker holding the request (its owner is gone,
    /// or it still waits in the jobs stream): the reason. A worker taking the request over
    /// then stops what its owner started instead of resuming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<String>,
}

impl JobRecord {
    pub fn is_done(&self) -> bool {
        self.state == "done"
    }

    /// The stored result as the worker sent it.
    pub fn result(&self) -> Option<OpsResult> {
        self.result
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }
}

/// How many copies of the streams and the bucket a cluster keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Replicas {
    /// The replicas asked for (`--stream-replicas`); `None`: 1 for what is created, and
    /// what exists is left as it is.
    pub wanted: Option<usize>,
}

impl Replicas {
    fn for_new(self) -> usize {
        self.wanted.unwrap_or(1).max(1)
    }
}

/// Creates (or finds) the streams and the bucket. Idempotent; a stream that exists keeps
/// its configuration (an operator may have tuned it), except its replicas when
/// `replicas.wanted` differs: then the stream is scaled (a clustered server allows it), or
/// the log says how to do it by hand.
pub async fn ensure(
    js: &jetstream::Context,
    retention: Duration,
    replicas: Replicas,
) -> Result<kv::Store, DurableError> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: subjects::JOBS_STREAM.to_string(),
        description: Some("millracer durable requests (work queue)".to_string()),
        subjects: vec![subjects::jobs_all()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        max_age: retention,
        max_messages_per_subject: JOBS_MAX_PER_SUBJECT,
        discard: DiscardPolicy::New,
        discard_new_per_subject: true,
        num_replicas: replicas.for_new(),
        ..Default::default()
    })
    .await
    .map_err(|e| setup(subjects::JOBS_STREAM)(e.to_string()))?;
    js.get_or_create_stream(jetstream::stream::Config {
        name: subjects::FRAMES_STREAM.to_string(),
        description: Some("millracer event frames, kept for replay".to_string()),
        subjects: vec![subjects::frames_of_workspace(None)],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: FRAMES_MAX_AGE,
        max_bytes: FRAMES_MAX_BYTES,
        discard: DiscardPolicy::Old,
        num_replicas: replicas.for_new(),
        ..Default::default()
    })
    .await
    .map_err(|e| setup(subjects::FRAMES_STREAM)(e.to_string()))?;
    let kv = results_bucket(js, retention, replicas).await?;
    if let Some(wanted) = replicas.wanted {
        for stream in [
            subjects::JOBS_STREAM.to_string(),
            subjects::FRAMES_STREAM.to_string(),
            format!("KV_{}", subjects::RESULTS_BUCKET),
        ] {
            scale(js, &stream, wanted).await;
        }
    }
    Ok(kv)
}

/// Moves an existing stream to `wanted` replicas (R1 to R3 after a broker became a
/// cluster). The server refuses when it cannot (a single server, too few peers): then the
/// worker goes on with what there is and the log says how to do it later.
async fn scale(js: &jetstream::Context, name: &str, wanted: usize) {
    let wanted = wanted.max(1);
    let mut stream = match js.get_stream(name).await {
        Ok(stream) => stream,
        Err(err) => {
            tracing::warn!(%err, stream = name, "cannot read the stream to check its replicas");
            return;
        }
    };
    let config = match stream.info().await {
        Ok(info) => info.config.clone(),
        Err(err) => {
            tracing::warn!(%err, stream = name, "cannot read the stream to check its replicas");
            return;
        }
    };
    let found = config.num_replicas.max(1);
    if found == wanted {
        return;
    }
    let mut scaled = config;
    scaled.num_replicas = wanted;
    match js.update_stream(scaled).await {
        Ok(_) => tracing::info!(
            stream = name,
            from = found,
            to = wanted,
            "stream replicas changed"
        ),
        Err(err) => tracing::warn!(
            %err,
            stream = name,
            replicas = found,
            wanted,
            "the stream keeps {found} replica(s): the server refused to change it; once the cluster has {wanted} JetStream servers, run `nats stream edit {name} --replicas {wanted}` (or restart a worker with --stream-replicas {wanted})"
        ),
    }
}

/// The results bucket, created when missing.
pub async fn results_bucket(
    js: &jetstream::Context,
    retention: Duration,
    replicas: Replicas,
) -> Result<kv::Store, DurableError> {
    if let Ok(store) = js.get_key_value(subjects::RESULTS_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: subjects::RESULTS_BUCKET.to_string(),
        description: "millracer request state and final results by request_id".to_string(),
        history: 1,
        max_age: retention,
        storage: StorageType::File,
        num_replicas: replicas.for_new(),
        ..Default::default()
    })
    .await
    .map_err(|e| setup(subjects::RESULTS_BUCKET)(e.to_string()))
}

/// One durable consumer a worker binds to.
#[derive(Debug, Clone)]
pub struct Binding {
    pub name: String,
    pub filters: Vec<String>,
    /// 1 for changes: the server hands a workspace's changes out one at a time, across
    /// every worker.
    pub max_ack_pending: i64,
    pub ack_wait: Duration,
    /// The workspace its subjects bind (`None`: `jobs.any`, workspace-less actions only).
    pub workspace: Option<String>,
    /// The worker's micro endpoint counting this consumer's requests (`$SRV.STATS`).
    pub endpoint: Option<usize>,
}

/// The consumers of a worker serving `workspaces` (`(id, fingerprint)`): a change and a
/// read consumer per workspace, named by id and fingerprint, and the `any` consumer.
/// Filters are disjoint, as a work-queue stream requires.
pub fn bindings<'a>(
    workspaces: impl Iterator<Item = (&'a str, &'a str)>,
    ack_wait: Duration,
) -> Vec<Binding> {
    let mut out = vec![Binding {
        name: subjects::JOBS_ANY_CONSUMER.to_string(),
        filters: vec![subjects::jobs_any()],
        max_ack_pending: 1000,
        ack_wait,
        workspace: None,
        endpoint: None,
    }];
    for (id, fingerprint) in workspaces {
        for class in [JobClass::Change, JobClass::Read] {
            out.push(Binding {
                name: subjects::jobs_consumer(id, fingerprint, class),
                filters: vec![
                    subjects::jobs_by_id(id, class),
                    subjects::jobs_by_path(fingerprint, class),
                ],
                max_ack_pending: if class == JobClass::Change { 1 } else { 1000 },
                ack_wait,
                workspace: Some(id.to_string()),
                endpoint: None,
            });
        }
    }
    out
}

/// A consumer bound and checked, ready to pull from.
pub struct BoundConsumer {
    binding: Binding,
    consumer: jetstream::consumer::Consumer<pull::Config>,
}

async fn consumer(
    js: &jetstream::Context,
    binding: &Binding,
) -> Result<jetstream::consumer::Consumer<pull::Config>, DurableError> {
    let stream = (|| js.get_stream(subjects::JOBS_STREAM))
        .retry(crate::bus::retry::patiently(Some(BIND_PATIENCE)))
        .when(|e| crate::bus::failover::is_failover(e))
        .notify(|err, _| warn_bind_retry(&binding.name, err))
        .await
        .map_err(|e| setup(subjects::JOBS_STREAM)(e.to_string()))?;
    let config = pull::Config {
        durable_name: Some(binding.name.clone()),
        filter_subjects: binding.filters.clone(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: binding.ack_wait,
        max_deliver: MAX_DELIVER,
        max_ack_pending: binding.max_ack_pending,
        ..Default::default()
    };
    let mut consumer: jetstream::consumer::Consumer<pull::Config> =
        (|| stream.get_or_create_consumer(&binding.name, config.clone()))
            .retry(crate::bus::retry::patiently(Some(BIND_PATIENCE)))
            .when(|e| crate::bus::failover::is_failover(e))
            .notify(|err, _| warn_bind_retry(&binding.name, err))
            .await
            .map_err(|e| {
                if crate::bus::failover::is_consumer_overlap(&e) {
                    DurableError::ConsumerOverlap {
                        name: binding.name.clone(),
                        filters: binding.filters.clone(),
                        stream: subjects::JOBS_STREAM.to_string(),
                    }
                } else {
                    setup(format!("consumer {}", binding.name))(e.to_string())
                }
            })?;
    let info = consumer
        .info()
        .await
        .map_err(|e| setup(format!("consumer {}", binding.name))(e.to_string()))?;
    let mut found = info.config.filter_subjects.clone();
    if !info.config.filter_subject.is_empty() {
        found.push(info.config.filter_subject.clone());
    }
    let (mut a, mut b) = (found.clone(), binding.filters.clone());
    a.sort();
    b.sort();
    if a != b {
        return Err(DurableError::ConsumerDrift {
            name: binding.name.clone(),
            found,
            expected: binding.filters.clone(),
        });
    }
    Ok(consumer)
}

/// How long binding a consumer waits out a cluster that times out or has no leader yet
/// (a cluster just started, a server restarting) before the worker gives up.
const BIND_PATIENCE: Duration = Duration::from_secs(20);

/// Says at WARN that binding a consumer waits on the cluster, so a worker that takes long
/// to start says why.
fn warn_bind_retry(name: &str, err: &dyn std::error::Error) {
    tracing::warn!(consumer = %name, %err, "JetStream did not answer the consumer's set-up; retrying for up to {} s", BIND_PATIENCE.as_secs());
}

/// Where a durable request's result goes: the stored record, then the ack.
pub struct JsReply {
    /// The durable side that stores the result before the ack.
    durable: Arc<Durable>,
    message: Arc<jetstream::Message>,
    /// The KV key, when the request could be named.
    key: Option<String>,
    /// Invalid input: answered, then terminated instead of acked.
    term: bool,
    /// Stops the progress acks.
    progress: CancellationToken,
    /// The micro endpoint counting it, and when it arrived.
    endpoint: Option<usize>,
    received: std::time::Instant,
}

impl DurableReply for JsReply {
    fn stats(&self) -> Option<(usize, Duration)> {
        self.endpoint.map(|e| (e, self.received.elapsed()))
    }

    fn settle(self: Box<Self>, result: Arc<OpsResult>, last_sequence: Option<u64>) {
        let durable = self.durable.clone();
        durable.finish(*self, result, last_sequence);
    }
}

/// A reply dropped without a result (it should not happen) stops its progress acks, so the
/// request is redelivered after the ack wait instead of being held forever.
impl Drop for JsReply {
    fn drop(&mut self) {
        self.progress.cancel();
    }
}

impl std::fmt::Debug for JsReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsReply")
            .field("key", &self.key)
            .field("term", &self.term)
            .finish()
    }
}

/// A worker's durable side: its identity, the bucket, and the records of the requests it
/// runs (kept in memory so frame-driven updates and the final write never go backwards).
pub struct Durable {
    js: jetstream::Context,
    client: async_nats::Client,
    kv: kv::Store,
    owner: String,
    records: std::sync::Mutex<HashMap<String, (JobRecord, Option<String>)>>,
    /// KV writes of this worker, one at a time, so a late frame update never overwrites a
    /// final record.
    writes: tokio::sync::Mutex<()>,
    /// Writes and acks still in flight; the worker waits for them before it exits.
    pub tracker: TaskTracker,
    ack_wait: Duration,
    /// Stored answers to reads, oldest first, with the revision written: purged from the
    /// bucket once [`READ_RESULT_KEEP`] has passed (or more than [`READ_RESULTS_HELD`] wait).
    reads: std::sync::Mutex<std::collections::VecDeque<(tokio::time::Instant, String, u64)>>,
    /// Wakes the purger when a read answer is stored.
    read_stored: tokio::sync::Notify,
    /// How long a stored read answer is kept (`--read-result-keep-seconds`).
    read_keep: Duration,
}

/// How long the stored answer to a durable read stays in the results bucket by default
/// (`--read-result-keep-seconds`): long enough for its caller (subscribed to the key before
/// it published) to read it, and longer than the stream's duplicate window, so a caller
/// retrying its publish finds the answer. Then it is purged: a dashboard polling `status`
/// durably must not fill the bucket for the whole `--result-retention-seconds`.
pub const READ_RESULT_KEEP: Duration = Duration::from_secs(300);

/// At most this many stored read answers wait for their purge (about 100 bytes of memory
/// each); past it the oldest are purged early.
const READ_RESULTS_HELD: usize = 100_000;

enum Claim {
    /// Not seen before: run it.
    New,
    /// Finished: the stored result answers; ack without running.
    Done,
    /// Another live worker runs it and will store its result.
    Elsewhere,
    /// Left by a worker that is gone: run it again from where that worker was.
    TakeOver(Box<JobRecord>),
}

impl Durable {
    /// The results bucket.
    pub fn results(&self) -> kv::Store {
        self.kv.clone()
    }

    pub fn new(
        js: jetstream::Context,
        client: async_nats::Client,
        kv: kv::Store,
        owner: String,
        ack_wait: Duration,
        read_keep: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            js,
            client,
            kv,
            owner,
            records: std::sync::Mutex::new(HashMap::new()),
            writes: tokio::sync::Mutex::new(()),
            tracker: TaskTracker::new(),
            ack_wait,
            reads: std::sync::Mutex::new(std::collections::VecDeque::new()),
            read_stored: tokio::sync::Notify::new(),
            read_keep,
        })
    }

    /// Remembers a stored read answer for its purge.
    fn forget_later(&self, key: String, revision: u64) {
        self.reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((tokio::time::Instant::now() + self.read_keep, key, revision));
        self.read_stored.notify_one();
    }

    /// Purges each stored read answer when its time is up (see [`READ_RESULT_KEEP`]), until
    /// `stop`; a key written again since (another revision) is left alone. What a stopped
    /// worker leaves ends with the bucket's retention.
    async fn purge_reads(self: Arc<Self>, stop: CancellationToken) {
        loop {
            // The answer to purge now, or when the next one is due (none: nothing stored).
            let next: Result<(String, u64), Option<tokio::time::Instant>> = {
                let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
                let over = reads.len() > READ_RESULTS_HELD;
                match reads.pop_front() {
                    Some((due, key, revision)) if over || due <= tokio::time::Instant::now() => {
                        Ok((key, revision))
                    }
                    Some(read) => {
                        let due = read.0;
                        reads.push_front(read);
                        Err(Some(due))
                    }
                    None => Err(None),
                }
            };
            match next {
                Ok((key, revision)) => {
                    if let Err(err) = self.kv.purge_expect_revision(&key, Some(revision)).await {
                        tracing::debug!(%err, key, "a stored read answer was not purged");
                    }
                }
                Err(due) => {
                    let sleep = async {
                        match due {
                            Some(due) => tokio::time::sleep_until(due).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = sleep => {}
                        () = self.read_stored.notified() => {}
                    }
                }
            }
        }
    }

    /// Creates (or finds) and checks every binding's consumer: a consumer that exists with
    /// other filters, or overlaps another worker's, is a collision of identities
    /// ([`DurableError::is_collision`]).
    pub async fn bind(&self, bindings: Vec<Binding>) -> Result<Vec<BoundConsumer>, DurableError> {
        let mut out = Vec::new();
        for binding in bindings {
            let consumer = consumer(&self.js, &binding).await?;
            out.push(BoundConsumer { binding, consumer });
        }
        Ok(out)
    }

    /// Pulls from every bound consumer until `stop` fires, handing requests to the engine.
    pub async fn serve(
        self: Arc<Self>,
        engine: Arc<Engine>,
        consumers: Vec<BoundConsumer>,
        max_request_bytes: usize,
        stop: CancellationToken,
    ) {
        // Not one of the pullers: it ends with `stop`, and what it has not purged by then
        // ends with the bucket's retention.
        tokio::spawn(self.clone().purge_reads(stop.clone()));
        let pullers = TaskTracker::new();
        for BoundConsumer { binding, consumer } in consumers {
            let this = self.clone();
            let engine = engine.clone();
            let stop = stop.clone();
            pullers.spawn(async move {
                this.pull(binding, consumer, engine, max_request_bytes, stop)
                    .await
            });
        }
        pullers.close();
        pullers.wait().await;
    }

    async fn pull(
        self: Arc<Self>,
        binding: Binding,
        consumer: jetstream::consumer::Consumer<pull::Config>,
        engine: Arc<Engine>,
        max_request_bytes: usize,
        stop: CancellationToken,
    ) {
        let name = binding.name.clone();
        let bound = match &binding.workspace {
            Some(id) => Bound::Workspace(id.clone()),
            None => Bound::Any,
        };
        tracing::info!(consumer = %name, "pulling durable requests");
        'outer: while !stop.is_cancelled() {
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(50)
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(err) => {
                    tracing::debug!(%err, consumer = %name, "cannot pull; retrying");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    biased;
                    () = stop.cancelled() => break 'outer,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        self.admit(
                            &engine,
                            message,
                            &bound,
                            binding.endpoint,
                            max_request_bytes,
                        )
                        .await;
                    }
                    Some(Err(err)) => {
                        // Missed heartbeats during a broker outage and the like: the stream
                        // recovers by itself; a pause keeps this from spinning.
                        tracing::debug!(%err, consumer = %name, "pull interrupted");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => continue 'outer,
                }
            }
        }
    }

    /// One delivered request: claim it by request_id, then run, skip or take over.
    async fn admit(
        self: &Arc<Self>,
        engine: &Arc<Engine>,
        message: jetstream::Message,
        bound: &Bound,
        endpoint: Option<usize>,
        max_request_bytes: usize,
    ) {
        let received = std::time::Instant::now();
        let span =
            tracing::info_span!("nats.receive", subject = %message.subject, jetstream = true);
        trace::adopt(&span, message.headers.as_ref());
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let raw = message.payload.clone();
        let message = Arc::new(message);
        let parsed = (raw.len() <= max_request_bytes)
            .then(|| parse_request(&raw).ok())
            .flatten()
            .and_then(|mut request| {
                engine
                    .service()
                    .bind(&mut request, bound)
                    .ok()
                    .map(|()| request)
            });
        let submit_hints = || SubmitHints {
            bound: Some(bound.clone()),
            ..SubmitHints::default()
        };
        let Some(request) = parsed else {
            // Refused by the engine with a clear result (invalid input, or a body naming
            // another workspace); stored under the id it carries, in the subject's
            // workspace: never under another workspace's name.
            let (request_id, _) = salvage_ids(&raw);
            let key = (!request_id.is_empty())
                .then(|| subjects::result_key(bound.workspace(), &request_id));
            let reply = JsReply {
                durable: self.clone(),
                message,
                key,
                term: true,
                progress: CancellationToken::new(),
                endpoint,
                received,
            };
            engine.submit_with(
                &raw,
                Some(ReplyTo::Durable(Box::new(reply))),
                &span,
                submit_hints(),
            );
            return;
        };
        let key = subjects::result_key(bound.workspace(), &request.request_id);
        // Planned once, here: the engine runs the request with this plan.
        let plan = engine.service().plan(&request);
        let workspace = plan.workspace_id.clone();
        let frames_subject = subjects::frames(workspace.as_deref(), &request.request_id);
        let claim = self
            .claim_through_outage(&key, workspace.clone(), delivered, &message)
            .await;
        let mut hints = submit_hints();
        match claim {
            Ok(Claim::New) => {}
            Ok(Claim::Done) | Ok(Claim::Elsewhere) => {
                tracing::info!(request_id = %request.request_id, delivered, "request already answered or running elsewhere; not running it again");
                if let Err(err) = message.ack().await {
                    tracing::warn!(%err, "cannot ack a repeated request");
                }
                return;
            }
            Ok(Claim::TakeOver(previous)) => {
                tracing::info!(request_id = %request.request_id, previous_owner = %previous.owner, work_item = ?previous.work_item.as_ref().map(|w| &w.id), "taking over a request its worker left");
                hints.last_sequence = self.last_sequence(&frames_subject).await;
                hints.resume = Some(Resume {
                    work_item: previous.work_item.clone(),
                    daemon_pid: previous.daemon_pid,
                    intake: previous.intake.clone(),
                });
                hints.cancelled = previous.cancelled.clone();
                let mut record = self.running(workspace.clone());
                record.work_item = previous.work_item;
                record.intake = previous.intake;
                record.daemon_pid = previous.daemon_pid;
                record.cancelled = previous.cancelled;
                self.remember(&key, record, None);
            }
            Err(err) => {
                // The bucket is unreachable (a broker outage): leave the request to be
                // redelivered rather than run it without a claim.
                tracing::warn!(%err, request_id = %request.request_id, "cannot claim a request; it will be redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
        }
        hints.checkpoint = Some(Arc::new(IntentCheckpoint {
            durable: self.clone(),
            key: key.clone(),
        }));
        let progress = CancellationToken::new();
        self.tracker.spawn(progress_acks(
            message.clone(),
            progress.clone(),
            self.ack_wait,
        ));
        let reply = JsReply {
            durable: self.clone(),
            message,
            key: Some(key),
            term: false,
            progress,
            endpoint,
            received,
        };
        // Parsed and bound above: handed to the engine as is, never parsed again.
        engine.submit_request(
            request,
            Some(plan),
            Some(ReplyTo::Durable(Box::new(reply))),
            &span,
            hints,
        );
    }

    fn running(&self, workspace: Option<String>) -> JobRecord {
        JobRecord {
            state: "running".to_string(),
            owner: self.owner.clone(),
            workspace,
            work_item: None,
            intake: None,
            daemon_pid: None,
            result: None,
            last_sequence: None,
            updated_at: time::now(),
            cancelled: None,
        }
    }

    fn remember(&self, key: &str, record: JobRecord, pending_path: Option<String>) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), (record, pending_path));
    }

    /// [`Durable::claim`], retried while the bucket is unreachable (a cluster electing a
    /// new leader after a server died, a broker restarting), with progress acks so the
    /// request stays this worker's: handing it back (a nak) would spend one of its
    /// [`MAX_DELIVER`] deliveries per attempt, and a failover longer than a few seconds
    /// would drop it. Gives up after [`CLAIM_PATIENCE`].
    async fn claim_through_outage(
        &self,
        key: &str,
        workspace: Option<String>,
        delivered: i64,
        message: &jetstream::Message,
    ) -> Result<Claim, String> {
        let attempt = || async {
            let claimed = self.claim(key, workspace.clone(), delivered).await;
            if claimed.is_err() {
                // Still this worker's while it waits for the bucket.
                let _ = message.ack_with(AckKind::Progress).await;
            }
            claimed
        };
        attempt
            .retry(crate::bus::retry::patiently(Some(CLAIM_PATIENCE)))
            .notify(|err, _| tracing::debug!(%err, key, "cannot claim a request yet; retrying"))
            .await
    }

    async fn claim(
        &self,
        key: &str,
        workspace: Option<String>,
        delivered: i64,
    ) -> Result<Claim, String> {
        let record = self.running(workspace);
        let body = Bytes::from(serde_json::to_vec(&record).map_err(|e| e.to_string())?);
        match self.kv.create(key, body.clone()).await {
            Ok(_) => {
                self.remember(key, record, None);
                return Ok(Claim::New);
            }
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(err) => return Err(err.to_string()),
        }
        let entry = self.kv.entry(key).await.map_err(|e| e.to_string())?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            self.kv.put(key, body).await.map_err(|e| e.to_string())?;
            self.remember(key, record, None);
            return Ok(Claim::New);
        };
        let previous: JobRecord = match serde_json::from_slice(&entry.value) {
            Ok(previous) => previous,
            Err(_) => return Ok(Claim::Done),
        };
        if previous.is_done() {
            return Ok(Claim::Done);
        }
        if previous.owner == self.owner {
            // Redelivered to us while we still run it (a broker restart): the engine
            // attaches this delivery to the running request.
            return Ok(Claim::New);
        }
        if self.owner_alive(&previous.owner).await {
            tracing::debug!(key, delivered, owner = %previous.owner, "request runs on a live worker");
            return Ok(Claim::Elsewhere);
        }
        let mut taken = previous.clone();
        taken.owner = self.owner.clone();
        taken.updated_at = time::now();
        let body = Bytes::from(serde_json::to_vec(&taken).map_err(|e| e.to_string())?);
        match self.kv.update(key, body, entry.revision).await {
            Ok(_) => Ok(Claim::TakeOver(Box::new(previous))),
            // Another worker took it over first.
            Err(_) => Ok(Claim::Elsewhere),
        }
    }

    /// Whether the worker with this service id still answers `$SRV.PING.millracer.<id>`.
    async fn owner_alive(&self, owner: &str) -> bool {
        let subject = format!(
            "$SRV.PING.{}.{}",
            crate::bus::micro::SERVICE_NAME,
            subjects::token(owner)
        );
        for _ in 0..2 {
            match tokio::time::timeout(
                Duration::from_millis(750),
                self.client.request(subject.clone(), Bytes::new()),
            )
            .await
            {
                Ok(Ok(_)) => return true,
                Ok(Err(err))
                    if err.kind() == async_nats::client::RequestErrorKind::NoResponders =>
                {
                    return false;
                }
                _ => {}
            }
        }
        false
    }

    /// The sequence of the last frame stored for this request (0 when none).
    async fn last_sequence(&self, frames_subject: &str) -> u64 {
        let Ok(stream) = self.js.get_stream(subjects::FRAMES_STREAM).await else {
            return 0;
        };
        match stream.get_last_raw_message_by_subject(frames_subject).await {
            Ok(message) => message
                .headers
                .get(subjects::HEADER_SEQUENCE)
                .and_then(|v| v.as_str().parse().ok())
                .or_else(|| {
                    serde_json::from_slice::<OpsEventFrame>(&message.payload)
                        .ok()
                        .map(|f| f.sequence)
                })
                .unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Stores the result, then acks (or terminates) the message.
    pub fn finish(
        self: &Arc<Self>,
        reply: JsReply,
        result: Arc<OpsResult>,
        last_sequence: Option<u64>,
    ) {
        let this = self.clone();
        self.tracker.spawn(async move {
            reply.progress.cancel();
            if reply.term {
                // Invalid input names its request_id only as well as it can: stored only
                // when nothing is stored under that id, so garbage can never overwrite a
                // real request's record.
                if let Some(key) = &reply.key {
                    this.store_refusal(key, &result).await;
                }
            } else if let Some(key) = &reply.key {
                let value = serde_json::from_str::<Value>(&result.to_json_line()).ok();
                {
                    let mut records = this.records.lock().unwrap_or_else(|e| e.into_inner());
                    let entry = records
                        .entry(key.clone())
                        .or_insert_with(|| (this.running(None), None));
                    entry.0.state = "done".to_string();
                    entry.0.result = value;
                    entry.0.last_sequence = last_sequence;
                }
                let revision = this.write(key, true).await;
                if let Some(revision) = revision
                    && !crate::actions::dispatch::Action::parse(&result.action).keeps_result()
                {
                    this.forget_later(key.clone(), revision);
                }
            }
            // Confirmed by the server, so a worker that exits right after (SIGTERM) has
            // really handed the request off.
            let ack = if reply.term {
                reply.message.double_ack_with(AckKind::Term).await
            } else {
                reply.message.double_ack().await
            };
            if let Err(err) = ack {
                tracing::warn!(%err, "cannot ack a finished request (the stored result answers a redelivery)");
            }
        });
    }

    /// Keeps the result of a core request/reply request under its scoped result key, like
    /// a durable one, unless something is stored there already (a durable request with
    /// the same id writes its own record; a repeated core request has the same result).
    pub fn store_core_result(self: &Arc<Self>, workspace: Option<String>, result: Arc<OpsResult>) {
        if result.request_id.is_empty() {
            return;
        }
        let key = subjects::result_key(workspace.as_deref(), &result.request_id);
        let this = self.clone();
        self.tracker.spawn(async move {
            let mut record = this.running(workspace);
            record.state = "done".to_string();
            record.result = serde_json::from_str::<Value>(&result.to_json_line()).ok();
            let Ok(body) = serde_json::to_vec(&record) else {
                return;
            };
            match this.kv.create(&key, Bytes::from(body)).await {
                Ok(_) => {}
                Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(err) => tracing::warn!(%err, key, "cannot keep a core request's result"),
            }
        });
    }

    async fn store_refusal(&self, key: &str, result: &OpsResult) {
        let mut record = self.running(None);
        record.state = "done".to_string();
        record.result = serde_json::from_str::<Value>(&result.to_json_line()).ok();
        let Ok(body) = serde_json::to_vec(&record) else {
            return;
        };
        match self.kv.create(key, Bytes::from(body)).await {
            Ok(_) => {}
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                tracing::warn!(
                    key,
                    "invalid input reuses a stored request_id; its record is kept"
                );
            }
            Err(err) => tracing::warn!(%err, key, "cannot store the answer to invalid input"),
        }
    }

    /// Writes the in-memory record to the bucket, retrying through a broker outage (for
    /// up to ten minutes: a stored final result is what makes a redelivery harmless).
    /// The revision written, when the record was stored.
    async fn write(&self, key: &str, last: bool) -> Option<u64> {
        self.write_within(key, last, Duration::from_secs(600)).await
    }

    /// [`Durable::write`] giving up after `patience`; the revision, when the record was
    /// stored.
    async fn write_within(&self, key: &str, last: bool, patience: Duration) -> Option<u64> {
        let _one_at_a_time = self.writes.lock().await;
        let mut record = self
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|(r, _)| r.clone())?;
        if record.is_done() && !last {
            return None;
        }
        record.updated_at = time::now();
        let Ok(body) = serde_json::to_vec(&record) else {
            return None;
        };
        let body = Bytes::from(body);
        let stored = (|| self.kv.put(key, body.clone()))
            .retry(crate::bus::retry::patiently(Some(patience)))
            .notify(|err, _| tracing::warn!(%err, key, "cannot store a request's state; retrying"))
            .await
            .inspect_err(|err| tracing::error!(%err, key, "gave up storing a request's state"))
            .ok();
        if last {
            self.records
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(key);
        }
        stored
    }

    /// Stores the intake document a run is about to queue (see [`JobRecord::intake`]).
    async fn record_intent(&self, key: &str, item: WorkItemRef) -> Result<(), String> {
        {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            let Some((record, _)) = records.get_mut(key) else {
                return Err(format!("no running record {key}"));
            };
            record.intake = Some(item);
        }
        if self
            .write_within(key, false, INTENT_PATIENCE)
            .await
            .is_some()
        {
            Ok(())
        } else {
            Err(format!(
                "the results bucket did not take the intent within {INTENT_PATIENCE:?}"
            ))
        }
    }
}

impl Durable {
    /// Stores a step of a run a takeover needs (the queued work item, the daemon's pid):
    /// tried briefly; if the bucket does not take it, the run goes on and the record keeps
    /// it for the next write.
    async fn record_step(
        &self,
        key: &str,
        step: impl FnOnce(&mut JobRecord),
    ) -> Result<(), String> {
        {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            let Some((record, _)) = records.get_mut(key) else {
                return Err(format!("no running record {key}"));
            };
            step(record);
        }
        if self.write_within(key, false, STEP_PATIENCE).await.is_some() {
            Ok(())
        } else {
            Err(format!(
                "the results bucket did not take the step within {STEP_PATIENCE:?}"
            ))
        }
    }
}

/// How long a run waits for a step of it to be stored before it goes on.
const STEP_PATIENCE: Duration = Duration::from_secs(5);

/// How long a delivered request waits for the results bucket before it is handed back.
const CLAIM_PATIENCE: Duration = Duration::from_secs(60);

/// How long a run waits for its intent to be stored before it queues anyway (a broker
/// outage longer than this: the run goes on, and only a crash in the next instants could
/// queue the work twice).
const INTENT_PATIENCE: Duration = Duration::from_secs(60);

/// One durable request's [`Checkpoint`]: stores the intake document a run is about to
/// queue in the request's record before `queue add`.
struct IntentCheckpoint {
    durable: Arc<Durable>,
    key: String,
}

impl std::fmt::Debug for IntentCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntentCheckpoint")
            .field("key", &self.key)
            .finish()
    }
}

impl Checkpoint for IntentCheckpoint {
    fn record<'a>(
        &'a self,
        milestone: &'a Milestone,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        let as_ref = |item: &WorkItem| WorkItemRef {
            id: item.id.clone(),
            path: item.path.clone(),
            kind: item.kind.clone(),
        };
        Box::pin(async move {
            match milestone {
                Milestone::IntakeWritten(item) => {
                    self.durable.record_intent(&self.key, as_ref(item)).await
                }
                Milestone::WorkItemQueued(item) => {
                    self.durable
                        .record_step(&self.key, |record| record.work_item = Some(as_ref(item)))
                        .await
                }
                Milestone::DaemonRunning { pid } => {
                    self.durable
                        .record_step(&self.key, |record| record.daemon_pid = Some(*pid))
                        .await
                }
            }
        })
    }
}

/// Tells JetStream every third of the ack wait that a long request is still being worked
/// on, until the request finished.
async fn progress_acks(
    message: Arc<jetstream::Message>,
    done: CancellationToken,
    ack_wait: Duration,
) {
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = tokio::time::sleep(ack_wait / 3) => {}
        }
        if let Err(err) = message.ack_with(AckKind::Progress).await {
            tracing::debug!(%err, "cannot send a progress ack");
        }
    }
}

/// Reads a stored record.
/// The record under `key` ([`subjects::result_key`]).
pub async fn read_record(kv: &kv::Store, key: &str) -> Result<Option<JobRecord>, kv::EntryError> {
    let entry = kv.entry(key).await?;
    Ok(entry
        .filter(|e| e.operation == kv::Operation::Put)
        .and_then(|e| serde_json::from_slice(&e.value).ok()))
}
