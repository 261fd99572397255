//! `millracer worker`: serves its configured workspaces on the bus until SIGTERM/SIGINT,
//! then stops taking requests, answers the ones it has, and exits 0.
//!
//! What it says at the default log level, one line per change: `cannot reach nats://…:
//! <cause>; retrying every 2 s` while no broker answers (again when the cause changes,
//! else once a minute); `connected to nats-server <version> at <url>`; `worker ready:
//! serving …` once, with what it serves. A broker it cannot use (no JetStream, older than
//! nats-server 2.10, JetStream API refusals) is an ERROR naming the server's version and
//! what millracer needs, and the worker exits with [`EXIT_INCOMPATIBLE_BROKER`] before it
//! created anything there, unless `--core-only` (core request/reply only). `--ready-file`
//! is written once ready and removed on stop, for service managers.

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
use crate::bus::nats::{self, NatsReply};
use crate::bus::subjects;
use crate::bus::trace;
use crate::engine::frames::ReplyTo;
use crate::engine::service::{Engine, EngineOptions, SubmitHints};
use crate::millrace::sessions::SessionStore;

/// The exit code of a worker whose broker cannot serve durable intake (no JetStream, a
/// nats-server older than 2.10, JetStream API refusals) and that was not told
/// `--core-only`. Configuration errors exit 1.
pub const EXIT_INCOMPATIBLE_BROKER: u8 = 3;

/// How long a JetStream that answers with errors (still starting, a broker restarting) is
/// waited for before the worker gives up on it.
const JETSTREAM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(mut args: WorkerArgs) -> anyhow::Result<()> {
    let file = args.config.as_deref().map(ConfigFile::load).transpose()?;
    let registry = build_registry(&args.workspaces, file.as_ref(), &args.common.millrace_mode)?;
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
            subjects::request_by_path(&record.root),
            Some(&record.id),
        ));
        tracing::info!(workspace = %record.id, root = %record.root.display(), "serving workspace");
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
    let bindings = durable::bindings(
        registry
            .records()
            .map(|r| (r.id.as_str(), r.root.as_path())),
        ack_wait,
    );
    let retention = std::time::Duration::from_secs(args.result_retention_seconds);
    let served: Vec<String> = registry.records().map(|r| r.id.clone()).collect();
    // A ready file left by a worker that crashed must not say "ready" for this one.
    let mut ready_file = ReadyFile::new(args.ready_file.clone())?;
    let micro = Arc::new(Micro::new(
        endpoints,
        HashMap::from([(
            "workspaces".to_string(),
            registry
                .records()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>()
                .join(","),
        )]),
    ));
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
    let durable = if args.core_only {
        tracing::info!("--core-only: no durable intake, no results bucket");
        None
    } else {
        let js = async_nats::jetstream::new(client.clone());
        broker::check_account(&js, &info, &url, JETSTREAM_PATIENCE)
            .await
            .map_err(refuse)?;
        Some(
            setup_durable(js, &client, &micro.id, retention, ack_wait)
                .await
                .map_err(|message| {
                    refuse(Incompatible::JetStreamApi {
                        version: info.version.clone(),
                        url: url.clone(),
                        what: "durable intake".to_string(),
                        message,
                    })
                })?,
        )
    };
    let (engine, outbound) = Engine::new(Arc::new(service), options);
    let publisher = tokio::spawn(nats::publish_outbound(
        client.clone(),
        outbound,
        Some(micro.clone()),
        durable.clone(),
    ));

    let stop = CancellationToken::new();
    let durable_task = durable.clone().map(|durable| {
        let serving = durable.serve(
            engine.clone(),
            bindings,
            args.max_request_bytes,
            stop.clone(),
        );
        tokio::spawn(async move {
            let outcome = serving.await;
            if let Err(err) = &outcome {
                // Said at once: core request/reply keeps serving meanwhile.
                tracing::error!(%err, "durable intake stopped; serving core request/reply only");
            }
            outcome
        })
    });
    let receivers = TaskTracker::new();
    for (index, info) in micro.endpoints().iter().enumerate() {
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
    tracing::info!(
        in_flight = engine.in_flight(),
        "stopping: no new requests; finishing those in flight"
    );
    stop.cancel();
    receivers.close();
    receivers.wait().await;
    if let Some(task) = durable_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {}
            Err(err) => tracing::error!(%err, "durable intake task failed"),
        }
    }
    micro_stop.cancel();
    let _ = micro_task.await;
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
    tracing::info!("worker stopped");
    Ok(())
}

/// The JetStream side (streams, the results bucket), on a broker already known to run
/// JetStream for this account. A JetStream that answers with errors is tried again every
/// second for [`JETSTREAM_PATIENCE`] (said once at warning level), then given up on: the
/// error is returned for the caller to refuse the broker with.
async fn setup_durable(
    js: async_nats::jetstream::Context,
    client: &async_nats::Client,
    owner: &str,
    retention: std::time::Duration,
    ack_wait: std::time::Duration,
) -> Result<Arc<Durable>, String> {
    let deadline = std::time::Instant::now() + JETSTREAM_PATIENCE;
    let mut warned = false;
    loop {
        match durable::ensure(&js, retention).await {
            Ok(kv) => {
                return Ok(Durable::new(
                    js,
                    client.clone(),
                    kv,
                    owner.to_string(),
                    ack_wait,
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
    }
}

/// Hands one message to the engine under a span that continues the caller's trace.
fn admit(engine: &Arc<Engine>, message: async_nats::Message, endpoint: usize, bound: &Bound) {
    let span = tracing::info_span!("nats.receive", subject = %message.subject);
    trace::adopt(&span, message.headers.as_ref());
    let reply = NatsReply {
        subject: message.reply.map(|r| r.to_string()),
        endpoint,
        received: std::time::Instant::now(),
    };
    let hints = SubmitHints {
        bound: Some(bound.clone()),
        ..SubmitHints::default()
    };
    engine.submit_with(&message.payload, Some(ReplyTo::new(reply)), &span, hints);
}
