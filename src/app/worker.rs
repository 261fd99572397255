//! `millracer worker`: serves its configured workspaces on the bus until SIGTERM/SIGINT,
//! then stops taking requests, answers the ones it has, and exits 0.

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
use crate::bus::durable::{self, Durable};
use crate::bus::micro::{self, EndpointInfo, Micro};
use crate::bus::nats::{self, NatsReply, Patience};
use crate::bus::subjects;
use crate::bus::trace;
use crate::engine::frames::ReplyTo;
use crate::engine::service::{Engine, EngineOptions, SubmitHints};
use crate::millrace::sessions::SessionStore;

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
        cancels: Default::default(),
    };
    let options = EngineOptions {
        max_request_bytes: args.max_request_bytes,
        result_ttl: std::time::Duration::from_secs(args.result_ttl_seconds),
        result_capacity: args.result_capacity,
    };

    let client = nats::connect(
        &args.nats.credentials(),
        &url,
        "millracer-worker",
        Patience::Retry,
    )
    .await?;
    let (engine, outbound) = Engine::new(Arc::new(service), options);
    let durable = setup_durable(&client, &micro.id, retention, ack_wait).await;
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
    tracing::info!(url = %url, ?subjects, queue_group = subjects::QUEUE_GROUP, service = micro::SERVICE_NAME, id = %micro.id, "worker ready");

    wait_for_signal().await?;
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
    tracing::info!("worker stopped");
    Ok(())
}

/// The JetStream side (streams, consumers' bucket), or `None` when the broker has no
/// JetStream: core request/reply keeps working either way. A worker started before its
/// broker keeps trying for a while.
async fn setup_durable(
    client: &async_nats::Client,
    owner: &str,
    retention: std::time::Duration,
    ack_wait: std::time::Duration,
) -> Option<Arc<Durable>> {
    let js = async_nats::jetstream::new(client.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match durable::ensure(&js, retention).await {
            Ok(kv) => {
                return Some(Durable::new(
                    js,
                    client.clone(),
                    kv,
                    owner.to_string(),
                    ack_wait,
                ));
            }
            Err(err)
                if std::time::Instant::now() >= deadline
                    || (jetstream_absent(&err.to_string())
                        && client.connection_state()
                            == async_nats::connection::State::Connected) =>
            {
                tracing::warn!(%err, "no durable intake: serving core request/reply only");
                return None;
            }
            Err(err) => {
                tracing::debug!(%err, "JetStream not ready; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
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

/// A broker without JetStream answers its API with "no responders" (or says it is not
/// enabled) at once: no point in waiting for it, core request/reply serves on.
fn jetstream_absent(error: &str) -> bool {
    let error = error.to_ascii_lowercase();
    error.contains("jetstream unavailable")
        || error.contains("no responders")
        || error.contains("not enabled")
}
