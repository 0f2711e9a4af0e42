//! The reconciliation rule: a pure function from (the path's current state, a change) to
//! a decision. No clock, no database, no connection: callers carry the decision out.
//! The same rule serves online edits and changes replayed after an offline period.

use wire::{ChangeOp, Content, ModeAndOwners, NodeId, Outcome, RelPath, Revision, Version};

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
    /// The manager made this version itself: a directory brought back for a path put
    /// below it (no user chose its mode).
    pub made_by_manager: bool,
    /// The path's states come from states the manager lost.
    pub from_lost: Option<TakenIn>,
}

/// States of a path that the manager lost (its database brought back from an older
/// copy) and took in again from the nodes that had them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakenIn {
    /// The lost revision of the latest state taken in.
    pub base: Revision,
    /// The revision the first one got: every revision of the path before it that a node
    /// has above `base` is a later lost state (`wire::FromLost::at`).
    pub first: Revision,
    /// The revision the latest one got.
    pub last: Revision,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Make the change the path's current state.
    Accept,
    /// Make this version, the change's merged with the current state, the path's
    /// current state: a chmod or chown on a stale base keeps a concurrent touch made
    /// elsewhere ([`same_bytes_on_a_stale_base`]), a write keeps a concurrent chmod
    /// ([`bytes_over_changed_metadata`], [`metadata_the_node_did_not_change`]).
    Merge(Version),
    /// A change of only the metadata of the bytes the path had at its base, written
    /// over elsewhere since ([`metadata_over_changed_bytes`]): make `Some` version (the
    /// change's mode and owners on those bytes) the path's state, or keep the state
    /// (`None`). Either way the sender's later changes that follow this one were made on
    /// its own version, not on the state now: they are decided against the base.
    OverChangedBytes(Option<Version>),
    /// The path already is what the change asks for.
    Unchanged,
    /// Keep the change's version as a conflict file beside the path.
    Conflict,
    /// Keep the change's version at the same place below a conflict directory beside
    /// `file`, an ancestor of the path that is a file now.
    ConflictBelow { file: RelPath },
    /// Keep the current state; say why.
    Refuse(String),
    /// Keep the current state, and keep the change's version only as a kept version of
    /// the path (no conflict file may be added beside it any more); say why.
    KeepAsVersion(String),
}

/// How the change a new change follows (`Change::follows`, the sender's own earlier
/// change of the same path) was decided, as the manager recorded it.
#[derive(Clone, Debug)]
pub struct Prior {
    /// The path's revision after that decision.
    pub rev: Revision,
    pub outcome: Outcome,
    /// The base that change was decided against.
    pub base: Revision,
    /// For a change kept as a conflict file: that file is still live, still a file and
    /// still at the sender's own version (no one else edited, moved or removed it).
    pub copy_still_own: bool,
}

/// What a change is decided against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Basis {
    /// Decide it with [`decide`] against this base.
    Base(Revision),
    /// It is a later edit of a file kept as a conflict file that is still the sender's
    /// own, and still a file: it updates that file (one conflict file per offline edit
    /// session, not one per save) and is decided as a conflict with that copy. Not a
    /// conflict directory: what was put below one stays there.
    UpdateConflictFile(RelPath),
}

/// The basis of a change sent with base `sent` that follows `prior` (if it follows one
/// the manager decided).
pub fn basis(sent: Revision, prior: Option<&Prior>, op: &ChangeOp) -> Basis {
    let Some(prior) = prior else { return Basis::Base(sent) };
    // A sender that names a later revision than the one `prior` left learned of it from
    // the decision of another own change of the path made after `prior` (whose own
    // decision its queue lost while it was away, or has not brought yet): its version is
    // derived from that later state.
    match &prior.outcome {
        // Made on top of the sender's own change: based on the revision it got.
        Outcome::Accepted | Outcome::Unchanged => Basis::Base(prior.rev.max(sent)),
        // It changed nothing: the path is still at what it was based on (a delete
        // refused because files were added below, say).
        Outcome::Refused { .. } if prior.base.0 > 0 => Basis::Base(prior.base.max(sent)),
        // (Of a file only: the copy is one. A directory put over it would have the
        // sender's later writes below the path go there, and its edit of the copy it
        // shows, still a file, refused for the files below; a symlink put over it would
        // take the place of that edit. Simulator seed 786548. Either is a conflict of
        // its own, decided on the base it was sent with.)
        Outcome::Conflict { copy } if prior.copy_still_own && is_file_put(op) => Basis::UpdateConflictFile(copy.clone()),
        _ => Basis::Base(sent),
    }
}

fn is_file_put(op: &ChangeOp) -> bool {
    matches!(op, ChangeOp::Put { version: Version { content: Content::File { .. }, .. } })
}

/// The directory the manager puts back for an ancestor of an accepted path that was
/// deleted elsewhere (nothing added to a directory is lost because someone removed it).
pub fn restored_dir(now_ms: i64) -> Version {
    Version { content: Content::Dir, mode: 0o755, uid: 0, gid: 0, mtime_ns: now_ms * 1_000_000 }
}

/// A conflict directory made for `version`, a change below a path that became a file:
/// owned like the change.
pub fn conflict_dir(version: &Version, now_ms: i64) -> Version {
    Version { content: Content::Dir, mode: 0o755, uid: version.uid, gid: version.gid, mtime_ns: now_ms * 1_000_000 }
}

/// Where `path`, below `file`, goes below `file`'s conflict directory `dir_copy`; `None`
/// when that path would be too long.
pub fn moved_below(path: &RelPath, file: &RelPath, dir_copy: &RelPath) -> Option<RelPath> {
    let rest = path.as_str().strip_prefix(file.as_str())?.strip_prefix('/')?;
    RelPath::new(format!("{dir_copy}/{rest}")).ok()
}

/// The path's state at the base of a change made on a stale base, as far as the manager
/// knows it: its mode and owners, its mtime when the manager's history holds that state
/// (a node's `base_meta` does not say it), and its content when the history holds it or
/// the node says it (`base_content`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtBase {
    pub meta: ModeAndOwners,
    pub mtime_ns: Option<i64>,
    pub content: Option<Content>,
}

impl From<&Version> for AtBase {
    fn from(v: &Version) -> Self {
        AtBase { meta: ModeAndOwners::from(v), mtime_ns: Some(v.mtime_ns), content: Some(v.content.clone()) }
    }
}

/// What a change was made on, as far as the manager knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MadeOn {
    /// The revision the change was effectively based on ([`basis`]).
    pub base: Revision,
    /// The path's state at `base` when known (looked up only for a change on a stale
    /// base: [`same_bytes_on_a_stale_base`]).
    pub at_base: Option<AtBase>,
    /// The mode and owners of the state the node made the change on, as it says them
    /// (`Change::base_meta`): what the change did not change of them
    /// ([`metadata_the_node_did_not_change`]).
    pub said: Option<ModeAndOwners>,
    /// On a stale base, every state of the path since the base is the sender's own
    /// (its earlier changes, decided first; one of another path's put here as its
    /// conflict file's update, say): nobody else changed the path since, and the
    /// sender's later change is no concurrent one.
    pub only_own_since: bool,
}

impl MadeOn {
    /// Made on `base`, nothing more known.
    pub fn rev(base: Revision) -> Self {
        MadeOn { base, at_base: None, said: None, only_own_since: false }
    }
}

/// `copies` is how many conflict files the path already has; `file_above` is the
/// highest ancestor of the path that is a live file on the manager, if one is.
pub fn decide(path: &RelPath, current: Option<&Current>, made_on: &MadeOn, op: &ChangeOp, copies: usize, file_above: Option<&RelPath>) -> Decision {
    match (decide_at_path(path, current, made_on, op, copies), file_above) {
        // A directory above the path became a file elsewhere while this node wrote
        // below it: what it wrote goes below a conflict directory beside that file, not
        // away.
        (Decision::Accept | Decision::Merge(_) | Decision::OverChangedBytes(Some(_)), Some(file)) if matches!(op, ChangeOp::Put { .. }) => {
            Decision::ConflictBelow { file: file.clone() }
        }
        (d, _) => d,
    }
}

/// The decision from the path's own state.
fn decide_at_path(path: &RelPath, current: Option<&Current>, made_on: &MadeOn, op: &ChangeOp, copies: usize) -> Decision {
    let base = made_on.base;
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
            // A directory the manager brought back for a path below it stands in for the
            // node's own: the node's metadata for it wins, whatever its base.
            if cur.made_by_manager && matches!((&version.content, &cv.content), (Content::Dir, Content::Dir)) {
                return Decision::Accept;
            }
            let replaces_full_dir = matches!(cv.content, Content::Dir) && !matches!(version.content, Content::Dir) && cur.has_children;
            if based_on_current(cur, base) {
                if replaces_full_dir {
                    // The node replaced the directory with a file, but files were added
                    // to it elsewhere that the node never saw: both are kept, the
                    // node's file as a conflict file beside the directory.
                    return if copies >= MAX_CONFLICT_COPIES {
                        Decision::KeepAsVersion(format!(
                            "the directory is not empty on the manager, and the path already has {MAX_CONFLICT_COPIES} conflict files"
                        ))
                    } else {
                        Decision::Conflict
                    };
                }
                return metadata_the_node_did_not_change(version, cv, made_on.said.filter(|_| !from_a_later_lost_state(cur, base)));
            }
            // Stale base: someone else changed the path since this node saw it. Or only
            // the node itself did: its later change is kept over its own earlier ones,
            // as on the current state. (Simulator seed 634610: a node's chmod of its
            // conflict file, made before it saw its own chmod of the original put there
            // as that file's update, was lost; seed 798153: so was its chown of what it
            // had just written there.)
            if made_on.only_own_since && !replaces_full_dir {
                return metadata_the_node_did_not_change(version, cv, made_on.said);
            }
            if version.content == cv.content {
                return same_bytes_on_a_stale_base(version, cv, made_on.at_base.as_ref(), made_on.said);
            }
            if let Some(b) = made_on.at_base.as_ref() {
                if b.content.as_ref() == Some(&version.content) {
                    return metadata_over_changed_bytes(version, cv, b, made_on.said);
                }
                if b.content.as_ref() == Some(&cv.content) && same_kind(&version.content, &cv.content) {
                    return bytes_over_changed_metadata(version, cv, b, made_on.said);
                }
            }
            if is_conflict_file(path) {
                // A conflict file never conflicts: the latest edit of it wins.
                return if replaces_full_dir { Decision::Refuse("the directory is not empty on the manager".into()) } else { Decision::Accept };
            }
            // A directory made here while a file was written there elsewhere becomes a
            // conflict directory too: what is put below it goes there.
            if copies >= MAX_CONFLICT_COPIES {
                Decision::KeepAsVersion(format!("the path already has {MAX_CONFLICT_COPIES} conflict files"))
            } else {
                Decision::Conflict
            }
        }
        (ChangeOp::Delete, Some((cur, cv))) => {
            // On a stale base, a delete of bytes only chmodded, chowned or touched
            // elsewhere since deletes nothing the node did not see.
            let bytes_seen = made_on.at_base.as_ref().is_some_and(|b| b.content.as_ref() == Some(&cv.content));
            if !based_on_current(cur, base) && !bytes_seen {
                Decision::Refuse("changed elsewhere since this node saw it; nothing that was edited is deleted".into())
            } else if matches!(cv.content, Content::Dir) && cur.has_children {
                Decision::Refuse("the directory has files added elsewhere".into())
            } else {
                Decision::Accept
            }
        }
    }
}

/// A put of the bytes the path has now (or a directory over a directory), made on an
/// older state: only its metadata can differ. A three-way merge against the state at
/// the base (`at_base`), field by field (`merge_fields`): the mode, the uid and the
/// gid each the node's when it changed it from the base and nobody else did since (the
/// current state still has the base's), else the current one (two nodes' concurrent
/// chmods: the first decided wins; a chmod here and a chown elsewhere: both stay), and
/// nothing anyone wrote is lost either way. The mtime of a taken chmod or chown is
/// merged the same way: the node's when the state now has
/// the mtime of the base (nobody touched the path since), else the state's now (a
/// concurrent `touch` elsewhere keeps its mtime; of two, the first decided, as for the
/// mode; the base's mtime unknown, the state's now). Without the state at the base
/// (its history forgotten, or a revision the manager lost, and the node did not say)
/// the current metadata stays. What the node did not change of what it made the change
/// on (`said`) is never its to set ([`touched_by_node`]).
fn same_bytes_on_a_stale_base(version: &Version, current: &Version, at_base: Option<&AtBase>, said: Option<ModeAndOwners>) -> Decision {
    let Some(b) = at_base else { return Decision::Unchanged };
    let meta = merge_on_stale_base(b.meta, version, said, current);
    if meta == ModeAndOwners::from(current) {
        return Decision::Unchanged;
    }
    let mtime_ns = if b.mtime_ns == Some(current.mtime_ns) { version.mtime_ns } else { current.mtime_ns };
    let merged = Version { mode: meta.mode, uid: meta.uid, gid: meta.gid, mtime_ns, ..version.clone() };
    if merged == *version {
        Decision::Accept
    } else {
        Decision::Merge(merged)
    }
}

/// The node's mode and owners, but each one it did not change from the state it made
/// the change on (`said`, when it said it) as `current` has it. A stale base's state in
/// the history may not be what the node saw: the node had not applied it yet (a write
/// made after its earlier change was decided unchanged, on the state before the chmod
/// and chown that won; simulator seed 657857), or it was its own earlier chmod, which
/// another node's won since. Merged against that state, a mode the node never touched
/// passed for a chmod back: the chmod and chown made elsewhere were undone, and a later
/// chown there was lost to that phantom change.
fn touched_by_node(version: &Version, said: Option<ModeAndOwners>, current: &Version) -> ModeAndOwners {
    match said {
        Some(said) => merge_fields(said, current.into(), version.into()),
        None => version.into(),
    }
}

/// The mode and owners of a change on a stale base, merged three-way against the
/// path's state at the base (`base`) and now (`current`), each field the node's only where
/// it changed it ([`touched_by_node`]) and nobody else did since.
fn merge_on_stale_base(base: ModeAndOwners, version: &Version, said: Option<ModeAndOwners>, current: &Version) -> ModeAndOwners {
    merge_fields(base, touched_by_node(version, said, current), current.into())
}

/// Mode, uid and gid merged one by one against `base`: each as `winner` has it where
/// `winner` changed it from `base`, else as `other` has it. A chmod made on one side and
/// a chown on the other both stay; where both changed the same one, `winner`'s stays.
fn merge_fields(base: ModeAndOwners, other: ModeAndOwners, winner: ModeAndOwners) -> ModeAndOwners {
    let pick = |base: u32, other: u32, winner: u32| if winner != base { winner } else { other };
    ModeAndOwners { mode: pick(base.mode, other.mode, winner.mode), uid: pick(base.uid, other.uid, winner.uid), gid: pick(base.gid, other.gid, winner.gid) }
}

/// A put of the bytes the path had at its base (a chmod, a chown, a `touch` made here)
/// while the bytes changed elsewhere: nothing written here needs a conflict file. The
/// mode and owners merge three-way, field by field, as over the same bytes (each the
/// node's when it changed it and nobody else did since) onto the bytes and mtime the path has now: a chmod
/// made here is kept on what was written elsewhere, a touch of the older bytes is not.
/// The path of another kind now (a file here, a symlink elsewhere), its state stays.
fn metadata_over_changed_bytes(version: &Version, current: &Version, at_base: &AtBase, said: Option<ModeAndOwners>) -> Decision {
    let meta = merge_on_stale_base(at_base.meta, version, said, current);
    let merged = (same_kind(&version.content, &current.content) && meta != ModeAndOwners::from(current)).then(|| Version {
        content: current.content.clone(),
        mode: meta.mode,
        uid: meta.uid,
        gid: meta.gid,
        mtime_ns: current.mtime_ns,
    });
    Decision::OverChangedBytes(merged)
}

/// Both files, both symlinks, or both directories.
fn same_kind(a: &Content, b: &Content) -> bool {
    matches!((a, b), (Content::File { .. }, Content::File { .. }) | (Content::Symlink { .. }, Content::Symlink { .. }) | (Content::Dir, Content::Dir))
}

/// A write (or a symlink made again) on a stale base while only the metadata changed
/// elsewhere since (a chmod, a chown, a `touch`; the bytes are still those at the
/// base): nothing written elsewhere needs a conflict file. The node's bytes and mtime
/// are taken, and the mode and owners merge three-way, field by field, as for a chmod on
/// a stale base: each one set elsewhere stays (of two concurrent chmods, the first
/// decided), the node's when only it changed it.
fn bytes_over_changed_metadata(version: &Version, current: &Version, at_base: &AtBase, said: Option<ModeAndOwners>) -> Decision {
    with_meta(version, merge_on_stale_base(at_base.meta, version, said, current))
}

/// A put made on the current state, or on a state the node took as its own change's
/// (`basis`): the node's version, but for each of the mode, the uid and the gid that it
/// did not change from the state it made the change on (`said`) while the manager's
/// differs from it: the manager's then stays (a chmod made here keeps a chown made
/// elsewhere). Of another kind now, the node's version as it is. They differ when the manager merged the node's earlier change
/// with a chmod made elsewhere that the node had not applied yet (it was still writing:
/// [`bytes_over_changed_metadata`]), or kept another node's chmod over the node's
/// (`Unchanged`): the node's later write is not a chmod back.
fn metadata_the_node_did_not_change(version: &Version, current: &Version, said: Option<ModeAndOwners>) -> Decision {
    match said {
        Some(_) if same_kind(&version.content, &current.content) => match with_meta(version, touched_by_node(version, said, current)) {
            Decision::Merge(merged) if merged == *current => Decision::Unchanged,
            d => d,
        },
        _ => Decision::Accept,
    }
}

/// `version` with `meta`: accepted as it is when it has them, else merged.
fn with_meta(version: &Version, meta: ModeAndOwners) -> Decision {
    if ModeAndOwners::from(version) == meta {
        Decision::Accept
    } else {
        Decision::Merge(Version { mode: meta.mode, uid: meta.uid, gid: meta.gid, ..version.clone() })
    }
}

/// Whether a change sent with `base` was made on the path's current state. A base above
/// the current revision is a later state the manager lost (its database was brought
/// back from an older copy; the node took that state from the manager before): the
/// change is newer than anything the manager has of the path. So is one made on the
/// lost state the current one was taken in from, or on a later lost one, while the path
/// is still at that state ([`from_a_later_lost_state`]).
fn based_on_current(cur: &Current, base: Revision) -> bool {
    base >= cur.rev || cur.from_lost.is_some_and(|l| l.last == cur.rev && base >= l.base)
}

/// Whether a change with `base`, if accepted, takes in a state the manager lost that is
/// later than what the path's states come from: its base is above the current revision,
/// or above the lost revision the current state was taken in from (the path still at
/// it). The states from it on are then marked as coming from `base`.
pub fn from_a_later_lost_state(cur: &Current, base: Revision) -> bool {
    base > cur.rev || cur.from_lost.is_some_and(|l| l.last == cur.rev && base > l.base)
}

/// Marker that every conflict file name carries.
pub const CONFLICT_MARK: &str = " (conflict from ";

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

/// How many dated names (`… 14.03.10)`, `… 14.03.10 2)`, `… 14.03.10 3)`…) are tried
/// before the short forms: one more than the conflict files a path may keep, so a path's
/// own copies made in the same second never push a new one to the short form.
pub const CONFLICT_NAME_TRIES: u32 = MAX_CONFLICT_COPIES as u32 + 1;

/// The stem keeps at least this much (or all of it, if shorter) before the extension is
/// shortened: a name of 230 bytes after its only dot is no extension a program relies on,
/// and the start of the stem is what tells a user which file the copy belongs to.
const MIN_STEM_BYTES: usize = 16;

/// Every name the conflict file of `path` may get, best first; the caller takes the first
/// one that is free. Each is a valid path beside the original, differs from it, keeps
/// every component within `MAX_NAME_BYTES` and the whole within `MAX_PATH_BYTES`.
///
/// First come `CONFLICT_NAME_TRIES` dated names: `stem (conflict from NODE DATE TIME[ N]).ext`,
/// keeping the extension so the file still opens in the right program; the stem is
/// shortened to fit, then the extension. Then two short forms that carry `rev`, the
/// revision the copy will get, which no other path ever gets: `stem (conflict from NODE
/// rREV).ext` and `stem (conflict from rREV).ext`. The list is empty only when not even
/// the last one fits beside the original (a parent within about 20 bytes of the limit).
pub fn conflict_candidates(path: &RelPath, node: &NodeId, at: UtcTime, rev: Revision) -> Vec<RelPath> {
    let time = at.format();
    let dated = (1..=CONFLICT_NAME_TRIES).map(|n| {
        let suffix = if n > 1 { format!(" {n}") } else { String::new() };
        format!("{CONFLICT_MARK}{node} {time}{suffix})")
    });
    let short = [format!("{CONFLICT_MARK}{node} r{})", rev.0), format!("{CONFLICT_MARK}r{})", rev.0)];
    names_beside(path, dated.chain(short))
}

/// Every name a restored version of `path` may get beside it when the path changed since
/// (a restore never overwrites a newer edit), best first: `stem (restored rREV).ext`,
/// then numbered ones, then one that carries `new_rev`, the revision the copy will get,
/// which no other path ever gets. Empty only when not even that fits.
pub fn restored_candidates(path: &RelPath, from_rev: Revision, new_rev: Revision) -> Vec<RelPath> {
    let tails = (1..=CONFLICT_NAME_TRIES)
        .map(|n| if n > 1 { format!(" (restored r{} {n})", from_rev.0) } else { format!(" (restored r{})", from_rev.0) })
        .chain([format!(" (restored r{} as r{})", from_rev.0, new_rev.0)]);
    names_beside(path, tails)
}

/// `path` with each of `tails` put between its stem and its extension, shortened to fit
/// ([`fit`]), in order, once each; tails that cannot fit are left out.
fn names_beside(path: &RelPath, tails: impl Iterator<Item = String>) -> Vec<RelPath> {
    let parent = path.parent();
    let budget = match &parent {
        Some(p) => wire::MAX_PATH_BYTES.saturating_sub(p.as_str().len() + 1),
        None => wire::MAX_PATH_BYTES,
    }
    .min(wire::MAX_NAME_BYTES);
    let name = path.name();
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    };
    let mut out: Vec<RelPath> = Vec::new();
    for tail in tails {
        let Some(new_name) = fit(stem, &tail, ext, budget) else { continue };
        let candidate = match &parent {
            Some(p) => p.join(&new_name),
            None => RelPath::new(new_name),
        };
        // Cannot fail (the name fits and holds no '/' or NUL), but a path that failed
        // would only be one candidate fewer, never a panic.
        if let Ok(c) = candidate {
            if c != *path && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// `stem + tail + ext` within `budget` bytes, or None when `tail` alone does not fit. The
/// stem gives way first (down to `MIN_STEM_BYTES`), then the extension, then the rest of
/// the stem; every cut falls on a char boundary.
fn fit(stem: &str, tail: &str, ext: &str, budget: usize) -> Option<String> {
    let room = budget.checked_sub(tail.len())?;
    let keep = stem.len().min(MIN_STEM_BYTES);
    let ext = match cut(ext, room.saturating_sub(keep)) {
        // A dot left alone from a cut extension says nothing.
        "." if ext.len() > 1 => "",
        e => e,
    };
    let stem = cut(stem, room - ext.len());
    Some(format!("{stem}{tail}{ext}"))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
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
        Current { rev: Revision(rev), version: v, has_children: false, made_by_manager: false, from_lost: None }
    }
    fn put(v: Version) -> ChangeOp {
        ChangeOp::Put { version: v }
    }

    #[test]
    fn only_here_is_accepted() {
        assert_eq!(decide(&p("a"), Some(&cur(3, Some(file(1)))), &MadeOn::rev(Revision(3)), &put(file(2)), 0, None), Decision::Accept);
        assert_eq!(decide(&p("a"), None, &MadeOn::rev(Revision(0)), &put(file(2)), 0, None), Decision::Accept);
    }

    #[test]
    fn both_changed_is_a_conflict_but_same_bytes_are_not() {
        assert_eq!(decide(&p("a"), Some(&cur(5, Some(file(1)))), &MadeOn::rev(Revision(3)), &put(file(2)), 0, None), Decision::Conflict);
        let mut same = file(1);
        same.mode = 0o600;
        assert_eq!(decide(&p("a"), Some(&cur(5, Some(file(1)))), &MadeOn::rev(Revision(3)), &put(same), 0, None), Decision::Unchanged);
    }

    /// Same bytes on a stale base: a three-way merge of the mode and owners against the
    /// state the change was made on (before, every such chmod was lost to `Unchanged`;
    /// simulator seed 91358 showed one, whose base the manager lost and still loses).
    #[test]
    fn a_chmod_on_a_stale_base_is_taken_unless_the_mode_changed_elsewhere_too() {
        let with = |mode: u32, mtime_ns: i64| Version { mode, mtime_ns, ..file(1) };
        let decide_on = |current: Version, at_base: Option<AtBase>, mine: Version| {
            decide(&p("a"), Some(&cur(5, Some(current))), &MadeOn { at_base, ..MadeOn::rev(Revision(3)) }, &put(mine), 0, None)
        };
        let decide_same_bytes = |current: Version, at_base: Option<Version>, mine: Version| decide_on(current, at_base.as_ref().map(AtBase::from), mine);
        // Touched elsewhere (mtime only), chmodded here: the chmod is taken, with the
        // touch's mtime.
        assert_eq!(decide_same_bytes(with(0o644, 9), Some(with(0o644, 1)), with(0o755, 1)), Decision::Merge(with(0o755, 9)));
        // Chmodded and touched here, touched elsewhere: the mode from here, the mtime
        // decided first.
        assert_eq!(decide_same_bytes(with(0o644, 9), Some(with(0o644, 1)), with(0o755, 5)), Decision::Merge(with(0o755, 9)));
        // Chmodded and touched here, nobody touched it elsewhere: the node's whole version.
        assert_eq!(decide_same_bytes(with(0o644, 1), Some(with(0o644, 1)), with(0o755, 5)), Decision::Accept);
        // Chmodded there too: the first decided stays.
        assert_eq!(decide_same_bytes(with(0o600, 1), Some(with(0o644, 1)), with(0o755, 1)), Decision::Unchanged);
        // Touched here, chmodded there: the chmod there stays.
        assert_eq!(decide_same_bytes(with(0o600, 1), Some(with(0o644, 1)), with(0o644, 9)), Decision::Unchanged);
        // Chowned here: taken like a chmod.
        assert_eq!(decide_same_bytes(with(0o644, 1), Some(with(0o644, 1)), Version { uid: 1000, ..with(0o644, 1) }), Decision::Accept);
        // The state at the base unknown (history forgotten, a lost revision): as before.
        assert_eq!(decide_same_bytes(with(0o644, 9), None, with(0o755, 1)), Decision::Unchanged);
        // Its mode and owners as the node says them (`base_meta`), no mtime: the chmod
        // is taken with the mtime the path has now.
        let said = Some(AtBase { meta: ModeAndOwners { mode: 0o644, uid: 0, gid: 0 }, mtime_ns: None, content: None });
        assert_eq!(decide_on(with(0o644, 9), said, with(0o755, 1)), Decision::Merge(with(0o755, 9)));
    }

    /// A change on a stale base when only the sender changed the path since (its
    /// earlier chmod of another path, put here as its conflict file's update, which it
    /// had not seen): its later chmod or write is kept, as on the current state, with
    /// what it did not change as the state has it (simulator seeds 634610, 798153).
    #[test]
    fn a_chmod_on_a_base_only_the_sender_changed_since_is_kept() {
        let with = |mode: u32, uid: u32| Version { mode, uid, ..file(1) };
        let said = Some(ModeAndOwners { mode: 0o644, uid: 0, gid: 0 });
        let decide_own = |only_own_since: bool, current: Version, mine: Version| {
            let made_on = MadeOn { at_base: Some(AtBase::from(&with(0o644, 0))), said, only_own_since, ..MadeOn::rev(Revision(3)) };
            decide(&p("a"), Some(&cur(5, Some(current))), &made_on, &put(mine), 0, None)
        };
        assert_eq!(decide_own(true, with(0o600, 0), with(0o700, 0)), Decision::Accept, "the later chmod of the same node");
        assert_eq!(decide_own(false, with(0o600, 0), with(0o700, 0)), Decision::Unchanged, "another node's chmod, decided first, stays");
        assert_eq!(decide_own(true, with(0o600, 1000), with(0o700, 0)), Decision::Merge(with(0o700, 1000)), "its own chown since stays");
        // New bytes written and chowned over its own earlier write, chmod and chown
        // (simulator seed 798153): its bytes and owner, with the mode it did not change
        // as the state has it; by another node, a conflict.
        let (since, mine) = (Version { mode: 0o600, uid: 1000, ..file(2) }, Version { mode: 0o644, uid: 1001, ..file(3) });
        assert_eq!(decide_own(true, since.clone(), mine.clone()), Decision::Merge(Version { mode: 0o600, ..mine.clone() }), "its later write and chown");
        assert_eq!(decide_own(false, since, mine), Decision::Conflict, "another node's write");
    }

    /// A chmod, chown or touch made on a state whose bytes changed elsewhere since: no
    /// conflict file of the older bytes (nothing was written here); a chmod is kept on
    /// the bytes written elsewhere, a touch of the older bytes is not.
    #[test]
    fn a_chmod_of_bytes_written_elsewhere_since_is_merged_not_a_conflict() {
        let (base, written) = (Version { mtime_ns: 1, ..file(1) }, Version { mtime_ns: 9, ..file(2) });
        let on = |current: Version, at_base: Option<AtBase>, mine: Version| {
            decide(&p("a"), Some(&cur(5, Some(current))), &MadeOn { at_base, ..MadeOn::rev(Revision(3)) }, &put(mine), 0, None)
        };
        let known = Some(AtBase::from(&base));
        let over = |v: Option<Version>| Decision::OverChangedBytes(v);
        assert_eq!(on(written.clone(), known.clone(), Version { mode: 0o755, ..base.clone() }), over(Some(Version { mode: 0o755, ..written.clone() })));
        assert_eq!(on(written.clone(), known.clone(), Version { mtime_ns: 5, ..base.clone() }), over(None), "a touch of the older bytes");
        assert_eq!(on(Version { mode: 0o600, ..written.clone() }, known.clone(), Version { mode: 0o755, ..base.clone() }), over(None), "chmodded there too");
        let link = Version { content: Content::Symlink { target: "t".into() }, ..base.clone() };
        assert_eq!(on(link, known.clone(), Version { mode: 0o755, ..base.clone() }), over(None), "another kind now");
        // Bytes written here too, or the bytes at the base unknown (only the node's
        // `base_meta`): a conflict file, as before.
        assert_eq!(on(written.clone(), known, Version { mode: 0o755, ..file(3) }), Decision::Conflict);
        let said = Some(AtBase { meta: ModeAndOwners::from(&base), mtime_ns: None, content: None });
        assert_eq!(on(written, said, Version { mode: 0o755, ..base }), Decision::Conflict);
    }

    /// A write made on a state chmodded, chowned or touched elsewhere since (its bytes
    /// still those at the base): no conflict file, the write is kept with the mode set
    /// elsewhere (before, the write became a conflict file beside the chmodded bytes).
    #[test]
    fn a_write_over_a_chmod_made_elsewhere_since_is_merged_not_a_conflict() {
        let base = Version { mtime_ns: 1, ..file(1) };
        let on = |current: Version, at_base: Option<AtBase>, mine: Version| {
            decide(&p("a"), Some(&cur(5, Some(current))), &MadeOn { at_base, ..MadeOn::rev(Revision(3)) }, &put(mine), 0, None)
        };
        let known = Some(AtBase::from(&base));
        let mine = Version { mtime_ns: 7, ..file(2) };
        let chmodded = Version { mode: 0o600, ..base.clone() };
        assert_eq!(on(chmodded.clone(), known.clone(), mine.clone()), Decision::Merge(Version { mode: 0o600, ..mine.clone() }), "the chmod kept on the write");
        assert_eq!(on(Version { uid: 7, ..base.clone() }, known.clone(), mine.clone()), Decision::Merge(Version { uid: 7, ..mine.clone() }), "a chown too");
        assert_eq!(on(Version { mtime_ns: 9, ..base.clone() }, known.clone(), mine.clone()), Decision::Accept, "touched elsewhere: the write's mtime");
        let mine_chmodded = Version { mode: 0o755, ..mine.clone() };
        assert_eq!(
            on(chmodded.clone(), known.clone(), mine_chmodded.clone()),
            Decision::Merge(Version { mode: 0o600, ..mine.clone() }),
            "the first chmod decided"
        );
        assert_eq!(on(Version { mtime_ns: 9, ..base.clone() }, known.clone(), mine_chmodded), Decision::Accept, "chmodded here only");
        // Written elsewhere too, another kind here, or the bytes at the base unknown:
        // a conflict file, as before.
        assert_eq!(on(Version { mode: 0o600, ..file(3) }, known.clone(), mine.clone()), Decision::Conflict);
        let link = Version { content: Content::Symlink { target: "t".into() }, ..base.clone() };
        assert_eq!(on(chmodded.clone(), known, link), Decision::Conflict);
        let said = Some(AtBase { meta: ModeAndOwners::from(&base), mtime_ns: None, content: None });
        assert_eq!(on(chmodded, said, mine), Decision::Conflict);
    }

    /// A put on the current state whose mode and owners are those the node made it on
    /// (`said`) did not change them: the manager's stay when they differ (a chmod merged
    /// into the node's earlier write, which the node, still writing, had not applied).
    #[test]
    fn a_put_keeps_the_mode_and_owners_it_did_not_change() {
        let said = Some(ModeAndOwners::from(&file(1)));
        let on = |current: Version, said: Option<ModeAndOwners>, mine: Version| {
            decide(&p("a"), Some(&cur(5, Some(current))), &MadeOn { said, ..MadeOn::rev(Revision(5)) }, &put(mine), 0, None)
        };
        let (theirs, mine) = (Version { mode: 0o600, ..file(1) }, Version { mtime_ns: 7, ..file(2) });
        assert_eq!(on(theirs.clone(), said, mine.clone()), Decision::Merge(Version { mode: 0o600, ..mine.clone() }));
        assert_eq!(on(theirs.clone(), said, Version { mode: 0o755, ..mine.clone() }), Decision::Accept, "chmodded here");
        assert_eq!(on(theirs.clone(), None, mine.clone()), Decision::Accept, "nothing said");
        assert_eq!(on(theirs.clone(), said, file(1)), Decision::Unchanged, "the same state once merged");
        // A base above the current revision (a later state the manager lost): the node's.
        let lost = decide(&p("a"), Some(&cur(3, Some(theirs))), &MadeOn { said, ..MadeOn::rev(Revision(9)) }, &put(mine), 0, None);
        assert_eq!(lost, Decision::Accept);
    }

    /// Mode, uid and gid merge one by one: a chmod made here and a chown made elsewhere
    /// on the same state both stay, whichever rule merges them (a write or a chmod on a
    /// stale base, a later put on the merged state).
    #[test]
    fn a_chmod_here_and_a_chown_elsewhere_both_stay() {
        let base = Version { mtime_ns: 1, ..file(1) };
        let chowned = Version { uid: 2000, ..base.clone() };
        let stale = |current: Version, mine: Version| {
            decide(&p("a"), Some(&cur(5, Some(current))), &MadeOn { at_base: Some(AtBase::from(&base)), ..MadeOn::rev(Revision(3)) }, &put(mine), 0, None)
        };
        // A chmod of the same bytes.
        let chmodded = Version { mode: 0o600, mtime_ns: 7, ..base.clone() };
        assert_eq!(stale(chowned.clone(), chmodded.clone()), Decision::Merge(Version { uid: 2000, ..chmodded.clone() }));
        // A write with a chmod.
        let written = Version { mode: 0o600, mtime_ns: 7, ..file(2) };
        assert_eq!(stale(chowned.clone(), written.clone()), Decision::Merge(Version { uid: 2000, ..written.clone() }));
        // A chmod of bytes written elsewhere since, and chowned there.
        let rewritten = Version { uid: 2000, mtime_ns: 9, ..file(3) };
        assert_eq!(stale(rewritten.clone(), chmodded.clone()), Decision::OverChangedBytes(Some(Version { mode: 0o600, ..rewritten.clone() })));
        // Both changed the same field: the first decided.
        assert_eq!(stale(Version { mode: 0o640, ..chowned.clone() }, chmodded.clone()), Decision::Unchanged);
        // A chmod after a write the manager merged with a chown (`said`: what it was made on).
        let merged = Version { uid: 2000, ..file(2) };
        let later = decide(
            &p("a"),
            Some(&cur(5, Some(merged.clone()))),
            &MadeOn { said: Some(ModeAndOwners::from(&file(2))), ..MadeOn::rev(Revision(5)) },
            &put(Version { mode: 0o600, ..file(2) }),
            0,
            None,
        );
        assert_eq!(later, Decision::Merge(Version { mode: 0o600, ..merged }));
    }

    /// On a stale base, what the node did not change of the state it says it made the
    /// change on (`said`) is not its to set, even where the history's state at the base
    /// differs from it (simulator seed 657857: a write made before the node saw the
    /// chmod and chown its earlier change's decision came with undid them, and a later
    /// chown made elsewhere was then lost to that phantom change).
    #[test]
    fn what_the_node_did_not_change_of_what_it_saw_is_not_its_to_set() {
        let seen = Version { mtime_ns: 1, ..file(1) };
        let merged_there = Version { mode: 0o600, uid: 1000, mtime_ns: 2, ..file(1) };
        let stale = |current: Version, said: Option<ModeAndOwners>, mine: Version| {
            let made_on = MadeOn { at_base: Some(AtBase::from(&merged_there)), said, ..MadeOn::rev(Revision(3)) };
            decide(&p("a"), Some(&cur(5, Some(current))), &made_on, &put(mine), 0, None)
        };
        let said = Some(ModeAndOwners::from(&seen));
        let touched = Version { mtime_ns: 9, ..merged_there.clone() };
        // A write on the state the node saw: the mode and owner set elsewhere stay.
        let written = Version { mtime_ns: 7, ..file(2) };
        assert_eq!(stale(touched.clone(), said, written.clone()), Decision::Merge(Version { mode: 0o600, uid: 1000, ..written.clone() }));
        assert_eq!(stale(touched.clone(), None, written.clone()), Decision::Accept, "nothing said: against the history's state, as before");
        // Its own chmod, made there too, is its to set.
        let chmodded = Version { mode: 0o755, ..written.clone() };
        assert_eq!(stale(touched.clone(), said, chmodded.clone()), Decision::Merge(Version { uid: 1000, ..chmodded }));
        // A touch of the same bytes, which another node's chmod won over: no chmod back.
        assert_eq!(stale(touched.clone(), said, Version { mtime_ns: 7, ..seen.clone() }), Decision::Unchanged);
        // A chmod of bytes written elsewhere since: the mode and owner set there stay.
        let rewritten = Version { mtime_ns: 9, ..Version { content: file(3).content, ..merged_there.clone() } };
        assert_eq!(stale(rewritten.clone(), said, Version { mtime_ns: 7, ..seen.clone() }), Decision::OverChangedBytes(None));
        assert_eq!(
            stale(rewritten.clone(), said, Version { uid: 1001, ..seen }),
            Decision::OverChangedBytes(Some(Version { uid: 1001, ..rewritten })),
            "the node's chown on what was written there"
        );
    }

    #[test]
    fn edit_beats_delete_both_ways() {
        // Deleted elsewhere, edited here: the edit is kept.
        assert_eq!(decide(&p("a"), Some(&cur(5, None)), &MadeOn::rev(Revision(3)), &put(file(2)), 0, None), Decision::Accept);
        // Edited elsewhere, deleted here: the delete is refused.
        assert!(matches!(decide(&p("a"), Some(&cur(5, Some(file(1)))), &MadeOn::rev(Revision(3)), &ChangeOp::Delete, 0, None), Decision::Refuse(_)));
        assert_eq!(decide(&p("a"), Some(&cur(5, Some(file(1)))), &MadeOn::rev(Revision(5)), &ChangeOp::Delete, 0, None), Decision::Accept);
    }

    /// A base above the path's revision is a later state the manager lost (its database
    /// brought back from an older copy): the change was made on the newest state there
    /// is, and is taken as made on the current one.
    #[test]
    fn a_change_made_on_a_state_the_manager_lost_is_made_on_the_current_one() {
        assert_eq!(decide(&p("a"), Some(&cur(3, Some(file(1)))), &MadeOn::rev(Revision(9)), &put(file(2)), 0, None), Decision::Accept);
        assert_eq!(decide(&p("a"), Some(&cur(3, Some(file(1)))), &MadeOn::rev(Revision(9)), &ChangeOp::Delete, 0, None), Decision::Accept);
        let full = Current { rev: Revision(3), version: Some(dir()), has_children: true, made_by_manager: false, from_lost: None };
        assert!(
            matches!(decide(&p("d"), Some(&full), &MadeOn::rev(Revision(9)), &ChangeOp::Delete, 0, None), Decision::Refuse(_)),
            "still not over files added"
        );
        // Taken in at 100 from lost revision 9: a later lost state (12) or one made on
        // it (9) is on the current state while the path is still there; an older (7)
        // is not, nor anything once the path has moved on.
        let taken_in = |rev| Current { from_lost: Some(TakenIn { base: Revision(9), first: Revision(90), last: Revision(100) }), ..cur(rev, Some(file(1))) };
        for (rev, base, d) in [(100, 12, Decision::Accept), (100, 9, Decision::Accept), (100, 7, Decision::Conflict), (101, 12, Decision::Conflict)] {
            assert_eq!(decide(&p("a"), Some(&taken_in(rev)), &MadeOn::rev(Revision(base)), &put(file(2)), 0, None), d, "at {rev}, base {base}");
        }
        assert!(from_a_later_lost_state(&taken_in(100), Revision(12)) && !from_a_later_lost_state(&taken_in(100), Revision(9)));
    }

    /// A delete made on a state whose bytes were not changed since, only its mode,
    /// owners or mtime: taken (before, refused, and the file came back where it was
    /// deleted); over bytes written elsewhere since, or not known, refused as before.
    #[test]
    fn a_delete_of_bytes_only_chmodded_elsewhere_since_is_taken() {
        let base = Version { mtime_ns: 1, ..file(1) };
        let on = |current: Version, at_base: Option<AtBase>| {
            decide(&p("a"), Some(&cur(5, Some(current))), &MadeOn { at_base, ..MadeOn::rev(Revision(3)) }, &ChangeOp::Delete, 0, None)
        };
        let known = Some(AtBase::from(&base));
        assert_eq!(on(Version { mode: 0o600, ..base.clone() }, known.clone()), Decision::Accept, "chmodded elsewhere");
        assert_eq!(on(Version { mtime_ns: 9, ..base.clone() }, known.clone()), Decision::Accept, "touched elsewhere");
        assert!(matches!(on(file(2), known), Decision::Refuse(_)), "written elsewhere");
        let said = Some(AtBase { meta: ModeAndOwners::from(&base), mtime_ns: None, content: None });
        assert!(matches!(on(Version { mode: 0o600, ..base.clone() }, said), Decision::Refuse(_)), "the bytes at the base not known");
        // A directory chmodded elsewhere: taken when empty, refused with children.
        let d = |has_children: bool| Current {
            rev: Revision(5),
            version: Some(Version { mode: 0o700, ..dir() }),
            has_children,
            made_by_manager: false,
            from_lost: None,
        };
        let known_dir = MadeOn { at_base: Some(AtBase::from(&dir())), ..MadeOn::rev(Revision(3)) };
        assert_eq!(decide(&p("d"), Some(&d(false)), &known_dir, &ChangeOp::Delete, 0, None), Decision::Accept);
        assert!(matches!(decide(&p("d"), Some(&d(true)), &known_dir, &ChangeOp::Delete, 0, None), Decision::Refuse(_)));
    }

    #[test]
    fn directories_with_new_children_are_not_deleted() {
        let c = Current { rev: Revision(2), version: Some(dir()), has_children: true, made_by_manager: false, from_lost: None };
        assert!(matches!(decide(&p("d"), Some(&c), &MadeOn::rev(Revision(2)), &ChangeOp::Delete, 0, None), Decision::Refuse(_)));
        // A file put over it is kept beside it, as a conflict file: nothing is lost.
        assert_eq!(decide(&p("d"), Some(&c), &MadeOn::rev(Revision(2)), &put(file(1)), 0, None), Decision::Conflict);
        assert!(matches!(decide(&p("d"), Some(&c), &MadeOn::rev(Revision(2)), &put(file(1)), MAX_CONFLICT_COPIES, None), Decision::KeepAsVersion(_)));
    }

    /// Found by the simulator (seed 2069): a node's chmod of a directory it kept for
    /// its pending children was taken for an edit of a stale version, because the
    /// manager had brought the directory back (mode 755) for one of those children.
    #[test]
    fn regression_a_directory_the_manager_brought_back_takes_the_nodes_mode() {
        let restored = Current { rev: Revision(5), version: Some(dir()), has_children: true, made_by_manager: true, from_lost: None };
        let mut mine = dir();
        mine.mode = 0o700;
        assert_eq!(decide(&p("d"), Some(&restored), &MadeOn::rev(Revision(2)), &put(mine), 0, None), Decision::Accept);
    }

    #[test]
    fn regression_a_directory_made_where_a_file_was_written_elsewhere_is_a_conflict() {
        // Found by the simulator: refused, and everything the node then wrote below
        // the directory was refused too, and lost.
        assert_eq!(decide(&p("d"), Some(&cur(3, Some(file(1)))), &MadeOn::rev(Revision(0)), &put(dir()), 0, None), Decision::Conflict);
    }

    #[test]
    fn a_put_below_a_file_goes_below_a_conflict_directory_and_a_delete_does_not() {
        let f = p("d");
        assert_eq!(decide(&p("d/x"), None, &MadeOn::rev(Revision(0)), &put(file(1)), 0, Some(&f)), Decision::ConflictBelow { file: f.clone() });
        assert_eq!(decide(&p("d/x"), Some(&cur(4, None)), &MadeOn::rev(Revision(4)), &ChangeOp::Delete, 0, Some(&f)), Decision::Unchanged);
        let copy = p("d (conflict from n2 r9)");
        assert_eq!(moved_below(&p("d/x/y"), &f, &copy), Some(p("d (conflict from n2 r9)/x/y")));
        assert_eq!(moved_below(&p("dx/y"), &f, &copy), None, "dx is not below d");
    }

    #[test]
    fn a_follow_up_is_based_on_what_its_own_earlier_change_became() {
        let prior = |outcome: Outcome, copy_still_own: bool| Prior { rev: Revision(7), outcome, base: Revision(3), copy_still_own };
        let edit = put(file(2));
        assert_eq!(basis(Revision(1), None, &edit), Basis::Base(Revision(1)));
        assert_eq!(basis(Revision(1), Some(&prior(Outcome::Accepted, false)), &edit), Basis::Base(Revision(7)));
        assert_eq!(basis(Revision(1), Some(&prior(Outcome::Unchanged, false)), &edit), Basis::Base(Revision(7)));
        // Refused: the path is still at the base that change had.
        assert_eq!(basis(Revision(1), Some(&prior(Outcome::Refused { reason: "no".into() }, false)), &edit), Basis::Base(Revision(3)));
        // Sent with a later revision than the one its earlier change left (seed 1851:
        // the sender's queue lost that change's decision, then brought the decision of
        // a second change following it): based on that later revision.
        assert_eq!(basis(Revision(9), Some(&prior(Outcome::Accepted, false)), &edit), Basis::Base(Revision(9)));
        assert_eq!(basis(Revision(9), Some(&prior(Outcome::Refused { reason: "no".into() }, false)), &edit), Basis::Base(Revision(9)));
        let copy = p("a (conflict from n2 r8)");
        let conflict = Outcome::Conflict { copy: copy.clone() };
        assert_eq!(basis(Revision(1), Some(&prior(conflict.clone(), true)), &edit), Basis::UpdateConflictFile(copy));
        // Someone else took over the conflict file, or the follow-up is a delete: the
        // change is decided on its own base.
        assert_eq!(basis(Revision(1), Some(&prior(conflict.clone(), false)), &edit), Basis::Base(Revision(1)));
        assert_eq!(basis(Revision(1), Some(&prior(conflict.clone(), true)), &ChangeOp::Delete), Basis::Base(Revision(1)));
        // A directory or symlink made there since is a conflict of its own (seed 786548:
        // a directory put over the conflict file had the sender's edit of it refused).
        let dir = Version { content: Content::Dir, ..file(2) };
        let link = Version { content: Content::Symlink { target: "t".into() }, ..file(2) };
        assert_eq!(basis(Revision(1), Some(&prior(conflict.clone(), true)), &put(dir)), Basis::Base(Revision(1)));
        assert_eq!(basis(Revision(1), Some(&prior(conflict, true)), &put(link)), Basis::Base(Revision(1)));
    }

    #[test]
    fn conflict_files_never_conflict_and_copies_are_capped() {
        let copy = p("r (conflict from n2 2026-11-25 14.03.10).txt");
        assert_eq!(decide(&copy, Some(&cur(5, Some(file(1)))), &MadeOn::rev(Revision(3)), &put(file(2)), 0, None), Decision::Accept);
        assert!(matches!(
            decide(&p("a"), Some(&cur(5, Some(file(1)))), &MadeOn::rev(Revision(3)), &put(file(2)), MAX_CONFLICT_COPIES, None),
            Decision::KeepAsVersion(_)
        ));
    }

    const AT: UtcTime = UtcTime { unix_secs: 1_795_615_390 }; // 2026-11-25 14:03:10 UTC

    fn names(path: &str, node: &str, rev: u64) -> Vec<String> {
        conflict_candidates(&p(path), &node.parse().unwrap(), AT, Revision(rev)).into_iter().map(String::from).collect()
    }

    #[test]
    fn conflict_names_keep_the_extension() {
        assert_eq!(names("docs/report.txt", "node-b", 7)[0], "docs/report (conflict from node-b 2026-11-25 14.03.10).txt");
        assert_eq!(names("Makefile", "node-b", 7)[1], "Makefile (conflict from node-b 2026-11-25 14.03.10 2)");
        assert_eq!(names(".bashrc", "node-b", 7)[0], ".bashrc (conflict from node-b 2026-11-25 14.03.10)");
        let long = names(&format!("{}.txt", "é".repeat(120)), "node-b", 7).remove(0);
        assert!(long.len() <= 255 && long.ends_with(").txt"), "{long}");
        assert!(is_conflict_file(&p(&long)));
    }

    #[test]
    fn dated_names_then_short_forms_with_the_revision() {
        let all = names("d/f.txt", "n2", 57);
        assert_eq!(all.len(), CONFLICT_NAME_TRIES as usize + 2);
        assert_eq!(all[CONFLICT_NAME_TRIES as usize - 1], format!("d/f (conflict from n2 2026-11-25 14.03.10 {CONFLICT_NAME_TRIES}).txt"));
        assert_eq!(all[all.len() - 2..], ["d/f (conflict from n2 r57).txt", "d/f (conflict from r57).txt"]);
    }

    /// Regression: a name whose extension is longer than a conflict name may be (`a.` and
    /// 230 bytes) got no candidate that fit, the original path came back as the
    /// "candidate", and the manager's naming loop never ended.
    #[test]
    fn regression_a_long_extension_is_shortened_too() {
        let name = format!("a.{}", "e".repeat(230));
        let first = names(&name, "n2", 9).remove(0);
        assert!(first.len() <= wire::MAX_NAME_BYTES, "{first}");
        assert!(first.starts_with("a (conflict from n2 2026-11-25 14.03.10).eee"), "{first}");
    }

    /// Regression: below a 4,015-byte directory a conflict name that fit NAME_MAX still
    /// made the path longer than PATH_MAX, and the naming loop never ended.
    #[test]
    fn regression_a_path_near_the_limit_gets_a_name_that_fits() {
        let dir = (0..16).map(|i| format!("{i:02}{}", "d".repeat(248))).collect::<Vec<_>>().join("/");
        let path = format!("{dir}/{}.txt", "s".repeat(60));
        let all = names(&path, "n2", 9);
        assert!(all[0].ends_with(&format!("/{} (conflict from n2 2026-11-25 14.03.10).txt", "s".repeat(37))), "{}", all[0]);
        assert!(all.iter().all(|c| c.len() <= wire::MAX_PATH_BYTES));
        // With 20 bytes of room only the shortest form fits; with less, nothing does and
        // the caller refuses the change instead of looking for ever.
        let tight = format!("{}/f", parent_of_len(4_075));
        assert_eq!(names(&tight, "n2", 9), [format!("{}/f (conflict from r9)", parent_of_len(4_075))]);
        assert!(names(&format!("{}/f", parent_of_len(4_077)), "n2", 9).is_empty());
    }

    /// `x/x/…/x`, with a `y` more at the end for an even length.
    fn parent_of_len(n: usize) -> String {
        let mut parent = "x/".repeat(n.div_ceil(2));
        parent.pop();
        if parent.len() < n {
            parent.push('y');
        }
        assert_eq!(parent.len(), n);
        parent
    }

    /// Every length of the parent near the path limit, with a few awkward names.
    #[test]
    fn exhaustive_near_the_path_limit() {
        for parent_len in 3_900..4_095 {
            let parent = parent_of_len(parent_len);
            for name in ["a", "a.b", "é€𝄞.txt", "...", "a. (conflict from n2 r1)"] {
                if let Ok(path) = RelPath::new(format!("{parent}/{name}")) {
                    check_candidates(&path, &"n2".parse().unwrap(), Revision(123_456)).unwrap();
                }
            }
        }
    }

    /// The properties every list of candidates has; an error says which one failed.
    fn check_candidates(path: &RelPath, node: &NodeId, rev: Revision) -> Result<(), String> {
        let all = conflict_candidates(path, node, AT, rev);
        if all.len() > CONFLICT_NAME_TRIES as usize + 2 {
            return Err(format!("{} candidates", all.len()));
        }
        for (i, c) in all.iter().enumerate() {
            RelPath::new(c.as_str()).map_err(|e| format!("{c:?} is not a valid path: {e}"))?;
            if c == path {
                return Err(format!("{c:?} is the original path"));
            }
            if c.parent() != path.parent() {
                return Err(format!("{c:?} is not beside {path:?}"));
            }
            if c.name().len() > wire::MAX_NAME_BYTES || c.as_str().len() > wire::MAX_PATH_BYTES {
                return Err(format!("{c:?} does not fit"));
            }
            if !is_conflict_file(c) {
                return Err(format!("{c:?} is not marked as a conflict file"));
            }
            if all[..i].contains(c) {
                return Err(format!("{c:?} comes twice"));
            }
        }
        // The shortest form fits whenever the room beside the original allows it, so the
        // search for a free name ends with a name that no other path has ever had.
        let room = match path.parent() {
            Some(p) => wire::MAX_PATH_BYTES - p.as_str().len() - 1,
            None => wire::MAX_PATH_BYTES,
        }
        .min(wire::MAX_NAME_BYTES);
        let shortest = format!("{CONFLICT_MARK}r{})", rev.0);
        if room >= shortest.len() && !all.last().is_some_and(|c| c.name().contains(&format!(" r{})", rev.0))) {
            return Err(format!("no short form with the revision although {room} bytes are free: {all:?}"));
        }
        Ok(())
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        /// Names from a small alphabet rich in dots and multi-byte characters (2, 3 and 4
        /// bytes), so cuts land inside characters and extensions are long or many.
        fn name() -> impl Strategy<Value = String> {
            let ch = prop_oneof![4 => Just('a'), 3 => Just('.'), 1 => Just(' '), 2 => Just('é'), 1 => Just('€'), 1 => Just('𝄞')];
            let free = proptest::collection::vec(ch.clone(), 1..300).prop_map(|cs| cs.into_iter().collect::<String>());
            let stem_ext = (proptest::collection::vec(ch.clone(), 0..120), proptest::collection::vec(ch, 0..260))
                .prop_map(|(s, e)| format!("{}.{}", s.into_iter().collect::<String>(), e.into_iter().collect::<String>()));
            prop_oneof![free, stem_ext].prop_map(|s| match cut(&s, wire::MAX_NAME_BYTES) {
                "." | ".." => "n".to_string(),
                s => s.to_string(),
            })
        }

        /// Paths of up to 17 directories, often of about 250 bytes, so the whole is often
        /// near the 4,096-byte limit; leading directories are dropped until it is valid.
        fn path() -> impl Strategy<Value = RelPath> {
            let dir = prop_oneof![name(), (240..=255usize).prop_map(|n| "d".repeat(n))];
            (proptest::collection::vec(dir, 0..17), name()).prop_map(|(mut dirs, name)| loop {
                let s = dirs.iter().chain(std::iter::once(&name)).cloned().collect::<Vec<_>>().join("/");
                match RelPath::new(s) {
                    Ok(p) => break p,
                    Err(_) => {
                        dirs.remove(0);
                    }
                }
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]
            #[test]
            fn every_candidate_is_a_valid_path_beside_the_original_that_fits(
                path in path(),
                node in "[a-z0-9._-]{1,64}",
                rev in 1..u64::MAX,
            ) {
                let node: NodeId = node.parse().unwrap();
                if let Err(e) = check_candidates(&path, &node, Revision(rev)) {
                    prop_assert!(false, "{} ({} bytes): {}", path, path.as_str().len(), e);
                }
            }
        }
    }
}
