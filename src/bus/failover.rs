//! What a JetStream error means for the caller, read from async-nats' error kinds and the
//! server's error codes along the error's source chain, never from its text. A cluster
//! electing leaders (a server died, a stream was just created) answers with timeouts, "no
//! responders" on a stream's direct get, or "cluster not available" for a few seconds:
//! worth waiting for. A stream that does not exist, or a refusal, is not.

use std::error::Error;

use async_nats::jetstream::context::{
    GetStreamError, GetStreamErrorKind, PublishError, PublishErrorKind,
};
use async_nats::jetstream::kv::{EntryError, EntryErrorKind};
use async_nats::jetstream::stream::{
    ConsumerError, ConsumerErrorKind, DirectGetError, DirectGetErrorKind,
};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{RequestError, RequestErrorKind, StatusCode};

/// Every error in `err`'s source chain, `err` first.
fn chain<'a>(err: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn Error + 'static)| (*e).source())
}

/// The server's JetStream API error somewhere in the chain: as a source, or carried in a
/// kind (`GetStreamErrorKind::JetStream`, `ConsumerErrorKind::JetStream`).
fn api_error(err: &(dyn Error + 'static)) -> Option<jetstream::Error> {
    chain(err).find_map(|e| {
        if let Some(api) = e.downcast_ref::<jetstream::Error>() {
            return Some(api.clone());
        }
        if let Some(g) = e.downcast_ref::<GetStreamError>()
            && let GetStreamErrorKind::JetStream(api) = g.kind()
        {
            return Some(api);
        }
        if let Some(c) = e.downcast_ref::<ConsumerError>()
            && let ConsumerErrorKind::JetStream(api) = c.kind()
        {
            return Some(api);
        }
        None
    })
}

/// A cluster in failover: a timeout, a leaderless stream, a cluster not available yet.
/// "No responders" on an API request is not one: a broker without JetStream answers its
/// API that way at once, and that means "no JetStream here", without waiting.
pub fn is_failover(err: &(dyn Error + 'static)) -> bool {
    let timed_out = chain(err).any(|e| {
        if let Some(r) = e.downcast_ref::<RequestError>() {
            return r.kind() == RequestErrorKind::TimedOut;
        }
        if let Some(p) = e.downcast_ref::<PublishError>() {
            return matches!(
                p.kind(),
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
            );
        }
        if let Some(k) = e.downcast_ref::<EntryError>() {
            return k.kind() == EntryErrorKind::TimedOut;
        }
        if let Some(d) = e.downcast_ref::<DirectGetError>() {
            return d.kind() == DirectGetErrorKind::TimedOut;
        }
        if let Some(c) = e.downcast_ref::<ConsumerError>() {
            return c.kind() == ConsumerErrorKind::TimedOut;
        }
        false
    });
    timed_out
        || api_error(err).is_some_and(|api| {
            matches!(
                api.error_code(),
                ErrorCode::CLUSTER_NOT_AVAILABLE
                    | ErrorCode::CLUSTER_NOT_LEADER
                    | ErrorCode::CLUSTER_NOT_ACTIVE
                    | ErrorCode::CLUSTER_NOT_ASSIGNED
            )
        })
}

/// Reading a bucket or stream that exists while it has no leader yet: a failover, its
/// direct get finding no responder for a moment (status 503), or a publish finding no
/// stream for its subject while the stream's new leader takes over.
pub fn is_transient(err: &(dyn Error + 'static)) -> bool {
    is_failover(err)
        || chain(err).any(|e| {
            if let Some(d) = e.downcast_ref::<DirectGetError>() {
                return match d.kind() {
                    DirectGetErrorKind::ErrorResponse(status, _) => {
                        status == StatusCode::NO_RESPONDERS
                    }
                    kind => kind == DirectGetErrorKind::Request,
                };
            }
            if let Some(r) = e.downcast_ref::<RequestError>() {
                return r.kind() == RequestErrorKind::NoResponders;
            }
            if let Some(p) = e.downcast_ref::<PublishError>() {
                return p.kind() == PublishErrorKind::StreamNotFound;
            }
            false
        })
}

/// Why the server refused to store a published request.
#[derive(Debug)]
pub enum Refusal {
    /// The message is larger than the server or the stream accepts.
    TooLarge,
    /// The stream refused to store it (its limits, e.g. the per-subject cap); the
    /// server's own words.
    NotStored(String),
}

/// A publish the server refused (as opposed to one that did not get through).
pub fn publish_refusal(err: &PublishError) -> Option<Refusal> {
    if err.kind() == PublishErrorKind::MaxPayloadExceeded {
        return Some(Refusal::TooLarge);
    }
    let api = api_error(err)?;
    match api.error_code() {
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => Some(Refusal::TooLarge),
        ErrorCode::STREAM_STORE_FAILED => Some(Refusal::NotStored(api.to_string())),
        _ => None,
    }
}

/// A durable consumer that cannot exist beside another one with an overlapping filter
/// (a work-queue stream allows one consumer per subject): a workspace identity collision.
pub fn is_consumer_overlap(err: &ConsumerError) -> bool {
    api_error(err).is_some_and(|api| {
        matches!(
            api.error_code(),
            ErrorCode::CONSUMER_WQ_CONSUMER_NOT_UNIQUE
                | ErrorCode::CONSUMER_WQ_MULTIPLE_UNFILTERED
                | ErrorCode::CONSUMER_OVERLAPPING_SUBJECT_FILTERS
        )
    })
}
