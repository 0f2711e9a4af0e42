//! The reconciliation rule: a pure function from (the path's current state, a change) to
//! a decision. No clock, no database, no connection: callers carry the decision out.
//! The same rule serves online edits and changes replayed after an offline period.

use wire::{ChangeOp, Content, NodeId, RelPath, Revision, Version};

/// At most this many conflict files per path: an edit loop must not flood a folder.
pub const MAX_CONFLICT_COPIES: usize = 20;

/// The manager's current state of one path, as the rule sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    pub rev: Revision,
    /// `None` when deleted.
    pub version: Option<Version>,
    /// For a live directory: whether it has live children.
    pub has_children: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Make the change the path's current state.
    Accept,
    /// The path already is what the change asks for.
    Unchanged,
    /// Keep the change's version as a conflict file beside the path.
    Conflict,
    /// Keep the current state; say why.
    Refuse(String),
}

/// `base` is the revision the change was effectively based on (see `Change::follows`);
/// `copies` is how many conflict files the path already has.
pub fn decide(path: &RelPath, current: Option<&Current>, base: Revision, op: &ChangeOp, copies: usize) -> Decision {
    let live = current.and_then(|c| c.version.as_ref().map(|v| (c, v)));
    match (op, live) {
        // Nothing there (never was, or deleted): a put always wins. If the path was
        // deleted elsewhere while this node edited it, the edit is what survives.
        (ChangeOp::Put { .. }, None) => Decision::Accept,
        (ChangeOp::Delete, None) => Decision::Unchanged,
        (ChangeOp::Put { version }, Some((cur, cv))) => {
            if version == cv {
                return Decision::Unchanged;
            }
            let replaces_full_dir = matches!(cv.content, Content::Dir) && !matches!(version.content, Content::Dir) && cur.has_children;
            if cur.rev == base {
                if replaces_full_dir {
                    return Decision::Refuse("the directory is not empty on the manager".into());
                }
                return Decision::Accept;
            }
            // Stale base: someone else changed the path since this node saw it.
            if version.content == cv.content {
                // Same bytes (or both directories): nothing anyone wrote is lost by
                // keeping the current metadata.
                return Decision::Unchanged;
            }
            if is_conflict_file(path) {
                // A conflict file never conflicts: the latest edit of it wins.
                return if replaces_full_dir { Decision::Refuse("the directory is not empty on the manager".into()) } else { Decision::Accept };
            }
            match version.content {
                Content::Dir => Decision::Refuse("a file was written at this path elsewhere".into()),
                _ if copies >= MAX_CONFLICT_COPIES => {
                    Decision::Refuse(format!("the path already has {MAX_CONFLICT_COPIES} conflict files; this version was not kept"))
                }
                _ => Decision::Conflict,
            }
        }
        (ChangeOp::Delete, Some((cur, cv))) => {
            if cur.rev != base {
                Decision::Refuse("changed elsewhere since this node saw it; nothing that was edited is deleted".into())
            } else if matches!(cv.content, Content::Dir) && cur.has_children {
                Decision::Refuse("the directory has files added elsewhere".into())
            } else {
                Decision::Accept
            }
        }
    }
}

/// Marker that every conflict file name carries.
const CONFLICT_MARK: &str = " (conflict from ";

pub fn is_conflict_file(path: &RelPath) -> bool {
    path.name().contains(CONFLICT_MARK)
}

/// A UTC time of day, for conflict file names (the manager's clock only names files; it
/// never orders anything).
#[derive(Clone, Copy, Debug)]
pub struct UtcTime {
    pub unix_secs: i64,
}

impl UtcTime {
    fn format(self) -> String {
        let t = time::OffsetDateTime::from_unix_timestamp(self.unix_secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let f = time::macros::format_description!("[year]-[month]-[day] [hour].[minute].[second]");
        t.format(&f).unwrap_or_default()
    }
}

/// The conflict file's name: `stem (conflict from NODE DATE TIME[ N]).ext`, beside the
/// original, keeping the extension so the file still opens in the right program.
/// `n` > 1 disambiguates when the name is taken.
pub fn conflict_path(path: &RelPath, node: &NodeId, at: UtcTime, n: u32) -> RelPath {
    let name = path.name();
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    };
    let suffix = if n > 1 { format!(" {n}") } else { String::new() };
    let tail = format!("{CONFLICT_MARK}{node} {}{suffix}){ext}", at.format());
    // Keep the name within NAME_MAX by shortening the stem (on a char boundary).
    let mut stem = stem.to_string();
    while stem.len() + tail.len() > wire::MAX_NAME_BYTES && !stem.is_empty() {
        stem.pop();
    }
    let new_name = format!("{stem}{tail}");
    match path.parent() {
        Some(p) => p.join(&new_name),
        None => RelPath::new(new_name),
    }
    .unwrap_or_else(|_| path.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }
    fn file(h: u8) -> Version {
        Version { content: Content::File { hash: wire::ContentHash::from_bytes([h; 32]), size: 1 }, mode: 0o644, uid: 0, gid: 0, mtime_ns: 0 }
    }
    fn dir() -> Version {
        Version { content: Content::Dir, mode: 0o755, uid: 0, gid: 0, mtime_ns: 0 }
    }
    fn cur(rev: u64, v: Option<Version>) -> Current {
        Current { rev: Revision(rev), version: v, has_children: false }
    }
    fn put(v: Version) -> ChangeOp {
        ChangeOp::Put { version: v }
    }

    #[test]
    fn only_here_is_accepted() {
        assert_eq!(decide(&p("a"), Some(&cur(3, Some(file(1)))), Revision(3), &put(file(2)), 0), Decision::Accept);
        assert_eq!(decide(&p("a"), None, Revision(0), &put(file(2)), 0), Decision::Accept);
    }

    #[test]
    fn both_changed_is_a_conflict_but_same_bytes_are_not() {
        assert_eq!(decide(&p("a"), Some(&cur(5, Some(file(1)))), Revision(3), &put(file(2)), 0), Decision::Conflict);
        let mut same = file(1);
        same.mode = 0o600;
        assert_eq!(decide(&p("a"), Some(&cur(5, Some(file(1)))), Revision(3), &put(same), 0), Decision::Unchanged);
    }

    #[test]
    fn edit_beats_delete_both_ways() {
        // Deleted elsewhere, edited here: the edit is kept.
        assert_eq!(decide(&p("a"), Some(&cur(5, None)), Revision(3), &put(file(2)), 0), Decision::Accept);
        // Edited elsewhere, deleted here: the delete is refused.
        assert!(matches!(decide(&p("a"), Some(&cur(5, Some(file(1)))), Revision(3), &ChangeOp::Delete, 0), Decision::Refuse(_)));
        assert_eq!(decide(&p("a"), Some(&cur(5, Some(file(1)))), Revision(5), &ChangeOp::Delete, 0), Decision::Accept);
    }

    #[test]
    fn directories_with_new_children_are_not_deleted() {
        let c = Current { rev: Revision(2), version: Some(dir()), has_children: true };
        assert!(matches!(decide(&p("d"), Some(&c), Revision(2), &ChangeOp::Delete, 0), Decision::Refuse(_)));
        assert!(matches!(decide(&p("d"), Some(&c), Revision(2), &put(file(1)), 0), Decision::Refuse(_)));
    }

    #[test]
    fn conflict_files_never_conflict_and_copies_are_capped() {
        let copy = p("r (conflict from n2 2026-11-25 14.03.10).txt");
        assert_eq!(decide(&copy, Some(&cur(5, Some(file(1)))), Revision(3), &put(file(2)), 0), Decision::Accept);
        assert!(matches!(decide(&p("a"), Some(&cur(5, Some(file(1)))), Revision(3), &put(file(2)), MAX_CONFLICT_COPIES), Decision::Refuse(_)));
    }

    #[test]
    fn conflict_names_keep_the_extension() {
        let at = UtcTime { unix_secs: 1_795_615_390 }; // 2026-11-25 14:03:10 UTC
        let n2: NodeId = "node-b".parse().unwrap();
        assert_eq!(conflict_path(&p("docs/report.txt"), &n2, at, 1).as_str(), "docs/report (conflict from node-b 2026-11-25 14.03.10).txt");
        assert_eq!(conflict_path(&p("Makefile"), &n2, at, 2).as_str(), "Makefile (conflict from node-b 2026-11-25 14.03.10 2)");
        assert_eq!(conflict_path(&p(".bashrc"), &n2, at, 1).as_str(), ".bashrc (conflict from node-b 2026-11-25 14.03.10)");
        let long = conflict_path(&p(&format!("{}.txt", "é".repeat(120))), &n2, at, 1);
        assert!(long.name().len() <= 255 && long.name().ends_with(").txt"));
        assert!(is_conflict_file(&long));
    }
}
