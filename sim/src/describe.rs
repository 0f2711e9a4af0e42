//! One-line descriptions of messages for a run's trace.

use wire::{ChangeOp, Content, Entry, Envelope, ToManager, ToNode};

fn entry(e: &Entry) -> String {
    let what = match &e.version {
        None => "deleted".to_string(),
        Some(v) => match &v.content {
            Content::File { hash, size } => format!("file {} {size}B {:o}", &hash.to_hex()[..8], v.mode),
            Content::Dir => format!("dir {:o}", v.mode),
            Content::Symlink { target } => format!("symlink -> {target}"),
        },
    };
    format!("{} r{} {what}", e.path, e.rev.0)
}

fn again(redelivered: bool) -> &'static str {
    if redelivered {
        " (redelivered)"
    } else {
        ""
    }
}

fn short_hashes(hashes: &[wire::ContentHash]) -> String {
    hashes.iter().map(|h| h.to_hex().as_str()[..8].to_string()).collect::<Vec<_>>().join(",")
}

fn change(c: &wire::Change) -> String {
    let op = match &c.op {
        ChangeOp::Delete => "delete".to_string(),
        ChangeOp::Put { version } => match &version.content {
            Content::File { hash, .. } => format!("put file {}", &hash.to_hex()[..8]),
            Content::Dir => format!("put dir {:o}", version.mode),
            Content::Symlink { target } => format!("put symlink -> {target}"),
        },
    };
    format!("change {} {op} base r{} follows {:?}", c.path, c.base.0, c.follows.as_ref().map(|m| m.to_string()))
}

pub fn to_manager(env: &Envelope<ToManager>, redelivered: bool) -> String {
    let body = match &env.body {
        ToManager::Heartbeat { .. } => "heartbeat".to_string(),
        ToManager::Change(c) => change(c),
        ToManager::Changes { items } => {
            format!("changes [{}]", items.iter().map(|i| format!("{}: {}", i.id, change(&i.change))).collect::<Vec<_>>().join("; "))
        }
        ToManager::Have { path, rev, .. } => format!("have {path} r{}", rev.0),
        ToManager::Holding { items } => format!("holding {}", items.iter().map(|h| format!("{} r{}", h.path, h.rev.0)).collect::<Vec<_>>().join(", ")),
        ToManager::Sync { since, snapshot, .. } => format!("sync since r{}{}", since.0, if *snapshot { "" } else { " (catch-up form)" }),
        ToManager::Kept { keeping, lacking } => format!("kept {} lacking {}", short_hashes(keeping), short_hashes(lacking)),
        ToManager::Ask { query } => format!("ask {query:?}"),
    };
    format!("{} from {}: {body}{}", env.id, env.from, again(redelivered))
}

pub fn to_node(body: &ToNode, redelivered: bool) -> String {
    let s = match body {
        ToNode::Applied { entry: e, origin } => format!("applied {} from {origin}", entry(e)),
        ToNode::Decided { change, outcome, current, first_rev } => {
            let first = first_rev.map(|r| format!(" (first r{})", r.0)).unwrap_or_default();
            format!("decided {change}: {outcome:?}{first}; now {}", entry(current))
        }
        ToNode::SyncReply { head, entries, page, more, .. } => {
            format!("sync reply page {page} head r{} more {more}: [{}]", head.0, entries.iter().map(entry).collect::<Vec<_>>().join(", "))
        }
        ToNode::SyncRequested {} => "sync requested".to_string(),
        ToNode::Forgotten { request, at_ms } => format!("forgotten at {at_ms} ms (answering {request})"),
        ToNode::Keep { items } => format!("keep {}", short_hashes(&items.iter().map(|i| i.hash.clone()).collect::<Vec<_>>())),
        ToNode::Release { hashes } => format!("release {}", short_hashes(hashes)),
        ToNode::Answer { request, .. } => format!("answer to {request}"),
        ToNode::Batch { items } => {
            let items: Vec<String> =
                items.iter().map(|i| format!("{}{}", i.to.as_ref().map(|t| format!("for {t}: ")).unwrap_or_default(), to_node(&i.msg, false))).collect();
            format!("batch [{}]", items.join("; "))
        }
    };
    format!("{s}{}", again(redelivered))
}
