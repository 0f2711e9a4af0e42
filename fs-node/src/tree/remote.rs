//! Applying the manager's state of a path (a broadcast, a decision, a sync reply
//! entry): never over an undecided local change or unsaved writes.

use super::*;

impl State {
    /// Whether the file at `path` has writes not yet committed.
    pub(super) fn is_dirty(&self, path: &RelPath) -> bool {
        self.resolve(path).and_then(|(_, _, ino)| self.inodes.get(&ino)).is_some_and(|i| i.work.is_some())
    }

    pub(super) fn set_rev(&mut self, path: &RelPath, rev: Revision) -> FsResult<()> {
        let cur = self.revs.get(path).copied().unwrap_or_default();
        if rev > cur {
            let old = self.revs.insert(path.clone(), rev);
            self.last_rev = self.last_rev.max(rev.0);
            self.record(|| Undo::Rev(path.clone(), old));
            self.db.set_rev(path, rev)?;
            self.took_a_state_at(path)?;
        }
        Ok(())
    }

    /// The inode at `path`, if one is, took the manager's state the path's revision here
    /// names (applied it, or its own change there was decided): it is no longer born
    /// here (`Inode::born_here`).
    fn took_a_state_at(&mut self, path: &RelPath) -> FsResult<()> {
        if let Some((_, _, ino)) = self.resolve(path).filter(|&(_, _, ino)| self.inodes.get(&ino).is_some_and(|i| i.born_here)) {
            self.inode_mut(ino)?.born_here = false;
        }
        Ok(())
    }

    /// Whether the manager, naming `path` at `rev` in a sync reply whose first page had
    /// head `head`, lost a later state of it that this node took
    /// (`Tree::send_states_the_manager_lost`), and this node has no change of its own there.
    pub(super) fn lost_by_the_manager(&self, path: &RelPath, rev: Revision, head: Revision) -> bool {
        let taken = self.revs.get(path).copied().unwrap_or_default();
        rev < taken && taken <= head && !self.outbox.has(path) && !self.is_dirty(path) && !self.move_below(path)
    }

    /// The manager's state `entry` comes from states it lost that it took in again, the
    /// first at revision `at`, the latest from lost revision `base` (`wire::FromLost`);
    /// this node took revision `local_rev` of the path between the two, one the manager
    /// no longer has: a later lost state than the one taken in. Unless it is what the
    /// entry says, the node sends it (a put or a delete, based on that revision)
    /// instead of taking the entry, and takes the decision, whatever it is. Returns
    /// whether it did. (A file on demand whose content the node lacks is left to a node
    /// that has it.)
    fn send_later_lost_state(&mut self, entry: &Entry, local_rev: Revision, local_version: Option<&Version>, store: &ContentStore) -> FsResult<bool> {
        let Some(lost) = entry.from_lost else { return Ok(false) };
        if !(lost.base < local_rev && local_rev < lost.at) || local_version == entry.version.as_ref() || self.move_below(&entry.path) {
            return Ok(false);
        }
        match self.resolve(&entry.path) {
            Some(_) if local_version.is_none() => return Ok(false),
            Some(_) if matches!(local_version, Some(Version { content: Content::File { hash, .. }, .. }) if !store.has(hash)) => return Ok(false),
            Some((parent, name, ino)) => self.record_put(parent, &name, ino)?,
            None => self.record_delete(entry.path.clone())?,
        }
        tracing::debug!(target: "changes", path = %entry.path, rev = entry.rev.0, local_rev = local_rev.0, lost_base = lost.base.0, "a later state the manager lost: sending it instead");
        self.set_rev_to(&entry.path, entry.rev)?;
        Ok(true)
    }

    /// Sets the path's revision to `rev`, the manager's, when it lost the later state the
    /// node took (`Tree::send_states_the_manager_lost`, `send_later_lost_state`):
    /// whatever it decides of the node's state there comes at that revision or later,
    /// and is applied.
    pub(super) fn set_rev_to(&mut self, path: &RelPath, rev: Revision) -> FsResult<()> {
        let old = self.revs.insert(path.clone(), rev);
        self.record(|| Undo::Rev(path.clone(), old));
        self.db.set_rev(path, rev)?;
        self.took_a_state_at(path)
    }

    /// Whether `path` or anything below it has a local change the manager has not
    /// decided: a queued change, a file being written whose change is not queued yet
    /// (it is queued when its last writer closes), an ignored path, or an entry a rename
    /// moved whose put is not queued yet (`moves.rs`). Applying the
    /// manager's state must not remove any of them.
    pub(super) fn has_local_change_below(&self, path: &RelPath) -> bool {
        self.outbox.has_within(path)
            || self.resolve(path).is_some_and(|(_, _, ino)| self.has_unsaved_within(ino))
            || self.has_ignored_within(path)
            || self.move_below(path)
    }

    /// An ancestor of `path` that this node took at a revision after `rev` and that is
    /// no directory here (deleted, or another kind): a live state of `path` at `rev` is
    /// then stale. The manager deletes a directory only once nothing below it is live,
    /// and whatever is put below it again comes after the directory is made again, so
    /// that state of `path` was deleted before the ancestor was. Applied, it would make
    /// the deleted directory again (`ensure_dirs`), which no delete would name any more:
    /// simulator seed 5925, a pull of a content that finished after the node took the
    /// directory's delete, the deletes below it lost with its queue's oldest messages,
    /// brought the directory back to every node.
    fn gone_above_since(&self, path: &RelPath, rev: Revision) -> Option<RelPath> {
        // The ancestors as slices of the path (no allocation: this runs for every live
        // entry applied, a join's million included), innermost first.
        let p = path.as_str();
        let ancestors = p.char_indices().rev().filter(|&(_, c)| c == '/').map(|(i, _)| &p[..i]);
        ancestors.filter(|anc| self.revs.get(*anc).is_some_and(|taken| *taken > rev)).find_map(|anc| {
            let anc = RelPath::new(anc.to_string()).ok()?;
            let is_dir = self.resolve(&anc).and_then(|(_, _, ino)| self.inodes.get(&ino)).is_some_and(|i| i.kind == Kind::Dir);
            (!is_dir).then_some(anc)
        })
    }

    /// A path below `path` (inode `ino` here) live here at a revision taken after `rev`:
    /// a state of `path` at `rev` that is no directory (a file, a symlink, a delete) is
    /// then stale. The manager's state is a tree, so `path` was a directory at that later
    /// revision. Applied, the stale state would take the newer paths below it away and
    /// leave their revisions taken, so that no later state of them at those revisions
    /// would make them again (simulator seed 241679: after the manager's database was
    /// brought back from a copy, a broadcast the lost database had made, another node's
    /// file at the path, came after a file below the directory made since).
    /// Walks the local subtree: only a directory with entries, met by a state that is no
    /// directory, which the manager's order of deletes (deepest first) makes rare.
    fn newer_live_below(&self, ino: u64, path: &RelPath, rev: Revision) -> Option<RelPath> {
        // (A file over a file, the common case, costs this lookup only.)
        if self.inodes.get(&ino)?.children.is_empty() {
            return None;
        }
        let mut stack = vec![(ino, path.clone())];
        while let Some((dir, at)) = stack.pop() {
            for (name, e) in &self.inodes.get(&dir)?.children {
                let Some(child) = name.to_str().and_then(|n| at.join(n).ok()) else { continue };
                if self.revs.get(&child).is_some_and(|taken| *taken > rev) {
                    return Some(child);
                }
                if e.kind == Kind::Dir {
                    stack.push((e.ino, child));
                }
            }
        }
        None
    }

    fn has_unsaved_within(&self, ino: u64) -> bool {
        self.inodes.get(&ino).is_some_and(|i| i.work.is_some() || i.children.values().any(|e| self.has_unsaved_within(e.ino)))
    }

    pub(super) fn apply_remote(&mut self, entry: &Entry, store: &ContentStore) -> FsResult<Applied> {
        self.apply_entry(entry, store, false)
    }

    /// Applies the manager's state of one path (see `Tree::apply_remote`). `decided`:
    /// the entry answers this node's own change, which was just decided and is the last
    /// one of the path; the node takes it even at a revision it already had (a refused or
    /// conflicting change leaves the path at the revision it was based on, and the node
    /// must drop what it had there), and so it takes a state deferred for a change below
    /// (`apply_deferred_above`).
    pub(super) fn apply_entry(&mut self, entry: &Entry, store: &ContentStore, decided: bool) -> FsResult<Applied> {
        let mut out = Applied::default();
        let path = &entry.path;
        // A newer state than one deferred here (or the same again) takes its place once
        // it is applied or deferred itself; one skipped (at a revision the node has)
        // leaves it.
        let replaces_deferred = self.deferred.get(path).is_some_and(|d| d.rev <= entry.rev);
        if entry.version.is_some() {
            self.drop_stale_deferred_above(entry);
        }
        let is_dir = entry.version.as_ref().map(|v| matches!(v.content, Content::Dir));
        // A path here of another kind than the entry's counts too; the tree is walked for
        // it only when some rule names the path (never when there are no rules).
        if self.ignore.is_ignored(path.as_str(), is_dir) || (self.ignore.is_ignored(path.as_str(), None) && self.resolve(path).is_some()) {
            // Ignored here: what this node has at the path is its own.
            tracing::debug!(target: "changes", path = %path, rev = entry.rev.0, "ignored here: the manager's state is not applied");
            return Ok(out);
        }
        self.touch_rules(path);
        if self.outbox.has(path) {
            return Ok(out);
        }
        // (The state a decision of this node's own change names is never stale.)
        if entry.version.is_some() && !decided {
            if let Some(anc) = self.gone_above_since(path, entry.rev) {
                tracing::debug!(target: "changes", path = %path, rev = entry.rev.0, above = %anc, "a state older than the delete of a directory above it: not applied");
                return Ok(out);
            }
        }
        let local = self.resolve(path);
        let local_version = local.as_ref().and_then(|(_, _, ino)| self.inodes.get(ino)).and_then(|i| if i.work.is_some() { None } else { i.version() });
        let local_dirty = self.is_dirty(path);
        if !local_dirty && local_version == entry.version && (local.is_some() || entry.version.is_none()) {
            if replaces_deferred {
                self.deferred.remove(path);
            }
            self.set_rev(path, entry.rev)?;
            return Ok(out);
        }
        let local_rev = self.revs.get(path).copied().unwrap_or_default();
        if (entry.rev <= local_rev && !decided) || entry.rev < local_rev || local_dirty {
            return Ok(out);
        }
        if !decided && self.send_later_lost_state(entry, local_rev, local_version.as_ref(), store)? {
            return Ok(out);
        }
        // (Nor is a state that is no directory, older than a live path below it taken here.)
        if let Some((_, _, ino)) = local.as_ref().filter(|_| !decided && !matches!(entry.version, Some(Version { content: Content::Dir, .. }))) {
            if let Some(below) = self.newer_live_below(*ino, path, entry.rev) {
                tracing::debug!(target: "changes", path = %path, rev = entry.rev.0, %below, "a state that is no directory, older than a live path below it taken here: not applied");
                return Ok(out);
            }
        }
        if replaces_deferred {
            self.deferred.remove(path);
        }
        // Below a moved directory's old name, every delete of its old paths goes first:
        // applied before them, an entry there would make the old directories again
        // (`ensure_dirs`) where the moved one's deletes are still to come.
        let outermost = self.outermost_old_name_above(path);
        if self.delete_old_paths_near(&outermost, false, false)? && self.outbox.has(path) {
            return Ok(out);
        }
        tracing::debug!(target: "changes", path = %path, rev = entry.rev.0, local_rev = local_rev.0, "applying the manager's state");
        match &entry.version {
            None => {
                if let Some((parent, name, _)) = local {
                    if self.has_local_change_below(path) {
                        // Something below has a local change: the manager will bring
                        // the directory back for it, so keep it. The delete is not
                        // taken as applied (its revision is not recorded): if the change
                        // below is kept elsewhere instead (as a conflict, below a
                        // conflict directory), the delete is applied once that change is
                        // decided (`apply_deferred_above`), and the next sync brings it
                        // again after a restart.
                        self.remove_below_except_pending(path, store, &mut out)?;
                        self.deferred.insert(path.clone(), entry.clone());
                        out.changed = true;
                        return Ok(out);
                    } else {
                        self.remove_subtree(parent, &name, store, &mut out)?;
                    }
                    out.changed = true;
                }
            }
            Some(v) => {
                if let Content::File { hash, .. } = &v.content {
                    if !store.has(hash) {
                        if self.residency.pinned(path.as_str()) {
                            out.missing_content = true;
                            return Ok(out);
                        }
                        out.remote = true;
                    }
                }
                let Some(parent) = self.ensure_dirs(path, &mut out)? else {
                    return Ok(out);
                };
                let name = OsString::from(path.name());
                if let Some((_, _, ino)) = local {
                    let i = self.inode(ino)?;
                    let same_kind_in_place = match (&i.kind, &v.content) {
                        (Kind::Dir, Content::Dir) => true,
                        (Kind::File, Content::File { hash, .. }) => i.hash.as_ref() == Some(hash),
                        _ => false,
                    };
                    if same_kind_in_place {
                        let now = self.env.now_ns();
                        let i = self.inode_mut(ino)?;
                        i.perm = v.mode & 0o7777;
                        i.uid = v.uid;
                        i.gid = v.gid;
                        if i.kind == Kind::File {
                            i.mtime = v.mtime_ns;
                        }
                        i.ctime = now;
                        self.save(ino)?;
                        out.invals.push(Inval::Inode { ino });
                        out.changed = true;
                        self.set_rev(path, entry.rev)?;
                        return Ok(out);
                    }
                    if self.has_local_change_below(path) {
                        // Not over the local change below: once it is decided (found
                        // by the simulator, seed 266439: a directory kept for a file
                        // then kept as a conflict stayed instead of the manager's file).
                        self.deferred.insert(path.clone(), entry.clone());
                        return Ok(out);
                    }
                    self.remove_subtree(parent, &name, store, &mut out)?;
                }
                self.create_from_version(parent, &name, v)?;
                out.invals.push(Inval::Entry { parent, name });
                out.changed = true;
            }
        }
        self.set_rev(path, entry.rev)?;
        Ok(out)
    }

    /// The mode and owners of `current`, the state the manager made of this node's change
    /// `sent` merged with ones set elsewhere (`rule::bytes_over_changed_metadata`: a
    /// chmod made there while this node wrote), taken by the path's inode while the file
    /// is still being written or has later changes queued (`apply_entry` leaves it
    /// alone then), if the inode still has the change's: its later changes carry them
    /// (the manager keeps them for those sent already:
    /// `rule::metadata_the_node_did_not_change`). The inode to invalidate, if taken.
    pub(super) fn take_merged_meta(&mut self, path: &RelPath, sent: &ChangeOp, current: &Entry) -> FsResult<Option<u64>> {
        let (ChangeOp::Put { version: sent }, Some(merged)) = (sent, &current.version) else { return Ok(None) };
        // (As an inode says them: the permission bits only.)
        let meta_of = |v: &Version| ModeAndOwners { mode: v.mode & 0o7777, ..ModeAndOwners::from(v) };
        let (sent_meta, merged_meta) = (meta_of(sent), meta_of(merged));
        let Some((_, _, ino)) = self.resolve(path).filter(|_| sent_meta != merged_meta) else { return Ok(None) };
        let i = self.inode(ino)?;
        let same_kind =
            matches!((&i.kind, &merged.content), (Kind::File, Content::File { .. }) | (Kind::Symlink, Content::Symlink { .. }) | (Kind::Dir, Content::Dir));
        if !same_kind || i.mode_and_owners() != sent_meta {
            return Ok(None);
        }
        tracing::debug!(target: "changes", %path, mode = merged_meta.mode, uid = merged_meta.uid, gid = merged_meta.gid, "the mode and owners the manager merged into this node's change taken");
        let now = self.env.now_ns();
        let i = self.inode_mut(ino)?;
        (i.perm, i.uid, i.gid, i.ctime) = (merged_meta.mode, merged_meta.uid, merged_meta.gid, now);
        self.save(ino)?;
        Ok(Some(ino))
    }

    /// The manager holds `entry`, a live path, so every ancestor of it was a directory
    /// there at its revision: a delete of one, or a file or a symlink put there, deferred
    /// here from before is stale (found by the simulator, seed 50926: the node's queue
    /// lost the directory the manager brought back for a put below it, and the deferred
    /// delete, applied once that put was decided, took the whole directory away, newer
    /// entries below it too; seed 88393: the same with another node's symlink from
    /// before the delete).
    fn drop_stale_deferred_above(&mut self, entry: &Entry) {
        if self.deferred.is_empty() {
            return;
        }
        let not_a_dir = |d: &Entry| !matches!(d.version, Some(Version { content: Content::Dir, .. }));
        for anc in entry.path.ancestors() {
            if self.deferred.get(&anc).is_some_and(|d| not_a_dir(d) && d.rev < entry.rev) {
                tracing::debug!(target: "changes", path = %anc, below = %entry.path, rev = entry.rev.0, "a deferred state that is no directory is older than a live path below it: dropped");
                self.deferred.remove(&anc);
            }
        }
    }

    /// The deferred states of `path`'s ancestors (innermost first) that nothing below has
    /// a local change against any more, applied now: a decision of this node's change of
    /// `path` just came.
    pub(super) fn apply_deferred_above(&mut self, path: &RelPath, store: &ContentStore, out: &mut Applied) -> FsResult<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        for anc in path.ancestors().into_iter().rev() {
            if !self.deferred.contains_key(&anc) || self.has_local_change_below(&anc) {
                continue;
            }
            let Some(entry) = self.deferred.remove(&anc) else { continue };
            tracing::debug!(target: "changes", path = %anc, rev = entry.rev.0, "applying the manager's state deferred for a local change below");
            // Taken even at a revision the node had: it passed that check when it was
            // deferred, and the revision may be the one the node's own change there was
            // based on (seed 13574: a directory the node had made, then replaced by a
            // file kept as a conflict, stayed a file).
            let applied = self.apply_entry(&entry, store, true)?;
            out.also.push((entry, applied));
        }
        Ok(())
    }

    /// Makes sure every ancestor of `path` is a directory here, creating missing ones
    /// (their own entries from the manager will set their metadata). Returns the parent.
    pub(super) fn ensure_dirs(&mut self, path: &RelPath, out: &mut Applied) -> FsResult<Option<u64>> {
        let mut dir = ROOT;
        for anc in path.ancestors() {
            let name = OsString::from(anc.name());
            match self.inode(dir)?.children.get(&name).copied() {
                Some(e) if e.kind == Kind::Dir => dir = e.ino,
                Some(_) => return Ok(None),
                None => {
                    let ino = self.next_ino;
                    self.next_ino += 1;
                    let mut d = Inode::new(ino, Kind::Dir, 0o755, 0, 0, self.env.now_ns());
                    d.links.push((dir, name.clone()));
                    self.add_inode(d);
                    self.link_into(dir, &name, ino)?;
                    self.save(ino)?;
                    out.invals.push(Inval::Entry { parent: dir, name });
                    dir = ino;
                }
            }
        }
        Ok(Some(dir))
    }

    pub(super) fn create_from_version(&mut self, parent: u64, name: &OsStr, v: &Version) -> FsResult<u64> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let kind = match v.content {
            Content::File { .. } => Kind::File,
            Content::Dir => Kind::Dir,
            Content::Symlink { .. } => Kind::Symlink,
        };
        let mut i = Inode::new(ino, kind, v.mode & 0o7777, v.uid, v.gid, self.env.now_ns());
        match &v.content {
            Content::File { hash, size } => {
                i.hash = Some(hash.clone());
                i.size = *size;
                i.mtime = v.mtime_ns;
            }
            Content::Symlink { target } => {
                i.target = Some(target.as_bytes().into());
                i.size = target.len() as u64;
            }
            Content::Dir => {}
        }
        i.links.push((parent, name.to_owned()));
        self.add_inode(i);
        self.link_into(parent, name, ino)?;
        self.save(ino)?;
        Ok(ino)
    }

    /// Removes an entry and everything below it (no deletes are sent: this is the
    /// manager's state arriving).
    pub(super) fn remove_subtree(&mut self, parent: u64, name: &OsStr, store: &ContentStore, out: &mut Applied) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        let children: Vec<OsString> = self.inode(ino)?.children.keys().cloned().collect();
        for c in children {
            self.remove_subtree(ino, &c, store, out)?;
        }
        self.remove_entry(parent, name, false, store)?;
        out.invals.push(Inval::Entry { parent, name: name.to_owned() });
        Ok(())
    }

    pub(super) fn remove_below_except_pending(&mut self, path: &RelPath, store: &ContentStore, out: &mut Applied) -> FsResult<()> {
        let Some((_, _, ino)) = self.resolve(path) else {
            return Ok(());
        };
        let children: Vec<OsString> = self.inode(ino)?.children.keys().cloned().collect();
        for c in children {
            let Some(cp) = c.to_str().and_then(|c| path.join(c).ok()) else {
                continue;
            };
            if self.has_local_change_below(&cp) {
                if self.inode(self.child(ino, &c)?)?.kind == Kind::Dir {
                    self.remove_below_except_pending(&cp, store, out)?;
                }
            } else {
                self.remove_subtree(ino, &c, store, out)?;
            }
        }
        Ok(())
    }
}
