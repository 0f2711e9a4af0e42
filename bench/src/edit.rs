//! A one-byte edit in the middle of a 256 MiB file (issue 15): how many bytes move from A
//! to B, and how long until B reads the changed byte (the whole file is compared after,
//! untimed). Ours counts the content bytes A's peer server sent; Syncthing its own
//! connection's bytes A → B.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Edit {
    /// The open, one-byte write and close on A.
    pub write_close: Duration,
    pub until_readable: Duration,
    pub bytes_moved: u64,
}

/// `base` (already on both sides at `name`) gets one byte flipped at its middle on `a`.
pub fn run(a: &Path, b: &Path, name: &str, base: &mut [u8], sent: &dyn Fn() -> u64) -> Edit {
    let at = (base.len() / 2 + 12_345) as u64;
    base[at as usize] ^= 0x5a;
    let before = sent();
    let t = Instant::now();
    let f = std::fs::File::options().write(true).open(a.join(name)).unwrap();
    f.write_all_at(&[base[at as usize]], at).unwrap();
    drop(f);
    let write_close = t.elapsed();
    let want = base[at as usize];
    let mut byte = [0u8; 1];
    loop {
        if let Ok(f) = std::fs::File::open(b.join(name)) {
            if f.read_exact_at(&mut byte, at).is_ok() && byte[0] == want {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(120), "the edit did not reach {}", b.display());
        std::thread::sleep(Duration::from_micros(500));
    }
    let until_readable = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read(b.join(name)).ok().as_deref() != Some(&*base) {
        assert!(Instant::now() < deadline, "B's file does not equal A's after the edit");
        std::thread::sleep(Duration::from_millis(50));
    }
    Edit { write_close, until_readable, bytes_moved: sent() - before }
}
