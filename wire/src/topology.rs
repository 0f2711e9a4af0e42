//! Names of the broker topology, shared by both sides (see docs/protocol.md).
//!
//! - `sync.update`: durable queue, every node publishes to it through the default
//!   exchange; only the manager consumes it (the *update* channel).
//! - `sync.master`: durable direct exchange (the *master* channel). Each node has its own
//!   durable queue `sync.node.<id>` bound with the keys `all` (broadcasts) and
//!   `node.<id>` (messages for that node only).
//! - `sync.dead`: fanout exchange and queue where undecodable messages are dead-lettered,
//!   and where a node queue's oldest messages go past its length limit.
//! - `sync.drops`: a second queue on `sync.dead`, which only the manager consumes: of what
//!   comes there it looks at the messages a node queue dropped, and asks that node to
//!   sync (the rest is for operators, in `sync.dead`).
//! - `sync.updates`: durable fanout exchange bound to `sync.update`; nodes publish their
//!   messages there. A node's own broker user (`sync-node-<id>`) may write only to this
//!   exchange and read only its own queue, so it can neither publish on `sync.master`,
//!   nor reach another node's queue through the default exchange, nor drain
//!   `sync.update`.

use crate::NodeId;

pub const UPDATE_QUEUE: &str = "sync.update";
pub const MASTER_EXCHANGE: &str = "sync.master";
pub const DEAD_EXCHANGE: &str = "sync.dead";
pub const DEAD_QUEUE: &str = "sync.dead";
pub const DROPS_QUEUE: &str = "sync.drops";
pub const BROADCAST_KEY: &str = "all";
pub const UPDATE_EXCHANGE: &str = "sync.updates";
/// Prefix of a node's own broker user: `sync-node-<id>`.
pub const NODE_USER_PREFIX: &str = "sync-node-";

/// The broker user of node `node`.
pub fn node_user(node: &NodeId) -> String {
    format!("{NODE_USER_PREFIX}{node}")
}

/// The node whose own broker user `user` is, if it is one.
pub fn node_of_user(user: &str) -> Option<NodeId> {
    user.strip_prefix(NODE_USER_PREFIX)?.parse().ok()
}

pub fn node_queue(node: &NodeId) -> String {
    format!("sync.node.{node}")
}

pub fn node_key(node: &NodeId) -> String {
    format!("node.{node}")
}

/// The node whose own routing key `key` is, if it is one.
pub fn node_of_key(key: &str) -> Option<NodeId> {
    key.strip_prefix("node.")?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn node_users_round_trip() {
        let n: crate::NodeId = "laptop-2".parse().unwrap();
        assert_eq!(super::node_user(&n), "sync-node-laptop-2");
        assert_eq!(super::node_of_user("sync-node-laptop-2"), Some(n.clone()));
        assert_eq!(super::node_of_key(&super::node_key(&n)), Some(n));
        assert_eq!(super::node_of_key(super::BROADCAST_KEY), None);
        assert_eq!(super::node_of_user("guest"), None);
        assert_eq!(super::node_of_user("sync-node-"), None);
        assert_eq!(super::node_of_user("sync-node-a/b"), None);
    }
}
