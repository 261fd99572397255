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
use backon::Retryable;
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
use crate::millrace::workspace::Registry;

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

/// The worker's life, as the steps a reader can name: read its configuration, connect to
/// a broker it can use, start the durable side (registry claim, consumers), start the
/// engine and serve the core endpoints, say it is ready, and on a signal stop within the
/// bound. A signal during start-up (a broker that never answers, JetStream still electing
/// its leader) stops the worker at once: it has taken no request yet.
pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let Configuration {
        mut setup,
        service,
        options,
    } = load_configuration(args)?;
    let mut signals = Signals::listen()?;
    let startup = async {
        let (client, info) = connect_and_check_broker(&setup).await?;
        let mut durability = start_durable_side(&mut setup, &client, &info).await?;
        let mut running = start_engine(service, options, &setup, &client, &mut durability);
        serve_core_endpoints(&client, &setup.micro, &mut running).await?;
        ready(&mut setup, &info, durability.durable.is_some())?;
        Ok::<_, anyhow::Error>((client, durability, running))
    };
    let started = tokio::select! {
        started = startup => Some(started?),
        signal = signals.recv() => {
            tracing::info!("{signal} received before the worker was ready; worker stopped (no request was taken)");
            None
        }
    };
    let Some((client, durability, running)) = started else {
        setup.ready_file.remove();
        return Ok(());
    };
    let signal = signals.recv().await;
    tracing::info!("{signal} received");
    stop_within_bound(setup, client, durability, running).await
}

/// Who this worker is: the configuration file, the host id, the workspaces it serves and
/// where the broker is.
struct Identity {
    file: Option<ConfigFile>,
    host: String,
    registry: Registry,
    url: String,
    /// A workspace's identity on the bus: its host id and canonical path.
    fingerprints: HashMap<String, String>,
}

impl Identity {
    fn fingerprint(&self, id: &str) -> String {
        self.fingerprints.get(id).cloned().unwrap_or_default()
    }
}

/// Reads the configuration file and the flags (a flag wins over the file) into the
/// worker's identity; fills the NATS credentials and inbox prefix from the file when no
/// flag gave them.
fn identity(args: &mut WorkerArgs) -> anyhow::Result<Identity> {
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
    let fingerprints: HashMap<String, String> = registry
        .records()
        .map(|r| (r.id.clone(), subjects::fingerprint(&host, &r.root)))
        .collect();
    Ok(Identity {
        file,
        host,
        registry,
        url,
        fingerprints,
    })
}

/// What the worker serves and how, all settled before it touches the broker.
struct Setup {
    args: WorkerArgs,
    host: String,
    url: String,
    /// The `$SRV` service: every endpoint, core and durable.
    micro: Arc<Micro>,
    /// The durable consumers to bind (none with `--core-only`).
    bindings: Vec<durable::Binding>,
    ack_wait: std::time::Duration,
    retention: std::time::Duration,
    replicas: durable::Replicas,
    /// The served workspace ids, for the ready line and file.
    served: Vec<String>,
    /// Named in a collision found on the consumers (the other side is not in the registry).
    served_here: String,
    /// This worker's entries in the bus's registry (claimed on the durable side).
    registry_entries: Vec<RegistryEntry>,
    ready_file: ReadyFile,
    /// The bus's registry as other workers publish it (none with `--core-only`).
    directory: Option<Arc<Directory>>,
}

/// The worker's setup and what its engine is built from.
struct Configuration {
    setup: Setup,
    service: Service,
    options: EngineOptions,
}

/// Everything from flags and the configuration file, checked before anything is
/// connected: a bad configuration exits 1 without touching the broker. A ready file left
/// by a worker that crashed is removed here, so it cannot say "ready" for this one.
fn load_configuration(mut args: WorkerArgs) -> anyhow::Result<Configuration> {
    let identity = identity(&mut args)?;
    let registry = &identity.registry;
    let host = &identity.host;
    let (endpoints, bindings, ack_wait) = plan_endpoints(&identity, &args);
    let retention = std::time::Duration::from_secs(args.result_retention_seconds);
    let replicas = durable::Replicas {
        wanted: args
            .stream_replicas
            .or_else(|| identity.file.as_ref().and_then(|f| f.nats.stream_replicas))
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
    let ready_file = ReadyFile::new(args.ready_file.clone())?;
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
            fingerprint: identity.fingerprint(&r.id),
            host: host.clone(),
            root_path: r.root.display().to_string(),
            worker_id: micro.id.clone(),
            worker_name: format!("{host}/{}", std::process::id()),
            version: micro.version.clone(),
            at: String::new(),
        })
        .collect();
    let pi = pi_runner(&args, identity.file.as_ref(), registry)?;
    let directory = (!args.core_only).then(|| Arc::new(Directory::default()));
    let Identity {
        host,
        registry,
        url,
        ..
    } = identity;
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
    Ok(Configuration {
        setup: Setup {
            args,
            host,
            url,
            micro,
            bindings,
            ack_wait,
            retention,
            replicas,
            served,
            served_here,
            registry_entries,
            ready_file,
            directory,
        },
        service,
        options,
    })
}

/// One endpoint per subject: any worker, each workspace by id and by path, and (unless
/// `--core-only`) each durable consumer, so `$SRV.STATS` counts durable requests too.
/// Returns the endpoints, the durable bindings (each naming its endpoint) and the ack wait
/// they were made with. A workspace not initialised yet is served anyway, with a warning.
fn plan_endpoints(
    identity: &Identity,
    args: &WorkerArgs,
) -> (
    Vec<EndpointInfo>,
    Vec<durable::Binding>,
    std::time::Duration,
) {
    let Identity { registry, host, .. } = identity;
    let mut endpoints = vec![endpoint("any", subjects::request_any(), None)];
    for record in registry.records() {
        endpoints.push(endpoint(
            &format!("ws-{}", record.id),
            subjects::request_by_id(&record.id),
            Some(&record.id),
        ));
        endpoints.push(endpoint(
            &format!("path-{}", record.id),
            subjects::request_by_path(&identity.fingerprint(&record.id)),
            Some(&record.id),
        ));
        tracing::info!(workspace = %record.id, root = %record.root.display(), host = %host, fingerprint = %identity.fingerprint(&record.id), "serving workspace");
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
                .map(|r| (r.id.as_str(), identity.fingerprints[&r.id].as_str())),
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
    (endpoints, bindings, ack_wait)
}

/// The pi runner, when `--pi-runner` or the file's `[pi]` enables it: its sessions start
/// in the default workspace unless configured otherwise.
fn pi_runner(
    args: &WorkerArgs,
    file: Option<&ConfigFile>,
    registry: &Registry,
) -> anyhow::Result<Option<crate::agent::pi::PiRunner>> {
    if !(args.pi_runner || file.is_some_and(|f| f.pi.enabled)) {
        return Ok(None);
    }
    let default_root = registry.default_record().map(|r| r.root.clone());
    let base = args
        .common
        .pi_config(crate::agent::pi::SessionKind::Rpc, default_root.as_deref())?;
    let config = match file {
        Some(file) => file.pi.apply(base, default_root.as_deref())?,
        None => base,
    };
    tracing::info!(command = %config.command, kind = ?config.kind, "pi runner configured");
    Ok(Some(crate::agent::pi::PiRunner::new(config)))
}

/// Connects (retrying while no broker answers) and checks the server before anything is
/// created on it: a broker the worker cannot use is refused with one ERROR line.
async fn connect_and_check_broker(
    setup: &Setup,
) -> anyhow::Result<(async_nats::Client, async_nats::ServerInfo)> {
    let url = &setup.url;
    tracing::info!(%url, "connecting to the broker");
    let client =
        nats::connect_patiently(&setup.args.nats.credentials(), url, "millracer-worker").await?;
    let info = client.server_info();
    tracing::info!(
        version = %info.version,
        jetstream = info.jetstream,
        "connected to nats-server {} at {url}",
        info.version
    );
    // Checked before anything is created on the broker.
    broker::check_server(&info, url, setup.args.core_only).map_err(refuse)?;
    Ok((client, info))
}

/// The durable side as started: nothing of it with `--core-only`.
struct Durability {
    durable: Option<Arc<Durable>>,
    /// This worker's claim in the bus's registry, kept alive until it stops.
    registration: Option<Arc<Registration>>,
    /// The bound consumers, handed to durable intake when the engine starts.
    consumers: Vec<durable::BoundConsumer>,
    /// Stops keeping the claim and following the registry.
    registry_stop: CancellationToken,
}

/// The durable side, the registry and the consumers: all or nothing, unless the operator
/// asked for core request/reply only. The account's JetStream is checked first, then the
/// streams and buckets are made, the workspaces claimed in the registry (a collision exits
/// 2) and the consumers bound (a collision there withdraws the claim and exits 2).
async fn start_durable_side(
    setup: &mut Setup,
    client: &async_nats::Client,
    info: &async_nats::ServerInfo,
) -> anyhow::Result<Durability> {
    let registry_stop = CancellationToken::new();
    if setup.args.core_only {
        tracing::warn!(
            "--core-only: no durable intake, no results bucket, not in the bus's registry"
        );
        return Ok(Durability {
            durable: None,
            registration: None,
            consumers: Vec::new(),
            registry_stop,
        });
    }
    let url = &setup.url;
    let micro = &setup.micro;
    let js = async_nats::jetstream::new(client.clone());
    broker::check_account(&js, info, url, JETSTREAM_PATIENCE)
        .await
        .map_err(refuse)?;
    let (durable, store) = setup_durable(
        js,
        client,
        &micro.id,
        setup.retention,
        setup.replicas,
        setup.ack_wait,
        std::time::Duration::from_secs(setup.args.read_result_keep_seconds),
    )
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
        std::mem::take(&mut setup.registry_entries),
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
    let consumers = match durable.bind(std::mem::take(&mut setup.bindings)).await {
        Ok(bound) => bound,
        Err(err) => {
            claim.delete_all().await;
            if err.is_collision() {
                return Err(Refusal::collision(format!(
                    "workspace collision: {err} (this worker serves {})",
                    setup.served_here
                )));
            }
            return Err(anyhow::Error::new(err).context(
                "durable intake cannot start (for a broker without JetStream, pass --core-only)",
            ));
        }
    };
    tokio::spawn(claim.clone().keep(registry_stop.clone()));
    if let Some(directory) = &setup.directory {
        tokio::spawn(registry::follow(
            store,
            directory.clone(),
            registry_stop.clone(),
        ));
    }
    Ok(Durability {
        durable: Some(durable),
        registration: Some(claim),
        consumers,
        registry_stop,
    })
}

/// The worker's running parts, held until it stops.
struct Running {
    engine: Arc<Engine>,
    /// Sends the engine's frames, results and acks.
    publisher: tokio::task::JoinHandle<()>,
    /// Stops taking requests (core receivers, durable pullers, cancel listeners).
    stop: CancellationToken,
    cancel_task: tokio::task::JoinHandle<()>,
    durable_task: Option<tokio::task::JoinHandle<()>>,
    /// One receiver per core endpoint.
    receivers: TaskTracker,
    /// The `$SRV` responder, stopped last so the service stays visible while draining.
    micro: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

/// The engine and what feeds and empties it: the publisher, the cancel listeners (cancels
/// reach requests other workers hold, and theirs reach ours) and durable intake.
fn start_engine(
    service: Service,
    options: EngineOptions,
    setup: &Setup,
    client: &async_nats::Client,
    durability: &mut Durability,
) -> Running {
    let micro = &setup.micro;
    let durable = &durability.durable;
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
    let consumers = std::mem::take(&mut durability.consumers);
    let durable_task = durable.clone().map(|durable| {
        tokio::spawn(durable.serve(
            engine.clone(),
            consumers,
            setup.args.max_request_bytes,
            stop.clone(),
        ))
    });
    Running {
        engine,
        publisher,
        stop,
        cancel_task,
        durable_task,
        receivers: TaskTracker::new(),
        micro: None,
    }
}

/// A queue subscription per core endpoint, each handing its messages to the engine until
/// the stop, then draining what the server already handed over; then the `$SRV` responder.
/// Returns once the broker has every subscription (a flush).
async fn serve_core_endpoints(
    client: &async_nats::Client,
    micro: &Arc<Micro>,
    running: &mut Running,
) -> anyhow::Result<()> {
    for (index, info) in micro.endpoints().iter().enumerate() {
        if info.durable {
            continue;
        }
        let mut subscriber = client
            .queue_subscribe(info.subject.clone(), info.queue_group.clone())
            .await
            .with_context(|| format!("cannot subscribe to {}", info.subject))?;
        let engine = running.engine.clone();
        let stop = running.stop.clone();
        // The workspace this endpoint's subject binds (none: `req.any`).
        let bound = match info.metadata.get("workspace") {
            Some(id) => Bound::Workspace(id.clone()),
            None => Bound::Any,
        };
        running.receivers.spawn(async move {
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
    running.micro = Some((micro_stop, micro_task));
    client.flush().await.context("cannot reach NATS")?;
    confirm_subscriptions(client, micro).await;
    Ok(())
}

/// A flush only writes the subscriptions out. This worker's own `$SRV.PING`, answered
/// through the broker, proves the broker has every one of them (it handles a connection's
/// messages in order, and the endpoints were subscribed first), so "ready" is true when it
/// is said: a caller that sends at once is not told "no responders".
async fn confirm_subscriptions(client: &async_nats::Client, micro: &Arc<Micro>) {
    let subject = micro.own_ping_subject();
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(5);
    let mut said = false;
    loop {
        if !said && started.elapsed() >= std::time::Duration::from_secs(1) {
            said = true;
            tracing::info!(
                subject,
                "waiting (at most 5 s) for the broker to answer this worker's own $SRV.PING before saying ready"
            );
        }
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            client.request(subject.clone(), bytes::Bytes::new()),
        )
        .await;
        match answer {
            Ok(Ok(_)) => return,
            _ if std::time::Instant::now() >= deadline => {
                tracing::warn!(
                    subject,
                    "the broker did not answer this worker's own $SRV.PING within 5 s; saying ready anyway"
                );
                return;
            }
            // The `$SRV` responder subscribes in its own task: not there yet.
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// Says once, at INFO, what the worker serves and where, and writes `--ready-file`.
fn ready(setup: &mut Setup, info: &async_nats::ServerInfo, durable: bool) -> anyhow::Result<()> {
    let Setup {
        url,
        host,
        micro,
        served,
        ..
    } = &*setup;
    let subjects: Vec<&str> = micro
        .endpoints()
        .iter()
        .filter(|e| !e.durable)
        .map(|e| e.subject.as_str())
        .collect();
    let serves = if durable {
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
        durable,
        "worker ready: serving workspaces [{}] on {url} (nats-server {}): {serves}",
        served.join(", "),
        info.version,
    );
    let content = serde_json::json!({
        "pid": std::process::id(),
        "url": url,
        "server_version": info.version,
        "workspaces": served,
        "durable": durable,
        "service_id": micro.id,
    });
    setup.ready_file.write(&content)
}

/// Stops within `--shutdown-timeout`: not ready any more, out of the registry, no new
/// requests; those in flight are answered, results stored and acked, the connection
/// flushed and drained. Requests still in flight at the bound make the exit an error.
async fn stop_within_bound(
    mut setup: Setup,
    client: async_nats::Client,
    durability: Durability,
    running: Running,
) -> anyhow::Result<()> {
    let Durability {
        durable,
        registration,
        registry_stop,
        ..
    } = durability;
    let Running {
        engine,
        publisher,
        stop,
        cancel_task,
        durable_task,
        receivers,
        micro,
    } = running;
    // Not ready any more: a service manager sees it before the drain ends.
    setup.ready_file.remove();
    let bound = crate::app::cli::secs(setup.args.shutdown_timeout_seconds);
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
        if let Some((micro_stop, micro_task)) = micro {
            micro_stop.cancel();
            let _ = micro_task.await;
        }
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
    read_keep: std::time::Duration,
) -> Result<DurableSide, String> {
    let mut warned = false;
    let attempt = || async {
        let kv = durable::ensure(&js, retention, replicas).await?;
        let store = registry::ensure(&js).await?;
        Ok::<_, durable::DurableError>((kv, store))
    };
    let (kv, store) = attempt
        .retry(crate::bus::retry::patiently(Some(JETSTREAM_PATIENCE)))
        .notify(|err, _| {
            if !std::mem::replace(&mut warned, true) {
                tracing::warn!(
                    %err,
                    "JetStream not ready; retrying for up to {} s",
                    JETSTREAM_PATIENCE.as_secs()
                );
            }
        })
        .await
        .map_err(|err| err.to_string())?;
    Ok((
        Durable::new(
            js,
            client.clone(),
            kv,
            owner.to_string(),
            ack_wait,
            read_keep,
        ),
        store,
    ))
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

/// SIGTERM and SIGINT, listened for from the start so that neither kills the worker
/// without its stop (the default action would end it mid-write).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn listen() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    /// The next of the two, by name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
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
