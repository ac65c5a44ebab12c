//! infill runs data backfills safely: it finds the rows that lack a value,
//! computes what they should hold, and writes it in small, guarded,
//! checkpointed batches that a kill at any moment cannot corrupt.
//!
//! The library holds the whole engine and no terminal: the `infill` binary
//! parses arguments, calls [`run::run`] and friends, draws progress from
//! [`run::Event`]s and maps [`Error`] to exit codes.

pub mod approval;
pub mod audit;
pub mod dialect;
pub mod error;
pub mod exec;
pub mod export;
pub mod host;
pub mod http;
pub mod lock;
pub mod ops;
pub mod pace;
pub mod plan;
pub mod quickstart;
pub mod run;
pub mod secret;
pub mod source;
pub mod spec;
pub mod sql;
pub mod state;
pub mod target;
pub mod undo;
pub mod value;
pub mod verify;

pub use error::{Error, ExitCode, Result};
