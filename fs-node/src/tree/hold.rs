//! Holds of the tree's lock: while one lasts, every FUSE request that needs the tree
//! waits, so a long one is a stall of the mount. Owns the record of how long holds
//! lasted: each hold (`TreeGuard`, what `Tree::lock` returns) knows where it was taken,
//! and when it ends it is counted; one of `LONG_HOLD` or more is logged with its place.

use super::State;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A hold this long stalls the mount noticeably: counted, logged as a warning with the
/// place that took the lock.
pub const LONG_HOLD: Duration = Duration::from_millis(100);

/// Holds of a tenth of `LONG_HOLD` or more are logged at debug level (target `timing`),
/// to find what stalls the mount less than a warning's worth.
const NOTED_HOLD: Duration = Duration::from_millis(10);

/// The longest holds seen since the node started (what `/metrics` shows).
#[derive(Default)]
pub struct HoldRecord {
    long_holds: AtomicU64,
    /// The longest hold (ns) and where it was taken, together (holds of `NOTED_HOLD`
    /// or more are rare: a mutex costs nothing here).
    longest: Mutex<(u64, Option<&'static Location<'static>>)>,
}

/// What `HoldRecord` has seen, for `/metrics` and the status page.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct HoldReport {
    /// Holds of `LONG_HOLD` or more.
    pub long_holds: u64,
    pub longest_ns: u64,
}

impl HoldRecord {
    fn record(&self, at: &'static Location<'static>, held: Duration) {
        if held < NOTED_HOLD {
            return;
        }
        let ns = held.as_nanos().min(u64::MAX as u128) as u64;
        {
            let mut longest = self.longest.lock().unwrap_or_else(|p| p.into_inner());
            if longest.0 < ns {
                *longest = (ns, Some(at));
            }
        }
        if held >= LONG_HOLD {
            self.long_holds.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(held_ms = held.as_millis() as u64, at = %at, "the tree was locked this long: the mount waited meanwhile");
        } else {
            tracing::debug!(target: "timing", held_us = held.as_micros() as u64, at = %at, "long hold of the tree's lock");
        }
    }

    pub fn report(&self) -> HoldReport {
        HoldReport { long_holds: self.long_holds.load(Ordering::Relaxed), longest_ns: self.longest.lock().unwrap_or_else(|p| p.into_inner()).0 }
    }

    /// Where the longest hold so far was taken.
    pub fn longest_at(&self) -> Option<&'static Location<'static>> {
        self.longest.lock().unwrap_or_else(|p| p.into_inner()).1
    }
}

/// One hold of the tree's lock: the state, and where and when the hold began.
pub(super) struct TreeGuard<'a> {
    /// Always `Some` but in `drop`, which lets go of it before it records the hold.
    guard: Option<MutexGuard<'a, State>>,
    since: Instant,
    at: &'static Location<'static>,
    record: &'a HoldRecord,
}

impl<'a> TreeGuard<'a> {
    pub(super) fn new(guard: MutexGuard<'a, State>, at: &'static Location<'static>, record: &'a HoldRecord) -> Self {
        TreeGuard { guard: Some(guard), since: Instant::now(), at, record }
    }
}

impl Deref for TreeGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("a hold has its guard until dropped")
    }
}

impl DerefMut for TreeGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("a hold has its guard until dropped")
    }
}

impl Drop for TreeGuard<'_> {
    fn drop(&mut self) {
        let held = self.since.elapsed();
        drop(self.guard.take());
        self.record.record(self.at, held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_hold_is_counted_with_its_place_and_a_short_one_is_not() {
        let record = HoldRecord::default();
        record.record(Location::caller(), Duration::from_millis(3));
        assert_eq!(record.report().long_holds, 0);
        assert_eq!(record.report().longest_ns, 0);
        assert!(record.longest_at().is_none());

        let here = Location::caller();
        record.record(here, LONG_HOLD + Duration::from_millis(1));
        record.record(Location::caller(), NOTED_HOLD);
        let report = record.report();
        assert_eq!(report.long_holds, 1);
        assert_eq!(report.longest_ns, (LONG_HOLD + Duration::from_millis(1)).as_nanos() as u64);
        assert_eq!(record.longest_at(), Some(here), "the place of the longest hold, not of the last");
    }
}
