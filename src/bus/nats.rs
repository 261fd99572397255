//! The NATS side: connecting with credentials, and publishing frames and results with
//! their headers. Subjects come from [`crate::bus::subjects`] only.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, HeaderMap, HeaderValue};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::bus::subjects;
use crate::contract::SCHEMA_VERSION;
use crate::engine::frames::{FrameOut, Outbound, ReplyTo};

/// The broker used when none is configured.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Where the broker is and how to authenticate: what the command line, the environment
/// or a configuration file said, as plain values (the bus knows nothing of clap).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub url: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds: Option<std::path::PathBuf>,
    /// A file holding an nkey seed.
    pub nkey: Option<std::path::PathBuf>,
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    pub tls_required: bool,
    /// The prefix of this role's reply inboxes (default `_INBOX`).
    pub inbox_prefix: Option<String>,
}

/// Why the bus could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials {path}: {source}")]
    Creds {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read the NATS nkey seed {path}: {message}")]
    Nkey { path: String, message: String },
    #[error(
        "invalid inbox prefix {0:?}: give dot-separated tokens of letters, digits, `_` and `-` (e.g. _INBOX_adapter_shop)"
    )]
    InboxPrefix(String),
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error(
        "invalid NATS server list {0:?}: give one URL or several separated by commas (e.g. nats://a:4222,nats://b:4222)"
    )]
    Servers(String),
}

/// How eagerly to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Fail fast: the bridge decides what to do without a bus.
    Once(Duration),
    /// Keep trying in the background (a worker started before its broker).
    Retry,
}

/// The URL to use: flag/env, else the config file's, else the default.
pub fn url(options: &Credentials, config_url: Option<&str>) -> String {
    options
        .url
        .clone()
        .or_else(|| config_url.map(str::to_string))
        .unwrap_or_else(|| DEFAULT_NATS_URL.to_string())
}

/// The servers of a URL list: one URL or several separated by commas, as the NATS tools
/// take them (`nats://a:4222,nats://b:4222`). Empty entries and unparsable URLs are
/// refused, so a typo never silently drops a server.
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, ConnectError> {
    let servers: Result<Vec<_>, _> = url
        .split(',')
        .map(str::trim)
        .map(|one| {
            if one.is_empty() {
                Err(ConnectError::Servers(url.to_string()))
            } else {
                one.parse::<async_nats::ServerAddr>()
                    .map_err(|_| ConnectError::Servers(url.to_string()))
            }
        })
        .collect();
    servers
}

/// Connects with the configured credentials. Reconnects are automatic and unlimited,
/// with jitter so a fleet of workers does not hammer a restarted broker in step.
///
/// `url` may list several servers (comma-separated). The client starts with a random one
/// of them, and also follows the servers the cluster advertises (async-nats adds those
/// from each server's INFO unless `ignore_discovered_servers` is set, and shuffles the list
/// unless `retain_servers_order` is set): we keep both defaults, so a worker given one
/// seed server of a cluster still moves to another member when its server dies, and a
/// fleet spreads over the cluster instead of piling onto the first URL.
pub async fn connect(
    options: &Credentials,
    url: &str,
    name: &str,
    patience: Patience,
) -> Result<Client, ConnectError> {
    let mut connect = ConnectOptions::new()
        .name(name)
        .reconnect_delay_callback(|attempts| {
            // async-nats asks before the very first dial too: that one must not wait.
            if attempts <= 1 {
                return Duration::ZERO;
            }
            let base = Duration::from_millis((100u64 << attempts.min(6) as u64).min(4_000));
            base + Duration::from_millis(jitter_ms(base.as_millis() as u64 / 2 + 1))
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    warn_limited("disconnected", "disconnected from NATS; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::SlowConsumer(_) => warn_limited(
                    "slow_consumer",
                    "slow consumer: NATS dropped messages for a subscription",
                ),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if let Some(path) = &options.creds {
        connect = connect
            .credentials_file(path)
            .await
            .map_err(|source| ConnectError::Creds {
                path: path.display().to_string(),
                source,
            })?;
    }
    if let (Some(user), Some(password)) = (&options.user, &options.password) {
        connect = connect.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &options.token {
        connect = connect.token(token.clone());
    }
    if let Some(path) = &options.nkey {
        let seed = std::fs::read_to_string(path).map_err(|e| ConnectError::Nkey {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let seed = seed.trim();
        if !seed.starts_with('S') {
            return Err(ConnectError::Nkey {
                path: path.display().to_string(),
                message: "the file holds no nkey seed (a seed starts with S)".to_string(),
            });
        }
        connect = connect.nkey(seed.to_string());
    }
    if let Some(ca) = &options.tls_ca {
        connect = connect.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&options.tls_cert, &options.tls_key) {
        connect = connect.add_client_certificate(cert.clone(), key.clone());
    }
    if options.tls_required {
        connect = connect.require_tls(true);
    }
    if let Some(prefix) = &options.inbox_prefix {
        if !valid_inbox_prefix(prefix) {
            return Err(ConnectError::InboxPrefix(prefix.clone()));
        }
        connect = connect.custom_inbox_prefix(prefix.clone());
    }
    let servers = server_addrs(url)?;
    connect = match patience {
        Patience::Once(timeout) => connect.connection_timeout(timeout),
        Patience::Retry => connect.retry_on_initial_connect(),
    };
    connect
        .connect(servers)
        .await
        .map_err(|e| ConnectError::Connect {
            url: url.to_string(),
            message: plain_cause(&e.to_string()),
        })
}

/// How often a worker tries again to reach a broker that does not answer.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// How long one attempt to reach the broker may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A failed attempt is said again at most this often while its cause stays the same.
const SAY_AGAIN_EVERY: Duration = Duration::from_secs(60);

/// Connects, trying again every [`RETRY_EVERY`] for as long as it takes (a worker started
/// before its broker). Says so at warning level: at once with the cause and the cadence
/// (`cannot reach nats://…: connection refused; retrying every 2 s`), again when the cause
/// changes, otherwise once a minute. Errors in the settings (credentials, inbox prefix)
/// are returned at once: no retry would fix them.
pub async fn connect_patiently(
    options: &Credentials,
    url: &str,
    name: &str,
) -> Result<Client, ConnectError> {
    let mut said: Option<(String, std::time::Instant)> = None;
    let mut failures = 0u64;
    loop {
        match connect(options, url, name, Patience::Once(ATTEMPT_TIMEOUT)).await {
            Ok(client) => {
                if failures > 0 {
                    tracing::info!(%url, failures, "reached the broker");
                }
                return Ok(client);
            }
            Err(ConnectError::Connect { message, .. }) => {
                failures += 1;
                let cause = message;
                let say = match &said {
                    Some((last, at)) => *last != cause || at.elapsed() >= SAY_AGAIN_EVERY,
                    None => true,
                };
                if say {
                    tracing::warn!(
                        failures,
                        "cannot reach {url}: {cause}; retrying every {} s",
                        RETRY_EVERY.as_secs()
                    );
                    said = Some((cause, std::time::Instant::now()));
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(other) => return Err(other),
        }
    }
}

/// `IO error: Connection refused (os error 111)` → `connection refused`.
fn plain_cause(message: &str) -> String {
    let mut text = message.trim();
    for prefix in ["IO error: ", "io error: ", "I/O error: "] {
        text = text.strip_prefix(prefix).unwrap_or(text);
    }
    let text = match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => &text[..at],
        _ => text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "no answer".to_string(),
    }
}

/// A literal subject prefix: no wildcards, no empty tokens, nothing a permission could
/// not name exactly.
fn valid_inbox_prefix(prefix: &str) -> bool {
    prefix.len() <= 128
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

fn jitter_ms(bound: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos % bound.max(1)
}

/// A header value, or `None` when the text cannot be one (CR/LF): callers' ids go
/// into headers, and a bad one must not panic the publisher.
fn header_value(text: &str) -> Option<HeaderValue> {
    text.parse::<HeaderValue>().ok()
}

/// The headers of every message about one request. `Millracer-Request-Id` is absent when
/// the request's id could not be read (the AsyncAPI document says so), rather than empty.
fn base_headers(request_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(subjects::HEADER_SCHEMA, SCHEMA_VERSION);
    if !request_id.trim().is_empty() {
        let value = header_value(request_id).unwrap_or_else(|| {
            header_value(&subjects::token(request_id)).unwrap_or_else(|| HeaderValue::from("-"))
        });
        headers.insert(subjects::HEADER_REQUEST_ID, value);
    }
    headers
}

fn add_trace(headers: &mut HeaderMap, trace: &crate::engine::frames::TraceContext) {
    for (key, value) in trace {
        if let Some(value) = header_value(value) {
            headers.insert(key.as_str(), value);
        }
    }
}

/// Delivers the engine's outbound messages in order until the engine is gone, then
/// flushes. One task, one connection: a request's frames, then its result, leave in
/// the order they were emitted.
pub async fn publish_outbound(
    client: Client,
    mut rx: UnboundedReceiver<Outbound>,
    micro: Option<std::sync::Arc<super::micro::Micro>>,
    durable: Option<std::sync::Arc<super::durable::Durable>>,
) {
    while let Some(message) = rx.recv().await {
        match message {
            Outbound::Frame(FrameOut {
                workspace,
                frame,
                trace,
            }) => {
                let subject = subjects::frames(workspace.as_deref(), &frame.request_id);
                let mut headers = base_headers(&frame.request_id);
                headers.insert(subjects::HEADER_EVENT_TYPE, frame.event_type.as_str());
                headers.insert(subjects::HEADER_SEQUENCE, frame.sequence.to_string());
                add_trace(&mut headers, &trace);
                let body = frame.to_json_line();
                if let Err(err) = client
                    .publish_with_headers(subject, headers, body.into())
                    .await
                {
                    tracing::warn!(%err, "cannot publish a frame");
                }
            }
            Outbound::Result {
                to,
                result,
                trace,
                last_sequence,
                ..
            } => {
                let body = bytes::Bytes::from(result.to_json_line());
                let error = result
                    .errors
                    .first()
                    .filter(|_| result.status == crate::contract::ResultStatus::Failed)
                    .map(|e| format!("{}: {}", e.code, e.message));
                let mut core_scope = None;
                for reply in to {
                    let reply = match reply {
                        ReplyTo::Core(reply) => reply,
                        ReplyTo::Durable(reply) => {
                            if let (Some(micro), Some((endpoint, elapsed))) =
                                (&micro, reply.stats())
                            {
                                micro.record(endpoint, elapsed, error.clone());
                            }
                            reply.settle(result.clone(), last_sequence);
                            continue;
                        }
                        ReplyTo::Local => continue,
                    };
                    if let Some(micro) = &micro {
                        micro.record(reply.endpoint, reply.received.elapsed(), error.clone());
                    }
                    core_scope.get_or_insert(reply.scope.clone());
                    let Some(subject) = reply.subject else {
                        continue;
                    };
                    let mut headers = base_headers(&result.request_id);
                    add_trace(&mut headers, &trace);
                    if let Some(last) = last_sequence {
                        headers.insert(subjects::HEADER_SEQUENCE, last.to_string());
                    }
                    if let Err(err) = client
                        .publish_with_headers(subject, headers, body.clone())
                        .await
                    {
                        tracing::warn!(%err, request_id = %result.request_id, "cannot publish a result");
                    }
                }
                // Core results of actions that change state are kept by request_id like
                // durable ones; a read's is not (see `Action::keeps_result`).
                if let (Some(durable), Some(scope)) = (&durable, core_scope)
                    && crate::actions::dispatch::Action::parse(&result.action).keeps_result()
                {
                    durable.store_core_result(scope, result.clone());
                }
            }
        }
    }
    if let Err(err) = client.flush().await {
        tracing::warn!(%err, "cannot flush NATS");
    }
}

/// Warns at most once per [`WARN_EVERY`] per kind, saying how many were held back, so a
/// flapping link or a flood of slow-consumer events cannot drown the log.
fn warn_limited(kind: &'static str, message: &'static str) {
    static SEEN: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<&'static str, (std::time::Instant, u64)>>,
    > = std::sync::LazyLock::new(Default::default);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    match seen.get_mut(kind) {
        Some((last, held)) if now.duration_since(*last) < WARN_EVERY => *held += 1,
        Some((last, held)) => {
            tracing::warn!(suppressed = *held, "{message}");
            *last = now;
            *held = 0;
        }
        None => {
            tracing::warn!("{message}");
            seen.insert(kind, (now, 0));
        }
    }
}

const WARN_EVERY: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_causes_read_plainly() {
        assert_eq!(
            plain_cause("IO error: Connection refused (os error 111)"),
            "connection refused"
        );
        assert_eq!(plain_cause("timed out"), "timed out");
        assert_eq!(plain_cause(""), "no answer");
    }

    #[test]
    fn server_lists_split_on_commas_and_refuse_empty_entries() {
        let one = server_addrs("nats://127.0.0.1:4222").expect("one");
        assert_eq!(one.len(), 1);
        let three = server_addrs("nats://a:1, nats://b:2,nats://c:3").expect("three");
        assert_eq!(three.len(), 3);
        assert_eq!(three[1].host(), "b");
        for bad in ["", "nats://a:1,", ",nats://a:1", "nats://a:1,,nats://b:2"] {
            assert!(
                matches!(server_addrs(bad), Err(ConnectError::Servers(_))),
                "{bad:?}"
            );
        }
    }
}
