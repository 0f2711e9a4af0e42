//! Where a node gets the time and new message ids: the system clock and random UUIDs in
//! a real node, a virtual clock and ids drawn from the seed in the simulator (`sim/`),
//! so that a run replays exactly.

use wire::MessageId;

pub trait Env: Send + Sync {
    /// Nanoseconds since the Unix epoch.
    fn now_ns(&self) -> i64;
    fn new_id(&self) -> MessageId;
}

/// The system clock and random (v4 UUID) ids.
pub struct SystemEnv;

impl Env for SystemEnv {
    fn now_ns(&self) -> i64 {
        crate::tree::now_ns()
    }
    fn new_id(&self) -> MessageId {
        uuid::Uuid::new_v4().to_string().parse().expect("uuids are valid message ids")
    }
}
