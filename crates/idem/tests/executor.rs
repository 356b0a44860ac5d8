//! The executor against the acceptance scenarios of docs/design.md (section 8), on `MemoryStore`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use idem::{
    Claim, Completion, Config, Disposition, Executor, Heartbeat, Key, ManualClock, MemoryStore,
    Namespace, OnInProgress, Outcome, State, Store, StoreError, StoreErrorKind, StoreLayer,
    StoreOp, WriteOutcome,
};

fn key(id: &str) -> Key {
    Namespace::new("exec").unwrap().key(id).unwrap()
}

type Res<T> = Result<T, std::io::Error>;

fn boom() -> std::io::Error {
    std::io::Error::other("boom")
}

/// Scenario 1: the same message twice: the handler runs once, the second gets the stored result.
#[tokio::test]
async fn sequential_duplicate_runs_once_and_replays() {
    let exec = Executor::new(MemoryStore::new());
    let calls = AtomicU32::new(0);
    for delivery in 0..3 {
        let outcome = exec
            .run(key("m1"), b"payload", |attempt| {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                async move { Res::Ok(format!("run {n} as {}", attempt.idempotency_key())) }
            })
            .await
            .unwrap();
        assert_eq!(outcome.disposition(), Disposition::Ack);
        let expected_kind = if delivery == 0 {
            "executed"
        } else {
            "replayed"
        };
        assert_eq!(outcome.kind(), expected_kind);
        assert_eq!(outcome.into_value().unwrap(), "run 1 as exec:m1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Scenario 2: 32 consumers at once: exactly one runs the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_the_handler_once() {
    let exec = Executor::new(MemoryStore::new());
    let calls = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (exec, calls, barrier) = (exec.clone(), calls.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            exec.run(key("hot"), b"p", |_| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Res::Ok(())
            })
            .await
            .unwrap()
            .kind()
        }));
    }
    let mut kinds = Vec::new();
    for t in tasks {
        kinds.push(t.await.unwrap());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "executed").count(), 1);
    assert!(
        kinds
            .iter()
            .all(|k| ["executed", "in_progress", "replayed"].contains(k))
    );
}

/// Scenario 3: a crash mid-handler; the lease expires; the redelivery takes over with a new
/// token; the old owner's late complete is refused and the new result stays.
#[tokio::test]
async fn takeover_after_a_crash_refuses_the_late_owner() {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    let exec = Executor::with_config(
        store.clone(),
        Config::default().lease(Duration::from_secs(30)),
    );
    // The first consumer claims and "crashes" (never completes).
    let crashed = exec.claim_request(key("m1"), idem::Fingerprint::of(b"p"));
    assert!(matches!(
        store.claim(&crashed).await.unwrap(),
        Claim::Acquired(_)
    ));
    // A redelivery before the lease ends is told to come back later, not acked.
    let early = exec
        .run(key("m1"), b"p", |_| async { Res::Ok(()) })
        .await
        .unwrap();
    assert!(matches!(early.disposition(), Disposition::Retry { .. }));
    clock.advance(Duration::from_secs(31));
    let outcome = exec
        .run(key("m1"), b"p", |attempt| async move {
            assert_eq!(attempt.acquisition(), idem::Acquisition::Takeover);
            assert_eq!(attempt.number(), 2);
            Res::Ok("new".to_owned())
        })
        .await
        .unwrap();
    assert!(outcome.is_executed());
    let late = Completion::new(key("m1"), crashed.token, bytes::Bytes::from_static(b"old"));
    assert_eq!(
        store.complete(&late).await.unwrap(),
        WriteOutcome::LeaseLost
    );
    let rec = store.get(&key("m1")).await.unwrap().unwrap();
    assert_eq!(rec.result.as_deref(), Some(&b"new"[..]));
}

/// Scenario 4: a failing handler is released and retried; after max attempts the message is
/// dead-lettered with its reason, and later deliveries are too, without running the handler.
#[tokio::test]
async fn failures_are_retried_then_dead_lettered() {
    let exec = Executor::with_config(MemoryStore::new(), Config::default().max_attempts(3));
    let calls = AtomicU32::new(0);
    let mut dispositions = Vec::new();
    for _ in 0..5 {
        let outcome: Outcome<(), _> = exec
            .run(key("poison"), b"p", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(boom()) }
            })
            .await
            .unwrap();
        dispositions.push(outcome.disposition());
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the handler runs max_attempts times"
    );
    assert!(matches!(dispositions[0], Disposition::Retry { .. }));
    assert!(matches!(dispositions[1], Disposition::Retry { .. }));
    match &dispositions[2] {
        Disposition::DeadLetter { reason } => {
            assert!(reason.contains("attempt 3 of 3 failed: boom"), "{reason}")
        }
        other => panic!("third failure must dead-letter, got {other:?}"),
    }
    assert!(matches!(dispositions[3], Disposition::DeadLetter { .. }));
    let rec = exec.store().get(&key("poison")).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts), (State::Failed, 3));
}

/// A handler that fails once and then succeeds is executed on the retry.
#[tokio::test]
async fn a_released_key_runs_again_and_succeeds() {
    let exec = Executor::new(MemoryStore::new());
    let first: Outcome<(), _> = exec
        .run(key("m"), b"p", |_| async { Err(boom()) })
        .await
        .unwrap();
    match first {
        Outcome::Released {
            attempt: 1,
            retry_after,
            ..
        } => assert!(retry_after > Duration::ZERO),
        other => panic!("expected Released, got {other:?}"),
    }
    let second = exec
        .run(key("m"), b"p", |a| async move { Res::Ok(a.number()) })
        .await
        .unwrap();
    assert_eq!(second.into_value(), Some(2));
}

/// Scenario 5: the same key with another payload is a Mismatch; the handler does not run.
#[tokio::test]
async fn payload_mismatch_is_dead_lettered_without_running() {
    let exec = Executor::new(MemoryStore::new());
    let _ = exec
        .run(key("m"), b"amount=10", |_| async { Res::Ok(()) })
        .await
        .unwrap();
    let ran = AtomicU32::new(0);
    let outcome = exec
        .run(key("m"), b"amount=99", |_| {
            ran.fetch_add(1, Ordering::SeqCst);
            async { Res::Ok(()) }
        })
        .await
        .unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    match outcome.disposition() {
        Disposition::DeadLetter { reason } => {
            assert!(reason.contains("payload mismatch"), "{reason}")
        }
        other => panic!("expected DeadLetter, got {other:?}"),
    }
}

/// Scenario 6: after retention the key is processed again, and this is visible to the handler.
#[tokio::test]
async fn retention_expiry_processes_again() {
    let clock = ManualClock::new();
    let exec = Executor::with_config(
        MemoryStore::with_clock(clock.clone()),
        Config::default().retention(Duration::from_secs(60)),
    );
    let run = |exec: Executor<MemoryStore>| async move {
        exec.run(key("m"), b"p", |a| async move {
            Res::Ok(format!("{:?}", a.acquisition()))
        })
        .await
        .unwrap()
    };
    assert!(run(exec.clone()).await.is_executed());
    assert!(run(exec.clone()).await.is_replayed());
    clock.advance(Duration::from_secs(61));
    let again = run(exec.clone()).await;
    assert_eq!(again.into_value().as_deref(), Some("Reprocess"));
}

/// `WaitForResult`: a duplicate arriving while the first run is in progress waits and replays
/// its result instead of being told to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_result_replays_the_first_run() {
    let exec = Executor::with_config(
        MemoryStore::new(),
        Config::default().on_in_progress(OnInProgress::WaitForResult(Duration::from_secs(5))),
    );
    let first = {
        let exec = exec.clone();
        tokio::spawn(async move {
            exec.run(key("m"), b"p", |_| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Res::Ok("first".to_owned())
            })
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = exec
        .run(key("m"), b"p", |_| async { Res::Ok("second".to_owned()) })
        .await
        .unwrap();
    assert!(second.is_replayed());
    assert_eq!(second.into_value().as_deref(), Some("first"));
    assert!(first.await.unwrap().is_executed());
}

/// The heartbeat keeps a long handler's lease: a duplicate during it is in progress, not a
/// takeover. Without the heartbeat, the same timing gives a takeover and the first run's
/// completion is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_keeps_a_long_handler_alive() {
    for heartbeat in [Heartbeat::Auto, Heartbeat::Off] {
        let exec = Executor::with_config(
            MemoryStore::new(),
            Config::default()
                .lease(Duration::from_millis(300))
                .heartbeat(heartbeat),
        );
        let long = {
            let exec = exec.clone();
            tokio::spawn(async move {
                exec.run(key("long"), b"p", |_| async {
                    tokio::time::sleep(Duration::from_millis(900)).await;
                    Res::Ok("long".to_owned())
                })
                .await
                .unwrap()
            })
        };
        tokio::time::sleep(Duration::from_millis(600)).await;
        let dup = exec
            .run(key("long"), b"p", |_| async { Res::Ok("dup".to_owned()) })
            .await
            .unwrap();
        let first = long.await.unwrap();
        match heartbeat {
            Heartbeat::Auto => {
                assert_eq!(
                    dup.kind(),
                    "in_progress",
                    "the heartbeat must keep the lease"
                );
                assert!(first.is_executed());
            }
            _ => {
                assert_eq!(
                    dup.kind(),
                    "executed",
                    "without a heartbeat the lease expires"
                );
                assert_eq!(
                    first.kind(),
                    "lease_lost",
                    "the late owner must not report success"
                );
                assert!(matches!(first.disposition(), Disposition::Retry { .. }));
            }
        }
    }
}

/// When an extend finds the lease lost (an operator evicted the key), the handler is told and
/// its result is not reported as a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_lease_is_signalled_to_the_handler() {
    let exec = Executor::with_config(
        MemoryStore::new(),
        Config::default().lease(Duration::from_millis(150)),
    );
    let store = exec.store().clone();
    let evictor = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(store.evict(&key("m")).await.unwrap());
    });
    let outcome = exec
        .run(key("m"), b"p", |attempt| async move {
            tokio::time::timeout(Duration::from_secs(5), attempt.lease_lost())
                .await
                .expect("the handler must hear that its lease is lost");
            assert!(attempt.is_lease_lost());
            Res::Ok(())
        })
        .await
        .unwrap();
    evictor.await.unwrap();
    assert_eq!(outcome.kind(), "lease_lost");
    assert!(
        exec.store().get(&key("m")).await.unwrap().is_none(),
        "nothing may be recorded"
    );
}

/// A result over the store's limit: the effect happened and cannot be recorded, so the key is
/// failed (dead-lettered) rather than released to run again.
#[tokio::test]
async fn oversized_result_fails_the_key_instead_of_rerunning() {
    let exec = Executor::new(MemoryStore::new().max_result_bytes(8));
    let calls = AtomicU32::new(0);
    for _ in 0..2 {
        let outcome = exec
            .run(key("big"), b"p", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Res::Ok("more than eight bytes".to_owned()) }
            })
            .await
            .unwrap();
        match outcome.disposition() {
            Disposition::DeadLetter { reason } => assert!(reason.contains("over"), "{reason}"),
            other => panic!("expected DeadLetter, got {other:?}"),
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the handler must not run again"
    );
}

/// A store that fails a set number of times per operation, then delegates.
#[derive(Clone)]
struct Flaky {
    inner: MemoryStore,
    claim_failures: Arc<AtomicUsize>,
    complete_failures: Arc<AtomicUsize>,
}

fn take(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

fn down() -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, "connection refused (test)")
}

impl StoreLayer for Flaky {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.inner
    }

    fn around<T: Send>(
        &self,
        op: StoreOp<'_>,
        call: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> impl Future<Output = Result<T, StoreError>> + Send {
        let fails = match op {
            StoreOp::Claim(_) | StoreOp::ClaimMany(_) => take(&self.claim_failures),
            StoreOp::Complete(_) | StoreOp::CompleteMany(_) => take(&self.complete_failures),
            _ => false,
        };
        async move { if fails { Err(down()) } else { call.await } }
    }
}

/// Scenario 7 (store side): with the store down, the handler does not run and nothing may be
/// acked; once it is back, the message is processed once.
#[tokio::test]
async fn store_outage_fails_closed() {
    let flaky = Flaky {
        inner: MemoryStore::new(),
        claim_failures: Arc::new(AtomicUsize::new(2)),
        complete_failures: Arc::new(AtomicUsize::new(0)),
    };
    let exec = Executor::new(flaky);
    let calls = AtomicU32::new(0);
    for delivery in 0..4 {
        let result = exec
            .run(key("m"), b"p", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Res::Ok(()) }
            })
            .await;
        match delivery {
            0 | 1 => {
                let err = result.expect_err("a down store must fail closed");
                assert!(err.is_transient(), "{err}");
                assert_eq!(
                    calls.load(Ordering::SeqCst),
                    0,
                    "no handler without a claim"
                );
            }
            2 => assert!(result.unwrap().is_executed()),
            _ => assert!(result.unwrap().is_replayed()),
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Transient errors on `complete` are retried (the effect has happened; every retry narrows the
/// window), so a short blip still ends in Executed.
#[tokio::test]
async fn transient_complete_errors_are_retried() {
    let flaky = Flaky {
        inner: MemoryStore::new(),
        claim_failures: Arc::new(AtomicUsize::new(0)),
        complete_failures: Arc::new(AtomicUsize::new(3)),
    };
    let exec = Executor::new(flaky.clone());
    let outcome = exec
        .run(key("m"), b"p", |_| async { Res::Ok(()) })
        .await
        .unwrap();
    assert!(outcome.is_executed());
    assert_eq!(flaky.complete_failures.load(Ordering::SeqCst), 0);
}

/// `run_batch` gives the same outcomes as `run` one by one, in input order.
#[tokio::test]
async fn run_batch_equals_run() {
    let exec = Executor::with_config(MemoryStore::new(), Config::default().max_attempts(1));
    // Pre-state: "done" completed, "bad" with another payload.
    let _ = exec
        .run(key("done"), b"p", |_| async { Res::Ok(7u8.to_string()) })
        .await
        .unwrap();
    let items: Vec<(Key, idem::Fingerprint)> = ["new", "done", "fails", "new", "done"]
        .iter()
        .map(|id| (key(id), idem::Fingerprint::of(b"p")))
        .collect();
    let outcomes = exec
        .run_batch(items, |i, attempt| async move {
            if attempt.key().id() == "fails" {
                Err(boom())
            } else {
                Res::Ok(format!("item {i}"))
            }
        })
        .await
        .unwrap();
    let kinds: Vec<_> = outcomes
        .iter()
        .map(|o| o.as_ref().unwrap().kind())
        .collect();
    assert_eq!(
        kinds,
        [
            "executed",
            "replayed",
            "exhausted",
            "in_progress",
            "replayed"
        ]
    );
    let values: Vec<_> = outcomes
        .into_iter()
        .map(|o| o.unwrap().into_value())
        .collect();
    assert_eq!(values[0].as_deref(), Some("item 0"));
    assert_eq!(values[1].as_deref(), Some("7"));
    assert_eq!(
        exec.store()
            .get(&key("new"))
            .await
            .unwrap()
            .unwrap()
            .result
            .as_deref(),
        Some(&b"item 0"[..])
    );
}

/// The counters an operator watches move with the outcomes.
#[tokio::test]
async fn metrics_count_outcomes() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let clock = ManualClock::new();
    let exec = metrics::with_local_recorder(&recorder, || {
        Executor::with_config(
            MemoryStore::with_clock(clock.clone()),
            Config::default()
                .name("payments")
                .lease(Duration::from_secs(1)),
        )
    });
    let store = exec.store().clone();
    let _ = exec
        .run(key("a"), b"p", |_| async { Res::Ok(()) })
        .await
        .unwrap();
    let _ = exec
        .run(key("a"), b"p", |_| async { Res::Ok(()) })
        .await
        .unwrap();
    let _ = exec
        .run(key("a"), b"other", |_| async { Res::Ok(()) })
        .await
        .unwrap();
    let stuck = exec.claim_request(key("b"), idem::Fingerprint::of(b"p"));
    let _ = store.claim(&stuck).await.unwrap();
    clock.advance(Duration::from_secs(2));
    let _ = exec
        .run(key("b"), b"p", |_| async { Res::Ok(()) })
        .await
        .unwrap();

    let counters: std::collections::HashMap<String, u64> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v)| match v {
            metrics_util::debugging::DebugValue::Counter(n) => {
                let key = k.key();
                assert!(
                    key.labels()
                        .any(|l| l.key() == "executor" && l.value() == "payments")
                );
                Some((key.name().to_owned(), n))
            }
            _ => None,
        })
        .collect();
    assert_eq!(counters["idem_executed_total"], 2);
    assert_eq!(counters["idem_replayed_total"], 1);
    assert_eq!(counters["idem_mismatches_total"], 1);
    assert_eq!(counters["idem_takeovers_total"], 1);
    assert_eq!(counters["idem_lease_lost_total"], 0);
}

/// In a batch, a slow handler must not hold back the completion of fast ones: until a result is
/// durable, a crash makes the redelivery run its handler again (store mode's window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_completions_do_not_wait_for_the_slowest_handler() {
    let store = Arc::new(MemoryStore::new());
    let exec = Executor::new(Arc::clone(&store));
    let (release, released) = tokio::sync::watch::channel(false);
    let items = vec![
        (key("fast"), idem::Fingerprint::of(b"f")),
        (key("slow"), idem::Fingerprint::of(b"s")),
    ];
    let batch = tokio::spawn({
        let exec = exec.clone();
        async move {
            exec.run_batch(items, move |i, _| {
                let mut released = released.clone();
                async move {
                    if i == 1 {
                        let _ = released.wait_for(|r| *r).await;
                    }
                    Res::Ok(())
                }
            })
            .await
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let fast = store.get(&key("fast")).await.unwrap();
        if fast.is_some_and(|r| r.state == State::Completed) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fast item not completed while slow runs"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let slow = store.get(&key("slow")).await.unwrap().unwrap();
    assert_eq!(slow.state, State::InProgress);
    release.send(true).unwrap();
    let outcomes = batch.await.unwrap().unwrap();
    assert!(outcomes.iter().all(|o| o.as_ref().unwrap().is_executed()));
}
