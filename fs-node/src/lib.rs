//! A sync node: a FUSE mount over a local tree and content store, a peer HTTP server that
//! serves contents by hash, and a broker link to the manager.

pub mod chunk_index;
pub mod chunks;
pub mod db;
pub mod engine;
pub mod env;
pub mod fetch;
pub mod fs;
pub mod journal;
pub mod leaves;
pub mod link;
pub mod metrics;
pub mod node;
pub mod patched;
pub mod peer;
pub mod puller;
pub mod redo;
pub mod small;
pub mod status;
pub mod store;
pub mod stream;
pub mod tree;

/// Test data shared by the unit tests of several modules.
#[cfg(test)]
pub(crate) mod test_data {
    /// `len` bytes that repeat nowhere (xorshift from `seed`): chunk boundaries as in real
    /// data, the same for the same seed.
    pub fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}
