//! Files being made and written: new inodes, open handles, the choice between
//! cached and passthrough I/O, work files, and committing a work file into the store.

use super::*;

impl State {
    /// Makes an inode of `kind` named `name` in `parent`; a file gets an empty work
    /// file (it is sent when closed, with its content). Returns its number.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn make(
        &mut self,
        parent: u64,
        name: &OsStr,
        kind: Kind,
        perm: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        target: Option<Vec<u8>>,
        store: &ContentStore,
    ) -> FsResult<u64> {
        let p = self.inode(parent)?;
        if p.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if p.children.contains_key(name) {
            return Err(FsError::Exists);
        }
        // BSD group semantics for set-gid directories, as ext4 does.
        let (gid, perm) = if p.perm & libc::S_ISGID != 0 { (p.gid, if kind == Kind::Dir { perm | libc::S_ISGID } else { perm }) } else { (gid, perm) };
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut i = Inode::new(ino, kind, perm & 0o7777, uid, gid, self.env.now_ns());
        i.rdev = rdev;
        if kind == Kind::Symlink {
            i.size = target.as_ref().map(|t| t.len() as u64).unwrap_or(0);
            i.target = target.map(Vec::into_boxed_slice);
            i.perm = 0o777;
        }
        if kind == Kind::File {
            i.hash = Some(ContentStore::empty_hash());
        }
        i.lookups = 1;
        i.born_here = true;
        i.links.push((parent, name.to_owned()));
        self.add_inode(i);
        self.link_into(parent, name, ino)?;
        self.save(ino)?;
        if kind == Kind::File {
            let w = Arc::new(store.new_work_file(ino, None)?);
            self.set_work(ino, w, false)?;
        } else if kind.synced() {
            self.record_put(parent, name, ino)?;
        }
        Ok(ino)
    }

    /// Opens a handle on `ino` (see `Tree::open_handle`).
    pub(super) fn open_handle(&mut self, ino: u64, write: bool, truncate: bool, passthrough: bool, store: &ContentStore) -> FsResult<(u64, OpenIo)> {
        let io = self.choose_io(ino, write, passthrough, store)?;
        let pt = matches!(io, OpenIo::Passthrough { .. });
        // A failure undoes the passthrough set-up with the rest of the transaction.
        self.prepare_write_open(ino, write, truncate, pt, store)?;
        let i = self.inode_mut(ino)?;
        i.open += 1;
        if write {
            i.writers += 1;
        }
        self.note_in_use(ino);
        self.note_used(ino);
        if pt {
            self.passthrough_opens += 1;
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { ino, write, passthrough: pt });
        self.record(|| Undo::Handle(fh, None));
        Ok((fh, io))
    }

    /// Notes that `ino`'s content is used now (an open, a close): when each content was
    /// last used matters to the cache of on-demand files, and to whether a large one is
    /// left alone (`Tree::keep_at_rest`).
    pub(super) fn note_used(&mut self, ino: u64) {
        let now = self.env.now_ns();
        let track_all = self.residency.in_use();
        let Some(i) = self.inodes.get(&ino) else { return };
        if let Some(h) = i.hash.clone().filter(|_| track_all || i.size >= crate::store::AT_REST_MIN_BYTES) {
            self.last_used.insert(h, now);
        }
    }

    /// The content whose backing file the next change of `ino` detaches (passthrough
    /// readers share it, and no work file was made yet): see `ensure_work`.
    pub(super) fn content_to_detach(&self, ino: u64) -> Option<ContentHash> {
        let i = self.inode(ino).ok()?;
        i.hash.clone().filter(|_| i.passthrough.is_some() && i.work.is_none())
    }

    /// How the kernel is to do I/O on a new handle of `ino` (see `Passthrough`).
    pub(super) fn choose_io(&mut self, ino: u64, write: bool, passthrough: bool, store: &ContentStore) -> FsResult<OpenIo> {
        let i = self.inode_mut(ino)?;
        if let Some(pt) = &mut i.passthrough {
            pt.handles += 1;
            return Ok(OpenIo::Passthrough { register: None });
        }
        let committed = i.kind == Kind::File && i.work.is_none() && i.open == 0;
        // A small content has no file to pass through to (it is a row, `small.rs`).
        let Some(hash) = i.hash.clone().filter(|_| passthrough && !write && committed && i.size > store.small_max()) else {
            return Ok(OpenIo::Cached);
        };
        // A patched content is no one file to pass through to until it is written out
        // (an older version at rest is written out now: a program reads it).
        if store.is_patched(&hash) {
            store.write_out_for_reads(&hash);
            return Ok(OpenIo::Cached);
        }
        // (Made a patch since the look above, it is read as one: never written out here,
        // under the tree's lock.)
        let backing = match File::open(store.blob_path(&hash)) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && store.is_patched(&hash) => {
                store.write_out_for_reads(&hash);
                return Ok(OpenIo::Cached);
            }
            Err(e) => return Err(FsError::Io(anyhow::Error::new(e).context(format!("opening blob {hash}")))),
        };
        let key = {
            use std::os::unix::fs::MetadataExt;
            let m = backing.metadata()?;
            (m.dev(), m.ino())
        };
        if self.backing_owner.contains_key(&key) {
            // Another inode with the same content passes through to this blob.
            return Ok(OpenIo::Cached);
        }
        self.set_backing_owner(key, Some(ino));
        self.inode_mut(ino)?.passthrough = Some(Box::new(Passthrough { backing: backing.clone(), key, handles: 1 }));
        Ok(OpenIo::Passthrough { register: Some(backing) })
    }

    /// What opening `ino` for writing does before the first write: a passthrough
    /// writer detaches the backing file now (its writes will not pass here), and
    /// O_TRUNC empties the file.
    pub(super) fn prepare_write_open(&mut self, ino: u64, write: bool, truncate: bool, passthrough: bool, store: &ContentStore) -> FsResult<()> {
        if !write {
            return Ok(());
        }
        if passthrough {
            self.ensure_work(ino, true, store)?;
        }
        let i = self.inode(ino)?;
        if truncate && (i.size != 0 || i.work.is_none()) {
            let w = self.ensure_work(ino, false, store)?;
            self.set_work_len(ino, &w, 0)?;
            let now = self.env.now_ns();
            let i = self.inode_mut(ino)?;
            i.size = 0;
            i.mtime = now;
            i.ctime = i.mtime;
            i.give_mtime_to_work()?;
        }
        Ok(())
    }

    /// An open with O_TRUNC by `caller_uid` emptied `ino`: the set-id bits go as for any
    /// truncation (`SetAttr::kills_set_id`); the writer's close records the new mode.
    pub(super) fn truncated_by(&mut self, ino: u64, caller_uid: u32) -> FsResult<()> {
        let truncation = SetAttr { size: Some(0), ..Default::default() };
        if truncation.kills_set_id(caller_uid) {
            let i = self.inode_mut(ino)?;
            i.perm = without_set_id(i.perm);
        }
        Ok(())
    }

    /// One passthrough handle of `ino` closed; true when it was the last one.
    pub(super) fn end_passthrough_handle(&mut self, ino: u64) -> bool {
        if self.inodes.get(&ino).is_none_or(|i| i.passthrough.is_none()) {
            return false;
        }
        let Ok(i) = self.inode_mut(ino) else {
            return false;
        };
        let Some(pt) = &mut i.passthrough else {
            return false;
        };
        pt.handles = pt.handles.saturating_sub(1);
        if pt.handles > 0 {
            return false;
        }
        let key = pt.key;
        i.passthrough = None;
        self.set_backing_owner(key, None);
        true
    }

    /// The inode's work file, made if there is none: a copy of the blob (or empty when
    /// `keep_content` is false), or, under passthrough, the backing file detached from
    /// the store.
    pub(super) fn ensure_work(&mut self, ino: u64, keep_content: bool, store: &ContentStore) -> FsResult<Arc<File>> {
        // The caller is about to change the work file's bytes.
        let stamp = self.new_work_stamp();
        let i = self.inode_mut(ino)?;
        i.work_stamp = stamp;
        if let Some(w) = &i.work {
            return Ok(w.clone());
        }
        let detached = i.passthrough.is_some();
        let hash = i.hash.clone();
        // A copy made ahead, outside the lock, of the content a detach keeps.
        let ahead = self.copy_ahead.take().filter(|CopyAhead(h, _)| detached && Some(h) == hash.as_ref()).map(|CopyAhead(_, copy)| copy);
        let i = self.inode_mut(ino)?;
        let w = match &i.passthrough {
            Some(pt) => {
                let key = pt.key;
                let w = store.detach_for_work(&pt.backing, hash.as_ref(), system_time(i.mtime), ahead)?;
                self.passthrough_detaches += 1;
                if let Some(j) = &mut self.journal {
                    j.detached.insert(ino);
                }
                // Inodes with the same content, or a patch over it, may read through a
                // handle on the file that is now this inode's: they reopen the store's.
                self.drop_blob_handles(|other| (other.hash.is_some() && other.hash == hash) || other.blob.as_ref().is_some_and(|b| b.uses_file(key)));
                self.reopen_overlay_bases(key, store)?;
                w
            }
            None => {
                let hash = i.hash.clone().filter(|_| keep_content);
                // A large file is written in place over its content (`overlay.rs`).
                let over = match &hash {
                    Some(h) => self.start_overlay(ino, h, store)?,
                    None => None,
                };
                match over {
                    Some(w) => {
                        self.set_work(ino, w.clone(), false)?;
                        return Ok(w);
                    }
                    None => store.new_work_file(ino, hash.as_ref())?,
                }
            }
        };
        let w = Arc::new(w);
        self.set_work(ino, w.clone(), detached)?;
        Ok(w)
    }

    /// The work file of `ino` (`ensure_work`) for bytes up to `end`: one in memory that
    /// would grow past `SMALL_MAX` moves to the disk first.
    pub(super) fn work_up_to(&mut self, ino: u64, end: u64, store: &ContentStore) -> FsResult<Arc<File>> {
        let w = self.ensure_work(ino, true, store)?;
        if end <= store.small_max() || !store.in_memory(&w) {
            return Ok(w);
        }
        let disk = Arc::new(store.spill_work(ino, &w)?);
        let i = self.inode_mut(ino)?;
        i.work = Some(disk.clone());
        Ok(disk)
    }

    /// The work file of `ino` to hash outside the tree lock before a commit, with its
    /// stamp. A passthrough work file (the kernel writes it without passing here) is
    /// committed from a snapshot: one taken outside the lock while another passthrough
    /// writer writes is as good as one taken under it, which does not stop that writer
    /// either; a writer who opened since makes it stale (a new stamp).
    pub(super) fn work_to_hash(&mut self, ino: u64) -> Option<WorkToHash> {
        let i = self.inode(ino).ok()?;
        let work = i.work.clone()?;
        let (stamp, detached) = (i.work_stamp, i.detached);
        Some(WorkToHash { work, stamp, detached, overlay: self.overlay_view(ino) })
    }

    /// Forgets the uncommitted work file of `ino` and takes the committed version's size
    /// and mtime back (what the database holds for a file being written: `Inode::row`),
    /// if no writer has it and it is not a detached passthrough file (its readers read
    /// those bytes: they stay, and `gc` commits them). The committed content is still in
    /// the store. In memory only: the file's record of being written stays until its
    /// next commit (a restart sends its committed version again: harmless).
    pub(super) fn forget_uncommitted(&mut self, ino: u64, store: &ContentStore) {
        let Some(i) = self.inodes.get_mut(&ino).filter(|i| i.writers == 0 && !i.detached) else {
            return;
        };
        let Some(work) = i.work.take() else {
            return;
        };
        if let Some(c) = i.committed.take() {
            (i.size, i.mtime) = (c.size, c.mtime);
        }
        self.with_work.remove(&ino);
        self.discard_work_file(ino, &work, store);
    }

    pub(super) fn new_work_stamp(&mut self) -> u64 {
        self.last_work_stamp += 1;
        self.last_work_stamp
    }

    /// Hashes and stores the work file of `ino` and records a put for each of its names.
    /// `prehashed` is its hash taken outside the tree lock ([`Prehashed`]), used if the
    /// file did not change since.
    pub(super) fn commit_work(&mut self, ino: u64, store: &ContentStore, prehashed: Option<&Prehashed>) -> FsResult<()> {
        let i = self.inode_mut(ino)?;
        let Some(work) = i.work.take() else {
            return Ok(());
        };
        let replaced = i.made_on();
        // A snapshot of a detached work file, as one of any work file, is good while
        // nothing changed the file's stamp: any new writer's open does (`ensure_work`).
        let prehashed = prehashed.filter(|p| p.stamp == i.work_stamp && Arc::ptr_eq(&p.work, &work) && p.snapshot.is_some() == i.detached);
        i.blob = None;
        // Passthrough writes went past the kernel's pages: they are not the new content's.
        if i.detached {
            i.kernel_pages = false;
        }
        let (hash, size) = if i.detached {
            // The work file is the kernel's backing file: it stays, and while a writer
            // is still open the file stays dirty (its writes do not pass here).
            i.work = Some(work.clone());
            i.take_passthrough_writes()?;
            let committed = match prehashed.and_then(|p| Some((p.snapshot.as_ref()?, &p.hashed))) {
                Some((copy, hashed)) => store.install_snapshot(copy, hashed)?,
                None => store.commit_snapshot(&work)?,
            };
            let i = self.inode_mut(ino)?;
            if i.writers == 0 {
                i.work = None;
                i.detached = false;
            }
            committed
        } else {
            let c = if self.overlays.get(&ino).is_some_and(|o| o.describes(&work)) {
                let prehashed = prehashed.and_then(|p| Some((p.hashed.clone(), p.from_patch.clone()?)));
                self.commit_overlay(ino, &work, store, prehashed)?
            } else {
                match prehashed {
                    Some(p) => store.install_work_file(ino, &work, p.hashed.clone())?,
                    None => store.commit_work_file(ino, &work)?,
                }
            };
            if c.moved {
                self.record(|| Undo::Installed(ino, c.hash.clone()));
            } else {
                self.discard_work_file(ino, &work, store);
            }
            (c.hash, c.size)
        };
        if self.inode(ino)?.work.is_none() {
            self.db.set_writing(ino, false)?;
        }
        self.note_taken(&hash);
        let i = self.inode_mut(ino)?;
        i.hash = Some(hash);
        i.size = size;
        // Made on the content it replaces, and the mode and owners the file had when it
        // began to be written: those before its first setattr since, or else those it
        // has.
        let meta_base = i.committed.as_mut().and_then(|c| c.meta_base.take());
        let made_on = replaced.map(|r| MadeOn { meta: meta_base.unwrap_or(r.meta), ..r });
        // A passthrough writer still open keeps writing: what was just committed is
        // the version a crash would come back to.
        i.committed = i.work.is_some().then(|| i.current());
        if i.work.is_none() {
            self.with_work.remove(&ino);
        }
        let i = self.inode(ino)?;
        if i.nlink == 0 {
            return Ok(());
        }
        self.save(ino)?;
        self.record_put_all_links_from(ino, made_on)
    }
}
