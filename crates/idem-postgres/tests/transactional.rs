//! Transactional mode against the shared server, beyond the transactional conformance suite
//! (tests/tx_conformance.rs): the caller's own transactions, idem's fast path and its per-item
//! fallback, handlers that hide a failed statement or panic, and batches that meet in opposite
//! orders.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use idem::{Config, Fingerprint, Namespace, Outcome, State, Store, Transactional, TxFuture};
use idem_postgres::TxClient;
use tokio_postgres::NoTls;

use common::Db;

fn key(id: &str) -> idem::Key {
    Namespace::new("ledger").unwrap().key(id).unwrap()
}

async fn run_plain(
    tx: &tokio_postgres::Transaction<'_>,
    db: &Db,
) -> Result<Outcome<(), tokio_postgres::Error>, idem::Error> {
    let ledger = db.ledger();
    idem_postgres::run_in_transaction(
        tx,
        db.store.table(),
        &key("p"),
        Fingerprint::of(b"p"),
        &Config::default(),
        1024,
        move |tx| {
            Box::pin(async move {
                tx.execute(&format!("INSERT INTO {ledger} VALUES ('p', 1)"), &[])
                    .await
                    .map(drop)
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_tokio_postgres_transaction_rolled_back_by_the_caller_leaves_nothing() {
    let Some(db) = Db::new("idem_tx_plain").await else {
        return;
    };
    let (mut client, conn) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let tx = client.transaction().await.unwrap();
    assert!(run_plain(&tx, &db).await.unwrap().is_executed());
    tx.rollback().await.unwrap();
    assert_eq!(db.ledger_rows().await, 0);
    assert!(
        db.store.get(&key("p")).await.unwrap().is_none(),
        "the record rolled back too"
    );

    let tx = client.transaction().await.unwrap();
    assert!(
        run_plain(&tx, &db).await.unwrap().is_executed(),
        "after a rollback the key runs again"
    );
    tx.commit().await.unwrap();
    let tx = client.transaction().await.unwrap();
    assert!(run_plain(&tx, &db).await.unwrap().is_replayed());
    tx.commit().await.unwrap();
    assert_eq!(db.ledger_rows().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_behaves_like_its_items_one_after_another() {
    let Some(db) = Db::new("idem_tx_batch").await else {
        return;
    };
    let config = Config::default().max_attempts(3);
    let items: Vec<(idem::Key, Fingerprint)> = ["a", "b", "bad", "a", "c"]
        .iter()
        .map(|id| (key(id), Fingerprint::of(id.as_bytes())))
        .collect();
    let ledger = db.ledger();
    let mut client = db.store.pool().get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let outcomes = idem_postgres::run_batch_in_transaction(
        &tx,
        db.store.table(),
        &items,
        &config,
        1024,
        |tx, i| {
            let ledger = ledger.clone();
            let id = items[i].0.id().to_owned();
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                tx.execute(&format!("INSERT INTO {ledger} VALUES ($1, 1)"), &[&id])
                    .await
                    .map_err(|e| e.to_string())?;
                if id == "bad" {
                    return Err("bad item".to_owned());
                }
                Ok(format!("done {id}"))
            })
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let kinds: Vec<_> = outcomes.iter().map(Outcome::kind).collect();
    assert_eq!(
        kinds,
        ["executed", "executed", "released", "replayed", "executed"]
    );
    assert!(matches!(&outcomes[3], Outcome::Replayed(r) if r == "done a"));
    // a, b, c, once each; the failing item's write is undone.
    let client = db.store.pool().get().await.unwrap();
    let rows: Vec<String> = client
        .query(
            &format!("SELECT transfer FROM {} ORDER BY transfer", db.ledger()),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["a", "b", "c"]);
    let bad = db.store.get(&key("bad")).await.unwrap().expect("record");
    assert_eq!((bad.state, bad.attempts), (State::Released, 1));
    // The first pass stops at "bad" (a, b, bad); the per-item pass runs a and b again (their
    // writes were undone) and c, and records bad's first failure without running it again.
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 6);
}

fn owned_handler(
    ledger: String,
    ids: &[&str],
    fail: &'static str,
) -> impl for<'c> Fn(&'c mut TxClient, usize) -> TxFuture<'c, String, String> + Send + Sync + 'static
{
    let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    move |c, i| {
        let ledger = ledger.clone();
        let id = ids[i].clone();
        Box::pin(async move {
            c.execute(&format!("INSERT INTO {ledger} VALUES ($1, 1)"), &[&id])
                .await
                .map_err(|e| e.to_string())?;
            if id == fail {
                return Err(format!("{id} declined"));
            }
            Ok(format!("ok {id}"))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_owned_batch_commits_once_and_falls_back_per_item_on_failure() {
    let Some(db) = Db::new("idem_tx_owned").await else {
        return;
    };
    let handler = |ids, fail| owned_handler(db.ledger(), ids, fail);
    let items = |ids: &[&str]| -> Vec<(idem::Key, Fingerprint)> {
        ids.iter()
            .map(|id| (key(id), Fingerprint::of(b"p")))
            .collect()
    };
    let config = Config::default();
    // The fast path: every handler succeeds, one commit.
    let first = db
        .store
        .run_batch_transactional(&items(&["a", "b"]), &config, handler(&["a", "b"], "none"))
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(Outcome::kind).collect::<Vec<_>>(),
        ["executed", "executed"]
    );
    // A failure rolls the attempt back and runs the batch again, one savepoint per item.
    let ids4 = items(&["a", "c", "d", "e"]);
    let second = db
        .store
        .run_batch_transactional(&ids4, &config, handler(&["a", "c", "d", "e"], "d"))
        .await
        .unwrap();
    let kinds: Vec<_> = second.iter().map(Outcome::kind).collect();
    assert_eq!(kinds, ["replayed", "executed", "released", "executed"]);
    assert!(matches!(&second[0], Outcome::Replayed(r) if r == "ok a"));
    let client = db.store.pool().get().await.unwrap();
    let rows: Vec<String> = client
        .query(
            &format!("SELECT transfer FROM {} ORDER BY transfer", db.ledger()),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        ["a", "b", "c", "e"],
        "each effect once, the failed one undone"
    );
    let d = db.store.get(&key("d")).await.unwrap().expect("record");
    assert_eq!((d.state, d.attempts), (State::Released, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_hides_a_failed_statement_is_not_reported_as_executed() {
    let Some(db) = Db::new("idem_tx_hidden").await else {
        return;
    };
    // The handler's statement fails (the transaction is now aborted) but it returns Ok: the
    // commit would silently roll back, so idem must report an error, never `Executed`.
    let result = db
        .store
        .run_transactional(&key("h"), Fingerprint::of(b"p"), &Config::default(), |c| {
            Box::pin(async move {
                let _ = c.execute("INSERT INTO no_such_table VALUES (1)", &[]).await;
                Ok::<_, String>(())
            })
        })
        .await;
    assert!(result.is_err(), "{result:?}");
    assert!(db.store.get(&key("h")).await.unwrap().is_none());
    // The store keeps working, and the redelivery runs.
    let ok = db
        .store
        .run_transactional(&key("h"), Fingerprint::of(b"p"), &Config::default(), |_| {
            Box::pin(async { Ok::<_, String>(()) })
        })
        .await
        .unwrap();
    assert!(ok.is_executed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_commits_nothing_and_leaves_no_open_transaction_in_the_pool() {
    let Some(db) = Db::new("idem_tx_panic").await else {
        return;
    };
    let (store, ledger) = (db.store.clone(), db.ledger());
    let joined = tokio::spawn(async move {
        store
            .run_transactional(
                &key("p"),
                Fingerprint::of(b"p"),
                &Config::default(),
                move |c| {
                    Box::pin(async move {
                        c.execute(&format!("INSERT INTO {ledger} VALUES ('p', 1)"), &[])
                            .await
                            .map_err(|e| e.to_string())?;
                        panic!("handler bug");
                        #[allow(unreachable_code)]
                        Ok::<_, String>(())
                    })
                },
            )
            .await
    })
    .await;
    assert!(joined.is_err_and(|e| e.is_panic()));
    // Had the connection gone back to the pool inside its transaction, the next delivery would
    // run in that transaction and commit the panicked handler's write with its own.
    let ledger = db.ledger();
    let next = db
        .store
        .run_transactional(
            &key("q"),
            Fingerprint::of(b"q"),
            &Config::default(),
            move |c| {
                Box::pin(async move {
                    c.execute(&format!("INSERT INTO {ledger} VALUES ('q', 1)"), &[])
                        .await
                        .map(drop)
                })
            },
        )
        .await
        .unwrap();
    assert!(next.is_executed());
    assert_eq!(
        db.ledger_rows().await,
        1,
        "only the second delivery's write is committed"
    );
    assert!(db.store.get(&key("p")).await.unwrap().is_none());
}

/// Two consumers claiming overlapping batches in opposite orders (a redelivered batch meeting
/// the one in flight) must wait for each other, never deadlock: a deadlock aborts the whole
/// transaction of one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_batches_in_opposite_orders_do_not_deadlock() {
    let Some(db) = Db::new("deadlock").await else {
        return;
    };
    let ns = idem::Namespace::new("deadlock").unwrap();
    let config = idem::Config::default();
    // Both claims start together, so that they meet mid-batch.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let run = |descending: bool| {
        let (store, ns, config) = (db.store.clone(), ns.clone(), config.clone());
        let barrier = Arc::clone(&barrier);
        tokio::spawn(async move {
            let mut deadlocks = 0;
            for round in 0..30 {
                let mut items: Vec<_> = (0..200)
                    .map(|i| {
                        let key = ns.key(format!("r{round}-k{i:02}")).unwrap();
                        (key, idem::Fingerprint::of(b"p"))
                    })
                    .collect();
                if descending {
                    items.reverse();
                }
                let mut client = store.pool().get().await.unwrap();
                let tx = client.transaction().await.unwrap();
                barrier.wait().await;
                let out = idem_postgres::run_batch_in_transaction(
                    &tx,
                    store.table(),
                    &items,
                    &config,
                    1024,
                    |_, _| Box::pin(async { Ok::<_, String>(()) }),
                )
                .await;
                match out {
                    Ok(_) => tx.commit().await.unwrap(),
                    Err(e) if e.to_string().contains("deadlock") => deadlocks += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            deadlocks
        })
    };
    let (a, b) = (run(false), run(true));
    let deadlocks = a.await.unwrap() + b.await.unwrap();
    assert_eq!(deadlocks, 0, "claims of overlapping batches deadlocked");
}
