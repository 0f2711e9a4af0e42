//! The FUSE operations on the tree: lookup, attributes, making and removing entries,
//! renames, links, opening, reading, writing and closing files, directory listings.

use super::*;

impl Tree {
    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let mut st = self.lock();
        let ino = st.child(parent, name)?;
        let i = st.inode_mut(ino)?;
        i.lookups += 1;
        Ok(i.attr())
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let mut st = self.lock();
        if let Some(i) = st.inodes.get_mut(&ino) {
            i.lookups = i.lookups.saturating_sub(n);
        }
        st.maybe_drop(ino, &self.store);
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let mut st = self.lock();
        let i = st.inode_mut(ino)?;
        i.take_passthrough_writes()?;
        Ok(i.attr())
    }

    pub fn setattr(&self, ino: u64, req_uid: u32, a: SetAttr) -> FsResult<Attr> {
        match a.size {
            Some(size) if size > crate::store::MAX_FILE_SIZE => Err(FsError::TooBig),
            Some(size) if self.truncation_commits_large(ino, size) => self.truncate_hashing_outside_lock(ino, req_uid, a),
            _ => Ok(self.set_attributes(ino, req_uid, a, CommitNow::Yes)?.0),
        }
    }

    /// Whether a truncation of `ino` to `size` bytes with no descriptor open for writing
    /// (truncate(2)) commits a large file, whose hash (through an overlay: of the blocks
    /// the truncation changed and those past the old end) takes long: see
    /// `truncate_hashing_outside_lock`.
    pub fn truncation_commits_large(&self, ino: u64, size: u64) -> bool {
        size > self.store.small_max() && self.lock().inode(ino).is_ok_and(|i| i.kind == Kind::File && i.writers == 0 && i.nlink > 0)
    }

    /// truncate(2) of a large file: truncated in one transaction, left uncommitted (as
    /// a writer's file is until its close), hashed outside the tree lock, and committed
    /// with that hash in another transaction, as a close is (`flush`). A writer who
    /// opened the file meanwhile commits it at its own close instead. Should the commit
    /// fail, the truncation is undone, as the one transaction it was once would have
    /// been (`State::forget_uncommitted`), and the caller gets the error.
    fn truncate_hashing_outside_lock(&self, ino: u64, req_uid: u32, a: SetAttr) -> FsResult<Attr> {
        let (_, stamp, before) = self.set_attributes(ino, req_uid, a, CommitNow::No)?;
        let prehashed = self.hash_outside_lock(|st| st.work_to_hash(ino));
        self.atomically_or_undo(
            |st, store| {
                // Its put (now, or at the close of a writer come meanwhile) says what the
                // setattr was made on, marked in this transaction: should it fail, the
                // truncation is forgotten with the mark.
                if let Some(c) = st.inode_mut(ino)?.committed.as_mut() {
                    c.meta_base.get_or_insert(before);
                }
                let i = st.inode(ino)?;
                // (written since by a writer come meanwhile: that writer's to commit)
                if i.work_stamp == stamp && i.writers == 0 && i.nlink > 0 && i.work.is_some() {
                    st.commit_work(ino, store, prehashed.as_ref())?;
                }
                Ok(st.inode(ino)?.attr())
            },
            |st, store| st.forget_uncommitted(ino, store),
        )
    }

    /// `setattr`: every change of the attributes in one transaction; with no writer, a
    /// truncation is committed in it unless `commit` says not yet. Also returns the work
    /// file's stamp once it ended, and the mode and owners it found.
    fn set_attributes(&self, ino: u64, req_uid: u32, a: SetAttr, commit: CommitNow) -> FsResult<(Attr, u64, ModeAndOwners)> {
        let change = |st: &mut State, store: &ContentStore| {
            let now = st.env.now_ns();
            let i = st.inode_mut(ino)?;
            let (before, meta_before) = (i.made_on(), i.mode_and_owners());
            // Start from what passthrough writes made of the file, not from older values.
            i.take_passthrough_writes()?;
            if let Some(mode) = a.mode {
                i.perm = mode & 0o7777;
            }
            if let Some(u) = a.uid {
                i.uid = u;
            }
            if let Some(g) = a.gid {
                i.gid = g;
            }
            if i.kind != Kind::Dir && a.kills_set_id(req_uid) {
                i.perm = without_set_id(i.perm);
            }
            if let Some(size) = a.size {
                match i.kind {
                    Kind::File => {}
                    Kind::Dir => return Err(FsError::IsDir),
                    _ => return Err(FsError::Invalid),
                }
                let work = if size == 0 { st.ensure_work(ino, false, store)? } else { st.work_up_to(ino, size, store)? };
                st.set_work_len(ino, &work, size)?;
                let i = st.inode_mut(ino)?;
                i.size = size;
                i.mtime = now;
            }
            let i = st.inode_mut(ino)?;
            if let Some(t) = a.atime {
                i.atime = match t {
                    SetTime::Now => now,
                    SetTime::At(t) => t,
                };
            }
            if let Some(t) = a.mtime {
                i.mtime = match t {
                    SetTime::Now => now,
                    SetTime::At(t) => t,
                };
            }
            i.ctime = now;
            i.give_mtime_to_work()?;
            let (writers, dirty) = (i.writers, i.work.is_some());
            // The put of a file being written says what its setattrs were made on. (A
            // large truncation by name, committed in a transaction of its own, is marked
            // in that one: should it fail, the truncation is forgotten, and the mark
            // would outlive it.)
            if writers > 0 || commit == CommitNow::Yes {
                // (Also on an inode born here: whether its put says it is known at the
                // commit, when the inode may have taken a state from the manager.)
                if let Some(c) = i.committed.as_mut() {
                    c.meta_base.get_or_insert(meta_before);
                }
            }
            if dirty && writers == 0 && commit == CommitNow::Yes {
                // truncate(2) with no descriptor open: committed at once.
                st.commit_work(ino, store, None)?;
            } else if dirty {
                // Sent with the content when the writer closes the file (or when the
                // caller commits it).
                st.save(ino)?;
            } else {
                st.save(ino)?;
                st.record_put_all_links_from(ino, before)?;
            }
            let i = st.inode(ino)?;
            Ok((i.attr(), i.work_stamp, meta_before))
        };
        match a.size {
            Some(size) => self.atomically_with_copy(self.ready_for_change(ino, size > 0), change),
            None => self.atomically(change),
        }
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = self.lock();
        let i = st.inode(ino)?;
        i.target.as_deref().map(<[u8]>::to_vec).ok_or(FsError::Invalid)
    }

    /// mkdir, mknod and symlink share this.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn make(&self, parent: u64, name: &OsStr, kind: Kind, perm: u32, uid: u32, gid: u32, rdev: u32, target: Option<Vec<u8>>) -> FsResult<Attr> {
        check_name(name)?;
        self.atomically(|st, store| {
            let ino = st.make(parent, name, kind, perm, uid, gid, rdev, target.clone(), store)?;
            if kind == Kind::File {
                // mknod(S_IFREG) makes an empty file with no open handle: committed now.
                st.commit_work(ino, store, None)?;
            }
            Ok(st.inode(ino)?.attr())
        })
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        self.make(parent, name, Kind::Dir, mode, uid, gid, 0, None)
    }

    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u32, uid: u32, gid: u32) -> FsResult<Attr> {
        let kind = Kind::from_mode(mode)?;
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(FsError::Invalid);
        }
        self.make(parent, name, kind, mode, uid, gid, rdev, None)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &[u8], uid: u32, gid: u32) -> FsResult<Attr> {
        if target.len() > wire::MAX_PATH_BYTES {
            return Err(FsError::NameTooLong);
        }
        self.make(parent, name, Kind::Symlink, 0o777, uid, gid, 0, Some(target.to_vec()))
    }

    /// Creates and opens file `name` (`open` with `O_CREAT`).
    pub fn create(&self, parent: u64, name: &OsStr, mode: u32, uid: u32, gid: u32, open: CreateOpen) -> FsResult<(Attr, u64)> {
        check_name(name)?;
        // One step: a file with no writer and uncommitted content is one whose commit
        // failed (`gc` tries again), never one being created.
        self.atomically(|st, store| {
            // The kernel looked the name up and found nothing, but a change from another
            // node may have put a file there since. Without O_EXCL, opening an existing
            // file is what `open(O_CREAT)` does on a local disk: do that, not EEXIST.
            if let (false, Ok(ino)) = (open.exclusive, st.child(parent, name)) {
                let i = st.inode(ino)?;
                if i.kind != Kind::File {
                    return Err(FsError::Exists);
                }
                // The kernel checked the directory, not this file: check it here.
                if !may_open(i.perm, i.uid, i.gid, uid, gid, open.write) {
                    return Err(FsError::AccessDenied);
                }
                let (fh, _) = st.open_handle(ino, open.write, open.truncate, false, store)?;
                if open.truncate {
                    st.truncated_by(ino, uid)?;
                }
                // The kernel takes the answer as a new lookup of the inode.
                st.inode_mut(ino)?.lookups += 1;
                return Ok((st.inode(ino)?.attr(), fh));
            }
            let write = open.write;
            let ino = st.make(parent, name, Kind::File, mode, uid, gid, 0, None, store)?;
            // A new inode has no blob to pass through to.
            let (fh, _) = st.open_handle(ino, write, false, false, store)?;
            Ok((st.inode(ino)?.attr(), fh))
        })
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.atomically(|st, store| {
            let ino = st.child(parent, name)?;
            if st.inode(ino)?.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            st.remove_entry(parent, name, true, store)
        })
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> FsResult<()> {
        self.atomically(|st, store| {
            let ino = st.child(parent, name)?;
            let i = st.inode(ino)?;
            if i.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if !i.children.is_empty() {
                return Err(FsError::NotEmpty);
            }
            st.remove_entry(parent, name, true, store)
        })
    }

    pub fn rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, noreplace: bool) -> FsResult<()> {
        check_name(newname)?;
        let moved_in_parts = self.atomically(|st, store| {
            let ino = st.child(parent, name)?;
            if st.inode(newparent)?.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            let moving_dir = st.inode(ino)?.kind == Kind::Dir;
            if moving_dir && (newparent == ino || st.is_ancestor(ino, newparent)) {
                return Err(FsError::Invalid);
            }
            if let Some(target) = st.inode(newparent)?.children.get(newname).map(|e| e.ino) {
                if target == ino {
                    return Ok(false);
                }
                if noreplace {
                    return Err(FsError::Exists);
                }
                let t = st.inode(target)?;
                match (moving_dir, t.kind == Kind::Dir) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) if !t.children.is_empty() => return Err(FsError::NotEmpty),
                    _ => {}
                }
                // The replaced entry is overwritten, not deleted: its path gets a put.
                st.remove_entry(newparent, newname, false, store)?;
            }
            // Old paths are deleted (deepest first) after the new ones are put (outermost
            // first), so the manager never sees a child without its parent. Below a large
            // directory, both are queued in parts after this transaction (`moves.rs`).
            let old_paths = st.subtree_paths(parent, name);
            let from = st.path_of(parent, name);
            let in_parts = moving_dir && st.move_in_parts(ino, from.as_ref(), st.move_in_one_hold);
            st.unlink_from(parent, name)?;
            st.link_into(newparent, newname, ino)?;
            {
                let now = st.env.now_ns();
                let i = st.inode_mut(ino)?;
                i.links.retain(|(p, n)| !(*p == parent && n == name));
                i.links.push((newparent, newname.to_owned()));
                i.ctime = now;
            }
            st.save(ino)?;
            if let (true, Some(from)) = (in_parts, from) {
                st.record_put(newparent, newname, ino)?;
                let synced = old_paths.into_iter().filter(|(_, kind_synced)| *kind_synced).map(|(p, _)| p).collect();
                st.start_move(from, ino, synced)?;
                return Ok(true);
            }
            st.record_put_subtree(newparent, newname)?;
            for (path, kind_synced) in old_paths.into_iter().rev() {
                if kind_synced {
                    st.record_delete(path)?;
                }
            }
            Ok(false)
        })?;
        if moved_in_parts {
            self.moves_ready.notify_one();
        }
        Ok(())
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> FsResult<Attr> {
        check_name(newname)?;
        self.atomically(|st, _| {
            let i = st.inode(ino)?;
            if i.kind == Kind::Dir {
                return Err(FsError::NotPermitted);
            }
            if i.nlink >= 65000 {
                return Err(FsError::TooManyLinks);
            }
            if st.inode(newparent)?.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if st.inode(newparent)?.children.contains_key(newname) {
                return Err(FsError::Exists);
            }
            st.link_into(newparent, newname, ino)?;
            let now = st.env.now_ns();
            let i = st.inode_mut(ino)?;
            i.links.push((newparent, newname.to_owned()));
            i.nlink += 1;
            i.ctime = now;
            i.lookups += 1;
            let kind = i.kind;
            st.note_in_use(ino);
            st.save(ino)?;
            if kind.synced() {
                st.put_at_new_path(newparent, newname, ino)?;
            }
            Ok(st.inode(ino)?.attr())
        })
    }

    pub fn open(&self, ino: u64, write: bool, truncate: bool, passthrough: bool) -> FsResult<(u64, OpenIo)> {
        let ahead = if write { self.ready_for_change(ino, !truncate) } else { None };
        self.open_after_copy(ino, write, truncate, passthrough, ahead, 0)
    }

    /// `open`, with what `ready_for_change` made for an open for writing (a
    /// caller that holds a lock of its own while it opens takes that copy first);
    /// `passthrough` says whether the kernel can do passthrough I/O, `caller_uid` who
    /// opens (`open` is root's).
    pub fn open_after_copy(
        &self,
        ino: u64,
        write: bool,
        truncate: bool,
        passthrough: bool,
        ahead: Option<CopyAhead>,
        caller_uid: u32,
    ) -> FsResult<(u64, OpenIo)> {
        let kind = self.lock().inode(ino)?.kind;
        match kind {
            Kind::Dir if write => return Err(FsError::IsDir),
            Kind::File | Kind::Dir => {}
            _ => return Err(FsError::NotSupported),
        }
        self.atomically_with_copy(ahead, |st, store| {
            let opened = st.open_handle(ino, write, truncate, passthrough, store)?;
            if truncate {
                st.truncated_by(ino, caller_uid)?;
            }
            Ok(opened)
        })
    }

    /// Whether the kernel may keep its pages of `ino` at a cached open just made (see
    /// `Inode::kernel_pages`). Otherwise it drops them, and holds only what it reads
    /// from now on: that is recorded.
    pub fn keep_pages_at_open(&self, ino: u64) -> bool {
        let mut st = self.lock();
        let Ok(i) = st.inode_mut(ino) else {
            return false;
        };
        let keep = i.kernel_pages && i.kind == Kind::File && i.work.is_none() && i.passthrough.is_none() && i.size >= KEEP_PAGES_MIN;
        i.kernel_pages = i.passthrough.is_none();
        keep
    }

    /// The kernel would not take the backing file `open` offered for handle `fh` (no
    /// passthrough support after all): the handle becomes a cached one.
    pub fn passthrough_refused(&self, fh: u64) {
        let mut st = self.lock();
        let Some(h) = st.handles.get_mut(&fh) else {
            return;
        };
        if !std::mem::replace(&mut h.passthrough, false) {
            return;
        }
        let ino = h.ino;
        st.passthrough_opens = st.passthrough_opens.saturating_sub(1);
        st.end_passthrough_handle(ino);
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file = {
            let mut st = self.lock();
            let ino = st.handles.get(&fh).ok_or(FsError::BadHandle)?.ino;
            let now = st.env.now_ns();
            if let Some(read) = st.read_overlay(ino, offset, size) {
                return read;
            }
            let i = st.inode_mut(ino)?;
            i.atime = now;
            match (&i.work, &i.blob) {
                (Some(w), _) => Err(w.clone()),
                (None, Some(b)) => Ok(b.clone()),
                (None, None) => {
                    let h = i.hash.clone().ok_or(FsError::Invalid)?;
                    let opening = |e: std::io::Error| FsError::Io(anyhow::Error::new(e).context(format!("opening content {h}")));
                    // A small content is read from its row each time: no handle (and no
                    // copy in memory) is kept for each small file ever read.
                    if let Some(bytes) = self.store.small_bytes(&h).map_err(opening)? {
                        let from = (offset as usize).min(bytes.len());
                        let to = (from + size as usize).min(bytes.len());
                        return Ok(bytes[from..to].to_vec());
                    }
                    let b = Arc::new(self.store.open_content(&h).map_err(opening)?);
                    i.blob = Some(b.clone());
                    st.with_blob.insert(ino);
                    Ok(b)
                }
            }
        };
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let n = match &file {
                Ok(content) => content.read_at(&mut buf[done..], at)?,
                Err(work) => work.read_at(&mut buf[done..], at)?,
            };
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// Writes through handle `fh` into the inode's work file. The write happens under the
    /// tree lock so that a commit (another descriptor's close) never hashes and installs
    /// a work file while a write into it is still landing: blobs stay true to their hash.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        match self.write_without_waiting(fh, offset, data)? {
            Written::Done(n) => Ok(n),
            Written::RoomComing => self.write_after_room(fh, offset, data),
        }
    }

    /// As [`Self::write`], but on a full disk where removing unused contents made room
    /// that has not come back yet, it answers [`Written::RoomComing`] at once instead of
    /// waiting: for the thread that answers the kernel's requests, which must stay free
    /// to answer the release that may be what lets go of that space.
    pub fn write_without_waiting(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<Written> {
        let mut st = self.lock();
        let ino = Self::writer_ino(&st, fh)?;
        let mut written = self.write_at(&mut st, ino, offset, data);
        if matches!(written, Err(FsError::NoSpace)) && self.make_room(&mut st, false) {
            written = self.write_at(&mut st, ino, offset, data);
            if matches!(written, Err(FsError::NoSpace)) {
                return Ok(Written::RoomComing);
            }
        }
        written?;
        Self::wrote(&mut st, ino, offset, data.len()).map(Written::Done)
    }

    /// The write after [`Written::RoomComing`]: what was removed frees its space when the
    /// last holder of it lets go (a release the kernel has queued still holds a
    /// passthrough backing file, a peer is being served it), so this waits for the room
    /// a moment, without the lock those holders may need, and tries once more.
    pub fn write_after_room(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.store.wait_for_free(data.len() as u64, std::time::Duration::from_secs(2));
        let mut st = self.lock();
        let ino = Self::writer_ino(&st, fh)?;
        self.write_at(&mut st, ino, offset, data)?;
        Self::wrote(&mut st, ino, offset, data.len())
    }

    /// The inode handle `fh` writes to.
    fn writer_ino(st: &State, fh: u64) -> FsResult<u64> {
        match st.handles.get(&fh) {
            Some(h) if h.write => Ok(h.ino),
            _ => Err(FsError::BadHandle),
        }
    }

    /// A write of `len` bytes at `offset` landed: the size and times follow.
    fn wrote(st: &mut State, ino: u64, offset: u64, len: usize) -> FsResult<u32> {
        let now = st.env.now_ns();
        let i = st.inode_mut(ino)?;
        i.size = i.size.max(offset + len as u64);
        i.mtime = now;
        i.ctime = i.mtime;
        Ok(len as u32)
    }

    /// Writes into the work file of `ino`. A write that fails leaves the file no longer
    /// than before (on a full disk, part of it may have landed past the end).
    pub(super) fn write_at(&self, st: &mut State, ino: u64, offset: u64, data: &[u8]) -> FsResult<()> {
        // (The kernel keeps offsets below 2^63: no overflow.)
        if offset + data.len() as u64 > crate::store::MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        let work = st.work_up_to(ino, offset + data.len() as u64, &self.store)?;
        let covered_whole = st.overlay_before_write(ino, offset, data.len() as u64)?;
        let size = st.inode(ino)?.size;
        let written = work.write_all_at(data, offset);
        if written.is_ok() {
            st.overlay_wrote(ino, &covered_whole);
        }
        if written.is_err() && offset + data.len() as u64 > size && !st.inode(ino)?.detached {
            let _ = work.set_len(size);
        }
        Ok(written?)
    }

    /// Whether the close of handle `fh` has a large file to hash (its work file is
    /// larger than a small content, so on the disk, or a passthrough backing file the
    /// kernel wrote, whose size the tree learns only at the commit), which the FUSE
    /// layer does not do on its own few threads.
    pub fn flush_may_take_long(&self, fh: u64) -> bool {
        let st = self.lock();
        let Some(h) = st.handles.get(&fh).filter(|h| h.write) else {
            return false;
        };
        st.inode(h.ino).is_ok_and(|i| i.work.is_some() && (i.detached || i.size > self.store.small_max()))
    }

    /// Whether changing `ino` (an open for writing, a truncation; `keeps_content`: not
    /// to nothing) first makes something long, outside the tree lock
    /// (`ready_for_change`): long all the same, so the FUSE layer does not wait for it
    /// on its one thread.
    pub fn change_may_take_long(&self, ino: u64, keeps_content: bool) -> bool {
        let st = self.lock();
        st.content_to_detach(ino).is_some() || (keeps_content && st.overlay_base_without_leaves(ino, &self.store).is_some())
    }

    /// Makes now, outside the tree lock, what the next change of `ino` would otherwise
    /// make under it: the copy that detaching the backing file its passthrough readers
    /// share keeps (`ContentStore::copy_blob_ahead`; returned, for the change's
    /// transaction: `atomically_with_copy`), and, for a change that keeps the content,
    /// the leaves of a large content when they are not cached: without them its first
    /// write or truncation copies the whole file instead of writing in place
    /// (`overlay.rs`).
    pub fn ready_for_change(&self, ino: u64, keeps_content: bool) -> Option<CopyAhead> {
        let (detach, no_leaves) = {
            let st = self.lock();
            (st.content_to_detach(ino), st.overlay_base_without_leaves(ino, &self.store).filter(|_| keeps_content))
        };
        if let Some(h) = no_leaves {
            if let Err(e) = self.store.leaves(&h) {
                tracing::debug!(ino, "the leaves of {h}: {e} (its first write copies the file)");
            }
        }
        let hash = detach?;
        let copy = self.store.copy_blob_ahead(&hash)?;
        Some(CopyAhead(hash, copy))
    }

    /// `atomically`, `ahead` (a copy made for a detach) at hand for the transaction
    /// (`State::copy_ahead`; also for its second try, on a full disk, if the first left
    /// it unused). One left unused is removed after the lock is let go: a large file's
    /// removal takes its time.
    #[track_caller]
    fn atomically_with_copy<T>(&self, mut ahead: Option<CopyAhead>, mut f: impl FnMut(&mut State, &ContentStore) -> FsResult<T>) -> FsResult<T> {
        let done = self.atomically(|st, store| {
            st.copy_ahead = ahead.take();
            let done = f(st, store);
            ahead = st.copy_ahead.take();
            done
        });
        drop(ahead);
        done
    }

    /// Whether the release of `fh` commits a large file: the close of the last writer
    /// of a file whose work file passthrough readers share (its snapshot is copied and
    /// hashed), or of one whose commit at the close failed (hashed again).
    pub fn release_may_take_long(&self, fh: u64) -> bool {
        let st = self.lock();
        let Some(h) = st.handles.get(&fh).filter(|h| h.write) else {
            return false;
        };
        st.inode(h.ino).is_ok_and(|i| i.writers == 1 && i.nlink > 0 && i.work.is_some() && (i.detached || i.size > self.store.small_max()))
    }

    /// close(2) of one descriptor: commit what was written through it. The content is
    /// hashed before the tree lock is taken for the commit, so other operations on the
    /// mount do not wait for a large file's hash.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        self.commit_written(fh, self.hash_work_outside_lock(fh))
    }

    pub(super) fn commit_written(&self, fh: u64, prehashed: Option<Prehashed>) -> FsResult<()> {
        self.atomically(|st, store| {
            let Some(h) = st.handles.get(&fh) else {
                return Ok(());
            };
            let (ino, write) = (h.ino, h.write);
            if write && st.inode(ino)?.work.is_some() {
                st.commit_work(ino, store, prehashed.as_ref())?;
            }
            Ok(())
        })
    }

    /// The hash of the work file written through handle `fh`, taken without the tree
    /// lock. `None` if there is nothing to hash or hashing failed (the commit then hashes
    /// under the lock, and reports the error if there is one).
    pub(super) fn hash_work_outside_lock(&self, fh: u64) -> Option<Prehashed> {
        self.hash_outside_lock(|st| {
            let ino = st.handles.get(&fh).filter(|h| h.write)?.ino;
            st.work_to_hash(ino)
        })
    }

    /// The hash of the work file `which` picks (under the tree lock), taken without the
    /// lock (see `hash_work_outside_lock`).
    fn hash_outside_lock(&self, which: impl FnOnce(&mut State) -> Option<WorkToHash>) -> Option<Prehashed> {
        let WorkToHash { work, stamp, detached, overlay } = which(&mut self.lock())?;
        if detached {
            let (copy, hashed) = self.store.snapshot(&work).ok()?;
            return Some(Prehashed { work, stamp, hashed, from_patch: None, snapshot: Some(copy) });
        }
        let size = work.metadata().ok()?.len();
        if let Some(view) = overlay {
            let (hashed, from_patch) = view.hash(&work, size).ok()?;
            return Some(Prehashed { work, stamp, hashed, from_patch: Some(from_patch), snapshot: None });
        }
        // A small content is read once, hashed and kept as a row here, outside the lock
        // (the commit then finds it kept). Should a write land meanwhile, the stamp
        // differs at the commit, which hashes again: the row put here is left to the GC.
        if size <= self.store.small_max() && size > 0 {
            let mut bytes = vec![0; size as usize];
            work.read_exact_at(&mut bytes, 0).ok()?;
            let hash = crate::store::hash_of(&bytes);
            self.store.put_small(&hash, &bytes).ok()?;
            return Some(Prehashed { work, stamp, hashed: crate::store::Hashed { hash, size, leaves: None }, from_patch: None, snapshot: None });
        }
        let hashed = crate::store::hash_for_commit(&crate::store::fd_path(&work)).ok()?;
        Some(Prehashed { work, stamp, hashed, from_patch: None, snapshot: None })
    }

    /// Makes the file's current content and metadata durable: commits pending writes,
    /// then flushes the committed blob (or a work file another handle still writes) and
    /// the node database to disk. The disk flushes run outside the tree lock.
    pub fn fsync(&self, fh: u64) -> FsResult<()> {
        self.flush(fh)?;
        let (work, hash) = {
            let st = self.lock();
            let ino = st.handles.get(&fh).ok_or(FsError::BadHandle)?.ino;
            let i = st.inode(ino)?;
            (i.work.as_ref().map(|w| w.try_clone()).transpose()?, i.hash.clone())
        };
        // A work file is still being written (by another handle, or by passthrough
        // writers, whose file stays after its snapshot was committed): flush it too.
        if let Some(w) = work {
            w.sync_data()?;
        }
        if let Some(h) = hash {
            self.store.sync_blob(&h)?;
        }
        // The node database's redo log, flushed without the lock too (a flush can wait
        // long for a busy disk; the mount goes on meanwhile).
        self.flush_log()?;
        Ok(())
    }

    /// Folds the redo logs of the node database and of the small contents into them (a
    /// clean stop: the next start, perhaps of another version, finds nothing to replay).
    pub fn fold_database(&self) -> FsResult<()> {
        let small = self.store.fold_small();
        self.lock().db.fold()?;
        Ok(small?)
    }

    pub fn release(&self, fh: u64) -> FsResult<Released> {
        let prehashed = self.hash_before_release(fh);
        self.release_hashed(fh, prehashed)
    }

    /// What the release of `fh` commits, hashed outside the tree lock (see
    /// `release_may_take_long`), for `release_hashed`.
    pub fn hash_before_release(&self, fh: u64) -> Option<Prehashed> {
        if self.release_may_take_long(fh) {
            self.hash_work_outside_lock(fh)
        } else {
            None
        }
    }

    /// `release`, with what `hash_before_release` took.
    pub fn release_hashed(&self, fh: u64, prehashed: Option<Prehashed>) -> FsResult<Released> {
        // The kernel forgets the handle whatever the answer, so forgetting it here is
        // done before, and apart from, the transaction: a failed commit never undoes it.
        let mut st = self.lock();
        let h = st.handles.remove(&fh).ok_or(FsError::BadHandle)?;
        let i = st.inode_mut(h.ino)?;
        i.open = i.open.saturating_sub(1);
        if h.write {
            i.writers = i.writers.saturating_sub(1);
        } else {
            st.note_used(h.ino);
        }
        let backing_unused = h.passthrough && st.end_passthrough_handle(h.ino);
        let (ino, write) = (h.ino, h.write);
        let committed = self.atomically_locked(st, |st, store| {
            let i = st.inode(ino)?;
            // The last writer closed: commit (a removed file has nothing to commit).
            if i.writers == 0 && i.work.is_some() && i.nlink > 0 {
                st.commit_work(ino, store, prehashed.as_ref())?;
            }
            // A writer's close: its content (the new one, once committed) used now.
            if write {
                st.note_used(ino);
            }
            st.maybe_drop(ino, store);
            Ok(())
        });
        if let Err(e) = committed {
            // The close (flush) that came first has told the writer. The bytes stay in
            // the work file, and `gc` tries the commit again.
            tracing::warn!(ino, "the last writer closed, but its content could not be committed: {e}; it is tried again later");
        }
        Ok(Released { ino, backing_unused })
    }

    /// Directory listing from `offset`: (ino, next offset, kind, name). A large
    /// directory is listed `WALK_PART` entries per hold of the lock (a root directory of
    /// two million files held the mount 460 ms): an entry there throughout the listing is
    /// in it once, one added or removed meanwhile may be or not, as POSIX allows.
    pub fn readdir(&self, ino: u64, offset: u64) -> FsResult<Vec<(u64, u64, Kind, OsString)>> {
        self.readdir_in_parts(ino, offset, WALK_PART, |_| {})
    }

    /// `readdir`, `part` entries per hold, calling `between` (with the entries so far)
    /// after each (the tests change the directory there).
    pub(super) fn readdir_in_parts(&self, ino: u64, offset: u64, part: usize, mut between: impl FnMut(usize)) -> FsResult<Vec<(u64, u64, Kind, OsString)>> {
        let parent = {
            let st = self.lock();
            let d = st.inode(ino)?;
            if d.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            d.links.first().map(|(p, _)| *p).unwrap_or(ROOT)
        };
        let mut entries: Vec<(u64, Kind, OsString)> = vec![(ino, Kind::Dir, ".".into()), (parent, Kind::Dir, "..".into())];
        self.walk_dirs_in_parts(
            ino,
            part,
            |_, _, listed| (Vec::new(), listed.iter().map(|(name, e)| (e.ino, e.kind, (*name).clone())).collect::<Vec<_>>()),
            |_, listed| {
                entries.extend(listed);
                between(entries.len() - 2);
                Ok(())
            },
        )?;
        Ok(entries.into_iter().enumerate().skip(offset as usize).map(|(n, (i, k, name))| (i, n as u64 + 1, k, name)).collect())
    }

    /// The node's own ignore rules (gitignore lines), from its configuration; call once
    /// after `load`. Paths they stop ignoring since the last run are sent.
    pub fn set_node_ignore_rules(&self, rules: &[String]) -> FsResult<()> {
        self.atomically(|st, _| st.set_node_ignore_rules(rules))
    }

    /// Conflicts this node's changes became (cheap, unlike `stats`).
    pub fn conflicts_seen(&self) -> u64 {
        self.lock().conflicts_seen
    }

    /// The highest revision this node has taken from the manager.
    pub fn last_revision(&self) -> u64 {
        self.lock().last_rev
    }

    /// The gauges that cost nothing to read (queued changes, conflicts, passthrough
    /// counters): what metrics are scraped for; the counts of `stats` are left at 0.
    pub fn gauges(&self) -> TreeStats {
        Self::gauges_of(&self.lock())
    }

    fn gauges_of(st: &State) -> TreeStats {
        let (kept_contents, kept_bytes) = Self::kept_usage_of(st);
        TreeStats {
            pending_changes: (st.outbox.len() + st.moves.len()) as u64,
            conflicts_seen: st.conflicts_seen,
            passthrough_opens: st.passthrough_opens,
            passthrough_detaches: st.passthrough_detaches,
            db_commits: st.db.commits(),
            kept_contents,
            kept_bytes,
            ..Default::default()
        }
    }

    /// `gauges`, the counts of the tree's entries and the last revision (kept as they
    /// change), what the kept versions take on disk and the ignored paths, for `syncctl
    /// status`. Proportional to the tree's size only where versions are kept (a look in
    /// the kept table per file, to leave out what files use) or rules ignore paths, and
    /// then a part of the tree per hold of the lock.
    pub fn stats(&self) -> TreeStats {
        let mut s = {
            let st = self.lock();
            let mut s = Self::gauges_of(&st);
            s.last_revision = st.last_rev;
            s.revisions_kept = st.revs.len() as u64;
            s.files = st.entry_counts.files;
            // The root has no entry.
            s.dirs = st.entry_counts.dirs + 1;
            s
        };
        s.ignored = self.ignored().len() as u64;
        let kept: HashSet<ContentHash> = self.lock().kept.keys().cloned().collect();
        if !kept.is_empty() {
            let used = self.used_in_parts(WALK_PART, &mut || {}, |h| kept.contains(h));
            s.kept_disk_bytes = kept.iter().filter(|h| !used.contains(*h)).map(|h| self.store.footprint(h)).sum();
        }
        s
    }
}

/// How `Tree::create` opens the file (from the `open` flags).
#[derive(Clone, Copy, Debug)]
pub struct CreateOpen {
    pub write: bool,
    /// `O_EXCL`: an existing file is an error.
    pub exclusive: bool,
    /// `O_TRUNC`, for an existing file.
    pub truncate: bool,
}

impl CreateOpen {
    /// A new file, opened for writing; an existing one is an error.
    pub const NEW: CreateOpen = CreateOpen { write: true, exclusive: true, truncate: false };
}

/// Whether `uid`/`gid` may open a file with these mode and owners for reading, and for
/// writing if `write` (root may; supplementary groups are not known to FUSE).
fn may_open(perm: u32, owner: u32, group: u32, uid: u32, gid: u32, write: bool) -> bool {
    if uid == 0 {
        return true;
    }
    let bits = if uid == owner {
        perm >> 6
    } else if gid == group {
        perm >> 3
    } else {
        perm
    } & 0o7;
    bits & 0o4 != 0 && (!write || bits & 0o2 != 0)
}

/// Whether `Tree::set_attributes` commits a truncated file that has no writer in its
/// own transaction (`No`: the caller hashes it outside the lock first).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CommitNow {
    Yes,
    No,
}
