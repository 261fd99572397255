//! Every NATS subject millracer uses is built here and nowhere else.
//!
//! Layout (version early, one plane per purpose):
//!
//! | subject | what |
//! |---|---|
//! | `millracer.ops.v0_2.req.ws.<workspace>` | OpsRequest for a workspace by id |
//! | `millracer.ops.v0_2.req.path.<path_key>` | OpsRequest for a workspace by canonical root path |
//! | `millracer.ops.v0_2.req.any` | any worker; workspace-less actions |
//! | `millracer.ops.v0_2.frames.<workspace>.<request>` | event frames of one request |
//! | `millracer.ops.v0_2.jobs.ws.<workspace>.<class>` | durable intake (JetStream) by workspace id |
//! | `millracer.ops.v0_2.jobs.path.<path_key>.<class>` | durable intake by canonical root path |
//! | `millracer.ops.v0_2.jobs.any` | durable intake for workspace-less actions |
//! | `millracer.ops.v0_2.cancel.<workspace>.<request>` | a `cancel` asking every worker to stop one request |
//!
//! `<class>` is `change` for mutating actions (served one at a time per workspace by a
//! consumer with `max_ack_pending = 1`) and `read` for the rest.
//!
//! Anything that comes from a caller (a request_id, a workspace id) passes through
//! [`token`] before it becomes part of a subject, so `.`, `*`, `>`, spaces and `$` can
//! never reach another subject.

pub use crate::contract::token::{fingerprint, is_plain_token, path_key, token};

const ROOT: &str = "millracer.ops.v0_2";

/// The queue group every worker joins, so one request reaches one worker.
pub const QUEUE_GROUP: &str = "millracer-workers";

/// The frames token used when a request resolved no workspace.
pub const NO_WORKSPACE: &str = "_none";

/// Header carrying the raw request_id on frames and results.
pub const HEADER_REQUEST_ID: &str = "Millracer-Request-Id";
/// Header carrying the schema version.
pub const HEADER_SCHEMA: &str = "Millracer-Schema";
/// Header carrying a frame's event type, so a consumer can filter without parsing.
pub const HEADER_EVENT_TYPE: &str = "Millracer-Event-Type";
/// Header carrying a frame's sequence number.
pub const HEADER_SEQUENCE: &str = "Millracer-Sequence";

/// Requests for the workspace with this id.
pub fn request_by_id(workspace_id: &str) -> String {
    format!("{ROOT}.req.ws.{}", token(workspace_id))
}

/// Requests for the workspace with this path key ([`path_key`] of its host and canonical
/// root path).
pub fn request_by_path(path_key: &str) -> String {
    format!("{ROOT}.req.path.{}", token(path_key))
}

/// Requests any worker may answer.
pub fn request_any() -> String {
    format!("{ROOT}.req.any")
}

/// Frames of one request; `workspace` is the resolved workspace id, if any.
pub fn frames(workspace: Option<&str>, request_id: &str) -> String {
    let ws = workspace.map_or_else(|| NO_WORKSPACE.to_string(), token);
    format!("{ROOT}.frames.{ws}.{}", token(request_id))
}

/// Subscribe here to follow one request whatever workspace it resolves to.
pub fn frames_of_request(request_id: &str) -> String {
    format!("{ROOT}.frames.*.{}", token(request_id))
}

/// Subscribe here to follow every request of one workspace (or all, with `None`).
pub fn frames_of_workspace(workspace: Option<&str>) -> String {
    match workspace {
        Some(ws) => format!("{ROOT}.frames.{}.>", token(ws)),
        None => format!("{ROOT}.frames.>"),
    }
}

/// Where a `cancel` asks every worker (no queue group) to stop one request of a
/// workspace: the worker that holds it answers.
pub fn cancel(workspace: Option<&str>, request_id: &str) -> String {
    format!("{ROOT}.cancel.{}.{}", scope(workspace), token(request_id))
}

/// Subscribe here to hear the cancels of one workspace's requests.
pub fn cancels_of_workspace(workspace: Option<&str>) -> String {
    format!("{ROOT}.cancel.{}.*", scope(workspace))
}

/// The JetStream stream holding durable requests (work-queue retention).
pub const JOBS_STREAM: &str = "MILLRACER_JOBS";
/// The JetStream stream keeping every frame for replay.
pub const FRAMES_STREAM: &str = "MILLRACER_FRAMES";
/// The KV bucket holding each request's state and final result by request_id.
pub const RESULTS_BUCKET: &str = "MILLRACER_RESULTS";

/// The intake class of an action: changes are serialised per workspace, reads are not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobClass {
    Change,
    Read,
}

impl JobClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Change => "change",
            Self::Read => "read",
        }
    }
}

/// Everything the jobs stream captures.
pub fn jobs_all() -> String {
    format!("{ROOT}.jobs.>")
}

/// Durable requests for the workspace with this id.
pub fn jobs_by_id(workspace_id: &str, class: JobClass) -> String {
    format!("{ROOT}.jobs.ws.{}.{}", token(workspace_id), class.as_str())
}

/// Durable requests for the workspace with this path key.
pub fn jobs_by_path(path_key: &str, class: JobClass) -> String {
    format!("{ROOT}.jobs.path.{}.{}", token(path_key), class.as_str())
}

/// Durable requests any worker may take.
pub fn jobs_any() -> String {
    format!("{ROOT}.jobs.any")
}

/// The durable consumer name of one served workspace and class
/// (`ws-<id>-<8 hex of fingerprint>-change`): a different path can never share a consumer.
pub fn jobs_consumer(workspace_id: &str, fingerprint: &str, class: JobClass) -> String {
    let fp8: String = fingerprint.chars().take(8).collect();
    format!(
        "ws-{}-{}-{}",
        token(workspace_id),
        token(&fp8),
        class.as_str()
    )
}

/// The KV bucket of the workspaces the bus serves: `<workspace id>.<worker id>` per live
/// owner, refreshed by its worker every [`REGISTRY_REFRESH`], gone [`REGISTRY_MAX_AGE`]
/// after its last refresh.
pub const REGISTRY_BUCKET: &str = "MILLRACER_WORKSPACES";
/// How often a worker refreshes its registry entries.
pub const REGISTRY_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an entry outlives its last refresh (the bucket's `max_age`).
pub const REGISTRY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30);

/// The registry key of one owner of a workspace.
pub fn registry_key(workspace_id: &str, worker_id: &str) -> String {
    format!("{}.{}", token(workspace_id), token(worker_id))
}

/// The name of an ordered consumer replaying frames: named, so its filter is part of the
/// create subject (`$JS.API.CONSUMER.CREATE.MILLRACER_FRAMES.<name>.<filter>`) and a role
/// can be granted the replay of its own workspace's frames only. Unique per process and
/// moment (the process id and a nanosecond clock).
pub fn replay_consumer() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("replay-{}-{nanos}", std::process::id())
}

/// The durable consumer of [`jobs_any`].
pub const JOBS_ANY_CONSUMER: &str = "any";

/// The scope token of a workspace in result keys and message ids: its id as a token, or
/// [`NO_WORKSPACE`] for workspace-less requests (`req.any`, `jobs.any`).
pub fn scope(workspace: Option<&str>) -> String {
    workspace.map_or_else(|| NO_WORKSPACE.to_string(), token)
}

/// The KV key of a request's state and result, and the `Nats-Msg-Id` of its durable
/// submission: `<workspace token>.<token(request_id)>`. The workspace is the one the request's
/// subject binds, so a role can be granted exactly one workspace's results
/// (`$KV.MILLRACER_RESULTS.<workspace>.>`), the same request_id in two workspaces is two
/// requests, and no request_id can reach another workspace's keys (a token holds no `.`).
pub fn result_key(workspace: Option<&str>, request_id: &str) -> String {
    format!("{}.{}", scope(workspace), token(request_id))
}

/// The subject every write of one result key is published on
/// (`$KV.MILLRACER_RESULTS.<key>`): a core subscription on it sees the request's record
/// as it is written, with no JetStream consumer (so no right beyond reading the
/// workspace's results is needed).
pub fn result_key_subject(key: &str) -> String {
    format!("$KV.{RESULTS_BUCKET}.{key}")
}

/// The KV subject of one workspace's results (`$KV.MILLRACER_RESULTS.<workspace>.>`): what
/// a role scoped to that workspace may read.
pub fn results_of_workspace(workspace: Option<&str>) -> String {
    format!("$KV.{RESULTS_BUCKET}.{}.>", scope(workspace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_never_leave_their_token() {
        for id in [
            "a.b",
            "*",
            ">",
            "a b",
            "$SYS",
            "_h00",
            "",
            "x".repeat(65).as_str(),
            "é",
        ] {
            let t = token(id);
            assert!(t.starts_with("_h") && t.len() == 34, "{id:?} -> {t}");
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        }
        assert_eq!(token("req-status-001"), "req-status-001");
        assert_eq!(
            frames(Some("demo"), "a.>"),
            format!("millracer.ops.v0_2.frames.demo.{}", token("a.>"))
        );
        assert_eq!(frames(None, "r1"), "millracer.ops.v0_2.frames._none.r1");
    }

    #[test]
    fn jobs_subjects_are_disjoint_per_class() {
        assert_eq!(
            jobs_by_id("shop", JobClass::Change),
            "millracer.ops.v0_2.jobs.ws.shop.change"
        );
        assert_eq!(
            jobs_consumer("shop", "0123456789abcdef", JobClass::Read),
            "ws-shop-01234567-read"
        );
        assert_eq!(
            jobs_by_id("a.b", JobClass::Read),
            format!("millracer.ops.v0_2.jobs.ws.{}.read", token("a.b"))
        );
    }

    #[test]
    fn result_keys_are_scoped_by_workspace() {
        assert_eq!(result_key(Some("shop"), "req-1"), "shop.req-1");
        assert_eq!(result_key(None, "req-1"), "_none.req-1");
        assert_ne!(
            result_key(Some("shop"), "r"),
            result_key(Some("other"), "r")
        );
        // An id built to look like another workspace's key stays one token.
        assert_eq!(
            result_key(Some("shop"), "other.req-1"),
            format!("shop.{}", token("other.req-1"))
        );
        assert_eq!(
            results_of_workspace(Some("shop")),
            "$KV.MILLRACER_RESULTS.shop.>"
        );
    }

    #[test]
    fn encoding_is_the_documented_hash() {
        // `_h` + the first 32 hex digits of SHA-256 of the id (README, docs/bus-naming.md):
        // known answers, so a change of the encoding breaks every stored key and is seen here.
        assert_eq!(token("a.b"), "_h2e7336dc8eba87ef472df568c35482ab");
        assert_eq!(token("a.c"), "_had4573f052ff7302a57fd72c2fa41f65");
        assert_eq!(token(""), "_he3b0c44298fc1c149afbf4c8996fb924");
        assert_eq!(token("é"), "_h4a99557e4033c3539de2eb65472017ca");
        // 64 plain characters are kept; 65 are hashed.
        assert_eq!(token(&"x".repeat(64)), "x".repeat(64));
        assert_eq!(token(&"x".repeat(65)), "_h9537c5fdf120482f7d58d25e9ed583f5");
    }
}
