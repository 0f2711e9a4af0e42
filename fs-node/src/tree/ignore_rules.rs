//! Ignore rules: which paths this node keeps to itself. Owns the parsed `.syncignore`
//! files of the tree (gitignore syntax, parsed by the `ignore` crate), keyed by the
//! directory that holds each, and the node's own rules (`fs-node --ignore`), and answers
//! whether a path is ignored. An ignored path behaves normally in the mount, but no
//! change of it is sent and no change from the manager is applied over it (the tree asks
//! here before either). Docs: docs/SEMANTICS.md, *Ignore rules*.

use super::*;
use ::ignore::gitignore::{Gitignore, GitignoreBuilder};
use ::ignore::Match;

/// The name of a rules file; it syncs like any file (unless its directory is ignored).
pub const IGNORE_FILE: &str = ".syncignore";
/// A rules file larger than this is not read (its directory then has no rules, and the
/// node says so in its log).
const MAX_RULES_BYTES: u64 = 1 << 20;
/// The tree's rules files together are read up to this many bytes: each file's matcher
/// is kept in memory by every node, and any node can make rules files. Past it, a
/// further rules file is not read, as one larger than [`MAX_RULES_BYTES`] (its
/// directory has no rules; the log says so).
const MAX_TOTAL_RULES_BYTES: usize = 8 << 20;
/// Where the node database keeps the node's own rules of the last run.
const NODE_RULES_KEY: &str = "node_ignore_rules";

#[derive(Default)]
pub(super) struct IgnoreRules {
    /// The node's own rules: below every `.syncignore`.
    node: Option<Gitignore>,
    /// The rules of each directory's `.syncignore`, by the directory's path ("" is the
    /// root).
    by_dir: HashMap<String, DirRules>,
    /// The bytes of the rules files in `by_dir`, together.
    total_bytes: usize,
}

/// One rules file: the digest of its bytes (so that reading the same rules again changes
/// nothing), their length, and the matcher made of them.
#[derive(Clone)]
pub(super) struct DirRules {
    digest: [u8; 32],
    len: usize,
    rules: Gitignore,
}

/// Parses rules given as lines of gitignore syntax; `source` names them in errors.
fn parse(lines: &str, source: &str) -> Gitignore {
    let mut b = GitignoreBuilder::new("");
    for line in lines.lines() {
        if let Err(e) = b.add_line(None, line) {
            tracing::warn!("{source}: a rule that is not valid gitignore syntax is skipped: {e}");
        }
    }
    b.build().unwrap_or_else(|e| {
        tracing::warn!("{source}: the rules could not be used: {e}");
        Gitignore::empty()
    })
}

impl IgnoreRules {
    fn is_empty(&self) -> bool {
        self.node.is_none() && self.by_dir.is_empty()
    }

    /// Sets (or, with `None`, removes) the rules of directory `dir` ("" for the root);
    /// returns whether they changed.
    pub(super) fn set_dir(&mut self, dir: &str, content: Option<&[u8]>) -> bool {
        let Some(bytes) = content else { return self.put(dir, None) };
        let digest = *blake3::hash(bytes).as_bytes();
        if self.by_dir.get(dir).is_some_and(|d| d.digest == digest) {
            return false;
        }
        let others = self.total_bytes - self.by_dir.get(dir).map_or(0, |d| d.len);
        if others + bytes.len() > MAX_TOTAL_RULES_BYTES {
            tracing::warn!(file = %rules_file(dir), "the tree's rules files hold more than {MAX_TOTAL_RULES_BYTES} bytes together: this one is not read");
            return self.put(dir, None);
        }
        let rules = parse(&String::from_utf8_lossy(bytes), &rules_file(dir));
        self.put(dir, Some(DirRules { digest, len: bytes.len(), rules }));
        true
    }

    /// Sets (or removes) directory `dir`'s rules, counting their bytes; whether it had
    /// rules before.
    fn put(&mut self, dir: &str, rules: Option<DirRules>) -> bool {
        let old = match rules {
            Some(r) => {
                self.total_bytes += r.len;
                self.by_dir.insert(dir.to_string(), r)
            }
            None => self.by_dir.remove(dir),
        };
        if let Some(o) = &old {
            self.total_bytes -= o.len;
        }
        old.is_some()
    }

    /// Puts back what a failed transaction replaced (`Undo::IgnoreRules`).
    pub(super) fn restore_dir(&mut self, dir: &str, old: Option<DirRules>) {
        self.put(dir, old);
    }

    /// Whether directory `dir` or one below it has a rules file.
    pub(super) fn has_rules_within(&self, dir: &str) -> bool {
        let below = format!("{dir}/");
        self.by_dir.keys().any(|d| d == dir || d.starts_with(&below))
    }

    /// The node's own rules (gitignore lines), replacing any before.
    pub(super) fn set_node_rules(&mut self, rules: &[String]) {
        self.node = (!rules.is_empty()).then(|| parse(&rules.join("\n"), "the node's --ignore rules"));
    }

    /// Whether `path` is ignored: it or one of its directories matches a rule (the
    /// deepest `.syncignore` that has a say wins, `!` rules included; the node's own
    /// rules come last). `is_dir`: `None` when the kind is not known (a delete), and
    /// then a rule for either kind counts.
    pub(super) fn is_ignored(&self, path: &str, is_dir: Option<bool>) -> bool {
        if self.is_empty() {
            return false;
        }
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            if self.matches(&path[..end], Some(true)) {
                return true;
            }
            end += 1;
        }
        path.rsplit('/').next() != Some(IGNORE_FILE) && self.matches(path, is_dir)
    }

    fn matches(&self, path: &str, is_dir: Option<bool>) -> bool {
        let kinds: &[bool] = match is_dir {
            Some(true) => &[true],
            Some(false) => &[false],
            None => &[false, true],
        };
        kinds.iter().any(|&d| self.decide(path, d))
    }

    fn decide(&self, path: &str, is_dir: bool) -> bool {
        // The directories above `path` that hold rules, deepest first.
        let mut dirs: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        dirs.reverse();
        dirs.push("");
        for dir in dirs {
            if let Some(d) = self.by_dir.get(dir) {
                let below = if dir.is_empty() { path } else { &path[dir.len() + 1..] };
                match d.rules.matched(below, is_dir) {
                    Match::Ignore(_) => return true,
                    Match::Whitelist(_) => return false,
                    Match::None => {}
                }
            }
        }
        self.node.as_ref().is_some_and(|n| n.matched(path, is_dir).is_ignore())
    }
}

/// The path of directory `dir`'s rules file ("" is the root).
fn rules_file(dir: &str) -> String {
    if dir.is_empty() {
        IGNORE_FILE.to_string()
    } else {
        format!("{dir}/{IGNORE_FILE}")
    }
}

/// The directory a rules file at `path` governs ("" for the root), if `path` names one.
pub(super) fn rules_dir(path: &RelPath) -> Option<String> {
    (path.name() == IGNORE_FILE).then(|| path.parent().map(|p| p.as_str().to_string()).unwrap_or_default())
}

impl State {
    /// Whether inode `ino` is a directory (`None`: no such inode), as the rules ask.
    fn is_dir(&self, ino: u64) -> Option<bool> {
        self.inodes.get(&ino).map(|i| i.kind == Kind::Dir)
    }

    /// Notes that the transaction changed `path`: if it is a rules file, its directory's
    /// rules are read again before the transaction commits (`Tree::transaction`).
    pub(super) fn touch_rules(&mut self, path: &RelPath) {
        if rules_dir(path).is_some() {
            if let Some(j) = &mut self.journal {
                if !j.rules_touched.contains(path) {
                    j.rules_touched.push(path.clone());
                }
            }
        }
    }

    /// Reads again the rules of the rules files changed so far in this transaction
    /// (`touch_rules`), sending what they stop ignoring. A transaction does this before
    /// it commits, and a transaction of many entries after each one, so that every entry
    /// is applied under the rules the entries before it made (as it would be alone).
    pub(super) fn settle_rules(&mut self, store: &ContentStore) -> FsResult<()> {
        while let Some(path) = self.journal.as_mut().and_then(|j| j.rules_touched.pop()) {
            self.rules_changed(&path, store)?;
        }
        Ok(())
    }

    /// The content of the rules file of directory `dir`, as the tree has it now (`None`
    /// when there is none, it is not a file, or its content is not here yet).
    fn rules_content(&self, dir: &str, store: &ContentStore) -> Option<Vec<u8>> {
        let path = RelPath::new(rules_file(dir)).ok()?;
        let (_, _, ino) = self.resolve(&path)?;
        let i = self.inodes.get(&ino)?;
        let hash = i.hash.as_ref().filter(|_| i.kind == Kind::File)?;
        if i.size > MAX_RULES_BYTES {
            tracing::warn!(%path, size = i.size, "a rules file larger than {MAX_RULES_BYTES} bytes is not read");
            return None;
        }
        let mut bytes = Vec::new();
        use std::io::Read;
        store.open_blob(hash).ok()?.take(MAX_RULES_BYTES).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }

    /// Reads every rules file of the tree (at load).
    pub(super) fn load_ignore_rules(&mut self, store: &ContentStore) {
        let mut all = Vec::new();
        self.collect_paths(ROOT, None, &mut all);
        for (path, ..) in all {
            if let Some(dir) = rules_dir(&path) {
                let content = self.rules_content(&dir, store);
                self.ignore.set_dir(&dir, content.as_deref());
            }
        }
    }

    /// The rules file at `path` changed (written, applied from the manager, removed,
    /// renamed): its directory's rules are read again.
    pub(super) fn rules_changed(&mut self, path: &RelPath, store: &ContentStore) -> FsResult<()> {
        let Some(dir) = rules_dir(path) else {
            return Ok(());
        };
        let content = self.rules_content(&dir, store);
        let scope = if dir.is_empty() { Some(ROOT) } else { RelPath::new(dir.clone()).ok().and_then(|d| self.resolve(&d)).map(|(_, _, ino)| ino) };
        self.change_rules(scope, |st| {
            let old = st.ignore.by_dir.get(&dir).cloned();
            if !st.ignore.set_dir(&dir, content.as_deref()) {
                return false;
            }
            tracing::info!(dir = %dir, "ignore rules changed");
            st.record(|| Undo::IgnoreRules(dir.clone(), old));
            true
        })
    }

    /// Changes the rules with `change` (which says whether anything changed); then every
    /// path below directory `scope` that is not ignored any more is sent as a change,
    /// based on the revision it had (a path changed elsewhere meanwhile becomes a
    /// conflict, never an overwrite). A path that became ignored stays where it is, here
    /// and everywhere.
    fn change_rules(&mut self, scope: Option<u64>, change: impl FnOnce(&mut State) -> bool) -> FsResult<()> {
        let mut paths = Vec::new();
        if let Some(d) = scope {
            self.collect_paths(d, None, &mut paths);
        }
        let was: Vec<bool> = paths.iter().map(|(p, _, _, ino)| self.ignore.is_ignored(p.as_str(), self.is_dir(*ino))).collect();
        if !change(self) {
            return Ok(());
        }
        for ((p, parent, name, ino), was) in paths.into_iter().zip(was) {
            let is_written = self.inodes.get(&ino).is_some_and(|i| i.work.is_some());
            if was && !is_written && !self.ignore.is_ignored(p.as_str(), self.is_dir(ino)) {
                tracing::info!(path = %p, "not ignored any more: sent");
                self.record_put(parent, &name, ino)?;
            }
        }
        Ok(())
    }

    /// The node's own rules (`fs-node --ignore`), kept in the node database: rules that
    /// differ from the last run's take effect like a changed rules file at the root.
    pub(super) fn set_node_ignore_rules(&mut self, rules: &[String]) -> FsResult<()> {
        let new = serde_json::to_string(rules).expect("strings serialize");
        let old: Vec<String> = self.db.meta(NODE_RULES_KEY)?.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
        self.ignore.set_node_rules(&old);
        if old == rules {
            return Ok(());
        }
        self.db.set_meta(NODE_RULES_KEY, &new)?;
        tracing::info!(rules = ?rules, "the node's own ignore rules changed");
        self.change_rules(Some(ROOT), |st| {
            st.ignore.set_node_rules(rules);
            true
        })
    }

    /// Whether `path` or anything below it is ignored here (what a delete from the
    /// manager must keep).
    pub(super) fn has_ignored_within(&self, path: &RelPath) -> bool {
        if self.ignore.is_empty() {
            return false;
        }
        let Some((_, _, ino)) = self.resolve(path) else {
            return false;
        };
        if self.ignore.is_ignored(path.as_str(), self.is_dir(ino)) {
            return true;
        }
        let mut below = Vec::new();
        self.collect_paths(ino, None, &mut below);
        below.iter().any(|(p, _, _, i)| self.ignore.is_ignored(p.as_str(), self.is_dir(*i)))
    }
}

impl Tree {
    /// Every path this node ignores, an ignored directory named once (not what it
    /// holds), in order. A directory part at a time (`Tree::walk_dirs_in_parts`): the
    /// mount is not held for a walk of the whole tree.
    pub fn ignored(&self) -> Vec<RelPath> {
        let mut out = Vec::new();
        if self.lock().ignore.is_empty() {
            return out;
        }
        let walked = self.walk_dirs_in_parts(
            ROOT,
            WALK_PART,
            |st, dir, entries| {
                let (mut into, mut found) = (Vec::new(), Vec::new());
                for (name, e) in entries {
                    let Some(p) = st.path_of(dir, name) else { continue };
                    if st.ignore.is_ignored(p.as_str(), Some(e.kind == Kind::Dir)) {
                        found.push(p);
                    } else if e.kind == Kind::Dir {
                        into.push(e.ino);
                    }
                }
                (into, found)
            },
            |_, found| {
                out.extend(found);
                Ok(())
            },
        );
        debug_assert!(walked.is_ok(), "nothing fails after a part");
        // (A directory renamed during the walk from a part not walked yet into one walked
        // may be seen twice.)
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod rule_tests {
    use super::*;

    fn rules(files: &[(&str, &str)]) -> IgnoreRules {
        let mut r = IgnoreRules::default();
        for (dir, text) in files {
            r.set_dir(dir, Some(text.as_bytes()));
        }
        r
    }

    #[test]
    fn gitignore_syntax_with_nesting_negation_and_directories() {
        let r = rules(&[("", "*.o\nbuild/\n!keep.o\n"), ("src", "!main.o\n*.tmp\n"), ("src/deep", "*.o\n")]);
        let ig = |p: &str, d: Option<bool>| r.is_ignored(p, d);
        assert!(ig("a.o", Some(false)) && ig("x/y/a.o", Some(false)));
        assert!(!ig("keep.o", Some(false)), "negation");
        assert!(!ig("a.c", Some(false)));
        assert!(ig("build", Some(true)) && !ig("build", Some(false)), "a directory-only rule");
        assert!(ig("build/out/a.c", Some(false)), "below an ignored directory");
        assert!(ig("build", None), "a delete of either kind");
        assert!(!ig("src/main.o", Some(false)), "a deeper rules file wins");
        assert!(ig("src/x.tmp", Some(false)) && !ig("x.tmp", Some(false)), "rules apply below their directory only");
        assert!(ig("src/deep/main.o", Some(false)), "the deepest rules file wins");
        assert!(!ig(".syncignore", Some(false)) && !ig("src/.syncignore", Some(false)), "rules files sync");
        assert!(ig("build/.syncignore", Some(false)), "unless their directory is ignored");
    }

    #[test]
    fn node_rules_come_after_every_rules_file() {
        let mut r = IgnoreRules::default();
        r.set_node_rules(&["*.swp".into(), "cache/".into()]);
        assert!(r.is_ignored("a/b.swp", Some(false)) && r.is_ignored("cache/x", Some(false)));
        r.set_dir("a", Some(b"!b.swp\n"));
        assert!(!r.is_ignored("a/b.swp", Some(false)) && r.is_ignored("c.swp", Some(false)));
        assert!(!r.set_dir("a", Some(b"!b.swp\n")), "the same rules again change nothing");
        assert!(r.set_dir("a", None) && r.is_ignored("a/b.swp", Some(false)));
        assert!(!IgnoreRules::default().is_ignored("anything", None));
    }

    /// Any node can make rules files, and every node keeps their matchers: past a total,
    /// further ones are not read (their directories have no rules), and once there is
    /// room one read again is taken.
    #[test]
    fn rules_files_are_read_up_to_a_total() {
        let mut r = IgnoreRules::default();
        let big = format!("*.o\n{}", "#".repeat(MAX_RULES_BYTES as usize - 8));
        let fit = MAX_TOTAL_RULES_BYTES / big.len();
        for i in 0..fit {
            assert!(r.set_dir(&format!("d{i}"), Some(big.as_bytes())), "d{i} within the total");
        }
        assert!(!r.set_dir("over", Some(big.as_bytes())), "past the total: not read");
        assert!(r.is_ignored("d0/a.o", Some(false)) && !r.is_ignored("over/a.o", Some(false)));
        assert_eq!(r.total_bytes, fit * big.len());
        // A file that grows past the total loses its rules; room made is taken again.
        assert!(r.set_dir("d1", Some(format!("{big}{big}").as_bytes())) && !r.is_ignored("d1/a.o", Some(false)));
        assert!(r.set_dir("over", Some(big.as_bytes())) && r.is_ignored("over/a.o", Some(false)));
        r.restore_dir("over", None);
        assert_eq!(r.total_bytes, (fit - 1) * big.len(), "an undo counts too");
    }
}
