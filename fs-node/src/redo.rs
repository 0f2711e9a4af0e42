//! A redo log file of the node database (`node.db-redo0` and `node.db-redo1` beside
//! `node.db`): a committed transaction of the tree is appended to one, one frame per
//! transaction, with one `write`. [`crate::db::Db`] owns them; it applies the logged
//! writes to SQLite a batch at a time (a fold), while new frames go to the other file,
//! and then starts the folded one again. This module only knows frames and one file.
//!
//! A frame: `SRDO`, the payload's length (u32 LE), the epoch it belongs to (u64 LE), the
//! first 8 bytes of the BLAKE3 hash of epoch and payload, the payload. The epoch is the
//! generation of the file: a frame of an epoch older than the one the database records
//! was folded already (the file could not be cut back, or a power loss took back the
//! cut) and is skipped; reading stops at the first frame that is torn or does not check (a crash in
//! the middle of an append, or a power loss that kept a later page and not an earlier
//! one), so what is read back is always a prefix of what was committed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"SRDO";
const HEADER: usize = 4 + 4 + 8 + 8;
/// A frame larger than this is taken for garbage (a transaction of the tree writes a few
/// rows; a sync page a few thousand).
const MAX_PAYLOAD: usize = 256 << 20;

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

    /// Opens (or makes) the log and returns it with its frames of epoch `epoch` or
    /// later, in order, as (epoch, payload). New frames, of `epoch` until the next
    /// [`RedoLog::restart`], are appended after what is there.
    #[allow(clippy::type_complexity)]
    pub fn open(path: &Path, epoch: u64) -> std::io::Result<(RedoLog, Vec<(u64, Vec<u8>)>)> {
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
        let mut payloads = Vec::new();
        let mut at = 0usize;
        while bytes.len() - at >= HEADER && &bytes[at..at + 4] == MAGIC {
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
            let frame_epoch = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().expect("8 bytes"));
            if len > MAX_PAYLOAD || bytes.len() - at - HEADER < len {
                break;
            }
            let payload = &bytes[at + HEADER..at + HEADER + len];
            if bytes[at + 16..at + 24] != check(frame_epoch, payload) {
                break;
            }
            if frame_epoch >= epoch {
                payloads.push((frame_epoch, payload.to_vec()));
            }
            at += HEADER + len;
        }
        let len = bytes.len() as u64;
        // Whatever follows the last good frame is cut before anything is appended: a
        // frame torn by a crash mid-append (never committed), or a damaged one, and what
        // came after it.
        let torn = at as u64 != len;
        if torn {
            tracing::warn!(path = %path.display(), kept = at, dropped = len - at as u64, "the redo log ends in a torn or damaged frame; reading stops there");
        }
        let mut log = RedoLog { file, path: path.to_owned(), len: at as u64, epoch, torn };
        if torn {
            log.cut_back()?;
        }
        Ok((log, payloads))
    }

    fn cut_back(&mut self) -> std::io::Result<()> {
        self.file.set_len(self.len)?;
        self.torn = false;
        Ok(())
    }

    /// Appends one frame with a single `write` (durable against a crash of the process
    /// once it returns; [`RedoLog::sync`] makes it durable against a power loss). If the
    /// write fails, the file is cut back to its last whole frame.
    pub fn append(&mut self, payload: &[u8]) -> std::io::Result<()> {
        // Reading back would take a larger frame for garbage and stop there.
        if payload.len() > MAX_PAYLOAD {
            return Err(std::io::Error::from_raw_os_error(libc::EFBIG));
        }
        if self.torn {
            self.cut_back()?;
        }
        let mut frame = Vec::with_capacity(HEADER + payload.len());
        frame.extend_from_slice(MAGIC);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&self.epoch.to_le_bytes());
        frame.extend_from_slice(&check(self.epoch, payload));
        frame.extend_from_slice(payload);
        match self.file.write_all(&frame) {
            Ok(()) => {
                self.len += frame.len() as u64;
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
    /// database, which now says `epoch`). If the file cannot be cut, new frames follow the
    /// old ones, which are skipped when read back (they belong to an older epoch).
    pub fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        match self.file.set_len(0) {
            Ok(()) => self.len = 0,
            Err(e) => tracing::warn!(path = %self.path.display(), "cutting back the redo log after a fold: {e}"),
        }
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
        assert!(frames.is_empty());
        (dir, path, log)
    }

    fn reopen(path: &Path, epoch: u64) -> Vec<Vec<u8>> {
        RedoLog::open(path, epoch).unwrap().1.into_iter().map(|(_, p)| p).collect()
    }

    #[test]
    fn frames_come_back_in_order_and_only_those_of_the_epoch_or_later() {
        let (_dir, path, mut log) = new_log(3);
        log.append(b"one").unwrap();
        log.append(b"two").unwrap();
        drop(log);
        assert_eq!(reopen(&path, 3), vec![b"one".to_vec(), b"two".to_vec()]);
        assert!(reopen(&path, 4).is_empty(), "frames of an older epoch are skipped");
        assert_eq!(RedoLog::open(&path, 2).unwrap().1, vec![(3, b"one".to_vec()), (3, b"two".to_vec())]);
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
        assert_eq!(back, vec![(0, b"whole".to_vec())]);
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
        log.restart(2);
        assert!(log.is_empty());
        log.append(b"newer").unwrap();
        drop(log);
        assert_eq!(reopen(&path, 2), vec![b"newer".to_vec()]);
    }
}
