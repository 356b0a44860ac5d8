//! The transactional suite: the checks every [`Transactional`] store must pass, stamped per
//! store with [`transactional_tests!`](crate::transactional_tests).
//!
//! The handler's business write is the harness's [`TxHarness::write_effect`] (a row in a table
//! of the harness's own), so every check can count, after the fact, which effects committed:
//! the point of transactional mode is that an effect commits exactly when its record does.

use std::future::Future;
use std::time::Duration;

use idem::{Config, Fingerprint, Key, Namespace, Outcome, State, Store, Transactional, TxFuture};

use crate::unique_namespace;

/// What a transactional check needs from the store under test.
pub trait TxHarness: Send + Sync + 'static {
    /// The store under test.
    type Store: Transactional + Store + Clone;

    /// The store (clones share records and the effects table).
    fn store(&self) -> Self::Store;

    /// The handler's business write in the open transaction: one effect row for `id`.
    fn write_effect(
        tx: &mut <Self::Store as Transactional>::Tx,
        id: String,
    ) -> TxFuture<'_, (), String>;

    /// How many effects of `id` are committed.
    fn effects(&self, id: &str) -> impl Future<Output = u64> + Send;

    /// The time unit of the retention check (the store's clock is a real one).
    fn unit(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// A fresh namespace no other check uses.
    fn namespace(&self) -> Namespace {
        unique_namespace()
    }
}

fn key(ns: &Namespace, id: &str) -> Key {
    ns.key(id)
        .unwrap_or_else(|e| panic!("test key {id:?} is invalid: {e}"))
}

/// The effect id of a key: unique across checks and runs.
fn effect_id(key: &Key) -> String {
    key.to_string()
}

fn fp(payload: &str) -> Fingerprint {
    Fingerprint::of(payload.as_bytes())
}

/// Runs one delivery whose handler writes its effect and then answers `answer`.
async fn deliver<H: TxHarness>(
    h: &H,
    key: &Key,
    payload: &str,
    config: &Config,
    answer: Result<String, String>,
) -> Outcome<String, String> {
    let id = effect_id(key);
    h.store()
        .run_transactional(key, fp(payload), config, move |tx| {
            Box::pin(async move {
                H::write_effect(tx, id).await?;
                answer
            })
        })
        .await
        .unwrap_or_else(|e| panic!("transactional run of {key} failed: {e}"))
}

/// A duplicate delivered after the first committed replays its result; one effect.
pub async fn tx_duplicate_is_replayed<H: TxHarness>(h: &H) {
    let ns = h.namespace();
    let k = key(&ns, "dup");
    let config = Config::default();
    let first = deliver(h, &k, "p", &config, Ok("r1".into())).await;
    assert!(
        matches!(first, Outcome::Executed(ref r) if r == "r1"),
        "first: {first:?}"
    );
    let second = deliver(h, &k, "p", &config, Ok("r2".into())).await;
    assert!(
        matches!(second, Outcome::Replayed(ref r) if r == "r1"),
        "a duplicate must replay the first result, got {second:?}"
    );
    assert_eq!(
        h.effects(&effect_id(&k)).await,
        1,
        "one effect for two deliveries"
    );
    let rec = h.store().get(&k).await.expect("get").expect("a record");
    assert_eq!(rec.state, State::Completed);
}

/// Sixteen concurrent deliveries of one key: one runs, the others wait for its transaction and
/// replay its result; one effect.
pub async fn tx_concurrent_duplicates_run_once<H: TxHarness>(h: &H) {
    let ns = h.namespace();
    let k = key(&ns, "race");
    let config = Config::default();
    let runs = (0..16).map(|i| deliver(h, &k, "p", &config, Ok(format!("r{i}"))));
    let outcomes = futures_util::future::join_all(runs).await;
    let executed = outcomes.iter().filter(|o| o.is_executed()).count();
    assert_eq!(executed, 1, "exactly one delivery runs: {outcomes:?}");
    for o in &outcomes {
        assert!(
            o.is_executed() || o.is_replayed(),
            "a concurrent duplicate must never see an in-progress claim in transactional mode: \
             {o:?}"
        );
    }
    assert_eq!(h.effects(&effect_id(&k)).await, 1);
}

/// A failing handler's writes are undone and its release recorded; the next delivery runs
/// again; at the attempt limit the key fails with the policy's reason and is not run again.
pub async fn tx_failures_undo_writes_and_count_attempts<H: TxHarness>(h: &H) {
    let ns = h.namespace();
    let k = key(&ns, "fails");
    let id = effect_id(&k);
    let config = Config::default().max_attempts(2);
    let first = deliver(h, &k, "p", &config, Err("boom".into())).await;
    assert!(
        matches!(first, Outcome::Released { attempt: 1, ref error, .. } if error == "boom"),
        "first failure releases: {first:?}"
    );
    assert_eq!(
        h.effects(&id).await,
        0,
        "a failed handler's writes are undone"
    );
    let rec = h
        .store()
        .get(&k)
        .await
        .expect("get")
        .expect("the release is recorded");
    assert_eq!((rec.state, rec.attempts), (State::Released, 1));
    let second = deliver(h, &k, "p", &config, Err("boom".into())).await;
    assert!(
        matches!(second, Outcome::Exhausted { attempts: 2, ref reason, error: Some(_) }
            if reason == "attempt 2 of 2 failed: boom"),
        "the last attempt fails the key: {second:?}"
    );
    let third = deliver(h, &k, "p", &config, Ok("late".into())).await;
    assert!(
        matches!(third, Outcome::Exhausted { error: None, .. }),
        "a failed key is not run again: {third:?}"
    );
    assert_eq!(h.effects(&id).await, 0);
}

/// After a release, the redelivery runs and commits once.
pub async fn tx_released_key_runs_again<H: TxHarness>(h: &H) {
    let ns = h.namespace();
    let k = key(&ns, "retry");
    let config = Config::default();
    let first = deliver(h, &k, "p", &config, Err("transient".into())).await;
    assert!(matches!(first, Outcome::Released { .. }), "{first:?}");
    let second = deliver(h, &k, "p", &config, Ok("ok".into())).await;
    assert!(matches!(second, Outcome::Executed(_)), "{second:?}");
    assert_eq!(h.effects(&effect_id(&k)).await, 1);
    let rec = h.store().get(&k).await.expect("get").expect("a record");
    assert_eq!((rec.state, rec.attempts), (State::Completed, 2));
}

/// The same key with another payload is a mismatch: the handler does not run.
pub async fn tx_mismatch_does_not_run<H: TxHarness>(h: &H) {
    let ns = h.namespace();
    let k = key(&ns, "mismatch");
    let config = Config::default();
    let first = deliver(h, &k, "a", &config, Ok(String::new())).await;
    assert!(first.is_executed(), "{first:?}");
    let other = deliver(h, &k, "b", &config, Ok(String::new())).await;
    assert!(
        matches!(other, Outcome::Mismatch { stored, received } if stored == fp("a") && received == fp("b")),
        "{other:?}"
    );
    assert_eq!(h.effects(&effect_id(&k)).await, 1);
}

/// A result over the store's limit fails the key and undoes the handler's writes.
pub async fn tx_oversized_result_fails_the_key<H: TxHarness>(h: &H) {
    let ns = h.namespace();
    let k = key(&ns, "big");
    let limit = h.store().max_result_bytes();
    let big = "x".repeat(limit + 1);
    let out = deliver(h, &k, "p", &Config::default(), Ok(big)).await;
    assert!(
        matches!(out, Outcome::Exhausted { ref reason, error: None, .. }
            if reason.contains("over the store's limit") && reason.contains("rolled back")),
        "{out:?}"
    );
    assert_eq!(h.effects(&effect_id(&k)).await, 0);
    let rec = h.store().get(&k).await.expect("get").expect("a record");
    assert_eq!(rec.state, State::Failed);
}

/// In a batch, one item's failure undoes only its own writes; the others commit. A key repeated
/// in the batch runs once and replays after.
pub async fn tx_batch_failure_is_isolated<H: TxHarness>(h: &H) {
    let ns = h.namespace();
    let keys: Vec<Key> = (0..5).map(|i| key(&ns, &format!("b{i}"))).collect();
    let mut items: Vec<(Key, Fingerprint)> = keys.iter().map(|k| (k.clone(), fp("p"))).collect();
    items.push((keys[0].clone(), fp("p")));
    let ids: Vec<String> = items.iter().map(|(k, _)| effect_id(k)).collect();
    let outcomes = h
        .store()
        .run_batch_transactional(&items, &Config::default(), move |tx, i| {
            let id = ids[i].clone();
            Box::pin(async move {
                H::write_effect(tx, id).await?;
                if i == 2 {
                    Err("item 2 fails".to_owned())
                } else {
                    Ok(format!("r{i}"))
                }
            })
        })
        .await
        .unwrap_or_else(|e| panic!("batch failed: {e}"));
    assert_eq!(outcomes.len(), 6);
    for (i, o) in outcomes.iter().enumerate() {
        match i {
            2 => assert!(matches!(o, Outcome::Released { .. }), "item 2: {o:?}"),
            5 => assert!(
                matches!(o, Outcome::Replayed(r) if r == "r0"),
                "the repeated key replays the first: {o:?}"
            ),
            _ => assert!(
                matches!(o, Outcome::Executed(r) if *r == format!("r{i}")),
                "item {i}: {o:?}"
            ),
        }
    }
    for (i, k) in keys.iter().enumerate() {
        let want = u64::from(i != 2);
        assert_eq!(h.effects(&effect_id(k)).await, want, "effects of item {i}");
    }
}

/// Past retention the key is processed again (and runs once more).
pub async fn tx_retention_expiry_reprocesses<H: TxHarness>(h: &H) {
    let ns = h.namespace();
    let k = key(&ns, "retained");
    let config = Config::default().retention(h.unit());
    assert!(
        deliver(h, &k, "p", &config, Ok(String::new()))
            .await
            .is_executed()
    );
    assert!(
        deliver(h, &k, "p", &config, Ok(String::new()))
            .await
            .is_replayed()
    );
    tokio::time::sleep(h.unit() * 2).await;
    let again = deliver(h, &k, "p", &config, Ok(String::new())).await;
    assert!(
        again.is_executed(),
        "past retention the key runs again: {again:?}"
    );
    assert_eq!(h.effects(&effect_id(&k)).await, 2);
}

/// Stamps out one `#[tokio::test]` per transactional check, calling `$setup().await` for a
/// [`TxHarness`] (or an `Option` of one: `None` skips outside CI).
#[macro_export]
macro_rules! transactional_tests {
    ($setup:path) => {
        $crate::transactional_tests!(
            $setup;
            tx_duplicate_is_replayed,
            tx_concurrent_duplicates_run_once,
            tx_failures_undo_writes_and_count_attempts,
            tx_released_key_runs_again,
            tx_mismatch_does_not_run,
            tx_oversized_result_fails_the_key,
            tx_batch_failure_is_isolated,
            tx_retention_expiry_reprocesses
        );
    };
    ($setup:path; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(harness) = $crate::IntoTxHarness::into_tx_harness($setup().await) else {
                    return;
                };
                $crate::$check(&harness).await;
            }
        )+
    };
}

/// What a transactional setup function may return: a harness, or `None` when its server is
/// missing outside CI.
pub trait IntoTxHarness {
    /// The harness.
    type Harness: TxHarness;
    /// The harness, if there is one.
    fn into_tx_harness(self) -> Option<Self::Harness>;
}

impl<H: TxHarness> IntoTxHarness for H {
    type Harness = H;
    fn into_tx_harness(self) -> Option<H> {
        Some(self)
    }
}

impl<H: TxHarness> IntoTxHarness for Option<H> {
    type Harness = H;
    fn into_tx_harness(self) -> Option<H> {
        self
    }
}
