//! What the manager's outbox rows become on the broker: each run of consecutive
//! `Applied` broadcasts and messages for one node (`Decided` answers, `Keep` of kept
//! versions' contents) goes out as one broadcast
//! [`ToNode::Batch`], so a burst of changes costs the broker one delivery per node per
//! run instead of two or three per change. Everything else (sync reply pages, sync
//! requests), and a run of one, goes out as it is.
//!
//! Order: a node's queue receives the broadcasts and the messages for that node. A run
//! holds only those two kinds, in outbox order, and each node takes from a batch the
//! broadcasts and its own items in that order; runs and the other rows are published in
//! outbox order. So every node queue sees exactly the sequence it would have seen one
//! row at a time. The only new thing a node sees is the other nodes' decisions, which
//! it skips (they hold nothing a broadcast does not already show every node: the path's
//! current state, the change's id and outcome).

use crate::store::Outgoing;
use wire::{topology, BatchItem, Envelope, NodeId, ToNode};

/// The largest batch, in bytes of the rows it holds: well below the broker's message
/// size limit (a node decodes and applies one delivery at a time).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// `rows` (outbox order) as the messages to publish, in the order to publish them. Each
/// message keeps the `seq` of the last row it carries.
pub fn for_broker(rows: Vec<Outgoing>) -> Vec<Outgoing> {
    let mut out = Vec::with_capacity(rows.len());
    let mut run = Run::default();
    for row in rows {
        match item_of(&row) {
            Some(item) => {
                if run.bytes + row.payload.len() > MAX_BATCH_BYTES {
                    run.close(&mut out);
                }
                run.push(row, item);
            }
            None => {
                run.close(&mut out);
                out.push(row);
            }
        }
    }
    run.close(&mut out);
    out
}

/// The row as an item of a batch, if it can be one.
fn item_of(row: &Outgoing) -> Option<BatchItem> {
    // The manager's own rows always decode; one that did not would go out as it is.
    let env = Envelope::<ToNode>::decode(&row.payload).ok()?;
    match env.body {
        msg @ ToNode::Applied { .. } if row.key == topology::BROADCAST_KEY => Some(BatchItem { to: None, msg }),
        // A `keep` must reach its node before the broadcast that makes its version old;
        // a `release` has no such order and goes to its node alone (a batch is seen by
        // every node).
        msg @ (ToNode::Decided { .. } | ToNode::Keep { .. }) => Some(BatchItem { to: Some(topology::node_of_key(&row.key)?), msg }),
        _ => None,
    }
}

/// Consecutive batchable rows not yet published.
#[derive(Default)]
struct Run {
    rows: Vec<Outgoing>,
    items: Vec<BatchItem>,
    bytes: usize,
}

impl Run {
    fn push(&mut self, row: Outgoing, item: BatchItem) {
        self.bytes += row.payload.len();
        self.rows.push(row);
        self.items.push(item);
    }

    /// Appends the run to `out`: one row as it is, several as one batch broadcast (with
    /// the id of its first row, which keeps a simulated run reproducible).
    fn close(&mut self, out: &mut Vec<Outgoing>) {
        let rows = std::mem::take(&mut self.rows);
        let items = std::mem::take(&mut self.items);
        self.bytes = 0;
        match rows.len() {
            0 => {}
            1 => out.extend(rows),
            _ => {
                let (first, last) = (&rows[0], &rows[rows.len() - 1]);
                let id = first.id.parse().expect("outbox ids are message ids");
                let payload = Envelope::new(id, NodeId::manager(), ToNode::Batch { items }).encode();
                out.push(Outgoing { seq: last.seq, key: topology::BROADCAST_KEY.to_string(), id: first.id.clone(), payload });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{Entry, Outcome, RelPath, Revision};

    fn row(seq: i64, key: &str, body: ToNode) -> Outgoing {
        let id = format!("m{seq}");
        let payload = Envelope::new(id.parse().unwrap(), NodeId::manager(), body).encode();
        Outgoing { seq, key: key.to_string(), id, payload }
    }
    fn entry(p: &str, rev: u64) -> Entry {
        Entry { path: RelPath::new(p).unwrap(), rev: Revision(rev), version: None, holders: vec![], from_lost: None }
    }
    fn node(n: &str) -> NodeId {
        n.parse().unwrap()
    }
    fn applied(p: &str, rev: u64) -> ToNode {
        ToNode::Applied { entry: entry(p, rev), origin: node("n1") }
    }
    fn decided(p: &str, rev: u64) -> ToNode {
        ToNode::Decided { change: format!("c{rev}").parse().unwrap(), outcome: Outcome::Accepted, current: entry(p, rev), first_rev: None }
    }

    /// What node `me` receives from `published` (its queue: broadcasts and its own
    /// key), batches taken apart as the node does.
    fn received(published: &[Outgoing], me: &str) -> Vec<ToNode> {
        let me = node(me);
        published
            .iter()
            .filter(|o| o.key == topology::BROADCAST_KEY || o.key == topology::node_key(&me))
            .flat_map(|o| Envelope::<ToNode>::decode(&o.payload).expect("decodes within the limits").body.into_parts_for(&me))
            .collect()
    }

    #[test]
    fn every_node_receives_what_it_would_have_in_the_same_order() {
        let (k1, k2) = (topology::node_key(&node("n1")), topology::node_key(&node("n2")));
        let sync_page = ToNode::SyncReply { request: "r".parse().unwrap(), head: Revision(3), entries: vec![entry("z", 1)], page: 0, more: false };
        let rows = vec![
            row(1, topology::BROADCAST_KEY, applied("a", 1)),
            row(2, &k1, decided("a", 1)),
            row(3, topology::BROADCAST_KEY, applied("b", 2)),
            row(4, &k2, decided("b", 2)),
            row(5, &k2, sync_page),
            row(6, topology::BROADCAST_KEY, applied("c", 3)),
            row(7, &k1, ToNode::SyncRequested {}),
            row(8, &k1, decided("d", 4)),
        ];
        let one_by_one: Vec<Outgoing> =
            rows.iter().map(|r| Outgoing { seq: r.seq, key: r.key.clone(), id: r.id.clone(), payload: r.payload.clone() }).collect();
        let published = for_broker(rows);
        // Rows 1–4 become one batch; 5, 6, 7 and 8 go as they are.
        assert_eq!(published.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8]);
        assert_eq!(published[0].key, topology::BROADCAST_KEY);
        for me in ["n1", "n2", "n3"] {
            assert_eq!(received(&published, me), received(&one_by_one, me), "node {me}");
        }
        assert_eq!(received(&published, "n3").len(), 3, "a node with no decisions gets the three broadcasts");
    }

    #[test]
    fn a_batch_stays_under_its_size_limit() {
        let big = "x".repeat(200);
        let rows: Vec<Outgoing> = (1..=20_000).map(|i| row(i, topology::BROADCAST_KEY, applied(&format!("{big}/{i}"), i as u64))).collect();
        let published = for_broker(rows);
        assert!(published.len() > 1, "20,000 rows of ~400 bytes do not fit in one batch");
        for o in &published {
            assert!(o.payload.len() <= MAX_BATCH_BYTES + 4096, "batch of {} bytes", o.payload.len());
        }
        assert_eq!(published.last().unwrap().seq, 20_000);
        let items: usize = published.iter().map(|o| received(std::slice::from_ref(o), "n9").len()).sum();
        assert_eq!(items, 20_000);
    }

    #[test]
    fn a_batch_holding_anything_else_is_refused_by_a_node() {
        let bad = ToNode::Batch { items: vec![BatchItem { to: None, msg: ToNode::SyncRequested {} }] };
        let bytes = Envelope::new("b".parse().unwrap(), NodeId::manager(), bad).encode();
        assert!(Envelope::<ToNode>::decode(&bytes).is_err());
        let no_addressee = ToNode::Batch { items: vec![BatchItem { to: None, msg: decided("a", 1) }] };
        assert!(Envelope::<ToNode>::decode(&Envelope::new("b".parse().unwrap(), NodeId::manager(), no_addressee).encode()).is_err());
    }

    /// Keeping old versions interleaves `keep` rows for single nodes with the decisions:
    /// they join the run, each node still receiving its own in order; a `release` goes
    /// to its node alone.
    #[test]
    fn keeps_and_releases_ride_in_the_run_for_their_node_only() {
        let (k1, k2) = (topology::node_key(&node("n1")), topology::node_key(&node("n2")));
        let h = wire::ContentHash::from_bytes([1; 32]);
        let keep = ToNode::Keep { items: vec![wire::KeepItem { hash: h.clone(), size: 3, until_ms: 9, holders: vec![] }] };
        let rows = vec![
            row(1, &k2, keep.clone()),
            row(2, &k1, keep),
            row(3, topology::BROADCAST_KEY, applied("a", 1)),
            row(4, &k1, decided("a", 1)),
            row(5, &k2, ToNode::Release { hashes: vec![h] }),
            row(6, topology::BROADCAST_KEY, applied("b", 2)),
        ];
        let one_by_one: Vec<Outgoing> =
            rows.iter().map(|r| Outgoing { seq: r.seq, key: r.key.clone(), id: r.id.clone(), payload: r.payload.clone() }).collect();
        let published = for_broker(rows);
        assert_eq!(published.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![4, 5, 6], "a batch up to the release, which goes alone");
        for me in ["n1", "n2", "n3"] {
            assert_eq!(received(&published, me), received(&one_by_one, me), "node {me}");
        }
        assert_eq!(received(&published, "n2").len(), 4, "its keep, the two broadcasts, its release");
        let stray = ToNode::Batch { items: vec![BatchItem { to: None, msg: ToNode::Release { hashes: vec![] } }] };
        assert!(Envelope::<ToNode>::decode(&Envelope::new("b".parse().unwrap(), NodeId::manager(), stray).encode()).is_err(), "a release for nobody");
    }
}
