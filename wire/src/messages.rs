//! The messages: what nodes send the manager (update channel) and what the manager sends
//! nodes (master channel), inside a versioned envelope.

use crate::versions::{check_items, Answer, KeepItem, Query, MAX_KEEP_ITEMS, MAX_KEPT_REPORT, MAX_LISTED};
use crate::{ContentHash, MessageId, NodeId, RelPath, Revision};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Version of this protocol; a receiver refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message a receiver decodes; larger ones are dead-lettered. Looser than the
/// broker's own limit ([`BROKER_MAX_MESSAGE_BYTES`]), which refuses anything larger first.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// The broker's `max_message_size`, as `scripts/setup.sh` sets it: a publish larger than
/// this is refused by RabbitMQ (and closes the publisher's channel), so nothing the
/// manager or a node sends may come near it.
pub const BROKER_MAX_MESSAGE_BYTES: usize = 16 << 20;
/// Most bytes of one encoded `SyncReply` page (envelope included). A reply for a large
/// tree is sent as several pages; a quarter of the broker's limit leaves room for any
/// single entry (its holders are trimmed to fit) and keeps each page's JSON small enough
/// to build, publish and apply without holding anything for long. About 15,000 entries
/// of ordinary paths fit in one page.
pub const SYNC_PAGE_BYTES: usize = 4 << 20;
const _: () = assert!(SYNC_PAGE_BYTES * 4 <= BROKER_MAX_MESSAGE_BYTES && BROKER_MAX_MESSAGE_BYTES <= MAX_MESSAGE_BYTES);
/// Largest message a node may send the manager: every node → manager message is a few
/// short fields (a 20 MB heartbeat is refused before it is parsed).
pub const MAX_TO_MANAGER_BYTES: usize = 64 << 10;
/// Longest URL of a node's content server.
pub const MAX_URL_BYTES: usize = 2048;
/// Longest program version string a node reports.
pub const MAX_SOFTWARE_BYTES: usize = 128;
/// Longest symlink target (Linux PATH_MAX, without the terminating NUL).
pub const MAX_SYMLINK_TARGET_BYTES: usize = 4095;
/// Longest reason text in a refusal.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most holders listed for one entry.
pub const MAX_HOLDERS: usize = 1024;

/// Every message on the broker: protocol version, unique id, sender and body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<B> {
    pub v: u32,
    pub id: MessageId,
    pub from: NodeId,
    pub body: B,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes is larger than the limit of {1}")]
    TooLarge(usize, usize),
    #[error("message has protocol version {0}, this program speaks {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("message field out of bounds: {0}")]
    Bounds(String),
}

/// A message body: its size limit, and the bounds of each of its fields, checked at
/// decode so an oversized field never reaches a database or a file system.
pub trait Body {
    /// Largest encoded envelope with this body.
    const MAX_BYTES: usize;
    fn check_bounds(&self) -> Result<(), String>;
}

/// For `skip_serializing_if`: a field at its default (0, an empty revision) is left out.
pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn bounded_str(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{what} has {} bytes, more than {max}", s.len()));
    }
    Ok(())
}

impl Version {
    fn check_bounds(&self) -> Result<(), String> {
        match &self.content {
            Content::Symlink { target } => {
                if target.is_empty() || target.contains('\0') {
                    return Err("a symlink target must be non-empty and hold no NUL".into());
                }
                bounded_str("symlink target", target, MAX_SYMLINK_TARGET_BYTES)
            }
            _ => Ok(()),
        }?;
        if self.mode > 0o7777 {
            return Err(format!("mode {:o} has bits beyond 07777", self.mode));
        }
        Ok(())
    }
}

impl Entry {
    fn check_bounds(&self) -> Result<(), String> {
        if let Some(v) = &self.version {
            v.check_bounds()?;
        }
        if self.holders.len() > MAX_HOLDERS {
            return Err(format!("{} holders, more than {MAX_HOLDERS}", self.holders.len()));
        }
        self.holders.iter().try_for_each(|h| bounded_str("holder URL", &h.url, MAX_URL_BYTES))
    }
}

impl Change {
    fn check_bounds(&self) -> Result<(), String> {
        match &self.op {
            ChangeOp::Put { version } => version.check_bounds(),
            ChangeOp::Delete => Ok(()),
        }
    }
}

impl Body for ToManager {
    const MAX_BYTES: usize = MAX_TO_MANAGER_BYTES;
    fn check_bounds(&self) -> Result<(), String> {
        match self {
            ToManager::Heartbeat { url, software, residency, .. } => {
                bounded_str("heartbeat URL", url, MAX_URL_BYTES)?;
                bounded_str("software version", software, MAX_SOFTWARE_BYTES)?;
                residency.as_ref().map_or(Ok(()), NodeResidency::check_bounds)
            }
            ToManager::Sync { url, .. } => bounded_str("sync URL", url, MAX_URL_BYTES),
            ToManager::Change(c) => c.check_bounds(),
            ToManager::Changes { items } => {
                check_items("changes", items, MAX_CHANGES_PER_MESSAGE)?;
                items.iter().try_for_each(|i| i.change.check_bounds())
            }
            ToManager::Holding { items } if items.len() > MAX_HELD => Err(format!("{} held paths, more than {MAX_HELD}", items.len())),
            ToManager::Kept { keeping, lacking } => check_items("kept hashes", &[keeping.as_slice(), lacking.as_slice()].concat(), MAX_KEPT_REPORT),
            ToManager::Have { .. } | ToManager::Holding { .. } | ToManager::Ask { .. } => Ok(()),
        }
    }
}

impl Body for ToNode {
    const MAX_BYTES: usize = MAX_MESSAGE_BYTES;
    fn check_bounds(&self) -> Result<(), String> {
        match self {
            ToNode::Applied { entry, .. } => entry.check_bounds(),
            ToNode::Decided { outcome, current, .. } => {
                if let Outcome::Refused { reason } = outcome {
                    bounded_str("refusal reason", reason, MAX_REASON_BYTES)?;
                }
                current.check_bounds()
            }
            ToNode::SyncReply { entries, .. } => entries.iter().try_for_each(Entry::check_bounds),
            ToNode::SyncRequested {} | ToNode::Forgotten { .. } => Ok(()),
            ToNode::Keep { items } => {
                check_items("items to keep", items, MAX_KEEP_ITEMS)?;
                items.iter().try_for_each(|i| {
                    check_items("holders", &i.holders, MAX_HOLDERS)?;
                    i.holders.iter().try_for_each(|h| bounded_str("holder URL", &h.url, MAX_URL_BYTES))
                })
            }
            ToNode::Release { hashes } => check_items("hashes to release", hashes, MAX_KEEP_ITEMS),
            ToNode::Answer { answer, .. } => match answer {
                Answer::Versions { versions, .. } => check_items("versions", versions, MAX_LISTED),
                Answer::Trash { items } => check_items("trash items", items, MAX_LISTED),
                Answer::Failed { reason } => bounded_str("failure reason", reason, MAX_REASON_BYTES),
                Answer::Restored(_) => Ok(()),
                Answer::MayDrop { droppable } => check_items("verdicts", droppable, MAX_KEEP_ITEMS),
                Answer::Holders { holders, .. } => {
                    check_items("holders", holders, MAX_HOLDERS)?;
                    holders.iter().try_for_each(|h| bounded_str("holder URL", &h.url, MAX_URL_BYTES))
                }
            },
            ToNode::Batch { items } => items.iter().try_for_each(|i| match (&i.to, &i.msg) {
                (None, m @ ToNode::Applied { .. }) | (Some(_), m @ (ToNode::Decided { .. } | ToNode::Keep { .. } | ToNode::Release { .. })) => m.check_bounds(),
                _ => Err("a batch holds only `applied` for every node, and `decided`, `keep` and `release` for one node".to_string()),
            }),
        }
    }
}

impl<B: Serialize + DeserializeOwned + Body> Envelope<B> {
    pub fn new(id: MessageId, from: NodeId, body: B) -> Self {
        Envelope { v: PROTOCOL_VERSION, id, from, body }
    }
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("wire types always serialize")
    }
    /// Strict decoding: size limit, protocol version, then every field validated and
    /// bounded ([`Body`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > B::MAX_BYTES {
            return Err(DecodeError::TooLarge(bytes.len(), B::MAX_BYTES));
        }
        #[derive(Deserialize)]
        struct VersionOnly {
            v: u32,
        }
        let probe: VersionOnly = serde_json::from_slice(bytes)?;
        if probe.v != PROTOCOL_VERSION {
            return Err(DecodeError::Version(probe.v));
        }
        let env: Self = serde_json::from_slice(bytes)?;
        env.body.check_bounds().map_err(DecodeError::Bounds)?;
        Ok(env)
    }
}

/// What a path holds in one version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Content {
    File { hash: ContentHash, size: u64 },
    Dir,
    Symlink { target: String },
}

/// One version of a path: its content and the metadata that is synced.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    pub content: Content,
    /// Permission bits (07777), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// A node that can serve a content hash over HTTP.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holder {
    pub node: NodeId,
    /// Base URL of the node's peer HTTP server, e.g. `http://127.0.0.1:7001`.
    pub url: String,
}

/// The manager's current state of one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub path: RelPath,
    /// Revision at which this state was accepted.
    pub rev: Revision,
    /// `None` when the path is deleted.
    pub version: Option<Version>,
    /// Nodes that hold the content (files only), best first.
    #[serde(default)]
    pub holders: Vec<Holder>,
    /// This path's states since `at` come from a state the manager lost (its database
    /// brought back from an older copy) that a node had at lost revision `base`: a node
    /// that took a revision of the path between the two holds a later lost state, and
    /// sends it (docs/protocol.md, *A manager behind its nodes*). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_lost: Option<FromLost>,
}

/// Where a path's states come from when one was a state the manager lost
/// ([`Entry::from_lost`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromLost {
    /// The lost revision the node that sent it had.
    pub base: Revision,
    /// The revision the manager gave it.
    pub at: Revision,
}

/// A change a node made to one path, based on the revision it last saw there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    pub path: RelPath,
    /// The revision of the path the node's version was derived from (0: new path).
    pub base: Revision,
    /// Set when the change was made on top of the sender's own earlier change, not yet
    /// decided when this one was sent: the base is then that change's revision.
    #[serde(default)]
    pub follows: Option<MessageId>,
    pub op: ChangeOp,
    /// The mode and owners of the state the change was made on (the path's state at
    /// `base`, or what the change it follows put there), when the node knows them: the
    /// manager merges a put of the same bytes on a stale base three-way with them
    /// (docs/sync.md, *The rule*). Absent: not known (a new path, a delete, an older
    /// node); the manager then reads its history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_meta: Option<ModeAndOwners>,
    /// The content of the state the change was made on (as `base_meta`), when the node
    /// knows it: the bytes its write or delete replaced. The manager uses it, with
    /// `base_meta`, where its history lacks the base: a write over bytes only chmodded
    /// elsewhere since is then merged with that chmod, not made a conflict file beside
    /// bytes the node no longer holds (docs/sync.md, *The rule*). Absent: not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_content: Option<Content>,
}

impl Change {
    /// A change of `path` made on revision `base`, following no undecided change of the
    /// node's, with nothing said of the state it was made on.
    pub fn new(path: RelPath, base: Revision, op: ChangeOp) -> Self {
        Change { path, base, follows: None, op, base_meta: None, base_content: None }
    }
}

/// A version's permission bits and owners: what a chmod or chown changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeAndOwners {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl From<&Version> for ModeAndOwners {
    fn from(v: &Version) -> Self {
        ModeAndOwners { mode: v.mode, uid: v.uid, gid: v.gid }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChangeOp {
    /// Create or replace the path with this version (add, update, mkdir, symlink, chmod…).
    Put { version: Version },
    /// Remove the path (unlink, rmdir).
    Delete,
}

/// Node → manager, on the update channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToManager {
    /// Presence, every second, with the node's own view of its work.
    Heartbeat {
        url: String,
        /// Local changes not yet decided by the manager.
        pending_changes: u64,
        /// Contents being pulled.
        pending_pulls: u64,
        /// Program version of the node.
        software: String,
        /// A node with files on demand: what is local, its pin rules and the pulls under
        /// way (the dashboard shows them). Absent on other nodes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        residency: Option<NodeResidency>,
        /// The highest revision the node has taken. Above the manager's head, it tells
        /// the manager that its database lost decisions (restored from an older copy):
        /// docs/protocol.md, *A manager behind its nodes*. 0 (absent): not said.
        #[serde(default, skip_serializing_if = "is_default")]
        taken: Revision,
        /// As `Sync::applied`, said when what the node holds is on its disk (after a
        /// flush of its log; at most every few seconds): a node that completed a sync
        /// need not wait for its next one to vouch for the deletes it brought. 0
        /// (absent): not said this time (an older node, or writes not yet on disk); the
        /// manager keeps what it had.
        #[serde(default, skip_serializing_if = "is_default")]
        applied: Revision,
    },
    Change(Change),
    /// Several changes in one message, in the order they were made: each keeps its own
    /// id and is decided exactly as if it had come alone (at most
    /// [`MAX_CHANGES_PER_MESSAGE`], and the message within [`MAX_TO_MANAGER_BYTES`]).
    Changes {
        items: Vec<ChangeItem>,
    },
    /// The node now holds this path's content at this revision and can serve it. Sent
    /// by older nodes; a node now sends `Holding`.
    Have {
        path: RelPath,
        rev: Revision,
        hash: ContentHash,
    },
    /// `Have` for several paths at once: a node applying a batch of broadcasts or a sync
    /// reply page says what it took in one message instead of one per file.
    Holding {
        items: Vec<Held>,
    },
    /// Reconciliation request: answered with `SyncReply` pages once every earlier
    /// message of this node has been decided.
    Sync {
        request: MessageId,
        url: String,
        /// Deleted paths at or below this revision are left out of the reply: the node
        /// has applied every delete up to it (0, the default, asks for every one; the
        /// largest revision for none).
        #[serde(default)]
        since: Revision,
        /// The node takes a reply in several pages (`SyncReply::page`, `more`). A node
        /// that does not say so (an older one) gets one page or, when the reply does not
        /// fit in one, none.
        #[serde(default)]
        paged: bool,
        /// The node counts every path it hears of on its queue while the reply is under
        /// way (a broadcast, a decision) as named by the reply, so the reply may be a
        /// snapshot: the paths as of its first page's `head`, none changed later (those
        /// come on the queue). Without it (an older node) the reply also sends again the
        /// paths changed behind its walk meanwhile, and a tree that grows faster than
        /// the walk keeps it going.
        #[serde(default, skip_serializing_if = "is_false")]
        snapshot: bool,
        /// The highest revision the node has taken (as in `Heartbeat`).
        #[serde(default, skip_serializing_if = "is_default")]
        taken: Revision,
        /// The revision up to which the node vouches that it has applied every delete: its
        /// `since` once it has completed a sync, flushed to its disk before this was sent
        /// (0, the default: none, as an older node). The manager forgets a deleted path
        /// only once every node vouched past it (docs/sync.md, *When a tombstone goes*).
        #[serde(default, skip_serializing_if = "is_default")]
        applied: Revision,
    },
    /// What became of `ToNode::Keep` and `Release`: contents the node now keeps, and
    /// contents it was asked to keep but lacks or had to drop (its disk fell below its
    /// free-space floor). At most [`MAX_KEPT_REPORT`] hashes in all.
    Kept {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        keeping: Vec<ContentHash>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        lacking: Vec<ContentHash>,
    },
    /// A question for the manager on behalf of the node's user; the envelope's id is the
    /// request id the `ToNode::Answer` names.
    Ask {
        query: Query,
    },
}

/// Most pin rules a heartbeat names.
pub const MAX_HEARTBEAT_PINS: usize = 8;
/// Most pulls a heartbeat names.
pub const MAX_HEARTBEAT_PULLS: usize = 8;
/// Longest pinned path a heartbeat names (a longer one is counted, not named).
pub const MAX_HEARTBEAT_PIN_BYTES: usize = 512;

/// What a node with files on demand says of its contents (`ToManager::Heartbeat`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeResidency {
    /// Bytes of files whose content is on the node, and of those whose content is not.
    pub local_bytes: u64,
    pub remote_bytes: u64,
    /// Pin rules: path ("" for the root) and whether it is pinned (false: on demand).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<(String, bool)>,
    /// Rules not named in `pins`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub more_pins: u32,
    /// Pulls under way, with their bytes so far.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pulls: Vec<PullState>,
}

/// One pull under way on a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullState {
    pub hash: ContentHash,
    pub size: u64,
    pub done: u64,
}

impl NodeResidency {
    fn check_bounds(&self) -> Result<(), String> {
        check_items("pin rules", &self.pins, MAX_HEARTBEAT_PINS)?;
        check_items("pulls", &self.pulls, MAX_HEARTBEAT_PULLS)?;
        self.pins.iter().try_for_each(|(p, _)| bounded_str("pinned path", p, MAX_HEARTBEAT_PIN_BYTES))
    }
}

/// Most changes one `ToManager::Changes` carries.
pub const MAX_CHANGES_PER_MESSAGE: usize = 1024;

/// One change of a `ToManager::Changes`, with the id it is decided under.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeItem {
    pub id: MessageId,
    pub change: Change,
}

impl ChangeItem {
    /// Bytes `Changes` spends on this item: what a sender counts to keep each message
    /// under `MAX_TO_MANAGER_BYTES`.
    pub fn encoded_len(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |v| v.len() + 1)
    }
}

/// One path's content a node holds (`ToManager::Holding`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Held {
    pub path: RelPath,
    pub rev: Revision,
    pub hash: ContentHash,
}

impl Held {
    /// Bytes `Holding` spends on this item: what a sender counts to keep each message
    /// under `MAX_TO_MANAGER_BYTES`.
    pub fn encoded_len(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |v| v.len() + 1)
    }
}

/// Items one `Holding` message may carry at most, on top of the byte limit.
pub const MAX_HELD: usize = 4096;

/// How the manager decided a change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    /// The change became the path's current version at `current.rev`.
    Accepted,
    /// The path already held exactly this; nothing changed.
    Unchanged,
    /// The change was based on a stale revision; it was kept as the conflict file `copy`
    /// and the path kept the version the others had.
    Conflict { copy: RelPath },
    /// The change could not be applied (a delete of something edited elsewhere, a
    /// directory that is not empty any more…); the path keeps `current`.
    Refused { reason: String },
}

/// Manager → nodes, on the master channel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToNode {
    /// Broadcast: a path has a new current state.
    Applied { entry: Entry, origin: NodeId },
    /// To the sender of a change: how it was decided, and the path's current state.
    Decided {
        change: MessageId,
        outcome: Outcome,
        current: Entry,
        /// Only in the answer to a change sent again, decided before: the revision the
        /// path got (or kept) when the change was first decided, if the path has changed
        /// since. `current` is then a later state, maybe another node's that looks just
        /// like the sender's (an identical directory), and not the one its change left.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        first_rev: Option<Revision>,
    },
    /// To the sender of a `Sync`, in pages of at most [`SYNC_PAGE_BYTES`]: every live
    /// path's current state, and every deleted one deleted after the request's `since`.
    /// The pages of one reply follow each other in order (other messages may come
    /// between them); only the last one (`more: false`) completes the reply.
    SyncReply {
        request: MessageId,
        /// The manager's revision when this page was made.
        head: Revision,
        entries: Vec<Entry>,
        /// Number of this page in its reply, from 0. Left out when 0, and `more` when
        /// false, so a reply in one page reads exactly as before pages existed.
        #[serde(default, skip_serializing_if = "is_default")]
        page: u32,
        /// More pages of this reply follow.
        #[serde(default, skip_serializing_if = "is_false")]
        more: bool,
    },
    /// To one node: please run a sync now (the dashboard's Sync button).
    SyncRequested {},
    /// To a node the operator forgot (`manager node forget`, or silent past
    /// `--forget-nodes-after`) at `at_ms` (ms since the epoch), in answer to its `Sync`
    /// `request`: the manager refuses whatever it sends, for good. Its files are all
    /// still in its mount; to sync again it starts anew under another id with an empty
    /// data directory.
    Forgotten { request: MessageId, at_ms: i64 },
    /// To one node: keep these contents past GC (they are kept versions), fetching any
    /// the node lacks from the holders given. Sent before the broadcast that makes them
    /// old, so a keeper never drops one in between.
    Keep { items: Vec<KeepItem> },
    /// To one node: these contents need not be kept any more (their retention ended).
    Release { hashes: Vec<ContentHash> },
    /// To one node: the answer to its `ToManager::Ask` with envelope id `request`.
    Answer { request: MessageId, answer: Answer },
    /// Broadcast: several `Applied`, `Decided`, `Keep` and `Release` messages in the
    /// order the manager made them, in one delivery. Each node takes the items for every
    /// node and those for itself, in order, and skips the others'; so every node queue sees
    /// exactly the order it would have seen one message at a time.
    Batch { items: Vec<BatchItem> },
}

/// One message of a [`ToNode::Batch`]: `Applied` for every node (no `to`), or `Decided`,
/// `Keep` or `Release` for the node `to`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<NodeId>,
    pub msg: ToNode,
}

impl ToNode {
    /// The messages in this one that are for node `me`, in order: a batch's items for
    /// every node and for `me`; any other message itself.
    pub fn parts_for<'a>(&'a self, me: &'a NodeId) -> Box<dyn Iterator<Item = &'a ToNode> + 'a> {
        match self {
            ToNode::Batch { items } => Box::new(items.iter().filter(move |i| i.to.as_ref().is_none_or(|to| to == me)).map(|i| &i.msg)),
            other => Box::new(std::iter::once(other)),
        }
    }
    /// [`ToNode::parts_for`], taking the message apart.
    pub fn into_parts_for(self, me: &NodeId) -> Vec<ToNode> {
        match self {
            ToNode::Batch { items } => items.into_iter().filter(|i| i.to.as_ref().is_none_or(|to| to == me)).map(|i| i.msg).collect(),
            other => vec![other],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::PathBuf;

    fn hash() -> ContentHash {
        ContentHash::from_bytes(*blake3::hash(b"hello").as_bytes())
    }
    fn node(s: &str) -> NodeId {
        s.parse().unwrap()
    }
    fn id(s: &str) -> MessageId {
        s.parse().unwrap()
    }
    fn path(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn file_version() -> Version {
        Version { content: Content::File { hash: hash(), size: 5 }, mode: 0o644, uid: 1000, gid: 1000, mtime_ns: 1_764_000_000_000_000_000 }
    }
    fn entry() -> Entry {
        Entry {
            path: path("docs/report.txt"),
            rev: Revision(42),
            version: Some(file_version()),
            holders: vec![Holder { node: node("n1"), url: "http://127.0.0.1:7001".into() }],
            from_lost: None,
        }
    }

    fn to_manager_examples() -> Vec<(&'static str, ToManager)> {
        vec![
            (
                "heartbeat",
                ToManager::Heartbeat {
                    url: "http://127.0.0.1:7001".into(),
                    pending_changes: 0,
                    pending_pulls: 1,
                    software: "0.1.0".into(),
                    residency: None,
                    taken: Revision(0),
                    applied: Revision(0),
                },
            ),
            ("change_put", ToManager::Change(Change::new(path("docs/report.txt"), Revision(41), ChangeOp::Put { version: file_version() }))),
            (
                "change_mkdir",
                ToManager::Change(Change::new(
                    path("docs"),
                    Revision(0),
                    ChangeOp::Put { version: Version { content: Content::Dir, mode: 0o755, uid: 0, gid: 0, mtime_ns: 0 } },
                )),
            ),
            (
                "change_symlink",
                ToManager::Change(Change {
                    path: path("link"),
                    base: Revision(0),
                    follows: Some(id("0d2c7e2a-8f0e-4a53-9a3e-1f2b3c4d5e6f")),
                    op: ChangeOp::Put {
                        version: Version { content: Content::Symlink { target: "docs/report.txt".into() }, mode: 0o777, uid: 0, gid: 0, mtime_ns: 5 },
                    },
                    base_meta: None,
                    base_content: None,
                }),
            ),
            (
                "change_chmod",
                ToManager::Change(Change {
                    path: path("docs/report.txt"),
                    base: Revision(41),
                    follows: None,
                    op: ChangeOp::Put { version: Version { mode: 0o755, ..file_version() } },
                    base_meta: Some(ModeAndOwners { mode: 0o644, uid: 1000, gid: 1000 }),
                    base_content: None,
                }),
            ),
            (
                "change_write",
                ToManager::Change(Change {
                    path: path("docs/report.txt"),
                    base: Revision(41),
                    follows: None,
                    op: ChangeOp::Put {
                        version: Version {
                            content: Content::File { hash: ContentHash::from_bytes(*blake3::hash(b"hello, world").as_bytes()), size: 12 },
                            ..file_version()
                        },
                    },
                    base_meta: Some(ModeAndOwners { mode: 0o644, uid: 1000, gid: 1000 }),
                    base_content: Some(file_version().content),
                }),
            ),
            ("change_delete", ToManager::Change(Change::new(path("old.txt"), Revision(7), ChangeOp::Delete))),
            (
                "changes",
                ToManager::Changes {
                    items: vec![
                        ChangeItem {
                            id: id("3f1c2b3a-9d8e-4f70-8a1b-2c3d4e5f6a7b"),
                            change: Change::new(
                                path("docs/a.txt"),
                                Revision(0),
                                ChangeOp::Put {
                                    version: Version {
                                        content: Content::File { hash: hash(), size: 5 },
                                        mode: 0o644,
                                        uid: 1000,
                                        gid: 1000,
                                        mtime_ns: 1_764_000_000_000_000_000,
                                    },
                                },
                            ),
                        },
                        ChangeItem {
                            id: id("3f1c2b3a-9d8e-4f70-8a1b-2c3d4e5f6a7c"),
                            change: Change::new(path("docs/old.txt"), Revision(12), ChangeOp::Delete),
                        },
                    ],
                },
            ),
            ("have", ToManager::Have { path: path("docs/report.txt"), rev: Revision(42), hash: hash() }),
            (
                "holding",
                ToManager::Holding {
                    items: vec![
                        Held { path: path("docs/report.txt"), rev: Revision(42), hash: hash() },
                        Held { path: path("docs/notes.txt"), rev: Revision(43), hash: hash() },
                    ],
                },
            ),
            ("kept", ToManager::Kept { keeping: vec![hash()], lacking: vec![] }),
            (
                "ask_restore",
                ToManager::Ask { query: Query::Restore { path: path("docs"), rev: Some(Revision(40)), to: Some(path("docs-restored")), base: None } },
            ),
            ("ask_versions", ToManager::Ask { query: Query::Versions { path: path("docs/report.txt") } }),
            (
                "sync",
                ToManager::Sync {
                    request: id("5b0f6f4e-2d7c-4f57-8a3b-6c5d4e3f2a1b"),
                    url: "http://127.0.0.1:7001".into(),
                    since: Revision(40),
                    paged: true,
                    snapshot: true,
                    taken: Revision(0),
                    applied: Revision(0),
                },
            ),
        ]
    }

    fn to_node_examples() -> Vec<(&'static str, ToNode)> {
        vec![
            ("applied", ToNode::Applied { entry: entry(), origin: node("n1") }),
            (
                "decided_accepted",
                ToNode::Decided { change: id("0d2c7e2a-8f0e-4a53-9a3e-1f2b3c4d5e6f"), outcome: Outcome::Accepted, current: entry(), first_rev: None },
            ),
            (
                "decided_repeat",
                ToNode::Decided {
                    change: id("0d2c7e2a-8f0e-4a53-9a3e-1f2b3c4d5e6f"),
                    outcome: Outcome::Accepted,
                    current: entry(),
                    first_rev: Some(Revision(17)),
                },
            ),
            (
                "decided_conflict",
                ToNode::Decided {
                    change: id("0d2c7e2a-8f0e-4a53-9a3e-1f2b3c4d5e6f"),
                    outcome: Outcome::Conflict { copy: path("docs/report (conflict from n2 2026-11-25 14.03.10).txt") },
                    current: entry(),
                    first_rev: None,
                },
            ),
            (
                "sync_reply",
                ToNode::SyncReply { request: id("5b0f6f4e-2d7c-4f57-8a3b-6c5d4e3f2a1b"), head: Revision(42), entries: vec![entry()], page: 0, more: false },
            ),
            (
                "sync_reply_page",
                ToNode::SyncReply {
                    request: id("5b0f6f4e-2d7c-4f57-8a3b-6c5d4e3f2a1b"),
                    head: Revision(42),
                    entries: vec![Entry { path: path("old.txt"), rev: Revision(41), version: None, holders: vec![], from_lost: None }, entry()],
                    page: 3,
                    more: true,
                },
            ),
            ("sync_requested", ToNode::SyncRequested {}),
            ("forgotten", ToNode::Forgotten { request: id("5b0f6f4e-2d7c-4f57-8a3b-6c5d4e3f2a1b"), at_ms: 1_766_600_000_000 }),
            ("keep", ToNode::Keep { items: vec![crate::KeepItem { hash: hash(), size: 5, until_ms: 1_766_600_000_000, holders: entry().holders }] }),
            ("release", ToNode::Release { hashes: vec![hash()] }),
            (
                "answer_versions",
                ToNode::Answer {
                    request: id("5b0f6f4e-2d7c-4f57-8a3b-6c5d4e3f2a1b"),
                    answer: Answer::Versions {
                        path: path("docs/report.txt"),
                        versions: vec![crate::VersionInfo {
                            rev: Revision(41),
                            version: Some(file_version()),
                            node: node("n1"),
                            at_ms: 1_764_000_000_000,
                            ended_ms: Some(1_764_000_100_000),
                            refused: false,
                            available: true,
                            keepers: vec![node("n1"), node("n2")],
                        }],
                    },
                },
            ),
            (
                "answer_restored",
                ToNode::Answer {
                    request: id("5b0f6f4e-2d7c-4f57-8a3b-6c5d4e3f2a1b"),
                    answer: Answer::Restored(crate::RestoreReport {
                        from_rev: Revision(40),
                        restored: vec![path("docs"), path("docs/report.txt")],
                        beside: vec![(path("docs/notes.txt"), path("docs/notes (restored r40).txt"))],
                        unavailable: vec![],
                        left_out: 0,
                    }),
                },
            ),
        ]
    }

    /// Each message kind has a golden JSON file under `wire/fixtures/`; a change of the
    /// format shows up as a diff there. `UPDATE_FIXTURES=1` rewrites them.
    fn check_fixture<B: Serialize + DeserializeOwned + Body + PartialEq + std::fmt::Debug>(dir: &str, name: &str, body: B) {
        let env = Envelope::new(id("9e8d7c6b-5a49-4838-a726-150f0e0d0c0b"), node("n1"), body);
        let file: PathBuf = [env!("CARGO_MANIFEST_DIR"), "fixtures", dir, &format!("{name}.json")].iter().collect();
        let pretty = serde_json::to_string_pretty(&env).unwrap() + "\n";
        if std::env::var_os("UPDATE_FIXTURES").is_some() {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, &pretty).unwrap();
        }
        let golden = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_FIXTURES=1)", file.display()));
        assert_eq!(golden, pretty, "{} changed", file.display());
        let back = Envelope::<B>::decode(golden.as_bytes()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn golden_fixtures_round_trip() {
        for (name, m) in to_manager_examples() {
            check_fixture("to_manager", name, m);
        }
        for (name, m) in to_node_examples() {
            check_fixture("to_node", name, m);
        }
    }

    #[test]
    fn strict_decoding_reports_what_is_wrong() {
        let good = Envelope::new(id("a-1"), node("n1"), ToManager::Have { path: path("a"), rev: Revision(1), hash: hash() }).encode();
        Envelope::<ToManager>::decode(&good).unwrap();
        let bad_version = String::from_utf8(good.clone()).unwrap().replace("\"v\":1", "\"v\":9");
        assert!(matches!(Envelope::<ToManager>::decode(bad_version.as_bytes()), Err(DecodeError::Version(9))));
        let unknown_kind = String::from_utf8(good.clone()).unwrap().replace("\"have\"", "\"explode\"");
        let err = Envelope::<ToManager>::decode(unknown_kind.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("explode"), "{err}");
        let bad_path = String::from_utf8(good.clone()).unwrap().replace("\"path\":\"a\"", "\"path\":\"../etc/passwd\"");
        let err = Envelope::<ToManager>::decode(bad_path.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("'..'"), "{err}");
        let extra = String::from_utf8(good).unwrap().replace("\"v\":1", "\"v\":1,\"evil\":true");
        assert!(Envelope::<ToManager>::decode(extra.as_bytes()).is_err());
        assert!(Envelope::<ToNode>::decode(b"\xff\xfe").is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Envelope::<ToManager>::decode(&bytes);
            let _ = Envelope::<ToNode>::decode(&bytes);
        }

        #[test]
        fn decoding_mutated_messages_never_panics(pos in 0usize..400, byte in any::<u8>()) {
            for (_, m) in to_manager_examples() {
                let mut bytes = Envelope::new(id("x"), node("n"), m).encode();
                let i = pos % bytes.len();
                bytes[i] = byte;
                let _ = Envelope::<ToManager>::decode(&bytes);
            }
        }
    }

    /// The sync fields added with paged replies have defaults: a `Sync` from an older
    /// node asks for every deleted path and one page, and a reply in one page is written
    /// exactly as an older node reads it (no `page`, no `more`).
    #[test]
    fn older_peers_sync_messages_still_decode() {
        let old_sync = r#"{"v":1,"id":"a-1","from":"n1","body":{"type":"sync","request":"r-1","url":"http://127.0.0.1:7001"}}"#;
        let env = Envelope::<ToManager>::decode(old_sync.as_bytes()).unwrap();
        assert_eq!(
            env.body,
            ToManager::Sync {
                request: id("r-1"),
                url: "http://127.0.0.1:7001".into(),
                since: Revision(0),
                paged: false,
                snapshot: false,
                taken: Revision(0),
                applied: Revision(0)
            }
        );
        let old_reply = r#"{"v":1,"id":"a-2","from":"manager","body":{"type":"sync_reply","request":"r-1","head":7,"entries":[]}}"#;
        let env = Envelope::<ToNode>::decode(old_reply.as_bytes()).unwrap();
        assert_eq!(env.body, ToNode::SyncReply { request: id("r-1"), head: Revision(7), entries: vec![], page: 0, more: false });
        let one_page = Envelope::new(id("a-2"), NodeId::manager(), env.body).encode();
        assert_eq!(String::from_utf8(one_page).unwrap(), old_reply);
    }

    /// The page budget is clearly below what the broker accepts, and that is what the
    /// setup script configures.
    #[test]
    fn the_broker_limit_is_what_setup_configures() {
        let setup: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "scripts", "setup.sh"].iter().collect();
        let text = std::fs::read_to_string(&setup).unwrap();
        let want = format!("max_message_bytes={BROKER_MAX_MESSAGE_BYTES}");
        assert!(text.lines().any(|l| l.trim() == want), "{} sets `{want}`", setup.display());
    }

    #[test]
    fn oversized_fields_and_messages_are_refused_at_decode() {
        let hb = |url: String, software: &str| {
            Envelope::new(
                id("9e8d7c6b-5a49-4838-a726-150f0e0d0c0b"),
                node("n1"),
                ToManager::Heartbeat {
                    url,
                    pending_changes: 0,
                    pending_pulls: 0,
                    software: software.into(),
                    residency: None,
                    taken: Revision(0),
                    applied: Revision(0),
                },
            )
            .encode()
        };
        assert!(Envelope::<ToManager>::decode(&hb("http://h:1".into(), "1.0")).is_ok());
        let long_url = hb(format!("http://h/{}", "u".repeat(MAX_URL_BYTES)), "1.0");
        assert!(matches!(Envelope::<ToManager>::decode(&long_url), Err(DecodeError::Bounds(m)) if m.contains("heartbeat URL")));
        let huge = hb(format!("http://h/{}", "u".repeat(20 << 20)), "1.0");
        assert!(matches!(Envelope::<ToManager>::decode(&huge), Err(DecodeError::TooLarge(_, MAX_TO_MANAGER_BYTES))));
        assert!(Envelope::<ToManager>::decode(&hb("http://h:1".into(), &"s".repeat(MAX_SOFTWARE_BYTES + 1))).is_err());
        let link = |target: String| {
            let version = Version { content: Content::Symlink { target }, mode: 0o777, uid: 0, gid: 0, mtime_ns: 0 };
            let change = Change::new(path("l"), Revision(0), ChangeOp::Put { version });
            Envelope::new(id("9e8d7c6b-5a49-4838-a726-150f0e0d0c0b"), node("n1"), ToManager::Change(change)).encode()
        };
        assert!(Envelope::<ToManager>::decode(&link("t".repeat(MAX_SYMLINK_TARGET_BYTES))).is_ok());
        assert!(Envelope::<ToManager>::decode(&link("t".repeat(MAX_SYMLINK_TARGET_BYTES + 1))).is_err());
        assert!(Envelope::<ToManager>::decode(&link(String::new())).is_err());
    }
}
