//! A redo log file of the node database (`node.db-redo0` and `node.db-redo1` beside
//! `node.db`): a committed transaction of the tree is appended to one, one frame per
//! transaction, with one `write`. [`crate::journal::Journal`] owns them (for
//! [`crate::db::Db`] and the small contents); it applies the logged writes to SQLite a
//! batch at a time (a fold), while new frames go to the other file, and then starts the
//! folded one again. This module only knows frames and one file.
//!
//! A frame: `SRDO`, the payload's length (u32 LE), the epoch it belongs to (u64 LE), the
//! first 8 bytes of the BLAKE3 hash of epoch and payload, the payload. A transaction
//! larger than [`FRAME_MAX`] (a rename of a directory of a million files queues two
//! million changes) is written as several frames: all but the last begin with `SRDC`
//! (continued), and it is read back only with its last frame, whole. The epoch is the
//! generation of the file: a frame of an epoch older than the one the database records
//! was folded already (the file could not be cut back, or a power loss took back the
//! cut) and is skipped; reading stops at the first frame that is torn or does not check (a crash in
//! the middle of an append, or a power loss that kept a later page and not an earlier
//! one), so what is read back is always a prefix of what was committed.
//!
//! When the owner moves on to the other file for a new epoch, that file's first frame is
//! a mark (`SRDP`, [`Prior`]): the epoch the first file was appended for and its length
//! then. The first file is not flushed at that moment (it was, under the tree's lock,
//! before session 36): a power loss may keep the second file's frames and not all of the
//! first's, and the mark is how the reader (`crate::journal`) tells, and drops the
//! second's, so that what comes back across both files is still a prefix.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A transaction's last (or only) frame.
const MAGIC: &[u8; 4] = b"SRDO";
/// A frame of a transaction whose next frame follows.
const CONTINUED: &[u8; 4] = b"SRDC";
/// A mark: what the other file held when this one was started ([`Prior`]).
const PRIOR: &[u8; 4] = b"SRDP";
const HEADER: usize = 4 + 4 + 8 + 8;
/// A frame larger than this is taken for garbage (a transaction of the tree writes a few
/// rows; a sync page a few thousand).
const MAX_PAYLOAD: usize = 256 << 20;
/// A transaction is cut into frames of at most this many bytes of payload.
#[cfg(not(test))]
const FRAME_MAX: usize = 64 << 20;
#[cfg(test)]
const FRAME_MAX: usize = 16;
/// A transaction larger than this fails (`EFBIG`): reading it back needs it in memory.
const MAX_TRANSACTION: usize = 4 << 30;

/// What the other log file held when this one was started for a new epoch (the mark
/// [`RedoLog::start`] writes first): the epoch it was appended for and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prior {
    pub epoch: u64,
    pub len: u64,
}

impl Prior {
    fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.epoch.to_le_bytes());
        b[8..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Prior> {
        (b.len() == 16).then(|| Prior { epoch: u64::from_le_bytes(b[..8].try_into().expect("8")), len: u64::from_le_bytes(b[8..].try_into().expect("8")) })
    }
}

/// What [`RedoLog::open`] read back from a file.
#[derive(Debug, Default)]
pub struct ReadBack {
    /// The transactions of the epoch asked for or later, in order, as (epoch, payload).
    pub frames: Vec<(u64, Vec<u8>)>,
    /// The marks of those epochs, as (the epoch the mark began, what it says, where in
    /// the file the mark begins).
    pub priors: Vec<(u64, Prior, u64)>,
    /// The bytes of whole frames read (where the file is cut back to).
    pub len: u64,
    /// For each epoch with a whole frame in the file (a mark or a transaction's last
    /// frame), older ones too: where its last such frame ends.
    pub ends: Vec<(u64, u64)>,
}

impl ReadBack {
    /// Where the last whole frame of `epoch` ends (0 if the file has none): what a mark
    /// of the other file, naming `epoch`, says this file held ([`Prior::len`]). Bytes of
    /// other epochs (older frames a lost cut left) do not count.
    pub fn end_of(&self, epoch: u64) -> u64 {
        self.ends.iter().find(|(e, _)| *e == epoch).map_or(0, |&(_, end)| end)
    }

    /// The newest epoch of a whole frame in the file, if any.
    pub fn newest(&self) -> Option<u64> {
        self.ends.iter().map(|&(e, _)| e).max()
    }

    fn ended(&mut self, epoch: u64, end: usize) {
        match self.ends.iter_mut().find(|(e, _)| *e == epoch) {
            Some(slot) => slot.1 = end as u64,
            None => self.ends.push((epoch, end as u64)),
        }
    }
}

pub struct RedoLog {
    file: File,
    path: PathBuf,
    /// The file's length after the last whole frame.
    len: u64,
    /// The epoch new frames belong to.
    epoch: u64,
    /// An append failed and the file could not be cut back to its last whole frame: it
    /// is cut back before the next one.
    torn: bool,
    /// Marks fail to be written, as on a full disk (tests of the journal's fallback).
    #[cfg(test)]
    pub(crate) marks_fail: bool,
}

fn check(epoch: u64, payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

impl RedoLog {
    /// Log file `i` (0 or 1) of the database at `db_path`.
    pub fn path_for(db_path: &Path, i: usize) -> PathBuf {
        let mut p = db_path.as_os_str().to_owned();
        p.push(format!("-redo{i}"));
        PathBuf::from(p)
    }

    /// Opens (or makes) the log and returns it with what it holds of epoch `epoch` or
    /// later. New frames, of `epoch` until the next [`RedoLog::start`], are appended
    /// after what is there.
    pub fn open(path: &Path, epoch: u64) -> std::io::Result<(RedoLog, ReadBack)> {
        let made = !path.exists();
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
        if made {
            // The new file's name is on the disk before a frame in it is promised.
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut read = ReadBack::default();
        // `at`: the end of the last whole transaction; `next`: of the last good frame.
        let (mut at, mut next) = (0usize, 0usize);
        let mut transaction: Vec<u8> = Vec::new();
        while bytes.len() - next >= HEADER {
            let (last, mark) = match &bytes[next..next + 4] {
                m if m == MAGIC => (true, false),
                m if m == CONTINUED => (false, false),
                // A mark is a frame of its own, never inside a transaction.
                m if m == PRIOR && transaction.is_empty() => (true, true),
                _ => break,
            };
            let len = u32::from_le_bytes(bytes[next + 4..next + 8].try_into().expect("4 bytes")) as usize;
            let frame_epoch = u64::from_le_bytes(bytes[next + 8..next + 16].try_into().expect("8 bytes"));
            if len > MAX_PAYLOAD || bytes.len() - next - HEADER < len {
                break;
            }
            let payload = &bytes[next + HEADER..next + HEADER + len];
            if bytes[next + 16..next + 24] != check(frame_epoch, payload) {
                break;
            }
            if mark {
                let Some(prior) = Prior::decode(payload) else { break };
                if frame_epoch >= epoch {
                    read.priors.push((frame_epoch, prior, next as u64));
                }
                next += HEADER + len;
                at = next;
                read.ended(frame_epoch, at);
                continue;
            }
            next += HEADER + len;
            transaction.extend_from_slice(payload);
            if last {
                let whole = std::mem::take(&mut transaction);
                if frame_epoch >= epoch {
                    read.frames.push((frame_epoch, whole));
                }
                at = next;
                read.ended(frame_epoch, at);
            }
        }
        let len = bytes.len() as u64;
        // Whatever follows the last good frame is cut before anything is appended: a
        // frame torn by a crash mid-append (never committed), or a damaged one, and what
        // came after it.
        let torn = at as u64 != len;
        if torn {
            tracing::warn!(path = %path.display(), kept = at, dropped = len - at as u64, "the redo log ends in a torn or damaged frame; reading stops there");
        }
        let mut log = RedoLog {
            file,
            path: path.to_owned(),
            len: at as u64,
            epoch,
            torn,
            #[cfg(test)]
            marks_fail: false,
        };
        if torn {
            log.cut_back()?;
        }
        read.len = at as u64;
        Ok((log, read))
    }

    /// Cuts the file at `at` (the start of a frame) and flushes the cut: what followed
    /// can never be read back, even after a power loss.
    pub fn cut_for_good(&mut self, at: u64) -> std::io::Result<()> {
        self.file.set_len(at)?;
        self.file.sync_all()?;
        self.len = at;
        self.torn = false;
        Ok(())
    }

    fn cut_back(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        self.torn = false;
        Ok(())
    }

    /// Appends one transaction, as one frame with a single `write` up to [`FRAME_MAX`]
    /// bytes, as several frames above (durable against a crash of the process once it
    /// returns; [`RedoLog::sync`] makes it durable against a power loss). If a write
    /// fails, the file is cut back to the end of the last whole transaction.
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<()> {
        if payload.len() > MAX_TRANSACTION {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        }
        if self.torn {
            self.cut_back()?;
        }
        let parts = payload.len().div_ceil(FRAME_MAX).max(1);
        let frames = payload.chunks(FRAME_MAX).chain(payload.is_empty().then_some(&[][..])).enumerate();
        self.write_frames(frames.map(|(n, part)| (if n + 1 == parts { MAGIC } else { CONTINUED }, part)))
    }

    /// Appends frames of the given kinds and payloads, each with a `write` of its own;
    /// if one fails, the file is cut back to where it was.
    fn write_frames<'a>(&mut self, frames: impl Iterator<Item = (&'static [u8; 4], &'a [u8])>) -> std::io::Result<()> {
        let mut written = 0;
        let mut result = Ok(());
        for (kind, part) in frames {
            let mut frame = Vec::with_capacity(HEADER + part.len());
            frame.extend_from_slice(kind);
            frame.extend_from_slice(&(part.len() as u32).to_le_bytes());
            frame.extend_from_slice(&self.epoch.to_le_bytes());
            frame.extend_from_slice(&check(self.epoch, part));
            frame.extend_from_slice(part);
            result = self.file.write_all(&frame);
            if result.is_err() {
                break;
            }
            written += frame.len() as u64;
        }
        match result {
            Ok(()) => {
                self.len += written;
                Ok(())
            }
            Err(e) => {
                self.torn = true;
                let _ = self.cut_back();
                Err(e)
            }
        }
    }

    /// Starts the log again for `epoch` (its frames so far were folded into the
    /// database, which now says an epoch before `epoch` or `epoch` itself): cuts it, unless
    /// `emptied` says the fold of its frames did ([`RedoLog::empty`]), and writes `prior`,
    /// what the other file holds, as its first frame. If the file cannot be cut, new
    /// frames follow the old ones, which are skipped when read back (they belong to an
    /// older epoch). Fails only if the mark cannot be written.
    pub fn start(&mut self, epoch: u64, prior: Option<Prior>, emptied: bool) -> std::io::Result<()> {
        self.epoch = epoch;
        if emptied {
            self.len = 0;
            self.torn = false;
        } else {
            match self.file.set_len(0) {
                Ok(()) => {
                    self.len = 0;
                    self.torn = false;
                }
                Err(e) => tracing::warn!(path = %self.path.display(), "cutting back the redo log after a fold: {e}"),
            }
        }
        if self.torn {
            self.cut_back()?;
        }
        match prior {
            #[cfg(test)]
            Some(_) if self.marks_fail => Err(std::io::Error::other("the test's marks cannot be written")),
            Some(prior) => self.write_frames(std::iter::once((PRIOR, &prior.encode()[..]))),
            None => Ok(()),
        }
    }

    /// Empties the file through `handle` (a handle of it, [`RedoLog::handle`]), once
    /// its frames are folded: what [`RedoLog::start`] would do, done by the fold's own
    /// thread so that the appender does not wait for it.
    pub fn empty(handle: &File) -> std::io::Result<()> {
        handle.set_len(0)
    }

    /// New frames belong to `epoch` (no later than the frames already in the file
    /// that are kept); nothing is cut.
    pub fn continue_at(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Flushes the log to the disk.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// A second handle of the file, to flush it without holding the log.
    pub fn handle(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// The epoch new frames belong to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Bytes of frames in the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new, empty log file of `epoch` in a temporary directory.
    fn new_log(epoch: u64) -> (tempfile::TempDir, PathBuf, RedoLog) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (log, frames) = RedoLog::open(&path, epoch).unwrap();
        assert!(frames.frames.is_empty());
        (dir, path, log)
    }

    fn reopen(path: &Path, epoch: u64) -> Vec<Vec<u8>> {
        RedoLog::open(path, epoch).unwrap().1.frames.into_iter().map(|(_, p)| p).collect()
    }

    /// What a mark of the other file is checked against is where this file's frames of
    /// the mark's epoch end: frames of an older epoch that a lost cut left behind do not
    /// count, however long they are (found by a review: the whole length counted).
    #[test]
    fn the_end_of_an_epoch_counts_only_its_own_frames() {
        let (_dir, path, mut log) = new_log(0);
        for n in 0..5u8 {
            log.append(&[n; 8]).unwrap();
        }
        let read = RedoLog::open(&path, 0).unwrap().1;
        assert_eq!((read.end_of(0), read.end_of(1), read.newest()), (5 * (HEADER as u64 + 8), 0, Some(0)));
        let (mut log, _) = RedoLog::open(&path, 0).unwrap();
        log.continue_at(1);
        log.write_frames(std::iter::once((PRIOR, &Prior { epoch: 0, len: 7 }.encode()[..]))).unwrap();
        log.append(&[9; 8]).unwrap();
        let read = RedoLog::open(&path, 1).unwrap().1;
        let after_old = 5 * (HEADER as u64 + 8);
        assert_eq!(read.end_of(1), after_old + (HEADER as u64 + 16) + (HEADER as u64 + 8));
        assert_eq!(read.priors, vec![(1, Prior { epoch: 0, len: 7 }, after_old)], "the mark, and where it begins");
        assert_eq!(read.newest(), Some(1));
    }

    #[test]
    fn frames_come_back_in_order_and_only_those_of_the_epoch_or_later() {
        let (_dir, path, mut log) = new_log(3);
        log.append(b"one").unwrap();
        log.append(b"two").unwrap();
        drop(log);
        assert_eq!(reopen(&path, 3), vec![b"one".to_vec(), b"two".to_vec()]);
        assert!(reopen(&path, 4).is_empty(), "frames of an older epoch are skipped");
        assert_eq!(RedoLog::open(&path, 2).unwrap().1.frames, vec![(3, b"one".to_vec()), (3, b"two".to_vec())]);
    }

    /// A transaction larger than a frame (16 bytes in the tests) is written as several
    /// frames and read back as one payload, in its place among the others.
    #[test]
    fn a_transaction_larger_than_a_frame_comes_back_whole() {
        let (_dir, path, mut log) = new_log(1);
        let big: Vec<u8> = (0..100u8).collect();
        log.append(b"before").unwrap();
        log.append(&big).unwrap();
        log.append(b"").unwrap();
        log.append(&big[..FRAME_MAX]).unwrap();
        drop(log);
        assert_eq!(reopen(&path, 1), vec![b"before".to_vec(), big.clone(), Vec::new(), big[..FRAME_MAX].to_vec()]);
        let frames = 1 + 7 + 1 + 1;
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            frames * HEADER + 6 + 100 + FRAME_MAX,
            "the large one in seven frames, the empty one in one"
        );
    }

    /// A crash between the frames of a transaction: none of it is read back, and the
    /// next append replaces it.
    #[test]
    fn a_transaction_torn_between_its_frames_is_not_read_back() {
        let (_dir, path, mut log) = new_log(0);
        log.append(b"whole").unwrap();
        log.append(&[7u8; 100]).unwrap();
        drop(log);
        let whole = HEADER + 5;
        let full = std::fs::read(&path).unwrap();
        assert_eq!(full.len(), whole + 7 * HEADER + 100, "seven frames");
        for cut in [whole + HEADER + FRAME_MAX, whole + 3 * (HEADER + FRAME_MAX), whole + 6 * (HEADER + FRAME_MAX) + HEADER] {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (mut log, frames) = RedoLog::open(&path, 0).unwrap();
            assert_eq!(frames.frames, vec![(0, b"whole".to_vec())], "cut at {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, whole, "cut back to the whole transaction");
            log.append(b"next").unwrap();
            drop(log);
            assert_eq!(reopen(&path, 0), vec![b"whole".to_vec(), b"next".to_vec()]);
        }
    }

    /// A crash in the middle of an append leaves a torn frame: it and anything after
    /// it is never read back, and the next append replaces it.
    #[test]
    fn a_torn_or_damaged_frame_ends_what_is_read_back() {
        let (_dir, path, mut log) = new_log(0);
        log.append(b"whole").unwrap();
        log.append(b"torn frame").unwrap();
        drop(log);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        let (mut log, back) = RedoLog::open(&path, 0).unwrap();
        assert_eq!(back.frames, vec![(0, b"whole".to_vec())]);
        log.append(b"after").unwrap();
        drop(log);
        assert_eq!(reopen(&path, 0), vec![b"whole".to_vec(), b"after".to_vec()]);

        // A flipped byte in a payload fails the check: that frame and the ones after it
        // are not read.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 1] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(reopen(&path, 0).is_empty());
    }

    /// After a fold the log starts again; frames of the old epoch left in the file (it
    /// could not be cut) are skipped, and the new ones after them are read.
    #[test]
    fn frames_of_an_older_epoch_before_new_ones_are_skipped() {
        let (_dir, path, mut log) = new_log(0);
        log.append(b"folded").unwrap();
        // As if the cut had failed: the epoch moves on, the old frame stays.
        log.epoch = 1;
        log.append(b"new").unwrap();
        drop(log);
        assert_eq!(reopen(&path, 1), vec![b"new".to_vec()]);
        let (mut log, _) = RedoLog::open(&path, 1).unwrap();
        log.start(2, None, false).unwrap();
        assert!(log.is_empty());
        log.append(b"newer").unwrap();
        drop(log);
        assert_eq!(reopen(&path, 2), vec![b"newer".to_vec()]);
    }
}
