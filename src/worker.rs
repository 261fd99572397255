//! `millracer worker`: serves its configured workspaces on the bus until SIGTERM/SIGINT,
//! then stops taking requests, answers the ones it has, and exits 0.

use std::sync::Arc;

use anyhow::Context as _;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::WorkerArgs;
use crate::config::{ConfigFile, build_registry};
use crate::dispatch::{Service, Serving};
use crate::engine::{Engine, EngineOptions};
use crate::sessions::SessionStore;
use crate::subjects;
use crate::transport::nats::{self, Patience};

pub async fn run(mut args: WorkerArgs) -> anyhow::Result<()> {
    let file = args.config.as_deref().map(ConfigFile::load).transpose()?;
    let registry = build_registry(&args.workspaces, file.as_ref(), &args.common.millrace_mode)?;
    if args.nats.nats_creds.is_none() {
        args.nats.nats_creds = file.as_ref().and_then(|f| f.nats.creds.clone());
    }
    let url = nats::url(
        &args.nats,
        file.as_ref().and_then(|f| f.nats.url.as_deref()),
    );

    let mut request_subjects = vec![subjects::request_any()];
    for record in registry.records() {
        request_subjects.push(subjects::request_by_id(&record.id));
        request_subjects.push(subjects::request_by_path(&record.root));
        tracing::info!(workspace = %record.id, root = %record.root.display(), "serving workspace");
    }
    let pi = if args.pi_runner || file.as_ref().is_some_and(|f| f.pi.enabled) {
        let default_root = registry.default_record().map(|r| r.root.clone());
        let base = args
            .common
            .pi_config(crate::pi::SessionKind::Rpc, default_root.as_deref())?;
        let config = match &file {
            Some(file) => file.pi.apply(base, default_root.as_deref())?,
            None => base,
        };
        tracing::info!(command = %config.command, kind = ?config.kind, "pi runner configured");
        Some(crate::pi::PiRunner::new(config))
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
        status_cache: Some(crate::status_cache::StatusCache::new(crate::cli::secs(
            args.status_max_age_seconds,
        ))),
    };
    let options = EngineOptions {
        max_request_bytes: args.max_request_bytes,
        result_ttl: std::time::Duration::from_secs(args.result_ttl_seconds),
        result_capacity: args.result_capacity,
    };

    let client = nats::connect(&args.nats, &url, "millracer-worker", Patience::Retry).await?;
    let (engine, outbound) = Engine::new(Arc::new(service), options);
    let publisher = tokio::spawn(nats::publish_outbound(client.clone(), outbound));

    let stop = CancellationToken::new();
    let receivers = TaskTracker::new();
    for subject in &request_subjects {
        let mut subscriber = client
            .queue_subscribe(subject.clone(), subjects::QUEUE_GROUP.to_string())
            .await
            .with_context(|| format!("cannot subscribe to {subject}"))?;
        let engine = engine.clone();
        let stop = stop.clone();
        receivers.spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    message = subscriber.next() => match message {
                        Some(message) => engine.submit(&message.payload, message.reply.map(|r| r.to_string())),
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
                engine.submit(&message.payload, message.reply.map(|r| r.to_string()));
            }
        });
    }
    client.flush().await.context("cannot reach NATS")?;
    tracing::info!(url = %url, subjects = ?request_subjects, queue_group = subjects::QUEUE_GROUP, "worker ready");

    wait_for_signal().await?;
    tracing::info!(
        in_flight = engine.in_flight(),
        "stopping: no new requests; finishing those in flight"
    );
    stop.cancel();
    receivers.close();
    receivers.wait().await;
    engine.shutdown().await;
    drop(engine);
    publisher.await.context("publisher task failed")?;
    if let Err(err) = client.drain().await {
        tracing::warn!(%err, "cannot drain the NATS connection");
    }
    tracing::info!("worker stopped");
    Ok(())
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
