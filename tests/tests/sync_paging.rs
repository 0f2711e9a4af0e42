//! Sync replies of a large tree, and a flood of sync requests.
//!
//! Before paging, the manager answered a `Sync` with every path ever known in one
//! message, built inside its batch transaction, once per request: a tree of this size made
//! a reply the broker refuses (over `max_message_size`, scripts/setup.sh), and a node
//! asking again and again made the manager read the whole tree each time.
//!
//! The tree is made by publishing changes as a node with no mount (cheap), then a real
//! node joins.

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use std::time::{Duration, Instant};
use system_tests::*;
use wire::{topology, Change, ChangeOp, Content, ContentHash, Envelope, MessageId, NodeId, RelPath, Revision, ToManager, ToNode, Version};

/// Directories × files of the large tree. With paths of ~960 bytes, the reply is over
/// 18 MB: more than the broker takes in one message, and five pages.
const DIRS: usize = 30;
const FILES_PER_DIR: usize = 500;

/// A connection to the test's vhost that publishes as a node, pipelining the confirms, and
/// reads queues.
struct Publisher {
    rt: tokio::runtime::Runtime,
    conn: lapin::Connection,
    ch: lapin::Channel,
    from: NodeId,
}

impl Publisher {
    fn connect(vhost: &Vhost, from: &str) -> Publisher {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (conn, ch) = rt.block_on(async {
            let conn = broker_link::connect(&vhost.url()).await.unwrap();
            let ch = broker_link::confirmed_channel(&conn).await.unwrap();
            broker_link::declare_common(&conn).await.unwrap();
            (conn, ch)
        });
        Publisher { rt, conn, ch, from: from.parse().unwrap() }
    }

    /// Publishes every body on the update queue, in order, ids `{prefix}-{n}`, with up to
    /// `window` confirms outstanding.
    fn publish(&self, prefix: &str, bodies: Vec<ToManager>, window: usize) {
        self.rt.block_on(async {
            let mut confirms = Vec::new();
            for (n, body) in bodies.into_iter().enumerate() {
                let id = format!("{prefix}-{n}");
                let bytes = Envelope::new(id.parse().unwrap(), self.from.clone(), body).encode();
                let props = BasicProperties::default().with_delivery_mode(2).with_message_id(id.into());
                let confirm = self.ch.basic_publish("".into(), topology::UPDATE_QUEUE.into(), BasicPublishOptions::default(), &bytes, props).await.unwrap();
                confirms.push(confirm);
                if confirms.len() >= window {
                    for c in confirms.drain(..) {
                        assert!(c.await.unwrap().is_ack(), "the broker refused a message");
                    }
                }
            }
            for c in confirms {
                assert!(c.await.unwrap().is_ack(), "the broker refused a message");
            }
        });
    }

    /// A queue bound to the master exchange with `keys`, to read what the manager sends.
    fn spy(&self, name: &str, keys: &[String]) {
        self.rt.block_on(async {
            self.ch.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
            for key in keys {
                self.ch
                    .queue_bind(name.into(), topology::MASTER_EXCHANGE.into(), key.as_str().into(), QueueBindOptions::default(), FieldTable::default())
                    .await
                    .unwrap();
            }
        });
    }

    /// The next message waiting in `queue` (taken off it), if any.
    fn take(&self, queue: &str) -> Option<Vec<u8>> {
        let got = self.rt.block_on(self.ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })).unwrap();
        got.map(|m| m.delivery.data)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.rt.block_on(self.conn.close(200, "test done".into()));
    }
}

fn empty_file() -> Version {
    Version {
        content: Content::File { hash: ContentHash::from_bytes(*blake3::hash(b"").as_bytes()), size: 0 },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 1_764_000_000_000_000_000,
    }
}

fn put(path: &str) -> ToManager {
    ToManager::Change(Change::new(RelPath::new(path).unwrap(), Revision(0), ChangeOp::Put { version: empty_file() }))
}

fn sync(request: &str) -> ToManager {
    ToManager::Sync {
        request: request.parse().unwrap(),
        url: "http://127.0.0.1:1/fake".into(),
        since: Revision(0),
        paged: true,
        snapshot: true,
        taken: Revision(0),
        applied: Revision(0),
    }
}

/// The directory holding the files of group `d`, three levels down.
fn dir_name(d: usize) -> String {
    format!("d{d:02}-{}/{}/{}", "x".repeat(230), "e".repeat(240), "g".repeat(240))
}

/// Live paths in the manager's database.
fn manager_paths(db: &std::path::Path) -> i64 {
    let Ok(conn) = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM paths WHERE version IS NOT NULL", [], |r| r.get(0)).unwrap_or(0)
}

struct Page {
    bytes: usize,
    request: MessageId,
    entries: usize,
    page: u32,
    more: bool,
}

/// Every sync reply page waiting in `queue`, with its size; fails on any message larger
/// than a page may be.
fn pages_in(p: &Publisher, queue: &str) -> Vec<Page> {
    let mut pages = Vec::new();
    while let Some(bytes) = p.take(queue) {
        assert!(bytes.len() <= wire::SYNC_PAGE_BYTES, "a message of {} bytes, over the page budget of {}", bytes.len(), wire::SYNC_PAGE_BYTES);
        if let ToNode::SyncReply { request, entries, page, more, .. } = Envelope::<ToNode>::decode(&bytes).unwrap().body {
            pages.push(Page { bytes: bytes.len(), request, entries: entries.len(), page, more });
        }
    }
    pages
}

#[test]
fn a_node_joining_a_large_tree_gets_it_in_pages_under_the_budget() {
    let start = Instant::now();
    let mut c = Cluster::start("paging", 0);
    let seed = Publisher::connect(&c.vhost, "seed");
    let paths: Vec<String> = (0..DIRS).flat_map(|d| (0..FILES_PER_DIR).map(move |f| format!("{}/f{f:04}-{}", dir_name(d), "y".repeat(240)))).collect();
    seed.publish("seed", paths.iter().map(|p| put(p)).collect(), 1_000);
    let want = (DIRS * FILES_PER_DIR + 3 * DIRS) as i64;
    eventually("the manager to decide every change", Duration::from_secs(120), || manager_paths(&c.manager.db) == want);
    eprintln!("tree of {want} paths decided after {:?}", start.elapsed());

    // A copy of everything the manager sends the new node.
    seed.spy("spy-n1", &[topology::node_key(&"n1".parse().unwrap())]);
    let i = c.add_node("n1");
    let n1 = &c.nodes[i];
    n1.wait_connected();
    eventually("n1 to show every path", Duration::from_secs(120), || {
        (0..DIRS).all(|d| std::fs::read_dir(n1.p(&dir_name(d))).map(|rd| rd.count()).unwrap_or(0) == FILES_PER_DIR)
    });
    eprintln!("n1 shows the tree after {:?}", start.elapsed());
    let log = std::fs::read_to_string(&c.manager.log).unwrap();
    let answered = log.lines().find(|l| l.contains("sync answered") && l.contains("node=n1")).unwrap_or_else(|| panic!("the manager logged no answer to n1"));
    let field = |name: &str| -> usize {
        let at = answered.find(&format!(" {name}=")).unwrap_or_else(|| panic!("no {name} in {answered}"));
        answered[at + name.len() + 2..].split(|ch: char| !ch.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    assert!(field("pages") >= 4, "{answered}");
    assert!(field("largest_page") <= wire::SYNC_PAGE_BYTES, "{answered}");

    let pages = pages_in(&seed, "spy-n1");
    assert!(pages.len() >= 4, "{} page(s)", pages.len());
    let request = pages[0].request.clone();
    for (n, p) in pages.iter().enumerate() {
        assert_eq!((&p.request, p.page as usize, p.more), (&request, n, n + 1 < pages.len()), "pages of one reply, in order, the last one marked");
    }
    assert!(pages.iter().map(|p| p.entries).sum::<usize>() >= want as usize);
    eprintln!("{} pages, the largest {} bytes; done after {:?}", pages.len(), pages.iter().map(|p| p.bytes).max().unwrap(), start.elapsed());
}

#[test]
fn a_burst_of_syncs_from_one_node_gets_few_replies() {
    const BURST: usize = 200;
    let c = Cluster::start("syncflood", 0);
    let fake = Publisher::connect(&c.vhost, "flood");
    fake.publish("seed", (0..20).map(|n| put(&format!("f{n}"))).collect(), 1_000);
    let queue = "spy-flood";
    fake.spy(queue, &[topology::node_key(&"flood".parse().unwrap())]);

    // One at a time, each confirmed before the next (as fast as one node can send them):
    // they reach the manager over many batches, so merging within a batch is not enough.
    let started = Instant::now();
    fake.publish("sync", (0..BURST).map(|n| sync(&format!("flood-{n}"))).collect(), 1);
    let burst = started.elapsed();
    // The newest request is answered last, and nothing is left waiting after it.
    let last = format!("flood-{}", BURST - 1);
    let mut pages = Vec::new();
    eventually("the reply to the newest request", DEADLINE, || {
        pages.extend(pages_in(&fake, queue));
        pages.iter().any(|p| p.request.as_str() == last && !p.more)
    });
    let replies: Vec<&str> = pages.iter().filter(|p| p.page == 0).map(|p| p.request.as_str()).collect();
    eprintln!("{BURST} syncs published in {burst:?}; {} replies: {replies:?}", replies.len());
    // One reply at once and the rest merged into the next, a second later; a slow
    // machine may spread the burst over a few seconds.
    let bound = 2 + burst.as_secs() as usize;
    assert!(replies.len() <= bound.min(5), "{} full replies to a burst of {BURST} syncs published in {burst:?}", replies.len());
    let log = std::fs::read_to_string(&c.manager.log).unwrap();
    let merged: usize = log
        .lines()
        .filter(|l| l.contains("sync answered") && l.contains("node=flood"))
        .filter_map(|l| l.split(" requests=").nth(1)?.split(' ').next()?.parse::<usize>().ok())
        .sum();
    assert_eq!(merged, BURST, "every request is answered by some reply");
}

/// What scripts/setup.sh sets, and what the page budget is measured against.
#[test]
fn the_broker_refuses_messages_over_its_limit() {
    let vhost = Vhost::new("maxsize");
    let p = Publisher::connect(&vhost, "big");
    let at_limit = vec![b'x'; wire::BROKER_MAX_MESSAGE_BYTES];
    p.rt.block_on(broker_link::publish_confirmed(&p.ch, "", "nowhere", "at-limit", &at_limit)).expect("a message at the limit is taken");
    let over = vec![b'x'; wire::BROKER_MAX_MESSAGE_BYTES + 1];
    let refused = p.rt.block_on(broker_link::publish_confirmed(&p.ch, "", "nowhere", "over", &over));
    assert!(refused.is_err(), "the broker took a message over max_message_size: run scripts/setup.sh");
}
