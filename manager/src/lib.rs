//! The manager: consumes the update queue, decides every change with the reconciliation
//! rule, stores metadata in SQLite and broadcasts on the master exchange. It stores no
//! file contents.

pub mod api;
pub mod batch;
pub mod provision;
pub mod rule;
pub mod service;
pub mod store;
pub mod versions;

pub use service::{run, Config};
