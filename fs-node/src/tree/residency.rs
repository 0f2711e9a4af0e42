//! Which contents this node keeps local and which it fetches when first read (files on
//! demand, docs/on-demand.md). A path is *pinned* (its contents are pulled as they
//! arrive and never evicted) or *on demand* (its entries are applied with their
//! metadata only, and the content comes when a program opens the file). The nearest
//! rule above a path decides (`syncctl pin` / `unpin`, kept in `node.db`); without one,
//! the node's `--on-demand` default. `.syncignore` files are always local: the rules
//! they hold are read by the node itself.

use super::*;
use sync::RoundEnd;

/// The pin rules and the default, owned by the tree's state.
#[derive(Clone, Debug, Default)]
pub(super) struct Residency {
    /// Paths are on demand unless a rule pins them (`fs-node --on-demand`).
    pub on_demand: bool,
    /// Rule per path ("" is the root): true pins, false makes on demand.
    pub rules: BTreeMap<String, bool>,
}

impl Residency {
    /// Whether some path may be on demand (the default, or a rule that unpins).
    pub fn any_on_demand(&self) -> bool {
        self.on_demand || self.rules.values().any(|pinned| !pinned)
    }

    /// Whether files on demand are in use at all (the default, or any rule).
    pub fn in_use(&self) -> bool {
        self.on_demand || !self.rules.is_empty()
    }

    /// Whether contents at `path` are kept local (pulled as they arrive, never evicted).
    pub fn pinned(&self, path: &str) -> bool {
        if path.rsplit('/').next() == Some(IGNORE_FILE) {
            return true;
        }
        if !self.rules.is_empty() {
            let mut p = path;
            loop {
                if let Some(r) = self.rules.get(p) {
                    return *r;
                }
                if p.is_empty() {
                    break;
                }
                p = p.rsplit_once('/').map_or("", |(parent, _)| parent);
            }
        }
        !self.on_demand
    }
}

/// A copy of the pin rules (`Tree::pin_rules`).
pub struct PinRules(Residency);

impl PinRules {
    pub fn pinned(&self, path: &RelPath) -> bool {
        self.0.pinned(path.as_str())
    }
}

/// A file's content that is not in the store: what opening it must fetch first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteContent {
    pub hash: ContentHash,
    pub size: u64,
    /// A path of the file here: the manager is asked who holds its content now.
    pub path: Option<RelPath>,
}

/// What `syncctl status` says about local and remote contents.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ResidencyReport {
    pub on_demand: bool,
    /// Whether the files below were counted: only where some path is on demand. A node
    /// without is a full copy (every file's content is here once pulled; the pulls under
    /// way are in the status), and counting would take a pass over the whole tree and a
    /// look in the store per file.
    #[serde(default)]
    pub counted: bool,
    /// Files whose content is here, and their bytes (a content two paths share counts
    /// for each).
    pub local_files: u64,
    pub local_bytes: u64,
    /// Files whose content is fetched when first read, and their bytes.
    pub remote_files: u64,
    pub remote_bytes: u64,
    /// The rules: paths ("" is the root) pinned (true) or made on demand (false).
    pub pins: Vec<(String, bool)>,
}

impl Tree {
    /// Makes paths without a pin rule on demand (`fs-node --on-demand`) or local.
    pub fn set_on_demand(&self, on: bool) {
        self.lock().residency.on_demand = on;
    }

    /// Whether contents at `path` are kept local.
    pub fn is_pinned(&self, path: &RelPath) -> bool {
        self.lock().residency.pinned(path.as_str())
    }

    /// The pin rules as they are now, to ask about many paths without the tree lock.
    pub fn pin_rules(&self) -> PinRules {
        PinRules(self.lock().residency.clone())
    }

    /// Sets (`Some`) or removes (`None`) the rule of `path` ("" for the whole tree),
    /// durably. Returns the files below it (or it) whose contents are now wanted here
    /// and are missing: the caller fetches them.
    pub fn set_pin(&self, path: &str, pinned: Option<bool>) -> FsResult<Vec<(RelPath, RemoteContent)>> {
        if !path.is_empty() {
            RelPath::new(path.to_string()).map_err(|_| FsError::Invalid)?;
        }
        self.atomically(|st, _| {
            st.db.set_pin(path, pinned)?;
            Ok(())
        })?;
        let mut st = self.lock();
        match pinned {
            Some(p) => st.residency.rules.insert(path.to_string(), p),
            None => st.residency.rules.remove(path),
        };
        Ok(Self::missing_below(&st, &self.store, path))
    }

    /// The files at or below `path` that are pinned and whose content is not here.
    fn missing_below(st: &State, store: &ContentStore, path: &str) -> Vec<(RelPath, RemoteContent)> {
        let mut all = Vec::new();
        let start = if path.is_empty() { Some(ROOT) } else { RelPath::new(path.to_string()).ok().and_then(|p| st.resolve(&p)).map(|(_, _, ino)| ino) };
        let Some(start) = start else { return all };
        let mut paths = Vec::new();
        if st.inodes.get(&start).is_some_and(|i| i.kind == Kind::Dir) {
            st.collect_paths(start, RelPath::new(path.to_string()).ok().as_ref(), &mut paths);
        } else if let Ok(p) = RelPath::new(path.to_string()) {
            if let Some((parent, name, ino)) = st.resolve(&p) {
                paths.push((p, parent, name, ino));
            }
        }
        for (p, _, _, ino) in paths {
            let Some(i) = st.inodes.get(&ino) else { continue };
            if i.kind != Kind::File || i.work.is_some() || !st.residency.pinned(p.as_str()) {
                continue;
            }
            if let Some(h) = i.hash.as_ref().filter(|h| !store.has(h)) {
                all.push((p.clone(), RemoteContent { hash: h.clone(), size: i.size, path: Some(p) }));
            }
        }
        all
    }

    /// Every pinned file whose content is missing (fetched at start-up).
    pub fn pinned_missing(&self) -> Vec<(RelPath, RemoteContent)> {
        Self::missing_below(&self.lock(), &self.store, "")
    }

    /// The content opening `ino` must fetch first: none for a file whose content is
    /// here, one being written, or an open that truncates it.
    pub fn content_to_fetch(&self, ino: u64, truncate: bool) -> Option<RemoteContent> {
        if truncate {
            return None;
        }
        let st = self.lock();
        // A node without files on demand has every content (a lost one fails with EIO
        // until the next sync pulls it again): no stat per open.
        if !st.residency.in_use() {
            return None;
        }
        let i = st.inodes.get(&ino)?;
        if i.kind != Kind::File || i.work.is_some() || i.passthrough.is_some() {
            return None;
        }
        let h = i.hash.as_ref()?;
        let path = i.links.first().and_then(|(parent, name)| st.path_of(*parent, name));
        (!self.store.has(h)).then(|| RemoteContent { hash: h.clone(), size: i.size, path })
    }

    /// Whether any path here may be on demand (the node's default, or a rule).
    pub fn uses_on_demand(&self) -> bool {
        self.lock().residency.any_on_demand()
    }

    /// The pin rules.
    pub fn pins(&self) -> Vec<(String, bool)> {
        self.lock().residency.rules.iter().map(|(p, v)| (p.clone(), *v)).collect()
    }

    /// The pin rules and, where some path is on demand, the local and remote files and
    /// bytes: the contents are listed a part of the tree at a time (`visit_in_parts`),
    /// then the store is asked about each one outside the lock (a stat per content, which
    /// a large tree must not hold the lock for).
    pub fn residency(&self) -> ResidencyReport {
        let (on_demand, pins, counted) = {
            let st = self.lock();
            (st.residency.on_demand, st.residency.rules.iter().map(|(p, v)| (p.clone(), *v)).collect(), st.residency.any_on_demand())
        };
        let mut r = ResidencyReport { on_demand, counted, pins, ..Default::default() };
        let mut files: Vec<(Option<ContentHash>, u64)> = Vec::new();
        if counted {
            self.visit_inodes_in_parts(|_, i| {
                if i.kind == Kind::File && i.nlink > 0 {
                    files.push((i.hash.clone().filter(|_| i.work.is_none()), i.size));
                }
            });
        }
        for (hash, size) in files {
            if hash.is_some_and(|h| !self.store.has(&h)) {
                r.remote_files += 1;
                r.remote_bytes += size;
            } else {
                r.local_files += 1;
                r.local_bytes += size;
            }
        }
        r
    }
}

/// A content this node may drop from its cache, if the manager agrees.
#[derive(Clone, Debug)]
pub struct Evictable {
    pub hash: ContentHash,
    /// The bytes it takes on the disk here (a content at rest over another: its patch).
    pub size: u64,
    /// Every path of it here, with the revision this node has of it.
    pub paths: Vec<wire::Held>,
}

impl Tree {
    /// What to drop so that the contents of on-demand (unpinned) files fit in `budget`
    /// bytes of disk: the least recently opened first, only contents every path of which
    /// is on demand and closed, and none kept for an old version. A content kept as a
    /// patch counts the bytes of its patch; a base goes only together with the contents
    /// patched over it, which come just before it in the list (the store keeps a base
    /// while a patch is over it), and stays if one of them may not go; the group goes
    /// when the most recently opened of them would. Returns the candidates, in the order
    /// to drop them, and the cache's bytes now.
    pub fn eviction_candidates(&self, budget: u64) -> (Vec<Evictable>, u64) {
        // (A listing of the patches, before the tree's lock.)
        let over_base = self.store.patched_over();
        let patched: HashSet<&ContentHash> = over_base.values().flatten().collect();
        let disk = |h: &ContentHash, size: u64| if patched.contains(h) { self.store.footprint(h) } else { size };
        // Per content: its bytes on the disk, whether it can go, whether every path of it
        // is on demand, its paths. The files are looked at a part of the tree at a time
        // (a store lookup each); `evict` looks again under the lock at what it drops.
        struct Cached {
            bytes: u64,
            may_go: bool,
            on_demand: bool,
            paths: Vec<wire::Held>,
            /// When it was last opened (`State::last_used`), as its part saw it.
            used: i64,
        }
        let mut by_hash: HashMap<ContentHash, Cached> = HashMap::new();
        self.visit_inodes_in_parts(|st, i| {
            if i.kind != Kind::File || i.nlink == 0 || i.size == 0 {
                return;
            }
            let Some(h) = &i.hash else { return };
            if i.work.is_some() || !self.store.has(h) {
                return;
            }
            let busy = i.open > 0 || i.passthrough.is_some() || st.kept.contains_key(h);
            let e = by_hash.entry(h.clone()).or_insert_with(|| Cached {
                bytes: disk(h, i.size),
                may_go: true,
                on_demand: true,
                paths: Vec::new(),
                used: st.last_used.get(h).copied().unwrap_or(0),
            });
            e.may_go &= !busy;
            for (parent, name) in &i.links {
                let Some(p) = st.path_of(*parent, name) else { continue };
                let pinned = st.residency.pinned(p.as_str());
                e.may_go &= !pinned;
                e.on_demand &= !pinned;
                let rev = st.revs.get(&p).copied().unwrap_or_default();
                e.paths.push(wire::Held { path: p, rev, hash: h.clone() });
            }
        });
        // The cache is what on-demand files hold here; a pinned content is not in it.
        let cached: u64 = by_hash.values().filter(|c| c.on_demand).map(|c| c.bytes).sum();
        if cached <= budget {
            return (Vec::new(), cached);
        }
        // When the contents patched over a base were last opened (few; those no file
        // has are not in `by_hash`), under the lock once more; the rest without it.
        let over_used: HashMap<&ContentHash, i64> = {
            let st = self.lock();
            over_base.values().flatten().map(|c| (c, st.last_used.get(c).copied().unwrap_or(0))).collect()
        };
        let used = |h: &ContentHash| by_hash.get(h).map(|c| c.used).or_else(|| over_used.get(h).copied()).unwrap_or(0);
        // A base counts as used when the last of the contents over it was.
        let group_used = |h: &ContentHash| over_base.get(h).into_iter().flatten().map(used).fold(used(h), i64::max);
        let times: Vec<(ContentHash, i64)> = by_hash.iter().filter(|(_, c)| c.may_go && !c.paths.is_empty()).map(|(h, _)| (h.clone(), group_used(h))).collect();
        let mut candidates: Vec<(i64, Evictable)> =
            times.into_iter().filter_map(|(h, used)| by_hash.remove(&h).map(|c| (used, Evictable { hash: h, size: c.bytes, paths: c.paths }))).collect();
        // The least recently used first; the same time in the order of their hashes.
        candidates.sort_unstable_by(|(a, x), (b, y)| a.cmp(b).then_with(|| x.hash.as_bytes().cmp(y.hash.as_bytes())));
        let at: HashMap<&ContentHash, usize> = candidates.iter().enumerate().map(|(n, (_, e))| (&e.hash, n)).collect();
        let mut over = cached - budget;
        let mut taken = vec![false; candidates.len()];
        let mut out = Vec::new();
        for n in 0..candidates.len() {
            if over == 0 {
                break;
            }
            // The contents over it first, all of them or none (then it stays too).
            let with: Option<Vec<usize>> = over_base.get(&candidates[n].1.hash).map_or(Some(Vec::new()), |cs| cs.iter().map(|c| at.get(c).copied()).collect());
            let Some(with) = with else { continue };
            for m in with.into_iter().chain([n]) {
                if !std::mem::replace(&mut taken[m], true) {
                    over = over.saturating_sub(candidates[m].1.size);
                    out.push(candidates[m].1.clone());
                }
            }
        }
        (out, cached)
    }

    /// Drops these contents from the store, each only if it still may go (nothing
    /// opened or pinned it since it was chosen). Returns the bytes freed.
    ///
    /// The tree's lock is never held for a walk of the whole tree: which files have
    /// these contents is listed a part of the tree at a time (`WALK_PART` inodes per
    /// hold), in a round (`State::begin_round`) that notes what files and queued changes
    /// take meanwhile; the contents go `EVICT_PART` per hold, each after a look again
    /// at the files listed with it, at what the round noted and at the kept versions.
    pub fn evict(&self, hashes: &[ContentHash]) -> u64 {
        self.evict_in_parts(hashes, WALK_PART, EVICT_PART, || {})
    }

    /// `evict`, listing `part` inodes and dropping `drop_part` contents per hold of the
    /// lock, calling `between` between holds (the tests change the tree there).
    pub(super) fn evict_in_parts(&self, hashes: &[ContentHash], part: usize, drop_part: usize, mut between: impl FnMut()) -> u64 {
        // Whether file `i`'s content must stay for it.
        let needed = |st: &State, i: &Inode| {
            i.open > 0
                || i.work.is_some()
                || i.passthrough.is_some()
                || i.links.iter().filter_map(|(p, n)| st.path_of(*p, n)).any(|p| st.residency.pinned(p.as_str()))
        };
        let wanted: HashSet<&ContentHash> = hashes.iter().collect();
        let (round, inos) = {
            let mut st = self.lock();
            (st.begin_round(), st.inodes.keys().copied().collect())
        };
        let _end = RoundEnd::new(self, round);
        // Per content: the files that had it when listed (looked at again before it
        // goes), or that one of them needed it then.
        let mut holders: HashMap<&ContentHash, Vec<u64>> = HashMap::new();
        let mut blocked: HashSet<&ContentHash> = HashSet::new();
        self.visit_in_parts(inos, part, &mut between, |st, ino| {
            let Some(i) = st.inodes.get(&ino).filter(|i| i.kind == Kind::File) else { return };
            let Some(h) = i.hash.as_ref().and_then(|h| wanted.get(h).copied()) else { return };
            if needed(st, i) {
                blocked.insert(h);
            } else {
                holders.entry(h).or_default().push(ino);
            }
        });
        let mut freed = 0;
        let candidates: Vec<&ContentHash> = hashes.iter().filter(|h| !blocked.contains(h)).collect();
        for chunk in candidates.chunks(drop_part.max(1)) {
            between();
            self.yield_to_waiters();
            let mut st = self.lock();
            let gone: HashSet<ContentHash> = chunk
                .iter()
                .filter(|&&h| {
                    let taken = st.taken_in_round(round).is_some_and(|t| t.contains(h));
                    let held = holders.get(h).into_iter().flatten().any(|ino| st.inodes.get(ino).is_some_and(|i| i.hash.as_ref() == Some(h) && needed(&st, i)));
                    !taken && !held && !st.kept.contains_key(h)
                })
                .map(|&h| h.clone())
                .collect();
            st.drop_blob_handles(|i| i.hash.as_ref().is_some_and(|h| gone.contains(h)));
            // In the order given: one the store keeps (older versions are patches over
            // it) stays in line where it was, not first.
            for h in chunk.iter().filter(|h| gone.contains(**h)) {
                let removed = self.store.remove_blob(h);
                freed += removed.unwrap_or(0);
                if removed.is_some() || !self.store.has(h) {
                    st.last_used.remove(*h);
                }
            }
        }
        freed
    }
}

/// How many contents `Tree::evict` drops per hold of the tree's lock (a removal of a
/// file each).
const EVICT_PART: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_rule_decides_and_ignore_files_stay_local() {
        let mut r = Residency { on_demand: true, rules: BTreeMap::new() };
        assert!(!r.pinned("a/b"));
        assert!(r.pinned(".syncignore") && r.pinned("a/.syncignore"), "rules files are always local");
        r.rules.insert("a".into(), true);
        r.rules.insert("a/b/c".into(), false);
        assert!(r.pinned("a") && r.pinned("a/b") && r.pinned("a/b/x"));
        assert!(!r.pinned("a/b/c") && !r.pinned("a/b/c/d"));
        assert!(!r.pinned("ab"), "a rule on a does not reach ab");
        r.on_demand = false;
        assert!(r.pinned("z"));
        r.rules.insert("".into(), false);
        assert!(!r.pinned("z"), "a rule on the root beats the default");
    }
}
