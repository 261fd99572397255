//! The commands a person or a service manager runs: `worker`, `ops`, `events`, `run`,
//! `operator`, with their command line, configuration file and telemetry set-up.
//!
//! The top layer: it may import every other folder; nothing imports it.

pub mod cli;
pub mod commands;
pub mod config;
pub mod delegate;
pub mod events;
pub mod operator;
pub mod ops;
pub mod run;
pub mod telemetry;
pub mod worker;
