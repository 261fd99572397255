//! millracer: Millrace on a NATS bus.
//!
//! Adapters publish typed OpsRequests; a worker runs them against the local Millrace
//! workspaces it serves, one change at a time per workspace, streams ordered event
//! frames and answers with exactly one OpsResult. See the README for the subject layout.

pub mod actions;
pub mod agent;
pub mod bridge;
pub mod cli;
pub mod commands;
pub mod config;
pub mod contract;
pub mod daemon;
pub mod decision;
pub mod delegation;
pub mod dispatch;
pub mod engine;
pub mod events;
pub mod intake;
pub mod ledger;
pub mod legacy;
pub mod monitor;
pub mod pi;
pub mod progress;
pub mod prompts;
pub mod records;
pub mod runtime;
pub mod sessions;
pub mod status_cache;
pub mod subjects;
pub mod telemetry;
pub mod transport;
pub mod worker;
pub mod workspace;
