//! NATS: every subject (built in [`subjects`] only), connecting, publishing frames and
//! results, the micro discovery protocol, durable intake on JetStream, and the in-process
//! stand-in for the bus used by local one-shots.
//!
//! May import `engine`, `actions`, `millrace`, `agent` and `contract`; never `app`.

pub mod broker;
pub mod cancel;
pub mod durable;
pub mod failover;
pub mod local;
pub mod micro;
pub mod nats;
pub mod registry;
pub mod retry;
pub mod subjects;
pub mod trace;
