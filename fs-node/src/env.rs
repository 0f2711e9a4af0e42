//! Where a node gets the time and new message ids: the system clock and random UUIDs in
//! a real node, a virtual clock and ids drawn from the seed in the simulator (`sim/`),
//! so that a run replays exactly.

use wire::MessageId;

pub trait Env: Send + Sync {
    /// Nanoseconds since the Unix epoch.
    fn now_ns(&self) -> i64;
    fn new_id(&self) -> MessageId;
    /// A past bug put back, to show that the simulator finds it (`sim --bug`). Only the
    /// simulator's environment ever returns one.
    fn past_bug(&self) -> Option<PastBug> {
        None
    }
    /// A disk fault to inject into the next commit of the node database (the simulator
    /// draws them from its seed; a real node never has one).
    fn persist_fault(&self) -> Option<PersistFault> {
        None
    }
}

/// A disk fault on a commit of the node database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PersistFault {
    /// The disk failed (`EIO`).
    Io,
    /// The disk is full (`ENOSPC`).
    NoSpace,
}

/// Bugs the node once had, which the simulator must be able to find again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PastBug {
    /// A file renamed while being written, the node killed before the last close, was
    /// never sent after the restart: the node kept the renamed file, the others the old
    /// one (found by the simulator, seed 407).
    AbandonedWork,
    /// After an own change was decided, a later change of the path that no longer
    /// followed a queued one went out based on the revision from before the decision:
    /// a conflict with itself.
    DecidedBase,
}

/// The system clock and random (v4 UUID) ids.
pub struct SystemEnv;

impl Env for SystemEnv {
    fn now_ns(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
    }
    fn new_id(&self) -> MessageId {
        // fast-rng: a user-space generator, seeded from the OS (no system call per id).
        MessageId::try_from(uuid::Uuid::new_v4().to_string()).expect("uuids are valid message ids")
    }
}
