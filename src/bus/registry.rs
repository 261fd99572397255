//! The registry of what the bus serves: the KV bucket `MILLRACER_WORKSPACES`, one entry
//! `<workspace id>.<worker id>` per live owner (see [`crate::contract::registry`]).
//!
//! Workers keep it: they refuse to start when a live owner serves their workspace id at
//! another path (or their path under another id), put their entries every
//! [`subjects::REGISTRY_REFRESH`] and delete them when they stop, and follow the whole
//! bucket so `list_workspaces` on `req.any` shows the bus's view. The bridge reads it
//! before it waits for a worker, so a request for a workspace nobody serves is answered
//! at once instead of waiting forever.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv, stream::StorageType};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::bus::durable::DurableError;
use crate::bus::subjects;
use crate::contract::registry::{Directory, EXPIRES_AFTER, LIVE_WITHIN, Owner, RegistryEntry};

/// How long a one-off read of the bucket may take.
const READ_PATIENCE: Duration = Duration::from_secs(2);

/// The registry bucket, created when missing (by workers; readers only open it).
pub async fn ensure(js: &jetstream::Context) -> Result<kv::Store, DurableError> {
    if let Ok(store) = js.get_key_value(subjects::REGISTRY_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: subjects::REGISTRY_BUCKET.to_string(),
        description: "millracer: the workspaces the bus serves and their live owners".to_string(),
        history: 1,
        max_age: subjects::REGISTRY_MAX_AGE,
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| DurableError::Setup {
        what: subjects::REGISTRY_BUCKET.to_string(),
        message: e.to_string(),
    })
}

/// The registry bucket's underlying stream.
const REGISTRY_STREAM: &str = "KV_MILLRACER_WORKSPACES";

/// Every owner in the bucket now whose key matches `filter` (`>` for all, `<workspace>.*`
/// for one workspace's owners; entries older than the bucket's `max_age` are left out
/// even if the server has not dropped them yet). An ordered consumer with a name, so the
/// filter is part of the create subject and a role can be allowed to read only its own
/// workspace's entries. `Ok(None)`: the bus has no registry.
pub async fn read(js: &jetstream::Context, filter: &str) -> Result<Option<Vec<Owner>>, String> {
    let read = async {
        let stream = match js.get_stream(REGISTRY_STREAM).await {
            Ok(stream) => stream,
            Err(err)
                if matches!(
                    err.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(e)
                        if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                return Ok(None);
            }
            Err(err) => return Err(err.to_string()),
        };
        let prefix = format!("$KV.{}.", subjects::REGISTRY_BUCKET);
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                name: Some(subjects::replay_consumer()),
                filter_subject: format!("{prefix}{filter}"),
                deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut owners = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(Some(owners));
        }
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            let info = message.info().map_err(|e| e.to_string())?;
            let (pending, published) = (info.pending, SystemTime::from(info.published));
            let removed = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE");
            let age = now.duration_since(published).unwrap_or_default();
            if !removed
                && age <= EXPIRES_AFTER
                && let Ok(entry) = serde_json::from_slice::<RegistryEntry>(&message.payload)
            {
                owners.push(Owner {
                    entry,
                    age,
                    live: age <= LIVE_WITHIN,
                });
            }
            if pending == 0 {
                break;
            }
        }
        Ok(Some(owners))
    };
    tokio::time::timeout(READ_PATIENCE, read)
        .await
        .map_err(|_| {
            format!(
                "the registry {} did not answer within {READ_PATIENCE:?}",
                subjects::REGISTRY_BUCKET
            )
        })?
}

/// Why a worker must not serve what it was configured to.
#[derive(Debug, thiserror::Error)]
#[error(
    "workspace collision: {mine} is already served on this bus as {theirs} (worker {worker}); the same workspace id must mean the same host and path. Give this workspace another id (--workspace ID=PATH), or stop the other worker"
)]
pub struct Collision {
    pub mine: String,
    pub theirs: String,
    pub worker: String,
}

fn describe(entry: &RegistryEntry) -> String {
    format!(
        "workspace {:?} at {}:{}",
        entry.workspace_id, entry.host, entry.root_path
    )
}

/// The first live owner that collides with one of `mine`: the same id at another
/// host/path, or the same host/path under another id. Entries of `worker_id` itself are
/// ignored.
pub fn collision(mine: &[RegistryEntry], owners: &[Owner], worker_id: &str) -> Option<Collision> {
    for m in mine {
        for o in owners.iter().filter(|o| o.entry.worker_id != worker_id) {
            let same_id = o.entry.workspace_id == m.workspace_id;
            let same_path = o.entry.fingerprint == m.fingerprint;
            if same_id != same_path {
                return Some(Collision {
                    mine: describe(m),
                    theirs: describe(&o.entry),
                    worker: o.entry.worker_id.clone(),
                });
            }
        }
    }
    None
}

/// A worker's entries in the bucket.
pub struct Registration {
    js: jetstream::Context,
    store: kv::Store,
    entries: Vec<RegistryEntry>,
    worker_id: String,
}

impl Registration {
    pub fn new(
        js: jetstream::Context,
        store: kv::Store,
        entries: Vec<RegistryEntry>,
        worker_id: String,
    ) -> Self {
        Self {
            js,
            store,
            entries,
            worker_id,
        }
    }

    fn key(&self, entry: &RegistryEntry) -> String {
        subjects::registry_key(&entry.workspace_id, &self.worker_id)
    }

    /// Refuses a collision with a live owner, then puts the entries and looks again (two
    /// workers starting at once both see each other and both refuse: never two paths
    /// behind one id).
    pub async fn claim(&self) -> Result<(), RegisterError> {
        let owners = self.owners().await?;
        if let Some(collision) = collision(&self.entries, &owners, &self.worker_id) {
            return Err(RegisterError::Collision(collision));
        }
        self.put_all().await.map_err(RegisterError::Read)?;
        let owners = self.owners().await?;
        if let Some(collision) = collision(&self.entries, &owners, &self.worker_id) {
            self.delete_all().await;
            return Err(RegisterError::Collision(collision));
        }
        Ok(())
    }

    async fn owners(&self) -> Result<Vec<Owner>, RegisterError> {
        Ok(read(&self.js, ">")
            .await
            .map_err(RegisterError::Read)?
            .unwrap_or_default())
    }

    async fn put_all(&self) -> Result<(), String> {
        for entry in &self.entries {
            let mut entry = entry.clone();
            entry.at = crate::contract::time::now();
            let body = Bytes::from(serde_json::to_vec(&entry).map_err(|e| e.to_string())?);
            self.store
                .put(self.key(&entry), body)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Refreshes the entries every [`subjects::REGISTRY_REFRESH`] until `stop` fires.
    pub async fn keep(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(subjects::REGISTRY_REFRESH) => {}
            }
            if let Err(err) = self.put_all().await {
                tracing::warn!(%err, "cannot refresh this worker's registry entries");
            }
        }
    }

    /// Deletes the entries (a stopping worker no longer serves).
    pub async fn delete_all(&self) {
        for entry in &self.entries {
            if let Err(err) = self.store.delete(self.key(entry)).await {
                tracing::warn!(%err, workspace = %entry.workspace_id, "cannot delete a registry entry (it expires by itself)");
            }
        }
    }
}

/// Why registering failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Collision(Collision),
    #[error("cannot use the registry MILLRACER_WORKSPACES: {0}")]
    Read(String),
}

/// Follows the whole bucket into `directory` until `stop` fires (a watch that ends, as
/// after a broker restart, is started again).
pub async fn follow(store: kv::Store, directory: Arc<Directory>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let mut watch = match store.watch_with_history(">").await {
            Ok(watch) => watch,
            Err(err) => {
                tracing::debug!(%err, "cannot watch the registry; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => return,
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => match entry.operation {
                    kv::Operation::Put => {
                        if let Ok(value) = serde_json::from_slice::<RegistryEntry>(&entry.value) {
                            directory.put(&entry.key, value, SystemTime::from(entry.created));
                        }
                    }
                    kv::Operation::Delete | kv::Operation::Purge => directory.remove(&entry.key),
                },
                Some(Err(err)) => {
                    tracing::debug!(%err, "registry watch interrupted");
                    break;
                }
                None => break,
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ws: &str, fp: &str, worker: &str) -> RegistryEntry {
        RegistryEntry {
            workspace_id: ws.into(),
            display_name: None,
            fingerprint: fp.into(),
            host: "h".into(),
            root_path: format!("/{fp}"),
            worker_id: worker.into(),
            worker_name: "w".into(),
            version: "0".into(),
            at: String::new(),
        }
    }

    fn owner(e: RegistryEntry) -> Owner {
        Owner {
            entry: e,
            age: Duration::ZERO,
            live: true,
        }
    }

    #[test]
    fn same_id_elsewhere_or_same_path_renamed_collide() {
        let mine = [entry("shop", "aa", "me")];
        // A second worker of the same workspace: a rolling restart, fine.
        assert!(collision(&mine, &[owner(entry("shop", "aa", "w2"))], "me").is_none());
        // Our own entries never collide.
        assert!(collision(&mine, &[owner(entry("shop", "bb", "me"))], "me").is_none());
        let c = collision(&mine, &[owner(entry("shop", "bb", "w2"))], "me").expect("same id");
        assert!(c.to_string().contains("h:/aa") && c.to_string().contains("h:/bb"));
        assert!(collision(&mine, &[owner(entry("other", "aa", "w2"))], "me").is_some());
        assert!(collision(&mine, &[owner(entry("other", "bb", "w2"))], "me").is_none());
    }
}
