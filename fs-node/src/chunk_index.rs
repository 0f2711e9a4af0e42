//! Which local blob has a chunk: an index from a chunk's hash to the blobs (and offsets)
//! it is in, so that a pull copies every chunk the node already has, whichever file it
//! came with, and fetches only the others (`puller.rs`). A file made from another (a copy
//! edited, an archive repacked, a disk image cloned) moves only what is new.
//!
//! Owned by the content store (`store.rs`), kept in its own SQLite file
//! (`chunks/index.db`) next to the chunk lists it is made from. It is a cache and never
//! trusted: blobs are immutable and named by their hash, so an entry can only be stale
//! (its blob removed), never wrong about bytes that are there; and every chunk copied
//! from it is hashed again before use. Entries come when a blob's chunk list is saved and
//! go with the blob; an entry whose blob is gone (removed while the index was closed, or
//! by a crash in between) is dropped when a lookup finds it. Opened on first use: a node
//! that never holds a large file never opens it. A store from before the index is indexed
//! from its chunk lists in the background when the index is first made.

use crate::chunks::ChunkList;
use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use wire::ContentHash;

/// Most blobs a lookup names for one chunk (a chunk in thousands of files needs one).
const MOST_CANDIDATES: usize = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, hash BLOB NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS chunks (
    prefix INTEGER NOT NULL,  -- the chunk hash's first 8 bytes
    len INTEGER NOT NULL,
    blob INTEGER NOT NULL REFERENCES blobs(id),
    offset INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_prefix ON chunks(prefix);
CREATE INDEX IF NOT EXISTS chunks_by_blob ON chunks(blob);
";

/// Where a chunk may be: blob `blob`, at `offset` (same length as asked).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub blob: ContentHash,
    pub offset: u64,
}

pub struct ChunkIndex {
    conn: std::sync::Mutex<Connection>,
    /// Whether any blob was ever indexed (kept without asking the database: a puller
    /// looks at it for every large pull).
    has_blobs: std::sync::atomic::AtomicBool,
    /// Blobs indexed since the index was opened: what was looked up before may be found
    /// now if this changed.
    added: std::sync::atomic::AtomicU64,
}

/// Rows inserted per transaction: the connection is let go between them, so a lookup
/// never waits for the whole list of a huge blob.
const ROWS_PER_TRANSACTION: usize = 10_000;

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkIndex")
    }
}

fn prefix(h: &ContentHash) -> i64 {
    i64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

impl ChunkIndex {
    /// Opens the index at `path` (made if missing; made again if it cannot be read).
    /// Returns whether it is new (empty).
    pub fn open(path: &Path) -> anyhow::Result<(ChunkIndex, bool)> {
        let fresh = !path.exists();
        let conn = match Self::connect(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("the chunk index {} cannot be used ({e:#}); making it again", path.display());
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                return Ok((ChunkIndex { conn: std::sync::Mutex::new(Self::connect(path)?), has_blobs: false.into(), added: 0.into() }, true));
            }
        };
        let has_blobs = conn.query_row("SELECT EXISTS (SELECT 1 FROM blobs)", [], |r| r.get::<_, bool>(0)).context("reading the chunk index")?;
        Ok((ChunkIndex { conn: std::sync::Mutex::new(conn), has_blobs: has_blobs.into(), added: 0.into() }, fresh))
    }

    /// Whether any blob was indexed (cheap: no database access).
    pub fn has_blobs(&self) -> bool {
        self.has_blobs.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn connect(path: &Path) -> anyhow::Result<Connection> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL").context("setting WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL").context("setting synchronous")?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        conn.execute_batch(SCHEMA).context("making the chunk index's tables")?;
        Ok(conn)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records every chunk of blob `blob` (replacing what was recorded for it), in
    /// transactions of [`ROWS_PER_TRANSACTION`] (a lookup meanwhile may find some of
    /// them: each is true on its own).
    pub fn add(&self, blob: &ContentHash, list: &ChunkList) -> rusqlite::Result<()> {
        let id = {
            let mut conn = self.lock();
            let tx = conn.transaction()?;
            tx.execute("INSERT OR IGNORE INTO blobs (hash) VALUES (?1)", params![blob.as_bytes()])?;
            let id: i64 = tx.query_row("SELECT id FROM blobs WHERE hash = ?1", params![blob.as_bytes()], |r| r.get(0))?;
            tx.execute("DELETE FROM chunks WHERE blob = ?1", params![id])?;
            tx.commit()?;
            id
        };
        for part in list.chunks.chunks(ROWS_PER_TRANSACTION) {
            let mut conn = self.lock();
            let tx = conn.transaction()?;
            {
                let mut ins = tx.prepare_cached("INSERT INTO chunks (prefix, len, blob, offset) VALUES (?1, ?2, ?3, ?4)")?;
                for c in part {
                    ins.execute(params![prefix(&c.hash), c.len, id, c.offset as i64])?;
                }
            }
            tx.commit()?;
        }
        self.has_blobs.store(true, std::sync::atomic::Ordering::Relaxed);
        self.added.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// How many blobs were indexed since the index was opened.
    pub fn added(&self) -> u64 {
        self.added.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Forgets blob `blob` (removed from the store).
    pub fn remove(&self, blob: &ContentHash) -> rusqlite::Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let id: Option<i64> = tx.query_row("SELECT id FROM blobs WHERE hash = ?1", params![blob.as_bytes()], |r| r.get(0)).optional()?;
        if let Some(id) = id {
            tx.execute("DELETE FROM chunks WHERE blob = ?1", params![id])?;
            tx.execute("DELETE FROM blobs WHERE id = ?1", params![id])?;
        }
        tx.commit()
    }

    /// Blobs that may have a chunk of hash `chunk` and length `len` (the first 8 bytes of
    /// the hash match; the caller checks the bytes), at most a few.
    pub fn find(&self, chunk: &ContentHash, len: u32) -> rusqlite::Result<Vec<Found>> {
        let conn = self.lock();
        let mut q = conn.prepare_cached(
            "SELECT blobs.hash, chunks.offset FROM chunks JOIN blobs ON blobs.id = chunks.blob
             WHERE chunks.prefix = ?1 AND chunks.len = ?2 LIMIT ?3",
        )?;
        let rows = q.query_map(params![prefix(chunk), len, MOST_CANDIDATES as i64], |r| {
            let hash: Vec<u8> = r.get(0)?;
            let offset: i64 = r.get(1)?;
            Ok((hash, offset))
        })?;
        let mut found = Vec::new();
        for row in rows {
            let (hash, offset) = row?;
            if let (Ok(bytes), Ok(offset)) = (<[u8; 32]>::try_from(hash.as_slice()), u64::try_from(offset)) {
                found.push(Found { blob: ContentHash::from_bytes(bytes), offset });
            }
        }
        Ok(found)
    }

    /// How many blobs are indexed.
    #[cfg(test)]
    fn blobs(&self) -> rusqlite::Result<u64> {
        self.lock().query_row("SELECT count(*) FROM blobs", [], |r| r.get::<_, i64>(0)).map(|n| n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunks::Chunk;

    fn h(n: u8) -> ContentHash {
        crate::store::hash_of(&[n])
    }

    fn list(hashes: &[ContentHash]) -> ChunkList {
        let mut offset = 0;
        ChunkList {
            chunks: hashes
                .iter()
                .map(|hash| {
                    let c = Chunk { offset, len: 100, hash: hash.clone() };
                    offset += 100;
                    c
                })
                .collect(),
        }
    }

    #[test]
    fn chunks_are_found_in_every_blob_that_has_them_until_the_blob_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        let (idx, fresh) = ChunkIndex::open(&path).unwrap();
        assert!(fresh && !idx.has_blobs());
        let (a, b) = (h(100), h(101));
        idx.add(&a, &list(&[h(1), h(2), h(3)])).unwrap();
        idx.add(&b, &list(&[h(3), h(4)])).unwrap();
        assert_eq!(idx.find(&h(2), 100).unwrap(), vec![Found { blob: a.clone(), offset: 100 }]);
        let mut both = idx.find(&h(3), 100).unwrap();
        both.sort_by_key(|f| f.offset);
        assert_eq!(both, vec![Found { blob: b.clone(), offset: 0 }, Found { blob: a.clone(), offset: 200 }]);
        // Another length is another chunk.
        assert!(idx.find(&h(2), 99).unwrap().is_empty());
        assert!(idx.find(&h(9), 100).unwrap().is_empty());
        // Added again, a blob's chunks are replaced, not doubled.
        idx.add(&a, &list(&[h(1), h(2), h(3)])).unwrap();
        assert_eq!(idx.find(&h(1), 100).unwrap().len(), 1);
        idx.remove(&a).unwrap();
        assert!(idx.find(&h(1), 100).unwrap().is_empty());
        assert_eq!(idx.find(&h(3), 100).unwrap(), vec![Found { blob: b.clone(), offset: 0 }]);
        drop(idx);
        // Kept across a restart.
        let (idx, fresh) = ChunkIndex::open(&path).unwrap();
        assert!(!fresh && idx.has_blobs());
        assert_eq!(idx.blobs().unwrap(), 1);
        assert_eq!(idx.find(&h(4), 100).unwrap(), vec![Found { blob: b, offset: 100 }]);
    }

    #[test]
    fn an_index_that_cannot_be_read_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        std::fs::write(&path, b"this is not a database, and it is long enough to have a header........").unwrap();
        let (idx, fresh) = ChunkIndex::open(&path).unwrap();
        assert!(fresh, "a damaged index counts as new (it is filled again from the chunk lists)");
        idx.add(&h(100), &list(&[h(1)])).unwrap();
        assert_eq!(idx.find(&h(1), 100).unwrap().len(), 1);
    }
}
