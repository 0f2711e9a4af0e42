//! The tree state's own bookkeeping: inode access inside transactions, the undo log
//! that takes back a failed transaction, and the namespace (directory entries, links,
//! paths of inodes, removal of entries).

use super::*;

impl State {
    pub(super) fn inode(&self, ino: u64) -> FsResult<&Inode> {
        self.inodes.get(&ino).map(|i| &**i).ok_or(FsError::NotFound)
    }
    /// The inode, to change: inside a transaction its fields are saved first (`Undo`).
    pub(super) fn inode_mut(&mut self, ino: u64) -> FsResult<&mut Inode> {
        if let Some(j) = &mut self.journal {
            if let Some(i) = self.inodes.get(&ino) {
                if j.saved.insert(ino) {
                    j.undo.push(Undo::Inode(ino, Some(i.fields())));
                }
            }
        }
        self.inodes.get_mut(&ino).map(|i| &mut **i).ok_or(FsError::NotFound)
    }

    /// Makes `w` the work file of `ino` (`Inode::set_work`) and records that it is being
    /// written.
    pub(super) fn set_work(&mut self, ino: u64, w: Arc<File>, detached: bool) -> FsResult<()> {
        self.inode_mut(ino)?.set_work(w, detached);
        self.with_work.insert(ino);
        self.db.set_writing(ino, true)?;
        Ok(())
    }

    /// Adds an inode the transaction made.
    pub(super) fn add_inode(&mut self, i: Inode) {
        let ino = i.ino;
        if let Some(h) = &i.hash {
            self.note_taken(h);
        }
        if let Some(j) = &mut self.journal {
            j.saved.insert(ino);
            j.undo.push(Undo::Inode(ino, None));
        }
        self.inodes.insert(ino, Box::new(i));
    }

    /// Records how to undo a change, inside a transaction.
    pub(super) fn record(&mut self, u: impl FnOnce() -> Undo) {
        if let Some(j) = &mut self.journal {
            j.undo.push(u());
        }
    }

    pub(super) fn counters(&self) -> Counters {
        Counters {
            next_ino: self.next_ino,
            next_fh: self.next_fh,
            conflicts_seen: self.conflicts_seen,
            passthrough_opens: self.passthrough_opens,
            passthrough_detaches: self.passthrough_detaches,
        }
    }

    /// Undoes in memory what a failed transaction did (see `Undo`).
    pub(super) fn undo(&mut self, j: Journal, store: &ContentStore) {
        let detached = j.detached;
        let mut revs_undone = false;
        for u in j.undo.into_iter().rev() {
            match u {
                Undo::Inode(ino, None) => {
                    self.inodes.remove(&ino);
                    store.discard_work_file(ino);
                    self.overlays.remove(&ino);
                }
                Undo::Inode(ino, Some(mut before)) => {
                    // Its work file may have changed in the transaction, and is not
                    // changed back: a hash taken before is not good for it any more.
                    before.work_stamp = self.new_work_stamp();
                    match self.inodes.get_mut(&ino) {
                        Some(now) => {
                            if before.work.is_none() && detached.contains(&ino) {
                                // The backing file the transaction detached from the store
                                // stays this inode's work file: the kernel's readers read it,
                                // and it may have changed already. It is committed like any
                                // other (at the next close, or by `gc`).
                                let reopened =
                                    || store.detach_for_work(&before.passthrough.as_ref()?.backing, None, system_time(before.mtime), None).ok().map(Arc::new);
                                match now.work.clone().or_else(reopened) {
                                    Some(w) => {
                                        before.committed = Some(before.current());
                                        before.work = Some(w);
                                        before.detached = true;
                                    }
                                    None => tracing::error!(ino, "a passthrough backing file changed by a failed operation could not be reopened"),
                                }
                            } else if before.work.is_none() {
                                // A work file the transaction made goes, also one it
                                // committed and `Installed` gave back.
                                store.discard_work_file(ino);
                                self.overlays.remove(&ino);
                            }
                            let children = std::mem::take(&mut now.children);
                            **now = before;
                            now.children = children;
                        }
                        None => {
                            self.inodes.insert(ino, Box::new(before));
                        }
                    }
                    // (The sets of inodes that may have a work file or a blob handle
                    // are supersets: the restored inode goes back in.)
                    if let Some(i) = self.inodes.get(&ino) {
                        if i.work.is_some() {
                            self.with_work.insert(ino);
                        }
                        if i.blob.is_some() {
                            self.with_blob.insert(ino);
                        }
                    }
                }
                Undo::Child { parent, name, old } => {
                    if let Some(p) = self.inodes.get_mut(&parent) {
                        let now = match old {
                            Some(e) => p.children.insert(name, e),
                            None => p.children.remove(&name),
                        };
                        self.entry_counts.replaced(now.as_ref(), old.as_ref());
                    }
                }
                Undo::IgnoreRules(dir, old) => self.ignore.restore_dir(&dir, old),
                Undo::Move(u) => self.undo_move(u),
                Undo::Kept(hash, old) => {
                    match old {
                        Some(row) => self.kept.insert(hash, row),
                        None => self.kept.remove(&hash),
                    };
                }
                Undo::Rev(path, old) => {
                    match old {
                        Some(r) => self.revs.insert(path, r),
                        None => self.revs.remove(&path),
                    };
                    revs_undone = true;
                }
                Undo::Outbox(seq, old) => {
                    self.outbox.set(seq, old);
                }
                Undo::Sent(msg, was) => {
                    if was {
                        self.outbox.sent.insert(msg);
                    } else {
                        self.outbox.sent.remove(&msg);
                    }
                }
                Undo::Handle(fh, old) => {
                    match old {
                        Some(h) => self.handles.insert(fh, h),
                        None => self.handles.remove(&fh),
                    };
                }
                Undo::BackingOwner(key, old) => {
                    match old {
                        Some(ino) => self.backing_owner.insert(key, ino),
                        None => self.backing_owner.remove(&key),
                    };
                }
                Undo::Installed(ino, hash) => {
                    if let Err(e) = store.uncommit_work_file(ino, &hash) {
                        tracing::error!(ino, "giving back the work file committed as {hash}: {e}");
                    }
                }
                Undo::Overlay(ino, overlay) => {
                    self.overlays.insert(ino, overlay);
                }
            }
        }
        if revs_undone {
            // Rare (a failed transaction that took a revision): counted again.
            self.last_rev = last_revision_in(&self.revs, self.forgotten_max_rev);
        }
        let c = j.counters;
        self.next_ino = c.next_ino;
        self.next_fh = c.next_fh;
        self.conflicts_seen = c.conflicts_seen;
        self.passthrough_opens = c.passthrough_opens;
        self.passthrough_detaches = c.passthrough_detaches;
    }

    pub(super) fn set_child(&mut self, parent: u64, name: &OsStr, entry: Option<DirEntry>) -> FsResult<()> {
        let p = self.inode_mut(parent)?;
        let old = match entry {
            Some(e) => p.children.insert(name.to_owned(), e),
            None => p.children.remove(name),
        };
        self.entry_counts.replaced(old.as_ref(), entry.as_ref());
        self.record(|| Undo::Child { parent, name: name.to_owned(), old });
        Ok(())
    }

    pub(super) fn set_outbox_row(&mut self, seq: i64, row: Option<OutboxRow>) -> Option<OutboxRow> {
        if let Some(h) = row.as_ref().and_then(|r| sync::queued_content(&r.change.op)) {
            self.note_taken(h);
        }
        let old = self.outbox.set(seq, row);
        self.record(|| Undo::Outbox(seq, old.clone()));
        old
    }

    pub(super) fn set_backing_owner(&mut self, key: (u64, u64), owner: Option<u64>) {
        let old = match owner {
            Some(ino) => self.backing_owner.insert(key, ino),
            None => self.backing_owner.remove(&key),
        };
        self.record(|| Undo::BackingOwner(key, old));
    }
    pub(super) fn child(&self, parent: u64, name: &OsStr) -> FsResult<u64> {
        let p = self.inode(parent)?;
        if p.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if name.len() > wire::MAX_NAME_BYTES {
            return Err(FsError::NameTooLong);
        }
        p.children.get(name).map(|e| e.ino).ok_or(FsError::NotFound)
    }
    pub(super) fn save(&self, ino: u64) -> FsResult<()> {
        let i = self.inode(ino)?;
        if i.nlink > 0 {
            self.db.save_inode(&i.row())?;
        }
        Ok(())
    }
    pub(super) fn is_ancestor(&self, anc: u64, mut ino: u64) -> bool {
        while ino != ROOT {
            match self.inodes.get(&ino).and_then(|i| i.links.first()) {
                Some((p, _)) if *p == anc => return true,
                Some((p, _)) => ino = *p,
                None => return false,
            }
        }
        false
    }

    /// The synced path of entry `name` in directory `parent`, if every component is a
    /// valid path (non-UTF-8 names are refused at creation, so this is the normal case).
    pub(super) fn path_of(&self, parent: u64, name: &OsStr) -> Option<RelPath> {
        let mut parts: Vec<&OsStr> = vec![name];
        let mut len = name.len();
        let mut ino = parent;
        while ino != ROOT {
            let (p, n) = self.inodes.get(&ino)?.links.first()?;
            parts.push(n);
            len += n.len() + 1;
            // Deeper than a path may be (a tree nested without end by relative mkdirs):
            // no synced path, found without walking up the rest.
            if len > wire::MAX_PATH_BYTES {
                return None;
            }
            ino = *p;
        }
        let mut s = String::new();
        for part in parts.iter().rev() {
            if !s.is_empty() {
                s.push('/');
            }
            s.push_str(part.to_str()?);
        }
        RelPath::new(s).ok()
    }

    pub(super) fn resolve(&self, path: &RelPath) -> Option<(u64, OsString, u64)> {
        let mut dir = ROOT;
        let mut comps = path.as_str().split('/').peekable();
        while let Some(c) = comps.next() {
            let ino = self.inodes.get(&dir)?.children.get(OsStr::new(c))?.ino;
            if comps.peek().is_none() {
                return Some((dir, OsString::from(c), ino));
            }
            dir = ino;
        }
        None
    }

    pub(super) fn link_into(&mut self, parent: u64, name: &OsStr, ino: u64) -> FsResult<()> {
        let now = self.env.now_ns();
        let kind = self.inode(ino)?.kind;
        let is_dir = kind == Kind::Dir;
        self.set_child(parent, name, Some(DirEntry { ino, kind }))?;
        let p = self.inode_mut(parent)?;
        p.mtime = now;
        p.ctime = now;
        if is_dir {
            p.nlink += 1;
        }
        self.save(parent)?;
        self.db.save_dentry(parent, name, ino)?;
        Ok(())
    }

    pub(super) fn unlink_from(&mut self, parent: u64, name: &OsStr) -> FsResult<()> {
        let now = self.env.now_ns();
        let ino = self.child(parent, name)?;
        let is_dir = self.inode(ino)?.kind == Kind::Dir;
        self.set_child(parent, name, None)?;
        let p = self.inode_mut(parent)?;
        p.mtime = now;
        p.ctime = now;
        if is_dir {
            p.nlink = p.nlink.saturating_sub(1);
        }
        self.save(parent)?;
        self.db.delete_dentry(parent, name)?;
        Ok(())
    }

    /// Removes one directory entry (the caller checked emptiness); `send` records a delete.
    pub(super) fn remove_entry(&mut self, parent: u64, name: &OsStr, send: bool, store: &ContentStore) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        let path = self.path_of(parent, name);
        let before = self.inode(ino)?.made_on();
        self.unlink_from(parent, name)?;
        let now = self.env.now_ns();
        let i = self.inode_mut(ino)?;
        i.links.retain(|(p, n)| !(*p == parent && n == name));
        i.nlink = if i.kind == Kind::Dir { 0 } else { i.nlink.saturating_sub(1) };
        i.ctime = now;
        let (kind, gone) = (i.kind, i.nlink == 0);
        if gone {
            self.db.delete_inode(ino)?;
        } else {
            self.save(ino)?;
        }
        if send && kind.synced() {
            if let Some(path) = path {
                self.record_delete_from(path, before)?;
            }
        }
        self.maybe_drop(ino, store);
        Ok(())
    }

    /// Closes the read handles kept on the blobs of removed files that no handle has
    /// open (the kernel may not have forgotten them yet): nothing can read them again,
    /// and such a handle keeps a removed blob's space from coming back.
    pub(super) fn close_unreachable_blobs(&mut self) {
        self.drop_blob_handles(|i| i.nlink == 0 && i.open == 0);
    }

    /// Drops the read handle on its blob of every inode that has one and `drop` picks,
    /// through `with_blob` (which it prunes), not a walk of every inode.
    pub(super) fn drop_blob_handles(&mut self, drop: impl Fn(&Inode) -> bool) {
        let inodes = &mut self.inodes;
        self.with_blob.retain(|o| match inodes.get_mut(o) {
            Some(i) if i.blob.is_some() => {
                if drop(i) {
                    i.blob = None;
                }
                i.blob.is_some()
            }
            _ => false,
        });
    }

    /// Forgets an inode the kernel and every handle are done with.
    pub(super) fn maybe_drop(&mut self, ino: u64, store: &ContentStore) {
        if ino == ROOT {
            return;
        }
        let Some(i) = self.inodes.get(&ino) else {
            return;
        };
        if i.nlink != 0 || i.lookups != 0 || i.open != 0 {
            return;
        }
        let i = self.inodes.remove(&ino).expect("checked");
        if let Some(work) = &i.work {
            self.discard_work_file(ino, work, store);
        }
        if let Some(j) = &mut self.journal {
            j.saved.insert(ino);
            j.undo.push(Undo::Inode(ino, Some(*i)));
        }
    }

    /// Removes `work`, the work file of `ino`, from the disk (one in memory has nothing
    /// there to remove: it goes with its last descriptor, and asking the disk for its
    /// name was 2 % of a create's time); inside a transaction, once it is committed.
    pub(super) fn discard_work_file(&mut self, ino: u64, work: &File, store: &ContentStore) {
        let on_disk = !store.in_memory(work);
        match &mut self.journal {
            Some(j) => j.discard_after_commit.push((ino, on_disk)),
            None => {
                if on_disk {
                    store.discard_work_file(ino);
                }
                let _ = self.overlay_mut(ino);
            }
        }
    }

    /// (path, synced kind) of an entry and everything below it, outermost first.
    pub(super) fn subtree_paths(&self, parent: u64, name: &OsStr) -> Vec<(RelPath, bool)> {
        let mut out = Vec::new();
        let (Ok(ino), Some(path)) = (self.child(parent, name), self.path_of(parent, name)) else {
            return out;
        };
        let synced = self.inodes.get(&ino).map(|i| i.kind.synced()).unwrap_or(false);
        out.push((path.clone(), synced));
        self.subtree_paths_below(ino, &path, &mut out);
        out
    }

    fn subtree_paths_below(&self, dir: u64, path: &RelPath, out: &mut Vec<(RelPath, bool)>) {
        let Some(d) = self.inodes.get(&dir) else { return };
        for (name, e) in &d.children {
            let Some(p) = name.to_str().and_then(|n| path.join(n).ok()) else { continue };
            if e.kind == Kind::Dir {
                out.push((p.clone(), true));
                self.subtree_paths_below(e.ino, &p, out);
            } else {
                out.push((p, e.kind.synced()));
            }
        }
    }

    /// Every entry below directory `dir` as (path, parent, name, ino), outermost first;
    /// `path` is `dir`'s, if the caller has it. An entry without a path (a name that is
    /// not UTF-8 on the way) is left out, and so is everything below it.
    pub(super) fn collect_paths(&self, dir: u64, path: Option<&RelPath>, out: &mut Vec<(RelPath, u64, OsString, u64)>) {
        let looked_up;
        let path = match path {
            Some(p) => Some(p),
            None if dir == ROOT => None,
            None => {
                let Some((parent, name)) = self.inodes.get(&dir).and_then(|d| d.links.first()) else { return };
                let Some(p) = self.path_of(*parent, name) else { return };
                looked_up = p;
                Some(&looked_up)
            }
        };
        self.collect_paths_below(dir, path, out);
    }

    /// `collect_paths` with `dir`'s path known (`None`: the root): each path is its
    /// parent's and a name, not walked up to the root again.
    fn collect_paths_below(&self, dir: u64, path: Option<&RelPath>, out: &mut Vec<(RelPath, u64, OsString, u64)>) {
        let Some(d) = self.inodes.get(&dir) else {
            return;
        };
        for (name, e) in &d.children {
            let Some(name_str) = name.to_str() else { continue };
            let Ok(p) = (match path {
                Some(dir_path) => dir_path.join(name_str),
                None => RelPath::new(name_str),
            }) else {
                continue;
            };
            out.push((p, dir, name.clone(), e.ino));
            if e.kind == Kind::Dir {
                let p = out.last().map(|(p, ..)| p.clone());
                self.collect_paths_below(e.ino, p.as_ref(), out);
            }
        }
    }
}
