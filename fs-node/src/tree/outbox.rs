//! The outbox: recording local changes as changes for the manager, coalesced with
//! unsent ones of the same path, in an order the manager can apply (parents before
//! children, deletes children first), each based on the revision it was made on.

use super::*;

impl State {
    pub(super) fn push_change(&mut self, path: RelPath, op: ChangeOp) -> FsResult<()> {
        // Coalesce with a change to the same path that never left this process: the
        // manager only needs the latest state.
        let unsent = self
            .outbox
            .rows
            .iter()
            .rev()
            .find(|(s, r)| r.change.path == path && **s > self.outbox.published_upto && !self.outbox.sent.contains(&r.msg))
            .map(|(s, r)| (*s, matches!(r.change.op, ChangeOp::Put { .. })));
        let base = self.revs.get(&path).copied().unwrap_or(Revision::NONE);
        if let Some((seq, true)) = unsent {
            if matches!(op, ChangeOp::Put { .. }) {
                // A put replacing a put keeps its place in the queue: puts of its
                // parents are before it, puts of its children after it. (Appended at
                // the end, a directory's put would follow its children's, and the
                // manager would have made the directory itself, with a default mode.)
                let follows = self.outbox.rows.range(..seq).rev().find(|(_, r)| r.change.path == path).map(|(_, r)| r.msg.clone());
                let mut row = self.outbox.rows.get(&seq).expect("found").clone();
                row.change = Change { path, base, follows, op };
                tracing::debug!(target: "changes", msg = %row.msg, path = %row.change.path, base = base.0, follows = ?row.change.follows, op = ?row.change.op, "replaced in the queue");
                self.db.replace_outbox(seq, &row.change)?;
                self.set_outbox_row(seq, Some(row));
                return Ok(());
            }
        }
        if let Some((seq, _)) = unsent {
            // Anything else goes to the end, where the order of deletes (children
            // first) and of a put after a delete is kept.
            let row = self.set_outbox_row(seq, None).expect("found");
            tracing::debug!(target: "changes", msg = %row.msg, path = %row.change.path, "coalesced with a newer change");
            self.db.remove_outbox(&row.msg)?;
            self.count_change(&path, -1);
        }
        let follows = self.outbox.rows.values().rev().find(|r| r.change.path == path).map(|r| r.msg.clone());
        let msg = self.env.new_id();
        let change = Change { path: path.clone(), base, follows, op };
        tracing::debug!(target: "changes", %msg, path = %change.path, base = base.0, follows = ?change.follows, op = ?change.op, "queued");
        let seq = self.db.push_outbox(&msg, &change)?;
        self.count_change(&path, 1);
        self.set_outbox_row(seq, Some(OutboxRow { seq, msg, change }));
        Ok(())
    }

    pub(super) fn record_put(&mut self, parent: u64, name: &OsStr, ino: u64) -> FsResult<()> {
        let Some(path) = self.path_of(parent, name) else {
            return Ok(());
        };
        let i = self.inode(ino)?;
        match i.version() {
            Some(version) => self.push_change(path, ChangeOp::Put { version }),
            // A local-only kind (FIFO, socket, device) now occupies a path that may hold
            // a synced file elsewhere: for the others, that path is gone. Without this,
            // the manager's older state of the path would come back over it.
            None if !i.kind.synced() => self.push_change(path, ChangeOp::Delete),
            None => Ok(()),
        }
    }

    pub(super) fn record_put_all_links(&mut self, ino: u64) -> FsResult<()> {
        let links = self.inode(ino)?.links.clone();
        for (p, n) in links {
            self.record_put(p, &n, ino)?;
        }
        Ok(())
    }

    pub(super) fn record_put_subtree(&mut self, parent: u64, name: &OsStr) -> FsResult<()> {
        let ino = self.child(parent, name)?;
        if self.inode(ino)?.work.is_none() {
            self.record_put(parent, name, ino)?;
        }
        let mut all = Vec::new();
        self.collect_paths(ino, None, &mut all);
        for (_, p, n, i) in all {
            if self.inode(i)?.work.is_none() {
                self.record_put(p, &n, i)?;
            }
        }
        Ok(())
    }

    pub(super) fn record_delete(&mut self, path: RelPath) -> FsResult<()> {
        self.push_change(path, ChangeOp::Delete)
    }
}
