//! The contract's vocabulary: every frame event type, severity, error code, outcome, route
//! and job state, as enums. Each is written as its wire string here and nowhere else, so a
//! typo is a compile error instead of a frame no adapter recognises, and the documents in
//! `contracts/` can be checked against one list (`tests/vocabulary.rs`).

use std::fmt;

/// Declares a closed vocabulary: an enum whose variants map one-to-one to wire strings,
/// with `as_str`, `parse`, `ALL`, `Display` and serde as those strings.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every member, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The member's wire string.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }

            /// The member a wire string names, if any.
            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        concat!("unknown ", stringify!($name), " {:?}"),
                        text
                    ))
                })
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.as_str()
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.as_str()
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                self.as_str() == other.as_str()
            }
        }
    };
}

vocabulary! {
    /// The `event_type` of an OpsEventFrame. `request.*` frames come from the engine and
    /// frame every request; `runtime.*` frames come from delegation and the stage monitor.
    EventType {
        /// The request was read and will be handled (first frame of every request).
        RequestAccepted = "request.accepted",
        /// The request waits in its workspace's lane behind others.
        RequestQueued = "request.queued",
        /// The request's lane is busy; sent while it waits.
        RequestWaiting = "request.waiting",
        /// The request's action started.
        RequestStarted = "request.started",
        /// The request was cancelled (payload `reason`, `state`: `waiting` or `running`).
        RequestCancelled = "request.cancelled",
        /// The last frame of every request; the result follows.
        RequestFinished = "request.finished",
        /// A delegated request taken over from a worker that stopped.
        RuntimeResumed = "runtime.resumed",
        /// A scoped item queued before is not queued again.
        RuntimeIntakeReused = "runtime.intake_reused",
        /// The intake document was written into the workspace.
        RuntimeIntakeWritten = "runtime.intake_written",
        /// The runtime accepted the work item (`millrace queue add-*`).
        RuntimeWorkItemQueued = "runtime.work_item_queued",
        /// An idea was normalised into tasks by the runtime.
        RuntimeIdeaNormalized = "runtime.idea_normalized",
        /// The worker started a Millrace daemon for this request.
        RuntimeDaemonStarted = "runtime.daemon_started",
        /// A daemon that stopped early was started again.
        RuntimeDaemonRestarted = "runtime.daemon_restarted",
        /// The daemon a previous worker started still runs and is followed.
        RuntimeDaemonAdopted = "runtime.daemon_adopted",
        /// The daemon exited by itself before the work ended.
        RuntimeDaemonExited = "runtime.daemon_exited",
        /// The worker stopped the daemon at the end of the request.
        RuntimeDaemonStopped = "runtime.daemon_stopped",
        /// The daemon keeps running after the request (`--keep-daemon`).
        RuntimeDaemonKept = "runtime.daemon_kept",
        /// A Millrace stage started.
        RuntimeStageStarted = "runtime.stage_started",
        /// A Millrace stage finished.
        RuntimeStageCompleted = "runtime.stage_completed",
        /// The delegated work ended (payload `outcome`).
        RuntimeTerminal = "runtime.terminal",
        /// A cancelled request's runtime work item was cancelled (`millrace queue cancel`).
        RuntimeWorkItemCancelled = "runtime.work_item_cancelled",
        /// A cancelled request taken over from a stopped worker is stopped, not resumed.
        RuntimeNotResumed = "runtime.not_resumed",
        /// The runtime was paused (`pause`; payload `reason`).
        RuntimePaused = "runtime.paused",
        /// The runtime was resumed after a pause (`resume`; payload `reason`).
        RuntimeUnpaused = "runtime.unpaused",
        /// A running pi turn was aborted (a cancelled `enqueue`).
        AgentAborted = "agent.aborted",
    }
}

vocabulary! {
    /// The `severity` of a frame or a warning/error record.
    Severity {
        Info = "info",
        Warning = "warning",
        Error = "error",
    }
}

vocabulary! {
    /// The stable `code` of a warning or error record: what callers branch on.
    ErrorCode {
        // The reference's codes.
        /// No workspace could be resolved from the request.
        WorkspaceUnresolved = "workspace_unresolved",
        /// The session store could not be read or written.
        SessionStoreUnavailable = "session_store_unavailable",
        /// A `millrace` command failed.
        RuntimeCommandFailed = "runtime_command_failed",
        /// The request's input lacks what the action needs.
        InvalidInput = "invalid_input",
        /// The action is not one this contract knows.
        UnsupportedAction = "unsupported_action",
        /// `--transport` names no supported transport.
        UnsupportedTransport = "unsupported_transport",
        /// A warning the runtime reported.
        RuntimeWarning = "runtime_warning",
        // Added by the bus worker.
        /// The request failed parsing or validation.
        InvalidRequest = "invalid_request",
        /// The request is larger than the worker accepts.
        RequestTooLarge = "request_too_large",
        /// No worker (or not this one) serves the workspace.
        WorkspaceNotServed = "workspace_not_served",
        /// The body names another workspace than its subject binds.
        WorkspaceMismatch = "workspace_mismatch",
        /// The worker failed while handling the request.
        ServiceError = "service_error",
        /// A `millrace` command ran past its time limit.
        RuntimeTimeout = "runtime_timeout",
        /// The delegated work ran past `--daemon-timeout-seconds`.
        DaemonTimeout = "daemon_timeout",
        /// The intake document could not be written.
        IntakeFailed = "intake_failed",
        /// The pi runner is not configured or cannot start.
        RunnerUnavailable = "runner_unavailable",
        /// The pi runner failed (provider error, protocol error).
        RunnerFailed = "runner_failed",
        /// The pi runner ran past its time limit.
        RunnerTimeout = "runner_timeout",
        /// The bridge could not reach the bus or lost its answer.
        TransportFailed = "transport_failed",
        /// The request was cancelled (`cancel`, `ops --cancel`) before it finished.
        Cancelled = "cancelled",
        /// `cancel`: the request's holder was asked to stop it; its result says the end.
        CancelPending = "cancel_pending",
        /// `cancel`: the request had already finished; nothing was stopped.
        RequestFinished = "request_finished",
        /// `cancel`: no request with that id is known (running, waiting or stored).
        RequestNotFound = "request_not_found",
        /// `pause`/`resume`: the runtime's control command ran but its record could not be
        /// written.
        PauseRecordFailed = "pause_record_failed",
    }
}

vocabulary! {
    /// How delegated work ended (`completion.outcome`, `runtime.terminal`'s `outcome`).
    Outcome {
        /// The work item (and what it spawned) reached `done`.
        Completed = "completed",
        /// The runtime blocked the work item.
        Blocked = "blocked",
        /// The daemon went idle without running the work.
        Incomplete = "incomplete",
        /// The daemon died with active runs.
        Crashed = "crashed",
        /// The daemon stopped before the work ended; a restart would continue it.
        RestartNeeded = "restart_needed",
        /// The delegated work ran past its time limit (`runtime.terminal` frames only; the
        /// result says `daemon_timeout`).
        Timeout = "timeout",
        /// Nothing is known about completion (read-only and error results).
        Unknown = "unknown",
    }
}

vocabulary! {
    /// A route: where an `enqueue` goes (a request's `route_preference`, the outer agent's
    /// decision, an enqueue result's `route`), and the `route` of read-only results.
    Route {
        /// Let the outer agent decide (requests only).
        Auto = "auto",
        /// The outer agent answers itself, without the runtime.
        Direct = "direct",
        /// Delegated to the Millrace runtime.
        Millrace = "millrace",
        /// A result that only read sessions or workspaces.
        InspectOnly = "inspect_only",
        /// A `status` result.
        StatusOnly = "status_only",
    }
}

vocabulary! {
    /// The lifecycle folder a runtime work item's card is in (`millrace/tasks/<state>/…`).
    JobState {
        Queue = "queue",
        Active = "active",
        Done = "done",
        Blocked = "blocked",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_round_trips_through_its_string() {
        fn check<T: Copy + PartialEq + fmt::Debug>(
            all: &[T],
            as_str: fn(T) -> &'static str,
            parse: fn(&str) -> Option<T>,
        ) {
            let mut seen = std::collections::HashSet::new();
            for &member in all {
                assert!(seen.insert(as_str(member)), "{member:?} repeats a string");
                assert_eq!(parse(as_str(member)), Some(member));
            }
        }
        check(EventType::ALL, EventType::as_str, EventType::parse);
        check(Severity::ALL, Severity::as_str, Severity::parse);
        check(ErrorCode::ALL, ErrorCode::as_str, ErrorCode::parse);
        check(Outcome::ALL, Outcome::as_str, Outcome::parse);
        check(Route::ALL, Route::as_str, Route::parse);
        check(JobState::ALL, JobState::as_str, JobState::parse);
        assert_eq!(EventType::ALL.len(), 25);
        assert_eq!(EventType::parse("runtime.daemon_gone"), None);
    }

    #[test]
    fn serde_uses_the_wire_strings() {
        let json = serde_json::to_string(&ErrorCode::WorkspaceMismatch).expect("serialise");
        assert_eq!(json, "\"workspace_mismatch\"");
        let back: Outcome = serde_json::from_str("\"restart_needed\"").expect("parse");
        assert_eq!(back, Outcome::RestartNeeded);
        assert!(serde_json::from_str::<Route>("\"sideways\"").is_err());
    }
}
