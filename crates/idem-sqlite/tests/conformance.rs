//! The conformance suite against `SqliteStore`, on a manual clock, in memory and on disk.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use idem::ManualClock;
use idem_conformance::ManualHarness;
use idem_sqlite::{SqliteStore, Synchronous};

async fn in_memory() -> ManualHarness<SqliteStore> {
    let clock = ManualClock::new();
    let store = SqliteStore::memory_builder()
        .clock(clock.clone())
        .open()
        .expect("open in-memory SQLite");
    ManualHarness::new(store, clock)
}

mod memory {
    idem_conformance::conformance_tests!(super::in_memory);
}

async fn on_disk() -> ManualHarness<SqliteStore> {
    on_disk_with(Synchronous::Normal)
}

fn on_disk_with(level: Synchronous) -> ManualHarness<SqliteStore> {
    let clock = ManualClock::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::builder(dir.path().join("idem.db"))
        .synchronous(level)
        .clock(clock.clone())
        .open()
        .expect("open SQLite file");
    // The directory must outlive the test; the OS temp dir is cleaned by the system.
    std::mem::forget(dir);
    ManualHarness::new(store, clock)
}

mod disk {
    idem_conformance::conformance_tests!(super::on_disk);
}

// `FULL` sends every operation through the writer thread (no inline fast path).
async fn on_disk_full() -> ManualHarness<SqliteStore> {
    on_disk_with(Synchronous::Full)
}

mod disk_full {
    idem_conformance::conformance_tests!(super::on_disk_full);
}
