//! A sync node: a FUSE mount over a local tree and content store, a peer HTTP server that
//! serves contents by hash, and a broker link to the manager.

pub mod chunk_index;
pub mod chunks;
pub mod db;
pub mod engine;
pub mod env;
pub mod fetch;
pub mod fs;
pub mod leaves;
pub mod link;
pub mod metrics;
pub mod node;
pub mod patched;
pub mod peer;
pub mod puller;
pub mod small;
pub mod status;
pub mod store;
pub mod stream;
pub mod tree;
