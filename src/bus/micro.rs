//! The NATS micro service protocol (`$SRV.PING|INFO|STATS`), so `nats micro ls` and other
//! standard tooling find and describe a worker.
//!
//! Written here rather than with `async_nats::service` on purpose: that crate's endpoints
//! own their subscriptions and answer through `Request::respond`, while a worker must
//! drain its subscriptions on SIGTERM (so no request the server already routed is lost)
//! and answers later, from lanes, to every caller of a repeated request_id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use serde_json::{Value, json};

/// The service name tooling shows.
pub const SERVICE_NAME: &str = "millracer";

/// One request endpoint of the worker: a core subject it subscribes to, or a durable
/// consumer it pulls from (listed and counted the same way, so `$SRV.STATS` counts every
/// request the worker handles).
#[derive(Debug, Clone)]
pub struct EndpointInfo {
    pub name: String,
    pub subject: String,
    /// The queue group (core), or the durable consumer's name.
    pub queue_group: String,
    pub metadata: HashMap<String, String>,
    /// Pulled from the jobs stream rather than subscribed to.
    pub durable: bool,
}

#[derive(Debug, Default, Clone)]
struct EndpointStats {
    requests: u64,
    errors: u64,
    last_error: String,
    processing: Duration,
}

/// Identity, endpoints and per-endpoint counts of one worker instance.
#[derive(Debug)]
pub struct Micro {
    pub id: String,
    pub version: String,
    started: String,
    endpoints: Vec<EndpointInfo>,
    stats: Mutex<Vec<EndpointStats>>,
    metadata: HashMap<String, String>,
}

impl Micro {
    pub fn new(endpoints: Vec<EndpointInfo>, metadata: HashMap<String, String>) -> Self {
        let stats = vec![EndpointStats::default(); endpoints.len()];
        Self {
            id: uuid::Uuid::new_v4().simple().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            endpoints,
            stats: Mutex::new(stats),
            metadata,
        }
    }

    pub fn endpoints(&self) -> &[EndpointInfo] {
        &self.endpoints
    }

    /// Counts one answered request on an endpoint; `error` is `code: message` of a
    /// failed result.
    pub fn record(&self, endpoint: usize, elapsed: Duration, error: Option<String>) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stats.get_mut(endpoint) {
            s.requests += 1;
            s.processing += elapsed;
            if let Some(error) = error {
                s.errors += 1;
                s.last_error = error;
            }
        }
    }

    fn base(&self, kind: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "type".into(),
            json!(format!("io.nats.micro.v1.{kind}_response")),
        );
        m.insert("name".into(), json!(SERVICE_NAME));
        m.insert("id".into(), json!(self.id));
        m.insert("version".into(), json!(self.version));
        m.insert("metadata".into(), json!(self.metadata));
        m
    }

    fn ping(&self) -> Value {
        Value::Object(self.base("ping"))
    }

    fn info(&self) -> Value {
        let mut m = self.base("info");
        m.insert(
            "description".into(),
            json!("Runs millracer.ops.v0.2 requests against local Millrace workspaces"),
        );
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|e| json!({"name": e.name, "subject": e.subject, "queue_group": e.queue_group, "metadata": e.metadata}))
            .collect();
        m.insert("endpoints".into(), json!(endpoints));
        Value::Object(m)
    }

    fn stats(&self) -> Value {
        let mut m = self.base("stats");
        m.insert("started".into(), json!(self.started));
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .zip(stats)
            .map(|(e, s)| {
                let total = s.processing.as_nanos() as u64;
                let average = total.checked_div(s.requests).unwrap_or(0);
                json!({
                    "name": e.name, "subject": e.subject, "queue_group": e.queue_group,
                    "num_requests": s.requests, "num_errors": s.errors, "last_error": s.last_error,
                    "processing_time": total, "average_processing_time": average, "data": Value::Null,
                })
            })
            .collect();
        m.insert("endpoints".into(), json!(endpoints));
        Value::Object(m)
    }

    /// This worker's own `$SRV.PING` subject (answered by this worker alone).
    pub fn own_ping_subject(&self) -> String {
        format!("$SRV.PING.{SERVICE_NAME}.{}", self.id)
    }

    /// Answers `$SRV.<VERB>`, `$SRV.<VERB>.millracer` and `$SRV.<VERB>.millracer.<id>`
    /// until the connection closes or `stop` fires.
    pub async fn serve(
        self: std::sync::Arc<Self>,
        client: Client,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut subs = Vec::new();
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{SERVICE_NAME}"),
                format!("$SRV.{verb}.{SERVICE_NAME}.{}", self.id),
            ] {
                match client.subscribe(subject.clone()).await {
                    Ok(sub) => subs.push(sub.map(move |m| (verb, m))),
                    Err(err) => tracing::warn!(%err, subject, "cannot subscribe to a $SRV subject"),
                }
            }
        }
        let mut all = futures::stream::select_all(subs);
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => break,
                next = all.next() => next,
            };
            let Some((verb, message)) = next else { break };
            let Some(reply) = message.reply else { continue };
            let body = match verb {
                "PING" => self.ping(),
                "INFO" => self.info(),
                _ => self.stats(),
            };
            if let Err(err) = client.publish(reply, body.to_string().into()).await {
                tracing::debug!(%err, "cannot answer a $SRV request");
            }
        }
    }
}
