//! Messages shared by the manager and the nodes, and the names of the broker topology.
//!
//! This crate is the only serialization boundary of the system: every byte that crosses
//! the broker is one of these types in a versioned JSON [`Envelope`]. Decoding is strict
//! (unknown kinds, unknown fields and invalid values are errors, never panics), and the
//! validated newtypes ([`RelPath`], [`NodeId`], [`ContentHash`]) cannot hold a bad value.
//! It never does I/O.

mod ids;
mod messages;
mod path;
pub mod topology;
mod versions;

pub use ids::{ContentHash, IdError, MessageId, NodeId, Revision};
pub use messages::*;
pub use path::{PathError, RelPath, MAX_NAME_BYTES, MAX_PATH_BYTES};
pub use versions::*;
