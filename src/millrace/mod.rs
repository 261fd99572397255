//! The local Millrace runtime: its CLI run as argv ([`command`]), the daemon, the records
//! it keeps (event log, work item folders, closure records), the status snapshot, the
//! workspaces a process serves, and delegation of work to it from intake to proven
//! completion.
//!
//! May import `contract` only (and, within this folder, each other).

pub mod command;
pub mod daemon;
pub mod delegation;
pub mod exit_watch;
pub mod health;
pub mod intake;
pub mod monitor;
pub mod records;
pub mod sessions;
pub mod status;
pub mod workspace;
