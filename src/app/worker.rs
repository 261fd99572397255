//! `millracer worker`: serves its configured workspaces on the bus until SIGTERM/SIGINT,
//! then stops taking requests, answers the ones it has within `--shutdown-timeout`, and
//! exits (0 when everything was handed back).
//!
//! What it says at the default log level, one line per change: `cannot reach nats://…:
//! <cause>; retrying every 2 s` while no broker answers (again when the cause changes,
//! else once a minute); `connected to nats-server <version> at <url>`; `worker ready:
//! serving …` once, with what it serves. A broker it cannot use (no JetStream, older than
//! nats-server 2.10, JetStream API refusals) is an ERROR naming the server's version and
//! what millracer needs, and the worker exits with [`EXIT_INCOMPATIBLE_BROKER`] before it
//! created anything there, unless `--core-only` (core request/reply only). `--ready-file`
//! is written once ready and removed on stop, for service managers.
//!
//! Exit codes: 0 stopped cleanly, 1 an error (bad configuration, or the stop bound left
//! requests unanswered), 2 the workspace identity collides with a live owner on the bus
//! (same id at another host/path, same path under another id), 3 a broker it cannot use.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::actions::binding::Bound;
use crate::actions::dispatch::{Service, Serving};
use crate::app::cli::WorkerArgs;
use crate::app::config::{ConfigFile, build_registry};
use crate::bus::broker::{self, Incompatible};
use crate::bus::durable::{self, Durable};
use crate::bus::micro::{self, EndpointInfo, Micro};
use crate::bus::nats;
use crate::bus::registry::{self, RegisterError, Registration};
use crate::bus::subjects;
use crate::bus::trace;
use crate::contract::registry::{Directory, RegistryEntry};
use crate::engine::frames::{CoreReply, ReplyTo};
use crate::engine::service::{Engine, EngineOptions, SubmitHints};
use crate::millrace::sessions::SessionStore;

/// The exit code of a worker whose broker cannot serve durable intake (no JetStream, a
/// nats-server older than 2.10, JetStream API refusals) and that was not told
/// `--core-only`. Configuration errors exit 1.
pub const EXIT_INCOMPATIBLE_BROKER: u8 = 3;

/// How long a JetStream that answers with errors (still starting, a broker restarting) is
/// waited for before the worker gives up on it.
const JETSTREAM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// A worker that must not run as configured: the message for stderr and the exit code
/// (2: its workspace identity collides with a live owner on the bus).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: u8,
    pub message: String,
}

impl Refusal {
    fn collision(message: impl std::fmt::Display) -> anyhow::Error {
        Self {
            code: EXIT_COLLISION,
            message: message.to_string(),
        }
        .into()
    }
}

/// The exit code of a worker refused for a workspace identity collision.
pub const EXIT_COLLISION: u8 = 2;

pub async fn run(mut args: WorkerArgs) -> anyhow::Result<()> {
    let file = args.config.as_deref().map(ConfigFile::load).transpose()?;
    let host = crate::app::cli::host_id(
        args.host_id
            .as_deref()
            .or(file.as_ref().and_then(|f| f.worker.host_id.as_deref())),
    )
    .map_err(anyhow::Error::msg)?;
    let registry = build_registry(
        &args.workspaces,
        file.as_ref(),
        &args.common.millrace_mode,
        &host,
    )?;
    if args.nats.nats_creds.is_none() {
        args.nats.nats_creds = file.as_ref().and_then(|f| f.nats.creds.clone());
    }
    if args.nats.inbox_prefix.is_none() {
        args.nats.inbox_prefix = file.as_ref().and_then(|f| f.nats.inbox_prefix.clone());
    }
    let url = nats::url(
        &args.nats.credentials(),
        file.as_ref().and_then(|f| f.nats.url.as_deref()),
    );
    // A workspace's identity on the bus: its host id and canonical path.
    let fingerprints: HashMap<String, String> = registry
        .records()
        .map(|r| (r.id.clone(), subjects::fingerprint(&host, &r.root)))
        .collect();
    let fingerprint = |id: &str| fingerprints.get(id).cloned().unwrap_or_default();

    // One endpoint per subject: any worker, each workspace by id and by path.
    let mut endpoints = vec![endpoint("any", subjects::request_any(), None)];
    for record in registry.records() {
        endpoints.push(endpoint(
            &format!("ws-{}", record.id),
            subjects::request_by_id(&record.id),
            Some(&record.id),
        ));
        endpoints.push(endpoint(
            &format!("path-{}", record.id),
            subjects::request_by_path(&fingerprint(&record.id)),
            Some(&record.id),
        ));
        tracing::info!(workspace = %record.id, root = %record.root.display(), host = %host, fingerprint = %fingerprint(&record.id), "serving workspace");
        if !crate::millrace::records::agents_dir(&record.root).is_dir() {
            // Served anyway (it may be initialised later), but its requests fail until then.
            tracing::warn!(
                workspace = %record.id,
                "{} is not a Millrace workspace yet (no millrace-agents/): run `millrace init --workspace {}` (its requests fail until then)",
                record.root.display(),
                record.root.display()
            );
        }
    }
    let ack_wait =
        crate::app::cli::secs(args.ack_wait_seconds).max(std::time::Duration::from_secs(1));
    let mut bindings = if args.core_only {
        Vec::new()
    } else {
        durable::bindings(
            registry
                .records()
                .map(|r| (r.id.as_str(), fingerprints[&r.id].as_str())),
            ack_wait,
        )
    };
    // Each durable consumer is an endpoint too, so `$SRV.STATS` counts durable requests.
    for binding in &mut bindings {
        let mut info = endpoint(
            &format!("jobs-{}", binding.name),
            binding.filters.first().cloned().unwrap_or_default(),
            binding.workspace.as_deref(),
        );
        info.queue_group = binding.name.clone();
        info.durable = true;
        info.metadata
            .insert("consumer".to_string(), binding.name.clone());
        info.metadata
            .insert("durable".to_string(), "true".to_string());
        binding.endpoint = Some(endpoints.len());
        endpoints.push(info);
    }
    let retention = std::time::Duration::from_secs(args.result_retention_seconds);
    let replicas = durable::Replicas {
        wanted: args
            .stream_replicas
            .or_else(|| file.as_ref().and_then(|f| f.nats.stream_replicas))
            .map(usize::from),
    };
    if let Some(n) = replicas.wanted
        && !(1..=5).contains(&n)
    {
        anyhow::bail!(
            "[nats] stream_replicas must be 1 to 5 (JetStream keeps at most 5 copies), not {n}"
        );
    }
    let served: Vec<String> = registry.records().map(|r| r.id.clone()).collect();
    // A ready file left by a worker that crashed must not say "ready" for this one.
    let mut ready_file = ReadyFile::new(args.ready_file.clone())?;
    let micro = Arc::new(Micro::new(
        endpoints,
        HashMap::from([
            (
                "workspaces".to_string(),
                registry
                    .records()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("host".to_string(), host.clone()),
            (
                "intake".to_string(),
                if args.core_only {
                    "core"
                } else {
                    "core,durable"
                }
                .to_string(),
            ),
        ]),
    ));
    // Named in a collision found on the consumers (the other side is not in the registry).
    let served_here = registry
        .records()
        .map(|r| format!("{:?} at {host}:{}", r.id, r.root.display()))
        .collect::<Vec<_>>()
        .join(", ");
    let registry_entries: Vec<RegistryEntry> = registry
        .records()
        .map(|r| RegistryEntry {
            workspace_id: r.id.clone(),
            display_name: r.display_name.clone(),
            fingerprint: fingerprint(&r.id),
            host: host.clone(),
            root_path: r.root.display().to_string(),
            worker_id: micro.id.clone(),
            worker_name: format!("{host}/{}", std::process::id()),
            version: micro.version.clone(),
            at: String::new(),
        })
        .collect();
    let pi = if args.pi_runner || file.as_ref().is_some_and(|f| f.pi.enabled) {
        let default_root = registry.default_record().map(|r| r.root.clone());
        let base = args
            .common
            .pi_config(crate::agent::pi::SessionKind::Rpc, default_root.as_deref())?;
        let config = match &file {
            Some(file) => file.pi.apply(base, default_root.as_deref())?,
            None => base,
        };
        tracing::info!(command = %config.command, kind = ?config.kind, "pi runner configured");
        Some(crate::agent::pi::PiRunner::new(config))
    } else {
        None
    };
    let directory = (!args.core_only).then(|| Arc::new(Directory::default()));
    let service = Service {
        pi,
        cli_workspace: registry.default_record().map(|r| r.root.clone()),
        registry,
        serving: Serving::Registered,
        millrace: args.common.millrace(),
        sessions: SessionStore::new(SessionStore::default_path()),
        settings: args.common.settings(),
        status_cache: Some(crate::millrace::status::StatusCache::new(
            crate::app::cli::secs(args.status_max_age_seconds),
        )),
        directory: directory.clone(),
        cancels: Default::default(),
    };
    let options = EngineOptions {
        max_request_bytes: args.max_request_bytes,
        result_ttl: std::time::Duration::from_secs(args.result_ttl_seconds),
        result_capacity: args.result_capacity,
    };

    tracing::info!(%url, "connecting to the broker");
    let client =
        nats::connect_patiently(&args.nats.credentials(), &url, "millracer-worker").await?;
    let info = client.server_info();
    tracing::info!(
        version = %info.version,
        jetstream = info.jetstream,
        "connected to nats-server {} at {url}",
        info.version
    );
    // Checked before anything is created on the broker.
    broker::check_server(&info, &url, args.core_only).map_err(refuse)?;
    // The durable side, the registry and the consumers: all or nothing, unless the
    // operator asked for core request/reply only.
    let registry_stop = CancellationToken::new();
    let mut registration = None;
    let mut consumers = Vec::new();
    let durable = if args.core_only {
        tracing::warn!(
            "--core-only: no durable intake, no results bucket, not in the bus's registry"
        );
        None
    } else {
        let js = async_nats::jetstream::new(client.clone());
        broker::check_account(&js, &info, &url, JETSTREAM_PATIENCE)
            .await
            .map_err(refuse)?;
        let (durable, store) = setup_durable(js, &client, &micro.id, retention, replicas, ack_wait)
            .await
            .map_err(|message| {
                refuse(Incompatible::JetStreamApi {
                    version: info.version.clone(),
                    url: url.clone(),
                    what: "durable intake".to_string(),
                    message,
                })
            })?;
        let claim = Arc::new(Registration::new(
            async_nats::jetstream::new(client.clone()),
            store.clone(),
            registry_entries,
            micro.id.clone(),
        ));
        match claim.claim().await {
            Ok(()) => {}
            Err(RegisterError::Collision(collision)) => {
                return Err(Refusal::collision(collision));
            }
            Err(err) => {
                return Err(anyhow::Error::new(err).context(
                    "durable intake cannot start (for a broker without JetStream, pass --core-only)",
                ));
            }
        }
        match durable.bind(std::mem::take(&mut bindings)).await {
            Ok(bound) => consumers = bound,
            Err(err) => {
                claim.delete_all().await;
                if err.is_collision() {
                    return Err(Refusal::collision(format!(
                        "workspace collision: {err} (this worker serves {served_here})"
                    )));
                }
                return Err(anyhow::Error::new(err).context(
                    "durable intake cannot start (for a broker without JetStream, pass --core-only)",
                ));
            }
        }
        tokio::spawn(claim.clone().keep(registry_stop.clone()));
        if let Some(directory) = &directory {
            tokio::spawn(registry::follow(
                store,
                directory.clone(),
                registry_stop.clone(),
            ));
        }
        registration = Some(claim);
        Some(durable)
    };
    let (engine, outbound) = Engine::new(Arc::new(service), options);
    let publisher = tokio::spawn(nats::publish_outbound(
        client.clone(),
        outbound,
        Some(micro.clone()),
        durable.clone(),
    ));

    let stop = CancellationToken::new();
    // Cancels reach requests other workers hold, and theirs reach ours.
    engine
        .service()
        .cancels
        .set_remote(Arc::new(crate::bus::cancel::BusCancel {
            client: client.clone(),
            kv: durable.as_ref().map(|d| d.results()),
            owner: micro.id.clone(),
        }));
    let cancel_scopes = engine
        .service()
        .registry
        .records()
        .map(|r| (Some(r.id.clone()), Some(r.root.clone())))
        .collect();
    let cancel_task = tokio::spawn(crate::bus::cancel::serve(
        client.clone(),
        engine.clone(),
        cancel_scopes,
        stop.clone(),
    ));
    let durable_task = durable.clone().map(|durable| {
        tokio::spawn(durable.serve(
            engine.clone(),
            consumers,
            args.max_request_bytes,
            stop.clone(),
        ))
    });
    let receivers = TaskTracker::new();
    for (index, info) in micro.endpoints().iter().enumerate() {
        if info.durable {
            continue;
        }
        let mut subscriber = client
            .queue_subscribe(info.subject.clone(), info.queue_group.clone())
            .await
            .with_context(|| format!("cannot subscribe to {}", info.subject))?;
        let engine = engine.clone();
        let stop = stop.clone();
        // The workspace this endpoint's subject binds (none: `req.any`).
        let bound = match info.metadata.get("workspace") {
            Some(id) => Bound::Workspace(id.clone()),
            None => Bound::Any,
        };
        receivers.spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    message = subscriber.next() => match message {
                        Some(message) => admit(&engine, message, index, &bound),
                        None => return,
                    },
                }
            }
            // Stop taking requests, but answer those the server already handed us.
            if let Err(err) = subscriber.drain().await {
                tracing::warn!(%err, "cannot drain a subscription");
                return;
            }
            while let Some(message) = subscriber.next().await {
                admit(&engine, message, index, &bound);
            }
        });
    }
    let micro_stop = CancellationToken::new();
    let micro_task = tokio::spawn(micro.clone().serve(client.clone(), micro_stop.clone()));
    client.flush().await.context("cannot reach NATS")?;
    let subjects: Vec<&str> = micro
        .endpoints()
        .iter()
        .filter(|e| !e.durable)
        .map(|e| e.subject.as_str())
        .collect();
    let serves = if durable.is_some() {
        "durable intake (JetStream) and core request/reply"
    } else {
        "core request/reply only"
    };
    tracing::info!(
        url = %url,
        server_version = %info.version,
        ?subjects,
        queue_group = subjects::QUEUE_GROUP,
        service = micro::SERVICE_NAME,
        id = %micro.id,
        host = %host,
        "worker ready: serving workspaces [{}] on {url} (nats-server {}): {serves}",
        served.join(", "),
        info.version,
    );
    ready_file.write(&serde_json::json!({
        "pid": std::process::id(),
        "url": url,
        "server_version": info.version,
        "workspaces": served,
        "durable": durable.is_some(),
        "service_id": micro.id,
    }))?;

    wait_for_signal().await?;
    // Not ready any more: a service manager sees it before the drain ends.
    ready_file.remove();
    let bound = crate::app::cli::secs(args.shutdown_timeout_seconds);
    let started = std::time::Instant::now();
    tracing::info!(
        in_flight = engine.in_flight(),
        shutdown_timeout = ?bound,
        "stopping: no new requests; finishing those in flight"
    );
    // A stopping worker no longer serves: its registry entries go first (bounded), so the
    // bridge answers "no worker" at once instead of sending it more.
    registry_stop.cancel();
    if let Some(registration) = &registration {
        let patience = bound.min(std::time::Duration::from_secs(2));
        if tokio::time::timeout(patience, registration.delete_all())
            .await
            .is_err()
        {
            tracing::warn!(
                "cannot delete this worker's registry entries (they expire within 30 s)"
            );
        }
    }
    let weak_engine = Arc::downgrade(&engine);
    let tracker = durable.as_ref().map(|d| d.tracker.clone());
    let drained = async move {
        stop.cancel();
        receivers.close();
        receivers.wait().await;
        if let Some(task) = durable_task
            && let Err(err) = task.await
        {
            tracing::error!(%err, "durable intake task failed");
        }
        micro_stop.cancel();
        let _ = micro_task.await;
        let _ = cancel_task.await;
        engine.shutdown().await;
        drop(engine);
        publisher.await.context("publisher task failed")?;
        if let Some(durable) = &durable {
            // Results stored and acked before the connection goes.
            durable.tracker.close();
            durable.tracker.wait().await;
        }
        // `drain` returns once queued: flush first so the last acks and frames leave.
        if let Err(err) = client.flush().await {
            tracing::warn!(%err, "cannot flush the NATS connection");
        }
        if let Err(err) = client.drain().await {
            tracing::warn!(%err, "cannot drain the NATS connection");
        }
        anyhow::Ok(())
    };
    let remaining = bound.saturating_sub(started.elapsed());
    match tokio::time::timeout(remaining, drained).await {
        Ok(outcome) => {
            outcome?;
            tracing::info!("worker stopped");
            Ok(())
        }
        Err(_) => {
            let running = weak_engine
                .upgrade()
                .map(|e| e.in_flight_ids())
                .unwrap_or_default();
            let unstored = tracker.map_or(0, |t| t.len());
            if running.is_empty() && unstored == 0 {
                tracing::warn!(
                    shutdown_timeout = ?bound,
                    "stop bound reached with every request handed back; the connection could not be flushed (is the broker gone?)"
                );
                return Ok(());
            }
            tracing::error!(
                shutdown_timeout = ?bound,
                in_flight = running.len(),
                requests = ?running,
                durable_tasks_left = unstored,
                "stop bound reached: these requests were not handed back; durable ones are redelivered to another worker after the ack wait, core callers get no reply"
            );
            Err(anyhow::anyhow!(
                "stopped after {bound:?} with {} request(s) in flight and {unstored} result write(s) or ack(s) not done",
                running.len()
            ))
        }
    }
}

/// The JetStream side (streams, the results bucket, the registry bucket), on a broker
/// already known to run JetStream for this account. A JetStream that answers with errors is
/// tried again every second for [`JETSTREAM_PATIENCE`] (said once at warning level), then
/// given up on: the error is returned for the caller to refuse the broker with.
/// The durable intake and the registry bucket it shares with the other workers.
type DurableSide = (Arc<Durable>, async_nats::jetstream::kv::Store);

async fn setup_durable(
    js: async_nats::jetstream::Context,
    client: &async_nats::Client,
    owner: &str,
    retention: std::time::Duration,
    replicas: durable::Replicas,
    ack_wait: std::time::Duration,
) -> Result<DurableSide, String> {
    let deadline = std::time::Instant::now() + JETSTREAM_PATIENCE;
    let mut warned = false;
    loop {
        let attempt = async {
            let kv = durable::ensure(&js, retention, replicas).await?;
            let store = registry::ensure(&js).await?;
            Ok::<_, durable::DurableError>((kv, store))
        };
        match attempt.await {
            Ok((kv, store)) => {
                return Ok((
                    Durable::new(js, client.clone(), kv, owner.to_string(), ack_wait),
                    store,
                ));
            }
            Err(err) if std::time::Instant::now() >= deadline => return Err(err.to_string()),
            Err(err) => {
                if !warned {
                    tracing::warn!(
                        %err,
                        "JetStream not ready; retrying every 1 s for up to {} s",
                        JETSTREAM_PATIENCE.as_secs()
                    );
                    warned = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }
}

/// Says why the broker cannot serve (one ERROR line) and makes it the worker's error.
fn refuse(why: Incompatible) -> anyhow::Error {
    tracing::error!("{why}");
    anyhow::Error::new(why)
}

/// `--ready-file`: written (atomically) once the worker serves, removed when it stops or
/// fails. A stale one is removed at start.
struct ReadyFile {
    path: Option<std::path::PathBuf>,
    written: bool,
}

impl ReadyFile {
    fn new(path: Option<std::path::PathBuf>) -> anyhow::Result<Self> {
        if let Some(path) = &path {
            match std::fs::remove_file(path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed a stale ready file"),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => anyhow::bail!(
                    "cannot remove the stale ready file {}: {err}; check the path given to --ready-file",
                    path.display()
                ),
            }
        }
        Ok(Self {
            path,
            written: false,
        })
    }

    fn write(&mut self, content: &serde_json::Value) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let partial = std::path::PathBuf::from(partial);
        std::fs::write(&partial, format!("{content}\n"))
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| {
                format!(
                    "cannot write the ready file {}; check that its directory exists and is writable",
                    path.display()
                )
            })?;
        self.written = true;
        tracing::info!(path = %path.display(), "ready file written");
        Ok(())
    }

    fn remove(&mut self) {
        if let (Some(path), true) = (&self.path, self.written) {
            if let Err(err) = std::fs::remove_file(path) {
                tracing::warn!(%err, path = %path.display(), "cannot remove the ready file");
            }
            self.written = false;
        }
    }
}

impl Drop for ReadyFile {
    fn drop(&mut self) {
        self.remove();
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

fn endpoint(name: &str, subject: String, workspace: Option<&str>) -> EndpointInfo {
    EndpointInfo {
        name: name.to_string(),
        subject,
        queue_group: subjects::QUEUE_GROUP.to_string(),
        metadata: workspace
            .map(|w| HashMap::from([("workspace".to_string(), w.to_string())]))
            .unwrap_or_default(),
        durable: false,
    }
}

/// Hands one message to the engine under a span that continues the caller's trace.
fn admit(engine: &Arc<Engine>, message: async_nats::Message, endpoint: usize, bound: &Bound) {
    let span = tracing::info_span!("nats.receive", subject = %message.subject);
    trace::adopt(&span, message.headers.as_ref());
    let reply = CoreReply {
        subject: message.reply.map(|r| r.to_string()),
        endpoint,
        received: std::time::Instant::now(),
        scope: bound.workspace().map(str::to_string),
    };
    let hints = SubmitHints {
        bound: Some(bound.clone()),
        ..SubmitHints::default()
    };
    engine.submit_with(&message.payload, Some(ReplyTo::Core(reply)), &span, hints);
}
