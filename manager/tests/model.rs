//! The manager's store against a plain reference model (STYLE 16): random changes from
//! three nodes, with fresh or stale bases, duplicates and content collisions on a tiny
//! name alphabet. After every step the store's state of every path, its head revision
//! and the decision sent back must match the model.

use manager::store::Store;
use proptest::prelude::*;
use std::collections::BTreeMap;
use wire::{Change, ChangeOp, Content, ContentHash, Envelope, NodeId, Outcome, RelPath, Revision, ToManager, ToNode, Version};

#[derive(Clone, Debug)]
enum Op {
    /// Node `node` writes `content` to `name`, based on what it last saw (or an older view).
    Put {
        node: usize,
        name: usize,
        content: u8,
        stale: bool,
    },
    Delete {
        node: usize,
        name: usize,
        stale: bool,
    },
    /// The last message is delivered again.
    Duplicate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..3usize, 0..3usize, 0..3u8, any::<bool>()).prop_map(|(node, name, content, stale)| Op::Put { node, name, content, stale }),
        2 => (0..3usize, 0..3usize, any::<bool>()).prop_map(|(node, name, stale)| Op::Delete { node, name, stale }),
        1 => Just(Op::Duplicate),
    ]
}

const NAMES: [&str; 3] = ["a.txt", "b", "c.md"];

fn version(content: u8) -> Version {
    Version { content: Content::File { hash: ContentHash::from_bytes([content; 32]), size: 1 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 }
}

/// The reference: path → (revision, content or None when deleted).
#[derive(Default)]
struct Model {
    head: u64,
    paths: BTreeMap<String, (u64, Option<u8>)>,
    /// Every state each path had, by revision.
    history: BTreeMap<(String, u64), Option<u8>>,
    copies: BTreeMap<String, usize>,
}

impl Model {
    fn set(&mut self, path: &str, c: Option<u8>) {
        self.head += 1;
        self.paths.insert(path.to_string(), (self.head, c));
        self.history.insert((path.to_string(), self.head), c);
    }
    /// Returns the expected outcome kind.
    fn apply(&mut self, path: &str, base: u64, put: Option<u8>) -> &'static str {
        let cur = self.paths.get(path).copied();
        match (put, cur) {
            (Some(c), None | Some((_, None))) => {
                self.set(path, Some(c));
                "accepted"
            }
            (None, None | Some((_, None))) => "unchanged",
            (Some(c), Some((_, Some(cc)))) if c == cc => "unchanged",
            (Some(c), Some((r, Some(_)))) if r == base => {
                self.set(path, Some(c));
                "accepted"
            }
            // The bytes the path had at the base, written over elsewhere since: nothing
            // was written here (the mode is the same throughout).
            (Some(c), Some(_)) if self.history.get(&(path.to_string(), base)) == Some(&Some(c)) => "unchanged",
            // The bytes the path has now are those it had at the base (only its metadata,
            // or nothing, changed elsewhere since): the write is taken.
            (Some(c), Some((_, Some(cc)))) if self.history.get(&(path.to_string(), base)) == Some(&Some(cc)) => {
                self.set(path, Some(c));
                "accepted"
            }
            (Some(_), Some(_)) => {
                let n = self.copies.entry(path.to_string()).or_default();
                if *n >= 20 {
                    return "refused";
                }
                *n += 1;
                self.head += 1;
                "conflict"
            }
            (None, Some((r, Some(_)))) if r == base => {
                self.set(path, None);
                "accepted"
            }
            // Deleted on a stale base, the path's bytes still those at the base: nothing
            // written elsewhere is deleted.
            (None, Some((_, Some(cc)))) if self.history.get(&(path.to_string(), base)) == Some(&Some(cc)) => {
                self.set(path, None);
                "accepted"
            }
            (None, Some(_)) => "refused",
        }
    }
}

fn last_decision(store: &Store) -> Option<Outcome> {
    store.outbox(100_000).unwrap().into_iter().rev().find_map(|o| match Envelope::<ToNode>::decode(&o.payload).unwrap().body {
        ToNode::Decided { outcome, .. } => Some(outcome),
        _ => None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn store_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("m.db")).unwrap();
        let mut model = Model::default();
        // What each node last saw of each path (its base), as revisions.
        let mut seen: [BTreeMap<String, u64>; 3] = Default::default();
        let mut last: Option<(Envelope<ToManager>, &'static str)> = None;
        for (i, op) in ops.into_iter().enumerate() {
            let (env, expect) = match op {
                Op::Duplicate => match &last {
                    Some((env, _)) => (env.clone(), "same"),
                    None => continue,
                },
                Op::Put { node, name, content, stale } => {
                    let path = NAMES[name];
                    let base = if stale { 0 } else { seen[node].get(path).copied().unwrap_or(0) };
                    let expect = model.apply(path, base, Some(content));
                    let change = Change::new(RelPath::new(path).unwrap(), Revision(base), ChangeOp::Put { version: version(content) });
                    (Envelope::new(format!("m{i}").parse().unwrap(), format!("n{node}").parse::<NodeId>().unwrap(), ToManager::Change(change)), expect)
                }
                Op::Delete { node, name, stale } => {
                    let path = NAMES[name];
                    let base = if stale { 0 } else { seen[node].get(path).copied().unwrap_or(0) };
                    let expect = model.apply(path, base, None);
                    let change = Change::new(RelPath::new(path).unwrap(), Revision(base), ChangeOp::Delete);
                    (Envelope::new(format!("m{i}").parse().unwrap(), format!("n{node}").parse::<NodeId>().unwrap(), ToManager::Change(change)), expect)
                }
            };
            let sender: usize = env.from.as_str()[1..].parse().unwrap();
            store.transaction(|tx| tx.handle(env.clone(), 1_000 * i as i64)).unwrap();
            let got = last_decision(&store).expect("every change gets a decision");
            let kind = match &got {
                Outcome::Accepted => "accepted",
                Outcome::Unchanged => "unchanged",
                Outcome::Conflict { .. } => "conflict",
                Outcome::Refused { .. } => "refused",
            };
            if expect == "same" {
                prop_assert_eq!(kind, last.as_ref().unwrap().1, "a duplicate gets the same decision");
            } else {
                prop_assert_eq!(kind, expect, "decision for op {}", i);
                last = Some((env.clone(), expect));
            }
            prop_assert_eq!(store.head().unwrap().0, model.head, "head revision after op {}", i);
            for (path, (rev, content)) in &model.paths {
                let e = store.entry(&RelPath::new(path.clone()).unwrap()).unwrap().expect("path known");
                prop_assert_eq!(e.rev.0, *rev);
                prop_assert_eq!(e.version.clone(), content.map(version));
            }
            // The sender learns the current state: its next change is based on it.
            if let ToManager::Change(c) = &env.body {
                let e = store.entry(&c.path).unwrap().map(|e| e.rev.0).unwrap_or(0);
                seen[sender].insert(c.path.to_string(), e);
            }
        }
    }
}
