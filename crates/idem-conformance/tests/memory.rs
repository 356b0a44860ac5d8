//! The conformance suite against `MemoryStore`, on a manual clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem::{ManualClock, MemoryStore};
use idem_conformance::ManualHarness;

async fn memory() -> ManualHarness<MemoryStore> {
    let clock = ManualClock::new();
    ManualHarness::new(MemoryStore::with_clock(clock.clone()), clock)
}

idem_conformance::conformance_tests!(memory);
