//! Transactional mode against the shared server: the record commits with the handler's writes,
//! or neither does; concurrent duplicates never both apply the effect.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Ledger, namespace, url};
use idem::{Config, Disposition, Fingerprint, Outcome, State, Store, StoreErrorKind};
use idem_mysql::MysqlStore;
use mysql_async::prelude::Queryable;

const TABLE: &str = "idem_tx_tests";

async fn setup() -> Option<(MysqlStore, Ledger)> {
    let url = url()?;
    Some((common::store(&url, TABLE).await, Ledger::create(&url).await))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effect_and_record_commit_together_and_duplicates_replay() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let key = namespace().key("t1").unwrap();
    for delivery in 0..3 {
        let sql = ledger.insert("t1");
        let outcome: Outcome<String, mysql_async::Error> = store
            .run_transactional(key.clone(), b"10", Config::default(), |tx| {
                Box::pin(async move {
                    tx.query_drop(sql).await?;
                    Ok("receipt-1".to_owned())
                })
            })
            .await
            .unwrap();
        match (delivery, outcome) {
            (0, Outcome::Executed(r)) | (1.., Outcome::Replayed(r)) => assert_eq!(r, "receipt-1"),
            (n, other) => panic!("delivery {n}: unexpected {other:?}"),
        }
    }
    assert_eq!(ledger.rows("t1").await, 1, "the effect must apply once");
    let rec = store.get(&key).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts), (State::Completed, 1));
    assert_eq!(rec.result.as_deref(), Some(&b"receipt-1"[..]));
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_leaves_no_writes_and_counts_the_attempt() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let key = namespace().key("t1").unwrap();
    let config = Config::default().max_attempts(2);
    let sql = ledger.insert("t1");
    let first: Outcome<(), String> = store
        .run_transactional(key.clone(), b"p", config.clone(), |tx| {
            Box::pin(async move {
                tx.query_drop(sql).await.map_err(|e| e.to_string())?;
                Err("declined by the bank".to_owned())
            })
        })
        .await
        .unwrap();
    assert!(
        matches!(first, Outcome::Released { attempt: 1, .. }),
        "{first:?}"
    );
    assert_eq!(
        ledger.rows("t1").await,
        0,
        "the failed handler's write must be rolled back"
    );
    let rec = store.get(&key).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts), (State::Released, 1));

    let sql = ledger.insert("t1");
    let second: Outcome<(), String> = store
        .run_transactional(key.clone(), b"p", config, |tx| {
            Box::pin(async move {
                tx.query_drop(sql).await.map_err(|e| e.to_string())?;
                Err("declined again".to_owned())
            })
        })
        .await
        .unwrap();
    match second.disposition() {
        Disposition::DeadLetter { reason } => {
            assert!(reason.contains("declined again"), "{reason}");
        }
        other => panic!("the second failure of two must dead-letter, got {other:?}"),
    }
    assert_eq!(ledger.rows("t1").await, 0);
    let rec = store.get(&key).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.attempts), (State::Failed, 2));
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_apply_the_effect_once() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let key = namespace().key("contended").unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (store, key, barrier, ran) = (store.clone(), key.clone(), barrier.clone(), ran.clone());
        let sql = ledger.insert("contended");
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let outcome: Outcome<(), mysql_async::Error> = store
                .run_transactional(key, b"p", Config::default(), |tx| {
                    Box::pin(async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        tx.query_drop(sql).await
                    })
                })
                .await
                .unwrap();
            outcome.kind()
        }));
    }
    let mut kinds = Vec::new();
    for t in tasks {
        kinds.push(t.await.unwrap());
    }
    let executed = kinds.iter().filter(|k| **k == "executed").count();
    assert_eq!(executed, 1, "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "replayed").count(),
        15,
        "the others wait on the row lock and replay: {kinds:?}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(ledger.rows("contended").await, 1);
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_rollback_leaves_neither_effect_nor_record() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let key = namespace().key("t1").unwrap();
    let mut tx = store
        .pool()
        .start_transaction(mysql_async::TxOpts::default())
        .await
        .unwrap();
    let sql = ledger.insert("t1");
    let outcome: Outcome<(), mysql_async::Error> = store
        .run_in_transaction(
            &mut tx,
            &key,
            Fingerprint::of(b"p"),
            &Config::default(),
            |tx| Box::pin(async move { tx.query_drop(sql).await }),
        )
        .await
        .unwrap();
    assert!(outcome.is_executed());
    tx.rollback().await.unwrap();
    assert_eq!(ledger.rows("t1").await, 0);
    assert!(store.get(&key).await.unwrap().is_none());

    // The same key in the caller's committed transaction, next to the caller's own write.
    let mut tx = store
        .pool()
        .start_transaction(mysql_async::TxOpts::default())
        .await
        .unwrap();
    let sql = ledger.insert("t1");
    let outcome: Outcome<(), mysql_async::Error> = store
        .run_in_transaction(
            &mut tx,
            &key,
            Fingerprint::of(b"p"),
            &Config::default(),
            |tx| Box::pin(async move { tx.query_drop(sql).await }),
        )
        .await
        .unwrap();
    assert!(outcome.is_executed());
    tx.query_drop(ledger.insert("caller")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        (ledger.rows("t1").await, ledger.rows("caller").await),
        (1, 1)
    );
    assert_eq!(
        store.get(&key).await.unwrap().unwrap().state,
        State::Completed
    );
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_rolled_back_and_the_store_keeps_working() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let key = namespace().key("p").unwrap();
    let sql = ledger.insert("p");
    let result = store
        .run_transactional(
            key.clone(),
            b"p",
            Config::default(),
            |tx| -> idem_mysql::TxFuture<'_, (), mysql_async::Error> {
                Box::pin(async move {
                    tx.query_drop(sql).await?;
                    panic!("handler bug");
                })
            },
        )
        .await;
    let err = result.expect_err("a panicking handler must not report success");
    assert!(err.to_string().contains("panicked"), "{err}");
    assert_eq!(ledger.rows("p").await, 0);
    assert!(store.get(&key).await.unwrap().is_none());
    let sql = ledger.insert("p");
    let ok: Outcome<(), mysql_async::Error> = store
        .run_transactional(key, b"p", Config::default(), |tx| {
            Box::pin(async move { tx.query_drop(sql).await })
        })
        .await
        .unwrap();
    assert!(ok.is_executed());
    assert_eq!(ledger.rows("p").await, 1);
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatch_and_oversized_results_leave_no_writes() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let ns = namespace();
    let sql = ledger.insert("m");
    let ok: Outcome<(), mysql_async::Error> = store
        .run_transactional(
            ns.key("m").unwrap(),
            b"amount=10",
            Config::default(),
            |tx| Box::pin(async move { tx.query_drop(sql).await }),
        )
        .await
        .unwrap();
    assert!(ok.is_executed());
    let sql = ledger.insert("m");
    let mismatch: Outcome<(), mysql_async::Error> = store
        .run_transactional(
            ns.key("m").unwrap(),
            b"amount=99",
            Config::default(),
            |tx| Box::pin(async move { tx.query_drop(sql).await }),
        )
        .await
        .unwrap();
    assert!(matches!(mismatch, Outcome::Mismatch { .. }), "{mismatch:?}");
    let sql = ledger.insert("big");
    let big: Outcome<Vec<u8>, mysql_async::Error> = store
        .run_transactional(ns.key("big").unwrap(), b"p", Config::default(), |tx| {
            Box::pin(async move {
                tx.query_drop(sql).await?;
                Ok(vec![0u8; 65 * 1024])
            })
        })
        .await
        .unwrap();
    assert!(matches!(big, Outcome::Exhausted { .. }), "{big:?}");
    assert_eq!((ledger.rows("m").await, ledger.rows("big").await), (1, 0));
    let rec = store.get(&ns.key("big").unwrap()).await.unwrap().unwrap();
    assert_eq!(rec.state, State::Failed);
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_equals_single_runs_in_order() {
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let ns = namespace();
    let fp = Fingerprint::of(b"p");
    // "a" twice: it runs once and replays; "bad" fails and is rolled back alone; "mix" was
    // completed before with another payload.
    let seed: Outcome<(), mysql_async::Error> = store
        .run_transactional(ns.key("mix").unwrap(), b"other", Config::default(), |_| {
            Box::pin(async { Ok(()) })
        })
        .await
        .unwrap();
    assert!(seed.is_executed());
    let ids = ["a", "bad", "a", "b", "mix"];
    let items: Vec<_> = ids.iter().map(|id| (ns.key(*id).unwrap(), fp)).collect();
    let ran = Arc::new(AtomicUsize::new(0));
    let ran2 = ran.clone();
    let sqls: Vec<String> = ids.iter().map(|id| ledger.insert(id)).collect();
    let outcomes: Vec<Outcome<u32, String>> = store
        .run_batch_transactional(&items, &Config::default(), move |i, tx| {
            ran2.fetch_add(1, Ordering::SeqCst);
            let sql = sqls[i].clone();
            Box::pin(async move {
                tx.query_drop(sql).await.map_err(|e| e.to_string())?;
                if ids[i] == "bad" {
                    return Err("bad item".to_owned());
                }
                Ok(u32::try_from(i).unwrap())
            })
        })
        .await
        .unwrap();
    let kinds: Vec<_> = outcomes.iter().map(Outcome::kind).collect();
    assert_eq!(
        kinds,
        ["executed", "released", "replayed", "executed", "mismatch"]
    );
    assert!(matches!(outcomes[2], Outcome::Replayed(0)));
    // "a" and "bad" ran under one savepoint; "bad" failed, which rolled back "a" too, so the
    // batch ran again with a savepoint per handler: a, bad, b.
    assert_eq!(ran.load(Ordering::SeqCst), 5);
    assert_eq!(
        (
            ledger.rows("a").await,
            ledger.rows("bad").await,
            ledger.rows("b").await
        ),
        (1, 0, 1)
    );
    let bad = store.get(&ns.key("bad").unwrap()).await.unwrap().unwrap();
    assert_eq!((bad.state, bad.attempts), (State::Released, 1));

    // A failure before any other handler wrote is undone alone, without running anything twice.
    let ids2 = ["bad2", "c"];
    let items: Vec<_> = ids2.iter().map(|id| (ns.key(*id).unwrap(), fp)).collect();
    let ran2 = ran.clone();
    let sqls: Vec<String> = ids2.iter().map(|id| ledger.insert(id)).collect();
    let outcomes: Vec<Outcome<(), String>> = store
        .run_batch_transactional(&items, &Config::default(), move |i, tx| {
            ran2.fetch_add(1, Ordering::SeqCst);
            let sql = sqls[i].clone();
            Box::pin(async move {
                tx.query_drop(sql).await.map_err(|e| e.to_string())?;
                if i == 0 {
                    return Err("bad item".to_owned());
                }
                Ok(())
            })
        })
        .await
        .unwrap();
    let kinds: Vec<_> = outcomes.iter().map(Outcome::kind).collect();
    assert_eq!(kinds, ["released", "executed"]);
    assert_eq!(ran.load(Ordering::SeqCst), 7);
    assert_eq!((ledger.rows("bad2").await, ledger.rows("c").await), (0, 1));
    ledger.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_a_schema_error_that_says_how_to_create_it() {
    let Some(url) = url() else {
        return;
    };
    let store = MysqlStore::builder(url)
        .table(common::unique("missing"))
        .build()
        .unwrap();
    let key = namespace().key("x").unwrap();
    let err = store
        .claim(&idem::ClaimRequest::new(key, Fingerprint::of(b"p")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    assert!(err.to_string().contains("migrate()"), "{err}");
    let err = store.check_schema().await.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Schema, "{err}");
    assert!(err.to_string().contains("migrate()"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_in_any_order_apply_each_effect_once() {
    // Batches that share keys, each listing them in another order: if their row locks were
    // taken in list order, two of them would deadlock (one would fail with Busy).
    let Some((store, ledger)) = setup().await else {
        return;
    };
    let ns = namespace();
    let ids: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    let fp = Fingerprint::of(b"p");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut order = ids.clone();
        fastrand::Rng::with_seed(t).shuffle(&mut order);
        let items: Vec<_> = order.iter().map(|id| (ns.key(id).unwrap(), fp)).collect();
        let sqls: Vec<String> = order.iter().map(|id| ledger.insert(id)).collect();
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let outcomes: Vec<Outcome<(), mysql_async::Error>> = store
                .run_batch_transactional(&items, &Config::default(), move |i, tx| {
                    let sql = sqls[i].clone();
                    Box::pin(async move { tx.query_drop(sql).await })
                })
                .await
                .expect("no deadlock, no error");
            outcomes.iter().filter(|o| o.is_executed()).count()
        }));
    }
    let mut executed = 0;
    for t in tasks {
        executed += t.await.unwrap();
    }
    assert_eq!(
        executed,
        ids.len(),
        "each key executes once across all batches"
    );
    for id in &ids {
        assert_eq!(ledger.rows(id).await, 1, "effect of {id}");
    }
    ledger.drop_table().await;
}
