//! Transports feed raw requests into the [`crate::engine::Engine`] and deliver its
//! outbound frames and results: NATS for the worker, in-process for local one-shots.

pub mod durable;
pub mod local;
pub mod micro;
pub mod nats;
