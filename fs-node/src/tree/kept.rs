//! Contents kept past GC for the manager: the contents of kept versions (old versions
//! and deleted files the cluster can restore, docs/versions.md). The manager says which
//! to keep (`ToNode::Keep`) and when to let go (`ToNode::Release`); each stays until
//! then or until its `until_ms`, whichever comes first. When the disk holding the store
//! falls below the node's free-space floor, the GC drops the oldest first and the node
//! tells the manager, which asks another node to keep them.

use super::*;
use crate::db::KeptRow;
use crate::store::AtRestBases;
use sync::RoundEnd;
use wire::KeepItem;

/// A node forgets a kept content by itself only this long after the end it was told:
/// the manager's `release` is what ends a retention (it may have been lengthened since,
/// and the clocks may differ); this is for a manager that is gone.
pub const FORGET_AFTER_MS: i64 = 7 * 24 * 3600 * 1000;

impl Tree {
    /// The free-space floor: below it nothing more is kept, and the GC drops the oldest.
    pub fn set_keep_floor(&self, bytes: u64) {
        self.lock().kept_floor = bytes;
    }

    /// Whether `more` bytes may come to the store for keeping and leave the free-space
    /// floor intact. A content to keep is fetched only then: fetching it must never take
    /// the room a user's next write needs (a disk just freed by a delete is asked at once
    /// to keep the deleted content).
    pub fn room_to_keep(&self, more: u64) -> bool {
        Self::room_above_floor(self.lock().kept_floor, &self.store, more)
    }

    fn room_above_floor(floor: u64, store: &ContentStore, more: u64) -> bool {
        floor == 0 || store.free_bytes().is_ok_and(|free| free >= floor.saturating_add(more))
    }

    /// Keeps what the store has of `items`; returns the hashes kept and those it lacks
    /// (all of them while the disk is below the free-space floor).
    pub fn keep(&self, items: &[KeepItem]) -> FsResult<(Vec<ContentHash>, Vec<ContentHash>)> {
        let mut st = self.lock();
        let now_ms = st.env.now_ns() / 1_000_000;
        let (mut rows, mut lacking) = (Vec::<KeptRow>::new(), Vec::new());
        let mut row_of: HashMap<&ContentHash, usize> = HashMap::new();
        let short_of_space = !Self::room_above_floor(st.kept_floor, &self.store, 0);
        for item in items {
            // A content asked for twice in one request (two deleted files with the same
            // bytes) is one row, kept until the later of the two.
            if let Some(&i) = row_of.get(&item.hash) {
                rows[i].until_ms = rows[i].until_ms.max(item.until_ms);
                continue;
            }
            if (short_of_space && !st.kept.contains_key(&item.hash)) || !self.store.has(&item.hash) {
                lacking.push(item.hash.clone());
                continue;
            }
            row_of.insert(&item.hash, rows.len());
            rows.push(match st.kept.get(&item.hash) {
                Some(k) => KeptRow { until_ms: k.until_ms.max(item.until_ms), ..k.clone() },
                None => KeptRow { hash: item.hash.clone(), size: item.size, until_ms: item.until_ms, at_ms: now_ms, own_until_ms: 0 },
            });
        }
        // One transaction for the whole request (a delete of many files asks to keep
        // each of their contents); memory follows once it is committed.
        st.db.put_kept_all(&rows).map_err(|e| FsError::Io(anyhow::Error::new(e).context("recording kept contents")))?;
        let keeping = rows.iter().map(|r| r.hash.clone()).collect();
        st.kept.extend(rows.into_iter().map(|r| (r.hash.clone(), r)));
        Ok((keeping, lacking))
    }

    /// The manager no longer needs these kept: each is removed now unless a file of the
    /// tree uses it (then it stays while that file does), or the node keeps it for a
    /// reason of its own (its version decided into a conflict file it has not taken yet:
    /// other nodes pull that file from it), which the release does not end: it then stays
    /// until that reason's end. Returns the bytes freed.
    ///
    /// Which of them a file or a queued change still uses is listed a part of the tree
    /// at a time (`used_in_parts`), in a round begun when they stopped being kept: what
    /// is taken meanwhile (or kept again) stays too.
    pub fn release_kept(&self, hashes: &[ContentHash]) -> FsResult<u64> {
        self.release_kept_in_parts(hashes, WALK_PART, || {})
    }

    /// `release_kept`, listing `part` inodes or queued changes per hold of the lock and
    /// calling `between` after each (the tests change the tree there).
    pub(super) fn release_kept_in_parts(&self, hashes: &[ContentHash], part: usize, mut between: impl FnMut()) -> FsResult<u64> {
        let (released, round) = {
            let mut st = self.lock();
            let now_ms = st.env.now_ns() / 1_000_000;
            let own: Vec<KeptRow> = hashes
                .iter()
                .filter_map(|h| st.kept.get(h))
                .filter(|k| k.own_until_ms > now_ms && k.until_ms != k.own_until_ms)
                .map(|k| KeptRow { until_ms: k.own_until_ms, ..k.clone() })
                .collect();
            let released: HashSet<ContentHash> = hashes.iter().filter(|h| st.kept.get(*h).is_some_and(|k| k.own_until_ms <= now_ms)).cloned().collect();
            if !own.is_empty() {
                st.db.put_kept_all(&own).map_err(|e| FsError::Io(anyhow::Error::new(e).context("releasing kept contents")))?;
                st.kept.extend(own.into_iter().map(|k| (k.hash.clone(), k)));
            }
            if released.is_empty() {
                return Ok(0);
            }
            st.db.remove_kept_all(released.iter()).map_err(|e| FsError::Io(anyhow::Error::new(e).context("releasing kept contents")))?;
            for h in &released {
                st.kept.remove(h);
            }
            (released, st.begin_round())
        };
        let _end = RoundEnd::new(self, round);
        let used = self.used_in_parts(part, &mut between, |h| released.contains(h));
        let mut st = self.lock();
        let taken = st.end_round(round).unwrap_or_default();
        let mut freed = 0;
        for h in released.iter().filter(|h| !used.contains(*h) && !taken.contains(*h) && !st.kept.contains_key(*h) && **h != ContentStore::empty_hash()) {
            freed += self.store.remove_blob(h).unwrap_or(0);
        }
        Ok(freed)
    }

    /// Large contents kept whole that another whole content mostly holds, each made a
    /// patch over the content of a file of the tree sharing most of its chunks where that
    /// saves at least half of it (`store/at_rest.rs`); returns how many became one. Two
    /// kinds: kept contents no file of the tree uses any more (older versions, deleted
    /// files), and the contents of files left alone (neither opened nor changed) for at
    /// least `idle`: of two near-copies, one then takes only the bytes it does not share.
    /// After the GC, outside the tree's lock: a content opened meanwhile reads through
    /// its patch, and an open that passes reads through to the disk has it written out
    /// whole again (`ContentStore::write_out_for_reads`). A base is the content of a file
    /// kept local for good, or for an on-demand file's content also another on-demand
    /// file's (`AtRestBases`: the cache evicts a base only with what is over it).
    pub fn keep_at_rest(&self, idle: std::time::Duration) -> usize {
        let large = |size: u64| size >= crate::store::AT_REST_MIN_BYTES;
        // One pass over the files, a part at a time (`visit_in_parts`): the large
        // contents files have, those of files kept local for good, and when each was
        // last active, `None` while a file with it is in use (open, being written,
        // passed through; a removed file still open counts). A content never used since
        // the node started counts from then.
        let mut bases = AtRestBases::default();
        let mut last_active: HashMap<ContentHash, Option<i64>> = HashMap::new();
        self.visit_inodes_in_parts(|st, i| {
            if i.kind != Kind::File || !large(i.size) {
                return;
            }
            let Some(h) = &i.hash else { return };
            // (Without pin rules, and not on demand, every path is local for good.)
            let local_for_good =
                || !st.residency.in_use() || i.links.iter().any(|(parent, name)| st.path_of(*parent, name).is_some_and(|p| st.residency.pinned(p.as_str())));
            if i.nlink > 0 {
                bases.current.insert(h.clone());
                if local_for_good() {
                    bases.for_good.insert(h.clone());
                }
            }
            let used = st.last_used.get(h).copied().unwrap_or(st.loaded_ns);
            let in_use = i.open > 0 || i.work.is_some() || i.passthrough.is_some();
            let active = last_active.entry(h.clone()).or_insert(Some(i64::MIN));
            *active = active.filter(|_| !in_use).map(|t| t.max(i.ctime).max(used));
        });
        let (candidates, left_alone) = {
            let mut st = self.lock();
            let st = &mut *st;
            let kept_large = st.kept.values().any(|k| large(k.size));
            if !kept_large && bases.current.is_empty() {
                return 0;
            }
            // Left alone: neither used nor changed for `idle`, the longest left alone
            // first (of two near-copies, the one used last stays whole).
            let idle_before = st.env.now_ns().saturating_sub(i64::try_from(idle.as_nanos()).unwrap_or(i64::MAX));
            let mut left_alone: Vec<(i64, ContentHash)> = last_active
                .into_iter()
                .filter(|(h, _)| bases.current.contains(h))
                .filter_map(|(h, t)| t.filter(|t| *t <= idle_before).map(|t| (t, h)))
                .collect();
            left_alone.sort_unstable();
            let left_alone: Vec<ContentHash> = left_alone.into_iter().map(|(_, h)| h).collect();
            // When a content was last used is kept for the large ones only (and for
            // every one the cache of on-demand files counts): what no file has goes.
            let track_all = st.residency.in_use();
            st.last_used.retain(|h, _| track_all || bases.current.contains(h));
            let mut candidates: Vec<ContentHash> = Vec::new();
            if kept_large {
                let used = Self::referenced(st);
                candidates.extend(st.kept.values().filter(|k| large(k.size)).map(|k| &k.hash).filter(|h| !used.contains(*h)).cloned());
            }
            candidates.extend(left_alone.iter().cloned());
            bases.kept = st.kept.keys().cloned().collect();
            (candidates, left_alone)
        };
        let mut made = self.store.replace_unneeded_bases(&bases);
        if !made.is_empty() {
            tracing::debug!("{} bases nothing keeps for good any more replaced by a file's content patched over them", made.len());
        }
        made.extend(self.store.keep_at_rest(&candidates, &bases));
        let changed = made.len();
        // A file not open lets go of the handle its reads kept on a content left alone
        // or made a patch just now (reopened at its next read): a blob made a patch is
        // then no longer held on the disk by it.
        made.extend(left_alone);
        let let_go: HashSet<&ContentHash> = made.iter().collect();
        self.lock().drop_blob_handles(|i| i.open == 0 && i.hash.as_ref().is_some_and(|h| let_go.contains(h)));
        changed
    }

    /// How many contents are kept for the manager, and their bytes.
    pub fn kept_usage(&self) -> (u64, u64) {
        Self::kept_usage_of(&self.lock())
    }

    pub(super) fn kept_usage_of(st: &State) -> (u64, u64) {
        (st.kept.len() as u64, st.kept.values().map(|k| k.size).sum())
    }

    /// Kept contents dropped for space since the last call: the manager is told.
    pub fn take_dropped(&self) -> Vec<ContentHash> {
        std::mem::take(&mut self.lock().kept_dropped)
    }

    /// Under the GC's lock: forgets kept contents past their `until_ms`, and drops the
    /// oldest while the store's disk has less than `floor` bytes free (those no file in
    /// the tree uses: dropping them frees their bytes; `in_use` says what the GC's round
    /// `round` listed in use, and the round notes what was taken since). Returns what
    /// stays kept.
    pub(super) fn kept_for_gc(&self, st: &mut State, floor: u64, round: u64, in_use: &impl Fn(&ContentHash) -> bool) -> Vec<ContentHash> {
        let now_ms = st.env.now_ns() / 1_000_000;
        let expired: Vec<ContentHash> = st.kept.values().filter(|k| k.until_ms.saturating_add(FORGET_AFTER_MS) < now_ms).map(|k| k.hash.clone()).collect();
        for h in &expired {
            st.kept.remove(h);
        }
        let _ = st.db.remove_kept_all(&expired);
        let mut short = floor.saturating_sub(self.store.free_bytes().unwrap_or(u64::MAX));
        if short > 0 {
            // (Those a file or a queued change uses free nothing.)
            let taken = st.taken_in_round(round);
            let used = |h: &ContentHash| in_use(h) || taken.is_some_and(|t| t.contains(h));
            let mut oldest: Vec<(i64, ContentHash, u64)> = st.kept.values().filter(|k| !used(&k.hash)).map(|k| (k.at_ms, k.hash.clone(), k.size)).collect();
            oldest.sort();
            let first_dropped = st.kept_dropped.len();
            for (_, h, size) in oldest {
                if short == 0 {
                    break;
                }
                tracing::warn!(hash = %h, size, "dropping a kept version's content: the disk is below the free-space floor");
                st.kept.remove(&h);
                // What dropping it frees: an older version kept as a patch frees its
                // patch, not its size.
                short = short.saturating_sub(self.store.footprint(&h));
                st.kept_dropped.push(h);
            }
            let _ = st.db.remove_kept_all(&st.kept_dropped[first_dropped..]);
        }
        st.kept.keys().cloned().collect()
    }
}
