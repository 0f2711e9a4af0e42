//! The broker model: RabbitMQ's guarantees and no more. Each queue is FIFO; a delivery
//! stays unacked until its consumer acks it, and a consumer whose connection is lost
//! (a partition, a crash) gets its unacked deliveries back at the head of the queue,
//! marked redelivered. `sync.master` routes `all` to every node queue and `node.<id>` to
//! one. Queues are durable: they keep their messages while their consumer is away, up to
//! a length limit past which the oldest go (a node queue's `drop-head` policy,
//! `manager::api::broker_user::NODE_QUEUE_MAX_BYTES`; see [`Queue::limit`]), each
//! dead-lettered into `sync.dead`, whose copy on `sync.drops` tells the manager
//! ([`Broker::drops`]).

use std::collections::{BTreeMap, VecDeque};
use wire::{topology, NodeId};

#[derive(Clone, Debug)]
pub struct Message {
    pub body: Vec<u8>,
    pub redelivered: bool,
    /// The manager's outbox row (its `x-sync-seq` header).
    pub seq: Option<i64>,
}

#[derive(Default)]
pub struct Queue {
    ready: VecDeque<Message>,
    unacked: Vec<Message>,
    /// Most ready messages kept; past it a publish drops the oldest (RabbitMQ's
    /// `drop-head`, which counts ready messages only). The real limit is a gigabyte,
    /// reached by a queue whose node is away for long or falls far behind, so the
    /// simulation sets a small one only for a while then (`None`: no limit).
    pub limit: Option<usize>,
    /// Messages dropped by the limit (taken by [`Queue::take_dropped`]).
    dropped: Vec<Message>,
}

impl Queue {
    pub fn publish(&mut self, body: Vec<u8>) {
        self.publish_seq(body, None);
    }
    pub fn publish_seq(&mut self, body: Vec<u8>, seq: Option<i64>) {
        self.ready.push_back(Message { body, redelivered: false, seq });
        if let Some(limit) = self.limit {
            while self.ready.len() > limit {
                let oldest = self.ready.pop_front().expect("longer than the limit");
                self.dropped.push(oldest);
            }
        }
    }
    /// What the length limit dropped since the last call, oldest first.
    pub fn take_dropped(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.dropped)
    }
    /// The next message, now unacked.
    pub fn deliver(&mut self) -> Option<Message> {
        let m = self.ready.pop_front()?;
        self.unacked.push(m.clone());
        Some(m)
    }
    /// Acks every unacked delivery (consumers here handle one delivery or one batch at a
    /// time, and ack it whole).
    pub fn ack_all(&mut self) {
        self.unacked.clear();
    }
    /// The consumer's connection was lost: its unacked deliveries go back to the head,
    /// in order, marked redelivered.
    pub fn connection_lost(&mut self) {
        for mut m in self.unacked.drain(..).rev() {
            m.redelivered = true;
            self.ready.push_front(m);
        }
    }
    pub fn len(&self) -> usize {
        self.ready.len() + self.unacked.len()
    }
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
pub struct Broker {
    pub update: Queue,
    pub nodes: BTreeMap<NodeId, Queue>,
    /// `sync.drops`: for each message a node queue dropped, the node (the manager reads
    /// the queue from the dead letter's `x-death` header) and the manager's
    /// outbox row it came from.
    pub drops: Vec<(NodeId, Option<i64>)>,
}

impl Broker {
    pub fn declare_node(&mut self, id: &NodeId) {
        self.nodes.entry(id.clone()).or_default();
    }
    /// A publish on `sync.master` with routing key `key`.
    pub fn publish_master(&mut self, key: &str, body: &[u8], seq: i64) {
        for (id, q) in self.nodes.iter_mut() {
            if key == topology::BROADCAST_KEY || key == topology::node_key(id) {
                q.publish_seq(body.to_vec(), Some(seq));
            }
        }
    }
    /// Messages anywhere in the broker.
    pub fn in_flight(&self) -> usize {
        self.update.len() + self.nodes.values().map(Queue::len).sum::<usize>()
    }
}
