//! The log tailer: a logical-replication client on pgoutput (SPEC §2, "logical").
//!
//! Only its configuration exists so far, so that `check` validates a complete file;
//! `run` refuses `mode = "logical"` with a clear error until the client lands.

mod config;

pub use config::{LogicalConfig, RawLogicalConfig};
pub mod pgoutput;
#[allow(dead_code)] // wired up by the log tailer in the next commits
mod protocol;
