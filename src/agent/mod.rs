//! The natural-language route: the route decision, the reference's prompts, the pi
//! harness (print and RPC) and the runner that turns one task into direct work or a
//! delegation, plus the legacy result `run` prints.
//!
//! May import `millrace` (intake kinds, workspace paths) and `contract`.

pub mod decision;
pub mod legacy;
pub mod pi;
pub mod prompts;
pub mod runner;
