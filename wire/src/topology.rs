//! Names of the broker topology, shared by both sides (see docs/protocol.md).
//!
//! - `sync.update`: durable queue, every node publishes to it through the default
//!   exchange; only the manager consumes it (the *update* channel).
//! - `sync.master`: durable direct exchange (the *master* channel). Each node has its own
//!   durable queue `sync.node.<id>` bound with the keys `all` (broadcasts) and
//!   `node.<id>` (messages for that node only).
//! - `sync.dead`: fanout exchange and queue where undecodable messages are dead-lettered.

use crate::NodeId;

pub const UPDATE_QUEUE: &str = "sync.update";
pub const MASTER_EXCHANGE: &str = "sync.master";
pub const DEAD_EXCHANGE: &str = "sync.dead";
pub const DEAD_QUEUE: &str = "sync.dead";
pub const BROADCAST_KEY: &str = "all";

pub fn node_queue(node: &NodeId) -> String {
    format!("sync.node.{node}")
}

pub fn node_key(node: &NodeId) -> String {
    format!("node.{node}")
}
