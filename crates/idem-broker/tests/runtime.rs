//! The consumer runtime against the in-process broker: every settlement rule of contract
//! section 6, checked from the broker's log of acks, nacks and dead letters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use idem::{
    Attempt, Backoff, Config, Executor, Key, MemoryStore, Namespace, State, Store, StoreError,
    StoreLayer, StoreOp,
};
use idem_broker::memory::{Event, MemoryBroker};
use idem_broker::{Consumer, KeyFrom, Message, Settings};
use tokio::sync::oneshot;

mod common;
use common::start;

fn msg(id: &str, payload: &str) -> Message {
    Message::new("q", payload.as_bytes().to_vec()).with_message_id(id)
}

fn ns() -> Namespace {
    Namespace::new("runtime-test").unwrap()
}

/// Polls `cond` until it holds, or panics after 10 s.
async fn until(what: &str, cond: impl FnMut() -> bool) {
    idem_testkit::until(10, what, cond).await;
}

fn count(log: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    log.iter().filter(|e| f(e)).count()
}

fn acked(log: &[Event], id: &str) -> usize {
    count(
        log,
        |e| matches!(e, Event::Acked { message_id: Some(m), .. } if m == id),
    )
}

/// A counting handler: how many times each payload ran.
#[derive(Clone, Default)]
struct Runs(Arc<parking_lot::Mutex<HashMap<String, usize>>>);

impl Runs {
    fn record(&self, m: &Message) {
        let p = String::from_utf8_lossy(m.payload()).into_owned();
        *self.0.lock().entry(p).or_default() += 1;
    }
    fn get(&self, payload: &str) -> usize {
        self.0.lock().get(payload).copied().unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.0.lock().values().sum()
    }
}

fn fast_retries() -> Config {
    Config::default()
        .retry_backoff(Backoff::new(
            Duration::from_millis(5),
            Duration::from_millis(20),
        ))
        .max_attempts(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_run_once_and_every_copy_is_acked() {
    let broker = MemoryBroker::new("q");
    for i in 0..50 {
        broker.publish(msg(&format!("m-{i}"), &format!("p-{i}")));
        // Producer retries: copies right behind and far behind the original.
        broker.publish(msg(&format!("m-{i}"), &format!("p-{i}")));
    }
    for i in 0..50 {
        broker.publish(msg(&format!("m-{i}"), &format!("p-{i}")));
    }
    let runs = Runs::default();
    let r = runs.clone();
    let consumer = Consumer::new(
        broker.source(),
        Executor::new(MemoryStore::new()),
        ns(),
        move |m: Message, _: Attempt| {
            let r = r.clone();
            async move {
                r.record(&m);
                Ok::<_, std::io::Error>(())
            }
        },
    )
    .batch_size(16);
    let (stats, running) = start(consumer);
    until("150 acks", || stats.snapshot().acked == 150).await;
    let snap = running.stop().await;
    assert_eq!(runs.total(), 50);
    assert!((0..50).all(|i| runs.get(&format!("p-{i}")) == 1));
    assert_eq!((snap.executed, snap.replayed, snap.acked), (50, 100, 150));
    let log = broker.log();
    assert!((0..50).all(|i| acked(&log, &format!("m-{i}")) == 3));
    // A copy in the same batch waits for the first copy's record; a copy in a concurrent batch
    // meets its claim in progress and comes back shortly: never a lease-long (30 s) nack.
    assert!(
        log.iter().all(|e| match e {
            Event::Nacked { delay, .. } => *delay < Duration::from_secs(1),
            _ => true,
        }),
        "{log:?}"
    );
    assert_eq!(count(&log, |e| matches!(e, Event::Unknown { .. })), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_progress_duplicates_are_nacked_with_delay_never_acked() {
    // Two consumers share a store; the first holds the key in a slow handler while the second
    // receives the duplicate.
    let store = Arc::new(MemoryStore::new());
    let first = MemoryBroker::new("a");
    let second = MemoryBroker::new("b");
    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let entered_tx = Arc::new(parking_lot::Mutex::new(Some(entered_tx)));
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let runs = Arc::new(AtomicUsize::new(0));
    let mk = |broker: &MemoryBroker| {
        let entered_tx = Arc::clone(&entered_tx);
        let release_rx = release_rx.clone();
        let runs = Arc::clone(&runs);
        Consumer::new(
            broker.source(),
            Executor::with_config(
                Arc::clone(&store),
                Config::default().lease(Duration::from_secs(5)),
            ),
            ns(),
            move |_m: Message, _: Attempt| {
                let entered_tx = Arc::clone(&entered_tx);
                let mut release_rx = release_rx.clone();
                let runs = Arc::clone(&runs);
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    if let Some(tx) = entered_tx.lock().take() {
                        let _ = tx.send(());
                    }
                    let _ = release_rx.wait_for(|go| *go).await;
                    Ok::<_, std::io::Error>("done".to_owned())
                }
            },
        )
    };
    let c1 = mk(&first);
    let c2 = mk(&second);
    let (s1, s2) = (c1.stats(), c2.stats());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let h1 = tokio::spawn(c1.run(shutdown(stopped.clone())));
    let h2 = tokio::spawn(c2.run(shutdown(stopped.clone())));

    first.publish(msg("dup", "payload"));
    entered_rx.await.unwrap();
    second.publish(msg("dup", "payload"));
    until("the duplicate to be nacked three times", || {
        s2.snapshot().retried >= 3
    })
    .await;
    let delays: Vec<Duration> = second
        .log()
        .into_iter()
        .map(|e| match e {
            Event::Nacked { message_id, delay } => {
                assert_eq!(message_id.as_deref(), Some("dup"));
                delay
            }
            other => panic!("expected only delayed nacks, got {other:?}"),
        })
        .collect();
    // A short first delay that grows with the delivery count, never past the 5 s lease, and
    // never an immediate requeue.
    assert!(delays[0] >= Duration::from_millis(100), "{delays:?}");
    assert!(delays.windows(2).all(|w| w[0] < w[1]), "{delays:?}");
    assert!(
        delays.iter().all(|d| *d <= Duration::from_secs(5)),
        "{delays:?}"
    );
    assert_eq!(acked(&second.log(), "dup"), 0);

    release_tx.send(true).unwrap();
    until("the first to ack", || s1.snapshot().acked == 1).await;
    stop.send(true).unwrap();
    h1.await.unwrap().unwrap();
    h2.await.unwrap().unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handlers_are_retried_then_dead_lettered() {
    let broker = MemoryBroker::new("q");
    broker.publish(msg("flaky", "flaky"));
    broker.publish(msg("poison", "poison"));
    let runs = Runs::default();
    let r = runs.clone();
    let consumer = Consumer::new(
        broker.source(),
        Executor::with_config(MemoryStore::new(), fast_retries()),
        ns(),
        move |m: Message, attempt: Attempt| {
            let r = r.clone();
            async move {
                r.record(&m);
                match &m.payload()[..] {
                    b"flaky" if attempt.number() < 2 => Err("flaky failure".to_owned()),
                    b"poison" => Err("always fails".to_owned()),
                    _ => Ok(()),
                }
            }
        },
    );
    let (stats, running) = start(consumer);
    until("settled", || {
        let s = stats.snapshot();
        s.acked == 1 && s.dead_lettered == 1
    })
    .await;
    running.stop().await;
    assert_eq!(runs.get("flaky"), 2);
    assert_eq!(runs.get("poison"), 3);
    let log = broker.log();
    let reason = log
        .iter()
        .find_map(|e| match e {
            Event::DeadLettered {
                message_id: Some(id),
                reason,
                ..
            } if id == "poison" => Some(reason.clone()),
            _ => None,
        })
        .expect("poison dead-lettered");
    assert!(
        reason.contains("attempt 3 of 3") && reason.contains("always fails"),
        "{reason}"
    );
    assert_eq!(acked(&log, "poison"), 0);
    assert_eq!(acked(&log, "flaky"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_the_reason() {
    let broker = MemoryBroker::new("q");
    broker.publish(Message::new("q", &b"no id"[..]));
    broker.publish(msg("", "empty id"));
    broker.publish(msg("same", "first payload"));
    broker.publish(msg("other", "x"));
    let runs = Runs::default();
    let r = runs.clone();
    let consumer = Consumer::new(
        broker.source(),
        Executor::new(MemoryStore::new()),
        ns(),
        move |m: Message, _: Attempt| {
            let r = r.clone();
            async move {
                r.record(&m);
                Ok::<_, std::io::Error>(())
            }
        },
    )
    .batch_size(1);
    let (stats, running) = start(consumer);
    until("first messages", || stats.snapshot().received == 4).await;
    until("settled", || stats.snapshot().acked == 2).await;
    // A reused id with another payload: a bug upstream, never a silent duplicate.
    broker.publish(msg("same", "second payload"));
    until("mismatch", || stats.snapshot().dead_lettered == 3).await;
    running.stop().await;
    let reasons: Vec<String> = broker
        .log()
        .into_iter()
        .filter_map(|e| match e {
            Event::DeadLettered { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    // Batches run concurrently: any order.
    for expected in ["no message id", "empty key id", "payload mismatch"] {
        assert!(reasons.iter().any(|r| r.contains(expected)), "{reasons:?}");
    }
    assert_eq!(runs.get("second payload"), 0);
    assert_eq!(runs.total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_acked_only_after_the_publish_is_confirmed() {
    let broker = MemoryBroker::new("q");
    broker.fail_dead_letters(true);
    broker.publish(Message::new("q", &b"no id"[..]));
    let consumer = Consumer::new(
        broker.source(),
        Executor::new(MemoryStore::new()),
        ns(),
        |_m: Message, _: Attempt| async { Ok::<_, std::io::Error>(()) },
    );
    let (stats, running) = start(consumer);
    until("a failed dead-letter", || {
        stats.snapshot().settle_errors == 1
    })
    .await;
    assert_eq!(
        broker.unacked(),
        1,
        "not acked while the dead-letter publish failed"
    );
    assert!(broker.log().is_empty());
    running.stop().await;
    // Closing the source gave it back to the broker; a new consumer dead-letters it for real.
    assert_eq!(broker.ready(), 1);
    broker.fail_dead_letters(false);
    let consumer = Consumer::new(
        broker.source(),
        Executor::new(MemoryStore::new()),
        ns(),
        |_m: Message, _: Attempt| async { Ok::<_, std::io::Error>(()) },
    );
    let (stats, running) = start(consumer);
    until("dead-lettered", || stats.snapshot().dead_lettered == 1).await;
    running.stop().await;
    assert!(matches!(&broker.log()[..], [Event::DeadLettered { .. }]));
}

/// A store that fails every operation while `down` is set.
struct Flaky {
    inner: MemoryStore,
    down: Arc<AtomicBool>,
}

impl StoreLayer for Flaky {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.inner
    }

    async fn around<T: Send>(
        &self,
        _op: StoreOp<'_>,
        call: impl Future<Output = Result<T, StoreError>> + Send,
    ) -> Result<T, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("test outage"));
        }
        call.await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_fails_closed_and_the_stream_resumes() {
    // Scenario 7 of docs/design.md (section 8): the store is down mid-stream. Nothing may be acked and no handler
    // may run without a claim; once the store is back every message is applied exactly once.
    let down = Arc::new(AtomicBool::new(true));
    let broker = MemoryBroker::new("q");
    for i in 0..20 {
        broker.publish(msg(&format!("m-{i}"), &format!("p-{i}")));
    }
    let runs = Runs::default();
    let r = runs.clone();
    let consumer = Consumer::new(
        broker.source(),
        Executor::new(Flaky {
            inner: MemoryStore::new(),
            down: Arc::clone(&down),
        }),
        ns(),
        move |m: Message, _: Attempt| {
            let r = r.clone();
            async move {
                r.record(&m);
                Ok::<_, std::io::Error>(())
            }
        },
    )
    .settings({
        let mut s = Settings::default();
        s.store_backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(50));
        s
    });
    let (stats, running) = start(consumer);
    until("store errors", || stats.snapshot().store_errors >= 3).await;
    assert_eq!(runs.total(), 0, "no handler ran without a claim");
    assert_eq!(
        stats.snapshot().acked,
        0,
        "nothing acked while the store is down"
    );
    assert_eq!(
        count(&broker.log(), |e| matches!(e, Event::Acked { .. })),
        0
    );
    down.store(false, Ordering::SeqCst);
    until("all acked", || stats.snapshot().acked == 20).await;
    running.stop().await;
    assert!((0..20).all(|i| runs.get(&format!("p-{i}")) == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handlers_are_released_and_retried() {
    let broker = MemoryBroker::new("q");
    broker.publish(msg("m", "p"));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let consumer = Consumer::new(
        broker.source(),
        Executor::with_config(MemoryStore::new(), fast_retries()),
        ns(),
        move |_m: Message, _: Attempt| {
            let c = Arc::clone(&c);
            async move {
                assert!(c.fetch_add(1, Ordering::SeqCst) > 0, "first call panics");
                Ok::<_, std::io::Error>(())
            }
        },
    );
    let (stats, running) = start(consumer);
    until("acked", || stats.snapshot().acked == 1).await;
    running.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(matches!(broker.log()[0], Event::Nacked { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_work_and_acks_it() {
    let broker = MemoryBroker::new("q");
    broker.publish(msg("slow", "slow"));
    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let entered_tx = Arc::new(parking_lot::Mutex::new(Some(entered_tx)));
    let consumer = Consumer::new(
        broker.source(),
        Executor::new(MemoryStore::new()),
        ns(),
        move |_m: Message, _: Attempt| {
            let entered_tx = Arc::clone(&entered_tx);
            async move {
                if let Some(tx) = entered_tx.lock().take() {
                    let _ = tx.send(());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, std::io::Error>(())
            }
        },
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(consumer.run(async {
        let _ = stopped.await;
    }));
    entered_rx.await.unwrap();
    stop.send(()).unwrap();
    // Published after shutdown began: not taken.
    broker.publish(msg("late", "late"));
    let snap = run.await.unwrap().unwrap();
    assert_eq!(snap.acked, 1);
    assert_eq!(acked(&broker.log(), "slow"), 1);
    assert_eq!(broker.ready(), 1);
    assert_eq!(broker.unacked(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_abandons_stuck_work_back_to_the_broker() {
    let broker = MemoryBroker::new("q");
    broker.publish(msg("stuck", "stuck"));
    let consumer = Consumer::new(
        broker.source(),
        Executor::new(MemoryStore::new()),
        ns(),
        |_m: Message, _: Attempt| async {
            std::future::pending::<()>().await;
            Ok::<_, std::io::Error>(())
        },
    )
    .shutdown_grace(Duration::from_millis(100));
    let (stats, running) = start(consumer);
    until("received", || stats.snapshot().received == 1).await;
    let snap = running.stop().await;
    assert_eq!(snap.acked, 0);
    // Requeued for another consumer, redelivery count raised.
    assert_eq!(broker.ready(), 1);
    assert!(broker.log().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_the_grace_releases_the_claims_of_stuck_handlers() {
    // The bug: shutdown past the grace aborted the stuck batch and left its claim in progress,
    // so the message's redelivery (to a restarted consumer, or another one) met "in progress"
    // and waited out the whole lease (30 s by default) before anyone could take it over. The
    // runtime now releases, fenced by the token, the claims of the handlers it abandons.
    let broker = MemoryBroker::new("q");
    broker.publish(msg("stuck", "stuck"));
    let exec = Executor::new(MemoryStore::new());
    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let entered_tx = Arc::new(parking_lot::Mutex::new(Some(entered_tx)));
    let consumer = Consumer::new(
        broker.source(),
        exec.clone(),
        ns(),
        move |_m: Message, _: Attempt| {
            let entered_tx = Arc::clone(&entered_tx);
            async move {
                if let Some(tx) = entered_tx.lock().take() {
                    let _ = tx.send(());
                }
                std::future::pending::<()>().await;
                Ok::<_, std::io::Error>(())
            }
        },
    )
    .shutdown_grace(Duration::from_millis(100));
    let (_, running) = start(consumer);
    entered_rx.await.unwrap();
    let snap = running.stop().await;
    assert_eq!(snap.acked, 0);
    let key = Key::new(ns(), "stuck").unwrap();
    let record = exec.store().get(&key).await.unwrap().unwrap();
    assert_eq!(record.state, State::Released, "{record:?}");

    // The redelivery runs at once, well within the 30 s lease.
    let runs = Runs::default();
    let r = runs.clone();
    let consumer = Consumer::new(
        broker.source(),
        exec.clone(),
        ns(),
        move |m: Message, _: Attempt| {
            let r = r.clone();
            async move {
                r.record(&m);
                Ok::<_, std::io::Error>(())
            }
        },
    );
    let (stats, running) = start(consumer);
    until("the redelivery to be acked", || stats.snapshot().acked == 1).await;
    running.stop().await;
    assert_eq!(runs.get("stuck"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_release_claims_that_completed() {
    // The release is fenced: a handler that finished before shutdown keeps its completed record,
    // even when another handler of the same batch is stuck and gets abandoned.
    let broker = MemoryBroker::new("q");
    broker.publish(msg("fast", "fast"));
    broker.publish(msg("stuck", "stuck"));
    let exec = Executor::new(MemoryStore::new());
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let consumer = Consumer::new(
        broker.source(),
        exec.clone(),
        ns(),
        move |m: Message, _: Attempt| {
            let d = Arc::clone(&d);
            async move {
                if m.message_id() == Some("stuck") {
                    std::future::pending::<()>().await;
                }
                d.store(true, Ordering::SeqCst);
                Ok::<_, std::io::Error>(())
            }
        },
    )
    .batch_size(2)
    .shutdown_grace(Duration::from_millis(100));
    let get = |id: &'static str| {
        let exec = exec.clone();
        async move {
            let key = Key::new(ns(), id).unwrap();
            exec.store().get(&key).await.unwrap().map(|r| r.state)
        }
    };
    let (stats, running) = start(consumer);
    until("both received", || stats.snapshot().received == 2).await;
    until("the fast handler", || done.load(Ordering::SeqCst)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get("fast").await != Some(State::Completed) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fast never completed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running.stop().await;
    assert_eq!(get("fast").await, Some(State::Completed));
    assert_eq!(get("stuck").await, Some(State::Released));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_can_come_from_the_payload() {
    let broker = MemoryBroker::new("q");
    for _ in 0..3 {
        broker.publish(Message::new("q", &br#"{"order": 7, "op": "refund"}"#[..]));
    }
    let runs = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&runs);
    let consumer = Consumer::new(
        broker.source(),
        Executor::new(MemoryStore::new()),
        ns(),
        move |_m: Message, attempt: Attempt| {
            let r = Arc::clone(&r);
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(attempt.idempotency_key())
            }
        },
    )
    .key(KeyFrom::Json("/order".into()));
    let (stats, running) = start(consumer);
    until("acked", || stats.snapshot().acked == 3).await;
    running.stop().await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
