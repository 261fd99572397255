//! millracer: Millrace on a NATS bus.
//!
//! Adapters publish typed OpsRequests; a worker runs them against the local Millrace
//! workspaces it serves, one change at a time per workspace, streams ordered event
//! frames and answers with exactly one OpsResult. See the README for the subject layout.
//!
//! The folders follow a request's path, and each may import only the folders below it:
//!
//! ```text
//! app      the commands: worker, ops, events, run, operator; cli, config, telemetry
//!  └─ bus      NATS: subjects, connecting, publishing, micro discovery, durable intake, client
//!  └─ engine   one request's life: ledger, lanes, frames, dispatch to an action
//!      └─ actions   the action vocabulary, planning, one file per action
//!          └─ millrace  the local runtime: commands, daemon, records, monitor, delegation
//!          └─ agent     the natural-language route: decision, prompts, the pi runner
//!              └─ contract  the messages, their vocabulary, the Python-compatible JSON
//! ```

pub mod actions;
pub mod agent;
pub mod app;
pub mod bus;
pub mod contract;
pub mod engine;
pub mod millrace;
