//! One request's life, whatever carried it: the request ledger (a request_id runs once),
//! the per-workspace lanes, the numbered event frames, and dispatch to an action.
//!
//! Knows nothing of NATS. May import `actions`, `millrace`, `agent` and `contract`.

pub mod frames;
pub mod ledger;
pub mod service;
pub mod trace;
