//! The harness on small workloads: every mode keeps its promise under the default faults, the
//! checks catch a broken handler, and a fault that is on reaches the consumers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use idem::{Backoff, Config, MemoryStore};
use idem_verify::{
    Fault, FaultPlan, Harness, MemoryLedger, ModeName, PerFault, RunReport, Sabotage, SqliteLedger,
    Workload, check, default_rates,
};

fn harness(seed: u64, messages: u32, rates: PerFault<f64>) -> Harness {
    let mut h = Harness::new(
        Workload::generate(seed, messages, 100),
        FaultPlan::new(seed, rates),
    );
    h.timeout = Duration::from_secs(120);
    h
}

fn only(fault: Fault, rate: f64) -> PerFault<f64> {
    let mut rates = PerFault::default();
    rates.set(fault, rate);
    rates
}

fn assert_ok(run: &RunReport) {
    let verdict = check(run);
    assert!(verdict.ok, "{}: {run:?}", verdict.detail);
}

async fn store_mode(h: &Harness) -> RunReport {
    h.store(MemoryStore::new(), MemoryLedger::new(&h.workload), |s, _| s)
        .await
        .unwrap()
}

fn sqlite_ledger(h: &Harness, dir: &tempfile::TempDir) -> SqliteLedger {
    let store = idem_sqlite::SqliteStore::open(dir.path().join("verify.db")).unwrap();
    let config = Config::default()
        .max_attempts(0)
        .retry_backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
        ));
    SqliteLedger::new(store, &h.run_id, config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_keeps_its_promise_under_the_default_faults() {
    // Higher rates than the defaults, so that a small run meets every fault.
    let mut rates = default_rates();
    for fault in [
        Fault::CrashBefore,
        Fault::CrashAfterEffect,
        Fault::CrashAfterComplete,
    ] {
        rates.set(fault, 0.005);
    }
    rates.set(Fault::DupPublish, 0.03);
    rates.set(Fault::LostAck, 0.03);
    rates.set(Fault::Slow, 0.005);
    let h = harness(7, 2_000, rates);
    let naive = h.naive(MemoryLedger::new(&h.workload)).await.unwrap();
    assert_ok(&naive);
    assert!(naive.duplicate_effects > 0);
    let store = store_mode(&h).await;
    assert_ok(&store);
    assert!(store.consumer_restarts > 0, "{store:?}");
    assert!(store.outcomes.get("replayed").copied().unwrap_or(0) > 0);
    let dir = tempfile::tempdir().unwrap();
    let tx = h.transactional(sqlite_ledger(&h, &dir)).await.unwrap();
    assert_ok(&tx);
    assert_eq!(tx.mode, ModeName::Transactional);
    assert_eq!((tx.duplicate_effects, tx.lost), (0, 0));
    assert!(tx.consumer_restarts > 0, "{tx:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_acks_are_replayed_from_the_record() {
    let h = harness(3, 1_000, only(Fault::LostAck, 0.05));
    let store = store_mode(&h).await;
    assert_ok(&store);
    let lost = store.faults["lost_ack"];
    assert!(lost > 20, "{store:?}");
    assert_eq!(
        store.outcomes.get("replayed").copied(),
        Some(lost),
        "{store:?}"
    );
    assert_eq!(store.duplicate_effects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_after_the_effect_are_the_window_and_nothing_else_is() {
    let h = harness(5, 1_000, only(Fault::CrashAfterEffect, 0.01));
    let store = store_mode(&h).await;
    assert_ok(&store);
    assert!(store.faults["crash_after_effect"] > 3, "{store:?}");
    assert_eq!(store.consumer_restarts, store.faults["crash_after_effect"]);
    assert!(store.window.crashes > 0, "{store:?}");
    assert_eq!(store.duplicates_outside_windows, 0);
    let dir = tempfile::tempdir().unwrap();
    let tx = h.transactional(sqlite_ledger(&h, &dir)).await.unwrap();
    assert_ok(&tx);
    assert_eq!((tx.effects, tx.window_events), (1_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_applies_twice_fails_the_check() {
    let mut h = harness(11, 500, only(Fault::DupPublish, 0.05));
    h.sabotage = Some(Sabotage::DoubleApply);
    let store = store_mode(&h).await;
    assert!(!check(&store).ok);
    assert!(store.duplicate_effects >= 10, "{store:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_injected_by_the_caller_are_counted_and_fail_closed() {
    let h = harness(13, 500, only(Fault::StoreError, 0.05));
    let injected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::clone(&injected);
    let store = h
        .store(
            MemoryStore::new(),
            MemoryLedger::new(&h.workload),
            move |s, counters| {
                // The caller's wrapper decides; the harness only hands it the counters.
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
                counters.hit(Fault::StoreError);
                s
            },
        )
        .await
        .unwrap();
    assert!(injected.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(store.faults["store_error"], 1);
    assert_ok(&store);
    // Transactional mode's store errors are the harness's own: before or after the call.
    let dir = tempfile::tempdir().unwrap();
    let tx = h.transactional(sqlite_ledger(&h, &dir)).await.unwrap();
    assert_ok(&tx);
    assert!(tx.faults["store_error"] > 10, "{tx:?}");
    assert!(tx.outcomes.get("store_error").copied().unwrap_or(0) > 0);
}
